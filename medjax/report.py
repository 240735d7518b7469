"""Run reports and run comparisons, from workdir files only.

* :func:`write_report`: one self-contained HTML page (plots embedded) for a run, or for a
  folder of runs (seeds, folds): config, data fingerprint, model summary, metric tables with
  mean and sd over the runs, the plots, versions, and the commands that reproduce it.
* :func:`compare`: one row per run (model, data, seed, selected step, headline metrics),
  printed as Markdown and written as Markdown and CSV.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
from typing import Dict, List, Optional, Sequence

from medjax import workdir as workdir_lib
from medjax.experiments import Experiment, task_class
from medjax.metrics import mean_sd


def find_runs(path: str) -> List[str]:
  """``path`` if it is a run (has config.json), else the runs in its subfolders (two levels
  deep, sorted): a folder of seeds or folds."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no such folder')
  if os.path.exists(os.path.join(path, 'config.json')) and not workdir_lib.is_seed_group(path):
    return [path]
  runs = []
  for root, dirs, files in os.walk(path):
    depth = os.path.relpath(root, path).count(os.sep) + (root != path)
    if 'config.json' in files and root != path:
      runs.append(root)
      dirs[:] = []
    elif depth >= 2:
      dirs[:] = []
  if not runs:
    raise FileNotFoundError(f'{path}: neither a medjax workdir (no config.json) nor a folder '
                            'of workdirs')
  return sorted(runs)


_PLOT_ORDER = ('learning_curves', 'roc_test', 'roc_val', 'confusion_test', 'confusion_val',
               'reliability_test', 'reliability_val', 'overlay_val_best', 'overlay_val_worst')


def _plot_order(path: str):
  name = os.path.splitext(os.path.basename(path))[0]
  return (_PLOT_ORDER.index(name) if name in _PLOT_ORDER else len(_PLOT_ORDER), name)


def load_run(workdir: str) -> Dict:
  """Everything a report shows about one workdir; ``results`` is None until training ends."""
  plots_dir = os.path.join(workdir, 'plots')
  plots = sorted((os.path.join(plots_dir, f) for f in os.listdir(plots_dir)
                  if f.endswith('.png')), key=_plot_order) if os.path.isdir(plots_dir) else []
  files = {'config': 'config', 'results': 'results', 'model_summary': 'model_summary',
           'fingerprint': 'data_fingerprint', 'command': 'command'}
  return {'workdir': workdir, 'plots': plots,
          **{key: workdir_lib.read_json(os.path.join(workdir, f'{name}.json'), None)
             for key, name in files.items()}}


def headline_metrics(results: Optional[Dict]) -> Dict[str, float]:
  """``{'<split>/<metric>': value}`` of each scored split, for the metrics the task named
  in ``results.json``'s ``headline_metrics`` (every scalar for runs that predate it)."""
  if not results:
    return {}
  out = {}
  for split in ('val', 'test'):
    metrics = results.get(split)
    if not isinstance(metrics, dict):
      continue
    keys = results.get('headline_metrics') or sorted(metrics)
    for key in keys:
      value = metrics.get(key)
      if isinstance(value, (int, float)):
        out[f'{split}/{key}'] = float(value)
  return out


def run_row(run: Dict, base: str = '') -> Dict[str, object]:
  config, results = run['config'], run['results'] or {}
  summary = run['model_summary'] or {}
  name = os.path.relpath(run['workdir'], base) if base else run['workdir']
  row: Dict[str, object] = {
      'run': name, 'model': config['model']['name'], 'data': row_data(run),
      'seed': config['seed'],
      'fold': task_class(config['task'], Experiment).run_labels(config).get('fold', ''),
      'status': 'done' if run['results'] else 'unfinished',
      'selected_step': results.get('selected_step', ''),
      'parameters': summary.get('parameters', ''),
      'gflops': (f"{summary['flops_per_example'] / 1e9:.3g}"
                 if isinstance(summary.get('flops_per_example'), (int, float))
                 and math.isfinite(summary['flops_per_example']) else ''),
      'wall_time_s': f"{results['run_info']['wall_time_s']:.0f}"
      if 'run_info' in results else ''}
  row.update(headline_metrics(run['results']))
  return row


