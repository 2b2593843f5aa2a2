"""The command line: exit codes, one-line errors, and each subcommand's output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from handoff.cli import main, partition_main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_partition_run_inspect_roundtrip(sink_plugins, capsys, tmp_path):
    out_path, report_path = tmp_path / "m.hof", tmp_path / "r.json"
    code, out, err = _run(capsys, "partition", "zoo:sink_net", "--backends", "sink", "--no-fallback", "-o", str(out_path),
                          "--report", str(report_path), "--option", "sink.ops=aten.mul.Tensor,aten.add.Tensor,"
                          "aten.relu.default,aten.sin.default")
    assert code == 0, err
    assert "Delegation report: zoo:sink_net" in out and f"wrote {out_path}" in out
    report = json.loads(report_path.read_text())
    assert report["per_backend"]["sink"]["coverage_percent"] == 100.0

    np.save(tmp_path / "x.npy", np.ones((2, 8), np.float32))
    code, out, err = _run(capsys, "run", str(out_path), "--input", str(tmp_path / "x.npy"), "--bench", "5",
                          "--save-outputs", str(tmp_path / "outs"))
    assert code == 0, err
    assert "loaded in" in out and "5 runs: p50" in out and "p90" in out
    assert (tmp_path / "outs").is_dir()

    code, out, err = _run(capsys, "run", str(out_path), "--json")
    summary = json.loads(out)
    assert summary["inputs"] == "random (seed 0)" and summary["outputs"][0]["shape"] == [2, 8]

    code, out, err = _run(capsys, "inspect", str(out_path))
    assert code == 0 and "handoff program format 1.5" in out and "delegate[sink 9.9] sink_0" in out
    assert "segments (" in out


def test_partition_console_script_is_the_same_command(sink_plugins, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert partition_main(["zoo:sink_net", "--backends", "sink", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == "sink_net.hof"
    assert (tmp_path / "sink_net.hof").exists()


@pytest.mark.parametrize("argv, message", [
    (["partition", "zoo:nope", "--backends", "sink"], "handoff: error: unknown zoo model 'nope'; zoo models: "),
    (["partition", "zoo:sink_net", "--backends", "qnn"],
     "handoff: error: backend 'qnn' not installed; installed: sink, sinkb, tvm; install with: pip install ./plugins/qnn"),
    (["partition", "zoo:sink_net", "--option", "sink"], "handoff: error: --option 'sink': expected BACKEND.NAME=VALUE"),
    (["partition", "zoo:sink_net", "--input-shape", "1xA"], "handoff: error: --input-shape '1xA': expected dimensions"),
    (["partition", "zoo:sink_net", "--min-partition-size", "x=0"], "handoff: error: --min-partition-size 'x=0': must be at least 1"),
    (["partition", "zoo:sink_net", "--backends", "sink", "--max-partitions", "qnn=2"],
     "handoff: error: partition limits given for backend 'qnn', which is not selected"),
    (["partition", "missing.pt2"], "handoff: error: missing.pt2: no such file"),
    (["partition", "model.onnx"], "handoff: error: cannot read model 'model.onnx'; give a .pt2 file"),
    (["run", "nothere.hof"], "handoff: error: "),
])
def test_errors_are_one_line_exit_1(sink_plugins, capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    assert code == 1
    assert err.startswith(message), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_debug_shows_traceback(sink_plugins, capsys):
    code, out, err = _run(capsys, "partition", "zoo:nope", "--debug")
    assert code == 1 and "Traceback" in err


def test_usage_error_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["partition"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: the following arguments are required: model" in err and err.count("\n") == 1


def test_corrupt_program_is_one_line(sink_plugins, capsys, tmp_path):
    bad = tmp_path / "bad.hof"
    bad.write_bytes(b"\x89HOF\r\n\x1a\n" + b"\x00" * 10)
    code, out, err = _run(capsys, "run", str(bad))
    assert code == 1 and err.startswith(f"handoff: error: {bad}: invalid program file: ") and err.count("\n") == 1
    code, out, err = _run(capsys, "inspect", str(bad))
    assert code == 1 and "invalid program file" in err


def test_python_file_model_source(sink_plugins, capsys, tmp_path):
    src = tmp_path / "mine.py"
    src.write_text("import torch\n"
                   "class Net(torch.nn.Module):\n"
                   "    def forward(self, x):\n"
                   "        return torch.relu(x * 2.0)\n"
                   "def example_inputs():\n"
                   "    return (torch.randn(3, 4),)\n")
    code, out, err = _run(capsys, "partition", f"{src}:Net", "--backends", "sink", "--no-fallback",
                          "-o", str(tmp_path / "mine.hof"))
    assert code == 0, err
    code, out, err = _run(capsys, "partition", f"{src}:Nope", "--backends", "sink")
    assert code == 1 and "has no 'Nope'; nn.Module classes there: Net" in err
    src.write_text(src.read_text().replace("def example_inputs", "def _unused"))
    code, out, err = _run(capsys, "partition", f"{src}:Net", "--backends", "sink")
    assert code == 1 and "no inputs known; pass --input-shape" in err
    code, out, err = _run(capsys, "partition", f"{src}:Net", "--backends", "sink", "--no-fallback",
                          "--input-shape", "5x6", "-o", str(tmp_path / "m2.hof"))
    assert code == 0, err


def test_pt2_model_source(sink_plugins, capsys, tmp_path):
    import torch

    class Net(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x + 1.0)

    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(Net(), (torch.randn(2, 3),)), str(path))
    code, out, err = _run(capsys, "partition", str(path), "--backends", "sink", "--no-fallback",
                          "-o", str(tmp_path / "net.hof"))
    assert code == 0, err
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a zip")
    code, out, err = _run(capsys, "partition", str(garbage), "--backends", "sink")
    assert code == 1 and err == f"handoff: error: {garbage}: not a torch.export.save file (not a zip archive); write it with torch.export.save\n"


def test_backends_command(sink_plugins, capsys):
    code, out, err = _run(capsys, "backends", "--json")
    data = json.loads(out)
    ids = [b["id"] for b in data["backends"]]
    assert ids[-1] == "tvm" and "sink" in ids
    assert {m["id"] for m in data["not_installed"]} == {"xnnpack", "qnn", "coreml", "vulkan"}
    code, out, err = _run(capsys, "backends")
    assert code == 0 and "not installed: qnn (install with: pip install ./plugins/qnn)" in out


def test_installed_console_scripts_exist():
    bindir = Path(sys.executable).parent
    for script in ("handoff", "partition"):
        exe = bindir / script
        assert exe.exists(), f"{script} console script missing: pip install -e ."
    env = {**os.environ, "HANDOFF_DISABLE_PLUGIN_AUTOLOAD": "1"}
    res = subprocess.run([str(bindir / "partition"), "--help"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "model.pt2 | path/file.py:Name | zoo:NAME" in res.stdout


def test_backends_runnable_lists_vendor_backends_for_make_demo(sink_plugins, capsys):
    code, out, err = _run(capsys, "backends", "--runnable")
    assert code == 0 and out == "sink,sinkb\n"  # tvm is the fallback, never listed
