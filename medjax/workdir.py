"""The workdir contract: which files a run writes, and the one way each is written.

A workdir holds (see docs/workdir.md):

==========================  ==================================================================
``config.json``             the resolved config (``medjax train --config DIR/config.json``
                            repeats the run)
``config_history.jsonl``    one record per start: time, step, config changes allowed on
                            resume (``--allow_change``)
``command.json``            how the run was started: argv, cwd, host, git commit, time
``data_fingerprint.json``   what the data was (the task's ``run_files``; segmentation adds
                            ``split.json``)
``model_summary.{json,txt}``  parameters, FLOPs per example, the layer table
``metrics.jsonl``           one JSON record per logged train interval and per validation
``checkpoints/``            Orbax checkpoints (latest N plus the best by the selection metric)
``results.json``            the selected checkpoint's metrics, versions, run info
``predictions_<split>*``    the task's predictions of each scored split
``eval_<split>.json``       ``medjax evaluate``'s result (the selected checkpoint)
``evaluations/``            ``medjax evaluate`` of another checkpoint or other test-time
                            mirroring: ``<split>_step<N>[_mirror<axes>]/`` with its own
                            ``eval_<split>.json`` and predictions
``plots/``, ``tensorboard/``  figures (:func:`medjax.plots.write_plots_safely`) and scalars
==========================  ==================================================================

Only process 0 of a multi-host run writes. JSON is written atomically (temporary file, then
rename), so a kill never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax
import jax
import ml_collections
import numpy as np
import optax

import medjax
from medjax import config as config_lib
from medjax import output


def is_main() -> bool:
  """True on the process that writes the workdir (process 0)."""
  return jax.process_index() == 0


class RefusedOnProcess0(ValueError):
  """Another process of a multi-host run: process 0 refused to start (its message says why)."""


def agree_with_process0(check) -> None:
  """Runs ``check()`` (which may raise) on process 0 and makes every process share the
  outcome: a refusal on process 0 is raised on all of them, so no process goes on alone
  to wait forever in the first collective."""
  error = None
  if is_main():
    try:
      check()
    except (ValueError, OSError) as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if int(failed) and error is None:
      raise RefusedOnProcess0('process 0 refused to start this run; its error says why')
  if error is not None:
    raise error


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON to ``path`` atomically (process 0 only)."""
  if not is_main():
    return
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, allow_nan=True, default=list)
    f.write('\n')
  os.replace(tmp, path)


def config_path(workdir: str) -> str:
  return os.path.join(workdir, 'config.json')


# Keys that say how this invocation runs, not what it computes: never compared on resume.
RUN_CONTROL_KEYS = ('train.progress_bar', 'train.stop_after_steps', 'data.host_workers')
# Keys a resumed run may change when asked to (``--allow_change KEY``): the steps already
# taken stay valid. (With a cosine or multi-step schedule a new num_epochs also moves the
# learning rate of the steps to come; the change is recorded in config_history.jsonl.)
CHANGEABLE_ON_RESUME = ('train.num_epochs', 'train.eval_every_epochs', 'train.log_every_steps',
                        'train.keep_checkpoints')


class WorkdirMismatch(ValueError):
  """A resumed run whose config or data differ from those the workdir was trained with."""


def _plain(obj: Any) -> Any:
  """JSON's view of ``obj`` (tuples are lists, as in the saved files)."""
  return json.loads(json.dumps(obj, default=list, allow_nan=True))


def _flatten(tree: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def config_changes(saved: ml_collections.ConfigDict, new: ml_collections.ConfigDict
                   ) -> Dict[str, Tuple[Any, Any]]:
  """``{key: (saved value, new value)}`` of every key that differs (run-control keys aside)."""
  a, b = _flatten(_plain(saved.to_dict())), _flatten(_plain(new.to_dict()))
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if k not in RUN_CONTROL_KEYS and json.dumps(a.get(k)) != json.dumps(b.get(k))}


def start_run(workdir: str, config: ml_collections.ConfigDict, run_files: Dict[str, Any],
              resume_step: Optional[int], allow_change: Sequence[str] = ()) -> None:
  """Checks, then writes, the files that define a run, before anything else is written.

  A fresh run (``resume_step`` None: no checkpoint yet) writes ``config.json`` and the task's
  ``run_files`` (``data_fingerprint.json``, ...). A resumed one must have the same config,
  except run-control keys and the ``allow_change`` keys (of ``CHANGEABLE_ON_RESUME``), and
  the same run files (the same data); otherwise it is refused with the differences and the
  workdir is left as it was. Every start appends to ``config_history.jsonl``.
  """
  agree_with_process0(lambda: _start_run(workdir, config, run_files, resume_step,
                                         allow_change))


