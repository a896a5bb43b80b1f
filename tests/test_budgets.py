"""Budgets hold for every kind of spend: unpriced calls are refused under a USD
budget, usage of every shape is read whole, and reservations bound the worst
case under concurrency. Expected costs are worked out by hand from
pricing.json's list prices (USD per 1M tokens; 1 token at $1/1M = 1,000 nano-dollars)."""

import concurrent.futures
import json
import threading

import pytest
import requests

from tests.test_limits import add_limit

ENGINES = ("sqlite", "postgres")

TINY_BUDGET = 0.0002  # USD a day


def post(server, raw_key, path, body, headers=None):
    return requests.post(server.url + path, json=body, timeout=30,
                         headers={"Authorization": f"Bearer {raw_key}", **(headers or {})})


def limit_used(server, limit_id):
    server.wait_idle()
    return server.admin.get(server.url + f"/admin/limits/{limit_id}").json()["used"]


def assert_counters_equal_ledger(server):
    """The running totals limits read are exactly the sum of the usage events."""
    server.wait_idle()
    db = server.db()
    events = tuple(db.execute("select count(*), coalesce(sum(prompt_tokens +"
                              " completion_tokens), 0), coalesce(sum(cost_nusd), 0)"
                              " from usage_events").fetchone())
    counters = tuple(db.execute("select requests, tokens, cost_nusd from usage_counters"
                                " where subject = '*' and day = 'total'").fetchone() or (0, 0, 0))
    daily = tuple(db.execute("select coalesce(sum(requests), 0), coalesce(sum(prompt_tokens"
                             " + completion_tokens), 0), coalesce(sum(cost_nusd), 0)"
                             " from usage_daily").fetchone())
    assert events == counters == daily


# --- 11.1: a call no price covers is refused under a USD budget ---------------------------

CHAT = [{"role": "user", "content": "Hi"}]
UNPRICED_CALLS = [
    # A fine-tuned model whose base has no fine-tuned price, and an audio model.
    ("/v1/chat/completions", {"model": "ft:gpt-4.1-nano-2025-04-14:acme::B1x2", "messages": CHAT}),
    ("/v1/chat/completions", {"model": "gpt-4o-audio-preview", "messages": CHAT,
                              "modalities": ["text", "audio"]}),
]


@pytest.mark.parametrize("path,body", UNPRICED_CALLS)
def test_unpriced_calls_are_refused_under_a_usd_budget(gateway, fake, path, body):
    raw_key, _ = gateway.create_key()
    limit = add_limit(gateway, scope="global", metric="usd", window="day", amount=TINY_BUDGET)
    for _ in range(20):
        refused = post(gateway, raw_key, path, body)
        assert refused.status_code == 403
        error = refused.json()["error"]
        assert error["code"] == "model_not_priced"
        assert body["model"] in error["message"] and "/admin/pricing/*" in error["message"]
    assert fake.requests == [] and limit_used(gateway, limit["id"]) == 0


def test_unpriced_calls_pass_where_no_usd_budget_applies(gateway, fake):
    raw_key, _ = gateway.create_key()
    add_limit(gateway, scope="global", metric="requests", window="day", amount=100)
    add_limit(gateway, scope="global", metric="usd", window="day", amount=TINY_BUDGET,
              action="warn")
    assert post(gateway, raw_key, *UNPRICED_CALLS[1]).status_code == 200
    assert gateway.events()[0]["pricing"] == "unpriced"


def test_a_fallback_price_covers_every_model_without_its_own(gateway, fake):
    raw_key, _ = gateway.create_key()
    add_limit(gateway, scope="global", metric="usd", window="day", amount=1)
    assert post(gateway, raw_key, *UNPRICED_CALLS[1]).status_code == 403
    put = gateway.admin.put(gateway.url + "/admin/pricing/*", json={"input": 5, "output": 20})
    assert put.status_code == 200, put.text
    assert post(gateway, raw_key, *UNPRICED_CALLS[1]).status_code == 200
    assert post(gateway, raw_key, "/v1/chat/completions",
                {"model": "gpt-4o", "messages": CHAT}).status_code == 200
    audio, own = gateway.events()
    # the fake's 11 prompt + 7 completion tokens: at the fallback $5/$20 ...
    assert (audio["cost_nusd"], audio["pricing"]) == ((11 * 5 + 7 * 20) * 1000, "priced")
    # ... and gpt-4o keeps its own $2.50/$10.
    assert own["cost_nusd"] == round((11 * 2.5 + 7 * 10) * 1000)


