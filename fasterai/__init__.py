"""fasterai: make neural networks lighter inside ordinary fastai training."""
__version__ = '0.1.0'

from .layers import LayerKind, register_layer  # noqa: E402,F401 (fasterai.register_layer: teach it your layers)
