"""Figures for papers and for checking a run: learning curves, ROC curves, confusion matrix,
reliability diagram, segmentation overlays, explanation panels.

Each ``*_figure`` function returns a matplotlib ``Figure`` (built without pyplot, so it works
headless and leaves a notebook's backend alone); :func:`write_run_plots` draws every figure
a workdir supports into ``<workdir>/plots/*.png`` from the workdir's own files and adds them
to its TensorBoard log.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from medjax import metrics as metrics_lib, output, workdir as workdir_lib

_DPI = 120
_CLASS_COLOURS = ('#e41a1c', '#377eb8', '#4daf4a', '#984ea3', '#ff7f00', '#a65628', '#f781bf',
                  '#999999')


def new_figure(width: float, height: float):
  from matplotlib.figure import Figure
  return Figure(figsize=(width, height), dpi=_DPI, layout='constrained')


def suptitle(fig, title: str, width_inches: float) -> None:
  import textwrap
  fig.suptitle(textwrap.fill(title, max(30, int(width_inches * 13))), fontsize=10)


def save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path, dpi=_DPI)
  return path


def read_metrics_log(workdir: str) -> List[Dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  return workdir_lib.read_metrics(path) if os.path.exists(path) else []


# ----- classification ----------------------------------------------------------------------
def learning_curves_figure(records: Sequence[Dict], selection_metric: str,
                           selected_step: Optional[int] = None):
  """Train/val loss and the validation selection metric against epochs."""
  fig = new_figure(9, 3.4)
  ax_loss, ax_metric = fig.subplots(1, 2)
  for split, style in (('train', '-'), ('val', 'o-')):
    rows = [r for r in records if r['split'] == split and 'loss' in r]
    if rows:
      ax_loss.plot([r['epoch'] for r in rows], [r['loss'] for r in rows], style, ms=3,
                   label=split)
  ax_loss.set(xlabel='epoch', ylabel='loss', title='loss')
  ax_loss.legend()
  val = [r for r in records if r['split'] == 'val' and selection_metric in r]
  ax_metric.plot([r['epoch'] for r in val], [r[selection_metric] for r in val], 'o-', ms=3,
                 color='C1')
  ax_metric.set(xlabel='epoch', ylabel=f'val {selection_metric}',
                title=f'validation {selection_metric}')
  for ax in (ax_loss, ax_metric):
    ax.grid(alpha=0.3)
    if selected_step is not None:
      chosen = [r['epoch'] for r in val if r['step'] == selected_step]
      if chosen:
        ax.axvline(chosen[0], color='grey', ls='--', lw=1, label='selected')
  if selected_step is not None:
    ax_metric.legend()
  return fig


def roc_figure(task: str, labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str],
               title: str = 'ROC'):
  """One-vs-rest ROC curve of every class (the positive class only for binary tasks)."""
  from sklearn.metrics import roc_curve
  fig = new_figure(4.6, 4.2)
  ax = fig.subplots()
  labels = np.asarray(labels)
  if task == 'binary':
    classes = [1]
  else:
    classes = range(scores.shape[1])
  for k in classes:
    truth = labels[:, k] if task == 'multilabel' else labels.reshape(-1) == k
    if truth.min() == truth.max():
      continue  # ROC undefined without both classes present
    fpr, tpr, _ = roc_curve(truth, scores[:, k])
    auc = metrics_lib.roc_auc(truth, scores[:, k])
    ax.plot(fpr, tpr, color=_CLASS_COLOURS[k % len(_CLASS_COLOURS)],
            label=f'{class_names[k]} (AUC {auc:.3f})')
  ax.plot([0, 1], [0, 1], color='grey', ls=':', lw=1)
  ax.set(xlabel='1 - specificity (FPR)', ylabel='sensitivity (TPR)', title=title,
         xlim=(0, 1), ylim=(0, 1.01), aspect='equal')
  ax.legend(loc='lower right', fontsize=8)
  ax.grid(alpha=0.3)
  return fig


def confusion_figure(confusion: np.ndarray, class_names: Sequence[str],
                     title: str = 'confusion matrix'):
  """Counts in each cell; colour = fraction of the true class (row-normalised)."""
  confusion = np.asarray(confusion)
  fig = new_figure(2.4 + 0.9 * len(class_names), 1.4 + 0.8 * len(class_names))
  ax = fig.subplots()
  rows = confusion.sum(axis=1, keepdims=True)
  fraction = confusion / np.where(rows > 0, rows, 1)
  image = ax.imshow(fraction, cmap='Blues', vmin=0, vmax=1)
  for i in range(confusion.shape[0]):
    for j in range(confusion.shape[1]):
      ax.text(j, i, f'{confusion[i, j]}\n{fraction[i, j]:.0%}', ha='center', va='center',
              fontsize=8, color='white' if fraction[i, j] > 0.6 else 'black')
  ticks = range(len(class_names))
  ax.set_xticks(ticks, class_names, rotation=30, ha='right')
  ax.set_yticks(ticks, class_names)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true', labelpad=2)
  ax.set_title(title)
  fig.colorbar(image, ax=ax, shrink=0.8, label='fraction of the row')
  return fig


def reliability_figure(task: str, labels: np.ndarray, scores: np.ndarray, num_bins: int = 15,
                       title: str = 'reliability'):
  """Accuracy against confidence of the predicted class, with the ECE, and the histogram of
  confidences below."""
  confidence, correct = metrics_lib.top_label_confidence(task, labels, scores)
  bins = metrics_lib.calibration_bins(confidence, correct, num_bins)
  ece = metrics_lib.expected_calibration_error(task, labels, scores, num_bins)
  fig = new_figure(4.6, 5.0)
  ax, ax_hist = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
  edges, width = bins['edges'][:-1], 1.0 / num_bins
  filled = bins['count'] > 0
  ax.bar(edges[filled], bins['accuracy'][filled], width=width, align='edge', color='C0',
         edgecolor='black', lw=0.5, label='accuracy')
  ax.bar(edges[filled], bins['confidence'][filled], width=width, align='edge', fill=False,
         edgecolor='C3', lw=1.2, label='mean confidence')
  ax.plot([0, 1], [0, 1], color='grey', ls=':', lw=1)
  ax.set(ylabel='accuracy', xlim=(0, 1), ylim=(0, 1), title=f'{title} (ECE {ece:.3f})')
  ax.legend(loc='upper left', fontsize=8)
  ax_hist.bar(edges, bins['count'], width=width, align='edge', color='grey')
  ax_hist.set(xlabel='confidence of the predicted class', ylabel='examples')
  return fig


# ----- images ------------------------------------------------------------------------------
def _show_image(ax, image2d: np.ndarray, title: str = '') -> None:
  lo, hi = np.percentile(image2d, [0.5, 99.5])
  ax.imshow(image2d, cmap='gray', vmin=lo, vmax=hi if hi > lo else lo + 1,
            interpolation='nearest')
  ax.set_title(title, fontsize=9)
  ax.set_axis_off()


def _contours(ax, labels2d: np.ndarray, num_classes: int, style: str) -> None:
  for k in range(1, num_classes):
    if (labels2d == k).any():
      ax.contour(labels2d == k, levels=[0.5], colors=[_CLASS_COLOURS[k % 8]], linewidths=1.2,
                 linestyles=style)


def segmentation_overlay_figure(image2d: np.ndarray, reference2d: np.ndarray,
                                prediction2d: np.ndarray, class_names: Sequence[str],
                                title: str = ''):
  """Image, reference (solid contours) and prediction (dashed contours) of one slice
  ``[H, W]`` (rows are drawn top to bottom)."""
  fig = new_figure(7.5, 3.0)
  axes = fig.subplots(1, 3)
  _show_image(axes[0], image2d, 'image')
  _show_image(axes[1], image2d, 'reference')
  _contours(axes[1], reference2d, len(class_names), 'solid')
  _show_image(axes[2], image2d, 'prediction')
  _contours(axes[2], prediction2d, len(class_names), 'dashed')
  from matplotlib.lines import Line2D
  handles = [Line2D([], [], color=_CLASS_COLOURS[k % 8], label=class_names[k])
             for k in range(1, len(class_names))]
  fig.legend(handles=handles, loc='outside lower center', ncols=len(handles), fontsize=8)
  suptitle(fig, title, 7.5)
  return fig


def explanation_figure(image2d: np.ndarray, maps: Dict[str, np.ndarray], title: str = '',
                       contour: Optional[np.ndarray] = None):
  """The image and each map (in [0, 1]) overlaid on it, side by side; ``contour`` (a
  boolean ``[H, W]``, e.g. a lesion or predicted region) is outlined on every panel."""
  width = 2.3 * (1 + len(maps))
  fig = new_figure(width, 2.9)
  axes = np.atleast_1d(fig.subplots(1, 1 + len(maps)))
  _show_image(axes[0], image2d, 'image')
  for ax, (name, heat) in zip(axes[1:], maps.items()):
    _show_image(ax, image2d, name)
    shown = ax.imshow(heat, cmap='jet', alpha=0.45, vmin=0, vmax=1, interpolation='bilinear')
  for ax in axes:
    if contour is not None and contour.any():
      ax.contour(contour, levels=[0.5], colors=['white'], linewidths=1.0)
  if maps:
    fig.colorbar(shown, ax=list(axes), fraction=0.02, label='relevance (per-image max = 1)')
  suptitle(fig, title, width)
  return fig


# ----- a workdir's figures -----------------------------------------------------------------
def write_run_plots(workdir: str, splits: Sequence[str] = ('val', 'test'),
                    task_figures: Optional[Callable[..., Dict[str, str]]] = None,
                    tensorboard_step: Optional[int] = None) -> Dict[str, str]:
  """Draws every figure the workdir's files support into ``<workdir>/plots/``: the learning
  curves, then the task's own (``task_figures(workdir, config, results, out_dir, splits)``,
  the experiment's ``run_figures``: ROC curves, confusion matrices, case overlays, ...).
  Returns {name: png path}; the same images go to TensorBoard (at ``tensorboard_step``,
  default the selected step) under ``plots/``.
  """
  config = workdir_lib.read_json(os.path.join(workdir, 'config.json'))
  results = workdir_lib.read_json(os.path.join(workdir, 'results.json'), {})
  out_dir = os.path.join(workdir, 'plots')
  written: Dict[str, str] = {}
  selection = config['train']['selection_metric']
  records = read_metrics_log(workdir)
  if records:
    fig = learning_curves_figure(records, selection, results.get('selected_step'))
    written['learning_curves'] = save(fig, os.path.join(out_dir, 'learning_curves.png'))
  if task_figures is not None:
    written.update(task_figures(workdir, config, results, out_dir, splits))
  step = tensorboard_step if tensorboard_step is not None else results.get('selected_step', 0)
  add_to_tensorboard(workdir, written, step)
  return written


def classifier_figures(labels: np.ndarray, scores: np.ndarray, names: Sequence[str],
                       task: str, split: str, out_dir: str) -> Dict[str, str]:
  """ROC curves, and (one label per example) the confusion matrix and the reliability
  diagram of a split's predictions, as PNG files in ``out_dir``."""
  written = {f'roc_{split}': save(roc_figure(task, labels, scores, names, f'ROC, {split} split'),
                                  os.path.join(out_dir, f'roc_{split}.png'))}
  if task != 'multilabel':
    # From the predictions themselves (results.json may describe another checkpoint when
    # `medjax evaluate --step` wrote it), with the metrics' own decision rule.
    cm = metrics_lib.classification_metrics(task, labels, scores)['confusion_matrix']
    written[f'confusion_{split}'] = save(
        confusion_figure(np.array(cm), names, f'confusion matrix, {split} split'),
        os.path.join(out_dir, f'confusion_{split}.png'))
    written[f'reliability_{split}'] = save(
        reliability_figure(task, labels, scores, title=f'reliability, {split} split'),
        os.path.join(out_dir, f'reliability_{split}.png'))
  return written


