"""Sliding-window inference over whole images and volumes.

Windows of ``roi_size`` tile the input with the given ``overlap``; their outputs are blended
with a Gaussian (centre-weighted, as nnU-Net) or constant weight map. Windows are predicted
``batch_size`` at a time, and the accumulators live in host memory, so device memory is
bounded by one batch of windows whatever the volume size. Optional mirroring test-time
augmentation averages the predictions of every combination of flips of ``mirror_axes``.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import numpy as np

from medjax import config as config_lib

PredictFn = Callable[[np.ndarray], np.ndarray]


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
  """Start indices covering ``[0, size)`` with windows of ``roi`` (nnU-Net's spacing)."""
  if roi >= size:
    return [0]
  step = max(1, int(roi * (1.0 - overlap)))
  count = math.ceil((size - roi) / step) + 1
  return [int(round(x)) for x in np.linspace(0, size - roi, count)]


def blend_weights(roi_size: Sequence[int], mode: str = 'gaussian',
                  sigma_scale: float = 0.125) -> np.ndarray:
  """``[*roi]`` weights: Gaussian with sigma = ``sigma_scale * roi`` per axis, or ones."""
  if mode == 'constant':
    return np.ones(roi_size, np.float32)
  if mode != 'gaussian':
    raise ValueError(f"unknown blend mode '{mode}'; expected 'gaussian' or 'constant'")
  axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (sigma_scale * n)) ** 2)
          for n in roi_size]
  weights = axes[0]
  for a in axes[1:]:
    weights = np.multiply.outer(weights, a)
  weights = weights / weights.max()
  return np.maximum(weights, 1e-3).astype(np.float32)  # no zero weight at window edges


def sliding_window(predict: PredictFn, image: np.ndarray, roi_size: Sequence[int], *,
                   overlap: float = 0.5, blend: str = 'gaussian', batch_size: int = 4,
                   mirror_axes: Sequence[int] = ()) -> np.ndarray:
  """Predicts a whole image by blended windows.

  Args:
    predict: maps windows ``[N, *roi, C]`` to outputs ``[N, *roi, K]`` (e.g. softmax
      probabilities of a jit-compiled model).
    image: ``[*spatial, C]``.
    roi_size: window size; an image smaller than it is zero-padded and cropped back.
    overlap: fraction of a window shared with its neighbour, in [0, 1).
    mirror_axes: spatial axes to mirror for test-time augmentation (all 2^n combinations).
  Returns:
    ``[*spatial, K]`` float32.
  """
  return sliding_window_stack(predict, image[None], roi_size, overlap=overlap, blend=blend,
                              batch_size=batch_size, mirror_axes=mirror_axes)[0]


def sliding_window_stack(predict: PredictFn, images: np.ndarray, roi_size: Sequence[int], *,
                         overlap: float = 0.5, blend: str = 'gaussian', batch_size: int = 4,
                         mirror_axes: Sequence[int] = ()) -> np.ndarray:
  """:func:`sliding_window` of a stack of same-size images ``[M, *spatial, C]`` (e.g. the
  slices of a volume); windows of all images share batches. Returns ``[M, *spatial, K]``."""
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f'overlap must be in [0, 1), got {overlap}')
  spatial = images.shape[1:-1]
  roi = tuple(int(r) for r in roi_size)
  if len(roi) != len(spatial):
    raise ValueError(f'roi_size {roi} does not match image spatial shape {spatial}')
  pads = [(0, 0)] + [(0, max(0, r - s)) for s, r in zip(spatial, roi)] + [(0, 0)]
  padded = np.pad(images, pads) if any(p[1] for p in pads) else images
  full = padded.shape[1:-1]
  weights = blend_weights(roi, blend)[..., None]
  starts = list(itertools.product(*[window_starts(s, r, overlap) for s, r in zip(full, roi)]))
  windows_at = [(m, st) for m in range(len(images)) for st in starts]
  flips = [combo for n in range(len(mirror_axes) + 1)
           for combo in itertools.combinations(mirror_axes, n)]
  output = None
  total_weight = np.zeros((len(images),) + full + (1,), np.float32)
  for i in range(0, len(windows_at), batch_size):
    chunk = windows_at[i:i + batch_size]
    windows = np.stack([padded[(m,) + tuple(slice(s, s + r) for s, r in zip(st, roi))]
                        for m, st in chunk])
    prediction = None
    for axes in flips:
      batch_axes = tuple(a + 1 for a in axes)
      flipped = np.flip(windows, batch_axes) if axes else windows
      out = np.array(predict(flipped), np.float32)  # a writable copy (JAX arrays are not)
      out = np.flip(out, batch_axes) if axes else out
      prediction = out if prediction is None else prediction + out
    prediction /= len(flips)
    if output is None:
      output = np.zeros((len(images),) + full + (prediction.shape[-1],), np.float32)
    for (m, st), pred in zip(chunk, prediction):
      region = (m,) + tuple(slice(s, s + r) for s, r in zip(st, roi))
      output[region] += pred * weights
      total_weight[region] += weights
  output /= total_weight
  return output[(slice(None),) + tuple(slice(0, s) for s in spatial)]


@config_lib.declare
def _defaults(c) -> None:
  # Sliding-window inference (segmentation validation and prediction).
  i = config_lib.section(c, 'inference')
  i.overlap = 0.5
  i.blend = 'gaussian'           # 'gaussian' | 'constant'
  i.mirror_axes = ()             # spatial axes for mirroring test-time augmentation


def fixed_batches(predict: Callable[[np.ndarray], np.ndarray], batch_size: int
                  ) -> Callable[[np.ndarray], np.ndarray]:
  """``predict`` of a compiled model on up to ``batch_size`` windows ``[n, ...]``, each call
  zero-padded to ``batch_size`` rows: one static shape, one compilation."""
  def padded(windows: np.ndarray) -> np.ndarray:
    n = len(windows)
    rows = np.zeros((batch_size,) + windows.shape[1:], np.float32)
    rows[:n] = windows
    return np.asarray(predict(rows))[:n]
  return padded


def mean_predictor(predictors: Sequence[Callable[[np.ndarray], np.ndarray]]
                   ) -> Callable[[np.ndarray], np.ndarray]:
  """The mean of several predictors' outputs for the same input (an ensemble)."""
  def mean(image: np.ndarray) -> np.ndarray:
    total = None
    for predict in predictors:
      probs = predict(image)
      total = probs if total is None else total + probs
    return total / len(predictors)
  return mean
