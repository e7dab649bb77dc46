"""The Lua script that grants, renews and takes back leased tokens inside Redis.

Per user (one hash, ``lbsvc:lease:NAME``) Redis holds ``b``, the free
tokens; ``O``, the tokens out on lease; ``t``, the Redis time up to which
``b`` was refilled; and for each gateway process holding a lease (its
*holder* id) the lease's id, the tokens it holds, when it ends by Redis's
clock, and the spending reported so far.  ``b + O <= C`` at all times, and
refill is ``b = min(C - O, b + R*dt)``; see docs/design.md ("Leased tokens")
for why each step keeps the bound ``C + R*t`` on admissions in any window.

One call carries, for each user, what the calling process asks for and
what it reports:

- ``want``: tokens it would like (0: none, a report or a return only);
- ``lease``: the id of the lease it believes it holds ('' for none);
- ``spent``: the tokens it has spent of that lease so far, a running total
  (so a report sent twice, after a timeout, is counted once);
- ``keep``: the unspent tokens it goes on spending.  Whatever Redis holds
  for it beyond ``keep`` goes back to ``b`` (tokens it returns, tokens of a
  grant whose answer it never read): it will not spend them;
- ``share``: the most it may hold (its share of ``C`` among the live
  gateways);
- ``charge``: tokens its ``local`` fallback admitted while Redis was away,
  taken from ``b`` (down to ``-C``: a debt that refills); dropped when it
  comes within one lease length of the start of an epoch that began empty
  (see below).

Leases end by Redis's clock (``TIME``), ``lease_length`` after their last
grant or renewal (every call by a holder that still holds tokens renews its
lease); what an ended lease held leaves ``O`` without going back to ``b``.

**Epochs.**  The caller passes the replication id of the Redis it is
connected to (``master_replid``: new when Redis restarts without its data
or a replica is promoted).  The first call that brings a new id starts an
epoch; every user of an earlier epoch is forgotten.  Users then start full
only when Redis had no epoch at all *and* the caller has never seen another
Redis (a first start); otherwise they start empty and refill from one lease
length after the epoch began, by which time every block of the lost state
has ended in the gateways that hold it.  What a ``local`` fallback admitted
during the outage came from the lost state too (its last levels, and refill
before the epoch's own refill begins), so a charge arriving before then is
not taken from the new epoch: it would deny the user for up to ``C/R``
seconds longer for tokens the empty start has already counted.
"""

from __future__ import annotations

import hashlib
from typing import Any, List

from twisted.internet import defer

from lbsvc.limits.bucketscript import run_lua

KEY_PREFIX = "lbsvc:lease:"
"""Where a user's leased bucket is in Redis (the user's name follows)."""
EPOCH_KEY = "lbsvc:lease-epoch"
"""The epoch: the replication id it began with, when, and whether users started full."""
GLOBAL_ARGS = 5
"""Arguments before the per-user ones: replid, previous replid, holder, lease length, time ('' for ``TIME``)."""
USER_ARGS = 8
"""Arguments per user: capacity, rate, want, lease, spent, keep, share, charge."""
ANSWERS = 5
"""Answers per user: granted, free tokens ``b``, lease id ('' for none), tokens kept, and 1 when the lease the
caller named had ended (or its epoch) before this call, else 0."""

