local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[2]) then return -1 end
local v = redis.call('GET', KEYS[1])
local sha = 'missing'
if v then sha = redis.sha1hex(v) end
if sha ~= ARGV[1] then return 0 end
