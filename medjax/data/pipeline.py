"""tf.data input pipelines for in-memory classification data.

Determinism contract: the global batch of training step ``s`` is a pure function of
``(seed, s)``. Epoch ``e = s // steps_per_epoch`` uses the permutation
``default_rng([seed, e]).permutation(N)`` (the last partial batch is dropped), and every
random augmentation of an example is drawn from a stateless TensorFlow RNG keyed by
``(seed, epoch, example index)``. Therefore

* a run resumed at step ``s`` sees exactly the batches an uninterrupted run sees;
* with ``P`` processes, process ``p`` reads only rows ``[p*B/P, (p+1)*B/P)`` of each global
  batch, and the union over processes is the single-process batch, augmentations included.

TensorFlow is hidden from GPUs and TPUs here, so it never takes accelerator memory.
"""

from __future__ import annotations

import math
from typing import Iterator, Tuple

import ml_collections
import numpy as np
import tensorflow as tf

tf.config.set_visible_devices([], 'GPU')
try:
  tf.config.set_visible_devices([], 'TPU')
except (ValueError, RuntimeError):
  pass

Batch = Tuple[np.ndarray, np.ndarray]


def numpy_batches(ds: tf.data.Dataset) -> Iterator:
  """``ds`` as an iterator of numpy batches, with tf.data's autotuning thread off.

  Why: on TF 2.21 an iterator dropped while that thread waits misses its cancellation and
  blocks the dropping (Python) thread until the thread's next timed wake-up, seconds to
  minutes late in a long run (seen: 6 minutes at the end of a 10-seed FixMatch run, whose
  member iterators a ``zip`` leaves unfinished). Without it the teardown takes milliseconds
  and ``AUTOTUNE`` parallelism becomes tf.data's fixed default (about one call per core).
  Measured in one run on 2 cores (benchmarks/results/pipeline_autotune.json): a 10-seed
  FixMatch group's input 7.1-7.5 vs 6.3 steps/s and its teardown 0.05 vs 14-35 s; the 2.5D
  slice sampler 7 % slower (~870 vs ~930 slices/s, far above what a CPU trains on).
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options).as_numpy_iterator()


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  steps = num_examples // global_batch
  if steps == 0:
    raise ValueError(f'training split has {num_examples} examples, fewer than one batch of '
                     f'{global_batch}; lower train.batch_size')
  return steps


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def epoch_order(seed: int, epoch: int, num_examples: int, length: int) -> np.ndarray:
  """``length`` indices of epoch ``epoch``: the epoch's permutation, followed (when an epoch
  is longer than the data, as with few labelled examples) by further seeded permutations."""
  orders = [epoch_permutation(seed, epoch, num_examples)]
  while sum(map(len, orders)) < length:
    orders.append(np.random.default_rng([seed, epoch, 2, len(orders)]).permutation(num_examples))
  return np.concatenate(orders)[:length]


def balanced_epoch_order(seed: int, epoch: int, labels: np.ndarray,
                         length: int | None = None) -> np.ndarray:
  """``length`` (default ``N``) indices drawn with replacement so every class is equally
  likely (each example's probability is ``1 / (K * count of its class)``); deterministic in
  (seed, epoch)."""
  labels = np.asarray(labels).reshape(len(labels), -1)
  if labels.shape[1] != 1:
    raise ValueError('class-balanced sampling needs one class label per example '
                     '(not multi-label)')
  labels = labels[:, 0]
  classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
  probabilities = 1.0 / (len(classes) * counts[inverse])
  return np.random.default_rng([seed, epoch, 1]).choice(
      len(labels), size=length or len(labels), replace=True,
      p=probabilities / probabilities.sum())


def local_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  if global_batch % process_count:
    raise ValueError(f'batch size {global_batch} is not divisible by {process_count} processes')
  per_process = global_batch // process_count
  return slice(process_index * per_process, (process_index + 1) * per_process)


def _normalise(image: tf.Tensor, pixel_max: float, mean: float, std: float) -> tf.Tensor:
  return (tf.cast(image, tf.float32) / pixel_max - mean) / std


def _affine_2d(image: tf.Tensor, angle: tf.Tensor, zoom: tf.Tensor, shear: tf.Tensor,
               shift_y: tf.Tensor, shift_x: tf.Tensor) -> tf.Tensor:
  """Rotates by ``angle`` (radians), zooms by ``zoom``, shears x by ``shear`` (radians) about
  the centre and shifts by (``shift_y``, ``shift_x``) pixels, bilinear.

  ``image`` is ``[H, W, C]``; the output keeps the shape, borders are filled by reflection.
  """
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  cy, cx = (height - 1) / 2, (width - 1) / 2
  cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
  # Maps each output pixel (x, y) to the input pixel it samples from: the rotation/zoom's
  # inverse after the shear's inverse [[1, -tan], [0, 1]], about the shifted centre.
  tan = tf.tan(shear)
  a0, a1 = cos, -sin - cos * tan
  b0, b1 = sin, cos - sin * tan
  ox, oy = cx + shift_x, cy + shift_y
  transform = tf.stack([a0, a1, cx - a0 * ox - a1 * oy,
                        b0, b1, cy - b0 * ox - b1 * oy, 0.0, 0.0])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform[None], output_shape=tf.shape(image)[:2],
      fill_value=0.0, interpolation='BILINEAR', fill_mode='REFLECT')
  return out[0]


def _gaussian_blur_2d(image: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
  """Separable Gaussian blur of ``[H, W, C]`` with standard deviation ``sigma`` pixels (a
  kernel of ``2 * radius + 1`` taps, borders reflected); ``sigma`` ~ 0 leaves it as is."""
  taps = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-0.5 * tf.square(taps / tf.maximum(sigma, 1e-3)))
  kernel = kernel / tf.reduce_sum(kernel)
  channels = tf.shape(image)[-1]
  padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]],
                  mode='REFLECT')
  rows = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
  cols = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
  out = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], 'VALID')
  out = tf.nn.depthwise_conv2d(out, cols, [1, 1, 1, 1], 'VALID')
  return out[0]


def _cutout(image: tf.Tensor, size: float, u: tf.Tensor, v: tf.Tensor,
              spatial_dims: int) -> tf.Tensor:
  """Sets a square of side ``size`` x the image side (H, W axes), centred at a uniform
  position (``u``, ``v`` in [0, 1)) and clipped at the border, to 0 (the normalised mean
  grey), as in Cutout (DeVries & Taylor 2017) and FixMatch's strong augmentation."""
  shape = tf.shape(image)
  height, width = shape[spatial_dims - 2], shape[spatial_dims - 1]
  half_h = tf.cast(tf.cast(height, tf.float32) * size / 2, tf.int32)
  half_w = tf.cast(tf.cast(width, tf.float32) * size / 2, tf.int32)
  cy = tf.cast(u * tf.cast(height, tf.float32), tf.int32)
  cx = tf.cast(v * tf.cast(width, tf.float32), tf.int32)
  rows, cols = tf.range(height), tf.range(width)
  inside = (((rows >= cy - half_h) & (rows < cy + half_h))[:, None]
            & ((cols >= cx - half_w) & (cols < cx + half_w))[None, :])
  inside = tf.reshape(inside, tf.concat([tf.ones([spatial_dims - 2], tf.int32),
                                         [height, width, 1]], 0))
  return tf.where(inside, tf.zeros_like(image), image)


def make_augment_fn(aug: ml_collections.ConfigDict, spatial_dims: int,
                    key: str = 'data.augment'):
  """Returns ``fn(image [*spatial, C], seed [2]) -> image`` applying the configured ops.
  ``key``: the config key of ``aug``, named in errors.

  Order: flips, one affine map (rotation, zoom, shear, shift), brightness, contrast, blur,
  noise, cutout. With ``aug.op_prob < 1`` each of the affine map, brightness, contrast, blur
  and noise is applied with that probability (a RandAugment-like mix of ops per image);
  flips keep their one half and cutout is always applied.
  """
  geometric = (aug.rotation_deg > 0 or aug.scale_min != 1.0 or aug.scale_max != 1.0
               or aug.translate > 0 or aug.shear_deg > 0)
  if (geometric or aug.blur_sigma > 0) and spatial_dims != 2:
    raise ValueError(f'{key}.rotation_deg/scale_*/translate/shear_deg/blur_sigma are '
                     '2D-only; use flips and intensity ops for 3D data')
  if not 0.0 <= aug.cutout < 1.0:
    raise ValueError(f'{key}.cutout is a fraction of the image side in [0, 1), got '
                     f'{aug.cutout}')
  if aug.scale_min <= 0 or aug.scale_max < aug.scale_min:
    raise ValueError(f'{key} needs 0 < scale_min <= scale_max, got '
                     f'{aug.scale_min}, {aug.scale_max}')
  if not 0.0 <= aug.translate < 0.5:
    raise ValueError(f'{key}.translate is a fraction of the image side in [0, 0.5), '
                     f'got {aug.translate}')
  if not 0.0 <= aug.shear_deg < 60.0:
    raise ValueError(f'{key}.shear_deg must be in [0, 60), got {aug.shear_deg}')
  if aug.noise_std < 0 or aug.blur_sigma < 0:
    raise ValueError(f'{key}.noise_std and blur_sigma must be >= 0, got '
                     f'{aug.noise_std}, {aug.blur_sigma}')
  if not 0.0 < aug.op_prob <= 1.0:
    raise ValueError(f'{key}.op_prob must be in (0, 1], got {aug.op_prob}')
  blur_radius = max(1, int(math.ceil(3 * aug.blur_sigma)))

  def augment(image, seed):
    seeds = tf.random.experimental.stateless_split(seed, num=6)
    uniform = lambda i, lo=0.0, hi=1.0: tf.random.stateless_uniform(  # noqa: E731
        [], seeds[i], minval=lo, maxval=hi)
    # The ops added after the first six draw from their own seeds, so the first six draw
    # what they drew before (runs of earlier versions repeat exactly).
    more = tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(seed, 7), num=11)
    more_uniform = lambda i, lo=0.0, hi=1.0: tf.random.stateless_uniform(  # noqa: E731
        [], more[i], minval=lo, maxval=hi)

    def maybe(i, op, image):
      """``op()`` with probability ``aug.op_prob`` (gate ``i``), else ``image``."""
      if aug.op_prob == 1.0:
        return op()
      return tf.cond(more_uniform(5 + i) < aug.op_prob, op, lambda: image)

    width_axis, height_axis = spatial_dims - 1, spatial_dims - 2
    if aug.flip_lr:
      image = tf.cond(uniform(0) < 0.5, lambda: tf.reverse(image, [width_axis]), lambda: image)
    if aug.flip_ud:
      image = tf.cond(uniform(1) < 0.5, lambda: tf.reverse(image, [height_axis]), lambda: image)
    if geometric:
      angle = uniform(2, -aug.rotation_deg, aug.rotation_deg) * (math.pi / 180.0)
      zoom = uniform(3, aug.scale_min, aug.scale_max)
      shear = (more_uniform(0, -aug.shear_deg, aug.shear_deg) * (math.pi / 180.0)
               if aug.shear_deg > 0 else tf.constant(0.0))
      if aug.translate > 0:
        size = tf.cast(tf.shape(image), tf.float32)
        shift_y = more_uniform(1, -aug.translate, aug.translate) * size[0]
        shift_x = more_uniform(2, -aug.translate, aug.translate) * size[1]
      else:
        shift_y = shift_x = tf.constant(0.0)
      image = maybe(0, lambda: _affine_2d(image, angle, zoom, shear, shift_y, shift_x), image)
    if aug.brightness > 0:
      shift = uniform(4, -aug.brightness, aug.brightness)
      image = maybe(1, lambda: image + shift, image)
    if aug.contrast > 0:
      mean = tf.reduce_mean(image)
      factor = uniform(5, 1.0 - aug.contrast, 1.0 + aug.contrast)
      image = maybe(2, lambda: mean + (image - mean) * factor, image)
    if aug.blur_sigma > 0:
      sigma = more_uniform(3, 0.0, aug.blur_sigma)
      image = maybe(3, lambda: _gaussian_blur_2d(image, sigma, blur_radius), image)
    if aug.noise_std > 0:
      std = more_uniform(4, 0.0, aug.noise_std)
      noise = tf.random.stateless_normal(tf.shape(image), more[10]) * std
      image = maybe(4, lambda: image + noise, image)
    if aug.cutout > 0:  # its own seeds, so the other ops draw what they drew before cutout
      cut = tf.random.experimental.stateless_split(
          tf.random.experimental.stateless_fold_in(seed, 6), num=2)
      image = _cutout(image, aug.cutout, tf.random.stateless_uniform([], cut[0]),
                      tf.random.stateless_uniform([], cut[1]), spatial_dims)
    return image

  enabled = (aug.flip_lr or aug.flip_ud or geometric or aug.brightness > 0 or aug.contrast > 0
             or aug.blur_sigma > 0 or aug.noise_std > 0 or aug.cutout > 0)
  return augment if enabled else None


