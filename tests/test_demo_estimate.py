"""The demo's first lines: its time estimate scales with this machine's measured speed."""

import pytest

from lit_route import demo


@pytest.mark.parametrize("rate, cached, expected", [
    (demo.REFERENCE_RATE, False, demo.REFERENCE_S["empty"] / 60),  # the reference machine: its own wall time
    (demo.REFERENCE_RATE / 2, False, 2 * demo.REFERENCE_S["empty"] / 60),  # half as fast: twice as long
    (demo.REFERENCE_RATE, True, demo.REFERENCE_S["cached"] / 60),
])
def test_the_estimate_scales_the_reference_time_by_the_measured_rate(monkeypatch, rate, cached, expected):
    monkeypatch.setattr(demo, "calibrate", lambda: rate)
    line = demo.estimate(cached)
    assert line.startswith(f"Estimated time: about {max(expected, 1):.0f} min on this machine ({rate:.0f} GFLOP/s")


def test_calibrate_measures_a_positive_rate():
    assert demo.calibrate(rounds=2, seconds=0.01) > 0
