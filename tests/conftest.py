import os

import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.normpath(os.path.join(REPO, '..', 'shared', 'data'))


def shared_file(*parts: str) -> str:
  """Path of a file in ../shared/data; skips the test with the reason if it is absent."""
  path = os.path.join(SHARED_DATA, *parts)
  if not os.path.exists(path):
    pytest.skip(f'real data not available: {path} (the ../shared/data folder beside the repo)')
  return path
