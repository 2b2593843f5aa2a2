"""Fallback copies at load (format 1.3): a delegate whose backend is not installed, cannot run
here or fails to load its blob runs its fallback copy, with one warning per load; ``strict``
refuses; the data path, native-code trust, ``Program.stats`` and the CLI follow the copy used."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

import handoff
from handoff import FallbackWarning, HandoffError, Limits
from handoff.cli import main
from handoff.program import ProgramFile, program_bytes
from handoff.testing import check_against_eager

SPECS = [((2, 8), "float32")]
OFF = "HANDOFF_SINK_UNAVAILABLE"
SWITCHED_OFF = "backend 'sink' cannot run here: switched off by $HANDOFF_SINK_UNAVAILABLE"


@pytest.fixture
def model():
    import kitchen_sink

    return kitchen_sink.sink_net()  # sink -> sin on the host -> sink: two sink delegates


@pytest.fixture
def sink_program(sink_plugins, model):
    """Two ``sink`` delegates, no copies (min partition size 1 keeps both)."""
    result = handoff.partition(model, (torch.randn(2, 8),), backends=["sink"], fallback=False,
                               default_limits=Limits(min_size=1))
    assert [d["backend"] for d in result.assembled.manifest["delegates"]] == ["sink", "sink"]
    return result.to_bytes(sign=False)


def _with_copies(data: bytes, copies, backend: str | None = None) -> bytes:
    """``data`` with each delegate given fallback copies by the backends ``copies`` (the sink
    backends share a blob format, so a copy is the delegate's own segment), and optionally its
    own backend renamed."""
    with ProgramFile.from_bytes(data) as pf:
        manifest = {k: copy.deepcopy(v) for k, v in pf.manifest.items() if k not in ("segments", "signatures")}
        segments = [bytes(pf.segment(i)) for i in range(len(pf))]
    for d in manifest["delegates"]:
        d["fallbacks"] = [{"backend": b, "backend_version": "9.9", "segment": d["segment"], "metadata": d["metadata"],
                           "options": {}} for b in copies]
        if backend:
            d["backend"] = backend
    return program_bytes(manifest, segments)


def _load_warned(source, **kw):
    """``handoff.load`` and the warnings it issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = handoff.load(source, **kw)
    return program, [w for w in caught if issubclass(w.category, FallbackWarning)]


def test_own_backend_runs_when_it_can(sink_program, model):
    program, warned = _load_warned(_with_copies(sink_program, ["sinkb"]))
    with program:
        assert not warned
        check_against_eager(program, model, SPECS)
        assert [(d["copy"], d["runtime"], d["fallback_reason"]) for d in program.stats()["delegates"]] == \
            [(None, "sink", None)] * 2


def test_unavailable_backend_runs_its_copy_with_one_warning(sink_program, model, monkeypatch):
    monkeypatch.setenv(OFF, "sink")
    program, warned = _load_warned(_with_copies(sink_program, ["sinkb"]))
    with program:
        assert len(warned) == 1  # one per load, naming every delegate that uses a copy
        assert str(warned[0].message) == (
            f"<bytes>: delegates 0 (sink_0, backend 'sink'), 1 (sink_1, backend 'sink') run their fallback copies 0 "
            f"(backend 'sinkb') because {SWITCHED_OFF}; load with strict=True (handoff run --strict) to refuse instead")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a run never warns
            check_against_eager(program, model, SPECS)
        stats = program.stats()["delegates"]
    assert [(d["backend"], d["copy"], d["runtime"], d["fallback_reason"]) for d in stats] == \
        [("sink", 0, "sinkb", SWITCHED_OFF)] * 2
    assert stats[0]["stats"] == {"ops": 3}  # the copy's runtime executed it


def test_missing_backend_runs_the_first_usable_copy(sink_program, model, monkeypatch):
    monkeypatch.setenv(OFF, "sinkb")  # copy 1 cannot run here either: copy 2 runs
    data = _with_copies(sink_program, ["npu", "sinkb", "sink"], backend="dsp")
    program, warned = _load_warned(data)
    with program:
        check_against_eager(program, model, SPECS)
        stats = program.stats()["delegates"]
    assert [(d["backend"], d["copy"], d["runtime"]) for d in stats] == [("dsp", 2, "sink")] * 2
    assert stats[0]["fallback_reason"] == ("backend 'dsp' not installed; installed: sink, sinkb, tvm; "
                                          "known backends: tvm, xnnpack, qnn, coreml, vulkan, sink, sinkb")
    assert "run their fallback copies 2 (backend 'sink') because backend 'dsp' not installed" in str(warned[0].message)


def test_blob_that_fails_to_load_runs_its_copy(sink_program, model):
    program, warned = _load_warned(_with_copies(sink_program, ["sinkb"]), options={"sink": {"fail_load": "1"}})
    reasons = [f"backend 'sink' failed to load its blob (segment {i} at offset {offset}): RuntimeError: sink: "
               f"refusing to load (fail_load=1)" for i, offset in ((0, 128), (1, 576))]  # where in the file
    with program:
        check_against_eager(program, model, SPECS)
        assert [d["fallback_reason"] for d in program.stats()["delegates"]] == reasons
    assert str(warned[0].message) == (
        f"<bytes>: delegate 0 (sink_0, backend 'sink') runs its fallback copy 0 (backend 'sinkb') because "
        f"{reasons[0]}; delegate 1 (sink_1, backend 'sink') runs its fallback copy 0 (backend 'sinkb') because "
        f"{reasons[1]}; load with strict=True (handoff run --strict) to refuse instead")


def test_strict_refuses_with_the_reason_and_the_way_out(sink_program, monkeypatch):
    data = _with_copies(sink_program, ["sinkb"])
    unused = ("; strict: its fallback copy (backend 'sinkb') not used: load without strict=True (handoff run "
              "without --strict) to run it")
    with pytest.raises(HandoffError) as err:
        handoff.load(data, options={"sink": {"fail_load": "1"}}, strict=True)
    assert str(err.value) == ("<bytes>: delegate 0 (sink_0, backend 'sink', segment 0 at offset 128) failed to load: "
                              "RuntimeError: sink: refusing to load (fail_load=1)" + unused)
    monkeypatch.setenv(OFF, "sink")
    with pytest.raises(HandoffError) as err:
        handoff.load(data, strict=True)
    assert str(err.value) == f"<bytes>: {SWITCHED_OFF}{unused}"
    with pytest.raises(HandoffError) as err:  # without copies: the message programs without copies always had
        handoff.load(sink_program)
    assert str(err.value) == f"<bytes>: {SWITCHED_OFF}"


def test_no_usable_entry_lists_every_reason(sink_program, monkeypatch):
    monkeypatch.setenv(OFF, "sink,sinkb")
    with pytest.raises(HandoffError) as err:
        handoff.load(_with_copies(sink_program, ["sinkb", "npu"]))
    assert str(err.value) == (
        f"<bytes>: delegate 0 (sink_0) cannot run here: its own blob: {SWITCHED_OFF}; fallback copy 0: backend "
        f"'sinkb' cannot run here: switched off by $HANDOFF_SINK_UNAVAILABLE; fallback copy 1: backend 'npu' not "
        f"installed; installed: sink, sinkb, tvm; known backends: tvm, xnnpack, qnn, coreml, vulkan, sink, sinkb")
    monkeypatch.setenv(OFF, "sink")
    with pytest.raises(HandoffError) as err:  # the copy's runtime is there, but its blob fails to load too
        handoff.load(_with_copies(sink_program, ["sinkb"]), options={"sinkb": {"fail_load": "1"}})
    assert str(err.value) == (
        f"<bytes>: delegate 0 (sink_0) cannot run here: its own blob: {SWITCHED_OFF}; fallback copy 0: backend "
        f"'sinkb' failed to load its blob (segment 0 at offset 128): RuntimeError: sinkb: refusing to load "
        f"(fail_load=1)")


def test_options_for_a_copys_backend_are_accepted_and_checked(sink_program):
    data = _with_copies(sink_program, ["sinkb"])
    with handoff.load(data, options={"sinkb": {"memory": "device"}}) as program:
        assert program.stats()["delegates"][0]["runtime"] == "sink"
    with pytest.raises(HandoffError, match="sinkb"):
        handoff.load(data, options={"sinkb": {"memory": "gpu"}})
    with pytest.raises(HandoffError, match=r"options given for backend 'qnn', which this program does not use; "
                                           r"it uses: sink, sinkb$"):
        handoff.load(data, options={"qnn": {}})


def test_the_data_path_is_planned_for_the_copy_that_runs(sink_program, monkeypatch):
    """``sink`` is reentrant and ``sinkb`` is not: running sinkb copies with device memory, the plan
    uses sinkb's memory domain, transfers and a lock per delegate (sinkb raises if two calls of one
    delegate overlap), so runs from 8 threads match single-threaded runs."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv(OFF, "sink")
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal((2, 8), dtype=np.float32) for _ in range(8 * 100)]
    program, _ = _load_warned(_with_copies(sink_program, ["sinkb"]), options={"sinkb": {"memory": "device"}})
    with program:
        assert all(op[3] is not None for op in program._ops if op[0] == 0)  # a lock per delegate
        want = [program.run([x]) for x in inputs]
        with ThreadPoolExecutor(8) as threads:
            got = list(threads.map(lambda x: program.run([x]), inputs))
        stats = program.stats()
    assert [d["memory"] for d in stats["delegates"]] == ["sink:device"] * 2
    # x into delegate 0; y to the host for sin; sin(y) and x into delegate 1; the output to the host
    assert stats["host_transfers"] == 5
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g[0], w[0])


def test_native_copies_need_trust_as_native_delegates_do(sink_plugins, model, monkeypatch, tmp_path):
    """Real tvm copies (``fallback_copies=True``): native code, so a copy loads only from a trusted
    program, exactly as a tvm delegate; a program whose own backends run needs no trust."""
    result = handoff.partition(model, (torch.randn(2, 8),), backends=["sink"], fallback=False,
                               default_limits=Limits(min_size=1), fallback_copies=True)
    assert [[c["backend"] for c in d["fallbacks"]] for d in result.assembled.manifest["delegates"]] == [["tvm"]] * 2
    assert [(c["partition"], c["copy"]) for c in result.report.copies] == [("sink_0", "tvm"), ("sink_1", "tvm")]
    unsigned = result.to_bytes(sign=False)
    with handoff.load(unsigned) as program:  # sink runs: the copies' native code is not needed
        assert program.trust is None
    monkeypatch.setenv(OFF, "sink")
    with pytest.raises(HandoffError) as err:
        handoff.load(unsigned)
    assert str(err.value).startswith("<bytes>: delegate 0 (sink_0, fallback copy 0, backend 'tvm') is native code "
                                     "and the program is not signed; load it only if you trust it")
    for program, _ in (_load_warned(unsigned, allow_unsigned=True), _load_warned(result.to_bytes())):
        with program:
            assert program.trust is not None
            check_against_eager(program, model, SPECS)
            assert [(d["copy"], d["runtime"]) for d in program.stats()["delegates"]] == [(0, "tvm")] * 2


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_cli_partition_inspect_run_with_an_unavailable_backend(sink_plugins, model, capsys, tmp_path, monkeypatch):
    """``partition --fallback-copies`` -> ``inspect`` shows the copies -> ``run`` with the sink
    backend switched off runs the tvm copies (one warning line; outputs equal eager), and
    ``run --strict`` refuses in one line."""
    hof = tmp_path / "m.hof"
    code, out, err = _cli(capsys, "partition", "zoo:sink_net", "--backends", "sink", "--min-partition-size", "1",
                          "--fallback-copies", "-o", str(hof))  # sink, then tvm (sin), then sink
    assert code == 0, err
    assert "fallback copies: 2 of 2 vendor delegate(s) carry a tvm copy" in out

    code, out, err = _cli(capsys, "inspect", str(hof))
    assert code == 0, err
    assert "delegates (3, 2 with fallback copies):" in out
    assert out.count("fallback copy 0: tvm ") == 2

    monkeypatch.setenv(OFF, "sink")
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = _cli(capsys, "run", str(hof), "--input", str(tmp_path / "x.npy"), "--json",
                          "--save-outputs", str(tmp_path / "outs"))
    assert code == 0, err
    assert err.count("\n") == 1 and err.startswith(f"handoff: warning: {hof}: delegates 0 (sink_0, backend 'sink'), "
                                                   f"2 (sink_1, backend 'sink') run their fallback copies 0 (backend "
                                                   f"'tvm') because {SWITCHED_OFF}")
    summary = json.loads(out)
    assert [(d["delegate"], d["copy"], d["runtime"]) for d in summary["delegates"]] == \
        [(0, 0, "tvm"), (1, None, "tvm"), (2, 0, "tvm")]
    with torch.no_grad():
        want = model(torch.from_numpy(x))
    handoff.testing.assert_matches_eager(np.load(tmp_path / "outs" / "output_0.npy"), want)

    code, out, err = _cli(capsys, "run", str(hof))
    assert code == 0, err
    assert "delegates: 1 of 3 ran on their own backend, 2 on a fallback copy" in out
    assert f"delegate 2 (sink_1, backend 'sink') ran its fallback copy 0 (backend 'tvm'): {SWITCHED_OFF}" in out

    code, out, err = _cli(capsys, "run", str(hof), "--strict")
    assert code == 1 and not out
    assert err == (f"handoff: error: {hof}: {SWITCHED_OFF}; strict: its fallback copy (backend 'tvm') not used: load "
                   f"without strict=True (handoff run without --strict) to run it\n")
