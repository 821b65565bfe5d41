-- wrk script: each thread deletes its own share of the seeded ids, each id once.
-- env: IDS_FILE (lines "system_id backup_id"), TOKEN, THREADS
local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local nthreads = tonumber(os.getenv("THREADS"))
  token = os.getenv("TOKEN")
  paths = {}
  local i = 0
  for line in io.lines(os.getenv("IDS_FILE")) do
    if i % nthreads == tid then
      local sid, bid = line:match("(%S+) (%S+)")
      paths[#paths + 1] = "/api/systems/" .. sid .. "/backups/" .. bid
    end
    i = i + 1
  end
  next_index = 1
  wrk.headers["Authorization"] = "Bearer " .. token
  wrk.method = "DELETE"
end

-- PACE_MS set: wait a random 0..2*PACE_MS before each request (an offered load, not a flood)
local pace = tonumber(os.getenv("PACE_MS") or "")
if pace ~= nil then
  function delay()
    return math.random(0, 2 * pace)
  end
end

function request()
  local path = paths[next_index]
  if path == nil then
    -- out of ids: ask for one that was already deleted (answers 404, counted as non-2xx)
    path = paths[1]
  else
    next_index = next_index + 1
  end
  return wrk.format("DELETE", path)
end

function done(summary, latency, requests)
  io.write(string.format(
    "WRKJSON {\"requests\": %d, \"duration_us\": %d, \"non2xx\": %d, \"socket_errors\": %d, " ..
    "\"p50_us\": %d, \"p99_us\": %d}\n",
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
