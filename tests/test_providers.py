"""Azure OpenAI, Anthropic and one upstream per project, with the official clients."""

import pytest
import requests

import llimit
from tests.conftest import LazyModule

anthropic = LazyModule("anthropic")
openai = LazyModule("openai")

AZURE_KEY = "azure-secret-key-xyz"
ANTHROPIC_KEY = "sk-ant-secret-abc"


@pytest.fixture
def azure_project(gateway, fake, monkeypatch):
    monkeypatch.setenv("LLIMIT_UPSTREAM_KEY_AZURE", AZURE_KEY)
    resp = gateway.admin.post(gateway.url + "/admin/projects", json={
        "id": "my-team", "name": "My Team", "upstream_kind": "azure",
        "upstream_url": fake.url, "upstream_key": "env:LLIMIT_UPSTREAM_KEY_AZURE",
        "api_version": "2024-10-21", "allow_user_keys": True})
    assert resp.status_code == 201, resp.text
    assert AZURE_KEY not in resp.text and "env:LLIMIT_UPSTREAM_KEY_AZURE" in resp.text
    return gateway.create_key(user="alice", project="my-team")[0]


@pytest.fixture
def anthropic_project(gateway, fake):
    resp = gateway.admin.post(gateway.url + "/admin/projects", json={
        "id": "claude-team", "upstream_kind": "anthropic", "upstream_url": fake.url + "/v1",
        "upstream_key": ANTHROPIC_KEY})
    assert resp.status_code == 201, resp.text
    assert ANTHROPIC_KEY not in resp.text
    return gateway.create_key(user="bea", project="claude-team")[0]


def azure_client(gateway, raw_key):
    return openai.AzureOpenAI(azure_endpoint=gateway.url, api_key=raw_key,
                              api_version="2024-10-21", max_retries=0)


