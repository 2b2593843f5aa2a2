"""Remote devices: programs built here, run on devices pooled by Apache TVM's RPC tracker.

A device runs ``handoff serve --tracker HOST:PORT --key KEY``: a :mod:`tvm.rpc` server that
registers with the tracker under ``KEY`` (the device kind: ``pixel8``, ``rk3588``...) and
serves handoff's functions. A client asks the tracker for a free device of a key, ships a
``.hof`` and gets outputs and timings back. The tracker pools devices by key and queues
requests; nothing here schedules. Start one with ``python -m tvm.exec.rpc_tracker --host
127.0.0.1 --port 9190``.

Client side (the public API; ``handoff compare`` calls :func:`run_remote` per key)::

    result = handoff.remote.run_remote("m.hof", "127.0.0.1:9190", "rk3588", inputs=[x], bench=20)
    result.outputs, result.times_ms, result.load_ms

Device side, the functions a session of ``handoff serve`` answers:

* ``handoff.remote.run(program: bytes, request: str, inputs: bytes) -> bytes``: loads the
  program with the backends installed on the device, **under the device's trust rules** (its
  local key, ``$HANDOFF_HOME/trusted``, ``--trusted-keys``; ``--allow-unsigned`` only if the
  device's owner passed it: a client cannot ask for it), runs it and returns ``.npz`` bytes.
* ``handoff.remote.info() -> str``: JSON, what ``handoff backends --runnable`` (and ``--json``)
  say on the device, with its CPU count and handoff/TVM versions.

What a session refuses (``docs/security.md``, "Remote devices"): TVM's RPC server lets a client
call any registered global function; a session of ``handoff serve`` replaces every one that
uploads, downloads or removes files, or reads and writes files by path, with one that refuses,
and lets a shared library be loaded only when its bytes are ones the device's trust rules
approved (:mod:`handoff.native`). ``--allow-tuning`` lets MetaSchedule's RPC runner upload and
run its candidate kernels (unsigned native code) in the session's scratch directory: only on
devices reserved for tuning. TVM's RPC transport itself trusts its network (a client can copy
raw memory), so the server binds 127.0.0.1 unless told otherwise: reach devices over a private
network or VPN.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import HandoffError, one_line

#: How long a client waits, by default, for a device of a key to be free.
DEFAULT_WAIT_S = 120.0
#: The tracker's port when ``--rpc HOST`` names none (TVM's default).
DEFAULT_TRACKER_PORT = 9190
_RUN, _INFO = "handoff.remote.run", "handoff.remote.info"
TRACKER_HINT = "start one with: python -m tvm.exec.rpc_tracker --host 127.0.0.1 --port {port}"


def _tvm_rpc() -> Any:
    """``tvm.rpc``, imported without torch (:func:`handoff.tvm.runtime.import_tvm`): a device
    or a client needs none of it, and it costs seconds and hundreds of MB."""
    from .tvm.runtime import import_tvm

    import_tvm()
    from tvm import rpc

    return rpc


# -- addresses -----------------------------------------------------------------------------------

def parse_address(text: str, flag: str = "--rpc") -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST``, port 9190) -> ``(host, port)``; a one-line error otherwise."""
    host, colon, port = text.strip().rpartition(":")
    if not colon:
        host, port = text.strip(), str(DEFAULT_TRACKER_PORT)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise HandoffError(f"{flag} {text!r}: expected HOST:PORT of a TVM RPC tracker, e.g. 127.0.0.1:9190")
    return host, int(port)


def parse_keys(text: str) -> list[str]:
    """``K1,K2`` -> ``["K1", "K2"]``; a key is what ``handoff serve --key`` registered."""
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if any(c.isspace() for c in k) or ":" in k]
    if not keys or bad:
        raise HandoffError(f"--key {text!r}: expected KEY or K1,K2 (device keys registered with the tracker; no "
                           f"spaces or ':')")
    return keys


# -- the tracker ---------------------------------------------------------------------------------