def add_to_tensorboard(workdir: str, images: Dict[str, str], step: int) -> None:
  """PNG files as TensorBoard images (``plots/<name>``)."""
  if not images:
    return
  from PIL import Image
  from tensorboardX import SummaryWriter
  writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))
  try:
    for name, path in images.items():
      with Image.open(path) as im:
        writer.add_image(f'plots/{name}', np.asarray(im.convert('RGB')), global_step=step,
                         dataformats='HWC')
  finally:
    writer.close()


def radiological_axial(ras: np.ndarray) -> np.ndarray:
  """Axial slices ``[S, rows, cols]`` of a RAS-ordered volume ``[R, A, S, ...]`` as a
  radiologist reads them: anterior at the top, the patient's right on the left of the
  image (RAS ``x`` grows towards the patient's right)."""
  return np.moveaxis(ras, (2, 1, 0), (0, 1, 2))[:, ::-1, ::-1]


def axial_view(array: np.ndarray, volume) -> np.ndarray:
  """An array on ``volume``'s own grid (the image, or a label map overlaying it),
  reoriented to RAS as the volume is, as :func:`radiological_axial` slices."""
  import dataclasses

  from medjax.data import nifti
  return radiological_axial(nifti.to_canonical(dataclasses.replace(volume, array=array)).array)


