"""Box sources: label/instance maps against scipy's find_objects, world <-> voxel through
NIfTI files (RAS, LPS and oblique affines) and medjax's preparation, COCO JSON round trips
and pycocotools' box convention."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medjax.data import prepare
from medjax.detection import sources


def _find_objects_boxes(instances, classes):
  """The reference: scipy.ndimage.find_objects on a hand-made instance map."""
  boxes = [[s.start for s in sl] + [s.stop for s in sl]
           for sl in ndimage.find_objects(instances)]
  rows = np.concatenate([np.asarray(boxes, np.float64), np.asarray(classes)[:, None]], 1)
  return rows[np.lexsort(rows.T[::-1])]


def _rows(boxes, classes):
  rows = np.concatenate([np.asarray(boxes, np.float64), np.asarray(classes)[:, None]], 1)
  return rows[np.lexsort(rows.T[::-1])]


def _hand_made_map():
  """Instance map ``[9, 12]`` with its classes; instances 2 and 3 touch only diagonally."""
  instances = np.zeros((9, 12), np.int32)
  instances[1:3, 1:4] = 1             # class 0
  instances[4:6, 2:4] = 2             # class 0
  instances[6:8, 4:5] = 3             # class 0, diagonal neighbour of 2
  instances[0:9, 7] = 4               # class 1: a column
  instances[2, 9:12] = 5              # class 0, beside 4 with a gap
  instances[5:7, 10] = 6              # class 1
  return instances, np.array([0, 0, 0, 1, 0, 1])


def test_label_map_components_match_find_objects():
  instances, classes = _hand_made_map()
  label = np.where(instances > 0, np.concatenate([[0], classes + 1])[instances], 0)
  boxes, cls = sources.boxes_from_label_map(label, num_classes=2, connectivity='face')
  assert boxes.dtype == np.float32 and cls.dtype == np.int32 and boxes.shape == (6, 4)
  np.testing.assert_array_equal(_rows(boxes, cls), _find_objects_boxes(instances, classes))
  # Full connectivity (the default) joins the diagonal neighbours 2 and 3 into one box.
  joined = np.where(instances == 3, 2, instances)
  joined = np.unique(joined, return_inverse=True)[1].reshape(joined.shape).astype(np.int32)
  np.testing.assert_array_equal(_rows(*sources.boxes_from_label_map(label)),
                                _find_objects_boxes(joined, classes[[0, 1, 3, 4, 5]]))


def test_label_map_3d_random_blobs_and_ordering():
  rng = np.random.default_rng(0)
  instances = np.zeros((20, 18, 16), np.int32)
  classes = []
  for i in range(1, 7):  # separated cubes on a 3x3x... lattice
    lo = np.array([(i - 1) % 3 * 6, (i - 1) // 3 * 8, 2]) + rng.integers(0, 2, 3)
    size = rng.integers(2, 5, 3)
    instances[tuple(slice(a, a + s) for a, s in zip(lo, size))] = i
    classes.append(int(rng.integers(0, 3)))
  classes = np.array(classes)
  label = np.where(instances > 0, np.concatenate([[0], classes + 1])[instances], 0)
  boxes, cls = sources.boxes_from_label_map(label.astype(np.uint8))
  np.testing.assert_array_equal(_rows(boxes, cls), _find_objects_boxes(instances, classes))
  assert np.all(np.diff(cls) >= 0)  # ordered by class
  empty_boxes, empty_classes = sources.boxes_from_label_map(np.zeros((4, 5, 6), np.uint8))
  assert empty_boxes.shape == (0, 6) and empty_classes.shape == (0,)


def test_instance_map_boxes_and_classes():
  instances, classes = _hand_made_map()
  instances[8, 0] = 1  # instance 1 in two pieces: one box bounds both
  mapping = {str(i + 1): int(c) for i, c in enumerate(classes)}
  mapping['9'] = 1  # listed but absent (e.g. cropped away): skipped
  boxes, cls = sources.boxes_from_instance_map(instances, mapping)
  np.testing.assert_array_equal(boxes[0], [1, 0, 9, 4])
  np.testing.assert_array_equal(_rows(boxes, cls), _find_objects_boxes(instances, classes))
  with pytest.raises(ValueError, match=r'instances \[6\] have no class'):
    sources.boxes_from_instance_map(instances, {k: v for k, v in mapping.items() if k != '6'})


def test_label_map_bad_input():
  with pytest.raises(ValueError, match='label value 3 is outside the 2 foreground classes'):
    sources.boxes_from_label_map(np.array([[0, 3]]), num_classes=2)
  with pytest.raises(ValueError, match='must be integer'):
    sources.boxes_from_label_map(np.zeros((3, 3), np.float32))
  with pytest.raises(ValueError, match='connectivity'):
    sources.boxes_from_label_map(np.zeros((3, 3), np.int32), connectivity=3)


# World <-> voxel.

SHAPE = (28, 24, 20)
SPACING = np.array([0.9, 1.1, 1.6])


def _affines():
  ras = np.diag(list(SPACING) + [1.0])
  ras[:3, 3] = [-12.0, 8.0, -20.0]
  lps = np.diag(list(SPACING * [-1, -1, 1]) + [1.0])  # axes run Left, Posterior, Superior
  lps[:3, 3] = [14.0, 30.0, -15.0]
  a, b = np.deg2rad(25), np.deg2rad(-15)
  rotation = (np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
              @ np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]]))
  oblique = np.eye(4)
  oblique[:3, :3] = rotation @ np.diag(SPACING)
  oblique[:3, 3] = [-5.0, -20.0, 4.0]
  return {'RAS': ras, 'LPS': lps, 'oblique': oblique}


def _sphere_volume(affine, centre_ras, radius, path):
  """Writes a NIfTI of a bright sphere (voxel centres within ``radius`` mm of the point)
  inside a dimmer block (zero outside it, so preparation crops)."""
  grid = np.stack(np.indices(SHAPE), -1).reshape(-1, 3)
  world = nib.affines.apply_affine(affine, grid).reshape(SHAPE + (3,))
  sphere = np.linalg.norm(world - centre_ras, axis=-1) <= radius
  image = np.zeros(SHAPE, np.float32)
  image[6:-4, 5:-5, 4:-4] = 1.0
  image[sphere] = 10.0
  nib.save(nib.Nifti1Image(image, affine), str(path))
  return sphere


def test_lps_ras_and_round_trips_against_nibabel():
  rng = np.random.default_rng(1)
  points = rng.normal(0, 50, (7, 3))
  np.testing.assert_array_equal(sources.lps_ras(sources.lps_ras(points)), points)
  for affine in _affines().values():
    voxels = rng.uniform(0, 20, (7, 3))
    ras = nib.affines.apply_affine(affine, voxels)
    np.testing.assert_allclose(sources.voxel_to_world(voxels, affine, convention='RAS'), ras,
                               atol=1e-9)
    lps = sources.voxel_to_world(voxels, affine, convention='LPS')
    np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-9)
    np.testing.assert_allclose(sources.world_to_voxel(lps, affine, convention='LPS'), voxels,
                               atol=1e-9)
  with pytest.raises(ValueError, match="'LPS' or 'RAS'"):
    sources.world_to_voxel(points, np.eye(4), convention='lps')


@pytest.mark.parametrize('name', ['RAS', 'LPS', 'oblique'])
def test_luna_box_from_a_nifti_sphere(tmp_path, name):
  affine = _affines()[name]
  centre_ras = nib.affines.apply_affine(affine, [13.3, 11.6, 9.2])
  centre_lps = centre_ras * [-1, -1, 1]
  radius = 4.5
  sphere = _sphere_volume(affine, centre_ras, radius, tmp_path / 'case.nii.gz')
  loaded = nib.load(str(tmp_path / 'case.nii.gz')).affine
  row = {'seriesuid': 'x', 'coordX': str(centre_lps[0]), 'coordY': str(centre_lps[1]),
         'coordZ': str(centre_lps[2]), 'diameter_mm': str(2 * radius)}
  boxes, diameters = sources.luna_boxes([row], loaded)
  assert boxes.shape == (1, 6) and diameters.tolist() == [2 * radius]
  box = boxes[0].astype(np.float64)
  # Every sphere voxel's centre is in the box; the box is within a voxel of the mask's box.
  voxels = np.argwhere(sphere) + 0.5
  assert np.all(voxels >= box[:3] - 1e-4) and np.all(voxels <= box[3:] + 1e-4)
  mask_box = sources.boxes_from_label_map(sphere.astype(np.uint8))[0][0]
  np.testing.assert_allclose(mask_box, box, atol=1.0)
  # The box is the sphere's voxel-space bound: reference from points on its surface.
  direction = np.random.default_rng(2).normal(size=(20000, 3))
  surface = centre_ras + radius * direction / np.linalg.norm(direction, axis=1, keepdims=True)
  surface_voxels = nib.affines.apply_affine(np.linalg.inv(loaded), surface) + 0.5
  np.testing.assert_allclose(box[:3], surface_voxels.min(0), atol=2e-2)
  np.testing.assert_allclose(box[3:], surface_voxels.max(0), atol=2e-2)
  np.testing.assert_allclose(sources.box_to_world_centre(boxes, loaded, convention='LPS')[0],
                             centre_lps, atol=1e-4)
  same, _ = sources.luna_boxes(np.array([[*centre_ras, 2 * radius]]), loaded, 'RAS')
  np.testing.assert_allclose(same, boxes, atol=1e-5)


@pytest.mark.parametrize('name', ['LPS', 'oblique'])
def test_box_on_the_prepared_array_matches_the_world_point(tmp_path, name):
  affine = _affines()[name]
  centre_ras = nib.affines.apply_affine(affine, [14.1, 10.7, 9.4])
  radius = 5.0
  path = tmp_path / 'case.nii.gz'
  _sphere_volume(affine, centre_ras, radius, path)
  image, record = prepare.prepare_image(str(path), prepare.PrepareOptions(), (1.3, 1.3, 1.3))
  assert record['crop_box'][0][0] > 0 and record['resampled_shape'] != list(SHAPE)
  image = image[..., 0]
  sphere = image > (image.max() + np.median(image)) / 2  # the bright voxels after resampling
  found = sources.boxes_from_label_map(sphere.astype(np.uint8))[0]
  world_affine = sources.prepared_affine(record)
  expect, _ = sources.luna_boxes(np.array([[*centre_ras, 2 * radius]]), world_affine, 'RAS')
  # Linear resampling blurs the sphere's edge by up to a voxel of the original grid, so the
  # thresholded voxels' box is a voxel or so off; its centre much less (measured up to 0.6
  # voxels over random spheres); a crop left out of the affine moves it by 2-4 voxels.
  np.testing.assert_allclose(found, expect, atol=1.5)
  np.testing.assert_allclose(found[:, :3] + found[:, 3:], expect[:, :3] + expect[:, 3:],
                             atol=2 * 0.75)
  # The prepared affine is the resampled grid's, moved to the crop's corner.
  start = [lo for lo, _ in record['crop_box']]
  np.testing.assert_allclose(nib.affines.apply_affine(world_affine, [0, 0, 0]),
                             nib.affines.apply_affine(np.array(record['affine']), start))
  with pytest.raises(ValueError, match='no affine'):
    sources.prepared_affine({'crop_box': [[0, 4], [0, 4]]})


# COCO JSON.

def _coco_dict():
  return {
      'images': [{'id': 10, 'file_name': 'a.png', 'height': 30, 'width': 40},
                 {'id': 11, 'file_name': 'b.png', 'height': 20, 'width': 20},
                 {'id': 12, 'file_name': 'empty.png', 'height': 8, 'width': 8}],
      'categories': [{'id': 7, 'name': 'mass'}, {'id': 3, 'name': 'nodule'}],
      'annotations': [
          {'id': 1, 'image_id': 10, 'category_id': 7, 'bbox': [5, 2, 10, 4], 'iscrowd': 0},
          {'id': 2, 'image_id': 10, 'category_id': 3, 'bbox': [0.5, 1.5, 3.25, 28.5]},
          {'id': 3, 'image_id': 11, 'category_id': 3, 'bbox': [10, 12, 10, 8]}]}


def _write(tmp_path, data, name='ann.json'):
  path = tmp_path / name
  path.write_text(json.dumps(data))
  return str(path)


def test_read_coco_axes_classes_and_empty_images(tmp_path):
  coco = sources.read_coco(_write(tmp_path, _coco_dict()))
  assert coco.class_names == ['nodule', 'mass']  # sorted category ids 3, 7 -> classes 0, 1
  assert coco.image_sizes == {'a.png': (30, 40), 'b.png': (20, 20), 'empty.png': (8, 8)}
  boxes, classes = coco.images['a.png']
  np.testing.assert_array_equal(boxes, [[2, 5, 6, 15], [1.5, 0.5, 30, 3.75]])
  np.testing.assert_array_equal(classes, [1, 0])
  assert coco.images['empty.png'][0].shape == (0, 4)


def test_coco_box_convention_matches_pycocotools_masks():
  mask_utils = pytest.importorskip('pycocotools.mask')
  mask = np.zeros((15, 21), np.uint8)
  mask[3:9, 4:17] = 1
  mask[9, 10] = 1
  x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask)))
  ours = sources.boxes_from_label_map(mask)[0][0]
  np.testing.assert_array_equal(ours, [y, x, y + h, x + w])


def test_write_read_coco_round_trip(tmp_path):
  rng = np.random.default_rng(3)
  sizes = {'a.png': (30, 40), 'b.png': (25, 17), 'c.png': (9, 9)}
  detections = {}
  for name, (h, w) in sizes.items():
    n = int(rng.integers(0, 5))
    lo = rng.uniform(0, [h - 2, w - 2], (n, 2))
    hi = lo + rng.uniform(0.5, 1, (n, 2)) * ([h, w] - lo)
    detections[name] = (np.concatenate([lo, hi], 1).astype(np.float32),
                        rng.integers(0, 3, n), rng.uniform(0, 1, n))
  path = str(tmp_path / 'out' / 'pred.json')
  sources.write_coco(detections, sizes, ['x', 'y', 'z'], path, score_threshold=0.3)
  coco = sources.read_coco(path)
  assert coco.class_names == ['x', 'y', 'z'] and coco.image_sizes == sizes
  for name, (boxes, classes, scores) in detections.items():
    keep = scores >= 0.3
    np.testing.assert_allclose(coco.images[name][0], boxes[keep], atol=1e-5)
    np.testing.assert_array_equal(coco.images[name][1], classes[keep])
  written = json.load(open(path))['annotations']
  assert sorted(a['score'] for a in written) == pytest.approx(
      sorted(s for _, _, sc in detections.values() for s in sc if s >= 0.3))
  with pytest.raises(ValueError, match=r'b.png: detection box .* outside the 25x17 image'):
    sources.write_coco({'b.png': ([[0, 0, 26, 5]], [0], [1.0])}, sizes, ['x'], path)


@pytest.mark.parametrize('edit, message', [
    (lambda d: d['annotations'][1].update(iscrowd=1), r'annotation 2: iscrowd'),
    (lambda d: d['annotations'][2].update(bbox=[15, 12, 10, 8]), r'annotation 3: bbox .* outside'),
    (lambda d: d['annotations'][0].update(bbox=[5, 2, 0, 4]), r'annotation 1: bbox .* empty'),
    (lambda d: d['annotations'][0].update(category_id=4), r'annotation 1: unknown category_id'),
    (lambda d: d['annotations'][2].update(image_id=99), r'annotation 3: unknown image_id'),
    (lambda d: d.pop('categories'), r"without the list\(s\) \['categories'\]"),
])
def test_read_coco_refuses_bad_annotations_naming_file_and_id(tmp_path, edit, message):
  data = _coco_dict()
  edit(data)
  path = _write(tmp_path, data)
  with pytest.raises(ValueError, match=r'ann\.json.*' + message):
    sources.read_coco(path)


def test_read_coco_refuses_broken_json(tmp_path):
  path = tmp_path / 'broken.json'
  path.write_text('{"images": [')
  with pytest.raises(ValueError, match='broken.json: not a readable COCO JSON'):
    sources.read_coco(str(path))
