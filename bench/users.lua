-- wrk script: POST /recommend/<user_id> over many distinct users.
-- USERS_FILE (env): one user id per line; QUERY_SUFFIX (env), if set, is added to every query.
-- Each wrk thread walks the list from its own offset, so consecutive requests go to different
-- users. done() prints one JSON line starting with "RESULT ".
local users = {}
local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("offset", counter * 7919)
  table.insert(threads, thread)
end

function init(args)
  local path = os.getenv("USERS_FILE") or "users.txt"
  for line in io.lines(path) do
    if #line > 0 then users[#users + 1] = line end
  end
  i = offset or 0
  statuses = {}
  k = os.getenv("K") or "10"
  -- appended to every request's query (e.g. "&exclude=A,B"; bench/filters_ab.py)
  suffix = os.getenv("QUERY_SUFFIX") or ""
end

function request()
  i = i + 1
  local id = users[(i % #users) + 1]
  return wrk.format("POST", "/recommend/" .. id .. "?k=" .. k .. suffix)
end

function response(status, headers, body)
  local s = tostring(status)
  statuses[s] = (statuses[s] or 0) + 1
end

function done(summary, latency, requests)
  local by_status = {}
  for _, t in ipairs(threads) do
    local st = t:get("statuses")
    if st then
      for s, n in pairs(st) do by_status[s] = (by_status[s] or 0) + n end
    end
  end
  local parts = {}
  for s, n in pairs(by_status) do parts[#parts + 1] = string.format('"%s": %d', s, n) end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "mean_us": %.1f, "errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}, ' ..
    '"status": {%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write, e.timeout,
    table.concat(parts, ", ")))
end
