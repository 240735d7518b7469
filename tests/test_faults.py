"""Faults a user makes with inputs, downloads and the prepared-data cache: each is refused with
an error naming the file and the problem, or handled without damaging anything."""

import gzip
import hashlib
import json
import os
import subprocess
import sys
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import fake_medmnist
from medjax.data import layouts, medmnist, nifti, prepare, synthetic


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


# ----- dataset layouts ---------------------------------------------------------------------
def test_dataset_json_paths_must_stay_inside_the_dataset(tmp_path):
  root = synthetic.write_segmentation_dataset(str(tmp_path / 'msd'), num_cases=2,
                                              shape=(8, 8, 6))
  meta_path = os.path.join(root, 'dataset.json')
  meta = json.load(open(meta_path))
  assert len(layouts.find_cases(root).cases) == 2
  for bad in ('../../etc/passwd', '/etc/passwd', './imagesTr/../../outside.nii.gz'):
    meta['training'][1]['label'] = bad
    json.dump(meta, open(meta_path, 'w'))
    with pytest.raises(ValueError) as error:
      layouts.find_cases(root)
    assert str(error.value) == (f"{meta_path}: training[1]: label path '{bad}' points outside "
                                f'the dataset folder {root}; paths must be relative and inside it')
  meta['training'][1]['label'] = 42
  json.dump(meta, open(meta_path, 'w'))
  with pytest.raises(ValueError, match=r"training\[1\]: expected \{'image': path"):
    layouts.find_cases(root)


def test_two_files_with_one_case_id_are_refused(tmp_path):
  root = synthetic.write_segmentation_dataset(str(tmp_path / 'msd'), num_cases=2,
                                              shape=(8, 8, 6))
  meta_path = os.path.join(root, 'dataset.json')
  meta = json.load(open(meta_path))
  os.makedirs(os.path.join(root, 'more'))
  os.rename(os.path.join(root, 'imagesTr', 'synthetic_001.nii.gz'),
            os.path.join(root, 'more', 'synthetic_000.nii.gz'))
  meta['training'][1]['image'] = './more/synthetic_000.nii.gz'
  json.dump(meta, open(meta_path, 'w'))
  with pytest.raises(ValueError, match=r"1 case id\(s\) used by more than one image") as error:
    layouts.find_cases(root)
  assert (f"case id 'synthetic_000': {root}/imagesTr/synthetic_000.nii.gz and "
          f'{root}/more/synthetic_000.nii.gz') in str(error.value)
  # Folder layout: a.png beside a.tif would be one case.
  folder = tmp_path / 'folder'
  for sub in ('images', 'labels'):
    (folder / sub).mkdir(parents=True)
  for name in ('a.png', 'a.tif', 'b.png'):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / 'images' / name)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / 'labels' / name)
  with pytest.raises(ValueError, match=r"case id 'a': .*a\.png and .*a\.tif"):
    layouts.find_cases(str(folder))


