"""The ``handoff`` command line (and ``partition``, the same as ``handoff partition``).

Exit status: 0 success, 1 failure (one line on stderr; the traceback only with ``--debug``),
2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .errors import HandoffError, one_line

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

    z = sub.add_parser("zoo", parents=[common], help="list the zoo: models with their inputs, parameters and FLOPs")
    z.add_argument("--json", action="store_true")
    z.add_argument("--torchvision", action="store_true", help="list the torchvision:NAME models instead "
                   "(torchvision's classification and segmentation models, random weights)")

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
    r.add_argument("--check-against", metavar="MODEL", help="compare the outputs, and each delegate on its own "
                   "boundary inputs, with eager PyTorch running MODEL (the model the program was partitioned from); "
                   "exit 1 when a delegate differs by more than --tolerance")
    r.add_argument("--tolerance", type=float, default=None, metavar="REL",
                   help="relative error a delegate may have in --check-against (default 1e-3)")
    r.add_argument("--json", action="store_true", help="print a JSON summary")
    r.add_argument("--strict", action="store_true", help="never run a delegate's fallback copy: fail when its own "
                   "backend is missing, cannot run here or fails to load it")
    add_trust_arguments(r)
    add_rpc_arguments(r, "run on a device of KEY from the pool of this TVM RPC tracker (the program is shipped "
                         "as it is; the device's own trust rules apply)", session=True)

    sv = sub.add_parser("serve", parents=[common], help="serve this device to a TVM RPC tracker's pool: run the "
                        ".hof programs clients send (handoff run/compare --rpc)")
    sv.add_argument("--tracker", required=True, metavar="HOST:PORT", help="the TVM RPC tracker to register with")
    sv.add_argument("--key", required=True, help="the device kind clients ask for (e.g. rk3588, pixel8)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; TVM's RPC trusts "
                    "its network: expose it only on a private network)")
    sv.add_argument("--port", type=int, default=9090, help="first port to try (default 9090)")
    sv.add_argument("--port-end", type=int, metavar="PORT", help="try ports up to this one (default --port + 100)")
    sv.add_argument("--allow-tuning", action="store_true", help="let MetaSchedule's RPC runner upload and run its "
                    "candidate kernels (unsigned native code): only on devices reserved for tuning")
    add_trust_arguments(sv)

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

    c = sub.add_parser("compare", parents=[common], help="lower a model with several strategies and measure each: "
                       "coverage, size, load and first-run time, latency, error vs eager PyTorch")
    c.add_argument("model", help="model.pt2 | path/file.py:Name | zoo:NAME")
    c.add_argument("--strategy", action="append", default=[], metavar="SPEC",
                   help="a backend priority list with options, e.g. xnnpack, qnn,xnnpack, "
                        "'qnn[precision=fp16,soc_model=SM8650],xnnpack', 'tvm[tune=200]' (repeat for more)")
    c.add_argument("--strategies", action="append", default=[], metavar="FILE.yaml|auto",
                   help="strategies from a YAML file, or 'auto': every backend that compiles here alone (and with "
                        "the option values it marks worth comparing) and every ordered pair of vendor backends")
    c.add_argument("--skip", action="append", default=[], metavar="SPEC|NAME",
                   help="leave out this strategy (e.g. --strategies auto --skip 'tvm[tune=200]'); repeat for more")
    c.add_argument("--runs", type=int, default=50, metavar="N", help="timed runs per strategy (default 50)")
    c.add_argument("--rounds", type=int, default=10, metavar="N",
                   help="interleaved rounds the runs are split into (default 10)")
    c.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed runs first (default 3)")
    c.add_argument("--seed", type=int, default=1, help="seed of the fresh random inputs (default 1)")
    c.add_argument("--per-delegate", action="store_true", help="also check each delegate against eager PyTorch "
                   "evaluating the same subgraph on the same boundary inputs")
    c.add_argument("--tolerance", type=float, default=None, metavar="REL",
                   help="relative error over which a delegate is flagged (default 1e-3)")
    c.add_argument("--input-shape", action="append", default=[], metavar="1x3x224x224[:DTYPE]", help="once per input")
    c.add_argument("--option", action="append", default=[], metavar="BACKEND.NAME=VALUE",
                   help="runtime option for every program using that backend")
    c.add_argument("--no-fallback", action="store_true", help="no tvm fallback in any strategy: nodes its backends "
                   "leave run as host ATen ops")
    c.add_argument("--on-lower-error", choices=("fail", "fallback"), default="fallback",
                   help="fail: a partition that fails to lower fails its strategy; fallback (default): it moves to "
                        "the next backend")
    c.add_argument("--no-cache", action="store_true", help="do not reuse lowered partitions or capability answers from $HANDOFF_HOME")
    c.add_argument("--trust-model", action="store_true", help="read a model file that runs code when loaded (a .pt2 "
                   "holding pickles): only for files whose author you trust")
    c.add_argument("--max-workers", type=int, metavar="N", help="at most N measuring processes at once (each holds "
                   "its backends' runtimes, a few hundred MB); strategies are then timed in groups of N, interleaved "
                   "within each group (default: all at once)")
    c.add_argument("--json", nargs="?", const="-", metavar="FILE", help="write the results as JSON (to stdout "
                   "without FILE, instead of the table)")
    c.add_argument("--csv", nargs="?", const="-", metavar="FILE", help="write one CSV row per strategy (to stdout "
                   "without FILE, instead of the table)")
    c.add_argument("--csv-layout", choices=("wide", "long"), help="with --rpc: wide, one row per strategy with "
                   "KEY:p50_ms, KEY:max_abs_error, KEY:status ... columns per device key (default with several "
                   "keys); long, one row per strategy and key with a key column")
    c.add_argument("--plot", metavar="OUT.png", help="chart: latency (p50, p90), coverage by backend, and the "
                   "Pareto front for --strategies auto")
    add_rpc_arguments(c, "measure every strategy on a device of each --key from the pool of this TVM RPC tracker "
                         "(a row per strategy and key) instead of here; programs are built here for each key's "
                         "target and shipped", session=True,
                      key_help="with --rpc: device keys, K1,K2 (handoff serve --key)")
    c.add_argument("--key-target", action="append", default=[], metavar="KEY=TARGET",
                   help="with --rpc: build for this tvm target for KEY (host, aarch64; default: what the device "
                        "says it is); repeat for more")
    c.add_argument("--quiet", action="store_true", help="no progress display")

    i = sub.add_parser("inspect", parents=[common], help="show a program's header, instructions and segments")
    i.add_argument("program")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")

    n = sub.add_parser("new-backend", parents=[common], help="create a backend plugin distribution (pyproject, "
                       "compiler, runtime, catalogue entry, README, tests running the conformance suite)")
    n.add_argument("name", help="the backend id: lowercase letters, digits and underscores (package handoff_NAME)")
    n.add_argument("--dir", help="where to create it (default: ./handoff-NAME); must not exist or be empty")
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
    add_rpc_arguments(p, "with --tune: measure MetaSchedule's candidates on the devices of --key in this TVM RPC "
                         "tracker's pool (their handoff serve needs --allow-tuning); shorthand for --option "
                         "tvm.rpc=HOST:PORT/KEY")
    p.add_argument("--tune-budget", type=int, metavar="MINUTES",
                   help="shorthand for --option tvm.tune_budget=MINUTES (MetaSchedule tuning time per partition)")
    p.add_argument("--min-partition-size", action="append", default=[], metavar="[BACKEND=]N",
                   help="a smaller partition joins a neighbouring partition whose backend also takes its nodes "
                        "(default 3; 1 keeps every island)")
    p.add_argument("--max-partitions", action="append", default=[], metavar="[BACKEND=]N")
    p.add_argument("--on-lower-error", choices=("fail", "fallback"), default="fail",
                   help="fallback: move a partition that fails to lower to the next backend")
    p.add_argument("--report", metavar="FILE.json", help="write the delegation report as JSON")
    p.add_argument("--no-cache", action="store_true", help="do not reuse lowered partitions or capability answers from $HANDOFF_HOME")
    p.add_argument("--trust-model", action="store_true", help="read a model file that runs code when loaded (a .pt2 "
                   "holding pickles): only for files whose author you trust")
    p.add_argument("--no-sign", action="store_true", help="do not sign the program with the local key")
    p.add_argument("--no-fold", action="store_true", help="do not evaluate at partition time what the model computes "
                   "from its weights alone (it is then computed at every run)")
    p.add_argument("--fallback-copies", action="store_true", help="store next to each vendor delegate a copy of "
                   "its partition compiled by tvm (for the host or --target), run where the vendor's runtime is missing")
    p.add_argument("--quantize", choices=("int8",), help="PT2E-quantize the float model with the selected backends' "
                   "quantizers (highest priority first), then partition the int8 graph")
    p.add_argument("--calibration", type=int, metavar="N", help="with --quantize: calibrate on N random batches "
                   "(default 8)")
    p.add_argument("--calibration-data", metavar="FILE.npz", help="with --quantize: calibrate on these batches, one "
                   "array per model input, in input order, shaped (N, *input shape)")
    p.add_argument("--quiet", action="store_true", help="print only the output path")


def add_rpc_arguments(p: argparse.ArgumentParser, rpc_help: str, session: bool = False,
                      key_help: str = "with --rpc: the device key (handoff serve --key)") -> None:
    p.add_argument("--rpc", metavar="HOST:PORT", help=rpc_help)
    p.add_argument("--key", metavar="KEY", help=key_help)
    if session:
        p.add_argument("--rpc-wait", type=float, default=120.0, metavar="S",
                       help="with --rpc: seconds to wait for a free device (default 120)")
        p.add_argument("--rpc-timeout", type=float, default=0.0, metavar="S",
                       help="with --rpc: the device ends the session after S seconds (default: no limit)")


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
    except BrokenPipeError:  # the reader went away (`handoff inspect --json | head -1`): stop quietly
        _silence_stdout()
        return EXIT_FAIL
    except HandoffError as exc:
        print(f"{prog}: error: {printable(str(exc))}", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return EXIT_FAIL
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_FAIL
    except Exception as exc:  # a bug: still one line, traceback on request
        print(f"{prog}: internal error: {printable(one_line(exc))} "
              f"(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return EXIT_FAIL


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with control characters (terminal escapes, bidirectional overrides) shown as
    ``\\xNN``: names from a program file must not drive the user's terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        text)


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

    from .plugins import get_plugins

    plugins = get_plugins()
    if args.runnable:
        print(",".join(plugins.runnable()))
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
    from rich.console import Console
    from rich.table import Table

    from .plugins import get_plugins

    if args.torchvision:
        from .zoo import vision

        names = [f"torchvision:{n}" for n in vision.names()]
        print(json.dumps(names, indent=2) if args.json else "\n".join(names))
        return EXIT_OK
    rows = []
    for name, model in sorted(get_plugins().zoo().items()):
        rows.append({"name": f"zoo:{name}", "inputs": [{"shape": list(s), "dtype": d} for s, d in model.inputs],
                     "params": model.params, "flops": model.flops, "description": model.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    table = Table(title="Zoo models (FLOPs per inference as torch.utils.flop_counter counts them)", title_justify="left")
    for col, just in (("model", "left"), ("inputs", "left"), ("parameters", "right"), ("FLOPs", "right"),
                      ("description", "left")):
        table.add_column(col, justify=just, no_wrap=col != "description")  # type: ignore[arg-type]
    for r in rows:
        shapes = ", ".join("x".join(map(str, i["shape"])) + (f":{i['dtype']}" if i["dtype"] != "float32" else "")
                           for i in r["inputs"])
        table.add_row(r["name"], shapes, _si(r["params"]), _si(r["flops"]), r["description"])
    console.print(table)
    console.print("also torchvision:NAME, any torchvision classification or segmentation model with random "
                  "weights (1x3x224x224 unless --input-shape; list them with: handoff zoo --torchvision)")
    return EXIT_OK


def _si(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar on stderr (when it is a terminal), as a ``progress(message, done, total)``
    callback."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True,
                  disable=quiet or not console.is_terminal) as bar:
        task = bar.add_task("exporting", total=None)

        def progress(message: str, done: int, total: int) -> None:
            bar.update(task, description=message[:100], completed=done, total=total)

        yield progress


def run_partition(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .partitioner import Limits
    from .pipeline import DEFAULT_MIN_PARTITION_SIZE, partition
    from .zoo import parse_input_shape

    try:
        shapes = [parse_input_shape(s) for s in args.input_shape]
    except ValueError as exc:
        raise HandoffError(str(exc)) from exc
    output = args.output or _default_output(args.model)
    check_writable(output, "-o")  # before minutes of export and lowering, not after
    if args.report:
        check_writable(args.report, "--report")
    options = _options(args.option)
    if args.target:
        options.setdefault("tvm", {})["target"] = args.target
    if args.tune is not None:
        options.setdefault("tvm", {})["tune"] = str(args.tune)
    if args.rpc or args.key:
        options.setdefault("tvm", {})["rpc"] = f"{args.rpc or ''}/{_rpc_key(args)}"
    if args.tune_budget is not None:
        options.setdefault("tvm", {})["tune_budget"] = str(args.tune_budget)
    min_default, min_per = _per_backend_ints(args.min_partition_size, "--min-partition-size")
    max_default, max_per = _per_backend_ints(args.max_partitions, "--max-partitions")
    backends = [b for b in args.backends.split(",") if b.strip()]

    with _progress(args.quiet) as progress:
        min_default = min_default or DEFAULT_MIN_PARTITION_SIZE
        result = partition(args.model, backends=backends, input_shapes=shapes, options=options,
                           fallback=not args.no_fallback, aten=not (args.no_aten or args.no_fallback),
                           limits={b: Limits(min_per.get(b, min_default), max_per.get(b, max_default))
                                   for b in {*min_per, *max_per}},
                           default_limits=Limits(min_default, max_default),
                           on_lower_error=args.on_lower_error, use_cache=not args.no_cache, progress=progress,
                           trust_model=args.trust_model, fallback_copies=args.fallback_copies,
                           quantize=args.quantize, calibration=args.calibration,
                           calibration_data=args.calibration_data, fold=not args.no_fold)
    result.write(output, sign=not args.no_sign)
    if args.report:
        try:
            Path(args.report).write_text(json.dumps(result.report.to_json(), indent=2))
        except OSError as exc:
            raise HandoffError(f"--report {args.report}: cannot write: {exc.strerror or exc}") from exc
    if args.quiet:
        print(output)
    else:
        out = Console()
        if not out.is_terminal:  # a log or a pipe: wide enough that op lists and reasons stay readable
            out = Console(width=140)
        result.report.render(out)
    return EXIT_OK


def check_writable(path: str, flag: str) -> None:
    """Fail now, in one line, when ``path`` cannot be written: its directory is missing or
    read-only, or it names a directory. (Tries a temporary file, which also works for root.)"""
    from .tempfiles import create_file

    target = Path(path)
    parent = target.parent
    if target.is_dir():
        raise HandoffError(f"{flag} {path}: is a directory; name a file in it, e.g. {target / 'model.hof'}")
    if not parent.is_dir():
        raise HandoffError(f"{flag} {path}: directory {parent} does not exist; create it first "
                           f"(mkdir -p {parent}) or choose another path")
    try:
        fd, tmp = create_file(parent, f".{target.name}.", ".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise HandoffError(f"{flag} {path}: cannot write in directory {parent}: {exc.strerror or exc}; "
                           f"choose another path") from exc


def _default_output(model: str) -> str:
    name = model.removeprefix("zoo:").rpartition(":")[0] if model.count(":") and not model.startswith("zoo:") else model
    stem = Path(name.removeprefix("zoo:")).stem or "model"
    return f"{stem}.hof"


def _rpc_key(args: argparse.Namespace) -> str:
    if not (args.rpc and args.key):
        raise HandoffError("--rpc HOST:PORT and --key KEY go together: the tracker, and the device key to ask it for")
    from .remote import parse_keys

    keys = parse_keys(args.key)
    if len(keys) > 1:
        raise HandoffError(f"--key {args.key!r}: one key here (handoff compare takes several)")
    return keys[0]


def _cmd_serve(args: argparse.Namespace) -> int:
    from .remote import ServeConfig, serve

    config = ServeConfig(tuple(args.trusted_keys), args.allow_unsigned, args.allow_tuning)

    def ready(port: int) -> None:
        print(f"handoff serve: key '{args.key}' on {args.host}:{port}, registering with the RPC tracker {args.tracker}"
              f"{' (tuning allowed)' if args.allow_tuning else ''}; Ctrl-C stops", flush=True)

    try:
        serve(args.tracker, args.key, args.host, args.port, args.port_end or args.port + 100, config, ready)
    except KeyboardInterrupt:
        # TVM's listen loop is a non-daemon thread that retries on socket errors: Ctrl-C ends the process
        print("handoff serve: stopped", flush=True)
        os._exit(EXIT_OK)
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from .bench import percentiles, time_calls
    from .errors import FallbackWarning
    from .limits import check_random_inputs
    from .program import ProgramFile
    from .runtime import load

    options = _options(args.option)
    save_dir = _prepare_save_dir(args.save_outputs) if args.save_outputs else None
    if args.rpc or args.key:
        key = _rpc_key(args)
        for flag in ("trusted_keys", "allow_unsigned", "strict"):
            if getattr(args, flag):
                raise HandoffError(f"--{flag.replace('_', '-')} applies to local runs; a device trusts and loads what "
                                   f"its handoff serve was told to (its --trusted-keys)")
        with ProgramFile.open(args.program) as pf:
            pf.verify_all()
            program: Any = _Specs(pf.manifest)
    else:
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
            inputs = [_read_input(path, spec) for path, spec in zip(args.input, specs)]
            source = "given"
        else:
            check_random_inputs(specs, args.program)
            rng = np.random.default_rng(0)
            inputs = [_random_array(rng, shape, dtype) for _, shape, dtype in specs]
            source = "random (seed 0)"
        if args.rpc:
            from .remote import run_remote

            remote = run_remote(args.program, args.rpc, key, inputs, bench=args.bench, warmup=args.warmup,
                                options=options, wait_s=args.rpc_wait, timeout_s=args.rpc_timeout)
            outputs, times = remote.outputs, [t / 1e3 for t in remote.times_ms]
            load_s, first_s = remote.load_ms / 1e3, remote.first_run_ms / 1e3
            source += f"; ran on device '{key}' ({remote.device.get('hostname')}) via {args.rpc}"
            ran: list[dict[str, Any]] = []
        else:
            first_start = time.perf_counter()
            outputs = _run_program(program, inputs, args.program)
            first_s = time.perf_counter() - first_start
            times = (time_calls(lambda: _run_program(program, inputs, args.program), args.bench, args.warmup)
                     if args.bench > 0 else [])
            ran = [{"delegate": i, "partition": d["partition"], "backend": d["backend"], "copy": d["copy"],
                    "runtime": d["runtime"], "fallback_reason": d["fallback_reason"]}
                   for i, d in enumerate(program.stats()["delegates"])]
        output_specs = program.output_specs
    summary: dict[str, Any] = {"program": args.program, "inputs": source, "load_ms": round(load_s * 1e3, 3),
                               "first_run_ms": round(first_s * 1e3, 3), "delegates": ran, "outputs": []}
    check = _check_against(args, specs, inputs, outputs, options) if args.check_against else None
    files = _output_files([name for name, _, _ in output_specs])
    for (name, _, _), out, file in zip(output_specs, outputs, files):
        entry = {"name": name, "dtype": str(out.dtype), "shape": list(out.shape),
                 "head": [float(v) for v in out.reshape(-1)[:6]]}
        if save_dir is not None:
            try:
                np.save(save_dir / file, out)
            except OSError as exc:
                raise HandoffError(f"--save-outputs {args.save_outputs}: cannot write {file}: "
                                   f"{exc.strerror or exc}") from exc
            entry["file"] = str(save_dir / file)
        summary["outputs"].append(entry)
    if times:
        summary["bench"] = {"runs": len(times), **{f"{k}_ms": round(v * 1e3, 3) for k, v in percentiles(times).items()}}
    if check is not None:
        summary["check"] = check
    if args.json:
        from .compare import jsonable

        print(json.dumps(jsonable(summary), indent=2))
        return _check_status(check)
    print(printable(f"{args.program}: loaded in {summary['load_ms']:.1f} ms, first run "
                    f"{summary['first_run_ms']:.1f} ms, inputs: {source}"))
    copies = [d for d in ran if d["copy"] is not None]
    if copies:
        print(f"  delegates: {len(ran) - len(copies)} of {len(ran)} ran on their own backend, {len(copies)} on a "
              f"fallback copy")
        for d in copies:
            print(printable(f"  delegate {d['delegate']} ({d['partition']}, backend '{d['backend']}') ran its "
                            f"fallback copy {d['copy']} (backend '{d['runtime']}'): {d['fallback_reason']}"))
    for o in summary["outputs"]:
        head = ", ".join(f"{v:.5g}" for v in o["head"])
        saved = f" -> {o['file']}" if "file" in o else ""
        print(printable(f"  {o['name']}: {o['dtype']}{o['shape']} [{head}{', ...' if np.prod(o['shape']) > 6 else ''}]"
                        f"{saved}"))
    if times:
        b = summary["bench"]
        print(f"  {b['runs']} runs: p50 {b['p50_ms']:.3f} ms, p90 {b['p90_ms']:.3f} ms")
    if check is not None:
        from rich.console import Console

        from .compare_report import err_text, render_delegates, snr_text

        console = Console() if Console().is_terminal else Console(width=160)
        console.print(f"  against eager {args.check_against}: max abs error {err_text(check['max_abs_error'])}, "
                      f"SNR {snr_text(check['snr_db'])} dB")
        render_delegates([(Path(args.program).name, check["per_delegate"])], check["tolerance"], console, "program")
    return _check_status(check)


def _check_against(args: argparse.Namespace, specs: Sequence[Any], inputs: Sequence[Any], outputs: Sequence[Any],
                   options: dict[str, dict[str, str]]) -> dict[str, Any]:
    """``run --check-against MODEL``: the program's outputs against eager MODEL, and every delegate
    against eager PyTorch on its own boundary inputs (:mod:`handoff.numerics`)."""
    import numpy as np
    import torch
    from torch.utils import _pytree

    from . import numerics
    from .bench import errors
    from .plugins import get_plugins
    from .program import ProgramFile
    from .signing import local_key

    plugins = get_plugins()
    tolerance = numerics.DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    tensors = [torch.from_numpy(np.array(x, copy=True)) for x in inputs]
    with ProgramFile.open(args.program) as pf:
        resolved, ep = numerics.export_for(pf.manifest, args.check_against, plugins,
                                           [(shape, dtype) for _, shape, dtype in specs])
        reference = resolved.module if resolved.module is not None else ep.module()
        with torch.no_grad():
            eager = [t.numpy() for t in _pytree.tree_leaves(reference(*tensors)) if isinstance(t, torch.Tensor)]
        # the program loaded with the runtime's trust checks, so its delegates may be signed here
        rows = numerics.check_delegates(pf, ep, tensors, options, plugins, tolerance, signer=local_key())
    return {"model": args.check_against, "tolerance": tolerance, **errors(outputs, eager), "per_delegate": rows}


def _check_status(check: dict[str, Any] | None) -> int:
    if check is None:
        return EXIT_OK
    bad = [r for r in check["per_delegate"] if r.get("mismatch")]
    if bad:
        worst = max(bad, key=lambda r: r["relative_error"])
        print(f"handoff: error: {len(bad)} delegate(s) differ from eager PyTorch by more than {check['tolerance']:g} "
              f"relative; the largest: delegate {worst['delegate']} ({worst['partition']}, backend "
              f"'{worst['backend']}'), relative error {worst['relative_error']:.3g}; its ops: "
              f"{', '.join(worst['ops'])}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def _run_program(program: Any, inputs: list[Any], name: str) -> list[Any]:
    """``program.run``, with anything but a HandoffError (a delegate's vendor runtime failing on
    what the file holds) reported in one line: the file is the cause, not a handoff bug."""
    try:
        return program.run(inputs)
    except HandoffError:
        raise
    except Exception as exc:
        raise HandoffError(f"{name}: running the program failed: {one_line(exc)}") from exc


def _read_input(path: str, spec: tuple[str, tuple[int, ...], str]) -> Any:
    """One ``--input`` .npy file, mapped (not read) until its dtype and shape match the input's."""
    import stat as stat_

    import numpy as np

    name, shape, dtype = spec
    try:
        st = os.stat(path)
        if not stat_.S_ISREG(st.st_mode):
            raise HandoffError(f"--input {path}: not a regular file; give a .npy file (numpy.save)")
        array = np.load(path, mmap_mode="r", allow_pickle=False) if st.st_size else np.load(path, allow_pickle=False)
    except HandoffError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise HandoffError(f"--input {path}: cannot read a .npy array: {one_line(exc, 200)}") from exc
    if not isinstance(array, np.ndarray):
        raise HandoffError(f"--input {path}: holds several arrays (.npz); give one .npy file per input")
    if array.dtype != np.dtype(dtype) or array.shape != tuple(shape):
        raise HandoffError(f"--input {path}: input '{name}' expects {dtype}{list(shape)}, the file holds "
                           f"{array.dtype}{list(array.shape)}")
    return array


