"""Synthetic LUNA16-format lung-nodule data: CT-like NIfTI volumes and ``annotations.csv``.

:func:`write_luna_dataset` writes::

  root/imagesTr/<seriesuid>.nii.gz   int16 HU, qform and sform set (scanner, mm)
  root/annotations.csv               seriesuid,coordX,coordY,coordZ,diameter_mm

as LUNA16 does (with NIfTI in place of MetaImage): one row per nodule, none for a scan
without nodules, centres in world millimetres in ITK's LPS convention, i.e. nibabel's RAS
world coordinates with x and y negated (:func:`ras_to_lps`). The volumes
(:mod:`medjax.data.synthetic_chest`) hold air, body, ribs, spine, lungs with texture,
branching vessels and vessel-like blobs (the distractors) and 0-3 solid nodules of 3-30 mm
(more small than large; some juxta-pleural). Scans differ in shape, spacing (in-plane
0.6-0.9 mm, slices 1-2.5 mm), origin and voxel-axis orientation: LPS (as ITK writes),
RAS, flipped or transposed axes and gantry-tilted (oblique) grids.

Volumes are small for CPU tests (by default 96-128 x 96-128 x 40-64 voxels, ``size`` scales
them), so the field of view, and the patient in it, is smaller than a real chest while the
nodules keep their real sizes in mm; where a lung is too small for a large nodule the
diameter distribution is truncated to what fits. The same ``seed`` gives byte-identical
files, and case ``i`` does not depend on ``num_cases``.

  python -m medjax.data.synthetic_luna OUT_DIR --cases 20 --seed 0 [--size 0.6]
"""

from __future__ import annotations

import argparse
import glob
import os
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np

from medjax.data import synthetic_chest
from medjax.data.synthetic_chest import Grid
from medjax.detection.sources import lps_ras

# Voxels along the patient's (left-right, posterior-anterior, inferior-superior) axes.
DEFAULT_SHAPE_RANGE = ((96, 128), (96, 128), (40, 64))
SLICE_MM = (1.0, 1.25, 1.5, 2.0, 2.5)
# Voxel-axis orientations (nibabel axis codes: where each array axis increases towards),
# whether the grid is gantry-tilted, and how often. ITK (and so LUNA16's .mhd converted to
# NIfTI) stores LPS; NIfTI tools often write RAS; the rest are flips, a transpose, a tilt.
ORIENTATIONS = ((('L', 'P', 'S'), False, 0.35), (('R', 'A', 'S'), False, 0.25),
                (('L', 'P', 'I'), False, 0.10), (('R', 'P', 'S'), False, 0.05),
                (('L', 'A', 'S'), False, 0.05), (('P', 'L', 'S'), False, 0.05),
                (('L', 'P', 'S'), True, 0.15))
NODULE_COUNT_PROBS = (0.3, 0.4, 0.2, 0.1)  # 0..3 nodules; LUNA16: about 1/3 of scans have none
_UNIT = {'R': (0, 1.0), 'L': (0, -1.0), 'A': (1, 1.0), 'P': (1, -1.0), 'S': (2, 1.0),
         'I': (2, -1.0)}
CSV_HEADER = 'seriesuid,coordX,coordY,coordZ,diameter_mm'


# World points [..., 3] RAS mm (nibabel) <-> LPS mm (ITK, DICOM, LUNA16): x, y negated; the
# one conversion of medjax (medjax.detection.sources), its own inverse.
ras_to_lps = lps_to_ras = lps_ras


def _tilt(degrees: float) -> np.ndarray:
  """Rotation about the left-right axis (a CT gantry tilt)."""
  c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
  return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _grid(rng: np.random.Generator, shape_range, size: float):
  """A scan's grid, its field of view (LR, AP, SI mm), the world point (RAS) at its centre
  and whether it is tilted."""
  counts = [max(1, int(round(rng.integers(lo, hi + 1) * size))) for lo, hi in shape_range]
  inplane = round(float(rng.uniform(0.6, 0.9)), 4)
  patient_spacing = (inplane, inplane, float(rng.choice(SLICE_MM)))
  choice = rng.choice(len(ORIENTATIONS), p=[p for _, _, p in ORIENTATIONS])
  codes, tilted, _ = ORIENTATIONS[choice]
  axes = [_UNIT[c][0] for c in codes]
  directions = np.zeros((3, 3))
  for voxel_axis, code in enumerate(codes):
    directions[_UNIT[code][0], voxel_axis] = _UNIT[code][1]
  if tilted:
    directions = _tilt(rng.choice([-1, 1]) * rng.uniform(5, 15)) @ directions
  shape = tuple(counts[a] for a in axes)
  matrix = directions * np.array([patient_spacing[a] for a in axes])
  centre = np.array([rng.uniform(-30, 30), rng.uniform(-40, 40), rng.uniform(-250, -80)])
  affine = np.eye(4)
  affine[:3, :3] = matrix
  affine[:3, 3] = centre - matrix @ ((np.array(shape) - 1) / 2)
  # The header stores the affine as float32: use exactly what a reader will get.
  affine = affine.astype(np.float32).astype(np.float64)
  extent = np.array(counts) * np.array(patient_spacing)
  return Grid(affine, shape), extent, centre, bool(tilted)


def _series_uid(seed: int, index: int) -> str:
  """A DICOM UID under 2.25 (UUID-derived), fixed by ``(seed, index)``."""
  return f'2.25.{uuid.uuid5(uuid.NAMESPACE_URL, f"medjax/synthetic_luna/{seed}/{index}").int}'


