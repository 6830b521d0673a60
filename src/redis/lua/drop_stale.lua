local sha = 'missing'
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' then sha = redis.sha1hex(redis.call('GET', KEYS[1])) elseif kind ~= 'none' then sha = kind end
local stored = false
if redis.call('TYPE', KEYS[3])['ok'] == 'hash' then stored = redis.call('HGET', KEYS[3], 'profile_sha') end
if stored == sha then return 0 end
if redis.call('DEL', KEYS[2], KEYS[3]) > 0 then return 1 end
return 0
