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
from typing import Any, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from medjax import checkpoint, workdir as workdir_lib
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
  return stack_trees([step(member_state(states, k), images[k], labels[k]) for k in range(n)])


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
      step = jax.vmap(exp._train_step_impl)
    else:
      step = functools.partial(_unrolled, exp._train_step_impl, len(members))
    self._step = jax.jit(step,
                         in_shardings=(exp.replicated, self.batch_sharding,
                                       self.batch_sharding),
                         out_shardings=(exp.replicated, exp.replicated), donate_argnums=0)
    self._stack = jax.jit(stack_trees, out_shardings=exp.replicated)

  def init(self) -> Any:
    """The stacked fresh states (each member's warm start with ``train.init_from``)."""
    keys = jnp.stack([jax.random.PRNGKey(m.exp.config.seed) for m in self.members])
    state = jax.jit(jax.vmap(self.exp._init_impl), out_shardings=self.exp.replicated)(keys)
    source = self.exp.config.train.init_from
    if not source:
      return state
    loaded = {}  # a plain workdir starts every member: load it once
    starts = []
    for member in self.members:
      where = workdir_lib.seed_member(source, member.exp.config.seed)
      if where not in loaded:
        loaded[where] = member.exp.warm_start_variables()
      starts.append(loaded[where])
    return jax.jit(jax.vmap(self.exp._warm_start_impl),
                   out_shardings=self.exp.replicated)(state, stack_trees(starts))

  def stack(self, states: Sequence[Any]) -> Any:
    return self._stack(list(states))

  def train_step(self, state, images: np.ndarray, labels: np.ndarray):
    as_global = lambda a: jax.make_array_from_process_local_data(  # noqa: E731
        self.batch_sharding, a)
    return self._step(state, as_global(images), as_global(labels))

  def batches(self, start_step: int):
    iterators = [m.exp.train_iterator(start_step) for m in self.members]
    for pairs in zip(*iterators):
      yield np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def start(group: Group, on_fresh) -> Tuple[Any, int]:
  """(stacked state, start step): the newest step every member has intact, or fresh
  (``on_fresh(member, its state, k)`` then writes each member's model summary)."""
  found = [checkpoint.restore_latest_intact(m.manager, m.exp.abstract_state())
           for m in group.members]
  common = min((f[0] if f is not None else 0) for f in found)
  if common == 0:
    for member in group.members:  # a kill inside the first round of saves: start over
      for step in member.manager.all_steps():
        member.manager.delete(step)
    state = group.init()
    for k, member in enumerate(group.members):
      member.pending = []
      on_fresh(member, member_state(state, k), k)
    print(f'{len(group.members)} seeds in one program ({group.program} over the seed axis): '
          f"{', '.join(str(m.exp.config.seed) for m in group.members)}")
    return state, 0
  states = []
  for member, (step, state, meta) in zip(group.members, found):
    if step != common:  # ahead of another member: go back to the common step
      state, meta = checkpoint.restore(member.manager, common, member.exp.abstract_state())
      for newer in [s for s in member.manager.all_steps() if s > common]:
        member.manager.delete(newer)
    member.pending = list(meta.get('pending_train_losses', []))
    states.append(state)
  print(f'Resuming {len(states)} seeds from step {common} in '
        f'{os.path.dirname(group.members[0].workdir)}')
  return group.stack(states), common


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
    ensemble = getattr(exp, 'ensemble', None)
    if ensemble is not None and workdir_lib.is_main():
      metrics, predictions = ensemble(workdirs, split)
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
