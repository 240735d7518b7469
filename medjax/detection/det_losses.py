"""Retina U-Net's training loss: anchor classification, box regression and the auxiliary
segmentation, traced inside the compiled step (N-D, fixed shapes).

* classification (``loss.name``): ``'focal'`` (sigmoid focal loss over all anchors and
  classes, Lin et al. 2017, normalised by the positives) or ``'bce_hnm'`` (binary cross
  entropy over the positives and the hardest negatives, ``loss.hnm_ratio`` negatives per
  positive and at least ``loss.hnm_min_negatives``; nnDetection's hard-negative mining);
* boxes: ``1 - GIoU`` of the decoded prediction and the matched box, mean over positives
  (``loss.box_weight``);
* segmentation: Dice + CE of the auxiliary head against the class map (``loss.seg_weight``;
  Retina U-Net's extra supervision). A batch without any positive anchor contributes only
  negatives and segmentation: scans without objects train as all-negative.
"""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import ml_collections
import optax

from medjax import config as config_lib, seg_losses
from medjax.detection import boxes as box_ops, matching

DETECTION_LOSSES = ('focal', 'bce_hnm')


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  loss = config_lib.section(c, 'loss')
  loss.focal_alpha = 0.25          # detection focal loss: weight of positive targets
  loss.hnm_ratio = 3.0             # detection bce_hnm: hardest negatives per positive
  loss.hnm_min_negatives = 16      # ... and at least this many per image
  loss.box_weight = 1.0            # detection: weight of 1 - GIoU
  loss.seg_weight = 1.0            # detection: weight of the auxiliary segmentation loss
  loss.atss_candidates = 4         # detection: ATSS candidates per level and box


def sigmoid_focal(logits: jax.Array, targets: jax.Array, gamma: float, alpha: float
                  ) -> jax.Array:
  """Elementwise sigmoid focal loss of logits and 0/1 targets (same shape)."""
  ce = optax.sigmoid_binary_cross_entropy(logits, targets)
  p = jax.nn.sigmoid(logits)
  p_t = p * targets + (1 - p) * (1 - targets)
  weight = alpha * targets + (1 - alpha) * (1 - targets)
  return weight * (1 - p_t) ** gamma * ce


def hard_negative_bce(logits: jax.Array, targets: jax.Array, positive: jax.Array,
                      ratio: float, min_negatives: int) -> jax.Array:
  """BCE over the positive anchors and the hardest negatives of one image.

  Args:
    logits, targets: ``[N, K]``; positive: ``[N]`` bool.
  Returns:
    scalar: the mean over the selected anchors of their summed class losses.
  """
  losses = optax.sigmoid_binary_cross_entropy(logits, targets).sum(axis=-1)  # [N]
  num_pos = positive.sum()
  num_neg = jnp.minimum((~positive).sum(),
                        jnp.maximum(jnp.ceil(ratio * num_pos), min_negatives))
  negative_loss = jnp.where(positive, -jnp.inf, jax.lax.stop_gradient(losses))
  rank = jnp.argsort(jnp.argsort(-negative_loss))       # 0 = hardest negative
  chosen = positive | (rank < num_neg)
  return jnp.sum(jnp.where(chosen, losses, 0.0)) / jnp.maximum(chosen.sum(), 1)


def image_loss(outputs: Dict[str, jax.Array], targets: Dict[str, jax.Array],
               anchors: jax.Array, level_counts, cfg) -> Dict[str, jax.Array]:
  """Classification and box losses of one image.

  Args:
    outputs: ``class_logits [N, K]``, ``box_deltas [N, 2 nd]``.
    targets: ``boxes [M, 2 nd]``, ``classes [M]``, ``valid [M]``.
    anchors: ``[N, 2 nd]``.
  """
  logits = outputs['class_logits'].astype(jnp.float32)
  matched = matching.atss_match(anchors, level_counts, targets['boxes'], targets['valid'],
                                cfg.atss_candidates)
  positive = matched >= 0
  index = jnp.maximum(matched, 0)
  classes = targets['classes'][index]
  onehot = jax.nn.one_hot(classes, logits.shape[-1]) * positive[:, None]
  num_pos = positive.sum()
  if cfg.name == 'focal':
    cls = sigmoid_focal(logits, onehot, cfg.focal_gamma, cfg.focal_alpha).sum()
    cls = cls / jnp.maximum(num_pos, 1)
  else:
    cls = hard_negative_bce(logits, onehot, positive, cfg.hnm_ratio, cfg.hnm_min_negatives)
  predicted = box_ops.decode(outputs['box_deltas'].astype(jnp.float32), anchors)
  giou = box_ops.giou(predicted, targets['boxes'][index])
  box = jnp.sum(jnp.where(positive, 1.0 - giou, 0.0)) / jnp.maximum(num_pos, 1)
  return {'cls': cls, 'box': box, 'positives': num_pos}


def pooled_class_map(seg: jax.Array, shape) -> jax.Array:
  """A class map ``[B, *spatial]`` at a coarser ``shape`` by max-pooling blocks (a network
  whose first level is strided segments at that resolution; max keeps small objects that
  strided sampling would drop)."""
  factors = tuple(full // small for full, small in zip(seg.shape[1:], shape))
  if all(f == 1 for f in factors):
    return seg
  window = (1,) + factors
  return jax.lax.reduce_window(seg, jnp.array(0, seg.dtype), jax.lax.max, window, window,
                               'VALID')


def detection_loss(outputs: Dict[str, jax.Array], targets: Dict[str, jax.Array],
                   anchors: jax.Array, level_counts, cfg) -> jax.Array:
  """The total loss of a batch: mean over images of classification and box terms, plus the
  auxiliary segmentation loss of ``seg_logits [B, *spatial', K + 1]`` against
  ``targets['seg'] [B, *spatial]`` (max-pooled to ``spatial'`` when the network's first level
  is strided) when the model has that head."""
  per_image = jax.vmap(lambda o, t: image_loss(o, t, anchors, level_counts, cfg))(
      {k: outputs[k] for k in ('class_logits', 'box_deltas')},
      {k: targets[k] for k in ('boxes', 'classes', 'valid')})
  total = per_image['cls'].mean() + cfg.box_weight * per_image['box'].mean()
  if 'seg_logits' in outputs and cfg.seg_weight:
    seg_logits = outputs['seg_logits']
    total = total + cfg.seg_weight * seg_losses.dice_ce_loss(
        seg_logits, pooled_class_map(targets['seg'], seg_logits.shape[1:-1]),
        include_background=False, per_case=False)
  return total
