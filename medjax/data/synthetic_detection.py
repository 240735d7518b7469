"""Embedded detection dataset: lesions of two kinds on textured tissue, with distractors,
written as an image/label folder (PNG) from a seed, for the detection quickstart and tests.

Each image ``[S, S]`` is soft-tissue texture (band-limited noise, a shading gradient, speckle,
as :mod:`medjax.data.synthetic`) holding 0-4 lesions of 5-26 px:

* class 1 ``nodule``: round-to-oval, homogeneous, bright, sharp border;
* class 2 ``mass``: lobulated with spicules, heterogeneous, less bright.

Distractors that a detector must learn to ignore: bright thin ducts (lines) crossing the
tissue, and small round dark cysts of lesion size. About one image in six holds no lesion.
Lesions do not overlap (so each is one connected component, one box). The label PNG stores
0 background, 1 nodule, 2 mass. Same seed, same bytes.
"""

from __future__ import annotations

import json
import os

import numpy as np

from medjax.data.synthetic import smooth_noise, tissue

CLASS_NAMES = ['background', 'nodule', 'mass']
VERSION = 2  # of the generator: part of the cache folder's name


def _lesion(rng: np.random.Generator, size: int, centre, radius: float, mass: bool):
  """(soft mask in [0, 1], hard mask) of one lesion."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  dy, dx = yy - centre[0], xx - centre[1]
  theta = np.arctan2(dy, dx) + rng.uniform(0, 2 * np.pi)
  stretch = rng.uniform(0.75, 1.0)
  dist = np.hypot(dy, dx * stretch)
  boundary = np.ones_like(theta)
  if mass:
    for k in range(2, 5):
      boundary += rng.uniform(0.05, 0.15) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    boundary += 0.12 * np.maximum(np.cos(rng.integers(9, 14) * theta), 0) ** 4
  inside = radius * boundary - dist
  soft = 1 / (1 + np.exp(-inside / (0.4 if not mass else 0.8)))
  return soft, inside > 0


def _duct(rng: np.random.Generator, size: int) -> np.ndarray:
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  angle = rng.uniform(0, np.pi)
  offset = rng.uniform(-0.3, 0.3) * size
  dist = np.abs((yy - size / 2) * np.cos(angle) - (xx - size / 2) * np.sin(angle) - offset)
  return np.exp(-(dist / rng.uniform(0.8, 1.6)) ** 2)


def make_case(rng: np.random.Generator, size: int):
  """One image (uint8 ``[S, S]``) and its class map (uint8 ``[S, S]``)."""
  image = tissue(rng, size)
  for _ in range(rng.integers(0, 3)):
    image += 0.18 * _duct(rng, size)
  for _ in range(rng.integers(0, 3)):  # cysts: dark, lesion-sized
    centre = rng.uniform(8, size - 8, 2)
    soft, _ = _lesion(rng, size, centre, rng.uniform(3, 9), mass=False)
    image -= 0.2 * soft
  label = np.zeros((size, size), np.uint8)
  count = rng.choice(5, p=(0.16, 0.34, 0.25, 0.15, 0.10))
  for _ in range(count):
    for _attempt in range(20):
      radius = float(np.exp(rng.uniform(np.log(2.5), np.log(13))))
      centre = rng.uniform(radius + 2, size - radius - 2, 2)
      mass = bool(rng.random() < 0.4)
      soft, hard = _lesion(rng, size, centre, radius, mass)
      grown = np.zeros_like(hard)
      grown[max(0, int(centre[0] - 2 * radius)):int(centre[0] + 2 * radius) + 1,
            max(0, int(centre[1] - 2 * radius)):int(centre[1] + 2 * radius) + 1] = True
      if not np.any(label[grown]) and hard.any():
        break
    else:
      continue
    brightness = 0.26 if mass else 0.32
    texture = 0.05 * smooth_noise(rng, size, 0.3) if mass else 0.0
    image = image * (1 - soft) + (image + brightness + texture) * soft
    label[hard] = 2 if mass else 1
  image += rng.normal(0, 0.03, image.shape)
  return np.clip(image * 255, 0, 255).astype(np.uint8), label


def write_detection_dataset(root: str, num_cases: int = 200, seed: int = 0,
                            size: int = 64) -> str:
  """Writes ``root/imagesTr/case_NNNN.png`` and ``root/labelsTr/case_NNNN.png`` (and a
  ``synthetic.json`` naming the classes, written last) once; returns ``root``."""
  from PIL import Image
  done = os.path.join(root, 'synthetic.json')
  if os.path.exists(done):
    return root
  for sub in ('imagesTr', 'labelsTr'):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  rng = np.random.default_rng([seed, 31])
  for i in range(num_cases):
    image, label = make_case(rng, size)
    Image.fromarray(image).save(os.path.join(root, 'imagesTr', f'case_{i:04d}.png'))
    Image.fromarray(label).save(os.path.join(root, 'labelsTr', f'case_{i:04d}.png'))
  meta = {'name': 'SyntheticLesions', 'tensorImageSize': '2D', 'labels':
          {str(k): n for k, n in enumerate(CLASS_NAMES)}, 'numTraining': num_cases,
          'seed': seed, 'size': size}
  tmp = done + f'.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, done)  # written last: a folder with it is complete
  return root
