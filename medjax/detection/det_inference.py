"""Whole-image detection by sliding windows: boxes of every window (and test-time mirror)
decoded, moved to image coordinates and merged by class-aware NMS or weighted box
clustering; then boxes mapped from the prepared grid back to the file's voxels.

Windows are the segmentation's (:func:`medjax.inference.window_starts`, ``inference.overlap``);
each window keeps its ``detection.max_per_window`` best (anchor, class) scores above
``detection.score_threshold``, inside the compiled program (fixed shapes). A mirrored window's
boxes are mirrored back before merging.
"""

from __future__ import annotations

import itertools
from typing import Callable, Dict, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medjax import config as config_lib
from medjax.detection import boxes as box_ops
from medjax.inference import window_starts

Detections = Dict[str, np.ndarray]  # boxes [n, 2nd], scores [n], classes [n]


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  d = config_lib.section(c, 'detection')
  d.score_threshold = 0.05     # detections below are dropped (before merging)
  d.max_per_window = 200       # best (anchor, class) pairs kept per window
  d.merge = 'nms'              # 'nms' | 'wbc' (weighted box clustering) across windows
  d.merge_iou = 0.5            # IoU above which boxes of one class are merged / suppressed
  d.max_detections = 100       # per image or scan


def window_detections(outputs: Mapping[str, jax.Array], anchors: jax.Array, max_out: int
                      ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """The ``max_out`` best (anchor, class) pairs of each window of a batch: ``(boxes
  [B, max_out, 2nd], scores [B, max_out], classes [B, max_out])`` in window coordinates."""
  scores = jax.nn.sigmoid(outputs['class_logits'])                   # [B, N, K]
  batch, n, k = scores.shape
  top, flat = jax.lax.top_k(scores.reshape(batch, n * k), min(max_out, n * k))
  anchor_index, classes = flat // k, flat % k
  deltas = jnp.take_along_axis(outputs['box_deltas'], anchor_index[..., None], axis=1)
  boxes = box_ops.decode(deltas, anchors[anchor_index])
  return boxes, top, classes.astype(jnp.int32)


def flip_boxes(boxes: np.ndarray, axes: Sequence[int], shape: Sequence[int]) -> np.ndarray:
  """Boxes ``[..., 2nd]`` mirrored along ``axes`` of an array of spatial ``shape``."""
  boxes = np.array(boxes)
  nd = boxes.shape[-1] // 2
  for a in axes:
    lo, hi = boxes[..., a].copy(), boxes[..., nd + a].copy()
    boxes[..., a], boxes[..., nd + a] = shape[a] - hi, shape[a] - lo
  return boxes


def merge(found: Detections, cfg: ml_collections.ConfigDict) -> Detections:
  """Merges overlapping detections of one image (``detection.merge``), at most
  ``detection.max_detections`` kept, best first."""
  n = len(found['scores'])
  if n == 0:
    return found
  size = 1 << max(6, int(np.ceil(np.log2(n))))  # padded to a power of 2: few compilations
  pad = size - n
  boxes = np.concatenate([found['boxes'], np.zeros((pad, found['boxes'].shape[1]))])
  scores = np.concatenate([found['scores'], np.full(pad, -np.inf)])
  classes = np.concatenate([found['classes'], np.zeros(pad, np.int32)])
  keep = int(cfg.max_detections)
  if cfg.merge == 'wbc':
    out = box_ops.weighted_box_clustering(boxes, scores, cfg.merge_iou, keep, classes=classes)
    valid = np.asarray(out.valid)
    seeds = np.asarray(out.seeds)[valid]
    return {'boxes': np.asarray(out.boxes)[valid], 'scores': np.asarray(out.scores)[valid],
            'classes': classes[seeds].astype(np.int32)}
  if cfg.merge != 'nms':
    raise ValueError(f"detection.merge='{cfg.merge}': expected 'nms' or 'wbc'")
  index, valid = box_ops.batched_nms(boxes, scores, classes, cfg.merge_iou, keep)
  index = np.asarray(index)[np.asarray(valid)]
  return {'boxes': boxes[index].astype(np.float32), 'scores': scores[index].astype(np.float32),
          'classes': classes[index].astype(np.int32)}


def detect_image(window_fn: Callable[[np.ndarray], Tuple[np.ndarray, ...]], image: np.ndarray,
                 patch_size: Sequence[int], batch_size: int, overlap: float,
                 mirror_axes: Sequence[int], cfg: ml_collections.ConfigDict) -> Detections:
  """Detections of a prepared image ``[*spatial, C]`` in its voxel coordinates.

  ``window_fn`` maps windows ``[batch_size, *patch, C]`` to :func:`window_detections`'s
  arrays. Images smaller than a window are zero-padded (boxes are clipped back)."""
  spatial = image.shape[:-1]
  patch = tuple(int(p) for p in patch_size)
  pads = [(0, max(0, p - s)) for s, p in zip(spatial, patch)] + [(0, 0)]
  padded = np.pad(image, pads) if any(p[1] for p in pads) else image
  starts = list(itertools.product(*[window_starts(s, p, overlap)
                                    for s, p in zip(padded.shape[:-1], patch)]))
  flips = [c for n in range(len(mirror_axes) + 1)
           for c in itertools.combinations(mirror_axes, n)]
  jobs = [(st, axes) for st in starts for axes in flips]
  found = {'boxes': [], 'scores': [], 'classes': []}
  for i in range(0, len(jobs), batch_size):
    chunk = jobs[i:i + batch_size]
    windows = np.zeros((batch_size,) + patch + image.shape[-1:], np.float32)
    for row, (st, axes) in enumerate(chunk):
      window = padded[tuple(slice(s, s + p) for s, p in zip(st, patch))]
      windows[row] = np.flip(window, axes) if axes else window
    boxes, scores, classes = (np.asarray(a) for a in window_fn(windows))
    for row, (st, axes) in enumerate(chunk):
      keep = scores[row] > cfg.score_threshold
      b = flip_boxes(boxes[row][keep], axes, patch) if axes else boxes[row][keep]
      found['boxes'].append(b + np.tile(np.asarray(st, np.float32), 2))
      found['scores'].append(scores[row][keep])
      found['classes'].append(classes[row][keep])
  found = {k: np.concatenate(v) for k, v in found.items()}
  found['boxes'] = np.asarray(box_ops.clip_boxes(found['boxes'], spatial))  # [n, 2nd]
  merged = merge(found, cfg)
  nonempty = np.all(merged['boxes'][:, len(patch):] > merged['boxes'][:, :len(patch)], axis=1)
  return {k: v[nonempty] for k, v in merged.items()}


def prepared_to_original(boxes: np.ndarray, record: Mapping) -> np.ndarray:
  """Boxes on a case's prepared grid -> boxes on its original file's voxel grid (undoing the
  crop, the resampling and the reorientation; each is a per-axis scale, shift, flip or axis
  permutation, so a box stays a box)."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, boxes.shape[-1])
  nd = boxes.shape[1] // 2
  crop_lo = np.array([a for a, _ in record['crop_box']], np.float64)
  lo, hi = boxes[:, :nd] + crop_lo, boxes[:, nd:] + crop_lo
  if 'canonical_shape' not in record:  # 2D: no resampling or reorientation
    return np.concatenate([lo, hi], 1).astype(np.float32)
  # Box edges in index coordinates are at lo - 0.5 and hi - 0.5; map both corners.
  to_world = np.asarray(record['affine'], np.float64)
  from_world = np.linalg.inv(np.asarray(record['original_affine'], np.float64))
  transform = from_world @ to_world
  corners = [transform[:3, :3] @ (c - 0.5).T + transform[:3, 3:] for c in (lo, hi)]
  a, b = corners[0].T + 0.5, corners[1].T + 0.5
  return np.concatenate([np.minimum(a, b), np.maximum(a, b)], 1).astype(np.float32)
