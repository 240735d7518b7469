"""FixMatch (Sohn et al. 2020): the model's confident predictions on a weak view of each
unlabelled image train its prediction on a strong view, in the same run.

* Per-image experiments (classification): each step also takes ``semi.unlabeled_ratio`` x
  batch unlabelled images, weakly (``data.augment``) and strongly (``semi.strong_augment``)
  augmented on the host; where the prediction on the weak view is confident (>=
  ``semi.threshold``), its arg-max is the target of the strong view's loss:
  ``loss = CE(labelled) + semi.weight * mean_u(mask * CE(strong, pseudo-label))``. One forward
  pass over labelled + weak + strong images (batch statistics over all of them, as in the
  paper); the pseudo-labels are not differentiated. With ``semi.threshold_mode=
  'self_adaptive'`` the threshold is FreeMatch's (Wang et al. 2023): per class, from running
  averages of the model's confidence (``semi.threshold_momentum``), carried in
  ``TrainState.loss_state`` (:func:`adaptive_thresholds`). ``semi.distribution_alignment``
  aligns the weak predictions to the labelled class prior first (ReMixMatch).
* Label-map experiments (segmentation, as in Yang et al. 2023, UniMatch): each step also takes
  ``semi.unlabeled_ratio`` x batch unlabelled patches (weakly augmented by the sampler). This
  step's model, not differentiated, labels each weak patch voxel by voxel (arg-max; voxels
  whose top probability is below ``semi.threshold`` get the ignore label,
  :func:`pseudo_label_map`); the strong view is the same patch with a strong intensity
  perturbation (:func:`strong_intensity`) and, with probability
  ``semi.segmentation_strong.cutmix_prob``, a box pasted from another unlabelled patch together
  with its pseudo-labels (:func:`cutmix_boxes`, :func:`cutmix`); ``loss = supervised(labelled)
  + semi.weight * supervised(strong, pseudo-labels)`` with the run's own loss over the
  confident voxels only.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from medjax import config as config_lib
from medjax.data import augment as augment_lib
from medjax.data.sampling import IGNORE_LABEL
from medjax.semi import base

THRESHOLD_MODES = ('fixed', 'self_adaptive')


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  s = config_lib.section(c, 'semi')
  s.threshold_mode = 'fixed'     # fixmatch: 'fixed' (semi.threshold) or 'self_adaptive'
  s.threshold_momentum = 0.99    # self_adaptive: running-average momentum (FreeMatch)
  s.distribution_alignment = False  # fixmatch, mixmatch: align guesses to the labelled prior
  # fixmatch: strong augmentation of the unlabelled images (the weak one is data.augment).
  s.strong_augment = augment_lib.augment_section(
      flip_lr=True, rotation_deg=30.0, scale_min=0.8, scale_max=1.2, brightness=0.3,
      contrast=0.3, cutout=0.5)
  # fixmatch for segmentation: the strong view of an unlabelled patch (the weak one is the
  # sampler's); intensity only, so the weak view's pseudo-label map still fits, plus CutMix.
  s.segmentation_strong = ml_collections.ConfigDict()
  s.segmentation_strong.brightness = 0.3   # intensity x U(1 - b, 1 + b)
  s.segmentation_strong.contrast = 0.3     # about the patch mean, x U(1 - c, 1 + c)
  s.segmentation_strong.noise_std = 0.1    # Gaussian noise, std ~ U(0, noise_std)
  s.segmentation_strong.cutmix_prob = 0.5  # a box pasted from another unlabelled patch
  s.segmentation_strong.cutmix_area = (0.02, 0.4)  # its share of the patch, ~ U(low, high)


class FixMatch(base.Method):
  name = 'fixmatch'
  uses_unlabeled_batches = True

  def adaptive_thresholds(self) -> bool:
    return not self.exp.label_maps

  def check(self) -> None:
    cfg, exp = self.cfg, self.exp
    if cfg.threshold_mode not in THRESHOLD_MODES:
      raise ValueError(f"unknown semi.threshold_mode '{cfg.threshold_mode}'; expected one of "
                       f"{', '.join(THRESHOLD_MODES)}")
    base.check_range('threshold_momentum', cfg.threshold_momentum, 0.0, 1.0,
                     closed_high=False)
    if exp.label_maps:
      check_segmentation_strong(cfg.segmentation_strong)
      if exp.num_classes >= IGNORE_LABEL:
        raise ValueError(f'semi.method=fixmatch marks unsure voxels with label {IGNORE_LABEL}, '
                         f'which is one of the {exp.num_classes} classes here')

  def init_loss_state(self) -> Any:
    if not self.exp.label_maps and self.cfg.threshold_mode == 'self_adaptive':
      return adaptive_threshold_state(self.exp.num_outputs)
    return {}

  def batches(self, batches, start_step: int):
    exp = self.exp
    if exp.label_maps:
      # This process's rows: [labelled; weak unlabelled] (see base.split_rows).
      views = exp.unlabeled_patches(start_step)
    else:
      # [labelled; weak; strong]
      views = exp.unlabeled_views(start_step, self.cfg.strong_augment, 'semi.strong_augment')
    return base.join_batches(batches, views)

  def train_inputs(self, state, images, labels, key):
    if not self.exp.label_maps:
      return images, labels
    return self._label_map_inputs(state, images, labels, key)

  def _label_map_inputs(self, state, images, labels, key):
    """The batch ``[labelled; weak]`` -> ``[labelled; strong]`` rows and ``{'labels',
    'pseudo', 'weight'}``: this step's model (not differentiated) labels each weak patch
    voxel by voxel; the strong view adds an intensity perturbation and CutMix (the pseudo-
    label map mixed with the same box)."""
    exp, cfg, processes = self.exp, self.cfg, jax.process_count()
    strong_cfg = cfg.segmentation_strong
    labeled, weak = base.split_rows(images, labels.shape[0], 2, processes)
    probabilities = base.teacher_probabilities(exp, state.params, state.batch_stats, weak)
    pseudo = base.pseudo_label_map(probabilities, cfg.threshold, IGNORE_LABEL)
    intensity_key, box_key, partner_key = jax.random.split(key, 3)
    strong = strong_intensity(intensity_key, weak, strong_cfg.brightness,
                              strong_cfg.contrast, strong_cfg.noise_std)
    box = cutmix_boxes(box_key, weak.shape[0], weak.shape[1:-1], strong_cfg.cutmix_prob,
                       tuple(strong_cfg.cutmix_area))
    partner = jax.random.permutation(partner_key, weak.shape[0])
    strong, pseudo = cutmix(box, partner, strong, pseudo)
    targets = {'labels': labels, 'pseudo': pseudo, 'weight': jnp.float32(cfg.weight)}
    return base.join_rows([labeled, strong], processes), targets

  def loss(self, outputs, labels, loss_state):
    exp, cfg = self.exp, self.cfg
    if exp.label_maps:
      parts = base.split_each(outputs, labels['labels'].shape[0], 2)
      supervised = exp.loss([p[0] for p in parts], labels['labels'])
      unlabeled = exp.supervised_loss([p[1] for p in parts], labels['pseudo'], IGNORE_LABEL)
      return supervised + labels['weight'] * unlabeled, loss_state
    labeled, weak, strong = split_outputs(outputs, labels.shape[0], jax.process_count())
    probabilities = pseudo_label_probabilities(exp.probabilities, weak, exp.class_prior())
    threshold = cfg.threshold
    if cfg.threshold_mode == 'self_adaptive':
      loss_state, threshold = adaptive_thresholds(loss_state, probabilities,
                                                  cfg.threshold_momentum)
    unlabeled_loss, _ = masked_consistency(
        probabilities, strong, threshold,
        lambda logits, pseudo: exp.per_example_loss(logits, pseudo)[0])
    return exp.loss(labeled, labels) + cfg.weight * unlabeled_loss, loss_state


base.register_method('fixmatch', FixMatch)


# ----- per-image FixMatch and FreeMatch ---------------------------------------------------
def split_outputs(outputs: jax.Array, num_labeled: int, process_count: int
                  ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Model outputs of a FixMatch batch ``[labelled; weak; strong]`` -> the three parts."""
  labeled, weak, strong = base.split_rows(outputs, num_labeled, 3, process_count)
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


