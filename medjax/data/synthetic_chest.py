"""CT-like chest volumes in Hounsfield units (HU), rendered on any voxel grid.

The anatomy of one synthetic patient (:class:`Chest`) is defined in world millimetres: RAS axes
(+x towards the patient's right, +y anterior, +z superior) relative to the patient's centre.
:func:`render` evaluates it at every voxel centre of a grid given by its NIfTI-style affine
(voxel index -> RAS mm), so any spacing, axis order, flip or oblique grid shows the same kind
of patient. What is drawn, outside in:

* air (-1000 HU) around an elliptical body: a subcutaneous fat layer (~ -100 HU) over muscle
  (~ +40 HU), ribs (a ring of bone cross-sections) and a vertebral body;
* two lungs (~ -850 HU, denser posteriorly) with smooth correlated texture, the heart
  carving the left one;
* pulmonary vessels: branching tubes from each hilum, tapering outwards, plus a few short
  elongated blobs of nodule-like width and intensity (vessels seen end-on). These are the
  distractors: in an axial slice many of them are round, dense and 3-6 mm wide;
* solid nodules (:func:`draw_nodules`): lobulated spheres of -80..+60 HU with soft edges,
  inside the lungs or attached to their wall (juxta-pleural);
* CT noise (slightly correlated, 10-25 HU).

All randomness comes from the ``np.random.Generator`` passed in, so a seeded generator gives
identical arrays.
"""

from __future__ import annotations

import dataclasses
from typing import List, Sequence, Tuple

import numpy as np
from scipy import ndimage, special

AIR, FAT, MUSCLE, BLOOD = -1000.0, -100.0, 40.0, 40.0
# LUNA16 nodules are >= 3 mm; diameters are log-normal-like with a median near 6.5 mm.
NODULE_MM = (3.0, 30.0)
_NODULE_LOG_MEDIAN, _NODULE_LOG_SIGMA = np.log(6.5), 0.55


@dataclasses.dataclass(frozen=True)
class Grid:
  """A voxel grid: ``affine [4, 4]`` voxel index -> RAS mm, ``shape`` (3 ints)."""
  affine: np.ndarray
  shape: Tuple[int, int, int]

  @property
  def spacing(self) -> np.ndarray:
    return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

  def to_voxel(self, world_ras: np.ndarray) -> np.ndarray:
    """``[..., 3]`` RAS mm -> continuous voxel index coordinates ``[..., 3]``."""
    inverse = np.linalg.inv(self.affine)
    return world_ras @ inverse[:3, :3].T + inverse[:3, 3]

  def to_world(self, index: np.ndarray) -> np.ndarray:
    return index @ self.affine[:3, :3].T + self.affine[:3, 3]

  def window(self, centre_ras: np.ndarray, radius_mm: float) -> Tuple[slice, ...]:
    """Voxel slices of a cube holding the ball (valid for orthonormal axis directions)."""
    centre = self.to_voxel(centre_ras)
    half = radius_mm / self.spacing
    lo = np.clip(np.floor(centre - half), 0, self.shape).astype(int)
    hi = np.clip(np.ceil(centre + half) + 1, 0, self.shape).astype(int)
    return tuple(slice(a, b) for a, b in zip(lo, hi))


@dataclasses.dataclass(frozen=True)
class Chest:
  """One patient, in mm relative to ``centre_ras`` (RAS axes). ``body`` (x, y) semi-axes;
  ``wall`` chest-wall thickness; lungs are ellipses (x, y, semi-x, semi-y) per side."""
  centre_ras: np.ndarray
  body: Tuple[float, float]
  wall: float
  lungs: Tuple[Tuple[float, float, float, float], ...]
  heart: Tuple[float, float, float]
  spine: Tuple[float, float, float]
  rib_pitch: float
  rib_phase: float
  z_half: float


def draw_chest(rng: np.random.Generator, centre_ras: np.ndarray,
               extent_mm: Sequence[float]) -> Chest:
  """A patient filling a field of view of ``extent_mm`` (LR, AP, SI) mm."""
  lr, ap, si = (float(e) for e in extent_mm)  # Python floats keep the float32 maths float32
  ax = 0.44 * lr * rng.uniform(0.92, 1.0)
  ay = 0.40 * ap * rng.uniform(0.85, 1.0)
  lungs = tuple((side * 0.46 * ax, -0.02 * ay, 0.34 * ax * rng.uniform(0.93, 1.07),
                 0.70 * ay * rng.uniform(0.93, 1.07)) for side in (1.0, -1.0))
  return Chest(
      centre_ras=np.asarray(centre_ras, np.float64), body=(ax, ay), wall=max(4.0, 0.12 * ax),
      lungs=lungs, heart=(-0.12 * ax, 0.30 * ay, 0.30 * ay * rng.uniform(0.9, 1.1)),
      spine=(0.0, -0.62 * ay, 0.16 * ay), rib_pitch=min(max(0.2 * si, 10.0), 30.0),
      rib_phase=rng.uniform(0, 30), z_half=si / 2)


