"""``make fuzz``: run fuzz harnesses one after another, each for a time budget, and summarise.

One libFuzzer process at a time, one worker, ``-rss_limit_mb=2048``, under ``nice``. New inputs
accumulate in ``.fuzz/NAME/corpus`` (so a later campaign continues where this one stopped);
crashes, OOMs and timeouts are saved in ``.fuzz/NAME/``.

The harnesses of runtimes the core isolates (``Runtime.isolate_untrusted``: xnnpack, qnn) load
blobs in-process, where the vendor library's own crashes kill the fuzzer; for them a crash saves
its input and the harness is restarted with the corpus so far until the budget is spent (a crash
before the seeds have all run, twice in a row, stops it). Such inputs must
then be one-line errors through ``handoff.load``: copy each into ``tests/fuzz/crashers/NAME/``
(``tests/test_fuzz.py`` checks them). Any crash of another harness is a bug in handoff: fix it and
add the input to ``tests/fuzz/regressions/NAME/``.

An ``oom-*`` input is run again alone in a fresh process: if it fits the limit there, the OOM was
libFuzzer's own bookkeeping growing over millions of runs; the input is renamed ``growth-*`` and
the harness restarted with its corpus (``fuzzer_growth_restarts`` in the summary).

Usage: ``python tests/fuzz/campaign.py --seconds 1800 program hostops ...`` (prints one line per
harness: time, executions, executions per second, coverage, crashes; and writes .fuzz/summary.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HARNESSES = ["program", "hostops", "options", "tvm", "xnnpack", "vulkan", "qnn", "coreml"]
RESTARTED = {"xnnpack", "qnn"}  # vendor crashes there are isolated by the core (see the docstring)
DICTIONARY = {"program", "hostops", "tvm"}
_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/\S+.*?exec/s: (\d+) rss: (\d+)Mb", re.M)


def run(name: str, seconds: float, extra: list[str]) -> dict:
    work = ROOT / ".fuzz" / name
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    corpora = [str(work / "corpus"), str(HERE / "corpus" / name)]
    if (HERE / "regressions" / name).is_dir():
        corpora.append(str(HERE / "regressions" / name))
    flags = ["-rss_limit_mb=2048", "-timeout=60", "-print_final_stats=1", f"-artifact_prefix={work}/", *extra]
    if name in DICTIONARY:
        flags.append(f"-dict={HERE / 'program.dict'}")
    deadline = time.monotonic() + seconds
    totals = {"harness": name, "seconds": 0.0, "execs": 0, "cov": 0, "ft": 0, "corpus": 0, "peak_rss_mb": 0,
              "crashes": [], "restarts": 0}
    early = 0  # restarts in a row that crashed before the seeds had all run
    while (left := deadline - time.monotonic()) > 10:
        start = time.monotonic()
        log = work / "last.log"
        with open(log, "w") as out:
            proc = subprocess.run(["nice", "-n", "10", sys.executable, str(HERE / f"fuzz_{name}.py"), *flags,
                                   f"-max_total_time={int(left)}", *corpora], stdout=out, stderr=subprocess.STDOUT,
                                  cwd=ROOT)
        took = time.monotonic() - start
        text = log.read_text(errors="replace")
        found = re.findall(r"Test unit written to (\S+)", text)
        status = _STATUS.findall(text)
        if status:
            n, cov, ft, corp, _, rss = map(int, status[-1])
            totals["execs"] += n
            totals["cov"], totals["ft"], totals["corpus"] = max(totals["cov"], cov), max(totals["ft"], ft), corp
            totals["peak_rss_mb"] = max(totals["peak_rss_mb"], rss)
        totals["seconds"] += took
        found = [p for p in found if "slow-unit" not in p]
        growth = [p for p in found if Path(p).name.startswith("oom-") and not _oom_alone(name, Path(p))]
        totals["crashes"] += [Path(p).name for p in found if p not in growth]
        if growth:
            totals["fuzzer_growth_restarts"] = totals.get("fuzzer_growth_restarts", 0) + len(growth)
        elif proc.returncode == 0 or name not in RESTARTED:
            break
        early = early + 1 if "INITED" not in text else 0
        if early >= 2:
            totals["stopped"] = "crashed twice on the seeds"
            break
        totals["restarts"] += 1
        time.sleep(1)
    totals["exec_per_s"] = round(totals["execs"] / totals["seconds"], 1) if totals["seconds"] else 0
    return totals


def _oom_alone(name: str, unit: Path) -> bool:
    """Whether an ``oom-*`` input also runs out of memory on its own, in a fresh process.

    libFuzzer's RSS includes its own bookkeeping, which grows by about 1 KB per execution in these
    Python harnesses (the program harness passed 2 GB after 1.5 million runs in 22 minutes, while
    its target's memory stayed flat). An input that runs alone under the same limit is that growth,
    not a finding: it is kept as ``growth-*`` for the record and the harness is restarted with its
    corpus; one that runs out of memory alone is a real finding.
    """
    alone = subprocess.run([sys.executable, str(HERE / f"fuzz_{name}.py"), "-rss_limit_mb=2048", "-timeout=60",
                            str(unit)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    if alone.returncode != 0:
        return True
    unit.rename(unit.with_name("growth-" + unit.name[len("oom-"):]))
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("harnesses", nargs="*", default=HARNESSES)
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_TIME", 60)))
    parser.add_argument("--flag", action="append", default=[], help="an extra libFuzzer flag (repeatable)")
    args = parser.parse_args()
    summary_path = ROOT / ".fuzz" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for name in args.harnesses:
        result = run(name, args.seconds, args.flag)
        summary[name] = result
        summary_path.parent.mkdir(exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=2))
        print(f"fuzz_{name}: {result['seconds']:.0f} s, {result['execs']} executions ({result['exec_per_s']}/s), "
              f"coverage {result['cov']} edges / {result['ft']} features, corpus {result['corpus']}, "
              f"peak RSS {result['peak_rss_mb']} MB, {len(result['crashes'])} crash(es) "
              f"{result['crashes'] or ''}{', restarts ' + str(result['restarts']) if result['restarts'] else ''}"
              f"{' (' + str(result['fuzzer_growth_restarts']) + ' for fuzzer memory growth)' if result.get('fuzzer_growth_restarts') else ''}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