def volume_overlay_figure(image_path: str, reference_path: str, prediction_path: str,
                          class_names: Sequence[str], title: str, label_values=()):
  """:func:`segmentation_overlay_figure` of NIfTI files (image, reference, prediction on
  one grid) on the axial slice where the reference has the most foreground."""
  from medjax.data import nifti
  image = nifti.read_volume(image_path, 'image')
  reference = nifti.read_volume(reference_path, 'label', label_values=label_values).array
  prediction = nifti.read_volume(prediction_path, 'label').array
  image_v, ref_v, pred_v = (axial_view(a, image) for a in (image.array, reference, prediction))
  z = int(np.argmax((ref_v > 0).sum(axis=(1, 2))))
  return segmentation_overlay_figure(
      image_v[z], ref_v[z], pred_v[z], class_names,
      f'{title}, axial slice {z}, radiological view (patient right on the left)')


def segmentation_case_plots(workdir: str, config: Dict, results: Dict,
                            out_dir: str) -> Dict[str, str]:
  """Overlays of the best and the worst validation case by mean foreground Dice, on the
  slice where the reference has the most foreground."""
  per_case = results.get('val', {}).get('per_case', {})
  if not per_case:
    return {}
  class_names = results['class_names']
  from medjax.data import layouts
  info = layouts.find_cases(config['data']['root'])
  cases = {c.case_id: c for c in info.cases}
  label_values = tuple(config['data']['label_values'])

  def mean_dice(case_id):
    values = [m['dice'] for m in per_case[case_id].values() if np.isfinite(m['dice'])]
    return float(np.mean(values)) if values else float('nan')

  ranked = sorted((c for c in per_case if np.isfinite(mean_dice(c)) and c in cases),
                  key=mean_dice)
  if not ranked:
    return {}
  written = {}
  for which, case_id in (('best', ranked[-1]), ('worst', ranked[0])):
    case = cases[case_id]
    pred_dir = os.path.join(workdir, 'predictions_val')
    title = f'{which} validation case {case_id}: mean Dice {mean_dice(case_id):.3f}'
    if info.spatial_dims == 3:
      fig = volume_overlay_figure(case.image, case.label,
                                  os.path.join(pred_dir, f'{case_id}.nii.gz'), class_names,
                                  title, label_values)
    else:
      image2d = layouts.read_image_2d(case.image, 'image')[..., 0]
      ref2d = layouts.read_image_2d(case.label, 'label', label_values)
      pred2d = np.load(os.path.join(pred_dir, f'{case_id}.npy'))
      fig = segmentation_overlay_figure(image2d, ref2d, pred2d, class_names,
                                        f'{title}, 2D image')
    written[f'overlay_{which}'] = save(fig, os.path.join(out_dir, f'overlay_val_{which}.png'))
  return written


def write_plots_safely(workdir: str, splits=('val', 'test'), task_figures=None) -> None:
  """The workdir's figures (:func:`write_run_plots`); a plotting failure is reported but
  never costs the run's results, which are written before."""
  if not workdir_lib.is_main():
    return
  try:
    written = write_run_plots(workdir, splits, task_figures)
  except Exception as e:  # noqa: BLE001
    output.warn(f'could not draw the plots of {workdir}: {type(e).__name__}: {e}')
    return
  if written:  # on stderr: `medjax evaluate` prints its JSON alone on stdout
    print(f"plots: {', '.join(sorted(written))} in {os.path.join(workdir, 'plots')}",
          file=sys.stderr)