def pseudo_label_probabilities(probabilities_of: Callable[[jax.Array], jax.Array],
                               weak_logits: jax.Array,
                               class_prior: Optional[jax.Array] = None) -> jax.Array:
  """The weak view's class probabilities ``[U, K]`` (``probabilities_of(logits)``: the
  experiment's scores), not differentiated (pseudo-labels are targets); with
  ``class_prior`` ``[K]``, distribution-aligned (:func:`align_distribution`)."""
  probabilities = jax.lax.stop_gradient(probabilities_of(weak_logits))
  if class_prior is not None:
    probabilities = align_distribution(probabilities, class_prior)
  return probabilities


def masked_consistency(probabilities: jax.Array, strong_logits: jax.Array, threshold,
                       per_example_loss: base.UnlabeledLoss) -> Tuple[jax.Array, jax.Array]:
  """``mean_u(1[max p >= threshold[argmax p]] * l(strong, argmax p))`` (averaged over all
  unlabelled images, as in FixMatch) and the fraction of images kept. ``probabilities``
  ``[U, K]`` of the weak view; ``threshold`` a number, or one per class ``[K]`` (applied by
  each image's pseudo-label)."""
  pseudo = jnp.argmax(probabilities, axis=-1)
  thresholds = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), probabilities.shape[-1:])
  mask = (jnp.max(probabilities, axis=-1) >= thresholds[pseudo]).astype(jnp.float32)
  losses = per_example_loss(strong_logits, pseudo)
  return jnp.mean(losses * mask), jnp.mean(mask)


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


# ----- label-map FixMatch ------------------------------------------------------------------
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