def _prepare_save_dir(directory: str) -> Path:
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HandoffError(f"--save-outputs {directory}: cannot create the directory: {exc.strerror or exc}") from exc
    check_writable(str(path / "output.npy"), "--save-outputs")
    return path


_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._+-]")


def _output_files(names: Sequence[str]) -> list[str]:
    """A file name for each output: its name with anything but letters, digits and ``._+-``
    replaced (a name from the program file must not reach outside ``--save-outputs``, as
    ``../x`` or ``/etc/x`` would), no leading dot, at most 100 characters, unique."""
    files: list[str] = []
    for i, name in enumerate(names):
        stem = _UNSAFE_FILE_CHARS.sub("_", name).lstrip(".")[:100] or f"output{i}"
        file, n = f"{stem}.npy", 1
        while file.lower() in (f.lower() for f in files):
            n += 1
            file = f"{stem}-{n}.npy"
        files.append(file)
    return files


def _cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from . import strategies as st
    from .compare import Devices, compare
    from .compare_report import plot, render, write_csv
    from .numerics import DEFAULT_TOLERANCE
    from .plugins import get_plugins
    from .zoo import parse_input_shape

    plugins = get_plugins()
    chosen: list[st.Strategy] = [st.parse(text) for text in args.strategy]
    auto = False
    for source in args.strategies:
        if source == "auto":
            auto = True
            chosen += st.auto(plugins)
        else:
            chosen += st.load_file(source)
    if not chosen:
        raise HandoffError("no strategies; pass --strategy SPEC (e.g. --strategy xnnpack --strategy qnn,xnnpack), "
                           "--strategies FILE.yaml or --strategies auto")
    chosen = st.skip(chosen, args.skip)
    try:
        shapes = [parse_input_shape(s) for s in args.input_shape]
    except ValueError as exc:
        raise HandoffError(str(exc)) from exc
    devices = None
    if args.rpc or args.key or args.key_target:
        from .remote import parse_keys

        if not (args.rpc and args.key):
            raise HandoffError("--rpc HOST:PORT and --key K1,K2 go together (--key-target needs them too): the "
                               "tracker, and the device keys to measure on")
        devices = Devices(args.rpc, tuple(parse_keys(args.key)), tuple(args.key_target), args.rpc_wait,
                          args.rpc_timeout)
    elif args.csv_layout == "wide":
        raise HandoffError("--csv-layout wide needs --rpc HOST:PORT --key K1,K2 (a column group per device key); "
                           "a local compare writes one row per strategy")
    with _progress(args.quiet) as progress:
        if args.no_fallback:
            chosen = [dataclasses.replace(s, fallback=False) for s in chosen]
        result = compare(args.model, st.unique(chosen), runs=args.runs, rounds=args.rounds, warmup=args.warmup,
                         seed=args.seed, per_delegate=args.per_delegate, input_shapes=shapes,
                         tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
                         runtime_options=_options(args.option), on_lower_error=args.on_lower_error,
                         use_cache=not args.no_cache, auto=auto, max_workers=args.max_workers, plugins=plugins,
                         trust_model=args.trust_model, devices=devices, progress=progress)
    if args.plot:
        plot(result, args.plot)
    if args.json:
        text = json.dumps(result.to_json(), indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    if args.csv:
        if args.csv == "-":
            write_csv(result, sys.stdout, args.csv_layout)
        else:
            with open(args.csv, "w", newline="") as f:
                write_csv(result, f, args.csv_layout)
    if "-" not in (args.json, args.csv):
        out = Console()
        if not out.is_terminal:
            out = Console(width=200)
        render(result, out)
        if args.plot:
            out.print(f"wrote {args.plot}")
    return EXIT_OK


class _Specs:
    """A program's inputs and outputs, read from its manifest (a remote run loads it elsewhere)."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        from .program import io_specs

        self.input_specs, self.output_specs = io_specs(manifest)

    def __enter__(self) -> "_Specs":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _random_array(rng: Any, shape: tuple[int, ...], dtype: str) -> Any:
    if dtype.startswith("float"):  # drawn in float32 (float64 for float64): no float64 temporary
        return rng.standard_normal(shape, dtype="float64" if dtype == "float64" else "float32").astype(dtype, copy=False)
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

        def say(text: str) -> None:  # names in the file are shown, never interpreted by the terminal
            print(printable(text))

        say(f"{args.program}: handoff program format {pf.major}.{pf.minor}, {pf.file_size} bytes, "
            f"alignment {pf.alignment}, flags {pf.flags:#x}, written by handoff {m['handoff_version']}")
        say(f"signature: {_signature_line(m)}")
        vals = m["values"]

        def sig(vid: int) -> str:
            return f"%{vid}:{vals[vid]['dtype']}{vals[vid]['shape']}"

        say("inputs:  " + ", ".join(f"{i['name']}={sig(i['value'])}" for i in m["inputs"]))
        say("outputs: " + ", ".join(f"{o['name']}={sig(o['value'])}" for o in m["outputs"]))
        say(f"instructions ({len(m['instructions'])}):")
        for n, ins in enumerate(m["instructions"]):
            outs = ", ".join("_" if v is None else f"%{v}" for v in ins["outputs"])
            if ins["op"] == "delegate":
                d = m["delegates"][ins["delegate"]]
                ins_s = ", ".join(f"%{v}" for v in ins["inputs"])
                say(f"  {n:>3}  {outs} = delegate[{d['backend']} {d['backend_version']}] {d['partition']}({ins_s})"
                    f"  segment {d['segment']}")
            else:
                say(f"  {n:>3}  {outs} = {ins['target']}(...)  [host]")
        carry = sum(1 for d in m["delegates"] if d.get("fallbacks"))
        say(f"delegates ({len(m['delegates'])}" + (f", {carry} with fallback copies" if carry else "") + "):")
        for n, d in enumerate(m["delegates"]):
            meta = ", ".join(f"{k}={v}" for k, v in d["metadata"].items() if not isinstance(v, (dict, list)))
            say(f"  {n:>3}  {d['backend']:<8} {d['partition']:<12} {meta}")
            for k, c in enumerate(d.get("fallbacks", ())):
                size = m["segments"][c["segment"]]["length"]
                say(f"       fallback copy {k}: {c['backend']} {c['backend_version']}, segment {c['segment']} "
                      f"({size} bytes)")
        say(f"segments ({len(m['segments'])}):")
        for n, s in enumerate(m["segments"]):
            say(f"  {n:>3}  offset {s['offset']:>10}  {s['length']:>10} bytes  sha256 {s['sha256'][:16]}…")
    return EXIT_OK


def _signature_line(manifest: dict) -> str:
    from .signing import trusted_keys, verify

    return verify(manifest, trusted_keys()).describe()


def _cmd_new_backend(args: argparse.Namespace) -> int:
    from .scaffold import create, names

    root, files = create(args.name, args.dir)
    print(f"created {root}/ for backend '{args.name}' (distribution {names(args.name)['dist']}):")
    for path in files:
        print(f"  {path.relative_to(root)}")
    print(f"next: cd {root} && pip install -e '.[test]' && pytest   (README.md: where your SDK goes, how to publish)")
    return EXIT_OK


COMMANDS = {"backends": _cmd_backends, "zoo": _cmd_zoo, "partition": run_partition, "run": _cmd_run,
            "serve": _cmd_serve, "inspect": _cmd_inspect, "compare": _cmd_compare, "sign": _cmd_sign,
            "verify": _cmd_verify, "key": _cmd_key, "new-backend": _cmd_new_backend}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
