"""The train state and the pytree helpers every task shares: variable names
(``'params/Dense_1/kernel'``), the first difference of two models' variables, a batch pytree
made global over the devices."""

from __future__ import annotations

import re
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.struct
import jax
from jax.sharding import NamedSharding


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree of arrays (checkpointed whole)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  dropout_key: jax.Array
  # Statistics the loss carries between steps (Experiment.init_loss_state); {} for most.
  loss_state: Any = flax.struct.field(default_factory=dict)
  # float16's dynamic loss scale (medjax.precision.init_loss_scale); {} in other precisions.
  loss_scale: Any = flax.struct.field(default_factory=dict)


def path_name(path) -> str:
  """A pytree key path as ``'params/Dense_1/kernel'``."""
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def named_leaves(tree: Any) -> Dict[str, Any]:
  """``{path name: leaf}`` of a pytree (:func:`path_name`)."""
  return {path_name(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_difference(ours: Any, theirs: Any) -> Optional[str]:
  """The first variable (by path) that one tree lacks or that has another shape, in words;
  None when both trees have the same paths and shapes."""
  shapes = lambda tree: {k: tuple(v.shape) for k, v in named_leaves(tree).items()}  # noqa: E731
  ours, theirs = shapes(ours), shapes(theirs)
  for path in sorted(set(ours) | set(theirs)):
    if path not in theirs:
      return f"'{path}' {ours[path]} is not there"
    if path not in ours:
      return f"'{path}' {theirs[path]} is not in this model"
    if ours[path] != theirs[path]:
      return f"'{path}' is {theirs[path]} there, {ours[path]} here"
  return None


def global_batch(sharding: NamedSharding, local: Any) -> Any:
  """Each array of a pytree of this process's rows -> the global array on ``sharding``."""
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), local)


class TrainingDiverged(FloatingPointError):
  """The loss became NaN or infinite."""


def warm_start_selection(theirs: Any, ours: Any, skip_patterns: Sequence[str]
                         ) -> Tuple[Dict[str, Any], int]:
  """(``{path name: array}`` of another model's variables ``theirs`` that start this model,
  the number of this model's variables left fresh): every variable of ``ours`` (shapes)
  except those matching a ``skip_patterns`` regex (e.g. a new head) must be in ``theirs``
  with its shape; a pattern that matches nothing, or a misfit, is a ValueError."""
  skip = [re.compile(p) for p in skip_patterns]
  kept = lambda tree: {k: v for k, v in named_leaves(tree).items()  # noqa: E731
                       if not any(p.search(k) for p in skip)}
  names = named_leaves(ours)
  for pattern in skip:
    if not any(pattern.search(name) for name in names):
      raise ValueError(f"train.init_from_skip '{pattern.pattern}' matches no variable of "
                       f"this model (names look like '{next(iter(names))}')")
  difference = tree_difference(kept(ours), kept(theirs))
  if difference:
    raise ValueError(f'its model does not fit this one: {difference} '
                     '(train.init_from_skip=<regex> starts the variables it matches fresh, '
                     'e.g. a new head)')
  return kept(theirs), len(names) - len(kept(ours))
