"""Intensity normalisation and spatial cropping/padding for volumes and images (NumPy).

All functions take arrays of any rank; masks select the voxels statistics are computed on.
Crop and pad return what is needed to undo them, so predictions map back onto the input grid.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np


def zscore(x: np.ndarray, mask: Optional[np.ndarray] = None, nonzero: bool = False,
           eps: float = 1e-8) -> np.ndarray:
  """``(x - mean) / std`` with statistics over ``mask`` (or the nonzero voxels, or all).

  Voxels outside the mask are normalised with the same statistics (nnU-Net's MRI scheme
  keeps them; use ``nonzero=True`` for skull-stripped MRI with a zero background).
  """
  x = np.asarray(x, np.float32)
  if nonzero:
    mask = x != 0
  values = x[mask] if mask is not None else x
  if values.size == 0:
    raise ValueError('z-score: the mask selects no voxels')
  mean, std = float(values.mean()), float(values.std())
  return ((x - mean) / max(std, eps)).astype(np.float32)


def window(x: np.ndarray, a_min: float, a_max: float, b_min: float = 0.0, b_max: float = 1.0,
           clip: bool = True) -> np.ndarray:
  """Maps ``[a_min, a_max]`` linearly to ``[b_min, b_max]`` (CT windowing, e.g. HU -> [0, 1]).

  With ``clip``, values outside the window are clipped to its ends.
  """
  if a_max <= a_min:
    raise ValueError(f'window needs a_max > a_min, got {a_min}, {a_max}')
  y = (np.asarray(x, np.float32) - a_min) / (a_max - a_min)
  if clip:
    y = np.clip(y, 0.0, 1.0)
  return (y * (b_max - b_min) + b_min).astype(np.float32)


def percentile_clip(x: np.ndarray, lower: float = 0.5, upper: float = 99.5,
                    mask: Optional[np.ndarray] = None) -> np.ndarray:
  """Clips to the ``lower``/``upper`` percentiles (of the masked voxels)."""
  x = np.asarray(x, np.float32)
  values = x[mask] if mask is not None else x
  if values.size == 0:
    raise ValueError('percentile_clip: the mask selects no voxels')
  lo, hi = np.percentile(values, [lower, upper])
  return np.clip(x, lo, hi)


def foreground_bbox(mask: np.ndarray, margin: int = 0) -> Tuple[slice, ...]:
  """Slices of the smallest box holding every nonzero voxel of ``mask``, grown by ``margin``
  voxels on each side (clipped to the array)."""
  nonzero = np.argwhere(mask)
  if nonzero.size == 0:
    return tuple(slice(0, n) for n in mask.shape)
  lo = np.maximum(nonzero.min(axis=0) - margin, 0)
  hi = np.minimum(nonzero.max(axis=0) + 1 + margin, mask.shape)
  return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def pad_to_multiple(x: np.ndarray, multiple: int | Sequence[int], axes: Sequence[int],
                    mode: str = 'constant', value: float = 0.0):
  """Pads ``axes`` symmetrically so each size is divisible by ``multiple`` (the network's
  total stride). Returns (padded array, pads) with ``pads[i] = (before, after)`` per axis,
  for :func:`unpad`."""
  multiples = [multiple] * len(axes) if isinstance(multiple, int) else list(multiple)
  pad_width = [(0, 0)] * x.ndim
  for axis, m in zip(axes, multiples):
    total = (-x.shape[axis]) % m
    pad_width[axis] = (total // 2, total - total // 2)
  kwargs = {'constant_values': value} if mode == 'constant' else {}
  return np.pad(x, pad_width, mode=mode, **kwargs), tuple(pad_width)


def unpad(x: np.ndarray, pads: Sequence[Tuple[int, int]]) -> np.ndarray:
  return x[tuple(slice(before, x.shape[i] - after) for i, (before, after) in enumerate(pads))]
