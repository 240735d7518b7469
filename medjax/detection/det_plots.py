"""A detector's figures from its workdir's files alone: the validation FROC curve and, for 2D
images, the best and the worst validation case with the objects' and the detections' boxes."""

from __future__ import annotations

import json
import os
from typing import Dict

import numpy as np

from medjax import plots
from medjax.data import layouts
from medjax.detection import det_metrics

RATES = (0.125, 0.25, 0.5, 1, 2, 4, 8)
SHOWN_SCORE = 0.3  # detections drawn on the case figures


def froc_figure(metrics: Dict, title: str):
  """Sensitivity against false positives per case (log axis), with the CPM."""
  fig = plots.new_figure(4.6, 3.4)
  ax = fig.subplots()
  values = [metrics.get(f'sensitivity_at_{r:g}') for r in RATES]
  ax.semilogx(RATES, values, 'o-', ms=4)
  ax.set_xticks(RATES, [f'{r:g}' for r in RATES])
  ax.set(xlabel='false positives per case', ylabel='sensitivity', ylim=(0, 1.02),
         title=f"{title}: CPM {metrics.get('cpm', float('nan')):.3f}")
  ax.grid(alpha=0.3, which='both')
  return fig


def case_quality(case: Dict) -> float:
  """F1 of the detections scoring at least SHOWN_SCORE against the objects, a hit at IoU
  0.1 (for ranking cases)."""
  truth = np.asarray(case['truth_voxel'], np.float64).reshape(-1, 4)
  keep = np.asarray(case['scores']) >= SHOWN_SCORE
  found = np.asarray(case['boxes_voxel'], np.float64).reshape(-1, 4)[keep]
  if not len(truth) and not len(found):
    return 1.0
  hits = det_metrics.box_iou(found, truth) >= 0.1 if len(found) and len(truth) else \
      np.zeros((len(found), len(truth)), bool)
  tp = int(hits.any(axis=0).sum())
  return 2 * tp / (len(truth) + len(found))


def case_figure(case: Dict, title: str):
  """A 2D image with the objects' boxes (green) and the detections' (red, with scores)."""
  from matplotlib.patches import Rectangle
  image = layouts.read_image_2d(case['image'], 'image')[..., 0]
  fig = plots.new_figure(4.2, 4.4)
  ax = fig.subplots()
  ax.imshow(image, cmap='gray')
  for box in case['truth_voxel']:
    ax.add_patch(Rectangle((box[1] - 0.5, box[0] - 0.5), box[3] - box[1], box[2] - box[0],
                           fill=False, ec='#4daf4a', lw=1.5))
  for box, score in zip(case['boxes_voxel'], case['scores']):
    if score >= SHOWN_SCORE:
      ax.add_patch(Rectangle((box[1] - 0.5, box[0] - 0.5), box[3] - box[1], box[2] - box[0],
                             fill=False, ec='#e41a1c', lw=1, ls='--'))
      ax.text(box[1], box[0] - 1, f'{score:.2f}', color='#e41a1c', fontsize=6)
  ax.set_axis_off()
  plots.suptitle(fig, title, 4.2)
  return fig


def detection_figures(workdir: str, results: Dict, out_dir: str) -> Dict[str, str]:
  written = {}
  metrics = results.get('val')
  if isinstance(metrics, dict) and 'cpm' in metrics:
    written['froc_val'] = plots.save(froc_figure(metrics, 'validation'),
                                     os.path.join(out_dir, 'froc_val.png'))
  path = os.path.join(workdir, 'predictions_val.json')
  if not os.path.isfile(path):
    return written
  with open(path) as f:
    cases = json.load(f)
  flat = {c: v for c, v in cases.items()
          if v.get('image', '').lower().endswith(layouts.IMAGE_SUFFIXES)}
  if not flat:
    return written
  ranked = sorted(flat, key=lambda c: case_quality(flat[c]))
  for which, case_id in (('best', ranked[-1]), ('worst', ranked[0])):
    title = (f'{which} validation case {case_id}: F1 {case_quality(flat[case_id]):.2f} '
             f'(green objects, red detections >= {SHOWN_SCORE})')
    written[f'cases_{which}'] = plots.save(case_figure(flat[case_id], title),
                                           os.path.join(out_dir, f'boxes_val_{which}.png'))
  return written
