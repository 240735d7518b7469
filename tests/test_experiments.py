"""The task seam: the import graph has no cycle, and a new task (the toy task of docs/adding.md)
is one registered class that trains with the shared loop and writes a valid workdir."""

import ast
import json
import os
import pathlib
import re

import numpy as np
import pytest

from medjax import config as config_lib, experiments, tasks, train as train_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module_imports() -> dict:
  """medjax module -> the medjax modules it imports (top-level or inside functions)."""
  graph = {}
  for path in (ROOT / 'medjax').rglob('*.py'):
    parts = path.relative_to(ROOT).with_suffix('').parts
    name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
    package = name if parts[-1] == '__init__' else name.rpartition('.')[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        deps |= {a.name for a in node.names if a.name.startswith('medjax')}
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1] +
                          ([base] if base else []))
        if base.startswith('medjax'):
          # `from medjax import train` imports the module medjax.train.
          deps |= {f'{base}.{a.name}' for a in node.names} | {base}
    graph[name] = deps
  return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def _find_cycle(graph: dict):
  state, stack = {}, []

  def visit(m):
    state[m] = 'open'
    stack.append(m)
    for d in sorted(graph[m]):
      if state.get(d) == 'open':
        return stack[stack.index(d):] + [d]
      if d not in state:
        found = visit(d)
        if found:
          return found
    state[m] = 'done'
    stack.pop()
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_medjax_import_graph_has_no_cycle():
  graph = _module_imports()
  assert 'medjax.experiments.base' in graph['medjax.experiments.segmentation']
  assert 'medjax.train' in graph['medjax.apply']
  # Packages import their modules (medjax.models -> medjax.models.cnn) and leaf modules
  # name the package's own names (medjax.models.cnn -> medjax.models.registry); a package
  # __init__ importing its children is not a cycle, so the children's edges to the package
  # itself are dropped.
  graph = {m: {d for d in deps if not m.startswith(d + '.')} for m, deps in graph.items()}
  assert _find_cycle(graph) is None, ' -> '.join(_find_cycle(graph))


def test_a_cycle_would_be_found():
  assert _find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _find_cycle({'a': {'b'}, 'b': set()}) is None


TOY_TASK_PAGE = ROOT / 'docs' / 'adding.md'


def _docs_toy_task() -> str:
  text = TOY_TASK_PAGE.read_text()
  match = re.search(r'<!-- toy-task -->\n```python\n(.*?)```', text, re.S)
  assert match, 'docs/adding.md lost its toy-task example'
  return match.group(1)


@pytest.fixture
def toy_task():
  namespace = {}
  exec(compile(_docs_toy_task(), 'docs/adding.md (toy task)', 'exec'), namespace)
  yield namespace['BrightnessExperiment']
  experiments.TASKS.pop('brightness', None)
  config_lib._DECLARED.remove(namespace['_defaults'])


def _toy_config(**overrides):
  config = config_lib.default_config()
  config_lib.apply_overrides(config, [
      'task=brightness', 'model.name=simple_cnn', 'model.features=(4, 8)', 'model.hidden=8',
      'train.num_epochs=1',
      'train.batch_size=32', 'train.eval_batch_size=32', 'train.log_every_steps=1',
      'train.selection_metric=accuracy', 'train.progress_bar=false'] +
      [f'{k}={v}' for k, v in overrides.items()])
  return config


@pytest.mark.slow
def test_readme_toy_task_trains_and_writes_a_valid_workdir(toy_task, tmp_path):
  workdir = str(tmp_path / 'run')
  results = train_lib.train_and_evaluate(_toy_config(), workdir)
  assert results['task'] == 'brightness' and results['dataset'] == 'random 8x8 images'
  assert results['selected_step'] == 2 and 0.0 <= results['val']['accuracy'] <= 1.0
  assert results['headline_metrics'] == ['accuracy']
  files = set(os.listdir(workdir))
  assert {'config.json', 'command.json', 'data_fingerprint.json', 'metrics.jsonl',
          'model_summary.json', 'results.json', 'predictions_val.npy', 'checkpoints'} <= files
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [(r['step'], r['split']) for r in records] == [(1, 'train'), (2, 'train'), (2, 'val')]
  assert np.isfinite([r['loss'] for r in records if r['split'] == 'train']).all()
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['val'] == results['val']
  # The workdir reloads through the task table, from its own config.json.
  again = train_lib.evaluate_workdir(workdir, 'val', write=False)
  assert again['metrics'] == results['val'] and again['step'] == 2
  predicted = np.load(os.path.join(workdir, 'predictions_val.npy'))
  assert predicted.shape == (64,) and set(np.unique(predicted)) <= {0, 1}


