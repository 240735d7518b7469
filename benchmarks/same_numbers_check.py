"""Before/after check of a refactor: run from a checkout's root, writes JSON of the losses,
parameter/optimizer-state digests and results of short runs of every task and semi-supervised
method; two checkouts give the same JSON when the numbers are unchanged (wall-time fields
aside). Issue 29 compared c17630c with the seam refactor this way:

  (cd OLD && python /path/to/same_numbers_check.py /tmp/before.json)
  (cd NEW && python benchmarks/same_numbers_check.py /tmp/after.json)
"""
import hashlib, json, os, sys, shutil, tempfile
sys.path.insert(0, os.getcwd())
import jax, numpy as np
from medjax import config as config_lib, train as train_lib
from medjax.experiments import make_experiment
print('medjax from', __import__('medjax').__file__, file=sys.stderr)
out = {}
tmp = tempfile.mkdtemp()

def cfg(spec, *ov):
  c = config_lib.load_config_file(spec)
  return config_lib.apply_overrides(c, list(ov))

def digest(tree):
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(tree)):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()[:16]

def steps(c, n):
  exp = make_experiment(c)
  state = exp.init_state()
  losses = []
  for _, (x, y) in zip(range(n), exp.train_iterator(0)):
    state, m = exp.train_step(state, x, y)
    losses.append(float(m['loss']))
  return {'losses': losses, 'params': digest(state.params), 'opt': digest(state.opt_state),
          'loss_state': digest(state.loss_state)}

def clean(r):
  return {k: v for k, v in r.items() if k not in ('run_info', 'versions')}

q = 'configs/quickstart.py:runlocal'
r = train_lib.train_and_evaluate(cfg(q), f'{tmp}/q')
out['quickstart'] = clean(r)
out['quickstart_log'] = open(f'{tmp}/q/metrics.jsonl').read().replace(tmp, 'TMP')
s = train_lib.train_and_evaluate(cfg(q, 'train.seeds=(0,1)'), f'{tmp}/s')
out['seeds'] = s
for k in (0, 1):
  out[f'seed{k}'] = clean(json.load(open(f'{tmp}/s/seed_{k}/results.json')))
out['fixmatch'] = steps(cfg(q, 'data.labeled_fraction=0.1', 'semi.method=fixmatch', 'semi.threshold=0.4'), 5)
out['freematch'] = steps(cfg(q, 'data.labeled_fraction=0.1', 'semi.method=fixmatch', 'semi.threshold_mode=self_adaptive'), 5)
out['mixmatch'] = steps(cfg(q, 'data.labeled_fraction=0.25', 'semi.method=mixmatch', 'semi.unlabeled_ratio=1', 'semi.distribution_alignment=True'), 5)
teacher = f'{tmp}/teacher'
train_lib.train_and_evaluate(cfg(q, 'data.labeled_fraction=0.2'), teacher)
out['self_training'] = steps(cfg(q, 'data.labeled_fraction=0.2', 'semi.method=self_training', f'semi.teacher={teacher}', 'semi.threshold=0.4'), 5)
out['ema'] = steps(cfg(q, 'optimizer.ema_decay=0.9'), 5)
from medjax.data import synthetic
root = synthetic.write_segmentation_dataset(f'{tmp}/data', num_cases=8, seed=0)
def seg(*ov):
  return cfg('configs/hippocampus_unet3d.py:runlocal', f'data.root={root}', f'data.cache_dir={tmp}/cache', 'data.max_cases=8', 'data.num_folds=4', 'data.labeled_count=2', 'data.slice_axis=0', 'data.patch_size=(16, 16)', *ov)
out['seg_none'] = steps(seg(), 4)
out['seg_fixmatch'] = steps(seg('semi.method=fixmatch', 'semi.threshold=0.4'), 4)
out['seg_mean_teacher'] = steps(seg('semi.method=mean_teacher'), 4)
steacher = f'{tmp}/steacher'
train_lib.train_and_evaluate(seg('train.num_epochs=1'), steacher)
out['seg_self_training'] = steps(seg('semi.method=self_training', f'semi.teacher={steacher}', 'semi.threshold=0.5'), 4)
seg3 = cfg('configs/hippocampus_unet3d.py:runlocal', f'data.root={root}', f'data.cache_dir={tmp}/cache', 'data.max_cases=8', 'data.num_folds=4')
out['seg3d'] = clean(train_lib.train_and_evaluate(seg3, f'{tmp}/seg3'))
json.dump(out, open(sys.argv[1], 'w'), indent=1, sort_keys=True, default=str)
shutil.rmtree(tmp)
