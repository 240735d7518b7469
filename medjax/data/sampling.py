"""Patch and slice sampling with foreground oversampling and image+mask augmentation.

Determinism contract: training sample ``j`` of global step ``s`` is a pure function of
``(seed, s, j)``: which case (a seeded permutation of the cases per pass), whether it is a
foreground sample, where the patch lies and every augmentation parameter. A resumed run, and
any split of the batch over processes, therefore sees exactly the samples of an
uninterrupted single-process run.

Spatial augmentation (flip, rot90, rotation, scaling, elastic deformation) builds the
sampling coordinates of the output patch and interpolates them from the whole case, once
(as nnU-Net's batchgenerators do): image linear, mask nearest neighbour, zero outside the
volume. No border artefacts, and image and mask always move together.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Iterator, Optional, Sequence, Tuple

import ml_collections
import numpy as np
from scipy import ndimage

from medjax import config as config_lib
from medjax.data import host_workers as host_workers_lib
from medjax.data.nifti import resample_to_shape


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


@dataclasses.dataclass(frozen=True)
class SegAugment:
  """Probabilities (p_*) and ranges of the training augmentations; all off by default."""
  p_flip: float = 0.0               # per spatial axis
  p_rot90: float = 0.0              # in the plane of the last two spatial axes (equal sizes)
  p_rotate: float = 0.0
  rotate_deg: float = 15.0          # uniform in [-deg, deg] about each axis (one axis in 2D)
  p_scale: float = 0.0
  scale: Tuple[float, float] = (0.85, 1.25)
  p_elastic: float = 0.0
  elastic_alpha: float = 4.0        # displacement magnitude, voxels
  elastic_sigma: float = 3.0        # smoothness, voxels
  p_noise: float = 0.0
  noise_std: float = 0.1
  p_blur: float = 0.0
  blur_sigma: Tuple[float, float] = (0.5, 1.0)
  p_brightness: float = 0.0
  brightness: Tuple[float, float] = (0.75, 1.25)   # multiplicative
  p_contrast: float = 0.0
  contrast: Tuple[float, float] = (0.75, 1.25)
  p_gamma: float = 0.0
  gamma: Tuple[float, float] = (0.7, 1.5)
  p_lowres: float = 0.0
  lowres_zoom: Tuple[float, float] = (0.5, 1.0)

  @classmethod
  def nnunet_like(cls) -> 'SegAugment':
    """Probabilities close to nnU-Net's default training augmentation."""
    return cls(p_flip=0.5, p_rotate=0.2, p_scale=0.2, p_elastic=0.0, p_noise=0.1, p_blur=0.2,
               p_brightness=0.15, p_contrast=0.15, p_gamma=0.3, p_lowres=0.25)


def _rotation_matrix(angles: Sequence[float], nd: int) -> np.ndarray:
  if nd == 2:
    c, s = np.cos(angles[0]), np.sin(angles[0])
    return np.array([[c, -s], [s, c]])
  rot = np.eye(3)
  for axis, angle in enumerate(angles):
    c, s = np.cos(angle), np.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    rot = rot @ r
  return rot


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
  nd = label.ndim
  patch = np.asarray(patch_size, np.float64)
  if len(patch) != nd:
    raise ValueError(f'patch_size {tuple(patch_size)} has {len(patch)} axes, case has {nd}')
  centre = _choose_centre(label, locations, foreground, patch, rng)
  grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2.0 for n in patch_size],
                              indexing='ij'), axis=0)  # [nd, *patch]
  offsets = grid.reshape(nd, -1)
  matrix = np.eye(nd)
  if rng.random() < augment.p_rotate:
    angles = rng.uniform(-1, 1, 1 if nd == 2 else 3) * np.deg2rad(augment.rotate_deg)
    matrix = _rotation_matrix(angles, nd) @ matrix
  if rng.random() < augment.p_scale:
    matrix = matrix / rng.uniform(*augment.scale)  # zoom in by factor s: sample closer points
  for axis in range(nd):
    if rng.random() < augment.p_flip:
      matrix[:, axis] = -matrix[:, axis]
  if (rng.random() < augment.p_rot90 and patch_size[-1] == patch_size[-2]):
    k = int(rng.integers(1, 4))
    rot = np.eye(nd)
    c, s = np.round(np.cos(k * np.pi / 2)), np.round(np.sin(k * np.pi / 2))
    rot[nd - 2:, nd - 2:] = [[c, -s], [s, c]]
    matrix = matrix @ rot
  coords = matrix @ offsets
  if rng.random() < augment.p_elastic:
    shape = tuple(int(n) for n in patch_size)
    displacement = [ndimage.gaussian_filter(rng.uniform(-1, 1, shape), augment.elastic_sigma)
                    for _ in range(nd)]
    displacement = np.stack([d / (np.abs(d).max() + 1e-8) for d in displacement])
    coords = coords + augment.elastic_alpha * displacement.reshape(nd, -1)
  coords = coords + centre[:, None]
  out_shape = tuple(int(n) for n in patch_size)
  image_patch = np.stack([
      ndimage.map_coordinates(np.asarray(image[..., c], np.float32), coords, order=1,
                              mode='constant', cval=0.0).reshape(out_shape)
      for c in range(image.shape[-1])], axis=-1)
  label_patch = ndimage.map_coordinates(np.asarray(label), coords, order=0, mode='constant',
                                        cval=0).reshape(out_shape).astype(np.int32)
  return _intensity_augment(image_patch, augment, rng), label_patch


