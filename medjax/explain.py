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

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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


def _final(outputs):
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
    return jnp.sum(target(_final(outputs))), activation

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
    return jnp.sum(target(_final(model.apply(variables, x, train=False))))
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


# ----- explaining a trained workdir on files -----------------------------------------------
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


def _fit_channels(image: np.ndarray, channels: int, path: str) -> np.ndarray:
  if image.shape[-1] == channels:
    return image
  if channels == 1 and image.shape[-1] in (3, 4):
    return image[..., :3].mean(axis=-1, keepdims=True)  # RGB(A) -> grey
  if image.shape[-1] == 1:
    return np.repeat(image, channels, axis=-1)
  raise ValueError(f'{path}: image has {image.shape[-1]} channels, the model takes {channels}')


def load_classifier_input(path: str, input_shape: Sequence[int]) -> Tuple[np.ndarray, str]:
  """An image file as the classifier's raw input ``[*spatial, C]`` (pixel units, resized
  linearly to the training shape if needed) and a note of what was done to it."""
  from scipy import ndimage

  from medjax.data import layouts, nifti
  spatial, channels = tuple(input_shape[:-1]), int(input_shape[-1])
  lower = path.lower()
  if lower.endswith('.npy'):
    image = np.load(path).astype(np.float32)
    if image.ndim == len(spatial):
      image = image[..., None]
  elif lower.endswith(layouts.NIFTI_SUFFIXES):
    image = nifti.read_volume(path, 'image').array[..., None]
  else:
    image = layouts.read_image_2d(path, 'image')
  if image.ndim != len(spatial) + 1:
    raise ValueError(f'{path}: a {image.ndim - 1}D image, the model takes {len(spatial)}D '
                     f'inputs of shape {spatial}')
  if not np.all(np.isfinite(image)):
    raise ValueError(f'{path}: NaN or infinite values')
  image = _fit_channels(image, channels, path)
  note = ''
  if image.shape[:-1] != spatial:
    note = f'resized from {image.shape[:-1]} to {spatial}'
    factors = [t / s for t, s in zip(spatial, image.shape[:-1])] + [1]
    image = ndimage.zoom(image, factors, order=1, grid_mode=True, mode='nearest')
  return image.astype(np.float32), note


def _peak_slice(volume_map: np.ndarray) -> int:
  """Index along axis 0 of the slice holding the most of a 3D map."""
  return int(np.argmax(volume_map.reshape(volume_map.shape[0], -1).sum(axis=1)))


def explain_classifier_batch(exp, variables, images: np.ndarray, layer: str,
                             target_classes=None, methods: Sequence[str] = METHODS,
                             ig_steps: int = 32, baseline: float = 0.0) -> Dict[str, np.ndarray]:
  """Maps of a batch of normalised images ``[B, *spatial, C]`` for the given (default:
  predicted) classes: {'scores', 'predicted', 'explained_class', <method>: maps}."""
  model = exp.model
  logits = _final(model.apply(variables, jnp.asarray(images), train=False))
  scores = np.asarray(tasks.scores_from_logits(exp.task, logits))
  predicted = scores.argmax(axis=1).astype(np.int32)
  explained = predicted if target_classes is None else np.broadcast_to(
      np.asarray(target_classes, np.int32), predicted.shape).copy()
  target = class_target(exp.task, explained)
  out = {'scores': scores, 'predicted': predicted, 'explained_class': explained}
  if 'gradcam' in methods:
    out['gradcam'] = grad_cam(model, variables, images, target, layer)
  if 'saliency' in methods:
    out['saliency'] = saliency(model, variables, images, target)
  if 'integrated_gradients' in methods:
    out['integrated_gradients'] = integrated_gradients(model, variables, images, target,
                                                       baseline=baseline, steps=ig_steps)
  return out


def _class_index(target_class, class_names: Sequence[str]) -> Optional[int]:
  if target_class is None or target_class == '':
    return None
  names = [str(n) for n in class_names]
  if str(target_class) in names:
    return names.index(str(target_class))
  try:
    index = int(target_class)
  except ValueError:
    index = -1
  if not 0 <= index < len(names):
    raise ValueError(f"unknown class '{target_class}'; classes: {', '.join(names)}")
  return index


