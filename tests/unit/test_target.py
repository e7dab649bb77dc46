"""Which request-targets are accepted (the property test of what is dialled is in test_proxy)."""

from __future__ import annotations

import pytest

from lbsvc.proxying.target import origin_target
from svckit.responses import HTTPError


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
