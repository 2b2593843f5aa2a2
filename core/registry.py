"""The backend catalogue and the named presets.

Two sources, merged: ``registry.yaml`` (shipped inside the package: presets such as
``android: [qnn, xnnpack]``, usable as ``--backends preset:android``, and entries for backends that
may not be installed, so errors can say how to install them) and the ``handoff_catalog`` hook of
every installed plugin, whose entry for a backend replaces the file's.

Nothing here is fatal: a malformed entry or preset is recorded in :attr:`Registry.problems` (shown
by ``handoff backends``) and skipped, so one bad line never breaks a command. The runtime path
(``load`` + ``run``) never reads the catalogue; only messages about missing backends do.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from typing import Any, Iterable, Mapping

from .backend import DEVICE_CLASSES
from .errors import HandoffError, one_line

#: Fields every catalogue entry has, and the type each must be.
FIELDS: dict[str, type | tuple[type, ...]] = {"distribution": str, "device": str, "platforms": list,
                                              "compiler": dict, "install": str, "description": str}


def check_entry(backend_id: Any, entry: Any) -> str | None:
    """Why a catalogue entry is malformed (one line), or ``None`` when it is well formed."""
    if not isinstance(backend_id, str) or not backend_id:
        return f"backend id {backend_id!r} is not a non-empty string"
    if not isinstance(entry, Mapping):
        return f"backend '{backend_id}': entry is {type(entry).__name__}, not a mapping"
    missing = [f for f in FIELDS if f not in entry]
    if missing:
        return f"backend '{backend_id}' lacks {', '.join(missing)}"
    wrong = [f"{f} ({type(entry[f]).__name__}, expected {t.__name__})" for f, t in FIELDS.items()
             if not isinstance(entry[f], t)]  # type: ignore[union-attr]
    if wrong:
        return f"backend '{backend_id}': ill-typed {', '.join(wrong)}"
    if entry["device"] not in DEVICE_CLASSES:
        return f"backend '{backend_id}': device {entry['device']!r} is not one of {', '.join(DEVICE_CLASSES)}"
    return None


@dataclasses.dataclass
class Registry:
    """The merged catalogue: backend id -> entry, preset name -> backend ids, and what was skipped."""

    backends: dict[str, dict[str, Any]]
    presets: dict[str, list[str]]
    problems: list[str] = dataclasses.field(default_factory=list)
    #: backend id -> where its entry came from ("registry.yaml" or "plugin NAME")
    sources: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, text: str | None = None,
             plugin_entries: Iterable[tuple[str, Mapping[str, Any]]] = ()) -> "Registry":
        """Parse ``registry.yaml`` (or ``text``), then lay each plugin's ``(plugin name, entries)``
        over it. Never raises: problems are collected."""
        import yaml  # PyYAML; imported here so a runtime that never needs the catalogue skips it

        reg = cls({}, {})
        try:
            if text is None:
                text = resources.files("handoff").joinpath("registry.yaml").read_text(encoding="utf-8")
            data = yaml.safe_load(text) or {}
            if not isinstance(data, dict):
                raise ValueError(f"top level is {type(data).__name__}, not a mapping")
        except (OSError, ValueError, yaml.YAMLError) as exc:
            reg.problems.append(f"registry.yaml skipped: {one_line(exc, 300)}")
            data = {}
        reg._add(data.get("backends") or {}, "registry.yaml")
        for plugin, entries in plugin_entries:
            reg._add(entries, f"plugin '{plugin}'")
        presets = data.get("presets") or {}
        if not isinstance(presets, dict):
            reg.problems.append(f"registry.yaml: presets is {type(presets).__name__}, not a mapping; skipped")
            presets = {}
        for name, members in presets.items():
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                reg.problems.append(f"registry.yaml: preset {name!r} is not a list of backend ids; skipped")
                continue
            unknown = [m for m in members if m not in reg.backends]
            if unknown:
                reg.problems.append(f"registry.yaml: preset '{name}' names unknown backends "
                                    f"{', '.join(unknown)}; skipped")
                continue
            reg.presets[str(name)] = list(members)
        return reg

    def _add(self, entries: Any, source: str) -> None:
        if not isinstance(entries, Mapping):
            self.problems.append(f"{source}: backends is {type(entries).__name__}, not a mapping; skipped")
            return
        for bid, entry in entries.items():
            problem = check_entry(bid, entry)
            if problem:
                self.problems.append(f"{source}: {problem}; entry skipped")
                continue
            self.backends[bid] = dict(entry)
            self.sources[bid] = source

    def install_hint(self, backend_id: str) -> str:
        return str((self.backends.get(backend_id) or {}).get("install", ""))

    def expand(self, names: list[str]) -> list[str]:
        """Expand ``preset:NAME`` items of a ``--backends`` list, keeping first occurrences."""
        out: list[str] = []
        for name in names:
            if name.startswith("preset:"):
                preset = name[len("preset:"):]
                if preset not in self.presets:
                    raise HandoffError(f"unknown preset '{preset}'; presets: {', '.join(self.presets) or 'none'}")
                items = self.presets[preset]
            else:
                items = [name]
            out.extend(i for i in items if i not in out)
        return out
