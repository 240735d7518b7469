"""Detection's own pieces: anchors and their plan, ATSS against a NumPy reference, the losses,
Retina U-Net's outputs against the anchors, box inference and mapping back to the file."""

import itertools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medjax.data import detection_data
from medjax.detection import anchors as anchors_lib, det_inference, det_losses, matching
from medjax.models import build_model


# ----- anchors ---------------------------------------------------------------------------
def test_level_anchors_are_centred_on_cells_in_c_order():
  sizes = np.array([[4.0, 6.0], [8.0, 8.0]])
  anchors = anchors_lib.level_anchors((3, 5), 4, sizes)
  assert anchors.shape == (3 * 5 * 2, 4)
  for i, j, a in itertools.product(range(3), range(5), range(2)):
    box = anchors[(i * 5 + j) * 2 + a]
    centre = np.array([(i + 0.5) * 4, (j + 0.5) * 4])
    np.testing.assert_allclose((box[:2] + box[2:]) / 2, centre)
    np.testing.assert_allclose(box[2:] - box[:2], sizes[a])


def test_all_anchors_counts_and_divisibility():
  sizes = [np.ones((3, 3)) * 4, np.ones((3, 3)) * 8]
  anchors, counts = anchors_lib.all_anchors((16, 16, 8), (2, 4), sizes)
  assert counts == [8 * 8 * 4 * 3, 4 * 4 * 2 * 3] and len(anchors) == sum(counts)
  with pytest.raises(ValueError, match='not divisible'):
    anchors_lib.all_anchors((18, 16, 8), (4,), sizes[:1])


def test_anchor_plan_follows_the_data():
  rng = np.random.default_rng(0)
  small = np.stack([rng.uniform(4, 6, 50), rng.uniform(4, 6, 50), rng.uniform(1, 1.5, 50)], 1)
  large = np.stack([rng.uniform(20, 26, 50), rng.uniform(20, 26, 50), rng.uniform(5, 7, 50)], 1)
  plan = anchors_lib.plan_anchor_sizes(np.concatenate([large, small]), (2, 8), 2)
  assert np.all(plan[0].max(axis=0) <= 6) and np.all(plan[1].min(axis=0)[:2] >= 19)
  # Flat objects (z about a quarter of x, y) get flat anchors; z below stride/2 is raised.
  assert np.all(plan[1][:, 2] < plan[1][:, 0] / 2)
  assert np.all(plan[0] >= 1.0) and np.all(plan[1] >= 4.0)
  best = anchors_lib.best_anchor_iou(np.concatenate([large, small]), plan)
  assert np.median(best) > 0.6
  with pytest.raises(ValueError, match='no training boxes'):
    anchors_lib.plan_anchor_sizes(np.zeros((0, 3)), (2,), 3)


# ----- ATSS --------------------------------------------------------------------------------
def _iou_np(a, b):
  nd = a.shape[-1] // 2
  lo = np.maximum(a[:, None, :nd], b[None, :, :nd])
  hi = np.minimum(a[:, None, nd:], b[None, :, nd:])
  inter = np.prod(np.clip(hi - lo, 0, None), -1)
  va = np.prod(a[:, nd:] - a[:, :nd], -1)
  vb = np.prod(b[:, nd:] - b[:, :nd], -1)
  return inter / (va[:, None] + vb[None] - inter)


def _atss_reference(anchors, counts, gts, valid, k):
  """ATSS written with loops (Zhang et al. 2020, Algorithm 1)."""
  nd = anchors.shape[1] // 2
  centres = (anchors[:, :nd] + anchors[:, nd:]) / 2
  iou = _iou_np(gts, anchors)
  best = np.full(len(anchors), -1.0)
  match = np.full(len(anchors), -1)
  for g in range(len(gts)):
    if not valid[g]:
      continue
    gc = (gts[g, :nd] + gts[g, nd:]) / 2
    cands, start = [], 0
    for n in counts:
      d = ((centres[start:start + n] - gc) ** 2).sum(1)
      cands.extend(start + np.argsort(d, kind='stable')[:min(k, n)])
      start += n
    values = iou[g, cands]
    threshold = values.mean() + values.std()
    for a, v in zip(cands, values):
      inside = np.all(centres[a] > gts[g, :nd]) and np.all(centres[a] < gts[g, nd:])
      if v >= threshold and inside and v > 0 and v > best[a]:
        best[a], match[a] = v, g
  return match


