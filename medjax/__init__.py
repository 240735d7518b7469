"""medjax: JAX/Flax deep learning for medical images."""

import os as _os

# TensorFlow is only used for tf.data; keep its C++ logging quiet unless asked otherwise.
_os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

__version__ = '0.1.0'
