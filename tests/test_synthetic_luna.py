"""Synthetic LUNA16-format data: files read back with nibabel and csv, world points checked
against the voxels with an independent LPS -> RAS -> voxel conversion, HU of each tissue,
distractor vessels, geometry variety, determinism, bad input and the command line."""

import csv
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medjax.data import synthetic_chest, synthetic_luna

SEED, CASES, SIZE = 3, 10, 0.6


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('luna'))
  records = synthetic_luna.write_luna_dataset(root, CASES, SEED, size=SIZE)
  with open(os.path.join(root, 'annotations.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  return root, records, rows


def _load(root, record):
  image = nib.load(os.path.join(root, record['image']))
  return image, np.asarray(image.dataobj)


def _canonical(root, record):
  """Array ``[X, Y, Z]`` in RAS order (axis 2 = slices) and its affine."""
  image = nib.as_closest_canonical(_load(root, record)[0])
  return np.asarray(image.dataobj).astype(np.float32), image.affine


def _regions(array):
  """Per axial slice: the body (air-free region, holes filled) and the lungs (low-HU regions
  not connected to the air around the body, holes filled)."""
  body = np.zeros(array.shape, bool)
  lungs = np.zeros(array.shape, bool)
  for z in range(array.shape[2]):
    plane = array[:, :, z]
    body[:, :, z] = ndimage.binary_fill_holes(plane > -400)
    labels, _ = ndimage.label(plane < -400)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    lungs[:, :, z] = ndimage.binary_fill_holes((labels > 0) & ~np.isin(labels, edge))
  return body, lungs


def _nodule_balls(shape, affine, record, margin_mm):
  """Voxels within each nodule's radius + ``margin_mm`` of its centre, on a grid ``affine``."""
  index = np.indices(shape).reshape(3, -1).T
  world = nib.affines.apply_affine(affine, index)
  near = np.zeros(len(index), bool)
  for nodule in record['nodules']:
    near |= np.linalg.norm(world - nodule['world_ras'], axis=1) <= (
        nodule['diameter_mm'] / 2 + margin_mm)
  return near.reshape(shape)


def test_annotations_land_on_the_nodule_centres(dataset):
  root, records, rows = dataset
  assert list(rows[0]) == ['seriesuid', 'coordX', 'coordY', 'coordZ', 'diameter_mm']
  by_uid = {}
  for row in rows:
    by_uid.setdefault(row['seriesuid'], []).append(row)
  assert set(by_uid) == {r['seriesuid'] for r in records if r['nodules']}
  checked = 0
  for record in records:
    image, array = _load(root, record)
    spacing = np.asarray(image.header.get_zooms())
    for row, nodule in zip(by_uid.get(record['seriesuid'], []), record['nodules'],
                           strict=True):
      lps = np.array([float(row['coordX']), float(row['coordY']), float(row['coordZ'])])
      ras = lps * np.array([-1, -1, 1])  # LPS (ITK) -> RAS (nibabel)
      voxel = nib.affines.apply_affine(np.linalg.inv(image.affine), ras)
      np.testing.assert_allclose(voxel, nodule['voxel'], atol=1e-3)
      assert -350 < array[tuple(np.round(voxel).astype(int))] < 250
      # The core (half the radius) is solid-nodule dense; a shell 1-1.5 mm outside is mostly lung.
      index = np.indices(array.shape).reshape(3, -1).T
      mm = np.linalg.norm((index - voxel) * spacing, axis=1).reshape(array.shape)
      r = float(row['diameter_mm']) / 2
      assert array[mm <= max(r / 2, spacing.max() / 2)].mean() > -300
      if not nodule['juxtapleural']:
        assert np.mean(array[(mm > r + 1) & (mm < r + 1.5)] < -500) > 0.5
      checked += 1
  assert checked >= 5


def _ray_radius(array, centre, step, spacing, threshold=-450.0):
  """mm from ``centre`` along voxel axis direction ``step`` to where HU first drops below
  ``threshold`` (linearly interpolated between voxel centres)."""
  position, previous = np.round(centre).astype(int), None
  while True:
    value = array[tuple(position)]
    if value < threshold:
      fraction = (previous - threshold) / (previous - value)
      outside = np.abs((position - centre) @ step) - 1 + fraction
      return outside * spacing[np.flatnonzero(step)[0]]
    previous, position = value, position + step


def test_rendered_nodules_have_their_annotated_size(dataset):
  root, records, _ = dataset
  errors = []
  for record in records:
    image, array = _load(root, record)
    spacing = np.asarray(image.header.get_zooms())
    for nodule in record['nodules']:
      if nodule['juxtapleural']:
        continue
      rays = [_ray_radius(array.astype(float), nodule['voxel'], sign * np.eye(3, dtype=int)[a],
                          spacing) for a in range(3) for sign in (1, -1)]
      # The median of six rays ignores a vessel running out of the nodule along one of them.
      errors.append(abs(2 * np.median(rays) - nodule['diameter_mm']) / (
          0.15 * nodule['diameter_mm'] + spacing.max()))
  assert len(errors) >= 4 and max(errors) < 0.5, errors


def test_diameters_3_to_30_mm_more_small_than_large(dataset):
  _, records, rows = dataset
  assert all(3 <= float(row['diameter_mm']) <= 30 for row in rows)
  d = synthetic_chest.sample_nodule_diameters(np.random.default_rng(0), 20000)
  assert 3 <= d.min() and d.max() <= 30
  assert 5 < np.median(d) < 8 and np.mean(d < 10) > 0.7 and 0.005 < np.mean(d > 20) < 0.05
  capped = synthetic_chest.sample_nodule_diameters(np.random.default_rng(0), 1000, 8.0)
  assert 3 <= capped.min() and capped.max() <= 8


def test_some_scans_have_no_nodules_some_several_and_some_juxtapleural(dataset):
  _, records, _ = dataset
  counts = [len(r['nodules']) for r in records]
  assert 0 in counts and max(counts) >= 2
  assert any(n['juxtapleural'] for r in records for n in r['nodules'])


def test_air_lung_and_body_hounsfield_units(dataset):
  root, records, _ = dataset
  for record in records:
    array, affine = _canonical(root, record)
    body, lungs = _regions(array)
    air = ndimage.distance_transform_edt(~body, sampling=nib.affines.voxel_sizes(affine)) > 3
    soft = ndimage.binary_erosion(body, iterations=2) & ~ndimage.binary_dilation(
        lungs, iterations=2) & (array < 200)
    lung = ndimage.binary_erosion(lungs, iterations=1) & (array < -500)
    assert -1010 < np.median(array[air]) < -990 and np.percentile(array[air], 99) < -900
    assert 0 < np.median(array[soft]) < 60
    assert -900 < np.median(array[lung]) < -780
    assert 0.15 < lungs.sum() / body.sum() < 0.7
    assert np.percentile(array[body], 99.9) > 300  # ribs and spine


def test_lung_texture_is_smooth_correlated_noise(dataset):
  root, records, _ = dataset
  for record in records[:4]:
    array, _ = _canonical(root, record)
    _, lungs = _regions(array)
    inner = ndimage.binary_erosion(lungs, iterations=2) & (array < -600)
    pair = inner[:-1] & inner[1:]
    a, b = array[:-1][pair], array[1:][pair]
    assert 15 < a.std() < 80
    assert np.corrcoef(a, b)[0, 1] > 0.5  # white noise would give ~0


def test_vessels_are_distractors_in_the_lungs(dataset):
  root, records, _ = dataset
  for record in records:
    array, affine = _canonical(root, record)
    _, lungs = _regions(array)
    dense = (array > -500) & lungs & ~_nodule_balls(array.shape, affine, record, 2.0)
    labels, count = ndimage.label(dense)
    sizes = np.bincount(labels.ravel())[1:]
    assert np.sum(sizes >= 4) >= 5, record['seriesuid']
    # In axial slices some vessels look like nodules: round, dense and >= 3 mm wide.
    pixel_mm2 = np.prod(nib.affines.voxel_sizes(affine)[:2])
    round_blobs = 0
    for z in range(array.shape[2]):
      flat, n = ndimage.label(dense[:, :, z])
      for box, area in zip(ndimage.find_objects(flat), np.bincount(flat.ravel())[1:]):
        extent = [s.stop - s.start for s in box]
        round_blobs += (area * pixel_mm2 >= np.pi * 1.5**2) and max(extent) <= 1.4 * min(extent)
    assert round_blobs >= 1, record['seriesuid']


def test_geometry_varies_and_headers_are_proper(dataset):
  root, records, _ = dataset
  axcodes, shapes, origins = set(), set(), set()
  for record in records:
    image, array = _load(root, record)
    assert array.dtype == np.int16 and array.shape == tuple(record['shape'])
    assert int(image.header['qform_code']) == 1 and int(image.header['sform_code']) == 1
    np.testing.assert_allclose(image.header.get_qform(), image.header.get_sform(), atol=1e-3)
    np.testing.assert_array_equal(image.affine, record['affine'])
    spacing = np.asarray(image.header.get_zooms())
    slice_axis = int(np.argmax(np.abs(image.affine[2, :3]) / spacing))  # most superior
    inplane = np.delete(spacing, slice_axis)
    assert 0.6 <= inplane.min() and inplane.max() <= 0.9 and np.isclose(*inplane)
    assert 1.0 <= spacing[slice_axis] <= 2.5
    axcodes.add(nib.aff2axcodes(image.affine))
    shapes.add(array.shape)
    origins.add(tuple(np.round(image.affine[:3, 3], 1)))
  assert len(axcodes) >= 2 and ('L', 'P', 'S') in axcodes
  assert len(shapes) == len(origins) == len(records)
  assert any(record['tilted'] for record in records)


def test_boxes_follow_the_detection_box_convention(dataset):
  _, records, _ = dataset
  for record in records:
    for nodule in record['nodules']:
      box = nodule['box']
      np.testing.assert_allclose((box[:3] + box[3:]) / 2 - 0.5, nodule['voxel'])
      np.testing.assert_allclose((box[3:] - box[:3]) * record['spacing'],
                                 nodule['diameter_mm'])


def test_same_seed_same_bytes_and_cases_do_not_depend_on_the_count(dataset, tmp_path):
  root, records, _ = dataset
  again = synthetic_luna.write_luna_dataset(str(tmp_path / 'a'), 2, SEED, size=SIZE)
  for first, second in zip(records, again):
    with open(os.path.join(root, first['image']), 'rb') as f, open(
        tmp_path / 'a' / second['image'], 'rb') as g:
      assert f.read() == g.read()
  with open(os.path.join(root, 'annotations.csv')) as f:
    full = f.read().splitlines()
  uids = {r['seriesuid'] for r in again}
  assert (tmp_path / 'a' / 'annotations.csv').read_text().splitlines() == [
      line for line in full if line.split(',')[0] in uids or line.startswith('seriesuid')]
  other, _ = synthetic_luna.make_case(SEED + 1, 0, size=SIZE)
  assert other.shape != _load(root, records[0])[1].shape or not np.array_equal(
      other, _load(root, records[0])[1])


def test_lps_and_ras_differ_by_the_sign_of_x_and_y():
  lps = synthetic_luna.ras_to_lps(np.array([[10.0, -20.0, 30.0]]))
  np.testing.assert_array_equal(lps, [[-10.0, 20.0, 30.0]])
  np.testing.assert_array_equal(synthetic_luna.lps_to_ras(lps), [[10.0, -20.0, 30.0]])


@pytest.mark.parametrize('kwargs, message', [
    ({'num_cases': 0}, 'num_cases must be a positive integer'),
    ({'shape_range': ((96, 90), (96, 128), (40, 64))}, 'shape_range must be three'),
    ({'size': 0.2}, 'volumes too small for a chest'),
])
def test_bad_arguments_are_named(tmp_path, kwargs, message):
  with pytest.raises(ValueError, match=message):
    synthetic_luna.write_luna_dataset(str(tmp_path), **{'num_cases': 1, **kwargs})


def test_refuses_a_folder_that_already_holds_volumes(dataset):
  root, _, _ = dataset
  with pytest.raises(ValueError, match='already holds 10 volumes'):
    synthetic_luna.write_luna_dataset(root, 1, SEED, size=SIZE)


def test_command_line(tmp_path, capsys):
  out = str(tmp_path / 'out')
  assert synthetic_luna.main([out, '--cases', '2', '--seed', '5', '--size', '0.5']) == 0
  assert 'wrote 2 volumes' in capsys.readouterr().out
  assert len(os.listdir(os.path.join(out, 'imagesTr'))) == 2
  assert os.path.isfile(os.path.join(out, 'annotations.csv'))
  with pytest.raises(SystemExit) as exit_info:
    synthetic_luna.main([str(tmp_path / 'bad'), '--cases', '0'])
  assert exit_info.value.code == 2
  assert 'num_cases must be a positive integer' in capsys.readouterr().err