def _metric_keys(rows: Sequence[Dict]) -> List[str]:
  keys = []
  for row in rows:
    keys += [k for k in row if '/' in k and k not in keys]
  return keys


def _e(value) -> str:
  """Any workdir value as HTML text: workdir JSON is data, never markup."""
  return html.escape(str(value))


def _number(value, spec: str) -> str:
  """``value`` formatted with ``spec`` if it is a number, else as it is (a hand-edited or
  damaged workdir must not stop the report)."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return format(value, spec)
  return str(value)


def _fmt(value) -> str:
  if isinstance(value, float):
    return 'nan' if not math.isfinite(value) else f'{value:.4f}'
  if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10000:
    return f'{value:,}'
  return str(value)


def _summary_row(rows: Sequence[Dict], keys: Sequence[str]) -> Dict[str, str]:
  out = {}
  for key in keys:
    mean, sd = mean_sd([r.get(key, math.nan) for r in rows])
    out[key] = f'{mean:.4f} ± {sd:.4f}' if math.isfinite(sd) else _fmt(mean)
  return out


def markdown_table(rows: Sequence[Dict], columns: Sequence[str]) -> str:
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '|'.join('---' for _ in columns) + '|']
  for row in rows:
    lines.append('| ' + ' | '.join(_fmt(row.get(c, '')) for c in columns) + ' |')
  return '\n'.join(lines)


def compare(workdirs: Sequence[str], output: Optional[str] = 'comparison.md') -> str:
  """A table of runs (a folder of runs expands to its runs); returns the Markdown and writes
  it to ``output`` plus the same rows as CSV (``output`` with ``.csv``)."""
  runs = [load_run(w) for path in workdirs for w in find_runs(path)]
  rows = [run_row(r) for r in runs]
  info = ['run', 'model', 'data', 'seed', 'fold', 'status', 'selected_step', 'parameters',
          'gflops', 'wall_time_s']
  if not any(r['fold'] != '' for r in rows):
    info.remove('fold')
  metric_keys = _metric_keys(rows)
  # Printed: the validation selection metric and the test metrics (val ones for
  # segmentation, which has no test split); the CSV holds every column.
  selection = {f"val/{r['config']['train']['selection_metric']}" for r in runs}
  tested = [k for k in metric_keys if k.startswith('test/')]
  shown = [k for k in metric_keys if k in selection] + (tested or [
      k for k in metric_keys if k not in selection])
  table = markdown_table(rows, info + shown)
  columns = info + metric_keys
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, 'w') as f:
      f.write(table + '\n')
    with open(os.path.splitext(output)[0] + '.csv', 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
      writer.writeheader()
      writer.writerows(rows)
  return table


# ----- HTML --------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1200px;color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.6em}h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}
.scroll{overflow-x:auto}details.run>summary{font-size:1.3em;font-weight:bold;margin-top:1em}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
tr.summary td{font-weight:bold;background:#fafae6}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em}
.plots img{max-width:100%;border:1px solid #eee;margin:4px}
.muted{color:#777}code{background:#f6f8fa;padding:1px 4px}
"""


def _html_table(rows: Sequence[Dict], columns: Sequence[str],
                summary: Optional[Dict] = None) -> str:
  head = ''.join(f'<th>{html.escape(c)}</th>' for c in columns)
  body = ''
  for row in rows:
    body += '<tr>' + ''.join(f'<td>{html.escape(_fmt(row.get(c, "")))}</td>'
                             for c in columns) + '</tr>'
  if summary:
    body += '<tr class="summary">' + ''.join(
        f'<td>{_e(summary.get(c, ""))}</td>' for c in columns) + '</tr>'
  return f'<table><tr>{head}</tr>{body}</table>'


def _image(path: str) -> str:
  with open(path, 'rb') as f:
    data = base64.b64encode(f.read()).decode('ascii')
  name = html.escape(os.path.basename(path))
  return f'<img src="data:image/png;base64,{data}" alt="{name}" title="{name}">'


