import json
import os
import shutil
import tempfile

import numpy as np
import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# One XLA compilation cache for the whole session, in-process and in the subprocesses and
# notebook kernels the tests start (they inherit the environment): most tests train the same
# few tiny configs, and on a CPU compiling them costs more than running them (a repeated
# runlocal ResNet-18 run: 32 s -> 11 s). A cached executable is the one XLA compiled for the
# same program, so results are unchanged; the cache starts empty and is removed at the end.
_XLA_CACHE = tempfile.mkdtemp(prefix='medjax-tests-xla-cache-')
os.environ['JAX_COMPILATION_CACHE_DIR'] = _XLA_CACHE
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
# conv_impl='auto' takes the machine's measured choices from a cache (medjax.models.conv_tune):
# tests use an empty one of their own, so they run the fixed rule whatever this machine cached.
_CONV_CACHE = tempfile.mkdtemp(prefix='medjax-tests-conv-cache-')
os.environ['MEDJAX_CONV_CACHE'] = os.path.join(_CONV_CACHE, 'conv_impl.json')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.normpath(os.path.join(REPO, '..', 'shared', 'data'))


def pytest_sessionfinish(session, exitstatus):
  shutil.rmtree(_XLA_CACHE, ignore_errors=True)
  shutil.rmtree(_CONV_CACHE, ignore_errors=True)


def shared_file(*parts: str) -> str:
  """Path of a file in ../shared/data; skips the test with the reason if it is absent."""
  path = os.path.join(SHARED_DATA, *parts)
  if not os.path.exists(path):
    pytest.skip(f'real data not available: {path} (the ../shared/data folder beside the repo)')
  return path


def fake_medmnist(path, shape, num_classes, label_width=1, seed=0) -> str:
  """A MedMNIST-layout .npz (40 random examples per split) at ``path``."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split in ('train', 'val', 'test'):
    arrays[f'{split}_images'] = rng.integers(0, 256, (40,) + shape, dtype=np.uint8)
    arrays[f'{split}_labels'] = rng.integers(0, num_classes, (40, label_width), dtype=np.uint8)
  np.savez(path, **arrays)
  return str(path)


def results_without_run_info(workdir) -> dict:
  """A workdir's results.json without ``run_info`` (wall time: the only field that varies)."""
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  results.pop('run_info')
  return results


@pytest.fixture(scope='session')
def quickstart_run(tmp_path_factory) -> str:
  """Workdir of one uninterrupted in-process run of ``configs/quickstart.py:runlocal`` (seed
  0), shared by the tests that need such a run as a reference. Read it, never write to it:
  copy it first."""
  from medjax import config as config_lib, train as train_lib
  workdir = str(tmp_path_factory.mktemp('quickstart') / 'seed0')
  train_lib.train_and_evaluate(config_lib.load_config_file('configs/quickstart.py:runlocal'),
                               workdir)
  return workdir
