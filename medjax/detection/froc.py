"""FROC and CPM with LUNA16's rules (NumPy, host side), on world-mm points and LUNA16's CSVs.

The bookkeeping follows LUNA16's ``noduleCADEvaluationLUNA16.py``:

* A detection hits a finding (nodule) when its centre is strictly closer than the finding's
  radius (``diameter_mm / 2``; a negative diameter, as in ``annotations_excluded.csv``, means
  10 mm) to the finding's centre, in world millimetres.
* Each finding counts once, with the score of its highest-scoring hit; a finding without a hit
  is a miss (it lowers the sensitivity at every rate). Further hits on it are ignored, not false
  positives; one detection may hit two findings (it then counts for both, as LUNA16).
* A detection hitting no finding is a false positive, unless it hits an excluded ("irrelevant")
  finding: then it is ignored.
* Per scan only the ``max_per_scan`` (100) highest-scoring detections count.
* The curve: at each distinct score threshold, false positives per scan (FP count / number of
  scans, scans without findings or detections included) against sensitivity (hits / findings),
  starting at (0, 0) -- the points of scikit-learn's ``roc_curve`` rescaled as LUNA16 does.
  Sensitivity at a rate is NumPy's linear interpolation of that curve (LUNA16's ``np.interp``;
  at a rate reached exactly, the highest sensitivity there; beyond the last point, the last
  sensitivity). We interpolate exactly at 1/8, 1/4, ..., 8, where LUNA16 reads a 10001-point grid.
* CPM is the mean of the sensitivities at those seven rates. Without any finding the
  sensitivities are NaN; with findings but no hits they are 0 (LUNA16's script gives NaN).

CSV files: ``annotations.csv`` = ``seriesuid,coordX,coordY,coordZ,diameter_mm`` and detections
= ``seriesuid,coordX,coordY,coordZ,probability`` (world mm, LUNA16/ITK's LPS axes: the same axes
for both files is all that matters here).
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
DUPLICATES = ('ignore', 'false_positive')
DEFAULT_DIAMETER_MM = 10.0  # LUNA16's radius for findings stored with diameter -1
COORDINATES = ('coordX', 'coordY', 'coordZ')

Row = Tuple  # (case id, coordinate_0, ..., coordinate_n-1, value)


def scan_entries(scores: np.ndarray, hits: np.ndarray, excluded_hits: np.ndarray,
                 quality: Optional[np.ndarray] = None, duplicates: str = 'ignore'
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """One scan's contribution to the curve: the scores of its hit findings and false positives.

  Args:
    scores: ``[D]`` detection scores.
    hits: ``[D, G]`` bool, detection d hits finding g.
    excluded_hits: ``[D]`` bool, detection d hits an excluded finding.
    quality: ``[D, G]`` how well d matches g (higher = better); only for
      ``duplicates='false_positive'``, where each detection in descending score order takes the
      best-matching finding still free and further hits on a taken finding are false positives.
  Returns:
    ``(tp_scores [hit findings], fp_scores [false positives])``.
  """
  if duplicates not in DUPLICATES:
    raise ValueError(f'duplicates must be one of {DUPLICATES}, got {duplicates!r}')
  if duplicates == 'ignore':
    found = hits.any(axis=0)
    tp = np.where(hits, scores[:, None], -np.inf).max(axis=0, initial=-np.inf)[found]
    return tp, scores[~hits.any(axis=1) & ~excluded_hits]
  taken = np.zeros(hits.shape[1], bool)
  tp, fp = [], []
  for d in np.argsort(-scores, kind='mergesort'):
    free = hits[d] & ~taken
    if free.any():
      taken[np.argmax(np.where(free, quality[d], -np.inf))] = True
      tp.append(scores[d])
    elif not excluded_hits[d]:
      fp.append(scores[d])
  return np.asarray(tp, np.float64), np.asarray(fp, np.float64)


def froc_curve(tp_scores: np.ndarray, fp_scores: np.ndarray, num_findings: int,
               num_scans: int) -> Tuple[np.ndarray, np.ndarray]:
  """Points of the FROC curve: ``(fps_per_scan [P], sensitivity [P])``, from (0, 0) on.

  ``tp_scores``: the score of each hit finding; ``fp_scores``: of each false positive; one point
  per distinct score (ties between hits and false positives give one diagonal step, as ROC).
  """
  if num_scans < 1:
    raise ValueError('FROC needs at least one scan')
  scores = np.concatenate([tp_scores, fp_scores]).astype(np.float64)
  is_tp = np.concatenate([np.ones(len(tp_scores), bool), np.zeros(len(fp_scores), bool)])
  order = np.argsort(-scores, kind='mergesort')
  scores, is_tp = scores[order], is_tp[order]
  last_of_score = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, bool)
  tps = np.r_[0, np.cumsum(is_tp)[last_of_score]]
  fps = np.r_[0, np.cumsum(~is_tp)[last_of_score]]
  sensitivity = tps / num_findings if num_findings else np.full(len(tps), np.nan)
  return fps / num_scans, sensitivity


def sensitivity_at(fps: np.ndarray, sensitivity: np.ndarray,
                   rates: Sequence[float] = FP_RATES) -> np.ndarray:
  """LUNA16's linear interpolation of the curve at the given false-positive rates -> ``[R]``."""
  return np.interp(np.asarray(rates, np.float64), fps, sensitivity)


