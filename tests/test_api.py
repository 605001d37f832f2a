"""The names the seed notebook imports, and the one version string."""
import re


def test_star_imports_give_the_seed_names():
    ns = {}
    exec('from fasterai.sparsifier import *\nfrom fasterai.pruner import *', ns)
    for name in ('SparsifyCallback', 'Sparsifier', 'annealing_cos', 'annealing_linear', 'annealing_agp', 'Pruner'):
        assert name in ns, name
    from fasterai.callback import SparsifyCallback
    assert ns['SparsifyCallback'] is SparsifyCallback


def test_all_module_exports_resolve():
    import fasterai.all as fa
    ns = {}
    exec('from fasterai.all import *', ns)
    assert set(fa.__all__) <= set(ns) and {'trace', 'count_macs', 'PruningError', 'CRITERIA'} <= set(ns)


def test_one_version_string():
    from importlib.metadata import version

    import fasterai
    assert re.fullmatch(r'\d+\.\d+\.\d+', fasterai.__version__)
    assert version('fasterai') == fasterai.__version__, 'setup.py must read the version from fasterai/__init__.py'


def test_no_import_cycle_and_register_layer_at_the_top():
    import runpy
    from pathlib import Path

    import fasterai
    runpy.run_path(str(Path(__file__).resolve().parent.parent / 'scripts' / 'import_cycles.py'), run_name='__main__')
    assert callable(fasterai.register_layer) and fasterai.LayerKind
