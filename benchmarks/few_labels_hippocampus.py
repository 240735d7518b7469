"""Few labels on MSD Hippocampus: a U-Net trained on N labelled volumes only, a mean teacher
or FixMatch that also learns from the other training volumes' images, self-training (the
labelled-only run pseudo-labels the other training volumes, a student trains on all), and all
labels, on fold 0.

  python benchmarks/few_labels_hippocampus.py --counts 10,20 --runs /tmp/few_labels
  python benchmarks/few_labels_hippocampus.py --protocol recipe --num_epochs 80 \
      --methods mean_teacher --runs /tmp/few_labels     # the CPU recipe, 4000 steps
  python benchmarks/few_labels_hippocampus.py --protocol recipe --num_epochs 80 \
      --methods fixmatch --unlabeled_ratio 2 --tag _r2 --runs /tmp/few_labels

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
benchmarks/results/few_labels_hippocampus[_recipe].json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_table import print_table, share_of_gap, write_results  # noqa: E402

from medjax import config as config_lib, train as train_lib  # noqa: E402

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


def row(count, method: str, results: dict) -> dict:
  val = results['val']
  return {'labelled_volumes': count, 'method': LABELS[method],
          'dice_anterior': val['dice_Anterior'], 'dice_posterior': val['dice_Posterior'],
          'dice': val['dice'], 'hd95_anterior_mm': val['hd95_Anterior'],
          'hd95_posterior_mm': val['hd95_Posterior'],
          'train_minutes': results['run_info']['wall_time_s'] / 60}


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
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  suffix = '' if args.protocol == 'short' else '_' + args.protocol
  out = args.out or os.path.join(REPO, 'benchmarks', 'results',
                                 f'few_labels_hippocampus{suffix}.json')
  methods = args.methods.split(',')
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

  rows = []
  for count in counts:
    labelled = [*common, f'data.labeled_count={count}']
    teacher = os.path.join(root, f'n{count}', 'none')
    rows.append(row(count, 'none', run(teacher, labelled)))
    method_overrides = {
        'mean_teacher': ['semi.method=mean_teacher',
                         f'semi.unlabeled_ratio={args.unlabeled_ratio}'],
        'fixmatch': ['semi.method=fixmatch', f'semi.unlabeled_ratio={args.unlabeled_ratio}'],
        'self_training': ['semi.method=self_training', f'semi.teacher={teacher}']}
    extra = [o for o in args.extra.split(';') if o]
    for method in methods:
      result = run(os.path.join(root, f'n{count}', method + args.tag),
                   [*labelled, *method_overrides[method], *extra])
      rows.append(dict(row(count, method, result), settings=';'.join(extra)))
  everything = row('all', 'all', run(os.path.join(root, 'all'), common))
  rows.append(everything)
  # Share of the labelled-only -> all-labels gap (mean foreground Dice) the method recovers.
  for r in rows:
    r['dice_gap_recovered'] = ''
    if r['method'] not in (LABELS['none'], LABELS['all']):
      base = next(b for b in rows if b['labelled_volumes'] == r['labelled_volumes']
                  and b['method'] == LABELS['none'])
      share = share_of_gap(r['dice'], base['dice'], everything['dice'])
      r['dice_gap_recovered'] = float('nan') if share is None else share

  print(f'\nHippocampus fold 0 (40 validation volumes), {CONFIG}, protocol {args.protocol}, '
        f'{steps} steps per run')
  print_table(rows, [('labelled_volumes', 'labelled', ''), ('method', 'method', ''),
                     ('dice_anterior', 'Dice ant', '.4f'), ('dice_posterior', 'Dice post', '.4f'),
                     ('hd95_anterior_mm', 'HD95 ant mm', '.2f'),
                     ('hd95_posterior_mm', 'HD95 post mm', '.2f'),
                     ('dice_gap_recovered', 'gap recovered', '.0%'),
                     ('train_minutes', 'minutes', '.1f')])
  write_results(out, rows, config=CONFIG, protocol=args.protocol, overrides=common,
                num_epochs=args.num_epochs,
                unlabeled_ratio=args.unlabeled_ratio)


if __name__ == '__main__':
  main()
