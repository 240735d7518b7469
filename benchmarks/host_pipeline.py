"""Segmentation patches/s of the host input pipeline: in this process, tf.data threads, or
``data.host_workers`` processes, at two patch sizes.

* ``nnunet_128``: 128^3 patches (nnU-Net's 3d_fullres size) with nnU-Net-like augmentation
  from a synthetic 200^3 float32 volume with a label map, memory-mapped from .npy files as the
  prepared cache's cases are; batch 2.
* ``hippocampus_40x56x40``: the real MSD Hippocampus cases (prepared and cached once,
  memory-mapped) with the patch, batch and augmentation of ``configs/hippocampus_unet3d.py``;
  synthetic cases of that size when ../shared/data is absent.

Pipelines: ``in-process`` calls the sampler in a plain loop (one core, no tf.data);
``tf.data N calls`` is the path of ``data.host_workers=0`` with N parallel
``tf.numpy_function`` calls; ``host_workers=N`` draws in N spawned processes. Every
pipeline is timed from its first batch (start-up, shown apart, excluded) over the same steps,
and the pipelines take turns in each repeat, so load from other processes falls on all of
them alike. ``own cores`` is the CPU this process and its workers used during the timing, in
cores (CPU seconds / wall seconds): about 1 for a pipeline held to one core by the GIL;
``other cores`` what all other processes used (from /proc/stat): on a machine with C cores,
N workers can only reach N x if C - other >= N. ``CPU ms/patch``: CPU time of this process and
its workers per patch, what each pipeline costs whatever the load. A last table times only
the move of a sample from a worker to this process (a sampler that copies one fixed sample),
through shared memory and pickled through a pipe; and one the share of the sampler's CPU time
spent in scipy.ndimage's C functions, which release the GIL, with the speed-up that bounds
for threads (tf.data's parallel calls): load-independent, from CPU time.

  python benchmarks/host_pipeline.py [--repeats 3] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

# Only light imports here: spawned workers import this script again (as __mp_main__), and what
# it imports at the top adds to their start-up (medjax.data.prepare would bring JAX).
from medjax.data import sampling
from results_table import print_table, write_results  # benchmarks/ is on sys.path when run

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.normpath(os.path.join(HERE, '..', '..', 'shared', 'data',
                                             'msd_hippocampus'))
HIPPOCAMPUS_CONFIG = os.path.join(HERE, '..', 'configs', 'hippocampus_unet3d.py')


# ----- CPU accounting (Linux /proc; None elsewhere) ---------------------------------------

def _busy_jiffies() -> tuple | None:
  """(busy, total) jiffies of all cores since boot."""
  try:
    with open('/proc/stat') as f:
      values = [int(v) for v in f.readline().split()[1:]]
  except OSError:
    return None
  idle = values[3] + values[4]  # idle + iowait
  return sum(values) - idle, sum(values)


def _process_jiffies(pids) -> int:
  total = 0
  for pid in pids:
    try:
      with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
      total += int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError):
      pass
  return total


class CpuMeter:
  """Cores used by ``pids`` and by the other processes between ``start()`` and ``stop()``."""

  def __init__(self):
    self.cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else 1

  def start(self, pids):
    self.begin = _busy_jiffies(), _process_jiffies(pids)

  def stop(self, pids) -> dict:
    """Cores used by ``pids`` and by everything else, and the CPU seconds of ``pids``
    (None without /proc)."""
    end = _busy_jiffies(), _process_jiffies(pids)
    if end[0] is None or self.begin[0] is None:
      return {'own_cores': None, 'other_cores': None, 'own_cpu_s': None}
    busy = end[0][0] - self.begin[0][0]
    per_core = max(end[0][1] - self.begin[0][1], 1) / (os.cpu_count() or 1)
    own = end[1] - self.begin[1]
    return {'own_cores': own / per_core, 'other_cores': max(0.0, (busy - own) / per_core),
            'own_cpu_s': own / os.sysconf('SC_CLK_TCK')}


# ----- cases -----------------------------------------------------------------------------

def synthetic_cases(directory: str, shape, count: int, seed: int = 0):
  """``count`` cases of ``shape``: smooth noise and two nested ellipsoids (classes 1, 2),
  written as .npy and memory-mapped (as :meth:`PreparedDataset.load` returns them)."""
  from medjax.data import prepare
  rng = np.random.default_rng(seed)
  cases = {}
  grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing='ij'))
  for k in range(count):
    centre = rng.uniform(-0.2, 0.2, (3, 1, 1, 1))
    radius = np.sqrt((((grid - centre) / np.array([0.5, 0.4, 0.3])[:, None, None, None])
                      ** 2).sum(0))
    label = ((radius < 1).astype(np.uint8) + (radius < 0.5)).astype(np.uint8)
    image = (rng.normal(size=shape) + label).astype(np.float32)[..., None]
    base = os.path.join(directory, f'case_{k}')
    np.save(base + '_image.npy', image)
    np.save(base + '_label.npy', label)
    locations = prepare.class_locations(label, 3, rng)
    cases[f'case_{k}'] = (np.load(base + '_image.npy', mmap_mode='r'),
                          np.load(base + '_label.npy', mmap_mode='r'), locations)
  return cases


def hippocampus_cases(data: str, cache: str, scratch: str):
  from medjax.data import prepare
  if os.path.isdir(data):
    ds = prepare.prepare(data, cache)
    return {c: ds.load(c) for c in ds.case_ids}, 'MSD Hippocampus, 200 real cases'
  return synthetic_cases(scratch, (36, 50, 35), 8), 'synthetic 36x50x35 (no real data)'


def hippocampus_settings():
  from medjax import config as config_lib
  c = config_lib.load_config_file(HIPPOCAMPUS_CONFIG)
  augment = sampling.SegAugment(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                                   for k, v in c.data.seg_augment.to_dict().items()})
  return tuple(c.data.patch_size), c.train.batch_size, augment


# ----- timing ------------------------------------------------------------------------------

def time_pipeline(cases, patch, batch, augment, steps, pipeline, meter) -> dict:
  """Samples/s of one pipeline over ``steps`` batches after its first; start-up apart."""
  kind, n = pipeline
  sampler = sampling.SegmentationSampler(cases, patch, batch, seed=0, augment=augment,
                                         host_workers=n if kind == 'host_workers' else 0)
  t0 = time.perf_counter()
  if kind == 'in-process':
    def loop():
      for step in range(steps + 1):
        yield [sampler(step, j) for j in range(batch)]
    batches, pids = loop(), [os.getpid()]
  else:
    batches = sampler.batches(0, steps + 1, num_workers=n if kind == 'tf.data' else 0)
    pids = [os.getpid()] + list(getattr(batches, 'pids', []))
  next(batches)
  start = time.perf_counter()
  meter.start(pids)
  for _ in range(steps):
    next(batches)
  elapsed = time.perf_counter() - start
  cpu = meter.stop(pids)
  if hasattr(batches, 'close'):
    batches.close()
  return {'samples_per_s': steps * batch / elapsed, 'startup_s': start - t0, **cpu,
          'cpu_ms_per_sample': (None if cpu['own_cpu_s'] is None
                                else 1e3 * cpu['own_cpu_s'] / (steps * batch))}


def gil_free_share(sampler, samples: int) -> dict:
  """The share of the sampler's CPU time spent inside scipy.ndimage's C functions, which
  release the GIL (interpolation, filters, zoom), from the CPU time of this thread: a floor
  of what threads can run side by side (NumPy's array loops release it too). Measured by CPU
  time, it does not depend on the machine's load. If the rest holds the GIL, ``N`` threads
  are bounded by ``1 / ((1 - p) + p / N)`` times one (Amdahl); the true bound is higher."""
  import sys
  start = time.thread_time()
  for k in range(samples):
    sampler(k, k % sampler.global_batch)
  total = time.thread_time() - start
  free, began = [0.0], []

  def profile(frame, event, arg):
    if getattr(arg, '__module__', None) != 'scipy.ndimage._nd_image':
      return
    if event == 'c_call':
      began.append(time.thread_time())
    elif event in ('c_return', 'c_exception'):
      free[0] += time.thread_time() - began.pop()

  sys.setprofile(profile)
  try:
    for k in range(samples):
      sampler(k, k % sampler.global_batch)
  finally:
    sys.setprofile(None)
  share = min(1.0, free[0] / total)
  return {'cpu_ms_per_sample': 1e3 * total / samples, 'gil_free_share': share,
          'two_threads_bound': 1 / ((1 - share) + share / 2),
          'any_threads_bound': 1 / (1 - share) if share < 1 else float('inf')}


class CopySampler:
  """Returns one fixed sample (a copy each time): what moving a sample from a worker to
  this process costs, without the sampling."""

  def __init__(self, patch):
    self.cases = {}
    self.image = np.ones(tuple(patch) + (1,), np.float32)
    self.label = np.ones(tuple(patch), np.int32)

  def case_for(self, step, j):
    return 'none'

  def __call__(self, step, j):
    return self.image.copy(), self.label.copy()


def time_transport(patch, samples: int, shared: bool, meter) -> dict:
  """CPU ms per sample (this process and its one worker) of moving ``patch``-sized samples
  from a worker, through shared memory or pickled through a pipe."""
  from medjax.data.host_workers import WorkerBatches
  batches = WorkerBatches(CopySampler(patch), 0, samples + 1, slice(0, 1), 1,
                          tuple(patch) + (1,), tuple(patch), shared_memory=shared)
  next(batches)
  pids = [os.getpid()] + batches.pids
  meter.start(pids)
  start = time.perf_counter()
  for _ in range(samples):
    next(batches)
  elapsed = time.perf_counter() - start
  cpu = meter.stop(pids)
  batches.close()
  return {'transport': 'shared memory' if shared else 'pipe (pickled)',
          'patch': 'x'.join(map(str, patch)), 'samples': samples,
          'cpu_ms_per_sample': (None if cpu['own_cpu_s'] is None
                                else 1e3 * cpu['own_cpu_s'] / samples),
          'wall_ms_per_sample': 1e3 * elapsed / samples}


def pipeline_name(pipeline) -> str:
  kind, n = pipeline
  if kind == 'in-process':
    return 'in-process'
  if kind == 'tf.data':
    return f"tf.data {n} call{'s' if n > 1 else ''}"
  return f'host_workers={n}'


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data', default=DEFAULT_DATA)
  parser.add_argument('--cache', default=os.path.join(tempfile.gettempdir(), 'medjax_cache'))
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--workers', default='1,2', help='counts of tf.data calls and processes')
  parser.add_argument('--steps_128', type=int, default=4, help='timed batches at 128^3')
  parser.add_argument('--steps_hippocampus', type=int, default=8)
  parser.add_argument('--tiny', action='store_true', help='small sizes, one repeat (tests)')
  parser.add_argument('--out', default=os.path.join(HERE, 'results', 'host_pipeline.json'))
  args = parser.parse_args(argv)
  counts = [int(n) for n in args.workers.split(',')]
  pipelines = ([('in-process', 1)] + [('tf.data', n) for n in counts]
               + [('host_workers', n) for n in counts])
  meter = CpuMeter()
  load_start = os.getloadavg() if hasattr(os, 'getloadavg') else None
  scratch = tempfile.TemporaryDirectory(prefix='medjax-host-pipeline-')
  os.makedirs(os.path.join(scratch.name, 'big'))
  os.makedirs(os.path.join(scratch.name, 'small'))
  patch, batch, augment = hippocampus_settings()
  if args.tiny:
    big = ('nnunet_128', synthetic_cases(os.path.join(scratch.name, 'big'), (40, 40, 40), 1),
           'synthetic 40^3 (tiny)', (24, 24, 24), 2, sampling.SegAugment.nnunet_like(), 1)
    small = ('hippocampus_40x56x40', synthetic_cases(os.path.join(scratch.name, 'small'),
                                                     (20, 24, 20), 2),
             'synthetic 20x24x20 (tiny)', (12, 16, 12), 2, augment, 1)
    repeats = 1
  else:
    hippo, hippo_source = hippocampus_cases(args.data, args.cache,
                                            os.path.join(scratch.name, 'small'))
    big = ('nnunet_128', synthetic_cases(os.path.join(scratch.name, 'big'), (200, 200, 200), 1),
           'synthetic 200^3 float32 + label map', (128, 128, 128), 2,
           sampling.SegAugment.nnunet_like(), args.steps_128)
    small = ('hippocampus_40x56x40', hippo, hippo_source, patch, batch, augment,
             args.steps_hippocampus)
    repeats = args.repeats
  sizes = [big, small]
  runs = {}  # (size, pipeline) -> [measurement per repeat]
  for repeat in range(repeats):
    for name, cases, _, size_patch, size_batch, size_augment, steps in sizes:
      for pipeline in pipelines:
        m = time_pipeline(cases, size_patch, size_batch, size_augment, steps, pipeline, meter)
        runs.setdefault((name, pipeline), []).append(m)
        print(f'repeat {repeat} {name} {pipeline_name(pipeline)}: '
              f"{m['samples_per_s']:.2f} patches/s; cores used by it {m['own_cores']}, by "
              f"other processes {m['other_cores']}; CPU ms/patch {m['cpu_ms_per_sample']}",
              flush=True)
  rows = []
  for name, _, source, size_patch, size_batch, _, steps in sizes:
    base = runs[(name, ('in-process', 1))]
    one_worker = runs.get((name, ('host_workers', 1)))
    for pipeline in pipelines:
      ms = runs[(name, pipeline)]
      rates = [m['samples_per_s'] for m in ms]
      other = [m['other_cores'] for m in ms if m['other_cores'] is not None]
      own = [m['own_cores'] for m in ms if m['own_cores'] is not None]
      cpu_ms = [m['cpu_ms_per_sample'] for m in ms if m['cpu_ms_per_sample'] is not None]
      row = {'case': name, 'data': source, 'patch': 'x'.join(map(str, size_patch)),
             'batch': size_batch, 'timed_batches': steps, 'pipeline': pipeline_name(pipeline),
             'patches_per_s': statistics.median(rates), 'patches_per_s_runs': rates,
             # Ratios per repeat (the pipelines of one repeat ran back to back), then median.
             'vs_in_process': statistics.median(
                 r / b['samples_per_s'] for r, b in zip(rates, base)),
             'startup_s': statistics.median(m['startup_s'] for m in ms),
             'own_cores': statistics.median(own) if own else None,
             'cpu_ms_per_patch': statistics.median(cpu_ms) if cpu_ms else None,
             'other_cores': statistics.median(other) if other else None}
      if pipeline[0] == 'host_workers' and one_worker:
        row['vs_one_worker'] = statistics.median(
            r / b['samples_per_s'] for r, b in zip(rates, one_worker))
      rows.append(row)
  print_table(rows, [('case', 'case', ''), ('patch', 'patch', ''), ('batch', 'batch', 'd'),
                     ('pipeline', 'pipeline', ''), ('patches_per_s', 'patches/s', '.2f'),
                     ('vs_in_process', 'x in-process', '.2f'),
                     ('vs_one_worker', 'x 1 worker', '.2f'), ('startup_s', 'start-up s', '.1f'),
                     ('own_cores', 'own cores', '.2f'), ('other_cores', 'other cores', '.2f'),
                     ('cpu_ms_per_patch', 'CPU ms/patch', '.0f')])
  transport = [time_transport(size[3], 10 if args.tiny else n, shared, meter)
               for size, n in ((big, 40), (small, 400)) for shared in (True, False)]
  print_table(transport, [('transport', 'worker -> main', ''), ('patch', 'patch', ''),
                          ('cpu_ms_per_sample', 'CPU ms/sample', '.2f'),
                          ('wall_ms_per_sample', 'wall ms/sample', '.2f')])
  load_end = os.getloadavg() if hasattr(os, 'getloadavg') else None
  print(f'load average (1, 5, 15 min) at start {load_start}, at end {load_end}; '
        f'{meter.cores} usable cores')
  gil = []
  for name, cases, _, size_patch, size_batch, size_augment, _ in sizes:
    sampler = sampling.SegmentationSampler(cases, size_patch, size_batch, seed=0,
                                           augment=size_augment)
    gil.append({'case': name, **gil_free_share(sampler, 4 if args.tiny else
                                                 (8 if name == 'nnunet_128' else 80))})
  print_table(gil, [('case', 'case', ''), ('cpu_ms_per_sample', 'CPU ms/patch', '.1f'),
                    ('gil_free_share', 'share without GIL', '.2f'),
                    ('two_threads_bound', '2 threads bound', '.2f'),
                    ('any_threads_bound', 'any threads bound', '.2f')])
  write_results(args.out, rows, transport=transport, gil=gil, repeats=repeats, usable_cores=meter.cores,
                load_average_start=load_start, load_average_end=load_end,
                description=(
                    'Patches/s of the segmentation sampler (medians over repeats; the pipelines '
                    'take turns within each repeat). "own cores": CPU seconds per wall second '
                    'of this process and its workers; "other cores": of all other processes, '
                    'during the timing.'))
  scratch.cleanup()


if __name__ == '__main__':
  main()
