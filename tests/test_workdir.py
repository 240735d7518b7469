"""The workdir contract on resume: the same config and data, or a refusal that changes
nothing; explicit, recorded changes of the keys that may change."""

import json
import os

import numpy as np
import pytest

from conftest import fake_medmnist
from medjax import config as config_lib, train as train_lib, workdir as workdir_lib


def _config(*overrides):
  c = config_lib.load_config_file('configs/quickstart.py:runlocal')
  config_lib.apply_overrides(c, ['model.features=(4, 8)', 'model.hidden=8',
                                 'train.num_epochs=1'] + list(overrides))
  return c


def _snapshot(workdir):
  files = ('config.json', 'data_fingerprint.json', 'metrics.jsonl', 'config_history.jsonl')
  return {name: open(os.path.join(workdir, name), 'rb').read() if os.path.exists(
      os.path.join(workdir, name)) else None for name in files}


def test_a_changed_config_is_refused_before_anything_is_written(tmp_path):
  workdir = str(tmp_path)
  train_lib.train_and_evaluate(_config('train.stop_after_steps=2'), workdir)
  before = _snapshot(workdir)
  with pytest.raises(workdir_lib.WorkdirMismatch,
                     match=r"trained to step 2 with another config \(optimizer.learning_rate: "
                           r"0.002 -> 0.01; seed: 0 -> 3\); nothing was changed.*config.json"):
    train_lib.train_and_evaluate(_config('optimizer.learning_rate=0.01', 'seed=3'), workdir)
  assert _snapshot(workdir) == before
  # evaluate still reads the workdir's own config.
  assert train_lib.evaluate_workdir(workdir, 'val', write=False)['step'] == 2


def test_an_equal_config_resumes_without_a_note(tmp_path, capsys):
  workdir = str(tmp_path)
  train_lib.train_and_evaluate(_config('train.stop_after_steps=3'), workdir)
  capsys.readouterr()
  # Lists where the saved config has tuples, and run-control keys changed: the same run.
  again = _config('train.progress_bar=true')
  again.model.features = [4, 8]
  results = train_lib.train_and_evaluate(again, workdir)
  out = capsys.readouterr().out
  assert results['run_info']['resumed_from_step'] == 3
  assert 'note' not in out and 'differ' not in out
  history = [json.loads(line) for line in open(os.path.join(workdir, 'config_history.jsonl'))]
  assert [(h['start_step'], h['changes']) for h in history] == [(0, {}), (3, {})]


def test_more_epochs_is_an_explicit_recorded_change(tmp_path):
  workdir = str(tmp_path)
  train_lib.train_and_evaluate(_config(), workdir)  # 1 epoch = 8 steps, finished
  with pytest.raises(workdir_lib.WorkdirMismatch,
                     match=r'train.num_epochs: 1 -> 2.*--allow_change train.num_epochs'):
    train_lib.train_and_evaluate(_config('train.num_epochs=2'), workdir)
  results = train_lib.train_and_evaluate(_config('train.num_epochs=2'), workdir,
                                         allow_change=['train.num_epochs'])
  assert results['run_info']['resumed_from_step'] == 8
  steps = [json.loads(line)['step'] for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert max(steps) == 16
  assert workdir_lib.read_config(workdir).train.num_epochs == 2
  history = [json.loads(line) for line in open(os.path.join(workdir, 'config_history.jsonl'))]
  assert history[-1]['changes'] == {'train.num_epochs': [1, 2]}
  with pytest.raises(workdir_lib.WorkdirMismatch, match='--allow_change optimizer.name: only'):
    train_lib.train_and_evaluate(_config('train.num_epochs=2'), workdir,
                                 allow_change=['optimizer.name'])


def test_changed_data_under_the_same_config_is_refused(tmp_path):
  path = fake_medmnist(tmp_path / 'breastmnist.npz', (28, 28), 2)
  config = config_lib.load_config_file('configs/breastmnist.py:runlocal')
  config_lib.apply_overrides(config, [f'data.path={path}', 'data.max_examples=32',
                                      'train.stop_after_steps=1'])
  workdir = str(tmp_path / 'w')
  train_lib.train_and_evaluate(config, workdir)
  before = _snapshot(workdir)
  fake_medmnist(tmp_path / 'breastmnist.npz', (28, 28), 2, seed=1)  # edited labels and images
  with pytest.raises(workdir_lib.WorkdirMismatch,
                     match=r'data_fingerprint.json differs from the data this run would train on'):
    train_lib.train_and_evaluate(config, workdir)
  assert _snapshot(workdir) == before
  assert np.load(path)['train_labels'].shape == (40, 1)
