"""Detection metrics in NumPy, computed on the host: COCO-style mAP for N-D boxes, FROC and CPM.

Boxes follow medjax's convention: ``[..., 2*nd]`` = ``(lo_0, .., lo_{nd-1}, hi_0, .., hi_{nd-1})``
in continuous voxel coordinates along the array's axes (index i spans [i, i+1), so a mask on
indices a..b has lo = a, hi = b + 1; size = hi - lo). Classes are 0..K-1, foreground only.

Per case (image or scan), detections are ``{'boxes': [N, 2nd], 'scores': [N], 'classes': [N]}``
and ground truth ``{'boxes': [M, 2nd], 'classes': [M]}``; both as lists in the same case order
or as dicts keyed by case id (a ground-truth case without an entry in the detections has no
detections; detections of a case without ground truth are an error: give it an empty entry).

``mean_average_precision`` is pycocotools' COCOeval for boxes (areaRng 'all', no crowd),
generalised to N-D: IoU = intersection volume / union volume; per case and class the
``max_detections`` highest-scoring detections; greedy matching in descending score order (a
detection takes the unmatched ground truth with the highest IoU >= threshold; equal IoUs: the
later one, as pycocotools); 101-point interpolated precision. AP is -1 for a class without
ground truth and such classes are left out of every mean (COCO). Default IoU thresholds are
nnDetection's 0.1:0.5:0.05; pass ``COCO_IOU_THRESHOLDS`` for COCO's 0.5:0.95.

``froc_boxes`` is FROC / CPM on boxes with LUNA16's bookkeeping (see ``froc``); the world-mm
point version, LUNA16's CSV files and ``score_csv`` live in ``medjax.detection.froc`` and are
re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from medjax.detection.froc import (FP_RATES, froc_curve, froc_summary, froc_world, read_luna_csv,
                                   read_series_ids, scan_entries, score_csv, sensitivity_at,
                                   write_luna_csv)

__all__ = ['DEFAULT_IOU_THRESHOLDS', 'COCO_IOU_THRESHOLDS', 'FP_RATES', 'HIT_RULES', 'box_iou',
           'box_hits', 'average_precision_table', 'mean_average_precision', 'froc_boxes',
           'froc_curve', 'froc_summary', 'froc_world', 'read_luna_csv', 'read_series_ids',
           'scan_entries', 'score_csv', 'sensitivity_at', 'write_luna_csv']

DEFAULT_IOU_THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.1, 0.51, 0.05), 2))
COCO_IOU_THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.5, 0.96, 0.05), 2))
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's recThrs
HIT_RULES = ('ellipsoid', 'inside', 'iou')


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of every pair: ``a [N, 2nd]``, ``b [M, 2nd]`` -> ``[N, M]``; 0 where the union is empty."""
  nd = a.shape[-1] // 2
  lo = np.maximum(a[:, None, :nd], b[None, :, :nd])
  hi = np.minimum(a[:, None, nd:], b[None, :, nd:])
  inter = np.prod(np.clip(hi - lo, 0.0, None), axis=-1)
  union = (np.prod(a[:, nd:] - a[:, :nd], -1)[:, None] + np.prod(b[:, nd:] - b[:, :nd], -1)[None]
           - inter)
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


# ---------------------------------------------------------------------------- input checks


def _case_pairs(detections, ground_truth) -> List[Tuple[str, Optional[Mapping], Mapping]]:
  """[(case id, detections or None, ground truth)] in ground-truth order."""
  if isinstance(ground_truth, Mapping) != isinstance(detections, Mapping):
    raise ValueError('detections and ground truth must both be lists (same case order) or '
                     'both dicts keyed by case id')
  if isinstance(ground_truth, Mapping):
    extra = [str(k) for k in detections if k not in ground_truth]
    if extra:
      raise ValueError(f'detections for {len(extra)} case(s) without a ground-truth entry: '
                       f'{", ".join(extra[:5])} (give cases without objects an empty entry)')
    return [(str(k), detections.get(k), gt) for k, gt in ground_truth.items()]
  detections, ground_truth = list(detections), list(ground_truth)
  if len(detections) != len(ground_truth):
    raise ValueError(f'{len(detections)} detection entries for {len(ground_truth)} '
                     'ground-truth cases (one entry per case, same order)')
  return [(str(i), d, g) for i, (d, g) in enumerate(zip(detections, ground_truth))]


def _array(entry: Optional[Mapping], key: str, case: str, what: str, dtype) -> np.ndarray:
  if entry is None:
    return np.zeros((0,), dtype)
  if not isinstance(entry, Mapping) or key not in entry:
    raise ValueError(f'case {case}: {what} needs a {key!r} entry')
  value = np.asarray(entry[key], dtype)
  if np.issubdtype(dtype, np.floating) and not np.all(np.isfinite(value)):
    raise ValueError(f'case {case}: {what} {key} contain NaN or infinite values')
  return value


