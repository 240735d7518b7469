"""The interface of a semi-supervised method, its registry, and the pieces methods share.

A method (``semi.method``) is one module: a subclass of :class:`Method` registered with
:func:`register_method`. The experiment (classification, segmentation) builds it with
:func:`make_method` once its labelled/unlabelled split is known, and calls its hooks at fixed
points; the default hooks train on the labelled data alone (``semi.method='none'``):

==============================  ==========================================================
``supports(exp)``               classmethod: can it train this experiment's outputs?
``check()``                     refuses settings it cannot use (one line each)
``prepare()``                   training-only set-up before the sampler or data are fixed
                                (self-training's pseudo-labels); skipped when a workdir is
                                restored for evaluation or prediction
``optimizer(tx)``               wraps the optimizer (a mean teacher's parameter average)
``init_loss_state()``           statistics the loss carries between steps
``batches(batches, start)``     joins unlabelled rows to this process's labelled batches
``train_inputs(...)``           inside the step, outside the gradient: model inputs and targets
``loss(outputs, labels, s)``    (scalar loss, updated loss state)
``fingerprint()``               what the method did to the data (for data_fingerprint.json)
==============================  ==========================================================

What a method may use of an experiment: ``config``, ``model``, ``apply_variables``,
``total_steps``, ``global_batch``, ``num_outputs`` and the experiment's own documented
helpers (``loss``, ``per_example_loss``, ``probabilities``, ``class_prior``,
``unlabeled_views`` for per-image experiments; ``supervised_loss``, ``unlabeled_patches`` for
experiments whose targets are label maps, ``label_maps = True``).

Rows: a batch with unlabelled images is, per process, ``[labelled b; view 1 u; ...]``
(:func:`split_rows` / :func:`join_rows`), so each process contributes its own rows and the
global batch stays sharded along ``'data'``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medjax import config as config_lib


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  # Semi-supervised learning from the unlabelled rest of the training split (medjax/semi/):
  # 'none', or a registered method (see each method's module for its own keys).
  s = config_lib.section(c, 'semi')
  s.method = 'none'
  s.threshold = 0.95             # confidence a pseudo-label needs
  s.unlabeled_ratio = 2          # fixmatch, mixmatch, mean_teacher: unlabelled per labelled
  s.weight = 1.0                 # fixmatch, mixmatch, mean_teacher: unlabelled loss weight
  s.ramp_up_fraction = 0.25      # mean_teacher, mixmatch: unlabelled weight's sigmoid ramp-up


class Method:
  """``semi.method='none'``: supervised on the labelled data only (the baseline)."""

  name = 'none'
  uses_unlabeled_batches = False  # batches() adds unlabelled rows

  def __init__(self, exp: Any):
    self.exp = exp
    self.cfg = exp.config.semi

  @classmethod
  def supports(cls, exp: Any) -> bool:
    return True

  def check(self) -> None:
    pass

  def prepare(self) -> None:
    pass

  def adaptive_thresholds(self) -> bool:
    """Whether ``semi.threshold_mode`` other than 'fixed' applies (FixMatch per image)."""
    return False

  def needed_for_inference(self) -> bool:
    """Whether :meth:`prepare` changes what evaluation computes (it then runs on restore)."""
    return False

  def optimizer(self, tx):
    return tx

  def init_loss_state(self) -> Any:
    return {}

  def batches(self, batches, start_step: int):
    return batches

  def train_inputs(self, state, images, labels, key: jax.Array):
    return images, labels

  def loss(self, outputs, labels, loss_state) -> Tuple[jax.Array, Any]:
    return self.exp.loss(outputs, labels), loss_state

  def fingerprint(self) -> Dict[str, Any]:
    return {}


# semi.method -> the method class; filled by medjax.semi (the built-in methods).
METHODS: Dict[str, type] = {'none': Method}


def register_method(name: str, method: type) -> None:
  """Makes ``semi.method = name`` build ``method(exp)``."""
  if name in METHODS and METHODS[name] is not method:
    raise ValueError(f"semi.method '{name}' is already registered ({METHODS[name].__name__})")
  METHODS[name] = method


def make_method(exp: Any, has_unlabeled: bool) -> Method:
  """``exp.config.semi.method``, checked against the experiment and its data."""
  cfg = exp.config.semi
  names = [n for n, m in METHODS.items() if m.supports(exp)]
  if cfg.method not in names:
    raise ValueError(f"unknown semi.method '{cfg.method}' for {exp.task}; expected one of "
                     f"{', '.join(names)}")
  method = METHODS[cfg.method](exp)
  if cfg.method == 'none':
    return method
  if not getattr(exp, 'single_label', True):
    raise ValueError(f'semi.method={cfg.method} needs one class per image; multi-label data '
                     'has no single pseudo-label')
  if not has_unlabeled:
    raise ValueError(f'semi.method={cfg.method} learns from unlabelled images, and every '
                     'training image is labelled: set data.labeled_fraction < 1 (or '
                     'data.labeled_count)')
  if not 0.0 <= cfg.threshold <= 1.0:
    raise ValueError(f'semi.threshold must be in [0, 1], got {cfg.threshold}')
  if method.uses_unlabeled_batches and cfg.unlabeled_ratio < 1:
    raise ValueError(f'semi.unlabeled_ratio must be >= 1, got {cfg.unlabeled_ratio}')
  if cfg.threshold_mode != 'fixed' and not method.adaptive_thresholds():
    raise ValueError(f'semi.threshold_mode={cfg.threshold_mode} is for semi.method=fixmatch of '
                     f'per-image tasks (its per-class thresholds); {cfg.method} for {exp.task} '
                     'uses semi.threshold')
  method.check()
  return method


# ----- batches of labelled and unlabelled rows ------------------------------------------
def split_rows(x: jax.Array, num_labeled: int, groups: int, process_count: int) -> list:
  """A batch of ``[labelled; unlabelled view 1; ...; view groups-1]`` rows -> one array per
  group.

  Each process contributes its rows ``[labelled b; u; ...; u]`` and the global batch is the
  processes' rows one after another, so ``x`` ``[P * (b + (groups - 1) u), ...]`` splits per
  process block. ``num_labeled`` is ``P * b``.
  """
  blocks = x.reshape((process_count, -1) + x.shape[1:])
  b = num_labeled // process_count
  u = (blocks.shape[1] - b) // (groups - 1)
  flat = lambda y: y.reshape((-1,) + x.shape[1:])  # noqa: E731
  return [flat(blocks[:, :b])] + [flat(blocks[:, b + i * u:b + (i + 1) * u])
                                  for i in range(groups - 1)]


def join_rows(parts: Sequence[jax.Array], process_count: int) -> jax.Array:
  """Inverse of :func:`split_rows`: the groups' rows back into per-process blocks."""
  blocks = [p.reshape((process_count, -1) + p.shape[1:]) for p in parts]
  joined = jnp.concatenate(blocks, axis=1)
  return joined.reshape((-1,) + joined.shape[2:])


