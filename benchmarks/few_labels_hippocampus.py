"""Few labels on MSD Hippocampus: a U-Net trained on N labelled volumes only, a mean teacher
or FixMatch that also learns from the other training volumes' images, self-training (the
labelled-only run pseudo-labels the other training volumes, a student trains on all), and all
labels, on fold 0.

  python benchmarks/few_labels_hippocampus.py --counts 10,20 --runs /tmp/few_labels
  python benchmarks/few_labels_hippocampus.py --protocol recipe --num_epochs 80 \
      --methods mean_teacher --runs /tmp/few_labels     # the CPU recipe, 4000 steps
  python benchmarks/few_labels_hippocampus.py --protocol recipe --num_epochs 80 \
      --methods fixmatch --unlabeled_ratio 2 --tag _r2 --runs /tmp/few_labels
  python benchmarks/few_labels_hippocampus.py --protocol recipe --num_epochs 80 \
      --methods fixmatch --unlabeled_ratio 2 --tag _r2 --seeds 0,1,2 --runs /tmp/few_labels

Two protocols on configs/hippocampus_unet3d.py:cpu; every run of a table trains the same
number of steps (``--num_epochs`` x 50):
- ``short`` (default; ``--num_epochs`` 20 = 1000 steps, so the five runs fit an afternoon on 2
  CPU cores): plain 2D sagittal slices, no warm-up, the checkpoint chosen on validation Dice
  every 10 epochs, no test-time mirroring (the ':cpu' recipe before issue 10 redefined it).
- ``recipe``: the ':cpu' recipe as it is (2.5D slices with two neighbours on each side, warm-up,
  the last checkpoint scored, test-time mirroring), on coronal slices (axis 1, 40x40 patches:
  its fastest and best single axis), so the labelled-only runs are trained to a plateau
  rather than stopped early.
The labelled volumes are a seeded choice among fold 0's 160 training cases
(``data.labeled_count``); the mean teacher and FixMatch (``--methods fixmatch``) see
``semi.unlabeled_ratio`` unlabelled slices per labelled one in every step. Validation: fold
0's 40 held-out volumes, whole, on their original grid. Finished runs (a results.json) are
reused. Prints Dice / HD95 per class and the share of the gap between labelled-only and all
labels that each method recovers, and writes
benchmarks/results/few_labels_hippocampus[_recipe].json. With ``--seeds 0,1,2`` every run is
repeated per seed (``config.seed``: another labelled subset, initialisation and data order;
seed K > 0 in folders ending ``_seedK``), the table adds mean +- sd rows, and the gap share of
the means comes with a 95 % interval from resampling the seeds (a seed's labelled-only, method
and all-labels runs kept together); written to ..._seeds.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_table import (print_table, share_of_gap, share_of_gap_interval,  # noqa: E402
                           write_results)

from medjax import config as config_lib, metrics, train as train_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'hippocampus_unet3d.py') + ':cpu'
LABELS = {'none': 'labelled only', 'mean_teacher': 'mean teacher', 'fixmatch': 'FixMatch',
          'self_training': 'self-training', 'all': 'all labels'}


def run(workdir: str, overrides) -> dict:
  """results.json of a run (trained unless it already finished)."""
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    config = config_lib.load_config_file(CONFIG)
    config_lib.apply_overrides(config, ['train.progress_bar=False', *overrides])
    train_lib.train_and_evaluate(config, workdir)
  with open(path) as f:
    return json.load(f)


def row(count, method: str, results: dict, seed: int = 0) -> dict:
  val = results['val']
  return {'labelled_volumes': count, 'seed': seed, 'method': LABELS[method],
          'dice_anterior': val['dice_Anterior'], 'dice_posterior': val['dice_Posterior'],
          'dice': val['dice'], 'hd95_anterior_mm': val['hd95_Anterior'],
          'hd95_posterior_mm': val['hd95_Posterior'],
          'train_minutes': results['run_info']['wall_time_s'] / 60}


def folder(name: str, seed: int) -> str:
  """A run's folder name; seed 0 keeps the name earlier single-seed tables used, so their
  runs are reused."""
  return name if seed == 0 else f'{name}_seed{seed}'


def same_seed_row(rows, r: dict, method: str) -> dict:
  """The row of ``method`` with ``r``'s labelled count and seed."""
  return next(b for b in rows if b['labelled_volumes'] == r['labelled_volumes']
              and b['seed'] == r['seed'] and b['method'] == method)


def seed_means(rows) -> list:
  """Mean +- sd over seeds of each (labelled count, method, settings) group, with the gap
  share of the means and its seed-bootstrap 95 % interval (each seed's labelled-only, method
  and all-labels runs resampled together: they share its labelled subset)."""
  keys = ('dice_anterior', 'dice_posterior', 'dice', 'hd95_anterior_mm', 'hd95_posterior_mm',
          'train_minutes')
  groups = {}
  for r in rows:
    groups.setdefault((r['labelled_volumes'], r['method'], r.get('settings', '')), []).append(r)
  everything = {r['seed']: r for r in groups[('all', LABELS['all'], '')]}
  means = []
  for (count, method, settings), group in groups.items():
    mean = {'labelled_volumes': count, 'seed': 'mean', 'method': method, 'settings': settings,
            'seeds': [r['seed'] for r in group]}
    for key in keys:
      mean[key], mean[key + '_sd'] = metrics.mean_sd([r[key] for r in group])
    mean['dice_gap_recovered'] = ''
    if method not in (LABELS['none'], LABELS['all']):
      bases = [same_seed_row(rows, r, LABELS['none'])['dice'] for r in group]
      ceilings = [everything[r['seed']]['dice'] for r in group]
      values = [r['dice'] for r in group]
      share = share_of_gap(np.mean(values), np.mean(bases), np.mean(ceilings))
      mean['dice_gap_recovered'] = float('nan') if share is None else share
      mean['dice_gap_recovered_ci95'] = share_of_gap_interval(values, bases, ceilings)
    means.append(mean)
  return means


