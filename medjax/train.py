"""The training loop: any task (:mod:`medjax.experiments`), one jit-compiled, data-parallel
train step, checkpoints with exact resume, and the selected checkpoint scored at the end.

``train_and_evaluate(config, workdir)`` trains (resuming from ``workdir`` if it holds
checkpoints), keeps the best checkpoint by the validation metric, scores it on the task's
evaluation splits and writes the workdir (:mod:`medjax.workdir`).
``restore_workdir`` / ``evaluate_workdir`` reload a finished run from its own config.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medjax import checkpoint, config as config_lib, plots, seeds as seeds_lib
from medjax import workdir as workdir_lib
from medjax.experiments import Experiment, TrainingDiverged, make_experiment
from medjax.models import summary as model_summary_lib

__all__ = ['train_and_evaluate', 'finalize', 'restore_workdir', 'evaluate_workdir',
           'TrainingDiverged']


class Cadence:
  """When, at a step, to log, evaluate (and checkpoint) or stop (as big_vision's itstime)."""

  def __init__(self, exp: Experiment, start_step: int):
    tcfg = exp.config.train
    self.log_every = tcfg.log_every_steps
    self.eval_every = max(tcfg.eval_every_epochs, 1) * exp.steps_per_epoch
    self.total = exp.total_steps
    self.stop_at = start_step + tcfg.stop_after_steps if tcfg.stop_after_steps else None

  def evaluate(self, step: int) -> bool:
    return step % self.eval_every == 0 or step == self.total

  def log(self, step: int) -> bool:
    return step % self.log_every == 0 or step % self.eval_every == 0

  def stop(self, step: int, requested: bool) -> bool:
    return requested or (self.stop_at is not None and step >= self.stop_at)


class LossBlowup:
  """Warns once when the logged train loss reaches ``factor`` times its first logged value
  in this invocation: a learning rate that wrecks the model without a NaN."""

  def __init__(self, factor: float = 10.0):
    self.factor, self.first, self.warned = factor, None, False

  def check(self, step: int, loss: float) -> None:
    if self.first is None:
      self.first = loss
    elif not self.warned and loss > self.factor * max(self.first, 1e-8):
      self.warned = True
      print(f'warning: train loss {loss:.4g} at step {step} is over {self.factor:g}x its first '
            f'logged value {self.first:.4g}; the learning rate may be too high')


@contextlib.contextmanager
def preemption_flag():
  """``{'requested': bool}`` set by SIGTERM, so the loop saves at the next step and exits.
  Single-process only: every host of a multi-host run would have to agree on the step."""
  flag = {'requested': False}
  previous = None
  if jax.process_count() == 1 and hasattr(signal, 'SIGTERM'):
    try:
      previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.update(requested=True))
    except ValueError:  # not the main thread
      previous = None
  try:
    yield flag
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def _diverged(what: str, manager, workdir: str) -> TrainingDiverged:
  latest = manager.latest_step()
  where = (f'The last good checkpoint is step {latest} in {os.path.join(workdir, "checkpoints")}'
           if latest is not None else 'No checkpoint was saved')
  return TrainingDiverged(f'{what}; stopping. {where} (lower optimizer.learning_rate or set '
                          'optimizer.grad_clip_norm).')


def _check_finite(losses: np.ndarray, step: int, manager, workdir: str) -> None:
  if not np.all(np.isfinite(losses)):
    raise _diverged(f'loss became NaN or infinite at or before step {step}', manager, workdir)


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _check_params(state, step: int, manager, workdir: str) -> None:
  """Before evaluating and saving: the last update can break the parameters while every
  loss so far was finite; such a state is never evaluated or saved."""
  if not bool(_all_finite(state.params)):
    raise _diverged(f'parameters became NaN or infinite at step {step} (not saved)', manager,
                    workdir)


