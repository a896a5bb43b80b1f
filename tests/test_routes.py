"""Route policy: every upstream route has a class (generate, lookup, async,
credential, refused), objects belong to whoever made them, async jobs are
charged once when they finish. Real llimit, real fake upstream, the official
SDKs. Expected costs are hand arithmetic on pricing.json's published prices."""

import importlib
import io
import json
import pathlib
import re
import threading
import time

import pytest
import requests

from tests.conftest import ADMIN_TOKEN, UPSTREAM_KEY, LazyModule, sqlite_only
from tests.fake_upstream import EXPECTED

anthropic = LazyModule("anthropic")
openai = LazyModule("openai")

ENGINES = ("sqlite", "postgres")

P, C = EXPECTED["prompt_tokens"], EXPECTED["completion_tokens"]  # 11 and 7
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}


def client(gateway, raw_key, **options):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=raw_key, max_retries=0,
                         **options)


def usd(event):
    return None if event["cost_nusd"] is None else event["cost_nusd"] / 1e9


def refused(resp, status=403, code="route_not_allowed"):
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code, resp.text
    return resp.json()["error"]["message"]


def async_project(gateway, fake, project_id="jobs", **fields):
    resp = gateway.admin.post(gateway.url + "/admin/projects", json={
        "id": project_id, "upstream_url": fake.url + "/v1", "upstream_key": UPSTREAM_KEY,
        "allow_async": True, **fields})
    assert resp.status_code == 201, resp.text
    assert resp.json()["allow_async"] is True
    return project_id


def anthropic_key(gateway, fake, user="alice", **fields):
    """A key of a new project whose upstream speaks Anthropic: (raw key, key id)."""
    resp = gateway.admin.post(gateway.url + "/admin/projects", json={
        "id": "claude", "upstream_kind": "anthropic", "upstream_url": fake.url + "/v1",
        "upstream_key": "sk-ant-x", **fields})
    assert resp.status_code == 201, resp.text
    return gateway.create_key(user=user, project="claude")


def batch_file(*models):
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {**CHAT, "model": model}}) for i, model in enumerate(models)]
    return io.BytesIO(("\n".join(lines) + "\n").encode())


# --- 1. every route the SDKs can send has a class --------------------------------------------

CALL = re.compile(r'self\._(get|post|delete|patch|put|get_api_list)\(\s*(?:path_template\()?'
                  r'\s*f?"([^"]+)"')


def sdk_routes():
    """(sdk, method, path) of every request the installed openai and anthropic SDKs make."""
    found = set()
    for package in ("openai", "anthropic"):
        sources = pathlib.Path(importlib.import_module(package).__file__).parent / "resources"
        for source in sources.rglob("*.py"):
            for method, path in CALL.findall(source.read_text()):
                path = re.sub(r"\{[^}]*\}", "obj_x1", path.split("?")[0])
                path = path if path.startswith("/v1/") else "/v1" + path
                found.add((package, method.replace("get_api_list", "get").upper(), path))
    return sorted(found)


GENERATE = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings",
            "/v1/moderations", "/v1/images/generations", "/v1/images/edits",
            "/v1/images/variations", "/v1/audio/speech", "/v1/audio/transcriptions",
            "/v1/audio/translations", "/v1/messages"}


