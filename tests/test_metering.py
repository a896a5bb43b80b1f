"""Every call leaves exactly one usage event, with OpenAI's token semantics."""

import json
import subprocess
import sys

import pytest
import requests

ENGINES = ("sqlite", "postgres")

import llimit

ROUTES = {
    "chat/completions": {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]},
    "completions": {"model": "gpt-3.5-turbo-instruct", "prompt": "Hi"},
    "embeddings": {"model": "text-embedding-3-small", "input": "Hi"},
    "responses": {"model": "gpt-4o", "input": "Hi"},
}


@pytest.mark.parametrize("usage_present", [True, False], ids=["usage", "no-usage"])
@pytest.mark.parametrize("route, stream", [
    (route, stream) for route in ROUTES for stream in (False, True)
    if not (stream and route == "embeddings")])  # embeddings do not stream
def test_each_call_leaves_exactly_one_usage_event(gateway, fake, route, stream,
                                                  usage_present):
    fake.behaviour["no_usage"] = not usage_present
    raw_key, key_id = gateway.create_key(user="bob")
    body = {**ROUTES[route], **({"stream": True} if stream else {})}
    resp = requests.post(f"{gateway.url}/v1/{route}", json=body,
                         headers={"Authorization": f"Bearer {raw_key}"})
    assert resp.status_code == 200
    resp.content  # read to the end
    (event,) = gateway.events()
    assert (event["key_id"], event["user_name"], event["project_id"]) == (key_id, "bob",
                                                                           "default")
    assert event["endpoint"] == route and event["stream"] == int(stream)
    if usage_present:
        assert event["pricing"] == "priced"
        assert event["prompt_tokens"] == 11
    elif stream:
        assert event["pricing"] == "estimated"
    else:
        assert event["pricing"] == "unpriced" and event["cost_nusd"] is None


# Captured in the format of OpenAI's API reference (chat completion object).
CACHED_REASONING_RESPONSE = {
    "id": "chatcmpl-abc123", "object": "chat.completion", "created": 1741569952,
    "model": "o3-mini-2025-01-31",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi",
                                         "refusal": None, "annotations": []},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
              "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 192, "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0,
                                            "rejected_prediction_tokens": 0}},
    "service_tier": "default", "system_fingerprint": "fp_44709d6fcb",
}


def test_cached_and_reasoning_tokens_follow_openai_semantics():
    model, usage = llimit.usage_from_body(CACHED_REASONING_RESPONSE)
    assert model == "o3-mini-2025-01-31"
    assert (usage.prompt_tokens, usage.cached_tokens) == (2006, 1920)
    assert (usage.completion_tokens, usage.reasoning_tokens) == (300, 192)
    # 86 uncached at input, 1920 at cached_input, 300 (reasoning included) at output.
    prices = (1.1, 0.55, 4.4, 1.1)
    expected_usd = (86 * 1.1 + 1920 * 0.55 + 300 * 4.4) / 1e6
    assert llimit.cost_nusd(usage, prices) == round(expected_usd * 1e9)


def test_cached_input_falls_back_to_input_price():
    book = llimit.Pricebook({"m": {"input": 2.0, "output": 8.0}})
    assert book.resolve("m")[1] == (2.0, 2.0, 8.0, 2.0)


def test_dated_and_prefixed_names_resolve_to_their_base_model():
    book = llimit.Pricebook({"gpt-4o": {"input": 2.5, "cached_input": 1.25, "output": 10},
                             "gpt-4o-2024-05-13": {"input": 5, "output": 15},
                             "claude-sonnet-4-5": {"input": 3, "output": 15}})
    assert book.resolve("gpt-4o-2024-08-06")[0] == "gpt-4o"
    assert book.resolve("gpt-4o-2024-05-13")[0] == "gpt-4o-2024-05-13"
    assert book.resolve("claude-sonnet-4-5-20250929")[0] == "claude-sonnet-4-5"
    assert book.resolve("openai/gpt-4o")[0] == "gpt-4o"
    assert book.resolve("gpt-4o-0613")[0] == "gpt-4o"
    assert book.resolve("claude-sonnet-4-5-latest")[0] == "claude-sonnet-4-5"
    assert book.resolve("my-local-llama") is None


def test_shipped_pricing_file_is_valid_and_covers_the_main_models():
    table = llimit.load_price_file(llimit.Config().pricing_path)
    book = llimit.Pricebook(table)
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3", "gpt-5", "text-embedding-3-small",
                  "claude-sonnet-4-5-20250929", "claude-3-5-haiku-20241022",
                  "gemini-2.5-pro", "gpt-35-turbo"):
        assert book.resolve(model) is not None, model
    assert "cache_write" in table["claude-sonnet-4-5"]


