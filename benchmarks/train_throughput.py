"""Train-step and input-pipeline throughput (images/s) on this machine.

Times the jit-compiled, donated train step of medjax's ClassificationExperiment (compile
warm-up, ``block_until_ready`` on every step) on synthetic inputs, and the tf.data pipeline
alone. Prints a table and writes JSON.

  python benchmarks/train_throughput.py                       # default cases
  python benchmarks/train_throughput.py --cases resnet18_28 --steps 20
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from medjax import config as config_lib
from medjax.data import ClassificationData, pipeline
from medjax.experiments import ClassificationExperiment
from results_table import (print_skipped, print_table, run_case,
                           write_results)  # benchmarks/ is on sys.path when run

CASES = {
    # name: (model config, image shape, global batch)
    'simple_cnn_28': (dict(name='simple_cnn'), (28, 28, 1), 128),
    'resnet18_28': (dict(name='resnet18', stem='medmnist'), (28, 28, 1), 128),
    'resnet18_3d_28': (dict(name='resnet18', stem='medmnist'), (28, 28, 28, 1), 32),
}


def _data(shape, batch, seed=0) -> ClassificationData:
  rng = np.random.default_rng(seed)
  n = batch * 4
  split = (rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
           rng.integers(0, 2, n).astype(np.int32))
  return ClassificationData('random', {'train': split, 'val': split, 'test': split}, 'binary',
                            2, ['0', '1'])


def bench_train_step(name: str, steps: int, warmup: int = 2) -> dict:
  model, shape, batch = CASES[name]
  if len(shape) == 4:  # 3D steps take tens of seconds on a CPU
    steps, warmup = max(2, steps // 5), 1
  config = config_lib.resolve(dict(model=model, train=dict(batch_size=batch,
                                                          eval_batch_size=batch)))
  data = _data(shape, batch)
  exp = ClassificationExperiment(config, data)
  state = exp.init_state()
  x = np.asarray((data.splits['train'][0][:batch] / 255.0 - 0.5) / 0.5, np.float32)
  y = data.splits['train'][1][:batch]
  t0 = time.perf_counter()
  state, m = exp.train_step(state, x, y)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, m = exp.train_step(state, x, y)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = exp.train_step(state, x, y)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  times = np.array(times)
  return {'case': name, 'batch': batch, 'image_shape': list(shape),
          'compile_s': compile_s, 'step_ms_median': 1e3 * float(np.median(times)),
          'images_per_s': batch / float(np.median(times)),
          'images_per_s_mean': batch * steps / float(times.sum())}


def bench_pipeline(augment: bool, steps: int = 200) -> dict:
  data = _data((28, 28, 1), 128)
  x, y = data.splits['train']
  aug = config_lib.default_config().data.augment
  if augment:
    aug.update(dict(flip_lr=True, flip_ud=True, rotation_deg=15.0, scale_min=0.9,
                    scale_max=1.1, brightness=0.1, contrast=0.1))
  it = pipeline.train_batches(x, y, global_batch=128, seed=0, start_step=0, num_steps=steps,
                              pixel_max=255.0, mean=0.5, std=0.5, augment=aug)
  next(it)
  t0 = time.perf_counter()
  count = sum(1 for _ in it)
  elapsed = time.perf_counter() - t0
  return {'case': f"pipeline_28px{'_augmented' if augment else ''}", 'batch': 128,
          'images_per_s': count * 128 / elapsed}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--cases', nargs='*', default=list(CASES), choices=list(CASES))
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results',
                                                    'train_throughput.json'))
  args = parser.parse_args()
  rows = [run_case(c, bench_train_step, c, args.steps) for c in args.cases]
  rows += [bench_pipeline(False), bench_pipeline(True)]
  print_table(rows, [('case', 'case', ''), ('batch', 'batch', 'd'),
                     ('compile_s', 'compile s', '.1f'), ('step_ms_median', 'step ms', '.1f'),
                     ('images_per_s', 'images/s', '.1f')])
  print_skipped(rows)
  write_results(args.out, rows)

if __name__ == '__main__':
  main()