def _rate_key(rate: float) -> str:
  return f'sensitivity_at_{float(rate):g}'


def froc_summary(tp_scores: np.ndarray, fp_scores: np.ndarray, num_findings: int, num_scans: int,
                 rates: Sequence[float] = FP_RATES) -> Dict[str, float]:
  """``cpm`` (mean sensitivity at ``rates``), ``sensitivity_at_<rate>`` (e.g.
  ``sensitivity_at_0.125``, ``sensitivity_at_1``), ``sensitivity`` (at the lowest threshold) and
  counts ``num_scans``, ``num_findings``, ``num_detected``, ``num_false_positives``,
  ``false_positives_per_scan``."""
  fps, sens = froc_curve(tp_scores, fp_scores, num_findings, num_scans)
  at = sensitivity_at(fps, sens, rates)
  out = {'cpm': float(at.mean())}
  out.update({_rate_key(r): float(s) for r, s in zip(rates, at)})
  out.update(sensitivity=float(sens[-1]), num_scans=float(num_scans),
             num_findings=float(num_findings), num_detected=float(len(tp_scores)),
             num_false_positives=float(len(fp_scores)),
             false_positives_per_scan=len(fp_scores) / num_scans)
  return out


# ---------------------------------------------------------------------------- world-mm points


def _by_case(rows: Iterable[Row], what: str) -> Tuple[Dict[str, np.ndarray], int]:
  """``{case: [n, dims + 1]}`` (coordinates, then the value) and the number of coordinates."""
  grouped, dims = defaultdict(list), None
  for i, row in enumerate(rows):
    row = tuple(row)
    if dims is None:
      dims = len(row) - 2
    if len(row) != dims + 2 or dims < 1:
      raise ValueError(f'{what} row {i}: expected (case, x, y, z, value), got {row}')
    values = np.asarray(row[1:], np.float64)
    if not np.all(np.isfinite(values)):
      raise ValueError(f'{what} row {i}: NaN or infinite value in {row}')
    grouped[str(row[0])].append(values)
  return {k: np.stack(v) for k, v in grouped.items()}, dims


def _distance_hits(points: np.ndarray, findings: np.ndarray):
  """``points [D, n]``, findings ``[G, n + 1]`` (centre, diameter) -> (hits [D, G], -dist^2)."""
  diameter = np.where(findings[:, -1] < 0, DEFAULT_DIAMETER_MM, findings[:, -1])
  distance2 = np.sum((points[:, None, :] - findings[None, :, :-1]) ** 2, axis=-1)
  return distance2 < (diameter / 2) ** 2, -distance2


def froc_world(detections: Iterable[Row], annotations: Iterable[Row], series_ids: Sequence[str],
               excluded: Iterable[Row] = (), rates: Sequence[float] = FP_RATES,
               max_per_scan: Optional[int] = 100, duplicates: str = 'ignore') -> Dict[str, float]:
  """LUNA16's FROC and CPM of world-mm points (see the module docstring).

  Args:
    detections: ``[(case, x, y, z, probability)]``.
    annotations: ``[(case, x, y, z, diameter_mm)]``, the findings to detect.
    series_ids: every scan evaluated (scans without findings count for the false-positive rate);
      detections and findings of other scans are ignored (counted in ``num_ignored_detections``).
    excluded: irrelevant findings ``[(case, x, y, z, diameter_mm)]``: hits on them are ignored.
  Returns:
    ``froc_summary``'s dict plus ``num_ignored_detections``.
  """
  scans = [str(s) for s in series_ids]
  if len(set(scans)) != len(scans):
    raise ValueError('series_ids lists a scan more than once')
  dets, det_dims = _by_case(detections, 'detection')
  finds, find_dims = _by_case(annotations, 'annotation')
  irrelevant, ex_dims = _by_case(excluded, 'excluded finding')
  dims = {d for d in (det_dims, find_dims, ex_dims) if d is not None}
  if len(dims) > 1:
    raise ValueError(f'detections and findings have different numbers of coordinates: {dims}')
  dims = dims.pop() if dims else 3
  empty = np.zeros((0, dims + 1))
  tp, fp, num_findings = [], [], 0
  for scan in scans:
    det = dets.get(scan, empty)
    det = det[np.argsort(-det[:, -1], kind='mergesort')[:max_per_scan]]
    found = finds.get(scan, empty)
    hits, quality = _distance_hits(det[:, :-1], found)
    excluded_hits = _distance_hits(det[:, :-1], irrelevant.get(scan, empty))[0].any(axis=1)
    t, f = scan_entries(det[:, -1], hits, excluded_hits, quality, duplicates)
    tp.append(t)
    fp.append(f)
    num_findings += len(found)
  out = froc_summary(np.concatenate(tp or [np.zeros(0)]), np.concatenate(fp or [np.zeros(0)]),
                     num_findings, len(scans), rates)
  out['num_ignored_detections'] = float(sum(len(v) for k, v in dets.items() if k not in scans))
  return out


