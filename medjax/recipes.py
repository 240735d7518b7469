"""Published training recipes, shared by the config files that reproduce them."""

from __future__ import annotations

import os

import ml_collections

from medjax import config as config_lib

# Where the repository's real MedMNIST files live (the README of ../shared/data).
SHARED_MEDMNIST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               '..', 'shared', 'data', 'medmnist')


def medmnist_paper(flag: str, is_3d: bool, arg: str = '') -> ml_collections.ConfigDict:
  """MedMNIST v2 (Yang et al. 2023) ResNet-18 (28) recipe.

  100 epochs, Adam lr 1e-3, lr x0.1 at epochs 50 and 75, batch 128 (2D) / 32 (3D), no
  augmentation, checkpoint selected by best validation AUC, evaluated on test.

  ``arg``: '' (the recipe) or 'runlocal' (a few steps on a small subset, for tests).
  The data path defaults to ``../shared/data/medmnist/<flag>.npz`` beside the repository;
  point ``data.path`` elsewhere, or set ``data.download=True`` to fetch the official file.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(name='medmnist', flag=flag, path=os.path.normpath(SHARED_MEDMNIST))
  c.model = dict(name='resnet18', stem='medmnist')
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

  return config_lib.apply_variant(c, arg, runlocal=_runlocal)
