"""Detection training data: objects as instances of prepared label maps, patches with their
boxes padded to a fixed count.

An object is a connected component of one class in a prepared label map (nnDetection's rule;
LUNA16-format data becomes such maps first, a sphere per nodule). Patches are drawn, augmented
and cropped exactly as segmentation's (:class:`medjax.data.sampling.SegmentationSampler`) but
from the *instance* map, and the boxes are taken from the augmented instance patch: every
geometric step (crop, flips, rotation, scaling) moves the boxes exactly as it moves the mask.
An object cut by the patch border keeps the box of its visible part.

A training sample's targets: ``boxes [M, 2 nd]`` float32 (:mod:`medjax.detection` 's
convention), ``classes [M]`` int32 (0..K-1), ``valid [M]`` bool, ``seg [*patch]`` int32
class map (0 background) for the auxiliary segmentation, ``M = data.max_boxes``.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterator, Sequence, Tuple

import ml_collections
import numpy as np
from scipy import ndimage

from medjax import config as config_lib
from medjax.data.sampling import SegmentationSampler

TARGET_KEYS = ('boxes', 'classes', 'valid', 'seg')


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  # Detection: boxes per training patch (more are dropped, smallest first; a warning says
  # how often when training starts).
  config_lib.section(c, 'data').max_boxes = 16


def instance_map(label: np.ndarray, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
  """(instances ``[*spatial]`` int32 with 0 background and 1..n objects, ``classes [n]``
  int32 0..K-1) of a class map ``[*spatial]`` (class k >= 1 is object class k - 1): each
  connected component of a class (face, edge and corner neighbours) is one object."""
  label = np.asarray(label)
  instances = np.zeros(label.shape, np.int32)
  classes = []
  structure = np.ones((3,) * label.ndim, bool)
  for k in range(1, num_classes):
    components, count = ndimage.label(label == k, structure=structure)
    inside = components > 0
    instances[inside] = components[inside] + len(classes)
    classes.extend([k - 1] * count)
  return instances, np.asarray(classes, np.int32)


def cached_instances(prepared, case_id: str, num_classes: int
                     ) -> Tuple[np.ndarray, np.ndarray, Dict[str, np.ndarray]]:
  """(instances ``[*spatial]`` uint16, memory-mapped; object classes ``[n]``; the objects'
  ``boxes`` and ``classes``) of a prepared case, computed once into
  ``<prepared entry>-instances/`` beside the (never modified) preparation cache entry, so a
  large dataset is not held in memory."""
  folder = prepared.directory.rstrip(os.sep) + '-instances'
  base = os.path.join(folder, case_id)
  if not os.path.isfile(base + '.json'):
    os.makedirs(folder, exist_ok=True)
    _, label, _ = prepared.load(case_id)
    instances, classes = instance_map(label, num_classes)
    if len(classes) > np.iinfo(np.uint16).max:
      raise ValueError(f'{case_id}: {len(classes)} objects, more than a uint16 instance map holds')
    boxes, box_classes, _ = instance_boxes(instances, classes)
    tmp = f'{base}.tmp-{os.getpid()}'
    np.save(tmp + '.npy', instances.astype(np.uint16))
    os.replace(tmp + '.npy', base + '.npy')
    with open(tmp, 'w') as f:  # written last: a case with its .json is complete
      json.dump({'classes': classes.tolist(), 'boxes': boxes.tolist(),
                 'box_classes': box_classes.tolist()}, f)
    os.replace(tmp, base + '.json')
  with open(base + '.json') as f:
    meta = json.load(f)
  nd = len(prepared.records[case_id]['shape'])
  objects = {'boxes': np.asarray(meta['boxes'], np.float32).reshape(-1, 2 * nd),
             'classes': np.asarray(meta['box_classes'], np.int32)}
  return (np.load(base + '.npy', mmap_mode='r'), np.asarray(meta['classes'], np.int32),
          objects)


def instance_boxes(instances: np.ndarray, classes: np.ndarray
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(boxes ``[n, 2 nd]`` float32, classes ``[n]``, instance ids ``[n]``) of the objects
  present in an instance map (ids absent from it, e.g. cropped away, are skipped)."""
  nd = instances.ndim
  boxes, kept, ids = [], [], []
  for i, region in enumerate(ndimage.find_objects(instances), start=1):
    if region is None:
      continue
    boxes.append([s.start for s in region] + [s.stop for s in region])
    kept.append(classes[i - 1])
    ids.append(i)
  return (np.asarray(boxes, np.float32).reshape(-1, 2 * nd), np.asarray(kept, np.int32),
          np.asarray(ids, np.int32))


