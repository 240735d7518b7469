"""A trained model applied to files: a classifier's input from an image file, a scan
segmented on the prepared grid, and the explanation files of both (PNG overlays, arrays,
Grad-CAM maps as NIfTI on the input's own grid and affine). The building blocks of the
experiments' ``predict_files`` / ``explain_files``; the entry points are :mod:`medjax.apply`.
"""

from __future__ import annotations

import csv
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from medjax import plots
from medjax.data import layouts, nifti, prepare
from medjax.explain import (METHODS, attribution_map, class_target, final_output, grad_cam,
                            integrated_gradients, normalize_maps, region_target, saliency)


def segment_file(exp, predict_probs: Callable[[np.ndarray], np.ndarray],
                 path: str) -> Tuple[np.ndarray, Dict, np.ndarray]:
  """A scan prepared as ``exp``'s training cases were and segmented by ``predict_probs``
  (prepared image -> class probabilities: one model's sliding window, or an ensemble's,
  the experiment's ensemble predictor):
  ``(prepared image [*spatial, C], its record, label map [*spatial] on the prepared grid)``;
  ``prepare.restore_original_grid(labels, record)`` puts the labels on the file's grid."""
  image, record = exp.prepare_file(path)
  labels = np.argmax(predict_probs(image), axis=-1).astype(np.uint8)
  return image, record, labels


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
  spatial, channels = tuple(input_shape[:-1]), int(input_shape[-1])
  lower = path.lower()
  if lower.endswith('.npy'):
    image = np.load(path).astype(np.float32)
    if image.ndim == len(spatial):
      image = image[..., None]
  else:
    image, _ = layouts.read_array(path, 'image')
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
  logits = final_output(model.apply(variables, jnp.asarray(images), train=False))
  scores = np.asarray(exp.probabilities(logits))
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


def class_index(target_class, class_names: Sequence[str]) -> Optional[int]:
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


def explain_classifier_files(exp, variables, files, output_dir, layer, target_class, methods,
                              ig_steps) -> List[Dict]:
  names = [str(n) for n in exp.data.class_names]
  black = float(exp.preprocess(np.zeros(1))[0])  # integrated gradients' baseline: black
  records = []
  chunk = max(1, int(exp.config.train.eval_batch_size))
  for start in range(0, len(files), chunk):
    paths = files[start:start + chunk]
    loaded = [load_classifier_input(p, exp.input_shape) for p in paths]
    raw = np.stack([image for image, _ in loaded])
    images = exp.preprocess(raw)
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
  stride = exp.total_stride
  if exp.slice_axis is None:
    batch, regions = image[None], (labels == target_class)[None]
  else:
    batch = exp.slices_of(image)
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


def explain_segmentation_file(exp, state, path: str, output_dir: str, layer: str,
                               target_class: Optional[int]) -> Dict:
  prepared = exp.data.prepared
  image, record, labels = segment_file(
      exp, lambda prepared_image: exp.predict_prepared(state, prepared_image), path)
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
