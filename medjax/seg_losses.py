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

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax import config as config_lib
from medjax.losses import focal_terms


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
  return _voxel_mean(focal_terms(logits, _class_indices(labels, ignore_label), gamma), labels,
                     ignore_label)


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

SEG_LOSSES = ('dice_ce', 'dice', 'ce', 'focal', 'tversky', 'generalized_dice')


def _downsample_labels(labels: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Nearest-neighbour (strided) downsampling of ``[B, *spatial]`` labels to ``shape``."""
  steps = [full // small for full, small in zip(labels.shape[1:], shape)]
  return labels[(slice(None),) + tuple(slice(None, None, s) for s in steps)]


def configured_loss(outputs, labels: jax.Array, cfg, ignore_label: Optional[int] = None
                    ) -> jax.Array:
  """The loss ``cfg`` (``config.loss``: ``name`` in :data:`SEG_LOSSES` and its options) of
  logits ``[B, *spatial, K]``, or a list of them from coarse decoder levels too (deep
  supervision: weights 1/2^i, normalised; labels ``[B, *spatial]`` downsampled to each);
  voxels labelled ``ignore_label`` count in none of its terms."""
  outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
  weights = np.array([1.0 / 2**i for i in range(len(outputs))])
  weights = weights / weights.sum()
  total = 0.0
  for weight, logits in zip(weights, outputs):
    target = _downsample_labels(labels, logits.shape[1:-1])
    kwargs = dict(include_background=cfg.include_background, per_case=not cfg.batch_dice,
                  ignore_label=ignore_label)
    if cfg.name == 'dice_ce':
      loss = dice_ce_loss(logits, target, **kwargs)
    elif cfg.name == 'dice':
      loss = soft_dice_loss(logits, target, **kwargs)
    elif cfg.name == 'tversky':
      loss = tversky_loss(logits, target, alpha=cfg.tversky_alpha, beta=cfg.tversky_beta,
                          **kwargs)
    elif cfg.name == 'generalized_dice':
      loss = generalized_dice_loss(logits, target, **kwargs)
    elif cfg.name == 'focal':
      loss = focal_loss(logits, target, cfg.focal_gamma, ignore_label)
    else:
      loss = cross_entropy(logits, target, ignore_label)
    total = total + weight * loss
  return total


@config_lib.declare
def _defaults(c) -> None:
  # Segmentation: loss.name in SEG_LOSSES.
  loss = config_lib.section(c, 'loss')
  loss.include_background = False   # Dice
  loss.batch_dice = True            # Dice pooled over the batch (nnU-Net) or per case
  loss.tversky_alpha = 0.3          # weight of false positives
  loss.tversky_beta = 0.7           # weight of false negatives
  loss.focal_gamma = 2.0
