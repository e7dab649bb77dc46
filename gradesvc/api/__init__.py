"""The HTTP API: the read port (``read``, ``backup``) and the write port (``write``, ``auth``).

Imports :mod:`gradesvc.stream` and :mod:`gradesvc.state`; never
:mod:`gradesvc.status` (the status pages are handed to the read port's router
as routes by :mod:`gradesvc.build`).
"""
