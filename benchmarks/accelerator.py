"""Train-step throughput on whatever accelerator this machine has (GPU, TPU or CPU), one
command, in float32 and bfloat16, with host and with device augmentation.

Cases (medjax's real train step, :mod:`medjax.experiments.step`: forward, backward, SGD with
momentum, batch or instance statistics; cross-entropy):

* ``resnet18_28``: ResNet-18 (MedMNIST stem), 28 px, batch 128, 2 classes;
* ``unet3d_hippocampus``: the Hippocampus 3D U-Net (32-256 channels, instance norm),
  40x56x40 patches, batch 8 (configs/hippocampus_unet3d.py), 3 classes;
* ``unet3d_128``: an nnU-Net-size 3D U-Net (32-320 channels, 6 levels), 128^3 patches,
  batch 2, 3 classes.

For each case, precision and augmentation place: the step's rate (examples/s, the batch given
as host arrays as a pipeline would), the host pipeline's rate for the same batch (the patch
sampler with nnU-Net-like augmentation on the host, or only the crop when the augmentation
runs on the device; one host core), the peak device memory, and PyTorch (``--torch``: the
same architecture in PyTorch eager on the same device; MONAI's DynUNet too when installed)
with its ratio. Each case runs in its own process, so memory peaks are its own and a case
that does not fit is recorded as skipped with its reason while the others go on.

  python benchmarks/accelerator.py                       # the full table (a GPU or TPU)
  python benchmarks/accelerator.py --torch               # and PyTorch on the same device
  python benchmarks/accelerator.py --tiny --out /tmp/a.json   # seconds, on a CPU (tested)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# name: model, its options, input shape (channels last, no batch), batch, classes.
CASES = {
    'resnet18_28': dict(model='resnet18', options=dict(stem='medmnist'),
                        shape=(28, 28, 1), batch=128, classes=2),
    'unet3d_hippocampus': dict(model='unet', options=dict(features=(32, 64, 128, 256),
                                                          strides=(1, 2, 2, 2)),
                               shape=(40, 56, 40, 1), batch=8, classes=3),
    'unet3d_128': dict(model='unet', options=dict(features=(32, 64, 128, 256, 320, 320),
                                                  strides=(1, 2, 2, 2, 2, 2)),
                       shape=(128, 128, 128, 1), batch=2, classes=3),
}
TINY = {
    'resnet18_28': dict(model='resnet18', options=dict(stem='medmnist', width=4),
                        shape=(16, 16, 1), batch=8, classes=2),
    'unet3d_hippocampus': dict(model='unet', options=dict(features=(4, 8, 8),
                                                          strides=(1, 2, 2)),
                               shape=(8, 16, 8, 1), batch=2, classes=3),
    'unet3d_128': dict(model='unet', options=dict(features=(4, 8, 8), strides=(1, 2, 2)),
                       shape=(16, 16, 16, 1), batch=2, classes=3),
}
PRECISIONS = ('float32', 'bfloat16')
AUGMENT = ('host', 'device')
COLUMNS = [('case', 'case', 's'), ('precision', 'precision', 's'), ('augment', 'augment', 's'),
           ('batch', 'batch', 'd'), ('step_per_s', 'step ex/s', '.2f'),
           ('pipeline_per_s', 'pipeline ex/s', '.2f'), ('peak_mb', 'peak MB', '.0f'),
           ('torch_per_s', 'torch ex/s', '.2f'), ('vs_torch', 'x torch', '.2f'),
           ('monai_per_s', 'MONAI ex/s', '.2f'), ('vs_monai', 'x MONAI', '.2f'),
           ('skipped', 'skipped', 's')]


# Classification augmentation of the benchmark (host: tf.data; device: in the step).
CLASSIFICATION_AUGMENT = dict(flip_lr=True, rotation_deg=15.0, scale_min=0.9, scale_max=1.1,
                              brightness=0.1, contrast=0.1)


def _experiment(case: Dict, precision: str, augment: str):
  """medjax's experiment machinery (mesh, model, optimizer, the compiled step and, with
  ``augment='device'``, the augmentation inside it) around a plain cross-entropy loss."""
  import optax
  from medjax import config as config_lib
  from medjax.data.augment import augment_section
  from medjax.experiments.augment_on import DeviceAugmented
  from medjax.experiments.base import Experiment

  config = config_lib.default_config()
  config.model = dict(name=case['model'], **case['options'])
  config.optimizer.update(name='sgd', learning_rate=0.01, momentum=0.9)
  config.train.update(batch_size=case['batch'], eval_batch_size=case['batch'],
                      precision=precision, progress_bar=False)
  config.data.augment = augment_section(**CLASSIFICATION_AUGMENT)
  config.data.augment_on = augment

  class Bench(DeviceAugmented, Experiment):
    task = 'benchmark'

    def loss(self, outputs, labels):
      return optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean()

  exp = Bench(config)
  exp.setup(case['classes'], case['shape'], steps_per_epoch=1000)
  return exp


def _batch(case: Dict, seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(case['batch'],) + case['shape']).astype(np.float32)
  label_shape = (case['batch'],) if case['model'] == 'resnet18' else (
      (case['batch'],) + case['shape'][:-1])
  return images, rng.integers(0, case['classes'], label_shape).astype(np.int32)


def _segmentation_sampler(case: Dict, augment: str, augment_on: str = 'host'):
  """The patch sampler on one synthetic case 1.5x the patch (a noisy image, a sparse
  label map), with nnU-Net-like augmentation (``augment='host'``) or none; with
  ``augment_on='device'`` it hands out crops for the step to augment with it."""
  from medjax.data.sampling import SegAugment, SegmentationSampler
  spatial = case['shape'][:-1]
  rng = np.random.default_rng(0)
  volume = tuple(int(n * 1.5) for n in spatial)
  label = (rng.random(volume) > 0.97).astype(np.uint8)
  cases = {'case0': (rng.normal(size=volume + (1,)).astype(np.float32), label,
                     {1: np.argwhere(label == 1)})}
  aug = SegAugment.nnunet_like() if augment == 'host' else SegAugment()
  return SegmentationSampler(cases, spatial, case['batch'], seed=0, augment=aug,
                             augment_on=augment_on)


def _device_inputs(exp, case: Dict):
  """What the host sends with ``data.augment_on=device``, and the step's augmentation:
  classification, plain images; segmentation, the sampler's crops (with the margin
  nnU-Net-like rotation and scaling need) and their targets."""
  from medjax.experiments.augment_on import classification_augment, segmentation_augment
  if case['model'] == 'resnet18':
    exp.device_augment = classification_augment(exp, len(case['shape']) - 1)
    return _batch(case)
  exp.sampler = _segmentation_sampler(case, 'host', augment_on='device')
  exp.patch_size = case['shape'][:-1]
  exp.device_augment = segmentation_augment(exp)
  return next(iter(exp.sampler.batches(0, 1)))


def step_rate(case: Dict, precision: str, augment: str, steps: int) -> Dict:
  import jax
  exp = _experiment(case, precision, augment)
  state = exp.init_state()
  images, labels = _device_inputs(exp, case) if augment == 'device' else _batch(case)
  start = time.perf_counter()
  state, metrics = exp.train_step(state, images, labels)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = exp.train_step(state, images, labels)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return dict(step_per_s=case['batch'] / seconds, step_ms=1e3 * seconds, compile_s=compile_s,
              peak_mb=peak / 2**20 if peak else None, loss=float(metrics['loss']))


def pipeline_rate(case: Dict, augment: str, batches: int) -> float:
  """Examples/s of the host producing training examples: patches sampled from a case 1.5x
  the patch with nnU-Net-like augmentation on the host (or only the crop, when it runs on
  the device), in-process on one core; classification batches from medjax's tf.data
  pipeline (flips, rotation, scaling, brightness, contrast; or none)."""
  if case['model'] == 'resnet18':
    from medjax.data.augment import augment_section
    from medjax.data.pipeline import train_batches
    host = augment_section(**CLASSIFICATION_AUGMENT) if augment == 'host' else None
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (case['batch'] * (batches + 1),) + case['shape'], np.uint8)
    labels = rng.integers(0, case['classes'], len(images))
    stream = train_batches(images, labels, global_batch=case['batch'], seed=0, start_step=0,
                           num_steps=batches + 1, pixel_max=255.0, mean=0.5, std=0.25,
                           augment=host)
    next(stream)  # tf.data's start-up
    start = time.perf_counter()
    for _ in range(batches):
      next(stream)
    return batches * case['batch'] / (time.perf_counter() - start)
  # With the augmentation on the device the sampler only crops (with the margin that
  # nnU-Net-like rotation and scaling need).
  sampler = _segmentation_sampler(case, 'host', augment_on=augment)
  start = time.perf_counter()
  for step in range(batches):
    for j in range(case['batch']):
      sampler(step, j)
  return batches * case['batch'] / (time.perf_counter() - start)


def torch_rate(case: Dict, precision: str, steps: int) -> Dict:
  """The same architecture in PyTorch eager on this machine's device (autocast for
  bfloat16); MONAI's DynUNet for the U-Nets when MONAI is installed."""
  import torch
  import torch.nn.functional as F
  sys.path.insert(0, HERE)
  from conv_vs_torch import TorchResNet18, TorchUNet
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  nd = len(case['shape']) - 1
  if case['model'] == 'resnet18':
    model = TorchResNet18(nd, case['shape'][-1], case['classes'],
                          case['options'].get('width', 64))
  else:
    model = TorchUNet(nd, case['shape'][-1], case['classes'], case['options']['features'],
                      case['options']['strides'])
  images, labels = _batch(case)
  x = torch.from_numpy(np.moveaxis(images, -1, 1).copy()).to(device)
  y = torch.from_numpy(labels.astype(np.int64)).to(device)
  dtype = torch.bfloat16 if precision == 'bfloat16' else torch.float32
  row = dict(torch_device=device)
  for name, net in (('torch', model), ('monai', _monai_unet(case))):
    if net is None:
      continue
    net = net.to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step():
      opt.zero_grad(set_to_none=True)
      with torch.autocast(device, dtype=dtype, enabled=precision != 'float32'):
        loss = F.cross_entropy(net(x), y)
      loss.backward()
      opt.step()
    if device == 'cuda':
      torch.cuda.reset_peak_memory_stats()
    step()
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
      step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    row[f'{name}_per_s'] = case['batch'] / seconds
    row[f'{name}_peak_mb'] = torch.cuda.max_memory_allocated() / 2**20 if device == 'cuda' else None
  return row


