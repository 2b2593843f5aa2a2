"""The ``tvm`` backend's int8 quantizer: a symmetric per-channel default for PT2E.

TVM imports any quantize/dequantize op (:mod:`handoff.tvm.importer`), so its quantizer need not
match a vendor's fused kernels; it is the plain scheme most integer runtimes accept: weights int8,
symmetric, per output channel; activations int8, affine, per tensor (histogram-calibrated, as
ExecuTorch's XNNPACK quantizer calibrates them). It annotates convolutions and linear layers (with
a following ReLU in the same quantized span) and additions, and leaves every node another
backend's quantizer annotated first untouched, so it composes after any of them.
"""

from __future__ import annotations

from typing import Any

import torch
from torchao.quantization.pt2e.observer import HistogramObserver, PerChannelMinMaxObserver
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer
from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

_ACT = QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine,
                        is_dynamic=False, observer_or_fake_quant_ctr=HistogramObserver.with_args(eps=2**-12))
_WEIGHT = QuantizationSpec(dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric,
                           ch_axis=0, is_dynamic=False,
                           observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(eps=2**-12))
_aten = torch.ops.aten
_WEIGHTED = {_aten.conv1d.default, _aten.conv2d.default, _aten.linear.default}
_ADD = {_aten.add.Tensor, _aten.add_.Tensor}
_RELU = {_aten.relu.default, _aten.relu_.default}


def _free(*nodes: Any) -> bool:
    return all(Q_ANNOTATION_KEY not in n.meta for n in nodes)


def _annotate(node: Any, inputs: dict[Any, QuantizationSpec], output: Any = _ACT) -> None:
    node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=inputs, output_qspec=output,
                                                         _annotated=True)


class SymmetricQuantizer(Quantizer):
    """See the module docstring."""

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        for node in model.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in _WEIGHTED and _free(node) and isinstance(node.args[1], torch.fx.Node):
                users = list(node.users)
                relu = users[0] if len(users) == 1 and users[0].target in _RELU and _free(users[0]) else None
                _annotate(node, {node.args[0]: _ACT, node.args[1]: _WEIGHT}, None if relu else _ACT)
                if relu is not None:
                    _annotate(relu, {}, _ACT)
            elif node.target in _ADD and _free(node):
                tensors = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
                if len(tensors) == 2 and all(isinstance(a.meta.get("val"), torch.Tensor)
                                             and a.meta["val"].is_floating_point() for a in tensors):
                    _annotate(node, {a: _ACT for a in tensors})
        return model

    def validate(self, model: torch.fx.GraphModule) -> None:
        pass