def _ellipse_distance(x, y, ax, ay):
  """Approximate signed distance (mm, negative inside) to an ellipse: (rho - 1) / |grad rho|."""
  rho = np.sqrt((x / ax) ** 2 + (y / ay) ** 2)
  grad = np.sqrt((x / ax**2) ** 2 + (y / ay**2) ** 2) / np.maximum(rho, 1e-6)
  return (rho - 1) / np.maximum(grad, 1e-6)


def _inside(distance, width: float = 0.3):
  """Soft inside-ness in [0, 1] of a signed distance: the edge rises 10-90 % over 4.4 ``width``
  mm, about a CT scanner's blur."""
  return special.expit(-distance / width).astype(np.float32)


def _texture(rng, shape, spacing, sigma_mm: float) -> np.ndarray:
  """Unit-variance smooth noise ``[X, Y, Z]``, correlated over ``sigma_mm``."""
  field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32),
                                  sigma_mm / np.asarray(spacing))
  return field / (field.std() + 1e-8)


def _blend(image, value, alpha):
  image += alpha * (value - image)


def _anatomy(chest: Chest, q: np.ndarray, rng, spacing) -> Tuple[np.ndarray, np.ndarray]:
  """HU ``[X, Y, Z]`` of body, bones and lungs, and the soft lung mask ``[X, Y, Z]``."""
  x, y, z = q
  ax, ay = chest.body
  body_d = _ellipse_distance(x, y, ax, ay)
  fat = 0.25 * chest.wall
  image = np.full(x.shape, AIR, np.float32)
  tissue = MUSCLE + (FAT - MUSCLE) * _inside(-(body_d + fat)) + 8 * _texture(
      rng, x.shape, spacing, 2.0)
  _blend(image, tissue, _inside(body_d))
  # Ribs: bone cross-sections at mid-wall depth, repeating along z, sloping down anteriorly.
  anterior = (1 + np.sin(np.arctan2(y / ay, x / ax))) / 2
  turns = (z - chest.rib_phase + 1.5 * chest.rib_pitch * anterior) / chest.rib_pitch
  rib_r = float(np.clip(0.2 * chest.wall, 1.0, 4.0))
  rib_d = np.hypot(body_d + 0.55 * chest.wall, (turns - np.round(turns)) * chest.rib_pitch)
  no_sternum = 1 - _inside(np.abs(x) - 0.2 * ax) * (y > 0)
  _blend(image, 500.0, _inside(rib_d - rib_r) * no_sternum)
  sx, sy, sr = chest.spine
  spine_d = np.hypot(x - sx, y - sy) - sr
  _blend(image, 250 + 350 * _inside(-(spine_d + 1.5)), _inside(spine_d))
  # Lungs: perturbed ellipses, a little larger inferiorly, kept off the wall, heart and spine.
  lungs = np.zeros(x.shape, np.float32)
  taper = 1 - 0.08 * z / chest.z_half
  for cx, cy, lx, ly in chest.lungs:
    theta = np.arctan2(y - cy, x - cx)
    wobble = 1 + 0.04 * np.sin(2 * theta + rng.uniform(0, 6.3)) + 0.03 * np.sin(
        3 * theta + z / 12 + rng.uniform(0, 6.3))
    lungs = np.maximum(lungs, _inside(_ellipse_distance(x - cx, y - cy, lx * taper * wobble,
                                                        ly * taper * wobble)))
  hx, hy, hr = chest.heart
  lungs *= _inside(body_d + chest.wall) * _inside(-(np.hypot(x - hx, y - hy) - hr - 1))
  lungs *= _inside(-(spine_d - 2))
  lung_hu = (rng.uniform(-870, -830) + 40 * np.clip(-y / ay, -1, 1)
             + 25 * _texture(rng, x.shape, spacing, 1.2) + 10 * _texture(rng, x.shape, spacing,
                                                                         0.5))
  _blend(image, lung_hu, lungs)
  return image, lungs


def _segment_alpha(q_window, p0, p1, r0, r1):
  """Soft inside-ness of a tapered tube from ``p0`` (radius r0) to ``p1`` (radius r1)."""
  axis = p1 - p0
  rel = q_window - p0[:, None, None, None]
  t = np.clip(np.tensordot(axis, rel, 1) / (axis @ axis), 0, 1)
  closest = p0[:, None, None, None] + t * axis[:, None, None, None]
  distance = np.sqrt(((q_window - closest) ** 2).sum(0))
  return _inside(distance - (r0 + t * (r1 - r0)), 0.4)


