"""A fake LLM upstream: a real HTTP server speaking the OpenAI, Azure OpenAI
and Anthropic wire formats, with deterministic content and usage, and faults
on demand.

    from tests.fake_upstream import FakeUpstream
    with FakeUpstream() as fake:            # 127.0.0.1, a free port, a daemon thread
        fake.url                            # "http://127.0.0.1:PORT" (no /v1)
        fake.behaviour["cut_after"] = 2     # faults and figures, see BEHAVIOUR below
        ...                                 # point the proxy at fake.url (+ "/v1")
        fake.requests[-1].headers["Authorization"]   # what the proxy sent
        fake.requests[-1].reply.wait()      # "complete", "cut" or "client left"
        fake.reset()                        # forget requests and behaviour

Routes (OpenAI ones with or without the /v1 prefix):
    POST /v1/chat/completions  /v1/completions  /v1/embeddings  /v1/responses
    POST /v1/images/generations (dall-e: no usage; gpt-image-*: token usage)
         /v1/audio/speech (binary audio/mpeg, no usage)
         /v1/audio/transcriptions (multipart; usage {type: duration, seconds}, or with
         response_format verbose_json a `duration` and no usage; behaviour audio_seconds 9)
    GET  /v1/models  /v1/models/{id}
    POST /openai/deployments/{deployment}/chat/completions|completions|embeddings
         (Azure: needs ?api-version=..., else 404 "Resource not found")
    POST /openai/responses|chat/completions|embeddings (Azure, api-version needed)
    POST /openai/v1/responses|chat/completions|embeddings (Azure GA v1: no api-version)
    POST /v1/messages  /v1/messages/count_tokens
         (Anthropic: needs an anthropic-version header, else 400)
    POST /v1beta/openai/chat/completions ... (Gemini's OpenAI-compatible endpoint:
         the OpenAI routes under that prefix, answered as OpenAI answers)
    POST /v1/models/{model}:generateContent  :streamGenerateContent  :countTokens
         :embedContent  :batchEmbedContents, GET /v1/models  /v1/models/{model}, and
         the same under /v1beta/ (Gemini: needs x-goog-api-key or ?key=, else 403;
         streamGenerateContent is SSE with ?alt=sse, else one JSON array of chunks)
Objects the one upstream account keeps (ObjectStore; every caller sees all of them):
    files (multipart upload, list, get, content, delete), batches (create, list,
    get, cancel: validating -> in_progress -> completed with usage, model and an
    output file on successive GETs), stored responses (store is true unless
    false; "background": true goes queued -> in_progress -> completed on
    successive GETs; get, delete, cancel, input_items), stored chat completions
    (store: true; list, get, delete), vector stores (create, list, get, delete),
    Anthropic message batches (create, list, get: in_progress then ended,
    results as JSON lines), moderations, realtime client_secrets / sessions (a
    minted ephemeral key: what a pass-through would hand out).
A credential is required (OpenAI: Authorization; Azure: api-key or
Authorization; Anthropic: x-api-key or Authorization), else 401 in the
provider's error shape; a POST body that is not JSON is a 400.

Default figures (see EXPECTED): every completion says "Hello world!" in 3
stream pieces ("Hello", " world", "!"); usage is 11 prompt + 7 completion = 18.
OpenAI semantics: prompt_tokens includes cached_tokens, completion_tokens
includes reasoning_tokens. Anthropic: input_tokens is the behaviour's
prompt_tokens as is (uncached), beside cache_read_input_tokens (cached_tokens)
and cache_creation_input_tokens (cache_write_tokens). Responses API:
input_tokens/output_tokens with the same inclusions as OpenAI's chat usage.
The reported model is behaviour["model"] when that key is set (even ""), else
the request's "model", else (Azure, where the deployment names the model) a
dated name from AZURE_MODELS.

Stream framing: by default each of the N content pieces is one chunk that
carries choices (the first with the role, the last with finish_reason), so a
stream has exactly N choice chunks. OpenAI itself sends a separate role chunk
(content "") before and an empty-delta finish chunk after; behaviour
"separate_role_and_finish" reproduces that. The usage-only chunk
(`"choices": []`) comes only when the request asks for
stream_options.include_usage, and then every other chunk carries
`"usage": null`. Azure streams start with a chunk of prompt_filter_results
(`"choices": []`, `"model": ""`) and put content_filter_results on choices;
Azure JSON has its keys sorted, as Azure sends it. Responses API streams are
named events ending with response.completed (no [DONE]); Anthropic streams are
message_start, content_block_start, ping, content_block_delta per piece,
content_block_stop, message_delta (cumulative usage), message_stop.
Gemini: usageMetadata's promptTokenCount is prompt_tokens (cached ones included,
as cachedContentTokenCount), candidatesTokenCount is completion_tokens less
reasoning_tokens, thoughtsTokenCount the reasoning_tokens (zero counts left out,
as Google does); the reported modelVersion is behaviour["model"] or the path's
model. A Gemini stream is one `data: {...}` event per piece (CRLF-framed, no
[DONE]); every chunk carries usageMetadata, the prompt count only until the
last, which has the finishReason and the full counts.

BEHAVIOUR keys (all optional; read once per request, when it arrives):
    prompt_tokens 11, completion_tokens 7, cached_tokens 0, reasoning_tokens 0,
    cache_write_tokens 0   - the usage figures
    chunks 3               - content pieces per completion (at least 1)
    text                   - the completion text instead of "Hello world!" (streams
                             split it into `chunks` pieces, fewer if it is shorter)
    model                  - the model to report
    status, error_body     - answer every request with this status and JSON body
                             (default body: the provider's error shape)
    garbage                - 200, application/json, a body that is not JSON
                             (truncated JSON that mentions usage figures)
    delay_first            - seconds before the response headers
    stall_after_first      - seconds after the first stream event is flushed
    chunk_delay            - seconds between stream events
    cut_after              - close the connection (FIN, no terminating chunk)
                             after this many stream events
    no_usage               - no usage anywhere, JSON or stream
    ignore_stream_options  - treat stream_options as absent (no usage chunk)
    separate_role_and_finish - OpenAI's own stream framing, see above
Each stream event (an SSE event, [DONE] included) is written as its own HTTP
chunk and sent at once.
"""

import base64
import dataclasses
import functools
import http
import itertools
import json
import re
import socket
import struct
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULTS = {"prompt_tokens": 11, "completion_tokens": 7, "cached_tokens": 0,
            "reasoning_tokens": 0, "cache_write_tokens": 0, "chunks": 3}

AZURE_MODELS = {"chat/completions": "gpt-4o-2024-08-06",
                "completions": "gpt-35-turbo-instruct",
                "embeddings": "text-embedding-3-small"}

EMBEDDING_DIMENSIONS = 1536  # unless the request asks for "dimensions"

MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-3.5-turbo-instruct", "o3-mini",
          "text-embedding-3-small")


def content_pieces(chunks=DEFAULTS["chunks"]):
    """The deterministic stream pieces of a completion: "Hello", " world"..., "!"."""
    chunks = max(int(chunks), 1)
    if chunks == 1:
        return ["Hello world!"]
    return ["Hello"] + [" world"] * (chunks - 2) + ["!"]


def text_pieces(text, chunks):
    """A given completion text cut into at most `chunks` non-empty pieces, in order."""
    chunks = max(min(int(chunks), len(text)), 1)
    size = -(-len(text) // chunks)
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


EXPECTED = {**DEFAULTS, "total_tokens": 18, "text": "".join(content_pieces()),
            "pieces": content_pieces(), "azure_model": AZURE_MODELS["chat/completions"]}

FINGERPRINT = "fp_fake0000001"
OBFUSCATION = "Xq3v"  # OpenAI pads stream chunks with this field (include_obfuscation)
GARBAGE = b'{"id":"chatcmpl-garbage","usage":{"prompt_tokens":11,"completion_tok'
DONE = b"data: [DONE]\n\n"
PING = b'event: ping\ndata: {"type": "ping"}\n\n'  # sic: Anthropic's ping has a space

_SAFE = {"filtered": False, "severity": "safe"}
_NOT_DETECTED = {"filtered": False, "detected": False}
AZURE_PROMPT_FILTER = {"hate": _SAFE, "jailbreak": _NOT_DETECTED, "self_harm": _SAFE,
                       "sexual": _SAFE, "violence": _SAFE}
AZURE_COMPLETION_FILTER = {"hate": _SAFE, "protected_material_code": _NOT_DETECTED,
                           "protected_material_text": _NOT_DETECTED, "self_harm": _SAFE,
                           "sexual": _SAFE, "violence": _SAFE}
AZURE_PROMPT_FILTER_RESULTS = [{"prompt_index": 0,
                                "content_filter_results": AZURE_PROMPT_FILTER}]

ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                         403: "permission_error", 404: "not_found_error",
                         413: "request_too_large", 429: "rate_limit_error",
                         500: "api_error", 529: "overloaded_error"}

_serials = itertools.count(1)


# --- error bodies ---------------------------------------------------------------

def openai_error(status, message, type=None, code=None):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    if type is None:
        type = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


def anthropic_error(status, type=None, message=None):
    """Anthropic's error body: {"type": "error", "error": {"type", "message"}, "request_id"}."""
    type = type or ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return {"type": "error",
            "error": {"type": type, "message": message or _reason(status)},
            "request_id": f"req_fake{next(_serials):016d}"}


def azure_error(status, message=None):
    """Azure's own error body (routing, auth, quota): {"error": {"code", "message"}}."""
    return {"error": {"code": str(status), "message": message or _reason(status)}}


GEMINI_STATUSES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                   404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                   503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def gemini_error(status, message=None):
    """Google's error body: {"error": {"code", "message", "status"}}."""
    return {"error": {"code": status, "message": message or _reason(status),
                      "status": GEMINI_STATUSES.get(status, "UNKNOWN")}}


def _reason(status):
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Overloaded" if status == 529 else "Error"


# --- what was received ----------------------------------------------------------

class Headers(dict):
    """Request headers under the names as sent; lookups ignore case; repeats joined."""

    def __init__(self, pairs=()):
        merged, self._names = {}, {}
        for name, value in pairs:
            key = self._names.setdefault(name.lower(), name)
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        super().__init__(merged)

    def _key(self, name):
        return self._names.get(name.lower(), name) if isinstance(name, str) else name

    def __getitem__(self, name):
        return super().__getitem__(self._key(name))

    def __contains__(self, name):
        return super().__contains__(self._key(name))

    def get(self, name, default=None):
        return super().get(self._key(name), default)


class ReplyRecord:
    """How the answer to one request went, filled in while it is sent.

    events_sent: stream events written so far ([DONE] included, the closing
    zero-length chunk not); outcome, once the answer is over: "complete" (all of it
    written), "cut" (cut_after) or "client left" (a write failed: the client, such
    as a proxy that closed its upstream call, had gone).
    """

    def __init__(self):
        self.events_sent = 0
        self.outcome = None
        self.over = threading.Event()

    def end(self, outcome):
        self.outcome = outcome
        self.over.set()

    def wait(self, timeout=30):
        """The outcome, once the answer is over (None if it is not within `timeout`)."""
        self.over.wait(timeout)
        return self.outcome


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str       # without the query string
    query: dict     # name -> last value, decoded
    headers: Headers
    body: bytes
    json: object    # the parsed body, or None
    reply: ReplyRecord = dataclasses.field(default_factory=ReplyRecord, compare=False,
                                           repr=False)


# --- one call: the request, the behaviour and the figures derived from them --------

