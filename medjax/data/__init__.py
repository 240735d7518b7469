"""Datasets and input pipelines."""

from __future__ import annotations

import ml_collections

from medjax.data import medmnist, synthetic
from medjax.data.dataset import SPLITS, ClassificationData


def load_data(config: ml_collections.ConfigDict) -> ClassificationData:
  """The dataset named by ``config.data.name`` ('synthetic' or 'medmnist')."""
  cfg = config.data
  if cfg.name == 'synthetic':
    s = cfg.synthetic
    data = synthetic.load(seed=s.seed, image_size=s.image_size, num_train=s.num_train,
                          num_val=s.num_val, num_test=s.num_test, num_classes=s.num_classes)
  elif cfg.name == 'medmnist':
    if not cfg.path and not cfg.flag:
      raise ValueError('data.name=medmnist needs data.path (an .npz file or a directory) '
                       'or data.flag')
    path = medmnist.resolve_path(cfg.path, cfg.flag, cfg.download)
    # A file given as data.path names its own dataset (pathmnist_64.npz -> pathmnist);
    # data.flag only finds the file inside a directory.
    data = medmnist.load(path, '' if cfg.path.endswith('.npz') else cfg.flag)
  else:
    raise ValueError(f"unknown data.name '{cfg.name}'; expected 'synthetic' or 'medmnist'")
  return data.take(cfg.max_examples)


__all__ = ['SPLITS', 'ClassificationData', 'load_data']
