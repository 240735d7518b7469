"""``conv_impl='auto'`` fitted to the CPU it runs on: per-layer choices measured once per
machine and cached, and the choices a run used kept in its workdir.

Which CPU convolution is fastest differs between CPUs (on an AMD Zen 5 the 2D rule of
``conv.rule_impl``, tuned on Intel Xeon and Zen 4, gains nothing). So on CPU ``'auto'``
takes, for each layer (input shape, kernel shape, strides, padding):

1. the choice pinned by the run (``recorded_in(workdir)``: ``conv_impl_choices.json`` of a
   workdir being resumed), so a resumed or repeated run compiles the same program;
2. else, with autotuning on (``train.conv_autotune=True``), the choice cached for this
   machine (CPU model and jax version) in ``~/.cache/medjax/conv_impl.json``
   (``$MEDJAX_CONV_CACHE`` overrides the path);
3. else, with autotuning on, it times the candidates once
   (forward and both gradients, interleaved repetitions, median), keeps the rule's choice
   unless another is more than ``MARGIN`` faster, and caches the winner;
4. else the fixed rule (``conv.rule_impl``): without ``train.conv_autotune`` a run's
   program depends on its config and shapes alone, never on what a machine has cached.

The choice never depends on a timing taken by a run that finds it cached or pinned, so the
same config, seed, machine and cache give the same numbers. A cache or record that cannot be
read is ignored with a one-line warning.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import tempfile
import time
import warnings
from typing import Callable, Dict, Iterator, Optional, Sequence

import jax

from medjax import config as config_lib

CACHE_ENV = 'MEDJAX_CONV_CACHE'
# The implementations of medjax.models.conv that a layer can be pinned to ('auto' resolves
# to one of them).
CHOICES = ('xla', 'matmul_wgrad', 'patch_wgrad', 'depth_stack', 'depth_taps', 'pointwise')
RECORD_FILE = 'conv_impl_choices.json'
# A measured alternative replaces the rule's choice only when it is this much faster, so
# near-ties (noise) keep the rule.
MARGIN = 0.05

_pinned: Optional[Dict[str, str]] = None   # choices of the run being resumed
_used: Optional[Dict[str, str]] = None     # choices made while a run is recorded
_autotune = False
_loaded: Dict[str, tuple] = {}             # path -> (mtime, this machine's choices)


@config_lib.declare
def _defaults(c) -> None:
  # Time each new CPU convolution shape once per machine and cache the fastest (see above).
  config_lib.section(c, 'train').conv_autotune = False


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or 'unknown'


def machine_id() -> str:
  """The cache's key for this machine: CPU model, core count and jax version."""
  return f'{cpu_model()}; {os.cpu_count()} cores; jax {jax.__version__}'


def layer_key(input_shape: Sequence[int], kernel_shape: Sequence[int],
              strides: Sequence[int], pads: Sequence[Sequence[int]]) -> str:
  """``'in 128x28x28x64 k 3x3x64x64 s 1x1 p 1-1,1-1'`` for input ``[B, *S, C_in]``, kernel
  ``[*K, C_in, C_out]``."""
  def dims(v):
    return 'x'.join(str(int(d)) for d in v)
  return (f'in {dims(input_shape)} k {dims(kernel_shape)} s {dims(strides)} p '
          + ','.join(f'{int(lo)}-{int(hi)}' for lo, hi in pads))


def cache_path() -> str:
  return os.environ.get(CACHE_ENV) or os.path.join(
      os.path.expanduser('~'), '.cache', 'medjax', 'conv_impl.json')


def _valid_choices(value) -> bool:
  return isinstance(value, dict) and all(
      isinstance(k, str) and v in CHOICES for k, v in value.items())


def _read(path: str, what: str) -> dict:
  """The JSON object in ``path`` ({} if missing; {} and a warning if unreadable)."""
  try:
    with open(path) as f:
      data = json.load(f)
    if not isinstance(data, dict):
      raise ValueError('not a JSON object')
    return data
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    warnings.warn(f'ignoring the {what} {path}: {e}', stacklevel=3)
    return {}


def load_cache(path: Optional[str] = None) -> Dict[str, str]:
  """This machine's cached choices (layer key -> impl) from the cache file."""
  path = path or cache_path()
  try:
    mtime = os.stat(path).st_mtime_ns
  except OSError:
    return {}
  if path in _loaded and _loaded[path][0] == mtime:
    return _loaded[path][1]
  entry = _read(path, 'convolution cache').get(machine_id(), {})
  if not _valid_choices(entry):
    warnings.warn(f'ignoring the convolution cache {path}: its entry for this machine is not '
                  'a map of layer to conv_impl', stacklevel=2)
    entry = {}
  _loaded[path] = (mtime, entry)
  return entry


