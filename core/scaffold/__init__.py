"""``handoff new-backend NAME``: a new backend plugin distribution, ready to install and test.

The templates (``templates/*.tmpl``, package data) are rendered with :class:`string.Template`
(``${name}``; a literal dollar is ``$$``). What comes out is a minimal but real backend (numpy
interprets elementwise float32 ops) that installs, passes its own tests and handoff's
conformance suite as generated; ``README.md`` in it says where the vendor SDK goes.
"""

from __future__ import annotations

import re
import string
from importlib import resources
from pathlib import Path

from .. import PLUGIN_API_VERSION, __version__
from ..errors import HandoffError

#: generated path (``{package}``, ``{name}`` filled in) -> template
FILES = {
    "pyproject.toml": "pyproject.toml.tmpl",
    "README.md": "README.md.tmpl",
    "{package}/__init__.py": "package_init.py.tmpl",
    "{package}/plugin.py": "plugin.py.tmpl",
    "{package}/_format.py": "format.py.tmpl",
    "{package}/compiler.py": "compiler.py.tmpl",
    "{package}/runtime.py": "runtime.py.tmpl",
    "tests/test_{name}.py": "test_backend.py.tmpl",
    "tests/conformance-expect.yaml": "conformance-expect.yaml.tmpl",
    "tests/conformance-xfail.yaml": "conformance-xfail.yaml.tmpl",
}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def names(name: str) -> dict[str, str]:
    """Every spelling the templates use for backend ``name``."""
    if not _NAME.match(name) or name.endswith("_") or "__" in name:
        raise HandoffError(f"backend name {name!r}: use lowercase letters, digits and single underscores, starting "
                           f"with a letter (it is the backend id, and the package is handoff_NAME)")
    package = f"handoff_{name}"
    magic = f"HOF{name.upper().replace('_', '')}"[:8].ljust(8, "_")
    return {"name": name, "package": package, "dist": f"handoff-{name.replace('_', '-')}",
            "wheel_name": package, "cls": "".join(p.capitalize() for p in name.split("_")),
            "title": " ".join(p.capitalize() for p in name.split("_")), "magic": magic,
            "api_version": PLUGIN_API_VERSION, "handoff_version": __version__}


def create(name: str, directory: str | Path | None = None) -> tuple[Path, list[Path]]:
    """Write the distribution for backend ``name`` into ``directory`` (default ``./handoff-NAME``),
    which must not exist or be empty. Returns the directory and the files written."""
    values = names(name)
    root = Path(directory) if directory is not None else Path(values["dist"])
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise HandoffError(f"{root}: exists and is not an empty directory; choose another with --dir")
    templates = resources.files(__name__) / "templates"
    written = []
    for target, template in FILES.items():
        path = root / target.format(**values)
        text = string.Template((templates / template).read_text(encoding="utf-8")).substitute(values)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return root, written
