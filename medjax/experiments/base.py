"""What every task shares: the train state, the mesh, the model, the optimizer and the one
jit-compiled, data-parallel train step; and the interface a task implements.

Parallelism: one mesh axis ``'data'`` over all devices (of all processes). Batches are split
along it; parameters, batch statistics and optimizer state are replicated. The same code
runs on 1 CPU, 8 simulated devices, a GPU or a multi-host TPU slice.

A task is a subclass of :class:`Experiment` that, in its constructor, loads its data and
calls :meth:`Experiment.setup` with its model's output count, input shape and epoch length,
and implements:

==========================  ===============================================================
``loss(outputs, labels)``   the scalar training loss of a batch (pure, traced inside the
                            jit-compiled train step)
``train_inputs(...)``       optional: model inputs and loss targets derived from a batch
                            inside the step (e.g. a mean teacher's predictions)
``init_loss_state()``       optional: statistics the loss carries from step to step (a
``loss_with_state(...)``    pytree in ``TrainState.loss_state``, checkpointed with it; e.g.
                            FreeMatch's confidence averages) and the loss that reads and
                            updates them
``optimizer()``             optional: wraps the configured optimizer
``train_iterator(start)``   ``(images, labels)`` numpy batches of this process from step
                            ``start`` on, deterministic from the seed
``evaluate(state, split)``  ``(metrics dict, predictions)`` of a split
``save_predictions(...)``   writes a split's predictions into the workdir
``run_files()``             ``{file name: JSON content}`` describing the data
                            (``data_fingerprint.json``, ...); a resumed run must match them
``describe()``              one line about the data, printed when training starts
``eval_splits``             splits scored into ``results.json`` (class attribute)
``available_splits``        splits ``medjax evaluate`` accepts
``headline_metrics(m)``     the keys of a split's metrics the CLI and reports show
``ensemble(workdirs, s)``   optional: metrics and predictions of several runs' mean
                            prediction on split ``s`` (the seed ensemble of ``train.seeds``)
``dataset_name``            the name ``results.json`` records
``scores_task``             optional: the classification task its predictions' scores
                            follow when it is not ``task`` (plots, reports)
``class_names``             one name per class (or label)
==========================  ===============================================================

and registers itself with :func:`medjax.experiments.register_task`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medjax import checkpoint, optim, workdir as workdir_lib
from medjax.models import build_model, summary as model_summary_lib


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


# config.task -> the experiment class (or any callable config -> Experiment); filled by
# medjax.experiments (the built-in tasks) and register_task.
TASKS: Dict[str, Callable[[ml_collections.ConfigDict], 'Experiment']] = {}


def register_task(name: str, experiment: Callable[[ml_collections.ConfigDict], 'Experiment']
                  ) -> None:
  """Makes ``config.task = name`` build ``experiment(config)``."""
  if name in TASKS and TASKS[name] is not experiment:
    raise ValueError(f"task '{name}' is already registered ({TASKS[name].__name__})")
  TASKS[name] = experiment


def make_experiment(config: ml_collections.ConfigDict) -> 'Experiment':
  """The experiment for ``config.task`` (config already resolved)."""
  if config.task not in TASKS:
    raise ValueError(f"unknown task '{config.task}'; expected one of {', '.join(TASKS)}")
  return TASKS[config.task](config)


class TrainingDiverged(FloatingPointError):
  """The loss became NaN or infinite."""


class Experiment:
  """A config bound to its data, model, optimizer, mesh and compiled train step."""

  task: str = ''                                # set by the task (or its constructor)
  eval_splits: Tuple[str, ...] = ('val', 'test')
  available_splits: Tuple[str, ...] = ('train', 'val', 'test')
  dataset_name: str = ''
  class_names: Sequence[str] = ()
  scores_task: str = ''

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def setup(self, num_outputs: int, input_shape: Sequence[int], steps_per_epoch: int) -> None:
    """Builds the model, optimizer, schedule, mesh and the compiled train step."""
    config = self.config
    self.num_outputs = num_outputs
    self.input_shape = tuple(input_shape)
    model_kwargs = {k: v for k, v in config.model.to_dict().items() if k != 'name'}
    model_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_kwargs.items()}
    try:
      self.model = build_model(config.model.name, num_outputs, **model_kwargs)
    except ValueError as e:
      raise ValueError(f'{e} (model options come from the config section model.*; after '
                       'changing model.name, set that section for the new model)') from None
    self.global_batch = config.train.batch_size
    self.steps_per_epoch = steps_per_epoch
    self.total_steps = config.train.num_epochs * self.steps_per_epoch
    self.schedule = optim.make_schedule(config.optimizer, self.steps_per_epoch,
                                        self.total_steps)
    self.tx = self.optimizer()

    devices = np.array(jax.devices())
    for name, batch in (('train.batch_size', self.global_batch),
                        ('train.eval_batch_size', config.train.eval_batch_size)):
      if batch % devices.size:
        raise ValueError(f'{name}={batch} is not divisible by the {devices.size} devices')
    self.mesh = Mesh(devices, ('data',))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P('data'))
    self._train_step = jax.jit(self._train_step_impl,
                               in_shardings=(self.replicated, self.batch_sharding,
                                             self.batch_sharding),
                               out_shardings=(self.replicated, self.replicated),
                               donate_argnums=0)

  # ----- the interface a task implements -----------------------------------------------
  def loss(self, outputs, labels) -> jax.Array:
    """Scalar training loss of a batch of model outputs and labels."""
    raise NotImplementedError

  def train_iterator(self, start_step: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    raise NotImplementedError

  def evaluate(self, state: TrainState, split: str) -> Tuple[Dict[str, Any], Any]:
    raise NotImplementedError

  def save_predictions(self, workdir: str, split: str, predictions) -> None:
    raise NotImplementedError

  def run_files(self) -> Dict[str, Any]:
    raise NotImplementedError

  def describe(self) -> str:
    raise NotImplementedError

  def optimizer(self) -> optax.GradientTransformation:
    """The optimizer of ``config.optimizer``, keeping the parameters' moving average in its
    state when ``optimizer.ema_decay > 0`` (a task may wrap it further)."""
    tx = optim.make_optimizer(self.config.optimizer, self.schedule)
    if self.config.optimizer.ema_decay:
      tx = optim.with_parameter_ema(tx, self.config.optimizer.ema_decay)
    return tx

  def init_loss_state(self) -> Any:
    """The initial statistics a stateful loss carries from step to step (a pytree of
    arrays; default ``{}``: the loss is a function of the batch alone)."""
    return {}

  def loss_with_state(self, outputs, labels, loss_state) -> Tuple[jax.Array, Any]:
    """(scalar loss, updated ``loss_state``) of a batch; a task whose loss keeps running
    statistics overrides this (and :meth:`init_loss_state`). The updated statistics are
    not differentiated. Default: :meth:`loss`, the state passed through."""
    return self.loss(outputs, labels), loss_state

  def train_inputs(self, state: TrainState, images, labels, key: jax.Array):
    """What the model trains on and what ``loss`` compares it with, from a batch, inside
    the compiled step and outside the gradient (a task may derive targets from the state,
    e.g. a teacher's predictions). Default: the batch as it is."""
    return images, labels

  def headline_metrics(self, metrics: Dict[str, Any]) -> list:
    """The keys of a split's ``metrics`` that the CLI, ``results.json`` and the reports
    show (default: every scalar, sorted)."""
    return sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))

  # ----- state -------------------------------------------------------------------------
  def _init_impl(self, key: jax.Array) -> TrainState:
    init_key, dropout_key = jax.random.split(key)
    dummy = jnp.zeros((1,) + self.input_shape, jnp.float32)
    variables = self.model.init({'params': init_key}, dummy, train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=self.tx.init(params), dropout_key=dropout_key,
                      loss_state=self.init_loss_state())

  def init_state(self) -> TrainState:
    """Fresh state, created directly on the replicated sharding (no host copy to alias);
    with ``train.init_from``, its model variables are the source run's."""
    key = jax.random.PRNGKey(self.config.seed)
    state = jax.jit(self._init_impl, out_shardings=self.replicated)(key)
    start = self.warm_start_variables()
    if start is None:
      return state
    return jax.jit(self._warm_start_impl, out_shardings=self.replicated)(state, start)

  def _warm_start_impl(self, state: TrainState, start: Dict[str, Any]) -> TrainState:
    """``state`` with the model variables named in ``start`` (``{path name: array}``, see
    :func:`named_leaves`; the others keep their fresh values) and a fresh optimizer state."""
    def pick(path, ours):
      name = path_name(path)
      return start[name].astype(ours.dtype) if name in start else ours
    model = jax.tree_util.tree_map_with_path(
        pick, {'params': state.params, 'batch_stats': state.batch_stats})
    return state.replace(params=model['params'], batch_stats=model['batch_stats'],
                         opt_state=self.tx.init(model['params']))

  def warm_start_variables(self) -> Optional[Dict[str, Any]]:
    """``{path name: array}`` of the model variables that start a fresh run with
    ``train.init_from`` (that run's selected checkpoint, its parameter average if it kept
    one; seed K of a seed group starts from the group's ``seed_<K>``), checked against this
    model's variable names and shapes; those matching a ``train.init_from_skip`` pattern
    (e.g. a new head) are left out and start fresh. None without ``train.init_from``."""
    if not self.config.train.init_from:
      return None
    other, state, step, workdir = self.load_run(self.config.train.init_from, 'train.init_from')
    variables = other.variables(state)
    skip = [re.compile(p) for p in self.config.train.init_from_skip]
    kept = lambda tree: {k: v for k, v in named_leaves(tree).items()  # noqa: E731
                         if not any(p.search(k) for p in skip)}
    theirs = kept({'params': variables['params'],
                   'batch_stats': variables.get('batch_stats', {})})
    shapes = jax.eval_shape(self._init_impl, jax.random.PRNGKey(0))
    names = named_leaves({'params': shapes.params, 'batch_stats': shapes.batch_stats})
    for pattern in skip:
      if not any(pattern.search(name) for name in names):
        raise ValueError(f"train.init_from_skip '{pattern.pattern}' matches no variable of "
                         f"this model (names look like '{next(iter(names))}')")
    ours = kept({'params': shapes.params, 'batch_stats': shapes.batch_stats})
    difference = tree_difference(ours, theirs)
    if difference:
      raise ValueError(f'train.init_from {workdir}: its model does not fit this one: '
                       f'{difference} (train.init_from_skip=<regex> starts the variables '
                       'it matches fresh, e.g. a new head)')
    skipped = len(names) - len(ours)
    print(f'Starting from the model of {os.path.abspath(workdir)} (step {step})'
          + (f'; {skipped} variables start fresh (train.init_from_skip)' if skipped else ''))
    return jax.device_get(theirs)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state (what a checkpoint is restored into)."""
    shapes = jax.eval_shape(self._init_impl, jax.random.PRNGKey(0))
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), shapes)

  def restore(self, workdir: str, step: Optional[int] = None) -> Tuple[TrainState, int]:
    """(state, step) of ``workdir``'s selected (best) checkpoint, or of ``step``; the
    workdir must have been trained with this experiment's config."""
    cfg = self.config.train
    manager = checkpoint.make_manager(workdir, cfg.keep_checkpoints, cfg.selection_metric,
                                      cfg.selection_mode)
    selected = workdir_lib.selected_step(manager, workdir, step)
    state, _ = checkpoint.restore(manager, selected, self.abstract_state())
    return state, int(selected)

  def load_run(self, path: str, key: str) -> Tuple['Experiment', TrainState, int, str]:
    """(experiment, state, selected step, workdir) of another run of this task: ``path``, or
    its ``seed_<seed>`` for this run's seed when ``path`` is a seed group, rebuilt from its
    own config.json and restored at its selected checkpoint (a teacher, a fine-tuning
    source; of its own task, e.g. a contrastive pretraining run). ``key`` is the config key
    that named it, for the error."""
    workdir = workdir_lib.seed_member(path, self.config.seed)
    if not os.path.isfile(os.path.join(workdir, 'config.json')):
      raise ValueError(f'{key} {workdir}: no run there (config.json missing)')
    other = make_experiment(workdir_lib.read_single_run_config(workdir))
    state, step = other.restore(workdir)
    return other, state, step, workdir

  def variables(self, state: TrainState) -> Dict[str, Any]:
    """The variables of the model a state stands for, for ``model.apply`` in evaluation,
    prediction and explanations: the parameters' moving average when
    ``optimizer.ema_decay > 0`` (with the running batch statistics), else the parameters."""
    params = state.opt_state.ema if self.config.optimizer.ema_decay else state.params
    return self.apply_variables(params, state.batch_stats)

  @staticmethod
  def apply_variables(params, batch_stats) -> Dict[str, Any]:
    """``model.apply``'s variables from parameters and batch statistics (none: omitted)."""
    variables = {'params': params}
    if jax.tree.leaves(batch_stats):
      variables['batch_stats'] = batch_stats
    return variables

  def model_summary(self, state: TrainState) -> Dict[str, Any]:
    """Parameters, FLOPs per example and the layer table (:mod:`medjax.models.summary`)."""
    summary = model_summary_lib.model_summary(self.model, self.variables(state),
                                              self.input_shape)
    summary['name'] = self.config.model.name
    return summary

  # ----- the train step ----------------------------------------------------------------
  def _train_step_impl(self, state: TrainState, images, labels):
    dropout_key = jax.random.fold_in(state.dropout_key, state.step)
    images, labels = self.train_inputs(state, images, labels,
                                       jax.random.fold_in(dropout_key, 1))

    def loss_fn(params):
      variables = self.apply_variables(params, state.batch_stats)
      has_bn = 'batch_stats' in variables
      outputs, updates = self.model.apply(
          variables, images, train=True, rngs={'dropout': dropout_key},
          mutable=['batch_stats'] if has_bn else [])
      loss, loss_state = self.loss_with_state(outputs, labels, state.loss_state)
      return loss, (updates, jax.lax.stop_gradient(loss_state))

    (loss, (updates, loss_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    param_updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=updates.get('batch_stats', state.batch_stats),
                              opt_state=opt_state, loss_state=loss_state)
    return new_state, {'loss': loss, 'grad_norm': optax.global_norm(grads)}

  def global_array(self, local: np.ndarray) -> jax.Array:
    """This process's rows of a batch -> the global batch array, split over ``'data'``."""
    return jax.make_array_from_process_local_data(self.batch_sharding, local)

  def train_step(self, state: TrainState, images: np.ndarray, labels: np.ndarray):
    """One optimizer step on a batch (this process's rows); returns (state, metrics)."""
    return self._train_step(state, self.global_array(images), self.global_array(labels))
