"""Writes the pages of ``docs/results/`` from ``benchmarks/results/*.json``.

  python benchmarks/results_pages.py           # rewrite docs/results/*.md
  python benchmarks/results_pages.py --check   # exit 1 naming the stale pages

Every number on those pages comes from the JSON files (or is computed from them here): to
change a page, change the JSON or this script and rerun it. The prose is the JSON's own
``description`` / ``note`` fields and a short intro per page written below.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from results_table import markdown_table  # noqa: E402  (benchmarks/ is on sys.path)

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / 'benchmarks' / 'results'
PAGES_DIR = ROOT / 'docs' / 'results'
COMMAND = 'python benchmarks/results_pages.py'
INDEX = 'README.md'

Results = Dict[str, dict]  # JSON file name -> its contents

METHOD_NAMES = {'none': 'labelled only', 'all': 'all labels', 'self_training': 'self-training',
                'fixmatch': 'FixMatch', 'mixmatch': 'MixMatch', 'simclr': 'SimCLR + labels',
                'simclr_fixmatch': 'SimCLR + FixMatch', 'mean_teacher': 'mean teacher'}


@dataclasses.dataclass
class Page:
  """One generated page: its file, title, intro and the JSON files it is built from."""
  file: str
  title: str
  intro: str
  sources: Sequence[str]
  build: Callable[[Results], List[str]]  # Markdown blocks after the intro


# ----- cells ---------------------------------------------------------------------------


def percent_interval(interval: Optional[Sequence[float]]) -> Optional[str]:
  """``[low, high]`` shares as ``'20 to 43 %'``; None stays None."""
  if not interval:
    return None
  low, high = interval
  return f'{100 * low:.0f} to {100 * high:.0f} %'


def settings_text(settings) -> str:
  """Overrides (a dict, a ``;``-joined string or a list) as ``key=value`` text."""
  if isinstance(settings, dict):
    return '; '.join(f'{k}={v}' for k, v in settings.items())
  if isinstance(settings, (list, tuple)):
    return '; '.join(map(str, settings))
  return str(settings or '').replace(';', '; ')


def fraction_text(fraction) -> str:
  return 'all' if fraction == 1.0 else f'{100 * fraction:g} %'


def with_sd(row: dict, key: str) -> Optional[dict]:
  """``row[key]`` and ``row[key + '_sd']`` as a ``{'mean', 'sd'}`` cell."""
  if row.get(key) in (None, ''):
    return None
  return {'mean': row[key], 'sd': row.get(f'{key}_sd')}


def mean_of(pairs: Sequence[Sequence[float]], i: int) -> float:
  return sum(p[i] for p in pairs) / len(pairs)


# ----- blocks --------------------------------------------------------------------------


def source_link(name: str) -> str:
  return f'[`{name}`](../../benchmarks/results/{name})'


def machine(data: dict) -> Optional[str]:
  """Where the JSON says it ran, e.g. ``2 CPU cores (Intel Xeon), jax 0.10.2 on cpu:0``."""
  parts = []
  if 'cpu_count' in data:
    parts.append(f"{data['cpu_count']} CPU cores" + (f" ({data['cpu']})" if 'cpu' in data else ''))
  if 'jax' in data:
    parts.append(f"jax {data['jax']}" + (f" on {data['device']}" if 'device' in data else ''))
  if 'torch' in data:
    parts.append(f"PyTorch {data['torch']}" + (f" with {data['torch_threads']} threads"
                                                if 'torch_threads' in data else ''))
  return ', '.join(parts) or None


def section(title: str, name: str, data: dict, lead: str = '') -> List[str]:
  """A section's heading, its source file, machine, settings and the JSON's own prose."""
  blocks = [f'## {title}']
  if lead:
    blocks.append(lead)
  facts = [f'Source: {source_link(name)}']
  if machine(data):
    facts.append(f'measured on {machine(data)}')
  blocks.append('; '.join(facts) + '.')
  settings = []
  for key in ('config', 'protocol', 'seeds', 'num_epochs', 'unlabeled_ratio', 'overrides',
              'extra_overrides', 'settings', 'axes', 'members', 'steps', 'kills'):
    value = data.get(key)
    if value not in (None, '', []):
      if isinstance(value, list):
        value = ', '.join(map(str, value))
      settings.append(f'`{key}`: {value}')
  if settings:
    blocks.append('Settings: ' + '; '.join(settings) + '.')
  for key in ('description', 'note'):
    if data.get(key):
      blocks.append(quote(data[key]))
  commands = data.get('commands') or ([data['command']] if data.get('command') else [])
  if commands:
    blocks.append('Commands:\n\n' + '\n'.join(f'* `{c}`' if c.startswith(('medjax', 'python'))
                                               else f'* {c}' for c in commands))
  return blocks


def quote(text: str) -> str:
  return '> ' + str(text).replace('\n', '\n> ')


def notes(rows: Sequence[dict], label: str = 'method') -> Optional[str]:
  """The rows' ``note`` fields as a list under their table (None when there are none)."""
  items = [f"* {r[label]}: {r['note']}" for r in rows if r.get('note')]
  return 'Notes:\n\n' + '\n'.join(items) if items else None


# ----- classification few labels --------------------------------------------------------


def few_label_rows(rows: Sequence[dict]) -> List[dict]:
  out = []
  for r in rows:
    row = dict(r)
    row['labels'] = fraction_text(r['fraction']) if 'fraction' in r else ''
    row['method_name'] = METHOD_NAMES.get(r['method'], r['method'])
    row['ci'] = percent_interval(r.get('auc_gap_recovered_ci95'))
    row['knn_auc'] = (r.get('pretraining') or {}).get('knn_auc')
    out.append(row)
  return out


