"""handoff's backend conformance suite as a pytest plugin (entry point ``pytest11: handoff``).

``pytest --handoff-backend NAME`` runs, against that backend:

* the contract checks (:mod:`handoff.conformance.contract`), items ``contract[CHECK]``;
* every case of the catalogue (:mod:`handoff.conformance.cases`) in each of its dtypes, at fixed
  dimensions (``CASE[DTYPE-fixed]``) and at dimensions hypothesis draws (``CASE[DTYPE-drawn]``,
  ``--handoff-examples`` of them), and every ``zoo:`` model (``zoo_NAME[float32-fixed]``).

A case passes when the backend declines it with a reason, or when what it claims lowers, loads,
runs and matches eager within the tolerance of its dtype; where the backend's runtime cannot run
here the run half is skipped (the item is skipped with the reason) and the lowering still checked.
``--handoff-expect`` and ``--handoff-xfail`` name the backend's promises and known failures;
``--handoff-report`` writes every result as JSON. The plugin is inert without ``--handoff-backend``
and imports nothing heavy until it is given (it loads in every pytest run where handoff is installed).
"""

from __future__ import annotations

import fnmatch
import json
import os
import platform
import random
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

DTYPES = ("float32", "float16", "int32")
#: ``$HANDOFF_PLUGINS`` as pytest started: a conftest may clear it before the suite builds its plugins.
_ENV_PLUGINS = [m.strip() for m in os.environ.get("HANDOFF_PLUGINS", "").split(",") if m.strip()]
_PROPERTY = "handoff_conformance"
#: A skip carrying this user property is by design (the backend's runtime does not support this
#: platform), not a missing install: the repository's CI rule against skips lets it through.
UNSUPPORTED_PLATFORM = "handoff_unsupported_platform"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("handoff", "handoff backend conformance suite (docs/plugin-guide.md)")
    group.addoption("--handoff-backend", action="append", default=[], metavar="NAME[,NAME]",
                    help="run the conformance suite against these backends ('all': every installed one)")
    group.addoption("--handoff-option", action="append", default=[], metavar="[BACKEND.]NAME=VALUE",
                    help="a compile option for the backend under test (prefix the backend when testing several)")
    group.addoption("--handoff-runtime-option", action="append", default=[], metavar="[BACKEND.]NAME=VALUE",
                    help="a runtime option, likewise")
    group.addoption("--handoff-dtypes", default=",".join(DTYPES), metavar="LIST",
                    help=f"dtypes to run cases in, among {', '.join(DTYPES)} (default: all)")
    group.addoption("--handoff-examples", type=int, default=3, metavar="N",
                    help="hypothesis-drawn dimensions per case and dtype (default 3; 0: fixed dimensions only)")
    group.addoption("--handoff-cases", action="append", default=[], metavar="PATTERN",
                    help="run only cases whose name matches one of these fnmatch patterns (e.g. 'conv*')")
    group.addoption("--handoff-zoo", default="all", metavar="NAMES",
                    help="zoo models to run (comma separated, 'all' or 'none'; default all)")
    group.addoption("--handoff-expect", action="append", default=[], metavar="FILE.yaml",
                    help="ops (and cases) the backend promises to delegate: a case fails when it declines one")
    group.addoption("--handoff-xfail", action="append", default=[], metavar="FILE.yaml",
                    help="known failures with their causes (strict: one that passes is reported)")
    group.addoption("--handoff-report", metavar="FILE.json", help="write every result (per case: delegated nodes, "
                    "lowering time, blob size, max error, SNR) as JSON")
    group.addoption("--handoff-cache", metavar="DIR", help="reuse lowered blobs from this HANDOFF_HOME "
                    "(default: a fresh one per session, so lowering times are real)")
    group.addoption("--handoff-tolerance", metavar="DTYPE", help="compare float outputs with this row of "
                    "handoff.testing.TOLERANCE (e.g. float16 for a backend computing float32 graphs in fp16)")
    group.addoption("--handoff-seed", type=int, metavar="N", help="seed of the drawn dimensions (default: random, "
                    "printed in the header)")


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("handoff_backend"):
        return  # inert: nothing is imported, no item added
    config.addinivalue_line("markers", "handoff_conformance: an item of handoff's backend conformance suite")
    suite = Suite(config)
    config.pluginmanager.register(suite, "handoff-conformance")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(suite), "handoff-conformance-xdist")


