"""``registry.yaml``: the catalog of known backends and named presets.

The catalog knows backends that are not installed, so errors can say how to install them, and
holds presets such as ``android: [qnn, vulkan, xnnpack]`` usable as ``--backends preset:android``.
The file lives at the repository root and is shipped inside the package (``handoff/registry.yaml``).
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from typing import Any

from .errors import HandoffError

REQUIRED_FIELDS = ("distribution", "device", "platforms", "compiler", "install", "description")


@dataclasses.dataclass(frozen=True)
class Registry:
    backends: dict[str, dict[str, Any]]
    presets: dict[str, list[str]]

    @classmethod
    def load(cls, text: str | None = None) -> "Registry":
        import yaml  # PyYAML; imported here so a runtime that never needs the catalog skips it

        if text is None:
            text = resources.files("handoff").joinpath("registry.yaml").read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise HandoffError(f"registry.yaml: {' '.join(str(exc).split())}") from exc
        backends = data.get("backends") or {}
        presets = data.get("presets") or {}
        for bid, entry in backends.items():
            missing = [f for f in REQUIRED_FIELDS if f not in (entry or {})]
            if missing:
                raise HandoffError(f"registry.yaml: backend '{bid}' lacks {', '.join(missing)}")
        for name, members in presets.items():
            unknown = [m for m in members if m not in backends]
            if unknown:
                raise HandoffError(f"registry.yaml: preset '{name}' names unknown backends {', '.join(unknown)}")
        return cls(backends=dict(backends), presets={k: list(v) for k, v in presets.items()})

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
