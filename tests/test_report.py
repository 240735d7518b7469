"""Plots, calibration, model summary, HTML reports and run comparisons from workdirs."""

import csv
import json
import os
import re

import numpy as np
import pytest
from PIL import Image
from sklearn.calibration import calibration_curve

from medjax import cli, config as config_lib, metrics, plots, report
from medjax import train as train_lib


def test_ece_against_scikit_learn_calibration_curve():
  rng = np.random.default_rng(0)
  p1 = rng.uniform(0, 1, 500)
  labels = (rng.uniform(0, 1, 500) < p1 ** 1.5).astype(int)   # miscalibrated on purpose
  scores = np.stack([1 - p1, p1], 1)
  # Top-label confidence, as the reference computes it by hand with scikit-learn's bins.
  confidence = scores.max(1)
  correct = (scores.argmax(1) == labels).astype(int)
  edges = np.linspace(0, 1, 11)
  prob_true, prob_pred = calibration_curve(correct, confidence, n_bins=10, strategy='uniform')
  counts = np.histogram(confidence, edges)[0]
  counts = counts[counts > 0]
  expected = np.sum(counts / counts.sum() * np.abs(prob_true - prob_pred))
  assert metrics.expected_calibration_error('binary', labels, scores, 10) == pytest.approx(
      expected, rel=1e-9)
  # A perfectly calibrated score has ECE ~0; a confidently wrong one has ECE 1.
  assert metrics.expected_calibration_error('binary', [1, 0], [[0, 1], [1, 0]]) == 0
  assert metrics.expected_calibration_error('binary', [0, 1], [[0, 1], [1, 0]]) == 1


@pytest.fixture(scope='module')
def runs(tmp_path_factory, quickstart_run):
  """Two seeds of the quickstart's tiny variant under one folder (seed 0: a copy of the
  shared run)."""
  import shutil
  root = tmp_path_factory.mktemp('runs') / 'qs'
  shutil.copytree(quickstart_run, root / 'seed0')
  config = config_lib.load_config_file('configs/quickstart.py:runlocal')
  config_lib.apply_overrides(config, ['seed=1'])
  results = {0: json.loads((root / 'seed0' / 'results.json').read_text()),
             1: train_lib.train_and_evaluate(config, str(root / 'seed1'))}
  return root, results


@pytest.mark.slow
def test_training_writes_plots_summary_fingerprint_and_command(runs):
  root, results = runs
  workdir = root / 'seed0'
  names = sorted(os.listdir(workdir / 'plots'))
  assert names == sorted(['learning_curves.png', 'roc_val.png', 'roc_test.png',
                          'confusion_val.png', 'confusion_test.png', 'reliability_val.png',
                          'reliability_test.png'])
  for name in names:
    with Image.open(workdir / 'plots' / name) as im:
      assert im.format == 'PNG' and im.width > 300 and im.height > 300
  summary = json.loads((workdir / 'model_summary.json').read_text())
  assert summary['parameters'] == 543_619 and summary['flops_per_example'] > 1e7
  assert [layer['name'] for layer in summary['layers']][:2] == ['Conv_0', 'Conv_1']
  assert 'Conv_1' in (workdir / 'model_summary.txt').read_text()
  fingerprint = json.loads((workdir / 'data_fingerprint.json').read_text())
  assert fingerprint['splits']['train']['examples'] == 256
  assert sum(fingerprint['splits']['test']['class_counts']) == 64
  assert json.loads((workdir / 'command.json').read_text())['cwd'] == os.getcwd()
  assert results[0]['test']['ece'] == pytest.approx(metrics.expected_calibration_error(
      'multiclass', *[np.load(workdir / 'predictions_test.npz')[k] for k in ('labels',
                                                                             'scores')]))
  # The plots went to TensorBoard as images, too.
  events = [f for f in os.listdir(workdir / 'tensorboard') if 'tfevents' in f]
  assert events
  blob = b''.join((workdir / 'tensorboard' / f).read_bytes() for f in events)
  assert b'plots/roc_test' in blob and b'plots/learning_curves' in blob


@pytest.mark.slow
def test_evaluate_writes_predictions_and_plots_for_its_split(runs, tmp_path):
  root, _ = runs
  workdir = root / 'seed1'
  os.remove(workdir / 'plots' / 'roc_test.png')
  assert cli.main(['evaluate', '--workdir', str(workdir), '--split', 'test']) == 0
  assert (workdir / 'plots' / 'roc_test.png').exists()
  assert (workdir / 'predictions_test.npz').exists()


