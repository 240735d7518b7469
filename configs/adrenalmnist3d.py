"""AdrenalMNIST3D with the MedMNIST v2 paper recipe: ResNet-18 (28), 100 epochs, Adam 1e-3.

Data: 3D adrenal gland shape masks, binary (normal vs hyperplasia), 1x28x28x28. Reads ../shared/data/medmnist/adrenalmnist3d.npz by default; use
--config.data.path=FILE_OR_DIR for another copy or --config.data.download=True to fetch the
official file (MD5-checked). Any MedMNIST npz works here: the task, classes, channels and
2D/3D shape come from the file (e.g. --config.data.path=/data/pathmnist_64.npz).

  medjax train --config configs/adrenalmnist3d.py --workdir runs/adrenalmnist3d
  medjax train --config configs/adrenalmnist3d.py:cpu --workdir runs/adrenalmnist3d_cpu  # CPU
  medjax train --config configs/adrenalmnist3d.py:runlocal --workdir /tmp/adrenalmnist3d   # tiny, for tests

Paper test AUC / ACC: 0.827 / 0.721 (ResNet-18+3D); best 0.839 AUC / 0.802 ACC.
`:cpu` (a 3D small CNN, 40 epochs, 12.8 min per run), 3 seeds on 2 CPU cores:
0.882 +- 0.006 / 0.812 +- 0.012, the three seeds' ensemble 0.896 / 0.829
(`medjax benchmark medmnist --datasets adrenalmnist3d --seeds 0,1,2 --variant cpu`;
benchmarks/results/medmnist_small_cnn.json).
"""

from medjax.recipes import medmnist_paper


def get_config(arg: str = ''):
  return medmnist_paper('adrenalmnist3d', is_3d=True, arg=arg, cpu=_cpu)


def _cpu(c) -> None:
  # The paper's 3D ResNet-18 trains ~0.6 volumes/s on 2 CPU cores (~52 h for 100 epochs); a
  # three-stage 3D CNN (16-32-64 channels) trains ~70 volumes/s, 40 epochs in ~12 min.
  c.train.num_epochs = 40