def split_each(outputs: Any, num_labeled: int, groups: int) -> list:
  """:func:`split_rows` of each output of a model that returns one or several (deep
  supervision: a list of resolutions): ``[[labelled, view 1, ...] per output]``."""
  outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
  return [split_rows(o, num_labeled, groups, jax.process_count()) for o in outputs]


def join_batches(batches, views):
  """This process's labelled batches ``(x, y)`` with each step's unlabelled views (a tuple
  of arrays per step) appended as rows: ``([x; view 1; ...], y)``."""
  return ((np.concatenate([x, *step_views]), y) for (x, y), step_views in zip(batches, views))


def ramp_up(step: jax.Array, total_steps: int, fraction: float) -> jax.Array:
  """The consistency weight's sigmoid ramp-up (Laine & Aila 2017): ``exp(-5 (1 - t)^2)``
  with ``t = step / (fraction * total_steps)``, then 1."""
  length = max(fraction * total_steps, 1.0)
  t = jnp.clip(step / length, 0.0, 1.0)
  return jnp.exp(-5.0 * (1.0 - t) ** 2)


def consistency_mse(student_logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean squared difference of the student's softmax and target probabilities over every
  row (voxel) and class (the mean-teacher consistency of Tarvainen & Valpola 2017 and
  Yu et al. 2019; MixMatch's unlabelled term)."""
  student = jax.nn.softmax(student_logits.astype(jnp.float32), axis=-1)
  return jnp.mean((student - targets) ** 2)


def teacher_probabilities(exp: Any, params, batch_stats, images: jax.Array) -> jax.Array:
  """Class probabilities of ``images`` under a model that is not being differentiated (this
  step's model, or a parameter average): ``train=False``, so one output even with deep
  supervision; float32 softmax, gradient stopped."""
  return jax.lax.stop_gradient(
      exp.softmax_outputs(exp.apply_variables(params, batch_stats), images))


def pseudo_label_map(probabilities: jax.Array, threshold: float, ignore_label: int
                     ) -> jax.Array:
  """The arg-max label map ``[U, *spatial]`` of ``probabilities`` ``[U, *spatial, K]``, with
  ``ignore_label`` where the top probability is below ``threshold`` (those voxels count in
  no loss)."""
  confident = jnp.max(probabilities, axis=-1) >= threshold
  return jnp.where(confident, jnp.argmax(probabilities, axis=-1), ignore_label)


def check_range(name: str, value: float, low: float, high: float,
                closed_high: bool = True, closed_low: bool = True) -> None:
  """``semi.<name>`` in the interval, or a one-line error."""
  ok = ((value >= low) if closed_low else (value > low)) and (
      (value <= high) if closed_high else (value < high))
  if not ok:
    left, right = '[' if closed_low else '(', ']' if closed_high else ')'
    raise ValueError(f'semi.{name} must be in {left}{low:g}, {high:g}{right}, got {value}')


UnlabeledLoss = Callable[[jax.Array, jax.Array], jax.Array]
