"""Fuzz the option parsers: ``--option BACKEND.NAME=VALUE`` on the command line
(``handoff.cli``), then each backend's typed compile and runtime options (``Plugins.parse_options``,
``handoff.Option``), for every installed backend; and ``--input-shape`` (``1x3x224x224:float16``),
which sizes an example tensor and so is capped. Each input is a few lines: ``BACKEND.NAME=VALUE``
lines are options, the others input shapes. Seeds: ``corpus/options/``.
"""

from __future__ import annotations

import _harness

EXPECTED: tuple[type[BaseException], ...] = ()
_plugins = None


def setup() -> None:
    global EXPECTED, _plugins
    from handoff import HandoffError, get_plugins

    EXPECTED = (HandoffError,)
    _plugins = get_plugins()


def one_input(data: bytes) -> None:
    from handoff.cli import _options
    from handoff.zoo import parse_input_shape

    lines = [line for line in data.decode("utf-8", "replace").splitlines() if line][:16]
    for line in lines:
        if "=" not in line:
            try:
                parse_input_shape(line)
            except ValueError:  # the CLI's one line: `--input-shape '...': ...`
                pass
    options = _options([line for line in lines if "=" in line])
    for backend, values in options.items():
        for runtime in (False, True):
            if backend in _plugins.backends:
                _plugins.parse_options(backend, values, runtime=runtime)


if __name__ == "__main__":
    _harness.main("fuzz_options")
