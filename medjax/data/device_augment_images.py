"""Classification images' augmentation (``data.augment``) inside the jitted train step
(``data.augment_on='device'``), with the semantics and ranges of the tf.data ops of
:mod:`medjax.data.augment`: flips, one affine map (rotation, zoom, shear, shift; bilinear,
borders reflected as TensorFlow's ``ImageProjectiveTransformV3`` does), brightness,
contrast, blur, noise and cutout, each of the middle five with probability ``op_prob``.

As for segmentation (:mod:`medjax.data.device_augment`): :func:`draw_params` gives each
example's parameters from its own key, :func:`apply` applies given parameters (the host's,
:func:`medjax.data.augment.draw_params`, in the equivalence tests).
"""

from __future__ import annotations

import math
from typing import Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medjax.data.augment import blur_radius, is_geometric


def draw_params(keys: jax.Array, aug: ml_collections.ConfigDict,
                image_shape) -> Dict[str, jax.Array]:
  """``[B, ...]`` parameters of the enabled ops, example ``j``'s from ``keys[j]``: the
  entries of :func:`medjax.data.augment.draw_params` (gates always arrays here)."""
  return jax.vmap(lambda k: _draw_one(k, aug, tuple(image_shape)))(keys)


def _draw_one(key, aug, shape):
  scalar_key, noise_key = jax.random.split(key)
  # Every scalar from one call: each random-bits call is a program of its own to compile.
  scalars = iter(jax.random.uniform(scalar_key, (18,)))  # at most 18 draws below

  def uniform(lo=0.0, hi=1.0):
    return lo + (hi - lo) * next(scalars)

  def gate():
    return uniform() < aug.op_prob

  p = {}
  if aug.flip_lr:
    p['flip_lr'] = uniform() < 0.5
  if aug.flip_ud:
    p['flip_ud'] = uniform() < 0.5
  if is_geometric(aug):
    p['affine'] = gate()
    p['angle'] = uniform(-aug.rotation_deg, aug.rotation_deg) * (math.pi / 180.0)
    p['zoom'] = uniform(aug.scale_min, aug.scale_max)
    p['shear'] = uniform(-aug.shear_deg, aug.shear_deg) * (math.pi / 180.0)
    p['shift_y'] = uniform(-aug.translate, aug.translate) * shape[0]
    p['shift_x'] = uniform(-aug.translate, aug.translate) * shape[1]
  if aug.brightness > 0:
    p['brightness'], p['shift'] = gate(), uniform(-aug.brightness, aug.brightness)
  if aug.contrast > 0:
    p['contrast'], p['factor'] = gate(), uniform(1.0 - aug.contrast, 1.0 + aug.contrast)
  if aug.blur_sigma > 0:
    p['blur'], p['sigma'] = gate(), uniform(0.0, aug.blur_sigma)
  if aug.noise_std > 0:
    p['noise'] = gate()
    p['noise_values'] = jax.random.normal(noise_key, shape) * uniform(0.0, aug.noise_std)
  if aug.cutout > 0:
    p['cutout_u'], p['cutout_v'] = uniform(), uniform()
  return p


def apply(images: jax.Array, params: Dict[str, jax.Array],
          aug: ml_collections.ConfigDict) -> jax.Array:
  """``images`` ``[B, *spatial, C]`` under ``params`` (``[B, ...]`` each), float32."""
  return jax.vmap(lambda x, p: _apply_one(x.astype(jnp.float32), p, aug))(images, params)


def _apply_one(image, p, aug):
  spatial_dims = image.ndim - 1
  width_axis, height_axis = spatial_dims - 1, spatial_dims - 2
  if 'flip_lr' in p:
    image = jnp.where(p['flip_lr'], jnp.flip(image, width_axis), image)
  if 'flip_ud' in p:
    image = jnp.where(p['flip_ud'], jnp.flip(image, height_axis), image)
  if 'affine' in p:
    moved = affine_2d(image, p['angle'], p['zoom'], p['shear'], p['shift_y'], p['shift_x'])
    image = jnp.where(p['affine'], moved, image)
  if 'brightness' in p:
    image = jnp.where(p['brightness'], image + p['shift'], image)
  if 'contrast' in p:
    mean = jnp.mean(image)
    image = jnp.where(p['contrast'], mean + (image - mean) * p['factor'], image)
  if 'blur' in p:
    image = jnp.where(p['blur'], gaussian_blur_2d(image, p['sigma'], blur_radius(aug)), image)
  if 'noise' in p:
    image = jnp.where(p['noise'], image + p['noise_values'], image)
  if 'cutout_u' in p:
    image = cutout(image, aug.cutout, p['cutout_u'], p['cutout_v'])
  return image


