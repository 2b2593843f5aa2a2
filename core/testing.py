"""Checks for backend tests (ours and plugin authors'): a program against eager PyTorch.

Tolerances are stated per dtype: outputs must lie within ``TOLERANCE[dtype]`` relative of eager
(``rtol``, plus an absolute floor of the same fraction of the output's largest magnitude, for
entries near zero). Imports torch; not for the runtime.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

#: Relative tolerance by the precision a backend computes in.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2}


def assert_matches_eager(got: np.ndarray, want: Any, dtype: str = "float32") -> None:
    """``got`` (numpy) within ``TOLERANCE[dtype]`` relative of ``want`` (a tensor or array)."""
    want = want.detach().cpu().numpy() if hasattr(want, "detach") else np.asarray(want)
    scale = float(np.abs(want).max()) or 1.0
    np.testing.assert_allclose(got, want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale)


def check_against_eager(program: Any, model: Any, input_specs: Sequence[Any], seeds: Sequence[int] = (11, 12),
                        dtype: str = "float32") -> list[np.ndarray]:
    """Run ``program`` (a loaded :class:`handoff.Program`, a path or the bytes of one) and the
    eager ``model`` on fresh random inputs, one set per seed, compare every output, and check that
    the outputs change with the input (a degenerate random-weight model would pass any backend).
    Returns the program's first output per seed."""
    import torch

    from .zoo import random_inputs
    from .runtime import Program, load

    owned = not isinstance(program, Program)
    prog = load(program) if isinstance(program, (bytes, bytearray, str, os.PathLike)) else program
    firsts = []
    try:
        for seed in seeds:
            x = random_inputs(input_specs, seed=seed)
            got = prog.run(x)
            with torch.no_grad():
                want = model(*x)
            for g, w in zip(got, want if isinstance(want, (tuple, list)) else [want]):
                assert_matches_eager(g, w, dtype)
            firsts.append(got[0])
    finally:
        if owned:
            prog.close()
    if len(firsts) > 1:
        assert not np.allclose(firsts[0], firsts[1]), "output does not depend on the input: degenerate model"
    return firsts