def test_every_route_and_method_of_the_sdks_has_a_class_and_nothing_refused_goes_upstream(
        gateway, fake, capsys):
    raw_key, _ = gateway.create_key()
    headers = {"Authorization": f"Bearer {raw_key}"}
    routes = sdk_routes()
    assert len(routes) > 300  # the scan found the SDKs' routes
    table = []
    for sdk, method, path in routes:
        before = len(fake.requests)
        resp = requests.request(method, gateway.url + path, headers=headers,
                                json={} if method in ("POST", "PATCH", "PUT") else None)
        reached = len(fake.requests) > before
        # llimit's own errors: OpenAI's shape, or Anthropic's on Anthropic routes.
        error = resp.json().get("error") if resp.status_code >= 400 and resp.headers.get(
            "Content-Type", "").startswith("application/json") else None
        message = error.get("message", "") if isinstance(error, dict) else ""
        if resp.status_code == 403 and "is not allowed through llimit" in message:
            assert not reached, (method, path)
            assert error.get("code", "route_not_allowed") == "route_not_allowed"
            assert path in message, resp.text
            seen = "refused"
        elif resp.status_code == 404 and not reached and message.startswith("No such object"):
            seen = "lookup (not the caller's object: 404)"
        else:
            assert reached, (method, path, resp.status_code, resp.text)
            seen = "generate" if path in GENERATE else "lookup"
        table.append((sdk, method, path, seen))
    events = gateway.events()
    charged = {(e["endpoint"], e["pricing"], usd(e)) for e in events if e["pricing"] != "free"}
    # Only generation routes may cost anything; every other forwarded call is free.
    assert {endpoint for endpoint, _, _ in charged} <= {p[4:] for p in GENERATE}
    with capsys.disabled():
        print(f"\n{len(table)} SDK routes:")
        for row in table:
            print("  %-9s %-6s %-70s %s" % row)
        print("charged rows:", sorted(charged, key=str))
    classes = {(method, path): seen for _, method, path, seen in table}
    # The ones the issue names, by class.
    for route in (("POST", "/v1/realtime/client_secrets"), ("POST", "/v1/realtime/sessions"),
                  ("POST", "/v1/realtime/transcription_sessions"), ("POST", "/v1/batches"),
                  ("POST", "/v1/fine_tuning/jobs"), ("POST", "/v1/messages/batches"),
                  ("GET", "/v1/threads/obj_x1/runs/obj_x1"), ("POST", "/v1/uploads")):
        assert classes[route] == "refused", route
    for route in (("GET", "/v1/responses/obj_x1"), ("GET", "/v1/chat/completions/obj_x1"),
                  ("GET", "/v1/batches/obj_x1"), ("GET", "/v1/files/obj_x1/content"),
                  ("DELETE", "/v1/files/obj_x1"), ("GET", "/v1/vector_stores/obj_x1"),
                  ("GET", "/v1/messages/batches/obj_x1")):
        assert classes[route].startswith("lookup (not the caller's"), route
    for route in (("GET", "/v1/models"), ("GET", "/v1/files"), ("GET", "/v1/batches"),
                  ("POST", "/v1/messages/count_tokens")):
        assert classes[route] == "lookup", route
    for path in GENERATE:
        assert classes.get(("POST", path), "generate") == "generate", path


def test_a_background_response_and_a_fine_tuning_job_are_refused_without_allow_async(
        gateway, fake, make_llimit):
    raw_key, _ = gateway.create_key()
    api = client(gateway, raw_key)
    with pytest.raises(openai.PermissionDeniedError) as refusal:
        api.responses.create(model="gpt-4o", input="Hi", background=True)
    assert refusal.value.code == "route_not_allowed"
    assert "allow_async" in refusal.value.message and "POST /v1/responses" in \
        refusal.value.message
    with pytest.raises(openai.PermissionDeniedError) as refusal:
        api.batches.create(input_file_id="file-x", endpoint="/v1/chat/completions",
                           completion_window="24h")
    assert "allow_async" in refusal.value.message
    # Fine-tuning has no training price: refused even where async jobs are allowed.
    jobs_key, _ = gateway.create_key(project=async_project(gateway, fake))
    with pytest.raises(openai.PermissionDeniedError) as refusal:
        client(gateway, jobs_key).fine_tuning.jobs.create(model="gpt-4o-mini",
                                                          training_file="file-x")
    assert "fine-tuning" in refusal.value.message
    # Credentials usable without llimit are never minted.
    resp = requests.post(gateway.url + "/v1/realtime/client_secrets", json={},
                         headers={"Authorization": f"Bearer {jobs_key}"})
    assert "credential" in refused(resp)
    assert fake.requests == []
    assert gateway.events() == []


