"""Experiment configs: defaults, strict merging, file loading and command-line overrides.

A config file is a Python file with ``get_config(arg: str | None = None) -> ConfigDict``
(``configs/NAME.py`` or ``configs/NAME.py:runlocal`` to pass ``arg``). It only states what
differs from :func:`default_config`; every key it sets must exist there, so a typo such as
``optimizer.learnig_rate`` is an error, not a silently ignored setting. Model keyword
arguments (``model.*`` other than ``model.name``) are checked against the chosen model.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import os
from typing import Any, Callable, Sequence

import ml_collections


class ConfigError(ValueError):
  """A config that cannot be used: unknown key, wrong type, bad value, bad file."""


def _augment_like(base: ml_collections.ConfigDict, **values) -> ml_collections.ConfigDict:
  """An augmentation section with ``base``'s keys (``data.augment``'s ops), these values
  changed: every augmentation section has every op."""
  section = ml_collections.ConfigDict(base.to_dict())
  section.update(values)
  return section


def default_config() -> ml_collections.ConfigDict:
  """Every config key medjax understands, with its default."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  # 'synthetic' (embedded, generated from data.seed) or 'medmnist' (npz file).
  c.data.name = 'synthetic'
  # medmnist: path to the .npz file, or a directory holding '<flag>.npz'.
  c.data.path = ''
  # medmnist: dataset flag ('breastmnist', 'pathmnist_64', ...) naming <flag>.npz inside a
  # data.path directory. When data.path is an .npz file, the file name decides instead.
  c.data.flag = ''
  # medmnist: download the official file (28 px, MD5-checked) if it is not at data.path.
  c.data.download = False
  # Intensity scaling: x -> (x / 255 - mean) / std, as MedMNIST's reference pipeline.
  c.data.mean = 0.5
  c.data.std = 0.5
  # Class-balanced sampling: each epoch draws examples so every class is equally frequent.
  c.data.class_balanced = False
  # Use only the first N examples of each split (0 = all); for quick tests.
  c.data.max_examples = 0
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.seed = 1234
  c.data.synthetic.image_size = 32
  c.data.synthetic.num_train = 2000
  c.data.synthetic.num_val = 400
  c.data.synthetic.num_test = 400
  # 3 = normal / benign / malignant; 2 = normal+benign / malignant.
  c.data.synthetic.num_classes = 3
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.flip_lr = False
  c.data.augment.flip_ud = False
  c.data.augment.rotation_deg = 0.0   # uniform in [-deg, +deg]; 2D only
  c.data.augment.scale_min = 1.0      # zoom factor range (scale/crop); 2D only
  c.data.augment.scale_max = 1.0
  c.data.augment.brightness = 0.0     # additive shift uniform in [-b, +b] (normalised units)
  c.data.augment.contrast = 0.0       # multiplicative factor uniform in [1-c, 1+c]
  c.data.augment.cutout = 0.0         # side of a zeroed square, fraction of the image side
  c.data.augment.translate = 0.0      # shift uniform in [-t, +t] x the side, per axis; 2D only
  c.data.augment.shear_deg = 0.0      # x-shear angle uniform in [-deg, +deg]; 2D only
  c.data.augment.blur_sigma = 0.0     # Gaussian blur, sigma uniform in [0, s] pixels; 2D only
  c.data.augment.noise_std = 0.0      # Gaussian noise, std uniform in [0, s] (normalised units)
  c.data.augment.op_prob = 1.0        # chance of each of affine/brightness/contrast/blur/noise
  # Few labels: keep the labels of a seeded, class-stratified subset of the training split
  # (data.labeled_count examples if > 0, else that fraction); the rest are images only.
  c.data.labeled_fraction = 1.0
  c.data.labeled_count = 0
  c.data.labeled_seed = -1            # -1: the run's seed (each seed of a group its subset)

  # Segmentation datasets (task='segmentation'): see medjax/experiments/segmentation.py.
  c.data.root = ''                    # MSD folder (dataset.json) or image/label folders
  c.data.cache_dir = ''               # prepared cases; '' = ~/.cache/medjax
  c.data.target_spacing = 'keep'      # 'keep' | 'median' | 'x,y,z' in mm
  c.data.normalization = 'zscore'     # zscore | zscore_nonzero | ct | percentile | none | auto
  c.data.ct_window = (-1000.0, 1000.0)
  c.data.crop_nonzero = True
  # Stored label value of each class, e.g. (255, 0) when the structure of interest is stored
  # as 0 (ISBI membranes), or (0, 1, 2, 4) for BraTS; () = the stored values are the classes.
  c.data.label_values = ()
  c.data.class_names = ()             # names of the classes; () = from dataset.json or '0', '1'..
  c.data.num_folds = 5
  c.data.fold = 0
  c.data.split_seed = 0               # the k-fold split does not change with c.seed
  c.data.max_cases = 0                # 0 = all
  c.data.patch_size = (40, 56, 40)    # () = from the data (median shape, see auto_patch_size)
  c.data.slice_axis = -1              # -1: patches of the data's dimensionality; 0/1/2: 2D slices
  c.data.skip_empty_slices = False
  c.data.slice_context = 0            # 2.5D: neighbouring slices on each side as channels
  c.data.foreground_fraction = 1.0 / 3.0
  from medjax.data.sampling import SegAugment  # the probabilities and ranges, all configurable
  c.data.seg_augment = ml_collections.ConfigDict(dataclasses.asdict(SegAugment()))

  c.model = ml_collections.ConfigDict()
  c.model.name = 'simple_cnn'

  # Semi-supervised learning from the unlabelled rest of the training split (medjax/semi.py):
  # 'none'; classification: 'fixmatch' (consistency loss in the same run) | 'mixmatch'
  # (guessed labels and mixup, in the same run) | 'self_training' (a trained teacher's
  # confident pseudo-labels join the labelled data); segmentation: 'fixmatch' (the model's
  # confident voxel labels of weak patches train its strong ones, in the same run) |
  # 'mean_teacher' (consistency with the parameters' moving average, in the same run) |
  # 'self_training'.
  c.semi = ml_collections.ConfigDict()
  c.semi.method = 'none'
  c.semi.teacher = ''                 # self_training: the teacher's workdir (or seed group)
  c.semi.threshold = 0.95             # confidence a pseudo-label needs
  c.semi.class_balance = True         # self_training: pseudo-labels follow the labelled prior
  c.semi.labeled_share = 0.5          # segmentation self_training: labelled share of cases drawn
  c.semi.unlabeled_ratio = 2          # fixmatch, mixmatch, mean_teacher: unlabelled per labelled
  c.semi.weight = 1.0                 # fixmatch, mixmatch, mean_teacher: unlabelled loss weight
  c.semi.threshold_mode = 'fixed'     # fixmatch: 'fixed' (semi.threshold) or 'self_adaptive'
  c.semi.threshold_momentum = 0.99    # self_adaptive: running-average momentum (FreeMatch)
  c.semi.distribution_alignment = False  # fixmatch, mixmatch: align guesses to the labelled prior
  c.semi.ema_decay = 0.99             # mean_teacher: the teacher's parameter average
  c.semi.noise_std = 0.1              # mean_teacher: Gaussian input noise, student and teacher
  c.semi.ramp_up_fraction = 0.25      # mean_teacher, mixmatch: unlabelled weight's sigmoid ramp-up
  c.semi.sharpen_temperature = 0.5    # mixmatch: guessed labels p^(1/T), renormalised
  c.semi.mixup_alpha = 0.75           # mixmatch: mixup weight ~ Beta(alpha, alpha)
  # fixmatch: strong augmentation of the unlabelled images (the weak one is data.augment).
  c.semi.strong_augment = _augment_like(
      c.data.augment, flip_lr=True, rotation_deg=30.0, scale_min=0.8, scale_max=1.2,
      brightness=0.3, contrast=0.3, cutout=0.5)

  # fixmatch for segmentation: the strong view of an unlabelled patch (the weak one is the
  # sampler's); intensity only, so the weak view's pseudo-label map still fits, plus CutMix.
  c.semi.segmentation_strong = ml_collections.ConfigDict()
  c.semi.segmentation_strong.brightness = 0.3   # intensity x U(1 - b, 1 + b)
  c.semi.segmentation_strong.contrast = 0.3     # about the patch mean, x U(1 - c, 1 + c)
  c.semi.segmentation_strong.noise_std = 0.1    # Gaussian noise, std ~ U(0, noise_std)
  c.semi.segmentation_strong.cutmix_prob = 0.5  # a box pasted from another unlabelled patch
  c.semi.segmentation_strong.cutmix_area = (0.02, 0.4)  # its share of the patch, ~ U(low, high)

  # task='contrastive': SimCLR pretraining on the training images (medjax/experiments/
  # contrastive.py); views under contrastive.augment, selection by kNN AUC on val.
  c.contrastive = ml_collections.ConfigDict()
  c.contrastive.temperature = 0.2
  c.contrastive.projection_dim = 64    # the model's outputs (its head is the projection)
  c.contrastive.knn_k = 10             # labelled neighbours voting in the evaluation
  c.contrastive.augment = _augment_like(
      c.data.augment, flip_lr=True, rotation_deg=20.0, scale_min=0.8, scale_max=1.2,
      brightness=0.3, contrast=0.3, cutout=0.25, translate=0.1, blur_sigma=1.0, noise_std=0.1,
      op_prob=0.8)

  # Sliding-window inference (segmentation validation and prediction).
  c.inference = ml_collections.ConfigDict()
  c.inference.overlap = 0.5
  c.inference.blend = 'gaussian'      # 'gaussian' | 'constant'
  c.inference.mirror_axes = ()        # spatial axes for mirroring test-time augmentation

  # 'auto' takes the task from the dataset; or one of
  # 'binary', 'multiclass', 'ordinal', 'multilabel', 'segmentation'.
  c.task = 'auto'

  c.loss = ml_collections.ConfigDict()
  # Classification: 'ce' | 'focal' (multi-label always uses sigmoid BCE).
  # Segmentation: 'dice_ce' | 'dice' | 'ce' | 'focal' | 'tversky' | 'generalized_dice'.
  c.loss.name = 'ce'
  c.loss.include_background = False   # segmentation Dice
  c.loss.batch_dice = True            # Dice pooled over the batch (nnU-Net) or per case
  c.loss.tversky_alpha = 0.3          # weight of false positives
  c.loss.tversky_beta = 0.7           # weight of false negatives
  c.loss.class_weights = 'none'       # 'none' | 'balanced' | comma-separated floats
  c.loss.focal_gamma = 2.0
  c.loss.label_smoothing = 0.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adam'           # 'sgd' | 'adam' | 'adamw' | 'adagrad'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.momentum = 0.9          # sgd
  c.optimizer.nesterov = False        # sgd
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  # L2 added to the gradient (PyTorch-style) for sgd/adam/adagrad; decoupled for adamw.
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 0.0    # 0 = no clipping
  c.optimizer.schedule = 'constant'   # 'constant' | 'multistep' | 'cosine'
  c.optimizer.milestones_epochs = ()  # multistep: epochs at which lr *= decay_factor
  c.optimizer.decay_factor = 0.1
  c.optimizer.warmup_epochs = 0.0     # linear warm-up from 0, before any schedule
  # > 0 (e.g. 0.999): also keep an exponential moving average of the parameters (decay per
  # step) and validate, select, test, predict and explain with it (FixMatch's protocol).
  c.optimizer.ema_decay = 0.0

  c.train = ml_collections.ConfigDict()
  c.train.num_epochs = 10
  c.train.batch_size = 128            # global batch, split over all devices
  c.train.eval_batch_size = 256
  c.train.log_every_steps = 20
  c.train.eval_every_epochs = 1
  # Steps per epoch; 0 = one pass over the training data (segmentation samples patches, so
  # an epoch is a number of steps, 250 in nnU-Net).
  c.train.steps_per_epoch = 0
  c.train.keep_checkpoints = 2        # latest N kept, plus the best by selection_metric
  c.train.selection_metric = 'auc'    # validation metric that picks the final checkpoint
  c.train.selection_mode = 'max'      # 'max' | 'min' | 'last' (last checkpoint, no selection)
  c.train.progress_bar = True
  # Several seeds trained together in one compiled program, one workdir each under
  # DIR/seed_<K>; () = one run with `seed` (medjax.seeds).
  c.train.seeds = ()
  c.train.seeds_program = 'auto'      # 'vmap' | 'unroll' over the seed axis; auto: unroll on CPU
  # Stop after this many steps in this invocation (0 = no limit). For tests of resume.
  c.train.stop_after_steps = 0
  # Fine-tuning: a workdir (or a seed group: its seed_<K> for seed K) whose selected model
  # (its parameter average if it kept one) starts this run; optimizer and step start fresh.
  c.train.init_from = ''
  # Regexes of variable paths ('params/Dense_1/kernel') that init_from leaves at their fresh
  # values: a new head, e.g. ('Dense_1',) after contrastive pretraining.
  c.train.init_from_skip = ()
  return c


