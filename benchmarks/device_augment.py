"""Augmentation on the host vs in the train step (``data.augment_on``), Hippocampus.

For a 3D U-Net on 40x56x40 patches and a 2.5D U-Net on 56x40 slices (5 channels), both with
the config's nnU-Net-like augmentation, it times in one run, interleaved (other processes
share the cores, so only ratios within a run mean much):

* the host's work per batch: the sampler's augmented patches (``host``) against its crops
  (``device``: what the host still does), called directly, one process, no tf.data;
* the compiled train step on such a batch: plain (``host``) against augment-then-train
  (``device``), i.e. what the accelerator takes on.

On a GPU the host time is what the step waits for when the host is the bottleneck; here on
a CPU both run on the same cores, so the sum is the CPU's cost per step either way.

  python benchmarks/device_augment.py [--repeats 5] [--full_width]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

from medjax import config as config_lib
from medjax.experiments import make_experiment
from results_table import print_table, write_results  # benchmarks/ is on sys.path when run

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, '..', 'configs', 'hippocampus_unet3d.py')

CASES = [
    # name, overrides of configs/hippocampus_unet3d.py
    ('unet3d_40x56x40', ['train.batch_size=2', 'model.features=(8,16,32,64)']),
    ('unet2.5d_56x40', ['data.slice_axis=0', 'data.patch_size=(56,40)', 'data.slice_context=2',
                        'train.batch_size=16', 'model.features=(16,32,64,128)']),
]


def experiment(overrides, augment_on, max_cases, full_width):
  config = config_lib.load_config_file(CONFIG)
  extra = [o for o in overrides if not (full_width and o.startswith('model.features'))]
  config_lib.apply_overrides(config, extra + [f'data.augment_on={augment_on}',
                                              f'data.max_cases={max_cases}',
                                              'train.progress_bar=false'])
  return make_experiment(config)


def host_seconds(exp, steps) -> float:
  """Seconds the sampler takes for ``steps`` whole batches (one process)."""
  start = time.perf_counter()
  for step in steps:
    for j in range(exp.global_batch):
      exp.sampler(step, j)
  return (time.perf_counter() - start) / len(steps)


def step_seconds(exp, state, batch, steps):
  """(state, seconds per compiled train step on ``batch``)."""
  images, labels = exp.global_array(batch[0]), exp.global_array(batch[1])
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = exp._train_step(state, images, labels)
  jax.block_until_ready(metrics)
  return state, (time.perf_counter() - start) / steps


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--steps', type=int, default=3, help='train steps per timing')
  parser.add_argument('--max_cases', type=int, default=20)
  parser.add_argument('--full_width', action='store_true',
                      help="the config's own network widths (slow on a CPU)")
  parser.add_argument('--out', default=os.path.join(HERE, 'results', 'device_augment.json'))
  args = parser.parse_args()
  rows = []
  for name, overrides in CASES:
    exps = {m: experiment(overrides, m, args.max_cases, args.full_width)
            for m in ('host', 'device')}
    batches = {m: next(iter(e.train_iterator(0))) for m, e in exps.items()}
    states = {m: e.init_state() for m, e in exps.items()}
    for m, e in exps.items():  # compile
      states[m], _ = step_seconds(e, states[m], batches[m], 1)
    host = {m: [] for m in exps}
    step = {m: [] for m in exps}
    for r in range(args.repeats):  # interleaved: both modes see the same load
      for m, e in exps.items():
        host[m].append(host_seconds(e, range(r * 3, r * 3 + 3)))
        states[m], seconds = step_seconds(e, states[m], batches[m], args.steps)
        step[m].append(seconds)
    med = {k: {m: statistics.median(v[m]) for m in exps} for k, v in (('host', host),
                                                                      ('step', step))}
    crop = batches['device'][0].shape[1:-1]
    rows.append({
        'case': name, 'batch': exps['host'].global_batch,
        'patch': 'x'.join(map(str, exps['host'].patch_size)),
        'crop': 'x'.join(map(str, crop)),
        'host_ms_host_aug': 1e3 * med['host']['host'],
        'host_ms_device_aug': 1e3 * med['host']['device'],
        'host_ratio': med['host']['device'] / med['host']['host'],
        'step_ms_host_aug': 1e3 * med['step']['host'],
        'step_ms_device_aug': 1e3 * med['step']['device'],
        'step_ratio': med['step']['device'] / med['step']['host'],
        'host_bytes_host_aug': int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(
            batches['host']))),
        'host_bytes_device_aug': int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(
            batches['device']))),
        'repeats': {'host_s': host, 'step_s': step}})
  columns = [('case', 'case', ''), ('batch', 'batch', 'd'), ('crop', 'device crop', ''),
             ('host_ms_host_aug', 'host ms (host aug)', '.1f'),
             ('host_ms_device_aug', 'host ms (device aug)', '.1f'),
             ('host_ratio', 'host ratio', '.3f'),
             ('step_ms_host_aug', 'step ms (host aug)', '.0f'),
             ('step_ms_device_aug', 'step ms (device aug)', '.0f'),
             ('step_ratio', 'step ratio', '.3f'),
             ('host_bytes_device_aug', 'batch bytes (device)', 'd'),
             ('host_bytes_host_aug', 'batch bytes (host)', 'd')]
  print_table(rows, columns)
  write_results(args.out, rows, note=(
      'medians of interleaved repeats in one run; host ms: the sampler for one whole batch '
      'in one process (augmented patches vs crops); step ms: the compiled train step on '
      'that batch (plain vs augment-then-train); CPU shared with other processes'))


if __name__ == '__main__':
  main()
