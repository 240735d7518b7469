"""Segmentation samples drawn by worker processes (``data.host_workers``): the batches are
bit-identical to the in-process tf.data ones (resumed and process-sharded too), memory-mapped
cases travel by reference, and the workers are gone after the iterator ends, is closed, raises,
is garbage-collected, or its process is terminated; a worker's error names the case."""

import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from medjax import config as config_lib
from medjax.data import host_workers, sampling

FULL = sampling.SegAugment(p_flip=0.5, p_rot90=0.5, p_rotate=0.5, p_scale=0.5, p_elastic=0.5,
                           p_noise=0.5, p_blur=0.5, p_brightness=0.5, p_contrast=0.5,
                           p_gamma=0.5, p_lowres=0.5)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _case(rng, shape, foreground_box):
  image = rng.normal(size=shape + (1,)).astype(np.float32)
  label = np.zeros(shape, np.uint8)
  label[foreground_box] = 1
  label[tuple(slice(s.start, s.start + 3) for s in foreground_box)] = 2
  locations = {str(k): np.argwhere(label == k) for k in (1, 2)}
  return image, label, locations


def _cases(tmp_path):
  """Two cases memory-mapped from .npy files (one stored in Fortran order), one in memory."""
  rng = np.random.default_rng(0)
  box = (slice(8, 20), slice(10, 24), slice(6, 16))
  cases = {}
  for name, shape, fortran in (('mapped_c', (30, 36, 22), False),
                               ('mapped_f', (26, 40, 24), True)):
    image, label, locations = _case(rng, shape, box)
    if fortran:
      image, label = np.asfortranarray(image), np.asfortranarray(label)
    np.save(tmp_path / f'{name}_image.npy', image)
    np.save(tmp_path / f'{name}_label.npy', label)
    cases[name] = (np.load(tmp_path / f'{name}_image.npy', mmap_mode='r'),
                   np.load(tmp_path / f'{name}_label.npy', mmap_mode='r'), locations)
  cases['in_memory'] = _case(rng, (28, 32, 30), box)
  return cases


def _sampler(cases, workers, batch=6, patch=(16, 20, 16)):
  return sampling.SegmentationSampler(cases, patch, global_batch=batch, seed=3, augment=FULL,
                                      host_workers=workers)


