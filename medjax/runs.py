"""One run's bookkeeping in the training loop: its workdir, checkpoints and log
(:class:`Member`), when to log, evaluate and stop (:class:`Cadence`), the checks that stop a
diverged run, SIGTERM (every process of a multi-host run stops at the same step), and the
start of training (fresh, or resumed from the newest step every member has intact). The
loop itself is :mod:`medjax.train`.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any, Callable, Dict, Iterator, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from medjax import checkpoint, output, workdir as workdir_lib
from medjax.experiments import Experiment, TrainingDiverged
from medjax.models import summary as model_summary_lib


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
      output.warn(f'train loss {loss:.4g} at step {step} is over {self.factor:g}x its first '
                  f'logged value {self.first:.4g}; the learning rate may be too high')


@contextlib.contextmanager
def preemption(start_step: int) -> Iterator[Callable[[int], bool]]:
  """``preempted(step)``: whether a SIGTERM asks the loop to save at ``step`` and exit.
  Call it once per step, in order, from ``start_step`` on (``preempted(start_step)``: the
  signal came before the first step, so the checkpoint at ``start_step`` stands).

  One process: SIGTERM sets a flag, read at the next step. Several processes: every process
  must stop at the same step; see :func:`_agreed_preemption`."""
  if jax.process_count() > 1:
    yield _agreed_preemption(start_step)
    return
  flag = {'requested': False}
  previous = None
  if hasattr(signal, 'SIGTERM'):
    try:
      previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.update(requested=True))
    except ValueError:  # not the main thread
      previous = None
  try:
    yield lambda step: flag['requested']
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def _agreed_preemption(start_step: int) -> Callable[[int], bool]:
  """JAX's preemption service (started by ``jax.distributed.initialize``) catches SIGTERM in
  whichever process gets it and tells the coordinator; in the background every process then
  agrees on one step past the furthest step any of them had reached
  (``multihost_utils.reached_preemption_sync_point``: a local check each step, no sync).
  Orbax's saves report the same absolute steps to it. No Python SIGTERM handler here: it
  would replace the service's."""
  reached = multihost_utils.reached_preemption_sync_point
  try:
    # Each process's count is 0 until its first call: a SIGTERM since jax.distributed started
    # (the restore, say) put the sync point at 1, which a resumed run would never count to.
    # (A notice inside the microseconds between these two calls on every process would set
    # it at 2: that run trains on until killed, as it would without this check.)
    before_start = start_step > 1 and reached(1)
    before_start = reached(start_step) or before_start  # last: the count is start_step
  except RuntimeError:  # jax_enable_preemption_service is off
    output.warn('the JAX preemption service is off (jax_enable_preemption_service): a SIGTERM '
                'ends this multi-host run without a checkpoint')
    return lambda step: False
  return lambda step: before_start if step == start_step else reached(step)


def diverged(what: str, manager, workdir: str) -> TrainingDiverged:
  latest = manager.latest_step()
  where = (f'The last good checkpoint is step {latest} in {os.path.join(workdir, "checkpoints")}'
           if latest is not None else 'No checkpoint was saved')
  return TrainingDiverged(f'{what}; stopping. {where} (lower optimizer.learning_rate or set '
                          'optimizer.grad_clip_norm).')


def check_finite(losses: np.ndarray, step: int, manager, workdir: str) -> None:
  if not np.all(np.isfinite(losses)):
    raise diverged(f'loss became NaN or infinite at or before step {step}', manager, workdir)


@jax.jit
def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def check_params(state, step: int, manager, workdir: str) -> None:
  """Before evaluating and saving: the last update can break the parameters while every
  loss so far was finite; such a state is never evaluated or saved."""
  if not bool(all_finite(state.params)):
    raise diverged(f'parameters became NaN or infinite at step {step} (not saved)', manager,
                    workdir)


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




def start(members: Sequence[Member], init: Callable[[], Any],
          combine: Callable[[list], Any]) -> Tuple[Any, int, bool]:
  """(state, start step, fresh) of members trained as one program: their states at the newest
  step every member has intact (``combine``: the members' states as the program's, e.g.
  stacked on the seed axis), or ``init()`` when a member has none. A member ahead of the
  others (a kill between two members' saves) goes back to the common step; its newer
  checkpoints are dropped and recomputed, identically. Sets each member's unlogged losses."""
  found = [checkpoint.restore_latest_intact(m.manager, m.exp.abstract_state())
           for m in members]
  common = min((f[0] if f is not None else 0) for f in found)
  if common == 0:
    for member in members:  # a kill inside the first round of saves: start over
      for step in member.manager.all_steps():
        member.manager.delete(step)
      member.pending = []
    return init(), 0, True
  states = []
  for member, (step, state, meta) in zip(members, found):
    if step != common:
      state, meta = checkpoint.restore(member.manager, common, member.exp.abstract_state())
      for newer in [s for s in member.manager.all_steps() if s > common]:
        member.manager.delete(newer)
    # Unlogged losses travel in the checkpoint, so a resumed run logs what an uninterrupted
    # run would.
    member.pending = list(meta.get('pending_train_losses', []))
    states.append(state)
  return combine(states), common, False
