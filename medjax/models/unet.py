"""U-Net in 2D and 3D from one definition (Ronneberger et al. 2015; nnU-Net's layout).

Input ``[B, *spatial, C]`` (rank decides 2D or 3D); output logits ``[B, *spatial, K]``.
With ``deep_supervision`` and ``train=True`` the output is a list: full resolution first,
then the logits of each coarser decoder level (for deep-supervision losses).

Spatial sizes must be divisible by the product of ``strides`` (pad with
``medjax.data.intensity.pad_to_multiple``).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.models.conv import ConvTranspose, make_conv
from medjax.models.layers import kernel_init, spatial_dims
from medjax.models.registry import register_model


def _norm(kind: str, train: bool, name: str, dtype):
  # Flax computes the statistics in float32 whatever ``dtype`` (the output's).
  if kind == 'instance':
    return nn.InstanceNorm(epsilon=1e-5, dtype=dtype, name=name)
  if kind == 'batch':
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        name=name)
  if kind == 'group':
    return nn.GroupNorm(num_groups=8, epsilon=1e-5, dtype=dtype, name=name)
  raise ValueError(f"unknown norm '{kind}'; expected 'instance', 'batch' or 'group'")


class ConvBlock(nn.Module):
  """``n`` x (conv 3 - norm - LeakyReLU); the first conv may be strided. ``residual`` adds
  a (projected) shortcut around the block (MONAI's residual units)."""
  features: int
  strides: int
  num_convs: int
  norm: str
  residual: bool
  negative_slope: float
  initializer: str
  conv_impl: str
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool):
    nd = x.ndim - 2
    conv = functools.partial(make_conv, kernel_size=(3,) * nd, conv_impl=self.conv_impl,
                             padding='SAME', kernel_init=kernel_init(self.initializer),
                             dtype=self.dtype)
    shortcut = x
    for i in range(self.num_convs):
      x = conv(self.features, strides=(self.strides if i == 0 else 1,) * nd,
               name=f'conv{i}')(x)
      x = _norm(self.norm, train, f'norm{i}', self.dtype)(x)
      if not (self.residual and i == self.num_convs - 1):
        x = nn.leaky_relu(x, self.negative_slope)
    if self.residual:
      if shortcut.shape != x.shape:
        shortcut = make_conv(self.features, (1,) * nd, conv_impl=self.conv_impl,
                             strides=(self.strides,) * nd,
                             kernel_init=kernel_init(self.initializer), dtype=self.dtype,
                             name='shortcut')(shortcut)
      x = nn.leaky_relu(x + shortcut, self.negative_slope)
    return x


@register_model('unet')
class UNet(nn.Module):
  """Encoder-decoder with skip connections.

  Attributes:
    num_outputs: classes (output channels).
    features: channels per level, e.g. nnU-Net's (32, 64, 128, 256, 320).
    strides: downsampling of each level's first conv (the first is usually 1).
    convs_per_block: convolutions per encoder and decoder block.
    block: 'plain' (conv-norm-LeakyReLU, nnU-Net) or 'residual' (MONAI's residual units).
    norm: 'instance', 'batch' or 'group'.
    upsample: 'transpose' (transposed convolution) or 'resize' (linear resize + 1x1 conv;
      avoids the slow 3D transposed-convolution backward pass of some backends).
    deep_supervision: also return lower-resolution logits when training.
    negative_slope: of the LeakyReLU.
    initializer: convolution kernels 'he', 'xavier' or 'torch'
      (``medjax.models.layers.kernel_init``); biases start at zero.
    conv_impl: convolution implementation (``medjax.models.conv``; 'auto' = fastest per
      backend). Transposed convolutions with kernel = stride run as a matrix product on CPU.
    dtype: compute dtype (``train.precision``); parameters and logits stay float32.
    return_features: also return each decoder level's features (``(logits, [f_0, f_1,
      ...])``, ``f_l [B, *spatial / stride_l, features[l]]`` with ``stride_l`` the product
      of ``strides[:l + 1]``), for heads built on the decoder (Retina U-Net).
  """
  num_outputs: int
  features: Sequence[int] = (32, 64, 128, 256, 320)
  strides: Sequence[int] = (1, 2, 2, 2, 2)
  convs_per_block: int = 2
  block: str = 'plain'
  norm: str = 'instance'
  upsample: str = 'transpose'
  deep_supervision: bool = False
  negative_slope: float = 0.01
  initializer: str = 'he'
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32
  return_features: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    nd = spatial_dims(x)
    if len(self.features) != len(self.strides):
      raise ValueError(f'features {self.features} and strides {self.strides} differ in length')
    if self.block not in ('plain', 'residual'):
      raise ValueError(f"unknown block '{self.block}'; expected 'plain' or 'residual'")
    if self.upsample not in ('transpose', 'resize'):
      raise ValueError(f"unknown upsample '{self.upsample}'; expected 'transpose' or 'resize'")
    total = 1
    for s in self.strides:
      total *= s
    if any(n % total for n in x.shape[1:-1]):
      raise ValueError(f'spatial size {x.shape[1:-1]} is not divisible by the total stride '
                       f'{total}; pad the input (medjax.data.intensity.pad_to_multiple)')
    block = functools.partial(ConvBlock, num_convs=self.convs_per_block, norm=self.norm,
                              residual=self.block == 'residual',
                              negative_slope=self.negative_slope, initializer=self.initializer,
                              conv_impl=self.conv_impl, dtype=self.dtype)
    conv1 = functools.partial(make_conv, kernel_size=(1,) * nd, conv_impl=self.conv_impl,
                              dtype=self.dtype)
    x = x.astype(self.dtype)
    skips = []
    for level, (f, s) in enumerate(zip(self.features, self.strides)):
      x = block(f, s, name=f'encoder{level}')(x, train)
      skips.append(x)
    outputs, decoded = [], {}
    for level in range(len(self.features) - 2, -1, -1):
      f, s = self.features[level], self.strides[level + 1]
      if self.upsample == 'transpose':
        x = ConvTranspose(f, (s,) * nd, (s,) * nd, kernel_init=kernel_init(self.initializer),
                          conv_impl=self.conv_impl, name=f'up{level}')(x)
      else:
        x = jax.image.resize(x, x.shape[:1] + skips[level].shape[1:-1] + x.shape[-1:], 'linear')
        x = conv1(f, kernel_init=kernel_init(self.initializer), name=f'up{level}')(x)
      x = jnp.concatenate([x, skips[level]], axis=-1)
      x = block(f, 1, name=f'decoder{level}')(x, train)
      decoded[level] = x
      if self.deep_supervision and level > 0:
        outputs.append(conv1(self.num_outputs, name=f'ds_head{level}')(x))
    logits = conv1(self.num_outputs, name='head')(x)
    logits = logits.astype(jnp.float32)
    if self.deep_supervision and train:
      logits = [logits] + [o.astype(jnp.float32) for o in reversed(outputs)]
    if self.return_features:
      return logits, [decoded[level] for level in sorted(decoded)]
    return logits


def total_stride(model_cfg) -> int:
  """How much the U-Net of ``config.model`` downsamples: input sizes must be multiples of it."""
  return int(np.prod(model_cfg.get('strides', (1, 2, 2, 2, 2))))
