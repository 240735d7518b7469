"""NIfTI reading, orientation and resampling round trips, bad-input errors, intensity
normalisers against NumPy/SciPy, dataset layouts and `medjax data check`."""

import gzip
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import shared_file
from medjax.data import intensity, layouts, nifti

HIPPO = ('msd_hippocampus',)


def _real_case(name='hippocampus_004'):
  image = shared_file(*HIPPO, 'imagesTr', f'{name}.nii.gz')
  label = shared_file(*HIPPO, 'labelsTr', f'{name}.nii.gz')
  return image, label


def _oblique_affine(spacing=(0.8, 1.5, 3.0), angle=0.3):
  permute_flip = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)
  c, s = np.cos(angle), np.sin(angle)
  rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
  affine = np.eye(4)
  affine[:3, :3] = rotation @ permute_flip @ np.diag(spacing)
  affine[:3, 3] = [10.0, -20.0, 5.0]
  return affine


def _save(array, affine, path):
  nib.save(nib.Nifti1Image(array, affine), str(path))
  return str(path)


@pytest.fixture
def oblique_pair(tmp_path):
  image_path, label_path = _real_case()
  image = np.asarray(nib.load(image_path).dataobj)
  label = np.asarray(nib.load(label_path).dataobj)
  affine = _oblique_affine()
  return (_save(image, affine, tmp_path / 'img.nii.gz'),
          _save(label, affine, tmp_path / 'lab.nii.gz'), image, label, affine)


def test_read_real_volume():
  image_path, label_path = _real_case()
  image = nifti.read_volume(image_path)
  label = nifti.read_volume(label_path, 'label', num_classes=3)
  assert image.array.dtype == np.float32 and label.array.dtype == np.int32
  assert image.axcodes == ('R', 'A', 'S') and image.spacing == (1.0, 1.0, 1.0)
  nifti.check_pair(image, label)
  assert set(np.unique(label.array)) == {0, 1, 2}


def test_canonical_round_trip_on_oblique_anisotropic_volume(oblique_pair):
  image_path, _, original, _, affine = oblique_pair
  volume = nifti.read_volume(image_path)
  assert volume.axcodes == ('A', 'I', 'L')
  canonical = nifti.to_canonical(volume)
  assert canonical.axcodes == ('R', 'A', 'S')
  # Spacing follows the axes: file axes (0.8, 1.5, 3.0) mm end up on axes (2, 0, 1).
  np.testing.assert_allclose(canonical.spacing, (3.0, 0.8, 1.5), rtol=1e-6)
  np.testing.assert_array_equal(nifti.from_canonical(canonical.array, canonical), original)
  # Every voxel keeps its world position: same value at the same RAS+ point.
  rng = np.random.default_rng(0)
  for index in rng.integers(0, np.array(original.shape), size=(50, 3)):
    world = affine @ np.r_[index, 1.0]
    new_index = np.linalg.solve(canonical.affine, world)[:3]
    np.testing.assert_allclose(new_index, np.round(new_index), atol=1e-6)
    assert canonical.array[tuple(np.round(new_index).astype(int))] == original[tuple(index)]


def test_resampling_keeps_field_of_view_and_matches_scipy(oblique_pair):
  image_path, label_path, _, _, _ = oblique_pair
  volume = nifti.to_canonical(nifti.read_volume(image_path))
  resampled = nifti.resample(volume, (1.0, 1.0, 1.0), order=1)
  np.testing.assert_allclose(resampled.spacing, (1.0, 1.0, 1.0), atol=0.05)
  # Outer corners of the grid stay where they were in world space.
  for vol in (volume, resampled):
    assert vol.array.ndim == 3
  corner = lambda v: v.affine @ np.r_[-0.5, -0.5, -0.5, 1.0]  # noqa: E731
  far = lambda v: v.affine @ np.r_[np.array(v.array.shape) - 0.5, 1.0]  # noqa: E731
  np.testing.assert_allclose(corner(resampled), corner(volume), atol=1e-6)
  np.testing.assert_allclose(far(resampled), far(volume), atol=1e-6)
  # Independent reference: scipy.ndimage.zoom with grid_mode=True (corner-aligned grids).
  zoom = np.array(resampled.array.shape) / np.array(volume.array.shape)
  reference = ndimage.zoom(volume.array, zoom, order=1, grid_mode=True, mode='grid-constant')
  interior = tuple(slice(2, -2) for _ in range(3))
  np.testing.assert_allclose(resampled.array[interior], reference[interior], rtol=1e-4,
                             atol=1e-2)
  labels = nifti.resample(nifti.to_canonical(nifti.read_volume(label_path, 'label')),
                          (1.0, 1.0, 1.0), order=0)
  assert labels.array.dtype == np.int32 and set(np.unique(labels.array)) <= {0, 1, 2}


