"""What the benchmark scripts share: paths, the example data loader, child processes, the results header.

Nothing here imports fasterai: the peer's processes (fasterai 0.4.1 from bench/.peer) import this module too.
"""
import importlib.util
import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault('FASTERAI_CACHE', '')   # a benchmark times its layers afresh, not from an earlier run's table
PEER = ROOT / 'bench' / '.peer'
PEER_NAME = 'fasterai 0.4.1'


def examples():
    "fasterai's examples module loaded from its file, so that the peer's process can use it too."
    spec = importlib.util.spec_from_file_location('fasterai_examples', ROOT / 'fasterai' / 'examples.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_child(script, impl, *args):
    """Run `script --child fasterai|peer ARGS` in a fresh process (the peer importing fasterai 0.4.1 from
    bench/.peer) and return the JSON lines it printed; None when the peer is not installed."""
    env = dict(os.environ)
    if impl == PEER_NAME:
        if not (PEER / 'fasterai').exists(): return None
        env['PYTHONPATH'] = str(PEER)
    cmd = [sys.executable, str(script), '--child', 'peer' if impl == PEER_NAME else impl, *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT / 'bench')
    if out.returncode != 0: raise RuntimeError(f'{impl} failed:\n{out.stderr[-2000:]}')
    return [json.loads(l) for l in out.stdout.splitlines() if l.startswith('{')]


def write_result(path, title, doc, lines, details='', before_table=''):
    """Write a results file: `title`, the description from the script's docstring `doc` (its second paragraph
    on, up to "Run:"), the command, machine and date (+ `details`), then `before_table` and the table `lines`."""
    description = doc.split('\n\n', 1)[1].split('Run:')[0]
    head = (f'# {title}\n\n{description}Command: `{" ".join(["python"] + sys.argv)}`  \n'
            f'Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, '
            f'{date.today()}{details}\n\n{before_table}')
    Path(path).write_text(head + '\n'.join(lines) + '\n')


def model_args(doc, models, repeats):
    """The options of a per-model timing script (`--models`, `--repeats`, `--out`), parsed, on 2 CPU threads with
    warnings off; `doc` is the script's docstring."""
    import argparse
    import warnings
    warnings.filterwarnings('ignore')
    torch.set_num_threads(2)
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument('--models', nargs='*', default=models)
    ap.add_argument('--repeats', type=int, default=repeats)
    ap.add_argument('--out', default=None)
    return ap.parse_args()


def threads_args(doc):
    """The options of a script timed at several thread counts (`--threads`, default 1 and 2; `--out`), parsed, with
    warnings off; `doc` is the script's docstring."""
    import argparse
    import warnings
    warnings.filterwarnings('ignore')
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument('--threads', type=int, nargs='*', default=[1, 2])
    ap.add_argument('--out', default=None)
    return ap.parse_args()
