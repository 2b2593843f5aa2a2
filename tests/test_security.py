"""Issue 10's findings, one regression test each where another file does not already hold one
(host ops: test_hostops.py; signing, native code, cache poisoning, .pt2 pickles: test_signing.py;
run failures and threads: test_runtime.py and the plugins' tests; fuzzing: test_fuzz.py).

Each test builds the hostile input the finding describes and checks for the one-line error (or
the safe behaviour) instead of the crash, hang, allocation or file-system write.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import handoff
from handoff import HandoffError
from handoff.cli import main
from handoff.program import ProgramFile, program_bytes


def identity_program(shape: list[int], name: str = "y", dtype: str = "float32", metadata: dict | None = None) -> bytes:
    """A data-only program: input x -> aten.clone -> output ``name``, of ``dtype[shape]``."""
    manifest = {
        "handoff_version": handoff.__version__, "metadata": metadata or {},
        "values": [{"dtype": dtype, "shape": shape}, {"dtype": dtype, "shape": shape}],
        "inputs": [{"name": "x", "value": 0}], "outputs": [{"name": name, "value": 1}],
        "constants": [], "delegates": [],
        "instructions": [{"op": "aten", "target": "aten.clone.default", "args": [{"value": 0}], "kwargs": {},
                          "outputs": [1]}],
    }
    return program_bytes(manifest, [])


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("handoff: error: "), err
    return lines[0]


# -- bounds ----------------------------------------------------------------------------------------


def test_run_without_inputs_refuses_random_inputs_past_the_cap(tmp_path, capsys):
    """2 GiB declared input: was 34 s and 6.5 GB RSS; now one line before allocating."""
    path = tmp_path / "big.hof"
    path.write_bytes(identity_program([1 << 29]))
    code, _, err = _run(capsys, "run", str(path))
    line = one_error_line(err)
    assert code == 1 and "random inputs would take 2 GiB" in line and "HANDOFF_MAX_RANDOM_INPUT_BYTES" in line
    assert "--input" in line


def test_a_program_declaring_a_terabyte_is_refused_at_load(tmp_path, capsys):
    """1 TiB declared input: was 'internal error'; now refused at load by the run-bytes cap."""
    data = identity_program([1 << 19, 1 << 19])
    with pytest.raises(HandoffError, match=r"a run would hold 2 TiB .* more than the 16 GiB cap; .*HANDOFF_MAX_RUN_BYTES"):
        handoff.load(data)
    path = tmp_path / "huge.hof"
    path.write_bytes(data)
    code, _, err = _run(capsys, "run", str(path))
    assert code == 1 and "HANDOFF_MAX_RUN_BYTES" in one_error_line(err)


def test_caps_can_be_raised_and_are_checked(monkeypatch):
    from handoff import limits

    monkeypatch.setenv(limits.MAX_RUN_BYTES, "4T")
    assert limits.cap(limits.MAX_RUN_BYTES) == 4 << 40
    with handoff.load(identity_program([1 << 19, 1 << 19])) as program:  # declared, not allocated
        assert program.input_specs[0][1] == (1 << 19, 1 << 19)
    monkeypatch.setenv(limits.MAX_RUN_BYTES, "lots")
    with pytest.raises(HandoffError, match="HANDOFF_MAX_RUN_BYTES='lots' is not a byte count"):
        limits.cap(limits.MAX_RUN_BYTES)


@pytest.mark.parametrize("shape, message", [
    ("100000x100000", "the example input would take 37.3 GiB, more than the 1 GiB cap"),
    ("3000000000x1", "dimensions must be below 2147483648"),
    ("1x-3", "dimensions must be >= 0"),
])
def test_input_shape_is_bounded(shape, message, capsys):
    """`--input-shape 100000x100000` was an internal error after export started."""
    code, _, err = _run(capsys, "partition", "zoo:small_cnn", f"--input-shape={shape}", "--backends", "tvm")
    assert code == 1 and message in one_error_line(err)


# -- files -----------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path, capsys):
    fifo = tmp_path / "p.hof"
    os.mkfifo(fifo)
    result: list = []
    thread = threading.Thread(target=lambda: result.append(_run(capsys, "run", str(fifo))), daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "handoff run hung on a FIFO"
    code, _, err = result[0]
    assert code == 1 and "it is a FIFO (named pipe), not a regular file" in one_error_line(err)


@pytest.mark.parametrize("path, kind", [("/dev/zero", "a character device"), ("/", "a directory")])
def test_non_regular_files_are_refused_without_reading(path, kind):
    if not os.path.exists(path):
        pytest.skip(f"{path} does not exist here")
    with pytest.raises(HandoffError, match=f"it is {kind}, not a regular file"):
        ProgramFile.open(path)


def test_save_outputs_never_writes_outside_its_directory(tmp_path, capsys):
    """Output names come from the file: `../x` and absolute paths must stay inside --save-outputs."""
    outs = tmp_path / "outs"
    for i, name in enumerate(["../escaped", str(tmp_path / "absolute"), ".hidden", "a/b\\c", "\x1b[31mred"]):
        program = tmp_path / f"p{i}.hof"
        program.write_bytes(identity_program([2], name=name))
        code, _, err = _run(capsys, "run", str(program), "--save-outputs", str(outs))
        assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outs", "p0.hof", "p1.hof", "p2.hof", "p3.hof", "p4.hof"]
    saved = sorted(p.name for p in outs.iterdir())
    assert all(not n.startswith(".") and "/" not in n for n in saved) and len(saved) == 5, saved
    assert "escaped.npy" not in os.listdir(tmp_path)


def test_output_path_is_checked_before_any_work(tmp_path, capsys):
    """An output in a missing directory failed only after export and lowering, as 'internal error'."""
    code, _, err = _run(capsys, "partition", "zoo:small_cnn", "--backends", "tvm", "-o", str(tmp_path / "no" / "m.hof"))
    line = one_error_line(err)
    assert code == 1 and "-o" in line and "internal error" not in line
    assert "No such file or directory" in line or "does not exist" in line


def test_a_replaced_program_keeps_the_old_files_mode(tmp_path):
    from handoff.program import write_program

    path = tmp_path / "m.hof"
    path.write_bytes(b"old")
    path.chmod(0o640)
    manifest = {"handoff_version": handoff.__version__, "metadata": {}, "values": [{"dtype": "float32", "shape": [1]}],
                "inputs": [{"name": "x", "value": 0}], "outputs": [{"name": "y", "value": 0}], "constants": [],
                "delegates": [], "instructions": []}
    write_program(str(path), manifest, [])
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert not [p for p in tmp_path.iterdir() if p.name != "m.hof"], "temporary file left behind"


# -- temporary files -------------------------------------------------------------------------------


def test_a_killed_process_leaves_temporary_files_that_the_next_one_sweeps(tmp_path, monkeypatch):
    """A killed partition left /tmp/handoff-tvm-*, lib0.o, .NAME.hof.*.tmp; names now carry the
    PID, and the next process making the same kind removes the dead process's."""
    from handoff import tempfiles

    monkeypatch.setattr(tempfiles.tempfile, "tempdir", str(tmp_path))
    code = ("import os, handoff.tempfiles as t, tempfile; tempfile.tempdir = %r\n"
            "cm = t.temp_dir('tvm'); d = cm.__enter__(); (d / 'lib0.o').write_bytes(b'x')\n"
            "fd, p = t.create_file(%r, '.m.hof.', '.tmp'); print(d, p, flush=True); os._exit(9)  # killed"
            % (str(tmp_path), str(tmp_path)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    left_dir, left_file = proc.stdout.split()
    assert Path(left_dir, "lib0.o").exists() and Path(left_file).exists()

    tempfiles._swept.clear()
    with tempfiles.temp_dir("tvm") as mine:
        assert not Path(left_dir).exists(), "a dead process's temporary directory was not swept"
        assert mine.exists()
    fd, path = tempfiles.create_file(str(tmp_path), ".m.hof.", ".tmp")
    os.close(fd)
    os.unlink(path)
    assert not Path(left_file).exists(), "a dead process's temporary file was not swept"


def test_files_written_atomically_leave_nothing_when_the_writer_fails_or_is_killed(tmp_path, monkeypatch):
    """Records, cache entries and the tuning timings go through ``handoff.write_atomic``; the
    records' own writer used ``tempfile.mkstemp``, whose ``.tmp-*`` files a killed process left
    in ``$HANDOFF_HOME/verified`` for good (pruning skips dot files)."""
    from handoff import tempfiles, verified, write_atomic

    target = tmp_path / "entry.json"
    write_atomic(target, b"old")
    assert target.read_bytes() == b"old" and (target.stat().st_mode & 0o777) == 0o600

    class Full(Exception):
        pass

    def fail(*_):
        raise Full()

    monkeypatch.setattr(tempfiles.os, "replace", fail)
    with pytest.raises(Full):
        write_atomic(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["entry.json"]

    records = tmp_path / "home" / "verified"
    records.mkdir(parents=True)
    code = ("import os, handoff.tempfiles as t\n"
            "fd, p = t.create_file(%r, '.tmp-'); os.write(fd, b'half a rec'); print(p, flush=True); os._exit(9)"
            % str(records))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    left = Path(proc.stdout.strip())
    assert left.exists()
    monkeypatch.setenv("HANDOFF_HOME", str(tmp_path / "home"))
    tempfiles._swept.clear()
    program = tmp_path / "m.hof"
    program.write_bytes(identity_program([2]))
    st = program.stat()
    assert verified._write_record(st, b"\x01" * 32, {"note": "kept"})
    assert not left.exists(), "a killed writer's temporary record was not swept"
    assert verified.lookup(st, b"\x01" * 32) == {"note": "kept"}
    assert sorted(p.name for p in records.iterdir()) == [verified.record_key(st)]


def test_sweeping_never_touches_a_live_process_s_files(tmp_path):
    from handoff import tempfiles

    live = tmp_path / f"handoff-tvm-{os.getppid()}-abcd1234"
    live.mkdir()
    assert tempfiles.sweep(tmp_path, "handoff-tvm-") == 0 and live.exists()


# -- the command line ------------------------------------------------------------------------------


def test_inspect_into_a_closed_pipe_is_quiet(tmp_path):
    """`handoff inspect --json | head -1` ended in a BrokenPipeError traceback."""
    path = tmp_path / "m.hof"
    path.write_bytes(identity_program([2], metadata={"note": "x" * (1 << 20)}))  # more than a pipe holds
    cli = [sys.executable, "-c", "import sys; from handoff.cli import main; sys.exit(main())", "inspect", "--json",
           str(path)]
    proc = subprocess.run(f"{' '.join(map(repr, cli))} | head -c 1", shell=True, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout == "{" and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_names_from_a_file_cannot_drive_the_terminal(tmp_path, capsys):
    path = tmp_path / "m.hof"
    path.write_bytes(identity_program([2], name="\x1b]0;pwned\x07\x1b[2J"))
    code, out, _ = _run(capsys, "inspect", str(path))
    assert code == 0 and "\x1b" not in out and "\\x1b" in out


# -- vendor runtimes that crash on a bad blob ------------------------------------------------------


@pytest.fixture
def fragile_plugins():
    import fragile
    from handoff import plugins

    pm = plugins.Plugins(autoload=False)
    pm.register(fragile, name="fragile")
    plugins.set_plugins(pm)
    return pm


def fragile_program(blob: bytes) -> bytes:
    manifest = {
        "handoff_version": handoff.__version__, "metadata": {},
        "values": [{"dtype": "float32", "shape": [2]}, {"dtype": "float32", "shape": [2]}],
        "inputs": [{"name": "x", "value": 0}], "outputs": [{"name": "y", "value": 1}], "constants": [],
        "delegates": [{"backend": "fragile", "backend_version": "1.0", "segment": 0, "partition": "fragile_0",
                       "metadata": {}, "options": {}}],
        "instructions": [{"op": "delegate", "delegate": 0, "inputs": [0], "outputs": [1]}],
    }
    return program_bytes(manifest, [blob])


@pytest.mark.parametrize("blob, how", [(b"ABORT", "SIGABRT"), (b"SEGV", "SIGSEGV")])
def test_a_runtime_that_crashes_on_a_blob_raises_instead(fragile_plugins, blob, how):
    """Mutated xnnpack blobs aborted the process (2 of 80); blobs not made here are now loaded
    in a separate process first."""
    with pytest.raises(HandoffError, match=rf"delegate 0 \(fragile_0, backend 'fragile', segment 0 at offset 128\): "
                                           rf"the vendor runtime crashed on this blob \({how}.*re-partition the model"):
        handoff.load(fragile_program(blob))


def test_a_runtime_that_hangs_on_a_blob_raises_instead(fragile_plugins, monkeypatch):
    from handoff import probe

    monkeypatch.setattr(probe, "TIMEOUT_SECONDS", 3)
    with pytest.raises(HandoffError, match=r"delegate 0 \(fragile_0, backend 'fragile', segment 0 at offset 128\) "
                                           r"hung: .*over 3 s"):
        handoff.load(fragile_program(b"HANG"))


def test_a_probed_blob_is_remembered_and_errors_stay_one_line(fragile_plugins, monkeypatch):
    from handoff import probe

    with pytest.raises(HandoffError, match="failed to load: ValueError: fragile: the blob says no"):
        handoff.load(fragile_program(b"RAISE"))
    data = fragile_program(b"good blob")
    with handoff.load(data) as program:
        assert program.run([np.ones(2, np.float32)])[0].tolist() == [1.0, 1.0]

    def no_second_probe(*args, **kwargs):
        raise AssertionError("a blob that passed was probed again")

    monkeypatch.setattr(probe.subprocess, "Popen", no_second_probe)
    handoff.load(data).close()


def test_a_recorded_file_keeps_its_blob_keys_and_a_copy_is_hashed_again(fragile_plugins, tmp_path, monkeypatch):
    """The verified-file record keeps each probed blob's key, so loads of the unchanged file skip
    hashing the blob; any other file (here a copy: another inode) is hashed and looked up again."""
    from handoff import probe, verified

    path = tmp_path / "p.hof"
    path.write_bytes(fragile_program(b"good blob"))
    verified.wait_until_not_racy(os.stat(path))
    handoff.load(path).close()  # probes the blob, records the file with the blob's key
    hashed = []
    real_key = probe.blob_key
    monkeypatch.setattr(probe, "blob_key", lambda *a: hashed.append(a) or real_key(*a))
    monkeypatch.setattr(probe.subprocess, "Popen", lambda *a, **k: pytest.fail("a known blob was probed again"))
    with handoff.load(path) as program:
        assert program.file.recorded
        assert program.run([np.ones(2, np.float32)])[0].tolist() == [1.0, 1.0]
    assert hashed == []
    copy = tmp_path / "copy.hof"
    copy.write_bytes(path.read_bytes())
    handoff.load(copy).close()
    assert len(hashed) == 1


def test_a_known_blob_is_looked_up_once_per_process_and_home(fragile_plugins, tmp_path, monkeypatch):
    """A blob key this process probed (or found known) is not looked up on disk again; under
    another ``$HANDOFF_HOME`` (other memos) it is looked up, and probed when unknown there."""
    from handoff import probe

    data = fragile_program(b"known once")
    handoff.load(data).close()  # probed and remembered
    monkeypatch.setattr(probe.os.path, "isfile", lambda p: pytest.fail(f"a known blob was looked up again: {p}"))
    monkeypatch.setattr(probe.subprocess, "Popen", lambda *a, **k: pytest.fail("a known blob was probed again"))
    with handoff.load(data) as program:
        assert program.run([np.ones(2, np.float32)])[0].tolist() == [1.0, 1.0]
    monkeypatch.undo()
    monkeypatch.setenv("HANDOFF_HOME", str(tmp_path / "other-home"))
    probed = []
    real_popen = probe.subprocess.Popen
    monkeypatch.setattr(probe.subprocess, "Popen", lambda *a, **k: probed.append(1) or real_popen(*a, **k))
    handoff.load(data).close()
    assert probed == [1]
