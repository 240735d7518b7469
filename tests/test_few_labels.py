"""Training with few labels: the labelled subset, FixMatch and self-training
(:mod:`medjax.data.few_labels`, :mod:`medjax.semi`)."""

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import roc_auc_score

from medjax import config as config_lib, semi, tasks, train as train_lib, workdir as workdir_lib
from medjax.data import few_labels, load_data, pipeline
from medjax.data.sampling import IGNORE_LABEL
from medjax.experiments import make_experiment
from medjax.experiments.classification import ClassificationExperiment


def _config(*overrides):
  c = config_lib.load_config_file('configs/quickstart.py:runlocal')
  return config_lib.apply_overrides(c, list(overrides))


# ----- the labelled subset ------------------------------------------------------------------
def test_stratified_subset_keeps_each_class_share():
  labels = np.repeat([0, 1, 2], [700, 250, 50])
  for size, seed in ((100, 0), (37, 1), (20, 2)):
    index = few_labels.stratified_subset(labels, size, seed)
    assert len(index) == size == len(np.unique(index))
    counts = np.bincount(labels[index], minlength=3)
    expected = size * np.array([700, 250, 50]) / 1000
    # Largest remainder: every class within one of its share.
    assert np.all(np.abs(counts - expected) < 1), (size, counts)
    np.testing.assert_array_equal(index, few_labels.stratified_subset(labels, size, seed))
  # Too few for the shares: every class still gets one (3 of 1000: shares 2.1, 0.75, 0.15).
  np.testing.assert_array_equal(
      np.bincount(labels[few_labels.stratified_subset(labels, 3, 0)]), [1, 1, 1])
  np.testing.assert_array_equal(
      np.bincount(labels[few_labels.stratified_subset(labels, 5, 0)]), [3, 1, 1])
  a = few_labels.stratified_subset(labels, 100, 0)
  b = few_labels.stratified_subset(labels, 100, 1)
  assert not np.array_equal(a, b)
  with pytest.raises(ValueError, match='cannot cover the 3 classes'):
    few_labels.stratified_subset(labels, 2, 0)


def test_labeled_fraction_and_count_pick_a_subset_and_keep_the_rest_as_images_only():
  c = _config('data.labeled_fraction=0.25')
  data = load_data(c)
  images, labels = data.splits['train']
  few = few_labels.split_labeled(data, c.data, seed=0)
  assert len(few.labeled_index) == 64 and len(few.unlabeled) == 256 - 64
  np.testing.assert_array_equal(few.data.splits['train'][1], labels[few.labeled_index])
  rest = np.setdiff1d(np.arange(256), few.labeled_index)
  np.testing.assert_array_equal(few.unlabeled, images[rest])
  for split in ('val', 'test'):
    assert few.data.splits[split] is data.splits[split]
  # The run's seed picks the subset (data.labeled_seed=-1) unless a subset seed is given.
  other = few_labels.split_labeled(data, c.data, seed=1)
  assert not np.array_equal(other.labeled_index, few.labeled_index)
  c.data.labeled_seed = 5
  np.testing.assert_array_equal(few_labels.split_labeled(data, c.data, seed=0).labeled_index,
                                few_labels.split_labeled(data, c.data, seed=1).labeled_index)
  c.data.labeled_count = 10
  assert len(few_labels.split_labeled(data, c.data, seed=0).labeled_index) == 10
  c.data.labeled_count = 0
  c.data.labeled_fraction = 1.0
  assert few_labels.split_labeled(data, c.data, seed=0) is None
  c.data.labeled_fraction = 0.0
  with pytest.raises(ValueError, match=r'labeled_fraction must be in \(0, 1\]'):
    few_labels.split_labeled(data, c.data, seed=0)


def test_semi_methods_refuse_configs_they_cannot_use():
  with pytest.raises(ValueError, match='every training image is labelled'):
    make_experiment(_config('semi.method=fixmatch'))
  with pytest.raises(ValueError, match='needs semi.teacher'):
    make_experiment(_config('data.labeled_fraction=0.2', 'semi.method=self_training'))
  with pytest.raises(ValueError, match="unknown semi.method 'vat'"):
    make_experiment(_config('data.labeled_fraction=0.2', 'semi.method=vat'))
  with pytest.raises(ValueError, match='mixmatch .* binary or multiclass task, not ordinal'):
    make_experiment(_config('data.labeled_fraction=0.2', 'semi.method=mixmatch', 'task=ordinal'))
  with pytest.raises(ValueError, match=r'semi.sharpen_temperature must be in \(0, 1\]'):
    make_experiment(_config('data.labeled_fraction=0.2', 'semi.method=mixmatch',
                            'semi.sharpen_temperature=0'))
  with pytest.raises(ValueError, match='loss.name must be ce'):
    make_experiment(_config('data.labeled_fraction=0.2', 'semi.method=mixmatch',
                            'loss.name=focal'))
  # The method's own checks, on stand-ins for a multi-label and a label-map experiment.
  multilabel = types.SimpleNamespace(config=_config('semi.method=fixmatch'), task='multilabel',
                                     label_maps=False, single_label=False)
  with pytest.raises(ValueError, match='multi-label data has no single pseudo-label'):
    semi.make_method(multilabel, True)
  seg = types.SimpleNamespace(config=_config('semi.method=fixmatch'), task='segmentation',
                              label_maps=True, num_classes=3)
  strong = seg.config.semi.segmentation_strong
  strong.cutmix_area = (0.5, 0.1)
  with pytest.raises(ValueError, match=r'cutmix_area needs 0 < low <= high <= 1, got \(0.5'):
    semi.make_method(seg, True)
  strong.update(cutmix_area=(0.1, 0.5), contrast=1.0)
  with pytest.raises(ValueError, match='segmentation_strong.contrast .* got 1.0'):
    semi.make_method(seg, True)
  strong.contrast, seg.config.semi.threshold_mode = 0.3, 'self_adaptive'
  with pytest.raises(ValueError, match='fixmatch for segmentation uses semi.threshold'):
    semi.make_method(seg, True)
  with pytest.raises(ValueError, match="unknown semi.method 'mixmatch' for segmentation"):
    seg.config.semi.method = 'mixmatch'
    semi.make_method(seg, True)