# ---------------------------------------------------------------------------- LUNA16 CSV files


def read_luna_csv(path: str, value_column: Optional[str] = None) -> List[Row]:
  """Rows ``(seriesuid, x, y, z, value)`` of a LUNA16 CSV (header names the columns).

  ``value_column``: ``'diameter_mm'`` (annotations) or ``'probability'`` (detections); by
  default whichever the header has. Bad rows raise ``ValueError('path:line: ...')``.
  """
  if not os.path.isfile(path):
    raise ValueError(f'{path}: file not found')
  with open(path, newline='') as f:
    lines = list(csv.reader(f))
  if not lines:
    raise ValueError(f'{path}: empty file (expected a header seriesuid,coordX,coordY,coordZ,...)')
  header = [name.strip() for name in lines[0]]
  if value_column is None:
    value_column = next((c for c in ('diameter_mm', 'probability') if c in header), 'probability')
  missing = [c for c in ('seriesuid', *COORDINATES, value_column) if c not in header]
  if missing:
    raise ValueError(f'{path}:1: header lacks {", ".join(missing)} (has {", ".join(header)})')
  columns = [header.index(c) for c in (*COORDINATES, value_column)]
  rows = []
  for line, fields in enumerate(lines[1:], start=2):
    if not fields or all(not x.strip() for x in fields):
      continue
    if len(fields) != len(header):
      raise ValueError(f'{path}:{line}: {len(fields)} fields, the header has {len(header)}')
    values = []
    for name, column in zip((*COORDINATES, value_column), columns):
      try:
        value = float(fields[column])
      except ValueError:
        raise ValueError(f'{path}:{line}: {name} {fields[column]!r} is not a number') from None
      if not math.isfinite(value):
        raise ValueError(f'{path}:{line}: {name} is {fields[column]}')
      values.append(value)
    case = fields[header.index('seriesuid')].strip()
    if not case:
      raise ValueError(f'{path}:{line}: empty seriesuid')
    rows.append((case, *values))
  return rows


def write_luna_csv(path: str, rows: Iterable[Row], value_column: str = 'probability') -> None:
  """Writes ``(seriesuid, x, y, z, value)`` rows as a LUNA16 CSV (floats round-trip exactly)."""
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['seriesuid', *COORDINATES, value_column])
    for row in rows:
      if len(row) != 5:
        raise ValueError(f'{path}: rows are (seriesuid, x, y, z, {value_column}), got {row}')
      writer.writerow([row[0], *(repr(float(v)) for v in row[1:])])


def read_series_ids(path: str) -> List[str]:
  """Scan ids, one per line (LUNA16's ``seriesuids.csv``; a ``seriesuid`` header is skipped)."""
  if not os.path.isfile(path):
    raise ValueError(f'{path}: file not found')
  with open(path, newline='') as f:
    ids = [row[0].strip() for row in csv.reader(f) if row and row[0].strip()]
  return ids[1:] if ids and ids[0] == 'seriesuid' else ids


def score_csv(detections_csv: str, annotations_csv: str,
              series_ids: Union[None, str, Sequence[str]] = None,
              excluded_csv: Optional[str] = None, rates: Sequence[float] = FP_RATES,
              max_per_scan: Optional[int] = 100) -> Dict[str, float]:
  """LUNA16's FROC / CPM of a detections CSV against an annotations CSV (``froc_world``).

  ``series_ids``: the evaluated scans, as a list or the path of a ``seriesuids.csv``; by default
  every scan named in either file (scans with neither findings nor detections are then missing
  from the false-positive rate: pass the list for LUNA16's numbers). ``excluded_csv``: LUNA16's
  ``annotations_excluded.csv``.
  """
  detections = read_luna_csv(detections_csv, 'probability')
  annotations = read_luna_csv(annotations_csv, 'diameter_mm')
  excluded = read_luna_csv(excluded_csv, 'diameter_mm') if excluded_csv else []
  if series_ids is None:
    series_ids = sorted({row[0] for row in detections} | {row[0] for row in annotations})
  elif isinstance(series_ids, str):
    series_ids = read_series_ids(series_ids)
  if not series_ids:
    raise ValueError(f'{annotations_csv}: no scans to evaluate')
  return froc_world(detections, annotations, series_ids, excluded, rates, max_per_scan)
