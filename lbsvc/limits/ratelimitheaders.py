"""``RateLimit-Policy`` and ``RateLimit``: a client's budget on every answer.

Written as draft-ietf-httpapi-ratelimit-headers (revision 09) has them,
structured fields naming one policy, ``"default"``:

* ``RateLimit-Policy: "default";q=C;w=W``: the user's bucket holds ``C``
  tokens (the quota) and refills from empty in ``W`` seconds (C / R, whole
  seconds, at least 1).
* ``RateLimit: "default";r=N;t=S``: ``N`` tokens are left after this request;
  ``S`` is the whole seconds until the bucket is full again, or, when none is
  left, until the next token, which is then also the ``Retry-After`` of a 429.

A token bucket is not a fixed window, so ``q`` and ``w`` describe the steady
rate and the burst, not a window that resets all at once; docs/operating.md says so.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

from lbsvc.limits.buckets import Bucket

POLICY_HEADER = b"RateLimit-Policy"
STATE_HEADER = b"RateLimit"
MAX_SECONDS = 86400 * 365
"""``t`` and ``w`` are capped here (a near-zero rate must not print a huge number)."""

_policies: Dict[Tuple[int, float], bytes] = {}


def policy(capacity: int, rate: float) -> bytes:
    """The ``RateLimit-Policy`` value of a bucket of ``capacity`` refilled at ``rate``/s."""
    key = (capacity, rate)
    value = _policies.get(key)
    if value is None:
        window = max(1, math.ceil(min(capacity / rate, MAX_SECONDS)))
        value = b'"default";q=%d;w=%d' % (capacity, window)
        if len(_policies) < 4096:  # one per distinct limit in use: small, but bounded
            _policies[key] = value
    return value


def seconds_until_next(bucket: Bucket) -> int:
    """Whole seconds until one token is there (at least 1): a 429's ``Retry-After``."""
    seconds = bucket.retry_after()
    if not seconds < MAX_SECONDS:
        return MAX_SECONDS
    return max(1, math.ceil(seconds))


def state(bucket: Bucket) -> bytes:
    """The ``RateLimit`` value for ``bucket`` as it is now."""
    left = int(bucket.level)
    if left < 1:
        return b'"default";r=0;t=%d' % seconds_until_next(bucket)
    return b'"default";r=%d;t=%d' % (left, bucket.reset_after())
