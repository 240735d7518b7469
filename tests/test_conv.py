"""medjax.models.conv: every implementation equals XLA's convolution (values and both
gradients), a float64 NumPy reference agrees, and models keep their parameters."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from medjax.models import build_model, conv as conv_lib

RTOL = 1e-5  # max |a - b| / max |b|: float32 sums over at most a few thousand terms here


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _conv_and_grads(impl, x, w, strides, padding, cotangent):
  nd = x.ndim - 2

  def f(x, w):
    return conv_lib.conv_general_dilated(x, w, strides, padding,
                                         dimension_numbers=conv_lib._channels_last(nd), impl=impl)
  y, vjp = jax.vjp(f, x, w)
  return (y,) + vjp(cotangent)


def _case(nd, k, s, cin=3, cout=4, seed=0):
  rng = np.random.default_rng(seed)
  spatial = (7, 9, 6) if nd == 3 else (11, 8)
  x = jnp.asarray(rng.normal(size=(2,) + spatial + (cin,)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k,) * nd + (cin, cout)), jnp.float32)
  return x, w, (s,) * nd


def _applicable(impl, nd, k):
  """Implementations that do not apply fall back to 'matmul_wgrad' (tested as such)."""
  return not ((impl.startswith('depth') and nd == 2) or (impl == 'pointwise' and k > 1))


@pytest.mark.parametrize('impl,nd,k,s,padding', [
    (impl, nd, k, s, p)
    for impl in ('matmul_wgrad', 'patch_wgrad', 'depth_stack', 'depth_taps', 'pointwise', 'auto')
    for nd, k, s, p in itertools.product((2, 3), (1, 3), (1, 2), ('SAME', 'VALID'))
    if _applicable(impl, nd, k)
] + [('auto', 2, 3, 2, ((2, 0), (1, 3))), ('depth_stack', 3, 3, 1, ((0, 1), (2, 2), (1, 0))),
     ('depth_taps', 3, 3, 2, ((0, 1), (2, 2), (1, 0)))])
def test_every_implementation_equals_xla(impl, nd, k, s, padding):
  x, w, strides = _case(nd, k, s)
  y_ref = conv_lib._xla(x, w, strides, lax.padtype_to_pads(x.shape[1:-1], w.shape[:-2], strides,
                                                            padding)
                        if isinstance(padding, str) else padding)
  g = jnp.asarray(np.random.default_rng(1).normal(size=y_ref.shape), jnp.float32)
  ref = _conv_and_grads('xla', x, w, strides, padding, g)
  out = _conv_and_grads(impl, x, w, strides, padding, g)
  for name, a, b in zip(('value', 'input grad', 'weight grad'), out, ref):
    assert a.shape == b.shape, name
    assert _rel(a, b) < RTOL, (name, _rel(a, b))


def _numpy_conv(x, w, strides, pads):
  """float64 direct convolution and its weight gradient for a cotangent (independent of XLA)."""
  nd = x.ndim - 2
  xp = np.pad(x, [(0, 0)] + list(pads) + [(0, 0)])
  out = [(n - k) // s + 1 for n, k, s in zip(xp.shape[1:-1], w.shape[:nd], strides)]
  y = np.zeros((x.shape[0],) + tuple(out) + (w.shape[-1],))
  for tap in itertools.product(*(range(k) for k in w.shape[:nd])):
    sl = (slice(None),) + tuple(slice(t, t + s * (o - 1) + 1, s)
                                for t, s, o in zip(tap, strides, out)) + (slice(None),)
    y += np.einsum('...i,io->...o', xp[sl], w[tap])
  return y


@pytest.mark.parametrize('nd,s', [(2, 1), (2, 2), (3, 1), (3, 2)])
def test_auto_matches_a_float64_numpy_convolution(nd, s):
  x, w, strides = _case(nd, 3, s, seed=3)
  pads = lax.padtype_to_pads(x.shape[1:-1], w.shape[:-2], strides, 'SAME')
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  y64 = _numpy_conv(x64, w64, strides, pads)
  g = np.random.default_rng(2).normal(size=y64.shape)
  # Weight gradient by linearity: d<y, g>/dw[tap, i, o] is the sum of x-patch * g.
  dw64 = np.zeros_like(w64)
  for idx in itertools.product(*(range(n) for n in w.shape)):
    e = np.zeros_like(w64)
    e[idx] = 1.0
    dw64[idx] = np.sum(_numpy_conv(x64, e, strides, pads) * g)
  y, _, dw = _conv_and_grads('auto', x, w, strides, 'SAME', jnp.asarray(g, jnp.float32))
  assert _rel(y, y64) < RTOL
  assert _rel(dw, dw64) < RTOL


def test_uncovered_convolutions_go_to_xla_unchanged():
  x, w, strides = _case(2, 3, 1, cin=4)
  kw = dict(dimension_numbers=conv_lib._channels_last(2))
  dilated = conv_lib.conv_general_dilated(x, w, strides, 'SAME', rhs_dilation=(2, 2), impl='auto',
                                          **kw)
  np.testing.assert_array_equal(dilated, lax.conv_general_dilated(
      x, w, strides, 'SAME', rhs_dilation=(2, 2), **kw))
  grouped = conv_lib.conv_general_dilated(x, w[:, :, :2], strides, 'SAME', feature_group_count=2,
                                          impl='auto', **kw)
  np.testing.assert_array_equal(grouped, lax.conv_general_dilated(
      x, w[:, :, :2], strides, 'SAME', feature_group_count=2, **kw))


def test_auto_is_xla_off_cpu_and_unknown_impl_is_an_error():
  for backend in ('gpu', 'tpu', 'cuda', 'rocm'):
    assert conv_lib.choose_impl(backend, (8, 28, 28, 28, 64), (3, 3, 3, 64, 64), (1, 1, 1)) == 'xla'
  cpu = functools.partial(conv_lib.choose_impl, 'cpu')
  assert cpu((8, 28, 28, 28, 64), (3, 3, 3, 64, 64), (1, 1, 1)) == 'depth_stack'
  assert cpu((8, 28, 28, 28, 64), (3, 3, 3, 64, 128), (2, 2, 2)) == 'depth_taps'
  assert cpu((8, 14, 14, 14, 128), (3, 3, 3, 128, 128), (1, 1, 1)) == 'depth_taps'
  assert cpu((128, 28, 28, 64), (3, 3, 64, 64), (1, 1)) == 'matmul_wgrad'
  assert cpu((128, 7, 7, 256), (3, 3, 256, 256), (1, 1)) == 'xla'
  assert cpu((128, 28, 28, 1), (3, 3, 1, 64), (1, 1)) == 'xla'  # a first layer: too thin
  assert cpu((128, 28, 28, 64), (1, 1, 64, 128), (2, 2)) == 'pointwise'
  with pytest.raises(ValueError, match="unknown conv_impl 'fast'.*xla"):
    build_model('simple_cnn', 2, conv_impl='fast').init(jax.random.PRNGKey(0),
                                                         jnp.zeros((1, 8, 8, 1)))


@pytest.mark.parametrize('nd', [2, pytest.param(3, marks=pytest.mark.slow)])
def test_conv_transpose_equals_flax_with_the_same_parameters(nd):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2,) + (3, 4, 5)[:nd] + (6,)), jnp.float32)
  ref_module = nn.ConvTranspose(5, (2,) * nd, strides=(2,) * nd)
  variables = ref_module.init(jax.random.PRNGKey(0), x)
  variables = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32),
                           variables)
  for impl in ('auto', 'pointwise', 'xla'):
    module = conv_lib.ConvTranspose(5, (2,) * nd, (2,) * nd, conv_impl=impl)
    assert (jax.tree.map(jnp.shape, module.init(jax.random.PRNGKey(0), x))
            == jax.tree.map(jnp.shape, variables))
    g = jnp.asarray(rng.normal(size=(2,) + tuple(2 * n for n in x.shape[1:-1]) + (5,)),
                    jnp.float32)
    loss = lambda m: (lambda v, x: jnp.vdot(m.apply(v, x), g))  # noqa: E731
    ref = jax.grad(loss(ref_module), (0, 1))(variables, x)
    out = jax.grad(loss(module), (0, 1))(variables, x)
    assert _rel(module.apply(variables, x), ref_module.apply(variables, x)) < RTOL
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
      assert _rel(a, b) < RTOL


@pytest.mark.parametrize('name,kwargs,shape', [
    ('simple_cnn', {}, (4, 16, 16, 1)),
    # Two stages: BatchNorm over a 1-voxel map of a batch of 2 would be ill-conditioned.
    ('resnet', dict(stage_sizes=(1, 1), width=4), (2, 8, 8, 8, 1)),
    ('unet', dict(features=(4, 8, 16), strides=(1, 2, 2), deep_supervision=True),
     (2, 8, 16, 8, 1)),
    ('unet', dict(features=(4, 8), strides=(1, 2), block='residual', upsample='resize'),
     (2, 16, 16, 2)),
])
@pytest.mark.slow
def test_models_train_the_same_with_auto_and_xla(name, kwargs, shape):
  """Same parameters (names, shapes, initial values), the same gradients, and three SGD
  steps give the same losses to float32 tolerance."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  runs = {}
  for impl in ('xla', 'auto'):
    model = build_model(name, 3, conv_impl=impl, **kwargs)
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    tx = optax.sgd(0.01)
    params, stats = variables['params'], variables.get('batch_stats', {})
    opt_state = tx.init(params)

    def loss_fn(p, stats):
      out, new = model.apply({'params': p, 'batch_stats': stats}, x, train=True,
                             mutable=['batch_stats'])
      out = out if isinstance(out, list) else [out]
      return sum(jnp.mean(o.astype(jnp.float32) ** 2) for o in out), new
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))  # one compilation
    losses, first_grads = [], None
    for _ in range(3):
      (loss, new), grads = grad_fn(params, stats)
      first_grads = grads if first_grads is None else first_grads
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      stats = new.get('batch_stats', stats)
      losses.append(float(loss))
    runs[impl] = (variables, losses, first_grads)
  (v_xla, l_xla, p_xla), (v_auto, l_auto, p_auto) = runs['xla'], runs['auto']
  assert jax.tree.structure(v_xla) == jax.tree.structure(v_auto)
  for a, b in zip(jax.tree.leaves(v_xla), jax.tree.leaves(v_auto)):
    np.testing.assert_array_equal(a, b)  # initialisation does not depend on the implementation
  np.testing.assert_allclose(l_auto, l_xla, rtol=1e-4)
  # Per leaf, relative to the leaf's largest gradient; a conv bias before InstanceNorm has a
  # zero gradient in exact arithmetic (rounding only), so allow 1e-6 of the largest gradient.
  scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(p_xla))
  for a, b in zip(jax.tree.leaves(p_auto), jax.tree.leaves(p_xla)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(b))) + 1e-6 * scale)
