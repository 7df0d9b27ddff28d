"""The one LRU table behind every bounded cache: order, limits, the running byte total."""

from __future__ import annotations

import pytest
from diffsplit.engine.lru import Evicted, LruTable


def test_get_marks_used_and_peek_does_not() -> None:
    table: LruTable[str, int] = LruTable(max_entries=2)
    table.put("a", 1)
    table.put("b", 2)
    assert table.peek("a") == 1
    assert table.put("c", 3) == [Evicted("a", 1, 0)]  # peek left "a" the oldest
    assert table.get("b") == 2
    assert table.put("d", 4) == [Evicted("c", 3, 0)]  # get made "b" the newest
    assert table.keys() == ["b", "d"]


def test_byte_limit_evicts_oldest_first_and_keeps_the_total() -> None:
    table: LruTable[str, str] = LruTable(max_bytes=100)
    table.put("a", "A", 40)
    table.put("b", "B", 40)
    assert table.total_bytes == 80
    evicted = table.put("c", "C", 50)
    assert [gone.key for gone in evicted] == ["a"]
    assert table.total_bytes == 90
    table.put("b", "B2", 10)  # replacing an entry replaces its size
    assert table.total_bytes == 60
    assert table.keys() == ["c", "b"]
    assert table.pop("c") == "C" and table.total_bytes == 10
    assert table.pop("missing") is None


def test_an_entry_larger_than_the_limit_is_refused() -> None:
    table: LruTable[str, int] = LruTable(max_bytes=10)
    assert table.fits(10) and not table.fits(11)
    with pytest.raises(ValueError, match="11 bytes exceeds"):
        table.put("big", 1, 11)
    with pytest.raises(ValueError, match=">= 0"):
        table.put("negative", 1, -1)
    assert len(table) == 0


def test_evict_until_skips_what_may_not_go() -> None:
    table: LruTable[str, bool] = LruTable()  # no limits: only evict_until removes
    for key, pinned in (("a", True), ("b", False), ("c", False), ("d", True)):
        table.put(key, pinned, 10)
    gone = table.evict_until(25, can_evict=lambda _key, pinned: not pinned)
    assert [entry.key for entry in gone] == ["b", "c"]
    assert table.keys() == ["a", "d"] and table.total_bytes == 20
    assert table.evict_until(0, can_evict=lambda _key, pinned: not pinned) == []  # only pinned left
    assert table.evict_until(0) == [Evicted("a", True, 10), Evicted("d", True, 10)]


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        LruTable(max_entries=0)
    with pytest.raises(ValueError, match="max_bytes"):
        LruTable(max_bytes=-1)
