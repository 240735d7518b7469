"""Classification losses. Each returns per-example losses ``[B]`` and per-example weights
``[B]``; :func:`weighted_mean` reduces them the way PyTorch's weighted ``mean`` does
(``sum(w * l) / sum(w)``), so class weights change the balance, not the scale."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """``n / (K * count_k)`` per class (scikit-learn's 'balanced'); labels int ``[N]``."""
  counts = np.bincount(np.asarray(labels).reshape(-1), minlength=num_classes).astype(np.float64)
  if np.any(counts == 0):
    missing = np.flatnonzero(counts == 0).tolist()
    raise ValueError(f"class_weights='balanced' but classes {missing} have no training examples")
  return counts.sum() / (num_classes * counts)


def parse_class_weights(spec: str, train_labels: np.ndarray, num_classes: int,
                        task: str) -> Optional[np.ndarray]:
  """``'none'`` | ``'balanced'`` | ``'w0,w1,...'`` -> weights ``[K]`` (or None)."""
  if spec in ('', 'none'):
    return None
  if task == 'multilabel':
    raise ValueError('class weights are not supported for multi-label tasks')
  if spec == 'balanced':
    return balanced_class_weights(train_labels, num_classes)
  try:
    weights = np.array([float(w) for w in spec.split(',')])
  except ValueError:
    raise ValueError(f"loss.class_weights must be 'none', 'balanced' or comma-separated "
                     f"numbers, got {spec!r}") from None
  if weights.shape != (num_classes,) or np.any(weights < 0):
    raise ValueError(f'loss.class_weights needs {num_classes} non-negative numbers, got {spec!r}')
  return weights


def weighted_mean(losses: jax.Array, weights: jax.Array) -> jax.Array:
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                          class_weights: Optional[Sequence[float]] = None,
                          label_smoothing: float = 0.0):
  """Logits ``[B, K]``, int labels ``[B]`` -> (losses ``[B]``, weights ``[B]``)."""
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
  return losses, _label_weights(labels, class_weights, losses.dtype)


def focal_loss(logits: jax.Array, labels: jax.Array, gamma: float = 2.0,
               class_weights: Optional[Sequence[float]] = None):
  """Multi-class focal loss (Lin et al. 2017): ``-(1 - p_t)^gamma * log p_t``.

  ``class_weights`` plays the role of the paper's alpha. gamma=0 is cross-entropy.
  """
  losses = focal_terms(logits, labels, gamma)
  return losses, _label_weights(labels, class_weights, losses.dtype)


def focal_terms(logits: jax.Array, labels: jax.Array, gamma: float) -> jax.Array:
  """``-(1 - p_t)^gamma * log p_t`` of logits ``[..., K]`` and int labels ``[...]`` (per
  example, or per voxel), softmax over the last axis in float32."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  log_pt = jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
  return -((1.0 - jnp.exp(log_pt)) ** gamma) * log_pt


def sigmoid_binary_cross_entropy(logits: jax.Array, targets: jax.Array):
  """Multi-label BCE: logits and 0/1 targets ``[B, L]`` -> mean over labels ``[B]``."""
  losses = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                              targets.astype(jnp.float32))
  return jnp.mean(losses, axis=-1), jnp.ones(losses.shape[0], losses.dtype)


def ordinal_cross_entropy(logits: jax.Array, labels: jax.Array,
                          class_weights: Optional[Sequence[float]] = None):
  """Cumulative-link loss: BCE of ``logit_k`` against ``[label > k]``, summed over k."""
  thresholds = jnp.arange(logits.shape[-1])
  targets = (labels[:, None] > thresholds[None, :]).astype(jnp.float32)
  losses = jnp.sum(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets), -1)
  return losses, _label_weights(labels, class_weights, losses.dtype)


def _label_weights(labels, class_weights, dtype):
  if class_weights is None:
    return jnp.ones(labels.shape[0], dtype)
  return jnp.asarray(class_weights, dtype)[labels]


def classification_loss(task: str, logits: jax.Array, labels: jax.Array, *, name: str = 'ce',
                        class_weights: Optional[Sequence[float]] = None,
                        focal_gamma: float = 2.0, label_smoothing: float = 0.0):
  """Dispatches on task and loss name; returns (losses ``[B]``, weights ``[B]``)."""
  if task == 'multilabel':
    return sigmoid_binary_cross_entropy(logits, labels)
  if task == 'ordinal':
    if name != 'ce':
      raise ValueError(f"ordinal task supports loss 'ce' (cumulative BCE), got '{name}'")
    return ordinal_cross_entropy(logits, labels, class_weights)
  if name == 'ce':
    return softmax_cross_entropy(logits, labels, class_weights, label_smoothing)
  if name == 'focal':
    return focal_loss(logits, labels, focal_gamma, class_weights)
  raise ValueError(f"unknown loss '{name}'; expected 'ce' or 'focal'")


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> jax.Array:
  """SimCLR's normalised-temperature cross-entropy (Chen et al. 2020) of two views' embeddings
  ``z1``, ``z2`` ``[B, D]`` (row i of each: the same image): each of the ``2B`` embeddings
  must pick its other view among the other ``2B - 1`` by cosine similarity / ``temperature``.
  Returns the mean over the ``2B`` rows."""
  z = jnp.concatenate([z1, z2]).astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  n = z.shape[0]
  logits = z @ z.T / temperature
  logits = jnp.where(jnp.eye(n, dtype=bool), -1e9, logits)  # never its own partner
  partner = (jnp.arange(n) + n // 2) % n
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, partner))
