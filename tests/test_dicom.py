"""DICOM series reading (medjax.data.dicom): geometry and values of series written with pydicom
from volumes of known geometry, against the known volume, SimpleITK's reader and pydicom's own
test files; each refusal."""

import os
import sys

import numpy as np
import pytest

pydicom = pytest.importorskip('pydicom', reason='pydicom not installed (pip install ".[dicom]")')
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (ExplicitVRLittleEndian, JPEGLSLossless,  # noqa: E402
                         generate_uid)

from medjax.data import dicom  # noqa: E402
from medjax.data.nifti import VolumeError  # noqa: E402

CT_IMAGE_STORAGE = '1.2.840.10008.5.1.4.1.1.2'
ENHANCED_CT_STORAGE = '1.2.840.10008.5.1.4.1.1.2.1'


def _rotation(axis, degrees):
  c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
  i, j = [a for a in range(3) if a != axis]
  r = np.eye(3)
  r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
  return r


def _affine(directions, spacing, origin):
  """[4, 4] RAS affine whose columns are unit ``directions`` [3, 3] times ``spacing``."""
  a = np.eye(4)
  a[:3, :3] = np.asarray(directions, np.float64) * np.asarray(spacing, np.float64)
  a[:3, 3] = origin
  return a


def _base_dataset(series_uid, study_uid, frame_uid, rows, cols, sop_class=CT_IMAGE_STORAGE,
                  transfer_syntax=ExplicitVRLittleEndian):
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = sop_class
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = transfer_syntax
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = sop_class
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = \
      study_uid, series_uid, frame_uid
  ds.Modality = 'CT'
  ds.PatientName, ds.PatientID = 'Phantom', 'P1'
  ds.Rows, ds.Columns = rows, cols
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = 'MONOCHROME2'
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
  return ds


def write_series(folder, raw, affine_ras, slope=1.0, intercept=0.0, rng=None, series_uid=None,
                 positions_lps=None, reverse_instances=True, description='test series', prefix='IM'):
  """Writes ``raw`` ``[col, row, slice]`` int16 as one file per slice with the geometry of
  ``affine_ras``; shuffled file names, InstanceNumbers running against the slice order.

  The third affine column may point either way along the normal (slices then are written
  from the top or from the bottom); ``positions_lps`` ``[n, 3]`` overrides the positions.
  """
  rng = rng or np.random.default_rng(0)
  os.makedirs(folder, exist_ok=True)
  lps = dicom.LPS_TO_RAS @ affine_ras
  col_step, row_step = lps[:3, 0], lps[:3, 1]
  col_spacing, row_spacing = np.linalg.norm(col_step), np.linalg.norm(row_step)
  orientation = np.concatenate([col_step / col_spacing, row_step / row_spacing])
  series_uid = series_uid or generate_uid()
  study_uid, frame_uid = generate_uid(), generate_uid()
  n = raw.shape[2]
  names = rng.permutation(n)
  for k in range(n):
    ds = _base_dataset(series_uid, study_uid, frame_uid, raw.shape[1], raw.shape[0])
    position = lps[:3, 3] + k * lps[:3, 2] if positions_lps is None else positions_lps[k]
    ds.ImagePositionPatient = [f'{v:.6f}' for v in position]
    ds.ImageOrientationPatient = [f'{v:.8f}' for v in orientation]
    ds.PixelSpacing = [f'{row_spacing:.6f}', f'{col_spacing:.6f}']  # [row, column] spacing
    ds.SliceThickness = '9.0'  # deliberately not the spacing
    ds.RescaleSlope, ds.RescaleIntercept = f'{slope:g}', f'{intercept:g}'
    ds.InstanceNumber = n - k if reverse_instances else k + 1
    ds.SeriesDescription = description
    ds.PixelData = np.ascontiguousarray(raw[:, :, k].T.astype(np.int16)).tobytes()
    ds.save_as(os.path.join(folder, f'{prefix}{names[k]:04d}'), enforce_file_format=True)
  return series_uid