class Call:
    """One request (as recorded) and the behaviour it is answered with."""

    def __init__(self, request, behaviour):
        self.request = request
        self.behaviour = behaviour
        self.payload = request.json if isinstance(request.json, dict) else {}
        self.provider, self.endpoint = route(
            request.method, request.path,
            "x-goog-api-key" in request.headers or "key" in request.query)
        self.started = time.monotonic()
        self.created = int(time.time())
        self.serial = f"{next(_serials):016d}"
        self.request_id = "req_fake" + self.serial
        figures = {key: int(behaviour.get(key, default)) for key, default in DEFAULTS.items()}
        self.prompt_tokens = figures["prompt_tokens"]
        self.completion_tokens = figures["completion_tokens"]
        self.cached_tokens = figures["cached_tokens"]
        self.reasoning_tokens = figures["reasoning_tokens"]
        self.cache_write_tokens = figures["cache_write_tokens"]
        self.pieces = (text_pieces(behaviour["text"], figures["chunks"]) if "text" in behaviour
                       else content_pieces(figures["chunks"]))
        self.text = "".join(self.pieces)
        self.usage = not behaviour.get("no_usage")
        self.stream = self.payload.get("stream") is True or \
            self.endpoint == "streamGenerateContent"
        options = self.payload.get("stream_options")
        options = options if isinstance(options, dict) else {}
        if behaviour.get("ignore_stream_options"):
            options = {}
        self.include_usage = self.usage and options.get("include_usage") is True
        self.obfuscate = self.provider == "openai" and \
            options.get("include_obfuscation") is not False
        self.separate_framing = bool(behaviour.get("separate_role_and_finish"))

    @property
    def azure(self):
        return self.provider == "azure"

    @property
    def model(self):
        if "model" in self.behaviour:
            return self.behaviour["model"]
        if self.provider == "gemini":
            match = _GEMINI_ROUTE.fullmatch(self.request.path)
            return (match and match["model"]) or ""
        if self.azure and "/deployments/" in self.request.path:
            return AZURE_MODELS.get(self.endpoint, AZURE_MODELS["chat/completions"])
        model = self.payload.get("model")
        return model if isinstance(model, str) else ""

    def dumps(self, obj):
        return json.dumps(obj, separators=(",", ":"), sort_keys=self.azure).encode()

    def headers(self):
        """The provider's usual response headers."""
        if self.provider == "gemini":
            elapsed_ms = round((time.monotonic() - self.started) * 1000)
            return [("Vary", "Origin, X-Origin, Referer"),
                    ("Server", "scaffolding on HTTPServer2"),
                    ("Server-Timing", f"gfet4t7; dur={elapsed_ms}"),
                    ("X-Content-Type-Options", "nosniff")]
        if self.provider == "anthropic":
            return [("request-id", self.request_id),
                    ("anthropic-organization-id", "00000000-fake-org"),
                    ("anthropic-ratelimit-requests-limit", "4000"),
                    ("anthropic-ratelimit-requests-remaining", "3999")]
        if self.azure:
            return [("apim-request-id", self.serial), ("x-request-id", self.request_id),
                    ("x-ms-region", "East US"), ("x-ratelimit-remaining-requests", "99"),
                    ("x-ratelimit-remaining-tokens", "99989")]
        elapsed_ms = round((time.monotonic() - self.started) * 1000)
        return [("x-request-id", self.request_id), ("openai-organization", "user-fake"),
                ("openai-processing-ms", str(elapsed_ms)), ("openai-version", "2020-10-01"),
                ("x-ratelimit-limit-requests", "10000"),
                ("x-ratelimit-remaining-requests", "9999"),
                ("x-ratelimit-limit-tokens", "30000000"),
                ("x-ratelimit-remaining-tokens", "29999989"),
                ("x-ratelimit-reset-requests", "6ms"), ("x-ratelimit-reset-tokens", "0s")]

    def error_body(self, status, message=None):
        if self.provider == "gemini":
            return gemini_error(status, message)
        if self.provider == "anthropic":
            return anthropic_error(status, message=message)
        if self.azure:
            return azure_error(status, message)
        return openai_error(status, message or _reason(status))


def route(method, path, gemini_credential=False):
    """(provider, endpoint) for a request; the endpoint is None for an unknown route.

    GET /v1/models is OpenAI's unless the caller sent Gemini's credential.
    """
    match = _GEMINI_ROUTE.fullmatch(path)
    if match and (match["method"] or gemini_credential or path.startswith("/v1beta/")):
        if match["method"] is None:
            return "gemini", "models" if method == "GET" else None
        return "gemini", match["method"] if method == "POST" else None
    for route_method, provider, pattern in _ROUTES:
        match = pattern.fullmatch(path)
        if match and method == route_method:
            return provider, match["endpoint"]
    match = _OBJECT_ROUTE.fullmatch(path)
    if match:
        endpoint = match["endpoint"]
        provider = ("anthropic" if endpoint.startswith("messages/") else
                    "azure" if path.startswith("/openai/") else "openai")
        return provider, endpoint
    if path.startswith("/openai/"):
        return "azure", None
    return ("anthropic" if "/messages" in path else "openai"), None


_ROUTES = (
    ("POST", "azure", re.compile(r"/openai/deployments/[^/]+/"
                                 r"(?P<endpoint>chat/completions|completions|embeddings)")),
    ("POST", "anthropic", re.compile(r"(?:/v1)?/(?P<endpoint>messages(?:/count_tokens)?)")),
    ("POST", "openai", re.compile(r"(?:/v1|/v1beta/openai)?/(?P<endpoint>chat/completions"
                                  r"|completions|embeddings|responses|images/generations"
                                  r"|audio/speech|audio/transcriptions)")),
    ("GET", "openai", re.compile(r"(?:/v1|/v1beta/openai)?/(?P<endpoint>models(?:/.+)?)")),
    ("POST", "azure", re.compile(r"/openai(?:/v1)?/(?P<endpoint>chat/completions|responses"
                                 r"|embeddings)")),
)
_GEMINI_ROUTE = re.compile(r"/v1(?:beta)?/models(?:/(?P<model>[^/:]+)(?::(?P<method>"
                           r"generateContent|streamGenerateContent|countTokens|embedContent"
                           r"|batchEmbedContents))?)?")
_OBJECT_ROUTE = re.compile(r"(?:/openai)?(?:/v1)?/(?P<endpoint>(?:files|batches|vector_stores"
                           r"|responses|chat/completions|messages/batches|realtime"
                           r"|moderations)(?:/.*)?)")


# --- usage objects --------------------------------------------------------------

