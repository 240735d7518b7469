"""medjax convolutions and train steps next to PyTorch eager (CPU), in one process.

(a) Every distinct convolution layer of ResNet-18 (28 px, batch 128), the Hippocampus 3D U-Net
    (40x56x40, batch 2) and the 3D ResNet-18 (28^3, batch 32): forward + both gradients,
    GFLOP/s, for medjax with ``conv_impl='xla'`` (XLA's own convolution), ``'auto'`` (what
    medjax runs; the implementation it picks is printed) and PyTorch.
(b) Whole train steps (forward, backward, SGD-momentum update; cross-entropy) of ResNet-18
    28 px batch 128, a 2D U-Net 128 px batch 16, the Hippocampus 3D U-Net 40x56x40 batch 2
    and the 3D ResNet-18 28^3 batch 32: images (patches) per second and the ratio to PyTorch.
    The PyTorch models are written here with the same layers, widths and parameter counts.

Each measurement is the median of ``--reps`` timed repetitions after warm-up (compile
excluded); medjax and PyTorch are measured back to back for each case, so the ratio holds
on a shared, noisy machine. Needs PyTorch: ``pip install -e ".[bench]"``.

A layer or train step that does not fit in this machine's memory (XLA's memory analysis of
the compiled program against the available RAM, or an out-of-memory error while it runs) is
skipped with its reason, printed and written to the JSON as ``{"case": ..., "skipped": ...}``;
the other cases still run and are written.

The 3D ResNet-18 at batch 32 with XLA's convolutions takes minutes per layer and per step,
so its case runs at a smaller batch and goes to its own file. The committed results:

  python benchmarks/conv_vs_torch.py --models resnet18_28 unet3d_hippocampus \
      --cases resnet18_28 unet2d_128 unet3d_hippocampus                  # ~30 min, 2 cores
  python benchmarks/conv_vs_torch.py --models resnet18_3d_28 --cases resnet18_3d_28 \
      --batch 4 --reps 1 --out benchmarks/results/conv_vs_torch_resnet18_3d.json
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time
from typing import Callable, Dict, List

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

from medjax.models import build_model, conv as conv_lib, conv_tune
from results_table import (check_fits, print_skipped, print_table, run_case,
                           write_results)  # benchmarks/ is on sys.path when run

HERE = os.path.dirname(os.path.abspath(__file__))

# name: (medjax model name, kwargs, input shape without batch (channels last), batch, classes)
MODELS = {
    'resnet18_28': ('resnet18', dict(stem='medmnist'), (28, 28, 1), 128, 2),
    'unet2d_128': ('unet', dict(features=(32, 64, 128, 256), strides=(1, 2, 2, 2)),
                   (128, 128, 1), 16, 2),
    'unet3d_hippocampus': ('unet', dict(features=(32, 64, 128, 256), strides=(1, 2, 2, 2)),
                           (40, 56, 40, 1), 2, 3),
    'resnet18_3d_28': ('resnet18', dict(stem='medmnist'), (28, 28, 28, 1), 32, 2),
}
LAYER_MODELS = ('resnet18_28', 'unet3d_hippocampus', 'resnet18_3d_28')


def cpu_model() -> str:
  return conv_tune.cpu_model()


def median_seconds(fn: Callable[[], None], reps: int, warmup: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


# ---------------------------------------------------------------- (a) convolution layers


def conv_layers(model_key: str) -> List[Dict]:
  """Distinct convolutions of a model, recorded by intercepting its flax modules."""
  name, kwargs, shape, batch, classes = MODELS[model_key]
  model = build_model(name, classes, **kwargs)
  seen: Dict[tuple, Dict] = {}

  def record(next_fun, args, call_kwargs, context):
    module = context.module
    if context.method_name == '__call__' and isinstance(module, (nn.Conv, conv_lib.ConvTranspose)):
      x = args[0]
      nd = x.ndim - 2
      k = tuple(module.kernel_size)
      s = module.strides or 1
      s = (s,) * nd if isinstance(s, int) else tuple(s)
      transpose = isinstance(module, conv_lib.ConvTranspose)
      key = (tuple(x.shape), module.features, k, s, transpose)
      if key not in seen:
        seen[key] = dict(model=model_key, input=tuple(x.shape), cout=module.features,
                         kernel=k, strides=s, transpose=transpose, count=0)
      seen[key]['count'] += 1
    return next_fun(*args, **call_kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x),
                   jax.ShapeDtypeStruct((batch,) + shape, jnp.float32))
  return list(seen.values())


def _jax_layer_fn(layer: Dict, impl: str):
  nd = len(layer['input']) - 2
  if layer['transpose']:
    def f(x, w):
      return conv_lib.conv_transpose(x, w, layer['strides'], impl)
  else:
    def f(x, w):
      return conv_lib.conv_general_dilated(
          x, w, layer['strides'], 'SAME', dimension_numbers=conv_lib._channels_last(nd),
          impl=impl)
  return jax.jit(jax.grad(lambda x, w, g: jnp.vdot(f(x, w), g), argnums=(0, 1)))


def layer_name(layer: Dict) -> str:
  """E.g. ``conv 3x3/2 64->128 @28x28 b128``."""
  b, spatial, cin = layer['input'][0], layer['input'][1:-1], layer['input'][-1]
  k, s = layer['kernel'], layer['strides']
  return (('convT ' if layer['transpose'] else 'conv ') + 'x'.join(map(str, k))
          + (f"/{s[0]}" if s[0] > 1 else '') + f" {cin}->{layer['cout']} "
          f"@{'x'.join(map(str, spatial))} b{b}")


def bench_layer(layer: Dict, reps: int) -> Dict:
  nd = len(layer['input']) - 2
  b, spatial, cin = layer['input'][0], layer['input'][1:-1], layer['input'][-1]
  cout, k, s = layer['cout'], layer['kernel'], layer['strides']
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=layer['input']), jnp.float32)
  w = jnp.asarray(rng.normal(size=k + (cin, cout)) / math.sqrt(cin * math.prod(k)), jnp.float32)
  if layer['transpose']:
    out = tuple(n * st for n, st in zip(spatial, s))
    flops = 2 * b * math.prod(spatial) * cin * cout * math.prod(k)
  else:
    out = tuple(-(-n // st) for n, st in zip(spatial, s))
    flops = 2 * b * math.prod(out) * cin * cout * math.prod(k)
  g = jnp.asarray(rng.normal(size=(b,) + out + (cout,)), jnp.float32)
  row = dict(model=layer['model'], count=layer['count'], layer=layer_name(layer))
  if layer['transpose']:
    row['auto_impl'] = 'xla' if k != s or jax.default_backend() != 'cpu' else 'pointwise'
  else:
    row['auto_impl'] = conv_lib.choose_impl(jax.default_backend(), layer['input'],
                                            k + (cin, cout), s)
  warmup = 1 if nd == 3 else 2
  for impl in ('xla', 'auto'):
    fn = _jax_layer_fn(layer, impl)
    check_fits(fn, x, w, g)
    secs = median_seconds(lambda: jax.block_until_ready(fn(x, w, g)), reps, warmup)
    row[f'{impl}_gflops'] = 3 * flops / secs / 1e9
  # PyTorch: channels first, input and weight gradients, as above.
  xt = torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy()).requires_grad_(True)
  gt = torch.from_numpy(np.moveaxis(np.asarray(g), -1, 1).copy())
  if layer['transpose']:
    wt = torch.randn(cin, cout, *k, requires_grad=True)
    op = F.conv_transpose2d if nd == 2 else F.conv_transpose3d
    run = lambda: op(xt, wt, stride=s)  # noqa: E731
  else:
    wt = torch.randn(cout, cin, *k, requires_grad=True)
    op = F.conv2d if nd == 2 else F.conv3d
    run = lambda: op(xt, wt, stride=s, padding=tuple(kk // 2 for kk in k))  # noqa: E731

  def torch_step():
    xt.grad = None
    wt.grad = None
    run().backward(gt)
  secs = median_seconds(torch_step, reps, warmup)
  row['torch_gflops'] = 3 * flops / secs / 1e9
  row['gflop'] = 3 * flops / 1e9  # forward + input gradient + weight gradient
  row['auto_vs_xla'] = row['auto_gflops'] / row['xla_gflops']
  row['auto_vs_torch'] = row['auto_gflops'] / row['torch_gflops']
  print(f"  {row['layer']}: xla {row['xla_gflops']:.1f}, auto ({row['auto_impl']}) "
        f"{row['auto_gflops']:.1f}, torch {row['torch_gflops']:.1f} GFLOP/s", flush=True)
  return row


# ---------------------------------------------------------------- (b) whole train steps


class TorchBasicBlock(torch.nn.Module):
  def __init__(self, nd, cin, cout, stride):
    super().__init__()
    Conv = torch.nn.Conv2d if nd == 2 else torch.nn.Conv3d
    Norm = torch.nn.BatchNorm2d if nd == 2 else torch.nn.BatchNorm3d
    self.conv1 = Conv(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = Norm(cout)
    self.conv2 = Conv(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = Norm(cout)
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj = torch.nn.Sequential(Conv(cin, cout, 1, stride, bias=False), Norm(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.proj is None else self.proj(x)))


class TorchResNet18(torch.nn.Module):
  """medjax's resnet18 with the MedMNIST stem (3x3 stride 1, no max-pool)."""

  def __init__(self, nd, cin, classes, width=64):
    super().__init__()
    Conv = torch.nn.Conv2d if nd == 2 else torch.nn.Conv3d
    Norm = torch.nn.BatchNorm2d if nd == 2 else torch.nn.BatchNorm3d
    self.stem = torch.nn.Sequential(Conv(cin, width, 3, 1, 1, bias=False), Norm(width),
                                    torch.nn.ReLU())
    blocks, c = [], width
    for i in range(4):
      for j in range(2):
        out = width * 2**i
        blocks.append(TorchBasicBlock(nd, c, out, 2 if i > 0 and j == 0 else 1))
        c = out
    self.blocks = torch.nn.Sequential(*blocks)
    self.head = torch.nn.Linear(c, classes)

  def forward(self, x):
    y = self.blocks(self.stem(x))
    return self.head(y.mean(dim=tuple(range(2, y.ndim))))


