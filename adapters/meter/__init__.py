"""METER (Dou et al., CVPR 2022): the model (`model`), the official-checkpoint loader
(`loader`) and the trimming adapter (`adapter`, registered by ``trimkit.adapters``)."""

from . import loader, model
from .loader import *  # noqa: F403
from .model import *  # noqa: F403

__all__ = [*model.__all__, *loader.__all__]
