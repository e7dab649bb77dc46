"""Memory buckets beside other gateways: each admits a user's whole limit, and says so.

With ``--buckets memory`` every gateway keeps its own buckets, so N
gateways on one user database admit up to N times a user's limit.  That is
documented, and allowed (one gateway, or limits meant per gateway), but it
must not be silent: a gateway whose user-database heartbeat
(:class:`lbsvc.limits.livegateways.DatabaseHeartbeat`) sees other live gateways
logs one warning per such episode, adds a note to ``/ready`` (which stays
ready) and sets ``lbsvc_limits_per_process`` to 1.
"""

from __future__ import annotations

from typing import Any, Dict

from twisted.logger import Logger

log = Logger()


class PerProcessLimits:
    """What memory buckets mean for the cluster, given the live gateways."""

    def __init__(self) -> None:
        self.gateways = 1
        """Live gateways on this user database, this one included."""

    @property
    def multiplied(self) -> bool:
        """Whether other gateways enforce the same users' limits on their own."""
        return self.gateways > 1

    def counted(self, gateways: int) -> None:
        """The heartbeat counted ``gateways`` live gateways."""
        if gateways > 1 and not self.multiplied:
            log.warn(
                "{gateways} gateways share this user database with memory buckets: each admits a user's whole"
                " limit, so together they admit up to {gateways} times it; use --buckets redis://... for one"
                " budget", gateways=gateways)
        elif gateways <= 1 and self.multiplied:
            log.info("No other gateway on this user database: memory buckets are the users' limits again")
        self.gateways = gateways

    def report(self) -> Dict[str, Any]:
        """``/ready``'s ``limits``."""
        body: Dict[str, Any] = {"buckets": "memory", "mode": "memory", "gateways": self.gateways}
        if self.multiplied:
            body["note"] = (f"{self.gateways} gateways with their own memory buckets share this user database:"
                            f" a user may be admitted up to {self.gateways} times its limit"
                            " (--buckets redis://... gives them one budget)")
        return body
