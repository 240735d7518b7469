"""What a model looks at: Grad-CAM, saliency and integrated gradients, for any linen model.

Every function takes the model, its variables and images as the model sees them
(normalised, ``[B, *spatial, C]``), runs the model in inference mode (batch-norm running
statistics, no dropout, so each example is explained independently of its batch) and
returns maps ``[B, *spatial]`` on the input grid, 2D or 3D alike.

* :func:`grad_cam` (Selvaraju et al. 2017): ReLU of the activations of one layer weighted by
  the spatial mean of the target's gradient, upsampled (linear) to the input. Any module of
  the model can be named (``'stage4_block2'``, ``'Conv_1'``, ``'encoder4'``; see
  :func:`trace_layers`); by default the last feature map of a classifier, the coarsest
  (bottleneck) one of a segmenter.
* For segmenters the target is the summed logit of a class over a region (Seg-Grad-CAM,
  Vinogradova et al. 2020): by default the voxels the model assigns to that class.
* :func:`saliency` (Simonyan et al. 2014): ``max_c |d target / d x|``.
* :func:`integrated_gradients` (Sundararajan et al. 2017): ``(x - x') * mean_a grad(x' + a (x - x'))``
  by the trapezoid rule; its attributions sum to ``target(x) - target(x')`` (completeness).

A classifier's target is the logit of the class (the log-probability for ordinal heads); the
class defaults to the predicted one. :func:`randomized_variables` gives the same model with
fresh weights, for the model-randomisation sanity check (Adebayo et al. 2018): maps that do
not change when the weights are randomised do not explain the model.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax import tasks
from medjax.models.summary import Layer, trace_layers  # noqa: F401 (re-exported)


def default_layer(layers: Sequence[Layer], spatial_output: bool) -> str:
  """The layer Grad-CAM uses unless told: the last feature map ``[B, *spatial, C]`` of a
  classifier; for a segmenter (spatial output) the coarsest feature map (the bottleneck)."""
  maps = [layer for layer in layers[:-1] if layer.name and len(layer.output_shape) >= 3]
  if not maps:
    raise ValueError('the model has no spatial feature map to explain')
  if not spatial_output:
    return maps[-1].name
  size = [int(np.prod(layer.output_shape[1:-1])) for layer in maps]
  return [layer for layer, n in zip(maps, size) if n == min(size)][-1].name


def _forward_with_perturbation(model, variables, images, layer: str, delta):
  """Model output with ``delta`` added to the output of module ``layer``; also returns
  that (perturbed) activation. Adding zeros and differentiating by ``delta`` gives the
  gradient with respect to the activation."""
  captured = []

  def perturb(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and '/'.join(context.module.path) == layer:
      out = out + delta
      captured.append(out)
    return out

  with nn.intercept_methods(perturb):
    outputs = model.apply(variables, images, train=False)
  if len(captured) != 1:
    raise ValueError(f"layer '{layer}' was called {len(captured)} times in one forward pass; "
                     'name a module that runs once')
  return outputs, captured[0]


def _upsample(maps: jax.Array, spatial: Sequence[int]) -> jax.Array:
  return jax.image.resize(maps, (maps.shape[0],) + tuple(spatial), method='linear')


def normalize_maps(maps: np.ndarray) -> np.ndarray:
  """Each map scaled to [0, 1] by its own maximum (all-zero maps stay zero)."""
  maps = np.asarray(maps, np.float32)
  axes = tuple(range(1, maps.ndim))
  peak = maps.max(axis=axes, keepdims=True)
  return np.where(peak > 0, maps / np.where(peak > 0, peak, 1), 0.0).astype(np.float32)


# ----- targets -----------------------------------------------------------------------------
def class_target(task: str, target_class) -> Callable[[jax.Array], jax.Array]:
  """Per-example score of ``target_class`` (``[B]`` ints) from classifier outputs ``[B, L]``."""
  target_class = jnp.asarray(target_class, jnp.int32)

  def target(logits):
    if task == 'ordinal':
      values = jnp.log(tasks.ordinal_probabilities(logits) + 1e-12)
    else:
      values = logits
    return jnp.take_along_axis(values, target_class[:, None], axis=1)[:, 0]
  return target


def region_target(target_class, region: Optional[jax.Array] = None):
  """Per-example summed logit of ``target_class`` over ``region`` ``[B, *spatial]`` (by
  default where the model predicts that class) from segmenter logits ``[B, *spatial, K]``."""
  target_class = jnp.asarray(target_class, jnp.int32)

  def target(logits):
    class_axis = logits.ndim - 1
    onehot = jax.nn.one_hot(target_class, logits.shape[-1])
    onehot = onehot.reshape((logits.shape[0],) + (1,) * (logits.ndim - 2) + (-1,))
    class_logit = jnp.sum(logits * onehot, axis=class_axis)
    if region is None:
      mask = jax.lax.stop_gradient(
          (jnp.argmax(logits, axis=class_axis) == target_class.reshape(
              (-1,) + (1,) * (logits.ndim - 2))).astype(logits.dtype))
    else:
      mask = jnp.asarray(region, logits.dtype)
    return jnp.sum(class_logit * mask, axis=tuple(range(1, logits.ndim - 1)))
  return target


def final_output(outputs):
  """The full-resolution output of a model (the first of a deep-supervision list)."""
  return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


# ----- methods -----------------------------------------------------------------------------
def grad_cam(model: nn.Module, variables, images, target: Callable[[jax.Array], jax.Array],
             layer: str, normalize: bool = True) -> np.ndarray:
  """Grad-CAM maps ``[B, *spatial]`` of the target for module ``layer``.

  ``target`` maps model outputs to one score per example (:func:`class_target`,
  :func:`region_target`). Maps are upsampled to the input grid and, with ``normalize``,
  scaled to [0, 1] per example.
  """
  images = jnp.asarray(images, jnp.float32)

  # Variables and images are arguments, not closed-over constants: XLA would try to
  # constant-fold the whole forward pass.
  def score(delta, variables, images):
    outputs, activation = _forward_with_perturbation(model, variables, images, layer, delta)
    return jnp.sum(target(final_output(outputs))), activation

  shape = jax.eval_shape(score, jnp.float32(0), variables, images)[1].shape
  grads, activation = jax.jit(jax.grad(score, has_aux=True))(
      jnp.zeros(shape, jnp.float32), variables, images)
  spatial_axes = tuple(range(1, grads.ndim - 1))
  weights = jnp.mean(grads, axis=spatial_axes, keepdims=True)       # [B, 1.., C]
  cam = jax.nn.relu(jnp.sum(weights * activation, axis=-1))          # [B, *feature_spatial]
  cam = np.asarray(_upsample(cam, images.shape[1:-1]))
  return normalize_maps(cam) if normalize else cam


def input_gradients(model: nn.Module, variables, images,
                    target: Callable[[jax.Array], jax.Array]) -> np.ndarray:
  """``d target / d images``, ``[B, *spatial, C]``."""
  return np.asarray(_input_grad_fn(model, target)(jnp.asarray(images, jnp.float32), variables))


def _input_grad_fn(model: nn.Module, target):
  def score(x, variables):
    return jnp.sum(target(final_output(model.apply(variables, x, train=False))))
  return jax.jit(jax.grad(score))


def saliency(model: nn.Module, variables, images, target: Callable[[jax.Array], jax.Array],
             normalize: bool = True) -> np.ndarray:
  """Gradient saliency ``max_c |d target / d x_c|``, ``[B, *spatial]``."""
  maps = np.abs(input_gradients(model, variables, images, target)).max(axis=-1)
  return normalize_maps(maps) if normalize else maps


def integrated_gradients(model: nn.Module, variables, images,
                         target: Callable[[jax.Array], jax.Array], baseline=None,
                         steps: int = 64) -> np.ndarray:
  """Integrated-gradients attributions ``[B, *spatial, C]`` (signed, in target units).

  ``baseline`` (same shape as ``images``, or broadcastable) defaults to zeros in model-input
  units; :func:`explain_classifier` passes a black image. ``steps`` intervals of the
  trapezoid rule; ``attributions.sum()`` approaches ``target(x) - target(baseline)``.
  """
  images = jnp.asarray(images, jnp.float32)
  baseline = jnp.zeros_like(images) if baseline is None else jnp.broadcast_to(
      jnp.asarray(baseline, jnp.float32), images.shape)

  grad_fn = _input_grad_fn(model, target)
  alphas = np.linspace(0.0, 1.0, steps + 1)
  weights = np.full(steps + 1, 1.0 / steps)
  weights[[0, -1]] /= 2  # trapezoid
  total = jnp.zeros_like(images)
  for alpha, weight in zip(alphas, weights):
    total = total + weight * grad_fn(baseline + alpha * (images - baseline), variables)
  return np.asarray((images - baseline) * total)


def attribution_map(attributions: np.ndarray, normalize: bool = True) -> np.ndarray:
  """A map ``[B, *spatial]`` from attributions ``[B, *spatial, C]``: absolute value summed
  over channels."""
  maps = np.abs(attributions).sum(axis=-1)
  return normalize_maps(maps) if normalize else maps


def randomized_variables(model: nn.Module, variables, input_shape: Sequence[int],
                         seed: int = 1) -> Any:
  """The model's variables re-initialised from ``seed`` (model-randomisation check)."""
  dummy = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  return model.init({'params': jax.random.PRNGKey(seed)}, dummy, train=False)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman rank correlation of two maps (how alike two explanations are); 0 when either
  map is constant (an all-zero Grad-CAM shares no structure with anything)."""
  from scipy.stats import spearmanr
  a, b = np.ravel(a), np.ravel(b)
  if np.ptp(a) == 0 or np.ptp(b) == 0:
    return 0.0
  return float(spearmanr(a, b).statistic)


# ----- choosing methods and layers (medjax.apply explains files with them) ------------------
METHODS = ('gradcam', 'saliency', 'integrated_gradients')


def check_layer(layers: Sequence[Layer], layer: Optional[str], spatial_output: bool) -> str:
  """``layer`` if the model has it (else an error listing its feature-map layers), or the
  default layer."""
  if layer is None or layer == '':
    return default_layer(layers, spatial_output)
  names = [entry.name for entry in layers if entry.name]
  if layer not in names:
    maps = [entry.name for entry in layers if entry.name and len(entry.output_shape) >= 3]
    raise ValueError(f"the model has no layer '{layer}'; its feature-map layers are: "
                     f"{', '.join(maps)}")
  return layer