@pytest.mark.parametrize('nd', [2, 3])
def test_atss_matches_the_reference(nd):
  rng = np.random.default_rng(nd)
  shape = (32,) * nd
  sizes = [rng.uniform(3, 8, (3, nd)), rng.uniform(8, 20, (3, nd))]
  anchors, counts = anchors_lib.all_anchors(shape, (4, 8), sizes)
  for trial in range(4):
    lo = rng.uniform(0, 24, (6, nd))
    gts = np.concatenate([lo, lo + rng.uniform(2, 14, (6, nd))], 1).astype(np.float32)
    valid = rng.random(6) < 0.7
    ours = np.asarray(matching.atss_match(jnp.asarray(anchors), counts, jnp.asarray(gts),
                                          jnp.asarray(valid), 4))
    reference = _atss_reference(anchors, counts, gts, valid, 4)
    np.testing.assert_array_equal(ours, reference)
    assert np.all(np.isin(ours[ours >= 0], np.flatnonzero(valid)))
  # A lone box at least twice the finest stride always gets positive anchors.
  for trial in range(5):
    lo = rng.uniform(0, 16, (1, nd))
    gt = np.concatenate([lo, lo + rng.uniform(8, 16, (1, nd))], 1).astype(np.float32)
    ours = matching.atss_match(jnp.asarray(anchors), counts, jnp.asarray(gt), jnp.ones(1, bool))
    assert np.sum(np.asarray(ours) == 0) >= 1


def test_atss_without_boxes_matches_nothing():
  anchors, counts = anchors_lib.all_anchors((16, 16), (4,), [np.full((2, 2), 6.0)])
  out = matching.atss_match(jnp.asarray(anchors), counts, jnp.zeros((4, 4)),
                            jnp.zeros(4, bool))
  assert np.all(np.asarray(out) == -1)


# ----- losses ------------------------------------------------------------------------------
def test_sigmoid_focal_matches_formula():
  x = np.linspace(-4, 4, 9).astype(np.float32)
  t = (np.arange(9) % 2).astype(np.float32)
  p = 1 / (1 + np.exp(-x))
  pt = np.where(t == 1, p, 1 - p)
  alpha = np.where(t == 1, 0.25, 0.75)
  expected = -alpha * (1 - pt) ** 2 * np.log(pt)
  np.testing.assert_allclose(det_losses.sigmoid_focal(jnp.asarray(x), jnp.asarray(t), 2.0,
                                                      0.25), expected, rtol=1e-5)


def test_hard_negative_bce_picks_the_hardest_negatives():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(50, 2)).astype(np.float32)
  positive = np.zeros(50, bool)
  positive[[3, 7]] = True
  targets = np.zeros((50, 2), np.float32)
  targets[positive, 0] = 1
  bce = (np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))).sum(1)
  negatives = np.flatnonzero(~positive)
  hardest = negatives[np.argsort(-bce[negatives])[:6]]  # ratio 3 x 2 positives
  expected = (bce[positive].sum() + bce[hardest].sum()) / 8
  ours = det_losses.hard_negative_bce(jnp.asarray(logits), jnp.asarray(targets),
                                      jnp.asarray(positive), 3.0, 4)
  np.testing.assert_allclose(float(ours), expected, rtol=1e-5)
  # No positive: the minimum number of negatives.
  ours = det_losses.hard_negative_bce(jnp.asarray(logits), jnp.zeros((50, 2)),
                                      jnp.zeros(50, bool), 3.0, 4)
  bce0 = (np.maximum(logits, 0) + np.log1p(np.exp(-np.abs(logits)))).sum(1)
  np.testing.assert_allclose(float(ours), np.sort(bce0)[-4:].mean(), rtol=1e-5)


def _loss_cfg(name):
  return ml_collections.ConfigDict(dict(
      name=name, focal_gamma=2.0, focal_alpha=0.25, hnm_ratio=3.0, hnm_min_negatives=16,
      box_weight=1.0, seg_weight=1.0, atss_candidates=4))


