"""BreastMNIST with the MedMNIST v2 paper recipe: ResNet-18 (28), 100 epochs, Adam 1e-3.

Data: breast ultrasound, binary (malignant vs normal+benign), 1x28x28. Reads ../shared/data/medmnist/breastmnist.npz by default; use
--config.data.path=FILE_OR_DIR for another copy or --config.data.download=True to fetch the
official file (MD5-checked). Any MedMNIST npz works here: the task, classes, channels and
2D/3D shape come from the file (e.g. --config.data.path=/data/pathmnist_64.npz).

  medjax train --config configs/breastmnist.py --workdir runs/breastmnist
  medjax train --config configs/breastmnist.py:runlocal --workdir /tmp/breastmnist   # tiny, for tests

Paper test AUC / ACC: 0.901 / 0.863 (ResNet-18 (28)); best of the paper's baselines 0.919 / 0.863.
"""

from medjax.recipes import medmnist_paper


def get_config(arg: str = ''):
  return medmnist_paper('breastmnist', is_3d=False, arg=arg)
