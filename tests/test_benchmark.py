"""``medjax benchmark medmnist``: N seeds per dataset, one table beside the published figures."""

import json
import os

import numpy as np
import pytest

from conftest import fake_medmnist
from medjax import benchmark, cli


def _benchmark_argv(tmp_path, seeds: str, *recipe: str) -> list:
  """``medjax benchmark medmnist`` on a fake BreastMNIST: one short epoch per seed."""
  data = tmp_path / 'data'
  data.mkdir()
  fake_medmnist(data / 'breastmnist.npz', (28, 28), 2)
  return ['benchmark', 'medmnist', '--datasets', 'breastmnist', '--seeds', seeds, '--workdir',
          str(tmp_path / 'bench'), *recipe, '--set', f'data.path={data}', '--set',
          'train.num_epochs=1', '--set', 'data.max_examples=32']


@pytest.mark.slow
def test_benchmark_medmnist_trains_each_seed_once_and_tabulates(tmp_path, capsys):
  out = tmp_path / 'bench'
  argv = _benchmark_argv(tmp_path, '0,1', '--recipe', 'configs/breastmnist.py:runlocal')
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  runs = [json.load(open(out / 'breastmnist' / 'breastmnist_runlocal' / f'seed_{s}' /
                         'results.json')) for s in (0, 1)]
  assert [r['seed'] for r in runs] == [0, 1]
  auc = [r['test']['auc'] for r in runs]
  acc = [r['test']['accuracy'] for r in runs]
  row = json.load(open(out / 'benchmark.json'))['rows'][0]
  assert row['test_auc_mean'] == np.mean(auc) and row['test_auc_sd'] == np.std(auc, ddof=1)
  assert row['test_acc_sd'] == np.std(acc, ddof=1)
  # The seed ensemble: sklearn's AUC of the mean of the two runs' test probabilities.
  from sklearn.metrics import roc_auc_score
  preds = [np.load(out / 'breastmnist' / 'breastmnist_runlocal' / f'seed_{s}' /
                   'predictions_test.npz') for s in (0, 1)]
  mean_scores = (preds[0]['scores'] + preds[1]['scores']) / 2
  labels = preds[0]['labels'].reshape(-1)
  assert row['ensemble_auc'] == pytest.approx(roc_auc_score(labels, mean_scores[:, 1]))
  assert row['ensemble_acc'] == pytest.approx(np.mean((mean_scores[:, 1] > 0.5) == labels))
  line = [x for x in printed.splitlines() if x.startswith('| breastmnist')][0]
  assert f"{row['ensemble_auc']:.3f} / {row['ensemble_acc']:.3f}" in line
  assert f'{np.mean(auc):.3f} ± {np.std(auc, ddof=1):.3f}' in line
  assert '0.901 / 0.863' in line and '0.876 / 0.840' in line and '0.919 / 0.863' in line
  assert open(out / 'benchmark.md').read().strip() in printed
  # Again: finished runs are read, not trained again.
  stamp = os.stat(out / 'breastmnist' / 'breastmnist_runlocal' / 'seed_0' / 'results.json')
  assert cli.main(argv) == 0
  assert os.stat(out / 'breastmnist' / 'breastmnist_runlocal' / 'seed_0' /
                 'results.json').st_mtime_ns == stamp.st_mtime_ns
  assert '== breastmnist' not in capsys.readouterr().out


@pytest.mark.slow
def test_benchmark_variant_trains_each_datasets_own_recipe(tmp_path, capsys):
  out = tmp_path / 'bench'
  argv = _benchmark_argv(tmp_path, '3', '--variant', 'cpu')
  assert cli.main(argv) == 0
  run = out / 'breastmnist' / 'cpu' / 'seed_3'
  config = json.load(open(run / 'config.json'))
  assert (config['seed'], config['model']['name'], config['model']['features']) == (
      3, 'simple_cnn', [32, 64, 128])
  assert '| breastmnist | cpu | 1 |' in capsys.readouterr().out
  # One recipe source per run: --recipe and --variant together are refused.
  assert cli.main([*argv, '--recipe', 'configs/few_labels.py']) == 2
  assert 'give --recipe' in capsys.readouterr().err


