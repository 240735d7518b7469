"""Tasks: each a subclass of :class:`~medjax.experiments.base.Experiment` in its own module,
found by ``config.task`` in one table.

=====================================================  ===================================
``config.task``                                        experiment
=====================================================  ===================================
``auto``, ``binary``, ``multiclass``, ``ordinal``,     :class:`ClassificationExperiment`
``multilabel``
``segmentation``                                       :class:`SegmentationExperiment`
``contrastive``                                        :class:`ContrastiveExperiment`
                                                       (SimCLR pretraining, no labels)
``detection``                                          :class:`DetectionExperiment`
                                                       (Retina U-Net, boxes in 2D and 3D)
=====================================================  ===================================

A new task is one new module: subclass ``Experiment`` (see its docstring for what to
implement) and ``register_task('name', MyExperiment)``; ``--config.task=name`` then trains it
with the same loop, checkpoints, resume and workdir files.
"""

from __future__ import annotations

from medjax import tasks
from medjax.experiments.base import Experiment
from medjax.experiments.registry import TASKS, make_experiment, register_task, task_class
from medjax.experiments.state import TrainingDiverged, TrainState
from medjax.experiments.classification import ClassificationExperiment
from medjax.experiments.contrastive import ContrastiveExperiment
from medjax.experiments.detection import DetectionExperiment
from medjax.experiments.segmentation import SegmentationExperiment

__all__ = ['Experiment', 'TrainState', 'TrainingDiverged', 'ClassificationExperiment',
           'SegmentationExperiment', 'ContrastiveExperiment', 'DetectionExperiment', 'TASKS', 'register_task',
           'make_experiment', 'task_class']

for _task in ('auto',) + tasks.TASKS:
  register_task(_task, ClassificationExperiment)
register_task('segmentation', SegmentationExperiment)
register_task('contrastive', ContrastiveExperiment)
register_task('detection', DetectionExperiment)
