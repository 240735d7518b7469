"""End to end: train, select, evaluate, resume, reproduce, shard, fail safely."""

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import flax.struct
import jax
import ml_collections
import numpy as np
import pytest
from sklearn import metrics as skm

from conftest import fake_medmnist, results_without_run_info
from medjax import checkpoint, config as config_lib
from medjax import train as train_lib
from medjax.data import load_data
from medjax.experiments import ClassificationExperiment



def _config(**overrides):
  c = config_lib.load_config_file('configs/quickstart.py:runlocal')
  # 256 train / batch 32 = 8 steps per epoch; 2 epochs. BatchNorm + dropout + augmentation
  # exercise every source of state and randomness.
  c.model = ml_collections.ConfigDict(dict(name='resnet18', width=4, dropout_rate=0.3))
  config_lib.apply_overrides(c, ['data.augment.rotation_deg=10.0', 'train.log_every_steps=1',
                                 'train.keep_checkpoints=1'])
  config_lib.apply_overrides(c, [f'{k}={v}' for k, v in overrides.items()])
  return c


def _train_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in records if r['split'] == 'train'}


def _final_params(workdir, config):
  exp = ClassificationExperiment(config_lib.resolve(config), load_data(config))
  manager = checkpoint.make_manager(workdir, 1, 'auc', 'max')
  state, _ = checkpoint.restore(manager, manager.latest_step(), exp.abstract_state())
  return jax.device_get(state)


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('reference'))
  config = _config()
  results = train_lib.train_and_evaluate(config, workdir)
  return workdir, config, results


@pytest.mark.slow
def test_workdir_contract(reference_run):
  workdir, _, results = reference_run
  for name in ('config.json', 'metrics.jsonl', 'results.json', 'predictions_val.npz',
               'predictions_test.npz'):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert any(f.startswith('events.out.tfevents') for f in
             os.listdir(os.path.join(workdir, 'tensorboard')))
  assert results['selected_step'] in (8, 16)
  assert set(results['versions']) >= {'medjax', 'jax', 'flax'}
  assert results['run_info']['wall_time_s'] > 0
  records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  train_records = [r for r in records if r['split'] == 'train']
  assert all(r['images_per_sec'] > 0 and 'learning_rate' in r for r in train_records)
  assert [r['step'] for r in records if r['split'] == 'val'] == [8, 16]


@pytest.mark.slow
def test_results_recomputed_from_predictions_with_sklearn(reference_run):
  workdir, _, results = reference_run
  for split in ('val', 'test'):
    pred = np.load(os.path.join(workdir, f'predictions_{split}.npz'))
    labels, scores = pred['labels'], pred['scores']
    assert len(pred['index']) == 64
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    assert results[split]['auc'] == pytest.approx(
        skm.roc_auc_score(labels, scores, multi_class='ovr'), abs=1e-9)
    assert results[split]['accuracy'] == pytest.approx(
        skm.accuracy_score(labels, scores.argmax(1)), abs=1e-12)


@pytest.mark.slow
def test_selected_checkpoint_is_the_best_validation_auc(reference_run):
  workdir, _, results = reference_run
  records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  val = {r['step']: r['auc'] for r in records if r['split'] == 'val'}
  assert results['selected_step'] == max(val, key=val.get)
  assert results['val']['auc'] == pytest.approx(val[results['selected_step']], abs=1e-12)


@pytest.mark.slow
def test_evaluate_reproduces_results_exactly(reference_run):
  workdir, _, results = reference_run
  for split in ('val', 'test'):
    result = train_lib.evaluate_workdir(workdir, split)
    assert result['step'] == results['selected_step']
    assert result['metrics'] == results[split]


@pytest.mark.slow
def test_same_seed_twice_gives_identical_results(reference_run, tmp_path):
  workdir, config, _ = reference_run
  train_lib.train_and_evaluate(config, str(tmp_path))
  assert results_without_run_info(str(tmp_path)) == results_without_run_info(workdir)
  assert _train_losses(str(tmp_path)) == _train_losses(workdir)


