"""One convolution op for every medjax model, with implementations that are fast on CPU.

XLA's CPU convolutions are slow where PyTorch's (oneDNN) are not: the weight gradient of a 2D
convolution and every pass of a 3D one run at a fraction of the speed of XLA's own 2D forward
pass and of a plain matrix multiplication. The implementations here compute the same
convolution (values and both gradients equal XLA's to float32 rounding) from those fast parts:

* ``'xla'``: ``lax.conv_general_dilated``, unchanged.
* ``'matmul_wgrad'``: XLA's forward pass and input gradient; the weight gradient as matrix
  products of the input with the output gradient ``[N, C_out]`` (``N`` = batch x output
  positions) through a ``jax.custom_vjp``: for stride 1 one product per kernel tap of a
  shifted row block of the flattened padded input (no patch copy), otherwise of the input
  patches ``[N, taps * C_in]``.
* ``'patch_wgrad'``: as ``'matmul_wgrad'``, but the weight gradient is always one product of
  the input patches ``[N, taps * C_in]`` (a ``taps``-fold copy of the input, then one wide
  product instead of ``taps`` thin ones; faster on small maps and thin inputs on some CPUs).
* ``'depth_stack'`` (3D): a ``k_d x k_h x k_w`` convolution as one 2D convolution of depth
  slices (batch and output-depth axes folded together) whose input channels are the ``k_d``
  depth taps side by side (``k_d * C_in`` channels, a ``k_d``-fold copy of the input).
* ``'depth_taps'`` (3D): the same as the sum over the ``k_d`` depth taps of 2D convolutions
  (no copy; better for wide or strided layers). The 2D convolutions inside either take the
  2D rule of ``'auto'`` for their own shapes.
* ``'pointwise'`` (kernel size 1 everywhere): a (strided) slice and a matrix product.

``'auto'`` (the default of ``model.conv_impl``) decides per backend and per layer when the
computation is traced: on GPU and TPU it is always ``'xla'`` (their convolutions are already
the fast path); on CPU it is the choice recorded by the run or measured once on this machine
and cached (``medjax.models.conv_tune``), else the rule in ``rule_impl``, taken from
``benchmarks/conv_vs_torch.py`` on 2-core Intel Xeon and AMD Zen4 machines. Anything the fast
implementations do not cover (grouped, dilated or transposed convolutions, other layouts) goes
to XLA. The choice is a function of the shapes, the machine's cache and the run's record,
never of a timing taken by the run that uses it, so the same config, machine and cache always
run the same program and give the same numbers.

Shapes follow flax's ``nn.Conv``: inputs ``[B, *spatial, C_in]``, kernels
``[*kernel_size, C_in, C_out]``, outputs ``[B, *out_spatial, C_out]``.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from medjax.models import conv_tune

IMPLS = ('auto',) + conv_tune.CHOICES

Pads = tuple[tuple[int, int], ...]


def check_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"unknown conv_impl '{impl}'; expected one of {', '.join(IMPLS)}")
  return impl


def _channels_last(nd: int) -> lax.ConvDimensionNumbers:
  spatial = 'DHW'[-nd:]
  return lax.conv_dimension_numbers((1,) * (nd + 2), (1,) * (nd + 2),
                                    (f'N{spatial}C', f'{spatial}IO', f'N{spatial}C'))


def _xla(x, w, strides, pads):
  nd = x.ndim - 2
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_channels_last(nd))


def _out_size(size: int, k: int, s: int, pad: tuple[int, int]) -> int:
  return (size + pad[0] + pad[1] - k) // s + 1


def _pad_spatial(x: jax.Array, pads: Pads) -> jax.Array:
  """Zero-pads the spatial axes of ``x [B, *S, C]`` by ``pads`` (negative pads crop)."""
  return lax.pad(x, jnp.zeros((), x.dtype),
                 [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)])


def _patches(x: jax.Array, kernel_size: Sequence[int], strides: Sequence[int],
             pads: Pads) -> jax.Array:
  """``[B, *S, C]`` -> ``[B, *S_out, taps, C]``: the input under each kernel tap (taps in
  row-major kernel order, so ``reshape(-1, C_in, C_out)`` of a kernel lines up with them)."""
  xp = _pad_spatial(x, pads)
  out = [_out_size(n, k, s, p) for n, k, s, p in zip(x.shape[1:-1], kernel_size, strides, pads)]
  cols = []
  for tap in itertools.product(*(range(k) for k in kernel_size)):
    start = (0,) + tap + (0,)
    limit = (xp.shape[0],) + tuple(t + s * (o - 1) + 1 for t, s, o in
                                   zip(tap, strides, out)) + (xp.shape[-1],)
    cols.append(lax.slice(xp, start, limit, (1,) + tuple(strides) + (1,)))
  return jnp.stack(cols, axis=-2)


def _weight_grad_patches(x, g, kernel_shape, strides, pads):
  cin, cout = kernel_shape[-2], kernel_shape[-1]
  p = _patches(x, kernel_shape[:-2], strides, pads)
  p = p.reshape(-1, p.shape[-2] * cin)
  dw = lax.dot_general(p, g.reshape(-1, cout), (((0,), (0,)), ((), ())))
  return dw.reshape(kernel_shape)


def _weight_grad_shifted(x, g, kernel_shape, pads):
  """Stride 1, without materialising patches: on the flattened padded grid a kernel tap is a
  constant row offset, so each tap's gradient is one product of a contiguous row block of
  ``x`` with the output gradient (zero-extended to the padded grid)."""
  nd, cin, cout = x.ndim - 2, kernel_shape[-2], kernel_shape[-1]
  xp = _pad_spatial(x, pads)
  grid = xp.shape[1:-1]
  gp = lax.pad(g, jnp.zeros((), g.dtype), [(0, 0, 0)] + [(0, n - o, 0) for n, o in
                                                         zip(grid, g.shape[1:-1])] + [(0, 0, 0)])
  xf, gf = xp.reshape(-1, cin), gp.reshape(-1, cout)
  row_stride = [math.prod(grid[i + 1:]) for i in range(nd)]
  offsets = [sum(t * r for t, r in zip(tap, row_stride))
             for tap in itertools.product(*(range(k) for k in kernel_shape[:-2]))]
  rows = xf.shape[0] - max(offsets)
  taps = [lax.dot_general(lax.slice_in_dim(xf, o, o + rows), gf[:rows],
                          (((0,), (0,)), ((), ()))) for o in offsets]
  return jnp.stack(taps).reshape(kernel_shape)


def _weight_grad(x: jax.Array, g: jax.Array, kernel_shape: Sequence[int],
                 strides: Sequence[int], pads: Pads, patches: bool = False) -> jax.Array:
  """d(loss)/d(kernel) = patches(x)^T @ g, contracted over batch and output positions."""
  if all(s == 1 for s in strides) and not patches:
    return _weight_grad_shifted(x, g, kernel_shape, pads)
  return _weight_grad_patches(x, g, kernel_shape, strides, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_matmul_wgrad(x, w, strides, pads, patches=False):
  return _xla(x, w, strides, pads)


def _conv_matmul_wgrad_fwd(x, w, strides, pads, patches=False):
  return _xla(x, w, strides, pads), (x, w)


def _conv_matmul_wgrad_bwd(strides, pads, patches, residuals, g):
  x, w = residuals
  _, input_vjp = jax.vjp(lambda x_: _xla(x_, w, strides, pads), x)
  (dx,) = input_vjp(g)  # XLA's own input gradient (a transposed convolution): fast on CPU
  return dx, _weight_grad(x, g, w.shape, strides, pads, patches)


_conv_matmul_wgrad.defvjp(_conv_matmul_wgrad_fwd, _conv_matmul_wgrad_bwd)


def _conv_pointwise(x, w, strides, pads):
  """Kernel size 1: pad, take every ``stride``-th position, multiply by ``[C_in, C_out]``."""
  x = _pad_spatial(x, pads)
  x = x[(slice(None),) + tuple(slice(None, None, s) for s in strides)]
  return jnp.einsum('...i,io->...o', x, w.reshape(w.shape[-2:]))


def _depth_slices(x, kd: int, sd: int, pd: tuple[int, int]) -> list:
  """``x [B, D, H, W, C]`` -> per depth tap ``t`` the input under that tap for every output
  depth, ``[B, D_out, H, W, C]`` (depth padded by ``pd``, stride ``sd``)."""
  dout = _out_size(x.shape[1], kd, sd, pd)
  xp = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (pd[0], pd[1], 0)] + [(0, 0, 0)] * 3)
  return [lax.slice_in_dim(xp, t, t + sd * (dout - 1) + 1, sd, axis=1) for t in range(kd)]


def _conv_depth_taps(x, w, strides, pads, inner: str):
  """3D convolution as the sum over depth taps of 2D convolutions of depth slices."""
  y = None
  for t, xs in enumerate(_depth_slices(x, w.shape[0], strides[0], pads[0])):
    b, dout = xs.shape[:2]
    yt = _conv_nd(xs.reshape((b * dout,) + xs.shape[2:]), w[t], strides[1:], pads[1:], inner)
    y = yt if y is None else y + yt
  return y.reshape((b, dout) + y.shape[1:])


def _conv_depth_stack(x, w, strides, pads, inner: str):
  """3D convolution as one 2D convolution whose channels are the ``k_d`` depth taps."""
  kd, cin, cout = w.shape[0], w.shape[-2], w.shape[-1]
  xs = jnp.concatenate(_depth_slices(x, kd, strides[0], pads[0]), axis=-1)
  b, dout = xs.shape[:2]
  w2 = jnp.moveaxis(w, 0, 2).reshape(w.shape[1:3] + (kd * cin, cout))
  y = _conv_nd(xs.reshape((b * dout,) + xs.shape[2:]), w2, strides[1:], pads[1:], inner)
  return y.reshape((b, dout) + y.shape[1:])


# 2D layers with fewer output positions per image than this keep XLA's weight gradient: with
# few rows the matrix product of the patches does not beat it (7x7 and 10x14 maps lose,
# 14x14 and larger win; benchmarks/conv_vs_torch.py).
MATMUL_WGRAD_MIN_POSITIONS = 160
# ... and so do layers with fewer input channels than this (an image's first layer): one
# product per tap of a [N, C_in] block is too thin to beat XLA (1 -> 64 ch at 28 px: 0.65x).
MATMUL_WGRAD_MIN_CHANNELS = 8
# 3D stride-1 layers with at most this many stacked input channels (k_d * C_in) run as one 2D
# convolution over the stacked depth taps; wider or strided ones as a sum over depth taps.
DEPTH_STACK_MAX_CHANNELS = 192


def choose_impl(backend: str, input_shape: Sequence[int], kernel_shape: Sequence[int],
                strides: Sequence[int], pads: Pads | None = None) -> str:
  """What ``'auto'`` runs for one layer (input ``[B, *S, C_in]``, kernel
  ``[*K, C_in, C_out]``): XLA off CPU; on CPU the choice pinned by the run or measured on
  this machine (``medjax.models.conv_tune``), else :func:`rule_impl`."""
  if backend != 'cpu':
    return 'xla'
  if pads is None:
    pads = tuple(lax.padtype_to_pads(input_shape[1:-1], kernel_shape[:-2], strides, 'SAME'))
  return conv_tune.lookup(input_shape, kernel_shape, strides, pads,
                          rule_impl(input_shape, kernel_shape, strides), convolve)


def rule_impl(input_shape: Sequence[int], kernel_shape: Sequence[int],
              strides: Sequence[int]) -> str:
  """The fixed CPU rule, from the per-layer measurements of ``benchmarks/conv_vs_torch.py``
  on Intel Xeon and AMD Zen 4 (see docs/cpu_convolutions.md)."""
  nd = len(input_shape) - 2
  ksize = tuple(kernel_shape[:-2])
  if all(k == 1 for k in ksize):
    return 'pointwise'
  if nd == 3:
    if all(s == 1 for s in strides) and ksize[0] * kernel_shape[-2] <= DEPTH_STACK_MAX_CHANNELS:
      return 'depth_stack'
    return 'depth_taps'
  positions = math.prod(-(-n // s) for n, s in zip(input_shape[1:-1], strides))
  wide = kernel_shape[-2] >= MATMUL_WGRAD_MIN_CHANNELS
  return 'matmul_wgrad' if wide and positions >= MATMUL_WGRAD_MIN_POSITIONS else 'xla'


def convolve(x: jax.Array, w: jax.Array, strides: Sequence[int], pads: Pads,
             impl: str) -> jax.Array:
  """Channels-last convolution ``x [B, *S, C_in] * w [*K, C_in, C_out]`` run by ``impl``
  (explicit ``pads``, one ``(low, high)`` per spatial axis)."""
  return _conv_nd(x, w, tuple(strides), tuple(map(tuple, pads)), check_impl(impl))


def _conv_nd(x, w, strides, pads, impl):
  """Channels-last convolution ``x [B, *S, C_in] * w [*K, C_in, C_out]`` by ``impl``."""
  if impl == 'auto':
    impl = choose_impl(jax.default_backend(), x.shape, w.shape, strides, pads)
  if impl == 'xla':
    return _xla(x, w, strides, pads)
  if impl == 'pointwise' and all(k == 1 for k in w.shape[:-2]):
    return _conv_pointwise(x, w, strides, pads)
  if impl in ('depth_taps', 'depth_stack') and x.ndim == 5:
    # The 2D convolutions inside take the 2D rule for their own shapes.
    method = _conv_depth_stack if impl == 'depth_stack' else _conv_depth_taps
    return method(x, w, strides, pads, 'auto')
  # 'matmul_wgrad', 'patch_wgrad', and the others where they do not apply (a kernel > 1 for
  # 'pointwise', a 2D layer for the depth methods): the matrix-product weight gradient.
  return _conv_matmul_wgrad(x, w, tuple(strides), pads, impl == 'patch_wgrad')


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None, *,
                         impl: str = 'auto'):
  """Drop-in for ``lax.conv_general_dilated`` (flax's ``nn.Conv`` hook) that runs ``impl``.

  Covered: 2D and 3D channels-last convolutions (flax's layout), any kernel size, stride and
  explicit or 'SAME'/'VALID' padding, float inputs. Everything else (dilation, groups, other
  layouts) is passed to XLA unchanged.
  """
  nd = lhs.ndim - 2
  xla = functools.partial(lax.conv_general_dilated, lhs, rhs, window_strides, padding,
                          lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                          dimension_numbers=dimension_numbers,
                          feature_group_count=feature_group_count,
                          batch_group_count=batch_group_count, precision=precision,
                          preferred_element_type=preferred_element_type)
  covered = (
      impl != 'xla' and nd in (2, 3)
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      == _channels_last(nd)
      and all(d == 1 for d in (lhs_dilation or (1,) * nd))
      and all(d == 1 for d in (rhs_dilation or (1,) * nd))
      and feature_group_count == 1 and batch_group_count == 1
      and preferred_element_type is None
      and jnp.issubdtype(lhs.dtype, jnp.floating) and lhs.dtype == rhs.dtype)
  if not covered:
    return xla()
  if isinstance(padding, str):
    pads = tuple(lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:-2], window_strides, padding))
  else:
    pads = tuple(tuple(p) for p in padding)
  return _conv_nd(lhs, rhs, tuple(window_strides), pads, check_impl(impl))


def conv_op(impl: str = 'auto'):
  """The ``conv_general_dilated`` to give ``nn.Conv`` for ``impl`` (``None`` for 'xla', so a
  model built with 'xla' is exactly flax's default ``nn.Conv``)."""
  check_impl(impl)
  if impl == 'xla':
    return None
  return functools.partial(conv_general_dilated, impl=impl)


def make_conv(features: int, kernel_size: Sequence[int], strides: int | Sequence[int] = 1, *,
              conv_impl: str = 'auto', **kwargs) -> nn.Conv:
  """flax ``nn.Conv`` running ``conv_impl`` (same parameters, names and checkpoints as a
  plain ``nn.Conv``; every medjax model builds its convolutions here)."""
  return nn.Conv(features, kernel_size, strides, conv_general_dilated=conv_op(conv_impl),
                 **kwargs)


def conv_transpose(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                   impl: str = 'auto') -> jax.Array:
  """flax ``nn.ConvTranspose`` (``padding='SAME'``, ``transpose_kernel=False``) of
  ``x [B, *S, C_in]`` with ``kernel [*K, C_in, C_out]`` -> ``[B, *(S * strides), C_out]``.

  When kernel size equals the stride (U-Net upsampling) the output positions of different
  input voxels do not overlap: each input voxel's ``C_in`` vector times the kernel gives its
  ``prod(K)`` output voxels. That is one matrix product and a depth-to-space reshape, which
  XLA runs (both gradients too) at matmul speed; its 3D transposed convolution's gradient is
  slow on CPU. Other cases, and ``impl='xla'``, use ``lax.conv_transpose``.
  """
  nd = x.ndim - 2
  ksize = tuple(kernel.shape[:nd])
  strides = tuple(strides)
  if impl == 'auto':
    impl = 'xla' if jax.default_backend() != 'cpu' else 'pointwise'
  if impl == 'xla' or ksize != strides:
    return lax.conv_transpose(x, kernel, strides, 'SAME')
  b, spatial, cin, cout = x.shape[0], x.shape[1:-1], x.shape[-1], kernel.shape[-1]
  # lax.conv_transpose (SAME, kernel = stride) gives output offset a the kernel tap k-1-a.
  kernel = jnp.flip(kernel, axis=tuple(range(nd)))
  y = jnp.einsum('b...i,io->b...o', x, kernel.reshape(-1, cin, cout).transpose(1, 0, 2)
                 .reshape(cin, -1))
  y = y.reshape((b,) + spatial + ksize + (cout,))
  # [B, s1, .., sn, k1, .., kn, C] -> [B, s1, k1, .., sn, kn, C] -> [B, s1*k1, .., C]
  perm = (0,) + tuple(i for pair in zip(range(1, nd + 1), range(nd + 1, 2 * nd + 1))
                      for i in pair) + (2 * nd + 1,)
  y = y.transpose(perm)
  return y.reshape((b,) + tuple(n * k for n, k in zip(spatial, ksize)) + (cout,))


class ConvTranspose(nn.Module):
  """``nn.ConvTranspose`` (SAME padding) with the same parameters (``kernel
  [*K, C_in, C_out]``, ``bias [C_out]``) that runs ``conv_transpose`` with ``conv_impl``."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int]
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
  use_bias: bool = True
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init,
                        tuple(self.kernel_size) + (x.shape[-1], self.features))
    y = conv_transpose(x, kernel.astype(x.dtype), self.strides, check_impl(self.conv_impl))
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,)).astype(y.dtype)
    return y