def test_published_table_has_no_dataset_without_a_recipe():
  for figures in benchmark.PUBLISHED.values():
    for dataset in figures:
      assert os.path.exists(os.path.join('configs', f'{dataset}.py')), dataset


def test_gap_interval_resamples_seeds_with_their_pairs():
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))
  from results_table import share_of_gap, share_of_gap_interval
  rng = np.random.default_rng(0)
  bases = rng.uniform(0.6, 0.8, 10)
  ceilings = np.full(10, 0.87)
  # Every seed recovers exactly 40 % of its own gap, however far apart the seeds are: the
  # paired resampling gives no spread.
  low, high = share_of_gap_interval(bases + 0.4 * (ceilings - bases), bases, ceilings)
  assert low == pytest.approx(0.4) and high == pytest.approx(0.4)
  values = bases + 0.4 * (ceilings - bases) + rng.normal(0, 0.02, 10)
  low, high = share_of_gap_interval(values, bases, ceilings)
  assert low < share_of_gap(values.mean(), bases.mean(), 0.87) < high and high - low > 0.05
  assert share_of_gap_interval(values[:2], bases[:2], ceilings[:2]) is None


def test_hippocampus_seed_means_pair_each_seeds_runs():
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))
  import few_labels_hippocampus as bench
  rng = np.random.default_rng(1)
  # Each seed's FixMatch run recovers exactly half of its own seed's gap.
  dice = {'labelled only': [0.83, 0.80, 0.81], 'FixMatch': [0.85, 0.83, 0.83],
          'all labels': [0.87, 0.86, 0.85]}
  rows = []
  for seed in range(3):
    for method, values in dice.items():
      count = 'all' if method == 'all labels' else 10
      rows.append({'labelled_volumes': count, 'seed': seed, 'method': method,
                   'dice': values[seed], 'dice_anterior': rng.uniform(),
                   'dice_posterior': rng.uniform(), 'hd95_anterior_mm': rng.uniform(1, 4),
                   'hd95_posterior_mm': rng.uniform(1, 4), 'train_minutes': rng.uniform(10, 40),
                   **({'settings': ''} if method == 'FixMatch' else {})})
  means = {m['method']: m for m in bench.seed_means(rows)}
  assert set(means) == set(dice)
  for method, values in dice.items():
    assert means[method]['dice'] == pytest.approx(np.mean(values))
    assert means[method]['dice_sd'] == pytest.approx(np.std(values, ddof=1))
    assert means[method]['seeds'] == [0, 1, 2]
  ant = [r['hd95_anterior_mm'] for r in rows if r['method'] == 'FixMatch']
  assert means['FixMatch']['hd95_anterior_mm'] == pytest.approx(np.mean(ant))
  # The share of the means, and an interval of zero width: the seeds are resampled with
  # their own labelled-only and all-labels runs (unpaired resampling would spread it).
  assert means['FixMatch']['dice_gap_recovered'] == pytest.approx(0.5)
  low, high = means['FixMatch']['dice_gap_recovered_ci95']
  assert low == pytest.approx(0.5) and high == pytest.approx(0.5)
  assert means['labelled only']['dice_gap_recovered'] == ''


@pytest.mark.slow
def test_a_stopped_run_ends_the_benchmark_cleanly_and_the_same_command_resumes(tmp_path,
                                                                                 capsys):
  argv = _benchmark_argv(tmp_path, '0', '--recipe', 'configs/breastmnist.py:runlocal')
  assert cli.main([*argv, '--set', 'train.stop_after_steps=1']) == 0
  assert 'run the same command to go on' in capsys.readouterr().out
  assert not (tmp_path / 'bench' / 'benchmark.json').exists()
  assert cli.main(argv) == 0
  assert 'Resuming from checkpoint at step 1' in capsys.readouterr().out
  assert (tmp_path / 'bench' / 'benchmark.json').exists()


