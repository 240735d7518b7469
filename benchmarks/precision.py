"""float32 against bfloat16 (``train.precision``): the same recipe trained in both, in one run,
with its metrics and training throughput side by side.

Cases: the quickstart (``configs/quickstart.py``: simple CNN, embedded synthetic lesions, test
AUC) and a short Hippocampus run (``configs/hippocampus_unet3d.py:cpu``, the 2.5D U-Net on
axis-0 slices, cut to ``--hippo_epochs`` epochs of 50 steps; validation Dice on the 40 fold-0
validation volumes; needs ../shared/data). On a CPU bfloat16 is slower (measured 0.74-0.82x);
the point here is that the metrics hold; the speed that bfloat16 buys is measured on a GPU or
TPU by ``benchmarks/accelerator.py``.

  python benchmarks/precision.py                        # ~25 min on 2 cores
  python benchmarks/precision.py --cases quickstart     # ~5 min
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from medjax import config as config_lib, train as train_lib  # noqa: E402
from results_table import print_table, write_results  # noqa: E402

COLUMNS = [('case', 'case', 's'), ('precision', 'precision', 's'), ('metric', 'metric', 's'),
           ('value', 'value', '.4f'), ('images_per_sec', 'train img/s', '.1f'),
           ('wall_s', 'wall s', '.0f'), ('speed_vs_float32', 'x float32 speed', '.2f'),
           ('delta_vs_float32', 'metric - float32', '+.4f')]


def _config(case: str, precision: str, hippo_epochs: int):
  if case == 'quickstart':
    config = config_lib.load_config_file('configs/quickstart.py')
    metric = ('test', 'auc')
  else:
    config = config_lib.load_config_file('configs/hippocampus_unet3d.py:cpu')
    config.train.update(num_epochs=hippo_epochs, eval_every_epochs=hippo_epochs)
    metric = ('val', 'dice')
  config.train.update(precision=precision, progress_bar=False)
  return config, metric


def _train_rate(workdir: str) -> float:
  """Mean training images/s over the logged intervals after the first (compilation)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rates = [r['images_per_sec'] for r in map(json.loads, f)
             if r['split'] == 'train' and 'images_per_sec' in r]
  rates = rates[1:] or rates
  return sum(rates) / len(rates)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cases', nargs='*', default=['quickstart', 'hippocampus'],
                      choices=['quickstart', 'hippocampus'])
  parser.add_argument('--hippo_epochs', type=int, default=20)
  parser.add_argument('--out', default=os.path.join(HERE, 'results', 'precision.json'))
  args = parser.parse_args()
  rows = []
  for case in args.cases:
    for precision in ('float32', 'bfloat16'):
      config, (split, metric) = _config(case, precision, args.hippo_epochs)
      with tempfile.TemporaryDirectory() as workdir:
        start = time.time()
        results = train_lib.train_and_evaluate(config, workdir)
        row = dict(case=case, precision=precision, metric=f'{split} {metric}',
                   value=results[split][metric], wall_s=time.time() - start,
                   images_per_sec=_train_rate(workdir), split_metrics=results[split])
      rows.append(row)
      if precision != 'float32':
        base = rows[-2]
        row['speed_vs_float32'] = row['images_per_sec'] / base['images_per_sec']
        row['delta_vs_float32'] = row['value'] - base['value']
      print(json.dumps({k: row.get(k) for k, _, _ in COLUMNS}), flush=True)
  print_table(rows, COLUMNS)
  load = ', '.join(f'{v:.1f}' for v in os.getloadavg())
  write_results(args.out, rows, command=' '.join(['python benchmarks/precision.py'] + sys.argv[1:]),
                note=f'float32 and bfloat16 trained one after the other; load average at the '
                     f'end {load} (1, 5, 15 min)')


if __name__ == '__main__':
  main()
