"""HTTP Range parsing for blob downloads (RFC 9110, single ranges): what is served, what is ignored
(whole content, always allowed) and what is unsatisfiable (416)."""

from __future__ import annotations

import pytest

from comfyfleet.storage.ranges import RangeNotSatisfiable, parse_range

SIZE = 100


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-7", (0, 7)),
        ("bytes=10-", (10, 99)),
        ("bytes=90-500", (90, 99)),  # an end past the content is clamped
        ("bytes=-5", (95, 99)),
        ("bytes=-500", (0, 99)),
        ("bytes=99-99", (99, 99)),
        ("bytes=5-2", None),  # invalid: ignored
        ("bytes=0-1,4-5", None),  # multi-range: the whole content instead
        ("items=0-5", None),
        ("bytes=a-b", None),
        ("bytes=5", None),
    ],
)
def test_satisfiable_or_ignored(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, SIZE) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=500-", "bytes=-0"])
def test_unsatisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, SIZE)


@pytest.mark.parametrize("header", ["bytes=0-", "bytes=0-0", "bytes=-5"])
def test_any_range_of_empty_content_is_unsatisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 0)
