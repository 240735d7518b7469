"""N seeds in one compiled program (``train.seeds``) against N sequential runs: images/s.

For each model, program (``train.seeds_program``: ``vmap`` or ``unroll`` over the seed axis) and
N it times the group's donated train step (N seeds x batch B,
:mod:`medjax.seeds`) and the single-seed step of the same config, in one process, and
reports images/s of both and their ratio. N sequential runs train at the single step's
images/s, so the ratio is the speed-up of training N seeds at once (the wall time of the
input pipeline, evaluation and checkpoints is not included).

  python benchmarks/seeds_throughput.py                          # quickstart CNN, ResNet-18
  python benchmarks/seeds_throughput.py --cases resnet18_28 --seeds 1,2,4,8 --steps 10
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from medjax import config as config_lib, seeds as seeds_lib
from medjax.experiments import ClassificationExperiment
from medjax.train import Member
from results_table import (print_skipped, print_table, run_case, seconds_per_step,
                           write_results)  # benchmarks/ is on sys.path when run
from train_throughput import _data

CASES = {
    # name: (model config, image shape, batch per seed)
    'quickstart_cnn_32': (dict(name='simple_cnn', features=(32, 64), hidden=128,
                               dropout_rate=0.2), (32, 32, 1), 64),
    'resnet18_28': (dict(name='resnet18', stem='medmnist'), (28, 28, 1), 128),
}


def bench(name: str, n: int, steps: int, tmp: str, program: str) -> dict:
  model, shape, batch = CASES[name]
  data = _data(shape, batch)
  config = config_lib.resolve(dict(model=model, train=dict(batch_size=batch,
                                                          eval_batch_size=batch)))
  single = ClassificationExperiment(config, data)
  images, labels = next(iter(single.train_iterator(0)))
  single_s = seconds_per_step(single.train_step, single.init_state(), images, labels,
                              steps=steps)
  members = [Member(ClassificationExperiment(seeds_lib.member_config(config, k), data),
                    os.path.join(tmp, f'{name}_{n}_{k}')) for k in range(n)]
  group = seeds_lib.Group(members, program)
  group_s = seconds_per_step(group.train_step, group.init(), np.stack([images] * n),
                             np.stack([labels] * n), steps=steps)
  sequential = batch / single_s
  together = n * batch / group_s
  return {'case': name, 'program': program, 'seeds': n, 'batch_per_seed': batch,
          'sequential_img_s': sequential, 'one_program_img_s': together,
          'speedup': together / sequential}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cases', default=','.join(CASES))
  parser.add_argument('--seeds', default='1,2,4,8', help='values of N')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--programs', default='vmap,unroll', help="train.seeds_program values")
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results',
                                                    'seeds_throughput.json'))
  args = parser.parse_args()
  import tempfile
  tmp = tempfile.mkdtemp(prefix='medjax_seeds_bench_')
  rows = []
  for name in args.cases.split(','):
    for program in args.programs.split(','):
      for n in (int(k) for k in args.seeds.split(',')):
        rows.append(dict(run_case(f'{name} {program} N={n}', bench, name, n, args.steps, tmp,
                                  program), case=name, program=program, seeds=n))
        print(rows[-1], flush=True)
  print_table(rows, [('case', 'case', 's'), ('program', 'program', 's'), ('seeds', 'N', 'd'),
                     ('batch_per_seed', 'batch/seed', 'd'),
                     ('sequential_img_s', 'N runs img/s', '.1f'),
                     ('one_program_img_s', 'one program img/s', '.1f'),
                     ('speedup', 'speed-up', '.2f')])
  print_skipped(rows, key='case')
  write_results(args.out, rows)


if __name__ == '__main__':
  main()