def few_label_table(rows: Sequence[dict]) -> str:
  """Test AUC / ACC per labelled fraction and method, with the gap share when there is one."""
  rows = few_label_rows(rows)
  columns = [('labels', 'labels', ''), ('method_name', 'method', ''),
             ('auc', 'test AUC', '.3f'), ('accuracy', 'test ACC', '.3f')]
  optional = [('val_auc', 'val AUC', '.3f'), ('knn_auc', 'SimCLR kNN val AUC', '.3f'),
              ('auc_gap_recovered', 'AUC gap recovered', '.0%'),
              ('ci', '95 % interval', ''), ('wall_time_s', 'wall s', '.0f')]
  columns += [c for c in optional if any(r.get(c[0]) is not None for r in rows)]
  return markdown_table(rows, columns)


def few_labels_section(title: str, name: str, results: Results, lead: str = '') -> List[str]:
  data = results[name]
  rows = data['results']
  return section(title, name, data, lead) + [
      few_label_table(rows), notes(few_label_rows(rows), 'method_name')]


def variants_section(results: Results) -> List[str]:
  name = 'few_labels_breastmnist_fixmatch_variants.json'
  data = results[name]
  rows = []
  for r in data['results']:
    rows.append(r)
    if 'reference_same_seeds' in r:
      rows.append(r['reference_same_seeds'])
  table_rows = [{'method': r['method'], 'settings': settings_text(r.get('settings')),
                 'val_auc': (r.get('val') or {}).get('auc'),
                 'test_auc': (r.get('test') or {}).get('auc'),
                 'test_acc': (r.get('test') or {}).get('accuracy'),
                 'gap': r.get('test_auc_gap_recovered')} for r in rows]
  columns = [('method', 'method', ''), ('settings', 'settings', ''),
             ('val_auc', 'val AUC', '.3f'), ('test_auc', 'test AUC', '.3f'),
             ('test_acc', 'test ACC', '.3f'), ('gap', 'test AUC gap recovered', '.0%')]
  return section('FixMatch variants', name, data) + [markdown_table(table_rows, columns),
                                                     notes(rows)]


def mixmatch_section(results: Results) -> List[str]:
  name = 'few_labels_breastmnist_mixmatch.json'
  data = results[name]
  rows = [dict(r, ci=percent_interval(r.get('auc_gap_recovered_ci95')),
               settings=settings_text(r.get('settings'))) for r in data['results']]
  columns = [('method', 'method', ''), ('settings', 'settings', ''),
             ('val_auc', 'val AUC', '.3f'), ('test_auc', 'test AUC', '.3f'),
             ('auc_gap_recovered', 'AUC gap recovered', '.0%'), ('ci', '95 % interval', ''),
             ('test_accuracy', 'test ACC', '.3f'),
             ('test_balanced_accuracy', 'test balanced ACC', '.3f')]
  blocks = section('MixMatch and the FixMatch paper\'s SGD', name, data)
  blocks.append(markdown_table(rows, columns))
  fractions = data['fractions']
  blocks += ['### MixMatch at 5, 10 and 25 % labels', quote(fractions['note']),
             f"Command: `{fractions['command']}`", few_label_table(fractions['results'])]
  pneumonia = data['pneumoniamnist_5_percent']
  aligned = pneumonia['mixmatch_distribution_alignment']
  aligned_row = {'fraction': 0.05, 'method': f"MixMatch, {aligned['settings']}",
                 'auc': aligned['auc']}
  blocks += ['### MixMatch on PneumoniaMNIST, 5 % labels', quote(pneumonia['note']),
             f"Command: `{pneumonia['command']}`",
             few_label_table(pneumonia['results'] + [aligned_row]),
             f"With distribution alignment, test balanced accuracy "
             f"{aligned['balanced_accuracy']['mean']:.3f} ± "
             f"{aligned['balanced_accuracy']['sd']:.3f}."]
  return blocks


def breastmnist_page(results: Results) -> List[str]:
  return (
      few_labels_section('The recipe, 3 seeds', 'few_labels_breastmnist.json', results)
      + few_labels_section(
          '10 seeds', 'few_labels_breastmnist_10_seeds.json', results,
          'The same recipe over seeds 0-9: the first three seeds turn out to be favourable '
          'ones.')
      + few_labels_section(
          'FixMatch started from the labelled-only run',
          'few_labels_breastmnist_fixmatch_init_from.json', results)
      + variants_section(results)
      + few_labels_section('Every row trained 90 epochs', 'few_labels_breastmnist_90_epochs.json',
                           results)
      + few_labels_section(
          'SimCLR pretraining, then fine-tuning', 'few_labels_breastmnist_simclr.json', results)
      + mixmatch_section(results)
      + few_labels_section(
          'Parameter average (EMA) for evaluation', 'few_labels_breastmnist_ema.json', results))


def pneumoniamnist_page(results: Results) -> List[str]:
  return few_labels_section(
      'The recipe, 3 seeds', 'few_labels_pneumoniamnist.json', results,
      'At 10 and 25 % labels, labelled-only training already matches all labels, so no gap '
      'share is given there.')


# ----- segmentation ---------------------------------------------------------------------

DICE_COLUMNS = [('dice', 'mean Dice', '.3f'), ('dice_anterior', 'Dice anterior', '.3f'),
                ('dice_posterior', 'Dice posterior', '.3f'),
                ('hd95_anterior_mm', 'HD95 anterior mm', '.2f'),
                ('hd95_posterior_mm', 'HD95 posterior mm', '.2f')]


