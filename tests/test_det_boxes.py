"""Box operations against independent NumPy references: IoU by counting voxels of rasterized
boxes, greedy NMS by a plain double loop over the score order."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.detection import boxes as B


# ----- references ------------------------------------------------------------------------


def raster(box, extent):
  """Boolean mask of the voxels an integer box covers, on a grid of ``extent`` per axis."""
  nd = len(box) // 2
  grids = np.meshgrid(*[np.arange(extent)] * nd, indexing='ij')
  return np.all([(g >= box[d]) & (g < box[nd + d]) for d, g in enumerate(grids)], axis=0)


def raster_iou_giou(a, b, extent, ma=None, mb=None):
  """IoU and GIoU of two integer boxes by counting voxels (``ma``, ``mb``: their masks)."""
  ma = raster(a, extent) if ma is None else ma
  mb = raster(b, extent) if mb is None else mb
  inter, union = np.sum(ma & mb), np.sum(ma | mb)
  nd = len(a) // 2
  hull = np.concatenate([np.minimum(a[:nd], b[:nd]), np.maximum(a[nd:], b[nd:])])
  enclosing = np.sum(raster(hull, extent))
  iou = inter / union if union else 0.0
  return iou, (iou - (enclosing - union) / enclosing) if enclosing else iou


def reference_iou(a, b):
  """IoU of two float boxes, one axis at a time in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  nd = len(a) // 2
  inter, va, vb = 1.0, 1.0, 1.0
  for d in range(nd):
    inter *= max(0.0, min(a[nd + d], b[nd + d]) - max(a[d], b[d]))
    va *= max(0.0, a[nd + d] - a[d])
    vb *= max(0.0, b[nd + d] - b[d])
  union = va + vb - inter
  return inter / union if union > 0 else 0.0


def reference_nms(boxes, scores, iou_threshold, max_output, classes=None,
                  score_threshold=-np.inf):
  """Greedy NMS: walk the boxes by descending score (lower index first on ties), keep a box
  unless a kept box of its class overlaps it by IoU > threshold."""
  classes = np.zeros(len(scores), int) if classes is None else classes
  order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
  kept = []
  for i in order:
    if not scores[i] > score_threshold or len(kept) == max_output:
      continue
    if all(classes[k] != classes[i] or reference_iou(boxes[k], boxes[i]) <= iou_threshold
           for k in kept):
      kept.append(i)
  return kept


def random_boxes(rng, n, nd, extent=20.0, integer=False):
  lo = rng.uniform(0, extent * 0.7, (n, nd))
  size = rng.uniform(0.5, extent * 0.4, (n, nd))
  boxes = np.concatenate([lo, lo + size], axis=1)
  return np.round(boxes) if integer else boxes.astype(np.float32)


def kept(result):
  indices, valid = (np.asarray(x) for x in result)
  assert np.all(indices[~valid] == -1)
  assert np.all(valid[:valid.sum()]), 'valid picks come first'
  return indices[valid].tolist()


# ----- sizes, IoU, GIoU --------------------------------------------------------------------


def test_size_volume_centre_and_clip():
  box = np.array([[2., 3., 1., 6., 4., 5.]])  # mask at indices 2..5, 3..3, 1..4
  np.testing.assert_allclose(B.box_size(box), [[4, 1, 4]])
  np.testing.assert_allclose(B.box_volume(box), [16])
  np.testing.assert_allclose(B.box_centre(box), [[4, 3.5, 3]])
  np.testing.assert_allclose(B.box_volume([[3., 3., 1., 4.]]), [0])  # inverted: empty
  np.testing.assert_allclose(B.clip_boxes([[-2., 3., 9., 12.]], (8, 10)), [[0, 3, 8, 10]])
  with pytest.raises(ValueError, match='shape \\(8,\\) has 1 axes'):
    B.clip_boxes([[-2., 3., 9., 12.]], (8,))
  with pytest.raises(ValueError, match='last axis of 2\\*nd'):
    B.box_volume(np.zeros((4, 5)))
  with pytest.raises(ValueError, match='box sets \\[N, 2nd\\] and \\[M, 2nd\\]'):
    B.pairwise_iou(np.zeros(4), np.zeros((3, 4)))
  with pytest.raises(ValueError, match='2D and 3D cannot be compared'):
    B.iou(np.zeros(4), np.zeros(6))


