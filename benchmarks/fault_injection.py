"""Kill training with SIGKILL at random moments, resume each time, and check that the final
workdir equals an uninterrupted run's.

One uninterrupted reference run of ``medjax train``, then trials: each trial trains a fresh
workdir, killing the process (SIGKILL, no chance to clean up) up to ``--kills_per_trial``
times and starting the same command again after each kill, then lets it finish. Kills alternate
between two kinds of moment:

* ``random``: a time drawn uniformly from [0, the reference run's wall time];
* ``checkpoint``: 0-50 ms after a checkpoint write is seen in progress (Orbax's temporary
  folder appears under ``checkpoints/``), i.e. inside the save.

Each finished trial's ``results.json`` (without ``run_info``: wall time, resume step) and
``metrics.jsonl`` (without throughput) must equal the reference's exactly.

  python benchmarks/fault_injection.py --kills 20          # about 15 minutes on 2 cores
  python benchmarks/fault_injection.py --kills 4 --config configs/quickstart.py:runlocal
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_CONFIG = 'configs/quickstart.py:runlocal'
# Four epochs of 8 steps: four evaluations and checkpoint saves to be killed in.
DEFAULT_SETTINGS = ('train.num_epochs=4', 'train.log_every_steps=2')
VARYING_METRICS = ('images_per_sec',)  # wall-clock throughput: differs between any two runs


def train_command(config: str, workdir: str, settings: Sequence[str]) -> List[str]:
  command = [sys.executable, '-m', 'medjax.cli', 'train', '--config', config,
             '--workdir', workdir]
  for setting in settings:
    command += [f'--config.{setting}']
  return command


def _checkpoint_temporaries(workdir: str) -> set:
  try:
    return {n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if 'tmp' in n}
  except FileNotFoundError:
    return set()


def run_until(command: List[str], workdir: str, kill_at: Optional[float], at_checkpoint: bool,
              timeout: float = 900, write_delay: float = 0.0) -> Dict:
  """Runs ``command`` and kills it with SIGKILL after ``kill_at`` seconds, or
  ``write_delay`` seconds after the first checkpoint write is seen (``at_checkpoint``), or
  not at all; returns what happened."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  start = time.perf_counter()
  proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  killed = False
  left_over = _checkpoint_temporaries(workdir)  # from an earlier kill: not a write of this run
  while proc.poll() is None:
    elapsed = time.perf_counter() - start
    if elapsed > timeout:
      proc.kill()
      raise TimeoutError(f'{command}: no exit after {timeout} s')
    due = (kill_at is not None and elapsed >= kill_at) or (
        at_checkpoint and _checkpoint_temporaries(workdir) - left_over)
    if due:
      if at_checkpoint:
        time.sleep(write_delay)  # somewhere inside the write, not always at its start
      proc.send_signal(signal.SIGKILL)
      killed = True
      break
    time.sleep(0.002 if at_checkpoint else 0.01)
  output = proc.communicate()[0]
  record = {'killed': killed, 'after_s': round(time.perf_counter() - start, 3),
            'returncode': proc.returncode}
  if not killed and proc.returncode != 0:
    record['output_tail'] = output[-2000:]
  return record


def comparable(workdir: str) -> Dict:
  """What must not depend on interruptions: results.json without run_info, and the metric
  records without throughput."""
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  results.pop('run_info', None)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  for record in records:
    for key in VARYING_METRICS:
      record.pop(key, None)
  return {'results': results, 'metrics': records}


def trial(command: List[str], workdir: str, kills: int, reference_s: float,
          rng: random.Random, first_kind: int = 0) -> List[Dict]:
  """Up to ``kills`` killed attempts on one workdir, then one run to the end."""
  attempts = []
  for i in range(kills):
    at_checkpoint = (i + first_kind) % 2 == 1
    kill_at = None if at_checkpoint else rng.uniform(0, reference_s)
    record = run_until(command, workdir, kill_at, at_checkpoint,
                       write_delay=rng.uniform(0, 0.05))
    record['kind'] = 'checkpoint' if at_checkpoint else 'random'
    attempts.append(record)
    if not record['killed']:
      return attempts  # finished before the kill came
  final = run_until(command, workdir, None, False)
  final['kind'] = 'final'
  attempts.append(final)
  return attempts


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kills', type=int, default=20, help='SIGKILLs in all')
  parser.add_argument('--kills_per_trial', type=int, default=4)
  parser.add_argument('--config', default=DEFAULT_CONFIG)
  parser.add_argument('--set', action='append', default=list(DEFAULT_SETTINGS),
                      help='config override KEY=VALUE (repeatable)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default=os.path.join(HERE, 'results', 'fault_injection.json'))
  args = parser.parse_args(argv)
  rng = random.Random(args.seed)
  root = tempfile.mkdtemp(prefix='medjax_faults_')
  reference_dir = os.path.join(root, 'reference')
  reference = run_until(train_command(args.config, reference_dir, args.set), reference_dir,
                        None, False)
  if reference['returncode'] != 0:
    print(reference.get('output_tail', ''))
    return 1
  expected = comparable(reference_dir)
  rows, trials, kills_done = [], 0, 0
  while kills_done < args.kills:
    workdir = os.path.join(root, f'trial{trials}')
    attempts = trial(train_command(args.config, workdir, args.set), workdir,
                     min(args.kills_per_trial, args.kills - kills_done), reference['after_s'],
                     rng, first_kind=trials)
    killed = sum(a['killed'] for a in attempts)
    kills_done += killed
    finished = attempts[-1]['returncode'] == 0 and not attempts[-1]['killed']
    identical = finished and comparable(workdir) == expected
    rows.append({'trial': trials, 'kills': killed,
                 'kill_times_s': ' '.join(f"{a['after_s']:.1f}{'c' if a['kind'] == 'checkpoint' else ''}"
                                          for a in attempts if a['killed']),
                 'finished': finished, 'identical': identical, 'attempts': attempts})
    trials += 1
  from results_table import print_table, write_results
  print_table(rows, [('trial', 'trial', 'd'), ('kills', 'kills', 'd'),
                     ('kill_times_s', 'killed after s (c: in a checkpoint write)', 's'),
                     ('finished', 'finished', ''), ('identical', 'identical', '')])
  survived = sum(r['kills'] for r in rows if r['identical'])
  print(f'\nkills survived with identical results: {survived} / {kills_done} '
        f'(reference run {reference["after_s"]:.1f} s; workdirs in {root})')
  write_results(args.out, rows, config=args.config, settings=args.set, kills=kills_done,
                kills_survived=survived, reference_wall_s=reference['after_s'])
  return 0 if survived == kills_done else 1


if __name__ == '__main__':
  sys.exit(main())
