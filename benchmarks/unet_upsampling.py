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
import json
import os
import time

import jax
import numpy as np
import optax

from medjax import inference, seg_losses
from medjax.models import build_model

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
  rows = [dict(case=name, **bench(patch, batch, up, args.steps))
          for name, patch, batch in CASES for up in ('transpose', 'resize')]
  print(f"\n{'case':<18}{'upsample':>10}{'batch':>6}{'compile s':>11}{'step s':>9}"
        f"{'samples/s':>11}{'infer s':>9}")
  for r in rows:
    print(f"{r['case']:<18}{r['upsample']:>10}{r['batch']:>6}{r['compile_s']:>11.1f}"
          f"{r['train_step_s']:>9.2f}{r['train_samples_per_s']:>11.2f}{r['inference_s']:>9.2f}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'device': str(jax.devices()[0]), 'cpu_count': os.cpu_count(), 'results': rows},
              f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
