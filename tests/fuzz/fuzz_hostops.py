"""Fuzz loading and running a data-only program: the manifest's host ops (``handoff.hostops``):
the allow-list, the argument decoder, the fake-tensor check of every instruction at load, the
size caps, constants, and one run on zero inputs when the program loads.

Inputs are whole program files, made consistent as in ``fuzz_program`` so that mutations reach
the instructions. No plugin is loaded (``HANDOFF_DISABLE_PLUGIN_AUTOLOAD``): a delegate naming a
backend is refused, and delegates are the blob harnesses' business. Seeds: ``corpus/hostops/``.
"""

from __future__ import annotations

import math
import os

import _harness
from fuzz_program import consistent

EXPECTED: tuple[type[BaseException], ...] = ()
#: Inputs of a loaded program are made only up to this size; bigger ones are not run.
MAX_INPUT_BYTES = 1 << 20
_plugins = None


def setup() -> None:
    global EXPECTED, _plugins
    os.environ["HANDOFF_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    from handoff import HandoffError, get_plugins

    EXPECTED = (HandoffError,)
    _plugins = get_plugins()
    import torch  # noqa: F401  imported once here, not inside the first input's time limit


def one_input(data: bytes) -> None:
    import numpy as np

    import handoff

    with handoff.load(consistent(data), plugins=_plugins) as program:
        specs = program.input_specs
        if sum(math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype in specs) > MAX_INPUT_BYTES:
            return
        program.run([np.zeros(shape, dtype) for _, shape, dtype in specs])


if __name__ == "__main__":
    _harness.main("fuzz_hostops")
