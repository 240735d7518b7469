"""MSD Hippocampus fold 0 on a 2-core CPU budget, against nnU-Net 3d_fullres.

Trains ``configs/hippocampus_unet3d.py:cpu`` (a 2.5D U-Net on slices) along each of ``--axes``
(axis 0 is the recipe; other axes use a patch that covers their slices), then scores fold 0's
40 held-out volumes, whole, on their original grid: each model alone, with test-time
mirroring over both slice axes, and the ensemble of the axes (mean of the probabilities,
:func:`medjax.train.evaluate_ensemble`). Prints Dice and HD95 per class, each model's
training minutes and the inference seconds per volume next to nnU-Net's 5-fold figures, and
writes benchmarks/results/hippocampus_cpu.json. Finished runs (a results.json) are reused.

  python benchmarks/hippocampus_cpu.py --runs /tmp/hippo_cpu --axes 0,1,2    # the recipe
  python benchmarks/hippocampus_cpu.py --runs /tmp/hippo_2d --axes 1 \\
      --set data.slice_context=0 --out /tmp/hippo_2d.json                    # one 2D model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_table import print_table, write_results  # noqa: E402

from medjax import config as config_lib, train as train_lib  # noqa: E402
from medjax.experiments.segmentation import ensemble_predictor  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'hippocampus_unet3d.py') + ':cpu'
# nnU-Net 3d_fullres, Task04 Hippocampus, 5-fold cross-validation (Isensee et al. 2021).
NNUNET = {'mirror_axes': '0,1,2', 'dice_anterior': 0.8975, 'dice_posterior': 0.8807}
# Prepared volumes are at most 43 x 59 x 47 voxels (median 35 x 50 x 36): one window per
# slice, a multiple of the U-Net's total stride 8.
SLICE_PATCH = {0: (56, 40), 1: (40, 40), 2: (40, 56)}


def train_axis(runs: str, axis: int, overrides) -> str:
  workdir = os.path.join(runs, f'axis{axis}')
  if not os.path.exists(os.path.join(workdir, 'results.json')):
    config = config_lib.load_config_file(CONFIG)
    config_lib.apply_overrides(config, ['train.progress_bar=False', f'data.slice_axis={axis}',
                                        f'data.patch_size={SLICE_PATCH[axis]}', *overrides])
    train_lib.train_and_evaluate(config, workdir)
  return workdir


def input_kind(workdir: str) -> str:
  """'2D' (one slice in) or '2.5D' (with neighbouring slices as channels) for a run."""
  with open(os.path.join(workdir, 'config.json')) as f:
    context = json.load(f)['data'].get('slice_context', 0)
  return '2.5D' if context else '2D'


def seconds_per_volume(workdirs, mirror) -> float:
  """Wall seconds to predict one validation volume (sliding window, all members, mirroring),
  after a first volume has compiled the models."""
  members = [train_lib.restore_workdir(w)[:2] for w in workdirs]
  for exp, _ in members:
    exp.config.inference.mirror_axes = mirror
  predict = ensemble_predictor(members)
  first = members[0][0]
  images = [first.cases[c][0] for c in first.data.splits['val']]
  predict(images[0])
  start = time.perf_counter()
  for image in images:
    predict(image)
  return (time.perf_counter() - start) / len(images)


def score(name: str, workdirs, mirror, train_minutes: float) -> dict:
  m = train_lib.evaluate_ensemble(workdirs, 'val', mirror_axes=mirror)['metrics']
  return {'model': name, 'mirror_axes': ','.join(map(str, mirror)) or '-',
          'dice_anterior': m['dice_Anterior'], 'dice_posterior': m['dice_Posterior'],
          'dice': m['dice'], 'hd95_anterior_mm': m['hd95_Anterior'],
          'hd95_posterior_mm': m['hd95_Posterior'], 'train_minutes': train_minutes,
          'seconds_per_volume': seconds_per_volume(workdirs, mirror),
          'cases': m['num_cases']}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--runs', default='/tmp/medjax_hippocampus_cpu')
  parser.add_argument('--axes', default='0', help='slice axes to train, e.g. 0,1,2')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='config override for every model, e.g. train.num_epochs=80')
  parser.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'results',
                                                     'hippocampus_cpu.json'))
  args = parser.parse_args()
  axes = [int(a) for a in args.axes.split(',')]
  workdirs, minutes = [], []
  for axis in axes:
    workdirs.append(train_axis(args.runs, axis, args.set))
    with open(os.path.join(workdirs[-1], 'results.json')) as f:
      minutes.append(json.load(f)['run_info']['wall_time_s'] / 60)
  rows = []
  kinds = [input_kind(w) for w in workdirs]
  for axis, kind, workdir, train_min in zip(axes, kinds, workdirs, minutes):
    for mirror in ((), (0, 1)):
      rows.append(score(f'{kind} axis {axis}', [workdir], mirror, train_min))
  if len(axes) > 1:
    for mirror in ((), (0, 1)):
      rows.append(score(f"{'+'.join(sorted(set(kinds)))} axes {','.join(map(str, axes))}",
                        workdirs, mirror, sum(minutes)))
  rows.append({'model': 'nnU-Net 3d_fullres (5-fold, GPU)', **NNUNET})
  print_table(rows, [('model', 'model', ''), ('mirror_axes', 'mirror', ''),
                     ('dice_anterior', 'Dice ant', '.4f'), ('dice_posterior', 'Dice post', '.4f'),
                     ('dice', 'mean Dice', '.4f'), ('hd95_anterior_mm', 'HD95 ant mm', '.2f'),
                     ('hd95_posterior_mm', 'HD95 post mm', '.2f'),
                     ('train_minutes', 'train min', '.1f'),
                     ('seconds_per_volume', 's/volume', '.2f')])
  write_results(args.out, rows, config=CONFIG, axes=axes, overrides=args.set, runs=args.runs)


if __name__ == '__main__':
  main()
