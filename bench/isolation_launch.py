"""Launch cost of each isolation backend available here, beside a bare asyncio subprocess
of the same argv, all measured in one run.

    python -m bench.isolation_launch [-n 50] [--backends process,nsjail,docker]

For ``/bin/true`` and ``python3 -c pass``: p50/p95 of the whole ``Backend.run`` (setup,
run, teardown, i.e. one job's cost to the worker), the p50 overhead above the bare
subprocess in ms and as a ratio, and the target where there is one (nsjail: at most
+10 ms; docker: under 300 ms per job).

process, nsjail and docker are measured cold (``warm=False``: a fresh sandbox per run) and warm
(``+warm``: a job process forked ahead into fresh namespaces execs the argv; and
``python3 script``: a runtime script run in-process by a warm interpreter, against the
same bare ``python3 -c pass``). See isolation/README.md, "Warm runs" and "Warm Docker".

Between two timed runs the backend sits idle for ``--gap-ms`` (default 5 ms, untimed,
for every row alike): a worker's next job never comes back-to-back, it has at least a
database round trip in between, and that is when a warm backend prepares the next one.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

from sandmill.isolation import BACKENDS, Limits, RunSpec, Status, get_backend

ARGVS: dict[str, list[str]] = {
    "/bin/true": ["/bin/true"],
    "python3 -c pass": ["/usr/bin/python3", "-c", "pass"],  # same path on the host and in the image
}
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
WARMUP = 2
WARM_BACKENDS = ("process", "nsjail", "docker")  # cold (warm=False) and +warm rows
SCRIPT = "python3 script"  # the warm in-process row


def _target(backend: str, p50: float, overhead: float) -> tuple[str, str]:
    """(target text, verdict) for one row."""
    if backend.startswith("nsjail"):
        return "<= +10 ms", "ok" if overhead <= 10 else "MISSED"
    if backend == "docker":
        return "< 300 ms/job", "ok" if p50 < 300 else "MISSED"
    return "", ""


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


GAP_S = 0.005


async def _time(n: int, once: Callable[[], Awaitable[None]]) -> list[float]:
    for _ in range(WARMUP):
        await once()
    out = []
    for _ in range(n):
        await asyncio.sleep(GAP_S)
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
            variants = ({name: get_backend(name, warm=False), f"{name}+warm": get_backend(name)}
                        if name in WARM_BACKENDS else {name: get_backend(name)})
            probe = variants[name].probe()
        except Exception as e:  # not importable / probe crashed: report and go on
            print(f"# {name}: skipped ({type(e).__name__}: {e})")
            continue
        if not probe.available:
            print(f"# {name}: skipped ({probe.reason})")
            continue
        backends.update(variants)

    rows = []
    bare50 = 0.0
    for label, argv in [*ARGVS.items(), (SCRIPT, ARGVS["python3 -c pass"])]:
        if label != SCRIPT:  # the script row compares with the bare python3 -c pass above
            bare = await _time(n, lambda: _bare(argv))
            bare50 = statistics.median(bare)
            rows.append(("bare", label, bare50, pct(bare, 95), 0.0, 1.0, "", ""))
        for name, b in backends.items():
            if label == SCRIPT and not name.endswith("+warm"):
                continue
            spec = (RunSpec(argv=[argv[0], "run.py"], env=ENV, files={"run.py": b"pass\n"},
                            limits=Limits(wall_s=30), warm="run.py") if label == SCRIPT
                    else RunSpec(argv=argv, env=ENV, limits=Limits(wall_s=30)))

            async def once(b=b, spec=spec, name=name) -> None:
                o = await b.run(spec)
                if o.status is not Status.success:
                    raise RuntimeError(f"{b.name} {argv}: {o.status.value} {o.detail} {o.stderr[-200:]!r}")
                if name.endswith("+warm") and not o.warm:
                    raise RuntimeError(f"{name} {argv}: ran cold")

            xs = await _time(n, once)
            p50 = statistics.median(xs)
            target, verdict = _target(name, p50, p50 - bare50)
            rows.append((name, label, p50, pct(xs, 95), p50 - bare50, p50 / bare50, target, verdict))
    for b in backends.values():
        close = getattr(b, "close", None)
        if close:
            close()

    print(f"\nlaunch cost, {n} runs each after {WARMUP} warm-up runs, {GAP_S * 1000:g} ms apart"
          " (ms, whole Backend.run)\n")
    head = f"{'backend':<12} {'argv':<16} {'p50':>8} {'p95':>8} {'+p50':>8} {'ratio':>7}  {'target':<13} "
    print(head)
    print("-" * len(head))
    for name, label, p50, p95, over, ratio, target, verdict in rows:
        print(f"{name:<12} {label:<16} {p50:8.1f} {p95:8.1f} {over:+8.1f} {ratio:6.1f}x  {target:<13} {verdict}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--runs", type=int, default=50, help="timed runs per backend and argv (default 50)")
    ap.add_argument("--gap-ms", type=float, default=5.0, help="idle time between runs, untimed (default 5)")
    ap.add_argument("--backends", default=",".join(BACKENDS),
                    help=f"comma-separated (default: {','.join(BACKENDS)}); unavailable ones are skipped")
    a = ap.parse_args(argv)
    global GAP_S
    GAP_S = a.gap_ms / 1000
    return asyncio.run(main(a.runs, [s for s in a.backends.split(",") if s]))


if __name__ == "__main__":
    sys.exit(cli())
