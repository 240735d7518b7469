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


def _reference_steps(name, grads, params, lrs, wd, momentum=0.9, nesterov=False, b1=0.9,
                     b2=0.999, eps=1e-8):
  """Updates of ``name`` for a sequence of gradients, in float64 NumPy, written from the
  published update rules: torch.optim.SGD (dampening 0) and Adam (Kingma & Ba, bias
  corrected, eps outside the root), AdamW with decoupled decay (Loshchilov & Hutter:
  p -= lr * wd * p), Adagrad as optax writes it (accumulator starting at 0.1, eps inside the
  root). sgd/adam/adagrad add ``wd * p`` to the gradient first (PyTorch's weight_decay)."""
  p = np.array(params, np.float64)
  m, v, acc = np.zeros_like(p), np.zeros_like(p), np.full_like(p, 0.1)
  out = []
  for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
    g = np.array(g, np.float64) + (0.0 if name == 'adamw' else wd * p)
    if name == 'sgd':
      m = momentum * m + g
      u = -lr * (g + momentum * m if nesterov else m)
    elif name in ('adam', 'adamw'):
      m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
      u = -lr * (m / (1 - b1**t) / (np.sqrt(v / (1 - b2**t)) + eps))
      if name == 'adamw':
        u = u - lr * wd * p
    else:
      acc = acc + g * g
      u = -lr * g / np.sqrt(acc + eps)
    out.append(u)
    p = p + u
  return out


@pytest.mark.parametrize('name,nesterov', [('sgd', False), ('sgd', True), ('adam', False),
                                           ('adamw', False), ('adagrad', False)])
def test_every_optimizer_steps_as_its_reference_update_rule(name, nesterov):
  """Four steps with changing gradients, a weight decay and a rate that changes every step
  (step t uses schedule(t - 1), as optax counts) against the NumPy reference."""
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(4, 5)).astype(np.float32)
  initial = rng.normal(size=5).astype(np.float32)
  params, wd = {'w': jnp.asarray(initial)}, 0.05
  tx = optim.make_optimizer(_cfg(name=name, nesterov=nesterov, weight_decay=wd),
                            lambda count: 0.01 * (count + 1.0))
  state, got = tx.init(params), []
  for g in grads:
    updates, state = tx.update({'w': jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
    got.append(np.asarray(updates['w']))
  expected = _reference_steps(name, grads, initial, [0.01, 0.02, 0.03, 0.04], wd,
                              nesterov=nesterov)
  for t, (a, b) in enumerate(zip(got, expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8, err_msg=f'{name} step {t + 1}')


def test_unknown_optimizer_and_schedule():
  with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
    optim.make_optimizer(_cfg(name='lamb'), optax.constant_schedule(1.0))
  with pytest.raises(ValueError, match="unknown optimizer.schedule 'step'"):
    optim.make_schedule(_cfg(schedule='step'), 1, 1)
