"""The benchmarks' timing rule: a long call is timed once after its warm-up (bench/_timing.py)."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import _timing  # noqa: E402


def test_timed_rounds_after_short_and_long_warm_ups():
    assert _timing.timed_rounds(_timing.LONG_CALL_S / 2, 3) == 3
    assert _timing.timed_rounds(_timing.LONG_CALL_S * 2, 3) == 1
    assert _timing.timed_rounds(_timing.LONG_CALL_S * 2, 0) == 0


def test_median_time_calls_a_long_call_twice_and_a_short_one_rounds_plus_one(monkeypatch):
    monkeypatch.setattr(_timing, "LONG_CALL_S", 0.02)
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.03)
        return len(calls)

    seconds, last = _timing.median_time(slow, 5)
    assert len(calls) == 2 and last == 2 and seconds >= 0.03
    calls.clear()
    seconds, last = _timing.median_time(lambda: calls.append(1) or len(calls), 5)
    assert len(calls) == 6 and last == 6