def _boxes(entry, case: str, what: str, width: int) -> np.ndarray:
  boxes = _array(entry, 'boxes', case, what, np.float64)
  if boxes.size == 0:
    return boxes.reshape(0, width)
  if boxes.ndim != 2 or boxes.shape[1] != width:
    raise ValueError(f'case {case}: {what} boxes have shape {boxes.shape}, expected '
                     f'[N, {width}] (lo_0..lo_nd-1, hi_0..hi_nd-1)')
  if np.any(boxes[:, width // 2:] < boxes[:, :width // 2]):
    raise ValueError(f'case {case}: {what} boxes with hi < lo (boxes are (lo..., hi...))')
  return boxes


def _box_width(pairs, excluded=None) -> int:
  """2*nd of the first non-empty boxes (4 if every case is empty)."""
  entries = [e for _, d, g in pairs for e in (d, g)] + list(excluded or [])
  for entry in entries:
    if isinstance(entry, Mapping) and np.size(entry.get('boxes', ())) > 0:
      width = np.shape(entry['boxes'])[-1]
      if width % 2 or width < 2:
        raise ValueError(f'boxes have {width} columns; expected 2*nd (lo..., hi...)')
      return int(width)
  return 4


def _classes(entry, case: str, what: str, count: int, num_classes: Optional[int]) -> np.ndarray:
  values = _array(entry, 'classes', case, what, np.float64) if entry is not None else np.zeros(0)
  if values.shape != (count,):
    raise ValueError(f'case {case}: {what} have {count} boxes but classes of shape {values.shape}')
  if np.any(values != np.round(values)) or np.any(values < 0) or (
      num_classes is not None and np.any(values >= num_classes)):
    raise ValueError(f'case {case}: {what} classes must be integers in 0..num_classes-1 '
                     f'(num_classes={num_classes}), got {np.unique(values)[:5].tolist()}')
  return values.astype(np.int64)


def _parse(detections, ground_truth, num_classes=None, excluded=None):
  """Checked per-case arrays: [(case, det_boxes, det_scores, det_classes, gt_boxes, gt_classes)]."""
  pairs = _case_pairs(detections, ground_truth)
  width = _box_width(pairs, excluded)
  cases = []
  for case, det, gt in pairs:
    det_boxes, gt_boxes = _boxes(det, case, 'detection', width), _boxes(gt, case, 'ground truth',
                                                                         width)
    scores = _array(det, 'scores', case, 'detection', np.float64)
    if scores.shape != (len(det_boxes),):
      raise ValueError(f'case {case}: {len(det_boxes)} detection boxes but scores of shape '
                       f'{scores.shape}')
    cases.append((case, det_boxes, scores,
                  _classes(det, case, 'detection', len(det_boxes), num_classes),
                  gt_boxes, _classes(gt, case, 'ground truth', len(gt_boxes), num_classes)))
  return cases


# ---------------------------------------------------------------------------- mAP


def _match_case(boxes, scores, gt_boxes, thresholds, max_detections):
  """pycocotools' evaluateImg for one case and class.

  Returns the kept scores ``[D]`` (descending, at most ``max_detections``) and ``matched
  [T, D]``: whether each detection matched a ground truth at each IoU threshold.
  """
  order = np.argsort(-scores, kind='mergesort')[:max_detections]
  matched = np.zeros((len(thresholds), len(order)), bool)
  if len(order) == 0 or len(gt_boxes) == 0:
    return scores[order], matched
  iou = box_iou(boxes[order], gt_boxes)
  limit = np.minimum(np.asarray(thresholds), 1 - 1e-10)[:, None]  # as pycocotools
  taken = np.zeros((len(thresholds), len(gt_boxes)), bool)
  for d in range(len(order)):
    allowed = ~taken & (iou[d][None] >= limit)  # [T, G]
    # pycocotools keeps the last of equal best IoUs: argmax over the reversed row.
    best = len(gt_boxes) - 1 - np.argmax(np.where(allowed, iou[d][None], -1.0)[:, ::-1], axis=1)
    hit = allowed.any(axis=1)
    taken[hit, best[hit]] = True
    matched[:, d] = hit
  return scores[order], matched


def _average_precision(scores: np.ndarray, matched: np.ndarray, num_gt: int) -> np.ndarray:
  """COCO's 101-point AP per threshold from pooled ``scores [D]``, ``matched [T, D]`` -> ``[T]``."""
  if num_gt == 0:
    return np.full(matched.shape[0], -1.0)
  order = np.argsort(-scores, kind='mergesort')  # stable: ties keep case order, as COCO
  tp = np.cumsum(matched[:, order], axis=1, dtype=np.float64)
  fp = np.cumsum(~matched[:, order], axis=1, dtype=np.float64)
  recall = tp / num_gt
  precision = tp / (tp + fp + np.spacing(1))
  precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # the envelope
  ap = np.zeros(matched.shape[0])
  for t in range(matched.shape[0]):
    idx = np.searchsorted(recall[t], RECALL_POINTS, side='left')
    reached = idx < len(order)  # recall levels never reached count as precision 0
    ap[t] = np.where(reached, precision[t][np.minimum(idx, len(order) - 1)] if len(order) else 0,
                     0.0).mean()
  return ap


def average_precision_table(detections, ground_truth, num_classes: Optional[int] = None,
                            iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
                            max_detections: int = 100):
  """AP per IoU threshold and class.

  Returns ``(ap [T, K], num_gt [K], num_det [K])``; ``ap`` is -1 for classes without ground
  truth. ``num_classes`` defaults to 1 + the largest class present.
  """
  thresholds = np.asarray(iou_thresholds, np.float64)
  if thresholds.ndim != 1 or thresholds.size == 0 or np.any((thresholds <= 0) | (thresholds > 1)):
    raise ValueError(f'iou_thresholds must be a non-empty list in (0, 1], got {iou_thresholds}')
  if int(max_detections) < 1:
    raise ValueError(f'max_detections must be >= 1, got {max_detections}')
  cases = _parse(detections, ground_truth, num_classes)
  if num_classes is None:
    present = [c.max() for case in cases for c in (case[3], case[5]) if c.size]
    num_classes = int(max(present)) + 1 if present else 1
  ap = np.full((len(thresholds), num_classes), -1.0)
  num_gt, num_det = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64)
  for k in range(num_classes):
    scores, matched = [], []
    for _, det_boxes, det_scores, det_classes, gt_boxes, gt_classes in cases:
      mine, theirs = det_classes == k, gt_classes == k
      s, m = _match_case(det_boxes[mine], det_scores[mine], gt_boxes[theirs], thresholds,
                         int(max_detections))
      scores.append(s)
      matched.append(m)
      num_gt[k] += int(theirs.sum())
      num_det[k] += int(mine.sum())
    ap[:, k] = _average_precision(np.concatenate(scores), np.concatenate(matched, axis=1),
                                  int(num_gt[k]))
  return ap, num_gt, num_det


def _threshold_key(t: float) -> str:
  return f'{round(float(t), 4):g}'


def mean_average_precision(detections, ground_truth, num_classes: Optional[int] = None,
                           iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
                           max_detections: int = 100) -> Dict[str, float]:
  """COCO-style mAP of N-D boxes (see the module docstring).

  Returns floats: ``map`` (mean over thresholds and classes with ground truth; -1 if no class
  has any), ``ap_<t>`` per threshold (e.g. ``ap_0.1``, ``ap_0.5``: mean over classes),
  ``map_class<k>`` per class (mean over thresholds; -1 without ground truth), and counts
  ``num_cases``, ``num_gt``, ``num_detections``, ``num_gt_class<k>``.
  """
  ap, num_gt, num_det = average_precision_table(detections, ground_truth, num_classes,
                                                iou_thresholds, max_detections)
  valid = num_gt > 0
  mean = lambda values: float(values.mean()) if values.size else -1.0  # noqa: E731
  out = {'map': mean(ap[:, valid])}
  for t, row in zip(iou_thresholds, ap):
    out[f'ap_{_threshold_key(t)}'] = mean(row[valid])
  for k in range(ap.shape[1]):
    out[f'map_class{k}'] = mean(ap[:, k]) if valid[k] else -1.0
  out.update(num_cases=float(len(_case_pairs(detections, ground_truth))),
             num_gt=float(num_gt.sum()), num_detections=float(num_det.sum()))
  out.update({f'num_gt_class{k}': float(n) for k, n in enumerate(num_gt)})
  return out


# ---------------------------------------------------------------------------- FROC on boxes


def box_hits(det_boxes: np.ndarray, gt_boxes: np.ndarray, rule: str = 'ellipsoid',
             iou_threshold: float = 0.1) -> Tuple[np.ndarray, np.ndarray]:
  """Which detection hits which ground-truth box: ``[D, 2nd]``, ``[G, 2nd]`` -> hits, quality.

  Rules (``hits [D, G]`` bool; ``quality [D, G]``, higher = better match):

  * ``'ellipsoid'``: the detection's centre lies strictly inside the ellipsoid inscribed in the
    ground-truth box. For a box drawn around a sphere (LUNA16: side = diameter) this is exactly
    LUNA16's rule, centre distance < radius, in any voxel spacing. Quality: -normalised distance.
  * ``'inside'``: the detection's centre lies in the ground-truth box ``[lo, hi)`` (more lenient
    at the corners). Quality: -normalised distance.
  * ``'iou'``: IoU >= ``iou_threshold`` (nnDetection's FROC uses 0.1). Quality: IoU.
  """
  if rule not in HIT_RULES:
    raise ValueError(f'hit rule must be one of {HIT_RULES}, got {rule!r}')
  if rule == 'iou':
    iou = box_iou(det_boxes, gt_boxes)
    return iou >= iou_threshold, iou
  nd = det_boxes.shape[-1] // 2
  centre = (det_boxes[:, None, :nd] + det_boxes[:, None, nd:]) / 2  # [D, 1, nd]
  lo, hi = gt_boxes[None, :, :nd], gt_boxes[None, :, nd:]
  half = (hi - lo) / 2
  with np.errstate(divide='ignore', invalid='ignore'):
    offset = np.where(half > 0, (centre - (lo + hi) / 2) / np.where(half > 0, half, 1), np.inf)
  distance2 = np.sum(offset ** 2, axis=-1)  # [D, G], 1 on the inscribed ellipsoid
  if rule == 'ellipsoid':
    return distance2 < 1, -distance2
  return np.all((centre >= lo) & (centre < hi), axis=-1), -distance2


def froc_boxes(detections, ground_truth, hit: str = 'ellipsoid', iou_threshold: float = 0.1,
               excluded=None, class_aware: bool = True, duplicates: str = 'ignore',
               rates: Sequence[float] = FP_RATES, max_per_scan: Optional[int] = 100
               ) -> Dict[str, float]:
  """FROC / CPM of boxes (per-case inputs as ``mean_average_precision``).

  ``hit``: see ``box_hits``. ``excluded``: optional per-case ``{'boxes'}`` (list or dict, like
  ``ground_truth``) of irrelevant findings: detections hitting one are neither hits nor false
  positives. ``class_aware``: a detection only hits ground truth of its class (classes pooled
  into one curve, as nnDetection's main FROC score). ``duplicates``: ``'ignore'`` (LUNA16: more
  hits on one object are not false positives) or ``'false_positive'`` (nnDetection: greedy
  one-to-one matching in score order, the extra hits are false positives). The number of scans
  is the number of ground-truth cases. Returns ``froc_summary``'s dict.
  """
  excluded = _aligned(excluded, ground_truth)
  cases = _parse(detections, ground_truth, excluded=excluded)
  width = _box_width(_case_pairs(detections, ground_truth), excluded)
  tp, fp, num_findings = [], [], 0
  for index, (case, det_boxes, scores, det_classes, gt_boxes, gt_classes) in enumerate(cases):
    hits, quality = box_hits(det_boxes, gt_boxes, hit, iou_threshold)
    if class_aware:
      hits &= det_classes[:, None] == gt_classes[None, :]
    ex_boxes = _boxes(excluded[index], case, 'excluded finding', width)
    excluded_hits = box_hits(det_boxes, ex_boxes, hit, iou_threshold)[0].any(axis=1)
    keep = _top(scores, max_per_scan)
    t, f = scan_entries(scores[keep], hits[keep], excluded_hits[keep], quality[keep], duplicates)
    tp.append(t)
    fp.append(f)
    num_findings += len(gt_boxes)
  return froc_summary(np.concatenate(tp or [np.zeros(0)]), np.concatenate(fp or [np.zeros(0)]),
                      num_findings, len(cases), rates)


def _aligned(extra, ground_truth) -> list:
  """Per-case entries of ``extra`` (list or dict like ``ground_truth``) in ground-truth order."""
  if extra is None:
    return [None] * len(ground_truth)
  if isinstance(ground_truth, Mapping):
    if not isinstance(extra, Mapping):
      raise ValueError('excluded findings must be a dict keyed by case id, like the ground truth')
    unknown = [str(k) for k in extra if k not in ground_truth]
    if unknown:
      raise ValueError(f'excluded findings for unknown case(s): {", ".join(unknown[:5])}')
    return [extra.get(k) for k in ground_truth]
  extra = list(extra)
  if len(extra) != len(ground_truth):
    raise ValueError(f'{len(extra)} excluded-finding entries for {len(ground_truth)} cases')
  return extra


def _top(scores: np.ndarray, limit: Optional[int]) -> np.ndarray:
  """Indices of the ``limit`` highest scores (all if None), as LUNA16's 100 marks per scan."""
  order = np.argsort(-scores, kind='mergesort')
  return order if limit is None else order[:int(limit)]
