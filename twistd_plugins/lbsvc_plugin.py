"""twistd plugin entry for lbsvc: ``twistd -n lbsvc``."""

from twisted.application.service import ServiceMaker

lbsvc = ServiceMaker(
    "lbsvc",
    "lbsvc.tap",
    "Rate-limited round-robin HTTP gateway with per-user API keys.",
    "lbsvc",
)
