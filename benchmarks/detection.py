"""Detection recipes on a CPU: training minutes and scores.

* ``quickstart``: ``configs/detection_quickstart.py`` (embedded 2D lesions, 2 classes):
  validation mAP (IoU 0.1:0.5), AP@0.1, AP@0.5 and CPM (hit: centre in the box's ellipse).
* ``luna_cpu``: ``configs/detection_luna.py:cpu`` on synthetic LUNA16-format data
  (``medjax.data.synthetic_luna``, seed 0, ``--luna_train`` scans, fold 0 validates on a
  fifth), then ``medjax predict`` on ``--luna_test`` scans it never saw (seed 1) and
  ``medjax score`` of the written ``detections.csv`` against their ``annotations.csv``:
  LUNA16's FROC (sensitivity at 1/8 ... 8 false positives per scan) and CPM; once as trained
  and once with test-time mirroring over the three axes (``--mirror_axes 0,1,2``).

Each training runs ``medjax train`` in a subprocess (its wall time is the run's
``run_info.wall_time_s``, compilation included); ``--reuse`` scores an existing workdir.

  python benchmarks/detection.py [--cases quickstart,luna_cpu] [--root DIR] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from results_table import print_table, write_results  # benchmarks/ is on sys.path when run

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RATES = ('0.125', '0.25', '0.5', '1', '2', '4', '8')


def train(config: str, workdir: str, overrides, reuse: bool) -> dict:
  results = os.path.join(workdir, 'results.json')
  if not (reuse and os.path.isfile(results)):
    subprocess.run([sys.executable, '-m', 'medjax.cli', 'train', '--config', config,
                    '--workdir', workdir, '--config.train.progress_bar=False', *overrides],
                   check=True, cwd=REPO)
  with open(results) as f:
    return json.load(f)


def row(case: str, results: dict, scores: dict, split: str) -> dict:
  out = {'case': case, 'split': split,
         'train_minutes': results['run_info']['wall_time_s'] / 60,
         'selected_step': results['selected_step']}
  for key in ('map', 'ap_0.1', 'ap_0.5', 'cpm') + tuple(f'sensitivity_at_{r}' for r in RATES):
    if key in scores:
      out[key] = scores[key]
  return out


def quickstart(root: str, reuse: bool) -> list:
  results = train('configs/detection_quickstart.py', os.path.join(root, 'quickstart'), [],
                  reuse)
  return [row('quickstart', results, results['val'], 'val (40 images)')]


def luna_cpu(root: str, reuse: bool, num_train: int, num_test: int) -> list:
  from medjax.data import synthetic_luna
  train_data, test_data = os.path.join(root, 'luna_train'), os.path.join(root, 'luna_test')
  for path, n, seed in ((train_data, num_train, 0), (test_data, num_test, 1)):
    if not os.path.isdir(os.path.join(path, 'imagesTr')):
      synthetic_luna.write_luna_dataset(path, num_cases=n, seed=seed)
  workdir = os.path.join(root, 'luna_cpu')
  results = train('configs/detection_luna.py:cpu', workdir,
                  [f'--config.data.root={train_data}'], reuse)
  rows = [row('luna_cpu', results, results['val'], 'val (fold 0)')]
  for mirror in ('', '0,1,2'):
    out = os.path.join(root, 'luna_cpu_test' + (f"_mirror{mirror.replace(',', '')}"
                                                 if mirror else ''))
    start = time.time()
    subprocess.run([sys.executable, '-m', 'medjax.cli', 'predict', '--workdir', workdir,
                    '--input', os.path.join(test_data, 'imagesTr'), '--output', out]
                   + (['--mirror_axes', mirror] if mirror else []), check=True, cwd=REPO)
    predict_s = time.time() - start
    subprocess.run([sys.executable, '-m', 'medjax.cli', 'score', '--detections',
                    os.path.join(out, 'detections.csv'), '--annotations',
                    os.path.join(test_data, 'annotations.csv'), '--out', out],
                   check=True, cwd=REPO)
    with open(os.path.join(out, 'froc.json')) as f:
      test = json.load(f)
    held_out = row('luna_cpu', results, test, f'held-out ({num_test} scans, seed 1)'
                   + (f', mirrored {mirror}' if mirror else ''))
    held_out['predict_s_per_scan'] = predict_s / num_test
    rows.append(held_out)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cases', default='quickstart,luna_cpu')
  parser.add_argument('--root', default='/tmp/medjax_detection_bench')
  parser.add_argument('--reuse', action='store_true', help='score existing workdirs')
  parser.add_argument('--luna_train', type=int, default=48)
  parser.add_argument('--luna_test', type=int, default=20)
  parser.add_argument('--output', default=os.path.join(HERE, 'results', 'detection.json'))
  args = parser.parse_args()
  rows = []
  for case in args.cases.split(','):
    if case == 'quickstart':
      rows += quickstart(args.root, args.reuse)
    elif case == 'luna_cpu':
      rows += luna_cpu(args.root, args.reuse, args.luna_train, args.luna_test)
    else:
      raise SystemExit(f'unknown case {case!r}')
  print_table(rows, [('case', 'case', ''), ('split', 'scored on', ''),
                     ('train_minutes', 'train min', '.1f'), ('map', 'mAP', '.3f'),
                     ('ap_0.1', 'AP@0.1', '.3f'), ('ap_0.5', 'AP@0.5', '.3f'),
                     ('cpm', 'CPM', '.3f')])
  write_results(args.output, rows, command='python benchmarks/detection.py ' +
                ' '.join(sys.argv[1:]), load_average_end=list(os.getloadavg()),
                description='Detection recipes on a CPU: training wall minutes (compilation '
                'included) and scores; luna_cpu is also scored on held-out synthetic scans '
                'with LUNA16\'s FROC from medjax predict + medjax score.')


if __name__ == '__main__':
  main()
