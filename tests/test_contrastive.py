"""Self-supervised pretraining (task='contrastive'): NT-Xent and kNN against NumPy and
scikit-learn, label-free batches of two views, and fine-tuning from it with a new head."""

import json
import os

import jax
import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from medjax import config as config_lib, losses, train as train_lib
from medjax.experiments import make_experiment
from medjax.experiments.contrastive import knn_class_scores


def _nt_xent_reference(z1, z2, temperature):
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n, total = len(z), 0.0
  for i in range(n):
    partner = (i + n // 2) % n
    others = [j for j in range(n) if j != i]
    logits = np.array([z[i] @ z[j] / temperature for j in others])
    total += -(z[i] @ z[partner] / temperature) + np.log(np.exp(logits).sum())
  return total / n


def test_nt_xent_matches_the_formula():
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  for temperature in (0.1, 0.5):
    np.testing.assert_allclose(float(losses.nt_xent(z1, z2, temperature)),
                               _nt_xent_reference(z1, z2, temperature), rtol=1e-5)
  # Two identical, well separated views: the partner is the nearest, the loss is small.
  eye = np.eye(6) * 3
  assert float(losses.nt_xent(eye, eye, 0.1)) < 1e-3


def test_knn_scores_match_scikit_learn():
  rng = np.random.default_rng(1)
  reference, queries = rng.normal(size=(40, 8)), rng.normal(size=(15, 8))
  labels = rng.integers(0, 3, 40)
  for k in (1, 5, 12):
    knn = KNeighborsClassifier(n_neighbors=k, metric='cosine', algorithm='brute')
    expected = knn.fit(reference, labels).predict_proba(queries)
    np.testing.assert_allclose(knn_class_scores(reference, labels, queries, k, 3), expected)
  # k larger than the labelled set: every reference votes.
  np.testing.assert_allclose(knn_class_scores(reference[:4], labels[:4], queries, 10, 3),
                             np.tile(np.bincount(labels[:4], minlength=3) / 4, (15, 1)))


def _config(*overrides):
  c = config_lib.load_config_file('configs/few_labels.py:runlocal')
  config_lib.apply_overrides(c, ['train.num_epochs=1', 'train.keep_checkpoints=1',
                                 *overrides])
  return c


def test_batches_are_two_views_of_every_training_image_without_labels():
  off = ['contrastive.augment.' + k for k in (
      'flip_lr=false', 'rotation_deg=0.0', 'scale_min=1.0', 'scale_max=1.0', 'brightness=0.0',
      'contrast=0.0', 'cutout=0.0', 'translate=0.0', 'blur_sigma=0.0', 'noise_std=0.0')]
  exp = make_experiment(config_lib.resolve(_config('task=contrastive',
                                                   'data.labeled_fraction=0.25', *off)))
  batch = exp.global_batch
  train_images = exp.images.astype(np.float32) / exp.pixel_max
  seen = []
  for images, labels in exp.train_iterator(0):
    assert images.shape[0] == 2 * batch and not labels.any()
    np.testing.assert_array_equal(images[:batch], images[batch:])  # no augmentation: equal
    seen.append(images[:batch])
  seen = np.concatenate(seen) * exp.config.data.std + exp.config.data.mean
  # One pass over all 256 training images, the unlabelled three quarters included.
  assert len(exp.images) == 256 and len(exp.data.splits['train'][1]) == 64
  matches = {int(np.argmin(np.abs(train_images - s).reshape(256, -1).max(1))) for s in seen}
  assert len(matches) == len(seen) == 256


@pytest.mark.slow
def test_pretraining_then_fine_tuning_with_a_new_head(tmp_path):
  pretrained = str(tmp_path / 'simclr')
  results = train_lib.train_and_evaluate(
      _config('task=contrastive', 'data.labeled_fraction=0.25', 'train.num_epochs=2'),
      pretrained)
  assert results['task'] == 'contrastive' and results['scores_task'] == 'binary'
  assert 0.0 <= results['val']['auc'] <= 1.0
  with open(os.path.join(pretrained, 'metrics.jsonl')) as f:
    losses_seen = [r['loss'] for r in map(json.loads, f) if r['split'] == 'train']
  assert np.all(np.isfinite(losses_seen))
  # The kNN evaluation is what `medjax evaluate` recomputes from the checkpoint.
  again = train_lib.evaluate_workdir(pretrained, 'val', write=False)
  assert again['metrics']['auc'] == pytest.approx(results['val']['auc'])
  assert os.path.exists(os.path.join(pretrained, 'plots', 'roc_val.png'))

  # Fine-tuning: the body comes from the pretrained run, the 2-class head starts fresh.
  _, source, _ = train_lib.restore_workdir(pretrained)
  source = jax.device_get(source.params)
  tuned = _config('data.labeled_fraction=0.25', f'train.init_from={pretrained}',
                  "train.init_from_skip=('Dense_1/',)")
  state = jax.device_get(make_experiment(config_lib.resolve(tuned)).init_state())
  fresh = jax.device_get(make_experiment(config_lib.resolve(_config(
      'data.labeled_fraction=0.25'))).init_state())
  for layer in ('Conv_0', 'Conv_1', 'Dense_0'):
    jax.tree.map(np.testing.assert_array_equal, state.params[layer], source[layer])
  jax.tree.map(np.testing.assert_array_equal, state.params['Dense_1'], fresh.params['Dense_1'])
  assert source['Dense_1']['kernel'].shape[-1] == 64 != state.params['Dense_1']['kernel'].shape[-1]
  with pytest.raises(ValueError, match=r"'params/Dense_1/bias' is \(64,\) there, \(2,\) here "
                                       r'\(train.init_from_skip'):
    make_experiment(config_lib.resolve(_config(f'train.init_from={pretrained}'))).init_state()
  with pytest.raises(ValueError, match="init_from_skip 'Head/' matches no variable of this "
                                       "model \\(names look like 'params/Conv_0/bias'\\)"):
    make_experiment(config_lib.resolve(_config(f'train.init_from={pretrained}',
                                                "train.init_from_skip=('Head/',)"))).init_state()


def test_bad_contrastive_settings_are_refused():
  with pytest.raises(ValueError, match='contrastive.temperature must be > 0'):
    make_experiment(config_lib.resolve(_config('task=contrastive',
                                               'contrastive.temperature=0.0')))
  with pytest.raises(ValueError, match="semi.method must be 'none'"):
    make_experiment(config_lib.resolve(_config('task=contrastive', 'data.labeled_fraction=0.5',
                                               'semi.method=fixmatch')))
