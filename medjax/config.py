"""Experiment configs: defaults, strict merging, file loading and command-line overrides.

A config file is a Python file with ``get_config(arg: str | None = None) -> ConfigDict``
(``configs/NAME.py`` or ``configs/NAME.py:runlocal`` to pass ``arg``). It only states what
differs from :func:`default_config`; every key it sets must exist there, so a typo such as
``optimizer.learnig_rate`` is an error, not a silently ignored setting. Model keyword
arguments (``model.*`` other than ``model.name``) are checked against the chosen model.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from typing import Any, Callable, Sequence

import ml_collections


class ConfigError(ValueError):
  """A config that cannot be used: unknown key, wrong type, bad value, bad file."""


# Functions that add their module's keys and defaults to a config (see :func:`declare`).
_DECLARED: list = []
BUILT_IN_DECLARATIONS = 'medjax.experiments'  # importing it declares every built-in key


def declare(add_defaults: Callable[[ml_collections.ConfigDict], None]):
  """Registers ``add_defaults(config)``, which sets its module's keys and their defaults
  (usually in one section: ``section(config, 'semi').threshold_mode = 'fixed'``). Each task,
  semi-supervised method, dataset family and augmentation declares its keys beside its code;
  :func:`default_config` assembles them. Used as a decorator; returns the function."""
  _DECLARED.append(add_defaults)
  return add_defaults


def section(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """``config.<name>``, created empty if missing (for :func:`declare`)."""
  if name not in config:
    config[name] = ml_collections.ConfigDict()
  return config[name]


def _add_declared(base: ml_collections.ConfigDict, part: ml_collections.ConfigDict,
                  prefix: str, owner: str) -> None:
  for key, value in part.items():
    if key not in base:
      base[key] = value
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(
        base[key], ml_collections.ConfigDict):
      _add_declared(base[key], value, f'{prefix}{key}.', owner)
    elif base[key] != value:
      raise ConfigError(f"config key '{prefix}{key}' is declared twice with different defaults "
                        f'({base[key]!r}, and {value!r} by {owner})')


def default_config() -> ml_collections.ConfigDict:
  """Every config key medjax understands, with its default: the keys every registered task,
  method, dataset family and augmentation declared (:func:`declare`)."""
  # The built-in tasks, methods, datasets and augmentations declare their keys when their
  # package is imported. By name: config sits below every module that declares keys (they
  # import it), so it loads them as plugins rather than depending on them.
  importlib.import_module(BUILT_IN_DECLARATIONS)
  c = ml_collections.ConfigDict()
  for add_defaults in _DECLARED:
    part = ml_collections.ConfigDict()
    add_defaults(part)
    _add_declared(c, part, '', f'{add_defaults.__module__}.{add_defaults.__name__}')
  return c


_EXTENSIBLE = ('model',)  # sections whose extra keys are validated elsewhere (model kwargs)


def _suggest(key: str, options: Sequence[str]) -> str:
  close = difflib.get_close_matches(key, list(options), n=1)
  return f" (did you mean '{close[0]}'?)" if close else ''


def _merge(base: ml_collections.ConfigDict, update: Any, prefix: str) -> None:
  for key, value in update.items():
    path = f'{prefix}{key}'
    if key not in base:
      if prefix.rstrip('.') in _EXTENSIBLE:
        with base.unlocked():
          base[key] = value
        continue
      raise ConfigError(
          f"unknown config key '{path}'{_suggest(key, base.keys())}; valid keys"
          f"{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(base.keys()))}")
    current = base[key]
    if isinstance(current, ml_collections.ConfigDict):
      if not hasattr(value, 'items'):
        raise ConfigError(f"config key '{path}' is a section; got {value!r}")
      _merge(current, value, path + '.')
    else:
      base[key] = _coerce(path, current, value)


def _coerce(path: str, current: Any, value: Any) -> Any:
  """Returns ``value`` converted to the type of the default ``current``."""
  if current is None or value is None:
    return value
  if isinstance(current, bool):
    if isinstance(value, bool):
      return value
    raise ConfigError(f"config key '{path}' expects true/false, got {value!r}")
  if isinstance(current, (int, float)) and not isinstance(value, bool) and isinstance(
      value, (int, float)):
    if isinstance(current, int) and isinstance(value, float) and not value.is_integer():
      raise ConfigError(f"config key '{path}' expects an integer, got {value!r}")
    return type(current)(value)
  if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
    return tuple(value)
  if isinstance(current, str) and isinstance(value, str):
    return value
  raise ConfigError(
      f"config key '{path}' expects {type(current).__name__}, got {value!r} "
      f"({type(value).__name__})")


def apply_variant(config: ml_collections.ConfigDict, arg: str | None,
                  **variants: Callable[[ml_collections.ConfigDict], None]
                  ) -> ml_collections.ConfigDict:
  """Applies the variant ``arg`` of ``configs/NAME.py:arg`` (``runlocal``, ``cpu``, ...):
  each variant is a function that edits the config in place; no argument, no variant.

    def get_config(arg=None):
      c = ...
      return config_lib.apply_variant(c, arg, runlocal=_runlocal)
  """
  if arg:
    if arg not in variants:
      raise ConfigError(f"unknown config argument '{arg}'; this config has "
                        f"{', '.join(sorted(variants)) or 'no variants'} (or none)")
    variants[arg](config)
  return config


def resolve(config: Any) -> ml_collections.ConfigDict:
  """Merges a (partial) config onto :func:`default_config`, rejecting unknown keys."""
  base = default_config()
  _merge(base, config, '')
  return base


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path/to/config.py[:arg]``, or a run's saved ``config.json`` (to repeat that run
exactly), and returns its resolved config."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f'config file not found: {path}')
  if path.endswith('.json'):
    if arg:
      raise ConfigError(f'{path}: a saved JSON config takes no argument (got :{arg})')
    try:
      return from_json_file(path)
    except json.JSONDecodeError as e:
      raise ConfigError(f'{path}: not valid JSON ({e})') from None
    except ConfigError as e:
      raise ConfigError(f'{path}: {e}') from None
  module_spec = importlib.util.spec_from_file_location('_medjax_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'config file {path} has no get_config() function')
  try:
    return resolve(module.get_config(arg) if arg else module.get_config())
  except ConfigError as e:
    raise ConfigError(f'{path}: {e}') from None


def parse_value(text: str) -> Any:
  """Parses an override value: Python literal if it is one, else the raw string."""
  lowered = text.lower()
  if lowered in ('true', 'false'):
    return lowered == 'true'
  if lowered in ('none', 'null'):
    return None
  if lowered in ('inf', '+inf', '-inf', 'nan'):
    return float(lowered)
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _lookup(config: ml_collections.ConfigDict, parts: Sequence[str]) -> Any:
  node: Any = config
  for part in parts:
    if not hasattr(node, 'keys') or part not in node:
      return None
    node = node[part]
  return node


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies ``key.sub=value`` overrides (as from ``--config.key.sub=value``)."""
  for item in overrides:
    key, sep, text = item.partition('=')
    if not sep:
      raise ConfigError(f"override '{item}' is not of the form key=value")
    nested: dict = {}
    node = nested
    parts = key.split('.')
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    value = parse_value(text)
    # A string key given something that parses as a literal ('--config.data.flag=123')
    # keeps the text as written.
    if isinstance(_lookup(config, parts), str) and not isinstance(value, str):
      value = text
    node[parts[-1]] = value
    _merge(config, nested, '')
  return config


def from_json_file(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    return resolve(json.load(f))
