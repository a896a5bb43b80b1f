"""Hostile input: a fuzzer on the admin API, broken and oversized requests,
header injection, path tricks, markup and SQL in every stored text, formulas
in CSV exports, and the guessing of keys and admin tokens."""

import dataclasses

import hypothesis
import pytest
import schemathesis

import llimit
from tests.conftest import ADMIN_TOKEN, UPSTREAM_KEY, Clock, LlimitServer
from tests.fake_upstream import FakeUpstream


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One llimit (and fake upstream) for the whole fuzzing run."""
    upstream = FakeUpstream()
    config = dataclasses.replace(
        llimit.Config(), db_path=str(tmp_path_factory.mktemp("fuzz") / "llimit.db"),
        admin_token=ADMIN_TOKEN, upstream_url=upstream.url + "/v1",
        upstream_key=UPSTREAM_KEY, threads=8, clock=Clock())
    server = LlimitServer(config)
    yield server
    server.stop()
    upstream.close()


@pytest.fixture(scope="module")
def admin_schema(live):
    schema = schemathesis.openapi.from_url(live.url + "/admin/openapi.json")
    # Unknown query parameters are ignored, as web APIs do; that is no bug to report.
    schema.config.generation.update(allow_extra_parameters=False)
    return schema


fuzzed = schemathesis.pytest.from_fixture("admin_schema")


# Rules OpenAPI 3.0 cannot state, so a 400 for them is no refusal of valid data:
# start may not be after end; an azure or anthropic project (as stored) needs its
# upstream_url. Every other check runs on these operations as well.
STATEFUL_RULES = {("GET", "/admin/usage"), ("GET", "/admin/usage.csv"),
                  ("PATCH", "/admin/projects/{id}")}


@hypothesis.settings(max_examples=25, deadline=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@fuzzed.parametrize()
def test_the_admin_api_answers_fuzzed_requests_as_its_spec_says(case, live):
    # The fuzzer sends wrong tokens on purpose (to see them refused with 401); the
    # minute that passes between cases keeps the bad-secret throttle out of it.
    live.config.clock.advance(61)
    excluded = ([schemathesis.checks.positive_data_acceptance]
                if (case.method.upper(), case.operation.path) in STATEFUL_RULES else [])
    case.call_and_validate(base_url=live.url, excluded_checks=excluded,
                           headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
