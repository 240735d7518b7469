"""Semi-supervised learning from the unlabelled rest of the training split.

Set ``data.labeled_fraction`` (or ``data.labeled_count``) to keep a seeded, stratified
labelled subset (:mod:`medjax.data.few_labels`; for segmentation, labelled training *cases*),
then ``semi.method``: ``'none'`` (the labelled subset only; an epoch stays as many steps as one
pass over the whole training split, so every method trains for the same steps), or one of the
methods below, each one module behind :class:`medjax.semi.base.Method`:

=================  ==================================================  ====================
``semi.method``    module                                              experiments
=================  ==================================================  ====================
``fixmatch``       :mod:`medjax.semi.fixmatch` (and FreeMatch)          per-image, label maps
``mixmatch``       :mod:`medjax.semi.mixmatch`                          per-image (softmax)
``mean_teacher``   :mod:`medjax.semi.mean_teacher`                      label maps
``self_training``  :mod:`medjax.semi.self_training`                     per-image, label maps
=================  ==================================================  ====================

A new method is one module: subclass ``Method``, declare its config keys
(:func:`medjax.config.declare`) and ``register_method('name', MyMethod)``; import it here.
The unlabelled images never carry labels into training: :class:`FewLabels` keeps images only,
and segmentation's unlabelled sampler reads images only (both tested).
"""

from medjax.semi.base import (METHODS, Method, consistency_mse, join_rows, make_method,
                              pseudo_label_map, ramp_up, register_method, split_rows)
from medjax.semi.fixmatch import (adaptive_threshold_state, adaptive_thresholds,
                                  align_distribution, cutmix, cutmix_boxes, masked_consistency,
                                  pseudo_label_probabilities, split_outputs, strong_intensity)
from medjax.semi.mean_teacher import noisy
from medjax.semi.mixmatch import guess_labels, mixmatch_loss, mixup, sharpen
from medjax.semi.self_training import (confident_per_class, pseudo_label_warning,
                                       with_labeled_share)

__all__ = ['METHODS', 'Method', 'make_method', 'register_method', 'split_rows', 'join_rows',
           'ramp_up', 'consistency_mse', 'adaptive_threshold_state', 'adaptive_thresholds',
           'align_distribution', 'cutmix', 'cutmix_boxes', 'masked_consistency',
           'pseudo_label_map', 'pseudo_label_probabilities', 'split_outputs',
           'strong_intensity', 'noisy', 'guess_labels', 'mixmatch_loss', 'mixup', 'sharpen',
           'confident_per_class', 'pseudo_label_warning', 'with_labeled_share']
