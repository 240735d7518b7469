"""The install extras: accelerators at the core dependency's jax version."""

import importlib.metadata
import os
import tomllib

import pytest
from packaging.requirements import Requirement

from conftest import REPO


def _project():
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)['project']


def _jax(requirements):
  found = [Requirement(r) for r in requirements if Requirement(r).name == 'jax']
  assert len(found) == 1, requirements
  return found[0]


@pytest.mark.parametrize('extra,jax_extra,plugin', [
    ('cuda', 'cuda12', 'jax-cuda12-plugin'),
    ('cuda13', 'cuda13', 'jax-cuda13-plugin'),
    ('tpu', 'tpu', 'libtpu'),
])
def test_accelerator_extras_pin_the_core_jax_version(extra, jax_extra, plugin):
  project = _project()
  core = _jax(project['dependencies'])
  accelerator = _jax(project['optional-dependencies'][extra])
  assert accelerator.extras == {jax_extra}
  assert accelerator.specifier == core.specifier
  # The installed jax is inside that range, and its own metadata ties the plugin of that
  # extra to it (the CUDA plugins to exactly its version): pip resolves one jax for both.
  installed = importlib.metadata.version('jax')
  assert core.specifier.contains(installed)
  pinned = [Requirement(r) for r in importlib.metadata.requires('jax')
            if Requirement(r).name == plugin
            and Requirement(r).marker.evaluate({'extra': jax_extra})]
  assert pinned, f'jax {installed} has no {plugin} in its [{jax_extra}] extra'
  if plugin.startswith('jax-'):
    major, minor, patch = (int(x) for x in installed.split('.')[:3])
    neighbours = [f'{major}.{minor}.{patch + 1}'] + ([f'{major}.{minor}.{patch - 1}']
                                                    if patch else [])
    for requirement in pinned:
      assert list(requirement.specifier.filter([installed] + neighbours)) == [installed]
