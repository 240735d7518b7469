"""Training and evaluation of classifiers: one jit-compiled, data-parallel loop.

Parallelism: one mesh axis ``'data'`` over all devices (of all processes). Batches are
split along it; parameters, batch statistics and optimizer state are replicated. The same
code runs on 1 CPU, 8 simulated devices, a GPU or a multi-host TPU slice.

Workdir layout (see README): ``config.json``, ``metrics.jsonl``, ``checkpoints/``,
``results.json``, ``predictions_<split>.npz``, ``tensorboard/``.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import time
from typing import Any, Dict, Optional

import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import medjax
from medjax import checkpoint, config as config_lib, losses, metrics as metrics_lib, optim, tasks
from medjax.data import ClassificationData, load_data, pipeline
from medjax.models import build_model, summary as model_summary_lib


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree of arrays (checkpointed whole)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  dropout_key: jax.Array


class TrainingDiverged(FloatingPointError):
  """The loss became NaN or infinite."""


class Experiment:
  """A config bound to its data, model, optimizer, mesh and compiled steps."""

  def __init__(self, config: ml_collections.ConfigDict, data: ClassificationData):
    self.config = config
    self.data = data
    self.task = resolve_task(config.task, data)
    if config.train.steps_per_epoch:
      raise ValueError('train.steps_per_epoch applies to segmentation; a classification epoch '
                       'is one pass over the training split')
    train_labels = data.splits['train'][1]
    self.class_weights = losses.parse_class_weights(
        config.loss.class_weights, train_labels, data.num_classes, self.task)
    if config.loss.name not in ('ce', 'focal'):
      raise ValueError(f"unknown loss.name '{config.loss.name}'; expected 'ce' or 'focal'")
    self._setup(num_outputs=tasks.num_outputs(self.task, data.num_classes),
                input_shape=data.image_shape,
                steps_per_epoch=pipeline.steps_per_epoch(len(train_labels),
                                                         config.train.batch_size))
    self._eval_step = jax.jit(self._eval_step_impl,
                              in_shardings=(self.replicated, self.batch_sharding,
                                            self.batch_sharding),
                              out_shardings=(self.replicated, self.replicated))

  def _setup(self, num_outputs: int, input_shape, steps_per_epoch: int) -> None:
    """Model, optimizer, schedule, mesh and the compiled train step (shared by tasks)."""
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
    self.tx = optim.make_optimizer(config.optimizer, self.schedule)

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

  @property
  def eval_splits(self):
    """Splits scored at the end of training (results.json)."""
    return ('val', 'test')

  @property
  def available_splits(self):
    return tuple(self.data.splits)

  def save_predictions(self, workdir: str, split: str, predictions) -> None:
    save_predictions(workdir, split, predictions, self.data.class_names)

  def write_run_files(self, workdir: str) -> None:
    """Files describing the run, written when training starts: the data fingerprint."""
    _write_json(os.path.join(workdir, 'data_fingerprint.json'), self.data.fingerprint())

  def describe(self) -> str:
    return self.data.summary()

  # ----- state -------------------------------------------------------------------------
  def _init_impl(self, key: jax.Array) -> TrainState:
    init_key, dropout_key = jax.random.split(key)
    dummy = jnp.zeros((1,) + self.input_shape, jnp.float32)
    variables = self.model.init({'params': init_key}, dummy, train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=self.tx.init(params), dropout_key=dropout_key)

  def init_state(self) -> TrainState:
    """Fresh state, created directly on the replicated sharding (no host copy to alias)."""
    key = jax.random.PRNGKey(self.config.seed)
    return jax.jit(self._init_impl, out_shardings=self.replicated)(key)

  def variables(self, state: TrainState) -> Dict[str, Any]:
    """The model's variables (params, batch statistics) in a state, for ``model.apply``."""
    variables = {'params': state.params}
    if jax.tree.leaves(state.batch_stats):
      variables['batch_stats'] = state.batch_stats
    return variables

  def model_summary(self, state: TrainState) -> Dict[str, Any]:
    """Parameters, FLOPs per example and the layer table (:mod:`medjax.models.summary`)."""
    summary = model_summary_lib.model_summary(self.model, self.variables(state),
                                              self.input_shape)
    summary['name'] = self.config.model.name
    return summary

  def abstract_state(self) -> TrainState:
    shapes = jax.eval_shape(self._init_impl, jax.random.PRNGKey(0))
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), shapes)

  # ----- steps -------------------------------------------------------------------------
  def _loss(self, logits, labels):
    per_example, weights = losses.classification_loss(
        self.task, logits, labels, name=self.config.loss.name,
        class_weights=self.class_weights, focal_gamma=self.config.loss.focal_gamma,
        label_smoothing=self.config.loss.label_smoothing)
    return per_example, weights

  def _batch_loss(self, logits, labels) -> jax.Array:
    per_example, weights = self._loss(logits, labels)
    return losses.weighted_mean(per_example, weights)

  def _train_step_impl(self, state: TrainState, images, labels):
    dropout_key = jax.random.fold_in(state.dropout_key, state.step)

    def loss_fn(params):
      variables = self.variables(state.replace(params=params))
      has_bn = 'batch_stats' in variables
      logits, updates = self.model.apply(
          variables, images, train=True, rngs={'dropout': dropout_key},
          mutable=['batch_stats'] if has_bn else [])
      return self._batch_loss(logits, labels), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    param_updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=updates.get('batch_stats', state.batch_stats),
                              opt_state=opt_state)
    return new_state, {'loss': loss, 'grad_norm': optax.global_norm(grads)}

  def _eval_step_impl(self, state: TrainState, images, labels):
    logits = self.model.apply(self.variables(state), images, train=False)
    per_example, weights = self._loss(logits, labels)
    return tasks.scores_from_logits(self.task, logits), per_example * weights

  def _global(self, local: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(self.batch_sharding, local)

  def train_step(self, state: TrainState, images: np.ndarray, labels: np.ndarray):
    return self._train_step(state, self._global(images), self._global(labels))

  # ----- data --------------------------------------------------------------------------
  def train_iterator(self, start_step: int):
    images, labels = self.data.splits['train']
    cfg = self.config.data
    return pipeline.train_batches(
        images, labels, global_batch=self.global_batch, seed=self.config.seed,
        start_step=start_step, num_steps=self.total_steps, pixel_max=self.data.pixel_max,
        mean=cfg.mean, std=cfg.std, augment=cfg.augment,
        process_index=jax.process_index(), process_count=jax.process_count(),
        class_balanced=cfg.class_balanced)

  def predict(self, state: TrainState, split: str) -> Dict[str, np.ndarray]:
    """Scores of every example of ``split``, in dataset order, plus the mean loss."""
    images, labels = self.data.splits[split]
    cfg = self.config.data
    batches = pipeline.eval_batches(
        images, labels, global_batch=self.config.train.eval_batch_size,
        pixel_max=self.data.pixel_max, mean=cfg.mean, std=cfg.std,
        process_index=jax.process_index(), process_count=jax.process_count())
    all_scores, all_losses, all_masks = [], [], []
    for batch_images, batch_labels, global_mask in batches:
      scores, loss = self._eval_step(state, self._global(batch_images),
                                     self._global(batch_labels))
      # Outputs are replicated: every process holds the whole global batch.
      all_scores.append(np.asarray(scores.addressable_data(0)))
      all_losses.append(np.asarray(loss.addressable_data(0)))
      all_masks.append(global_mask)
    mask = np.concatenate(all_masks).astype(bool)
    scores = np.concatenate(all_scores)[mask]
    per_example_loss = np.concatenate(all_losses)[mask]
    return {'index': np.arange(len(labels)), 'labels': labels, 'scores': scores,
            'loss': per_example_loss}

  def evaluate(self, state: TrainState, split: str):
    predictions = self.predict(state, split)
    result = metrics_lib.classification_metrics(self.task, predictions['labels'],
                                                predictions['scores'])
    result['loss'] = float(np.mean(predictions['loss']))
    return result, predictions


def make_experiment(config: ml_collections.ConfigDict) -> 'Experiment':
  """The experiment for ``config.task``: segmentation, or a classification task."""
  if config.task == 'segmentation':
    from medjax.segmentation import SegmentationExperiment
    return SegmentationExperiment(config)
  return Experiment(config, load_data(config))


def resolve_task(task: str, data: ClassificationData) -> str:
  if task == 'auto':
    return data.task
  tasks.check_task(task)
  compatible = {
      'binary': ('binary',), 'multiclass': ('binary', 'multiclass', 'ordinal'),
      'ordinal': ('binary', 'multiclass', 'ordinal'), 'multilabel': ('multilabel',)}
  if data.task not in compatible[task]:
    raise ValueError(f"task '{task}' does not fit dataset {data.name}, whose labels are "
                     f"{data.task}")
  return task


# ----- workdir files ---------------------------------------------------------------------
def _is_main() -> bool:
  return jax.process_index() == 0


def versions() -> Dict[str, str]:
  import orbax.checkpoint
  import tensorflow as tf
  return {'medjax': medjax.__version__, 'jax': jax.__version__, 'jaxlib': jax.lib.__version__,
          'flax': flax.__version__, 'optax': optax.__version__,
          'orbax_checkpoint': orbax.checkpoint.__version__, 'tensorflow': tf.__version__,
          'numpy': np.__version__, 'python': platform.python_version()}


def run_command() -> Dict[str, Any]:
  """How this process was started: argv, working directory, host, and medjax's git commit
  when it runs from a checkout."""
  import subprocess
  import sys
  commit = ''
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                            timeout=5, cwd=os.path.dirname(os.path.abspath(medjax.__file__))
                            ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return {'argv': list(sys.argv), 'cwd': os.getcwd(), 'host': platform.node(),
          'git_commit': commit, 'time': time.strftime('%Y-%m-%dT%H:%M:%S%z')}


class MetricsLog:
  """Appends JSON lines to ``metrics.jsonl`` and scalars to TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, resume_step: int):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = _is_main()
    self.writer = None
    if not self.enabled:
      return
    if os.path.exists(self.path):
      # Drop records written after the checkpoint we resume from: they are redone.
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)['step'] <= resume_step]
      with open(self.path, 'w') as f:
        f.writelines(kept)
    from tensorboardX import SummaryWriter
    self.writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, record: Dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record, sort_keys=True) + '\n')
    for key, value in record.items():
      if key not in ('step', 'split') and isinstance(value, (int, float)) and np.isfinite(value):
        self.writer.add_scalar(f"{record['split']}/{key}", value, global_step=record['step'])
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def _scalars(metrics: Dict[str, Any]) -> Dict[str, float]:
  return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _write_json(path: str, obj: Any) -> None:
  if not _is_main():
    return
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, allow_nan=True)
    f.write('\n')
  os.replace(tmp, path)


def save_predictions(workdir: str, split: str, predictions: Dict[str, np.ndarray],
                     class_names) -> None:
  if not _is_main():
    return
  np.savez(os.path.join(workdir, f'predictions_{split}.npz'), index=predictions['index'],
           labels=predictions['labels'], scores=predictions['scores'],
           class_names=np.array(class_names))


# ----- the loop --------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains (resuming from ``workdir`` if it holds checkpoints), selects the best checkpoint
  by the validation metric, evaluates it on val and test, and writes the workdir files."""
  start_time = time.time()
  config = config_lib.resolve(config)
  os.makedirs(workdir, exist_ok=True)
  config_path = os.path.join(workdir, 'config.json')
  if os.path.exists(config_path) and config_lib.from_json_file(config_path) != config:
    print(f'note: config differs from {config_path}; the new config is used and saved')
  if _is_main():
    with open(config_path, 'w') as f:
      f.write(config_lib.to_json(config) + '\n')

  exp = make_experiment(config)
  if _is_main():
    exp.write_run_files(workdir)
    _write_json(os.path.join(workdir, 'command.json'), run_command())
  tcfg = config.train
  manager = checkpoint.make_manager(workdir, tcfg.keep_checkpoints, tcfg.selection_metric,
                                    tcfg.selection_mode)
  latest = manager.latest_step()
  pending_losses = []  # per-step train losses not yet written to the log
  if latest is None:
    state = exp.init_state()
    start_step = 0
  else:
    state, restored_meta = checkpoint.restore(manager, latest, exp.abstract_state())
    pending_losses = list(restored_meta.get('pending_train_losses', []))
    start_step = int(jax.device_get(state.step))
    print(f'Resuming from checkpoint at step {start_step} in {workdir}')
  log = MetricsLog(workdir, start_step)
  if start_step == 0:
    summary = exp.model_summary(state)
    if _is_main():
      _write_json(os.path.join(workdir, 'model_summary.json'), summary)
      with open(os.path.join(workdir, 'model_summary.txt'), 'w') as f:
        f.write(model_summary_lib.format_summary(summary, max_depth=99) + '\n')
    print(f'{exp.describe()}\n{model_summary_lib.format_summary(summary)}\ntask {exp.task}, '
          f'{jax.device_count()} device(s), {exp.steps_per_epoch} steps/epoch')

  stop = {'requested': False}
  previous_handler = None
  # Preemption: save at the next step boundary, then exit. Single-process only: every host of
  # a multi-host run would have to agree on the step.
  if jax.process_count() == 1 and hasattr(signal, 'SIGTERM'):
    def on_sigterm(signum, frame):
      stop['requested'] = True
    try:
      previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread
      previous_handler = None

  def meta(step, pending=()):
    return {'step': step, 'epoch': step / exp.steps_per_epoch,
            'pending_train_losses': [float(x) for x in jax.device_get(list(pending))]}

  def check_finite(step, values):
    if not np.all(np.isfinite(values)):
      last_good = manager.latest_step()
      raise TrainingDiverged(
          f'loss became NaN or infinite at or before step {step}; stopping. The last good '
          f'checkpoint is step {last_good} in {os.path.join(workdir, "checkpoints")} '
          '(lower optimizer.learning_rate or set optimizer.grad_clip_norm).')

  progress = None
  if tcfg.progress_bar and _is_main():
    from tqdm import tqdm
    progress = tqdm(total=exp.total_steps, initial=start_step, unit='step', dynamic_ncols=True)

  step = start_step
  interval_start, interval_steps = time.time(), 0
  eval_every = max(tcfg.eval_every_epochs, 1) * exp.steps_per_epoch
  try:
    for images, labels in exp.train_iterator(start_step):
      state, step_metrics = exp.train_step(state, images, labels)
      step += 1
      interval_steps += 1
      pending_losses.append(step_metrics['loss'])
      if progress is not None:
        progress.update(1)
      log_now = step % tcfg.log_every_steps == 0 or step % eval_every == 0
      eval_now = step % eval_every == 0 or step == exp.total_steps
      stop_now = stop['requested'] or (tcfg.stop_after_steps and
                                       step - start_step >= tcfg.stop_after_steps)
      if log_now or eval_now or stop_now:
        values = np.asarray(jax.device_get(pending_losses), np.float64)
        check_finite(step, values)
      if log_now or eval_now:
        elapsed = time.time() - interval_start
        record = {'step': step, 'epoch': step / exp.steps_per_epoch, 'split': 'train',
                  'loss': float(values.mean()), 'learning_rate': float(exp.schedule(step - 1)),
                  'images_per_sec': interval_steps * exp.global_batch / max(elapsed, 1e-9)}
        log.write(record)
        if progress is not None:
          progress.set_postfix(loss=f"{record['loss']:.4f}")
        pending_losses = []
        interval_start, interval_steps = time.time(), 0
      if eval_now:
        val_metrics, _ = exp.evaluate(state, 'val')
        log.write({'step': step, 'epoch': step / exp.steps_per_epoch, 'split': 'val',
                   **_scalars(val_metrics)})
        checkpoint.save(manager, step, state, meta(step), _scalars(val_metrics))
        interval_start = time.time()
      if stop_now:
        if not eval_now:
          # Unlogged losses travel in the checkpoint, so the resumed run logs exactly what
          # an uninterrupted run would.
          checkpoint.save(manager, step, state, meta(step, pending_losses))
        print(f'Stopped at step {step}; run the same command again to resume.')
        return {'stopped_at_step': step}
  finally:
    if progress is not None:
      progress.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)

  results = finalize(exp, manager, workdir)
  results['run_info'] = {'wall_time_s': time.time() - start_time,
                         'resumed_from_step': start_step, 'devices': jax.device_count(),
                         'platform': jax.devices()[0].platform}
  _write_json(os.path.join(workdir, 'results.json'), results)
  write_plots(workdir)
  return results