class Tracker:
    """A connection to a TVM RPC tracker, with errors that name it and say what to do."""

    def __init__(self, address: str, timeout_s: float = 10.0):
        self.host, self.port = parse_address(address)
        self.address = f"{self.host}:{self.port}"
        try:  # TVM's own connect retries a refused connection for 60 s: probe first
            socket.create_connection((self.host, self.port), timeout=timeout_s).close()
        except OSError as exc:
            raise HandoffError(f"cannot reach the RPC tracker at {self.address} ({one_line(exc, 120)}); check --rpc, "
                               f"or {TRACKER_HINT.format(port=self.port)}") from None
        rpc = _tvm_rpc()
        try:
            self._session = rpc.connect_tracker(self.host, self.port)
            self._session._sock.settimeout(timeout_s)
            self._summary = self._session.summary()
        except (OSError, RuntimeError) as exc:
            raise HandoffError(f"{self.address} does not answer as a TVM RPC tracker ({one_line(exc, 120)}); check "
                               f"--rpc, or {TRACKER_HINT.format(port=self.port)}") from None

    def summary(self) -> dict[str, Any]:
        """``{key: {"servers": N, "free": N, "pending": N}}`` for every key the tracker knows."""
        try:
            data = self._session.summary()
        except (OSError, RuntimeError) as exc:
            raise HandoffError(f"lost the RPC tracker at {self.address} ({one_line(exc, 120)}); check it runs") from None
        out: dict[str, dict[str, int]] = {}
        for item in data.get("server_info", []):
            key = str(item.get("key", "")).removeprefix("server:")
            out.setdefault(key, {"servers": 0, "free": 0, "pending": 0})["servers"] += 1
        for key, q in data.get("queue_info", {}).items():
            row = out.setdefault(key, {"servers": 0, "free": 0, "pending": 0})
            row["free"], row["pending"] = int(q.get("free", 0)), int(q.get("pending", 0))
        return out

    def servers(self, key: str) -> int:
        """How many servers are registered under ``key``; a one-line error when none is."""
        known = self.summary()
        count = known.get(key, {}).get("servers", 0)
        if not count:
            listed = ", ".join(f"{k} ({v['servers']})" for k, v in sorted(known.items()) if v["servers"]) or "none"
            raise HandoffError(f"no device is registered under key '{key}' at the RPC tracker {self.address} "
                               f"(registered: {listed}); start one on the device with: handoff serve --tracker "
                               f"{self.address} --key {key}")
        return count

    def request(self, key: str, wait_s: float = DEFAULT_WAIT_S, session_timeout_s: float = 0) -> Any:
        """An RPC session with a free device of ``key``, waiting up to ``wait_s`` for one."""
        rpc = _tvm_rpc()
        from tvm.rpc import base

        self.servers(key)
        sock = self._session._sock
        try:
            sock.settimeout(wait_s)
            base.sendjson(sock, [base.TrackerCode.REQUEST, key, "", 1])
            code, value = base.recvjson(sock)
        except TimeoutError:
            raise HandoffError(f"no device of key '{key}' became free within {wait_s:g} s at the RPC tracker "
                               f"{self.address}; wait longer (--rpc-wait), or add devices: handoff serve --tracker "
                               f"{self.address} --key {key}") from None
        except (OSError, ValueError, struct.error) as exc:
            raise HandoffError(f"lost the RPC tracker at {self.address} while asking for key '{key}' "
                               f"({one_line(exc, 120)}); check it runs") from None
        if code != base.TrackerCode.SUCCESS:
            raise HandoffError(f"the RPC tracker at {self.address} refused a request for key '{key}': {value}")
        host, port, matchkey = value
        try:
            return rpc.connect(host, port, matchkey, session_timeout=session_timeout_s)
        except Exception as exc:
            raise HandoffError(f"the device of key '{key}' at {host}:{port} (from the tracker {self.address}) "
                               f"refused the connection ({one_line(exc, 160)}); check that its handoff serve runs "
                               f"and that {host}:{port} is reachable from here") from None

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- the client ----------------------------------------------------------------------------------

@dataclasses.dataclass
class RemoteResult:
    """What a device answered: outputs in program order, and how long things took there."""

    key: str
    outputs: list[np.ndarray]
    load_ms: float
    first_run_ms: float
    #: each timed run (``bench``), in milliseconds, measured on the device
    times_ms: list[float]
    #: how the device trusted the program's native code, or None when it has none
    trust: str | None
    #: the device: ``{"hostname", "cpu_count", "handoff", "tvm", "runnable"}``
    device: dict[str, Any]


