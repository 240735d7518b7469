"""Segmentation augmentation inside the jitted train step (``data.augment_on='device'``).

The host sends crops around each patch's centre (:func:`medjax.data.seg_augment.crop_case`)
and this module turns them into augmented patches on the accelerator with the semantics and
parameter ranges of the host code (:mod:`medjax.data.seg_augment`): the patch's sampling
coordinates (rotation, scaling, flips, rot90, elastic deformation) are interpolated from the
crop once, image linear and labels nearest neighbour, zero outside the case; then noise,
blur, brightness, contrast, gamma and simulated low resolution, in that order.

Two functions, as on the host: :func:`draw_params` (a pytree of ``[B, ...]`` arrays, each
example's from its own key: :func:`example_keys`, a pure function of the key and the
example's index in the global batch, so neither resume nor the split over devices changes
them) and :func:`apply` (given parameters; :func:`host_params_batch` turns the host's into
them, for the equivalence tests). An op whose probability is 0 is left out of the program.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from medjax.data.seg_augment import INTENSITY_OPS, SegAugment, patch_offsets

# Values an op that is off leaves in the parameters (and a host draw that skipped it gets).
_NEUTRAL = {'scale_factor': 1.0, 'blur_sigma': 0.0, 'brightness_factor': 1.0,
            'contrast_factor': 1.0, 'gamma_value': 1.0, 'lowres_zoom': 1.0}


def example_keys(key: jax.Array, batch: int) -> jax.Array:
  """``[B]`` keys: ``fold_in(key, j)`` for example ``j`` of the global batch."""
  return jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(batch))


def draw_params(keys: jax.Array, augment: SegAugment, patch_size: Sequence[int],
                channels: int) -> Dict[str, jax.Array]:
  """Each example's parameters, ``[B, ...]`` per entry, from its key ``keys[j]``: the
  entries of :func:`medjax.data.seg_augment.draw_params` (gates and values, with the same
  probabilities and ranges; a value of an op that is off is neutral)."""
  return jax.vmap(lambda k: _draw_one(k, augment, tuple(patch_size), channels))(keys)


def _draw_one(key, augment: SegAugment, patch: Tuple[int, ...], channels: int):
  nd = len(patch)
  scalar_key, elastic_key, noise_key = jax.random.split(key, 3)
  # Every scalar from one call: each random-bits call is a program of its own to compile.
  scalars = iter(jax.random.uniform(scalar_key, (_NUM_SCALARS,)))

  def uniform(lo_hi):
    return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * next(scalars)

  p = {}
  p['rotate'] = next(scalars) < augment.p_rotate
  angles = jnp.stack([uniform((-1.0, 1.0)) for _ in range(1 if nd == 2 else 3)])
  p['angles'] = jnp.where(p['rotate'], angles * math.radians(augment.rotate_deg), 0.0)
  p['scale'] = next(scalars) < augment.p_scale
  p['scale_factor'] = jnp.where(p['scale'], uniform(augment.scale), 1.0)
  p['flip'] = jnp.stack([next(scalars) < augment.p_flip for _ in range(nd)])
  rot90_gate = (next(scalars) < augment.p_rot90) & (patch[-1] == patch[-2])
  quarter_turns = jnp.minimum(jnp.floor(uniform((1.0, 4.0))), 3).astype(jnp.int32)
  p['rot90'] = jnp.where(rot90_gate, quarter_turns, 0)
  p['elastic'] = next(scalars) < augment.p_elastic
  if augment.p_elastic > 0:
    p['elastic_noise'] = jax.random.uniform(elastic_key, (nd,) + patch, minval=-1.0,
                                            maxval=1.0)
  p['noise'] = next(scalars) < augment.p_noise
  if augment.p_noise > 0:
    p['noise_values'] = augment.noise_std * jax.random.normal(noise_key, patch + (channels,))
  for name, attr, value in (('blur', 'blur_sigma', 'blur_sigma'),
                            ('brightness', 'brightness', 'brightness_factor'),
                            ('contrast', 'contrast', 'contrast_factor'),
                            ('gamma', 'gamma', 'gamma_value'),
                            ('lowres', 'lowres_zoom', 'lowres_zoom')):
    p[name] = next(scalars) < getattr(augment, f'p_{name}')
    p[value] = jnp.where(p[name], uniform(getattr(augment, attr)), _NEUTRAL[value])
  return p


# Scalars one example draws (at most): gates, angles, flips, scale, quarter turns, values.
_NUM_SCALARS = 24


def host_params_batch(params: Sequence[Dict[str, Any]], augment: SegAugment,
                      patch_size: Sequence[int], channels: int) -> Dict[str, np.ndarray]:
  """Host parameters (:func:`medjax.data.seg_augment.draw_params`, one dict per example)
  as :func:`apply` takes them: stacked ``[B, ...]``, neutral values for ops that are off."""
  nd = len(patch_size)
  patch = tuple(int(n) for n in patch_size)
  neutral = dict(_NEUTRAL, angles=np.zeros(1 if nd == 2 else 3))
  if augment.p_elastic > 0:
    neutral['elastic_noise'] = np.zeros((nd,) + patch)
  if augment.p_noise > 0:
    neutral['noise_values'] = np.zeros(patch + (channels,))
  gates = ('rotate', 'scale', 'flip', 'rot90', 'elastic') + INTENSITY_OPS
  batch = {k: np.stack([np.asarray(p[k]) for p in params]) for k in gates}
  batch.update({k: np.stack([np.asarray(p.get(k, v), np.float32) for p in params])
                for k, v in neutral.items()})
  return batch


def apply(crops: jax.Array, targets: Dict[str, jax.Array], params: Dict[str, jax.Array],
          augment: SegAugment, patch_size: Sequence[int]) -> Tuple[jax.Array, jax.Array]:
  """Augmented patches from crops.

  Args:
    crops: ``[B, *crop, C]`` float (:func:`medjax.data.seg_augment.crop_case`).
    targets: ``{'label': [B, *crop], 'centre', 'low', 'high': [B, nd]}`` (crop voxel
      coordinates of the patch centre and of the case's first and last voxel).
    params: :func:`draw_params`'s (or :func:`host_params_batch`'s).
  Returns:
    (images ``[B, *patch, C]`` float32, labels ``[B, *patch]`` int32).
  """
  patch = tuple(int(n) for n in patch_size)
  return jax.vmap(lambda x, t, p: _apply_one(x, t, p, augment, patch))(crops, targets, params)


def _apply_one(crop, targets, p, augment: SegAugment, patch: Tuple[int, ...]):
  coords = sampling_coords(targets['centre'], p, augment, patch)
  inside = jnp.all((coords >= targets['low'][:, None]) & (coords <= targets['high'][:, None]),
                   axis=0)
  image = jnp.where(inside[:, None], _linear(crop.astype(jnp.float32), coords), 0.0)
  label = jnp.where(inside, _nearest(targets['label'], coords), 0)
  image = intensity(image.reshape(patch + crop.shape[-1:]), p, augment)
  return image, label.reshape(patch).astype(jnp.int32)


def rotation_matrix(angles: jax.Array, nd: int) -> jax.Array:
  """As :func:`medjax.data.seg_augment.rotation_matrix`, traced."""
  def plane(angle, n, i, j):
    c, s = jnp.cos(angle), jnp.sin(angle)
    r = jnp.eye(n)
    return r.at[i, i].set(c).at[i, j].set(-s).at[j, i].set(s).at[j, j].set(c)
  if nd == 2:
    return plane(angles[0], 2, 0, 1)
  rot = jnp.eye(3)
  for axis in range(3):
    i, j = [a for a in range(3) if a != axis]
    rot = rot @ plane(angles[axis], 3, i, j)
  return rot


def sampling_coords(centre, p, augment: SegAugment, patch: Tuple[int, ...]) -> jax.Array:
  """``[nd, prod(patch)]`` float32: where each output voxel reads the crop."""
  nd = len(patch)
  matrix = jnp.where(p['rotate'], rotation_matrix(p['angles'], nd), jnp.eye(nd))
  matrix = matrix / p['scale_factor']
  matrix = matrix * jnp.where(p['flip'], -1.0, 1.0)[None, :]
  cos = jnp.array([1.0, 0.0, -1.0, 0.0])[p['rot90']]
  sin = jnp.array([0.0, 1.0, 0.0, -1.0])[p['rot90']]
  quarter = jnp.eye(nd).at[nd - 2:, nd - 2:].set(jnp.stack([jnp.stack([cos, -sin]),
                                                              jnp.stack([sin, cos])]))
  matrix = matrix @ quarter
  coords = matrix @ jnp.asarray(patch_offsets(patch), jnp.float32)
  if augment.p_elastic > 0:
    sigma = float(augment.elastic_sigma)
    weights = _gaussian_weights(jnp.float32(sigma), _radius(sigma))
    smooth = jnp.stack([gaussian_filter(n, weights) for n in p['elastic_noise']])
    smooth = smooth / (jnp.max(jnp.abs(smooth), axis=tuple(range(1, nd + 1)), keepdims=True)
                       + 1e-8)
    coords = jnp.where(p['elastic'], coords + augment.elastic_alpha * smooth.reshape(nd, -1),
                       coords)
  return coords + centre[:, None]


def _flat_index(index: jax.Array, shape: Tuple[int, ...]) -> jax.Array:
  """Row-major flat index of integer coordinates ``[nd, P]`` (clipped into ``shape``)."""
  flat = jnp.zeros(index.shape[1:], jnp.int32)
  for axis, n in enumerate(shape):
    flat = flat * n + jnp.clip(index[axis], 0, n - 1)
  return flat


def _linear(volume: jax.Array, coords: jax.Array) -> jax.Array:
  """``[P, C]``: (multi)linear interpolation of ``volume`` ``[*S, C]`` at ``coords``
  ``[nd, P]`` (inside the crop, as the crop's margin guarantees)."""
  nd = coords.shape[0]
  shape = volume.shape[:nd]
  flat = volume.reshape(-1, volume.shape[-1])
  lower = jnp.floor(coords)
  frac = coords - lower
  lower = lower.astype(jnp.int32)
  out = 0.0
  for corner in range(2 ** nd):
    bits = [(corner >> (nd - 1 - a)) & 1 for a in range(nd)]
    weight = 1.0
    for axis, bit in enumerate(bits):
      weight = weight * (frac[axis] if bit else 1.0 - frac[axis])
    index = lower + jnp.array(bits, jnp.int32)[:, None]
    out = out + weight[:, None] * flat[_flat_index(index, shape)]
  return out


def _nearest(volume: jax.Array, coords: jax.Array) -> jax.Array:
  """``[P]``: nearest-neighbour values of ``volume`` ``[*S]`` at ``coords`` ``[nd, P]``,
  halves rounded up as SciPy's ``map_coordinates(order=0)`` does."""
  index = jnp.floor(coords + 0.5).astype(jnp.int32)
  return volume.reshape(-1)[_flat_index(index, volume.shape)]


def _radius(sigma: float) -> int:
  """SciPy's Gaussian kernel radius (``truncate=4``)."""
  return int(4.0 * sigma + 0.5)


def _gaussian_weights(sigma: jax.Array, radius: int) -> jax.Array:
  """``[2 radius + 1]``: SciPy's normalised Gaussian kernel of ``sigma`` (radius
  ``int(4 sigma + 0.5)``, zero beyond it, so a traced sigma shares one static width)."""
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  safe = jnp.maximum(sigma, 1e-6)
  weights = jnp.exp(-0.5 * (taps / safe) ** 2)
  weights = jnp.where(jnp.abs(taps) <= jnp.floor(4.0 * sigma + 0.5), weights, 0.0)
  return weights / jnp.sum(weights)


def gaussian_filter(x: jax.Array, weights: jax.Array, axes: Sequence[int] = ()) -> jax.Array:
  """Separable filter of ``x`` along ``axes`` (default all) by the odd kernel ``weights``,
  borders mirrored with the edge voxel repeated (SciPy's ``mode='reflect'``)."""
  radius = (weights.shape[0] - 1) // 2
  for axis in (axes or range(x.ndim)):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad, mode='symmetric')
    n = x.shape[axis]
    x = sum(weights[k] * jax.lax.slice_in_dim(padded, k, k + n, axis=axis)
            for k in range(2 * radius + 1))
  return x