@pytest.mark.parametrize('name', ['focal', 'bce_hnm'])
def test_detection_loss_on_images_with_and_without_boxes(name):
  rng = np.random.default_rng(0)
  anchors, counts = anchors_lib.all_anchors((32, 32), (2, 4), [np.array([[6., 6.], [10., 10.]]),
                                                               np.array([[12., 12.], [16., 16.]])])
  n = len(anchors)
  outputs = {'class_logits': jnp.asarray(rng.normal(-2, 1, (2, n, 2)), jnp.float32),
             'box_deltas': jnp.asarray(rng.normal(0, 0.1, (2, n, 4)), jnp.float32),
             'seg_logits': jnp.asarray(rng.normal(0, 1, (2, 32, 32, 3)), jnp.float32)}
  targets = {'boxes': jnp.zeros((2, 3, 4)).at[0, 0].set(jnp.array([4., 4., 12., 13.])),
             'classes': jnp.zeros((2, 3), jnp.int32).at[0, 0].set(1),
             'valid': jnp.zeros((2, 3), bool).at[0, 0].set(True),
             'seg': jnp.zeros((2, 32, 32), jnp.int32).at[0, 4:12, 4:13].set(2)}
  loss_fn = jax.jit(jax.value_and_grad(lambda o, t: det_losses.detection_loss(
      o, t, jnp.asarray(anchors), counts, _loss_cfg(name))))
  loss, grads = loss_fn(outputs, targets)
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  # Only the matched anchors' box deltas get a gradient; the image without boxes gets none.
  moved = np.flatnonzero(np.abs(np.asarray(grads['box_deltas'][0])).sum(-1))
  matched = np.flatnonzero(np.asarray(matching.atss_match(
      jnp.asarray(anchors), counts, targets['boxes'][0], targets['valid'][0])) == 0)
  np.testing.assert_array_equal(moved, matched)
  assert len(matched) and not np.any(np.asarray(grads['box_deltas'][1]))
  per = det_losses.image_loss({k: outputs[k][1] for k in ('class_logits', 'box_deltas')},
                              {k: targets[k][1] for k in ('boxes', 'classes', 'valid')},
                              jnp.asarray(anchors), counts, _loss_cfg(name))
  assert int(per['positives']) == 0 and float(per['box']) == 0.0 and float(per['cls']) > 0


@pytest.mark.parametrize('shape,strides', [((32, 48), (2, 4)), ((16, 16, 8), (2, 4))])
def test_retina_unet_outputs_line_up_with_the_anchors(shape, strides):
  nd = len(shape)
  model = build_model('retina_unet', 3, features=(4, 8, 8, 8), strides=(1, 2, 2, 2),
                      head_levels=(1, 2), num_anchors=2, head_features=8, head_convs=1)
  x = jax.ShapeDtypeStruct((1,) + shape + (2,), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  out = jax.eval_shape(model.apply, variables, x)
  anchors, _ = anchors_lib.all_anchors(shape, strides, [np.ones((2, nd)) * 4] * 2)
  assert out['class_logits'].shape == (1, len(anchors), 3)
  assert out['box_deltas'].shape == (1, len(anchors), 2 * nd)
  assert out['seg_logits'].shape == (1,) + shape + (4,)
  with pytest.raises(ValueError, match='head_levels'):
    bad = build_model('retina_unet', 3, features=(4, 8, 8, 8), strides=(1, 2, 2, 2),
                      head_levels=(2, 3))
    jax.eval_shape(bad.init, jax.random.PRNGKey(0), x)


def test_retina_unet_starts_at_the_prior_probability():
  model = build_model('retina_unet', 2, features=(4, 8, 8), strides=(1, 2, 2),
                      head_levels=(1,), num_anchors=2, head_features=8, head_convs=1,
                      conv_impl='xla')
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 16, 16, 1)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  out = jax.jit(model.apply)(variables, x)
  # RetinaNet's prior: every anchor starts near foreground probability 0.01.
  np.testing.assert_allclose(jax.nn.sigmoid(out['class_logits']).mean(), 0.01, atol=0.003)


# ----- inference ----------------------------------------------------------------------------
def test_flip_boxes_follow_a_flipped_mask():
  mask = np.zeros((20, 30), np.int32)
  mask[3:7, 10:25] = 1
  boxes, _, _ = detection_data.instance_boxes(mask, np.array([0]))
  for axes in [(0,), (1,), (0, 1)]:
    flipped, _, _ = detection_data.instance_boxes(np.flip(mask, axes).copy(), np.array([0]))
    np.testing.assert_array_equal(det_inference.flip_boxes(boxes, axes, mask.shape), flipped)


