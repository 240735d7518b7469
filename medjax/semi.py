"""Semi-supervised learning: from the unlabelled rest of the training split.

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
  in the paper); the pseudo-labels are not differentiated. With
  ``semi.threshold_mode='self_adaptive'`` the threshold is FreeMatch's (Wang et al. 2023)
  instead of ``semi.threshold``: per class, from running averages of the model's confidence
  on the unlabelled images (``semi.threshold_momentum``), carried in
  ``TrainState.loss_state`` (:func:`adaptive_thresholds`).

* ``'mixmatch'`` (Berthelot et al. 2019), in one run: each step also takes
  ``semi.unlabeled_ratio`` x batch unlabelled images, each weakly augmented twice
  (``data.augment``, two independent draws). The current model's predictions on the two views,
  averaged and sharpened (``p^(1/T)`` renormalised, ``T = semi.sharpen_temperature``), are the
  unlabelled images' guessed labels (with ``semi.distribution_alignment``, aligned to the
  labelled class prior before sharpening, as in ReMixMatch: sharpening alone pushes the
  guesses of an imbalanced set towards its majority class); labelled (one-hot) and unlabelled
  rows are then mixed with a shuffled partner of the whole batch (mixup, ``lambda ~
  Beta(alpha, alpha)`` per row with ``alpha = semi.mixup_alpha``, kept ``>= 1/2`` so a row
  stays closest to itself), and ``loss = CE(mixed labelled rows, mixed targets) + semi.weight
  * ramp(t) * MSE(softmax, mixed guessed labels)`` over the mixed unlabelled rows
  (:func:`mixmatch_loss`; the weight ramped up over ``semi.ramp_up_fraction`` of training as
  for the mean teacher). The guess is not differentiated. Huang et al. (2023, "Systematic
  comparison of semi- and self-supervised learning for medical image classification") found it
  the most reliable semi-supervised method across their four medical datasets.

Segmentation (``data.labeled_fraction`` / ``data.labeled_count`` pick labelled training
*cases*; the rest are read as images only):

* ``'self_training'``: as for classification, with ``semi.teacher`` a segmentation run on
  the labelled cases (same data, fold and ``data.labeled_*``): it predicts every unlabelled
  case (arg-max of its probabilities; voxels below ``semi.threshold`` ignored by the loss)
  and those label maps join the labelled cases in this run's sampler
  (``SegmentationExperiment._pseudo_labelled_cases``), which draws labelled cases
  ``semi.labeled_share`` of the time (:func:`with_labeled_share`).
* ``'fixmatch'`` (Sohn et al. 2020, for segmentation as in Yang et al. 2023, UniMatch), in
  one run: each step also takes ``semi.unlabeled_ratio`` x batch patches of unlabelled cases
  (weakly augmented by the sampler). This step's model, not differentiated, labels each weak
  patch voxel by voxel (arg-max; voxels whose top probability is below ``semi.threshold``
  get IGNORE_LABEL, :func:`pseudo_label_map`); the strong view is the same patch with a
  strong intensity perturbation (:func:`strong_intensity`) and, with probability
  ``semi.segmentation_strong.cutmix_prob``, a box pasted from another unlabelled patch
  together with its pseudo-labels (:func:`cutmix_boxes`, :func:`cutmix`); ``loss =
  supervised(labelled) + semi.weight * supervised(strong, pseudo-labels)`` with the run's
  own loss (Dice + CE by default) over the confident voxels only.
* ``'mean_teacher'`` (Tarvainen & Valpola 2017; Yu et al. 2019 for segmentation), in one run:
  each step also takes ``semi.unlabeled_ratio`` x batch patches of unlabelled cases; the
  teacher is the exponential moving average of the student's parameters
  (``semi.ema_decay``, kept in the optimizer state by :func:`medjax.optim.with_parameter_ema`);
  student and teacher see the same patches with independent Gaussian noise
  (``semi.noise_std``), and ``loss = supervised(labelled) + semi.weight * ramp(t) *
  MSE(softmax(student), teacher probabilities)`` over the unlabelled patches, the weight
  ramped up over the first ``semi.ramp_up_fraction`` of training. Validation and prediction
  use the student.

The unlabelled images never carry labels into training: :class:`FewLabels` keeps images only,
and segmentation's unlabelled sampler reads images only (both tested).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medjax import tasks
from medjax.data import few_labels

CLASSIFICATION_METHODS = ('none', 'fixmatch', 'mixmatch', 'self_training')
SEGMENTATION_METHODS = ('none', 'fixmatch', 'mean_teacher', 'self_training')
THRESHOLD_MODES = ('fixed', 'self_adaptive')


def check_method(cfg: ml_collections.ConfigDict, task: str, has_unlabeled: bool) -> str:
  """``semi.method``, checked against the task and the data."""
  method = cfg.method
  methods = SEGMENTATION_METHODS if task == 'segmentation' else CLASSIFICATION_METHODS
  if method not in methods:
    raise ValueError(f"unknown semi.method '{method}' for {task}; expected one of "
                     f"{', '.join(methods)}")
  if method == 'none':
    return method
  if task == 'multilabel':
    raise ValueError(f'semi.method={method} needs one class per image; multi-label data has '
                     'no single pseudo-label')
  if not has_unlabeled:
    raise ValueError(f'semi.method={method} learns from unlabelled images, and every training '
                     'image is labelled: set data.labeled_fraction < 1 (or data.labeled_count)')
  if not 0.0 <= cfg.threshold <= 1.0:
    raise ValueError(f'semi.threshold must be in [0, 1], got {cfg.threshold}')
  if method == 'self_training' and not cfg.teacher:
    raise ValueError('semi.method=self_training needs semi.teacher: the workdir of a run '
                     'trained on the labelled part')
  if cfg.threshold_mode not in THRESHOLD_MODES:
    raise ValueError(f"unknown semi.threshold_mode '{cfg.threshold_mode}'; expected one of "
                     f"{', '.join(THRESHOLD_MODES)}")
  if cfg.threshold_mode != 'fixed' and (method != 'fixmatch' or task == 'segmentation'):
    raise ValueError(f'semi.threshold_mode={cfg.threshold_mode} is for semi.method=fixmatch '
                     f'of classification (its per-class thresholds); {method} for {task} uses '
                     'semi.threshold')
  if not 0.0 <= cfg.threshold_momentum < 1.0:
    raise ValueError(f'semi.threshold_momentum must be in [0, 1), got {cfg.threshold_momentum}')
  if method == 'mixmatch' and task not in ('binary', 'multiclass'):
    raise ValueError(f'semi.method=mixmatch mixes one-hot labels with softmax guesses: it '
                     f'needs a binary or multiclass task, not {task}')
  if method == 'mixmatch' and not 0.0 < cfg.sharpen_temperature <= 1.0:
    raise ValueError(f'semi.sharpen_temperature must be in (0, 1], got '
                     f'{cfg.sharpen_temperature}')
  if method == 'mixmatch' and cfg.mixup_alpha <= 0:
    raise ValueError(f'semi.mixup_alpha must be > 0, got {cfg.mixup_alpha}')
  if method == 'fixmatch' and task == 'segmentation':
    check_segmentation_strong(cfg.segmentation_strong)
  if method in ('fixmatch', 'mixmatch', 'mean_teacher') and cfg.unlabeled_ratio < 1:
    raise ValueError(f'semi.unlabeled_ratio must be >= 1, got {cfg.unlabeled_ratio}')
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


def join_rows(parts, process_count: int) -> jax.Array:
  """Inverse of :func:`split_rows`: the groups' rows back into per-process blocks."""
  blocks = [p.reshape((process_count, -1) + p.shape[1:]) for p in parts]
  joined = jnp.concatenate(blocks, axis=1)
  return joined.reshape((-1,) + joined.shape[2:])


