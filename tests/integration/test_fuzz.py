"""Property-based fuzzing of every operation in /openapi.json with schemathesis, against the
running service (real Serve, real models, keys on): no 5xx and no hang, for valid and invalid
inputs alike. `GPU_SERVE_FUZZ_EXAMPLES` sets the cases per operation and mode (default 30)."""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import pytest

from tests.integration.hardened import ADMIN_KEY, SERVED, admin

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("GPU_SERVE_FUZZ_EXAMPLES", "30"))
#: A case slower than this counts as a hang (the request timeout is 30 s in the hardened app).
HANG_S = 45.0


def test_fuzz_every_operation_no_5xx_no_hang(hardened_url: str) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{hardened_url}/openapi.json")
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}  # an admin key reaches every operation
    cases: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    slowest = 0.0
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path == "/gpu/events":  # an endless event stream by design (test_operator.py covers it)
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                nonlocal slowest
                start = time.monotonic()
                response = case.call(base_url=hardened_url, headers=headers, timeout=HANG_S + 15)
                elapsed = time.monotonic() - start
                slowest = max(slowest, elapsed)
                cases[f"{case.method.upper()} {case.path}"] += 1
                statuses[response.status_code] += 1
                if response.status_code >= 500 or elapsed > HANG_S:
                    failures.append(
                        f"{case.method.upper()} {case.path} -> {response.status_code} in {elapsed:.1f}s: "
                        f"{response.text[:300]} (request: {case.as_curl_command(headers=headers)[:400]})"
                    )

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (an operation without parameters)
                assert mode is GenerationMode.NEGATIVE, op
    # What the fuzzer changed (timeouts, offloads, releases) must not leak into later tests.
    for model in SERVED:
        admin(hardened_url, "timeout", {"model": model, "idle_timeout_s": 300, "release_timeout_s": 1800})
    total = sum(cases.values())
    print(f"\n[fuzz] {total} cases over {len(cases)} operations, statuses {dict(sorted(statuses.items()))}, "
          f"slowest {slowest:.2f}s")
    assert not failures, "\n".join(failures[:10])
    assert total >= 500 or EXAMPLES < 30, f"only {total} cases ran"