def train_batches(images: np.ndarray, labels: np.ndarray, *, global_batch: int, seed: int,
                  start_step: int, num_steps: int, pixel_max: float, mean: float, std: float,
                  augment: ml_collections.ConfigDict | None = None,
                  process_index: int = 0, process_count: int = 1,
                  class_balanced: bool = False,
                  epoch_steps: int | None = None) -> Iterator[Batch]:
  """Yields this process's share of training batches for steps ``[start_step, num_steps)``.

  Args:
    images: ``[N, *spatial, C]`` (uint8 or float), all training examples.
    labels: ``[N]`` int or ``[N, L]``.
    global_batch: examples per step over all processes.
    class_balanced: draw each epoch's examples so classes are equally frequent (with
      replacement) instead of a permutation.
    epoch_steps: steps per epoch when an epoch is not one pass over ``images`` (a few
      labelled examples trained for as many steps as the whole split would take); an epoch
      then continues with further seeded permutations (:func:`epoch_order`).
  Yields:
    (images float32 ``[B/P, *spatial, C]``, labels) as NumPy arrays.
  """
  n = len(images)
  spe = epoch_steps or steps_per_epoch(n, global_batch)
  length = spe * global_batch
  rows = local_rows(global_batch, process_index, process_count)
  spatial = images.ndim - 2
  augment_fn = make_augment_fn(augment, spatial) if augment is not None else None
  if start_step >= num_steps:
    return iter(())

  first_epoch, last_epoch = start_step // spe, (num_steps - 1) // spe
  index_chunks, epoch_chunks = [], []
  for epoch in range(first_epoch, last_epoch + 1):
    if class_balanced:
      order = balanced_epoch_order(seed, epoch, labels, max(length, n))
    else:
      order = epoch_order(seed, epoch, n, length)
    order = order[:length].reshape(spe, global_batch)
    lo = start_step - epoch * spe if epoch == first_epoch else 0
    hi = min(spe, num_steps - epoch * spe)
    order = order[lo:hi, rows].reshape(-1)
    index_chunks.append(order)
    epoch_chunks.append(np.full(order.shape, epoch, np.int64))
  indices = np.concatenate(index_chunks).astype(np.int64)
  epochs = np.concatenate(epoch_chunks)

  images_t = tf.constant(images)
  labels_t = tf.constant(labels)

  def load(index, epoch):
    image = _normalise(tf.gather(images_t, index), pixel_max, mean, std)
    if augment_fn is not None:
      key = tf.random.experimental.stateless_fold_in(
          tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), epoch),
          index)
      image = augment_fn(image, key)
    return image, tf.gather(labels_t, index)

  ds = tf.data.Dataset.from_tensor_slices((indices, epochs))
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(rows.stop - rows.start, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return numpy_batches(ds)


def unlabeled_stream(seed: int, num_examples: int, start: int, stop: int) -> np.ndarray:
  """Indices at positions ``[start, stop)`` of the endless unlabelled stream: seeded
  permutations of the ``num_examples`` images, one after another."""
  first, last = start // num_examples, (stop - 1) // num_examples
  passes = [np.random.default_rng([seed, 3, k]).permutation(num_examples)
            for k in range(first, last + 1)]
  offset = first * num_examples
  return np.concatenate(passes)[start - offset:stop - offset]


def unlabeled_batches(images: np.ndarray, *, global_batch: int, seed: int, start_step: int,
                      num_steps: int, pixel_max: float, mean: float, std: float,
                      weak: ml_collections.ConfigDict, strong: ml_collections.ConfigDict,
                      process_index: int = 0, process_count: int = 1,
                      strong_key: str = 'semi.strong_augment'
                      ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """Unlabelled images for steps ``[start_step, num_steps)``, each twice: weakly and strongly
  augmented (FixMatch's two views). Step ``s`` takes positions ``[s*B, (s+1)*B)`` of
  :func:`unlabeled_stream`; the views' randomness is keyed by (seed, view, position), so
  the batches follow the determinism contract of :func:`train_batches`.

  Args:
    images: ``[U, *spatial, C]`` unlabelled images (no labels exist here to leak).
    global_batch: unlabelled images per step over all processes.
    strong_key: the config key of ``strong``, named in its errors.
  Yields:
    (weak, strong) float32 ``[B/P, *spatial, C]`` each.
  """
  if start_step >= num_steps:
    return iter(())
  rows = local_rows(global_batch, process_index, process_count)
  spatial = images.ndim - 2
  weak_fn = make_augment_fn(weak, spatial)
  strong_fn = make_augment_fn(strong, spatial, strong_key)
  positions = np.arange(start_step * global_batch, num_steps * global_batch,
                        dtype=np.int64).reshape(-1, global_batch)[:, rows].reshape(-1)
  indices = unlabeled_stream(seed, len(images), start_step * global_batch,
                             num_steps * global_batch).reshape(-1, global_batch)[:, rows]
  indices = indices.reshape(-1)
  images_t = tf.constant(images)

  def view(image, fn, stream, position):
    if fn is None:
      return image
    key = tf.random.experimental.stateless_fold_in(tf.constant([seed, stream], tf.int64),
                                                    position)
    return fn(image, key)

  def load(index, position):
    image = _normalise(tf.gather(images_t, index), pixel_max, mean, std)
    return view(image, weak_fn, 1, position), view(image, strong_fn, 2, position)

  ds = tf.data.Dataset.from_tensor_slices((indices, positions))
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(rows.stop - rows.start, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return numpy_batches(ds)


def eval_batches(images: np.ndarray, labels: np.ndarray, *, global_batch: int,
                 pixel_max: float, mean: float, std: float, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Every example once, in order, padded to whole global batches.

  Yields:
    (images, labels) of this process's rows and the mask ``[global_batch]`` of the whole
    global batch: 1.0 for real examples and 0.0 for padding, so every example counts
    exactly once however many devices and processes there are.
  """
  n = len(images)
  if n == 0:
    raise ValueError('cannot evaluate an empty split')
  rows = local_rows(global_batch, process_index, process_count)
  num_batches = -(-n // global_batch)
  padded = np.zeros(num_batches * global_batch, np.int64)
  padded[:n] = np.arange(n)
  mask = np.zeros(num_batches * global_batch, np.float32)
  mask[:n] = 1.0
  padded = padded.reshape(num_batches, global_batch)[:, rows].reshape(-1)
  global_masks = mask.reshape(num_batches, global_batch)

  images_t = tf.constant(images)
  labels_t = tf.constant(labels)

  def load(index):
    image = _normalise(tf.gather(images_t, index), pixel_max, mean, std)
    return image, tf.gather(labels_t, index)

  ds = tf.data.Dataset.from_tensor_slices(padded)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(rows.stop - rows.start).prefetch(tf.data.AUTOTUNE)
  for (images_b, labels_b), global_mask in zip(numpy_batches(ds), global_masks):
    yield images_b, labels_b, global_mask
