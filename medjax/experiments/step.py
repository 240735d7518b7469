"""The train step every task shares: one optimizer update from a batch, in the model's
compute precision (:mod:`medjax.precision`), optionally accumulated over micro-batches.

``train.grad_accum_steps = k`` splits the global batch into ``k`` micro-batches (example
``j`` into micro-batch ``j mod k``, so each device keeps its own rows), runs forward and
backward on each in turn and applies one update with the mean gradient: the update of the
whole batch in a ``k`` times smaller activation memory, for large 3D patches on small GPUs.
For a loss that is a mean over examples and a model without batch statistics the update is
the large batch's (up to float rounding); batch normalisation normalises each micro-batch by
its own statistics (and updates its running statistics ``k`` times), as in PyTorch.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from medjax import config as config_lib, precision


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  # Micro-batches per update (medjax.experiments.step); train.batch_size is the whole
  # update's batch and must be divisible by k x the devices.
  config_lib.section(c, 'train').grad_accum_steps = 1


def check_accumulation(config: ml_collections.ConfigDict, num_devices: int) -> int:
  """``train.grad_accum_steps``, checked against the batch and the devices."""
  k, batch = config.train.grad_accum_steps, config.train.batch_size
  if not isinstance(k, int) or k < 1:
    raise ValueError(f'train.grad_accum_steps must be an integer >= 1, got {k!r}')
  if batch % (k * num_devices):
    raise ValueError(f'train.batch_size={batch} is not divisible by train.grad_accum_steps={k}'
                     f' x {num_devices} devices')
  method = config.get('semi', {}).get('method', 'none')
  if k > 1 and method != 'none':
    raise ValueError(f'train.grad_accum_steps={k} with semi.method={method}: the '
                     "method's batch layout (labelled and unlabelled rows) is not split into "
                     'micro-batches; use train.grad_accum_steps=1')
  return k


def micro_batches(x: jax.Array, k: int) -> jax.Array:
  """``[B, ...]`` -> ``[k, B / k, ...]``, micro-batch ``i`` holding examples ``i, i + k, ...``
  (a device's contiguous rows stay on it)."""
  return jnp.moveaxis(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 1, 0)


def train_step(exp, state, images, labels) -> Tuple[Any, Dict[str, jax.Array]]:
  """One update of ``exp``'s model on a batch (``exp`` an :class:`Experiment`); traced
  inside ``jax.jit`` (and vmapped over seeds). Returns (state, ``{'loss', 'grad_norm'}``,
  plus ``'loss_scale'`` in float16)."""
  config = exp.config.train
  dropout_key = jax.random.fold_in(state.dropout_key, state.step)
  images, labels = exp.train_inputs(state, images, labels, jax.random.fold_in(dropout_key, 1))
  scale = state.loss_scale['scale'] if state.loss_scale else None

  def gradients(batch_stats, loss_state, images, labels, key):
    def loss_fn(params):
      variables = exp.apply_variables(params, batch_stats)
      has_bn = 'batch_stats' in variables
      outputs, updates = exp.model.apply(
          variables, images, train=True, rngs={'dropout': key},
          mutable=['batch_stats'] if has_bn else [])
      loss, new_loss_state = exp.loss_with_state(outputs, labels, loss_state)
      scaled = loss if scale is None else loss * scale
      return scaled, (loss, updates.get('batch_stats', batch_stats),
                      jax.lax.stop_gradient(new_loss_state))
    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return (grads,) + aux

  k = config.grad_accum_steps
  if k == 1:
    grads, loss, batch_stats, loss_state = gradients(state.batch_stats, state.loss_state,
                                                     images, labels, dropout_key)
  else:
    def accumulate(carry, micro):
      grads_sum, loss_sum, batch_stats, loss_state = carry
      (images, labels), i = micro
      grads, loss, batch_stats, loss_state = gradients(
          batch_stats, loss_state, images, labels, jax.random.fold_in(dropout_key, i))
      return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, batch_stats,
              loss_state), None
    split = jax.tree.map(lambda x: micro_batches(x, k), (images, labels))
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, loss, batch_stats, loss_state), _ = jax.lax.scan(
        accumulate, (zeros, jnp.zeros((), jnp.float32), state.batch_stats, state.loss_state),
        (split, jnp.arange(k)))
    grads = jax.tree.map(lambda g: g / k, grads)
    loss = loss / k
  if scale is not None:
    grads = jax.tree.map(lambda g: g / scale, grads)
  param_updates, opt_state = exp.tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1,
                            params=optax.apply_updates(state.params, param_updates),
                            batch_stats=batch_stats, opt_state=opt_state, loss_state=loss_state)
  metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads)}
  if scale is not None:
    finite = precision.all_finite(grads)
    new_state = precision.keep_if(finite, new_state, state.replace(step=state.step + 1))
    new_state = new_state.replace(loss_scale=precision.next_loss_scale(
        state.loss_scale, finite, config.loss_scale_growth_interval))
    metrics['loss_scale'] = scale
  return new_state, metrics