def _cfg(**kw):
  base = dict(score_threshold=0.05, max_per_window=10, merge='nms', merge_iou=0.5,
              max_detections=100)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _blob_detector(windows):
  """A stand-in model: one box of side 6 around each window's brightest pixel, score 0.9
  where it is bright, 0.01 (below the threshold) where the window is empty."""
  b = windows.shape[0]
  flat = windows[..., 0].reshape(b, -1).argmax(1)
  centre = np.stack(np.unravel_index(flat, windows.shape[1:3]), 1) + 0.5
  boxes = np.concatenate([centre - 3, centre + 3], 1)[:, None]
  scores = np.where(windows.reshape(b, -1).max(1) > 1, 0.9, 0.01)[:, None]
  return boxes, scores, np.zeros((b, 1), np.int32)


@pytest.mark.parametrize('merge', ['nms', 'wbc'])
def test_detect_image_merges_windows_and_mirrors(merge):
  image = np.zeros((50, 70, 1), np.float32)
  image[30, 41] = 5.0
  for mirror in [(), (0, 1)]:
    found = det_inference.detect_image(_blob_detector, image, (32, 32), 4, 0.5, mirror,
                                       _cfg(merge=merge))
    # Every window that saw the blob (and its mirrors) found the same box: merged into one.
    assert len(found['scores']) == 1
    np.testing.assert_allclose(found['boxes'][0], [27.5, 38.5, 33.5, 44.5], atol=1e-4)
    np.testing.assert_allclose(found['scores'][0], 0.9, atol=1e-6)


def test_prepared_boxes_map_back_to_the_original_file(tmp_path):
  import nibabel as nib
  from medjax.data import prepare, synthetic
  root = synthetic.write_segmentation_dataset(str(tmp_path / 'ds'), num_cases=3, seed=4)
  prepared = prepare.prepare(root, str(tmp_path / 'cache'),
                             prepare.PrepareOptions(target_spacing=(1.0, 1.0, 1.0)))
  for case_id in prepared.case_ids:
    _, label, _ = prepared.load(case_id)
    record = prepared.records[case_id]
    instances, classes = detection_data.instance_map(label, 3)
    boxes, box_classes, _ = detection_data.instance_boxes(instances, classes)
    original = np.asarray(nib.load(record['label']).dataobj)
    mapped = det_inference.prepared_to_original(boxes, record)
    for box, k in zip(mapped, box_classes):
      truth, _, _ = detection_data.instance_boxes(
          detection_data.instance_map(original, 3)[0] * (original == k + 1),
          np.zeros(9, np.int32))
      # Nearest-neighbour resampling moves a mask edge by at most one original voxel.
      assert len(truth) == 1
      np.testing.assert_allclose(box, truth[0], atol=1.01)


def test_pooled_class_map_keeps_small_objects():
  seg = np.zeros((1, 8, 8), np.int32)
  seg[0, 3, 5] = 1
  seg[0, 6:8, 0:2] = 2
  pooled = np.asarray(det_losses.pooled_class_map(jnp.asarray(seg), (4, 4)))
  expected = seg.reshape(1, 4, 2, 4, 2).max(axis=(2, 4))
  np.testing.assert_array_equal(pooled, expected)
  assert pooled[0, 1, 2] == 1 and pooled[0, 3, 0] == 2
  np.testing.assert_array_equal(det_losses.pooled_class_map(jnp.asarray(seg), (8, 8)), seg)


def test_instances_are_cached_beside_the_prepared_entry(tmp_path):
  from medjax.data import prepare, synthetic_detection
  root = synthetic_detection.write_detection_dataset(str(tmp_path / 'data'), 6, seed=2, size=48)
  prepared = prepare.prepare(root, str(tmp_path / 'cache'))
  for case_id in prepared.case_ids:
    _, label, _ = prepared.load(case_id)
    expected, classes = detection_data.instance_map(label, 3)
    boxes, box_classes, _ = detection_data.instance_boxes(expected, classes)
    for _ in range(2):  # computed, then read back memory-mapped
      instances, got_classes, objects = detection_data.cached_instances(prepared, case_id, 3)
      np.testing.assert_array_equal(instances, expected)
      np.testing.assert_array_equal(got_classes, classes)
      np.testing.assert_array_equal(objects['boxes'], boxes)
      np.testing.assert_array_equal(objects['classes'], box_classes)
    assert isinstance(instances, np.memmap) and instances.dtype == np.uint16
  assert os.listdir(prepared.directory + '-instances')