def test_a_fine_tuned_model_is_priced_at_its_base_models_fine_tuned_price(gateway, fake):
    raw_key, _ = gateway.create_key()
    add_limit(gateway, scope="global", metric="usd", window="day", amount=1)
    model = "ft:gpt-4o-mini-2024-07-18:acme:support:9xYz"
    fake.behaviour["cached_tokens"] = 4
    assert post(gateway, raw_key, "/v1/chat/completions",
                {"model": model, "messages": CHAT}).status_code == 200
    (event,) = gateway.events()
    # fine-tuned gpt-4o-mini: $0.30 in, $0.15 cached, $1.20 out (not the base $0.15/$0.60)
    assert event["cost_nusd"] == round((7 * 0.30 + 4 * 0.15 + 7 * 1.20) * 1000)


def test_a_costless_answer_under_a_usd_budget_is_settled_at_its_reservation(gateway, fake):
    fake.behaviour["no_usage"] = True
    raw_key, _ = gateway.create_key()
    add_limit(gateway, scope="global", metric="usd", window="day", amount=1)
    body = {"model": "gpt-4o", "messages": CHAT, "max_tokens": 100}
    assert post(gateway, raw_key, "/v1/chat/completions", body).status_code == 200
    (event,) = gateway.events()
    prompt = len(fake.requests[0].body) // 3  # the reservation's 3 bytes a token
    assert event["pricing"] == "estimated"
    assert (event["prompt_tokens"], event["completion_tokens"]) == (prompt, 100)
    assert event["cost_nusd"] == round((prompt * 2.5 + 100 * 10) * 1000)


# --- 11.3: usage of every shape is read whole --------------------------------------------

def test_openai_shaped_usage_with_anthropic_cache_fields_keeps_its_completion(gateway, fake):
    # What a gateway in front of Claude (LiteLLM, say) answers in OpenAI's shape.
    fake.behaviour.update(status=200, error_body={
        "id": "chatcmpl-x", "object": "chat.completion", "model": "claude-sonnet-4-20250514",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "Hi"}}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500,
                  "prompt_tokens_details": {"cached_tokens": 200},
                  "completion_tokens_details": {"reasoning_tokens": 120},
                  "cache_creation_input_tokens": 300, "cache_read_input_tokens": 200}})
    raw_key, _ = gateway.create_key()
    assert post(gateway, raw_key, "/v1/chat/completions",
                {"model": "claude-sonnet-4", "messages": CHAT}).status_code == 200
    (event,) = gateway.events()
    assert (event["prompt_tokens"], event["cached_tokens"], event["cache_write_tokens"],
            event["completion_tokens"], event["reasoning_tokens"]) == (1000, 200, 300, 500, 120)
    # claude-sonnet-4: $3 in, $0.30 cache read, $3.75 cache write, $15 out
    assert event["cost_nusd"] == round((500 * 3 + 200 * 0.30 + 300 * 3.75 + 500 * 15) * 1000)


# --- 11.4: reservations bound the worst case under concurrency ---------------------------

def fire_at_once(count, send):
    """`count` calls released together; their status codes."""
    barrier = threading.Barrier(count)

    def one(_):
        barrier.wait()
        return send().status_code

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_40_calls_without_max_tokens_stay_within_one_calls_overrun(gateway, fake):
    # No max_tokens: gpt-4o may write up to its max_output_tokens (16,384), and does.
    fake.behaviour.update(completion_tokens=16000, delay_first=0.3)
    raw_key, _ = gateway.create_key()
    call_usd = (11 * 2.5 + 16000 * 10) / 1e6          # $0.1600275 a call
    limit = add_limit(gateway, scope="global", metric="usd", window="day", amount=0.5)
    codes = fire_at_once(40, lambda: post(gateway, raw_key, "/v1/chat/completions",
                                          {"model": "gpt-4o", "messages": CHAT}))
    assert set(codes) == {200, 429}
    used = limit_used(gateway, limit["id"])
    assert codes.count(200) * call_usd == pytest.approx(used)
    assert used <= 0.5 + call_usd  # at most one call's own overrun
    assert_counters_equal_ledger(gateway)


@pytest.mark.parametrize("spelled", ["plain", "escaped"])
def test_40_calls_reading_a_stored_conversation_stay_within_the_budget(gateway, fake, spelled):
    # A few bytes of request, but previous_response_id makes the upstream read a
    # 100,000-token conversation: the reservation is gpt-4o's 128,000-token window,
    # also when the client spells the name with a JSON escape ("\u0070revious...").
    raw_key, _ = gateway.create_key()
    first = post(gateway, raw_key, "/v1/responses", {"model": "gpt-4o", "input": "hello"})
    first_usd = (11 * 2.5 + 7 * 10) / 1e6               # the fake's 11 + 7 tokens
    fake.behaviour.update(prompt_tokens=100000, completion_tokens=10, delay_first=0.3)
    call_usd = (100000 * 2.5 + 10 * 10) / 1e6          # $0.2501 a call
    limit = add_limit(gateway, scope="global", metric="usd", window="day", amount=1)
    body = json.dumps({"model": "gpt-4o", "previous_response_id": first.json()["id"],
                       "input": "go on", "max_output_tokens": 10})
    if spelled == "escaped":
        body = body.replace('"previous_response_id"', '"\\u0070revious_response_id"')
    codes = fire_at_once(40, lambda: requests.post(
        gateway.url + "/v1/responses", data=body, timeout=30,
        headers={"Authorization": f"Bearer {raw_key}", "Content-Type": "application/json"}))
    used = limit_used(gateway, limit["id"])
    assert first_usd + codes.count(200) * call_usd == pytest.approx(used)
    # max_output_tokens bounds the call, so the reservation is a true upper bound:
    # (128,000 * $2.50 + 10 * $10) / 1M = $0.3201 a call, 3 fit in $1.
    assert codes.count(200) == 3 and used <= 1
    assert_counters_equal_ledger(gateway)