def intensity(x: jax.Array, p, augment: SegAugment) -> jax.Array:
  """The intensity ops of ``p`` on a patch ``[*patch, C]`` (as
  :func:`medjax.data.seg_augment.intensity`)."""
  spatial = tuple(range(x.ndim - 1))
  if augment.p_noise > 0:
    x = jnp.where(p['noise'], x + p['noise_values'], x)
  if augment.p_blur > 0:
    weights = _gaussian_weights(p['blur_sigma'], _radius(max(augment.blur_sigma)))
    x = jnp.where(p['blur'], gaussian_filter(x, weights, spatial), x)
  if augment.p_brightness > 0:
    x = jnp.where(p['brightness'], x * p['brightness_factor'], x)
  if augment.p_contrast > 0:
    mean = jnp.mean(x, axis=spatial, keepdims=True)
    x = jnp.where(p['contrast'], (x - mean) * p['contrast_factor'] + mean, x)
  if augment.p_gamma > 0:
    lo = jnp.min(x, axis=spatial, keepdims=True)
    span = jnp.max(x, axis=spatial, keepdims=True) - lo + 1e-8
    x = jnp.where(p['gamma'], ((x - lo) / span) ** p['gamma_value'] * span + lo, x)
  if augment.p_lowres > 0:
    x = jnp.where(p['lowres'], low_resolution(x, p['lowres_zoom']), x)
  return x