def test_azure_client_chat_whole_and_streamed(gateway, fake, azure_project):
    api = azure_client(gateway, azure_project)
    reply = api.chat.completions.create(model="gpt4o-deploy", messages=[
        {"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content
    sent = fake.requests[-1]
    assert sent.path == "/openai/deployments/gpt4o-deploy/chat/completions"
    assert sent.query["api-version"] == "2024-10-21"
    assert sent.headers["api-key"] == AZURE_KEY
    chunks = list(api.chat.completions.create(model="gpt4o-deploy", stream=True, messages=[
        {"role": "user", "content": "Hi"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}
    events = gateway.events()
    assert [e["pricing"] for e in events] == ["priced", "priced"]
    assert all(e["model"].startswith("gpt-4o") and e["project_id"] == "my-team"
               for e in events)


def test_azure_embeddings_and_curl_style_call(gateway, fake, azure_project):
    api = azure_client(gateway, azure_project)
    assert api.embeddings.create(model="embed-deploy", input="hello").data
    resp = requests.post(
        gateway.url + "/openai/deployments/gpt4o-deploy/chat/completions?api-version=2024-10-21",
        headers={"api-key": azure_project}, json={"messages": [{"role": "user",
                                                               "content": "Hi"}]})
    assert resp.status_code == 200
    assert fake.requests[-1].query["api-version"] == "2024-10-21"
    assert len(gateway.events()) == 2


def test_v1_route_with_model_becomes_the_deployment_url(gateway, fake, azure_project):
    api = openai.OpenAI(base_url=gateway.url + "/v1", api_key=azure_project, max_retries=0)
    api.chat.completions.create(model="gpt4o-deploy", messages=[])
    assert fake.requests[-1].path == "/openai/deployments/gpt4o-deploy/chat/completions"
    assert fake.requests[-1].headers["api-key"] == AZURE_KEY
    assert "authorization" not in {h.lower() for h in fake.requests[-1].headers}


def test_azure_deployment_mapped_to_a_model_when_none_is_reported(gateway, fake,
                                                                  azure_project):
    gateway.admin.patch(gateway.url + "/admin/projects/my-team",
                        json={"model_map": {"cheap": "gpt-4o-mini"}})
    fake.behaviour["model"] = ""
    azure_client(gateway, azure_project).chat.completions.create(model="cheap", messages=[])
    (event,) = gateway.events()
    assert event["model"] == "gpt-4o-mini" and event["pricing"] == "priced"


def test_missing_env_key_is_a_clear_502(gateway, fake, azure_project, monkeypatch):
    monkeypatch.delenv("LLIMIT_UPSTREAM_KEY_AZURE")
    resp = requests.post(gateway.url + "/v1/chat/completions", json={"model": "d"},
                         headers={"Authorization": f"Bearer {azure_project}"})
    assert resp.status_code == 502
    assert "LLIMIT_UPSTREAM_KEY_AZURE" in resp.json()["error"]["message"]
    assert fake.requests == []


def test_anthropic_messages_whole_and_streamed(gateway, fake, anthropic_project):
    fake.behaviour.update(prompt_tokens=11, cached_tokens=200, cache_write_tokens=100,
                          completion_tokens=7)
    api = anthropic.Anthropic(base_url=gateway.url, api_key=anthropic_project, max_retries=0)
    message = api.messages.create(model="claude-sonnet-5", max_tokens=100,
                                  messages=[{"role": "user", "content": "Hi"}])
    assert message.content[0].text
    sent = fake.requests[-1]
    assert sent.path == "/v1/messages" and sent.headers["x-api-key"] == ANTHROPIC_KEY
    assert anthropic_project not in str(dict(sent.headers))
    with api.messages.stream(model="claude-sonnet-5", max_tokens=100,
                             messages=[{"role": "user", "content": "Hi"}]) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens == 7
    whole, streamed = gateway.events()
    for event in (whole, streamed):
        assert (event["prompt_tokens"], event["cached_tokens"], event["cache_write_tokens"],
                event["completion_tokens"]) == (311, 200, 100, 7)
        assert event["pricing"] == "priced"
    price = gateway.state.pricebook.resolve("claude-sonnet-5")[1]
    expected = (11 * price[0] + 200 * price[1] + 100 * price[3] + 7 * price[2]) * 1000
    assert whole["cost_nusd"] == round(expected)
    assert price[3] > price[0] > price[1], "cache writes cost more, reads less"


def test_anthropic_count_tokens_and_errors(gateway, fake, anthropic_project):
    api = anthropic.Anthropic(base_url=gateway.url, api_key=anthropic_project, max_retries=0)
    count = api.messages.count_tokens(model="claude-sonnet-5",
                                      messages=[{"role": "user", "content": "Hi"}])
    assert count.input_tokens > 0
    from tests.fake_upstream import anthropic_error
    fake.behaviour.update(status=529, error_body=anthropic_error(529, "overloaded_error",
                                                                 "Overloaded"))
    with pytest.raises(anthropic.APIStatusError) as caught:
        api.messages.create(model="claude-sonnet-5", max_tokens=10,
                            messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.status_code == 529
    assert caught.value.body["error"]["type"] == "overloaded_error"


def test_llimit_errors_reach_anthropic_clients_cleanly(gateway, anthropic_project):
    api = anthropic.Anthropic(base_url=gateway.url, api_key="llimit-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        api.messages.create(model="claude-sonnet-5", max_tokens=10,
                            messages=[{"role": "user", "content": "Hi"}])


def test_keys_go_only_to_their_project_upstream(gateway, fake, anthropic_project):
    default_key, _ = gateway.create_key(user="carl")
    requests.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                  headers={"Authorization": f"Bearer {default_key}"})
    assert fake.requests[-1].headers["Authorization"].startswith("Bearer sk-upstream")
    api = anthropic.Anthropic(base_url=gateway.url, api_key=anthropic_project, max_retries=0)
    api.messages.create(model="claude-sonnet-5", max_tokens=10,
                        messages=[{"role": "user", "content": "Hi"}])
    assert "Authorization" not in fake.requests[-1].headers
    projects = {e["project_id"] for e in gateway.events()}
    assert projects == {"default", "claude-team"}


def test_missing_env_key_is_warned_about_at_start(tmp_path, processes, monkeypatch):
    db_path = str(tmp_path / "warn.db")
    db = llimit.connect(db_path)
    llimit.migrate(db)
    llimit.insert_project(db, llimit.validate_project({
        "id": "ghost", "upstream_kind": "azure", "upstream_url": "https://res.example",
        "upstream_key": "env:LLIMIT_UPSTREAM_KEY_GHOST"}) | {"created_at": "2026-11-23T00:00:00Z"})
    monkeypatch.delenv("LLIMIT_UPSTREAM_KEY_GHOST", raising=False)
    # Its own port (0), and its log read from a file until "serving on", within a bound.
    server = processes(db_path=db_path)
    text = server.log()
    assert "ghost" in text and "LLIMIT_UPSTREAM_KEY_GHOST is not set" in text
    assert server.proc.poll() is None, "a missing key must not stop llimit"
