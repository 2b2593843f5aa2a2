"""Another checkout of handoff, for the scripts that time it beside this one (``--compare-with``)."""

from __future__ import annotations

from pathlib import Path


def tree_path(tree: Path, scratch: Path) -> list[str]:
    """``PYTHONPATH`` entries that make ``import handoff`` and the plugins load from ``tree`` (a
    checkout's root: ``core/`` and ``plugins/``), ahead of the editable installs of this one;
    ``scratch`` holds the ``handoff`` link to its ``core/``."""
    shim = scratch / "shim"
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "handoff"
    if not link.exists():
        link.symlink_to(tree / "core")
    return [str(shim), *sorted(str(p) for p in (tree / "plugins").iterdir() if p.is_dir())]
