local v = redis.call('GET', KEYS[1])
if not v then return 0 end
if ARGV[1] ~= '' and redis.sha1hex(v) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
