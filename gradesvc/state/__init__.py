"""The replica's state: what it holds and where it stands.

The grades in memory and their merge rule (``store``), which stream and which
life of it the state belongs to (``identity``), the replica's phase
(``phase``: every layer above reports to it, so it sits here, at the bottom),
the ``csv.gz`` snapshot format (``snapshot``), and where state comes from and
goes to: the data directory and its checkpoints (``datadir``,
``checkpoint``, ``retention``), a peer's ``/backup`` at start (``bootstrap``,
``snapshotbody``).

Imports nothing of gradesvc outside this package: checks that need the stream
(an anchor verified against it) are handed in as callables
(:data:`gradesvc.state.identity.Verify`).
"""