def _start(exp: Experiment, manager, workdir: str):
  """(state, start step, train losses not yet logged): fresh, or from the latest checkpoint.
  A fresh run writes the model summary."""
  found = checkpoint.restore_latest_intact(manager, exp.abstract_state())
  if found is not None:
    step, state, meta = found
    print(f'Resuming from checkpoint at step {step} in {workdir}')
    return state, int(jax.device_get(state.step)), list(meta.get('pending_train_losses', []))
  state = exp.init_state()
  write_model_summary(exp, state, workdir)
  return state, 0, []


def write_model_summary(exp: Experiment, state, workdir: str, announce: bool = True) -> None:
  """``model_summary.json``/``.txt`` of a fresh run; ``announce`` prints it."""
  summary = exp.model_summary(state)
  workdir_lib.write_json(os.path.join(workdir, 'model_summary.json'), summary)
  if workdir_lib.is_main():
    with open(os.path.join(workdir, 'model_summary.txt'), 'w') as f:
      f.write(model_summary_lib.format_summary(summary, max_depth=99) + '\n')
  if announce:
    print(f'{exp.describe()}\n{model_summary_lib.format_summary(summary)}\ntask {exp.task}, '
          f'{jax.device_count()} device(s), {exp.steps_per_epoch} steps/epoch')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_change: Sequence[str] = ()) -> Dict[str, Any]:
  """Trains, selects the best checkpoint by the validation metric, scores it on the task's
  evaluation splits and writes the workdir files. Returns ``results.json``'s content (or
  ``{'stopped_at_step': N}`` when stopped early by ``train.stop_after_steps`` or SIGTERM).

  Resuming needs the config and data the workdir was trained with; ``allow_change`` names
  keys that may differ (``workdir.CHANGEABLE_ON_RESUME``, e.g. ``train.num_epochs``).
  One process trains a workdir at a time (``train.lock``).

  With ``train.seeds`` (e.g. ``(0, 1, 2)``) the seeds are trained together in one compiled
  program (:mod:`medjax.seeds`): ``workdir/seed_<K>/`` is each seed's workdir, and the
  return value is ``summary.json``'s content.
  """
  config = config_lib.resolve(config)
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.lock(workdir):
    if len(config.train.seeds):
      return _train_seeds(config, workdir, allow_change)
    return _train(config, workdir, allow_change)


class Member:
  """One run trained by the loop: its experiment, workdir, checkpoints and log."""

  def __init__(self, exp: Experiment, workdir: str):
    self.exp, self.workdir = exp, workdir
    tcfg = exp.config.train
    self.manager = checkpoint.make_manager(workdir, tcfg.keep_checkpoints,
                                           tcfg.selection_metric, tcfg.selection_mode)
    self.log = None
    self.pending: list = []  # train losses (floats) not logged yet
    self.blowup = LossBlowup()

  def start_run(self, allow_change: Sequence[str]) -> None:
    workdir_lib.start_run(self.workdir, self.exp.config, self.exp.run_files(),
                          self.manager.latest_step(), allow_change)
    workdir_lib.write_json(os.path.join(self.workdir, 'command.json'),
                           workdir_lib.run_command())

  def meta(self, step: int, pending_losses=()) -> Dict[str, Any]:
    # Unlogged losses travel in the checkpoint, so a resumed run logs what an uninterrupted
    # run would.
    return {'step': step, 'epoch': step / self.exp.steps_per_epoch, 'pending_train_losses':
            [float(x) for x in pending_losses]}


def _train(config: ml_collections.ConfigDict, workdir: str,
           allow_change: Sequence[str]) -> Dict[str, Any]:
  start_time = time.time()
  member = Member(make_experiment(config), workdir)
  member.start_run(allow_change)
  state, start_step, member.pending = _start(member.exp, member.manager, workdir)
  stopped = _loop([member], state, start_step, member.exp.train_step,
                  member.exp.train_iterator(start_step), lambda state, k: state)
  if stopped is not None:
    return stopped
  return _finish(member, start_time, start_step)