def _nodule_record(grid: Grid, nodule: dict) -> dict:
  voxel = np.asarray(nodule['voxel'], np.float64)
  ras = grid.to_world(voxel)
  half = nodule['diameter_mm'] / 2 / grid.spacing
  return {'voxel': voxel, 'world_ras': ras, 'world_lps': ras_to_lps(ras),
          'diameter_mm': nodule['diameter_mm'], 'juxtapleural': nodule['juxtapleural'],
          # Box convention of medjax.detection: (lo..., hi...), voxel i spans [i, i + 1).
          'box': np.concatenate([voxel + 0.5 - half, voxel + 0.5 + half])}


def make_case(seed: int, index: int, shape_range=DEFAULT_SHAPE_RANGE,
              size: float = 1.0) -> Tuple[np.ndarray, dict]:
  """Case ``index`` of the dataset of ``seed``: int16 HU ``[X, Y, Z]`` and its record
  (``seriesuid``, ``affine [4, 4]``, ``shape``, ``spacing``, ``axcodes``, ``tilted``,
  ``num_blobs`` and ``nodules``: dicts of ``voxel`` (continuous index centre), ``world_ras``,
  ``world_lps``, ``diameter_mm``, ``juxtapleural``, ``box [6]``)."""
  rng = np.random.default_rng([seed, index])
  grid, extent, centre, tilted = _grid(rng, shape_range, size)
  offset = np.array([rng.uniform(-0.03, 0.03) * extent[0], rng.uniform(-0.03, 0.03) * extent[1],
                     0.0])
  chest = synthetic_chest.draw_chest(rng, centre + offset, extent)
  count = int(rng.choice(len(NODULE_COUNT_PROBS), p=NODULE_COUNT_PROBS))
  image, nodules, num_blobs = synthetic_chest.render(rng, chest, grid, count)
  return image, {
      'seriesuid': _series_uid(seed, index), 'affine': grid.affine, 'shape': grid.shape,
      'spacing': tuple(float(s) for s in grid.spacing),
      'axcodes': tuple(nib.aff2axcodes(grid.affine)),
      'tilted': tilted,
      'num_blobs': num_blobs, 'nodules': [_nodule_record(grid, n) for n in nodules]}


def _check(num_cases, shape_range, size) -> None:
  if isinstance(num_cases, bool) or not isinstance(num_cases, (int, np.integer)) or num_cases < 1:
    raise ValueError(f'num_cases must be a positive integer, got {num_cases!r}')
  if np.shape(shape_range) != (3, 2) or any(lo > hi for lo, hi in shape_range):
    raise ValueError(f'shape_range must be three (min, max) voxel counts (LR, AP, SI), '
                     f'got {shape_range!r}')
  smallest = [lo * size for lo, _ in shape_range]
  if min(smallest[:2]) < 48 or smallest[2] < 16:
    raise ValueError(f'volumes too small for a chest: at least 48 x 48 x 16 voxels, got '
                     f'shape_range {shape_range!r} x size {size}')


def _nifti(image: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
  nifti = nib.Nifti1Image(image, affine)
  nifti.set_qform(affine, code=1)  # 1: scanner coordinates
  nifti.set_sform(affine, code=1)
  nifti.header.set_xyzt_units('mm', 'sec')
  nifti.header.set_data_dtype(np.int16)
  nifti.header['descrip'] = b'medjax synthetic chest CT (HU)'
  return nifti


def write_luna_dataset(root: str, num_cases: int = 10, seed: int = 0,
                       shape_range: Sequence[Tuple[int, int]] = DEFAULT_SHAPE_RANGE,
                       size: float = 1.0) -> List[Dict]:
  """Writes ``num_cases`` scans and ``annotations.csv`` under ``root`` (see the module
  docstring); returns the per-case records of :func:`make_case` (plus ``image``, the
  path relative to ``root``). ``shape_range``: (min, max) voxels along the patient's
  LR, AP, SI axes, multiplied by ``size``."""
  _check(num_cases, shape_range, size)
  images_dir = os.path.join(root, 'imagesTr')
  existing = glob.glob(os.path.join(images_dir, '*.nii.gz'))
  if existing:
    raise ValueError(f'{images_dir} already holds {len(existing)} volumes; write into an '
                     f'empty folder')
  os.makedirs(images_dir, exist_ok=True)
  records, rows = [], [CSV_HEADER]
  for index in range(num_cases):
    image, record = make_case(seed, index, shape_range, size)
    record['image'] = f'imagesTr/{record["seriesuid"]}.nii.gz'
    nib.save(_nifti(image, record['affine']), os.path.join(root, record['image']))
    for nodule in record['nodules']:
      x, y, z = nodule['world_lps']
      rows.append(f'{record["seriesuid"]},{x:.6f},{y:.6f},{z:.6f},{nodule["diameter_mm"]:.6f}')
    records.append(record)
  with open(os.path.join(root, 'annotations.csv'), 'w', newline='') as f:
    f.write('\n'.join(rows) + '\n')
  return records


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m medjax.data.synthetic_luna',
      description='Write synthetic LUNA16-format CT volumes and annotations.csv.')
  parser.add_argument('out_dir')
  parser.add_argument('--cases', type=int, default=10)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--size', type=float, default=1.0,
                      help='scale of the default 96-128 x 96-128 x 40-64 voxel volumes')
  args = parser.parse_args(argv)
  try:
    records = write_luna_dataset(args.out_dir, args.cases, args.seed, size=args.size)
  except ValueError as e:
    parser.exit(2, f'error: {e}\n')
  nodules = sum(len(r['nodules']) for r in records)
  empty = sum(not r['nodules'] for r in records)
  print(f'wrote {len(records)} volumes ({nodules} nodules; {empty} scans without) and '
        f'annotations.csv to {args.out_dir}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