@pytest.mark.slow
def test_toy_task_dict_targets_train_as_seeds_in_one_program(toy_task, tmp_path):
  """The dict targets go through the seed axis too: each seed of a group trains as its
  single run does (same losses to float rounding), and the toy's own config key is checked
  like any other."""
  single = train_lib.train_and_evaluate(_toy_config(seed=1), str(tmp_path / 'one'))
  group = train_lib.train_and_evaluate(_toy_config(**{'train.seeds': '(0, 1)'}),
                                       str(tmp_path / 'group'))
  assert group['seeds'] == [0, 1] and group['ensemble'] == {}
  losses = lambda d: [r['loss'] for r in map(json.loads, open(d / 'metrics.jsonl'))  # noqa
                      if r['split'] == 'train']
  np.testing.assert_allclose(losses(tmp_path / 'group' / 'seed_1'), losses(tmp_path / 'one'),
                             rtol=1e-5)
  assert group['splits']['val']['accuracy']['per_seed'][1] == pytest.approx(
      single['val']['accuracy'])
  with pytest.raises(config_lib.ConfigError, match="did you mean 'threshold'"):
    _toy_config(**{'brightness.treshold': 0.6})


def _literal_strings(node) -> list:
  values = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
  return [v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)]


def test_no_module_outside_experiments_branches_on_a_task_name():
  """Generic code asks the experiment (its hooks) and never compares against a task's name.
  The classification label types (binary, multiclass, ordinal, multilabel: how logits
  become scores, which the losses and metrics take as an argument) are a property of the
  labels, not a task seam, and stay in the building blocks."""
  label_types = set(tasks.TASKS) | {'auto'}
  task_names = (set(experiments.TASKS) | {'classification', 'detection'}) - label_types
  assert {'segmentation', 'contrastive'} <= task_names
  found = []
  for path in (ROOT / 'medjax').rglob('*.py'):
    if path.relative_to(ROOT / 'medjax').parts[0] == 'experiments':
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Compare):
        for operand in [node.left, *node.comparators]:
          found += [f'{path.relative_to(ROOT)}:{node.lineno} {v!r}'
                    for v in _literal_strings(operand) if v in task_names]
  assert not found, found


def test_no_module_uses_another_modules_private_names():
  found = []
  for path in (ROOT / 'medjax').rglob('*.py'):
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Attribute) and node.attr.startswith('_')
          and not node.attr.startswith('__')
          and not (isinstance(node.value, ast.Name) and node.value.id in ('self', 'cls'))):
        found.append(f'{path.relative_to(ROOT)}:{node.lineno} .{node.attr}')
  assert not found, found


def test_module_sizes():
  sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
           for p in (ROOT / 'medjax').rglob('*.py')}
  assert sizes['medjax/train.py'] < 300
  assert max(sizes.values()) <= 400, {k: v for k, v in sizes.items() if v > 400}


@pytest.mark.parametrize('name', sorted(p.name for p in (ROOT / 'tests' / 'data').glob(
    'config_c17630c_*.json')))
def test_config_json_written_before_the_seam_still_loads(name):
  """config.json files written by the code before the config keys moved beside their code
  (commit c17630c) load with every value as written."""
  path = ROOT / 'tests' / 'data' / name
  loaded = config_lib.from_json_file(str(path)).to_dict()
  written = json.loads(path.read_text())
  normalise = lambda tree: json.loads(json.dumps(tree, default=list))  # noqa: E731
  defaults = normalise(config_lib.default_config().to_dict())

  def as_written(loaded, written, defaults):
    """``loaded`` restricted to the keys ``written`` has; a key added since has its default."""
    for key in set(loaded) - set(written):
      assert loaded[key] == defaults[key], key
    return {k: as_written(loaded[k], v, defaults[k]) if isinstance(v, dict) else loaded[k]
            for k, v in written.items()}
  assert as_written(normalise(loaded), normalise(written), defaults) == normalise(written)


def test_unknown_task_and_double_registration_are_errors(toy_task):
  with pytest.raises(ValueError, match="unknown task 'nonesuch'.*segmentation"):
    experiments.make_experiment(config_lib.resolve({'task': 'nonesuch'}))
  with pytest.raises(ValueError, match="task 'segmentation' is already registered"):
    experiments.register_task('segmentation', toy_task)