def _perpendicular(rng, d):
  v = rng.standard_normal(3)
  v -= (v @ d) * d
  return v / np.linalg.norm(v)


def vessel_tree(rng, chest: Chest, roots: int = 4, generations: int = 5) -> List[Tuple]:
  """Segments ``(p0, p1, r0, r1)`` (mm, patient frame) of two pulmonary vessel trees: from
  each lung's medial side, ``roots`` trunks of 1.5-2.5 mm radius branch in two
  ``generations - 1`` times, shorter and thinner each time, reaching across the lung. The
  trunks start at heights spread over the scan (a real hilum is one place, but these fields
  of view are long for their width), so no slab is empty."""
  segments = []
  for cx, cy, lx, ly in chest.lungs:
    medial = -np.sign(cx)
    stack = []
    for height in np.linspace(-0.75, 0.75, roots) + rng.uniform(-0.1, 0.1, roots):
      hilum = np.array([cx + medial * 0.55 * lx, cy + 0.1 * ly, height * chest.z_half])
      d = np.array([-medial * rng.uniform(0.2, 1.0), rng.uniform(-0.8, 0.8),
                    rng.uniform(-1.5, 1.5)])
      stack.append((hilum, d / np.linalg.norm(d), 0.35 * max(lx, ly) * rng.uniform(0.8, 1.2),
                    rng.uniform(1.5, 2.5), 0))
    while stack:
      start, d, length, radius, gen = stack.pop()
      end = start + length * d
      segments.append((start, end, radius, 0.9 * radius))
      if gen + 1 < generations:
        for sign in (1, -1):
          angle = np.deg2rad(rng.uniform(20, 45))
          child = np.cos(angle) * d + sign * np.sin(angle) * _perpendicular(rng, d)
          stack.append((end, child, 0.8 * length * rng.uniform(0.8, 1.2), 0.8 * radius,
                        gen + 1))
  return segments


def _vessels(rng, chest: Chest, grid: Grid, q, lung_distance) -> Tuple[np.ndarray, int]:
  """Soft vessel mask ``[X, Y, Z]`` (tubes and end-on blobs) and the number of blobs."""
  alpha = np.zeros(grid.shape, np.float32)
  for p0, p1, r0, r1 in vessel_tree(rng, chest):
    window = grid.window(chest.centre_ras + (p0 + p1) / 2,
                         np.linalg.norm(p1 - p0) / 2 + r0 + 2)
    if all(s.stop > s.start for s in window):
      alpha[window] = np.maximum(alpha[window], _segment_alpha(q[(slice(None),) + window],
                                                               p0, p1, r0, r1))
  num_blobs = int(rng.integers(2, 6))
  for _ in range(num_blobs):
    radius = rng.uniform(1.5, 3.0)
    where = np.flatnonzero(lung_distance >= radius + 1)
    if not len(where):
      continue
    centre_ras = grid.to_world(np.array(np.unravel_index(rng.choice(where), grid.shape), float))
    d = rng.standard_normal(3)
    half = radius * rng.uniform(1.6, 3.0) * d / np.linalg.norm(d)
    p = centre_ras - chest.centre_ras
    window = grid.window(centre_ras, np.linalg.norm(half) + radius + 2)
    alpha[window] = np.maximum(alpha[window], _segment_alpha(
        q[(slice(None),) + window], p - half, p + half, radius, radius))
  return alpha, num_blobs


def sample_nodule_diameters(rng: np.random.Generator, n: int,
                            max_mm: float = NODULE_MM[1]) -> np.ndarray:
  """``n`` diameters (mm) in [3, ``max_mm``], log-normal (median 6.5 mm) truncated there:
  many more small nodules than large ones, as in LUNA16."""
  bounds = (np.log([NODULE_MM[0], max_mm]) - _NODULE_LOG_MEDIAN) / _NODULE_LOG_SIGMA
  u = rng.uniform(*special.ndtr(bounds), size=n)
  return np.exp(_NODULE_LOG_MEDIAN + _NODULE_LOG_SIGMA * special.ndtri(u))


def _edge_distance(grid: Grid) -> np.ndarray:
  """Distance (mm) of each voxel centre to the grid's boundary faces ``[X, Y, Z]``."""
  per_axis = [np.minimum(np.arange(n) + 0.5, n - 0.5 - np.arange(n)) * s
              for n, s in zip(grid.shape, grid.spacing)]
  return np.minimum(np.minimum(per_axis[0][:, None, None], per_axis[1][None, :, None]),
                    per_axis[2][None, None, :])