class TorchUNet(torch.nn.Module):
  """medjax's plain U-Net: 2 x (conv3 - InstanceNorm - LeakyReLU) per block, strided first
  conv, transposed-conv upsampling (kernel = stride), concatenated skips, 1x1 head."""

  def __init__(self, nd, cin, classes, features, strides):
    super().__init__()
    Conv = torch.nn.Conv2d if nd == 2 else torch.nn.Conv3d
    ConvT = torch.nn.ConvTranspose2d if nd == 2 else torch.nn.ConvTranspose3d
    Norm = torch.nn.InstanceNorm2d if nd == 2 else torch.nn.InstanceNorm3d

    def block(c_in, c_out, stride):
      return torch.nn.Sequential(
          Conv(c_in, c_out, 3, stride, 1), Norm(c_out, affine=True), torch.nn.LeakyReLU(0.01),
          Conv(c_out, c_out, 3, 1, 1), Norm(c_out, affine=True), torch.nn.LeakyReLU(0.01))
    self.encoders = torch.nn.ModuleList()
    c = cin
    for f, s in zip(features, strides):
      self.encoders.append(block(c, f, s))
      c = f
    self.ups, self.decoders = torch.nn.ModuleList(), torch.nn.ModuleList()
    for level in range(len(features) - 2, -1, -1):
      f, s = features[level], strides[level + 1]
      self.ups.append(ConvT(c, f, s, s))
      self.decoders.append(block(2 * f, f, 1))
      c = f
    self.head = Conv(c, classes, 1)

  def forward(self, x):
    skips = []
    for enc in self.encoders:
      x = enc(x)
      skips.append(x)
    for up, dec, skip in zip(self.ups, self.decoders, reversed(skips[:-1])):
      x = dec(torch.cat([up(x), skip], dim=1))
    return self.head(x)


