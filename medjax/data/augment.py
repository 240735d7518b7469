"""2D/3D augmentation of classification images inside tf.data (``data.augment``), and the
intensity normalisation every image gets before the model sees it.

Every random draw comes from a stateless TensorFlow RNG keyed by the seed the pipeline gives
(``(seed, epoch, example index)``), so a resumed run sees the same augmented images.
The section ``data.augment`` is declared here; :func:`augment_section` makes another section
with the same ops (``semi.strong_augment``, ``contrastive.augment``).
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np
import tensorflow as tf

from medjax import config as config_lib


def _ops() -> ml_collections.ConfigDict:
  a = ml_collections.ConfigDict()
  a.flip_lr = False
  a.flip_ud = False
  a.rotation_deg = 0.0   # uniform in [-deg, +deg]; 2D only
  a.scale_min = 1.0      # zoom factor range (scale/crop); 2D only
  a.scale_max = 1.0
  a.brightness = 0.0     # additive shift uniform in [-b, +b] (normalised units)
  a.contrast = 0.0       # multiplicative factor uniform in [1-c, 1+c]
  a.cutout = 0.0         # side of a zeroed square, fraction of the image side
  a.translate = 0.0      # shift uniform in [-t, +t] x the side, per axis; 2D only
  a.shear_deg = 0.0      # x-shear angle uniform in [-deg, +deg]; 2D only
  a.blur_sigma = 0.0     # Gaussian blur, sigma uniform in [0, s] pixels; 2D only
  a.noise_std = 0.0      # Gaussian noise, std uniform in [0, s] (normalised units)
  a.op_prob = 1.0        # chance of each of affine/brightness/contrast/blur/noise
  return a


def augment_section(**values) -> ml_collections.ConfigDict:
  """An augmentation section with every op (all off), these values changed."""
  section = _ops()
  section.update(values)
  return section


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  config_lib.section(c, 'data').augment = augment_section()


def normalise(image, pixel_max: float, mean: float, std: float):
  """``(x / pixel_max - mean) / std`` in float32, of a tf.Tensor or a NumPy array (the one
  normalisation of classification images, in the pipeline and for new files)."""
  if isinstance(image, tf.Tensor):
    return (tf.cast(image, tf.float32) / pixel_max - mean) / std
  return ((np.asarray(image, np.float32) / pixel_max - mean) / std).astype(np.float32)


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


def check_augment(aug: ml_collections.ConfigDict, spatial_dims: int,
                  key: str = 'data.augment') -> None:
  """Refuses ops the data cannot take and values out of range; ``key`` names the section."""
  if is_geometric(aug) or aug.blur_sigma > 0:
    if spatial_dims != 2:
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


def is_geometric(aug: ml_collections.ConfigDict) -> bool:
  """Whether ``aug`` moves pixels by an affine map (rotation, zoom, shift, shear)."""
  return (aug.rotation_deg > 0 or aug.scale_min != 1.0 or aug.scale_max != 1.0
          or aug.translate > 0 or aug.shear_deg > 0)


def is_enabled(aug: ml_collections.ConfigDict) -> bool:
  """Whether ``aug`` changes images at all."""
  return (aug.flip_lr or aug.flip_ud or is_geometric(aug) or aug.brightness > 0
          or aug.contrast > 0 or aug.blur_sigma > 0 or aug.noise_std > 0 or aug.cutout > 0)


def blur_radius(aug: ml_collections.ConfigDict) -> int:
  """The blur kernel's half width: ``2 r + 1`` taps cover 3 of the largest sigma."""
  return max(1, int(math.ceil(3 * aug.blur_sigma)))


