"""The fuzz harnesses' smoke pass (``tests/fuzz/``).

Every harness runs in one child process (``tests/fuzz/smoke.py``), one after another: its setup,
its checked-in seeds, the inputs of every fixed finding (``tests/fuzz/regressions/NAME/``) and a
fixed number of seeded mutations through its contract (not xnnpack and qnn, whose vendor
libraries crash on some mutations in-process: seeds and regressions only). One process, so torch
and the vendor libraries load once; seeded, so every run checks the same inputs. The real driver
(atheris + libFuzzer, what ``make fuzz`` runs for a time budget) runs once too, on one harness,
for a fixed number of inputs. Inputs on which a vendor runtime itself dies
(``tests/fuzz/crashers/``) are checked through ``handoff.load``, which isolates them.

A harness fails on an exception outside its contract (``tests/fuzz/_harness.py``), a crash of
the process, or a temporary directory left behind (coreml); the test shows what the input did,
and the input is saved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"
sys.path.insert(0, str(FUZZ))
try:
    from smoke import MUTATIONS
finally:
    sys.path.remove(str(FUZZ))
HARNESSES = list(MUTATIONS)


def _env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "HANDOFF_FUZZ_HOME": str(tmp / "home"), "PYTHONHASHSEED": "0"}
    env.pop("HANDOFF_DISABLE_PLUGIN_AUTOLOAD", None)  # fuzz_options parses every installed backend's options
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict], str, Path]:
    """The smoke pass's result per harness, its stderr, and where it saved findings."""
    tmp = tmp_path_factory.mktemp("fuzz-smoke")
    artifacts = tmp / "artifacts"
    artifacts.mkdir()
    proc = subprocess.run([sys.executable, str(FUZZ / "smoke.py"), "--artifacts", str(artifacts)], env=_env(tmp),
                          capture_output=True, text=True, timeout=600)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            results[result["name"]] = result
    return results, proc.stderr, artifacts


@pytest.mark.slow
@pytest.mark.parametrize("name", HARNESSES)
def test_harness_smoke(name: str, smoke: tuple[dict[str, dict], str, Path]) -> None:
    results, stderr, artifacts = smoke
    assert any((FUZZ / "corpus" / name).iterdir()), f"no seeds for fuzz_{name}: run tests/fuzz/make_seeds.py {name}"
    assert name in results, f"the smoke pass died before or in fuzz_{name}:\n{stderr[-6000:]}"
    result = results[name]
    assert not result["findings"], (f"fuzz_{name} found {len(result['findings'])} input(s) that break its contract "
                                    f"(saved in {artifacts}): {result['findings'][:3]}")
    seeds = sum(1 for folder in ("corpus", "regressions") if (FUZZ / folder / name).is_dir()
                for p in (FUZZ / folder / name).iterdir())
    assert result["inputs"] == seeds + MUTATIONS[name]


@pytest.mark.slow
def test_real_driver_runs_a_harness(tmp_path: Path) -> None:
    """``make fuzz``'s driver (atheris instruments handoff, libFuzzer mutates with the program
    dictionary) on fuzz_program for a fixed number of inputs: it starts, reads the seeds, finds
    nothing."""
    work = tmp_path / "corpus"
    work.mkdir()
    flags = ["-rss_limit_mb=2048", "-timeout=60", "-runs=500", "-seed=1", f"-artifact_prefix={tmp_path}/",
             f"-dict={FUZZ / 'program.dict'}"]
    proc = subprocess.run([sys.executable, str(FUZZ / "fuzz_program.py"), *flags, str(work), str(FUZZ / "corpus" / "program")],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    saved = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "oom-", "timeout-", "leak-")))
    assert proc.returncode == 0 and not saved, f"fuzz_program found something ({saved}):\n{proc.stderr[-6000:]}"
    assert "INITED" in proc.stderr and "Done 500 runs" in proc.stderr, proc.stderr[-3000:]


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
    return sorted((FUZZ / "crashers").glob("*/crash-*"))


def _load_as_delegate(blob: Path) -> None:
    """``handoff.load`` on a program whose one delegate is ``blob``, for the backend named by its
    folder (``crashers/xnnpack/...``)."""
    import handoff
    from handoff import plugins
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
    handoff.load(program_bytes(manifest, [blob.read_bytes()]), plugins=pm)


@pytest.mark.slow
@pytest.mark.parametrize("blob", _crashers(), ids=lambda p: f"{p.parent.name}/{p.name[:14]}")
def test_vendor_crashes_found_by_fuzzing_are_one_line_errors(blob: Path, tmp_path: Path) -> None:
    """Blobs on which the vendor runtime itself dies (ExecuTorch aborts, the QNN HTP backend
    segfaults): in-process they kill the harness; through ``handoff.load`` the core loads them in
    a probe process first (``Runtime.isolate_untrusted``) and raises one line instead."""
    from handoff import HandoffError

    backend = blob.parent.name
    # Whether a damaged blob kills the vendor runtime can hang on what was allocated before it:
    # crash-add57579 aborted the probe child until the xnnpack runtime began to copy the .pte before
    # ExecuTorch's binding loads; now it loads there and fails on its inputs. Either way: one line.
    with pytest.raises(HandoffError, match=rf"delegate 0 \({backend}_0, backend '{backend}', segment 0 at offset "
                                           rf"128\)(: the vendor runtime crashed on this blob \(SIG| failed to load: )"
                       ) as caught:
        _load_as_delegate(blob)
    assert "runpy" not in str(caught.value) and "\n" not in str(caught.value)  # the crash's words, one line


