"""Detection end to end: the sampler's boxes are its masks', training on embedded 2D lesions and
on LUNA16-format volumes, validation metrics, predict's files read back by independent readers
(COCO JSON, LUNA16 CSV) and medjax score on them."""

import json
import os

import numpy as np
import pytest
from scipy import ndimage

from medjax import apply, cli, config as config_lib
from medjax import train as train_lib
from medjax.data import detection_data, synthetic_detection, synthetic_luna
from medjax.data.seg_augment import SegAugment
from medjax.detection import froc


def _config(name, cache, **overrides):
  c = config_lib.load_config_file(f'configs/{name}.py:runlocal')
  config_lib.apply_overrides(c, [f'data.cache_dir={cache}'] +
                             [f'{k}={v}' for k, v in overrides.items()])
  return c


def test_sampler_boxes_are_the_boxes_of_its_augmented_masks(tmp_path):
  rng = np.random.default_rng(0)
  cases, classes = {}, {}
  for i in range(3):
    image, label = synthetic_detection.make_case(rng, 48)
    instances, inst_classes = detection_data.instance_map(label, 3)
    locations = {str(k): np.argwhere(label == k) for k in (1, 2) if np.any(label == k)}
    cases[f'c{i}'] = (image[..., None].astype(np.float32), instances, locations)
    classes[f'c{i}'] = inst_classes
  sampler = detection_data.DetectionSampler(
      cases, classes, (32, 32), 4, seed=1, max_boxes=6, foreground_fraction=0.5,
      augment=SegAugment(p_flip=0.5, p_rotate=0.5, p_scale=0.5))
  seen = 0
  for step in range(6):
    for j in range(4):
      image, targets = sampler(step, j)
      again = sampler(step, j)[1]  # a pure function of (seed, step, j)
      for key in targets:
        np.testing.assert_array_equal(targets[key], again[key])
      valid = targets['valid']
      boxes, box_classes = targets['boxes'][valid], targets['classes'][valid]
      seg = targets['seg']
      # Every box bounds voxels of its class in the augmented class map, and every
      # component of the class map lies inside some box of its class.
      for k in (1, 2):
        components, count = ndimage.label(seg == k, np.ones((3, 3)))
        for region in ndimage.find_objects(components):
          lo = [s.start for s in region]
          hi = [s.stop for s in region]
          assert any(np.all(b[:2] <= lo) and np.all(b[2:] >= hi)
                     for b in boxes[box_classes == k - 1])
      seen += int(valid.sum())
      assert image.shape == (32, 32, 1) and seg.shape == (32, 32)
  assert seen > 10


@pytest.fixture(scope='module')
def lesions_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('det2d')
  config = _config('detection_quickstart', str(tmp / 'cache'))
  workdir = str(tmp / 'run')
  return workdir, train_lib.train_and_evaluate(config, workdir), tmp


@pytest.mark.slow
def test_2d_detector_trains_and_writes_coco(lesions_run):
  workdir, results, tmp = lesions_run
  assert results['task'] == 'detection' and results['selection_metric'] == 'val/map'
  for key in ('map', 'ap_0.1', 'ap_0.5', 'cpm', 'sensitivity_at_1'):
    assert 0.0 <= results['val'][key] <= 1.0
  plan = json.load(open(os.path.join(workdir, 'anchors.json')))
  assert [lv['stride'] for lv in plan['levels']] == [2, 4]
  predictions = json.load(open(os.path.join(workdir, 'predictions_val.json')))
  assert set(predictions) == set(json.load(open(os.path.join(workdir, 'split.json')))['val'])
  # predict on two of the embedded PNGs: per-file JSON and a COCO file pycocotools reads.
  from pycocotools.coco import COCO
  images = os.path.join(str(tmp / 'cache'), f'synthetic_detection_v{synthetic_detection.VERSION}'
                        '_24_64', 'imagesTr')
  inputs = tmp / 'inputs'
  inputs.mkdir()
  for name in sorted(os.listdir(images))[:2]:
    os.symlink(os.path.join(images, name), inputs / name)
  out = str(tmp / 'out')
  written = apply.predict_files(workdir, str(inputs), out)
  assert os.path.join(out, 'detections_coco.json') in written
  coco = COCO(os.path.join(out, 'detections_coco.json'))
  assert len(coco.getImgIds()) == 2
  for folder, mirror in ((out, None), (str(tmp / 'mirrored'), (0, 1))):
    if mirror:  # medjax predict --mirror_axes 0,1: the same files, boxes still in the image
      assert cli.main(['predict', '--workdir', workdir, '--input', str(inputs), '--output',
                       folder, '--mirror_axes', '0,1']) == 0
    record = json.load(open(os.path.join(folder, 'case_0000.json')))
    for d in record['detections']:
      lo, hi = np.array(d['box_voxel'][:2]), np.array(d['box_voxel'][2:])
      assert np.all(lo >= 0) and np.all(hi <= 64) and np.all(hi > lo)
  assert sorted(os.listdir(out)) == sorted(os.listdir(str(tmp / 'mirrored')))


@pytest.mark.slow
def test_luna_format_detector_predicts_csv_that_scores(tmp_path):
  root = str(tmp_path / 'luna')
  synthetic_luna.write_luna_dataset(root, num_cases=6, seed=5, size=0.5)
  # Four steps leave every anchor near its prior 0.01: keep all top detections per window.
  config = _config('detection_luna', str(tmp_path / 'cache'),
                   **{'data.root': root, 'detection.score_threshold': 0.0})
  workdir = str(tmp_path / 'run')
  results = train_lib.train_and_evaluate(config, workdir)
  assert 0.0 <= results['val']['cpm'] <= 1.0 and 'sensitivity_at_8' in results['val']
  out = str(tmp_path / 'out')
  apply.predict_files(workdir, os.path.join(root, 'imagesTr'), out)
  rows = froc.read_luna_csv(os.path.join(out, 'detections.csv'))
  ids = {name[:-len('.nii.gz')] for name in os.listdir(os.path.join(root, 'imagesTr'))}
  assert rows and {r[0] for r in rows} <= ids
  for r in rows[:5]:  # LPS centres agree with the per-file JSON's RAS ones
    record = json.load(open(os.path.join(out, f'{r[0]}.json')))
    ras = [d['centre_ras_mm'] for d in record['detections']]
    assert any(np.allclose(np.array(r[1:4]) * [-1, -1, 1], c, atol=2e-3) for c in ras)
  assert cli.main(['score', '--detections', os.path.join(out, 'detections.csv'),
                   '--annotations', os.path.join(root, 'annotations.csv'),
                   '--out', out]) == 0
  assert 0.0 <= json.load(open(os.path.join(out, 'froc.json')))['cpm'] <= 1.0