@pytest.mark.slow
def test_few_labels_recipe_trains_a_3d_medmnist_flag(tmp_path):
  """configs/few_labels.py with a 3D flag (here one no other test uses): the 3D small CNN,
  in-plane flips as the weak view, flips + intensity + cutout as the strong one (the 2D
  rotation and scaling would be refused), and FixMatch trains to test metrics."""
  rng = np.random.default_rng(0)
  arrays = {}
  for split, count in (('train', 16), ('val', 4), ('test', 4)):
    arrays[f'{split}_images'] = rng.integers(0, 256, (count, 28, 28, 28), dtype=np.uint8)
    arrays[f'{split}_labels'] = (np.arange(count) % 2).reshape(-1, 1).astype(np.uint8)
  np.savez(tmp_path / 'nodulemnist3d.npz', **arrays)
  c = config_lib.load_config_file('configs/few_labels.py:nodulemnist3d')
  assert c.model.features == (16, 32, 64) and c.semi.strong_augment.rotation_deg == 0
  config_lib.apply_overrides(c, [
      f'data.path={tmp_path / "nodulemnist3d.npz"}', 'data.labeled_fraction=0.5',
      'semi.method=fixmatch', 'semi.unlabeled_ratio=1', 'model.features=(4, 8, 8)',
      'model.hidden=8', 'train.batch_size=4', 'train.eval_batch_size=4', 'train.num_epochs=1',
      'train.progress_bar=False'])
  exp = make_experiment(c)
  images, labels = next(iter(exp.train_iterator(0)))
  assert images.shape == (12, 28, 28, 28, 1) and labels.shape == (4,)
  assert not np.allclose(images[4:8], images[8:])  # weak and strong views differ
  results = train_lib.train_and_evaluate(c, str(tmp_path / 'run'))
  # The test metrics are scikit-learn's on the written predictions of the file's 4 test
  # volumes (labels 0, 1, 0, 1).
  pred = np.load(tmp_path / 'run' / 'predictions_test.npz')
  np.testing.assert_array_equal(pred['labels'], arrays['test_labels'][pred['index'], 0])
  assert sorted(pred['index']) == [0, 1, 2, 3] and pred['scores'].shape == (4, 2)
  assert results['test']['auc'] == pytest.approx(
      roc_auc_score(pred['labels'], pred['scores'][:, 1]), abs=1e-9)
  assert results['test']['accuracy'] == pytest.approx(
      np.mean(pred['scores'].argmax(1) == pred['labels']), abs=1e-12)
  assert np.isfinite(results['val']['auc'])


def test_few_labels_train_as_many_steps_as_all_labels():
  all_labels = make_experiment(_config())
  few = make_experiment(_config('data.labeled_fraction=0.05'))
  assert few.steps_per_epoch == all_labels.steps_per_epoch == 256 // 32
  assert len(few.data.splits['train'][1]) == 13
  # Every labelled example appears equally often per epoch (whole seeded permutations).
  _, labels = few.data.splits['train']
  order = np.concatenate([pipeline.epoch_order(0, 0, 13, 8 * 32)])
  np.testing.assert_array_equal(np.bincount(order[:13 * 19], minlength=13), 19)
  np.testing.assert_array_equal(pipeline.epoch_order(3, 2, 50, 40),
                                pipeline.epoch_permutation(3, 2, 50)[:40])
  steps = list(few.train_iterator(0))
  assert len(steps) == few.total_steps and steps[0][0].shape == (32, 32, 32, 1)


# ----- labels of unlabelled images never reach the loss --------------------------------------
def _train_params(config, data, steps=6):
  exp = ClassificationExperiment(config, data)
  state = exp.init_state()
  losses = []
  for _, (images, labels) in zip(range(steps), exp.train_iterator(0)):
    state, metrics = exp.train_step(state, images, labels)
    losses.append(float(metrics['loss']))
  return np.array(losses), jax.device_get(state.params)


@pytest.mark.slow
@pytest.mark.parametrize('method', ['none', 'fixmatch', 'mixmatch'])
def test_labels_of_unlabelled_images_never_reach_the_loss(method, monkeypatch):
  """With the same labelled subset, changing every unlabelled image's label changes nothing
  (bit-identical losses and parameters); changing one labelled image's label does (so the
  test can fail). (Choosing a stratified subset reads the labels, as simulating few labels
  on a labelled dataset must; the subset is held fixed here.)"""
  c = _config('data.labeled_fraction=0.1', f'semi.method={method}', 'semi.threshold=0.4')
  data = load_data(c)
  images, labels = data.splits['train']
  few = few_labels.split_labeled(data, c.data, c.seed)
  monkeypatch.setattr(few_labels, 'stratified_subset', lambda *a: few.labeled_index)
  unlabeled = np.setdiff1d(np.arange(len(labels)), few.labeled_index)

  def with_labels(new_labels):
    return dataclasses.replace(data, splits={**data.splits, 'train': (images, new_labels)})

  relabeled = labels.copy()
  relabeled[unlabeled] = (labels[unlabeled] + 1) % 3
  reference_losses, reference_params = _train_params(c, data)
  losses, params = _train_params(c, with_labels(relabeled))
  np.testing.assert_array_equal(losses, reference_losses)
  jax.tree.map(np.testing.assert_array_equal, params, reference_params)
  one_labeled = labels.copy()
  one_labeled[few.labeled_index[0]] = (labels[few.labeled_index[0]] + 1) % 3
  losses, _ = _train_params(c, with_labels(one_labeled))
  assert not np.array_equal(losses, reference_losses)


# ----- FixMatch ------------------------------------------------------------------------------
def _fixmatch_unlabeled_loss(weak_logits, strong_logits, threshold, per_example_loss,
                             prior=None):
  probabilities = semi.pseudo_label_probabilities(
      lambda logits: tasks.scores_from_logits('multiclass', logits), weak_logits, prior)
  return semi.masked_consistency(probabilities, strong_logits, threshold, per_example_loss)


