"""The task table: ``config.task`` -> the experiment class, filled by
:mod:`medjax.experiments` (the built-in tasks) and :func:`register_task`."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional

import ml_collections

# config.task -> the experiment class (or any callable config -> Experiment); filled by
# medjax.experiments (the built-in tasks) and register_task.
TASKS: Dict[str, Callable[[ml_collections.ConfigDict], Any]] = {}


def register_task(name: str, experiment: Callable[[ml_collections.ConfigDict], Any]
                  ) -> None:
  """Makes ``config.task = name`` build ``experiment(config)``."""
  if name in TASKS and TASKS[name] is not experiment:
    raise ValueError(f"task '{name}' is already registered ({TASKS[name].__name__})")
  TASKS[name] = experiment


def task_class(task: str, default: Optional[Callable[..., Any]] = None
               ) -> Callable[..., Any]:
  """The experiment class registered for ``task`` (``default`` when none is, e.g. a
  workdir of a task registered by another program; else an error)."""
  if task not in TASKS:
    if default is not None:
      return default
    raise ValueError(f"unknown task '{task}'; expected one of {', '.join(TASKS)}")
  return TASKS[task]


def make_experiment(config: ml_collections.ConfigDict, training: bool = True) -> Any:
  """The experiment for ``config.task`` (config already resolved). ``training=False``
  restores for evaluation, prediction or explanation: training-only set-up (a teacher's
  pseudo-labels) is skipped."""
  cls = task_class(config.task)
  if training or 'training' not in inspect.signature(cls).parameters:
    return cls(config)
  return cls(config, training=False)
