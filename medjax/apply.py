"""Applying a trained workdir to new files (``medjax predict``, ``medjax explain``).

Both follow one sequence: :func:`restore_workdir` rebuilds the experiment from the workdir's
config (without its training-only set-up) and restores the selected checkpoint; the
experiment then applies its model to each file (``predict_files``, ``explain_files``: a
segmenter prepares each scan as its training cases were, predicts and maps the result back
onto the file's grid; a classifier normalises each image as in training). Nothing here knows
a task; the building blocks are :mod:`medjax.files` and :mod:`medjax.explain`.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Union

from medjax.data import layouts
from medjax.explain import METHODS, check_layer, trace_layers
from medjax.train import restore_workdir


def predict_files(workdirs: Union[str, Sequence[str]], input_path: str, output_dir: str,
                  step: Optional[int] = None, mirror_axes: Optional[Sequence[int]] = None
                  ) -> list:
  """Predictions for new files, written by the model's task (segmentations: NIfTI with
  exactly each input's affine, shape and axes; detections: detections.csv, JSON, COCO).
  Several workdirs: their mean prediction (an ensemble, e.g. 2D U-Nets on different slice
  axes), each with its selected checkpoint. ``mirror_axes``: test-time mirroring for this
  prediction (the task's ``set_evaluation_options``), else each run's own."""
  workdirs = [workdirs] if isinstance(workdirs, str) else list(workdirs)
  if step is not None and len(workdirs) > 1:
    raise ValueError("--step applies to one workdir; an ensemble uses each workdir's "
                     'selected checkpoint')
  members = [restore_workdir(workdir, step)[:2] for workdir in workdirs]
  for exp, _ in members:
    exp.set_evaluation_options(mirror_axes=mirror_axes)
  first = members[0][0]
  for workdir, (exp, _) in zip(workdirs, members):
    if type(exp) is not type(first):
      raise ValueError(f'{workdir} holds a {exp.task} model, {workdirs[0]} a {first.task} one')
  inputs = layouts.list_files(input_path, first.input_suffixes())
  os.makedirs(output_dir, exist_ok=True)
  return first.predict_files(members, inputs, output_dir)


def explain_files(workdir: str, input_path: str, output_dir: str, step: Optional[int] = None,
                  layer: Optional[str] = None, target_class=None,
                  methods: Sequence[str] = METHODS, ig_steps: int = 32) -> List[dict]:
  """Explains a trained workdir's model on files; writes PNG overlays and arrays.

  Classifiers: every image (PNG/JPEG/TIFF/BMP, ``.npy``, NIfTI for 3D models) gets
  ``<name>.png`` (image, Grad-CAM, saliency, integrated gradients) and ``<name>.npz``; the
  class explained is ``target_class`` (name or index) or the predicted one; a summary goes
  to ``explanations.csv``. Segmenters: every NIfTI volume (or 2D image) gets a Grad-CAM map
  per foreground class of the predicted region, ``<name>_gradcam_<class>.nii.gz`` on the
  input's own grid and affine, and ``<name>.png``. Returns one record per input.
  """
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise ValueError(f"unknown method(s) {unknown}; expected some of {', '.join(METHODS)}")
  exp, state, step = restore_workdir(workdir, step)
  layers = trace_layers(exp.model, exp.variables(state), exp.input_shape)
  layer = check_layer(layers, layer, spatial_output=exp.label_maps)
  files = layouts.list_files(input_path, exp.input_suffixes())
  os.makedirs(output_dir, exist_ok=True)
  return exp.explain_files(state, files, output_dir, layer=layer, target_class=target_class,
                           methods=methods, ig_steps=ig_steps)