def explain_files(workdir: str, input_path: str, output_dir: str, step: Optional[int] = None,
                  layer: Optional[str] = None, target_class=None,
                  methods: Sequence[str] = METHODS, ig_steps: int = 32) -> List[Dict]:
  """Explains a trained workdir's model on image files; writes PNG overlays and arrays.

  Classifiers: every image (PNG/JPEG/TIFF/BMP, ``.npy``, NIfTI for 3D models) gets
  ``<name>.png`` (image, Grad-CAM, saliency, integrated gradients) and ``<name>.npz``; the
  class explained is ``target_class`` (name or index) or the predicted one; a summary goes
  to ``explanations.csv``. Segmenters: every NIfTI volume (or 2D image) gets a Grad-CAM map
  per foreground class of the predicted region, ``<name>_gradcam_<class>.nii.gz`` on the
  input's own grid and affine, and ``<name>.png``. Returns one record per input.
  """
  from medjax.data import layouts
  from medjax.train import restore_workdir
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise ValueError(f"unknown method(s) {unknown}; expected some of {', '.join(METHODS)}")
  exp, state, step = restore_workdir(workdir, step)
  variables = exp.variables(state)
  segmenter = exp.task == 'segmentation'
  layers = trace_layers(exp.model, variables, exp.input_shape)
  layer = check_layer(layers, layer, spatial_output=segmenter)
  suffixes = layouts.NIFTI_SUFFIXES + (() if segmenter else layouts.IMAGE_SUFFIXES + ('.npy',))
  if segmenter and exp.data.prepared.spatial_dims == 2:
    suffixes = layouts.IMAGE_SUFFIXES
  files = layouts.list_files(input_path, suffixes)
  os.makedirs(output_dir, exist_ok=True)
  if segmenter:
    return [_explain_segmentation_file(exp, state, path, output_dir, layer,
                                       _class_index(target_class, exp.data.class_names))
            for path in files]
  return _explain_classifier_files(exp, variables, files, output_dir, layer,
                                   _class_index(target_class, exp.data.class_names), methods,
                                   ig_steps)


def _explain_classifier_files(exp, variables, files, output_dir, layer, target_class, methods,
                              ig_steps) -> List[Dict]:
  from medjax import plots
  from medjax.data import layouts
  cfg = exp.config.data
  names = [str(n) for n in exp.data.class_names]
  black = (0.0 - cfg.mean) / cfg.std  # integrated-gradients baseline: a black image
  records = []
  chunk = max(1, int(exp.config.train.eval_batch_size))
  for start in range(0, len(files), chunk):
    paths = files[start:start + chunk]
    loaded = [load_classifier_input(p, exp.input_shape) for p in paths]
    raw = np.stack([image for image, _ in loaded])
    images = ((raw / exp.data.pixel_max - cfg.mean) / cfg.std).astype(np.float32)
    out = explain_classifier_batch(exp, variables, images, layer, target_class, methods,
                                   ig_steps, black)
    for i, path in enumerate(paths):
      stem = layouts.strip_suffix(os.path.basename(path))
      if stem.lower().endswith('.npy'):
        stem = stem[:-4]
      maps = {}
      if 'gradcam' in out:
        maps[f'Grad-CAM ({layer})'] = out['gradcam'][i]
      if 'saliency' in out:
        maps['saliency'] = out['saliency'][i]
      if 'integrated_gradients' in out:
        maps['integrated gradients'] = attribution_map(out['integrated_gradients'][i:i + 1])[0]
      shown = raw[i, ..., 0]
      if shown.ndim == 3:  # 3D: the slice (axis 0) where the first map peaks
        k = _peak_slice(next(iter(maps.values())))
        shown, maps = shown[k], {n: m[k] for n, m in maps.items()}
      predicted, explained = int(out['predicted'][i]), int(out['explained_class'][i])
      title = (f'{os.path.basename(path)}: predicted {names[predicted]} '
               f'(p={out["scores"][i, predicted]:.2f}); explaining {names[explained]}')
      plots.save(plots.explanation_figure(shown, maps, title),
                 os.path.join(output_dir, f'{stem}.png'))
      arrays = {'image': images[i], 'scores': out['scores'][i], 'layer': layer,
                'explained_class': explained, 'class_names': np.array(names)}
      arrays.update({m: out[m][i] for m in METHODS if m in out})
      np.savez_compressed(os.path.join(output_dir, f'{stem}.npz'), **arrays)
      records.append({'file': path, 'predicted': names[predicted],
                      'explained': names[explained], 'note': loaded[i][1],
                      **{f'p_{n}': float(out['scores'][i, k]) for k, n in enumerate(names)}})
  _write_csv(os.path.join(output_dir, 'explanations.csv'), records)
  return records


