"""The ``handoff`` command line (and ``partition``, the same as ``handoff partition``).

Exit status: 0 success, 1 failure (one line on stderr; the traceback only with ``--debug``),
2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Sequence

from .errors import HandoffError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _options(items: Sequence[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        backend, dot, name = key.partition(".")
        if not (eq and dot and backend and name):
            raise HandoffError(f"--option {item!r}: expected BACKEND.NAME=VALUE, e.g. xnnpack.threads=2")
        out.setdefault(backend, {})[name] = value
    return out


def _per_backend_ints(items: Sequence[str], flag: str) -> tuple[int | None, dict[str, int]]:
    default, per = None, {}
    for item in items:
        backend, eq, number = item.rpartition("=")
        try:
            value = int(number)
        except ValueError:
            raise HandoffError(f"{flag} {item!r}: expected N or BACKEND=N with a whole number") from None
        if value < 1:
            raise HandoffError(f"{flag} {item!r}: must be at least 1")
        if eq:
            per[backend] = value
        else:
            default = value
    return default, per


def build_parser(prog: str = "handoff") -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(prog=prog, parents=[common], description="Partition PyTorch models across backends and run them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    b = sub.add_parser("backends", parents=[common], help="list installed backends and whether they can run here")
    b.add_argument("--json", action="store_true")
    b.add_argument("--runnable", action="store_true", help="print the comma-separated ids of the vendor backends "
                   "that can both compile and run here, NPUs first (for --backends)")

    sub.add_parser("zoo", parents=[common], help="list the built-in zoo: models")

    p = sub.add_parser("partition", parents=[common], help="partition and lower a model into a .hof program")
    add_partition_arguments(p)

    r = sub.add_parser("run", parents=[common], help="run a .hof program")
    r.add_argument("program")
    r.add_argument("--input", action="append", default=[], metavar="FILE.npy", help="one per program input, in order "
                   "(default: random inputs of the right shapes)")
    r.add_argument("--bench", type=int, default=0, metavar="N", help="time N runs after warm-up; print p50/p90")
    r.add_argument("--warmup", type=int, default=3, metavar="N")
    r.add_argument("--option", action="append", default=[], metavar="BACKEND.NAME=VALUE", help="runtime option")
    r.add_argument("--save-outputs", metavar="DIR", help="write each output as DIR/NAME.npy")
    r.add_argument("--json", action="store_true", help="print a JSON summary")
    r.add_argument("--strict", action="store_true", help="never run a delegate's fallback copy: fail when its own "
                   "backend is missing, cannot run here or fails to load it")
    add_trust_arguments(r)

    s = sub.add_parser("sign", parents=[common], help="sign a program (ed25519), so runtimes that trust the key "
                       "load its native code")
    s.add_argument("program")
    s.add_argument("--key", metavar="KEY.pem", help="ed25519 private key (default: the local key in $HANDOFF_HOME/keys)")
    s.add_argument("-o", "--output", help="write the signed program here (default: replace PROGRAM)")

    v = sub.add_parser("verify", parents=[common], help="check a program's every byte and its signature")
    v.add_argument("program")
    v.add_argument("--trusted-keys", action="append", default=[], metavar="DIR",
                   help="directory of PEM public keys to trust, besides the local key and $HANDOFF_HOME/trusted")

    k = sub.add_parser("key", parents=[common], help="print this machine's public signing key (give it to whoever "
                       "runs your programs), or trust someone else's")
    k.add_argument("--trust", metavar="PUBLIC.pem", help="trust this public key from now on (copies it into "
                   "$HANDOFF_HOME/trusted)")

    i = sub.add_parser("inspect", parents=[common], help="show a program's header, instructions and segments")
    i.add_argument("program")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    return parser


def add_partition_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model.pt2 | path/file.py:Name | zoo:NAME")
    p.add_argument("-o", "--output", help="program file to write (default: MODEL's name + .hof)")
    p.add_argument("--backends", default="", help="priority list, e.g. coreml,xnnpack or preset:android")
    p.add_argument("--no-fallback", action="store_true", help="no tvm fallback: nodes the listed backends leave are an error")
    p.add_argument("--no-aten", action="store_true", help="forbid host ATen ops for nodes no backend can take")
    p.add_argument("--input-shape", action="append", default=[], metavar="1x3x224x224[:DTYPE]", help="once per input")
    p.add_argument("--option", action="append", default=[], metavar="BACKEND.NAME=VALUE", help="compile option")
    p.add_argument("--target", help="shorthand for --option tvm.target=TARGET (host, aarch64)")
    p.add_argument("--tune", type=int, metavar="N", help="shorthand for --option tvm.tune=N (MetaSchedule trials)")
    p.add_argument("--tune-budget", type=int, metavar="MINUTES",
                   help="shorthand for --option tvm.tune_budget=MINUTES (MetaSchedule tuning time per partition)")
    p.add_argument("--min-partition-size", action="append", default=[], metavar="[BACKEND=]N",
                   help="a smaller partition joins a neighbouring partition whose backend also takes its nodes "
                        "(default 3; 1 keeps every island)")
    p.add_argument("--max-partitions", action="append", default=[], metavar="[BACKEND=]N")
    p.add_argument("--on-lower-error", choices=("fail", "fallback"), default="fail",
                   help="fallback: move a partition that fails to lower to the next backend")
    p.add_argument("--report", metavar="FILE.json", help="write the delegation report as JSON")
    p.add_argument("--no-cache", action="store_true", help="do not reuse lowered partitions from $HANDOFF_HOME")
    p.add_argument("--trust-model", action="store_true", help="read a model file that runs code when loaded (a .pt2 "
                   "holding pickles): only for files whose author you trust")
    p.add_argument("--no-sign", action="store_true", help="do not sign the program with the local key")
    p.add_argument("--fallback-copies", action="store_true", help="store next to each vendor delegate a copy of "
                   "its partition compiled by tvm (for the host or --target), run where the vendor's runtime is missing")
    p.add_argument("--quiet", action="store_true", help="print only the output path")


def add_trust_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trusted-keys", action="append", default=[], metavar="DIR",
                   help="directory of PEM public keys whose signatures make a program's native code loadable, "
                        "besides the local key and $HANDOFF_HOME/trusted")
    p.add_argument("--allow-unsigned", action="store_true",
                   help="load native code no trusted key signed (only for programs you trust)")


def main(argv: Sequence[str] | None = None, prog: str = "handoff") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    from .quiet import set_debug

    set_debug(getattr(args, "debug", False))
    # torch.export's deprecation noise about its own pytree internals: not actionable by users
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`", category=FutureWarning)
    try:
        return COMMANDS[args.command](args)
    except HandoffError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return EXIT_FAIL
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_FAIL
    except Exception as exc:  # a bug: still one line, traceback on request
        print(f"{prog}: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:400]} "
              f"(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return EXIT_FAIL


def partition_main(argv: Sequence[str] | None = None) -> int:
    """``partition ...``: the same as ``handoff partition ...``."""
    return main(["partition", *(sys.argv[1:] if argv is None else argv)], prog="partition")


# -- commands --------------------------------------------------------------------------------

def _option_rows(options: Any) -> dict[str, dict[str, Any]]:
    return {name: {"type": o.type, "default": o.default, "valid": o.valid(), "help": o.help}
            for name, o in options.items()}


def _cmd_backends(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .pipeline import FALLBACK_BACKEND
    from .plugins import get_plugins

    plugins = get_plugins()
    if args.runnable:
        rank = {"npu": 0, "gpu": 1, "cpu": 2}
        ids = [bid for bid, spec in sorted(plugins.backends.items(), key=lambda kv: rank[kv[1].device])
               if bid != FALLBACK_BACKEND and plugins.compiler_available(bid)[0] and plugins.runtime_available(bid)[0]]
        print(",".join(ids))
        return EXIT_OK
    rows = []
    for bid, spec in plugins.backends.items():
        aot, aot_why = plugins.compiler_available(bid)
        rt, rt_why = plugins.runtime_available(bid)
        dist, version = plugins.distribution(bid)
        entry = plugins.registry.backends.get(bid, {})
        rows.append({"id": bid, "version": spec.version, "device": spec.device, "plugin": plugins.plugin_of(bid),
                     "distribution": dist, "distribution_version": version, "api_version": spec.api_version,
                     "aot": aot, "aot_reason": aot_why, "runtime": rt, "runtime_reason": rt_why,
                     "description": spec.description, "platforms": entry.get("platforms", []),
                     "options": _option_rows(spec.options), "runtime_options": _option_rows(spec.runtime_options)})
    missing = [{"id": bid, "install": plugins.registry.install_hint(bid)} for bid in plugins.registry.backends
               if bid not in plugins.backends]
    broken = [str(b) for b in plugins.broken]
    problems = list(plugins.registry.problems)
    if args.json:
        print(json.dumps({"backends": rows, "not_installed": missing, "broken_plugins": broken,
                          "catalogue_problems": problems}, indent=2))
        return EXIT_OK
    console = Console()
    if not console.is_terminal:  # a log or a pipe: wide enough that reasons stay readable
        console = Console(width=160)
    table = Table(title="Installed backends", title_justify="left")
    for col in ("backend", "version", "device", "distribution", "compile (AOT)", "runtime here", "description"):
        table.add_column(col)
    for r in rows:
        dist = f"{r['distribution']} {r['distribution_version']}" if r["distribution"] else f"({r['plugin']})"
        table.add_row(r["id"], r["version"], r["device"], dist, "yes" if r["aot"] else f"no: {r['aot_reason']}",
                      "yes" if r["runtime"] else f"no: {r['runtime_reason']}", r["description"])
    console.print(table)
    for m in missing:
        console.print(f"not installed: {m['id']} (install with: {m['install']})")
    for b in broken:
        console.print(f"[red]{b}[/]")
    for p in problems:
        console.print(f"[yellow]catalogue: {p}[/]")
    return EXIT_OK


def _cmd_zoo(args: argparse.Namespace) -> int:
    from .plugins import get_plugins

    for name, model in sorted(get_plugins().zoo().items()):
        shapes = ", ".join("x".join(map(str, s)) + (f":{d}" if d != "float32" else "") for s, d in model.inputs)
        print(f"zoo:{name:<20} {shapes:<20} {model.description}")
    return EXIT_OK


def run_partition(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .partitioner import Limits
    from .pipeline import DEFAULT_MIN_PARTITION_SIZE, partition
    from .zoo import parse_input_shape

    try:
        shapes = [parse_input_shape(s) for s in args.input_shape]
    except ValueError as exc:
        raise HandoffError(str(exc)) from exc
    options = _options(args.option)
    if args.target:
        options.setdefault("tvm", {})["target"] = args.target
    if args.tune is not None:
        options.setdefault("tvm", {})["tune"] = str(args.tune)
    if args.tune_budget is not None:
        options.setdefault("tvm", {})["tune_budget"] = str(args.tune_budget)
    min_default, min_per = _per_backend_ints(args.min_partition_size, "--min-partition-size")
    max_default, max_per = _per_backend_ints(args.max_partitions, "--max-partitions")
    backends = [b for b in args.backends.split(",") if b.strip()]

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True,
                  disable=args.quiet or not console.is_terminal) as bar:
        task = bar.add_task("exporting", total=None)

        def progress(message: str, done: int, total: int) -> None:
            bar.update(task, description=message, completed=done, total=total)

        min_default = min_default or DEFAULT_MIN_PARTITION_SIZE
        result = partition(args.model, backends=backends, input_shapes=shapes, options=options,
                           fallback=not args.no_fallback, aten=not (args.no_aten or args.no_fallback),
                           limits={b: Limits(min_per.get(b, min_default), max_per.get(b, max_default))
                                   for b in {*min_per, *max_per}},
                           default_limits=Limits(min_default, max_default),
                           on_lower_error=args.on_lower_error, use_cache=not args.no_cache, progress=progress,
                           trust_model=args.trust_model, fallback_copies=args.fallback_copies)
    output = args.output or _default_output(args.model)
    result.write(output, sign=not args.no_sign)
    if args.report:
        Path(args.report).write_text(json.dumps(result.report.to_json(), indent=2))
    if args.quiet:
        print(output)
    else:
        out = Console()
        if not out.is_terminal:  # a log or a pipe: wide enough that op lists and reasons stay readable
            out = Console(width=140)
        result.report.render(out)
    return EXIT_OK


def _default_output(model: str) -> str:
    name = model.removeprefix("zoo:").rpartition(":")[0] if model.count(":") and not model.startswith("zoo:") else model
    stem = Path(name.removeprefix("zoo:")).stem or "model"
    return f"{stem}.hof"


def _cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from .runtime import load

    from .errors import FallbackWarning

    options = _options(args.option)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FallbackWarning)
        program = load(args.program, options=options, trusted_keys=args.trusted_keys,
                       allow_unsigned=args.allow_unsigned, strict=args.strict)
    load_s = time.perf_counter() - start
    for w in caught:  # one line each on stderr, as errors are
        if issubclass(w.category, FallbackWarning):
            print(f"handoff: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    with program:
        specs = program.input_specs
        if args.input:
            if len(args.input) != len(specs):
                raise HandoffError(f"{args.program} takes {len(specs)} input(s) "
                                   f"({', '.join(s[0] for s in specs)}); got {len(args.input)} --input")
            inputs = []
            for path in args.input:
                try:
                    inputs.append(np.load(path, allow_pickle=False))
                except (OSError, ValueError) as exc:
                    raise HandoffError(f"--input {path}: cannot read a .npy array: {exc}") from exc
            source = "given"
        else:
            rng = np.random.default_rng(0)
            inputs = [_random_array(rng, shape, dtype) for _, shape, dtype in specs]
            source = "random (seed 0)"
        first_start = time.perf_counter()
        outputs = program.run(inputs)
        first_s = time.perf_counter() - first_start
        times = []
        if args.bench > 0:
            for _ in range(args.warmup):
                program.run(inputs)
            for _ in range(args.bench):
                t0 = time.perf_counter()
                program.run(inputs)
                times.append(time.perf_counter() - t0)
        ran = [{"delegate": i, "partition": d["partition"], "backend": d["backend"], "copy": d["copy"],
                "runtime": d["runtime"], "fallback_reason": d["fallback_reason"]}
               for i, d in enumerate(program.stats()["delegates"])]
    summary: dict[str, Any] = {"program": args.program, "inputs": source, "load_ms": round(load_s * 1e3, 3),
                               "first_run_ms": round(first_s * 1e3, 3), "delegates": ran, "outputs": []}
    for (name, _, _), out in zip(program.output_specs, outputs):
        summary["outputs"].append({"name": name, "dtype": str(out.dtype), "shape": list(out.shape),
                                   "head": [float(v) for v in out.reshape(-1)[:6]]})
        if args.save_outputs:
            Path(args.save_outputs).mkdir(parents=True, exist_ok=True)
            np.save(Path(args.save_outputs) / f"{name}.npy", out)
    if times:
        ordered = sorted(times)
        summary["bench"] = {"runs": len(times), "p50_ms": round(_pct(ordered, 50) * 1e3, 3),
                            "p90_ms": round(_pct(ordered, 90) * 1e3, 3)}
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    print(f"{args.program}: loaded in {summary['load_ms']:.1f} ms, first run {summary['first_run_ms']:.1f} ms, "
          f"inputs: {source}")
    copies = [d for d in ran if d["copy"] is not None]
    if copies:
        print(f"  delegates: {len(ran) - len(copies)} of {len(ran)} ran on their own backend, {len(copies)} on a "
              f"fallback copy")
        for d in copies:
            print(f"  delegate {d['delegate']} ({d['partition']}, backend '{d['backend']}') ran its fallback copy "
                  f"{d['copy']} (backend '{d['runtime']}'): {d['fallback_reason']}")
    for o in summary["outputs"]:
        head = ", ".join(f"{v:.5g}" for v in o["head"])
        print(f"  {o['name']}: {o['dtype']}{o['shape']} [{head}{', ...' if np.prod(o['shape']) > 6 else ''}]")
    if times:
        b = summary["bench"]
        print(f"  {b['runs']} runs: p50 {b['p50_ms']:.3f} ms, p90 {b['p90_ms']:.3f} ms")
    return EXIT_OK


def _pct(ordered: list[float], pct: int) -> float:
    k = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[k]


def _random_array(rng: Any, shape: tuple[int, ...], dtype: str) -> Any:
    if dtype.startswith("float"):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == "bool":
        return rng.random(shape) > 0.5
    return rng.integers(0, 8, size=shape).astype(dtype)


def _cmd_sign(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .program import ProgramFile, write_program
    from .signing import LocalKey, local_key

    if args.key and not Path(args.key).is_file():
        raise HandoffError(f"--key {args.key}: no such file; give an ed25519 private key in PEM form")
    key = LocalKey(Path(args.key)) if args.key else local_key()
    with ProgramFile.open(args.program) as pf:
        pf.verify_all()  # sign only what is intact
        manifest = {k: v for k, v in pf.manifest.items() if k not in ("segments", "signatures")}
        segments = [bytes(pf.segment(i)) for i in range(len(pf))]
    output = args.output or args.program
    write_program(output, manifest, segments, alignment=pf.alignment, signer=key)
    print(f"{output}: signed by key {key.id}")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from .program import ProgramFile
    from .signing import trusted_keys, verify

    with ProgramFile.open(args.program) as pf:
        pf.verify_all()
        verdict = verify(pf.manifest, trusted_keys(args.trusted_keys))
    if verdict.trusted_by is None:
        raise HandoffError(f"{args.program}: every segment is intact, but the program is {verdict.describe()}; "
                           f"get the signer's public key and pass --trusted-keys DIR")
    print(f"{args.program}: every segment intact; {verdict.describe()}")
    return EXIT_OK


def _cmd_key(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from .signing import TRUSTED_DIR, _home, _load_public, key_id, local_key

    if args.trust:
        public = _load_public(Path(args.trust))
        directory = _home() / TRUSTED_DIR
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / f"{key_id(public)}.pem"
        shutil.copyfile(args.trust, target)
        print(f"trusting key {key_id(public)} ({target})")
        return EXIT_OK
    key = local_key()
    print(f"# handoff public key {key.id} (its private key: {key.path}); save this text to a file and trust it "
          f"elsewhere with: handoff key --trust FILE")
    print(key.public_pem().decode(), end="")
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .program import ProgramFile

    with ProgramFile.open(args.program) as pf:
        pf.verify_all()
        m = pf.manifest
        if args.json:
            print(json.dumps(m, indent=2))
            return EXIT_OK
        print(f"{args.program}: handoff program format {pf.major}.{pf.minor}, {pf.file_size} bytes, "
              f"alignment {pf.alignment}, flags {pf.flags:#x}, written by handoff {m['handoff_version']}")
        print(f"signature: {_signature_line(m)}")
        vals = m["values"]

        def sig(vid: int) -> str:
            return f"%{vid}:{vals[vid]['dtype']}{vals[vid]['shape']}"

        print("inputs:  " + ", ".join(f"{i['name']}={sig(i['value'])}" for i in m["inputs"]))
        print("outputs: " + ", ".join(f"{o['name']}={sig(o['value'])}" for o in m["outputs"]))
        print(f"instructions ({len(m['instructions'])}):")
        for n, ins in enumerate(m["instructions"]):
            outs = ", ".join("_" if v is None else f"%{v}" for v in ins["outputs"])
            if ins["op"] == "delegate":
                d = m["delegates"][ins["delegate"]]
                ins_s = ", ".join(f"%{v}" for v in ins["inputs"])
                print(f"  {n:>3}  {outs} = delegate[{d['backend']} {d['backend_version']}] {d['partition']}({ins_s})"
                      f"  segment {d['segment']}")
            else:
                print(f"  {n:>3}  {outs} = {ins['target']}(...)  [host]")
        carry = sum(1 for d in m["delegates"] if d.get("fallbacks"))
        print(f"delegates ({len(m['delegates'])}" + (f", {carry} with fallback copies" if carry else "") + "):")
        for n, d in enumerate(m["delegates"]):
            meta = ", ".join(f"{k}={v}" for k, v in d["metadata"].items() if not isinstance(v, (dict, list)))
            print(f"  {n:>3}  {d['backend']:<8} {d['partition']:<12} {meta}")
            for k, c in enumerate(d.get("fallbacks", ())):
                size = m["segments"][c["segment"]]["length"]
                print(f"       fallback copy {k}: {c['backend']} {c['backend_version']}, segment {c['segment']} "
                      f"({size} bytes)")
        print(f"segments ({len(m['segments'])}):")
        for n, s in enumerate(m["segments"]):
            print(f"  {n:>3}  offset {s['offset']:>10}  {s['length']:>10} bytes  sha256 {s['sha256'][:16]}…")
    return EXIT_OK


def _signature_line(manifest: dict) -> str:
    from .signing import trusted_keys, verify

    return verify(manifest, trusted_keys()).describe()


COMMANDS = {"backends": _cmd_backends, "zoo": _cmd_zoo, "partition": run_partition, "run": _cmd_run,
            "inspect": _cmd_inspect, "sign": _cmd_sign, "verify": _cmd_verify, "key": _cmd_key}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