@sqlite_only  # input checks: no storage
def test_a_websocket_upgrade_is_a_clear_501(gateway, fake):
    raw_key, _ = gateway.create_key()
    resp = requests.get(gateway.url + "/v1/realtime?model=gpt-realtime", headers={
        "Authorization": f"Bearer {raw_key}", "Connection": "Upgrade", "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert refused(resp, 501, "websocket_not_supported")
    assert fake.requests == []


# --- 2. usage and model from the parsed answer ----------------------------------------------

def test_a_large_answer_is_metered_from_its_parsed_usage_not_text_the_client_echoed(
        gateway, fake):
    raw_key, _ = gateway.create_key()
    api = client(gateway, raw_key)
    padding = "x" * 80_000  # echoed back: the answer is over 64 KiB
    for metadata in ({"usage": "{}"}, {"model": "gpt-4.1-nano"}):
        reply = api.responses.create(model="o3-pro", input="Hi", instructions=padding,
                                     metadata=metadata)
        assert reply.metadata == metadata and reply.usage.input_tokens == P
    events = gateway.events()
    # o3-pro: $20 in, $80 out per 1M tokens; 11 in + 7 out.
    expected = (11 * 20.0 + 7 * 80.0) / 1e6
    assert [(e["model"], e["pricing"], e["prompt_tokens"], e["completion_tokens"])
            for e in events] == [("o3-pro", "priced", P, C)] * 2
    assert [usd(e) for e in events] == [pytest.approx(expected)] * 2


# --- 3. look-ups are free, polls never charge again -----------------------------------------

def test_lookups_are_never_charged_and_never_look_unpriced(gateway, fake, capsys):
    raw_key, key_id = gateway.create_key(user="alice")
    api = client(gateway, raw_key)
    reply = api.responses.create(model="gpt-4o", input="Hi")
    for _ in range(6):
        assert api.responses.retrieve(reply.id).usage.output_tokens == C
    assert [m.id for m in api.models.list()]
    assert api.models.retrieve("gpt-4o").id == "gpt-4o"
    fake.behaviour.update(status=401)  # an upstream refusal costs nothing either
    with pytest.raises(openai.AuthenticationError):
        api.chat.completions.create(**CHAT)
    fake.behaviour.clear()
    events = gateway.events()
    assert [e["pricing"] for e in events] == ["priced"] + ["free"] * 9
    assert sum(e["cost_nusd"] for e in events) == round((P * 2.5 + C * 10.0) * 1000)
    assert all(e["cost_nusd"] == 0 and e["prompt_tokens"] == 0 for e in events[1:])
    # Nothing is "missing a price": the admin API, the usage report and the CLI agree.
    assert gateway.admin.get(gateway.url + "/admin/pricing").json()["missing"] == []
    usage = gateway.admin.get(gateway.url + "/admin/usage?group_by=user").json()
    assert usage["totals"].get("unpriced_requests", 0) == 0
    # Look-ups count toward no limit: alice's running total holds the one charged call.
    limit = gateway.admin.post(gateway.url + "/admin/limits", json={
        "scope": "key", "target": key_id, "metric": "requests", "window": "day",
        "amount": 100}).json()
    used = gateway.admin.get(gateway.url + f"/admin/limits/{limit['id']}").json()["used"]
    assert used == 2  # the response and the upstream's 401


def test_anthropic_count_tokens_and_models_are_free(gateway, fake):
    raw_key, _ = anthropic_key(gateway, fake)
    api = anthropic.Anthropic(base_url=gateway.url, api_key=raw_key, max_retries=0)
    counted = api.messages.count_tokens(model="claude-sonnet-4-5",
                                        messages=[{"role": "user", "content": "Hi"}])
    assert counted.input_tokens == P
    assert [m.id for m in api.models.list()]
    assert [e["pricing"] for e in gateway.events()] == ["free", "free"]
    assert gateway.admin.get(gateway.url + "/admin/pricing").json()["missing"] == []


# --- 4. objects belong to whoever made them ----------------------------------------------------

def test_objects_are_their_creators_and_lists_show_only_ones_own(gateway, fake, make_llimit):
    alice_key, _ = gateway.create_key(user="alice")
    bob_key, _ = gateway.create_key(user="bob")
    project_key, _ = gateway.create_key(user=None)
    alice, bob = client(gateway, alice_key), client(gateway, bob_key)
    file = alice.files.create(file=("notes.jsonl", b'{"a": 1}\n'), purpose="batch")
    response = alice.responses.create(model="gpt-4o", input="Hi")
    completion = alice.chat.completions.create(**CHAT, store=True)
    store = alice.vector_stores.create(name="mine")
    bobs_file = bob.files.create(file=("b.jsonl", b'{"b": 2}\n'), purpose="batch")
    keys_file = client(gateway, project_key).files.create(file=("k.jsonl", b"{}\n"),
                                                          purpose="batch")
    fake_before = len(fake.requests)
    for attempt in (lambda: bob.files.retrieve(file.id),
                    lambda: bob.files.content(file.id),
                    lambda: bob.files.delete(file.id),
                    lambda: bob.responses.retrieve(response.id),
                    lambda: bob.responses.input_items.list(response.id),
                    lambda: bob.responses.delete(response.id),
                    lambda: bob.chat.completions.retrieve(completion.id),
                    lambda: bob.chat.completions.delete(completion.id),
                    lambda: bob.vector_stores.retrieve(store.id),
                    lambda: bob.vector_stores.delete(store.id),
                    lambda: bob.batches.cancel("batch_unknown"),
                    lambda: bob.responses.create(model="gpt-4o", input="more",
                                                 previous_response_id=response.id),
                    lambda: bob.files.retrieve(keys_file.id)):  # a project key's own file
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert len(fake.requests) == fake_before  # none of it reached the upstream
    # Lists show only one's own, although the upstream lists everybody's.
    assert [f.id for f in alice.files.list()] == [file.id]
    assert [f.id for f in bob.files.list()] == [bobs_file.id]
    assert [c.id for c in alice.chat.completions.list()] == [completion.id]
    assert list(bob.chat.completions.list()) == []
    assert [s.id for s in alice.vector_stores.list()] == [store.id]
    assert list(bob.vector_stores.list()) == []
    assert len(requests.get(fake.url + "/v1/files",
                            headers={"Authorization": "Bearer x"}).json()["data"]) == 3
    # The owner reads, follows up on and deletes her own.
    assert alice.files.content(file.id).read() == b'{"a": 1}\n'
    assert alice.responses.input_items.list(response.id).data
    follow_up = alice.responses.create(model="gpt-4o", input="more",
                                       previous_response_id=response.id)
    assert alice.chat.completions.retrieve(completion.id).id == completion.id
    assert alice.vector_stores.delete(store.id).deleted
    # Ownership lives with the usage data: a new llimit on the same database knows it.
    again = make_llimit(db_path=gateway.config.db_path)
    assert client(again, alice_key).files.retrieve(file.id).id == file.id
    assert client(again, alice_key).responses.retrieve(follow_up.id).id == follow_up.id
    with pytest.raises(openai.NotFoundError):
        client(again, bob_key).files.retrieve(file.id)


# --- 5. async jobs: allowed per project, charged once when they finish --------------------

def test_a_batch_is_charged_once_at_the_batch_price_to_its_creator(gateway, fake):
    project = async_project(gateway, fake)
    creator_key, creator_id = gateway.create_key(user="alice", project=project)
    other_key, _ = gateway.create_key(user="alice", project=project)  # alice's second key
    alice = client(gateway, creator_key)
    upload = alice.files.create(file=("in.jsonl", batch_file(*["gpt-4o-mini"] * 3)),
                                purpose="batch")
    batch = alice.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")
    assert batch.status == "validating"
    poller = client(gateway, other_key)
    assert poller.batches.retrieve(batch.id).status == "in_progress"
    # The batch finishes upstream; then eight polls at once all see it finished and
    # none charged yet (the upstream holds each answer while the others arrive).
    assert requests.get(fake.url + f"/v1/batches/{batch.id}", headers={
        "Authorization": "Bearer x"}).json()["status"] == "completed"
    fake.behaviour["delay_first"] = 0.5
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(
        poller.batches.retrieve(batch.id).status)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    fake.behaviour.clear()
    assert seen == ["completed"] * 8
    done = poller.batches.retrieve(batch.id)
    assert done.status == "completed" and done.usage.input_tokens == 3 * P
    assert [b.id for b in poller.batches.list()] == [batch.id]
    # Its results are alice's to read, nobody else's.
    assert alice.files.content(done.output_file_id).read().count(b"\n") == 3
    bob_key, _ = gateway.create_key(user="bob", project=project)
    with pytest.raises(openai.NotFoundError):
        client(gateway, bob_key).files.content(done.output_file_id)
    with pytest.raises(openai.NotFoundError):
        client(gateway, bob_key).batches.retrieve(batch.id)
    charges = [e for e in gateway.events() if e["pricing"] != "free"]
    # gpt-4o-mini: $0.15 in, $0.60 out per 1M; 33 in + 21 out; batches cost half.
    assert len(charges) == 1, charges
    (charge,) = charges
    assert (charge["key_id"], charge["user_name"], charge["project_id"], charge["model"],
            charge["endpoint"]) == (creator_id, "alice", project, "gpt-4o-mini", "batches")
    assert (charge["prompt_tokens"], charge["completion_tokens"]) == (3 * P, 3 * C)
    assert usd(charge) == pytest.approx((33 * 0.15 + 21 * 0.60) / 1e6 * 0.5)
    # Counted against the creator's limits (the key that made it, not the poller).
    limit = gateway.admin.post(gateway.url + "/admin/limits", json={
        "scope": "key", "target": creator_id, "metric": "usd", "window": "day",
        "amount": 1}).json()
    used = gateway.admin.get(gateway.url + f"/admin/limits/{limit['id']}").json()["used"]
    assert used == pytest.approx(usd(charge))


def test_a_batch_is_refused_at_creation_once_the_creators_budget_is_used_up(gateway, fake):
    project = async_project(gateway, fake)
    raw_key, key_id = gateway.create_key(user="alice", project=project)
    gateway.admin.post(gateway.url + "/admin/limits", json={
        "scope": "user", "target": "alice", "metric": "usd", "window": "day",
        "amount": 0.0001})
    alice = client(gateway, raw_key)
    upload = alice.files.create(file=("in.jsonl", batch_file("gpt-4o")), purpose="batch")
    alice.chat.completions.create(**CHAT)  # 11 x $2.5 + 7 x $10 per 1M = $0.0000975
    alice.chat.completions.create(**CHAT)  # over the $0.0001 now
    sent = len(fake.requests)
    with pytest.raises(openai.RateLimitError):
        alice.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
    assert len(fake.requests) == sent


def test_a_background_response_is_charged_once_when_it_completes(gateway, fake):
    project = async_project(gateway, fake)
    raw_key, key_id = gateway.create_key(user="carol", project=project)
    api = client(gateway, raw_key)
    queued = api.responses.create(model="gpt-4o", input="Hi", background=True)
    assert queued.status == "queued" and queued.usage is None
    with pytest.raises(openai.APIStatusError) as early:
        api.responses.delete(queued.id)  # its charge must not be lost
    assert early.value.status_code == 409
    assert api.responses.retrieve(queued.id).status == "in_progress"
    statuses = [api.responses.retrieve(queued.id).status for _ in range(4)]
    assert statuses == ["completed"] * 4
    charges = [e for e in gateway.events() if e["pricing"] != "free"]
    assert [(e["key_id"], e["model"], e["prompt_tokens"], e["completion_tokens"], usd(e))
            for e in charges] == [(key_id, "gpt-4o", P, C, pytest.approx(
                (11 * 2.5 + 7 * 10.0) / 1e6))]
    api.responses.delete(queued.id)  # settled now: its owner may delete it
    assert (fake.requests[-1].method, fake.requests[-1].path) == (
        "DELETE", f"/v1/responses/{queued.id}")


def test_an_anthropic_message_batch_is_charged_once_from_its_results(gateway, fake):
    raw_key, key_id = anthropic_key(gateway, fake, user="dan", allow_async=True)
    api = anthropic.Anthropic(base_url=gateway.url, api_key=raw_key, max_retries=0)
    params = {"model": "claude-haiku-4-5", "max_tokens": 100,
              "messages": [{"role": "user", "content": "Hi"}]}
    batch = api.messages.batches.create(requests=[
        {"custom_id": "a", "params": params}, {"custom_id": "b", "params": params}])
    assert api.messages.batches.retrieve(batch.id).processing_status == "ended"
    for _ in range(2):  # the results, twice: charged once
        results = requests.get(gateway.url + f"/v1/messages/batches/{batch.id}/results",
                               headers={"x-api-key": raw_key})
        assert results.status_code == 200 and results.text.count("\n") == 2
    charges = [e for e in gateway.events() if e["pricing"] != "free"]
    # claude-haiku-4-5: $1 in, $5 out per 1M; 2 x (11 in + 7 out); batches cost half.
    assert [(e["key_id"], e["model"], e["prompt_tokens"], e["completion_tokens"], usd(e))
            for e in charges] == [(key_id, "claude-haiku-4-5", 2 * P, 2 * C,
                                   pytest.approx((22 * 1.0 + 14 * 5.0) / 1e6 * 0.5))]


# --- 7. the model allow-list covers every model the upstream acts on ------------------------

@sqlite_only  # input checks: no storage
def test_a_deployment_in_the_url_cannot_smuggle_another_model_in_the_body(gateway, fake):
    raw_key, _ = gateway.create_key(models=["gpt-4o-mini"])
    headers = {"Authorization": f"Bearer {raw_key}"}
    resp = requests.post(gateway.url + "/openai/deployments/gpt-4o-mini/chat/completions",
                         json={**CHAT, "model": "o3-pro"}, headers=headers)
    assert refused(resp, 403, "model_not_allowed")
    assert fake.requests == []
    resp = requests.post(gateway.url + "/openai/deployments/gpt-4o-mini/chat/completions",
                         json={"messages": CHAT["messages"]}, headers=headers)
    assert resp.status_code == 200, resp.text
    assert fake.requests[-1].json["model"] == "gpt-4o-mini"
    (event,) = gateway.events()
    assert event["model"] == "gpt-4o-mini"


# --- 8. a project's own key only goes to its own URL ---------------------------------------

def test_a_project_key_without_its_url_is_refused_and_never_sent_to_the_default(
        gateway, fake):
    resp = gateway.admin.post(gateway.url + "/admin/projects",
                              json={"id": "lonely", "upstream_key": "sk-lonely"})
    assert resp.status_code == 400 and "upstream_url" in resp.json()["error"]["message"]
    resp = gateway.admin.patch(gateway.url + "/admin/projects/default",
                               json={"upstream_key": "sk-lonely"})
    assert resp.status_code == 400
    from tests.browser import http_sign_in
    session = http_sign_in(gateway.url, admin_token=ADMIN_TOKEN)
    page = session.get(gateway.url + "/admin")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)[1]
    resp = session.post(gateway.url + "/admin", data={
        "action": "create_project", "csrf_token": csrf, "id": "lonely",
        "upstream_key": "sk-lonely"})
    assert resp.status_code == 400 and "upstream_url" in resp.text
    # A row written before this rule: its calls fail closed, never with the default key.
    db = gateway.db()
    db.execute("insert into projects (id, name, upstream_key, created_at)"
               " values ('old', 'old', 'sk-old', '2025-01-01T00:00:00Z')")
    raw_key, _ = gateway.create_key(project="old")
    resp = requests.post(gateway.url + "/v1/chat/completions", json=CHAT,
                         headers={"Authorization": f"Bearer {raw_key}"})
    assert refused(resp, 502, "upstream_misconfigured")
    assert fake.requests == []


# --- 9. streams get include_usage whatever the Content-Type says ------------------------------

@sqlite_only  # what goes upstream: no storage
@pytest.mark.parametrize("content_type, prefix", [
    ("text/plain", b""), ("Application/JSON", b""), ("application/json", b"\n  \t"),
    ("text/plain", b" \n"), ("", b"\t")])
def test_include_usage_is_injected_whatever_the_content_type(gateway, fake, content_type,
                                                             prefix):
    raw_key, _ = gateway.create_key()
    body = prefix + json.dumps({**CHAT, "stream": True}).encode()
    resp = requests.post(gateway.url + "/v1/chat/completions", data=body, headers={
        "Authorization": f"Bearer {raw_key}", "Content-Type": content_type})
    assert resp.status_code == 200 and '"usage":{' not in resp.text  # hidden again
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}
    assert fake.requests[-1].headers["Content-Type"] == "application/json"
    (event,) = gateway.events()
    assert (event["pricing"], event["prompt_tokens"], event["completion_tokens"]) == (
        "priced", P, C)