def gap_interval_text(interval) -> str:
  return '' if interval is None else f'{interval[0]:.0%} to {interval[1]:.0%}'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--counts', default='10,20')
  parser.add_argument('--protocol', choices=('short', 'recipe'), default='short')
  parser.add_argument('--num_epochs', type=int, default=20)
  parser.add_argument('--unlabeled_ratio', type=int, default=1)
  parser.add_argument('--runs', default='/tmp/medjax_few_labels')
  parser.add_argument('--methods', default='mean_teacher,self_training')
  parser.add_argument('--extra', default='',
                      help="';'-separated KEY=VALUE overrides for the methods' runs (not the "
                      "labelled-only and all-labels references), e.g. 'semi.threshold=0.9'")
  parser.add_argument('--tag', default='',
                      help='suffix of the methods\' run folders, so variants do not reuse '
                      'each other\'s runs')
  parser.add_argument('--seeds', default='0',
                      help="e.g. '0,1,2': every run once per seed, with mean +- sd rows")
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  suffix = '' if args.protocol == 'short' else '_' + args.protocol
  methods = args.methods.split(',')
  seeds = [int(k) for k in args.seeds.split(',')]
  counts = [int(c) for c in args.counts.split(',')]
  root = os.path.join(args.runs, f'hippocampus{suffix}_e{args.num_epochs}')
  if args.protocol == 'short':
    # The settings the short table was measured with (the ':cpu' recipe before issue 10
    # redefined it): plain 2D slices, no warm-up, selection on validation Dice every 10
    # epochs, no test-time mirroring.
    common = [f'train.num_epochs={args.num_epochs}', 'optimizer.warmup_epochs=0',
              'train.eval_every_epochs=10', 'train.selection_mode=max',
              'inference.mirror_axes=()', 'data.slice_context=0']
  else:
    common = [f'train.num_epochs={args.num_epochs}', 'data.slice_axis=1',
              'data.patch_size=(40,40)']
  steps = args.num_epochs * config_lib.load_config_file(CONFIG).train.steps_per_epoch

  extra = [o for o in args.extra.split(';') if o]
  method_overrides = {
      'mean_teacher': ['semi.method=mean_teacher',
                       f'semi.unlabeled_ratio={args.unlabeled_ratio}'],
      'fixmatch': ['semi.method=fixmatch', f'semi.unlabeled_ratio={args.unlabeled_ratio}']}
  rows, everything = [], {}
  for seed in seeds:
    seeded = [*common, f'seed={seed}']
    for count in counts:
      labelled = [*seeded, f'data.labeled_count={count}']
      teacher = os.path.join(root, f'n{count}', folder('none', seed))
      rows.append(row(count, 'none', run(teacher, labelled), seed))
      overrides = {**method_overrides,
                   'self_training': ['semi.method=self_training', f'semi.teacher={teacher}']}
      for method in methods:
        result = run(os.path.join(root, f'n{count}', folder(method + args.tag, seed)),
                     [*labelled, *overrides[method], *extra])
        rows.append(dict(row(count, method, result, seed), settings=';'.join(extra)))
    everything[seed] = row('all', 'all', run(os.path.join(root, folder('all', seed)), seeded), seed)
    rows.append(everything[seed])
  # Share of the labelled-only -> all-labels gap (mean foreground Dice) the method recovers,
  # against the same seed's runs.
  for r in rows:
    r['dice_gap_recovered'] = ''
    if r['method'] not in (LABELS['none'], LABELS['all']):
      base = same_seed_row(rows, r, LABELS['none'])
      share = share_of_gap(r['dice'], base['dice'], everything[r['seed']]['dice'])
      r['dice_gap_recovered'] = float('nan') if share is None else share
  if len(seeds) > 1:
    rows += seed_means(rows)

  print(f'\nHippocampus fold 0 (40 validation volumes), {CONFIG}, protocol {args.protocol}, '
        f'{steps} steps per run')
  printed = [dict(r, dice_sd=r.get('dice_sd', ''),
                  dice_gap_ci95=gap_interval_text(r.get('dice_gap_recovered_ci95')))
             for r in rows]
  print_table(printed, [('labelled_volumes', 'labelled', ''), ('seed', 'seed', ''),
                        ('method', 'method', ''),
                        ('dice_anterior', 'Dice ant', '.4f'),
                        ('dice_posterior', 'Dice post', '.4f'),
                        ('dice', 'Dice', '.4f'), ('dice_sd', 'sd', '.4f'),
                        ('hd95_anterior_mm', 'HD95 ant mm', '.2f'),
                        ('hd95_posterior_mm', 'HD95 post mm', '.2f'),
                        ('dice_gap_recovered', 'gap recovered', '.0%'),
                        ('dice_gap_ci95', '95 % (seeds)', ''),
                        ('train_minutes', 'minutes', '.1f')])
  out = args.out or os.path.join(
      REPO, 'benchmarks', 'results',
      f"few_labels_hippocampus{suffix}{'_seeds' if len(seeds) > 1 else ''}.json")
  write_results(out, rows, seeds=seeds, config=CONFIG, protocol=args.protocol, overrides=common,
                num_epochs=args.num_epochs,
                unlabeled_ratio=args.unlabeled_ratio)


if __name__ == '__main__':
  main()