def write_plots(workdir: str, splits=('val', 'test')) -> None:
  """The workdir's figures (:func:`medjax.plots.write_run_plots`); a plotting failure is
  reported but never costs the run's results, which are written before."""
  if not _is_main():
    return
  from medjax import plots
  try:
    written = plots.write_run_plots(workdir, splits)
  except Exception as e:  # noqa: BLE001
    print(f'warning: could not draw the plots of {workdir}: {type(e).__name__}: {e}')
    return
  if written:
    print(f"plots: {', '.join(sorted(written))} in {os.path.join(workdir, 'plots')}")


def _selected_step(manager, workdir: str, step: Optional[int] = None) -> int:
  """``step`` if given, else the best checkpoint by the selection metric (else the latest)."""
  if step is not None:
    if step not in manager.all_steps():
      raise ValueError(f'no checkpoint at step {step}; available: {manager.all_steps()}')
    return step
  selected = manager.best_step()
  if selected is None:
    selected = manager.latest_step()
  if selected is None:
    raise FileNotFoundError(f'no checkpoint in {os.path.join(workdir, "checkpoints")}')
  return selected


def finalize(exp: Experiment, manager, workdir: str,
             step: Optional[int] = None) -> Dict[str, Any]:
  """Evaluates the selected (best) checkpoint on val and test; writes predictions files."""
  selected = _selected_step(manager, workdir, step)
  state, meta = checkpoint.restore(manager, selected, exp.abstract_state())
  results: Dict[str, Any] = {
      'selected_step': int(selected), 'selected_epoch': meta['epoch'],
      'selection_metric': f'val/{exp.config.train.selection_metric}',
      'selection_mode': exp.config.train.selection_mode,
      'task': exp.task, 'dataset': exp.data.name, 'class_names': list(exp.data.class_names),
      'seed': exp.config.seed, 'versions': versions()}
  for split in exp.eval_splits:
    split_metrics, predictions = exp.evaluate(state, split)
    results[split] = split_metrics
    exp.save_predictions(workdir, split, predictions)
  metric = exp.config.train.selection_metric
  summary = ', '.join(f'{split} {metric}={results[split].get(metric, float("nan")):.4f}'
                      for split in exp.eval_splits)
  print(f'Selected step {selected} (epoch {meta["epoch"]:.1f}): {summary}')
  return results