def assert_same_world_volume(expected, expected_affine, volume, atol_mm=1e-3):
  """Every voxel of ``volume`` lies where a voxel of ``expected`` lies, with its value."""
  to_expected = np.linalg.inv(expected_affine) @ volume.affine
  permutation = np.round(to_expected)
  np.testing.assert_allclose(to_expected, permutation, atol=atol_mm / 10)
  assert sorted(np.abs(permutation[:3, :3]).sum(axis=0)) == [1, 1, 1]
  index = np.indices(volume.array.shape).reshape(3, -1)
  mapped = (permutation[:3, :3] @ index + permutation[:3, 3:]).astype(int)
  assert (mapped >= 0).all() and (mapped < np.array(expected.shape)[:, None]).all()
  np.testing.assert_array_equal(volume.array.reshape(-1), expected[tuple(mapped)])
  world_expected = expected_affine @ np.vstack([mapped, np.ones(mapped.shape[1])])
  world_got = volume.affine @ np.vstack([index, np.ones(index.shape[1])])
  np.testing.assert_allclose(world_got, world_expected, atol=atol_mm)


def _raw(shape, seed=0):
  return np.random.default_rng(seed).integers(-1000, 2000, shape).astype(np.int16)


GEOMETRIES = {
    # Axial, axes towards patient Left and Posterior (DICOM's usual), slices going up.
    'lps_axial': _affine(np.diag([-1, -1, 1]), (0.7, 0.9, 2.5), (100.0, 80.0, -40.0)),
    # Axes towards Right and Anterior, slices going down (written from the top).
    'ras_axial_descending': _affine(np.diag([1, 1, -1]), (0.8, 0.6, 3.0), (-90.0, -70.0, 20.0)),
    # Coronal-ish oblique: rotated 20 degrees about z and 35 about x; anisotropic.
    'oblique': _affine(_rotation(2, 20) @ _rotation(0, 35) @ np.diag([-1, -1, 1]),
                       (0.5, 1.1, 4.0), (12.5, -30.0, 7.25)),
}


@pytest.mark.parametrize('name', sorted(GEOMETRIES))
def test_series_read_back_on_its_world_grid_with_rescaled_values(tmp_path, name):
  affine = GEOMETRIES[name]
  raw = _raw((7, 5, 6))
  write_series(str(tmp_path / 's'), raw, affine, slope=0.5, intercept=-1024)
  volume = dicom.read_series(str(tmp_path / 's'))
  assert volume.array.dtype == np.float32
  assert volume.path == str(tmp_path / 's')
  assert volume.original_shape == volume.array.shape
  expected = raw.astype(np.float64) * 0.5 - 1024
  assert_same_world_volume(expected, affine, volume)
  np.testing.assert_allclose(sorted(volume.spacing), sorted((affine[:3, :3] ** 2).sum(0) ** .5),
                             rtol=1e-5)


def test_axis_order_is_column_row_slice(tmp_path):
  """Array axis 0 runs along a row (the column index), axis 1 down a column."""
  affine = GEOMETRIES['lps_axial']
  raw = _raw((7, 5, 3))
  write_series(str(tmp_path / 's'), raw, affine, reverse_instances=False)
  volume = dicom.read_series(str(tmp_path / 's'))
  ds = pydicom.dcmread(sorted((tmp_path / 's').iterdir())[0])
  assert volume.array.shape == (ds.Columns, ds.Rows, 3)
  np.testing.assert_allclose(volume.affine, affine, atol=1e-5)


def test_lps_to_ras_is_its_own_inverse_and_negates_x_and_y():
  affine = GEOMETRIES['oblique']
  np.testing.assert_allclose(dicom.lps_to_ras_affine(dicom.lps_to_ras_affine(affine)), affine)
  point = np.array([1.0, 2.0, 3.0, 1.0])
  np.testing.assert_allclose(dicom.lps_to_ras_affine(np.eye(4)) @ point, [-1, -2, 3, 1])


@pytest.mark.parametrize('name', sorted(GEOMETRIES))
def test_equal_to_simpleitk_series_reader(tmp_path, name):
  sitk = pytest.importorskip('SimpleITK', reason='SimpleITK not installed (pip install ".[itk]")')
  raw = _raw((6, 8, 5), seed=1)
  write_series(str(tmp_path / 's'), raw, GEOMETRIES[name], slope=2.0, intercept=-1000)
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / 's')))
  image = reader.Execute()
  direction = np.array(image.GetDirection()).reshape(3, 3)
  affine_lps = _affine(direction, image.GetSpacing(), image.GetOrigin())
  itk_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps  # ITK is LPS
  itk_array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # [z, y, x] -> [x, y, z]
  volume = dicom.read_series(str(tmp_path / 's'))
  # Both put the slice axis along the normal; the grids may still differ by a reversal.
  assert_same_world_volume(itk_array.astype(np.float64), itk_affine, volume)


