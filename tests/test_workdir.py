"""The workdir contract on resume: the same config and data, or a refusal that changes
nothing; explicit, recorded changes of the keys that may change."""

import gc
import json
import os
import shutil
import sys

import numpy as np
import pytest

from conftest import fake_medmnist, results_without_run_info
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_one_training_process_per_workdir(tmp_path):
  import platform
  import subprocess
  import sys
  workdir = str(tmp_path)
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    with open(tmp_path / 'train.lock', 'w') as f:
      json.dump({'pid': holder.pid, 'host': platform.node(), 'since': 'then'}, f)
    with pytest.raises(workdir_lib.WorkdirLocked,
                       match=rf'in use by another medjax train \(pid {holder.pid} on host '
                             rf'{platform.node()}, since then\)'):
      train_lib.train_and_evaluate(_config(), workdir)
    assert sorted(os.listdir(workdir)) == ['train.lock']  # nothing else was written
  finally:
    holder.kill()
    holder.wait()
  # The holder is gone (kill -9 leaves its lock behind): the lock is taken over, and
  # released when training ends.
  with workdir_lib.lock(workdir):
    with open(tmp_path / 'train.lock') as f:
      assert json.load(f)['pid'] == os.getpid()
    with pytest.raises(workdir_lib.WorkdirLocked, match=f'pid {os.getpid()}'):
      with workdir_lib.lock(workdir):
        pass
  assert not os.path.exists(tmp_path / 'train.lock')