def test_mixed_channel_counts_are_refused_by_data_check_and_at_load(tmp_path):
  folder = tmp_path / 'folder'
  for sub in ('images', 'labels'):
    (folder / sub).mkdir(parents=True)
  rng = np.random.default_rng(0)
  for name, shape in (('a', (16, 16)), ('b', (16, 16, 3)), ('c', (16, 16))):
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(
        folder / 'images' / f'{name}.png')
    Image.fromarray((rng.random((16, 16)) > 0.5).astype(np.uint8) * 255).save(
        folder / 'labels' / f'{name}.png')
  report = layouts.check_dataset(str(folder))
  assert report['problems'] == [f"{folder}/images/b.png: 3 channel(s), but 2 of 3 cases have 1; "
                                'convert the files so that all cases agree']
  proc = subprocess.run([sys.executable, '-m', 'medjax.cli', 'data', 'check', str(folder)],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and 'b.png: 3 channel(s)' in proc.stdout
  with pytest.raises(ValueError, match=r'b\.png: 3 channel\(s\)'):
    prepare.prepare(str(folder), str(tmp_path / 'cache'))


# ----- NIfTI headers -----------------------------------------------------------------------
def test_nifti_header_claiming_more_data_than_the_file_holds(tmp_path):
  """A 100-byte file whose header claims 768 MiB is refused before anything is allocated."""
  header = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)).header
  header.set_data_shape((512, 512, 768))
  header['vox_offset'] = 352
  raw = header.binaryblock + b'\0' * 4 + b'x' * 100
  plain, packed = tmp_path / 'huge.nii', tmp_path / 'huge.nii.gz'
  plain.write_bytes(raw)
  packed.write_bytes(gzip.compress(raw))
  for path, problem in ((plain, 'but the file has 452 bytes'),
                        (packed, 'more than a')):
    tracemalloc.start()
    with pytest.raises(nifti.VolumeError) as error:
      nifti.read_volume(str(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(error.value).startswith(f'{path}: corrupt or truncated NIfTI: the header claims '
                                       'shape (512, 512, 768) (805,306,368 bytes')
    assert problem in str(error.value)
    assert peak < 8 * 2**20
  # A legitimate, highly compressible volume passes the gzip bound.
  zeros = tmp_path / 'zeros.nii.gz'
  nib.save(nib.Nifti1Image(np.zeros((128, 128, 64), np.float32), np.eye(4)), str(zeros))
  assert os.path.getsize(zeros) * nifti.MAX_DEFLATE_RATIO > 128 * 128 * 64 * 4
  assert nifti.read_volume(str(zeros)).array.shape == (128, 128, 64)


# ----- MedMNIST files and downloads --------------------------------------------------------
def test_float_labels_in_a_medmnist_file_are_refused_unless_whole(tmp_path):
  path = fake_medmnist(tmp_path / 'breastmnist.npz', (28, 28), 2)
  arrays = dict(np.load(path))
  reference = medmnist.load(path)
  arrays['val_labels'] = arrays['val_labels'].astype(np.float32)
  np.savez(path, **arrays)
  whole = medmnist.load(path)  # 0.0 / 1.0 are labels
  np.testing.assert_array_equal(whole.splits['val'][1], reference.splits['val'][1])
  arrays['val_labels'][3, 0] = 0.7
  np.savez(path, **arrays)
  with pytest.raises(ValueError) as error:
    medmnist.load(path)
  assert str(error.value) == (f"{path}: 'val_labels' has non-integer values (1 of 40, e.g. 0.7 at "
                              "index [3, 0]); labels must be class indices")
  arrays['val_labels'][3, 0] = np.nan
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match="'val_labels' contains NaN"):
    medmnist.load(path)
  arrays['val_labels'] = np.full((40, 1), 2**32, np.int64)
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match="'val_labels' has values beyond int32"):
    medmnist.load(path)  # would wrap to 0 (a valid label) in int32


def test_killed_download_part_is_removed_and_an_existing_target_is_md5_checked(tmp_path,
                                                                             monkeypatch):
  source = fake_medmnist(tmp_path / 'source.npz', (28, 28), 2)
  md5 = hashlib.md5(open(source, 'rb').read()).hexdigest()
  monkeypatch.setitem(medmnist.INFO, 'breastmnist',
                      medmnist.INFO['breastmnist']._replace(md5=md5))
  dest = tmp_path / 'dl'
  dest.mkdir()
  stale = dest / f'breastmnist.npz.part-{_dead_pid()}'
  stale.write_bytes(b'half a download')
  live = dest / f'breastmnist.npz.part-{os.getppid()}'  # a download still running
  live.write_bytes(b'in progress')
  path = medmnist.download('breastmnist', str(dest), url='file://' + source)
  assert sorted(os.listdir(dest)) == sorted(['breastmnist.npz', live.name])
  assert medmnist.md5sum(path) == md5
  # With downloads on, a file already at the target is checked, not trusted.
  (dest / 'breastmnist.npz').write_bytes(b'something else')
  with pytest.raises(ValueError) as error:
    medmnist.resolve_path(str(dest), 'breastmnist', allow_download=True)
  assert str(error.value).startswith(f"{dest}/breastmnist.npz: MD5 "
                                     f"{hashlib.md5(b'something else').hexdigest()} differs from "
                                     'the official breastmnist.npz')
  assert 'delete it to download again' in str(error.value)
  # Without downloads the user's file is used as it is.
  assert medmnist.resolve_path(str(dest), 'breastmnist', False) == str(dest / 'breastmnist.npz')


# ----- the prepared-data cache -------------------------------------------------------------
def _entries(cache):
  return sorted(os.listdir(cache))


