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
* loss: Dice + CE (or Dice, or CE), deep supervision (weights 1/2^i, normalised);
* evaluation: every case of the split by sliding window, mapped back onto the original file's
  grid, scored there against the original label file (Dice, IoU, sensitivity, precision,
  HD95 and ASSD in mm); ``dice`` (mean over classes and cases) selects the checkpoint.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np

from medjax import config as config_lib, files as files_lib, inference
from medjax import plots, seg_losses, seg_metrics, semi
from medjax import workdir as workdir_lib
from medjax.data import few_labels, layouts, nifti, prepare
from medjax.data.sampling import SegAugment, SegmentationSampler, auto_patch_size, slice_stack
from medjax.experiments.augment_on import DeviceAugmented, segmentation_augment
from medjax.experiments.base import Experiment
from medjax.models.unet import total_stride


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  # Other keys: prepare.py, sampling.py, inference.py, seg_losses.py, augment_on.py.
  d = config_lib.section(c, 'data')
  d.root = ''                    # MSD folder (dataset.json) or image/label folders
  d.cache_dir = ''               # prepared cases; '' = ~/.cache/medjax
  d.class_names = ()             # names of the classes; () = from dataset.json or '0', '1'..
  d.num_folds = 5
  d.fold = 0
  d.split_seed = 0               # the k-fold split does not change with c.seed
  d.max_cases = 0                # 0 = all


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


