"""Command line: ``medjax train`` and ``medjax evaluate``.

  medjax train --config configs/quickstart.py --workdir runs/quickstart [--config.KEY=VALUE ...]
  medjax train --config configs/breastmnist.py:runlocal --workdir /tmp/b
  medjax evaluate --workdir runs/quickstart --split test [--step N]
  medjax data check ../shared/data/msd_hippocampus [--json fingerprint.json]
  medjax predict --workdir DIR --input FILE_OR_FOLDER --output DIR
  medjax score --pred PRED_DIR --ref LABEL_DIR --out DIR
  medjax explain --workdir DIR --input FILE_OR_FOLDER --output DIR [--layer NAME] [--class C]
  medjax report --workdir DIR            (one HTML page; DIR may hold several seeds/folds)
  medjax compare DIR1 DIR2 ... [--output comparison.md]
  medjax benchmark medmnist --datasets breastmnist,pneumoniamnist --seeds 0,1,2 --workdir DIR

Running ``train`` again on the same workdir resumes from its latest checkpoint.

Exit status: 0 done; 1 the run failed (training diverged) or ``data check`` found problems;
2 a user error (bad config, missing or malformed file, unusable workdir, ...), reported in
one line naming the file; ``--debug`` shows the traceback instead. Warnings are one line
each on stderr; ``--debug`` also shows the libraries' own logs (TensorFlow and XLA start-up,
Orbax's read errors in full): medjax/output.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Tuple

from medjax import output


def _split_overrides(argv: List[str]) -> Tuple[List[str], List[str]]:
  """Separates ``--config.key=value`` (or ``--config.key value``) from the other args."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config.'):
      body = arg[len('--config.'):]
      if '=' not in body:
        if i + 1 >= len(argv):
          raise SystemExit(f'medjax: {arg} needs a value')
        body = f'{body}={argv[i + 1]}'
        i += 1
      overrides.append(body)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='medjax', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--debug', action='store_true',
                      help='show the traceback of an error instead of one line, and the '
                           "libraries' own logs (TensorFlow/XLA start-up, Orbax read errors)")
  sub = parser.add_subparsers(dest='command', required=True)
  train = sub.add_parser('train', help='train (or resume) a model')
  train.add_argument('--config', required=True,
                     help='config file, optionally with an argument: configs/x.py[:runlocal]')
  train.add_argument('--workdir', required=True, help='directory for checkpoints and results')
  train.add_argument('--seeds', default='', metavar='K,K,...',
                     help='train these seeds together in one compiled program '
                          '(train.seeds): one workdir each, WORKDIR/seed_<K>, and '
                          'WORKDIR/summary.json')
  train.add_argument('--allow_change', action='append', default=[], metavar='KEY',
                     help='resume with a new value of KEY (train.num_epochs, '
                          'train.eval_every_epochs, train.log_every_steps or '
                          'train.keep_checkpoints); recorded in config_history.jsonl')
  multihost = train.add_argument_group(
      'multi-host', 'start one process per host with the same command; on Cloud TPU and SLURM '
      'use --distributed alone (addresses are detected)')
  multihost.add_argument('--distributed', action='store_true',
                         help='call jax.distributed.initialize() before training')
  multihost.add_argument('--coordinator_address', default=None, help='host:port of process 0')
  multihost.add_argument('--num_processes', type=int, default=None)
  multihost.add_argument('--process_id', type=int, default=None)
  evaluate = sub.add_parser('evaluate', help='re-evaluate the selected checkpoint of a workdir, '
                            'or the ensemble of several segmentation workdirs')
  evaluate.add_argument('--workdir', required=True, action='append',
                        help='a workdir; given several times, the mean of their probabilities '
                             '(segmentation, same data and split) is scored')
  evaluate.add_argument('--split', default='test', choices=['train', 'val', 'test'])
  evaluate.add_argument('--step', type=int, default=None,
                        help='checkpoint step (default: the selected one); another step, or '
                             'other --mirror_axes, writes under WORKDIR/evaluations/, leaving '
                             "the run's own predictions and eval_<split>.json as they are")
  evaluate.add_argument('--mirror_axes', default=None, metavar='AXES',
                        help='segmentation: test-time mirroring over these axes of the '
                             "network's input, e.g. 0,1 (default: the workdir's config)")
  evaluate.add_argument('--output', default=None,
                        help='ensembles: folder for eval_<split>.json and the label maps')
  data = sub.add_parser('data', help='dataset tools')
  data_sub = data.add_subparsers(dest='data_command', required=True)
  check = data_sub.add_parser('check', help='validate every case of a dataset and print its '
                              'fingerprint (shapes, spacings, classes, problems)')
  check.add_argument('path', help='dataset folder (MSD dataset.json or image/label folders)')
  check.add_argument('--json', default=None, help='also write the full report here')
  check.add_argument('--max_cases', type=int, default=0, help='check only the first N cases')
  predict = sub.add_parser('predict', help='segment (NIfTI label maps with each input\'s '
                           'affine) or detect (detections.csv, JSON, COCO) in new files with a '
                           'trained workdir')
  predict.add_argument('--workdir', required=True, action='append',
                       help='a workdir; given several times, the mean of their probabilities '
                            '(an ensemble sharing the data preparation)')
  predict.add_argument('--input', required=True, help='a NIfTI file or a folder of them')
  predict.add_argument('--output', required=True, help='folder for the predictions')
  predict.add_argument('--step', type=int, default=None)
  predict.add_argument('--mirror_axes', default=None, metavar='AXES',
                       help="test-time mirroring for this prediction, e.g. 0,1,2 (default: "
                            "the run's own inference.mirror_axes)")
  score = sub.add_parser('score', help='score predicted label maps against references '
                         '(per-case CSV and summary JSON), or detections against LUNA16 '
                         'annotations (FROC, CPM)')
  score.add_argument('--pred', help='folder of predicted NIfTI label maps')
  score.add_argument('--ref', help='folder of reference NIfTI label maps')
  score.add_argument('--detections', help='detections.csv (seriesuid,coordX,coordY,coordZ,'
                     'probability; world mm, LPS)')
  score.add_argument('--annotations', help='annotations.csv (seriesuid,coordX,coordY,coordZ,'
                     'diameter_mm)')
  score.add_argument('--series_ids', default=None, help='seriesuids.csv: every scan scored '
                     '(default: the scans named in either file)')
  score.add_argument('--excluded', default=None, help="LUNA16's annotations_excluded.csv")
  score.add_argument('--out', required=True, help='folder for the scores')
  score.add_argument('--num_classes', type=int, default=None,
                     help='classes including background (default: from the data)')
  score.add_argument('--label_values', default='',
                     help='stored value of each class in the references, e.g. 255,0')
  explain = sub.add_parser('explain', help='Grad-CAM, saliency and integrated gradients of '
                           'a trained model on image files (PNG overlays and arrays)')
  explain.add_argument('--workdir', required=True)
  explain.add_argument('--input', default=None,
                       help='an image (PNG/JPEG/TIFF/.npy/NIfTI) or a folder of them')
  explain.add_argument('--output', default=None, help='folder for the overlays and arrays')
  explain.add_argument('--layer', default=None,
                       help='module whose activations Grad-CAM uses (default: the last '
                       'feature map; the bottleneck for segmenters); see --list_layers')
  explain.add_argument('--class', dest='target_class', default=None,
                       help='class to explain, by name or index (default: the predicted one; '
                       'for segmenters every foreground class)')
  explain.add_argument('--methods', default=','.join(('gradcam', 'saliency',
                                                      'integrated_gradients')),
                       help='comma-separated subset of gradcam,saliency,integrated_gradients '
                       '(classifiers)')
  explain.add_argument('--ig_steps', type=int, default=32, help='integrated-gradients steps')
  explain.add_argument('--step', type=int, default=None)
  explain.add_argument('--list_layers', action='store_true',
                       help='print the model\'s layers (names usable as --layer) and exit')
  report = sub.add_parser('report', help='one HTML page for a run, or for a folder of runs '
                          '(seeds/folds: mean and sd)')
  report.add_argument('--workdir', required=True)
  report.add_argument('--output', default=None, help='default: <workdir>/report.html')
  compare = sub.add_parser('compare', help='a table of several runs (printed, and written '
                           'as Markdown and CSV)')
  compare.add_argument('workdirs', nargs='+')
  compare.add_argument('--output', default='comparison.md',
                       help='Markdown file; a .csv with the same name is written beside it')
  benchmark = sub.add_parser('benchmark', help='published benchmarks over several seeds')
  benchmark_sub = benchmark.add_subparsers(dest='benchmark', required=True)
  medmnist = benchmark_sub.add_parser(
      'medmnist', help='train a MedMNIST recipe for N seeds per dataset; print test AUC/ACC '
      '(mean ± sd) beside the published 28 px figures')
  medmnist.add_argument('--datasets', default='breastmnist,pneumoniamnist',
                        help='comma-separated MedMNIST flags')
  medmnist.add_argument('--seeds', default='0,1,2', help='comma-separated seeds')
  medmnist.add_argument('--workdir', required=True,
                        help='one workdir per run under WORKDIR/<dataset>/<recipe>/seed_<K>')
  medmnist.add_argument('--recipe', default='',
                        help='a config file used for every dataset (default: '
                             'configs/<dataset>.py, the paper recipe)')
  medmnist.add_argument('--variant', default='',
                        help="each dataset's configs/<dataset>.py:<variant> (cpu: its small-CNN "
                             'recipe, minutes per run on a CPU); not with --recipe')
  medmnist.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='config override for every run (repeatable)')
  return parser


