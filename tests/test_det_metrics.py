"""Detection metrics: mAP against pycocotools, FROC / CPM against hand-computed values and a
LUNA16-style reference (loops + scikit-learn's roc_curve), the LUNA16 CSV helpers."""

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sklearn.metrics import roc_curve

from medjax.detection import det_metrics as dm
from medjax.detection import froc


# ---------------------------------------------------------------------------- mAP


def _random_cases(seed, num_cases=7, num_classes=3, integer=False, tied_scores=False):
  """2D cases: ground truth, jittered copies of it (hits and near misses), random boxes; case 2
  has no ground truth, case 4 nothing at all; class 2 never has ground truth."""
  rng = np.random.default_rng(seed)
  dets, gts = [], []

  def boxes(n):
    lo = rng.uniform(0, 80, (n, 2))
    size = rng.uniform(3, 25, (n, 2))
    return np.round(np.c_[lo, lo + size]) if integer else np.c_[lo, lo + size]

  for case in range(num_cases):
    m = 0 if case in (2, 4) else int(rng.integers(1, 6))
    gt_boxes, gt_classes = boxes(m), rng.integers(0, num_classes - 1, m)
    jitter = gt_boxes.repeat(2, axis=0) + rng.normal(0, 1.5, (2 * m, 4))
    jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 0.5)
    if integer:
      jitter = np.round(jitter)
      jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 1)
    n_random = 0 if case == 4 else int(rng.integers(0, 8))
    det_boxes = np.concatenate([jitter, boxes(n_random)]) if m or n_random else np.zeros((0, 4))
    n = len(det_boxes)
    classes = np.r_[gt_classes.repeat(2), rng.integers(0, num_classes, n_random)].astype(int)
    scores = rng.uniform(0, 1, n)
    if tied_scores:
      scores = np.round(scores, 1)
    dets.append({'boxes': det_boxes, 'scores': scores, 'classes': classes})
    gts.append({'boxes': gt_boxes, 'classes': gt_classes})
  return dets, gts


def _coco_precision(dets, gts, num_classes, thresholds):
  """pycocotools' precision [T, R, K, M] with our row/col [lo, hi) boxes as COCO [x, y, w, h]."""
  xywh = lambda b: [float(b[1]), float(b[0]), float(b[3] - b[1]), float(b[2] - b[0])]  # noqa: E731
  images = [{'id': i + 1} for i in range(len(gts))]
  annotations = []
  for i, g in enumerate(gts):
    for b, c in zip(np.reshape(g['boxes'], (-1, 4)), g['classes']):
      annotations.append({'id': len(annotations) + 1, 'image_id': i + 1, 'bbox': xywh(b),
                          'category_id': int(c) + 1, 'iscrowd': 0,
                          'area': float((b[2] - b[0]) * (b[3] - b[1]))})
  results = [{'image_id': i + 1, 'category_id': int(c) + 1, 'bbox': xywh(b), 'score': float(s)}
             for i, d in enumerate(dets) for b, s, c in zip(d['boxes'], d['scores'], d['classes'])]
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO()
    coco_gt.dataset = {'images': images, 'annotations': annotations,
                       'categories': [{'id': k + 1} for k in range(num_classes)]}
    coco_gt.createIndex()
    evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), 'bbox')
    evaluator.params.iouThrs = np.asarray(thresholds)
    evaluator.params.maxDets = [1, 10, 100]
    evaluator.params.areaRng, evaluator.params.areaRngLbl = [[0, 1e10]], ['all']
    evaluator.evaluate()
    evaluator.accumulate()
  return evaluator.eval['precision'][:, :, :, 0, :]


@pytest.mark.parametrize('thresholds', [dm.DEFAULT_IOU_THRESHOLDS, dm.COCO_IOU_THRESHOLDS])
@pytest.mark.parametrize('seed,integer,tied', [(0, False, False), (1, True, True)])
def test_map_matches_pycocotools_2d(thresholds, seed, integer, tied):
  dets, gts = _random_cases(seed, integer=integer, tied_scores=tied)
  precision = _coco_precision(dets, gts, 3, thresholds)
  for m, max_detections in ((1, 10), (2, 100)):
    ap, num_gt, _ = dm.average_precision_table(dets, gts, 3, thresholds, max_detections)
    coco_ap = np.where(precision[:, 0, :, m] > -1, precision[:, :, :, m].mean(axis=1), -1)
    np.testing.assert_allclose(ap, coco_ap, atol=1e-6)
  assert num_gt[2] == 0 and np.all(ap[:, 2] == -1)  # class 2: detections only
  assert 0.05 < ap[:, :2].mean() < 0.95  # matches happen, not all of them
  result = dm.mean_average_precision(dets, gts, 3, thresholds)
  assert result['map'] == pytest.approx(precision[:, :, :2, 2].mean(), abs=1e-6)
  assert result['map_class2'] == -1 and result['num_gt'] == num_gt.sum()
  key = f"ap_{thresholds[0]:g}"
  assert result[key] == pytest.approx(precision[0, :, :2, 2].mean(), abs=1e-6)