def run_remote(program: str | os.PathLike[str] | bytes, rpc: str, key: str, inputs: Sequence[Any],
               *, bench: int = 0, warmup: int = 3, options: Mapping[str, Mapping[str, str]] | None = None,
               wait_s: float = DEFAULT_WAIT_S, timeout_s: float = 0) -> RemoteResult:
    """Run ``program`` on a device of ``key`` from the pool of the tracker at ``rpc``.

    The program (a path or its bytes) is shipped as it is: build it here for the device's target;
    nothing compiles on the device. Its native code loads only if the device trusts the signer.

    :param inputs: one array per program input (:func:`handoff.program.io_specs`).
    :param bench: time this many runs on the device after ``warmup`` runs (``times_ms``).
    :param options: runtime options, as for :func:`handoff.load`.
    :param wait_s: how long to wait for a free device of ``key``.
    :param timeout_s: the device ends the session after this many seconds (0: no limit).
    :raises HandoffError: one line naming the key and tracker: unreachable tracker, no such key,
        the device refused the program (its reason), or the device died mid-run.
    """
    data = bytes(program) if isinstance(program, (bytes, bytearray)) else Path(program).read_bytes()
    request = json.dumps({"bench": int(bench), "warmup": int(warmup), "options": dict(options or {})})
    reply, where = _call(rpc, key, _RUN, (data, request, _pack(list(inputs))), wait_s, timeout_s)
    summary, outputs = _unpack(bytes(reply), where)
    if "error" in summary:
        raise HandoffError(f"{where}: {summary['error']}")
    return RemoteResult(key, outputs, summary["load_ms"], summary["first_run_ms"], summary["times_ms"],
                        summary.get("trust"), summary["device"])


def key_targets(rpc: str, keys: Sequence[str], overrides: Sequence[str] = (),
                infos: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, str]:
    """The ``tvm`` target to build for each device key (``compare --rpc ... --key K1,K2``):
    ``--key-target K=TARGET`` items in ``overrides`` first; otherwise the device is asked
    (:func:`remote_info`, unless ``infos`` holds its answer already): an aarch64 device gets
    ``aarch64``, a device of this machine's architecture ``host``; any other device needs an
    override."""
    import platform

    from .tvm.plugin import TARGETS

    chosen: dict[str, str] = {}
    for item in overrides:
        key, eq, target = item.partition("=")
        if not (eq and key in keys and target in TARGETS):
            raise HandoffError(f"--key-target {item!r}: expected KEY=TARGET with KEY one of {', '.join(keys)} and "
                               f"TARGET one of {', '.join(TARGETS)}")
        chosen[key] = target
    for key in keys:
        if key in chosen:
            continue
        info = infos[key] if infos and key in infos else remote_info(rpc, key)
        machine = str(info.get("machine", "")).lower()
        if machine in ("aarch64", "arm64"):
            chosen[key] = "aarch64"
        elif machine == platform.machine().lower():
            chosen[key] = "host"
        else:
            raise HandoffError(f"device '{key}' is a {machine or 'device of unknown architecture'}, which no tvm target "
                               f"covers by default; pass --key-target {key}=TARGET ({', '.join(TARGETS)})")
    return chosen


def remote_info(rpc: str, key: str, wait_s: float = DEFAULT_WAIT_S) -> dict[str, Any]:
    """What a device of ``key`` says about itself (:func:`device_info` there)."""
    reply, _ = _call(rpc, key, _INFO, (), wait_s, 0)
    return json.loads(str(reply))


def _call(rpc: str, key: str, name: str, args: tuple, wait_s: float, timeout_s: float) -> tuple[Any, str]:
    """Call ``name(*args)`` in a session with a device of ``key``; the session ends on return
    (nothing here, not even an exception's traceback, keeps the device busy)."""
    with Tracker(rpc) as tracker:
        where = f"device '{key}' (via the RPC tracker {tracker.address})"
        session = tracker.request(key, wait_s=wait_s, session_timeout_s=timeout_s)
        failure = None
        try:
            function = session.get_function(name)
            try:
                return function(*args), where
            except Exception as exc:
                failure = (f"{where} failed mid-run: {_rpc_reason(exc)}; the device's handoff serve died or its "
                           f"session timed out: check its log, then rerun (other keys are unaffected)")
            finally:
                del function
        except Exception as exc:
            failure = (f"{where} does not serve handoff ({_rpc_reason(exc)}); run handoff serve there, not "
                       f"python -m tvm.exec.rpc_server")
        finally:
            del session
    raise HandoffError(failure)


