local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[1]) then return -1 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'profile_sha', ARGV[2], 'model_version', ARGV[3], 'computed_at_ms', ARGV[4],
  'scores', ARGV[5], 'strategy', ARGV[6], 'list_sha', ARGV[7], 'model_sha', ARGV[11],
  'variant', ARGV[12])
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('PUBLISH', ARGV[9], ARGV[10])
return 1
