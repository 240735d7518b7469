"""AdrenalMNIST3D with the MedMNIST v2 paper recipe: ResNet-18 (28), 100 epochs, Adam 1e-3.

Data: 3D adrenal gland shape masks, binary (normal vs hyperplasia), 1x28x28x28. Reads ../shared/data/medmnist/adrenalmnist3d.npz by default; use
--config.data.path=FILE_OR_DIR for another copy or --config.data.download=True to fetch the
official file (MD5-checked). Any MedMNIST npz works here: the task, classes, channels and
2D/3D shape come from the file (e.g. --config.data.path=/data/pathmnist_64.npz).

  medjax train --config configs/adrenalmnist3d.py --workdir runs/adrenalmnist3d
  medjax train --config configs/adrenalmnist3d.py:runlocal --workdir /tmp/adrenalmnist3d   # tiny, for tests

Paper test AUC / ACC: 0.827 / 0.721 (ResNet-18+3D); best 0.839 AUC / 0.802 ACC.
"""

from medjax.recipes import medmnist_paper


def get_config(arg: str = ''):
  return medmnist_paper('adrenalmnist3d', is_3d=True, arg=arg)