def _monai_unet(case: Dict):
  """MONAI's DynUNet (nnU-Net's network) with the case's levels, or None (not a U-Net, or
  MONAI not installed)."""
  if case['model'] != 'unet':
    return None
  try:
    from monai.networks.nets import DynUNet
  except ImportError:
    return None
  strides = list(case['options']['strides'])
  return DynUNet(spatial_dims=len(case['shape']) - 1, in_channels=case['shape'][-1],
                 out_channels=case['classes'], kernel_size=[3] * len(strides), strides=strides,
                 upsample_kernel_size=strides[1:], filters=list(case['options']['features']),
                 norm_name='instance', res_block=False)


def run_case(name: str, tiny: bool, precision: str, augment: str, steps: int) -> Dict:
  case = (TINY if tiny else CASES)[name]
  row = dict(case=name, precision=precision, augment=augment, batch=case['batch'],
             shape=list(case['shape']))
  row.update(step_rate(case, precision, augment, steps))
  row['pipeline_per_s'] = pipeline_rate(case, augment, batches=2 if tiny else 5)
  return row


def run_torch(name: str, tiny: bool, precision: str, steps: int) -> Dict:
  try:
    return torch_rate((TINY if tiny else CASES)[name], precision, steps)
  except ImportError as e:
    return dict(torch_skipped=str(e))


