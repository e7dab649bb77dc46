"""The Lua script that decides token buckets inside Redis, and how it is run.

For each bucket it is given, in order, the script credits the bucket for the
time since its last visit by the Redis server's own clock (``TIME``, so the
gateways' clocks do not matter), takes the token if there is one (a cost of
0 only reads; a negative cost charges tokens spent elsewhere), and stores
the level: a full bucket is deleted, an emptier one expires when it would be
full again.  Redis runs scripts one at a time, so however many gateways ask
at once, no window of ``t`` seconds admits more than ``C + R·t``.
"""

from __future__ import annotations

import hashlib
from typing import Any, List

import txredisapi
from twisted.internet import defer
from twisted.python.failure import Failure

KEY_PREFIX = "lbsvc:bucket:"
"""Where a user's bucket is in Redis (the user's name follows)."""

SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local out = {}
for i, key in ipairs(KEYS) do
  local capacity = tonumber(ARGV[3 * i - 2])
  local rate = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local state = redis.call('HMGET', key, 'level', 'at')
  local level = tonumber(state[1])
  local at = tonumber(state[2])
  if level == nil or at == nil then
    level = capacity
    at = now
  end
  if now > at then
    level = level + (now - at) * rate
  end
  if level > capacity then
    level = capacity
  end
  local taken = 0
  if cost > 0 and level >= cost then
    level = level - cost
    taken = 1
  elseif cost < 0 then
    level = math.max(level + cost, -capacity)
    taken = 1
  end
  if level >= capacity then
    redis.call('DEL', key)
  else
    redis.call('HSET', key, 'level', string.format('%.17g', level), 'at', string.format('%.17g', now))
    redis.call('PEXPIRE', key, math.ceil((capacity - level) / rate * 1000) + 1000)
  end
  out[2 * i - 1] = taken
  out[2 * i] = string.format('%.17g', level)
end
return out
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode("utf-8")).hexdigest()


def run_script(redis: Any, keys: List[str], args: List[str]) -> defer.Deferred[Any]:
    """Run :data:`SCRIPT` over ``keys`` (loading it first if this Redis does not know it yet)."""
    return run_lua(redis, SCRIPT, SCRIPT_SHA, keys, args)


def run_lua(redis: Any, script: str, sha: str, keys: List[str], args: List[str]) -> defer.Deferred[Any]:
    """Run ``script`` by its hash ``sha``, sending the whole script (which loads it) if Redis does not know it."""
    d: defer.Deferred[Any] = redis.evalsha(sha, keys, args)

    def unknown(reason: Failure) -> Any:
        if reason.check(txredisapi.ScriptDoesNotExist) or (
                reason.check(txredisapi.ResponseError) and "NOSCRIPT" in str(reason.value)):
            return redis.eval(script, keys, args)  # loads it for next time
        return reason

    return d.addErrback(unknown)