_EXTENSIBLE = ('model',)  # sections whose extra keys are validated elsewhere (model kwargs)


def _suggest(key: str, options: Sequence[str]) -> str:
  close = difflib.get_close_matches(key, list(options), n=1)
  return f" (did you mean '{close[0]}'?)" if close else ''


def _merge(base: ml_collections.ConfigDict, update: Any, prefix: str) -> None:
  for key, value in update.items():
    path = f'{prefix}{key}'
    if key not in base:
      if prefix.rstrip('.') in _EXTENSIBLE:
        with base.unlocked():
          base[key] = value
        continue
      raise ConfigError(
          f"unknown config key '{path}'{_suggest(key, base.keys())}; valid keys"
          f"{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(base.keys()))}")
    current = base[key]
    if isinstance(current, ml_collections.ConfigDict):
      if not hasattr(value, 'items'):
        raise ConfigError(f"config key '{path}' is a section; got {value!r}")
      _merge(current, value, path + '.')
    else:
      base[key] = _coerce(path, current, value)


def _coerce(path: str, current: Any, value: Any) -> Any:
  """Returns ``value`` converted to the type of the default ``current``."""
  if current is None or value is None:
    return value
  if isinstance(current, bool):
    if isinstance(value, bool):
      return value
    raise ConfigError(f"config key '{path}' expects true/false, got {value!r}")
  if isinstance(current, (int, float)) and not isinstance(value, bool) and isinstance(
      value, (int, float)):
    if isinstance(current, int) and isinstance(value, float) and not value.is_integer():
      raise ConfigError(f"config key '{path}' expects an integer, got {value!r}")
    return type(current)(value)
  if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
    return tuple(value)
  if isinstance(current, str) and isinstance(value, str):
    return value
  raise ConfigError(
      f"config key '{path}' expects {type(current).__name__}, got {value!r} "
      f"({type(value).__name__})")


