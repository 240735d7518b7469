"""tf.data pipeline: determinism, exact resume, per-process sharding, augmentation."""

import numpy as np
import pytest

from medjax.config import default_config
from medjax.data import augment, pipeline


def _data(n=100, size=12, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8),
          rng.integers(0, 3, n).astype(np.int32))


def _augment(**kw):
  aug = default_config().data.augment
  aug.update(kw)
  return aug


FULL_AUG = dict(flip_lr=True, flip_ud=True, rotation_deg=20.0, scale_min=0.9, scale_max=1.2,
                brightness=0.1, contrast=0.2)


def _batches(x, y, start=0, steps=12, seed=3, aug=None, **kw):
  return list(pipeline.train_batches(
      x, y, global_batch=16, seed=seed, start_step=start, num_steps=steps, pixel_max=255.0,
      mean=0.5, std=0.5, augment=_augment(**(aug or {})), **kw))


def test_same_seed_same_batches_other_seed_differs():
  x, y = _data()
  a, b, c = _batches(x, y, aug=FULL_AUG), _batches(x, y, aug=FULL_AUG), _batches(
      x, y, seed=4, aug=FULL_AUG)
  assert len(a) == 12  # 100 // 16 = 6 steps/epoch, 2 epochs
  for (xa, ya), (xb, yb) in zip(a, b):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  assert not np.array_equal(a[0][0], c[0][0])


def test_epochs_are_permutations_dropping_the_remainder():
  x = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1).repeat(2, 1).repeat(2, 2)
  y = np.arange(100, dtype=np.int32)
  batches = _batches(x, y)
  epoch0 = np.concatenate([b[1] for b in batches[:6]])
  epoch1 = np.concatenate([b[1] for b in batches[6:]])
  assert len(set(epoch0)) == 96 and len(set(epoch1)) == 96
  assert not np.array_equal(epoch0, epoch1)
  # Images travel with their labels (pixel value == index, normalised).
  first_x, first_y = batches[0]
  np.testing.assert_allclose(first_x[:, 0, 0, 0], (first_y / 255.0 - 0.5) / 0.5, rtol=1e-6)


@pytest.mark.parametrize('start', [1, 5, 6, 7, 11])
def test_resume_sees_exactly_the_uninterrupted_batches(start):
  x, y = _data()
  full = _batches(x, y, aug=FULL_AUG)
  resumed = _batches(x, y, start=start, aug=FULL_AUG)
  assert len(resumed) == 12 - start
  for (xa, ya), (xb, yb) in zip(full[start:], resumed):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)


def test_processes_read_disjoint_shares_that_make_the_global_batch():
  x, y = _data()
  full = _batches(x, y, aug=FULL_AUG)
  shares = [_batches(x, y, aug=FULL_AUG, process_index=p, process_count=4) for p in range(4)]
  for step, (gx, gy) in enumerate(full):
    np.testing.assert_array_equal(np.concatenate([s[step][0] for s in shares]), gx)
    np.testing.assert_array_equal(np.concatenate([s[step][1] for s in shares]), gy)


def test_flips_match_numpy_and_happen_about_half_the_time():
  x, y = _data(n=256)
  plain = _batches(x, y, steps=16)
  flipped = _batches(x, y, steps=16, aug=dict(flip_lr=True))
  n_flipped = 0
  for (px, _), (fx, _) in zip(plain, flipped):
    for a, b in zip(px, fx):
      if np.array_equal(a, b):
        continue
      np.testing.assert_array_equal(b, a[:, ::-1])  # [H, W, C]: width axis reversed
      n_flipped += 1
  assert 0.35 < n_flipped / 256 < 0.65


def test_rotation_keeps_shape_and_zero_rotation_is_identity():
  x, y = _data()
  plain = _batches(x, y, steps=2)
  same = _batches(x, y, steps=2, aug=dict(rotation_deg=1e-6))
  np.testing.assert_allclose(same[0][0], plain[0][0], atol=1e-4)
  rotated = _batches(x, y, steps=2, aug=dict(rotation_deg=45.0))
  assert rotated[0][0].shape == plain[0][0].shape
  assert not np.allclose(rotated[0][0], plain[0][0], atol=1e-2)