@sqlite_only  # what goes upstream: no storage
def test_anthropic_projects_openai_compatible_streams_get_include_usage(gateway, fake):
    raw_key, _ = anthropic_key(gateway, fake)
    chunks = list(client(gateway, raw_key).chat.completions.create(
        model="claude-sonnet-4-5", messages=CHAT["messages"], stream=True))
    assert all(chunk.usage is None for chunk in chunks)
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}
    (event,) = gateway.events()
    # claude-sonnet-4-5: $3 in, $15 out per 1M.
    assert event["pricing"] == "priced" and usd(event) == pytest.approx(
        (11 * 3.0 + 7 * 15.0) / 1e6)


# --- Azure's GA v1 routes and /openai/responses ----------------------------------------------

def test_azure_responses_and_v1_routes(gateway, fake):
    resp = gateway.admin.post(gateway.url + "/admin/projects", json={
        "id": "az", "upstream_kind": "azure", "upstream_url": fake.url,
        "upstream_key": "az-secret", "api_version": "2025-04-01-preview"})
    assert resp.status_code == 201, resp.text
    raw_key, _ = gateway.create_key(project="az")
    azure = openai.AzureOpenAI(azure_endpoint=gateway.url, api_key=raw_key,
                               api_version="2025-04-01-preview", max_retries=0)
    reply = azure.responses.create(model="gpt-4o", input="Hi")
    assert reply.output_text == EXPECTED["text"]
    sent = fake.requests[-1]
    assert (sent.path, sent.query["api-version"], sent.headers["api-key"]) == (
        "/openai/responses", "2025-04-01-preview", "az-secret")
    v1 = openai.OpenAI(base_url=gateway.url + "/openai/v1/", api_key=raw_key, max_retries=0)
    assert v1.responses.create(model="gpt-4o", input="Hi").usage.output_tokens == C
    assert v1.chat.completions.create(**CHAT).usage.prompt_tokens == P
    assert [(r.path, "api-version" in r.query) for r in fake.requests[-2:]] == [
        ("/openai/v1/responses", False), ("/openai/v1/chat/completions", False)]
    assert azure.responses.retrieve(reply.id).id == reply.id  # a free look-up
    events = gateway.events()
    assert [(e["endpoint"], e["model"], e["pricing"]) for e in events] == [
        ("responses", "gpt-4o", "priced"), ("responses", "gpt-4o", "priced"),
        ("chat/completions", "gpt-4o", "priced"), (f"responses/{reply.id}", "gpt-4o", "free")]


