"""tf.data with and without its autotuning thread (``pipeline.numpy_batches`` turns it off),
measured in one run: the time to drop the iterators of a 10-seed FixMatch group at the end of
training (a ``zip`` leaves all but one member's iterators unfinished), the steps/s of those
iterators, and the 2D-slice segmentation sampler's slices/s.

  python benchmarks/pipeline_autotune.py

Synthetic arrays of BreastMNIST's sizes (55 labelled, 491 unlabelled 28 px images; FixMatch's
weak and strong views) and Hippocampus-sized volumes (36x50x35), so no data files are needed.
Writes benchmarks/results/pipeline_autotune.json.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_table import print_table, write_results  # noqa: E402

from medjax import config as config_lib  # noqa: E402
from medjax.data import pipeline, sampling  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_autotune(ds: tf.data.Dataset):
  """The iterator as tf.data makes it by default (autotuning thread on)."""
  return ds.as_numpy_iterator()


def fixmatch_group(members: int, steps: int):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (55, 28, 28, 1)).astype(np.uint8)
  labels = rng.integers(0, 2, (55, 1)).astype(np.int64)
  unlabeled = rng.integers(0, 255, (491, 28, 28, 1)).astype(np.uint8)
  cfg = config_lib.load_config_file(os.path.join(REPO, 'configs', 'few_labels.py') + ':runlocal')
  common = dict(start_step=0, num_steps=steps, pixel_max=255.0, mean=0.0, std=1.0)

  def member(seed):
    batches = pipeline.train_batches(images, labels, global_batch=32, seed=seed,
                                     augment=cfg.data.augment, **common)
    views = pipeline.unlabeled_batches(unlabeled, global_batch=96, seed=seed,
                                       weak=cfg.data.augment, strong=cfg.semi.strong_augment,
                                       **common)
    return zip(batches, views)

  start = time.perf_counter()
  iterators = [member(k) for k in range(members)]
  for _ in zip(*iterators):
    pass
  run = time.perf_counter() - start
  start = time.perf_counter()
  del iterators
  return steps / run, time.perf_counter() - start


def slice_sampler(steps: int) -> float:
  rng = np.random.default_rng(1)
  cases = {}
  for k in range(20):
    label = np.zeros((36, 50, 35), np.uint8)
    label[10:26, 15:35, 10:25] = 1 + (np.arange(35)[10:25] > 17)
    cases[f'c{k}'] = (rng.normal(size=(36, 50, 35, 1)).astype(np.float32), label,
                      {'1': np.argwhere(label == 1), '2': np.argwhere(label == 2)})
  sampler = sampling.SegmentationSampler(
      cases, (56, 40), 16, seed=0, slice_axis=0, slice_context=2,
      augment=sampling.SegAugment(p_rotate=0.2, p_scale=0.2, p_flip=0.5))
  start = time.perf_counter()
  for _ in sampler.batches(0, steps):
    pass
  return steps * 16 / (time.perf_counter() - start)


def main() -> None:
  own = pipeline.numpy_batches
  rows = []
  for trial in range(3):
    for name, make in (('autotune on (tf.data default)', with_autotune),
                       ('autotune off (medjax)', own)):
      pipeline.numpy_batches = make  # both modules look it up at call time
      steps_per_s, teardown = fixmatch_group(10, 60)
      rows.append({'trial': trial, 'pipeline': name, 'group_steps_per_s': steps_per_s,
                   'teardown_s': teardown, 'slices_per_s': slice_sampler(60)})
  pipeline.numpy_batches = own
  print_table(rows, [('trial', 'trial', 'd'), ('pipeline', 'pipeline', ''),
                     ('group_steps_per_s', '10-seed steps/s', '.2f'),
                     ('teardown_s', 'teardown s', '.2f'),
                     ('slices_per_s', '2.5D slices/s', '.0f')])
  write_results(os.path.join(REPO, 'benchmarks', 'results', 'pipeline_autotune.json'), rows,
                members=10, steps=60)


if __name__ == '__main__':
  main()
