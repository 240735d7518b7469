"""Boxes through every geometric step a sample goes through (host-side NumPy).

Each function moves boxes exactly as the matching array operation moves a mask, so that the
boxes of the transformed mask (:func:`medjax.detection.sources.boxes_from_label_map`) are the
transformed boxes: exactly for flips, quarter turns, transposes and crops; to within a voxel
for resampling; and, for rotations, as a bound (the box of a rotated box).

Box convention (all of medjax.detection): ``[..., 2 nd]`` = ``(lo_0.., hi_0..)`` along the
array's axes, voxel index ``i`` spanning ``[i, i + 1)``; index coordinates (voxel centres,
what interpolation and affines use) are edge coordinates minus 0.5.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, Sequence, Tuple

import numpy as np

from medjax.data import seg_augment


def _split(boxes: np.ndarray) -> Tuple[np.ndarray, np.ndarray, int]:
  boxes = np.asarray(boxes)
  if boxes.shape[-1] % 2:
    raise ValueError(f'boxes must be [..., 2 nd], got shape {boxes.shape}')
  nd = boxes.shape[-1] // 2
  return boxes[..., :nd], boxes[..., nd:], nd


def _join(lo: np.ndarray, hi: np.ndarray, like: np.ndarray) -> np.ndarray:
  dtype = like.dtype if np.issubdtype(like.dtype, np.floating) else np.float32
  return np.concatenate([lo, hi], axis=-1).astype(dtype)


def flip_boxes(boxes: np.ndarray, axis: int, size: int) -> np.ndarray:
  """Boxes after ``np.flip(array, axis)`` of an array ``size`` voxels long on ``axis``."""
  lo, hi, nd = _split(boxes)
  lo, hi = lo.copy(), hi.copy()
  axis = axis % nd
  lo[..., axis], hi[..., axis] = size - hi[..., axis], size - lo[..., axis]
  return _join(lo, hi, np.asarray(boxes))


def transpose_boxes(boxes: np.ndarray, axes: Sequence[int]) -> np.ndarray:
  """Boxes after ``np.transpose(array, axes)`` (spatial axes only): new axis i is old
  axis ``axes[i]``."""
  lo, hi, nd = _split(boxes)
  axes = [a % nd for a in axes]
  if sorted(axes) != list(range(nd)):
    raise ValueError(f'axes {axes} are not a permutation of the {nd} box axes')
  return _join(lo[..., axes], hi[..., axes], np.asarray(boxes))


def rot90_boxes(boxes: np.ndarray, k: int, axes: Sequence[int], shape: Sequence[int]
                ) -> np.ndarray:
  """Boxes after ``np.rot90(array, k, axes)`` of an array of spatial ``shape`` (before the
  turn); composed of flips and a transpose exactly as NumPy composes it."""
  nd = len(shape)
  a, b = (x % nd for x in axes)
  if a == b:
    raise ValueError(f'rot90 axes must differ, got {tuple(axes)}')
  k %= 4
  swap = list(range(nd))
  swap[a], swap[b] = b, a
  if k == 0:
    return np.asarray(boxes).copy()
  if k == 2:
    return flip_boxes(flip_boxes(boxes, a, shape[a]), b, shape[b])
  if k == 1:
    return transpose_boxes(flip_boxes(boxes, b, shape[b]), swap)
  return flip_boxes(transpose_boxes(boxes, swap), b, shape[a])


def crop_boxes(boxes: np.ndarray, lo: Sequence[int], patch_shape: Sequence[int],
               min_visible: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
  """Boxes in the patch ``array[lo : lo + patch_shape]`` (``lo`` may be negative: a padded
  patch): shifted, clipped to the patch, and kept if some of each box is inside and its
  visible fraction of the box's volume is at least ``min_visible``.

  Returns (kept boxes ``[M, 2 nd]``, kept ``[N]`` bool: select classes with it).
  """
  box_lo, box_hi, nd = _split(boxes)
  start = np.asarray(lo, np.float64)
  size = np.asarray(patch_shape, np.float64)
  new_lo = np.clip(box_lo - start, 0, size)
  new_hi = np.clip(box_hi - start, 0, size)
  visible = np.prod(new_hi - new_lo, axis=-1)
  volume = np.prod(box_hi - box_lo, axis=-1)
  kept = (visible > 0) & (visible >= min_visible * volume)
  return _join(new_lo, new_hi, np.asarray(boxes))[kept], kept


def zoom_boxes(boxes: np.ndarray, old_shape: Sequence[int], new_shape: Sequence[int]
               ) -> np.ndarray:
  """Boxes after resampling an array from ``old_shape`` to ``new_shape`` over the same
  field of view (:func:`medjax.data.nifti.resample_to_shape`: voxel centres map as
  ``old = (new + 0.5) old_size / new_size - 0.5``, so the edges scale by new/old)."""
  lo, hi, _ = _split(boxes)
  scale = np.asarray(new_shape, np.float64) / np.asarray(old_shape, np.float64)
  return _join(lo * scale, hi * scale, np.asarray(boxes))


def _corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
  """``[..., 2^nd, nd]``: every corner of each box."""
  nd = lo.shape[-1]
  picks = np.array(list(itertools.product((0, 1), repeat=nd)), bool)  # [2^nd, nd]
  return np.where(picks, hi[..., None, :], lo[..., None, :])


def affine_boxes(boxes: np.ndarray, matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
  """Boxes after resampling with the pull-back map ``input = matrix @ output + offset`` (in
  index coordinates: scipy.ndimage.affine_transform's and seg_augment's convention, where an
  output voxel reads the input at that point). The result is the box of the 2^nd mapped
  corners: exact for flips and quarter turns, a bound for rotations. Nearest-neighbour
  sampling marks an output voxel when its centre maps into the input box, so every voxel of
  the transformed mask has its centre inside the returned box.
  """
  lo, hi, nd = _split(boxes)
  matrix = np.asarray(matrix, np.float64).reshape(nd, nd)
  offset = np.asarray(offset, np.float64).reshape(nd)
  corners = _corners(lo - 0.5, hi - 0.5)  # index coordinates
  mapped = (corners - offset) @ np.linalg.inv(matrix).T
  return _join(mapped.min(axis=-2) + 0.5, mapped.max(axis=-2) + 0.5, np.asarray(boxes))


def augment_affine(centre: np.ndarray, p: Dict[str, Any], augment: seg_augment.SegAugment,
                   patch_size: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
  """(matrix ``[nd, nd]``, offset ``[nd]``) for :func:`affine_boxes` of the patch that
  :func:`medjax.data.seg_augment.apply` cuts with parameters ``p`` around ``centre``.

  Read off :func:`medjax.data.seg_augment.sampling_coords` itself (probed on a 2^nd patch,
  its matrix does not depend on the patch size), so boxes follow whatever it does. Elastic
  deformation is not affine and is refused.
  """
  if p.get('elastic'):
    raise ValueError('elastic deformation is not affine: boxes cannot follow it exactly; '
                     'turn p_elastic off for detection')
  nd = len(patch_size)
  probe = (2,) * nd
  coords = seg_augment.sampling_coords(np.zeros(nd), p, augment, probe)
  matrix = coords @ np.linalg.pinv(seg_augment.patch_offsets(probe))
  half = (np.asarray(patch_size, np.float64) - 1) / 2.0
  return matrix, np.asarray(centre, np.float64) - matrix @ half
