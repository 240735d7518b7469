"""Schedules in epochs -> steps, and optimizer options."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax import config as config_lib, optim


def _cfg(**kw):
  c = config_lib.default_config().optimizer
  c.update(kw)
  return c


def test_multistep_matches_medmnist_milestones():
  # 100 epochs of 4 steps, x0.1 at epochs 50 and 75 (PyTorch MultiStepLR stepped per epoch).
  sched = optim.make_schedule(_cfg(schedule='multistep', milestones_epochs=(50, 75)), 4, 400)
  for step, lr in [(0, 1e-3), (199, 1e-3), (200, 1e-4), (299, 1e-4), (300, 1e-5), (399, 1e-5)]:
    assert float(sched(step)) == pytest.approx(lr, rel=1e-6), step


def test_warmup_then_cosine():
  sched = optim.make_schedule(_cfg(schedule='cosine', warmup_epochs=2, learning_rate=0.1), 5, 60)
  assert float(sched(0)) == 0.0
  assert float(sched(5)) == pytest.approx(0.05)
  assert float(sched(10)) == pytest.approx(0.1)
  assert float(sched(35)) == pytest.approx(0.05, rel=1e-5)  # half-way through the cosine
  assert float(sched(60)) == pytest.approx(0.0, abs=1e-8)


def test_sgd_weight_decay_and_clipping_match_reference():
  params = {'w': jnp.array([1.0, -2.0])}
  grads = {'w': jnp.array([30.0, 40.0])}  # norm 50
  tx = optim.make_optimizer(_cfg(name='sgd', learning_rate=0.1, momentum=0.0,
                                 weight_decay=0.01, grad_clip_norm=5.0),
                            optax.constant_schedule(0.1))
  updates, _ = tx.update(grads, tx.init(params), params)
  clipped = np.array([3.0, 4.0])
  expected = -0.1 * (clipped + 0.01 * np.array([1.0, -2.0]))  # torch.optim.SGD semantics
  np.testing.assert_allclose(updates['w'], expected, rtol=1e-6)


@pytest.mark.parametrize('name', ['sgd', 'adam', 'adamw', 'adagrad'])
def test_every_optimizer_builds_and_steps(name):
  params = {'w': jnp.ones(3)}
  tx = optim.make_optimizer(_cfg(name=name, nesterov=name == 'sgd', weight_decay=1e-4),
                            optax.constant_schedule(1e-2))
  updates, _ = tx.update({'w': jnp.ones(3)}, tx.init(params), params)
  assert np.all(np.asarray(updates['w']) < 0)


def test_unknown_optimizer_and_schedule():
  with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
    optim.make_optimizer(_cfg(name='lamb'), optax.constant_schedule(1.0))
  with pytest.raises(ValueError, match="unknown optimizer.schedule 'step'"):
    optim.make_schedule(_cfg(schedule='step'), 1, 1)
