"""benchmarks/accelerator.py --tiny: the device benchmark runs end to end on a CPU."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

SCRIPT = os.path.join(REPO, 'benchmarks', 'accelerator.py')


@pytest.mark.slow
def test_tiny_run_writes_every_case_and_records_a_case_that_did_not_finish(tmp_path):
  out = tmp_path / 'a.json'
  done = subprocess.run([sys.executable, SCRIPT, '--tiny', '--cases', 'unet3d_hippocampus',
                         '--precisions', 'bfloat16', '--augment', 'host', 'device',
                         '--out', str(out)],
                        capture_output=True, text=True, timeout=900, cwd=REPO)
  assert done.returncode == 0, done.stderr[-2000:]
  report = json.loads(out.read_text())
  rows = {(r['case'], r['precision'], r['augment']): r for r in report['results']}
  assert set(rows) == {('unet3d_hippocampus', 'bfloat16', a) for a in ('host', 'device')}
  for row in rows.values():
    assert 'skipped' not in row, row
    assert row['step_per_s'] > 0 and row['pipeline_per_s'] > 0
    assert np.isfinite(row['loss'])
  assert report['accelerator']['platform'] == 'cpu'
  assert 'step ex/s' in done.stdout  # the table

  # A case that cannot finish (here: a time limit no run meets) is a row with its reason.
  out = tmp_path / 'b.json'
  done = subprocess.run([sys.executable, SCRIPT, '--tiny', '--cases', 'resnet18_28',
                         '--precisions', 'float32', '--augment', 'host', '--timeout', '0.01',
                         '--out', str(out)], capture_output=True, text=True, timeout=300,
                        cwd=REPO)
  assert done.returncode == 0, done.stderr[-2000:]
  (row,) = json.loads(out.read_text())['results']
  assert row['skipped'] == 'medjax: over 0 s'
