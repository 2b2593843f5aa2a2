"""A Core ML package on disk, through coremltools (without torch, without loading it into Core ML).

Shared by the compiler (validating what it wrote), the runtime (checking a package before Core ML
loads it) and the reference evaluator. coremltools is imported when a function runs.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping, Sequence

from ._quiet import quiet

#: Core ML ``ArrayFeatureType`` data types (FeatureTypes.proto) by numpy name.
_ARRAY_TYPES = {"float32": 65568, "float16": 65552, "int32": 131104}


def read_spec(package: str) -> Any:
    """The model specification (protobuf) of the package directory ``package``; ``ValueError``
    when coremltools cannot read it."""
    with quiet():
        import coremltools as ct

        try:
            return ct.models.MLModel(package, skip_model_load=True).get_spec()
        except Exception as exc:
            raise ValueError(f"coreml delegate blob holds no readable Core ML package: "
                             f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None


def check_spec(spec: Any, header: Mapping[str, Any]) -> None:
    """The package must be an ML Program of the header's specification version whose input and
    output features are exactly the header's (names, order, Core ML dtypes, shapes); ``ValueError``
    naming the first difference."""
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise ValueError(f"coreml delegate blob holds a Core ML {kind!r} model; handoff-coreml writes ML Programs only")
    if spec.specificationVersion != header["spec_version"]:
        raise ValueError(f"coreml delegate blob is inconsistent: its model has specification version "
                         f"{spec.specificationVersion}, its header says {header['spec_version']}")
    for kind, features, declared in (("input", spec.description.input, header["inputs"]),
                                     ("output", spec.description.output, header["outputs"])):
        got = [_feature(f) for f in features]
        want = [(f["name"], f["coreml_dtype"], list(f["shape"])) for f in declared]
        if got != want:
            raise ValueError(f"coreml delegate blob is inconsistent: its model's {kind}s are {_text(got)}, "
                             f"its header declares {_text(want)}")


def _feature(f: Any) -> tuple[str, str, list[int]]:
    if f.type.WhichOneof("Type") != "multiArrayType":
        return f.name, f.type.WhichOneof("Type") or "?", []
    array = f.type.multiArrayType
    dtype = next((name for name, code in _ARRAY_TYPES.items() if code == array.dataType), str(array.dataType))
    return f.name, dtype, [int(d) for d in array.shape]


def _text(features: Sequence[tuple[str, str, list[int]]]) -> str:
    return ", ".join(f"{name} {dtype}{shape}" for name, dtype, shape in features) or "none"


def mil_ops(spec: Any) -> dict[str, int]:
    """How many operations of each type the ML Program's ``main`` function has (constants aside),
    read from the specification itself."""
    counts: collections.Counter[str] = collections.Counter()
    main = spec.mlProgram.functions["main"]
    for block in main.block_specializations.values():
        for op in block.operations:
            if op.type != "const":
                counts[op.type] += 1
    return dict(sorted(counts.items()))