def restore_workdir(workdir: str, step: Optional[int] = None):
  """(experiment, state, step) of the selected (best) or given checkpoint of ``workdir``,
  built from the workdir's own config.json."""
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{workdir} has no config.json; is it a medjax workdir?')
  config = config_lib.from_json_file(config_path)
  exp = make_experiment(config)
  manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints,
                                    config.train.selection_metric, config.train.selection_mode)
  selected = _selected_step(manager, workdir, step)
  state, _ = checkpoint.restore(manager, selected, exp.abstract_state())
  return exp, state, int(selected)


def evaluate_workdir(workdir: str, split: str = 'test', step: Optional[int] = None,
                     write: bool = True) -> Dict[str, Any]:
  """Reloads the config and the selected (or given) checkpoint of ``workdir`` and scores
  ``split``; the numbers equal those in ``results.json`` for the same checkpoint."""
  exp, state, selected = restore_workdir(workdir, step)
  if split not in exp.available_splits:
    raise ValueError(f"unknown split '{split}'; expected one of {sorted(exp.available_splits)}")
  split_metrics, predictions = exp.evaluate(state, split)
  result = {'split': split, 'step': selected, 'metrics': split_metrics}
  if write:
    _write_json(os.path.join(workdir, f'eval_{split}.json'), result)
    exp.save_predictions(workdir, split, predictions)
    write_plots(workdir, (split,))
  return result
