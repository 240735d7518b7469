"""tf.data pipeline: determinism, exact resume, per-process sharding, augmentation."""

import numpy as np
import pytest

from medjax.config import default_config
from medjax.data import pipeline


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
