"""Few labels on MedMNIST: supervised on the labelled part, self-training, FixMatch, MixMatch
and all labels, at several label fractions, each as a group of seeds in one program.

  python benchmarks/few_labels.py --dataset breastmnist --fractions 0.05,0.1,0.25 \\
      --seeds 0,1,2 --runs /tmp/few_labels

Recipe: configs/few_labels.py:<dataset> (every run the same number of steps; FixMatch with
its threshold of 0.8, MixMatch with weight 75 and one unlabelled image per labelled one:
METHOD_OVERRIDES). Self-training's
teacher is the labelled-only run of the same fraction and seed. ``simclr`` and
``simclr_fixmatch`` fine-tune (labelled only / FixMatch) from a SimCLR pretraining run on
every training image (task 'contrastive', PRETRAIN_OVERRIDES) with a fresh head. Finished runs (a
summary.json) are reused, so an interrupted benchmark continues where it stopped. Prints a
table of test AUC / accuracy (mean +- sd over seeds) and the share of the gap between
labelled-only and all labels that each method recovers (with a 95 % interval from resampling
the seeds, each seed's runs together: they share its labelled subset), and writes
benchmarks/results/few_labels_<dataset>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_table import share_of_gap, share_of_gap_interval, write_results  # noqa: E402

from medjax import config as config_lib, train as train_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ('none', 'self_training', 'fixmatch', 'mixmatch', 'simclr', 'simclr_fixmatch')
# FixMatch's confidence threshold in this recipe (configs/few_labels.py's docstring); self-
# training keeps the recipe's 0.95. MixMatch: the paper's equal labelled and unlabelled
# batches and its CIFAR-10 weight 75 (chosen on BreastMNIST 10 % by validation AUC,
# benchmarks/results/few_labels_breastmnist_mixmatch.json).
METHOD_OVERRIDES = {'fixmatch': ['semi.threshold=0.8'],
                    'mixmatch': ['semi.unlabeled_ratio=1', 'semi.weight=75'],
                    'simclr': ['semi.method=none'],
                    'simclr_fixmatch': ['semi.method=fixmatch', 'semi.threshold=0.8']}
# SimCLR pretraining on every training image (task 'contrastive'), one run per fraction and
# seed (its kNN evaluation reads that seed's labelled subset); the simclr* methods fine-tune
# from it with a fresh head (the recipe's simple_cnn calls its head Dense_1).
PRETRAIN_OVERRIDES = ['task=contrastive', 'train.batch_size=128', 'train.num_epochs=100']
FRESH_HEAD = "train.init_from_skip=('Dense_1/',)"
LABELS = {'none': 'labelled only', 'self_training': 'self-training', 'fixmatch': 'FixMatch',
          'mixmatch': 'MixMatch',
          'simclr': 'SimCLR + labels', 'simclr_fixmatch': 'SimCLR + FixMatch',
          'all': 'all labels'}


def run(dataset: str, workdir: str, seeds, overrides) -> dict:
  """summary.json of a seed group (trained unless it already finished), plus wall time."""
  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    config = config_lib.load_config_file(os.path.join(REPO, 'configs', 'few_labels.py') +
                                         f':{dataset}')
    config_lib.apply_overrides(config, [f'train.seeds={tuple(seeds)}',
                                        'train.progress_bar=False', *overrides])
    start = time.time()
    train_lib.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, 'wall_time_s.txt'), 'w') as f:
      f.write(f'{time.time() - start:.1f}\n')
  with open(path) as f:
    summary = json.load(f)
  with open(os.path.join(workdir, 'wall_time_s.txt')) as f:
    summary['wall_time_s'] = float(f.read())
  return summary


def cell(summary: dict, metric: str) -> dict:
  entry = summary['splits']['test'][metric]
  return {'mean': entry['mean'], 'sd': entry['sd'], 'per_seed': entry['per_seed']}


def mean_sd_text(entry: dict) -> str:
  """'mean ± sd', or the mean alone for one seed (its sd is undefined)."""
  if math.isnan(entry['sd']):
    return f"{entry['mean']:.3f}"
  return f"{entry['mean']:.3f} ± {entry['sd']:.3f}"


def gap_text(row: dict, recovered) -> str:
  """The share of the gap recovered, with its seed-bootstrap 95 % interval."""
  if row['method'] in ('none', 'all'):
    return ''
  if recovered is None:
    return 'no gap'
  interval = row.get('auc_gap_recovered_ci95')
  return f'{recovered:.0%}' + ('' if interval is None else
                               f' [{interval[0]:.0%}, {interval[1]:.0%}]')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dataset', default='breastmnist')
  parser.add_argument('--fractions', default='0.05,0.1,0.25')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--methods', default=','.join(METHODS))
  parser.add_argument('--runs', default='/tmp/medjax_few_labels')
  parser.add_argument('--extra', default='', help='more config overrides, ";"-separated')
  parser.add_argument('--out', default='', help='results JSON (default '
                      'benchmarks/results/few_labels_<dataset>.json)')
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  fractions = [float(f) for f in args.fractions.split(',')]
  methods = args.methods.split(',')
  extra = [o for o in args.extra.split(';') if o]
  root = os.path.join(args.runs, args.dataset)

  rows = []
  reference = run(args.dataset, os.path.join(root, 'all'), seeds, extra)
  all_auc, all_acc = cell(reference, 'auc'), cell(reference, 'accuracy')
  rows.append({'fraction': 1.0, 'method': 'all', 'auc': all_auc, 'accuracy': all_acc,
               'wall_time_s': reference['wall_time_s']})
  for fraction in fractions:
    base_dir = os.path.join(root, f'{fraction:g}', 'none')
    for method in methods:
      workdir = os.path.join(root, f'{fraction:g}', method)
      labeled = f'data.labeled_fraction={fraction}'
      overrides = [labeled, f'semi.method={method}', *METHOD_OVERRIDES.get(method, []), *extra]
      if method == 'self_training':
        run(args.dataset, base_dir, seeds, [labeled, *extra])
        overrides.append(f'semi.teacher={base_dir}')
      pretrained = None
      if method.startswith('simclr'):
        pretrain_dir = os.path.join(root, f'{fraction:g}', 'simclr_pretraining')
        pretrained = run(args.dataset, pretrain_dir, seeds,
                         [labeled, *PRETRAIN_OVERRIDES, *extra])
        overrides = [labeled, *METHOD_OVERRIDES[method], f'train.init_from={pretrain_dir}',
                     FRESH_HEAD, *extra]
      summary = run(args.dataset, workdir, seeds, overrides)
      rows.append({'fraction': fraction, 'method': method, 'auc': cell(summary, 'auc'),
                   'accuracy': cell(summary, 'accuracy'),
                   'wall_time_s': summary['wall_time_s']})
      if pretrained is not None:
        rows[-1]['pretraining'] = {'knn_auc': cell(pretrained, 'auc'),
                                   'wall_time_s': pretrained['wall_time_s']}
  # Share of the labelled-only -> all-labels gap each method recovers (test AUC means).
  for row in rows:
    base = next((r for r in rows if r['fraction'] == row['fraction'] and r['method'] == 'none'),
                None)
    if base is not None and row['method'] not in ('none', 'all'):
      row['auc_gap_recovered'] = share_of_gap(row['auc']['mean'], base['auc']['mean'],
                                              all_auc['mean'])
      interval = share_of_gap_interval(row['auc']['per_seed'], base['auc']['per_seed'],
                                       all_auc['per_seed'])
      row['auc_gap_recovered_ci95'] = interval

  print(f"\n{args.dataset}: test AUC / ACC, mean ± sd over seeds {seeds} "
        '(configs/few_labels.py)')
  print(f"{'labels':>8} {'method':<18} {'AUC':>17} {'ACC':>17} {'gap recovered [95 %]':>24} "
        f"{'wall s':>8}")
  for row in rows:
    recovered = row.get('auc_gap_recovered')
    print(f"{row['fraction']:>8.0%} {LABELS[row['method']]:<18} "
          f"{mean_sd_text(row['auc']):>17} {mean_sd_text(row['accuracy']):>17} "
          f"{gap_text(row, recovered):>24} {row['wall_time_s']:>8.0f}")
  write_results(args.out or os.path.join(REPO, 'benchmarks', 'results',
                                         f'few_labels_{args.dataset}.json'),
                rows, dataset=args.dataset, seeds=seeds,
                config='configs/few_labels.py:' + args.dataset, extra_overrides=extra)


if __name__ == '__main__':
  main()
