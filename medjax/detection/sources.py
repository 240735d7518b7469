"""Where boxes come from: label and instance maps, world coordinates (LUNA16), COCO JSON.

Host-side NumPy/SciPy. Box convention (all of medjax.detection): a box is ``[..., 2 nd]`` =
``(lo_0, ..., lo_{nd-1}, hi_0, ..., hi_{nd-1})`` in continuous voxel coordinates along the
array's axes (axis 0 first: (X, Y, Z) for prepared RAS volumes, (row, col) for 2D images).
Voxel index ``i`` spans ``[i, i + 1)``: a mask on indices ``a..b`` has ``lo = a, hi = b + 1``.
A box's centre in index coordinates (the ones an affine maps) is ``(lo + hi) / 2 - 0.5``.
Classes are foreground only, ``0..K-1``.

World coordinates: a NIfTI affine maps voxel index coordinates to RAS+ millimetres. LUNA16,
DICOM and ITK give LPS points (x and y negated); :func:`lps_ras` is the one place that
converts.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

CONVENTIONS = ('LPS', 'RAS')


def _empty(nd: int) -> Tuple[np.ndarray, np.ndarray]:
  return np.zeros((0, 2 * nd), np.float32), np.zeros((0,), np.int32)


def _slices_to_box(slices: Sequence[slice]) -> list:
  return [s.start for s in slices] + [s.stop for s in slices]


def _structure(nd: int, connectivity) -> np.ndarray:
  """'full' (every neighbour, 3^nd - 1: nnDetection's rule) or 'face' (2 nd neighbours), or
  an int 1..nd as in scipy.ndimage.generate_binary_structure."""
  rank = {'full': nd, 'face': 1}.get(connectivity, connectivity)
  if not isinstance(rank, (int, np.integer)) or not 1 <= rank <= nd:
    raise ValueError(f"connectivity must be 'full', 'face' or an int in 1..{nd}, "
                     f'got {connectivity!r}')
  return ndimage.generate_binary_structure(nd, int(rank))


def boxes_from_label_map(label: np.ndarray, num_classes: Optional[int] = None,
                         connectivity='full') -> Tuple[np.ndarray, np.ndarray]:
  """One box per connected component of each foreground class of a semantic label map.

  Args:
    label: ``[*spatial]`` integer map; value ``k >= 1`` is class ``k - 1``, 0 background.
    num_classes: the number K of foreground classes; values above K are an error.
    connectivity: 'full' (default), 'face' or an int (see :func:`_structure`).
  Returns:
    boxes ``[N, 2 nd]`` float32 and classes ``[N]`` int32, ordered by class, then by
    scipy.ndimage.label's raster order of the components.
  """
  label = np.asarray(label)
  nd = label.ndim
  if not np.issubdtype(label.dtype, np.integer):
    raise ValueError(f'label map must be integer, got dtype {label.dtype}')
  if label.size and label.min() < 0:
    raise ValueError(f'label map has negative values (e.g. {int(label.min())})')
  top = int(label.max()) if label.size else 0
  if num_classes is not None and top > num_classes:
    raise ValueError(f'label value {top} is outside the {num_classes} foreground classes '
                     f'(values 0..{num_classes})')
  structure = _structure(nd, connectivity)
  boxes, classes = [], []
  for value in np.unique(label[label > 0]):
    components, count = ndimage.label(label == value, structure=structure)
    for slices in ndimage.find_objects(components, count):
      boxes.append(_slices_to_box(slices))
      classes.append(int(value) - 1)
  if not boxes:
    return _empty(nd)
  return np.asarray(boxes, np.float32), np.asarray(classes, np.int32)


def boxes_from_instance_map(instances: np.ndarray, instance_classes: Mapping
                            ) -> Tuple[np.ndarray, np.ndarray]:
  """One box per instance of an instance map (nnDetection's format).

  Args:
    instances: ``[*spatial]`` integer map; value ``i > 0`` is instance ``i``, 0 background.
      An instance in several pieces gets the one box bounding them all.
    instance_classes: instance id -> class (0..K-1); keys int or str (nnDetection's JSON
      writes ``{"1": 0}``). Ids in it but absent from the map (cropped away) are skipped.
  Returns:
    boxes ``[N, 2 nd]`` float32, classes ``[N]`` int32, in increasing instance id.
  """
  instances = np.asarray(instances)
  if not np.issubdtype(instances.dtype, np.integer):
    raise ValueError(f'instance map must be integer, got dtype {instances.dtype}')
  mapping = {int(k): int(v) for k, v in instance_classes.items()}
  present = np.unique(instances)
  present = present[present > 0]
  missing = [int(i) for i in present if int(i) not in mapping]
  if missing:
    raise ValueError(f'instances {missing[:5]} have no class in instance_classes')
  if not present.size:
    return _empty(instances.ndim)
  objects = ndimage.find_objects(instances, int(present.max()))
  boxes = [_slices_to_box(objects[i - 1]) for i in present]
  return (np.asarray(boxes, np.float32),
          np.asarray([mapping[int(i)] for i in present], np.int32))


# World <-> voxel.

def lps_ras(points: np.ndarray) -> np.ndarray:
  """``[..., 3]`` LPS <-> RAS (its own inverse): x and y negated."""
  points = np.array(points, np.float64)
  points[..., :2] = -points[..., :2]
  return points


def _check_convention(convention: str) -> None:
  if convention not in CONVENTIONS:
    raise ValueError(f"convention must be 'LPS' or 'RAS', got {convention!r}")


def world_to_voxel(points_mm: np.ndarray, affine: np.ndarray, *, convention: str
                   ) -> np.ndarray:
  """``[N, 3]`` world points (mm, ``convention``) -> ``[N, 3]`` voxel index coordinates of
  the array whose RAS ``affine`` ``[4, 4]`` is given (integer = voxel centre)."""
  _check_convention(convention)
  ras = np.asarray(points_mm, np.float64)
  if convention == 'LPS':
    ras = lps_ras(ras)
  affine = np.asarray(affine, np.float64)
  return (ras - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T


def voxel_to_world(voxels: np.ndarray, affine: np.ndarray, *, convention: str) -> np.ndarray:
  """``[N, 3]`` voxel index coordinates -> world points (mm, ``convention``)."""
  _check_convention(convention)
  affine = np.asarray(affine, np.float64)
  ras = np.asarray(voxels, np.float64) @ affine[:3, :3].T + affine[:3, 3]
  return lps_ras(ras) if convention == 'LPS' else ras


def sphere_boxes(centres_mm: np.ndarray, diameters_mm: np.ndarray, affine: np.ndarray, *,
                 convention: str) -> np.ndarray:
  """``[N, 6]`` float32: the voxel-space bounding box of each sphere.

  Voxel coordinates are ``v = B (w - t)`` with ``B`` the inverse of the affine's linear
  part, so a sphere of radius r maps to an ellipsoid whose half extent along voxel axis i is
  ``r * |row i of B|`` (for an axis-aligned affine, ``r / spacing_i``; for an oblique one,
  wider than the sphere's own voxel footprint would be along a rotated axis). The box is the
  ellipsoid's extent around the centre, in the edge convention: a voxel whose centre lies in
  the sphere has its centre inside the box.
  """
  centres = world_to_voxel(centres_mm, affine, convention=convention)
  inverse = np.linalg.inv(np.asarray(affine, np.float64)[:3, :3])
  half = 0.5 * np.asarray(diameters_mm, np.float64)[:, None] * np.linalg.norm(inverse, axis=1)
  return np.concatenate([centres - half + 0.5, centres + half + 0.5], -1).astype(np.float32)


LUNA_COLUMNS = ('coordX', 'coordY', 'coordZ', 'diameter_mm')


def luna_boxes(rows, affine: np.ndarray, convention: str = 'LPS'
               ) -> Tuple[np.ndarray, np.ndarray]:
  """LUNA16 nodules -> voxel boxes of the array with RAS ``affine``.

  Args:
    rows: annotations.csv rows (mappings with coordX, coordY, coordZ, diameter_mm, e.g. from
      csv.DictReader) or an array ``[N, 4]`` in that column order. LUNA16 world points are
      LPS (ITK); ``convention`` says otherwise.
  Returns:
    boxes ``[N, 6]`` float32 (:func:`sphere_boxes`) and diameters ``[N]`` float32 (mm).
  """
  if isinstance(rows, np.ndarray):
    table = np.asarray(rows, np.float64).reshape(-1, 4)
  else:
    try:
      table = np.array([[float(r[c]) for c in LUNA_COLUMNS] for r in rows], np.float64)
    except KeyError as e:
      raise ValueError(f'LUNA16 row without column {e}; expected {LUNA_COLUMNS}') from None
  table = table.reshape(-1, 4)
  if np.any(table[:, 3] <= 0):
    raise ValueError(f'LUNA16 diameters must be positive, got {table[:, 3].min()}')
  boxes = sphere_boxes(table[:, :3], table[:, 3], affine, convention=convention)
  return boxes, table[:, 3].astype(np.float32)


def box_to_world_centre(boxes: np.ndarray, affine: np.ndarray, *, convention: str
                        ) -> np.ndarray:
  """``[N, 6]`` voxel boxes -> ``[N, 3]`` world centres (mm, ``convention``)."""
  boxes = np.asarray(boxes, np.float64)
  centres = 0.5 * (boxes[:, :3] + boxes[:, 3:]) - 0.5
  return voxel_to_world(centres, affine, convention=convention)


def prepared_affine(record: Mapping) -> np.ndarray:
  """``[4, 4]``: the RAS affine of a prepared, cropped array (:mod:`medjax.data.prepare`).

  The record's 'affine' is that of the reoriented, resampled grid before the crop; the crop
  starting at voxel ``c`` moves the origin to that grid's voxel ``c``.
  """
  if 'affine' not in record:
    raise ValueError('prepared record has no affine (a 2D image): no world coordinates')
  affine = np.array(record['affine'], np.float64)
  start = np.array([lo for lo, _ in record['crop_box']], np.float64)
  affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
  return affine


# COCO JSON (2D image folders). COCO's bbox is [x, y, w, h] with x the column and y the row,
# pixel i spanning [i, i + 1) (pycocotools' toBbox: a mask on columns a..b has w = b - a + 1),
# so it is our (row, col) [lo, hi) box with the two axes swapped.

class CocoData(NamedTuple):
  """``images``: file_name -> (boxes ``[N, 4]`` float32 (row, col) [lo, hi), classes
  ``[N]`` int32); ``class_names`` in class order; ``image_sizes``: file_name -> (H, W)."""
  images: Dict[str, Tuple[np.ndarray, np.ndarray]]
  class_names: list
  image_sizes: Dict[str, Tuple[int, int]]


def _coco_json(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not a readable COCO JSON file ({type(e).__name__}: {e})') \
        from None
  missing = [k for k in ('images', 'annotations', 'categories')
             if not isinstance(data, dict) or not isinstance(data.get(k), list)]
  if missing:
    raise ValueError(f'{path}: COCO JSON without the list(s) {missing}')
  return data


def _coco_box(ann: dict, size: Tuple[int, int], category: Dict[int, int], path: str
              ) -> Tuple[list, int]:
  where = f"{path}: annotation {ann.get('id')!r}"
  if ann.get('iscrowd', 0):
    raise ValueError(f'{where}: iscrowd annotations are not supported (crowd regions are '
                     'refused rather than silently trained on or dropped)')
  if ann.get('category_id') not in category:
    raise ValueError(f"{where}: unknown category_id {ann.get('category_id')!r}")
  try:
    x, y, w, h = (float(v) for v in ann['bbox'])
  except (KeyError, TypeError, ValueError):
    raise ValueError(f"{where}: bbox must be [x, y, w, h], got {ann.get('bbox')!r}") from None
  height, width = size
  if not (w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height):
    raise ValueError(f'{where}: bbox {[x, y, w, h]} is empty or outside the '
                     f'{height}x{width} image')
  return [y, x, y + h, x + w], category[ann['category_id']]


def read_coco(json_path: str) -> CocoData:
  """A COCO detection JSON -> :class:`CocoData`.

  Category ids map to classes 0..K-1 in sorted id order (class names from the categories'
  names, in that order). Every listed image appears, with no boxes if it has none. Crowd
  annotations (``iscrowd`` 1) are refused. A bad file, an unknown image or category, or a
  box empty or outside its image raises ValueError naming the file and annotation id.
  """
  data = _coco_json(json_path)
  try:
    ids = sorted(int(c['id']) for c in data['categories'])
    names = {int(c['id']): str(c['name']) for c in data['categories']}
    images = {i['id']: (str(i['file_name']), (int(i['height']), int(i['width'])))
              for i in data['images']}
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f'{json_path}: categories need id and name, images need id, file_name, '
                     f'height and width ({type(e).__name__}: {e})') from None
  if len(set(ids)) != len(ids) or len({f for f, _ in images.values()}) != len(images):
    raise ValueError(f'{json_path}: duplicate category ids or image file names')
  category = {cid: k for k, cid in enumerate(ids)}
  found = {name: ([], []) for name, _ in images.values()}
  for ann in data['annotations']:
    if ann.get('image_id') not in images:
      raise ValueError(f"{json_path}: annotation {ann.get('id')!r}: unknown image_id "
                       f"{ann.get('image_id')!r}")
    name, size = images[ann['image_id']]
    box, cls = _coco_box(ann, size, category, json_path)
    found[name][0].append(box)
    found[name][1].append(cls)
  out = {name: (np.asarray(b, np.float32).reshape(-1, 4), np.asarray(c, np.int32))
         for name, (b, c) in found.items()}
  return CocoData(out, [names[i] for i in ids], {n: s for n, s in images.values()})


def write_coco(detections: Mapping, image_sizes: Mapping, class_names: Sequence[str],
               path: str, score_threshold: float = 0.0) -> None:
  """Writes detections as a COCO JSON (images, categories, annotations with ``score``).

  Args:
    detections: file_name -> (boxes ``[N, 4]`` (row, col) [lo, hi), classes ``[N]``,
      scores ``[N]``); boxes scoring below ``score_threshold`` are left out.
    image_sizes: file_name -> (H, W), for every image of ``detections``.
    class_names: class k is written as category id k + 1 (read back as class k).
  """
  unknown = sorted(set(detections) - set(image_sizes))
  if unknown:
    raise ValueError(f'no image size for {unknown[:5]}')
  images, annotations = [], []
  for image_id, name in enumerate(sorted(image_sizes), start=1):
    height, width = (int(v) for v in image_sizes[name])
    images.append({'id': image_id, 'file_name': name, 'height': height, 'width': width})
    boxes, classes, scores = (np.asarray(a) for a in detections.get(name, ([], [], [])))
    for box, cls, score in zip(boxes.reshape(-1, 4), classes.reshape(-1), scores.reshape(-1)):
      if score < score_threshold:
        continue
      r0, c0, r1, c1 = (float(v) for v in box)
      if not (0 <= r0 < r1 <= height and 0 <= c0 < c1 <= width) or \
          not 0 <= cls < len(class_names):
        raise ValueError(f'{name}: detection box {[r0, c0, r1, c1]} class {int(cls)} is empty, '
                         f'outside the {height}x{width} image or of an unknown class')
      annotations.append({'id': len(annotations) + 1, 'image_id': image_id,
                          'category_id': int(cls) + 1, 'bbox': [c0, r0, c1 - c0, r1 - r0],
                          'area': (c1 - c0) * (r1 - r0), 'iscrowd': 0,
                          'score': float(score)})
  categories = [{'id': k + 1, 'name': str(n)} for k, n in enumerate(class_names)]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump({'images': images, 'annotations': annotations, 'categories': categories}, f)