def torch_model(model_key: str) -> torch.nn.Module:
  name, kwargs, shape, _, classes = MODELS[model_key]
  nd = len(shape) - 1
  if name == 'resnet18':
    return TorchResNet18(nd, shape[-1], classes)
  return TorchUNet(nd, shape[-1], classes, kwargs['features'], kwargs['strides'])


def _inputs(model_key: str):
  name, _, shape, batch, classes = MODELS[model_key]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch,) + shape).astype(np.float32)
  label_shape = (batch,) if name == 'resnet18' else (batch,) + shape[:-1]
  return x, rng.integers(0, classes, label_shape).astype(np.int64)


def medjax_step(model_key: str, impl: str):
  """(jitted donated step, state, x, y): cross-entropy, SGD with momentum, BatchNorm
  statistics; ``step(state, x, y) -> (state, loss)``."""
  name, kwargs, shape, batch, classes = MODELS[model_key]
  model = build_model(name, classes, conv_impl=impl, **kwargs)
  x, y = _inputs(model_key)
  variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)
  tx = optax.sgd(0.01, momentum=0.9)
  params, stats = variables['params'], variables.get('batch_stats', {})

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, x, y):
    params, stats, opt_state = state

    def loss_fn(p):
      out, new = model.apply({'params': p, 'batch_stats': stats}, x, train=True,
                             mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), new
    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), new.get('batch_stats', stats), opt_state), loss

  return step, (params, stats, tx.init(params)), jnp.asarray(x), jnp.asarray(y, jnp.int32)


def medjax_train_step(model_key: str, impl: str):
  """A closure running one step of :func:`medjax_step` and waiting for it."""
  step, state0, xj, yj = medjax_step(model_key, impl)
  state = [state0]

  def run():
    state[0], loss = step(state[0], xj, yj)
    jax.block_until_ready(loss)
  return run


def torch_train_step(model_key: str):
  model = torch_model(model_key).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  x, y = _inputs(model_key)
  xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
  yt = torch.from_numpy(y)

  def run():
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(xt), yt).backward()
    opt.step()
  return run, sum(p.numel() for p in model.parameters())