def hippocampus_few_table(rows: Sequence[dict]) -> str:
  out = []
  for r in rows:
    row = dict(r, ci=percent_interval(r.get('dice_gap_recovered_ci95')),
               settings=settings_text(r.get('overrides', '')),
               voxels_ignored=(1 - r['mean_voxels_kept']) if 'mean_voxels_kept' in r else None)
    for key, _, _ in DICE_COLUMNS + [('train_minutes', '', '')]:
      row[key] = with_sd(r, key)
    out.append(row)
  columns = [('labelled_volumes', 'labelled volumes', ''), ('method', 'method', '')]
  if any('seed' in r for r in rows):
    columns.append(('seed', 'seed', ''))
  columns += DICE_COLUMNS
  optional = [('dice_gap_recovered', 'Dice gap recovered', '.0%'),
              ('ci', '95 % interval', ''), ('settings', 'overrides', ''),
              ('voxels_ignored', 'voxels ignored', '.1%')]
  columns += [c for c in optional if any(r.get(c[0]) not in (None, '') for r in out)]
  columns.append(('train_minutes', 'train min', '.1f'))
  return markdown_table(out, columns)


def hippocampus_few_page(results: Results) -> List[str]:
  blocks = []
  for title, name, lead in (
      ('Short protocol: mean teacher', 'few_labels_hippocampus.json',
       'The short protocol of `benchmarks/few_labels_hippocampus.py`: the `:cpu` U-Net on '
       'plain 2D slices, one seed. The runs are under-trained at this length.'),
      ('Short protocol: self-training', 'few_labels_hippocampus_self_training.json', ''),
      ('Short protocol: a voxel threshold, and starting from the teacher',
       'few_labels_hippocampus_voxel_threshold_init_from.json',
       'The pseudo-labels pull the student below its own teacher, while the teacher '
       'trained on alone keeps improving.'),
      ('Trained to a plateau with the `:cpu` recipe (`--protocol recipe`), one seed',
       'few_labels_hippocampus_recipe.json', ''),
      ('The recipe protocol over seeds 0-2', 'few_labels_hippocampus_recipe_seeds.json',
       'Each seed is another labelled subset; the `mean` rows are mean ± sd over the seeds.')):
    data = results[name]
    blocks += section(title, name, data, lead) + [hippocampus_few_table(data['results'])]
  return blocks


# Four decimals: the nnU-Net reference row is published to four.
SEGMENTER_COLUMNS = ([('model', 'model', ''), ('mirror_axes', 'mirroring', '')] +
                     [(k, h, '.4f' if k.startswith('dice') else f) for k, h, f in DICE_COLUMNS] +
                     [('train_minutes', 'train min', '.1f'),
                      ('seconds_per_volume', 's / volume', '.2f'), ('cases', 'cases', '')])


def hippocampus_cpu_page(results: Results) -> List[str]:
  blocks = []
  for title, name in (('The `:cpu` recipe: three 2.5D U-Nets', 'hippocampus_cpu.json'),
                      ('2.5D against plain slices', 'hippocampus_slice_context.json')):
    data = results[name]
    columns = SEGMENTER_COLUMNS + ([('slice_context', 'slice context', '')]
                                   if name == 'hippocampus_slice_context.json' else [])
    blocks += section(title, name, data) + [markdown_table(data['results'], columns)]
  rows = results['hippocampus_slice_context.json']['results']
  gain = []
  for mirror in ('-', '0,1'):
    plain, context = (next(r for r in rows if r['mirror_axes'] == mirror and
                           r['slice_context'] == k) for k in (0, 2))
    gain.append({'mirror_axes': mirror,
                 **{k: context[k] - plain[k] for k, _, _ in DICE_COLUMNS[:3]}})
  blocks += ['2.5D minus plain slices (computed from the rows above):',
             markdown_table(gain, [('mirror_axes', 'mirroring', ''),
                                   ('dice', 'mean Dice', '+.3f'),
                                   ('dice_anterior', 'Dice anterior', '+.3f'),
                                   ('dice_posterior', 'Dice posterior', '+.3f')])]
  for title, name in (('Before 2.5D: plain 2D slices', 'hippocampus_cpu_2d.json'),
                      ('The axis-1 model trained twice as long',
                       'hippocampus_cpu_axis1_16k_steps.json')):
    data = results[name]
    blocks += section(title, name, data) + [markdown_table(data['results'], SEGMENTER_COLUMNS)]
  return blocks


# ----- MedMNIST ---------------------------------------------------------------------------


def auc_acc(pair) -> Optional[str]:
  return f'{pair[0]:.3f} / {pair[1]:.3f}' if pair else None


