"""Rate limits: token buckets in memory (:mod:`.buckets`) or in Redis (:mod:`.redisbuckets`, over one
kept-up connection: :mod:`.redislink`), the ``local`` fallback's shares (:mod:`.fallbackshare`), how many
gateways are live (:mod:`.livegateways`), memory buckets beside other gateways (:mod:`.memorylimits`), the
``RateLimit`` headers (:mod:`.ratelimitheaders`), and which store ``--buckets`` chooses (:mod:`.choice`).
"""