def chat_usage(call):
    return {"prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
            "total_tokens": call.prompt_tokens + call.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": call.cached_tokens, "audio_tokens": 0,
                                      **openai_cache_writes(call)},
            "completion_tokens_details": {"reasoning_tokens": call.reasoning_tokens,
                                          "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0}}


def openai_cache_writes(call):
    # Only the models that bill cache writes report them (cache_write_tokens set).
    return {"cache_write_tokens": call.cache_write_tokens} if call.cache_write_tokens else {}


def completion_usage(call):
    return {"prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
            "total_tokens": call.prompt_tokens + call.completion_tokens}


def responses_usage(call):
    return {"input_tokens": call.prompt_tokens,
            "input_tokens_details": {"cached_tokens": call.cached_tokens,
                                     **openai_cache_writes(call)},
            "output_tokens": call.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": call.reasoning_tokens},
            "total_tokens": call.prompt_tokens + call.completion_tokens}


def anthropic_usage(call, output_tokens):
    return {"input_tokens": call.prompt_tokens,
            "cache_creation_input_tokens": call.cache_write_tokens,
            "cache_read_input_tokens": call.cached_tokens,
            "cache_creation": {"ephemeral_5m_input_tokens": call.cache_write_tokens,
                               "ephemeral_1h_input_tokens": 0},
            "output_tokens": output_tokens, "service_tier": "standard",
            "inference_geo": "not_available"}


# --- OpenAI and Azure: chat/completions and completions ----------------------------

def chat_body(call):
    message = {"role": "assistant", "content": call.text, "refusal": None, "annotations": []}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    body = {"id": "chatcmpl-fake" + call.serial, "object": "chat.completion",
            "created": call.created, "model": call.model, "choices": [choice]}
    _add_usage_and_azure_filters(call, body, choice, chat_usage)
    if not call.azure:
        body["service_tier"] = "default"
    body["system_fingerprint"] = FINGERPRINT
    return body


def completion_body(call):
    choice = {"text": call.text, "index": 0, "logprobs": None, "finish_reason": "stop"}
    body = {"id": "cmpl-fake" + call.serial, "object": "text_completion",
            "created": call.created, "model": call.model, "choices": [choice]}
    _add_usage_and_azure_filters(call, body, choice, completion_usage)
    return body


def _add_usage_and_azure_filters(call, body, choice, usage_of):
    """The usage (unless the call has none) and, on Azure, the content filter results."""
    if call.usage:
        body["usage"] = usage_of(call)
    if call.azure:
        choice["content_filter_results"] = AZURE_COMPLETION_FILTER
        body["prompt_filter_results"] = AZURE_PROMPT_FILTER_RESULTS


def chat_events(call):
    def choice(delta, finish_reason, has_content=True):
        return _stream_choice(call, {"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish_reason}, has_content)
    role = {"role": "assistant", "content": "", "refusal": None}
    if call.separate_framing:
        choices = [choice(role, None, False)]
        choices += [choice({"content": piece}, None) for piece in call.pieces]
        choices.append(choice({}, "stop", False))
    else:
        last = len(call.pieces) - 1
        choices = [choice({**role, "content": piece} if i == 0 else {"content": piece},
                          "stop" if i == last else None)
                   for i, piece in enumerate(call.pieces)]
    envelope = {"id": "chatcmpl-fake" + call.serial, "object": "chat.completion.chunk",
                "created": call.created, "model": call.model}
    if not call.azure:
        envelope["service_tier"] = "default"
    envelope["system_fingerprint"] = FINGERPRINT
    return _openai_stream(call, envelope, choices, chat_usage)


def completion_events(call):
    def choice(text, finish_reason, has_content=True):
        return _stream_choice(call, {"text": text, "index": 0, "logprobs": None,
                                     "finish_reason": finish_reason}, has_content)
    last = len(call.pieces) - 1
    if call.separate_framing:
        choices = [choice(piece, None) for piece in call.pieces] + [choice("", "stop", False)]
    else:
        choices = [choice(piece, "stop" if i == last else None)
                   for i, piece in enumerate(call.pieces)]
    envelope = {"id": "cmpl-fake" + call.serial, "object": "text_completion",
                "created": call.created, "model": call.model}
    return _openai_stream(call, envelope, choices, completion_usage)


def _stream_choice(call, choice, has_content):
    if call.azure:
        choice["content_filter_results"] = AZURE_COMPLETION_FILTER if has_content else {}
    return choice


def _openai_stream(call, envelope, choices, usage):
    """data: events for the choices, the usage chunk if asked for, and [DONE]."""
    chunks = [{**envelope, "choices": [choice]} for choice in choices]
    if call.include_usage:
        for chunk in chunks:
            chunk["usage"] = None
        chunks.append({**envelope, "choices": [], "usage": usage(call)})
    if call.obfuscate:
        for chunk in chunks:
            chunk["obfuscation"] = OBFUSCATION
    if call.azure:
        chunks.insert(0, {"choices": [], "created": 0, "id": "", "model": "", "object": "",
                          "prompt_filter_results": AZURE_PROMPT_FILTER_RESULTS})
    return [b"data: " + call.dumps(chunk) + b"\n\n" for chunk in chunks] + [DONE]


# --- OpenAI: embeddings, models, responses -----------------------------------------

def embedding_body(call):
    inputs = call.payload.get("input")
    count = len(inputs) if isinstance(inputs, list) and inputs and \
        not isinstance(inputs[0], int) else 1
    dimensions = call.payload.get("dimensions")
    if not isinstance(dimensions, int) or not 0 < dimensions <= 4096:
        dimensions = EMBEDDING_DIMENSIONS
    vector = _embedding(dimensions, call.payload.get("encoding_format") == "base64")
    body = {"object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": vector}
                     for i in range(count)],
            "model": call.model}
    if call.usage:
        body["usage"] = {"prompt_tokens": call.prompt_tokens,
                         "total_tokens": call.prompt_tokens}
    return body


@functools.lru_cache(maxsize=16)
def _embedding(dimensions, as_base64):
    """A fixed vector of exactly representable floats; base64 is little-endian float32."""
    vector = [(i % 8) / 8 - 0.5 for i in range(dimensions)]
    if as_base64:
        return base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
    return vector


def models_body(call):
    def model(model_id):
        return {"id": model_id, "object": "model", "created": 1715367049,
                "owned_by": "system"}
    _, _, model_id = call.endpoint.partition("/")
    if model_id:
        return model(urllib.parse.unquote(model_id))
    return {"object": "list", "data": [model(model_id) for model_id in MODELS]}


def responses_body(call, status="completed", final=True):
    """A Response object; in progress (no output, usage null) unless final."""
    body = {"id": "resp_fake" + call.serial, "object": "response",
            "created_at": call.created, "status": status, "background": False,
            "error": None, "incomplete_details": None, "instructions": None,
            "max_output_tokens": None, "max_tool_calls": None, "model": call.model,
            "output": [_responses_message(call, call.text)] if final else [],
            "parallel_tool_calls": True, "previous_response_id": None,
            "prompt_cache_key": None, "reasoning": {"effort": None, "summary": None},
            "safety_identifier": None, "service_tier": "default", "store": True,
            "temperature": 1.0, "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto", "tools": [], "top_logprobs": 0, "top_p": 1.0,
            "truncation": "disabled"}
    if call.usage:
        body["usage"] = responses_usage(call) if final else None
    if isinstance(call.payload.get("instructions"), str):
        body["instructions"] = call.payload["instructions"]  # echoed, as OpenAI does
    body.update(user=None, metadata=call.payload.get("metadata") or {})
    return body


def _responses_message(call, text, status="completed"):
    content = [_output_text(text)] if text is not None else []
    return {"id": "msg_fake" + call.serial, "type": "message", "status": status,
            "content": content, "role": "assistant"}


def _output_text(text):
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def responses_events(call):
    item_id = "msg_fake" + call.serial
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    started = responses_body(call, "in_progress", final=False)
    events = [("response.created", {"response": started}),
              ("response.in_progress", {"response": started}),
              ("response.output_item.added",
               {"output_index": 0, "item": _responses_message(call, None, "in_progress")}),
              ("response.content_part.added", {**where, "part": _output_text("")})]
    events += [("response.output_text.delta",
                {**where, "delta": piece, "logprobs": [], "obfuscation": OBFUSCATION})
               for piece in call.pieces]
    events += [("response.output_text.done", {**where, "text": call.text, "logprobs": []}),
               ("response.content_part.done", {**where, "part": _output_text(call.text)}),
               ("response.output_item.done",
                {"output_index": 0, "item": _responses_message(call, call.text)}),
               ("response.completed", {"response": responses_body(call)})]
    return [_named_event(call, name, {"type": name, "sequence_number": number, **fields})
            for number, (name, fields) in enumerate(events)]


def _named_event(call, name, data):
    return b"event: " + name.encode() + b"\ndata: " + call.dumps(data) + b"\n\n"


# --- Anthropic --------------------------------------------------------------------

def message_body(call, content=None, stop_reason="end_turn", output_tokens=None):
    body = {"model": call.model, "id": "msg_fake" + call.serial, "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": call.text}] if content is None else content,
            "stop_reason": stop_reason, "stop_sequence": None, "stop_details": None}
    if call.usage:
        body["usage"] = anthropic_usage(call, call.completion_tokens
                                        if output_tokens is None else output_tokens)
    return body


