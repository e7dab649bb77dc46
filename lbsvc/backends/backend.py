"""A backend of ``servers.yaml`` and what the gateway knows about it right now."""

from __future__ import annotations

from typing import Optional
from urllib.parse import urlsplit

import attrs


@attrs.define(eq=False)
class Backend:
    """A backend and what the gateway knows about it right now."""

    name: str
    url: str
    ca_file: Optional[str] = None
    """The CA certificates an ``https`` backend is verified against (None: the system's)."""
    healthy: bool = True
    in_flight: int = 0
    successes: int = 0
    failures: int = 0
    available: bool = True
    """Whether balancers may choose it: healthy, or every backend while the pool panics."""
    ejected_until: float = 0.0
    """While the clock is before this, a passing health check does not bring it back."""
    ejections: int = 0
    """Passive ejections in a row (the next one lasts that many times the base)."""
    scheme: bytes = attrs.field(init=False)
    host: bytes = attrs.field(init=False)
    port: int = attrs.field(init=False)
    """Where the backend is, parsed once from its configured URL."""

    def __attrs_post_init__(self) -> None:
        parts = urlsplit(self.url)
        self.scheme = (parts.scheme or "http").encode("ascii")
        self.host = (parts.hostname or "").encode("idna")
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
