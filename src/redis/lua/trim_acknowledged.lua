local function older(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local keep = nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local need = info['last-delivered-id']
  if tonumber(info['pending']) > 0 then need = redis.call('XPENDING', KEYS[1], info['name'])[2] end
  if keep == nil or older(need, keep) then keep = need end
end
if keep == nil then return 0 end
return redis.call('XTRIM', KEYS[1], 'MINID', '~', keep)
