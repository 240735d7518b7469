"""Published training recipes, shared by the config files that reproduce them."""

from __future__ import annotations

import os
from typing import Callable, Optional

import ml_collections

from medjax import config as config_lib

# Where the repository's real MedMNIST files live (the README of ../shared/data).
SHARED_MEDMNIST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               '..', 'shared', 'data', 'medmnist')


def medmnist_paper(flag: str, is_3d: bool, arg: str = '',
                   cpu: Optional[Callable[[ml_collections.ConfigDict], None]] = None
                   ) -> ml_collections.ConfigDict:
  """MedMNIST v2 (Yang et al. 2023) ResNet-18 (28) recipe.

  100 epochs, Adam lr 1e-3, lr x0.1 at epochs 50 and 75, batch 128 (2D) / 32 (3D), no
  augmentation, checkpoint selected by best validation AUC, evaluated on test. PyTorch's
  default layer init (``model.initializer='torch'``), as MedMNIST's own ResNets are built from
  plain ``nn.Conv2d`` / ``nn.Conv3d``: on BreastMNIST, 3 seeds, test AUC 0.902 +- 0.021 against
  0.876 +- 0.021 with He init (benchmarks/results/medmnist_resnet18_torch_init.json).

  ``arg``: '' (the recipe), 'runlocal' (a few steps on a small subset, for tests) or, where the
  dataset's config gives ``cpu`` (a function that edits :func:`medmnist_small_cnn`'s config),
  'cpu': that dataset's own recipe for a CPU, minutes per run.
  The data path defaults to ``../shared/data/medmnist/<flag>.npz`` beside the repository;
  point ``data.path`` elsewhere, or set ``data.download=True`` to fetch the official file.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(name='medmnist', flag=flag, path=os.path.normpath(SHARED_MEDMNIST))
  c.model = dict(name='resnet18', stem='medmnist', initializer='torch')
  c.optimizer = dict(name='adam', learning_rate=1e-3, schedule='multistep',
                     milestones_epochs=(50, 75), decay_factor=0.1)
  c.train = dict(num_epochs=100, batch_size=32 if is_3d else 128,
                 eval_batch_size=64 if is_3d else 256, log_every_steps=50,
                 selection_metric='auc', selection_mode='max', keep_checkpoints=1)

  def _runlocal(c: ml_collections.ConfigDict) -> None:
    # XLA's CPU 3D convolutions are slow: the 3D variant is smaller still.
    c.data.max_examples = 32 if is_3d else 64
    c.model.width = 4 if is_3d else 8
    c.optimizer.milestones_epochs = (1,)
    c.train.update(num_epochs=2, batch_size=8 if is_3d else 16,
                   eval_batch_size=16 if is_3d else 32, progress_bar=False)

  def _cpu(c: ml_collections.ConfigDict) -> None:
    small = medmnist_small_cnn(flag, is_3d)
    for section in small:  # every section replaced: nothing of the ResNet recipe is left
      c[section] = small[section]
    cpu(c)

  variants = dict(runlocal=_runlocal, **({'cpu': _cpu} if cpu else {}))
  return config_lib.apply_variant(c, arg, **variants)


def medmnist_small_cnn(flag: str, is_3d: bool = False) -> ml_collections.ConfigDict:
  """A small CNN for MedMNIST at 28 px that trains in minutes on a CPU: the base of the datasets'
  ``:cpu`` recipes and of ``configs/few_labels.py``.

  Two (3D: three) conv stages, dropout 0.3, Adam 1e-3 with weight decay 1e-4, cosine schedule
  with a one-epoch warm-up, batch 32, 30 epochs, checkpoint selected by validation AUC.
  Augmentation: 2D flips left-right, rotation +-10 degrees and scaling 0.9-1.1; 3D flips of the
  two in-plane axes (rotation and scaling are 2D-only in the pipeline).
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  augment = (dict(flip_lr=True, flip_ud=True) if is_3d else
             dict(flip_lr=True, rotation_deg=10.0, scale_min=0.9, scale_max=1.1))
  c.data = dict(name='medmnist', flag=flag, path=os.path.normpath(SHARED_MEDMNIST),
                augment=augment)
  c.model = dict(name='simple_cnn', features=(16, 32, 64) if is_3d else (32, 64), hidden=128,
                 dropout_rate=0.3)
  c.optimizer = dict(name='adam', learning_rate=1e-3, schedule='cosine', warmup_epochs=1,
                     weight_decay=1e-4)
  c.train = dict(num_epochs=30, batch_size=32, eval_batch_size=64 if is_3d else 256,
                 log_every_steps=50, selection_metric='auc', keep_checkpoints=1)
  return c
