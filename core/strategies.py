"""Lowering strategies: what ``handoff compare`` compares.

A strategy is a backend priority list with per-backend compile options, written the way
``--backends`` is, with options in brackets::

    xnnpack                       qnn,xnnpack
    qnn[precision=fp16,soc_model=SM8650],xnnpack
    tvm[tune=200]                 sink[ops=aten.add.Tensor,aten.mul.Tensor]

Inside brackets a piece without ``=`` continues the previous value, so an option value may hold
commas. As with ``handoff partition``, the built-in ``tvm`` backend takes what the listed
backends leave (``fallback``). A YAML file names and describes strategies (:func:`load_file`);
``auto`` enumerates them from the installed backends (:func:`auto`).
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import HandoffError

FALLBACK_BACKEND = "tvm"
_DEVICE_RANK = {"npu": 0, "gpu": 1, "cpu": 2}
_YAML_KEYS = ("name", "description", "backends", "options", "fallback", "fold")


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One way to lower a model: backends in priority order and their compile options; ``fold``:
    whether what the model computes from its weights alone is folded first (:mod:`handoff.fold`)."""

    name: str
    backends: tuple[str, ...]
    options: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict, hash=False)
    description: str = ""
    fallback: bool = True
    fold: bool = True

    @property
    def spec(self) -> str:
        """The strategy in the command-line syntax (``qnn[precision=fp16],xnnpack``)."""
        return ",".join(b + (f"[{','.join(f'{k}={v}' for k, v in self.options[b].items())}]"
                             if self.options.get(b) else "") for b in self.backends)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec, "backends": list(self.backends),
                "options": {b: dict(o) for b, o in self.options.items()}, "description": self.description,
                "fallback": self.fallback, "fold": self.fold}


def parse(text: str, name: str | None = None, description: str = "", fallback: bool = True,
          fold: bool = True) -> Strategy:
    """``"qnn[precision=fp16],xnnpack"`` -> a :class:`Strategy` (named ``text`` unless ``name``)."""
    backends: list[str] = []
    options: dict[str, dict[str, str]] = {}
    for item in _split_top(text):
        backend, bracket, rest = item.partition("[")
        backend = backend.strip()
        if not backend or not backend.replace("_", "").replace("-", "").replace(":", "").isalnum():
            raise HandoffError(f"strategy {text!r}: {backend or 'an empty name'!r} is not a backend id; "
                               f"write BACKEND[NAME=VALUE,...],BACKEND..., e.g. qnn[precision=fp16],xnnpack")
        if backend in backends:
            raise HandoffError(f"strategy {text!r} names backend '{backend}' twice; give it once, with all its options")
        backends.append(backend)
        if bracket:
            if not rest.endswith("]"):
                raise HandoffError(f"strategy {text!r}: options of '{backend}' must end with ']'")
            options[backend] = _options(rest[:-1], text, backend)
    if not backends:
        raise HandoffError("an empty strategy; give backends in priority order, e.g. --strategy qnn,xnnpack")
    return Strategy(name or text.strip(), tuple(backends), options, description, fallback, fold)


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    items, depth, current = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HandoffError(f"strategy {text!r}: ']' without '['")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise HandoffError(f"strategy {text!r}: '[' without ']'")
    items.append(current)
    return [i for i in (s.strip() for s in items) if i] if text.strip() else []


def _options(text: str, strategy: str, backend: str) -> dict[str, str]:
    out: dict[str, str] = {}
    last = None
    for piece in text.split(","):
        key, eq, value = piece.partition("=")
        if eq and key.strip().replace("_", "").isalnum():
            last = key.strip()
            out[last] = value.strip()
        elif last is not None:
            out[last] += "," + piece.strip()
        elif piece.strip():
            raise HandoffError(f"strategy {strategy!r}: option {piece.strip()!r} of '{backend}' is not NAME=VALUE")
    return out