def _write_json(path: str, data: dict) -> None:
  """Written whole or not at all (a temporary file renamed into place)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix='.tmp')
  with os.fdopen(fd, 'w') as f:
    json.dump(data, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def save_choice(key: str, impl: str, path: Optional[str] = None) -> None:
  """Adds ``key -> impl`` to this machine's entry of the cache (other machines' kept; an
  unreadable cache is replaced)."""
  path = path or cache_path()
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    data = _read(path, 'convolution cache')
  entry = data.get(machine_id())
  entry = dict(entry) if _valid_choices(entry) else {}
  entry[key] = impl
  data[machine_id()] = entry
  _write_json(path, data)


def candidates(input_shape: Sequence[int], kernel_shape: Sequence[int],
               strides: Sequence[int]) -> tuple:
  """The implementations ``'auto'`` chooses among for one CPU layer. XLA's own 3D
  convolution is left out: 3-35x slower than the depth methods on every CPU measured, and
  minutes to time."""
  if all(k == 1 for k in kernel_shape[:-2]):
    return ('pointwise', 'xla')
  if len(input_shape) == 5:
    return ('depth_stack', 'depth_taps')
  return ('matmul_wgrad', 'patch_wgrad', 'xla')


def measure(input_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
            pads, impls: Sequence[str], convolve: Callable, reps: int = 3) -> Dict[str, float]:
  """Median seconds of forward + both gradients of one layer for each of ``impls``
  (``convolve(x, w, strides, pads, impl)``, the op of ``medjax.models.conv``), compiled
  first, then timed in turn ``reps`` times (so load affects all alike)."""
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=tuple(input_shape)), jnp.float32)
  w = jnp.asarray(rng.normal(size=tuple(kernel_shape)) / math.sqrt(math.prod(kernel_shape[:-1])),
                  jnp.float32)
  fns = {}
  for impl in impls:
    def loss(x, w, impl=impl):
      return jnp.sum(convolve(x, w, tuple(strides), tuple(map(tuple, pads)), impl) ** 2)
    fns[impl] = jax.jit(jax.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(fns[impl](x, w))
  times = {impl: [] for impl in impls}
  for _ in range(reps):
    for impl, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(x, w))
      times[impl].append(time.perf_counter() - start)
  return {impl: float(np.median(t)) for impl, t in times.items()}


def pick(seconds: Dict[str, float], default: str, margin: float = MARGIN) -> str:
  """The fastest of ``seconds``, but ``default`` unless the fastest beats it by ``margin``."""
  best = min(sorted(seconds), key=seconds.get)
  if default in seconds and seconds[best] * (1 + margin) >= seconds[default]:
    return default
  return best


def lookup(input_shape, kernel_shape, strides, pads, rule: str, convolve: Callable) -> str:
  """What ``'auto'`` runs on CPU for one layer (order: pinned, cached, measured, rule);
  ``convolve`` runs a candidate when one is measured (see :func:`measure`)."""
  key = layer_key(input_shape, kernel_shape, strides, pads)
  cached = load_cache() if _autotune else {}
  if _pinned is not None and key in _pinned:
    impl = _pinned[key]
  elif key in cached:
    impl = cached[key]
  elif _autotune:
    impls = candidates(input_shape, kernel_shape, strides)
    impl = pick(measure(input_shape, kernel_shape, strides, pads, impls, convolve), rule)
    save_choice(key, impl)
  else:
    impl = rule
  if _used is not None:
    _used[key] = impl
  return impl


@contextlib.contextmanager
def recorded_in(workdir: str, autotune: bool = False) -> Iterator[Dict[str, str]]:
  """Within: ``'auto'`` first takes the choices recorded in ``workdir/conv_impl_choices.json``
  (a resumed run compiles what it started with), autotunes new layers if ``autotune``, and
  every choice made is added to that file on exit. Yields the choices used."""
  global _pinned, _used, _autotune
  path = os.path.join(workdir, RECORD_FILE)
  record = _read(path, 'convolution choices')
  if not _valid_choices(record):
    warnings.warn(f'ignoring the convolution choices {path}: not a map of layer to conv_impl',
                  stacklevel=3)
    record = {}
  saved = _pinned, _used, _autotune
  _pinned, _used, _autotune = dict(record), {}, autotune
  try:
    yield _used
  finally:
    used = _used
    _pinned, _used, _autotune = saved
    if used and any(record.get(k) != v for k, v in used.items()):
      _write_json(path, {**record, **used})
