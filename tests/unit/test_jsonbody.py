"""svckit.jsonbody: the fast paths (depth by regex passes, hooks only where a number needs them, surrogates
looked for only where an escape could make one) decide exactly as the plain, fully hooked parse would."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from svckit.jsonbody import MAX_DEPTH, MAX_DIGITS, parse_json
from svckit.responses import HTTPError

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**45), 10**45), st.text(max_size=20),
                    st.floats(allow_nan=True, allow_infinity=True))
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                          st.dictionaries(st.text(max_size=8), inner, max_size=5)),
                         max_leaves=40)


def reference(data: bytes) -> Any:
    """The rules, the slow way: every number through its hook, every string re-encoded, depth counted."""
    def refuse(*_: Any) -> Any:
        raise ValueError

    def integer(text: str) -> int:
        if len(text.lstrip("-")) > MAX_DIGITS:
            raise ValueError
        return int(text)

    def real(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError
        return value

    value = json.loads(data.decode("utf-8"), parse_int=integer, parse_float=real, parse_constant=refuse)
    json.dumps(value, ensure_ascii=False).encode("utf-8")

    def depth(v: Any) -> int:
        if isinstance(v, list):
            return 1 + max((depth(x) for x in v), default=0)
        if isinstance(v, dict):
            return 1 + max((depth(x) for x in v.values()), default=0)
        return 0

    if depth(value) > MAX_DEPTH:
        raise ValueError
    return value


@given(documents)
def test_any_document_is_accepted_or_refused_as_the_slow_rules_would(value: Any) -> None:
    data = json.dumps(value, allow_nan=True).encode()
    try:
        expected = reference(data)
    except (ValueError, UnicodeEncodeError, RecursionError):
        with pytest.raises(HTTPError):
            parse_json(data)
        return
    assert parse_json(data) == expected


@pytest.mark.parametrize("text", [b'{"a": "\\ud800"}', b'["\\udfff"]', b'{"\\udc80": 1}'])
def test_lone_surrogates_are_refused(text: bytes) -> None:
    with pytest.raises(HTTPError, match="surrogates"):
        parse_json(text)


def test_an_array_of_many_objects_is_not_too_deep_and_a_deep_one_is() -> None:
    assert len(parse_json(json.dumps([{"a": [1]}] * 1000).encode())) == 1000
    with pytest.raises(HTTPError, match="deeper"):
        parse_json(b'{"x": "[[[", "y": ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}")
