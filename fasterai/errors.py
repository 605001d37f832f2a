"""The exceptions fasterai raises, all `ValueError`s so that a bad model reads like bad input."""

__all__ = ['TraceError', 'PruningError']


class TraceError(ValueError):
    """The model cannot be traced into a channel graph (fx failure, forward hooks, unknown input shape)."""


class PruningError(ValueError):
    """The pruned model would not compute what the sparse model computed."""
