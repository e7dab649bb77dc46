"""The backends: ``servers.yaml`` (:mod:`.servers`), one backend's state (:mod:`.backend`), the pool and its
health (:mod:`.pool`), the pluggable choice (:mod:`.balancer`), active health checks (:mod:`.healthcheck`), TLS to
them (:mod:`.tls`).
"""