def test_a_job_nobody_polls_is_charged_once_by_the_sweeper(make_llimit, fake):
    # The provider bills a batch whether or not anyone asks about it: llimit asks itself.
    gateway = make_llimit(async_sweep_seconds=0.2)
    project = async_project(gateway, fake)
    raw_key, key_id = gateway.create_key(user="alice", project=project)
    alice = client(gateway, raw_key)
    upload = alice.files.create(file=("in.jsonl", batch_file(*["gpt-4o-mini"] * 2)),
                                purpose="batch")
    batch = alice.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")
    background = alice.responses.create(model="gpt-4o", input="Hi", background=True)
    deadline = time.monotonic() + 30
    charges = []
    while time.monotonic() < deadline and len(charges) < 2:
        time.sleep(0.2)
        charges = [e for e in gateway.events() if e["pricing"] != "free"]
    time.sleep(1)  # more sweeps, and a client's poll: none charges again
    assert alice.batches.retrieve(batch.id).status == "completed"
    assert alice.responses.retrieve(background.id).status == "completed"
    charges = sorted((e for e in gateway.events() if e["pricing"] != "free"),
                     key=lambda e: e["endpoint"])
    assert [(e["endpoint"], e["key_id"], e["user_name"]) for e in charges] == [
        ("batches", key_id, "alice"), ("responses", key_id, "alice")], charges
    # gpt-4o-mini: $0.15 in, $0.60 out per 1M, batches at half price; gpt-4o: $2.50, $10.
    assert usd(charges[0]) == pytest.approx((2 * P * 0.15 + 2 * C * 0.60) / 1e6 * 0.5)
    assert usd(charges[1]) == pytest.approx(
        (charges[1]["prompt_tokens"] * 2.5 + charges[1]["completion_tokens"] * 10) / 1e6)
    assert charges[1]["prompt_tokens"] > 0


