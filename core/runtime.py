"""Step 5: load a ``.hof`` program and run it.

``import handoff.runtime`` imports neither torch nor any compiler: backends' runtime halves are
imported when a program that needs them is loaded, and torch only when the program has host ATen
ops. Delegates are initialised once, at load; :meth:`Program.run` only executes.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from . import hostops, probe
from .errors import HandoffError, one_line
from .limits import check_run_bytes
from .plugins import Plugins, get_plugins
from .program import ProgramFile, constant_array

TORCH_HINT = "pip install torch==2.13.0"


class Program:
    """A loaded program. Use :func:`load`; close it (or use ``with``) to release the delegates."""

    def __init__(self, file: ProgramFile, plugins: Plugins, options: Mapping[str, Mapping[str, str]]):
        self.file = file
        self.manifest = file.manifest
        self._handles: list[tuple[Any, Any]] = []  # (runtime, handle) per delegate
        self._closed = False
        start = time.perf_counter()
        try:
            check_run_bytes(self.manifest, file.name)  # a file must not size the host's allocations at will
            self._constants = {c["value"]: constant_array(file, i) for i, c in enumerate(self.manifest["constants"])}
            self._aten_ops = self._resolve_aten_ops()
            self._load_delegates(plugins, options)
            self._plan()
        except BaseException:
            self.close()
            raise
        self.load_seconds = time.perf_counter() - start

    # -- load ----------------------------------------------------------------------------------
    def _load_delegates(self, plugins: Plugins, options: Mapping[str, Mapping[str, str]]) -> None:
        delegates = self.manifest["delegates"]
        parsed: dict[str, dict[str, Any]] = {}
        for backend in options:
            if backend not in {d["backend"] for d in delegates}:
                raise HandoffError(f"{self.file.name}: options given for backend '{backend}', which this program does "
                                   f"not use; it uses: {', '.join(sorted({d['backend'] for d in delegates})) or 'none'}")
        for backend in sorted({d["backend"] for d in delegates}):
            if backend not in plugins.backends:
                users = [i for i, d in enumerate(delegates) if d["backend"] == backend]
                raise HandoffError(f"{self.file.name}: delegate {users[0]} needs "
                                   f"{plugins.not_installed_message(backend)}")
            parsed[backend] = plugins.parse_options(backend, options.get(backend, {}), runtime=True)
            ok, reason = plugins.runtime_available(backend)
            if not ok:
                raise HandoffError(f"{self.file.name}: backend '{backend}' cannot run here: {reason}")
        for i, d in enumerate(delegates):
            runtime = plugins.runtime(d["backend"])
            blob = self.file.segment(d["segment"])
            if runtime.isolate_untrusted:  # its vendor runtime may crash on a bad blob: check it elsewhere first
                spec = plugins.spec(d["backend"])
                probe.vouch(self.file.name, self.manifest, i, spec.version, spec.runtime, blob, parsed[d["backend"]])
            try:
                handle = runtime.load(blob, d["metadata"], parsed[d["backend"]])
            except HandoffError:
                raise
            except Exception as exc:
                raise HandoffError(f"{self.file.name}: delegate {i} ({d['partition']}, backend '{d['backend']}') "
                                   f"failed to load: {type(exc).__name__}: {' '.join(str(exc).split())[:400]}") from exc
            self._handles.append((runtime, handle))

    def _resolve_aten_ops(self) -> dict[int, Any]:
        """Host ops, resolved from the allow-list (:mod:`handoff.hostops`) and checked, before
        anything runs, to produce exactly the outputs the manifest declares."""
        instructions = self.manifest["instructions"]
        targets = {i: ins["target"] for i, ins in enumerate(instructions) if ins["op"] == "aten"}
        if not targets:
            return {}
        for i, target in targets.items():
            why = hostops.refusal(target)
            if why:
                raise HandoffError(f"{self.file.name}: instruction {i}: {why}; the program cannot run here")
        try:
            import torch
        except ImportError:
            ops = ", ".join(sorted(set(targets.values())))
            raise HandoffError(f"{self.file.name}: {len(targets)} host ATen op(s) ({ops}) need torch, which is not "
                               f"installed; install with: {TORCH_HINT}, or re-partition with --no-aten") from None
        values = self.manifest["values"]

        def declared(vid: int) -> tuple[tuple[int, ...], str]:
            return tuple(values[vid]["shape"]), values[vid]["dtype"]

        resolved = {}
        for i, target in targets.items():
            op = hostops.resolve(target)
            ins = instructions[i]
            why = hostops.check_instruction(op, ins["args"], ins["kwargs"], _decode, declared,
                                            [None if v is None else declared(v) for v in ins["outputs"]])
            if why:
                raise HandoffError(f"{self.file.name}: instruction {i} ({target}) is refused: {why}")
            resolved[i] = op
        self._torch_constants = {vid: torch.from_numpy(np.array(arr)) for vid, arr in self._constants.items()}
        return resolved

    def _plan(self) -> None:
        """What :meth:`run` does, decoded once: the manifest's strings and lists become tuples,
        dtypes and bound methods, so a run costs microseconds on top of its delegates."""
        m = self.manifest
        vals = m["values"]
        self._expect = {i: (tuple(v["shape"]), np.dtype(v["dtype"])) for i, v in enumerate(vals)}
        self._input_plan = [(i["name"], i["value"], *self._expect[i["value"]]) for i in m["inputs"]]
        self._output_ids = [o["value"] for o in m["outputs"]]
        self._steps = []
        for i, ins in enumerate(m["instructions"]):
            if ins["op"] == "delegate":
                runtime, handle = self._handles[ins["delegate"]]
                self._steps.append((i, runtime.execute, handle, tuple(ins["inputs"]), tuple(ins["outputs"])))
            else:
                self._steps.append((i, None, ins, (), tuple(ins["outputs"])))

    def _where(self, index: int) -> str:
        ins = self.manifest["instructions"][index]
        if ins["op"] == "delegate":
            return f"delegate {ins['delegate']} ({self.manifest['delegates'][ins['delegate']]['partition']})"
        return f"instruction {index} ({ins['target']})"

    # -- signature -----------------------------------------------------------------------------
    @property
    def input_specs(self) -> list[tuple[str, tuple[int, ...], str]]:
        """``(name, shape, dtype)`` of each input."""
        vals = self.manifest["values"]
        return [(i["name"], tuple(vals[i["value"]]["shape"]), vals[i["value"]]["dtype"]) for i in self.manifest["inputs"]]

    @property
    def output_specs(self) -> list[tuple[str, tuple[int, ...], str]]:
        vals = self.manifest["values"]
        return [(o["name"], tuple(vals[o["value"]]["shape"]), vals[o["value"]]["dtype"]) for o in self.manifest["outputs"]]

    # -- run -----------------------------------------------------------------------------------
    def run(self, inputs: Sequence[Any] | Mapping[str, Any]) -> list[np.ndarray]:
        """Run the program. ``inputs``: numpy arrays or torch tensors, in order or by name.
        Returns numpy arrays in output order."""
        if self._closed:
            raise HandoffError(f"{self.file.name}: program is closed")
        env: dict[int, Any] = dict(self._constants)
        arrays = self._inputs(inputs)
        for (name, vid, shape, dtype), arr in zip(self._input_plan, arrays):
            if arr.dtype != dtype or arr.shape != shape:
                raise HandoffError(f"input '{name}': expected {dtype}{list(shape)}, got {arr.dtype}{list(arr.shape)}")
            env[vid] = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
        expect = self._expect
        for index, execute, handle, reads, writes in self._steps:
            if execute is not None:
                outs = execute(handle, [env[v] for v in reads])
            else:
                outs = self._run_aten(index, handle, env)
            if len(outs) != len(writes):
                raise HandoffError(f"{self._where(index)} returned {len(outs)} outputs, the program expects {len(writes)}")
            for vid, out in zip(writes, outs):
                if vid is None:
                    continue
                if type(out) is not np.ndarray:
                    out = np.asarray(out)
                shape, dtype = expect[vid]
                if out.shape != shape or out.dtype != dtype:
                    raise HandoffError(f"{self._where(index)} produced {out.dtype}{list(out.shape)} for value {vid}, "
                                       f"the program expects {dtype}{list(shape)}")
                env[vid] = out
        return [np.array(env[v], copy=True) for v in self._output_ids]

    def _inputs(self, inputs: Sequence[Any] | Mapping[str, Any]) -> list[np.ndarray]:
        names = [name for name, *_ in self._input_plan]
        if isinstance(inputs, Mapping):
            missing = [n for n in names if n not in inputs]
            extra = [n for n in inputs if n not in names]
            if missing or extra:
                raise HandoffError(f"inputs by name: missing {missing or 'none'}, unknown {extra or 'none'}; "
                                   f"expected {', '.join(names)}")
            inputs = [inputs[n] for n in names]
        elif not isinstance(inputs, (list, tuple)):
            inputs = list(inputs)
        if len(inputs) != len(names):
            raise HandoffError(f"program takes {len(names)} input(s) ({', '.join(names)}), got {len(inputs)}")
        return [_to_numpy(x) for x in inputs]

    def _run_aten(self, index: int, ins: Mapping[str, Any], env: dict[int, Any]) -> list[Any]:
        import torch

        def tensor(vid: int) -> Any:
            if vid in self._torch_constants:
                return self._torch_constants[vid]
            return torch.from_numpy(np.array(env[vid]) if not env[vid].flags.writeable else env[vid])

        try:
            result = self._aten_ops[index](*_decode(ins["args"], tensor),
                                           **{k: _decode(v, tensor) for k, v in ins["kwargs"].items()})
        except Exception as exc:
            raise HandoffError(f"instruction {index} ({ins['target']}) failed on the host: {one_line(exc, 300)}") from exc
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        return [r.numpy() if isinstance(r, torch.Tensor) else r for r in results]

    def stats(self) -> list[dict[str, Any]]:
        """Per delegate: backend, partition, and what its runtime reports about the last run
        (``Runtime.stats``, where the backend implements it)."""
        out = []
        for d, (runtime, handle) in zip(self.manifest["delegates"], self._handles):
            extra = runtime.stats(handle) if hasattr(runtime, "stats") else {}
            out.append({"backend": d["backend"], "partition": d["partition"], **dict(extra)})
        return out

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Release every delegate and unmap the file. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        while self._handles:
            runtime, handle = self._handles.pop()
            try:
                runtime.release(handle)
            except Exception:  # releasing must not hide the error that made us close
                pass
        self.file.close()

    def __enter__(self) -> "Program":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _decode(arg: Any, tensor: Any) -> Any:
    """A host op's argument as the manifest encodes it (``docs/format.md``) -> what torch takes;
    ``tensor(value_id)`` makes the tensor for a value."""
    import torch

    if isinstance(arg, list):
        return [_decode(a, tensor) for a in arg]
    if isinstance(arg, dict):
        (kind, val), = arg.items()
        if kind == "value":
            return tensor(val)
        if kind == "float":
            return float(val)
        if kind == "device":
            return torch.device("cpu")
        # Only torch's own constants of the tagged kind: a file must not name other attributes.
        obj = getattr(torch, val, None) if isinstance(val, str) and not val.startswith("_") else None
        if isinstance(obj, {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}[kind]):
            return obj
        raise HandoffError(f"{val!r} is not a torch {kind}")
    return arg


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):  # a torch tensor; avoid importing torch to check
        return x.detach().cpu().numpy()
    return np.asarray(x)


def load(source: str | os.PathLike[str] | bytes, options: Mapping[str, Mapping[str, str]] | None = None,
         plugins: Plugins | None = None) -> Program:
    """Open, verify and initialise a program file (a path, or the bytes of one).

    :param options: backend id -> runtime option name -> value (``{"xnnpack": {"threads": "2"}}``).
    """
    file = ProgramFile.from_bytes(bytes(source)) if isinstance(source, (bytes, bytearray)) else ProgramFile.open(os.fspath(source))
    return Program(file, plugins or get_plugins(), options or {})
