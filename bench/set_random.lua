-- wrk: POST /set of one grade for a random one of BENCH_USERS users (default 100000),
-- with the admin's Basic credentials (admin:admin, as the harness starts replicas).
local users = tonumber(os.getenv("BENCH_USERS") or "100000")
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 1000)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Basic YWRtaW46YWRtaW4="
request = function()
  local id = math.random(0, users - 1)
  local body = string.format('{"user_id":"%d","postpaid_limit":%d,"spp":%d}', id, math.random(0, 100000),
                             math.random(0, 100000))
  return wrk.format(nil, "/set", nil, body)
end