class SegmentationExperiment(DeviceAugmented, Experiment):
  """A segmentation config bound to its prepared data, model and compiled steps."""

  task = 'segmentation'
  eval_splits = ('val',)
  available_splits = ('train', 'val')
  label_maps = True  # targets are label maps [B, *spatial] (medjax/semi/base.py)

  def __init__(self, config: ml_collections.ConfigDict, training: bool = True):
    super().__init__(config)
    cfg = config.data
    if not cfg.root:
      raise ValueError('task=segmentation needs data.root (an MSD folder with dataset.json, '
                       'or a folder of image/label pairs)')
    if config.loss.name not in seg_losses.SEG_LOSSES:
      raise ValueError(f"unknown loss.name '{config.loss.name}' for segmentation; expected "
                       f"one of {', '.join(seg_losses.SEG_LOSSES)}")
    cache = cfg.cache_dir or os.path.join(os.path.expanduser('~'), '.cache', 'medjax')
    prepared = prepare.prepare(cfg.root, cache, prepare.options_from_config(cfg), cfg.max_cases)
    split = prepare.kfold_split(prepared.case_ids, cfg.num_folds, cfg.fold, cfg.split_seed)
    epoch_cases = len(split['train'])
    # Few labels: the labels of the other training cases are never read (their sampler gets
    # all-zero label arrays), and split.json lists them as 'unlabeled'.
    few = few_labels.split_case_ids(split['train'], cfg, config.seed)
    if few is not None:
      split = {'train': few[0], 'unlabeled': few[1], 'val': split['val']}
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
    self.ignore_label = None  # voxels with this label count in no loss (self-training's unsure)
    self.method = semi.make_method(self, few is not None)
    self.slice_axis = None if cfg.slice_axis < 0 else cfg.slice_axis
    self.total_stride = total_stride(config.model)
    self.patch_size = (tuple(int(p) for p in cfg.patch_size) if len(cfg.patch_size)
                       else auto_patch_size(prepared, self.slice_axis, self.total_stride))
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
    self.training_cases = {c: self.cases[c] for c in split['train']}
    if training or self.method.needed_for_inference():
      self.method.prepare()  # self-training: the teacher's label maps join the cases
    self.sampler = SegmentationSampler(
        self.training_cases, self.patch_size, config.train.batch_size,
        seed=config.seed, foreground_fraction=cfg.foreground_fraction,
        augment=SegAugment(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                              for k, v in cfg.seg_augment.to_dict().items()}),
        slice_axis=self.slice_axis, skip_empty_slices=cfg.skip_empty_slices,
        slice_context=self.slice_context, host_workers=cfg.host_workers, augment_on=cfg.augment_on)
    self.device_augment = segmentation_augment(self)  # data.augment_on=device: in the step
    steps = config.train.steps_per_epoch or math.ceil(epoch_cases / config.train.batch_size)
    self.setup(num_outputs=self.num_classes, input_shape=self.patch_size + (channels,),
               steps_per_epoch=steps)
    self._predict = jax.jit(self.softmax_outputs)

  # ----- what a semi-supervised method uses (medjax/semi/base.py) ----------------------
  def unlabeled_patches(self, start_step: int):
    """Each step's ``(patches,)`` of ``semi.unlabeled_ratio`` x batch unlabelled cases (this
    process's rows): their own stream (seed + 2**31), anywhere in the case, with the
    labelled patches' augmentation. The sampler gets all-zero label arrays: the labels of
    unlabelled cases are never read."""
    unlabeled = {c: (self.cases[c][0], np.zeros(self.cases[c][0].shape[:-1],
                                                 self.cases[c][1].dtype), {})
                 for c in self.data.splits['unlabeled']}
    sampler = SegmentationSampler(
        unlabeled, self.patch_size,
        self.config.train.batch_size * self.config.semi.unlabeled_ratio,
        seed=self.config.seed + 2**31, foreground_fraction=0.0,
        **self.sampler.shared_options())
    return ((patches,) for patches, _ in sampler.batches(
        start_step, self.total_steps, jax.process_index(), jax.process_count()))

  def teacher_difference(self, teacher: 'SegmentationExperiment') -> str:
    """Why another run cannot teach this one ('' when it can): it must have prepared the same
    data and classes, kept the same validation cases and trained on labelled cases of this
    run only, so no held-out label and no label of an unlabelled case reaches this run."""
    difference = prepared_data_difference(self, teacher)
    if difference is None and sorted(self.data.splits['val']) != sorted(
        teacher.data.splits['val']):
      difference = ('validation cases',)
    if difference:
      return f"its {difference[0]} differ from this run's"
    leaked = sorted(set(teacher.data.splits['train']) - set(self.data.splits['train']))
    if leaked:
      return (f'it trained on {len(leaked)} case(s) that are not labelled in this run (e.g. '
              f'{leaked[0]}): its pseudo-labels would carry their labels. Train the teacher '
              'with the same data.labeled_* settings')
    return ''

  def loss(self, outputs, labels) -> jax.Array:
    """Dice/CE-family loss of logits ``[B, *spatial, K]`` (or a list, deep supervision:
    weights 1/2^i, normalised) against labels ``[B, *spatial]``."""
    return self.supervised_loss(outputs, labels, self.ignore_label)

  def supervised_loss(self, outputs, labels, ignore_label: Optional[int] = None
                      ) -> jax.Array:
    """The configured loss (``loss.*``, deep supervision); voxels labelled ``ignore_label``
    count in none of its terms."""
    return seg_losses.configured_loss(outputs, labels, self.config.loss, ignore_label)

  def train_iterator(self, start_step: int):
    batches = self.sampler.batches(start_step, self.total_steps, jax.process_index(),
                                   jax.process_count())
    return self.method.batches(batches, start_step)

  # ----- inference ---------------------------------------------------------------------
  def predict_prepared(self, state, image: np.ndarray) -> np.ndarray:
    """Class probabilities ``[*spatial, K]`` of a prepared image ``[*spatial, C]``."""
    batch = self.config.train.eval_batch_size
    variables = self.variables(state)
    predict = inference.fixed_batches(lambda w: self._predict(variables, w), batch)
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
               f'(semi.method={self.method.name})')
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
    return seg_metrics.summarize_cases(per_case, self.data.class_names), predictions

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

  # ----- evaluation options, ensembles, files, figures -----------------------------------
  def evaluation_options(self) -> Dict[str, Any]:
    return {'mirror_axes': tuple(self.config.inference.mirror_axes)}

  def set_evaluation_options(self, mirror_axes: Optional[Sequence[int]] = None) -> None:
    """Test-time mirroring for this evaluation only (``inference.mirror_axes``: the spatial
    axes of the network's input, i.e. of the slice for a 2D model on volumes)."""
    if mirror_axes is not None:
      self.config.inference.mirror_axes = tuple(int(a) for a in mirror_axes)

  def score_ensemble(self, members, split: str):
    """The mean class probabilities of several segmenters, scored case by case on the
    original grid of ``split`` of this run's data. The members must share the data
    preparation and the split (no member may be scored on a case it trained on)."""
    for k, (exp, _) in enumerate(members):
      if exp.data.splits != self.data.splits:
        raise ValueError(f"member {k + 1}: its split differs from this run's (another fold or "
                         'data.split_seed); it would be scored on cases it trained on')
    return self.score_split(split, ensemble_predictor(members))

  def input_suffixes(self):
    return (layouts.NIFTI_SUFFIXES if self.data.prepared.spatial_dims == 3
            else layouts.IMAGE_SUFFIXES)

  def predict_files(self, members, input_path_files, output_dir: str) -> list:
    """Label maps for new scans, as NIfTI with exactly each input's affine, shape and axes:
    each prepared as the training cases were, predicted by sliding window (the members'
    mean probabilities), and mapped back onto its own grid."""
    if self.data.prepared.spatial_dims != 3:
      raise ValueError('predict writes NIfTI and needs a model trained on NIfTI volumes')
    predict_probs = ensemble_predictor(members)
    written = []
    for path in input_path_files:
      _, record, labels = files_lib.segment_file(self, predict_probs, path)
      labels = prepare.restore_original_grid(labels, record)
      target = os.path.join(output_dir, layouts.strip_suffix(os.path.basename(path)) + '.nii.gz')
      nifti.save_like(labels, nifti.read_volume(path, 'image'), target)
      written.append(target)
    return written

  def explain_files(self, state, files, output_dir: str, layer: str, target_class=None,
                    **unused) -> list:
    """Grad-CAM of each predicted region (``target_class``, or every foreground class)."""
    target = files_lib.class_index(target_class, self.class_names)
    return [files_lib.explain_segmentation_file(self, state, path, output_dir, layer, target)
            for path in files]

  @classmethod
  def run_figures(cls, workdir: str, config: Dict, results: Dict, out_dir: str,
                  splits) -> Dict[str, str]:
    return plots.segmentation_case_plots(workdir, config, results, out_dir)

  @classmethod
  def report_tables(cls, results: Dict) -> list:
    """Per split: one row per foreground class (Dice, IoU, ..., distances in mm)."""
    tables = []
    for split in ('val', 'test'):
      metrics = results.get(split)
      if not isinstance(metrics, dict):
        continue
      rows = seg_metrics.class_rows(metrics, results.get('class_names', [])[1:])
      tables.append((f"{split}: {metrics.get('num_cases', '?')} cases, mean foreground Dice",
                     metrics.get('dice', math.nan), rows))
    return tables

  @classmethod
  def run_labels(cls, config: Dict) -> Dict[str, Any]:
    return {'fold': config['data']['fold']}

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
    fingerprint.update(self.method.fingerprint())
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

  return inference.mean_predictor([functools.partial(exp.predict_prepared, state)
                                   for exp, state in members])
