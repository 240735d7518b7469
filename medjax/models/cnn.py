"""The simple CNN baseline: two conv-ReLU-max-pool stages and a two-layer classifier."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.conv import make_conv
from medjax.models.layers import bias_init, dense_init, kernel_init, spatial_dims
from medjax.models.registry import register_model


@register_model('simple_cnn')
class SimpleCNN(nn.Module):
  """LeNet-style CNN for 2D ``[B, H, W, C]`` or 3D ``[B, D, H, W, C]`` inputs.

  Attributes:
    num_outputs: logits per example.
    features: channels of the convolution stages.
    hidden: width of the hidden dense layer.
    dropout_rate: dropout before the output layer.
    initializer: 'he', 'xavier' or 'torch' (``medjax.models.layers.kernel_init``).
    conv_impl: convolution implementation (``medjax.models.conv``; 'auto' = fastest per backend).
    dtype: compute dtype (``train.precision``); parameters and logits stay float32.
  """
  num_outputs: int
  features: tuple[int, ...] = (32, 64)
  hidden: int = 128
  dropout_rate: float = 0.0
  initializer: str = 'he'
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    nd = spatial_dims(x)
    init = kernel_init(self.initializer)
    for f in self.features:
      x = make_conv(f, (3,) * nd, conv_impl=self.conv_impl, kernel_init=init,
                    bias_init=bias_init(self.initializer, 3**nd * x.shape[-1]),
                    dtype=self.dtype)(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2,) * nd, strides=(2,) * nd)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden, kernel_init=dense_init(self.initializer),
                         bias_init=bias_init(self.initializer, x.shape[-1]),
                         dtype=self.dtype)(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_outputs, kernel_init=dense_init(self.initializer),
                 bias_init=bias_init(self.initializer, x.shape[-1]), dtype=self.dtype)(x)
    return x.astype(jnp.float32)
