"""Request and response headers whose lookups by a known name skip canonicalising it again.

``twisted.web``'s ``Headers`` canonicalises the name on every call
(``_nameEncoder.encode``, one Python call each); a proxied request looks
names up about twenty times (Twisted's ``Request`` itself, the API key, the
request id, the upstream head, the access log), which was a sixth of its
Python calls (issue #32).  Twisted's encoder keeps every name it has
canonicalised in a cache; :class:`KnownHeaders` looks a ``bytes`` name up
there and reads the header directly, and leaves anything else (a ``str``
name, a name never seen) to ``Headers`` as before, so it answers exactly as
``Headers`` does (``tests/unit/test_whole_heads.py`` checks that against
``Headers`` for any name and values).  :func:`add_all`, :func:`set_one` and
:func:`add_parsed` put headers into any ``Headers`` the same way, one call
for many.

It relies on private names of ``twisted.web.http_headers`` (the encoder's
cache, ``Headers._rawHeaders``; the same in Twisted 25.5 and 26.10, the
releases this project runs on): without them every call goes through
``Headers`` as before.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Tuple

from twisted.web import http_headers
from twisted.web.http_headers import Headers

_canonical: Optional[dict[Any, bytes]] = getattr(
    getattr(http_headers, "_nameEncoder", None), "_canonicalHeaderCache", None)
KNOWN_NAMES = isinstance(_canonical, dict) and "_rawHeaders" in getattr(Headers, "__slots__", ())
"""Whether this Twisted's ``Headers`` can be read directly (else :class:`KnownHeaders` is plain ``Headers``)."""


class KnownHeaders(Headers):
    """``Headers`` that read a header by a ``bytes`` name Twisted has canonicalised before without doing it again."""

    __slots__ = ()

    if KNOWN_NAMES:
        def getRawHeaders(self, name: Any, default: Any = None) -> Any:
            """The header's values, as ``Headers.getRawHeaders`` gives them."""
            canonical = _canonical.get(name) if name.__class__ is bytes else None  # type: ignore[union-attr]
            if canonical is None:
                return Headers.getRawHeaders(self, name, default)
            return self._rawHeaders.get(canonical) or default

        def hasHeader(self, name: Any) -> bool:
            """Whether the header is there, as ``Headers.hasHeader`` says."""
            canonical = _canonical.get(name) if name.__class__ is bytes else None  # type: ignore[union-attr]
            if canonical is None:
                return Headers.hasHeader(self, name)
            return canonical in self._rawHeaders


def add_all(headers: Headers, pairs: Iterable[Tuple[bytes, bytes]]) -> None:
    """``headers.addRawHeader`` for each pair, in order, with the same result: one call for all of them.

    A name Twisted has canonicalised before and a value without CR or LF
    (which ``Headers`` would leave as it is) go straight in; anything else
    goes through ``addRawHeader`` (sanitised, or refused as it refuses).
    """
    if not KNOWN_NAMES:
        for name, value in pairs:
            headers.addRawHeader(name, value)
        return
    raw, known_name = headers._rawHeaders, _canonical.get  # type: ignore[union-attr]
    for name, value in pairs:
        canonical = known_name(name) if name.__class__ is bytes and value.__class__ is bytes else None
        if canonical is None or b"\r" in value or b"\n" in value:
            headers.addRawHeader(name, value)
            continue
        values = raw.get(canonical)
        if values is None:
            raw[canonical] = [value]
        else:
            values.append(value)


def set_one(headers: Headers, name: bytes, value: bytes) -> None:
    """``headers.setRawHeaders(name, [value])``, with the same result, in one call."""
    canonical = _canonical.get(name) if KNOWN_NAMES else None  # type: ignore[union-attr]
    if canonical is None or b"\r" in value or b"\n" in value:
        headers.setRawHeaders(name, [value])
    else:
        headers._rawHeaders[canonical] = [value]


def add_parsed(headers: Headers, pairs: Iterable[Tuple[bytes, bytes]]) -> None:
    """Add header lines a request head parse has checked: each name canonical (as ``_nameEncoder`` made
    it), each value free of CR, LF and NUL, so there is nothing to encode or sanitise."""
    if not KNOWN_NAMES:
        for name, value in pairs:
            headers.addRawHeader(name, value)
        return
    raw = headers._rawHeaders
    for name, value in pairs:
        values = raw.get(name)
        if values is None:
            raw[name] = [value]
        else:
            values.append(value)


def known(headers: Headers) -> KnownHeaders:
    """``headers`` (a plain ``Headers``, as ``twisted.web``'s ``Request`` makes them) as :class:`KnownHeaders`,
    the same object: the subclass adds no state, so its class can change in place, with no call or copy."""
    headers.__class__ = KnownHeaders
    return headers  # type: ignore[return-value]
