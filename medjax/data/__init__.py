"""Datasets and input pipelines."""

from __future__ import annotations

import ml_collections

from medjax import config as config_lib
from medjax.data import medmnist, synthetic
from medjax.data.dataset import SPLITS, ClassificationData


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  d = config_lib.section(c, 'data')
  # 'synthetic' (embedded, generated from data.synthetic.seed) or 'medmnist' (npz file).
  d.name = 'synthetic'
  # medmnist: path to the .npz file, or a directory holding '<flag>.npz'.
  d.path = ''
  # medmnist: dataset flag ('breastmnist', 'pathmnist_64', ...) naming <flag>.npz inside a
  # data.path directory. When data.path is an .npz file, the file name decides instead.
  d.flag = ''
  # medmnist: download the official file (28 px, MD5-checked) if it is not at data.path.
  d.download = False
  # Intensity scaling: x -> (x / 255 - mean) / std, as MedMNIST's reference pipeline.
  d.mean = 0.5
  d.std = 0.5
  # Class-balanced sampling: each epoch draws examples so every class is equally frequent.
  d.class_balanced = False
  # Use only the first N examples of each split (0 = all); for quick tests.
  d.max_examples = 0
  d.synthetic = ml_collections.ConfigDict()
  d.synthetic.seed = 1234
  d.synthetic.image_size = 32
  d.synthetic.num_train = 2000
  d.synthetic.num_val = 400
  d.synthetic.num_test = 400
  # 3 = normal / benign / malignant; 2 = normal+benign / malignant.
  d.synthetic.num_classes = 3


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