def _device_info() -> Dict:
  import jax
  d = jax.devices()[0]
  return dict(platform=d.platform, device_kind=d.device_kind, device_count=jax.device_count())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cases', nargs='*', default=list(CASES), choices=list(CASES))
  parser.add_argument('--precisions', nargs='*', default=list(PRECISIONS),
                      choices=list(PRECISIONS))
  parser.add_argument('--augment', nargs='*', default=list(AUGMENT), choices=list(AUGMENT))
  parser.add_argument('--steps', type=int, default=20, help='timed steps per case')
  parser.add_argument('--tiny', action='store_true', help='tiny shapes, 2 steps: seconds on a CPU')
  parser.add_argument('--torch', action='store_true', help='PyTorch on the same device too')
  parser.add_argument('--timeout', type=float, default=900, help='seconds per case')
  parser.add_argument('--out', default=None, help='JSON (default benchmarks/results/'
                      'accelerator_<platform>.json)')
  parser.add_argument('--one', default=None, help=argparse.SUPPRESS)  # a case, in a child
  args = parser.parse_args()
  steps = 2 if args.tiny else args.steps
  if args.one:  # in a child process: TensorFlow and PyTorch never share one (it crashes)
    mode, name, precision, augment = args.one.split(',')
    row = (run_case(name, args.tiny, precision, augment, steps) if mode == 'medjax'
           else run_torch(name, args.tiny, precision, steps))
    print('RESULT ' + json.dumps(row), flush=True)
    return

  rows: List[Dict] = []
  for name in args.cases:
    for precision in args.precisions:
      for augment in args.augment:
        row = _run_child('medjax', name, precision, augment, args)
        if args.torch and augment == 'host' and 'skipped' not in row:
          theirs = _run_child('torch', name, precision, augment, args)
          if 'skipped' in theirs:
            theirs = {'torch_skipped': theirs['skipped']}
          row.update({k: v for k, v in theirs.items() if k not in row})
          for name in ('torch', 'monai'):
            if row.get(f'{name}_per_s'):
              row[f'vs_{name}'] = row['step_per_s'] / row[f'{name}_per_s']
        rows.append(row)
        print(json.dumps({k: rows[-1].get(k) for k, _, _ in COLUMNS}), flush=True)
  info = _device_info()
  from results_table import print_table, write_results
  print_table(rows, COLUMNS)
  out = args.out or os.path.join(HERE, 'results', f"accelerator_{info['platform']}.json")
  write_results(out, rows, accelerator=info, tiny=args.tiny, steps=steps)


def _run_child(mode: str, name: str, precision: str, augment: str, args) -> Dict:
  """One case in its own process (its own memory peak; an out-of-memory or a crash is that
  case's row, skipped with its reason)."""
  command = [sys.executable, os.path.abspath(__file__), '--one',
             f'{mode},{name},{precision},{augment}', '--steps', str(args.steps)]
  command += ['--tiny'] * args.tiny
  row = dict(case=name, precision=precision, augment=augment)
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
  except subprocess.TimeoutExpired:
    return dict(row, skipped=f'{mode}: over {args.timeout:.0f} s')
  for line in done.stdout.splitlines():
    if line.startswith('RESULT '):
      return json.loads(line[len('RESULT '):])
  lines = (done.stderr or done.stdout).strip().splitlines()
  reason = next((l for l in reversed(lines) if 'RESOURCE_EXHAUSTED' in l or 'Error' in l),
                lines[-1] if lines else f'exit {done.returncode}')
  return dict(row, skipped=f'{mode}: ' + reason.strip()[:300])


if __name__ == '__main__':
  main()
