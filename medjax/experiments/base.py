"""What every task shares: the mesh, the model, the optimizer and the one jit-compiled,
data-parallel train step; and the interface a task implements.

Parallelism: one mesh axis ``'data'`` over all devices (of all processes). Batches are split
along it; parameters, batch statistics and optimizer state are replicated. The same code
runs on 1 CPU, 8 simulated devices, a GPU or a multi-host TPU slice. Targets (``labels``)
may be any pytree of arrays with the batch axis first (e.g. ``{'boxes': [B, M, 2d],
'classes': [B, M], 'valid': [B, M]}``).

A task is a subclass of :class:`Experiment` that, in its constructor, loads its data and
calls :meth:`Experiment.setup` with its model's output count, input shape and epoch length,
implements these, and registers itself with :func:`medjax.experiments.register_task`:

==========================  ===============================================================
``loss(outputs, labels)``   the scalar training loss of a batch (traced in the train step)
``train_iterator(start)``   ``(images, labels)`` numpy batches of this process from step
                            ``start`` on, deterministic from the seed
``evaluate(state, split)``  ``(metrics dict, predictions)`` of a split
``save_predictions(...)``   writes a split's predictions into the workdir
``run_files()``             ``{file name: JSON content}`` describing the data
                            (``data_fingerprint.json``, ...); a resumed run must match them
``describe()``              one line about the data, printed when training starts
``eval_splits``             splits scored into ``results.json`` (class attribute), and
``available_splits``        the splits ``medjax evaluate`` accepts
``dataset_name``,           what ``results.json`` records
``class_names``
==========================  ===============================================================

Optional hooks, each with a default (see its docstring): in the step, ``train_inputs``,
``init_loss_state`` / ``loss_with_state`` (statistics carried between steps),
``optimizer``, or a semi-supervised ``method`` (:mod:`medjax.semi`); for the CLI and
reports, ``headline_metrics``, ``ensemble`` (the seed ensemble), ``score_ensemble``,
``evaluation_options`` / ``set_evaluation_options`` (test-time mirroring), ``predict_files``,
``explain_files``, ``input_suffixes``, and the classmethods ``run_figures``,
``report_tables`` and ``run_labels``, which read a workdir's files alone. Generic code asks
these and never branches on a task's name.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medjax import checkpoint, config as config_lib, optim, precision, workdir as workdir_lib
from medjax.experiments import step as step_lib
from medjax.experiments.registry import make_experiment
from medjax.experiments.state import (TrainState, global_batch, path_name,
                                      warm_start_selection)
from medjax.models import build_model, summary as model_summary_lib


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  c.seed = 0
  # A registered task (medjax/experiments/__init__.py): 'auto' takes the classification task
  # from the dataset; or 'binary', 'multiclass', 'ordinal', 'multilabel', 'segmentation',
  # 'contrastive', ...
  c.task = 'auto'
  config_lib.section(c, 'model').name = 'simple_cnn'
  # Each task declares its own loss names and keys beside its code.
  config_lib.section(c, 'loss').name = 'ce'
  t = config_lib.section(c, 'train')
  t.num_epochs = 10
  t.batch_size = 128            # global batch, split over all devices
  t.eval_batch_size = 256
  t.log_every_steps = 20
  t.eval_every_epochs = 1
  # Steps per epoch; 0 = one pass over the training data (segmentation samples patches, so
  # an epoch is a number of steps, 250 in nnU-Net).
  t.steps_per_epoch = 0
  t.keep_checkpoints = 2        # latest N kept, plus the best by selection_metric
  t.selection_metric = 'auc'    # validation metric that picks the final checkpoint
  t.selection_mode = 'max'      # 'max' | 'min' | 'last' (last checkpoint, no selection)
  t.progress_bar = True
  # Several seeds trained together in one compiled program, one workdir each under
  # DIR/seed_<K>; () = one run with `seed` (medjax.seeds).
  t.seeds = ()
  t.seeds_program = 'auto'      # 'vmap' | 'unroll' over the seed axis; auto: unroll on CPU
  # Stop after this many steps in this invocation (0 = no limit). For tests of resume.
  t.stop_after_steps = 0
  # Fine-tuning: a workdir (or a seed group: its seed_<K> for seed K) whose selected model
  # (its parameter average if it kept one) starts this run; optimizer and step start fresh.
  t.init_from = ''
  # Regexes of variable paths ('params/Dense_1/kernel') that init_from leaves at their fresh
  # values: a new head, e.g. ('Dense_1',) after contrastive pretraining.
  t.init_from_skip = ()


class Experiment:
  """A config bound to its data, model, optimizer, mesh and compiled train step."""

  task: str = ''                                # set by the task (or its constructor)
  eval_splits: Tuple[str, ...] = ('val', 'test')
  available_splits: Tuple[str, ...] = ('train', 'val', 'test')
  dataset_name: str = ''
  class_names: Sequence[str] = ()
  scores_task: str = ''
  # The semi-supervised method (medjax.semi) of a task that trains with unlabelled data;
  # None: the task's own loss and batches.
  method: Any = None

  def __init__(self, config: ml_collections.ConfigDict, training: bool = True):
    self.config = config

  def setup(self, num_outputs: int, input_shape: Sequence[int], steps_per_epoch: int) -> None:
    """Builds the model, optimizer, schedule, mesh and the compiled train step."""
    config = self.config
    self.num_outputs = num_outputs
    self.input_shape = tuple(input_shape)
    model_kwargs = {k: v for k, v in config.model.to_dict().items() if k != 'name'}
    model_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_kwargs.items()}
    try:
      self.model = build_model(config.model.name, num_outputs, **model_kwargs,
                               **precision.model_dtype(config.train.precision))
    except ValueError as e:
      if "'dtype'" in str(e):
        raise ValueError(f'train.precision={config.train.precision} needs a compute dtype, '
                         f"and model '{config.model.name}' has no dtype field") from None
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
    step_lib.check_accumulation(config, devices.size)
    self.mesh = Mesh(devices, ('data',))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P('data'))
    self._train_step = jax.jit(self.step_fn,
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
    return tx if self.method is None else self.method.optimizer(tx)

  def init_loss_state(self) -> Any:
    """The initial statistics a stateful loss carries from step to step (a pytree of
    arrays; default ``{}``, or the semi-supervised method's)."""
    return {} if self.method is None else self.method.init_loss_state()

  def loss_with_state(self, outputs, labels, loss_state) -> Tuple[jax.Array, Any]:
    """(scalar loss, updated ``loss_state``) of a batch; a task whose loss keeps running
    statistics overrides this (and :meth:`init_loss_state`). The updated statistics are
    not differentiated. Default: the semi-supervised method's loss, else :meth:`loss` with
    the state passed through."""
    if self.method is not None:
      return self.method.loss(outputs, labels, loss_state)
    return self.loss(outputs, labels), loss_state

  def train_inputs(self, state: TrainState, images, labels, key: jax.Array):
    """What the model trains on and what ``loss`` compares it with, from a batch, inside
    the compiled step and outside the gradient (a task may derive targets from the state,
    e.g. a teacher's predictions). Default: the semi-supervised method's, else the batch."""
    if self.method is not None:
      return self.method.train_inputs(state, images, labels, key)
    return images, labels

  def headline_metrics(self, metrics: Dict[str, Any]) -> list:
    """The keys of a split's ``metrics`` that the CLI, ``results.json`` and the reports
    show (default: every scalar, sorted)."""
    return sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))

  # ----- what generic code asks of a task (CLI, reports, plots, evaluation) --------------
  def ensemble(self, workdirs: Sequence[str], split: str) -> Optional[Tuple[Dict, Any]]:
    """Metrics and predictions of several runs' mean prediction on ``split`` (the seed
    ensemble of ``train.seeds``), or None when the task does not average runs."""
    return None

  def score_ensemble(self, members: Sequence[Tuple['Experiment', 'TrainState']], split: str
                     ) -> Tuple[Dict, Any]:
    """``medjax evaluate --workdir A --workdir B``: metrics and predictions of several
    trained models' mean prediction on ``split`` of this run's data."""
    raise ValueError(f'an ensemble of {self.task} workdirs is not scored here (train.seeds '
                     'writes a seed ensemble)')

  def evaluation_options(self) -> Dict[str, Any]:
    """The run's own evaluation settings (e.g. test-time mirroring); an evaluation with
    others is written beside the run's own, never over it."""
    return {}

  def set_evaluation_options(self, mirror_axes: Optional[Sequence[int]] = None) -> None:
    """Evaluation settings for this evaluation only (``medjax evaluate --mirror_axes``)."""
    if mirror_axes is not None:
      raise ValueError(f'mirror_axes: {self.task} models have no test-time mirroring')

  def predict_files(self, members: Sequence[Tuple['Experiment', 'TrainState']],
                    input_path: str, output_dir: str) -> list:
    """``medjax predict``: the mean prediction of ``members`` (this run first) for each file
    of ``input_path`` written to ``output_dir``; returns the paths written."""
    raise ValueError(f'{self.task} models do not predict files (medjax predict writes '
                     'segmentations)')

  def explain_files(self, state: 'TrainState', files: Sequence[str], output_dir: str,
                    **options) -> list:
    """``medjax explain``: attribution maps of the model for each file; one record each."""
    raise ValueError(f'{self.task} models have no explanations')

  def input_suffixes(self) -> Tuple[str, ...]:
    """The file suffixes ``predict`` and ``explain`` read from a folder."""
    return ()

  @classmethod
  def run_figures(cls, workdir: str, config: Dict, results: Dict, out_dir: str,
                  splits: Sequence[str]) -> Dict[str, str]:
    """The task's figures of a workdir from its files alone (``{name: png path}``), beside
    the learning curves every run gets."""
    return {}

  @classmethod
  def report_tables(cls, results: Dict) -> Optional[list]:
    """The task's result tables for ``medjax report`` as ``[(caption, value, rows)]``; None:
    the headline metrics of each split."""
    return None

  @classmethod
  def run_labels(cls, config: Dict) -> Dict[str, Any]:
    """What tells runs of one study apart besides the seed (e.g. ``{'fold': 0}``)."""
    return {}

  # ----- state -------------------------------------------------------------------------
  def init_fn(self, key: jax.Array) -> TrainState:
    init_key, dropout_key = jax.random.split(key)
    dummy = jnp.zeros((1,) + self.input_shape, jnp.float32)
    variables = self.model.init({'params': init_key}, dummy, train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=self.tx.init(params), dropout_key=dropout_key,
                      loss_state=self.init_loss_state(),
                      loss_scale=precision.init_loss_scale(self.config.train))

  def init_state(self) -> TrainState:
    """Fresh state, created directly on the replicated sharding (no host copy to alias);
    with ``train.init_from``, its model variables are the source run's."""
    key = jax.random.PRNGKey(self.config.seed)
    state = jax.jit(self.init_fn, out_shardings=self.replicated)(key)
    start = self.warm_start_variables()
    if start is None:
      return state
    return jax.jit(self.warm_start_fn, out_shardings=self.replicated)(state, start)

  def warm_start_fn(self, state: TrainState, start: Dict[str, Any]) -> TrainState:
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
    shapes = jax.eval_shape(self.init_fn, jax.random.PRNGKey(0))
    try:
      theirs, skipped = warm_start_selection(
          {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})},
          {'params': shapes.params, 'batch_stats': shapes.batch_stats},
          self.config.train.init_from_skip)
    except ValueError as e:
      raise ValueError(f'train.init_from {workdir}: {e}') from None
    print(f'Starting from the model of {os.path.abspath(workdir)} (step {step})'
          + (f'; {skipped} variables start fresh (train.init_from_skip)' if skipped else ''))
    return jax.device_get(theirs)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state (what a checkpoint is restored into)."""
    shapes = jax.eval_shape(self.init_fn, jax.random.PRNGKey(0))
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

  def softmax_outputs(self, variables: Dict[str, Any], images: jax.Array) -> jax.Array:
    """Class probabilities (float32 softmax over the last axis) of the model in evaluation
    mode: one output even with deep supervision."""
    logits = self.model.apply(variables, images, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  def model_summary(self, state: TrainState) -> Dict[str, Any]:
    """Parameters, FLOPs per example and the layer table (:mod:`medjax.models.summary`)."""
    summary = model_summary_lib.model_summary(self.model, self.variables(state),
                                              self.input_shape)
    summary['name'] = self.config.model.name
    return summary

  # ----- the train step ----------------------------------------------------------------
  def step_fn(self, state: TrainState, images, labels):
    """One update on a global batch, traced in the compiled step (:mod:`.step`)."""
    return step_lib.train_step(self, state, images, labels)

  def global_array(self, local: Any) -> Any:
    """This process's rows of a batch (an array, or any pytree of arrays with the batch
    axis first, e.g. a dict of targets) -> global arrays split over ``'data'``."""
    return global_batch(self.batch_sharding, local)

  def train_step(self, state: TrainState, images: np.ndarray, labels: Any):
    """One optimizer step on a batch (this process's rows; ``labels`` any pytree of arrays
    ``[B, ...]``); returns (state, metrics)."""
    return self._train_step(state, self.global_array(images), self.global_array(labels))
