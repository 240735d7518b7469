"""Patch and slice sampling with foreground oversampling and image+mask augmentation.

Determinism contract: training sample ``j`` of global step ``s`` is a pure function of
``(seed, s, j)``: which case (a seeded permutation of the cases per pass), whether it is a
foreground sample, where the patch lies and every augmentation parameter. A resumed run, and
any split of the batch over processes, therefore sees exactly the samples of an
uninterrupted single-process run.

Augmentation (:mod:`medjax.data.seg_augment`) interpolates each patch from the whole case,
once: no border artefacts, and image and mask always move together. With
``data.augment_on='device'`` the sampler only crops (around the same centre, with the margin
the augmentation needs, :func:`medjax.data.seg_augment.crop_case`) and the train step
augments (:mod:`medjax.data.device_augment`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Iterator, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from medjax import config as config_lib
from medjax.data import host_workers as host_workers_lib, seg_augment
from medjax.data.seg_augment import SegAugment


@config_lib.declare
def _defaults(c) -> None:
  d = config_lib.section(c, 'data')
  d.patch_size = (40, 56, 40)    # () = from the data (median shape, see auto_patch_size)
  d.slice_axis = -1              # -1: patches of the data's dimensionality; 0/1/2: 2D slices
  d.skip_empty_slices = False
  d.slice_context = 0            # 2.5D: neighbouring slices on each side as channels
  d.foreground_fraction = 1.0 / 3.0
  # Segmentation patches' augmentation: the probabilities and ranges of SegAugment.
  d.seg_augment = ml_collections.ConfigDict(dataclasses.asdict(SegAugment()))

# A label value no loss counts (seg_losses' ignore_label): the voxels of a pseudo-label map
# that the teacher was unsure of. Above any class index of a uint8 label map.
IGNORE_LABEL = 255


def _choose_centre(label: np.ndarray, locations: Dict[str, np.ndarray], foreground: bool,
                   patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  shape = np.array(label.shape)
  if foreground and locations:
    cls = sorted(locations)[rng.integers(len(locations))]  # classes equally often
    coords = locations[cls]
    return coords[rng.integers(len(coords))].astype(np.float64)
  # Uniform over positions that keep the patch inside the volume where it fits.
  low = np.minimum((patch - 1) / 2.0, (shape - 1) / 2.0)
  high = np.maximum(shape - 1 - (patch - 1) / 2.0, low)
  return rng.uniform(low, high)


def sample(image: np.ndarray, label: np.ndarray, locations: Dict[str, np.ndarray],
           patch_size: Sequence[int], foreground: bool, rng: np.random.Generator,
           augment: SegAugment = SegAugment()) -> Tuple[np.ndarray, np.ndarray]:
  """One training patch.

  Args:
    image: ``[*spatial, C]`` float32 case.
    label: ``[*spatial]`` integer case.
    locations: class -> foreground voxel coordinates ``[M, nd]``.
    patch_size: output spatial size.
    foreground: centre the patch on a voxel of a (uniformly chosen) foreground class.
  Returns:
    (image patch ``[*patch_size, C]`` float32, label patch ``[*patch_size]`` int32).
  """
  centre = patch_centre(label, locations, patch_size, foreground, rng)
  params = seg_augment.draw_params(rng, augment, patch_size, image.shape[-1])
  return seg_augment.apply(image, label, centre, params, augment, patch_size)


def patch_centre(label: np.ndarray, locations: Dict[str, np.ndarray],
                 patch_size: Sequence[int], foreground: bool, rng: np.random.Generator
                 ) -> np.ndarray:
  """``[nd]`` float64: the centre of a training patch (the first draws of :func:`sample`)."""
  patch = np.asarray(patch_size, np.float64)
  if len(patch) != label.ndim:
    raise ValueError(f'patch_size {tuple(patch_size)} has {len(patch)} axes, case has '
                     f'{label.ndim}')
  return _choose_centre(label, locations, foreground, patch, rng)


def slice_with_context(image: np.ndarray, axis: int, index: int, context: int) -> np.ndarray:
  """Slice ``index`` along spatial ``axis`` of ``image`` ``[*spatial, C]`` with its
  ``context`` neighbours on each side as channels (2.5D): ``[*slice, (2 context + 1) C]``,
  the slices ``index - context .. index + context`` in that order, each with its ``C``
  channels; a neighbour outside the volume is zeros (as the sampler's patches are outside
  it)."""
  depth = image.shape[axis]
  parts = []
  for offset in range(-context, context + 1):
    i = index + offset
    parts.append(np.take(image, i, axis=axis) if 0 <= i < depth else
                 np.zeros(np.delete(image.shape, axis), image.dtype))
  return np.concatenate(parts, axis=-1)


def slice_stack(image: np.ndarray, axis: int, context: int = 0) -> np.ndarray:
  """Every slice along spatial ``axis`` of ``image`` ``[*spatial, C]`` as a batch ``[M,
  *slice, (2 context + 1) C]``: row ``i`` is :func:`slice_with_context` ``(image, axis, i,
  context)``."""
  slices = np.moveaxis(np.asarray(image), axis, 0)  # [M, *slice, C]
  if not context:
    return slices
  padded = np.pad(slices, [(context, context)] + [(0, 0)] * (slices.ndim - 1))
  depth = len(slices)
  return np.concatenate([padded[k:k + depth] for k in range(2 * context + 1)], axis=-1)


def take_slice(image: np.ndarray, label: np.ndarray, locations: Dict[str, np.ndarray],
               axis: int, index: int, context: int = 0):
  """The 2D slice ``index`` along spatial ``axis`` of a 3D case (with ``context``
  neighbouring slices on each side as channels, :func:`slice_with_context`), with its
  class locations (those of the centre slice, which the label is)."""
  image2d = slice_with_context(image, axis, index, context)
  label2d = np.take(label, index, axis=axis)
  keep = [a for a in range(3) if a != axis]
  locs = {}
  for cls, coords in locations.items():
    on_slice = coords[coords[:, axis] == index][:, keep]
    if len(on_slice):
      locs[cls] = on_slice
  return image2d, label2d, locs


def foreground_count(batch: int, fraction: float) -> int:
  """Samples of each batch forced to foreground: the last ``round(batch * fraction)``."""
  return int(round(batch * fraction))


class SegmentationSampler:
  """Training samples ``(step, j)`` from prepared cases, deterministically.

  Args:
    cases: case id -> (image, label, locations) (memory-mapped arrays are fine).
    patch_size: spatial size of each sample (2D if ``slice_axis`` is set).
    global_batch: samples per step over all processes.
    seed: the run's seed.
    foreground_fraction: share of each batch centred on foreground (default one third,
      as nnU-Net).
    slice_axis: sample 2D slices along this axis of 3D cases (None: patches of the case's
      own dimensionality).
    skip_empty_slices: draw slices only among those with foreground.
    slice_context: with ``slice_axis``, this many neighbouring slices on each side join
      each slice as channels (2.5D, :func:`slice_with_context`); the label is the centre
      slice's.
    host_workers: :meth:`batches` draws the samples in this many worker processes (0: in
      this process through tf.data; -1: one per core), :mod:`medjax.data.host_workers`.
    augment_on: 'host': samples are augmented patches; 'device': crops around the same
      centres that hold what any augmented patch reads, with their centres and the case
      bounds (:func:`medjax.data.seg_augment.crop_case`), for the train step to augment.
  """

  def __init__(self, cases: Dict[str, Tuple[np.ndarray, np.ndarray, Dict]],
               patch_size: Sequence[int], global_batch: int, seed: int,
               foreground_fraction: float = 1 / 3, augment: SegAugment = SegAugment(),
               slice_axis: Optional[int] = None, skip_empty_slices: bool = False,
               slice_context: int = 0, host_workers: int = 0, augment_on: str = 'host'):
    if not cases:
      raise ValueError('no training cases')
    if slice_context and slice_axis is None:
      raise ValueError('slice_context needs slice_axis: neighbouring slices are 2D inputs')
    self.slice_context = int(slice_context)
    self.case_ids = sorted(cases)
    self.cases = cases
    self.patch_size = tuple(int(p) for p in patch_size)
    self.global_batch = global_batch
    self.seed = seed
    self.num_foreground = foreground_count(global_batch, foreground_fraction)
    self.augment = augment
    self.crop_half = (seg_augment.crop_half_extent(augment, self.patch_size)
                      if augment_on == 'device' else None)
    self.slice_axis = slice_axis
    self.host_workers = host_workers_lib.worker_count(host_workers)
    if self.host_workers and augment_on == 'device':
      # Crops with their centres are not what the workers hand back; and with the
      # augmentation on the device the host's share is small (benchmarks/device_augment.py).
      raise ValueError('data.host_workers needs data.augment_on=host (with augment_on=device '
                       'the host only crops; use data.host_workers=0)')
    if slice_axis is not None:
      self.slices = {}
      for cid in self.case_ids:
        label = cases[cid][1]
        if skip_empty_slices:
          other = tuple(a for a in range(label.ndim) if a != slice_axis)
          label = np.asarray(label)
          foreground = (label > 0) & (label != IGNORE_LABEL)
          idx = np.flatnonzero(foreground.any(axis=other))
          self.slices[cid] = idx if len(idx) else np.arange(label.shape[slice_axis])
        else:
          self.slices[cid] = np.arange(label.shape[slice_axis])

  def case_for(self, step: int, j: int) -> str:
    flat = step * self.global_batch + j
    n = len(self.case_ids)
    order = np.random.default_rng([self.seed, 1, flat // n]).permutation(n)
    return self.case_ids[order[flat % n]]

  def __call__(self, step: int, j: int) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self.seed, 2, step, j])
    case_id = self.case_for(step, j)
    image, label, locations = self.cases[case_id]
    foreground = j >= self.global_batch - self.num_foreground
    if self.slice_axis is not None:
      choices = self.slices[case_id]
      if foreground and locations:
        cls = sorted(locations)[rng.integers(len(locations))]
        index = int(locations[cls][rng.integers(len(locations[cls])), self.slice_axis])
      else:
        index = int(choices[rng.integers(len(choices))])
      image, label, locations = take_slice(image, label, locations, self.slice_axis, index,
                                           self.slice_context)
    if self.crop_half is None:
      return sample(image, label, locations, self.patch_size, foreground, rng, self.augment)
    centre = patch_centre(label, locations, self.patch_size, foreground, rng)
    return seg_augment.crop_case(image, label, centre, self.crop_half)

  def shared_options(self) -> Dict:
    """The keyword arguments another stream of samples like these takes (augmentation,
    slicing, worker processes): e.g. the unlabelled cases' of semi-supervised training."""
    return dict(augment=self.augment, slice_axis=self.slice_axis,
                slice_context=self.slice_context, host_workers=self.host_workers)

  def batches(self, start_step: int, num_steps: int, process_index: int = 0,
              process_count: int = 1, num_workers: int = 0) -> Iterator[Tuple[np.ndarray, ...]]:
    """This process's rows of steps ``[start_step, num_steps)``: drawn by
    ``host_workers`` processes, or with none in this process through tf.data
    (``num_workers`` parallel calls; 0 = tf.data's default, about one per core)."""
    from medjax.data.pipeline import local_rows
    rows = local_rows(self.global_batch, process_index, process_count)
    channels = next(iter(self.cases.values()))[0].shape[-1] * (2 * self.slice_context + 1)
    if self.host_workers:
      return host_workers_lib.WorkerBatches(self, start_step, num_steps, rows,
                                            self.host_workers, self.patch_size + (channels,),
                                            self.patch_size)
    import tensorflow as tf
    from medjax.data.pipeline import numpy_batches
    steps = np.arange(start_step, num_steps)
    js = np.arange(rows.start, rows.stop)
    pairs = np.stack(np.meshgrid(steps, js, indexing='ij'), -1).reshape(-1, 2).astype(np.int64)

    def load(pair):
      if self.crop_half is not None:
        return self._load_crop(pair, channels)
      def fn(p):
        return self(int(p[0]), int(p[1]))
      image, label = tf.numpy_function(fn, [pair], (tf.float32, tf.int32))
      image.set_shape(self.patch_size + (channels,))
      label.set_shape(self.patch_size)
      return image, label

    ds = tf.data.Dataset.from_tensor_slices(pairs)
    ds = ds.map(load, num_parallel_calls=num_workers or tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(rows.stop - rows.start, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return numpy_batches(ds)

  def _load_crop(self, pair, channels: int):
    """``(crop, {'label', 'centre', 'low', 'high'})`` of sample ``pair`` as tf tensors."""
    import tensorflow as tf
    def fn(p):
      crop, targets = self(int(p[0]), int(p[1]))
      return (crop,) + tuple(targets[k] for k in CROP_TARGETS)
    out = tf.numpy_function(fn, [pair], (tf.float32, tf.uint8, tf.float32, tf.float32,
                                         tf.float32))
    size = tuple(int(n) for n in 2 * self.crop_half + 2)
    for tensor, shape in zip(out, (size + (channels,), size) + ((len(size),),) * 3):
      tensor.set_shape(shape)
    return out[0], dict(zip(CROP_TARGETS, out[1:]))


# What a device-augmented segmentation batch's targets hold besides the crop itself.
CROP_TARGETS = ('label', 'centre', 'low', 'high')


def auto_patch_size(prepared, slice_axis, stride: int, cap_3d: int = 128,
                    cap_2d: int = 512) -> Tuple[int, ...]:
  """The median prepared case shape (a slice of it for 2D slices), rounded up to a multiple
  of the network's total stride (``stride``) and capped per axis (128 voxels in 3D, 512
  pixels in 2D)."""
  shapes = np.array([r['shape'] for r in prepared.records.values()])
  median = np.median(shapes, axis=0)
  if slice_axis is not None:
    median = np.delete(median, slice_axis)
  cap = cap_3d if len(median) == 3 else cap_2d
  return tuple(int(min(cap, stride * math.ceil(m / stride))) for m in median)