def test_iou_and_giou_hand_computed_2d_and_3d():
  a, b = np.array([0., 0., 2., 2.]), np.array([1., 1., 3., 3.])
  assert float(B.iou(a, b)) == pytest.approx(1 / 7)
  assert float(B.giou(a, b)) == pytest.approx(1 / 7 - 2 / 9)
  far = np.array([4., 0., 6., 2.])  # disjoint: IoU 0, enclosing 2x6 = 12, union 8
  assert float(B.giou(a, far)) == pytest.approx(-4 / 12)
  a3, b3 = np.array([0., 0., 0., 2., 2., 2.]), np.array([1., 1., 1., 3., 3., 3.])
  assert float(B.iou(a3, b3)) == pytest.approx(1 / 15)


@pytest.mark.parametrize('nd', [2, 3])
def test_pairwise_iou_giou_equal_voxel_counts(nd):
  rng = np.random.default_rng(nd)
  extent = 12
  a = random_boxes(rng, 9, nd, extent, integer=True)
  b = np.concatenate([random_boxes(rng, 7, nd, extent, integer=True), a[:2],
                      [[3.] * nd + [3.] * nd]])  # duplicates and a zero-size box
  both = jax.jit(lambda a, b: (B.pairwise_iou(a, b), B.pairwise_giou(a, b)))
  got_iou, got_giou = (np.asarray(x) for x in both(a, b))
  assert got_iou.shape == (9, 10)
  masks_a = [raster(box, extent + 1) for box in a]
  masks_b = [raster(box, extent + 1) for box in b]
  for i in range(len(a)):
    for j in range(len(b)):
      iou, giou = raster_iou_giou(a[i], b[j], extent + 1, masks_a[i], masks_b[j])
      assert got_iou[i, j] == pytest.approx(iou, abs=1e-6)
      assert got_giou[i, j] == pytest.approx(giou, abs=1e-6)
  # Elementwise with leading shapes broadcast equals the pairwise diagonal.
  np.testing.assert_allclose(B.iou(a[:, None][:2], b[:2][None])[np.arange(2), np.arange(2)],
                             np.diag(got_iou[:2, :2]), rtol=1e-6)


def test_degenerate_boxes_give_no_nan_and_finite_gradients():
  a = jnp.array([[1., 1., 1., 1.], [0., 0., 2., 2.], [2., 2., 2., 5.], [1., 1., 1., 1.]])
  b = jnp.array([[1., 1., 1., 1.], [0., 0., 2., 2.], [0., 0., 3., 3.], [5., 5., 5., 5.]])
  np.testing.assert_allclose(B.iou(a, b), [0, 1, 0, 0])
  np.testing.assert_allclose(B.giou(a, b), [0, 1, -6 / 15, -1])
  losses = (lambda x: jnp.sum(1 - B.giou(x, b)), lambda x: jnp.sum(B.iou(x, b)),
            lambda x: jnp.sum(B.pairwise_giou(x, b)))
  grads = jax.jit(lambda x: [jax.grad(fn)(x) for fn in losses])(a)  # one compilation
  for grad in grads:
    assert np.all(np.isfinite(grad)), grad


def test_giou_loss_gradient_moves_a_box_towards_its_target():
  target = jnp.array([4., 4., 8., 8.])
  box = jnp.array([0., 0., 2., 2.])  # disjoint: IoU has no gradient, GIoU does
  step = jax.grad(lambda x: 1 - B.giou(x, target))(box)
  assert float(B.giou(box - 0.5 * step, target)) > float(B.giou(box, target))


# ----- encode / decode ---------------------------------------------------------------------