def bench_step(model_key: str, reps: int) -> Dict:
  name, kwargs, shape, batch, classes = MODELS[model_key]
  nd = len(shape) - 1
  warmup = 1 if nd == 3 else 2
  row = dict(case=model_key, batch=batch)
  for impl in ('xla', 'auto'):
    run = medjax_train_step(model_key, impl)
    t0 = time.perf_counter()
    run()
    row[f'{impl}_compile_s'] = time.perf_counter() - t0
    row[f'{impl}_per_s'] = batch / median_seconds(run, reps, warmup - 1)
  run, n_params = torch_train_step(model_key)
  row['torch_per_s'] = batch / median_seconds(run, reps, warmup)
  model = build_model(name, classes, **kwargs)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1,) + shape), train=False))
  row['params_medjax'] = sum(math.prod(v.shape) for v in jax.tree.leaves(variables['params']))
  row['params_torch'] = n_params
  row['auto_vs_xla'] = row['auto_per_s'] / row['xla_per_s']
  row['auto_vs_torch'] = row['auto_per_s'] / row['torch_per_s']
  print(f"  {model_key}: xla {row['xla_per_s']:.2f}/s, auto {row['auto_per_s']:.2f}/s, "
        f"torch {row['torch_per_s']:.2f}/s", flush=True)
  return row


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--part', choices=('all', 'layers', 'steps'), default='all')
  parser.add_argument('--models', nargs='*', default=list(LAYER_MODELS), choices=list(MODELS),
                      help='models whose convolution layers are timed (part a)')
  parser.add_argument('--cases', nargs='*', default=list(MODELS), choices=list(MODELS),
                      help='models whose train steps are timed (part b)')
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--batch', type=int, default=0,
                      help='override the batch size of every model, both parts (0: as listed)')
  parser.add_argument('--out', default=os.path.join(HERE, 'results', 'conv_vs_torch.json'))
  args = parser.parse_args(argv)
  torch.set_num_threads(os.cpu_count() or 1)
  print(f'CPU: {cpu_model()}; {os.cpu_count()} cores; jax {jax.__version__} '
        f'({jax.default_backend()}), torch {torch.__version__} '
        f'({torch.get_num_threads()} threads)')
  if args.batch:
    for key in MODELS:
      MODELS[key] = MODELS[key][:3] + (args.batch,) + MODELS[key][4:]
  layers, steps, conv_seconds = [], [], {}
  if args.part in ('all', 'layers'):
    for key in args.models:
      print(f'layers of {key}:')
      rows = [dict(run_case(layer_name(layer), bench_layer, layer, args.reps, key='layer'),
                   model=key) for layer in conv_layers(key)]
      layers += rows
      # The convolutions' share of a train step: each layer's time, times its count (when
      # every layer could be timed).
      if not any('skipped' in r for r in rows):
        conv_seconds[key] = {impl: sum(r['count'] * r['gflop'] / r[f'{impl}_gflops']
                                       for r in rows) for impl in ('xla', 'auto', 'torch')}
    print_table(layers, [('layer', 'layer', ''), ('count', 'n', 'd'), ('auto_impl', 'auto', ''),
                         ('xla_gflops', 'xla', '.1f'), ('auto_gflops', 'auto', '.1f'),
                         ('torch_gflops', 'torch', '.1f'), ('auto_vs_xla', 'auto/xla', '.2f'),
                         ('auto_vs_torch', 'auto/torch', '.2f')])
  if args.part in ('all', 'steps'):
    print('train steps:')
    steps = [run_case(key, bench_step, key, args.reps) for key in args.cases]
    for row in steps:
      # Time per step outside the convolutions (normalisation, activations, loss, optimizer),
      # when the same model's layers were timed in this run.
      for impl in ('xla', 'auto', 'torch'):
        if row['case'] in conv_seconds and 'skipped' not in row:
          row[f'{impl}_conv_s'] = conv_seconds[row['case']][impl]
          row[f'{impl}_other_s'] = row['batch'] / row[f'{impl}_per_s'] - row[f'{impl}_conv_s']
    print_table(steps, [('case', 'train step', ''), ('batch', 'batch', 'd'),
                        ('xla_per_s', 'xla /s', '.2f'), ('auto_per_s', 'auto /s', '.2f'),
                        ('torch_per_s', 'torch /s', '.2f'), ('auto_vs_xla', 'auto/xla', '.2f'),
                        ('auto_vs_torch', 'auto/torch', '.2f'),
                        ('auto_conv_s', 'auto conv s', '.2f'),
                        ('auto_other_s', 'auto other s', '.2f'),
                        ('torch_conv_s', 'torch conv s', '.2f'),
                        ('torch_other_s', 'torch other s', '.2f')])
  print_skipped(layers, key='layer')
  print_skipped(steps)
  write_results(args.out, layers + steps, cpu=cpu_model(), torch=torch.__version__,
                torch_threads=torch.get_num_threads())


if __name__ == '__main__':
  main()
