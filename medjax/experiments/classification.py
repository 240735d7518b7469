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
import ml_collections
import numpy as np

from medjax import config as config_lib, explain, files as files_lib, losses, metrics as metrics_lib
from medjax import plots, semi, tasks, workdir as workdir_lib
from medjax.data import ClassificationData, augment, few_labels, layouts, load_data, pipeline
from medjax.experiments import augment_on
from medjax.experiments.augment_on import DeviceAugmented, classification_augment
from medjax.experiments.base import Experiment, TrainState


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  # loss.name: 'ce' | 'focal' (multi-label always uses sigmoid BCE).
  loss = config_lib.section(c, 'loss')
  loss.class_weights = 'none'       # 'none' | 'balanced' | comma-separated floats
  loss.focal_gamma = 2.0
  loss.label_smoothing = 0.0

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
                     class_names, task: str) -> None:
  """``predictions_<split>.npz``: index, labels, scores ``[N, K]``, the class names and the
  classification task the scores follow."""
  if not workdir_lib.is_main():
    return
  np.savez(os.path.join(workdir, f'predictions_{split}.npz'), index=predictions['index'],
           labels=predictions['labels'], scores=predictions['scores'],
           class_names=np.array(class_names), task=np.array(task))


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


class ClassificationExperiment(DeviceAugmented, Experiment):
  """A classification config bound to its data, model and compiled steps."""

  def __init__(self, config: ml_collections.ConfigDict,
               data: Optional[ClassificationData] = None, training: bool = True):
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
    self.method = semi.make_method(self, self.unlabeled is not None)
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
    if training or self.method.needed_for_inference():
      self.method.prepare()
    # data.augment_on=device: the step augments (medjax/experiments/augment_on.py).
    self.device_augment = classification_augment(self, len(self.data.image_shape) - 1)
    self.class_weights = losses.parse_class_weights(
        config.loss.class_weights, self.data.splits['train'][1], self.data.num_classes,
        self.task)

  # ----- what a semi-supervised method uses (medjax/semi/base.py) ----------------------
  label_maps = False  # one target per image

  @property
  def single_label(self) -> bool:
    return self.task != 'multilabel'

  @property
  def softmax_classes(self) -> bool:
    return self.task in ('binary', 'multiclass')

  def add_training_examples(self, images: np.ndarray, labels: np.ndarray) -> None:
    """More labelled training examples (self-training's pseudo-labelled images)."""
    train_images, train_labels = self.data.splits['train']
    splits = dict(self.data.splits)
    splits['train'] = (np.concatenate([train_images, images]),
                       np.concatenate([train_labels, labels]))
    self.data = dataclasses.replace(self.data, splits=splits)

  def teacher_difference(self, teacher: Experiment) -> str:
    """Why another run cannot teach this one ('' when it can)."""
    if (teacher.task, teacher.num_outputs, teacher.input_shape) == (
        self.task, self.num_outputs, self.input_shape):
      return ''
    return (f'a {teacher.task} model of {teacher.num_outputs} outputs on '
            f'{teacher.input_shape} images; this run is {self.task}, {self.num_outputs} '
            f'outputs, {self.input_shape}')

  def unlabeled_views(self, start_step: int, second: ml_collections.ConfigDict,
                      second_key: str):
    """Each step's ``(weak, second)`` views of ``semi.unlabeled_ratio`` x batch unlabelled
    images (this process's rows): ``data.augment`` and ``second`` (independent draws)."""
    cfg = self.config.data
    return pipeline.unlabeled_batches(
        self.unlabeled, global_batch=self.global_batch * self.config.semi.unlabeled_ratio,
        seed=self.config.seed, start_step=start_step, num_steps=self.total_steps,
        pixel_max=self.data.pixel_max, mean=cfg.mean, std=cfg.std, weak=cfg.augment,
        strong=second, process_index=jax.process_index(),
        process_count=jax.process_count(), strong_key=second_key)

  def probabilities(self, logits):
    return tasks.scores_from_logits(self.task, logits)

  def class_prior(self) -> Optional[np.ndarray]:
    """The labelled class frequencies ``[K]`` that ``semi.distribution_alignment`` aligns
    the unlabelled predictions to (None when it is off)."""
    if not self.config.semi.distribution_alignment:
      return None
    counts = np.bincount(np.asarray(self.data.splits['train'][1]).reshape(-1),
                         minlength=self.data.num_classes).astype(np.float32)
    return counts / counts.sum()

  @property
  def available_splits(self):
    return tuple(self.data.splits)

  def describe(self) -> str:
    text = self.data.summary()
    if self.unlabeled is not None:
      text += (f'; labelled {len(self.few.labeled_index)} of '
               f'{len(self.few.labeled_index) + len(self.unlabeled)} training images '
               f'(semi.method={self.method.name})')
    return text

  def headline_metrics(self, metrics: Dict[str, Any]) -> list:
    return [k for k in HEADLINE_METRICS if k in metrics]

  def run_files(self) -> Dict[str, Dict]:
    """``data_fingerprint.json``: what the data is (name, shapes, counts, hashes)."""
    fingerprint = self.data.fingerprint()
    if self.few is not None:
      fingerprint['few_labels'] = self.few.fingerprint()
    fingerprint.update(self.method.fingerprint())
    return {'data_fingerprint.json': fingerprint}

  def save_predictions(self, workdir: str, split: str, predictions) -> None:
    save_predictions(workdir, split, predictions, self.data.class_names, self.task)

  def preprocess(self, images: np.ndarray) -> np.ndarray:
    """Raw images ``[B, *spatial, C]`` (0..pixel_max) -> what the model sees."""
    return augment.normalise(images, self.data.pixel_max, self.config.data.mean,
                             self.config.data.std)

  # ----- loss and steps ----------------------------------------------------------------
  def per_example_loss(self, logits, labels):
    """(per-example loss ``[B]``, weights ``[B]``) of logits against labels."""
    return losses.classification_loss(
        self.task, logits, labels, name=self.config.loss.name,
        class_weights=self.class_weights, focal_gamma=self.config.loss.focal_gamma,
        label_smoothing=self.config.loss.label_smoothing)

  def loss(self, outputs, labels):
    """The supervised loss of a labelled batch (``loss.name``, class weights)."""
    per_example, weights = self.per_example_loss(outputs, labels)
    return losses.weighted_mean(per_example, weights)

  def _eval_step_impl(self, state: TrainState, images, labels):
    logits = self.model.apply(self.variables(state), images, train=False)
    per_example, weights = self.per_example_loss(logits, labels)
    return tasks.scores_from_logits(self.task, logits), per_example * weights

  # ----- data --------------------------------------------------------------------------
  def train_iterator(self, start_step: int):
    images, labels = self.data.splits['train']
    cfg = self.config.data
    batches = pipeline.train_batches(
        images, labels, global_batch=self.global_batch, seed=self.config.seed,
        start_step=start_step, num_steps=self.total_steps, pixel_max=self.data.pixel_max,
        mean=cfg.mean, std=cfg.std,
        augment=None if augment_on.on_device(self.config) else cfg.augment,
        process_index=jax.process_index(), process_count=jax.process_count(),
        class_balanced=cfg.class_balanced, epoch_steps=self.epoch_steps)
    return self.method.batches(batches, start_step)

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

  # ----- files, figures ---------------------------------------------------------------
  def input_suffixes(self):
    return layouts.NIFTI_SUFFIXES + layouts.IMAGE_SUFFIXES + ('.npy',)

  def explain_files(self, state: TrainState, files, output_dir: str, layer: str,
                    target_class=None, methods=explain.METHODS, ig_steps: int = 32) -> list:
    return files_lib.explain_classifier_files(
        self, self.variables(state), files, output_dir, layer,
        files_lib.class_index(target_class, self.class_names), methods, ig_steps)

  @classmethod
  def run_figures(cls, workdir: str, config: Dict, results: Dict, out_dir: str,
                  splits) -> Dict[str, str]:
    """Per split: ROC curves, confusion matrix and reliability diagram, from
    ``predictions_<split>.npz``."""
    # The scores follow the dataset's task ('auto' resolved), or the kNN scores' task.
    task = results.get('scores_task') or results.get('task') or config['task']
    written = {}
    for split in splits:
      path = os.path.join(workdir, f'predictions_{split}.npz')
      if not os.path.exists(path):
        continue
      with np.load(path) as f:
        labels, scores = f['labels'], f['scores']
        names = [str(n) for n in f['class_names']]
        task = str(f['task']) if 'task' in f else task
      if task == 'auto':  # files written before they named their task
        task = 'multilabel' if labels.ndim == 2 and labels.shape[1] > 1 else (
            'binary' if scores.shape[1] == 2 else 'multiclass')
      written.update(plots.classifier_figures(labels, scores, names, task, split, out_dir))
    return written

  def ensemble(self, workdirs, split: str) -> tuple[Dict[str, Any], Dict]:
    """Metrics and predictions of the mean of several runs' probabilities on ``split``
    (their ``predictions_<split>.npz``: the seed ensemble of :mod:`medjax.seeds`)."""
    return ensemble_predictions(workdirs, split, self.task)
