"""Self-supervised pretraining (SimCLR, Chen et al. 2020) on a classification dataset's training
images, labels unused, for fine-tuning with few labels (``train.init_from``).

* data: the classification data of :func:`medjax.data.load_data`; every training image,
  labelled or not, is seen twice per step under ``contrastive.augment`` (two independent
  draws, :func:`medjax.data.pipeline.unlabeled_batches`);
* model: the configured classifier with ``contrastive.projection_dim`` outputs (its head is
  the projection; fine-tuning starts a new head: ``train.init_from_skip``);
* loss: :func:`medjax.losses.nt_xent` of the two views' outputs;
* evaluation: a k-nearest-neighbour classifier (cosine similarity of the outputs, the
  ``contrastive.knn_k`` nearest labelled training images vote) scores val and test with the
  usual classification metrics, so the checkpoint is selected by kNN AUC. Only the labelled
  training images (``data.labeled_fraction``) vote: with few labels, only those are known.

  medjax train --config configs/few_labels.py:breastmnist --config.task=contrastive \\
      --config.data.labeled_fraction=0.1 --workdir runs/simclr
  medjax train --config configs/few_labels.py:breastmnist --config.data.labeled_fraction=0.1 \\
      --config.train.init_from=runs/simclr --config.train.init_from_skip="('Dense_1/',)" \\
      --workdir runs/finetuned
"""

from __future__ import annotations

from typing import Any, Dict

import jax
import ml_collections
import numpy as np

from medjax import config as config_lib, losses, metrics as metrics_lib, semi
from medjax.data import augment, few_labels, load_data, pipeline
from medjax.experiments import augment_on
from medjax.experiments.base import Experiment, TrainState


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  # task='contrastive': views under contrastive.augment, selection by kNN AUC on val.
  s = config_lib.section(c, 'contrastive')
  s.temperature = 0.2
  s.projection_dim = 64    # the model's outputs (its head is the projection)
  s.knn_k = 10             # labelled neighbours voting in the evaluation
  s.augment = augment.augment_section(
      flip_lr=True, rotation_deg=20.0, scale_min=0.8, scale_max=1.2, brightness=0.3,
      contrast=0.3, cutout=0.25, translate=0.1, blur_sigma=1.0, noise_std=0.1, op_prob=0.8)
from medjax.experiments.classification import (HEADLINE_METRICS, ClassificationExperiment,
                                               ensemble_predictions,
                                               outputs_in_batches, save_predictions)


def knn_class_scores(reference: np.ndarray, reference_labels: np.ndarray, queries: np.ndarray,
                     k: int, num_classes: int) -> np.ndarray:
  """Each query's share of votes per class among its ``k`` most cosine-similar reference
  embeddings: ``[Q, K]``. ``reference`` ``[N, D]`` with int ``reference_labels`` ``[N]``,
  ``queries`` ``[Q, D]``; ``k`` is capped at ``N``."""
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
  similarity = unit(np.asarray(queries, np.float64)) @ unit(
      np.asarray(reference, np.float64)).T
  k = min(k, len(reference))
  nearest = np.argsort(-similarity, axis=1, kind='stable')[:, :k]
  votes = np.asarray(reference_labels)[nearest]
  return np.stack([(votes == c).mean(axis=1) for c in range(num_classes)], axis=1)


