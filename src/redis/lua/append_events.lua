local topic, max_items, max_bytes = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local keep_ids, ttl = tonumber(ARGV[4]), ARGV[5]
local out, marks, moved, seen, pending = {}, {}, {}, {}, {}
-- the user's remembered events, id -> item (true for an entry of the first version: the id only),
-- read once and only when needed
local known
local function remembered(id)
  if known == nil then
    known = {}
    for _, entry in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
      local eid, item = string.match(entry, '^(%S+) (%S+)$')
      if eid == nil then eid, item = entry, true end
      if known[eid] == nil then known[eid] = item end
    end
  end
  return known[id]
end
local function refuse(reason)
  for i = 1, #out do
    if out[i][1] == 1 then out[i] = {-1, reason} end
  end
  return out
end
for _, k in ipairs({{KEYS[2], 'list'}, {KEYS[3], 'hash'}}) do
  local kind = redis.call('TYPE', k[1])['ok']
  if kind ~= 'none' and kind ~= k[2] then
    for i = 6, #ARGV, 4 do out[#out + 1] = {-1, k[1] .. ' holds a Redis ' .. kind .. ', expected a ' .. k[2]} end
    return out
  end
end
for i = 6, #ARGV, 4 do
  local item, id, field, offset = ARGV[i], ARGV[i + 1], topic .. ':' .. ARGV[i + 2], tonumber(ARGV[i + 3])
  if marks[field] == nil then marks[field] = tonumber(redis.call('HGET', KEYS[3], field) or '-1') end
  if offset <= marks[field] then
    out[#out + 1] = {0, 'offset'}
  else
    marks[field] = offset
    moved[field] = true
    local before = seen[id] or remembered(id)
    if before == nil then
      seen[id] = item
      out[#out + 1] = {1, ''}
      pending[#pending + 1] = {item, id}
    elseif before == true or before == item then
      out[#out + 1] = {0, 'event_id'}
    else
      out[#out + 1] = {-2, 'event_id reused with a different item: ' .. item .. ' (applied before with ' .. before .. ')'}
    end
  end
end
if #pending > 0 then
  local items = {}
  local kind = redis.call('TYPE', KEYS[1])['ok']
  if kind == 'string' then
    -- never parse what the API would not read (a huge value would block Redis for seconds)
    local size = redis.call('STRLEN', KEYS[1])
    if size > max_bytes then
      return refuse('the stored profile is ' .. size .. ' bytes, at most ' .. max_bytes .. ' are accepted (MAX_PROFILE_BYTES)')
    end
    local raw = redis.call('GET', KEYS[1])
    if not string.find(raw, '^%s*%[') then
      return refuse('the stored profile is not a JSON array of item ids')
    end
    local ok, decoded = pcall(cjson.decode, raw)
    if not ok or type(decoded) ~= 'table' then
      return refuse('the stored profile is not JSON')
    end
    local n = 0
    for _ in pairs(decoded) do n = n + 1 end
    for i = 1, n do
      if type(decoded[i]) ~= 'string' then
        return refuse('element ' .. (i - 1) .. ' of the stored profile is not a string item id')
      end
    end
    items = decoded
  elseif kind ~= 'none' then
    return refuse('the profile key holds a Redis ' .. kind .. ', expected a string')
  end
  local appended = {}
  for _, p in ipairs(pending) do
    items[#items + 1] = p[1]
    appended[p[1]] = true
  end
  -- newest first, an appended item at its latest position only, capped by count and by bytes
  local kept, taken, bytes = {}, {}, 1
  for i = #items, 1, -1 do
    local item = items[i]
    if not (appended[item] and taken[item]) then
      taken[item] = true
      local encoded = cjson.encode(item)
      if #kept >= max_items or (#kept > 0 and bytes + #encoded + 1 > max_bytes) then break end
      bytes = bytes + #encoded + 1
      kept[#kept + 1] = encoded
    end
  end
  local ordered = {}
  for i = #kept, 1, -1 do ordered[#ordered + 1] = kept[i] end
  redis.call('SET', KEYS[1], '[' .. table.concat(ordered, ',') .. ']', 'KEEPTTL')
  for i = 1, #out do
    if out[i][1] == 1 then out[i][2] = tostring(#ordered) end
  end
  for _, p in ipairs(pending) do redis.call('LPUSH', KEYS[2], p[2] .. ' ' .. p[1]) end
  redis.call('LTRIM', KEYS[2], 0, keep_ids - 1)
  redis.call('EXPIRE', KEYS[2], ttl)
end
for field in pairs(moved) do redis.call('HSET', KEYS[3], field, marks[field]) end
if next(moved) then redis.call('EXPIRE', KEYS[3], ttl) end
return out