# ----- FixMatch -----------------------------------------------------------------------------
def split_outputs(outputs: jax.Array, num_labeled: int, process_count: int
                  ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Model outputs of a FixMatch batch ``[labelled; weak; strong]`` -> the three parts."""
  labeled, weak, strong = split_rows(outputs, num_labeled, 3, process_count)
  return labeled, weak, strong


def align_distribution(probabilities: jax.Array, class_prior: jax.Array) -> jax.Array:
  """Distribution alignment (Berthelot et al. 2020, ReMixMatch): ``p * prior / mean_u(p)``,
  renormalised per row. ``probabilities`` ``[U, K]``; ``class_prior`` ``[K]`` (the labelled
  class frequencies). The model's mean prediction is taken over this step's unlabelled
  batch (ReMixMatch keeps a running mean of past batches; one batch of a few dozen images
  estimates it well enough and keeps the step stateless). It lifts the classes the model
  under-predicts, so a minority class still gets confident pseudo-labels."""
  mean = jnp.mean(probabilities, axis=0)
  aligned = probabilities * class_prior / jnp.maximum(mean, 1e-6)
  return aligned / jnp.sum(aligned, axis=-1, keepdims=True)


def pseudo_label_probabilities(task: str, weak_logits: jax.Array,
                               class_prior: Optional[jax.Array] = None) -> jax.Array:
  """The weak view's class probabilities ``[U, K]``, not differentiated (pseudo-labels are
  targets); with ``class_prior`` ``[K]``, distribution-aligned (:func:`align_distribution`)."""
  probabilities = jax.lax.stop_gradient(tasks.scores_from_logits(task, weak_logits))
  if class_prior is not None:
    probabilities = align_distribution(probabilities, class_prior)
  return probabilities


def masked_consistency(probabilities: jax.Array, strong_logits: jax.Array, threshold,
                       per_example_loss: Callable[[jax.Array, jax.Array], jax.Array]
                       ) -> Tuple[jax.Array, jax.Array]:
  """``mean_u(1[max p >= threshold[argmax p]] * l(strong, argmax p))`` (averaged over all
  unlabelled images, as in FixMatch) and the fraction of images kept. ``probabilities``
  ``[U, K]`` of the weak view; ``threshold`` a number, or one per class ``[K]`` (applied by
  each image's pseudo-label)."""
  pseudo = jnp.argmax(probabilities, axis=-1)
  thresholds = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), probabilities.shape[-1:])
  mask = (jnp.max(probabilities, axis=-1) >= thresholds[pseudo]).astype(jnp.float32)
  losses = per_example_loss(strong_logits, pseudo)
  return jnp.mean(losses * mask), jnp.mean(mask)


