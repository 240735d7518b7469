"""SIGTERM in the training loop (medjax.runs.preemption): one process reads its own flag;
several processes follow JAX's preemption service, here a stand-in with the service's
contract (each call records the process's step; True only at the agreed sync point). The
real two-process run is tests/test_multihost.py."""

import os
import signal

import pytest

from medjax import runs


class FakeSyncService:
  """``reached_preemption_sync_point`` as JAX documents it: the sync point, once a notice
  arrives, is one past the last step reported; a call answers whether it is that step."""

  def __init__(self, sync_point=None, off=False):
    self.sync_point, self.off, self.reported = sync_point, off, []

  def notice(self):
    self.sync_point = (self.reported[-1] if self.reported else 0) + 1

  def __call__(self, step):
    if self.off:
      raise RuntimeError('Preemption sync manager has not been initialized.')
    self.reported.append(step)
    return step == self.sync_point


@pytest.fixture
def two_processes(monkeypatch):
  service = FakeSyncService()
  monkeypatch.setattr(runs.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(runs.multihost_utils, 'reached_preemption_sync_point', service)
  return service


def test_one_process_stops_at_the_step_after_sigterm_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  with runs.preemption(0) as preempted:
    assert not preempted(0) and not preempted(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert preempted(2)
  assert signal.getsignal(signal.SIGTERM) is before


def test_several_processes_stop_at_the_agreed_step_and_leave_sigterm_to_jax(two_processes):
  before = signal.getsignal(signal.SIGTERM)
  with runs.preemption(20) as preempted:
    assert signal.getsignal(signal.SIGTERM) is before  # JAX's handler stays in place
    assert two_processes.reported[-1] == 20  # counting starts at the resumed step
    assert not preempted(20)
    stops = []
    for step in range(21, 40):
      if step == 25:
        two_processes.notice()  # agreed: 25, one past the furthest step reported (24)
      if preempted(step):
        stops.append(step)
    assert stops == [25]
    assert two_processes.reported[-19:] == list(range(21, 40))  # every step, in order


def test_a_notice_before_a_resumed_run_counts_stops_it_before_the_first_step(two_processes):
  two_processes.sync_point = 1  # a SIGTERM during start-up: every count was still 0
  with runs.preemption(12) as preempted:
    assert preempted(12)
    assert two_processes.reported[-1] == 12


def test_a_fresh_run_reaches_an_early_sync_point_at_step_one(two_processes):
  two_processes.sync_point = 1
  with runs.preemption(0) as preempted:
    assert not preempted(0)
    assert preempted(1)


def test_service_off_warns_once_and_never_stops(two_processes, capsys):
  two_processes.off = True
  with runs.preemption(3) as preempted:
    assert not any(preempted(step) for step in range(3, 10))
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'jax_enable_preemption_service' in err
