"""``data.augment_on``: where training augmentation runs.

* ``'host'`` (default): tf.data augments classification images (:mod:`medjax.data.augment`)
  and the sampler segmentation patches (:mod:`medjax.data.seg_augment`), on the CPU.
* ``'device'``: the host only loads (and, for segmentation, crops around each patch's centre
  with the margin rotation and scaling need); the jitted train step augments the batch on
  the accelerator first (:mod:`medjax.data.device_augment`,
  :mod:`medjax.data.device_augment_images`), with the same ops, probabilities and ranges.

Example ``j`` of step ``s`` draws its parameters from
``fold_in(fold_in(fold_in(run key, STREAM), s), j)``, the run key being the state's
``dropout_key`` (a function of the seed alone, and each seed's own in a seed group): the
numbers do not depend on how the batch is split over devices or processes, and a resumed
run continues exactly. They differ from the host's (another random generator).

A task opts in with :class:`DeviceAugmented` and sets ``device_augment`` in its
constructor (:func:`segmentation_augment`, :func:`classification_augment`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import ml_collections

from medjax import config as config_lib
from medjax.data import augment as augment_lib, device_augment, device_augment_images

PLACES = ('host', 'device')
# Folded into the run key so augmentation draws from a stream of its own (not dropout's).
STREAM = 0x617567


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  # 'host' | 'device': augment training batches on the CPU (tf.data, the patch sampler) or
  # inside the jitted train step (medjax/experiments/augment_on.py).
  config_lib.section(c, 'data').augment_on = 'host'


def on_device(config: ml_collections.ConfigDict) -> bool:
  """Whether ``data.augment_on`` is 'device' (checked)."""
  place = config.data.augment_on
  if place not in PLACES:
    raise ValueError(f"data.augment_on must be 'host' or 'device', got {place!r}")
  return place == 'device'


def refuse_device(config: ml_collections.ConfigDict, why: str) -> None:
  """One-line error when ``data.augment_on='device'`` asks what ``why`` explains."""
  if on_device(config):
    raise ValueError(f'data.augment_on=device: {why}; use data.augment_on=host')


def _check_method(exp: Any) -> None:
  method = getattr(exp, 'method', None)
  if method is not None and method.name != 'none':
    refuse_device(exp.config, f'semi.method={method.name} builds its unlabelled views on '
                  'the host')


def example_keys(state: Any, batch: int) -> jax.Array:
  """``[B]`` keys of the examples of ``state``'s step (a pure function of the seed, the
  step and the example's index in the global batch)."""
  key = jax.random.fold_in(jax.random.fold_in(state.dropout_key, STREAM), state.step)
  return device_augment.example_keys(key, batch)


AugmentFn = Callable[[Any, Any, jax.Array], Any]  # (images, labels, keys) -> (images, labels)


class DeviceAugmented:
  """Mixin for an :class:`~medjax.experiments.base.Experiment`: when the task sets
  ``device_augment`` (``fn(images, labels, keys [B]) -> (images, labels)``), the train step
  applies it to the global batch before anything else in ``train_inputs``."""

  device_augment: Optional[AugmentFn] = None

  def train_inputs(self, state, images, labels, key: jax.Array):
    if self.device_augment is not None:
      batch = jax.tree.leaves(images)[0].shape[0]
      images, labels = self.device_augment(images, labels, example_keys(state, batch))
    return super().train_inputs(state, images, labels, key)


def segmentation_augment(exp: Any) -> Optional[AugmentFn]:
  """With ``data.augment_on='device'``: crops ``[B, *crop, C]`` and their targets (the
  sampler's, :data:`medjax.data.sampling.CROP_TARGETS`) -> augmented patches ``[B, *patch,
  C]`` and label maps ``[B, *patch]`` (``exp.sampler.augment``, ``exp.patch_size``)."""
  if not on_device(exp.config):
    return None
  _check_method(exp)
  augment, patch = exp.sampler.augment, tuple(exp.patch_size)

  def fn(crops, targets, keys):
    params = device_augment.draw_params(keys, augment, patch, crops.shape[-1])
    return device_augment.apply(crops, targets, params, augment, patch)
  return fn


def classification_augment(exp: Any, spatial_dims: int) -> Optional[AugmentFn]:
  """With ``data.augment_on='device'`` and ops on in ``data.augment``: normalised images
  ``[B, *spatial, C]`` -> augmented ones (labels unchanged)."""
  if not on_device(exp.config):
    return None
  _check_method(exp)
  aug = exp.config.data.augment
  augment_lib.check_augment(aug, spatial_dims)
  if not augment_lib.is_enabled(aug):
    return None

  def fn(images, labels, keys):
    params = device_augment_images.draw_params(keys, aug, images.shape[1:])
    return device_augment_images.apply(images, params, aug), labels
  return fn
