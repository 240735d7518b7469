"""Segmentation input-pipeline throughput on MSD Hippocampus, next to the train-step rate.

Prepares ../shared/data/msd_hippocampus once (cached), then times the tf.data stream of the
deterministic sampler: 3D patches and 2D slices, without and with nnU-Net-like augmentation.
For comparison it times the jit-compiled U-Net train step (Dice+CE) on the same shapes, so
the table shows whether the input pipeline keeps up.

  python benchmarks/volume_pipeline.py [--data ../shared/data/msd_hippocampus] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from medjax.data import prepare, sampling
from results_table import (DoesNotFit, check_fits, out_of_memory_reason, print_table,
                           seconds_per_step, write_results)  # benchmarks/ is on sys.path
from unet_upsampling import make_train_step

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.normpath(os.path.join(HERE, '..', '..', 'shared', 'data',
                                             'msd_hippocampus'))

CASES = [
    # name, patch, slice axis, batch
    ('patch3d_40x56x40', (40, 56, 40), None, 4),
    ('slice2d_axis0_56x40', (56, 40), 0, 32),
]


def time_pipeline(cases, patch, slice_axis, batch, augment, steps, workers) -> float:
  sampler = sampling.SegmentationSampler(
      cases, patch, batch, seed=0, slice_axis=slice_axis, augment=augment,
      skip_empty_slices=slice_axis is not None)
  it = sampler.batches(0, steps + 2, num_workers=workers)
  next(it)  # start-up
  t0 = time.perf_counter()
  n = sum(1 for _ in it)
  return n * batch / (time.perf_counter() - t0)


def time_train_step(patch, batch, steps=3, upsample='transpose') -> float:
  """Samples/s of a jit-compiled, donated U-Net train step (Dice+CE, Adam), nnU-Net-like
  Hippocampus network: 4 levels, 32..256 channels, instance norm."""
  import optax
  from medjax.models import build_model
  model = build_model('unet', 3, features=(32, 64, 128, 256), strides=(1, 2, 2, 2),
                      upsample=upsample)
  x = np.random.default_rng(0).normal(size=(batch,) + tuple(patch) + (1,)).astype(np.float32)
  y = np.random.default_rng(1).integers(0, 3, (batch,) + tuple(patch)).astype(np.int32)
  params = model.init(jax.random.PRNGKey(0), x[:1])['params']
  tx = optax.adam(1e-3)
  state = (params, tx.init(params))
  step = make_train_step(model, tx)
  check_fits(step, state, x, y)
  return batch / seconds_per_step(step, state, x, y, steps=steps)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data', default=DEFAULT_DATA)
  parser.add_argument('--cache', default=os.path.join(tempfile.gettempdir(), 'medjax_cache'))
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--workers', type=int, default=0, help='tf.data threads (0 = AUTOTUNE)')
  parser.add_argument('--skip_train_step', action='store_true')
  parser.add_argument('--out', default=os.path.join(HERE, 'results', 'volume_pipeline.json'))
  args = parser.parse_args()
  if not os.path.isdir(args.data):
    raise SystemExit(f'no dataset at {args.data}; pass --data')

  t0 = time.perf_counter()
  ds = prepare.prepare(args.data, args.cache)
  prepare_s = time.perf_counter() - t0
  cases = {c: ds.load(c) for c in ds.case_ids}
  rows = []
  for name, patch, axis, batch in CASES:
    row = {'case': name, 'batch': batch}
    row['samples_per_s'] = time_pipeline(cases, patch, axis, batch, sampling.SegAugment(),
                                         args.steps, args.workers)
    row['samples_per_s_augmented'] = time_pipeline(
        cases, patch, axis, batch, sampling.SegAugment.nnunet_like(), args.steps, args.workers)
    if not args.skip_train_step:
      try:
        row['train_step_samples_per_s'] = time_train_step(patch, batch)
      except (DoesNotFit, RuntimeError, MemoryError) as e:  # too large for this machine
        row['train_step_skipped'] = out_of_memory_reason(e)
        if row['train_step_skipped'] is None:
          raise
        print(f"  {name} train step: skipped, {row['train_step_skipped']}")
    rows.append(row)
  print(f'\nprepare (200 cases, or reuse of the cache): {prepare_s:.1f} s')
  print_table(rows, [('case', 'case', ''), ('batch', 'batch', 'd'),
                     ('samples_per_s', 'plain/s', '.1f'),
                     ('samples_per_s_augmented', 'augmented/s', '.1f'),
                     ('train_step_samples_per_s', 'train step/s', '.1f')])
  write_results(args.out, rows, prepare_s=prepare_s)

if __name__ == '__main__':
  main()
