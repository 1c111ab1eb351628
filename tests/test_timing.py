"""The benchmarks' one timing helper (``geomopt.timing``), on a fake clock: warm-up calls are not counted,
``before`` runs outside the timed interval, the median and spread are of the timed calls, and the clock syncs
nothing off CUDA."""
import pytest

from geomopt import timing


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    return fake


def test_timed_counts_the_calls_only(clock):
    durations = iter([100.0, 100.0, 3.0, 1.0, 2.0, 5.0, 4.0])  # two warm-up calls, then five timed ones
    calls = []

    def fn():
        clock.now += next(durations)
        calls.append("fn")

    def before():
        clock.now += 1000.0  # not timed
        calls.append("before")

    t = timing.timed(fn, "cpu", reps=5, warmup=2, before=before)
    assert t.times == [3.0, 1.0, 2.0, 5.0, 4.0]
    assert (t.median, t.low, t.high) == (3.0, 1.0, 5.0)
    assert calls == ["before", "fn"] * 7
    assert t.row() == dict(median_ms=3000.0, low_ms=1000.0, high_ms=5000.0)


def test_clock_laps_follow_each_other(clock):
    c = timing.Clock("cpu").start()
    clock.now += 2.0
    assert c.lap() == 2.0
    clock.now += 0.5
    assert c.lap() == 0.5


def test_reps_must_be_positive():
    with pytest.raises(ValueError, match="reps must be >= 1, got 0"):
        timing.timed(lambda: None, "cpu", reps=0)