def _train_seeds(config: ml_collections.ConfigDict, workdir: str,
                 allow_change: Sequence[str]) -> Dict[str, Any]:
  """``train.seeds`` trained in one program (:mod:`medjax.seeds`); returns
  ``summary.json``'s content (or ``{'stopped_at_step': N}``)."""
  start_time = time.time()
  seeds = seeds_lib.check_seeds(config)
  members = [Member(make_experiment(seeds_lib.member_config(config, k)),
                    seeds_lib.seed_workdir(workdir, k)) for k in seeds]
  latest = [m.manager.latest_step() for m in members]
  workdir_lib.start_run(workdir, config, {}, max((s for s in latest if s is not None),
                                                 default=None), allow_change)
  for member in members:
    os.makedirs(member.workdir, exist_ok=True)
    member.start_run(allow_change)
  group = seeds_lib.Group(members, config.train.seeds_program)
  state, start_step = seeds_lib.start(
      group, lambda m, one, k: write_model_summary(m.exp, one, m.workdir, announce=k == 0))
  stopped = _loop(members, state, start_step, group.train_step, group.batches(start_step),
                  seeds_lib.member_state)
  if stopped is not None:
    return stopped
  del state
  results = [_finish(m, start_time, start_step) for m in members]
  summary = seeds_lib.summarize(members[0].exp, seeds, results, [m.workdir for m in members],
                                workdir)
  workdir_lib.write_json(os.path.join(workdir, 'summary.json'), summary)
  print(seeds_lib.format_summary(summary))
  return summary


def _finish(member: Member, start_time: float, start_step: int) -> Dict[str, Any]:
  """Scores the selected checkpoint and writes ``results.json`` and the plots."""
  results = finalize(member.exp, member.manager, member.workdir)
  results['run_info'] = {'wall_time_s': time.time() - start_time,
                         'resumed_from_step': start_step, 'devices': jax.device_count(),
                         'platform': jax.devices()[0].platform}
  workdir_lib.write_json(os.path.join(member.workdir, 'results.json'), results)
  plots.write_plots_safely(member.workdir)
  return results


def _loop(members: Sequence[Member], state, start_step: int, train_step, batches,
          member_state) -> Optional[Dict[str, Any]]:
  """The training loop over ``members`` trained as one program: ``train_step(state,
  images, labels)`` advances them all (its ``loss`` holds one value per member, or a scalar
  for one); ``member_state(state, k)`` is member ``k``'s state. Each member logs, evaluates,
  checkpoints and stops with its own workdir. Returns ``{'stopped_at_step': N}`` if stopped
  early, else None."""
  exp, tcfg = members[0].exp, members[0].exp.config.train
  for member in members:
    member.log = workdir_lib.MetricsLog(member.workdir, start_step)
  cadence = Cadence(exp, start_step)
  progress = None
  if tcfg.progress_bar and workdir_lib.is_main():
    from tqdm import tqdm  # only when a bar is drawn
    progress = tqdm(total=exp.total_steps, initial=start_step, unit='step', dynamic_ncols=True)
  step, interval_start, interval_steps = start_step, time.time(), 0
  step_losses = []  # device arrays (scalar, or [members]) since the last event: no host sync
  with preemption_flag() as preempted, contextlib.ExitStack() as logs:
    for member in members:
      logs.enter_context(contextlib.closing(member.log))
    try:
      for images, labels in batches:
        state, step_metrics = train_step(state, images, labels)
        step, interval_steps = step + 1, interval_steps + 1
        step_losses.append(step_metrics['loss'])
        if progress is not None:
          progress.update(1)
        log_now, eval_now = cadence.log(step), cadence.evaluate(step)
        stop_now = cadence.stop(step, preempted['requested'])
        if not (log_now or eval_now or stop_now):
          continue
        # One transfer for all members: [steps, members] -> each member's column.
        host = np.asarray(jax.device_get(step_losses)).reshape(len(step_losses), len(members))
        for k, member in enumerate(members):
          member.pending.extend(host[:, k].tolist())
        step_losses = []
        elapsed = max(time.time() - interval_start, 1e-9)
        for k, member in enumerate(members):
          losses = np.asarray(member.pending, np.float64)
          _check_finite(losses, step, member.manager, member.workdir)
          if eval_now or stop_now:
            _check_params(member_state(state, k), step, member.manager, member.workdir)
          if log_now or eval_now:
            member.log.write({'step': step, 'epoch': step / exp.steps_per_epoch,
                              'split': 'train', 'loss': float(losses.mean()),
                              'learning_rate': float(exp.schedule(step - 1)),
                              'images_per_sec': interval_steps * exp.global_batch / elapsed})
            if progress is not None and k == 0:
              progress.set_postfix(loss=f'{losses.mean():.4f}')
            member.blowup.check(step, float(losses.mean()))
            member.pending = []
        if log_now or eval_now:
          interval_start, interval_steps = time.time(), 0
        if eval_now:
          for k, member in enumerate(members):
            one = member_state(state, k)
            val_metrics, _ = member.exp.evaluate(one, 'val')
            member.log.write({'step': step, 'epoch': step / exp.steps_per_epoch, 'split': 'val',
                              **workdir_lib.scalars(val_metrics)})
            checkpoint.save(member.manager, step, one, member.meta(step),
                            workdir_lib.scalars(val_metrics))
          interval_start = time.time()
        if stop_now:
          if not eval_now:
            for k, member in enumerate(members):
              checkpoint.save(member.manager, step, member_state(state, k),
                              member.meta(step, member.pending))
          print(f'Stopped at step {step}; run the same command again to resume.')
          return {'stopped_at_step': step}
    finally:
      if progress is not None:
        progress.close()
  return None


