"""Segmentation end to end on real Hippocampus cases (tiny network): train, validate by
sliding window on the original grid, resume exactly, predict NIfTI that overlays its input
(also for reoriented, anisotropic inputs), and score against an independent computation."""

import json
import os
import shutil
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest

from conftest import shared_file
from medjax import apply, config as config_lib
from medjax import train as train_lib



def _config(tmp_cache, **overrides):
  shared_file('msd_hippocampus', 'dataset.json')
  c = config_lib.load_config_file('configs/hippocampus_unet3d.py:runlocal')
  config_lib.apply_overrides(c, [f'data.cache_dir={tmp_cache}'] +
                             [f'{k}={v}' for k, v in overrides.items()])
  return c


@pytest.fixture(scope='module')
def seg_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('seg')
  config = _config(str(tmp / 'cache'))
  workdir = str(tmp / 'run')
  results = train_lib.train_and_evaluate(config, workdir)
  return workdir, config, results, tmp


@pytest.mark.slow
def test_workdir_and_results(seg_run):
  workdir, config, results, _ = seg_run
  assert results['task'] == 'segmentation' and results['selection_metric'] == 'val/dice'
  split = json.load(open(os.path.join(workdir, 'split.json')))
  assert len(split['train']) == 4 and len(split['val']) == 2
  assert not set(split['train']) & set(split['val'])
  assert set(results['val']['per_case']) == set(split['val'])
  records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in records if r['split'] == 'val'] == [3, 6]


@pytest.mark.slow
def test_validation_predictions_overlay_and_scores_match_independent(seg_run):
  workdir, _, results, _ = seg_run
  for case_id, per_class in results['val']['per_case'].items():
    pred = nib.load(os.path.join(workdir, 'predictions_val', f'{case_id}.nii.gz'))
    label = nib.load(shared_file('msd_hippocampus', 'labelsTr', f'{case_id}.nii.gz'))
    assert pred.shape == label.shape
    np.testing.assert_allclose(pred.affine, label.affine, atol=1e-6)
    p, r = np.asarray(pred.dataobj), np.asarray(label.dataobj)
    for k, name in ((1, 'Anterior'), (2, 'Posterior')):
      inter = np.sum((p == k) & (r == k))
      denominator = np.sum(p == k) + np.sum(r == k)
      expected = 2 * inter / denominator if denominator else float('nan')
      got = per_class[name]['dice']
      assert (np.isnan(got) and np.isnan(expected)) or got == pytest.approx(expected)


@pytest.mark.slow
def test_evaluate_reproduces_validation_metrics(seg_run):
  workdir, _, results, _ = seg_run
  again = train_lib.evaluate_workdir(workdir, 'val')
  assert again['metrics']['dice'] == results['val']['dice']
  assert again['metrics']['per_case'] == results['val']['per_case']


@pytest.mark.slow
def test_segmentation_resume_is_exact(seg_run):
  workdir, config, results, tmp = seg_run
  other = str(tmp / 'resumed')
  stopped = train_lib.train_and_evaluate(_config(str(tmp / 'cache'),
                                                 **{'train.stop_after_steps': 4}), other)
  assert stopped == {'stopped_at_step': 4}
  # The split is on disk from the start, not only once training finishes.
  assert json.load(open(os.path.join(other, 'split.json'))) == json.load(
      open(os.path.join(workdir, 'split.json')))
  resumed = train_lib.train_and_evaluate(config, other)
  assert resumed['val']['per_case'] == results['val']['per_case']
  losses = lambda w: [json.loads(l)['loss'] for l in open(os.path.join(w, 'metrics.jsonl'))  # noqa
                      if json.loads(l)['split'] == 'train']
  assert losses(other) == losses(workdir)