def _start_run(workdir, config, run_files, resume_step, allow_change) -> None:
  unknown = sorted(set(allow_change) - set(CHANGEABLE_ON_RESUME))
  if unknown:
    raise WorkdirMismatch(f"--allow_change {', '.join(unknown)}: only "
                          f"{', '.join(CHANGEABLE_ON_RESUME)} can change on resume")
  path = config_path(workdir)
  changes: Dict[str, Tuple[Any, Any]] = {}
  if resume_step is not None and os.path.exists(path):
    changes = config_changes(read_config(workdir), config)
    refused = {k: v for k, v in changes.items() if k not in allow_change}
    if refused:
      listed = '; '.join(f'{k}: {old!r} -> {new!r}' for k, (old, new) in refused.items())
      hint = (f' (or --allow_change {" ".join(k for k in refused)})'
              if set(refused) <= set(CHANGEABLE_ON_RESUME) else '')
      raise WorkdirMismatch(
          f'{workdir} was trained to step {resume_step} with another config ({listed}); '
          f'nothing was changed. Use a new --workdir, or the saved config: --config {path}'
          f'{hint}')
    for name, content in run_files.items():
      saved = os.path.join(workdir, name)
      if os.path.exists(saved):
        with open(saved) as f:
          old = json.load(f)
        if json.dumps(_plain(old), sort_keys=True) != json.dumps(_plain(content), sort_keys=True):
          raise WorkdirMismatch(
              f'{saved} differs from the data this run would train on (the files, labels or '
              'their preparation changed since the workdir was trained); nothing was changed. '
              'Use a new --workdir.')
  if resume_step is None or changes or not os.path.exists(path):
    write_json(path, config.to_dict())
  for name, content in run_files.items():
    write_json(os.path.join(workdir, name), content)
  with open(os.path.join(workdir, 'config_history.jsonl'), 'a') as f:
    record = {'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'start_step': resume_step or 0,
              'changes': {k: list(v) for k, v in changes.items()}}
    f.write(json.dumps(_plain(record), sort_keys=True) + '\n')


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = config_path(workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir} has no config.json; is it a medjax workdir?')
  try:
    return config_lib.from_json_file(path)
  except json.JSONDecodeError as e:
    raise WorkdirMismatch(f'{path} is empty or corrupt ({e}); copy the config from another '
                          'run of this workdir or from config_history.jsonl') from None


_REQUIRED = object()


def read_json(path: str, missing: Any = _REQUIRED) -> Any:
  """A workdir JSON file's content; ``missing`` when there is no such file (without it, a
  missing file is an error)."""
  if missing is not _REQUIRED and not os.path.exists(path):
    return missing
  with open(path) as f:
    return json.load(f)


def is_seed_group(path: str) -> bool:
  """A folder trained with ``train.seeds``: its runs are its ``seed_<K>`` subfolders."""
  try:
    return bool(read_json(os.path.join(path, 'config.json')).get('train', {}).get('seeds'))
  except (OSError, ValueError):
    return False


def seed_member(path: str, seed: int) -> str:
  """``path/seed_<seed>`` when ``path`` is a seed group (``train.seeds``), else ``path``."""
  member = os.path.join(path, f'seed_{seed}')
  return member if os.path.isdir(member) else path


def read_single_run_config(workdir: str) -> ml_collections.ConfigDict:
  """:func:`read_config` of a workdir that holds one trained model (not a seed group)."""
  config = read_config(workdir)
  if len(config.train.seeds):
    raise ValueError(f'{workdir} holds several seeds (train.seeds {list(config.train.seeds)}); '
                     f'use one of its seed_<K> workdirs')
  return config


class WorkdirLocked(ValueError):
  """Another ``medjax train`` holds the workdir."""


