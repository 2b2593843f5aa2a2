"""Model sources: what ``handoff partition MODEL`` can name, and the built-in ``zoo:`` models.

This module imports no torch; the zoo's modules live in :mod:`handoff.zoo_models` and are
imported only when a model is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

#: ``((1, 3, 224, 224), "float32")``: one example input's shape and dtype.
InputSpec = tuple[tuple[int, ...], str]


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """A built-in model.

    :param factory: ``"module:function"`` (or a callable) returning an ``nn.Module`` in eval mode
        with non-degenerate random weights (norm layers get random statistics).
    :param inputs: shape and dtype of each example input.
    :param description: one line for ``handoff zoo``.
    """

    factory: str | Callable[[], Any]
    inputs: Sequence[InputSpec]
    description: str = ""

    def build(self) -> Any:
        if callable(self.factory):
            return self.factory()
        from .backend import import_ref

        return import_ref(self.factory)()


@dataclasses.dataclass
class ResolvedModel:
    """What a model source produced: either an ``nn.Module`` with example inputs, or an already
    exported program (a ``.pt2`` file)."""

    name: str
    module: Any = None
    example_inputs: tuple[Any, ...] = ()
    exported: Any = None


def parse_input_shape(text: str) -> InputSpec:
    """``"1x3x224x224"`` or ``"1x128:int64"`` -> ``((1, 3, 224, 224), "float32")``; ``ValueError``
    with a one-line message for anything else, including a shape whose example tensor would exceed
    :data:`handoff.limits.MAX_EXAMPLE_INPUT_BYTES`."""
    shape_text, _, dtype = text.partition(":")
    dtype = dtype or "float32"
    try:
        shape = tuple(int(d) for d in shape_text.lower().split("x")) if shape_text else ()
    except ValueError:
        raise ValueError(f"--input-shape {text!r}: expected dimensions like 1x3x224x224[:dtype]") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"--input-shape {text!r}: dimensions must be >= 0")
    if dtype not in INPUT_DTYPES:
        raise ValueError(f"--input-shape {text!r}: dtype {dtype!r} not one of {', '.join(INPUT_DTYPES)}")
    import numpy as np

    from .limits import check_example_input

    check_example_input(text, shape, np.dtype(dtype).itemsize)
    return shape, dtype


INPUT_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