def test_40_calls_to_an_azure_deployment_are_reserved_at_its_models_price(
        gateway, fake):
    created = gateway.admin.post(gateway.url + "/admin/projects", json={
        "id": "azure-team", "upstream_kind": "azure", "upstream_url": fake.url,
        "upstream_key": "azure-secret", "api_version": "2024-10-21",
        "model_map": {"prod-4o": "gpt-4o"}})
    assert created.status_code == 201, created.text
    raw_key, _ = gateway.create_key(project="azure-team")
    fake.behaviour.update(completion_tokens=1000, delay_first=0.3)
    call_usd = (11 * 2.5 + 1000 * 10) / 1e6            # $0.0100275 a call
    limit = add_limit(gateway, scope="project", target="azure-team", metric="usd",
                      window="day", amount=0.05)
    codes = fire_at_once(40, lambda: requests.post(
        gateway.url + "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21",
        json={"messages": CHAT, "max_tokens": 1000}, headers={"api-key": raw_key}, timeout=30))
    used = limit_used(gateway, limit["id"])
    assert 1 <= codes.count(200) <= 4 and codes.count(200) * call_usd == pytest.approx(used)
    assert used <= 0.05
    assert_counters_equal_ledger(gateway)


def test_an_unmapped_azure_deployment_is_refused_under_a_usd_budget(gateway, fake):
    gateway.admin.post(gateway.url + "/admin/projects", json={
        "id": "azure-team", "upstream_kind": "azure", "upstream_url": fake.url,
        "upstream_key": "azure-secret", "api_version": "2024-10-21"})
    raw_key, _ = gateway.create_key(project="azure-team")
    add_limit(gateway, scope="project", target="azure-team", metric="usd", window="day",
              amount=5)
    refused = requests.post(
        gateway.url + "/openai/deployments/my-deployment/chat/completions"
        "?api-version=2024-10-21", json={"messages": CHAT}, headers={"api-key": raw_key})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "model_not_priced" and fake.requests == []


# --- 11.6: a cap on each person's keys, so `each: key` limits do not multiply -------------

def test_a_person_holds_at_most_max_keys_per_user_active_keys(gateway):
    from tests.browser import csrf_token, http_sign_in

    patched = gateway.admin.patch(gateway.url + "/admin/projects/default",
                                  json={"max_keys_per_user": 2})
    assert patched.status_code == 200 and patched.json()["max_keys_per_user"] == 2
    bad = gateway.admin.patch(gateway.url + "/admin/projects/default",
                              json={"max_keys_per_user": -1})
    assert bad.status_code == 400 and "max_keys_per_user" in bad.json()["error"]["message"]
    grace = http_sign_in(gateway.url, "grace")
    page = grace.get(gateway.url + "/keys").text
    assert "at most 2 keys each" in page
    token = csrf_token(page)

    def create():
        return grace.post(gateway.url + "/keys", data={"csrf_token": token,
                                                       "project": "default"})

    assert create().status_code == 200 and create().status_code == 200
    refused = create()
    assert refused.status_code == 403 and "the most it allows per person" in refused.text
    assert gateway.db().execute("select count(*) from api_keys where user_name = 'grace'"
                                ).fetchone()[0] == 2
    # Revoking one makes room again.
    key_id = gateway.db().execute("select id from api_keys where user_name = 'grace'"
                                  ).fetchone()[0]
    assert grace.post(f"{gateway.url}/keys/{key_id}/revoke",
                      data={"csrf_token": token, "confirm": "1"}).status_code == 200
    assert create().status_code == 200


def test_a_body_with_a_lone_surrogate_escape_is_forwarded_not_a_crash(gateway, fake):
    # JSON may escape half a surrogate pair; looking at escaped bodies again must not choke.
    raw_key, _ = gateway.create_key()
    resp = requests.post(gateway.url + "/v1/chat/completions", timeout=30, data=(
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\\ud800 caf\\u00e9"}]}'),
        headers={"Authorization": f"Bearer {raw_key}", "Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
