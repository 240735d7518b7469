"""Segmentation patches' augmentation on the host (NumPy/SciPy): the parameters of one patch
drawn from a NumPy generator (:func:`draw_params`), and applied to a case (:func:`apply`).

Split in two so the device version (:mod:`medjax.data.device_augment`) can be checked
against it with the same parameters. The draws are those of the sampler before the split,
in the same order, so a seed gives the same patches as before.

Spatial augmentation (flip, rot90, rotation, scaling, elastic deformation) builds the
sampling coordinates of the output patch and interpolates them from the whole case, once
(as nnU-Net's batchgenerators do): image linear, mask nearest neighbour, zero outside the
volume. :func:`crop_half_extent` bounds how far those coordinates reach from the centre,
so a crop of that size around the centre holds everything a patch can read.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Sequence, Tuple

import numpy as np
from scipy import ndimage

from medjax.data.nifti import resample_to_shape


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


# The intensity ops in the order they are applied, each with its gate's name.
INTENSITY_OPS = ('noise', 'blur', 'brightness', 'contrast', 'gamma', 'lowres')


def rotation_matrix(angles: Sequence[float], nd: int) -> np.ndarray:
  """``[nd, nd]``: one angle (radians) in 2D; in 3D the product of the rotations about
  axes 0, 1, 2 by ``angles[0..2]``."""
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


def rot90_matrix(k: int, nd: int) -> np.ndarray:
  """``[nd, nd]``: ``k`` quarter turns in the plane of the last two axes."""
  rot = np.eye(nd)
  c, s = np.round(np.cos(k * np.pi / 2)), np.round(np.sin(k * np.pi / 2))
  rot[nd - 2:, nd - 2:] = [[c, -s], [s, c]]
  return rot


def draw_params(rng: np.random.Generator, augment: SegAugment, patch_size: Sequence[int],
                channels: int) -> Dict[str, Any]:
  """Every random parameter of one patch (after its centre), drawn in the sampler's order.

  Returns a dict: a bool gate per op (``rotate``, ``scale``, ``flip`` ``[nd]``, ``rot90``
  (quarter turns, 0 = none), ``elastic``, and :data:`INTENSITY_OPS`) and the values the
  applied ops use: ``angles`` (radians, 1 in 2D, 3 in 3D), ``scale_factor``,
  ``elastic_noise`` ``[nd, *patch]`` (uniform in [-1, 1], before smoothing), ``noise``
  ``[*patch, C]`` (already times ``noise_std``), ``blur_sigma``, ``brightness_factor``,
  ``contrast_factor``, ``gamma_value``, ``lowres_zoom``. A value of an op that is off is
  absent (none was drawn)."""
  nd = len(patch_size)
  shape = tuple(int(n) for n in patch_size)
  p: Dict[str, Any] = {}
  p['rotate'] = bool(rng.random() < augment.p_rotate)
  if p['rotate']:
    p['angles'] = rng.uniform(-1, 1, 1 if nd == 2 else 3) * np.deg2rad(augment.rotate_deg)
  p['scale'] = bool(rng.random() < augment.p_scale)
  if p['scale']:
    p['scale_factor'] = rng.uniform(*augment.scale)
  p['flip'] = np.array([rng.random() < augment.p_flip for _ in range(nd)])
  p['rot90'] = 0
  if rng.random() < augment.p_rot90 and shape[-1] == shape[-2]:
    p['rot90'] = int(rng.integers(1, 4))
  p['elastic'] = bool(rng.random() < augment.p_elastic)
  if p['elastic']:
    p['elastic_noise'] = np.stack([rng.uniform(-1, 1, shape) for _ in range(nd)])
  p['noise'] = bool(rng.random() < augment.p_noise)
  if p['noise']:
    p['noise_values'] = rng.normal(0.0, augment.noise_std, shape + (channels,)).astype(
        np.float32)
  for name, attr, value in (('blur', 'blur_sigma', 'blur_sigma'),
                            ('brightness', 'brightness', 'brightness_factor'),
                            ('contrast', 'contrast', 'contrast_factor'),
                            ('gamma', 'gamma', 'gamma_value'),
                            ('lowres', 'lowres_zoom', 'lowres_zoom')):
    p[name] = bool(rng.random() < getattr(augment, f'p_{name}'))
    if p[name]:
      p[value] = rng.uniform(*getattr(augment, attr))
  return p


def patch_offsets(patch_size: Sequence[int]) -> np.ndarray:
  """``[nd, prod(patch)]``: each output voxel's offset from the patch centre."""
  grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2.0 for n in patch_size],
                              indexing='ij'), axis=0)
  return grid.reshape(len(patch_size), -1)


def sampling_coords(centre: np.ndarray, p: Dict[str, Any], augment: SegAugment,
                    patch_size: Sequence[int]) -> np.ndarray:
  """``[nd, prod(patch)]``: where each output voxel reads the case."""
  nd = len(patch_size)
  matrix = np.eye(nd)
  if p['rotate']:
    matrix = rotation_matrix(p['angles'], nd) @ matrix
  if p['scale']:
    matrix = matrix / p['scale_factor']  # zoom in by factor s: sample closer points
  for axis in range(nd):
    if p['flip'][axis]:
      matrix[:, axis] = -matrix[:, axis]
  if p['rot90']:
    matrix = matrix @ rot90_matrix(p['rot90'], nd)
  coords = matrix @ patch_offsets(patch_size)
  if p['elastic']:
    displacement = [ndimage.gaussian_filter(n, augment.elastic_sigma)
                    for n in p['elastic_noise']]
    displacement = np.stack([d / (np.abs(d).max() + 1e-8) for d in displacement])
    coords = coords + augment.elastic_alpha * displacement.reshape(nd, -1)
  return coords + centre[:, None]


