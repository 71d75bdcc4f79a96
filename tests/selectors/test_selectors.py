"""Property tests of every selector: budget, newest kept, no re-promotion, sinks, log thinning."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy.errors import ConfigError
from kvpolicy.selectors import (
    AllSelector,
    LogSelector,
    NewerLogSelector,
    SinkSelector,
    UnionSelector,
    WindowSelector,
)

lengths = st.integers(min_value=0, max_value=700)
sizes = st.integers(min_value=1, max_value=80)


def selector_strategy():
    simple = st.one_of(
        st.builds(WindowSelector, size=sizes),
        st.builds(SinkSelector, size=st.integers(1, 8)),
        st.builds(LogSelector, window=sizes),
        st.builds(lambda w, p: LogSelector(w).for_prefill(p), sizes, st.integers(1, 700)),
        st.builds(NewerLogSelector, window=sizes),
    )
    union = st.lists(simple, min_size=2, max_size=3).map(UnionSelector)
    return st.one_of(simple, union, st.just(AllSelector()))


def _prefill(selector) -> int:
    if isinstance(selector, UnionSelector):
        return max(_prefill(m) for m in selector.members)
    return getattr(selector, "_prefill", 0)


def newest_promised(selector) -> int:
    """How many newest tokens a selector promises to keep."""
    if isinstance(selector, WindowSelector):
        return selector.size
    if isinstance(selector, (LogSelector, NewerLogSelector)):
        return selector.window
    if isinstance(selector, AllSelector):
        return 10**9
    if isinstance(selector, UnionSelector):
        return max(newest_promised(m) for m in selector.members)
    return 0


@settings(max_examples=200, deadline=None)
@given(selector=selector_strategy(), t=lengths)
def test_keep_is_sorted_unique_in_range_and_within_budget(selector, t):
    kept = selector.keep(t)
    assert kept.dtype == torch.int64
    assert torch.equal(kept, torch.unique(kept))
    if len(kept):
        assert 0 <= int(kept[0]) and int(kept[-1]) < t
    if selector.budget is not None:
        assert len(kept) <= selector.budget


@settings(max_examples=200, deadline=None)
@given(selector=selector_strategy(), t=lengths)
def test_newest_tokens_always_kept(selector, t):
    kept = set(selector.keep(t).tolist())
    newest = range(max(0, t - newest_promised(selector)), t)
    assert set(newest) <= kept


@settings(max_examples=200, deadline=None)
@given(selector=selector_strategy(), t1=lengths, step=st.integers(1, 300))
def test_demoted_token_never_comes_back(selector, t1, step):
    t1 = max(t1, _prefill(selector))  # before its prefill a bound selector has seen no sequence
    t2 = t1 + step
    before = set(selector.keep(t1).tolist())
    after = set(selector.keep(t2).tolist())
    assert {p for p in after if p < t1} <= before


@settings(max_examples=100, deadline=None)
@given(selector=selector_strategy(), t=lengths, seed=st.integers(0, 2**16))
def test_is_kept_agrees_with_keep(selector, t, seed):
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, max(t, 1), (min(t, 50),), generator=g, dtype=torch.int32)
    expected = torch.isin(positions.long(), selector.keep(t))
    assert torch.equal(selector.is_kept(positions, t), expected)


@settings(max_examples=100, deadline=None)
@given(size=st.integers(1, 8), window=sizes, t=lengths)
def test_sinks_always_kept(size, window, t):
    selector = UnionSelector([SinkSelector(size), WindowSelector(window)])
    assert set(range(min(t, size))) <= set(selector.keep(t).tolist())


@settings(max_examples=150, deadline=None)
@given(window=st.integers(4, 64), flushes=st.integers(3, 14))
@pytest.mark.parametrize("cls", [LogSelector, NewerLogSelector])
def test_log_density_thins_with_distance(cls, window, flushes):
    selector = cls(window)
    t = (flushes + 1) * window + 1
    kept = selector.keep(t)
    # kept count per flushed block of W positions, oldest block first
    counts = [int(((kept >= j * window) & (kept < (j + 1) * window)).sum()) for j in range(flushes)]
    assert sum(counts) <= window  # the sparse set holds at most W tokens
    assert counts[-1] <= (window + 1) // 2  # the newest flushed block was thinned once
    # an older block never keeps more than a newer one (up to one token of pair parity)
    assert all(old <= new + 1 for old, new in zip(counts, counts[1:]))
    # and the oldest blocks are sparser than the newest one (strictly once a few flushes have
    # thinned them: LogSelector's position-0 sink can make them tie after three, e.g. W=5)
    assert counts[0] <= counts[-1] and (flushes < 4 or counts[0] < counts[-1])


def test_log_window_stays_between_w_and_2w():
    selector = NewerLogSelector(8)
    for t in range(17, 400):
        k = selector.flushes(t)
        assert 8 <= t - k * 8 <= 16


def test_log_memo_gives_same_answer_backwards():
    selector = LogSelector(5).for_prefill(23)
    forward = [selector.keep(t).tolist() for t in range(0, 200)]
    backward = [LogSelector(5).for_prefill(23).keep(t).tolist() for t in range(0, 200)]
    assert forward == backward
    assert selector.keep(37).tolist() == backward[37]  # going back recomputes


@pytest.mark.parametrize("cls,field", [(WindowSelector, "size"), (SinkSelector, "size"), (LogSelector, "window")])
@pytest.mark.parametrize("bad", [0, -3, 2.5, "8", True])
def test_bad_selector_parameter_names_field_and_value(cls, field, bad):
    with pytest.raises(ConfigError) as err:
        cls(**{field: bad})
    assert field in str(err.value) and repr(bad) in str(err.value) and "positive integer" in str(err.value)


@settings(max_examples=200, deadline=None)
@given(selector=selector_strategy(), t1=lengths, step=st.integers(1, 100))
def test_may_demote_false_promises_that_nothing_is_demoted(selector, t1, step):
    """Stores skip selection when ``may_demote`` is False: everything kept at ``t1`` and every
    new position must then still be kept."""
    t2 = t1 + step
    before = set(selector.keep(t1).tolist()) | set(range(t1, t2))
    if not selector.may_demote(t1, t2):
        assert before <= set(selector.keep(t2).tolist())


def _with_streaming(strategy):
    """Selectors, and StreamingLLM's sinks + window in either order (the union with a run)."""
    streaming = st.builds(
        lambda sinks, window, flip: UnionSelector([WindowSelector(window), SinkSelector(sinks)][:: -1 if flip else 1]),
        st.integers(1, 8), sizes, st.booleans(),
    )  # fmt: skip
    return st.one_of(strategy, streaming)