def test_linear_resampling_reproduces_a_linear_ramp():
  ramp = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((10, 4, 4), np.float32)
  out = nifti.resample_to_shape(ramp, (20, 4, 4), order=1)
  centres = (np.arange(20) + 0.5) * 0.5 - 0.5  # old-index coordinates of new voxel centres
  np.testing.assert_allclose(out[1:-1, 0, 0], centres[1:-1], atol=1e-5)


def test_save_like_writes_the_input_affine_and_header(oblique_pair, tmp_path):
  image_path, _, original, _, affine = oblique_pair
  source = nib.load(image_path)
  source.header['descrip'] = b'scanner X, protocol Y'
  source.header.set_xyzt_units('mm', 'sec')
  source.header.set_qform(affine, code=1)
  source.header.set_sform(affine, code=2)
  nib.save(nib.Nifti1Image(np.asarray(source.dataobj), affine, source.header), image_path)
  volume = nifti.read_volume(image_path)
  out = tmp_path / 'pred.nii.gz'
  nifti.save_like((original > original.mean()).astype(np.uint8), volume, str(out))
  saved = nib.load(str(out))
  np.testing.assert_allclose(saved.affine, affine, atol=1e-6)
  assert saved.shape == original.shape and nib.aff2axcodes(saved.affine) == ('A', 'I', 'L')
  assert saved.header['descrip'] == b'scanner X, protocol Y'
  assert saved.header.get_xyzt_units() == ('mm', 'sec')
  assert int(saved.header['sform_code']) == 2 and saved.get_data_dtype() == np.uint8
  np.testing.assert_array_equal(np.asarray(saved.dataobj),
                                (original > original.mean()).astype(np.uint8))


