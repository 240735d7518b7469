"""Mixed precision (train.precision), float16's loss scaling and gradient accumulation."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import results_without_run_info, shared_file
from medjax import checkpoint, config as config_lib, precision, train as train_lib
from medjax.experiments import make_experiment
from medjax.experiments.step import micro_batches
from medjax.models import build_model


def _config(*overrides, model=None):
  c = config_lib.load_config_file('configs/quickstart.py:runlocal')
  # No warm-up: the first update must move the parameters (a zero learning rate would not).
  c.optimizer.warmup_epochs = 0
  if model:
    c.model = ml_collections.ConfigDict(model)
  config_lib.apply_overrides(c, list(overrides))
  return config_lib.resolve(c)


def _host_copy(tree):
  """A NumPy copy (device_get may alias a CPU buffer that the donating step reuses)."""
  return jax.tree.map(lambda a: np.array(a, copy=True), jax.device_get(tree))


def _batch(exp):
  return next(iter(exp.train_iterator(0)))


def test_loss_scale_follows_the_gradscaler_rule():
  """Halves after each non-finite step, doubles after `interval` finite ones in a row,
  checked against a plain-Python reference over a random sequence of steps."""
  interval = 3
  rng = np.random.default_rng(0)
  flags = rng.random(60) < 0.8
  state = {'scale': jnp.float32(2.0**10), 'good_steps': jnp.int32(0)}
  scale, good = 2.0**10, 0
  for finite in flags:
    state = precision.next_loss_scale(state, jnp.asarray(finite), interval)
    if finite:
      good += 1
      if good == interval:
        scale, good = scale * 2, 0
    else:
      scale, good = scale / 2, 0
    assert float(state['scale']) == scale and int(state['good_steps']) == good


def test_unknown_precision_is_a_clear_error():
  with pytest.raises(ValueError, match="train.precision: unknown 'half'"):
    make_experiment(_config('train.precision=half'))


@pytest.mark.parametrize('name,kwargs,shape', [
    ('simple_cnn', {}, (2, 16, 16, 1)),
    ('resnet18', {'width': 4}, (2, 16, 16, 1)),
    ('unet', {'features': (4, 8), 'strides': (1, 2), 'norm': 'batch'}, (1, 8, 8, 8, 1)),
])
def test_models_compute_in_bfloat16_with_float32_parameters(name, kwargs, shape):
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  full = build_model(name, 3, **kwargs)
  half = build_model(name, 3, dtype=jnp.bfloat16, **kwargs)
  variables = full.init(jax.random.PRNGKey(0), x)
  # The same parameter tree, all float32, whatever the compute dtype.
  assert (jax.tree.structure(variables)
          == jax.tree.structure(half.init(jax.random.PRNGKey(0), x)))
  assert {leaf.dtype for leaf in jax.tree.leaves(half.init(jax.random.PRNGKey(0), x))} == {
      jnp.dtype(jnp.float32)}
  out_full, out_half = full.apply(variables, x), half.apply(variables, x)
  assert out_half.dtype == jnp.float32
  # The convolutions run in bfloat16 (their operands), not float32.
  jaxpr = str(jax.make_jaxpr(lambda v: half.apply(v, x))(variables))
  assert 'conv_general_dilated' in jaxpr or 'dot_general' in jaxpr
  assert 'bf16' in jaxpr
  # bfloat16's 8-bit mantissa: relative error of order 1e-2.
  scale = float(jnp.abs(out_full).max())
  np.testing.assert_allclose(out_half, out_full, atol=0.05 * scale + 1e-3)


def test_float16_overflow_skips_the_step_and_halves_the_scale():
  """An injected overflow (a loss scale far above float16's range) leaves parameters,
  optimizer state and batch statistics untouched, halves the scale and moves the step on;
  a representable scale then updates the model and counts towards growth."""
  exp = make_experiment(_config('train.precision=float16', 'train.loss_scale_init=1e30',
                                'train.loss_scale_growth_interval=2',
                                model=dict(name='resnet', stage_sizes=(1, 1), width=4)))
  state = exp.init_state()
  images, labels = _batch(exp)
  before = _host_copy(state)
  state, metrics = exp.train_step(state, images, labels)
  after = _host_copy(state)
  assert not np.isfinite(float(metrics['grad_norm']))
  assert np.isfinite(float(metrics['loss']))
  for field in ('params', 'opt_state', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal, getattr(after, field), getattr(before, field))
  assert int(after.step) == 1
  assert float(after.loss_scale['scale']) == pytest.approx(5e29, rel=1e-6)
  # A scale float16 can hold: the step updates and, after 2 in a row, the scale doubles.
  state = state.replace(loss_scale={'scale': jnp.float32(1024.0),
                                    'good_steps': jnp.int32(0)})
  state, metrics = exp.train_step(state, images, labels)
  assert np.isfinite(float(metrics['grad_norm']))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         jax.device_get(state.params), before.params)
  assert all(jax.tree.leaves(changed))
  assert int(state.loss_scale['good_steps']) == 1
  state, _ = exp.train_step(state, images, labels)
  assert float(state.loss_scale['scale']) == 2048.0
  assert int(state.loss_scale['good_steps']) == 0


def test_micro_batches_keep_each_devices_rows_together():
  x = np.arange(12)
  np.testing.assert_array_equal(micro_batches(jnp.asarray(x), 3),
                                [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])


def test_accumulated_gradients_give_the_large_batch_update():
  """No batch statistics, no dropout: 4 micro-batches of 8 update the model as one batch
  of 32 (SGD: the update is the mean gradient itself, so a sum or a missed micro-batch
  would show directly)."""
  overrides = ('model.dropout_rate=0.0', 'optimizer.name=sgd', 'optimizer.learning_rate=0.1')
  exp1 = make_experiment(_config(*overrides))
  exp4 = make_experiment(_config(*overrides, 'train.grad_accum_steps=4'))
  images, labels = _batch(exp1)
  state = exp1.init_state()
  one, metrics1 = exp1.train_step(jax.tree.map(jnp.copy, state), images, labels)
  four, metrics4 = exp4.train_step(jax.tree.map(jnp.copy, state), images, labels)
  np.testing.assert_allclose(metrics4['loss'], metrics1['loss'], rtol=1e-5)
  np.testing.assert_allclose(metrics4['grad_norm'], metrics1['grad_norm'], rtol=1e-4)
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), jax.device_get(one.params),
                       jax.device_get(state.params))
  assert all(jax.tree.leaves(moved))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(four.params), jax.device_get(one.params))


def test_grad_accumulation_errors_name_the_key():
  with pytest.raises(ValueError, match=r'train.batch_size=32 is not divisible by '
                                       r'train.grad_accum_steps=5'):
    make_experiment(_config('train.grad_accum_steps=5'))
  with pytest.raises(ValueError, match='train.grad_accum_steps must be an integer >= 1'):
    make_experiment(_config('train.grad_accum_steps=0'))
  with pytest.raises(ValueError, match='train.grad_accum_steps=2 with semi.method=fixmatch'):
    make_experiment(_config('train.grad_accum_steps=2', 'semi.method=fixmatch',
                            'data.labeled_fraction=0.5'))


@pytest.mark.slow
def test_quickstart_in_bfloat16_reaches_the_float32_metrics(quickstart_run, tmp_path):
  """The runlocal quickstart trained in bfloat16 scores within 0.03 AUC / 0.06 accuracy of
  the float32 run, and its checkpoint holds float32 parameters."""
  config = config_lib.load_config_file('configs/quickstart.py:runlocal')
  config_lib.apply_overrides(config, ['train.precision=bfloat16'])
  half = train_lib.train_and_evaluate(config, str(tmp_path))
  full = results_without_run_info(quickstart_run)
  for split in ('val', 'test'):
    assert half[split]['auc'] == pytest.approx(full[split]['auc'], abs=0.03)
    assert half[split]['accuracy'] == pytest.approx(full[split]['accuracy'], abs=0.06)
  exp = make_experiment(config_lib.resolve(config))
  manager = checkpoint.make_manager(str(tmp_path), 1, 'auc', 'max')
  state, _ = checkpoint.restore(manager, manager.latest_step(), exp.abstract_state())
  assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}


@pytest.mark.slow
def test_float16_resume_is_exact(tmp_path):
  """Stopped and resumed, a float16 run (loss scale in its state, growing every 3 steps)
  ends with the parameters and loss scale of the uninterrupted run."""
  def config(*extra):
    c = config_lib.load_config_file('configs/quickstart.py:runlocal')
    config_lib.apply_overrides(c, ['train.precision=float16', 'train.loss_scale_init=65536.0',
                                   'train.loss_scale_growth_interval=3',
                                   'train.selection_mode=last', *extra])
    return c
  whole = train_lib.train_and_evaluate(config(), str(tmp_path / 'whole'))
  assert train_lib.train_and_evaluate(config('train.stop_after_steps=5'),
                                      str(tmp_path / 'resumed')) == {'stopped_at_step': 5}
  resumed = train_lib.train_and_evaluate(config(), str(tmp_path / 'resumed'))
  assert resumed['test'] == whole['test']
  exp = make_experiment(config_lib.resolve(config()))
  states = []
  for name in ('whole', 'resumed'):
    manager = checkpoint.make_manager(str(tmp_path / name), 1, 'auc', 'max')
    states.append(jax.device_get(checkpoint.restore(manager, manager.latest_step(),
                                                    exp.abstract_state())[0]))
  jax.tree.map(np.testing.assert_array_equal, states[0], states[1])
  assert float(states[0].loss_scale['scale']) > 65536.0  # it grew (few overflows early on)


@pytest.mark.slow
def test_hippocampus_unet_trains_in_bfloat16_as_in_float32(tmp_path):
  """The 3D U-Net (instance norm, deep supervision, Dice+CE) on real Hippocampus patches:
  every logged training loss of the bfloat16 run within 3 % of the float32 run's, and the
  validation Dice within 0.05 (the runlocal model barely trains; the 1000-step comparison is
  benchmarks/precision.py)."""
  shared_file('msd_hippocampus', 'dataset.json')
  losses, dice = {}, {}
  for dtype in ('float32', 'bfloat16'):
    c = config_lib.load_config_file('configs/hippocampus_unet3d.py:runlocal')
    config_lib.apply_overrides(c, [f'data.cache_dir={tmp_path / "cache"}',
                                   f'train.precision={dtype}'])
    results = train_lib.train_and_evaluate(c, str(tmp_path / dtype))
    with open(tmp_path / dtype / 'metrics.jsonl') as f:
      losses[dtype] = {r['step']: r['loss'] for r in map(json.loads, f)
                           if r['split'] == 'train'}
    dice[dtype] = results['val']['dice']
  assert sorted(losses['bfloat16']) == sorted(losses['float32']) and len(losses['float32']) == 6
  for step, loss in losses['float32'].items():
    assert losses['bfloat16'][step] == pytest.approx(loss, rel=0.03), step
  assert dice['bfloat16'] == pytest.approx(dice['float32'], abs=0.05)
