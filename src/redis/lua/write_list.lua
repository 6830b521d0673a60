redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'profile_sha', ARGV[1], 'model_version', ARGV[5], 'computed_at_ms', ARGV[6],
  'scores', ARGV[9], 'strategy', ARGV[10], 'list_sha', redis.sha1hex(ARGV[3]), 'model_sha', ARGV[11],
  'variant', ARGV[12])
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('PUBLISH', ARGV[7], ARGV[8])
return 1
