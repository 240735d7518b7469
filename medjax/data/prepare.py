"""Prepare a segmentation dataset once into an uncompressed cache; seeded k-fold splits.

Preparing a case: read and validate -> reorient to RAS (3D) -> resample to the target spacing
(linear image, nearest label) -> crop to the image's nonzero region -> normalise intensities.
Arrays are stored as ``.npy`` (memory-mapped on read: no per-sample decompression) with a
JSON record of every step, so a prediction on the prepared grid maps back exactly onto the
original file (:func:`restore_original_grid`).

Prepared arrays: image ``[*spatial, C]`` float32, label ``[*spatial]`` uint8; spatial is
``(X, Y, Z)`` in RAS order for volumes, ``(H, W)`` for 2D images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from medjax import config as config_lib
from medjax.data import intensity, layouts, nifti
from medjax.workdir import left_by_dead_processes

CACHE_VERSION = 2  # 2: entries keyed by options and data
MAX_CLASS_LOCATIONS = 10000  # foreground voxels remembered per class, for oversampling


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  """How cases are prepared.

  Attributes:
    target_spacing: mm per axis; None keeps each case's spacing, 'auto' uses the dataset's
      median spacing (nnU-Net's default). 3D only.
    normalization: 'zscore' (per case), 'zscore_nonzero' (statistics over nonzero voxels),
      'ct' (window ``ct_window`` HU to [0, 1]), 'percentile' (clip to ``percentiles`` then
      z-score), 'none', or 'auto': for CT (dataset.json modality), a window from the
      dataset's foreground 0.5/99.5 percentiles, else 'zscore' (nnU-Net's rule).
    crop_nonzero: crop each case to the bounding box of its nonzero image voxels.
  """
  target_spacing: Optional[Tuple[float, ...] | str] = None
  normalization: str = 'zscore'
  ct_window: Tuple[float, float] = (-1000.0, 1000.0)
  percentiles: Tuple[float, float] = (0.5, 99.5)
  crop_nonzero: bool = True
  label_values: Tuple[int, ...] = ()  # stored value of each class; () = stored as classes

  def key(self) -> str:
    text = json.dumps([CACHE_VERSION, dataclasses.asdict(self)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def normalise(image: np.ndarray, options: PrepareOptions) -> np.ndarray:
  if options.normalization == 'zscore':
    return intensity.zscore(image)
  if options.normalization == 'zscore_nonzero':
    return intensity.zscore(image, nonzero=True)
  if options.normalization == 'ct':
    return intensity.window(image, *options.ct_window)
  if options.normalization == 'percentile':
    return intensity.zscore(intensity.percentile_clip(image, *options.percentiles))
  if options.normalization == 'none':
    return image.astype(np.float32)
  raise ValueError(f"unknown normalization '{options.normalization}'; expected zscore, "
                   'zscore_nonzero, ct, percentile or none')


def class_locations(label: np.ndarray, num_classes: int, rng: np.random.Generator) -> Dict:
  """Up to MAX_CLASS_LOCATIONS voxel coordinates of each foreground class present."""
  out = {}
  for k in range(1, num_classes):
    coords = np.argwhere(label == k)
    if len(coords) > MAX_CLASS_LOCATIONS:
      coords = coords[rng.choice(len(coords), MAX_CLASS_LOCATIONS, replace=False)]
    if len(coords):
      out[str(k)] = coords.astype(np.int32)
  return out


def _load_pair(info: layouts.DatasetInfo, case: layouts.Case, target_spacing,
               num_classes: Optional[int], label_values: Sequence[int] = ()):
  """Image ``[*spatial, C]``, label ``[*spatial]`` and the geometry record, before cropping
  and normalisation; ``case.label`` None gives no label."""
  if info.spatial_dims == 3:
    image = nifti.to_canonical(nifti.read_volume(case.image, 'image'))
    label = None
    if case.label is not None:
      label = nifti.to_canonical(nifti.read_volume(case.label, 'label', num_classes,
                                                   label_values))
      nifti.check_pair(image, label)
    record = {'original_shape': list(image.original_shape),
              'original_affine': image.original_affine.tolist(),
              'to_canonical': image.to_current.tolist(),
              'canonical_shape': list(image.array.shape),
              'canonical_affine': image.affine.tolist(),
              'original_spacing_mm': list(image.spacing)}
    if target_spacing is not None:
      image = nifti.resample(image, target_spacing, order=1)
      if label is not None:
        label = nifti.resample(label, target_spacing, order=0)
    record['resampled_shape'] = list(image.array.shape)
    record['spacing_mm'] = list(image.spacing)
    record['affine'] = image.affine.tolist()
    return image.array[..., None], None if label is None else label.array, record
  if case.label is not None:
    image_array, label_array = layouts.read_pair_2d(case, label_values)
  else:
    image_array, label_array = layouts.read_image_2d(case.image, 'image'), None
  shape = list(image_array.shape[:2])
  return image_array, label_array, {'original_shape': shape, 'resampled_shape': shape}


def _crop_and_normalise(image_array, label_array, record, options: PrepareOptions):
  if options.crop_nonzero:
    box = intensity.foreground_bbox(np.any(image_array != 0, axis=-1))
  else:
    box = tuple(slice(0, n) for n in image_array.shape[:-1])
  record['crop_box'] = [[s.start, s.stop] for s in box]
  image_array = image_array[box]
  channels = [normalise(image_array[..., c], options) for c in range(image_array.shape[-1])]
  image_array = np.stack(channels, axis=-1).astype(np.float32)
  record['shape'] = list(image_array.shape[:-1])
  record['spatial_dims'] = image_array.ndim - 1
  if label_array is not None:
    label_array = label_array[box].astype(np.uint8)
  return image_array, label_array, record


def _prepare_case(info: layouts.DatasetInfo, case: layouts.Case, options: PrepareOptions,
                  target_spacing, num_classes: Optional[int]):
  image, label, record = _load_pair(info, case, target_spacing, num_classes,
                                    options.label_values)
  return _crop_and_normalise(image, label, record, options)


def prepare_image(path: str, options: PrepareOptions, target_spacing) -> Tuple[np.ndarray, Dict]:
  """Prepares one new image (no label) exactly as training cases were prepared.

  ``target_spacing`` must be the resolved spacing of the training cache
  (:attr:`PreparedDataset.target_spacing`).
  """
  dims = 3 if path.lower().endswith(layouts.NIFTI_SUFFIXES) else 2
  info = layouts.DatasetInfo(os.path.dirname(path), 'single', dims, [], None)
  case = layouts.Case(layouts.strip_suffix(os.path.basename(path)), path, None)
  image, _, record = _crop_and_normalise(*_load_pair(info, case, target_spacing, None), options)
  record['image'] = path
  return image, record


@dataclasses.dataclass
class PreparedDataset:
  """A prepared cache: case ids, class names and the per-case records."""
  directory: str
  case_ids: List[str]
  class_names: List[str]
  spatial_dims: int
  records: Dict[str, Dict]
  fingerprint: Dict
  target_spacing: Optional[Tuple[float, ...]] = None  # resolved, mm (None: kept)
  options: Dict = dataclasses.field(default_factory=dict)  # as resolved

  def resolved_options(self) -> PrepareOptions:
    """The options the cases were prepared with, 'auto' choices resolved; new images
    must be prepared with exactly these."""
    return PrepareOptions(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in self.options.items()})

  def load(self, case_id: str, mmap: bool = True) -> Tuple[np.ndarray, np.ndarray, Dict]:
    """(image ``[*spatial, C]``, label ``[*spatial]``, class locations) of one case."""
    mode = 'r' if mmap else None
    base = os.path.join(self.directory, 'cases', case_id)
    image = np.load(base + '_image.npy', mmap_mode=mode)
    label = np.load(base + '_label.npy', mmap_mode=mode)
    with np.load(base + '_locations.npz') as f:
      locations = {k: f[k] for k in f.files}
    return image, label, locations


def data_key(info: layouts.DatasetInfo, max_cases: int = 0) -> Dict:
  """What identifies the data of a cache entry: the root, ``dataset.json``'s bytes and, per
  case file, its path under the root, size and modification time (ns). An edited, replaced
  or added file changes it; reading it costs one ``stat`` per file, never the data."""
  root = info.root
  cases = info.cases[:max_cases] if max_cases else info.cases
  files = []
  for case in cases:
    for path in (case.image, case.label):
      if path is None:
        continue
      try:
        stat = os.stat(path)
      except OSError:  # missing: the dataset check names it
        files.append([os.path.relpath(path, root), -1, -1])
        continue
      files.append([os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns])
  meta = os.path.join(root, 'dataset.json')
  meta_sha = None
  if os.path.exists(meta):
    with open(meta, 'rb') as f:
      meta_sha = hashlib.sha256(f.read()).hexdigest()
  return {'root': os.path.abspath(root), 'max_cases': max_cases, 'dataset_json_sha256': meta_sha,
          'files': files}


def cache_entry_name(options: PrepareOptions, key: Dict) -> str:
  """``<options hash>-<data hash>``: one entry per (preparation, data) pair."""
  data = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
  return f'{options.key()}-{data}'


def _read_manifest(directory: str) -> Optional[PreparedDataset]:
  path = os.path.join(directory, 'manifest.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    manifest = json.load(f)
  return PreparedDataset(directory, manifest['case_ids'], manifest['class_names'],
                         manifest['spatial_dims'], manifest['records'], manifest['fingerprint'],
                         manifest['target_spacing_mm'], manifest['options'])


def _remove_abandoned(cache_root: str) -> None:
  """Deletes half-written entries (``*.tmp-<pid>``) whose writer process is gone."""
  for path in left_by_dead_processes(cache_root, r'.+\.tmp-(\d+)'):
    shutil.rmtree(path, ignore_errors=True)


def prepare(root: str, cache_root: str, options: PrepareOptions = PrepareOptions(),
            max_cases: int = 0) -> PreparedDataset:
  """Prepares every case of ``root`` once into ``cache_root/<options hash>-<data hash>/``.

  The entry is keyed by the options AND the data (:func:`data_key`): edited labels or a
  second dataset get their own entry. An entry is written into a temporary folder and
  renamed into place when complete, and never modified afterwards, so a trainer that has
  an entry's arrays memory-mapped keeps reading exactly what it started with. A second
  call with the same options and unchanged data returns the entry at once. Any bad case
  stops preparation before training, with every problem listed.
  """
  info = layouts.find_cases(root)
  key = data_key(info, max_cases)
  directory = os.path.join(cache_root, cache_entry_name(options, key))
  existing = _read_manifest(directory)
  if existing is not None:
    return existing
  report = layouts.check_dataset(root, max_cases, options.label_values)
  if report['problems']:
    raise ValueError(f'{root}: {len(report["problems"])} problem(s) found; fix them or remove '
                     'the cases:\n' + '\n'.join(report['problems']))
  cases = info.cases[:max_cases] if max_cases else info.cases
  summary = report['summary']
  if info.class_names:
    class_names = list(info.class_names)
  else:
    top = max(int(k) for e in report['cases'] for k in e['label_voxels'])
    class_names = [str(k) for k in range(top + 1)]
  if options.normalization == 'auto':
    if 'CT' in summary.get('modality', '').upper().split(','):
      window = (summary['foreground_intensity_p00_5'], summary['foreground_intensity_p99_5'])
      options = dataclasses.replace(options, normalization='ct', ct_window=window)
    else:
      options = dataclasses.replace(options, normalization='zscore')
  target = options.target_spacing
  if target == 'auto':
    target = tuple(summary['spacing_median_mm']) if info.spatial_dims == 3 else None
  os.makedirs(cache_root, exist_ok=True)
  _remove_abandoned(cache_root)
  staging = f'{directory}.tmp-{os.getpid()}'
  shutil.rmtree(staging, ignore_errors=True)
  try:
    os.makedirs(os.path.join(staging, 'cases'))
    rng = np.random.default_rng(0)
    records = {}
    for case in cases:
      image, label, record = _prepare_case(info, case, options, target, len(class_names))
      base = os.path.join(staging, 'cases', case.case_id)
      np.save(base + '_image.npy', image)
      np.save(base + '_label.npy', label)
      np.savez(base + '_locations.npz', **class_locations(label, len(class_names), rng))
      record.update(image=case.image, label=case.label)
      records[case.case_id] = record
    manifest = {'root': os.path.abspath(root), 'max_cases': max_cases,
                # The options as resolved ('auto' decided), and the resolved spacing.
                'options': dataclasses.asdict(options), 'target_spacing_mm': target,
                'case_ids': [c.case_id for c in cases], 'class_names': class_names,
                'spatial_dims': info.spatial_dims, 'records': records, 'fingerprint': summary,
                'data_key': key}
    with open(os.path.join(staging, 'manifest.json'), 'w') as f:
      json.dump(manifest, f, default=list)
    try:
      os.rename(staging, directory)  # the entry appears whole, or not at all
    except OSError:
      if _read_manifest(directory) is None:  # not a concurrent writer's finished entry
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return _read_manifest(directory)


def restore_original_grid(prediction: np.ndarray, record: Dict) -> np.ndarray:
  """Maps a label map on the prepared grid back onto the original file's voxel grid.

  Undoes, in reverse order: the crop (background outside), the resampling (nearest) and
  the reorientation. The result has the original file's shape and axis order.
  """
  full = np.zeros(record['resampled_shape'], prediction.dtype)
  full[tuple(slice(a, b) for a, b in record['crop_box'])] = prediction
  if 'canonical_shape' not in record:
    return full
  full = nifti.resample_to_shape(full, record['canonical_shape'], order=0)
  volume = nifti.Volume(array=full, affine=np.array(record['canonical_affine']), path='',
                        original_affine=np.array(record['original_affine']),
                        original_shape=tuple(record['original_shape']),
                        to_current=np.array(record['to_canonical']))
  return nifti.from_canonical(full, volume)


def kfold_split(case_ids: Sequence[str], num_folds: int, fold: int,
                seed: int) -> Dict[str, List[str]]:
  """Seeded k-fold split of the sorted case ids: {'train': [...], 'val': [...]}."""
  if not 0 <= fold < num_folds:
    raise ValueError(f'fold must be in [0, {num_folds - 1}], got {fold}')
  ids = sorted(case_ids)
  if len(ids) < num_folds:
    raise ValueError(f'{len(ids)} cases cannot make {num_folds} folds')
  order = np.random.default_rng(seed).permutation(len(ids))
  folds = np.array_split(order, num_folds)
  val = sorted(ids[i] for i in folds[fold])
  return {'train': [c for c in ids if c not in set(val)], 'val': val}


def parse_target_spacing(text: str):
  if text in ('', 'keep'):
    return None
  if text == 'median':
    return 'auto'
  try:
    values = tuple(float(v) for v in text.split(','))
  except ValueError:
    values = ()
  if len(values) != 3 or min(values) <= 0:
    raise ValueError(f"data.target_spacing must be 'keep', 'median' or 'x,y,z' in mm, got "
                     f'{text!r}')
  return values


def options_from_config(cfg: ml_collections.ConfigDict) -> PrepareOptions:
  """The preparation options of a config's ``data`` section."""
  return PrepareOptions(target_spacing=parse_target_spacing(cfg.target_spacing),
                                normalization=cfg.normalization,
                                ct_window=tuple(cfg.ct_window), crop_nonzero=cfg.crop_nonzero,
                                label_values=tuple(int(v) for v in cfg.label_values))


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  d = config_lib.section(c, 'data')
  d.target_spacing = 'keep'      # 'keep' | 'median' | 'x,y,z' in mm
  d.normalization = 'zscore'     # zscore | zscore_nonzero | ct | percentile | none | auto
  d.ct_window = (-1000.0, 1000.0)
  d.crop_nonzero = True
  # Stored label value of each class, e.g. (255, 0) when the structure of interest is stored
  # as 0 (ISBI membranes), or (0, 1, 2, 4) for BraTS; () = the stored values are the classes.
  d.label_values = ()
