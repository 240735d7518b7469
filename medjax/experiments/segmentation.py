"""Segmentation experiments: prepared cases in, U-Net trained on patches, whole-volume
validation by sliding window, predictions written as NIfTI on the input's own grid.

The training loop, checkpoints, resume and sharding are those of :mod:`medjax.train` and
:mod:`medjax.experiments.base`; this module supplies the data, the loss and the evaluation:

* data: ``data.root`` is prepared once into an uncompressed cache (:mod:`medjax.data.prepare`),
  split by a seeded k-fold (``data.num_folds``, ``data.fold``, ``data.split_seed``), and the
  split is written to the workdir as ``split.json``;
* training samples: patches (or 2D slices, ``data.slice_axis``, with ``data.slice_context``
  neighbouring slices on each side as channels: 2.5D) from :class:`SegmentationSampler`,
  one third centred on foreground, deterministic from (seed, step, position);
* loss: Dice + CE (or Dice, or CE), with deep supervision when the model returns several
  resolutions (weights 1/2^i, normalised);
* evaluation: every case of the split by sliding window, mapped back onto the original file's
  grid, scored there against the original label file (Dice, IoU, sensitivity, precision,
  HD95 and ASSD in mm); ``dice`` (mean over classes and cases) selects the checkpoint.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medjax import inference, metrics as metrics_lib, optim, seg_losses, seg_metrics, semi
from medjax import workdir as workdir_lib
from medjax.data import few_labels, layouts, nifti, prepare
from medjax.data.sampling import IGNORE_LABEL, SegAugment, SegmentationSampler, slice_stack
from medjax.experiments.base import Experiment


def parse_target_spacing(text: str):
  if text in ('', 'keep'):
    return None
  if text == 'median':
    return 'auto'
  try:
    values = tuple(float(v) for v in text.split(','))
  except ValueError:
    values = ()
  if len(values) != 3 or min(values) <= 0:
    raise ValueError(f"data.target_spacing must be 'keep', 'median' or 'x,y,z' in mm, got "
                     f'{text!r}')
  return values


def prepare_options(cfg: ml_collections.ConfigDict) -> prepare.PrepareOptions:
  return prepare.PrepareOptions(target_spacing=parse_target_spacing(cfg.target_spacing),
                                normalization=cfg.normalization,
                                ct_window=tuple(cfg.ct_window), crop_nonzero=cfg.crop_nonzero,
                                label_values=tuple(int(v) for v in cfg.label_values))


SEG_LOSSES = ('dice_ce', 'dice', 'ce', 'focal', 'tversky', 'generalized_dice')
# What the CLI table, results.json's headline_metrics and the reports show: the mean Dice,
# then these per class (dice_<class>, ...).
PER_CLASS_HEADLINE = ('dice', 'iou', 'hd95', 'assd')


class SegData:
  """What the train loop needs to know of a segmentation dataset."""

  def __init__(self, name: str, class_names, split: Dict[str, list], prepared):
    self.name = name
    self.class_names = class_names
    self.splits = split
    self.prepared = prepared

  def summary(self) -> str:
    f = self.prepared.fingerprint
    options = self.prepared.options
    return (f"{self.name}: segmentation, {len(self.class_names)} classes "
            f"({', '.join(self.class_names)}), {len(self.splits['train'])} train / "
            f"{len(self.splits['val'])} val cases, median shape {f.get('shape_median')}, "
            f"median spacing {f.get('spacing_median_mm')} mm, normalisation "
            f"{options.get('normalization')}")


def total_stride(model_cfg) -> int:
  """How much the U-Net of ``config.model`` downsamples: input sizes must be multiples of it."""
  return int(np.prod(model_cfg.get('strides', (1, 2, 2, 2, 2))))


def auto_patch_size(prepared, slice_axis, model_cfg, cap_3d: int = 128,
                    cap_2d: int = 512) -> Tuple[int, ...]:
  """The median prepared case shape (a slice of it for 2D slices), rounded up to a multiple
  of the network's total stride and capped per axis (128 voxels in 3D, 512 pixels in 2D)."""
  shapes = np.array([r['shape'] for r in prepared.records.values()])
  median = np.median(shapes, axis=0)
  if slice_axis is not None:
    median = np.delete(median, slice_axis)
  stride = total_stride(model_cfg)
  cap = cap_3d if len(median) == 3 else cap_2d
  return tuple(int(min(cap, stride * math.ceil(m / stride))) for m in median)