def _benchmark_script(name: str):
  """A script of benchmarks/ as a module (benchmarks/ is not a package)."""
  import importlib
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))
  return importlib.import_module(name)


def test_a_case_out_of_memory_is_skipped_with_its_reason_and_the_rest_written(tmp_path,
                                                                               monkeypatch):
  """conv_vs_torch --part steps where the 3D ResNet-18 case runs out of memory (XLA's error,
  injected): that case is recorded as skipped with why, the others are measured and written;
  an error that is not about memory still stops the benchmark."""
  pytest.importorskip('torch')
  import jax
  bench = _benchmark_script('conv_vs_torch')
  measured = []

  def fake_step(key, reps):
    if key == 'resnet18_3d_28':
      raise jax.errors.JaxRuntimeError(
          'RESOURCE_EXHAUSTED: Out of memory allocating 32749125632 bytes.')
    measured.append(key)
    return {'case': key, 'batch': 2, 'xla_per_s': 1.0, 'auto_per_s': 2.0, 'torch_per_s': 4.0,
            'auto_vs_xla': 2.0, 'auto_vs_torch': 0.5}

  monkeypatch.setattr(bench, 'bench_step', fake_step)
  out = tmp_path / 'steps.json'
  bench.main(['--part', 'steps', '--cases', 'resnet18_28', 'resnet18_3d_28', 'unet2d_128',
              '--out', str(out)])
  rows = json.load(open(out))['results']
  assert measured == ['resnet18_28', 'unet2d_128']
  assert [r['case'] for r in rows] == ['resnet18_28', 'resnet18_3d_28', 'unet2d_128']
  assert rows[1] == {'case': 'resnet18_3d_28',
                     'skipped': 'out of memory: asked for 30.5 GiB (RESOURCE_EXHAUSTED)'}
  assert rows[0]['auto_per_s'] == 2.0 and rows[2]['torch_per_s'] == 4.0

  def broken_step(key, reps):
    raise jax.errors.JaxRuntimeError('INVALID_ARGUMENT: a bug, not the machine')

  monkeypatch.setattr(bench, 'bench_step', broken_step)
  with pytest.raises(jax.errors.JaxRuntimeError, match='INVALID_ARGUMENT'):
    bench.main(['--part', 'steps', '--cases', 'resnet18_28', '--out', str(tmp_path / 'x.json')])


def test_a_program_larger_than_the_available_memory_is_skipped_before_it_runs(monkeypatch):
  import jax
  import jax.numpy as jnp
  table = _benchmark_script('results_table')
  step = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0))
  x = jnp.ones((256, 256), jnp.float32)
  need = table.program_bytes(step.lower(x).compile().memory_analysis())
  assert need >= x.nbytes  # at least its argument
  monkeypatch.setattr(table, 'available_memory_bytes', lambda: 2 * need)
  table.check_fits(step, x)  # fits
  monkeypatch.setattr(table, 'available_memory_bytes', lambda: need)  # 90 % of it does not
  ran = []

  def measure():
    table.check_fits(step, x)
    ran.append(True)
    return {'case': 'big', 'per_s': 1.0}

  row = table.run_case('big', measure)
  assert not ran and set(row) == {'case', 'skipped'}
  assert row['skipped'].startswith(f'needs {need / 2**30:.1f} GiB (XLA memory analysis')
  for error, reason in ((MemoryError(), 'out of memory: MemoryError'),
                        (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to "
                                      "allocate 123 bytes."),
                         'out of memory: DefaultCPUAllocator: not enough memory'),
                        (ValueError('shapes do not match'), None)):
    got = table.out_of_memory_reason(error)
    assert got == reason if reason is None else got.startswith(reason)
