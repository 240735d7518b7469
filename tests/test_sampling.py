"""Prepare-once cache, original-grid restoration, k-fold splits, and the patch/slice sampler:
determinism, resume, process sharding, foreground oversampling, image/mask alignment."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from conftest import shared_file
from medjax.data import prepare, sampling

NAMES = ('hippocampus_004', 'hippocampus_006', 'hippocampus_007', 'hippocampus_008')


def _msd_subset(tmp_path, affine=None, names=NAMES):
  """A small MSD folder from real cases; optionally rewritten with another affine."""
  root = tmp_path / 'msd'
  (root / 'imagesTr').mkdir(parents=True)
  (root / 'labelsTr').mkdir()
  meta = json.load(open(shared_file('msd_hippocampus', 'dataset.json')))
  keep = [e for e in meta['training'] if any(n in e['image'] for n in names)]
  for entry in keep:
    for key in ('image', 'label'):
      src = shared_file('msd_hippocampus', entry[key])
      if affine is None:
        shutil.copy(src, root / entry[key])
      else:
        nib.save(nib.Nifti1Image(np.asarray(nib.load(src).dataobj), affine), root / entry[key])
  meta['training'] = keep
  (root / 'dataset.json').write_text(json.dumps(meta))
  return root, keep


def _oblique(spacing=(0.8, 1.5, 2.0)):
  affine = np.eye(4)
  affine[:3, :3] = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]]) @ np.diag(spacing)
  affine[:3, 3] = [5.0, -3.0, 12.0]
  return affine


def test_prepare_caches_and_restores_original_grid_exactly(tmp_path):
  root, keep = _msd_subset(tmp_path, affine=_oblique())
  ds = prepare.prepare(str(root), str(tmp_path / 'cache'))
  assert ds.class_names == ['background', 'Anterior', 'Posterior'] and len(ds.case_ids) == 4
  again = prepare.prepare(str(root), str(tmp_path / 'cache'))
  assert again.directory == ds.directory and again.records == ds.records
  for entry in keep:
    case_id = entry['image'].split('/')[-1][:-len('.nii.gz')]
    image, label, locations = ds.load(case_id)
    assert image.dtype == np.float32 and image.shape[-1] == 1 and label.dtype == np.uint8
    assert abs(float(np.mean(image))) < 1e-3 and abs(float(np.std(image)) - 1) < 1e-3
    assert set(locations) == {'1', '2'}
    assert all(np.all(label[tuple(c.T)] == int(k)) for k, c in locations.items())
    original = np.asarray(nib.load(root / entry['label']).dataobj)
    restored = prepare.restore_original_grid(np.asarray(label), ds.records[case_id])
    np.testing.assert_array_equal(restored, original)


def test_prepare_resampled_restores_close_to_original(tmp_path):
  root, keep = _msd_subset(tmp_path, affine=_oblique((0.8, 1.5, 2.0)), names=NAMES[:2])
  ds = prepare.prepare(str(root), str(tmp_path / 'cache'),
                       prepare.PrepareOptions(target_spacing=(1.0, 1.0, 1.0)))
  for case_id in ds.case_ids:
    record = ds.records[case_id]
    np.testing.assert_allclose(record['spacing_mm'], (1.0, 1.0, 1.0), atol=0.1)
    _, label, _ = ds.load(case_id)
    restored = prepare.restore_original_grid(np.asarray(label), record)
    original = np.asarray(nib.load(record['label']).dataobj)
    assert restored.shape == original.shape
    for k in (1, 2):
      dice = 2 * np.sum((restored == k) & (original == k)) / (
          np.sum(restored == k) + np.sum(original == k))
      assert dice > 0.85, (case_id, k, dice)


def test_prepare_refuses_a_dataset_with_a_bad_case(tmp_path):
  root, keep = _msd_subset(tmp_path, names=NAMES[:2])
  bad = root / keep[1]['image']
  bad.write_bytes(bad.read_bytes()[:300])
  with pytest.raises(ValueError, match=r'(?s)1 problem\(s\) found.*hippocampus_006.nii.gz: corrupt or truncated'):
    prepare.prepare(str(root), str(tmp_path / 'cache'))


def test_kfold_split():
  ids = [f'case{i:03d}' for i in range(23)]
  folds = [prepare.kfold_split(ids, 5, f, seed=0) for f in range(5)]
  vals = [set(f['val']) for f in folds]
  assert set().union(*vals) == set(ids) and sum(len(v) for v in vals) == 23
  for f in folds:
    assert not set(f['train']) & set(f['val'])
  assert prepare.kfold_split(ids, 5, 2, seed=0) == folds[2]
  assert prepare.kfold_split(ids, 5, 2, seed=1) != folds[2]
  with pytest.raises(ValueError, match='fold must be in'):
    prepare.kfold_split(ids, 5, 5, seed=0)


@pytest.fixture(scope='module')
def hippo_cases(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('hippo')
  root, _ = _msd_subset(tmp)
  ds = prepare.prepare(str(root), str(tmp / 'cache'))
  return {c: ds.load(c, mmap=False) for c in ds.case_ids}


FULL = sampling.SegAugment(p_flip=0.5, p_rot90=0.5, p_rotate=0.5, p_scale=0.5, p_elastic=0.5,
                           p_noise=0.5, p_blur=0.5, p_brightness=0.5, p_contrast=0.5,
                           p_gamma=0.5, p_lowres=0.5)


def test_sampler_is_deterministic_resumable_and_process_sharded(hippo_cases):
  make = lambda seed=0: sampling.SegmentationSampler(  # noqa: E731
      hippo_cases, (24, 32, 24), global_batch=6, seed=seed, augment=FULL)
  full = list(make().batches(0, 5))
  again = list(make().batches(0, 5))
  resumed = list(make().batches(3, 5))
  other_seed = list(make(1).batches(0, 1))
  for (xa, ya), (xb, yb) in zip(full, again):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  for (xa, ya), (xb, yb) in zip(full[3:], resumed):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  assert not np.array_equal(full[0][0], other_seed[0][0])
  shares = [list(make().batches(0, 5, process_index=p, process_count=3)) for p in range(3)]
  for step in range(5):
    np.testing.assert_array_equal(np.concatenate([s[step][0] for s in shares]), full[step][0])
    np.testing.assert_array_equal(np.concatenate([s[step][1] for s in shares]), full[step][1])
  assert full[0][0].shape == (6, 24, 32, 24, 1) and full[0][1].shape == (6, 24, 32, 24)


def test_foreground_oversampling_centres_on_foreground(hippo_cases):
  sampler = sampling.SegmentationSampler(hippo_cases, (15, 15, 15), global_batch=9, seed=0,
                                         foreground_fraction=1 / 3)
  assert sampler.num_foreground == 3
  centre_labels = np.array([[sampler(step, j)[1][7, 7, 7] for j in range(9)]
                            for step in range(20)])
  assert np.all(centre_labels[:, 6:] > 0)       # the last third: always on foreground
  assert np.mean(centre_labels[:, :6] > 0) < 0.3  # random patches: mostly background
  classes = centre_labels[:, 6:].reshape(-1)
  assert 0.25 < np.mean(classes == 1) < 0.75    # both classes equally likely


def test_augmented_image_and_mask_stay_aligned():
  # An image that encodes its own label: after any spatial augmentation, the intensity at a
  # voxel still says which label it has, except on the thin boundaries between labels.
  label = np.zeros((40, 40, 40), np.uint8)
  label[8:30, 10:25, 5:35] = 1
  label[15:22, 25:35, 12:28] = 2
  image = (label.astype(np.float32) * 10.0)[..., None]
  locations = prepare.class_locations(label, 3, np.random.default_rng(0))
  spatial_only = sampling.SegAugment(p_flip=0.5, p_rot90=0.5, p_rotate=1.0, rotate_deg=30,
                                     p_scale=1.0, p_elastic=0.5)
  mismatch = []
  for seed in range(20):
    x, y = sampling.sample(image, label, locations, (24, 24, 24), True,
                           np.random.default_rng(seed), spatial_only)
    mismatch.append(np.mean(np.round(x[..., 0] / 10.0) != y))
    assert set(np.unique(y)) <= {0, 1, 2}
  assert np.mean(mismatch) < 0.03
  # The check can fail: a mask flipped on its own disagrees with the image.
  x, y = sampling.sample(image, label, locations, (24, 24, 24), True, np.random.default_rng(0))
  assert np.mean(np.round(x[..., 0] / 10.0) != y[::-1]) > 0.05


def test_intensity_augmentations_change_only_intensity():
  label = np.zeros((20, 20), np.uint8)
  label[5:15, 5:15] = 1
  image = np.random.default_rng(0).normal(size=(20, 20, 1)).astype(np.float32)
  locations = prepare.class_locations(label, 2, np.random.default_rng(0))
  for name in ('p_noise', 'p_blur', 'p_brightness', 'p_contrast', 'p_gamma', 'p_lowres'):
    aug = sampling.SegAugment(**{name: 1.0})
    plain = sampling.sample(image, label, locations, (20, 20), False, np.random.default_rng(3))
    augmented = sampling.sample(image, label, locations, (20, 20), False,
                                np.random.default_rng(3), aug)
    np.testing.assert_array_equal(plain[1], augmented[1])
    assert not np.allclose(plain[0], augmented[0]), name
    assert np.all(np.isfinite(augmented[0]))


def test_slices_along_an_axis_skip_empty(hippo_cases):
  sampler = sampling.SegmentationSampler(hippo_cases, (64, 64), global_batch=8, seed=0,
                                         foreground_fraction=0.0, slice_axis=2,
                                         skip_empty_slices=True)
  batches = list(sampler.batches(0, 4))
  assert batches[0][0].shape == (8, 64, 64, 1)
  assert all(y.sum() > 0 for _, ys in batches for y in ys)  # whole slices, all with foreground


def test_slice_context_stacks_neighbouring_slices_as_channels():
  """2.5D inputs against a plain NumPy loop: slice i along the axis with its k neighbours
  on each side as channels (in order -k..k, each slice's C channels), zeros outside."""
  rng = np.random.default_rng(0)
  volume = rng.normal(size=(5, 6, 7, 2)).astype(np.float32)  # [X, Y, Z, C]
  for axis in range(3):
    depth = volume.shape[axis]
    for context in (0, 1, 2):
      stack = sampling.slice_stack(volume, axis, context)
      assert stack.shape == ((depth,) + tuple(np.delete(volume.shape[:3], axis)) +
                             (2 * (2 * context + 1),))
      for i in range(depth):
        expected = []
        for j in range(i - context, i + context + 1):
          index = [slice(None)] * 4
          index[axis] = j
          expected.append(volume[tuple(index)] if 0 <= j < depth else
                          np.zeros(np.delete(volume.shape, axis), np.float32))
        expected = np.concatenate(expected, axis=-1)
        np.testing.assert_array_equal(stack[i], expected)
        np.testing.assert_array_equal(
            sampling.slice_with_context(volume, axis, i, context), expected)


def test_sampler_with_slice_context_keeps_neighbours_aligned_with_the_centre():
  """Slices along axis 0 carry their index + 1 as a constant value, so every pixel of a
  sampled 2.5D patch that lies inside the volume must read centre + offset in the neighbour
  channels (0 beyond the volume's ends), through rotation, scaling and flips; the centre
  channel and the label are exactly the plain 2D sampler's."""
  depth = 9
  image = np.broadcast_to(np.arange(1, depth + 1, dtype=np.float32)[:, None, None, None],
                          (depth, 20, 24, 1)).copy()
  label = np.zeros((depth, 20, 24), np.int32)
  label[3:6, 5:15, 6:18] = 1
  cases = {'a': (image, label, prepare.class_locations(label, 2, np.random.default_rng(0)))}
  augment = sampling.SegAugment(p_flip=0.5, p_rotate=1.0, rotate_deg=30.0, p_scale=1.0)
  common = dict(global_batch=6, seed=3, foreground_fraction=0.5, augment=augment, slice_axis=0)
  plain = sampling.SegmentationSampler(cases, (16, 16), **common)
  stacked = sampling.SegmentationSampler(cases, (16, 16), slice_context=2, **common)
  for step in range(3):
    for j in range(6):
      x2, y2 = plain(step, j)
      x, y = stacked(step, j)
      assert x.shape == (16, 16, 5) and x2.shape == (16, 16, 1)
      np.testing.assert_array_equal(x[..., 2], x2[..., 0])
      np.testing.assert_array_equal(y, y2)
      # Pixels wholly inside the volume (linear interpolation blends the border with 0)
      # read the centre slice's value, the index + 1 of the slice the sampler took.
      inside = np.isclose(x[..., 2], x[..., 2].max(), rtol=1e-5)
      centre = round(float(x[..., 2].max()))
      assert inside.sum() > 100 and 1 <= centre <= depth
      for c, offset in enumerate(range(-2, 3)):
        expected = centre + offset if 1 <= centre + offset <= depth else 0.0
        np.testing.assert_allclose(x[..., c][inside], expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='slice_context needs slice_axis'):
    sampling.SegmentationSampler(cases, (16, 16, 16), global_batch=2, seed=0, slice_context=1)