def test_async_work_of_an_unpriced_model_is_refused_under_a_usd_budget(gateway, fake):
    # Charged when it is done, at its model's price: with none, a USD budget would
    # count it as nothing, so it is refused before it starts, as a call would be.
    project = async_project(gateway, fake)
    raw_key, key_id = gateway.create_key(user="erin", project=project)
    budget = gateway.admin.post(gateway.url + "/admin/limits", json={
        "scope": "key", "target": key_id, "metric": "usd", "window": "day", "amount": 5})
    assert budget.status_code == 201, budget.text
    seen = len(fake.requests)
    resp = requests.post(gateway.url + "/v1/responses", json={
        "model": "acme-unpriced-1", "input": "Hi", "background": True},
        headers={"Authorization": f"Bearer {raw_key}"})
    assert "acme-unpriced-1" in refused(resp, code="model_not_priced")
    claude_key, claude_id = anthropic_key(gateway, fake, user="erin", allow_async=True)
    gateway.admin.post(gateway.url + "/admin/limits", json={
        "scope": "key", "target": claude_id, "metric": "usd", "window": "day", "amount": 5})
    priced = {"model": "claude-haiku-4-5", "max_tokens": 10,
              "messages": [{"role": "user", "content": "Hi"}]}
    resp = requests.post(gateway.url + "/v1/messages/batches", json={"requests": [
        {"custom_id": "a", "params": priced},
        {"custom_id": "b", "params": {**priced, "model": "acme-unpriced-2"}}]},
        headers={"x-api-key": claude_key, "anthropic-version": "2023-06-01"})
    assert resp.status_code == 403, resp.text
    error = resp.json()["error"]  # Anthropic's error shape, which has no code
    assert error["type"] == "permission_error" and "No price covers" in error["message"]
    assert "acme-unpriced-2" in error["message"]
    assert len(fake.requests) == seen, "nothing unpriced went upstream"
    # Priced, both start.
    api = client(gateway, raw_key)
    assert api.responses.create(model="gpt-4o", input="Hi", background=True).status == "queued"
    batch = anthropic.Anthropic(base_url=gateway.url, api_key=claude_key, max_retries=0)
    assert batch.messages.batches.create(requests=[{"custom_id": "a", "params": priced}]).id


