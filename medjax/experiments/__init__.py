"""Tasks: each a subclass of :class:`~medjax.experiments.base.Experiment` in its own module,
found by ``config.task`` in one table.

=====================================================  ===================================
``config.task``                                        experiment
=====================================================  ===================================
``auto``, ``binary``, ``multiclass``, ``ordinal``,     :class:`ClassificationExperiment`
``multilabel``
``segmentation``                                       :class:`SegmentationExperiment`
=====================================================  ===================================

A new task is one new module: subclass ``Experiment`` (see its docstring for what to
implement) and ``register_task('name', MyExperiment)``; ``--config.task=name`` then trains it
with the same loop, checkpoints, resume and workdir files.
"""

from __future__ import annotations

from typing import Callable, Dict

import ml_collections

from medjax import tasks
from medjax.experiments.base import Experiment, TrainingDiverged, TrainState
from medjax.experiments.classification import ClassificationExperiment
from medjax.experiments.segmentation import SegmentationExperiment

__all__ = ['Experiment', 'TrainState', 'TrainingDiverged', 'ClassificationExperiment',
           'SegmentationExperiment', 'TASKS', 'register_task', 'make_experiment']

# config.task -> the experiment class (or any callable config -> Experiment).
TASKS: Dict[str, Callable[[ml_collections.ConfigDict], Experiment]] = {
    **{task: ClassificationExperiment for task in ('auto',) + tasks.TASKS},
    'segmentation': SegmentationExperiment,
}


def register_task(name: str, experiment: Callable[[ml_collections.ConfigDict], Experiment]
                  ) -> None:
  """Makes ``config.task = name`` build ``experiment(config)``."""
  if name in TASKS and TASKS[name] is not experiment:
    raise ValueError(f"task '{name}' is already registered ({TASKS[name].__name__})")
  TASKS[name] = experiment


def make_experiment(config: ml_collections.ConfigDict) -> Experiment:
  """The experiment for ``config.task`` (config already resolved)."""
  if config.task not in TASKS:
    raise ValueError(f"unknown task '{config.task}'; expected one of {', '.join(TASKS)}")
  return TASKS[config.task](config)
