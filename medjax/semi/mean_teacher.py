"""Mean teacher (Tarvainen & Valpola 2017; Yu et al. 2019 for segmentation), in one run.

Each step also takes ``semi.unlabeled_ratio`` x batch patches of unlabelled cases; the teacher
is the exponential moving average of the student's parameters (``semi.ema_decay``, kept in the
optimizer state by :func:`medjax.optim.with_parameter_ema`); student and teacher see the same
patches with independent Gaussian noise (``semi.noise_std``), and ``loss = supervised(labelled)
+ semi.weight * ramp(t) * MSE(softmax(student), teacher probabilities)`` over the unlabelled
patches, the weight ramped up over the first ``semi.ramp_up_fraction`` of training. Validation
and prediction use the student. For experiments whose targets are label maps.
"""

from __future__ import annotations

import jax
import ml_collections

from medjax import config as config_lib, optim
from medjax.semi import base


@config_lib.declare
def _defaults(c: ml_collections.ConfigDict) -> None:
  s = config_lib.section(c, 'semi')
  s.ema_decay = 0.99             # mean_teacher: the teacher's parameter average
  s.noise_std = 0.1              # mean_teacher: Gaussian input noise, student and teacher


class MeanTeacher(base.Method):
  name = 'mean_teacher'
  uses_unlabeled_batches = True

  @classmethod
  def supports(cls, exp) -> bool:
    return exp.label_maps

  def optimizer(self, tx):
    """The configured optimizer, also keeping the parameters' moving average (the
    teacher) in its state."""
    if self.exp.config.optimizer.ema_decay:
      raise ValueError(
          'semi.method=mean_teacher keeps its own average of the parameters (the teacher, '
          'semi.ema_decay): set optimizer.ema_decay=0')
    return optim.with_parameter_ema(tx, self.cfg.ema_decay)

  def batches(self, batches, start_step: int):
    # This process's rows: [labelled; unlabelled] (see base.split_rows).
    return base.join_batches(batches, self.exp.unlabeled_patches(start_step))

  def train_inputs(self, state, images, labels, key):
    """The batch ``[labelled; unlabelled]``: the student sees the unlabelled patches with
    one Gaussian noise, the teacher (the parameters' moving average) with another; the
    teacher's probabilities become the consistency targets."""
    exp, cfg, processes = self.exp, self.cfg, jax.process_count()
    labeled, unlabeled = base.split_rows(images, labels.shape[0], 2, processes)
    student_key, teacher_key = jax.random.split(key)
    teacher = base.teacher_probabilities(exp, state.opt_state.ema, state.batch_stats,
                                         noisy(unlabeled, teacher_key, cfg.noise_std))
    targets = {'labels': labels, 'teacher': teacher,
               'weight': cfg.weight * base.ramp_up(state.step, exp.total_steps,
                                                   cfg.ramp_up_fraction)}
    student_unlabeled = noisy(unlabeled, student_key, cfg.noise_std)
    return base.join_rows([labeled, student_unlabeled], processes), targets

  def loss(self, outputs, labels, loss_state):
    parts = base.split_each(outputs, labels['labels'].shape[0], 2)
    supervised = self.exp.loss([p[0] for p in parts], labels['labels'])
    unlabeled = base.consistency_mse(parts[0][1], labels['teacher'])
    return supervised + labels['weight'] * unlabeled, loss_state


base.register_method('mean_teacher', MeanTeacher)


def noisy(images: jax.Array, key: jax.Array, std: float) -> jax.Array:
  return images + std * jax.random.normal(key, images.shape, images.dtype)
