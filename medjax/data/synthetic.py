"""Embedded default dataset: synthetic lesions on textured tissue, generated from a seed.

Each image is a 2D grayscale patch of soft-tissue texture (band-limited noise plus a smooth
shading gradient and speckle, as in ultrasound or mammography crops). The class depends on
what lies in the tissue:

* 0 ``normal``: tissue only (sometimes a thin bright duct, a distractor);
* 1 ``benign``: a smooth, round-to-oval, homogeneous mass with a sharp border;
* 2 ``malignant``: an irregular, lobulated mass with spicules and heterogeneous texture.

With ``num_classes=2`` the labels are 0 ``non-malignant`` (normal + benign) and 1
``malignant``. The lesion position and size vary, so the task needs spatial features, and
the benign/malignant distinction rests on border shape, as in real breast imaging. The
same seed always gives byte-identical arrays (NumPy's PCG64 generator), so no download is
needed and every run starts from the same data.
"""

from __future__ import annotations

import numpy as np

from medjax.data.dataset import ClassificationData

CLASS_NAMES_3 = ['normal', 'benign', 'malignant']
CLASS_NAMES_2 = ['non-malignant', 'malignant']
# Class frequencies of normal / benign / malignant (imbalanced, as clinical data are).
CLASS_PROBS = (0.45, 0.35, 0.20)
_SPLIT_IDS = {'train': 0, 'val': 1, 'test': 2}


def smooth_noise(rng: np.random.Generator, size: int, cutoff: float) -> np.ndarray:
  """Zero-mean, unit-variance noise low-passed by a Gaussian of ``cutoff`` cycles/pixel."""
  noise = rng.standard_normal((size, size))
  freq = np.fft.fftfreq(size)
  radius2 = freq[:, None] ** 2 + freq[None, :] ** 2
  field = np.real(np.fft.ifft2(np.fft.fft2(noise) * np.exp(-radius2 / (2 * cutoff**2))))
  return (field - field.mean()) / (field.std() + 1e-8)


def tissue(rng: np.random.Generator, size: int) -> np.ndarray:
  yy, xx = np.mgrid[0:size, 0:size] / size
  angle = rng.uniform(0, 2 * np.pi)
  gradient = 0.15 * (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5))
  texture = 0.10 * smooth_noise(rng, size, 0.08) + 0.05 * smooth_noise(rng, size, 0.25)
  return 0.40 + gradient + texture


