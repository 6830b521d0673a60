if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then
  redis.call('DEL', KEYS[1])
  return ''
end
if redis.call('HGET', KEYS[1], 'profile_sha') == ARGV[1] then return false end
local named = redis.call('HGET', KEYS[1], 'list_sha') or ''
redis.call('DEL', KEYS[1])
return named
