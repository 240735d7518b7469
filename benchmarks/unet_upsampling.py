"""U-Net train-step and inference speed, transposed-convolution vs resize+conv upsampling.

JAX's 3D transposed-convolution backward pass is reported to be slow on GPU (jax issue
31662); this times both `model.upsample` choices on the current device, for the
Hippocampus-sized 3D network (and a 2D one), and the sliding-window inference of one
volume.

  python benchmarks/unet_upsampling.py [--steps 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import numpy as np
import optax

from medjax import inference, seg_losses
from medjax.models import build_model
from results_table import (check_fits, print_skipped, print_table, run_case,
                           write_results)  # benchmarks/ is on sys.path when run

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = [('unet3d_40x56x40', (40, 56, 40), 2), ('unet2d_256x256', (256, 256), 4)]


def make_train_step(model, tx):
  """A jit-compiled, donated Dice+CE train step on (params, opt_state)."""
  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, x, y):
    params, opt_state = state
    loss, grads = jax.value_and_grad(
        lambda p: seg_losses.dice_ce_loss(model.apply({'params': p}, x), y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss
  return step


def bench(patch, batch, upsample, steps):
  model = build_model('unet', 3, features=(32, 64, 128, 256), strides=(1, 2, 2, 2),
                      upsample=upsample)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch,) + patch + (1,)).astype(np.float32)
  y = rng.integers(0, 3, (batch,) + patch).astype(np.int32)
  params = model.init(jax.random.PRNGKey(0), x[:1])['params']
  tx = optax.adam(1e-3)
  step = make_train_step(model, tx)
  state = (params, tx.init(params))
  t0 = time.perf_counter()
  check_fits(step, state, x, y)  # a case too large for this machine is skipped, with why
  state, loss = step(state, x, y)
  jax.block_until_ready(loss)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, loss = step(state, x, y)
  jax.block_until_ready(loss)
  step_s = (time.perf_counter() - t0) / steps
  predict = jax.jit(lambda w: jax.nn.softmax(model.apply({'params': state[0]}, w), -1))
  volume = rng.normal(size=tuple(int(p * 1.4) for p in patch) + (1,)).astype(np.float32)
  run = lambda: inference.sliding_window(lambda w: np.asarray(predict(w)), volume, patch,  # noqa
                                         batch_size=batch, overlap=0.5)
  run()  # compile
  t0 = time.perf_counter()
  run()
  infer_s = time.perf_counter() - t0
  return {'upsample': upsample, 'patch': list(patch), 'batch': batch, 'compile_s': compile_s,
          'train_step_s': step_s, 'train_samples_per_s': batch / step_s,
          'inference_volume_shape': list(volume.shape[:-1]), 'inference_s': infer_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--out', default=os.path.join(HERE, 'results', 'unet_upsampling.json'))
  args = parser.parse_args()
  rows = []
  for name, patch, batch in CASES:
    for up in ('transpose', 'resize'):
      row = run_case(f'{name} {up}', bench, patch, batch, up, args.steps)
      rows.append({'case': name, 'upsample': up, **{k: v for k, v in row.items() if k != 'case'}})
  print_table(rows, [('case', 'case', ''), ('upsample', 'upsample', ''), ('batch', 'batch', 'd'),
                     ('compile_s', 'compile s', '.1f'), ('train_step_s', 'step s', '.2f'),
                     ('train_samples_per_s', 'samples/s', '.2f'),
                     ('inference_s', 'infer s', '.2f')])
  print_skipped(rows)
  write_results(args.out, rows)

if __name__ == '__main__':
  main()