def medmnist_page(results: Results) -> List[str]:
  name = 'medmnist_small_cnn.json'
  data = results[name]
  published = data['published']
  rows = []
  for run, r in data['runs'].items():
    row = {'run': run, 'recipe': r['recipe'], 'seeds': len(r['seeds']),
           'auc': {'mean': r['test_auc_mean'], 'sd': r['test_auc_sd']},
           'acc': {'mean': r['test_acc_mean'], 'sd': r['test_acc_sd']},
           'ensemble': auc_acc((r['ensemble_auc'], r['ensemble_acc'])),
           'minutes': r['minutes_per_run']}
    for i, figures in enumerate(published.values()):
      row[f'published_{i}'] = auc_acc(figures.get(r['dataset']))
    rows.append(row)
  columns = [('run', 'run', ''), ('recipe', 'recipe', ''), ('seeds', 'seeds', ''),
             ('auc', 'test AUC', '.3f'), ('acc', 'test ACC', '.3f'),
             ('ensemble', 'seed ensemble AUC / ACC', ''), ('minutes', 'min / run', '.1f')]
  columns += [(f'published_{i}', f'{label} AUC / ACC', '') for i, label in enumerate(published)]
  blocks = section('Small CNNs (`--variant cpu` and `configs/few_labels.py`)',
                   name, data) + [markdown_table(rows, columns, missing='—')]
  adrenal = data['runs']['adrenalmnist3d_cpu']
  seed_rows = [{'seed': s, 'step': step, 'selected': auc_acc(sel), 'last': auc_acc(last)}
               for s, step, sel, last in zip(adrenal['seeds'], adrenal['selected_steps'],
                                             adrenal['per_seed_test_auc_acc_selected'],
                                             adrenal['per_seed_test_auc_acc_last_step_1480'])]
  last = adrenal['per_seed_test_auc_acc_last_step_1480']
  seed_rows.append({'seed': 'mean', 'last': auc_acc((mean_of(last, 0), mean_of(last, 1)))})
  blocks += ['AdrenalMNIST3D `:cpu` per seed: the checkpoint selected on validation AUC '
             'against the last one:',
             markdown_table(seed_rows, [('seed', 'seed', ''), ('step', 'selected step', ''),
                                        ('selected', 'test AUC / ACC, selected', ''),
                                        ('last', 'test AUC / ACC, last', '')])]

  name = 'medmnist_resnet18_torch_init.json'
  data = results[name]
  per_seed = [{'seed': s, 'step': r['selected_step'], 'val_auc': r['val_auc'],
               'selected': auc_acc(r['test_auc_acc_selected']),
               'last': auc_acc(r['test_auc_acc_last'])} for s, r in data['per_seed'].items()]
  three = data['row_3_seeds']
  summary = [
      {'rows': 'seeds ' + ', '.join(map(str, three['seeds'])), 'checkpoint': 'selected',
       'auc': {'mean': three['test_auc_mean'], 'sd': three['test_auc_sd']},
       'acc': {'mean': three['test_acc_mean'], 'sd': three['test_acc_sd']}},
      {'rows': 'seeds ' + ', '.join(map(str, three['seeds'])), 'checkpoint': 'last',
       'auc': {'mean': three['last_checkpoint_auc_mean'], 'sd': three['last_checkpoint_auc_sd']},
       'acc': {'mean': three['last_checkpoint_acc_mean'], 'sd': three['last_checkpoint_acc_sd']}},
      {'rows': 'seeds ' + ', '.join(map(str, data['row']['seeds'])), 'checkpoint': 'selected',
       'auc': {'mean': data['row']['test_auc_mean'], 'sd': data['row']['test_auc_sd']},
       'acc': {'mean': data['row']['test_acc_mean'], 'sd': data['row']['test_acc_sd']},
       'ensemble': auc_acc((data['row']['ensemble_auc'], data['row']['ensemble_acc'])),
       'minutes': data['row']['minutes_per_run']}]
  published = [{'source': label, 'figures': auc_acc(figures.get('breastmnist'))}
               for label, figures in data['published'].items()]
  blocks += section('BreastMNIST, the MedMNIST v2 paper recipe (ResNet-18, PyTorch init)',
                    name, data)
  blocks += [markdown_table(per_seed, [('seed', 'seed', ''), ('step', 'selected step', ''),
                                       ('val_auc', 'val AUC', '.3f'),
                                       ('selected', 'test AUC / ACC, selected', ''),
                                       ('last', 'test AUC / ACC, last', '')]),
             'Means over seeds:',
             markdown_table(summary, [('rows', 'rows', ''), ('checkpoint', 'checkpoint', ''),
                                      ('auc', 'test AUC', '.3f'), ('acc', 'test ACC', '.3f'),
                                      ('ensemble', 'seed ensemble AUC / ACC', ''),
                                      ('minutes', 'min / run', '.1f')]),
             'Published BreastMNIST figures:',
             markdown_table(published, [('source', 'published', ''),
                                        ('figures', 'test AUC / ACC', '')], missing='—')]
  return blocks


# ----- CPU convolutions and throughput -----------------------------------------------------