def test_fixmatch_loss_against_numpy():
  rng = np.random.default_rng(0)
  weak = rng.normal(0, 3, (12, 3)).astype(np.float32)
  strong = rng.normal(0, 1, (12, 3)).astype(np.float32)
  ce = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y)  # noqa
  loss, mask_rate = _fixmatch_unlabeled_loss(jnp.asarray(weak), jnp.asarray(strong), 0.9, ce)
  p = np.exp(weak - weak.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  mask = p.max(1) >= 0.9
  log_q = strong - strong.max(1, keepdims=True)
  log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
  expected = -log_q[np.arange(12), p.argmax(1)] * mask
  assert 0 < mask.sum() < 12
  np.testing.assert_allclose(float(loss), expected.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(mask_rate), mask.mean())
  # The pseudo-label is a constant: no gradient flows into the weak view.
  grad_weak = jax.grad(lambda w: _fixmatch_unlabeled_loss(w, jnp.asarray(strong), 0.9, ce)[0])(
      jnp.asarray(weak))
  assert not np.any(np.asarray(grad_weak))
  # Distribution alignment: p * prior / mean(p), renormalised, before the mask and arg-max.
  prior = np.array([0.2, 0.3, 0.5])
  aligned = p * prior / p.mean(0)
  aligned /= aligned.sum(1, keepdims=True)
  np.testing.assert_allclose(np.asarray(semi.align_distribution(jnp.asarray(p), prior)),
                             aligned, rtol=1e-5)
  loss, mask_rate = _fixmatch_unlabeled_loss(jnp.asarray(weak), jnp.asarray(strong), 0.9, ce,
                                             prior)
  mask = aligned.max(1) >= 0.9
  np.testing.assert_allclose(float(loss), (-log_q[np.arange(12), aligned.argmax(1)] *
                                           mask).mean(), rtol=1e-5)
  np.testing.assert_allclose(float(mask_rate), mask.mean())


# ----- MixMatch ------------------------------------------------------------------------------
def test_mixmatch_pieces_against_numpy():
  rng = np.random.default_rng(3)
  p = rng.dirichlet([1, 1, 1], 6).astype(np.float32)
  sharp = p ** 2 / (p ** 2).sum(1, keepdims=True)
  np.testing.assert_allclose(np.asarray(semi.sharpen(jnp.asarray(p), 0.5)), sharp, rtol=1e-5)
  q = rng.dirichlet([1, 1, 1], 6).astype(np.float32)
  mean = (p + q) / 2
  np.testing.assert_allclose(
      np.asarray(semi.guess_labels([jnp.asarray(p), jnp.asarray(q)], 0.25)),
      mean ** 4 / (mean ** 4).sum(1, keepdims=True), rtol=1e-5)
  # Distribution alignment before sharpening: mean * prior / mean_u(mean), renormalised.
  prior = np.array([0.6, 0.3, 0.1], np.float32)
  aligned = mean * prior / mean.mean(0)
  aligned /= aligned.sum(1, keepdims=True)
  np.testing.assert_allclose(
      np.asarray(semi.guess_labels([jnp.asarray(p), jnp.asarray(q)], 0.5, prior)),
      aligned ** 2 / (aligned ** 2).sum(1, keepdims=True), rtol=1e-5)
  # mixup: rows are basis vectors, so each mixed row shows its own weight (>= 1/2) and its
  # partner's; the targets are mixed with the same weight and partner.
  n = 10
  rows = jnp.eye(n, dtype=jnp.float32)
  targets = jnp.asarray(rng.dirichlet([1, 1], n), jnp.float32)
  mixed, mixed_targets = semi.mixup(jax.random.PRNGKey(0), rows, targets, 0.75)
  mixed, mixed_targets = np.asarray(mixed), np.asarray(mixed_targets)
  own = mixed[np.arange(n), np.arange(n)]  # 1 where the permutation left a row in place
  assert np.all(own >= 0.5) and np.sum(own < 1) >= n // 2
  partner = np.where(own == 1.0, np.arange(n), np.argmax(mixed - np.diag(own), axis=1))
  expected = own[:, None] * np.asarray(targets) + (1 - own[:, None]) * np.asarray(
      targets)[partner]
  np.testing.assert_allclose(mixed_targets, expected, rtol=1e-5)
  np.testing.assert_allclose(mixed.sum(1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(np.sort(partner), np.arange(n))  # a permutation
  # The loss: soft cross-entropy of the labelled rows + weight * squared error (mean over
  # rows and classes) of the unlabelled rows' probabilities.
  lab_logits, unl_logits = rng.normal(size=(4, 3)), rng.normal(size=(6, 3))
  lab_t, unl_t = rng.dirichlet([1, 1, 1], 4), rng.dirichlet([1, 1, 1], 6)
  log_p = lab_logits - np.log(np.exp(lab_logits).sum(1, keepdims=True))
  soft = np.exp(unl_logits) / np.exp(unl_logits).sum(1, keepdims=True)
  expected = -(lab_t * log_p).sum(1).mean() + 7.0 * ((soft - unl_t) ** 2).mean()
  np.testing.assert_allclose(
      float(semi.mixmatch_loss(*(jnp.asarray(a, jnp.float32) for a in
                                 (lab_logits, lab_t, unl_logits, unl_t)), 7.0)),
      expected, rtol=1e-5)


@pytest.mark.slow
def test_mixmatch_guesses_labels_with_this_steps_model_on_both_views(monkeypatch):
  """Before mixup (tested above; replaced here by the identity), the targets of a MixMatch
  batch are the labelled rows' one-hot labels and, for each unlabelled image, the sharpened
  mean of the model's softmax on its two views, computed here with the model outside the
  step; the rows are the labelled ones, then the two views in order."""
  monkeypatch.setattr(semi.mixmatch, 'mixup', lambda key, rows, targets, alpha: (rows, targets))
  c = _config('data.labeled_fraction=0.25', 'semi.method=mixmatch',
              'semi.sharpen_temperature=0.5', 'semi.unlabeled_ratio=1')
  exp = ClassificationExperiment(c)
  state = exp.init_state()
  images, labels = next(iter(exp.train_iterator(0)))
  assert images.shape[0] == 3 * labels.shape[0] == 96
  mixed, targets = jax.jit(exp.train_inputs)(state, jnp.asarray(images), jnp.asarray(labels),
                                             jax.random.PRNGKey(1))
  np.testing.assert_array_equal(np.asarray(mixed), images)
  logits = np.asarray(exp.model.apply({'params': state.params}, images[32:], train=False))
  prob = np.exp(logits - logits.max(1, keepdims=True))
  prob /= prob.sum(1, keepdims=True)
  mean = (prob[:32] + prob[32:]) / 2
  guess = mean ** 2 / (mean ** 2).sum(1, keepdims=True)
  expected = np.concatenate([np.eye(exp.num_outputs)[labels], guess, guess])
  np.testing.assert_allclose(np.asarray(targets['targets']), expected, atol=1e-5)
  assert targets['num_labeled'] == 32
  # The two views are different draws of the weak augmentation of the same images.
  assert not np.allclose(images[32:64], images[64:])


@pytest.mark.slow
def test_mixmatch_run_resumes_exactly(tmp_path):
  c = _config('data.labeled_fraction=0.25', 'semi.method=mixmatch', 'semi.unlabeled_ratio=1')
  _assert_resumes_exactly(c, tmp_path, stop_at=5)


def _assert_resumes_exactly(c, tmp_path, stop_at: int) -> str:
  """Trains ``c`` whole and, in another workdir, stopped at step ``stop_at`` then resumed:
  every logged record but the speed is equal. Returns the whole run's workdir."""
  full, resumed = str(tmp_path / 'full'), str(tmp_path / 'resumed')
  train_lib.train_and_evaluate(c, full)
  c.train.stop_after_steps = stop_at
  assert train_lib.train_and_evaluate(c, resumed) == {'stopped_at_step': stop_at}
  c.train.stop_after_steps = 0
  train_lib.train_and_evaluate(c, resumed)

  def records(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return [{k: v for k, v in json.loads(line).items() if k != 'images_per_sec'}
              for line in f]

  assert records(resumed) == records(full)
  return full


def _softmax(logits):
  p = np.exp(logits - logits.max(1, keepdims=True))
  return p / p.sum(1, keepdims=True)


def test_self_adaptive_thresholds_against_numpy():
  """FreeMatch: running means of the top probability and of each class's probability, moved
  towards every batch; class c's threshold is tau * p~_c / max p~; the mask reads each
  image's threshold by its pseudo-label."""
  rng = np.random.default_rng(1)
  momentum, k = 0.9, 3
  state = semi.adaptive_threshold_state(k)
  tau, class_p = 1 / k, np.full(k, 1 / k)
  for _ in range(4):
    p = _softmax(rng.normal(0, 2, (10, k)) + [1.0, 0.0, -1.0])
    state, thresholds = semi.adaptive_thresholds(state, jnp.asarray(p, jnp.float32), momentum)
    tau = momentum * tau + (1 - momentum) * p.max(1).mean()
    class_p = momentum * class_p + (1 - momentum) * p.mean(0)
    np.testing.assert_allclose(np.asarray(thresholds), tau * class_p / class_p.max(),
                               rtol=1e-5)
  np.testing.assert_allclose(float(state['confidence']), tau, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(state['class_probability']), class_p, rtol=1e-5)
  assert np.argmin(np.asarray(thresholds)) == 2   # the least-predicted class: the lowest

  p = _softmax(rng.normal(0, 2, (40, k)))
  strong = rng.normal(0, 1, (40, k)).astype(np.float32)
  per_class = np.array([0.5, 0.9, 0.7], np.float32)
  ce = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y)  # noqa
  loss, rate = semi.masked_consistency(jnp.asarray(p, jnp.float32), jnp.asarray(strong),
                                       jnp.asarray(per_class), ce)
  mask = p.max(1) >= per_class[p.argmax(1)]
  assert not any(np.array_equal(mask, p.max(1) >= t) for t in per_class)
  log_q = np.log(_softmax(strong))
  np.testing.assert_allclose(float(loss), (-log_q[np.arange(40), p.argmax(1)] * mask).mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(float(rate), mask.mean())


@pytest.mark.slow
def test_self_adaptive_fixmatch_checkpoints_its_thresholds_and_resumes_exactly(tmp_path):
  c = _config('data.labeled_fraction=0.1', 'semi.method=fixmatch',
              'semi.threshold_mode=self_adaptive', 'semi.threshold_momentum=0.9',
              'train.num_epochs=1', 'train.log_every_steps=1', 'model.features=(4, 8)',
              'model.hidden=8')
  full = _assert_resumes_exactly(c, tmp_path, stop_at=3)
  exp, state = train_lib.restore_workdir(full)[:2]
  stats = jax.device_get(state.loss_state)
  # 8 steps moved the statistics off their start (1/K) and they are still probabilities.
  assert 1 / 3 < stats['confidence'] <= 1
  assert not np.allclose(stats['class_probability'], 1 / 3)
  np.testing.assert_allclose(stats['class_probability'].sum(), 1, rtol=1e-5)
  with pytest.raises(ValueError, match='threshold_mode=self_adaptive is for semi.method=fixm'):
    make_experiment(_config('data.labeled_fraction=0.1', 'semi.method=self_training',
                            'semi.teacher=x', 'semi.threshold_mode=self_adaptive'))
  with pytest.raises(ValueError, match="unknown semi.threshold_mode 'flex'"):
    make_experiment(_config('data.labeled_fraction=0.1', 'semi.method=fixmatch',
                            'semi.threshold_mode=flex'))


def test_fixmatch_outputs_split_per_process_block():
  # 2 processes, each [labelled 2; weak 3; strong 3]: rows numbered by role.
  block = np.array([0, 0, 1, 1, 1, 2, 2, 2])
  outputs = jnp.asarray(np.concatenate([block, block + 10])[:, None].astype(np.float32))
  labeled, weak, strong = semi.split_outputs(outputs, num_labeled=4, process_count=2)
  np.testing.assert_array_equal(np.asarray(labeled)[:, 0], [0, 0, 10, 10])
  np.testing.assert_array_equal(np.asarray(weak)[:, 0], [1, 1, 1, 11, 11, 11])
  np.testing.assert_array_equal(np.asarray(strong)[:, 0], [2, 2, 2, 12, 12, 12])


def _views(images, start, stop, process_index=0, process_count=1):
  c = _config()
  return list(pipeline.unlabeled_batches(
      images, global_batch=8, seed=3, start_step=start, num_steps=stop, pixel_max=255.0,
      mean=0.5, std=0.5, weak=c.data.augment, strong=c.semi.strong_augment,
      process_index=process_index, process_count=process_count))


def test_unlabelled_views_are_deterministic_resumable_and_split_over_processes():
  images = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 1), dtype=np.uint8)
  full = _views(images, 0, 6)
  assert len(full) == 6 and full[0][0].shape == (8, 16, 16, 1)
  for (w, s), (w2, s2) in zip(full[2:], _views(images, 2, 6)):
    np.testing.assert_array_equal(w, w2)
    np.testing.assert_array_equal(s, s2)
  halves = [_views(images, 0, 6, p, 2) for p in (0, 1)]
  for step, (w, s) in enumerate(full):
    np.testing.assert_array_equal(np.concatenate([halves[0][step][0], halves[1][step][0]]), w)
    np.testing.assert_array_equal(np.concatenate([halves[0][step][1], halves[1][step][1]]), s)
  # Positions 0..47 visit every image: whole permutations, each image 2.4 times.
  stream = pipeline.unlabeled_stream(3, 20, 0, 40)
  np.testing.assert_array_equal(np.bincount(stream, minlength=20), 2)
  np.testing.assert_array_equal(pipeline.unlabeled_stream(3, 20, 13, 31), stream[13:31])
  # The two views of one image differ (strong: rotation, scale, intensity, cutout).
  assert not np.allclose(full[0][0], full[0][1])


def test_cutout_zeroes_a_square_of_the_given_side():
  c = _config()
  aug = c.data.augment
  aug.cutout = 0.5
  fn = pipeline.make_augment_fn(aug, 2)
  image = np.ones((32, 32, 1), np.float32)
  import tensorflow as tf
  areas = []
  for k in range(20):
    out = fn(tf.constant(image), tf.constant([k, 1], tf.int64)).numpy()
    zero = out[..., 0] == 0
    rows, cols = np.flatnonzero(zero.any(1)), np.flatnonzero(zero.any(0))
    # One axis-aligned rectangle (a 16 x 16 square clipped at the border).
    assert zero.sum() == len(rows) * len(cols) and len(rows) <= 16 and len(cols) <= 16
    areas.append(zero.sum())
  assert max(areas) == 256 and min(areas) >= 64
  aug.cutout = 1.0
  with pytest.raises(ValueError, match='cutout is a fraction'):
    pipeline.make_augment_fn(aug, 2)


# ----- self-training -------------------------------------------------------------------------
def test_select_pseudo_labels_threshold_and_class_balance():
  rng = np.random.default_rng(1)
  scores = rng.dirichlet([0.3, 0.3], 400)
  index, labels = few_labels.select_pseudo_labels(scores, 0.9)
  np.testing.assert_array_equal(index, np.flatnonzero(scores.max(1) >= 0.9))
  np.testing.assert_array_equal(labels, scores[index].argmax(1))
  # Prior 3:1 -> the kept classes follow 3:1, each the most confident of its class.
  index, labels = few_labels.select_pseudo_labels(scores, 0.9, np.array([30, 10]))
  counts = np.bincount(labels, minlength=2)
  available = [np.sum((scores.max(1) >= 0.9) & (scores.argmax(1) == c)) for c in (0, 1)]
  total = int(np.floor(min(available[0] / 0.75, available[1] / 0.25)))
  np.testing.assert_array_equal(counts, [min(round(total * .75), available[0]),
                                         min(round(total * .25), available[1])])
  for c in (0, 1):
    kept = scores[index[labels == c], c]
    confident_c = scores[(scores.max(1) >= 0.9) & (scores.argmax(1) == c), c]
    assert kept.min() >= np.sort(confident_c)[::-1][len(kept) - 1]


def test_pseudo_label_warning_says_which_class_blocks_class_balance():
  # The teacher is sure of class 1 only: class balance keeps nothing, and says why.
  scores = np.array([[0.02, 0.98], [0.03, 0.97], [0.6, 0.4], [0.3, 0.7]])
  np.testing.assert_array_equal(semi.confident_per_class(scores, 0.95), [0, 2])
  index, _ = few_labels.select_pseudo_labels(scores, 0.95, np.array([1, 3]))
  assert len(index) == 0
  info = {'pseudo_labeled': 0, 'confident_per_class': [0, 2], 'class_balance': True,
          'threshold': 0.95}
  assert 'no unlabelled image of class(es) [0]' in semi.pseudo_label_warning(info)
  assert 'Lower semi.threshold' in semi.pseudo_label_warning(
      dict(info, confident_per_class=[0, 0]))
  assert semi.pseudo_label_warning(dict(info, pseudo_labeled=2)) == ''


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('few') / 'teacher')
  train_lib.train_and_evaluate(_config('data.labeled_fraction=0.2'), workdir)
  return workdir


@pytest.mark.slow
def test_self_training_adds_the_teachers_confident_pseudo_labels(teacher, tmp_path,
                                                                monkeypatch):
  c = _config('data.labeled_fraction=0.2', 'semi.method=self_training',
              f'semi.teacher={teacher}', 'semi.threshold=0.5', 'semi.class_balance=False')
  student = make_experiment(c)
  few = few_labels.split_labeled(load_data(c), c.data, c.seed)
  teacher_exp, state, _ = train_lib.restore_workdir(teacher)
  scores = teacher_exp.predict_images(state, few.unlabeled)
  confident = np.flatnonzero(scores.max(1) >= 0.5)
  assert 0 < len(confident) < len(few.unlabeled)
  images, labels = student.data.splits['train']
  assert len(labels) == 51 + len(confident)
  np.testing.assert_array_equal(images[51:], few.unlabeled[confident])
  np.testing.assert_array_equal(labels[51:], scores[confident].argmax(1))
  assert student.steps_per_epoch == 8
  # A full run records the pseudo-labels in its data fingerprint (a resume must match).
  workdir = str(tmp_path / 'student')
  c.train.num_epochs = 1
  results = train_lib.train_and_evaluate(c, workdir)
  with open(os.path.join(workdir, 'data_fingerprint.json')) as f:
    fingerprint = json.load(f)
  assert fingerprint['pseudo_labels']['pseudo_labeled'] == len(confident)
  # Evaluating the student restores its model without its training-only set-up: the teacher
  # is not loaded again, and the numbers are the run's own.
  monkeypatch.setattr(ClassificationExperiment, 'load_run',
                      lambda *args: pytest.fail('evaluate reloaded the teacher'))
  again = train_lib.evaluate_workdir(workdir, 'test', write=False)
  assert again['metrics'] == results['test']
  assert fingerprint['few_labels'] == few.fingerprint()
  assert fingerprint['splits']['train']['examples'] == 51 + len(confident)
  # The teacher of seed K of a group is the teacher group's seed_K.
  os.makedirs(tmp_path / 'group' / 'seed_3')
  group = str(tmp_path / 'group')
  assert workdir_lib.seed_member(group, 3) == os.path.join(group, 'seed_3')
  assert workdir_lib.seed_member(teacher, 3) == teacher


# ----- mean teacher (segmentation) ----------------------------------------------------------
def test_parameter_ema_against_numpy():
  from medjax import optim
  tx = optim.with_parameter_ema(optax.sgd(0.1), decay=0.9)
  params = {'w': jnp.array([1.0, -2.0])}
  state = tx.init(params)
  rng = np.random.default_rng(0)
  ema, p = np.array([1.0, -2.0]), np.array([1.0, -2.0])
  for t in range(1, 30):
    grad = rng.normal(size=2).astype(np.float32)
    updates, state = tx.update({'w': jnp.asarray(grad)}, state, params)
    params = optax.apply_updates(params, updates)
    p = p - 0.1 * grad
    a = min(0.9, 1 - 1 / (t + 1))
    ema = a * ema + (1 - a) * p
    np.testing.assert_allclose(np.asarray(params['w']), p, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.ema['w']), ema, rtol=1e-5)
  assert int(state.count) == 29


