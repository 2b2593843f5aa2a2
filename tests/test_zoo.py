"""The built-in zoo: its figures are measured, its random weights are not degenerate, every model
exports, and ``handoff zoo`` lists them."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import handoff
from handoff.backend import import_ref
from handoff.cli import main
from handoff.zoo import BUILTIN, measure

SEED_WORKLOADS = {"squeezesam", "bandwidth_gru", "langid", "image_to_music", "noise_suppressor", "mobilenet_v2",
                  "resnet18", "vit_tiny"}
#: Models with 224x224 inputs: seconds to build and run eagerly on two busy cores.
LARGE = {"mobilenet_v2", "resnet18", "vit_tiny", "image_to_music"}


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in sorted(names)]


def test_the_zoo_holds_the_seed_workloads():
    assert SEED_WORKLOADS <= set(BUILTIN)
    assert set(BUILTIN) <= set(handoff.get_plugins().zoo())
    assert handoff.ZooModel is handoff.zoo.ZooModel and handoff.ResolvedModel is handoff.zoo.ResolvedModel


@pytest.mark.parametrize("name", _params(BUILTIN))
def test_figures_are_measured_and_weights_not_degenerate(name):
    zoo = BUILTIN[name]
    model = zoo.build()
    x1, x2 = zoo.example_inputs(1), zoo.example_inputs(2)
    params, flops = measure(model, x1)
    assert (zoo.params, zoo.flops) == (params, flops)
    doc = inspect.getdoc(import_ref(zoo.factory))
    assert f"Parameters: {params:,}; FLOPs: {flops:,}" in " ".join(doc.split()), doc
    with torch.no_grad():
        y1, y2 = model(*x1), model(*x2)
    for a, b in zip(*(y if isinstance(y, tuple) else (y,) for y in (y1, y2))):
        a, b = a.double(), b.double()
        assert torch.isfinite(a).all()
        # the output moves with the input by a good fraction of its own size (a random-weight
        # network whose norms collapse gives the same output, to many digits, for every input)
        assert (a - b).abs().max() > 1e-2 * a.abs().max(), f"{name}: output does not depend on the input"
    rebuilt = zoo.build()
    with torch.no_grad():
        again = rebuilt(*x1)
    for a, b in zip(*(y if isinstance(y, tuple) else (y,) for y in (y1, again))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # deterministic weights


def test_a_layer_initialised_to_zero_gets_random_weights():
    """torchvision's ViT starts its classifier head at zero: with random weights elsewhere every
    output was 0 whatever the input, and the check against eager refused vit_b_16 as degenerate."""
    from handoff.zoo._weights import calibrated

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 4)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    model = calibrated(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), head),
                       [((1, 8), "float32")], seed=1)
    with torch.no_grad():
        a, b = model(torch.randn(1, 8)), model(torch.randn(1, 8))
    assert (a - b).abs().max() > 1e-2 * a.abs().max() > 0
    assert head.weight.std().item() == pytest.approx(16 ** -0.5, rel=0.3)


def test_integer_inputs_cover_the_vocabulary():
    (data,) = BUILTIN["langid"].example_inputs(3)
    assert data.dtype == torch.int64 and int(data.min()) >= 0 and int(data.max()) < 256 and int(data.max()) > 8


def test_the_unrolled_gru_is_torch_gru():
    from handoff.zoo.rnn import GRU

    torch.manual_seed(0)
    ours, ref = GRU(6, 5), torch.nn.GRU(6, 5, batch_first=True)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(ours.input_proj.weight)
        ref.bias_ih_l0.copy_(ours.input_proj.bias)
        ref.weight_hh_l0.copy_(ours.hidden_proj.weight)
        ref.bias_hh_l0.copy_(ours.hidden_proj.bias)
        x = torch.randn(2, 7, 6)
        torch.testing.assert_close(ours(x), ref(x)[0])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_model_exports(name):
    from handoff.export import export_model
    from handoff.zoo import ResolvedModel

    zoo = BUILTIN[name]
    model = zoo.build()
    ep = export_model(ResolvedModel(name, module=model, example_inputs=zoo.example_inputs()))
    x = zoo.example_inputs(4)
    with torch.no_grad():
        want, got = model(*x), ep.module()(*x)
    for a, b in zip(*(y if isinstance(y, tuple) else (y,) for y in (want, got))):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_handoff_zoo_lists_inputs_parameters_and_flops(capsys):
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert "zoo:mobilenet_v2" in out and "3.50 M" in out and "601.55 M" in out
    assert "zoo:squeezesam" in out and "1x3x128x128, 1x2x128x128" in out and "1x128:int64" in out
    assert main(["zoo", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["zoo:resnet18"]["params"] == 11689512 and rows["zoo:resnet18"]["flops"] == 3628146688
    assert rows["zoo:langid"]["inputs"] == [{"shape": [1, 128], "dtype": "int64"}]


@pytest.mark.slow  # two torchvision models built, run and exported: about a minute on 2 busy cores
def test_torchvision_models_are_a_model_source(capsys):
    """``torchvision:NAME``: torchvision imports beside the CPU torch, builds without downloads
    (segmentation backbones too), gets calibrated, deterministic, non-degenerate weights, and
    exports."""
    from handoff.export import export_model, resolve_model

    plugins = handoff.get_plugins()
    for name in ("mobilenet_v3_small", "lraspp_mobilenet_v3_large"):
        state = torch.random.get_rng_state()
        resolved = resolve_model(f"torchvision:{name}", [((1, 3, 64, 64), "float32")], plugins)
        again = resolve_model(f"torchvision:{name}", [((1, 3, 64, 64), "float32")], plugins)
        assert torch.equal(torch.random.get_rng_state(), state)  # building leaves the caller's random state alone
        x1, x2 = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            a, b = resolved.module(x1), resolved.module(x2)
            torch.testing.assert_close(again.module(x1), a, rtol=0, atol=0)
        assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-2 * a.abs().max(), name
        ep = export_model(resolved)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x1), a, rtol=1e-4, atol=1e-4)
    with pytest.raises(handoff.HandoffError, match=r"^unknown torchvision model 'resnet7'; classification and "
                                                   r"segmentation models: alexnet, "):
        resolve_model("torchvision:resnet7", [], plugins)
    assert main(["zoo", "--torchvision"]) == 0
    listed = capsys.readouterr().out.split()
    assert "torchvision:resnet50" in listed and "torchvision:deeplabv3_mobilenet_v3_large" in listed


def test_small_cnn_channels_parameter_keeps_the_default():
    """SmallCNN's channels/classes (the fuzz seeds' tiny CNN) leave the zoo model as it was:
    16 and 32 channels, 10 classes, the same weights from the same seed."""
    from handoff.zoo.cnn import SmallCNN

    torch.manual_seed(0)
    default = SmallCNN()
    torch.manual_seed(0)
    explicit = SmallCNN((16, 32), 10)
    shapes = {k: tuple(v.shape) for k, v in default.state_dict().items()}
    assert shapes["stem.0.weight"] == (16, 3, 3, 3) and shapes["down.0.weight"] == (32, 16, 3, 3)
    assert shapes["fc.weight"] == (10, 32)
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))
    tiny = SmallCNN((4, 4), 3).eval()
    assert tuple(tiny(torch.randn(1, 3, 8, 8)).shape) == (1, 3)
    assert sum(p.numel() for p in tiny.parameters()) < 1000