def _lesion_mask(rng: np.random.Generator, size: int, malignant: bool) -> np.ndarray:
  """Soft mask in [0, 1] of one lesion at a random place."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  radius = rng.uniform(0.12, 0.22) * size
  margin = radius * 1.3
  cy, cx = rng.uniform(margin, size - margin, size=2)
  dy, dx = yy - cy, xx - cx
  theta = np.arctan2(dy, dx)
  dist = np.hypot(dy, dx)
  if malignant:
    # Lobulated border with high-frequency spicules.
    boundary = np.ones_like(theta)
    for k in range(2, 5):
      boundary += rng.uniform(0.08, 0.18) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    n_spicules = rng.integers(5, 9)
    for phase in rng.uniform(0, 2 * np.pi, size=n_spicules):
      boundary += rng.uniform(0.3, 0.6) * np.exp(
          -((np.angle(np.exp(1j * (theta - phase)))) ** 2) / (2 * 0.08**2))
    edge_width = 0.6
  else:
    # Smooth ellipse.
    elong = rng.uniform(1.0, 1.5)
    rot = rng.uniform(0, np.pi)
    u = dx * np.cos(rot) + dy * np.sin(rot)
    v = -dx * np.sin(rot) + dy * np.cos(rot)
    dist = np.hypot(u / elong, v) * np.sqrt(elong)
    boundary = np.ones_like(theta)
    edge_width = 0.8
  return 1.0 / (1.0 + np.exp((dist - radius * boundary) / edge_width))


def _image(rng: np.random.Generator, size: int, label3: int) -> tuple[np.ndarray, np.ndarray]:
  """A uint8 image ``[S, S]`` and its lesion mask ``[S, S]`` (bool; empty for normal)."""
  image = tissue(rng, size)
  mask = np.zeros((size, size))
  if label3 == 0 and rng.random() < 0.5:
    # Duct: a thin bright curve, a distractor for a model that just looks for brightness.
    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b, c = rng.uniform(-1, 1), rng.uniform(0.2, 0.8), rng.uniform(-0.5, 0.5)
    curve = np.abs(yy - (b + a * (xx - 0.5) + c * (xx - 0.5) ** 2))
    image = image + 0.25 * np.exp(-(curve * size) ** 2 / 2.0)
  elif label3 == 1:
    mask = _lesion_mask(rng, size, malignant=False)
    image = image * (1 - mask) + mask * (rng.uniform(0.65, 0.85) + 0.02 * smooth_noise(
        rng, size, 0.2))
  elif label3 == 2:
    mask = _lesion_mask(rng, size, malignant=True)
    image = image * (1 - mask) + mask * (rng.uniform(0.6, 0.85) + 0.10 * smooth_noise(
        rng, size, 0.3))
  speckle = 1.0 + 0.08 * rng.standard_normal((size, size))
  image = image * speckle + 0.02 * rng.standard_normal((size, size))
  return np.clip(np.round(image * 255), 0, 255).astype(np.uint8), mask > 0.5


def generate_split(seed: int, split: str, num_examples: int, image_size: int = 32,
                   num_classes: int = 3, with_masks: bool = False):
  """Images uint8 ``[N, S, S, 1]`` and int32 labels ``[N]`` of one split; with
  ``with_masks`` also the lesion masks bool ``[N, S, S]`` (where the label comes from:
  empty for normal tissue), for testing what explanations point at."""
  if num_classes not in (2, 3):
    raise ValueError(f'synthetic data supports num_classes 2 or 3, got {num_classes}')
  if image_size < 16:
    raise ValueError(f'synthetic image_size must be at least 16, got {image_size}')
  rng = np.random.default_rng([seed, _SPLIT_IDS[split]])
  labels3 = rng.choice(3, size=num_examples, p=CLASS_PROBS)
  pairs = [_image(rng, image_size, int(k)) for k in labels3]
  images = np.stack([image for image, _ in pairs])[..., None]
  labels = (labels3 if num_classes == 3 else (labels3 == 2)).astype(np.int32)
  if with_masks:
    return images, labels, np.stack([mask for _, mask in pairs])
  return images, labels


def load(seed: int = 1234, image_size: int = 32, num_train: int = 2000, num_val: int = 400,
         num_test: int = 400, num_classes: int = 3) -> ClassificationData:
  sizes = {'train': num_train, 'val': num_val, 'test': num_test}
  splits = {s: generate_split(seed, s, n, image_size, num_classes) for s, n in sizes.items()}
  data = ClassificationData(
      name=f'synthetic_lesions{num_classes}', splits=splits,
      task='multiclass' if num_classes == 3 else 'binary', num_classes=num_classes,
      class_names=CLASS_NAMES_3 if num_classes == 3 else CLASS_NAMES_2)
  data.validate('synthetic dataset')
  return data


def write_segmentation_dataset(root: str, num_cases: int = 8, seed: int = 0,
                               shape=(32, 40, 24), oblique: bool = True) -> str:
  """Writes a small synthetic segmentation task in the MSD layout and returns ``root``.

  Each case is an MRI-like volume (smooth texture, noise) holding an ellipsoidal structure
  split into two labelled parts (1 'head', 2 'tail'), brighter than its surroundings. Cases
  get random anisotropic spacings and, with ``oblique``, axis permutations and flips, so
  orientation handling is exercised. Deterministic from ``seed``.
  """
  import json
  import os

  import nibabel as nib
  rng = np.random.default_rng([seed, 7])
  os.makedirs(os.path.join(root, 'imagesTr'), exist_ok=True)
  os.makedirs(os.path.join(root, 'labelsTr'), exist_ok=True)
  training = []
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), -1)
  for i in range(num_cases):
    centre = np.array(shape) / 2 + rng.uniform(-3, 3, 3)
    radii = np.array(shape) * rng.uniform(0.18, 0.28, 3)
    inside = (((grid - centre) / radii) ** 2).sum(-1) <= 1
    label = np.zeros(shape, np.uint8)
    label[inside & (grid[..., 1] < centre[1])] = 1
    label[inside & (grid[..., 1] >= centre[1])] = 2
    texture = np.real(np.fft.ifftn(np.fft.fftn(rng.standard_normal(shape)) * np.exp(
        -sum(np.fft.fftfreq(n)[tuple(slice(None) if a == j else None for a in range(3))] ** 2
             for j, n in enumerate(shape)) / (2 * 0.08 ** 2))))
    image = (100 + 15 * texture / (texture.std() + 1e-8) + 60 * (label == 1) + 40 * (label == 2)
             + rng.normal(0, 8, shape)).astype(np.float32)
    spacing = rng.choice([0.8, 1.0, 1.5, 2.0], 3)
    affine = np.diag(list(spacing) + [1.0])
    if oblique:
      perm = rng.permutation(3)
      signs = rng.choice([-1.0, 1.0], 3)
      rot = np.eye(3)[perm] * signs[:, None]
      affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    name = f'synthetic_{i:03d}.nii.gz'
    nib.save(nib.Nifti1Image(image, affine), os.path.join(root, 'imagesTr', name))
    nib.save(nib.Nifti1Image(label, affine), os.path.join(root, 'labelsTr', name))
    training.append({'image': f'./imagesTr/{name}', 'label': f'./labelsTr/{name}'})
  meta = {'name': 'SyntheticStructures', 'tensorImageSize': '3D', 'modality': {'0': 'MRI'},
          'labels': {'0': 'background', '1': 'head', '2': 'tail'},
          'numTraining': num_cases, 'training': training, 'test': []}
  with open(os.path.join(root, 'dataset.json'), 'w') as f:
    json.dump(meta, f, indent=2)
  return root
