"""Model shapes (2D/3D), parameter counts against torchvision, registry behaviour."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models import available_models, build_model, register_model


def _shapes(model, input_shape):
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(input_shape)))
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(input_shape)), variables)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))
  return out.shape, n_params, variables


def _hand_count(name, in_channels, nd, num_outputs, stem='medmnist'):
  """Parameters counted by hand from the architectures' definitions: convolutions
  k^nd * C_in * C_out (+ C_out biases in the simple CNN; none before a BatchNorm), BatchNorm
  scale + offset, the 1x1 projection where a block changes the shape, the dense head."""
  conv = lambda k, c_in, c_out: k**nd * c_in * c_out
  if name == 'simple_cnn':  # (32, 64) convs, two 2x pools of 28 -> 7, dense 128
    return (conv(3, in_channels, 32) + 32 + conv(3, 32, 64) + 64 + 7**nd * 64 * 128 + 128 +
            128 * num_outputs + num_outputs)
  stages = {'resnet18': (2, 2, 2, 2), 'resnet34': (3, 4, 6, 3), 'resnet50': (3, 4, 6, 3)}[name]
  bottleneck = name == 'resnet50'
  width = 64
  total = conv(7 if stem == 'imagenet' else 3, in_channels, width) + 2 * width
  channels = width
  for i, blocks in enumerate(stages):
    f = width * 2**i
    for j in range(blocks):
      if bottleneck:
        out = 4 * f
        total += conv(1, channels, f) + conv(3, f, f) + conv(1, f, out) + 2 * (f + f + out)
      else:
        out = f
        total += conv(3, channels, f) + conv(3, f, f) + 2 * (f + f)
      if channels != out or (i > 0 and j == 0):
        total += conv(1, channels, out) + 2 * out
      channels = out
  return total + channels * num_outputs + num_outputs


@pytest.mark.parametrize('name', ['simple_cnn', 'resnet18', 'resnet34', 'resnet50'])
@pytest.mark.parametrize('input_shape', [(2, 28, 28, 1), (2, 28, 28, 3), (2, 28, 28, 28, 1)])
def test_output_shapes_and_parameter_counts_2d_and_3d(name, input_shape):
  out_shape, n_params, _ = _shapes(build_model(name, 7), input_shape)
  assert out_shape == (2, 7)
  assert n_params == _hand_count(name, input_shape[-1], len(input_shape) - 2, 7)


@pytest.mark.parametrize('name,expected', [
    # torchvision.models.resnet{18,34,50}(num_classes=1000) parameter counts.
    ('resnet18', 11_689_512), ('resnet34', 21_797_672), ('resnet50', 25_557_032)])
def test_resnet_parameter_counts_match_torchvision(name, expected):
  _, n_params, _ = _shapes(build_model(name, 1000, stem='imagenet'), (1, 224, 224, 3))
  assert n_params == expected
  assert _hand_count(name, 3, 2, 1000, stem='imagenet') == expected  # the hand count too


def test_medmnist_stem_keeps_resolution_and_3d_has_3d_kernels():
  _, _, variables = _shapes(build_model('resnet18', 2), (1, 28, 28, 28, 1))
  assert variables['params']['stem_conv']['kernel'].shape == (3, 3, 3, 1, 64)
  assert 'batch_stats' in variables


@pytest.mark.slow
def test_dropout_and_batch_norm_statistics_act_only_in_training():
  """train=False gives the same logits twice and leaves the running statistics as they are;
  train=True draws dropout masks from its key and moves the statistics by momentum 0.9
  towards the batch's (checked on the stem, whose input is recomputed here as a NumPy 3x3
  'SAME' convolution)."""
  model = build_model('resnet18', 3, width=8, dropout_rate=0.5)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 1))
  variables = model.init(jax.random.PRNGKey(0), x)
  eval1, evaluated = model.apply(variables, x, mutable=['batch_stats'])
  eval2 = model.apply(variables, x)
  np.testing.assert_array_equal(eval1, eval2)
  jax.tree.map(np.testing.assert_array_equal, evaluated['batch_stats'],
               variables['batch_stats'])
  train1, trained = model.apply(variables, x, train=True,
                                rngs={'dropout': jax.random.PRNGKey(2)}, mutable=['batch_stats'])
  train2, _ = model.apply(variables, x, train=True, rngs={'dropout': jax.random.PRNGKey(3)},
                          mutable=['batch_stats'])
  assert not np.allclose(train1, train2)
  kernel = np.asarray(variables['params']['stem_conv']['kernel'], np.float64)  # [3, 3, 1, 8]
  padded = np.pad(np.asarray(x, np.float64)[..., 0], ((0, 0), (1, 1), (1, 1)))
  stem = sum(padded[:, i:i + 16, j:j + 16, None] * kernel[i, j, 0]
             for i in range(3) for j in range(3))
  stats = trained['batch_stats']['stem_norm']
  # Flax's BatchNorm keeps the biased batch variance (PyTorch the unbiased one, N/(N-1)).
  np.testing.assert_allclose(stats['mean'], 0.1 * stem.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * stem.var((0, 1, 2)), rtol=1e-4)
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), trained['batch_stats'],
                       variables['batch_stats'])
  assert all(jax.tree.leaves(moved))  # every BatchNorm layer
  with_new_stats = {'params': variables['params'], 'batch_stats': trained['batch_stats']}
  assert not np.allclose(model.apply(with_new_stats, x), eval1)


def test_xavier_initializer_and_errors():
  _, _, variables = _shapes(build_model('simple_cnn', 2, initializer='xavier'), (1, 28, 28, 1))
  with pytest.raises(ValueError, match="unknown model 'resnet19'"):
    build_model('resnet19', 2)
  with pytest.raises(ValueError, match="has no option\\(s\\) 'depth'"):
    build_model('resnet18', 2, depth=3)
  with pytest.raises(ValueError, match='expected input'):
    _shapes(build_model('simple_cnn', 2), (1, 28, 1))


@pytest.mark.slow
def test_torch_initializer_is_pytorchs_default_layer_init():
  """initializer='torch': every weight and bias U(-b, b), b = 1/sqrt(fan_in), as PyTorch's
  Conv/Linear reset_parameters (kaiming_uniform_(a=sqrt(5)) and the bias bound); checked
  per leaf with a Kolmogorov-Smirnov test against SciPy's uniform distribution."""
  from scipy import stats
  model = build_model('simple_cnn', 3, features=(32, 64), hidden=128, initializer='torch')
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))['params']
  fan_in = {'Conv_0': 9 * 1, 'Conv_1': 9 * 32, 'Dense_0': 7 * 7 * 64, 'Dense_1': 128}
  for layer, n in fan_in.items():
    bound = 1 / np.sqrt(n)
    for name in ('kernel', 'bias'):
      values = np.asarray(params[layer][name]).ravel()
      assert np.abs(values).max() <= bound, (layer, name)
      assert stats.kstest(values, stats.uniform(-bound, 2 * bound).cdf).pvalue > 1e-3, (
          layer, name)
  head = build_model('resnet18', 2, width=8, initializer='torch').init(
      jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))['params']
  kernel = np.asarray(head['stage2_block1']['Conv_0']['kernel'])  # 3x3, 8 -> 16 channels
  assert stats.kstest(kernel.ravel(), stats.uniform(-1 / np.sqrt(72), 2 / np.sqrt(72)).cdf
                      ).pvalue > 1e-3
  assert np.abs(np.asarray(head['head']['bias'])).max() > 0  # PyTorch's Linear bias is random
  # 'he' keeps zero biases (unchanged default).
  he = build_model('simple_cnn', 3).init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  assert not np.asarray(he['params']['Dense_1']['bias']).any()
  with pytest.raises(ValueError, match="unknown initializer 'kaiming'; expected one of he, "
                                       "xavier, torch"):
    build_model('simple_cnn', 3, initializer='kaiming').init(jax.random.PRNGKey(0),
                                                             jnp.zeros((1, 28, 28, 1)))


def test_register_a_new_model_in_a_few_lines():
  @register_model('test_tiny_mlp')
  class TinyMLP(nn.Module):
    num_outputs: int
    hidden: int = 4

    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(self.num_outputs)(nn.relu(nn.Dense(self.hidden)(x.reshape(len(x), -1))))

  assert 'test_tiny_mlp' in available_models()
  out_shape, _, _ = _shapes(build_model('test_tiny_mlp', 3, hidden=5), (2, 8, 8, 1))
  assert out_shape == (2, 3)
  with pytest.raises(ValueError, match='already registered'):
    register_model('test_tiny_mlp')(TinyMLP)
