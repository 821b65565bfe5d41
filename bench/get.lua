-- wrk script: GET one path again and again (env: GET_PATH, TOKEN optional).
function init(args)
  local token = os.getenv("TOKEN")
  if token ~= nil and token ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. token
  end
  path = os.getenv("GET_PATH")
end

function request()
  return wrk.format("GET", path)
end

function done(summary, latency, requests)
  io.write(string.format(
    "WRKJSON {\"requests\": %d, \"duration_us\": %d, \"non2xx\": %d, \"socket_errors\": %d, " ..
    "\"p50_us\": %d, \"p99_us\": %d, \"bytes\": %d}\n",
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), summary.bytes))
end