def current_platform() -> str:
    """``linux-x86_64``, ``macos-arm64``... as catalogue entries name platforms."""
    system = {"darwin": "macos", "win32": "windows"}.get(sys.platform, sys.platform.rstrip("0123456789"))
    machine = platform.machine().lower()
    return f"{system}-{ {'amd64': 'x86_64', 'aarch64': 'arm64' if system == 'macos' else 'aarch64'}.get(machine, machine)}"


def _split_options(items: list[str], backends: list[str], flag: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {b: {} for b in backends}
    for item in items:
        key, eq, value = item.partition("=")
        backend, dot, name = key.rpartition(".")
        if not eq or not name:
            raise pytest.UsageError(f"{flag} {item!r}: expected [BACKEND.]NAME=VALUE")
        if not dot and len(backends) > 1:
            raise pytest.UsageError(f"{flag} {item!r}: several backends are under test ({', '.join(backends)}); "
                                    f"write BACKEND.{name}={value}")
        for b in ([backend] if dot else backends):
            if b not in out:
                raise pytest.UsageError(f"{flag} {item!r}: backend '{b}' is not under test ({', '.join(backends)})")
            out[b][name] = value
    return out


class _XdistHooks:
    """With pytest-xdist: every worker draws the dimensions from the controller's seed."""

    def __init__(self, suite: "Suite"):
        self.suite = suite

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["handoff_seed"] = self.suite.seed


class Suite:
    """The suite of one pytest session: its options, items, results, report and summary."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.worker = hasattr(config, "workerinput")
        seed = config.getoption("handoff_seed")
        if seed is None:
            seed = config.workerinput.get("handoff_seed") if self.worker else None
        self.seed = int(seed if seed is not None else random.randrange(1 << 31))
        self.examples = int(config.getoption("handoff_examples"))
        if self.examples < 0:
            raise pytest.UsageError("--handoff-examples must be 0 or more")
        self.dtypes = [d.strip() for d in config.getoption("handoff_dtypes").split(",") if d.strip()]
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad or not self.dtypes:
            raise pytest.UsageError(f"--handoff-dtypes: {', '.join(bad) or 'none given'}; choose among {', '.join(DTYPES)}")
        self.requested = [b.strip() for v in config.getoption("handoff_backend") for b in v.split(",") if b.strip()]
        self.results: dict[str, dict[str, Any]] = {}  # backend -> item -> result (controller side)
        self.contract: dict[str, dict[str, Any]] = {}
        self.targets: dict[str, Any] = {}
        from handoff.tempfiles import make_temp_dir

        self._old_home = os.environ.get("HANDOFF_HOME")
        cache = config.getoption("handoff_cache")  # else each process (xdist worker) gets a fresh one
        # private directories a killed run leaves are removed by the next run (handoff.tempfiles)
        self.home, self._own_home = cache or str(make_temp_dir("conformance")), not cache
        os.environ["HANDOFF_HOME"] = self.home
        self.workdir = make_temp_dir("conformance-work")

    # -- collection -------------------------------------------------------------------------------
    def _build_targets(self) -> list[str]:
        from handoff import HandoffError
        from handoff.plugins import AUTOLOAD_ENV, Plugins

        from .expectations import ExpectationError, Expectations, load_xfails
        from .runner import Target

        plugins = Plugins(extra=_ENV_PLUGINS)  # entry points unless $HANDOFF_DISABLE_PLUGIN_AUTOLOAD
        installed = list(plugins.backends)
        backends = installed if self.requested == ["all"] else self.requested
        unknown = [b for b in backends if b not in installed]
        if unknown:
            broken = "".join(f"; {b}" for b in plugins.broken)
            raise pytest.UsageError(f"--handoff-backend: {', '.join(unknown)} not installed; installed: "
                                    f"{', '.join(installed) or 'none'}{broken} (an uninstalled plugin under "
                                    f"development: HANDOFF_PLUGINS=module.plugin)"
                                    + (f"; ${AUTOLOAD_ENV} is set, so installed plugins are not loaded"
                                       if os.environ.get(AUTOLOAD_ENV) else ""))
        options = _split_options(self.config.getoption("handoff_option"), backends, "--handoff-option")
        runtime_options = _split_options(self.config.getoption("handoff_runtime_option"), backends,
                                         "--handoff-runtime-option")
        tolerance = self.config.getoption("handoff_tolerance")
        from handoff.testing import TOLERANCE

        if tolerance is not None and tolerance not in TOLERANCE:
            raise pytest.UsageError(f"--handoff-tolerance {tolerance}: choose a row of handoff.testing.TOLERANCE: "
                                    f"{', '.join(TOLERANCE)}")
        from .cases import catalogue

        names = [c.name for c in catalogue()]
        try:
            expectations = Expectations.load(self.config.getoption("handoff_expect"), names, DTYPES)
            expectations.check_backends(backends)
            self.xfails = load_xfails(self.config.getoption("handoff_xfail"))
        except ExpectationError as exc:
            raise pytest.UsageError(str(exc)) from None
        for bid in backends:
            try:
                plugins.parse_options(bid, options[bid])
                plugins.parse_options(bid, runtime_options[bid], runtime=True)
            except HandoffError as exc:
                raise pytest.UsageError(f"--handoff-option: {exc}") from None
            self.targets[bid] = Target(bid, plugins, options[bid], runtime_options[bid], tolerance, expectations)
        self.plugins = plugins
        return backends

    def _zoo(self) -> list[Any]:
        from .cases import zoo_cases

        zoo = self.plugins.zoo()
        wanted = self.config.getoption("handoff_zoo").strip()
        if wanted == "none":
            return []
        if wanted != "all":
            names = [n.strip() for n in wanted.split(",") if n.strip()]
            unknown = [n for n in names if n not in zoo]
            if unknown:
                raise pytest.UsageError(f"--handoff-zoo: {', '.join(unknown)} not in the zoo ({', '.join(sorted(zoo))})")
            zoo = {n: zoo[n] for n in names}
        return zoo_cases(zoo)

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        from .cases import catalogue, zoo_cases
        from .contract import CHECKS, Contract
        from .expectations import match_xfail

        backends = self._build_targets()
        nodes = {b: BackendNode.from_parent(session, name=f"handoff[{b}]") for b in backends}
        xdist = config.pluginmanager.hasplugin("xdist")
        added: list[pytest.Item] = []

        def add(item: pytest.Item, backend: str, group: str) -> None:
            item.add_marker(pytest.mark.handoff_conformance)
            if xdist:
                item.add_marker(pytest.mark.xdist_group(name=group))
            failure = match_xfail(self.xfails, backend, item.name)
            if failure:
                item.add_marker(pytest.mark.xfail(reason=f"{failure.reason} ({failure.source})", strict=True))
            added.append(item)

        for bid in backends:
            module = _plugin_module(self.plugins, bid)
            contract = Contract(self.targets[bid], module, _ENV_PLUGINS, self.workdir)
            for check in CHECKS:
                add(ContractItem.from_parent(nodes[bid], name=f"contract[{check}]", suite=self, backend=bid,
                                             contract=contract, check=check), bid, f"contract-{bid}")
        self._check_xfails(backends, catalogue() + zoo_cases(self.plugins.zoo()))
        cases = catalogue() + self._zoo()
        patterns = [p for v in config.getoption("handoff_cases") for p in v.split(",") if p.strip()]
        if patterns:
            cases = [c for c in cases if any(fnmatch.fnmatchcase(c.name, p.strip()) for p in patterns)]
            if not cases:
                raise pytest.UsageError(f"--handoff-cases {', '.join(patterns)}: no case matches")
        for case in cases:
            for dtype in (d for d in case.dtypes if d in self.dtypes):
                modes = ["fixed"] + (["drawn"] if self.examples and case.drawable else [])
                for mode in modes:
                    for bid in backends:
                        add(CaseItem.from_parent(nodes[bid], name=f"{case.name}[{dtype}-{mode}]", suite=self,
                                                 backend=bid, case=case, dtype=dtype, mode=mode),
                            bid, f"{case.name}[{dtype}]")
        items.extend(added)

    def _check_xfails(self, backends: list[str], cases: list[Any]) -> None:
        """An xfail entry that names no item the suite has (whatever this run selects) is a typo
        or a case that is gone: a usage error, so the list cannot rot."""
        from .contract import CHECKS
        from .expectations import item_matches

        names = [f"contract[{c}]" for c in CHECKS] + [f"{c.name}[{d}-{m}]" for c in cases for d in c.dtypes
                                                      for m in ("fixed", "drawn")]
        stale = [f for f in self.xfails if (f.backend is not None and f.backend not in backends)
                 or not any(item_matches(n, f.pattern) for n in names)]
        if stale:
            lines = "; ".join(f"{f.source}: {f.pattern!r}" + (f" (backend {f.backend} not under test)"
                                                              if f.backend and f.backend not in backends else "")
                              for f in stale)
            raise pytest.UsageError(f"--handoff-xfail: entries that match no item of the suite: {lines}")

    # -- results ----------------------------------------------------------------------------------
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.worker:
            return
        props = [v for k, v in report.user_properties if k == _PROPERTY]
        if not props or (report.when != "call" and not (report.when == "setup" and report.outcome != "passed")):
            return
        info = props[0]
        bid, item = info["backend"], info["item"]
        outcomes = [p["outcome"] for p in props if "outcome" in p]
        status, cause, message = _status(report, outcomes)
        entry = {"item": item, "status": status, "cause": cause, "message": message, "outcomes": outcomes}
        if info.get("check"):
            self.contract.setdefault(bid, {})[info["check"]] = {"status": status, "message": message}
        else:
            self.results.setdefault(bid, {})[item] = entry

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        return [f"handoff conformance: backends {', '.join(self.requested)}; dtypes {', '.join(self.dtypes)}; "
                f"{self.examples} drawn example(s) per case; seed {self.seed} (rerun with --handoff-seed {self.seed})"]

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.worker or not (self.results or self.contract):
            return
        write = terminalreporter.write_line
        terminalreporter.section("handoff conformance")
        cols = ("passed", "declined", "lowered", "failed", "xfailed", "xpassed")
        write(f"{'backend':<10}" + "".join(f"{c:>10}" for c in cols) + f"{'contract':>10}")
        for bid in sorted(set(self.results) | set(self.contract)):
            counts = _counts(self.results.get(bid, {}))
            contract = self.contract.get(bid, {})
            ok = sum(1 for c in contract.values() if c["status"] in ("passed", "xfailed"))
            write(f"{bid:<10}" + "".join(f"{counts.get(c, 0):>10}" for c in cols) + f"{f'{ok}/{len(contract)}':>10}")
        write("(lowered: the runtime cannot run here; lowering checked, run half skipped)")
        for bid in sorted(self.results):
            causes: dict[str, list[str]] = {}
            for r in self.results[bid].values():
                if r["status"] in ("failed", "xpassed"):
                    causes.setdefault(r["cause"] or r["status"], []).append(r["item"])
            for check, c in self.contract.get(bid, {}).items():
                if c["status"] in ("failed", "xpassed"):
                    causes.setdefault("contract", []).append(check)
            for cause, names in sorted(causes.items(), key=lambda kv: -len(kv[1])):
                shown = ", ".join(names[:6]) + (f", +{len(names) - 6} more" if len(names) > 6 else "")
                write(f"{bid}: {cause} x{len(names)}: {shown}")
        path = self.config.getoption("handoff_report")
        if path:
            write(f"report: {path}")

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        path = self.config.getoption("handoff_report")
        if path and not self.worker:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(self._report(), indent=1))
        if self._old_home is None:
            os.environ.pop("HANDOFF_HOME", None)
        else:
            os.environ["HANDOFF_HOME"] = self._old_home
        if self.home and self._own_home:
            shutil.rmtree(self.home, ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _report(self) -> dict[str, Any]:
        from handoff import __version__
        from handoff.plugins import Plugins

        plugins = self.targets[next(iter(self.targets))].plugins if self.targets else Plugins(extra=_ENV_PLUGINS)
        backends = {}
        for bid in sorted(set(self.results) | set(self.contract)):
            dist, version = (None, None)
            try:
                dist, version = plugins.distribution(bid)
                spec = plugins.spec(bid)
                ok, why = plugins.runtime_available(bid)
            except Exception:  # a worker-only session: the controller never built the targets
                spec, ok, why = None, None, ""
            items = self.results.get(bid, {})
            backends[bid] = {"distribution": dist, "distribution_version": version,
                             "version": spec.version if spec else None, "runtime_available": ok,
                             "runtime_reason": why, "summary": _counts(items),
                             "contract": self.contract.get(bid, {}), "cases": list(items.values())}
        return {"handoff_version": __version__, "platform": current_platform(), "seed": self.seed,
                "dtypes": self.dtypes, "examples": self.examples, "backends": backends}


def _plugin_module(plugins: Any, bid: str) -> str | None:
    obj = plugins.pm.get_plugin(plugins.plugin_of(bid))
    return obj.__name__ if isinstance(obj, type(sys)) else None


def _status(report: pytest.TestReport, outcomes: list[dict[str, Any]]) -> tuple[str, str | None, str]:
    """An item's status for the table: passed, declined, lowered, failed, xfailed or xpassed."""
    failed = [o for o in outcomes if o["status"] == "failed"]
    cause = failed[-1]["cause"] if failed else None
    message = failed[-1]["message"] if failed else ""
    if hasattr(report, "wasxfail"):
        return ("xpassed", "xpassed", f"known failure passed: {report.wasxfail}") if report.passed else \
            ("xfailed", cause, message or str(report.wasxfail))
    if report.failed:
        text = str(report.longrepr)
        if "XPASS(strict)" in text:
            return "xpassed", "xpassed", text.strip()
        return "failed", cause or "internal error", message or text.strip().splitlines()[-1][:500]
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        return "lowered", None, reason
    if outcomes and all(o["status"] == "declined" for o in outcomes):
        return "declined", None, outcomes[-1]["message"]
    return "passed", None, ""


def _counts(items: dict[str, dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in items.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


class BackendNode(pytest.Collector):
    """The parent of one backend's items (``handoff[NAME]``): ``-k NAME`` selects them."""

    def collect(self) -> list[Any]:  # items are made by the suite, not collected from files
        return []


class _SuiteItem(pytest.Item):
    def __init__(self, *, suite: Suite, backend: str, **kw: Any):
        super().__init__(**kw)
        self.suite, self.backend = suite, backend

    def _record(self, **data: Any) -> None:
        self.user_properties.append((_PROPERTY, {"backend": self.backend, "item": self.name, **data}))

    def _skip_run_half(self, why: str) -> None:
        """Skip: the backend's runtime cannot run here (lowering, if any, was checked)."""
        platforms = self.suite.plugins.registry.backends.get(self.backend, {}).get("platforms", [])
        here = current_platform()
        if platforms and here not in platforms and "any" not in platforms:
            self.user_properties.append((UNSUPPORTED_PLATFORM, f"{here} not in {', '.join(platforms)}"))
            why = f"{why} ({self.backend} runs on {', '.join(platforms)}; this is {here})"
        pytest.skip(f"{self.backend}: run half skipped, runtime not available here: {why}")


class ContractItem(_SuiteItem):
    def __init__(self, *, contract: Any, check: str, **kw: Any):
        super().__init__(**kw)
        self.contract, self.check = contract, check

    def runtest(self) -> None:
        from .contract import RuntimeUnavailable

        self._record(check=self.check)
        try:
            self.contract.check(self.check)
        except RuntimeUnavailable as exc:
            self._skip_run_half(str(exc))

    def repr_failure(self, excinfo: Any, style: Any = None) -> str:
        from .contract import ContractFailure

        if isinstance(excinfo.value, ContractFailure):
            return f"{self.backend}: contract check '{self.check}' failed: {excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        from . import contract

        return Path(contract.__file__), None, f"{self.backend}: contract[{self.check}]"


class CaseItem(_SuiteItem):
    def __init__(self, *, case: Any, dtype: str, mode: str, **kw: Any):
        super().__init__(**kw)
        self.case, self.dtype, self.mode = case, dtype, mode

    def runtest(self) -> None:
        from .runner import CaseFailure, run_case

        target = self.suite.targets[self.backend]
        self._record()
        outcomes = []

        def one(dims: dict[str, int]) -> None:
            try:
                outcome = run_case(target, self.case, self.dtype, dims, self.mode)
            except CaseFailure as exc:
                self._record(outcome=exc.outcome.to_json())  # type: ignore[attr-defined]
                raise
            outcomes.append(outcome)
            self._record(outcome=outcome.to_json())

        if self.mode == "fixed":
            one(self.case.fixed_dims())
        else:
            self._drawn(one)
        lowered = [o for o in outcomes if o.status == "lowered"]
        if lowered and all(o.status in ("lowered", "declined") for o in outcomes):
            self._skip_run_half(lowered[0].message.removeprefix("run half skipped: "))

    def _drawn(self, one: Any) -> None:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as with_seed
        from hypothesis import strategies as st

        from .cases import DIMS

        dims = st.fixed_dictionaries({n: st.integers(DIMS[n].lo, DIMS[n].hi) for n in self.case.dim_names})
        seed = self.suite.seed ^ zlib.crc32(f"{self.case.name}[{self.dtype}]".encode())

        @with_seed(seed)
        @settings(max_examples=self.suite.examples, deadline=None, database=None, derandomize=False,
                  phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck), print_blob=False)
        @given(dims=dims)
        def check(dims: dict[str, int]) -> None:
            one(dims)

        check()

    def repr_failure(self, excinfo: Any, style: Any = None) -> str:
        from .runner import CaseFailure

        exc = excinfo.value
        if isinstance(exc, CaseFailure):
            dims = ", ".join(f"{k}={v}" for k, v in exc.outcome.dims.items())  # type: ignore[attr-defined]
            return f"{self.backend}: {self.name} ({dims}): {exc.cause}: {exc.message}"
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        from . import cases

        return Path(cases.__file__), None, f"{self.backend}: {self.name}"
