"""Checks for backend tests (ours and plugin authors'): a program against eager PyTorch.

Tolerances are stated per dtype, in one table that the conformance suite uses too: outputs must
lie within ``TOLERANCE[dtype]`` relative of eager (``rtol``, plus an absolute floor of the same
fraction of the output's largest magnitude, for entries near zero). An int8 program is compared
with the quantized eager model (the converted PT2E module) in quantization steps of each output
(``TOLERANCE["int8"]`` steps: integer kernels round intermediate values their own way, and a
rounding difference moves a value by one step), and with the float model by signal-to-noise ratio
and top-1 agreement, which are reported rather than bounded by a universal constant. Imports
torch; not for the runtime.

For a plugin's own test suite: :func:`plugin_tests` (called from its ``tests/conftest.py``) keeps
installed plugins out, and the pytest fixtures :func:`isolated_plugins` (autouse),
:func:`handoff_home` and :func:`use_plugins`, imported into that conftest, give each test only the
plugins it registers (:func:`register_plugins`) and one ``HANDOFF_HOME`` for the session::

    from handoff.testing import handoff_home, isolated_plugins, plugin_tests, use_plugins  # noqa: F401
    plugin_tests(__file__)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest

from .zoo import random_inputs  # noqa: F401  (public here: the inputs of check_against_eager)

#: Relative tolerance by the precision a backend computes in; for ``int8``, the largest difference
#: from the quantized eager model in quantization steps of the output. ``qdq`` is for single
#: quantized patterns (q/dq around a float op) against eager: two steps of a symmetric int8 scale
#: that covers the output's range. Integers and booleans must be exact. ``bfloat16`` keeps 8
#: significant bits (fp16 11), so an fp32-accumulated product rounded once is within ~2**-8.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2, "int8": 3, "qdq": 2 / 127, "int32": 0.0, "int64": 0.0, "bool": 0.0}


def plugin_tests(conftest: str, *paths: str) -> None:
    """Prepare a plugin's test session; call it from the plugin's ``tests/conftest.py`` with
    ``__file__``. Installed plugins are never autoloaded (``HANDOFF_DISABLE_PLUGIN_AUTOLOAD=1``,
    ``HANDOFF_PLUGINS`` cleared): a test sees only what it registers. The plugin's source tree (the
    conftest's parent folder, for a checkout that is not pip-installed) and ``paths`` (relative to
    the conftest's folder, e.g. ``"."`` for test plugins kept next to it) go first on ``sys.path``."""
    here = Path(conftest).resolve().parent
    for path in (here.parent, *(here / p for p in paths)):
        if str(path.resolve()) not in sys.path:
            sys.path.insert(0, str(path.resolve()))
    os.environ["HANDOFF_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    os.environ.pop("HANDOFF_PLUGINS", None)


def register_plugins(*modules: str) -> Any:
    """Install, for this process, a plugin manager (:class:`handoff.Plugins`) with the core's
    built-in backends and the plugin modules ``modules`` (import paths such as
    ``"handoff_acme.plugin"``), never the installed ones. A module that fails to load fails the
    call with the reason. Returns the manager."""
    from . import plugins

    pm = plugins.Plugins(autoload=False, extra=list(modules))
    assert not pm.broken, pm.broken
    plugins.set_plugins(pm)
    return pm


@pytest.fixture(scope="session")
def handoff_home(tmp_path_factory: Any) -> Path:
    """The ``HANDOFF_HOME`` of the test session (a temporary folder): one test's compiles are
    cached for the next."""
    return tmp_path_factory.mktemp("handoff_home")


@pytest.fixture(autouse=True)
def isolated_plugins(handoff_home: Path, monkeypatch: Any) -> Any:
    """Autouse where imported: each test starts and ends with no plugin manager installed (the
    next :func:`handoff.get_plugins` builds a fresh one) and ``HANDOFF_HOME`` set to
    :func:`handoff_home`."""
    from . import plugins

    monkeypatch.setenv("HANDOFF_HOME", str(handoff_home))
    plugins.set_plugins(None)
    yield
    plugins.set_plugins(None)


@pytest.fixture(scope="session")
def use_plugins() -> Any:
    """:func:`register_plugins`, for tests and fixtures that choose their plugins as they go:
    ``use_plugins("handoff_acme.plugin", "handoff_xnnpack.plugin")``."""
    return register_plugins


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _outputs(program: Any, inputs: Sequence[Any]) -> list[np.ndarray]:
    """``program``'s outputs on ``inputs``: ``program.run``, or a torch module run eagerly."""
    import torch

    if isinstance(program, torch.nn.Module):
        with torch.no_grad():
            out = program(*inputs)
        return [_numpy(t) for t in (out if isinstance(out, (tuple, list)) else [out])]
    return program.run(inputs)


def assert_matches_eager(got: np.ndarray, want: Any, dtype: str = "float32") -> None:
    """``got`` (numpy) within ``TOLERANCE[dtype]`` relative of ``want`` (a tensor or array)."""
    if dtype == "int8":
        raise ValueError("int8 outputs are compared in quantization steps: use assert_matches_quantized")
    want = _numpy(want)
    scale = float(np.abs(want).max()) or 1.0
    np.testing.assert_allclose(got, want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale)


def check_against_eager(program: Any, model: Any, input_specs: Sequence[Any], seeds: Sequence[int] = (11, 12),
                        dtype: str = "float32") -> list[np.ndarray]:
    """Run ``program`` (a loaded :class:`handoff.Program`, a path or the bytes of one) and the
    eager ``model`` on fresh random inputs, one set per seed, compare every output, and check that
    the outputs change with the input (a degenerate random-weight model would pass any backend).
    Returns the program's first output per seed."""
    import torch

    from .runtime import Program, load

    owned = not isinstance(program, Program)
    prog = load(program) if isinstance(program, (bytes, bytearray, str, os.PathLike)) else program
    firsts = []
    try:
        for seed in seeds:
            x = random_inputs(input_specs, seed=seed)
            got = _outputs(prog, x)
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


def output_steps(reference: Any) -> list[float]:
    """The quantization step of each output of a converted PT2E module (``reference``): the scale
    of the dequantize op nearest before the output, following ops that keep the scale (views,
    flatten, ReLU, pooling)."""
    graph = reference.graph
    out = next(n for n in graph.nodes if n.op == "output")
    values = out.args[0] if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    steps = []
    for value in values:
        node, step = value, None
        while step is None and node is not None and getattr(node, "op", None) == "call_function":
            name = getattr(node.target, "__name__", "")
            if getattr(node.target, "namespace", None) == "quantized_decomposed" and name.startswith("dequantize"):
                scale = node.args[1]
                step = float(scale) if not hasattr(scale, "op") else None
                break
            node = node.args[0] if node.args and hasattr(node.args[0], "op") else None
        if step is None:
            raise ValueError(f"output {len(steps)} of the quantized model is not dequantized from an int8 value; "
                             "compare it with assert_matches_eager instead")
        steps.append(step)
    return steps


def assert_matches_quantized(got: np.ndarray, want: Any, step: float, steps: float = TOLERANCE["int8"]) -> float:
    """``got`` within ``steps`` quantization steps (``step`` each) of ``want``, the quantized eager
    model's output; returns the largest difference in steps, to 1e-3 (dividing by the step's float32
    scale leaves a whole number of steps a few ulps off, 3.0000018 for 3)."""
    want = _numpy(want)
    diff = float(np.abs(got.astype(np.float64) - want).max() / step) if want.size else 0.0
    if diff > steps + 1e-3:
        worst = int(np.abs(got - want).argmax())
        raise AssertionError(f"output differs from the quantized eager model by {diff:.2f} quantization steps "
                             f"(step {step:.3g}) at flat index {worst}: {got.flat[worst]} vs {want.flat[worst]}; "
                             f"allowed: {steps}")
    return round(diff, 3)


def snr_db(got: Any, want: Any) -> float:
    """Signal-to-noise ratio of ``got`` against ``want`` in dB (inf when they are equal)."""
    got, want = _numpy(got).astype(np.float64), _numpy(want).astype(np.float64)
    noise = float(np.sum((got - want) ** 2))
    return float("inf") if noise == 0 else 10 * float(np.log10(float(np.sum(want ** 2)) / noise))


def check_int8(program: Any, quantized: Any, float_model: Any, input_specs: Sequence[Any],
               seeds: Sequence[int] = tuple(range(21, 29)), steps: float = TOLERANCE["int8"]) -> dict[str, float]:
    """Run an int8 ``program`` (a path, the bytes of one, anything with ``run(inputs)``, such
    as a loaded :class:`handoff.Program`, or a torch module run eagerly: the quantized eager model
    itself, to measure its own SNR and top-1 against fp32) on fresh random inputs (one set per seed) against both references:
    the quantized eager model (``quantized.reference`` of :func:`handoff.quantize`, or the converted
    module itself), within ``steps`` quantization steps of each output; and the float model,
    measured. Also checks that outputs change with the input. Returns ``max_steps`` (largest
    difference from the quantized model, in steps), ``snr_db`` (program vs float, over every
    output of every seed) and ``top1_agreement`` (fraction of rows of the first output whose
    argmax equals the float model's)."""
    import torch

    from .runtime import load

    reference = getattr(quantized, "reference", quantized)
    out_steps = output_steps(reference)
    owned = isinstance(program, (bytes, bytearray, str, os.PathLike))
    prog = load(program) if owned else program
    worst, agree, rows, firsts = 0.0, 0, 0, []
    gots, floats = [], []
    try:
        for seed in seeds:
            x = random_inputs(input_specs, seed=seed)
            got = _outputs(prog, x)
            with torch.no_grad():
                want = reference(*x)
                fp = float_model(*x)
            want = want if isinstance(want, (tuple, list)) else [want]
            fp = fp if isinstance(fp, (tuple, list)) else [fp]
            for g, w, step in zip(got, want, out_steps):
                worst = max(worst, assert_matches_quantized(g, w, step, steps))
            gots.extend(np.ravel(g) for g in got)
            floats.extend(np.ravel(_numpy(f)) for f in fp)
            first, fp0 = got[0].reshape(got[0].shape[0], -1), _numpy(fp[0]).reshape(got[0].shape[0], -1)
            agree += int(np.sum(first.argmax(-1) == fp0.argmax(-1)))
            rows += first.shape[0]
            firsts.append(got[0])
    finally:
        if owned:
            prog.close()
    if len(firsts) > 1:
        assert not np.allclose(firsts[0], firsts[1]), "output does not depend on the input: degenerate model"
    return {"max_steps": worst, "snr_db": snr_db(np.concatenate(gots), np.concatenate(floats)),
            "top1_agreement": agree / rows if rows else float("nan")}


#: The op-table check of a plugin's ``tools/check_op_table.py`` (:mod:`handoff.op_table`), loaded on use.
_OP_TABLE = ("NotEvaluable", "Sample", "Samples", "check_op_table", "check_sample", "int8_samples", "mismatch")


def __getattr__(name: str) -> Any:
    if name in _OP_TABLE:
        from . import op_table

        return getattr(op_table, name)
    raise AttributeError(f"module 'handoff.testing' has no attribute {name!r}")
