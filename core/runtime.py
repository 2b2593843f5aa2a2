"""Step 5: load a ``.hof`` program and run it.

``import handoff.runtime`` imports neither torch nor any compiler: backends' runtime halves are
imported when a program that needs them is loaded, and torch only when the program has host ATen
ops. Delegates are initialised once, at load; :meth:`Program.run` only executes.

**Which blob runs each delegate** is decided first, at load, per delegate: its own, or where its
backend is not installed, cannot run here or fails to load it, the first of its fallback copies
(format 1.3) that can (:meth:`Program._load_delegates`). Everything below is planned for the
runtimes so chosen.

**The data path.** Everything :meth:`Program.run` decides is planned once, at load (``_plan``):

* each value's *memory domain*: ``"host"`` (numpy) for inputs, constants and host ops' results,
  and for a delegate's outputs the domain its runtime reports (:meth:`Runtime.memory`);
* for each read, whether the value can be handed over as it is (same domain; or a numpy array,
  which every runtime takes and converts itself) or must first be brought to host memory with
  its producer's :meth:`Runtime.to_host` (a device value read by a host op, another domain, or
  the caller). Conversions are batched: one ``to_host`` call per producing runtime and domain for
  all the values one instruction (or the program's outputs) needs, and each value is converted
  at most once;
* each value's last use: a run drops its reference right after, so memory is held only as long as
  needed (:meth:`Program.stats` reports the peak);
* the locks. A runtime that is not :attr:`Runtime.reentrant` gets one lock per delegate; a run
  takes it before ``execute`` and keeps it until the device values that call returned are no
  longer needed (so the runtime may reuse its output buffers on its next call). Runs take locks
  in program order and never wait for one while holding a later one, so runs on many threads
  cannot deadlock;
* host ops' arguments, decoded from the manifest's JSON encoding into torch objects.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from . import hostops, probe
from .backend import HOST_MEMORY
from .errors import FallbackWarning, HandoffError, one_line
from .limits import RUN_BYTES_NOTE, check_run_bytes
from .native import admit
from .plugins import Plugins, get_plugins
from .program import ProgramFile, _keep_newest, constant_array, io_specs, value_nbytes
from .quiet import quiet_native

TORCH_HINT = "pip install torch==2.13.0"
#: A program output is copied before it is returned when it could share memory with a caller's
#: input or the program file (a delegate may hand an input back, TVM's DLPack views alias). Up to
#: this size a copy costs less than checking, so small outputs are always copied; an output its
#: delegate's runtime declares fresh (:attr:`Runtime.fresh_outputs`) is never.
COPY_BELOW_BYTES = 1 << 16

#: The next step after a delegate broke the contract (an output the program does not declare).
CONTRACT_HINT = "; the backend broke its contract: re-partition without it, or report it to its authors"

#: runtime classes that have loaded a delegate in this process (see ``_load_delegates``): the
#: vendor library behind a class initialises once per process
_LOADED: set[type] = set()

# Kinds of planned operations (the first field of each tuple in ``Program._ops``).
_DELEGATE, _TO_HOST, _ATEN = 0, 1, 2


class _Plan(NamedTuple):
    """What :meth:`Program._make_plan` decides for one manifest (see there), delegates by index."""

    ops: tuple[tuple[Any, ...], ...]
    held_before: tuple[tuple[int, ...], ...]  # per op: the delegates whose locks are held before it
    slots: int
    domain: dict[int, str]
    host_slot: dict[int, int]
    input_plan: tuple[tuple[Any, ...], ...]
    output_plan: tuple[tuple[int, bool | None], ...]  # (slot, True: copy; False: copy if it may alias; None: fresh)
    peak_bytes: int
    host_transfers: int


#: plans made in this process (:meth:`Program._plan`), by manifest digest and runtime answers
_PLANS: dict[tuple[Any, ...], _Plan] = {}
_MAX_PLANS = 64


class _LoadPlan(NamedTuple):
    """What a load decides before any delegate loads, from the manifest, the plugins and the
    options (:meth:`Program._decide`): shared by later loads of the unchanged recorded file (whose
    read-only manifest is the same object) with the same plugins, options and ``strict``."""

    manifest: Mapping[str, Any]  # held: these three objects' ids are in the plan's key
    plugins: Plugins
    table: Any  # the plugins' backend table the plan was made with
    aten_ops: Mapping[int, Any]  # host ops, resolved and checked
    parsed: Mapping[str, Mapping[str, Any]]  # per backend used and installed: its checked runtime options (read-only)
    asked: tuple[tuple[str, bool, str], ...]  # each installed backend's runtime_available() answer it relied on
    tries: tuple[tuple[int, ...], ...]  # per delegate: the entries to try, in order
    skipped: tuple[tuple[tuple[int, str], ...], ...]  # per delegate: (entry, why not) of those left out
    native: tuple[tuple[int, int], ...]  # first tries whose runtime loads native code (trusted at each load)


#: load plans made in this process, by (id of the manifest, of the plugins, of their backend table,
#: options, strict); only for recorded files, whose manifest later opens of the unchanged file share
_LOAD_PLANS: dict[tuple[Any, ...], _LoadPlan] = {}
_MAX_LOAD_PLANS = 64


class _Loaded(NamedTuple):
    """How a load with a :class:`_LoadPlan` that leaves each delegate one entry to try went: what
    later loads with that plan repeat (:meth:`Program._load_again`) instead of deciding it again."""

    plan: _LoadPlan
    #: per delegate: the entry loaded (index, manifest entry) and what vouching for it takes (Program._vouching)
    entries: tuple[tuple[int, Mapping[str, Any], tuple[str, str, str] | None], ...]
    choices: tuple[tuple[int | None, str, str | None], ...]  # Program.choices
    fallbacks: bool  # whether some delegate runs a fallback copy (a warning on every load)
    runtimes: tuple[Any, ...]  # the runtime of each delegate ...
    memory: list[str]  # ... and its memory domain, which the run plan was made for
    run: _Plan


#: the last load with each kept load plan, by the same key (:data:`_LOAD_PLANS`)
_LOADS: dict[tuple[Any, ...], _Loaded] = {}


class _RunError(HandoffError):
    """A failure the core detected itself during a run (its message already says where)."""


class _Ref:
    """Placeholder for a value's tensor in a host op's decoded arguments."""

    __slots__ = ("slot",)

    def __init__(self, slot: int) -> None:
        self.slot = slot


class _RefList(list):  # type: ignore[type-arg]
    """A decoded argument list holding :class:`_Ref` placeholders, rebuilt on every run."""


class Program:
    """A loaded program. Use :func:`load`; close it (or use ``with``) to release the delegates.

    :meth:`run` may be called from many threads at once (module docstring: the locks)."""

    def __init__(self, file: ProgramFile, plugins: Plugins, options: Mapping[str, Mapping[str, str]],
                 trusted_keys: Sequence[Any] = (), allow_unsigned: bool = False, strict: bool = False):
        self.file = file
        self.manifest = file.manifest
        self._handles: list[tuple[Any, Any]] = []  # (runtime, handle) per delegate
        self._closed = False
        #: how the program's native code was trusted, or None when it has none
        self.trust: str | None = None
        self._runs = 0
        self._runs_lock = threading.Lock()
        start = time.perf_counter()
        try:
            # A file must not size the host's allocations at will; the unchanged file's record
            # keeps the total (computed from the manifest its digest names), so this is a compare.
            noted = file.notes.get(RUN_BYTES_NOTE) if file.recorded else None
            total = check_run_bytes(self.manifest, file.name, int(noted) if noted and noted.isdigit() else None)
            if noted is None:
                file.note(RUN_BYTES_NOTE, str(total))
            constants = self.manifest["constants"]
            self._constants = {c["value"]: constant_array(file, i) for i, c in enumerate(constants)} if constants else {}
            plan, key = self._load_plan(plugins, options, strict)
            self._aten_ops = plan.aten_ops
            if self._aten_ops:
                import torch

                self._torch_constants = {vid: torch.from_numpy(np.array(arr)) for vid, arr in self._constants.items()}
            loaded = _LOADS.get(key) if key is not None else None  # type: ignore[arg-type]
            again = loaded is not None and loaded.plan is plan
            if again:
                self._load_again(loaded, plugins, trusted_keys, allow_unsigned, strict)  # type: ignore[arg-type]
            else:
                self._load_delegates(plan, plugins, trusted_keys, allow_unsigned, strict)
                run = self._plan()
            # every segment checked: later loads of the unchanged file skip the checks
            if file.remember_verified() and key is not None and not again:
                if _LOAD_PLANS.get(key) is not plan:
                    _keep_newest(_LOAD_PLANS, key, plan, _MAX_LOAD_PLANS)
                if all(len(t) == 1 for t in plan.tries):
                    entries = tuple((t[0], entry, self._vouching(entry, rt, plugins))
                                    for t, d, (rt, _) in zip(plan.tries, self.manifest["delegates"], self._handles)
                                    for entry in [_candidates(d)[t[0]]])
                    _keep_newest(_LOADS, key, _Loaded(plan, entries, tuple(self.choices),
                                                      any(c[0] is not None for c in self.choices),
                                                      tuple(rt for rt, _ in self._handles), list(self._memory), run),
                                 _MAX_LOAD_PLANS)
        except BaseException:
            self.close()
            raise
        self.load_seconds = time.perf_counter() - start

    # -- load ----------------------------------------------------------------------------------
    def _load_plan(self, plugins: Plugins, options: Mapping[str, Mapping[str, str]],
                   strict: bool) -> tuple[_LoadPlan, tuple[Any, ...] | None]:
        """This load's :class:`_LoadPlan` and its key (None: not to be kept): an earlier load's
        when it was made for this very manifest object (the unchanged recorded file: the file's
        record key and header, :class:`~handoff.program.ProgramFile`), the same plugins and backend
        table (a plugin registered or set since makes a new table), options and ``strict``, and
        every runtime still answers ``is_available()`` as it did (asked again on every load)."""
        table = plugins._backend_table()
        try:
            given = tuple(sorted((b, tuple(sorted(o.items()))) for b, o in options.items())) if options else ()
            key: tuple[Any, ...] | None = (id(self.manifest), id(plugins), id(table), given, strict)
            plan = _LOAD_PLANS.get(key)  # type: ignore[arg-type]
        except TypeError:  # an option value that cannot be hashed: decided for this load only
            key = plan = None
        if plan is not None:
            for backend, ok, why in plan.asked:
                if plugins.runtime_available(backend) != (ok, why):
                    return self._decide(plugins, table, options, strict), key
            return plan, key
        return self._decide(plugins, table, options, strict), key

    def _decide(self, plugins: Plugins, table: Any, options: Mapping[str, Mapping[str, str]],
                strict: bool) -> _LoadPlan:
        """Decide what :meth:`_load_delegates` tries (:class:`_LoadPlan`): host ops resolved, options
        checked and parsed, and per delegate its own blob when its backend is installed and
        available here, then, unless ``strict``, its fallback copies whose backends are."""
        aten_ops = self._resolve_aten_ops()
        delegates = self.manifest["delegates"]
        used = sorted({e["backend"] for d in delegates for e in _candidates(d)})
        for backend in options:
            if backend not in used:
                raise HandoffError(f"{self.file.name}: options given for backend '{backend}', which this program does "
                                   f"not use; it uses: {', '.join(used) or 'none'}")
        parsed = {b: MappingProxyType(plugins.parse_options(b, options.get(b, {}), runtime=True))
                  for b in used if b in table}
        asked: dict[str, tuple[bool, str]] = {}
        why_not: dict[str, str | None] = {}  # backend -> why its runtime cannot be used here, or None

        def unusable(backend: str) -> str | None:
            if backend not in why_not:
                if backend not in table:
                    why_not[backend] = plugins.not_installed_message(backend)
                else:
                    ok, reason = asked[backend] = plugins.runtime_available(backend)
                    why_not[backend] = None if ok else f"backend '{backend}' cannot run here: {reason}"
            return why_not[backend]

        # Which entry each delegate tries first, and which after it, chosen before anything loads.
        tries: list[tuple[int, ...]] = []
        skipped: list[tuple[tuple[int, str], ...]] = []  # per delegate: (candidate, why not) in order
        for i, d in enumerate(delegates):
            candidates = _candidates(d) if not strict else [d]
            order, why = [], []
            for k, entry in enumerate(candidates):
                reason = unusable(entry["backend"])
                if reason is None:
                    order.append(k)
                else:
                    why.append((k, reason))
            if not order:
                raise HandoffError(self._cannot_run(i, why, strict, table))
            tries.append(tuple(order))
            skipped.append(tuple(why))
        native = tuple((i, order[0]) for i, order in enumerate(tries)
                       if plugins.runtime(_candidates(delegates[i])[order[0]]["backend"]).native_code)
        return _LoadPlan(self.manifest, plugins, table, MappingProxyType(aten_ops), MappingProxyType(parsed),
                         tuple((b, *a) for b, a in asked.items()), tuple(tries), tuple(skipped), native)

    def _load_delegates(self, plan: _LoadPlan, plugins: Plugins, trusted_keys: Sequence[Any],
                        allow_unsigned: bool, strict: bool) -> None:
        """Resolve each delegate on its own (docs/format.md, "Fallback copies"), as ``plan`` says:
        its own blob when its backend is installed, available here and loads it; else, unless
        ``strict``, the first of its fallback copies that does, with one :class:`FallbackWarning`
        for the whole load."""
        delegates = self.manifest["delegates"]
        parsed, tries = plan.parsed, plan.tries
        admitted: set[tuple[int, int]] = set()

        def admit_native(picks: Sequence[tuple[int, int]]) -> None:
            native = [(i, k) for i, k in picks if (i, k) not in admitted
                      and plugins.runtime(_candidates(delegates[i])[k]["backend"]).native_code]
            if native:  # before these delegates load: a file's native code runs only if the user trusts it
                self.trust = admit(self.file, [(self._entry_name(i, k), _candidates(delegates[i])[k])
                                               for i, k in native], trusted_keys, allow_unsigned)
                admitted.update(native)

        if plan.native:
            admit_native(plan.native)
        self._memory: list[str] = []
        #: per delegate: (fallback copy index or None, backend id whose runtime runs it, why not its own)
        self.choices: list[tuple[int | None, str, str | None]] = []
        for i, d in enumerate(delegates):
            candidates = _candidates(d)
            why = list(plan.skipped[i])
            for n, k in enumerate(tries[i]):
                entry = candidates[k]
                if n:
                    admit_native([(i, k)])
                runtime = plugins.runtime(entry["backend"])
                try:
                    handle = self._load_entry(i, k, entry, runtime, self._vouching(entry, runtime, plugins),
                                              parsed[entry["backend"]])
                except Exception as exc:
                    why.append(self._failed(k, entry, exc))
                    if n + 1 < len(tries[i]):
                        continue
                    self._raise_load_error(i, k, exc, why, strict, plan.table)
                break
            self._handles.append((runtime, handle))
            reason = next((r for j, r in why if j == 0), None)
            self.choices.append((None if k == 0 else k - 1, entry["backend"], reason))
            self._memory.append(self._memory_of(i, runtime, handle))
        self._warn_fallbacks()

    def _load_again(self, loaded: _Loaded, plugins: Plugins, trusted_keys: Sequence[Any], allow_unsigned: bool,
                    strict: bool) -> None:
        """:meth:`_load_delegates` and :meth:`_plan` for a load plan that an earlier load of the
        unchanged file carried out (``loaded``): each delegate's one entry is loaded (trusted,
        vouched for and checked as there; a failure is the same error) and, when the runtimes
        are the same and report the same memory domains, bound to that load's run plan."""
        plan = loaded.plan
        if plan.native:  # trust is decided on every load: keys and signatures may have changed
            delegates = self.manifest["delegates"]
            self.trust = admit(self.file, [(self._entry_name(i, k), _candidates(delegates[i])[k])
                                           for i, k in plan.native], trusted_keys, allow_unsigned)
        self.choices = list(loaded.choices)
        self._memory = []
        same = True  # the same runtimes as that load's
        for i, (k, entry, vouching) in enumerate(loaded.entries):
            runtime = plugins.runtime(entry["backend"])
            same = same and runtime is loaded.runtimes[i]
            try:
                handle = self._load_entry(i, k, entry, runtime, vouching, plan.parsed[entry["backend"]])
            except Exception as exc:
                self._raise_load_error(i, k, exc, [*plan.skipped[i], self._failed(k, entry, exc)], strict, plan.table)
            self._handles.append((runtime, handle))
            self._memory.append(self._memory_of(i, runtime, handle))
        if loaded.fallbacks:
            self._warn_fallbacks()
        if same and self._memory == loaded.memory:
            self._bind(loaded.run)
        else:
            self._plan()

    @staticmethod
    def _vouching(entry: Mapping[str, Any], runtime: Any, plugins: Plugins) -> tuple[str, str, str] | None:
        """For a runtime that isolates untrusted blobs (:mod:`handoff.probe`), what vouching for
        ``entry``'s blob takes: the name of the file's note keeping its key, the backend's version
        and its runtime's reference; ``None`` for any other runtime."""
        if not runtime.isolate_untrusted:
            return None
        spec = plugins.spec(entry["backend"])
        return probe.note_name(entry["segment"], entry["backend"], spec.version), spec.version, spec.runtime

    def _load_entry(self, i: int, k: int, entry: Mapping[str, Any], runtime: Any,
                    vouching: tuple[str, str, str] | None, options: Mapping[str, Any]) -> Any:
        """Delegate ``i``'s entry ``k`` loaded by ``runtime``: its blob checked and, with
        ``vouching`` (:meth:`_vouching`), vouched for first: its vendor runtime may crash on a bad
        blob, so one not known yet is checked in another process."""
        blob = self.file._blob(entry["segment"])
        if vouching is not None:
            note, version, ref = vouching
            self.file.note(note, probe.vouch(
                lambda: self._load_where(i, k), entry, lambda: self._call_inputs(i),
                version, ref, blob, options, key=self.file.notes.get(note)))
        if type(runtime) in _LOADED:
            return runtime.load(blob, entry["metadata"], options)
        # Vendor runtimes print when they initialise, i.e. on their first load in a process; only
        # that one is redirected (ExecuTorch 1.5.1 loaded ~6 ms slower with fd 2 redirected).
        with quiet_native():
            handle = runtime.load(blob, entry["metadata"], options)
        _LOADED.add(type(runtime))
        return handle

    def _failed(self, k: int, entry: Mapping[str, Any], exc: Exception) -> tuple[int, str]:
        """Why entry ``k`` (``entry``) does not run its delegate: its runtime's load raised ``exc``."""
        return k, f"backend '{entry['backend']}' failed to load its blob ({self._blob_at(entry)}): {one_line(exc)}"

    def _raise_load_error(self, i: int, k: int, exc: Exception, why: Sequence[tuple[int, str]], strict: bool,
                          table: Mapping[str, Any]) -> None:
        """Raise the error for delegate ``i`` whose last entry to try, ``k``, failed to load with
        ``exc``; ``why``: per entry left out or tried, why not (the last: ``k``'s failure)."""
        if len(why) > 1:
            raise HandoffError(self._cannot_run(i, why, strict, table)) from exc
        hint = self._strict_hint(self.manifest["delegates"][i]) if strict else ""
        if isinstance(exc, HandoffError) and not hint:
            raise exc
        text = str(exc) if isinstance(exc, HandoffError) else f"{self._load_where(i, k)} failed to load: {one_line(exc)}"
        raise HandoffError(text + hint) from exc

    def _memory_of(self, i: int, runtime: Any, handle: Any) -> str:
        try:
            return str(runtime.memory(handle))
        except Exception as exc:
            raise HandoffError(f"{self.file.name}: {self._delegate_name(i)} cannot say where its outputs live "
                               f"(Runtime.memory): {one_line(exc)}") from exc

    def _cannot_run(self, i: int, why: Sequence[tuple[int, str]], strict: bool, installed: Mapping[str, Any]) -> str:
        """The one-line error for delegate ``i``, none of whose entries can run: ``why`` says,
        per entry tried (0: its own blob, k: fallback copy k - 1), why not."""
        d = self.manifest["delegates"][i]
        if len(why) == 1 and why[0][0] == 0:  # its own backend only: the messages of programs without copies
            reason = why[0][1]
            text = f"{self.file.name}: {reason}" if d["backend"] in installed else f"{self.file.name}: delegate {i} needs {reason}"
            return text + (self._strict_hint(d) if strict else "")
        parts = [f"{'its own blob' if k == 0 else f'fallback copy {k - 1}'}: {reason}" for k, reason in why]
        return f"{self.file.name}: delegate {i} ({d['partition']}) cannot run here: {'; '.join(parts)}"

    @staticmethod
    def _strict_hint(d: Mapping[str, Any]) -> str:
        """What a strict load left unused, and how to use it ("" when the delegate has no copies)."""
        copies = d.get("fallbacks", [])
        if not copies:
            return ""
        one = len(copies) == 1
        return (f"; strict: its fallback cop{'y' if one else 'ies'} (backend "
                f"{', '.join(repr(c['backend']) for c in copies)}) not used: load without strict=True "
                f"(handoff run without --strict) to run {'it' if one else 'them'}")

    def _warn_fallbacks(self) -> None:
        """One warning per load naming every delegate that runs a fallback copy, and why."""
        groups: dict[tuple[str, str], list[int]] = {}
        for i, (copy, backend, reason) in enumerate(self.choices):
            if copy is not None:
                groups.setdefault((str(reason), backend), []).append(i)
        if not groups:
            return
        delegates = self.manifest["delegates"]
        parts = []
        for (reason, backend), users in groups.items():
            one = len(users) == 1
            listed = ", ".join(f"{i} ({delegates[i]['partition']}, backend '{delegates[i]['backend']}')" for i in users)
            copies = ", ".join(sorted({str(self.choices[i][0]) for i in users}))
            parts.append(f"delegate{'' if one else 's'} {listed} run{'s' if one else ''} {'its' if one else 'their'} "
                         f"fallback cop{'y' if one else 'ies'} {copies} (backend '{backend}') because {reason}")
        warnings.warn(FallbackWarning(f"{self.file.name}: {'; '.join(parts)}; load with strict=True (handoff run "
                                      f"--strict) to refuse instead"), stacklevel=5)  # the caller of load()

    def _call_inputs(self, i: int) -> list[tuple[list[int], str]]:
        """``(shape, dtype)`` of delegate ``i``'s inputs where the program calls it (for a probe)."""
        values = self.manifest["values"]
        calls = [ins for ins in self.manifest["instructions"] if ins["op"] == "delegate" and ins["delegate"] == i]
        return [(values[v]["shape"], values[v]["dtype"]) for v in (calls[0]["inputs"] if calls else [])]

    def _load_where(self, i: int, k: int) -> str:
        """The file and delegate ``i``'s entry ``k``, with where its blob lies: how load errors begin."""
        return f"{self.file.name}: {self._entry_name(i, k, at=True)}"

    def _entry_name(self, i: int, k: int, at: bool = False) -> str:
        """Delegate ``i``'s entry ``k`` (0: its own blob, k: its fallback copy k - 1) in messages;
        ``at``: with where its blob lies in the file (:meth:`_blob_at`), for load errors."""
        d = self.manifest["delegates"][i]
        where = f", {self._blob_at(_candidates(d)[k])}" if at else ""
        if k == 0:
            return f"delegate {i} ({d['partition']}, backend '{d['backend']}'{where})"
        return (f"delegate {i} ({d['partition']}, fallback copy {k - 1}, backend "
                f"'{d['fallbacks'][k - 1]['backend']}'{where})")

    def _blob_at(self, entry: Mapping[str, Any]) -> str:
        """Where ``entry``'s blob lies in the program file: "segment S at offset N" (the reader has
        checked that the segment exists)."""
        segment = entry["segment"]
        return f"segment {segment} at offset {self.file.manifest['segments'][segment]['offset']}"

    def _delegate_name(self, i: int) -> str:
        copy = self.choices[i][0] if i < len(self.choices) else None
        return self._entry_name(i, 0 if copy is None else copy + 1)

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
            import torch  # noqa: F401  -- host ops run on it
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
        return resolved

    def _plan(self) -> _Plan:
        """Decide, once, everything :meth:`run` does (module docstring): ``self._ops``, a list of
        tuples :meth:`run` executes in order, and the figures :meth:`stats` reports.

        The decisions depend only on the manifest (named by its SHA-256, which the file's header
        holds and opening checks against its bytes) and on what the chosen runtimes say about
        their handles, so they are made once per process for each such key (:data:`_PLANS`) and
        bound here to this load's runtimes, handles, locks and constants. Returns the plan."""
        reentrant = tuple(bool(getattr(rt, "reentrant", False)) for rt, _ in self._handles)
        fresh = tuple(bool(getattr(rt, "fresh_outputs", False)) for rt, _ in self._handles)
        key = (self.file._manifest_sha256, tuple(self.choices), tuple(self._memory), reentrant, fresh)
        plan = _PLANS.get(key)
        if plan is None:
            plan = self._make_plan(list(reentrant), fresh)
            _keep_newest(_PLANS, key, plan, _MAX_PLANS)
        self._bind(plan)
        return plan

    def _make_plan(self, reentrant: list[bool], fresh: Sequence[bool]) -> _Plan:
        """The decisions of :meth:`_plan`, naming delegates by index (bound by :meth:`_bind`).

        Slots: value ``v`` lives in ``env[v]`` in its producer's domain; a device value that must
        also exist in host memory gets a second slot, ``env[n + k]``, for its host copy."""
        m = self.manifest
        values, instructions = m["values"], m["instructions"]
        n = len(values)
        expect = [(tuple(v["shape"]), np.dtype(v["dtype"])) for v in values]
        domain: dict[int, str] = {i["value"]: HOST_MEMORY for i in m["inputs"]}
        domain.update((vid, HOST_MEMORY) for vid in self._constants)
        producer: dict[int, int] = {}  # device value -> delegate index
        calls = [0] * len(self._handles)
        for ins in instructions:
            if ins["op"] == "delegate":
                calls[ins["delegate"]] += 1
        # A non-reentrant device delegate called by more than one instruction would overwrite the
        # outputs of its earlier call that are still needed: its outputs go to host memory at once.
        eager = [self._memory[d] != HOST_MEMORY and not reentrant[d] and calls[d] > 1 for d in range(len(calls))]

        host_slot: dict[int, int] = {}  # device value -> slot of its host copy
        first_need: dict[int, int] = {}  # device value -> instruction (len(instructions): the outputs) needing it on the host
        transfers = 0

        def host_copy(vid: int, at: int) -> int:
            if vid not in host_slot:
                host_slot[vid] = n + len(host_slot)
                first_need[vid] = at
            return host_slot[vid]

        reads: list[tuple[int, ...]] = []  # per instruction: the slots it reads, in order
        made_fresh: set[int] = set()  # host values a Runtime.fresh_outputs delegate returned itself
        for k, ins in enumerate(instructions):
            if ins["op"] == "delegate":
                d = ins["delegate"]
                mine = self._memory[d]
                slots = []
                for vid in ins["inputs"]:
                    if domain[vid] == mine:
                        slots.append(vid)
                    elif domain[vid] == HOST_MEMORY:
                        slots.append(vid)
                        transfers += 1  # numpy into a device runtime, which converts it
                    else:
                        slots.append(host_copy(vid, k))
                        transfers += mine != HOST_MEMORY
                reads.append(tuple(slots))
                out_domain = HOST_MEMORY if eager[d] else mine
                if mine == HOST_MEMORY and fresh[d]:
                    made_fresh.update(ins["outputs"])
                for vid in ins["outputs"]:
                    domain[vid] = out_domain
                    if out_domain != HOST_MEMORY:
                        producer[vid] = d
                transfers += eager[d] * len(ins["outputs"])
            else:
                slots = [vid if domain[vid] == HOST_MEMORY else host_copy(vid, k) for vid in _value_ids(ins)]
                reads.append(tuple(slots))
                for vid in ins["outputs"]:
                    if vid is not None:
                        domain[vid] = HOST_MEMORY
        end = len(instructions)
        outputs = [o["value"] for o in m["outputs"]]
        out_slots = [vid if domain[vid] == HOST_MEMORY else host_copy(vid, end) for vid in outputs]
        transfers += len(host_slot)

        # Conversions, batched per producing runtime and domain, just before the first need.
        batches: dict[int, dict[tuple[int, str], list[int]]] = {}
        for vid, at in first_need.items():
            d = producer[vid]
            key = (id(self._handles[d][0]), self._memory[d])
            batches.setdefault(at, {}).setdefault(key, []).append(vid)

        # The operations, in order, with what each reads and writes (for liveness and locks).
        ops: list[list[Any]] = []
        op_reads: list[tuple[int, ...]] = []
        op_writes: list[tuple[int, ...]] = []
        op_lock: list[int | None] = []  # the delegate whose lock an op takes
        locks = [None if reentrant[d] else d for d in range(len(self._handles))]

        def add_conversions(at: int) -> None:
            for group in batches.get(at, {}).values():
                src = tuple(group)
                dst = tuple(host_slot[v] for v in group)
                names = sorted({producer[v] for v in group})
                delegates = m["delegates"]
                listed = ", ".join(f"{d} ({delegates[d]['partition']})" for d in names)
                where = (f"delegate{'s' if len(names) > 1 else ''} {listed} (backend '{self.choices[names[0]][1]}'): "
                         f"reading {'their' if len(names) > 1 else 'its'} outputs into host memory")
                checks = tuple((expect[v][0], expect[v][1], v, producer[v]) for v in group)
                ops.append([_TO_HOST, producer[group[0]], src, dst, checks, where])
                op_reads.append(src)
                op_writes.append(dst)
                op_lock.append(None)

        for k, ins in enumerate(instructions):
            add_conversions(k)
            writes = tuple(ins["outputs"])
            if ins["op"] == "delegate":
                d = ins["delegate"]
                # Numpy outputs are checked as they arrive; device values' shapes too where they
                # have one (a tuple compare), their dtypes when they are brought to the host.
                checks = tuple((expect[v][0], expect[v][1], v) for v in writes)
                host_out = domain[writes[0]] == HOST_MEMORY if writes else True
                ops.append([_DELEGATE, d, locks[d], reads[k], writes, host_out, checks, eager[d], self._delegate_name(d)])
                op_lock.append(locks[d])
            else:
                ops.append([_ATEN, k, writes,
                            tuple(None if v is None else (expect[v][0], expect[v][1], v) for v in writes),
                            f"instruction {k} ({ins['target']})"])
                op_lock.append(None)
            op_reads.append(reads[k])
            op_writes.append(tuple(v for v in writes if v is not None))
        add_conversions(end)

        # Liveness: each slot's last reader (the outputs count as a reader after every op).
        last = len(ops)
        last_read: dict[int, int] = {}
        for j, slots in enumerate(op_reads):
            for s in slots:
                last_read[s] = j
        for s in out_slots:
            last_read[s] = last
        drops: list[list[int]] = [[] for _ in ops]
        born: dict[int, int] = {i["value"]: -1 for i in m["inputs"]}
        for j, slots in enumerate(op_writes):
            born.update((s, j) for s in slots)
        for s, j in born.items():
            when = last_read.get(s, max(j, 0))  # never read: dropped right after it is made
            if when < last and ops:
                drops[when].append(s)

        # Locks: held from the delegate's call until the last read of the device values it made.
        releases: list[list[int]] = [[] for _ in ops]
        for j, lock in enumerate(op_lock):
            if lock is None:
                continue
            mine = [last_read.get(s, j) for s in op_writes[j] if s < n and domain[s] != HOST_MEMORY]
            releases[min(max([j, *mine]), len(ops) - 1)].append(lock)
        held: list[int] = []
        held_before: list[tuple[int, ...]] = []
        for j in range(len(ops)):
            held_before.append(tuple(held))
            if op_lock[j] is not None:
                held.append(op_lock[j])
            for lock in releases[j]:
                held.remove(lock)

        # Bytes held at once (inputs and every value a run makes; constants live in the file).
        value_of = {slot: vid for vid, slot in host_slot.items()}
        size = {s: value_nbytes(values[s if s < n else value_of[s]]) for s in born}
        live = sum(size[i["value"]] for i in m["inputs"] if i["value"] in size)
        peak = live
        for j in range(len(ops)):
            live += sum(size[s] for s in op_writes[j])
            peak = max(peak, live)
            live -= sum(size[s] for s in drops[j])

        for j, op in enumerate(ops):
            op.insert(-1, tuple(drops[j]))
            op.insert(-1, tuple(releases[j]))
        input_plan = [(i["name"], i["value"], *expect[i["value"]]) for i in m["inputs"]]
        constant_or_input = set(self._constants) | {i["value"] for i in m["inputs"]}
        seen: set[int] = set()
        output_plan = []
        for vid, slot in zip(outputs, out_slots):
            copy = vid in constant_or_input or slot in seen
            output_plan.append((slot, None if not copy and slot in made_fresh else copy))
            seen.add(slot)
        return _Plan(tuple(tuple(op) for op in ops), tuple(held_before), n + len(host_slot), domain, host_slot,
                     tuple(input_plan), tuple(output_plan), peak, transfers)

    def _bind(self, plan: _Plan) -> None:
        """Make :meth:`run`'s operations from ``plan`` with this load's runtimes, handles, locks
        (new ones: a lock guards one handle) and constants."""
        handles = self._handles
        locks = [threading.Lock() for _ in handles]
        instructions = self.manifest["instructions"]
        ops = []
        for op in plan.ops:
            kind, *rest = op
            releases = tuple(locks[d] for d in op[-2]) if op[-2] else ()  # reentrant delegates: no locks
            if kind == _DELEGATE:
                d, locked, reads, writes, host_out, checks, eager, drops, _, where = rest
                runtime, handle = handles[d]
                lock = None if locked is None else locks[d]
                ops.append((_DELEGATE, runtime.execute, handle, lock, reads, writes, host_out, checks,
                            runtime.to_host if eager else None, drops, releases, where))
            elif kind == _TO_HOST:
                d, src, dst, checks, drops, _, where = rest
                ops.append((_TO_HOST, handles[d][0].to_host, src, dst, checks, drops, releases, where))
            else:
                k, writes, checks, drops, _, where = rest
                args, kwargs = self._aten_arguments(instructions[k], plan.domain, plan.host_slot)
                ops.append((_ATEN, self._aten_ops[k], args, kwargs, writes, checks, drops, releases, where))
        self._ops = ops
        self._held_before = [tuple(locks[d] for d in held) if held else () for held in plan.held_before]
        self._env0: list[Any] = [None] * plan.slots
        for vid, arr in self._constants.items():
            self._env0[vid] = arr
        self._input_plan, self._output_plan = plan.input_plan, plan.output_plan
        self._peak_bytes, self._host_transfers = plan.peak_bytes, plan.host_transfers

    def _aten_arguments(self, ins: Mapping[str, Any], domain: Mapping[int, str],
                        host_slot: Mapping[int, int]) -> tuple[Any, Any]:
        """A host op's arguments decoded once: torch objects, with a :class:`_Ref` where a run
        puts a value's tensor (constants' tensors are made here, once)."""
        def tensor(vid: int) -> Any:
            if vid in self._torch_constants:
                return self._torch_constants[vid]
            return _Ref(vid if domain[vid] == HOST_MEMORY else host_slot[vid])

        args = _with_refs(_decode(list(ins["args"]), tensor))
        kwargs = {k: _with_refs(_decode(v, tensor)) for k, v in ins["kwargs"].items()}
        return args, kwargs

    # -- signature -----------------------------------------------------------------------------
    @property
    def input_specs(self) -> list[tuple[str, tuple[int, ...], str]]:
        """``(name, shape, dtype)`` of each input."""
        return io_specs(self.manifest)[0]

    @property
    def output_specs(self) -> list[tuple[str, tuple[int, ...], str]]:
        return io_specs(self.manifest)[1]

    # -- run -----------------------------------------------------------------------------------
    def run(self, inputs: Sequence[Any] | Mapping[str, Any]) -> list[np.ndarray]:
        """Run the program. ``inputs``: numpy arrays or torch tensors, in order or by name.
        Returns numpy arrays in output order, which share memory with nothing the caller or the
        program holds. Safe to call from many threads at once.

        :raises HandoffError: bad inputs, or a delegate, conversion or host op that failed (one
            line naming it); the program stays usable for the next run."""
        if self._closed:
            raise HandoffError(f"{self.file.name}: program is closed")
        arrays = self._inputs(inputs)
        env = self._env0.copy()
        for (name, vid, shape, dtype), arr in zip(self._input_plan, arrays):
            if arr.shape != shape or (arr.dtype is not dtype and arr.dtype != dtype):
                raise HandoffError(f"input '{name}': expected {dtype}{list(shape)}, got {arr.dtype}{list(arr.shape)}")
            env[vid] = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
        j = acquired = -1
        try:
            for j, op in enumerate(self._ops):
                kind = op[0]
                if kind == _DELEGATE:
                    _, execute, handle, lock, reads, writes, host_out, checks, to_host, drops, releases, where = op
                    if lock is not None:
                        lock.acquire()
                        acquired = j
                    outs = execute(handle, [env[s] for s in reads])
                    if to_host is not None:
                        outs = to_host(outs)
                    if len(outs) != len(writes):
                        raise _RunError(f"{where} returned {len(outs)} outputs, the program expects {len(writes)}"
                                        f"{CONTRACT_HINT}")
                    if host_out:
                        for s, out, check in zip(writes, outs, checks):
                            env[s] = _host_value(out, check, where, CONTRACT_HINT)
                    else:
                        for s, out, (shape, dtype, vid) in zip(writes, outs, checks):
                            if getattr(out, "shape", shape) != shape:
                                raise _RunError(f"{where} produced a value of shape {list(out.shape)} for value "
                                                f"{vid}, the program expects {dtype}{list(shape)}{CONTRACT_HINT}")
                            env[s] = out
                elif kind == _TO_HOST:
                    _, to_host, src, dst, checks, drops, releases, where = op
                    outs = to_host([env[s] for s in src])
                    if len(outs) != len(src):
                        raise _RunError(f"{where}: to_host returned {len(outs)} arrays for {len(src)} values"
                                        f"{CONTRACT_HINT}")
                    for s, out, (shape, dtype, vid, d) in zip(dst, outs, checks):
                        env[s] = _host_value(out, (shape, dtype, vid), self._delegate_name(d), CONTRACT_HINT)
                else:
                    _, fn, args, kwargs, writes, checks, drops, releases, where = op
                    outs = self._run_aten(fn, args, kwargs, env, where)
                    if len(outs) != len(writes):
                        raise _RunError(f"{where} returned {len(outs)} outputs, the program expects {len(writes)}")
                    for s, out, check in zip(writes, outs, checks):
                        if s is not None:
                            env[s] = _host_value(out, check, where)
                for s in drops:
                    env[s] = None
                for lock in releases:
                    lock.release()
        except BaseException as exc:
            if j >= 0:
                for lock in self._held_before[j]:
                    lock.release()
                if acquired == j:
                    self._ops[j][3].release()
            if j >= 0 and isinstance(exc, Exception) and not isinstance(exc, _RunError):
                raise HandoffError(f"{self._ops[j][-1]} failed: {one_line(exc)}") from exc
            raise
        result = []
        for slot, copy in self._output_plan:
            arr = env[slot]
            if copy is None:  # a fresh output (Runtime.fresh_outputs), the caller's alone
                if not arr.flags.writeable:
                    arr = arr.copy()
            elif copy or arr.nbytes < COPY_BELOW_BYTES or self._may_alias(arr, arrays):
                arr = arr.copy()
            result.append(arr)
        with self._runs_lock:
            self._runs += 1
        return result

    def _may_alias(self, arr: np.ndarray, inputs: Sequence[np.ndarray]) -> bool:
        """Whether ``arr`` may share memory with a caller's input or the program file."""
        if not arr.flags.writeable:
            return True
        view = self.file._view  # the whole file: an output sharing memory with it views a constant
        if view is not None and np.may_share_memory(arr, np.frombuffer(view, np.uint8)):
            return True
        return any(np.may_share_memory(arr, x) for x in inputs)

    def _inputs(self, inputs: Sequence[Any] | Mapping[str, Any]) -> list[np.ndarray]:
        if type(inputs) is list or type(inputs) is tuple:  # the common case, without ABC checks
            if len(inputs) == len(self._input_plan):
                return [x if type(x) is np.ndarray else _to_numpy(x) for x in inputs]
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

    def _run_aten(self, fn: Any, args: Any, kwargs: Mapping[str, Any], env: list[Any], where: str) -> list[Any]:
        import torch

        def tensor(slot: int) -> Any:
            arr = env[slot]
            return torch.from_numpy(arr if arr.flags.writeable else np.array(arr))

        try:
            result = fn(*_fill(args, tensor), **{k: _fill(v, tensor) for k, v in kwargs.items()})
        except Exception as exc:
            raise _RunError(f"{where} failed on the host: {one_line(exc, 300)}") from exc
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        return [r.numpy() if isinstance(r, torch.Tensor) else r for r in results]

    def stats(self) -> dict[str, Any]:
        """What the runs so far did:

        * ``runs``: completed runs;
        * ``peak_bytes``: bytes of values a run holds at once, at most (the manifest's declared
          sizes of the inputs, of every value the run makes, and of the host copies of device
          values; constants live in the program file and are not counted; 0 before a run);
        * ``host_transfers``: values converted to or from host memory by a run (a device value
          brought to the host by ``to_host``, a numpy array handed to a device runtime); the plan
          fixes it, so every run makes the same (0 before a run);
        * ``delegates``: per delegate, ``backend`` (its own), ``partition``, which entry runs it:
          ``copy`` (``None``: its own blob; ``k``: its fallback copy ``k``), ``runtime`` (the
          backend whose runtime runs that entry) and ``fallback_reason`` (why not its own blob, or
          ``None``), ``memory`` (its domain, :meth:`Runtime.memory`) and ``stats``, what its
          runtime reports about its last ``execute`` (:meth:`Runtime.stats`)."""
        delegates = []
        for d, (copy, backend, reason), memory, (runtime, handle) in zip(self.manifest["delegates"], self.choices,
                                                                        self._memory, self._handles):
            delegates.append({"backend": d["backend"], "partition": d["partition"], "copy": copy, "runtime": backend,
                              "fallback_reason": reason, "memory": memory, "stats": dict(runtime.stats(handle))})
        runs = self._runs
        return {"runs": runs, "peak_bytes": self._peak_bytes if runs else 0,
                "host_transfers": self._host_transfers if runs else 0, "delegates": delegates}

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Release every delegate and unmap the file. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._ops, self._env0 = [], []
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


