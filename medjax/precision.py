"""Mixed precision (``train.precision``) and float16's dynamic loss scaling.

Parameters, optimizer state, batch-norm statistics, losses and metrics stay float32 whatever
the precision; a model built with ``dtype`` (every registered medjax model has the field)
computes its convolutions, matrix products and activations in the chosen dtype and returns
float32 logits. Checkpoints therefore hold float32 arrays in every precision, and a run
resumes exactly within its precision.

* ``'float32'``: everything float32 (the default; the numbers of earlier medjax versions).
* ``'bfloat16'``: float32's exponent range with an 8-bit mantissa; what TPUs and recent GPUs'
  tensor cores compute in. Needs no loss scaling.
* ``'float16'``: 5 exponent bits (largest 65504, smallest normal 6.1e-5), so small gradients
  underflow unless the loss is scaled: the loss is multiplied by ``scale`` before
  differentiation and the gradients divided by it after. A step whose gradients are not
  finite is skipped (parameters, optimizer state, batch statistics and loss statistics keep
  their values; the step counter moves on) and the scale halves; after
  ``train.loss_scale_growth_interval`` finite steps in a row it doubles (the scheme and
  defaults of PyTorch's ``GradScaler``, growth 2, backoff 0.5).
"""

from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections

from medjax import config as config_lib

PRECISIONS = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  t = config_lib.section(c, 'train')
  # Compute dtype of the model: 'float32' | 'bfloat16' | 'float16' (medjax.precision);
  # parameters, optimizer state, statistics and checkpoints stay float32.
  t.precision = 'float32'
  t.loss_scale_init = 2.0**16          # float16 only: the first loss scale
  t.loss_scale_growth_interval = 2000  # float16 only: finite steps before the scale doubles


def compute_dtype(precision: str):
  """The dtype a model computes in for ``train.precision``."""
  if precision not in PRECISIONS:
    raise ValueError(f"train.precision: unknown '{precision}'; expected one of "
                     f"{', '.join(PRECISIONS)}")
  return PRECISIONS[precision]


def init_loss_scale(train_config: ml_collections.ConfigDict) -> Dict[str, jax.Array]:
  """The loss-scale state a train state carries: ``{}`` (no scaling) unless float16, then
  ``{'scale': float32 [], 'good_steps': int32 []}``."""
  if compute_dtype(train_config.precision) != jnp.float16:
    return {}
  if not train_config.loss_scale_init > 0 or train_config.loss_scale_growth_interval < 1:
    raise ValueError('train.loss_scale_init must be > 0 and train.loss_scale_growth_interval '
                     f'>= 1; got {train_config.loss_scale_init}, '
                     f'{train_config.loss_scale_growth_interval}')
  return {'scale': jnp.asarray(train_config.loss_scale_init, jnp.float32),
          'good_steps': jnp.zeros((), jnp.int32)}


def all_finite(tree: Any) -> jax.Array:
  """True when every element of every array of ``tree`` is finite (a bool scalar)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def next_loss_scale(loss_scale: Dict[str, jax.Array], finite: jax.Array,
                    growth_interval: int) -> Dict[str, jax.Array]:
  """The loss-scale state after a step: halved after a non-finite step; doubled after
  ``growth_interval`` finite steps in a row; kept within [1, float32's largest / 2]."""
  good = jnp.where(finite, loss_scale['good_steps'] + 1, 0)
  grow = good >= growth_interval
  scale = jnp.where(finite, jnp.where(grow, loss_scale['scale'] * 2.0, loss_scale['scale']),
                    loss_scale['scale'] * 0.5)
  scale = jnp.clip(scale, 1.0, jnp.finfo(jnp.float32).max / 2)
  return {'scale': scale, 'good_steps': jnp.where(grow, 0, good).astype(jnp.int32)}


def keep_if(finite: jax.Array, new: Any, old: Any) -> Any:
  """``new`` where ``finite`` else ``old``, leaf by leaf (the skip of a non-finite step)."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def model_dtype(precision: str) -> Dict[str, Any]:
  """``build_model``'s keyword for ``train.precision``: none in float32 (so a model without
  the field still builds), else ``{'dtype': ...}``."""
  dtype = compute_dtype(precision)
  return {} if dtype == jnp.float32 else {'dtype': dtype}
