"""data.augment_on='device': augmentation inside the train step equals the host's for the
same parameters (segmentation: SciPy patches from the whole case; classification: the
tf.data ops), its draws have the host's probabilities and ranges, each example's draw is a
pure function of (seed, step, index in the global batch), and training with it runs and
resumes exactly. Also: the host's split into draw_params + apply leaves its patches as
they were (a copy of the sampler before the split is the reference)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from medjax import config as config_lib
from medjax.data import augment as augment_lib, device_augment, device_augment_images
from medjax.data import sampling, seg_augment
from medjax.data.nifti import resample_to_shape
from medjax.data.seg_augment import SegAugment
from medjax.experiments import augment_on, make_experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each op alone (its probability 1), then all together at one half.
SEG_OPS = {'flip': dict(p_flip=0.5), 'rot90': dict(p_rot90=1.0),
           'rotate': dict(p_rotate=1.0, rotate_deg=30.0), 'scale': dict(p_scale=1.0),
           'elastic': dict(p_elastic=1.0), 'noise': dict(p_noise=1.0),
           'blur': dict(p_blur=1.0), 'brightness': dict(p_brightness=1.0),
           'contrast': dict(p_contrast=1.0), 'gamma': dict(p_gamma=1.0),
           'lowres': dict(p_lowres=1.0)}
EVERY_OP = SegAugment(p_flip=0.5, p_rot90=0.5, p_rotate=0.5, rotate_deg=30.0, p_scale=0.5,
                      p_elastic=0.5, p_noise=0.5, p_blur=0.5, p_brightness=0.5,
                      p_contrast=0.5, p_gamma=0.5, p_lowres=0.5)


def _case(shape, channels, seed=0):
  rng = np.random.default_rng(seed)
  image = ndimage.gaussian_filter(rng.normal(size=shape + (channels,)), 1.0).astype(np.float32)
  label = (rng.random(shape) * 3).astype(np.uint8)
  return image, label


@pytest.mark.parametrize('shape,patch', [((20, 24, 18), (12, 10, 10)), ((30, 26), (16, 16))])
def test_device_patches_equal_host_patches_for_each_op(shape, patch):
  image, label = _case(shape, 2)
  # One program with every op; example k's parameters are a host draw of one op alone.
  half = seg_augment.crop_half_extent(EVERY_OP, patch)
  host, crops, targets, params = [], [], [], []
  for k, (name, kw) in enumerate(list(SEG_OPS.items()) * 2 + [('all', None)] * 4):
    aug = SegAugment(**kw) if kw else EVERY_OP
    rng = np.random.default_rng([3, k])
    # Whole voxels (ties everywhere for an even patch: halves round up) and anywhere.
    centre = rng.uniform(0, np.array(shape) - 1)
    centre = np.floor(centre) if k % 2 else centre
    p = seg_augment.draw_params(rng, aug, patch, 2)
    host.append(seg_augment.apply(image, label, centre, p, aug, patch))
    crop, target = seg_augment.crop_case(image, label, centre, half)
    crops.append(crop), targets.append(target), params.append(p)
  batch = {k: np.stack([t[k] for t in targets]) for k in targets[0]}
  x, y = jax.jit(lambda c, t, p: device_augment.apply(c, t, p, EVERY_OP, patch))(
      np.stack(crops), batch, device_augment.host_params_batch(params, EVERY_OP, patch, 2))
  for k, ((hx, hy), dx, dy) in enumerate(zip(host, np.asarray(x), np.asarray(y))):
    np.testing.assert_allclose(dx, hx, atol=2e-5, rtol=1e-5, err_msg=f'example {k}')
    # Labels: exact; with elastic deformation (float32 displacements smoothed on the
    # device, float64 on the host) a voxel at a rounding tie may go the other way.
    if params[k]['elastic']:
      assert np.mean(dy != hy) <= 0.005, k
    else:
      np.testing.assert_array_equal(dy, hy, err_msg=f'example {k}')


def test_crop_holds_everything_the_largest_transform_reads():
  patch = (12, 16, 10)
  aug = SegAugment(p_rotate=1.0, rotate_deg=40.0, p_scale=1.0, scale=(0.7, 1.4),
                   p_elastic=1.0, elastic_alpha=3.0)
  half = seg_augment.crop_half_extent(aug, patch)
  centre = np.array([5.3, 7.0, 2.9])
  for k in range(40):
    p = seg_augment.draw_params(np.random.default_rng(k), aug, patch, 1)
    # The extreme angles and scale too, not only random ones.
    if k < 8:
      p['angles'] = np.deg2rad(40.0) * np.array([(-1) ** (k >> b) for b in range(3)])
      p['scale_factor'] = 0.7
    coords = seg_augment.sampling_coords(centre, p, aug, patch)
    in_crop = coords - (np.floor(centre) - half)[:, None]
    assert in_crop.min() >= 0 and in_crop.max() + 1 <= (2 * half + 2).max()
    assert np.all(in_crop.max(axis=1) + 1 <= 2 * half + 1)


def _legacy_sample(image, label, locations, patch_size, foreground, rng, augment):
  """The sampler's ``sample`` before draw_params/apply (copied verbatim, only names)."""
  nd = label.ndim
  patch = np.asarray(patch_size, np.float64)
  centre = sampling._choose_centre(label, locations, foreground, patch, rng)
  grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2.0 for n in patch_size],
                              indexing='ij'), axis=0)
  offsets = grid.reshape(nd, -1)
  matrix = np.eye(nd)
  if rng.random() < augment.p_rotate:
    angles = rng.uniform(-1, 1, 1 if nd == 2 else 3) * np.deg2rad(augment.rotate_deg)
    matrix = seg_augment.rotation_matrix(angles, nd) @ matrix
  if rng.random() < augment.p_scale:
    matrix = matrix / rng.uniform(*augment.scale)
  for axis in range(nd):
    if rng.random() < augment.p_flip:
      matrix[:, axis] = -matrix[:, axis]
  if (rng.random() < augment.p_rot90 and patch_size[-1] == patch_size[-2]):
    k = int(rng.integers(1, 4))
    rot = np.eye(nd)
    c, s = np.round(np.cos(k * np.pi / 2)), np.round(np.sin(k * np.pi / 2))
    rot[nd - 2:, nd - 2:] = [[c, -s], [s, c]]
    matrix = matrix @ rot
  coords = matrix @ offsets
  if rng.random() < augment.p_elastic:
    shape = tuple(int(n) for n in patch_size)
    displacement = [ndimage.gaussian_filter(rng.uniform(-1, 1, shape), augment.elastic_sigma)
                    for _ in range(nd)]
    displacement = np.stack([d / (np.abs(d).max() + 1e-8) for d in displacement])
    coords = coords + augment.elastic_alpha * displacement.reshape(nd, -1)
  coords = coords + centre[:, None]
  out_shape = tuple(int(n) for n in patch_size)
  image_patch = np.stack([
      ndimage.map_coordinates(np.asarray(image[..., c], np.float32), coords, order=1,
                              mode='constant', cval=0.0).reshape(out_shape)
      for c in range(image.shape[-1])], axis=-1)
  label_patch = ndimage.map_coordinates(np.asarray(label), coords, order=0, mode='constant',
                                        cval=0).reshape(out_shape).astype(np.int32)
  x, aug, spatial = image_patch, augment, image_patch.ndim - 1
  if rng.random() < aug.p_noise:
    x = x + rng.normal(0.0, aug.noise_std, x.shape).astype(np.float32)
  if rng.random() < aug.p_blur:
    sigma = rng.uniform(*aug.blur_sigma)
    x = ndimage.gaussian_filter(x, sigma=[sigma] * spatial + [0])
  if rng.random() < aug.p_brightness:
    x = x * rng.uniform(*aug.brightness)
  if rng.random() < aug.p_contrast:
    mean = x.mean(axis=tuple(range(spatial)), keepdims=True)
    x = (x - mean) * rng.uniform(*aug.contrast) + mean
  if rng.random() < aug.p_gamma:
    lo = x.min(axis=tuple(range(spatial)), keepdims=True)
    span = x.max(axis=tuple(range(spatial)), keepdims=True) - lo + 1e-8
    x = ((x - lo) / span) ** rng.uniform(*aug.gamma) * span + lo
  if rng.random() < aug.p_lowres:
    zoom = rng.uniform(*aug.lowres_zoom)
    small_shape = [max(1, int(round(n * zoom))) for n in x.shape[:spatial]]
    x = np.stack([resample_to_shape(resample_to_shape(x[..., c], small_shape, order=0),
                                    x.shape[:spatial], order=1)
                  for c in range(x.shape[-1])], axis=-1)
  return x.astype(np.float32), label_patch