@settings(max_examples=300, deadline=None)
@given(selector=_with_streaming(selector_strategy()), t1=lengths, step=st.integers(1, 100))
def test_dropped_run_is_exactly_what_keep_drops(selector, t1, step):
    """Stores skip the per-position test where ``dropped_run`` answers: the candidates (the kept
    set at ``t1`` in position order, then the new positions) that ``keep(t2)`` drops must be
    exactly the region indices ``start .. start+count-1``."""
    t2 = t1 + step
    candidates = sorted(set(selector.keep(t1).tolist())) + list(range(t1, t2))
    run = selector.dropped_run(len(candidates) - step, step)
    if run is None:
        return
    start, count = run
    kept = set(selector.keep(t2).tolist())
    dropped = [i for i, p in enumerate(candidates) if p not in kept]
    assert dropped == list(range(start, start + count)), (run, dropped)


def test_streaming_answers_with_a_run_after_its_sinks():
    streaming = UnionSelector([SinkSelector(4), WindowSelector(8)])
    assert streaming.dropped_run(12, 1) == (4, 1)
    assert streaming.dropped_run(5, 1) == (4, 0)
    assert UnionSelector([LogSelector(8), SinkSelector(4)]).dropped_run(12, 1) is None


@pytest.mark.parametrize(
    "selector, quiet",
    [
        (WindowSelector(size=8), [(0, 8), (3, 5)]),
        (LogSelector(window=4), [(0, 8), (9, 12)]),  # flushes at t = 9, 13, ...
        (SinkSelector(size=4), [(0, 4)]),
        (AllSelector(), [(0, 1000)]),
    ],
)
def test_may_demote_is_false_where_each_selector_keeps_everything(selector, quiet):
    for previous, length in quiet:
        assert not selector.may_demote(previous, length)


class AuthorsLogQuant:
    """The LogQuant authors' bookkeeping, written as index lists the way their cache keeps
    them (``src/LogQuant.py``: a log-sparse list and a local window list), to check
    :class:`LogSelector` against, step by step."""

    def __init__(self, window: int):
        self.w = window
        self.sparse: list[int] = []
        self.local: list[int] = []
        self.seen = 0

    def prefill(self, n: int) -> None:
        w = self.w
        local, sparse = list(range(n)), []
        merged = sparse + local
        while len(merged) >= 3 * w:
            sparse, local = merged[0 : 2 * w : 2], merged[2 * w :]
            merged = sparse + local
        if w < n < 3 * w:
            sparse, local = merged[:w], merged[w:]
        self.sparse, self.local, self.seen = sparse, local, n

    def decode(self) -> None:
        w = self.w
        self.local.append(self.seen)
        self.seen += 1
        if len(self.local) > 2 * w:
            self.sparse = (self.sparse + self.local[:w])[0::2] if self.sparse else self.local[:w]
            self.local = self.local[w:]

    def kept(self) -> list[int]:
        return sorted(self.sparse + self.local)


@settings(max_examples=300, deadline=None)
@given(window=st.integers(1, 40), prefill=st.integers(1, 600), steps=st.integers(0, 400))
def test_log_selector_replays_the_authors_index_lists(window, prefill, steps):
    authors = AuthorsLogQuant(window)
    if prefill == 1:
        authors.decode()  # their cache takes a one-token first update as a decode step
    else:
        authors.prefill(prefill)
    selector = LogSelector(window).for_prefill(prefill)
    assert selector.keep(prefill).tolist() == authors.kept()
    for _ in range(steps):
        authors.decode()
        assert selector.keep(authors.seen).tolist() == authors.kept(), authors.seen


@settings(max_examples=100, deadline=None)
@given(window=st.integers(1, 40), prefill=st.integers(1, 600), steps=st.integers(1, 300))
def test_log_selector_keeps_position_zero_for_good(window, prefill, steps):
    selector = LogSelector(window).for_prefill(prefill)
    assert 0 in selector.keep(prefill + steps).tolist()


def test_a_store_binds_the_log_selector_to_each_sequences_prefill():
    from kvpolicy.config import QuantSpec
    from kvpolicy.store import TensorStore

    store = TensorStore(LogSelector(8), "evict", QuantSpec(), None)
    store.append(torch.zeros(1, 1, 40, 4))
    assert store.selector == LogSelector(8).for_prefill(40) != LogSelector(8)
    assert store.fp_pos.tolist() == LogSelector(8).for_prefill(40).keep(40).tolist()
    store.reset()
    store.append(torch.zeros(1, 1, 5, 4))
    assert store.selector == LogSelector(8).for_prefill(5)
