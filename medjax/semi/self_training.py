"""Self-training: a trained teacher's confident pseudo-labels join the labelled data.

The run in ``semi.teacher`` (trained on the labelled part, e.g. the labelled-only baseline;
a seed group ``DIR/seed_<K>`` gives seed ``K`` its own teacher) labels the unlabelled data once,
before training, and this run (the student) trains on both. Iterate by making the student the
next teacher.

* Per-image experiments: the unlabelled images it is sure of (top probability >=
  ``semi.threshold``; with ``semi.class_balance``, per class as many as keep the labelled class
  frequencies, :func:`medjax.data.few_labels.select_pseudo_labels`) join the labelled images.
* Label-map experiments: every unlabelled case gets the teacher's arg-max label map (its own
  sliding window and mirroring); voxels below ``semi.threshold`` get the ignore label, which
  no loss counts (``semi.threshold=0`` labels every voxel); the sampler draws labelled cases
  ``semi.labeled_share`` of the time (:func:`with_labeled_share`).

    medjax train --config C --workdir runs/teacher --config.data.labeled_fraction=0.1
    medjax train --config C --workdir runs/student --config.data.labeled_fraction=0.1 \\
        --config.semi.method=self_training --config.semi.teacher=runs/teacher
"""

from __future__ import annotations

import os
from typing import Any, Dict

import ml_collections
import numpy as np

from medjax import config as config_lib, output
from medjax.data import few_labels, prepare
from medjax.data.sampling import IGNORE_LABEL
from medjax.semi import base


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  s = config_lib.section(c, 'semi')
  s.teacher = ''                 # self_training: the teacher's workdir (or seed group)
  s.class_balance = True         # self_training: pseudo-labels follow the labelled prior
  s.labeled_share = 0.5          # label maps: the labelled share of the cases drawn


class SelfTraining(base.Method):
  name = 'self_training'

  def __init__(self, exp: Any):
    super().__init__(exp)
    self.info: Dict[str, Any] = {}

  def check(self) -> None:
    if not self.cfg.teacher:
      raise ValueError('semi.method=self_training needs semi.teacher: the workdir of a run '
                       'trained on the labelled part')
    if self.exp.label_maps:
      base.check_range('labeled_share', self.cfg.labeled_share, 0.0, 1.0, closed_high=False)
      if self.cfg.threshold > 0 and self.exp.num_classes >= IGNORE_LABEL:
        raise ValueError(f'semi.threshold={self.cfg.threshold} marks unsure voxels with label '
                         f'{IGNORE_LABEL}, which is one of the {self.exp.num_classes} classes '
                         'here: set semi.threshold=0')

  def needed_for_inference(self) -> bool:
    # Balanced class weights follow the pseudo-labels, and weight the evaluation loss.
    return not self.exp.label_maps and self.exp.config.loss.class_weights == 'balanced'

  def prepare(self) -> None:
    teacher, state, step, workdir = self.exp.load_run(self.cfg.teacher, 'semi.teacher')
    difference = self.exp.teacher_difference(teacher)
    if difference:
      raise ValueError(f'semi.teacher {workdir}: {difference}')
    self.info = {'teacher': os.path.abspath(workdir), 'teacher_step': step}
    if self.exp.label_maps:
      self._label_cases(teacher, state)
    else:
      self._label_images(teacher, state)

  def _label_images(self, teacher, state) -> None:
    exp, cfg = self.exp, self.cfg
    labeled_labels = exp.data.splits['train'][1]
    scores = teacher.predict_images(state, exp.unlabeled)
    prior = None
    if cfg.class_balance:
      prior = np.bincount(np.asarray(labeled_labels).reshape(-1), minlength=scores.shape[1])
    index, labels = few_labels.select_pseudo_labels(scores, cfg.threshold, prior)
    self.info.update({
        'threshold': cfg.threshold, 'class_balance': bool(cfg.class_balance),
        'pseudo_labeled': int(len(index)), 'unlabeled': int(len(exp.unlabeled)),
        'class_counts': np.bincount(labels, minlength=scores.shape[1]).tolist(),
        'confident_per_class': confident_per_class(scores, cfg.threshold).tolist()})
    exp.add_training_examples(exp.unlabeled[index],
                              labels.astype(np.asarray(labeled_labels).dtype))
    print(f"Self-training: {len(index)} of {len(exp.unlabeled)} unlabelled images "
          f"pseudo-labelled by {self.info['teacher']} (per class "
          f"{self.info['class_counts']})")
    warning = pseudo_label_warning(self.info)
    if warning:
      output.warn(f'self-training: {warning}')

  def _label_cases(self, teacher, state) -> None:
    """The unlabelled cases with the teacher's label maps ``[*spatial]`` and their class
    locations (for the sampler's foreground oversampling) join the training cases."""
    exp = self.exp
    threshold = float(self.cfg.threshold)
    exp.ignore_label = IGNORE_LABEL if threshold > 0 else None
    rng = np.random.default_rng(exp.config.seed)
    cases, confidence, kept = {}, {}, {}
    for case in exp.data.splits['unlabeled']:
      image, stored_label = exp.cases[case][:2]
      probabilities = teacher.predict_prepared(state, image)
      top = np.max(probabilities, axis=-1)
      label = np.asarray(base.pseudo_label_map(probabilities, threshold, IGNORE_LABEL),
                         stored_label.dtype)
      cases[case] = (image, label, prepare.class_locations(label, exp.num_classes, rng))
      confidence[case] = round(float(np.mean(top)), 6)
      kept[case] = round(float(np.mean(top >= threshold)), 6)
    self.info.update({'pseudo_labeled_cases': len(cases), 'voxel_threshold': threshold,
                      'mean_top_probability': confidence, 'voxels_kept': kept})
    print(f'Self-training: {len(cases)} unlabelled cases pseudo-labelled by '
          f"{self.info['teacher']}")
    exp.training_cases = with_labeled_share(exp.training_cases, cases,
                                            self.cfg.labeled_share)

  def fingerprint(self) -> Dict[str, Any]:
    return {'pseudo_labels': self.info} if self.info else {}