@pytest.mark.slow
def test_resume_is_bit_exact(reference_run, tmp_path):
  workdir, config, _ = reference_run
  stopped = train_lib.train_and_evaluate(_config(**{'train.stop_after_steps': 5}),
                                         str(tmp_path))
  assert stopped == {'stopped_at_step': 5}
  assert not os.path.exists(tmp_path / 'results.json')
  resumed = train_lib.train_and_evaluate(config, str(tmp_path))
  assert resumed['run_info']['resumed_from_step'] == 5
  assert results_without_run_info(str(tmp_path)) == results_without_run_info(workdir)
  assert _train_losses(str(tmp_path)) == _train_losses(workdir)
  straight, again = _final_params(workdir, config), _final_params(str(tmp_path), config)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_unfinished_checkpoint_is_never_resumed_from(reference_run, tmp_path):
  """A kill during a save leaves Orbax's temporary directory; resume must ignore it."""
  workdir, config, _ = reference_run
  train_lib.train_and_evaluate(_config(**{'train.stop_after_steps': 3}), str(tmp_path))
  partial = tmp_path / 'checkpoints' / '7.orbax-checkpoint-tmp-1234567890'
  (partial / 'state').mkdir(parents=True)
  (partial / 'state' / 'garbage').write_bytes(b'\x00' * 10)
  results = train_lib.train_and_evaluate(config, str(tmp_path))
  assert results['run_info']['resumed_from_step'] == 3
  assert results_without_run_info(str(tmp_path)) == results_without_run_info(workdir)


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_error(tmp_path):
  diverging = _config(**{'optimizer.learning_rate': float('inf')})
  with pytest.raises(train_lib.TrainingDiverged,
                     match=r'NaN or infinite at or before step 2; stopping. No checkpoint'):
    train_lib.train_and_evaluate(diverging, str(tmp_path / 'inf'))
  assert checkpoint.make_manager(str(tmp_path / 'inf'), 1, 'auc', 'max').latest_step() is None


@pytest.mark.slow
def test_nan_parameters_with_finite_losses_are_never_saved(tmp_path, monkeypatch):
  """The last update before a checkpoint breaks the parameters while every loss so far was
  finite (the loss is computed before the update): the state is not evaluated or saved, and
  the checkpoint of epoch 1 stays the last good one."""
  original = ClassificationExperiment.train_step

  def breaks_at_step_16(self, state, images, labels):
    state, metrics = original(self, state, images, labels)
    if int(state.step) == 16:
      state = state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
    return state, metrics
  monkeypatch.setattr(ClassificationExperiment, 'train_step', breaks_at_step_16)
  workdir = str(tmp_path)
  config = config_lib.load_config_file('configs/quickstart.py:runlocal')  # a small CNN
  config_lib.apply_overrides(config, ['model.features=(4, 8)', 'model.hidden=8',
                                      'train.keep_checkpoints=1'])
  with pytest.raises(train_lib.TrainingDiverged,
                     match=r'parameters became NaN or infinite at step 16 \(not saved\); '
                           r'stopping. The last good checkpoint is step 8'):
    train_lib.train_and_evaluate(config, workdir)
  manager = checkpoint.make_manager(workdir, 1, 'auc', 'max')
  assert manager.all_steps() == [8]
  exp = ClassificationExperiment(config_lib.resolve(config), load_data(config))
  state, _ = checkpoint.restore(manager, 8, exp.abstract_state())
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert max(r['step'] for r in records if r['split'] == 'val') == 8