@pytest.mark.parametrize('shape,patch', [((20, 24, 18), (12, 10, 10)), ((30, 26), (16, 16))])
def test_host_patches_are_those_of_the_sampler_before_the_split(shape, patch):
  image, label = _case(shape, 2, seed=1)
  locations = {'1': np.argwhere(label == 1), '2': np.argwhere(label == 2)}
  for k in range(8):
    ours = sampling.sample(image, label, locations, patch, k % 2 == 0,
                           np.random.default_rng([4, k]), EVERY_OP)
    theirs = _legacy_sample(image, label, locations, patch, k % 2 == 0,
                            np.random.default_rng([4, k]), EVERY_OP)
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_array_equal(ours[1], theirs[1])


def test_device_draws_have_the_host_probabilities_and_ranges():
  aug = SegAugment(p_flip=0.3, p_rot90=0.4, p_rotate=0.2, rotate_deg=20.0, p_scale=0.6,
                   p_elastic=0.1, p_noise=0.25, p_blur=0.7, p_brightness=0.15,
                   p_contrast=0.5, p_gamma=0.35, p_lowres=0.8)
  patch, n = (4, 4, 4), 4000
  keys = device_augment.example_keys(jax.random.PRNGKey(0), n)
  device = jax.device_get(jax.jit(lambda k: device_augment.draw_params(k, aug, patch, 1))(keys))
  host_list = [seg_augment.draw_params(np.random.default_rng([9, j]), aug, patch, 1)
               for j in range(n)]
  host = device_augment.host_params_batch(host_list, aug, patch, 1)
  tolerance = 4 * np.sqrt(0.25 / n) * 2  # both are binomial estimates
  for gate, prob in (('rotate', .2), ('scale', .6), ('flip', .3), ('elastic', .1),
                     ('noise', .25), ('blur', .7), ('brightness', .15), ('contrast', .5),
                     ('gamma', .35), ('lowres', .8)):
    assert abs(device[gate].mean() - host[gate].mean()) < tolerance, gate
    assert abs(device[gate].mean() - prob) < tolerance / 2, gate
  assert abs((device['rot90'] > 0).mean() - (host['rot90'] > 0).mean()) < tolerance
  assert set(np.unique(device['rot90'])) == set(np.unique(host['rot90'])) == {0, 1, 2, 3}
  for value, gate, (lo, hi) in (('scale_factor', 'scale', aug.scale),
                                ('blur_sigma', 'blur', aug.blur_sigma),
                                ('brightness_factor', 'brightness', aug.brightness),
                                ('contrast_factor', 'contrast', aug.contrast),
                                ('gamma_value', 'gamma', aug.gamma),
                                ('lowres_zoom', 'lowres', aug.lowres_zoom)):
    for draws in (device, host):
      on = draws[value][draws[gate]]
      assert lo <= on.min() and on.max() <= hi, value
      assert abs(on.mean() - (lo + hi) / 2) < 0.05 * (hi - lo), value
  angles = device['angles'][device['rotate']]
  assert np.abs(angles).max() <= np.deg2rad(20.0) + 1e-6
  assert np.abs(angles).max() > 0.95 * np.deg2rad(20.0)
  on = device['noise']
  assert device['noise_values'][on].std() == pytest.approx(aug.noise_std, rel=0.05)
  assert host['noise_values'][host['noise']].std() == pytest.approx(aug.noise_std, rel=0.05)
  assert np.abs(device['elastic_noise']).max() <= 1.0


