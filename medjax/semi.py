"""Semi-supervised classification: learning from the unlabelled rest of the training split.

Set ``data.labeled_fraction`` (or ``data.labeled_count``) to keep a seeded, stratified
labelled subset (:mod:`medjax.data.few_labels`), then ``semi.method``:

* ``'none'``: supervised on the labelled subset only (the baseline). An epoch is as many
  steps as one pass over the whole training split would take, so every method trains for
  the same number of steps.
* ``'self_training'``: the run in ``semi.teacher`` (trained on the labelled part, e.g. the
  baseline) scores the unlabelled images; those it is sure of (top probability >=
  ``semi.threshold``; with ``semi.class_balance``, per class as many as keep the labelled
  class frequencies) join the labelled data with their pseudo-labels, and this run (the
  student) trains on both. Iterate by making the student the next teacher. A teacher that
  is a seed group (``DIR/seed_<K>``) gives seed ``K`` of the student its own ``seed_<K>``.

    medjax train --config C --workdir runs/teacher --config.data.labeled_fraction=0.1
    medjax train --config C --workdir runs/student --config.data.labeled_fraction=0.1 \\
        --config.semi.method=self_training --config.semi.teacher=runs/teacher

* ``'fixmatch'`` (Sohn et al. 2020), in one run: each step also takes
  ``semi.unlabeled_ratio`` x batch unlabelled images, weakly (``data.augment``) and strongly
  (``semi.strong_augment``) augmented; where the prediction on the weak view is confident
  (>= ``semi.threshold``), its arg-max is the target of the strong view's cross-entropy:
  ``loss = CE(labelled) + semi.weight * mean_u(mask * CE(strong, pseudo-label))``. One
  forward pass over labelled + weak + strong images (batch statistics over all of them, as
  in the paper); the pseudo-labels are not differentiated.

The unlabelled images never carry labels into training: :class:`FewLabels` keeps images only.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medjax import tasks
from medjax.data import few_labels

METHODS = ('none', 'fixmatch', 'self_training')


def check_method(cfg: ml_collections.ConfigDict, task: str, has_unlabeled: bool) -> str:
  """``semi.method``, checked against the task and the data."""
  method = cfg.method
  if method not in METHODS:
    raise ValueError(f"unknown semi.method '{method}'; expected one of {', '.join(METHODS)}")
  if method == 'none':
    return method
  if task == 'multilabel':
    raise ValueError(f'semi.method={method} needs one class per image; multi-label data has '
                     'no single pseudo-label')
  if not has_unlabeled:
    raise ValueError(f'semi.method={method} learns from unlabelled images, and every training '
                     'image is labelled: set data.labeled_fraction < 1 (or data.labeled_count)')
  if not 0.0 < cfg.threshold <= 1.0:
    raise ValueError(f'semi.threshold must be in (0, 1], got {cfg.threshold}')
  if method == 'self_training' and not cfg.teacher:
    raise ValueError('semi.method=self_training needs semi.teacher: the workdir of a run '
                     'trained on the labelled part')
  if method == 'fixmatch' and cfg.unlabeled_ratio < 1:
    raise ValueError(f'semi.unlabeled_ratio must be >= 1, got {cfg.unlabeled_ratio}')
  return method


# ----- FixMatch -----------------------------------------------------------------------------
def split_outputs(outputs: jax.Array, num_labeled: int, process_count: int
                  ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Model outputs of a FixMatch batch -> (labelled, weak, strong) outputs.

  Each process contributes the rows ``[labelled b; weak u; strong u]`` and the global batch
  is the processes' rows one after another, so ``outputs`` ``[P * (b + 2u), K]`` splits per
  process block. ``num_labeled`` is ``P * b``.
  """
  blocks = outputs.reshape((process_count, -1) + outputs.shape[1:])
  b = num_labeled // process_count
  u = (blocks.shape[1] - b) // 2
  flat = lambda x: x.reshape((-1,) + outputs.shape[1:])  # noqa: E731
  return flat(blocks[:, :b]), flat(blocks[:, b:b + u]), flat(blocks[:, b + u:])


def consistency_loss(task: str, weak_logits: jax.Array, strong_logits: jax.Array,
                     threshold: float,
                     per_example_loss: Callable[[jax.Array, jax.Array], jax.Array]
                     ) -> Tuple[jax.Array, jax.Array]:
  """FixMatch's unlabelled loss: ``mean_u(1[max p_weak >= threshold] * l(strong, argmax
  p_weak))`` (averaged over all unlabelled images, as in the paper), and the fraction of
  images above the threshold. ``p_weak`` is not differentiated."""
  probabilities = jax.lax.stop_gradient(tasks.scores_from_logits(task, weak_logits))
  mask = (jnp.max(probabilities, axis=-1) >= threshold).astype(jnp.float32)
  pseudo = jnp.argmax(probabilities, axis=-1)
  losses = per_example_loss(strong_logits, pseudo)
  return jnp.mean(losses * mask), jnp.mean(mask)


# ----- self-training ------------------------------------------------------------------------
def teacher_workdir(teacher: str, seed: int) -> str:
  """The teacher's workdir for a run with ``seed``: ``teacher/seed_<seed>`` when the
  teacher is a seed group, else ``teacher``."""
  member = os.path.join(teacher, f'seed_{seed}')
  return member if os.path.isdir(member) else teacher


def pseudo_labels(cfg: ml_collections.ConfigDict, seed: int, exp: Any,
                  unlabeled: np.ndarray, labeled_labels: np.ndarray
                  ) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
  """The teacher's confident pseudo-labels of ``unlabeled`` ``[U, *spatial, C]``.

  ``exp`` is the student's experiment (its task, classes and input shape must be the
  teacher's). Returns (indices into ``unlabeled``, labels, a description for the run's
  data fingerprint).
  """
  from medjax import train  # train builds experiments; imported here, not at module load
  workdir = teacher_workdir(cfg.teacher, seed)
  if not os.path.isfile(os.path.join(workdir, 'config.json')):
    raise ValueError(f'semi.teacher {workdir}: no run there (config.json missing)')
  teacher, state, step = train.restore_workdir(workdir)
  if (teacher.task, teacher.num_outputs, teacher.input_shape) != (
      exp.task, exp.num_outputs, exp.input_shape):
    raise ValueError(f'semi.teacher {workdir} is a {teacher.task} model of '
                     f'{teacher.num_outputs} outputs on {teacher.input_shape} images; this run '
                     f'is {exp.task}, {exp.num_outputs} outputs, {exp.input_shape}')
  scores = teacher.predict_images(state, unlabeled)
  prior = None
  if cfg.class_balance:
    prior = np.bincount(np.asarray(labeled_labels).reshape(-1), minlength=scores.shape[1])
  index, labels = few_labels.select_pseudo_labels(scores, cfg.threshold, prior)
  info = {'teacher': os.path.abspath(workdir), 'teacher_step': step,
          'threshold': cfg.threshold, 'class_balance': bool(cfg.class_balance),
          'pseudo_labeled': int(len(index)), 'unlabeled': int(len(unlabeled)),
          'class_counts': np.bincount(labels, minlength=scores.shape[1]).tolist()}
  return index, labels.astype(np.asarray(labeled_labels).dtype), info
