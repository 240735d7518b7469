"""Orbax checkpoints: the latest N plus the best by a validation metric, saved atomically.

Orbax writes each checkpoint into a temporary directory and renames it only once complete,
so a run killed during a save leaves an unfinished temporary directory that is never picked
up on resume; the previous complete checkpoint stays the latest. Each checkpoint's metadata
holds a SHA-256 of its state, checked on every restore: a damaged checkpoint (truncated,
missing or flipped bytes) is never restored silently, and :func:`restore_latest_intact`
falls back to the newest intact one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import math
import os
import re
import shutil
import sys
import traceback
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from medjax import output


def _ranking_value(metrics: Dict[str, float], key: str, mode: str) -> float:
  value = metrics.get(key, float('nan'))
  if value is None or math.isnan(value):
    return -math.inf if mode == 'max' else math.inf
  return float(value)


def make_manager(workdir: str, keep: int, selection_metric: str,
                 selection_mode: str) -> ocp.CheckpointManager:
  """Keeps the latest ``keep`` checkpoints plus the best by ``selection_metric``
  (``selection_mode`` 'max' or 'min'); with 'last', only the latest, and the last one is
  the selected one (as MedMNIST's official script reports its test figures)."""
  if selection_mode not in ('max', 'min', 'last'):
    raise ValueError("train.selection_mode must be 'max', 'min' or 'last', got "
                     f"'{selection_mode}'")
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if selection_mode == 'last':
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=max(keep, 1), enable_async_checkpointing=False,
        cleanup_tmp_directories=True))
  rank = lambda m: _ranking_value(m, selection_metric, selection_mode)  # noqa: E731
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(max(keep, 1)),
      checkpoint_managers.BestN(get_metric_fn=rank, reverse=selection_mode == 'min', n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=rank, best_mode=selection_mode,
      enable_async_checkpointing=False, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options)


class CorruptCheckpoint(ValueError):
  """A checkpoint that cannot be read, or whose state differs from what was saved."""


