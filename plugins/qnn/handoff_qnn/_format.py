"""The delegate blob of handoff-qnn, and the options both halves share.

Imports neither torch nor onnxruntime: the plugin module, the compiler and the runtime use it.

A blob holds the two files ONNX Runtime's QNN execution provider writes with
``ep.context_enable=1, ep.context_embed_mode=0``: the EPContext model (a one-node ONNX graph whose
``EPContext`` node names the context binary by file name) and the QNN context binary itself, in
the core's shared envelope (:mod:`handoff.blob`)::

    offset 0    8 bytes  magic b"HOFQNNCX"
    offset 8    u32 LE   blob format version (FORMAT_VERSION = 1)
    offset 12   u32 LE   length N of the JSON header
    offset 16   N bytes  JSON header (utf-8), then zero padding to a multiple of 64
    data        sections, each at a 64-byte aligned offset listed in the header

Header fields (all written by the compiler; the runtime checks the QNN SDK version)::

    qnn_sdk_version     "2.51.0"    QNN SDK of the compiler (onnxruntime_qnn.build_and_package_info)
    qnn_sdk_build       "v2.51.0.260929181845"  the EPContext node's ep_sdk_version
    onnxruntime_qnn     "2.7.0",   onnxruntime "1.32.0",   handoff_qnn "0.1.0"
    htp_arch, soc_model, soc_name, precision       what it was compiled for
    inputs, outputs     [{"name", "dtype", "shape"}] of the EPContext model, in delegate order
    epcontext_model     name of the section holding the EPContext model ("qnn_ctx.onnx")
    context_binaries    names of the sections holding context binaries ("qnn_ctx_qnn.bin"): the
                        file names the EPContext node's ep_cache_context attribute refers to
    sections, align     the envelope's table (name, offset, size) and alignment (64)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from handoff import Option
from handoff import blob as envelope

MAGIC = b"HOFQNNCX"
FORMAT_VERSION = 1
_ALIGN = 64
_WHAT = "qnn delegate blob"
#: The next step after a corrupt blob.
_REMAKE = "the blob is damaged or was not written by handoff-qnn; partition the model again"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")

# -- targets -------------------------------------------------------------------------------------
#: HTP architectures QNN SDK 2.51 compiles for (``htp_arch``).
HTP_ARCHS = (68, 69, 73, 75, 79, 81)
#: HTP architectures with fp16 arithmetic (v68 has none: QNN silently keeps fp32 there).
FP16_ARCHS = frozenset(a for a in HTP_ARCHS if a >= 69)

#: Snapdragon SoCs: name -> (QNN soc_model id, HTP architecture). The ids and architectures are
#: QNN's (the same table as ExecuTorch's ``QcomChipset``); the QNN EP accepts the id or the name.
SOCS: dict[str, tuple[int, int]] = {
    "SM8350": (30, 68),    # Snapdragon 888
    "SM8450": (36, 69),    # Snapdragon 8 Gen 1
    "SM8475": (42, 69),    # Snapdragon 8+ Gen 1
    "SM8550": (43, 73),    # Snapdragon 8 Gen 2
    "SM8650": (57, 75),    # Snapdragon 8 Gen 3
    "SM8750": (69, 79),    # Snapdragon 8 Elite
    "SM8850": (87, 81),    # Snapdragon 8 Elite Gen 5
    "SC8380XP": (60, 73),  # Snapdragon X Elite
    "SA8295": (39, 68),
    "SA8255": (52, 73),
    "QCS9100": (77, 73),
    "QCM6490": (93, 68),
    "SXR2230P": (53, 69),
    "SXR2330P": (75, 79),
}
PRECISIONS = ("fp32", "fp16")
#: ``htp_performance_mode`` values of the QNN EP.
PERFORMANCE_MODES = ("default", "burst", "balanced", "high_performance", "high_power_saver", "low_balanced",
                     "low_power_saver", "power_saver", "extreme_power_saver", "sustained_high_performance")

#: Compile options (``handoff partition --option qnn.NAME=VALUE``); cross-checked by :func:`compile_target`.
OPTIONS: dict[str, Option] = {
    "soc_model": Option("str", "Snapdragon SoC to compile for, by name or QNN id: "
                               + ", ".join(f"{n} ({i}, v{a})" for n, (i, a) in SOCS.items())
                               + " (default: none); used with precision=fp16 only"),
    "htp_arch": Option("choice", "HTP architecture to compile for (default: the soc_model's, else QNN's default); "
                                 "must agree with soc_model when both are given",
                       choices=tuple(map(str, HTP_ARCHS))),
    "precision": Option("choice", "run float32 graphs with fp32 or fp16 arithmetic on HTP; fp16 needs a soc_model "
                                  "whose HTP is v69 or newer, and fp32 excludes soc_model (naming a SoC makes QNN "
                                  "compute in fp16)", default="fp32", choices=PRECISIONS),
    "activation_bits": Option("choice", "activations of --quantize int8 (ExecuTorch's QnnQuantizer): 8 = HTP's 8a8w "
                                        "(uint8 activations), 16 = HTP's 16a8w (uint16 activations, more accurate, "
                                        "about 2x the activation memory); weights are int8 per channel either way",
                              default="8", choices=("8", "16")),
    "verify": Option("bool", "compile each planned partition before lowering and decline the nodes QNN fails on "
                             "in context (HTP's fp32 path rejects some op combinations); off claims by the op "
                             "table alone (faster; pair with --on-lower-error fallback)", default=True),
}
#: Runtime options (``handoff run --option qnn.NAME=VALUE``, ``handoff.load(..., options=)``).
RUNTIME_OPTIONS: dict[str, Option] = {
    "htp_performance_mode": Option("choice", "HTP power/performance vote of the QNN EP (default: default)",
                                   choices=PERFORMANCE_MODES),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """Parsed compile options."""

    htp_arch: int | None
    soc_model: int | None
    soc_name: str | None
    precision: str

    def provider_options(self) -> dict[str, str]:
        """The QNN EP provider options that select this target."""
        opts: dict[str, str] = {}
        if self.htp_arch is not None:
            opts["htp_arch"] = str(self.htp_arch)
        if self.soc_model is not None:
            opts["soc_model"] = str(self.soc_model)
        if self.precision == "fp16":
            opts["enable_htp_fp16_precision"] = "1"
        return opts


def parse_soc(value: Any) -> tuple[str, int, int]:
    """``(name, soc_model id, htp_arch)`` of a SoC given by name (``SM8650``) or id (``57``)."""
    text = str(value).strip().upper()
    by_id = {str(i): n for n, (i, _) in SOCS.items()}
    name = by_id.get(text, text)
    if name not in SOCS:
        valid = ", ".join(f"{n} ({i})" for n, (i, _) in SOCS.items())
        raise ValueError(f"option soc_model={value!r} is not a SoC handoff-qnn knows; valid values: {valid}")
    return name, *SOCS[name]


def compile_target(options: Mapping[str, Any]) -> Target:
    """The target the (typed, already parsed) compile options select; ``ValueError`` when they
    contradict each other."""
    precision = options.get("precision") or "fp32"
    soc_name = soc_model = soc_arch = None
    if options.get("soc_model") not in (None, ""):
        soc_name, soc_model, soc_arch = parse_soc(options["soc_model"])
    htp_arch = None
    if options.get("htp_arch") not in (None, ""):
        htp_arch = int(options["htp_arch"])
        if soc_arch is not None and htp_arch != soc_arch:
            raise ValueError(f"option htp_arch={htp_arch} contradicts soc_model={soc_name}, whose HTP is v{soc_arch}; "
                             f"drop htp_arch or pass htp_arch={soc_arch}")
    elif soc_arch is not None:
        htp_arch = soc_arch
    if precision == "fp32" and soc_model is not None:
        raise ValueError(f"option soc_model={soc_name} makes QNN run float32 graphs with fp16 arithmetic (about 3e-4 "
                         f"error even on a copy), so it needs precision=fp16; for fp32 drop soc_model and name the "
                         f"architecture with htp_arch={soc_arch}")
    if precision == "fp16":
        fp16_socs = ", ".join(n for n, (_, a) in SOCS.items() if a in FP16_ARCHS)
        if soc_model is None:
            raise ValueError(f"option precision=fp16 needs soc_model (QNN enables HTP fp16 only for a named SoC); "
                             f"valid values: {fp16_socs}")
        if htp_arch not in FP16_ARCHS:
            raise ValueError(f"option precision=fp16: soc_model={soc_name} has HTP v{htp_arch}, which has no fp16 "
                             f"arithmetic; use precision=fp32 or one of: {fp16_socs}")
    return Target(htp_arch, soc_model, soc_name, precision)


def runtime_options(options: Mapping[str, Any]) -> dict[str, str]:
    """The QNN EP provider options the (typed, already parsed) runtime options add."""
    mode = options.get("htp_performance_mode")
    return {"htp_performance_mode": mode} if mode else {}


# -- the container -------------------------------------------------------------------------------
@dataclasses.dataclass
class Container:
    header: dict[str, Any]
    epcontext_model: tuple[str, memoryview]
    context_binaries: list[tuple[str, memoryview]]


def pack(header: Mapping[str, Any], epcontext_model: tuple[str, bytes], context_binaries: list[tuple[str, bytes]]) -> bytes:
    """The blob: ``header`` plus the EPContext model and the context binaries it names, each
    ``(file name, bytes)``."""
    names = [epcontext_model[0], *(n for n, _ in context_binaries)]
    for name in names:
        if not _SAFE_NAME.match(name):
            raise ValueError(f"section name {name!r} is not a plain file name")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate section names {names}")
    fields = {**header, "epcontext_model": epcontext_model[0], "context_binaries": names[1:]}
    return envelope.pack(MAGIC, FORMAT_VERSION, fields, dict([epcontext_model, *context_binaries]), align=_ALIGN)


def unpack(blob: bytes | memoryview) -> Container:
    """Parse and bounds-check a blob; ``ValueError`` with what is wrong."""
    _, header, sections = envelope.unpack(blob, MAGIC, FORMAT_VERSION, _WHAT)
    try:
        ctx = str(header["epcontext_model"])
        binaries = [str(n) for n in header["context_binaries"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{_WHAT} header (JSON at byte 16) is corrupt: no {exc}; {_REMAKE}") from None
    for name in [ctx, *binaries]:
        if not _SAFE_NAME.match(name) or name not in sections:
            raise ValueError(f"{_WHAT} is corrupt: section {name!r} is missing or not a plain file name")
    if not binaries:
        raise ValueError(f"{_WHAT} holds no QNN context binary")
    for key in ("inputs", "outputs"):
        _check_tensors(header.get(key, []), key)
    return Container(header, (ctx, sections[ctx]), [(n, sections[n]) for n in binaries])


#: What a header's tensor may be: the dtypes the compiler writes, a static shape of bounded rank.
_TENSOR_DTYPES = frozenset({"float32", "float16", "float64", "int64", "int32", "int16", "uint16", "int8", "uint8", "bool"})
_MAX_TENSORS, _MAX_RANK = 4096, 32


def _check_tensors(specs: Any, key: str) -> None:
    where = f"{_WHAT} header (JSON at byte 16) is corrupt: {key}"
    if type(specs) is not list or len(specs) > _MAX_TENSORS:
        raise ValueError(f"{where} is not a list of at most {_MAX_TENSORS} tensors; {_REMAKE}")
    for i, spec in enumerate(specs):
        shape = spec.get("shape") if type(spec) is dict else None
        if not (type(spec) is dict and spec.get("dtype") in _TENSOR_DTYPES and type(shape) is list
                and len(shape) <= _MAX_RANK and all(type(d) is int and 0 <= d < 2**31 for d in shape)):
            raise ValueError(f"{where}[{i}] is not a tensor's dtype and static shape ({str(spec)[:80]}); {_REMAKE}")


def major_minor(version: str) -> tuple[str, ...]:
    return tuple(str(version).lstrip("v").split(".")[:2])