def _host_value(out: Any, check: tuple[tuple[int, ...], np.dtype, int], where: str, hint: str = "") -> np.ndarray:
    """``out``, a value in host memory, as a C-contiguous numpy array of the declared shape and
    dtype; a one-line error naming ``where`` (and ending with ``hint``) otherwise."""
    if type(out) is not np.ndarray:
        out = np.asarray(out)
    shape, dtype, vid = check
    if out.shape != shape or (out.dtype is not dtype and out.dtype != dtype):  # builtin dtypes are singletons
        raise _RunError(f"{where} produced {out.dtype}{list(out.shape)} for value {vid}, "
                        f"the program expects {dtype}{list(shape)}{hint}")
    return out if out.flags.c_contiguous else np.ascontiguousarray(out)


def _value_ids(ins: Mapping[str, Any]) -> list[int]:
    """The value ids a host op reads (every ``{"value": i}`` in its arguments), in order."""
    found: list[int] = []

    def walk(arg: Any) -> None:
        if isinstance(arg, list):
            for a in arg:
                walk(a)
        elif isinstance(arg, dict) and "value" in arg:
            found.append(arg["value"])

    walk(ins["args"])
    for v in ins["kwargs"].values():
        walk(v)
    return list(dict.fromkeys(found))


def _with_refs(arg: Any) -> Any:
    """``arg`` with every list that holds a :class:`_Ref` (at any depth) made a :class:`_RefList`."""
    if isinstance(arg, list):
        items = [_with_refs(a) for a in arg]
        return _RefList(items) if any(type(a) in (_Ref, _RefList) for a in items) else items
    return arg


