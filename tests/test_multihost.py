"""Two processes (jax.distributed on 127.0.0.1, gloo) x 2 CPU devices each train exactly as
one process does: each host reads only its share of every batch."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_two_processes_match_one_process(tmp_path, quickstart_run):
  base = [sys.executable, '-m', 'medjax.cli', 'train', '--config',
          'configs/quickstart.py:runlocal']
  single = quickstart_run  # one process, one device

  multi = str(tmp_path / 'multi')
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')

  def run_two(*extra):
    address = f'127.0.0.1:{_free_port()}'
    procs = [subprocess.Popen(base + ['--workdir', multi, '--coordinator_address', address,
                                      '--num_processes', '2', '--process_id', str(i), *extra],
                              cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
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
