"""fasterai: make neural networks lighter inside ordinary fastai training."""
__version__ = '0.1.0'

from .layers import LayerKind, register_layer, register_op, register_split  # noqa: E402,F401 (teach it your layers, ops and splits)
