"""medjax: JAX/Flax deep learning for medical images."""

import os as _os

# TensorFlow (tf.data only) and XLA print C++ start-up INFO/WARNING lines; in library use
# (notebooks, scripts) keep them quiet unless the user chose a level (empty counts as unset).
# Set before either library is imported, which is when they read it. The CLI decides for its
# commands, --debug included (medjax/output.py).
USER_TF_LOG_LEVEL = _os.environ.get('TF_CPP_MIN_LOG_LEVEL') or None
if USER_TF_LOG_LEVEL is None:
  _os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'

__version__ = '0.1.0'