def _fill(arg: Any, tensor: Callable[[int], Any]) -> Any:
    """A run's arguments from decoded ones: each :class:`_Ref` replaced by its value's tensor."""
    kind = type(arg)
    if kind is _Ref:
        return tensor(arg.slot)
    if kind is _RefList:
        return [_fill(a, tensor) for a in arg]
    return arg


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


def _candidates(delegate: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """What can run a delegate, in the order tried: its own entry, then its fallback copies."""
    return [delegate, *delegate.get("fallbacks", ())]


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):  # a torch tensor; avoid importing torch to check
        return x.detach().cpu().numpy()
    return np.asarray(x)


def load(source: str | os.PathLike[str] | bytes, options: Mapping[str, Mapping[str, str]] | None = None,
         plugins: Plugins | None = None, trusted_keys: Sequence[str | os.PathLike[str]] = (),
         allow_unsigned: bool = False, strict: bool = False) -> Program:
    """Open, verify and initialise a program file (a path, or the bytes of one).

    Each delegate runs on its own backend when that backend is installed, available here and
    loads the delegate's blob; otherwise on the first of its fallback copies (format 1.3,
    ``partition --fallback-copies``) whose backend does, with one :class:`~handoff.FallbackWarning`
    per load naming each such delegate, its backend, the reason and the copy used
    (:meth:`Program.stats` says which copy runs).

    :param options: backend id -> runtime option name -> value (``{"xnnpack": {"threads": "2"}}``).
    :param trusted_keys: directories of PEM public keys whose signatures make native code loadable,
        besides the local key and ``$HANDOFF_HOME/trusted`` (see ``docs/security.md``).
    :param allow_unsigned: load native code that no trusted key signed (only for files you trust).
    :param strict: never use a fallback copy: a delegate whose own backend cannot run it is an error.
    """
    file = ProgramFile.from_bytes(bytes(source)) if isinstance(source, (bytes, bytearray)) else ProgramFile.open(os.fspath(source))
    return Program(file, plugins or get_plugins(), options or {}, trusted_keys, allow_unsigned, strict)