@pytest.mark.parametrize('nd', [2, 3])
def test_encode_decode_round_trip_and_reference(nd):
  rng = np.random.default_rng(10 + nd)
  boxes, anchors = random_boxes(rng, 50, nd), random_boxes(rng, 50, nd)
  weights = rng.uniform(0.5, 10, 2 * nd)
  deltas = B.encode(boxes, anchors, weights)
  np.testing.assert_allclose(B.decode(deltas, anchors, weights), boxes, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(B.decode(B.encode(boxes, anchors), anchors), boxes, atol=1e-4)
  b64, a64 = boxes.astype(np.float64), anchors.astype(np.float64)
  a_size, b_size = a64[:, nd:] - a64[:, :nd], b64[:, nd:] - b64[:, :nd]
  a_mid, b_mid = a64[:, :nd] + a_size / 2, b64[:, :nd] + b_size / 2
  expected = np.concatenate([weights[:nd] * (b_mid - a_mid) / a_size,
                             weights[nd:] * np.log(b_size / a_size)], axis=1)
  np.testing.assert_allclose(deltas, expected, rtol=1e-4, atol=1e-5)


def test_decode_clamps_the_size_ratio_and_encode_is_finite_for_empty_boxes():
  anchor = jnp.array([[0., 0., 10., 10.]])
  decoded = B.decode(jnp.array([[0., 0., 50., 0.]]), anchor)
  assert np.allclose(B.box_size(decoded), [[10 * 1000 / 16, 10]])
  assert np.all(np.isfinite(B.encode(jnp.zeros((1, 4)), anchor)))
  with pytest.raises(ValueError, match='1 or 2\\*nd = 4 values'):
    B.encode(anchor, anchor, [1., 1., 1.])


# ----- NMS ---------------------------------------------------------------------------------


@pytest.mark.parametrize('nd,threshold', [(2, 0.5), (3, 0.3), (3, 0.0)])
def test_nms_equals_reference_with_duplicates_ties_and_empty_boxes(nd, threshold):
  rng = np.random.default_rng(20 + nd)
  boxes = random_boxes(rng, 120, nd)
  boxes[100:110] = boxes[:10]  # duplicates
  boxes[110:115, nd:] = boxes[110:115, :nd]  # zero-size: overlap nothing
  scores = np.round(rng.uniform(size=120), 1).astype(np.float32)  # many ties
  for max_output in (5, 200):  # fewer boxes kept than max_output in the second
    got = kept(B.nms(boxes, scores, threshold, max_output))
    assert got == reference_nms(boxes, scores, threshold, max_output)
  got = kept(B.nms(boxes, scores, threshold, 200, score_threshold=0.45))
  assert got == reference_nms(boxes, scores, threshold, 200, score_threshold=0.45)
  assert all(scores[i] > 0.45 for i in got)


def test_nms_ties_go_to_the_lower_index_and_all_suppressed():
  box = [0., 0., 4., 4.]
  boxes = np.array([box, box, box, [0., 0., 4., 4.2]])
  indices, valid = B.nms(boxes, np.array([0.5, 0.9, 0.9, 0.9]), 0.5, 3)
  np.testing.assert_array_equal(indices, [1, -1, -1])
  np.testing.assert_array_equal(valid, [True, False, False])
  indices, valid = B.nms(boxes, np.full(4, 0.2), 0.5, 3, score_threshold=0.5)
  assert not np.any(valid) and np.all(np.asarray(indices) == -1)
  indices, valid = B.nms(boxes, np.array([0.1, np.nan, -np.inf, 0.3]), 0.99, 4)
  assert kept((indices, valid)) == [3, 0]  # NaN and -inf scores never count
  indices, valid = B.nms(np.zeros((0, 6)), np.zeros(0), 0.5, 2)  # no boxes at all
  assert indices.tolist() == [-1, -1] and valid.tolist() == [False, False]
  out = B.weighted_box_clustering(np.zeros((0, 6)), np.zeros(0), 0.5, 2)
  assert out.boxes.shape == (2, 6) and not np.any(out.valid)


def test_batched_nms_keeps_classes_apart_and_equals_reference():
  rng = np.random.default_rng(30)
  boxes = random_boxes(rng, 80, 3)
  boxes[40:] = boxes[:40]
  classes = rng.integers(0, 3, 80)
  classes[40:] = (classes[:40] + 1) % 3  # each duplicate in another class
  scores = rng.uniform(size=80).astype(np.float32)
  got = kept(B.batched_nms(boxes, scores, classes, 0.4, 100))
  assert got == reference_nms(boxes, scores, 0.4, 100, classes=classes)
  assert set(range(40)) & set(got) and set(range(40, 80)) & set(got)


def test_vmap_and_jit_of_nms_over_a_batch():
  rng = np.random.default_rng(40)
  boxes = np.stack([random_boxes(rng, 60, 2) for _ in range(3)])
  scores = rng.uniform(size=(3, 60)).astype(np.float32)
  batched = jax.jit(jax.vmap(functools.partial(B.nms, iou_threshold=0.3, max_output=10)))
  indices, valid = batched(boxes, scores)
  assert indices.shape == (3, 10) and indices.dtype == jnp.int32
  for b in range(3):
    assert kept((indices[b], valid[b])) == reference_nms(boxes[b], scores[b], 0.3, 10)


def test_nms_bad_input_names_the_problem():
  with pytest.raises(ValueError, match='boxes \\[N, 2nd\\] and scores \\[N\\]'):
    B.nms(np.zeros((5, 4)), np.zeros(4), 0.5, 3)
  with pytest.raises(ValueError, match='max_output must be a positive int'):
    B.nms(np.zeros((5, 4)), np.zeros(5), 0.5, 0)
  with pytest.raises(ValueError, match='classes \\(4,\\) must match scores'):
    B.batched_nms(np.zeros((5, 4)), np.zeros(5), np.zeros(4), 0.5, 3)


# ----- weighted box clustering ---------------------------------------------------------------


def test_wbc_merges_by_the_documented_rule():
  boxes = np.array([[0., 0., 10., 10.], [1., 0., 11., 10.], [0., 0., 10., 12.],
                    [30., 30., 40., 40.], [0., 0., 10.5, 10.]])
  scores = np.array([0.9, 0.6, 0.3, 0.5, 0.8], np.float32)
  classes = np.array([0, 0, 0, 0, 1])
  out = B.weighted_box_clustering(boxes, scores, 0.5, 4, classes=classes)
  np.testing.assert_array_equal(out.seeds, [0, 4, 3, -1])
  np.testing.assert_array_equal(out.valid, [True, True, True, False])
  o = np.array([1.0, reference_iou(boxes[0], boxes[1]), reference_iou(boxes[0], boxes[2])])
  s = scores[:3].astype(np.float64)
  np.testing.assert_allclose(out.boxes[0], (o * s) @ boxes[:3] / (o * s).sum(), rtol=1e-6)
  assert float(out.scores[0]) == pytest.approx((o * s).sum() / o.sum(), rel=1e-6)
  np.testing.assert_allclose(out.boxes[1:3], boxes[[4, 3]])  # single members stay as they are
  np.testing.assert_allclose(out.scores[1:3], scores[[4, 3]])
  np.testing.assert_allclose(out.boxes[3], 0)


def test_wbc_expected_members_and_prior_weights():
  boxes = np.array([[0., 0., 10., 10.], [0., 0., 10., 10.], [20., 20., 30., 30.]])
  scores = np.array([0.8, 0.6, 0.7], np.float32)
  weights = np.array([1.0, 3.0, 1.0], np.float32)
  out = B.weighted_box_clustering(boxes, scores, 0.5, 3, weights=weights,
                                  expected_members=4)
  # Cluster 1: two members, weights 1 and 3, two missing at the mean weight 2.
  assert float(out.scores[0]) == pytest.approx((0.8 + 3 * 0.6) / (4 + 2 * 2), rel=1e-6)
  assert float(out.scores[1]) == pytest.approx(0.7 / 4, rel=1e-6)  # three missing
  np.testing.assert_array_equal(out.valid, [True, True, False])


def test_wbc_seeds_equal_nms_and_vmap_works():
  rng = np.random.default_rng(50)
  boxes = np.stack([random_boxes(rng, 50, 3) for _ in range(2)])
  scores = rng.uniform(size=(2, 50)).astype(np.float32)
  wbc = jax.vmap(functools.partial(B.weighted_box_clustering, iou_threshold=0.3,
                                   max_output=60))
  out = wbc(boxes, scores)
  for b in range(2):  # clustering removes exactly what NMS suppresses
    assert kept((out.seeds[b], out.valid[b])) == reference_nms(boxes[b], scores[b], 0.3, 60)
    assert np.all(np.isfinite(out.boxes[b])) and np.all(out.scores[b] <= 1)
