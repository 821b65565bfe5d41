"""The keep rules of DESIGN.md §11 against a reference written from the text, with hypothesis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.backups.keep_rules import Candidate, KeepPolicy, backup_time, kept_by, to_prune
from storage_backends.ids import new_uuid7

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def id_at(at: datetime) -> str:
    return new_uuid7(int(at.timestamp() * 1000)) + ".tar.gz"


def reference(backups: list[Candidate], policy: KeepPolicy) -> dict[str, set[str]]:
    """Straight from the text: per rule, the newest backup of each period, for the newest
    N periods that have a good one; protected always; corrupt never picked."""
    good = [b for b in backups if not b.corrupt]
    newest_first = sorted(good, key=lambda b: (backup_time(b.id), b.id), reverse=True)
    reasons: dict[str, set[str]] = {b.id: set() for b in backups}
    for b in newest_first[: policy.last]:
        reasons[b.id].add("last")
    periods = {
        "daily": (policy.daily, lambda t: t.date()),
        "weekly": (policy.weekly, lambda t: t.isocalendar()[:2]),
        "monthly": (policy.monthly, lambda t: (t.year, t.month)),
    }
    for name, (count, period_of) in periods.items():
        newest_of: dict[object, Candidate] = {}
        for b in newest_first:
            newest_of.setdefault(period_of(backup_time(b.id)), b)
        chosen = sorted(newest_of.values(), key=lambda b: (backup_time(b.id), b.id), reverse=True)
        for b in chosen[:count]:
            reasons[b.id].add(name)
    for b in backups:
        if b.protected:
            reasons[b.id].add("protected")
    return reasons


histories = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=400 * 24 * 60),  # minutes after EPOCH
        st.booleans(),  # protected
        st.integers(min_value=0, max_value=9).map(lambda n: n == 0),  # corrupt, 1 in 10
    ),
    max_size=60,
)
policies = st.builds(
    KeepPolicy,
    last=st.integers(0, 6),
    daily=st.integers(0, 10),
    weekly=st.integers(0, 6),
    monthly=st.integers(0, 8),
)


@settings(max_examples=400, deadline=None)
@given(histories, policies)
def test_the_kept_set_matches_the_reference(
    history: list[tuple[int, bool, bool]], policy: KeepPolicy
) -> None:
    backups = [
        Candidate(id_at(EPOCH + timedelta(minutes=m)), protected=p, corrupt=c)
        for m, p, c in history
    ]
    decided = kept_by(backups, policy)
    expected = reference(backups, policy)
    assert {k: set(v) for k, v in decided.items()} == expected
    pruned = set(to_prune(backups, policy))
    if policy.prunes:
        assert pruned == {b.id for b in backups if not expected[b.id]}
    else:
        assert pruned == set()
    # never a protected one, and never the newest good backup while any rule is on
    assert not pruned & {b.id for b in backups if b.protected}
    good = [b for b in backups if not b.corrupt]
    if good and policy.prunes:
        newest = max(good, key=lambda b: (backup_time(b.id), b.id))
        assert newest.id not in pruned


def test_the_periods_are_utc_days_iso_weeks_and_months() -> None:
    # 2026-12-31 is a Thursday of ISO week 53 of 2026; 2027-01-03 a Sunday of the same week
    times = [
        datetime(2026, 12, 30, 23, 59, tzinfo=UTC),
        datetime(2026, 12, 31, 0, 1, tzinfo=UTC),
        datetime(2027, 1, 3, 12, 0, tzinfo=UTC),
        datetime(2027, 1, 4, 0, 0, tzinfo=UTC),  # Monday: ISO week 1 of 2027
    ]
    ids = [id_at(t) for t in times]
    decided = kept_by([Candidate(i) for i in ids], KeepPolicy(last=0, daily=2, weekly=2, monthly=2))
    assert decided[ids[3]] == ("daily", "weekly", "monthly")
    assert decided[ids[2]] == ("daily", "weekly")
    assert decided[ids[1]] == ("monthly",)
    assert decided[ids[0]] == ()


def test_a_corrupt_backup_never_takes_a_good_ones_slot() -> None:
    old, corrupt = id_at(EPOCH), id_at(EPOCH + timedelta(hours=1))
    decided = kept_by(
        [Candidate(old), Candidate(corrupt, corrupt=True)],
        KeepPolicy(last=1, daily=0, weekly=0, monthly=0),
    )
    assert decided == {old: ("last",), corrupt: ()}
