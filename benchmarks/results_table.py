"""What the benchmarks share: timing a compiled step, skipping a case that does not fit in
the machine's memory (with its reason, so the other cases still run and are written), and at
the end printing the rows as a table and writing them as JSON with a description of the
machine (so numbers from different machines are not confused). The same column specs give the
Markdown tables of ``docs/results/`` (``results_pages.py``)."""

from __future__ import annotations

import gc
import json
import os
import platform
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# (row key, column header, format spec); a missing value prints as nan. A value that is a
# ``{'mean', 'sd'}`` dict prints as ``mean ± sd``, each with the spec.
Column = Tuple[str, str, str]


def seconds_per_step(step, state, *args, steps: int, warmup: int = 1) -> float:
  """Wall seconds per call of ``state, out = step(state, *args)`` after ``warmup`` calls
  (compilation), waiting for the device at both ends."""
  import time

  import jax
  for _ in range(warmup):
    state, out = step(state, *args)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(steps):
    state, out = step(state, *args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


class DoesNotFit(Exception):
  """A benchmark case that needs more memory than this machine has; the message says why."""


def available_memory_bytes() -> Optional[int]:
  """Memory the kernel can give a new allocation without swapping (Linux ``MemAvailable``);
  None where unknown."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def program_bytes(stats) -> int:
  """What a compiled XLA program needs at once, from its ``memory_analysis()``: the peak
  where XLA reports one, else arguments + outputs + temporaries - aliased buffers."""
  peak = getattr(stats, 'peak_memory_in_bytes', 0) or 0
  return peak or (stats.argument_size_in_bytes + stats.output_size_in_bytes
                  + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def check_fits(jitted, *args, share: float = 0.9) -> None:
  """Compiles ``jitted`` for ``args`` ahead of time (the later calls reuse the compilation)
  and raises :class:`DoesNotFit` when XLA's memory analysis of the program exceeds ``share``
  of the available memory: such a case is skipped before it runs, instead of failing midway
  or drawing the kernel's OOM killer onto the whole benchmark."""
  stats = jitted.lower(*args).compile().memory_analysis()
  available = available_memory_bytes()
  if stats is None or available is None:
    return
  need = program_bytes(stats)
  if need > share * available:
    raise DoesNotFit(f'needs {need / 2**30:.1f} GiB (XLA memory analysis of the compiled '
                     f'step), {available / 2**30:.1f} GiB available')


def out_of_memory_reason(error: BaseException) -> Optional[str]:
  """One line saying why a case did not fit, if ``error`` is running out of memory (XLA's
  RESOURCE_EXHAUSTED, MemoryError, PyTorch's allocator, :class:`DoesNotFit`); else None."""
  if isinstance(error, DoesNotFit):
    return str(error)
  text = str(error)
  if not (isinstance(error, MemoryError) or 'RESOURCE_EXHAUSTED' in text or re.search(
      r"out of memory|not enough memory|can't allocate memory", text, re.I)):
    return None
  asked = re.search(r'allocating (\d+) bytes', text)
  if asked:
    return (f'out of memory: asked for {int(asked.group(1)) / 2**30:.1f} GiB '
            f'({"RESOURCE_EXHAUSTED" if "RESOURCE_EXHAUSTED" in text else type(error).__name__})')
  first = (text.strip().splitlines() or [type(error).__name__])[0]
  return f'out of memory: {first[:200]}'


def run_case(name: str, measure: Callable[..., Dict], *args, key: str = 'case',
             **kwargs) -> Dict:
  """``measure(*args, **kwargs)``'s row, or ``{key: name, 'skipped': reason}`` when the case
  runs out of memory (any other error propagates): the benchmark goes on with the next case
  and the JSON records why this one is missing."""
  try:
    return measure(*args, **kwargs)
  except Exception as e:  # noqa: BLE001 - only running out of memory is caught, see below
    reason = out_of_memory_reason(e)
    if reason is None:
      raise
  gc.collect()  # the failed case's buffers, now unreferenced
  print(f'  {name}: skipped, {reason}', flush=True)
  return {key: name, 'skipped': reason}


def print_skipped(rows: List[Dict], key: str = 'case') -> None:
  for r in rows:
    if 'skipped' in r:
      print(f"skipped {r.get(key)}: {r['skipped']}")


def share_of_gap(value: float, base: float, ceiling: float) -> Optional[float]:
  """Share of the gap from ``base`` up to ``ceiling`` that ``value`` closes (negative: below
  ``base``); None when there is no gap (``base`` already at or above ``ceiling``)."""
  gap = ceiling - base
  return (value - base) / gap if gap > 0 else None


def share_of_gap_interval(values: Sequence[float], bases: Sequence[float],
                          ceilings: Sequence[float], level: float = 0.95,
                          resamples: int = 10000, seed: int = 0
                          ) -> Optional[Tuple[float, float]]:
  """Percentile bootstrap interval of :func:`share_of_gap` of the means, resampling seeds
  with their three numbers kept together (a seed's method, base and ceiling runs share its
  labelled subset, so they are paired); None with fewer than 3 seeds."""
  import numpy as np
  values, bases, ceilings = (np.asarray(a, np.float64) for a in (values, bases, ceilings))
  if len(values) < 3:
    return None
  index = np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))
  gain = (values[index] - bases[index]).mean(1)
  gap = (ceilings[index] - bases[index]).mean(1)
  shares = gain[gap > 0] / gap[gap > 0]
  tail = 100 * (1 - level) / 2
  return float(np.percentile(shares, tail)), float(np.percentile(shares, 100 - tail))


