"""TensorFlow-Datasets builders for local segmentation datasets (``manual_dir`` layouts).

  import medjax.data.tfds_builders  # registers the builders
  ds = tfds.load('medjax_msd', split='train', data_dir=DATA_DIR,
                 download_and_prepare_kwargs={'download_config':
                     tfds.download.DownloadConfig(manual_dir='/data/Task04_Hippocampus')})

* ``medjax_msd``: a Medical Segmentation Decathlon folder (``dataset.json``). Each example
  is one case, validated and reoriented to RAS (flips and permutations only, intensities as
  stored): ``image [X, Y, Z, 1]`` float32, ``label [X, Y, Z]`` uint8, ``affine`` (RAS grid,
  voxel -> mm), ``original_affine`` (the file's), ``spacing_mm``, ``case_id``.
* ``medjax_image_folder``: 2D image/label pairs (``images/`` + ``labels/`` and the other
  layouts of :mod:`medjax.data.layouts`): ``image [H, W, C]`` float32, ``label [H, W]``
  uint8 (binary {0, 255} masks become {0, 1}), ``case_id``.

Every case is checked while building; a bad file stops the build with its name and problem.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from medjax.data import layouts, nifti


def _manual_root(dl_manager) -> str:
  root = str(dl_manager.manual_dir)
  if not root:
    raise ValueError('set download_config.manual_dir to the dataset folder')
  return root


class MedjaxMsd(tfds.core.GeneratorBasedBuilder):
  """A Medical Segmentation Decathlon task folder, reoriented to RAS."""

  VERSION = tfds.core.Version('1.0.0')
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'manual_dir: a folder with dataset.json, imagesTr/, labelsTr/'

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'case_id': tfds.features.Text(),
        'image': tfds.features.Tensor(shape=(None, None, None, 1), dtype=np.float32,
                                      encoding='bytes'),
        'label': tfds.features.Tensor(shape=(None, None, None), dtype=np.uint8,
                                      encoding='bytes'),
        'affine': tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
        'original_affine': tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
        'spacing_mm': tfds.features.Tensor(shape=(3,), dtype=np.float32,
                                      encoding='bytes'),
    }))

  def _split_generators(self, dl_manager):
    info = layouts.find_cases(_manual_root(dl_manager))
    if info.spatial_dims != 3:
      raise ValueError(f'{info.root}: medjax_msd needs NIfTI volumes; use medjax_image_folder')
    return {'train': self._generate_examples(info)}

  def _generate_examples(self, info: layouts.DatasetInfo):
    num_classes = len(info.class_names) if info.class_names else None
    for case in info.cases:
      if case.label is None:
        raise nifti.VolumeError(f'{case.image}: no label file for case {case.case_id}')
      image = nifti.to_canonical(nifti.read_volume(case.image, 'image'))
      label = nifti.to_canonical(nifti.read_volume(case.label, 'label', num_classes))
      nifti.check_pair(image, label)
      yield case.case_id, {
          'case_id': case.case_id, 'image': image.array[..., None],
          'label': label.array.astype(np.uint8), 'affine': image.affine,
          'original_affine': image.original_affine,
          'spacing_mm': np.asarray(image.spacing, np.float32)}


class MedjaxImageFolder(tfds.core.GeneratorBasedBuilder):
  """2D images with label masks, matched by file name."""

  VERSION = tfds.core.Version('1.0.0')
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'manual_dir: a folder with images/ and labels/ (or masks/)'

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'case_id': tfds.features.Text(),
        'image': tfds.features.Tensor(shape=(None, None, None), dtype=np.float32,
                                      encoding='bytes'),
        'label': tfds.features.Tensor(shape=(None, None), dtype=np.uint8,
                                      encoding='bytes'),
    }))

  def _split_generators(self, dl_manager):
    info = layouts.find_cases(_manual_root(dl_manager))
    if info.spatial_dims != 2:
      raise ValueError(f'{info.root}: medjax_image_folder needs 2D images; use medjax_msd')
    return {'train': self._generate_examples(info)}

  def _generate_examples(self, info: layouts.DatasetInfo):
    for case in info.cases:
      if case.label is None:
        raise nifti.VolumeError(f'{case.image}: no label file for case {case.case_id}')
      image, label = layouts.read_pair_2d(case)
      yield case.case_id, {'case_id': case.case_id, 'image': image,
                           'label': label.astype(np.uint8)}
