"""bench/gaps.py: a job program's runs and the gaps between jobs, read from perf's exec
and exit events."""

from bench.gaps import summarize

SCRIPT = """\
            bash  101 1000.000000: sched:sched_process_exec: filename=/bin/bash
            bash  101 1000.001500: sched:sched_process_exit: comm=bash pid=101
          python   50 1000.001600: sched:sched_process_exit: comm=python pid=50
            bash  102 1000.003500: sched:sched_process_exec: filename=/bin/bash
            bash  103 1000.004000: sched:sched_process_exit: comm=bash pid=103
            bash  102 1000.005000: sched:sched_process_exit: comm=bash pid=102
            bash  104 1000.006000: sched:sched_process_exec: filename=/bin/bash
"""


def test_runs_and_gaps_of_the_named_program() -> None:
    g = summarize(SCRIPT, "bash")
    # 101: 1.5 ms; 102: 1.5 ms (103 never exec'd here: a subshell of the job, not a job)
    assert [round(x, 3) for x in g["runs_ms"]] == [1.5, 1.5]
    # 101's exit -> 102's exec, 102's exit -> 104's exec; another program's exit counts not
    assert [round(x, 3) for x in g["gaps_ms"]] == [2.0, 1.0]


def test_nothing_of_another_program() -> None:
    assert summarize(SCRIPT, "python3") == {"runs_ms": [], "gaps_ms": []}
