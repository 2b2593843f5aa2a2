"""The vendor's promises and known failures: ``--handoff-expect`` and ``--handoff-xfail`` files.

An expect file lists what a backend promises to delegate, so coverage cannot silently regress::

    backend: acme                 # optional: the file applies to this backend only
    ops:                          # a case fails when the backend declines one of these ops
      - aten.add.Tensor           # a bare name: in float32
      - aten.convolution.default: [float32, float16]
    cases:                        # cases (fnmatch patterns) it promises to delegate whole
      - conv2d*
      - linear: [float32, float16]

An xfail file lists known failures, each with its cause; they are strict: one that passes is
reported as a failure (XPASS), so the list cannot go stale::

    backend: tvm
    xfail:
      "conv_transpose2d[float16-*]": "TVM 0.27's importer: output_padding dropped"
      "contract[threads]": "the runtime is not thread-safe yet"

Keys are patterns over item names (``CASE[DTYPE-MODE]``, ``contract[CHECK]``): ``*`` and ``?`` are
wildcards, brackets are literal (:func:`item_matches`). Any
problem in a file is a usage error naming the file and the entry.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

_OP = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")


class ExpectationError(ValueError):
    """A malformed expect or xfail file (the message names the file and entry)."""


def _load(path: str, keys: Sequence[str]) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ExpectationError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ExpectationError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ExpectationError(f"{path}: expected a mapping with keys {', '.join(keys)}")
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise ExpectationError(f"{path}: unknown key(s) {', '.join(map(str, unknown))}; valid: {', '.join(keys)}")
    if "backend" in data and not isinstance(data["backend"], str):
        raise ExpectationError(f"{path}: 'backend' must be a backend id")
    return data


def _named_dtypes(path: str, section: str, entry: Any, dtypes: Sequence[str]) -> tuple[str, frozenset[str]]:
    """``name`` (float32) or ``{name: [dtypes]}`` -> (name, dtypes)."""
    if isinstance(entry, str):
        return entry, frozenset({"float32"})
    if isinstance(entry, dict) and len(entry) == 1:
        ((name, listed),) = entry.items()
        listed = [listed] if isinstance(listed, str) else listed
        if isinstance(name, str) and isinstance(listed, list) and listed:
            bad = [d for d in listed if d not in dtypes]
            if bad:
                raise ExpectationError(f"{path}: {section} entry {name!r}: dtype(s) {', '.join(map(str, bad))} "
                                       f"not among {', '.join(dtypes)}")
            return name, frozenset(listed)
    raise ExpectationError(f"{path}: {section} entry {entry!r}: expected NAME or {{NAME: [dtype, ...]}}")


@dataclasses.dataclass(frozen=True)
class _Promise:
    source: str
    backend: str | None
    ops: Mapping[str, frozenset[str]]
    cases: Mapping[str, frozenset[str]]


@dataclasses.dataclass
class Expectations:
    """Every expect file given."""

    promises: list[_Promise] = dataclasses.field(default_factory=list)

    @classmethod
    def load(cls, paths: Iterable[str], case_names: Sequence[str], dtypes: Sequence[str]) -> "Expectations":
        out = cls()
        for path in paths:
            data = _load(path, ("backend", "ops", "cases"))
            ops, cases = {}, {}
            for section, target in (("ops", ops), ("cases", cases)):
                entries = data.get(section) or []
                if not isinstance(entries, list):
                    raise ExpectationError(f"{path}: '{section}' must be a list")
                for entry in entries:
                    name, listed = _named_dtypes(path, section, entry, dtypes)
                    if section == "ops" and not _OP.match(name):
                        raise ExpectationError(f"{path}: ops entry {name!r} is not an op name like aten.add.Tensor "
                                               f"(namespace.op.overload, as the delegation report writes them)")
                    if section == "cases" and not fnmatch.filter(case_names, name):
                        raise ExpectationError(f"{path}: cases entry {name!r} matches no case of the catalogue")
                    target[name] = target.get(name, frozenset()) | listed
            out.promises.append(_Promise(path, data.get("backend"), ops, cases))
        return out

    def check_backends(self, backends: Sequence[str]) -> None:
        for p in self.promises:
            if p.backend is not None and p.backend not in backends:
                raise ExpectationError(f"{p.source}: is for backend '{p.backend}', which is not under test "
                                       f"({', '.join(backends)})")

    def _for(self, backend: str) -> list[_Promise]:
        return [p for p in self.promises if p.backend in (None, backend)]

    def broken_promises(self, backend: str, case: str, dtype: str, declined: Sequence[Mapping[str, Any]],
                        delegated: int, total: int) -> str:
        """Why this run breaks a promise (an empty string when it keeps them all)."""
        broken = []
        for p in self._for(backend):
            for d in declined:
                if dtype in p.ops.get(d["op"], ()):
                    broken.append(f"{d['op']} (promised in {p.source}) declined: {d['reason'] or 'no reason'}")
            for pattern, dtypes in p.cases.items():
                if dtype in dtypes and fnmatch.fnmatchcase(case, pattern) and delegated < total:
                    broken.append(f"case promised whole in {p.source} ({pattern}), {delegated} of {total} nodes "
                                  f"delegated")
        return "; ".join(dict.fromkeys(broken))

    def promised_ops(self, backend: str) -> set[str]:
        return {op for p in self._for(backend) for op in p.ops}


@dataclasses.dataclass(frozen=True)
class KnownFailure:
    source: str
    backend: str | None
    pattern: str
    reason: str


def load_xfails(paths: Iterable[str]) -> list[KnownFailure]:
    out = []
    for path in paths:
        data = _load(path, ("backend", "xfail"))
        entries = data.get("xfail") or {}
        if not isinstance(entries, dict):
            raise ExpectationError(f"{path}: 'xfail' must map item-name patterns to the cause of the failure")
        for pattern, reason in entries.items():
            if not isinstance(pattern, str) or not isinstance(reason, str) or not reason.strip():
                raise ExpectationError(f"{path}: xfail entry {pattern!r}: give the cause of the failure as text")
            out.append(KnownFailure(path, data.get("backend"), pattern, reason.strip()))
    return out


def item_matches(item: str, pattern: str) -> bool:
    """``pattern`` (``*``, ``?`` wildcards; ``[`` and ``]`` literal, as item names hold them)
    matches ``item``."""
    return fnmatch.fnmatchcase(item, pattern.replace("[", "\0").replace("]", "[]]").replace("\0", "[[]"))


def match_xfail(failures: Sequence[KnownFailure], backend: str, item: str) -> KnownFailure | None:
    for f in failures:
        if f.backend in (None, backend) and item_matches(item, f.pattern):
            return f
    return None
