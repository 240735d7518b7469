"""ISBI 2012 EM membrane segmentation: a 2D U-Net (Ronneberger et al. 2015's data).

Data: ../shared/data/isbi2012_em_membrane/train (30 serial-section TEM slices, 512x512).
Labels are stored as 0 = membrane, 255 = cell interior; data.label_values=(255, 0) makes
membrane class 1 (the structure scored). Seeded 5-fold split over the 30 slices; per-image
z-score; 256x256 patches, one third centred on membrane; flips, rot90, rotation, scaling,
elastic deformation (the original paper's key augmentation), noise, blur, gamma.
Validation: whole 512x512 slices by sliding window, Dice of the membrane class.

  medjax train --config configs/isbi2012_unet2d.py --workdir runs/isbi_f0
  medjax train --config configs/isbi2012_unet2d.py:cpu --workdir runs/isbi_cpu  # CPU budget
  medjax train --config configs/isbi2012_unet2d.py:runlocal --workdir /tmp/isbi   # tests

Expected result: ':cpu' (400 steps of 8 patches of 128x128, ~10 min on 2 cores), fold 0:
membrane Dice 0.805, HD95 10.7 px (2D PNGs carry no spacing: distances in pixels). The full
recipe (a 2-core CPU trains ~1 patch/s at 256x256) is meant for a GPU and is not yet
measured. Membranes are 22% of the pixels.
"""

import os

import ml_collections

from medjax import config as config_lib

DATA = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..',
                                     'shared', 'data', 'isbi2012_em_membrane'))


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = 'segmentation'
  c.data = dict(root=DATA, num_folds=5, fold=0, patch_size=(256, 256), label_values=(255, 0),
                class_names=('cell', 'membrane'), normalization='zscore', crop_nonzero=False,
                foreground_fraction=1 / 3,
                seg_augment=dict(p_flip=0.5, p_rot90=0.5, p_rotate=0.3, rotate_deg=30.0,
                                 p_scale=0.2, p_elastic=0.3, elastic_alpha=8.0,
                                 elastic_sigma=8.0, p_noise=0.1, p_blur=0.1, p_gamma=0.2))
  c.model = dict(name='unet', features=(32, 64, 128, 256, 512), strides=(1, 2, 2, 2, 2),
                 norm='instance', deep_supervision=True)
  c.loss = dict(name='dice_ce', include_background=False, batch_dice=True)
  c.optimizer = dict(name='adam', learning_rate=1e-3, schedule='cosine', warmup_epochs=1)
  c.train = dict(num_epochs=100, steps_per_epoch=100, batch_size=8, eval_batch_size=8,
                 eval_every_epochs=10, log_every_steps=50, selection_metric='dice',
                 selection_mode='max', keep_checkpoints=1)
  return config_lib.apply_variant(c, arg, cpu=_cpu, runlocal=_runlocal)


def _cpu(c: ml_collections.ConfigDict) -> None:
  # What a 2-core CPU trains in ~10 minutes.
  c.data.patch_size = (128, 128)
  c.model.update(features=(16, 32, 64, 128), strides=(1, 2, 2, 2))
  c.train.update(num_epochs=16, steps_per_epoch=25, batch_size=8, eval_every_epochs=4,
                 log_every_steps=25)


def _runlocal(c: ml_collections.ConfigDict) -> None:
  c.data.update(max_cases=6, num_folds=3, patch_size=(64, 64))
  c.model.update(features=(4, 8), strides=(1, 2), deep_supervision=False)
  c.train.update(num_epochs=2, steps_per_epoch=2, batch_size=2, eval_batch_size=4,
                 eval_every_epochs=1, log_every_steps=1, progress_bar=False)
