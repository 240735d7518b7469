"""Where the time of a CPU train step goes: medjax (XLA) next to PyTorch eager, same shapes.

For each case of ``conv_vs_torch.py`` (default: ResNet-18 28 px batch 128 with the MedMNIST
stem, and the Hippocampus 3D U-Net 40x56x40 batch 2) the whole jit-compiled train step
(forward, backward, SGD-momentum update, cross-entropy) is traced with ``jax.profiler``; each
of XLA's CPU thunks (one per top-level HLO instruction) is put in a category from its
compiled HLO (opcode, the fused computation's ops, the JAX ``op_name`` metadata and the output
shape), and PyTorch's step is traced with ``torch.profiler`` (self CPU time per aten op) into
the same categories:

  conv fwd / conv input-grad / conv weight-grad (matrix products of the convolutions, heads),
  norm reductions / norm elementwise (BatchNorm or InstanceNorm, forward and backward),
  activations + residuals, loss, optimizer update, copies / pads / slices / layout,
  parameter copies (XLA's copies of the donated state), other.

``other s`` of the step (dispatch, host transfer, waiting) is the wall time per step minus
the summed op time where the ops run one after another; XLA's thunks may run two at a time
on 2 cores, so the op sum can exceed the wall time (the table gives both).

Then the whole steps are timed against each other: ``--reps`` repetitions, medjax and PyTorch
interleaved (one step each, in turn), medians and their ratio, so the ratio holds on a
shared, loaded machine.

  python benchmarks/cpu_step_profile.py                                    # ~6 min, 2 cores
  python benchmarks/cpu_step_profile.py --impls xla auto --cases resnet18_28
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import json
import math
import os
import re
import tempfile
import time
from typing import Dict, List

import jax
import numpy as np
import torch

import conv_vs_torch as cvt  # benchmarks/ is on sys.path when run
from medjax.models import conv_tune
from results_table import print_table, write_results

HERE = os.path.dirname(os.path.abspath(__file__))

CATEGORIES = ('conv fwd', 'conv input-grad', 'conv weight-grad', 'norm reductions',
              'norm elementwise', 'activations + residuals', 'loss', 'optimizer update',
              'copies / pads / slices / layout', 'parameter copies', 'other ops')

# HLO opcodes that only move data (a fusion of nothing else is a copy, not arithmetic).
_MOVES = {'copy', 'transpose', 'pad', 'slice', 'concatenate', 'bitcast', 'reshape', 'broadcast',
          'dynamic-slice', 'dynamic-update-slice', 'parameter', 'constant', 'tuple',
          'get-tuple-element', 'reverse', 'iota'}
_LOSS_NAMES = ('cross_entropy', 'log_softmax', 'logsumexp', 'take_along_axis', '_take',
               'softmax')


# ------------------------------------------------------------------ the medjax step


@contextlib.contextmanager
def impl_context(impl: str):
  """``'auto'``: the fixed rule (an empty cache); ``'tuned'``: ``'auto'`` with this machine's
  cache (``$MEDJAX_CONV_CACHE`` or ~/.cache/medjax), new layers measured into it; others: as
  named. Compile inside it."""
  if impl not in ('auto', 'tuned'):
    yield impl
    return
  saved = os.environ.get(conv_tune.CACHE_ENV)
  with tempfile.TemporaryDirectory() as tmp:
    if impl == 'auto':
      os.environ[conv_tune.CACHE_ENV] = os.path.join(tmp, 'empty.json')
    try:
      with conv_tune.recorded_in(tmp, autotune=impl == 'tuned'):
        yield 'auto'
    finally:
      if saved is None:
        os.environ.pop(conv_tune.CACHE_ENV, None)
      else:
        os.environ[conv_tune.CACHE_ENV] = saved


def medjax_step(case: str, impl: str):
  """(jitted step, state, x, y): ``conv_vs_torch``'s step (SGD momentum, cross-entropy)."""
  return cvt.medjax_step(case, impl)


def _shape_size(text: str) -> int:
  dims = re.match(r'\(?\w+\[([\d,]*)\]', text)
  return math.prod(int(d) for d in dims.group(1).split(',') if d) if dims else 0