def test_max_detections_keeps_the_highest_scores_per_case_and_class():
  dets, gts = _random_cases(3)
  dets[0] = {'boxes': np.tile(gts[0]['boxes'][:1], (120, 1)), 'scores': np.linspace(0, 1, 120),
             'classes': np.full(120, gts[0]['classes'][0])}
  precision = _coco_precision(dets, gts, 3, dm.DEFAULT_IOU_THRESHOLDS)
  ap, _, _ = dm.average_precision_table(dets, gts, 3, max_detections=100)
  np.testing.assert_allclose(ap, np.where(precision[:, 0, :, 2] > -1,
                                          precision[:, :, :, 2].mean(axis=1), -1), atol=1e-6)


def test_equal_ious_take_the_later_ground_truth_as_pycocotools():
  # The first detection overlaps both objects with IoU 1/3 and takes the second one (B), which
  # leaves A for the second detection: AP 1 at 0.3. Taking A would leave B unmatched (AP 0.5).
  gt = [{'boxes': [[0, 0, 10, 10], [0, 10, 10, 20]], 'classes': [0, 0]}]
  det = [{'boxes': [[0, 5, 10, 15], [0, 0, 10, 9]], 'scores': [0.9, 0.8], 'classes': [0, 0]}]
  ap, _, _ = dm.average_precision_table(det, gt, 1, (0.3,))
  assert ap[0, 0] == pytest.approx(_coco_precision(det, gt, 1, (0.3,))[0, :, 0, 2].mean())
  assert ap[0, 0] == pytest.approx(1.0)


def test_map_by_hand():
  # One object; the higher-scoring detection misses it, the lower one hits: precision 1/2 at
  # recall 1, and the envelope makes it 1/2 at every recall level -> AP 0.5.
  gt = [{'boxes': [[0, 0, 10, 10]], 'classes': [0]}]
  det = [{'boxes': [[50, 50, 60, 60], [0, 0, 10, 9]], 'scores': [0.9, 0.8], 'classes': [0, 0]}]
  result = dm.mean_average_precision(det, gt, iou_thresholds=(0.5, 0.95))
  # IoU 0.9: a hit at 0.5, a miss at 0.95 (AP 0).
  assert result['ap_0.5'] == pytest.approx(0.5) and result['ap_0.95'] == 0
  assert result['map'] == pytest.approx(0.25)
  # Dict input keyed by case id; a case without ground truth turns the hit's twin into a FP.
  by_id = dm.mean_average_precision({'a': det[0], 'b': det[0]},
                                    {'a': gt[0], 'b': {'boxes': [], 'classes': []}},
                                    iou_thresholds=(0.5,))
  # Ranked: 0.9 FP, 0.9 FP, 0.8 TP, 0.8 FP -> precision at recall 1 is 1/3.
  assert by_id['ap_0.5'] == pytest.approx(1 / 3) and by_id['num_cases'] == 2


def test_no_ground_truth_at_all_gives_minus_one():
  result = dm.mean_average_precision([{'boxes': [[0, 0, 1, 1]], 'scores': [1], 'classes': [0]}],
                                     [{'boxes': np.zeros((0, 4)), 'classes': []}])
  assert result['map'] == -1 and result['ap_0.1'] == -1 and result['num_gt'] == 0


