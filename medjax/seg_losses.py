"""Segmentation losses on logits ``[B, *spatial, K]`` and integer labels ``[B, *spatial]``.

Soft Dice (Milletari et al. 2016) uses softmax probabilities; ``per_case`` computes Dice per
example and class and averages (nnU-Net's 'batch Dice' off), else pools the whole batch per
class. Background (class 0) is excluded unless ``include_background``. ``smooth`` keeps
empty classes defined: an empty class predicted empty scores Dice 1.

``ignore_label``: voxels with this label value count in no loss (neither Dice's sums nor the
voxel mean of CE / focal), e.g. the voxels a self-training teacher is unsure of. ``None``
(the default) means every label is a class index.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax


def soft_dice_loss(logits: jax.Array, labels: jax.Array, *, include_background: bool = False,
                   per_case: bool = False, smooth: float = 1e-5,
                   ignore_label: Optional[int] = None) -> jax.Array:
  """``1 - mean soft Dice`` over the (foreground) classes."""
  tp, fp, fn, _ = _class_sums(logits, labels, per_case, ignore_label)
  dice = (2 * tp + smooth) / (2 * tp + fp + fn + smooth)   # [B, K] or [K]
  if not include_background:
    dice = dice[..., 1:]
  return 1.0 - jnp.mean(dice)


def _valid(labels, ignore_label):
  """``[B, *spatial]`` float mask of the voxels that count, or None when all do."""
  return None if ignore_label is None else (labels != ignore_label).astype(jnp.float32)


def _class_sums(logits, labels, per_case, ignore_label=None):
  num_classes = logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  valid = _valid(labels, ignore_label)
  if valid is not None:
    probs, onehot = probs * valid[..., None], onehot * valid[..., None]
  spatial = tuple(range(1, logits.ndim - 1))
  axes = spatial if per_case else (0,) + spatial
  tp = jnp.sum(probs * onehot, axis=axes)
  fp = jnp.sum(probs * (1 - onehot), axis=axes)
  fn = jnp.sum((1 - probs) * onehot, axis=axes)
  return tp, fp, fn, jnp.sum(onehot, axis=axes)


def tversky_loss(logits: jax.Array, labels: jax.Array, *, alpha: float = 0.3,
                 beta: float = 0.7, include_background: bool = False, per_case: bool = False,
                 smooth: float = 1e-5, ignore_label: Optional[int] = None) -> jax.Array:
  """``1 - TP / (TP + alpha FP + beta FN)`` (Salehi et al. 2017); beta > alpha weighs
  misses more than false alarms. alpha = beta = 0.5 is soft Dice."""
  tp, fp, fn, _ = _class_sums(logits, labels, per_case, ignore_label)
  index = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
  if not include_background:
    index = index[..., 1:]
  return 1.0 - jnp.mean(index)


def generalized_dice_loss(logits: jax.Array, labels: jax.Array, *,
                          include_background: bool = False, per_case: bool = False,
                          smooth: float = 1e-5, ignore_label: Optional[int] = None
                          ) -> jax.Array:
  """Generalised Dice (Sudre et al. 2017): classes weighted by 1 / (reference volume)^2,
  so small structures count as much as large ones."""
  tp, fp, fn, volume = _class_sums(logits, labels, per_case, ignore_label)
  if not include_background:
    tp, fp, fn, volume = tp[..., 1:], fp[..., 1:], fn[..., 1:], volume[..., 1:]
  weights = 1.0 / jnp.maximum(volume, 1.0) ** 2
  numerator = 2 * jnp.sum(weights * tp, axis=-1)
  denominator = jnp.sum(weights * (2 * tp + fp + fn), axis=-1)
  return 1.0 - jnp.mean((numerator + smooth) / (denominator + smooth))


def _voxel_mean(losses, labels, ignore_label):
  """Mean of per-voxel losses ``[B, *spatial]`` over the voxels that count (0 if none)."""
  valid = _valid(labels, ignore_label)
  if valid is None:
    return jnp.mean(losses)
  return jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def _class_indices(labels, ignore_label):
  """Labels safe to index with: ignored voxels become class 0 (their loss is masked out)."""
  return labels if ignore_label is None else jnp.where(labels == ignore_label, 0, labels)


def focal_loss(logits: jax.Array, labels: jax.Array, gamma: float = 2.0,
               ignore_label: Optional[int] = None) -> jax.Array:
  """Voxel-wise focal loss ``-(1 - p_t)^gamma log p_t``, averaged over voxels."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  indices = _class_indices(labels, ignore_label)
  log_pt = jnp.take_along_axis(log_p, indices[..., None], axis=-1)[..., 0]
  return _voxel_mean(-((1.0 - jnp.exp(log_pt)) ** gamma) * log_pt, labels, ignore_label)


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  ignore_label: Optional[int] = None) -> jax.Array:
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), _class_indices(labels, ignore_label))
  return _voxel_mean(losses, labels, ignore_label)


def dice_ce_loss(logits: jax.Array, labels: jax.Array, *, dice_weight: float = 1.0,
                 ce_weight: float = 1.0, ignore_label: Optional[int] = None,
                 **dice_kwargs) -> jax.Array:
  """nnU-Net's default: soft Dice + cross-entropy."""
  return (dice_weight * soft_dice_loss(logits, labels, ignore_label=ignore_label,
                                       **dice_kwargs) +
          ce_weight * cross_entropy(logits, labels, ignore_label))
