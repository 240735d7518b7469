"""N-D axis-aligned box operations in JAX (2D and 3D alike; nd comes from the last axis).

Box convention: a box is a float32 array ``[..., 2*nd]`` =
``(lo_0, ..., lo_{nd-1}, hi_0, ..., hi_{nd-1})`` in continuous voxel coordinates along the
array's axes (axis 0 first): voxel index i spans [i, i+1), so a mask occupying indices a..b
(inclusive) along an axis has lo = a, hi = b + 1. Size = hi - lo; a box with hi <= lo along
any axis is empty (volume 0). Padded box sets for jit are ``boxes [M, 2nd]``, ``classes [M]``
int32, ``valid [M]`` bool.

IoU and GIoU are safe for empty boxes: an empty box has IoU 0 with every box (itself
included), never NaN, and their gradients stay finite. NMS and weighted box clustering run
inside jit with a fixed output size: ``max_output`` picks, each comparing one box against all
N (memory O(N), time O(N * max_output)), ties going to the lower index.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

# torchvision's clamp of decoded log size ratios: a size at most 1000/16 times the anchor's.
MAX_LOG_SIZE_RATIO = float(np.log(1000.0 / 16))
# Floor for sizes in encode (zero-size rows of a padded set give finite deltas).
MIN_ENCODED_SIZE = 1e-6

Weights = Union[None, float, Sequence[float]]


def as_boxes(boxes) -> jax.Array:
  """``boxes`` as float32 ``[..., 2*nd]``; a ValueError when the last axis is not even."""
  boxes = jnp.asarray(boxes, jnp.float32)
  if boxes.ndim == 0 or boxes.shape[-1] == 0 or boxes.shape[-1] % 2:
    raise ValueError(f'boxes need a last axis of 2*nd values (lo..., hi...), got shape '
                     f'{boxes.shape}')
  return boxes


def split(boxes) -> tuple:
  """``(lo [..., nd], hi [..., nd])`` of boxes ``[..., 2*nd]``."""
  boxes = as_boxes(boxes)
  nd = boxes.shape[-1] // 2
  return boxes[..., :nd], boxes[..., nd:]


def box_size(boxes) -> jax.Array:
  """Size ``hi - lo`` per axis, ``[..., nd]`` (negative for an inverted box)."""
  lo, hi = split(boxes)
  return hi - lo


def box_volume(boxes) -> jax.Array:
  """Area (2D) / volume (3D) in voxels, ``[...]``; 0 for an empty or inverted box."""
  return jnp.prod(jnp.maximum(box_size(boxes), 0.0), axis=-1)


def box_centre(boxes) -> jax.Array:
  """Centre ``(lo + hi) / 2`` in the [lo, hi) frame, ``[..., nd]``. In voxel index
  coordinates (the ones an affine maps) the centre is this minus 0.5."""
  lo, hi = split(boxes)
  return (lo + hi) / 2


def clip_boxes(boxes, shape: Sequence[int]) -> jax.Array:
  """Boxes ``[..., 2*nd]`` clipped to an array of spatial ``shape`` (nd sizes): every
  coordinate into [0, shape[d]]."""
  lo, hi = split(boxes)
  if len(shape) != lo.shape[-1]:
    raise ValueError(f'clip_boxes: shape {tuple(shape)} has {len(shape)} axes, the boxes '
                     f'have {lo.shape[-1]}')
  limit = jnp.asarray(shape, jnp.float32)
  return jnp.concatenate([jnp.clip(lo, 0.0, limit), jnp.clip(hi, 0.0, limit)], axis=-1)


# ----- overlap -------------------------------------------------------------------------


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` where ``den > 0``, else 0; no NaN in the value or the gradient (the
  division never sees a zero denominator, even in the branch ``where`` discards)."""
  positive = den > 0
  return jnp.where(positive, num / jnp.where(positive, den, 1.0), 0.0)


def overlap_terms(a, b) -> tuple:
  """``(intersection, union, enclosing volume)`` of boxes ``a`` and ``b`` ``[..., 2*nd]``,
  broadcast against each other."""
  (lo_a, hi_a), (lo_b, hi_b) = split(a), split(b)
  if lo_a.shape[-1] != lo_b.shape[-1]:
    raise ValueError(f'boxes of {lo_a.shape[-1]}D and {lo_b.shape[-1]}D cannot be compared')
  inter = jnp.prod(jnp.maximum(jnp.minimum(hi_a, hi_b) - jnp.maximum(lo_a, lo_b), 0.0), -1)
  union = box_volume(a) + box_volume(b) - inter
  enclosing = jnp.prod(jnp.maximum(jnp.maximum(hi_a, hi_b) - jnp.minimum(lo_a, lo_b), 0.0),
                       -1)
  return inter, union, enclosing