# ----- bad input: one test per class, each made from a real file ----------------------------
def test_truncated_nifti_names_file(tmp_path):
  image_path, _ = _real_case()
  raw = open(image_path, 'rb').read()
  truncated = tmp_path / 'truncated.nii.gz'
  truncated.write_bytes(raw[:len(raw) // 2])
  with pytest.raises(nifti.VolumeError, match=r'truncated\.nii\.gz: corrupt or truncated'):
    nifti.read_volume(str(truncated))


def test_corrupt_gzip_and_not_nifti(tmp_path):
  image_path, _ = _real_case()
  raw = bytearray(open(image_path, 'rb').read())
  raw[100:140] = b'\x00' * 40
  corrupt = tmp_path / 'corrupt.nii.gz'
  corrupt.write_bytes(bytes(raw))
  with pytest.raises(nifti.VolumeError, match=r'corrupt\.nii\.gz: corrupt or truncated'):
    nifti.read_volume(str(corrupt))
  text = tmp_path / 'notes.nii.gz'
  text.write_bytes(gzip.compress(b'this is a text file, not an image'))
  with pytest.raises(nifti.VolumeError, match=r'notes\.nii\.gz: (not a NIfTI|corrupt)'):
    nifti.read_volume(str(text))
  with pytest.raises(nifti.VolumeError, match='missing.nii.gz: file not found'):
    nifti.read_volume(str(tmp_path / 'missing.nii.gz'))


def test_4d_nan_and_label_errors(tmp_path):
  image_path, label_path = _real_case()
  image = nib.load(image_path)
  data = np.asarray(image.dataobj).astype(np.float32)
  four_d = _save(np.stack([data, data], -1), image.affine, tmp_path / 'four_d.nii.gz')
  with pytest.raises(nifti.VolumeError, match=r'four_d\.nii\.gz: expected a 3D volume'):
    nifti.read_volume(four_d)
  with_nan = data.copy()
  with_nan[3, 4, 5] = np.nan
  with pytest.raises(nifti.VolumeError, match=r'nan\.nii\.gz: 1 NaN or infinite voxels'):
    nifti.read_volume(_save(with_nan, image.affine, tmp_path / 'nan.nii.gz'))
  label = np.asarray(nib.load(label_path).dataobj).astype(np.float32)
  fractional = label.copy()
  fractional[label == 1] = 0.5
  with pytest.raises(nifti.VolumeError, match='non-integer values'):
    nifti.read_volume(_save(fractional, image.affine, tmp_path / 'frac.nii.gz'), 'label')
  out_of_range = label.copy()
  out_of_range[0, 0, 0] = 7
  with pytest.raises(nifti.VolumeError, match=r'labels \[7\] outside the declared classes 0\.\.2'):
    nifti.read_volume(_save(out_of_range, image.affine, tmp_path / 'big.nii.gz'), 'label', 3)


def test_image_label_shape_and_affine_mismatch(tmp_path):
  image_path, label_path = _real_case()
  image = nifti.read_volume(image_path)
  label = np.asarray(nib.load(label_path).dataobj)
  cropped = nifti.read_volume(_save(label[1:], image.affine, tmp_path / 'crop.nii.gz'), 'label')
  with pytest.raises(nifti.VolumeError, match=r'crop\.nii\.gz: label shape .* differs'):
    nifti.check_pair(image, cropped)
  shifted_affine = image.affine.copy()
  shifted_affine[0, 3] += 2.0
  shifted = nifti.read_volume(_save(label, shifted_affine, tmp_path / 'shift.nii.gz'), 'label')
  with pytest.raises(nifti.VolumeError, match=r'shift\.nii\.gz: label affine differs'):
    nifti.check_pair(image, shifted)


# ----- intensity -----------------------------------------------------------------------------
def test_normalisers_match_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(100, 20, (20, 20, 20)).astype(np.float32)
  x[:5] = 0
  np.testing.assert_allclose(intensity.zscore(x), (x - x.mean()) / x.std(), rtol=1e-4, atol=1e-5)
  nz = x[x != 0]
  np.testing.assert_allclose(intensity.zscore(x, nonzero=True), (x - nz.mean()) / nz.std(),
                             rtol=1e-4, atol=1e-5)
  hu = rng.uniform(-1500, 2000, (8, 8, 8)).astype(np.float32)
  expected = np.clip((hu + 175) / 425, 0, 1)
  np.testing.assert_allclose(intensity.window(hu, -175, 250), expected, rtol=1e-5, atol=1e-6)
  lo, hi = np.percentile(x, [0.5, 99.5])
  np.testing.assert_allclose(intensity.percentile_clip(x), np.clip(x, lo, hi))
  with pytest.raises(ValueError, match='a_max > a_min'):
    intensity.window(hu, 10, 10)


def test_foreground_crop_and_pad_round_trip():
  mask = np.zeros((30, 40, 20), bool)
  mask[5:9, 10:31, 3:4] = True
  box = intensity.foreground_bbox(mask, margin=2)
  assert box == (slice(3, 11), slice(8, 33), slice(1, 6))
  x = np.random.default_rng(1).normal(size=(35, 50, 23)).astype(np.float32)
  padded, pads = intensity.pad_to_multiple(x, 16, axes=(0, 1, 2))
  assert all(s % 16 == 0 for s in padded.shape)
  np.testing.assert_array_equal(intensity.unpad(padded, pads), x)


# ----- layouts and `medjax data check` -------------------------------------------------------
def _copy_msd_subset(tmp_path, names=('hippocampus_004', 'hippocampus_006', 'hippocampus_007')):
  root = tmp_path / 'msd'
  (root / 'imagesTr').mkdir(parents=True)
  (root / 'labelsTr').mkdir()
  meta = json.load(open(shared_file(*HIPPO, 'dataset.json')))
  keep = [e for e in meta['training'] if any(n in e['image'] for n in names)]
  for entry in keep:
    for key in ('image', 'label'):
      shutil.copy(shared_file(*HIPPO, entry[key]), root / entry[key])
  meta['training'] = keep
  (root / 'dataset.json').write_text(json.dumps(meta))
  return root, keep


def test_check_dataset_reports_fingerprint_and_each_bad_file(tmp_path):
  root, keep = _copy_msd_subset(tmp_path)
  report = layouts.check_dataset(str(root))
  assert report['problems'] == []
  assert report['summary']['valid_cases'] == 3
  assert report['summary']['class_names'] == ['background', 'Anterior', 'Posterior']
  assert report['summary']['spacing_median_mm'] == [1.0, 1.0, 1.0]
  # Corrupt one label, truncate one image: both named, the third case still checked.
  label = root / keep[0]['label']
  data = np.asarray(nib.load(str(label)).dataobj).astype(np.int16)
  data[0, 0, 0] = 9
  nib.save(nib.Nifti1Image(data, nib.load(str(label)).affine), str(label))
  image = root / keep[1]['image']
  image.write_bytes(image.read_bytes()[:500])
  report = layouts.check_dataset(str(root))
  assert len(report['problems']) == 2 and report['summary']['valid_cases'] == 1
  assert any(str(label) in p and 'outside the declared classes' in p
             for p in report['problems'])
  assert any(str(image) in p and 'truncated' in p for p in report['problems'])
  proc = subprocess.run([sys.executable, '-m', 'medjax.cli', 'data', 'check', str(root)],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and 'problems: 2' in proc.stdout


@pytest.mark.slow
def test_data_check_cli_on_real_msd_and_2d_folder(tmp_path):
  root = os.path.dirname(shared_file(*HIPPO, 'dataset.json'))
  out = tmp_path / 'fingerprint.json'
  proc = subprocess.run([sys.executable, '-m', 'medjax.cli', 'data', 'check', root,
                         '--max_cases', '20', '--json', str(out)],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert 'cases: 20 (20 valid)' in proc.stdout and 'problems: 0' in proc.stdout
  assert json.load(open(out))['summary']['axcodes'] == ['RAS']
  isbi = os.path.dirname(shared_file('isbi2012_em_membrane', 'train', 'image', '0.png'))
  info = layouts.find_cases(os.path.dirname(os.path.dirname(isbi)))
  assert info.spatial_dims == 2 and len(info.cases) == 30
  assert all(c.label is not None for c in info.cases)


def test_2d_folder_problems_and_empty_dataset(tmp_path):
  from PIL import Image
  (tmp_path / 'images').mkdir()
  (tmp_path / 'labels').mkdir()
  with pytest.raises(ValueError, match='the dataset is empty'):
    layouts.find_cases(str(tmp_path))
  Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / 'images' / 'a.png')
  Image.fromarray(np.zeros((16, 32), np.uint8)).save(tmp_path / 'labels' / 'a.png')
  Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / 'images' / 'b.png')
  (tmp_path / 'labels' / 'b.png').write_bytes(b'not a png')
  report = layouts.check_dataset(str(tmp_path))
  assert len(report['problems']) == 2
  assert any('a.png: label shape (16, 32) differs' in p for p in report['problems'])
  assert any('b.png: corrupt or unreadable image' in p for p in report['problems'])
  with pytest.raises(ValueError, match='no dataset.json and no image/label folders'):
    layouts.find_cases(str(tmp_path / 'images'))


def test_read_array_decides_2d_or_3d_by_suffix(oblique_pair, tmp_path):
  from PIL import Image
  image_path, label_path = oblique_pair[:2]
  image, spacing = layouts.read_array(image_path, 'image')
  reference = nib.load(image_path)
  np.testing.assert_allclose(image[..., 0], reference.get_fdata(), rtol=1e-6)
  assert image.shape == reference.shape + (1,)
  np.testing.assert_allclose(spacing, nib.affines.voxel_sizes(reference.affine), rtol=1e-6)
  label, _ = layouts.read_array(label_path, 'label', num_classes=3)
  assert label.shape == reference.shape and label.dtype == np.int32
  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(tmp_path / 'x.png')
  Image.fromarray(np.where(rgb[..., 0] > 127, 255, 0).astype(np.uint8)).save(tmp_path / 'y.png')
  image2d, spacing2d = layouts.read_array(str(tmp_path / 'x.png'))
  np.testing.assert_array_equal(image2d, rgb.astype(np.float32))
  assert spacing2d == (1.0, 1.0)
  label2d, _ = layouts.read_array(str(tmp_path / 'y.png'), 'label')
  np.testing.assert_array_equal(label2d, (rgb[..., 0] > 127).astype(np.int32))
  (tmp_path / 'z.mha').write_bytes(b'')
  with pytest.raises(nifti.VolumeError, match=r'z\.mha: unknown image format; expected one of '
                                              r'\.nii\.gz'):
    layouts.read_array(str(tmp_path / 'z.mha'))
