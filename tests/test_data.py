"""MedMNIST loading (real files, RGB/3D/multi-label variants, bad files), download with MD5,
and the synthetic dataset."""

import hashlib
import os

import numpy as np
import pytest

from conftest import shared_file
from medjax.data import medmnist, synthetic


def _write_npz(path, n=(10, 4, 4), shape=(28, 28), label_width=1, num_classes=2, seed=0,
               **overrides):
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, count in zip(('train', 'val', 'test'), n):
    arrays[f'{split}_images'] = rng.integers(0, 256, (count,) + shape, dtype=np.uint8)
    arrays[f'{split}_labels'] = rng.integers(0, num_classes, (count, label_width),
                                             dtype=np.uint8)
  arrays.update(overrides)
  np.savez(path, **arrays)
  return str(path)


def test_real_breastmnist():
  data = medmnist.load(shared_file('medmnist', 'breastmnist.npz'))
  assert data.task == 'binary' and data.num_classes == 2
  assert data.class_names == ['malignant', 'normal, benign']
  assert data.image_shape == (28, 28, 1)
  assert {s: len(y) for s, (x, y) in data.splits.items()} == {'train': 546, 'val': 78,
                                                               'test': 156}
  assert np.bincount(data.splits['train'][1]).tolist() == [147, 399]


def test_real_adrenalmnist3d_is_3d():
  data = medmnist.load(shared_file('medmnist', 'adrenalmnist3d.npz'))
  assert data.image_shape == (28, 28, 28, 1) and data.spatial_dims == 3


def test_unseen_layouts_rgb_multiclass_3d64_multilabel(tmp_path):
  rgb = medmnist.load(_write_npz(tmp_path / 'dermamnist.npz', shape=(28, 28, 3),
                                 num_classes=7))
  assert rgb.task == 'multiclass' and rgb.num_classes == 7 and rgb.image_shape == (28, 28, 3)
  big3d = medmnist.load(_write_npz(tmp_path / 'fracturemnist3d_64.npz', shape=(64, 64, 64),
                                   num_classes=3))
  assert big3d.image_shape == (64, 64, 64, 1) and big3d.num_classes == 3
  ml = medmnist.load(_write_npz(tmp_path / 'chestmnist.npz', label_width=14))
  assert ml.task == 'multilabel' and ml.splits['train'][1].shape == (10, 14)
  # Not in MedMNIST's table: inferred from the labels.
  unknown = medmnist.load(_write_npz(tmp_path / 'mystery.npz', shape=(32, 32, 3),
                                     num_classes=4, seed=1))
  assert unknown.task == 'multiclass' and unknown.image_shape == (32, 32, 3)


def test_missing_file_and_wrong_keys_and_corrupt(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothere.npz'):
    medmnist.load(str(tmp_path / 'nothere.npz'))
  bad = tmp_path / 'breastmnist.npz'
  np.savez(bad, x_train=np.zeros(3), y_train=np.zeros(3))
  with pytest.raises(ValueError, match=r"breastmnist\.npz: not a MedMNIST npz; missing keys"):
    medmnist.load(str(bad))
  corrupt = tmp_path / 'corrupt.npz'
  corrupt.write_bytes(b'PK\x03\x04 this is not a zip file')
  with pytest.raises(ValueError, match=r'corrupt\.npz: cannot read as \.npz'):
    medmnist.load(str(corrupt))


def test_labels_out_of_range_and_shape_mismatch(tmp_path):
  path = _write_npz(tmp_path / 'breastmnist.npz',
                    val_labels=np.array([[0], [1], [5], [1]], np.uint8))
  with pytest.raises(ValueError, match=r"breastmnist\.npz: split 'val' has 1 labels outside"):
    medmnist.load(path)
  path = _write_npz(tmp_path / 'pneumoniamnist.npz', shape=(28, 28, 3))
  with pytest.raises(ValueError, match='do not match a 2D dataset with 1 channel'):
    medmnist.load(path)


def test_download_checks_md5_and_leaves_no_partial_file(tmp_path, monkeypatch):
  source = _write_npz(tmp_path / 'source.npz')
  url = 'file://' + source
  dest = tmp_path / 'dl'
  with pytest.raises(IOError, match='MD5 mismatch'):
    medmnist.download('breastmnist', str(dest), url=url)
  assert os.listdir(dest) == []  # no half-written or unverified file left behind
  md5 = hashlib.md5(open(source, 'rb').read()).hexdigest()
  monkeypatch.setitem(medmnist.INFO, 'breastmnist',
                      medmnist.INFO['breastmnist']._replace(md5=md5))
  path = medmnist.download('breastmnist', str(dest), url=url)
  assert path == str(dest / 'breastmnist.npz') and medmnist.md5sum(path) == md5
  with pytest.raises(ValueError, match="no known download for MedMNIST flag 'pathmnist_64'"):
    medmnist.download('pathmnist_64', str(dest))


def test_resolve_path_without_download_explains(tmp_path):
  with pytest.raises(FileNotFoundError, match='data.download=True'):
    medmnist.resolve_path(str(tmp_path), 'breastmnist', allow_download=False)


def test_synthetic_is_deterministic_and_learnable_shape():
  a = synthetic.load(seed=7, num_train=50, num_val=10, num_test=10)
  b = synthetic.load(seed=7, num_train=50, num_val=10, num_test=10)
  c = synthetic.load(seed=8, num_train=50, num_val=10, num_test=10)
  for split in ('train', 'val', 'test'):
    np.testing.assert_array_equal(a.splits[split][0], b.splits[split][0])
    np.testing.assert_array_equal(a.splits[split][1], b.splits[split][1])
  assert not np.array_equal(a.splits['train'][0], c.splits['train'][0])
  assert a.image_shape == (32, 32, 1) and a.splits['train'][0].dtype == np.uint8
  # Lesions are brighter than tissue: class means differ in the expected order.
  big = synthetic.load(seed=0, num_train=600, num_val=10, num_test=10)
  x, y = big.splits['train']
  bright = x.reshape(len(x), -1).astype(float)
  top = np.sort(bright, axis=1)[:, -60:].mean(axis=1)
  assert top[y == 0].mean() < top[y == 1].mean()
  binary = synthetic.load(seed=0, num_train=40, num_val=10, num_test=10, num_classes=2)
  assert binary.task == 'binary' and set(np.unique(binary.splits['train'][1])) <= {0, 1}
