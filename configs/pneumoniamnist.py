"""PneumoniaMNIST with the MedMNIST v2 paper recipe: ResNet-18 (28), 100 epochs, Adam 1e-3.

Data: paediatric chest X-ray, binary (normal vs pneumonia), 1x28x28. Reads ../shared/data/medmnist/pneumoniamnist.npz by default; use
--config.data.path=FILE_OR_DIR for another copy or --config.data.download=True to fetch the
official file (MD5-checked). Any MedMNIST npz works here: the task, classes, channels and
2D/3D shape come from the file (e.g. --config.data.path=/data/pathmnist_64.npz).

  medjax train --config configs/pneumoniamnist.py --workdir runs/pneumoniamnist
  medjax train --config configs/pneumoniamnist.py:cpu --workdir runs/pneumoniamnist_cpu  # ~2 min, CPU
  medjax train --config configs/pneumoniamnist.py:runlocal --workdir /tmp/pneumoniamnist   # tiny, for tests

Paper test AUC / ACC: 0.944 / 0.854 (ResNet-18 (28)); best of the paper's baselines 0.991 / 0.946.
`:cpu` (a small CNN, 10 epochs), 3 seeds on 2 CPU cores: 0.955 +- 0.001 / 0.884 +- 0.011, above
both ResNet-18 figures (`medjax benchmark medmnist --datasets pneumoniamnist --seeds 0,1,2
--variant cpu`; benchmarks/results/medmnist_small_cnn.json).
"""

from medjax.recipes import medmnist_paper


def get_config(arg: str = ''):
  return medmnist_paper('pneumoniamnist', is_3d=False, arg=arg, cpu=_cpu)


def _cpu(c) -> None:
  # 4708 training images: 10 epochs are ~1470 steps, 1.5 min on 2 cores.
  c.train.num_epochs = 10