def draw_nodules(rng, grid: Grid, lung_distance: np.ndarray, count: int,
                 juxta_probability: float = 0.25) -> List[dict]:
  """Up to ``count`` non-overlapping nodules placed in the lungs.

  ``lung_distance [X, Y, Z]``: distance (mm) of lung voxels to the lung wall (0 outside).
  Regular nodules lie wholly inside the lung; juxta-pleural ones have their centre 0.5-0.9
  radii from the wall, so they touch it. Diameters are capped so the largest fits the lungs
  of this (possibly small) volume. Returns dicts with ``voxel`` (continuous index centre),
  ``diameter_mm`` and ``juxtapleural``.
  """
  room = np.minimum(lung_distance, _edge_distance(grid))
  max_diameter = min(NODULE_MM[1], 2 * (float(room.max()) - 1.5))
  if count == 0 or max_diameter < NODULE_MM[0]:
    return []
  nodules = []
  index = np.indices(grid.shape, np.float32)
  for diameter in sample_nodule_diameters(rng, count, max_diameter):
    r = diameter / 2
    juxta = rng.random() < juxta_probability
    ok = (room >= r + 1.5) if not juxta else (
        (lung_distance >= 0.5 * r) & (lung_distance <= 0.9 * r) & (room >= 0.5 * r))
    ok &= _edge_distance(grid) >= r + 1
    for other in nodules:
      offset = (index - other['voxel'][:, None, None, None]) * grid.spacing[:, None, None, None]
      ok &= np.sqrt((offset ** 2).sum(0)) >= r + other['diameter_mm'] / 2 + 2
    where = np.flatnonzero(ok)
    if not len(where):
      continue
    # A sub-voxel offset, small enough that the nearest voxel stays in the nodule's core.
    voxel = np.array(np.unravel_index(rng.choice(where), grid.shape)) + rng.uniform(
        -0.25, 0.25, 3)
    nodules.append({'voxel': voxel, 'diameter_mm': float(diameter), 'juxtapleural': juxta})
  return nodules


def _render_nodule(rng, image, grid: Grid, nodule: dict) -> None:
  """Blends one lobulated solid nodule into ``image`` in place."""
  r = nodule['diameter_mm'] / 2
  centre = grid.to_world(nodule['voxel'])
  window = grid.window(centre, 1.3 * r + 3)
  index = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in window],
                               indexing='ij'), -1)
  rel = grid.to_world(index.astype(np.float64)) - centre
  distance = np.linalg.norm(rel, axis=-1)
  unit = rel / np.maximum(distance, 1e-6)[..., None]
  lobes = 1.0
  for _ in range(3):  # zero-mean Legendre P2 bumps keep the mean radius ~ r
    v = rng.standard_normal(3)
    lobes = lobes + rng.uniform(-0.08, 0.08) * (1.5 * (unit @ (v / np.linalg.norm(v))) ** 2 - 0.5)
  edge = min(rng.uniform(0.3, 0.7), 0.15 * r)
  alpha = _inside(distance - r * lobes, edge)
  hu = rng.uniform(-80, 60) + 20 * _texture(rng, alpha.shape, grid.spacing, 1.0)
  _blend(image[window], hu, alpha)


def render(rng: np.random.Generator, chest: Chest, grid: Grid, num_nodules: int):
  """CT volume int16 HU ``[X, Y, Z]`` of ``chest`` on ``grid``, its nodules (see
  :func:`draw_nodules`) and the number of blob distractors."""
  index = np.indices(grid.shape, np.float32).reshape(3, -1)
  q = (grid.affine[:3, :3].astype(np.float32) @ index + (
      grid.affine[:3, 3] - chest.centre_ras).astype(np.float32)[:, None]).reshape(
          (3,) + tuple(grid.shape))
  spacing = grid.spacing
  image, lungs = _anatomy(chest, q, rng, spacing)
  lung_distance = ndimage.distance_transform_edt(lungs > 0.5, sampling=spacing)
  vessels, num_blobs = _vessels(rng, chest, grid, q, lung_distance)
  _blend(image, BLOOD + 10 * _texture(rng, grid.shape, spacing, 1.0), vessels * lungs)
  nodules = draw_nodules(rng, grid, lung_distance, num_nodules)
  for nodule in nodules:
    _render_nodule(rng, image, grid, nodule)
  noise = ndimage.gaussian_filter(rng.standard_normal(grid.shape).astype(np.float32), 0.5)
  image += rng.uniform(10, 25) * noise / (noise.std() + 1e-8)
  return np.clip(np.round(image), -1024, 3071).astype(np.int16), nodules, num_blobs