def test_objects_named_anywhere_in_a_body_must_be_the_callers(gateway, fake):
    # A file or vector store can be named deep inside a request: in a message's file
    # part, a Responses input_file, a file_search tool. Another user's is as absent as
    # when it is named at the top, however the JSON spells the name.
    alice_key, _ = gateway.create_key(user="alice")
    bob_key, _ = gateway.create_key(user="bob")
    alice = client(gateway, alice_key)
    file = alice.files.create(file=("notes.pdf", b"%PDF-1.4 secret"), purpose="user_data")
    store = alice.vector_stores.create(name="alice's")
    bodies = [
        ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Summarise"},
            {"type": "file", "file": {"file_id": file.id}}]}]}),
        ("responses", {"model": "gpt-4o", "input": [{"role": "user", "content": [
            {"type": "input_file", "file_id": file.id},
            {"type": "input_text", "text": "Summarise"}]}]}),
        ("responses", {"model": "gpt-4o", "input": "Find it", "tools": [
            {"type": "file_search", "vector_store_ids": [store.id]}]}),
    ]
    seen = len(fake.requests)
    for path, body in bodies:
        resp = requests.post(f"{gateway.url}/v1/{path}", json=body,
                             headers={"Authorization": f"Bearer {bob_key}"})
        assert resp.status_code == 404, (path, resp.text)
        assert resp.json()["error"]["code"] == "not_found"
    escaped = json.dumps(bodies[0][1]).replace('"file_id"', '"\\u0066ile_id"')
    resp = requests.post(gateway.url + "/v1/chat/completions", data=escaped,
                         headers={"Authorization": f"Bearer {bob_key}",
                                  "Content-Type": "application/json"})
    assert resp.status_code == 404, resp.text
    assert len(fake.requests) == seen, "none of bob's reached the upstream"
    for path, body in bodies:  # the owner may
        resp = requests.post(f"{gateway.url}/v1/{path}", json=body,
                             headers={"Authorization": f"Bearer {alice_key}"})
        assert resp.status_code == 200, (path, resp.text)
    assert len(fake.requests) == seen + len(bodies)