def draw_params(aug: ml_collections.ConfigDict, seed: tf.Tensor, image_shape: tf.Tensor):
  """Every random parameter of one image's augmentation from its seed ``[2]``: gates
  (``flip_lr``, ``flip_ud``, ``affine``, ``brightness``, ``contrast``, ``blur``, ``noise``;
  the last five Python ``True`` when ``aug.op_prob`` is 1) and values (``angle``,
  ``shear`` radians; ``zoom``; ``shift_y``, ``shift_x`` pixels; ``shift`` brightness;
  ``factor`` contrast; ``sigma`` blur; ``noise`` ``[*spatial, C]`` already times its std;
  ``cutout_u``, ``cutout_v`` in [0, 1)); only the enabled ops'."""
  seeds = tf.random.experimental.stateless_split(seed, num=6)
  uniform = lambda i, lo=0.0, hi=1.0: tf.random.stateless_uniform(  # noqa: E731
      [], seeds[i], minval=lo, maxval=hi)
  # The ops added after the first six draw from their own seeds, so the first six draw
  # what they drew before (runs of earlier versions repeat exactly).
  more = tf.random.experimental.stateless_split(
      tf.random.experimental.stateless_fold_in(seed, 7), num=11)
  more_uniform = lambda i, lo=0.0, hi=1.0: tf.random.stateless_uniform(  # noqa: E731
      [], more[i], minval=lo, maxval=hi)

  def gate(i):
    """Whether op ``i`` applies: always, or with probability ``aug.op_prob``."""
    return True if aug.op_prob == 1.0 else more_uniform(5 + i) < aug.op_prob

  p = {}
  if aug.flip_lr:
    p['flip_lr'] = uniform(0) < 0.5
  if aug.flip_ud:
    p['flip_ud'] = uniform(1) < 0.5
  if is_geometric(aug):
    p['affine'] = gate(0)
    p['angle'] = uniform(2, -aug.rotation_deg, aug.rotation_deg) * (math.pi / 180.0)
    p['zoom'] = uniform(3, aug.scale_min, aug.scale_max)
    p['shear'] = (more_uniform(0, -aug.shear_deg, aug.shear_deg) * (math.pi / 180.0)
                  if aug.shear_deg > 0 else tf.constant(0.0))
    if aug.translate > 0:
      size = tf.cast(image_shape, tf.float32)
      p['shift_y'] = more_uniform(1, -aug.translate, aug.translate) * size[0]
      p['shift_x'] = more_uniform(2, -aug.translate, aug.translate) * size[1]
    else:
      p['shift_y'] = p['shift_x'] = tf.constant(0.0)
  if aug.brightness > 0:
    p['brightness'], p['shift'] = gate(1), uniform(4, -aug.brightness, aug.brightness)
  if aug.contrast > 0:
    p['contrast'] = gate(2)
    p['factor'] = uniform(5, 1.0 - aug.contrast, 1.0 + aug.contrast)
  if aug.blur_sigma > 0:
    p['blur'], p['sigma'] = gate(3), more_uniform(3, 0.0, aug.blur_sigma)
  if aug.noise_std > 0:
    p['noise'] = gate(4)
    p['noise_values'] = (tf.random.stateless_normal(image_shape, more[10])
                         * more_uniform(4, 0.0, aug.noise_std))
  if aug.cutout > 0:  # its own seeds, so the other ops draw what they drew before cutout
    cut = tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(seed, 6), num=2)
    p['cutout_u'] = tf.random.stateless_uniform([], cut[0])
    p['cutout_v'] = tf.random.stateless_uniform([], cut[1])
  return p


def apply_params(image: tf.Tensor, p, aug: ml_collections.ConfigDict,
                 spatial_dims: int) -> tf.Tensor:
  """``image`` ``[*spatial, C]`` under the parameters ``p`` of :func:`draw_params`.

  Order: flips, one affine map (rotation, zoom, shear, shift), brightness, contrast, blur,
  noise, cutout."""
  def maybe(gate, op, image):
    return op() if gate is True else tf.cond(gate, op, lambda: image)

  width_axis, height_axis = spatial_dims - 1, spatial_dims - 2
  if 'flip_lr' in p:
    image = maybe(p['flip_lr'], lambda: tf.reverse(image, [width_axis]), image)
  if 'flip_ud' in p:
    image = maybe(p['flip_ud'], lambda: tf.reverse(image, [height_axis]), image)
  if 'affine' in p:
    image = maybe(p['affine'], lambda: _affine_2d(image, p['angle'], p['zoom'], p['shear'],
                                                  p['shift_y'], p['shift_x']), image)
  if 'brightness' in p:
    image = maybe(p['brightness'], lambda: image + p['shift'], image)
  if 'contrast' in p:
    mean = tf.reduce_mean(image)
    image = maybe(p['contrast'], lambda: mean + (image - mean) * p['factor'], image)
  if 'blur' in p:
    image = maybe(p['blur'], lambda: _gaussian_blur_2d(image, p['sigma'], blur_radius(aug)),
                  image)
  if 'noise' in p:
    image = maybe(p['noise'], lambda: image + p['noise_values'], image)
  if 'cutout_u' in p:
    image = _cutout(image, aug.cutout, p['cutout_u'], p['cutout_v'], spatial_dims)
  return image


def make_augment_fn(aug: ml_collections.ConfigDict, spatial_dims: int,
                    key: str = 'data.augment'):
  """Returns ``fn(image [*spatial, C], seed [2]) -> image`` applying the configured ops
  (:func:`draw_params`, then :func:`apply_params`), or None when none is on. ``key``: the
  config key of ``aug``, named in errors.

  With ``aug.op_prob < 1`` each of the affine map, brightness, contrast, blur and noise is
  applied with that probability (a RandAugment-like mix of ops per image); flips keep their
  one half and cutout is always applied.
  """
  check_augment(aug, spatial_dims, key)

  def augment(image, seed):
    return apply_params(image, draw_params(aug, seed, tf.shape(image)), aug, spatial_dims)

  return augment if is_enabled(aug) else None
