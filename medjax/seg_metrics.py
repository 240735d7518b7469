"""Segmentation metrics per class, with distances in millimetres (NumPy/SciPy).

Definitions, for a binary prediction P and reference R of one class:

* Dice ``2|P∩R| / (|P|+|R|)``, IoU ``|P∩R| / |P∪R|``, sensitivity ``|P∩R| / |R|``,
  precision ``|P∩R| / |P|``.
* Surfaces: voxels of a mask with at least one 6-connected (4-connected in 2D) neighbour
  outside it; voxels on the array border count as surface.
* Directed surface distances: for each surface voxel of one mask, the Euclidean distance in
  mm (voxel spacing applied per axis, so anisotropic grids are exact) to the nearest surface
  voxel of the other.
* HD95: the larger of the two directed 95th percentiles (MONAI's ``percentile=95``).
  ASSD: the mean of all distances of both directions.

Empty masks (documented conventions):

=================  =====  ====  ===========  =========  ============
case               Dice   IoU   sensitivity  precision  HD95 / ASSD
=================  =====  ====  ===========  =========  ============
both empty         NaN    NaN   NaN          NaN        NaN
reference empty    0      0     NaN          0          inf
prediction empty   0      0     0            NaN        inf
=================  =====  ====  ===========  =========  ============

NaN means 'not defined for this case' and is skipped by means (the class is absent from
that case); inf marks a detection failure and is reported, not hidden.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np
from scipy import ndimage

from medjax.metrics import mean_sd


def surface(mask: np.ndarray) -> np.ndarray:
  """Boundary voxels of a boolean mask (face connectivity)."""
  mask = np.asarray(mask, bool)
  if not mask.any():
    return mask.copy()
  structure = ndimage.generate_binary_structure(mask.ndim, 1)
  eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
  return mask & ~eroded


def directed_surface_distances(a: np.ndarray, b: np.ndarray,
                               spacing: Sequence[float]) -> np.ndarray:
  """Distances (mm) from each surface voxel of ``a`` to the nearest surface voxel of ``b``."""
  surface_a, surface_b = surface(a), surface(b)
  distance_to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)
  return distance_to_b[surface_a]


# What binary_metrics returns for every class, in this order.
METRICS = ('dice', 'iou', 'sensitivity', 'precision', 'hd95', 'assd')


def binary_metrics(pred: np.ndarray, ref: np.ndarray,
                   spacing: Sequence[float]) -> Dict[str, float]:
  """Dice, IoU, sensitivity, precision, HD95 and ASSD (mm) of one class."""
  pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
  if pred.shape != ref.shape:
    raise ValueError(f'prediction shape {pred.shape} differs from reference {ref.shape}')
  if len(spacing) != pred.ndim:
    raise ValueError(f'spacing {tuple(spacing)} needs one value per axis of {pred.shape}')
  n_pred, n_ref = int(pred.sum()), int(ref.sum())
  inter = int(np.sum(pred & ref))
  nan, inf = float('nan'), float('inf')
  if n_pred == 0 and n_ref == 0:
    return dict.fromkeys(METRICS, nan)
  out = dict(dice=2 * inter / (n_pred + n_ref), iou=inter / (n_pred + n_ref - inter),
             sensitivity=inter / n_ref if n_ref else nan,
             precision=inter / n_pred if n_pred else nan)
  if n_pred == 0 or n_ref == 0:
    out.update(hd95=inf, assd=inf)
    return out
  d_pred = directed_surface_distances(pred, ref, spacing)
  d_ref = directed_surface_distances(ref, pred, spacing)
  out['hd95'] = float(max(np.percentile(d_pred, 95), np.percentile(d_ref, 95)))
  out['assd'] = float((d_pred.sum() + d_ref.sum()) / (d_pred.size + d_ref.size))
  return out


def segmentation_metrics(pred: np.ndarray, ref: np.ndarray, num_classes: int,
                         spacing: Sequence[float]) -> Dict[int, Dict[str, float]]:
  """:func:`binary_metrics` of every foreground class ``1..num_classes-1`` of label maps."""
  pred, ref = np.asarray(pred), np.asarray(ref)
  return {k: binary_metrics(pred == k, ref == k, spacing) for k in range(1, num_classes)}


def class_rows(summary: Dict, class_names: Sequence[str]) -> list:
  """One row per class of a :func:`summarize_cases` summary, for tables: Dice, IoU,
  sensitivity, precision, HD95 and ASSD in mm, and the cases where HD95 is undefined."""
  rows = []
  for name in class_names:
    row = {'class': name}
    for metric, label in (('dice', 'Dice'), ('iou', 'IoU'), ('sensitivity', 'sensitivity'),
                          ('precision', 'precision'), ('hd95', 'HD95 (mm)'),
                          ('assd', 'ASSD (mm)'), ('hd95_failures', 'HD95 undefined')):
      if f'{metric}_{name}' in summary:
        row[label] = summary[f'{metric}_{name}']
    rows.append(row)
  return rows


def metric_summary(values) -> Dict[str, float]:
  """One metric of one class over cases: mean and sample sd of the defined finite values,
  how many there are, how many are undefined (NaN) and how many are failures (inf)."""
  values = np.asarray(values, np.float64)
  mean, sd = mean_sd(values)
  return {'mean': mean, 'sd': sd, 'n': int(np.isfinite(values).sum()),
          'undefined': int(np.isnan(values).sum()), 'failures_inf': int(np.isinf(values).sum())}


def summarize_cases(per_case: Dict[str, Dict[int, Dict[str, float]]], class_names) -> Dict:
  """Means over cases (skipping undefined values) per class and overall, plus per-case."""
  out: Dict = {'num_cases': len(per_case)}
  classes = sorted({k for metrics in per_case.values() for k in metrics})
  dice_means = []
  for k in classes:
    for metric in METRICS:
      stats = metric_summary([per_case[c][k][metric] for c in per_case])
      out[f'{metric}_{class_names[k]}'] = stats['mean']
      if metric == 'hd95':  # missed or spurious structures: reported, not averaged away
        out[f'hd95_failures_{class_names[k]}'] = stats['failures_inf']
      if metric == 'dice':
        dice_means.append(out[f'dice_{class_names[k]}'])
  out['dice'] = float(np.nanmean(dice_means)) if dice_means else math.nan
  out['per_case'] = {c: {class_names[k]: v for k, v in m.items()} for c, m in per_case.items()}
  return out
