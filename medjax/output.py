"""What medjax prints: one line per event; the libraries' own logs and tracebacks behind
``--debug``.

The CLI runs each command inside :func:`cli_output`. Library code asks :func:`debug` whether
to show the full detail of something it otherwise reports in one line (an environment
variable, so that processes started by the command follow it too).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import medjax

DEBUG_ENV = 'MEDJAX_DEBUG'
# Read by TensorFlow's and XLA's C++ logging once, when each library is loaded.
TF_LOG_ENV = 'TF_CPP_MIN_LOG_LEVEL'


def debug() -> bool:
  """Whether ``--debug`` is on: show tracebacks and the libraries' own logs."""
  return os.environ.get(DEBUG_ENV, '') not in ('', '0')


@contextlib.contextmanager
def cli_output(debug_on: bool) -> Iterator[None]:
  """One CLI command's output settings; the environment is put back afterwards (``main`` may
  be called in-process, as the tests do).

  Without ``--debug``, TensorFlow's and XLA's C++ log stays at ERROR and above, even where
  the environment asks for less (a command's output is medjax's): their start-up INFO and
  WARNING lines (CPU features; "oneDNN custom operations are on", printed by each of two
  TensorFlow shared libraries, hence twice) never show. With ``--debug`` they do (level 0,
  unless the user set a level). TF_ENABLE_ONEDNN_OPTS is left alone: turning oneDNN off would
  change TensorFlow's CPU numerics, not only its log.
  """
  saved = {name: os.environ.get(name) for name in (DEBUG_ENV, TF_LOG_ENV)}
  os.environ[DEBUG_ENV] = '1' if debug_on else '0'
  user_level = medjax.USER_TF_LOG_LEVEL
  if debug_on:
    if user_level is None:
      os.environ[TF_LOG_ENV] = '0'
  elif not (user_level or '').isdigit() or int(user_level) < 2:
    os.environ[TF_LOG_ENV] = '2'
  try:
    yield
  finally:
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


def warn(message: str) -> None:
  """One warning line on stderr (stdout may be a command's JSON, as ``evaluate``'s is)."""
  print(f'warning: {message}', file=sys.stderr, flush=True)


def first_line(error: BaseException) -> str:
  """``Type: first line`` of the innermost cause of ``error``: the library's own words,
  without the wrappers' context."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0].strip()}' if lines else type(error).__name__


def shorten(text: str, limit: int = 200) -> str:
  return text if len(text) <= limit else text[:limit - 3] + '...'