@pytest.mark.parametrize('z_axis', [0, 2])
def test_3d_boxes_extruded_over_one_z_range_give_the_2d_ap(z_axis):
  dets, gts = _random_cases(5)

  def extrude(entry):
    b = np.asarray(entry['boxes'], float).reshape(-1, 4)
    lo, hi = np.insert(b[:, :2], z_axis, 2.0, axis=1), np.insert(b[:, 2:], z_axis, 9.0, axis=1)
    return {**entry, 'boxes': np.concatenate([lo, hi], axis=1)}

  ap_2d, _, _ = dm.average_precision_table(dets, gts, 3)
  ap_3d, _, _ = dm.average_precision_table([extrude(d) for d in dets], [extrude(g) for g in gts], 3)
  np.testing.assert_allclose(ap_3d, ap_2d, atol=1e-12)
  # Moving the detections in z halves their IoU with objects of size 7: the AP drops at 0.5.
  shifted = [{**e, 'boxes': e['boxes'] + np.where(np.arange(6) % 3 == z_axis, 3.5, 0)}
             for e in (extrude(d) for d in dets)]
  ap_shifted, _, _ = dm.average_precision_table(shifted, [extrude(g) for g in gts], 3)
  assert ap_shifted[-1, :2].mean() < ap_2d[-1, :2].mean()


def test_box_iou_against_a_direct_volume_count():
  a = np.array([[0, 0, 0, 4, 3, 2]], float)
  b = np.array([[2, 1, 1, 6, 5, 3], [4, 0, 0, 5, 1, 1]], float)
  grid = np.indices((8, 8, 8)).reshape(3, -1).T + 0.5  # voxel centres

  def voxels(box):
    return np.all((grid >= box[:3]) & (grid < box[3:]), axis=1)

  expected = [(voxels(a[0]) & voxels(x)).sum() / (voxels(a[0]) | voxels(x)).sum() for x in b]
  np.testing.assert_allclose(dm.box_iou(a, b)[0], expected)


@pytest.mark.parametrize('det,gt,message', [
    ([{}], [{'boxes': [], 'classes': []}], "needs a 'boxes'"),
    ([], [{'boxes': [], 'classes': []}], '0 detection entries for 1'),
    ({'x': {'boxes': [], 'scores': [], 'classes': []}}, {}, 'without a ground-truth entry: x'),
    ([{'boxes': [[0, 0, 1]], 'scores': [1], 'classes': [0]}], [{'boxes': [], 'classes': []}],
     'expected 2*nd'),
    ([{'boxes': [[2, 0, 1, 1]], 'scores': [1], 'classes': [0]}], [{'boxes': [], 'classes': []}],
     'hi < lo'),
    ([{'boxes': [[0, 0, 1, 1]], 'scores': [np.nan], 'classes': [0]}],
     [{'boxes': [], 'classes': []}], 'NaN'),
    ([{'boxes': [[0, 0, 1, 1]], 'scores': [1, 2], 'classes': [0]}],
     [{'boxes': [], 'classes': []}], 'scores of shape (2,)'),
    ([{'boxes': [[0, 0, 1, 1]], 'scores': [1], 'classes': [3]}],
     [{'boxes': [], 'classes': []}], 'classes must be integers in 0..num_classes-1'),
])
def test_bad_input_names_the_problem(det, gt, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')
                     .replace('*', r'\*').replace('.', r'\.')):
    dm.mean_average_precision(det, gt, num_classes=2)


# ---------------------------------------------------------------------------- FROC / CPM


# Scan A: nodules N1 (0,0,0) d=10 and N2 (50,0,0) d=4; scan B: N3 (0,0,0) d=6; scan C: none.
ANNOTATIONS = [('A', 0, 0, 0, 10), ('A', 50, 0, 0, 4), ('B', 0, 0, 0, 6)]
DETECTIONS = [
    ('A', 1, 1, 1, 0.9),       # hits N1 (distance sqrt(3) < 5)
    ('A', 0, 2, 0, 0.5),       # hits N1 again: ignored
    ('A', 50, 3, 0, 0.8),      # 3 mm from N2, radius 2: false positive
    ('A', 100, 100, 100, 0.3),  # false positive
    ('B', 0, 0, 2.9, 0.6),     # hits N3 (2.9 < 3)
    ('B', 0, 0, 3, 0.95),      # exactly on N3's radius: not a hit (strict), false positive
    ('C', 5, 5, 5, 0.7),       # false positive
]