#: The one-line error each fixed finding's input gets from ``handoff.load`` (what, where, next step).
REGRESSION_ERRORS = {
    # ExecuTorch 1.5.1 threw std::bad_alloc (pybind11: MemoryError) on a size field of the blob.
    "xnnpack/bad-alloc-302d43ef":
        "<bytes>: delegate 0 (xnnpack_0, backend 'xnnpack', segment 0 at offset 128) failed to load: ValueError: "
        "xnnpack: ExecuTorch could not allocate what this program asks for (MemoryError: std::bad_alloc): the "
        "blob is damaged or not an xnnpack program of this release; partition the model again",
    # The container header's tensors were read with header[...]: a KeyError nobody could act on.
    "qnn/header-input-no-dtype":
        "<bytes>: delegate 0 (qnn_0, backend 'qnn', segment 0 at offset 128) failed to load: ValueError: qnn "
        "delegate blob header (JSON at byte 16) is corrupt: inputs[1] is not a tensor's dtype and static shape "
        "({'dsype': 'float32', 'name': 'input_1', 'shape': [1, 4, 8]}); the blob is damaged or was not written by "
        "handoff-qnn; partition the model again",
    "qnn/header-input-no-shape":
        "<bytes>: delegate 0 (qnn_0, backend 'qnn', segment 0 at offset 128) failed to load: ValueError: qnn "
        "delegate blob header (JSON at byte 16) is corrupt: inputs[1] is not a tensor's dtype and static shape "
        "({'dtype': 'float32', 'name': 'input_1', 'uhape': [1, 4, 8]}); the blob is damaged or was not written by "
        "handoff-qnn; partition the model again",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGRESSION_ERRORS))
def test_vendor_blob_findings_are_the_expected_one_line_errors(name: str) -> None:
    """The inputs of fixed blob-loader findings (``regressions/{xnnpack,qnn}/``) through
    ``handoff.load``: not merely no crash, but this exact line."""
    from handoff import HandoffError

    with pytest.raises(HandoffError) as caught:
        _load_as_delegate(FUZZ / "regressions" / name)
    assert str(caught.value) == REGRESSION_ERRORS[name]


def test_every_blob_regression_has_its_expected_error() -> None:
    assert sorted(REGRESSION_ERRORS) == sorted(f"{p.parent.name}/{p.name}" for backend in ("xnnpack", "qnn")
                                               for p in (FUZZ / "regressions" / backend).iterdir())


#: ``corpus/options/vulkan-buffers-*``: what ``vulkan.max_storage_buffers`` parses to as a compile
#: option, or the one-line error (valid values named).
BUFFER_SEEDS = {
    "vulkan-buffers-8": 8, "vulkan-buffers-32": 32, "vulkan-buffers-max": 2**32 - 1,
    **{f"vulkan-buffers-{name}": repr(text) for name, text in (
        ("0", "0"), ("negative", "-1"), ("2e32", "4294967296"), ("float", "8.5"), ("word", "eight"), ("empty", ""))},
}


@pytest.mark.parametrize("seed", sorted(BUFFER_SEEDS))
def test_options_harness_on_the_storage_buffer_seeds(seed: str) -> None:
    """fuzz_options on the seeds of vulkan's ``max_storage_buffers``: a valid value parses to its
    integer (and is refused as a runtime option, naming it a compile option); a bad one is a
    one-line error naming the valid range. Either way within the harness's contract."""
    from handoff import HandoffError, plugins
    from handoff.cli import _options

    sys.path.insert(0, str(FUZZ))
    try:
        import _harness
        import fuzz_options
    finally:
        sys.path.remove(str(FUZZ))
    data = (FUZZ / "corpus" / "options" / seed).read_bytes()
    pm = plugins.Plugins(autoload=False, extra=["handoff_vulkan.plugin"])
    fuzz_options._plugins = pm
    _harness.check(fuzz_options.one_input, (HandoffError,), data)  # a Finding if outside the contract
    values = _options(data.decode().splitlines())["vulkan"]
    expected = BUFFER_SEEDS[seed]
    if isinstance(expected, int):
        assert pm.parse_options("vulkan", values, runtime=False)["max_storage_buffers"] == expected
        runtime = ", ".join(sorted(pm.spec("vulkan").runtime_options))
        with pytest.raises(HandoffError, match=rf"is a compile option\); valid runtime options: {runtime}$"):
            pm.parse_options("vulkan", values, runtime=True)
    else:
        with pytest.raises(HandoffError) as caught:
            pm.parse_options("vulkan", values, runtime=False)
        assert str(caught.value) == (f"backend 'vulkan': option max_storage_buffers={expected} is not valid; "
                                     f"valid values: an integer >= 1 and <= 4294967295")
