"""Few labels on MedMNIST: the recipe of benchmarks/few_labels.py (a small CNN, minutes per run
on a CPU), to compare supervised-on-the-labelled-part, self-training, FixMatch, MixMatch and
all labels.

``arg``: the MedMNIST flag ('breastmnist', 'pneumoniamnist', 'adrenalmnist3d', ...; the file
comes from ../shared/data/medmnist or --config.data.path) or 'runlocal' (synthetic data,
seconds). A flag ending in '3d' gets the 3D small CNN and 3D augmentations: weak = flips of
the two in-plane axes, strong = those flips with brightness, contrast and cutout (the 2D
strong augmentation without its rotation and scaling, which the pipeline has in 2D only).

  # 10 % labels, 3 seeds in one program: the labelled-only baseline, then the methods
  medjax train --config configs/few_labels.py:breastmnist --workdir runs/b10/none \\
      --seeds 0,1,2 --config.data.labeled_fraction=0.1
  medjax train --config configs/few_labels.py:breastmnist --workdir runs/b10/self_training \\
      --seeds 0,1,2 --config.data.labeled_fraction=0.1 --config.semi.method=self_training \\
      --config.semi.teacher=runs/b10/none
  medjax train --config configs/few_labels.py:breastmnist --workdir runs/b10/fixmatch \\
      --seeds 0,1,2 --config.data.labeled_fraction=0.1 --config.semi.method=fixmatch \\
      --config.semi.threshold=0.8
  medjax train --config configs/few_labels.py:breastmnist --workdir runs/b10/mixmatch \\
      --seeds 0,1,2 --config.data.labeled_fraction=0.1 --config.semi.method=mixmatch \\
      --config.semi.unlabeled_ratio=1 --config.semi.weight=75

FixMatch here: confidence threshold 0.8 (self-training keeps 0.95) and a strong augmentation
with a cutout of a quarter of the image side (the default half can erase a 28-px image's
lesion). Chosen on BreastMNIST 10 % by validation AUC (0.825, was 0.807 with 0.95 and a half
cutout; benchmarks/results/few_labels_breastmnist_fixmatch_variants.json); PneumoniaMNIST 5 %
with it: test AUC 0.944 +- 0.003, was 0.939 +- 0.010.

Every run of a dataset trains for the same number of steps (an epoch is one pass over the
whole training split's size, labelled or not). PneumoniaMNIST (4708 training images) was
benchmarked with --config.train.num_epochs=4: about the steps of BreastMNIST's 30 epochs
(~590). The checkpoint is chosen by validation AUC on
the full validation split (MedMNIST's protocol; with truly few labels, the validation set
would be small too).
"""

import ml_collections

from medjax.recipes import medmnist_small_cnn


def get_config(arg: str = 'breastmnist') -> ml_collections.ConfigDict:
  is_3d = arg.endswith('3d')
  c = medmnist_small_cnn(arg, is_3d=is_3d)
  strong = dict(cutout=0.25)
  if is_3d:  # no 2D rotation / scaling; the in-plane flips of data.augment
    strong.update(flip_ud=True, rotation_deg=0.0, scale_min=1.0, scale_max=1.0)
  c.semi = dict(method='none', threshold=0.95, unlabeled_ratio=3, weight=1.0,
                strong_augment=strong)
  if arg == 'runlocal':
    c.data = dict(name='synthetic', synthetic=dict(num_train=256, num_val=64, num_test=64,
                                                   num_classes=2),
                  augment=c.data['augment'])
    c.train.update(num_epochs=2, eval_batch_size=64, progress_bar=False)
  return c
