"""Orbax checkpoints: the latest N plus the best by a validation metric, saved atomically.

Orbax writes each checkpoint into a temporary directory and renames it only once complete,
so a run killed during a save leaves an unfinished temporary directory that is never picked
up on resume; the previous complete checkpoint stays the latest.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


def _ranking_value(metrics: Dict[str, float], key: str, mode: str) -> float:
  value = metrics.get(key, float('nan'))
  if value is None or math.isnan(value):
    return -math.inf if mode == 'max' else math.inf
  return float(value)


def make_manager(workdir: str, keep: int, selection_metric: str,
                 selection_mode: str) -> ocp.CheckpointManager:
  if selection_mode not in ('max', 'min'):
    raise ValueError(f"train.selection_mode must be 'max' or 'min', got '{selection_mode}'")
  rank = lambda m: _ranking_value(m, selection_metric, selection_mode)  # noqa: E731
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(max(keep, 1)),
      checkpoint_managers.BestN(get_metric_fn=rank, reverse=selection_mode == 'min', n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=rank, best_mode=selection_mode,
      enable_async_checkpointing=False, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: Dict[str, Any],
         metrics: Optional[Dict[str, float]] = None) -> None:
  """Saves ``state`` (a pytree of arrays) and JSON ``meta``; ``metrics`` rank it for 'best'."""
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)),
               metrics=metrics, force=True)
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any):
  """Restores (state, meta) at ``step`` onto the shardings in ``abstract_state``.

  Raises:
    ValueError: the checkpoint was written by a different model or optimizer.
  """
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  except ValueError as e:
    if 'do not match' not in str(e) and 'structure' not in str(e):
      raise
    raise ValueError(
        f'checkpoint at step {step} in {manager.directory} does not fit this config: its '
        'parameters or optimizer state have another structure (was model.* or optimizer.name '
        'changed?). Resume with the original config, or use a new workdir.') from None
  return restored['state'], restored['meta']


def restore_meta(manager: ocp.CheckpointManager, step: int) -> Dict[str, Any]:
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
