"""Anchors: boxes tiled over each detection level's feature grid, with sizes planned from the
training boxes (nnDetection plans them from the data; so do we).

Boxes follow :mod:`medjax.detection` 's convention: ``[..., 2 nd]`` =
``(lo_0 .. lo_{nd-1}, hi_0 .. hi_{nd-1})`` in voxels of the model's input, voxel ``i``
spanning ``[i, i + 1)``.

A level with stride ``s`` has one feature cell per ``s`` voxels; cell ``i`` covers
``[i s, (i + 1) s)`` and its anchors are centred at ``(i + 0.5) s``. Anchors are ordered
level by level, then cell by cell in C order (as ``reshape`` flattens ``[*grid, A]``), then
anchor by anchor: exactly the order of the model's flattened head outputs.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np


def level_anchors(grid_shape: Sequence[int], stride: int, sizes: np.ndarray) -> np.ndarray:
  """Anchors ``[prod(grid) * A, 2 nd]`` of one level: ``sizes [A, nd]`` (voxels) centred on
  every cell of ``grid_shape``."""
  sizes = np.asarray(sizes, np.float32)
  axes = [(np.arange(n, dtype=np.float32) + 0.5) * stride for n in grid_shape]
  centres = np.stack(np.meshgrid(*axes, indexing='ij'), -1).reshape(-1, 1, len(grid_shape))
  half = sizes[None] / 2
  boxes = np.concatenate([centres - half, centres + half], axis=-1)
  return boxes.reshape(-1, 2 * len(grid_shape))


def all_anchors(input_shape: Sequence[int], strides: Sequence[int],
                sizes: Sequence[np.ndarray]) -> Tuple[np.ndarray, List[int]]:
  """(anchors ``[N, 2 nd]`` of every level, anchors per level) for an input of spatial
  ``input_shape``; ``strides[l]`` and ``sizes[l] [A, nd]`` describe level ``l``."""
  out, counts = [], []
  for stride, level_sizes in zip(strides, sizes):
    if any(n % stride for n in input_shape):
      raise ValueError(f'input shape {tuple(input_shape)} is not divisible by the detection '
                       f'level stride {stride}')
    grid = [n // stride for n in input_shape]
    anchors = level_anchors(grid, stride, level_sizes)
    out.append(anchors)
    counts.append(len(anchors))
  return np.concatenate(out).astype(np.float32), counts


def _kmeans_log(sizes: np.ndarray, k: int, iterations: int = 50) -> np.ndarray:
  """``k`` cluster centres ``[k, nd]`` of box sizes by k-means on log sizes, started at the
  quantiles of the log volume (deterministic; sorted by volume)."""
  logs = np.log(sizes)
  order = np.argsort(logs.sum(axis=1))
  start = order[np.linspace(0, len(order) - 1, k).round().astype(int)]
  centres = logs[start].copy()
  for _ in range(iterations):
    assign = np.argmin(((logs[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    for j in range(k):
      if np.any(assign == j):
        centres[j] = logs[assign == j].mean(axis=0)
  centres = centres[np.argsort(centres.sum(axis=1))]
  return np.exp(centres)


def plan_anchor_sizes(box_sizes: np.ndarray, strides: Sequence[int], per_level: int
                      ) -> List[np.ndarray]:
  """Anchor sizes ``[per_level, nd]`` for each level, from the training boxes' sizes
  ``[N, nd]`` (voxels on the prepared grid).

  The boxes are split by volume into as many equal groups as there are levels (smallest to
  the finest level); each group's sizes are clustered into ``per_level`` shapes by k-means
  on log size, so aspect ratios per axis follow the data (flat lesions get flat anchors).
  With fewer boxes than anchors, the missing shapes are the planned ones scaled by 2^(1/2)
  steps. Anchors are at least one voxel and at least half the level's stride.
  """
  sizes = np.asarray(box_sizes, np.float64)
  if sizes.ndim != 2 or not len(sizes):
    raise ValueError('no training boxes to plan anchors from (the training cases hold no '
                     'objects): check the labels or data.root')
  sizes = np.maximum(sizes, 1.0)
  order = np.argsort(np.log(sizes).sum(axis=1))
  groups = np.array_split(sizes[order], len(strides))
  planned = []
  for stride, group in zip(strides, groups):
    if len(group) == 0:
      group = sizes
    shapes = np.unique(group, axis=0)
    if len(shapes) >= per_level:
      level = _kmeans_log(group, per_level)
    else:
      base = np.exp(np.log(group).mean(axis=0))
      level = np.stack([base * 2 ** ((j - (per_level - 1) / 2) / 2) for j in range(per_level)])
    planned.append(np.maximum(level, max(1.0, stride / 2)).astype(np.float32))
  return planned


def best_anchor_iou(box_sizes: np.ndarray, sizes: Sequence[np.ndarray]) -> np.ndarray:
  """For each box size ``[N, nd]``, the IoU of the best anchor shape centred on it (how well
  the planned anchors cover the objects; centre offsets ignored)."""
  boxes = np.asarray(box_sizes, np.float64)[:, None]
  shapes = np.concatenate([np.asarray(s, np.float64) for s in sizes])[None]
  inter = np.prod(np.minimum(boxes, shapes), axis=-1)
  union = np.prod(boxes, -1) + np.prod(shapes, -1) - inter
  return (inter / union).max(axis=1)


def describe(sizes: Sequence[np.ndarray], strides: Sequence[int], box_sizes: np.ndarray
             ) -> Dict:
  """The anchor plan as JSON: per level its stride and shapes, and how the best anchor of
  each training box overlaps it (median, 5th percentile, share below IoU 0.3)."""
  best = best_anchor_iou(box_sizes, sizes)
  levels = [{'stride': int(s), 'sizes': np.round(np.asarray(z, np.float64), 2).tolist()}
            for s, z in zip(strides, sizes)]
  return {'levels': levels,
          'training_boxes': int(len(box_sizes)),
          'best_anchor_iou_median': round(float(np.median(best)), 4),
          'best_anchor_iou_p05': round(float(np.percentile(best, 5)), 4),
          'boxes_below_iou_0.3': round(float(np.mean(best < 0.3)), 4)}
