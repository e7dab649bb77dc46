"""Seeing a replica: the ``/status`` page (``overview``), stalls (``stall``), the gauges on ``/metrics``.

Imports :mod:`gradesvc.state` only: it reads what the replica holds and its
phase, and never changes either.
"""
