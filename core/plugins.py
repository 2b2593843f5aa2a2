"""Plugin discovery and the backend table.

Plugins come from three places, in this order:

1. the built-in plugins of the core (the model sources and zoo, and the ``tvm`` backend, ``trylast``);
2. modules named in ``$HANDOFF_PLUGINS`` (comma separated), always loaded;
3. the ``handoff.backends`` entry-point group of every installed distribution, unless
   ``$HANDOFF_DISABLE_PLUGIN_AUTOLOAD`` is set (the test suite sets it, so installed plugins never
   leak into core tests).

A plugin that fails to import, or whose ``handoff_backends`` raises, is recorded in
:attr:`Plugins.broken` with its error and skipped; the others keep working.

This module is imported by ``handoff.runtime``: it must not import torch.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import os
from typing import Any, Iterable, Mapping

import pluggy

from . import hookspecs
from .backend import BackendSpec, import_ref
from .errors import HandoffError
from .registry import Registry

ENTRY_POINT_GROUP = "handoff.backends"
AUTOLOAD_ENV = "HANDOFF_DISABLE_PLUGIN_AUTOLOAD"
PLUGINS_ENV = "HANDOFF_PLUGINS"
#: (plugin name, module) of the core's own plugins; the names match the core's entry points so an
#: installed core does not register them twice.
BUILTIN_PLUGINS = (("models", "handoff.models"), ("tvm", "handoff.tvm.plugin"))


@dataclasses.dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that could not be loaded: its name, where it came from, and the error."""

    name: str
    source: str
    error: str

    def __str__(self) -> str:
        return f"plugin '{self.name}' ({self.source}) failed to load: {self.error}"