def conv_page(results: Results) -> List[str]:
  steps, layers = [], []
  for name in ('conv_vs_torch.json', 'conv_vs_torch_resnet18_3d.json'):
    for r in results[name]['results']:
      if 'case' in r:
        row = dict(r, source=name)
        for impl in ('xla', 'auto', 'torch'):
          if f'{impl}_conv_s' in r:
            row[f'{impl}_split'] = f"{r[f'{impl}_conv_s']:.2f} + {r[f'{impl}_other_s']:.2f}"
        steps.append(row)
      else:
        layers.append(r)
  step_columns = [('case', 'train step', ''), ('batch', 'batch', ''),
                  ('xla_per_s', 'XLA convs img/s', '.3g'),
                  ('auto_per_s', "'auto' img/s", '.3g'), ('torch_per_s', 'PyTorch img/s', '.3g'),
                  ('auto_vs_xla', 'auto / XLA', '.2f'), ('auto_vs_torch', 'auto / PyTorch', '.2f'),
                  ('xla_split', 'XLA conv s + other s', ''),
                  ('auto_split', 'auto conv s + other s', ''),
                  ('torch_split', 'PyTorch conv s + other s', ''),
                  ('params_medjax', 'parameters', ','), ('source', 'source', '')]
  layer_columns = [('model', 'model', ''), ('layer', 'layer', ''), ('count', 'count', ''),
                   ('auto_impl', "'auto' runs", ''), ('gflop', 'GFLOP', '.2f'),
                   ('xla_gflops', 'XLA GFLOP/s', '.1f'), ('auto_gflops', "'auto' GFLOP/s", '.1f'),
                   ('torch_gflops', 'PyTorch GFLOP/s', '.1f'),
                   ('auto_vs_xla', 'auto / XLA', '.2f'),
                   ('auto_vs_torch', 'auto / PyTorch', '.2f')]
  machines = '\n'.join(f'* {source_link(name)}: measured on {machine(results[name])}.'
                       for name in ('conv_vs_torch.json', 'conv_vs_torch_resnet18_3d.json'))
  name = 'cpu_step_profile.json'
  profile = [r for r in results[name]['results'] if r['kind'] == 'profile']
  step_rows = [r for r in results[name]['results'] if r['kind'] == 'step']
  profile_columns = [('case', 'case', ''), ('category', 'where the time goes', '')]
  for impl, label in (('auto', "'auto' (rule)"), ('tuned', "'auto' (tuned)"),
                      ('torch', 'PyTorch')):
    profile_columns += [(f'{impl}_ms', f'{label} ms', '.0f'), (f'{impl}_share', 'share', '.0%')]
  profile_blocks = [
      '## Where a train step\'s time goes',
      f'{source_link(name)}: measured on {machine(results[name])}, load average '
      f"{results[name]['load_average_1min_start']:.1f} at the start (shared machine: only "
      'shares and ratios within the run mean anything). XLA\'s ops by category from a '
      '`jax.profiler` trace, PyTorch\'s from `torch.profiler` (`benchmarks/cpu_step_profile.py`).',
      markdown_table(profile, profile_columns),
      'Whole steps, medjax and PyTorch interleaved, medians:',
      markdown_table(step_rows, [('case', 'train step', ''), ('impl', 'conv_impl', ''),
                                 ('batch', 'batch', ''), ('reps', 'reps', ''),
                                 ('medjax_ms', 'medjax ms', '.0f'),
                                 ('torch_ms', 'PyTorch ms', '.0f'),
                                 ('vs_torch', 'medjax / PyTorch speed', '.2f')])]
  return (['Sources:\n\n' + machines, '## Whole train steps',
           'Images/s of whole train steps (SGD-momentum, cross-entropy), and seconds per step '
           'split in two: "conv s" is the sum of the model\'s convolution layers '
           'timed alone (forward and both gradients, times their count); "other s" is the rest '
           'of the step (normalisation, activations, loss, optimizer).',
           markdown_table(steps, step_columns),
           '## Each distinct convolution',
           'Forward and both gradients, per layer; "count" is how often the model has it.',
           markdown_table(layers, layer_columns)] + profile_blocks)


