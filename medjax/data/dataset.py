"""In-memory classification datasets: arrays per split plus what the model needs to know."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import numpy as np

SPLITS = ('train', 'val', 'test')


@dataclasses.dataclass
class ClassificationData:
  """Images and labels of every split.

  Attributes:
    name: dataset name (for logs and results).
    splits: split -> (images ``[N, *spatial, C]`` uint8 or float32, labels). Labels are int
      ``[N]`` for binary/multi-class/ordinal tasks and 0/1 ``[N, L]`` for multi-label.
    task: 'binary' | 'multiclass' | 'ordinal' | 'multilabel'.
    num_classes: classes (labels for multi-label).
    class_names: one name per class (or label).
    pixel_max: value of full intensity in ``images`` (255 for uint8 files).
  """
  name: str
  splits: Dict[str, Tuple[np.ndarray, np.ndarray]]
  task: str
  num_classes: int
  class_names: List[str]
  pixel_max: float = 255.0

  @property
  def image_shape(self) -> Tuple[int, ...]:
    """``(*spatial, C)`` of one example."""
    return tuple(self.splits['train'][0].shape[1:])

  @property
  def spatial_dims(self) -> int:
    return len(self.image_shape) - 1

  def summary(self) -> str:
    counts = ', '.join(f'{s}={len(self.splits[s][1])}' for s in SPLITS if s in self.splits)
    return (f'{self.name}: {self.task}, {self.num_classes} classes, image shape '
            f'{self.image_shape}, {counts}')

  def fingerprint(self) -> dict:
    """What identifies the data a run saw: shapes, class counts and SHA-256 of each split's
    images and labels (the same hashes mean byte-identical data)."""
    import hashlib
    out = {'name': self.name, 'task': self.task, 'class_names': list(self.class_names),
           'image_shape': list(self.image_shape), 'pixel_max': self.pixel_max, 'splits': {}}
    for split, (images, labels) in self.splits.items():
      labels = np.asarray(labels)
      entry = {'examples': int(len(labels)),
               'images_sha256': hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest(),
               'labels_sha256': hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest()}
      if labels.ndim == 1 or labels.shape[1:] == (1,):
        values = labels.reshape(-1).astype(np.int64)
        entry['class_counts'] = np.bincount(values, minlength=self.num_classes).tolist()
      else:
        entry['label_counts'] = labels.sum(axis=0).astype(int).tolist()
      out['splits'][split] = entry
    return out

  def validate(self, source: str) -> None:
    """Raises ValueError naming ``source`` for empty splits, bad labels or non-finite pixels."""
    for split in SPLITS:
      if split not in self.splits:
        raise ValueError(f"{source}: missing split '{split}'")
      images, labels = self.splits[split]
      if len(images) == 0:
        raise ValueError(f"{source}: split '{split}' is empty")
      if len(images) != len(labels):
        raise ValueError(f"{source}: split '{split}' has {len(images)} images but "
                         f'{len(labels)} labels')
      if images.shape[1:] != self.image_shape:
        raise ValueError(f"{source}: split '{split}' images have shape {images.shape[1:]}, "
                         f"train has {self.image_shape}")
      if np.issubdtype(images.dtype, np.floating) and not np.all(np.isfinite(images)):
        raise ValueError(f"{source}: split '{split}' contains NaN or infinite pixel values")
      if self.task == 'multilabel':
        if labels.ndim != 2 or labels.shape[1] != self.num_classes:
          raise ValueError(f"{source}: split '{split}' multi-label labels must be "
                           f'[N, {self.num_classes}], got {labels.shape}')
        bad = ~np.isin(labels, (0, 1))
      else:
        if labels.ndim != 1:
          raise ValueError(f"{source}: split '{split}' labels must be [N], got {labels.shape}")
        bad = (labels < 0) | (labels >= self.num_classes)
      if np.any(bad):
        raise ValueError(f"{source}: split '{split}' has {int(bad.sum())} labels outside "
                         f'[0, {self.num_classes - 1}] (e.g. {labels[bad].reshape(-1)[0]})')

  def take(self, max_examples: int) -> 'ClassificationData':
    """The first ``max_examples`` of every split (all if 0)."""
    if not max_examples:
      return self
    splits = {k: (x[:max_examples], y[:max_examples]) for k, (x, y) in self.splits.items()}
    return dataclasses.replace(self, splits=splits)
