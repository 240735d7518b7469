"""TFDS builders: tfds.load on local MSD and 2D image folders equals direct reading."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

tfds = pytest.importorskip('tensorflow_datasets')

from conftest import shared_file  # noqa: E402
from medjax.data import layouts, nifti, tfds_builders  # noqa: E402,F401  (registers builders)


def _load(name, manual_dir, data_dir):
  return tfds.load(name, split='train', data_dir=str(data_dir),
                   download_and_prepare_kwargs={'download_config': tfds.download.DownloadConfig(
                       manual_dir=str(manual_dir))})


def test_msd_builder_matches_nibabel_in_ras(tmp_path):
  root = tmp_path / 'msd'
  (root / 'imagesTr').mkdir(parents=True)
  (root / 'labelsTr').mkdir()
  meta = json.load(open(shared_file('msd_hippocampus', 'dataset.json')))
  meta['training'] = meta['training'][:3]
  affine = np.eye(4)
  affine[:3, :3] = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]]) @ np.diag([0.9, 1.0, 1.2])
  for entry in meta['training']:  # stored in another orientation: the builder must fix it
    for key in ('image', 'label'):
      data = np.asarray(nib.load(shared_file('msd_hippocampus', entry[key])).dataobj)
      nib.save(nib.Nifti1Image(data, affine), root / entry[key])
  (root / 'dataset.json').write_text(json.dumps(meta))
  examples = {ex['case_id'].decode(): ex for ex in tfds.as_numpy(
      _load('medjax_msd', root, tmp_path / 'tfds'))}
  assert len(examples) == 3
  for entry in meta['training']:
    case_id = entry['image'].split('/')[-1][:-len('.nii.gz')]
    ex = examples[case_id]
    expected = nifti.to_canonical(nifti.read_volume(str(root / entry['image'])))
    np.testing.assert_array_equal(ex['image'][..., 0], expected.array)
    np.testing.assert_allclose(ex['affine'], expected.affine)
    np.testing.assert_allclose(ex['original_affine'], affine, atol=1e-6)
    assert nib.aff2axcodes(ex['affine']) == ('R', 'A', 'S')
    np.testing.assert_allclose(ex['spacing_mm'], expected.spacing, rtol=1e-6)
    assert set(np.unique(ex['label'])) <= {0, 1, 2}


def test_image_folder_builder_on_isbi(tmp_path):
  src = shared_file('isbi2012_em_membrane', 'train')
  root = tmp_path / 'isbi'
  (root / 'image').mkdir(parents=True)
  (root / 'label').mkdir()
  for name in ('0.png', '1.png', '2.png'):
    shutil.copy(f'{src}/image/{name}', root / 'image' / name)
    shutil.copy(f'{src}/label/{name}', root / 'label' / name)
  examples = list(tfds.as_numpy(_load('medjax_image_folder', root, tmp_path / 'tfds')))
  assert len(examples) == 3
  for ex in examples:
    name = ex['case_id'].decode() + '.png'
    np.testing.assert_array_equal(ex['image'], layouts.read_image_2d(str(root / 'image' / name)))
    assert ex['label'].shape == (512, 512) and set(np.unique(ex['label'])) == {0, 1}
    assert 0.15 < 1 - ex['label'].mean() < 0.3  # membrane (stored as 0) ~22% of pixels