def _fingerprint_html(fingerprint: Optional[Dict]) -> str:
  if not fingerprint:
    return '<p class="muted">no data_fingerprint.json</p>'
  if 'splits' in fingerprint:  # classification
    rows = []
    for split, entry in fingerprint['splits'].items():
      rows.append({'split': split, 'examples': entry['examples'],
                   'class counts': ', '.join(map(str, entry.get('class_counts',
                                                                entry.get('label_counts', [])))),
                   'images sha256': entry['images_sha256'][:16] + '…',
                   'labels sha256': entry['labels_sha256'][:16] + '…'})
    intro = (f"<p>{_e(fingerprint['name'])}: {_e(fingerprint['task'])}, classes "
             f"{_e(', '.join(map(str, fingerprint['class_names'])))}, image shape "
             f"{_e(tuple(fingerprint['image_shape']))}</p>")
    return intro + _html_table(rows, list(rows[0]))
  summary = fingerprint.get('summary', {})
  keys = ('modality', 'shape_median', 'shape_min', 'shape_max', 'spacing_median_mm',
          'spacing_min_mm', 'spacing_max_mm')
  rows = [{'property': k, 'value': str(summary[k])} for k in keys if k in summary]
  rows += [{'property': 'cases', 'value': str(fingerprint.get('cases'))},
           {'property': 'split', 'value': str(fingerprint.get('split'))},
           {'property': 'target spacing (mm)', 'value': str(fingerprint.get('target_spacing_mm'))},
           {'property': 'normalisation', 'value': str(
               fingerprint.get('prepare_options', {}).get('normalization'))}]
  return (f"<p>{_e(fingerprint.get('name'))} at "
          f"<code>{_e(fingerprint.get('root'))}</code>, classes "
          f"{html.escape(', '.join(fingerprint.get('class_names', [])))}</p>"
          + _html_table(rows, ['property', 'value']))


def _split_tables(results: Optional[Dict]) -> str:
  if not results:
    return '<p class="muted">training has not finished: no results.json</p>'
  tables = task_class(results.get('task', ''), Experiment).report_tables(results)
  if tables is not None:  # the task's own: [(caption, value, rows)]
    return ''.join(f'<p>{_e(caption)} {_e(_fmt(value))}</p>' + _html_table(rows, list(rows[0]))
                   for caption, value, rows in tables if rows)
  metrics = headline_metrics(results)
  splits = sorted({k.split('/')[0] for k in metrics}, key=('val', 'test').index)
  names = []
  for key in metrics:
    if key.split('/')[1] not in names:
      names.append(key.split('/')[1])
  rows = [{'split': s, **{n: metrics.get(f'{s}/{n}', '') for n in names}} for s in splits]
  return _html_table(rows, ['split'] + names)


def _runs_table(rows: Sequence[Dict]) -> str:
  """Metrics down, runs across, then the mean ± sd over the finished runs."""
  keys = _metric_keys(rows)
  done = [r for r in rows if r['status'] == 'done']
  summary = _summary_row(done, keys) if done else {}
  info = ['seed'] + (['fold'] if any(r['fold'] != '' for r in rows) else []) + [
      'status', 'selected_step']
  table = []
  for key in info + keys:
    entry = {'': key, **{r['run']: r.get(key, '') for r in rows}}
    entry['mean ± sd'] = summary.get(key, '') if key in keys else ''
    table.append(entry)
  return _html_table(table, [''] + [r['run'] for r in rows] + ['mean ± sd'])


def reproduce_commands(run: Dict) -> str:
  command = run['command'] or {}
  version = (run['results'] or {}).get('versions', {}).get('medjax', '')
  lines = []
  if command.get('argv'):
    argv = list(command['argv'])
    argv[0] = os.path.basename(argv[0])
    lines.append(f"# as it was run (in {command.get('cwd', '?')}):")
    lines.append(' '.join(argv))
  lines.append('# exactly this config, into a new workdir:')
  if command.get('git_commit'):
    lines.append(f"git checkout {command['git_commit']} && pip install -e .")
  elif version:
    lines.append(f'pip install medjax=={version}')
  lines.append(f"medjax train --config {os.path.join(run['workdir'], 'config.json')} "
               f"--workdir {run['workdir'].rstrip('/')}_repeat")
  return '\n'.join(lines)