def throughput_page(results: Results) -> List[str]:
  blocks = []
  name = 'seeds_throughput.json'
  blocks += section('Several seeds in one program', name, results[name],
                    'Images/s of N seeds trained in one program against N sequential runs '
                    '(`train.seeds_program`; see [seeds](../seeds.md)).')
  blocks.append(markdown_table(results[name]['results'], [
      ('case', 'case', ''), ('program', 'program', ''), ('seeds', 'N', ''),
      ('batch_per_seed', 'batch per seed', ''), ('sequential_img_s', 'sequential img/s', '.1f'),
      ('one_program_img_s', 'one program img/s', '.1f'), ('speedup', 'speed-up', '.2f')]))
  name = 'train_throughput.json'
  rows = [dict(r, shape='x'.join(map(str, r.get('image_shape', ())))) for r in
          results[name]['results']]
  blocks += section('Classification train step and input pipeline', name, results[name])
  blocks.append(markdown_table(rows, [
      ('case', 'case', ''), ('batch', 'batch', ''), ('shape', 'image shape', ''),
      ('images_per_s', 'images/s', '.1f'), ('step_ms_median', 'step ms (median)', '.1f'),
      ('compile_s', 'compile s', '.1f')]))
  name = 'volume_pipeline.json'
  blocks += section('Volume patches and slices', name, results[name],
                    'Hippocampus patches/s and slices/s with and without augmentation, next to '
                    'the U-Net train step\'s rate.')
  blocks.append(markdown_table(results[name]['results'], [
      ('case', 'case', ''), ('batch', 'batch', ''), ('samples_per_s', 'samples/s', '.1f'),
      ('samples_per_s_augmented', 'augmented samples/s', '.1f'),
      ('train_step_samples_per_s', 'train step samples/s', '.3g')]))
  blocks.append(f"Preparing the cases took {results[name]['prepare_s']:.1f} s.")
  name = 'host_pipeline.json'
  data = results[name]
  blocks += section('Host input pipeline: worker processes', name, data,
                    'Segmentation patches/s of the sampler in a plain loop, through tf.data '
                    'threads (`data.host_workers=0`) and in worker processes '
                    '(`data.host_workers=N`), medians of interleaved repeats; "own cores": CPU '
                    'seconds per wall second of the pipeline\'s processes, "other cores": of '
                    'everything else on the machine meanwhile.')
  blocks.append(markdown_table(data['results'], [
      ('case', 'case', ''), ('patch', 'patch', ''), ('batch', 'batch', ''),
      ('pipeline', 'pipeline', ''), ('patches_per_s', 'patches/s', '.2f'),
      ('vs_in_process', 'x in-process', '.2f'), ('vs_one_worker', 'x 1 worker', '.2f'),
      ('startup_s', 'start-up s', '.1f'), ('own_cores', 'own cores', '.2f'),
      ('other_cores', 'other cores', '.2f'), ('cpu_ms_per_patch', 'CPU ms/patch', '.0f')]))
  blocks.append('Moving one sample from a worker to the training process (a sampler that '
                'copies a fixed sample), CPU of both processes:')
  blocks.append(markdown_table(data['transport'], [
      ('transport', 'worker to main', ''), ('patch', 'patch', ''),
      ('cpu_ms_per_sample', 'CPU ms/sample', '.2f'),
      ('wall_ms_per_sample', 'wall ms/sample', '.2f')]))
  blocks.append('The share of the sampler\'s CPU time inside scipy.ndimage\'s C functions, '
                'which release the GIL (from CPU time, whatever the load), and the speed-up '
                'threads could reach if the rest held it (Amdahl; NumPy\'s array loops release '
                'it too, so the true bound is higher):')
  blocks.append(markdown_table(data['gil'], [
      ('case', 'case', ''), ('cpu_ms_per_sample', 'CPU ms/patch (this thread)', '.1f'),
      ('gil_free_share', 'share without GIL', '.2f'),
      ('two_threads_bound', '2 threads bound', '.2f'),
      ('any_threads_bound', 'any threads bound', '.2f')]))
  load = lambda values: ', '.join(f'{v:.1f}' for v in values)  # noqa: E731
  blocks.append(f"Load average (1, 5, 15 min) {load(data['load_average_start'])} at the start, "
                f"{load(data['load_average_end'])} at the end, on {data['usable_cores']} "
                'usable cores.')
  name = 'pipeline_autotune.json'
  blocks += section('tf.data autotuning', name, results[name],
                    'medjax turns tf.data\'s autotuning thread off: dropping an unfinished '
                    'iterator waited for that thread (teardown below). Group steps/s: a FixMatch '
                    'seed group\'s input; slices/s: the 2.5D slice sampler.')
  blocks.append(markdown_table(results[name]['results'], [
      ('trial', 'trial', ''), ('pipeline', 'pipeline', ''),
      ('group_steps_per_s', 'group steps/s', '.2f'), ('teardown_s', 'teardown s', '.2f'),
      ('slices_per_s', 'slices/s', '.0f')]))
  name = 'unet_upsampling.json'
  rows = [dict(r, patch='x'.join(map(str, r['patch'])),
               volume='x'.join(map(str, r['inference_volume_shape'])))
          for r in results[name]['results']]
  blocks += section('U-Net upsampling: transposed convolution or resize', name, results[name])
  blocks.append(markdown_table(rows, [
      ('case', 'case', ''), ('upsample', 'upsampling', ''), ('patch', 'patch', ''),
      ('batch', 'batch', ''), ('train_step_s', 'train step s', '.2f'),
      ('train_samples_per_s', 'train samples/s', '.3f'), ('volume', 'inference volume', ''),
      ('inference_s', 'inference s', '.2f'), ('compile_s', 'compile s', '.1f')]))
  return blocks


def accelerator_page(results: Results) -> List[str]:
  blocks = []
  name = 'precision.json'
  blocks += section('bfloat16 against float32', name, results[name],
                    'The same recipe trained with `train.precision=float32` and `bfloat16` '
                    '(`benchmarks/precision.py`): the metric, and training images/s as a '
                    'ratio to float32 in the same run.')
  blocks.append(markdown_table(results[name]['results'], [
      ('case', 'case', ''), ('precision', 'precision', ''), ('metric', 'metric', ''),
      ('value', 'value', '.4f'), ('delta_vs_float32', 'minus float32', '+.4f'),
      ('images_per_sec', 'train images/s', '.1f'),
      ('speed_vs_float32', 'x float32 speed', '.2f'), ('wall_s', 'wall s', '.0f')]))
  name = 'device_augment.json'
  blocks += section('Augmentation on the host or in the train step', name, results[name],
                    '`data.augment_on=host` (the sampler augments each patch) against '
                    '`device` (the sampler only crops; the jitted step augments): the host\'s '
                    'milliseconds per batch, the step\'s, and the bytes sent per batch.')
  blocks.append(markdown_table(results[name]['results'], [
      ('case', 'case', ''), ('batch', 'batch', ''), ('patch', 'patch', ''),
      ('crop', 'crop (device)', ''), ('host_ms_host_aug', 'host ms, host aug', '.1f'),
      ('host_ms_device_aug', 'host ms, device aug', '.1f'),
      ('host_ratio', 'host ratio', '.3f'), ('step_ms_host_aug', 'step ms, host aug', '.0f'),
      ('step_ms_device_aug', 'step ms, device aug', '.0f'), ('step_ratio', 'step ratio', '.2f'),
      ('host_bytes_host_aug', 'bytes, host aug', ','),
      ('host_bytes_device_aug', 'bytes, device aug', ',')]))
  return blocks


def fault_page(results: Results) -> List[str]:
  name = 'fault_injection.json'
  data = results[name]
  rows = [dict(r, attempts_count=len(r['attempts'])) for r in data['results']]
  return section('Kills and resumes', name, data) + [
      f"{data['kills_survived']} of {data['kills']} kills survived; the uninterrupted "
      f"reference run took {data['reference_wall_s']:.1f} s. Kill times in seconds after each "
      f"start; `c` marks a kill inside a checkpoint write.",
      markdown_table(rows, [('trial', 'trial', ''), ('kills', 'kills', ''),
                            ('kill_times_s', 'kill times s', ''),
                            ('attempts_count', 'starts', ''), ('finished', 'finished', ''),
                            ('identical', 'identical to uninterrupted', '')])]


