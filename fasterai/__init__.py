"""fasterai: make neural networks lighter inside ordinary fastai training."""
__version__ = '0.1.0'
