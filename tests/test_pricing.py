"""Prices beyond tokens, each checked against a cost worked out by hand from the
published price, through a real llimit in front of the fake upstream; and the
schema check of pricing.json (`python llimit.py pricing check`)."""

import json
import os
import subprocess
import sys

import requests

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NANO = 1_000_000_000


def post(server, raw_key, path, body=None, **kwargs):
    return requests.post(server.url + path, json=body, timeout=30,
                         headers={"Authorization": f"Bearer {raw_key}"}, **kwargs)


def only_event(server):
    (event,) = server.events()
    return event


def test_pricing_json_passes_its_schema_and_a_broken_file_fails(tmp_path):
    ok = subprocess.run([sys.executable, "llimit.py", "pricing", "check"], cwd=HERE,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    broken = tmp_path / "prices.json"
    broken.write_text(json.dumps({
        "a": {"input": 1, "output": 1, "images": {"huge": 0.1}},
        "b": {"input": 1, "output": 1, "per_1k_requests": {"telepathy": 5}},
        "c": {"input": 1, "output": 1, "long_context": {"input": 2}},
        "d": {"per_minute": -1}, "e": {"input": 1, "output": 1, "colour": "red"}}))
    bad = subprocess.run([sys.executable, "llimit.py", "pricing", "check", "--pricing",
                          str(broken)], cwd=HERE, capture_output=True, text=True)
    assert bad.returncode == 1
    assert [line.split(": ")[1] for line in bad.stderr.splitlines()] == list("abcde")


def test_images_by_model_size_and_quality(gateway, fake):
    raw_key, _ = gateway.create_key()
    body = {"model": "dall-e-3", "prompt": "a lighthouse", "size": "1024x1792",
            "quality": "hd"}
    assert post(gateway, raw_key, "/v1/images/generations", body).status_code == 200
    event = only_event(gateway)
    assert event["cost_nusd"] == round(0.12 * NANO)  # dall-e-3 HD 1024x1792: $0.120 each
    assert json.loads(event["units"])["images"] == 1
    # Repricing keeps what is not tokens.
    assert gateway.admin.post(gateway.url + "/admin/reprice").status_code == 200
    assert gateway.events()[0]["cost_nusd"] == round(0.12 * NANO)


def test_twenty_hd_images_or_speeches_cannot_pass_a_tiny_budget(gateway, fake):
    raw_key, _ = gateway.create_key()
    gateway.admin.post(gateway.url + "/admin/limits", json={
        "scope": "global", "metric": "usd", "window": "day", "amount": 0.0002})
    image = {"model": "dall-e-3", "prompt": "a lighthouse", "size": "1024x1792",
             "quality": "hd"}                                       # $0.12 each
    speech = {"model": "tts-1-hd", "input": "Hello there, world", "voice": "alloy"}
    codes = {post(gateway, raw_key, path, body).status_code for _ in range(20)
             for path, body in (("/v1/images/generations", image),   # 18 x $30/1M = $0.00054
                                ("/v1/audio/speech", speech))}
    assert codes == {429} and fake.requests == []


def test_speech_by_the_million_characters(gateway, fake):
    raw_key, _ = gateway.create_key()
    text = "Hello there, world"                          # 18 characters
    resp = post(gateway, raw_key, "/v1/audio/speech",
                {"model": "tts-1-hd", "input": text, "voice": "alloy"})
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "audio/mpeg"
    assert only_event(gateway)["cost_nusd"] == round(18 * 30.0 / 1e6 * NANO)  # $30 / 1M chars


def test_transcription_by_the_minute_from_usage_or_verbose_duration(gateway, fake):
    raw_key, _ = gateway.create_key()
    fake.behaviour["audio_seconds"] = 90
    audio = ("talk.mp3", b"ID3" + b"\x00" * 4000, "audio/mpeg")
    assert post(gateway, raw_key, "/v1/audio/transcriptions", files={"file": audio},
                data={"model": "whisper-1"}).status_code == 200
    fake.behaviour["audio_seconds"] = 45.5
    assert post(gateway, raw_key, "/v1/audio/transcriptions", files={"file": audio},
                data={"model": "whisper-1", "response_format": "verbose_json"}
                ).status_code == 200
    by_usage, by_duration = gateway.events()
    assert by_usage["model"] == "whisper-1"
    assert by_usage["cost_nusd"] == round(90 / 60 * 0.006 * NANO)       # $0.006 a minute
    assert by_duration["cost_nusd"] == round(45.5 / 60 * 0.006 * NANO)


def test_anthropic_web_searches_and_cache_writes_by_lifetime(make_llimit, fake):
    server = make_llimit()
    server.admin.post(server.url + "/admin/projects", json={
        "id": "claude", "upstream_kind": "anthropic", "upstream_url": fake.url + "/v1",
        "upstream_key": "sk-ant"})
    raw_key, _ = server.create_key(project="claude")
    fake.behaviour.update(status=200, error_body={
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "Found it."}], "stop_reason": "end_turn",
        "usage": {"input_tokens": 1000, "output_tokens": 200,
                  "cache_creation_input_tokens": 500, "cache_read_input_tokens": 0,
                  "cache_creation": {"ephemeral_5m_input_tokens": 200,
                                     "ephemeral_1h_input_tokens": 300},
                  "server_tool_use": {"web_search_requests": 3}}})
    resp = requests.post(server.url + "/v1/messages", headers={
        "x-api-key": raw_key, "anthropic-version": "2023-06-01"}, json={
        "model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": [
            {"role": "user", "content": "news?"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]})
    assert resp.status_code == 200, resp.text
    # claude-sonnet-4-5: $3 in, $3.75 5-minute writes, $6 1-hour writes, $15 out, and
    # web search at $10 per 1,000.
    usd = (1000 * 3 + 200 * 3.75 + 300 * 6 + 200 * 15) / 1e6 + 3 * 10 / 1000
    assert only_event(server)["cost_nusd"] == round(usd * NANO)


def test_long_context_prices_the_whole_call_above_the_threshold(gateway, fake):
    raw_key, _ = gateway.create_key()
    fake.behaviour.update(prompt_tokens=250000, completion_tokens=1000)
    assert post(gateway, raw_key, "/v1/chat/completions",
                {"model": "claude-sonnet-4", "messages": []}).status_code == 200
    fake.behaviour.update(prompt_tokens=200000)
    assert post(gateway, raw_key, "/v1/chat/completions",
                {"model": "claude-sonnet-4", "messages": []}).status_code == 200
    above, at = gateway.events()
    # claude-sonnet-4 over 200K input: $6 in, $22.50 out; at 200K: $3 / $15.
    assert above["cost_nusd"] == round((250000 * 6 + 1000 * 22.5) / 1e6 * NANO)
    assert at["cost_nusd"] == round((200000 * 3 + 1000 * 15) / 1e6 * NANO)


def test_priority_and_flex_service_tiers_from_the_answer(gateway, fake):
    raw_key, _ = gateway.create_key()
    for tier in ("priority", "flex", "default"):
        fake.behaviour.update(status=200, error_body={
            "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-5-2025-08-07",
            "service_tier": tier, "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant",
                                                           "content": "Hi"}}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}})
        assert post(gateway, raw_key, "/v1/chat/completions",
                    {"model": "gpt-5", "messages": [], "service_tier": tier}
                    ).status_code == 200
    priority, flex, default = gateway.events()
    # gpt-5: priority $2.50 / $20, flex $0.625 / $5, standard $1.25 / $10.
    assert priority["cost_nusd"] == round((11 * 2.5 + 7 * 20) * 1000)
    assert flex["cost_nusd"] == round((11 * 0.625 + 7 * 5) * 1000)
    assert default["cost_nusd"] == round((11 * 1.25 + 7 * 10) * 1000)