@flax.struct.dataclass
class OlderTrainState:
  """medjax's TrainState before ``loss_state`` was added."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  dropout_key: jax.Array


@pytest.mark.slow
def test_a_checkpoint_written_before_the_loss_state_field_still_restores(tmp_path):
  """Checkpoints from before ``TrainState.loss_state`` existed restore into a state whose
  loss keeps no statistics; a loss that does keep some refuses them (its statistics are
  not in the checkpoint)."""
  config = config_lib.load_config_file('configs/quickstart.py:runlocal')
  exp = ClassificationExperiment(config_lib.resolve(config), load_data(config))
  state = exp.init_state()
  older = OlderTrainState(**{name: getattr(state, name) for name in (
      'step', 'params', 'batch_stats', 'opt_state', 'dropout_key')})
  manager = checkpoint.make_manager(str(tmp_path), 1, 'auc', 'max')
  checkpoint.save(manager, 5, older, {'step': 5})
  restored, meta = checkpoint.restore(manager, 5, exp.abstract_state())
  assert meta['step'] == 5 and restored.loss_state == {}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params),
               jax.device_get(state.params))
  stateful = config_lib.apply_overrides(config_lib.load_config_file(
      'configs/quickstart.py:runlocal'), ['data.labeled_fraction=0.5', 'semi.method=fixmatch',
                                          'semi.threshold_mode=self_adaptive'])
  exp = ClassificationExperiment(config_lib.resolve(stateful), load_data(stateful))
  with pytest.raises(ValueError, match='does not fit this config'):
    checkpoint.restore(manager, 5, exp.abstract_state())


def test_a_loss_far_above_its_start_is_reported(tmp_path, capsys):
  blowup = train_lib.LossBlowup()
  for step, loss in ((10, 1.1), (20, 5.0), (30, 11.5), (40, 50.0)):
    blowup.check(step, loss)
  err = capsys.readouterr().err  # warnings are one line each on stderr
  assert err.count('warning') == 1 and 'train loss 11.5 at step 30 is over 10x' in err

@pytest.mark.slow
def test_one_device_and_eight_devices_give_the_same_losses(reference_run, tmp_path):
  workdir, _, _ = reference_run
  script = textwrap.dedent(f"""
      import jax
      assert jax.device_count() == 8, jax.devices()
      from medjax import config as config_lib, train as train_lib
      sys_path = None
      import importlib.util, sys
      sys.path.insert(0, {os.path.dirname(__file__)!r})
      from test_train import _config
      train_lib.train_and_evaluate(_config(), {str(tmp_path)!r})
  """)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                        timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  one, eight = _train_losses(workdir), _train_losses(str(tmp_path))
  assert one.keys() == eight.keys() and min(one) == 1  # every step logged
  # Same parameters, same batch, same math; only the order of the sums across devices
  # differs (BatchNorm statistics, the loss mean, the gradient all-reduce). Measured on this
  # test: step 1 equal bit for bit, step 2 to 1e-7, then 4e-5 (step 3) growing to 7e-3.
  # Step 1 is the loss of the initial parameters: float32 rounding only, so a few ulps.
  assert abs(eight[1] - one[1]) <= 4 * np.spacing(np.float32(one[1]))
  # Step 2 follows one Adam update, lr * g / (|g| + eps) ~ lr * sign(g): rounding in g changes
  # it only where |g| ~ eps, where the loss is flat in that parameter, so the loss still
  # agrees to rounding (1e-7 measured; 1e-5 is 100x that).
  np.testing.assert_allclose(eight[2], one[2], rtol=1e-5)
  # From the second update on, Adam's moments turn those rounding-level differences of
  # near-zero gradients into O(lr) parameter changes: the drift is no longer bounded by
  # float32 precision, so later steps are compared as trajectories: epoch means of the loss
  # (6e-4 apart measured; 1e-2 allowed) and the test AUC (0.006 apart; 0.03 allowed).
  for epoch in (range(1, 9), range(9, 17)):
    np.testing.assert_allclose(np.mean([eight[k] for k in epoch]),
                               np.mean([one[k] for k in epoch]), rtol=1e-2)
  r1, r8 = results_without_run_info(workdir), results_without_run_info(str(tmp_path))
  assert r8['test']['auc'] == pytest.approx(r1['test']['auc'], abs=0.03)


@pytest.mark.slow
def test_selection_last_reports_the_last_checkpoint(tmp_path):
  """selection_mode='last': no selection on the validation set; the final checkpoint is
  the one scored (as MedMNIST's official script does), and only the latest are kept."""
  config = config_lib.load_config_file('configs/quickstart.py:runlocal')
  config_lib.apply_overrides(config, ['train.selection_mode=last', 'train.keep_checkpoints=1',
                                      'model.initializer=torch'])
  results = train_lib.train_and_evaluate(config, str(tmp_path))
  assert results['selected_step'] == 16 and results['selection_mode'] == 'last'
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['16']
  val = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in val if r['split'] == 'val'] == [8, 16]  # still evaluated
  assert train_lib.evaluate_workdir(str(tmp_path), 'test', write=False)['metrics'] == \
      results['test']
  with pytest.raises(ValueError, match="selection_mode must be 'max', 'min' or 'last'"):
    checkpoint.make_manager(str(tmp_path / 'x'), 1, 'auc', 'best')


@pytest.mark.slow
def test_resume_with_another_optimizer_is_a_clear_error(tmp_path):
  train_lib.train_and_evaluate(_config(**{'train.stop_after_steps': 2}), str(tmp_path))
  with pytest.raises(ValueError, match=r"trained to step 2 with another config "
                                       r"\(optimizer.name: 'adam' -> 'sgd'\)"):
    train_lib.train_and_evaluate(_config(**{'optimizer.name': 'sgd'}), str(tmp_path))


