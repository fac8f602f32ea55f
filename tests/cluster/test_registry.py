"""`RankListing`: which published ranks a router counts as alive, by its own clock (pure)."""

from __future__ import annotations

import os
import pickle

import pytest

from cluster.registry import FORGET_AFTER_S, STALE_AFTER_S, RankEntry, RankListing, encode_entry
from workers.messages import RankAddress


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """Overrides tests/cluster/conftest.py: pure, no Ray."""
    yield


def _rank(name: str) -> RankAddress:
    return RankAddress(name, "decode", "g", 0, 1, "127.0.0.1", 1)


def _entry(name: str, seq: int, published: float) -> tuple[bytes, bytes]:
    return name.encode(), encode_entry(RankEntry(seq, published, _rank(name)))


def _live(listing: RankListing, entries: list[tuple[bytes, bytes]], now: float, wall: float):
    live, expired = listing.update(dict(entries), now, wall)
    return sorted(a.replica_id for a in live), expired


def test_an_entry_is_live_while_its_sequence_advances():
    listing, wall = RankListing(), 1000.0
    assert _live(listing, [_entry("a", 1, wall)], 0.0, wall) == (["a"], [])
    assert _live(listing, [_entry("a", 1, wall)], STALE_AFTER_S, wall) == (["a"], [])
    # silent past STALE_AFTER_S by this reader's clock: out, whatever the wall clocks say
    assert _live(listing, [_entry("a", 1, wall + 9)], STALE_AFTER_S + 0.1, wall) == ([], [])
    assert _live(listing, [_entry("a", 2, wall)], STALE_AFTER_S + 0.2, wall) == (["a"], [])


def test_first_sight_is_dated_by_the_publishers_clock():
    listing, wall = RankListing(), 1000.0
    old, fresh = _entry("old", 7, wall - 10), _entry("new", 3, wall - 1)
    ahead = _entry("x", 1, wall + 60)  # a publisher whose clock runs ahead: fresh
    assert _live(listing, [old, fresh, ahead], 50.0, wall) == (["new", "x"], [])
    # the old one (a dead rank's leftover, or a publisher whose clock lags) counts once it advances
    live, _ = _live(listing, [_entry("old", 8, wall - 10), fresh, ahead], 50.5, wall + 0.5)
    assert live == ["new", "old", "x"]


def test_entries_silent_for_forget_after_are_returned_for_deletion():
    listing, wall = RankListing(), 1000.0
    entry = _entry("dead", 4, wall)
    listing.update(dict([entry]), 0.0, wall)
    assert _live(listing, [entry], FORGET_AFTER_S, wall) == ([], [])
    assert _live(listing, [entry], FORGET_AFTER_S + 0.1, wall) == ([], [b"dead"])


def test_an_entry_gone_from_the_store_is_forgotten():
    listing, wall = RankListing(), 1000.0
    listing.update(dict([_entry("a", 5, wall)]), 0.0, wall)
    assert _live(listing, [], 1.0, wall) == ([], [])
    # published again later with the same sequence number: dated afresh, not as the old entry
    assert _live(listing, [_entry("a", 5, wall + 20)], 21.0, wall + 20) == (["a"], [])


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/moe-registry-pwned",))


def test_a_value_that_is_not_an_entry_is_skipped_never_unpickled(tmp_path):
    """A pickle (whose unpickling would run a command), garbage and an entry of another shape
    are each ignored; the real entry beside them is listed."""
    listing, wall = RankListing(), 1000.0
    entries = [
        (b"pickle", pickle.dumps(_Boom())),
        (b"garbage", os.urandom(64)),
        (b"shape", encode_entry(RankEntry(1, wall, _rank("x")))[:-3]),
        _entry("a", 1, wall),
    ]
    assert _live(listing, entries, 0.0, wall) == (["a"], [])
    assert not os.path.exists("/tmp/moe-registry-pwned")
