"""Model summary: parameters, FLOPs per example and a layer table, from one abstract trace."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Layer:
  """One module call of a forward pass, in the order the calls returned."""
  name: str            # module path, '/'-joined: 'stage4_block2/Conv_1'
  kind: str            # module class name
  output_shape: Tuple[int, ...]
  params: int          # parameters owned by the module and its children


def trace_layers(model: nn.Module, variables, input_shape: Sequence[int]) -> List[Layer]:
  """Every module call of one forward pass on ``[1, *input_shape]`` (abstract, no compute).

  Inner modules come before the module that contains them (calls return inside-out), so
  the last entry is the model itself (name ''). These names are what
  :func:`medjax.explain.grad_cam` accepts as ``layer``.
  """
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__':
      first = out[0] if isinstance(out, (list, tuple)) else out
      shape = first.shape if hasattr(first, 'shape') else ()
      calls.append(('/'.join(context.module.path), type(context.module).__name__, shape))
    return out

  def forward(x):
    with nn.intercept_methods(record):
      return model.apply(variables, x, train=False)

  jax.eval_shape(forward, jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32))
  params = variables.get('params', {})
  layers = []
  for name, kind, shape in calls:
    subtree = params
    for part in name.split('/') if name else ():
      subtree = subtree.get(part, {}) if hasattr(subtree, 'get') else {}
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(subtree))
    layers.append(Layer(name, kind, tuple(int(d) for d in shape), count))
  return layers


def flops_per_example(model: nn.Module, variables, input_shape: Sequence[int]) -> float:
  """XLA's count of floating-point operations of one inference forward pass (batch 1; a
  multiply-add counts 2). NaN where the backend gives no cost analysis. Counted with XLA's
  own convolutions (``conv_impl='xla'``), so the figure does not depend on the implementation
  that runs."""
  if 'conv_impl' in getattr(model, '__dataclass_fields__', {}):
    model = model.clone(conv_impl='xla')

  def forward(variables, x):
    return model.apply(variables, x, train=False)
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  try:
    # The lowered (not compiled) program's count: no compilation needed.
    cost = jax.jit(forward).lower(variables, x).cost_analysis()
  except Exception:  # noqa: BLE001 - cost analysis is optional on some backends
    return float('nan')
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', float('nan')))


def model_summary(model: nn.Module, variables, input_shape: Sequence[int]) -> Dict[str, Any]:
  """{'model', 'input_shape', 'parameters', 'flops_per_example', 'layers': [...]}."""
  layers = trace_layers(model, variables, input_shape)
  return {'model': type(model).__name__, 'input_shape': list(input_shape),
          'parameters': int(sum(int(np.prod(x.shape))
                                for x in jax.tree.leaves(variables.get('params', {})))),
          'flops_per_example': flops_per_example(model, variables, input_shape),
          'layers': [dataclasses.asdict(layer) for layer in layers]}


def _human(n: float) -> str:
  if not np.isfinite(n):
    return 'n/a'
  for unit, scale in (('G', 1e9), ('M', 1e6), ('k', 1e3)):
    if abs(n) >= scale:
      return f'{n / scale:.2f}{unit}'
  return f'{n:.0f}'


def format_summary(summary: Dict[str, Any], max_depth: int = 1) -> str:
  """The layer table (modules up to ``max_depth`` levels deep) and the totals."""
  rows = [layer for layer in summary['layers']
          if layer['name'] and layer['name'].count('/') < max_depth]
  width = max([len('layer')] + [len(r['name']) for r in rows])
  kind_width = max([len('type')] + [len(r['kind']) for r in rows])
  lines = [f"{'layer':<{width}}  {'type':<{kind_width}}  {'output':<22}{'params':>12}"]
  lines.append('-' * len(lines[0]))
  for r in rows:
    shape = 'x'.join(str(d) for d in r['output_shape'][1:])
    lines.append(f"{r['name']:<{width}}  {r['kind']:<{kind_width}}  {shape:<22}"
                 f"{r['params']:>12,}")
  lines.append('-' * len(lines[0]))
  lines.append(f"{summary['model']}: {summary['parameters']:,} parameters, "
               f"{_human(summary['flops_per_example'])}FLOPs per example (XLA count, "
               f"input {'x'.join(map(str, summary['input_shape']))})")
  return '\n'.join(lines)
