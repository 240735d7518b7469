"""Boxes through geometry: each box transform against the same operation applied to a mask
(np.flip, np.rot90, np.transpose, slicing, nifti.resample_to_shape, scipy's
affine_transform, seg_augment.apply) and the boxes of the transformed mask."""

import itertools

import numpy as np
import pytest
from scipy import ndimage

from medjax.data import nifti, seg_augment
from medjax.detection import box_transforms as bt
from medjax.detection.sources import boxes_from_instance_map, boxes_from_label_map


def _blobs(shape, count, rng, low=0.0, high=1.0, size=(3, 7), gap=2):
  """Instance map ``[*shape]`` of ``count`` rectangles (ids 1..count, extents in ``size``)
  inside the fraction [low, high] of each axis, at least ``gap`` voxels apart (one per cell
  of a grid), and their classes (0..2)."""
  shape = np.array(shape)
  start = np.floor(low * shape).astype(int)
  span = np.minimum(np.ceil(high * shape).astype(int), shape) - start
  cells = np.ones(len(shape), int)
  while np.prod(cells) < count:
    cells[np.argmax(span // cells)] += 1
  cell = span // cells
  assert np.all(cell - gap >= size[0]), 'region too small for the blobs'
  instances = np.zeros(shape, np.int32)
  chosen = rng.choice(int(np.prod(cells)), count, replace=False)
  for i, index in enumerate(chosen, start=1):
    extent = rng.integers(size[0], np.minimum(size[1], cell - gap) + 1)
    lo = start + np.array(np.unravel_index(index, cells)) * cell
    lo = lo + rng.integers(0, cell - gap - extent + 1)
    instances[tuple(slice(a, a + e) for a, e in zip(lo, extent))] = i
  return instances, rng.integers(0, 3, count)


def _label_map(instances, classes):
  return np.where(instances > 0, np.concatenate([[0], classes + 1])[instances], 0)


def _sorted(boxes, classes):
  rows = np.concatenate([np.asarray(boxes, np.float64), np.asarray(classes)[:, None]], 1)
  return rows[np.lexsort(rows.T[::-1])]


def _assert_same_boxes(label, boxes, classes):
  found = boxes_from_label_map(label)
  np.testing.assert_array_equal(_sorted(*found), _sorted(boxes, classes))


@pytest.mark.parametrize('shape', [(23, 31), (17, 22, 13)])
def test_flip_and_transpose_follow_the_array_exactly(shape):
  rng = np.random.default_rng(0)
  instances, classes = _blobs(shape, 5, rng, size=(2, 5))
  label = _label_map(instances, classes)
  boxes, cls = boxes_from_label_map(label)
  for axis in range(len(shape)):
    _assert_same_boxes(np.flip(label, axis), bt.flip_boxes(boxes, axis, shape[axis]), cls)
  for axes in itertools.permutations(range(len(shape))):
    _assert_same_boxes(np.transpose(label, axes), bt.transpose_boxes(boxes, axes), cls)


@pytest.mark.parametrize('shape', [(23, 31), (17, 22, 13)])
def test_rot90_follows_np_rot90_for_every_k_and_plane(shape):
  rng = np.random.default_rng(1)
  label = _label_map(*_blobs(shape, 5, rng, size=(2, 5)))
  boxes, cls = boxes_from_label_map(label)
  for a, b in itertools.permutations(range(len(shape)), 2):
    for k in range(-1, 5):
      _assert_same_boxes(np.rot90(label, k, (a, b)), bt.rot90_boxes(boxes, k, (a, b), shape),
                         cls)


def test_crop_shifts_clips_and_drops_by_visible_fraction():
  rng = np.random.default_rng(2)
  shape = np.array((30, 26, 20))
  instances, classes = _blobs(shape, 8, rng, size=(3, 8))
  boxes, box_classes = boxes_from_instance_map(instances, dict(enumerate(classes, 1)))
  for _ in range(20):
    patch = rng.integers(6, 18, 3)
    lo = rng.integers(-4, shape - patch + 4)
    # The crop by slicing a zero-padded copy (a patch may reach outside the array).
    padded = np.pad(instances, 4)
    crop = padded[tuple(slice(a + 4, a + 4 + n) for a, n in zip(lo, patch))]
    visible = np.array([(crop == i).sum() / (instances == i).sum()
                        for i in range(1, len(classes) + 1)])
    for min_visible in (0.0, 0.3):
      kept_boxes, kept = bt.crop_boxes(boxes, lo, patch, min_visible=min_visible)
      np.testing.assert_array_equal(kept, (visible > 0) & (visible >= min_visible))
      expect, expect_classes = boxes_from_instance_map(
          np.where(np.isin(crop, np.flatnonzero(kept) + 1), crop, 0), dict(enumerate(classes, 1)))
      np.testing.assert_array_equal(kept_boxes, expect)
      np.testing.assert_array_equal(box_classes[kept], expect_classes)


def test_crop_of_a_label_map_by_slicing():
  rng = np.random.default_rng(3)
  label = _label_map(*_blobs((40, 40), 6, rng))
  boxes, cls = boxes_from_label_map(label)
  kept_boxes, kept = bt.crop_boxes(boxes, (7, 12), (20, 25))
  _assert_same_boxes(label[7:27, 12:37], kept_boxes, cls[kept])


@pytest.mark.parametrize('new_shape', [(40, 30, 12), (19, 23, 9), (31, 50, 16)])
def test_zoom_matches_resample_to_shape_within_half_a_voxel(new_shape):
  rng = np.random.default_rng(4)
  old_shape = (30, 36, 14)
  instances, classes = _blobs(old_shape, 6, rng, size=(4, 8))
  mapping = dict(enumerate(classes, 1))
  boxes, _ = boxes_from_instance_map(instances, mapping)
  zoomed = nifti.resample_to_shape(instances, new_shape, order=0)
  found, _ = boxes_from_instance_map(zoomed, mapping)
  # Nearest neighbour keeps a voxel whose centre falls in the box: half a voxel each side.
  expect = bt.zoom_boxes(boxes, old_shape, new_shape)
  _check_bound(found, expect, slack=0.5)
  # The round trip through the two grids is exact for the boxes.
  np.testing.assert_allclose(bt.zoom_boxes(expect, new_shape, old_shape), boxes, atol=1e-5)


def _rotation_slack(nd):
  """How far inside the box of a rotated box the mask's box may end. Nearest neighbour keeps
  the voxels whose centres fall in the rotated box; near a corner that sticks out along an
  axis there may be none. A ball of radius sqrt(nd) / 2 always holds a voxel centre; put in
  the corner (touching its nd faces) it reaches sqrt(nd) (sqrt(nd) + 1) / 2 deep along any
  axis; less the half voxel between a voxel's centre and its edge: 1.21 in 2D, 1.87 in 3D."""
  return np.sqrt(nd) * (np.sqrt(nd) + 1) / 2 - 0.5


def _check_bound(found, expect, slack):
  """Every transformed mask voxel's centre lies in the transformed box, and the mask's box
  ends at most ``slack`` voxels inside it."""
  nd = found.shape[-1] // 2
  assert found.shape == expect.shape
  inside = np.concatenate([found[:, :nd] + 0.5 - expect[:, :nd],
                           expect[:, nd:] - (found[:, nd:] - 0.5)], 1)
  assert np.all(inside >= -1e-6), inside.min()
  assert np.all(inside <= slack + 0.5 + 1e-6), (inside.max(), slack + 0.5)


@pytest.mark.parametrize('nd', [2, 3])
def test_affine_boxes_match_scipy_affine_transform(nd):
  rng = np.random.default_rng(5 + nd)
  shape = (36, 40, 30)[:nd]
  instances, classes = _blobs(shape, 5, rng, low=0.2, high=0.8, size=(4, 7))
  mapping = dict(enumerate(classes, 1))
  boxes, _ = boxes_from_instance_map(instances, mapping)
  for trial in range(6):
    angles = rng.uniform(-0.6, 0.6, 1 if nd == 2 else 3)
    matrix = seg_augment.rotation_matrix(angles, nd) / rng.uniform(0.8, 1.3)
    if trial == 0:
      matrix = np.diag(rng.uniform(0.7, 1.4, nd))  # pure scaling: no rotation bound
    out_shape = tuple(int(n * 1.4) for n in shape)
    # Centre the output on the input: input = matrix @ output + offset.
    offset = (np.array(shape) - 1) / 2 - matrix @ ((np.array(out_shape) - 1) / 2)
    out = ndimage.affine_transform(instances, matrix, offset, out_shape, order=0,
                                   mode='constant', cval=0)
    found, _ = boxes_from_instance_map(out, mapping)
    slack = 0.5 if trial == 0 else _rotation_slack(nd)
    _check_bound(found, bt.affine_boxes(boxes, matrix, offset), slack)


def test_affine_boxes_of_flips_and_quarter_turns_are_exact():
  rng = np.random.default_rng(8)
  shape = (21, 21)
  label = _label_map(*_blobs(shape, 4, rng, size=(2, 6)))
  boxes, cls = boxes_from_label_map(label)
  flip = np.diag([-1.0, 1.0])
  offset = np.array([shape[0] - 1, 0.0])
  np.testing.assert_allclose(bt.affine_boxes(boxes, flip, offset), bt.flip_boxes(boxes, 0, 21))
  turn = seg_augment.rot90_matrix(1, 2)
  out = ndimage.affine_transform(label, turn, (np.array(shape) - 1) / 2 - turn @ (
      (np.array(shape) - 1) / 2), order=0)
  _assert_same_boxes(out, bt.affine_boxes(boxes, turn, (np.array(shape) - 1) / 2 - turn @ (
      (np.array(shape) - 1) / 2)), cls)


def _augment_params(rng, augment, patch):
  while True:
    p = seg_augment.draw_params(rng, augment, patch, 1)
    if p['rotate'] or p['scale'] or p['rot90'] or p['flip'].any():
      return p


@pytest.mark.parametrize('patch', [(40, 40), (36, 40, 40)])
def test_boxes_follow_seg_augment_patches(patch):
  rng = np.random.default_rng(9)
  augment = seg_augment.SegAugment(p_flip=0.5, p_rot90=0.5, p_rotate=0.8, rotate_deg=25.0,
                                   p_scale=0.8, scale=(0.85, 1.25))
  instances, classes = _blobs(patch, 4, rng, low=0.3, high=0.7, size=(4, 6))
  mapping = dict(enumerate(classes, 1))
  boxes, _ = boxes_from_instance_map(instances, mapping)
  image = np.zeros(patch + (1,), np.float32)
  centre = (np.array(patch) - 1) / 2 + rng.uniform(-2, 2, len(patch))
  for _ in range(6):
    p = _augment_params(rng, augment, patch)
    _, label_patch = seg_augment.apply(image, instances, centre, p, augment, patch)
    matrix, offset = bt.augment_affine(centre, p, augment, patch)
    # The map is seg_augment's own: the coordinates every output voxel reads.
    grid = np.indices(patch).reshape(len(patch), -1)
    np.testing.assert_allclose(matrix @ grid + offset[:, None],
                               seg_augment.sampling_coords(centre, p, augment, patch),
                               atol=1e-9)
    found, _ = boxes_from_instance_map(label_patch, mapping)
    _check_bound(found, bt.affine_boxes(boxes, matrix, offset), _rotation_slack(len(patch)))


def test_bad_input_is_refused_with_a_reason():
  p = seg_augment.draw_params(np.random.default_rng(0), seg_augment.SegAugment(p_elastic=1.0),
                              (8, 8), 1)
  with pytest.raises(ValueError, match='elastic'):
    bt.augment_affine(np.zeros(2), p, seg_augment.SegAugment(p_elastic=1.0), (8, 8))
  with pytest.raises(ValueError, match='permutation'):
    bt.transpose_boxes(np.zeros((1, 6)), (0, 0, 1))
  with pytest.raises(ValueError, match=r'2 nd'):
    bt.flip_boxes(np.zeros((1, 5)), 0, 4)
  with pytest.raises(ValueError, match='differ'):
    bt.rot90_boxes(np.zeros((1, 4)), 1, (1, 1), (4, 4))
