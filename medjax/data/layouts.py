"""Segmentation dataset layouts, whole-dataset validation and the dataset fingerprint.

Layouts found by :func:`find_cases`:

* Medical Segmentation Decathlon: ``dataset.json`` with ``training: [{image, label}]``,
  ``labels`` and ``modality`` (``imagesTr/``, ``labelsTr/``).
* A plain folder of pairs: ``imagesTr/`` + ``labelsTr/``, ``images/`` + ``labels/`` (or
  ``masks/``), or ``image/`` + ``label/``, matched by file name; NIfTI volumes or 2D images
  (PNG, TIFF, JPEG, BMP). A ``train/`` subfolder holding one of these is used too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from medjax.data import nifti

NIFTI_SUFFIXES = ('.nii.gz', '.nii')
IMAGE_SUFFIXES = ('.png', '.tif', '.tiff', '.jpg', '.jpeg', '.bmp')
_PAIR_DIRS = (('imagesTr', 'labelsTr'), ('images', 'labels'), ('images', 'masks'),
              ('image', 'label'), ('image', 'mask'))


@dataclasses.dataclass(frozen=True)
class Case:
  case_id: str
  image: str
  label: Optional[str]


@dataclasses.dataclass
class DatasetInfo:
  root: str
  layout: str                      # 'msd' | 'folder'
  spatial_dims: int                # 3 for NIfTI, 2 for image files
  cases: List[Case]
  class_names: Optional[List[str]]  # from dataset.json; None = infer from the labels
  modality: str = 'unknown'


def strip_suffix(name: str) -> str:
  for suffix in NIFTI_SUFFIXES + IMAGE_SUFFIXES:
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return name


def list_files(path: str, suffixes: Sequence[str]) -> List[str]:
  """``path`` itself if it is a file, else the files in folder ``path`` (sorted, no hidden
  files) whose names end with one of ``suffixes``; an error if there are none."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file or folder')
  if os.path.isdir(path):
    files = [os.path.join(path, f) for f in sorted(os.listdir(path))
             if f.lower().endswith(tuple(suffixes)) and not f.startswith('.')]
  else:
    files = [path]
  if not files:
    raise ValueError(f"{path}: no files ending in {', '.join(suffixes)}")
  return files


def _is_data_file(name: str) -> bool:
  return name.lower().endswith(NIFTI_SUFFIXES + IMAGE_SUFFIXES) and not name.startswith('.')


def _inside(root: str, entry: Dict, key: str, where: str) -> str:
  """``root/entry[key]``, refused if the path leaves the dataset folder (absolute, or
  ``..`` above ``root``): a dataset.json must not make training read arbitrary files."""
  if not isinstance(entry, dict) or not isinstance(entry.get(key), str):
    raise ValueError(f"{where}: expected {{'image': path, 'label': path}}, got {entry!r}")
  relative = entry[key]
  path = os.path.normpath(os.path.join(root, relative))
  if os.path.isabs(relative) or os.path.relpath(path, os.path.normpath(root)).startswith(
      os.pardir):
    raise ValueError(f"{where}: {key} path '{relative}' points outside the dataset folder "
                     f'{root}; paths must be relative and inside it')
  return path


def _check_unique_ids(info: DatasetInfo) -> None:
  """Two files with one case id (same name in two folders, or a.png beside a.tif) would
  become one case: refuse, naming both."""
  seen: Dict[str, str] = {}
  clashes = []
  for case in info.cases:
    if case.case_id in seen:
      clashes.append(f"case id '{case.case_id}': {seen[case.case_id]} and {case.image}")
    seen.setdefault(case.case_id, case.image)
  if clashes:
    raise ValueError(f'{info.root}: {len(clashes)} case id(s) used by more than one image '
                     '(case ids are file names without their suffix; rename one of each):\n'
                     + '\n'.join(clashes))


