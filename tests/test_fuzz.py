"""API fuzzing: schemathesis generates requests for every operation of the OpenAPI document
of a real server (with a worker), sent with the admin token. Every answer must be in the
document (status, content type, schema), no answer may be a 5xx, and every 4xx is a JSON
object with an ``error`` message. Bounded to about two minutes on two cores."""

from __future__ import annotations

import asyncio
import os
import time

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from support import TOKEN, recreate_database

EXAMPLES = int(os.environ.get("SANDMILL_FUZZ_EXAMPLES", 80))  # per operation, positive and negative each
BUDGET_S = 150  # past this, the examples left are not sent (a slow machine stays bounded)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Not run: "schema-valid data is accepted": the schema cannot say every rule (python that
# does not parse, an unknown language, a tag naming a missing argument are 400 by design);
# "schema-invalid data is refused": unknown query parameters are ignored by design (Windmill
# clients send more than sandmill reads). Negative data still must get no 5xx, a JSON
# error and a documented answer.
EXCLUDED = [positive_data_acceptance, negative_data_rejection]


def error_json(ctx, response, case) -> bool | None:
    """Every 4xx is a JSON object with an ``error`` message (a failed job's result, answered
    by run_wait_result as a 400, carries its error object under ``error``)."""
    if 400 <= response.status_code < 500:
        assert response.headers.get("content-type", [""])[0].startswith("application/json"), \
            f"{response.status_code} is not JSON: {response.text[:200]!r}"
        body = response.json()
        assert isinstance(body, dict) and body.get("error"), \
            f"{response.status_code} has no 'error': {response.text[:200]!r}"
    return None


@pytest.fixture()
def fuzz_cluster(pg_server, make_cluster):
    """A cluster on a database of its own: the fuzzer writes worker group configs and jobs
    with any tag, which must not reach the other tests' workers."""
    name = "sandmill_fuzz_" + os.environ.get("PYTEST_XDIST_WORKER", "main")

    asyncio.run(recreate_database(pg_server, name))
    # a short wait: a fuzzed run_wait_result on a tag no worker serves answers 408 quickly
    c = make_cluster(env={"SANDMILL_WAIT_TIMEOUT_S": "1"}, db_url=pg_server.get_uri(name))
    c.start_worker("default", subworkers=1)
    c.wait_workers("default")
    return c


@pytest.mark.timeout(400)
def test_fuzz_every_operation(fuzz_cluster):
    schema = schemathesis.openapi.from_url(fuzz_cluster.base + "/openapi.json", headers=AUTH)
    ops = [r.ok() for r in schema.get_all_operations()]
    failures: dict[str, set[str]] = {}
    examples = skipped = 0
    t0 = time.monotonic()
    for op, mode in [(op, mode) for op in ops for mode in schemathesis.GenerationMode]:
        # positive: data the document allows; negative: data it does not (must be a 4xx)
        @given(case=op.as_strategy(mode))
        @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(HealthCheck),
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
        def one(case) -> None:
            nonlocal examples, skipped
            if time.monotonic() - t0 > BUDGET_S:
                skipped += 1
                return
            examples += 1
            if isinstance(case.query, dict) and "timeout_s" in case.query:
                case.query["timeout_s"] = 1  # waits are bounded here, not fuzzed
            try:
                case.call_and_validate(headers=AUTH, timeout=30, additional_checks=[error_json],
                                      excluded_checks=EXCLUDED)
            except (Exception, BaseExceptionGroup) as e:  # collect: one run reports every operation's
                for x in getattr(e, "exceptions", [e]):
                    what = " ".join(str(x).split())[:300]
                    failures.setdefault(op.label, set()).add(f"{type(x).__name__}: {what}\n    e.g. "
                                                             + case.as_curl_command()[:300])

        try:
            one()
        except hypothesis.errors.Unsatisfiable:  # nothing to get wrong (no parameter, no body)
            assert mode == schemathesis.GenerationMode.NEGATIVE, op.label
    took = time.monotonic() - t0
    print(f"fuzzed {len(ops)} operations, {examples} examples in {took:.0f} s ({skipped} past the budget)")
    assert len(ops) >= 25
    assert not failures, "\n".join(f"{k}:\n  " + "\n  ".join(sorted(v)) for k, v in failures.items())
