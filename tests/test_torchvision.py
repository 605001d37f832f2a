"""One torchvision model of each family, pruned at 30% 'filter' (local and global): sparse == pruned.

The full list at full size is bench/torchvision_sweep.py (results in bench/results/torchvision.md).
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import max_rel_diff

from fasterai.pruner import Pruner
from fasterai.report import count_params
from fasterai.sparsifier import Sparsifier

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'bench'))
from torchvision_sweep import build  # noqa: E402 (the sweep's model set-up: one piece for both)

FAMILIES = {   # model: (input size, extra builder arguments), small inputs to fit the CI budget
    'alexnet': (64, {}), 'vgg11_bn': (32, {}), 'resnet18': (64, {}), 'resnext50_32x4d': (64, {}),
    'wide_resnet50_2': (64, {}), 'densenet121': (64, {}), 'googlenet': (64, {'init_weights': True}),
    'inception_v3': (299, {'init_weights': True}), 'squeezenet1_1': (64, {}), 'mobilenet_v2': (64, {}),
    'mobilenet_v3_small': (64, {}), 'mnasnet0_5': (64, {}), 'efficientnet_b0': (64, {}),
    'efficientnet_v2_s': (64, {}), 'shufflenet_v2_x0_5': (64, {}), 'regnet_y_400mf': (64, {}),
    'convnext_tiny': (64, {}), 'vit_b_16': (32, {'image_size': 32}), 'swin_t': (64, {}),
}


@pytest.mark.parametrize('method', ['local', 'global'])
@pytest.mark.parametrize('name', list(FAMILIES))
def test_torchvision_family(name, method):
    size, kwargs = FAMILIES[name]
    shape = (2, 3, size, size)
    model = build(name, shape, **kwargs)
    sp = Sparsifier(model, 'filter', method, 'l1', layer_type=(nn.Conv2d, nn.Linear), example_input=shape)
    sp.sparsify(30)
    pruned = Pruner(example_input=shape).prune_model(model)
    assert count_params(pruned) < 0.95 * count_params(model)
    x = torch.randn(shape)
    with torch.no_grad():
        assert max_rel_diff(model(x), pruned.eval()(x)) < 1e-4


@pytest.mark.parametrize('name', ['lraspp_mobilenet_v3_large', 'deeplabv3_mobilenet_v3_large'])
def test_segmentation_models_with_dict_outputs(name):
    import torchvision
    torch.manual_seed(0)
    model = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    Sparsifier(model, 'filter', 'local', 'l1', nn.Conv2d, example_input=x).sparsify(30)
    pruned = Pruner(example_input=x).prune_model(model)   # verified in both modes, every output of the dict
    with torch.no_grad(): assert max_rel_diff(model(x)['out'], pruned(x)['out']) < 1e-4
    assert count_params(pruned) < 0.6 * count_params(model)


def test_a_detection_model_says_what_to_keep_whole_and_its_backbone_prunes_alone():
    import torchvision
    from fasterai.errors import TraceError
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3).eval()
    x = torch.randn(1, 3, 128, 128)
    with pytest.raises(TraceError, match=r"inside module 'transform' .* pass leaf_modules=\['transform'\]"):
        Sparsifier(model, 'filter', example_input=x)
    with pytest.raises(TraceError, match=r"a part of it that traces alone \(one of its children: 'backbone', 'rpn', "
                                         r"'roi_heads'\)"):
        Sparsifier(model, 'filter', example_input=x, leaf_modules=['transform'])
    Sparsifier(model.backbone, 'filter', example_input=x).sparsify(30)
    with torch.no_grad(): ref = model.backbone(x)
    pruned = Pruner(example_input=x).prune_model(model.backbone)
    with torch.no_grad(): out = pruned(x)
    assert list(out) == ['0', '1', 'pool'] and all(max_rel_diff(ref[k], out[k]) < 1e-4 for k in ref)
    assert count_params(pruned) < 0.7 * count_params(model.backbone)

