"""A set of integers kept as sorted, disjoint half-open ranges."""

from __future__ import annotations

from bisect import bisect_left, bisect_right


class RangeSet:
    """Sorted disjoint ``[start, end)`` ranges; used for SACK on both ends."""

    __slots__ = ("_starts", "_ends")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __iter__(self):
        return iter(zip(self._starts, self._ends, strict=True))

    def __contains__(self, x: int) -> bool:
        i = bisect_right(self._starts, x) - 1
        return i >= 0 and x < self._ends[i]

    def covers(self, start: int, end: int) -> bool:
        """Whether every integer of ``[start, end)`` is in the set."""
        if start >= end:
            return True
        i = bisect_right(self._starts, start) - 1
        return i >= 0 and end <= self._ends[i]

    def add(self, start: int, end: int) -> list[tuple[int, int]]:
        """Add ``[start, end)``; return the sub-ranges that were not there."""
        if start >= end:
            return []
        starts, ends = self._starts, self._ends
        i = bisect_left(ends, start)  # first range that ends at/after start
        j = bisect_right(starts, end)  # ranges [i, j) touch or overlap
        new: list[tuple[int, int]] = []
        cur = start
        for k in range(i, j):
            if starts[k] > cur:
                new.append((cur, min(starts[k], end)))
            cur = max(cur, ends[k])
        if cur < end:
            new.append((cur, end))
        if i < j:
            start = min(start, starts[i])
            end = max(end, ends[j - 1])
        starts[i:j] = [start]
        ends[i:j] = [end]
        return new

    def remove_below(self, x: int) -> None:
        """Forget everything below ``x``."""
        starts, ends = self._starts, self._ends
        i = bisect_right(ends, x)
        del starts[:i]
        del ends[:i]
        if starts and starts[0] < x:
            starts[0] = x

    def first(self) -> tuple[int, int] | None:
        return (self._starts[0], self._ends[0]) if self._starts else None

    def last(self) -> tuple[int, int] | None:
        return (self._starts[-1], self._ends[-1]) if self._starts else None

    def ranges(self, limit: int | None = None) -> list[tuple[int, int]]:
        n = len(self._starts) if limit is None else min(limit, len(self._starts))
        return [(self._starts[k], self._ends[k]) for k in range(n)]