# ----- MixMatch ------------------------------------------------------------------------------
def sharpen(probabilities: jax.Array, temperature: float) -> jax.Array:
  """MixMatch's sharpening: ``p^(1/T)`` renormalised per row (``T`` -> 0: one-hot).
  ``probabilities`` ``[N, K]``."""
  sharpened = probabilities ** (1.0 / temperature)
  return sharpened / jnp.sum(sharpened, axis=-1, keepdims=True)


def guess_labels(probabilities_per_view, temperature: float,
                 class_prior: Optional[jax.Array] = None) -> jax.Array:
  """The guessed labels ``[U, K]`` of unlabelled images from the model's probabilities on
  each of their augmented views (a list of ``[U, K]``): averaged, distribution-aligned to
  ``class_prior`` ``[K]`` if given (:func:`align_distribution`, as ReMixMatch does before
  sharpening), sharpened, and not differentiated."""
  mean = jnp.mean(jnp.stack(probabilities_per_view), axis=0)
  if class_prior is not None:
    mean = align_distribution(mean, class_prior)
  return jax.lax.stop_gradient(sharpen(mean, temperature))


def mixup(key: jax.Array, images: jax.Array, targets: jax.Array, alpha: float
          ) -> Tuple[jax.Array, jax.Array]:
  """Each row mixed with a partner from a random permutation of all rows (MixMatch's
  mixup): ``lambda' x_i + (1 - lambda') x_perm(i)`` and the same for its target, with
  ``lambda ~ Beta(alpha, alpha)`` per row and ``lambda' = max(lambda, 1 - lambda)``.
  ``images`` ``[N, ...]``, ``targets`` ``[N, K]`` (one-hot or soft)."""
  perm_key, beta_key = jax.random.split(key)
  partner = jax.random.permutation(perm_key, images.shape[0])
  lam = jax.random.beta(beta_key, alpha, alpha, (images.shape[0],))
  lam = jnp.maximum(lam, 1.0 - lam)

  def mix(x):
    weight = lam.reshape((-1,) + (1,) * (x.ndim - 1))
    return weight * x + (1.0 - weight) * x[partner]

  return mix(images), mix(targets.astype(images.dtype))


def mixmatch_loss(labeled_logits: jax.Array, labeled_targets: jax.Array,
                  unlabeled_logits: jax.Array, unlabeled_targets: jax.Array,
                  weight) -> jax.Array:
  """``mean_x CE(softmax(logits), target) + weight * mean_u mean_k (softmax - target)^2``:
  MixMatch's loss on the mixed rows (soft targets ``[N, K]``; the squared error averaged
  over classes as well, the paper's ``1 / (K |U'|)``)."""
  log_p = jax.nn.log_softmax(labeled_logits.astype(jnp.float32), axis=-1)
  supervised = -jnp.mean(jnp.sum(labeled_targets * log_p, axis=-1))
  q = jax.nn.softmax(unlabeled_logits.astype(jnp.float32), axis=-1)
  return supervised + weight * jnp.mean((q - unlabeled_targets) ** 2)


