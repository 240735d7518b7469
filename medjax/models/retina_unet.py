"""Retina U-Net (Jaeger et al. 2018; nnDetection's detector) in 2D and 3D from one definition.

medjax's U-Net, with detection heads on two or more of its decoder levels and its own
full-resolution head kept as the auxiliary segmentation. The heads (a classification tower and
a box tower, ``head_convs`` x conv 3 - GroupNorm - LeakyReLU each) are shared by all levels, as
RetinaNet's, after a 1x1 projection of each level to ``head_features`` channels.

Input ``[B, *spatial, C]``; output a dict:

* ``class_logits [B, N, K]``: per anchor and foreground class, a sigmoid logit;
* ``box_deltas [B, N, 2 nd]``: per anchor, the box regression
  (:func:`medjax.detection.boxes.decode`);
* ``seg_logits [B, *spatial, K + 1]``: the auxiliary segmentation (background first).

``N`` counts the anchors of every head level, level by level (finest first), cell by cell in
C order, ``num_anchors`` per cell: the order of :func:`medjax.detection.anchors.all_anchors`.
Head level ``l`` (a decoder level) has stride ``prod(strides[:l + 1])`` (:func:`head_strides`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.models.conv import make_conv
from medjax.models.layers import kernel_init
from medjax.models.registry import register_model
from medjax.models.unet import UNet


def head_strides(strides: Sequence[int], head_levels: Sequence[int]) -> Tuple[int, ...]:
  """The stride (input voxels per feature cell) of each head level."""
  return tuple(int(np.prod(strides[:level + 1])) for level in head_levels)


class HeadTower(nn.Module):
  """``convs`` x (conv 3 - GroupNorm - LeakyReLU), then a conv 3 to ``outputs`` channels."""
  features: int
  convs: int
  outputs: int
  bias: float
  conv_impl: str
  dtype: Any

  @nn.compact
  def __call__(self, x):
    nd = x.ndim - 2
    for i in range(self.convs):
      x = make_conv(self.features, (3,) * nd, conv_impl=self.conv_impl, padding='SAME',
                    kernel_init=nn.initializers.normal(0.01), dtype=self.dtype,
                    name=f'conv{i}')(x)
      x = nn.GroupNorm(num_groups=min(8, self.features), dtype=self.dtype, name=f'norm{i}')(x)
      x = nn.leaky_relu(x, 0.01)
    return make_conv(self.outputs, (3,) * nd, conv_impl=self.conv_impl, padding='SAME',
                     kernel_init=nn.initializers.normal(0.01),
                     bias_init=nn.initializers.constant(self.bias), dtype=self.dtype,
                     name='out')(x)


@register_model('retina_unet')
class RetinaUNet(nn.Module):
  """Attributes:
    num_outputs: foreground classes ``K``.
    features, strides, convs_per_block, block, norm, upsample, negative_slope, initializer,
      conv_impl: the U-Net's (:class:`medjax.models.unet.UNet`).
    head_levels: decoder levels carrying detection heads (0 = full resolution).
    num_anchors: anchor shapes per feature cell (the anchor plan's shapes per level).
    head_features, head_convs: width and depth of the shared heads.
    prior_probability: initial foreground probability of every anchor (RetinaNet's 0.01,
      so the many background anchors do not swamp the first steps).
    dtype: compute dtype; outputs are float32.
  """
  num_outputs: int
  features: Sequence[int] = (32, 64, 128, 256)
  strides: Sequence[int] = (1, 2, 2, 2)
  convs_per_block: int = 2
  block: str = 'plain'
  norm: str = 'instance'
  upsample: str = 'transpose'
  negative_slope: float = 0.01
  initializer: str = 'he'
  conv_impl: str = 'auto'
  head_levels: Sequence[int] = (1, 2)
  num_anchors: int = 3
  head_features: int = 64
  head_convs: int = 2
  prior_probability: float = 0.01
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    levels = len(self.features) - 1
    if not self.head_levels or any(not 0 <= level < levels for level in self.head_levels):
      raise ValueError(f'head_levels {tuple(self.head_levels)}: decoder levels in '
                       f'[0, {levels - 1}] (the U-Net has {levels} decoder levels)')
    nd = x.ndim - 2
    unet = UNet(num_outputs=self.num_outputs + 1, features=self.features, strides=self.strides,
                convs_per_block=self.convs_per_block, block=self.block, norm=self.norm,
                upsample=self.upsample, negative_slope=self.negative_slope,
                initializer=self.initializer, conv_impl=self.conv_impl, dtype=self.dtype,
                return_features=True, name='unet')
    seg_logits, decoded = unet(x, train)
    tower = functools.partial(HeadTower, self.head_features, self.head_convs,
                              conv_impl=self.conv_impl, dtype=self.dtype)
    prior = -math.log((1 - self.prior_probability) / self.prior_probability)
    classify = tower(self.num_anchors * self.num_outputs, prior, name='class_head')
    regress = tower(self.num_anchors * 2 * nd, 0.0, name='box_head')
    class_logits, box_deltas = [], []
    for level in self.head_levels:
      f = make_conv(self.head_features, (1,) * nd, conv_impl=self.conv_impl,
                    kernel_init=kernel_init(self.initializer), dtype=self.dtype,
                    name=f'project{level}')(decoded[level])
      batch = f.shape[0]
      class_logits.append(classify(f).reshape(batch, -1, self.num_outputs))
      box_deltas.append(regress(f).reshape(batch, -1, 2 * nd))
    return {'class_logits': jnp.concatenate(class_logits, 1).astype(jnp.float32),
            'box_deltas': jnp.concatenate(box_deltas, 1).astype(jnp.float32),
            'seg_logits': seg_logits.astype(jnp.float32)}
