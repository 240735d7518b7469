"""What ``medjax predict`` writes for a detector, and LUNA16-format data as label maps.

Per input file ``<name>`` (its name without extension, LUNA16's ``seriesuid``):

* ``OUT/<name>.json``: every detection's class, score, box on the file's voxel grid
  (``box_voxel``: ``(lo..., hi...)`` along the file's own array axes, voxel ``i`` spanning
  ``[i, i + 1)``) and, for volumes, its centre in world millimetres in both conventions
  (``centre_lps_mm`` as ITK / DICOM / LUNA16, ``centre_ras_mm`` as nibabel / NIfTI) and its
  size in mm along the file's axes;
* ``OUT/detections.csv``: LUNA16's submission columns ``seriesuid,coordX,coordY,coordZ,
  probability`` (world mm, LPS) for volumes;
* ``OUT/detections_coco.json``: for 2D images, COCO JSON of the detections scoring at least
  ``detection.coco_score_threshold`` (for annotation tools).

LUNA16-format data (``imagesTr/<seriesuid>.nii.gz`` + ``annotations.csv`` in world LPS mm)
becomes a labelled dataset once: a sphere of the nodule's diameter around each centre,
rasterised on the scan's own grid (oblique or not), as nnDetection prepares LUNA16.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Mapping, Sequence

import ml_collections
import nibabel as nib
import numpy as np

from medjax import config as config_lib, workdir as workdir_lib
from medjax.data import layouts
from medjax.detection import det_inference, froc, sources


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  config_lib.section(c, 'detection').coco_score_threshold = 0.3


def case_record(found: Mapping[str, np.ndarray], record: Mapping, class_names: Sequence[str]
                ) -> Dict:
  """One file's detections as JSON: boxes on the file's voxel grid, world centres for
  volumes (``record``: the preparation record of the file)."""
  boxes = det_inference.prepared_to_original(found['boxes'], record)
  out = {'image': record.get('image', ''), 'detections': []}
  volume = 'original_affine' in record
  if volume:
    affine = np.asarray(record['original_affine'], np.float64)
    lps = sources.box_to_world_centre(boxes, affine, convention='LPS')
    ras = sources.box_to_world_centre(boxes, affine, convention='RAS')
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
  for i, (box, score, cls) in enumerate(zip(boxes, found['scores'], found['classes'])):
    entry = {'class': class_names[int(cls)], 'score': round(float(score), 5),
             'box_voxel': np.round(box, 3).tolist()}
    if volume:
      entry.update(centre_lps_mm=np.round(lps[i], 3).tolist(),
                   centre_ras_mm=np.round(ras[i], 3).tolist(),
                   size_mm=np.round((box[3:] - box[:3]) * spacing, 3).tolist())
    out['detections'].append(entry)
  return out


def write_predictions(records: Mapping[str, Dict], image_shapes: Mapping[str, Sequence[int]],
                      class_names: Sequence[str], output_dir: str, coco_threshold: float
                      ) -> list:
  """Writes the per-file JSON and ``detections.csv`` (volumes) or ``detections_coco.json``
  (2D images); ``records``: name -> :func:`case_record`. Returns the paths written."""
  written = []
  for name, rec in records.items():
    path = os.path.join(output_dir, f'{name}.json')
    workdir_lib.write_json(path, rec)
    written.append(path)
  if any(len(s) == 3 for s in image_shapes.values()):
    rows = [(name, *d['centre_lps_mm'], d['score'])
            for name, rec in records.items() for d in rec['detections']]
    path = os.path.join(output_dir, 'detections.csv')
    froc.write_luna_csv(path, rows)
    written.append(path)
  else:
    detections = {}
    for name, rec in records.items():
      dets = rec['detections']
      boxes = np.array([d['box_voxel'] for d in dets], np.float32).reshape(-1, 4)
      classes = np.array([class_names.index(d['class']) for d in dets], np.int32)
      scores = np.array([d['score'] for d in dets], np.float32)
      detections[os.path.basename(rec['image']) or name] = (boxes, classes, scores)
    sizes = {os.path.basename(records[n]['image']) or n: s[:2] for n, s in image_shapes.items()}
    path = os.path.join(output_dir, 'detections_coco.json')
    sources.write_coco(detections, sizes, class_names, path, coco_threshold)
    written.append(path)
  return written


# ----- LUNA16-format data ------------------------------------------------------------------
def is_luna_layout(root: str) -> bool:
  """A folder of scans with ``annotations.csv`` and no label maps."""
  return (os.path.isfile(os.path.join(root, 'annotations.csv'))
          and os.path.isdir(os.path.join(root, 'imagesTr'))
          and not os.path.isdir(os.path.join(root, 'labelsTr')))


def sphere_label_map(shape: Sequence[int], affine: np.ndarray, centres_lps: np.ndarray,
                     diameters: np.ndarray) -> np.ndarray:
  """uint8 ``[*shape]``: 1 inside any nodule sphere (voxel centres within the radius, in
  world mm), at least the voxel holding each centre."""
  label = np.zeros(shape, np.uint8)
  if not len(centres_lps):
    return label
  for centre, diameter in zip(centres_lps, diameters):
    voxel = sources.world_to_voxel(centre[None], affine, convention='LPS')[0]
    box = sources.sphere_boxes(centre[None], np.array([diameter]), affine,
                               convention='LPS')[0]
    lo = np.clip(np.floor(box[:3]).astype(int) - 1, 0, shape)
    hi = np.clip(np.ceil(box[3:]).astype(int) + 1, 0, shape)
    # Voxel indices of the sphere's bounding region only (a whole CT grid is GBs).
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing='ij'), -1)
    world = sources.voxel_to_world(grid.reshape(-1, 3).astype(np.float64), affine,
                                   convention='LPS')
    inside = np.linalg.norm(world - centre, axis=1) <= diameter / 2
    region = tuple(slice(a, b) for a, b in zip(lo, hi))
    label[region][inside.reshape(grid.shape[:-1])] = 1
    nearest = np.clip(np.round(voxel).astype(int), 0, np.array(shape) - 1)
    label[tuple(nearest)] = 1
  return label


def luna_as_labelled(root: str, cache_root: str) -> str:
  """The labelled dataset of a LUNA16-format folder (``imagesTr/`` + ``annotations.csv``):
  ``cache/luna_labels_<key>/`` with ``imagesTr/`` linking to the scans and ``labelsTr/``
  holding a sphere label map per scan; made once per annotations file and scan list."""
  scans = layouts.list_files(os.path.join(root, 'imagesTr'), layouts.NIFTI_SUFFIXES)
  annotations = froc.read_luna_csv(os.path.join(root, 'annotations.csv'), 'diameter_mm')
  ids = {layouts.strip_suffix(os.path.basename(p)): p for p in scans}
  unknown = sorted({row[0] for row in annotations} - set(ids))
  if unknown:
    raise ValueError(f"{os.path.join(root, 'annotations.csv')}: seriesuid {unknown[0]} has no "
                     f"scan in {os.path.join(root, 'imagesTr')} ({len(unknown)} unknown)")
  key = hashlib.sha256(json.dumps([os.path.abspath(root), [list(map(str, r)) for r in
                                   annotations], sorted(ids)]).encode()).hexdigest()[:12]
  out = os.path.join(cache_root, f'luna_labels_{key}')
  if os.path.isfile(os.path.join(out, 'done.json')):
    return out
  for sub in ('imagesTr', 'labelsTr'):
    os.makedirs(os.path.join(out, sub), exist_ok=True)
  for case_id, path in sorted(ids.items()):
    image = nib.load(path)
    rows = [r for r in annotations if r[0] == case_id]
    centres = np.array([r[1:4] for r in rows], np.float64).reshape(-1, 3)
    diameters = np.array([r[4] for r in rows], np.float64)
    label = sphere_label_map(image.shape[:3], image.affine, centres, diameters)
    name = os.path.basename(path)
    link = os.path.join(out, 'imagesTr', name)
    if not os.path.lexists(link):
      os.symlink(os.path.abspath(path), link)
    nib.save(nib.Nifti1Image(label, image.affine), os.path.join(out, 'labelsTr', name))
  workdir_lib.write_json(os.path.join(out, 'done.json'), {'root': os.path.abspath(root)})
  return out