# ----- FreeMatch's self-adaptive thresholds -------------------------------------------------
def adaptive_threshold_state(num_classes: int) -> Dict[str, jax.Array]:
  """FreeMatch's running statistics before the first step: the unlabelled images' mean top
  probability (``confidence``, the global threshold) and their mean probability of each
  class (``class_probability`` ``[K]``), both ``1 / K`` as in the paper."""
  return {'confidence': jnp.full((), 1.0 / num_classes, jnp.float32),
          'class_probability': jnp.full((num_classes,), 1.0 / num_classes, jnp.float32)}


def adaptive_thresholds(state: Dict[str, jax.Array], probabilities: jax.Array,
                        momentum: float) -> Tuple[Dict[str, jax.Array], jax.Array]:
  """FreeMatch's self-adaptive thresholds (Wang et al. 2023, eqs. 6-9): moves the running
  mean top probability ``tau`` and mean class probabilities ``p~`` ``[K]`` towards this
  step's unlabelled batch (``x <- momentum x + (1 - momentum) batch mean``), then class
  ``c``'s threshold is ``tau * p~_c / max_k p~_k``. The threshold starts low (``1 / K``) and
  rises as the model grows confident; a class the model predicts less gets a lower one.
  ``probabilities`` ``[U, K]`` of the weak view. Returns (new state, thresholds ``[K]``)."""
  keep = jnp.float32(momentum)
  new = {'confidence': keep * state['confidence'] +
                       (1 - keep) * jnp.mean(jnp.max(probabilities, axis=-1)),
         'class_probability': keep * state['class_probability'] +
                              (1 - keep) * jnp.mean(probabilities, axis=0)}
  relative = new['class_probability'] / jnp.max(new['class_probability'])
  return new, new['confidence'] * relative


# ----- self-training ------------------------------------------------------------------------
def pseudo_labels(cfg: ml_collections.ConfigDict, exp: Any, unlabeled: np.ndarray,
                  labeled_labels: np.ndarray
                  ) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
  """The teacher's confident pseudo-labels of ``unlabeled`` ``[U, *spatial, C]``.

  ``exp`` is the student's experiment (its task, classes and input shape must be the
  teacher's, ``semi.teacher`` loaded by ``exp.load_run``). Returns (indices into
  ``unlabeled``, labels, a description for the run's data fingerprint).
  """
  teacher, state, step, workdir = exp.load_run(cfg.teacher, 'semi.teacher')
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
          'class_counts': np.bincount(labels, minlength=scores.shape[1]).tolist(),
          'confident_per_class': confident_per_class(scores, cfg.threshold).tolist()}
  return index, labels.astype(np.asarray(labeled_labels).dtype), info