EXIT_RUN_FAILED = 1
EXIT_USER_ERROR = 2


def main(argv: Optional[List[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, overrides = _split_overrides(argv)
  args = _parser().parse_args(rest)
  try:
    with output.cli_output(args.debug):  # before TensorFlow or jaxlib is imported
      return _run(args, overrides)
  except (ValueError, OSError) as e:  # config, input files, workdir, disk: the user's to fix
    if args.debug:
      raise
    kind = 'config error' if type(e).__name__ == 'ConfigError' else 'error'
    print(f'medjax: {kind}: {e}', file=sys.stderr)
    return EXIT_USER_ERROR


def _run(args, overrides: List[str]) -> int:
  if args.command == 'data':
    return _data_check(args)
  commands = {'score': _score, 'predict': _predict, 'explain': _explain, 'report': _report,
              'compare': _report, 'benchmark': _benchmark}
  from medjax import config as config_lib  # after parsing: --help stays fast
  if overrides and args.command != 'train':
    raise config_lib.ConfigError('--config.* overrides apply to train only')
  if args.command in commands:
    return commands[args.command](args)
  if args.command == 'train':
    config = config_lib.load_config_file(args.config)
    if args.seeds:  # the same as --config.train.seeds=(0,1,2)
      overrides.append(f'train.seeds=({args.seeds},)')
    config_lib.apply_overrides(config, overrides)
    if args.distributed or args.coordinator_address:
      initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  from medjax import train as train_lib
  if args.command == 'evaluate':
    # The metrics are printed before anything is written: a read-only workdir loses nothing.
    mirror = (None if args.mirror_axes is None else
              tuple(int(a) for a in args.mirror_axes.split(',') if a.strip()))
    if len(args.workdir) > 1:
      if args.step is not None:
        raise ValueError('--step applies to one workdir; an ensemble uses '
                         "each workdir's selected checkpoint")
      train_lib.evaluate_ensemble(args.workdir, args.split, mirror, args.output,
                                  on_result=_print_evaluation)
      return 0
    if args.output:
      raise ValueError('--output is for ensembles (several --workdir); one '
                       'workdir is evaluated into itself')
    train_lib.evaluate_workdir(args.workdir[0], args.split, args.step,
                               on_result=_print_evaluation, mirror_axes=mirror)
    return 0
  try:
    results = train_lib.train_and_evaluate(config, args.workdir, args.allow_change)
  except train_lib.TrainingDiverged as e:
    print(f'medjax: training failed: {e}', file=sys.stderr)
    return EXIT_RUN_FAILED
  if 'val' in results and 'headline_metrics' in results and 'splits' not in results:
    _print_metrics(results)
  return 0


def _print_evaluation(result) -> None:
  print(json.dumps({'split': result['split'],
                    **{k: result[k] for k in ('step', 'steps', 'mirror_axes') if k in result},
                    **{k: v for k, v in result['metrics'].items()
                       if k != 'confusion_matrix'}}, indent=2), flush=True)


def _data_check(args) -> int:
  """Exit status 0 if every case is valid, 1 if problems were found or nothing was read."""
  from medjax.data import layouts
  report = layouts.check_dataset(args.path, args.max_cases)
  print(layouts.format_report(report))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=2)
  return EXIT_RUN_FAILED if report['problems'] else 0


def _predict(args) -> int:
  from medjax import apply
  mirror = (None if args.mirror_axes is None else
            tuple(int(a) for a in args.mirror_axes.split(',') if a.strip()))
  written = apply.predict_files(args.workdir, args.input, args.output, args.step, mirror)
  print(f'wrote {len(written)} file(s) to {args.output}')
  return 0


def _explain(args) -> int:
  from medjax import explain
  if args.list_layers:
    from medjax.train import restore_workdir
    exp, state, _ = restore_workdir(args.workdir, args.step)
    for layer in explain.trace_layers(exp.model, exp.variables(state), exp.input_shape):
      if layer.name:
        print(f"{layer.name:<40} {layer.kind:<16} {'x'.join(map(str, layer.output_shape[1:]))}")
    return 0
  if not (args.input and args.output):
    raise ValueError('explain needs --input and --output (or --list_layers)')
  methods = [m.strip() for m in args.methods.split(',') if m.strip()]
  from medjax import apply
  records = apply.explain_files(args.workdir, args.input, args.output, args.step,
                                  args.layer, args.target_class, methods, args.ig_steps)
  print(f'explained {len(records)} input(s); overlays and arrays in {args.output}')
  return 0


def _report(args) -> int:
  from medjax import report
  if args.command == 'report':
    print(f'wrote {report.write_report(args.workdir, args.output)}')
  else:
    print(report.compare(args.workdirs, args.output))
  return 0


def _benchmark(args) -> int:
  from medjax import benchmark
  print(benchmark.main_medmnist(args.datasets, args.seeds, args.workdir, args.recipe, args.set,
                               args.variant))
  return 0


def _score(args) -> int:
  from medjax import scoring
  if args.detections or args.annotations:
    return _score_detections(args)
  if not (args.pred and args.ref):
    raise ValueError('score needs --pred and --ref (label maps), or --detections and '
                     '--annotations (LUNA16 CSVs)')
  values = tuple(int(v) for v in args.label_values.split(',')) if args.label_values else ()
  summary = scoring.score_folders(args.pred, args.ref, args.out, args.num_classes, values)
  print(f"{summary['cases']} cases")
  for cls, entry in summary['classes'].items():
    print(f'class {cls}: ' + ', '.join(f"{m} {v['mean']:.4f} ± {v['sd']:.4f}"
                                       for m, v in entry.items()))
  return 0


def _score_detections(args) -> int:
  from medjax.detection import froc
  from medjax.workdir import write_json
  if not (args.detections and args.annotations):
    raise ValueError('score needs both --detections and --annotations')
  summary = froc.score_csv(args.detections, args.annotations, args.series_ids, args.excluded)
  os.makedirs(args.out, exist_ok=True)
  write_json(os.path.join(args.out, 'froc.json'), summary)
  rates = [k for k in summary if k.startswith('sensitivity_at_')]
  print(f"CPM {summary['cpm']:.4f}; sensitivity " + ', '.join(
      f"{summary[k]:.3f} at {k[len('sensitivity_at_'):]}" for k in rates) + ' FP/scan')
  return 0


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """``jax.distributed.initialize``; on CPU, cross-process collectives use gloo."""
  import jax
  if jax.config.jax_platforms in (None, '', 'cpu') or jax.config.jax_platforms == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def _print_metrics(results) -> None:
  """The task's headline metrics of each scored split, as a table."""
  splits = [s for s in ('val', 'test') if s in results]
  keys = results['headline_metrics']
  width = max(12, *(len(k) + 2 for k in keys))
  print(f"\n{'split':<6}" + ''.join(f'{k:>{width}}' for k in keys))
  for split in splits:
    print(f'{split:<6}' + ''.join(f'{results[split].get(k, float("nan")):>{width}.4f}'
                                  for k in keys))


if __name__ == '__main__':
  sys.exit(main())