def iou(a, b) -> jax.Array:
  """Elementwise intersection over union of ``a`` and ``b`` ``[..., 2*nd]`` (broadcast), in
  [0, 1]; 0 where the union is empty."""
  inter, union, _ = overlap_terms(a, b)
  return safe_divide(inter, union)


def giou(a, b) -> jax.Array:
  """Elementwise generalized IoU (Rezatofighi et al. 2019), ``IoU - (C - U) / C`` with C the
  smallest box enclosing both, in [-1, 1]; the GIoU loss is ``1 - giou``. 0 where both
  boxes are empty points (C = 0)."""
  inter, union, enclosing = overlap_terms(a, b)
  return safe_divide(inter, union) - safe_divide(enclosing - union, enclosing)


def box_sets(a, b) -> tuple:
  """``a [N, 1, 2nd]`` and ``b [1, M, 2nd]`` for pairwise comparison; a ValueError unless
  both are 2-D."""
  a, b = as_boxes(a), as_boxes(b)
  if a.ndim != 2 or b.ndim != 2:
    raise ValueError(f'pairwise comparison needs box sets [N, 2nd] and [M, 2nd], got shapes '
                     f'{a.shape} and {b.shape}')
  return a[:, None], b[None]


def pairwise_iou(a, b) -> jax.Array:
  """IoU of every box in ``a [N, 2nd]`` with every box in ``b [M, 2nd]``: ``[N, M]``."""
  return iou(*box_sets(a, b))


def pairwise_giou(a, b) -> jax.Array:
  """GIoU of every box in ``a [N, 2nd]`` with every box in ``b [M, 2nd]``: ``[N, M]``."""
  return giou(*box_sets(a, b))


# ----- regression deltas ---------------------------------------------------------------


def delta_weights(weights: Weights, nd: int) -> jax.Array:
  """Per-delta weights ``[2*nd]`` (centre weights of axes 0.., then size weights) from None
  (all 1), a scalar, or 2*nd values (torchvision's (wx, wy, ww, wh) in this axis order)."""
  if weights is None:
    return jnp.ones(2 * nd, jnp.float32)
  w = jnp.asarray(weights, jnp.float32)
  if w.ndim == 0:
    return jnp.full(2 * nd, w)
  if w.shape != (2 * nd,):
    raise ValueError(f'delta weights need 1 or 2*nd = {2 * nd} values (centres, then sizes), '
                     f'got shape {w.shape}')
  return w


def encode(boxes, anchors, weights: Weights = None) -> jax.Array:
  """Regression targets ``[..., 2*nd]`` of ``boxes`` relative to ``anchors`` (both
  ``[..., 2*nd]``, broadcast): ``w_c * (centre - anchor centre) / anchor size`` per axis,
  then ``w_s * log(size / anchor size)`` per axis (RetinaNet / Faster R-CNN). Anchors must
  have positive sizes; box sizes are floored at ``MIN_ENCODED_SIZE`` so that the empty rows
  of a padded set give finite targets."""
  anchors = as_boxes(anchors)
  boxes = as_boxes(boxes)
  nd = anchors.shape[-1] // 2
  w = delta_weights(weights, nd)
  anchor_size = box_size(anchors)
  size = jnp.maximum(box_size(boxes), MIN_ENCODED_SIZE)
  centre = w[:nd] * (box_centre(boxes) - box_centre(anchors)) / anchor_size
  log_ratio = w[nd:] * jnp.log(size / anchor_size)
  return jnp.concatenate([centre, log_ratio], axis=-1)


def decode(deltas, anchors, weights: Weights = None) -> jax.Array:
  """Boxes ``[..., 2*nd]`` from regression ``deltas`` relative to ``anchors`` (inverse of
  :func:`encode`); log size ratios are clamped at ``MAX_LOG_SIZE_RATIO`` (log(1000/16), as
  torchvision) so that an untrained head cannot overflow ``exp``."""
  anchors = as_boxes(anchors)
  deltas = jnp.asarray(deltas, jnp.float32)
  nd = anchors.shape[-1] // 2
  w = delta_weights(weights, nd)
  anchor_size = box_size(anchors)
  centre = box_centre(anchors) + deltas[..., :nd] / w[:nd] * anchor_size
  log_ratio = jnp.minimum(deltas[..., nd:] / w[nd:], MAX_LOG_SIZE_RATIO)
  half = jnp.exp(log_ratio) * anchor_size / 2
  return jnp.concatenate([centre - half, centre + half], axis=-1)