def test_prepared_cache_is_keyed_by_the_data_and_never_rewritten(tmp_path):
  cache = str(tmp_path / 'cache')
  root_a = synthetic.write_segmentation_dataset(str(tmp_path / 'a'), num_cases=3,
                                                shape=(12, 12, 8), seed=1)
  root_b = synthetic.write_segmentation_dataset(str(tmp_path / 'b'), num_cases=3,
                                                shape=(12, 12, 8), seed=2)
  first = prepare.prepare(root_a, cache)
  image_a, label_a, _ = first.load('synthetic_000')  # memory-mapped, as a trainer holds them
  label_before = np.array(label_a)
  files_before = {name: open(os.path.join(first.directory, 'cases', name), 'rb').read()
                  for name in os.listdir(os.path.join(first.directory, 'cases'))}
  manifest_time = os.stat(os.path.join(first.directory, 'manifest.json')).st_mtime_ns
  # Same data, same options: the same entry, not prepared again.
  again = prepare.prepare(root_a, cache)
  assert again.directory == first.directory
  assert os.stat(os.path.join(first.directory, 'manifest.json')).st_mtime_ns == manifest_time
  # Another dataset with the same options: its own entry beside the first.
  other = prepare.prepare(root_b, cache)
  assert other.directory != first.directory and len(_entries(cache)) == 2
  _, label_b, _ = other.load('synthetic_000')
  assert not np.array_equal(np.asarray(label_b), label_before)
  # Edited labels: picked up, in a new entry; the old entry is left exactly as it was.
  label_path = os.path.join(root_a, 'labelsTr', 'synthetic_000.nii.gz')
  volume = nib.load(label_path)
  edited = np.zeros(volume.shape, np.uint8)
  nib.save(nib.Nifti1Image(edited, volume.affine), label_path)
  changed = prepare.prepare(root_a, cache)
  assert changed.directory not in (first.directory, other.directory)
  assert len(_entries(cache)) == 3
  assert not np.asarray(changed.load('synthetic_000')[1]).any()
  np.testing.assert_array_equal(np.asarray(label_a), label_before)
  for name, data in files_before.items():
    assert open(os.path.join(first.directory, 'cases', name), 'rb').read() == data
  del image_a, label_a


def test_interrupted_preparation_leaves_no_entry(tmp_path, monkeypatch):
  cache = tmp_path / 'cache'
  root = synthetic.write_segmentation_dataset(str(tmp_path / 'a'), num_cases=3,
                                              shape=(12, 12, 8))
  calls = []
  original = prepare._prepare_case

  def fail_on_third(*args):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt  # as a Ctrl-C mid-way
    return original(*args)
  monkeypatch.setattr(prepare, '_prepare_case', fail_on_third)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(root, str(cache))
  assert _entries(cache) == []  # neither a half entry nor its staging folder
  monkeypatch.setattr(prepare, '_prepare_case', original)
  # A writer killed with SIGKILL leaves its staging folder: the next preparation removes it.
  abandoned = cache / f'0123456789ab-0123456789ab.tmp-{_dead_pid()}'
  (abandoned / 'cases').mkdir(parents=True)
  prepared = prepare.prepare(root, str(cache))
  assert _entries(cache) == [os.path.basename(prepared.directory)]
  assert len(prepared.case_ids) == 3


# ----- SIGKILL at any moment ---------------------------------------------------------------
@pytest.mark.slow
def test_killed_inside_a_checkpoint_write_and_at_random_resumes_to_identical_results(
    tmp_path, quickstart_run):
  """benchmarks/fault_injection.py with two kills (N=20 by hand: see the script): one inside
  a checkpoint write, one at a random moment; the finished workdir equals an uninterrupted
  run's (results.json without run_info, every metrics record but throughput)."""
  import random
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))
  import fault_injection
  workdir = str(tmp_path / 'killed')
  command = fault_injection.train_command('configs/quickstart.py:runlocal', workdir, [])
  reference_s = 10 + json.load(open(os.path.join(quickstart_run, 'results.json')))[
      'run_info']['wall_time_s']
  attempts = fault_injection.trial(command, workdir, 2, reference_s, random.Random(1),
                                   first_kind=1)
  assert attempts[0]['kind'] == 'checkpoint' and attempts[0]['killed'], attempts
  assert attempts[-1]['returncode'] == 0 and not attempts[-1]['killed'], attempts
  assert fault_injection.comparable(workdir) == fault_injection.comparable(quickstart_run)
