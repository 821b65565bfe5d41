-- wrk script: POST one body again and again to the upload route, each request with the
-- next appliance's Basic credentials (env: AUTH_FILE, one header value a line; BODY_BYTES).
local auths = {}
local next_auth = 1

function init(args)
  for line in io.lines(os.getenv("AUTH_FILE")) do
    auths[#auths + 1] = line
  end
  next_auth = math.random(#auths)
  body = string.rep("x", tonumber(os.getenv("BODY_BYTES")))
end

function request()
  next_auth = next_auth % #auths + 1
  return wrk.format("POST", "/api/systems/backups", {
    ["Authorization"] = auths[next_auth],
    ["Content-Type"] = "application/gzip",
    ["X-Filename"] = "bench.tar.gz",
  }, body)
end

function done(summary, latency, requests)
  io.write(string.format(
    "WRKJSON {\"requests\": %d, \"duration_us\": %d, \"non2xx\": %d, \"socket_errors\": %d, " ..
    "\"p50_us\": %d, \"p99_us\": %d, \"bytes\": %d}\n",
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), summary.bytes))
end
