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
  num_classes = logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  spatial = tuple(range(1, logits.ndim - 1))
  axes = spatial if per_case else (0,) + spatial
  intersection = jnp.sum(probs * onehot, axis=axes)
  denominator = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
  dice = (2 * intersection + smooth) / (denominator + smooth)   # [B, K] or [K]
  if not include_background:
    dice = dice[..., 1:]
  return 1.0 - jnp.mean(dice)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels))


def dice_ce_loss(logits: jax.Array, labels: jax.Array, *, dice_weight: float = 1.0,
                 ce_weight: float = 1.0, **dice_kwargs) -> jax.Array:
  """nnU-Net's default: soft Dice + cross-entropy."""
  return (dice_weight * soft_dice_loss(logits, labels, **dice_kwargs) +
          ce_weight * cross_entropy(logits, labels))
