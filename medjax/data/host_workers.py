"""Segmentation training samples drawn by worker processes (``data.host_workers``).

Why: the patch sampler (:mod:`medjax.data.sampling`) is NumPy/SciPy code run by tf.data's
threads through ``tf.numpy_function``; the parts of it that hold Python's GIL (up to a quarter
of its CPU at 128^3, a third at 40x56x40: all but scipy.ndimage's C functions, measured by
benchmarks/host_pipeline.py) run one at a time, so threads stop scaling after a few cores, and
they compete with the training loop's own Python thread. ``N`` worker processes, each with its
own interpreter, draw the samples side by side instead. Each sample is still
``sampler(step, j)``, a pure function of ``(seed, step, j)``, and the batches come out in order,
so they are bit-identical to the in-process ones (tested), resume and process sharding included.

Cases that are memory-mapped ``.npy`` files (the prepared cache) reach the workers as their file
name and layout and are reopened there, never copied; arrays in memory (pseudo-labels, the zero
labels of unlabelled cases) are pickled to each worker once, when it starts. The samples come
back through a block of shared memory (one slot per sample in flight), not pickled through a
pipe, when /dev/shm has room for it.

Lifetime: workers are started with 'spawn' (forking after TensorFlow's and JAX's threads have
started is unsafe), are daemonic, ignore SIGINT (the main process stops them) and exit by
themselves when the main process is gone (killed, or SIGTERM without a handler). The main
process terminates them when the iterator is exhausted, closed (``close()``, ``with``), raises,
or is garbage-collected, and at interpreter exit.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import mmap
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
import weakref
from multiprocessing import shared_memory as shared_memory_lib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from medjax import config as config_lib


@config_lib.declare
def _defaults(c) -> None:
  # Segmentation training samples: 0 = drawn in this process (tf.data threads, which share one
  # core: the sampler holds the GIL); N = by N worker processes; -1 = one per usable core.
  config_lib.section(c, 'data').host_workers = 0


POLL_S = 0.2  # how often a waiting main process checks that its workers are alive


class SampleError(ValueError):
  """A training sample a worker process could not draw; the message names the case."""


def available_cores() -> int:
  """The cores this process may run on (its CPU affinity, else the machine's count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def worker_count(value) -> int:
  """The number of worker processes ``data.host_workers`` asks for: 0 (in-process), ``N``,
  or -1 (one per usable core)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < -1:
    raise ValueError(f'data.host_workers={value!r}: expected 0 (samples drawn in this process), '
                     'N > 0 worker processes, or -1 (one per core)')
  return available_cores() if value == -1 else int(value)


@dataclasses.dataclass(frozen=True)
class MappedArray:
  """A memory-mapped array by reference (file, layout): reopened read-only by a worker."""
  filename: str
  dtype: str
  shape: Tuple[int, ...]
  offset: int
  fortran_order: bool

  def open(self) -> np.memmap:
    return np.memmap(self.filename, np.dtype(self.dtype), 'r', self.offset, self.shape,
                     'F' if self.fortran_order else 'C')


def by_reference(array: Any) -> Any:
  """``array`` as a :class:`MappedArray` when it is a whole memory-mapped file view (as
  ``np.load(mmap_mode='r')`` returns), else ``array`` itself (pickled to the worker)."""
  if (isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap)
      and array.filename is not None):
    return MappedArray(str(array.filename), array.dtype.str, tuple(array.shape),
                       int(array.offset),
                       bool(array.flags.f_contiguous and not array.flags.c_contiguous))
  return array


def reopened(value: Any) -> Any:
  return value.open() if isinstance(value, MappedArray) else value


def portable(sampler):
  """A shallow copy of ``sampler`` whose memory-mapped case arrays are references (cheap to
  pickle); :func:`reopen_cases` undoes it in the worker."""
  twin = copy.copy(sampler)
  twin.cases = {cid: tuple(by_reference(a) for a in case) for cid, case in sampler.cases.items()}
  return twin


def reopen_cases(sampler) -> None:
  sampler.cases = {cid: tuple(reopened(a) for a in case) for cid, case in sampler.cases.items()}


def _exit_with_parent() -> None:
  """Ends this worker as soon as its parent is gone (a killed parent runs no clean-up)."""
  parent = multiprocessing.parent_process()
  if parent is None:
    return

  def watch():
    multiprocessing.connection.wait([parent.sentinel])
    os.kill(os.getpid(), signal.SIGKILL)  # at once: no clean-up is owed to anyone

  threading.Thread(target=watch, name='medjax-parent-watch', daemon=True).start()


def _failure(sampler, step: int, j: int, error: BaseException) -> str:
  try:
    case = repr(sampler.case_for(step, j))
  except Exception:  # noqa: BLE001 - the message must name what it can
    case = '?'
  text = ' '.join(f'{type(error).__name__}: {error}'.split())
  return f'sampling case {case} (step {step}, sample {j}) failed in a host worker: {text}'


@dataclasses.dataclass(frozen=True)
class Slots:
  """``count`` places for one sample each (image float32, label int32) in one shared-memory
  block named ``name``: a worker writes its sample into the slot of the task and the main
  process copies it out, so a sample's bytes are copied once each way instead of being
  pickled through a pipe (measured: 92 ms of CPU per 128^3 sample through the pipe)."""
  name: str
  count: int
  image_shape: Tuple[int, ...]
  label_shape: Tuple[int, ...]

  @staticmethod
  def nbytes(count: int, image_shape, label_shape) -> int:
    return count * 4 * (math.prod(image_shape) + math.prod(label_shape))

  def views(self, memory) -> Tuple[np.ndarray, np.ndarray]:
    """(images ``[count, *image_shape]``, labels ``[count, *label_shape]``) in ``memory``."""
    images = np.ndarray((self.count,) + self.image_shape, np.float32, memory.buf)
    labels = np.ndarray((self.count,) + self.label_shape, np.int32, memory.buf,
                        images.nbytes)
    return images, labels


def shared_memory_room() -> Optional[int]:
  """Free bytes of /dev/shm (containers often give it 64 MB); None where there is none."""
  try:
    stats = os.statvfs('/dev/shm')
  except (OSError, AttributeError):
    return None
  return stats.f_bavail * stats.f_frsize


def _one_blas_thread() -> None:
  """One BLAS thread in a worker: each worker is one core's worth by design, and the
  sampler's small matrix products ([3, 3] @ [3, voxels]) gain nothing from more. OpenBLAS's
  idle threads spin: measured 30-45 ms of CPU per 40x56x40 sample with its default threads
  against 13-25 ms with one. (threadpoolctl comes with scikit-learn; the results do not
  change: the product's terms are summed in the same order whatever the thread count.)"""
  try:
    from threadpoolctl import threadpool_limits
  except ImportError:
    return
  threadpool_limits(1)


def _worker_main(sampler, tasks, results, slots: Optional[Slots]) -> None:
  """A worker's loop: ``(index, step, j)`` in; out ``(index, None, None)`` with the sample in
  its slot (``index % slots.count``), or ``(index, (image, label), None)`` without slots, or
  ``(index, None, one-line error)``; ``None`` ends it."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the main process, which stops us
  _exit_with_parent()
  _one_blas_thread()
  reopen_cases(sampler)
  if slots is not None:
    memory = shared_memory_lib.SharedMemory(slots.name)
    images, labels = slots.views(memory)
  while True:
    task = tasks.get()
    if task is None:
      return
    index, step, j = task
    try:
      image, label = sampler(step, j)
      if slots is None:
        results.put((index, (image, label), None))
        continue
      slot = index % slots.count
      np.copyto(images[slot], image, casting='safe')  # no silent change of the numbers
      np.copyto(labels[slot], label, casting='safe')
      results.put((index, None, None))
    except Exception as e:  # noqa: BLE001 - reported to the main process, which raises
      results.put((index, None, _failure(sampler, step, j, e)))


def _terminate(processes: List, queues: List, memory) -> None:
  """Stops the workers (their unfinished samples are not needed), frees the queues and
  removes the shared memory."""
  for p in processes:
    if p.is_alive():
      p.terminate()
  for p in processes:
    p.join(5)
    if p.is_alive():
      p.kill()
      p.join()
  for q in queues:
    q.cancel_join_thread()  # never block on tasks no worker will read
    q.close()
  if memory is not None:
    try:
      memory.close()
    except BufferError:  # views still exist (garbage collection): freed with them
      pass
    memory.unlink()


class WorkerBatches:
  """This process's rows of steps ``[start_step, num_steps)`` as ``(images [B, *image_shape]
  float32, labels [B, *label_shape] int32)``, drawn by ``workers`` processes.

  ``B = rows.stop - rows.start``; at most ``prefetch_batches`` batches beyond the one being
  consumed are in flight (and never fewer than two samples per worker). Samples come back
  through shared memory when /dev/shm has room for them (twice over), else through a pipe
  (``shared_memory`` forces either).
  """

  def __init__(self, sampler, start_step: int, num_steps: int, rows: slice, workers: int,
               image_shape: Sequence[int], label_shape: Sequence[int],
               prefetch_batches: int = 2, shared_memory: Optional[bool] = None):
    if workers < 1:
      raise ValueError(f'WorkerBatches needs at least one worker, got {workers}')
    self.sampler = sampler
    self.start_step = start_step
    self.row_start, self.batch = rows.start, rows.stop - rows.start
    self.total = max(0, num_steps - start_step) * self.batch
    self.window = max(2 * workers, (prefetch_batches + 1) * self.batch)
    self.image_shape, self.label_shape = tuple(image_shape), tuple(label_shape)
    self.submitted = self.consumed = 0
    self.received: Dict[int, Any] = {}
    nbytes = Slots.nbytes(self.window, self.image_shape, self.label_shape)
    if shared_memory is None:
      room = shared_memory_room()
      shared_memory = room is None or room >= 2 * nbytes
    memory, self.slots = None, None
    if shared_memory:
      memory = shared_memory_lib.SharedMemory(create=True, size=max(nbytes, 1))
      self.slots = Slots(memory.name, self.window, self.image_shape, self.label_shape)
      self.slot_images, self.slot_labels = self.slots.views(memory)
    context = multiprocessing.get_context('spawn')
    self.tasks, self.results = context.Queue(), context.Queue()
    twin = portable(sampler)
    self.processes = [
        context.Process(target=_worker_main, args=(twin, self.tasks, self.results, self.slots),
                        name=f'medjax-host-worker-{k}', daemon=True) for k in range(workers)]
    # Stops the workers when this iterator is garbage-collected or at interpreter exit, too.
    self.finalizer = weakref.finalize(self, _terminate, self.processes,
                                      [self.tasks, self.results], memory)
    for p in self.processes:
      p.start()
    self.fill()

  @property
  def pids(self) -> List[int]:
    return [p.pid for p in self.processes]

  @property
  def closed(self) -> bool:
    return not self.finalizer.alive

  def close(self) -> None:
    """Stops the workers now; idempotent."""
    self.slot_images = self.slot_labels = None  # no view may outlive the shared memory
    self.finalizer()

  def __enter__(self) -> 'WorkerBatches':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __iter__(self) -> 'WorkerBatches':
    return self

  def task(self, index: int) -> Tuple[int, int]:
    """(step, j) of the ``index``-th sample of this iterator."""
    return self.start_step + index // self.batch, self.row_start + index % self.batch

  def fill(self) -> None:
    # A slot is reused by task i + window only once task i's batch has been copied out.
    while self.submitted < min(self.total, self.consumed + self.window):
      self.tasks.put((self.submitted,) + self.task(self.submitted))
      self.submitted += 1

  def __next__(self) -> Tuple[np.ndarray, np.ndarray]:
    if self.closed:
      raise StopIteration
    if self.consumed >= self.total:
      self.close()
      raise StopIteration
    indices = range(self.consumed, self.consumed + self.batch)
    images = np.empty((self.batch,) + self.image_shape, np.float32)
    labels = np.empty((self.batch,) + self.label_shape, np.int32)
    try:
      for row, index in enumerate(indices):
        sample = self.wait_for(index, indices)
        if self.slots is not None:
          sample = (self.slot_images[index % self.slots.count],
                    self.slot_labels[index % self.slots.count])
        images[row], labels[row] = sample
    except BaseException:  # a worker's error, Ctrl-C: stop the workers before raising
      self.close()
      raise
    self.consumed += self.batch
    self.fill()
    return images, labels

  def wait_for(self, index: int, batch_indices) -> Any:
    while index not in self.received:
      try:
        got, sample, error = self.results.get(timeout=POLL_S)
      except queue.Empty:
        self.check_alive(batch_indices)
        continue
      if error is not None:
        raise SampleError(error)
      self.received[got] = sample
    return self.received.pop(index)

  def check_alive(self, batch_indices) -> None:
    for p in self.processes:
      if p.exitcode is not None:
        missing = [i for i in batch_indices if i not in self.received]
        cases = sorted({self.sampler.case_for(*self.task(i)) for i in missing})
        raise SampleError(
            f'host worker process {p.pid} ended unexpectedly (exit code {p.exitcode}; -9: '
            f'killed, e.g. out of memory) while step {self.task(batch_indices[0])[0]} was '
            f'drawn (its cases {", ".join(map(repr, cases))})')
