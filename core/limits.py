"""Caps on what a program file, an option or a command-line argument can make handoff allocate.

A program file is untrusted input and declares its own sizes (the format allows a value of up to
``2**40`` bytes), so everything that allocates from a declared size is capped here, with a one-line
error naming the cap and how to raise it. ``docs/security.md`` lists every cap (these, the format's
own, and the plugins' option ranges).

Each cap can be changed with an environment variable of the same name (a byte count, or with a
``K``/``M``/``G``/``T`` suffix for powers of 1024: ``HANDOFF_MAX_RUN_BYTES=64G``).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

from .errors import HandoffError

#: Random inputs ``handoff run`` makes when no ``--input`` is given, all inputs together.
MAX_RANDOM_INPUT_BYTES = "HANDOFF_MAX_RANDOM_INPUT_BYTES"
#: One example input ``--input-shape`` makes for ``torch.export`` (it is materialised in memory).
MAX_EXAMPLE_INPUT_BYTES = "HANDOFF_MAX_EXAMPLE_INPUT_BYTES"
#: What one run of a loaded program may hold outside its delegates: the declared bytes of every
#: input, output and value passed between delegates and host ops (constants live in the mapped
#: file and do not count), checked at load.
MAX_RUN_BYTES = "HANDOFF_MAX_RUN_BYTES"

DEFAULTS: dict[str, int] = {
    MAX_RANDOM_INPUT_BYTES: 256 << 20,
    MAX_EXAMPLE_INPUT_BYTES: 1 << 30,
    MAX_RUN_BYTES: 16 << 30,
}

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def cap(name: str) -> int:
    """The cap ``name`` (one of this module's ``MAX_*``): its environment variable, else its default."""
    text = os.environ.get(name, "").strip()
    if not text:
        return DEFAULTS[name]
    match = re.fullmatch(r"(\d{1,16})\s*([KMGT]?)(?:i?B)?", text, re.IGNORECASE)
    if not match:
        raise HandoffError(f"{name}={text!r} is not a byte count; give e.g. 268435456, 256M or 2G")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def human(nbytes: int) -> str:
    """``268435456`` -> ``"256 MiB"``."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            value = nbytes / size
            return f"{value:.0f} {unit}" if value.is_integer() or value >= 100 else f"{value:.1f} {unit}"
    return f"{nbytes} bytes"


def _nbytes(shape: Any, itemsize: int) -> int:
    return math.prod(shape) * itemsize


#: the note (:mod:`handoff.verified`) holding a recorded file's :func:`run_bytes`
RUN_BYTES_NOTE = "run-bytes"


def run_bytes(manifest: Mapping[str, Any]) -> int:
    """Bytes a run holds outside its delegates: inputs, outputs and values between delegates and
    host ops (constants live in the file). ``manifest`` is a validated manifest."""
    from .program import value_nbytes  # program imports this module

    return sum(value_nbytes(manifest["values"][v]) for v in _run_values(manifest))


def _run_values(manifest: Mapping[str, Any]) -> set[int]:
    constants = {c["value"] for c in manifest["constants"]}
    used = {i["value"] for i in manifest["inputs"]} | {o["value"] for o in manifest["outputs"]}
    for ins in manifest["instructions"]:
        used.update(v for v in ins["outputs"] if v is not None)
    return used - constants


def check_run_bytes(manifest: Mapping[str, Any], name: str, total: int | None = None) -> int:
    """Refuse a program whose run would hold more than :data:`MAX_RUN_BYTES` outside its delegates
    (see there). ``manifest`` is a validated manifest; ``total``, when given, is its
    :func:`run_bytes` as noted in the record of the unchanged file (:mod:`handoff.verified`), so
    the check is one compare. Returns the total."""
    if total is None:
        total = run_bytes(manifest)
    limit = cap(MAX_RUN_BYTES)
    if total > limit:
        from .program import value_nbytes

        values = manifest["values"]
        biggest = max(_run_values(manifest), key=lambda v: value_nbytes(values[v]))
        raise HandoffError(f"{name}: a run would hold {human(total)} of inputs, outputs and values between "
                           f"delegates (the largest, value {biggest}, is {values[biggest]['dtype']}"
                           f"{values[biggest]['shape']}), more than the {human(limit)} cap; if the program is "
                           f"meant to be this large, raise {MAX_RUN_BYTES}")
    return total


def check_example_input(text: str, shape: tuple[int, ...], itemsize: int) -> None:
    """Refuse an ``--input-shape`` whose example tensor would exceed :data:`MAX_EXAMPLE_INPUT_BYTES`."""
    from .program import MAX_DIM

    if any(d >= MAX_DIM for d in shape):
        raise ValueError(f"--input-shape {text!r}: dimensions must be below {MAX_DIM} (the program format's limit)")
    nbytes, limit = _nbytes(shape, itemsize), cap(MAX_EXAMPLE_INPUT_BYTES)
    if nbytes > limit:
        raise ValueError(f"--input-shape {text!r}: the example input would take {human(nbytes)}, more than the "
                         f"{human(limit)} cap (it is made in memory for torch.export); use a smaller shape, or "
                         f"raise {MAX_EXAMPLE_INPUT_BYTES}")


def check_random_inputs(specs: Any, program: str) -> None:
    """Refuse to make random inputs of more than :data:`MAX_RANDOM_INPUT_BYTES` for ``handoff run``."""
    import numpy as np

    total = sum(_nbytes(shape, np.dtype(dtype).itemsize) for _, shape, dtype in specs)
    limit = cap(MAX_RANDOM_INPUT_BYTES)
    if total > limit:
        shapes = ", ".join(f"{n}={d}{list(s)}" for n, s, d in specs)
        raise HandoffError(f"{program}: random inputs would take {human(total)} ({shapes[:200]}), more than the "
                           f"{human(limit)} cap; pass the inputs with --input FILE.npy (one per input), or raise "
                           f"{MAX_RANDOM_INPUT_BYTES}")