CLS_EVERY_OP = dict(flip_lr=True, flip_ud=True, rotation_deg=30.0, scale_min=0.7,
                    scale_max=1.3, brightness=0.2, contrast=0.3, cutout=0.3, translate=0.2,
                    shear_deg=15.0, blur_sigma=1.0, noise_std=0.1, op_prob=0.5)


@pytest.mark.parametrize('shape,ops', [
    ((17, 20, 2), CLS_EVERY_OP),
    ((6, 9, 8, 1), dict(flip_lr=True, flip_ud=True, brightness=0.2, contrast=0.3,
                        noise_std=0.1, cutout=0.4, op_prob=0.6))])
def test_device_images_equal_the_tf_data_ops(shape, ops):
  aug = augment_lib.augment_section(**ops)
  images = np.random.default_rng(0).normal(size=(16,) + shape).astype(np.float32)
  host, params = [], []
  for j in range(16):
    p = augment_lib.draw_params(aug, tf.constant([5, j], tf.int64), tf.constant(shape))
    host.append(augment_lib.apply_params(tf.constant(images[j]), p, aug, len(shape) - 1))
    params.append({k: np.asarray(v) for k, v in p.items()})
  batch = {k: np.stack([p[k] for p in params]) for k in params[0]}
  out = jax.jit(lambda x, p: device_augment_images.apply(x, p, aug))(images, batch)
  np.testing.assert_allclose(np.asarray(out), np.stack(host), atol=3e-5)
  # Every op ran in some example and was skipped in another.
  for gate in ('flip_lr', 'brightness', 'contrast', 'noise') + (
      ('affine', 'blur') if len(shape) == 3 else ()):
    assert 0 < batch[gate].mean() < 1, gate


