"""Config merging, overrides and the errors a typo must produce."""

import subprocess
import sys

import pytest

from medjax import config as config_lib
from medjax.cli import _split_overrides


def test_overrides_are_typed():
  c = config_lib.load_config_file('configs/quickstart.py')
  config_lib.apply_overrides(c, ['optimizer.learning_rate=0.01', 'train.num_epochs=3',
                                 'data.augment.flip_lr=false', 'data.flag=123',
                                 'optimizer.milestones_epochs=(5,8)'])
  assert c.optimizer.learning_rate == 0.01 and isinstance(c.train.num_epochs, int)
  assert c.data.augment.flip_lr is False
  assert c.data.flag == '123'
  assert c.optimizer.milestones_epochs == (5, 8)


def test_unknown_override_key_names_key_and_suggests():
  c = config_lib.default_config()
  with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'optimizer\.learnig_rate'"
                     r" \(did you mean 'learning_rate'\?\)"):
    config_lib.apply_overrides(c, ['optimizer.learnig_rate=0.1'])
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'trian'"):
    config_lib.apply_overrides(c, ['trian.num_epochs=1'])


def test_wrong_types_rejected():
  c = config_lib.default_config()
  with pytest.raises(config_lib.ConfigError, match="'train.num_epochs' expects an integer"):
    config_lib.apply_overrides(c, ['train.num_epochs=2.5'])
  with pytest.raises(config_lib.ConfigError, match="'train.progress_bar' expects true/false"):
    config_lib.apply_overrides(c, ['train.progress_bar=3'])


def test_unknown_key_in_config_file_names_the_file(tmp_path):
  path = tmp_path / 'bad.py'
  path.write_text('def get_config():\n  return {"optimizer": {"lr": 0.1}}\n')
  with pytest.raises(config_lib.ConfigError, match=r"bad\.py: unknown config key 'optimizer\.lr'"):
    config_lib.load_config_file(str(path))
  with pytest.raises(config_lib.ConfigError, match='config file not found'):
    config_lib.load_config_file(str(tmp_path / 'missing.py'))


def test_json_round_trip(tmp_path):
  from medjax import workdir
  c = config_lib.load_config_file('configs/breastmnist.py')
  workdir.write_json(str(tmp_path / 'config.json'), c.to_dict())  # as training saves it
  assert config_lib.from_json_file(str(tmp_path / 'config.json')) == c
  assert workdir.read_config(str(tmp_path)) == c


def test_cli_override_parsing():
  rest, overrides = _split_overrides(['train', '--config', 'x.py', '--config.seed=3',
                                      '--config.train.num_epochs', '4', '--workdir', 'w'])
  assert rest == ['train', '--config', 'x.py', '--workdir', 'w']
  assert overrides == ['seed=3', 'train.num_epochs=4']


def test_cli_unknown_key_exits_2_with_message(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'medjax.cli', 'train', '--config', 'configs/quickstart.py',
       '--workdir', str(tmp_path), '--config.train.num_epoch=1'],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "unknown config key 'train.num_epoch' (did you mean 'num_epochs'?)" in proc.stderr


def test_config_variants_are_one_helper_and_unknown_ones_name_the_file():
  local = config_lib.load_config_file('configs/isbi2012_unet2d.py:runlocal')
  cpu = config_lib.load_config_file('configs/isbi2012_unet2d.py:cpu')
  full = config_lib.load_config_file('configs/isbi2012_unet2d.py')
  assert (local.train.num_epochs, cpu.train.num_epochs, full.train.num_epochs) == (2, 16, 100)
  assert tuple(cpu.data.patch_size) == (128, 128)
  with pytest.raises(config_lib.ConfigError,
                     match=r"configs/quickstart.py: unknown config argument 'cpu'; this config "
                           r"has runlocal \(or none\)"):
    config_lib.load_config_file('configs/quickstart.py:cpu')
  edited = config_lib.apply_variant(config_lib.default_config(), 'small',
                                    small=lambda c: c.train.update(num_epochs=1))
  assert edited.train.num_epochs == 1
  assert config_lib.apply_variant(config_lib.default_config(), '').train.num_epochs == 10


def test_medmnist_cpu_variants_are_the_small_cnn_recipe_and_leave_the_paper_recipe_alone():
  few_labels = config_lib.load_config_file('configs/few_labels.py:breastmnist').to_dict()
  for dataset, is_3d in (('breastmnist', False), ('pneumoniamnist', False),
                         ('adrenalmnist3d', True)):
    paper = config_lib.load_config_file(f'configs/{dataset}.py')
    cpu = config_lib.load_config_file(f'configs/{dataset}.py:cpu')
    assert (paper.model.name, paper.optimizer.schedule) == ('resnet18', 'multistep')
    assert (cpu.model.name, cpu.optimizer.schedule) == ('simple_cnn', 'cosine')
    assert cpu.data.flag == dataset and cpu.data.path == paper.data.path
    # Nothing of the ResNet recipe is left (the model section takes the model's own kwargs).
    assert 'stem' in paper.model and 'stem' not in cpu.model
    # 3D: flips only (the pipeline's rotation and scaling are 2D-only).
    assert cpu.data.augment.rotation_deg == (0.0 if is_3d else 10.0)
    assert cpu.data.augment.flip_ud == is_3d
  # BreastMNIST's :cpu is configs/few_labels.py's recipe with a third stage and 60 epochs.
  cpu = config_lib.load_config_file('configs/breastmnist.py:cpu').to_dict()
  assert cpu['model'].pop('features') == (32, 64, 128)
  assert few_labels['model'].pop('features') == (32, 64)
  assert cpu['train'].pop('num_epochs') == 60 and few_labels['train'].pop('num_epochs') == 30
  for section in ('data', 'model', 'optimizer', 'train'):
    assert cpu[section] == few_labels[section], section