@pytest.mark.slow
def test_evaluation_with_the_parameter_average(tmp_path, quickstart_run):
  """optimizer.ema_decay: training is unchanged (the same losses as the quickstart run), and
  the test predictions are those of the averaged parameters, not of the trained ones."""
  config = config_lib.load_config_file('configs/quickstart.py:runlocal')
  config_lib.apply_overrides(config, ['optimizer.ema_decay=0.9'])
  workdir = str(tmp_path / 'ema')
  train_lib.train_and_evaluate(config, workdir)

  def train_losses(path):
    with open(os.path.join(path, 'metrics.jsonl')) as f:
      return [r['loss'] for r in map(json.loads, f) if r['split'] == 'train']
  assert train_losses(workdir) == train_losses(quickstart_run)
  exp, state, _ = train_lib.restore_workdir(workdir)
  images, _ = exp.data.splits['test']
  x = jnp.asarray(exp.preprocess(images))
  assert exp.task == 'multiclass' and not jax.tree.leaves(state.batch_stats)
  average = jax.nn.softmax(exp.model.apply({'params': state.opt_state.ema}, x, train=False))
  trained = jax.nn.softmax(exp.model.apply({'params': state.params}, x, train=False))
  stored = np.load(os.path.join(workdir, 'predictions_test.npz'))['scores']
  np.testing.assert_allclose(stored, np.asarray(average), atol=1e-5)
  assert np.abs(stored - np.asarray(trained)).max() > 1e-3
  # Synthetic volumes: the refusal is checked without ../shared too.
  from medjax.data import synthetic
  root = synthetic.write_segmentation_dataset(str(tmp_path / 'seg'), num_cases=6, seed=0)
  seg = config_lib.load_config_file('configs/hippocampus_unet3d.py:runlocal')
  config_lib.apply_overrides(seg, [f'data.root={root}', f'data.cache_dir={tmp_path / "cache"}',
                                   'optimizer.ema_decay=0.9', 'semi.method=mean_teacher',
                                   'data.labeled_count=2'])
  with pytest.raises(ValueError, match='set optimizer.ema_decay=0'):
    make_experiment(seg)


