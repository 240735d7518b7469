"""medjax.models.conv_tune: 'auto' on CPU follows the run's record, then (with autotuning on)
this machine's cache, then the rule; the cache and the record round-trip; unreadable ones are ignored with a warning.
No timing is asserted (only that measuring returns a time per candidate)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models import build_model, conv as conv_lib, conv_tune

LAYER = ((128, 28, 28, 64), (3, 3, 64, 64), (1, 1))
PADS = ((1, 1), (1, 1))


@pytest.fixture
def cache(tmp_path, monkeypatch):
  path = str(tmp_path / 'cache' / 'conv_impl.json')
  monkeypatch.setenv(conv_tune.CACHE_ENV, path)
  return path


def _auto():
  return conv_lib.choose_impl('cpu', *LAYER)


@pytest.fixture
def autotune(monkeypatch):
  """Autotuning on (as train.conv_autotune=True does inside a run), with a measurement that
  finds the rule's choice fastest (no timing in tests)."""
  monkeypatch.setattr(conv_tune, '_autotune', True)
  monkeypatch.setattr(conv_tune, 'measure', lambda *args, **kw: {
      impl: 1.0 if impl == conv_lib.rule_impl(*LAYER) else 2.0
      for impl in conv_tune.candidates(*LAYER)})


def test_choice_follows_the_cache_and_the_rule_without_one(cache, monkeypatch):
  assert _auto() == conv_lib.rule_impl(*LAYER) == 'matmul_wgrad'
  key = conv_tune.layer_key(*LAYER, PADS)
  assert key == 'in 128x28x28x64 k 3x3x64x64 s 1x1 p 1-1,1-1'
  conv_tune.save_choice(key, 'patch_wgrad')
  # Without autotuning a run's program depends on its config alone, not on the cache.
  assert _auto() == 'matmul_wgrad'
  monkeypatch.setattr(conv_tune, '_autotune', True)
  assert [_auto() for _ in range(3)] == ['patch_wgrad'] * 3
  assert conv_lib.choose_impl('gpu', *LAYER) == 'xla'  # off CPU the cache is not consulted


def test_cache_round_trips_and_keeps_other_machines(cache):
  os.makedirs(os.path.dirname(cache))
  with open(cache, 'w') as f:
    json.dump({'another CPU; 8 cores; jax 0.1': {'in 1 k 1 s 1 p 0-0': 'xla'}}, f)
  conv_tune.save_choice('layer a', 'xla')
  conv_tune.save_choice('layer b', 'depth_taps')
  assert conv_tune.load_cache() == {'layer a': 'xla', 'layer b': 'depth_taps'}
  with open(cache) as f:
    data = json.load(f)
  assert data['another CPU; 8 cores; jax 0.1'] == {'in 1 k 1 s 1 p 0-0': 'xla'}
  assert data[conv_tune.machine_id()] == {'layer a': 'xla', 'layer b': 'depth_taps'}
  assert jax.__version__ in conv_tune.machine_id()


@pytest.mark.parametrize('content', ['{not json', '[1, 2]', '{"MACHINE": {"k": "fastest"}}'])
def test_unreadable_cache_is_ignored_with_a_warning(cache, autotune, content):
  os.makedirs(os.path.dirname(cache))
  with open(cache, 'w') as f:
    f.write(content.replace('MACHINE', conv_tune.machine_id()))
  with pytest.warns(UserWarning, match='ignoring the convolution cache'):
    assert _auto() == 'matmul_wgrad'
  conv_tune.save_choice(conv_tune.layer_key(*LAYER, PADS), 'xla')  # replaces the bad file
  assert _auto() == 'xla'


def test_run_record_pins_choices_over_the_cache_and_is_written(cache, autotune, tmp_path):
  key = conv_tune.layer_key(*LAYER, PADS)
  conv_tune.save_choice(key, 'xla')
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  with conv_tune.recorded_in(workdir, autotune=True) as used:
    assert _auto() == 'xla'
  assert used == {key: 'xla'}
  with open(os.path.join(workdir, conv_tune.RECORD_FILE)) as f:
    assert json.load(f) == {key: 'xla'}
  conv_tune.save_choice(key, 'patch_wgrad')  # the machine's cache changes; the run does not
  with conv_tune.recorded_in(workdir):
    assert _auto() == 'xla'
  assert _auto() == 'patch_wgrad'  # outside the run, autotuning: the cache
  with open(os.path.join(workdir, conv_tune.RECORD_FILE), 'w') as f:
    f.write('{"k": 3}')
  with pytest.warns(UserWarning, match='ignoring the convolution choices'):
    with conv_tune.recorded_in(workdir, autotune=True):
      assert _auto() == 'patch_wgrad'


def test_pick_keeps_the_rule_on_near_ties():
  assert conv_tune.pick({'xla': 1.0, 'matmul_wgrad': 1.03}, 'matmul_wgrad') == 'matmul_wgrad'
  assert conv_tune.pick({'xla': 1.0, 'matmul_wgrad': 1.2}, 'matmul_wgrad') == 'xla'
  assert conv_tune.pick({'depth_stack': 2.0, 'depth_taps': 1.0}, 'xla') == 'depth_taps'
  assert conv_tune.candidates((2, 8, 8, 8, 4), (3, 3, 3, 4, 4), (1, 1, 1)) == (
      'depth_stack', 'depth_taps')
  assert conv_tune.candidates((2, 8, 8, 4), (1, 1, 4, 4), (2, 2)) == ('pointwise', 'xla')


def test_autotune_measures_once_caches_and_gives_xla_numbers(cache, tmp_path):
  model = build_model('simple_cnn', 2, features=(4,))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 1)), jnp.float32)
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  with conv_tune.recorded_in(workdir, autotune=True) as used:
    variables = model.init(jax.random.PRNGKey(0), x)
    y = model.apply(variables, x)
  assert used and set(used) == set(conv_tune.load_cache())  # every layer measured and cached
  for key, impl in used.items():
    assert impl in conv_tune.candidates(*_shapes(key))
  reference = model.clone(conv_impl='xla').apply(variables, x)
  np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-5)
  times = conv_tune.measure((2, 8, 8, 3), (1, 1, 3, 4), (1, 1), ((0, 0), (0, 0)),
                            ('pointwise', 'xla'), conv_lib.convolve, reps=1)
  assert sorted(times) == ['pointwise', 'xla'] and min(times.values()) > 0


def _shapes(key):
  parts = key.split()
  return tuple(tuple(int(d) for d in parts[i].split('x')) for i in (1, 3, 5))