def _write_csv(path: str, records: List[Dict]) -> None:
  import csv
  if not records:
    return
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)


def segmentation_grad_cam(exp, variables, image: np.ndarray, labels: np.ndarray, layer: str,
                          target_class: int) -> np.ndarray:
  """Grad-CAM ``[*spatial]`` of the region ``labels == target_class`` of a whole prepared
  image ``[*spatial, C]``, computed slice by slice for 2D models (normalised over the
  volume) or on the whole padded volume for 3D models."""
  from medjax.segmentation import total_stride
  stride = total_stride(exp.config.model)
  if exp.slice_axis is None:
    batch, regions = image[None], (labels == target_class)[None]
  else:
    batch = np.moveaxis(image, exp.slice_axis, 0)
    regions = np.moveaxis(labels == target_class, exp.slice_axis, 0)
  spatial = batch.shape[1:-1]
  pad = [(0, 0)] + [(0, -s % stride) for s in spatial] + [(0, 0)]
  batch = np.pad(batch, pad)
  regions = np.pad(regions, pad[:-1])
  maps = []
  chunk = max(1, int(exp.config.train.eval_batch_size))
  for start in range(0, len(batch), chunk):
    part = slice(start, start + chunk)
    target = region_target(np.full(len(batch[part]), target_class), regions[part])
    maps.append(grad_cam(exp.model, variables, batch[part], target, layer, normalize=False))
  cam = np.concatenate(maps)[(slice(None),) + tuple(slice(0, s) for s in spatial)]
  cam = normalize_maps(cam[None])[0]
  return cam[0] if exp.slice_axis is None else np.moveaxis(cam, 0, exp.slice_axis)


def _explain_segmentation_file(exp, state, path: str, output_dir: str, layer: str,
                               target_class: Optional[int]) -> Dict:
  from medjax import plots
  from medjax.data import layouts, nifti, prepare
  prepared = exp.data.prepared
  image, record = prepare.prepare_image(path, prepared.resolved_options(),
                                        prepared.target_spacing)
  labels = np.argmax(exp.predict_prepared(state, image), axis=-1)
  classes = range(1, exp.num_classes) if target_class is None else [target_class]
  names = [str(n) for n in exp.data.class_names]
  stem = layouts.strip_suffix(os.path.basename(path))
  variables = exp.variables(state)
  # The input file, once: its grid, affine and header for the written maps.
  source = nifti.read_volume(path, 'image') if prepared.spatial_dims == 3 else None
  maps, written = {}, []
  for k in classes:
    cam = segmentation_grad_cam(exp, variables, image, labels, layer, k)
    maps[k] = cam
    if source is not None:
      target = os.path.join(output_dir, f'{stem}_gradcam_{names[k]}.nii.gz')
      nifti.save_like(prepare.restore_original_grid(cam, record), source, target,
                      dtype=np.float32)
    else:
      target = os.path.join(output_dir, f'{stem}_gradcam_{names[k]}.npy')
      np.save(target, prepare.restore_original_grid(cam, record))
    written.append(target)
  np.savez_compressed(os.path.join(output_dir, f'{stem}.npz'), image=image, labels=labels,
                      layer=layer, **{f'gradcam_{names[k]}': m for k, m in maps.items()})
  # The figure: the slice (last prepared axis: axial in RAS for volumes) where the
  # predicted foreground is largest.
  foreground = labels > 0
  if prepared.spatial_dims == 3:  # prepared volumes are RAS
    z = int(np.argmax(foreground.sum(axis=(0, 1)))) if foreground.any() else labels.shape[2] // 2
    pick = lambda a: plots.radiological_axial(a)[z]  # noqa: E731
    where = f'axial slice {z} (prepared grid), radiological view'
  else:
    pick = lambda a: a  # noqa: E731
    where = '2D image'
  title = f'{os.path.basename(path)}: Grad-CAM ({layer}) of each predicted region, {where}'
  fig = plots.explanation_figure(pick(image[..., 0]), {names[k]: pick(m) for k, m in maps.items()},
                                 title, contour=pick(foreground))
  plots.save(fig, os.path.join(output_dir, f'{stem}.png'))
  return {'file': path, 'maps': written,
          'predicted_voxels': {names[k]: int((labels == k).sum()) for k in classes}}
