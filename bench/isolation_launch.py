"""Launch cost of each isolation backend available here, beside a bare asyncio subprocess
of the same argv, all measured in one run.

    python -m bench.isolation_launch [-n 50] [--backends process,nsjail,docker]

For ``/bin/true`` and ``python3 -c pass``: p50/p95 of the whole ``Backend.run`` (setup,
run, teardown, i.e. one job's cost to the worker), the p50 overhead above the bare
subprocess in ms and as a ratio, and the target where there is one (nsjail: at most
+10 ms; docker: under 300 ms per job).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

from isolation import BACKENDS, Limits, RunSpec, Status, get_backend

ARGVS: dict[str, list[str]] = {
    "/bin/true": ["/bin/true"],
    "python3 -c pass": ["/usr/bin/python3", "-c", "pass"],  # same path on the host and in the image
}
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
WARMUP = 2


def _target(backend: str, p50: float, overhead: float) -> tuple[str, str]:
    """(target text, verdict) for one row."""
    if backend == "nsjail":
        return "<= +10 ms", "ok" if overhead <= 10 else "MISSED"
    if backend == "docker":
        return "< 300 ms/job", "ok" if p50 < 300 else "MISSED"
    return "", ""


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def _time(n: int, once: Callable[[], Awaitable[None]]) -> list[float]:
    for _ in range(WARMUP):
        await once()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await once()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def _bare(argv: list[str]) -> None:
    p = await asyncio.create_subprocess_exec(*argv, env=ENV, stdin=asyncio.subprocess.DEVNULL,
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    await p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"bare {argv} exited {p.returncode}")


async def main(n: int, names: list[str]) -> int:
    backends = {}
    for name in names:
        try:
            b = get_backend(name)
            probe = b.probe()
        except Exception as e:  # not importable / probe crashed: report and go on
            print(f"# {name}: skipped ({type(e).__name__}: {e})")
            continue
        if not probe.available:
            print(f"# {name}: skipped ({probe.reason})")
            continue
        backends[name] = b

    rows = []
    for label, argv in ARGVS.items():
        bare = await _time(n, lambda: _bare(argv))
        bare50 = statistics.median(bare)
        rows.append(("bare", label, bare50, pct(bare, 95), 0.0, 1.0, "", ""))
        for name, b in backends.items():
            spec = RunSpec(argv=argv, env=ENV, limits=Limits(wall_s=30))

            async def once(b=b, spec=spec) -> None:
                o = await b.run(spec)
                if o.status is not Status.success:
                    raise RuntimeError(f"{b.name} {argv}: {o.status.value} {o.detail} {o.stderr[-200:]!r}")

            xs = await _time(n, once)
            p50 = statistics.median(xs)
            target, verdict = _target(name, p50, p50 - bare50)
            rows.append((name, label, p50, pct(xs, 95), p50 - bare50, p50 / bare50, target, verdict))

    print(f"\nlaunch cost, {n} runs each after {WARMUP} warm-up runs (ms, whole Backend.run)\n")
    head = f"{'backend':<8} {'argv':<16} {'p50':>8} {'p95':>8} {'+p50':>8} {'ratio':>7}  {'target':<13} "
    print(head)
    print("-" * len(head))
    for name, label, p50, p95, over, ratio, target, verdict in rows:
        print(f"{name:<8} {label:<16} {p50:8.1f} {p95:8.1f} {over:+8.1f} {ratio:6.1f}x  {target:<13} {verdict}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--runs", type=int, default=50, help="timed runs per backend and argv (default 50)")
    ap.add_argument("--backends", default=",".join(BACKENDS),
                    help=f"comma-separated (default: {','.join(BACKENDS)}); unavailable ones are skipped")
    a = ap.parse_args(argv)
    return asyncio.run(main(a.runs, [s for s in a.backends.split(",") if s]))


if __name__ == "__main__":
    sys.exit(cli())
