"""handoff.load / Program.run: lazy backends, missing backends, bad inputs, host ops without torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import handoff
from handoff import plugins
from handoff.errors import HandoffError
from handoff.program import ProgramFile, write_program


@pytest.fixture
def sink_program(sink_plugins, tmp_path):
    import kitchen_sink

    model = kitchen_sink.sink_net()
    result = handoff.partition(model, (torch.randn(2, 8),), backends=["sink"], fallback=False)
    path = tmp_path / "sink.hof"
    result.write(str(path))
    return path, model


def _rewrite(path, tmp_path, edit):
    with ProgramFile.open(str(path)) as pf:
        manifest = {k: v for k, v in pf.manifest.items() if k != "segments"}
        segments = [bytes(pf.segment(i)) for i in range(len(pf.manifest["segments"]))]
    edit(manifest)
    out = tmp_path / "edited.hof"
    write_program(str(out), manifest, segments)
    return out


def test_runs_and_matches_eager(sink_program):
    path, model = sink_program
    x = torch.randn(2, 8)
    with handoff.load(path) as program:
        assert program.input_specs == [("x", (2, 8), "float32")]
        got = program.run({"x": x.numpy()})
        got_t = program.run([x])  # torch tensors are accepted too
    want = model(x).detach().numpy()
    np.testing.assert_allclose(got[0], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[0], got_t[0])


def test_delegates_initialised_once_and_released(sink_program):
    import kitchen_sink

    path, _ = sink_program
    before_load, before_release = kitchen_sink.SinkRuntime.loaded, kitchen_sink.SinkRuntime.released
    program = handoff.load(path)
    n = len(program.manifest["delegates"])
    for _ in range(3):
        program.run([np.random.randn(2, 8).astype(np.float32)])
    assert kitchen_sink.SinkRuntime.loaded - before_load == n
    program.close()
    program.close()
    assert kitchen_sink.SinkRuntime.released - before_release == n
    with pytest.raises(HandoffError, match="program is closed"):
        program.run([np.zeros((2, 8), np.float32)])


def test_missing_backend_at_run_time_names_it_and_the_install_hint(sink_program, tmp_path):
    path, _ = sink_program
    plugins.set_plugins(plugins.Plugins(autoload=False))  # the kitchen sink is not installed here
    with pytest.raises(HandoffError) as err:
        handoff.load(path)
    assert str(err.value) == (f"{path}: delegate 0 needs backend 'sink' not installed; installed: tvm; "
                              "known backends: tvm, xnnpack, qnn, coreml, vulkan")
    qnn = _rewrite(path, tmp_path, lambda m: [d.update(backend="qnn") for d in m["delegates"]])
    with pytest.raises(HandoffError) as err:
        handoff.load(qnn)
    assert str(err.value) == (f"{qnn}: delegate 0 needs backend 'qnn' not installed; installed: tvm; "
                              "install with: pip install ./plugins/qnn")


def test_unavailable_runtime_says_why(sink_program, monkeypatch):
    import kitchen_sink

    path, _ = sink_program
    monkeypatch.setattr(kitchen_sink.SinkRuntime, "is_available", lambda self: (False, "no sink hardware"))
    with pytest.raises(HandoffError, match=r"backend 'sink' cannot run here: no sink hardware$"):
        handoff.load(path)


def test_bad_inputs_are_clear(sink_program):
    path, _ = sink_program
    with handoff.load(path) as program:
        with pytest.raises(HandoffError, match=r"^input 'x': expected float32\[2, 8\], got float64\[2, 8\]$"):
            program.run([np.zeros((2, 8))])
        with pytest.raises(HandoffError, match=r"^program takes 1 input\(s\) \(x\), got 2$"):
            program.run([np.zeros((2, 8), np.float32)] * 2)
        with pytest.raises(HandoffError, match=r"missing \['x'\], unknown \['y'\]"):
            program.run({"y": np.zeros((2, 8), np.float32)})


def test_runtime_options_are_checked(sink_program):
    path, _ = sink_program
    with pytest.raises(HandoffError, match="^backend 'sink' has no runtime option 'turbo'; valid runtime options: check$"):
        handoff.load(path, options={"sink": {"turbo": "1"}})
    with pytest.raises(HandoffError, match=r"no runtime option 'fuse' \('fuse' is a compile option\)"):
        handoff.load(path, options={"sink": {"fuse": "1"}})
    with handoff.load(path, options={"sink": {"check": "1"}}) as program:
        program.run([np.zeros((2, 8), np.float32)])
    with pytest.raises(HandoffError, match="options given for backend 'tvm', which this program does not use; it uses: sink"):
        handoff.load(path, options={"tvm": {"target": "host"}})


def test_unknown_host_op_is_refused(sink_program, tmp_path):
    path, _ = sink_program

    def edit(m):
        for ins in m["instructions"]:
            if ins["op"] == "aten":
                ins["target"] = "os.system.default"

    bad = _rewrite(path, tmp_path, edit)
    with pytest.raises(HandoffError, match=r"instruction \d+: host op 'os.system.default' is in namespace 'os', which "
                                           r"the runtime never runs on the host \(namespaces: aten, quantized_decomposed\)"):
        handoff.load(bad)


def test_host_ops_without_torch_give_install_hint(sink_program, tmp_path):
    path, _ = sink_program
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        sys.path.insert(0, {str(tmp_path.parent)!r})
        import handoff
        from handoff import plugins
        pm = plugins.Plugins(autoload=False, extra=["kitchen_sink"])
        try:
            handoff.load({str(path)!r}, plugins=pm)
        except handoff.HandoffError as exc:
            print(exc)
    """)
    env = {"PYTHONPATH": str(__import__("pathlib").Path(__file__).parent / "plugins"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert out == (f"{path}: 1 host ATen op(s) (aten.sin.default) need torch, which is not installed; "
                   "install with: pip install torch==2.13.0, or re-partition with --no-aten")