def apply(image: np.ndarray, label: np.ndarray, centre: np.ndarray, p: Dict[str, Any],
          augment: SegAugment, patch_size: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
  """The patch of parameters ``p`` (:func:`draw_params`) centred at ``centre`` of a case
  (image ``[*spatial, C]``, label ``[*spatial]``): (image ``[*patch, C]`` float32, label
  ``[*patch]`` int32)."""
  coords = sampling_coords(centre, p, augment, patch_size)
  out_shape = tuple(int(n) for n in patch_size)
  image_patch = np.stack([
      ndimage.map_coordinates(np.asarray(image[..., c], np.float32), coords, order=1,
                              mode='constant', cval=0.0).reshape(out_shape)
      for c in range(image.shape[-1])], axis=-1)
  label_patch = ndimage.map_coordinates(np.asarray(label), coords, order=0, mode='constant',
                                        cval=0).reshape(out_shape).astype(np.int32)
  return intensity(image_patch, p), label_patch


def intensity(x: np.ndarray, p: Dict[str, Any]) -> np.ndarray:
  """The intensity ops of ``p`` applied to a patch ``[*patch, C]``, in
  :data:`INTENSITY_OPS` order."""
  spatial = x.ndim - 1
  if p['noise']:
    x = x + p['noise_values']
  if p['blur']:
    x = ndimage.gaussian_filter(x, sigma=[p['blur_sigma']] * spatial + [0])
  if p['brightness']:
    x = x * p['brightness_factor']
  if p['contrast']:
    mean = x.mean(axis=tuple(range(spatial)), keepdims=True)
    x = (x - mean) * p['contrast_factor'] + mean
  if p['gamma']:
    lo = x.min(axis=tuple(range(spatial)), keepdims=True)
    span = x.max(axis=tuple(range(spatial)), keepdims=True) - lo + 1e-8
    x = ((x - lo) / span) ** p['gamma_value'] * span + lo
  if p['lowres']:
    # Nearest-neighbour downsampling, linear upsampling back to the patch grid.
    zoom = p['lowres_zoom']
    small_shape = [max(1, int(round(n * zoom))) for n in x.shape[:spatial]]
    x = np.stack([resample_to_shape(resample_to_shape(x[..., c], small_shape, order=0),
                                    x.shape[:spatial], order=1)
                  for c in range(x.shape[-1])], axis=-1)
  return x.astype(np.float32)


def _abs_rotation_bound(max_angle: float, nd: int) -> np.ndarray:
  """``[nd, nd]``: an entrywise bound on ``|R|`` over the rotations :func:`draw_params`
  can draw (each angle in [-max_angle, max_angle]): ``|cos| <= 1``, ``|sin| <= sin(max)``,
  and ``|AB| <= |A||B|`` for the 3D product."""
  s = 1.0 if max_angle >= math.pi / 2 else math.sin(max_angle)
  if nd == 2:
    return np.array([[1.0, s], [s, 1.0]])
  bound = np.eye(3)
  for axis in range(3):
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, j] = r[j, i] = s
    bound = bound @ r
  return bound


def crop_half_extent(augment: SegAugment, patch_size: Sequence[int]) -> np.ndarray:
  """``[nd]`` int: a crop of ``2 E + 2`` voxels per axis, from ``floor(centre) - E``,
  holds every voxel (and linear neighbour) any patch of ``augment`` centred there reads:
  the patch's half size, widened by the largest rotation, the smallest scale and the
  elastic displacement, plus one voxel."""
  half = (np.asarray(patch_size, np.float64) - 1) / 2.0
  nd = len(half)
  extent = half
  if augment.p_rotate > 0:
    extent = _abs_rotation_bound(np.deg2rad(abs(augment.rotate_deg)), nd) @ half
  if augment.p_scale > 0:
    extent = extent / min(1.0, min(augment.scale))
  if augment.p_elastic > 0:
    extent = extent + abs(augment.elastic_alpha)
  return np.ceil(extent - 1e-9).astype(np.int64) + 1


def crop_case(image: np.ndarray, label: np.ndarray, centre: np.ndarray, half: np.ndarray
              ) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
  """The crop of a case that a patch centred at ``centre`` reads (:func:`crop_half_extent`
  ``half``), zero outside the case (prepared label maps are uint8).

  Returns (image ``[*(2 half + 2), C]`` float32, ``{'label': [*(2 half + 2)] uint8,
  'centre': [nd], 'low': [nd], 'high': [nd]}``): the centre, and the case's first and last
  voxel, in the crop's voxel coordinates (float32); a patch reads zero outside them."""
  shape = np.array(label.shape)
  origin = np.floor(centre).astype(np.int64) - half
  size = 2 * half + 2
  lo = np.clip(origin, 0, shape)
  hi = np.clip(origin + size, 0, shape)
  inner = tuple(slice(a, b) for a, b in zip(lo, hi))
  place = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin))
  image_crop = np.zeros(tuple(size) + image.shape[-1:], np.float32)
  label_crop = np.zeros(tuple(size), np.uint8)
  image_crop[place] = image[inner]
  label_crop[place] = label[inner]
  return image_crop, {'label': label_crop, 'centre': (centre - origin).astype(np.float32),
                      'low': (-origin).astype(np.float32),
                      'high': (shape - 1 - origin).astype(np.float32)}
