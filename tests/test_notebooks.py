"""Every notebook runs top to bottom in its tiny setting (MEDJAX_SMOKE=1), so none can rot."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.slow
NOTEBOOKS = os.path.join(REPO, 'notebooks')
# Notebooks that need real data the repository cannot embed (the others fall back to
# synthetic data).
NEEDS = {'02_new_architecture.ipynb': os.path.join(SHARED_DATA, 'medmnist', 'breastmnist.npz')}


def _notebooks():
  return sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith('.ipynb'))


def test_notebooks_are_stored_without_outputs():
  for name in _notebooks():
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    for cell in nb.cells:
      if cell.cell_type == 'code':
        assert not cell.outputs and cell.execution_count is None, name


@pytest.mark.parametrize('name', _notebooks())
def test_notebook_runs_in_smoke_mode(name, tmp_path, monkeypatch):
  needed = NEEDS.get(name)
  if needed and not os.path.exists(needed):
    pytest.skip(f'real data not available: {needed} (the ../shared/data folder beside the repo)')
  monkeypatch.setenv('MEDJAX_SMOKE', '1')
  monkeypatch.setenv('MEDJAX_RUNS', str(tmp_path / 'runs'))
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  client = NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': NOTEBOOKS}})
  client.execute()  # raises CellExecutionError naming the failing cell
  errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
            if o.output_type == 'error']
  assert not errors
  images = sum(1 for c in nb.cells if c.cell_type == 'code' for o in c.outputs
               if 'image/png' in o.get('data', {}))
  assert images >= 2, f'{name} displayed {images} images'
