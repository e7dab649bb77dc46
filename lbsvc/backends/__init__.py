"""The backends: ``servers.yaml`` (:mod:`.servers`), the pool and its health (:mod:`.pool`), the
pluggable choice (:mod:`.balancer`), active health checks (:mod:`.healthcheck`), TLS to them (:mod:`.tls`).
"""
