"""Throughput and ETA of the training log, on a clock the test sets."""

import pytest

from pinet_jax import progress


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_rate_covers_interval_eta_whole_measurement():
  clock = FakeClock()
  throughput = progress.Throughput(0, 1000, 128, clock=clock)
  clock.now += 10.0
  # 100 steps in 10 s: 1,280 img/s; 900 steps left at 10 steps/s.
  assert throughput.report(100) == pytest.approx((1280.0, 90.0))
  clock.now += 1.0
  # A 4-step interval that ran at 4 steps/s. Its img/s shows that rate,
  # but the ETA uses the 104 steps of the last 11 s: 896 / (104 / 11) s.
  images_per_second, eta = throughput.report(104)
  assert images_per_second == pytest.approx(512.0)
  assert eta == pytest.approx(896 * 11 / 104)


def test_no_progress_gives_infinite_eta():
  clock = FakeClock()
  throughput = progress.Throughput(5, 10, 128, clock=clock)
  clock.now += 3.0
  assert throughput.report(5) == (0.0, float('inf'))


def test_finished_run_has_no_time_left():
  clock = FakeClock()
  throughput = progress.Throughput(0, 10, 2, clock=clock)
  clock.now += 5.0
  assert throughput.report(10) == pytest.approx((4.0, 0.0))
