"""Several seeds in one compiled program (``train.seeds``, :mod:`medjax.seeds`)."""

import json
import os
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import results_without_run_info
from medjax import cli, config as config_lib, report, train as train_lib


def _config(**overrides):
  c = config_lib.load_config_file('configs/quickstart.py:runlocal')
  config_lib.apply_overrides(c, [f'{k}={v}' for k, v in overrides.items()])
  return c


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k != 'images_per_sec'} for line in f]


def test_group_pieces_without_training():
  """The group's building blocks, quickly: a member's config is the single-run config of its
  seed; stacking trees on a seed axis and slicing them back is a round trip; the unrolled
  step gives each seed what the step alone gives it."""
  import jax
  import jax.numpy as jnp

  from medjax import seeds
  c = _config(**{'train.seeds': (3, 5)})
  assert seeds.check_seeds(c) == [3, 5]
  member = seeds.member_config(c, 5)
  assert member.seed == 5 and tuple(member.train.seeds) == () and c.train.seeds == (3, 5)
  assert seeds.seed_workdir('runs/g', 5) == os.path.join('runs/g', 'seed_5')
  rng = np.random.default_rng(0)
  trees = [{'w': jnp.asarray(rng.normal(size=(2, 3)), jnp.float32), 'n': jnp.int32(k)}
           for k in range(3)]
  stacked = seeds.stack_trees(trees)
  assert stacked['w'].shape == (3, 2, 3) and stacked['n'].shape == (3,)
  for k in range(3):
    jax.tree.map(np.testing.assert_array_equal, seeds.member_state(stacked, k), trees[k])

  def step(state, images, labels):
    new = {'w': state['w'] * images.mean() + labels.sum(), 'n': state['n'] + 1}
    return new, {'loss': (state['w'].sum() - labels) ** 2}
  images = jnp.asarray(rng.normal(size=(3, 4, 2)), jnp.float32)
  labels = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  out_state, out_metrics = seeds._unrolled(step, 3, stacked, images, labels)
  for k in range(3):
    alone_state, alone_metrics = step(trees[k], images[k], labels[k])
    jax.tree.map(np.testing.assert_array_equal, seeds.member_state(out_state, k), alone_state)
    np.testing.assert_array_equal(out_metrics['loss'][k], alone_metrics['loss'])
  assert seeds.resolve_program('auto') == ('unroll' if jax.default_backend() == 'cpu'
                                           else 'vmap')
  with pytest.raises(ValueError, match='names a seed twice'):
    seeds.check_seeds(_config(**{'train.seeds': (3, 3)}))
  with pytest.raises(ValueError, match="seeds_program must be one of auto, vmap, unroll"):
    seeds.resolve_program('pmap')


