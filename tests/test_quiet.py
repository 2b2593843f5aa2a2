"""handoff.quiet_native and handoff.quiet_loggers: library noise off the terminal, nothing else
changed, everything through with --debug."""

from __future__ import annotations

import logging
import os

import pytest

import handoff
from handoff import quiet


@pytest.fixture
def no_debug(monkeypatch):
    monkeypatch.delenv(quiet.DEBUG_ENV, raising=False)
    monkeypatch.setattr(quiet, "_debug", [False])


def test_quiet_loggers_mutes_below_the_level_and_restores(no_debug, caplog):
    lib, child = logging.getLogger("noisy_lib"), logging.getLogger("noisy_lib.sub")
    lib.setLevel(logging.INFO)
    caplog.set_level(logging.DEBUG)
    with handoff.quiet_loggers("noisy_lib", "other_lib"):
        assert lib.level == logging.ERROR and logging.getLogger("other_lib").level == logging.ERROR
        child.warning("cannot load the CUDA kernels")
        child.error("a real failure")
        with handoff.quiet_loggers("noisy_lib", level=logging.CRITICAL):  # nests
            lib.error("muted too")
        assert lib.level == logging.ERROR
    assert [r.getMessage() for r in caplog.records] == ["a real failure"]
    assert lib.level == logging.INFO and logging.getLogger("other_lib").level == logging.NOTSET


def test_quiet_loggers_restores_when_the_block_raises(no_debug):
    logging.getLogger("noisy_lib2").setLevel(logging.DEBUG)
    with pytest.raises(ValueError), handoff.quiet_loggers("noisy_lib2"):
        raise ValueError
    assert logging.getLogger("noisy_lib2").level == logging.DEBUG


def test_debug_lets_everything_through(monkeypatch, caplog):
    monkeypatch.setenv(quiet.DEBUG_ENV, "1")
    caplog.set_level(logging.DEBUG)
    with handoff.quiet_loggers("noisy_lib3"):
        logging.getLogger("noisy_lib3").warning("shown with --debug")
    assert [r.getMessage() for r in caplog.records] == ["shown with --debug"]


def test_quiet_native_drops_what_native_code_prints(no_debug, capfd):
    with handoff.quiet_native():
        os.write(1, b"[cpuinfo_utils.cpp:71] noise\n")
        os.write(2, b"more noise\n")
    os.write(1, b"after\n")
    out, err = capfd.readouterr()
    assert out == "after\n" and err == ""
