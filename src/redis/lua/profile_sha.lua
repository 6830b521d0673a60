local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' then return redis.sha1hex(redis.call('GET', KEYS[1])) end
if kind == 'none' then return 'missing' end
return kind