def test_device_image_draws_have_the_host_probabilities_and_ranges():
  aug = augment_lib.augment_section(**CLS_EVERY_OP)
  shape, n = (8, 8, 1), 2000
  keys = device_augment.example_keys(jax.random.PRNGKey(1), n)
  device = jax.device_get(jax.jit(
      lambda k: device_augment_images.draw_params(k, aug, shape))(keys))
  host = tf.map_fn(lambda j: {k: tf.cast(v, tf.float32) for k, v in augment_lib.draw_params(
      aug, tf.stack([tf.constant(7, tf.int64), j]), tf.constant(shape)).items()},
      tf.range(200, dtype=tf.int64),
      fn_output_signature={k: tf.float32 for k in device})
  host = {k: v.numpy() for k, v in host.items()}
  assert set(device) == set(host)
  for gate, prob in (('flip_lr', .5), ('flip_ud', .5), ('affine', .5), ('brightness', .5),
                     ('contrast', .5), ('blur', .5), ('noise', .5)):
    assert abs(device[gate].mean() - prob) < 0.05 and abs(host[gate].mean() - prob) < 0.15
  for value, lo, hi in (('angle', -np.pi / 6, np.pi / 6), ('zoom', 0.7, 1.3),
                        ('shear', -np.pi / 12, np.pi / 12), ('shift_y', -1.6, 1.6),
                        ('shift_x', -1.6, 1.6), ('shift', -0.2, 0.2), ('factor', 0.7, 1.3),
                        ('sigma', 0.0, 1.0), ('cutout_u', 0.0, 1.0)):
    for draws in (device, host):
      assert lo - 1e-6 <= draws[value].min() and draws[value].max() <= hi + 1e-6, value
      assert abs(draws[value].mean() - (lo + hi) / 2) < 0.08 * (hi - lo), value
  for draws in (device, host):  # std uniform in [0, 0.1]: E[x^2] = 0.01 / 3
    assert np.mean(draws['noise_values'] ** 2) == pytest.approx(0.01 / 3, rel=0.1)


