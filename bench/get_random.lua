-- wrk: GET /get for a random one of BENCH_USERS users (default 10000)
local users = tonumber(os.getenv("BENCH_USERS") or "10000")
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/get?user_id=" .. math.random(0, users - 1))
end