def padded_targets(boxes: np.ndarray, classes: np.ndarray, max_boxes: int
                   ) -> Dict[str, np.ndarray]:
  """``boxes``, ``classes``, ``valid`` padded (or cut, largest boxes kept) to ``max_boxes``."""
  nd = boxes.shape[1] // 2
  if len(boxes) > max_boxes:
    volume = np.prod(boxes[:, nd:] - boxes[:, :nd], axis=1)
    keep = np.sort(np.argsort(-volume, kind='stable')[:max_boxes])
    boxes, classes = boxes[keep], classes[keep]
  out_boxes = np.zeros((max_boxes, 2 * nd), np.float32)
  out_classes = np.zeros(max_boxes, np.int32)
  valid = np.zeros(max_boxes, bool)
  out_boxes[:len(boxes)] = boxes
  out_classes[:len(boxes)] = classes
  valid[:len(boxes)] = True
  return {'boxes': out_boxes, 'classes': out_classes, 'valid': valid}


class DetectionSampler:
  """Training samples ``(step, j)`` with their box targets, deterministically (the
  segmentation sampler's contract: a pure function of seed, step and position).

  Args:
    cases: case id -> (image ``[*spatial, C]``, instances ``[*spatial]``, class locations).
    instance_classes: case id -> object classes ``[n]`` (instance i has class
      ``instance_classes[i - 1]``).
    max_boxes: ``M``.
    Other arguments: :class:`medjax.data.sampling.SegmentationSampler`'s.
  """

  def __init__(self, cases: Dict[str, Tuple[np.ndarray, np.ndarray, Dict]],
               instance_classes: Dict[str, np.ndarray], patch_size: Sequence[int],
               global_batch: int, seed: int, max_boxes: int, **sampler_options):
    self.patches = SegmentationSampler(cases, patch_size, global_batch, seed,
                                       **sampler_options)
    self.instance_classes = instance_classes
    self.max_boxes = max_boxes
    self.patch_size = self.patches.patch_size
    self.global_batch = global_batch
    self.channels = next(iter(cases.values()))[0].shape[-1]

  def __call__(self, step: int, j: int) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    image, instances = self.patches(step, j)
    classes = self.instance_classes[self.patches.case_for(step, j)]
    boxes, box_classes, _ = instance_boxes(instances, classes)
    targets = padded_targets(boxes, box_classes, self.max_boxes)
    lookup = np.concatenate([[0], classes + 1]).astype(np.int32)
    targets['seg'] = lookup[instances]
    return image.astype(np.float32), targets

  def batches(self, start_step: int, num_steps: int, process_index: int = 0,
              process_count: int = 1) -> Iterator[Tuple[np.ndarray, Dict[str, np.ndarray]]]:
    """This process's rows of steps ``[start_step, num_steps)`` through tf.data (parallel
    calls, in order)."""
    import tensorflow as tf
    from medjax.data.pipeline import local_rows, numpy_batches
    rows = local_rows(self.global_batch, process_index, process_count)
    steps = np.arange(start_step, num_steps)
    js = np.arange(rows.start, rows.stop)
    pairs = np.stack(np.meshgrid(steps, js, indexing='ij'), -1).reshape(-1, 2).astype(np.int64)
    nd = len(self.patch_size)

    def fn(pair):
      image, t = self(int(pair[0]), int(pair[1]))
      return image, t['boxes'], t['classes'], t['valid'], t['seg']

    def load(pair):
      out = tf.numpy_function(fn, [pair], (tf.float32, tf.float32, tf.int32, tf.bool, tf.int32))
      shapes = (self.patch_size + (self.channels,), (self.max_boxes, 2 * nd),
                (self.max_boxes,), (self.max_boxes,), self.patch_size)
      for tensor, shape in zip(out, shapes):
        tensor.set_shape(shape)
      return out[0], dict(zip(TARGET_KEYS, out[1:]))

    ds = tf.data.Dataset.from_tensor_slices(pairs)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(rows.stop - rows.start, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return numpy_batches(ds)
