"""Plugin discovery, the backend table, option parsing and the catalogue.

Plugins come from three places, in this order:

1. the built-in plugins of the core (the model sources with the zoo, and the ``tvm`` backend, ``trylast``);
2. modules named in ``$HANDOFF_PLUGINS`` (comma separated), always loaded: the development loop
   of a plugin that is not installed yet;
3. the ``handoff.backends`` entry-point group of every installed distribution, unless
   ``$HANDOFF_DISABLE_PLUGIN_AUTOLOAD`` is set (the test suite sets it, so installed plugins never
   leak into core tests).

A plugin that fails to import, implements a hook that does not exist (a misspelling such as
``handoff_backend``), declares a backend for another plugin-API version, or whose
``handoff_backends`` raises, is recorded in :attr:`Plugins.broken` with the reason and skipped;
the others keep working.

This module is imported by ``handoff.runtime``: it must not import torch, and it reads the
catalogue (``registry.yaml``, PyYAML) only when a message or ``handoff backends`` needs it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import pluggy

from . import hookspecs
from .backend import PLUGIN_API_VERSION, BackendSpec, Compiler, Runtime, import_ref
from .errors import HandoffError, one_line
from .quiet import quiet_native
from .registry import Registry

ENTRY_POINT_GROUP = "handoff.backends"
AUTOLOAD_ENV = "HANDOFF_DISABLE_PLUGIN_AUTOLOAD"
PLUGINS_ENV = "HANDOFF_PLUGINS"
#: (plugin name, module) of the core's own plugins; the names match the core's entry points so an
#: installed core does not register them twice.
BUILTIN_PLUGINS = (("sources", "handoff.sources"), ("tvm", "handoff.tvm.plugin"))
_HOOKS = tuple(name for name in hookspecs.__all__ if name.startswith("handoff_"))


@dataclasses.dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that could not be loaded: its name, where it came from, and the error."""

    name: str
    source: str
    error: str

    def __str__(self) -> str:
        return f"plugin '{self.name}' ({self.source}) failed to load: {self.error}"


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a registered plugin came from: ``built-in``, ``$HANDOFF_PLUGINS`` or an entry point,
    and the distribution that ships it (``None`` when it is not installed as one)."""

    source: str
    distribution: str | None = None
    version: str | None = None


def api_compatible(declared: str) -> str | None:
    """Why a plugin built for plugin API ``declared`` cannot run on this core, or ``None``."""
    from packaging.version import InvalidVersion, Version

    if not declared:
        return (f"its BackendSpec declares no api_version; this handoff implements plugin API {PLUGIN_API_VERSION} "
                f"(set BackendSpec(api_version=\"{PLUGIN_API_VERSION}\") after checking docs/plugins.md)")
    try:
        want, have = Version(declared), Version(PLUGIN_API_VERSION)
    except InvalidVersion:
        return f"api_version {declared!r} is not a version like {PLUGIN_API_VERSION!r}"
    if want.major != have.major or want.minor > have.minor:
        return (f"built for plugin API {declared}; this handoff implements {PLUGIN_API_VERSION}: "
                f"{'upgrade handoff' if want > have else 'upgrade the plugin'}")
    return None


class Plugins:
    """A pluggy plugin manager plus what the core derives from it: the backends, their lazily
    imported compiler and runtime halves, their typed options, and the catalogue."""

    def __init__(self, autoload: bool | None = None, extra: Iterable[str] | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.broken: list[BrokenPlugin] = []
        self.origins: dict[str, Origin] = {}
        self._registry: Registry | None = None
        self._backends: dict[str, tuple[BackendSpec, str]] | None = None
        self._runtimes: dict[str, Any] = {}
        self._probed: set[str] = set()  # backends whose runtime was asked is_available()
        for name, module in BUILTIN_PLUGINS:
            self._register_module(name, module, Origin("built-in", "handoff", _dist_version("handoff")))
        env_extra = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
        for module in [*env_extra, *(extra or ())]:
            self._register_module(module, module, Origin(f"${PLUGINS_ENV}"))
        if autoload is None:
            autoload = not os.environ.get(AUTOLOAD_ENV)
        if autoload:
            self._load_entry_points()

    # -- discovery -----------------------------------------------------------------------------
    def _register_module(self, name: str, module: str, origin: Origin) -> None:
        if self.pm.has_plugin(name):
            return
        try:
            plugin = importlib.import_module(module)
        except Exception as exc:  # a broken plugin must not take the others down
            self.broken.append(BrokenPlugin(name, origin.source, one_line(exc)))
            return
        self._register_checked(plugin, name, origin)

    def _load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self.pm.has_plugin(ep.name) or self.pm.is_blocked(ep.name):
                continue
            dist = ep.dist
            origin = Origin(f"entry point of {dist.name if dist else 'unknown distribution'}",
                            dist.name if dist else None, dist.version if dist else None)
            try:
                plugin = ep.load()
            except Exception as exc:
                self.broken.append(BrokenPlugin(ep.name, origin.source, one_line(exc)))
                continue
            self._register_checked(plugin, ep.name, origin)

    def _register_checked(self, plugin: Any, name: str, origin: Origin) -> None:
        try:
            self._register(plugin, name)
        except HandoffError as exc:
            self.broken.append(BrokenPlugin(name, origin.source, str(exc)))
            return
        self.origins[name] = origin

    def _register(self, plugin: Any, name: str | None) -> None:
        """Register ``plugin`` and refuse it (unregistered again) when it implements a hook that
        does not exist: pluggy would otherwise accept the misspelling silently."""
        try:
            name = self.pm.register(plugin, name=name) or name
        except Exception as exc:  # pluggy's validation: wrong hook arguments, a name taken twice
            raise HandoffError(one_line(exc)) from exc
        unknown = [caller.name for caller in self.pm.get_hookcallers(plugin) or () if not caller.has_spec()]
        if unknown:
            self.pm.unregister(plugin)
            hints = []
            for hook in unknown:
                close = difflib.get_close_matches(hook, _HOOKS, n=1)
                hints.append(f"'{hook}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise HandoffError(f"implements unknown hook(s) {', '.join(hints)}; handoff's hooks are "
                               f"{', '.join(_HOOKS)} (see handoff.hookspecs)")

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register a plugin object or module (tests, and programs embedding handoff).

        :raises HandoffError: the plugin implements a hook that does not exist, or pluggy refuses it.
        """
        self._register(plugin, name)
        self.origins[name or self.pm.get_name(plugin) or repr(plugin)] = Origin("registered from Python")
        self._backends = None
        self._registry = None

    # -- backends ------------------------------------------------------------------------------
    @property
    def backends(self) -> dict[str, BackendSpec]:
        """Every backend, in hook order (``trylast`` plugins, such as ``tvm``, last)."""
        return {bid: spec for bid, (spec, _) in self._backend_table().items()}

    def plugin_of(self, backend_id: str) -> str:
        """The name of the plugin that provides ``backend_id``."""
        self.spec(backend_id)
        return self._backend_table()[backend_id][1]

    def _backend_table(self) -> dict[str, tuple[BackendSpec, str]]:
        if self._backends is not None:
            return self._backends
        table: dict[str, tuple[BackendSpec, str]] = {}
        hook = self.pm.hook.handoff_backends
        for impl in reversed(hook.get_hookimpls()):  # pluggy calls the last registered first
            try:
                specs = list(impl.function() or ())
            except Exception as exc:
                self.broken.append(BrokenPlugin(impl.plugin_name, "handoff_backends", one_line(exc)))
                continue
            for spec in specs:
                if not isinstance(spec, BackendSpec):
                    self.broken.append(BrokenPlugin(impl.plugin_name, "handoff_backends",
                                                    f"returned {type(spec).__name__}, not BackendSpec"))
                elif spec.id in table:
                    self.broken.append(BrokenPlugin(impl.plugin_name, "handoff_backends",
                                                    f"backend id '{spec.id}' already provided by plugin '{table[spec.id][1]}'"))
                elif (why := api_compatible(spec.api_version)) is not None:
                    self.broken.append(BrokenPlugin(impl.plugin_name, "handoff_backends", f"backend '{spec.id}': {why}"))
                else:
                    table[spec.id] = (spec, impl.plugin_name)
        self._backends = table
        return table

    def spec(self, backend_id: str) -> BackendSpec:
        """The spec of ``backend_id``, or a :class:`HandoffError` naming the installed ones and
        how to install this one."""
        table = self._backend_table()
        if backend_id in table:
            return table[backend_id][0]
        raise HandoffError(self.not_installed_message(backend_id))

    def not_installed_message(self, backend_id: str) -> str:
        installed = ", ".join(self._backend_table()) or "none"
        msg = f"backend '{backend_id}' not installed; installed: {installed}"
        broken = [b for b in self.broken if b.name == backend_id or f"backend '{backend_id}'" in b.error]
        if broken:
            msg += f"; {broken[0]}"
        hint = self.registry.install_hint(backend_id)
        if hint:
            msg += f"; install with: {hint}"
        elif backend_id not in self.registry.backends:
            msg += f"; known backends: {', '.join(self.registry.backends) or 'none'}"
        return msg

    def parse_options(self, backend_id: str, options: Mapping[str, Any], runtime: bool = False) -> dict[str, Any]:
        """``options`` checked against the backend's typed (compile or runtime) options and parsed,
        with every declared option's default filled in.

        :raises HandoffError: an unknown name (listing the valid ones) or an invalid value
            (naming the valid values).
        """
        spec = self.spec(backend_id)
        known = spec.option_table(runtime)
        kind = "runtime option" if runtime else "option"
        for name in options:
            if name not in known:
                valid = ", ".join(sorted(known)) or "none"
                other = spec.option_table(not runtime)
                also = f" ('{name}' is a {'compile' if runtime else 'runtime'} option)" if name in other else ""
                raise HandoffError(f"backend '{backend_id}' has no {kind} '{name}'{also}; valid {kind}s: {valid}")
        parsed = {}
        for name, option in known.items():
            try:
                parsed[name] = option.parse(name, options.get(name))
            except ValueError as exc:
                raise HandoffError(f"backend '{backend_id}': {exc}") from exc
        return parsed

    def compiler(self, backend_id: str, options: Mapping[str, Any] | None = None) -> Compiler:
        """A new instance of the compiler half of ``backend_id``, configured with ``options``."""
        spec = self.spec(backend_id)
        parsed = self.parse_options(backend_id, options or {})
        cls = self._import_half(backend_id, "compiler", Compiler)
        try:
            return cls(parsed)
        except ValueError as exc:
            raise HandoffError(f"backend '{backend_id}': {exc}") from exc
        except Exception as exc:
            raise HandoffError(f"backend '{backend_id}': its compiler ({spec.compiler}) failed to start: "
                               f"{one_line(exc)}") from exc

    def runtime(self, backend_id: str) -> Runtime:
        """The (per-process, cached) runtime half of ``backend_id``."""
        if backend_id not in self._runtimes:
            cls = self._import_half(backend_id, "runtime", Runtime)
            try:
                self._runtimes[backend_id] = cls()
            except Exception as exc:
                raise HandoffError(f"backend '{backend_id}': its runtime ({self.spec(backend_id).runtime}) failed to "
                                   f"start: {one_line(exc)}") from exc
        return self._runtimes[backend_id]

    def _import_half(self, backend_id: str, half: str, base: type) -> Any:
        ref = getattr(self.spec(backend_id), half)
        try:
            with quiet_native():  # vendor libraries print when they load
                cls = import_ref(ref)
        except Exception as exc:
            raise HandoffError(f"backend '{backend_id}': its {half} ({ref}) cannot be imported: "
                               f"{one_line(exc)}{self._hint_suffix(backend_id)}") from exc
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise HandoffError(f"backend '{backend_id}': its {half} {ref} is not a subclass of handoff.{base.__name__} "
                               f"(plugin API {PLUGIN_API_VERSION}); derive it from handoff.{base.__name__}")
        return cls

    def runtime_available(self, backend_id: str) -> tuple[bool, str]:
        """``(True, "")`` or ``(False, reason)``; never raises."""
        try:
            if backend_id in self._probed:  # asked on every load: no context manager
                ok, reason = self.runtime(backend_id).is_available()
            else:
                with quiet_native():  # the first probe loads the vendor runtime, which may print
                    ok, reason = self.runtime(backend_id).is_available()
                self._probed.add(backend_id)
            return bool(ok), str(reason or "")
        except HandoffError as exc:
            return False, str(exc)
        except Exception as exc:
            return False, f"is_available() raised {one_line(exc)}"

    def compiler_available(self, backend_id: str) -> tuple[bool, str]:
        """Whether the ahead-of-time half imports; never raises."""
        try:
            self._import_half(backend_id, "compiler", Compiler)
            return True, ""
        except HandoffError as exc:
            return False, str(exc)

    def runnable(self) -> list[str]:
        """The vendor backends that can both compile and run here, NPUs first, then GPUs and CPUs
        (``handoff backends --runnable``; a remote device answers the same for itself)."""
        from .pipeline import FALLBACK_BACKEND

        rank = {"npu": 0, "gpu": 1, "cpu": 2}
        return [bid for bid, spec in sorted(self.backends.items(), key=lambda kv: rank[kv[1].device])
                if bid != FALLBACK_BACKEND and self.compiler_available(bid)[0] and self.runtime_available(bid)[0]]

    def _hint_suffix(self, backend_id: str) -> str:
        hint = self.registry.install_hint(backend_id)
        return f"; install with: {hint}" if hint else ""

    # -- identity ------------------------------------------------------------------------------
    def distribution(self, backend_id: str) -> tuple[str | None, str | None]:
        """``(distribution, version)`` of the installed package that provides ``backend_id``,
        or ``(None, None)`` when its plugin is not installed as a distribution."""
        origin = self.origins.get(self.plugin_of(backend_id))
        if origin and origin.distribution:
            return origin.distribution, origin.version
        module = self.spec(backend_id).compiler.partition(":")[0].partition(".")[0]
        dists = importlib.metadata.packages_distributions().get(module) or []
        return (dists[0], _dist_version(dists[0])) if dists else (None, None)

    def code_identity(self, backend_id: str) -> str:
        """What the lowering cache keys a backend's code by: its distribution and version, and a
        digest of the files of the package holding its compiler (so an edited plugin whose version
        did not change never gets blobs its old code made)."""
        dist, version = self.distribution(backend_id)
        module = self.spec(backend_id).compiler.partition(":")[0]
        return f"{dist}=={version};{module.rpartition('.')[0] or module}:{_package_digest(module)}"

    # -- other hooks ---------------------------------------------------------------------------
    @property
    def registry(self) -> Registry:
        """The catalogue: ``registry.yaml`` with every plugin's ``handoff_catalog`` entries laid
        over it (read on first use; never raises, see :attr:`Registry.problems`)."""
        if self._registry is None:
            entries = []
            for impl in reversed(self.pm.hook.handoff_catalog.get_hookimpls()):
                try:
                    entries.append((impl.plugin_name, impl.function() or {}))
                except Exception as exc:
                    self.broken.append(BrokenPlugin(impl.plugin_name, "handoff_catalog", one_line(exc)))
            self._registry = Registry.load(plugin_entries=entries)
        return self._registry

    def zoo(self) -> dict[str, Any]:
        """Every ``zoo:NAME`` model, from all plugins."""
        models: dict[str, Any] = {}
        owners: dict[str, str] = {}
        for impl in reversed(self.pm.hook.handoff_zoo_models.get_hookimpls()):
            for name, model in dict(impl.function() or {}).items():
                if name in models:
                    raise HandoffError(f"zoo model '{name}' is provided by plugins '{owners[name]}' and "
                                       f"'{impl.plugin_name}'; uninstall one of them")
                models[name], owners[name] = model, impl.plugin_name
        return models


@functools.cache
def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def _package_digest(module: str) -> str:
    """sha256 over the files of the package holding ``module`` (its parent package, or the
    module's own file when it is top level), paths and contents, ``__pycache__`` excluded."""
    package = module.rpartition(".")[0] or module
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    h = hashlib.sha256()
    if spec is None:
        return "unknown"
    if spec.submodule_search_locations:
        for root in sorted(spec.submodule_search_locations):
            for path in sorted(Path(root).rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
                    h.update(str(path.relative_to(root)).encode() + b"\0")
                    h.update(path.read_bytes())
    elif spec.origin and os.path.isfile(spec.origin):
        h.update(Path(spec.origin).read_bytes())
    return h.hexdigest()[:16]


_DEFAULT: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin manager, created on first use."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Plugins()
    return _DEFAULT


def set_plugins(plugins: Plugins | None) -> None:
    """Replace the process-wide plugin manager (``None``: rediscover on next use)."""
    global _DEFAULT
    _DEFAULT = plugins
