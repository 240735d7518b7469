"""Several seeds in one compiled program: the train step over a leading seed axis.

``medjax train --config X --workdir DIR --seeds 0,1,2`` (``train.seeds``) builds one
experiment per seed (its own initialisation, data order, augmentation and dropout keys),
stacks their train states along a leading axis and trains them with one jit-compiled,
donated step over that axis (``train.seeds_program``: ``vmap`` of the single-run step, or
the single-run step ``unroll``-ed once per seed; ``auto`` picks by backend), data-parallel
over the devices as a single run is (batches ``[N, B, ...]`` split along ``B``). Each seed
keeps its own workdir, ``DIR/seed_<K>/``, a complete single-run workdir (``evaluate``,
``report``, ``compare`` read it; its ``config.json`` repeats that seed alone), logged,
evaluated and checkpointed by the one training loop (``medjax.train``, which builds the
group from this module). ``DIR`` itself holds the group's ``config.json``,
``config_history.jsonl``, ``summary.json`` (each headline metric's mean ± sample sd over the
seeds, and per seed) and, for classification, the seed ensemble's metrics and
``predictions_ensemble_<split>.npz`` (the mean of the seeds' probabilities).

Resume: every seed resumes from the newest step at which all seeds have an intact
checkpoint (a kill between two seeds' saves leaves one seed ahead; its newer checkpoint is
dropped and recomputed, identically).
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any, Dict, List, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from medjax import workdir as workdir_lib
from medjax.experiments.state import global_batch
from medjax.metrics import mean_sd


def member_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """The single-run config of one seed of a group."""
  member = copy.deepcopy(config)
  member.seed = int(seed)
  member.train.seeds = ()
  return member


def seed_workdir(workdir: str, seed: int) -> str:
  return os.path.join(workdir, f'seed_{seed}')


def check_seeds(config: ml_collections.ConfigDict) -> List[int]:
  seeds = [int(s) for s in config.train.seeds]
  if len(set(seeds)) != len(seeds):
    raise ValueError(f'train.seeds {seeds} names a seed twice')
  return seeds


PROGRAMS = ('auto', 'vmap', 'unroll')


def resolve_program(program: str) -> str:
  """'auto': 'vmap' on GPU/TPU, where one wide program fills the device; 'unroll' on CPU,
  where one seed already fills the cores and a convolution whose weights carry a seed axis
  (vmap) runs 3x slower than the seeds' convolutions side by side (measured:
  benchmarks/seeds_throughput.py; ``lax.map`` over the seeds was slower still)."""
  if program not in PROGRAMS:
    raise ValueError(f"train.seeds_program must be one of {', '.join(PROGRAMS)}, got "
                     f"'{program}'")
  if program == 'auto':
    return 'unroll' if jax.default_backend() == 'cpu' else 'vmap'
  return program


def member_state(state: Any, k: int) -> Any:
  """Seed ``k``'s slice of a pytree stacked on the seed axis."""
  return jax.tree.map(lambda x: x[k], state)


def stack_trees(trees: Sequence[Any]) -> Any:
  """Pytrees of one structure -> one pytree stacked on a new leading (seed) axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unrolled(step, n: int, states, images, labels):
  """The single-run step once per seed, unrolled in the program (independent copies that
  the compiler may schedule side by side), outputs stacked on the seed axis."""
  return stack_trees([step(member_state(states, k), images[k], member_state(labels, k))
                      for k in range(n)])


class Group:
  """The members' shared program: stacked init, the step over the seed axis (``vmap``, or
  ``unroll``: the single-run step once per seed inside the one program), stacked batches."""

  def __init__(self, members, program: str = 'auto'):
    self.members = members
    exp = members[0].exp
    self.exp = exp
    self.program = resolve_program(program)
    self.batch_sharding = NamedSharding(exp.mesh, P(None, 'data'))
    if self.program == 'vmap':
      step = jax.vmap(exp.step_fn)
    else:
      step = functools.partial(_unrolled, exp.step_fn, len(members))
    self._step = jax.jit(step,
                         in_shardings=(exp.replicated, self.batch_sharding,
                                       self.batch_sharding),
                         out_shardings=(exp.replicated, exp.replicated), donate_argnums=0)
    self._stack = jax.jit(stack_trees, out_shardings=exp.replicated)

  def init(self) -> Any:
    """The members' fresh states (each its own seed, and its warm start with
    ``train.init_from``: :meth:`Experiment.init_state`), stacked on the seed axis."""
    return self.stack([m.exp.init_state() for m in self.members])

  def stack(self, states: Sequence[Any]) -> Any:
    return self._stack(list(states))

  def train_step(self, state, images: np.ndarray, labels: Any):
    """One step of every member: ``images`` ``[N, B, ...]``, ``labels`` a pytree of
    ``[N, B, ...]`` arrays (this process's rows)."""
    return self._step(state, global_batch(self.batch_sharding, images),
                      global_batch(self.batch_sharding, labels))

  def batches(self, start_step: int):
    """The members' batches stacked on the seed axis (targets of any pytree structure)."""
    iterators = [m.exp.train_iterator(start_step) for m in self.members]
    for pairs in zip(*iterators):
      yield jax.tree.map(lambda *xs: np.stack(xs), *pairs)


def summarize(exp, seeds: Sequence[int], results: Sequence[Dict], workdirs: Sequence[str],
              workdir: str) -> Dict[str, Any]:
  """Mean ± sample sd over seeds of each split's headline metrics, the per-seed values and
  (where the task can average its predictions) the seed ensemble's metrics."""
  summary: Dict[str, Any] = {'seeds': list(seeds), 'task': results[0]['task'],
                             'dataset': results[0]['dataset'],
                             'headline_metrics': results[0]['headline_metrics'],
                             'splits': {}, 'ensemble': {}}
  for split in exp.eval_splits:
    entry = {}
    for key in results[0]['headline_metrics']:
      values = [r[split].get(key, float('nan')) for r in results]
      mean, sd = mean_sd(values)
      entry[key] = {'mean': mean, 'sd': sd, 'per_seed': values}
    summary['splits'][split] = entry
    ensemble = exp.ensemble(workdirs, split) if workdir_lib.is_main() else None
    if ensemble is not None:
      metrics, predictions = ensemble
      summary['ensemble'][split] = {k: v for k, v in metrics.items()
                                    if k in results[0]['headline_metrics']}
      exp.save_predictions(workdir, f'ensemble_{split}', predictions)
  return summary


def format_summary(summary: Dict[str, Any]) -> str:
  keys = summary['headline_metrics']
  width = max(16, *(len(k) + 2 for k in keys))
  lines = [f"\n{len(summary['seeds'])} seeds ({', '.join(map(str, summary['seeds']))}): "
           'mean ± sd; ensemble = mean of the seeds\' probabilities',
           f"{'split':<16}" + ''.join(f'{k:>{width}}' for k in keys)]
  for split, entry in summary['splits'].items():
    lines.append(f'{split:<16}' + ''.join(
        f"{entry[k]['mean']:.4f} ± {entry[k]['sd']:.4f}".rjust(width) for k in keys))
    if split in summary['ensemble']:
      lines.append(f'{split + " ensemble":<16}' + ''.join(
          f"{summary['ensemble'][split].get(k, float('nan')):>{width}.4f}" for k in keys))
  return '\n'.join(lines)
