"""MedMNIST v2 / MedMNIST+ npz files (Yang et al., Scientific Data 2023).

Files hold ``{train,val,test}_images`` (uint8; 2D gray ``[N, H, W]``, 2D RGB ``[N, H, W, 3]``,
3D ``[N, D, H, W]``) and ``{train,val,test}_labels`` (``[N, 1]`` class index, or ``[N, L]``
multi-hot). The task and class names come from the table below (MedMNIST's own metadata);
files of other sizes (``pathmnist_64.npz``, ``organmnist3d_64.npz``) use their base flag's
entry. An unknown flag falls back to inference from the labels.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import urllib.request
from typing import Dict, NamedTuple, Tuple

import numpy as np

from medjax.data.dataset import SPLITS, ClassificationData


class MedMNISTInfo(NamedTuple):
  task: str           # medjax task name
  labels: Tuple[str, ...]
  channels: int
  is_3d: bool
  md5: str            # of the official 28-px file


_ORGANS = ('bladder', 'femur-left', 'femur-right', 'heart', 'kidney-left', 'kidney-right',
           'liver', 'lung-left', 'lung-right', 'pancreas', 'spleen')

INFO: Dict[str, MedMNISTInfo] = {
    'pathmnist': MedMNISTInfo('multiclass', (
        'adipose', 'background', 'debris', 'lymphocytes', 'mucus', 'smooth muscle',
        'normal colon mucosa', 'cancer-associated stroma',
        'colorectal adenocarcinoma epithelium'), 3, False, 'a8b06965200029087d5bd730944a56c1'),
    'chestmnist': MedMNISTInfo('multilabel', (
        'atelectasis', 'cardiomegaly', 'effusion', 'infiltration', 'mass', 'nodule',
        'pneumonia', 'pneumothorax', 'consolidation', 'edema', 'emphysema', 'fibrosis',
        'pleural', 'hernia'), 1, False, '02c8a6516a18b556561a56cbdd36c4a8'),
    'dermamnist': MedMNISTInfo('multiclass', (
        'actinic keratoses and intraepithelial carcinoma', 'basal cell carcinoma',
        'benign keratosis-like lesions', 'dermatofibroma', 'melanoma', 'melanocytic nevi',
        'vascular lesions'), 3, False, '0744692d530f8e62ec473284d019b0c7'),
    'octmnist': MedMNISTInfo('multiclass', (
        'choroidal neovascularization', 'diabetic macular edema', 'drusen', 'normal'),
        1, False, 'c68d92d5b585d8d81f7112f81e2d0842'),
    'pneumoniamnist': MedMNISTInfo('binary', ('normal', 'pneumonia'), 1, False,
                                   '28209eda62fecd6e6a2d98b1501bb15f'),
    'retinamnist': MedMNISTInfo('ordinal', ('0', '1', '2', '3', '4'), 3, False,
                                'bd4c0672f1bba3e3a89f0e4e876791e4'),
    'breastmnist': MedMNISTInfo('binary', ('malignant', 'normal, benign'), 1, False,
                                '750601b1f35ba3300ea97c75c52ff8f6'),
    'bloodmnist': MedMNISTInfo('multiclass', (
        'basophil', 'eosinophil', 'erythroblast', 'immature granulocytes', 'lymphocyte',
        'monocyte', 'neutrophil', 'platelet'), 3, False, '7053d0359d879ad8a5505303e11de1dc'),
    'tissuemnist': MedMNISTInfo('multiclass', (
        'Collecting Duct, Connecting Tubule', 'Distal Convoluted Tubule',
        'Glomerular endothelial cells', 'Interstitial endothelial cells', 'Leukocytes',
        'Podocytes', 'Proximal Tubule Segments', 'Thick Ascending Limb'), 1, False,
        'ebe78ee8b05294063de985d821c1c34b'),
    'organamnist': MedMNISTInfo('multiclass', _ORGANS, 1, False,
                                '866b832ed4eeba67bfb9edee1d5544e6'),
    'organcmnist': MedMNISTInfo('multiclass', _ORGANS, 1, False,
                                '0afa5834fb105f7705a7d93372119a21'),
    'organsmnist': MedMNISTInfo('multiclass', _ORGANS, 1, False,
                                'e5c39f1af030238290b9557d9503af9d'),
    'organmnist3d': MedMNISTInfo('multiclass', (
        'liver', 'kidney-right', 'kidney-left', 'femur-right', 'femur-left', 'bladder',
        'heart', 'lung-right', 'lung-left', 'spleen', 'pancreas'), 1, True,
        '21f0a239e7f502e6eca33c3fc453c0b6'),
    'nodulemnist3d': MedMNISTInfo('binary', ('benign', 'malignant'), 1, True,
                                  '8755a7e9e05a4d9ce80a24c3e7a256f3'),
    'adrenalmnist3d': MedMNISTInfo('binary', ('normal', 'hyperplasia'), 1, True,
                                   'bbd3c5a5576322bc4cdfea780653b1ce'),
    'fracturemnist3d': MedMNISTInfo('multiclass', (
        'buckle rib fracture', 'nondisplaced rib fracture', 'displaced rib fracture'),
        1, True, '6aa7b0143a6b42da40027a9dda61302f'),
    'vesselmnist3d': MedMNISTInfo('binary', ('vessel', 'aneurysm'), 1, True,
                                  '2ba5b80617d705141f3f85627108fce8'),
    'synapsemnist3d': MedMNISTInfo('binary', ('inhibitory synapse', 'excitatory synapse'),
                                   1, True, '1235b78a3cd6280881dd7850a78eadb6'),
}

DOWNLOAD_URL = 'https://zenodo.org/record/6496656/files/{flag}.npz?download=1'
REQUIRED_KEYS = tuple(f'{s}_{k}' for s in SPLITS for k in ('images', 'labels'))


def base_flag(flag: str) -> str:
  """'pathmnist_64' -> 'pathmnist'."""
  return re.sub(r'_(28|64|128|224)$', '', flag.lower())


def flag_from_path(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0].lower()


def md5sum(path: str) -> str:
  digest = hashlib.md5()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _remove_stale_parts(target: str) -> None:
  """Deletes ``<target>.part-<pid>`` files of downloads whose process is gone (killed
  mid-download): they are never completed, only waste disk."""
  from medjax.workdir import left_by_dead_processes  # here: workdir imports JAX, which the
  # sampler's worker processes (medjax/data/host_workers.py) never need
  folder, name = os.path.split(target)
  for path in left_by_dead_processes(folder, re.escape(name) + r'\.part-(\d+)'):
    os.remove(path)


def download(flag: str, dest_dir: str, url: str | None = None) -> str:
  """Downloads the official ``<flag>.npz`` (28 px) into ``dest_dir`` and checks its MD5.

  The file is written as ``<flag>.npz.part-<pid>`` and renamed only after the checksum
  matches, so an interrupted or corrupt download never leaves a file that looks complete;
  parts left by killed downloads are deleted by the next one.
  """
  base = base_flag(flag)
  if flag != base or base not in INFO:
    raise ValueError(f"no known download for MedMNIST flag '{flag}'; the official 28-px files "
                     f"are: {', '.join(sorted(INFO))}. Give data.path to a local file instead.")
  os.makedirs(dest_dir, exist_ok=True)
  target = os.path.join(dest_dir, f'{flag}.npz')
  _remove_stale_parts(target)
  url = url or DOWNLOAD_URL.format(flag=flag)
  tmp = f'{target}.part-{os.getpid()}'
  try:
    with open(tmp, 'wb') as out, urllib.request.urlopen(url, timeout=60) as response:
      shutil.copyfileobj(response, out)
    got = md5sum(tmp)
    if got != INFO[base].md5:
      raise IOError(f'MD5 mismatch for {url}: got {got}, expected {INFO[base].md5}')
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


def verify_official(path: str, flag: str) -> None:
  """An existing file at the download target must be the official one: MD5 checked."""
  base = base_flag(flag)
  if flag != base or base not in INFO:
    return  # no official checksum to compare with
  got = md5sum(path)
  if got != INFO[base].md5:
    raise ValueError(f'{path}: MD5 {got} differs from the official {flag}.npz '
                     f'({INFO[base].md5}); delete it to download again, or set '
                     'data.download=False to use this file as it is')


def resolve_path(path: str, flag: str, allow_download: bool) -> str:
  """Finds the npz: ``path`` itself, or ``path/<flag>.npz``; downloads if allowed. With
  downloads allowed, a file already there is MD5-checked against the official one."""
  if path.endswith('.npz'):
    candidate = path
  else:
    if not flag:
      raise ValueError('data.flag must name the MedMNIST dataset when data.path is a directory')
    candidate = os.path.join(path or '.', f'{flag.lower()}.npz')
  flag = (flag or flag_from_path(candidate)).lower()
  if os.path.isfile(candidate):
    if allow_download and os.path.basename(candidate).lower() == f'{flag}.npz':
      verify_official(candidate, flag)  # the download target: must be the official file
    return candidate
  if allow_download:
    return download(flag, os.path.dirname(candidate) or '.')
  raise FileNotFoundError(f'MedMNIST file not found: {candidate} (set data.download=True to '
                          'fetch the official file, or point data.path at a local copy)')


def _to_channels_last(images: np.ndarray, info: MedMNISTInfo | None, path: str) -> np.ndarray:
  """Adds the channel axis: ``[N, *spatial]`` -> ``[N, *spatial, 1]``; RGB stays."""
  if info is not None:
    expected_nd = 3 if info.is_3d else 2
    if info.channels == 1 and images.ndim == expected_nd + 1:
      return images[..., None]
    if info.channels == 3 and images.ndim == expected_nd + 2 and images.shape[-1] == 3:
      return images
    raise ValueError(f'{path}: images of shape {images.shape} do not match a '
                     f"{'3D' if info.is_3d else '2D'} dataset with {info.channels} channel(s)")
  if images.ndim == 3:
    return images[..., None]                       # 2D gray
  if images.ndim == 4 and images.shape[-1] == 3 and images.shape[1] != 3:
    return images                                  # 2D RGB
  if images.ndim == 4:
    return images[..., None]                       # 3D gray
  if images.ndim == 5:
    return images                                  # 3D multi-channel
  raise ValueError(f'{path}: cannot interpret images of shape {images.shape}')


def _integral_labels(labels: np.ndarray, path: str, split: str) -> np.ndarray:
  """Labels as int64. Floats are accepted only when every value is a whole number (casting
  0.7 to 0 would train on wrong labels without a word); values must fit in int32."""
  integral = np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool
  if not integral:
    if not np.issubdtype(labels.dtype, np.floating):
      raise ValueError(f"{path}: '{split}_labels' has dtype {labels.dtype}; expected integers")
    if not np.all(np.isfinite(labels)):
      raise ValueError(f"{path}: '{split}_labels' contains NaN or infinite values")
    fractional = labels != np.round(labels)
    if fractional.any():
      index = np.argwhere(fractional)[0]
      raise ValueError(f"{path}: '{split}_labels' has non-integer values "
                       f'({int(fractional.sum())} of {labels.size}, e.g. '
                       f'{labels[tuple(index)]:g} at index {index.tolist()}); labels must be '
                       'class indices')
  too_big = np.abs(labels.astype(np.float64)) > np.iinfo(np.int32).max
  if too_big.any():
    raise ValueError(f"{path}: '{split}_labels' has values beyond int32 (e.g. "
                     f'{labels[too_big][0]}); labels must be class indices')
  return labels.astype(np.int64)


def load(path: str, flag: str = '') -> ClassificationData:
  """Loads a MedMNIST npz file into :class:`ClassificationData`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a readable npz, missing keys, or inconsistent contents (the message
      names the file and the problem).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'MedMNIST file not found: {path}')
  flag = (flag or flag_from_path(path)).lower()
  info = INFO.get(base_flag(flag))
  try:
    with np.load(path, allow_pickle=False) as npz:
      missing = [k for k in REQUIRED_KEYS if k not in npz.files]
      if missing:
        raise ValueError(f'{path}: not a MedMNIST npz; missing keys {missing} '
                         f'(found {sorted(npz.files)})')
      arrays = {k: npz[k] for k in REQUIRED_KEYS}
  except ValueError:
    raise
  except Exception as e:  # zipfile.BadZipFile, EOFError, OSError, ...
    raise ValueError(f'{path}: cannot read as .npz ({type(e).__name__}: {e})') from None

  splits = {}
  for split in SPLITS:
    images = _to_channels_last(arrays[f'{split}_images'], info, path)
    labels = _integral_labels(arrays[f'{split}_labels'], path, split)
    if labels.ndim == 1:
      labels = labels[:, None]
    splits[split] = (images, labels)

  label_width = splits['train'][1].shape[1]
  if info is not None:
    task, class_names = info.task, list(info.labels)
  elif label_width > 1:
    task = 'multilabel'
    class_names = [str(i) for i in range(label_width)]
  else:
    top = max(int(splits[s][1].max()) for s in SPLITS)
    task = 'binary' if top <= 1 else 'multiclass'
    class_names = [str(i) for i in range(max(top + 1, 2))]
  if task != 'multilabel':
    for split in SPLITS:
      images, labels = splits[split]
      if labels.shape[1] != 1:
        raise ValueError(f"{path}: '{split}_labels' has shape {labels.shape}, expected [N, 1] "
                         f"for a {task} dataset")
      splits[split] = (images, labels[:, 0].astype(np.int32))
  else:
    splits = {s: (x, y.astype(np.int32)) for s, (x, y) in splits.items()}
  data = ClassificationData(name=flag, splits=splits, task=task,
                            num_classes=len(class_names), class_names=class_names)
  data.validate(path)
  return data