def state_digest(state: Any) -> str:
  """SHA-256 of every array of a (replicated) state, in tree order: shapes, dtypes, bytes."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(state)):
    array = np.ascontiguousarray(leaf)
    digest.update(f'{array.shape}{array.dtype}'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: Dict[str, Any],
         metrics: Optional[Dict[str, float]] = None) -> None:
  """Saves ``state`` (a pytree of arrays) and JSON ``meta`` (plus the state's SHA-256);
  ``metrics`` rank it for 'best'."""
  meta = {**meta, 'state_sha256': state_digest(state)}
  quiet = metrics is None and not output.debug()
  if quiet:
    logging.getLogger('absl').addFilter(_without_metrics_note)
  try:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)),
                 metrics=metrics, force=True)
    manager.wait_until_finished()
  finally:
    if quiet:
      logging.getLogger('absl').removeFilter(_without_metrics_note)


def _without_metrics_note(record: logging.LogRecord) -> bool:
  """False (drop) for Orbax's warning on a save without metrics where it ranks checkpoints:
  a stop checkpoint (train.stop_after_steps, SIGTERM) has none on purpose and is kept as
  the latest; the run says 'Stopped at step N' itself."""
  return 'did not provide metrics' not in record.getMessage()


# State fields added after checkpoints had been written without them (medjax's TrainState):
# such a checkpoint still restores where the field holds no arrays.
ADDED_FIELDS = ('loss_state', 'loss_scale')


def _is_structure_mismatch(error: ValueError) -> bool:
  """Orbax's error for a checkpoint whose tree differs from the target's."""
  return 'do not match' in str(error) or 'structure' in str(error)


def _restore_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any):
  """Orbax's restore of (state, meta); a checkpoint that predates an :data:`ADDED_FIELDS`
  field restores into a state whose field is empty (it keeps its empty value)."""
  def restore_into(target):
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return restored['state'], restored['meta']
  try:
    return restore_into(abstract_state)
  except ValueError as error:
    added = [f.name for f in dataclasses.fields(abstract_state)
             if f.name in ADDED_FIELDS and not jax.tree.leaves(getattr(abstract_state, f.name))
             ] if dataclasses.is_dataclass(abstract_state) else []
    if not added or not _is_structure_mismatch(error):
      raise
    older = {f.name: getattr(abstract_state, f.name)
             for f in dataclasses.fields(abstract_state) if f.name not in added}
    try:
      state, meta = restore_into(older)
    except ValueError:
      raise error from None
    return abstract_state.replace(**state), meta


class _ReadEchoes:
  """Hides the echoes of a failed Orbax read, and nothing else.

  When one array of a checkpoint cannot be read, Orbax raises that error and closes its event
  loop with the other reads still in flight. As those finish and are garbage-collected (during
  the restore or seconds later), each reports the same failure again on stderr, ~60 lines
  apiece with the TensorStore spec: asyncio's "Task exception was never retrieved" (its
  logger), "Exception ignored in: <coroutine ... _read_array_index_and_device_put>" (a read
  that turns its own close into an exception) and "RuntimeError: Event loop is closed"
  (TensorStore completing a read into the closed loop), the last two through
  ``sys.unraisablehook``. The failure itself reaches the caller once, as an exception.

  Installed for each restore; after a failed one it stays, as the echoes arrive later. It
  drops only what Orbax's reads raise, so any other unraisable exception or asyncio error
  still shows; with ``--debug`` it is never installed.
  """

  def __init__(self):
    self._orbax = os.path.dirname(os.path.dirname(os.path.abspath(ocp.__file__))) + os.sep
    self._previous_hook = None
    self.read_failed = False

  def install(self) -> None:
    if sys.unraisablehook != self._unraisable:  # not yet, or another hook was set since
      self._previous_hook = sys.unraisablehook
      sys.unraisablehook = self._unraisable
    if self._log_record not in logging.getLogger('asyncio').filters:
      logging.getLogger('asyncio').addFilter(self._log_record)

  def uninstall(self) -> None:
    """Unless a read failed (its echoes may come later)."""
    if self.read_failed:
      return
    if sys.unraisablehook == self._unraisable:
      sys.unraisablehook = self._previous_hook
    logging.getLogger('asyncio').removeFilter(self._log_record)

  def _raised_in_orbax(self, error: Optional[BaseException]) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
      seen.add(id(error))
      if any(frame.filename.startswith(self._orbax)
             for frame in traceback.extract_tb(error.__traceback__)):
        return True
      error = error.__cause__ or error.__context__
    return False

  def _is_echo(self, error: Optional[BaseException], source: Any) -> bool:
    if inspect.iscoroutine(source):
      return source.cr_code.co_filename.startswith(self._orbax)
    # TensorStore finishing a read into Orbax's closed loop, from its own thread: no object.
    return source is None and isinstance(error, RuntimeError) and (
        str(error) == 'Event loop is closed')

  def _unraisable(self, unraisable) -> None:
    if not self._is_echo(unraisable.exc_value, unraisable.object):
      (self._previous_hook or sys.__unraisablehook__)(unraisable)

  def _log_record(self, record: logging.LogRecord) -> bool:
    """False (drop) for asyncio's report of an Orbax read's task or gathering future."""
    if record.exc_info and record.exc_info[1] is not None:
      return not self._raised_in_orbax(record.exc_info[1])
    return self._orbax not in record.getMessage()  # "Task was destroyed but it is pending!"


_READ_ECHOES = _ReadEchoes()


def _reason(error: BaseException, where: str) -> str:
  """The failure in a few words: its innermost cause's first line, without the checkpoint's
  own path (the warning names it already)."""
  line = output.first_line(error).replace(where + os.sep, '')
  line = re.sub(r' in \w+ database at local file "[^"]*"', '', line)  # TensorStore's
  return output.shorten(line)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any):
  """Restores (state, meta) at ``step`` onto the shardings in ``abstract_state``.

  Raises:
    ValueError: the checkpoint was written by a different model or optimizer.
    CorruptCheckpoint: it cannot be read (the reason in one line; with ``--debug``, chained
      to the library's error), or its state is not the one saved.
  """
  where = os.path.join(str(manager.directory), str(step))
  debug = output.debug()
  if not debug:
    _READ_ECHOES.install()
  try:
    state, meta = _restore_state(manager, step, abstract_state)
  except Exception as e:  # noqa: BLE001 (tensorstore, OS and decoding errors alike)
    if not debug:
      _READ_ECHOES.read_failed = True
    if isinstance(e, ValueError) and _is_structure_mismatch(e):
      raise ValueError(
          f'checkpoint at step {step} in {manager.directory} does not fit this config: its '
          'parameters or optimizer state have another structure (was model.* or optimizer.name '
          'changed?). Resume with the original config, or use a new workdir.') from None
    unreadable = CorruptCheckpoint(f'{where}: unreadable ({_reason(e, where)})')
    if debug:
      raise unreadable from e
    raise unreadable from None
  finally:
    _READ_ECHOES.uninstall()
  expected = (meta or {}).get('state_sha256')
  if expected is not None and state_digest(state) != expected:
    raise CorruptCheckpoint(f'{where}: its state differs from the one saved (SHA-256 '
                            'mismatch: damaged bytes)')
  return state, meta


def restore_latest_intact(manager: ocp.CheckpointManager, abstract_state: Any
                          ) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
  """(step, state, meta) of the newest checkpoint that restores intact, or None if there is
  none. Damaged newer ones are moved to ``checkpoints_damaged/`` (kept for inspection; the
  resumed run saves those steps again), each with a one-line warning on stderr (with
  ``--debug``, after the traceback of the failed read)."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, meta = restore(manager, step, abstract_state)
      return step, state, meta
    except CorruptCheckpoint as e:
      if output.debug() and e.__cause__ is not None:
        traceback.print_exception(e.__cause__)
      directory = str(manager.directory)
      aside = os.path.join(os.path.dirname(directory), 'checkpoints_damaged', str(step))
      if jax.process_index() == 0:
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
        shutil.move(os.path.join(directory, str(step)), aside)
      manager.reload()
      output.warn(f'{e}; moved to {aside}, trying the previous checkpoint')
  return None