def with_labeled_share(labeled: Dict[str, Any], pseudo: Dict[str, Any], share: float
                       ) -> Dict[str, Any]:
  """The sampler's cases for segmentation self-training: the pseudo-labelled cases and the
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


# ----- mean teacher (segmentation) ----------------------------------------------------------
def ramp_up(step: jax.Array, total_steps: int, fraction: float) -> jax.Array:
  """The consistency weight's sigmoid ramp-up (Laine & Aila 2017): ``exp(-5 (1 - t)^2)``
  with ``t = step / (fraction * total_steps)``, then 1."""
  length = max(fraction * total_steps, 1.0)
  t = jnp.clip(step / length, 0.0, 1.0)
  return jnp.exp(-5.0 * (1.0 - t) ** 2)


def noisy(images: jax.Array, key: jax.Array, std: float) -> jax.Array:
  return images + std * jax.random.normal(key, images.shape, images.dtype)


def consistency_mse(student_logits: jax.Array, teacher_probabilities: jax.Array) -> jax.Array:
  """Mean squared difference of the student's softmax and the teacher's probabilities over
  every voxel and class (the mean-teacher consistency of Tarvainen & Valpola 2017 and
  Yu et al. 2019)."""
  student = jax.nn.softmax(student_logits.astype(jnp.float32), axis=-1)
  return jnp.mean((student - teacher_probabilities) ** 2)


# ----- FixMatch for segmentation -------------------------------------------------------------
def check_segmentation_strong(cfg: ml_collections.ConfigDict) -> None:
  """``semi.segmentation_strong``, checked."""
  for name in ('brightness', 'contrast'):
    if not 0.0 <= cfg[name] < 1.0:
      raise ValueError(f'semi.segmentation_strong.{name} is a factor range 1 +- x with x in '
                       f'[0, 1), got {cfg[name]}')
  if cfg.noise_std < 0:
    raise ValueError(f'semi.segmentation_strong.noise_std must be >= 0, got {cfg.noise_std}')
  if not 0.0 <= cfg.cutmix_prob <= 1.0:
    raise ValueError(f'semi.segmentation_strong.cutmix_prob must be in [0, 1], got '
                     f'{cfg.cutmix_prob}')
  low, high = cfg.cutmix_area
  if not 0.0 < low <= high <= 1.0:
    raise ValueError(f'semi.segmentation_strong.cutmix_area needs 0 < low <= high <= 1, got '
                     f'{tuple(cfg.cutmix_area)}')


def strong_intensity(key: jax.Array, images: jax.Array, brightness: float, contrast: float,
                     noise_std: float) -> jax.Array:
  """A strong intensity perturbation of each patch ``[U, *spatial, C]`` (z-scored): scaled
  by ``b ~ U(1 - brightness, 1 + brightness)``, then its contrast about its own mean (over
  voxels and channels) by ``c ~ U(1 - contrast, 1 + contrast)``, then Gaussian noise of
  standard deviation ``s ~ U(0, noise_std)``; ``b``, ``c``, ``s`` drawn per patch. Voxels do
  not move, so the weak view's pseudo-label map still fits."""
  b_key, c_key, s_key, n_key = jax.random.split(key, 4)
  per_row = (images.shape[0],) + (1,) * (images.ndim - 1)
  scale = jax.random.uniform(b_key, per_row, minval=1 - brightness, maxval=1 + brightness)
  factor = jax.random.uniform(c_key, per_row, minval=1 - contrast, maxval=1 + contrast)
  std = jax.random.uniform(s_key, per_row, maxval=noise_std)
  x = images * scale
  mean = jnp.mean(x, axis=tuple(range(1, x.ndim)), keepdims=True)
  x = mean + (x - mean) * factor
  return x + std * jax.random.normal(n_key, x.shape, x.dtype)


def cutmix_boxes(key: jax.Array, num_rows: int, spatial: Tuple[int, ...], prob: float,
                 area: Tuple[float, float]) -> jax.Array:
  """CutMix boxes ``[U, *spatial]`` (bool): with probability ``prob`` a row gets a box
  covering a fraction ``a ~ U(area)`` of the patch (each side ``a^(1/d)`` of the patch's, at
  least one voxel), at a uniform position inside the patch; otherwise none."""
  use_key, area_key, pos_key = jax.random.split(key, 3)
  use = jax.random.uniform(use_key, (num_rows,)) < prob
  fraction = jax.random.uniform(area_key, (num_rows,), minval=area[0], maxval=area[1])
  side_fraction = fraction ** (1.0 / len(spatial))
  starts = jax.random.uniform(pos_key, (num_rows, len(spatial)))
  box = use.reshape((-1,) + (1,) * len(spatial))
  for axis, size in enumerate(spatial):
    side = jnp.clip(jnp.round(side_fraction * size), 1, size).astype(jnp.int32)
    start = jnp.floor(starts[:, axis] * (size - side + 1)).astype(jnp.int32)
    index = jnp.arange(size)[None, :]
    inside = (index >= start[:, None]) & (index < (start + side)[:, None])
    shape = [num_rows] + [1] * len(spatial)
    shape[axis + 1] = size
    box = box & inside.reshape(shape)
  return box


def cutmix(box: jax.Array, partner: jax.Array, *arrays: jax.Array) -> Tuple[jax.Array, ...]:
  """Each array ``[U, *spatial, ...]`` with the voxels inside row ``i``'s box ``[U, *spatial]``
  taken from row ``partner[i]`` (CutMix; images and their pseudo-label maps alike, so they
  stay aligned)."""
  def mix(x):
    inside = box.reshape(box.shape + (1,) * (x.ndim - box.ndim))
    return jnp.where(inside, x[partner], x)
  return tuple(mix(x) for x in arrays)


def pseudo_label_map(probabilities: jax.Array, threshold: float, ignore_label: int
                     ) -> jax.Array:
  """The arg-max label map ``[U, *spatial]`` of ``probabilities`` ``[U, *spatial, K]``, with
  ``ignore_label`` where the top probability is below ``threshold`` (those voxels count in
  no loss)."""
  confident = jnp.max(probabilities, axis=-1) >= threshold
  return jnp.where(confident, jnp.argmax(probabilities, axis=-1), ignore_label)