def finalize(exp: Experiment, manager, workdir: str,
             step: Optional[int] = None) -> Dict[str, Any]:
  """Scores the selected (best) checkpoint on the task's evaluation splits; writes their
  predictions. Returns the results (``results.json`` without ``run_info``)."""
  selected = workdir_lib.selected_step(manager, workdir, step)
  state, meta = checkpoint.restore(manager, selected, exp.abstract_state())
  results: Dict[str, Any] = {
      'selected_step': int(selected), 'selected_epoch': meta['epoch'],
      'selection_metric': f'val/{exp.config.train.selection_metric}',
      'selection_mode': exp.config.train.selection_mode,
      'task': exp.task, 'dataset': exp.dataset_name, 'class_names': list(exp.class_names),
      'seed': exp.config.seed, 'versions': workdir_lib.versions()}
  if exp.scores_task:
    results['scores_task'] = exp.scores_task
  for split in exp.eval_splits:
    split_metrics, predictions = exp.evaluate(state, split)
    results[split] = split_metrics
    exp.save_predictions(workdir, split, predictions)
  results['headline_metrics'] = exp.headline_metrics(results[exp.eval_splits[0]])
  metric = exp.config.train.selection_metric
  summary = ', '.join(f'{split} {metric}={results[split].get(metric, float("nan")):.4f}'
                      for split in exp.eval_splits)
  print(f'Selected step {selected} (epoch {meta["epoch"]:.1f}): {summary}')
  return results


def restore_workdir(workdir: str, step: Optional[int] = None):
  """(experiment, state, step) of the selected (best) or given checkpoint of ``workdir``,
  built from the workdir's own config.json."""
  exp = make_experiment(workdir_lib.read_single_run_config(workdir))
  state, selected = exp.restore(workdir, step)
  return exp, state, selected