SCRIPT = """
local function fmt(x) return string.format('%.17g', x) end
local now
if ARGV[5] ~= '' then
  now = tonumber(ARGV[5])
else
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
end
local replid, previous, holder, length = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local epoch = redis.call('HMGET', KEYS[1], 'id', 'start', 'full')
local epoch_start, full = tonumber(epoch[2]), epoch[3] == '1'
if epoch[1] ~= replid then
  full = (not epoch[1]) and previous == ''
  epoch_start = now
  redis.call('HSET', KEYS[1], 'id', replid, 'start', fmt(now), 'full', full and '1' or '0')
end
local f_id, f_held, f_end, f_seen = 'i:' .. holder, 'h:' .. holder, 'e:' .. holder, 's:' .. holder
local out = {}
for i = 2, #KEYS do
  local key = KEYS[i]
  local a = 5 + 8 * (i - 2)
  local capacity, rate, want = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local named, spent, keep = ARGV[a + 4], tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  local share, charge = tonumber(ARGV[a + 7]), tonumber(ARGV[a + 8])
  local raw = redis.call('HGETALL', key)
  local st = {}
  for j = 1, #raw, 2 do st[raw[j]] = raw[j + 1] end
  local b, t, O
  if st['ep'] ~= replid then
    if #raw > 0 then redis.call('DEL', key) end
    st = {}
    if full then
      b, t = capacity, now
    else  -- empty, refilling from one lease length after the epoch began
      b = math.min(capacity, math.max(0, rate * (now - epoch_start - length)))
      t = math.max(now, epoch_start + length)
    end
    O = 0
  else
    b, t, O = tonumber(st['b']), tonumber(st['t']), tonumber(st['O'])
  end
  -- Leases that ended: what they held leaves O, and none of it goes back to b.
  local ended = {}
  for field, value in pairs(st) do
    if string.sub(field, 1, 2) == 'e:' and tonumber(value) <= now then ended[#ended + 1] = string.sub(field, 3) end
  end
  for _, who in ipairs(ended) do
    O = O - tonumber(st['h:' .. who] or 0)
    redis.call('HDEL', key, 'i:' .. who, 'h:' .. who, 'e:' .. who, 's:' .. who)
    st['i:' .. who], st['h:' .. who], st['e:' .. who], st['s:' .. who] = nil, nil, nil, nil
  end
  if O < 0 then O = 0 end
  if now > t then b = b + rate * (now - t); t = now end
  if b > capacity - O then b = capacity - O end
  -- A charge within one lease length of a lost state's epoch is dropped: the fallback spent the lost
  -- state's tokens, which the epoch's empty start already counts (its refill has not begun).
  if charge > 0 and (full or now >= epoch_start + length) then b = b - charge end
  if b < -capacity then b = -capacity end
  -- This holder's lease: its spending, then what it keeps (the rest comes back to b).
  local live, held = st[f_id], tonumber(st[f_held] or 0)
  local lost = 0
  if named ~= '' and named ~= live then lost = 1 end
  local kept = 0
  if live then
    if live == named then
      local seen = tonumber(st[f_seen] or 0)
      if spent > seen then
        local d = math.min(spent - seen, held)
        held, O = held - d, O - d
        st[f_seen] = fmt(spent)
      end
      kept = math.min(keep, held)
    end
    b, O, held = b + held - kept, O - held + kept, kept
  end
  local granted = math.floor(math.min(want, b, share - held))
  if granted < 0 then granted = 0 end
  b, O, held = b - granted, O + granted, held + granted
  local id = ''
  if held > 0 then
    if live and live == named then
      id = live
    else
      id = fmt(now)
      st[f_seen] = '0'
    end
    redis.call('HSET', key, f_id, id, f_held, fmt(held), f_end, fmt(now + length), f_seen, st[f_seen])
  elseif live then
    redis.call('HDEL', key, f_id, f_held, f_end, f_seen)
  end
  local others = false
  for field, _ in pairs(st) do
    if string.sub(field, 1, 2) == 'i:' and field ~= f_id then others = true end
  end
  if O <= 0 and b >= capacity and held == 0 and not others then
    redis.call('DEL', key)
  else
    redis.call('HSET', key, 'b', fmt(b), 't', fmt(t), 'O', fmt(O), 'ep', replid)
    redis.call('PEXPIRE', key, math.ceil(((capacity - b) / rate + length) * 1000) + 1000)
  end
  local o = 5 * (i - 2)
  out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5] = granted, fmt(b), id, kept, lost
end
return out
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode("utf-8")).hexdigest()



def run_script(redis: Any, keys: List[str], args: List[str]) -> defer.Deferred[Any]:
    """Run :data:`SCRIPT` over ``keys`` (loading it first if this Redis does not know it yet)."""
    return run_lua(redis, SCRIPT, SCRIPT_SHA, keys, args)
