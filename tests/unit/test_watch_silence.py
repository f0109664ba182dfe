"""When a watch counts as silent (store/watch.py ``behind`` and ``silent``): pure rules, no etcd."""

from __future__ import annotations

from clustermesh.kvstore import PrefixSummary
from clustermesh.store.watch import behind, silent


def S(count: int, newest: int) -> PrefixSummary:
    return PrefixSummary(count=count, newest=newest, revision=newest + 5)


def test_in_step_is_not_behind() -> None:
    assert not behind(seen_revision=40, cached=3, summary=S(3, 40))
    assert not behind(seen_revision=55, cached=3, summary=S(3, 40)), "later events elsewhere: still in step"


def test_a_newer_change_or_another_count_is_behind() -> None:
    assert behind(seen_revision=40, cached=3, summary=S(3, 41))
    assert behind(seen_revision=40, cached=3, summary=S(2, 40)), "a delete not delivered"


def test_behind_once_is_not_silent() -> None:
    assert not silent(40, 3, S(3, 41), earlier=None)


def test_a_change_missing_for_a_whole_check_is_silent() -> None:
    assert silent(40, 3, S(3, 45), earlier=S(3, 41))


def test_a_watch_that_caught_up_with_the_earlier_change_is_not_silent() -> None:
    # Behind on a newer change only: the one seen at the earlier check has arrived.
    assert not silent(42, 3, S(3, 45), earlier=S(3, 41))


def test_a_count_that_stays_wrong_while_the_prefix_is_unchanged_is_silent() -> None:
    # A store wiped and restarted: lower revisions, fewer keys, and nothing delivered.
    assert silent(900, 10, S(1, 3), earlier=S(1, 3))


def test_a_count_off_on_a_prefix_that_keeps_changing_is_not_silent() -> None:
    assert not silent(60, 4, S(5, 60), earlier=S(3, 58))


def test_in_step_now_is_never_silent() -> None:
    assert not silent(45, 3, S(3, 45), earlier=S(3, 41))
