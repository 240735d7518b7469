"""Detection experiments (``task='detection'``): objects found as boxes in 2D images and 3D
volumes by a Retina U-Net, trained on the seam every task shares.

* data: ``data.root`` (a segmentation layout: each connected component of a class in a label
  map is one object, nnDetection's rule) prepared once as segmentation's
  (:mod:`medjax.data.prepare`: RAS, resampling, crop, normalisation), split by the seeded
  k-fold; or, with ``data.root`` unset and ``data.synthetic_cases > 0``, the embedded 2D
  lesions (:mod:`medjax.data.synthetic_detection`);
* anchors: planned from the training boxes (:mod:`medjax.detection.anchors`), shown in
  ``anchors.json`` and the fingerprint; matched by ATSS in the step;
* loss: focal or BCE with hard-negative mining, GIoU, auxiliary Dice + CE
  (:mod:`medjax.detection.det_losses`);
* evaluation: whole images by sliding window, boxes merged across windows and mirrors
  (:mod:`medjax.detection.det_inference`), scored on the prepared grid against each case's
  objects: COCO-style mAP over IoU 0.1:0.5 (``map``, ``ap_0.1``, ``ap_0.5``) and FROC / CPM
  (a hit: the detection's centre inside the ellipsoid inscribed in the object's box).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medjax import config as config_lib, workdir as workdir_lib
from medjax.data import detection_data, prepare, synthetic_detection
from medjax.data.sampling import SegAugment, auto_patch_size
from medjax.data import layouts
from medjax.detection import anchors as anchors_lib, det_inference, det_losses, det_metrics
from medjax.detection import det_outputs, det_plots, froc
from medjax.experiments.base import Experiment
from medjax.models.retina_unet import RetinaUNet, head_strides


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  d = config_lib.section(c, 'data')
  # Detection without data.root: this many embedded synthetic 2D cases (size x size px).
  d.synthetic_cases = 0
  d.synthetic_size = 64


class DetectionData:
  """A detection dataset: prepared cases, their objects (instance maps and classes)."""

  def __init__(self, name: str, prepared, split, class_names):
    self.name, self.prepared, self.splits, self.class_names = name, prepared, split, class_names
    self.cases, self.instance_classes, self.objects = {}, {}, {}
    for case_id in prepared.case_ids:
      image, _, locations = prepared.load(case_id)
      instances, classes, objects = detection_data.cached_instances(prepared, case_id,
                                                                    len(class_names) + 1)
      self.cases[case_id] = (image, instances, locations)
      self.instance_classes[case_id] = classes
      self.objects[case_id] = objects

  def box_sizes(self, split: str) -> np.ndarray:
    """Sizes ``[n, nd]`` (voxels on the prepared grid) of every object of a split."""
    boxes = [self.objects[c]['boxes'] for c in self.splits[split]]
    boxes = np.concatenate(boxes) if boxes else np.zeros((0, 2))
    nd = boxes.shape[1] // 2
    return boxes[:, nd:] - boxes[:, :nd]


def _model_option(config, name: str):
  """``config.model.<name>``, or Retina U-Net's default."""
  return config.model.get(name, RetinaUNet.__dataclass_fields__[name].default)