def test_consistency_pieces_against_numpy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  teacher = rng.dirichlet([1, 1, 1], (2, 4, 4)).astype(np.float32)
  softmax = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(float(semi.consistency_mse(jnp.asarray(logits),
                                                        jnp.asarray(teacher))),
                             np.mean((softmax - teacher) ** 2), rtol=1e-5)
  # Sigmoid ramp-up over the first quarter of 100 steps, then 1.
  for step, expected in ((0, np.exp(-5)), (12.5, np.exp(-5 * 0.25)), (25, 1.0), (80, 1.0)):
    np.testing.assert_allclose(float(semi.ramp_up(jnp.float32(step), 100, 0.25)), expected,
                               rtol=1e-6)
  rows = jnp.arange(2 * (3 + 5))[:, None]  # 2 processes x [labelled 3; unlabelled 5]
  labeled, unlabeled = semi.split_rows(rows, 6, 2, 2)
  np.testing.assert_array_equal(np.asarray(labeled)[:, 0], [0, 1, 2, 8, 9, 10])
  np.testing.assert_array_equal(semi.join_rows([labeled, unlabeled], 2), rows)


def _seg_config(tmp_path, *overrides):
  from medjax.data import synthetic
  root = synthetic.write_segmentation_dataset(str(tmp_path / 'data'), num_cases=8, seed=0)
  c = config_lib.load_config_file('configs/hippocampus_unet3d.py:runlocal')
  return config_lib.apply_overrides(c, [
      f'data.root={root}', f'data.cache_dir={tmp_path / "cache"}', 'data.max_cases=8',
      'data.num_folds=4', 'data.labeled_count=2',
      # 2D slices of the volumes: the same code path, compiled in a fraction of the time.
      'data.slice_axis=0', 'data.patch_size=(16, 16)', *overrides])


