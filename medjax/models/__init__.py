"""Flax linen models, looked up by name. Importing this package registers the built-ins."""

from medjax.models import cnn, resnet, retina_unet, unet  # noqa: F401  (registers the models)
from medjax.models.registry import available_models, build_model, register_model

__all__ = ['available_models', 'build_model', 'register_model']
