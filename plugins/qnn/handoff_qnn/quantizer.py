"""The QNN/HTP PT2E quantizer (``handoff partition --quantize int8 --backends qnn``).

ExecuTorch's own ``QnnQuantizer`` (``executorch.backends.qualcomm.quantizer``), the rules
Qualcomm maintains for HTP: weights int8 symmetric per output channel for convolution and linear
(int32 bias), activations per tensor, affine uint8 (``activation_bits=8``, HTP's 8a8w) or uint16
(``activation_bits=16``, HTP's 16a8w: 16-bit activations with 8-bit weights, which HTP runs
natively; annotated as ``torch.uint16`` so they export as ONNX opset-21 uint16 QDQ). The quantizer
only annotates; no QNN SDK Python binding is needed (extra ``handoff-qnn[quantize]``), so:

* its SDK setup is told the caller owns the SDK (``QNN_SDK_ROOT`` set empty while it is built,
  when the user has not set it): otherwise ExecuTorch downloads a QNN SDK and libc++ from the
  internet on first use;
* without the SDK's ``backend_opinfo`` it skips its optional per-SoC constraint check (it logs a
  warning, muted here); the HTP compile of each partition checks the result instead;
* some ExecuTorch-QNN modules call ``logging.basicConfig(level=INFO)`` on import, which would
  print every library's INFO log on the user's terminal: the root logger is restored after import;
  its warnings and per-op ``print`` lines are muted while it imports, transforms and annotates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
from typing import Any, Iterator

from ._format import Target

#: ``activation_bits`` -> ExecuTorch's ``QuantDtype`` member.
QUANT_DTYPES = {8: "use_8a8w", 16: "use_16a8w"}
#: The SoC QnnQuantizer assumes when none is named (its own default).
DEFAULT_SOC = "SM8750"


def htp_quantizer(target: Target, activation_bits: int = 8) -> Any:
    """ExecuTorch's ``QnnQuantizer`` for ``target``'s SoC with ``activation_bits``-bit activations
    and 8-bit per-channel weights for conv and linear."""
    if activation_bits not in QUANT_DTYPES:
        raise ValueError(f"activation_bits={activation_bits}: choose 8 or 16")
    with _sdk_left_to_caller(), _quiet():
        try:
            from executorch.backends.qualcomm.quantizer.quantizer import QnnQuantizer, QuantDtype
            from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset
        except ImportError as exc:
            raise ImportError(f"qnn's int8 quantizer is ExecuTorch's QnnQuantizer, which does not import here "
                              f"({exc}): pip install 'handoff-qnn[quantize]' (executorch==1.5.1)") from exc

        class HtpQuantizer(QnnQuantizer):
            """QnnQuantizer whose graph passes keep quiet (a deprecation warning per prepare)."""

            def transform_for_annotation(self, model: Any) -> Any:
                with _quiet():
                    return super().transform_for_annotation(model)

            def annotate(self, model: Any) -> Any:
                with _quiet():
                    model = super().annotate(model)
                if activation_bits == 16:
                    _legalize_16a8w(model)
                return model

        soc = target.soc_name if target.soc_name in QcomChipset.__members__ else DEFAULT_SOC
        quantizer = HtpQuantizer(soc_model=QcomChipset[soc])
        quantizer.set_default_quant_config(getattr(QuantDtype, QUANT_DTYPES[activation_bits]),
                                           is_conv_per_channel=True, is_linear_per_channel=True)
    return quantizer


def _legalize_16a8w(model: Any) -> None:
    """Legalize QnnQuantizer's 16a8w annotations for ONNX QDQ and the HTP of onnxruntime-qnn:

    * 16-bit activations: QnnQuantizer writes ``torch.int32`` with the range [0, 65535]; annotated
      as ``torch.uint16`` (same values) they become uint16 QuantizeLinear / DequantizeLinear in ONNX
      (opset 21), which HTP runs as 16-bit; int32 ones would not export.
    * Its 16a16w "weight" spec (int16 symmetric, [-32767, 32767]), used for the second input of a
      MatMul and for a LayerNorm's scale, is refused by HTP there (measured on the QNN 2.51 HTP
      emulator, "backendValidateOpConfig failed, error 3110"): MatMul takes uint16 x uint16 but not
      uint16 x int16, and LayerNorm with 16-bit activations takes only a uint8 scale (int16, uint16
      and int8 refused). So an activation stays symmetric as uint16 (zero point 32768; ONNX
      QuantizeLinear could not express the [-32767, 32767] clamp anyway), and a weight (a
      parameter: LayerNorm's gamma) gets uint8 affine per tensor."""
    import torch
    from torchao.quantization.pt2e import MinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    def legal(spec: Any, source: Any = None) -> Any:
        if not isinstance(spec, QuantizationSpec):
            return spec
        if spec.dtype == torch.int32 and (spec.quant_min, spec.quant_max) == (0, 65535):
            return dataclasses.replace(spec, dtype=torch.uint16)
        if spec.dtype == torch.int16 and (spec.quant_min, spec.quant_max) == (-32767, 32767):
            if getattr(source, "op", None) == "get_attr":
                return QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
                                        observer_or_fake_quant_ctr=MinMaxObserver)
            return dataclasses.replace(spec, dtype=torch.uint16, quant_min=0, quant_max=65535)
        return spec

    for node in model.graph.nodes:
        note = node.meta.get(Q_ANNOTATION_KEY)
        if note is not None:
            note.input_qspec_map = {k: legal(v, k) for k, v in note.input_qspec_map.items()}
            note.output_qspec = legal(note.output_qspec)


@contextlib.contextmanager
def _sdk_left_to_caller() -> Iterator[None]:
    """``QNN_SDK_ROOT=""`` while the quantizer is built, unless the user set it (see the module
    docstring): ExecuTorch then leaves the SDK alone instead of downloading one."""
    if "QNN_SDK_ROOT" in os.environ:
        yield
        return
    os.environ["QNN_SDK_ROOT"] = ""
    try:
        yield
    finally:
        os.environ.pop("QNN_SDK_ROOT", None)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Drop log records below ERROR (SDK setup notes, the opinfo fallback warning, ExecuTorch's
    deprecation notes, some on loggers with their own level), warnings and stdout (QnnQuantizer
    prints a line per op it has no config for) while inside; undo the ``logging.basicConfig``
    calls made inside (ExecuTorch-QNN imports make one)."""
    import warnings

    root = logging.getLogger()
    handlers, level, disabled = list(root.handlers), root.level, logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
