"""Which stream, and which life of it, a replica's state belongs to.

A state (the store, a checkpoint, a peer's ``/backup``) reflects a stream up
to an offset.  An offset alone does not say *which* stream: a stream deleted
and declared again starts again at 0, and another stream has offsets too.  So
every state carries, Redis ``PSYNC``-style, its :class:`StreamId` (vhost and
name) and an :class:`Anchor`: the offset it reflects and the SHA-256 of the
body of the message at that offset.  Every message body is unique (a write
carries its writer's id and a random write id, a sync marker a random nonce),
so the same offset holding the same body means the same life of the stream.
:mod:`gradesvc.stream.verification` checks an anchor against the stream itself.

Files of the previous release carry no identity.  A checkpoint of that kind
is checked through a :class:`RowCheck` instead: the row with the newest field
names the message that wrote it, which must be in the stream at that offset.
"""

from __future__ import annotations

import hashlib
import re
from typing import Awaitable, Callable, Optional

import attrs

DIGEST_PATTERN = re.compile(r"[0-9a-f]{64}")


def body_sha256(body: bytes) -> str:
    """The hex SHA-256 of a message body."""
    return hashlib.sha256(body).hexdigest()


@attrs.frozen
class StreamId:
    """A stream: its broker's virtual host and its name."""

    vhost: str
    name: str

    def __str__(self) -> str:
        return f"{self.name!r} (vhost {self.vhost!r})"


@attrs.frozen
class RowCheck:
    """A previous release's state: the message at ``offset`` wrote ``value`` to ``field`` of ``user_id``."""

    offset: int
    user_id: str
    field: str
    value: int


@attrs.frozen
class Anchor:
    """Where a state stands in its stream, and how to recognise that place again.

    ``offset`` is the last offset the state reflects; ``sha256`` the digest of
    the message body at that offset (None only for the previous release's
    files, which have ``row`` instead, or nothing at all).
    """

    offset: int
    sha256: Optional[str] = None
    row: Optional[RowCheck] = None

    @property
    def checkable(self) -> bool:
        """Whether the stream can confirm this anchor at all."""
        return self.sha256 is not None or self.row is not None

    def describe(self) -> str:
        """The anchor in a log line."""
        if self.sha256 is not None:
            return f"offset {self.offset} (message sha256 {self.sha256[:12]}…)"
        if self.row is not None:
            return (f"offset {self.offset} (previous release: user {self.row.user_id!r} field"
                    f" {self.row.field} = {self.row.value} written at offset {self.row.offset})")
        return f"offset {self.offset} (no identity)"


@attrs.frozen
class StateIdentity:
    """The identity a snapshot or checkpoint header declares (``stream`` None: previous release)."""

    stream: Optional[StreamId]
    anchor: Anchor

    def describe(self) -> str:
        """The identity in a log line."""
        stream = "an unnamed stream (previous release)" if self.stream is None else f"stream {self.stream}"
        return f"{stream} at {self.anchor.describe()}"

    def other_stream(self, stream: StreamId) -> Optional[str]:
        """Why this state is not ``stream``'s by name (None: it names ``stream``, or no stream at all)."""
        if self.stream is not None and self.stream != stream:
            return f"this replica serves stream {stream}"
        return None


Verify = Callable[[Anchor], Awaitable[Optional[str]]]
"""``verify(anchor)``: None when the stream holds ``anchor``, else why not."""