@pytest.fixture(scope='module')
def group(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('group') / 'g'
  summary = train_lib.train_and_evaluate(_config(**{'train.seeds': (0, 1)}), str(workdir))
  return workdir, summary


@pytest.mark.slow
def test_each_seed_equals_its_single_run(group, quickstart_run, tmp_path):
  """Seed K of the group trains as ``seed=K`` alone does (own init, data order,
  augmentation, dropout). The step is the single-run step over a leading seed axis, so the
  difference is rounding only: XLA may order the sums differently inside the one program
  (measured with vmap: losses and metrics equal to 1e-7 relative)."""
  workdir, _ = group
  single1 = str(tmp_path / 'single1')
  train_lib.train_and_evaluate(_config(seed=1), single1)
  for seed, single in ((0, quickstart_run), (1, single1)):
    ours, theirs = _records(workdir / f'seed_{seed}'), _records(single)
    assert [(r['split'], r['step']) for r in ours] == [(r['split'], r['step']) for r in theirs]
    for a, b in zip(ours, theirs):
      for key in ('loss', 'auc', 'accuracy', 'learning_rate'):
        if key in b:
          np.testing.assert_allclose(a[key], b[key], rtol=1e-4, err_msg=f'seed {seed} {key}')
    ours, theirs = (results_without_run_info(workdir / f'seed_{seed}'),
                    results_without_run_info(single))
    assert ours['selected_step'] == theirs['selected_step'] and ours['seed'] == seed
    for split in ('val', 'test'):
      assert ours[split]['auc'] == pytest.approx(theirs[split]['auc'], abs=1e-3)
  # The seeds differ from each other (not one model twice).
  assert _records(workdir / 'seed_0')[0]['loss'] != _records(workdir / 'seed_1')[0]['loss']


@pytest.mark.slow
def test_summary_and_seed_ensemble(group):
  workdir, summary = group
  assert json.loads((workdir / 'summary.json').read_text()) == json.loads(json.dumps(summary))
  results = [json.loads((workdir / f'seed_{s}' / 'results.json').read_text()) for s in (0, 1)]
  auc = [r['test']['auc'] for r in results]
  entry = summary['splits']['test']['auc']
  assert entry['per_seed'] == auc and entry['mean'] == np.mean(auc)
  assert entry['sd'] == pytest.approx(np.std(auc, ddof=1), rel=1e-12)
  scores = [np.load(workdir / f'seed_{s}' / 'predictions_test.npz')['scores'] for s in (0, 1)]
  labels = np.load(workdir / 'seed_0' / 'predictions_test.npz')['labels']
  mean_scores = np.mean(scores, axis=0)
  expected = roc_auc_score(labels, mean_scores, multi_class='ovr', average='macro')
  assert summary['ensemble']['test']['auc'] == pytest.approx(expected, rel=1e-9)
  saved = np.load(workdir / 'predictions_ensemble_test.npz')
  np.testing.assert_allclose(saved['scores'], mean_scores)
  # Each seed folder is a complete workdir; the group folder reads as a folder of runs.
  assert report.find_runs(str(workdir)) == [str(workdir / 'seed_0'), str(workdir / 'seed_1')]
  assert cli.main(['evaluate', '--workdir', str(workdir / 'seed_1'), '--split', 'test']) == 0
  assert cli.main(['evaluate', '--workdir', str(workdir)]) == 2


@pytest.mark.slow
def test_group_resume_is_exact_even_when_one_seed_is_ahead(group, tmp_path):
  """Stopped at step 12 (checkpoints 8 and 12 for both seeds), then seed 1's checkpoint 12
  deleted, as a kill between the two seeds' saves leaves it: both resume from step 8 and
  finish exactly as the uninterrupted group run."""
  workdir, _ = group
  resumed = tmp_path / 'resumed'
  config = _config(**{'train.seeds': (0, 1), 'train.stop_after_steps': 12})
  assert train_lib.train_and_evaluate(config, str(resumed)) == {'stopped_at_step': 12}
  shutil.rmtree(resumed / 'seed_1' / 'checkpoints' / '12')
  train_lib.train_and_evaluate(_config(**{'train.seeds': (0, 1)}), str(resumed))
  for seed in (0, 1):
    assert (results_without_run_info(resumed / f'seed_{seed}')
            == results_without_run_info(workdir / f'seed_{seed}'))
    assert _records(resumed / f'seed_{seed}') == _records(workdir / f'seed_{seed}')
  with pytest.raises(ValueError, match='names a seed twice'):
    train_lib.train_and_evaluate(_config(**{'train.seeds': (3, 3)}), str(tmp_path / 'x'))


@pytest.mark.slow
def test_segmentation_seeds_in_one_program(tmp_path):
  """Segmentation (synthetic volumes, no ../shared needed), with ``vmap`` over the seed axis
  (the classification tests use the CPU default, ``unroll``): each seed of the group equals
  its single run to rounding, and the summary holds the per-class Dice."""
  from medjax.data import synthetic
  root = synthetic.write_segmentation_dataset(str(tmp_path / 'data'), num_cases=6, seed=0)
  c = config_lib.load_config_file('configs/hippocampus_unet3d.py:runlocal')
  config_lib.apply_overrides(c, [f'data.root={root}', f'data.cache_dir={tmp_path / "cache"}'])
  group = config_lib.apply_overrides(config_lib.resolve(c), ['train.seeds=(0, 1)',
                                                              'train.seeds_program=vmap'])
  summary = train_lib.train_and_evaluate(group, str(tmp_path / 'group'))
  single = train_lib.train_and_evaluate(config_lib.apply_overrides(c, ['seed=1']),
                                        str(tmp_path / 'single1'))
  ours = results_without_run_info(tmp_path / 'group' / 'seed_1')
  assert ours['val']['dice'] == pytest.approx(single['val']['dice'], abs=1e-3)
  for a, b in zip(_records(tmp_path / 'group' / 'seed_1'), _records(tmp_path / 'single1')):
    assert a['step'] == b['step']
    if 'loss' in b:
      np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-4)
  assert summary['splits']['val']['dice']['per_seed'][1] == ours['val']['dice']
  assert summary['ensemble'] == {}  # a seed ensemble of label maps is not implemented