def format_cell(row: Dict, key: str, spec: str, missing: str = 'nan') -> str:
  """``row[key]`` formatted with ``spec``: numbers, ``{'mean', 'sd'}`` dicts as ``mean ± sd``,
  anything else as text; ``missing`` where the row has no value (None or absent)."""
  value: Any = row.get(key)
  if value is None:
    return missing
  if isinstance(value, dict) and 'mean' in value:
    text = format(value['mean'], spec)
    return f"{text} ± {format(value['sd'], spec)}" if value.get('sd') is not None else text
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return format(value, spec)
  return str(value)


def print_table(rows: List[Dict], columns: Sequence[Column]) -> None:
  def cell(r, key, spec):
    return format_cell(r, key, spec)

  # Each column as wide as its header or its widest value, plus two spaces.
  widths = [max([len(header), 6] + [len(cell(r, key, spec)) for r in rows]) + 2
            for key, header, spec in columns]
  print('\n' + ''.join(f'{header:<{w}}' if i == 0 else f'{header:>{w}}'
                       for i, ((_, header, _), w) in enumerate(zip(columns, widths))))
  for r in rows:
    print(''.join(f'{cell(r, key, spec):<{w}}' if i == 0 else f'{cell(r, key, spec):>{w}}'
                  for i, ((key, _, spec), w) in enumerate(zip(columns, widths))))


def markdown_table(rows: List[Dict], columns: Sequence[Column], missing: str = '') -> str:
  """The rows as a Markdown table (the cells of :func:`print_table`; ``|`` escaped)."""
  def cell(r, key, spec):
    return format_cell(r, key, spec, missing).replace('|', '\\|')

  lines = ['| ' + ' | '.join(header for _, header, _ in columns) + ' |',
           '|' + '|'.join(' --- ' for _ in columns) + '|']
  lines += ['| ' + ' | '.join(cell(r, key, spec) for key, _, spec in columns) + ' |'
            for r in rows]
  return '\n'.join(lines)


def write_results(path: str, rows: List[Dict], **extra) -> None:
  import jax
  report = {'device': str(jax.devices()[0]), 'device_count': jax.device_count(),
            'cpu_count': os.cpu_count(), 'platform': platform.platform(),
            'jax': jax.__version__, **extra, 'results': rows}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(report, f, indent=2)
  print(f'wrote {path}')