def test_cached_tokens_in_a_real_call_are_priced_lower(gateway, fake):
    fake.behaviour.update(prompt_tokens=1000, cached_tokens=800, completion_tokens=100,
                          reasoning_tokens=40, model="gpt-4o-2024-08-06")
    raw_key, _ = gateway.create_key()
    requests.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                  headers={"Authorization": f"Bearer {raw_key}"})
    (event,) = gateway.events()
    assert (event["prompt_tokens"], event["cached_tokens"], event["completion_tokens"],
            event["reasoning_tokens"]) == (1000, 800, 100, 40)
    # OpenAI's published gpt-4o prices per 1M tokens: input $2.50, cached input $1.25,
    # output $10.00. 200 uncached + 800 cached prompt tokens, 100 completion tokens
    # (reasoning included): $0.0005 + $0.0010 + $0.0010 = $0.0025.
    assert event["cost_nusd"] == 2_500_000
    snapshot = gateway.db().execute("select * from price_snapshots where id = ?",
                                    (event["price_id"],)).fetchone()
    assert (snapshot["model"], snapshot["input"], snapshot["cached_input"],
            snapshot["output"]) == ("gpt-4o", 2.5, 1.25, 10.0)


def test_unknown_model_is_metered_with_null_cost_and_listed_missing(gateway, fake):
    fake.behaviour["model"] = "acme-llm-7b"
    raw_key, _ = gateway.create_key()
    requests.post(gateway.url + "/v1/chat/completions", json={"model": "acme-llm-7b"},
                  headers={"Authorization": f"Bearer {raw_key}"})
    (event,) = gateway.events()
    assert event["pricing"] == "unpriced" and event["cost_nusd"] is None
    assert event["prompt_tokens"] == 11
    assert gateway.admin.get(gateway.url + "/admin/pricing").json()["missing"] == ["acme-llm-7b"]
    out = subprocess.run([sys.executable, "llimit.py", "pricing", "missing",
                          "--db", gateway.config.db_path], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.split() == ["acme-llm-7b"]


def test_reprice_recomputes_stored_costs(gateway, fake):
    fake.behaviour["model"] = "acme-llm-7b"
    raw_key, _ = gateway.create_key()
    requests.post(gateway.url + "/v1/chat/completions", json={"model": "acme-llm-7b"},
                  headers={"Authorization": f"Bearer {raw_key}"})
    gateway.wait_idle()
    resp = gateway.admin.put(gateway.url + "/admin/pricing/acme-llm-7b",
                             json={"input": 1.0, "output": 2.0})
    assert resp.status_code == 200
    assert gateway.admin.post(gateway.url + "/admin/reprice").json()["changed"] == 1
    (event,) = gateway.events()
    assert event["pricing"] == "priced" and event["cost_nusd"] == 11 * 1000 + 7 * 2000
    usage = gateway.admin.get(gateway.url + "/admin/usage?group_by=model").json()
    assert usage["totals"]["cost_usd"] == pytest.approx(25e-6)


def test_no_prompt_or_completion_text_is_stored(gateway, fake, tmp_path):
    secret_prompt, raw_key = "purple-elephant-prompt", gateway.create_key()[0]
    requests.post(gateway.url + "/v1/chat/completions",
                  json={"model": "gpt-4o", "messages": [{"role": "user",
                                                         "content": secret_prompt}]},
                  headers={"Authorization": f"Bearer {raw_key}"})
    gateway.wait_idle()
    blob = b"".join(path.read_bytes() for path in tmp_path.glob("*.db*"))
    assert secret_prompt.encode() not in blob
    assert raw_key.encode() not in blob
    completion = json.dumps(fake.last_completion_text).encode()[1:-1] \
        if hasattr(fake, "last_completion_text") else b"Hello world"
    assert completion not in blob


def test_usage_is_committed_before_the_last_byte(gateway, fake):
    raw_key, _ = gateway.create_key()
    db = gateway.db()
    for stream in (False, True):
        resp = requests.post(gateway.url + "/v1/chat/completions",
                             json={"model": "gpt-4o", "stream": stream, "messages": []},
                             headers={"Authorization": f"Bearer {raw_key}"})
        assert resp.status_code == 200 and resp.content
        # Read at once, without waiting for the writer: the row must already be there.
        count = db.execute("select count(*) from usage_events where stream = ?",
                           (int(stream),)).fetchone()[0]
        assert count == 1, f"stream={stream}: usage not committed when the response ended"
