local kind = redis.call('TYPE', KEYS[1])['ok']
local t = redis.call('TIME')
if kind ~= 'string' then return {kind, false, false, t} end
return {kind, redis.call('STRLEN', KEYS[1]), redis.call('GETRANGE', KEYS[1], 0, ARGV[1]), t}