def test_a_torn_last_metrics_line_is_dropped_and_a_corrupt_one_named(tmp_path, capsys):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 2, "split": "train"}\n{"step": 4, "split": "tr')
  assert workdir_lib.read_metrics(str(path)) == [{'step': 2, 'split': 'train'}]
  err = capsys.readouterr().err  # stderr: stdout may be evaluate's JSON
  assert 'dropped a torn last line' in err and err.count('\n') == 1
  path.write_text('{"step": 2}\n{"step\n{"step": 4}\n')
  with pytest.raises(workdir_lib.WorkdirMismatch, match=r'metrics.jsonl: line 2 is not JSON'):
    workdir_lib.read_metrics(str(path))
  (tmp_path / 'config.json').write_text('')
  with pytest.raises(workdir_lib.WorkdirMismatch, match=r'config.json is empty or corrupt'):
    workdir_lib.read_config(str(tmp_path))


@pytest.mark.slow
def test_cli_user_errors_are_one_line_exit_2_and_evaluate_prints_before_writing(tmp_path,
                                                                                capsys):
  from medjax import cli
  workdir = str(tmp_path / 'w')
  train_lib.train_and_evaluate(_config(), workdir)
  capsys.readouterr()
  # A write that fails (a directory where the file goes; root ignores read-only modes).
  os.mkdir(os.path.join(workdir, 'eval_val.json'))
  assert cli.main(['evaluate', '--workdir', workdir, '--split', 'val']) == 2
  out, err = capsys.readouterr()
  assert json.loads(out)['split'] == 'val' and 'auc' in json.loads(out)  # printed first
  assert err.count('\n') == 1 and 'eval_val.json' in err and err.startswith('medjax: error:')
  with pytest.raises(IsADirectoryError):
    cli.main(['--debug', 'evaluate', '--workdir', workdir, '--split', 'val'])
  # A workdir that is a file, and a corrupt MedMNIST file: one line each, exit 2.
  (tmp_path / 'afile').write_text('x')
  assert cli.main(['train', '--config', 'configs/quickstart.py:runlocal', '--workdir',
                   str(tmp_path / 'afile')]) == 2
  assert 'afile' in capsys.readouterr().err
  (tmp_path / 'breastmnist.npz').write_bytes(b'PK\x03\x04 truncated')
  assert cli.main(['train', '--config', 'configs/breastmnist.py:runlocal', '--workdir',
                   str(tmp_path / 'b'), f'--config.data.path={tmp_path / "breastmnist.npz"}']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'breastmnist.npz: cannot read as .npz' in err


def _largest_file(folder):
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
  return max(files, key=os.path.getsize)


@pytest.fixture(scope='module')
def two_epochs(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('two_epochs'))
  train_lib.train_and_evaluate(_config('train.num_epochs=2'), workdir)
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize('damage', ['flip_bytes', 'delete'])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(damage, two_epochs,
                                                                         tmp_path, capfd,
                                                                         monkeypatch):
  reference = two_epochs
  workdir = str(tmp_path / 'w')
  train_lib.train_and_evaluate(_config('train.num_epochs=2', 'train.stop_after_steps=12'),
                               workdir)  # checkpoints at 8 (validation) and 12 (stop)
  target = _largest_file(os.path.join(workdir, 'checkpoints', '12', 'state'))
  data = bytearray(open(target, 'rb').read())
  if damage == 'flip_bytes':
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    open(target, 'wb').write(bytes(data))
  else:
    os.remove(target)
  capfd.readouterr()
  # Orbax's abandoned reads report the failure again when collected (some of the time):
  # through sys.unraisablehook, which pytest would otherwise turn into warnings.
  unraisable = []
  monkeypatch.setattr(sys, 'unraisablehook', unraisable.append)
  resumed = train_lib.train_and_evaluate(_config('train.num_epochs=2'), workdir)
  gc.collect()
  out, err = capfd.readouterr()  # file descriptors: C++ logs and asyncio's handler too
  # One line on stderr names the checkpoint and the reason; no traceback, no TensorStore spec.
  about = [line for line in err.splitlines() if 'warning' in line or 'checkpoints/' in line]
  assert len(about) == 1 and about[0].startswith(f'warning: {workdir}/checkpoints/12: '), err
  assert f'moved to {workdir}/checkpoints_damaged/12' in about[0]
  assert ('SHA-256 mismatch' if damage == 'flip_bytes' else 'unreadable (') in about[0]
  assert 'Traceback' not in err and 'TensorStore' not in err and 'checkpoints/' not in out
  assert unraisable == []
  assert resumed['run_info']['resumed_from_step'] == 8
  assert os.path.isdir(os.path.join(workdir, 'checkpoints_damaged', '12'))
  # As if the damage had never happened.
  assert results_without_run_info(workdir) == results_without_run_info(reference)


@pytest.mark.slow
def test_evaluating_another_checkpoint_leaves_the_runs_own_files_alone(tmp_path, quickstart_run,
                                                                       capsys):
  """``evaluate --step N`` of a checkpoint that is not the selected one writes under
  ``evaluations/``: the run's predictions (read by the seed ensemble and the report),
  ``eval_<split>.json`` and plots stay those of the checkpoint ``results.json`` names."""
  from sklearn.metrics import roc_auc_score

  from medjax import cli
  workdir = tmp_path / 'run'
  shutil.copytree(quickstart_run, workdir)
  results = json.load(open(workdir / 'results.json'))
  steps = sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  other = [s for s in steps if s != results['selected_step']][0]
  own_files = ['predictions_test.npz', 'plots/roc_test.png']
  before = {f: (workdir / f).read_bytes() for f in own_files}
  assert cli.main(['evaluate', '--workdir', str(workdir), '--split', 'test',
                   '--step', str(other)]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed['step'] == other
  assert {f: (workdir / f).read_bytes() for f in own_files} == before
  assert not (workdir / 'eval_test.json').exists()
  out = workdir / 'evaluations' / f'test_step{other}'
  saved = json.load(open(out / 'eval_test.json'))
  assert saved['step'] == other and saved['metrics']['auc'] == printed['auc']
  with np.load(out / 'predictions_test.npz') as p:  # that checkpoint's scores, not the run's
    labels, scores = p['labels'].reshape(-1), p['scores']
  with np.load(workdir / 'predictions_test.npz') as p:
    assert not np.allclose(p['scores'], scores)
  assert printed['auc'] == pytest.approx(
      roc_auc_score(labels, scores, multi_class='ovr'), abs=1e-6)
  # The selected checkpoint, given by its step or not, is the run's own scoring.
  assert cli.main(['evaluate', '--workdir', str(workdir), '--split', 'test', '--step',
                   str(results['selected_step'])]) == 0
  assert json.load(open(workdir / 'eval_test.json'))['metrics'] == results['test']
  assert sorted(os.listdir(workdir / 'evaluations')) == [f'test_step{other}']