def apply_variant(config: ml_collections.ConfigDict, arg: str | None,
                  **variants: Callable[[ml_collections.ConfigDict], None]
                  ) -> ml_collections.ConfigDict:
  """Applies the variant ``arg`` of ``configs/NAME.py:arg`` (``runlocal``, ``cpu``, ...):
  each variant is a function that edits the config in place; no argument, no variant.

    def get_config(arg=None):
      c = ...
      return config_lib.apply_variant(c, arg, runlocal=_runlocal)
  """
  if arg:
    if arg not in variants:
      raise ConfigError(f"unknown config argument '{arg}'; this config has "
                        f"{', '.join(sorted(variants)) or 'no variants'} (or none)")
    variants[arg](config)
  return config


def resolve(config: Any) -> ml_collections.ConfigDict:
  """Merges a (partial) config onto :func:`default_config`, rejecting unknown keys."""
  base = default_config()
  _merge(base, config, '')
  return base


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path/to/config.py[:arg]``, or a run's saved ``config.json`` (to repeat that run
exactly), and returns its resolved config."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f'config file not found: {path}')
  if path.endswith('.json'):
    if arg:
      raise ConfigError(f'{path}: a saved JSON config takes no argument (got :{arg})')
    try:
      return from_json_file(path)
    except json.JSONDecodeError as e:
      raise ConfigError(f'{path}: not valid JSON ({e})') from None
    except ConfigError as e:
      raise ConfigError(f'{path}: {e}') from None
  module_spec = importlib.util.spec_from_file_location('_medjax_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'config file {path} has no get_config() function')
  try:
    return resolve(module.get_config(arg) if arg else module.get_config())
  except ConfigError as e:
    raise ConfigError(f'{path}: {e}') from None


def parse_value(text: str) -> Any:
  """Parses an override value: Python literal if it is one, else the raw string."""
  lowered = text.lower()
  if lowered in ('true', 'false'):
    return lowered == 'true'
  if lowered in ('none', 'null'):
    return None
  if lowered in ('inf', '+inf', '-inf', 'nan'):
    return float(lowered)
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _lookup(config: ml_collections.ConfigDict, parts: Sequence[str]) -> Any:
  node: Any = config
  for part in parts:
    if not hasattr(node, 'keys') or part not in node:
      return None
    node = node[part]
  return node


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies ``key.sub=value`` overrides (as from ``--config.key.sub=value``)."""
  for item in overrides:
    key, sep, text = item.partition('=')
    if not sep:
      raise ConfigError(f"override '{item}' is not of the form key=value")
    nested: dict = {}
    node = nested
    parts = key.split('.')
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    value = parse_value(text)
    # A string key given something that parses as a literal ('--config.data.flag=123')
    # keeps the text as written.
    if isinstance(_lookup(config, parts), str) and not isinstance(value, str):
      value = text
    node[parts[-1]] = value
    _merge(config, nested, '')
  return config


def from_json_file(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    return resolve(json.load(f))
