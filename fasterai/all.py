"""Everything: `from fasterai.all import *`."""
from .sparsifier import *  # noqa: F401,F403
from .sparsifier import __all__ as _sparsifier
from .pruner import *  # noqa: F401,F403
from .pruner import __all__ as _pruner
from .graph import *  # noqa: F401,F403
from .graph import __all__ as _graph
from .criteria import CRITERIA
from .granularity import GRANULARITIES
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors
from .report import *  # noqa: F401,F403
from .report import __all__ as _report
from .export import *  # noqa: F401,F403
from .export import __all__ as _export
from .verify import check_same_function
from .layers import LayerKind, register_layer, register_op, register_split
from .distill import *  # noqa: F401,F403
from .distill import __all__ as _distill
from .sensitivity import *  # noqa: F401,F403
from .sensitivity import __all__ as _sensitivity
from .budget import Budget, CostModel

__all__ = [*_sparsifier, *_pruner, *_graph, *_errors, *_report, *_export, *_distill, *_sensitivity, 'Budget', 'CostModel', 'CRITERIA', 'GRANULARITIES',
           'check_same_function', 'LayerKind', 'register_layer', 'register_op', 'register_split']