def _downsample_labels(labels: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Nearest-neighbour (strided) downsampling of ``[B, *spatial]`` labels to ``shape``."""
  steps = [full // small for full, small in zip(labels.shape[1:], shape)]
  return labels[(slice(None),) + tuple(slice(None, None, s) for s in steps)]


class SegmentationExperiment(Experiment):
  """A segmentation config bound to its prepared data, model and compiled steps."""

  task = 'segmentation'
  eval_splits = ('val',)
  available_splits = ('train', 'val')
  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    cfg = config.data
    if not cfg.root:
      raise ValueError('task=segmentation needs data.root (an MSD folder with dataset.json, '
                       'or a folder of image/label pairs)')
    if config.loss.name not in SEG_LOSSES:
      raise ValueError(f"unknown loss.name '{config.loss.name}' for segmentation; expected "
                       f"one of {', '.join(SEG_LOSSES)}")
    cache = cfg.cache_dir or os.path.join(os.path.expanduser('~'), '.cache', 'medjax')
    prepared = prepare.prepare(cfg.root, cache, prepare_options(cfg), cfg.max_cases)
    split = prepare.kfold_split(prepared.case_ids, cfg.num_folds, cfg.fold, cfg.split_seed)
    epoch_cases = len(split['train'])
    # Few labels: the labels of the other training cases are never read (their sampler gets
    # all-zero label arrays), and split.json lists them as 'unlabeled'.
    few = few_labels.split_case_ids(split['train'], cfg, config.seed)
    if few is not None:
      split = {'train': few[0], 'unlabeled': few[1], 'val': split['val']}
    self.semi_method = semi.check_method(config.semi, 'segmentation', few is not None)
    class_names = list(cfg.class_names) or prepared.class_names
    if len(class_names) != len(prepared.class_names):
      raise ValueError(f'data.class_names has {len(class_names)} names but the labels have '
                       f'{len(prepared.class_names)} classes')
    self.data = SegData(os.path.basename(os.path.normpath(cfg.root)), class_names, split,
                        prepared)
    self.dataset_name, self.class_names = self.data.name, class_names
    self.label_values = tuple(int(v) for v in cfg.label_values)
    self.cases = {c: prepared.load(c) for c in prepared.case_ids}
    self.num_classes = len(class_names)
    self.slice_axis = None if cfg.slice_axis < 0 else cfg.slice_axis
    self.patch_size = (tuple(int(p) for p in cfg.patch_size) if len(cfg.patch_size)
                       else auto_patch_size(prepared, self.slice_axis, config.model))
    expected_dims = prepared.spatial_dims - (1 if self.slice_axis is not None else 0)
    if len(self.patch_size) != expected_dims:
      raise ValueError(f'data.patch_size {self.patch_size} needs {expected_dims} values for '
                       f'{prepared.spatial_dims}D data'
                       f"{' sliced along an axis' if self.slice_axis is not None else ''}")
    # One channel count: the dataset check inside prepare() refuses cases that differ.
    self.image_channels = next(iter(self.cases.values()))[0].shape[-1]
    self.slice_context = int(cfg.slice_context)
    if self.slice_context < 0 or (self.slice_context and self.slice_axis is None):
      raise ValueError(f'data.slice_context={cfg.slice_context}: the number of neighbouring '
                       'slices on each side (2.5D) must be >= 0, and > 0 only with '
                       'data.slice_axis set (2D slices)')
    # 2.5D: each slice's neighbours join it as channels, [*slice, (2k+1) C].
    channels = self.image_channels * (2 * self.slice_context + 1)
    training_cases = {c: self.cases[c] for c in split['train']}
    self.pseudo_info = None
    # Self-training with a voxel threshold: the unsure voxels of the pseudo-label maps carry
    # IGNORE_LABEL, which the loss leaves out (set by _pseudo_labelled_cases).
    self.ignore_label = None
    if self.semi_method == 'self_training':
      pseudo = self._pseudo_labelled_cases(split)
      training_cases = semi.with_labeled_share(training_cases, pseudo,
                                               config.semi.labeled_share)
    self.sampler = SegmentationSampler(
        training_cases, self.patch_size, config.train.batch_size,
        seed=config.seed, foreground_fraction=cfg.foreground_fraction,
        augment=SegAugment(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                              for k, v in cfg.seg_augment.to_dict().items()}),
        slice_axis=self.slice_axis, skip_empty_slices=cfg.skip_empty_slices,
        slice_context=self.slice_context)
    if self.semi_method == 'fixmatch' and self.num_classes >= IGNORE_LABEL:
      raise ValueError(f'semi.method=fixmatch marks unsure voxels with label {IGNORE_LABEL}, '
                       f'which is one of the {self.num_classes} classes here')
    if self.semi_method in ('fixmatch', 'mean_teacher'):
      unlabeled = {c: (self.cases[c][0], np.zeros(self.cases[c][0].shape[:-1],
                                                   self.cases[c][1].dtype), {})
                   for c in split['unlabeled']}
      # Its own stream (seed + 2**31): patches anywhere, with the labelled run's augmentation.
      self.unlabeled_sampler = SegmentationSampler(
          unlabeled, self.patch_size, config.train.batch_size * config.semi.unlabeled_ratio,
          seed=config.seed + 2**31, foreground_fraction=0.0, augment=self.sampler.augment,
          slice_axis=self.slice_axis, slice_context=self.slice_context)
    steps = config.train.steps_per_epoch or math.ceil(epoch_cases / config.train.batch_size)
    self.setup(num_outputs=self.num_classes, input_shape=self.patch_size + (channels,),
               steps_per_epoch=steps)
    self._predict = jax.jit(self._predict_impl)

  def _pseudo_labelled_cases(self, split) -> Dict[str, Tuple]:
    """Self-training: the unlabelled cases with the teacher's label maps ``[*spatial]`` (the
    arg-max of its probabilities, with its own sliding window and mirroring) and their class
    locations (for the sampler's foreground oversampling); sets ``pseudo_info`` (the data
    fingerprint's record: teacher, step, each case's mean top probability and share of
    voxels kept).

    Voxels whose top probability is below ``semi.threshold`` get IGNORE_LABEL (no loss
    counts them); ``semi.threshold=0`` labels every voxel. The teacher must have prepared
    the same data and classes, kept the same validation cases and trained on labelled cases
    of this run only, so no held-out label and no label of an unlabelled case reaches the
    student through it.
    """
    teacher, state, step, workdir = self.load_run(self.config.semi.teacher, 'semi.teacher')
    difference = prepared_data_difference(self, teacher)
    if difference is None and sorted(split['val']) != sorted(teacher.data.splits['val']):
      difference = ('validation cases',)
    if difference:
      raise ValueError(f"semi.teacher {workdir}: its {difference[0]} differ from this run's")
    leaked = sorted(set(teacher.data.splits['train']) - set(split['train']))
    if leaked:
      raise ValueError(f'semi.teacher {workdir} trained on {len(leaked)} case(s) that are not '
                       f'labelled in this run (e.g. {leaked[0]}): its pseudo-labels would '
                       'carry their labels. Train the teacher with the same data.labeled_* '
                       'settings')
    threshold = float(self.config.semi.threshold)
    if threshold > 0 and self.num_classes >= IGNORE_LABEL:
      raise ValueError(f'semi.threshold={threshold} marks unsure voxels with label '
                       f'{IGNORE_LABEL}, which is one of the {self.num_classes} classes here: '
                       'set semi.threshold=0')
    self.ignore_label = IGNORE_LABEL if threshold > 0 else None
    rng = np.random.default_rng(self.config.seed)
    cases, confidence, kept = {}, {}, {}
    for case in split['unlabeled']:
      image, stored_label = self.cases[case][:2]
      probabilities = teacher.predict_prepared(state, image)
      top = np.max(probabilities, axis=-1)
      label = np.argmax(probabilities, axis=-1).astype(stored_label.dtype)
      if threshold > 0:
        label[top < threshold] = IGNORE_LABEL
      cases[case] = (image, label, prepare.class_locations(label, self.num_classes, rng))
      confidence[case] = round(float(np.mean(top)), 6)
      kept[case] = round(float(np.mean(top >= threshold)), 6)
    self.pseudo_info = {'teacher': os.path.abspath(workdir), 'teacher_step': step,
                        'pseudo_labeled_cases': len(cases), 'voxel_threshold': threshold,
                        'mean_top_probability': confidence, 'voxels_kept': kept}
    print(f'Self-training: {len(cases)} unlabelled cases pseudo-labelled by '
          f"{self.pseudo_info['teacher']}")
    return cases

  # ----- training ----------------------------------------------------------------------
  def optimizer(self):
    """The configured optimizer; with a mean teacher, also the parameters' moving average
    (the teacher), kept in the optimizer state."""
    tx = super().optimizer()
    if self.semi_method == 'mean_teacher':
      if self.config.optimizer.ema_decay:
        raise ValueError(
            'semi.method=mean_teacher keeps its own average of the parameters (the teacher, '
            'semi.ema_decay): set optimizer.ema_decay=0')
      tx = optim.with_parameter_ema(tx, self.config.semi.ema_decay)
    return tx

  def train_inputs(self, state, images, labels, key):
    """Mean teacher: the batch is ``[labelled; unlabelled]`` patches. The student sees the
    unlabelled ones with one Gaussian noise, the teacher (the parameters' moving average)
    with another; the teacher's probabilities become the consistency targets.
    FixMatch: :meth:`_fixmatch_inputs`."""
    if self.semi_method == 'fixmatch':
      return self._fixmatch_inputs(state, images, labels, key)
    if self.semi_method != 'mean_teacher':
      return images, labels
    cfg, processes = self.config.semi, jax.process_count()
    labeled, unlabeled = semi.split_rows(images, labels.shape[0], 2, processes)
    student_key, teacher_key = jax.random.split(key)
    teacher_logits = self.model.apply(
        self.apply_variables(state.opt_state.ema, state.batch_stats),
        semi.noisy(unlabeled, teacher_key, cfg.noise_std), train=False)
    targets = {'labels': labels,
               'teacher': jax.lax.stop_gradient(jax.nn.softmax(teacher_logits, axis=-1)),
               'weight': cfg.weight * semi.ramp_up(state.step, self.total_steps,
                                                   cfg.ramp_up_fraction)}
    student_unlabeled = semi.noisy(unlabeled, student_key, cfg.noise_std)
    return semi.join_rows([labeled, student_unlabeled], processes), targets

  def _fixmatch_inputs(self, state, images, labels, key):
    """FixMatch for segmentation (Sohn et al. 2020; with CutMix as in Yang et al. 2023,
    UniMatch): the batch is ``[labelled; unlabelled]`` patches, the unlabelled ones weakly
    augmented by the sampler. This step's model (not differentiated) labels each weak patch
    voxel by voxel (arg-max; IGNORE_LABEL below ``semi.threshold``); the strong view is the
    weak patch with a strong intensity perturbation and, with ``cutmix_prob``, a box pasted
    from another unlabelled patch, its pseudo-label map mixed with the same box. Returns
    ``[labelled; strong]`` rows and ``{'labels', 'pseudo', 'weight'}``."""
    cfg, processes = self.config.semi, jax.process_count()
    strong_cfg = cfg.segmentation_strong
    labeled, weak = semi.split_rows(images, labels.shape[0], 2, processes)
    # train=False: one output even with deep supervision (the full-resolution logits).
    logits = self.model.apply(self.apply_variables(state.params, state.batch_stats), weak,
                              train=False)
    probabilities = jax.lax.stop_gradient(jax.nn.softmax(logits.astype(jnp.float32), -1))
    pseudo = semi.pseudo_label_map(probabilities, cfg.threshold, IGNORE_LABEL)
    intensity_key, box_key, partner_key = jax.random.split(key, 3)
    strong = semi.strong_intensity(intensity_key, weak, strong_cfg.brightness,
                                   strong_cfg.contrast, strong_cfg.noise_std)
    box = semi.cutmix_boxes(box_key, weak.shape[0], weak.shape[1:-1], strong_cfg.cutmix_prob,
                            tuple(strong_cfg.cutmix_area))
    partner = jax.random.permutation(partner_key, weak.shape[0])
    strong, pseudo = semi.cutmix(box, partner, strong, pseudo)
    targets = {'labels': labels, 'pseudo': pseudo, 'weight': jnp.float32(cfg.weight)}
    return semi.join_rows([labeled, strong], processes), targets

  def loss(self, outputs, labels) -> jax.Array:
    """Dice/CE-family loss of logits ``[B, *spatial, K]`` (or a list, deep supervision:
    weights 1/2^i, normalised) against labels ``[B, *spatial]``; with a mean teacher, plus
    the weighted consistency of the unlabelled rows with the teacher; with FixMatch, plus
    the weighted same loss of the strong rows against their pseudo-label maps (unsure voxels
    ignored)."""
    if self.semi_method not in ('fixmatch', 'mean_teacher'):
      return self._supervised_loss(outputs, labels, self.ignore_label)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    num_labeled, processes = labels['labels'].shape[0], jax.process_count()
    parts = [semi.split_rows(o, num_labeled, 2, processes) for o in outputs]
    supervised = self._supervised_loss([p[0] for p in parts], labels['labels'],
                                       self.ignore_label)
    if self.semi_method == 'fixmatch':
      unlabeled = self._supervised_loss([p[1] for p in parts], labels['pseudo'], IGNORE_LABEL)
    else:
      unlabeled = semi.consistency_mse(parts[0][1], labels['teacher'])
    return supervised + labels['weight'] * unlabeled

  def _supervised_loss(self, outputs, labels, ignore_label: Optional[int] = None
                       ) -> jax.Array:
    """The configured loss; voxels labelled ``ignore_label`` count in none of its terms."""
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    weights = np.array([1.0 / 2**i for i in range(len(outputs))])
    weights = weights / weights.sum()
    cfg = self.config.loss
    total = 0.0
    for weight, logits in zip(weights, outputs):
      target = _downsample_labels(labels, logits.shape[1:-1])
      kwargs = dict(include_background=cfg.include_background, per_case=not cfg.batch_dice,
                    ignore_label=ignore_label)
      if cfg.name == 'dice_ce':
        loss = seg_losses.dice_ce_loss(logits, target, **kwargs)
      elif cfg.name == 'dice':
        loss = seg_losses.soft_dice_loss(logits, target, **kwargs)
      elif cfg.name == 'tversky':
        loss = seg_losses.tversky_loss(logits, target, alpha=cfg.tversky_alpha,
                                       beta=cfg.tversky_beta, **kwargs)
      elif cfg.name == 'generalized_dice':
        loss = seg_losses.generalized_dice_loss(logits, target, **kwargs)
      elif cfg.name == 'focal':
        loss = seg_losses.focal_loss(logits, target, cfg.focal_gamma, ignore_label)
      else:
        loss = seg_losses.cross_entropy(logits, target, ignore_label)
      total = total + weight * loss
    return total

  def train_iterator(self, start_step: int):
    batches = self.sampler.batches(start_step, self.total_steps, jax.process_index(),
                                   jax.process_count())
    if self.semi_method not in ('fixmatch', 'mean_teacher'):
      return batches
    unlabeled = self.unlabeled_sampler.batches(start_step, self.total_steps,
                                               jax.process_index(), jax.process_count())
    # This process's rows: [labelled; unlabelled] (see semi.split_rows).
    return ((np.concatenate([x, u]), y) for (x, y), (u, _) in zip(batches, unlabeled))

  # ----- inference ---------------------------------------------------------------------
  def _predict_impl(self, state, windows):
    logits = self.model.apply(self.variables(state), windows, train=False)
    return jax.nn.softmax(logits, axis=-1)

  def predict_prepared(self, state, image: np.ndarray) -> np.ndarray:
    """Class probabilities ``[*spatial, K]`` of a prepared image ``[*spatial, C]``."""
    batch = self.config.train.eval_batch_size

    def predict(windows: np.ndarray) -> np.ndarray:
      n = len(windows)
      padded = np.zeros((batch,) + windows.shape[1:], np.float32)
      padded[:n] = windows  # one static shape: one compilation
      return np.asarray(self._predict(state, jnp.asarray(padded)))[:n]

    cfg = self.config.inference
    image = np.asarray(image, np.float32)
    if self.slice_axis is None:
      return inference.sliding_window(predict, image, self.patch_size, overlap=cfg.overlap,
                                      blend=cfg.blend, batch_size=batch,
                                      mirror_axes=tuple(cfg.mirror_axes))
    probs = inference.sliding_window_stack(
        predict, self.slices_of(image), self.patch_size, overlap=cfg.overlap, blend=cfg.blend,
        batch_size=batch, mirror_axes=tuple(cfg.mirror_axes))
    return np.moveaxis(probs, 0, self.slice_axis)

  def slices_of(self, image: np.ndarray) -> np.ndarray:
    """A prepared image ``[*spatial, C]`` as the 2D model's inputs: every slice along
    ``data.slice_axis``, ``[M, *slice, C']`` (with ``data.slice_context`` k, the k
    neighbouring slices on each side as channels, ``C' = (2k+1) C``)."""
    return slice_stack(image, self.slice_axis, self.slice_context)

  def predict_case(self, state, case_id: str) -> np.ndarray:
    """Label map of a prepared case, on the original file's grid."""
    return self.label_map(case_id, self.predict_prepared(state, self.cases[case_id][0]))

  def label_map(self, case_id: str, probs: np.ndarray) -> np.ndarray:
    """The argmax of class probabilities ``[*spatial, K]`` on a case's prepared grid, put
    back onto its original file's grid."""
    labels = np.argmax(probs, axis=-1).astype(np.uint8)
    return prepare.restore_original_grid(labels, self.data.prepared.records[case_id])

  def prepare_file(self, path: str) -> Tuple[np.ndarray, Dict]:
    """A new scan prepared exactly as the training cases were (reorientation, resampling,
    crop, normalisation): ``(image [*spatial, C], record)``; the record maps a prediction
    back onto the file's grid (:func:`medjax.data.prepare.restore_original_grid`)."""
    image, record = prepare.prepare_image(path, self.data.prepared.resolved_options(),
                                          self.data.prepared.target_spacing)
    if image.shape[-1] != self.image_channels:
      raise nifti.VolumeError(f'{path}: {image.shape[-1]} channel(s), but the model was '
                              f'trained on {self.image_channels}')
    return image, record

  def describe(self) -> str:
    text = f'{self.data.summary()}, patch {self.patch_size}'
    if 'unlabeled' in self.data.splits:
      text += (f"; {len(self.data.splits['unlabeled'])} more training cases unlabelled "
               f'(semi.method={self.semi_method})')
    return text

  def headline_metrics(self, metrics: Dict) -> list:
    per_class = [f'{m}_{c}' for c in self.class_names for m in PER_CLASS_HEADLINE]
    return ['dice'] + [k for k in per_class if k in metrics]

  def evaluate(self, state, split: str) -> Tuple[Dict, Dict[str, np.ndarray]]:
    """Scores every case of ``split`` on its original grid, against its original label."""
    return self.score_split(split, lambda image: self.predict_prepared(state, image))

  def score_split(self, split: str, predict_probs: Callable[[np.ndarray], np.ndarray]
                  ) -> Tuple[Dict, Dict[str, np.ndarray]]:
    """:meth:`evaluate` with any predictor: ``predict_probs`` maps a prepared image
    ``[*spatial, C]`` to class probabilities ``[*spatial, K]`` (one model's, or the mean of
    an ensemble's, :func:`ensemble_predictor`). Returns (metrics, label maps by case)."""
    per_case, predictions = {}, {}
    for case_id in self.data.splits[split]:
      record = self.data.prepared.records[case_id]
      prediction = self.label_map(case_id, predict_probs(self.cases[case_id][0]))
      ref_array, spacing = layouts.read_array(record['label'], 'label', self.num_classes,
                                              self.label_values)
      per_case[case_id] = seg_metrics.segmentation_metrics(prediction, ref_array,
                                                           self.num_classes, spacing)
      predictions[case_id] = prediction
    return summarize(per_case, self.data.class_names), predictions

  def save_predictions(self, workdir: str, split: str, predictions: Dict[str, np.ndarray]):
    if not workdir_lib.is_main():
      return
    out = os.path.join(workdir, f'predictions_{split}')
    os.makedirs(out, exist_ok=True)
    for case_id, labels in predictions.items():
      record = self.data.prepared.records[case_id]
      if self.data.prepared.spatial_dims == 3:
        reference = nifti.read_volume(record['image'], 'image')
        nifti.save_like(labels, reference, os.path.join(out, f'{case_id}.nii.gz'))
      else:
        np.save(os.path.join(out, f'{case_id}.npy'), labels)

  def run_files(self) -> Dict[str, Dict]:
    """``split.json`` (the k-fold split's train and val case ids) and
    ``data_fingerprint.json`` (the dataset's fingerprint and the preparation options)."""
    prepared = self.data.prepared
    fingerprint = {'name': self.data.name, 'root': self.config.data.root,
                   'class_names': list(self.data.class_names),
                   'cases': len(prepared.case_ids), 'spatial_dims': prepared.spatial_dims,
                   'target_spacing_mm': prepared.target_spacing, 'prepare_options':
                   prepared.options, 'summary': prepared.fingerprint,
                   'split': {k: len(v) for k, v in self.data.splits.items()}}
    if self.pseudo_info is not None:
      fingerprint['pseudo_labels'] = self.pseudo_info
    return {'split.json': self.data.splits, 'data_fingerprint.json': fingerprint}


def prepared_data_difference(a: SegmentationExperiment, b: SegmentationExperiment
                             ) -> Optional[Tuple[str, Any, Any]]:
  """(what, a's, b's) for the first of preparation options, case ids and class names in
  which two experiments differ (their predictions would not lie on one grid or mean the same
  classes), or None."""
  for what, get in (('preparation options', lambda e: e.data.prepared.options),
                    ('case ids', lambda e: e.data.prepared.case_ids),
                    ('class names', lambda e: list(e.class_names))):
    if get(a) != get(b):
      return what, get(a), get(b)
  return None


def ensemble_predictor(members: Sequence[Tuple[SegmentationExperiment, Any]]
                       ) -> Callable[[np.ndarray], np.ndarray]:
  """The mean class probabilities ``[*spatial, K]`` of several trained segmenters
  ``[(experiment, state), ...]`` for a prepared image ``[*spatial, C]``: e.g. 2D U-Nets on
  different slice axes, or seeds. The members must have prepared the same cases the same way
  (same preparation options, case ids and classes), or their probabilities would not lie on
  one grid; a mismatch is a ValueError that names the difference."""
  if not members:
    raise ValueError('an ensemble needs at least one member')
  first = members[0][0]
  for exp, _ in members[1:]:
    difference = prepared_data_difference(first, exp)
    if difference:
      what, mine, theirs = difference
      raise ValueError(f'ensemble members differ in their {what}: {mine} vs {theirs}')

  def predict_probs(image: np.ndarray) -> np.ndarray:
    total = None
    for exp, state in members:
      probs = exp.predict_prepared(state, image)
      total = probs if total is None else total + probs
    return total / len(members)

  return predict_probs


def summarize(per_case: Dict[str, Dict[int, Dict[str, float]]], class_names) -> Dict:
  """Means over cases (skipping undefined values) per class and overall, plus per-case."""
  out: Dict = {'num_cases': len(per_case)}
  classes = sorted({k for metrics in per_case.values() for k in metrics})
  dice_means = []
  for k in classes:
    for metric in seg_metrics.METRICS:
      values = np.array([per_case[c][k][metric] for c in per_case], np.float64)
      out[f'{metric}_{class_names[k]}'] = metrics_lib.mean_sd(values)[0]
      if metric == 'hd95':  # missed or spurious structures: reported, not averaged away
        out[f'hd95_failures_{class_names[k]}'] = int(np.isinf(values).sum())
      if metric == 'dice':
        dice_means.append(out[f'dice_{class_names[k]}'])
  out['dice'] = float(np.nanmean(dice_means)) if dice_means else math.nan
  out['per_case'] = {c: {class_names[k]: v for k, v in m.items()} for c, m in per_case.items()}
  return out
