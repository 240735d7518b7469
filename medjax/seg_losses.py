"""Segmentation losses on logits ``[B, *spatial, K]`` and integer labels ``[B, *spatial]``.

Soft Dice (Milletari et al. 2016) uses softmax probabilities; ``per_case`` computes Dice per
example and class and averages (nnU-Net's 'batch Dice' off), else pools the whole batch per
class. Background (class 0) is excluded unless ``include_background``. ``smooth`` keeps
empty classes defined: an empty class predicted empty scores Dice 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def soft_dice_loss(logits: jax.Array, labels: jax.Array, *, include_background: bool = False,
                   per_case: bool = False, smooth: float = 1e-5) -> jax.Array:
  """``1 - mean soft Dice`` over the (foreground) classes."""
  tp, fp, fn, _ = _class_sums(logits, labels, per_case)
  dice = (2 * tp + smooth) / (2 * tp + fp + fn + smooth)   # [B, K] or [K]
  if not include_background:
    dice = dice[..., 1:]
  return 1.0 - jnp.mean(dice)


def _class_sums(logits, labels, per_case):
  num_classes = logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  spatial = tuple(range(1, logits.ndim - 1))
  axes = spatial if per_case else (0,) + spatial
  tp = jnp.sum(probs * onehot, axis=axes)
  fp = jnp.sum(probs * (1 - onehot), axis=axes)
  fn = jnp.sum((1 - probs) * onehot, axis=axes)
  return tp, fp, fn, jnp.sum(onehot, axis=axes)


def tversky_loss(logits: jax.Array, labels: jax.Array, *, alpha: float = 0.3,
                 beta: float = 0.7, include_background: bool = False, per_case: bool = False,
                 smooth: float = 1e-5) -> jax.Array:
  """``1 - TP / (TP + alpha FP + beta FN)`` (Salehi et al. 2017); beta > alpha weighs
  misses more than false alarms. alpha = beta = 0.5 is soft Dice."""
  tp, fp, fn, _ = _class_sums(logits, labels, per_case)
  index = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
  if not include_background:
    index = index[..., 1:]
  return 1.0 - jnp.mean(index)


def generalized_dice_loss(logits: jax.Array, labels: jax.Array, *,
                          include_background: bool = False, per_case: bool = False,
                          smooth: float = 1e-5) -> jax.Array:
  """Generalised Dice (Sudre et al. 2017): classes weighted by 1 / (reference volume)^2,
  so small structures count as much as large ones."""
  tp, fp, fn, volume = _class_sums(logits, labels, per_case)
  if not include_background:
    tp, fp, fn, volume = tp[..., 1:], fp[..., 1:], fn[..., 1:], volume[..., 1:]
  weights = 1.0 / jnp.maximum(volume, 1.0) ** 2
  numerator = 2 * jnp.sum(weights * tp, axis=-1)
  denominator = jnp.sum(weights * (2 * tp + fp + fn), axis=-1)
  return 1.0 - jnp.mean((numerator + smooth) / (denominator + smooth))


def focal_loss(logits: jax.Array, labels: jax.Array, gamma: float = 2.0) -> jax.Array:
  """Voxel-wise focal loss ``-(1 - p_t)^gamma log p_t``, averaged over voxels."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  log_pt = jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
  return jnp.mean(-((1.0 - jnp.exp(log_pt)) ** gamma) * log_pt)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels))


def dice_ce_loss(logits: jax.Array, labels: jax.Array, *, dice_weight: float = 1.0,
                 ce_weight: float = 1.0, **dice_kwargs) -> jax.Array:
  """nnU-Net's default: soft Dice + cross-entropy."""
  return (dice_weight * soft_dice_loss(logits, labels, **dice_kwargs) +
          ce_weight * cross_entropy(logits, labels))