@pytest.mark.slow
def test_evaluate_of_a_stopped_run_draws_its_plots(tmp_path, capsys):
  """A run stopped before results.json (task 'auto' in its config) is evaluated and plotted
  like a finished one: the predictions name their task."""
  workdir = str(tmp_path)
  train_lib.train_and_evaluate(_config(**{'train.stop_after_steps': 8}), workdir)
  capsys.readouterr()
  train_lib.evaluate_workdir(workdir, 'val')
  assert 'could not draw' not in capsys.readouterr().err
  assert {'roc_val.png', 'confusion_val.png', 'reliability_val.png',
          'learning_curves.png'} <= set(os.listdir(os.path.join(workdir, 'plots')))


def test_bad_task_and_loss_are_errors():
  data = load_data(_config())
  with pytest.raises(ValueError, match="task 'multilabel' does not fit"):
    ClassificationExperiment(config_lib.resolve(_config(task='multilabel')), data)
  with pytest.raises(ValueError, match="unknown loss.name 'dice'"):
    ClassificationExperiment(config_lib.resolve(_config(**{'loss.name': 'dice'})), data)


@pytest.mark.slow
def test_cli_evaluate_reproduces_results(tmp_path, quickstart_run):
  """``medjax evaluate`` in a fresh process prints the selected checkpoint's metrics, equal
  to results.json (``medjax train`` through the CLI runs in test_faults and test_multihost)."""
  import shutil
  workdir = str(tmp_path / 'w')
  shutil.copytree(quickstart_run, workdir)
  cmd = [sys.executable, '-m', 'medjax.cli']
  proc = subprocess.run(cmd + ['evaluate', '--workdir', workdir, '--split', 'test'],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  printed = json.loads(proc.stdout[proc.stdout.index('{'):])
  results = json.load(open(os.path.join(workdir, 'results.json')))
  assert printed['auc'] == results['test']['auc']
  proc = subprocess.run(cmd + ['evaluate', '--workdir', str(tmp_path / 'nope')],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2 and 'has no config.json' in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize('config_file,path_parts', [
    ('configs/breastmnist.py', ('medmnist', 'breastmnist.npz')),
    ('configs/adrenalmnist3d.py', ('medmnist', 'adrenalmnist3d.npz'))])
def test_medmnist_recipes_run_on_real_data(config_file, path_parts, tmp_path):
  from conftest import shared_file
  path = shared_file(*path_parts)
  config = config_lib.load_config_file(config_file + ':runlocal')
  config_lib.apply_overrides(config, ['train.num_epochs=1'])
  results = train_lib.train_and_evaluate(config, str(tmp_path))
  assert results['task'] == 'binary'
  assert results['test']['num_examples'] == config.data.max_examples
  # The scored examples are the file's first test examples, with the file's labels, and the
  # reported metrics are scikit-learn's on the written predictions.
  with np.load(path) as f:
    truth = f['test_labels'][:config.data.max_examples, 0]
  pred = np.load(tmp_path / 'predictions_test.npz')
  np.testing.assert_array_equal(np.sort(pred['index']), np.arange(len(truth)))
  np.testing.assert_array_equal(pred['labels'], truth[pred['index']])
  scores = pred['scores']
  assert scores.shape == (len(truth), 2) and 0 < pred['labels'].sum() < len(truth)
  assert results['test']['auc'] == pytest.approx(
      skm.roc_auc_score(pred['labels'], scores[:, 1]), abs=1e-9)
  assert results['test']['accuracy'] == pytest.approx(
      skm.accuracy_score(pred['labels'], scores.argmax(1)), abs=1e-12)


@pytest.mark.parametrize('name,shape,num_classes,label_width,task,outputs', [
    ('dermamnist.npz', (28, 28, 3), 7, 1, 'multiclass', 7),        # RGB multi-class
    ('organmnist3d_64.npz', (16, 16, 16), 11, 1, 'multiclass', 11),  # 3D, another size
    ('retinamnist.npz', (28, 28, 3), 5, 1, 'ordinal', 4),          # ordinal head: K-1 logits
    ('chestmnist.npz', (28, 28), 2, 14, 'multilabel', 14),         # multi-label
])
@pytest.mark.slow
def test_paper_recipe_on_unseen_medmnist_layouts(name, shape, num_classes, label_width, task,
                                                 outputs, tmp_path):
  path = fake_medmnist(tmp_path / name, shape, num_classes, label_width)
  config = config_lib.load_config_file('configs/breastmnist.py:runlocal')
  config_lib.apply_overrides(config, [f'data.path={path}', 'data.max_examples=32',
                                      'train.num_epochs=1'])
  if len(shape) == 3 and shape[-1] != 3:  # 3D: keep the CPU test small
    config_lib.apply_overrides(config, ['model.width=4', 'train.batch_size=8'])
  results = train_lib.train_and_evaluate(config, str(tmp_path / 'w'))
  assert results['task'] == task and results['dataset'] == name[:-4]
  pred = np.load(tmp_path / 'w' / 'predictions_test.npz')
  expected_width = label_width if task == 'multilabel' else num_classes
  assert pred['scores'].shape == (32, expected_width)
  exp = ClassificationExperiment(config_lib.resolve(config), load_data(config))
  assert exp.num_outputs == outputs


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path):
  import signal
  import time
  workdir = str(tmp_path / 'w')
  cmd = [sys.executable, '-m', 'medjax.cli', 'train', '--config', 'configs/quickstart.py:runlocal',
         '--workdir', workdir, '--config.train.num_epochs=200']
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  while time.time() < deadline and not (os.path.exists(metrics_path) and
                                        os.path.getsize(metrics_path) > 0):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  stopped = int(out.split('Stopped at step ')[1].split(';')[0])
  assert 'did not provide metrics' not in err  # Orbax's warning on a save without metrics
  manager = checkpoint.make_manager(workdir, 1, 'auc', 'max')
  assert manager.latest_step() == stopped
  results = train_lib.train_and_evaluate(
      config_lib.apply_overrides(config_lib.load_config_file('configs/quickstart.py:runlocal'),
                                 ['train.num_epochs=1' if stopped < 8 else
                                  f'train.num_epochs={stopped // 8 + 1}']), workdir,
      allow_change=['train.num_epochs'])
  assert results['run_info']['resumed_from_step'] == stopped


@pytest.mark.slow
def test_init_from_starts_a_run_from_another_runs_selected_model(reference_run, tmp_path):
  """train.init_from: the source's selected parameters and batch statistics, a fresh
  optimizer and step; each seed of a group starts from it; a resumed fine-tuning run goes on
  from its own checkpoint exactly; another model is refused by name."""
  from types import SimpleNamespace
  from medjax import seeds as seeds_lib
  from medjax.experiments import make_experiment
  source, _, results = reference_run
  _, source_state, step = train_lib.restore_workdir(source)
  assert step == results['selected_step']
  config = _config(seed=7, **{'train.init_from': source})
  exp = make_experiment(config)
  state = jax.device_get(exp.init_state())
  for name in ('params', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal, getattr(state, name),
                 jax.device_get(getattr(source_state, name)))
  assert int(state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, state.opt_state,
               jax.device_get(exp.tx.init(state.params)))
  fresh = jax.device_get(make_experiment(_config(seed=7)).init_state())
  assert not np.array_equal(jax.tree.leaves(fresh.params)[0], jax.tree.leaves(state.params)[0])
  group = seeds_lib.Group([SimpleNamespace(exp=make_experiment(
      seeds_lib.member_config(config, k))) for k in (0, 1)])
  stacked = jax.device_get(group.init())
  for k in (0, 1):
    jax.tree.map(np.testing.assert_array_equal, seeds_lib.member_state(stacked, k).params,
                 jax.device_get(source_state.params))
  # Fine-tuning stopped after 3 steps and resumed logs what an uninterrupted run logs.
  full, parts = str(tmp_path / 'full'), str(tmp_path / 'parts')
  train_lib.train_and_evaluate(config, full)
  train_lib.train_and_evaluate(_config(seed=7, **{'train.init_from': source,
                                                  'train.stop_after_steps': 3}), parts)
  train_lib.train_and_evaluate(config, parts)
  assert _train_losses(parts) == _train_losses(full)
  with pytest.raises(ValueError, match=r"its model does not fit this one: 'batch_stats/"
                                       r"stage1_block1/BatchNorm_0/mean' is \(4,\) there, "
                                       r"\(8,\) here"):
    make_experiment(_config(**{'train.init_from': source, 'model.width': 8})).init_state()
  with pytest.raises(ValueError, match='no run there'):
    make_experiment(_config(**{'train.init_from': str(tmp_path / 'none')})).init_state()