def _set_mirror_axes(exp: Experiment, mirror_axes: Optional[Sequence[int]]) -> None:
  """Test-time mirroring for this evaluation only (``inference.mirror_axes``: the spatial axes
  of the network's input, i.e. of the slice for a 2D model on volumes)."""
  if mirror_axes is None:
    return
  if exp.task != 'segmentation':
    raise ValueError('mirror_axes applies to segmentation workdirs only')
  exp.config.inference.mirror_axes = tuple(int(a) for a in mirror_axes)


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
  own_mirror = tuple(exp.config.inference.mirror_axes) if exp.task == 'segmentation' else None
  _set_mirror_axes(exp, mirror_axes)
  split_metrics, predictions = exp.evaluate(state, split)
  result = {'split': split, 'step': selected, 'metrics': split_metrics}
  if mirror_axes is not None:
    result['mirror_axes'] = list(exp.config.inference.mirror_axes)
  if on_result is not None:
    on_result(result)
  if write:
    own = (selected == _run_selected_step(workdir, selected) and
           (mirror_axes is None or tuple(exp.config.inference.mirror_axes) == own_mirror))
    out = workdir if own else os.path.join(workdir, 'evaluations',
                                           _evaluation_name(split, selected, mirror_axes))
    if workdir_lib.is_main():
      os.makedirs(out, exist_ok=True)
    workdir_lib.write_json(os.path.join(out, f'eval_{split}.json'), result)
    exp.save_predictions(out, split, predictions)
    if own:
      plots.write_plots_safely(workdir, (split,))
    elif workdir_lib.is_main():
      print(f'wrote {out} (not the run\'s selected checkpoint and settings: its own '
            f'eval_{split}.json and predictions are left as they are)', file=sys.stderr)
  return result


def _run_selected_step(workdir: str, default: int) -> int:
  """The step ``results.json`` reports (a finished run), else ``default``."""
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return int(json.load(f).get('selected_step', default))


def _evaluation_name(split: str, step: int, mirror_axes: Optional[Sequence[int]]) -> str:
  name = f'{split}_step{step}'
  if mirror_axes is not None:
    name += '_mirror' + ('-'.join(str(int(a)) for a in mirror_axes) or 'none')
  return name


def evaluate_ensemble(workdirs: Sequence[str], split: str = 'val',
                      mirror_axes: Optional[Sequence[int]] = None,
                      output: Optional[str] = None, on_result=None) -> Dict[str, Any]:
  """Scores the mean class probabilities of several segmentation workdirs' selected
  checkpoints (e.g. 2D U-Nets on different slice axes) on ``split`` of the first workdir,
  case by case on the original grid, as :func:`evaluate_workdir` scores one. The workdirs
  must share the data preparation and the split (no member may have trained on a case it is
  scored on). ``output``: a folder for ``eval_<split>.json`` and the label maps; the
  members' workdirs are only read."""
  from medjax.experiments.segmentation import ensemble_predictor
  if not workdirs:
    raise ValueError('evaluate_ensemble needs at least one workdir')
  members = [restore_workdir(w) for w in workdirs]
  first = members[0][0]
  for workdir, (exp, _, _) in zip(workdirs, members):
    if exp.task != 'segmentation':
      raise ValueError(f'{workdir}: an ensemble is of segmentation workdirs (classifiers: '
                       f'train.seeds writes the seed ensemble), not {exp.task}')
    if exp.data.splits != first.data.splits:
      raise ValueError(f'{workdir}: its split differs from {workdirs[0]}\'s (another fold or '
                       'data.split_seed); its members would be scored on cases they trained on')
    _set_mirror_axes(exp, mirror_axes)
  if split not in first.available_splits:
    raise ValueError(f"unknown split '{split}'; expected one of "
                     f'{sorted(first.available_splits)}')
  predict_probs = ensemble_predictor([(exp, state) for exp, state, _ in members])
  split_metrics, predictions = first.score_split(split, predict_probs)
  result = {'split': split, 'workdirs': list(workdirs),
            'steps': [int(step) for _, _, step in members],
            'mirror_axes': list(first.config.inference.mirror_axes), 'metrics': split_metrics}
  if on_result is not None:
    on_result(result)
  if output:
    os.makedirs(output, exist_ok=True)
    workdir_lib.write_json(os.path.join(output, f'eval_{split}.json'), result)
    first.save_predictions(output, split, predictions)
  return result