# ----- non-maximum suppression and clustering -------------------------------------------


def check_candidates(boxes, scores, classes, max_output) -> tuple:
  """``(boxes [N, 2nd] float32, scores [N] float32, classes [N] int32 or None)``; a
  ValueError naming the first inconsistent argument."""
  boxes = as_boxes(boxes)
  scores = jnp.asarray(scores, jnp.float32)
  if boxes.ndim != 2 or scores.shape != boxes.shape[:1]:
    raise ValueError(f'need boxes [N, 2nd] and scores [N], got {boxes.shape} and '
                     f'{scores.shape}')
  if classes is not None:
    classes = jnp.asarray(classes, jnp.int32)
    if classes.shape != scores.shape:
      raise ValueError(f'classes {classes.shape} must match scores {scores.shape}')
  if not isinstance(max_output, (int, np.integer)) or max_output < 1:
    raise ValueError(f'max_output must be a positive int, got {max_output!r}')
  return boxes, scores, classes


def iou_with_one(columns, volumes, index) -> jax.Array:
  """``[N]`` IoU of box ``index`` with every box, given the boxes as ``columns [2nd, N]``
  (one row per coordinate, contiguous along N) and their ``volumes [N]``, both computed
  once outside the pick loop."""
  nd = columns.shape[0] // 2
  lo, hi = columns[:nd], columns[nd:]
  pick = columns[:, index]
  extent = jnp.minimum(hi, pick[nd:, None]) - jnp.maximum(lo, pick[:nd, None])
  inter = jnp.prod(jnp.maximum(extent, 0.0), axis=0)
  return safe_divide(inter, volumes[index] + volumes - inter)


def next_pick(alive, scores, columns, volumes, classes, iou_threshold):
  """The highest-scoring alive box (lowest index on ties), whether there was one, and the
  ``[N]`` IoU of every box with it, with ``same`` marking the boxes it may absorb
  (IoU above the threshold and, when classes are given, the same class)."""
  index = jnp.argmax(jnp.where(alive, scores, -jnp.inf)).astype(jnp.int32)
  found = alive[index]
  overlap = iou_with_one(columns, volumes, index)
  same = overlap > iou_threshold
  if classes is not None:
    same = same & (classes == classes[index])
  return index, found, overlap, same


@functools.partial(jax.jit, static_argnames=('max_output',))
def batched_nms(boxes, scores, classes, iou_threshold, max_output: int,
                score_threshold=-jnp.inf) -> tuple:
  """Class-aware greedy NMS: boxes ``[N, 2nd]`` with ``scores [N]`` and ``classes [N]``
  (None: one class) -> ``(indices [max_output] int32, valid [max_output] bool)``, the kept
  boxes in descending score order (lower index first on ties). Only boxes with
  ``score > score_threshold`` take part (give padded rows score -inf); a pick removes the
  boxes of its class with IoU > ``iou_threshold``. Rows past the last pick have index -1
  and valid False. Empty boxes overlap nothing: they are kept (score permitting) and
  suppress nothing. ``max_output`` is static; vmap over a batch axis works."""
  boxes, scores, classes = check_candidates(boxes, scores, classes, max_output)
  if boxes.shape[0] == 0:
    return jnp.full(max_output, -1, jnp.int32), jnp.zeros(max_output, bool)
  alive = scores > score_threshold  # also drops NaN scores
  volumes, columns = box_volume(boxes), boxes.T

  def body(state):
    step, alive, indices, valid = state
    index, found, _, same = next_pick(alive, scores, columns, volumes, classes, iou_threshold)
    alive = alive & ~same & (jnp.arange(alive.shape[0]) != index)
    indices = indices.at[step].set(jnp.where(found, index, -1))
    return step + 1, alive, indices, valid.at[step].set(found)

  def more(state):
    step, alive, _, _ = state
    return (step < max_output) & jnp.any(alive)

  start = (jnp.int32(0), alive, jnp.full(max_output, -1, jnp.int32),
           jnp.zeros(max_output, bool))
  _, _, indices, valid = jax.lax.while_loop(more, body, start)
  return indices, valid