def test_pydicom_ct_small_in_hounsfield_units(tmp_path):
  path = pydicom.data.get_testdata_file('CT_small.dcm')
  ds = pydicom.dcmread(path)
  volume = _read_one_file(path, tmp_path / 'series')
  hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
  assert float(ds.RescaleIntercept) == -1024  # so the test checks a real rescale
  np.testing.assert_allclose(volume.array[:, :, 0], hu.T)
  lps_corner = np.array([float(v) for v in ds.ImagePositionPatient])
  np.testing.assert_allclose(volume.affine[:3, 3], lps_corner * [-1, -1, 1])
  np.testing.assert_allclose(volume.spacing[:2], [float(v) for v in ds.PixelSpacing][::-1])
  assert volume.spacing[2] == pytest.approx(float(ds.SliceThickness))  # one slice: thickness


def test_pydicom_mr_small_values_without_rescale(tmp_path):
  path = pydicom.data.get_testdata_file('MR_small.dcm')
  ds = pydicom.dcmread(path)
  assert 'RescaleSlope' not in ds
  volume = _read_one_file(path, tmp_path / 'series')
  np.testing.assert_array_equal(volume.array[:, :, 0], ds.pixel_array.T.astype(np.float32))
  assert volume.array.shape == (ds.Columns, ds.Rows, 1)


def _read_one_file(path, folder):
  """A single-slice series: the file alone in ``folder``."""
  import shutil
  folder.mkdir()
  shutil.copy(path, folder / 'slice')
  return dicom.read_series(str(folder))


def test_non_dicom_files_are_ignored(tmp_path):
  affine = GEOMETRIES['lps_axial']
  raw = _raw((4, 4, 3))
  write_series(str(tmp_path), raw, affine)
  (tmp_path / 'README.txt').write_text('not dicom')
  assert_same_world_volume(raw.astype(np.float64), affine, dicom.read_series(str(tmp_path)))


def test_two_series_refused_unless_one_is_chosen(tmp_path):
  raw_a, raw_b = _raw((4, 4, 3), 1), _raw((4, 4, 4), 2)
  write_series(str(tmp_path), raw_a, GEOMETRIES['lps_axial'], description='first')
  uid_b = write_series(str(tmp_path), raw_b, GEOMETRIES['oblique'], description='second',
                       prefix='B')
  with pytest.raises(VolumeError, match=rf'{tmp_path}: 2 series in one folder.*{uid_b}'):
    dicom.read_series(str(tmp_path))
  assert_same_world_volume(raw_b.astype(np.float64), GEOMETRIES['oblique'],
                           dicom.read_series(str(tmp_path), series_uid=uid_b))
  with pytest.raises(VolumeError, match='no series with SeriesInstanceUID 1.2.3'):
    dicom.read_series(str(tmp_path), series_uid='1.2.3')


def _positions(affine, n):
  lps = dicom.LPS_TO_RAS @ affine
  return np.array([lps[:3, 3] + k * lps[:3, 2] for k in range(n)])


def test_missing_slice_refused(tmp_path):
  affine = GEOMETRIES['oblique']
  write_series(str(tmp_path), _raw((4, 4, 5)), affine)
  # Remove the file holding the middle slice.
  middle = _positions(affine, 5)[2]
  for path in tmp_path.iterdir():
    if np.allclose([float(v) for v in pydicom.dcmread(path).ImagePositionPatient], middle,
                   atol=1e-4):
      path.unlink()
  with pytest.raises(VolumeError, match=rf'{tmp_path}: uneven slice spacing'):
    dicom.read_series(str(tmp_path))


def test_duplicate_slice_refused(tmp_path):
  affine = GEOMETRIES['lps_axial']
  positions = _positions(affine, 4)
  positions[2] = positions[1]
  write_series(str(tmp_path), _raw((4, 4, 4)), affine, positions_lps=positions)
  with pytest.raises(VolumeError, match=rf'{tmp_path}: duplicate slices at position'):
    dicom.read_series(str(tmp_path))


def test_gantry_tilt_refused(tmp_path):
  affine = GEOMETRIES['lps_axial']
  positions = _positions(affine, 5)
  positions[:, 1] += np.arange(5) * 2.5 * np.tan(np.radians(15))  # 15 degree tilt
  write_series(str(tmp_path), _raw((4, 4, 5)), affine, positions_lps=positions)
  with pytest.raises(VolumeError, match=rf'{tmp_path}: gantry tilt.*15\.00 degrees'):
    dicom.read_series(str(tmp_path))


