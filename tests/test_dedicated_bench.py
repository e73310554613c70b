"""`python -m bench.dedicated --quick` runs end to end (figures are not asserted here: the
machine is shared; docs/performance.md has them)."""

from __future__ import annotations

import re
import subprocess
import sys

from support import REPO


def test_bench_dedicated_quick():
    r = subprocess.run([sys.executable, "-m", "bench.dedicated", "--quick", "--json"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert re.search(r"dedicated +\d+ jobs/s +\(500 jobs in [\d.]+ s, 0 failed", r.stdout), r.stdout
    assert re.search(r"standard +\d+ jobs/s +\(100 jobs in [\d.]+ s, 0 failed", r.stdout), r.stdout
    assert "p50" in r.stdout and "p99" in r.stdout
