"""`RankListing`: which published ranks a router counts as alive, by its own clock (pure)."""

from __future__ import annotations

import pickle

import pytest

from cluster.registry import FORGET_AFTER_S, STALE_AFTER_S, RankListing
from workers.messages import RankAddress


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """Overrides tests/cluster/conftest.py: pure, no Ray."""
    yield


def _rank(name: str) -> RankAddress:
    return RankAddress(name, "decode", "g", 0, 1, "127.0.0.1", 1)


def _entry(name: str, seq: int, published: float) -> tuple[bytes, bytes]:
    return name.encode(), pickle.dumps((seq, published, _rank(name)))


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