def test_no_dicom_files_refused(tmp_path):
  (tmp_path / 'notes.txt').write_text('hello')
  with pytest.raises(VolumeError, match=rf'{tmp_path}: no DICOM image files'):
    dicom.read_series(str(tmp_path))
  with pytest.raises(VolumeError, match='not a folder'):
    dicom.read_series(str(tmp_path / 'missing'))


def test_compressed_without_decoder_refused(tmp_path):
  from pydicom.pixels import get_decoder
  if get_decoder(JPEGLSLossless).is_available:
    pytest.skip('a JPEG-LS decoder is installed here')
  ds = _base_dataset(generate_uid(), generate_uid(), generate_uid(), 4, 4,
                     transfer_syntax=JPEGLSLossless)
  ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
  ds.PixelSpacing = [1, 1]
  ds.PixelData = pydicom.encaps.encapsulate([b'\xff\xd8\x00\x00\xff\xd9'])
  ds['PixelData'].VR = 'OB'
  ds.save_as(tmp_path / 'IM0', enforce_file_format=True)
  with pytest.raises(VolumeError, match=rf'{tmp_path}: cannot decode the pixel data of IM0, '
                                        r'transfer syntax JPEG-LS Lossless'):
    dicom.read_series(str(tmp_path))


def _enhanced_ct(path, raw, affine_ras, slope, intercept):
  """One multi-frame file: geometry and rescale in the functional groups."""
  lps = dicom.LPS_TO_RAS @ affine_ras
  col_spacing, row_spacing = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
  ds = _base_dataset(generate_uid(), generate_uid(), generate_uid(), raw.shape[1], raw.shape[0],
                     sop_class=ENHANCED_CT_STORAGE)
  n = raw.shape[2]
  order = np.random.default_rng(3).permutation(n)  # frames stored out of order
  ds.NumberOfFrames = n
  shared = Dataset()
  orientation, measures, transform = Dataset(), Dataset(), Dataset()
  orientation.ImageOrientationPatient = list(np.concatenate(
      [lps[:3, 0] / col_spacing, lps[:3, 1] / row_spacing]).round(8))
  measures.PixelSpacing = [round(row_spacing, 6), round(col_spacing, 6)]
  measures.SliceThickness = 9.0
  transform.RescaleSlope, transform.RescaleIntercept = slope, intercept
  transform.RescaleType = 'HU'
  shared.PlaneOrientationSequence = [orientation]
  shared.PixelMeasuresSequence = [measures]
  shared.PixelValueTransformationSequence = [transform]
  ds.SharedFunctionalGroupsSequence = [shared]
  frames = []
  for k in order:
    item, position = Dataset(), Dataset()
    position.ImagePositionPatient = list((lps[:3, 3] + k * lps[:3, 2]).round(6))
    item.PlanePositionSequence = [position]
    frames.append(item)
  ds.PerFrameFunctionalGroupsSequence = frames
  ds.PixelData = np.ascontiguousarray(raw[:, :, order].transpose(2, 1, 0)).tobytes()
  ds.save_as(path, enforce_file_format=True)


def test_enhanced_multi_frame_read(tmp_path):
  affine = GEOMETRIES['oblique']
  raw = _raw((5, 6, 4), seed=4)
  _enhanced_ct(tmp_path / 'enhanced.dcm', raw, affine, 1.5, -1000)
  volume = dicom.read_series(str(tmp_path))
  assert_same_world_volume(raw * 1.5 - 1000.0, affine, volume)


def test_enhanced_multi_frame_without_positions_refused(tmp_path):
  affine = GEOMETRIES['lps_axial']
  _enhanced_ct(tmp_path / 'enhanced.dcm', _raw((4, 4, 3)), affine, 1.0, 0.0)
  ds = pydicom.dcmread(tmp_path / 'enhanced.dcm')
  del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
  ds.save_as(tmp_path / 'enhanced.dcm')
  with pytest.raises(VolumeError, match='enhanced.dcm frame 2: multi-frame DICOM without '
                                        'PlanePosition'):
    dicom.read_series(str(tmp_path))


def test_missing_pydicom_names_the_extra(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'pydicom', None)
  with pytest.raises(ImportError, match=r'pip install "medjax\[dicom\]"'):
    dicom.read_series(str(tmp_path))
