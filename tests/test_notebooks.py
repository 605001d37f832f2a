"""The notebooks in nbs/ run top to bottom (their own asserts included)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'scripts'))
from run_notebooks import NBS, run  # noqa: E402


def stdout(nb):
    return ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.outputs)


@pytest.mark.parametrize('path', sorted(NBS.glob('*.ipynb')), ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv('FASTERAI_NB_FAST', '1')   # the small version of long notebooks (fewer images, one epoch)
    out = stdout(run(path))
    if path.name == '01_seed_flow.ipynb':
        assert 'Pruning of filter until a sparsity of 30%' in out and 'Final Sparsity: 30.00' in out
        assert out.count(': 30.00%') >= 4   # the last epoch line and each Conv2d
    if path.name == '02_toolbox.ipynb':
        assert 'largest |sparse - pruned| accuracy difference: 0.0' in out and 'lottery ticket: sparse' in out
    if path.name == '03_fastai_workflows.ipynb':
        assert out.count('Sparsity held in this fit') == 1 and 'Found a sparsity of 20.' in out
        assert 'Pruned after epoch 1' in out and 'same outputs: True' in out
        assert "is False for the example's shapes" in out   # the U-Net's branch on shapes