def test_froc_by_hand():
  # Hits: N1 0.9, N3 0.6 (N2 missed); false positives 0.95, 0.8, 0.7, 0.3; 3 scans, 3 nodules.
  # Ranked: 0.95 FP, 0.9 TP, 0.8 FP, 0.7 FP, 0.6 TP, 0.3 FP -> (FP/scan, sens) points
  # (0,0) (1/3,0) (1/3,1/3) (2/3,1/3) (1,1/3) (1,2/3) (4/3,2/3).
  # At 1/8, 1/4: 0; at 1/2: 1/3; at 1 (reached exactly): the higher, 2/3; beyond: 2/3.
  result = dm.froc_world(DETECTIONS, ANNOTATIONS, ['A', 'B', 'C'])
  expected = [0, 0, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3]
  assert [result[f'sensitivity_at_{r:g}'] for r in dm.FP_RATES] == pytest.approx(expected)
  assert result['cpm'] == pytest.approx(3 / 7)
  assert (result['num_detected'], result['num_false_positives'], result['num_findings']) == \
      (2, 4, 3)
  # An irrelevant finding (diameter -1 -> 10 mm) under the 0.95 mark removes that false
  # positive: ranked 0.9 TP, 0.8 FP, 0.7 FP, 0.6 TP, 0.3 FP -> points (0,0) (0,1/3) (1/3,1/3)
  # (2/3,1/3) (2/3,2/3) (1,2/3): 1/3 at 1/8, 1/4, 1/2, then 2/3 -> CPM (3/3 + 8/3) / 7 = 11/21.
  result = dm.froc_world(DETECTIONS, ANNOTATIONS, ['A', 'B', 'C'],
                         excluded=[('B', 0, 0, 3.5, -1)])
  assert result['cpm'] == pytest.approx(11 / 21)
  assert result['num_false_positives'] == 3 and result['num_detected'] == 2
  # A fourth scan without nodules or detections lowers the FP rate: FP/scan = FP/4.
  # Points (0,0) (1/4,0) (1/4,1/3) (1/2,1/3) (3/4,1/3) (3/4,2/3) (1,2/3).
  result = dm.froc_world(DETECTIONS, ANNOTATIONS, ['A', 'B', 'C', 'D'])
  expected = [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3]
  assert [result[f'sensitivity_at_{r:g}'] for r in dm.FP_RATES] == pytest.approx(expected)
  # Scans outside series_ids are ignored (and counted).
  result = dm.froc_world(DETECTIONS, ANNOTATIONS, ['B'])
  assert result['num_findings'] == 1 and result['num_ignored_detections'] == 5


def test_froc_tie_between_hit_and_false_positive_is_one_diagonal_step():
  # One scan, one nodule, a hit and a false positive with the same score: points (0,0), (1,1).
  result = dm.froc_world([('s', 0, 0, 0, 0.5), ('s', 9, 9, 9, 0.5)], [('s', 0, 0, 0, 4)], ['s'])
  assert result['sensitivity_at_0.125'] == pytest.approx(0.125)
  assert result['sensitivity_at_0.5'] == pytest.approx(0.5)
  assert result['sensitivity_at_1'] == result['sensitivity_at_8'] == 1


def test_froc_edge_cases():
  none = dm.froc_world([], ANNOTATIONS, ['A', 'B'])
  assert none['cpm'] == 0 and none['num_findings'] == 3 and none['false_positives_per_scan'] == 0
  no_nodules = dm.froc_world(DETECTIONS, [], ['A', 'B', 'C'])
  assert np.isnan(no_nodules['cpm']) and no_nodules['num_false_positives'] == 7
  # Only hits: no false positive anywhere, so every rate sees the final sensitivity 2/3.
  only_hits = dm.froc_world([DETECTIONS[0], DETECTIONS[4]], ANNOTATIONS, ['A', 'B'])
  assert only_hits['cpm'] == pytest.approx(2 / 3)
  # 100 marks per scan (LUNA16): the lowest-scoring mark, the hit, drops out with max 1.
  capped = dm.froc_world([('s', 0, 0, 0, 0.1), ('s', 9, 9, 9, 0.5)], [('s', 0, 0, 0, 4)], ['s'],
                         max_per_scan=1)
  assert capped['num_detected'] == 0 and capped['num_false_positives'] == 1
  with pytest.raises(ValueError, match='more than once'):
    dm.froc_world([], [], ['a', 'a'])
  with pytest.raises(ValueError, match='row 0: NaN'):
    dm.froc_world([('a', 0, np.nan, 0, 1)], [], ['a'])


