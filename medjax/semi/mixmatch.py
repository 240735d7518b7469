"""MixMatch (Berthelot et al. 2019), in one run, for per-image softmax classifiers.

Each step also takes ``semi.unlabeled_ratio`` x batch unlabelled images, each weakly augmented
twice (``data.augment``, two independent draws). The current model's predictions on the two
views, averaged and sharpened (``p^(1/T)`` renormalised, ``T = semi.sharpen_temperature``),
are the unlabelled images' guessed labels (with ``semi.distribution_alignment``, aligned to the
labelled class prior before sharpening, as in ReMixMatch: sharpening alone pushes the guesses
of an imbalanced set towards its majority class); labelled (one-hot) and unlabelled rows are
then mixed with a shuffled partner of the whole batch (mixup, ``lambda ~ Beta(alpha, alpha)``
per row with ``alpha = semi.mixup_alpha``, kept ``>= 1/2`` so a row stays closest to itself),
and ``loss = CE(mixed labelled rows, mixed targets) + semi.weight * ramp(t) * MSE(softmax,
mixed guessed labels)`` over the mixed unlabelled rows (:func:`mixmatch_loss`; the weight
ramped up over ``semi.ramp_up_fraction`` of training). The guess is not differentiated.
Huang et al. (2023, "Systematic comparison of semi- and self-supervised learning for medical
image classification") found it the most reliable semi-supervised method across their four
medical datasets.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from medjax import config as config_lib
from medjax.semi import base
from medjax.semi.fixmatch import align_distribution


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  s = config_lib.section(c, 'semi')
  s.sharpen_temperature = 0.5    # mixmatch: guessed labels p^(1/T), renormalised
  s.mixup_alpha = 0.75           # mixmatch: mixup weight ~ Beta(alpha, alpha)


class MixMatch(base.Method):
  name = 'mixmatch'
  uses_unlabeled_batches = True

  @classmethod
  def supports(cls, exp) -> bool:
    return not exp.label_maps

  def check(self) -> None:
    cfg, exp = self.cfg, self.exp
    if not exp.softmax_classes:
      raise ValueError(f'semi.method=mixmatch mixes one-hot labels with softmax guesses: it '
                       f'needs a binary or multiclass task, not {exp.task}')
    base.check_range('sharpen_temperature', cfg.sharpen_temperature, 0.0, 1.0,
                     closed_low=False)
    if cfg.mixup_alpha <= 0:
      raise ValueError(f'semi.mixup_alpha must be > 0, got {cfg.mixup_alpha}')
    loss = exp.config.loss
    if loss.name != 'ce' or loss.class_weights != 'none' or loss.label_smoothing:
      raise ValueError('semi.method=mixmatch trains on mixed soft targets with its own '
                       'cross-entropy: loss.name must be ce, loss.class_weights none and '
                       'loss.label_smoothing 0')

  def batches(self, batches, start_step: int):
    # Two weak views (independent draws): this process's rows [labelled; view 1; view 2].
    views = self.exp.unlabeled_views(start_step, self.exp.config.data.augment, 'data.augment')
    return base.join_batches(batches, views)

  def train_inputs(self, state, images, labels, key):
    """The batch ``[labelled; view 1; view 2]`` -> the mixed rows ``[labelled; unlabelled
    (both views)]`` and their soft targets (the unlabelled ones guessed by this step's model
    on both views, :func:`guess_labels`)."""
    exp, cfg, processes = self.exp, self.cfg, jax.process_count()
    labeled, view1, view2 = base.split_rows(images, labels.shape[0], 3, processes)
    probabilities = [base.teacher_probabilities(exp, state.params, state.batch_stats, v)
                     for v in (view1, view2)]
    guess = guess_labels(probabilities, cfg.sharpen_temperature, exp.class_prior())
    one_hot = jax.nn.one_hot(labels, exp.num_outputs, dtype=jnp.float32)
    # Rows in the per-process layout [labelled; view 1; view 2], mixed across the whole
    # batch; the loss splits them as [labelled; unlabelled].
    rows = base.join_rows([labeled, view1, view2], processes)
    targets = base.join_rows([one_hot, guess, guess], processes)
    mixed, mixed_targets = mixup(key, rows, targets, cfg.mixup_alpha)
    return mixed, {'targets': mixed_targets, 'num_labeled': labels.shape[0],
                   'weight': cfg.weight * base.ramp_up(state.step, exp.total_steps,
                                                       cfg.ramp_up_fraction)}

  def loss(self, outputs, labels, loss_state):
    processes = jax.process_count()
    logits = base.split_rows(outputs, labels['num_labeled'], 2, processes)
    targets = base.split_rows(labels['targets'], labels['num_labeled'], 2, processes)
    return mixmatch_loss(logits[0], targets[0], logits[1], targets[1],
                         labels['weight']), loss_state


base.register_method('mixmatch', MixMatch)


def sharpen(probabilities: jax.Array, temperature: float) -> jax.Array:
  """MixMatch's sharpening: ``p^(1/T)`` renormalised per row (``T`` -> 0: one-hot).
  ``probabilities`` ``[N, K]``."""
  sharpened = probabilities ** (1.0 / temperature)
  return sharpened / jnp.sum(sharpened, axis=-1, keepdims=True)


def guess_labels(probabilities_per_view, temperature: float,
                 class_prior: Optional[jax.Array] = None) -> jax.Array:
  """The guessed labels ``[U, K]`` of unlabelled images from the model's probabilities on
  each of their augmented views (a list of ``[U, K]``): averaged, distribution-aligned to
  ``class_prior`` ``[K]`` if given (as ReMixMatch does before sharpening), sharpened, and
  not differentiated."""
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
  return supervised + weight * base.consistency_mse(unlabeled_logits, unlabeled_targets)