def low_resolution(x: jax.Array, zoom: jax.Array) -> jax.Array:
  """``x`` ``[*spatial, C]`` downsampled by ``zoom`` (nearest neighbour, ``round(n zoom)``
  voxels per axis) and upsampled back linearly, as ``resample_to_shape`` twice on the host;
  per axis (both steps are separable), without the small grid's (traced) shape."""
  for axis in range(x.ndim - 1):
    n = x.shape[axis]
    m = jnp.maximum(1.0, jnp.round(n * zoom))
    # Linear upsampling: output voxel i reads the small grid at p (edges repeated) ...
    pos = jnp.clip((jnp.arange(n) + 0.5) * (m / n) - 0.5, 0.0, m - 1)
    k0 = jnp.floor(pos)
    k1 = jnp.minimum(k0 + 1, m - 1)
    t = pos - k0

    # ... whose voxel k is the nearest original voxel to (k + 0.5) n / m - 0.5.
    def source(k):
      return jnp.clip(jnp.floor((k + 0.5) * (n / m)), 0, n - 1).astype(jnp.int32)
    shape = [1] * x.ndim
    shape[axis] = n
    x = (jnp.take(x, source(k0), axis=axis) * (1 - t).reshape(shape)
         + jnp.take(x, source(k1), axis=axis) * t.reshape(shape))
  return x
