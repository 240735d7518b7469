"""``medjax benchmark medmnist``: a recipe over N seeds, one table next to the published figures.

  medjax benchmark medmnist --datasets breastmnist,pneumoniamnist --seeds 0,1,2 \
      --workdir runs/medmnist_benchmark [--variant cpu | --recipe FILE.py] [--set KEY=VALUE]

For each dataset and seed it trains ``configs/<dataset>.py`` (the paper recipe), its variant
``configs/<dataset>.py:<variant>`` (``cpu``: the dataset's own small-CNN recipe, minutes per
run), or ``--recipe`` (one config file whose ``data.flag`` is replaced by each dataset) into
``WORKDIR/<dataset>/<recipe>/seed_<K>`` (``<recipe>``: ``paper``, the variant, or the file's
name),
a normal workdir (``evaluate``, ``report``, ``compare`` read it; a finished one is not
trained again, an interrupted one resumes). It prints one table, test AUC and ACC as mean
± sample sd over the seeds and of the seed ensemble (the mean of the seeds' test
probabilities) beside the published 28 px figures, and writes it as
``WORKDIR/benchmark.md`` and ``WORKDIR/benchmark.json``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

from medjax import config as config_lib, workdir as workdir_lib
from medjax.metrics import mean_sd

# Test AUC / ACC at 28 px from the papers (ResNet-18 trained end to end).
PUBLISHED: Dict[str, Dict[str, tuple]] = {
    # MedMNIST v2 (Yang et al., Scientific Data 2023), Table: ResNet-18 (28).
    'MedMNIST v2 ResNet-18 (28)': {'breastmnist': (0.901, 0.863),
                                   'pneumoniamnist': (0.944, 0.854)},
    # MedMNIST+ (Doerrich et al. 2024): ResNet-18, end-to-end training, 28 x 28.
    'MedMNIST+ ResNet-18 (28)': {'breastmnist': (0.876, 0.840),
                                 'pneumoniamnist': (0.950, 0.831)},
    # Best figure of any MedMNIST v2 baseline (AUC and ACC may come from different methods;
    # PneumoniaMNIST's from AutoML). AdrenalMNIST3D: the best 3D baseline.
    'best published (v2)': {'breastmnist': (0.919, 0.863), 'pneumoniamnist': (0.991, 0.946),
                            'adrenalmnist3d': (0.839, 0.802)},
}


def recipe_config(dataset: str, recipe: str = '', settings: Sequence[str] = (),
                  variant: str = ''):
  """The config of one dataset: ``configs/<dataset>.py[:variant]`` or ``recipe`` (a config file,
  its ``data.flag`` set to ``dataset``), then ``settings`` (``KEY=VALUE``)."""
  if recipe and variant:
    raise ValueError('give --recipe (one file for every dataset) or --variant (each dataset\'s '
                     'own configs/<dataset>.py:<variant>), not both')
  if recipe:
    config = config_lib.load_config_file(recipe)
    config_lib.apply_overrides(config, [f'data.flag={dataset}'])
    if config.data.path.endswith('.npz'):  # a file of another dataset: use its folder
      config_lib.apply_overrides(config, [f'data.path={os.path.dirname(config.data.path)}'])
  else:
    path = os.path.join(_configs_dir(), f'{dataset}.py')
    config = config_lib.load_config_file(f'{path}:{variant}' if variant else path)
  config_lib.apply_overrides(config, list(settings))
  return config


def _configs_dir() -> str:
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def _recipe_name(recipe: str, variant: str = '') -> str:
  if variant:
    return variant
  if not recipe:
    return 'paper'
  return os.path.basename(recipe).replace('.py', '').replace(':', '_')


def run_medmnist(datasets: Sequence[str], seeds: Sequence[int], workdir: str,
                 recipe: str = '', settings: Sequence[str] = (), variant: str = ''
                 ) -> List[Dict]:
  """Trains every (dataset, seed) not finished yet; returns one table row per dataset, or
  None when a run stopped early (SIGTERM or ``train.stop_after_steps``: the same command
  resumes it)."""
  from medjax import train as train_lib
  rows = []
  name = _recipe_name(recipe, variant)
  for dataset in datasets:
    runs, run_dirs = [], []
    for seed in seeds:
      config = recipe_config(dataset, recipe, [*settings, f'seed={seed}'], variant)
      run_dir = os.path.join(workdir, dataset, name, f'seed_{seed}')
      run_dirs.append(run_dir)
      results_path = os.path.join(run_dir, 'results.json')
      if not os.path.exists(results_path):
        print(f'== {dataset}, seed {seed}: {run_dir}', flush=True)
        if 'stopped_at_step' in train_lib.train_and_evaluate(config, run_dir):
          return None
      with open(results_path) as f:
        runs.append(json.load(f))
    row = summarize(dataset, name, runs)
    if len(seeds) > 1:  # the seeds' mean probability on the test split, scored as one model
      from medjax.experiments.classification import ensemble_predictions
      ensemble, _ = ensemble_predictions(run_dirs, 'test', runs[0]['task'])
      row.update(ensemble_auc=ensemble['auc'], ensemble_acc=ensemble['accuracy'])
    rows.append(row)
  return rows


def summarize(dataset: str, recipe: str, runs: Sequence[Dict]) -> Dict:
  """Mean and sample sd (n-1) over seeds of test AUC and ACC, and the time per run."""
  auc = mean_sd([r['test']['auc'] for r in runs])
  acc = mean_sd([r['test']['accuracy'] for r in runs])
  hours = [r.get('run_info', {}).get('wall_time_s', math.nan) / 60 for r in runs]
  return {'dataset': dataset, 'recipe': recipe, 'seeds': [r['seed'] for r in runs],
          'test_auc_mean': auc[0], 'test_auc_sd': auc[1],
          'test_acc_mean': acc[0], 'test_acc_sd': acc[1],
          'minutes_per_run': sum(hours) / len(hours)}


def _pm(mean: float, sd: float) -> str:
  return f'{mean:.3f} ± {sd:.3f}' if math.isfinite(sd) else f'{mean:.3f}'


def format_table(rows: Sequence[Dict]) -> str:
  """Markdown: ours (mean ± sd, n seeds; the seed ensemble's AUC / ACC) then each published
  reference, AUC / ACC."""
  header = ['dataset', 'recipe', 'seeds', 'test AUC', 'test ACC', 'seed ensemble', 'min/run',
            *PUBLISHED]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in rows:
    published = []
    for figures in PUBLISHED.values():
      value = figures.get(r['dataset'])
      published.append(f'{value[0]:.3f} / {value[1]:.3f}' if value else '—')
    cells = [r['dataset'], r['recipe'], str(len(r['seeds'])),
             _pm(r['test_auc_mean'], r['test_auc_sd']), _pm(r['test_acc_mean'], r['test_acc_sd']),
             (f"{r['ensemble_auc']:.3f} / {r['ensemble_acc']:.3f}" if 'ensemble_auc' in r
              else '—'), f"{r['minutes_per_run']:.1f}", *published]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def write_table(rows: Sequence[Dict], workdir: str) -> str:
  table = format_table(rows)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'benchmark.md'), 'w') as f:
    f.write(table + '\n')
  workdir_lib.write_json(os.path.join(workdir, 'benchmark.json'),
                         {'rows': list(rows), 'published': PUBLISHED})
  return table


def main_medmnist(datasets: str, seeds: str, workdir: str, recipe: str = '',
                  settings: Optional[Sequence[str]] = None, variant: str = '') -> str:
  names = [d.strip().lower() for d in datasets.split(',') if d.strip()]
  seed_list = [int(s) for s in seeds.split(',') if s.strip()]
  if not names or not seed_list:
    raise ValueError('--datasets and --seeds must each name at least one')
  rows = run_medmnist(names, seed_list, workdir, recipe, settings or (), variant)
  if rows is None:
    return 'A run stopped before the table was complete; run the same command to go on.'
  return write_table(rows, workdir)