def _intensity_augment(x: np.ndarray, aug: SegAugment, rng: np.random.Generator) -> np.ndarray:
  spatial = x.ndim - 1
  if rng.random() < aug.p_noise:
    x = x + rng.normal(0.0, aug.noise_std, x.shape).astype(np.float32)
  if rng.random() < aug.p_blur:
    sigma = rng.uniform(*aug.blur_sigma)
    x = ndimage.gaussian_filter(x, sigma=[sigma] * spatial + [0])
  if rng.random() < aug.p_brightness:
    x = x * rng.uniform(*aug.brightness)
  if rng.random() < aug.p_contrast:
    mean = x.mean(axis=tuple(range(spatial)), keepdims=True)
    x = (x - mean) * rng.uniform(*aug.contrast) + mean
  if rng.random() < aug.p_gamma:
    lo = x.min(axis=tuple(range(spatial)), keepdims=True)
    span = x.max(axis=tuple(range(spatial)), keepdims=True) - lo + 1e-8
    x = ((x - lo) / span) ** rng.uniform(*aug.gamma) * span + lo
  if rng.random() < aug.p_lowres:
    # Nearest-neighbour downsampling, linear upsampling back to the patch grid.
    zoom = rng.uniform(*aug.lowres_zoom)
    small_shape = [max(1, int(round(n * zoom))) for n in x.shape[:spatial]]
    x = np.stack([resample_to_shape(resample_to_shape(x[..., c], small_shape, order=0),
                                    x.shape[:spatial], order=1)
                  for c in range(x.shape[-1])], axis=-1)
  return x.astype(np.float32)


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
  """

  def __init__(self, cases: Dict[str, Tuple[np.ndarray, np.ndarray, Dict]],
               patch_size: Sequence[int], global_batch: int, seed: int,
               foreground_fraction: float = 1 / 3, augment: SegAugment = SegAugment(),
               slice_axis: Optional[int] = None, skip_empty_slices: bool = False,
               slice_context: int = 0, host_workers: int = 0):
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
    self.slice_axis = slice_axis
    self.host_workers = host_workers_lib.worker_count(host_workers)
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
    return sample(image, label, locations, self.patch_size, foreground, rng, self.augment)

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


def auto_patch_size(prepared, slice_axis, stride: int, cap_3d: int = 128,
                    cap_2d: int = 512) -> Tuple[int, ...]:
  """The median prepared case shape (a slice of it for 2D slices), rounded up to a multiple
  of the network's total stride (``stride``) and capped per axis (128 voxels in 3D, 512 pixels in 2D)."""
  shapes = np.array([r['shape'] for r in prepared.records.values()])
  median = np.median(shapes, axis=0)
  if slice_axis is not None:
    median = np.delete(median, slice_axis)
  cap = cap_3d if len(median) == 3 else cap_2d
  return tuple(int(min(cap, stride * math.ceil(m / stride))) for m in median)
