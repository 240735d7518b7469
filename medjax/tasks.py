"""Classification task types: how many logits a head has and how logits become class scores.

=============  =================  ================================  =====================
task           labels             logits                            scores
=============  =================  ================================  =====================
binary         int ``[B]`` 0/1    ``[B, 2]`` softmax                ``[B, 2]`` probabilities
multiclass     int ``[B]`` 0..K-1 ``[B, K]`` softmax                ``[B, K]`` probabilities
ordinal        int ``[B]`` 0..K-1 ``[B, K-1]`` cumulative logits    ``[B, K]`` probabilities
                                  ``logit_k = log-odds(y > k)``
multilabel     0/1 ``[B, L]``     ``[B, L]`` independent sigmoids   ``[B, L]`` probabilities
=============  =================  ================================  =====================

Binary uses a two-way softmax (as MedMNIST's reference models), so the score of the positive
class is ``scores[:, 1]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TASKS = ('binary', 'multiclass', 'ordinal', 'multilabel')


def check_task(task: str) -> str:
  if task not in TASKS:
    raise ValueError(f"unknown task '{task}'; expected one of {', '.join(TASKS)}")
  return task


def num_outputs(task: str, num_classes: int) -> int:
  """Logits the model head must produce. ``num_classes`` is labels for multilabel."""
  check_task(task)
  if task == 'binary' and num_classes != 2:
    raise ValueError(f'binary task needs num_classes=2, got {num_classes}')
  if task == 'ordinal':
    if num_classes < 2:
      raise ValueError(f'ordinal task needs at least 2 classes, got {num_classes}')
    return num_classes - 1
  return num_classes


def ordinal_probabilities(logits: jax.Array) -> jax.Array:
  """Class probabilities ``[B, K]`` from cumulative logits ``[B, K-1]``.

  ``P(y > k) = sigmoid(logit_k)`` is made non-increasing in ``k`` (cumulative minimum) so
  that ``P(y = k) = P(y > k-1) - P(y > k)`` is never negative.
  """
  exceed = jax.nn.sigmoid(logits)
  exceed = jax.lax.cummin(exceed, axis=exceed.ndim - 1)
  ones = jnp.ones(exceed.shape[:-1] + (1,), exceed.dtype)
  zeros = jnp.zeros_like(ones)
  upper = jnp.concatenate([ones, exceed], axis=-1)
  lower = jnp.concatenate([exceed, zeros], axis=-1)
  return upper - lower


def scores_from_logits(task: str, logits: jax.Array) -> jax.Array:
  """Per-class (or per-label) probabilities from the model's logits."""
  logits = logits.astype(jnp.float32)
  if task in ('binary', 'multiclass'):
    return jax.nn.softmax(logits, axis=-1)
  if task == 'multilabel':
    return jax.nn.sigmoid(logits)
  if task == 'ordinal':
    return ordinal_probabilities(logits)
  raise ValueError(f"unknown task '{task}'")
