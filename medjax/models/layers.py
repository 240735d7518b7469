"""Small building blocks shared by the models."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax

Initializer = Callable[..., jax.Array]


def kernel_init(name: str) -> Initializer:
  """'he' (Kaiming normal, fan_out, as torchvision's ResNet) or 'xavier' (Glorot uniform)."""
  if name == 'he':
    return nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
  if name == 'xavier':
    return nn.initializers.xavier_uniform()
  raise ValueError(f"unknown init '{name}'; expected 'he' or 'xavier'")


def spatial_dims(x: jax.Array) -> int:
  """Number of spatial axes of ``x`` shaped ``[B, *spatial, C]`` (2 for images, 3 for volumes)."""
  nd = x.ndim - 2
  if nd not in (2, 3):
    raise ValueError(f'expected input [B, H, W, C] or [B, D, H, W, C], got shape {x.shape}')
  return nd