def parse_hlo(hlo: str) -> Dict[str, Dict]:
  """Top-level instructions of the entry computation of compiled HLO text: name ->
  opcode, op_name metadata, output size, the opcodes inside a fusion, operand names."""
  computations, current, entry = {}, None, None
  for line in hlo.splitlines():
    head = re.match(r'^(ENTRY )?%?([\w.\-]+) .*\{\s*$', line)
    if head and not line.startswith(' '):
      current = head.group(2)
      computations[current] = []
      if head.group(1):
        entry = current
      continue
    if current and line.startswith('  ') and ' = ' in line:
      computations[current].append(line.strip())
  ops = {}
  for comp in computations:
    computations[comp] = [(re.match(r'(?:ROOT )?%?([\w.\-]+) = ', l).group(1), l)
                          for l in computations[comp] if re.match(r'(?:ROOT )?%?[\w.\-]+ = ', l)]
  for name, line in computations.get(entry, []):
    rhs = line.split(' = ', 1)[1]
    opcode = re.search(r'\s([a-z][\w\-]*)\(', ' ' + rhs).group(1)
    calls = re.search(r'calls=%?([\w.\-]+)', line)
    inner = set()
    if calls and calls.group(1) in computations:
      for _, l in computations[calls.group(1)]:
        inner.add(re.search(r'\s([a-z][\w\-]*)\(', ' ' + l.split(' = ', 1)[1]).group(1))
    op_name = re.search(r'op_name="([^"]*)"', line)
    operands = re.findall(r'%([\w.\-]+)', rhs.split('calls=')[0])
    ops[name] = dict(name=name, opcode=opcode, inner=inner or {opcode}, size=_shape_size(rhs),
                     op_name=op_name.group(1) if op_name else '', operands=operands)
  return ops


def categorize_hlo(op: Dict, kernel_sizes: set, parameters: set) -> str:
  """The category of one top-level HLO instruction (see the module docstring)."""
  name, inner = op['op_name'], op['inner']
  if inner & {'convolution', 'dot'}:
    # A kernel-sized output is a weight gradient (XLA's own ones carry no op_name).
    if op['size'] in kernel_sizes and (not name or 'transpose(' in name):
      return 'conv weight-grad'
    return 'conv input-grad' if 'transpose(' in name else 'conv fwd'
  if op['opcode'] == 'copy' and set(op['operands']) <= parameters:
    return 'parameter copies'
  # Fusions named after a data-movement root (XLA names a fusion after its root ops):
  # transposes and copies into another layout, with the arithmetic XLA fused into them.
  if inner <= _MOVES or op['name'].startswith(('transpose', 'copy')):
    return 'copies / pads / slices / layout'
  if 'jvp(' not in name and 'transpose(' not in name:
    return 'optimizer update' if name else 'other ops'
  if re.search(r'Norm|norm\d', name):
    return 'norm reductions' if 'reduce' in inner else 'norm elementwise'
  if any(s in name for s in _LOSS_NAMES):
    return 'loss'
  return 'activations + residuals'


def _trace_events(trace_dir: str) -> List[Dict]:
  path = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)[0]
  with gzip.open(path) as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  return [e for e in events if e.get('ph') == 'X']


def _busy_seconds(events: List[Dict]) -> float:
  """Length of the union of the events' intervals (time with at least one op running)."""
  spans = sorted((e['ts'], e['ts'] + e['dur']) for e in events)
  busy, end = 0.0, -math.inf
  for start, stop in spans:
    if stop > end:
      busy += stop - max(start, end)
      end = stop
  return busy / 1e6