def _luna_reference(detections, annotations, excluded, scans, rates):
  """LUNA16's loop structure, scikit-learn's roc_curve and np.interp (independent code path)."""
  gt_list, prob_list, exclude_list, num_images = [], [], [], len(scans)
  for scan in scans:
    candidates = {i: d for i, d in enumerate(detections) if d[0] == scan}
    remaining = dict(candidates)
    findings = [(a, True) for a in annotations if a[0] == scan] + \
        [(a, False) for a in excluded if a[0] == scan]
    for (_, x, y, z, diameter), included in findings:
      radius2 = ((10.0 if diameter < 0 else diameter) / 2) ** 2
      matches = [c for key, c in candidates.items()
                 if (x - c[1]) ** 2 + (y - c[2]) ** 2 + (z - c[3]) ** 2 < radius2]
      for key in [k for k, c in candidates.items() if c in matches]:
        remaining.pop(key, None)
      if included:
        gt_list.append(1.0)
        prob_list.append(max(c[4] for c in matches) if matches else -1e9)
        exclude_list.append(not matches)
    for c in remaining.values():
      gt_list.append(0.0)
      prob_list.append(c[4])
      exclude_list.append(False)
  keep = ~np.asarray(exclude_list)
  labels, probs = np.asarray(gt_list)[keep], np.asarray(prob_list)[keep]
  fpr, tpr, _ = roc_curve(labels, probs)
  detected, total = labels.sum(), sum(gt_list)
  fps = fpr * (len(labels) - detected) / num_images
  return np.interp(rates, fps, tpr * detected / total)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_froc_matches_a_luna16_style_reference(seed):
  rng = np.random.default_rng(seed)
  scans = [f's{i}' for i in range(6)]
  annotations = [(s, *rng.uniform(0, 60, 3), rng.uniform(4, 20)) for s in scans[:5]
                 for _ in range(rng.integers(1, 4))]
  excluded = [(s, *rng.uniform(0, 60, 3), -1.0) for s in scans[:3]]
  detections = [(a[0], *(np.asarray(a[1:4]) + rng.normal(0, a[4] / 3, 3)),
                 round(rng.uniform(), 2)) for a in annotations]
  detections += [(scans[rng.integers(6)], *rng.uniform(0, 60, 3), round(rng.uniform(), 2))
                 for _ in range(30)]
  rates = np.asarray(dm.FP_RATES + (0.3, 1.7, 3.1))
  result = dm.froc_world(detections, annotations, scans, excluded, rates=rates)
  expected = _luna_reference(detections, annotations, excluded, scans, rates)
  assert 0 < result['num_detected'] < len(annotations)
  np.testing.assert_allclose([result[f'sensitivity_at_{r:g}'] for r in rates], expected,
                             atol=1e-12)


def _sphere_box(centre_mm, diameter_mm, spacing):
  """Voxel box of a sphere on a grid with origin 0: index = mm / spacing, centre = mid - 0.5."""
  centre, half = np.asarray(centre_mm) / spacing + 0.5, diameter_mm / 2 / np.asarray(spacing)
  return np.r_[centre - half, centre + half]


def test_froc_boxes_ellipsoid_rule_is_luna16_on_anisotropic_voxels():
  spacing = np.array([0.7, 0.8, 2.5])
  rng = np.random.default_rng(4)
  scans = ['a', 'b', 'c']
  annotations = [(s, *rng.uniform(10, 50, 3), rng.uniform(5, 15)) for s in scans[:2] for _ in
                 range(3)]
  detections = [(a[0], *(np.asarray(a[1:4]) + rng.normal(0, a[4] / 3, 3)), rng.uniform())
                for a in annotations for _ in range(2)]
  detections += [(scans[rng.integers(3)], *rng.uniform(10, 50, 3), rng.uniform())
                 for _ in range(8)]
  world = dm.froc_world(detections, annotations, scans)
  gts = {s: {'boxes': [_sphere_box(a[1:4], a[4], spacing) for a in annotations if a[0] == s],
             'classes': [0] * sum(a[0] == s for a in annotations)} for s in scans}
  dets = {s: {'boxes': [_sphere_box(d[1:4], 2.0, spacing) for d in detections if d[0] == s],
              'scores': [d[4] for d in detections if d[0] == s],
              'classes': [0] * sum(d[0] == s for d in detections)} for s in scans}
  boxes = dm.froc_boxes(dets, gts, hit='ellipsoid')
  assert 0 < world['num_detected'] < world['num_findings']
  assert boxes == pytest.approx({key: world[key] for key in boxes})


