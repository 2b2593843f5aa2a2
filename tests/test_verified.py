"""Verified-file records (handoff.verified): an unchanged, fully checked program file is not checked
again, and a file changed after it was recorded is checked again (its damage still reported)."""

from __future__ import annotations

import copy
import os
import re

import numpy as np
import pytest
import torch

import handoff
from handoff import probe, verified
from handoff.errors import HandoffError, ProgramFormatError
from handoff.limits import MAX_RUN_BYTES, RUN_BYTES_NOTE, run_bytes
from handoff.program import VALIDATED_NOTE, ProgramFile, _validated_by, program_bytes, write_program

W = np.arange(6, dtype="<f4").reshape(2, 3)
BLOB = b"delegate-blob\x00\xff" * 64
MANIFEST = {
    "handoff_version": "0.1.0", "metadata": {},
    "values": [{"dtype": "float32", "shape": [2, 3]}] * 3,
    "inputs": [{"name": "x", "value": 0}], "outputs": [{"name": "y", "value": 2}],
    "constants": [{"value": 1, "segment": 0}],
    "delegates": [{"backend": "fake", "backend_version": "1", "segment": 1, "partition": "p0", "metadata": {},
                   "options": {}}],
    "instructions": [{"op": "delegate", "delegate": 0, "inputs": [0, 1], "outputs": [2]}],
}


def _settled(tmp_path, name="p.hof"):
    """A program file whose times are older than the racy window."""
    path = tmp_path / name
    write_program(str(path), MANIFEST, [W.tobytes(), BLOB])
    verified.wait_until_not_racy(os.stat(path))
    return path


def _no_checks(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a recorded, unchanged file was checked again")

    monkeypatch.setattr(ProgramFile, "_verify", refuse)


def test_a_checked_file_is_recorded_and_not_checked_again(tmp_path, monkeypatch):
    path = _settled(tmp_path)
    with ProgramFile.open(path) as pf:
        assert not pf.recorded
        assert pf.remember_verified()
    assert len(os.listdir(verified._directory())) == 1
    _no_checks(monkeypatch)
    with ProgramFile.open(path) as pf:
        assert pf.recorded
        assert bytes(pf.segment(1)) == BLOB


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_a_file_changed_after_its_record_is_checked_again(tmp_path, keep_mtime):
    """Damage in place (same inode, same size), even with the modification time put back (the
    change time still moves): the next open checks, and the damage is the usual one-line error."""
    path = _settled(tmp_path)
    with ProgramFile.open(path) as pf:
        offset = pf.manifest["segments"][1]["offset"]
        assert pf.remember_verified()
    before = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset + 3)
        f.write(b"X")
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    with ProgramFile.open(path) as pf:
        assert not pf.recorded
        with pytest.raises(ProgramFormatError, match=r"segments\[1\]\.xxh3 at offset \d+: does not match .*corrupted"):
            pf.segment(1)
        with pytest.raises(ProgramFormatError):
            pf.remember_verified()


def test_a_copy_or_replacement_is_checked_again(tmp_path):
    path = _settled(tmp_path)
    with ProgramFile.open(path) as pf:
        assert pf.remember_verified()
    copy = _settled(tmp_path, "copy.hof")
    os.replace(copy, path)  # another inode under the recorded name
    with ProgramFile.open(path) as pf:
        assert not pf.recorded


def test_a_racy_file_is_not_recorded(tmp_path):
    """Written just now: a change within the same clock tick would keep its times, so no record."""
    path = tmp_path / "fresh.hof"
    write_program(str(path), MANIFEST, [W.tobytes(), BLOB])
    with ProgramFile.open(path) as pf:
        assert verified.racy(os.stat(path), pf._stat[1])
        assert not pf.remember_verified()
    assert not verified._directory().exists() or not os.listdir(verified._directory())


def test_bytes_are_never_recorded():
    with ProgramFile.from_bytes(program_bytes(MANIFEST, [W.tobytes(), BLOB])) as pf:
        assert not pf.remember_verified() and not pf.recorded


