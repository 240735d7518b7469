"""NIfTI volumes: validated reading, canonical (RAS) orientation, resampling to a spacing.

Axis conventions. Arrays keep nibabel's voxel axis order ``(i, j, k)``; affines map voxel
indices to RAS+ world coordinates in millimetres (+x Right, +y Anterior, +z Superior).
Axis codes (``nibabel.aff2axcodes``) name the direction in which each array axis
*increases*. After :func:`to_canonical` they are ``('R', 'A', 'S')``: axis 0 runs towards the
patient's right, axis 1 anterior, axis 2 superior. Spacing is always in mm, per array axis.

Every transform keeps the information needed to undo it, so a prediction made on the
canonical, resampled grid can be written back onto the file's own grid exactly
(:func:`from_canonical`, :func:`resample_to_shape`).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from typing import Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
from nibabel import orientations

CANONICAL = ('R', 'A', 'S')


class VolumeError(ValueError):
  """A volume that cannot be used; the message names the file and the problem."""


@dataclasses.dataclass
class Volume:
  """A 3D volume on its voxel grid.

  Attributes:
    array: ``[X, Y, Z]`` voxel data (axis order as in the file until reoriented).
    affine: ``[4, 4]`` voxel index -> world (RAS+, mm) of ``array``.
    path: file it came from.
    original_affine: affine of the file on disk.
    original_shape: spatial shape of the file on disk.
    to_current: nibabel orientation transform from the file's axes to ``array``'s axes
      (identity until :func:`to_canonical`).
    header: a copy of the file's NIfTI header (units, description, qform/sform codes),
      reused when writing results for this file.
  """
  array: np.ndarray
  affine: np.ndarray
  path: str
  original_affine: np.ndarray
  original_shape: Tuple[int, int, int]
  to_current: np.ndarray
  header: Optional[nib.Nifti1Header] = None

  @property
  def spacing(self) -> Tuple[float, ...]:
    """Voxel size in mm along each array axis."""
    return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

  @property
  def axcodes(self) -> Tuple[str, ...]:
    return tuple(nib.aff2axcodes(self.affine))


def _load(path: str) -> nib.Nifti1Image:
  if not os.path.isfile(path):
    raise VolumeError(f'{path}: file not found')
  try:
    image = nib.load(path)
  except nib.filebasedimages.ImageFileError as e:
    raise VolumeError(f'{path}: {_diagnose_unreadable(path)} ({e})') from None
  except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as e:
    raise VolumeError(f'{path}: corrupt or truncated NIfTI header ({type(e).__name__}: {e})') \
        from None
  if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
    raise VolumeError(f'{path}: not a NIfTI file (nibabel read it as {type(image).__name__})')
  return image


def _diagnose_unreadable(path: str) -> str:
  """Tells a truncated or corrupt file from one that is simply not NIfTI."""
  try:
    if path.endswith('.gz'):
      with gzip.open(path, 'rb') as f:
        header = f.read(348)
        while f.read(1 << 20):
          pass
    else:
      with open(path, 'rb') as f:
        header = f.read(348)
  except (EOFError, OSError, zlib.error) as e:
    return f'corrupt or truncated file ({type(e).__name__}: {e})'
  if len(header) < 348:
    return f'corrupt or truncated NIfTI header ({len(header)} of 348 bytes)'
  return 'not a NIfTI file'


# Deflate cannot compress better than 1032:1, so a .nii.gz of n bytes holds at most
# 1032 n bytes of data: a header claiming more is corrupt, refused before any allocation.
MAX_DEFLATE_RATIO = 1032


def _check_claimed_size(image: nib.Nifti1Image, path: str) -> None:
  """Refuses a header whose claimed data cannot be in the file (a 100-byte file claiming
  a 768 MiB volume), before nibabel allocates the claimed array."""
  header = image.header
  shape = header.get_data_shape()
  claimed = int(np.prod(shape, dtype=np.float64)) * header.get_data_dtype().itemsize
  offset = int(header['vox_offset'])
  size = os.path.getsize(path)
  if path.lower().endswith('.gz'):
    if claimed + offset > size * MAX_DEFLATE_RATIO:
      raise VolumeError(f'{path}: corrupt or truncated NIfTI: the header claims shape {shape} '
                        f'({claimed:,} bytes), more than a {size:,}-byte gzip file can hold')
  elif claimed + offset > size:
    raise VolumeError(f'{path}: corrupt or truncated NIfTI: the header claims shape {shape} '
                      f'({claimed:,} bytes of data from byte {offset}), but the file has '
                      f'{size:,} bytes')


def _data(image: nib.Nifti1Image, path: str) -> np.ndarray:
  _check_claimed_size(image, path)
  try:
    return np.asanyarray(image.dataobj)
  except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as e:
    raise VolumeError(f'{path}: corrupt or truncated NIfTI data ({type(e).__name__}: {e})') \
        from None


def map_label_values(labels: np.ndarray, values: Sequence[int], path: str) -> np.ndarray:
  """Stored label values -> class indices: ``values[k]`` becomes class ``k``.

  E.g. ``(255, 0)`` makes stored 255 class 0 and stored 0 class 1; ``(0, 1, 2, 4)`` maps
  BraTS's label 4 to class 3. A stored value not listed is an error naming the file.
  """
  values = np.asarray(values)
  present = np.unique(labels)
  unknown = np.setdiff1d(present, values)
  if unknown.size:
    raise VolumeError(f'{path}: label values {unknown[:5].tolist()} are not in data.label_values '
                      f'{values.tolist()}')
  lookup = {int(v): k for k, v in enumerate(values)}
  out = np.zeros(labels.shape, np.int32)
  for v in present:
    out[labels == v] = lookup[int(v)]
  return out


def read_volume(path: str, kind: str = 'image', num_classes: Optional[int] = None,
                label_values: Sequence[int] = ()) -> Volume:
  """Reads and validates a 3D NIfTI volume.

  Args:
    path: ``.nii`` or ``.nii.gz`` file.
    kind: 'image' (float32, must be finite) or 'label' (integral values, returned as int32).
    num_classes: for labels, values must lie in ``[0, num_classes)``.
    label_values: for labels, the stored value of each class (:func:`map_label_values`).
  Raises:
    VolumeError: missing, not NIfTI, corrupt or truncated, not 3D, NaN/inf voxels,
      non-integer labels or labels outside the declared classes; the message names the file.
  """
  if kind not in ('image', 'label'):
    raise ValueError(f"kind must be 'image' or 'label', got {kind!r}")
  image = _load(path)
  data = _data(image, path)
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise VolumeError(f'{path}: expected a 3D volume, got shape {data.shape} '
                      f'({data.ndim}D)')
  affine = image.affine.astype(np.float64)
  if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise VolumeError(f'{path}: invalid affine (singular or non-finite):\n{affine}')
  if kind == 'image':
    data = np.asarray(data, dtype=np.float32)
    bad = ~np.isfinite(data)
    if bad.any():
      raise VolumeError(f'{path}: {int(bad.sum())} NaN or infinite voxels')
  else:
    values = np.asarray(data)
    if not np.issubdtype(values.dtype, np.integer):
      if not np.all(np.isfinite(values)):
        raise VolumeError(f'{path}: label map contains NaN or infinite values')
      rounded = np.round(values)
      if not np.array_equal(rounded, values):
        example = values[rounded != values].flat[0]
        raise VolumeError(f'{path}: label map has non-integer values (e.g. {example})')
      values = rounded
    data = values.astype(np.int32)
    if len(label_values):
      data = map_label_values(data, label_values, path)
    if num_classes is not None:
      bad = (data < 0) | (data >= num_classes)
      if bad.any():
        found = np.unique(data[bad])[:5].tolist()
        raise VolumeError(f'{path}: labels {found} outside the declared classes '
                          f'0..{num_classes - 1}')
  return Volume(array=data, affine=affine, path=path, original_affine=affine.copy(),
                original_shape=tuple(int(s) for s in data.shape),
                to_current=orientations.axcodes2ornt(CANONICAL),  # identity transform
                header=image.header.copy())


def check_pair(image: Volume, label: Volume, atol_mm: float = 1e-3) -> None:
  """Image and label must share the voxel grid: same shape and the same affine."""
  if image.array.shape != label.array.shape:
    raise VolumeError(f'{label.path}: label shape {label.array.shape} differs from image '
                      f'{image.path} shape {image.array.shape}')
  if not np.allclose(image.affine, label.affine, atol=atol_mm):
    raise VolumeError(f'{label.path}: label affine differs from image {image.path} affine\n'
                      f'label:\n{label.affine}\nimage:\n{image.affine}')


def _identity_ornt() -> np.ndarray:
  return np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64)


def to_canonical(volume: Volume) -> Volume:
  """Reorients to RAS axis codes by flips and axis permutations only (no interpolation)."""
  current = orientations.io_orientation(volume.affine)
  transform = orientations.ornt_transform(current, orientations.axcodes2ornt(CANONICAL))
  array = orientations.apply_orientation(volume.array, transform)
  affine = volume.affine @ orientations.inv_ornt_aff(transform, volume.array.shape)
  return dataclasses.replace(volume, array=np.ascontiguousarray(array), affine=affine,
                             to_current=transform)


def from_canonical(array: np.ndarray, volume: Volume) -> np.ndarray:
  """Maps an array on ``volume``'s reoriented grid back to the file's own axes."""
  inverse = orientations.ornt_transform(_identity_ornt(), volume.to_current)
  return orientations.apply_orientation(array, inverse)


def resampled_geometry(shape: Sequence[int], affine: np.ndarray,
                       target_spacing: Sequence[float]) -> Tuple[Tuple[int, ...], np.ndarray]:
  """Shape and affine of the grid covering the same field of view at ``target_spacing``.

  The field of view (outer voxel corners) is kept; the new spacing is adjusted so a whole
  number of voxels fits, and may differ from ``target_spacing`` by a fraction of a voxel.
  """
  shape = np.asarray(shape, np.float64)
  spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
  new_shape = np.maximum(np.round(shape * spacing / np.asarray(target_spacing)), 1)
  scale = shape / new_shape  # new voxel size in old voxels, per axis
  new_affine = affine.copy()
  new_affine[:3, :3] = affine[:3, :3] * scale
  # Centre of new voxel 0 sits half a new voxel inside the old outer corner.
  new_affine[:3, 3] = affine[:3, :3] @ (0.5 * scale - 0.5) + affine[:3, 3]
  return tuple(int(s) for s in new_shape), new_affine


def resample_to_shape(array: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
  """Resamples ``array`` onto ``shape`` over the same field of view.

  ``order`` 1 is (tri)linear, for images; 0 is nearest neighbour, for label maps.
  Voxel centres map as ``old = (new + 0.5) * old_size / new_size - 0.5``.
  """
  from scipy import ndimage
  if tuple(array.shape) == tuple(shape):
    return array.copy()
  coords = [(np.arange(n) + 0.5) * (o / n) - 0.5 for o, n in zip(array.shape, shape)]
  grid = np.meshgrid(*coords, indexing='ij')
  out = ndimage.map_coordinates(array.astype(np.float32 if order else array.dtype), grid,
                                order=order, mode='nearest')
  return out.astype(array.dtype) if order == 0 else out


def resample(volume: Volume, target_spacing: Sequence[float], order: int) -> Volume:
  """The volume at ``target_spacing`` (mm): linear for images (1), nearest for labels (0)."""
  shape, affine = resampled_geometry(volume.array.shape, volume.affine, target_spacing)
  return dataclasses.replace(volume, array=resample_to_shape(volume.array, shape, order),
                             affine=affine)


def save_like(array: np.ndarray, reference: Volume, path: str,
              dtype: np.dtype = np.uint8) -> None:
  """Writes ``array`` (on the reference file's own grid) with the reference's affine."""
  if tuple(array.shape[:3]) != tuple(reference.original_shape):
    raise ValueError(f'array shape {array.shape} does not match {reference.path} '
                     f'shape {reference.original_shape}')
  affine = reference.original_affine
  header = None
  if isinstance(reference.header, nib.Nifti1Header):
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)  # labels are stored as they are, never rescaled
  image = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine, header=header)
  qform_code = int(reference.header['qform_code']) if header is not None else 0
  sform_code = int(reference.header['sform_code']) if header is not None else 0
  image.set_qform(affine, code=qform_code or 1)
  image.set_sform(affine, code=sform_code or 1)
  nib.save(image, path)