def message_events(call):
    delta = {"stop_reason": "end_turn", "stop_sequence": None, "stop_details": None}
    message_delta = {"type": "message_delta", "delta": delta}
    if call.usage:
        message_delta["usage"] = {"input_tokens": call.prompt_tokens,
                                  "cache_creation_input_tokens": call.cache_write_tokens,
                                  "cache_read_input_tokens": call.cached_tokens,
                                  "output_tokens": call.completion_tokens}
    start = message_body(call, content=[], stop_reason=None, output_tokens=1)
    events = [_named_event(call, "message_start", {"type": "message_start", "message": start}),
              _named_event(call, "content_block_start",
                           {"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}),
              PING]
    events += [_named_event(call, "content_block_delta",
                            {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": piece}})
               for piece in call.pieces]
    events += [_named_event(call, "content_block_stop",
                            {"type": "content_block_stop", "index": 0}),
               _named_event(call, "message_delta", message_delta),
               _named_event(call, "message_stop", {"type": "message_stop"})]
    return events


def count_tokens_body(call):
    return {"input_tokens": call.prompt_tokens}


# --- Gemini ----------------------------------------------------------------------

def gemini_usage(call, final=True):
    """usageMetadata as Google sends it: zero counts left out; until the last
    chunk of a stream, only the prompt's."""
    prompt_details = [{"modality": "TEXT", "tokenCount": call.prompt_tokens}]
    if not final:
        return {"promptTokenCount": call.prompt_tokens, "totalTokenCount": call.prompt_tokens,
                "promptTokensDetails": prompt_details}
    usage = {"promptTokenCount": call.prompt_tokens,
             "candidatesTokenCount": call.completion_tokens - call.reasoning_tokens,
             "totalTokenCount": call.prompt_tokens + call.completion_tokens,
             "promptTokensDetails": prompt_details}
    if call.cached_tokens:
        usage["cachedContentTokenCount"] = call.cached_tokens
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": call.cached_tokens}]
    if call.reasoning_tokens:
        usage["thoughtsTokenCount"] = call.reasoning_tokens
    return usage


def _gemini_chunk(call, text, finish, usage):
    candidate = {"content": {"parts": [{"text": text}], "role": "model"}}
    if finish:
        candidate["finishReason"] = "STOP"
    candidate["index"] = 0
    chunk = {"candidates": [candidate]}
    if usage is not None:
        chunk["usageMetadata"] = usage
    chunk["modelVersion"] = call.model
    chunk["responseId"] = "fakeResp" + call.serial
    return chunk


def gemini_body(call):
    return _gemini_chunk(call, call.text, True, gemini_usage(call) if call.usage else None)


def gemini_chunks(call):
    last = len(call.pieces) - 1
    return [_gemini_chunk(call, piece, i == last,
                          gemini_usage(call, i == last) if call.usage else None)
            for i, piece in enumerate(call.pieces)]


def gemini_events(call):
    # Google frames its SSE events with CRLF and sends no [DONE].
    return [b"data: " + call.dumps(chunk) + b"\r\n\r\n" for chunk in gemini_chunks(call)]


def gemini_count_tokens_body(call):
    return {"totalTokens": call.prompt_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": call.prompt_tokens}]}


def gemini_embed_body(call):
    values = [round(0.001 * (i % 97) - 0.04, 6) for i in range(GEMINI_EMBEDDING_DIMENSIONS)]
    requests = call.payload.get("requests")
    count = len(requests) if isinstance(requests, list) else 1
    body = ({"embeddings": [{"values": values} for _ in range(count)]}
            if call.endpoint == "batchEmbedContents" else {"embedding": {"values": values}})
    if call.usage:
        body["usageMetadata"] = {"promptTokenCount": call.prompt_tokens,
                                 "totalTokenCount": call.prompt_tokens}
    return body


GEMINI_MODELS = ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-embedding-001")
GEMINI_EMBEDDING_DIMENSIONS = 768


def gemini_models_body(call):
    def model(name):
        return {"name": "models/" + name, "version": "001", "displayName": name,
                "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
                "supportedGenerationMethods": ["generateContent", "countTokens"]}
    match = _GEMINI_ROUTE.fullmatch(call.request.path)
    if match["model"]:
        return model(match["model"])
    return {"models": [model(name) for name in GEMINI_MODELS]}


def gemini_reply(call):
    """The Reply to a well-formed Gemini call."""
    if call.endpoint == "models":
        return json_reply(call, 200, gemini_models_body(call))
    if call.endpoint == "countTokens":
        return json_reply(call, 200, gemini_count_tokens_body(call))
    if call.endpoint in ("embedContent", "batchEmbedContents"):
        return json_reply(call, 200, gemini_embed_body(call))
    if call.endpoint == "streamGenerateContent" and call.request.query.get("alt") == "sse":
        return Reply(200, [("Content-Type", "text/event-stream"),
                           ("Content-Disposition", "attachment"), *call.headers()],
                     events=gemini_events(call))
    if call.endpoint == "streamGenerateContent":
        return json_reply(call, 200, gemini_chunks(call))
    return json_reply(call, 200, gemini_body(call))


# endpoint -> (JSON body builder, stream events builder or None)
def image_body(call):
    """images/generations: dall-e answers carry no usage; gpt-image-* answers count tokens."""
    n = call.payload.get("n") if isinstance(call.payload.get("n"), int) else 1
    body = {"created": call.created,
            "data": [{"url": f"https://images.fake.example/{call.serial}-{i}.png",
                      "revised_prompt": "A fake picture."} for i in range(n)]}
    if call.model.startswith("gpt-image"):
        body["usage"] = {"input_tokens": call.prompt_tokens, "output_tokens":
                         call.completion_tokens, "total_tokens":
                         call.prompt_tokens + call.completion_tokens,
                         "input_tokens_details": {"text_tokens": call.prompt_tokens,
                                                  "image_tokens": 0}}
    return body


def transcription_body(call):
    """audio/transcriptions (multipart in): whisper-1 bills by duration."""
    seconds = float(call.behaviour.get("audio_seconds", 9))
    body = {"text": call.text, "usage": {"type": "duration", "seconds": int(seconds + 0.999)}}
    if b'name="response_format"\r\n\r\nverbose_json' in call.request.body:
        body = {"task": "transcribe", "language": "english", "duration": seconds,
                "text": call.text, "segments": []}  # verbose_json: duration, no usage
    return body


ENDPOINTS = {
    "chat/completions": (chat_body, chat_events),
    "completions": (completion_body, completion_events),
    "embeddings": (embedding_body, None),
    "responses": (responses_body, responses_events),
    "messages": (message_body, message_events),
    "messages/count_tokens": (count_tokens_body, None),
    "images/generations": (image_body, None),
    "audio/transcriptions": (transcription_body, None),
}


# --- answering a request ------------------------------------------------------------

@dataclasses.dataclass
class Reply:
    status: int
    headers: list
    body: bytes = b""
    events: list = None  # a stream when set: one SSE event per HTTP chunk


def json_reply(call, status, obj):
    return Reply(status, [("Content-Type", "application/json"), *call.headers()],
                 call.dumps(obj))


def respond(call):
    """The Reply to a call: a set fault, a protocol error, or the endpoint's answer."""
    behaviour = call.behaviour
    if "status" in behaviour:
        error_body = behaviour.get("error_body")
        return json_reply(call, behaviour["status"], error_body if error_body is not None
                          else call.error_body(behaviour["status"]))
    if behaviour.get("garbage"):
        return Reply(200, [("Content-Type", "application/json"), *call.headers()], GARBAGE)
    problem = _protocol_error(call)
    if problem:
        return json_reply(call, *problem)
    if call.provider == "gemini":
        return gemini_reply(call)
    if call.endpoint.startswith("models"):
        return json_reply(call, 200, models_body(call))
    if call.endpoint == "audio/speech":  # binary audio, no usage
        return Reply(200, [("Content-Type", "audio/mpeg"), *call.headers()],
                     b"ID3\x04fake-mp3" + b"\x00" * 1000)
    if call.endpoint not in ENDPOINTS or call.request.method != "POST":
        return call.store.answer(call)
    whole, stream = ENDPOINTS[call.endpoint]
    if call.endpoint == "responses" and call.payload.get("background") is True:
        return call.store.answer(call)
    if call.stream and stream:
        return Reply(200, [("Content-Type", "text/event-stream; charset=utf-8"),
                           ("Cache-Control", "no-cache"), *call.headers()],
                     events=stream(call))
    body = whole(call)
    if call.endpoint == "responses" and call.payload.get("store") is not False \
            or call.endpoint == "chat/completions" and call.payload.get("store") is True:
        call.store.keep(call.endpoint, body)
    return json_reply(call, 200, body)


def _protocol_error(call):
    """(status, body) when the provider would refuse the request, else None."""
    method, path, headers = call.request.method, call.request.path, call.request.headers
    if call.endpoint is None:
        if call.provider == "gemini":
            return 404, gemini_error(404, f"Method not found: {method} {path}")
        if call.azure:
            return 404, azure_error(404, "Resource not found")
        if call.provider == "anthropic":
            return 404, anthropic_error(404, message="Not Found")
        return 404, openai_error(404, f"Invalid URL ({method} {path})")
    if call.provider == "gemini":
        if "x-goog-api-key" not in headers and "key" not in call.request.query:
            return 403, gemini_error(403, "Method doesn't allow unregistered callers (callers"
                                          " without established identity). Please use API Key"
                                          " or other form of API consumer identity to call"
                                          " this API.")
        if method == "POST" and call.request.json is None:
            return 400, gemini_error(400, "Invalid JSON payload received.")
        return None
    if call.provider == "anthropic":
        if "x-api-key" not in headers and "authorization" not in headers:
            return 401, anthropic_error(401, message="x-api-key header is required")
        if "anthropic-version" not in headers:
            return 400, anthropic_error(400, message="anthropic-version: header is required")
    elif call.azure:
        if "api-key" not in headers and "authorization" not in headers:
            return 401, azure_error(401, "Access denied due to invalid subscription key or "
                                         "wrong API endpoint. Make sure to provide a valid "
                                         "key for an active subscription and use a correct "
                                         "regional API endpoint for your resource.")
        if "api-version" not in call.request.query and not path.startswith("/openai/v1/"):
            return 404, azure_error(404, "Resource not found")
    elif "authorization" not in headers and not (
            "x-api-key" in headers and "anthropic-version" in headers):  # Anthropic's
        # OpenAI-compatible endpoint takes its own credential as well
        return 401, openai_error(401, "You didn't provide an API key. You need to provide "
                                      "your API key in an Authorization header using Bearer "
                                      "auth (i.e. Authorization: Bearer YOUR_KEY).")
    multipart = headers.get("content-type", "").startswith("multipart/form-data")
    if method == "POST" and call.request.json is None and call.endpoint != "files" \
            and not multipart:
        if call.provider == "anthropic":
            return 400, anthropic_error(400, message="There was an error parsing the body "
                                                     "of your request as JSON")
        return 400, openai_error(400, "We could not parse the JSON body of your request. "
                                      "The OpenAI API expects a JSON payload.")
    return None


# --- what the upstream account keeps ----------------------------------------------

BATCH_MODEL = "gpt-4o-mini"  # a batch whose input file names no model


class NoSuchObject(Exception):
    """A call names an object the upstream account does not have: a 404."""

    def __init__(self, object_id):
        super().__init__(object_id)
        self.object_id = object_id


class ObjectStore:
    """Files, batches, stored responses and completions, vector stores and
    Anthropic message batches of the one upstream account, in the providers'
    documented shapes. Every caller sees every object: the upstream has one
    account, which is why llimit must keep whose each one is."""

    def __init__(self):
        self.lock = threading.Lock()
        self.objects = {}    # id -> the object as the provider shows it
        self.finals = {}     # id of an async object -> its finished form
        self.contents = {}   # file id -> bytes
        self.polls = {}      # id -> GETs so far

    def keep(self, endpoint, body):
        """Store a response or chat completion the upstream answered (store)."""
        with self.lock:
            self.objects[body["id"]] = dict(body, _kind=endpoint)

    def answer(self, call):
        method, parts = call.request.method, call.endpoint.split("/")
        if call.endpoint.startswith("chat/completions"):
            parts = ["chat/completions", *parts[2:]]
        if call.endpoint.startswith("messages/batches"):
            parts = ["messages/batches", *parts[2:]]
        kind, rest = parts[0], parts[1:]
        handler = getattr(self, f"_{kind.replace('/', '_')}", None)
        with self.lock:
            try:
                reply = handler(call, method, rest) if handler else None
            except NoSuchObject as missing:
                reply = 404, call.error_body(404, f"No such object: {missing.object_id}")
        if reply is None:
            return json_reply(call, 404, call.error_body(404, f"Invalid URL ({method} "
                                                               f"{call.request.path})"))
        if isinstance(reply, Reply):
            return reply
        status, body = reply
        return json_reply(call, status, body)

    # helpers
    def _list(self, kind, anthropic=False):
        data = [self._shown(o) for o in self.objects.values() if o["_kind"] == kind]
        data.sort(key=lambda o: o.get("created_at") or 0, reverse=True)
        body = {"data": data, "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}
        return 200, body if anthropic else {"object": "list", **body}

    @staticmethod
    def _shown(obj):
        return {k: v for k, v in obj.items() if not k.startswith("_")}

    def _get(self, kind, object_id):
        """The stored object of this kind, or NoSuchObject (answered with a 404)."""
        obj = self.objects.get(object_id)
        if obj is None or obj["_kind"] != kind:
            raise NoSuchObject(object_id)
        return obj

    def _read_or_delete(self, method, rest, obj, deleted=None):
        """GET of one object, or its DELETE answered as an object named `deleted` (kinds
        that cannot be deleted give none); None for any other call on it."""
        if method == "GET" and len(rest) == 1:
            return 200, self._shown(obj)
        if method == "DELETE" and len(rest) == 1 and deleted:
            del self.objects[obj["id"]]
            return 200, {"id": obj["id"], "object": deleted, "deleted": True}
        return None

    def _poll(self, object_id):
        self.polls[object_id] = self.polls.get(object_id, 0) + 1
        return self.polls[object_id]

    # files
    def _files(self, call, method, rest):
        if method == "POST" and not rest:
            purpose, filename, content = _multipart_file(call.request)
            file_id = "file-fake" + call.serial
            self.contents[file_id] = content
            self.objects[file_id] = {"id": file_id, "object": "file", "bytes": len(content),
                                     "created_at": call.created, "expires_at": None,
                                     "filename": filename, "purpose": purpose,
                                     "status": "processed", "status_details": None,
                                     "_kind": "files"}
            return 200, self._shown(self.objects[file_id])
        if method == "GET" and not rest:
            return self._list("files")
        obj = self._get("files", rest[0])
        if method == "GET" and rest[1:] == ["content"]:
            return Reply(200, [("Content-Type", "application/octet-stream"), *call.headers()],
                         self.contents[rest[0]])
        return self._read_or_delete(method, rest, obj, deleted="file")

    # batches (OpenAI)
    def _batches(self, call, method, rest):
        if method == "POST" and not rest:
            input_id = call.payload.get("input_file_id")
            if input_id not in self.contents:
                return 400, openai_error(400, f"Invalid 'input_file_id': '{input_id}'.")
            batch_id = "batch_fake" + call.serial
            lines = [json.loads(line) for line in self.contents[input_id].splitlines()
                     if line.strip()]
            batch = {"id": batch_id, "object": "batch", "endpoint": call.payload.get("endpoint"),
                     "errors": None, "input_file_id": input_id,
                     "completion_window": call.payload.get("completion_window", "24h"),
                     "status": "validating", "output_file_id": None, "error_file_id": None,
                     "created_at": call.created, "in_progress_at": None,
                     "expires_at": call.created + 86400, "finalizing_at": None,
                     "completed_at": None, "failed_at": None, "expired_at": None,
                     "cancelling_at": None, "cancelled_at": None,
                     "request_counts": {"total": 0, "completed": 0, "failed": 0},
                     "metadata": call.payload.get("metadata"), "model": None, "usage": None,
                     "_kind": "batches"}
            self.objects[batch_id] = batch
            self.finals[batch_id] = self._finished_batch(call, batch, lines)
            return 200, self._shown(batch)
        if method == "GET" and not rest:
            return self._list("batches")
        batch = self._get("batches", rest[0])
        if method == "POST" and rest[1:] == ["cancel"]:
            batch.update(status="cancelling", cancelling_at=call.created)
            return 200, self._shown(batch)
        if method == "GET" and len(rest) == 1:
            if batch["status"] not in ("cancelling", "cancelled"):
                polls = self._poll(rest[0])
                if polls == 1:
                    batch.update(status="in_progress", in_progress_at=call.created)
                elif batch["status"] != "completed":
                    final = self.finals[rest[0]]
                    self.contents[final["output_file_id"]] = final.pop("_output")
                    self.objects[final["output_file_id"]] = final.pop("_output_file")
                    batch.update(final)
            return 200, self._shown(batch)
        return None

    def _finished_batch(self, call, batch, lines):
        n = len(lines)
        model = next((line.get("body", {}).get("model") for line in lines
                      if isinstance(line.get("body"), dict)), None) or BATCH_MODEL
        output_id = "file-fakeout" + call.serial
        output = b"".join(call.dumps({
            "id": f"batch_req_{i}", "custom_id": line.get("custom_id"),
            "response": {"status_code": 200, "request_id": f"req_{i}",
                         "body": {**chat_body(call), "model": model}},
            "error": None}) + b"\n" for i, line in enumerate(lines))
        usage = {"input_tokens": n * call.prompt_tokens,
                 "input_tokens_details": {"cached_tokens": n * call.cached_tokens},
                 "output_tokens": n * call.completion_tokens,
                 "output_tokens_details": {"reasoning_tokens": n * call.reasoning_tokens},
                 "total_tokens": n * (call.prompt_tokens + call.completion_tokens)}
        return {"status": "completed", "output_file_id": output_id,
                "completed_at": call.created + 60, "finalizing_at": call.created + 59,
                "request_counts": {"total": n, "completed": n, "failed": 0},
                "model": model, "usage": usage, "_output": output,
                "_output_file": {"id": output_id, "object": "file", "bytes": len(output),
                                 "created_at": call.created + 60, "expires_at": None,
                                 "filename": "batch_output.jsonl", "purpose": "batch_output",
                                 "status": "processed", "status_details": None,
                                 "_kind": "files"}}

    # stored and background responses
    def _responses(self, call, method, rest):
        if method == "POST" and not rest:  # background: true (others are kept by respond)
            final = responses_body(call)
            final["background"] = True
            queued = dict(responses_body(call, "queued", final=False), background=True)
            self.objects[queued["id"]] = dict(queued, _kind="responses")
            self.finals[queued["id"]] = final
            return 200, queued
        if not rest:
            return None
        response = self._get("responses", rest[0])
        if method == "GET" and len(rest) == 1:
            if response["status"] in ("queued", "in_progress"):
                if self._poll(rest[0]) == 1:
                    response["status"] = "in_progress"
                else:
                    response.update(self.finals[rest[0]])
            return 200, self._shown(response)
        if method == "GET" and rest[1:] == ["input_items"]:
            item = {"id": "msg_in" + call.serial, "type": "message", "role": "user",
                    "status": "completed", "content": [{"type": "input_text", "text": "Hi"}]}
            return 200, {"object": "list", "data": [item], "first_id": item["id"],
                         "last_id": item["id"], "has_more": False}
        if method == "POST" and rest[1:] == ["cancel"]:
            if response["background"] and response["status"] in ("queued", "in_progress"):
                response["status"] = "cancelled"
            return 200, self._shown(response)
        return self._read_or_delete(method, rest, response, deleted="response")

    # stored chat completions
    def _chat_completions(self, call, method, rest):
        if method == "GET" and not rest:
            return self._list("chat/completions")
        if not rest:
            return None
        completion = self._get("chat/completions", rest[0])
        return self._read_or_delete(method, rest, completion, deleted="chat.completion.deleted")

    # vector stores
    def _vector_stores(self, call, method, rest):
        if method == "POST" and not rest:
            store_id = "vs_fake" + call.serial
            self.objects[store_id] = {
                "id": store_id, "object": "vector_store", "created_at": call.created,
                "name": call.payload.get("name"), "usage_bytes": 0,
                "file_counts": {"in_progress": 0, "completed": 0, "failed": 0,
                                "cancelled": 0, "total": 0},
                "status": "completed", "expires_after": None, "expires_at": None,
                "last_active_at": call.created, "metadata": {}, "_kind": "vector_stores"}
            return 200, self._shown(self.objects[store_id])
        if method == "GET" and not rest:
            return self._list("vector_stores")
        store = self._get("vector_stores", rest[0])
        return self._read_or_delete(method, rest, store, deleted="vector_store.deleted")

    # Anthropic message batches
    def _messages_batches(self, call, method, rest):
        if method == "POST" and not rest:
            batch_id = "msgbatch_fake" + call.serial
            requests = call.payload.get("requests") or []
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(call.created))
            self.objects[batch_id] = {
                "id": batch_id, "type": "message_batch", "processing_status": "in_progress",
                "request_counts": {"processing": len(requests), "succeeded": 0, "errored": 0,
                                   "canceled": 0, "expired": 0},
                "ended_at": None, "created_at": now, "expires_at": now, "archived_at": None,
                "cancel_initiated_at": None, "results_url": None,
                "_kind": "messages/batches"}
            self.finals[batch_id] = b"".join(call.dumps({
                "custom_id": item.get("custom_id"),
                "result": {"type": "succeeded", "message": {
                    **message_body(call), "model": (item.get("params") or {}).get("model")}}})
                + b"\n" for item in requests)
            self.polls[batch_id] = len(requests)
            return 200, self._shown(self.objects[batch_id])
        if method == "GET" and not rest:
            return self._list("messages/batches", anthropic=True)
        batch = self._get("messages/batches", rest[0])
        if method == "GET" and len(rest) == 1:
            if batch["processing_status"] == "in_progress":
                total = self.polls[rest[0]]
                batch.update(processing_status="ended", ended_at=batch["created_at"],
                             request_counts={"processing": 0, "succeeded": total,
                                             "errored": 0, "canceled": 0, "expired": 0},
                             results_url=f"https://api.anthropic.com/v1/messages/batches/"
                                         f"{rest[0]}/results")
            return 200, self._shown(batch)
        if method == "GET" and rest[1:] == ["results"]:
            if batch["processing_status"] != "ended":
                return 400, anthropic_error(400, message="Batch is still in progress")
            return Reply(200, [("Content-Type", "application/binary"), *call.headers()],
                         self.finals[rest[0]])
        return None

    # generation routes llimit must never let through unmetered
    def _moderations(self, call, method, rest):
        if method != "POST" or rest:
            return None
        return 200, {"id": "modr-fake" + call.serial,
                     "model": call.payload.get("model") or "omni-moderation-latest",
                     "results": [{"flagged": False, "categories": {}, "category_scores": {}}]}

    def _realtime(self, call, method, rest):
        if method != "POST" or rest not in (["client_secrets"], ["sessions"]):
            return None
        return 200, {"value": "ek_fake" + call.serial, "expires_at": call.created + 600,
                     "session": {"type": "realtime", "model": call.payload.get("model")}}


def _multipart_file(request):
    """(purpose, filename, content) of a multipart/form-data file upload."""
    import email.parser
    import email.policy
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + request.headers.get("Content-Type", "").encode() + b"\r\n\r\n"
        + request.body)
    purpose, filename, content = None, None, b""
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name == "purpose":
            purpose = part.get_content().strip()
        elif name == "file":
            filename = part.get_filename()
            content = part.get_payload(decode=True)
    return purpose, filename, content


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-upstream"
    sys_version = ""

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        fake = self.server.fake
        url = urllib.parse.urlsplit(self.path)
        body = self._read_body()
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        request = RecordedRequest(
            self.command, url.path,
            dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True)),
            Headers(self.headers.items()), body, payload)
        fake._note(fake.requests, request)
        call = Call(request, dict(fake.behaviour))
        call.store = fake.store
        fake.last_completion_text = call.text
        time.sleep(call.behaviour.get("delay_first") or 0)
        reply = respond(call)
        try:
            self._send(reply, call.behaviour, request.reply)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left
            request.reply.end("client left")
            fake._note(fake.left, request)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, reply, behaviour, record):
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        if reply.events is None:
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
            record.end("complete")
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        cut_after = behaviour.get("cut_after")
        gap = behaviour.get("chunk_delay") or 0
        stall = behaviour.get("stall_after_first") or 0
        events = reply.events if cut_after is None else reply.events[:cut_after]
        for index, event in enumerate(events):
            if index and gap:
                time.sleep(gap)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            record.events_sent += 1
            if index == 0 and stall:
                time.sleep(stall)
        if cut_after is None:
            self.wfile.write(b"0\r\n\r\n")
            record.end("complete")
        else:  # die mid-stream: FIN without the terminating zero-length chunk
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            record.end("cut")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 512

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # a client that left is no error


class FakeUpstream:
    """The fake upstream, serving from a daemon thread until close().

    requests: every RecordedRequest, in arrival order, recorded before any delay.
    left: the RecordedRequests whose client closed the connection before the answer ended.
    behaviour: the dict of BEHAVIOUR keys (see the module docstring).
    last_completion_text: the completion text the latest request was answered with.
    """

    def __init__(self, host="127.0.0.1", port=0):
        self.requests = []
        self.left = []       # requests whose client (llimit) closed the connection mid-answer
        self.behaviour = {}
        self.store = ObjectStore()
        self.last_completion_text = EXPECTED["text"]
        self._lock = threading.Lock()
        self._server = _Server((host, port), _Handler)
        self._server.fake = self
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True,
                                        name="fake-upstream")
        self._thread.start()

    def _note(self, requests, request):
        """Append to `requests` (self.requests or self.left) under the lock."""
        with self._lock:
            requests.append(request)

    def reset(self):
        """Forget recorded requests and behaviour (the same list and dict are kept)."""
        with self._lock:
            self.requests.clear()
            self.behaviour.clear()

    def close(self):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
