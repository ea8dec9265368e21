-- wrk script for `make bench`: POSTs the chat body that bench.py passes in BENCH_BODY, with the
-- consumer key in BENCH_KEY; BENCH_STREAM=1 adds `x-bench-stream: 1`, which the upstream routes to
-- its SSE answer. `done` prints one machine-readable line (latencies in microseconds).
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY") or "{}"
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "none")
if os.getenv("BENCH_STREAM") == "1" then
  wrk.headers["x-bench-stream"] = "1"
end

-- BENCH_UNIQUE=<tag>: `__N__` in the body becomes `<tag>-<n>`, n new on every request (the response
-- cache's miss cell: every request a new question).
local unique = os.getenv("BENCH_UNIQUE") or ""
if unique ~= "" then
  local n = 0
  local template = wrk.body
  request = function()
    n = n + 1
    local body = template:gsub("__N__", unique .. "-" .. n, 1)
    return wrk.format(nil, nil, nil, body)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"bytes":%.0f,"duration_us":%.0f,"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,' ..
    '"mean_us":%.1f,"max_us":%.0f,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.bytes, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
