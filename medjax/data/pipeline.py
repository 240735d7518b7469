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

from typing import Iterator, Tuple

import ml_collections
import numpy as np
import tensorflow as tf

from medjax.data.augment import make_augment_fn, normalise

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
    image = normalise(tf.gather(images_t, index), pixel_max, mean, std)
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
    image = normalise(tf.gather(images_t, index), pixel_max, mean, std)
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
    image = normalise(tf.gather(images_t, index), pixel_max, mean, std)
    return image, tf.gather(labels_t, index)

  ds = tf.data.Dataset.from_tensor_slices(padded)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(rows.stop - rows.start).prefetch(tf.data.AUTOTUNE)
  for (images_b, labels_b), global_mask in zip(numpy_batches(ds), global_masks):
    yield images_b, labels_b, global_mask
