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
import math
import os
import shutil
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


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
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)),
               metrics=metrics, force=True)
  manager.wait_until_finished()


# State fields added after checkpoints had been written without them (medjax's TrainState):
# such a checkpoint still restores where the field holds no arrays.
ADDED_FIELDS = ('loss_state',)


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


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any):
  """Restores (state, meta) at ``step`` onto the shardings in ``abstract_state``.

  Raises:
    ValueError: the checkpoint was written by a different model or optimizer.
    CorruptCheckpoint: it cannot be read, or its state is not the one saved.
  """
  where = os.path.join(str(manager.directory), str(step))
  try:
    state, meta = _restore_state(manager, step, abstract_state)
  except ValueError as e:
    if not _is_structure_mismatch(e):
      raise CorruptCheckpoint(f'{where}: unreadable ({type(e).__name__}: {e})') from None
    raise ValueError(
        f'checkpoint at step {step} in {manager.directory} does not fit this config: its '
        'parameters or optimizer state have another structure (was model.* or optimizer.name '
        'changed?). Resume with the original config, or use a new workdir.') from None
  except Exception as e:  # noqa: BLE001 (tensorstore, OS and decoding errors alike)
    raise CorruptCheckpoint(f'{where}: unreadable ({type(e).__name__}: {str(e)[:300]})'
                            ) from None
  expected = (meta or {}).get('state_sha256')
  if expected is not None and state_digest(state) != expected:
    raise CorruptCheckpoint(f'{where}: its state differs from the one saved (SHA-256 '
                            'mismatch: damaged bytes)')
  return state, meta


def restore_latest_intact(manager: ocp.CheckpointManager, abstract_state: Any
                          ) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
  """(step, state, meta) of the newest checkpoint that restores intact, or None if there is
  none. Damaged newer ones are moved to ``checkpoints_damaged/`` (kept for inspection; the
  resumed run saves those steps again), each with a warning."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, meta = restore(manager, step, abstract_state)
      return step, state, meta
    except CorruptCheckpoint as e:
      directory = str(manager.directory)
      aside = os.path.join(os.path.dirname(directory), 'checkpoints_damaged', str(step))
      if jax.process_index() == 0:
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
        shutil.move(os.path.join(directory, str(step)), aside)
      manager.reload()
      print(f'warning: {e}; moved to {aside}, trying the previous checkpoint')
  return None

