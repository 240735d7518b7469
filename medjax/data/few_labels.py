"""Training with few labels: a seeded, class-stratified labelled subset of the training split,
the rest kept as images only, and the choice of confident pseudo-labels for self-training.

``data.labeled_fraction`` (or ``data.labeled_count``) keeps the labels of a subset of the
training split; the other training images are kept **without their labels**
(:class:`FewLabels` holds images only), so no method can read them. Val and test are
untouched.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Dict, Optional, Tuple

import ml_collections
import numpy as np

from medjax import config as config_lib
from medjax.data.dataset import ClassificationData


@config_lib.declare
def _defaults(c) -> None:
  # Few labels: keep the labels of a seeded, class-stratified subset of the training split
  # (data.labeled_count examples if > 0, else that fraction); the rest are images only.
  d = config_lib.section(c, 'data')
  d.labeled_fraction = 1.0
  d.labeled_count = 0
  d.labeled_seed = -1            # -1: the run's seed (each seed of a group its subset)


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
  """Indices of ``size`` examples (sorted) with each class's share of ``labels`` ``[N]``.

  Each class gets ``size * count_c / N`` rounded by largest remainder (so the sizes add up to
  ``size``), and at least one example while ``size`` allows it; within a class the examples
  are the first of a permutation drawn from ``seed``.
  """
  labels = np.asarray(labels)
  n = len(labels)
  if not 0 < size <= n:
    raise ValueError(f'a labelled subset of {size} from {n} training examples is impossible')
  classes, counts = np.unique(labels, return_counts=True)
  if size < len(classes):
    raise ValueError(f'{size} labelled example(s) cannot cover the {len(classes)} classes of '
                     'the training split; label more examples')
  exact = size * counts / n
  take = np.maximum(np.floor(exact).astype(int), 1)
  # Largest remainder until the total is right (or take back from the largest classes).
  order = np.argsort(-(exact - np.floor(exact)), kind='stable')
  i = 0
  while take.sum() < size:
    c = order[i % len(order)]
    if take[c] < counts[c]:
      take[c] += 1
    i += 1
  while take.sum() > size:
    take[np.argmax(take)] -= 1
  rng = np.random.default_rng([seed, 7])
  chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
  return np.sort(np.concatenate(chosen))


def random_subset(n: int, size: int, seed: int) -> np.ndarray:
  """``size`` of ``n`` indices (sorted), seeded; for multi-label data (no single class)."""
  if not 0 < size <= n:
    raise ValueError(f'a labelled subset of {size} from {n} training examples is impossible')
  return np.sort(np.random.default_rng([seed, 7]).permutation(n)[:size])


@dataclasses.dataclass
class FewLabels:
  """The labelled data and the unlabelled training images.

  Attributes:
    data: the dataset whose ``'train'`` split is the labelled subset only.
    unlabeled: images ``[U, *spatial, C]`` of the rest of the training split (no labels).
    labeled_index: positions of the labelled examples in the original training split.
  """
  data: ClassificationData
  unlabeled: np.ndarray
  labeled_index: np.ndarray

  def fingerprint(self) -> Dict:
    return {'labeled': int(len(self.labeled_index)), 'unlabeled': int(len(self.unlabeled)),
            'labeled_index_sha256': hashlib.sha256(
                self.labeled_index.astype(np.int64).tobytes()).hexdigest()}


def subset_size(cfg: ml_collections.ConfigDict, n: int) -> int:
  """Examples to keep labelled: ``data.labeled_count`` if set, else
  ``round(data.labeled_fraction * n)``; ``n`` means all."""
  if cfg.labeled_count < 0:
    raise ValueError(f'data.labeled_count must be >= 0, got {cfg.labeled_count}')
  if not 0.0 < cfg.labeled_fraction <= 1.0:
    raise ValueError(f'data.labeled_fraction must be in (0, 1], got {cfg.labeled_fraction}')
  if cfg.labeled_count:
    if cfg.labeled_count > n:
      raise ValueError(f'data.labeled_count={cfg.labeled_count} exceeds the {n} training '
                       'examples')
    return int(cfg.labeled_count)
  return max(1, int(round(cfg.labeled_fraction * n)))


def split_labeled(data: ClassificationData, cfg: ml_collections.ConfigDict,
                  seed: int) -> Optional[FewLabels]:
  """The labelled subset of ``data``'s training split per ``cfg`` (``config.data``), or None
  when every label is used. ``seed``: ``data.labeled_seed``, or the run's seed if that is -1.
  """
  images, labels = data.splits['train']
  size = subset_size(cfg, len(labels))
  if size == len(labels):
    return None
  subset_seed = seed if cfg.labeled_seed < 0 else int(cfg.labeled_seed)
  if data.task == 'multilabel':
    index = random_subset(len(labels), size, subset_seed)
  else:
    index = stratified_subset(labels, size, subset_seed)
  rest = np.setdiff1d(np.arange(len(labels)), index)
  splits = dict(data.splits)
  splits['train'] = (images[index], labels[index])
  return FewLabels(data=dataclasses.replace(data, splits=splits), unlabeled=images[rest],
                   labeled_index=index)


def split_case_ids(case_ids, cfg: ml_collections.ConfigDict, seed: int
                   ) -> Optional[Tuple[list, list]]:
  """(labelled, unlabelled) training case ids of a segmentation run per ``cfg``
  (``config.data``: ``labeled_count`` cases, else ``labeled_fraction`` of them), or None when
  every case is labelled. A seeded choice (cases have no single class to stratify by)."""
  case_ids = sorted(case_ids)
  size = subset_size(cfg, len(case_ids))
  if size == len(case_ids):
    return None
  index = random_subset(len(case_ids), size, seed if cfg.labeled_seed < 0
                        else int(cfg.labeled_seed))
  labeled = [case_ids[i] for i in index]
  chosen = set(labeled)
  return labeled, [c for c in case_ids if c not in chosen]


def select_pseudo_labels(scores: np.ndarray, threshold: float,
                         class_prior: Optional[np.ndarray] = None
                         ) -> Tuple[np.ndarray, np.ndarray]:
  """Confident pseudo-labels from a teacher's class probabilities ``scores`` ``[U, K]``.

  Keeps examples whose top probability is at least ``threshold``. With ``class_prior``
  ``[K]`` (the labelled classes' frequencies), keeps per predicted class only its most
  confident examples, as many as make the kept classes follow the prior: the largest total
  ``M`` with ``round(M * prior_c)`` confident examples available in every class (so a teacher
  that is sure only of the majority class cannot flood the student with it).

  Returns:
    (indices into ``scores``, sorted; their pseudo-labels ``[M]`` int).
  """
  scores = np.asarray(scores, np.float64)
  confidence, predicted = scores.max(axis=1), scores.argmax(axis=1)
  confident = confidence >= threshold
  if class_prior is None:
    index = np.flatnonzero(confident)
    return index, predicted[index]
  prior = np.asarray(class_prior, np.float64)
  prior = prior / prior.sum()
  available = np.array([np.sum(confident & (predicted == c)) for c in range(len(prior))])
  with np.errstate(divide='ignore'):
    ratio = np.where(prior > 0, available / prior, np.inf)
  total = int(np.floor(ratio.min())) if np.isfinite(ratio.min()) else 0
  keep = []
  for c in range(len(prior)):
    k = min(int(round(total * prior[c])), available[c])
    members = np.flatnonzero(confident & (predicted == c))
    keep.append(members[np.argsort(-confidence[members], kind='stable')[:k]])
  index = np.sort(np.concatenate(keep)).astype(np.int64)
  return index, predicted[index]