@pytest.mark.slow
def test_host_worker_processes_train_the_same_run(seg_run):
  """data.host_workers=2 (samples drawn by worker processes), stopped at step 4 and resumed
  with one worker (how samples are drawn may change on resume): the same losses and
  validation scores as the in-process run, and no worker left behind."""
  import multiprocessing
  workdir, config, results, tmp = seg_run
  other = str(tmp / 'host_workers')
  stopped = train_lib.train_and_evaluate(_config(
      str(tmp / 'cache'), **{'data.host_workers': 2, 'train.stop_after_steps': 4}), other)
  assert stopped == {'stopped_at_step': 4}
  resumed = train_lib.train_and_evaluate(_config(str(tmp / 'cache'),
                                                 **{'data.host_workers': 1}), other)
  assert resumed['val']['per_case'] == results['val']['per_case']
  losses = lambda w: [json.loads(l)['loss'] for l in open(os.path.join(w, 'metrics.jsonl'))  # noqa
                      if json.loads(l)['split'] == 'train']
  assert losses(other) == losses(workdir)
  assert not multiprocessing.active_children()


@pytest.mark.slow
def test_predict_keeps_affine_for_reoriented_anisotropic_input(seg_run, tmp_path):
  workdir, _, _, _ = seg_run
  src = nib.load(shared_file('msd_hippocampus', 'imagesTr', 'hippocampus_004.nii.gz'))
  data = np.asarray(src.dataobj).astype(np.float32)
  affine = np.eye(4)
  affine[:3, :3] = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]]) @ np.diag([0.9, 1.1, 1.4])
  affine[:3, 3] = [3.0, -7.0, 11.0]
  inputs = tmp_path / 'in'
  inputs.mkdir()
  nib.save(nib.Nifti1Image(data, affine), inputs / 'odd.nii.gz')
  shutil.copy(shared_file('msd_hippocampus', 'imagesTr', 'hippocampus_006.nii.gz'), inputs)
  proc = subprocess.run([sys.executable, '-m', 'medjax.cli', 'predict', '--workdir', workdir,
                         '--input', str(inputs), '--output', str(tmp_path / 'out')],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = nib.load(tmp_path / 'out' / 'odd.nii.gz')
  assert out.shape == data.shape
  np.testing.assert_allclose(out.affine, affine, atol=1e-5)
  assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(affine)
  assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2}
  # The same scan in another orientation gets the same labels at the same world points.
  plain = nib.load(tmp_path / 'out' / 'hippocampus_006.nii.gz')
  assert plain.shape == nib.load(inputs / 'hippocampus_006.nii.gz').shape


@pytest.mark.slow
def test_predict_then_score_equals_validation(seg_run, tmp_path):
  workdir, _, results, _ = seg_run
  split = json.load(open(os.path.join(workdir, 'split.json')))
  images, refs = tmp_path / 'images', tmp_path / 'refs'
  images.mkdir()
  refs.mkdir()
  for case_id in split['val']:
    shutil.copy(shared_file('msd_hippocampus', 'imagesTr', f'{case_id}.nii.gz'), images)
    shutil.copy(shared_file('msd_hippocampus', 'labelsTr', f'{case_id}.nii.gz'), refs)
  apply.predict_files(workdir, str(images), str(tmp_path / 'pred'))
  from medjax import scoring
  summary = scoring.score_folders(str(tmp_path / 'pred'), str(refs), str(tmp_path / 's'), 3)
  dice = [results['val']['per_case'][c]['Anterior']['dice'] for c in split['val']]
  finite = [d for d in dice if np.isfinite(d)]
  if finite:
    assert summary['classes']['1']['dice']['mean'] == pytest.approx(np.mean(finite))


def test_segmentation_config_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown loss.name 'lovasz' for segmentation"):
    train_lib.make_experiment(_config(str(tmp_path), **{'loss.name': 'lovasz'}))
  with pytest.raises(ValueError, match=r'data.patch_size \(16, 16\) needs 3 values'):
    train_lib.make_experiment(_config(str(tmp_path), **{'data.patch_size': (16, 16)}))
  with pytest.raises(ValueError, match="data.target_spacing must be 'keep'"):
    train_lib.make_experiment(_config(str(tmp_path), **{'data.target_spacing': 'fine'}))
  with pytest.raises(ValueError, match=r'data.slice_context=1: .* only with data.slice_axis'):
    train_lib.make_experiment(_config(str(tmp_path), **{'data.slice_context': 1}))