class _State:
  def __init__(self, seed, step):
    self.dropout_key = jax.random.split(jax.random.PRNGKey(seed))[1]
    self.step = jnp.int32(step)


def test_an_example_draw_depends_on_seed_step_and_index_only():
  aug = SegAugment(p_flip=0.5, p_noise=0.5, p_gamma=0.5)
  draw_jit = jax.jit(lambda keys: device_augment.draw_params(keys, aug, (6, 6, 6), 1))
  draw = lambda state, b: jax.device_get(draw_jit(  # noqa: E731
      augment_on.example_keys(state, b)))
  eight, four = draw(_State(0, 5), 8), draw(_State(0, 5), 4)
  for k in eight:
    np.testing.assert_array_equal(eight[k][:4], four[k])
  np.testing.assert_array_equal(draw(_State(0, 5), 8)['noise_values'], eight['noise_values'])
  assert not np.array_equal(draw(_State(0, 6), 8)['noise_values'], eight['noise_values'])
  assert not np.array_equal(draw(_State(1, 5), 8)['noise_values'], eight['noise_values'])


_SHARDED = r'''
import json, sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from medjax.data import device_augment
from medjax.data.seg_augment import SegAugment
aug = SegAugment(p_flip=0.5, p_rotate=0.5, p_noise=0.5, p_gamma=0.5)
key = jax.random.PRNGKey(3)
crops = np.random.default_rng(0).normal(size=(8, 14, 14, 1)).astype(np.float32)
targets = {'label': (crops[..., 0] > 0).astype(np.uint8),
           'centre': np.full((8, 2), 6.5, np.float32), 'low': np.zeros((8, 2), np.float32),
           'high': np.full((8, 2), 13.0, np.float32)}
def fn(c, t):
  p = device_augment.draw_params(device_augment.example_keys(key, 8), aug, (8, 8), 1)
  return device_augment.apply(c, t, p, aug, (8, 8))
mesh = Mesh(np.array(jax.devices()), ('data',))
shard = NamedSharding(mesh, P('data'))
x, y = jax.jit(fn, in_shardings=(shard, shard))(crops, targets)
np.save(sys.argv[1], np.concatenate([np.asarray(x).ravel(), np.asarray(y).ravel()]))
print(len(jax.devices()))
'''


