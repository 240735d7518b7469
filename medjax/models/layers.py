"""Small building blocks shared by the models."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax

Initializer = Callable[..., jax.Array]


def kernel_init(name: str) -> Initializer:
  """Convolution kernels: 'he' (Kaiming normal, fan_out, as torchvision's ResNet) or
  'xavier' (Glorot uniform)."""
  if name == 'he':
    return nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
  if name == 'xavier':
    return nn.initializers.xavier_uniform()
  raise ValueError(f"unknown initializer '{name}'; expected 'he' or 'xavier'")


def dense_init(name: str) -> Initializer:
  """Dense layers: with 'he', PyTorch's default Linear init (uniform, bound 1/sqrt(fan_in)),
  as torchvision keeps for its classifier; fan_out scaling would give a 2-way head weights
  of unit variance and exploding initial logits. 'xavier' is Glorot uniform."""
  if name == 'he':
    return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
  return kernel_init(name)


def spatial_dims(x: jax.Array) -> int:
  """Number of spatial axes of ``x`` shaped ``[B, *spatial, C]`` (2 for images, 3 for volumes)."""
  nd = x.ndim - 2
  if nd not in (2, 3):
    raise ValueError(f'expected input [B, H, W, C] or [B, D, H, W, C], got shape {x.shape}')
  return nd
