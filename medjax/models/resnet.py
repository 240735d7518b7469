"""ResNet-18/34/50 in 2D and 3D from one definition (He et al. 2016).

The number of spatial dimensions comes from the input: ``[B, H, W, C]`` gives a 2D ResNet,
``[B, D, H, W, C]`` a 3D one. Stems:

* ``'medmnist'``: 3x3 stride-1 convolution, no max-pool (MedMNIST's ResNet (28); keeps the
  28 px input at full resolution through the first stage).
* ``'imagenet'``: 7x7 stride-2 convolution and 3x3 stride-2 max-pool (torchvision).

BatchNorm keeps running statistics in the ``batch_stats`` collection (momentum 0.9 and
epsilon 1e-5, i.e. PyTorch's defaults).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.conv import make_conv
from medjax.models.layers import bias_init, dense_init, kernel_init, spatial_dims
from medjax.models.registry import register_model


def _last_norm_scale(zero: bool):
  return nn.initializers.zeros_init() if zero else nn.initializers.ones_init()


def _shortcut(block: nn.Module, residual: jax.Array, y: jax.Array) -> jax.Array:
  """Identity, or a strided 1x1 convolution + norm where the block changes the shape."""
  if residual.shape == y.shape:
    return residual
  residual = block.conv(y.shape[-1], (1,) * block.nd, (block.strides,) * block.nd,
                        name='proj_conv')(residual)
  return block.norm(name='proj_norm')(residual)


class BasicBlock(nn.Module):
  features: int
  strides: int
  nd: int
  conv: Any
  norm: Any
  zero_init_last: bool = False

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.features, (3,) * self.nd, (self.strides,) * self.nd)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features, (3,) * self.nd)(y)
    y = self.norm(scale_init=_last_norm_scale(self.zero_init_last))(y)
    return nn.relu(_shortcut(self, residual, y) + y)


class Bottleneck(nn.Module):
  features: int
  strides: int
  nd: int
  conv: Any
  norm: Any
  zero_init_last: bool = False
  expansion: int = 4

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.features, (1,) * self.nd)(x)))
    y = self.conv(self.features, (3,) * self.nd, (self.strides,) * self.nd)(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features * self.expansion, (1,) * self.nd)(y)
    y = self.norm(scale_init=_last_norm_scale(self.zero_init_last))(y)
    return nn.relu(_shortcut(self, residual, y) + y)


class ResNet(nn.Module):
  """ResNet classifier.

  Attributes:
    num_outputs: logits per example.
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block: 'basic' or 'bottleneck'.
    width: channels of the first stage (64 in the paper); stages double it.
    stem: 'medmnist' or 'imagenet' (see module docstring).
    dropout_rate: dropout before the classifier.
    initializer: 'he', 'xavier' or 'torch' (``medjax.models.layers.kernel_init``).
    zero_init_residual: last BatchNorm of each block starts at zero (Goyal et al. 2017).
    conv_impl: convolution implementation (``medjax.models.conv``; 'auto' = fastest per backend).
    dtype: compute dtype of convolutions, norms and the head (``train.precision``); the
      parameters stay float32 and the logits are float32.
  """
  num_outputs: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = 'basic'
  width: int = 64
  stem: str = 'medmnist'
  dropout_rate: float = 0.0
  initializer: str = 'he'
  zero_init_residual: bool = False
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    nd = spatial_dims(x)
    conv = functools.partial(make_conv, conv_impl=self.conv_impl, use_bias=False,
                             kernel_init=kernel_init(self.initializer), padding='SAME',
                             dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    if self.stem == 'medmnist':
      x = conv(self.width, (3,) * nd, name='stem_conv')(x)
      x = nn.relu(norm(name='stem_norm')(x))
    elif self.stem == 'imagenet':
      x = conv(self.width, (7,) * nd, (2,) * nd, padding=[(3, 3)] * nd, name='stem_conv')(x)
      x = nn.relu(norm(name='stem_norm')(x))
      x = nn.max_pool(x, (3,) * nd, strides=(2,) * nd, padding=[(1, 1)] * nd)
    else:
      raise ValueError(f"unknown stem '{self.stem}'; expected 'medmnist' or 'imagenet'")
    if self.block == 'basic':
      block_cls = BasicBlock
    elif self.block == 'bottleneck':
      block_cls = Bottleneck
    else:
      raise ValueError(f"unknown block '{self.block}'; expected 'basic' or 'bottleneck'")
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = block_cls(self.width * 2**i, strides, nd, conv, norm,
                      zero_init_last=self.zero_init_residual,
                      name=f'stage{i + 1}_block{j + 1}')(x)
    x = jnp.mean(x, axis=tuple(range(1, nd + 1)))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_outputs, kernel_init=dense_init(self.initializer),
                      bias_init=bias_init(self.initializer, x.shape[-1]), dtype=self.dtype,
                      name='head')(x)
    return logits.astype(jnp.float32)


def _variant(name: str, stage_sizes, block):
  def factory(num_outputs: int, **kwargs) -> ResNet:
    return ResNet(num_outputs=num_outputs, stage_sizes=stage_sizes, block=block, **kwargs)
  factory.__name__ = name
  factory.module_class = ResNet
  factory.fixed_kwargs = ('stage_sizes', 'block')
  factory.__doc__ = f'{name}: ResNet with stages {stage_sizes} of {block} blocks.'
  return register_model(name)(factory)


register_model('resnet')(ResNet)
resnet18 = _variant('resnet18', (2, 2, 2, 2), 'basic')
resnet34 = _variant('resnet34', (3, 4, 6, 3), 'basic')
resnet50 = _variant('resnet50', (3, 4, 6, 3), 'bottleneck')
