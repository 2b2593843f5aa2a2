"""The fuzz harnesses' smoke pass (``tests/fuzz/``): each harness runs its real driver (atheris +
libFuzzer) in its own process, one after another, over its checked-in seeds and the inputs of every
fixed finding (``tests/fuzz/regressions/NAME/``), then mutates for a few seconds (not xnnpack and
qnn, whose vendor libraries crash on some mutations in-process). All of them together take under a
minute of fuzzing; ``make fuzz`` runs the long campaigns. Inputs on which a vendor runtime itself
dies (``tests/fuzz/crashers/``) are checked through ``handoff.load``, which isolates them.

A harness fails on a crash, an abort, a hang past ``-timeout``, an allocation past
``-rss_limit_mb``, or an exception outside its contract (``tests/fuzz/_harness.py``); the test
then shows libFuzzer's report and the input it saved.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"
#: Seconds of mutation per harness after the seeds and regressions ran (7 harnesses: 21 s).
SECONDS = 3
HARNESSES = ["program", "hostops", "options", "tvm", "xnnpack", "vulkan", "qnn"]
#: Harnesses whose vendor library crashes on some mutations (the core isolates it, see
#: tests/fuzz/campaign.py): the smoke pass runs their seeds and regressions only.
SEEDS_ONLY = {"xnnpack", "qnn"}


def fuzz(name: str, tmp_path: Path, *extra: str, seconds: int = SECONDS) -> subprocess.CompletedProcess:
    corpora = [str(FUZZ / "corpus" / name)]
    if (FUZZ / "regressions" / name).is_dir():
        corpora.append(str(FUZZ / "regressions" / name))
    work = tmp_path / "corpus"
    work.mkdir()
    env = {**os.environ, "HANDOFF_FUZZ_HOME": str(tmp_path / "home"), "PYTHONHASHSEED": "0"}
    flags = ["-rss_limit_mb=2048", "-timeout=60", f"-max_total_time={seconds}", "-seed=1",
             f"-artifact_prefix={tmp_path}/", *extra]
    if name in ("program", "hostops", "tvm"):
        flags.append(f"-dict={FUZZ / 'program.dict'}")
    return subprocess.run([sys.executable, str(FUZZ / f"fuzz_{name}.py"), *flags, str(work), *corpora],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("name", HARNESSES)
def test_harness_smoke(name: str, tmp_path: Path) -> None:
    assert any((FUZZ / "corpus" / name).iterdir()), f"no seeds for fuzz_{name}: run tests/fuzz/make_seeds.py"
    proc = fuzz(name, tmp_path, *(["-runs=0"] if name in SEEDS_ONLY else []))
    saved = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "oom-", "timeout-", "leak-")))
    assert proc.returncode == 0 and not saved, (
        f"fuzz_{name} found something (exit {proc.returncode}, saved {saved}):\n{proc.stderr[-6000:]}")
    assert "INITED" in proc.stderr, proc.stderr[-3000:]


def test_harness_reports_a_finding(tmp_path: Path) -> None:
    """The contract is enforced: an exception outside a harness's EXPECTED is a crash, with the
    input saved (a harness that could not fail would be worthless)."""
    sys.path.insert(0, str(FUZZ))
    try:
        import _harness
    finally:
        sys.path.remove(str(FUZZ))

    def parser(data: bytes) -> None:
        if data.startswith(b"{"):
            raise KeyError("sections")
        raise ValueError("clean rejection")

    _harness.check(parser, (ValueError,), b"x")
    with pytest.raises(_harness.Finding, match="KeyError: 'sections'"):
        _harness.check(parser, (ValueError,), b"{")


def _crashers() -> list[Path]:
    return sorted((FUZZ / "crashers").glob("*/*"))


@pytest.mark.slow
@pytest.mark.parametrize("blob", _crashers(), ids=lambda p: f"{p.parent.name}/{p.name[:14]}")
def test_vendor_crashes_found_by_fuzzing_are_one_line_errors(blob: Path, tmp_path: Path) -> None:
    """Blobs on which the vendor runtime itself dies (ExecuTorch aborts, the QNN HTP backend
    segfaults): in-process they kill the harness; through ``handoff.load`` the core loads them in
    a probe process first (``Runtime.isolate_untrusted``) and raises one line instead."""
    import handoff
    from handoff import HandoffError, plugins
    from handoff.program import program_bytes

    backend = blob.parent.name
    pm = plugins.Plugins(autoload=False, extra=[f"handoff_{backend}.plugin"])
    assert pm.runtime(backend).isolate_untrusted
    manifest = {
        "handoff_version": handoff.__version__, "metadata": {},
        "values": [{"dtype": "float32", "shape": [1]}, {"dtype": "float32", "shape": [1]}],
        "inputs": [{"name": "x", "value": 0}], "outputs": [{"name": "y", "value": 1}], "constants": [],
        "delegates": [{"backend": backend, "backend_version": pm.spec(backend).version, "segment": 0,
                       "partition": f"{backend}_0", "metadata": {}, "options": {}}],
        "instructions": [{"op": "delegate", "delegate": 0, "inputs": [0], "outputs": [1]}],
    }
    with pytest.raises(HandoffError, match=rf"delegate 0 \({backend}_0, backend '{backend}'\): the vendor runtime "
                                           rf"crashed on this blob \(SIG") as caught:
        handoff.load(program_bytes(manifest, [blob.read_bytes()]), plugins=pm)
    assert "runpy" not in str(caught.value) and "\n" not in str(caught.value)  # the crash's words, one line