class ContrastiveExperiment(Experiment):
  """SimCLR pretraining of a classifier's body on its dataset's training images."""

  task = 'contrastive'
  eval_splits = ('val', 'test')
  available_splits = ('val', 'test')

  def __init__(self, config: ml_collections.ConfigDict, training: bool = True):
    super().__init__(config)
    data = load_data(config)
    if data.task == 'multilabel':
      raise ValueError('task contrastive: the kNN evaluation needs one class per image; '
                       f'{data.name} is multi-label')
    cfg = config.contrastive
    if cfg.temperature <= 0 or cfg.projection_dim < 1 or cfg.knn_k < 1:
      raise ValueError('contrastive.temperature must be > 0 and contrastive.projection_dim, '
                       f'knn_k >= 1; got {cfg.temperature}, {cfg.projection_dim}, {cfg.knn_k}')
    if config.semi.method != 'none':
      raise ValueError(f"task contrastive trains without labels; semi.method must be 'none', "
                       f"got '{config.semi.method}'")
    augment_on.refuse_device(config, 'task contrastive builds its two views on the host')
    self.dataset_name = data.name
    self.class_names = list(data.class_names)
    self.scores_task = data.task                           # kNN class scores
    self.pixel_max = data.pixel_max
    self.images = data.splits['train'][0]                  # every training image
    self.few = few_labels.split_labeled(data, config.data, config.seed)
    self.data = self.few.data if self.few is not None else data  # its train: labelled only
    self.setup(num_outputs=cfg.projection_dim, input_shape=data.image_shape,
               steps_per_epoch=pipeline.steps_per_epoch(len(self.images),
                                                        config.train.batch_size))
    self._embed = jax.jit(lambda state, images: self.model.apply(
        self.variables(state), images, train=False),
        in_shardings=(self.replicated, self.batch_sharding), out_shardings=self.replicated)

  def describe(self) -> str:
    return (f'{self.data.summary()}; SimCLR on all {len(self.images)} training images, kNN '
            f'evaluation from {len(self.data.splits["train"][1])} labelled ones')

  def run_files(self) -> Dict[str, Dict]:
    fingerprint = self.data.fingerprint()
    if self.few is not None:
      fingerprint['few_labels'] = self.few.fingerprint()
    return {'data_fingerprint.json': fingerprint}

  def headline_metrics(self, metrics: Dict[str, Any]) -> list:
    return [k for k in HEADLINE_METRICS if k in metrics]

  def save_predictions(self, workdir: str, split: str, predictions) -> None:
    save_predictions(workdir, split, predictions, self.class_names, self.scores_task)

  run_figures = ClassificationExperiment.run_figures  # its kNN scores are class scores

  def ensemble(self, workdirs, split: str):
    return ensemble_predictions(workdirs, split, self.scores_task)

  # ----- training ------------------------------------------------------------------------
  def loss(self, outputs, labels):
    """NT-Xent of the batch's two views (rows ``[view 1; view 2]`` per process)."""
    _, first, second = semi.split_rows(outputs, 0, 3, jax.process_count())
    return losses.nt_xent(first, second, self.config.contrastive.temperature)

  def train_iterator(self, start_step: int):
    cfg = self.config.data
    views = pipeline.unlabeled_batches(
        self.images, global_batch=self.global_batch, seed=self.config.seed,
        start_step=start_step, num_steps=self.total_steps, pixel_max=self.pixel_max,
        mean=cfg.mean, std=cfg.std, weak=self.config.contrastive.augment,
        strong=self.config.contrastive.augment, process_index=jax.process_index(),
        process_count=jax.process_count())
    # The labels are unused; a row per image keeps the batch's sharding.
    return ((np.concatenate([first, second]), np.zeros(len(first), np.int32))
            for first, second in views)

  # ----- evaluation ----------------------------------------------------------------------
  def embed(self, state: TrainState, images: np.ndarray) -> np.ndarray:
    """The model's outputs ``[N, projection_dim]`` for raw images ``[N, *spatial, C]``."""
    embedded, = outputs_in_batches(self, lambda x, _: (self._embed(state, x),), images,
                                   np.zeros(len(images), np.int32), self.pixel_max)
    return embedded

  def evaluate(self, state: TrainState, split: str):
    reference_images, reference_labels = self.data.splits['train']
    images, labels = self.data.splits[split]
    scores = knn_class_scores(self.embed(state, reference_images),
                              np.asarray(reference_labels).reshape(-1),
                              self.embed(state, images), self.config.contrastive.knn_k,
                              self.data.num_classes)
    result = metrics_lib.classification_metrics(self.scores_task, labels, scores)
    predictions = {'index': np.arange(len(labels)), 'labels': labels, 'scores': scores}
    return result, predictions

