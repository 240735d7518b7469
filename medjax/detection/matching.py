"""Anchor matching by ATSS (Zhang et al. 2020, "Bridging the gap between anchor-based and
anchor-free detection"), as nnDetection trains Retina U-Net, inside the compiled step.

For each ground-truth box: on every level, the ``k`` anchors whose centres are nearest its
centre are candidates; the IoU threshold is the mean plus the standard deviation of the
candidates' IoUs (adaptive: a small object's few good anchors pass, a large object's many
do); a candidate is positive if its IoU reaches the threshold and its centre lies inside the
box. An anchor positive for several boxes takes the one it overlaps most. Shapes are fixed
(``max_boxes`` padded boxes with a validity mask), so one program matches any batch, and a
scan without boxes gets no positive anchor.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from medjax.detection import boxes as box_ops


def atss_match(anchors: jax.Array, level_counts: Sequence[int], gt_boxes: jax.Array,
               gt_valid: jax.Array, candidates_per_level: int = 4) -> jax.Array:
  """The ground-truth index each anchor is matched to, ``-1`` for background.

  Args:
    anchors: ``[N, 2 nd]`` of all levels, level by level (:func:`anchors.all_anchors`).
    level_counts: anchors per level (static).
    gt_boxes: ``[M, 2 nd]`` padded ground truth; ``gt_valid [M]`` marks the real ones.
    candidates_per_level: ``k`` (nnDetection uses 4 in 3D; the ATSS paper 9 in 2D).
  Returns:
    ``[N]`` int32.
  """
  nd = anchors.shape[-1] // 2
  anchor_centres = (anchors[:, :nd] + anchors[:, nd:]) / 2
  gt_centres = (gt_boxes[:, :nd] + gt_boxes[:, nd:]) / 2
  candidates, start = [], 0
  for count in level_counts:
    centres = anchor_centres[start:start + count]
    dist = jnp.sum((gt_centres[:, None] - centres[None]) ** 2, axis=-1)      # [M, n_l]
    k = min(candidates_per_level, count)
    _, idx = jax.lax.top_k(-dist, k)                                         # [M, k]
    candidates.append(idx + start)
    start += count
  candidates = jnp.concatenate(candidates, axis=1)                           # [M, C]
  cand_iou = box_ops.iou(gt_boxes[:, None], anchors[candidates])             # [M, C]
  threshold = cand_iou.mean(axis=1) + cand_iou.std(axis=1)                   # [M]
  cand_centres = anchor_centres[candidates]                                  # [M, C, nd]
  inside = jnp.all((cand_centres > gt_boxes[:, None, :nd])
                   & (cand_centres < gt_boxes[:, None, nd:]), axis=-1)
  positive = (cand_iou >= threshold[:, None]) & inside & gt_valid[:, None] & (cand_iou > 0)
  rows = jnp.broadcast_to(jnp.arange(gt_boxes.shape[0])[:, None], candidates.shape)
  scores = jnp.full((gt_boxes.shape[0], anchors.shape[0]), -1.0, cand_iou.dtype)
  scores = scores.at[rows, candidates].max(jnp.where(positive, cand_iou, -1.0))
  best_gt = jnp.argmax(scores, axis=0)                                       # [N]
  best = jnp.max(scores, axis=0)
  return jnp.where(best > 0, best_gt, -1).astype(jnp.int32)