@pytest.mark.slow
def test_eight_devices_give_the_numbers_of_one(tmp_path):
  outputs = []
  for count in (1, 8):
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={count}',
               JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
    path = str(tmp_path / f'{count}.npy')
    run = subprocess.run([sys.executable, '-c', _SHARDED, path], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == str(count)
    outputs.append(np.load(path))
  np.testing.assert_array_equal(outputs[0], outputs[1])


def _seg_config(tmp_path, **overrides):
  from medjax.data import synthetic
  root = synthetic.write_segmentation_dataset(str(tmp_path / 'data'), num_cases=4, seed=0)
  c = config_lib.load_config_file('configs/hippocampus_unet3d.py:runlocal')
  config_lib.apply_overrides(c, [f'data.root={root}', f'data.cache_dir={tmp_path / "cache"}',
                                 'data.augment_on=device', 'data.num_folds=2',
                                 'data.seg_augment.p_elastic=0.3'] +
                             [f'{k}={v}' for k, v in overrides.items()])
  return c


def _losses(exp, state, start, stop):
  losses = []
  for step, (images, labels) in zip(range(start, stop), exp.train_iterator(start)):
    state, metrics = exp.train_step(state, images, labels)
    losses.append(float(metrics['loss']))
  return state, losses


@pytest.mark.slow
def test_segmentation_steps_with_device_augmentation_resume_exactly(tmp_path):
  exp = make_experiment(_seg_config(tmp_path))
  images, targets = next(iter(exp.train_iterator(0)))
  size = tuple(2 * exp.sampler.crop_half + 2)
  assert images.shape == (2,) + size + (1,) and targets['label'].shape == (2,) + size
  state, losses = _losses(exp, exp.init_state(), 0, 4)
  assert np.all(np.isfinite(losses))
  middle, first = _losses(exp, exp.init_state(), 0, 2)  # the same compiled step
  _, rest = _losses(exp, middle, 2, 4)
  assert first + rest == losses
  # What the model trained on: augmented patches of the configured size.
  patches, labels = jax.jit(exp.train_inputs)(state, images, targets, jax.random.PRNGKey(0))
  assert patches.shape == (2, 16, 16, 16, 1) and labels.shape == (2, 16, 16, 16)
  assert set(np.unique(np.asarray(labels))) <= {0, 1, 2}


@pytest.mark.slow
def test_classification_with_device_augmentation_trains_and_leaves_the_host_batches_plain():
  c = config_lib.load_config_file('configs/quickstart.py:runlocal')
  config_lib.apply_overrides(c, ['data.augment_on=device', 'model.features=(4,)',
                                 'model.hidden=8', 'data.augment.rotation_deg=10.0',
                                 'data.augment.noise_std=0.1'])
  exp = make_experiment(c)
  host = make_experiment(config_lib.apply_overrides(
      config_lib.load_config_file('configs/quickstart.py:runlocal'),
      ['data.augment_on=host', 'model.features=(4,)', 'model.hidden=8',
       'data.augment.flip_lr=false', 'data.augment.flip_ud=false']))
  # The host sends the normalised images as they are (no augmentation there).
  ours, plain = next(iter(exp.train_iterator(0))), next(iter(host.train_iterator(0)))
  np.testing.assert_array_equal(ours[0], plain[0])
  state, losses = _losses(exp, exp.init_state(), 0, 3)
  assert np.all(np.isfinite(losses))
  augmented, _ = jax.jit(exp.train_inputs)(state, ours[0], ours[1], jax.random.PRNGKey(0))
  assert augmented.shape == ours[0].shape and not np.allclose(augmented, ours[0])


def test_augment_on_errors(tmp_path):
  c = config_lib.load_config_file('configs/quickstart.py:runlocal')
  config_lib.apply_overrides(c, ['data.augment_on=gpu'])
  with pytest.raises(ValueError, match="data.augment_on must be 'host' or 'device', got 'gpu'"):
    make_experiment(c)
  c = config_lib.load_config_file('configs/quickstart.py:runlocal')
  config_lib.apply_overrides(c, ['data.augment_on=device', 'semi.method=fixmatch',
                                 'data.labeled_fraction=0.5'])
  with pytest.raises(ValueError, match='data.augment_on=device: semi.method=fixmatch builds'):
    make_experiment(c)
  c = config_lib.load_config_file('configs/quickstart.py:runlocal')
  config_lib.apply_overrides(c, ['data.augment_on=device', 'task=contrastive'])
  with pytest.raises(ValueError, match='data.augment_on=device: task contrastive'):
    make_experiment(c)


@pytest.mark.slow
def test_cli_training_with_device_augmentation_resumes_exactly(tmp_path):
  from medjax import train as train_lib
  config = _seg_config(tmp_path)
  results = train_lib.train_and_evaluate(config, str(tmp_path / 'full'))
  stopped = train_lib.train_and_evaluate(_seg_config(tmp_path, **{
      'train.stop_after_steps': 4}), str(tmp_path / 'resumed'))
  assert stopped == {'stopped_at_step': 4}
  resumed = train_lib.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert resumed['val']['per_case'] == results['val']['per_case']
  def losses(w):
    return [json.loads(l)['loss'] for l in open(os.path.join(w, 'metrics.jsonl'))
            if json.loads(l)['split'] == 'train']
  assert losses(str(tmp_path / 'resumed')) == losses(str(tmp_path / 'full'))
