"""Segmentation metrics against an independent SciPy (KD-tree) implementation, the empty-mask
conventions, and sliding-window inference against direct prediction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial import cKDTree

from medjax import inference, seg_metrics
from medjax.models import build_model


def _reference_surface_distances(a, b, spacing):
  """Independent: boundary by neighbour lookup, distances by KD-tree in mm."""
  def boundary(mask):
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask, bool)
    for axis in range(mask.ndim):
      for shift in (-1, 1):
        inner &= np.roll(padded, shift, axis)[tuple(slice(1, -1) for _ in range(mask.ndim))]
    return mask & ~inner
  pa = np.argwhere(boundary(a)) * np.asarray(spacing)
  pb = np.argwhere(boundary(b)) * np.asarray(spacing)
  return cKDTree(pb).query(pa)[0]


def _blob(shape, centre, radii):
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), -1)
  return (((grid - centre) / radii) ** 2).sum(-1) <= 1


@pytest.mark.parametrize('spacing', [(1.0, 1.0, 1.0), (0.7, 1.3, 3.0)])
def test_metrics_match_independent_reference(spacing):
  rng = np.random.default_rng(0)
  ref = _blob((30, 34, 20), (15, 16, 10), (8, 10, 6))
  pred = _blob((30, 34, 20), (13, 18, 9), (9, 8, 6)) ^ (rng.random((30, 34, 20)) < 0.01)
  m = seg_metrics.binary_metrics(pred, ref, spacing)
  inter = np.sum(pred & ref)
  assert m['dice'] == pytest.approx(2 * inter / (pred.sum() + ref.sum()))
  assert m['iou'] == pytest.approx(inter / np.sum(pred | ref))
  assert m['sensitivity'] == pytest.approx(inter / ref.sum())
  assert m['precision'] == pytest.approx(inter / pred.sum())
  d1 = _reference_surface_distances(pred, ref, spacing)
  d2 = _reference_surface_distances(ref, pred, spacing)
  assert m['hd95'] == pytest.approx(max(np.percentile(d1, 95), np.percentile(d2, 95)), rel=1e-9)
  assert m['assd'] == pytest.approx((d1.sum() + d2.sum()) / (d1.size + d2.size), rel=1e-9)


def test_distance_uses_physical_spacing():
  # Two slabs 3 voxels apart along an axis of 2.5 mm: every surface distance is 7.5 mm
  # between the facing faces.
  ref = np.zeros((10, 10, 20), bool)
  pred = np.zeros((10, 10, 20), bool)
  ref[:, :, 5] = True
  pred[:, :, 8] = True
  m = seg_metrics.binary_metrics(pred, ref, (1.0, 1.0, 2.5))
  assert m['hd95'] == pytest.approx(7.5) and m['assd'] == pytest.approx(7.5)
  m2d = seg_metrics.binary_metrics(pred[0], ref[0], (1.0, 2.5))
  assert m2d['hd95'] == pytest.approx(7.5)


def test_empty_mask_conventions():
  empty = np.zeros((8, 8), bool)
  full = np.zeros((8, 8), bool)
  full[2:5, 2:5] = True
  both = seg_metrics.binary_metrics(empty, empty, (1, 1))
  assert all(np.isnan(v) for v in both.values())
  fp = seg_metrics.binary_metrics(full, empty, (1, 1))
  assert fp['dice'] == 0 and fp['precision'] == 0 and np.isnan(fp['sensitivity'])
  assert fp['hd95'] == np.inf
  fn = seg_metrics.binary_metrics(empty, full, (1, 1))
  assert fn['dice'] == 0 and fn['sensitivity'] == 0 and np.isnan(fn['precision'])
  assert fn['assd'] == np.inf
  perfect = seg_metrics.segmentation_metrics(full.astype(int) * 2, full.astype(int) * 2, 3,
                                             (1, 1))
  assert perfect[2]['dice'] == 1.0 and perfect[2]['hd95'] == 0.0 and np.isnan(perfect[1]['dice'])
  with pytest.raises(ValueError, match='spacing'):
    seg_metrics.binary_metrics(full, full, (1, 1, 1))


def test_window_starts_cover_the_image():
  for size, roi, overlap in [(100, 32, 0.5), (33, 32, 0.25), (32, 32, 0.5), (10, 32, 0.5)]:
    starts = inference.window_starts(size, roi, overlap)
    covered = np.zeros(max(size, roi), bool)
    for s in starts:
      covered[s:s + roi] = True
    assert covered[:size].all() and starts[0] == 0
    assert starts[-1] + roi >= size


@pytest.mark.parametrize('blend', ['gaussian', 'constant'])
def test_sliding_window_of_a_pointwise_function_is_exact(blend):
  image = np.random.default_rng(0).normal(size=(37, 50, 23, 2)).astype(np.float32)
  predict = lambda w: np.concatenate([w * 2.0, w.sum(-1, keepdims=True)], -1)  # noqa: E731
  out = inference.sliding_window(predict, image, (16, 16, 16), overlap=0.5, blend=blend,
                                 batch_size=3, mirror_axes=(0, 2))
  np.testing.assert_allclose(out, predict(image[None])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sliding_window_equals_direct_prediction_when_the_window_covers_the_image():
  model = build_model('unet', 3, features=(4, 8), strides=(1, 2))
  image = np.random.default_rng(1).normal(size=(16, 24, 1)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), jnp.asarray(image[None]))
  predict = jax.jit(lambda w: jax.nn.softmax(model.apply(variables, w), -1))
  direct = np.asarray(predict(image[None]))[0]
  windowed = inference.sliding_window(lambda w: np.asarray(predict(w)), image, (16, 24))
  np.testing.assert_allclose(windowed, direct, rtol=1e-6, atol=1e-6)
  # A window larger than the image: padded, predicted, cropped back.
  padded = inference.sliding_window(lambda w: np.asarray(predict(w)), image[:10, :20],
                                    (16, 24))
  assert padded.shape == (10, 20, 3)


@pytest.mark.slow
def test_score_command_on_real_labels(tmp_path):
  import csv
  import json
  import subprocess
  import sys

  import nibabel as nib
  from conftest import shared_file
  from medjax import scoring
  pred_dir, ref_dir = tmp_path / 'pred', tmp_path / 'ref'
  pred_dir.mkdir()
  ref_dir.mkdir()
  expected = {}
  for name in ('hippocampus_004', 'hippocampus_006'):
    src = nib.load(shared_file('msd_hippocampus', 'labelsTr', f'{name}.nii.gz'))
    ref = np.asarray(src.dataobj).astype(np.uint8)
    pred = np.roll(ref, 1, axis=0)  # a prediction one voxel off
    nib.save(nib.Nifti1Image(ref, src.affine), ref_dir / f'{name}.nii.gz')
    nib.save(nib.Nifti1Image(pred, src.affine), pred_dir / f'{name}.nii.gz')
    expected[name] = seg_metrics.segmentation_metrics(pred, ref, 3, (1.0, 1.0, 1.0))
  proc = subprocess.run([sys.executable, '-m', 'medjax.cli', 'score', '--pred', str(pred_dir),
                         '--ref', str(ref_dir), '--out', str(tmp_path / 'out'),
                         '--num_classes', '3'], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  rows = list(csv.DictReader(open(tmp_path / 'out' / 'scores.csv')))
  assert len(rows) == 4
  for row in rows:
    ref_values = expected[row['case']][int(row['class'])]
    assert float(row['dice']) == pytest.approx(ref_values['dice'])
    assert float(row['hd95']) == pytest.approx(ref_values['hd95'])
  summary = json.load(open(tmp_path / 'out' / 'summary.json'))
  dices = [expected[c][1]['dice'] for c in expected]
  assert summary['classes']['1']['dice']['mean'] == pytest.approx(np.mean(dices))
  assert summary['classes']['1']['dice']['sd'] == pytest.approx(np.std(dices, ddof=1))
  # A prediction that does not overlay its scan is an error, not a score.
  shifted = nib.load(pred_dir / 'hippocampus_004.nii.gz')
  affine = shifted.affine.copy()
  affine[0, 3] += 1.0
  nib.save(nib.Nifti1Image(np.asarray(shifted.dataobj), affine),
           pred_dir / 'hippocampus_004.nii.gz')
  with pytest.raises(Exception, match='affine differs'):
    scoring.score_folders(str(pred_dir), str(ref_dir), str(tmp_path / 'out2'), 3)


def test_sliding_window_stack_equals_one_image_at_a_time():
  rng = np.random.default_rng(3)
  stack = rng.normal(size=(5, 30, 21, 1)).astype(np.float32)
  predict = lambda w: np.concatenate([np.tanh(w), w ** 2], -1)  # noqa: E731
  together = inference.sliding_window_stack(predict, stack, (16, 16), batch_size=7,
                                            mirror_axes=(1,))
  for m in range(5):
    alone = inference.sliding_window(predict, stack[m], (16, 16), batch_size=2,
                                     mirror_axes=(1,))
    np.testing.assert_allclose(together[m], alone, rtol=1e-6, atol=1e-6)