def test_box_hit_rules():
  gt = np.array([[0, 0, 10, 10]], float)
  corner = np.array([[9, 9, 10, 10]], float)  # centre (9.5, 9.5): in the box, not the ellipse
  assert not dm.box_hits(corner, gt, 'ellipsoid')[0][0, 0]
  assert dm.box_hits(corner, gt, 'inside')[0][0, 0]
  assert not dm.box_hits(corner, gt, 'iou', 0.1)[0][0, 0]
  assert dm.box_hits(np.array([[0, 0, 10, 3]], float), gt, 'iou', 0.1)[0][0, 0]
  with pytest.raises(ValueError, match='hit rule'):
    dm.box_hits(corner, gt, 'centre')


def test_froc_boxes_duplicates_and_classes():
  gt = [{'boxes': [[0, 0, 10, 10]], 'classes': [0]}]
  det = [{'boxes': [[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 9, 9]], 'scores': [0.9, 0.8, 0.7],
          'classes': [0, 0, 1]}]
  # LUNA16: the second hit is ignored; the class-1 box does not hit a class-0 object -> 1 FP.
  assert dm.froc_boxes(det, gt, hit='iou')['num_false_positives'] == 1
  # nnDetection: one-to-one matching, the duplicate is a false positive too.
  assert dm.froc_boxes(det, gt, hit='iou', duplicates='false_positive')[
      'num_false_positives'] == 2
  assert dm.froc_boxes(det, gt, hit='iou', class_aware=False)['num_false_positives'] == 0
  excluded = [{'boxes': [[0, 0, 9, 9]]}]
  assert dm.froc_boxes(det, gt, hit='iou', excluded=excluded)['num_false_positives'] == 0


# ---------------------------------------------------------------------------- CSV files


def test_csv_round_trip_and_score_csv(tmp_path):
  dets, annots = tmp_path / 'det.csv', tmp_path / 'annotations.csv'
  excluded, ids = tmp_path / 'excluded.csv', tmp_path / 'seriesuids.csv'
  dm.write_luna_csv(str(dets), DETECTIONS, 'probability')
  dm.write_luna_csv(str(annots), ANNOTATIONS, 'diameter_mm')
  dm.write_luna_csv(str(excluded), [('B', 0, 0, 3.5, -1)], 'diameter_mm')
  ids.write_text('A\nB\nC\n')
  assert dm.read_luna_csv(str(dets)) == [(d[0], *map(float, d[1:])) for d in DETECTIONS]
  assert dm.read_series_ids(str(ids)) == ['A', 'B', 'C']
  assert dm.score_csv(str(dets), str(annots), str(ids))['cpm'] == pytest.approx(3 / 7)
  assert dm.score_csv(str(dets), str(annots), ['A', 'B', 'C'], str(excluded))['cpm'] == \
      pytest.approx(11 / 21)
  # Without a scan list: the scans named in either file (here the same three).
  assert dm.score_csv(str(dets), str(annots))['num_scans'] == 3


@pytest.mark.parametrize('text,message', [
    ('', 'empty file'),
    ('seriesuid,coordX,coordY,probability\n', ':1: header lacks coordZ'),
    ('seriesuid,coordX,coordY,coordZ,probability\na,1,2,3,0.5\nb,1,x,3,0.5\n',
     ":3: coordY 'x' is not a number"),
    ('seriesuid,coordX,coordY,coordZ,probability\na,1,2,3\n', ':2: 4 fields, the header has 5'),
    ('seriesuid,coordX,coordY,coordZ,probability\na,1,2,nan,0.5\n', ':2: coordZ is nan'),
])
def test_bad_csv_rows_name_file_and_line(tmp_path, text, message):
  path = tmp_path / 'detections.csv'
  path.write_text(text)
  with pytest.raises(ValueError, match=f'detections.csv{message}' if message.startswith(':')
                     else message):
    dm.read_luna_csv(str(path))


def test_score_csv_rejects_swapped_files(tmp_path):
  dets, annots = tmp_path / 'det.csv', tmp_path / 'annotations.csv'
  dm.write_luna_csv(str(dets), DETECTIONS, 'probability')
  dm.write_luna_csv(str(annots), ANNOTATIONS, 'diameter_mm')
  with pytest.raises(ValueError, match='annotations.csv:1: header lacks probability'):
    dm.score_csv(str(annots), str(dets))


def test_froc_module_curve_starts_at_zero():
  fps, sens = froc.froc_curve(np.array([0.9]), np.array([0.5, 0.1]), 2, 4)
  np.testing.assert_allclose(fps, [0, 0, 0.25, 0.5])
  np.testing.assert_allclose(sens, [0, 0.5, 0.5, 0.5])