def load_file(path: str | Path) -> list[Strategy]:
    """Strategies from a YAML file: a list (or ``strategies:`` holding a list) whose entries are
    strategy strings or mappings with ``backends`` (a strategy string or a list of backend ids)
    and optionally ``name``, ``description``, ``options`` (backend -> name -> value) and
    ``fallback`` (false: no ``tvm`` for what the backends leave) and ``fold`` (false: partition
    without folding what the model computes from its weights alone, as ``partition --no-fold``)::

        strategies:
          - name: npu-fp16
            description: QNN in fp16 for a Snapdragon 8 Gen 3, XNNPACK for the rest
            backends: qnn[precision=fp16,soc_model=SM8650],xnnpack
          - xnnpack
          - {name: xnnpack-unfolded, backends: xnnpack, fold: false}
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise HandoffError(f"--strategies {path}: cannot read it: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise HandoffError(f"--strategies {path}: not valid YAML: {' '.join(str(exc).split())[:300]}") from exc
    entries = data.get("strategies") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise HandoffError(f"--strategies {path}: expected a list of strategies (or 'strategies:' holding one), "
                           f"each a string like 'qnn,xnnpack' or a mapping with 'backends'")
    out = []
    for i, entry in enumerate(entries):
        where = f"--strategies {path}: entry {i + 1}"
        if isinstance(entry, str):
            out.append(parse(entry))
            continue
        if not isinstance(entry, dict) or "backends" not in entry:
            raise HandoffError(f"{where}: expected a strategy string or a mapping with 'backends'")
        unknown = sorted(set(entry) - set(_YAML_KEYS))
        if unknown:
            raise HandoffError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(_YAML_KEYS)}")
        backends = entry["backends"]
        text = ",".join(map(str, backends)) if isinstance(backends, list) else str(backends)
        flags = {key: entry.get(key, True) for key in ("fallback", "fold")}
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise HandoffError(f"{where}: '{key}' must be true or false")
        strategy = parse(text, str(entry.get("name") or text), str(entry.get("description") or ""), **flags)
        extra = entry.get("options") or {}
        if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
            raise HandoffError(f"{where}: 'options' must map a backend to NAME: VALUE pairs")
        options = {b: dict(o) for b, o in strategy.options.items()}
        for backend, opts in extra.items():
            if backend not in strategy.backends:
                raise HandoffError(f"{where}: options for '{backend}', which its backends "
                                   f"({', '.join(strategy.backends)}) do not list")
            options.setdefault(backend, {}).update({str(k): _text(v) for k, v in opts.items()})
        out.append(dataclasses.replace(strategy, options=options))
    return out


def auto(plugins: Any) -> list[Strategy]:
    """Every backend that compiles here alone, each again with every value of the options it
    marks worth comparing (:attr:`handoff.Option.compare`), then every ordered pair of the
    vendor backends (NPUs first, then GPUs, then CPUs). ``tvm`` appears alone only: it is every
    other strategy's fallback. Backends whose runtime is absent here are included; their
    strategies are lowered but not run."""
    ids = [b for b, spec in sorted(plugins.backends.items(), key=lambda kv: _DEVICE_RANK.get(kv[1].device, 3))
           if plugins.compiler_available(b)[0]]
    vendors = [b for b in ids if b != FALLBACK_BACKEND]
    out: list[Strategy] = []
    for b in [*vendors, *([FALLBACK_BACKEND] if FALLBACK_BACKEND in ids else [])]:
        out.append(parse(b))
        for name, option in plugins.spec(b).options.items():
            default = option.parse(name, None)
            for value in option.compare:
                if option.parse(name, value) != default:
                    out.append(parse(f"{b}[{name}={_text(value)}]"))
    out += [parse(f"{a},{b}") for a, b in itertools.permutations(vendors, 2)]
    return out


def skip(strategies: Sequence[Strategy], specs: Sequence[str]) -> list[Strategy]:
    """``strategies`` without those named like one of ``specs`` or written like one
    (``tvm[tune=200]``; options in any order). A spec that matches none is an error naming the
    strategies there are, so a typo does not silently measure what was meant to be left out."""
    def matches(s: Strategy, text: str) -> bool:
        return s.name == text or _key(s) == _key(parse(text))

    missed = [text for text in specs if not any(matches(s, text) for s in strategies)]
    if missed:
        raise HandoffError(f"--skip {missed[0]}: no such strategy; the strategies are: "
                           f"{', '.join(s.spec for s in strategies)}")
    return [s for s in strategies if not any(matches(s, text) for text in specs)]


def _key(s: Strategy) -> tuple[Any, ...]:
    return s.backends, tuple(sorted((b, tuple(sorted(o.items()))) for b, o in s.options.items() if o))


def unique(strategies: Sequence[Strategy]) -> list[Strategy]:
    """``strategies`` without repeats (same backends and options), names made unique."""
    seen: set[str] = set()
    names: set[str] = set()
    out = []
    for s in strategies:
        key = f"{s.spec};{s.fallback};{s.fold}"
        if key in seen:
            continue
        seen.add(key)
        name, n = s.name, 2
        while name in names:
            name, n = f"{s.name} ({n})", n + 1
        names.add(name)
        out.append(dataclasses.replace(s, name=name))
    return out


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)
