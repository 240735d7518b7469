"""U-Net shapes (2D/3D, every option), finite gradients, Dice losses against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import seg_losses
from medjax.models import build_model


@pytest.mark.parametrize('shape', [(2, 32, 48, 1), (1, 16, 32, 16, 2)])
@pytest.mark.parametrize('options', [
    dict(), dict(block='residual', norm='batch'), dict(norm='group', upsample='resize'),
    dict(deep_supervision=True)])
def test_unet_shapes(shape, options):
  model = build_model('unet', 3, features=(8, 16, 32), strides=(1, 2, 2), **options)
  x = jnp.zeros(shape)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  out = jax.eval_shape(lambda v: model.apply(v, x), variables)
  assert out.shape == shape[:-1] + (3,)
  if options.get('deep_supervision'):
    outs = jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=['batch_stats'])[0],
                          variables)
    assert [o.shape for o in outs] == [shape[:-1] + (3,),
                                       (shape[0],) + tuple(n // 2 for n in shape[1:-1]) + (3,)]


def test_unet_rejects_indivisible_input():
  model = build_model('unet', 2, features=(8, 16, 32), strides=(1, 2, 2))
  with pytest.raises(ValueError, match='not divisible by the total stride 4'):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 30, 32, 1)))


def _numpy_dice_loss(logits, labels, include_background, per_case, smooth=1e-5):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  p = e / e.sum(-1, keepdims=True)
  k = logits.shape[-1]
  onehot = np.eye(k)[labels]
  axes = tuple(range(1, logits.ndim - 1)) if per_case else tuple(range(0, logits.ndim - 1))
  inter = (p * onehot).sum(axes)
  den = p.sum(axes) + onehot.sum(axes)
  dice = (2 * inter + smooth) / (den + smooth)
  if not include_background:
    dice = dice[..., 1:]
  return 1 - dice.mean()


@pytest.mark.parametrize('include_background', [False, True])
@pytest.mark.parametrize('per_case', [False, True])
def test_soft_dice_matches_numpy(include_background, per_case):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 7, 5, 3))
  labels = rng.integers(0, 3, (2, 6, 7, 5))
  ours = seg_losses.soft_dice_loss(jnp.asarray(logits), jnp.asarray(labels),
                                   include_background=include_background, per_case=per_case)
  ref = _numpy_dice_loss(logits, labels, include_background, per_case)
  assert float(ours) == pytest.approx(ref, rel=1e-5)


def test_perfect_prediction_has_zero_dice_loss_and_ce_matches():
  labels = np.random.default_rng(1).integers(0, 3, (2, 8, 8))
  logits = 50.0 * (np.eye(3)[labels] - 0.5)
  assert float(seg_losses.soft_dice_loss(jnp.asarray(logits), jnp.asarray(labels))) < 1e-5
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 8, 8, 3))
  e = np.exp(logits - logits.max(-1, keepdims=True))
  logp = np.log(e / e.sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, labels[..., None], -1).mean()
  assert float(seg_losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))) == \
      pytest.approx(ce, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('upsample', ['transpose', 'resize'])
def test_dice_ce_gradients_are_finite_3d(upsample):
  model = build_model('unet', 3, features=(4, 8), strides=(1, 2), upsample=upsample)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 8, 1))
  y = jax.random.randint(jax.random.PRNGKey(1), (1, 8, 8, 8), 0, 3)
  variables = model.init(jax.random.PRNGKey(2), x)
  grads = jax.grad(lambda v: seg_losses.dice_ce_loss(model.apply(v, x), y))(variables)
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert any(np.abs(g).sum() > 0 for g in leaves)


def _numpy_sums(logits, labels, per_case):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  p = e / e.sum(-1, keepdims=True)
  onehot = np.eye(logits.shape[-1])[labels]
  axes = tuple(range(1, logits.ndim - 1)) if per_case else tuple(range(logits.ndim - 1))
  return ((p * onehot).sum(axes), (p * (1 - onehot)).sum(axes), ((1 - p) * onehot).sum(axes),
          onehot.sum(axes))


@pytest.mark.parametrize('per_case', [False, True])
def test_tversky_and_generalized_dice_match_numpy(per_case):
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(2, 6, 5, 4, 3))
  labels = rng.integers(0, 3, (2, 6, 5, 4))
  tp, fp, fn, vol = _numpy_sums(logits, labels, per_case)
  s = 1e-5
  tversky = 1 - ((tp + s) / (tp + 0.3 * fp + 0.7 * fn + s))[..., 1:].mean()
  ours = seg_losses.tversky_loss(jnp.asarray(logits), jnp.asarray(labels), per_case=per_case)
  assert float(ours) == pytest.approx(tversky, rel=1e-5)
  half = seg_losses.tversky_loss(jnp.asarray(logits), jnp.asarray(labels), alpha=0.5, beta=0.5,
                                 per_case=per_case)
  dice = seg_losses.soft_dice_loss(jnp.asarray(logits), jnp.asarray(labels), per_case=per_case)
  assert float(half) == pytest.approx(float(dice), rel=1e-4)  # alpha = beta = 1/2 is Dice
  tp, fp, fn, vol = tp[..., 1:], fp[..., 1:], fn[..., 1:], vol[..., 1:]
  w = 1 / np.maximum(vol, 1) ** 2
  gdl = 1 - ((2 * (w * tp).sum(-1) + s) / ((w * (2 * tp + fp + fn)).sum(-1) + s)).mean()
  ours = seg_losses.generalized_dice_loss(jnp.asarray(logits), jnp.asarray(labels),
                                          per_case=per_case)
  assert float(ours) == pytest.approx(gdl, rel=1e-5)


def test_voxel_focal_loss_gamma_zero_is_cross_entropy():
  rng = np.random.default_rng(6)
  logits = jnp.asarray(rng.normal(size=(2, 5, 5, 3)))
  labels = jnp.asarray(rng.integers(0, 3, (2, 5, 5)))
  assert float(seg_losses.focal_loss(logits, labels, 0.0)) == pytest.approx(
      float(seg_losses.cross_entropy(logits, labels)), rel=1e-6)
  assert float(seg_losses.focal_loss(logits, labels, 2.0)) < float(
      seg_losses.cross_entropy(logits, labels))


def _numpy_kept_sums(logits, labels, keep):
  """Per-case TP / FP / FN / volume over the kept voxels only, by selecting them."""
  e = np.exp(logits - logits.max(-1, keepdims=True))
  p = e / e.sum(-1, keepdims=True)
  sums = []
  for b in range(len(labels)):
    probs, onehot = p[b][keep[b]], np.eye(logits.shape[-1])[labels[b][keep[b]]]  # [M, K]
    sums.append([(probs * onehot).sum(0), (probs * (1 - onehot)).sum(0),
                 ((1 - probs) * onehot).sum(0), onehot.sum(0)])
  return np.array(sums)  # [B, 4, K]


@pytest.mark.parametrize('per_case', [False, True])
def test_ignored_voxels_count_in_no_loss(per_case):
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(2, 6, 5, 4, 3))
  labels = rng.integers(0, 3, (2, 6, 5, 4))
  keep = rng.random(labels.shape) > 0.3
  masked = np.where(keep, labels, 255)
  sums = _numpy_kept_sums(logits, labels, keep)
  tp, fp, fn, vol = sums.transpose(1, 0, 2) if per_case else sums.sum(0)
  s = 1e-5
  dice = 1 - ((2 * tp + s) / (2 * tp + fp + fn + s))[..., 1:].mean()
  tversky = 1 - ((tp + s) / (tp + 0.3 * fp + 0.7 * fn + s))[..., 1:].mean()
  w = 1 / np.maximum(vol[..., 1:], 1) ** 2
  gdl = 1 - ((2 * (w * tp[..., 1:]).sum(-1) + s) /
             ((w * (2 * tp + fp + fn)[..., 1:]).sum(-1) + s)).mean()
  e = np.exp(logits - logits.max(-1, keepdims=True))
  logp = np.log(e / e.sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, labels[..., None], -1)[..., 0][keep].mean()
  pt = np.exp(np.take_along_axis(logp, labels[..., None], -1)[..., 0][keep])
  focal = (-(1 - pt) ** 2 * np.log(pt)).mean()
  x, y = jnp.asarray(logits), jnp.asarray(masked)
  kw = dict(per_case=per_case, ignore_label=255)
  assert float(seg_losses.soft_dice_loss(x, y, **kw)) == pytest.approx(dice, rel=1e-5)
  assert float(seg_losses.tversky_loss(x, y, **kw)) == pytest.approx(tversky, rel=1e-5)
  assert float(seg_losses.generalized_dice_loss(x, y, **kw)) == pytest.approx(gdl, rel=1e-5)
  assert float(seg_losses.cross_entropy(x, y, 255)) == pytest.approx(ce, rel=1e-5)
  assert float(seg_losses.focal_loss(x, y, 2.0, 255)) == pytest.approx(focal, rel=1e-5)
  assert float(seg_losses.dice_ce_loss(x, y, **kw)) == pytest.approx(dice + ce, rel=1e-5)
  # The logits at ignored voxels get no gradient.
  grad = jax.grad(lambda v: seg_losses.dice_ce_loss(v, y, **kw))(x)
  assert np.all(np.asarray(grad)[~keep] == 0) and np.any(np.asarray(grad)[keep] != 0)


def test_a_batch_with_every_voxel_ignored_has_a_finite_zero_ce():
  logits = jnp.ones((1, 4, 4, 3))
  labels = jnp.full((1, 4, 4), 255)
  assert float(seg_losses.cross_entropy(logits, labels, 255)) == 0.0
  assert np.isfinite(float(seg_losses.dice_ce_loss(logits, labels, ignore_label=255)))