@pytest.mark.slow
def test_2d_slices_of_volumes_train_and_segment_whole_volumes(seg_run, tmp_path):
  # 2.5D: each sagittal slice with one neighbour on each side as channels.
  config = _config(str(tmp_path / 'cache'), **{'data.slice_axis': 0,
                                                 'data.slice_context': 1,
                                                 'data.patch_size': (16, 16),
                                                 'data.skip_empty_slices': True})
  results = train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  exp_2d, state_2d = train_lib.restore_workdir(str(tmp_path / 'run'))[:2]
  assert exp_2d.input_shape == (16, 16, 3)
  kernels = [v for k, v in jax.tree_util.tree_flatten_with_path(state_2d.params)[0]
             if 'kernel' in jax.tree_util.keystr(k)]
  assert any(k.shape[-2] == 3 for k in kernels)  # the first convolution reads 3 slices
  split = json.load(open(tmp_path / 'run' / 'split.json'))
  for case_id in split['val']:
    pred = nib.load(tmp_path / 'run' / 'predictions_val' / f'{case_id}.nii.gz')
    label = nib.load(shared_file('msd_hippocampus', 'labelsTr', f'{case_id}.nii.gz'))
    assert pred.shape == label.shape  # every slice predicted, whole volume reassembled
    np.testing.assert_allclose(pred.affine, label.affine, atol=1e-6)
  assert 0.0 <= results['val']['dice'] <= 1.0

  # The 2D model and seg_run's 3D one as an ensemble: the mean of their probabilities,
  # scored on the original grid against the label files by NumPy.
  workdir_3d = seg_run[0]
  workdirs = [workdir_3d, str(tmp_path / 'run')]
  ensemble = train_lib.evaluate_ensemble(workdirs, 'val', output=str(tmp_path / 'ens'))
  members = [train_lib.restore_workdir(w)[:2] for w in workdirs]
  exp = members[0][0]
  for case_id in split['val']:
    image = exp.cases[case_id][0]
    probs = sum(e.predict_prepared(s, image) for e, s in members) / 2
    expected = exp.label_map(case_id, probs)
    written = nib.load(tmp_path / 'ens' / 'predictions_val' / f'{case_id}.nii.gz')
    label = nib.load(shared_file('msd_hippocampus', 'labelsTr', f'{case_id}.nii.gz'))
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
    np.testing.assert_allclose(written.affine, label.affine, atol=1e-6)
    r = np.asarray(label.dataobj)
    for k, name in ((1, 'Anterior'), (2, 'Posterior')):
      denominator = np.sum(expected == k) + np.sum(r == k)
      dice = 2 * np.sum((expected == k) & (r == k)) / denominator
      assert ensemble['metrics']['per_case'][case_id][name]['dice'] == pytest.approx(dice)
  assert json.load(open(tmp_path / 'ens' / 'eval_val.json'))['metrics']['dice'] == \
      pytest.approx(ensemble['metrics']['dice'])
  # One member is that member's own evaluation.
  alone = train_lib.evaluate_ensemble([workdir_3d], 'val')
  assert alone['metrics']['per_case'] == seg_run[2]['val']['per_case']
  # A member from another fold trained on cases the ensemble would be scored on.
  other_fold = tmp_path / 'fold1'
  shutil.copytree(workdir_3d, other_fold)
  cfg = json.load(open(other_fold / 'config.json'))
  cfg['data']['fold'] = 1
  json.dump(cfg, open(other_fold / 'config.json', 'w'))
  with pytest.raises(ValueError, match='its split differs'):
    train_lib.evaluate_ensemble([workdir_3d, str(other_fold)], 'val')
  from medjax import cli
  assert cli.main(['evaluate', '--workdir', workdir_3d, '--output', str(tmp_path / 'x')]) == 2
  assert not os.path.exists(tmp_path / 'x')
  # `medjax predict` with both workdirs: the ensemble's label maps, from the scans' files.
  images = tmp_path / 'images'
  images.mkdir()
  for case_id in split['val']:
    shutil.copy(shared_file('msd_hippocampus', 'imagesTr', f'{case_id}.nii.gz'), images)
  assert cli.main(['predict', '--workdir', workdirs[0], '--workdir', workdirs[1], '--input',
                   str(images), '--output', str(tmp_path / 'pred')]) == 0
  for case_id in split['val']:
    predicted = nib.load(tmp_path / 'pred' / f'{case_id}.nii.gz')
    written = nib.load(tmp_path / 'ens' / 'predictions_val' / f'{case_id}.nii.gz')
    np.testing.assert_array_equal(np.asarray(predicted.dataobj), np.asarray(written.dataobj))
    np.testing.assert_allclose(predicted.affine, written.affine, atol=1e-6)
  # Grad-CAM of the 2.5D model, slice by slice, back on the scan's own grid.
  case_id = split['val'][0]
  assert cli.main(['explain', '--workdir', str(tmp_path / 'run'), '--input',
                   str(images / f'{case_id}.nii.gz'), '--output', str(tmp_path / 'cam')]) == 0
  source = nib.load(images / f'{case_id}.nii.gz')
  for name in ('Anterior', 'Posterior'):
    cam = nib.load(tmp_path / 'cam' / f'{case_id}_gradcam_{name}.nii.gz')
    assert cam.shape == source.shape
    np.testing.assert_allclose(cam.affine, source.affine, atol=1e-5)


