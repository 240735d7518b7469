"""Losses against NumPy references (PyTorch semantics for weighted mean)."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from medjax import losses, tasks


def _log_softmax(x):
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_weighted_cross_entropy_matches_pytorch_semantics():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(16, 3)).astype(np.float32)
  labels = rng.integers(0, 3, 16)
  weights = np.array([0.2, 1.0, 3.0])
  per, w = losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), weights)
  nll = -_log_softmax(logits.astype(np.float64))[np.arange(16), labels]
  expected = (weights[labels] * nll).sum() / weights[labels].sum()  # torch reduction='mean'
  assert float(losses.weighted_mean(per, w)) == pytest.approx(expected, rel=1e-5)


def test_focal_loss_reference_and_gamma_zero_is_ce():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(32, 4)).astype(np.float32)
  labels = rng.integers(0, 4, 32)
  focal0, _ = losses.focal_loss(jnp.asarray(logits), jnp.asarray(labels), gamma=0.0)
  ce, _ = losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(focal0, ce, rtol=1e-5)
  focal2, _ = losses.focal_loss(jnp.asarray(logits), jnp.asarray(labels), gamma=2.0)
  p = np.exp(_log_softmax(logits.astype(np.float64)))[np.arange(32), labels]
  np.testing.assert_allclose(focal2, -(1 - p) ** 2 * np.log(p), rtol=1e-4)


def test_multilabel_bce_reference():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(8, 5))
  targets = rng.integers(0, 2, (8, 5))
  per, _ = losses.sigmoid_binary_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  p = 1 / (1 + np.exp(-logits))
  ref = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean(axis=1)
  np.testing.assert_allclose(per, ref, rtol=1e-5)


def test_ordinal_loss_and_probabilities():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(10, 4))  # 5 classes
  labels = rng.integers(0, 5, 10)
  per, _ = losses.ordinal_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  targets = labels[:, None] > np.arange(4)[None]
  p = 1 / (1 + np.exp(-logits))
  ref = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).sum(axis=1)
  np.testing.assert_allclose(per, ref, rtol=1e-5)
  probs = np.asarray(tasks.scores_from_logits('ordinal', jnp.asarray(logits)))
  assert probs.shape == (10, 5)
  assert np.all(probs >= 0)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


def test_balanced_class_weights_match_sklearn():
  labels = np.array([0] * 10 + [1] * 30 + [2] * 5)
  ours = losses.balanced_class_weights(labels, 3)
  ref = compute_class_weight('balanced', classes=np.arange(3), y=labels)
  np.testing.assert_allclose(ours, ref)
  with pytest.raises(ValueError, match=r'classes \[3\] have no training examples'):
    losses.balanced_class_weights(labels, 4)


def test_parse_class_weights_errors():
  with pytest.raises(ValueError, match='needs 3 non-negative numbers'):
    losses.parse_class_weights('1,2', np.array([0, 1, 2]), 3, 'multiclass')
  with pytest.raises(ValueError, match='comma-separated'):
    losses.parse_class_weights('heavy', np.array([0, 1, 2]), 3, 'multiclass')