def _reflect(coord: jax.Array, size: int) -> jax.Array:
  """TensorFlow's ``fill_mode='REFLECT'`` map of a coordinate into ``[0, size - 1]``
  (``dcba|abcd|dcba``, then clamped)."""
  if size <= 1:
    return jnp.zeros_like(coord)
  period = 2.0 * size
  low = coord + period * jnp.floor(-coord / period)
  low = jnp.where(low < -size, low + period, -low - 1)
  high = coord - period * jnp.floor(coord / period)
  high = jnp.where(high >= size, period - high - 1, high)
  mapped = jnp.where(coord < 0, low, jnp.where(coord > size - 1, high, coord))
  return jnp.clip(mapped, 0.0, size - 1.0)


def affine_2d(image, angle, zoom, shear, shift_y, shift_x) -> jax.Array:
  """As :func:`medjax.data.augment._affine_2d`: ``image`` ``[H, W, C]`` rotated, zoomed,
  sheared about its centre and shifted; bilinear, borders reflected."""
  height, width = image.shape[0], image.shape[1]
  cy, cx = (height - 1) / 2, (width - 1) / 2
  cos, sin = jnp.cos(angle) / zoom, jnp.sin(angle) / zoom
  tan = jnp.tan(shear)
  a0, a1 = cos, -sin - cos * tan
  b0, b1 = sin, cos - sin * tan
  ox, oy = cx + shift_x, cy + shift_y
  a2, b2 = cx - a0 * ox - a1 * oy, cy - b0 * ox - b1 * oy
  y, x = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                      jnp.arange(width, dtype=jnp.float32), indexing='ij')
  src_x = _reflect(a0 * x + a1 * y + a2, width)
  src_y = _reflect(b0 * x + b1 * y + b2, height)
  x0, y0 = jnp.floor(src_x), jnp.floor(src_y)

  def read(yy, xx):
    """Pixels at integer (yy, xx), 0 outside (TensorFlow's fill value)."""
    inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
    values = image[jnp.clip(yy, 0, height - 1).astype(jnp.int32),
                   jnp.clip(xx, 0, width - 1).astype(jnp.int32)]
    return jnp.where(inside[..., None], values, 0.0)

  wx1, wy1 = (src_x - x0)[..., None], (src_y - y0)[..., None]
  wx0, wy0 = (x0 + 1 - src_x)[..., None], (y0 + 1 - src_y)[..., None]
  top = wx0 * read(y0, x0) + wx1 * read(y0, x0 + 1)
  bottom = wx0 * read(y0 + 1, x0) + wx1 * read(y0 + 1, x0 + 1)
  return wy0 * top + wy1 * bottom


def gaussian_blur_2d(image: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
  """As :func:`medjax.data.augment._gaussian_blur_2d`: separable blur of ``[H, W, C]``,
  ``2 radius + 1`` taps, borders reflected without repeating the edge."""
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-0.5 * jnp.square(taps / jnp.maximum(sigma, 1e-3)))
  kernel = kernel / jnp.sum(kernel)
  padded = jnp.pad(image, [(radius, radius), (radius, radius), (0, 0)], mode='reflect')
  height, width = image.shape[0], image.shape[1]
  rows = sum(kernel[k] * padded[k:k + height] for k in range(2 * radius + 1))
  return sum(kernel[k] * rows[:, k:k + width] for k in range(2 * radius + 1))


def cutout(image: jax.Array, size: float, u: jax.Array, v: jax.Array) -> jax.Array:
  """As :func:`medjax.data.augment._cutout`: zeroes a square of side ``size`` x the image
  side in the last two spatial axes, centred at (``u``, ``v``) x (H, W)."""
  height, width = image.shape[-3], image.shape[-2]
  # In float32 as TensorFlow computes them, so the square's edges fall where they do there.
  half_h = int(np.float32(height) * np.float32(size) / np.float32(2))
  half_w = int(np.float32(width) * np.float32(size) / np.float32(2))
  cy = (u * jnp.float32(height)).astype(jnp.int32)
  cx = (v * jnp.float32(width)).astype(jnp.int32)
  rows, cols = jnp.arange(height), jnp.arange(width)
  inside = (((rows >= cy - half_h) & (rows < cy + half_h))[:, None]
            & ((cols >= cx - half_w) & (cols < cx + half_w))[None, :])
  return jnp.where(inside[..., None], 0.0, image)