def _msd(root: str) -> DatasetInfo:
  path = os.path.join(root, 'dataset.json')
  try:
    with open(path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from None
  if 'training' not in meta:
    raise ValueError(f"{path}: no 'training' list")
  cases = []
  for i, entry in enumerate(meta['training']):
    image = _inside(root, entry, 'image', f"{path}: training[{i}]")
    label = _inside(root, entry, 'label', f"{path}: training[{i}]") if entry.get('label') \
        else None
    cases.append(Case(strip_suffix(os.path.basename(image)), image, label))
  labels = meta.get('labels', {})
  class_names = [labels[k] for k in sorted(labels, key=int)] if labels else None
  modality = ','.join(str(v) for _, v in sorted(meta.get('modality', {}).items())) or 'unknown'
  return DatasetInfo(root, 'msd', 3, cases, class_names, modality)


def _folder(root: str) -> Optional[DatasetInfo]:
  for base in (root, os.path.join(root, 'train')):
    for image_dir, label_dir in _PAIR_DIRS:
      images = os.path.join(base, image_dir)
      labels = os.path.join(base, label_dir)
      if not (os.path.isdir(images) and os.path.isdir(labels)):
        continue
      label_files = {strip_suffix(f): os.path.join(labels, f)
                     for f in os.listdir(labels) if _is_data_file(f)}
      cases = [Case(strip_suffix(f), os.path.join(images, f), label_files.get(strip_suffix(f)))
               for f in sorted(os.listdir(images)) if _is_data_file(f)]
      dims = 3 if cases and cases[0].image.lower().endswith(NIFTI_SUFFIXES) else 2
      return DatasetInfo(root, 'folder', dims, cases, None)
  return None


def find_cases(root: str) -> DatasetInfo:
  """Finds image/label pairs under ``root``; raises ValueError if none can be found."""
  if not os.path.isdir(root):
    raise ValueError(f'{root}: not a directory')
  if os.path.exists(os.path.join(root, 'dataset.json')):
    info = _msd(root)
  else:
    info = _folder(root)
    if info is None:
      raise ValueError(f'{root}: no dataset.json and no image/label folders '
                       f"({', '.join('/'.join(p) for p in _PAIR_DIRS)})")
  if not info.cases:
    raise ValueError(f'{root}: the dataset is empty (no image files found)')
  _check_unique_ids(info)
  return info


def read_image_2d(path: str, kind: str = 'image', label_values: Sequence[int] = ()) -> np.ndarray:
  """A 2D image ``[H, W, C]`` (float32) or label map ``[H, W]`` (int32).

  Labels: with ``label_values``, stored values map to classes (``nifti.map_label_values``);
  without, binary masks stored as {0, 255} become {0, 1}.
  """
  from PIL import Image, UnidentifiedImageError
  if not os.path.isfile(path):
    raise nifti.VolumeError(f'{path}: file not found')
  try:
    with Image.open(path) as im:
      array = np.asarray(im)
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise nifti.VolumeError(f'{path}: corrupt or unreadable image ({e})') from None
  if kind == 'image':
    array = array.astype(np.float32)
    if array.ndim == 2:
      array = array[..., None]
    if not np.all(np.isfinite(array)):
      raise nifti.VolumeError(f'{path}: NaN or infinite pixels')
    return array
  if array.ndim == 3:
    if array.shape[2] > 1 and not np.all(array == array[..., :1]):
      raise nifti.VolumeError(f'{path}: label image has {array.shape[2]} differing channels')
    array = array[..., 0]
  if len(label_values):
    return nifti.map_label_values(array, label_values, path)
  values = np.unique(array)
  if set(values.tolist()) <= {0, 255}:
    array = (array == 255)
  return array.astype(np.int32)


def read_array(path: str, kind: str = 'image', num_classes: Optional[int] = None,
               label_values: Sequence[int] = ()) -> Tuple[np.ndarray, Tuple[float, ...]]:
  """Any image or label file as ``(array, spacing)``, 2D or 3D decided here by the suffix.
  Images come with a channel axis ``[*spatial, C]``, label maps without ``[*spatial]``:

  * NIfTI (``.nii``, ``.nii.gz``): the volume's voxel axes as stored, ``[X, Y, Z(, 1)]`` (the
    affine is :func:`nifti.read_volume`'s business), spacing in mm per axis;
  * PNG/TIFF/JPEG/BMP: ``[H, W(, C)]``, spacing ``(1.0, 1.0)``: 2D formats carry none, so
    distances are in pixels.

  Labels are validated (integral, within ``num_classes``; ``label_values`` map stored values
  to classes); a bad file raises ``nifti.VolumeError`` naming it.
  """
  if path.lower().endswith(NIFTI_SUFFIXES):
    volume = nifti.read_volume(path, kind, num_classes, label_values)
    array = volume.array[..., None] if kind == 'image' else volume.array
    return array, tuple(float(s) for s in volume.spacing)
  if path.lower().endswith(IMAGE_SUFFIXES):
    return read_image_2d(path, kind, label_values), (1.0, 1.0)
  raise nifti.VolumeError(f"{path}: unknown image format; expected one of "
                          f"{', '.join(NIFTI_SUFFIXES + IMAGE_SUFFIXES)}")


def read_pair_2d(case: Case, label_values: Sequence[int] = ()) -> Tuple[np.ndarray, np.ndarray]:
  """Image ``[H, W, C]`` and label ``[H, W]`` of a 2D case; their shapes must agree."""
  image = read_image_2d(case.image, 'image')
  label = read_image_2d(case.label, 'label', label_values)
  if label.shape != image.shape[:2]:
    raise nifti.VolumeError(f'{case.label}: label shape {label.shape} differs from image '
                            f'{case.image} shape {image.shape[:2]}')
  return image, label


def _case_stats(info: DatasetInfo, case: Case, num_classes: Optional[int],
                label_values: Sequence[int] = ()) -> Dict:
  """Reads and checks one case; returns its fingerprint entry."""
  if info.spatial_dims == 3:
    image = nifti.read_volume(case.image, 'image')
    entry = {'case': case.case_id, 'shape': list(image.array.shape),
             'spacing_mm': [round(s, 6) for s in image.spacing],
             'axcodes': ''.join(image.axcodes)}
    image_array = image.array
    if case.label is not None:
      label = nifti.read_volume(case.label, 'label', num_classes, label_values)
      nifti.check_pair(image, label)
      label_array = label.array
  else:
    if case.label is not None:
      image_array, label_array = read_pair_2d(case, label_values)
    else:
      image_array = read_image_2d(case.image, 'image')
    entry = {'case': case.case_id, 'shape': list(image_array.shape[:2]),
             'channels': int(image_array.shape[2])}
    if case.label is not None and num_classes is not None and label_array.max() >= num_classes:
      raise nifti.VolumeError(f'{case.label}: labels outside 0..{num_classes - 1}')
  if case.label is None:
    entry['label'] = None
    foreground = np.ones(image_array.shape[:info.spatial_dims], bool)
  else:
    values, counts = np.unique(label_array, return_counts=True)
    entry['label_voxels'] = {str(int(v)): int(c) for v, c in zip(values, counts)}
    foreground = label_array > 0
  values = image_array[foreground] if foreground.any() else image_array.reshape(-1)
  entry['intensity'] = {
      'min': float(image_array.min()), 'max': float(image_array.max()),
      'foreground_mean': float(values.mean()), 'foreground_std': float(values.std()),
      'foreground_p00_5': float(np.percentile(values, 0.5)),
      'foreground_p99_5': float(np.percentile(values, 99.5))}
  return entry


def _channel_problems(cases: Sequence[Case], entries: Sequence[Dict]) -> List[str]:
  """Every case must have the same number of channels (gray and RGB files mixed would
  train on whichever comes first): one problem per case that differs from the majority."""
  counts = {e['case']: e['channels'] for e in entries if 'channels' in e}
  if len(set(counts.values())) <= 1:
    return []
  values = list(counts.values())
  majority = max(set(values), key=values.count)
  images = {c.case_id: c.image for c in cases}
  return [f'{images[case]}: {n} channel(s), but {values.count(majority)} of {len(values)} '
          f'cases have {majority}; convert the files so that all cases agree'
          for case, n in counts.items() if n != majority]


def check_dataset(root: str, max_cases: int = 0, label_values: Sequence[int] = ()) -> Dict:
  """Validates every case and computes the dataset fingerprint.

  Returns a dict with ``cases`` (per-case shape, spacing, orientation, intensity and label
  statistics), ``problems`` (one line per bad file: path and what is wrong) and ``summary``
  (counts, median shape and spacing, class frequencies, suggested target spacing).
  """
  info = find_cases(root)
  num_classes = len(info.class_names) if info.class_names else None
  cases = info.cases[:max_cases] if max_cases else info.cases
  entries, problems = [], []
  for case in cases:
    if case.label is None:
      problems.append(f'{case.image}: no label file for case {case.case_id}')
    try:
      entries.append(_case_stats(info, case, num_classes, label_values))
    except nifti.VolumeError as e:
      problems.append(str(e))
  problems += _channel_problems(cases, entries)
  summary: Dict = {'root': os.path.abspath(root), 'layout': info.layout,
                   'spatial_dims': info.spatial_dims, 'modality': info.modality,
                   'cases': len(cases), 'valid_cases': len(entries),
                   'class_names': info.class_names}
  if entries:
    shapes = np.array([e['shape'] for e in entries])
    summary['shape_min'] = shapes.min(axis=0).tolist()
    summary['shape_median'] = np.median(shapes, axis=0).tolist()
    summary['shape_max'] = shapes.max(axis=0).tolist()
    if info.spatial_dims == 3:
      spacings = np.array([e['spacing_mm'] for e in entries])
      summary['spacing_median_mm'] = np.median(spacings, axis=0).tolist()
      summary['spacing_min_mm'] = spacings.min(axis=0).tolist()
      summary['spacing_max_mm'] = spacings.max(axis=0).tolist()
      # nnU-Net's default: the median spacing of the training cases.
      summary['suggested_target_spacing_mm'] = summary['spacing_median_mm']
      summary['axcodes'] = sorted({e['axcodes'] for e in entries})
    totals: Dict[str, int] = {}
    for e in entries:
      for k, v in (e.get('label_voxels') or {}).items():
        totals[k] = totals.get(k, 0) + v
    total = sum(totals.values())
    if total:
      summary['class_voxel_fraction'] = {k: v / total for k, v in sorted(totals.items(),
                                                                        key=lambda kv: int(kv[0]))}
    summary['foreground_intensity_p00_5'] = float(np.median(
        [e['intensity']['foreground_p00_5'] for e in entries]))
    summary['foreground_intensity_p99_5'] = float(np.median(
        [e['intensity']['foreground_p99_5'] for e in entries]))
  return {'summary': summary, 'problems': problems, 'cases': entries}


def format_report(report: Dict) -> str:
  s = report['summary']
  lines = [f"{s['root']}: {s['layout']} layout, {s['spatial_dims']}D, modality {s['modality']}",
           f"cases: {s['cases']} ({s['valid_cases']} valid)"]
  if s.get('class_names'):
    lines.append(f"classes: {', '.join(f'{i}={n}' for i, n in enumerate(s['class_names']))}")
  for key in ('shape_min', 'shape_median', 'shape_max', 'spacing_median_mm', 'spacing_min_mm',
              'spacing_max_mm', 'axcodes', 'suggested_target_spacing_mm',
              'class_voxel_fraction', 'foreground_intensity_p00_5',
              'foreground_intensity_p99_5'):
    if key in s:
      value = s[key]
      if isinstance(value, dict):
        value = ', '.join(f'{k}: {v:.4f}' for k, v in value.items())
      lines.append(f'{key}: {value}')
  lines.append(f"problems: {len(report['problems'])}")
  lines.extend(f'  - {p}' for p in report['problems'])
  return '\n'.join(lines)
