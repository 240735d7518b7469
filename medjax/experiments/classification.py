"""Classification (binary, multi-class, ordinal, multi-label): whole images in, one score per
class out; MedMNIST, the embedded synthetic dataset, or a folder of images.

* data: :func:`medjax.data.load_data` (``data.name``); tf.data batches from
  :mod:`medjax.data.pipeline` (normalised ``(x / pixel_max - mean) / std``, augmented,
  shuffled per epoch from the seed);
* loss: cross-entropy or focal (:mod:`medjax.losses`), optional class weights and label
  smoothing; the head's logits become scores per :mod:`medjax.tasks`;
* evaluation: AUC, accuracy, sensitivity, specificity, ... (:mod:`medjax.metrics`) of val
  and test; ``predictions_<split>.npz`` holds every example's scores.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medjax import losses, metrics as metrics_lib, semi, tasks, workdir as workdir_lib
from medjax.data import ClassificationData, few_labels, load_data, pipeline
from medjax.experiments.base import Experiment, TrainState

# What the CLI table, results.json's headline_metrics and the reports show, in this order.
HEADLINE_METRICS = ('auc', 'accuracy', 'balanced_accuracy', 'sensitivity', 'specificity', 'f1',
                    'ece', 'loss')


def resolve_task(task: str, data: ClassificationData) -> str:
  """``config.task`` checked against the dataset's labels (``'auto'``: the dataset's own)."""
  if task == 'auto':
    return data.task
  tasks.check_task(task)
  compatible = {
      'binary': ('binary',), 'multiclass': ('binary', 'multiclass', 'ordinal'),
      'ordinal': ('binary', 'multiclass', 'ordinal'), 'multilabel': ('multilabel',)}
  if data.task not in compatible[task]:
    raise ValueError(f"task '{task}' does not fit dataset {data.name}, whose labels are "
                     f"{data.task}")
  return task


def save_predictions(workdir: str, split: str, predictions: Dict[str, np.ndarray],
                     class_names) -> None:
  """``predictions_<split>.npz``: index, labels, scores ``[N, K]`` and the class names."""
  if not workdir_lib.is_main():
    return
  np.savez(os.path.join(workdir, f'predictions_{split}.npz'), index=predictions['index'],
           labels=predictions['labels'], scores=predictions['scores'],
           class_names=np.array(class_names))


def ensemble_predictions(workdirs: Sequence[str], split: str, task: str
                         ) -> tuple[Dict[str, Any], Dict]:
  """Metrics and predictions (index, labels, scores ``[N, K]``) of the mean of several
  classification runs' probabilities on ``split``, read from their
  ``predictions_<split>.npz``; runs that scored different examples are refused."""
  runs = []
  for workdir in workdirs:
    with np.load(os.path.join(workdir, f'predictions_{split}.npz')) as f:
      runs.append({k: f[k] for k in ('index', 'labels', 'scores')})
  for run in runs[1:]:
    if not np.array_equal(run['labels'], runs[0]['labels']):
      raise ValueError(f'{workdirs}: the runs scored different {split} examples')
  scores = np.mean([run['scores'] for run in runs], axis=0)
  result = metrics_lib.classification_metrics(task, runs[0]['labels'], scores)
  return result, {'index': runs[0]['index'], 'labels': runs[0]['labels'], 'scores': scores}


def outputs_in_batches(exp: Experiment, step, images: np.ndarray, labels: np.ndarray,
                       pixel_max: float) -> tuple:
  """Each output of ``step(images, labels)`` (a compiled step on one global eval batch,
  its outputs replicated) over raw ``images`` ``[N, *spatial, C]``, normalised as in training,
  concatenated in dataset order with the padding dropped."""
  cfg = exp.config.data
  batches = pipeline.eval_batches(
      images, labels, global_batch=exp.config.train.eval_batch_size, pixel_max=pixel_max,
      mean=cfg.mean, std=cfg.std, process_index=jax.process_index(),
      process_count=jax.process_count())
  outputs, masks = [], []
  for batch_images, batch_labels, global_mask in batches:
    out = step(exp.global_array(batch_images), exp.global_array(batch_labels))
    # Outputs are replicated: every process holds the whole global batch.
    outputs.append([np.asarray(o.addressable_data(0)) for o in out])
    masks.append(global_mask)
  mask = np.concatenate(masks).astype(bool)
  return tuple(np.concatenate(parts)[mask] for parts in zip(*outputs))


class ClassificationExperiment(Experiment):
  """A classification config bound to its data, model and compiled steps."""

  def __init__(self, config: ml_collections.ConfigDict,
               data: Optional[ClassificationData] = None):
    super().__init__(config)
    self.data = data if data is not None else load_data(config)
    self.task = resolve_task(config.task, self.data)
    self.dataset_name = self.data.name
    self.class_names = list(self.data.class_names)
    if config.train.steps_per_epoch:
      raise ValueError('train.steps_per_epoch applies to segmentation; a classification epoch '
                       'is one pass over the training split')
    if config.loss.name not in ('ce', 'focal'):
      raise ValueError(f"unknown loss.name '{config.loss.name}'; expected 'ce' or 'focal'")
    # Few labels: an epoch stays one pass over the whole training split's size, so every
    # fraction and method trains for the same number of steps.
    epoch_examples = len(self.data.splits['train'][1])
    self.few = few_labels.split_labeled(self.data, config.data, config.seed)
    self.unlabeled = None if self.few is None else self.few.unlabeled
    if self.few is not None:
      self.data = self.few.data
    self.semi_method = semi.check_method(config.semi, self.task, self.unlabeled is not None)
    if self.semi_method == 'mixmatch' and (
        config.loss.name != 'ce' or config.loss.class_weights != 'none' or
        config.loss.label_smoothing):
      raise ValueError('semi.method=mixmatch trains on mixed soft targets with its own '
                       'cross-entropy: loss.name must be ce, loss.class_weights none and '
                       'loss.label_smoothing 0')
    self.epoch_steps = None if self.few is None else pipeline.steps_per_epoch(
        epoch_examples, config.train.batch_size)
    self.setup(num_outputs=tasks.num_outputs(self.task, self.data.num_classes),
               input_shape=self.data.image_shape,
               steps_per_epoch=self.epoch_steps or pipeline.steps_per_epoch(
                   epoch_examples, config.train.batch_size))
    self._eval_step = jax.jit(self._eval_step_impl,
                              in_shardings=(self.replicated, self.batch_sharding,
                                            self.batch_sharding),
                              out_shardings=(self.replicated, self.replicated))
    self.pseudo_info = None
    if self.semi_method == 'self_training':
      self._add_pseudo_labels()
    self.class_weights = losses.parse_class_weights(
        config.loss.class_weights, self.data.splits['train'][1], self.data.num_classes,
        self.task)

  def _add_pseudo_labels(self) -> None:
    """Self-training: the teacher's confident pseudo-labels join the labelled examples."""
    images, labels = self.data.splits['train']
    index, pseudo, self.pseudo_info = semi.pseudo_labels(self.config.semi, self, self.unlabeled,
                                                         labels)
    splits = dict(self.data.splits)
    splits['train'] = (np.concatenate([images, self.unlabeled[index]]),
                       np.concatenate([labels, pseudo]))
    self.data = dataclasses.replace(self.data, splits=splits)
    print(f"Self-training: {len(index)} of {len(self.unlabeled)} unlabelled images "
          f"pseudo-labelled by {self.pseudo_info['teacher']} (per class "
          f"{self.pseudo_info['class_counts']})")
    warning = semi.pseudo_label_warning(self.pseudo_info)
    if warning:
      print(f'warning: self-training: {warning}')

  @property
  def available_splits(self):
    return tuple(self.data.splits)

  def describe(self) -> str:
    text = self.data.summary()
    if self.unlabeled is not None:
      text += (f'; labelled {len(self.few.labeled_index)} of '
               f'{len(self.few.labeled_index) + len(self.unlabeled)} training images '
               f'(semi.method={self.semi_method})')
    return text

  def headline_metrics(self, metrics: Dict[str, Any]) -> list:
    return [k for k in HEADLINE_METRICS if k in metrics]

  def run_files(self) -> Dict[str, Dict]:
    """``data_fingerprint.json``: what the data is (name, shapes, counts, hashes)."""
    fingerprint = self.data.fingerprint()
    if self.few is not None:
      fingerprint['few_labels'] = self.few.fingerprint()
    if self.pseudo_info is not None:
      fingerprint['pseudo_labels'] = self.pseudo_info
    return {'data_fingerprint.json': fingerprint}

  def save_predictions(self, workdir: str, split: str, predictions) -> None:
    save_predictions(workdir, split, predictions, self.data.class_names)

  def preprocess(self, images: np.ndarray) -> np.ndarray:
    """Raw images ``[B, *spatial, C]`` (0..pixel_max) -> what the model sees."""
    cfg = self.config.data
    return ((np.asarray(images, np.float32) / self.data.pixel_max - cfg.mean)
            / cfg.std).astype(np.float32)

  # ----- loss and steps ----------------------------------------------------------------
  def _per_example_loss(self, logits, labels):
    return losses.classification_loss(
        self.task, logits, labels, name=self.config.loss.name,
        class_weights=self.class_weights, focal_gamma=self.config.loss.focal_gamma,
        label_smoothing=self.config.loss.label_smoothing)

  def loss(self, outputs, labels):
    """The supervised loss of a labelled batch (``loss.name``, class weights)."""
    per_example, weights = self._per_example_loss(outputs, labels)
    return losses.weighted_mean(per_example, weights)

  def init_loss_state(self):
    if self.semi_method == 'fixmatch' and self.config.semi.threshold_mode == 'self_adaptive':
      return semi.adaptive_threshold_state(self.num_outputs)
    return {}

  def _class_prior(self) -> Optional[np.ndarray]:
    """The labelled class frequencies ``[K]`` that ``semi.distribution_alignment`` aligns
    the unlabelled predictions to (None when it is off)."""
    if not self.config.semi.distribution_alignment:
      return None
    counts = np.bincount(np.asarray(self.data.splits['train'][1]).reshape(-1),
                         minlength=self.data.num_classes).astype(np.float32)
    return counts / counts.sum()

  def train_inputs(self, state: TrainState, images, labels, key):
    """MixMatch: the batch ``[labelled; view 1; view 2]`` -> the mixed rows ``[labelled;
    unlabelled (both views)]`` and their soft targets (the unlabelled ones guessed by this
    step's model on both views, :func:`semi.guess_labels`); other methods: the batch."""
    if self.semi_method != 'mixmatch':
      return images, labels
    cfg, processes = self.config.semi, jax.process_count()
    labeled, view1, view2 = semi.split_rows(images, labels.shape[0], 3, processes)
    variables = self.apply_variables(state.params, state.batch_stats)
    probabilities = [jax.nn.softmax(self.model.apply(variables, v, train=False), axis=-1)
                     for v in (view1, view2)]
    guess = semi.guess_labels(probabilities, cfg.sharpen_temperature, self._class_prior())
    one_hot = jax.nn.one_hot(labels, self.num_outputs, dtype=jnp.float32)
    # Rows in the per-process layout [labelled; view 1; view 2], mixed across the whole
    # batch; the loss splits them as [labelled; unlabelled].
    rows = semi.join_rows([labeled, view1, view2], processes)
    targets = semi.join_rows([one_hot, guess, guess], processes)
    mixed, mixed_targets = semi.mixup(key, rows, targets, cfg.mixup_alpha)
    return mixed, {'targets': mixed_targets, 'num_labeled': labels.shape[0],
                   'weight': cfg.weight * semi.ramp_up(state.step, self.total_steps,
                                                       cfg.ramp_up_fraction)}

  def loss_with_state(self, outputs, labels, loss_state):
    """FixMatch: ``CE(labelled) + semi.weight * consistency(weak -> strong)``, the threshold
    fixed or self-adaptive (updated in ``loss_state``); MixMatch: :func:`semi.mixmatch_loss`
    of the mixed rows; otherwise :meth:`loss`."""
    if self.semi_method == 'mixmatch':
      processes = jax.process_count()
      logits = semi.split_rows(outputs, labels['num_labeled'], 2, processes)
      targets = semi.split_rows(labels['targets'], labels['num_labeled'], 2, processes)
      return semi.mixmatch_loss(logits[0], targets[0], logits[1], targets[1],
                                labels['weight']), loss_state
    if self.semi_method != 'fixmatch':
      return self.loss(outputs, labels), loss_state
    cfg = self.config.semi
    labeled, weak, strong = semi.split_outputs(outputs, labels.shape[0], jax.process_count())
    probabilities = semi.pseudo_label_probabilities(self.task, weak, self._class_prior())
    threshold = cfg.threshold
    if cfg.threshold_mode == 'self_adaptive':
      loss_state, threshold = semi.adaptive_thresholds(loss_state, probabilities,
                                                       cfg.threshold_momentum)
    unlabeled_loss, _ = semi.masked_consistency(
        probabilities, strong, threshold,
        lambda logits, pseudo: self._per_example_loss(logits, pseudo)[0])
    return self.loss(labeled, labels) + cfg.weight * unlabeled_loss, loss_state

  def _eval_step_impl(self, state: TrainState, images, labels):
    logits = self.model.apply(self.variables(state), images, train=False)
    per_example, weights = self._per_example_loss(logits, labels)
    return tasks.scores_from_logits(self.task, logits), per_example * weights

  # ----- data --------------------------------------------------------------------------
  def train_iterator(self, start_step: int):
    images, labels = self.data.splits['train']
    cfg = self.config.data
    batches = pipeline.train_batches(
        images, labels, global_batch=self.global_batch, seed=self.config.seed,
        start_step=start_step, num_steps=self.total_steps, pixel_max=self.data.pixel_max,
        mean=cfg.mean, std=cfg.std, augment=cfg.augment,
        process_index=jax.process_index(), process_count=jax.process_count(),
        class_balanced=cfg.class_balanced, epoch_steps=self.epoch_steps)
    if self.semi_method not in ('fixmatch', 'mixmatch'):
      return batches
    # FixMatch: a weak and a strong view; MixMatch: two weak ones (independent draws).
    strong, strong_key = ((self.config.semi.strong_augment, 'semi.strong_augment')
                          if self.semi_method == 'fixmatch' else (cfg.augment, 'data.augment'))
    views = pipeline.unlabeled_batches(
        self.unlabeled, global_batch=self.global_batch * self.config.semi.unlabeled_ratio,
        seed=self.config.seed, start_step=start_step, num_steps=self.total_steps,
        pixel_max=self.data.pixel_max, mean=cfg.mean, std=cfg.std, weak=cfg.augment,
        strong=strong, process_index=jax.process_index(),
        process_count=jax.process_count(), strong_key=strong_key)
    # This process's rows: [labelled; first views; second views] (see semi.split_rows).
    return ((np.concatenate([x, weak, strong]), y)
            for (x, y), (weak, strong) in zip(batches, views))

  def predict_images(self, state: TrainState, images: np.ndarray) -> np.ndarray:
    """Class scores ``[N, K]`` of raw images ``[N, *spatial, C]`` (e.g. unlabelled ones)."""
    return self._predict(state, images, np.zeros(len(images), np.int32))['scores']

  def predict(self, state: TrainState, split: str) -> Dict[str, np.ndarray]:
    """Scores of every example of ``split``, in dataset order, plus the per-example loss."""
    return self._predict(state, *self.data.splits[split])

  def _predict(self, state: TrainState, images: np.ndarray, labels: np.ndarray
               ) -> Dict[str, np.ndarray]:
    scores, per_example_loss = outputs_in_batches(
        self, lambda x, y: self._eval_step(state, x, y), images, labels, self.data.pixel_max)
    return {'index': np.arange(len(labels)), 'labels': labels, 'scores': scores,
            'loss': per_example_loss}

  def evaluate(self, state: TrainState, split: str) -> tuple[Dict[str, Any], Dict]:
    predictions = self.predict(state, split)
    result = metrics_lib.classification_metrics(self.task, predictions['labels'],
                                                predictions['scores'])
    result['loss'] = float(np.mean(predictions['loss']))
    return result, predictions

  def ensemble(self, workdirs, split: str) -> tuple[Dict[str, Any], Dict]:
    """Metrics and predictions of the mean of several runs' probabilities on ``split``
    (their ``predictions_<split>.npz``: the seed ensemble of :mod:`medjax.seeds`)."""
    return ensemble_predictions(workdirs, split, self.task)
