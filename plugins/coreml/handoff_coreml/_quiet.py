"""Quiet coremltools: no log lines, warnings or progress bars on the user's terminal.

coremltools logs a warning for every Core ML binding it cannot load (all of them off macOS), for
every untested torch/scikit-learn/xgboost version it sees, and draws tqdm progress bars over its
frontend and each MIL pass pipeline. Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
import warnings
from typing import Iterator

from handoff import quiet_loggers

_LOGGERS = ("coremltools", "torchao", "torch.utils._pytree")
#: module -> attribute holding the tqdm class it draws progress bars with
_PROGRESS = {"coremltools.converters.mil.frontend.torch.ops": "_tqdm",
             "coremltools.converters.mil.mil.passes.pass_pipeline": "tqdm"}
_LOCK = threading.RLock()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Mute coremltools' loggers and warnings and disable its progress bars for the duration,
    then restore them (coremltools may be used by the caller too)."""
    with _LOCK, warnings.catch_warnings(), quiet_loggers(*_LOGGERS, level=logging.CRITICAL):
        warnings.simplefilter("ignore")
        patched = []
        for module_name, attr in _PROGRESS.items():
            module = sys.modules.get(module_name)
            bar = getattr(module, attr, None)
            if bar is not None:
                patched.append((module, attr, bar))
                setattr(module, attr, functools.partial(bar, disable=True))
        try:
            yield
        finally:
            for module, attr, bar in patched:
                setattr(module, attr, bar)