def test_geometric_augmentation_rejects_3d():
  x = np.zeros((40, 4, 4, 4, 1), np.uint8)
  y = np.zeros(40, np.int32)
  with pytest.raises(ValueError, match='2D-only'):
    _batches(x, y, aug=dict(rotation_deg=10.0))


def _blob(size, centre, sigma=1.5):
  """A Gaussian blob ``[size, size, 1]`` centred at ``centre`` = (y, x) pixels."""
  yy, xx = np.mgrid[:size, :size].astype(np.float64)
  blob = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma ** 2))
  return blob[..., None].astype(np.float32)


def _centroid(image):
  yy, xx = np.mgrid[:image.shape[0], :image.shape[1]]
  weights = image[..., 0] / image[..., 0].sum()
  return np.array([(yy * weights).sum(), (xx * weights).sum()])


@pytest.mark.parametrize('angle_deg,zoom,shear_deg,shift', [
    (0.0, 1.0, 0.0, (2.5, -3.0)), (0.0, 1.0, 20.0, (0.0, 0.0)), (30.0, 1.2, 0.0, (0.0, 0.0)),
    (-25.0, 0.9, 15.0, (1.0, 2.0))])
def test_affine_moves_a_blob_where_the_geometry_says(angle_deg, zoom, shear_deg, shift):
  # Forward map in (x, y) pixel coordinates about the centre c: rotate by the angle (x toward
  # -y for positive angles, the pipeline's convention) and zoom, then shear x by tan(shear) * y,
  # then shift. A small blob's centroid must land there (bilinear sampling, 0.15 px).
  import tensorflow as tf
  size, c = 40, np.array([19.5, 19.5])
  angle, shear = np.deg2rad(angle_deg), np.deg2rad(shear_deg)
  rotate_zoom = zoom * np.array([[np.cos(angle), np.sin(angle)],
                                 [-np.sin(angle), np.cos(angle)]])
  shear_m = np.array([[1.0, np.tan(shear)], [0.0, 1.0]])
  for point_yx in [(16.0, 22.0), (23.0, 17.0)]:
    p_xy = np.array(point_yx[::-1]) - c
    expected_xy = c + shear_m @ rotate_zoom @ p_xy + np.array(shift[::-1])
    out = augment._affine_2d(tf.constant(_blob(size, point_yx)), tf.constant(angle, tf.float32),
                              tf.constant(zoom, tf.float32), tf.constant(shear, tf.float32),
                              tf.constant(shift[0], tf.float32),
                              tf.constant(shift[1], tf.float32)).numpy()
    np.testing.assert_allclose(_centroid(out), expected_xy[::-1], atol=0.15)


def test_gaussian_blur_matches_scipy():
  import tensorflow as tf
  from scipy import ndimage
  image = np.random.default_rng(0).normal(size=(20, 24, 2)).astype(np.float32)
  for sigma in (0.5, 1.0, 1.7):
    radius = int(np.ceil(3 * sigma))
    out = augment._gaussian_blur_2d(tf.constant(image), tf.constant(sigma, tf.float32),
                                     radius).numpy()
    # tf.pad's REFLECT is SciPy's 'mirror' (the edge pixel is not repeated).
    expected = ndimage.gaussian_filter(image.astype(np.float64), (sigma, sigma, 0),
                                       mode='mirror', truncate=radius / sigma)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def _augment_many(aug_kw, image, keys=range(200)):
  import tensorflow as tf
  fn = pipeline.make_augment_fn(_augment(**aug_kw), 2)
  return np.stack([fn(tf.constant(image), tf.constant([k, 5], tf.int64)).numpy()
                   for k in keys])