# ----- detection ---------------------------------------------------------------------------


def detection_nms_page(results: Results) -> List[str]:
  name = 'nms.json'
  data = results[name]
  return section('3D NMS: JAX against NumPy', name, data) + [markdown_table(data['results'], [
      ('case', 'case', ''), ('kept', 'kept', ''), ('jax_ms', 'JAX ms', '.2f'),
      ('numpy_ms', 'NumPy ms', '.2f'), ('numpy_over_jax', 'NumPy / JAX', '.2f'),
      ('first_call_s', 'JAX first call s', '.2f'), ('same_indices', 'same indices', '')]),
      'Load average (1, 5, 15 min) ' + ', '.join(f'{v:.1f}' for v in data['load_average_start'])
      + ' at the start, ' + ', '.join(f'{v:.1f}' for v in data['load_average_end'])
      + ' at the end.']


def detection_page(results: Results) -> List[str]:
  name = 'detection.json'
  data = results[name]
  columns = [('case', 'recipe', ''), ('split', 'scored on', ''),
             ('train_minutes', 'train min', '.1f'), ('map', 'mAP 0.1:0.5', '.3f'),
             ('ap_0.1', 'AP@0.1', '.3f'), ('ap_0.5', 'AP@0.5', '.3f'), ('cpm', 'CPM', '.3f')]
  rates = [('sensitivity_at_' + r, f'sens. @{r}', '.3f')
           for r in ('0.125', '0.25', '0.5', '1', '2', '4', '8')]
  return (section('Detection recipes on a CPU', name, data)
          + [markdown_table(data['results'], columns),
             'FROC: sensitivity at 1/8 ... 8 false positives per scan (CPM: their mean).',
             markdown_table(data['results'], [('case', 'recipe', ''), ('split', 'scored on', '')]
                            + rates)])


# ----- pages --------------------------------------------------------------------------------

FEW_LABELS_INTRO = (
    'Mean ± sd over seeds of the test metrics; "gap recovered" is the share of the '
    'labelled-only to all-labels gap that a method closes, and its 95 % interval comes from '
    'resampling seeds with each seed\'s runs kept together (they share its labelled subset). '
    'How the methods work: [few labels](../few_labels.md).')

PAGES = [
    Page('medmnist.md', 'MedMNIST recipes against the published figures',
         'Test AUC / ACC of `medjax benchmark medmnist` runs, mean ± sd over seeds and of the '
         'seed ensemble (the mean of the seeds\' probabilities), beside the published 28 px '
         'figures.', ['medmnist_small_cnn.json', 'medmnist_resnet18_torch_init.json'],
         medmnist_page),
    Page('few_labels_breastmnist.md', 'Few labels: BreastMNIST',
         FEW_LABELS_INTRO + ' In short: FixMatch recovers part of the gap; longer training, a '
         'RandAugment-like strong augmentation, SimCLR pretraining, FreeMatch thresholds and '
         'MixMatch add nothing beyond the seeds\' spread, and MixMatch without distribution '
         'alignment predicts the majority class for every image.',
         ['few_labels_breastmnist.json', 'few_labels_breastmnist_10_seeds.json',
          'few_labels_breastmnist_fixmatch_init_from.json',
          'few_labels_breastmnist_fixmatch_variants.json',
          'few_labels_breastmnist_90_epochs.json', 'few_labels_breastmnist_simclr.json',
          'few_labels_breastmnist_mixmatch.json', 'few_labels_breastmnist_ema.json'],
         breastmnist_page),
    Page('few_labels_pneumoniamnist.md', 'Few labels: PneumoniaMNIST', FEW_LABELS_INTRO,
         ['few_labels_pneumoniamnist.json'], pneumoniamnist_page),
    Page('few_labels_hippocampus.md', 'Few labels: Hippocampus segmentation',
         'MSD Hippocampus fold 0 with N labelled training volumes (the rest as images only), '
         'scored on the 40 validation volumes: Dice and HD95 per class; "gap recovered" is the '
         'share of the labelled-only to all-labels mean-Dice gap that a method closes. How the '
         'methods work: [few labels](../few_labels.md).',
         ['few_labels_hippocampus.json', 'few_labels_hippocampus_self_training.json',
          'few_labels_hippocampus_voxel_threshold_init_from.json',
          'few_labels_hippocampus_recipe.json', 'few_labels_hippocampus_recipe_seeds.json'],
         hippocampus_few_page),
    Page('hippocampus_cpu.md', 'Hippocampus on a CPU',
         'MSD Hippocampus fold 0 (40 validation volumes, whole, on their original grid) with '
         '`configs/hippocampus_unet3d.py:cpu` (`benchmarks/hippocampus_cpu.py`): each slice-axis '
         'model alone and the average of the three, with and without test-time mirroring, next '
         'to nnU-Net 3d_fullres. See [segmentation](../segmentation.md).',
         ['hippocampus_cpu.json', 'hippocampus_slice_context.json', 'hippocampus_cpu_2d.json',
          'hippocampus_cpu_axis1_16k_steps.json'], hippocampus_cpu_page),
    Page('cpu_convolutions.md', 'CPU convolutions against PyTorch',
         "medjax's convolutions (`conv_impl='xla'` and `'auto'`) next to PyTorch eager in one "
         'process (`benchmarks/conv_vs_torch.py`). What `\'auto\'` does and what limits it: '
         '[CPU convolutions](../cpu_convolutions.md).',
         ['conv_vs_torch.json', 'conv_vs_torch_resnet18_3d.json', 'cpu_step_profile.json'],
         conv_page),
    Page('throughput.md', 'Throughput',
         'Images, patches and steps per second of the input pipelines and train steps.',
         ['seeds_throughput.json', 'train_throughput.json', 'volume_pipeline.json',
          'host_pipeline.json', 'pipeline_autotune.json', 'unet_upsampling.json'],
         throughput_page),
    Page('accelerators.md', 'Mixed precision and augmentation on the accelerator',
         'What `train.precision` and `data.augment_on` change, measured; how to run on a GPU '
         'or TPU: [GPUs and TPUs](../accelerators.md). No GPU or TPU was available for these '
         'numbers: `benchmarks/accelerator.py` is the command for one.',
         ['precision.json', 'device_augment.json'], accelerator_page),
    Page('detection_nms.md', 'Detection: non-maximum suppression',
         'Greedy NMS of `medjax.detection.boxes` (`benchmarks/nms.py`): jit-compiled with a '
         'fixed output size, each of `max_output` picks compared with all N boxes, against a '
         'NumPy greedy NMS on the same boxes. See [benchmarks](../benchmarks.md).',
         ['nms.json'], detection_nms_page),
    Page('detection.md', 'Detection recipes',
         'Retina U-Net recipes trained and scored on a CPU (`benchmarks/detection.py`): the 2D '
         'quickstart on its validation images, and the LUNA16 `:cpu` recipe on synthetic '
         'LUNA16-format scans, on its validation fold and on held-out scans through '
         '`medjax predict` and `medjax score` (LUNA16\'s FROC rule). See '
         '[detection](../detection.md).', ['detection.json'], detection_page),
    Page('fault_injection.md', 'Fault injection',
         '`benchmarks/fault_injection.py` kills `medjax train` with SIGKILL at random moments '
         'and inside checkpoint writes, resumes each time, and checks that the finished workdir '
         '(`results.json` without `run_info`, every `metrics.jsonl` record but images/s) equals '
         'an uninterrupted run\'s.', ['fault_injection.json'], fault_page),
]


