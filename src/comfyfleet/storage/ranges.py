"""HTTP Range (RFC 9110, single ranges) for serving blobs."""

from __future__ import annotations


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` → inclusive (start, end), or None for the whole
    content (no header, a multi-range or an unparsable one: serving it all is always correct)."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            length = int(last)
            if length <= 0 or size == 0:  # nothing to take the last bytes of
                raise RangeNotSatisfiable
            return max(0, size - length), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start < 0 or (last and end < start):
        return None  # syntactically invalid (``5-2``): ignored, the whole content is served
    # Checked before comparing with the clamped end: ``bytes=<size>-`` is unsatisfiable (416), not
    # invalid — its end defaults to size - 1, which would otherwise look like end < start.
    if start >= size:
        raise RangeNotSatisfiable
    return start, min(end, size - 1)
