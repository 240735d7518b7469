"""Score a folder of predicted label maps against a folder of reference label maps.

Files are matched by name. Each prediction must lie on its reference's grid (same shape and
affine): a prediction that does not overlay its scan is an error, not a low score. Distances
use the reference's voxel spacing in mm.

Writes ``scores.csv`` (one row per case and class) and ``summary.json`` (per class: mean
and sample standard deviation over cases where the metric is defined and finite, and how
many cases were undefined (NaN) or failures (inf)).
"""

from __future__ import annotations

import csv
import json
import os
from typing import Dict, List, Optional


from medjax import seg_metrics
from medjax.data import layouts, nifti


def _files(folder: str) -> Dict[str, str]:
  if not os.path.isdir(folder):
    raise ValueError(f'{folder}: not a directory')
  return {layouts.strip_suffix(f): os.path.join(folder, f) for f in sorted(os.listdir(folder))
          if f.lower().endswith(layouts.NIFTI_SUFFIXES)}


def score_folders(pred_dir: str, ref_dir: str, out_dir: str,
                  num_classes: Optional[int] = None, label_values=()) -> Dict:
  """``label_values`` maps the reference files' stored values to classes (predictions
  written by medjax already hold class indices)."""
  preds, refs = _files(pred_dir), _files(ref_dir)
  if not refs:
    raise ValueError(f'{ref_dir}: no NIfTI label files')
  missing = sorted(set(refs) - set(preds))
  if missing:
    raise ValueError(f'{pred_dir}: no prediction for {len(missing)} reference case(s): '
                     f"{', '.join(missing[:5])}")
  rows: List[Dict] = []
  for case_id, ref_path in refs.items():
    ref = nifti.read_volume(ref_path, 'label', num_classes, label_values)
    pred = nifti.read_volume(preds[case_id], 'label', num_classes)
    nifti.check_pair(ref, pred)  # the prediction must overlay its reference exactly
    k = num_classes or int(max(ref.array.max(), pred.array.max())) + 1
    for cls, values in seg_metrics.segmentation_metrics(pred.array, ref.array, k,
                                                        ref.spacing).items():
      rows.append({'case': case_id, 'class': cls, **values})
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'scores.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=['case', 'class', *seg_metrics.METRICS])
    writer.writeheader()
    writer.writerows(rows)
  summary: Dict = {'cases': len(refs), 'classes': {}}
  for cls in sorted({r['class'] for r in rows}):
    entry = {}
    for metric in seg_metrics.METRICS:
      entry[metric] = seg_metrics.metric_summary(
          [r[metric] for r in rows if r['class'] == cls])
    summary['classes'][str(cls)] = entry
  with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  return summary