@pytest.mark.slow
def test_synthetic_volumes_train_predict_score_end_to_end(tmp_path):
  """Runs without ../shared: synthetic non-RAS, anisotropic volumes through train, predict
  and score; predictions overlay their inputs and the scores match an independent Dice."""
  from medjax.data import synthetic
  from medjax import scoring
  root = synthetic.write_segmentation_dataset(str(tmp_path / 'data'), num_cases=6, seed=0)
  c = config_lib.load_config_file('configs/hippocampus_unet3d.py:runlocal')
  config_lib.apply_overrides(c, [f'data.root={root}', f'data.cache_dir={tmp_path / "cache"}',
                                 'data.target_spacing=median', 'train.num_epochs=3'])
  workdir = str(tmp_path / 'run')
  results = train_lib.train_and_evaluate(c, workdir)
  split = json.load(open(os.path.join(workdir, 'split.json')))
  images, refs = tmp_path / 'val_images', tmp_path / 'val_refs'
  images.mkdir()
  refs.mkdir()
  for case_id in split['val']:
    shutil.copy(os.path.join(root, 'imagesTr', f'{case_id}.nii.gz'), images)
    shutil.copy(os.path.join(root, 'labelsTr', f'{case_id}.nii.gz'), refs)
  apply.predict_files(workdir, str(images), str(tmp_path / 'pred'))
  summary = scoring.score_folders(str(tmp_path / 'pred'), str(refs), str(tmp_path / 'scores'), 3)
  assert summary['cases'] == len(split['val'])
  for case_id in split['val']:
    pred = nib.load(tmp_path / 'pred' / f'{case_id}.nii.gz')
    ref = nib.load(refs / f'{case_id}.nii.gz')
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5)
    p, r = np.asarray(pred.dataobj), np.asarray(ref.dataobj)
    ours = results['val']['per_case'][case_id]['head']['dice']
    denominator = np.sum(p == 1) + np.sum(r == 1)
    independent = 2 * np.sum((p == 1) & (r == 1)) / denominator
    assert ours == pytest.approx(independent)
  # Figures of the best and worst validation cases.
  assert sorted(os.listdir(os.path.join(workdir, 'plots'))) == [
      'learning_curves.png', 'overlay_val_best.png', 'overlay_val_worst.png']
  # Grad-CAM of each predicted region, on each input's own (non-RAS, anisotropic) grid.
  case_id = split['val'][0]
  from medjax import cli
  assert cli.main(['explain', '--workdir', workdir, '--input', str(images / f'{case_id}.nii.gz'),
                   '--output', str(tmp_path / 'explain')]) == 0
  source = nib.load(images / f'{case_id}.nii.gz')
  for name in ('head', 'tail'):
    cam = nib.load(tmp_path / 'explain' / f'{case_id}_gradcam_{name}.nii.gz')
    assert cam.shape == source.shape
    np.testing.assert_allclose(cam.affine, source.affine, atol=1e-5)
    values = np.asarray(cam.dataobj)
    assert values.min() >= 0 and values.max() <= 1 + 1e-6
  assert (tmp_path / 'explain' / f'{case_id}.png').exists()
  # The report: a row per foreground class, Dice as in results.json.
  from medjax import report
  page = open(report.write_report(workdir)).read()
  assert f"mean foreground Dice {results['val']['dice']:.4f}" in page
  assert f"<td>head</td><td>{results['val']['dice_head']:.4f}</td>" in page