def process_alive(pid: int) -> bool:
  """Whether process ``pid`` exists on this host (locks and temporary files of dead
  processes are taken over or removed)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # it exists, owned by someone else
    return True
  return True


def left_by_dead_processes(folder: str, pattern: str) -> List[str]:
  """Paths in ``folder`` whose names match ``pattern`` (a regex whose one group is a pid)
  and whose process no longer runs: what a killed writer left behind."""
  found = []
  for name in os.listdir(folder or '.'):
    match = re.fullmatch(pattern, name)
    if match and not process_alive(int(match.group(1))):
      found.append(os.path.join(folder, name))
  return found


@contextlib.contextmanager
def lock(workdir: str):
  """One training process per workdir: ``train.lock`` holds the holder's pid and host while
  it runs. A second one is refused with both; a lock left by a process of this host that no
  longer exists (killed with -9) is taken over."""
  path = os.path.join(workdir, 'train.lock')
  taken = []
  agree_with_process0(lambda: taken.append(_take_lock(path, workdir)))
  try:
    yield
  finally:
    if any(taken):  # process 0 holds it
      with contextlib.suppress(OSError):
        os.remove(path)


def _take_lock(path: str, workdir: str) -> bool:
  """Creates ``train.lock`` (taking over a stale one); raises WorkdirLocked if held."""
  me = {'pid': os.getpid(), 'host': platform.node(), 'since': time.strftime('%Y-%m-%dT%H:%M:%S')}
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      try:
        with open(path) as f:
          holder = json.load(f)
      except (OSError, json.JSONDecodeError):
        holder = {}
      if holder.get('host') == me['host'] and not process_alive(int(holder.get('pid', 0))):
        os.remove(path)  # stale: its process is gone
        continue
      raise WorkdirLocked(
          f"{workdir} is in use by another medjax train (pid {holder.get('pid', '?')} on host "
          f"{holder.get('host', '?')}, since {holder.get('since', '?')}); wait for it to "
          f'finish, or delete {path} if that process no longer runs') from None
    with os.fdopen(fd, 'w') as f:
      json.dump(me, f)
    return True
  raise WorkdirLocked(f'{path}: could not be taken (another process keeps recreating it)')


def versions() -> Dict[str, str]:
  import orbax.checkpoint
  import tensorflow as tf
  return {'medjax': medjax.__version__, 'jax': jax.__version__, 'jaxlib': jax.lib.__version__,
          'flax': flax.__version__, 'optax': optax.__version__,
          'orbax_checkpoint': orbax.checkpoint.__version__, 'tensorflow': tf.__version__,
          'numpy': np.__version__, 'python': platform.python_version()}


def run_command() -> Dict[str, Any]:
  """How this process was started: argv, working directory, host, and medjax's git commit
  when it runs from a checkout."""
  commit = ''
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                            timeout=5, cwd=os.path.dirname(os.path.abspath(medjax.__file__))
                            ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return {'argv': list(sys.argv), 'cwd': os.getcwd(), 'host': platform.node(),
          'git_commit': commit, 'time': time.strftime('%Y-%m-%dT%H:%M:%S%z')}


def scalars(metrics: Dict[str, Any]) -> Dict[str, float]:
  """The scalar entries of a metrics dict (what the log and the checkpoint metadata keep)."""
  return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def read_metrics(path: str) -> list:
  """The records of a ``metrics.jsonl``. A torn last line (a kill while appending) is
  dropped with a warning; a bad line elsewhere is an error naming the file and line."""
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for number, line in enumerate(lines, 1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if number == len(lines):
        output.warn(f'{path}: dropped a torn last line ({line.strip()[:60]!r})')
        break
      raise WorkdirMismatch(f'{path}: line {number} is not JSON ({line.strip()[:60]!r})'
                            ) from None
  return records


class MetricsLog:
  """Appends JSON lines to ``metrics.jsonl`` and scalars to TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, resume_step: int):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = is_main()
    self.writer = None
    if not self.enabled:
      return
    if os.path.exists(self.path):
      # Drop records written after the checkpoint we resume from: they are redone.
      kept = [json.dumps(r, sort_keys=True) + '\n' for r in read_metrics(self.path)
              if r['step'] <= resume_step]
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    from tensorboardX import SummaryWriter  # slow import, only when a run writes
    self.writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, record: Dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record, sort_keys=True) + '\n')
    for key, value in record.items():
      if key not in ('step', 'split') and isinstance(value, (int, float)) and np.isfinite(value):
        self.writer.add_scalar(f"{record['split']}/{key}", value, global_step=record['step'])
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def selected_step(manager, workdir: str, step: Optional[int] = None) -> int:
  """``step`` if given, else the best checkpoint by the selection metric (else the latest)."""
  if step is not None:
    if step not in manager.all_steps():
      raise ValueError(f'no checkpoint at step {step}; available: {manager.all_steps()}')
    return step
  selected = manager.best_step()
  if selected is None:
    selected = manager.latest_step()
  if selected is None:
    raise FileNotFoundError(f'no checkpoint in {os.path.join(workdir, "checkpoints")}')
  return selected
