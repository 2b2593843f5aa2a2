"""Remote devices: a real TVM RPC tracker and ``handoff serve`` processes on 127.0.0.1.

One tracker and three servers for the module (two under ``dev-a`` that allow tuning, one
under ``dev-b`` that does not), each in its own process group, killed at the end. The servers
have a home of their own: they trust the client's key only through ``--trusted-keys``. They load
the kitchen-sink plugin too (``$HANDOFF_PLUGINS``); on ``dev-b`` its ``sinkb`` runtime is
switched off, so that ``compare --rpc`` meets a device lacking a backend.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import handoff
from handoff import HandoffError
from handoff.cli import main
from handoff.remote import Tracker, key_targets, parse_address, remote_info, run_remote


class Tiny(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x @ x.transpose(0, 1)) * 2.0 + 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the server and the session processes it forked
    proc.wait(timeout=30)


def _wait_for(what: str, check, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


class Pool:
    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.client_home = root / "client"
        self.trusted = root / "trusted"
        plugins = str(Path(__file__).parent / "plugins")
        self.env = {**os.environ, "HANDOFF_HOME": str(root / "server"), "HANDOFF_DISABLE_PLUGIN_AUTOLOAD": "1",
                    "HANDOFF_PLUGINS": "kitchen_sink",
                    "PYTHONPATH": os.pathsep.join(p for p in (plugins, os.environ.get("PYTHONPATH")) if p)}
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        self.procs.append(_spawn([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                                  str(port), "--port-end", str(port + 1), "--silent"], root / "tracker.log", self.env))

        def up() -> bool:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            return False

        _wait_for("the tracker", up)
        self.logs: dict[str, Path] = {}

    def serve(self, name: str, key: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        port = _free_port()
        self.logs[name] = self.root / f"{name}.log"
        proc = _spawn([sys.executable, "-m", "handoff.cli", "serve", "--tracker", self.address, "--key", key,
                       "--port", str(port), "--port-end", str(port + 1), "--trusted-keys", str(self.trusted), *extra],
                      self.logs[name], {**self.env, **(env or {})})
        self.procs.append(proc)
        return proc

    def wait_registered(self, counts: dict[str, int]) -> None:
        def registered() -> bool:
            with Tracker(self.address) as t:
                s = t.summary()
            return all(s.get(k, {}).get("servers", 0) >= n for k, n in counts.items())

        _wait_for(f"servers {counts}", registered)

    def close(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    p = Pool(root)
    try:
        with pytest.MonkeyPatch.context() as mp:  # the client's key, which the servers trust
            mp.setenv("HANDOFF_HOME", str(p.client_home))
            from handoff.signing import local_key

            p.trusted.mkdir()
            (p.trusted / "client.pem").write_bytes(local_key().public_pem())
        p.serve("a1", "dev-a", "--allow-tuning")
        p.serve("a2", "dev-a", "--allow-tuning")
        p.serve("b", "dev-b", env={"HANDOFF_SINK_UNAVAILABLE": "sinkb"})
        p.wait_registered({"dev-a": 2, "dev-b": 1})
        yield p
    finally:
        p.close()


@pytest.fixture
def client(pool, monkeypatch):
    monkeypatch.setenv("HANDOFF_HOME", str(pool.client_home))
    return pool


@pytest.fixture(scope="module")
def program(pool):
    """A one-delegate tvm program (native code) signed by the client's key, as bytes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HANDOFF_HOME", str(pool.client_home))
        result = handoff.partition(Tiny(), (torch.randn(6, 8),), backends=["tvm"],
                                   default_limits=handoff.Limits(min_size=1), use_cache=False)
        return result.to_bytes()


