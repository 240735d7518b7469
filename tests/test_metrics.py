"""Every metric against scikit-learn on random inputs (ties included)."""

import numpy as np
import pytest
from sklearn import metrics as skm

from medjax.metrics import classification_metrics, roc_auc


def _random_scores(rng, n, k):
  scores = rng.random((n, k)).round(2)  # rounding makes ties
  return scores / scores.sum(axis=1, keepdims=True)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_roc_auc_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, 300)
  s = rng.integers(0, 10, 300) / 10.0
  assert roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


def test_roc_auc_single_class_is_nan():
  assert np.isnan(roc_auc(np.ones(5), np.arange(5)))


@pytest.mark.parametrize('seed', [0, 1])
def test_binary_metrics_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, 257)
  scores = _random_scores(rng, 257, 2)
  m = classification_metrics('binary', y, scores)
  pred = (scores[:, 1] > 0.5).astype(int)  # MedMNIST: score of class 1 > 0.5
  tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
  assert m['accuracy'] == pytest.approx(skm.accuracy_score(y, pred))
  assert m['auc'] == pytest.approx(skm.roc_auc_score(y, scores[:, 1]))
  assert m['balanced_accuracy'] == pytest.approx(skm.balanced_accuracy_score(y, pred))
  assert m['precision'] == pytest.approx(skm.precision_score(y, pred))
  assert m['recall'] == pytest.approx(skm.recall_score(y, pred))
  assert m['sensitivity'] == m['recall']
  assert m['specificity'] == pytest.approx(tn / (tn + fp))
  assert m['f1'] == pytest.approx(skm.f1_score(y, pred))
  assert m['confusion_matrix'] == skm.confusion_matrix(y, pred).tolist()


@pytest.mark.parametrize('task', ['multiclass', 'ordinal'])
def test_multiclass_metrics_match_sklearn(task):
  rng = np.random.default_rng(3)
  k = 5
  y = rng.integers(0, k, 400)
  scores = _random_scores(rng, 400, k)
  m = classification_metrics(task, y, scores)
  pred = scores.argmax(1)
  cm = skm.confusion_matrix(y, pred, labels=range(k))
  ovr_auc = np.mean([skm.roc_auc_score(y == c, scores[:, c]) for c in range(k)])
  assert m['accuracy'] == pytest.approx(skm.accuracy_score(y, pred))
  assert m['auc'] == pytest.approx(ovr_auc)
  # MedMNIST's mean of one-vs-rest AUCs equals sklearn's macro OvR.
  assert m['auc'] == pytest.approx(skm.roc_auc_score(y, scores, multi_class='ovr'))
  assert m['balanced_accuracy'] == pytest.approx(skm.balanced_accuracy_score(y, pred))
  for ours, fn in (('precision', skm.precision_score), ('recall', skm.recall_score),
                   ('f1', skm.f1_score)):
    assert m[ours] == pytest.approx(fn(y, pred, average='macro', zero_division=np.nan))
  spec = [(cm.sum() - cm[c].sum() - cm[:, c].sum() + cm[c, c]) /
          (cm.sum() - cm[c].sum()) for c in range(k)]
  assert m['specificity'] == pytest.approx(np.mean(spec))
  assert m['confusion_matrix'] == cm.tolist()
  if task == 'ordinal':
    assert m['mae'] == pytest.approx(skm.mean_absolute_error(y, pred))


def test_macro_precision_skips_never_predicted_class():
  y = np.array([0, 1, 2, 2])
  scores = np.eye(3)[[0, 1, 1, 1]]  # class 2 never predicted
  m = classification_metrics('multiclass', y, scores)
  expected = skm.precision_score(y, scores.argmax(1), average='macro', zero_division=np.nan)
  assert m['precision'] == pytest.approx(expected)


def test_multilabel_metrics_match_sklearn():
  rng = np.random.default_rng(4)
  y = rng.integers(0, 2, (300, 6))
  scores = rng.random((300, 6))
  m = classification_metrics('multilabel', y, scores)
  pred = (scores > 0.5).astype(int)
  # MedMNIST: mean over labels of per-label accuracy / AUC.
  assert m['accuracy'] == pytest.approx(np.mean([skm.accuracy_score(y[:, j], pred[:, j])
                                                 for j in range(6)]))
  assert m['auc'] == pytest.approx(skm.roc_auc_score(y, scores, average='macro'))
  assert m['precision'] == pytest.approx(skm.precision_score(y, pred, average='macro'))
  assert m['recall'] == pytest.approx(skm.recall_score(y, pred, average='macro'))
  assert m['f1'] == pytest.approx(skm.f1_score(y, pred, average='macro'))
  assert m['exact_match'] == pytest.approx(skm.accuracy_score(y, pred))
  assert np.array_equal(m['confusion_matrix'], skm.multilabel_confusion_matrix(y, pred))


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match='labels must be in'):
    classification_metrics('multiclass', np.array([0, 3]), np.full((2, 3), 1 / 3))
  with pytest.raises(ValueError, match='empty'):
    classification_metrics('binary', np.zeros(0), np.zeros((0, 2)))