def test_added_ops_leave_the_earlier_ops_draws_unchanged():
  # Noise draws from its own seeds: with it, the rotation and contrast are the same, and
  # the difference is zero-mean Gaussian noise of at most noise_std.
  image = np.random.default_rng(1).normal(size=(16, 16, 1)).astype(np.float32)
  base = dict(rotation_deg=20.0, contrast=0.3)
  plain = _augment_many(base, image, range(40))
  noisy = _augment_many(dict(base, noise_std=0.2), image, range(40))
  residual = (noisy - plain).reshape(40, -1)
  stds = residual.std(axis=1)
  assert np.all(stds < 0.2 * 1.15) and stds.max() > 0.1 and stds.min() < 0.1
  assert abs(residual.mean()) < 0.01


def test_op_prob_applies_each_op_to_about_that_share_of_images():
  image = np.random.default_rng(2).normal(size=(8, 8, 1)).astype(np.float32)
  for prob in (1.0, 0.3):
    out = _augment_many(dict(brightness=0.5, op_prob=prob), image)
    changed = np.mean([not np.array_equal(o, image) for o in out])
    if prob == 1.0:
      assert changed == 1.0
    else:
      assert 0.2 < changed < 0.4, changed
  # Translation alone shifts content (reflected borders keep the shape).
  shifted = _augment_many(dict(translate=0.25), image, range(5))
  assert shifted.shape == (5, 8, 8, 1) and not np.allclose(shifted[0], image)


@pytest.mark.parametrize('kw,message', [
    (dict(translate=0.5), 'translate is a fraction'), (dict(shear_deg=70.0), 'shear_deg'),
    (dict(noise_std=-1.0), 'noise_std'), (dict(op_prob=0.0), 'op_prob')])
def test_bad_augment_values_are_refused(kw, message):
  with pytest.raises(ValueError, match=message):
    pipeline.make_augment_fn(_augment(**kw), 2)
  with pytest.raises(ValueError, match='^data.augment.rotation_deg.* 2D-only'):
    pipeline.make_augment_fn(_augment(blur_sigma=1.0), 3)
  # The error names the config key it reads (FixMatch's strong view has its own).
  with pytest.raises(ValueError, match='^semi.strong_augment.rotation_deg.* 2D-only'):
    pipeline.make_augment_fn(_augment(rotation_deg=10.0), 3, 'semi.strong_augment')


def test_eval_covers_every_example_once_with_padding_mask():
  x, y = _data(n=37)
  seen_labels, total = [], 0
  for images, labels, mask in pipeline.eval_batches(x, y, global_batch=16, pixel_max=255.0,
                                                    mean=0.0, std=1.0):
    assert images.shape == (16, 12, 12, 1)
    seen_labels.append(labels[mask.astype(bool)])
    total += int(mask.sum())
  assert total == 37
  np.testing.assert_array_equal(np.concatenate(seen_labels), y)


def test_batch_larger_than_dataset_is_a_clear_error():
  x, y = _data(n=10)
  with pytest.raises(ValueError, match='fewer than one batch of 16'):
    _batches(x, y)


def test_class_balanced_sampling_equalises_classes_deterministically():
  rng = np.random.default_rng(0)
  labels = np.array([0] * 900 + [1] * 90 + [2] * 10, np.int32)
  x = rng.integers(0, 256, (1000, 4, 4, 1), dtype=np.uint8)
  kw = dict(global_batch=100, seed=0, start_step=0, num_steps=30, pixel_max=255.0, mean=0.0,
            std=1.0, augment=_augment(), class_balanced=True)
  seen = np.concatenate([b[1] for b in pipeline.train_batches(x, labels, **kw)])
  counts = np.bincount(seen, minlength=3) / len(seen)
  np.testing.assert_allclose(counts, [1 / 3] * 3, atol=0.03)
  again = np.concatenate([b[1] for b in pipeline.train_batches(x, labels, **kw)])
  np.testing.assert_array_equal(seen, again)
  resumed = np.concatenate([b[1] for b in pipeline.train_batches(x, labels, **{
      **kw, 'start_step': 17})])
  np.testing.assert_array_equal(resumed, seen[1700:])
  with pytest.raises(ValueError, match='not multi-label'):
    pipeline.balanced_epoch_order(0, 0, np.zeros((10, 3)))