@pytest.mark.slow
@pytest.mark.parametrize('method', ['mean_teacher', 'fixmatch'])
def test_segmentation_methods_never_read_the_labels_of_unlabelled_cases(method, tmp_path,
                                                                      monkeypatch):
  """Corrupting the stored labels (and foreground locations) of the unlabelled training
  cases changes nothing in training; corrupting a labelled case's does."""
  from medjax.data import prepare
  # FixMatch: a threshold low enough that the model's pseudo-labels count from step one.
  c = _seg_config(tmp_path, f'semi.method={method}', 'semi.threshold=0.4')

  def train(corrupt=()):
    original = prepare.PreparedDataset.load

    def load(self, case_id, mmap=True):
      image, label, locations = original(self, case_id, mmap)
      if case_id in corrupt:
        label = (np.asarray(label) + 1) % 3
        locations = {k: v[:1] for k, v in locations.items()}
      return image, label, locations

    monkeypatch.setattr(prepare.PreparedDataset, 'load', load)
    exp = make_experiment(c)
    state = exp.init_state()
    losses = []
    for _, (images, labels) in zip(range(4), exp.train_iterator(0)):
      state, metrics = exp.train_step(state, images, labels)
      losses.append(float(metrics['loss']))
    trained = state.opt_state.ema if method == 'mean_teacher' else state.params
    return np.array(losses), jax.device_get(trained), exp.data.splits

  reference, trained, split = train()
  assert len(split['train']) == 2 and len(split['unlabeled']) == 4 and len(split['val']) == 2
  assert np.all(np.isfinite(reference))
  losses, corrupted_trained, _ = train(corrupt=set(split['unlabeled']))
  np.testing.assert_array_equal(losses, reference)
  jax.tree.map(np.testing.assert_array_equal, corrupted_trained, trained)
  losses, _, _ = train(corrupt={split['train'][0]})
  assert not np.array_equal(losses, reference)