def header(title: str, sources: Sequence[str]) -> List[str]:
  files = ', '.join(source_link(s) for s in sources)
  return [f'# {title}',
          f'*Generated by `{COMMAND}` from {files}. Do not edit: change the JSON or the script '
          'and rerun it.*']


def index_page(results: Results) -> str:
  on_pages = {s for page in PAGES for s in page.sources}
  rows = [{'page': f'[{page.title}]({page.file})',
           'sources': ', '.join(f'`{s}`' for s in page.sources)} for page in PAGES]
  blocks = header('Results', sorted(results)) + [
      'Every number here was measured by a script in `benchmarks/` and stored in '
      '`benchmarks/results/`; these pages are generated from those files.',
      markdown_table(rows, [('page', 'page', ''), ('sources', 'from', '')])]
  missing = sorted(set(results) - on_pages)
  if missing:
    blocks.append('On no page yet: ' + ', '.join(source_link(s) for s in missing) + '.')
  return '\n\n'.join(blocks) + '\n'


def render(results_dir: pathlib.Path = RESULTS_DIR) -> Dict[str, str]:
  """Page file name -> its Markdown, from the JSON files in ``results_dir``."""
  results = {p.name: json.loads(p.read_text()) for p in sorted(results_dir.glob('*.json'))}
  pages = {INDEX: index_page(results)}
  for page in PAGES:
    blocks = header(page.title, page.sources) + [page.intro] + page.build(results)
    pages[page.file] = '\n\n'.join(b for b in blocks if b) + '\n'
  return pages


def stale_pages(pages_dir: pathlib.Path = PAGES_DIR,
                results_dir: pathlib.Path = RESULTS_DIR) -> List[str]:
  """Pages in ``pages_dir`` that differ from a fresh render, are missing, or are extra."""
  expected = render(results_dir)
  present = {p.name for p in pages_dir.glob('*.md')} if pages_dir.is_dir() else set()
  stale = [name for name, text in expected.items()
           if name not in present or (pages_dir / name).read_text() != text]
  return sorted(stale + sorted(present - set(expected)))


def write_pages(pages_dir: pathlib.Path = PAGES_DIR,
                results_dir: pathlib.Path = RESULTS_DIR) -> List[str]:
  """Writes every page (and removes ``.md`` files no page owns); returns the names written."""
  pages = render(results_dir)
  pages_dir.mkdir(parents=True, exist_ok=True)
  for extra in set(p.name for p in pages_dir.glob('*.md')) - set(pages):
    (pages_dir / extra).unlink()
  for name, text in pages.items():
    (pages_dir / name).write_text(text)
  return sorted(pages)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--check', action='store_true',
                      help='write nothing; exit 1 listing the pages that are out of date')
  parser.add_argument('--out', type=pathlib.Path, default=PAGES_DIR, help='pages folder')
  args = parser.parse_args(argv)
  if args.check:
    stale = stale_pages(args.out)
    if stale:
      print(f'stale pages in {args.out} (rerun {COMMAND}): {", ".join(stale)}')
      return 1
    print(f'{args.out}: up to date')
    return 0
  for name in write_pages(args.out):
    print(f'wrote {args.out / name}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
