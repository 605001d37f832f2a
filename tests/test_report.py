import torch
import torch.nn as nn

from fasterai.examples import Net
from fasterai.report import compare_models, count_macs, count_params, latency_ms, layer_shapes


def test_macs_by_hand():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    assert count_macs(m, (1, 3, 10, 10)) == 8 * 8 * 8 * 3 * 9 + 512 * 10
    assert count_macs(m, (4, 3, 10, 10)) == 4 * (8 * 8 * 8 * 3 * 9 + 512 * 10)
    assert count_params(m) == 8 * 27 + 8 + 5120 + 10


def test_seed_net_macs_and_shapes():
    # conv1 20x1x5x5 on 24x24, conv2 50x20x5x5 on 8x8, conv3 100x50x5x5 on 4x4, fc1 100->50, fc2 50->10
    expected = 20 * 25 * 576 + 50 * 500 * 64 + 100 * 1250 * 16 + 5000 + 500
    assert count_macs(Net(1), (1, 1, 28, 28)) == expected
    shapes = layer_shapes(Net(1))
    assert shapes['conv2'] == ('Conv2d', (50, 20, 5, 5), 25050) and 'pool' not in shapes


def test_latency_and_table():
    m = Net(1)
    assert latency_ms(m, (8, 1, 28, 28), min_run_time=0.05) > 0
    assert m.training, 'mode restored'
    table = compare_models(m, m, (1, 1, 28, 28), latency_input=(8, 1, 28, 28), min_run_time=0.05,
                           extra=[('accuracy', '1', '1', '')])
    assert 'parameters' in table and '156,570' in table and 'CPU latency, batch 8' in table
    assert 'conv3 (Conv2d)' in table and 'accuracy' in table


def test_table_with_a_budget_asked_and_reached():
    from fasterai.budget import MACs
    from fasterai.pruner import Pruner
    torch.manual_seed(0)
    m = Net(1).eval()
    pr = Pruner(target=MACs(0.5), method='global', layer_type=(torch.nn.Conv2d, torch.nn.Linear),
                example_input=(1, 1, 28, 28))
    pruned = pr.prune_model(m)
    table = compare_models(m, pruned, (1, 1, 28, 28), latency_input=(8, 1, 28, 28), min_run_time=0.05, budget=MACs(0.5))
    row = next(l for l in table.splitlines() if l.startswith('budget MACs(0.5)'))
    assert row.split()[-3:] == ['0.5', 'reached', f'{pr.reached:.3f}'] and pr.reached <= 0.5
