"""The training loop: any task (:mod:`medjax.experiments`), one jit-compiled, data-parallel
train step, checkpoints with exact resume, and the selected checkpoint scored at the end.

``train_and_evaluate(config, workdir)`` trains (resuming from ``workdir`` if it holds
checkpoints), keeps the best checkpoint by the validation metric, scores it on the task's
evaluation splits and writes the workdir (:mod:`medjax.workdir`). Read top to bottom:
``train_and_evaluate`` -> ``_train`` (one run) or ``_train_seeds`` (several seeds in one
program, :mod:`medjax.seeds`) -> ``_loop`` (the steps, logging, evaluation, checkpoints) ->
``_finish`` / ``finalize`` (the selected checkpoint scored). A run's bookkeeping is
:mod:`medjax.runs`; reloading a workdir, :mod:`medjax.evaluation`.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Dict, Optional, Sequence

import jax
import ml_collections
import numpy as np

from medjax import checkpoint, config as config_lib, seeds as seeds_lib
from medjax import workdir as workdir_lib
from medjax.evaluation import (evaluate_ensemble, evaluate_workdir, restore_workdir,
                               write_plots)
from medjax.experiments import Experiment, TrainingDiverged, make_experiment
from medjax.models import conv_tune
from medjax.runs import (Cadence, LossBlowup, Member, check_finite, check_params,
                         preemption, start, write_model_summary)

__all__ = ['train_and_evaluate', 'finalize', 'restore_workdir', 'evaluate_workdir',
           'evaluate_ensemble', 'TrainingDiverged', 'LossBlowup']


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
  # conv_impl='auto' on CPU: the choices recorded in the workdir first, so a resumed run
  # compiles the program it started with (medjax.models.conv_tune).
  with workdir_lib.lock(workdir), conv_tune.recorded_in(workdir, config.train.conv_autotune):
    if len(config.train.seeds):
      return _train_seeds(config, workdir, allow_change)
    return _train(config, workdir, allow_change)


def _train(config: ml_collections.ConfigDict, workdir: str,
           allow_change: Sequence[str]) -> Dict[str, Any]:
  start_time = time.time()
  member = Member(make_experiment(config), workdir)
  member.start_run(allow_change)
  state, start_step, fresh = start([member], member.exp.init_state, lambda states: states[0])
  if fresh:
    write_model_summary(member.exp, state, workdir)
  else:
    print(f'Resuming from checkpoint at step {start_step} in {workdir}')
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
  state, start_step, fresh = start(members, group.init, group.stack)
  if fresh:
    for k, member in enumerate(members):
      write_model_summary(member.exp, seeds_lib.member_state(state, k), member.workdir,
                          announce=k == 0)
    print(f'{len(members)} seeds in one program ({group.program} over the seed axis): '
          f"{', '.join(str(k) for k in seeds)}")
  else:
    print(f'Resuming {len(members)} seeds from step {start_step} in {workdir}')
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
  write_plots(member.workdir)
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
  with preemption(start_step) as preempted, contextlib.ExitStack() as logs:
    for member in members:
      logs.enter_context(contextlib.closing(member.log))
    try:
      if preempted(start_step):  # a SIGTERM before the first step: the checkpoint stands
        return _stopped(start_step)
      for images, labels in batches:
        state, step_metrics = train_step(state, images, labels)
        step, interval_steps = step + 1, interval_steps + 1
        step_losses.append(step_metrics['loss'])
        if progress is not None:
          progress.update(1)
        log_now, eval_now = cadence.log(step), cadence.evaluate(step)
        stop_now = cadence.stop(step, preempted(step))
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
          check_finite(losses, step, member.manager, member.workdir)
          if eval_now or stop_now:
            check_params(member_state(state, k), step, member.manager, member.workdir)
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
          return _stopped(step)
    finally:
      if progress is not None:
        progress.close()
  return None


def _stopped(step: int) -> Dict[str, Any]:
  print(f'Stopped at step {step}; run the same command again to resume.')
  return {'stopped_at_step': step}


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
