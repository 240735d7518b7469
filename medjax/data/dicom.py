"""DICOM series folders read as one 3D :class:`~medjax.data.nifti.Volume` (pydicom).

Geometry, as the DICOM standard defines it (PS3.3 C.7.6.2): the pixel at column ``c``, row
``r`` of a slice lies at ``ImagePositionPatient + c * dc * F_row + r * dr * F_col``, where
``ImageOrientationPatient = F_row + F_col`` (the direction in which the column index grows,
then the direction in which the row index grows) and ``PixelSpacing = [dr, dc]`` (row
spacing first, i.e. the distance between rows, then between columns).

Array axis order. The volume's array is ``[col, row, slice]`` (``X, Y, Z``), as ITK and
nibabel/dcm2niix give it: the affine's columns are ``F_row * dc``, ``F_col * dr`` and the
slice normal ``F_row x F_col`` times the slice spacing. Slices are sorted by their
ImagePositionPatient projected on the normal (never by file name or InstanceNumber), so the
slice index grows along the normal; the slice spacing is measured from those positions
(SliceThickness is the thickness of the excitation, not the distance between slices).

World convention. DICOM (and ITK) points are LPS (+x patient Left, +y Posterior, +z Superior);
medjax affines are RAS. :func:`lps_to_ras_affine` is the one place that converts.

Values are float32 ``raw * RescaleSlope + RescaleIntercept`` (Hounsfield units for CT).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from nibabel import orientations

from medjax.data.nifti import CANONICAL, Volume, VolumeError

DICOM_EXTRA = 'pip install "medjax[dicom]"'
# [4, 4]: an LPS affine (or point) -> the same in RAS: x and y negated. Its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Direction cosines of the slices must agree to this (unit vectors, so about 0.006 degrees).
ORIENTATION_ATOL = 1e-4
MEDIA_DIRECTORY_SOP_CLASS = '1.2.840.10008.1.3.10'  # DICOMDIR: an index, not an image


def lps_to_ras_affine(affine_lps: np.ndarray) -> np.ndarray:
  """``[4, 4]`` voxel -> LPS mm affine -> the voxel -> RAS mm affine (and back)."""
  return LPS_TO_RAS @ np.asarray(affine_lps, np.float64)


def _pydicom():
  try:
    import pydicom
  except ImportError:
    raise ImportError(f'reading DICOM needs pydicom: {DICOM_EXTRA}') from None
  return pydicom


@dataclasses.dataclass
class _Slice:
  """One 2D image of a series: a single-frame file, or one frame of a multi-frame file."""
  path: str
  frame: Optional[int]  # None for a single-frame file
  position: np.ndarray  # [3] LPS mm of the centre of pixel (row 0, column 0)
  orientation: np.ndarray  # [6] F_row then F_col
  pixel_spacing: np.ndarray  # [2] (row spacing, column spacing) mm
  slope: float
  intercept: float
  thickness: Optional[float]


def _floats(value, count: int, name: str, where: str) -> np.ndarray:
  try:
    out = np.array([float(v) for v in value], np.float64)
  except (TypeError, ValueError):
    out = np.zeros(0)
  if out.shape != (count,) or not np.all(np.isfinite(out)):
    raise VolumeError(f'{where}: {name} must be {count} numbers, got {value!r}')
  return out


def _rescale(item, fallback=None):
  """(slope, intercept) from a dataset or functional group; identity when absent."""
  slope = item.get('RescaleSlope', None)
  intercept = item.get('RescaleIntercept', None)
  if slope is None and fallback is not None:
    return fallback
  return (float(slope) if slope is not None else 1.0,
          float(intercept) if intercept is not None else 0.0)


def _single_frame_slice(ds, path: str) -> _Slice:
  for name in ('ImagePositionPatient', 'ImageOrientationPatient', 'PixelSpacing'):
    if name not in ds:
      raise VolumeError(f'{path}: no {name}: the image has no patient geometry')
  thickness = ds.get('SliceThickness', None)
  slope, intercept = _rescale(ds)
  return _Slice(path, None, _floats(ds.ImagePositionPatient, 3, 'ImagePositionPatient', path),
                _floats(ds.ImageOrientationPatient, 6, 'ImageOrientationPatient', path),
                _floats(ds.PixelSpacing, 2, 'PixelSpacing', path), slope, intercept,
                float(thickness) if thickness not in (None, '') else None)


def _group_item(groups, sequence: str):
  """The first item of ``sequence`` in a functional groups item, or None."""
  items = groups.get(sequence, None) if groups is not None else None
  return items[0] if items else None


def _multi_frame_slices(ds, path: str) -> List[_Slice]:
  """Frames of an enhanced (multi-frame) image, from its functional groups: orientation,
  spacing and rescale shared or per frame, position per frame."""
  shared = ds.get('SharedFunctionalGroupsSequence', None)
  shared = shared[0] if shared else None
  per_frame = ds.get('PerFrameFunctionalGroupsSequence', None)
  frames = int(ds.NumberOfFrames)
  if per_frame is None or len(per_frame) != frames:
    raise VolumeError(f'{path}: multi-frame DICOM without one PerFrameFunctionalGroupsSequence '
                      f'item per frame ({frames} frames): not supported')

  def find(sequence: str, frame_groups):
    item = _group_item(frame_groups, sequence)
    return item if item is not None else _group_item(shared, sequence)

  slices = []
  for index, groups in enumerate(per_frame):
    where = f'{path} frame {index + 1}'
    position = find('PlanePositionSequence', groups)
    orientation = find('PlaneOrientationSequence', groups)
    measures = find('PixelMeasuresSequence', groups)
    if position is None or orientation is None or measures is None or \
        'PixelSpacing' not in measures:
      raise VolumeError(f'{where}: multi-frame DICOM without PlanePosition, PlaneOrientation '
                        f'and PixelMeasures (PixelSpacing) functional groups: not supported')
    transform = find('PixelValueTransformationSequence', groups)
    slope, intercept = _rescale(transform, fallback=_rescale(ds)) if transform is not None \
        else _rescale(ds)
    thickness = measures.get('SliceThickness', None)
    slices.append(_Slice(
        path, index, _floats(position.ImagePositionPatient, 3, 'ImagePositionPatient', where),
        _floats(orientation.ImageOrientationPatient, 6, 'ImageOrientationPatient', where),
        _floats(measures.PixelSpacing, 2, 'PixelSpacing', where), slope, intercept,
        float(thickness) if thickness not in (None, '') else None))
  return slices


def _read_headers(folder: str) -> Dict[str, List[Any]]:
  """Headers (no pixel data) of the DICOM image files in ``folder``, by SeriesInstanceUID."""
  pydicom = _pydicom()
  if not os.path.isdir(folder):
    raise VolumeError(f'{folder}: not a folder (a DICOM series is read from its folder)')
  series: Dict[str, List[Any]] = {}
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if name.startswith('.') or not os.path.isfile(path):
      continue
    try:
      ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (pydicom.errors.InvalidDicomError, EOFError, OSError, ValueError):
      continue  # not DICOM (a README, a thumbnail): ignored like any other stray file
    sop_class = str(ds.get('SOPClassUID', '') or ds.file_meta.get('MediaStorageSOPClassUID', ''))
    if sop_class == MEDIA_DIRECTORY_SOP_CLASS or 'Rows' not in ds:
      continue  # DICOMDIR, structured reports, presentation states: no image
    ds.filename = path
    series.setdefault(str(ds.get('SeriesInstanceUID', '')), []).append(ds)
  if not series:
    raise VolumeError(f'{folder}: no DICOM image files')
  return series


def _choose_series(series: Dict[str, List[Any]], series_uid: Optional[str], folder: str):
  if series_uid is not None:
    if series_uid not in series:
      raise VolumeError(f'{folder}: no series with SeriesInstanceUID {series_uid} '
                        f'(found {sorted(series)})')
    return series[series_uid]
  if len(series) > 1:
    found = '; '.join(f'{uid} ({len(files)} files, '
                      f'{files[0].get("SeriesDescription", "") or "no description"})'
                      for uid, files in sorted(series.items()))
    raise VolumeError(f'{folder}: {len(series)} series in one folder, pick one with '
                      f'series_uid: {found}')
  return next(iter(series.values()))


def _slices(headers: Sequence[Any], folder: str) -> List[_Slice]:
  multi = [ds for ds in headers if int(ds.get('NumberOfFrames', 1) or 1) > 1]
  if multi and len(headers) > 1:
    raise VolumeError(f'{folder}: a multi-frame DICOM file ({multi[0].filename}) together with '
                      f'{len(headers) - 1} other file(s) of its series: not supported')
  if multi:
    return _multi_frame_slices(multi[0], multi[0].filename)
  return [_single_frame_slice(ds, ds.filename) for ds in headers]


def _check_same(slices: Sequence[_Slice], headers: Sequence[Any], folder: str) -> None:
  first = slices[0]
  for s in slices[1:]:
    if not np.allclose(s.orientation, first.orientation, atol=ORIENTATION_ATOL):
      raise VolumeError(f'{folder}: slices with different ImageOrientationPatient '
                        f'({first.orientation.tolist()} in {first.path}, '
                        f'{s.orientation.tolist()} in {s.path})')
    if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-4):
      raise VolumeError(f'{folder}: slices with different PixelSpacing '
                        f'({first.pixel_spacing.tolist()} in {first.path}, '
                        f'{s.pixel_spacing.tolist()} in {s.path})')
  shapes = {(int(ds.Rows), int(ds.Columns)) for ds in headers}
  if len(shapes) > 1:
    raise VolumeError(f'{folder}: slices of different sizes (rows, columns) {sorted(shapes)}')
  samples = {int(ds.get('SamplesPerPixel', 1)) for ds in headers}
  if samples != {1}:
    raise VolumeError(f'{folder}: colour images (SamplesPerPixel {sorted(samples)}) are not '
                      f'a scalar volume')
  frames = {str(ds.get('FrameOfReferenceUID', '')) for ds in headers}
  if len(frames) > 1:
    raise VolumeError(f'{folder}: slices in {len(frames)} different frames of reference '
                      f'(FrameOfReferenceUID)')


def _direction_cosines(orientation: np.ndarray, where: str):
  """``F_row``, ``F_col`` and the slice normal ``F_row x F_col``, each ``[3]``."""
  row_dir, col_dir = orientation[:3], orientation[3:]
  if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3 or \
      abs(row_dir @ col_dir) > 1e-3:
    raise VolumeError(f'{where}: ImageOrientationPatient {orientation.tolist()} is not two '
                      f'orthogonal unit vectors')
  row_dir = row_dir / np.linalg.norm(row_dir)
  col_dir = col_dir / np.linalg.norm(col_dir)
  normal = np.cross(row_dir, col_dir)
  return row_dir, col_dir, normal / np.linalg.norm(normal)


def _slice_spacing(slices: Sequence[_Slice], normal: np.ndarray, folder: str,
                   spacing_tolerance: float) -> float:
  """Distance between consecutive (sorted) slices, measured from their positions.

  Refuses duplicates, missing slices (uneven spacing) and positions that do not lie on a
  line along the normal (gantry tilt).
  """
  if len(slices) == 1:
    # One slice: nothing to measure; its thickness is the best available extent.
    return slices[0].thickness or 1.0
  positions = np.stack([s.position for s in slices])
  along = (positions - positions[0]) @ normal
  gaps = np.diff(along)
  smallest = int(np.argmin(gaps))
  if gaps[smallest] < 1e-3:
    a, b = slices[smallest], slices[smallest + 1]
    raise VolumeError(f'{folder}: duplicate slices at position {a.position.tolist()} '
                      f'({_name(a)} and {_name(b)})')
  spacing = float(along[-1] / (len(slices) - 1))
  deviation = np.abs(along - spacing * np.arange(len(slices)))
  worst = int(np.argmax(deviation))
  if deviation[worst] > spacing_tolerance * spacing:
    raise VolumeError(f'{folder}: uneven slice spacing (missing or extra slices?): gaps from '
                      f'{gaps.min():.4g} to {gaps.max():.4g} mm, slice {_name(slices[worst])} '
                      f'is {deviation[worst]:.3g} mm off the regular grid')
  sideways = (positions - positions[0]) - along[:, None] * normal
  shift = np.linalg.norm(sideways, axis=1)
  if shift.max() > spacing_tolerance * spacing:
    angle = np.degrees(np.arctan2(shift[-1], along[-1]))
    raise VolumeError(f'{folder}: gantry tilt: slice positions move {shift.max():.3g} mm '
                      f'sideways of the slice normal (about {angle:.2f} degrees); resample '
                      f'the series to an orthogonal grid first')
  return spacing


def _name(s: _Slice) -> str:
  name = os.path.basename(s.path)
  return name if s.frame is None else f'{name} frame {s.frame + 1}'


def _pixels(headers: Sequence[Any], slices: Sequence[_Slice], folder: str) -> np.ndarray:
  """``[col, row, slice]`` float32 rescaled values of the sorted ``slices``."""
  pydicom = _pydicom()
  cache: Dict[str, np.ndarray] = {}
  planes = []
  for s in slices:
    if s.path not in cache:
      ds = pydicom.dcmread(s.path)
      try:
        cache[s.path] = ds.pixel_array
      except Exception as e:  # pydicom raises several types for a missing decoder
        syntax = ds.file_meta.get('TransferSyntaxUID', None)
        syntax = f'{syntax.name} ({syntax})' if syntax is not None else 'unknown'
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VolumeError(f'{folder}: cannot decode the pixel data of {os.path.basename(s.path)}'
                          f', transfer syntax {syntax}: {message}') from None
    data = cache[s.path] if s.frame is None else cache[s.path][s.frame]
    # pixel_array is [row, col]; the volume's axes are [col, row, slice].
    planes.append(data.T.astype(np.float32) * np.float32(s.slope) + np.float32(s.intercept))
  return np.stack(planes, axis=-1)


def read_series(folder: str, series_uid: Optional[str] = None,
                spacing_tolerance: float = 0.01) -> Volume:
  """Reads the DICOM series in ``folder`` as one volume.

  Args:
    folder: a folder holding the files of one series (other files are ignored).
    series_uid: the SeriesInstanceUID to read when the folder holds several series.
    spacing_tolerance: how far (fraction of the slice spacing) a slice may lie off the
      regular grid along the normal, or sideways of it, before it is refused.
  Returns:
    A :class:`Volume`: ``array`` ``[col, row, slice]`` float32 rescaled values, ``affine``
    ``[4, 4]`` voxel -> RAS mm, ``path`` the folder, no NIfTI header.
  Raises:
    VolumeError: one line naming the folder and the problem: no DICOM images, several series,
      inconsistent slices, duplicate or missing slices, gantry tilt, undecodable pixel data.
    ImportError: pydicom is not installed (names the extra to install).
  """
  folder = os.fspath(folder)
  headers = _choose_series(_read_headers(folder), series_uid, folder)
  slices = _slices(headers, folder)
  _check_same(slices, headers, folder)
  row_dir, col_dir, normal = _direction_cosines(slices[0].orientation, slices[0].path)
  slices = sorted(slices, key=lambda s: float(s.position @ normal))
  slice_spacing = _slice_spacing(slices, normal, folder, spacing_tolerance)
  row_spacing, col_spacing = slices[0].pixel_spacing
  affine_lps = np.eye(4)
  affine_lps[:3, 0] = row_dir * col_spacing  # along a row: the column index grows
  affine_lps[:3, 1] = col_dir * row_spacing  # down a column: the row index grows
  affine_lps[:3, 2] = normal * slice_spacing
  affine_lps[:3, 3] = slices[0].position
  affine = lps_to_ras_affine(affine_lps)
  array = _pixels(headers, slices, folder)
  bad = ~np.isfinite(array)
  if bad.any():
    raise VolumeError(f'{folder}: {int(bad.sum())} NaN or infinite voxels after rescaling')
  return Volume(array=array, affine=affine, path=folder, original_affine=affine.copy(),
                original_shape=tuple(int(n) for n in array.shape),
                to_current=orientations.axcodes2ornt(CANONICAL), header=None)