@pytest.mark.slow
@pytest.mark.parametrize('method', ['mean_teacher', 'fixmatch'])
def test_segmentation_semi_run_resumes_exactly(method, tmp_path):
  c = _seg_config(tmp_path, f'semi.method={method}', 'semi.threshold=0.4')
  full = _assert_resumes_exactly(c, tmp_path, stop_at=4)
  with open(os.path.join(full, 'split.json')) as f:
    assert len(json.load(f)['unlabeled']) == 4


@pytest.mark.slow
def test_segmentation_fixmatch_pieces_against_numpy():
  rng = np.random.default_rng(3)
  probabilities = rng.dirichlet([1, 1, 1], (2, 5, 6)).astype(np.float32)
  expected = np.where(probabilities.max(-1) >= 0.6, probabilities.argmax(-1), IGNORE_LABEL)
  np.testing.assert_array_equal(semi.pseudo_label_map(jnp.asarray(probabilities), 0.6,
                                                      IGNORE_LABEL), expected)
  # CutMix boxes: rectangles of the drawn share of the patch, in a prob share of the rows.
  boxes = np.asarray(semi.cutmix_boxes(jax.random.PRNGKey(0), 400, (20, 30), 0.5,
                                       (0.1, 0.4)))
  assert boxes.shape == (400, 20, 30)
  with_box = boxes.any(axis=(1, 2))
  assert 0.4 < with_box.mean() < 0.6
  for box in boxes[with_box]:
    rows, cols = box.any(1), box.any(0)
    np.testing.assert_array_equal(box, rows[:, None] & cols[None, :])  # one rectangle
    for side in (rows, cols):  # contiguous
      filled = np.flatnonzero(side)
      assert filled[-1] - filled[0] + 1 == len(filled)
    # Each side is round(sqrt(a) x the patch's), a in [0.1, 0.4].
    share = np.sqrt(rows.sum() / 20 * cols.sum() / 30)
    assert np.sqrt(0.1) - 0.05 <= share <= np.sqrt(0.4) + 0.05
    assert abs(rows.sum() / 20 - cols.sum() / 30) <= 0.5 / 20 + 0.5 / 30
  assert not np.asarray(semi.cutmix_boxes(jax.random.PRNGKey(1), 50, (8, 8, 8), 0.0,
                                          (0.1, 0.4))).any()
  assert np.asarray(semi.cutmix_boxes(jax.random.PRNGKey(1), 50, (8, 8, 8), 1.0,
                                      (0.1, 0.4))).any(axis=(1, 2, 3)).all()
  # Images and label maps take the partner's voxels inside the box, the same ones.
  images = rng.normal(size=(3, 4, 5, 2)).astype(np.float32)
  labels = rng.integers(0, 3, (3, 4, 5))
  box, partner = rng.random((3, 4, 5)) < 0.3, np.array([2, 0, 1])
  mixed_images, mixed_labels = semi.cutmix(jnp.asarray(box), jnp.asarray(partner),
                                           jnp.asarray(images), jnp.asarray(labels))
  np.testing.assert_array_equal(mixed_images, np.where(box[..., None], images[partner],
                                                       images))
  np.testing.assert_array_equal(mixed_labels, np.where(box, labels[partner], labels))


def test_strong_intensity_scales_contrasts_and_adds_noise_per_patch():
  x = np.random.default_rng(4).normal(1.0, 1.0, (6, 8, 8, 2)).astype(np.float32)
  key = jax.random.PRNGKey(5)
  np.testing.assert_allclose(semi.strong_intensity(key, jnp.asarray(x), 0.0, 0.0, 0.0), x,
                             atol=1e-6)
  scaled = np.asarray(semi.strong_intensity(key, jnp.asarray(x), 0.3, 0.0, 0.0))
  # One factor per patch (least squares), in [0.7, 1.3], different between patches.
  factor = (scaled * x).sum(axis=(1, 2, 3)) / (x * x).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(scaled, factor[:, None, None, None] * x, atol=1e-5)
  assert np.all((factor >= 0.7 - 1e-6) & (factor <= 1.3 + 1e-6)) and np.ptp(factor) > 0.05
  contrasted = np.asarray(semi.strong_intensity(key, jnp.asarray(x), 0.0, 0.3, 0.0))
  mean = x.mean(axis=(1, 2, 3), keepdims=True)  # the patch mean stays, deviations scale
  np.testing.assert_allclose(contrasted.mean(axis=(1, 2, 3), keepdims=True), mean, atol=1e-5)
  factor = (((contrasted - mean) * (x - mean)).sum(axis=(1, 2, 3))
            / ((x - mean) ** 2).sum(axis=(1, 2, 3)))
  np.testing.assert_allclose(contrasted - mean, factor[:, None, None, None] * (x - mean),
                             atol=1e-5)
  assert np.all((factor >= 0.7 - 1e-6) & (factor <= 1.3 + 1e-6)) and np.ptp(factor) > 0.05
  noisy = np.asarray(semi.strong_intensity(key, jnp.asarray(x), 0.0, 0.0, 0.2)) - x
  assert np.all(noisy.std(axis=(1, 2, 3)) < 0.2 * 1.2) and np.ptp(noisy.std(axis=(1, 2, 3))) > 0