def test_an_unwritable_home_is_only_a_miss(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("HANDOFF_HOME", str(blocker))
    path = _settled(tmp_path)
    with ProgramFile.open(path) as pf:
        assert not pf.remember_verified()
    with ProgramFile.open(path) as pf:
        assert not pf.recorded and bytes(pf.segment(1)) == BLOB


def test_a_record_for_other_content_does_not_count(tmp_path):
    """The record holds the manifest's SHA-256: the same key with another manifest is a miss."""
    path = _settled(tmp_path)
    st = os.stat(path)
    assert verified.record(st, b"\x00" * 32, verified.wait_until_not_racy(st))
    with ProgramFile.open(path) as pf:
        assert not pf.recorded


def test_partition_and_load_record_the_file(sink_plugins, tmp_path, monkeypatch):
    """``PartitionResult.write`` records what it wrote, so even the first load skips the checks."""
    import kitchen_sink

    model = kitchen_sink.sink_net()
    x = torch.randn(2, 8)
    path = tmp_path / "sink.hof"
    handoff.partition(model, (x,), backends=["sink"], fallback=False).write(str(path))
    _no_checks(monkeypatch)
    with handoff.load(path) as program:
        assert program.file.recorded
        # with the keys of its blobs (handoff.probe), so a runtime that isolates unknown blobs
        # does not hash them on the first load either
        notes = {n: v for n, v in program.file.notes.items() if n not in (VALIDATED_NOTE, RUN_BYTES_NOTE)}
        assert [n.split()[:2] for n in notes] == [["probe-key", str(d["segment"])]
                                                  for d in program.manifest["delegates"]]
        # and the bytes a run holds, for the limit check (handoff.limits.run_bytes)
        assert program.file.notes[RUN_BYTES_NOTE] == str(run_bytes(program.manifest))
        # and that this reader checked its manifest while writing it
        assert program.file.notes[VALIDATED_NOTE] == _validated_by()
        np.testing.assert_allclose(program.run([x.numpy()])[0], model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_partition_records_from_what_it_wrote_without_reading_it_back(sink_plugins, tmp_path, monkeypatch):
    import kitchen_sink

    result = handoff.partition(kitchen_sink.sink_net(), (torch.randn(2, 8),), backends=["sink"], fallback=False)

    def refuse(*args, **kwargs):
        raise AssertionError("the written file was read back")

    path = tmp_path / "sink.hof"
    with monkeypatch.context() as patched:
        patched.setattr(ProgramFile, "open", classmethod(refuse))
        result.write(str(path))
    _no_checks(monkeypatch)
    with ProgramFile.open(path) as pf:
        assert pf.recorded


def test_a_written_file_changed_before_its_record_is_not_recorded(tmp_path):
    """record_written records only the file it wrote: not one replaced or rewritten since, nor
    one whose written times were still racy."""
    path = tmp_path / "p.hof"
    write_program(str(path), MANIFEST, [W.tobytes(), BLOB])
    written = os.stat(path)
    started = verified.wait_until_not_racy(written)
    with ProgramFile.open(path) as pf:
        digest = pf._manifest_sha256
    assert not verified.record_written(str(path), written, digest, written.st_mtime_ns)  # racy
    other = tmp_path / "q.hof"
    write_program(str(other), MANIFEST, [W.tobytes(), BLOB])
    os.replace(other, path)  # replaced: another inode
    assert not verified.record_written(str(path), written, digest, started)
    written = os.stat(path)
    started = verified.wait_until_not_racy(written)
    with open(path, "r+b") as f:  # rewritten in place after the write
        f.seek(-1, os.SEEK_END)
        f.write(b" ")
    assert not verified.record_written(str(path), written, digest, started)
    assert not verified._directory().exists() or not os.listdir(verified._directory())
    path.unlink()
    write_program(str(path), MANIFEST, [W.tobytes(), BLOB], remember=True)
    with ProgramFile.open(path) as pf:
        assert pf.recorded


def test_the_first_load_records_the_file(sink_plugins, tmp_path, monkeypatch):
    import shutil

    import kitchen_sink

    path = tmp_path / "sink.hof"
    handoff.partition(kitchen_sink.sink_net(), (torch.randn(2, 8),), backends=["sink"], fallback=False).write(str(path))
    shutil.rmtree(verified._directory())
    verified.wait_until_not_racy(os.stat(path))  # renamed into place just now: its ctime is racy
    with handoff.load(path):
        pass
    assert len(os.listdir(verified._directory())) == 1
    _no_checks(monkeypatch)
    with handoff.load(path) as program:
        assert program.file.recorded


def _no_validation(monkeypatch):
    from handoff import program

    def refuse(*args, **kwargs):
        raise AssertionError("the manifest of a recorded, unchanged file was validated again")

    monkeypatch.setattr(program, "_read_manifest", refuse)


def test_a_recorded_file_manifest_is_not_validated_again(tmp_path, monkeypatch):
    path = _settled(tmp_path)
    with ProgramFile.open(path) as pf:
        strict = pf.manifest
        assert pf.remember_verified()
    _no_validation(monkeypatch)
    with ProgramFile.open(path) as pf:
        assert pf.recorded and pf.manifest == strict
        assert pf.notes[VALIDATED_NOTE] == _validated_by()


@pytest.mark.parametrize("note", [None, "handoff-0.0.1-format-1.4"])
def test_a_record_from_another_reader_validates_again_and_is_rewritten(tmp_path, monkeypatch, note):
    """A record written before the note existed, or by another release (which may check less):
    the manifest is validated, and the record is rewritten with this reader's note."""
    path = _settled(tmp_path)
    with ProgramFile.open(path) as pf:
        digest = pf._manifest_sha256
    st = os.stat(path)
    assert verified.record(st, digest, verified.wait_until_not_racy(st), None if note is None else {VALIDATED_NOTE: note})
    from handoff import program

    calls = []
    real = program._read_manifest
    monkeypatch.setattr(program, "_read_manifest", lambda *a: calls.append(1) or real(*a))
    with ProgramFile.open(path) as pf:
        assert pf.recorded and calls == [1]
        assert pf.remember_verified()
    assert verified.lookup(st, digest)[VALIDATED_NOTE] == _validated_by()
    with ProgramFile.open(path) as pf:
        assert calls == [1]


def test_a_manifest_damaged_after_its_record_is_refused(tmp_path):
    """The record never stands in for the manifest's digest: damage there is the usual error."""
    path = _settled(tmp_path)
    with ProgramFile.open(path) as pf:
        assert pf.remember_verified()
        moff = pf.manifest_offset
    data = bytearray(path.read_bytes())
    data[moff + 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ProgramFormatError, match="manifest_sha256"):
        ProgramFile.open(path)


def _sink_file(tmp_path, backend="sink", name="sink.hof"):
    import kitchen_sink

    model = kitchen_sink.sink_net()
    path = tmp_path / name
    handoff.partition(model, (torch.randn(2, 8),), backends=[backend], fallback=False).write(str(path))
    return model, path


def test_a_recorded_file_run_bytes_are_a_lookup_and_still_limited(sink_plugins, tmp_path, monkeypatch):
    """The record keeps the run's byte total: a load of the unchanged file compares it with the
    cap without summing the manifest's values, and a cap below it still refuses the file."""
    from handoff import limits

    model, path = _sink_file(tmp_path)
    x = torch.randn(2, 8)
    with handoff.load(path) as program:
        total = run_bytes(program.manifest)
    monkeypatch.setattr(limits, "run_bytes", lambda *a: pytest.fail("run_bytes computed for a recorded file"))
    with handoff.load(path) as program:
        assert program.file.recorded and program.file.notes[RUN_BYTES_NOTE] == str(total)
        np.testing.assert_allclose(program.run([x.numpy()])[0], model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(MAX_RUN_BYTES, str(total - 1))
    with pytest.raises(HandoffError, match=f"more than the .* cap; .* raise {MAX_RUN_BYTES}"):
        handoff.load(path)


def test_a_changed_file_run_bytes_are_computed_again(sink_plugins, tmp_path, monkeypatch):
    """A file changed since its record (here only touched) is a miss: its total is computed from
    the manifest again, whatever any record said, and the new record keeps it."""
    from handoff import limits

    _, path = _sink_file(tmp_path)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000_000))
    verified.wait_until_not_racy(os.stat(path))
    with ProgramFile.open(path) as pf:
        assert not pf.recorded
        digest = pf._manifest_sha256
    calls = []
    real = limits.run_bytes
    monkeypatch.setattr(limits, "run_bytes", lambda m: calls.append(1) or real(m))
    with handoff.load(path) as program:
        assert calls == [1]
    assert verified.lookup(os.stat(path), digest)[RUN_BYTES_NOTE] == str(real(program.manifest))
    with handoff.load(path) as program:
        assert program.file.recorded and calls == [1]


@pytest.mark.parametrize("backend", ["sink", "sinkb"])  # sinkb is not reentrant: each load has its own locks
def test_a_manifest_is_planned_once_per_process(sink_plugins, tmp_path, monkeypatch, backend):
    """The execution plan is made once per manifest digest and bound to each load's own runtimes,
    handles and locks; another manifest (another model, or a changed file) is planned afresh."""
    from handoff import runtime

    model, path = _sink_file(tmp_path, backend)
    runtime._PLANS.clear()
    x = torch.randn(2, 8)
    first = handoff.load(path)
    assert len(runtime._PLANS) == 1
    monkeypatch.setattr(runtime.Program, "_make_plan", lambda *a: pytest.fail("planned again"))
    with handoff.load(path) as second, first:
        for program in (first, second):
            np.testing.assert_allclose(program.run([x.numpy()])[0], model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
        ops = [op for op in second._ops if op[0] == runtime._DELEGATE]
        assert ops and all(a[2] is not b[2] for a, b in zip(first._ops, ops))  # each its own handle
        if backend == "sinkb":
            assert all(a[3] is not None and a[3] is not b[3] for a, b in zip(first._ops, ops))
    monkeypatch.undo()
    import kitchen_sink

    other = tmp_path / "other.hof"
    handoff.partition(kitchen_sink.sink_net(), (torch.randn(3, 8),), backends=[backend], fallback=False).write(str(other))
    with handoff.load(other) as program:
        assert len(runtime._PLANS) == 2
        assert program.run([np.ones((3, 8), np.float32)])[0].shape[0] == 3


@pytest.mark.parametrize("backend", ["sink", "sinkb"])  # sinkb is not reentrant: each load has its own locks
def test_a_load_of_an_unchanged_file_repeats_the_last_one(sink_plugins, tmp_path, monkeypatch, backend):
    """Once a load of the recorded file has gone through, later loads with the same plan load
    each delegate's entry as it did and bind its run plan: nothing is decided, tried or planned
    again, yet each load has its own handles (and locks), runs right, and vouches for its blob."""
    from handoff import runtime

    model, path = _sink_file(tmp_path, backend)
    verified.wait_until_not_racy(os.stat(path))
    x = torch.randn(2, 8)
    with handoff.load(path) as first:
        np.testing.assert_allclose(first.run([x.numpy()])[0], model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    for name in ("_load_delegates", "_plan", "_make_plan", "_decide"):
        monkeypatch.setattr(runtime.Program, name, lambda *a, _name=name: pytest.fail(f"{_name} again"))
    with handoff.load(path) as second, handoff.load(path) as third:
        for program in (second, third):
            np.testing.assert_allclose(program.run([x.numpy()])[0], model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
            assert program.choices == first.choices and program.stats()["delegates"][0]["runtime"] == backend
        assert all(a[2] is not b[2] for a, b in zip(second._ops, third._ops))  # each its own handle
        if backend == "sinkb":
            assert all(a[3] is not None and a[3] is not b[3] for a, b in zip(second._ops, third._ops))


def test_a_repeated_load_that_fails_says_what_a_first_load_says(sink_plugins, tmp_path, monkeypatch):
    """A delegate whose runtime refuses its blob on a repeated load (:meth:`Program._load_again`)
    gets the error a load deciding everything afresh gives: one line naming the delegate, its
    segment and offset; the file stays loadable once the runtime loads again."""
    import kitchen_sink

    from handoff import runtime

    _, path = _sink_file(tmp_path)
    verified.wait_until_not_racy(os.stat(path))
    handoff.load(path).close()
    real = kitchen_sink.SinkRuntime.load
    monkeypatch.setattr(kitchen_sink.SinkRuntime, "load", lambda *a: (_ for _ in ()).throw(RuntimeError("no device")))
    errors = []
    for forget in (False, True):
        if forget:
            monkeypatch.setattr(runtime, "_LOADS", {})
        with pytest.raises(HandoffError) as info:
            handoff.load(path)
        errors.append(str(info.value))
    assert errors[0] == errors[1] and "\n" not in errors[0]
    assert re.search(r"delegate 0 \(sink_0, backend 'sink', segment \d+ at offset \d+\) failed to load: RuntimeError: no device$",
                     errors[0]), errors[0]
    monkeypatch.setattr(kitchen_sink.SinkRuntime, "load", real)
    handoff.load(path).close()


def test_a_repeated_load_still_warns_and_decides_trust_each_time(sink_plugins, tmp_path, monkeypatch):
    """A recorded file whose delegates run their native (tvm) fallback copies, its own backend
    switched off: a repeated load warns as the first did and decides trust again, so a load
    without ``allow_unsigned`` is refused even though the same load plan was carried out before."""
    import warnings

    import kitchen_sink

    from handoff import FallbackWarning, runtime

    model = kitchen_sink.sink_net()
    path = tmp_path / "copies.hof"
    handoff.partition(model, (torch.randn(2, 8),), backends=["sink"], fallback=False,
                      fallback_copies=True).write(str(path), sign=False)
    verified.wait_until_not_racy(os.stat(path))
    monkeypatch.setenv(kitchen_sink.UNAVAILABLE_ENV, "sink")
    x = torch.randn(2, 8)
    for n in range(3):
        if n == 1:  # from here on the first load is repeated
            monkeypatch.setattr(runtime.Program, "_load_delegates", lambda *a: pytest.fail("decided again"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            program = handoff.load(path, allow_unsigned=True)
        with program:
            assert [str(w.message) for w in caught if w.category is FallbackWarning] and program.trust is not None
            assert {d["runtime"] for d in program.stats()["delegates"]} == {"tvm"}
            np.testing.assert_allclose(program.run([x.numpy()])[0], model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(HandoffError, match=r"is native code and the program is not signed; load it only if you trust"):
        handoff.load(path)


def _decisions(monkeypatch):
    """Count the loads that decide their load plan (:meth:`Program._decide`) instead of reusing one."""
    from handoff import runtime

    made = []
    real = runtime.Program._decide
    monkeypatch.setattr(runtime.Program, "_decide", lambda self, *a: made.append(1) or real(self, *a))
    return made


def test_a_second_load_of_an_unchanged_file_reuses_its_load_plan(sink_plugins, tmp_path, monkeypatch):
    """A recorded file loaded again unchanged shares the first load's read-only manifest and load
    plan (no options parsed, nothing decided again); neither load can change what the other reads."""
    model, path = _sink_file(tmp_path)
    verified.wait_until_not_racy(os.stat(path))
    made = _decisions(monkeypatch)
    x = torch.randn(2, 8)
    with handoff.load(path) as first, handoff.load(path) as second:
        assert made == [1] and second.file.recorded and second.manifest is first.manifest
        for program in (first, second):
            np.testing.assert_allclose(program.run([x.numpy()])[0], model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
        delegate, count = first.manifest["delegates"][0], len(first.manifest["delegates"])
        for change in (lambda: delegate.update(backend="other"), lambda: first.manifest["delegates"].append({}),
                       lambda: delegate["metadata"].pop("ops"), lambda: first.manifest.clear()):
            with pytest.raises(TypeError, match="read-only"):
                change()
        assert second.manifest["delegates"][0]["backend"] == "sink" and len(second.manifest["delegates"]) == count
        edited = copy.deepcopy(first.manifest)  # a plain copy to change
        edited["delegates"][0]["backend"] = "other"
        assert type(edited["delegates"]) is list and second.manifest["delegates"][0]["backend"] == "sink"


def test_a_changed_file_gets_a_new_load_plan(sink_plugins, tmp_path, monkeypatch):
    """A file changed since it was loaded (here only touched) is read, checked and decided again."""
    _, path = _sink_file(tmp_path)
    verified.wait_until_not_racy(os.stat(path))
    made = _decisions(monkeypatch)
    with handoff.load(path) as first:
        manifest = first.manifest
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000_000))
    verified.wait_until_not_racy(os.stat(path))
    with handoff.load(path) as program:
        assert made == [1, 1] and program.manifest is not manifest and program.manifest == manifest
    with handoff.load(path) as again:
        assert made == [1, 1] and again.manifest is program.manifest


def test_other_options_plugins_or_availability_decide_again(sink_plugins, tmp_path, monkeypatch):
    """Each distinct option set is checked and has its own plan; a runtime that is no longer
    available, or plugins set since, are honoured by the next load of the unchanged file."""
    import kitchen_sink
    from handoff import plugins, runtime

    _, path = _sink_file(tmp_path)
    verified.wait_until_not_racy(os.stat(path))
    made = _decisions(monkeypatch)
    for options in ({}, {"sink": {"check": "1"}}, {}, {"sink": {"check": "1"}}):
        with handoff.load(path, options=options) as program:
            plan, _ = program._load_plan(sink_plugins, options, False)
            assert plan.parsed["sink"]["check"] is bool(options)
    assert made == [1, 1] and len([k for k in runtime._LOAD_PLANS if k[0] == id(program.manifest)]) == 2
    with pytest.raises(TypeError):
        plan.parsed["sink"]["check"] = False  # what a runtime's load receives is read-only too
    with pytest.raises(HandoffError, match="backend 'sink': .*check"):
        handoff.load(path, options={"sink": {"check": "maybe"}})
    monkeypatch.setenv(kitchen_sink.UNAVAILABLE_ENV, "sink")
    with pytest.raises(HandoffError, match=r"backend 'sink' cannot run here: switched off by \$HANDOFF_SINK_UNAVAILABLE$"):
        handoff.load(path)
    monkeypatch.delenv(kitchen_sink.UNAVAILABLE_ENV)
    plugins.set_plugins(plugins.Plugins(autoload=False))  # the kitchen sink uninstalled
    with pytest.raises(HandoffError, match="delegate 0 needs backend 'sink' not installed"):
        handoff.load(path)


def _no_reading(monkeypatch):
    """Fail when an open goes past the header: parses it, hashes or validates the manifest, or
    looks up the file's record."""
    from handoff import program

    def refuse(*args, **kwargs):
        raise AssertionError("an unchanged file this process opened before was read past its header again")

    for module, name in ((verified, "lookup"), (program, "_parse_header"), (program, "_read_manifest"),
                         (program.hashlib, "sha256")):
        monkeypatch.setattr(module, name, refuse)


def test_a_file_opened_before_in_this_process_is_read_only_to_its_header(tmp_path, monkeypatch):
    """The second open of an unchanged, recorded file in a process: no record lookup, no hash, no
    validation; the same manifest (one read-only object, shared by both opens), notes and
    unchecked segments."""
    path = _settled(tmp_path)
    with ProgramFile.open(path) as pf:
        strict, digest = pf.manifest, pf._manifest_sha256
        assert pf.remember_verified()
    _no_reading(monkeypatch)
    _no_checks(monkeypatch)
    with ProgramFile.open(path) as pf, ProgramFile.open(path) as again:
        assert pf.recorded and pf.manifest == strict and bytes(pf.segment(1)) == BLOB
        assert (pf._manifest_sha256, pf.notes[VALIDATED_NOTE]) == (digest, _validated_by())
        assert pf.manifest_offset == again.manifest_offset and pf.file_size == os.path.getsize(path)
        assert pf.manifest is again.manifest is strict
        with pytest.raises(TypeError, match="read-only"):
            pf.manifest["values"].clear()
        assert again.manifest == copy.deepcopy(strict) and len(again.manifest["values"]) == 3


def test_a_small_file_opened_before_is_read_only_to_its_header(tmp_path, monkeypatch):
    """A small (read, not mapped) recorded file opened again unchanged: only its header is read
    from disk, compared with the kept one, and the bytes the first open read are handed out again
    (the same immutable object); past the kept-bytes budget the oldest file is read whole again."""
    from handoff import program

    path, other = _settled(tmp_path), _settled(tmp_path, "other.hof")
    with ProgramFile.open(path) as pf:
        assert pf.remember_verified()
        first = pf._view.obj
    reads = []
    real = program._read_all
    monkeypatch.setattr(program, "_read_all", lambda fd, size, name: reads.append(size) or real(fd, size, name))
    with ProgramFile.open(path) as pf:
        assert pf.recorded and pf._view.obj is first and bytes(pf.segment(1)) == BLOB
    assert reads == [program.HEADER_SIZE]
    monkeypatch.setattr(program, "_KEEP_BYTES", os.path.getsize(path))  # room for one file's bytes
    with ProgramFile.open(other) as pf:
        assert pf.remember_verified()  # the newest: kept; the first file's bytes are dropped
    reads.clear()
    with ProgramFile.open(path) as pf, ProgramFile.open(other) as again:
        assert pf.recorded and again.recorded and bytes(pf.segment(1)) == bytes(again.segment(1)) == BLOB
    assert reads == [os.path.getsize(path), program.HEADER_SIZE]


@pytest.mark.parametrize("change", ["touched", "segment damaged", "manifest damaged"])
def test_a_file_changed_after_this_process_opened_it_is_checked_again(tmp_path, monkeypatch, change):
    """Opened (and recorded) twice in this process, then changed in place with its modification
    time put back (the change time still moves): the next open reads, hashes and validates it
    again, and damage is the usual one-line error."""
    from handoff import program

    path = _settled(tmp_path)
    for _ in range(2):
        with ProgramFile.open(path) as pf:
            assert pf.remember_verified()
            offset = {"segment damaged": pf.manifest["segments"][1]["offset"] + 3,
                      "manifest damaged": pf.manifest_offset + 2}.get(change)
    before = os.stat(path)
    if offset is None:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        verified.wait_until_not_racy(os.stat(path))
    else:
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x01]))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    calls = []
    for module, name in ((verified, "lookup"), (program, "_read_manifest"), (ProgramFile, "_verify")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    if change == "manifest damaged":
        with pytest.raises(ProgramFormatError, match=r"header\.manifest_sha256 at offset 48: does not match .*corrupted"):
            ProgramFile.open(path)
        return
    with ProgramFile.open(path) as pf:
        assert not pf.recorded and calls == ["lookup", "_read_manifest"]
        if change == "segment damaged":
            with pytest.raises(ProgramFormatError, match=r"segments\[1\]\.xxh3 at offset \d+: does not match .*corrupted"):
                pf.segment(1)
            return
        assert pf.remember_verified() and calls == ["lookup", "_read_manifest", "_verify", "_verify"]
    with ProgramFile.open(path) as pf:  # the touched file, checked and recorded again: known again
        assert pf.recorded and len(calls) == 4


def test_a_changed_program_loaded_before_gets_the_clear_error(sink_plugins, tmp_path):
    """End to end: a program loaded twice in this process, its delegate blob then damaged in place
    (modification time put back): the next load refuses it with the one-line error."""
    model, path = _sink_file(tmp_path)
    verified.wait_until_not_racy(os.stat(path))
    x = torch.randn(2, 8)
    for _ in range(2):
        with handoff.load(path) as program:
            np.testing.assert_allclose(program.run([x.numpy()])[0], model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
            entry = program.manifest["segments"][program.manifest["delegates"][0]["segment"]]
    assert program.file.recorded
    before = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(entry["offset"] + entry["length"] // 2)
        f.write(b"\xa5")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(ProgramFormatError) as info:
        handoff.load(path)
    assert "\n" not in str(info.value)
    assert f"segments[{program.manifest['delegates'][0]['segment']}].xxh3 at offset {entry['offset']}: does not match " \
           "the segment's bytes (file corrupted)" in str(info.value)


def test_what_this_process_opened_is_kept_per_handoff_home(tmp_path, monkeypatch):
    """Another ``$HANDOFF_HOME`` has other records: a file recorded under one is checked under another."""
    path = _settled(tmp_path)
    with ProgramFile.open(path) as pf:
        assert pf.remember_verified()
    monkeypatch.setenv("HANDOFF_HOME", str(tmp_path / "other-home"))
    with ProgramFile.open(path) as pf:
        assert not pf.recorded


def test_what_this_process_opened_never_stands_in_for_another_header(tmp_path, monkeypatch):
    """Should two files ever share a record key (they cannot: the key names the inode and times),
    the header is still compared: the second file is read and validated as itself."""
    monkeypatch.setattr(verified, "record_key", lambda st: "one-key-for-all")
    first = _settled(tmp_path, "first.hof")
    with ProgramFile.open(first) as pf:
        assert pf.remember_verified()
    other = tmp_path / "other.hof"
    write_program(str(other), {**MANIFEST, "metadata": {"model": "other"}}, [W.tobytes(), BLOB])
    with ProgramFile.open(other) as pf:
        assert pf.manifest["metadata"] == {"model": "other"}


def test_a_handoff_home_with_a_tilde_is_one_place_for_records_and_blob_memos(tmp_path, monkeypatch):
    """``$HANDOFF_HOME`` is resolved in one place (``cache.home_name``): records, blob memos and
    caches all land under the expanded path (records once went to a literal ``~`` directory)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HANDOFF_HOME", "~/hh")
    monkeypatch.setattr(probe, "_KNOWN", set())
    assert verified.directory_name() == str(tmp_path / "hh" / "verified")
    key = "ab" * 32
    probe.remember("sink", key)
    assert (tmp_path / "hh" / "verified" / "sink" / key).is_file()
    probe._KNOWN.clear()
    assert probe.is_known("sink", key)
    path = _settled(tmp_path)
    with ProgramFile.open(path) as pf:
        assert pf.remember_verified()
    assert any(p.name != "sink" for p in (tmp_path / "hh" / "verified").iterdir())
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
def test_a_recorded_file_names_its_blobs_the_same_on_every_open(tmp_path, monkeypatch, mapped):
    """``handoff.blob_key``: a file's blobs (segments as the core hands them to ``Runtime.load``)
    get a key once the file is recorded, the same key on every later open of the unchanged file
    (mapped anew, or read into memory), another key for another segment or file, and none once
    the file changed, for a copy or a slice of a blob, a segment read for anything else, or a
    program given as bytes."""
    from handoff import blob_key, program

    monkeypatch.setattr(program, "READ_BELOW_BYTES", 0 if mapped else 1 << 20)
    path, other = _settled(tmp_path), _settled(tmp_path, "other.hof")
    with ProgramFile.open(path) as pf:
        assert (pf._mmap is not None) == mapped and blob_key(pf._blob(1)) is None  # not recorded yet
        assert pf.remember_verified()
        first = blob_key(pf._blob(1))
        assert first is not None and blob_key(pf._blob(0)) not in (None, first)
    with ProgramFile.open(path) as pf, ProgramFile.open(other) as again:
        assert again.remember_verified()
        blob = pf._blob(1)
        assert blob_key(blob) == first and blob_key(pf._blob(1)) == first
        assert blob_key(pf.segment(1)) is None  # a segment read for anything else (a constant): not named
        assert blob_key(again._blob(1)) not in (None, first)  # the same bytes in another file
        assert blob_key(memoryview(bytes(blob))) is None and blob_key(blob[1:]) is None  # not what the core gave
        del blob
    with open(path, "rb") as f:
        assert blob_key(ProgramFile.from_bytes(f.read())._blob(1)) is None
    before = os.stat(path)
    with open(path, "r+b") as f:  # changed in place, modification time put back
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(last)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    verified.wait_until_not_racy(os.stat(path))
    with ProgramFile.open(path) as pf:
        assert not pf.recorded and blob_key(pf._blob(1)) is None
        assert pf.remember_verified()
        changed = blob_key(pf._blob(1))
        assert changed not in (None, first)
    assert not any(key[1] in (first[1], changed[1]) for _, key in program._NAMED.values())  # gone with the views
