"""The request-target can never steer the gateway to anything but a configured backend."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.web.client import URI

from lbsvc.balancer import Backend
from lbsvc.target import origin_target, upstream_url
from svckit.responses import HTTPError

BACKENDS = [Backend("a", "http://127.0.0.1:8070"), Backend("b", "http://localhost"),
            Backend("c", "https://[::1]:9443")]

targets = st.one_of(
    st.binary(max_size=60),
    st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(lambda a, b: a + b, st.sampled_from([b"", b"/", b"//", b":", b"@", b"?", b"http://", b"HTTPS://x",
                                                   b"64371", b"0", b"[::1]", b"%2F", b"\\"]),
              st.binary(max_size=30)),
)


@settings(max_examples=2000, deadline=None)
@given(target=targets, which=st.sampled_from(BACKENDS))
@example(target=b"64371/secret", which=BACKENDS[0])
@example(target=b":8079/", which=BACKENDS[1])
@example(target=b"0/", which=BACKENDS[0])
@example(target=b"@evil:1/x", which=BACKENDS[0])
@example(target=b"//evil:1/x", which=BACKENDS[0])
@example(target=b"http://evil:1/x?y", which=BACKENDS[0])
@example(target=b"/x\r\nHost: evil", which=BACKENDS[0])
def test_only_configured_backends_are_ever_dialled(target: bytes, which: Backend) -> None:
    """Agent dials what ``URI.fromBytes`` finds in the URL it is given: check exactly that."""
    try:
        url = upstream_url(which.scheme, which.host, which.port, target)
    except HTTPError as e:
        assert e.code == 400
        return
    dialled = URI.fromBytes(url)
    assert (dialled.scheme, dialled.host, dialled.port) == (which.scheme, which.host, which.port)
    assert dialled.path.startswith(b"/")


@pytest.mark.parametrize("target, expected", [
    (b"/", (b"/", b"")),
    (b"/a/b?c=d&e", (b"/a/b", b"c=d&e")),
    (b"//double", (b"//double", b"")),
    (b"http://any.host:99/p?q=1", (b"/p", b"q=1")),
    (b"HTTP://any.host", (b"/", b"")),
])
def test_accepted_targets(target: bytes, expected: tuple) -> None:
    assert origin_target(target) == expected


@pytest.mark.parametrize("target", [b"*", b"64371/secret", b":8079/", b"example.com:443", b"", b"x/y",
                                    b"/a#frag", b"/a b", b"/a\x00", b"ftp://x/y", b"\\x", b"/\x80", b"/\xc3\xa9"])
def test_refused_targets(target: bytes) -> None:
    with pytest.raises(HTTPError) as error:
        origin_target(target)
    assert error.value.code == 400