class Plugins:
    """A pluggy plugin manager plus what the core derives from it: the backends, their lazily
    imported compiler and runtime halves, and the registry catalog."""

    def __init__(self, autoload: bool | None = None, extra: Iterable[str] | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.broken: list[BrokenPlugin] = []
        self.registry = Registry.load()
        self._backends: dict[str, tuple[BackendSpec, str]] | None = None
        self._runtimes: dict[str, Any] = {}
        for name, module in BUILTIN_PLUGINS:
            self._register_module(name, module, "built-in")
        env_extra = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
        for module in [*env_extra, *(extra or ())]:
            self._register_module(module, module, f"${PLUGINS_ENV}")
        if autoload is None:
            autoload = not os.environ.get(AUTOLOAD_ENV)
        if autoload:
            self._load_entry_points()

    # -- discovery -----------------------------------------------------------------------------
    def _register_module(self, name: str, module: str, source: str) -> None:
        if self.pm.has_plugin(name):
            return
        try:
            self.pm.register(importlib.import_module(module), name=name)
        except Exception as exc:  # a broken plugin must not take the others down
            self.broken.append(BrokenPlugin(name, source, _one_line(exc)))

    def _load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self.pm.has_plugin(ep.name) or self.pm.is_blocked(ep.name):
                continue
            source = f"entry point of {ep.dist.name if ep.dist else 'unknown distribution'}"
            try:
                plugin = ep.load()
                self.pm.register(plugin, name=ep.name)
            except Exception as exc:
                self.broken.append(BrokenPlugin(ep.name, source, _one_line(exc)))

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register a plugin object or module (tests, and programs embedding handoff)."""
        self.pm.register(plugin, name=name)
        self._backends = None

    # -- backends ------------------------------------------------------------------------------
    @property
    def backends(self) -> dict[str, BackendSpec]:
        """Every backend, in hook order (``trylast`` plugins, such as ``tvm``, last)."""
        return {bid: spec for bid, (spec, _) in self._backend_table().items()}

    def _backend_table(self) -> dict[str, tuple[BackendSpec, str]]:
        if self._backends is not None:
            return self._backends
        table: dict[str, tuple[BackendSpec, str]] = {}
        hook = self.pm.hook.handoff_backends
        for impl in reversed(hook.get_hookimpls()):  # pluggy calls the last registered first
            try:
                specs = list(impl.function() or ())
            except Exception as exc:
                self.broken.append(BrokenPlugin(impl.plugin_name, "handoff_backends", _one_line(exc)))
                continue
            for spec in specs:
                if not isinstance(spec, BackendSpec):
                    self.broken.append(BrokenPlugin(impl.plugin_name, "handoff_backends",
                                                    f"returned {type(spec).__name__}, not BackendSpec"))
                elif spec.id in table:
                    self.broken.append(BrokenPlugin(impl.plugin_name, "handoff_backends",
                                                    f"backend id '{spec.id}' already provided by plugin '{table[spec.id][1]}'"))
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
        broken = [b for b in self.broken if b.name == backend_id]
        if broken:
            msg += f"; {broken[0]}"
        hint = self.registry.install_hint(backend_id)
        if hint:
            msg += f"; install with: {hint}"
        elif backend_id not in self.registry.backends:
            msg += f"; known backends: {', '.join(self.registry.backends)}"
        return msg

    def check_options(self, backend_id: str, options: Mapping[str, str], runtime: bool = False) -> None:
        """Refuse option names the backend does not declare (compile options, or runtime ones)."""
        spec = self.spec(backend_id)
        known = spec.runtime_options if runtime else spec.options
        for name in options:
            if name not in known:
                valid = ", ".join(sorted(known)) or "none"
                kind = "runtime option" if runtime else "option"
                other = spec.options if runtime else spec.runtime_options
                also = f" ('{name}' is a {'compile' if runtime else 'runtime'} option)" if name in other else ""
                raise HandoffError(f"backend '{backend_id}' has no {kind} '{name}'{also}; valid {kind}s: {valid}")

    def compiler(self, backend_id: str, options: Mapping[str, str] | None = None) -> Any:
        """A new instance of the compiler half of ``backend_id``, configured with ``options``."""
        spec = self.spec(backend_id)
        options = dict(options or {})
        self.check_options(backend_id, options)
        try:
            cls = import_ref(spec.compiler)
        except Exception as exc:
            raise HandoffError(f"backend '{backend_id}': its compiler ({spec.compiler}) cannot be imported: "
                               f"{_one_line(exc)}{self._hint_suffix(backend_id)}") from exc
        try:
            return cls(options)
        except ValueError as exc:
            raise HandoffError(f"backend '{backend_id}': {exc}") from exc

    def runtime(self, backend_id: str) -> Any:
        """The (per-process, cached) runtime half of ``backend_id``."""
        if backend_id not in self._runtimes:
            spec = self.spec(backend_id)
            try:
                self._runtimes[backend_id] = import_ref(spec.runtime)()
            except Exception as exc:
                raise HandoffError(f"backend '{backend_id}': its runtime ({spec.runtime}) cannot be imported: "
                                   f"{_one_line(exc)}{self._hint_suffix(backend_id)}") from exc
        return self._runtimes[backend_id]

    def runtime_available(self, backend_id: str) -> tuple[bool, str]:
        """``(True, "")`` or ``(False, reason)``; never raises."""
        try:
            ok, reason = self.runtime(backend_id).is_available()
            return bool(ok), str(reason or "")
        except HandoffError as exc:
            return False, str(exc)
        except Exception as exc:
            return False, f"is_available() raised {_one_line(exc)}"

    def compiler_available(self, backend_id: str) -> tuple[bool, str]:
        """Whether the ahead-of-time half imports; never raises."""
        try:
            import_ref(self.spec(backend_id).compiler)
            return True, ""
        except Exception as exc:
            return False, _one_line(exc)

    def _hint_suffix(self, backend_id: str) -> str:
        hint = self.registry.install_hint(backend_id)
        return f"; install with: {hint}" if hint else ""

    # -- other hooks ---------------------------------------------------------------------------
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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, HandoffError) else text


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
