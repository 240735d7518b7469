"""Explanations: identities they must satisfy, a trained model's maps point at the lesion
that decides the label, maps fail on randomised weights (Adebayo et al. 2018), and
``medjax explain`` writes overlays and arrays for files it never saw."""

import csv
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from medjax import cli, config as config_lib, explain
from medjax import train as train_lib
from medjax.data import synthetic
from medjax.models import build_model
from medjax.models.summary import flops_per_example, model_summary, trace_layers


class ConvGapDense(nn.Module):
  """conv -> ReLU -> global average pool -> dense: Grad-CAM of the conv equals CAM."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(6, (3, 3), name='features')(x))
    return nn.Dense(3, name='head')(x.mean(axis=(1, 2)))


def _init(model, shape, seed=0):
  return model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + shape), train=False)


def test_grad_cam_of_a_gap_model_equals_class_activation_mapping():
  model = ConvGapDense()
  variables = _init(model, (12, 10, 2))
  x = np.random.default_rng(0).normal(size=(4, 12, 10, 2)).astype(np.float32)
  classes = np.array([0, 1, 2, 1])
  cam = explain.grad_cam(model, variables, x, explain.class_target('multiclass', classes),
                         'features', normalize=False)
  # Reference (Zhou et al. 2016): CAM_c = ReLU(sum_k w_kc A_k) / (H W), by NumPy.
  _, inter = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
  kernel = np.asarray(variables['params']['head']['kernel'])            # [K, 3]
  # Grad-CAM uses the conv's own output (pre-ReLU); the gradient is zero where it is
  # negative, so the weights are w_kc * (fraction of positive positions).
  raw = np.asarray(inter['intermediates']['features']['__call__'][0])
  positive = (raw > 0).mean(axis=(1, 2))                                # [B, K]
  weights = kernel[:, classes].T * positive / (12 * 10)                 # [B, K]
  expected = np.maximum(np.einsum('bhwk,bk->bhw', raw, weights), 0)
  np.testing.assert_allclose(cam, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_integrated_gradients_are_complete():
  model = build_model('simple_cnn', 3, features=(8, 16), hidden=16)
  variables = _init(model, (16, 16, 1))
  x = np.random.default_rng(1).normal(size=(3, 16, 16, 1)).astype(np.float32)
  classes = np.array([0, 2, 1])
  target = explain.class_target('multiclass', classes)
  baseline = -1.0
  attributions = explain.integrated_gradients(model, variables, x, target, baseline, steps=256)
  logits_x = np.asarray(model.apply(variables, x))
  logits_b = np.asarray(model.apply(variables, np.full_like(x, baseline)))
  difference = logits_x[np.arange(3), classes] - logits_b[np.arange(3), classes]
  np.testing.assert_allclose(attributions.reshape(3, -1).sum(1), difference, rtol=0.02,
                             atol=1e-3)


@pytest.mark.slow
def test_saliency_is_the_absolute_input_gradient_against_finite_differences():
  model = build_model('simple_cnn', 2, features=(4, 8), hidden=8)
  variables = _init(model, (8, 8, 1))
  x = np.random.default_rng(2).normal(size=(1, 8, 8, 1)).astype(np.float64)
  target = explain.class_target('binary', np.array([1]))
  sal = explain.saliency(model, variables, x.astype(np.float32), target, normalize=False)
  f = lambda z: float(model.apply(variables, z.astype(np.float32))[0, 1])  # noqa: E731
  eps = 1e-2
  for (i, j) in [(2, 3), (5, 5), (0, 7)]:
    up, down = x.copy(), x.copy()
    up[0, i, j, 0] += eps
    down[0, i, j, 0] -= eps
    numeric = abs(f(up) - f(down)) / (2 * eps)
    assert sal[0, i, j] == pytest.approx(numeric, rel=0.05, abs=1e-4)


def test_region_target_sums_the_class_logit_over_the_region():
  logits = np.random.default_rng(3).normal(size=(2, 5, 4, 3)).astype(np.float32)
  predicted = logits.argmax(-1)
  got = np.asarray(explain.region_target(np.array([1, 2]))(jnp.asarray(logits)))
  expected = [logits[b, ..., k][predicted[b] == k].sum() for b, k in ((0, 1), (1, 2))]
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  region = np.zeros((2, 5, 4), bool)
  region[:, 1:3, 1:3] = True
  got = np.asarray(explain.region_target(np.array([0, 0]), region)(jnp.asarray(logits)))
  np.testing.assert_allclose(got, logits[:, 1:3, 1:3, 0].sum((1, 2)), rtol=1e-6)


@pytest.mark.slow
def test_layers_default_layer_and_unknown_layer_error():
  resnet = build_model('resnet18', 3)
  variables = _init(resnet, (28, 28, 1))
  layers = trace_layers(resnet, variables, (28, 28, 1))
  assert explain.default_layer(layers, spatial_output=False) == 'stage4_block2'
  assert layers[-1].name == '' and layers[-1].params == 11_169_219
  unet = build_model('unet', 3, features=(4, 8, 16), strides=(1, 2, 2))
  uvars = _init(unet, (32, 32, 1))
  ulayers = trace_layers(unet, uvars, (32, 32, 1))
  assert explain.default_layer(ulayers, spatial_output=True) == 'encoder2'  # the bottleneck
  with pytest.raises(ValueError, match="no layer 'stage9'.*stage4_block2"):
    explain.check_layer(layers, 'stage9', spatial_output=False)


@pytest.mark.slow
def test_flops_estimate_counts_the_convolution_exactly():
  class OneConv(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Conv(8, (3, 3), use_bias=False)(x)
  model = OneConv()
  variables = _init(model, (16, 12, 4))
  # 'SAME' padding: the taps that fall on padding are not computed; per output channel and
  # input channel the multiply-adds are (3H - 2)(3W - 2).
  macs = 4 * 8 * (3 * 16 - 2) * (3 * 12 - 2)
  assert flops_per_example(model, variables, (16, 12, 4)) == pytest.approx(2 * macs, rel=0.01)
  summary = model_summary(model, variables, (16, 12, 4))
  assert summary['parameters'] == 3 * 3 * 4 * 8
  assert tuple(summary['layers'][0]['output_shape']) == (1, 16, 12, 8)


# ----- a trained classifier ----------------------------------------------------------------
@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """The quickstart classifier, 6 epochs (the label is decided by the lesion alone)."""
  config = config_lib.load_config_file('configs/quickstart.py')
  config_lib.apply_overrides(config, ['train.num_epochs=6', 'train.progress_bar=False'])
  workdir = str(tmp_path_factory.mktemp('explain') / 'run')
  results = train_lib.train_and_evaluate(config, workdir)
  exp, state, _ = train_lib.restore_workdir(workdir)
  return workdir, results, exp, state


def _held_back(n=160):
  """Lesion images from a seed no split uses, normalised as in training, with masks."""
  images, labels, masks = synthetic.generate_split(777, 'test', n, with_masks=True)
  keep = labels > 0
  x = ((images[keep] / 255.0 - 0.5) / 0.5).astype(np.float32)
  return x, labels[keep], masks[keep], images[keep]


def _concentration(maps, masks):
  """(mean fraction of map mass inside the lesion / lesion area fraction, pointing game)."""
  inside = (maps * masks).sum((1, 2)) / np.maximum(maps.sum((1, 2)), 1e-12)
  ratio = float(np.mean(inside / masks.mean((1, 2))))
  hits = np.mean([masks[i].ravel()[np.argmax(maps[i])] for i in range(len(maps))])
  return ratio, float(hits)


@pytest.mark.slow
def test_maps_concentrate_on_the_lesion_and_change_with_random_weights(trained):
  workdir, results, exp, state = trained
  assert results['test']['auc'] > 0.95
  x, labels, masks, _ = _held_back()
  variables = exp.variables(state)
  target = explain.class_target('multiclass', labels)
  layer = explain.default_layer(trace_layers(exp.model, variables, exp.input_shape), False)
  cam = explain.grad_cam(exp.model, variables, x, target, layer)
  sal = explain.saliency(exp.model, variables, x, target)
  ig = explain.attribution_map(explain.integrated_gradients(exp.model, variables, x, target,
                                                            baseline=-1.0, steps=16))
  # Lesions cover ~10% of the image; uniform maps would give ratio 1 and ~10% hits.
  for name, maps, min_ratio, min_hits in (('gradcam', cam, 4.0, 0.6), ('saliency', sal, 2.0, 0.6),
                                          ('ig', ig, 2.5, 0.75)):
    ratio, hits = _concentration(maps, masks)
    assert ratio > min_ratio and hits > min_hits, (name, ratio, hits)
  # Model randomisation: the same method on re-initialised weights gives different maps
  # that no longer find the lesion.
  random_vars = explain.randomized_variables(exp.model, variables, exp.input_shape, seed=5)
  cam_r = explain.grad_cam(exp.model, random_vars, x, target, layer)
  sal_r = explain.saliency(exp.model, random_vars, x, target)
  for maps, maps_r in ((cam, cam_r), (sal, sal_r)):
    corr = np.mean([explain.rank_correlation(a, b) for a, b in zip(maps, maps_r)])
    assert corr < 0.3, corr
    assert _concentration(maps_r, masks)[1] < 0.5


@pytest.mark.slow
def test_explain_command_on_held_back_files(trained, tmp_path, capsys):
  workdir, _, exp, state = trained
  _, labels, _, raw = _held_back(40)
  inputs = tmp_path / 'in'
  inputs.mkdir()
  for i in range(3):
    Image.fromarray(raw[i, ..., 0]).save(inputs / f'case{i}.png')
  Image.fromarray(np.repeat(raw[3], 3, -1)).resize((64, 64)).save(inputs / 'rgb_large.png')
  out = tmp_path / 'out'
  assert cli.main(['explain', '--workdir', workdir, '--input', str(inputs), '--output',
                   str(out)]) == 0
  peaks = []
  for name in ('case0', 'case1', 'case2', 'rgb_large'):
    assert (out / f'{name}.png').stat().st_size > 1000
    with np.load(out / f'{name}.npz') as f:
      assert f['gradcam'].shape == (32, 32) and f['saliency'].shape == (32, 32)
      assert f['integrated_gradients'].shape == (32, 32, 1)
      assert f['gradcam'].min() >= 0 and f['saliency'].max() == pytest.approx(1.0)
      peaks.append(float(f['gradcam'].max()))
      if name == 'case0':  # the scores are the model's own on the normalised file
        logits = exp.model.apply(exp.variables(state), f['image'][None])
        np.testing.assert_allclose(f['scores'], jax.nn.softmax(logits)[0], rtol=1e-5)
        np.testing.assert_allclose(f['image'][..., 0], (raw[0, ..., 0] / 255 - 0.5) / 0.5,
                                   atol=1e-6)
  # Each map is scaled to a peak of 1, or is all zero: Grad-CAM's ReLU zeroes a map when
  # no location speaks for the explained class (it happens for a confident prediction too).
  assert all(p == pytest.approx(1.0) or p == 0 for p in peaks), peaks
  assert sum(p > 0 for p in peaks) >= 2, peaks
  with open(out / 'explanations.csv') as f:
    rows = list(csv.DictReader(f))
  assert [os.path.basename(r['file']) for r in rows] == ['case0.png', 'case1.png',
                                                          'case2.png', 'rgb_large.png']
  assert 'resized from (64, 64) to (32, 32)' in rows[3]['note']
  # A chosen class and layer.
  assert cli.main(['explain', '--workdir', workdir, '--input', str(inputs / 'case0.png'),
                   '--output', str(tmp_path / 'o2'), '--class', 'malignant', '--layer',
                   'Conv_0', '--methods', 'gradcam']) == 0
  with np.load(tmp_path / 'o2' / 'case0.npz') as f:
    assert int(f['explained_class']) == 2 and str(f['layer']) == 'Conv_0'
    assert 'saliency' not in f.files
  capsys.readouterr()
  assert cli.main(['explain', '--workdir', workdir, '--input', str(inputs), '--output',
                   str(tmp_path / 'o3'), '--layer', 'nope']) == 2
  assert "no layer 'nope'" in capsys.readouterr().err
  assert cli.main(['explain', '--workdir', workdir, '--input', str(tmp_path / 'missing'),
                   '--output', str(tmp_path / 'o4')]) == 2
  assert 'missing: no such file' in capsys.readouterr().err