def _rpc_reason(exc: BaseException) -> str:
    """The last meaningful line of an RPC error (TVM's carry the remote traceback)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().startswith(("File ", "^"))]
    return one_line(lines[-1] if lines else type(exc).__name__, 200)


def _pack(arrays: Sequence[Any], summary: Mapping[str, Any] | None = None) -> bytes:
    """Arrays (and a JSON summary) as ``.npz`` bytes: no pickles either way."""
    named = {f"a{i}": np.ascontiguousarray(a) for i, a in enumerate(arrays)}
    if summary is not None:
        named["summary"] = np.frombuffer(json.dumps(summary).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **named)
    return buf.getvalue()


def _unpack(data: bytes, where: str) -> tuple[dict[str, Any], list[np.ndarray]]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = [z[f"a{i}"] for i in range(sum(1 for n in z.files if n.startswith("a")))]
            summary = json.loads(bytes(z["summary"]).decode()) if "summary" in z.files else {}
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
        raise HandoffError(f"{where}: unreadable arrays ({one_line(exc, 120)}); both sides must run the same "
                           f"handoff version") from None
    return summary, arrays


# -- the device ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """What ``handoff serve`` was told: the device owner's trust rules, not the client's."""

    trusted_keys: tuple[str, ...] = ()
    allow_unsigned: bool = False
    allow_tuning: bool = False


def device_info() -> dict[str, Any]:
    """This device as a client sees it: the runnable backends (``handoff backends --runnable``),
    every installed backend with why it cannot run here, CPU count and versions."""
    import platform

    from . import __version__
    from .plugins import get_plugins

    plugins = get_plugins()
    backends = {bid: {"device": spec.device, "version": spec.version,
                      "runtime": plugins.runtime_available(bid)[0], "runtime_reason": plugins.runtime_available(bid)[1]}
                for bid, spec in plugins.backends.items()}
    try:
        import tvm

        tvm_version = tvm.__version__
    except Exception:
        tvm_version = None
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:
        cores = None
    return {"hostname": platform.node(), "machine": platform.machine(), "cpu_count": os.cpu_count(), "cpu_cores": cores,
            "handoff": __version__, "tvm": tvm_version, "runnable": plugins.runnable(), "backends": backends}


def _serve_run(config: ServeConfig, program: bytes, request: str, inputs: bytes) -> bytes:
    """``handoff.remote.run`` on the device: every failure becomes ``{"error": one line}``."""
    from .runtime import load

    try:
        req = json.loads(request)
        _, arrays = _unpack(inputs, "the request")
        bench, warmup = int(req.get("bench", 0)), int(req.get("warmup", 3))
        if not (0 <= bench <= 100_000 and 0 <= warmup <= 10_000):
            raise HandoffError(f"bench={bench}, warmup={warmup}: expected 0..100000 and 0..10000")
        start = time.perf_counter()
        prog = load(bytes(program), options=req.get("options") or {}, trusted_keys=config.trusted_keys,
                    allow_unsigned=config.allow_unsigned)
        load_s = time.perf_counter() - start
        with prog:
            t0 = time.perf_counter()
            outputs = prog.run(arrays)
            first_s = time.perf_counter() - t0
            for _ in range(warmup if bench else 0):
                prog.run(arrays)
            times = []
            for _ in range(bench):
                t0 = time.perf_counter()
                prog.run(arrays)
                times.append((time.perf_counter() - t0) * 1e3)
            trust = prog.trust
        summary = {"load_ms": load_s * 1e3, "first_run_ms": first_s * 1e3, "times_ms": times, "trust": trust,
                   "device": {k: v for k, v in device_info().items() if k != "backends"}}
        return _pack(outputs, summary)
    except Exception as exc:  # a HandoffError's own line; anything else names its type
        return _pack([], {"error": one_line(exc)})


#: TVM globals a session refuses: they touch files by path, load code, start processes, open
#: connections elsewhere or call raw addresses.
_REFUSED_PREFIXES = ("tvm.rpc.server.", "runtime.disco.", "testing.", "s_tir.meta_schedule.",
                     "tvm.s_tir.meta_schedule.", "tvm_callback_", "rpc.Connect", "rpc.CreatePipeClient",
                     "rpc.PopenSession", "rpc.CreateEventDrivenServer", "rpc.LoadRemoteModule",
                     "ffi.FunctionFromExternC", "ffi.FunctionRemoveGlobal", "ffi._Register")
_REFUSED_WORDS = ("File", "file", "Static", "tensor_cache")
#: What a client's session always needs (functions of modules loaded in the session).
_SESSION = ("tvm.rpc.server.ImportModule", "tvm.rpc.server.ModuleGetFunction")
#: What MetaSchedule's RPC runner needs of a session (``--allow-tuning``).
_TUNING = ("tvm.rpc.server.upload", "tvm.rpc.server.remove", "tvm.rpc.server.load_module",
           "tvm.rpc.server.workpath")


def _lock_down(config: ServeConfig, work_dir: str) -> None:
    """Runs in each session's process before it serves: refuse TVM's file and code functions,
    gate every shared-library loader on approved bytes (module docstring)."""
    import tvm_ffi

    from . import native

    def refuse(name: str) -> Any:
        def refused(*_args: Any) -> None:
            raise RuntimeError(f"handoff serve refuses {name}: only handoff.remote.* functions are served")

        return refused

    def gate(name: str, original: Any) -> Any:
        def load(path: str, *args: Any) -> Any:
            real = os.path.realpath(str(path))
            tuning = config.allow_tuning and real.startswith(os.path.realpath(work_dir) + os.sep)
            with open(real, "rb") as f:
                approved = native.is_approved(native.sha256(f.read()))
            if not (approved or tuning):
                raise RuntimeError(f"handoff serve refuses to load {path}: its bytes were not approved by the "
                                   f"device's trust rules")
            return original(path, *args)

        return load

    keep = {_RUN, _INFO, *_SESSION, *(_TUNING if config.allow_tuning else ())}
    for name in tvm_ffi.registry.list_global_func_names():
        if name in keep:
            continue
        if name.startswith("ffi.Module.load_from_file."):
            tvm_ffi.register_global_func(name, gate(name, tvm_ffi.get_global_func(name)), override=True)
        elif name.startswith(_REFUSED_PREFIXES) or any(w in name for w in _REFUSED_WORDS):
            tvm_ffi.register_global_func(name, refuse(name), override=True)


def _session_env(config: ServeConfig, original_env: Any) -> Any:
    """Replaces ``tvm.rpc.server._server_env`` (each session's setup, in its own process)."""

    def server_env(load_library: Any, work_path: Any) -> Any:
        # one line per session, for the device's operator (and tests)
        print(f"handoff serve: session in process {os.getpid()}", flush=True)
        temp = original_env(None, work_path) if config.allow_tuning else work_path
        if config.allow_tuning:  # uploads stay inside the session's scratch directory
            import tvm_ffi

            upload = tvm_ffi.get_global_func("tvm.rpc.server.upload")

            def safe_upload(file_name: str, blob: Any) -> None:
                if os.path.basename(file_name) != file_name or file_name in ("", ".", ".."):
                    raise RuntimeError(f"handoff serve refuses to upload {file_name!r}: a plain file name only")
                upload(file_name, blob)

            tvm_ffi.register_global_func("tvm.rpc.server.upload", safe_upload, override=True)
        _lock_down(config, work_path.path)
        return temp

    return server_env


def serve(tracker: str, key: str, host: str = "127.0.0.1", port: int = 9090, port_end: int = 9199,
          config: ServeConfig = ServeConfig(), ready: Any = None) -> None:
    """Serve this device to the tracker's pool under ``key`` until interrupted (``handoff serve``).

    One session at a time; each runs in a process of its own, forked from this one, so a
    program that crashes ends its session, not the server."""
    _tvm_rpc()
    import tvm_ffi
    from tvm.rpc import server as tvm_server

    tracker_addr = parse_address(tracker, "--tracker")
    with Tracker(tracker):  # a clear error now rather than retries in a thread
        pass
    tvm_ffi.register_global_func(_RUN, lambda p, r, i: _serve_run(config, bytes(p), str(r), bytes(i)), override=True)
    tvm_ffi.register_global_func(_INFO, lambda: json.dumps(device_info()), override=True)
    tvm_server._server_env = _session_env(config, tvm_server._server_env)
    try:
        state = tvm_server.PopenRPCServerState(host, port, port_end, False, tracker_addr, key, None, None, True,
                                               True, None)
    except OSError as exc:
        raise HandoffError(f"cannot listen on {host}:{port}..{port_end} ({one_line(exc, 120)}); pass a free "
                           f"--port") from None
    if ready is not None:
        ready(state.port)
    state.thread.join()
