"""Small building blocks shared by the models."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax

Initializer = Callable[..., jax.Array]


INITIALIZERS = ('he', 'xavier', 'torch')


def _torch_uniform() -> Initializer:
  # PyTorch's default for Conv and Linear weights: kaiming_uniform_(a=sqrt(5)), i.e.
  # U(-b, b) with b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + 5)): b = 1 / sqrt(fan_in).
  return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def kernel_init(name: str) -> Initializer:
  """Convolution kernels: 'he' (Kaiming normal, fan_out, as torchvision's ResNet), 'xavier'
  (Glorot uniform) or 'torch' (PyTorch's default layer init, U(+-1/sqrt(fan_in)), as in
  models built from plain ``nn.Conv2d`` such as MedMNIST's official ResNets)."""
  if name == 'he':
    return nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
  if name == 'xavier':
    return nn.initializers.xavier_uniform()
  if name == 'torch':
    return _torch_uniform()
  raise ValueError(f"unknown initializer '{name}'; expected one of {', '.join(INITIALIZERS)}")


def dense_init(name: str) -> Initializer:
  """Dense layers: with 'he' and 'torch', PyTorch's default Linear init (uniform, bound
  1/sqrt(fan_in)), as torchvision keeps for its classifier; fan_out scaling would give a
  2-way head weights of unit variance and exploding initial logits. 'xavier' is Glorot
  uniform."""
  if name in ('he', 'torch'):
    return _torch_uniform()
  return kernel_init(name)


def bias_init(name: str, fan_in: int) -> Initializer:
  """Biases: zeros, except with 'torch': U(+-1/sqrt(fan_in)), PyTorch's default (the
  initializer does not see ``fan_in``, so the layer passes it)."""
  kernel_init(name)  # validates the name
  if name != 'torch':
    return nn.initializers.zeros_init()
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jax.numpy.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def spatial_dims(x: jax.Array) -> int:
  """Number of spatial axes of ``x`` shaped ``[B, *spatial, C]`` (2 for images, 3 for volumes)."""
  nd = x.ndim - 2
  if nd not in (2, 3):
    raise ValueError(f'expected input [B, H, W, C] or [B, D, H, W, C], got shape {x.shape}')
  return nd
