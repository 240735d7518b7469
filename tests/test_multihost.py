"""Two processes (jax.distributed on 127.0.0.1, gloo) x 2 CPU devices each train exactly as
one process does: each host reads only its share of every batch. A SIGTERM to one of them
stops both at the same step, and the rerun ends where an uninterrupted run does."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


TRAIN = [sys.executable, '-m', 'medjax.cli', 'train', '--config', 'configs/quickstart.py:runlocal']
TWO_HOSTS_ENV = dict(os.environ, JAX_PLATFORMS='cpu',
                     XLA_FLAGS='--xla_force_host_platform_device_count=2')


def _start_two(workdir, *extra):
  """Processes 0 and 1 of one ``medjax train`` run (stdout, stderr piped)."""
  address = f'127.0.0.1:{_free_port()}'
  return [subprocess.Popen(TRAIN + ['--workdir', workdir, '--coordinator_address', address,
                                    '--num_processes', '2', '--process_id', str(i), *extra],
                           cwd=REPO, env=TWO_HOSTS_ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish_all(procs):
  """Each process's stdout once every one has exited with status 0; on a failure none is
  left running."""
  try:
    outputs = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, (_, err)) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f'process {i} exited {p.returncode}: {err[-2000:]}'
  return [out for out, _ in outputs]


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_two_processes_match_one_process(tmp_path, quickstart_run):
  single = quickstart_run  # one process, one device
  multi = str(tmp_path / 'multi')

  def run_two(*extra):
    procs = _start_two(multi, *extra)
    return procs, [p.communicate(timeout=600) for p in procs]

  procs, outputs = run_two()
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-2000:]
  # A refusal on process 0 (here: resuming with another config) stops every process with a
  # one-line error; none is left waiting in a collective.
  procs, outputs = run_two('--config.optimizer.learning_rate=0.1')
  assert [p.returncode for p in procs] == [2, 2], [err[-1000:] for _, err in outputs]
  assert 'with another config (optimizer.learning_rate' in outputs[0][1]
  assert 'process 0 refused to start this run' in outputs[1][1]

  one, two = _records(single), _records(multi)
  assert [(r['split'], r['step']) for r in one] == [(r['split'], r['step']) for r in two]
  for a, b in zip(one, two):
    for key in ('loss', 'auc', 'accuracy'):
      if key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=f"{a['split']} {key}")
  r1 = json.load(open(os.path.join(single, 'results.json')))
  r2 = json.load(open(os.path.join(multi, 'results.json')))
  assert r2['run_info']['devices'] == 4
  assert r1['selected_step'] == r2['selected_step']
  assert r2['test']['auc'] == pytest.approx(r1['test']['auc'], rel=1e-5)


# 6 epochs of 8 steps, evaluated every 3: a stop after the first train record (step 10)
# lands mid-run.
PREEMPT_SETTINGS = ('--config.train.num_epochs=6', '--config.train.eval_every_epochs=3')


def _wait_for_train_record(workdir, procs, timeout=600):
  """Returns once process 0 has logged a train step (compiled, training), so a signal now
  lands mid-run."""
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert all(p.poll() is None for p in procs), 'a process exited before training'
    if os.path.exists(path) and '"train"' in open(path).read():
      return
    time.sleep(0.2)
  raise AssertionError(f'no train record in {path} after {timeout} s')


def _without_timing(workdir):
  records = [{k: v for k, v in r.items() if k != 'images_per_sec'} for r in _records(workdir)]
  results = json.load(open(os.path.join(workdir, 'results.json')))
  del results['run_info']
  return records, results


def _state_digest(workdir, step):
  with open(os.path.join(workdir, 'checkpoints', str(step), 'meta', 'metadata')) as f:
    return json.load(f)['state_sha256']


def test_sigterm_to_one_process_stops_both_at_one_step_and_the_rerun_ends_exactly(tmp_path):
  reference, preempted = str(tmp_path / 'reference'), str(tmp_path / 'preempted')
  _finish_all(_start_two(reference, *PREEMPT_SETTINGS))

  procs = _start_two(preempted, *PREEMPT_SETTINGS)
  try:
    _wait_for_train_record(preempted, procs)
  except BaseException:
    for p in procs:
      p.kill()
    raise
  # Process 0 paused, so training waits in its collectives (however fast this machine) while
  # process 1's notice goes out: JAX's handler sets a flag that a thread reads each second.
  procs[0].send_signal(signal.SIGSTOP)
  procs[1].send_signal(signal.SIGTERM)  # process 1 only
  time.sleep(5)
  procs[0].send_signal(signal.SIGCONT)
  outputs = _finish_all(procs)
  stops = [re.findall(r'Stopped at step (\d+);', out) for out in outputs]
  assert len(stops[0]) == 1 and stops[0] == stops[1], outputs
  stopped = int(stops[0][0])
  total = 6 * 8
  assert 0 < stopped < total
  assert max(int(s) for s in os.listdir(os.path.join(preempted, 'checkpoints'))
             if s.isdigit()) == stopped
  assert not os.path.exists(os.path.join(preempted, 'results.json'))

  outputs = _finish_all(_start_two(preempted, *PREEMPT_SETTINGS))
  for out in outputs:
    assert f'Resuming from checkpoint at step {stopped} ' in out
  assert json.load(open(os.path.join(preempted, 'results.json')))['run_info'][
      'resumed_from_step'] == stopped
  # Every logged number, the scores and the final state (parameters, optimizer, step) are
  # those of the uninterrupted run, bit for bit.
  assert _without_timing(preempted) == _without_timing(reference)
  assert _state_digest(preempted, total) == _state_digest(reference, total)