def test_a_remote_run_matches_the_local_run_bit_for_bit_on_every_key(client, program):
    x = np.random.default_rng(3).standard_normal((6, 8)).astype(np.float32)
    with handoff.load(program) as local:
        (want,) = local.run([x])
    np.testing.assert_allclose(want, Tiny()(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)
    for key in ("dev-a", "dev-b"):
        result = run_remote(program, client.address, key, [x], bench=3, warmup=1)
        assert result.key == key
        (got,) = result.outputs
        assert got.dtype == want.dtype and np.array_equal(got, want)
        assert len(result.times_ms) == 3 and all(t > 0 for t in result.times_ms)
        assert result.load_ms > 0 and result.first_run_ms > 0
        assert result.trust.startswith("signed by key ") and "trusted" in result.trust


def test_cli_run_on_a_device(client, program, tmp_path, capsys):
    path = tmp_path / "tiny.hof"
    path.write_bytes(program)
    assert main(["run", str(path), "--json", "--save-outputs", str(tmp_path / "local")]) == 0
    capsys.readouterr()
    assert main(["run", str(path), "--rpc", client.address, "--key", "dev-b", "--bench", "2", "--json",
                 "--save-outputs", str(tmp_path / "remote")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "ran on device 'dev-b'" in summary["inputs"] and summary["bench"]["runs"] == 2
    assert np.array_equal(np.load(tmp_path / "remote" / "output_0.npy"), np.load(tmp_path / "local" / "output_0.npy"))

    assert main(["run", str(path), "--rpc", client.address]) == 1
    assert "--rpc HOST:PORT and --key KEY go together" in capsys.readouterr().err
    assert main(["run", str(path), "--rpc", client.address, "--key", "dev-b", "--allow-unsigned"]) == 1
    assert "a device trusts and loads what its handoff serve was told to" in capsys.readouterr().err


def test_the_device_applies_its_own_trust_rules(client, program, tmp_path, monkeypatch):
    """A program signed by a key the device does not trust carries native code it refuses to load."""
    monkeypatch.setenv("HANDOFF_HOME", str(tmp_path / "stranger"))
    stranger = handoff.partition(Tiny(), (torch.randn(6, 8),), backends=["tvm"],
                                 default_limits=handoff.Limits(min_size=1), use_cache=False).to_bytes()
    x = np.ones((6, 8), np.float32)
    with pytest.raises(HandoffError) as err:
        run_remote(stranger, client.address, "dev-b", [x])
    msg = str(err.value)
    assert msg.startswith(f"device 'dev-b' (via the RPC tracker {client.address}):")
    assert "is native code" in msg and "--trusted-keys" in msg and "\n" not in msg
    with pytest.raises(HandoffError, match=r"device 'dev-b' .*takes 1 input"):
        run_remote(program, client.address, "dev-b", [x, x])
    with pytest.raises(HandoffError, match=r"device 'dev-b' .*invalid program file"):
        run_remote(b"HOF\0garbage", client.address, "dev-b", [x])


def test_a_session_refuses_tvms_file_and_code_functions(client):
    import tvm

    from handoff.remote import _rpc_reason

    library = str(Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so")  # real, on this machine and the device
    for key, upload_refused in (("dev-b", True), ("dev-a", False)):
        with Tracker(client.address) as tracker:
            session = tracker.request(key)
            calls = [("ffi.ModuleLoadFromFile", (library, "so")),
                     ("ffi.ModuleWriteToFile", (None, "/tmp/x.so", "so")), ("rpc.Connect", ("127.0.0.1", 1, ""))]
            if upload_refused:
                calls.append(("tvm.rpc.server.upload", ("x.so", b"\0")))
            for name, args in calls:
                with pytest.raises(Exception) as err:
                    session.get_function(name)(*args)
                assert "handoff serve refuses" in _rpc_reason(err.value), name
            if not upload_refused:  # --allow-tuning: uploads stay in the session's directory
                with pytest.raises(Exception) as err:
                    session.get_function("tvm.rpc.server.upload")("../escape.so", b"\0")
                assert "a plain file name only" in _rpc_reason(err.value)
                with pytest.raises(Exception) as err:  # loaders still check approved bytes outside it
                    session.get_function("tvm.rpc.server.load_module")(library)
                assert "handoff serve refuses" in _rpc_reason(err.value)
            del session


def test_a_device_says_what_it_can_run(client, sink_plugins):
    assert sorted(remote_info(client.address, "dev-a")["runnable"]) == sorted(handoff.get_plugins().runnable())
    info = remote_info(client.address, "dev-b")
    assert info["runnable"] == ["sink"]  # sinkb switched off there
    assert info["backends"]["tvm"]["runtime"] is True
    assert info["backends"]["sinkb"] == {**info["backends"]["sinkb"], "runtime": False,
                                         "runtime_reason": "switched off by $HANDOFF_SINK_UNAVAILABLE"}
    assert info["cpu_count"] == os.cpu_count() and info["handoff"] == handoff.__version__


def test_a_session_past_its_timeout_is_ended_by_the_device(client, program):
    x = np.ones((6, 8), np.float32)
    with pytest.raises(HandoffError) as err:
        run_remote(program, client.address, "dev-b", [x], bench=10**5, warmup=10**4, timeout_s=1)
    assert str(err.value).startswith(f"device 'dev-b' (via the RPC tracker {client.address}) failed mid-run: ")
    assert "session has expired" in str(err.value) and "\n" not in str(err.value)
    (got,) = run_remote(program, client.address, "dev-b", [x]).outputs  # the server goes on
    assert got.shape == (6, 6)


def test_targets_per_key_come_from_the_device_or_key_target(client):
    assert key_targets(client.address, ["dev-a", "dev-b"], ["dev-b=aarch64"]) == {"dev-a": "host", "dev-b": "aarch64"}
    with pytest.raises(HandoffError, match=r"--key-target 'dev-c=host': expected KEY=TARGET with KEY one of dev-a"):
        key_targets(client.address, ["dev-a"], ["dev-c=host"])


def test_compare_measures_every_strategy_on_every_key(client, sink_plugins, tmp_path, capsys):
    """A row per strategy and key: measured on the device, outputs checked against eager here; a
    backend the device lacks is "not runnable on K" with the device's reason; a program the
    device cannot load (tvm built for aarch64 by --key-target, shipped to an x86 server) fails
    its row only, with one line naming the key and the tracker."""
    whole = "sink[ops=aten.add.Tensor,aten.mul.Tensor,aten.relu.default,aten.sin.default]"  # all on sink
    split = "sink,sinkb[ops=aten.sin.default]"  # sin on sinkb, switched off on dev-b
    with_tvm = "sink"  # sin left to the tvm fallback: built for each key's target
    paths = {kind: tmp_path / f"c.{kind}" for kind in ("json", "csv", "png")}
    code = main(["compare", "zoo:sink_net", "--strategy", whole, "--strategy", split, "--strategy", with_tvm,
                 "--rpc", client.address, "--key", "dev-a,dev-b", "--key-target", "dev-b=aarch64", "--runs", "3",
                 "--rounds", "1", "--warmup", "1", "--quiet", "--json", str(paths["json"]), "--csv", str(paths["csv"]),
                 "--plot", str(paths["png"])])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"on devices dev-a (host), dev-b (aarch64) via the RPC tracker {client.address}" in out
    result = json.loads(paths["json"].read_text())
    assert result["rpc"] == client.address
    assert {k: d["target"] for k, d in result["devices"].items()} == {"dev-a": "host", "dev-b": "aarch64"}
    rows = {(r["name"], r["key"]): r for r in result["strategies"]}
    assert list(rows) == [(s, k) for s in (whole, split, with_tvm) for k in ("dev-a", "dev-b")]
    for cell in ((whole, "dev-a"), (whole, "dev-b"), (split, "dev-a"), (with_tvm, "dev-a")):
        r = rows[cell]
        assert r["status"] == "ok" and r["runs"] == 3, (cell, r["reason"])
        assert r["load_ms"] > 0 and r["first_run_ms"] > 0 and r["p90_ms"] >= r["p50_ms"] > 0
        assert r["max_abs_error"] <= 1e-5, cell
    assert rows[(with_tvm, "dev-a")]["delegates"]["tvm"] == 1
    lacking = rows[(split, "dev-b")]
    assert lacking["status"] == "not runnable on dev-b" and lacking["runs"] == 0
    assert lacking["reason"] == "sinkb: switched off by $HANDOFF_SINK_UNAVAILABLE" and lacking["program_bytes"] > 0
    failed = rows[(with_tvm, "dev-b")]
    assert failed["status"] == "failed" and failed["runs"] == 0 and "\n" not in failed["reason"]
    assert failed["reason"].startswith(f"device 'dev-b' (via the RPC tracker {client.address}): ")
    assert f"{with_tvm} on dev-b: device 'dev-b'" in " ".join(out.split())
    # a column (group) per key: the JSON's matrix, the wide CSV, the table
    assert list(result["by_key"]) == [whole, split, with_tvm]
    for (name, key), r in rows.items():
        assert result["by_key"][name][key] == {f: r[f] for f in result["by_key"][name][key]}
        assert {"status", "reason", "p50_ms", "max_abs_error"} <= set(result["by_key"][name][key])
    table = list(csv.DictReader(paths["csv"].open()))
    assert [r["strategy"] for r in table] == [whole, split, with_tvm]
    assert {f"{k}:{f}" for k in ("dev-a", "dev-b") for f in ("p50_ms", "max_abs_error", "status")} <= set(table[0])
    for line in table:
        for key in ("dev-a", "dev-b"):
            r = rows[(line["strategy"], key)]
            assert line[f"{key}:status"] == r["status"] and line[f"{key}:reason"] == r["reason"]
            assert line[f"{key}:p50_ms"] == ("" if r["p50_ms"] is None else str(r["p50_ms"]))
    header = next(i for i, line in enumerate(out.splitlines()) if "dev-a" in line and "dev-b" in line and "┃" in line)
    assert "p50 ms" in out.splitlines()[header + 1] and "max abs err" in out.splitlines()[header + 1]
    lines = out.splitlines()[header:]
    body = [[c.strip() for c in line.split("│")[1:-1]] for line in lines[:next(i for i, line in enumerate(lines)
                                                                           if line.startswith("└"))]
            if line.startswith("│")]
    lacking_row = next(cells for cells in body if "not runnable" in cells)
    assert len(lacking_row) == 4 + 2 * 2 and re.fullmatch(r"[0-9.]+( ★)?", lacking_row[4])  # dev-a measured
    assert lacking_row[6:] == ["not runnable", "sinkb: switched off by…"]
    failed_row = next(cells for cells in body if "failed" in cells)
    assert failed_row[6] == "failed" and failed_row[7].startswith("device 'dev-b'") and failed_row[7].endswith("…")
    assert len([cells for cells in body if cells[2]]) == 3  # one row per strategy (a long name wraps)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["compare", "zoo:sink_net", "--strategy", whole, "--rpc", client.address]) == 1
    assert "--rpc HOST:PORT and --key K1,K2 go together" in capsys.readouterr().err
    assert main(["compare", "zoo:sink_net", "--strategy", whole, "--rpc", client.address, "--key", "dev-a",
                 "--per-delegate"]) == 1
    assert "--per-delegate checks each delegate on this machine" in capsys.readouterr().err


def test_errors_name_the_tracker_and_the_next_step(client, program):
    port = _free_port()
    with pytest.raises(HandoffError) as err:
        run_remote(program, f"127.0.0.1:{port}", "dev-a", [])
    assert f"cannot reach the RPC tracker at 127.0.0.1:{port}" in str(err.value)
    assert "python -m tvm.exec.rpc_tracker" in str(err.value)
    with pytest.raises(HandoffError) as err:
        run_remote(program, client.address, "nope", [])
    assert f"no device is registered under key 'nope' at the RPC tracker {client.address}" in str(err.value)
    assert "registered: dev-a (2), dev-b (1)" in str(err.value) and "handoff serve --tracker" in str(err.value)
    for bad in ("nohost:", ":9190", "h:99999"):
        with pytest.raises(HandoffError, match="expected HOST:PORT"):
            parse_address(bad)


@pytest.mark.slow
def test_tuning_measures_candidates_on_both_servers(client):
    """8 MetaSchedule trials built here, measured on the two dev-a servers; records stay in the
    client's tuning database, keyed by the target."""
    before = {name: client.logs[name].read_text().count("session") for name in ("a1", "a2")}
    result = handoff.partition(Tiny(), (torch.randn(6, 8),), backends=["tvm"], use_cache=False,
                               default_limits=handoff.Limits(min_size=1),
                               options={"tvm": {"tune": "8", "rpc": f"{client.address}/dev-a"}})
    after = {name: client.logs[name].read_text().count("session") for name in ("a1", "a2")}
    assert all(after[n] > before[n] for n in after), (before, after)
    records = list((client.client_home / "tuning" / "tvm").glob("*/database_tuning_record.json"))
    assert records and records[0].read_text().strip()
    x = np.random.default_rng(4).standard_normal((6, 8)).astype(np.float32)
    (got,) = run_remote(result.to_bytes(), client.address, "dev-b", [x]).outputs
    np.testing.assert_allclose(got, Tiny()(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_server_killed_mid_run(client, program):
    """The client gets one line naming the key; the tracker keeps serving the other keys."""
    victim = client.serve("kill", "dev-kill")
    try:
        client.wait_registered({"dev-kill": 1})
        x = np.ones((6, 8), np.float32)
        failure: list[BaseException] = []

        def long_run() -> None:
            try:
                run_remote(program, client.address, "dev-kill", [x], bench=10**5, warmup=0)
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=long_run)
        thread.start()
        # the line comes as the session starts; loading and 10**5 timed runs take seconds more
        _wait_for("the session", lambda: "session" in client.logs["kill"].read_text())
        _stop(victim)
        thread.join(timeout=120)
        assert not thread.is_alive()
        (exc,) = failure
        assert isinstance(exc, HandoffError), exc
        assert str(exc).startswith(f"device 'dev-kill' (via the RPC tracker {client.address}) failed mid-run")
        assert "check its log, then rerun" in str(exc)
    finally:
        _stop(victim)
    (got,) = run_remote(program, client.address, "dev-b", [x]).outputs
    assert got.shape == (6, 6)
