"""Optimizers and learning-rate schedules from ``config.optimizer`` (epochs -> steps)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from medjax import config as config_lib


@config_lib.declare
def _defaults(c) -> None:
  o = config_lib.section(c, 'optimizer')
  o.name = 'adam'           # 'sgd' | 'adam' | 'adamw' | 'adagrad'
  o.learning_rate = 1e-3
  o.momentum = 0.9          # sgd
  o.nesterov = False        # sgd
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  # L2 added to the gradient (PyTorch-style) for sgd/adam/adagrad; decoupled for adamw.
  o.weight_decay = 0.0
  o.grad_clip_norm = 0.0    # 0 = no clipping
  o.schedule = 'constant'   # 'constant' | 'multistep' | 'cosine'
  o.milestones_epochs = ()  # multistep: epochs at which lr *= decay_factor
  o.decay_factor = 0.1
  o.warmup_epochs = 0.0     # linear warm-up from 0, before any schedule
  # > 0 (e.g. 0.999): also keep an exponential moving average of the parameters (decay per
  # step) and validate, select, test, predict and explain with it (FixMatch's protocol).
  o.ema_decay = 0.0


def make_schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int,
                  total_steps: int) -> optax.Schedule:
  """Learning rate per step: optional linear warm-up, then constant, multi-step or cosine.

  Multi-step milestones are in epochs, as MedMNIST's ``MultiStepLR(milestones=[50, 75])``:
  the rate is multiplied by ``decay_factor`` at the first step of each milestone epoch.
  """
  base = cfg.learning_rate
  warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
  if cfg.schedule == 'constant':
    main = optax.constant_schedule(base)
  elif cfg.schedule == 'multistep':
    boundaries = {}
    for epoch in cfg.milestones_epochs:
      step = int(round(epoch * steps_per_epoch)) - warmup
      boundaries[step] = boundaries.get(step, 1.0) * cfg.decay_factor
    main = optax.piecewise_constant_schedule(base, boundaries)
  elif cfg.schedule == 'cosine':
    main = optax.cosine_decay_schedule(base, decay_steps=max(total_steps - warmup, 1))
  else:
    raise ValueError(f"unknown optimizer.schedule '{cfg.schedule}'; expected 'constant', "
                     "'multistep' or 'cosine'")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])


def make_optimizer(cfg: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """Gradient clipping -> (coupled L2 weight decay) -> optimizer."""
  parts = []
  if cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  coupled_decay = cfg.weight_decay > 0 and cfg.name != 'adamw'
  if coupled_decay:
    # PyTorch-style weight_decay: L2 term added to the gradient before the update rule.
    parts.append(optax.add_decayed_weights(cfg.weight_decay))
  if cfg.name == 'sgd':
    parts.append(optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  elif cfg.name == 'adam':
    parts.append(optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
  elif cfg.name == 'adamw':
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
  elif cfg.name == 'adagrad':
    parts.append(optax.adagrad(schedule, eps=cfg.eps))
  else:
    raise ValueError(f"unknown optimizer '{cfg.name}'; expected sgd, adam, adamw or adagrad")
  return optax.chain(*parts)


class EmaState(NamedTuple):
  """State of :func:`with_parameter_ema`: the wrapped optimizer's state and the average."""
  count: jax.Array
  inner: optax.OptState
  ema: optax.Params


def with_parameter_ema(tx: optax.GradientTransformation,
                       decay: float) -> optax.GradientTransformation:
  """``tx`` that also keeps an exponential moving average of the parameters after each
  update (the mean teacher of Tarvainen & Valpola 2017): ``ema <- a ema + (1 - a) params``
  with ``a = min(decay, 1 - 1 / (t + 1))`` at update ``t`` (1, 2, ...), so early on the
  average follows the fast-changing parameters. Read it from ``opt_state.ema``."""

  def init(params):
    return EmaState(jnp.zeros((), jnp.int32), tx.init(params),
                    jax.tree.map(jnp.array, params))

  def update(updates, state, params):
    updates, inner = tx.update(updates, state.inner, params)
    new_params = optax.apply_updates(params, updates)
    count = state.count + 1
    a = jnp.minimum(decay, 1.0 - 1.0 / (count + 1.0))
    ema = jax.tree.map(lambda e, p: a * e + (1.0 - a) * p, state.ema, new_params)
    return updates, EmaState(count, inner, ema)

  return optax.GradientTransformation(init, update)
