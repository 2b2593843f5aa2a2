"""The contract checks: plugin-API rules that no single case exercises.

* ``spec``: the BackendSpec and its catalogue entry are complete (both halves derive from the base
  classes, every numeric runtime option has a cap, the catalogue entry is there and valid);
* ``imports``: neither the plugin module (imported by every program load) nor the runtime module
  imports torch or the vendor SDK, i.e. anything the compiler half or a loaded delegate pulls in
  beyond what ``import handoff`` already did: the runtime half imports its vendor runtime lazily;
* ``foreign-blob``: a blob of a newer format, or recorded as made by another compiler version, is
  refused with a message;
* ``corrupt-blob``: empty, truncated and garbage blobs get an error, not a crash, a hang or a huge
  allocation;
* ``threads``: ``execute`` from 4 threads at once gives the single-threaded result.

The last three need a delegate: the first probe case the backend delegates whole as one partition.
Imports and runtime checks run in child processes (:mod:`handoff.conformance.probe`), fresh
because each measures what an import pulls in and may crash: one child per backend and suite for
the plugin and runtime modules and the runtime checks (again after a check that crashed it), and
one that imports the compiler half, only when the first found modules that may be heavy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import one_line
from .runner import CaseFailure, Target, lower, variant

CHECKS = ("spec", "imports", "foreign-blob", "corrupt-blob", "threads")
RUNTIME_CHECKS = ("foreign-blob", "corrupt-blob", "threads")
#: Cases tried, in order, for the delegate the runtime checks use (then the rest of the catalogue).
PROBE_CASES = ("linear", "conv2d", "add", "mul", "relu", "matmul", "sigmoid", "softmax", "tanh", "sub")
PROBE_TIMEOUT = 600  # seconds for every runtime check of one backend


class ContractFailure(Exception):
    """A broken rule, in one line."""


class RuntimeUnavailable(Exception):
    """The runtime half cannot run here: the runtime checks are skipped with this reason."""


class Contract:
    """The contract checks of one backend; the child processes run once, on first use."""

    def __init__(self, target: Target, plugin_module: str | None, env_plugins: list[str], workdir: Path):
        self.target, self.plugin_module, self.env_plugins, self.workdir = target, plugin_module, env_plugins, workdir
        self._probe: dict[str, Any] | None = None
        self._compiler_modules: list[str] | None = None

    # -- the checks ---------------------------------------------------------------------------------
    def check(self, name: str) -> None:
        """Raise :class:`ContractFailure` (or :class:`RuntimeUnavailable`) unless ``name`` holds."""
        problem = getattr(self, "_" + name.replace("-", "_"))()
        if problem:
            raise ContractFailure(problem)

    def _spec(self) -> str | None:
        plugins, bid = self.target.plugins, self.target.backend
        spec, problems = plugins.spec(bid), []
        ok, why = plugins.compiler_available(bid)
        if not ok:
            problems.append(why)
        try:
            plugins.runtime(bid)
        except Exception as exc:
            problems.append(one_line(exc))
        for name, option in spec.runtime_options.items():
            if option.type in ("int", "float") and option.max is None:
                problems.append(f"runtime option '{name}' ({option.type}) has no max: give every numeric runtime option "
                                f"the cap a program file must not exceed")
        if not spec.description.strip():
            problems.append("BackendSpec.description is empty: one line for handoff backends")
        registry = plugins.registry
        for problem in registry.problems:
            if f"'{bid}'" in problem or f" {bid}:" in problem:
                problems.append(f"catalogue: {problem}")
        if bid not in registry.backends:
            problems.append("no catalogue entry: implement the handoff_catalog hook (platforms, compiler, install)")
        if self.plugin_module is None:
            problems.append("the plugin is not a module the runtime can import by name (register a module through "
                            "the handoff.backends entry point)")
        return "; ".join(problems) or None

    def _imports(self) -> str | None:
        if self.plugin_module is None:
            return "the plugin is registered as an object, not an importable module"
        probe = self._run_probe()
        baseline = set(probe["modules"]["baseline"]) | _stdlib()
        own = {self.plugin_module.partition(".")[0], "handoff"}
        if not set(probe["modules"]["runtime"]) - baseline - own:
            # the plugin and runtime modules import nothing beyond handoff: no module they pull can
            # be heavy, and the compiler's child process (torch, the vendor SDK) is not needed
            return None
        compiler = self._compiler_imports()
        heavy = ({"torch"} | set(compiler) | set(probe.get("runtime-modules", {}).get("modules", ()))) - baseline - own
        problems = []
        for what, key, fix in (
                (self.plugin_module, "plugin", "every program load imports it: keep torch and the vendor SDK behind the "
                                               "BackendSpec's compiler and runtime import paths"),
                (self._runtime_module(), "runtime", "import the vendor runtime inside Runtime.load/execute")):
            pulled = sorted(set(probe["modules"][key]) & heavy)
            if pulled:
                problems.append(f"importing {what} imports {', '.join(pulled)} (modules its compiler or a loaded "
                                f"delegate needs): {fix}")
        return "; ".join(problems) or None

    def _foreign_blob(self) -> str | None:
        return self._runtime_check("foreign-blob")

    def _corrupt_blob(self) -> str | None:
        return self._runtime_check("corrupt-blob")

    def _threads(self) -> str | None:
        return self._runtime_check("threads")

    def _runtime_check(self, name: str) -> str | None:
        ok, why = self.target.runtime_available()
        if not ok:
            raise RuntimeUnavailable(why)
        result = self._run_probe()
        if name not in result:
            raise ContractFailure(result.get("error") or f"the runtime probe did not reach the '{name}' check")
        if result[name]["ok"]:
            return None
        return result[name]["message"] or f"the '{name}' check failed"

    # -- child processes ----------------------------------------------------------------------------
    def _runtime_module(self) -> str:
        return self.target.plugins.spec(self.target.backend).runtime.partition(":")[0]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        env["HANDOFF_PLUGINS"] = ",".join(self.env_plugins)
        return env

    def _spawn(self, request: dict[str, Any], name: str) -> tuple[list[dict[str, Any]], str | None]:
        """Run the probe on ``request``: its JSON lines, and what went wrong with the process."""
        path = self.workdir / f"{self.target.backend}-{name}.json"
        path.write_text(json.dumps(request))
        try:
            proc = subprocess.run([sys.executable, "-m", "handoff.conformance.probe", str(path)], env=self._env(),
                                  capture_output=True, text=True, timeout=PROBE_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            return _lines(out), f"hung: no answer within {PROBE_TIMEOUT} s"
        lines = _lines(proc.stdout)
        if proc.returncode < 0:
            sig = signal.Signals(-proc.returncode).name
            return lines, f"crashed the process (killed by {sig})"
        if proc.returncode:
            tail = " ".join(proc.stderr.strip().splitlines()[-1:])[:400]
            return lines, f"the probe process failed (exit {proc.returncode}): {tail}"
        return lines, None

    def _compiler_imports(self) -> list[str]:
        if self._compiler_modules is None:
            spec = self.target.plugins.spec(self.target.backend)
            lines, error = self._spawn({"mode": "compiler", "compiler_module": spec.compiler.partition(":")[0]},
                                       "compiler")
            if error or not lines:
                raise ContractFailure(f"importing the compiler half in a fresh process: {error}")
            self._compiler_modules = lines[-1]["modules"]
        return self._compiler_modules

    def _run_probe(self) -> dict[str, Any]:
        """Run the child once: module lists, and (runtime available) the runtime checks. A check
        that kills the process fails; the child runs again for the checks after it."""
        if self._probe is not None:
            return self._probe
        request: dict[str, Any] = {"backend": self.target.backend, "plugin_module": self.plugin_module,
                                   "runtime_module": self._runtime_module(), "plugins_env": self.env_plugins,
                                   "checks": []}
        result: dict[str, Any] = {}
        if self.target.runtime_available()[0]:
            try:
                request.update(self._probe_delegate(), checks=list(RUNTIME_CHECKS))
            except ContractFailure as exc:
                result["error"] = str(exc)
        while True:
            lines, error = self._spawn(request, "probe")
            for line in lines:
                if line["check"] in ("modules", "runtime-modules"):
                    result[line["check"]] = line
                elif line["ok"] is not None:
                    result[line["check"]] = line
            if "modules" not in result:
                raise ContractFailure(f"importing the plugin and runtime modules in a fresh process: {error}")
            if not error:
                break
            running = [ln["check"] for ln in lines if ln["ok"] is None and ln["check"] not in result]
            if not running:  # before any check: loading or running the good blob
                result["error"] = f"{error} while loading and running the probe delegate"
                break
            result[running[-1]] = {"ok": False, "message": f"{error} during this check"}
            request["checks"] = [c for c in request["checks"] if c not in result]
            if not request["checks"]:
                break
        self._probe = result
        return result

    def _probe_delegate(self) -> dict[str, Any]:
        """The blob, metadata, parsed runtime options and inputs of a case the backend delegates
        whole, as one partition whose inputs are the program's."""
        from .cases import catalogue

        by_name = {c.name: c for c in catalogue()}
        order = [by_name[n] for n in PROBE_CASES if n in by_name] + [c for c in by_name.values()
                                                                     if c.name not in PROBE_CASES]
        bid = self.target.backend
        tried: list[str] = []
        for case in order:
            if "float32" not in case.dtypes:
                continue
            if len(tried) >= 24:
                break
            var = variant(case, "float32", case.fixed_dims())
            try:
                result = lower(self.target, var)
            except CaseFailure:
                continue
            tried.append(case.name)
            if result is None:
                continue
            m = result.assembled.manifest
            if [d["backend"] for d in m["delegates"]] != [bid] or result.report.stats["aten"].nodes:
                continue
            (ins,) = [i for i in m["instructions"] if i["op"] == "delegate"]
            by_value = {i["value"]: n for n, i in enumerate(m["inputs"])}
            if not all(v in by_value for v in ins["inputs"]):
                continue
            arrays, _ = var.inputs(7)
            inputs = [arrays[by_value[v]] for v in ins["inputs"]]
            stem = self.workdir / f"{bid}-{case.name}"
            stem.with_suffix(".blob").write_bytes(result.assembled.segments[m["delegates"][0]["segment"]])
            np.savez(stem.with_suffix(".npz"), *inputs)
            options = self.target.plugins.parse_options(bid, self.target.runtime_options, runtime=True)
            return {"blob": str(stem.with_suffix(".blob")), "inputs": str(stem.with_suffix(".npz")),
                    "metadata": m["delegates"][0]["metadata"], "options": options, "probe_case": case.name}
        raise ContractFailure(f"{bid} delegated none of the cases tried ({', '.join(tried[:8])}...) whole as one "
                              f"partition, so there is no delegate to check its runtime with")


def _lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def _stdlib() -> set[str]:
    return set(sys.stdlib_module_names) | set(sys.builtin_module_names)