class DetectionExperiment(Experiment):
  """A detection config bound to its prepared data, anchors, model and compiled steps."""

  task = 'detection'
  eval_splits = ('val',)
  available_splits = ('train', 'val')

  def __init__(self, config: ml_collections.ConfigDict, training: bool = True):
    super().__init__(config)
    cfg = config.data
    if config.loss.name not in det_losses.DETECTION_LOSSES:
      raise ValueError(f"loss.name='{config.loss.name}' for detection; expected one of "
                       f"{', '.join(det_losses.DETECTION_LOSSES)}")
    root = cfg.root
    cache = cfg.cache_dir or os.path.join(os.path.expanduser('~'), '.cache', 'medjax')
    self.luna_root = root if root and det_outputs.is_luna_layout(root) else ''
    if self.luna_root:  # imagesTr/ + annotations.csv: a sphere label map per scan, once
      root = det_outputs.luna_as_labelled(root, cache)
      self.luna_annotations = froc.read_luna_csv(
          os.path.join(self.luna_root, 'annotations.csv'), 'diameter_mm')
    if not root:
      if cfg.synthetic_cases <= 0:
        raise ValueError('task=detection needs data.root (a folder of images and label maps, '
                         'or an MSD folder) or data.synthetic_cases > 0')
      root = synthetic_detection.write_detection_dataset(
          os.path.join(cache, f'synthetic_detection_v{synthetic_detection.VERSION}_'
                       f'{cfg.synthetic_cases}_{cfg.synthetic_size}'),
          cfg.synthetic_cases, 0, cfg.synthetic_size)
    prepared = prepare.prepare(root, cache, prepare.options_from_config(cfg), cfg.max_cases)
    split = prepare.kfold_split(prepared.case_ids, cfg.num_folds, cfg.fold, cfg.split_seed)
    names = (list(cfg.class_names) or (synthetic_detection.CLASS_NAMES[1:] if not cfg.root
                                       else ['nodule'] if self.luna_root
                                       else prepared.class_names[1:]))
    if len(names) != len(prepared.class_names) - 1:
      raise ValueError(f'data.class_names has {len(names)} names but the labels have '
                       f'{len(prepared.class_names) - 1} foreground classes')
    self.data = DetectionData(os.path.basename(os.path.normpath(root)), prepared, split, names)
    self.dataset_name, self.class_names = self.data.name, names
    self.num_classes = len(names)
    strides = _model_option(config, 'strides')
    self.total_stride = int(np.prod(strides))
    self.patch_size = (tuple(int(p) for p in cfg.patch_size) if len(cfg.patch_size)
                       and len(cfg.patch_size) == prepared.spatial_dims
                       else auto_patch_size(prepared, None, self.total_stride))
    self.strides = head_strides(strides, _model_option(config, 'head_levels'))
    sizes = self.data.box_sizes('train')
    self.anchor_sizes = anchors_lib.plan_anchor_sizes(sizes, self.strides,
                                                      _model_option(config, 'num_anchors'))
    self.anchor_plan = anchors_lib.describe(self.anchor_sizes, self.strides, sizes)
    self.anchors, self.level_counts = anchors_lib.all_anchors(self.patch_size, self.strides,
                                                              self.anchor_sizes)
    self.image_channels = next(iter(self.data.cases.values()))[0].shape[-1]
    if cfg.host_workers or cfg.augment_on != 'host':
      raise ValueError('detection samples on the host in this process: use data.host_workers=0 '
                       'and data.augment_on=host')
    self.sampler = detection_data.DetectionSampler(
        {c: self.data.cases[c] for c in split['train']},
        {c: self.data.instance_classes[c] for c in split['train']}, self.patch_size,
        config.train.batch_size, config.seed, cfg.max_boxes,
        foreground_fraction=cfg.foreground_fraction,
        augment=SegAugment(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                              for k, v in cfg.seg_augment.to_dict().items()}))
    steps = config.train.steps_per_epoch or math.ceil(len(split['train']) /
                                                      config.train.batch_size)
    self.setup(num_outputs=self.num_classes, input_shape=self.patch_size + (self.image_channels,),
               steps_per_epoch=steps)
    max_out = int(config.detection.max_per_window)
    anchors = jnp.asarray(self.anchors)
    self._windows = jax.jit(lambda v, x: det_inference.window_detections(
        self.model.apply(v, x, train=False), anchors, max_out))

  # ----- training ----------------------------------------------------------------------
  def loss(self, outputs, labels) -> jax.Array:
    return det_losses.detection_loss(outputs, labels, jnp.asarray(self.anchors),
                                     self.level_counts, self.config.loss)

  def train_iterator(self, start_step: int):
    return self.sampler.batches(start_step, self.total_steps, jax.process_index(),
                                jax.process_count())

  def describe(self) -> str:
    f = self.data.prepared.fingerprint
    return (f'{self.data.name}: detection, {self.num_classes} classes '
            f"({', '.join(self.class_names)}), {len(self.data.splits['train'])} train / "
            f"{len(self.data.splits['val'])} val cases, median shape {f.get('shape_median')}, "
            f'patch {self.patch_size}, anchors (voxels) per level '
            f"{[np.round(np.asarray(s, np.float64), 1).tolist() for s in self.anchor_sizes]} "
            f"(best-anchor IoU median "
            f"{self.anchor_plan['best_anchor_iou_median']})")

  # ----- evaluation --------------------------------------------------------------------
  def detect_prepared(self, state, image: np.ndarray) -> Dict[str, np.ndarray]:
    """Detections (boxes on the prepared grid, scores, classes) of a prepared image."""
    variables = self.variables(state)
    return det_inference.detect_image(
        lambda w: self._windows(variables, w), np.asarray(image, np.float32), self.patch_size,
        self.config.train.eval_batch_size, self.config.inference.overlap,
        tuple(self.config.inference.mirror_axes), self.config.detection)

  def evaluate(self, state, split: str) -> Tuple[Dict[str, Any], Dict[str, Dict]]:
    cases = self.data.splits[split]
    predictions = {c: self.detect_prepared(state, self.data.cases[c][0]) for c in cases}
    truth = {c: self.data.objects[c] for c in cases}
    metrics = det_metrics.mean_average_precision(predictions, truth, self.num_classes)
    if self.luna_root:  # LUNA16's own rule: centres within the radius, in world mm
      found = []
      for c in cases:
        rec = det_outputs.case_record(predictions[c], self.data.prepared.records[c],
                                      self.class_names)
        found += [(c, *d['centre_lps_mm'], d['score']) for d in rec['detections']]
      scores = froc.froc_world(found, self.luna_annotations, cases)
    else:
      scores = det_metrics.froc_boxes(predictions, truth, hit='ellipsoid')
    metrics.update({k: v for k, v in scores.items() if isinstance(v, (int, float))})
    return metrics, predictions

  def headline_metrics(self, metrics: Dict[str, Any]) -> list:
    keys = ['map', 'ap_0.1', 'ap_0.5', 'cpm']
    return [k for k in keys if k in metrics]

  def save_predictions(self, workdir: str, split: str, predictions: Dict[str, Dict]) -> None:
    """``predictions_<split>.json``: per case its image file, the objects' boxes
    (``truth_voxel``) and the detections' (``boxes_voxel``) on the file's voxel grid, the
    detections' boxes on the prepared grid, scores and class names."""
    if not workdir_lib.is_main():
      return
    out = {}
    for case_id, found in predictions.items():
      record = self.data.prepared.records[case_id]
      truth = self.data.objects[case_id]
      out[case_id] = {
          'image': record['image'],
          'truth_voxel': np.round(det_inference.prepared_to_original(truth['boxes'], record),
                                  3).tolist(),
          'truth_classes': [self.class_names[k] for k in truth['classes']],
          'boxes_prepared': np.round(found['boxes'], 3).tolist(),
          'boxes_voxel': np.round(det_inference.prepared_to_original(found['boxes'], record),
                                  3).tolist(),
          'scores': np.round(found['scores'], 5).tolist(),
          'classes': [self.class_names[k] for k in found['classes']]}
    workdir_lib.write_json(os.path.join(workdir, f'predictions_{split}.json'), out)

  def evaluation_options(self) -> Dict[str, Any]:
    return {'mirror_axes': tuple(self.config.inference.mirror_axes)}

  def set_evaluation_options(self, mirror_axes=None) -> None:
    if mirror_axes is not None:
      self.config.inference.mirror_axes = tuple(int(a) for a in mirror_axes)

  def input_suffixes(self):
    return (layouts.NIFTI_SUFFIXES if self.data.prepared.spatial_dims == 3
            else layouts.IMAGE_SUFFIXES)

  def predict_files(self, members, files, output_dir: str) -> list:
    """Detections of new files (:mod:`medjax.detection.det_outputs`): each prepared as the
    training cases were, detected by sliding window by every member, the members' boxes
    merged (``detection.merge``), mapped back to the file's voxels and world."""
    prepared = self.data.prepared
    records, shapes = {}, {}
    for path in files:
      image, record = prepare.prepare_image(path, prepared.resolved_options(),
                                            prepared.target_spacing)
      found = [exp.detect_prepared(state, image) for exp, state in members]
      found = det_inference.merge({k: np.concatenate([f[k] for f in found]) for k in found[0]},
                                  self.config.detection) if len(found) > 1 else found[0]
      name = layouts.strip_suffix(os.path.basename(path))
      records[name] = det_outputs.case_record(found, record, self.class_names)
      shapes[name] = record['original_shape']
    return det_outputs.write_predictions(records, shapes, self.class_names, output_dir,
                                         self.config.detection.coco_score_threshold)

  @classmethod
  def run_figures(cls, workdir: str, config: Dict, results: Dict, out_dir: str,
                  splits) -> Dict[str, str]:
    return det_plots.detection_figures(workdir, results, out_dir)

  def run_files(self) -> Dict[str, Any]:
    """``split.json``, ``anchors.json`` (the anchor plan) and ``data_fingerprint.json``."""
    prepared = self.data.prepared
    counts = {name: int(sum(int(np.sum(self.data.objects[c]['classes'] == k))
                            for c in prepared.case_ids))
              for k, name in enumerate(self.class_names)}
    fingerprint = {'name': self.data.name, 'root': self.config.data.root,
                   'class_names': list(self.class_names), 'cases': len(prepared.case_ids),
                   'spatial_dims': prepared.spatial_dims, 'objects_per_class': counts,
                   'target_spacing_mm': prepared.target_spacing,
                   'prepare_options': prepared.options, 'summary': prepared.fingerprint,
                   'patch_size': list(self.patch_size), 'anchors': self.anchor_plan,
                   'split': {k: len(v) for k, v in self.data.splits.items()}}
    return {'split.json': self.data.splits, 'anchors.json': self.anchor_plan,
            'data_fingerprint.json': json.loads(json.dumps(fingerprint, default=list))}