def _run_section(run: Dict, heading: str) -> str:
  parts = [f'<h2>{html.escape(heading)}</h2>'] if heading else []
  parts.append('<h3>Metrics (selected checkpoint)</h3>' + _split_tables(run['results']))
  results = run['results'] or {}
  if results:
    parts.append(f"<p class='muted'>selected step {_e(results.get('selected_step'))} (epoch "
                 f"{_e(_number(results.get('selected_epoch'), '.1f'))}) by "
                 f"{_e(results.get('selection_metric'))} "
                 f"({_e(results.get('selection_mode'))})</p>")
    per_case = (results.get('val') or {}).get('per_case')
    if per_case:
      rows = []
      for case, classes in per_case.items():
        row = {'case': case}
        for cls, m in classes.items():
          row[f'dice {cls}'] = m['dice']
          row[f'hd95 {cls} (mm)'] = m['hd95']
        rows.append(row)
      parts.append(f'<details><summary>per-case validation metrics ({len(rows)} cases)'
                   '</summary>' + _html_table(rows, list(rows[0])) + '</details>')
  if run['plots']:
    parts.append('<h3>Plots</h3><div class="plots">' + ''.join(_image(p) for p in run['plots'])
                 + '</div>')
  parts.append('<h3>Data</h3>' + _fingerprint_html(run['fingerprint']))
  summary = run['model_summary']
  if summary:
    from medjax.models.summary import format_summary
    parts.append(f"<h3>Model</h3><p>{_e(summary.get('name', summary['model']))}: "
                 f"{_e(_number(summary['parameters'], ','))} parameters</p><pre>"
                 f"{html.escape(format_summary(summary))}</pre>")
  parts.append('<h3>Config</h3><details><summary>config.json</summary><pre>'
               + html.escape(json.dumps(run['config'], indent=2, sort_keys=True))
               + '</pre></details>')
  versions = results.get('versions')
  if versions:
    parts.append('<h3>Versions</h3>' + _html_table(
        [{'package': k, 'version': v} for k, v in sorted(versions.items())],
        ['package', 'version']))
    info = results.get('run_info', {})
    if info:
      parts.append(f"<p class='muted'>{_e(info.get('devices'))} {_e(info.get('platform'))} "
                   f"device(s), {_e(_number(info.get('wall_time_s'), '.0f'))} s wall time</p>")
  parts.append('<h3>Reproduce</h3><pre>' + html.escape(reproduce_commands(run)) + '</pre>')
  return '\n'.join(parts)


def write_report(path: str, output: Optional[str] = None) -> str:
  """Writes the HTML report of a run or of a folder of runs; returns its path
  (default ``<path>/report.html``)."""
  workdirs = find_runs(path)
  runs = [load_run(w) for w in workdirs]
  output = output or os.path.join(path, 'report.html')
  title = os.path.basename(os.path.normpath(path)) or path
  parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
           f'<title>medjax report: {html.escape(title)}</title><style>{_CSS}</style></head><body>',
           f'<h1>medjax report: {html.escape(title)}</h1>']
  first = runs[0]
  parts.append(f"<p>{len(runs)} run(s) in <code>{html.escape(os.path.abspath(path))}</code>; "
               f"model {html.escape(first['config']['model']['name'])}, task "
               f"{html.escape((first['results'] or {}).get('task', first['config']['task']))}, "
               f"data {html.escape(row_data(first))}</p>")
  if len(runs) > 1:
    rows = [run_row(r, path) for r in runs]
    parts.append('<h2>Runs: mean and sd</h2><div class="scroll">' + _runs_table(rows)
                 + '</div><p class="muted">sd: sample standard deviation (n-1) over the '
                 'finished runs.</p>')
    for run in runs:
      name = os.path.relpath(run['workdir'], path)
      parts.append(f'<details class="run"><summary>Run {html.escape(name)}</summary>'
                   + _run_section(run, '') + '</details>')
  else:
    parts.append(_run_section(first, 'Run'))
  parts.append('</body></html>')
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, 'w') as f:
    f.write('\n'.join(parts))
  return output


def row_data(run: Dict) -> str:
  return (run['results'] or {}).get('dataset') or run['config']['data']['name']
