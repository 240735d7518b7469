"""Classification metrics in NumPy, computed on the host from labels and class scores.

Conventions (identical to MedMNIST's evaluator where it defines them):

* ``auc``: binary = ROC-AUC of ``scores[:, 1]``; multi-class and ordinal = mean of the
  one-vs-rest ROC-AUCs over classes; multi-label = mean of per-label ROC-AUCs.
* ``accuracy``: binary = ``scores[:, 1] > 0.5``; multi-class and ordinal = argmax;
  multi-label = per-label accuracy at 0.5, averaged over labels.
* ``precision``, ``recall`` (= ``sensitivity``), ``specificity``, ``f1``: binary = of the
  positive class 1; multi-class = macro average over classes (one-vs-rest);
  multi-label = macro average over labels.
* ``balanced_accuracy``: mean per-class recall (multi-label: mean of (sens + spec) / 2).
* An undefined ratio (0/0, e.g. AUC with one class present) is NaN, never a silent 0;
  macro averages skip undefined classes (scikit-learn's ``zero_division=np.nan``).
"""

from __future__ import annotations

from typing import Dict

import math

import numpy as np


def _average_ranks(values: np.ndarray) -> np.ndarray:
  """Ranks 1..n with ties given their average rank."""
  order = np.argsort(values, kind='mergesort')
  sorted_vals = values[order]
  # Start index of each run of equal values.
  boundaries = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1], True])
  ranks_sorted = np.empty(len(values), dtype=np.float64)
  for start, end in zip(boundaries[:-1], boundaries[1:]):
    ranks_sorted[start:end] = 0.5 * (start + 1 + end)
  ranks = np.empty_like(ranks_sorted)
  ranks[order] = ranks_sorted
  return ranks


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
  """Binary ROC-AUC via the Mann-Whitney U statistic (ties count one half).

  Args:
    y_true: ``[N]`` 0/1 labels.
    y_score: ``[N]`` scores, higher = more likely positive.
  Returns:
    AUC in [0, 1], or NaN if only one class is present.
  """
  y_true = np.asarray(y_true).reshape(-1).astype(bool)
  y_score = np.asarray(y_score, dtype=np.float64).reshape(-1)
  n_pos = int(y_true.sum())
  n_neg = y_true.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float('nan')
  ranks = _average_ranks(y_score)
  u = ranks[y_true].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
  """``[K, K]`` counts; row = true class, column = predicted class."""
  y_true = np.asarray(y_true).reshape(-1).astype(np.int64)
  y_pred = np.asarray(y_pred).reshape(-1).astype(np.int64)
  return np.bincount(y_true * num_classes + y_pred,
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  num = np.asarray(num, dtype=np.float64)
  den = np.asarray(den, dtype=np.float64)
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _one_vs_rest_counts(cm: np.ndarray):
  tp = np.diag(cm).astype(np.float64)
  fp = cm.sum(axis=0) - tp
  fn = cm.sum(axis=1) - tp
  tn = cm.sum() - tp - fp - fn
  return tp, fp, fn, tn


def _rates(tp, fp, fn, tn) -> Dict[str, np.ndarray]:
  precision = _ratio(tp, tp + fp)
  recall = _ratio(tp, tp + fn)
  return {
      'precision': precision,
      'recall': recall,
      'specificity': _ratio(tn, tn + fp),
      'f1': _ratio(2 * tp, 2 * tp + fp + fn),
  }


def _mean(values) -> float:
  """Mean over the defined (non-NaN) entries; NaN if none is defined."""
  values = np.asarray(values, dtype=np.float64)
  defined = values[~np.isnan(values)]
  return float(np.mean(defined)) if defined.size else float('nan')


def mean_sd(values) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1) of the finite values (NaN and inf, e.g.
  undefined or failed cases, are left out); sd is NaN for fewer than two values."""
  values = np.asarray(values, np.float64).ravel()
  finite = values[np.isfinite(values)]
  if not finite.size:
    return math.nan, math.nan
  return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else math.nan


def calibration_bins(confidence: np.ndarray, correct: np.ndarray,
                     num_bins: int = 15) -> Dict[str, np.ndarray]:
  """Equal-width confidence bins on [0, 1] (``(lo, hi]``, the first also holds 0).

  Returns ``edges [num_bins + 1]`` and per bin ``count``, ``accuracy`` (fraction correct)
  and ``confidence`` (mean confidence); empty bins hold NaN.
  """
  confidence = np.asarray(confidence, np.float64).reshape(-1)
  correct = np.asarray(correct, np.float64).reshape(-1)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  index = np.clip(np.searchsorted(edges, confidence, side='left') - 1, 0, num_bins - 1)
  count = np.bincount(index, minlength=num_bins).astype(np.float64)
  with np.errstate(invalid='ignore', divide='ignore'):
    accuracy = np.bincount(index, correct, minlength=num_bins) / count
    mean_conf = np.bincount(index, confidence, minlength=num_bins) / count
  return {'edges': edges, 'count': count, 'accuracy': accuracy, 'confidence': mean_conf}


def top_label_confidence(task: str, labels: np.ndarray, scores: np.ndarray):
  """(confidence ``[N]``, correct ``[N]``) of the predicted class; for binary the decision
  is ``scores[:, 1] > 0.5`` and the confidence that of the chosen class."""
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels).reshape(-1)
  preds = np.argmax(scores, axis=1)
  return scores[np.arange(len(scores)), preds], (preds == labels).astype(np.float64)


def expected_calibration_error(task: str, labels: np.ndarray, scores: np.ndarray,
                               num_bins: int = 15) -> float:
  """Top-label ECE (Guo et al. 2017): ``sum_b n_b / N * |accuracy_b - confidence_b|``."""
  bins = calibration_bins(*top_label_confidence(task, labels, scores), num_bins)
  filled = bins['count'] > 0
  weights = bins['count'][filled] / bins['count'].sum()
  return float(np.sum(weights * np.abs(bins['accuracy'][filled] - bins['confidence'][filled])))


def classification_metrics(task: str, labels: np.ndarray, scores: np.ndarray,
                           threshold: float = 0.5) -> Dict[str, object]:
  """All classification metrics for one split.

  Args:
    task: 'binary' | 'multiclass' | 'ordinal' | 'multilabel'.
    labels: int ``[N]`` (or ``[N, 1]``); multi-label 0/1 ``[N, L]``.
    scores: class probabilities ``[N, K]`` (multi-label: per-label ``[N, L]``).
    threshold: decision threshold for binary and multi-label.
  Returns:
    dict of floats plus ``confusion_matrix`` (nested lists; multi-label: ``[L, 2, 2]``).
  """
  scores = np.asarray(scores, dtype=np.float64)
  labels = np.asarray(labels)
  if scores.ndim != 2:
    raise ValueError(f'scores must be [N, K], got shape {scores.shape}')
  n = scores.shape[0]
  if n == 0:
    raise ValueError('cannot compute metrics on an empty split')
  out: Dict[str, object] = {'num_examples': int(n)}

  if task == 'multilabel':
    labels = labels.reshape(n, -1).astype(np.int64)
    if labels.shape != scores.shape:
      raise ValueError(f'labels {labels.shape} and scores {scores.shape} differ')
    preds = (scores > threshold).astype(np.int64)
    per_label_cm = np.stack([confusion_matrix(labels[:, j], preds[:, j], 2)
                             for j in range(labels.shape[1])])
    tp, fn = per_label_cm[:, 1, 1], per_label_cm[:, 1, 0]
    fp, tn = per_label_cm[:, 0, 1], per_label_cm[:, 0, 0]
    rates = _rates(tp, fp, fn, tn)
    out['accuracy'] = _mean(np.mean(labels == preds, axis=0))
    out['auc'] = _mean([roc_auc(labels[:, j], scores[:, j]) for j in range(labels.shape[1])])
    out['balanced_accuracy'] = _mean((rates['recall'] + rates['specificity']) / 2)
    for key, value in rates.items():
      out[key] = _mean(value)
    out['sensitivity'] = out['recall']
    out['exact_match'] = float(np.mean(np.all(labels == preds, axis=1)))
    out['confusion_matrix'] = per_label_cm.tolist()
    return out

  labels = labels.reshape(-1).astype(np.int64)
  if labels.shape[0] != n:
    raise ValueError(f'{labels.shape[0]} labels but {n} score rows')
  num_classes = scores.shape[1]
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f'labels must be in [0, {num_classes - 1}], got range '
                     f'[{labels.min()}, {labels.max()}]')
  if task == 'binary':
    if num_classes != 2:
      raise ValueError(f'binary task needs scores [N, 2], got {scores.shape}')
    preds = (scores[:, 1] > threshold).astype(np.int64)
  elif task in ('multiclass', 'ordinal'):
    preds = np.argmax(scores, axis=1)
  else:
    raise ValueError(f"unknown task '{task}'")
  cm = confusion_matrix(labels, preds, num_classes)
  tp, fp, fn, tn = _one_vs_rest_counts(cm)
  rates = _rates(tp, fp, fn, tn)
  out['accuracy'] = float(np.mean(labels == preds))
  if task == 'binary':
    out['auc'] = roc_auc(labels == 1, scores[:, 1])
    for key, value in rates.items():
      out[key] = float(value[1])
  else:
    out['auc'] = _mean([roc_auc(labels == k, scores[:, k]) for k in range(num_classes)])
    for key, value in rates.items():
      out[key] = _mean(value)
  out['sensitivity'] = out['recall']
  # Mean recall over the classes present (scikit-learn's balanced_accuracy_score).
  present = cm.sum(axis=1) > 0
  out['balanced_accuracy'] = _mean(rates['recall'][present])
  if task == 'ordinal':
    out['mae'] = float(np.mean(np.abs(labels - preds)))
  out['ece'] = expected_calibration_error(task, labels, scores)
  out['confusion_matrix'] = cm.tolist()
  return out