def nms(boxes, scores, iou_threshold, max_output: int, score_threshold=-jnp.inf) -> tuple:
  """Greedy NMS of boxes ``[N, 2nd]`` by ``scores [N]`` -> ``(indices [max_output] int32,
  valid [max_output] bool)``; see :func:`batched_nms` (all boxes one class)."""
  return batched_nms(boxes, scores, None, iou_threshold, max_output, score_threshold)


class Clusters(NamedTuple):
  """Output of :func:`weighted_box_clustering`, ``max_output`` rows in the order found."""
  boxes: jax.Array   # [max_output, 2nd] merged boxes
  scores: jax.Array  # [max_output] merged scores
  seeds: jax.Array   # [max_output] int32 index of each cluster's top box (-1 past the end)
  valid: jax.Array   # [max_output] bool


@functools.partial(jax.jit, static_argnames=('max_output',))
def weighted_box_clustering(boxes, scores, iou_threshold, max_output: int,
                            score_threshold=-jnp.inf, classes=None, weights=None,
                            expected_members=None) -> Clusters:
  """Merges overlapping predictions (of overlapping sliding windows, test-time mirrors,
  ensemble members) into one box each, nnDetection's weighted box clustering idea.

  Greedy like :func:`batched_nms`: the highest remaining score seeds a cluster of the
  remaining boxes (of its class, when ``classes [N]`` is given) with IoU > ``iou_threshold``
  to it, the seed included; they leave the pool. With o_j the member's IoU with the seed (1
  for the seed itself) and p_j its prior weight (``weights [N]``, e.g. lower at a window's
  border; default 1), the rule is:

  * box = sum(o_j p_j s_j b_j) / sum(o_j p_j s_j): confident members that agree with the
    seed pull hardest (the seed's box where all those weights are 0);
  * score = sum(o_j p_j s_j) / (sum(o_j p_j) + missing * mean(o_j p_j)), the o p-weighted
    mean score, where ``missing = max(0, E - members)`` counts the predictions expected but
    absent as score 0: ``expected_members`` E (scalar, or ``[N]`` read at the seed: how many
    windows / mirrors saw that place) lowers the score of an object only a few of them found.
    None: no such penalty.

  Returns :class:`Clusters` in seed-score order, fixed size ``max_output`` (static).
  """
  boxes, scores, classes = check_candidates(boxes, scores, classes, max_output)
  n = scores.shape[0]
  prior = jnp.ones(n, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  expected = (None if expected_members is None else
              jnp.broadcast_to(jnp.asarray(expected_members, jnp.float32), (n,)))
  empty = Clusters(jnp.zeros((max_output, boxes.shape[1]), jnp.float32),
                   jnp.zeros(max_output, jnp.float32), jnp.full(max_output, -1, jnp.int32),
                   jnp.zeros(max_output, bool))
  if n == 0:
    return empty
  alive = scores > score_threshold
  volumes, columns = box_volume(boxes), boxes.T

  def body(state):
    step, alive, out = state
    index, found, overlap, same = next_pick(alive, scores, columns, volumes, classes,
                                            iou_threshold)
    is_seed = jnp.arange(n) == index
    member = alive & (same | is_seed)
    agreement = jnp.where(member, jnp.where(is_seed, 1.0, overlap) * prior, 0.0)  # o_j p_j
    box_weight = jnp.where(member, agreement * scores, 0.0)  # padded rows: 0 * -inf = nan
    total = jnp.sum(box_weight)
    # A sum, not a matmul: accelerators may run float32 matmuls at reduced precision.
    weighted = jnp.sum(box_weight[:, None] * boxes, axis=0)
    merged = jnp.where(total > 0, weighted / jnp.where(total > 0, total, 1.0), boxes[index])
    denominator = jnp.sum(agreement)
    if expected is not None:
      count = jnp.sum(member)
      missing = jnp.maximum(expected[index] - count, 0.0)
      denominator = denominator + missing * denominator / jnp.maximum(count, 1)
    score = safe_divide(total, denominator)
    out = Clusters(out.boxes.at[step].set(jnp.where(found, merged, 0.0)),
                   out.scores.at[step].set(jnp.where(found, score, 0.0)),
                   out.seeds.at[step].set(jnp.where(found, index, -1)),
                   out.valid.at[step].set(found))
    return step + 1, alive & ~member, out

  def more(state):
    step, alive, _ = state
    return (step < max_output) & jnp.any(alive)

  _, _, out = jax.lax.while_loop(more, body, (jnp.int32(0), alive, empty))
  return out