@pytest.mark.slow
def test_isbi_2d_config_runs_with_membrane_as_class_1(tmp_path):
  shared_file('isbi2012_em_membrane', 'train', 'label', '0.png')
  c = config_lib.load_config_file('configs/isbi2012_unet2d.py:runlocal')
  config_lib.apply_overrides(c, [f'data.cache_dir={tmp_path / "cache"}'])
  results = train_lib.train_and_evaluate(c, str(tmp_path / 'run'))
  assert 'dice_membrane' in results['val']
  exp = train_lib.make_experiment(c)
  case_id = exp.data.splits['train'][0]
  _, label, _ = exp.cases[case_id]
  raw = np.asarray(__import__('PIL.Image', fromlist=['Image']).open(
      exp.data.prepared.records[case_id]['label']))
  np.testing.assert_array_equal(np.asarray(label) == 1, raw == 0)  # membrane (stored 0) = 1
  # 2D segmenters: Grad-CAM of the predicted membrane on the image's own pixel grid, and the
  # best/worst overlays from PNG images.
  from medjax import cli
  image_path = exp.data.prepared.records[case_id]['image']
  assert cli.main(['explain', '--workdir', str(tmp_path / 'run'), '--input', image_path,
                   '--output', str(tmp_path / 'explain')]) == 0
  cam = np.load(tmp_path / 'explain' / f'{case_id}_gradcam_membrane.npy')
  assert cam.shape == raw.shape[:2] and 0 <= cam.min() and cam.max() <= 1
  assert (tmp_path / 'run' / 'plots' / 'overlay_val_worst.png').exists()


def test_label_values_map_and_reject_unlisted_values(tmp_path):
  from medjax.data import nifti
  labels = np.array([[0, 4], [2, 1]])
  np.testing.assert_array_equal(nifti.map_label_values(labels, (0, 1, 2, 4), 'x.nii.gz'),
                                [[0, 3], [2, 1]])
  with pytest.raises(nifti.VolumeError, match=r'x.nii.gz: label values \[4\] are not in'):
    nifti.map_label_values(labels, (0, 1, 2), 'x.nii.gz')


def test_auto_patch_size_and_normalisation_from_the_fingerprint(tmp_path):
  from medjax.data import synthetic
  root = synthetic.write_segmentation_dataset(str(tmp_path / 'data'), num_cases=4, seed=1,
                                              shape=(30, 36, 22), oblique=False)
  meta = json.load(open(os.path.join(root, 'dataset.json')))
  meta['modality'] = {'0': 'CT'}
  json.dump(meta, open(os.path.join(root, 'dataset.json'), 'w'))
  c = config_lib.load_config_file('configs/hippocampus_unet3d.py:runlocal')
  config_lib.apply_overrides(c, [f'data.root={root}', f'data.cache_dir={tmp_path / "cache"}',
                                 'data.patch_size=()', 'data.normalization=auto',
                                 'data.crop_nonzero=False', 'data.num_folds=2'])
  exp = train_lib.make_experiment(c)
  # Median shape (30, 36, 22) rounded up to the total stride 2 of the runlocal U-Net.
  assert exp.patch_size == (30, 36, 22)
  options = exp.data.prepared.resolved_options()
  fingerprint = exp.data.prepared.fingerprint
  assert options.normalization == 'ct'
  assert options.ct_window == pytest.approx((fingerprint['foreground_intensity_p00_5'],
                                             fingerprint['foreground_intensity_p99_5']))
  image, _, _ = exp.cases[exp.data.splits['train'][0]]
  assert 0.0 <= float(np.min(image)) and float(np.max(image)) <= 1.0  # windowed to [0, 1]