def _running(pid: int) -> bool:
  """Whether process ``pid`` exists and is not a zombie (Linux /proc)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def _gone(pids, timeout_s=10.0) -> bool:
  deadline = time.monotonic() + timeout_s
  while any(_running(p) for p in pids):
    if time.monotonic() > deadline:
      return False
    time.sleep(0.05)
  return True


needs_proc = pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='needs Linux /proc')


def test_worker_count_and_its_config_key():
  assert config_lib.default_config().data.host_workers == 0
  assert host_workers.worker_count(0) == 0 and host_workers.worker_count(3) == 3
  assert host_workers.worker_count(-1) == host_workers.available_cores() >= 1
  for bad in (-2, 'auto', 1.5, True):
    with pytest.raises(ValueError, match=r'data.host_workers=.*N > 0 worker processes'):
      host_workers.worker_count(bad)


def test_memory_mapped_cases_travel_by_reference(tmp_path):
  cases = _cases(tmp_path)
  for name in ('mapped_c', 'mapped_f'):
    for array in cases[name][:2]:
      ref = host_workers.by_reference(array)
      assert isinstance(ref, host_workers.MappedArray)
      again = ref.open()
      np.testing.assert_array_equal(again, array)
      assert again.dtype == array.dtype and again.flags.f_contiguous == array.flags.f_contiguous
  # A view of a mapped file, and an array in memory, are sent as they are.
  view = cases['mapped_c'][0][2:5]
  assert host_workers.by_reference(view) is view
  assert host_workers.by_reference(cases['in_memory'][0]) is cases['in_memory'][0]
  # What a worker receives: the mapped cases' file names and layouts instead of their voxels.
  mapped = {k: v for k, v in cases.items() if k != 'in_memory'}
  twin = host_workers.portable(_sampler(mapped, 0))
  copied = _sampler({k: (np.array(i), np.array(l), loc) for k, (i, l, loc) in mapped.items()}, 0)
  voxels = sum(a.nbytes for case in mapped.values() for a in case[:2])
  assert len(pickle.dumps(copied)) - len(pickle.dumps(twin)) > 0.99 * voxels
  host_workers.reopen_cases(twin)
  for name, case in mapped.items():
    for a, b in zip(twin.cases[name][:2], case[:2]):
      np.testing.assert_array_equal(a, b)


@needs_proc
def test_worker_batches_are_bit_identical_to_in_process_ones(tmp_path):
  cases = _cases(tmp_path)
  reference = list(_sampler(cases, 0).batches(0, 4))  # tf.data in this process, as before
  batches = _sampler(cases, 2).batches(0, 4)
  pids = batches.pids
  got = list(batches)
  assert len(got) == len(reference) == 4
  for (x, y), (x_ref, y_ref) in zip(got, reference):
    assert x.dtype == x_ref.dtype == np.float32 and y.dtype == y_ref.dtype == np.int32
    np.testing.assert_array_equal(x, x_ref)
    np.testing.assert_array_equal(y, y_ref)
  # The exhausted iterator has stopped its workers.
  assert batches.closed and _gone(pids)
  # Resumed at step 2, as process 1 of 2 (rows 3..5 of each global batch), with one worker,
  # the samples pickled through a pipe instead of shared memory.
  part = list(host_workers.WorkerBatches(_sampler(cases, 1), 2, 4, slice(3, 6), 1,
                                         (16, 20, 16, 1), (16, 20, 16), shared_memory=False))
  assert len(part) == 2
  for (x, y), (x_ref, y_ref) in zip(part, reference[2:]):
    np.testing.assert_array_equal(x, x_ref[3:])
    np.testing.assert_array_equal(y, y_ref[3:])


@needs_proc
def test_workers_stop_when_the_iterator_is_closed_raises_or_is_dropped(tmp_path):
  cases = _cases(tmp_path)
  with pytest.raises(KeyError):
    with _sampler(cases, 2).batches(0, 50) as batches:
      pids, memory = batches.pids, batches.slots.name
      assert os.path.exists(f'/dev/shm/{memory}')
      next(batches)
      raise KeyError('the training loop failed')
  assert _gone(pids) and not os.path.exists(f'/dev/shm/{memory}')
  batches = _sampler(cases, 1).batches(0, 50)
  pids = batches.pids
  next(batches)
  del batches
  gc.collect()
  assert _gone(pids)


@needs_proc
def test_a_worker_error_is_one_line_naming_the_case(tmp_path):
  cases = _cases(tmp_path)
  image, label, locations = cases['in_memory']
  cases['broken_case'] = (image[:, :, 0], label[:, :, 0], {})  # 2D: no 3D patch fits
  batches = _sampler(cases, 1, batch=4).batches(0, 3)
  pids = batches.pids
  with pytest.raises(host_workers.SampleError) as error:
    list(batches)
  message = str(error.value)
  assert "case 'broken_case'" in message and '\n' not in message
  assert 'ValueError: patch_size (16, 20, 16) has 3 axes, case has 2' in message
  assert batches.closed and _gone(pids)


@needs_proc
def test_a_killed_worker_is_an_error_not_a_hang(tmp_path):
  batches = _sampler(_cases(tmp_path), 1).batches(0, 3)
  os.kill(batches.pids[0], signal.SIGKILL)
  with pytest.raises(host_workers.SampleError, match=r'ended unexpectedly \(exit code -9'):
    next(batches)
  assert batches.closed


SCRIPT = textwrap.dedent('''
  import sys, time
  import numpy as np
  from medjax.data import sampling

  if __name__ == '__main__':
    rng = np.random.default_rng(0)
    label = np.zeros((30, 30, 30), np.uint8)
    label[10:20, 10:20, 10:20] = 1
    cases = {'a': (rng.normal(size=(30, 30, 30, 1)).astype(np.float32), label,
                   {'1': np.argwhere(label == 1)})}
    batches = sampling.SegmentationSampler(cases, (16, 16, 16), 2, seed=0,
                                           host_workers=2).batches(0, 1000)
    next(batches)
    print(' '.join(map(str, batches.pids)), flush=True)
    time.sleep(600)
''')


@pytest.mark.slow  # a Python process of its own, and its workers
@needs_proc
def test_workers_exit_when_their_process_is_terminated(tmp_path):
  script = tmp_path / 'train_like.py'
  script.write_text(SCRIPT)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                          env=env)
  try:
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2 and all(_running(p) for p in pids)
    proc.send_signal(signal.SIGTERM)  # no handler: the process dies without any clean-up
    proc.wait(30)
    assert _gone(pids)
  finally:
    proc.kill()
    proc.wait()
