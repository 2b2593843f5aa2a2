"""What every fuzz harness in ``tests/fuzz/`` shares: one contract and one driver.

A harness is a module ``fuzz_<name>.py`` with

* ``EXPECTED``: the exception types that mean "this input was rejected cleanly" (a one-line
  :class:`handoff.HandoffError`, or the ``ValueError``/``RuntimeError`` a plugin's ``load`` is
  documented to raise and the core turns into one);
* ``setup()``: imports and state, done once before the first input;
* ``one_input(data)``: feed one input to the code under test.

Anything else an input does is a finding: another exception (a ``KeyError`` or ``TypeError``
from a parser is a message nobody can act on), an abort or segfault, a hang (libFuzzer's
``-timeout``), or an allocation past ``-rss_limit_mb``. :func:`check` applies the contract;
``tests/test_fuzz.py`` runs every harness through it on the checked-in seeds, the regression
inputs of every fixed finding (``tests/fuzz/regressions/<name>/``) and a fixed number of
deterministic mutations; ``make fuzz`` runs the real thing (:func:`main`, atheris + libFuzzer).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
#: Packages whose Python code is instrumented for coverage (never torch, TVM or numpy: slow and
#: not what is under test).
INSTRUMENTED = ["handoff", "handoff_xnnpack", "handoff_vulkan", "handoff_qnn", "handoff_coreml"]


class Finding(AssertionError):
    """An input did something other than run or be rejected cleanly."""


def check(one_input: Callable[[bytes], object], expected: tuple[type[BaseException], ...], data: bytes) -> None:
    """Run ``one_input(data)``; raise :class:`Finding` for an exception outside ``expected``."""
    try:
        one_input(data)
    except expected:
        pass
    except Finding:
        raise
    except Exception as exc:  # the point of a harness: anything else is a bug to fix
        raise Finding(f"{type(exc).__name__}: {exc}"[:2000]) from exc


def quiet() -> None:
    """No logging or native-library chatter per input (libFuzzer's own output stays)."""
    import logging

    # Its own $HANDOFF_HOME: a harness must not write into the user's cache, and must trust no
    # key but the one it creates (fuzz_tvm relies on that).
    os.environ["HANDOFF_HOME"] = os.environ.get("HANDOFF_FUZZ_HOME") or str(HERE / ".fuzz-home")
    os.environ.setdefault("TVM_LOG_DEBUG", "0")
    logging.disable(logging.CRITICAL)


def main(module_name: str) -> None:
    """``python tests/fuzz/fuzz_NAME.py [libFuzzer flags] CORPUS_DIR...`` (see ``make fuzz``)."""
    import atheris

    quiet()
    with atheris.instrument_imports(include=INSTRUMENTED):
        import handoff  # noqa: F401  instrumented before any harness imports it
        module = __import__(module_name)
        module.setup()
    expected = module.EXPECTED

    def test_one_input(data: bytes) -> None:
        check(module.one_input, expected, data)

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