@pytest.mark.slow
def test_report_of_one_run_holds_metrics_plots_config_and_reproduction(runs):
  root, results = runs
  workdir = root / 'seed0'
  assert cli.main(['report', '--workdir', str(workdir)]) == 0
  page = (workdir / 'report.html').read_text()
  assert page.startswith('<!DOCTYPE html>') and page.rstrip().endswith('</html>')
  assert page.count('<img src="data:image/png;base64,') == 7
  assert f"{results[0]['test']['auc']:.4f}" in page and f"{results[0]['val']['ece']:.4f}" in page
  fingerprint = json.loads((workdir / 'data_fingerprint.json').read_text())
  assert fingerprint['splits']['test']['images_sha256'][:16] in page
  assert f'medjax train --config {workdir}/config.json --workdir {workdir}_repeat' in page
  assert 'jaxlib' in page and '543,619 parameters' in page


@pytest.mark.slow
def test_report_escapes_every_workdir_field(runs, tmp_path):
  """Workdir JSON is data: markup planted in any field reaches the page as text."""
  import shutil
  root, _ = runs
  workdir = tmp_path / 'planted'
  shutil.copytree(root / 'seed0', workdir)
  bad = '<script>alert(1)</script>'

  def plant(name, edit):
    record = json.loads((workdir / name).read_text())
    edit(record)
    (workdir / name).write_text(json.dumps(record))

  def results(r):
    r.update(task=bad, selection_mode=bad, selected_step=bad, selected_epoch=bad,
             selection_metric=bad, dataset=bad)
    r['run_info'].update(devices=bad, platform=bad, wall_time_s=bad)
    r['versions'][bad] = bad
  plant('results.json', results)
  plant('data_fingerprint.json', lambda f: f.update(name=bad, task=bad, image_shape=[bad],
                                                    class_names=[bad, bad]))
  plant('model_summary.json', lambda m: m.update(name=bad))
  plant('config.json', lambda c: c['data'].update(name=bad))
  assert cli.main(['report', '--workdir', str(workdir)]) == 0
  page = (workdir / 'report.html').read_text()
  assert '<script' not in page
  assert page.count('&lt;script&gt;alert(1)&lt;/script&gt;') >= 14


@pytest.mark.slow
def test_saved_config_json_repeats_the_run_exactly(runs, tmp_path):
  root, results = runs
  config = config_lib.load_config_file(str(root / 'seed0' / 'config.json'))
  repeat = train_lib.train_and_evaluate(config, str(tmp_path / 'repeat'))
  for split in ('val', 'test'):
    assert repeat[split] == results[0][split]
  with pytest.raises(config_lib.ConfigError, match='takes no argument'):
    config_lib.load_config_file(str(root / 'seed0' / 'config.json') + ':runlocal')


@pytest.mark.slow
def test_report_of_seeds_gives_mean_and_sd(runs):
  root, results = runs
  assert report.find_runs(str(root)) == [str(root / 'seed0'), str(root / 'seed1')]
  path = report.write_report(str(root))
  page = open(path).read()
  values = [results[s]['test']['auc'] for s in (0, 1)]
  expected = f'{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}'
  assert expected in page
  assert page.count('<details class="run">') == 2


@pytest.mark.slow
def test_compare_prints_and_writes_markdown_and_csv(runs, tmp_path, capsys):
  root, results = runs
  out = tmp_path / 'cmp' / 'table.md'
  assert cli.main(['compare', str(root / 'seed0'), str(root / 'seed1'), '--output',
                   str(out)]) == 0
  printed = capsys.readouterr().out
  assert printed.strip() == out.read_text().strip()
  with open(tmp_path / 'cmp' / 'table.csv') as f:
    rows = list(csv.DictReader(f))
  assert [int(r['seed']) for r in rows] == [0, 1]
  assert float(rows[1]['test/auc']) == pytest.approx(results[1]['test']['auc'])
  assert re.search(r'\| simple_cnn \| synthetic_lesions3 \| 0 \| done \|', printed)
  assert cli.main(['compare', str(tmp_path / 'nothing_here')]) == 2


def test_segmentation_overlay_and_explanation_figures_render(tmp_path):
  image = np.random.default_rng(0).normal(size=(20, 24))
  reference = np.zeros((20, 24), int)
  reference[5:12, 6:14] = 1
  reference[12:16, 6:14] = 2
  fig = plots.segmentation_overlay_figure(image, reference, np.roll(reference, 1, 0),
                                          ['background', 'a', 'b'], 'case x')
  path = plots.save(fig, str(tmp_path / 'overlay.png'))
  with Image.open(path) as im:
    assert im.size[0] > 500
  views = plots.radiological_axial(np.arange(2 * 3 * 4).reshape(2, 3, 4))
  # [R, A, S] -> slices [S, A (anterior first), R (patient right first)].
  assert views.shape == (4, 3, 2)
  assert views[0, 0, 0] == np.arange(24).reshape(2, 3, 4)[1, 2, 0]
