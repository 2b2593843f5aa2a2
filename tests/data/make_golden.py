"""Write ``tests/data/golden_v1.hof``, the format-1.0 compatibility fixture. Run once; never again.

The golden file is the promise of ``docs/format.md``: every handoff release that reads format
1.x must keep reading this exact file, byte for byte as it was committed. So this script is a
record of how the file was made, not a build step:

* it refuses to overwrite an existing golden file (``--force`` exists for a deliberately new
  fixture under a *new name*, e.g. when format 2.0 gets its own ``golden_v2.hof``);
* ``tests/test_program_format.py`` pins the file's sha256 and checks its contents against
  literals, with the reader of the day, and checks that :func:`build` still writes the same bytes
  while the writer writes format 1.0.

It covers every part of the 1.0 format: all nine dtypes (five of them as constants: float32,
int64, bool, float16 and an empty uint8), a zero-length segment in the middle of the file, a bool
constant, a float16 constant, int64 extremes, one delegate with nested metadata and an option,
``aten`` instructions using every argument encoding (tensor references, lists of references,
nested lists, special floats, dtype/device/layout/memory_format, null/bool/int/float/str) and an
unused (null) output, and non-ASCII UTF-8 in the manifest.

Usage (with ``handoff`` importable, e.g. ``pip install -e .``)::

    python tests/data/make_golden.py            # writes tests/data/golden_v1.hof if absent
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import Callable

import numpy as np

from handoff.program import write_program

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden_v1.hof")
ALIGNMENT = 64

#: The delegate blob: opaque bytes as far as the format is concerned.
DELEGATE_BLOB = b"GOLDEN-DELEGATE-v1\x00" + bytes(range(256))


def segments() -> list[bytes]:
    return [
        (np.arange(6, dtype="<f4") * 0.5 - 1.0).tobytes(),  # 0: w, float32[2,3]
        np.array([0, -1, 2**40, -(2**63), 2**63 - 1], dtype="<i8").tobytes(),  # 1: int64[5]
        np.array([True, False, True], dtype="?").tobytes(),  # 2: bool[3]
        np.array([1.5, -0.25], dtype="<f2").tobytes(),  # 3: float16[2]
        b"",  # 4: uint8[0], an empty constant
        DELEGATE_BLOB,  # 5: the delegate
    ]


def manifest() -> dict:
    v = lambda i: {"value": i}  # noqa: E731
    return {
        "handoff_version": "0.1.0",
        "metadata": {"model": "golden", "note": "ĥandoff ✓ — UTF-8", "created_by": "tests/data/make_golden.py"},
        "values": [
            {"dtype": "float32", "shape": [2, 3]},  # 0  input x
            {"dtype": "float32", "shape": [2, 3]},  # 1  constant w
            {"dtype": "int64", "shape": [5]},  # 2  constant
            {"dtype": "bool", "shape": [3]},  # 3  constant
            {"dtype": "float16", "shape": [2]},  # 4  constant
            {"dtype": "uint8", "shape": [0]},  # 5  constant, empty
            {"dtype": "float32", "shape": [2, 3]},  # 6  delegate output
            {"dtype": "float32", "shape": [2, 3]},  # 7  cumsum
            {"dtype": "float32", "shape": [2, 3]},  # 8  clamp
            {"dtype": "float32", "shape": [2]},  # 9  max values
            {"dtype": "float32", "shape": [2, 3]},  # 10 zeros_like
            {"dtype": "float32", "shape": [4, 3]},  # 11 cat
            {"dtype": "float32", "shape": [3, 4]},  # 12 golden.everything
            {"dtype": "int32", "shape": []},  # 13 a scalar input
            {"dtype": "float64", "shape": [1]},  # 14 unused
            {"dtype": "int8", "shape": [1, 0, 2]},  # 15 unused
            {"dtype": "int16", "shape": [7]},  # 16 unused
        ],
        "inputs": [{"name": "x", "value": 0}, {"name": "n", "value": 13}],
        "outputs": [
            {"name": "max_values", "value": 9},
            {"name": "cat", "value": 11},
            {"name": "everything", "value": 12},
            {"name": "w", "value": 1},
        ],
        "constants": [
            {"value": 1, "segment": 0},
            {"value": 2, "segment": 1},
            {"value": 3, "segment": 2},
            {"value": 4, "segment": 3},
            {"value": 5, "segment": 4},
        ],
        "delegates": [
            {
                "backend": "golden",
                "backend_version": "1.0.0",
                "segment": 5,
                "partition": "partition_0",
                "metadata": {"compiler": "none", "nested": {"list": [1, 2.5, "x", None, True]}},
                "options": {"opt_level": "3"},
            }
        ],
        "instructions": [
            {"op": "delegate", "delegate": 0, "inputs": [0, 1], "outputs": [6]},
            {
                "op": "aten",
                "target": "aten.cumsum.default",
                "args": [v(6), 1],
                "kwargs": {"dtype": {"dtype": "float32"}},
                "outputs": [7],
            },
            {
                "op": "aten",
                "target": "aten.clamp.default",
                "args": [v(7), {"float": "-inf"}, 3.5],
                "kwargs": {},
                "outputs": [8],
            },
            {"op": "aten", "target": "aten.max.dim", "args": [v(8), 1, False], "kwargs": {}, "outputs": [9, None]},
            {
                "op": "aten",
                "target": "aten.zeros_like.default",
                "args": [v(0)],
                "kwargs": {
                    "dtype": {"dtype": "float32"},
                    "layout": {"layout": "strided"},
                    "device": {"device": "cpu"},
                    "pin_memory": False,
                    "memory_format": {"memory_format": "preserve_format"},
                },
                "outputs": [10],
            },
            {"op": "aten", "target": "aten.cat.default", "args": [[v(7), v(10)], 0], "kwargs": {}, "outputs": [11]},
            {
                "op": "aten",
                "target": "golden.everything.default",
                "args": [v(8), None, True, -7, 0.125, "reduce", [[1, [2, {"float": "nan"}]], {"float": "inf"}]],
                "kwargs": {"alpha": -1e-300, "n": v(13)},
                "outputs": [12],
            },
        ],
    }


def build() -> tuple[dict, list[bytes], int]:
    """The golden program's inputs to :func:`handoff.program.write_program`."""
    return manifest(), segments(), ALIGNMENT


def write_golden(argv: list[str] | None, default: str, build: Callable[[], tuple[dict, list[bytes], int]],
                 description: str) -> int:
    """The command line of a golden-file writer (this one and ``make_golden_v1_3.py``): write
    ``build()`` to ``default`` (or the path given) only if it does not exist, and print its size
    and sha256 for the test that pins it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("output", nargs="?", default=default)
    parser.add_argument("--force", action="store_true", help=f"overwrite (never for {os.path.basename(default)})")
    args = parser.parse_args(argv)
    if os.path.exists(args.output) and not args.force:
        print(f"{args.output} exists; the golden file must never be regenerated", file=sys.stderr)
        return 1
    m, segs, alignment = build()
    size = write_program(args.output, m, segs, alignment=alignment)
    with open(args.output, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print(f"wrote {args.output}: {size} bytes, sha256 {digest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return write_golden(argv, GOLDEN, build, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