base.register_method('self_training', SelfTraining)


def with_labeled_share(labeled: Dict[str, Any], pseudo: Dict[str, Any], share: float
                       ) -> Dict[str, Any]:
  """The sampler's cases for label-map self-training: the pseudo-labelled cases and the
  labelled ones, these repeated (as ``'<id>~<k>'``, the same arrays) so that about
  ``share`` of the sampled cases are labelled: with 10 labelled and 150 pseudo-labelled
  cases and ``share`` 0.5, each labelled case 15 times. ``share`` 0: no repetition."""
  if not 0.0 <= share < 1.0:
    raise ValueError(f'semi.labeled_share must be in [0, 1), got {share}')
  copies = max(1, round(share / (1.0 - share) * len(pseudo) / max(len(labeled), 1)))
  cases = dict(pseudo)
  for case, value in labeled.items():
    cases.update({case if k == 0 else f'{case}~{k}': value for k in range(copies)})
  return cases


def confident_per_class(scores: np.ndarray, threshold: float) -> np.ndarray:
  """``[K]``: how many rows of ``scores`` ``[U, K]`` predict each class with at least
  ``threshold``."""
  scores = np.asarray(scores)
  confident = scores.max(axis=1) >= threshold
  return np.bincount(scores.argmax(axis=1)[confident], minlength=scores.shape[1])


def pseudo_label_warning(info: Dict[str, Any]) -> str:
  """Why self-training got no pseudo-labels ('' when it got some)."""
  if info['pseudo_labeled']:
    return ''
  counts = info['confident_per_class']
  if info['class_balance'] and any(counts):
    empty = [c for c, n in enumerate(counts) if n == 0]
    return (f"the teacher is confident (>= {info['threshold']}) of no unlabelled image of "
            f"class(es) {empty}, so class-balanced selection keeps none (confident per class: "
            f"{counts}); the student trains on the labelled images only. Lower "
            "semi.threshold or set semi.class_balance=False")
  return (f"the teacher is confident (>= {info['threshold']}) of no unlabelled image; the "
          "student trains on the labelled images only. Lower semi.threshold")
