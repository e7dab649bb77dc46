"""The ``RateLimit-Policy`` and ``RateLimit`` headers (IETF draft-ietf-httpapi-ratelimit-headers).

Every proxied answer, and every 429, tells the client its budget, so it
need not learn it from a refusal::

    RateLimit-Policy: "bucket";q=10;w=5      capacity 10, refilled in full in 5 s
    RateLimit: "bucket";r=3;t=4              3 tokens left, full again in 4 s

A token bucket has no fixed window: ``w`` is the time the bucket takes to
refill from empty (capacity / rate, rounded up), ``r`` the whole tokens left
after this request, and ``t`` the seconds until the bucket is full again,
or, on a 429, until the next token (then equal to ``Retry-After``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

from lbsvc.buckets import Bucket
from lbsvc.users import User

POLICY = b"ratelimit-policy"
STATE = b"ratelimit"
NAMES = (POLICY, STATE)


def rate_limit_headers(user: User, bucket: Bucket, retry_after: Optional[int] = None) -> Tuple[bytes, bytes]:
    """The values of ``RateLimit-Policy`` and ``RateLimit`` after this decision."""
    window = max(1, math.ceil(user.capacity / user.rate_per_sec))
    reset = retry_after if retry_after is not None else bucket.reset_after()
    return (b'"bucket";q=%d;w=%d' % (user.capacity, window),
            b'"bucket";r=%d;t=%d' % (max(0, int(bucket.level)), reset))
