"""The real daemons, broker streams, databases, Redis and HTTP backends as processes on loopback.

Shared by the integration tests and the benchmarks (which must not import
the test suite): :mod:`.net` (ports, polling, HTTP, metrics), :mod:`.daemon`
(a ``twistd`` process), :mod:`.replica` and :mod:`.gateway` (the two
daemons), :mod:`.broker` (streams), :mod:`.databases` (PostgreSQL per test),
:mod:`.redis` (a private ``redis-server``), :mod:`.backends` (HTTP backends
and ``servers.yaml``).
"""
