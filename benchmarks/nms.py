"""3D non-maximum suppression: ``medjax.detection.boxes.nms`` (jit, a ``lax.while_loop`` of
``max_output`` picks, each box against all N) against a vectorised NumPy greedy NMS (sort once,
then per kept box the IoU with the remaining ones, dropping those above the threshold).

Random 3D boxes in a 128^3 volume (sides 4 to 32 voxels, uniform scores); IoU threshold 0.3,
so most boxes overlap some other box above it. Each repeat times JAX and NumPy one after the
other (the machine is shared: only the ratio within a run means anything), after one JAX call
that compiles; the table gives medians, the ratio NumPy / JAX (above 1: JAX faster), and
whether both kept the same indices in the same order.

  python benchmarks/nms.py [--repeats 7] [--cases 1000:100,10000:100,10000:1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from results_table import print_table, write_results  # benchmarks/ is on sys.path when run

HERE = os.path.dirname(os.path.abspath(__file__))
EXTENT, IOU_THRESHOLD = 128.0, 0.3


def numpy_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
              max_output: int) -> np.ndarray:
  """Greedy NMS in NumPy (float64): boxes ``[N, 2nd]`` by descending score, lower index first
  on ties; a kept box removes the remaining ones with IoU > ``iou_threshold``."""
  boxes = boxes.astype(np.float64)
  nd = boxes.shape[1] // 2
  lo, hi = boxes[:, :nd], boxes[:, nd:]
  volume = np.prod(np.maximum(hi - lo, 0), axis=1)
  order = np.lexsort((np.arange(len(scores)), -scores))  # last key is the primary one
  keep = []
  while order.size and len(keep) < max_output:
    i, rest = order[0], order[1:]
    keep.append(i)
    inter = np.prod(np.maximum(np.minimum(hi[i], hi[rest]) - np.maximum(lo[i], lo[rest]), 0),
                    axis=1)
    union = volume[i] + volume[rest] - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0)
    order = rest[iou <= iou_threshold]
  return np.asarray(keep, np.int64)


def random_boxes(rng, n: int, nd: int = 3):
  lo = rng.uniform(0, EXTENT - 32, (n, nd))
  size = rng.uniform(4, 32, (n, nd))
  return (np.concatenate([lo, lo + size], 1).astype(np.float32),
          rng.uniform(size=n).astype(np.float32))


def measure(n: int, max_output: int, repeats: int, seed: int = 0) -> dict:
  import jax

  from medjax.detection import boxes as box_ops
  boxes, scores = random_boxes(np.random.default_rng(seed), n)
  device_boxes, device_scores = jax.device_put(boxes), jax.device_put(scores)

  def run_jax():
    return jax.block_until_ready(box_ops.nms(device_boxes, device_scores, IOU_THRESHOLD,
                                             max_output))

  start = time.perf_counter()
  indices, valid = run_jax()
  compile_s = time.perf_counter() - start
  jax_times, numpy_times = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    indices, valid = run_jax()
    jax_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    reference = numpy_nms(boxes, scores, IOU_THRESHOLD, max_output)
    numpy_times.append(time.perf_counter() - start)
  kept = np.asarray(indices)[np.asarray(valid)]
  jax_ms, numpy_ms = 1e3 * statistics.median(jax_times), 1e3 * statistics.median(numpy_times)
  return {'case': f'{n} boxes, max_output {max_output}', 'boxes': n, 'max_output': max_output,
          'kept': int(len(kept)), 'jax_ms': jax_ms, 'numpy_ms': numpy_ms,
          'numpy_over_jax': numpy_ms / jax_ms, 'first_call_s': compile_s,
          'same_indices': bool(np.array_equal(kept, reference))}


COLUMNS = [('case', 'case', ''), ('kept', 'kept', ''), ('jax_ms', 'JAX ms', '.2f'),
           ('numpy_ms', 'NumPy ms', '.2f'), ('numpy_over_jax', 'NumPy / JAX', '.2f'),
           ('first_call_s', 'JAX first call s', '.2f'),
           ('same_indices', 'same indices', '')]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--cases', default='1000:100,10000:100,10000:1000',
                      help='N:max_output pairs')
  parser.add_argument('--out', default=os.path.join(HERE, 'results', 'nms.json'))
  args = parser.parse_args(argv)
  load_start = os.getloadavg()
  rows = []
  for case in args.cases.split(','):
    n, max_output = (int(v) for v in case.split(':'))
    rows.append(measure(n, max_output, args.repeats))
    print(f"  {rows[-1]['case']}: done", flush=True)
  load_end = os.getloadavg()
  print_table(rows, COLUMNS)
  print(f'load average (1, 5, 15 min) at start {load_start}, at end {load_end}')
  write_results(args.out, rows, repeats=args.repeats, iou_threshold=IOU_THRESHOLD,
                command=f'python benchmarks/nms.py --repeats {args.repeats} '
                        f'--cases {args.cases}',
                description=(
                    f'3D NMS of random boxes in a {EXTENT:.0f}^3 volume (sides 4 to 32, '
                    f'uniform scores, IoU threshold {IOU_THRESHOLD}): medjax.detection.boxes.nms '
                    '(jit, after its first call) against a vectorised NumPy greedy NMS, '
                    f'medians of {args.repeats} interleaved repeats on a shared machine (other '
                    'processes compete for the cores: compare the ratio, not the times).'),
                load_average_start=list(load_start), load_average_end=list(load_end))


if __name__ == '__main__':
  main()
