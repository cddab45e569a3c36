"""The OpenAPI schema is the contract: schemathesis generates requests from it, valid and
invalid, sends them in-process to the ASGI app (SQLite, a recording queue, a real key) and
checks every answer against it with all its checks: no 5xx, every status, header and body as
documented, valid data accepted, invalid data refused, auth enforced. Its phases run as its
command line runs them: the schema's examples, coverage of each constraint's edges, random
fuzzing, and the stateful phase, which follows the links between operations (a class listed,
then read, its samples fetched, its job cancelled or retried, the class deleted and gone).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events

from tests.api_support import (
    Api,
    ApiFactory,
    add_class,
    add_embedding,
    add_sample,
    sqlite_database,
)

pytest_plugins = ["tests.api_support"]

# The engine alternates fuzzing and stateful rounds until its time is up; one full pass over
# every phase takes about 15 s here, so this runs it about three times.
MAX_EXAMPLES = 20
MAX_SECONDS = 45

# Operations whose schema-valid requests may still be refused, and why; every other check
# applies to them, and every check applies to every other operation.
# - Uploads: a schema can say "a file", never "a JPEG whose PNG mask has its size and holds
#   foreground and background", so schema-valid bytes are refused (415, 422), as they must be.
UPLOADS = ["create_class", "create_training", "predict_with_training", "replace_sample_mask"]
# - Listings: the cursor is opaque (made by the server); a forged one is the client's error,
#   400, which no schema of an opaque string can rule out.
LISTINGS = ["list_classes", "list_samples", "list_trainings", "list_jobs", "list_keys"]
# - Idempotent POSTs: the fuzzer sends one generated Idempotency-Key with different jobs, and a
#   key reused for a different request is refused (422), as the IETF Idempotency-Key draft says.
IDEMPOTENT = ["cancel_job", "retry_job"]
# - Several classes' dataset: `class_ids` is a list of ids in the query; an id that is no class of
#   the caller's is refused as a field of the request (422, naming it), not as a missing resource
#   (the route exists), and no schema of a list of UUIDs can rule it out.
DATASETS = ["download_datasets"]


def fuzz_config(key: str) -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "seed": 20240924,
            "max-time": MAX_SECONDS,
            "headers": {"Authorization": f"Bearer {key}"},
            "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
            "operations": [
                {
                    "include-operation-id": UPLOADS,
                    "checks": {"positive_data_acceptance": {"enabled": False}},
                },
                {
                    "include-operation-id": LISTINGS,
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", "400", "401", "403", "404"]
                        }
                    },
                },
                {
                    "include-operation-id": DATASETS,
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", "401", "403", "404", "409", "422"]
                        }
                    },
                },
                {
                    "include-operation-id": IDEMPOTENT,
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", "401", "403", "404", "409", "422"]
                        }
                    },
                },
            ],
        }
    )


@pytest.fixture
def database_url(tmp_path: Path, sqlite_template: Path) -> str:
    """SQLite only: the schema is the same on both databases, and the API tests cover both."""
    return sqlite_database(tmp_path, sqlite_template)


@pytest.fixture
def fuzzed_api(make_api: ApiFactory) -> Api:
    """An app holding some of alice's work for the stateful phase to find through listings:
    a finished class with its embedding and samples, a failed one and a running one."""
    # NOTE: rate limits off: the fuzzer sends hundreds of requests a second with one key.
    api = make_api(rate_limit_per_second=0, job_rate_limit_per_minute=0)
    done, _ = add_class(api, owner_id=api.alice_id, name="dog", status="succeeded")
    add_embedding(api, done, b"not read by any check")
    for index in range(3):
        add_sample(api, done, index, accepted=index != 1)
    add_class(api, owner_id=api.alice_id, name="cat", status="failed", error="out of memory")
    add_class(api, owner_id=api.alice_id, name="owl", status="running", stage="sampling")
    return api


@dataclass
class FuzzRun:
    failures: list[str] = field(default_factory=list)  # described for a reader
    phases: set[str] = field(default_factory=set)
    operations: set[str] = field(default_factory=set)
    stateful_links: int = 0  # links between operations the stateful phase followed


def run_schemathesis(api: Api) -> FuzzRun:
    """Run every phase of schemathesis against the app, as its command line does."""
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", api.app, config=fuzz_config(api.keys["alice"])
    )
    run = FuzzRun()
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.PhaseStarted) and event.payload is not None:
            run.stateful_links = max(run.stateful_links, event.payload.transitions_selected)
        elif isinstance(event, events.PhaseFinished) and event.status != Status.SKIP:
            run.phases.add(event.phase.name.value)
        elif isinstance(event, events.NonFatalError | events.FatalError):
            run.failures.append(f"error: {event}")
        elif isinstance(event, events.ScenarioFinished):
            run.operations.add(event.recorder.label)
            for case_id, checks in event.recorder.checks.items():
                interaction = event.recorder.interactions.get(case_id)
                answer = interaction.response if interaction is not None else None
                status = answer.status_code if answer is not None else "no answer"
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info.failure
                        run.failures.append(
                            f"[{event.phase.value}] {event.recorder.label}: {check.name}: "
                            f"{failure.title} ({status})\n{failure.message}\n"
                            f"{check.failure_info.code_sample}"
                        )
    return run


def test_every_answer_to_generated_requests_is_as_the_schema_says(fuzzed_api: Api) -> None:
    # when: schemathesis runs all its phases against the app
    started = time.monotonic()
    run = run_schemathesis(fuzzed_api)
    elapsed = time.monotonic() - started

    # then: every phase ran (the schema has no examples of its own), over every operation,
    # the stateful phase followed links, and nothing failed
    assert {"coverage", "fuzzing", "stateful"} <= run.phases, run.phases
    assert run.stateful_links > 0
    documented = {
        f"{method.upper()} {path}"
        for path, item in fuzzed_api.app.openapi()["paths"].items()
        for method in item
    }
    assert documented <= run.operations, documented - run.operations
    assert not run.failures, "\n\n".join(_unique(run.failures))
    assert elapsed < MAX_SECONDS + 30


def _unique(failures: list[str]) -> list[str]:
    seen: dict[str, str] = {}
    for failure in failures:
        seen.setdefault(failure.split("\n", 1)[0], failure)
    return list(seen.values())


def test_the_schema_documents_problem_answers_as_problem_json(fuzzed_api: Api) -> None:
    # given: the schema the fuzzer checks answers against
    schema: dict[str, Any] = fuzzed_api.app.openapi()

    # then: every documented error is problem+json, whatever the route's own media type
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if status[0] in "45":
                    assert set(response.get("content", {})) <= {"application/problem+json"}, (
                        f"{method.upper()} {path} {status}"
                    )
