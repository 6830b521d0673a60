-- KEYS[1]: the set of unavailable item ids. ARGV[1]: the most members read.
-- Returns {type, cardinality} when the key is not a set (type 'none': absent, 0) or holds more
-- than ARGV[1] members; otherwise {'set', cardinality, members}.
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'set' then return {kind, 0} end
local n = redis.call('SCARD', KEYS[1])
if n > tonumber(ARGV[1]) then return {kind, n} end
return {kind, n, redis.call('SMEMBERS', KEYS[1])}
