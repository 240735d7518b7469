"""medjax owns its output: one line per event, the libraries' own logs behind ``--debug``."""

import logging
import os
import re
import subprocess
import sys
import types

import orbax.checkpoint as ocp
import pytest

from conftest import REPO
from medjax import checkpoint

# C++ log lines of TensorFlow and XLA (absl/glog format) and TensorFlow's start-up notes.
NATIVE_LOG = re.compile(r'absl::InitializeLog|cpu_feature_guard|oneDNN|^[IWEF]\d{4} ', re.M)


@pytest.mark.slow  # two processes importing TensorFlow and JAX: ~20 s each on a CPU
def test_train_prints_no_tensorflow_startup_lines_before_its_first_line(tmp_path):
  """Nothing of TensorFlow's or XLA's C++ start-up log, even where the environment asks for
  all of it; with --debug their log shows (so the check can fail). Each run is stopped at
  medjax's first line: TensorFlow and jaxlib are loaded by then."""
  command = [sys.executable, '-m', 'medjax.cli', 'train', '--config',
             'configs/quickstart.py:runlocal', '--config.model.features=(4, 8)',
             '--config.model.hidden=8']
  procs = {}
  for debug in ('', '--debug'):  # side by side: each mostly waits for its imports
    env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
    if not debug:
      env['TF_CPP_MIN_LOG_LEVEL'] = '0'
    procs[debug] = subprocess.Popen(
        command[:3] + ([debug] if debug else []) + command[3:] +
        ['--workdir', str(tmp_path / f'w{debug}')], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  stderr = {}
  for debug, proc in procs.items():
    first_line = proc.stdout.readline()
    proc.kill()
    stderr[debug] = proc.communicate(timeout=60)[1]
    assert first_line.startswith('synthetic_lesions3: multiclass'), (first_line, stderr[debug])
  assert not NATIVE_LOG.search(stderr['']), stderr['']
  assert NATIVE_LOG.search(stderr['--debug']), stderr['--debug']


def _in_orbax(source: str, name: str):
  """A function compiled as if it were in Orbax's package (where the echoes come from)."""
  orbax = os.path.dirname(os.path.dirname(os.path.abspath(ocp.__file__)))
  namespace = {}
  exec(compile(source, os.path.join(orbax, '_medjax_test.py'), 'exec'), namespace)  # noqa: S102
  return namespace[name]


class _Suspend:
  def __await__(self):
    yield


def test_only_the_echoes_of_a_failed_orbax_read_are_hidden(monkeypatch, caplog):
  """Orbax's abandoned reads report their failure again when collected: as a coroutine that
  raises on close, as 'Event loop is closed' and as asyncio's 'Task exception was never
  retrieved'. Those are dropped; the same from any other code still shows."""
  shown = []
  monkeypatch.setattr(sys, 'unraisablehook', lambda u: shown.append(u.exc_value))
  echoes = checkpoint._ReadEchoes()
  echoes.install()
  try:
    read_source = ('async def read(waiter):\n'
                   '  try:\n'
                   '    await waiter\n'
                   '  except BaseException as e:\n'
                   "    raise Exception('Encountered error while reading array index') from e\n")
    namespace = {}
    exec(read_source, namespace)  # noqa: S102  the same coroutine outside Orbax
    for read, hidden in ((_in_orbax(read_source, 'read'), True), (namespace['read'], False)):
      coroutine = read(_Suspend())
      coroutine.send(None)  # in flight, as when its loop was closed
      del coroutine  # collected: closing it raises
      assert len(shown) == (0 if hidden else 1), shown
    shown.clear()
    for message in ('Event loop is closed', 'something else'):
      echoes._unraisable(types.SimpleNamespace(exc_value=RuntimeError(message), object=None))
    assert [str(e) for e in shown] == ['something else']
    echoes.read_failed = True  # stays installed after a failed read
    echoes.uninstall()
    assert sys.unraisablehook == echoes._unraisable
    for fail, hidden in ((_in_orbax('def fail():\n  raise ValueError("x")\n', 'fail'), True),
                         (lambda: 1 / 0, False)):
      try:
        fail()
      except Exception as error:  # noqa: BLE001
        caplog.clear()
        logging.getLogger('asyncio').error('Task exception was never retrieved', exc_info=error)
        assert len(caplog.records) == (0 if hidden else 1)
  finally:
    echoes.read_failed = False
    echoes.uninstall()
  assert sys.unraisablehook != echoes._unraisable
  assert echoes._log_record not in logging.getLogger('asyncio').filters
