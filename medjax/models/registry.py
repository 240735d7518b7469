"""Model registry: a new architecture is one file with one ``@register_model`` decorator."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict

import flax.linen as nn

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, replace: bool = False) -> Callable:
  """Registers a linen module class (or a factory returning one) under ``name``.

  A second registration of a name is an error unless ``replace=True`` (for a notebook
  cell that redefines a model and is run again).

  The module is built as ``factory(num_outputs=..., **config.model)``; it is called as
  ``module.apply(variables, images, train=bool)`` on images ``[B, *spatial, C]`` and
  returns logits ``[B, num_outputs]``.
  """
  def decorator(factory):
    if name in _MODELS and not replace:
      raise ValueError(f"model '{name}' is already registered (register_model(name, "
                       "replace=True) redefines it)")
    _MODELS[name] = factory
    return factory
  return decorator


def available_models() -> list[str]:
  return sorted(_MODELS)


def _accepted_kwargs(factory) -> set[str] | None:
  """Keyword arguments a registered module (or a factory naming its ``module_class``) takes."""
  cls = getattr(factory, 'module_class', factory)
  if isinstance(cls, type) and dataclasses.is_dataclass(cls):
    fixed = set(getattr(factory, 'fixed_kwargs', ()))
    return {f.name for f in dataclasses.fields(cls) if f.init} - {'parent', 'name'} - fixed
  return None  # a plain function: it raises its own TypeError


def build_model(name: str, num_outputs: int, **kwargs: Any) -> nn.Module:
  """Builds registered model ``name``; unknown names or keyword arguments are errors."""
  if name not in _MODELS:
    raise ValueError(f"unknown model '{name}'; registered models: {', '.join(available_models())}")
  factory = _MODELS[name]
  accepted = _accepted_kwargs(factory)
  if accepted is not None:
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
      raise ValueError(
          f"model '{name}' has no option(s) {', '.join(map(repr, unknown))}; "
          f"it accepts: {', '.join(sorted(accepted - {'num_outputs'}))}")
  return factory(num_outputs=num_outputs, **kwargs)
