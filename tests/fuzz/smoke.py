"""The fuzz harnesses' smoke pass, in one process: every harness in turn runs its ``setup()``, its
checked-in seeds (``corpus/NAME/``), the inputs of every fixed finding (``regressions/NAME/``)
and a fixed number of deterministic mutations of them through its contract
(:func:`_harness.check`). One interpreter for all harnesses, so torch, TVM and the vendor
libraries are imported once, not once per harness; the mutations are seeded, so every run checks
the same inputs however busy the machine is. ``make fuzz`` (``campaign.py``) runs the real,
coverage-guided driver for a time budget instead.

Harnesses whose vendor library kills the process on some mutated blobs (xnnpack, qnn: the core
isolates them, see ``campaign.py``) run their seeds and regressions only.

    python tests/fuzz/smoke.py [--mutations-scale 1.0] [--artifacts DIR] [NAME...]

Prints one JSON line per harness (``name``, ``inputs``, ``seconds``, ``findings``: the input's
SHA-1 and what it did; each such input is saved in ``--artifacts``); exit status 1 on a finding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _harness  # noqa: E402

#: Harnesses in the order they run (the cheap ones first) and their mutation counts: a few
#: seconds of each on a 2-core machine.
MUTATIONS = {"options": 400, "program": 400, "hostops": 200, "tvm": 150, "coreml": 120, "vulkan": 20,
             "xnnpack": 0, "qnn": 0}
#: Harnesses that read programs: their mutations also splice in tokens of ``program.dict``.
DICTIONARY = {"program", "hostops", "tvm"}
_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 40, (1 << 64) - 1]


def _tokens() -> list[bytes]:
    """The entries of ``program.dict`` (libFuzzer's format: ``[name=]"text"``, ``\\xNN`` escapes)."""
    escape = re.compile(rb'\\(x[0-9A-Fa-f]{2}|.)')
    lines = (HERE / "program.dict").read_bytes().splitlines()
    return [escape.sub(lambda m: bytes([int(m.group(1)[1:], 16)]) if len(m.group(1)) == 3 else m.group(1), m[1])
            for m in (re.match(rb'^\s*(?:\w+\s*=\s*)?"(.*)"\s*$', line) for line in lines) if m]


def mutate(rng: random.Random, data: bytes, tokens: list[bytes]) -> bytes:
    """One to four of libFuzzer's basic mutations of ``data``: flip a bit, set a byte, write an
    interesting integer, erase, duplicate or insert a chunk, truncate, insert a dictionary token."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        n = len(out)
        op = rng.randrange(8 if tokens else 7)
        at = rng.randrange(n) if n else 0
        if op == 0 and n:
            out[at] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            out[at] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif op == 2 and n >= 8:
            width = rng.choice((2, 4, 8))
            at = rng.randrange(n - width + 1)
            value = rng.choice(_INTERESTING) & ((1 << (8 * width)) - 1)
            out[at:at + width] = value.to_bytes(width, rng.choice(("little", "big")))
        elif op == 3 and n:
            del out[at:at + rng.randint(1, 64)]
        elif op == 4 and n:
            out[at:at] = out[at:at + rng.randint(1, 64)]
        elif op == 5 and n:
            del out[rng.randrange(n):]
        elif op == 6:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 7:
            token = rng.choice(tokens)
            if rng.random() < 0.5 and n >= len(token):
                at = rng.randrange(n - len(token) + 1)
                out[at:at + len(token)] = token
            else:
                out[at:at] = token
    return bytes(out)


def run(name: str, scale: float, artifacts: Path | None) -> dict:
    start = time.perf_counter()
    module = __import__(f"fuzz_{name}")
    module.setup()
    inputs = [p.read_bytes() for folder in ("corpus", "regressions") if (HERE / folder / name).is_dir()
              for p in sorted((HERE / folder / name).iterdir()) if p.is_file()]
    if not inputs:
        raise SystemExit(f"no seeds for fuzz_{name}: run tests/fuzz/make_seeds.py {name}")
    rng = random.Random(f"smoke-{name}")
    tokens = _tokens() if name in DICTIONARY else []
    count = round(MUTATIONS[name] * scale)
    inputs += [mutate(rng, rng.choice(inputs), tokens) for _ in range(count)]
    findings = []
    for data in inputs:
        try:
            _harness.check(module.one_input, module.EXPECTED, data)
        except _harness.Finding as exc:
            digest = hashlib.sha1(data).hexdigest()
            findings.append({"input": digest, "what": str(exc)[:500]})
            if artifacts is not None:
                (artifacts / f"{name}-crash-{digest}").write_bytes(data)
    return {"name": name, "inputs": len(inputs), "seconds": round(time.perf_counter() - start, 2),
            "findings": findings}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("harnesses", nargs="*", default=list(MUTATIONS))
    parser.add_argument("--mutations-scale", type=float, default=1.0, help="multiplies every mutation count")
    parser.add_argument("--artifacts", type=Path, help="where inputs that were findings are saved")
    args = parser.parse_args()
    _harness.quiet()
    found = 0
    for name in args.harnesses:
        result = run(name, args.mutations_scale, args.artifacts)
        found += len(result["findings"])
        print(json.dumps(result), flush=True)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