def test_spend_beyond_tokens_shows_in_me_usage_reports_and_csv(gateway, fake):
    from tests.browser import http_sign_in

    raw_key, _ = gateway.create_key(user="ivy")
    me = requests.get(gateway.url + "/llimit/me", headers={"Authorization": f"Bearer {raw_key}"})
    assert me.json()["limits"] == [] and me.json()["spend"] == {"today_usd": 0.0,
                                                                "month_usd": 0.0}
    assert post(gateway, raw_key, "/v1/images/generations", {
        "model": "dall-e-3", "prompt": "x", "quality": "hd", "size": "1024x1792"}
    ).status_code == 200
    assert post(gateway, raw_key, "/v1/audio/speech", {
        "model": "tts-1", "input": "a" * 1000, "voice": "alloy"}).status_code == 200
    gateway.wait_idle()
    usd = 0.12 + 1000 * 15 / 1e6                       # $0.12 an image, $15 / 1M characters
    me = requests.get(gateway.url + "/llimit/me", headers={"Authorization": f"Bearer {raw_key}"})
    assert me.json()["spend"] == {"today_usd": usd, "month_usd": usd}
    ivy = http_sign_in(gateway.url, "ivy")
    assert "$0.1350" in ivy.get(gateway.url + "/usage").text
    admin = http_sign_in(gateway.url, admin_token="test-admin-token")
    report = admin.get(gateway.url + "/reports/data.csv").text
    assert "dall-e-3" in report and "0.120000000" in report and "0.015000000" in report
    events = gateway.admin.get(gateway.url + "/admin/usage.csv").text
    assert "0.12" in events and "tts-1" in events


def test_openai_cache_writes_are_priced_at_the_models_cache_write_price(gateway, fake):
    # A model that bills cache writes reports them in prompt_tokens_details (chat) and
    # input_tokens_details (responses): 1,000 input of which 200 cache reads and 300
    # cache writes, 50 output, at $2 input, $0.50 cached, $2.50 cache write, $8 output.
    assert gateway.admin.put(gateway.url + "/admin/pricing/gpt-cachewriter", json={
        "input": 2, "cached_input": 0.5, "cache_write": 2.5, "output": 8}).status_code == 200
    fake.behaviour.update(prompt_tokens=1000, cached_tokens=200, cache_write_tokens=300,
                          completion_tokens=50)
    raw_key, _ = gateway.create_key()
    chat = post(gateway, raw_key, "/v1/chat/completions", {
        "model": "gpt-cachewriter", "max_tokens": 50,
        "messages": [{"role": "user", "content": "Hi"}]})
    assert chat.status_code == 200, chat.text
    responses = post(gateway, raw_key, "/v1/responses", {
        "model": "gpt-cachewriter", "max_output_tokens": 50, "input": "Hi"})
    assert responses.status_code == 200, responses.text
    expected = round((500 * 2 + 200 * 0.5 + 300 * 2.5 + 50 * 8) * 1000)  # $0.00225
    for event in fake_events(gateway):
        assert (event["prompt_tokens"], event["cached_tokens"], event["cache_write_tokens"],
                event["completion_tokens"]) == (1000, 200, 300, 50)
        assert event["cost_nusd"] == expected


def fake_events(server):
    events = server.events()
    assert [e["endpoint"] for e in events] == ["chat/completions", "responses"]
    return events
