"""Signal handling around the training loop."""

import os
import signal

import pytest

from pinet_jax import interrupts


def test_first_signal_requests_stop():
  with interrupts.stop_on_signals() as stop:
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested


def test_second_signal_stops_at_once():
  with interrupts.stop_on_signals() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested
    with pytest.raises(interrupts.InterruptedTwice):
      os.kill(os.getpid(), signal.SIGINT)


def test_previous_handlers_restored():
  before = signal.getsignal(signal.SIGTERM)
  with interrupts.stop_on_signals():
    assert signal.getsignal(signal.SIGTERM) is not before
  assert signal.getsignal(signal.SIGTERM) is before


def test_only_given_signals_are_handled():
  before = signal.getsignal(signal.SIGTERM)
  with interrupts.stop_on_signals((signal.SIGINT,)) as stop:
    assert signal.getsignal(signal.SIGTERM) is before
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested
