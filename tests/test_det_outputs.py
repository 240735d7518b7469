"""LUNA16-format folders as sphere label maps, boxes from prepared scans back to world mm, and
what predict writes (detections.csv, per-file JSON, COCO JSON), read back by independent
readers; medjax score on LUNA16 CSVs."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from medjax import cli
from medjax.data import detection_data, prepare, synthetic_luna
from medjax.detection import det_outputs, froc, sources


@pytest.fixture(scope='module')
def luna(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('luna'))
  records = synthetic_luna.write_luna_dataset(root, num_cases=4, seed=3, size=0.5)
  return root, records


def test_sphere_label_map_against_world_distances():
  rng = np.random.default_rng(0)
  rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))  # oblique
  affine = np.eye(4)
  affine[:3, :3] = rotation @ np.diag([0.7, 0.8, 2.0])
  affine[:3, 3] = [10.0, -20.0, 5.0]
  shape = (40, 36, 16)
  centre_vox = np.array([20.2, 17.6, 8.3])
  centre_ras = nib.affines.apply_affine(affine, centre_vox)
  centre_lps = centre_ras * [-1, -1, 1]
  label = det_outputs.sphere_label_map(shape, affine, centre_lps[None], np.array([9.0]))
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), -1)
  world = nib.affines.apply_affine(affine, grid.reshape(-1, 3)).reshape(grid.shape)
  expected = np.linalg.norm(world - centre_ras, axis=-1) <= 4.5
  np.testing.assert_array_equal(label.astype(bool), expected)
  # A nodule smaller than a voxel still marks the voxel holding its centre.
  tiny = det_outputs.sphere_label_map(shape, affine, centre_lps[None], np.array([0.1]))
  assert tiny.sum() == 1 and tiny[tuple(np.round(centre_vox).astype(int))] == 1


def test_luna_folder_becomes_label_maps_whose_boxes_hold_the_nodules(luna, tmp_path):
  root, records = luna
  assert det_outputs.is_luna_layout(root)
  out = det_outputs.luna_as_labelled(root, str(tmp_path))
  assert det_outputs.luna_as_labelled(root, str(tmp_path)) == out  # made once
  for record in records:
    name = f"{record['seriesuid']}.nii.gz"
    label = nib.load(os.path.join(out, 'labelsTr', name))
    np.testing.assert_allclose(label.affine, nib.load(os.path.join(root, 'imagesTr',
                                                                   name)).affine)
    boxes, _ = sources.boxes_from_label_map(np.asarray(label.dataobj), 1)
    assert len(boxes) <= len(record['nodules'])  # touching nodules may merge
    for nodule in record['nodules']:
      centre = np.asarray(nodule['voxel']) + 0.5  # index -> [lo, hi) frame
      assert any(np.all(centre >= b[:3]) and np.all(centre <= b[3:]) for b in boxes)


def test_luna_annotation_of_an_unknown_scan_is_refused(luna, tmp_path):
  root, _ = luna
  bad = tmp_path / 'bad'
  bad.mkdir()
  os.symlink(os.path.join(root, 'imagesTr'), bad / 'imagesTr')
  (bad / 'annotations.csv').write_text(synthetic_luna.CSV_HEADER + '\n1.2.3,0,0,0,5\n')
  with pytest.raises(ValueError, match='seriesuid 1.2.3 has no scan'):
    det_outputs.luna_as_labelled(str(bad), str(tmp_path / 'cache'))


def test_prepared_boxes_come_back_to_the_annotated_world_centres(luna, tmp_path):
  """Sphere maps -> reorientation to RAS, resampling to 1.5 mm -> boxes on the prepared grid
  -> the file's voxels -> world LPS: the annotation's centre within half a prepared voxel."""
  root, records = luna
  labelled = det_outputs.luna_as_labelled(root, str(tmp_path))
  prepared = prepare.prepare(labelled, str(tmp_path / 'cache'), prepare.PrepareOptions(
      target_spacing=(1.5, 1.5, 1.5), normalization='ct', crop_nonzero=False))
  rows = froc.read_luna_csv(os.path.join(root, 'annotations.csv'), 'diameter_mm')
  checked = 0
  for record in records:
    case = record['seriesuid']
    _, label, _ = prepared.load(case)
    instances, classes = detection_data.instance_map(label, 2)
    boxes, box_classes, _ = detection_data.instance_boxes(instances, classes)
    found = {'boxes': boxes, 'scores': np.ones(len(boxes)), 'classes': box_classes}
    rec = det_outputs.case_record(found, prepared.records[case], ['nodule'])
    centres = np.array([d['centre_lps_mm'] for d in rec['detections']]).reshape(-1, 3)
    for row in [r for r in rows if r[0] == case]:
      distance = np.linalg.norm(centres - np.array(row[1:4]), axis=1).min()
      assert distance < 1.5, (case, row, distance)
      checked += 1
    for d in rec['detections']:  # RAS is LPS with x, y negated
      np.testing.assert_allclose(d['centre_ras_mm'], np.array(d['centre_lps_mm']) * [-1, -1, 1],
                                 atol=2e-3)
  assert checked >= 2


def test_predictions_are_written_as_luna_csv_and_coco(tmp_path):
  record3d = {'crop_box': [[0, 10], [0, 10], [0, 10]], 'canonical_shape': [10, 10, 10],
              'affine': np.diag([2.0, 2.0, 2.0, 1.0]).tolist(),
              'original_affine': np.diag([2.0, 2.0, 2.0, 1.0]).tolist(), 'image': 'a.nii.gz'}
  found = {'boxes': np.array([[1., 1., 1., 3., 3., 5.]]), 'scores': np.array([0.8]),
           'classes': np.array([0])}
  rec = det_outputs.case_record(found, record3d, ['nodule'])
  # Box centre in index coordinates (2, 2, 3) - 0.5 -> RAS (3, 3, 5) mm -> LPS (-3, -3, 5).
  np.testing.assert_allclose(rec['detections'][0]['centre_lps_mm'], [-3, -3, 5])
  np.testing.assert_allclose(rec['detections'][0]['size_mm'], [4, 4, 8])
  out = tmp_path / 'vol'
  out.mkdir()
  written = det_outputs.write_predictions({'a': rec}, {'a': [10, 10, 10]}, ['nodule'],
                                          str(out), 0.3)
  assert str(out / 'detections.csv') in written
  assert froc.read_luna_csv(str(out / 'detections.csv')) == [('a', -3.0, -3.0, 5.0, 0.8)]
  assert json.loads((out / 'a.json').read_text())['detections'][0]['class'] == 'nodule'
  record2d = {'crop_box': [[0, 20], [0, 30]], 'image': '/x/b.png'}
  found2d = {'boxes': np.array([[2., 3., 8., 13.], [1., 1., 4., 4.]]),
             'scores': np.array([0.9, 0.1]), 'classes': np.array([1, 0])}
  rec2d = det_outputs.case_record(found2d, record2d, ['nodule', 'mass'])
  out2 = tmp_path / 'img'
  out2.mkdir()
  det_outputs.write_predictions({'b': rec2d}, {'b': [20, 30]}, ['nodule', 'mass'], str(out2),
                                0.3)
  coco = sources.read_coco(str(out2 / 'detections_coco.json'))
  boxes, classes = coco.images['b.png']
  np.testing.assert_allclose(boxes, [[2., 3., 8., 13.]])  # the 0.1 one is below 0.3
  assert classes.tolist() == [1] and coco.class_names == ['nodule', 'mass']


def test_score_cli_on_luna_csvs(tmp_path, capsys):
  annotations = tmp_path / 'annotations.csv'
  froc.write_luna_csv(str(annotations), [('s1', 0, 0, 0, 10.0), ('s2', 5, 5, 5, 6.0)],
                      'diameter_mm')
  detections = tmp_path / 'detections.csv'
  froc.write_luna_csv(str(detections), [('s1', 1, 1, 1, 0.9), ('s2', 20, 20, 20, 0.8)])
  assert cli.main(['score', '--detections', str(detections), '--annotations',
                   str(annotations), '--out', str(tmp_path / 'out')]) == 0
  summary = json.loads((tmp_path / 'out' / 'froc.json').read_text())
  expected = froc.score_csv(str(detections), str(annotations))
  assert summary['cpm'] == pytest.approx(expected['cpm'])
  assert 0 < summary['cpm'] < 1 and 'CPM' in capsys.readouterr().out
  assert cli.main(['score', '--detections', str(detections), '--out', str(tmp_path)]) == 2
  assert 'needs both --detections and --annotations' in capsys.readouterr().err
