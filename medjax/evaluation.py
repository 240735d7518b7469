"""A finished (or stopped) workdir reloaded and scored: ``medjax evaluate`` of one run, of
another checkpoint or with other evaluation options, and of an ensemble of runs; the run's
figures.

:func:`restore_workdir` rebuilds the experiment from the workdir's own config (without its
training-only set-up) and restores the selected checkpoint; every task-specific step is the
experiment's (``evaluate``, ``evaluation_options``, ``score_ensemble``, ``run_figures``).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, Optional, Sequence

from medjax import plots, workdir as workdir_lib
from medjax.experiments import Experiment, make_experiment, task_class


def write_plots(workdir: str, splits: Sequence[str] = ('val', 'test')) -> None:
  """The workdir's figures: learning curves and its task's own (``run_figures``); a plotting
  failure is reported, never fatal."""
  config = workdir_lib.read_json(os.path.join(workdir, 'config.json'), {})
  figures = task_class(config.get('task', ''), Experiment).run_figures
  plots.write_plots_safely(workdir, splits, figures)


def restore_workdir(workdir: str, step: Optional[int] = None):
  """(experiment, state, step) of the selected (best) or given checkpoint of ``workdir``,
  built from the workdir's own config.json without its training-only set-up (a teacher's
  pseudo-labels are not made again)."""
  exp = make_experiment(workdir_lib.read_single_run_config(workdir), training=False)
  state, selected = exp.restore(workdir, step)
  return exp, state, selected


def evaluate_workdir(workdir: str, split: str = 'test', step: Optional[int] = None,
                     write: bool = True, on_result=None,
                     mirror_axes: Optional[Sequence[int]] = None) -> Dict[str, Any]:
  """Reloads the config and the selected (or given) checkpoint of ``workdir`` and scores
  ``split``; the numbers equal those in ``results.json`` for the same checkpoint (unless
  ``mirror_axes`` asks for test-time mirroring). ``on_result(result)`` sees the result
  before anything is written.

  The run's own scoring (its selected checkpoint, its inference settings) goes to
  ``eval_<split>.json``, ``predictions_<split>*`` and the plots. Any other (``step`` of another
  checkpoint, other ``mirror_axes``) goes to ``evaluations/<split>_step<N>[_mirror<axes>]/``:
  the files that ``results.json``, the seed ensemble and the report read are never replaced by
  another checkpoint's predictions.
  """
  exp, state, selected = restore_workdir(workdir, step)
  if split not in exp.available_splits:
    raise ValueError(f"unknown split '{split}'; expected one of {sorted(exp.available_splits)}")
  own_options = exp.evaluation_options()
  exp.set_evaluation_options(mirror_axes=mirror_axes)
  split_metrics, predictions = exp.evaluate(state, split)
  result = {'split': split, 'step': selected, 'metrics': split_metrics}
  if mirror_axes is not None:
    result['mirror_axes'] = list(exp.evaluation_options()['mirror_axes'])
  if on_result is not None:
    on_result(result)
  if write:
    own = (selected == _run_selected_step(workdir, selected) and
           exp.evaluation_options() == own_options)
    out = workdir if own else os.path.join(workdir, 'evaluations',
                                           _evaluation_name(split, selected, mirror_axes))
    if workdir_lib.is_main():
      os.makedirs(out, exist_ok=True)
    workdir_lib.write_json(os.path.join(out, f'eval_{split}.json'), result)
    exp.save_predictions(out, split, predictions)
    if own:
      write_plots(workdir, (split,))
    elif workdir_lib.is_main():
      print(f'wrote {out} (not the run\'s selected checkpoint and settings: its own '
            f'eval_{split}.json and predictions are left as they are)', file=sys.stderr)
  return result


def _run_selected_step(workdir: str, default: int) -> int:
  """The step ``results.json`` reports (a finished run), else ``default``."""
  results = workdir_lib.read_json(os.path.join(workdir, 'results.json'), {})
  return int(results.get('selected_step', default))


def _evaluation_name(split: str, step: int, mirror_axes: Optional[Sequence[int]]) -> str:
  name = f'{split}_step{step}'
  if mirror_axes is not None:
    name += '_mirror' + ('-'.join(str(int(a)) for a in mirror_axes) or 'none')
  return name


def evaluate_ensemble(workdirs: Sequence[str], split: str = 'val',
                      mirror_axes: Optional[Sequence[int]] = None,
                      output: Optional[str] = None, on_result=None) -> Dict[str, Any]:
  """Scores the mean prediction of several workdirs' selected checkpoints (e.g. 2D U-Nets
  on different slice axes) on ``split`` of the first workdir, as :func:`evaluate_workdir`
  scores one (the task's ``score_ensemble``: segmenters case by case on the original grid).
  The workdirs must share the data preparation and the split (no member may have trained on
  a case it is scored on). ``output``: a folder for ``eval_<split>.json`` and the
  predictions; the members' workdirs are only read."""
  if not workdirs:
    raise ValueError('evaluate_ensemble needs at least one workdir')
  members = [restore_workdir(w) for w in workdirs]
  first = members[0][0]
  for workdir, (exp, _, _) in zip(workdirs, members):
    if type(exp) is not type(first):
      raise ValueError(f'{workdir}: a {exp.task} model in an ensemble of {first.task} ones')
    exp.set_evaluation_options(mirror_axes=mirror_axes)
  if split not in first.available_splits:
    raise ValueError(f"unknown split '{split}'; expected one of "
                     f'{sorted(first.available_splits)}')
  try:
    split_metrics, predictions = first.score_ensemble(
        [(exp, state) for exp, state, _ in members], split)
  except ValueError as e:
    raise ValueError(f'{", ".join(workdirs)}: {e}') from None
  result = {'split': split, 'workdirs': list(workdirs),
            'steps': [int(step) for _, _, step in members], **{
                k: list(v) for k, v in first.evaluation_options().items()},
            'metrics': split_metrics}
  if on_result is not None:
    on_result(result)
  if output:
    os.makedirs(output, exist_ok=True)
    workdir_lib.write_json(os.path.join(output, f'eval_{split}.json'), result)
    first.save_predictions(output, split, predictions)
  return result