@pytest.mark.slow
def test_segmentation_fixmatch_targets_are_this_steps_pseudo_labels(tmp_path):
  """The strong rows' targets are the arg-max of this step's model on the weak patches
  (unsure voxels IGNORE_LABEL); without perturbations the strong rows are the weak ones.
  The unsure voxels count in no loss: the loss with every voxel unsure is the supervised
  loss of the labelled rows."""
  c = _seg_config(tmp_path, 'semi.method=fixmatch', 'semi.threshold=0.5',
                  'semi.segmentation_strong.brightness=0', 'semi.segmentation_strong.contrast=0',
                  'semi.segmentation_strong.noise_std=0', 'semi.segmentation_strong.cutmix_prob=0')
  exp = make_experiment(c)
  state = exp.init_state()
  images, labels = next(iter(exp.train_iterator(0)))
  num_labeled = labels.shape[0]
  rows, targets = exp.train_inputs(state, jnp.asarray(images), jnp.asarray(labels),
                                   jax.random.PRNGKey(0))
  np.testing.assert_allclose(rows, images, atol=1e-6)
  logits = np.asarray(exp.model.apply({'params': state.params}, images[num_labeled:],
                                      train=False), np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  expected = np.where(p.max(-1) >= 0.5, p.argmax(-1), IGNORE_LABEL)
  close = np.abs(p.max(-1) - 0.5) < 1e-4  # float32 rounding at the threshold
  np.testing.assert_array_equal(np.asarray(targets['pseudo'])[~close], expected[~close])
  assert 0 < (expected == IGNORE_LABEL).mean() < 1
  np.testing.assert_array_equal(targets['labels'], labels)

  outputs = exp.model.apply({'params': state.params}, rows, train=True)
  unsure = dict(targets, pseudo=jnp.full_like(targets['pseudo'], IGNORE_LABEL))
  labeled_outputs = [o[:num_labeled] for o in outputs] if isinstance(outputs, (list, tuple)) \
      else outputs[:num_labeled]
  loss = lambda targets: float(exp.loss_with_state(outputs, targets, {})[0])  # noqa: E731
  np.testing.assert_allclose(loss(unsure),
                             exp.supervised_loss(labeled_outputs, targets['labels']), rtol=1e-6)
  assert loss(targets) > loss(unsure)


def test_labeled_share_repeats_the_labelled_cases():
  labeled = {f'l{i}': (i,) for i in range(10)}
  pseudo = {f'p{i}': (i,) for i in range(150)}
  cases = semi.with_labeled_share(labeled, pseudo, 0.5)
  assert len(cases) == 150 + 10 * 15 and cases['l3~14'] is labeled['l3']
  assert len(semi.with_labeled_share(labeled, pseudo, 0.0)) == 160
  assert len(semi.with_labeled_share(labeled, pseudo, 0.75)) == 150 + 10 * 45
  with pytest.raises(ValueError, match='labeled_share must be in'):
    semi.with_labeled_share(labeled, pseudo, 1.0)


@pytest.mark.slow
def test_segmentation_self_training_trains_on_the_teachers_label_maps(tmp_path):
  """The student's sampler holds the unlabelled cases with the teacher's arg-max label maps
  (computed here independently), its unsure voxels (top probability below semi.threshold)
  marked ignored, the data fingerprint names the teacher, and a teacher trained on other
  labelled cases (it would carry their labels) is refused."""
  teacher_dir = str(tmp_path / 'teacher')
  c = _seg_config(tmp_path, 'train.num_epochs=1')
  train_lib.train_and_evaluate(c, teacher_dir)
  teacher, state = train_lib.restore_workdir(teacher_dir)[:2]
  probabilities = {case: teacher.predict_prepared(state, teacher.cases[case][0])
                   for case in teacher.data.splits['unlabeled']}
  # A threshold between the teacher's voxel confidences, so some voxels go each way.
  threshold = float(np.median(np.max(next(iter(probabilities.values())), axis=-1)))
  student_config = _seg_config(tmp_path, 'semi.method=self_training', 'train.num_epochs=1',
                               f'semi.teacher={teacher_dir}', f'semi.threshold={threshold}')
  student = make_experiment(student_config)
  unlabeled = student.data.splits['unlabeled']
  # 2 labelled cases, each twice, and 4 pseudo-labelled: half the cases drawn are labelled.
  assert len(unlabeled) == 4 and sorted(student.sampler.case_ids) == sorted(
      [*unlabeled, *student.data.splits['train'],
       *(f'{c}~1' for c in student.data.splits['train'])])
  assert student.ignore_label == IGNORE_LABEL
  ignored = 0
  for case in unlabeled:
    expected = np.argmax(probabilities[case], axis=-1)
    unsure = np.max(probabilities[case], axis=-1) < threshold
    expected[unsure] = IGNORE_LABEL
    ignored += unsure.sum()
    np.testing.assert_array_equal(student.sampler.cases[case][1], expected)
  assert 0 < ignored < sum(p[..., 0].size for p in probabilities.values())
  every_voxel = make_experiment(_seg_config(
      tmp_path, 'semi.method=self_training', f'semi.teacher={teacher_dir}', 'semi.threshold=0'))
  assert every_voxel.ignore_label is None
  for case in unlabeled:
    np.testing.assert_array_equal(every_voxel.sampler.cases[case][1],
                                  np.argmax(probabilities[case], axis=-1))
  assert student.run_files()['data_fingerprint.json']['pseudo_labels']['teacher'] == (
      os.path.abspath(teacher_dir))
  results = train_lib.train_and_evaluate(student_config, str(tmp_path / 'student'))
  assert 0 <= results['val']['dice'] <= 1
  with pytest.raises(ValueError, match='not labelled in this run'):
    make_experiment(_seg_config(tmp_path, 'semi.method=self_training', 'data.labeled_seed=5',
                                f'semi.teacher={teacher_dir}'))