def profile_medjax(case: str, impl: str, steps: int) -> Dict:
  with impl_context(impl) as model_impl:
    step, state, x, y = medjax_step(case, model_impl)
    compiled = step.lower(state, x, y).compile()
    step = compiled
  ops = parse_hlo(compiled.as_text())
  kernel_sizes = set()
  for leaf in jax.tree.leaves(state[0]):
    if leaf.ndim >= 2:  # kernels, and one kernel tap or one depth tap of them
      kernel_sizes |= {leaf.size, leaf.shape[-2] * leaf.shape[-1],
                       leaf.size // leaf.shape[0]}
  parameters = {n for n, o in ops.items() if o['opcode'] == 'parameter'}
  for _ in range(2):
    state, loss = step(state, x, y)
  jax.block_until_ready(loss)
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(steps):
        state, loss = step(state, x, y)
        jax.block_until_ready(loss)
      wall = (time.perf_counter() - start) / steps
    events = [e for e in _trace_events(tmp) if e['name'] in ops]
  seconds = collections.Counter()
  for e in events:
    seconds[categorize_hlo(ops[e['name']], kernel_sizes, parameters)] += e['dur'] / 1e6 / steps
  return dict(seconds=seconds, wall=wall, ops_sum=sum(seconds.values()),
              busy=_busy_seconds(events) / steps)


# ------------------------------------------------------------------ the PyTorch step


def categorize_torch(name: str) -> str:
  n = name.lower()
  if 'convolution_backward' in n:
    return 'conv input+weight grad'
  if 'conv' in n or n in ('aten::addmm', 'aten::mm', 'aten::linear', 'aten::matmul'):
    return 'conv fwd'
  if 'norm' in n:
    return 'norm (fwd+bwd)'
  if any(s in n for s in ('nll_loss', 'log_softmax', 'cross_entropy')):
    return 'loss'
  if 'foreach' in n or 'optimizer' in n or 'sgd' in n:
    return 'optimizer update'
  if any(s in n for s in ('relu', 'threshold', 'add', 'mean', 'sum', 'mul', 'div')):
    return 'activations + residuals'
  if any(s in n for s in ('copy', 'cat', 'clone', 'contiguous', 'fill', 'zero', 'empty',
                          'pad', 'slice', 'expand', 'view', 'reshape', 'transpose', 'permute',
                          'as_strided')):
    return 'copies / pads / slices / layout'
  return 'other ops'


def profile_torch(case: str, steps: int) -> Dict:
  run, _ = cvt.torch_train_step(case)
  run()
  run()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    for _ in range(steps):
      run()
    wall = (time.perf_counter() - start) / steps
  seconds = collections.Counter()
  for ev in prof.key_averages():
    seconds[categorize_torch(ev.key)] += ev.self_cpu_time_total / 1e6 / steps
  return dict(seconds=seconds, wall=wall, ops_sum=sum(seconds.values()))


# ------------------------------------------------------------------ whole steps, interleaved


def interleaved_steps(case: str, impls, reps: int) -> Dict[str, float]:
  """Median seconds per step of each medjax impl and PyTorch, timed in turn ``reps`` times."""
  runners = {}
  for impl in impls:
    with impl_context(impl) as model_impl:
      runners[f'medjax_{impl}'] = cvt.medjax_train_step(case, model_impl)
      runners[f'medjax_{impl}']()  # compiles with the context's choices
  runners['torch'] = cvt.torch_train_step(case)[0]
  for run in runners.values():  # warm up
    run()
  times = collections.defaultdict(list)
  for _ in range(reps):
    for key, run in runners.items():
      start = time.perf_counter()
      run()
      times[key].append(time.perf_counter() - start)
  return {key: float(np.median(t)) for key, t in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--cases', nargs='*', default=['resnet18_28', 'unet3d_hippocampus'],
                      choices=list(cvt.MODELS))
  parser.add_argument('--impls', nargs='*', default=['auto', 'tuned'],
                      help="conv_impl values of medjax to time and profile ('auto': the fixed "
                           "rule; 'tuned': 'auto' with this machine's measured choices)")
  parser.add_argument('--profile-steps', type=int, default=2)
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--out', default=os.path.join(HERE, 'results', 'cpu_step_profile.json'))
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  load = os.getloadavg()[0]
  print(f'CPU: {cvt.cpu_model()}; {os.cpu_count()} cores; load {load:.2f}; jax '
        f'{jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)')
  rows = []
  for case in args.cases:
    batch = cvt.MODELS[case][3]
    mj = {impl: profile_medjax(case, impl, args.profile_steps) for impl in args.impls}
    pt = profile_torch(case, args.profile_steps)
    cats = list(CATEGORIES) + sorted(set(pt['seconds']) - set(CATEGORIES))
    summary = [('sum of ops', 'ops_sum'), ('wall per step (profiled)', 'wall'),
               ('time with an op running', 'busy')]
    for cat in cats + [name for name, _ in summary]:
      key = dict(summary).get(cat)
      row = dict(case=case, kind='profile', category=cat)
      for impl, prof in list(mj.items()) + [('torch', pt)]:
        value = prof.get(key) if key else prof['seconds'].get(cat, 0.0)
        if value is not None:
          row[f'{impl}_ms'] = 1e3 * value
          if not key:
            row[f'{impl}_share'] = value / prof['ops_sum']
      if key or any(row.get(f'{impl}_ms') for impl in list(mj) + ['torch']):
        rows.append(row)
    med = interleaved_steps(case, args.impls, args.reps)
    for impl in args.impls:
      rows.append(dict(case=case, kind='step', impl=impl, batch=batch, reps=args.reps,
                       medjax_ms=1e3 * med[f'medjax_{impl}'], torch_ms=1e3 * med['torch'],
                       medjax_per_s=batch / med[f'medjax_{impl}'],
                       torch_per_s=batch / med['torch'],
                       vs_torch=med['torch'] / med[f'medjax_{impl}']))
    print(f"  {case}: " + ', '.join(f'{k} {1e3 * v:.0f} ms' for k, v in med.items()),
          flush=True)
    write_results(args.out, rows, cpu=cvt.cpu_model(), torch=torch.__version__,
                  torch_threads=torch.get_num_threads(), load_average_1min_start=load,
                  load_average_1min_end=os.getloadavg()[0])  # after each case: kept if stopped
  columns = [('case', 'case', ''), ('category', 'where the time goes', '')]
  for impl in args.impls + ['torch']:
    columns += [(f'{impl}_ms', f'{impl} ms', '.1f'), (f'{impl}_share', 'share', '.0%')]
  print_table([r for r in rows if r['kind'] == 'profile'], columns)
  print_table([r for r in rows if r['kind'] == 'step'],
              [('case', 'train step', ''), ('impl', 'conv_impl', ''), ('batch', 'batch', 'd'),
               ('medjax_ms', 'medjax ms', '.0f'), ('torch_ms', 'torch ms', '.0f'),
               ('vs_torch', 'medjax/torch speed', '.2f')])


if __name__ == '__main__':
  main()
