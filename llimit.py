#!/usr/bin/env python3
"""llimit: an LLM cost gateway in one file.

llimit hands out its own API keys, forwards OpenAI-compatible, Azure OpenAI and
Anthropic calls (streaming included) to the right upstream with the real
upstream key, meters every call's tokens and cost into SQLite, and enforces
budgets, quotas and rate limits per project, user and key.

Run it with ``python llimit.py`` (the same as ``python llimit.py serve``): it
serves on 127.0.0.1:8000 with ./llimit.db. Every setting is an environment
variable ``LLIMIT_*`` with a matching flag (``python llimit.py serve --help``);
README.md documents them all and the public surface (the proxy, keys, limits, the
admin API, the pages and the CLI), with detail in docs/.

Prompts and completions pass through; they are never stored or logged.
"""

__version__ = "0.1.0"

import argparse
import base64
import collections
import contextlib
import csv
import dataclasses
import datetime as dt
import decimal
import fnmatch
import functools
import hashlib
import hmac
import html
import importlib.util
import io
import ipaddress
import json
import logging
import logging.handlers
import math
import os
import queue
import re
import secrets
import signal
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse

import bottle
import waitress
import waitress.channel
import waitress.parser
import waitress.utilities
import waitress.wasyncore


def _import_on_first_use(name):
    """Module `name`, imported when first used (importlib's LazyLoader recipe)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Only a server uses these (upstream calls, alert webhooks, OIDC, proxy settings):
# importing them would add 0.1 s of CPU to every CLI command.
requests = _import_on_first_use("requests")
sseclient = _import_on_first_use("sseclient")
urllib3 = _import_on_first_use("urllib3")


def finish_put_off_imports():
    """Import now what the CLI does without. A server does, before its threads start:
    LazyLoader is not thread-safe on Python 3.11, and a thread could use a module
    that another thread is still loading."""
    for module in (requests, sseclient, urllib3):
        module.__name__  # noqa: B018 (touching any attribute loads it)


log = logging.getLogger("llimit")

UTC = dt.timezone.utc
HERE = os.path.dirname(os.path.abspath(__file__))


# Ahead of the sections because every one of them raises it: the one error
# type of llimit, which make_app turns into OpenAI's error shape (or a page).
class LlimitError(Exception):
    """An error llimit answers itself: HTTP status, OpenAI error type, message."""

    def __init__(self, status, error_type, message, code=None, headers=None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.code = code or error_type
        self.headers = headers or {}

    def body(self):
        """The OpenAI-shaped JSON error object."""
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": None, "code": self.code}}

    def anthropic_body(self):
        """The same error in Anthropic's shape, for Anthropic's clients."""
        return {"type": "error", "error": {
            "type": ANTHROPIC_ERROR_TYPES.get(self.status, "api_error"),
            "message": self.message}}

    def gemini_body(self):
        """The same error in Google's shape, for Gemini's clients."""
        return {"error": {"code": self.status, "message": self.message,
                          "status": GEMINI_ERROR_STATUSES.get(self.status, "UNKNOWN")}}


# compat: Google's clients read error.status (a google.rpc code name).
GEMINI_ERROR_STATUSES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED",
                         403: "PERMISSION_DENIED", 404: "NOT_FOUND", 405: "INVALID_ARGUMENT",
                         409: "ABORTED", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
                         500: "INTERNAL", 501: "UNIMPLEMENTED", 502: "UNAVAILABLE",
                         503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
# compat: the Anthropic SDKs read error.type; the statuses stay llimit's own.
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                         403: "permission_error", 404: "not_found_error",
                         405: "invalid_request_error", 413: "request_too_large",
                         429: "rate_limit_error", 500: "api_error", 502: "api_error",
                         503: "overloaded_error", 504: "api_error", 529: "overloaded_error"}


# Also ahead of the sections, since sections 3, 4 and 6 validate admin input
# with it and section 11 shows the same rules as the OpenAPI spec: each field's
# rule is written once, as JSON schema, so a client that keeps to the spec is
# never refused and the validators cannot drift from what the spec says.
@dataclasses.dataclass(frozen=True)
class Field:
    """One field of admin input: its JSON-schema rule and what a 400 says when it is broken."""
    schema: dict
    problem: str


def check_input(data, fields, what):
    """Raise 400 unless `data` is an object whose every field is known and keeps to its rule."""
    if not isinstance(data, dict):
        raise LlimitError(400, "invalid_request_error", "expected a JSON object")
    for name, value in data.items():
        field = fields.get(name)
        if field is None:
            raise _field_error(name, f"is not a {what} field")
        if not keeps_to(value, field.schema):
            raise _field_error(name, field.problem)


def keeps_to(value, schema):
    """Whether a JSON value keeps to a schema of the subset llimit's spec uses."""
    if value is None:
        return bool(schema.get("nullable"))
    if "enum" in schema and value not in schema["enum"]:
        return False
    kind = schema.get("type")
    if kind == "string":
        pattern = schema.get("pattern")
        return (isinstance(value, str)
                and schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value))
                and (pattern is None or re.fullmatch(pattern, value) is not None))
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            return False
        low = schema.get("minimum", -math.inf)
        return (value > low if schema.get("exclusiveMinimum") else value >= low) \
            and value <= schema.get("maximum", math.inf)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array":
        return isinstance(value, list) and all(keeps_to(item, schema["items"]) for item in value)
    if kind == "object":
        values = schema.get("additionalProperties")
        return isinstance(value, dict) and (not isinstance(values, dict) or all(
            keeps_to(item, values) for item in value.values()))
    return True
def _field_error(field, problem):
    return LlimitError(400, "invalid_request_error", f"{field} {problem}",
                       code="invalid_" + field if field.isidentifier() else "invalid_field")


# =============================================================================
# 1. Config
#    Every setting: its environment variable, its flag, its default, in one
#    table. `load_config` turns argv and environ into one frozen `Config`.
#    Reads nothing else; validates values so a typo fails at start, not later.
# =============================================================================

def _csv_list(value):
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _plan_groups(value):
    # "group=plan,group=plan" -> ((group, plan), ...), in the order given.
    pairs = []
    for item in _csv_list(value):
        group, equals, plan = item.partition("=")
        if not equals or not group.strip() or not plan.strip():
            raise ValueError(item)
        pairs.append((group.strip(), plan.strip()))
    return tuple(pairs)


def _bool(value):
    return value.strip().lower() in ("1", "true", "yes", "on")


# (field, environment variable, flag or None, default, parser, help)
SETTINGS = [
    ("host", "LLIMIT_HOST", "--host", "127.0.0.1", str, "listen address"),
    ("port", "LLIMIT_PORT", "--port", 8000, int, "listen port"),
    ("db_path", "LLIMIT_DB", "--db", "./llimit.db", str,
     "SQLite file, or a postgresql:// URL shared by several llimit instances"),
    ("threads", "LLIMIT_THREADS", "--threads", 64, int,
     "worker threads (one per open stream)"),
    ("admin_token", "LLIMIT_ADMIN_TOKEN", None, None, str,
     "admin API token; generated and printed once when unset"),
    ("upstream_url", "LLIMIT_UPSTREAM_URL", "--upstream-url",
     "https://api.openai.com/v1", str, "base URL of the default project's upstream"),
    ("upstream_key", "LLIMIT_UPSTREAM_KEY", None, None, str,
     "key sent to the default upstream (default: $OPENAI_API_KEY)"),
    ("upstream_api_version", "LLIMIT_UPSTREAM_API_VERSION", None, None, str,
     "api-version added to default-upstream calls that lack it"),
    ("pricing_path", "LLIMIT_PRICING", "--pricing",
     os.path.join(HERE, "pricing.json"), str, "prices file"),
    ("auth", "LLIMIT_AUTH", "--auth", "open", str, "page sign-in: open, header or oidc"),
    ("public_url", "LLIMIT_PUBLIC_URL", None, None, str,
     "external base URL (default http://HOST:PORT)"),
    ("chartjs", "LLIMIT_CHARTJS", "--chartjs", None, str,
     "path of a local chart.umd.js to serve; a CDN URL when unset"),
    ("grace_seconds", "LLIMIT_GRACE_SECONDS", None, 30.0, float,
     "on SIGTERM, how long open streams may finish"),
    ("commit_wait_seconds", "LLIMIT_COMMIT_WAIT_SECONDS", None, 10.0, float,
     "how long an answer waits for its usage row to commit before it becomes a 503"),
    ("writer_close_seconds", "LLIMIT_WRITER_CLOSE_SECONDS", None, 30.0, float,
     "at shutdown, how long to wait for the usage writer to commit what is queued"),
    ("metrics_token", "LLIMIT_METRICS_TOKEN", None, None, str,
     "Bearer token /metrics asks for; open when unset"),
    ("user_headers", "LLIMIT_USER_HEADERS", None, (), _csv_list,
     "further headers naming the end user of a project key"),
    ("user_domains", "LLIMIT_USER_DOMAINS", None, (), _csv_list,
     "e-mail domains whose addresses name a user by their local part"
     " (default: LLIMIT_OIDC_ALLOWED_DOMAINS)"),
    ("max_body_bytes", "LLIMIT_MAX_BODY_BYTES", None, 32 * 1024 * 1024, int,
     "largest request body accepted (413 above)"),
    ("upstream_timeout", "LLIMIT_UPSTREAM_TIMEOUT", None, 600.0, float,
     "seconds to wait for upstream bytes before 504"),
    ("connect_timeout", "LLIMIT_CONNECT_TIMEOUT", None, 10.0, float,
     "seconds to wait for an upstream connection"),
    ("default_max_tokens", "LLIMIT_DEFAULT_MAX_TOKENS", None, 4096, int,
     "output tokens reserved for a call that sets no max_tokens, when its model's"
     " max_output_tokens is not in pricing.json"),
    ("default_max_input_tokens", "LLIMIT_DEFAULT_MAX_INPUT_TOKENS", None, 200000, int,
     "input tokens reserved for a call whose prompt lives upstream (previous_response_id,"
     " files, image URLs...), when its model's max_input_tokens is not in pricing.json"),
    ("async_sweep_seconds", "LLIMIT_ASYNC_SWEEP_SECONDS", None, 300.0, float,
     "how often unpolled batches and background responses are checked, to charge them"),
    ("drain_seconds", "LLIMIT_DRAIN_SECONDS", None, 0.0, float,
     "after a client leaves mid-stream, keep reading the upstream this long for exact usage"),
    ("reservation_seconds", "LLIMIT_RESERVATION_SECONDS", None, 0.0, float,
     "PostgreSQL: how long a call's reservation outlives an instance that died"
     " (0: LLIMIT_UPSTREAM_TIMEOUT + 60)"),
    ("alert_webhook", "LLIMIT_ALERT_WEBHOOK", None, None, str,
     "URL that limit alerts are POSTed to (Slack/Teams compatible)"),
    ("admin_users", "LLIMIT_ADMIN_USERS", None, (), _csv_list,
     "signed-in users who are admins"),
    ("auth_header", "LLIMIT_AUTH_HEADER", None, "X-Forwarded-Email", str,
     "header carrying the user with --auth header"),
    ("trusted_proxies", "LLIMIT_TRUSTED_PROXIES", None, ("127.0.0.1", "::1"), _csv_list,
     "addresses trusted to set the auth header"),
    ("oidc_issuer", "LLIMIT_OIDC_ISSUER", None, None, str, "OpenID Connect issuer URL"),
    ("oidc_client_id", "LLIMIT_OIDC_CLIENT_ID", None, None, str, "OIDC client id"),
    ("oidc_client_secret", "LLIMIT_OIDC_CLIENT_SECRET", None, None, str, "OIDC client secret"),
    ("oidc_allowed_domains", "LLIMIT_OIDC_ALLOWED_DOMAINS", None, (), _csv_list,
     "e-mail domains allowed to sign in with OIDC"),
    ("reports_public", "LLIMIT_REPORTS_PUBLIC", None, False, _bool,
     "open /reports to every signed-in user"),
    ("upstream_user", "LLIMIT_UPSTREAM_USER", None, None, str,
     "name the user to the provider: hash or name (OpenAI safety_identifier,"
     " Anthropic metadata.user_id); unset: not sent"),
    ("cors_origins", "LLIMIT_CORS_ORIGINS", None, (), _csv_list,
     "browser origins allowed to call the proxy routes and /llimit/me with a key (CORS)"),
    ("upstream_env_pattern", "LLIMIT_UPSTREAM_ENV_PATTERN", None, "LLIMIT_UPSTREAM_KEY_*", str,
     "environment variables a project's upstream_key may name as env:NAME (fnmatch)"),
    ("max_concurrent_per_key", "LLIMIT_MAX_CONCURRENT_PER_KEY", None, 16, int,
     "calls one key may have under way at once (429 above)"),
    ("max_concurrent_per_user", "LLIMIT_MAX_CONCURRENT_PER_USER", None, 16, int,
     "calls one user may have under way at once, over all their keys (429 above)"),
    ("max_connections", "LLIMIT_MAX_CONNECTIONS", None, 1000, int,
     "open client connections; past it the longest idle one is closed"),
    ("default_plan", "LLIMIT_DEFAULT_PLAN", None, None, str,
     "plan of every named user an admin or a sign-in has not put on another"),
    ("plan_claim", "LLIMIT_PLAN_CLAIM", None, None, str,
     "OIDC claim (--auth oidc) or header (--auth header) holding the user's groups"),
    ("plan_groups", "LLIMIT_PLAN_GROUPS", None, (), _plan_groups,
     "group=plan pairs, e.g. research=research-plan,interns=intern-plan; at each sign-in"
     " the first pair whose group the user is in sets their plan"),
    ("log_format", "LLIMIT_LOG_FORMAT", None, "text", str, "text or json"),
    ("log_level", "LLIMIT_LOG_LEVEL", None, "INFO", str, "logging level"),
]


SETTING_FLAG_FIELDS = {field: flag for field, _env, flag, *_ in SETTINGS if flag}

SECRET_SETTINGS = frozenset(("admin_token", "upstream_key", "metrics_token",
                             "oidc_client_secret"))


def _base_url(config):
    return (config.public_url or f"http://{config.host}:{config.port}").rstrip("/")


# Every setting of one llimit process, with its default from SETTINGS (written
# once, there); `clock` gives seconds since the epoch, and tests pass their own.
Config = dataclasses.make_dataclass(
    "Config",
    [(field, object, dataclasses.field(default=default, repr=field not in SECRET_SETTINGS))
     for field, _env, _flag, default, _parse, _help in SETTINGS]
    + [("clock", object, dataclasses.field(default=time.time))],
    frozen=True,
    namespace={"__doc__": "Every setting of one llimit process; built once by `load_config`.",
               "base_url": property(_base_url)})


def config_flags(fields=None):
    """An argparse parent parser holding the settings that have a flag (or those in `fields`).

    A flag not given is absent from the parsed namespace (SUPPRESS), so the same flag
    may stand before a subcommand or after it without one overwriting the other.
    """
    parser = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for field, env, flag, default, parse, help_text in SETTINGS:
        if flag and (fields is None or field in fields):
            parser.add_argument(flag, dest=field,
                                help=f"{help_text} (${env}, default {default})")
    return parser


def load_config(argv=(), environ=None):
    """Build the Config from flags (which win) and LLIMIT_* variables."""
    flags, _ = config_flags().parse_known_args(list(argv))
    return config_from_flags(vars(flags), environ)


def config_from_flags(flags, environ=None):
    """Build the Config from parsed flag values ({field: text}) and LLIMIT_* variables."""
    environ = os.environ if environ is None else environ
    values = {}
    for field, env, flag, default, parse, _help in SETTINGS:
        raw = flags.get(field) if flag else None
        if raw is None:
            raw = environ.get(env)
        if raw is None or raw == "":
            values[field] = default
            continue
        try:
            values[field] = parse(raw)
        except ValueError:
            raise SystemExit(f"llimit: {env} has a bad value: {raw!r}") from None
    if values["upstream_key"] is None:
        values["upstream_key"] = environ.get("OPENAI_API_KEY")
    _apply_entra_shortcut(values, environ)
    if values["auth"] not in ("open", "header", "oidc"):
        raise SystemExit("llimit: LLIMIT_AUTH must be open, header or oidc")
    if values["auth"] == "oidc":
        _check_oidc_settings(values)
    if values["log_format"] not in ("text", "json"):
        raise SystemExit("llimit: LLIMIT_LOG_FORMAT must be text or json")
    if values["upstream_user"] not in (None, "hash", "name"):
        raise SystemExit("llimit: LLIMIT_UPSTREAM_USER must be hash or name")
    for origin in values["cors_origins"]:
        if origin != _origin_only(origin):
            raise SystemExit(f"llimit: LLIMIT_CORS_ORIGINS: {origin!r} is not an origin"
                             " (scheme://host[:port], no path)")
    return Config(**values)


ENV_FILE_NAME = ".env"
ENV_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")


def env_file_paths(cwd=None):
    """The .env files read at start: the working directory's, then the one beside llimit.py."""
    paths = []
    for folder in (cwd or os.getcwd(), HERE):
        path = os.path.realpath(os.path.join(folder, ENV_FILE_NAME))
        if path not in paths and os.path.isfile(path):
            paths.append(path)
    return paths


def load_env_files(paths, environ):
    """Add the settings of .env files to `environ` where it has none; returns those added.

    KEY=VALUE lines, `#` comments, an optional `export ` and quotes. The real
    environment wins, and an earlier file wins over a later one.
    """
    added = {}
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                match = ENV_LINE.match(line)
                if match is None:
                    # The line is not echoed: it may hold a secret.
                    print(f"llimit: {path} line {number} is not KEY=VALUE; ignored",
                          file=sys.stderr)
                    continue
                name, value = match[1], _env_value(match[2])
                if name not in environ:
                    environ[name] = added[name] = value
    return added


def _env_value(raw):
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        inner = raw[1:-1]
        if raw[0] == '"':  # as shells and python-dotenv read double quotes
            inner = inner.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
        return inner
    return re.split(r"\s+#", raw, maxsplit=1)[0].strip()  # an unquoted value ends at " #"


def _apply_entra_shortcut(values, environ):
    # compat: the .NET predecessor's AZURE_AD_* variables configure Entra ID sign-in.
    tenant = environ.get("AZURE_AD_TENANT_ID")
    if not tenant or values["oidc_issuer"]:
        return
    values["oidc_issuer"] = f"https://login.microsoftonline.com/{tenant}/v2.0"
    values["oidc_client_id"] = values["oidc_client_id"] or environ.get("AZURE_AD_CLIENT_ID")
    values["oidc_client_secret"] = (values["oidc_client_secret"]
                                    or environ.get("AZURE_AD_CLIENT_SECRET"))
    domain = environ.get("AZURE_AD_CORPORATE_DOMAIN")
    if domain and not values["oidc_allowed_domains"]:
        values["oidc_allowed_domains"] = (domain,)
    if values["auth"] == "open" and not environ.get("LLIMIT_AUTH"):
        values["auth"] = "oidc"


def _check_oidc_settings(values):
    if not values["oidc_issuer"] or not values["oidc_client_id"]:
        raise SystemExit("llimit: LLIMIT_AUTH=oidc needs LLIMIT_OIDC_ISSUER and"
                         " LLIMIT_OIDC_CLIENT_ID")
    # The ID token is trusted because it comes straight from the issuer's token
    # endpoint over TLS (see OidcClient), so plain http is only for this machine.
    if not is_https_or_loopback(values["oidc_issuer"]):
        raise SystemExit("llimit: LLIMIT_OIDC_ISSUER must be an https URL")


def _origin_only(url):
    # scheme://host[:port] of a URL, lowercased as browsers send Origin.
    parts = urllib.parse.urlsplit(url.strip())
    return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme and parts.netloc else ""


def is_https_or_loopback(url):
    """Whether a URL is https, or http to this machine (for tests and local providers)."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme == "https" or (
        parts.scheme == "http" and parts.hostname in ("localhost", "127.0.0.1", "::1"))


# =============================================================================
# 2. Storage
#    The schema, its migrations and every SQL statement llimit runs, on one of
#    two engines: a SQLite file (the default; one connection per thread, WAL,
#    busy_timeout) or PostgreSQL (LLIMIT_DB=postgresql://...; a connection
#    pool shared by the threads, several llimit instances on one database).
#    SQL is written once, in the dialect both engines speak (`?` and `:name`
#    parameters, which the PostgreSQL engine turns into psycopg's); the few
#    statements that must differ stand side by side, chosen by `engine_of(db)`.
#    Other sections call the named functions here and never hold SQL of their
#    own. Money is stored as integer nano-dollars (`*_nusd`) so sums are exact.
# =============================================================================

BUSY_TIMEOUT_MS = 5000


class EngineError(Exception):
    """A PostgreSQL failure, as the PostgreSQL engine raises it (psycopg's error is its cause)."""


class EngineUnavailable(EngineError):
    """PostgreSQL cannot be reached, or dropped the connection: try again later."""


class EngineDataError(EngineError):
    """PostgreSQL cannot store a value it was given (a NUL in text, say)."""


# What other sections catch when the database fails, so none of them names the engine.
DatabaseError = (sqlite3.Error, EngineError)                     # any failure of the database
DatabaseUnavailable = (sqlite3.OperationalError, EngineUnavailable)  # busy or gone: retry later

MIGRATIONS = [
    ("0001 keys, projects, prices and usage", """
begin;
create table settings (name text primary key, value text not null);
create table projects (
    id text primary key,
    name text not null,
    upstream_kind text not null default 'openai',
    upstream_url text,              -- null: the LLIMIT_UPSTREAM_* upstream
    upstream_key text,              -- 'env:NAME' or the key itself; never shown
    api_version text,
    allow_user_keys integer not null default 1,
    limit_message text,
    model_map text,                 -- JSON {deployment: model} for pricing
    created_at text not null
);
insert into projects (id, name, created_at)
    values ('default', 'Default', strftime('%Y-%m-%dT%H:%M:%SZ', 'now'));
create table api_keys (
    id text primary key,
    key_hash text not null unique,  -- SHA-256 hex of the raw key
    masked_key text not null,
    project_id text not null,
    user_name text,                 -- null: a project key
    note text,
    models text,                    -- JSON list of allowed models; null: all
    created_at text not null,
    expires_at text,
    revoked_at text,
    last_used_at text
);
create index api_keys_user on api_keys (user_name);
create index api_keys_project on api_keys (project_id);
create table model_prices (         -- admin overrides on top of pricing.json
    model text primary key,
    input real not null,
    cached_input real,
    output real not null,
    cache_write real,
    updated_at text not null
);
create table price_snapshots (      -- the USD/1M prices an event was costed with
    id integer primary key,
    model text not null,
    input real not null,
    cached_input real not null,
    output real not null,
    cache_write real not null,
    unique (model, input, cached_input, output, cache_write)
);
create table usage_events (
    id integer primary key,
    created_ms integer not null,    -- unix time in milliseconds, UTC
    key_id text,
    user_name text,
    project_id text,
    model text,
    endpoint text not null,
    status_code integer not null,
    stream integer not null,
    prompt_tokens integer not null,  -- every input token, cached included
    cached_tokens integer not null,
    cache_write_tokens integer not null,
    completion_tokens integer not null,  -- every output token, reasoning included
    reasoning_tokens integer not null,
    cost_nusd integer,              -- null: no price
    price_id integer,
    pricing text not null,          -- priced | unpriced | estimated
    latency_ms real not null,
    overhead_ms real not null
);
create index usage_events_created on usage_events (created_ms);
create table usage_daily (          -- rollup that reports read; '' for none
    day text not null,
    project_id text not null,
    user_name text not null,
    key_id text not null,
    model text not null,
    requests integer not null,
    prompt_tokens integer not null,
    cached_tokens integer not null,
    cache_write_tokens integer not null,
    completion_tokens integer not null,
    cost_nusd integer not null,
    unpriced integer not null,
    primary key (day, project_id, user_name, key_id, model)
) without rowid;
commit;
"""),
    ("0002 limits, running totals and alerts", """
begin;
create table limits (
    id text primary key,
    scope text not null,            -- global | project | user | key
    target text,
    each text,                      -- null | user | key
    metric text not null,           -- usd | tokens | requests
    window text not null,           -- minute | day | week | month | total
    amount real not null,
    action text not null default 'block',
    alert_at text,                  -- JSON list of percentages
    note text,
    created_at text not null
);
create index limits_target on limits (scope, target);
-- Running totals per subject ('*', 'p:P', 'u:U', 'k:K', 'pu:P<US>U') and UTC
-- day; day 'total' holds the lifetime total. Week and month sum <= 31 days.
create table usage_counters (
    subject text not null,
    day text not null,
    requests integer not null,
    tokens integer not null,
    cost_nusd integer not null,
    primary key (subject, day)
) without rowid;
create table alerts_sent (
    limit_id text not null,
    subject text not null,
    window_start text not null,
    threshold real not null,
    created_at text not null,
    text text not null,
    delivered_at text,
    primary key (limit_id, subject, window_start, threshold)
) without rowid;
commit;
"""),
    ("0003 sessions", """
begin;
-- Page sign-in. The cookie holds a random session id; only its SHA-256 is
-- kept, so a copy of the database signs no one in. A row with no user is a
-- browser on its way to signing in (it carries the login form's CSRF token
-- and, for OIDC, the pending state, nonce and PKCE verifier).
create table sessions (
    id_hash text primary key,       -- SHA-256 hex of the session id
    user_name text,                 -- null: not signed in as a user
    is_admin integer not null default 0,  -- 1: signed in with the admin token
    csrf_token text not null,
    pending text,                   -- JSON of an OIDC sign-in under way, or null
    created_at text not null,
    expires_at text not null
) without rowid;
create index sessions_expires on sessions (expires_at);
commit;
"""),
    ("0004 config version", """
begin;
-- Moves with every change to what a call is checked against (keys, projects,
-- limits), so a running llimit can hold those in memory and still see a
-- change made by another process (the CLI) on the very next call, for the
-- price of reading this one number. last_used_at and notes do not count.
create table config_version (
    id integer primary key check (id = 1),
    version integer not null
);
insert into config_version values (1, 0);
create trigger limits_inserted after insert on limits
begin update config_version set version = version + 1; end;
create trigger limits_updated after update on limits
begin update config_version set version = version + 1; end;
create trigger limits_deleted after delete on limits
begin update config_version set version = version + 1; end;
create trigger projects_inserted after insert on projects
begin update config_version set version = version + 1; end;
create trigger projects_updated after update on projects
begin update config_version set version = version + 1; end;
create trigger projects_deleted after delete on projects
begin update config_version set version = version + 1; end;
create trigger api_keys_updated
after update of key_hash, project_id, user_name, models, expires_at, revoked_at on api_keys
begin update config_version set version = version + 1; end;
create trigger api_keys_deleted after delete on api_keys
begin update config_version set version = version + 1; end;
commit;
"""),
    ("0005 route policy: async projects and owned objects", """
begin;
alter table projects add column allow_async integer not null default 0;
-- Objects (files, batches, stored responses...) made through llimit: the
-- upstream knows one account, so llimit keeps whose each one is. An async
-- object (a batch, a background response) is charged once, when its final
-- usage is known: charged_ms is set in the transaction that stores the charge.
create table owned_objects (
    object_id text primary key,
    kind text not null,
    project_id text not null,
    owner text not null,            -- 'u:<user>', or 'k:<key id>' for a key with no user
    key_id text not null,
    user_name text,                 -- whom a charge is attributed to
    created_ms integer not null,
    async integer not null default 0,
    charged_ms integer
) without rowid;
commit;
"""),
    ("0006 admin session token", """
begin;
-- A session signed in with the admin token ends when the token changes: it
-- keeps a fingerprint of the token's hash it was signed in with. Null (older
-- rows, user sessions): an admin-token session made before this is signed out.
alter table sessions add column admin_token_fingerprint text;
commit;
"""),
    ("0007 async jobs not yet charged", """
begin;
-- The async sweeper asks the upstream about these; the index holds only them.
create index owned_objects_unsettled on owned_objects (created_ms)
    where async = 1 and charged_ms is null;
commit;
"""),
    ("0008 a cap on each user's personal keys per project", """
begin;
-- How many active personal keys a user may hold in a project through the
-- keys page, so that limits on `each: key` do not multiply; null: no cap
-- (every project before this migration).
alter table projects add column max_keys_per_user integer;
commit;
"""),
    ("0009 what a call is billed by beyond tokens", """
begin;
-- JSON of images, audio seconds, characters, tool uses, 1-hour cache writes
-- and service tier (Usage.units), so a reprice costs them again; null: tokens
-- only (every event before this migration).
alter table usage_events add column units text;
commit;
"""),
    ("0010 refused calls per day, project and user", """
begin;
-- Calls llimit refused for a known key (a limit, a route, a model, a revoked
-- or expired key), counted per reason, so admins see who hits their limits.
-- No request content; '' for a call with no user.
create table refusals_daily (
    day text not null,
    project_id text not null,
    user_name text not null,
    reason text not null,           -- the refusal's error code, e.g. budget_exceeded
    refused integer not null,
    primary key (day, project_id, user_name, reason)
) without rowid;
commit;
"""),
    ("0011 plans, rolling windows and limit resets", """
begin;
-- A rolling window ('<n>h', '<n>d') counts periods of that length from
-- starts_at (null: created_at). A calendar window's current period starts no
-- earlier than reset_at (null: never reset). Both only move forward.
alter table limits add column starts_at text;
alter table limits add column reset_at text;
-- A plan is a named set of limits: rows of limits with scope 'plan' and the
-- plan's id as target, each applying to every member separately.
create table plans (
    id text primary key,
    name text not null,
    created_at text not null
);
-- A user's plan; source says who set it: 'admin' or 'sign-in' (a group claim).
create table user_plans (
    user_name text primary key,
    plan_id text not null,
    source text not null,
    updated_at text not null
);
-- JSON list of plan ids a project key may name per call (X-LLimit-Plan); null: none.
alter table projects add column plans_allowed text;
create trigger plans_inserted after insert on plans
begin update config_version set version = version + 1; end;
create trigger plans_updated after update on plans
begin update config_version set version = version + 1; end;
create trigger plans_deleted after delete on plans
begin update config_version set version = version + 1; end;
create trigger user_plans_inserted after insert on user_plans
begin update config_version set version = version + 1; end;
create trigger user_plans_updated after update on user_plans
begin update config_version set version = version + 1; end;
create trigger user_plans_deleted after delete on user_plans
begin update config_version set version = version + 1; end;
commit;
"""),
    ("0012 shared reservations and minute totals", """
begin;
-- For several llimit instances on one PostgreSQL database, which cannot hold
-- running totals and calls under way in memory as one SQLite process does:
-- each admitted call reserves its worst case here (one row per block-limit
-- window) until the usage writer settles it, or until expires_ms if the
-- instance died first; minute windows read usage_minutes. On SQLite both stay
-- empty.
create table reservations (
    id text not null,               -- one call's reservation
    subject text not null,
    window_name text not null,
    window_start bigint not null,   -- epoch seconds
    requests bigint not null,
    tokens bigint not null,
    cost_nusd bigint not null,
    expires_ms bigint not null,
    primary key (id, subject, window_name, window_start)
);
create index reservations_window on reservations (subject, window_name, window_start);
create table usage_minutes (
    subject text not null,
    minute_start bigint not null,   -- epoch seconds
    requests bigint not null,
    tokens bigint not null,
    cost_nusd bigint not null,
    primary key (subject, minute_start)
);
commit;
"""),
    ("0013 a new key's secret for the next page, sealed", """
begin;
-- A key made on a page is shown on the page the browser is sent to next,
-- which another llimit instance may serve: the secret waits in the session
-- row, sealed with a key derived from the raw session id, which only the
-- browser holds (the row keeps its hash), and is cleared as it is shown.
-- Null: nothing to show.
alter table sessions add column new_key_sealed text;
commit;
"""),
    ("0014 running totals of rolling and reset periods", """
begin;
-- For several llimit instances on one PostgreSQL database: the running total
-- of a period that does not start at midnight (a rolling window's, or one a
-- reset started), read once from the events of its partial first day and the
-- daily totals after it, then counted on by the usage writer with each event
-- inside [window_start, window_end), as one SQLite process does in memory.
-- window_end null: no end (a reset 'total' window). On SQLite it stays empty.
create table period_totals (
    subject text not null,
    window_name text not null,
    window_start bigint not null,   -- epoch seconds
    window_end bigint,              -- epoch seconds
    requests bigint not null,
    tokens bigint not null,
    cost_nusd bigint not null,
    primary key (subject, window_name, window_start)
);
commit;
"""),
]

# The PostgreSQL side of migrations whose SQLite script PostgreSQL cannot run
# (strftime, triggers, rowid tables, the admission function); a migration
# written in the dialect both speak has no entry. No begin/commit: migrate()
# runs each in its own transaction.
NOW_ISO_PG = """to_char(now() at time zone 'utc', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')"""
POSTGRES_MIGRATIONS = {
    "0001 keys, projects, prices and usage": f"""
create table settings (name text primary key, value text not null);
create table projects (
    id text primary key,
    name text not null,
    upstream_kind text not null default 'openai',
    upstream_url text,
    upstream_key text,
    api_version text,
    allow_user_keys integer not null default 1,
    limit_message text,
    model_map text,
    created_at text not null
);
insert into projects (id, name, created_at) values ('default', 'Default', {NOW_ISO_PG});
create table api_keys (
    id text primary key,
    key_hash text not null unique,
    masked_key text not null,
    project_id text not null,
    user_name text,
    note text,
    models text,
    created_at text not null,
    expires_at text,
    revoked_at text,
    last_used_at text
);
create index api_keys_user on api_keys (user_name);
create index api_keys_project on api_keys (project_id);
create table model_prices (
    model text primary key,
    input double precision not null,
    cached_input double precision,
    output double precision not null,
    cache_write double precision,
    updated_at text not null
);
create table price_snapshots (
    id bigint generated by default as identity primary key,
    model text not null,
    input double precision not null,
    cached_input double precision not null,
    output double precision not null,
    cache_write double precision not null,
    unique (model, input, cached_input, output, cache_write)
);
create table usage_events (
    id bigint generated by default as identity primary key,
    created_ms bigint not null,
    key_id text,
    user_name text,
    project_id text,
    model text,
    endpoint text not null,
    status_code integer not null,
    stream integer not null,
    prompt_tokens bigint not null,
    cached_tokens bigint not null,
    cache_write_tokens bigint not null,
    completion_tokens bigint not null,
    reasoning_tokens bigint not null,
    cost_nusd bigint,
    price_id bigint,
    pricing text not null,
    latency_ms double precision not null,
    overhead_ms double precision not null
);
create index usage_events_created on usage_events (created_ms);
create table usage_daily (
    day text not null,
    project_id text not null,
    user_name text not null,
    key_id text not null,
    model text not null,
    requests bigint not null,
    prompt_tokens bigint not null,
    cached_tokens bigint not null,
    cache_write_tokens bigint not null,
    completion_tokens bigint not null,
    cost_nusd bigint not null,
    unpriced bigint not null,
    primary key (day, project_id, user_name, key_id, model)
);
""",
    "0002 limits, running totals and alerts": """
create table limits (
    id text primary key,
    scope text not null,
    target text,
    each text,
    metric text not null,
    "window" text not null,
    amount double precision not null,
    action text not null default 'block',
    alert_at text,
    note text,
    created_at text not null
);
create index limits_target on limits (scope, target);
create table usage_counters (
    subject text collate "C" not null,  -- ranges of subjects compare bytes, as in SQLite
    day text collate "C" not null,
    requests bigint not null,
    tokens bigint not null,
    cost_nusd bigint not null,
    primary key (subject, day)
);
create table alerts_sent (
    limit_id text not null,
    subject text not null,
    window_start text not null,
    threshold double precision not null,
    created_at text not null,
    text text not null,
    delivered_at text,
    primary key (limit_id, subject, window_start, threshold)
);
""",
    "0003 sessions": """
create table sessions (
    id_hash text primary key,
    user_name text,
    is_admin integer not null default 0,
    csrf_token text not null,
    pending text,
    created_at text not null,
    expires_at text not null
);
create index sessions_expires on sessions (expires_at);
""",
    "0004 config version": """
create table config_version (
    id integer primary key check (id = 1),
    version bigint not null
);
insert into config_version values (1, 0);
create function llimit_config_changed() returns trigger language plpgsql as $$
begin
    update config_version set version = version + 1;
    return null;
end $$;
create trigger limits_changed after insert or update or delete on limits
    for each statement execute function llimit_config_changed();
create trigger projects_changed after insert or update or delete on projects
    for each statement execute function llimit_config_changed();
create trigger api_keys_updated
    after update of key_hash, project_id, user_name, models, expires_at, revoked_at
    on api_keys for each statement execute function llimit_config_changed();
create trigger api_keys_deleted after delete on api_keys
    for each statement execute function llimit_config_changed();
""",
}
POSTGRES_MIGRATIONS["0005 route policy: async projects and owned objects"] = """
alter table projects add column allow_async integer not null default 0;
create table owned_objects (
    object_id text primary key,
    kind text not null,
    project_id text not null,
    owner text not null,
    key_id text not null,
    user_name text,
    created_ms bigint not null,
    async integer not null default 0,
    charged_ms bigint
);
"""
POSTGRES_MIGRATIONS["0010 refused calls per day, project and user"] = """
create table refusals_daily (
    day text not null,
    project_id text not null,
    user_name text not null,
    reason text not null,
    refused bigint not null,
    primary key (day, project_id, user_name, reason)
);
"""
POSTGRES_MIGRATIONS["0011 plans, rolling windows and limit resets"] = """
alter table limits add column starts_at text;
alter table limits add column reset_at text;
create table plans (
    id text primary key,
    name text not null,
    created_at text not null
);
create table user_plans (
    user_name text primary key,
    plan_id text not null,
    source text not null,
    updated_at text not null
);
alter table projects add column plans_allowed text;
create trigger plans_changed after insert or update or delete on plans
    for each statement execute function llimit_config_changed();
create trigger user_plans_changed after insert or update or delete on user_plans
    for each statement execute function llimit_config_changed();
"""
POSTGRES_MIGRATIONS["0012 shared reservations and minute totals"] = (
    dict(MIGRATIONS)["0012 shared reservations and minute totals"].strip()
    .removeprefix("begin;").removesuffix("commit;").replace(
        "subject text not null,", 'subject text collate "C" not null,') + """
-- Admission in one round trip. First the config version: if it is not the
-- one the caller's key and limits were read at, return [-1, version] and do
-- nothing else (the caller reads them again). Then, under a
-- transaction-scoped advisory lock per (subject, window) - taken in the
-- caller's sorted order, so two admissions never deadlock - read each
-- window's used total and live reservations in one snapshot, refuse at the
-- first block limit the call would overrun (its 1-based index first), or
-- reserve `p_need` against every block window (0 first). The version
-- follows, then [used requests, tokens, nusd, held requests, tokens, nusd]
-- per check, for the rate-limit headers.
create function llimit_admit(
    p_version bigint, p_reservation text, p_now_ms bigint, p_expires_ms bigint,
    p_subjects text[], p_windows text[], p_starts bigint[], p_first_days text[],
    p_last_days text[], p_metrics integer[], p_amounts double precision[],
    p_blocks boolean[], p_stricts boolean[], p_need bigint[]) returns bigint[]
    language plpgsql as $$
declare
    v_version bigint;
    v_out bigint[];
    v_row bigint[];
    v_taken bigint;
    i integer;
begin
    select version into v_version from config_version;
    if v_version is distinct from p_version then
        return array[-1::bigint, v_version];
    end if;
    v_out := array[0::bigint, v_version];
    for i in 1 .. coalesce(array_length(p_subjects, 1), 0) loop
        perform pg_advisory_xact_lock(hashtextextended(
            p_subjects[i] || chr(31) || p_windows[i] || chr(31) || p_starts[i]::text, 0));
    end loop;
    for i in 1 .. coalesce(array_length(p_subjects, 1), 0) loop
        select array[coalesce(sum(u.requests), 0), coalesce(sum(u.tokens), 0),
                     coalesce(sum(u.cost_nusd), 0),
                     (select coalesce(sum(r.requests), 0) from reservations r
                      where r.subject = p_subjects[i] and r.window_name = p_windows[i]
                      and r.window_start = p_starts[i] and r.expires_ms > p_now_ms),
                     (select coalesce(sum(r.tokens), 0) from reservations r
                      where r.subject = p_subjects[i] and r.window_name = p_windows[i]
                      and r.window_start = p_starts[i] and r.expires_ms > p_now_ms),
                     (select coalesce(sum(r.cost_nusd), 0) from reservations r
                      where r.subject = p_subjects[i] and r.window_name = p_windows[i]
                      and r.window_start = p_starts[i] and r.expires_ms > p_now_ms)]
        into v_row from (
            select m.requests, m.tokens, m.cost_nusd from usage_minutes m
            where p_windows[i] = 'minute' and m.subject = p_subjects[i]
            and m.minute_start = p_starts[i]
            union all
            select c.requests, c.tokens, c.cost_nusd from usage_counters c
            where p_windows[i] <> 'minute' and c.subject = p_subjects[i]
            and c.day >= p_first_days[i] and c.day <= p_last_days[i]) u;
        v_out := v_out || v_row;
        if p_blocks[i] then
            v_taken := v_row[p_metrics[i]] + v_row[p_metrics[i] + 3];
            if (p_stricts[i] and v_taken + p_need[p_metrics[i]] > p_amounts[i])
                    or (not p_stricts[i] and v_taken >= p_amounts[i]) then
                v_out[1] := i;
                return v_out;
            end if;
        end if;
    end loop;
    for i in 1 .. coalesce(array_length(p_subjects, 1), 0) loop
        if p_blocks[i] then
            insert into reservations (id, subject, window_name, window_start, requests,
                                      tokens, cost_nusd, expires_ms)
            values (p_reservation, p_subjects[i], p_windows[i], p_starts[i], p_need[1],
                    p_need[2], p_need[3], p_expires_ms)
            on conflict do nothing;
        end if;
    end loop;
    return v_out;
end $$;
""")
POSTGRES_MIGRATIONS["0014 running totals of rolling and reset periods"] = (
    dict(MIGRATIONS)["0014 running totals of rolling and reset periods"].strip()
    .removeprefix("begin;").removesuffix("commit;").replace(
        "subject text not null,", 'subject text collate "C" not null,') + """
-- llimit_admit as in 0012, with periods that do not start at midnight
-- (p_irregular): such a check reads its period_totals row, made here on first
-- use from the events of [start, the next midnight or the end) that match the
-- subject (p_projects, p_users, p_keys; null: any) and the daily totals of
-- p_first_days .. p_last_days. Making it holds the subject's advisory lock
-- (hashtextextended(subject, 1)), which the usage writer holds shared while it
-- counts events into period_totals: each event is either in the first read or
-- counted on, never both nor neither. Subjects are locked in the caller's sorted
-- order, after every window lock. The 0012 function stays for instances of the
-- previous version during a rolling upgrade (they refuse such periods).
create function llimit_admit(
    p_version bigint, p_reservation text, p_now_ms bigint, p_expires_ms bigint,
    p_subjects text[], p_windows text[], p_starts bigint[], p_ends bigint[],
    p_first_days text[], p_last_days text[], p_irregular boolean[], p_projects text[],
    p_users text[], p_keys text[], p_metrics integer[], p_amounts double precision[],
    p_blocks boolean[], p_stricts boolean[], p_need bigint[]) returns bigint[]
    language plpgsql as $$
declare
    v_version bigint;
    v_out bigint[];
    v_row bigint[];
    v_taken bigint;
    v_head_end bigint;
    i integer;
begin
    select version into v_version from config_version;
    if v_version is distinct from p_version then
        return array[-1::bigint, v_version];
    end if;
    v_out := array[0::bigint, v_version];
    for i in 1 .. coalesce(array_length(p_subjects, 1), 0) loop
        perform pg_advisory_xact_lock(hashtextextended(
            p_subjects[i] || chr(31) || p_windows[i] || chr(31) || p_starts[i]::text, 0));
    end loop;
    for i in 1 .. coalesce(array_length(p_subjects, 1), 0) loop
        if p_irregular[i] then
            perform 1 from period_totals t where t.subject = p_subjects[i]
                and t.window_name = p_windows[i] and t.window_start = p_starts[i];
            if not found then
                perform pg_advisory_xact_lock(hashtextextended(p_subjects[i], 1));
                v_head_end := (p_starts[i] + 86399) / 86400 * 86400;
                if p_ends[i] is not null and p_ends[i] < v_head_end then
                    v_head_end := p_ends[i];
                end if;
                insert into period_totals (subject, window_name, window_start, window_end,
                                           requests, tokens, cost_nusd)
                select p_subjects[i], p_windows[i], p_starts[i], p_ends[i],
                       e.requests + c.requests, e.tokens + c.tokens, e.cost_nusd + c.cost_nusd
                from (select count(*) as requests,
                             coalesce(sum(u.prompt_tokens + u.completion_tokens), 0) as tokens,
                             coalesce(sum(u.cost_nusd), 0) as cost_nusd
                      from usage_events u
                      where u.created_ms >= p_starts[i] * 1000
                      and u.created_ms < v_head_end * 1000
                      and (p_projects[i] is null or u.project_id = p_projects[i])
                      and (p_users[i] is null or u.user_name = p_users[i])
                      and (p_keys[i] is null or u.key_id = p_keys[i])) e,
                     (select coalesce(sum(d.requests), 0) as requests,
                             coalesce(sum(d.tokens), 0) as tokens,
                             coalesce(sum(d.cost_nusd), 0) as cost_nusd
                      from usage_counters d where d.subject = p_subjects[i]
                      and d.day >= p_first_days[i] and d.day <= p_last_days[i]) c
                on conflict do nothing;
            end if;
        end if;
        select array[coalesce(sum(u.requests), 0), coalesce(sum(u.tokens), 0),
                     coalesce(sum(u.cost_nusd), 0),
                     (select coalesce(sum(r.requests), 0) from reservations r
                      where r.subject = p_subjects[i] and r.window_name = p_windows[i]
                      and r.window_start = p_starts[i] and r.expires_ms > p_now_ms),
                     (select coalesce(sum(r.tokens), 0) from reservations r
                      where r.subject = p_subjects[i] and r.window_name = p_windows[i]
                      and r.window_start = p_starts[i] and r.expires_ms > p_now_ms),
                     (select coalesce(sum(r.cost_nusd), 0) from reservations r
                      where r.subject = p_subjects[i] and r.window_name = p_windows[i]
                      and r.window_start = p_starts[i] and r.expires_ms > p_now_ms)]
        into v_row from (
            select t.requests, t.tokens, t.cost_nusd from period_totals t
            where p_irregular[i] and t.subject = p_subjects[i]
            and t.window_name = p_windows[i] and t.window_start = p_starts[i]
            union all
            select m.requests, m.tokens, m.cost_nusd from usage_minutes m
            where not p_irregular[i] and p_windows[i] = 'minute'
            and m.subject = p_subjects[i] and m.minute_start = p_starts[i]
            union all
            select c.requests, c.tokens, c.cost_nusd from usage_counters c
            where not p_irregular[i] and p_windows[i] <> 'minute'
            and c.subject = p_subjects[i]
            and c.day >= p_first_days[i] and c.day <= p_last_days[i]) u;
        v_out := v_out || v_row;
        if p_blocks[i] then
            v_taken := v_row[p_metrics[i]] + v_row[p_metrics[i] + 3];
            if (p_stricts[i] and v_taken + p_need[p_metrics[i]] > p_amounts[i])
                    or (not p_stricts[i] and v_taken >= p_amounts[i]) then
                v_out[1] := i;
                return v_out;
            end if;
        end if;
    end loop;
    for i in 1 .. coalesce(array_length(p_subjects, 1), 0) loop
        if p_blocks[i] then
            insert into reservations (id, subject, window_name, window_start, requests,
                                      tokens, cost_nusd, expires_ms)
            values (p_reservation, p_subjects[i], p_windows[i], p_starts[i], p_need[1],
                    p_need[2], p_need[3], p_expires_ms)
            on conflict do nothing;
        end if;
    end loop;
    return v_out;
end $$;
""")


def connect(path):
    """A new connection with llimit's pragmas; autocommit, rows by name."""
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                         check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute(f"pragma busy_timeout = {BUSY_TIMEOUT_MS}")
    db.execute("pragma journal_mode = wal")
    db.execute("pragma synchronous = normal")
    db.execute("pragma foreign_keys = on")
    return db


def database_exists(path):
    """Whether the database `path` names is there already (connecting would create a file).

    A PostgreSQL database is made by its server's admin; connecting creates nothing.
    """
    return is_postgres_url(path) or os.path.exists(path)


class Database:
    """Hands each thread its own connection to one SQLite file."""

    engine = "sqlite"

    def __init__(self, path):
        self.path = path
        self._local = threading.local()

    def __call__(self):
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = connect(self.path)
        return db

    def close(self):
        """Nothing to let go: each thread's connection ends with its thread."""


def is_postgres_url(location):
    """Whether LLIMIT_DB names a PostgreSQL database rather than a SQLite file."""
    return location.startswith(("postgresql://", "postgres://"))


def database_label(location):
    """LLIMIT_DB as logs and messages show it: a PostgreSQL URL without its password."""
    if not is_postgres_url(location):
        return location
    parts = urllib.parse.urlsplit(location)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    # Put together by hand: urlunsplit drops the empty host of postgresql:///db.
    return (f"{parts.scheme}://{userinfo}{at}{hostport}{parts.path}"
            + (f"?{query}" if query else ""))


def open_database(location, pool_size=16):
    """The Database of LLIMIT_DB: a SQLite file, or a PostgreSQL URL (`pool_size` connections)."""
    if is_postgres_url(location):
        return PostgresDatabase(location, pool_size)
    return Database(location)


def engine_of(db):
    """"sqlite" or "postgres": which engine a connection from a Database speaks to."""
    return "sqlite" if isinstance(db, sqlite3.Connection) else db.engine


# --- the PostgreSQL engine ---------------------------------------------------------
# psycopg 3 and its pool, imported only when LLIMIT_DB is a PostgreSQL URL. The
# threads share a pool: a statement outside a transaction borrows a connection
# for itself (autocommit) and hands it back with every row fetched; a
# transaction keeps one until commit or rollback. A connection that broke is
# dropped by the pool and replaced, so llimit recovers by itself when the
# database comes back.

POSTGRES_CONNECT_SECONDS = 5  # longest wait for a pooled connection before a call fails closed
# After PostgreSQL failed to answer, calls fail closed at once for this long instead
# of each holding a worker thread for POSTGRES_CONNECT_SECONDS; then one tries again.
POSTGRES_RETRY_SECONDS = 1.0


class PostgresDatabase:
    """A connection pool to one PostgreSQL database; each thread gets a PostgresConnection."""

    engine = "postgres"

    def __init__(self, url, pool_size=16):
        try:
            import psycopg
            import psycopg_pool
        except ImportError:
            raise ValueError("LLIMIT_DB is a PostgreSQL URL, which needs the driver:"
                             ' pip install "psycopg[binary,pool]"') from None
        self.path = url
        self._psycopg = psycopg
        loader = _numeric_loader(psycopg)

        def configure(conn):
            conn.adapters.register_loader("numeric", loader)

        self.pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=max(2, pool_size), open=False, name="llimit",
            timeout=POSTGRES_CONNECT_SECONDS, reconnect_timeout=24 * 3600,
            kwargs={"autocommit": True, "row_factory": _postgres_row_factory,
                    "connect_timeout": POSTGRES_CONNECT_SECONDS},
            configure=configure)
        try:
            self.pool.open(wait=True, timeout=POSTGRES_CONNECT_SECONDS)
        except psycopg.Error as error:
            self.pool.close()
            raise EngineUnavailable(f"PostgreSQL does not answer: {error}") from error
        self._local = threading.local()
        self._outage = _Outage()

    def __call__(self):
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = PostgresConnection(self.pool, self._psycopg, self._outage)
        return db

    def close(self):
        """Close every pooled connection."""
        self.pool.close()


class _Outage:
    """When the pool last failed to hand out a connection: for POSTGRES_RETRY_SECONDS
    after that, taking one fails at once with the same error (one thread at a time
    tries again afterwards, so an outage costs no thread more than one wait)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._until, self._error = 0.0, None

    def check(self):
        if self._error is None:  # the usual case, without the lock
            return
        with self._lock:
            if time.monotonic() < self._until:
                raise EngineUnavailable(self._error)
            if self._error is not None:  # this thread tries; others wait a moment more
                self._until = time.monotonic() + POSTGRES_CONNECT_SECONDS

    def began(self, error):
        with self._lock:
            self._until, self._error = time.monotonic() + POSTGRES_RETRY_SECONDS, str(error)

    def ended(self):
        if self._error is not None:
            with self._lock:
                self._until, self._error = 0.0, None


class PostgresConnection:
    """One thread's way into the pool, with sqlite3's execute/executemany/in_transaction."""

    engine = "postgres"

    def __init__(self, pool, psycopg, outage):
        self._pool = pool
        self._psycopg = psycopg
        self._outage = outage
        self._held = None       # the connection of the open transaction
        self._pipeline = None   # its pipeline, for a batch of writes (begin(pipelined=True))
        self._leave_pipeline = None

    @property
    def in_transaction(self):
        return self._held is not None

    def execute(self, sql, params=()):
        def run(conn):
            cursor = conn.execute(_postgres_sql(sql), params)
            if self._pipeline is not None:
                self._pipeline.sync()  # its result is read now: what was queued goes too
            return _fetched(cursor)
        return self._run(run)

    def executemany(self, sql, rows):
        rows = list(rows)
        if not rows:
            return _PostgresResult([], 0)

        def run(conn):
            cursor = conn.cursor()
            cursor.executemany(_postgres_sql(sql), rows)
            return _PostgresResult([], cursor.rowcount)
        return self._run(run)

    def run_script(self, script):
        """Run statements that take no parameters, as they are (migrations)."""
        return self._run(lambda conn: conn.execute(script))

    def begin(self, pipelined=False):
        """Take a connection for a transaction and open it. `pipelined`: statements
        whose results are not read (executemany) are sent together at the next
        execute or at the end, not a round trip each (not for migrations'
        multi-statement scripts, which pipeline mode cannot run)."""
        self._held = self._take()
        try:
            if pipelined:
                stack = contextlib.ExitStack()
                self._pipeline = self._translate(
                    lambda: stack.enter_context(self._held.pipeline()))
                self._leave_pipeline = stack.__exit__
            self._run(lambda conn: conn.execute("begin"))
        except BaseException:
            self.end("rollback")
            raise

    def end(self, statement):
        """COMMIT or ROLLBACK the open transaction and hand its connection back."""
        conn, leave_pipeline = self._held, self._leave_pipeline
        self._held = self._pipeline = self._leave_pipeline = None
        try:
            conn.execute(statement)
            if leave_pipeline is not None:
                leave_pipeline(None, None, None)  # sends what is queued, reads the results
        except self._psycopg.Error as error:
            if leave_pipeline is not None:
                try:  # leave pipeline mode; the error that matters is this one
                    leave_pipeline(type(error), error, None)
                except Exception:
                    pass
            if statement != "rollback":  # a broken connection's transaction is gone anyway
                raise EngineUnavailable(str(error).strip()) from error
        finally:
            self._pool.putconn(conn)

    def _run(self, work):
        if self._held is not None:
            return self._translate(lambda: work(self._held))
        conn = self._take()
        try:
            return self._translate(lambda: work(conn))
        finally:
            self._pool.putconn(conn)

    def _take(self):
        self._outage.check()
        try:
            conn = self._translate(self._pool.getconn)
        except EngineUnavailable as error:
            self._outage.began(error)
            raise
        self._outage.ended()
        return conn

    def _translate(self, work):
        try:
            return work()
        except self._psycopg.OperationalError as error:
            raise EngineUnavailable(str(error).strip()) from error
        except self._psycopg.DataError as error:
            raise EngineDataError(str(error).strip()) from error
        except self._psycopg.Error as error:
            raise EngineError(str(error).strip()) from error


class _PostgresResult:
    """The fetched rows of a statement, read like a sqlite3 cursor."""

    def __init__(self, rows, rowcount):
        self._rows = rows
        self._next = 0
        self.rowcount = rowcount

    def fetchone(self):
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self):
        rows, self._next = self._rows[self._next:], len(self._rows)
        return rows

    def fetchmany(self, size):
        rows = self._rows[self._next:self._next + size]
        self._next += len(rows)
        return rows

    def __iter__(self):
        return iter(self.fetchall())


def _fetched(cursor):
    return _PostgresResult(cursor.fetchall() if cursor.description else [], cursor.rowcount)


class PostgresRow(tuple):
    """A row read by position or by column name, as sqlite3.Row is."""

    __slots__ = ()
    _index = {}

    def __getitem__(self, item):
        if isinstance(item, str):
            return tuple.__getitem__(self, self._index[item])
        return tuple.__getitem__(self, item)

    def keys(self):
        """The column names, in order."""
        return list(self._index)


@functools.lru_cache(maxsize=512)
def _row_class(names):
    return type("PostgresRow", (PostgresRow,), {"__slots__": (), "_index": {
        name: index for index, name in enumerate(names)}})


def _postgres_row_factory(cursor):
    return _row_class(tuple(column.name for column in cursor.description or ()))


def _numeric_loader(psycopg):
    # sum() of integers is numeric in PostgreSQL; llimit's sums are integers
    # (nano-dollars, tokens), as SQLite gives them.
    class NumericLoader(psycopg.adapt.Loader):
        def load(self, data):
            text = bytes(data).decode("ascii")
            return float(text) if "." in text or "N" in text else int(text)
    return NumericLoader


# `?` and `:name` (sqlite3's parameters) become psycopg's `%s` and `%(name)s`,
# and a literal % is doubled, in quoted text too (psycopg's placeholders know no
# quotes: `like 'u:%'` would fail); otherwise quoted text and `::` casts are left alone.
_SQL_TOKEN = re.compile(r"'(?:[^']|'')*'|\"[^\"]*\"|::|\?|%|:([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=1024)
def _postgres_sql(sql):
    def swap(match):
        token = match.group(0)
        if token == "?":
            return "%s"
        if token == "%":
            return "%%"
        if token.startswith("'"):
            return token.replace("%", "%%")
        if match.group(1):
            return f"%({match.group(1)})s"
        return token
    return _SQL_TOKEN.sub(swap, sql)


class transaction:
    """`with transaction(db):` runs BEGIN IMMEDIATE ... COMMIT, or ROLLBACK."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        begin_write(self.db)
        return self.db

    def __exit__(self, exc_type, exc, tb):
        (rollback if exc_type else commit)(self.db)
        return False


def begin_write(db, batch=False):
    """Start a write transaction now (BEGIN IMMEDIATE on SQLite), not at its first write.

    `batch`: the usage writer's, whose inserts PostgreSQL takes in one round trip.
    """
    if engine_of(db) == "postgres":
        db.begin(pipelined=batch)
    else:
        db.execute("begin immediate")


def commit(db):
    """Commit the open transaction."""
    if engine_of(db) == "postgres":
        db.end("commit")
    else:
        db.execute("commit")


def rollback(db):
    """Roll back the open transaction, if there is one."""
    if not db.in_transaction:
        return
    if engine_of(db) == "postgres":
        db.end("rollback")
    else:
        db.execute("rollback")


def ping(db):
    """Raise unless the database answers a query."""
    db.execute("select 1 from settings limit 1").fetchone()


MIGRATIONS_TABLE_SQL = ("create table if not exists _migrations"
                        " (name text primary key, applied_at text not null)")


def migrate(db):
    """Apply the migrations this database lacks, in order; returns their names."""
    if engine_of(db) == "postgres":
        return _migrate_postgres(db)
    db.execute(MIGRATIONS_TABLE_SQL)
    done = {row[0] for row in db.execute("select name from _migrations")}
    applied = []
    for name, script in MIGRATIONS:
        if name in done:
            continue
        # executescript commits first, so the script carries begin/commit; the
        # _migrations row goes in before its commit.
        body = script.rstrip().removesuffix("commit;")
        db.executescript(body + "\ninsert into _migrations values ("
                         + _sql_quote(name) + ", strftime('%Y-%m-%dT%H:%M:%SZ', 'now'));\ncommit;")
        applied.append(name)
    return applied


def _migrate_postgres(db):
    # One transaction under an advisory lock, so instances starting together
    # apply each migration once; the one that waited finds them done.
    applied = []
    with transaction(db):
        hold_start_lock(db)
        db.execute(MIGRATIONS_TABLE_SQL)
        done = {row[0] for row in db.execute("select name from _migrations")}
        for name, script in MIGRATIONS:
            if name in done:
                continue
            body = POSTGRES_MIGRATIONS.get(name) or script.strip().removeprefix(
                "begin;").removesuffix("commit;")
            db.run_script(body)
            db.execute("insert into _migrations values (?, ?)", (name, utc_iso(time.time())))
            applied.append(name)
    return applied


def hold_start_lock(db):
    """Within the open transaction, wait for (then hold) the lock of start-up work.

    On PostgreSQL, instances starting together take turns at migrating and
    renaming, so the second finds the work done; SQLite's BEGIN IMMEDIATE
    already does that.
    """
    if engine_of(db) == "postgres":
        db.execute("select pg_advisory_xact_lock(7311)")  # 7311: llimit's start-up lock


def _sql_quote(text):
    # Only for migration names, which are constants of this module.
    return "'" + text.replace("'", "''") + "'"


# --- copying a database (migrate-db) ----------------------------------------------

# Kept by each database itself, never copied: migrations applied, the trigger-kept
# version, calls under way (live only in the instance that admitted them), and
# the totals of rolling and reset periods (read afresh from the copied events).
UNCOPIED_TABLES = ("_migrations", "config_version", "reservations", "period_totals")
# Rows the target may hold already (the default project; settings of a first
# start): the source's values win. Every other table only gains rows it lacks.
REPLACED_TABLES = {"settings": "name", "projects": "id"}
LIST_TABLES_SQL = {
    "sqlite": "select name from sqlite_master where type = 'table'"
              " and name not like 'sqlite_%' order by rowid",
    "postgres": "select table_name from information_schema.tables"
                " where table_schema = current_schema() and table_type = 'BASE TABLE'",
}
# After rows came in with their ids, the next id must follow them.
FOLLOW_IDS_SQL = {
    "sqlite": [],
    "postgres": [f"select setval(pg_get_serial_sequence('{table}', 'id'),"
                 f" coalesce((select max(id) from {table}), 0) + 1, false)"
                 for table in ("usage_events", "price_snapshots")],
}


def list_tables(db):
    """The names of a database's tables."""
    return [row[0] for row in db.execute(LIST_TABLES_SQL[engine_of(db)])]


def copy_table(source, target, table, batch=1000):
    """Copy one table's rows the target lacks (by primary key); returns (copied, read).

    Both are migrated to the same schema; the caller holds the target's transaction.
    """
    copied = read = 0
    columns = None
    cursor = source.execute(f"select * from {table}")  # table: a name list_tables found
    while True:
        rows = cursor.fetchmany(batch)
        if not rows:
            break
        if columns is None:
            columns = list(rows[0].keys())
            names = ", ".join(f'"{column}"' for column in columns)
            values = ", ".join("?" * len(columns))
            sql = f"insert into {table} ({names}) values ({values}) on conflict do nothing"
            key = REPLACED_TABLES.get(table)
            if key:
                distinct = "is distinct from" if engine_of(target) == "postgres" else "is not"
                sql = (sql.removesuffix("do nothing") + f"({key}) do update set "
                       + ", ".join(f'"{c}" = excluded."{c}"' for c in columns) + " where "
                       + " or ".join(f'{table}."{c}" {distinct} excluded."{c}"' for c in columns))
        for row in rows:
            copied += target.execute(sql, tuple(row)).rowcount
        read += len(rows)
    return copied, read


def foreign_usage_event(source, target, batch=1000):
    """The id of a usage event in `target` that `source` does not hold as it is, or None.

    migrate-db fills an unused database, or runs again over its own copy: any
    other event would collide by id with one of the source's (and its totals
    with the source's), so the copy would lose usage.
    """
    after = -1
    while True:
        marks = target.execute("select id, created_ms, key_id, cost_nusd from usage_events"
                               " where id > ? order by id limit ?", (after, batch)).fetchall()
        if not marks:
            return None
        ids = [mark[0] for mark in marks]
        held = {tuple(row) for row in source.execute(
            "select id, created_ms, key_id, cost_nusd from usage_events where id >= ?"
            " and id <= ?", (ids[0], ids[-1]))}
        for mark in marks:
            if tuple(mark) not in held:
                return mark[0]
        after = ids[-1]


def follow_copied_ids(db):
    """Let the engine's id sequences go on after rows copied with their ids."""
    for sql in FOLLOW_IDS_SQL[engine_of(db)]:
        db.execute(sql)


# --- running totals' subjects ------------------------------------------------------
# usage_counters.subject says whose running total a row is: all usage, one
# project, user or key, or one user within one project. This codec is the only
# place that knows how a subject is spelled.

SUBJECT_ALL = "*"
SUBJECT_PREFIXES = {"project": "p:", "user": "u:", "key": "k:", "project_user": "pu:"}
SUBJECT_SEPARATOR = "\x1f"  # between a project and a user: no name holds it
SUBJECT_COLUMNS = {"project": ("project_id",), "user": ("user_name",), "key": ("key_id",),
                   "project_user": ("project_id", "user_name")}


def subject_of(kind, name, user_name=None):
    """The subject of a project, user or key `name`, or of `user_name` within project `name`."""
    if kind == "project_user":
        return SUBJECT_PREFIXES[kind] + name + SUBJECT_SEPARATOR + user_name
    return SUBJECT_PREFIXES[kind] + name


def subject_members(kind, project_id=None):
    """The prefix shared by every subject of a kind (of one project's users for project_user)."""
    if kind == "project_user":
        return SUBJECT_PREFIXES[kind] + project_id + SUBJECT_SEPARATOR
    return SUBJECT_PREFIXES[kind]


def parse_subject(subject):
    """(kind, names) of a subject: ("all", ()), ("key", (id,)), ("project_user", (p, u))."""
    if subject == SUBJECT_ALL:
        return "all", ()
    prefix, _, name = subject.partition(":")
    kind = next(k for k, p in SUBJECT_PREFIXES.items() if p == prefix + ":")
    return kind, tuple(name.split(SUBJECT_SEPARATOR)) if kind == "project_user" else (name,)


# --- settings -----------------------------------------------------------------

def get_setting(db, name):
    """A stored setting's value, or None."""
    row = db.execute("select value from settings where name = ?", (name,)).fetchone()
    return row[0] if row else None


def set_setting(db, name, value):
    """Store a setting."""
    db.execute("insert into settings (name, value) values (?, ?)"
               " on conflict (name) do update set value = excluded.value", (name, value))


# --- projects -------------------------------------------------------------------

PROJECT_COLUMNS = ("id", "name", "upstream_kind", "upstream_url", "upstream_key",
                   "api_version", "allow_user_keys", "allow_async", "limit_message",
                   "model_map", "max_keys_per_user", "plans_allowed", "created_at")


def get_project(db, project_id):
    """The project row, or None."""
    return db.execute("select * from projects where id = ?", (project_id,)).fetchone()


def list_projects(db):
    """Every project, by id."""
    return db.execute("select * from projects order by id").fetchall()


def insert_project(db, project):
    """Insert a project from a dict holding every PROJECT_COLUMNS field."""
    db.execute("insert into projects (id, name, upstream_kind, upstream_url, upstream_key,"
               " api_version, allow_user_keys, allow_async, limit_message, model_map,"
               " max_keys_per_user, plans_allowed, created_at) values (:id, :name,"
               " :upstream_kind, :upstream_url, :upstream_key, :api_version, :allow_user_keys,"
               " :allow_async, :limit_message, :model_map, :max_keys_per_user, :plans_allowed,"
               " :created_at)",
               project)


def update_project(db, project):
    """Write back every field of a project dict."""
    db.execute("update projects set name = :name, upstream_kind = :upstream_kind,"
               " upstream_url = :upstream_url, upstream_key = :upstream_key,"
               " api_version = :api_version, allow_user_keys = :allow_user_keys,"
               " allow_async = :allow_async, limit_message = :limit_message,"
               " model_map = :model_map, max_keys_per_user = :max_keys_per_user,"
               " plans_allowed = :plans_allowed where id = :id", project)


def delete_project(db, project_id, revoked_at):
    """Delete a project and its limits; its keys are revoked, its usage stays."""
    db.execute("update api_keys set revoked_at = ? where project_id = ? and revoked_at is null",
               (revoked_at, project_id))
    db.execute("delete from limits where scope = 'project' and target = ?", (project_id,))
    db.execute("delete from projects where id = ?", (project_id,))


# --- keys -----------------------------------------------------------------------

def count_active_user_keys(db, user_name, project_id, now_iso):
    """How many unrevoked, unexpired keys a user holds in a project."""
    return db.execute(
        "select count(*) from api_keys where user_name = ? and project_id = ?"
        " and revoked_at is null and (expires_at is null or expires_at > ?)",
        (user_name, project_id, now_iso)).fetchone()[0]


def config_version(db):
    """The number 0004's triggers move with every change to keys, projects and limits."""
    return db.execute("select version from config_version").fetchone()[0]


def get_key_by_hash(db, key_hash):
    """The key row joined with its project's upstream fields, or None.

    It carries the `config_version` it was read at (one statement, one
    snapshot), so a copy held in memory knows which version it belongs to.
    """
    return db.execute(
        "select k.id, k.key_hash, k.masked_key, k.project_id, k.user_name, k.models,"
        " k.expires_at, k.revoked_at, p.id as project_exists, p.upstream_kind,"
        " p.upstream_url, p.upstream_key, p.api_version, p.limit_message, p.model_map,"
        " p.allow_async, p.plans_allowed,"
        " (select version from config_version) as config_version"
        " from api_keys k left join projects p on p.id = k.project_id"
        " where k.key_hash = ?", (key_hash,)).fetchone()


def get_key(db, key_id):
    """The key row by id, or None."""
    return db.execute("select * from api_keys where id = ?", (key_id,)).fetchone()


def list_keys(db, user_name=None, project_id=None, active_at=None):
    """Keys, newest first, filtered by user, project, and active at a time."""
    return db.execute(
        "select * from api_keys where (cast(:user as text) is null or user_name = :user)"
        " and (cast(:project as text) is null or project_id = :project)"
        " and (cast(:active as text) is null or (revoked_at is null"
        "      and (expires_at is null or expires_at > :active)))"
        " order by created_at desc, id",
        {"user": user_name, "project": project_id, "active": active_at}).fetchall()


def insert_key(db, key):
    """Insert a key row from a dict."""
    db.execute("insert into api_keys (id, key_hash, masked_key, project_id, user_name, note,"
               " models, created_at, expires_at) values (:id, :key_hash, :masked_key,"
               " :project_id, :user_name, :note, :models, :created_at, :expires_at)", key)


def update_key(db, key):
    """Write back a key's editable fields."""
    db.execute("update api_keys set note = :note, models = :models, expires_at = :expires_at,"
               " user_name = :user_name where id = :id", key)


def revoke_key(db, key_id, revoked_at):
    """Mark a key revoked (once; a second revoke keeps the first time)."""
    db.execute("update api_keys set revoked_at = coalesce(revoked_at, ?) where id = ?",
               (revoked_at, key_id))


def key_spend(db, key_ids):
    """Lifetime {key_id: (requests, cost_nusd)} from the running totals."""
    if not key_ids:
        return {}
    subjects = [subject_of("key", key_id) for key_id in key_ids]
    spend = {}
    for first in range(0, len(subjects), 500):  # within every engine's parameter limit
        chunk = subjects[first:first + 500]
        for row in db.execute("select subject, requests, cost_nusd from usage_counters"
                              " where day = 'total' and subject in ("
                              + ", ".join("?" * len(chunk)) + ")", chunk):
            spend[parse_subject(row[0])[1][0]] = (row[1], row[2])
    return spend


# --- prices ---------------------------------------------------------------------

def list_price_overrides(db):
    """Prices an admin set, which win over pricing.json."""
    return db.execute("select * from model_prices order by model").fetchall()


def upsert_price_override(db, model, price, updated_at):
    """Set one model's price override."""
    db.execute("insert into model_prices (model, input, cached_input, output, cache_write,"
               " updated_at) values (?, ?, ?, ?, ?, ?) on conflict (model) do update set"
               " input = excluded.input, cached_input = excluded.cached_input,"
               " output = excluded.output, cache_write = excluded.cache_write,"
               " updated_at = excluded.updated_at",
               (model, price["input"], price.get("cached_input"), price["output"],
                price.get("cache_write"), updated_at))


def get_price_snapshot_id(db, model, prices):
    """The id of a (model, input, cached_input, output, cache_write) snapshot, made once."""
    db.execute("insert into price_snapshots (model, input, cached_input, output,"
               " cache_write) values (?, ?, ?, ?, ?) on conflict do nothing", (model, *prices))
    return db.execute("select id from price_snapshots where model = ? and input = ? and"
                      " cached_input = ? and output = ? and cache_write = ?",
                      (model, *prices)).fetchone()[0]


def list_seen_models(db):
    """Every model name that billable usage has been recorded for.

    Calls that cost nothing (look-ups, refusals by the upstream) store no
    tokens and a cost of 0, so they do not make a model look unpriced.
    """
    return [row[0] for row in db.execute(
        "select model from usage_daily where model != '' group by model"
        " having sum(prompt_tokens + completion_tokens) > 0 or sum(cost_nusd) > 0"
        " or sum(unpriced) > 0 order by model")]


# --- usage ----------------------------------------------------------------------

# A limit's metric -> the Totals field that counts it.
METRIC_FIELDS = {"requests": "requests", "tokens": "tokens", "usd": "cost_nusd"}


@dataclasses.dataclass(slots=True)
class Totals:
    """Requests, tokens (prompt + completion) and cost in nano-dollars of some usage."""
    requests: int = 0
    tokens: int = 0
    cost_nusd: int = 0

    def metric(self, name):
        """The count a limit of metric `name` (usd, tokens, requests) reads."""
        return getattr(self, METRIC_FIELDS[name])

    def add(self, other):
        """Add another Totals into this one."""
        self.requests += other.requests
        self.tokens += other.tokens
        self.cost_nusd += other.cost_nusd

    def subtract(self, other):
        """Take another Totals out of this one."""
        self.requests -= other.requests
        self.tokens -= other.tokens
        self.cost_nusd -= other.cost_nusd

    def __bool__(self):
        return bool(self.requests or self.tokens or self.cost_nusd)


INSERT_USAGE_EVENT_SQL = (
    "insert into usage_events (created_ms, key_id, user_name, project_id, model, endpoint,"
    " status_code, stream, prompt_tokens, cached_tokens, cache_write_tokens,"
    " completion_tokens, reasoning_tokens, cost_nusd, price_id, pricing, latency_ms,"
    " overhead_ms, units) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

UPSERT_USAGE_DAILY_SQL = (
    "insert into usage_daily (day, project_id, user_name, key_id, model, requests,"
    " prompt_tokens, cached_tokens, cache_write_tokens, completion_tokens, cost_nusd,"
    " unpriced) values (?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?)"
    " on conflict (day, project_id, user_name, key_id, model) do update set"
    " requests = usage_daily.requests + 1,"
    " prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens,"
    " cached_tokens = usage_daily.cached_tokens + excluded.cached_tokens,"
    " cache_write_tokens = usage_daily.cache_write_tokens + excluded.cache_write_tokens,"
    " completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens,"
    " cost_nusd = usage_daily.cost_nusd + excluded.cost_nusd,"
    " unpriced = usage_daily.unpriced + excluded.unpriced")

UPSERT_USAGE_COUNTER_SQL = (
    "insert into usage_counters (subject, day, requests, tokens, cost_nusd)"
    " values (?, ?, 1, ?, ?) on conflict (subject, day) do update set"
    " requests = usage_counters.requests + 1, tokens = usage_counters.tokens + excluded.tokens,"
    " cost_nusd = usage_counters.cost_nusd + excluded.cost_nusd")


# Counts an event on into the running totals of rolling and reset periods holding
# it (PostgreSQL); window_* are in seconds, created_ms in milliseconds.
COUNT_PERIOD_TOTALS_SQL = (
    "update period_totals set requests = requests + 1, tokens = tokens + ?,"
    " cost_nusd = cost_nusd + ? where subject = ? and window_start * 1000 <= ?"
    " and (window_end is null or ? < window_end * 1000)")


UPSERT_USAGE_MINUTE_SQL = (
    "insert into usage_minutes (subject, minute_start, requests, tokens, cost_nusd)"
    " values (?, ?, 1, ?, ?) on conflict (subject, minute_start) do update set"
    " requests = usage_minutes.requests + 1, tokens = usage_minutes.tokens + excluded.tokens,"
    " cost_nusd = usage_minutes.cost_nusd + excluded.cost_nusd")


def insert_usage_events(db, events, price_ids, reservation_ids=()):
    """Store a batch of usage events with their daily rollups and running totals.

    The caller holds the transaction; `price_ids[i]` is the snapshot of events[i].
    On PostgreSQL the minute totals and the totals of rolling and reset periods
    are written too, and the batch's reservations deleted in the same
    transaction, so an admission sees each call either reserved or used, never
    both nor neither.
    """
    event_rows, daily_rows, counter_rows, minute_rows, key_touches = [], [], [], [], {}
    period_rows = []
    for event, price_id in zip(events, price_ids):
        cost = event.cost_nusd or 0
        tokens = event.prompt_tokens + event.completion_tokens
        day = _utc_day(event.created_ms / 1000)
        event_rows.append((
            event.created_ms, event.key_id, event.user_name, event.project_id, event.model,
            event.endpoint, event.status_code, int(event.stream), event.prompt_tokens,
            event.cached_tokens, event.cache_write_tokens, event.completion_tokens,
            event.reasoning_tokens, event.cost_nusd, price_id, event.pricing,
            round(event.latency_ms, 2), round(event.overhead_ms, 3),
            json.dumps(event.units, sort_keys=True) if event.units else None))
        daily_rows.append((
            day, event.project_id or "", event.user_name or "", event.key_id or "",
            event.model or "", event.prompt_tokens, event.cached_tokens,
            event.cache_write_tokens, event.completion_tokens, cost,
            int(event.cost_nusd is None)))
        minute = event.created_ms // 60000 * 60
        for subject in event.subjects:
            counter_rows.append((subject, day, tokens, cost))
            counter_rows.append((subject, "total", tokens, cost))
            minute_rows.append((subject, minute, tokens, cost))
            period_rows.append((tokens, cost, subject, event.created_ms, event.created_ms))
        if event.key_id:
            key_touches[event.key_id] = _iso_from_ms(event.created_ms)
    db.executemany(INSERT_USAGE_EVENT_SQL, event_rows)
    db.executemany(UPSERT_USAGE_DAILY_SQL, daily_rows)
    db.executemany(UPSERT_USAGE_COUNTER_SQL, counter_rows)
    db.executemany("update api_keys set last_used_at = ? where id = ?",
                   [(used_at, key_id) for key_id, used_at in key_touches.items()])
    if engine_of(db) == "postgres":  # SQLite's one process counts minutes in memory
        db.executemany(UPSERT_USAGE_MINUTE_SQL, minute_rows)
        if period_rows:
            # Shared subject locks: llimit_admit holds one exclusive while it
            # reads a new period's first total, so each event is in that read
            # or counted on here, never both nor neither.
            lock_subjects(db, sorted({row[2] for row in period_rows}))
            db.executemany(COUNT_PERIOD_TOTALS_SQL, period_rows)
        db.executemany("delete from reservations where id = ?",
                       [(reservation_id,) for reservation_id in reservation_ids])


# --- shared reservations (PostgreSQL) -----------------------------------------------

@dataclasses.dataclass(frozen=True)
class SharedCheck:
    """One limit's window as llimit_admit reads it; `end` None for none."""
    subject: str
    window: str
    start: int              # epoch seconds
    end: int | None
    irregular: bool         # not a calendar window's own period: read from period_totals
    metric: int             # 1 requests, 2 tokens, 3 nusd
    amount: int             # counter units
    block: bool
    strict: bool            # refuse if used + held + need > amount (else used + held >= amount)


def _check_columns(check):
    # The days whose daily totals the check reads: a calendar window's own,
    # or for a period from period_totals, the whole days after its first.
    if check.end is None and not check.irregular:
        first, last = "total", "total"
    else:
        first = _utc_day(-(-check.start // 86400) * 86400 if check.irregular else check.start)
        last = "9999-12-31" if check.end is None else _utc_day(check.end - 1)
    kind, names = parse_subject(check.subject)
    matches = dict(zip(SUBJECT_COLUMNS.get(kind, ()), names))
    return (check.subject, check.window, check.start, check.end, first, last, check.irregular,
            matches.get("project_id"), matches.get("user_name"), matches.get("key_id"),
            check.metric, float(check.amount), check.block, check.strict)


def _utc_day(seconds):
    """The UTC day of epoch seconds, as usage_counters names it: '2026-11-19'."""
    return utc_iso(seconds)[:10]


def admit_reservation(db, config_version, reservation_id, now_ms, expires_ms, checks, need):
    """Check the config version, and a call against shared totals, reserving `need`: one round trip.

    `checks` are SharedChecks in a sorted order (the advisory locks are taken
    in it); `need` is [requests, tokens, nusd]. Returns (refused, version,
    totals): refused is "moved" when the database's config_version is not
    `config_version` (nothing read or reserved), else the index of the first
    check refused or None; totals are [used requests, tokens, nusd, held
    requests, tokens, nusd] per check read. Reserves under `reservation_id`
    only if none refused.
    """
    columns = [list(column) for column in zip(*map(_check_columns, checks))] or [[]] * 14
    row = db.execute(
        "select llimit_admit(?, ?, ?, ?, cast(? as text[]), cast(? as text[]),"
        " cast(? as bigint[]), cast(? as bigint[]), cast(? as text[]), cast(? as text[]),"
        " cast(? as boolean[]), cast(? as text[]), cast(? as text[]), cast(? as text[]),"
        " cast(? as integer[]), cast(? as double precision[]), cast(? as boolean[]),"
        " cast(? as boolean[]), cast(? as bigint[]))",
        (config_version, reservation_id, now_ms, expires_ms, *columns,
         list(need))).fetchone()[0]
    if row[0] < 0:
        return "moved", row[1], []
    totals = [row[first:first + 6] for first in range(2, len(row), 6)]
    return (row[0] - 1 if row[0] else None), row[1], totals


def delete_stale_reservations(db, now_ms, minute_before):
    """Forget reservations past their expiry (an instance died), and minute totals
    and periods' totals that ended before a time."""
    db.execute("delete from reservations where expires_ms <= ?", (now_ms,))
    db.execute("delete from usage_minutes where minute_start < ?", (minute_before,))
    db.execute("delete from period_totals where window_end < ?", (minute_before,))


def lock_subjects(db, subjects):
    """Within the open transaction, hold each subject's advisory lock shared (sorted order)."""
    db.execute("select count(pg_advisory_xact_lock_shared(hashtextextended(s, 1)))"
               " from unnest(cast(? as text[])) as s", (subjects,))


def get_period_total(db, subject, window, start):
    """The running total of a rolling or reset period from period_totals, or None if not made."""
    row = db.execute("select requests, tokens, cost_nusd from period_totals"
                     " where subject = ? and window_name = ? and window_start = ?",
                     (subject, window, start)).fetchone()
    return Totals(*row) if row else None


def count_reservations(db):
    """How many reservation rows are held (any instance, expired or not)."""
    return db.execute("select count(*) from reservations").fetchone()[0]


def get_minute_total(db, subject, minute_start):
    """Totals of a subject in one minute, from usage_minutes (PostgreSQL)."""
    row = db.execute("select requests, tokens, cost_nusd from usage_minutes"
                     " where subject = ? and minute_start = ?", (subject, minute_start)).fetchone()
    return Totals(*row) if row else Totals()


def get_minute_max_member(db, subject_prefix, minute_start, column):
    """The largest one-minute total of `column` among subjects starting with a prefix."""
    sql = {"requests": "select max(requests)", "tokens": "select max(tokens)",
           "cost_nusd": "select max(cost_nusd)"}[column]
    row = db.execute(sql + " from usage_minutes where subject >= ? and subject < ?"
                     " and minute_start = ?",
                     (subject_prefix, subject_prefix + "\uffff", minute_start)).fetchone()
    return row[0] or 0


def insert_refusals(db, refusals):
    """Count refused calls into refusals_daily (the caller holds the transaction)."""
    db.executemany(
        "insert into refusals_daily (day, project_id, user_name, reason, refused)"
        " values (?, ?, ?, ?, 1) on conflict (day, project_id, user_name, reason)"
        " do update set refused = refusals_daily.refused + 1",
        [(_iso_from_ms(refusal.created_ms)[:10], refusal.project_id, refusal.user_name or "",
          refusal.reason) for refusal in refusals])


def refusals_by_user(db, start_day, end_day):
    """(user_name, project_id, reason, refused) over inclusive UTC days, most refused first."""
    return db.execute(
        "select user_name, project_id, reason, sum(refused) as refused from refusals_daily"
        " where day >= ? and day <= ? group by user_name, project_id, reason"
        " order by refused desc, user_name, project_id, reason",
        (start_day, end_day)).fetchall()


def insert_owned_objects(db, rows):
    """Record objects made through llimit (a row for an id known already is ignored).

    The caller holds the transaction; rows are dicts of owned_objects' columns.
    """
    db.executemany(
        "insert into owned_objects (object_id, kind, project_id, owner, key_id,"
        " user_name, created_ms, async) values (:object_id, :kind, :project_id, :owner,"
        " :key_id, :user_name, :created_ms, :async) on conflict do nothing", rows)


def get_owned_object(db, object_id):
    """The owned_objects row of an id, or None (one primary-key look-up)."""
    return db.execute("select * from owned_objects where object_id = ?",
                      (object_id,)).fetchone()


def owned_ids(db, project_id, owner, object_ids):
    """The subset of `object_ids` that `owner` owns in a project."""
    object_ids, owned = list(object_ids), set()
    for first in range(0, len(object_ids), 500):  # within every engine's parameter limit
        chunk = object_ids[first:first + 500]
        owned.update(row[0] for row in db.execute(
            "select object_id from owned_objects where object_id in ("
            + ", ".join("?" * len(chunk)) + ") and project_id = ? and owner = ?",
            (*chunk, project_id, owner)))
    return owned


def list_unsettled_async_objects(db, created_after_ms, limit=1000):
    """Async objects (batches, background responses) made since a time and not yet charged."""
    return db.execute("select * from owned_objects where async = 1 and charged_ms is null"
                      " and created_ms > ? order by created_ms limit ?",
                      (created_after_ms, limit)).fetchall()


def claim_object_charge(db, object_id, charged_ms):
    """Mark an async object charged; False if it was already (the caller holds the transaction)."""
    return db.execute("update owned_objects set charged_ms = ? where object_id = ?"
                      " and charged_ms is null", (charged_ms, object_id)).rowcount == 1


def get_counter(db, subject, first_day, last_day):
    """Totals of a subject summed over days first..last."""
    row = db.execute(
        "select coalesce(sum(requests), 0), coalesce(sum(tokens), 0),"
        " coalesce(sum(cost_nusd), 0) from usage_counters"
        " where subject = ? and day >= ? and day <= ?", (subject, first_day, last_day)).fetchone()
    return Totals(row[0], row[1], row[2])


def get_counter_max_member(db, subject_prefix, first_day, last_day, column):
    """The largest total of `column` among subjects starting with a prefix."""
    sql = {
        "requests": "select max(s) from (select sum(requests) s",
        "tokens": "select max(s) from (select sum(tokens) s",
        "cost_nusd": "select max(s) from (select sum(cost_nusd) s",
    }[column]
    row = db.execute(sql + " from usage_counters where subject >= ? and subject < ?"
                     " and day >= ? and day <= ? group by subject) as members",
                     (subject_prefix, subject_prefix + "\uffff", first_day, last_day)).fetchone()
    return row[0] or 0


def get_events_total(db, subject, start_ms, end_ms):
    """Totals of a subject's usage events in [start_ms, end_ms).

    For minute windows, which have no rollup: a minute holds few events, and
    the created_ms index finds them.
    """
    kind, values = parse_subject(subject)
    where = "".join(f" and {column} = ?" for column in SUBJECT_COLUMNS.get(kind, ()))
    row = db.execute(
        "select count(*), coalesce(sum(prompt_tokens + completion_tokens), 0),"
        " coalesce(sum(cost_nusd), 0) from usage_events"
        " where created_ms >= ? and created_ms < ?" + where,
        (start_ms, end_ms, *values)).fetchone()
    return Totals(row[0], row[1], row[2])


def get_lifetime_total(db, subject):
    """Totals a subject has used since it first appeared."""
    return get_counter(db, subject, "total", "total")


USAGE_GROUP_COLUMNS = {
    "user": "user_name", "key": "key_id", "project": "project_id",
    "model": "model", "day": "day",
}

USAGE_BY_GROUP_SQL = {
    group: (f"select {column} as grp, sum(requests), sum(prompt_tokens), sum(cached_tokens),"
            f" sum(cache_write_tokens), sum(completion_tokens), sum(cost_nusd), sum(unpriced)"
            f" from usage_daily where day >= :start and day <= :end"
            f" and (cast(:user as text) is null or user_name = :user)"
            f" group by {column} order by " + ("grp" if group == "day" else "7 desc, grp"))
    for group, column in USAGE_GROUP_COLUMNS.items()
}


def usage_by_group(db, group_by, start_day, end_day, user_name=None):
    """Usage rows summed per group over inclusive UTC days, from the rollup."""
    return db.execute(USAGE_BY_GROUP_SQL[group_by],
                      {"start": start_day, "end": end_day, "user": user_name}).fetchall()


USAGE_BY_DAY_AND_GROUP_SQL = {
    group: (f"select day, {column}, sum(cost_nusd) from usage_daily"
            f" where day >= ? and day <= ? group by day, {column} order by day")
    for group, column in USAGE_GROUP_COLUMNS.items() if group != "day"
}


def usage_by_day_and_group(db, group_by, start_day, end_day):
    """(day, group, cost_nusd) rows over inclusive UTC days, for stacked charts."""
    return db.execute(USAGE_BY_DAY_AND_GROUP_SQL[group_by], (start_day, end_day)).fetchall()


def list_user_totals(db):
    """(user_name, requests, tokens, cost_nusd) of every user ever metered, by lifetime cost."""
    prefix = subject_members("user")
    return [(parse_subject(row[0])[1][0], row[1], row[2], row[3]) for row in db.execute(
        "select subject, requests, tokens, cost_nusd from usage_counters"
        " where day = 'total' and subject >= ? and subject < ?"
        " order by cost_nusd desc, subject", (prefix, prefix + "\uffff"))]


def iter_usage_daily(db, start_day, end_day):
    """Rollup rows over inclusive UTC days, by day, user, project and model."""
    return db.execute(
        "select day, user_name, project_id, model, sum(requests), sum(prompt_tokens),"
        " sum(cached_tokens), sum(completion_tokens), sum(cost_nusd), sum(unpriced)"
        " from usage_daily where day >= ? and day <= ? group by day, user_name, project_id,"
        " model order by day, user_name, project_id, model", (start_day, end_day))


def iter_usage_events(db, start_ms, end_ms, batch=2000):
    """Yield raw usage events created in [start_ms, end_ms), oldest first.

    Read a page at a time, each page after the last one's (created_ms, id), so
    no engine holds a cursor open across the whole export.
    """
    after_ms, after_id = start_ms - 1, 2 ** 62
    while True:
        rows = db.execute(
            "select e.*, p.input as price_input, p.cached_input as price_cached_input,"
            " p.output as price_output, p.cache_write as price_cache_write"
            " from usage_events e left join price_snapshots p on p.id = e.price_id"
            " where e.created_ms >= ? and e.created_ms < ?"
            " and (e.created_ms > ? or (e.created_ms = ? and e.id > ?))"
            " order by e.created_ms, e.id limit ?",
            (start_ms, end_ms, after_ms, after_ms, after_id, batch)).fetchall()
        yield from rows
        if len(rows) < batch:
            return
        after_ms, after_id = rows[-1]["created_ms"], rows[-1]["id"]


def reprice_usage_events(db, repriced, now_ms):
    """Store new (cost_nusd, price_id, pricing, id) for events, then rebuild rollups."""
    db.executemany("update usage_events set cost_nusd = ?, price_id = ?, pricing = ?"
                   " where id = ?", repriced)
    rebuild_rollups(db, now_ms)


# The UTC day of an event's created_ms, in each engine's words.
EVENT_DAY_SQL = {
    "sqlite": "strftime('%Y-%m-%d', created_ms / 1000, 'unixepoch')",
    "postgres": "to_char(to_timestamp(created_ms / 1000) at time zone 'utc', 'YYYY-MM-DD')",
}


def rebuild_rollups(db, now_ms):
    """Recompute usage_daily and usage_counters (and on PostgreSQL the last hour's
    usage_minutes) from usage_events (admin path only)."""
    event_day = EVENT_DAY_SQL[engine_of(db)]
    minutes = engine_of(db) == "postgres"  # SQLite's one process counts minutes in memory
    if minutes:
        db.execute("delete from usage_minutes")
        db.execute("delete from period_totals")  # made again from the events on first use
    db.execute("delete from usage_daily")
    db.execute(
        f"insert into usage_daily select {event_day},"
        " coalesce(project_id, ''), coalesce(user_name, ''), coalesce(key_id, ''),"
        " coalesce(model, ''), count(*), sum(prompt_tokens), sum(cached_tokens),"
        " sum(cache_write_tokens), sum(completion_tokens), coalesce(sum(cost_nusd), 0),"
        " sum(case when cost_nusd is null then 1 else 0 end) from usage_events"
        " group by 1, 2, 3, 4, 5")
    db.execute("delete from usage_counters")
    prefix = SUBJECT_PREFIXES
    for subject_sql, parts in (
            ("cast(? as text)", (SUBJECT_ALL,)),
            ("cast(? as text) || project_id", (prefix["project"],)),
            ("cast(? as text) || key_id", (prefix["key"],)),
            ("cast(? as text) || user_name", (prefix["user"],)),
            ("cast(? as text) || project_id || cast(? as text) || user_name",
             (prefix["project_user"], SUBJECT_SEPARATOR))):
        # subject_sql is one of the constant expressions above, never user input.
        db.execute(
            f"insert into usage_counters select {subject_sql} as subject,"
            f" {event_day} as d, count(*),"
            " sum(prompt_tokens + completion_tokens), coalesce(sum(cost_nusd), 0)"
            f" from usage_events where {subject_sql} is not null group by subject, d",
            parts + parts)
        if minutes:  # the hour delete_stale_reservations keeps
            db.execute(
                f"insert into usage_minutes select {subject_sql} as subject,"
                " created_ms / 60000 * 60 as m, count(*),"
                " sum(prompt_tokens + completion_tokens), coalesce(sum(cost_nusd), 0)"
                f" from usage_events where {subject_sql} is not null and created_ms >= ?"
                " group by subject, m", parts + parts + (now_ms // 60000 * 60000 - 3600_000,))
    db.execute("insert into usage_counters select subject, 'total', sum(requests), sum(tokens),"
               " sum(cost_nusd) from usage_counters group by subject")


# --- user names under the Identity rule ------------------------------------------

def list_stored_user_names(db):
    """Every user name stored: of keys, limits, sessions and running totals.

    Each metered user has a lifetime running total, so this reads small tables
    only, never the usage events.
    """
    names = set()
    for sql in ("select distinct user_name from api_keys where user_name is not null",
                "select distinct target from limits where scope = 'user'",
                "select distinct user_name from sessions where user_name is not null",
                "select user_name from user_plans"):
        names.update(row[0] for row in db.execute(sql))
    for subject in _user_subjects(db):
        names.add(parse_subject(subject)[1][-1])
    return names


def _user_subjects(db):
    return [row[0] for row in db.execute(
        "select subject from usage_counters where day = 'total' and"
        " ((subject >= ? and subject < ?) or (subject >= ? and subject < ?))",
        (SUBJECT_PREFIXES["user"], SUBJECT_PREFIXES["user"] + "\uffff",
         SUBJECT_PREFIXES["project_user"], SUBJECT_PREFIXES["project_user"] + "\uffff"))]


def rename_users(db, renames):
    """Rewrite user names {old: new} in every table; rows that meet are summed, none lost.

    The caller holds the transaction. Usage events keep their rows; daily
    rollups and running totals of an old name are added into the new one's.
    """
    db.execute("create temp table if not exists user_renames"
               " (old text primary key, new text not null)")
    db.execute("delete from user_renames")
    db.executemany("insert into user_renames values (?, ?)", renames.items())
    renamed = "(select new from user_renames where old = {0})"
    for table, column, extra in (("api_keys", "user_name", ""), ("usage_events", "user_name", ""),
                                 ("sessions", "user_name", ""),
                                 ("limits", "target", " and scope = 'user'")):
        # table and column are the constants above, never input.
        db.execute(f"update {table} set {column} = {renamed.format(column)}"
                   f" where {column} in (select old from user_renames){extra}")
    db.execute(
        # Summed first: two old names of one new name (Bob, BOB) meet in one row,
        # which PostgreSQL's upsert may not touch twice in one statement.
        "insert into usage_daily select d.day, d.project_id, r.new, d.key_id, d.model,"
        " sum(d.requests), sum(d.prompt_tokens), sum(d.cached_tokens),"
        " sum(d.cache_write_tokens), sum(d.completion_tokens), sum(d.cost_nusd),"
        " sum(d.unpriced) from usage_daily d join user_renames r on r.old = d.user_name"
        " group by d.day, d.project_id, r.new, d.key_id, d.model"
        " on conflict (day, project_id, user_name, key_id, model) do update set"
        " requests = usage_daily.requests + excluded.requests,"
        " prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens,"
        " cached_tokens = usage_daily.cached_tokens + excluded.cached_tokens,"
        " cache_write_tokens = usage_daily.cache_write_tokens + excluded.cache_write_tokens,"
        " completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens,"
        " cost_nusd = usage_daily.cost_nusd + excluded.cost_nusd,"
        " unpriced = usage_daily.unpriced + excluded.unpriced")
    db.execute("delete from usage_daily where user_name in (select old from user_renames)")
    # A plan the new name has already wins over the old name's.
    db.execute("insert into user_plans select r.new, p.plan_id, p.source, p.updated_at"
               " from user_plans p join user_renames r on r.old = p.user_name where true"
               " on conflict (user_name) do nothing")
    db.execute("delete from user_plans where user_name in (select old from user_renames)")
    subject_renames = []
    for subject in _user_subjects(db):
        kind, names = parse_subject(subject)
        if names[-1] in renames:
            subject_renames.append((subject, subject_of(kind, *names[:-1], renames[names[-1]])
                                    if kind == "project_user"
                                    else subject_of(kind, renames[names[-1]])))
    for old, new in subject_renames:
        db.execute(
            "insert into usage_counters select ?, day, requests, tokens, cost_nusd"
            " from usage_counters where subject = ? on conflict (subject, day) do update set"
            " requests = usage_counters.requests + excluded.requests,"
            " tokens = usage_counters.tokens + excluded.tokens,"
            " cost_nusd = usage_counters.cost_nusd + excluded.cost_nusd", (new, old))
        db.execute("delete from usage_counters where subject = ?", (old,))
    db.execute("delete from user_renames")


# --- limits and alerts ------------------------------------------------------------

def list_limits(db):
    """Every limit."""
    return db.execute("select * from limits order by created_at, id").fetchall()


def get_limit(db, limit_id):
    """One limit row, or None."""
    return db.execute("select * from limits where id = ?", (limit_id,)).fetchone()


def insert_limit(db, limit):
    """Insert a limit from a dict."""
    db.execute("insert into limits (id, scope, target, each, metric, \"window\", amount, action,"
               " alert_at, note, starts_at, reset_at, created_at) values (:id, :scope, :target,"
               " :each, :metric, :window, :amount, :action, :alert_at, :note, :starts_at,"
               " :reset_at, :created_at)", limit)


def update_limit(db, limit):
    """Write back every field of a limit dict."""
    db.execute("update limits set scope = :scope, target = :target, each = :each,"
               " metric = :metric, \"window\" = :window, amount = :amount, action = :action,"
               " alert_at = :alert_at, note = :note, starts_at = :starts_at,"
               " reset_at = :reset_at where id = :id", limit)


# --- plans ----------------------------------------------------------------------

def list_plans(db):
    """Every plan, by id."""
    return db.execute("select * from plans order by id").fetchall()


def get_plan(db, plan_id):
    """One plan row, or None."""
    return db.execute("select * from plans where id = ?", (plan_id,)).fetchone()


def insert_plan(db, plan):
    """Insert a plan row from a dict (its limits are rows of limits)."""
    db.execute("insert into plans (id, name, created_at) values (:id, :name, :created_at)", plan)


def rename_plan(db, plan_id, name):
    """Change a plan's name."""
    db.execute("update plans set name = ? where id = ?", (name, plan_id))


def delete_plan(db, plan_id):
    """Delete a plan, its limits and its members' assignments; returns whether it existed."""
    db.execute("delete from limits where scope = 'plan' and target = ?", (plan_id,))
    db.execute("delete from user_plans where plan_id = ?", (plan_id,))
    return db.execute("delete from plans where id = ?", (plan_id,)).rowcount > 0


def list_user_plans(db):
    """Every user's assigned plan: rows of user_name, plan_id, source."""
    return db.execute("select user_name, plan_id, source from user_plans").fetchall()


def get_user_plan(db, user_name):
    """A user's user_plans row, or None."""
    return db.execute("select * from user_plans where user_name = ?", (user_name,)).fetchone()


def set_user_plan(db, user_name, plan_id, source, updated_at):
    """Assign a user to a plan (replacing any earlier assignment)."""
    db.execute("insert into user_plans (user_name, plan_id, source, updated_at)"
               " values (?, ?, ?, ?) on conflict (user_name) do update set"
               " plan_id = excluded.plan_id, source = excluded.source,"
               " updated_at = excluded.updated_at", (user_name, plan_id, source, updated_at))


def delete_user_plan(db, user_name, source=None):
    """Remove a user's assignment (only one made by `source`, when given)."""
    if source is None:
        db.execute("delete from user_plans where user_name = ?", (user_name,))
    else:  # no `? is null`: PostgreSQL cannot type an untyped null parameter
        db.execute("delete from user_plans where user_name = ? and source = ?",
                   (user_name, source))


def delete_limit(db, limit_id):
    """Delete a limit; returns whether it existed."""
    return db.execute("delete from limits where id = ?", (limit_id,)).rowcount > 0


def insert_alert_once(db, alert):
    """Record an alert; returns False when this threshold already fired this window."""
    return db.execute(
        "insert into alerts_sent (limit_id, subject, window_start, threshold,"
        " created_at, text) values (:limit_id, :subject, :window_start, :threshold,"
        " :created_at, :text) on conflict do nothing", alert).rowcount > 0


def list_undelivered_alerts(db):
    """Alerts whose webhook delivery has not succeeded yet."""
    return db.execute("select * from alerts_sent where delivered_at is null"
                      " order by created_at").fetchall()


def mark_alert_delivered(db, alert, delivered_at):
    """Note that an alert reached the webhook."""
    db.execute("update alerts_sent set delivered_at = ? where limit_id = ? and subject = ?"
               " and window_start = ? and threshold = ?",
               (delivered_at, alert["limit_id"], alert["subject"], alert["window_start"],
                alert["threshold"]))


# --- sessions -------------------------------------------------------------------

def insert_session(db, session):
    """Store a new session from a dict."""
    db.execute("insert into sessions (id_hash, user_name, is_admin, csrf_token, pending,"
               " created_at, expires_at, admin_token_fingerprint) values (:id_hash, :user_name,"
               " :is_admin, :csrf_token, :pending, :created_at, :expires_at,"
               " :admin_token_fingerprint)", session)


def get_session(db, id_hash, now_iso):
    """The unexpired session with this id hash, or None."""
    return db.execute("select * from sessions where id_hash = ? and expires_at > ?",
                      (id_hash, now_iso)).fetchone()


def set_session_pending(db, id_hash, pending):
    """Keep (or clear, with None) the OIDC sign-in a session has under way."""
    db.execute("update sessions set pending = ? where id_hash = ?", (pending, id_hash))


def set_session_new_key(db, id_hash, sealed):
    """Keep a new key's sealed secret in its session row until the next page shows it."""
    db.execute("update sessions set new_key_sealed = ? where id_hash = ?", (sealed, id_hash))


def take_session_new_key(db, id_hash):
    """A session's sealed new key, cleared as it is read: one page gets it, or None."""
    row = db.execute("select new_key_sealed from sessions where id_hash = ?",
                     (id_hash,)).fetchone()
    if row is None or row[0] is None:
        return None
    # Cleared only if still there: of two pages at once (any instances), one wins.
    taken = db.execute("update sessions set new_key_sealed = null where id_hash = ?"
                       " and new_key_sealed = ?", (id_hash, row[0])).rowcount
    return row[0] if taken == 1 else None


def delete_session(db, id_hash):
    """End a session."""
    db.execute("delete from sessions where id_hash = ?", (id_hash,))


def delete_expired_sessions(db, now_iso):
    """Forget sessions that have expired."""
    db.execute("delete from sessions where expires_at <= ?", (now_iso,))


def _iso_from_ms(ms):
    return utc_iso(ms / 1000)


def utc_iso(seconds):
    """Seconds since the epoch as ISO 8601 UTC, e.g. 2026-11-23T07:00:00Z.

    Always four digits of year (glibc's %Y does not pad), within 0001-9999: stored
    times and days are compared as text and read back with fromisoformat. The one
    formatter of times and days (_utc_day, _iso_from_ms).
    """
    if not -30610224000 <= seconds <= 253402300799:  # outside 1000-01-01 .. 9999-12-31
        moment = time.gmtime(min(max(seconds, -62135596800), 253402300799))
        return f"{moment.tm_year:04d}" + time.strftime("-%m-%dT%H:%M:%SZ", moment)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def iso_seconds(text):
    """Seconds since the epoch of an ISO 8601 time (UTC when it names no zone)."""
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


# =============================================================================
# 3. Pricing and metering
#    Prices (pricing.json overlaid by admin overrides), token usage read from
#    each provider's bodies and streams, cost, and the usage writer: one thread
#    that commits usage events in groups, so request threads never queue
#    behind one another on SQLite's write lock. Knows nothing of HTTP.
# =============================================================================

# Snapshot suffixes a reported model may carry beyond its listed name: dates
# (-2024-08-06, -20250929), old OpenAI -0613, Vertex -001, and -latest.
DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|\d{4}|\d{3}|latest)$")
PRICE_FIELDS = ("input", "cached_input", "output", "cache_write")
# Beyond token prices, an entry of pricing.json may say (see docs/pricing-sources.md):
# what a fine-tuned model of it costs, the most it reads and writes per call
# (which bound a call's reservation), and prices of things other than tokens.
SIZE_FIELDS = ("max_input_tokens", "max_output_tokens")
FINE_TUNED_FIELD = "fine_tuned"
UNIT_PRICE_FIELDS = {               # field: what one unit of it is
    "cache_write_1h": "USD per 1M tokens written to a 1-hour cache (default 2x input)",
    "images": 'USD per image by "quality/size" or "size", e.g. {"hd/1024x1792": 0.12}',
    "per_minute": "USD per minute of audio transcribed or translated",
    "per_1m_characters": "USD per 1M characters of text spoken",
    "per_1k_requests": 'USD per 1,000 server-side tool uses, e.g. {"web_search": 10}',
    "long_context": 'above "above_input_tokens" input tokens, the token prices given here',
    "service_tiers": 'token prices by the service_tier answered, e.g. {"priority": {...}}',
}
NON_TOKEN_FIELDS = ("images", "per_minute", "per_1m_characters")  # an entry may price only these
PRICE_TIERS = {"long_context": ("above_input_tokens", *PRICE_FIELDS, "cache_write_1h"),
               "service_tiers": (*PRICE_FIELDS, "cache_write_1h")}
IMAGE_SIZE = re.compile(r"^(?:(?:standard|hd|low|medium|high)/)?(?:\d{2,5}x\d{2,5}|auto)$")
TOOL_UNITS = ("web_search",)
MAX_REMEMBERED_MODELS = 1000  # price look-ups a Pricebook keeps, at most
FALLBACK_PRICE = "*"   # PUT /admin/pricing/*: the price of every model without its own
FINE_TUNED_MODEL = re.compile(r"^ft:([^:]+):|^(.+?)\.ft-")  # OpenAI ft:BASE:..., Azure BASE.ft-...
MAX_PRICE = 1e6  # USD per 1M tokens; far above any real price, and costs stay within int64
NANO_PER_USD_PER_MTOK = 1000  # 1 token at $1/1M tokens is 1,000 nano-dollars


def _unit_price_error(price):
    def number(value):
        return (not isinstance(value, bool) and isinstance(value, (int, float))
                and 0 <= value <= MAX_PRICE)

    for field in ("cache_write_1h", "per_minute", "per_1m_characters"):
        if field in price and not number(price[field]):
            return f"{field} must be a number from 0 to {MAX_PRICE:g}"
    for field, names in (("images", None), ("per_1k_requests", TOOL_UNITS)):
        table = price.get(field)
        if table is None:
            continue
        if not isinstance(table, dict) or not table:
            return f"{field} must be an object of prices"
        for name, value in table.items():
            if (names is not None and name not in names) or (
                    names is None and not IMAGE_SIZE.fullmatch(name)):
                return f"{field}: {name!r} is not a known " + (
                    "tool" if names else "quality/size such as hd/1024x1792")
            if not number(value):
                return f"{field}: {name} must be a number from 0 to {MAX_PRICE:g}"
    for field, allowed in PRICE_TIERS.items():
        tiers = price.get(field)
        if tiers is None:
            continue
        for tier in ([tiers] if field == "long_context" else
                     tiers.values() if isinstance(tiers, dict) else [None]):
            if not isinstance(tier, dict) or set(tier) - set(allowed) or not all(
                    number(value) for value in tier.values()):
                return f"{field} must hold only {', '.join(allowed)}, as numbers"
        if field == "long_context" and not isinstance(tiers.get("above_input_tokens"), int):
            return "long_context needs above_input_tokens"
    return None


def load_price_file(path):
    """pricing.json as {model: {field: USD per 1M tokens}}; checks every entry."""
    table, errors = check_price_file(path)
    if errors:
        raise ValueError(f"{path}: {errors[0]}")
    return table


def check_price_file(path):
    """(the table, ["model: what is wrong", ...]) of a prices file, every entry checked."""
    with open(path, encoding="utf-8") as handle:
        table = json.load(handle)
    if not isinstance(table, dict):
        return {}, ["expected an object of model prices"]
    return table, [f"{model}: {error}" for model, price in table.items()
                   for error in [validate_price(price)] if error]


def validate_price(price, extra_fields=(*SIZE_FIELDS, FINE_TUNED_FIELD, *UNIT_PRICE_FIELDS)):
    """None when a price object is well formed, else what is wrong with it (the schema)."""
    if not isinstance(price, dict):
        return "a price must be an object"
    unknown = set(price) - set(PRICE_FIELDS) - set(extra_fields)
    if unknown:
        return f"unknown price field {sorted(unknown)[0]!r}"
    error = _unit_price_error(price)
    if error:
        return error
    if "input" not in price and "output" not in price and any(
            field in price for field in NON_TOKEN_FIELDS):
        return None  # priced by the image, minute or character only
    for field in SIZE_FIELDS:
        value = price.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value <= 0):
            return f"{field} must be a whole number of tokens above 0"
    if FINE_TUNED_FIELD in price:
        error = validate_price(price[FINE_TUNED_FIELD], ())
        if error:
            return f"{FINE_TUNED_FIELD}: {error}"
    for field in PRICE_FIELDS:
        value = price.get(field)
        if field in ("input", "output") and value is None:
            return f"{field} is required"
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value <= MAX_PRICE):
            return f"{field} must be a number from 0 to {MAX_PRICE:g}"
    return None


class Pricebook:
    """Current prices: pricing.json with the database's overrides on top."""

    def __init__(self, file_prices, overrides=()):
        self.file_prices = dict(file_prices)
        self.overrides = {row["model"]: {f: row[f] for f in PRICE_FIELDS if row[f] is not None}
                          for row in overrides}
        # An override sets token prices; what the file says beyond them still holds.
        self._table = {**self.file_prices, **{  # read on every call
            model: {**{field: value for field, value in self.file_prices.get(model, {}).items()
                       if field not in PRICE_FIELDS}, **price}
            for model, price in self.overrides.items()}}
        self._entries = {}  # model -> entry(model); a new Pricebook replaces this one on change

    def table(self):
        """{model: price dict} as in force now."""
        return self._table

    def resolve(self, model):
        """(name the price is listed under, (input, cached, output, cache_write)) or None.

        A dated name such as gpt-4o-2024-08-06 (or gpt-4-0613, gemini-2.0-flash-001)
        falls back to its base name, and a provider prefix (openai/gpt-4o, as
        OpenRouter reports) to the bare name. A fine-tuned model (ft:gpt-4o-mini:org::id)
        takes its base model's `fine_tuned` price, never the base price itself. A model
        with no price of its own takes the fallback price (`*`) when an admin set one.
        """
        found = self.entry(model)
        return None if found is None else (found[0], price_usage(found[1], Usage())[0])

    def cost(self, model, usage):
        """(name, token prices applied, nano-dollars) of a Usage at a model's price; or None."""
        found = self.entry(model)
        return None if found is None else (found[0], *price_usage(found[1], usage))

    def entry(self, model):
        """(name, the pricing.json entry in force) for a model, as `resolve` finds it; or None."""
        if not model:
            return None
        try:
            return self._entries[model]
        except KeyError:
            pass
        found = self._find_entry(model)
        if len(self._entries) >= MAX_REMEMBERED_MODELS:  # model names are client-chosen
            self._entries.clear()
        self._entries[model] = found
        return found

    def _find_entry(self, model):
        table = self.table()
        fine_tuned = FINE_TUNED_MODEL.match(model)
        if fine_tuned:
            base = self._find_entry(fine_tuned.group(1) or fine_tuned.group(2))
            if base and base[0] != FALLBACK_PRICE and base[1].get(FINE_TUNED_FIELD):
                return base[0] + " (fine-tuned)", base[1][FINE_TUNED_FIELD]
        else:
            candidates = [model, DATE_SUFFIX.sub("", model)]
            if "/" in model:
                bare = model.rsplit("/", 1)[1]
                candidates += [bare, DATE_SUFFIX.sub("", bare)]
            for name in candidates:
                if table.get(name) and name != FALLBACK_PRICE:
                    return name, table[name]
        fallback = table.get(FALLBACK_PRICE)
        return (FALLBACK_PRICE, fallback) if fallback else None

    def sizes(self, model):
        """(max_input_tokens, max_output_tokens) an entry states for a model; None where not."""
        found = self.entry(model)
        if found is None:
            return None, None
        return tuple(found[1].get(field) for field in SIZE_FIELDS)


def save_price(db, model, price, now_iso):
    """Store an admin's price for a model (USD per 1M tokens); 400 when it is malformed."""
    error = validate_price(price, ())  # only token prices are stored; the rest would be lost
    if error:
        raise LlimitError(400, "invalid_request_error", error, code="invalid_price")
    if not model or len(model) > 200:
        raise LlimitError(400, "invalid_request_error", "Bad model name.")
    with transaction(db):
        upsert_price_override(db, model, price, now_iso)


def missing_prices(db, pricebook):
    """Models that usage was recorded for but that have no price now."""
    return [model for model in list_seen_models(db) if pricebook.resolve(model) is None]


@dataclasses.dataclass
class Usage:
    """Tokens of one call, in the contract's terms (prompt includes cached), and the
    other things it is billed by (see UNIT_PRICE_FIELDS)."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0        # all cache writes, the 1-hour ones included
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_1h_tokens: int = 0
    images: int = 0
    image_kind: str | None = None      # "quality/size" as asked for
    audio_seconds: float = 0.0
    characters: int = 0
    web_search: int = 0
    service_tier: str | None = None

    def add(self, other):
        """Add another Usage's counts into this one (names such as the tier: the first kept)."""
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if isinstance(theirs, str) or theirs is None:
                setattr(self, field.name, mine or theirs)
            else:
                setattr(self, field.name, mine + theirs)

    def units(self):
        """What the call is billed by beyond its five token counts, for storage; None: nothing."""
        units = {name: getattr(self, name) for name in UNIT_NAMES if getattr(self, name)}
        return units or None


# Usage fields stored in usage_events.units (JSON), so a reprice can cost them again.
UNIT_NAMES = ("cache_write_1h_tokens", "images", "image_kind", "audio_seconds", "characters",
              "web_search", "service_tier")


def _int(value):
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_from_openai(usage):
    """Usage from an OpenAI `usage` object (chat, completions, embeddings, responses)."""
    responses = "input_tokens" in usage and "prompt_tokens" not in usage  # the Responses API
    inputs = usage.get("input_tokens_details" if responses else "prompt_tokens_details")
    outputs = usage.get("output_tokens_details" if responses else "completion_tokens_details")
    inputs = inputs if isinstance(inputs, dict) else {}
    outputs = outputs if isinstance(outputs, dict) else {}
    prompt = _int(usage.get("input_tokens" if responses else "prompt_tokens"))
    cached = min(_int(inputs.get("cached_tokens")), prompt)
    # The models that bill cache writes report them among the input tokens.
    return Usage(
        prompt_tokens=prompt, cached_tokens=cached,
        cache_write_tokens=min(_int(inputs.get("cache_write_tokens")), prompt - cached),
        completion_tokens=_int(usage.get("output_tokens" if responses else "completion_tokens")),
        reasoning_tokens=_int(outputs.get("reasoning_tokens")))


def usage_from_anthropic(usage):
    """Usage from an Anthropic `usage` object: input_tokens excludes cache reads and writes."""
    cache_read = _int(usage.get("cache_read_input_tokens"))
    cache_write = _int(usage.get("cache_creation_input_tokens"))
    # Anthropic counts thinking inside output_tokens; where a gateway reports it apart,
    # it goes to the reasoning column (still inside completion tokens).
    details = usage.get("output_tokens_details")
    thinking = _int(details.get("reasoning_tokens") or details.get("thinking_tokens")) \
        if isinstance(details, dict) else 0
    output = _int(usage.get("output_tokens"))
    creation = usage.get("cache_creation")
    one_hour = _int(creation.get("ephemeral_1h_input_tokens")) \
        if isinstance(creation, dict) else 0
    tools = usage.get("server_tool_use")
    return Usage(
        prompt_tokens=_int(usage.get("input_tokens")) + cache_read + cache_write,
        cached_tokens=cache_read, cache_write_tokens=cache_write,
        completion_tokens=output, reasoning_tokens=min(thinking, output),
        cache_write_1h_tokens=min(one_hour, cache_write),
        web_search=_int(tools.get("web_search_requests")) if isinstance(tools, dict) else 0,
        service_tier=_text_field(usage.get("service_tier")))


def _text_field(value):
    return value[:40] if isinstance(value, str) and value else None


def usage_from_gemini(metadata):
    """Usage from a Gemini `usageMetadata` object.

    promptTokenCount already holds the cached content's tokens; tool-use
    prompt tokens (search results fed back) are billed as input too, and
    thinking tokens as output, beside the candidates' own.
    """
    thoughts = _int(metadata.get("thoughtsTokenCount"))
    return Usage(
        prompt_tokens=_int(metadata.get("promptTokenCount"))
        + _int(metadata.get("toolUsePromptTokenCount")),
        cached_tokens=_int(metadata.get("cachedContentTokenCount")),
        completion_tokens=_int(metadata.get("candidatesTokenCount")) + thoughts,
        reasoning_tokens=thoughts)


def _gemini_usage(body):
    # A Gemini answer: its model version and usageMetadata, both top-level.
    model = body.get("modelVersion") if isinstance(body.get("modelVersion"), str) else None
    metadata = body.get("usageMetadata")
    return model, (usage_from_gemini(metadata) if isinstance(metadata, dict) else None)


def usage_from_body(body):
    """(model, Usage or None) from a whole JSON response of any provider."""
    if isinstance(body, list):
        # compat: Gemini's streamGenerateContent without alt=sse answers a JSON
        # array of chunks; each repeats the usage so far, so the last one counts.
        chunks = [chunk for chunk in body if isinstance(chunk, dict)
                  and isinstance(chunk.get("usageMetadata"), dict)]
        return _gemini_usage(chunks[-1]) if chunks else (None, None)
    if not isinstance(body, dict):
        return None, None
    if "usageMetadata" in body:
        return _gemini_usage(body)
    if body.get("object") == "response" and isinstance(body.get("response"), dict):
        body = body["response"]
    model = body.get("model") if isinstance(body.get("model"), str) else None
    usage = body.get("usage")
    if isinstance(body.get("duration"), (int, float)) and body.get("task"):
        return model, Usage(audio_seconds=float(body["duration"]))  # verbose_json transcription
    if isinstance(body.get("data"), list) and "created" in body and not isinstance(usage, dict):
        return model, Usage(images=len(body["data"]))  # an image answer without usage
    if not isinstance(usage, dict):
        return model, None
    if usage.get("type") == "duration":  # a transcription billed by the second
        seconds = usage.get("seconds")
        return model, Usage(audio_seconds=float(seconds) if isinstance(
            seconds, (int, float)) and seconds > 0 else 0.0)
    found = usage_from_usage_object(usage, body.get("type"))
    found.service_tier = _text_field(body.get("service_tier")) or found.service_tier
    if isinstance(body.get("data"), list):
        found.images = len(body["data"])
    return model, found


def usage_from_usage_object(usage, body_type=None):
    """A Usage from a `usage` object of any shape, decided by its token fields.

    prompt_tokens is OpenAI's chat shape, even when a gateway in front of Claude
    adds Anthropic's cache fields to it; input_tokens is Anthropic's or the
    Responses API's, told apart by the details only the Responses API sends.
    """
    if "prompt_tokens" in usage:
        found = usage_from_openai(usage)
        # compat: LiteLLM and others put Claude's cache writes beside OpenAI's fields.
        found.cache_write_tokens = min(
            max(found.cache_write_tokens, _int(usage.get("cache_creation_input_tokens"))),
            max(found.prompt_tokens - found.cached_tokens, 0))
        return found
    if body_type == "message" or not ("input_tokens_details" in usage
                                      or "output_tokens_details" in usage
                                      or "total_tokens" in usage):
        return usage_from_anthropic(usage)
    return usage_from_openai(usage)


IMAGE_ENDPOINTS = ("images/generations", "images/edits", "images/variations")


def request_usage(endpoint, payload):
    """What a request itself says it will be billed by: images asked for, characters to speak."""
    if endpoint in IMAGE_ENDPOINTS:
        n = payload.get("n")
        quality = _text_field(payload.get("quality")) or "standard"
        size = _text_field(payload.get("size")) or "1024x1024"
        return Usage(images=n if isinstance(n, int) and not isinstance(n, bool) and n > 0
                     else 1, image_kind=f"{quality}/{size}")
    if endpoint == "audio/speech" and isinstance(payload.get("input"), str):
        return Usage(characters=len(payload["input"]))
    return Usage()


def with_request_usage(usage, asked):
    """A response's Usage (or None) completed by what the request asked for."""
    if not (asked.images or asked.characters):
        return usage
    usage = dataclasses.replace(usage) if usage is not None else Usage()
    usage.images = usage.images or asked.images
    usage.image_kind = usage.image_kind or asked.image_kind
    usage.characters = usage.characters or asked.characters
    return usage


def multipart_field(body, content_type, name):
    """A short text field of a multipart/form-data body (e.g. an audio upload's model), or None."""
    if not content_type.startswith("multipart/form-data") or not body:
        return None
    match = re.search(rb'Content-Disposition: *form-data; *name="' + re.escape(name.encode())
                      + rb'"\r\n(?:[^\r\n]+\r\n)*\r\n([^\r\n]{1,200})\r\n', body, re.I)
    return match.group(1).decode("utf-8", "replace") if match else None


def parse_response_json(content):
    """The parsed JSON of a whole response body, or None when it is not JSON.

    Usage and model are read only from the parsed object's own top-level
    fields: text a client placed in the body (an echoed `metadata`, a prompt)
    can never stand in for them, however large the body is.
    """
    if not content or content.lstrip()[:1] not in (b"{", b"["):
        return None
    try:
        return json.loads(content)
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep to read
        return None


# The top-level members metering needs; a large answer is read for these alone.
METERED_FIELDS = ("id", "model", "usage", "type", "object", "response", "usageMetadata",
                  "modelVersion", "responseId")
LARGE_BODY_BYTES = 64 * 1024
MAX_SCANNED_TOKENS = 20_000  # past this many strings and brackets, parsing whole is cheaper
JSON_MARKS = (b'"', b"[", b"]", b"{", b"}")
JSON_NAME_SEPARATOR = re.compile(rb"\s*:")


def response_fields(content):
    """The top-level members of METERED_FIELDS in a JSON answer, as a dict, or None.

    A large answer (embeddings run to megabytes of floats) is walked backward
    from its end, structure only: strings are skipped whole and nested
    containers by depth, so text a client placed in the answer (an echoed
    `metadata`, a prompt) is never taken for a top-level field. Anything the
    walk cannot be sure of is parsed whole.
    """
    if content and len(content) > LARGE_BODY_BYTES:
        found = _top_level_members(content, METERED_FIELDS)
        if found is not None:
            return found
    answer = parse_response_json(content)
    return answer if isinstance(answer, (dict, list)) else None


def _top_level_members(content, names):
    # Walk the body backward from its closing brace, from one string delimiter
    # or bracket to the one before it (bytes.rfind: no per-byte Python work, so
    # a megabyte of floats costs little). A quote delimits a string when an
    # even number of backslashes stands before it.
    end = len(content.rstrip())
    if content[end - 1:end] != b"}":
        return None
    position = end - 1
    marks = {char: content.rfind(char, 0, position) for char in JSON_MARKS}
    depth, value_end, value_span, found, tokens = 1, None, None, {}, 0
    while True:
        for char, at in marks.items():
            if at >= position:
                marks[char] = content.rfind(char, 0, position)
        i = max(marks.values())
        tokens += 1
        if i < 0 or tokens > MAX_SCANNED_TOKENS:
            return None
        char = content[i]
        if char in b"]}":
            depth += 1
            if depth == 2:
                value_end = i + 1
        elif char in b"[{":
            depth -= 1
            if depth == 0:
                return found
            if depth == 1:
                value_span = (i, value_end)
        else:
            j = _string_start(content, i)
            if j < 0:
                return None
            if depth == 1:
                separator = JSON_NAME_SEPARATOR.match(content, i + 1)
                if separator:  # a member's name; its value is the last one seen
                    name = json.loads(content[j:i + 1])
                    if name in names and name not in found:
                        found[name] = None  # a number, true or null: none of ours
                        if value_span and not content[separator.end():value_span[0]].strip():
                            try:
                                found[name] = json.loads(content[value_span[0]:value_span[1]])
                            except (ValueError, RecursionError):
                                return None
                    value_span = None
                else:
                    value_span = (j, i + 1)
            i = j
        position = i


def _string_start(content, closing):
    # The opening quote of the string whose closing quote is at `closing`; -1 if none.
    at = closing
    while True:
        at = content.rfind(b'"', 0, at)
        if at < 0:
            return -1
        slashes = at
        while slashes and content[slashes - 1] == 0x5C:  # a backslash
            slashes -= 1
        if (at - slashes) % 2 == 0:
            return at


def _usage_from_body_ends(content):
    tail = content[-4096:]
    at = tail.rfind(b'"usage"')
    if at < 0:
        return None
    brace = tail.find(b"{", at)
    try:
        usage, _ = json.JSONDecoder().raw_decode(tail[brace:].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    match = MODEL_FIELD.search(content[:2048]) or MODEL_FIELD.search(tail)
    model = match.group(1).decode("utf-8", "replace") if match else None
    return usage_from_body({"model": model, "usage": usage})


def message_batch_usage(content):
    """[(model, Usage)] summed per model over an Anthropic batch's results (JSON lines)."""
    totals = {}
    for line in content.splitlines():
        try:
            result = json.loads(line).get("result") or {}
        except (ValueError, RecursionError, AttributeError):
            continue
        message = result.get("message") if isinstance(result, dict) else None
        model, usage = usage_from_body(message if isinstance(message, dict) else None)
        if usage is None:
            continue
        totals.setdefault(model, Usage()).add(usage)
    return list(totals.items())


class StreamMeter:
    """Follows an SSE stream event by event and keeps what it says about usage.

    OpenAI sends usage only in a last chunk with `choices: []`, and only when
    stream_options.include_usage is set; Anthropic sends input tokens in
    message_start and the output count in message_delta; the Responses API in
    response.completed. Content events are counted so a stream cut short can
    still be estimated (about one token each).
    """

    def __init__(self):
        self.model = None
        self.usage = None
        self.content_events = 0
        self.anthropic_input = None
        self.object_id = None  # the response or completion id the stream is about
        self.final = False     # a Gemini chunk with a finishReason was seen

    def observe(self, data):
        """Read one event's data; True when it is an OpenAI usage-only chunk."""
        if not data.startswith("{"):
            return False
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deep to read
            return False
        if not isinstance(obj, dict):
            return False
        kind = obj.get("type")
        if kind is None and ("usageMetadata" in obj or "candidates" in obj):
            return self._gemini_chunk(obj)
        if kind is None or kind == "chat.completion.chunk":
            return self._openai_chunk(obj)
        if kind == "message_start":
            message = obj.get("message") or {}
            self.model = message.get("model") or self.model
            self.anthropic_input = message.get("usage") or {}
            self.usage = usage_from_anthropic(self.anthropic_input)
        elif kind == "message_delta":
            # message_delta's counts are cumulative; newer API versions repeat input ones.
            merged = {**(self.anthropic_input or {}),
                      **{k: v for k, v in (obj.get("usage") or {}).items() if v is not None}}
            self.usage = usage_from_anthropic(merged)
        elif kind in ("content_block_delta", "response.output_text.delta"):
            self.content_events += 1
        elif kind in ("response.created", "response.completed", "response.incomplete",
                      "response.failed"):
            response = obj.get("response") or {}
            self.model = response.get("model") or self.model
            self.object_id = _text_or_none(response.get("id")) or self.object_id
            if isinstance(response.get("usage"), dict):
                self.usage = usage_from_openai(response["usage"])
                self.usage.service_tier = _text_field(response.get("service_tier"))
        return False

    def _openai_chunk(self, obj):
        if obj.get("model"):
            self.model = obj["model"]
        if self.object_id is None:
            self.object_id = _text_or_none(obj.get("id"))
        choices = obj.get("choices")
        if choices and _carries_output(choices[0]):
            self.content_events += 1
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = usage_from_usage_object(usage)
            self.usage.service_tier = _text_field(obj.get("service_tier"))
            return not obj.get("choices")
        return False

    def _gemini_chunk(self, obj):
        # Every Gemini chunk repeats the usage so far; the one with a
        # finishReason ends the answer and is held back like [DONE].
        model, usage = _gemini_usage(obj)
        self.model = model or self.model
        self.object_id = self.object_id or _text_or_none(obj.get("responseId"))
        if usage is not None:
            self.usage = usage
        candidates = obj.get("candidates")
        for candidate in candidates if isinstance(candidates, list) else ():
            if not isinstance(candidate, dict):
                continue
            parts = (candidate.get("content") or {}).get("parts")
            if isinstance(parts, list) and any(isinstance(part, dict) and len(part) > 0
                                               for part in parts):
                self.content_events += 1
            if candidate.get("finishReason"):
                self.final = True
        return False

    def estimate(self, prompt_bound, completion_bound):
        """A Usage for a stream that ended without (complete) usage: the call's worst case.

        The upstream bills what it generated, reasoning included, however
        little the client saw, so an estimate is never below the bounds the call
        was reserved at; an input count the stream did report is kept.
        """
        usage = dataclasses.replace(self.usage) if self.usage is not None else Usage()
        usage.prompt_tokens = usage.prompt_tokens or prompt_bound
        usage.completion_tokens = max(usage.completion_tokens, self.content_events,
                                      completion_bound)
        return usage


def _text_or_none(value):
    return value if isinstance(value, str) and value else None


def _carries_output(choice):
    # Role-only and finish-only chunks carry no tokens; they must not count.
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta") or {}
    return bool(choice.get("text") or delta.get("content") or delta.get("tool_calls")
                or delta.get("function_call") or delta.get("reasoning_content")
                or delta.get("refusal"))


def price_usage(entry, usage):
    """(token prices applied, nano-dollars) of a Usage by a pricing.json entry.

    The token prices are (input, cached, output, cache_write) per 1M tokens after
    the service tier answered and the long-context tier; on top come 1-hour
    cache writes, images, audio minutes, characters spoken and tool uses.
    """
    applied = dict(entry)
    tier = (entry.get("service_tiers") or {}).get(usage.service_tier)
    if tier:
        applied.update(tier)
    long_context = entry.get("long_context")
    if long_context and usage.prompt_tokens > long_context["above_input_tokens"]:
        applied.update({k: v for k, v in long_context.items() if k != "above_input_tokens"})
    base = float(applied.get("input", 0.0))
    prices = (base, float(applied.get("cached_input", base)), float(applied.get("output", 0.0)),
              float(applied.get("cache_write", base)))
    one_hour = float(applied.get("cache_write_1h", 2 * base))  # Anthropic: 2x input
    # Everything in USD x 1M, the scale cost_nusd works in, rounded once.
    extra = usage.cache_write_1h_tokens * (one_hour - prices[3])
    if usage.images:
        extra += usage.images * image_price(entry.get("images"), usage.image_kind) * 1e6
    extra += usage.audio_seconds / 60 * entry.get("per_minute", 0.0) * 1e6
    extra += usage.characters * entry.get("per_1m_characters", 0.0)
    extra += usage.web_search * (entry.get("per_1k_requests") or {}).get("web_search", 0.0) * 1e3
    return prices, cost_nusd(usage, prices, extra)


def image_price(table, kind):
    """USD for one image of `kind` ("quality/size"): that, else its size, else the dearest."""
    if not table:
        return 0.0
    kind = kind or ""
    price = table.get(kind, table.get(kind.rpartition("/")[2]))
    return float(price if price is not None else max(table.values()))


def cost_nusd(usage, prices, extra=0.0):
    """Cost in integer nano-dollars of a Usage's tokens at (input, cached, output,
    cache_write), plus `extra` in USD x 1M (what price_usage adds beyond tokens)."""
    input_price, cached_price, output_price, cache_write_price = prices
    uncached = max(usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens, 0)
    dollars_per_mtok = (uncached * input_price + usage.cached_tokens * cached_price
                        + usage.cache_write_tokens * cache_write_price
                        + usage.completion_tokens * output_price + extra)
    return round(dollars_per_mtok * NANO_PER_USD_PER_MTOK)


def nusd_to_usd(nusd):
    """Nano-dollars as a float of USD (None stays None)."""
    return None if nusd is None else round(nusd / 1e9, 9)


def usd_decimals(*amounts):
    """How many decimals shows every one of these USD amounts alike: 2, 4 or 6.

    Cents when they say it all ($2.50, $0.01), else 4 decimals down to a
    hundredth of a cent, else 6; a column or an "x of y" pair shares one.
    """
    decimals = 2
    for usd in amounts:
        if not usd:
            continue
        for places in (2, 4, 6):
            if abs(usd) >= 10 ** (2 - places) or abs(round(usd, places) - usd) < 1e-9:
                break
        decimals = max(decimals, places)
    return decimals


def format_usd(usd, decimals=None):
    """USD as people read a bill: $1,234.50, $0.0123, $0.000585 (decimals: usd_decimals)."""
    if usd is None:
        return "–"
    if usd and abs(usd) < 0.0000005:
        return "<$0.000001"
    return f"${usd:,.{usd_decimals(usd) if decimals is None else decimals}f}"


def json_text(value):
    """JSON like json.dumps, but numbers never in exponent form: 0.0000234, not 2.34e-05.

    Costs are read by people and by scripts that parse decimals; nano-dollar
    floats are exactly representable as short decimals.
    """
    if isinstance(value, float) and math.isfinite(value) and "e" in repr(value):
        return format(decimal.Decimal(repr(value)), "f")
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(name))}: {json_text(item)}"
                               for name, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(json_text(item) for item in value) + "]"
    return json.dumps(value)


def plural(count, noun, nouns=None):
    """'1 request', '2 requests', '1,234 tokens'."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


@dataclasses.dataclass
class UsageEvent:
    """One metered call, as the usage writer stores it."""
    created_ms: int
    key_id: str | None
    user_name: str | None
    project_id: str | None
    model: str | None
    endpoint: str
    status_code: int
    stream: bool
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nusd: int | None = None
    units: dict | None = None          # Usage.units(): what it was billed by beyond tokens
    prices: tuple | None = None        # (input, cached, output, cache_write) used
    price_model: str | None = None     # the name those prices are listed under
    pricing: str = "unpriced"
    latency_ms: float = 0.0
    overhead_ms: float = 0.0
    subjects: tuple = ()               # running totals this call counts toward
    reservation: object = None         # released when the event is applied
    owned: list = ()                   # owned_objects rows stored with the event
    claim: str | None = None           # an async object this event charges, at most once
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def __post_init__(self):
        # Both come from clients and upstreams (a body's "model", a path, an answer):
        # a lone surrogate escape or a NUL, which no database stores (PostgreSQL
        # refuses NUL), would stop the usage writer for everyone.
        self.model, self.endpoint = _db_text(self.model), _db_text(self.endpoint)


def _db_text(value):
    """Text as every database stores it: NUL and lone surrogates replaced."""
    if not isinstance(value, str):
        return value
    return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


@dataclasses.dataclass
class Refusal:
    """One call llimit refused for a known key, as the usage writer counts it."""
    created_ms: int
    project_id: str
    user_name: str | None
    reason: str                        # the error code: budget_exceeded, route_not_allowed...
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


# OpenAI's Batch API and Anthropic's Message Batches cost half the standard price;
# a batch's charge is stored under one of these endpoints, so repricing keeps it.
BATCH_PRICE_FACTOR = 0.5
BATCH_ENDPOINTS = ("batches", "messages/batches")


def price_event(event, usage, pricebook, status, factor=1.0, worst=None):
    """Fill an event's tokens, cost and pricing status.

    `status` is 'priced' for a complete response with usage, 'estimated' for a
    guess, 'unpriced' for a response without usage, and 'free' for a call that
    costs nothing by its route or its answer (a look-up, an upstream error):
    cost 0, no tokens. `factor` scales the cost (BATCH_PRICE_FACTOR). `worst`
    (the call's WorstCase, given when a USD budget applies) costs a call that
    would otherwise go uncosted, marked estimated: a budget never counts it as $0.
    """
    if status == "free":
        event.cost_nusd, event.pricing = 0, "free"
        return event
    _price_tokens(event, usage, pricebook, status, factor)
    if event.cost_nusd is None and worst is not None:
        event.prompt_tokens = max(event.prompt_tokens, worst.prompt_tokens)
        event.completion_tokens = max(event.completion_tokens, worst.completion_tokens)
        event.cost_nusd = worst.need.cost_nusd
        event.pricing = "estimated"
    return event


def _price_tokens(event, usage, pricebook, status, factor):
    if usage is not None:
        event.prompt_tokens = usage.prompt_tokens
        event.cached_tokens = usage.cached_tokens
        event.cache_write_tokens = usage.cache_write_tokens
        event.completion_tokens = usage.completion_tokens
        event.reasoning_tokens = usage.reasoning_tokens
        event.units = usage.units()
    costed = pricebook.cost(event.model, usage) if usage is not None else None
    if costed is None:
        event.pricing = "unpriced" if status == "priced" else status
        return event
    event.price_model, event.prices, full_nusd = costed
    event.cost_nusd = round(full_nusd * factor)
    event.pricing = status
    return event


class UsageWriter:
    """Commits usage events in groups from one thread.

    `submit` returns at once; the event's `done` is set once it is committed. A failed
    batch is retried with its events intact; while it fails, `healthy` is
    False, which the limits read to fail closed.
    """

    MAX_BATCH = 512

    def __init__(self, database, commit_lock, on_commit, after_commit):
        self.database = database
        self.commit_lock = commit_lock
        self.on_commit = on_commit        # (batch) under commit_lock -> follow-up items
        self.after_commit = after_commit  # (db, follow-up items) once the lock is free
        self.healthy = True
        self._queue = queue.SimpleQueue()
        self._price_ids = {}
        self._thread = threading.Thread(target=self._run, name="llimit-usage-writer",
                                        daemon=True)

    def start(self):
        """Start writing (the server's thread; the CLI never starts one)."""
        self._thread.start()

    def submit(self, event):
        """Queue an event (or a list of events, committed together) for the next commit."""
        self._queue.put(event)
        return event

    def depth(self):
        """Items (events, or lists of them) waiting to be written."""
        return self._queue.qsize()

    def close(self, timeout=30.0):
        """Write everything queued, then stop the thread; False if it could not in time."""
        if not self._thread.is_alive():
            return self._queue.empty()  # never started: nothing was written, or queued
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def flush(self, timeout=None):
        """Wait until every event submitted before this call is committed; False on timeout."""
        flushed = threading.Event()
        self._queue.put(flushed)  # taken after those events, set once they are committed
        return flushed.wait(timeout)

    def _run(self):
        try:
            self._loop()
        except BaseException:
            self.healthy = False  # no ledger: calls are refused and /healthz says 503
            log.critical("the usage writer stopped; restart llimit", exc_info=True)

    def _loop(self):
        db = self.database()
        stopping = False
        while not stopping:
            batch = []
            item = self._queue.get()
            while True:
                batch.extend(item if isinstance(item, list) else [item])
                if len(batch) >= self.MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if None in batch:
                stopping = True
            flushes = [item for item in batch if isinstance(item, threading.Event)]
            batch = [item for item in batch if isinstance(item, (UsageEvent, Refusal))]
            if batch:
                self._write_until_done(db, batch)
            for flushed in flushes:
                flushed.set()

    def _write_until_done(self, db, batch):
        delay = 0.05
        while True:
            try:
                self._write(db, batch)
                self.healthy = True
                break
            except DatabaseError:
                log.exception("usage write failed for %d events; retrying", len(batch))
                self.healthy = False
                self._price_ids.clear()  # ids made inside the rolled-back transaction
                rollback(db)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        for event in batch:
            event.done.set()

    def _write(self, db, batch):
        begin_write(db, batch=True)
        # A charge for an async object is stored only if this transaction is
        # the one that marks the object charged: concurrent polls charge once.
        refusals = [item for item in batch if isinstance(item, Refusal)]
        if refusals:
            insert_refusals(db, refusals)
            batch = [item for item in batch if not isinstance(item, Refusal)]
        # Two polls of one object in the same batch: only the first may claim it.
        claimed, kept = set(), []
        for event in batch:
            if event.claim is None:
                kept.append(event)
            elif event.claim not in claimed:
                claimed.add(event.claim)
                if claim_object_charge(db, event.claim, event.created_ms):
                    kept.append(event)
        price_ids = [self._price_id(db, event) for event in kept]
        # A call's shared reservation (PostgreSQL) ends in the transaction that
        # stores its usage, whether or not the usage is kept.
        insert_usage_events(db, kept, price_ids, [
            event.reservation.shared_id for event in batch
            if event.reservation is not None and event.reservation.shared_id])
        owned = [row for event in kept for row in event.owned]
        if owned:
            insert_owned_objects(db, owned)
        # Limits read running totals lazily from the database; committing and
        # applying under one lock means each event is counted exactly once.
        with self.commit_lock:
            commit(db)
            follow_up = self.on_commit(kept)
        if follow_up:
            try:
                self.after_commit(db, follow_up)
            except DatabaseError:
                log.exception("usage follow-up (alerts) failed after commit")

    def _price_id(self, db, event):
        if event.prices is None:
            return None
        cache_key = (event.price_model, event.prices)
        if cache_key not in self._price_ids:
            self._price_ids[cache_key] = get_price_snapshot_id(db, event.price_model,
                                                               event.prices)
        return self._price_ids[cache_key]


def reprice_all(state):
    """Recompute every stored event's cost from the prices in force; returns counts."""
    db = state.database()
    book = state.pricebook
    snapshot_ids, changes, seen = {}, [], 0
    begin_write(db)  # the usage writer waits until we are done
    try:
        for row in iter_usage_events(db, 0, 2 ** 62):
            seen += 1
            if row["pricing"] == "free":
                continue
            factor = BATCH_PRICE_FACTOR if row["endpoint"] in BATCH_ENDPOINTS else 1.0
            usage = Usage(row["prompt_tokens"], row["cached_tokens"], row["cache_write_tokens"],
                          row["completion_tokens"], row["reasoning_tokens"],
                          **json.loads(row["units"] or "{}"))
            costed = book.cost(row["model"], usage)
            status = "estimated" if row["pricing"] == "estimated" else None
            if costed is None or not (usage.prompt_tokens or usage.completion_tokens
                                      or usage.units()):
                update = (None, None, status or "unpriced")
            else:
                resolved = costed[:2]
                if resolved not in snapshot_ids:
                    snapshot_ids[resolved] = get_price_snapshot_id(db, *resolved)
                update = (round(costed[2] * factor), snapshot_ids[resolved], status or "priced")
            if update != (row["cost_nusd"], row["price_id"], row["pricing"]):
                changes.append((*update, row["id"]))
        reprice_usage_events(db, changes, int(state.config.clock() * 1000))
        # Running totals change under the limits' feet: swap them in one step.
        with state.limits.lock:
            commit(db)
            state.limits.forget_locked()
    finally:
        rollback(db)
    return {"events": seen, "changed": len(changes)}


# =============================================================================
# 4. Limits
#    Decides whether a call may go upstream, reserves its worst case against
#    every block limit it falls under, and settles to the real usage once the
#    usage writer has committed it. Running totals live in SQLite
#    (usage_counters, written with each event) and are cached here per window,
#    so a check costs the same with ten stored events or ten million; on
#    PostgreSQL (SharedLimits) they stay in the database, read by one statement.
#    Knows nothing of HTTP beyond raising LlimitError.
# =============================================================================

SCOPES = ("global", "project", "user", "key")
EACH = (None, "user", "key")
LIMIT_METRICS = ("usd", "tokens", "requests")
WINDOWS = ("minute", "day", "week", "month", "total")
# compat: LiteLLM's budget_duration. A rolling window is '<n>h' or '<n>d':
# periods of that length counted from the limit's starts_at.
ROLLING_WINDOW = re.compile(r"([1-9][0-9]{0,3})([hd])")
WINDOW_PATTERN = "^(minute|day|week|month|total|[1-9][0-9]{0,3}[hd])$"
ROLLING_EXAMPLES = ("1h", "24h", "7d", "30d")  # offered on /admin beside the calendar windows
ACTIONS = ("block", "warn")
NANO = 1_000_000_000


# A request naming any of these makes the upstream read input llimit cannot see:
# a stored response or conversation, an uploaded file, an image or file by URL,
# a stored prompt, or a server-side tool that reads documents or the web.
SERVER_SIDE_INPUT_MARKERS = re.compile(
    rb'"(?:previous_response_id"|conversation"|file_id"|file_url"|image_url"|input_image"'
    rb'|input_file"|input_audio"|document"|url"|container_upload"|file_search|web_search|mcp'
    rb'|code_interpreter|vector_store_ids")')


@dataclasses.dataclass
class WorstCase:
    """What a call may cost at most, as far as llimit can know before it goes upstream."""
    need: Totals                  # reserved against every block limit
    prompt_tokens: int            # the input bound used
    completion_tokens: int        # the output bound used (all choices)
    strict: bool                  # the call bounds its own output (max_tokens or the like)
    priced: bool                  # a price covers the model
    asked: Usage                  # what the request itself says it is billed by (images...)


AUDIO_BYTES_PER_SECOND = 1000      # 8 kbit/s: audio is rarely smaller, so seconds <= bytes / 1000
TRANSCRIPTION_ENDPOINTS = ("audio/transcriptions", "audio/translations")


def worst_case(pricebook, model, payload, body, default_max_tokens, default_max_input_tokens,
               endpoint=""):
    """A call's WorstCase: its prompt bound, its output bound and their price.

    The prompt is its request bytes / 3 (about 3 bytes of JSON per token errs
    high) unless the request reads input upstream; then it is the model's
    context window (max_input_tokens in pricing.json, else the default). The
    output is the call's max_tokens, capped by the model's max_output_tokens,
    or that maximum (else the default) when the call sets none. Images and
    characters come from the request, exactly; audio is bounded by its bytes
    (AUDIO_BYTES_PER_SECOND), web searches by the tool's max_uses.
    """
    max_input, max_output = pricebook.sizes(model)
    prompt = len(body) // 3
    if isinstance(payload.get("prompt"), dict) or body_names(SERVER_SIDE_INPUT_MARKERS,
                                                             payload, body):
        prompt = max(prompt, max_input or default_max_input_tokens)
    asked = next((payload[name] for name in
                  ("max_tokens", "max_completion_tokens", "max_output_tokens")
                  if isinstance(payload.get(name), int) and not isinstance(payload[name], bool)
                  and payload[name] >= 0), None)
    output = (max_output or default_max_tokens) if asked is None else (
        min(asked, max_output) if max_output else asked)
    n = payload.get("n") if isinstance(payload.get("n"), int) and payload.get("n", 0) > 1 else 1
    request = request_usage(endpoint, payload)
    bound = Usage(prompt_tokens=prompt, completion_tokens=output * n, images=request.images,
                  image_kind=request.image_kind, characters=request.characters)
    if endpoint in TRANSCRIPTION_ENDPOINTS:
        bound.audio_seconds = len(body) / AUDIO_BYTES_PER_SECOND
    tools = payload.get("tools")
    bound.web_search = sum(tool["max_uses"] for tool in tools if isinstance(tool, dict)
                           and str(tool.get("type", "")).startswith("web_search")
                           and isinstance(tool.get("max_uses"), int) and tool["max_uses"] > 0
                           ) if isinstance(tools, list) else 0
    costed = pricebook.cost(model, bound)
    return WorstCase(need=Totals(1, prompt + output * n, costed[2] if costed else 0),
                     prompt_tokens=prompt, completion_tokens=output * n,
                     strict=asked is not None or bool(request.images or request.characters),
                     priced=costed is not None, asked=request)


def body_names(pattern, payload, body):
    """Whether a JSON request body holds what `pattern` finds in bytes (a key or a
    value), also when the client spelled it with \\u escapes: a body with one is
    searched again as parsed, written out without them."""
    if pattern.search(body):
        return True
    return b"\\u" in body and pattern.search(
        json.dumps(payload, ensure_ascii=False).encode("utf-8", "surrogatepass")) is not None


def window_bounds(window, now):
    """(start, end) in epoch seconds of the UTC window holding `now`; (0, None) for total."""
    if window == "total":
        return 0, None
    if window == "minute":
        start = int(now // 60 * 60)
        return start, start + 60
    day_start = int(now // 86400 * 86400)
    if window == "day":
        return day_start, day_start + 86400
    if window == "week":  # weeks start on Monday; 1970-01-01 was a Thursday
        start = day_start - ((day_start // 86400 + 3) % 7) * 86400
        return start, start + 7 * 86400
    date = dt.datetime.fromtimestamp(day_start, UTC)
    first = date.replace(day=1)
    following = (first + dt.timedelta(days=32)).replace(day=1)
    return int(first.timestamp()), int(following.timestamp())


@functools.lru_cache(maxsize=4)
def window_starts(minute_start):
    """((window, start), ...) for every calendar window holding a minute: what the usage
    writer counts each event into (cached, as a batch's events mostly share a minute)."""
    return tuple((window, window_bounds(window, minute_start)[0]) for window in WINDOWS)


def rolling_seconds(window):
    """The length in seconds of a rolling window ('7d' -> 604800), or None for a calendar one."""
    match = ROLLING_WINDOW.fullmatch(window)
    if match is None:
        return None
    return int(match[1]) * (3600 if match[2] == "h" else 86400)


def limit_period(limit, now):
    """(start, end) in epoch seconds of a limit's period holding `now`; end None for total.

    Calendar windows are window_bounds', started no earlier than the limit's
    reset_at; rolling ones are counted from starts_at (else created_at).
    """
    length = rolling_seconds(limit["window"])
    if length is not None:
        anchor = int(iso_seconds(limit["starts_at"] or limit["created_at"]))
        start = anchor + int((now - anchor) // length) * length
        return start, start + length
    start, end = window_bounds(limit["window"], now)
    if limit["reset_at"]:
        start = max(start, min(int(iso_seconds(limit["reset_at"])), int(now)))
    return start, end


def _regular_period(window, start):
    # Whether a period is a calendar window's own, kept by count_committed's
    # running totals; any other (rolling, or started by a reset) is irregular.
    return window in WINDOWS and window_bounds(window, start)[0] == start


def call_subjects(project_id, user_name, key_id):
    """The running totals a call counts toward."""
    subjects = [SUBJECT_ALL, subject_of("project", project_id), subject_of("key", key_id)]
    if user_name:
        subjects += [subject_of("user", user_name),
                     subject_of("project_user", project_id, user_name)]
    return tuple(subjects)


def limit_subject(limit, project_id, user_name, key_id):
    """The running total a limit reads for this call, or None if it does not apply."""
    scope, each = limit["scope"], limit["each"]
    if scope == "plan":  # for_call matched the plan; it applies to each member
        return subject_of("user", user_name) if user_name else None
    if scope == "project" and limit["target"] != project_id:
        return None
    if scope == "user" and limit["target"] != user_name:
        return None
    if scope == "key":
        return subject_of("key", key_id) if limit["target"] == key_id else None
    if each == "key":
        return subject_of("key", key_id)
    if each == "user":
        if not user_name:
            return None
        if scope == "project":
            return subject_of("project_user", project_id, user_name)
        return subject_of("user", user_name)
    return scope_subject(scope, {"project": project_id, "user": user_name}.get(scope))


def scope_subject(scope, target):
    """The running total of a limit's whole scope (no `each`)."""
    return SUBJECT_ALL if scope == "global" else subject_of(scope, str(target))


def limit_amount_units(limit):
    """A limit's amount in counter units (nano-dollars for usd)."""
    amount = limit["amount"]
    return round(amount * NANO) if limit["metric"] == "usd" else amount


def format_amount(metric, units, decimals=None):
    """Counter units as people read them: $2.50, 1,234 tokens, 1 request."""
    if metric == "usd":
        return format_usd(units / NANO, decimals)
    return plural(int(units), metric[:-1])


def describe_limit(limit):
    """A limit in words, e.g. "project 'team-a' limit of $10/day"."""
    scope = limit["scope"]
    who = "global" if scope == "global" else f"{scope} '{limit['target']}'"
    each = f" (each {limit['each'] or 'member'})" if limit["each"] or scope == "plan" else ""
    window = "" if limit["window"] == "total" else "/" + limit["window"]
    return (f"{who}{each} limit {limit['id']} of "
            f"{format_amount(limit['metric'], limit_amount_units(limit))}{window}")


def limit_in_words(limit):
    """A limit as its key holders read it: "$2.00 a day", "600 requests a minute for each user"."""
    amount = format_amount(limit["metric"], limit_amount_units(limit))
    window = limit["window"]
    period = "in total" if window == "total" else f"a {window}" if window in WINDOWS \
        else f"per {window_in_words(window)}"
    each = f" for each {limit['each']}" if limit["each"] else ""
    return f"{amount} {period}{each}"


def describe_subject(subject):
    """A running total's subject in words: "user alice", "project team-a / user bob"."""
    kind, names = parse_subject(subject)
    if kind == "all":
        return "all usage"
    if kind == "project_user":
        return f"project {names[0]} / user {names[1]}"
    return f"{kind} {names[0]}"


@dataclasses.dataclass
class Admission:
    """What the limits said about a call allowed through."""
    reservation: list                 # [(counter key, Totals reserved)]
    alert_checks: list                # [(limit, subject)] for alerts after the call
    headers: dict                     # rate-limit and budget headers for the client
    usd_bound: bool = False           # a USD block limit applies: no call may go uncosted
    shared_id: str = None             # SharedLimits: the reservation rows' id


class Limits:
    """Running totals per window, in-flight reservations, and the check itself.

    Thread-safe: everything happens under `lock`, which the usage writer also
    holds while it commits, so a total is loaded from the database either
    before an event is committed (and the event is added here) or after (and
    it is already in the loaded total), never both.
    """

    def __init__(self, database, clock):
        self.database = database
        self.clock = clock
        self.lock = threading.Lock()
        self._used = {}        # (subject, window, start) -> Totals
        self._reserved = {}    # same keys -> Totals in flight
        self._alerted = set()  # (limit_id, subject, start, threshold) known sent
        self._pruned_minute = 0
        self._rows_lock = threading.Lock()
        self._rows_version = None  # the config_version `_rows_by_target` was read at
        self._rows_by_target = {}  # (scope, target) -> limit rows; global: ("global", None)
        self._irregular = {}   # subject -> {(window, start): end} of periods not a calendar one's
        self._user_plans = {}  # user name -> plan id, as user_plans holds them
        self._plan_ids = frozenset()

    def for_call(self, db, version, project_id, user_name, key_id, plan_id=None):
        """The limits a call of this project, user, key and plan may be under.

        Held in memory and read again only when `version` (the database's
        config_version; the proxy has it from the key lookup) has moved.
        """
        self._load(db, version)
        rows = self._rows_by_target
        return (rows.get(("global", None), []) + rows.get(("project", project_id), [])
                + rows.get(("user", user_name), []) + rows.get(("key", key_id), [])
                + (rows.get(("plan", plan_id), []) if plan_id else []))

    def plan_of(self, db, version, user_name, default_plan=None):
        """The plan a user is on: their own, else `default_plan`; None for no user or plan."""
        self._load(db, version)
        if not user_name:
            return None
        own = self._user_plans.get(user_name)
        return own if own in self._plan_ids else default_plan

    def plan_exists(self, db, version, plan_id):
        """Whether a plan of this id exists (from memory, like for_call)."""
        self._load(db, version)
        return plan_id in self._plan_ids

    def _load(self, db, version):
        if version == self._rows_version:
            return
        with self._rows_lock:
            if version != self._rows_version:
                by_target = {}
                for limit in list_limits(db):  # at `version` or newer: safe
                    target = None if limit["scope"] == "global" else limit["target"]
                    by_target.setdefault((limit["scope"], target), []).append(limit)
                self._user_plans = {row["user_name"]: row["plan_id"]
                                    for row in list_user_plans(db)}
                self._plan_ids = frozenset(row["id"] for row in list_plans(db))
                self._rows_by_target, self._rows_version = by_target, version

    def admit(self, db, call, limits):
        """Check a call against its limits and reserve its worst case.

        `call` has project_id, user_name, key_id, limit_message, model and
        worst (its WorstCase). Raises LlimitError 429 when a block limit is
        reached, 403 when a USD block limit applies and no price covers the
        call, 400 when a per-user limit applies and the call names no user.
        (A call is refused before admission while usage cannot be written.)
        """
        now = self.clock()
        block_keys, alert_checks, headers, warnings = {}, [], {}, []
        usd_bound, worst = False, call.worst
        with self.lock:
            for limit in limits:
                subject = limit_subject(limit, call.project_id, call.user_name, call.key_id)
                if subject is None:
                    if (limit["each"] == "user" or limit["scope"] == "plan") \
                            and not call.user_name \
                            and limit["action"] == "block" and limit["scope"] != "user":
                        raise _user_required(limit)
                    continue
                window = limit["window"]
                start, end = limit_period(limit, now)
                key = (subject, window, start)
                field = METRIC_FIELDS[limit["metric"]]
                amount = limit_amount_units(limit)
                used = getattr(self._used_entry(db, key, end), field)
                held = self._reserved.get(key)
                in_flight = getattr(held, field) if held is not None else 0
                if limit["alert_at"] or self._alerts_full(limit):
                    alert_checks.append((limit, subject))
                _limit_headers(headers, limit, amount, used + in_flight, getattr(worst.need, field),
                               start, end, now)
                warning = warning_text(limit, amount, used, end)
                if warning:
                    warnings.append(warning)
                if limit["action"] == "warn":
                    continue
                if limit["metric"] == "usd":
                    if not worst.priced:
                        raise _not_priced(limit, call.model)
                    usd_bound = True
                need = getattr(worst.need, field)
                strict = worst.strict or limit["metric"] == "requests"
                if (used + in_flight + need > amount) if strict else (used + in_flight >= amount):
                    raise self._refusal(limit, used, in_flight, end, now, call.limit_message)
                block_keys[key] = worst.need
            reservation = list(block_keys.items())
            for key, need in reservation:
                held = self._reserved.get(key)
                if held is None:
                    held = self._reserved[key] = Totals()
                held.add(need)
        _warning_header(headers, warnings, call.limit_message)
        return Admission(reservation, alert_checks, headers, usd_bound)

    def count_committed(self, events):
        """Count committed events and release their reservations; returns alerts due.

        Called by the usage writer with `lock` held, right after the commit.
        """
        alerts = []
        for event in events:
            if event.reservation is not None:
                self._release(event.reservation.reservation)
            seconds = event.created_ms / 1000
            bounds = window_starts(int(seconds // 60 * 60))
            tokens, cost = event.prompt_tokens + event.completion_tokens, event.cost_nusd or 0
            for subject in event.subjects:
                for window, start in bounds:
                    entry = self._used.get((subject, window, start))
                    if entry is None and window == "minute":
                        entry = self._used[(subject, window, start)] = Totals()
                    if entry is not None:
                        entry.requests += 1
                        entry.tokens += tokens
                        entry.cost_nusd += cost
                for (window, start), end in self._irregular.get(subject, {}).items():
                    entry = self._used.get((subject, window, start))
                    if entry is not None and start <= seconds and (end is None or seconds < end):
                        entry.requests += 1
                        entry.tokens += tokens
                        entry.cost_nusd += cost
            if event.reservation is not None:
                alerts += self._alerts_due(event.reservation.alert_checks, seconds)
        self._prune(self.clock())
        return alerts

    def used(self, db, limit, subject):
        """(used in counter units, window end or None) of a limit for one subject."""
        start, end = limit_period(limit, self.clock())
        with self.lock:
            entry = self._used_entry(db, (subject, limit["window"], start), end)
            return entry.metric(limit["metric"]), end

    def used_by_top_member(self, db, limit):
        """For an `each` limit: the largest use among its members this window.

        A period not starting at midnight (rolling, or reset) counts its first
        day whole here: this figure is for the admin's listing only, never for
        a check, and finding the exact one would read that day's events.
        """
        start, end = limit_period(limit, self.clock())
        if limit["scope"] == "project" and limit["each"] == "user":
            prefix = subject_members("project_user", limit["target"])
        else:
            prefix = subject_members(limit["each"])
        field = METRIC_FIELDS[limit["metric"]]
        with self.lock:
            if limit["window"] == "minute":
                values = [getattr(entry, field) for (subject, window, entry_start), entry
                          in self._used.items() if window == "minute"
                          and entry_start == start and subject.startswith(prefix)]
                return max(values, default=0), end
        first, last = (("total", "total") if end is None
                       else (_utc_day(start), _utc_day(end - 1)))
        return get_counter_max_member(db, prefix, first, last, field), end

    def status(self, db, limit):
        """A limit with `used` and `resets_at` for its current window (largest member for `each`)."""
        if limit["each"]:
            used, end = self.used_by_top_member(db, limit)
        else:
            used, end = self.used(db, limit, scope_subject(limit["scope"], limit["target"]))
        return limit_to_json(limit, used, end)

    def statuses_for_call(self, db, project_id, user_name, key_id, plan_id=None):
        """(subject, limit_to_json) of every limit a call of this project, user and key is under."""
        applying = []
        for limit in self.for_call(db, config_version(db), project_id, user_name, key_id,
                                   plan_id):
            subject = limit_subject(limit, project_id, user_name, key_id)
            if subject is not None:
                used, end = self.used(db, limit, subject)
                applying.append((subject, limit_to_json(limit, used, end)))
        return applying

    def forget_locked(self):
        """Drop cached totals after a reprice rewrote them (minute ones stay); hold `lock`."""
        self._used = {key: entry for key, entry in self._used.items() if key[1] == "minute"}

    def _used_entry(self, db, key, end):
        entry = self._used.get(key)
        if entry is None:
            subject, window, start = key
            if not _regular_period(window, start):
                entry = _period_total(db, subject, start, end)
                self._irregular.setdefault(subject, {})[(window, start)] = end
            elif window == "minute":
                entry = get_events_total(db, subject, int(start * 1000), int(end * 1000))
            elif window == "total":
                entry = get_lifetime_total(db, subject)
            else:
                entry = get_counter(db, subject, _utc_day(start), _utc_day(end - 1))
            self._used[key] = entry
        return entry

    def _release(self, reservation):
        for key, need in reservation:
            held = self._reserved.get(key)
            if held is None:
                continue
            held.subtract(need)
            if not held:
                del self._reserved[key]

    def _alerts_full(self, limit):
        # Reaching 100% alerts for every limit except minute rate limits, which
        # would alert every minute; those alert only at the percentages asked for.
        return limit["window"] != "minute"

    def _alerts_due(self, checks, seconds):
        due = []
        for limit, subject in checks:
            start, end = limit_period(limit, seconds)
            entry = self._committed_entry(subject, limit["window"], start, end)
            amount = limit_amount_units(limit)
            if entry is None or amount <= 0:
                continue
            percent = 100.0 * entry.metric(limit["metric"]) / amount
            thresholds = set(json.loads(limit["alert_at"] or "[]"))
            if self._alerts_full(limit):
                thresholds.add(100)
            for threshold in sorted(thresholds):
                marker = (limit["id"], subject, start, float(threshold))
                if percent >= threshold and marker not in self._alerted:
                    self._alerted.add(marker)
                    due.append({
                        "limit_id": limit["id"], "subject": subject,
                        "window_start": utc_iso(start), "threshold": float(threshold),
                        "created_at": utc_iso(seconds),
                        "text": _alert_text(limit, subject, threshold, entry, end)})
        return due

    def _committed_entry(self, subject, window, start, end):
        return self._used.get((subject, window, start))

    def _prune(self, now):
        minute = int(now // 60 * 60)
        if minute == self._pruned_minute:
            return
        self._pruned_minute = minute
        current = {window: window_bounds(window, now)[0] for window in WINDOWS}
        self._irregular = {subject: kept for subject, periods in self._irregular.items()
                           if (kept := {period: end for period, end in periods.items()
                                        if end is None or end > now - 60})}
        self._used = {key: entry for key, entry in self._used.items()
                      if (key[2] >= current[key[1]] - (60 if key[1] == "minute" else 0)
                          if key[1] in current else key[1:] in self._irregular.get(key[0], ()))}
        self._alerted = {marker for marker in self._alerted if marker[2] >= current["month"]}

    def _refusal(self, limit, used, in_flight, end, now, limit_message):
        message = refusal_text(limit, used, in_flight, end, now, limit_message)
        headers = {"X-LLimit-Limit-Id": limit["id"]}  # for the admin the holder asks
        if limit["window"] == "minute":
            headers["Retry-After"] = str(max(1, int(end - now + 0.999)))
            return LlimitError(429, "rate_limit_exceeded", message, headers=headers)
        return LlimitError(429, "budget_exceeded", message, headers=headers)


# Where each metric sits in llimit_admit's [requests, tokens, nusd] (1-based).
SHARED_METRIC_POSITION = {"requests": 1, "tokens": 2, "usd": 3}


class ConfigMoved(Exception):
    """Keys, projects or limits changed since the call's key was read: read them again."""

    def __init__(self, version):
        super().__init__(f"config version is now {version}")
        self.version = version


class SharedLimits(Limits):
    """Limits for several llimit instances on one PostgreSQL database.

    Nothing is counted in memory, since another instance's calls would
    overtake it: a call's admission is one statement (admit_reservation) that
    reads each window's used total and the reservations of calls under way
    on every instance, and reserves this call's worst case, under a lock per
    window. A rolling or reset period's total is kept in the database too
    (period_totals: read once from its partial first day's events and the
    daily totals, then counted on by every instance's usage writer), so it is
    exact to the millisecond as on SQLite. The usage writer deletes the
    reservation in the transaction that stores the call's usage; one left by
    an instance that died expires after `reservation_seconds`.
    """

    PRUNE_SECONDS = 60

    def __init__(self, database, clock, reservation_seconds):
        super().__init__(database, clock)
        self.reservation_seconds = reservation_seconds
        self._pruned_at = 0

    def admit(self, db, call, limits):
        """Check a call against its limits and reserve its worst case (see Limits.admit).

        The same statement checks that the config version is still the one
        the call's key (and so `limits`) was read at: a call costs one round
        trip to the database, limits or none. Raises ConfigMoved if it is not,
        and DatabaseUnavailable if the database does not answer: limits or
        none, a call then fails closed, since its key row (cached) may have
        been revoked on another instance and its usage could not be written.
        """
        now = self.clock()
        checks, alert_checks, headers, warnings = [], [], {}, []
        usd_bound, worst = False, call.worst
        for limit in limits:
            subject = limit_subject(limit, call.project_id, call.user_name, call.key_id)
            if subject is None:
                if (limit["each"] == "user" or limit["scope"] == "plan") and not call.user_name \
                        and limit["action"] == "block" and limit["scope"] != "user":
                    raise _user_required(limit)
                continue
            start, end = limit_period(limit, now)
            if limit["alert_at"] or self._alerts_full(limit):
                alert_checks.append((limit, subject))
            block = limit["action"] == "block"
            if block and limit["metric"] == "usd":
                if not worst.priced:
                    raise _not_priced(limit, call.model)
                usd_bound = True
            checks.append((SharedCheck(
                subject, limit["window"], start, end,
                not _regular_period(limit["window"], start),
                SHARED_METRIC_POSITION[limit["metric"]], limit_amount_units(limit), block,
                worst.strict or limit["metric"] == "requests"), limit))
        checks.sort(key=lambda check: (check[0].subject, check[0].window, check[0].start))
        blocks = any(check[0].block for check in checks)
        shared_id = secrets.token_hex(12) if blocks else None
        need = worst.need
        refused, version, totals = admit_reservation(
            db, call.key["config_version"], shared_id, int(now * 1000),
            int((now + self.reservation_seconds) * 1000), [check[0] for check in checks],
            [need.requests, need.tokens, need.cost_nusd])
        if refused == "moved":
            raise ConfigMoved(version)
        for (check, limit), total in zip(checks, totals):
            position, amount, end = check.metric - 1, check.amount, check.end
            used, in_flight = total[position], total[position + 3]
            if refused is not None and check is checks[refused][0]:
                raise self._refusal(limit, used, in_flight, end, now, call.limit_message)
            _limit_headers(headers, limit, amount, used + in_flight,
                           getattr(need, METRIC_FIELDS[limit["metric"]]), check.start, end, now)
            warning = warning_text(limit, amount, used, end)
            if warning:
                warnings.append(warning)
        _warning_header(headers, warnings, call.limit_message)
        return Admission([], alert_checks, headers, usd_bound, shared_id)

    def count_committed(self, events):
        """Alerts due after committed events (read from the database); prunes now and then."""
        db = self.database()
        alerts = []
        for event in events:
            if event.reservation is not None:
                alerts += self._alerts_due(event.reservation.alert_checks,
                                           event.created_ms / 1000)
        now = self.clock()
        if now - self._pruned_at >= self.PRUNE_SECONDS:
            self._pruned_at = now
            delete_stale_reservations(db, int(now * 1000), int(now) // 60 * 60 - 3600)
            self._prune(now)
        return alerts

    def used(self, db, limit, subject):
        """(used in counter units, window end or None) of a limit for one subject."""
        start, end = limit_period(limit, self.clock())
        entry = self._committed_entry(subject, limit["window"], start, end, db)
        return entry.metric(limit["metric"]), end

    def used_by_top_member(self, db, limit):
        """For an `each` limit: the largest use among its members this window."""
        if limit["window"] != "minute":
            return super().used_by_top_member(db, limit)
        start, end = window_bounds("minute", self.clock())
        if limit["scope"] == "project" and limit["each"] == "user":
            prefix = subject_members("project_user", limit["target"])
        else:
            prefix = subject_members(limit["each"])
        return get_minute_max_member(db, prefix, start, METRIC_FIELDS[limit["metric"]]), end

    def _committed_entry(self, subject, window, start, end, db=None):
        db = db or self.database()
        if not _regular_period(window, start):
            # Its running total once an admission has made it, else read as SQLite does.
            total = get_period_total(db, subject, window, start)
            return _period_total(db, subject, start, end) if total is None else total
        if window == "minute":
            return get_minute_total(db, subject, start)
        if window == "total":
            return get_lifetime_total(db, subject)
        return get_counter(db, subject, _utc_day(start), _utc_day(end - 1))


def _ledger_unavailable():
    return LlimitError(503, "service_unavailable",
                       "The usage ledger cannot be written right now, so calls"
                       " are refused. Try again shortly.", code="ledger_unavailable")


def _warning_header(headers, warnings, limit_message):
    if warnings:
        # compat: a header value is Latin-1 on the wire; the message may not be.
        text = " ".join(warnings + [limit_message or ""]).strip()
        headers["X-LLimit-Warning"] = text.encode("ascii", "replace").decode()


def _period_total(db, subject, start, end):
    # A period not starting at midnight: its first (partial) day from the
    # events, by the created_ms index (one day's events at most), and its
    # whole days from the daily running totals. Events after now do not exist
    # yet, so the last day's total holds only what is inside the period.
    next_day = -(-start // 86400) * 86400
    total = Totals()
    if next_day > start:
        last = next_day if end is None else min(next_day, end)
        total.add(get_events_total(db, subject, start * 1000, last * 1000))
    if end is None or next_day < end:
        total.add(get_counter(db, subject, _utc_day(next_day),
                              "9999-12-31" if end is None else _utc_day(end - 1)))
    return total


def _not_priced(limit, model):
    # Spend that no price covers would count $0 against a USD budget: refuse it.
    asked = f"the model {model!r}" if model else "a call that names no model"
    return LlimitError(403, "permission_denied",
                       f"No price covers {asked}, and the {describe_limit(limit)} counts"
                       " dollars, so the call is refused. An admin can price it in"
                       " pricing.json or with PUT /admin/pricing/<model>, or set a fallback"
                       " price for every unpriced model with PUT /admin/pricing/*.",
                       code="model_not_priced")


def _user_required(limit):
    # A call that names no user would escape a per-user limit; for_call has
    # already matched the limit to this call's project (or it is global).
    return LlimitError(400, "invalid_request_error",
                       f"The {describe_limit(limit)} applies to each user, and this call"
                       " names none: a project key must name its user with the header"
                       " X-LLimit-User (or the body's `user`).", code="user_required")


WINDOW_ADJECTIVES = {"minute": "per-minute", "day": "daily", "week": "weekly",
                     "month": "monthly", "total": "total"}


def window_in_words(window):
    """A rolling window as people say it: '7d' -> '7 days', '1h' -> 'hour'."""
    length = rolling_seconds(window)
    count, unit = (length // 3600, "hour") if window.endswith("h") else (length // 86400, "day")
    return unit if count == 1 else plural(count, unit)


def _window_adjective(window):
    return WINDOW_ADJECTIVES.get(window) or window_in_words(window)


def _resets_on(end):
    # Midnight ends read as a date; others with their time.
    if end is None:
        return "it does not reset"
    when = utc_iso(end)
    return (f"it resets on {when[:10]}" if when.endswith("T00:00:00Z")
            else f"it resets at {when[:16].replace('T', ' ')} UTC")


def warning_text(limit, amount, used, end):
    """The X-LLimit-Warning sentence for one limit, or None while it is not near.

    Said at the highest alert_at percentage reached, and once a warn limit is
    reached; like refusal_text, for the key holder: no ids, no scope jargon.
    """
    if amount <= 0:
        return None
    percent = 100.0 * used / amount
    reached = [p for p in json.loads(limit["alert_at"] or "[]") if percent >= p]
    if not reached and not (limit["action"] == "warn" and used >= amount):
        return None
    metric, window = limit["metric"], limit["window"]
    owner = "your" if limit["each"] or limit["scope"] in ("user", "key", "plan") else (
        "this organisation's" if limit["scope"] == "global"
        else f"the project {limit['target']}'s")
    allowance = "budget" if metric == "usd" else "allowance"
    period = f"{_window_adjective(window)} {allowance}" if window in WINDOWS \
        else f"{allowance} per {window_in_words(window)}"
    shown = math.floor(percent)  # what is used, not the threshold: "73%" past 50
    decimals = usd_decimals(amount / NANO) if metric == "usd" else None
    return (f"You have used {shown:g}% of {owner} {period} of"
            f" {format_amount(metric, amount, decimals)}; {_resets_on(end)}.")


def refusal_text(limit, used, in_flight, end, now, limit_message=None):
    """What a key holder reads when a limit refuses a call: what ran out, until when, whom to ask.

    Written for the person, not the admin: no limit ids (the X-LLimit-Limit-Id
    header has it), no scope jargon.
    """
    metric, window = limit["metric"], limit["window"]
    amount = limit_amount_units(limit)
    decimals = usd_decimals(amount / NANO, (used + in_flight) / NANO)
    whose = {"global": "This organisation's", "project": f"The project {limit['target']}'s"}
    owner = "Your" if limit["each"] or limit["scope"] in ("user", "key", "plan") \
        else whose[limit["scope"]]
    allowance = "budget" if metric == "usd" else "allowance"
    if window == "minute":
        sentence = (f"{owner} limit of {format_amount(metric, amount)} per minute is reached."
                    f" Try again in {plural(max(1, int(end - now + 0.999)), 'second')}.")
    else:
        spent = "spent" if metric == "usd" else "used"
        period = f"{WINDOW_ADJECTIVES[window]} {allowance}" if window in WINDOWS \
            else f"{allowance} per {window_in_words(window)}"
        sentence = (f"{owner} {period} of"
                    f" {format_amount(metric, amount, decimals)} is used up"
                    f" ({format_amount(metric, used, decimals)} {spent}")
        if in_flight:
            sentence += f", {format_amount(metric, in_flight, decimals)} more in calls under way"
        sentence += ")."
        sentence += (" It does not reset." if end is None else
                     f" It resets at {utc_iso(end)[:16].replace('T', ' ')} UTC.")
    return sentence + " " + (limit_message or "Ask your llimit admin to raise it.")


def _limit_headers(headers, limit, amount, used, need, start, end, now):
    # compat: OpenAI's x-ratelimit-* headers, which clients and SDKs read, for
    # minute limits; the tightest limit of each kind wins. As OpenAI's, remaining
    # counts this call (`need`, its reserved worst case): what is left after it.
    remaining = max(amount - used, 0)
    if limit["window"] == "minute" and limit["metric"] in ("requests", "tokens"):
        metric = limit["metric"]
        name = f"x-ratelimit-remaining-{metric}"
        after = max(remaining - need, 0)
        if name not in headers or after < int(headers[name]):
            headers[f"x-ratelimit-limit-{metric}"] = str(int(amount))
            headers[name] = str(int(after))
            headers[f"x-ratelimit-reset-{metric}"] = f"{max(int(end - now), 0)}s"
    elif limit["metric"] == "usd":
        current = headers.get("X-LLimit-Budget-Remaining")
        if current is None or remaining / NANO < float(current):
            headers["X-LLimit-Budget-Remaining"] = f"{remaining / NANO:.6f}"


def _alert_text(limit, subject, threshold, entry, end):
    metric = limit["metric"]
    used = format_amount(metric, entry.metric(metric))
    resets = "it does not reset" if end is None else f"it resets {utc_iso(end)}"
    verb = "reached" if threshold >= 100 else f"passed {threshold:g}% of"
    return (f":warning: llimit: {describe_subject(subject)} has {verb} the"
            f" {describe_limit(limit)}"
            f" ({used} used; {resets}).")


def _one_of(values, nullable=False):
    return Field({"type": "string", "enum": [*values, None] if nullable else list(values),
                  "nullable": nullable}, "must be one of " + ", ".join(values))


AMOUNT = {"type": "number", "minimum": 0, "maximum": 1e15}
ALERT_AT = {"type": "array", "nullable": True, "items": {
    "type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 100}}
NULLABLE_STRING = {"type": "string", "nullable": True}
LIMIT_FIELDS = {
    "scope": _one_of(SCOPES), "target": Field(NULLABLE_STRING, "must be a string"),
    "each": _one_of(("user", "key"), nullable=True), "metric": _one_of(LIMIT_METRICS),
    "window": Field({"type": "string", "pattern": WINDOW_PATTERN, "description":
                     "a calendar window, or a rolling one: <n>h or <n>d (1-9999)"},
                    "must be one of minute, day, week, month, total, or <n>h / <n>d"
                    " such as 24h or 30d"),
    "amount": Field(AMOUNT, "must be a number >= 0"),
    "action": _one_of(ACTIONS),
    "alert_at": Field(ALERT_AT, "must be a list of percentages between 0 and 100"),
    "note": Field(NULLABLE_STRING, "must be a string"),
    "starts_at": Field({"type": "string", "nullable": True, "format": "date-time",
                        "description": "when a rolling window's periods are counted from;"
                        " null: when the limit was made"},
                       "must be an ISO 8601 time such as 2026-01-01T00:00:00Z"),
}
# A plan's limits: the limit's shape without scope, target or each (a plan's
# limit applies to each member), and with the id of one to keep on PATCH.
PLAN_LIMIT_FIELDS = {**{name: field for name, field in LIMIT_FIELDS.items()
                        if name not in ("scope", "target", "each")},
                     "id": Field({"type": "string", "maxLength": 64}, "must be a limit id")}


def validate_limit(data, current=None, domains=()):
    """A limit dict from JSON input (merged over `current` for PATCH); 400 names the field.

    A user limit's target is put through the Identity rule of `domains` (user_domains).
    """
    check_input(data, LIMIT_FIELDS, "limit")
    merged = dict(current or {})
    if isinstance(merged.get("alert_at"), str):
        merged["alert_at"] = json.loads(merged["alert_at"])  # as stored; input must be a list
    merged.update(data)
    merged.setdefault("action", "block")
    for field in ("scope", "metric", "window"):
        if merged.get(field) is None:
            raise _field_error(field, LIMIT_FIELDS[field].problem)
    if merged["scope"] == "global":
        merged["target"] = None
    elif not isinstance(merged.get("target"), str) or not merged["target"]:
        raise _field_error("target", f"is required for scope {merged['scope']}")
    if merged["scope"] == "user":
        merged["target"] = canonical_user_name(merged["target"], domains)
        if merged["target"] is None:
            raise _field_error("target", "is required for scope user")
    if merged["scope"] == "key" and merged.get("each"):
        raise _field_error("each", "does not apply to a key")
    if merged["scope"] == "user" and merged.get("each") == "user":
        raise _field_error("each", "a user limit can only apply to each key")
    if merged.get("amount") is None:
        raise _field_error("amount", LIMIT_FIELDS["amount"].problem)
    return _limit_defaults(merged)


def _limit_defaults(merged):
    # The checks and defaults every limit shares, a plan's too.
    if merged.get("amount") is None:
        raise _field_error("amount", LIMIT_FIELDS["amount"].problem)
    if merged.get("window") is None or merged.get("metric") is None:
        raise _field_error("window" if merged.get("window") is None else "metric",
                           LIMIT_FIELDS["window" if merged.get("window") is None
                                        else "metric"].problem)
    if merged.get("alert_at") is not None and not isinstance(merged["alert_at"], str):
        merged["alert_at"] = json.dumps(sorted(set(merged["alert_at"])))
    if merged.get("starts_at") is not None:
        try:
            merged["starts_at"] = utc_iso(iso_seconds(merged["starts_at"]))
        except ValueError:
            raise _field_error("starts_at", LIMIT_FIELDS["starts_at"].problem) from None
    for field in ("alert_at", "note", "each", "starts_at", "reset_at"):
        merged.setdefault(field, None)
    return merged


def validate_plan_limit(data, plan_id, current=None):
    """One limit of a plan from JSON input (merged over `current`, the limit it keeps)."""
    check_input(data, PLAN_LIMIT_FIELDS, "plan limit")
    merged = dict(current or {})
    merged.update({name: value for name, value in data.items() if name != "id"})
    merged.update(scope="plan", target=plan_id, each=None)
    merged.setdefault("action", "block")
    return _limit_defaults(merged)



def _must_exist(row, what, ident):
    """The row, or a 404 naming what was looked for."""
    if row is None:
        raise LlimitError(404, "invalid_request_error", f"No {what} {ident!r}.",
                          code=f"{what}_not_found")
    return row


def limit_to_json(limit, used, end):
    """A limit as the admin API and /llimit/me show it."""
    amount = limit_amount_units(limit)
    scale = NANO if limit["metric"] == "usd" else 1
    return {
        "id": limit["id"], "scope": limit["scope"], "target": limit["target"],
        "each": limit["each"], "metric": limit["metric"], "window": limit["window"],
        "amount": limit["amount"], "action": limit["action"],
        "alert_at": json.loads(limit["alert_at"]) if limit["alert_at"] else None,
        "note": limit["note"],
        "starts_at": limit["starts_at"] or (limit["created_at"] if rolling_seconds(
            limit["window"]) else None),
        "reset_at": limit["reset_at"],
        "used": used / scale if scale != 1 else used,
        "remaining": max(amount - used, 0) / scale if scale != 1 else max(amount - used, 0),
        "resets_at": None if end is None else utc_iso(end),
    }


def add_limit(db, limit, now_iso):
    """Store a validated limit under a fresh id; returns the id."""
    limit = {"starts_at": None, "reset_at": None, **limit,
             "id": "lim_" + secrets.token_hex(6), "created_at": now_iso}
    insert_limit(db, limit)
    return limit["id"]


def reset_limit(db, limit, now_iso):
    """Start a limit's current period now (its history stays): returns the row written.

    A rolling window's periods are counted from now on; a calendar window's
    current period starts now, and the next one at its usual time.
    """
    limit = dict(limit)
    limit["starts_at" if rolling_seconds(limit["window"]) else "reset_at"] = now_iso
    update_limit(db, limit)
    return limit


PLAN_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
PLAN_FIELDS = {
    "id": Field({"type": "string", "pattern": PLAN_ID},
                "must be 1-64 letters, digits, '_', '.' or '-'"),
    "name": Field({"type": "string", "maxLength": 200, "pattern": r"^[^\r\n]*$"},
                  "must be a single-line string"),
    "limits": Field({"type": "array", "items": {"type": "object"}},
                    "must be a list of limits (metric, window, amount, ...)"),
}


def parse_plan_limit(text):
    """A plan limit from its short form METRIC:AMOUNT/WINDOW (usd:20/month); 400 if malformed."""
    metric, colon, rest = text.strip().partition(":")
    amount, slash, window = rest.partition("/")
    try:
        value = float(amount)
    except ValueError:
        value = None
    if not colon or not slash or value is None or not math.isfinite(value):
        raise _field_error("limits", f"{text.strip()!r} is not METRIC:AMOUNT/WINDOW,"
                                     " e.g. usd:20/month or requests:60/minute")
    return {"metric": metric.strip(), "amount": value, "window": window.strip()}


def create_plan(db, data, now_iso):
    """Add a plan and its limits from input; 409 if the id is taken. Returns its id."""
    check_input(data, PLAN_FIELDS, "plan")
    if data.get("id") is None:
        raise _field_error("id", PLAN_FIELDS["id"].problem)
    plan_id = data["id"]
    limits = [validate_plan_limit(item, plan_id) for item in data.get("limits", [])]
    with transaction(db):
        if get_plan(db, plan_id) is not None:
            raise LlimitError(409, "invalid_request_error", f"A plan {plan_id!r} exists already.",
                              code="plan_exists")
        insert_plan(db, {"id": plan_id, "name": data.get("name") or plan_id,
                         "created_at": now_iso})
        for limit in limits:
            add_limit(db, limit, now_iso)
    return plan_id


def change_plan(db, plan_id, data, now_iso):
    """Rename a plan and/or replace its limits; 404 if there is none.

    `limits` replaces the whole set: an item naming the `id` of one of the
    plan's limits changes that limit (its period and history stay), an item
    without one adds a limit, and a limit not named is deleted.
    """
    check_input(data, PLAN_FIELDS, "plan")
    if "id" in data and data["id"] != plan_id:
        raise _field_error("id", "cannot change")
    with transaction(db):
        _must_exist(get_plan(db, plan_id), "plan", plan_id)
        if data.get("name"):
            rename_plan(db, plan_id, data["name"])
        if "limits" not in data:
            return
        current = {row["id"]: dict(row) for row in list_limits(db)
                   if row["scope"] == "plan" and row["target"] == plan_id}
        kept = set()
        for item in data["limits"]:
            check_input(item, PLAN_LIMIT_FIELDS, "plan limit")
            if item.get("id") is not None:
                if item["id"] not in current:
                    raise _field_error("limits", f"names {item['id']!r}, not a limit of this plan")
                update_limit(db, validate_plan_limit(item, plan_id, current[item["id"]]))
                kept.add(item["id"])
            else:
                add_limit(db, validate_plan_limit(item, plan_id), now_iso)
        for limit_id in current.keys() - kept:
            delete_limit(db, limit_id)


def assign_plan(db, user_name, plan_id, now_iso):
    """Put a user on a plan as an admin does (None: back to the default); 404 for no plan."""
    with transaction(db):
        if plan_id is None:
            delete_user_plan(db, user_name)
        else:
            _must_exist(get_plan(db, plan_id), "plan", plan_id)
            set_user_plan(db, user_name, plan_id, "admin", now_iso)


def remove_plan(db, plan_id):
    """Delete a plan, its limits and its members' assignments; 404 for no plan."""
    with transaction(db):
        _must_exist(get_plan(db, plan_id), "plan", plan_id)
        delete_plan(db, plan_id)


def plan_to_json(db, plan, now):
    """A plan with its limits as the admin API shows a limit, less `used` and
    `remaining`: each member has their own (GET /admin/users/<user> shows them)."""
    shown = []
    for row in list_limits(db):
        if row["scope"] == "plan" and row["target"] == plan["id"]:
            limit = limit_to_json(row, 0, limit_period(row, now)[1])
            del limit["used"], limit["remaining"]
            shown.append(limit)
    return {"id": plan["id"], "name": plan["name"], "created_at": plan["created_at"],
            "limits": shown}


class CallSlots:
    """Calls under way, bounded per key, per user and overall; thread-safe.

    One key holder with slow calls could otherwise hold every worker thread:
    LLIMIT_MAX_CONCURRENT_PER_KEY / _PER_USER bound them, and proxied calls
    together may use all threads but RESERVED_THREADS, so /healthz and the
    pages always find a free one. Past a bound a call gets 429 at once.
    Per instance, as the threads are (docs/running.md: several instances).
    """

    def __init__(self, per_key, per_user, total):
        self.per_key, self.per_user, self.total = per_key, per_user, max(total, 1)
        self._lock = threading.Lock()
        self._running = collections.Counter()  # ("key", id), ("user", name), ("all",) -> calls

    def take(self, key_id, user_name):
        """Hold a slot for a call of this key and user, or raise 429."""
        counts = self._running
        bounds = [(("key", key_id), self.per_key, "This key"), (("all",), self.total, "llimit")]
        if user_name is not None:
            bounds.insert(1, (("user", user_name), self.per_user, f"User {user_name}"))
        with self._lock:
            for slot, bound, who in bounds:
                if counts[slot] >= bound:
                    raise LlimitError(429, "rate_limit_exceeded",
                                      f"{who} has {bound} calls under way already; wait for one"
                                      " to finish.", code="too_many_concurrent_calls",
                                      headers={"Retry-After": "1"})
            for slot, _bound, _who in bounds:
                counts[slot] += 1

    def give_back(self, key_id, user_name):
        """Free the slot of a call that has ended."""
        with self._lock:
            for slot in (("key", key_id), ("user", user_name), ("all",)):
                if slot[0] != "user" or user_name is not None:
                    self._running[slot] -= 1
                    if not self._running[slot]:
                        del self._running[slot]


class AlertSender:
    """Delivers limit alerts to LLIMIT_ALERT_WEBHOOK from its own thread.

    Alerts are stored (alerts_sent) before they are sent, so each fires once
    per threshold and window; delivery is retried with backoff, also after a
    restart, and never holds up a call.
    """

    RETRIES = 5

    def __init__(self, database, webhook_url):
        self.database = database
        self.webhook_url = webhook_url
        self._queue = queue.SimpleQueue()
        self._session = requests.Session()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llimit-alerts", daemon=True)

    def start(self):
        """Start delivering, the undelivered alerts of earlier runs first (the server only)."""
        if self.webhook_url:
            for alert in list_undelivered_alerts(self.database()):
                self._queue.put(dict(alert))
        self._thread.start()

    def record(self, db, alerts):
        """Store alerts that are due (once each) and queue the new ones for delivery."""
        with transaction(db):
            fresh = [alert for alert in alerts if insert_alert_once(db, alert)]
        for alert in fresh:
            log.warning("limit alert: %s", alert["text"])
            if self.webhook_url:
                self._queue.put(alert)

    def close(self, timeout=15.0):
        """Stop delivering before the database closes: a post under way is still noted
        delivered (else the next start would send it again); queued ones wait for it."""
        self._stopping.set()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self):
        while not self._stopping.is_set():
            alert = self._queue.get()
            for attempt in range(self.RETRIES):
                if alert is None or self._stopping.is_set():
                    return
                try:
                    resp = self._session.post(self.webhook_url, timeout=10, json={
                        "text": alert["text"], "limit_id": alert["limit_id"],
                        "subject": alert["subject"], "threshold": alert["threshold"],
                        "window_start": alert["window_start"]})
                    if resp.status_code < 300:
                        self._mark_delivered(alert)
                        break
                    log.warning("alert webhook answered %s", resp.status_code)
                except requests.RequestException as error:
                    log.warning("alert webhook failed: %s", type(error).__name__)
                self._stopping.wait(min(2 ** attempt, 30))

    def _mark_delivered(self, alert):
        try:
            mark_alert_delivered(self.database(), alert, utc_iso(time.time()))
        except DatabaseError:
            # Delivered, but not noted: the next start sends it again. The thread
            # goes on, or no later alert would be delivered.
            log.exception("alert delivered, but not noted so in the database")


# =============================================================================
# 5. Upstream proxy
#    Where a call goes and how: pooled urllib3 connections per upstream,
#    header rewriting (the client's credentials out, the upstream's in,
#    hop-by-hop headers dropped), and the SSE relay that passes each event on
#    as it arrives while a StreamMeter reads its usage. Knows nothing of keys
#    or limits; the handlers in section 8 put the pieces together.
# =============================================================================

UPSTREAM_KINDS = ("openai", "azure", "anthropic", "gemini")
HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade"))
# Request headers that go upstream: an allowlist per upstream kind, as WSGI
# names them, so nothing else the client or a proxy in front sent (cookies, SSO
# tokens, X-Forwarded-*, OpenAI-Organization / -Project, llimit's own X-LLimit-User
# and LLIMIT_USER_HEADERS) reaches the provider. The rest are what the official
# SDKs send; x-stainless-* (SDK telemetry) pass by prefix.
_COMMON_REQUEST_HEADERS = ("accept", "user-agent", "idempotency-key")
FORWARDED_REQUEST_HEADERS = {
    kind: frozenset("HTTP_" + name.upper().replace("-", "_")
                    for name in _COMMON_REQUEST_HEADERS + extra)
    for kind, extra in (
        ("openai", ("openai-beta",)),
        ("azure", ("openai-beta", "x-ms-client-request-id", "x-ms-useragent")),
        ("anthropic", ("anthropic-version", "anthropic-beta")),
        ("gemini", ("x-goog-api-client",)))}
FORWARDED_HEADER_PREFIX = "HTTP_X_STAINLESS_"
# requests decodes gzip and we set the length of what we send.
DROPPED_RESPONSE_HEADERS = HOP_BY_HOP | frozenset(("content-length", "content-encoding"))
AZURE_DEPLOYMENT_PATHS = ("chat/completions", "completions", "embeddings",
                          "audio/transcriptions", "audio/translations", "audio/speech",
                          "images/generations")
ANTHROPIC_VERSION = "2023-06-01"
GEMINI_VERSIONS = ("v1", "v1beta")  # the client's version prefix, kept upstream
SSE_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# The last event of a stream is held back until the call's usage is committed.
FINAL_SSE_DATA = ("[DONE]",)
FINAL_SSE_EVENTS = ("message_stop", "response.completed")
DOT_SEGMENT = re.compile(r"(?:^|[/\\])\.{1,2}(?:[/\\]|$)")
PATH_SAFE_CHARS = "/:@!$&'()*+,;=-._~"
UNSAFE_PATH_CHAR = re.compile(r"[^A-Za-z0-9/:@!$&'()*+,;=._~-]")


@dataclasses.dataclass(frozen=True)
class Upstream:
    """Where one project's calls go, with the key to send (never shown)."""
    kind: str
    base_url: str
    api_version: str | None
    key: str | None = dataclasses.field(repr=False)


# Variables an `env:` upstream key may never name, whatever LLIMIT_UPSTREAM_ENV_PATTERN says:
# llimit's own settings (the admin token, the default upstream key...) and Entra's secret.
OWN_VARIABLES = frozenset(env for _field, env, *_rest in SETTINGS) | frozenset((
    "AZURE_AD_TENANT_ID", "AZURE_AD_CLIENT_ID", "AZURE_AD_CLIENT_SECRET",
    "AZURE_AD_CORPORATE_DOMAIN"))


def upstream_env_allowed(name, pattern):
    """Whether a project's upstream key may be read from variable `name` (env:NAME).

    Admins (SSO users in LLIMIT_ADMIN_USERS too) set upstream keys; without this
    they could send any of llimit's own secrets to an upstream URL they control.
    """
    return name not in OWN_VARIABLES and fnmatch.fnmatchcase(name, pattern)


def resolve_upstream(project, config, environ=None):
    """The Upstream of a project row; the default project falls back to LLIMIT_UPSTREAM_*.

    `env:NAME` keys are read from the environment now, so rotating one needs
    no restart; a missing variable is a 502 that names it. A project's key
    goes only to the project's URL and the default key only to the default
    URL: a key without its URL (a row from before this was refused) is a 502.
    """
    environ = os.environ if environ is None else environ
    if project["upstream_url"]:
        base_url, stored_key = project["upstream_url"], project["upstream_key"]
        api_version = project["api_version"]
    elif project["upstream_key"]:
        raise LlimitError(502, "upstream_error",
                          "This key's project has its own upstream key but no upstream URL;"
                          " ask its admin to set the URL.", code="upstream_misconfigured")
    else:
        base_url, stored_key = config.upstream_url, config.upstream_key
        api_version = project["api_version"] or config.upstream_api_version
    key = stored_key
    if stored_key and stored_key.startswith("env:"):
        # Checked again here: a project stored before the rule, or the pattern narrowed.
        if not upstream_env_allowed(stored_key[4:], config.upstream_env_pattern):
            raise LlimitError(502, "upstream_error",
                              f"The upstream key variable {stored_key[4:]} is not one projects"
                              " may use (LLIMIT_UPSTREAM_ENV_PATTERN); ask the admin.",
                              code="upstream_key_missing")
        key = environ.get(stored_key[4:])
        if not key:
            raise LlimitError(502, "upstream_error",
                              f"The upstream key variable {stored_key[4:]} is not set on the"
                              " llimit server; ask its admin.", code="upstream_key_missing")
    return Upstream(project["upstream_kind"] or "openai", base_url.rstrip("/"), api_version, key)


class UpstreamPool:
    """Pooled keep-alive connections to every upstream, shared by all threads.

    The hot path speaks urllib3 (the library under requests) directly: a call
    through requests.Session costs about 0.6 ms of CPU against 0.15 ms here,
    which is most of llimit's own budget. Proxy settings (HTTPS_PROXY,
    NO_PROXY) and CA bundles (REQUESTS_CA_BUNDLE, SSL_CERT_FILE) are honoured
    as requests would, read once per upstream origin.
    """

    def __init__(self, pool_size, connect_timeout, read_timeout):
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self._options = dict(num_pools=64, maxsize=pool_size, block=False, retries=False,
                             timeout=self._timeout, ca_certs=_ca_bundle())
        self._direct = urllib3.PoolManager(**self._options)
        self._proxies = {}
        self._pools = {}     # origin -> its connection pool, looked up once
        self._lock = threading.Lock()

    def pool(self, url):
        """The connection pool for the origin of `url` (direct, or via the environment's proxy)."""
        origin = url[:url.find("/", url.find("//") + 2)] if url.count("/") > 2 else url
        pool = self._pools.get(origin)
        if pool is None:
            with self._lock:
                proxy = requests.utils.get_environ_proxies(origin).get(origin.split(":")[0])
                manager = self._direct
                if proxy:
                    manager = self._proxies.get(proxy)
                    if manager is None:
                        manager = self._proxies[proxy] = urllib3.ProxyManager(
                            proxy, **self._options)
                pool = self._pools[origin] = manager.connection_from_url(origin)
        return pool

    def close(self):
        """Close every pooled connection."""
        with self._lock:
            for manager in (self._direct, *self._proxies.values()):
                manager.clear()
            self._pools.clear()


class OpenStreams:
    """The upstream responses of the streams being relayed (or drained) now; thread-safe.

    /metrics reports how many there are.

    A shutdown whose grace period is over cuts them (SHUT_RD on the upstream
    socket), which the relay sees as an upstream that broke off: the client
    gets an error event and the usage is metered, estimated, as for any cut.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._open = set()

    def add(self, resp):
        """Note a stream being relayed."""
        with self._lock:
            self._open.add(resp)

    def discard(self, resp):
        """Forget a stream that has ended."""
        with self._lock:
            self._open.discard(resp)

    def __len__(self):
        return len(self._open)

    def cut_all(self):
        """Cut every open stream's upstream; returns how many were cut."""
        with self._lock:
            streams = list(self._open)
        for resp in streams:
            try:
                resp.shutdown()
            except (OSError, ValueError, RuntimeError):
                pass  # it ended, or its connection went back to the pool, meanwhile
        return len(streams)


def _ca_bundle():
    return (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
            or requests.certs.where())


def upstream_url(upstream, path, query_string, deployment=None, model=None, azure_v1=False,
                 version="v1"):
    """The URL a call goes to. `path` is what follows /v1/ (or a deployment).

    `azure_v1`: the call came in on Azure's GA v1 routes (/openai/v1/...), which
    an Azure upstream serves under /openai/v1/ and without an api-version.
    `version`: the prefix the call came in under (v1 or v1beta), which a
    Gemini upstream's URL (the API root) is given back. A `key` in the query
    is the client's llimit key and never goes upstream.
    """
    path = _upstream_path(path)
    query_string = query_without_key(query_string)
    if deployment is not None:
        # Refused for every kind: other kinds ignore it in the URL, but it may become the model.
        _refuse_dot_segments(deployment)
    if upstream.kind == "azure" and azure_v1:
        return f"{upstream.base_url}/openai/v1/{path}" + ("?" + query_string if query_string
                                                         else "")
    if upstream.kind == "azure":
        if deployment is None and model and path in AZURE_DEPLOYMENT_PATHS:
            deployment = model  # compat: OpenAI-style clients name the deployment as model
        if deployment is not None:
            _refuse_dot_segments(deployment)  # again: it may be the model named in the body
            url = (f"{upstream.base_url}/openai/deployments/"
                   f"{urllib.parse.quote(deployment, safe='')}/{path}")
        else:
            url = f"{upstream.base_url}/openai/{path}"
    elif upstream.kind == "gemini":
        url = f"{upstream.base_url}/{version}/{path}"
    else:
        url = f"{upstream.base_url}/{path}"
    if upstream.api_version and "api-version=" not in query_string:
        query_string = (query_string + "&" if query_string else "") + \
            "api-version=" + urllib.parse.quote(upstream.api_version)
    return url + ("?" + query_string if query_string else "")


def query_without_key(query_string):
    """The query string less any `key=` parameter (a Gemini client's credential)."""
    if "=" not in query_string:
        return query_string
    # By the decoded name, as the key was read: "ke%79=" is a key too.
    return "&".join(part for part in query_string.split("&")
                    if urllib.parse.unquote_plus(part.split("=", 1)[0]) != "key")


def _upstream_path(path):
    # The server hands us the path percent-decoded: "%2e%2e" is "..", "%3F" is "?".
    # A dot segment would climb out of the upstream base (a server or proxy on the
    # way normalises it), and "?", "#" or a space would end the path early; so dot
    # segments are refused and everything outside RFC 3986's path characters is
    # encoded again. Backslashes count as separators: some servers treat them so.
    _refuse_dot_segments(path)
    return encoded_path(path)


def encoded_path(path):
    """A decoded path (bottle decodes PATH_INFO as UTF-8) percent-encoded again where
    it holds anything outside RFC 3986's path characters."""
    if UNSAFE_PATH_CHAR.search(path):
        return urllib.parse.quote(path, safe=PATH_SAFE_CHARS)
    return path


def _refuse_dot_segments(path):
    if DOT_SEGMENT.search(path):
        raise LlimitError(400, "invalid_request_error",
                          "The path may not contain '.' or '..' segments.", code="invalid_path")


def upstream_headers(environ, upstream):
    """Request headers for the upstream: the client's that its kind allows, plus the upstream's."""
    allowed = FORWARDED_REQUEST_HEADERS[upstream.kind]
    named_in_connection = environ.get("HTTP_CONNECTION")
    headers = {}
    for name, value in environ.items():
        if name in allowed or name.startswith(FORWARDED_HEADER_PREFIX):
            headers[name[5:].replace("_", "-").lower()] = value
    if named_in_connection:  # hop-by-hop by the client's own word (RFC 9110 7.6.1)
        for token in named_in_connection.split(","):
            headers.pop(token.strip().lower(), None)
    if environ.get("CONTENT_TYPE"):
        headers["content-type"] = environ["CONTENT_TYPE"]
    if upstream.key:
        if upstream.kind == "azure":
            headers["api-key"] = upstream.key
        elif upstream.kind == "anthropic":
            headers["x-api-key"] = upstream.key
        elif upstream.kind == "gemini":
            headers["x-goog-api-key"] = upstream.key
        else:
            headers["authorization"] = "Bearer " + upstream.key
    if upstream.kind == "anthropic":
        headers.setdefault("anthropic-version", ANTHROPIC_VERSION)
    return headers


def send_upstream(pool, method, url, headers, body):
    """Send a call upstream and return once its headers are in; failures become 502 or 504."""
    try:
        # Plain http through a forward proxy names the whole URL; otherwise (direct,
        # or https tunnelled through the proxy) the pool wants path and query.
        connections = pool.pool(url)
        forwarded = connections.proxy is not None and url.startswith("http://")
        target = url if forwarded else url[url.find("/", url.find("//") + 2):]
        return connections.urlopen(method, target, body=body or None, headers=headers,
                                   redirect=False, preload_content=False, decode_content=True,
                                   assert_same_host=False)
    except urllib3.exceptions.NewConnectionError as error:  # a subclass of timeout errors
        log.warning("upstream %s refused the connection: %s", url.split("?")[0],
                    type(error).__name__)
        raise LlimitError(502, "upstream_error", "The upstream could not be reached.",
                          code="upstream_unreachable") from None
    except urllib3.exceptions.TimeoutError:
        raise LlimitError(504, "upstream_timeout", "The upstream did not answer in time.",
                          code="upstream_timeout") from None
    except (urllib3.exceptions.HTTPError, OSError) as error:
        log.warning("upstream %s unreachable: %s", url.split("?")[0], type(error).__name__)
        raise LlimitError(502, "upstream_error", "The upstream could not be reached.",
                          code="upstream_unreachable") from None


def read_upstream_body(resp):
    """The whole (decoded) body of a non-stream upstream response; 502/504 if it breaks."""
    try:
        content = resp.read()
        resp.release_conn()
        return content
    except urllib3.exceptions.TimeoutError:
        resp.close()
        raise LlimitError(504, "upstream_timeout", "The upstream stopped answering.",
                          code="upstream_timeout") from None
    except (urllib3.exceptions.HTTPError, OSError):
        resp.close()
        raise LlimitError(502, "upstream_error", "The upstream broke off its answer.",
                          code="upstream_broken") from None


def client_response_headers(resp, own_headers=()):
    """(name, value) pairs of an upstream response that pass on to the client.

    One source of x-ratelimit-* per response: when llimit sends its own (a
    minute limit applies), the upstream's are dropped, else they pass.
    """
    own_rate_limits = any(name.lower().startswith("x-ratelimit-") for name in own_headers)
    return [(name, value) for name, value in resp.headers.items()
            if name.lower() not in DROPPED_RESPONSE_HEADERS
            and not (own_rate_limits and name.lower().startswith("x-ratelimit-"))]


def upstream_chunks(resp):
    """The raw bytes of a streaming response as they arrive (not waiting to fill a buffer)."""
    read = resp.read1
    while True:
        chunk = read(65536)
        if not chunk:
            return
        yield chunk


def split_sse(chunks):
    """Whole SSE events, as raw bytes with their blank-line end, from arbitrary chunks."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        start = 0
        while True:
            match = SSE_EVENT_END.search(buffer, start)
            if match is None:
                break
            yield buffer[start:match.end()]
            start = match.end()
        buffer = buffer[start:]
    if buffer.strip():
        yield buffer


def sse_fields(raw_event):
    """(event name or None, data text) of one raw SSE event, parsed by sseclient-py."""
    for event in sseclient.SSEClient((raw_event,)).events():
        return (None if event.event == "message" else event.event), event.data
    return None, ""  # a comment or keep-alive: passed on, nothing to read


def sse_error_event(kind, message, error_type="upstream_error", code="upstream_stream_broken"):
    """An error event in the stream's own dialect, for an upstream that broke off (or a
    stream whose usage could not be recorded)."""
    if kind == "anthropic":
        body = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"
    if kind == "gemini":
        body = {"error": {"code": 502, "message": message, "status": "UNAVAILABLE"}}
        return b"data: " + json.dumps(body).encode() + b"\r\n\r\n"
    body = {"error": {"message": message, "type": error_type, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


# =============================================================================
# 6. Keys and projects
#    What an admin hands out and configures: llimit keys (created here, shown
#    once, stored as their SHA-256) and projects (where a key's calls go, and
#    the limits a project's `budget` shorthand makes). Validates admin input
#    for both; the admin API, the pages and the CLI all come through here.
# =============================================================================

KEY_PREFIX = "llimit-"
MAX_USER_NAME = 200
MAX_MODEL_NAME = 200
# C0 and C1 control characters, and lone surrogates (no database stores them)
USER_NAME_JUNK = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def user_domains(config):
    """The e-mail domains of the Identity rule: LLIMIT_USER_DOMAINS, else the OIDC ones."""
    return frozenset(domain.strip().lower().lstrip("@")
                     for domain in config.user_domains or config.oidc_allowed_domains)


def canonical_user_name(value, domains):
    """The contract's Identity rule, for every source of a user name; None for no name.

    Trimmed, lowercased, no control characters, bounded; an e-mail address of
    one of `domains` becomes its local part, any other e-mail stays whole, so
    Grace@corp.example is grace and boss@elsewhere.example is never boss.
    """
    if not isinstance(value, str):
        return None
    name = USER_NAME_JUNK.sub("", value).strip().lower()
    local, at, domain = name.rpartition("@")
    if at and local and domain in domains:
        name = local.strip()
    return name[:MAX_USER_NAME] or None


def apply_identity_rule(db, domains):
    """Bring every stored user name under the Identity rule; returns {old: new}.

    Runs at every start (the rule depends on LLIMIT_USER_DOMAINS), so it is
    idempotent: a name the rule leaves alone is never touched.
    """
    with transaction(db):
        hold_start_lock(db)  # two instances renaming at once would add totals twice
        renames = {}
        for name in list_stored_user_names(db):
            canonical = canonical_user_name(name, domains)
            if canonical and canonical != name:
                renames[name] = canonical
        if renames:
            rename_users(db, renames)
    if renames:
        log.warning("user names brought under the Identity rule: %d renamed", len(renames))
    return renames


def hash_secret(raw):
    """SHA-256 hex digest of a key or token."""
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def new_raw_key():
    """A fresh key: llimit- and 43 URL-safe random characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def mask_key(raw_key):
    """The form keys are listed in, e.g. llimit-Ab3x…9fQz."""
    return f"{raw_key[:len(KEY_PREFIX) + 4]}…{raw_key[-4:]}"


def parse_time_input(value, field):
    """An ISO 8601 date or time from input as UTC 'YYYY-MM-DDTHH:MM:SSZ' (None stays None)."""
    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None:
        raise _field_error(field, "must be an ISO 8601 date or time, e.g. 2026-12-31")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return utc_iso(moment.timestamp())


SHORT_TEXT = {"type": "string", "nullable": True, "maxLength": 1000}
KEY_FIELDS = {
    "user": Field(SHORT_TEXT, "must be a string"),
    "project": Field({**SHORT_TEXT, "description": "null: default"}, "must be a string"),
    "note": Field(SHORT_TEXT, "must be a string"),
    "expires_at": Field({"type": "string", "nullable": True, "format": "date-time"},
                        "must be an ISO 8601 date or time, e.g. 2026-12-31"),
    "models": Field({"type": "array", "nullable": True,
                     "items": {"type": "string", "minLength": 1}},
                    "must be a list of model names, or null for all"),
}


def validate_key_fields(data, allowed, domains):
    """The editable fields of a key from JSON input; 400 names the field.

    `domains` are the Identity rule's (user_domains), for the `user` field.
    """
    check_input(data, {name: KEY_FIELDS[name] for name in allowed}, "key")
    fields = {name: data[name] for name in ("user", "project", "note") if name in data}
    if fields.get("user") is not None:
        fields["user"] = canonical_user_name(fields["user"], domains)
    if "expires_at" in data:
        fields["expires_at"] = parse_time_input(data["expires_at"], "expires_at")
    if "models" in data:
        fields["models"] = json.dumps(data["models"]) if data["models"] else None
    return fields


def create_key(db, now, user=None, project="default", note=None, expires_at=None, models=None):
    """Issue a key; returns (row dict, raw key). The raw key exists only in this return."""
    _must_exist(get_project(db, project), "project", project)
    raw_key = new_raw_key()
    row = {"id": "key_" + secrets.token_hex(8), "key_hash": hash_secret(raw_key),
           "masked_key": mask_key(raw_key), "project_id": project, "user_name": user,
           "note": note, "models": models, "created_at": utc_iso(now),
           "expires_at": expires_at, "revoked_at": None, "last_used_at": None}
    insert_key(db, row)
    return row, raw_key


def check_key_cap(db, project, user_name, now):
    """403 when a user already holds the project's max_keys_per_user active keys."""
    cap = project["max_keys_per_user"]
    if cap is not None and count_active_user_keys(db, user_name, project["id"],
                                                  utc_iso(now)) >= cap:
        raise LlimitError(403, "permission_denied",
                          f"You hold {cap} active key{'s' * (cap != 1)} in project"
                          f" {project['id']!r}, the most it allows per person. Revoke one"
                          " you no longer use, then create a new one.", code="too_many_keys")


def key_to_json(row, spend=None):
    """A key as listings show it: masked, never its hash."""
    requests_made, cost = spend or (0, 0)
    return {
        "id": row["id"], "masked_key": row["masked_key"],
        "user": row["user_name"], "project": row["project_id"], "note": row["note"],
        "models": json.loads(row["models"]) if row["models"] else None,
        "created_at": row["created_at"], "expires_at": row["expires_at"],
        "revoked_at": row["revoked_at"], "last_used_at": row["last_used_at"],
        "active": row["revoked_at"] is None and (
            row["expires_at"] is None or row["expires_at"] > utc_iso(time.time())),
        "requests": requests_made, "cost_usd": nusd_to_usd(cost),
    }


PROJECT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


ONE_LINE = {"type": "string", "nullable": True, "maxLength": 2000, "pattern": r"^[^\r\n]*$"}
SINGLE_LINE = "must be a single-line string"
# A stored key, or env:NAME with NAME a variable's name.
NOT_ENV = r"[^e\r\n][^\r\n]*|e([^n\r\n][^\r\n]*)?|en([^v\r\n][^\r\n]*)?|env([^:\r\n][^\r\n]*)?"
ENV_OR_KEY = rf"^({NOT_ENV}|env:[A-Za-z_][A-Za-z0-9_]*)?$"


def upstream_key_pattern(env_pattern):
    """ENV_OR_KEY with env:NAME narrowed to the names LLIMIT_UPSTREAM_ENV_PATTERN (a
    glob) lets through, for the spec: none if no variable's name can match the glob.
    (llimit's own settings stay refused whatever the glob says: see OWN_VARIABLES.)"""
    if set(env_pattern) == {"*"}:
        return ENV_OR_KEY
    name = ""
    for part in filter(None, re.split(r"(\*|\?|\[!?[^\]]+\])", env_pattern)):
        char = "[A-Za-z0-9_]" if name else "[A-Za-z_]"  # a name starts with no digit
        if part == "*":
            name += "[A-Za-z0-9_]*" if name else "([A-Za-z_][A-Za-z0-9_]*)?"
        elif part == "?":
            name += char
        elif part.startswith("[!"):
            name += "[^" + part[2:-1] + r"\W]"
        elif part.startswith("["):
            name += part
        elif re.fullmatch(r"\w+" if name else r"[A-Za-z_]\w*", part, re.ASCII):
            name += part
        else:
            return rf"^({NOT_ENV})?$"
    return rf"^({NOT_ENV}|env:{name})?$" if name else rf"^({NOT_ENV})?$"


PROJECT_FIELDS = {
    "id": Field({"type": "string", "pattern": PROJECT_ID.pattern},
                "must be 1-64 letters, digits, '_', '.' or '-'"),
    "name": Field(ONE_LINE, SINGLE_LINE),
    "upstream_kind": _one_of(UPSTREAM_KINDS),
    "upstream_url": Field({**ONE_LINE, "pattern": r"^https?://[A-Za-z0-9.:-]+(/[^\r\n]*)?$"},
                          "must be an http(s) URL"),
    "upstream_key": Field({**ONE_LINE, "pattern": ENV_OR_KEY,
                           "description": "write-only; env:NAME reads it from the environment"},
                          "must be a single-line string; env: must name an environment variable"),
    "api_version": Field(ONE_LINE, SINGLE_LINE),
    "allow_user_keys": Field({"type": "boolean"}, "must be true or false"),
    "allow_async": Field({"type": "boolean", "description": "allow batches and background"
                          " responses, charged once when they finish"}, "must be true or false"),
    "limit_message": Field({**ONE_LINE, "pattern": r"^[^\r]*$"}, "must be a string without"
                           " carriage returns"),
    "model_map": Field({"type": "object", "additionalProperties": {"type": "string"},
                        "nullable": True}, "must map deployment names to model names"),
    # keeps_to has no integers; validate_project checks it is a whole number.
    "max_keys_per_user": Field({"type": "integer", "minimum": 0, "maximum": 2**63 - 1,
                                "nullable": True},
                               "must be a whole number >= 0, or null for no cap"),
    "plans_allowed": Field({"type": "array", "nullable": True, "items": {
        "type": "string", "pattern": PROJECT_ID.pattern}, "description": "plans a project"
        " key may name per call with X-LLimit-Plan"}, "must be a list of plan ids"),
    # Checked by budget_limits, which makes limits of it; the spec shows its shape.
    "budget": Field({"nullable": True, "description": 'e.g. {"usd": 10, "window": "day"}'},
                    'must look like {"usd": 10, "window": "day"}'),
}


# Cloud metadata services answer anyone on the machine with its credentials; an
# upstream URL naming one would relay them to an admin's client.
METADATA_HOSTS = frozenset(("metadata.google.internal", "metadata", "169.254.169.254",
                            "fd00:ec2::254", "100.100.100.200"))


def validate_project(data, current=None, env_pattern=Config().upstream_env_pattern):
    """A project dict from JSON input (merged over `current` for PATCH); 400 names the field.

    `env_pattern` is LLIMIT_UPSTREAM_ENV_PATTERN: which variables env:NAME may name.
    """
    check_input(data, PROJECT_FIELDS, "project")
    project = dict(current) if current else {
        "upstream_kind": "openai", "upstream_url": None, "upstream_key": None,
        "api_version": None, "allow_user_keys": 1, "allow_async": 0, "limit_message": None,
        "model_map": None, "max_keys_per_user": None, "plans_allowed": None}
    if current and "id" in data and data["id"] != current["id"]:
        raise _field_error("id", "cannot change")
    if isinstance(project.get("model_map"), str):
        project["model_map"] = json.loads(project["model_map"])  # as stored; input: an object
    if isinstance(project.get("plans_allowed"), str):
        project["plans_allowed"] = json.loads(project["plans_allowed"])
    project.update({k: v for k, v in data.items() if k in PROJECT_COLUMNS})
    if project.get("id") is None:
        raise _field_error("id", PROJECT_FIELDS["id"].problem)
    if project.get("name") in (None, ""):  # not just falsy: {} is no name
        project["name"] = project["id"]
    if project["upstream_url"] is not None:
        _refuse_metadata_host(urllib.parse.urlsplit(project["upstream_url"]).hostname or "")
        project["upstream_url"] = project["upstream_url"].rstrip("/")
        if current and project["upstream_url"] != (current["upstream_url"] or None) \
                and "upstream_key" not in data:
            # Else a new URL would receive the key stored for the old one.
            raise _field_error("upstream_key", "must be given again when upstream_url changes")
    elif project["upstream_kind"] != "openai" and project["id"] != "default":
        raise _field_error("upstream_url", f"is required for kind {project['upstream_kind']}")
    if project["upstream_key"] is not None and project["upstream_url"] is None:
        # Else its calls would go to the default upstream, billed to the default key.
        raise _field_error("upstream_key", "needs an upstream_url: a project's own key is"
                                           " sent only to the project's own upstream")
    key = project["upstream_key"]
    if key and key.startswith("env:") and "upstream_key" in data \
            and not upstream_env_allowed(key[4:], env_pattern):
        raise _field_error("upstream_key", f"env: may name only variables matching {env_pattern}"
                           " (LLIMIT_UPSTREAM_ENV_PATTERN), never llimit's own settings")
    project["allow_user_keys"] = int(bool(project["allow_user_keys"]))  # stored as 0 or 1
    project["allow_async"] = int(bool(project["allow_async"]))
    if project["model_map"] is not None:
        project["model_map"] = json.dumps(project["model_map"], sort_keys=True)
    if project.get("plans_allowed"):
        project["plans_allowed"] = json.dumps(sorted(set(project["plans_allowed"])))
    else:
        project["plans_allowed"] = None  # an empty list allows none, as null does
    cap = project.get("max_keys_per_user")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int)
                            or not 0 <= cap < 2**63):
        raise _field_error("max_keys_per_user", "must be a whole number >= 0, or null for no cap")
    return project


def _refuse_metadata_host(host):
    # Private ranges stay allowed (intranet upstreams are normal); link-local
    # addresses and metadata services never are, named or resolved.
    host = host.lower().rstrip(".")
    addresses = {host}
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            addresses |= {info[4][0].split("%")[0] for info in socket.getaddrinfo(host, None)}
        except (OSError, UnicodeError):
            pass  # not resolvable now: calls will get 502 until it is
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            ip = None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if address in METADATA_HOSTS or (ip is not None and (
                ip.is_link_local or str(ip) in METADATA_HOSTS)):
            raise _field_error("upstream_url", "may not name a link-local or cloud metadata"
                               " address")


def budget_limits(project_id, budget):
    """Limit dicts for a project's `budget` shorthand, e.g. {"usd": 10, "window": "day"}."""
    budgets = budget if isinstance(budget, list) else [budget]
    limits = []
    for item in budgets:
        if not isinstance(item, dict):
            raise _field_error("budget", 'must look like {"usd": 10, "window": "day"}')
        metrics = [m for m in LIMIT_METRICS if m in item]
        if len(metrics) != 1:
            raise _field_error("budget", "needs exactly one of usd, tokens, requests")
        extra = set(item) - {metrics[0], "window", "action", "each", "alert_at", "note"}
        if extra:
            raise _field_error("budget", f"has an unknown field {sorted(extra)[0]}")
        fields = {k: v for k, v in item.items() if k != metrics[0]}
        limits.append(validate_limit({"scope": "project", "target": project_id,
                                      "metric": metrics[0], "amount": item[metrics[0]],
                                      "window": fields.pop("window", "month"), **fields}))
    return limits


def create_project(db, data, now_iso, env_pattern):
    """Add a project from input, its `budget` shorthand as limits; 409 if the id is taken."""
    project = validate_project(data, env_pattern=env_pattern)
    # Only an absent or null budget is no budget: {} is a mistake, said so.
    limits = budget_limits(project["id"], data["budget"]) if data.get("budget") is not None \
        else []
    project["created_at"] = now_iso
    with transaction(db):
        if get_project(db, project["id"]) is not None:
            raise LlimitError(409, "invalid_request_error",
                              f"A project {project['id']!r} exists already.",
                              code="project_exists")
        insert_project(db, project)
        for limit in limits:
            add_limit(db, limit, now_iso)
    _warn_missing_upstream_key(project)
    return project


def change_project(db, project_id, data, now_iso, env_pattern):
    """Change a project from input (a `budget` adds limits); 404 if there is none."""
    with transaction(db):
        project = validate_project(
            data, dict(_must_exist(get_project(db, project_id), "project", project_id)),
            env_pattern)
        update_project(db, project)
        for limit in (budget_limits(project_id, data["budget"])
                      if data.get("budget") is not None else []):
            add_limit(db, limit, now_iso)
    _warn_missing_upstream_key(project)
    return project


def _warn_missing_upstream_key(project):
    key = project["upstream_key"]
    if key and key.startswith("env:") and not os.environ.get(key[4:]):
        log.warning("project %s: upstream key variable %s is not set; its calls will get 502",
                    project["id"], key[4:])


def project_to_json(project, config=None):
    """A project as the admin API shows it: the upstream key only as where it comes from.

    `upstream_url` is what is stored (null: LLIMIT_UPSTREAM_URL's); with a
    config, `upstream_url_in_force` and the key fields say what calls use.
    """
    key, source = project["upstream_key"], None
    in_force = project["upstream_url"]
    if config is not None and not project["upstream_url"]:
        # resolve_upstream: no URL of its own means the LLIMIT_UPSTREAM_* upstream.
        in_force, key, source = config.upstream_url, config.upstream_key, "LLIMIT_UPSTREAM_KEY"
    return {
        "id": project["id"], "name": project["name"],
        "upstream_kind": project["upstream_kind"], "upstream_url": project["upstream_url"],
        "upstream_url_in_force": in_force,
        "upstream_key_set": bool(key),
        "upstream_key_source": (None if not key else source if source else
                                key if key.startswith("env:") else "stored"),
        "api_version": project["api_version"],
        "allow_user_keys": bool(project["allow_user_keys"]),
        "allow_async": bool(project["allow_async"]),
        "limit_message": project["limit_message"],
        "model_map": json.loads(project["model_map"]) if project["model_map"] else None,
        "max_keys_per_user": project["max_keys_per_user"],
        "plans_allowed": json.loads(project["plans_allowed"] or "[]"),
        "created_at": project["created_at"],
    }


# =============================================================================
# 7. Auth
#    Who is calling: a presented llimit key, the admin token (one throttle for
#    wrong secrets of either kind), the end user a project key speaks for, and
#    who is looking at a page (server-side sessions, the CSRF check, open /
#    header / OIDC sign-in).
# =============================================================================

END_USER_HEADER = "X-LLimit-User"
PLAN_HEADER = "X-LLimit-Plan"  # a project key names its end user's plan per call
PLAN_HEADER_ENVIRON = "HTTP_X_LLIMIT_PLAN"
AUTH_FAILURES_PER_MINUTE = 20   # wrong keys or admin tokens from one address, then 429
AUTH_THROTTLE_ENTRIES = 10000   # addresses and known-good secrets remembered, each


def raw_key_from(environ):
    """The key a client sent: Bearer (OpenAI), api-key (Azure), x-api-key (Anthropic),
    x-goog-api-key or ?key= (Gemini)."""
    authorization = environ.get("HTTP_AUTHORIZATION", "")
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    raw_key = (environ.get("HTTP_API_KEY") or environ.get("HTTP_X_API_KEY")
               or environ.get("HTTP_X_GOOG_API_KEY") or "").strip()
    if not raw_key and "key" in environ.get("QUERY_STRING", ""):
        # compat: Gemini's REST examples put the key in the URL; never logged (logged_path).
        raw_key = (urllib.parse.parse_qs(environ["QUERY_STRING"]).get("key") or [""])[0].strip()
    return raw_key


class KeyCache:
    """Key rows by key hash, held in memory while the config_version stays put.

    A call then costs one tiny query (the version) instead of the key lookup
    join; any change to keys or projects, by this process or another (the
    CLI), moves the version and empties the cache, so a revoked key is refused
    on its next call. Only keys that exist are held, up to MAX_KEYS.
    """

    MAX_KEYS = 100_000

    def __init__(self):
        self._lock = threading.Lock()
        self._version = None
        self._rows = {}

    def row(self, db, key_hash, verified_later=False):
        """The key row (as get_key_by_hash) for `key_hash`, or None.

        `verified_later`: the caller checks the row's config_version itself in
        a statement it runs anyway (SharedLimits.admit), so a held row is
        handed out without reading the version first.
        """
        if not verified_later or self._version is None:
            self.advance(config_version(db))
        row = self._rows.get(key_hash)
        if row is None:
            row = get_key_by_hash(db, key_hash)
            if row is not None and row["config_version"] > self._version:
                self.advance(row["config_version"])  # the newer version is the database's
            # Held only if read at the version the cache is at: a row read just
            # before a revocation must not outlive it.
            if row is not None and row["config_version"] == self._version:
                with self._lock:
                    if row["config_version"] == self._version \
                            and len(self._rows) < self.MAX_KEYS:
                        self._rows[key_hash] = row
        return row

    def advance(self, version):
        """Hold rows of the database's config version `version` only (empties the cache if it moved)."""
        if version != self._version:
            with self._lock:
                if version != self._version:
                    self._rows, self._version = {}, version


def authenticate_key(find_key, raw_key, key_hash, now):
    """The key row (joined with its project) for a presented key, or LlimitError 401/403.

    `key_hash` is hash_secret(raw_key); `find_key(key_hash)` gives the row, or None.
    """
    row = find_key(key_hash) if raw_key.startswith(KEY_PREFIX) else None
    if row is None or not secrets_match(row["key_hash"], key_hash):
        raise LlimitError(401, "invalid_request_error",
                          f"Incorrect API key provided: {_shown_key(raw_key)}.",
                          code="invalid_api_key")
    if row["revoked_at"]:
        raise _refused_key(row, f"This key was revoked at {row['revoked_at']}.", "key_revoked")
    if row["expires_at"] and row["expires_at"] <= utc_iso(now):
        raise _refused_key(row, f"This key expired at {row['expires_at']}.", "key_expired")
    if row["project_exists"] is None:
        raise LlimitError(403, "permission_denied",
                          f"The project {row['project_id']} of this key no longer exists.",
                          code="project_deleted")
    return row


def _refused_key(row, message, code):
    # The row travels with the error: a refused known key is counted against its owner.
    error = LlimitError(403, "permission_denied", message, code=code)
    error.key_row = row
    return error


class AuthThrottle:
    """Slows down guessing of every secret (keys, the admin token on the API and
    on the sign-in page, the metrics token), per client address.

    The presented secret is always checked first (a hash lookup is cheap), so a
    correct one passes from any address, used before or not: the good keys of
    everyone behind one NAT or proxy address keep working while a guesser there
    is throttled. Only wrong secrets count: after AUTH_FAILURES_PER_MINUTE of
    them from one address within a minute, its further wrong ones get 429 (with
    Retry-After) instead of 401, without being counted, which tells the guesser
    nothing more than "wrong". Memory is bounded (the least recent addresses are
    forgotten first). Thread-safe; `clock` gives seconds.
    """

    def __init__(self, clock):
        self.clock = clock
        self._lock = threading.Lock()
        self._failures = collections.OrderedDict()  # address -> deque of failure times

    def wrong(self, address, error):
        """Raise `error` (the 401) for a wrong secret from `address`, counted; 429 instead
        once the address is over its allowance."""
        now = self.clock()
        with self._lock:
            times = self._failures.pop(address, None)
            if times is None:
                times = collections.deque(maxlen=AUTH_FAILURES_PER_MINUTE)
            wait = 60 - (now - times[0]) if len(times) == AUTH_FAILURES_PER_MINUTE else 0
            if wait <= 0:
                times.append(now)
            self._failures[address] = times
            if len(self._failures) > AUTH_THROTTLE_ENTRIES:
                self._failures.popitem(last=False)
        if wait > 0:
            seconds = str(int(wait + 0.999))
            raise LlimitError(429, "rate_limit_exceeded",
                              f"Too many wrong keys or tokens from this address; wait {seconds} s.",
                              code="too_many_failed_attempts", headers={"Retry-After": seconds})
        raise error


def authenticate_call(state, environ, verified_later=False):
    """The key row for this request, or LlimitError 401/403; wrong keys count
    toward the caller address's AuthThrottle. `verified_later`: see KeyCache.row."""
    raw_key = raw_key_from(environ)
    if not raw_key:
        raise LlimitError(401, "invalid_request_error",
                          "No API key provided. Send your llimit key as"
                          " 'Authorization: Bearer llimit-...'.", code="missing_api_key")
    find_key = functools.partial(state.keys.row, state.database(),
                                 verified_later=verified_later)
    try:
        return authenticate_key(find_key, raw_key, hash_secret(raw_key), state.config.clock())
    except LlimitError as error:
        if error.status != 401:
            raise
        state.auth_throttle.wrong(environ.get("REMOTE_ADDR", ""), error)


def _shown_key(raw_key):
    # As OpenAI does: enough of a wrong key to recognise it, never all of it.
    return raw_key[:3] + "*" * 4 + raw_key[-4:] if len(raw_key) > 12 else "****"


def end_user(environ, payload, user_headers, domains):
    """The end user a project key names: X-LLimit-User, LLIMIT_USER_HEADERS, or body `user`."""
    for header in (END_USER_HEADER, *user_headers):
        value = environ.get("HTTP_" + header.upper().replace("-", "_"))
        if value:
            return canonical_user_name(_header_text(value), domains)
    if isinstance(payload, dict) and isinstance(payload.get("user"), str) and payload["user"]:
        return canonical_user_name(payload["user"], domains)
    return None


def call_plan(state, db, key, environ, user_name):
    """The plan a call is under, or None: a project key's X-LLimit-Plan, else the
    user's own plan, else LLIMIT_DEFAULT_PLAN (for a call that names a user).

    A project key may name only a plan its project lists in plans_allowed
    (else 403 plan_not_allowed); a personal key's header is ignored, as its
    X-LLimit-User is: its holder cannot pick a larger plan.
    """
    version = key["config_version"]
    asked = environ.get(PLAN_HEADER_ENVIRON)
    if asked is not None and key["user_name"] is None:
        asked = _header_text(asked).strip()
        if asked not in json.loads(key["plans_allowed"] or "[]") \
                or not state.limits.plan_exists(db, version, asked):
            raise LlimitError(403, "permission_denied",
                              f"This key's project may not name the plan {asked[:64]!r}"
                              f" ({PLAN_HEADER}); an admin lists the plans it may name in the"
                              " project's plans_allowed.", code="plan_not_allowed")
        return asked
    return state.limits.plan_of(db, version, user_name, state.config.default_plan)


def _header_text(value):
    # WSGI hands header bytes over as latin-1; clients send names (e.g. e-mails) in UTF-8.
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def secrets_match(presented, expected):
    """Whether a presented secret equals the expected one, in constant time.

    Every comparison of a secret (or of its hash) goes through here: a plain
    == stops at the first differing byte, and its timing would let a guesser
    find a secret byte by byte. A timing test cannot catch a lapse reliably,
    so this holds by construction: one helper, no other comparison of secrets.
    """
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


# Sealing for a browser: text that waits in the database for a browser's next
# page (a new key's secret), readable only with the raw session id that browser
# holds, never by whoever holds a copy of the database (it keeps the id's
# hash). HMAC-SHA256 keyed by the raw id gives two keys; the text is XORed with
# HMAC(encryption key, nonce || counter) blocks and tagged with HMAC(MAC key,
# nonce || ciphertext): encrypt-then-MAC from the standard library alone.

def _session_keys(raw_session_id):
    root = raw_session_id.encode("utf-8")
    return (hmac.new(root, b"llimit seal: encrypt", hashlib.sha256).digest(),
            hmac.new(root, b"llimit seal: authenticate", hashlib.sha256).digest())


def _keystream(key, nonce, length):
    blocks = (hmac.new(key, nonce + counter.to_bytes(8, "big"), hashlib.sha256).digest()
              for counter in range((length + 31) // 32))
    return b"".join(blocks)[:length]


def seal_for_session(raw_session_id, text):
    """`text` sealed for the browser holding `raw_session_id` (URL-safe base64)."""
    encrypt_key, mac_key = _session_keys(raw_session_id)
    nonce, plain = secrets.token_bytes(16), text.encode("utf-8")
    cipher = bytes(a ^ b for a, b in zip(plain, _keystream(encrypt_key, nonce, len(plain))))
    tag = hmac.new(mac_key, nonce + cipher, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(nonce + cipher + tag).decode("ascii")


def open_for_session(raw_session_id, sealed):
    """The text seal_for_session sealed, or None if it was not sealed for this id (or altered)."""
    encrypt_key, mac_key = _session_keys(raw_session_id)
    try:
        blob = base64.urlsafe_b64decode(sealed.encode("ascii"))
    except (ValueError, UnicodeError):
        return None
    nonce, cipher, tag = blob[:16], blob[16:-32], blob[-32:]
    if len(blob) < 48 or not hmac.compare_digest(
            tag, hmac.new(mac_key, nonce + cipher, hashlib.sha256).digest()):
        return None
    plain = bytes(a ^ b for a, b in zip(cipher, _keystream(encrypt_key, nonce, len(cipher))))
    return plain.decode("utf-8")


def admin_token_matches(db, presented):
    """Whether a presented admin token is the current one (constant-time)."""
    stored = get_setting(db, "admin_token_sha256")
    return bool(presented and stored) and secrets_match(hash_secret(presented), stored)


def check_admin_token(state, presented, address):
    """Pass when `presented` is the admin token; else 401, or 429 for a throttled address."""
    if admin_token_matches(state.database(), presented):
        return
    state.auth_throttle.wrong(address, LlimitError(
        401, "invalid_request_error",
        "This needs the admin token: 'Authorization: Bearer <admin token>'.",
        code="invalid_admin_token"))


def ensure_admin_token(db, admin_token):
    """Keep the admin token's hash; returns a newly generated token, to print once, or None."""
    if admin_token:
        set_setting(db, "admin_token_sha256", hash_secret(admin_token))
        return None
    if get_setting(db, "admin_token_sha256"):
        return None
    generated = "llimit-admin-" + secrets.token_urlsafe(32)
    set_setting(db, "admin_token_sha256", hash_secret(generated))
    return generated


def ensure_upstream_user_secret(db):
    """The install's secret for hashing user names sent upstream; made once, kept in settings.

    Kept (not derived from anything a client sees), so a user's hash is stable
    across restarts and instances sharing the database, and unguessable.
    """
    secret = get_setting(db, "upstream_user_secret")
    if secret is None:
        secret = secrets.token_hex(32)
        set_setting(db, "upstream_user_secret", secret)
    return secret


def require_admin(state):
    """Raise 401 unless the request carries the admin token (pages use sessions)."""
    environ = bottle.request.environ
    authorization = environ.get("HTTP_AUTHORIZATION", "")
    token = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
    if not token:
        raise LlimitError(401, "invalid_request_error",
                          "This needs the admin token: 'Authorization: Bearer <admin token>'.",
                          code="invalid_admin_token")
    check_admin_token(state, token, environ.get("REMOTE_ADDR", ""))


# --- page sign-in: sessions, CSRF, and the three ways in --------------------------

SESSION_COOKIE = "llimit_session"
LOGIN_CSRF_COOKIE = "llimit_login_csrf"
SESSION_SECONDS = 7 * 86400
PENDING_SESSION_SECONDS = 3600     # a browser on its way to signing in
FORM_MAX_BYTES = 64 * 1024
OIDC_SCOPES = "openid email profile"
OIDC_CLOCK_SKEW_SECONDS = 120


@dataclasses.dataclass(frozen=True)
class PageSession:
    """Who is looking at a page, from their session row; the empty one is nobody."""
    id_hash: str | None = None        # None: this browser has no session
    user_name: str | None = None
    token_admin: bool = False         # signed in with the admin token
    is_admin: bool = False            # the admin token, or a user in LLIMIT_ADMIN_USERS
    csrf_token: str | None = None
    pending: dict | None = None       # an OIDC sign-in under way
    sees_reports: bool = False
    # The browser's own session id (its cookie), to open what was sealed for it; never shown.
    raw_id: str | None = dataclasses.field(default=None, repr=False)
    new_key_waiting: bool = False     # a new key's sealed secret waits for this page

    @property
    def signed_in(self):
        return bool(self.user_name or self.is_admin)


def sign_in_warnings(config):
    """What `serve` warns about the page sign-in configured, one line each."""
    warnings = []
    if config.auth == "open":
        warnings.append("LLIMIT_AUTH=open: pages sign in whoever types a user name, so anyone"
                        " who can reach llimit can act as anyone (get keys, see usage);"
                        " use header or oidc beyond a trusted intranet")
        if config.admin_users:
            warnings.append("LLIMIT_AUTH=open: LLIMIT_ADMIN_USERS is ignored, as anyone could"
                            " type those names; admins sign in with the admin token")
    if config.auth == "oidc" and not config.public_url:
        warnings.append("LLIMIT_AUTH=oidc without LLIMIT_PUBLIC_URL: the provider sends"
                        f" browsers back to {config.base_url}/login/callback; set"
                        " LLIMIT_PUBLIC_URL to the address people use")
    if config.auth == "oidc" and not config.oidc_allowed_domains:
        warnings.append("LLIMIT_AUTH=oidc without LLIMIT_OIDC_ALLOWED_DOMAINS: every account"
                        " the provider signs in may use llimit")
    return warnings


def page_session(state):
    """The PageSession of this request: its cookie, or with --auth header the proxy's user."""
    config = state.config
    db = state.database()
    raw_id = bottle.request.get_cookie(SESSION_COOKIE)
    row = get_session(db, hash_secret(raw_id), utc_iso(config.clock())) if raw_id else None
    if row is not None and row["is_admin"] and not secrets_match(
            row["admin_token_fingerprint"] or "", _admin_token_fingerprint(db)):
        row = None  # signed in with an admin token that has since changed
    session = _session_view(config, row, row["user_name"] if row else None, raw_id)
    if row is None:
        # No session row for a browser that only looks at /login: its form's CSRF
        # token is a double-submit cookie until a form is posted.
        session = dataclasses.replace(session,
                                      csrf_token=bottle.request.get_cookie(LOGIN_CSRF_COOKIE))
    if config.auth == "header":
        user_name = header_user(config, bottle.request.environ)
        if user_name and user_name != session.user_name:
            session = sign_in(state, session, user_name)
            if config.plan_claim:
                groups = bottle.request.environ.get(
                    "HTTP_" + config.plan_claim.upper().replace("-", "_"), "")
                refresh_plan(state, user_name, _header_text(groups).split(","))
        elif user_name is None and session.user_name:
            session = _session_view(config, row, None, raw_id)  # the proxy vouches for no one now
    return session


def _admin_token_fingerprint(db):
    return hash_secret("session:" + (get_setting(db, "admin_token_sha256") or ""))[:32]


def login_csrf(state, session):
    """The session with a CSRF token for the sign-in form: the session's own, or a
    double-submit cookie (set here) for a browser that has no session yet."""
    if session.csrf_token:
        return session
    token = secrets.token_urlsafe(32)
    bottle.response.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=PENDING_SESSION_SECONDS,
                               path="/login", httponly=True, samesite="lax",
                               secure=state.config.base_url.startswith("https:"))
    return dataclasses.replace(session, csrf_token=token)


def _session_view(config, row, user_name, raw_id):
    if row is None:
        return PageSession()
    token_admin = bool(row["is_admin"])
    is_admin = token_admin or bool(
        user_name and config.auth != "open" and user_name in admin_user_names(config))
    return PageSession(
        id_hash=row["id_hash"], user_name=user_name, token_admin=token_admin,
        is_admin=is_admin, csrf_token=row["csrf_token"],
        pending=json.loads(row["pending"]) if row["pending"] else None,
        sees_reports=is_admin or bool(config.reports_public and user_name),
        raw_id=raw_id,
        new_key_waiting="new_key_sealed" in row.keys() and bool(row["new_key_sealed"]))


def admin_user_names(config):
    """LLIMIT_ADMIN_USERS under the Identity rule: boss@elsewhere.example is never boss."""
    domains = user_domains(config)
    return {canonical_user_name(name, domains) for name in config.admin_users}


def sign_in(state, session, user_name, token_admin=False):
    """Replace the browser's session (if any) with a new one for a user; sets the cookie."""
    return _new_session(state, session, user_name, token_admin, SESSION_SECONDS)


def ensure_session(state, session):
    """A session row for a browser that has none yet, to carry an OIDC sign-in under way."""
    if session.id_hash:
        return session
    return _new_session(state, session, None, False, PENDING_SESSION_SECONDS)


def _new_session(state, old, user_name, token_admin, seconds):
    now = state.config.clock()
    raw_id = secrets.token_urlsafe(32)
    db = state.database()
    row = {"id_hash": hash_secret(raw_id), "user_name": user_name,
           "is_admin": int(token_admin), "csrf_token": secrets.token_urlsafe(32),
           "pending": None, "created_at": utc_iso(now), "expires_at": utc_iso(now + seconds),
           "admin_token_fingerprint": _admin_token_fingerprint(db) if token_admin else None}
    with transaction(db):
        if old.id_hash:  # a new id at every sign-in: a planted cookie signs no one in
            delete_session(db, old.id_hash)
        delete_expired_sessions(db, row["created_at"])
        insert_session(db, row)
    bottle.response.set_cookie(SESSION_COOKIE, raw_id, max_age=seconds, path="/",
                               httponly=True, samesite="lax",
                               secure=state.config.base_url.startswith("https:"))
    return _session_view(state.config, row, user_name, raw_id)


def sign_out(state, session):
    """End the browser's session and drop its cookie."""
    if session.id_hash:
        db = state.database()
        with transaction(db):
            delete_session(db, session.id_hash)
    bottle.response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax",
                                  secure=state.config.base_url.startswith("https:"))


def checked_form(state, session):
    """The form of a state-changing POST, once it is known to come from llimit's own page.

    The one place cross-site posts are refused (Sec-Fetch-Site, Origin) and the
    session's CSRF token is checked; every page POST goes through it.
    """
    environ = bottle.request.environ
    fetch_site = environ.get("HTTP_SEC_FETCH_SITE")
    origin = environ.get("HTTP_ORIGIN")
    if fetch_site not in (None, "same-origin") or (
            origin is not None and origin not in _own_origins(state.config)):
        raise LlimitError(403, "permission_denied",
                          "This form was sent from another site, so llimit refused it.",
                          code="cross_site_post")
    if int(environ.get("CONTENT_LENGTH") or 0) > FORM_MAX_BYTES:
        raise LlimitError(413, "invalid_request_error", "This form is too large.",
                          code="request_too_large")
    try:
        form = bottle.request.forms.decode()
    except UnicodeDecodeError:
        raise LlimitError(400, "invalid_request_error", "This form is not UTF-8 text.",
                          code="invalid_form") from None
    token = form.get("csrf_token", "")
    if not (session.csrf_token and token and secrets_match(token, session.csrf_token)):
        raise LlimitError(403, "permission_denied",
                          "This form has expired or was not sent from llimit's page;"
                          " reload the page and try again.", code="csrf_token_invalid")
    return form


def _own_origins(config):
    parts = bottle.request.urlparts
    return {f"{parts.scheme}://{parts.netloc}", _origin(config.base_url)}


def plan_from_groups(plan_groups, groups):
    """The plan LLIMIT_PLAN_GROUPS gives a member of `groups` (the first pair that
    matches, in the order written), or None."""
    member_of = {str(group).strip() for group in groups}
    return next((plan for group, plan in plan_groups if group in member_of), None)


def refresh_plan(state, user_name, groups):
    """At sign-in: put the user on the plan their groups map to (LLIMIT_PLAN_GROUPS).

    A matching group wins over an earlier assignment, an admin's too; with
    none, a plan an earlier sign-in gave is taken away and an admin's stays.
    Writes only when something changes, so config_version moves only then.
    """
    plan_id = plan_from_groups(state.config.plan_groups, groups)
    db = state.database()
    with transaction(db):
        row = get_user_plan(db, user_name)
        if plan_id is not None and get_plan(db, plan_id) is None:
            log.warning("LLIMIT_PLAN_GROUPS names the plan %s, which does not exist", plan_id)
            return
        if plan_id is None:
            if row is not None and row["source"] == "sign-in":
                delete_user_plan(db, user_name, "sign-in")
        elif row is None or row["plan_id"] != plan_id or row["source"] != "sign-in":
            set_user_plan(db, user_name, plan_id, "sign-in", utc_iso(state.config.clock()))


def _claim_groups(value):
    # A groups claim is a list of names, or one string of them (comma or space separated).
    if isinstance(value, list):
        return [item for item in value if isinstance(item, (str, int))]
    return re.split(r"[,\s]+", value) if isinstance(value, str) else []


def header_user(config, environ):
    """The user an SSO proxy names in LLIMIT_AUTH_HEADER, only from LLIMIT_TRUSTED_PROXIES."""
    value = environ.get("HTTP_" + config.auth_header.upper().replace("-", "_"))
    if not value or not _address_trusted(environ.get("REMOTE_ADDR"), config.trusted_proxies):
        return None
    return canonical_user_name(_header_text(value), user_domains(config))


def _address_trusted(address, trusted):
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    for entry in trusted:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


UNSAFE_NEXT_CHAR = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


def safe_next(path):
    """A path on this server to go to after sign-in; anything else becomes '/'.

    Parsed, not pattern-matched: no scheme, no host, one leading '/', and no
    backslash, whitespace or control character even once percent-decoded
    (browsers drop tabs and newlines and read '\\' as '/', so '/%09/evil.example'
    or '/\\evil.example' would leave llimit).
    """
    if not isinstance(path, str) or not path.startswith("/"):
        return "/"
    try:
        parts = urllib.parse.urlsplit(path)
    except ValueError:
        return "/"
    decoded = urllib.parse.unquote(path)
    if (parts.scheme or parts.netloc or decoded.startswith("//") or "\\" in decoded
            or UNSAFE_NEXT_CHAR.search(decoded)):
        return "/"
    return path


class OidcClient:
    """Sign-in with an OpenID Connect provider: discovery, the authorization code
    flow with PKCE, state and nonce, and the ID token's claims.

    The ID token comes straight from the provider's token endpoint over TLS (https
    is required, except on this machine), in exchange for the code, the PKCE
    verifier and the client secret. OpenID Connect Core 3.1.3.7 (6) lets TLS
    server validation stand in for checking the token's signature in exactly
    this case, so llimit needs no JOSE library; it checks iss, aud, azp, nonce,
    exp and iat itself.
    """

    METADATA_SECONDS = 3600

    def __init__(self, config):
        self.config = config
        self.issuer = (config.oidc_issuer or "").rstrip("/")
        self._http = requests.Session()
        self._metadata = None
        self._fetched_at = 0.0

    def metadata(self):
        """The provider's discovery document, fetched at most hourly."""
        if self._metadata is None or time.monotonic() - self._fetched_at > self.METADATA_SECONDS:
            document = self._get_json(self.issuer + "/.well-known/openid-configuration")
            issuer = document.get("issuer")
            # compat: Entra ID names its tenant by id in `issuer` when it was configured
            # by domain; the same origin served the document over TLS.
            if not isinstance(issuer, str) or (
                    issuer.rstrip("/") != self.issuer and _origin(issuer) != _origin(self.issuer)):
                raise self._failure(502, f"the provider's discovery names issuer {issuer!r}")
            for endpoint in ("authorization_endpoint", "token_endpoint"):
                if not is_https_or_loopback(str(document.get(endpoint, ""))):
                    raise self._failure(502, f"the provider's {endpoint} is not https")
            self._metadata, self._fetched_at = document, time.monotonic()
        return self._metadata

    def authorization_url(self, redirect_uri, pending):
        """Where to send the browser to sign in; `pending` holds state, nonce and verifier."""
        challenge = base64.urlsafe_b64encode(
            hashlib.sha256(pending["verifier"].encode()).digest()).rstrip(b"=").decode()
        query = urllib.parse.urlencode({
            "response_type": "code", "client_id": self.config.oidc_client_id,
            "redirect_uri": redirect_uri, "scope": OIDC_SCOPES, "state": pending["state"],
            "nonce": pending["nonce"], "code_challenge": challenge,
            "code_challenge_method": "S256"})
        endpoint = self.metadata()["authorization_endpoint"]
        return endpoint + ("&" if "?" in endpoint else "?") + query

    def claims(self, code, redirect_uri, pending, now):
        """The checked claims of the ID token the code is exchanged for."""
        metadata = self.metadata()
        data = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "code_verifier": pending["verifier"], "client_id": self.config.oidc_client_id}
        auth = None
        secret = self.config.oidc_client_secret
        methods = metadata.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        if secret and "client_secret_basic" not in methods:
            data["client_secret"] = secret
        elif secret:  # RFC 6749 2.3.1: both parts form-encoded before Basic
            auth = (urllib.parse.quote(self.config.oidc_client_id, safe=""),
                    urllib.parse.quote(secret, safe=""))
        try:
            resp = self._http.post(metadata["token_endpoint"], data=data, auth=auth, timeout=15,
                                   headers={"Accept": "application/json"})
        except requests.RequestException as error:
            log.warning("OIDC token endpoint unreachable: %s", type(error).__name__)
            raise self._failure(502, "the provider could not be reached") from None
        if resp.status_code != 200:
            log.warning("OIDC token endpoint answered %s", resp.status_code)
            raise self._failure(401, "the provider did not accept the sign-in")
        try:
            id_token = resp.json()["id_token"]
        except (ValueError, KeyError, TypeError):
            raise self._failure(502, "the provider sent no ID token") from None
        return self._checked_claims(id_token, metadata["issuer"], pending["nonce"], now)

    def _checked_claims(self, id_token, issuer, nonce, now):
        try:
            header_b64, payload_b64, _signature = id_token.split(".")
            header = json.loads(_b64url_decode(header_b64))
            claims = json.loads(_b64url_decode(payload_b64))
        except (ValueError, AttributeError, RecursionError):
            raise self._failure(401, "the ID token is malformed") from None
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        client_id = self.config.oidc_client_id
        problems = [
            (header.get("alg") in (None, "none"), "the ID token is unsigned"),
            (claims.get("iss") != issuer, "the ID token is from another issuer"),
            (client_id not in audiences, "the ID token is for another client"),
            (len(audiences) > 1 and claims.get("azp") != client_id,
             "the ID token was issued to another party"),
            (not secrets_match(str(claims.get("nonce", "")), nonce),
             "the ID token's nonce does not match"),
            (not isinstance(claims.get("exp"), (int, float))
             or claims["exp"] + OIDC_CLOCK_SKEW_SECONDS < now, "the ID token has expired"),
            (isinstance(claims.get("iat"), (int, float))
             and claims["iat"] - OIDC_CLOCK_SKEW_SECONDS > now, "the ID token is from the future"),
        ]
        for failed, problem in problems:
            if failed:
                raise self._failure(401, problem)
        return claims

    def _get_json(self, url):
        try:
            resp = self._http.get(url, timeout=15)
            resp.raise_for_status()
            document = resp.json()
        except (requests.RequestException, ValueError) as error:
            log.warning("OIDC discovery at %s failed: %s", url, type(error).__name__)
            raise self._failure(502, "the provider's discovery document could not be read") \
                from None
        if not isinstance(document, dict):
            raise self._failure(502, "the provider's discovery document is not an object")
        return document

    @staticmethod
    def _failure(status, problem):
        return LlimitError(status, "sign_in_failed", f"Sign-in failed: {problem}.")


def _b64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _origin(url):
    return "/".join(url.split("/", 3)[:3])


def user_from_claims(claims, allowed_domains, domains):
    """The user name of verified ID token claims; 403 outside the allowed e-mail domains."""
    email = claims.get("email")
    if "email" not in claims:
        # compat: Entra ID often sends the e-mail only as preferred_username (or upn),
        # names its tenant issues and vouches for, without email_verified.
        email = next((claims[name] for name in ("preferred_username", "upn")
                      if isinstance(claims.get(name), str) and "@" in claims[name]), None)
    elif claims.get("email_verified") is not True:  # exactly JSON true: not "true", not absent
        email = None
    if not isinstance(email, str) or "@" not in email:
        raise LlimitError(403, "sign_in_failed",
                          "Sign-in failed: the provider sent no verified e-mail address.")
    domain = email.rsplit("@", 1)[1].lower()
    if allowed_domains and domain not in {d.lower().lstrip("@") for d in allowed_domains}:
        raise LlimitError(403, "sign_in_failed",
                          f"Accounts of {domain} may not sign in to this llimit.")
    user_name = canonical_user_name(email, domains)
    if not user_name:
        raise LlimitError(403, "sign_in_failed", "Sign-in failed: the e-mail has no user part.")
    return user_name


# =============================================================================
# 8. Proxy handlers
#    /v1/... and /openai/deployments/...: auth (7) -> limits (4) -> upstream
#    (5) -> metering (3), for whole answers and for streams.
# =============================================================================

def read_body(environ, max_bytes):
    """The request body; 413 above `max_bytes`."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise LlimitError(400, "invalid_request_error", "Bad Content-Length.") from None
    if length > max_bytes:
        raise LlimitError(413, "invalid_request_error",
                          f"The request body is {length} bytes; the limit is {max_bytes}.",
                          code="request_too_large")
    return environ["wsgi.input"].read(length) if length else b""


def parse_json_body(body, environ):
    """The JSON object a POST carries, {} when there is none; 400 when it is broken."""
    if not body:
        return {}
    # Whatever the Content-Type says (text/plain, Application/JSON), a body that
    # reads as JSON is JSON to the upstream; multipart uploads pass through unread.
    if "json" not in environ.get("CONTENT_TYPE", "").lower() \
            and body.lstrip()[:1] not in (b"{", b"["):
        return {}
    try:
        payload = json.loads(body)
    except RecursionError:
        raise LlimitError(400, "invalid_request_error", "The request body is nested too deep.",
                          code="invalid_json") from None
    except ValueError as error:
        raise LlimitError(400, "invalid_request_error",
                          f"The request body is not valid JSON: {error}.",
                          code="invalid_json") from None
    return payload if isinstance(payload, dict) else {}


@dataclasses.dataclass
class Call:
    """One proxied call while it is under way."""
    request_id: str
    started: float                  # perf_counter at arrival
    endpoint: str
    key: object                     # the key row
    project_id: str
    user_name: str | None
    key_id: str
    limit_message: str | None
    model: str | None               # as asked for (an Azure deployment name, say)
    worst: WorstCase                # what it may cost; reserved against the limits
    admission: Admission | None = None
    upstream_ms: float = 0.0
    method: str = ""
    path: str = ""                  # as the client sent it, percent-encoded
    route: object = None            # the RouteMatch the call falls under
    owner: str = ""                 # whose objects the caller may see (owner_of)
    owned_row: object = None        # the owned_objects row of the object the path names
    plan_id: str | None = None      # the plan whose limits apply to its user (call_plan)


# --- route policy ---------------------------------------------------------------
# Every upstream route has a class, decided by method and path (what follows
# /v1/, /openai/, /openai/v1/ or a deployment), never by what an answer holds:
#   generate    forwarded, metered from the parsed answer, counted against limits
#   lookup      forwarded, never charged, only for objects the caller owns
#   async       a job billed later: only with the project's allow_async; charged
#               once, when an answer shows its final usage
#   credential  mints a credential usable without llimit: refused
# Anything not listed is refused. Actions: "create" records the answer's id as
# the caller's object, "own" lets only its owner name the object in the path,
# "list" filters a list answer down to the caller's own objects.

ROUTE_TABLE = (
    # (method, path template, class, action, object kind)
    ("POST", "chat/completions", "generate", "create", "chat_completion"),  # with store: true
    ("POST", "completions", "generate", None, None),
    ("POST", "responses", "generate", "create", "response"),  # background: true is async
    ("POST", "embeddings", "generate", None, None),
    ("POST", "moderations", "generate", None, None),
    ("POST", "images/generations", "generate", None, None),
    ("POST", "images/edits", "generate", None, None),
    ("POST", "images/variations", "generate", None, None),
    ("POST", "audio/speech", "generate", None, None),
    ("POST", "audio/transcriptions", "generate", None, None),
    ("POST", "audio/translations", "generate", None, None),
    ("POST", "messages", "generate", None, None),
    ("GET", "models", "lookup", None, None),
    ("GET", "models/{id}", "lookup", None, None),
    ("POST", "messages/count_tokens", "lookup", None, None),
    ("POST", "responses/input_tokens", "lookup", None, None),
    ("GET", "responses/{id}", "lookup", "own", "response"),
    ("DELETE", "responses/{id}", "lookup", "own", "response"),
    ("POST", "responses/{id}/cancel", "lookup", "own", "response"),
    ("GET", "responses/{id}/input_items", "lookup", "own", "response"),
    ("GET", "chat/completions", "lookup", "list", "chat_completion"),
    ("GET", "chat/completions/{id}", "lookup", "own", "chat_completion"),
    ("POST", "chat/completions/{id}", "lookup", "own", "chat_completion"),
    ("DELETE", "chat/completions/{id}", "lookup", "own", "chat_completion"),
    ("GET", "chat/completions/{id}/messages", "lookup", "own", "chat_completion"),
    ("GET", "files", "lookup", "list", "file"),
    ("POST", "files", "lookup", "create", "file"),
    ("GET", "files/{id}", "lookup", "own", "file"),
    ("DELETE", "files/{id}", "lookup", "own", "file"),
    ("GET", "files/{id}/content", "lookup", "own", "file"),
    ("GET", "vector_stores", "lookup", "list", "vector_store"),
    ("POST", "vector_stores", "lookup", "create", "vector_store"),
    ("GET", "vector_stores/{id}", "lookup", "own", "vector_store"),
    ("POST", "vector_stores/{id}", "lookup", "own", "vector_store"),
    ("DELETE", "vector_stores/{id}", "lookup", "own", "vector_store"),
    ("GET", "vector_stores/{id}/files", "lookup", "own", "vector_store"),
    ("POST", "vector_stores/{id}/files", "lookup", "own", "vector_store"),
    ("GET", "vector_stores/{id}/files/{file}", "lookup", "own", "vector_store"),
    ("DELETE", "vector_stores/{id}/files/{file}", "lookup", "own", "vector_store"),
    ("GET", "vector_stores/{id}/files/{file}/content", "lookup", "own", "vector_store"),
    ("GET", "batches", "lookup", "list", "batch"),
    ("GET", "batches/{id}", "lookup", "own", "batch"),
    ("POST", "batches/{id}/cancel", "lookup", "own", "batch"),
    ("GET", "messages/batches", "lookup", "list", "message_batch"),
    ("GET", "messages/batches/{id}", "lookup", "own", "message_batch"),
    ("GET", "messages/batches/{id}/results", "lookup", "own", "message_batch"),
    ("POST", "messages/batches/{id}/cancel", "lookup", "own", "message_batch"),
    ("DELETE", "messages/batches/{id}", "lookup", "own", "message_batch"),
    ("GET", "fine_tuning/jobs", "lookup", "list", "fine_tuning_job"),
    ("GET", "fine_tuning/jobs/{id}", "lookup", "own", "fine_tuning_job"),
    ("GET", "fine_tuning/jobs/{id}/events", "lookup", "own", "fine_tuning_job"),
    ("GET", "fine_tuning/jobs/{id}/checkpoints", "lookup", "own", "fine_tuning_job"),
    ("POST", "fine_tuning/jobs/{id}/cancel", "lookup", "own", "fine_tuning_job"),
    ("POST", "batches", "async", "create", "batch"),
    ("POST", "messages/batches", "async", "create", "message_batch"),
    ("POST", "fine_tuning/jobs", "async", "create", "fine_tuning_job"),
    ("POST", "realtime/client_secrets", "credential", None, None),
    ("POST", "realtime/sessions", "credential", None, None),
    ("POST", "realtime/transcription_sessions", "credential", None, None),
)
# Gemini's routes (what follows /v1/ or /v1beta/ for a project of kind gemini),
# as the google-genai SDK sends them; the model is named in the path. Batches,
# cached contents, files, tuned models and long-running jobs are refused.
GEMINI_ROUTE_TABLE = (
    ("POST", "models/{model}:generateContent", "generate", None, None),
    ("POST", "models/{model}:streamGenerateContent", "generate", None, None),
    ("POST", "models/{model}:embedContent", "generate", None, None),
    ("POST", "models/{model}:batchEmbedContents", "generate", None, None),
    ("POST", "models/{model}:countTokens", "lookup", None, None),
    ("GET", "models", "lookup", None, None),
    ("GET", "models/{model}", "lookup", None, None),
)
# Final states whose answer carries an async object's final usage.
BATCH_FINAL_STATUSES = ("completed", "failed", "expired", "cancelled")
RESPONSE_FINAL_STATUSES = ("completed", "failed", "incomplete", "cancelled")


@dataclasses.dataclass(frozen=True)
class RouteMatch:
    """The class of one call's route, and the object its path names."""
    name: str                       # "GET batches/{id}", or the path for a refused route
    cls: str                        # generate | lookup | async | credential | refused
    action: str | None = None       # create | own | list
    kind: str | None = None         # the object kind (owned_objects.kind)
    object_id: str | None = None
    model: str | None = None        # the model a Gemini path names


def _route_tables(table, name_chars):
    static, dynamic = {}, []
    for method, template, cls, action, kind in table:
        route = RouteMatch(f"{method} {template}", cls, action, kind)
        if "{" not in template:
            static[(method, template)] = route
            continue
        pattern = re.sub(r"\\\{(\w+)\\\}", lambda m: rf"(?P<{m[1]}>{name_chars})",
                         re.escape(template))
        dynamic.append((method, re.compile(pattern), route))
    return static, dynamic


# A Gemini model name ends at the ":" of its method; OpenAI's may hold colons (ft:...).
ROUTE_TABLES = {"openai": _route_tables(ROUTE_TABLE, "[^/]+"),
                "gemini": _route_tables(GEMINI_ROUTE_TABLE, "[^/:]+")}


def match_route(method, path, payload, kind="openai", version="v1"):
    """The RouteMatch of a call: one dict look-up for the generation routes.

    A project of kind gemini has Gemini's routes, under /v1/ or /v1beta/;
    every other kind has the OpenAI and Anthropic ones, under /v1/ only.
    """
    gemini = kind == "gemini"
    if (version in GEMINI_VERSIONS) if gemini else version != "v1beta":
        static, dynamic = ROUTE_TABLES["gemini" if gemini else "openai"]
    else:
        return RouteMatch(f"{method} {path}", "refused")
    route = static.get((method, path))
    if route is None:
        for route_method, pattern, candidate in dynamic:
            match = route_method == method and pattern.fullmatch(path)
            if match:
                found = match.groupdict()
                route = dataclasses.replace(candidate, object_id=found.get("id"),
                                            model=found.get("model"))
                break
        else:
            return RouteMatch(f"{method} {path}", "refused")
    if route.kind == "response" and route.action == "create":
        if payload.get("background") is True:
            return dataclasses.replace(route, cls="async")
        if payload.get("store") is False:
            return dataclasses.replace(route, action=None)
    if route.kind == "chat_completion" and route.action == "create" \
            and payload.get("store") is not True:
        return dataclasses.replace(route, action=None)
    return route


def owner_of(key):
    """Whose objects a key's calls make and see: its user's, or the key's own."""
    return "u:" + key["user_name"] if key["user_name"] else "k:" + key["id"]


def _refuse_route(route, key, environ, payload):
    name = f"{environ['REQUEST_METHOD']} {logged_path(environ)}"
    if route.cls == "refused":
        reason = ("llimit forwards only routes whose cost it can meter (README, Metering), and"
                  " this is not one of them; no setting enables it")
    elif route.cls == "credential":
        reason = ("it mints a credential that is used without llimit, so its spend could not"
                  " be metered; no setting enables it")
    elif route.kind == "fine_tuning_job" and route.cls == "async":
        reason = ("llimit has no training price to charge a fine-tuning job with, so it is"
                  " refused even where a project allows async jobs")
    elif route.cls == "async" and not key["allow_async"]:
        reason = ("it starts a job that is billed later (a batch or a background response);"
                  " an admin can allow such jobs for this key's project with"
                  " allow_async: true")
    elif route.cls == "async" and payload.get("stream") is True:
        reason = "a background response cannot be streamed through llimit; poll it instead"
    elif route.name == "GET responses/{id}" and "stream=true" in \
            environ.get("QUERY_STRING", "").lower():
        reason = "resuming a background response's stream is not metered; poll it instead"
    else:
        return
    raise LlimitError(403, "permission_denied", f"{name} is not allowed through llimit: "
                      f"{reason}.", code="route_not_allowed")


# A body that names a file or vector store anywhere (a message's file part, a
# file_search tool...) has them all checked; others are not walked.
NESTED_OBJECT_MARKERS = re.compile(rb'"(?:file_id|file_ids|vector_store_ids)"')
MAX_REFERENCED_OBJECTS = 256  # each is one look-up before the call goes upstream


def _referenced_ids(payload, body):
    """Ids a request body points the upstream at, anywhere in it: they must be the caller's."""
    ids = [payload.get(field) for field in ("previous_response_id", "input_file_id")]
    if body_names(NESTED_OBJECT_MARKERS, payload, body):
        ids += _nested_object_ids(payload)
    ids = list(dict.fromkeys(object_id for object_id in ids
                             if isinstance(object_id, str) and object_id))
    if len(ids) > MAX_REFERENCED_OBJECTS:
        raise LlimitError(400, "invalid_request_error",
                          f"The request names more than {MAX_REFERENCED_OBJECTS} files or"
                          " vector stores.", code="too_many_objects")
    return ids


def _nested_object_ids(payload):
    # Iterative, so no nesting depth makes it recurse too far.
    found, pending = [], [payload]
    while pending:
        value = pending.pop()
        children = value.items() if isinstance(value, dict) else enumerate(value)
        for name, child in children:
            if name == "file_id":
                found.append(child)
            elif name in ("file_ids", "vector_store_ids") and isinstance(child, list):
                found += child
            elif isinstance(child, (dict, list)):
                pending.append(child)
    return found


def _check_ownership(db, route, project_id, owner, method, payload, body):
    """The owned row of the object the path names; 404 for anybody else's object.

    Only object routes (and bodies that name an object) read the database:
    one primary-key look-up each.
    """
    row = None
    if route.action == "own":
        row = get_owned_object(db, route.object_id)
        _must_own(row, route.object_id, project_id, owner)
        if method == "DELETE" and row["async"] and row["charged_ms"] is None:
            raise LlimitError(409, "invalid_request_error",
                              f"{route.object_id} has not been charged yet; fetch it once it"
                              " has finished (or cancel it), then delete it.",
                              code="object_not_settled")
    for object_id in _referenced_ids(payload, body):
        referenced = get_owned_object(db, object_id)
        _must_own(referenced, object_id, project_id, owner)
        if referenced["async"] and referenced["charged_ms"] is None:
            raise LlimitError(409, "invalid_request_error",
                              f"{object_id} has not been charged yet; fetch it once it has"
                              " finished, then use it.", code="object_not_settled")
    return row


def _must_own(row, object_id, project_id, owner):
    if row is None or row["owner"] != owner or row["project_id"] != project_id:
        raise LlimitError(404, "invalid_request_error", f"No such object: {object_id}.",
                          code="not_found")


def proxy_v1(state, path):
    """/v1/<path>: OpenAI-style (and Anthropic /v1/messages, Gemini /v1/models/...) calls."""
    return _proxy(state, path, version="v1")


def proxy_v1beta(state, path):
    """/v1beta/<path>: Gemini calls under Google's beta version prefix."""
    return _proxy(state, path, version="v1beta")


def proxy_azure(state, deployment, path):
    """/openai/deployments/<deployment>/<path>: Azure OpenAI-style calls."""
    return _proxy(state, path, deployment=deployment)


def proxy_azure_v1(state, path):
    """/openai/v1/<path>: Azure's GA v1 routes (AzureOpenAI with a .../openai/v1/ base URL)."""
    return _proxy(state, path, azure_v1=True)


def proxy_azure_plain(state, path):
    """/openai/<path>: Azure routes outside a deployment (/openai/responses, files, batches)."""
    return _proxy(state, path)


CONFIG_MOVED_ATTEMPTS = 5  # admissions tried while keys and limits keep changing under a call


def _proxy(state, path, deployment=None, azure_v1=False, version=None):
    started = time.perf_counter()
    config = state.config
    environ = bottle.request.environ
    db = state.database()
    key = payload = None
    try:
        if environ.get("HTTP_UPGRADE", "").lower() == "websocket":
            raise LlimitError(501, "not_implemented",
                              "WebSocket upgrades (such as the Realtime API) are not supported:"
                              " llimit could not meter them.", code="websocket_not_supported")
        key = authenticate_call(state, environ, state.versions_checked_by_admission)
        environ["llimit.dialect"] = key["upstream_kind"] or "openai"  # errors speak it
        received = read_body(environ, config.max_body_bytes)
        for attempt in range(CONFIG_MOVED_ATTEMPTS):
            try:
                payload = parse_json_body(received, environ)
                call, upstream, url, body, rewritten, hide_usage_chunk = _admit_call(
                    state, db, environ, key, received, payload, path, deployment, azure_v1,
                    version, started)
                break
            except ConfigMoved as moved:
                # Keys, projects or limits changed since the key was read (on any
                # instance): read them again and decide afresh.
                if attempt == CONFIG_MOVED_ATTEMPTS - 1:
                    raise LlimitError(503, "service_unavailable", "Keys and limits are being"
                                      " changed right now; try again shortly.") from None
                state.keys.advance(moved.version)
                key = authenticate_call(state, environ, state.versions_checked_by_admission)
                environ["llimit.dialect"] = key["upstream_kind"] or "openai"
    except DatabaseUnavailable:
        # Fail closed: with no ledger, no call can be checked against its limits.
        log.exception("proxy: the database does not answer")
        error = _ledger_unavailable()
        _log_refused(environ, error.status, started, key, environ.get("llimit.model"))
        raise error from None
    except LlimitError as error:
        key = key or getattr(error, "key_row", None)
        _log_refused(environ, error.status, started, key, environ.get("llimit.model"))
        if key is not None and error.status in REFUSALS_COUNTED:
            _count_refusal(state, key, environ, payload, error.code)
        raise
        raise
    sent = time.perf_counter()
    try:
        headers = upstream_headers(environ, upstream)
        if rewritten:
            headers["content-type"] = "application/json"  # what we send is JSON we wrote
        resp = send_upstream(state.pool, environ["REQUEST_METHOD"], url, headers, body)
        del body, payload  # a large body is not held while the answer is relayed
    except BaseException as error:
        # Metered even so: one event per call, and it releases the reservation.
        call.upstream_ms = (time.perf_counter() - sent) * 1000
        status = error.status if isinstance(error, LlimitError) else 500
        # Nothing was served when the upstream could not be reached; a timeout may have cost.
        _meter(state, call, status, None, None, "free" if status == 502 else "unpriced",
               stream=False, wait=False)
        raise
    call.upstream_ms = (time.perf_counter() - sent) * 1000
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        return _relay_stream(state, call, resp, upstream.kind, hide_usage_chunk)
    return _relay_whole(state, call, resp, upstream)


def _admit_call(state, db, environ, key, received, payload, path, deployment, azure_v1,
                version, started):
    # Everything decided about a call before it goes upstream, from its key
    # row and body: (call, upstream, url, body to send, rewritten?, hide the
    # usage chunk?). Raises LlimitError, or ConfigMoved (PostgreSQL) when the
    # key row is older than the database's config.
    try:
        decided = _decide_call(state, db, environ, key, received, payload, path, deployment,
                               azure_v1, version, started)
    except LlimitError:
        # On PostgreSQL the key row may be the cache's, unchecked (admission checks
        # it): a refusal made before admission is checked first, so that a stale row
        # neither refuses what a change allows nor names the wrong reason (a revoked
        # key refused for its model).
        if state.versions_checked_by_admission:
            current = config_version(db)
            if current != key["config_version"]:
                raise ConfigMoved(current) from None
        raise
    call = decided[0]
    if not state.writer.healthy:
        # Usage cannot be written (the database is locked, full or gone): an answer
        # would be withheld after the upstream was paid for it, so the call is
        # refused before it goes there, whatever its limits.
        raise _ledger_unavailable()
    # A look-up is never charged nor refused by limits; it is admitted with
    # none, which on PostgreSQL still checks the config version.
    limits = [] if call.route.cls == "lookup" else state.limits.for_call(
        db, key["config_version"], call.project_id, call.user_name, call.key_id, call.plan_id)
    state.slots.take(call.key_id, call.user_name)  # given back when the call is metered
    try:
        call.admission = state.limits.admit(db, call, limits)
    except BaseException:
        state.slots.give_back(call.key_id, call.user_name)
        raise
    return decided


def _decide_call(state, db, environ, key, received, payload, path, deployment, azure_v1,
                 version, started):
    # _admit_call's checks of the key row and body, up to admission by the limits.
    config = state.config
    body, kind = received, environ["llimit.dialect"]
    route = match_route(environ["REQUEST_METHOD"], path, payload, kind, version)
    _refuse_route(route, key, environ, payload)
    upstream = resolve_upstream(key, config)
    requested_model = _check_models(key, payload, deployment, kind, route)
    if requested_model is None:  # a multipart upload (audio) names it in a form field
        requested_model = multipart_field(body, environ.get("CONTENT_TYPE", ""), "model")
    environ["llimit.model"] = requested_model  # for the log line of a refusal
    owner = owner_of(key)
    owned_row = _check_ownership(db, route, key["project_id"], owner,
                                 environ["REQUEST_METHOD"], payload, body)
    sent_body, hide_usage_chunk = _rewrite_body(payload, body, path, deployment, upstream.kind)
    rewritten, body = sent_body is not body, sent_body
    # The URL first: a path it refuses must not leave a reservation behind.
    url = upstream_url(upstream, path, environ.get("QUERY_STRING", ""), deployment,
                       requested_model, azure_v1, version)
    call = _new_call(state, key, environ, payload, body, path, requested_model, started)
    call.route, call.owner, call.owned_row = route, owner, owned_row
    if config.upstream_user and route.cls == "generate":
        body, named = _with_upstream_user(state, call, payload, body, path, kind)
        rewritten = rewritten or named
    if route.cls == "lookup" or route.kind == "batch":
        # A look-up costs nothing. An OpenAI batch names its models in its input
        # file, which llimit does not read: it is charged at settlement (README).
        call.worst.priced = True
    elif route.kind == "message_batch":  # charged when done, at each request's model's price
        unpriced = [model for model in _message_batch_models(payload)
                    if not state.pricebook.entry(_mapped_model(key, model))]
        call.worst.priced = not unpriced
        call.model = call.model or (unpriced[0] if unpriced else None)  # named if refused
    return call, upstream, url, body, rewritten, hide_usage_chunk


def _message_batch_models(payload):
    requests = payload.get("requests") if isinstance(payload.get("requests"), list) else []
    params = [request.get("params") for request in requests if isinstance(request, dict)]
    return [_text(each.get("model")) if isinstance(each, dict) else None for each in params] \
        or [None]


def _rewrite_body(payload, body, path, deployment, kind):
    """(body to send, hide the usage chunk?): the client's own bytes unless we must change them."""
    if deployment is not None and kind == "anthropic":
        raise LlimitError(400, "invalid_request_error",
                          "This key's project speaks Anthropic; use /v1/messages.")
    changed = False
    if deployment is not None and kind == "openai" and payload and not payload.get("model"):
        payload["model"] = deployment  # compat: Azure clients name the model in the URL
        changed = True
    hide_usage_chunk = False
    # Anthropic's OpenAI-compatible chat/completions honours stream_options too.
    streams_usage = path == "chat/completions" or (path == "completions" and kind != "anthropic")
    if payload.get("stream") is True and streams_usage:
        # OpenAI sends usage in a stream only when include_usage is set.
        options = payload.get("stream_options")
        options = options if isinstance(options, dict) else {}
        if options.get("include_usage") is not True:
            if not changed and "stream_options" not in payload and body.rstrip().endswith(b"}"):
                # Spliced onto the client's bytes: re-serialising a 32 MB body would
                # hold two more copies of it (text and bytes) at once.
                end = len(body.rstrip()) - 1
                return b"".join((memoryview(body)[:end],
                                 b', "stream_options": {"include_usage": true}}')), True
            payload["stream_options"] = {**options, "include_usage": True}
            changed = hide_usage_chunk = True
    return (json.dumps(payload).encode() if changed else body), hide_usage_chunk


def _with_upstream_user(state, call, payload, body, path, kind):
    """(body, changed): the call's user named to the provider, where it wants one.

    OpenAI reads `safety_identifier` (and the older `user`), Anthropic
    `metadata.user_id`. Whatever the client put there is replaced: a key
    holder must not act upstream under another user's name.
    """
    name = call.user_name or "key:" + call.key_id
    if state.config.upstream_user == "hash":
        name = hmac.new(state.upstream_user_secret.encode(), name.encode(),
                        hashlib.sha256).hexdigest()
    if kind == "openai" and path in ("chat/completions", "responses") and payload:
        payload["safety_identifier"] = name[:64]  # OpenAI's limit
        if "user" in payload:
            payload["user"] = name[:64]
    elif kind == "anthropic" and path == "messages" and payload:
        metadata = payload.get("metadata")
        payload["metadata"] = {**(metadata if isinstance(metadata, dict) else {}),
                               "user_id": name[:256]}
    else:
        return body, False
    return json.dumps(payload).encode(), True


def _text(value):
    return value if isinstance(value, str) and value else None


def _check_models(key, payload, deployment, kind, route):
    """The model the upstream will use; 403 unless the key may use every model named.

    A deployment in the URL and a model in the body may differ: an Azure
    upstream acts on the deployment, any other on the body's model, so both
    are checked against the key's allow-list. Gemini names the model in the
    path (and batchEmbedContents again in each request).
    """
    if kind == "gemini":
        named = {route.model} | {_text(request.get("model")) for request in
                                 payload.get("requests") or () if isinstance(request, dict)}
        for model in named - {None} or {None}:
            model = _client_model(model)
            _check_model_allowed(key, model.removeprefix("models/") if model else None)
        return route.model
    body_model = _client_model(_text(payload.get("model")))
    deployment = _client_model(deployment)
    for model in {deployment, body_model} - {None} or {None}:
        _check_model_allowed(key, model)
    if kind == "azure":
        return deployment or body_model
    return body_model or deployment


def _client_model(model):
    # A model name is stored, logged and a metric label: bounded before any of that.
    if model is not None and len(model) > MAX_MODEL_NAME:
        raise LlimitError(400, "invalid_request_error",
                          f"The model name is longer than {MAX_MODEL_NAME} characters.",
                          code="model_name_too_long")
    return model


def _check_model_allowed(key, model):
    if not key["models"]:
        return
    allowed = json.loads(key["models"])
    if model and (model in allowed or DATE_SUFFIX.sub("", model) in allowed):
        return
    raise LlimitError(403, "permission_denied",
                      f"This key may use only: {', '.join(allowed)}"
                      + (f" (asked for {model})." if model else "."),
                      code="model_not_allowed")


def _new_call(state, key, environ, payload, body, path, model, started):
    user_name = key["user_name"] or end_user(environ, payload, state.config.user_headers,
                                             state.user_domains)
    config = state.config
    bounds = payload
    if isinstance(payload.get("generationConfig"), dict):  # compat: Gemini's names
        options = payload["generationConfig"]
        bounds = {**payload, "max_tokens": options.get("maxOutputTokens"),
                  "n": options.get("candidateCount")}
    worst = worst_case(state.pricebook, _mapped_model(key, model), bounds, body,
                       config.default_max_tokens, config.default_max_input_tokens, path)
    return Call(request_id=os.urandom(6).hex(), started=started, endpoint=path[:100],
                key=key, project_id=key["project_id"], user_name=user_name, key_id=key["id"],
                limit_message=key["limit_message"], model=model, worst=worst,
                method=environ["REQUEST_METHOD"], path=logged_path(environ),
                plan_id=call_plan(state, state.database(), key, environ, user_name))


def logged_path(environ):
    """The request's path for the log, percent-encoded as the client sent it, bounded."""
    return encoded_path(environ.get("PATH_INFO", ""))[:300]


def _pricing_model(call, reported_model):
    # Azure may report no model; the admin's deployment map, then the name asked for.
    if reported_model:
        return reported_model[:MAX_MODEL_NAME]
    return _mapped_model(call.key, call.model)


def _mapped_model(key, model):
    # An Azure deployment name is priced (and reserved) as the model the project maps it to.
    model_map = json.loads(key["model_map"]) if key["model_map"] else {}
    return model_map.get(model) or model


# One line per call; JSON lines take the fields from the record's `call_fields`.
CALL_LOG_FIELDS = ("request_id", "method", "path", "key_id", "user", "project", "model",
                   "status", "prompt_tokens", "completion_tokens", "cost_usd", "pricing",
                   "latency_ms", "overhead_ms", "stream")
CALL_LOG_FORMAT = "call " + " ".join(f"{name}=%s" for name in CALL_LOG_FIELDS)
LOGFMT_BARE = re.compile(r'[^\s"=\\\x00-\x1f\x7f]+')


def _logfmt(value):
    # logfmt: bare when it is safe, else JSON-quoted, so a model or user name
    # can neither split a field nor start a line of its own.
    if value is None:
        return "-"
    text = str(value)
    return text if LOGFMT_BARE.fullmatch(text) else json.dumps(text)


def _log_call(*fields):
    log.info(CALL_LOG_FORMAT, *map(_logfmt, fields),
             extra={"call_fields": dict(zip(CALL_LOG_FIELDS, fields))})


def _log_refused(environ, status_code, started, key=None, model=None):
    # A call refused before it went upstream (wrong key, bad input, a limit)
    # has no usage row, but its log line, so the log shows every call.
    elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
    _log_call(None, environ["REQUEST_METHOD"], logged_path(environ), key and key["id"],
              key and key["user_name"], key and key["project_id"], model, status_code, 0, 0,
              None, "refused", elapsed_ms, elapsed_ms, None)


# Refusals of a known key that reports count (limits, routes, models, the key
# itself); malformed calls (400, 413) are the client's bug, not a user's limit.
REFUSALS_COUNTED = (403, 429)


def _count_refusal(state, key, environ, payload, reason):
    # Queued to the usage writer, which counts it in its next transaction:
    # no database round trip on the request path.
    user_name = key["user_name"] or end_user(environ, payload, state.config.user_headers,
                                             state.user_domains)
    state.writer.submit(Refusal(int(state.config.clock() * 1000), key["project_id"],
                                user_name, reason))


def _meter(state, call, status_code, model, usage, pricing_status, stream, wait=True,
           overhead_ms=None, owned=()):
    """Record one call's usage event and free its CallSlots slot; with `wait`, until it
    is committed: False when LLIMIT_COMMIT_WAIT_SECONDS passed first.

    Only a generation is charged; a look-up, an async job's creation (charged
    when it ends) and an upstream's refusal cost nothing and are stored as
    'free'. Look-ups count toward no limit.
    """
    generate = call.route is None or call.route.cls == "generate"
    if not generate or (status_code >= 400 and usage is None and pricing_status != "estimated"):
        pricing_status, usage = "free", None
    elapsed_ms = (time.perf_counter() - call.started) * 1000
    if overhead_ms is None:
        overhead_ms = max(elapsed_ms - call.upstream_ms, 0.0)
    event = UsageEvent(
        created_ms=int(state.config.clock() * 1000), key_id=call.key_id,
        user_name=call.user_name, project_id=call.project_id,
        model=_pricing_model(call, model), endpoint=call.endpoint, status_code=status_code,
        stream=stream, latency_ms=elapsed_ms, overhead_ms=overhead_ms,
        subjects=(call_subjects(call.project_id, call.user_name, call.key_id)
                  if call.route is None or call.route.cls != "lookup" else ()),
        reservation=call.admission, owned=owned)
    usd_bound = call.admission is not None and call.admission.usd_bound
    if 200 <= status_code < 300:
        usage = with_request_usage(usage, call.worst.asked)
        if usage is not None and pricing_status == "unpriced":
            pricing_status = "priced"  # billed by what the request asked for, exactly
    price_event(event, usage, state.pricebook, pricing_status,
                worst=call.worst if usd_bound and 200 <= status_code < 300 else None)
    state.writer.submit(event)
    state.metrics.observe_call(event, call.upstream_ms)
    _log_call(call.request_id, call.method, call.path, call.key_id, call.user_name,
              call.project_id, event.model, status_code, event.prompt_tokens,
              event.completion_tokens, nusd_to_usd(event.cost_nusd), event.pricing,
              round(elapsed_ms, 1), round(overhead_ms, 2), stream)
    try:
        if wait and not event.done.wait(state.config.commit_wait_seconds):
            log.error("usage of request_id=%s not yet committed after %ss; it stays queued,"
                      " and the client gets 503 instead of the answer", call.request_id,
                      state.config.commit_wait_seconds)
            return False
        return True
    finally:
        state.slots.give_back(call.key_id, call.user_name)


LEDGER_UNAVAILABLE = ("The usage ledger could not record this call in time, so its answer is"
                      " withheld (the usage is still counted). Try again shortly.")


def _relay_whole(state, call, resp, upstream):
    before_body = time.perf_counter()
    try:
        content = read_upstream_body(resp)
    except LlimitError as error:
        call.upstream_ms += (time.perf_counter() - before_body) * 1000
        _meter(state, call, error.status, None, None, "unpriced", stream=False, wait=False)
        raise
    call.upstream_ms += (time.perf_counter() - before_body) * 1000
    route = call.route
    if route.cls != "lookup" and route.action != "list":
        answer = response_fields(content)  # what metering needs, cheap on large answers
    else:
        answer = parse_response_json(content) if route.action is not None else None
    model, usage = usage_from_body(answer)
    object_id = answer.get("id") if isinstance(answer, dict) else None
    owned = list(_created_objects(call, resp.status, object_id))
    if resp.status == 200 and route.action is not None:
        if route.action == "list" and isinstance(answer, dict) \
                and isinstance(answer.get("data"), list):
            content = json.dumps(_own_list(state, call, answer)).encode()
        settlement = _settlement(state, call.owned_row, answer, content,
                                 route.name.endswith("/results"))
        if settlement:
            state.writer.submit(settlement)  # before the call's own event: committed first
        if route.kind == "batch" and isinstance(answer, dict):
            # A finished batch's result files are its owner's to read.
            owned += _created_files(call, answer.get("output_file_id"),
                                    answer.get("error_file_id"))
    if not _meter(state, call, resp.status, model, usage,
                  "priced" if usage is not None else "unpriced", stream=False, owned=owned):
        # No answer without a durable row: a kill now would lose an answered call.
        raise LlimitError(503, "service_unavailable", LEDGER_UNAVAILABLE,
                          code="ledger_unavailable",
                          headers={"X-LLimit-Request-Id": call.request_id})
    upstream_headers_out = client_response_headers(resp, call.admission.headers)
    # compat: Google answers a wrong API key with 400 API_KEY_INVALID.
    if resp.status in (401, 403) or (upstream.kind == "gemini" and resp.status == 400
                                     and b"API_KEY_INVALID" in content):
        content, upstream_headers_out = _upstream_auth_failure(call, resp, content, upstream,
                                                               upstream_headers_out)
    response = bottle.HTTPResponse(body=content, status=resp.status)
    for name, value in upstream_headers_out:
        response.add_header(name, value)
    for name, value in call.admission.headers.items():
        response.set_header(name, value)
    response.set_header("Content-Length", str(len(content)))
    response.set_header("X-LLimit-Request-Id", call.request_id)
    overhead_ms = (time.perf_counter() - call.started) * 1000 - call.upstream_ms
    response.set_header("X-LLimit-Overhead-Ms", f"{max(overhead_ms, 0.0):.2f}")
    return response


def _created_objects(call, status_code, object_id):
    """The owned_objects row for an object this call made, if it made one."""
    route = call.route
    if route.action != "create" or not 200 <= status_code < 300 \
            or not isinstance(object_id, str) or not object_id:
        return ()
    return (_owned_row(call, object_id, route.kind, route.cls == "async"),)


def _created_files(call, *file_ids):
    return [_owned_row(call, file_id, "file", False) for file_id in file_ids
            if isinstance(file_id, str) and file_id]


def _owned_row(call, object_id, kind, is_async):
    return {"object_id": object_id[:200], "kind": kind, "project_id": call.project_id,
            "owner": call.owner, "key_id": call.key_id, "user_name": call.user_name,
            "created_ms": int(time.time() * 1000), "async": int(is_async)}


def _own_list(state, call, answer):
    """A list answer with only the caller's own objects in its `data`."""
    items = [item for item in answer["data"] if isinstance(item, dict)]
    mine = owned_ids(state.database(), call.project_id, call.owner,
                     [item.get("id") for item in items if isinstance(item.get("id"), str)])
    kept = [item for item in items if item.get("id") in mine]
    filtered = {**answer, "data": kept}
    if "first_id" in answer or "last_id" in answer:
        filtered["first_id"] = kept[0]["id"] if kept else None
        filtered["last_id"] = kept[-1]["id"] if kept else None
    return filtered


def _settlement(state, row, answer, content, results=False):
    """The charge events for an async object (its owned_objects `row`) that this
    answer shows finished, once; `results`: the answer is a batch's results.

    Attributed to the project, user and key that created the object; the
    usage writer stores them only if it is the first to mark the object
    charged (owned_objects.charged_ms), so concurrent polls charge once.
    """
    if row is None or not row["async"] or row["charged_ms"] is not None:
        return []
    found = []  # [(model, Usage)]
    endpoint, factor = row["kind"], 1.0
    if row["kind"] == "batch" and isinstance(answer, dict) \
            and answer.get("status") in BATCH_FINAL_STATUSES \
            and isinstance(answer.get("usage"), dict):
        found = [(_text(answer.get("model")), usage_from_openai(answer["usage"]))]
        endpoint, factor = "batches", BATCH_PRICE_FACTOR
    elif row["kind"] == "response" and isinstance(answer, dict) \
            and answer.get("status") in RESPONSE_FINAL_STATUSES \
            and isinstance(answer.get("usage"), dict):
        found = [usage_from_body(answer)]
        endpoint = "responses"
    elif row["kind"] == "message_batch" and results:
        found = message_batch_usage(content)
        endpoint, factor = "messages/batches", BATCH_PRICE_FACTOR
    events = []
    for model, usage in found:
        event = UsageEvent(
            created_ms=int(state.config.clock() * 1000), key_id=row["key_id"],
            user_name=row["user_name"], project_id=row["project_id"], model=model,
            endpoint=endpoint, status_code=200, stream=False,
            subjects=call_subjects(row["project_id"], row["user_name"], row["key_id"]),
            claim=row["object_id"])
        events.append(price_event(event, usage, state.pricebook, "priced", factor))
        log.info("async %s %s finished: charging key %s %s USD (once)", row["kind"],
                 row["object_id"], row["key_id"], nusd_to_usd(event.cost_nusd))
    return events


# Where the sweeper asks about each kind of async object (then, once a message
# batch has ended, its results). Jobs older than this are no longer asked about:
# providers end batches within 24 hours and background responses sooner.
ASYNC_OBJECT_PATHS = {"batch": "batches/{id}", "response": "responses/{id}",
                      "message_batch": "messages/batches/{id}"}
ASYNC_SWEEP_MAX_AGE_SECONDS = 8 * 86400


class AsyncSweeper:
    """Charges async jobs that finish while nobody asks about them.

    A poll through llimit charges a batch or background response once it
    shows its final usage, but the provider bills the job whether anyone
    polls or not. So every LLIMIT_ASYNC_SWEEP_SECONDS this thread asks the
    upstream, with the project's own key, about each job not yet charged,
    and charges it the same way: once, as the claim on owned_objects decides.
    """

    def __init__(self, state):
        self.state = state
        self.interval = state.config.async_sweep_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llimit-async-sweeper",
                                        daemon=True)

    def start(self):
        """Start sweeping (the server only; 0 seconds turns it off)."""
        if self.interval > 0:
            self._thread.start()

    def stop(self):
        """Stop after the current sweep."""
        self._stop.set()

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.sweep()
            except Exception:  # a failed sweep must not end the thread: try next time
                log.exception("async sweep failed")

    def sweep(self):
        """Ask the upstream about every job not yet charged; returns how many were charged."""
        db = self.state.database()
        since_ms = int((self.state.config.clock() - ASYNC_SWEEP_MAX_AGE_SECONDS) * 1000)
        charged = 0
        for row in list_unsettled_async_objects(db, since_ms):
            project = get_project(db, row["project_id"])
            if project is None or row["kind"] not in ASYNC_OBJECT_PATHS:
                continue
            try:
                events = self._settle(row, resolve_upstream(project, self.state.config))
            except LlimitError as error:
                log.warning("async sweep: %s %s not checked: %s", row["kind"],
                            row["object_id"], error.message)
                continue
            if events:
                self.state.writer.submit(events)
                charged += 1
        return charged

    def _settle(self, row, upstream):
        path = ASYNC_OBJECT_PATHS[row["kind"]].format(id=urllib.parse.quote(row["object_id"]))
        answer = parse_response_json(self._get(upstream, path))
        if row["kind"] == "message_batch":
            if not isinstance(answer, dict) or answer.get("processing_status") != "ended":
                return []
            return _settlement(self.state, row, answer, self._get(upstream, path + "/results"),
                               results=True)
        return _settlement(self.state, row, answer, b"")

    def _get(self, upstream, path):
        url = upstream_url(upstream, path, "")
        resp = send_upstream(self.state.pool, "GET", url, upstream_headers({}, upstream), None)
        content = read_upstream_body(resp)
        return content if resp.status == 200 else b""


def _upstream_auth_failure(call, resp, content, upstream, headers):
    # The upstream refused llimit's own credentials: its body may show a masked
    # form of the upstream key, so the client gets llimit's message instead, and
    # the admin the upstream's (less the key itself) in the log.
    text = content.decode("utf-8", "replace")
    if upstream.key:
        text = text.replace(upstream.key, "[upstream key]")
    log.warning("upstream refused llimit's credentials for request_id=%s project=%s: %s %s",
                call.request_id, call.project_id, resp.status, _logfmt(text[:2000]))
    error = LlimitError(resp.status, "upstream_error",
                        f"The upstream refused llimit's credentials for this project"
                        f" ({resp.status}); llimit's admin can see why in its log.",
                        code="upstream_auth_failed")
    body = (error.anthropic_body() if upstream.kind == "anthropic" else
            error.gemini_body() if upstream.kind == "gemini" else error.body())
    headers = [(name, value) for name, value in headers
               if name.lower() != "content-type"] + [("Content-Type", "application/json")]
    return json.dumps(body).encode(), headers


def _relay_stream(state, call, resp, kind, hide_usage_chunk):
    overhead_ms = (time.perf_counter() - call.started) * 1000 - call.upstream_ms
    response = bottle.HTTPResponse(status=resp.status)
    for name, value in client_response_headers(resp, call.admission.headers):
        response.add_header(name, value)
    for name, value in call.admission.headers.items():
        response.set_header(name, value)
    response.set_header("X-LLimit-Request-Id", call.request_id)
    response.set_header("X-LLimit-Overhead-Ms", f"{max(overhead_ms, 0.0):.2f}")
    response.body = _stream_events(state, call, resp, kind, hide_usage_chunk, overhead_ms)
    return response


def _stream_events(state, call, resp, kind, hide_usage_chunk, overhead_ms):
    """Yield the upstream's SSE events as they come; meter the call however it ends.

    The server calls close() on this generator when the client goes, which
    lands in `finally` with the stream unfinished: the upstream call is closed
    at once (or drained, with LLIMIT_DRAIN_SECONDS) and the usage estimated.
    """
    meter = StreamMeter()
    held = []            # the final event, sent once usage is committed
    finished = False     # the upstream ended the stream itself
    broken = False
    relay_ms = 0.0       # llimit's own work on the events
    state.streams.add(resp)
    stream_started = time.perf_counter()
    try:
        try:
            for raw_event in split_sse(upstream_chunks(resp)):
                began = time.perf_counter()
                name, data = sse_fields(raw_event)
                usage_chunk = meter.observe(data)
                if data in FINAL_SSE_DATA or name in FINAL_SSE_EVENTS or meter.final:
                    held.append(raw_event)
                    continue
                relay_ms += (time.perf_counter() - began) * 1000
                if not (usage_chunk and hide_usage_chunk):
                    yield raw_event
            finished = True
        except (urllib3.exceptions.HTTPError, OSError) as error:
            broken = True
            log.warning("upstream stream of request_id=%s broke off: %s", call.request_id,
                        type(error).__name__)
            yield sse_error_event(kind, "The upstream broke off the stream.")
    finally:
        if not finished and not broken and state.config.drain_seconds > 0:
            finished = _drain(resp, meter, state.config.drain_seconds)
        state.streams.discard(resp)
        resp.close()
        call.upstream_ms += (time.perf_counter() - stream_started) * 1000 - relay_ms
        complete = finished and meter.usage is not None
        usage = meter.usage if complete else meter.estimate(call.worst.prompt_tokens,
                                                            call.worst.completion_tokens)
        committed = _meter(state, call, resp.status, meter.model, usage,
                           "priced" if complete else "estimated", stream=True,
                           wait=finished, overhead_ms=overhead_ms + relay_ms,
                           owned=_created_objects(call, resp.status, meter.object_id))
    if not committed:  # the final event only once the call is durable
        yield sse_error_event(kind, LEDGER_UNAVAILABLE, "service_unavailable",
                              "ledger_unavailable")
        return
    yield from held


def _drain(resp, meter, seconds):
    # The client left; keep reading (not relaying) for exact usage, within a bound.
    deadline = time.monotonic() + seconds
    try:
        for raw_event in split_sse(upstream_chunks(resp)):
            meter.observe(sse_fields(raw_event)[1])
            if time.monotonic() > deadline:
                return False
        return True
    except (urllib3.exceptions.HTTPError, OSError):
        return False


# =============================================================================
# 9. Templates
#    The HTML of every page as bottle SimpleTemplate strings: LAYOUT around one
#    *_PAGE per page, and the one small script the pages share (the copy
#    button and the charts). `{{value}}` escapes; `{{!value}}` only for HTML
#    built here. No SQL, no state: section 10 hands each page its data.
# =============================================================================

# Pinned, with Subresource Integrity: the file of the chart.js npm package.
CHARTJS_CDN_URL = "https://cdn.jsdelivr.net/npm/chart.js@4.6.1/dist/chart.umd.min.js"
CHARTJS_CDN_INTEGRITY = "sha384-Emf5ZVIUiarAdhkgtqK+5/Z5qIvM6QoVrS+qAVtfyZVuD5lIHrac0me485+Antp0"
PAGES_SCRIPT_PATH = "/static/llimit.js"
PAGES_CSS_PATH = "/static/llimit.css"
CHARTJS_PATH = "/static/chart.umd.js"
VENDORED_CHARTJS = os.path.join(HERE, "vendor", "chart.umd.js")

PAGES_CSS = """:root{--fg:#1d2330;--muted:#5d6678;--line:#dfe3ea;--bg:#f5f6f8;--card:#fff;--accent:#2a5bd7;
--warn:#c27c0e;--bad:#c53030;--ok:#2f855a}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
background:var(--bg)}
header{background:#1d2330}
header nav{max-width:1120px;margin:0 auto;padding:.55rem 1rem;display:flex;flex-wrap:wrap;
gap:.3rem 1.1rem;align-items:center}
header a{color:#e8ecf4;text-decoration:none}
header a:hover,header a.here{color:#fff;text-decoration:underline}
header .brand{font-weight:700;color:#fff;margin-right:.4rem}
header .who{margin-left:auto;color:#b9c2d3;display:flex;gap:.6rem;align-items:center}
header .who button{background:none;border:1px solid #59627a;color:#e8ecf4;padding:.1rem .6rem}
main{max-width:1120px;margin:0 auto;padding:1rem}
section,.card{background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:.9rem 1rem;margin:0 0 1rem}
a.card{display:block;color:inherit;text-decoration:none}
a.card:hover{border-color:var(--accent)}
h1{font-size:1.45rem;margin:.3rem 0 1rem}
h2{font-size:1.1rem;margin:0 0 .6rem}
h3{font-size:1rem;margin:.8rem 0 .3rem}
a{color:var(--accent)}
table{border-collapse:collapse;width:100%;font-size:.92rem}
th,td{text-align:left;padding:.35rem .5rem;border-bottom:1px solid var(--line);vertical-align:middle}
th{font-size:.82rem;color:var(--muted);font-weight:600}
.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.scroll{overflow-x:auto}
form.inline{display:inline;margin:0}
label{display:block;margin:.2rem 0 .15rem;font-weight:600;font-size:.85rem}
input,select{font:inherit;padding:.32rem .5rem;border:1px solid #b9c0cd;border-radius:6px;
max-width:100%;background:#fff}
input[type=checkbox]{width:auto}
button{font:inherit;padding:.32rem .9rem;border-radius:6px;border:1px solid var(--accent);
background:var(--accent);color:#fff;cursor:pointer}
button.quiet{background:#fff;color:var(--accent)}
button.danger{background:#fff;color:var(--bad);border-color:#e3a5a5;padding:.1rem .6rem}
.muted{color:var(--muted)}
.small{font-size:.85rem}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.86rem}
pre{background:#f1f3f7;padding:.7rem .8rem;border-radius:6px;overflow-x:auto;margin:.3rem 0}
code.secret{background:#fff8e1;border:1px solid #f0d48a;padding:.3rem .5rem;border-radius:6px;
word-break:break-all}
.bar{height:.55rem;background:#e7eaf0;border-radius:4px;overflow:hidden;min-width:6rem}
.bar span{display:block;height:100%;background:var(--ok)}
.bar.warn span{background:var(--warn)}
.bar.full span{background:var(--bad)}
.notice{border-left:4px solid var(--accent)}
.alert{border-left:4px solid var(--bad)}
.grid{display:grid;gap:1rem;grid-template-columns:repeat(auto-fit,minmax(220px,1fr));margin:0 0 1rem}
.grid>*{margin:0}
.stat{font-size:1.5rem;font-weight:700;font-variant-numeric:tabular-nums}
.row{display:flex;flex-wrap:wrap;gap:.5rem .8rem;align-items:flex-end}
.row>div{min-width:0}
.chart{position:relative;height:300px}
.charts{display:grid;gap:1rem;grid-template-columns:repeat(auto-fit,minmax(440px,1fr))}
.charts>section{margin:0}
.tag{display:inline-block;font-size:.78rem;padding:0 .4rem;border-radius:4px;background:#edf0f5}
.tag.bad{background:#fde2e2;color:#8a1c1c}
.tag.ok{background:#def7e8;color:#1f5e3d}
details summary{cursor:pointer;color:var(--accent)}
.chart-note{margin:.4rem 0 0}
.error{color:var(--bad);font-weight:600}
.field-error{border-color:var(--bad)}
@media (max-width:640px){main{padding:.6rem}.charts{grid-template-columns:1fr}
th,td{padding:.3rem .35rem}.chart{height:240px}
/* A table of stack class becomes one card per row: every figure and button in view. */
table.stack,table.stack tbody,table.stack tr,table.stack td{display:block;width:100%}
table.stack tr:first-child{display:none}
table.stack tr{border:1px solid var(--line);border-radius:6px;margin:0 0 .6rem;padding:.2rem .3rem}
table.stack td{display:flex;justify-content:space-between;gap:.8rem;border:0;text-align:right;
padding:.2rem .3rem;overflow-wrap:anywhere}
table.stack td::before{content:attr(data-label);color:var(--muted);font-size:.82rem;
font-weight:600;text-align:left;flex-shrink:0}
table.stack td .bar{flex:1;align-self:center}
pre{white-space:pre-wrap;word-break:break-all}}
"""

LAYOUT = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}} · llimit</title>
<link rel="stylesheet" href="{{css_url}}">
</head>
<body>
<header><nav>
<a class="brand" href="/">llimit</a>
% if session.user_name:
<a href="/keys">Keys</a>
<a href="/usage">Usage</a>
% end
% if session.sees_reports:
<a href="/reports">Reports</a>
% end
% if session.is_admin:
<a href="/admin">Admin</a>
% end
<span class="who">
% if session.signed_in:
<span>{{session.user_name or "admin"}}{{" · admin" if session.is_admin and session.user_name else ""}}</span>
<form class="inline" method="post" action="/logout">
{{!csrf_field}}
<button type="submit">Sign out</button></form>
% else:
<a href="/login">Sign in</a>
% end
</span>
</nav></header>
<main>
{{!body}}
</main>
% for script in scripts:
% if script.get("integrity"):
<script src="{{script['src']}}" integrity="{{script['integrity']}}" crossorigin="anonymous" defer></script>
% else:
<script src="{{script['src']}}" defer></script>
% end
% end
</body>
</html>
"""

HOME_PAGE = """<h1>llimit</h1>
<section>
<p>llimit is the gateway between this organisation and its large language models.
It hands out personal API keys, passes each call on to OpenAI, Azure OpenAI or
Anthropic with the real upstream key, counts the tokens and what they cost, and
keeps everyone within the budgets and limits set here. Prompts and answers pass
through; they are never stored.</p>
<p>Point any OpenAI-compatible client at <code>{{base_url}}/v1</code> with a key from
llimit (Azure clients: <code>{{base_url}}</code>; Anthropic clients: <code>{{base_url}}</code>
as base URL).</p>
% if not session.signed_in:
<p><a href="/login">Sign in</a> to get a key and see your usage.</p>
% elif session.user_name:
<p class="muted">Signed in as <b>{{session.user_name}}</b>{{" (admin)" if session.is_admin else ""}}.</p>
% else:
<p class="muted">Signed in with the admin token.</p>
% end
</section>
% if session.signed_in:
<div class="grid">
% if session.user_name:
<a class="card" href="/keys"><h2>Keys</h2><p class="muted">Get a personal API key with a
ready curl and Python snippet; see and revoke your keys.</p></a>
<a class="card" href="/usage"><h2>Usage</h2><p class="muted">What you spent today and this
month, against every limit that applies to you.</p></a>
% end
% if session.sees_reports:
<a class="card" href="/reports"><h2>Reports</h2><p class="muted">Cost by user, day, model and
project, as charts, tables and CSV.</p></a>
% end
% if session.is_admin:
<a class="card" href="/admin"><h2>Admin</h2><p class="muted">Projects, users, keys, limits and
prices.</p></a>
% end
</div>
% end
"""

LOGIN_PAGE = """<h1>Sign in</h1>
% if session.signed_in:
<section class="notice"><p>You are signed in as <b>{{session.user_name or "admin"}}</b>.
<a href="{{next_path}}">Go on</a>.</p></section>
% end
% if auth == "open":
<section>
<form method="post" action="/login">
{{!csrf_field}}
<input type="hidden" name="next" value="{{next_path}}">
<label for="user">Your user name</label>
<div class="row"><div><input id="user" name="user" required maxlength="200"
autocomplete="username" autofocus></div><button type="submit">Sign in</button></div>
<p class="muted small">No password: this llimit lets everyone on its network say who they are.</p>
</form>
</section>
% elif auth == "header":
<section><p>You are signed in by your organisation's single sign-on, which names you to
llimit in the <code>{{auth_header}}</code> header. This request did not carry it from a
trusted proxy: open llimit at its usual address.</p></section>
% else:
<section>
<form method="post" action="/login">
{{!csrf_field}}
<input type="hidden" name="next" value="{{next_path}}">
<input type="hidden" name="oidc" value="1">
<p>Sign in with your organisation's account at <b>{{provider}}</b>.</p>
<button type="submit">Sign in with single sign-on</button>
</form>
</section>
% end
<section>
<details{{" open" if next_path == "/admin" else ""}}><summary>Sign in with the admin token</summary>
<form method="post" action="/login">
{{!csrf_field}}
<input type="hidden" name="next" value="{{next_path}}">
<label for="admin_token">Admin token</label>
<div class="row"><div><input id="admin_token" name="admin_token" type="password" required
autocomplete="current-password"></div><button type="submit">Sign in as admin</button></div>
</form>
</details>
</section>
"""

NEW_KEY_SNIPPETS = """<section class="notice" id="new">
<h2>Your new key{{" for " + new_key_owner if new_key_owner else ""}}</h2>
<p>Copy it now: llimit keeps only its hash and cannot show it again.</p>
<div class="row"><code id="new-key" class="secret">{{new_key}}</code>
<button type="button" class="quiet" data-copy="new-key" hidden>Copy</button></div>
<div class="row"><h3>curl</h3>
<button type="button" class="quiet" data-copy="snippet-curl" hidden>Copy</button></div>
<pre id="snippet-curl">{{curl_snippet}}</pre>
<div class="row"><h3>Python (the {{package}} package)</h3>
<button type="button" class="quiet" data-copy="snippet-python" hidden>Copy</button></div>
<pre id="snippet-python">{{python_snippet}}</pre>
</section>
"""

KEY_TABLE_PART = """<div class="scroll"><table class="stack keys">
% decimals = decimals_of(*[key['cost_usd'] for key in keys])
<tr><th>Key</th>
% if admin:
<th>User</th>
% end
<th>Project</th><th>Note</th><th>Created</th><th>Last used</th>
<th class="n">Requests</th><th class="n">Spend</th><th></th></tr>
% for key in keys:
<tr><td data-label="Key"><code>{{key['masked_key']}}</code>
% if admin:
<br><span class="muted small">{{key['id']}}</span>
% end
</td>
% if admin:
<td data-label="User">{{key['user'] or "(project key)"}}</td>
% end
<td data-label="Project">{{key['project']}}</td><td data-label="Note">{{key['note'] or ""}}</td>
<td data-label="Created" class="small">{{when(key['created_at'])}}</td>
<td data-label="Last used" class="small">{{when(key['last_used_at'], "never")}}</td>
<td data-label="Requests" class="n">{{count(key['requests'])}}</td>
<td data-label="Spend" class="n">{{money(key['cost_usd'], decimals)}}</td>
<td data-label="">
% if key['active']:
<form class="inline" method="post" action="{{'/admin' if admin else '/keys/' + key['id'] + '/revoke'}}"
data-confirm="Revoke the key {{key['masked_key']}}? Calls with it stop at once.">
{{!csrf_field}}
% if admin:
<input type="hidden" name="action" value="revoke_key">
<input type="hidden" name="key_id" value="{{key['id']}}">
% end
<button type="submit" class="danger">Revoke</button></form>
% else:
<span class="tag">{{"revoked" if key['revoked_at'] else "expired"}}</span>
% end
</td></tr>
% end
</table></div>
"""

REVOKE_CONFIRM_PAGE = """<h1>Revoke a key</h1>
<section class="alert"><p>Revoke the key <code>{{masked_key}}</code>{{" of " + owner if owner else ""}}?
Calls with it stop at once; this cannot be undone.</p>
<form method="post" action="{{action}}" class="row">
{{!csrf_field}}
% for name, value in hidden:
<input type="hidden" name="{{name}}" value="{{value}}">
% end
<input type="hidden" name="confirm" value="1">
<button type="submit" class="danger">Revoke</button>
<a href="{{back}}">Keep it</a>
</form></section>
"""

KEYS_PAGE = """<h1>Your keys</h1>
% if new_key:
{{!new_key_html}}
% end
<section>
<h2>Request a key</h2>
% if projects:
<form method="post" action="/keys">
{{!csrf_field}}
<div class="row">
<div><label for="project">Project</label><select id="project" name="project">
% for project in projects:
<option value="{{project['id']}}">{{project['name']}} ({{project['id']}}{{key_caps[project['id']]}})</option>
% end
</select></div>
<div><label for="note">Note <span class="muted">(what it is for)</span></label>
<input id="note" name="note" maxlength="200" placeholder="laptop, notebook, script…"></div>
<button type="submit">Create key</button>
</div>
</form>
% else:
<p>No project allows personal keys at the moment; ask an admin.</p>
% end
</section>
<section>
<h2>Keys of {{session.user_name}}</h2>
% if keys:
{{!key_table}}
% else:
<p class="muted">You have no keys yet.</p>
% end
</section>
"""

USAGE_PAGE = """<h1>Your usage</h1>
<div class="grid">
<div class="card"><div class="muted small">Today (UTC)</div><div class="stat">{{money(today_usd)}}</div></div>
<div class="card"><div class="muted small">This month</div><div class="stat">{{money(month_usd)}}</div></div>
<div class="card"><div class="muted small">Requests this month</div>
<div class="stat">{{count(month_requests)}}</div></div>
</div>
<section>
<h2>Limits</h2>
% if limits:
<div class="scroll"><table class="stack">
<tr><th>Limit</th><th>Applies to</th><th>Used</th><th class="n"></th><th>Resets</th></tr>
% for limit in limits:
<tr><td data-label="Limit">{{limit['text']}}{{!' <span class="tag">warning only</span>' if limit['action'] == 'warn' else ''}}</td>
<td data-label="Applies to">{{limit['who']}}</td>
<td data-label="Used"><div class="bar{{' full' if limit['percent'] >= 100 else ' warn' if limit['percent'] >= 80 else ''}}"
title="{{limit['percent']}}%"><span style="width:{{limit['percent']}}%"></span></div></td>
<td data-label="Amount" class="n">{{limit['used']}} of {{limit['amount']}}</td>
<td data-label="Resets" class="small">{{when(limit['resets_at'], "never")}}</td></tr>
% end
</table></div>
% elif has_keys:
<p class="muted">No limit applies to your keys.</p>
% else:
<p class="muted">The limits that apply show here once you have a <a href="/keys">key</a>.</p>
% end
</section>
<section>
<h2>By model, {{start}} to {{end}}</h2>
% if by_model:
% decimals = decimals_of(*[row['cost_usd'] for row in by_model])
<div class="scroll"><table class="stack">
<tr><th>Model</th><th class="n">Requests</th><th class="n">Input tokens</th>
<th class="n">Output tokens</th><th class="n">Cost</th></tr>
% for row in by_model:
<tr><td data-label="Model">{{row['model'] or "(unknown)"}}</td>
<td data-label="Requests" class="n">{{count(row['requests'])}}</td>
<td data-label="Input tokens" class="n">{{count(row['prompt_tokens'])}}</td>
<td data-label="Output tokens" class="n">{{count(row['completion_tokens'])}}</td>
<td data-label="Cost" class="n">{{money(row['cost_usd'], decimals)}}</td></tr>
% end
</table></div>
% else:
<p class="muted">No calls in these days.</p>
% end
</section>
<section>
<h2>By day</h2>
% if by_day:
% decimals = decimals_of(*[row['cost_usd'] for row in by_day])
<div class="scroll"><table class="stack">
<tr><th>Day (UTC)</th><th class="n">Requests</th><th class="n">Tokens</th><th class="n">Cost</th><th></th></tr>
% for row in by_day:
<tr><td data-label="Day (UTC)">{{row['day']}}</td><td data-label="Requests" class="n">{{count(row['requests'])}}</td>
<td data-label="Tokens" class="n">{{count(row['prompt_tokens'] + row['completion_tokens'])}}</td>
<td data-label="Cost" class="n">{{money(row['cost_usd'], decimals)}}</td>
<td data-label=""><div class="bar"><span style="width:{{percent(row['cost_usd'], max_day_usd)}}%"></span></div></td></tr>
% end
</table></div>
% else:
<p class="muted">No calls in these days.</p>
% end
</section>
"""

REPORTS_PAGE = """<h1>Reports</h1>
<section>
<form method="get" action="/reports" class="row">
<div><label for="start">From (UTC)</label><input type="date" id="start" name="start" value="{{start}}"></div>
<div><label for="end">To (UTC, inclusive)</label><input type="date" id="end" name="end" value="{{end}}"></div>
<button type="submit">Show</button>
<span class="small"><a href="/reports/data.csv?start={{start}}&amp;end={{end}}">Download CSV</a> ·
<a href="/reports/data?start={{start}}&amp;end={{end}}">JSON</a></span>
</form>
</section>
<div class="grid">
<div class="card"><div class="muted small">Cost</div><div class="stat">{{money(totals['cost_usd'])}}</div></div>
<div class="card"><div class="muted small">Requests</div><div class="stat">{{count(totals['requests'])}}</div></div>
<div class="card"><div class="muted small">Tokens in / out</div>
<div class="stat">{{compact(totals['prompt_tokens'])}} / {{compact(totals['completion_tokens'])}}</div></div>
<div class="card"><div class="muted small">Users</div><div class="stat">{{len(by_user)}}</div></div>
</div>
% if totals['unpriced_requests']:
<section class="alert"><p>{{count(totals['unpriced_requests'])}} requests in this range
have no price, so their cost is missing from these figures.</p></section>
% end
<div class="charts">
% for chart in charts:
<section><h2>{{chart['title']}}</h2>
<div class="chart"><canvas id="chart-{{chart['name']}}" role="img" aria-label="{{chart['title']}}"
data-series="{{chart['series_json']}}"></canvas></div>
<p class="muted small chart-note" hidden>This chart could not be drawn: Chart.js did not load
(no internet?). The tables below have every number.</p>
<noscript><p class="muted small">Charts need JavaScript; the tables below have every number.</p></noscript>
</section>
% end
</div>
% for table in tables:
<section{{!' id="%s"' % table['id'] if table.get('id') else ''}}><h2>{{table['title']}}</h2>
% if table['rows']:
<div class="scroll"><table>
<tr>
% for index, heading in enumerate(table['headings']):
<th{{!' class="n"' if index else ''}}>{{heading}}</th>
% end
</tr>
% for row in table['rows']:
<tr>
% for index, cell in enumerate(row):
<td{{!' class="n"' if index else ''}}>{{cell}}</td>
% end
</tr>
% end
</table></div>
% else:
<p class="muted">{{table.get('empty', 'No calls in this range.')}}</p>
% end
</section>
% end
"""

# The admin page, in the order it shows; each part is one section of the page.
# `typed(action, field, default)` gives back what was typed in a form that was
# refused, and `error_for(action)` the reason, shown at that form.
ADMIN_SUMMARY_PART = """<h1>Admin</h1>
% if notice:
<section class="notice"><p>{{notice}}</p></section>
% end
% if new_key:
{{!new_key_html}}
% end
% if form_error:
<section class="alert"><p>Not saved: {{form_error['message']}}
<a href="#{{form_error['anchor']}}">Back to the form</a>.</p></section>
% end
<div class="grid">
<div class="card"><div class="muted small">Spend today (UTC)</div><div class="stat">{{money(today_usd)}}</div>
<div class="muted small">{{plural(today_requests, "request")}}</div></div>
<div class="card"><div class="muted small">Spend this month</div><div class="stat">{{money(month_usd)}}</div>
<div class="muted small">{{plural(month_requests, "request")}}</div></div>
<div class="card"><div class="muted small">Active keys</div><div class="stat">{{active_keys}}</div>
<div class="muted small">{{plural(len(users), "user")}} seen</div></div>
</div>
% if missing:
<section class="alert" id="missing-prices"><h2>Models without a price</h2>
<p>Calls to these models are metered in tokens but cost nothing in the figures until they
have a price (set one <a href="#prices">below</a>):
% for model in missing:
<code class="tag bad">{{model}}</code>
% end
</p></section>
% end
<p class="small"><a href="#projects">Projects</a> · <a href="#users">Users</a> ·
<a href="#keys">Keys</a> · <a href="#limits">Limits</a> · <a href="#prices">Prices</a> ·
<a href="/reports">Reports</a></p>
"""

ADMIN_PROJECTS_PART = """
<section id="projects"><h2>Projects</h2>
<div class="scroll"><table>
<tr><th>Project</th><th>Upstream</th><th>Upstream key</th><th>Personal keys</th><th>Budgets</th><th></th></tr>
% for project in projects:
% editing = typed("update_project", "id", None) == project['id']
<tr><td><b>{{project['id']}}</b><br><span class="muted small">{{project['name']}}</span></td>
<td class="small">{{project['upstream_kind']}}<br>{{project['upstream_url_in_force']}}
% if not project['upstream_url']:
<br><span class="muted">(LLIMIT_UPSTREAM_URL)</span>
% end
</td>
<td class="small">{{project['upstream_key_source'] or "none"}}</td>
<td>{{!'<span class="tag ok">allowed</span>' if project['allow_user_keys'] else '<span class="tag">no</span>'}}</td>
<td class="small">
% for limit in project['limits']:
{{limit['text']}} ({{limit['used']}} used)<br>
% end
</td>
<td><details{{" open" if editing else ""}}><summary>Edit</summary>
% if editing:
{{!error_for("update_project")}}
% end
<form method="post" action="/admin">
{{!csrf_field}}
<input type="hidden" name="action" value="update_project">
<input type="hidden" name="id" value="{{project['id']}}">
% def value(field, default):
%   return typed("update_project", field, default) if editing else default
% end
<label>Name</label><input name="name" value="{{value('name', project['name'])}}" maxlength="200">
<label>Kind</label><select name="upstream_kind">
% for kind in upstream_kinds:
<option{{" selected" if kind == value('upstream_kind', project['upstream_kind']) else ""}}>{{kind}}</option>
% end
</select>
<label>Upstream URL</label><input name="upstream_url" value="{{value('upstream_url', project['upstream_url'] or '')}}"
placeholder="{{project['upstream_url_in_force'] if not project['upstream_url'] else 'https://…'}}">
<label>Upstream key <span class="muted">(blank keeps it)</span></label>
<input name="upstream_key" type="password" autocomplete="off" placeholder="env:NAME or the key">
<label><input type="checkbox" name="clear_upstream_key" value="1"> remove the stored key</label>
<label>API version</label><input name="api_version" value="{{value('api_version', project['api_version'] or '')}}">
<label><input type="checkbox" name="allow_user_keys" value="1"{{" checked" if project['allow_user_keys'] else ""}}>
personal keys allowed</label>
<label><input type="checkbox" name="allow_async" value="1"{{" checked" if project['allow_async'] else ""}}>
async jobs allowed (batches, background responses; charged when they finish)</label>
<label>Most active personal keys per person <span class="muted">(blank: no cap)</span></label>
<input name="max_keys_per_user" inputmode="numeric" size="4"
value="{{'' if project['max_keys_per_user'] is None else project['max_keys_per_user']}}">
<label>Message when a limit is reached</label>
<input name="limit_message" value="{{value('limit_message', project['limit_message'] or '')}}" maxlength="500">
<label>Plans its project keys may name (X-LLimit-Plan), comma-separated</label>
<input name="plans_allowed" value="{{value('plans_allowed', ', '.join(project['plans_allowed']))}}">
<label>Add a budget (USD)</label>
<div class="row"><input name="budget_usd" inputmode="decimal" size="8" placeholder="e.g. 50"
value="{{value('budget_usd', '')}}">
<select name="budget_window">
% for window in budget_windows:
<option{{" selected" if window == value('budget_window', 'month') else ""}}>{{window}}</option>
% end
</select></div>
<p><button type="submit">Save</button></p>
</form></details></td></tr>
% end
</table></div>
<details{{" open" if error_for("create_project") else ""}}><summary>New project</summary>
{{!error_for("create_project")}}
<form method="post" action="/admin">
{{!csrf_field}}
<input type="hidden" name="action" value="create_project">
<div class="row">
<div><label for="p-id">Id</label><input id="p-id" name="id" required maxlength="64" placeholder="team-a"
value="{{typed('create_project', 'id')}}"></div>
<div><label for="p-name">Name</label><input id="p-name" name="name" maxlength="200"
value="{{typed('create_project', 'name')}}"></div>
<div><label for="p-kind">Kind</label><select id="p-kind" name="upstream_kind">
% for kind in upstream_kinds:
<option{{" selected" if kind == typed('create_project', 'upstream_kind') else ""}}>{{kind}}</option>
% end
</select></div>
<div><label for="p-url">Upstream URL</label><input id="p-url" name="upstream_url" placeholder="https://api.openai.com/v1"
value="{{typed('create_project', 'upstream_url')}}"></div>
<div><label for="p-key">Upstream key</label><input id="p-key" name="upstream_key" type="password"
autocomplete="off" placeholder="env:NAME or the key"></div>
<div><label for="p-version">API version</label><input id="p-version" name="api_version" size="12"
value="{{typed('create_project', 'api_version')}}"></div>
<div><label for="p-budget">Budget (USD)</label><input id="p-budget" name="budget_usd" inputmode="decimal" size="8"
value="{{typed('create_project', 'budget_usd')}}"></div>
<div><label for="p-window">per</label><select id="p-window" name="budget_window">
% for window in budget_windows:
<option{{" selected" if window == typed('create_project', 'budget_window', 'month') else ""}}>{{window}}</option>
% end
</select></div>
<div><label><input type="checkbox" name="allow_user_keys" value="1" checked> personal keys</label></div>
<div><label><input type="checkbox" name="allow_async" value="1"> async jobs</label></div>
<button type="submit">Create project</button>
</div>
<p class="muted small">A stored upstream key is never shown again; <code>env:NAME</code> reads it from
llimit's environment at each call instead.</p>
</form></details>
</section>
"""

ADMIN_USERS_PART = """
<section id="users"><h2>Users</h2>
% if users:
% month_decimals = decimals_of(*[user['month_usd'] for user in users])
% total_decimals = decimals_of(*[user['total_usd'] for user in users])
<div class="scroll"><table class="stack">
<tr><th>User</th><th class="n">Active keys</th><th class="n">Requests this month</th>
<th class="n">Spend this month</th><th class="n">Spend, all time</th></tr>
% for user in users:
<tr><td data-label="User">{{user['user']}}</td><td data-label="Active keys" class="n">{{user['active_keys']}}</td>
<td data-label="Requests this month" class="n">{{count(user['month_requests'])}}</td>
<td data-label="Spend this month" class="n">{{money(user['month_usd'], month_decimals)}}</td>
<td data-label="Spend, all time" class="n">{{money(user['total_usd'], total_decimals)}}</td></tr>
% end
</table></div>
% else:
<p class="muted">No users yet.</p>
% end
<h3 id="refused">Refused calls, last {{refused_days}} days (who hits their limits)</h3>
% if refused_calls:
<div class="scroll"><table class="stack">
<tr><th>User</th><th>Project</th><th>Reason</th><th class="n">Refused</th></tr>
% for row in refused_calls:
<tr><td data-label="User">{{row['user'] or '(no user)'}}</td><td data-label="Project">{{row['project']}}</td>
<td data-label="Reason">{{reasons.get(row['reason'], row['reason'])}}</td>
<td data-label="Refused" class="n">{{count(row['refused'])}}</td></tr>
% end
</table></div>
% else:
<p class="muted">No calls were refused.</p>
% end
</section>
"""

ADMIN_KEYS_PART = """
<section id="keys"><h2>Keys</h2>
{{!error_for("create_key")}}
<form method="post" action="/admin" class="row">
{{!csrf_field}}
<input type="hidden" name="action" value="create_key">
<div><label for="k-user">User <span class="muted">(blank: a project key)</span></label>
<input id="k-user" name="user" maxlength="200" value="{{typed('create_key', 'user')}}"></div>
<div><label for="k-project">Project</label><select id="k-project" name="project">
% for project in projects:
<option{{" selected" if project['id'] == typed('create_key', 'project') else ""}}>{{project['id']}}</option>
% end
</select></div>
<div><label for="k-note">Note</label><input id="k-note" name="note" maxlength="200"
value="{{typed('create_key', 'note')}}"></div>
<div><label for="k-expires">Expires (UTC)</label><input id="k-expires" name="expires_at" type="date"
value="{{typed('create_key', 'expires_at')}}"></div>
<button type="submit">Create key</button>
</form>
{{!key_table}}
</section>
"""

ADMIN_LIMITS_PART = """
<section id="limits"><h2>Limits</h2>
% if limits:
<div class="scroll"><table class="stack">
<tr><th>Limit</th><th>Action</th><th>Used</th><th class="n"></th><th>Resets</th><th></th></tr>
% for limit in limits:
<tr><td data-label="Limit">{{limit['text']}}</td><td data-label="Action">{{limit['action']}}</td>
<td data-label="Used"><div class="bar{{' full' if limit['percent'] >= 100 else ' warn' if limit['percent'] >= 80 else ''}}">
<span style="width:{{limit['percent']}}%"></span></div></td>
<td data-label="Amount" class="n">{{limit['used']}} of {{limit['amount']}}</td>
<td data-label="Resets" class="small">{{when(limit['resets_at'], "never")}}</td>
<td data-label=""><form class="inline" method="post" action="/admin">
{{!csrf_field}}
<input type="hidden" name="action" value="reset_limit">
<input type="hidden" name="limit_id" value="{{limit['id']}}">
<button type="submit" title="start its current period now">Reset</button></form>
<form class="inline" method="post" action="/admin">
{{!csrf_field}}
<input type="hidden" name="action" value="delete_limit">
<input type="hidden" name="limit_id" value="{{limit['id']}}">
<button type="submit" class="danger">Delete</button></form></td></tr>
% end
</table></div>
% else:
<p class="muted">No limits: every key may spend without bound.</p>
% end
<details{{" open" if error_for("create_limit") else ""}}><summary>New limit</summary>
{{!error_for("create_limit")}}
<form method="post" action="/admin" class="row">
{{!csrf_field}}
<input type="hidden" name="action" value="create_limit">
<div><label for="l-scope">Scope</label><select id="l-scope" name="scope">
% for scope in scopes:
<option{{" selected" if scope == typed('create_limit', 'scope') else ""}}>{{scope}}</option>
% end
</select></div>
<div><label for="l-target">Target <span class="muted">(project id, user or key id)</span></label>
<input id="l-target" name="target" value="{{typed('create_limit', 'target')}}"></div>
<div><label for="l-each">Each</label><select id="l-each" name="each">
<option value="">(the scope as a whole)</option>
% for each in ("user", "key"):
<option{{" selected" if each == typed('create_limit', 'each') else ""}}>{{each}}</option>
% end
</select></div>
<div><label for="l-metric">Metric</label><select id="l-metric" name="metric">
% for metric in metrics:
<option{{" selected" if metric == typed('create_limit', 'metric') else ""}}>{{metric}}</option>
% end
</select></div>
<div><label for="l-amount">Amount</label><input id="l-amount" name="amount" inputmode="decimal" size="8" required
value="{{typed('create_limit', 'amount')}}"></div>
<div><label for="l-window">Window</label><select id="l-window" name="window">
% for window in windows:
<option{{" selected" if window == typed('create_limit', 'window', 'month') else ""}}>{{window}}</option>
% end
</select></div>
<div><label for="l-action">Action</label><select id="l-action" name="limit_action">
% for action in ("block", "warn"):
<option{{" selected" if action == typed('create_limit', 'limit_action') else ""}}>{{action}}</option>
% end
</select></div>
<div><label for="l-alert">Alert at %</label><input id="l-alert" name="alert_at" size="8" placeholder="80,90"
value="{{typed('create_limit', 'alert_at')}}"></div>
<button type="submit">Add limit</button>
</form></details>
</section>
"""

ADMIN_PRICES_PART = """
<section id="prices"><h2>Prices <span class="muted small">(USD per 1M tokens)</span></h2>
{{!error_for("set_price")}}
<form method="post" action="/admin" class="row">
{{!csrf_field}}
<input type="hidden" name="action" value="set_price">
<div><label for="m-model">Model</label><input id="m-model" name="model" required list="missing-models"
value="{{typed('set_price', 'model', missing[0] if missing else '')}}">
<datalist id="missing-models">
% for model in missing:
<option value="{{model}}">
% end
</datalist></div>
<div><label for="m-input">Input</label><input id="m-input" name="input" inputmode="decimal" size="7" required
value="{{typed('set_price', 'input')}}"></div>
<div><label for="m-cached">Cached input</label><input id="m-cached" name="cached_input" inputmode="decimal" size="7"
value="{{typed('set_price', 'cached_input')}}"></div>
<div><label for="m-output">Output</label><input id="m-output" name="output" inputmode="decimal" size="7" required
value="{{typed('set_price', 'output')}}"></div>
<div><label for="m-write">Cache write</label><input id="m-write" name="cache_write" inputmode="decimal" size="7"
value="{{typed('set_price', 'cache_write')}}"></div>
<button type="submit">Set price</button>
</form>
<p class="muted small">A price set here wins over pricing.json and applies to calls from now on;
<code>POST /admin/reprice</code> recomputes stored costs.</p>
<details><summary>{{plural(len(prices), "model")}} with a price</summary>
<div class="scroll"><table>
<tr><th>Model</th><th class="n">Input</th><th class="n">Cached input</th><th class="n">Output</th>
<th class="n">Cache write</th><th>From</th></tr>
% for price in prices:
<tr><td>{{price['model']}}</td><td class="n">{{price['input']}}</td>
<td class="n">{{price['cached_input'] if price['cached_input'] is not None else ""}}</td>
<td class="n">{{price['output']}}</td>
<td class="n">{{price['cache_write'] if price['cache_write'] is not None else ""}}</td>
<td class="small">{{price['source']}}</td></tr>
% end
</table></div></details>
</section>
"""

ADMIN_PLANS_PART = """
<section id="plans"><h2>Plans</h2>
% if plans:
<div class="scroll"><table class="stack">
<tr><th>Plan</th><th>Limits for each member</th><th class="n">Members</th><th></th></tr>
% for plan in plans:
<tr><td data-label="Plan"><b>{{plan['id']}}</b><br><span class="muted small">{{plan['name']}}</span>
% if plan['id'] == default_plan:
<span class="tag ok">default</span>
% end
</td>
<td data-label="Limits" class="small">
% for limit in plan['limits']:
{{limit['text']}}{{" (warn only)" if limit['action'] == 'warn' else ""}}<br>
% end
</td>
<td data-label="Members" class="n">{{plan['members']}}</td>
<td data-label=""><form class="inline" method="post" action="/admin">
{{!csrf_field}}
<input type="hidden" name="action" value="delete_plan">
<input type="hidden" name="plan_id" value="{{plan['id']}}">
<button type="submit" class="danger">Delete</button></form></td></tr>
% end
</table></div>
% else:
<p class="muted">No plans: limits apply one by one.</p>
% end
<details{{" open" if error_for("create_plan") else ""}}><summary>New plan</summary>
{{!error_for("create_plan")}}
<form method="post" action="/admin">
{{!csrf_field}}
<input type="hidden" name="action" value="create_plan">
<div class="row">
<div><label for="pl-id">Id</label><input id="pl-id" name="id" required maxlength="64" placeholder="research"
value="{{typed('create_plan', 'id')}}"></div>
<div><label for="pl-name">Name</label><input id="pl-name" name="name" maxlength="200"
value="{{typed('create_plan', 'name')}}"></div>
</div>
<label for="pl-limits">Limits for each member, one a line: metric:amount/window</label>
<textarea id="pl-limits" name="limits" rows="3" cols="40"
placeholder="usd:20/month&#10;requests:60/minute&#10;tokens:20000/24h">{{typed('create_plan', 'limits')}}</textarea>
<p><button type="submit">Create plan</button></p>
</form></details>
% if plans:
{{!error_for("assign_plan")}}
<form method="post" action="/admin" class="row">
{{!csrf_field}}
<input type="hidden" name="action" value="assign_plan">
<div><label for="pl-user">User</label><input id="pl-user" name="user" required maxlength="200"
value="{{typed('assign_plan', 'user')}}"></div>
<div><label for="pl-plan">Plan</label><select id="pl-plan" name="plan">
<option value="">(the default plan)</option>
% for plan in plans:
<option{{" selected" if plan['id'] == typed('assign_plan', 'plan') else ""}}>{{plan['id']}}</option>
% end
</select></div>
<button type="submit">Put on plan</button>
</form>
% end
</section>
"""

ADMIN_PAGE = "".join((ADMIN_SUMMARY_PART, ADMIN_PROJECTS_PART, ADMIN_USERS_PART,
                      ADMIN_KEYS_PART, ADMIN_LIMITS_PART, ADMIN_PLANS_PART,
                      ADMIN_PRICES_PART))

LOGOUT_PAGE = """<h1>Sign out</h1>
<section><p>Signed in as <b>{{session.user_name or "admin"}}</b>.</p>
<form method="post" action="/logout">
{{!csrf_field}}
<button type="submit">Sign out</button></form></section>
"""

ERROR_PAGE = """<h1>{{status}}: {{reason}}</h1>
<section class="alert"><p>{{message}}</p>
<p><a href="/">llimit home</a>
% if not session.signed_in:
· <a href="/login">Sign in</a>
% end
</p></section>
"""

PAGES_SCRIPT_JS = r"""// llimit's pages: copy buttons, confirmations and charts. Everything works without it.
"use strict";
(function () {
  function copyText(text, done) {
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done);
      return;
    }
    var area = document.createElement("textarea");  // plain http: the older way
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
    done();
  }
  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    button.hidden = false;
    button.addEventListener("click", function () {
      copyText(document.getElementById(button.dataset.copy).textContent, function () {
        button.textContent = "Copied";
        setTimeout(function () { button.textContent = "Copy"; }, 1500);
      });
    });
  });

  // Revoking asks first; without this script the server asks on a page of its own.
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.dataset.confirm)) {
        event.preventDefault();
        return;
      }
      var confirmed = document.createElement("input");
      confirmed.type = "hidden";
      confirmed.name = "confirm";
      confirmed.value = "1";
      form.appendChild(confirmed);
    });
  });

  var charts = document.querySelectorAll("canvas[data-series]");
  if (charts.length && typeof window.Chart === "undefined") {
    // No Chart.js (offline, blocked): say so where the charts would be.
    document.querySelectorAll(".chart-note").forEach(function (note) { note.hidden = false; });
    document.querySelectorAll(".chart").forEach(function (box) { box.hidden = true; });
    return;
  }
  // Money as the pages show it: cents, else 4 decimals, else 6.
  function money(value, digits) {
    if (digits === undefined) {
      var size = Math.abs(value);
      digits = size === 0 || size >= 1 || Math.abs(Math.round(value * 100) - value * 100) < 1e-7
        ? 2 : size >= 0.01 ? 4 : 6;
    }
    return "$" + Number(value).toLocaleString(undefined,
      {minimumFractionDigits: digits, maximumFractionDigits: digits});
  }
  // An axis shows as many decimals as its step needs, so no two ticks read alike.
  function moneyTick(value, index, ticks) {
    var step = ticks.length > 1 ? Math.abs(ticks[1].value - ticks[0].value) : Math.abs(value);
    var digits = step > 0 ? Math.min(6, Math.max(2, Math.ceil(-Math.log10(step) - 1e-9))) : 2;
    return money(value, digits);
  }
  charts.forEach(function (canvas) {
    var config = JSON.parse(canvas.dataset.series);
    var options = config.options || (config.options = {});
    Object.keys(options.scales || {}).forEach(function (axis) {
      var scale = options.scales[axis];
      if (scale.money) {
        delete scale.money;
        scale.ticks = Object.assign(scale.ticks || {}, {callback: moneyTick});
      }
    });
    options.plugins = options.plugins || {};
    options.plugins.tooltip = {callbacks: {label: function (item) {
      var value = typeof item.parsed === "number" ? item.parsed
        : (item.chart.options.indexAxis === "y" ? item.parsed.x : item.parsed.y);
      return (item.dataset.label ? item.dataset.label + ": " : item.label + ": ") + money(value);
    }}};
    new window.Chart(canvas, config);
  });
})();
"""

def when(iso, missing="–"):
    """An ISO 8601 UTC time as 2026-11-23 07:00 UTC."""
    return f"{iso[:10]} {iso[11:16]} UTC" if iso else missing


def percent(part, whole):
    """part / whole as a whole percentage for a bar, 0 to 100."""
    if not whole:
        return 100 if part else 0
    return max(0, min(100, round(100 * (part or 0) / whole)))


def compact(count):
    """A count in a few digits: 950, 12.3k, 4.56M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return str(count)


def csrf_field(session):
    """The hidden CSRF field every POST form of the pages carries."""
    return (f'<input type="hidden" name="csrf_token"'
            f' value="{html.escape(session.csrf_token or "", quote=True)}">')


def count(number):
    """A whole number with thousands separators: 1,234."""
    return f"{number:,}"


def _versioned(path, text):
    # The content's hash in the URL: a browser keeps the file a year, and a new
    # llimit with a changed file names a new URL.
    return f"{path}?v={hashlib.sha256(text.encode()).hexdigest()[:12]}"


PAGES_CSS_URL = _versioned(PAGES_CSS_PATH, PAGES_CSS)
PAGES_SCRIPT_URL = _versioned(PAGES_SCRIPT_PATH, PAGES_SCRIPT_JS)
STATIC_CACHE_CONTROL = "public, max-age=31536000, immutable"
TEMPLATE_HELPERS = {"money": format_usd, "decimals_of": usd_decimals, "when": when,
                    "percent": percent, "compact": compact, "count": count, "plural": plural}


def render_part(part, **context):
    """One *_PART template as HTML, for a page to place with {{!...}}."""
    return bottle.template(part, **TEMPLATE_HELPERS, **context)


def render_page(page, *, title, session, scripts=(), **context):
    """A *_PAGE template inside LAYOUT, as a string of HTML."""
    field = csrf_field(session)
    body = bottle.template(page, session=session, csrf_field=field, **TEMPLATE_HELPERS,
                           **context)
    return bottle.template(LAYOUT, title=title, session=session, body=body, csrf_field=field,
                           css_url=PAGES_CSS_URL, scripts=list(scripts))


# =============================================================================
# 10. Pages
#    What people see in a browser: home, sign-in, their keys and usage, the
#    reports (with their JSON and CSV feeds) and the admin dashboard. Each page
#    handler is wrapped by `page`, which finds the session and checks every
#    POST in one place (section 7). Changes go through the same validators and
#    storage functions as the admin API; GET changes nothing but a sign-in.
# =============================================================================

DEFAULT_REPORT_DAYS = 30
MAX_REPORT_DAYS = 3660
REPORT_TOP_USERS = 8          # daily cost stacked by user: these, then "other"
REPORT_TOP_ROWS = 20          # cost by user or model: these bars, then "other"
CHART_COLORS = ("#2a5bd7", "#e07b39", "#2f9e6e", "#c94f7c", "#7b61c9", "#d4a72c", "#3aa6b9",
                "#8c6d46")
CHART_OTHER_COLOR = "#a3aab6"
# The first of these that has a price; else any priced model of the provider.
SNIPPET_MODELS = {"openai": ("gpt-4o-mini", "gpt-4.1-mini", "gpt-4o"),
                  "azure": ("gpt-4o-mini", "gpt-4.1-mini", "gpt-4o"),
                  "anthropic": ("claude-haiku-4-5", "claude-sonnet-4-5", "claude-3-5-haiku"),
                  "gemini": ("gemini-2.5-flash", "gemini-2.5-flash-lite", "gemini-2.5-pro")}
SNIPPET_AZURE_API_VERSION = "2024-10-21"
BUDGET_WINDOWS = ("day", "week", "month", "total")
ADMIN_NOTICES = {
    "project_created": "Project created.", "project_saved": "Project saved.",
    "key_revoked": "Key revoked.", "limit_created": "Limit added.",
    "limit_deleted": "Limit deleted.", "price_set": "Price set; it applies from the next call.",
    "limit_reset": "Limit reset: its current period starts now.",
    "plan_created": "Plan created.", "plan_deleted": "Plan deleted.",
    "plan_assigned": "Plan assigned; it applies from the next call.",
}
REPORT_CSV_COLUMNS = ("day", "user", "project", "model", "requests", "prompt_tokens",
                      "cached_tokens", "completion_tokens", "cost_usd", "unpriced_requests")


def page(handler):
    """A page route: calls handler(state, session[, form for a POST], **url_args)."""
    @functools.wraps(handler)
    def serve_page(state, **url_args):
        session = page_session(state)
        bottle.request.environ["llimit.session"] = session  # for the error page's header
        for name, value in page_headers(_script_sources(state)).items():
            bottle.response.set_header(name, value)
        try:
            if bottle.request.method == "POST":
                return handler(state, session, checked_form(state, session), **url_args)
            return handler(state, session, **url_args)
        except bottle.HTTPResponse as response:
            _own_location(state.config, response)
            raise
    return serve_page


def see_other(location):
    """A 303 to a path of llimit's (or a sign-in provider's URL): `raise see_other(...)`.

    The page wrapper makes a path absolute with the configured base URL, never
    with the Host header, which the client chooses.
    """
    answer = bottle.response.copy(cls=bottle.HTTPResponse)  # with the cookies set so far
    answer.status, answer.body = 303, ""
    answer.set_header("Location", location)
    return answer


def _own_location(config, response):
    location = response.get_header("Location")
    if location and location.startswith("/"):
        response.set_header("Location", config.base_url + location)


def page_headers(script_sources):
    """The security headers of every HTML answer; `script_sources` is CSP's script-src."""
    return {
        "Content-Security-Policy": (
            f"default-src 'self'; script-src {script_sources}; style-src 'self' 'unsafe-inline';"
            " img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


def chartjs_file(config):
    """The local Chart.js the pages use, or None for the CDN.

    LLIMIT_CHARTJS when set; else vendor/chart.umd.js beside llimit.py (what
    tests/install.sh fetches) when it is there, so an offline llimit draws charts.
    """
    if config.chartjs:
        return config.chartjs
    return VENDORED_CHARTJS if os.path.isfile(VENDORED_CHARTJS) else None


def chartjs_origin(state):
    """Where the pages' Chart.js comes from, in words for the start-up log."""
    if state.chartjs_path:
        return f"served by llimit from {state.chartjs_path}"
    return f"the CDN, {CHARTJS_CDN_URL} (offline, /reports shows tables only)"


def _script_sources(state):
    return "'self'" if state.chartjs_path else f"'self' {CHARTJS_CDN_URL}"


def _chart_scripts(state):
    chart = ({"src": CHARTJS_PATH} if state.chartjs_path
             else {"src": CHARTJS_CDN_URL, "integrity": CHARTJS_CDN_INTEGRITY})
    return [chart, {"src": PAGES_SCRIPT_URL}]


def public_base_url(config):
    """Where people reach llimit: LLIMIT_PUBLIC_URL, else http://HOST:PORT of the
    config; never the request's Host header, which the client chooses."""
    return config.base_url


def _signed_in_user(session):
    if session.user_name:
        return session.user_name
    if session.signed_in:
        raise LlimitError(403, "permission_denied",
                          "You are signed in with the admin token, which has no keys or usage"
                          " of its own; sign in as a user for those.")
    _redirect_to_login()


def _redirect_to_login():
    request = bottle.request
    here = request.path + ("?" + request.query_string if request.query_string else "")
    raise see_other("/login?" + urllib.parse.urlencode({"next": here}))


def _require_admin_page(session):
    if session.is_admin:
        return
    if not session.signed_in:
        _redirect_to_login()
    raise LlimitError(403, "permission_denied",
                      "This page is for llimit's admins. If you are one, sign in with the"
                      " admin token on the sign-in page; if you need something changed,"
                      " ask your llimit admin.")


def _require_reports(session):
    if session.sees_reports:
        return
    if not session.signed_in:
        raise LlimitError(401, "invalid_request_error", "Sign in to see reports.",
                          code="sign_in_required")
    raise LlimitError(403, "permission_denied",
                      "Reports of everyone's spending are for llimit's admins here. Your own"
                      " spending is on the Usage page; ask your llimit admin for more.")


# --- home, sign-in ----------------------------------------------------------------

def page_home(state, session):
    """GET /: what llimit is, and where to go."""
    return render_page(HOME_PAGE, title="Home", session=session,
                       base_url=public_base_url(state.config))


def page_login(state, session):
    """GET /login: the sign-in form of LLIMIT_AUTH, and the admin token's."""
    config = state.config
    session = login_csrf(state, session)
    return render_page(LOGIN_PAGE, title="Sign in", session=session, auth=config.auth,
                       next_path=safe_next(bottle.request.query.get("next")),
                       auth_header=config.auth_header,
                       provider=urllib.parse.urlsplit(config.oidc_issuer or "").hostname)


def page_login_post(state, session, form):
    """POST /login: sign in by admin token, by user name (open), or start OIDC."""
    config = state.config
    next_path = safe_next(form.get("next"))
    if form.get("admin_token"):
        address = bottle.request.environ.get("REMOTE_ADDR", "")
        if not admin_token_matches(state.database(), form["admin_token"]):
            log.warning("page sign-in with a wrong admin token from %s", address)
            state.auth_throttle.wrong(address, LlimitError(
                401, "invalid_request_error", "That is not the admin token.",
                code="invalid_admin_token"))
        sign_in(state, session, session.user_name, token_admin=True)
        raise see_other(next_path if next_path != "/" else "/admin")
    if config.auth == "open":
        user_name = canonical_user_name(form.get("user", ""), state.user_domains)
        if not user_name:
            raise LlimitError(400, "invalid_request_error", "Type a user name to sign in.")
        sign_in(state, session, user_name)
        raise see_other(next_path)
    if config.auth == "oidc":
        session = ensure_session(state, session)
        pending = {"state": secrets.token_urlsafe(24), "nonce": secrets.token_urlsafe(24),
                   "verifier": secrets.token_urlsafe(48), "next": next_path}
        url = state.oidc.authorization_url(_oidc_redirect_uri(config), pending)
        db = state.database()
        with transaction(db):
            set_session_pending(db, session.id_hash, json.dumps(pending))
        raise see_other(url)
    raise LlimitError(400, "invalid_request_error",
                      "Sign-in here comes from your organisation's single sign-on.")


def _oidc_redirect_uri(config):
    return public_base_url(config) + "/login/callback"


def page_login_callback(state, session):
    """GET /login/callback: the OIDC provider's answer; signs the user in."""
    config = state.config
    if config.auth != "oidc":
        raise LlimitError(404, "invalid_request_error", "OpenID Connect sign-in is not on.")
    query = bottle.request.query
    pending = session.pending
    if not pending or not secrets_match(query.get("state", ""), pending["state"]):
        raise LlimitError(400, "sign_in_failed",
                          "This sign-in was not started in this browser, or took too long;"
                          " please sign in again.")
    db = state.database()
    with transaction(db):
        set_session_pending(db, session.id_hash, None)  # each state answers once
    if query.get("error"):
        raise LlimitError(401, "sign_in_failed", "The provider refused the sign-in: "
                          f"{query.get('error_description') or query.get('error')}.")
    claims = state.oidc.claims(query.get("code", ""), _oidc_redirect_uri(config), pending,
                               config.clock())
    user_name = user_from_claims(claims, config.oidc_allowed_domains, state.user_domains)
    sign_in(state, session, user_name)
    if config.plan_claim:
        refresh_plan(state, user_name, _claim_groups(claims.get(config.plan_claim)))
    log.info("page sign-in: %s by OpenID Connect", user_name)
    raise see_other(safe_next(pending.get("next")))


def page_logout_confirm(state, session):
    """GET /logout (typed or linked): a button that signs out.

    Signing out changes state, so it takes a POST with the CSRF token like
    every other form; a GET alone signs no one out.
    """
    if not session.signed_in:
        raise see_other("/login")
    return render_page(LOGOUT_PAGE, title="Sign out", session=session)


def page_logout(state, session, form):
    """POST /logout: end the session."""
    sign_out(state, session)
    raise see_other("/")


# --- a user's keys and usage ----------------------------------------------------------

NEW_KEY_SHOWN_SECONDS = 300  # how long a new key's secret waits for the page that shows it


def _show_new_key_once(state, session, row, raw_key, page_path):
    # POST/redirect/GET, so a reload makes no second key: the secret waits,
    # sealed for this browser, in its session row (the GET may reach another
    # llimit instance), and is cleared as it is shown.
    shown = {"raw_key": raw_key, "project_id": row["project_id"],
             "owner": row["user_name"] or f"project {row['project_id']}",
             "until": state.config.clock() + NEW_KEY_SHOWN_SECONDS}
    set_session_new_key(state.database(), session.id_hash,
                        seal_for_session(session.raw_id, json.dumps(shown)))
    raise see_other(page_path + "#new")


def _new_key_shown(state, session):
    if not (session.new_key_waiting and session.id_hash and session.raw_id):
        return ""
    db = state.database()
    sealed = take_session_new_key(db, session.id_hash)
    opened = open_for_session(session.raw_id, sealed) if sealed else None
    shown = json.loads(opened) if opened else None
    if shown is None or shown["until"] <= state.config.clock():
        return ""
    project = get_project(db, shown["project_id"])
    return _new_key_html(state, project, shown["raw_key"], shown["owner"])


def page_keys(state, session):
    """GET /keys: the user's keys (and a new one's secret, once), and a form to get one."""
    return _render_keys(state, session, _signed_in_user(session))


def page_keys_create(state, session, form):
    """POST /keys: a personal key in a project that allows them, shown this once."""
    user_name = _signed_in_user(session)
    fields = validate_key_fields({"project": form.get("project") or "default",
                                  "note": form.get("note", "").strip() or None},
                                 ("project", "note"), state.user_domains)
    db = state.database()
    with transaction(db):
        project = get_project(db, fields["project"])
        if project is None or not project["allow_user_keys"]:
            raise LlimitError(403, "permission_denied",
                              f"The project {fields['project']!r} hands out no personal keys.")
        check_key_cap(db, project, user_name, state.config.clock())
        row, raw_key = create_key(db, state.config.clock(), user_name, fields["project"],
                                  fields["note"])
    log.info("page: %s created key %s in project %s", user_name, row["id"], row["project_id"])
    _show_new_key_once(state, session, row, raw_key, "/keys")


def page_key_revoke(state, session, form, key_id):
    """POST /keys/<id>/revoke: revoke one of the user's own keys."""
    user_name = _signed_in_user(session)
    db = state.database()
    with transaction(db):
        row = get_key(db, key_id)
        if row is None or row["user_name"] != user_name:
            raise LlimitError(404, "invalid_request_error", "You have no such key.",
                              code="key_not_found")
        if form.get("confirm") != "1":
            return _confirm_revoke(session, row, f"/keys/{key_id}/revoke", (), "/keys")
        revoke_key(db, key_id, utc_iso(state.config.clock()))
    raise see_other("/keys")


def _confirm_revoke(session, row, action, hidden, back):
    # Without the page script's confirm() (or with it off), the POST lands here first.
    return render_page(REVOKE_CONFIRM_PAGE, title="Revoke a key", session=session,
                       masked_key=row["masked_key"],
                       owner=row["user_name"], action=action, hidden=hidden, back=back)


def key_table(session, keys, admin=False):
    """The keys table of /keys (a user's own) and /admin (everyone's, with users and ids)."""
    return render_part(KEY_TABLE_PART, keys=keys, admin=admin, csrf_field=csrf_field(session))


def _render_keys(state, session, user_name):
    db = state.database()
    rows = list_keys(db, user_name=user_name)
    spend = key_spend(db, [row["id"] for row in rows])
    keys = [key_to_json(row, spend.get(row["id"])) for row in rows]
    new_key_html = _new_key_shown(state, session)
    return render_page(
        KEYS_PAGE, title="Keys", session=session, scripts=[{"src": PAGES_SCRIPT_URL}],
        keys=keys, key_table=key_table(session, keys),
        projects=[row for row in list_projects(db) if row["allow_user_keys"]],
        key_caps={row["id"]: "" if row["max_keys_per_user"] is None else
                  f", at most {row['max_keys_per_user']} keys each" for row in list_projects(db)},
        new_key=bool(new_key_html), new_key_html=new_key_html)


def snippet_model(pricebook, kind):
    """A model to name in a new key's snippets: one llimit prices, of the project's provider."""
    prices = pricebook.table()
    wanted = SNIPPET_MODELS[kind]
    return next((model for model in wanted if pricebook.resolve(model)),
                next((model for model in sorted(prices)
                      if model.startswith(wanted[0].split("-")[0] + "-")), wanted[0]))


def _new_key_html(state, project, raw_key, owner):
    base_url = public_base_url(state.config)
    kind = project["upstream_kind"] if project else "openai"
    model = snippet_model(state.pricebook, kind)
    hello = '[{"role": "user", "content": "Hello!"}]'
    if kind == "anthropic":
        package = "anthropic"
        curl = (f"curl {base_url}/v1/messages \\\n"
                f"  -H \"x-api-key: {raw_key}\" \\\n"
                f"  -H \"anthropic-version: {ANTHROPIC_VERSION}\" \\\n"
                "  -H \"Content-Type: application/json\" \\\n"
                f"  -d '{{\"model\": \"{model}\", \"max_tokens\": 256, \"messages\": {hello}}}'")
        python = ("from anthropic import Anthropic\n\n"
                  f"client = Anthropic(base_url=\"{base_url}\",\n"
                  f"                   api_key=\"{raw_key}\")\n"
                  "reply = client.messages.create(\n"
                  f"    model=\"{model}\",\n"
                  "    max_tokens=256,\n"
                  f"    messages={hello},\n"
                  ")\n"
                  "print(reply.content[0].text)")
    elif kind == "gemini":
        package = "google-genai"
        curl = (f"curl \"{base_url}/v1beta/models/{model}:generateContent\" \\\n"
                f"  -H \"x-goog-api-key: {raw_key}\" \\\n"
                "  -H \"Content-Type: application/json\" \\\n"
                "  -d '{\"contents\": [{\"parts\": [{\"text\": \"Hello!\"}]}]}'")
        python = ("from google import genai\n"
                  "from google.genai import types\n\n"
                  f"client = genai.Client(api_key=\"{raw_key}\",\n"
                  f"    http_options=types.HttpOptions(base_url=\"{base_url}\"))\n"
                  "reply = client.models.generate_content(\n"
                  f"    model=\"{model}\", contents=\"Hello!\")\n"
                  "print(reply.text)")
    elif kind == "azure":
        package = "openai"
        version = ((project["api_version"] if project else None)
                   or state.config.upstream_api_version or SNIPPET_AZURE_API_VERSION)
        curl = (f"curl \"{base_url}/openai/deployments/{model}/chat/completions"
                f"?api-version={version}\" \\\n"
                f"  -H \"api-key: {raw_key}\" \\\n"
                "  -H \"Content-Type: application/json\" \\\n"
                f"  -d '{{\"messages\": {hello}}}'")
        python = ("from openai import AzureOpenAI\n\n"
                  f"client = AzureOpenAI(azure_endpoint=\"{base_url}\",\n"
                  f"                     api_key=\"{raw_key}\",\n"
                  f"                     api_version=\"{version}\")\n"
                  "reply = client.chat.completions.create(\n"
                  f"    model=\"{model}\",  # the deployment's name\n"
                  f"    messages={hello},\n"
                  ")\n"
                  "print(reply.choices[0].message.content)")
    else:
        package = "openai"
        curl = (f"curl {base_url}/v1/chat/completions \\\n"
                f"  -H \"Authorization: Bearer {raw_key}\" \\\n"
                "  -H \"Content-Type: application/json\" \\\n"
                f"  -d '{{\"model\": \"{model}\", \"messages\": {hello}}}'")
        python = ("from openai import OpenAI\n\n"
                  f"client = OpenAI(base_url=\"{base_url}/v1\",\n"
                  f"                api_key=\"{raw_key}\")\n"
                  "reply = client.chat.completions.create(\n"
                  f"    model=\"{model}\",\n"
                  f"    messages={hello},\n"
                  ")\n"
                  "print(reply.choices[0].message.content)")
    return render_part(NEW_KEY_SNIPPETS, new_key=raw_key, new_key_owner=owner, package=package,
                       curl_snippet=curl, python_snippet=python)


def page_usage(state, session):
    """GET /usage: the user's spend today and this month, against every limit that applies."""
    user_name = _signed_in_user(session)
    db = state.database()
    now = state.config.clock()
    today = _utc_day(now)
    subject = subject_of("user", user_name)
    month = get_counter(db, subject, _utc_day(window_bounds("month", now)[0]), today)
    active_keys = list_keys(db, user_name=user_name, active_at=utc_iso(now))
    start, end = report_range({}, now)
    by_day = usage_report(db, "day", start, end, user_name)["rows"]
    return render_page(
        USAGE_PAGE, title="Usage", session=session,
        today_usd=nusd_to_usd(get_counter(db, subject, today, today).cost_nusd),
        month_usd=nusd_to_usd(month.cost_nusd), month_requests=month.requests,
        limits=_user_limits(state, db, user_name, active_keys), has_keys=bool(active_keys),
        start=start, end=end, by_model=usage_report(db, "model", start, end, user_name)["rows"],
        by_day=by_day[::-1], max_day_usd=max((row["cost_usd"] for row in by_day), default=0))


def _user_limits(state, db, user_name, keys):
    # A user's calls go through their keys; a limit reached through two keys is one row.
    # Their plan's limits show even before they have a key.
    plan_id = state.limits.plan_of(db, config_version(db), user_name, state.config.default_plan)
    seen, rows = set(), []
    for key in keys or [None]:
        for subject, status in state.limits.statuses_for_call(
                db, key and key["project_id"], user_name, key and key["id"], plan_id):
            if (status["id"], subject) not in seen:
                seen.add((status["id"], subject))
                rows.append(_limit_row(status, _whose(subject, key)))
    return rows


def _whose(subject, key):
    # A key's own total is named as /keys lists the key: masked, not by id.
    return f"key {key['masked_key']}" if key and parse_subject(subject)[0] == "key" \
        else describe_subject(subject)


def _limit_row(status, whose=None):
    # With `whose`, the row is for the key holder's own page: the limit in words, no ids.
    metric = status["metric"]

    def shown(amount):  # each as it reads best: "$0.004705 of $25.00"
        return format_usd(amount) if metric == "usd" else format_amount(metric, amount)
    text = describe_limit(status) if whose is None else limit_in_words(status)
    return {"id": status["id"], "text": text, "who": whose,
            "action": status["action"], "used": shown(status["used"]),
            "amount": shown(status["amount"]), "resets_at": status["resets_at"],
            "percent": percent(status["used"], status["amount"]), "status": status}


# --- reports ------------------------------------------------------------------------

def report_range(query, now):
    """(start_day, end_day) from ?start=&end= (inclusive UTC dates), default the last 30 days."""
    today = dt.datetime.fromtimestamp(now, UTC).date()
    try:
        end = dt.date.fromisoformat(query.get("end")) if query.get("end") else today
        start = (dt.date.fromisoformat(query.get("start")) if query.get("start")
                 else end - dt.timedelta(days=DEFAULT_REPORT_DAYS - 1))
        if end == dt.date.max:
            raise OverflowError  # the CSV export reads up to the day after `end`
    except (ValueError, OverflowError):  # OverflowError: a default start before year 1
        raise LlimitError(400, "invalid_request_error",
                          "start and end must be dates like 2026-11-01.",
                          code="invalid_date") from None
    if start > end:
        raise LlimitError(400, "invalid_request_error", "start is after end.",
                          code="invalid_date")
    return start.isoformat(), end.isoformat()


def usage_report(db, group_by, start_day, end_day, user_name=None):
    """{"rows": [...], "totals": {...}} of usage per group over inclusive UTC days."""
    if group_by not in USAGE_GROUP_COLUMNS:
        raise LlimitError(400, "invalid_request_error",
                          "group_by must be one of " + ", ".join(USAGE_GROUP_COLUMNS),
                          code="invalid_group_by")
    rows = []
    totals = dict.fromkeys(("requests", "prompt_tokens", "cached_tokens", "cache_write_tokens",
                            "completion_tokens", "unpriced_requests"), 0)
    total_nusd = 0
    for row in usage_by_group(db, group_by, start_day, end_day, user_name):
        figures = {"requests": row[1], "prompt_tokens": row[2], "cached_tokens": row[3],
                   "cache_write_tokens": row[4], "completion_tokens": row[5],
                   "cost_usd": nusd_to_usd(row[6]), "unpriced_requests": row[7]}
        rows.append({group_by: row[0] if row[0] != "" else None, **figures})
        for name in totals:
            totals[name] += figures[name]
        total_nusd += row[6]
    totals["cost_usd"] = nusd_to_usd(total_nusd)
    return {"start": start_day, "end": end_day, "group_by": group_by, "rows": rows,
            "totals": totals}


def report_data(db, start_day, end_day):
    """What /reports shows and /reports/data answers, for inclusive UTC days."""
    first = dt.date.fromisoformat(start_day)
    count = (dt.date.fromisoformat(end_day) - first).days + 1
    if count > MAX_REPORT_DAYS:
        raise LlimitError(400, "invalid_request_error",
                          f"A report covers at most {MAX_REPORT_DAYS} days.", code="invalid_date")
    days = [(first + dt.timedelta(days=n)).isoformat() for n in range(count)]
    by_user = usage_report(db, "user", start_day, end_day)
    per_day = {row["day"]: row for row in usage_report(db, "day", start_day, end_day)["rows"]}
    daily, running_nusd = [], 0
    for day in days:
        row = per_day.get(day) or {"requests": 0, "cost_usd": 0.0}
        running_nusd += round(row["cost_usd"] * NANO)
        daily.append({"day": day, "requests": row["requests"], "cost_usd": row["cost_usd"],
                      "cumulative_usd": nusd_to_usd(running_nusd)})
    top = [row["user"] for row in by_user["rows"][:REPORT_TOP_USERS]]
    stacked = {user: [0] * count for user in top}
    other = [0] * count
    day_index = {day: index for index, day in enumerate(days)}
    for day, user, cost in usage_by_day_and_group(db, "user", start_day, end_day):
        (stacked.get(user or None) or other)[day_index[day]] += cost
    series = [{"user": user, "cost_usd": [nusd_to_usd(c) for c in costs]}
              for user, costs in stacked.items()]
    if len(by_user["rows"]) > REPORT_TOP_USERS:
        series.append({"user": None, "other": True, "cost_usd": [nusd_to_usd(c) for c in other]})
    return {"start": start_day, "end": end_day, "totals": by_user["totals"],
            "by_user": by_user["rows"],
            "by_model": usage_report(db, "model", start_day, end_day)["rows"],
            "by_project": usage_report(db, "project", start_day, end_day)["rows"],
            "daily": daily, "daily_by_user": {"days": days, "series": series},
            "refused": refused_report(db, start_day, end_day)}


def refused_report(db, start_day, end_day):
    """Who hits their limits: refused calls per user, project and reason, most first."""
    return [{"user": row["user_name"] or None, "project": row["project_id"],
             "reason": row["reason"], "refused": row["refused"]}
            for row in refusals_by_user(db, start_day, end_day)]


def report_charts(report):
    """The Chart.js configurations of the report page, each as JSON for a data-series."""
    def label(name, fallback="(none)"):
        return name if name else fallback

    def ranked_bars(rows, group, title):
        shown = rows[:REPORT_TOP_ROWS]
        labels = [label(row[group], "(no user)" if group == "user" else "(unknown)")
                  for row in shown]
        values = [row["cost_usd"] for row in shown]
        if len(rows) > REPORT_TOP_ROWS:
            labels.append(f"{len(rows) - REPORT_TOP_ROWS} others")
            values.append(round(sum(row["cost_usd"] for row in rows[REPORT_TOP_ROWS:]), 9))
        return {"type": "bar", "data": {"labels": labels, "datasets": [
            {"label": title, "data": values, "backgroundColor": CHART_COLORS[0]}]},
            "options": _chart_options(indexAxis="y", legend=False,
                                      scales={"x": {"money": True, "beginAtZero": True}})}

    days = report["daily_by_user"]["days"]
    charts = [
        ("users", "Cost by user", ranked_bars(report["by_user"], "user", "Cost")),
        ("daily", "Daily cost and running total", {"type": "bar", "data": {
            "labels": days, "datasets": [
                {"label": "Cost", "data": [day["cost_usd"] for day in report["daily"]],
                 "backgroundColor": CHART_COLORS[0], "order": 2},
                {"type": "line", "label": "Running total", "yAxisID": "total",
                 "data": [day["cumulative_usd"] for day in report["daily"]],
                 "borderColor": CHART_COLORS[1], "backgroundColor": CHART_COLORS[1],
                 "pointRadius": 0, "order": 1}]},
            "options": _chart_options(scales={
                "y": {"money": True, "beginAtZero": True, "title": {"display": True,
                                                                     "text": "per day"}},
                "total": {"money": True, "beginAtZero": True, "position": "right",
                          "grid": {"drawOnChartArea": False},
                          "title": {"display": True, "text": "running total"}}})}),
        ("daily-users", "Daily cost by user", {"type": "bar", "data": {
            "labels": days, "datasets": [
                {"label": "other" if item.get("other") else label(item["user"], "(no user)"),
                 "data": item["cost_usd"],
                 "backgroundColor": CHART_OTHER_COLOR if item.get("other")
                 else CHART_COLORS[index % len(CHART_COLORS)]}
                for index, item in enumerate(report["daily_by_user"]["series"])]},
            "options": _chart_options(scales={"x": {"stacked": True},
                                              "y": {"stacked": True, "money": True}})}),
        ("models", "Cost by model", ranked_bars(report["by_model"], "model", "Cost")),
        ("projects", "Cost by project", {"type": "doughnut", "data": {
            "labels": [label(row["project"]) for row in report["by_project"]],
            "datasets": [{"label": "Cost", "data": [row["cost_usd"] for row in report["by_project"]],
                          "backgroundColor": list(CHART_COLORS)}]},
            "options": _chart_options()}),
    ]
    return [{"name": name, "title": title, "series_json": json.dumps(config)}
            for name, title, config in charts]


def _chart_options(legend=True, **options):
    return {"animation": False, "maintainAspectRatio": False, "responsive": True,
            "plugins": {"legend": {"display": legend, "position": "bottom"}}, **options}


def report_tables(report):
    """The report's numbers as tables: one per chart's grouping, and by day."""
    def column(values):  # one column of costs, all with the same decimals
        decimals = usd_decimals(*values)
        return [format_usd(value, decimals) for value in values]

    def grouped(title, group, rows, empty):
        costs = column([row["cost_usd"] for row in rows])
        return {"title": title,
                "headings": (group.title(), "Requests", "Input tokens", "Output tokens", "Cost"),
                "rows": [(row[group] or empty, count(row["requests"]),
                          count(row["prompt_tokens"]), count(row["completion_tokens"]), cost)
                         for row, cost in zip(rows, costs)]}
    daily = report["daily"]
    return [
        grouped("By user", "user", report["by_user"], "(no user)"),
        grouped("By model", "model", report["by_model"], "(unknown)"),
        grouped("By project", "project", report["by_project"], "(none)"),
        {"title": "By day", "headings": ("Day (UTC)", "Requests", "Cost", "Running total"),
         "rows": list(zip([day["day"] for day in daily],
                          [count(day["requests"]) for day in daily],
                          column([day["cost_usd"] for day in daily]),
                          column([day["cumulative_usd"] for day in daily])))},
        {"title": "Refused calls (who hits their limits)", "id": "refused",
         "headings": ("User", "Project", "Reason", "Refused"),
         "empty": "No calls were refused in this range.",
         "rows": [(row["user"] or "(no user)", row["project"],
                   REFUSAL_REASONS.get(row["reason"], row["reason"]), count(row["refused"]))
                  for row in report["refused"]]},
    ]


# How /reports and /admin name the codes of refused calls.
REFUSAL_REASONS = {"budget_exceeded": "limit reached", "rate_limit_exceeded": "rate limit",
                   "route_not_allowed": "route not allowed", "model_not_allowed":
                   "model not allowed", "model_not_priced": "model has no price",
                   "key_revoked": "revoked key", "key_expired": "expired key",
                   "project_deleted": "project deleted", "plan_not_allowed": "plan not allowed",
                   "user_required": "no user named"}


def page_reports(state, session):
    """GET /reports?start=&end=: charts and tables of cost over a UTC date range."""
    if not session.signed_in:
        _redirect_to_login()
    _require_reports(session)
    start, end = report_range(bottle.request.query, state.config.clock())
    report = report_data(state.database(), start, end)
    return render_page(REPORTS_PAGE, title="Reports", session=session,
                       scripts=_chart_scripts(state), start=start, end=end,
                       totals=report["totals"], by_user=report["by_user"],
                       charts=report_charts(report), tables=report_tables(report))


def reports_data(state, session):
    """GET /reports/data?start=&end=: the report's figures as JSON."""
    _require_reports(session)
    start, end = report_range(bottle.request.query, state.config.clock())
    return report_data(state.database(), start, end)


def reports_csv(state, session):
    """GET /reports/data.csv?start=&end=: the daily rollup by user, project and model."""
    _require_reports(session)
    start, end = report_range(bottle.request.query, state.config.clock())
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(REPORT_CSV_COLUMNS)
    for row in iter_usage_daily(state.database(), start, end):
        writer.writerow((row[0], _csv_text(row[1]), _csv_text(row[2]), _csv_text(row[3]),
                         row[4], row[5], row[6], row[7], f"{row[8] / 1e9:.9f}", row[9]))
    bottle.response.content_type = "text/csv; charset=utf-8"
    bottle.response.set_header("Content-Disposition",
                               f'attachment; filename="llimit-report-{start}-{end}.csv"')
    return buffer.getvalue()


def _csv_text(value):
    # Names are typed by users and model names come from upstreams: a leading = + - @
    # (or tab, CR) would be a formula in a spreadsheet, so it gets a ' as OWASP advises.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


# --- the admin dashboard ----------------------------------------------------------------

def page_admin(state, session):
    """GET /admin: totals, projects, users, keys, limits and prices."""
    _require_admin_page(session)
    return _render_admin(state, session,
                         notice=ADMIN_NOTICES.get(bottle.request.query.get("done")))


def page_admin_post(state, session, form):
    """POST /admin: one change from a dashboard form, named by its `action` field.

    A refused change (a bad amount, an unknown user) shows the page again with
    the reason at its form and what was typed still in it.
    """
    _require_admin_page(session)
    action = ADMIN_ACTIONS.get(form.get("action"))
    if action is None:
        raise LlimitError(400, "invalid_request_error", "Unknown admin action.")
    try:
        return action(state, session, form)
    except LlimitError as error:
        if error.status not in (400, 404, 409):
            raise
        bottle.response.status = error.status
        return _render_admin(state, session, form=form, form_error=error.message)


def _render_admin(state, session, notice=None, form=None, form_error=None):
    db = state.database()
    now = state.config.clock()
    today = _utc_day(now)
    month_start = _utc_day(window_bounds("month", now)[0])
    today_total = get_counter(db, SUBJECT_ALL, today, today)
    month_total = get_counter(db, SUBJECT_ALL, month_start, today)
    limit_rows = [_limit_row(state.limits.status(db, row)) for row in list_limits(db)
                  if row["scope"] != "plan"]
    members = collections.Counter(row["plan_id"] for row in list_user_plans(db))
    plans = [{**plan, "members": members[plan["id"]], "limits": [
        {**limit, "text": limit_in_words(limit)} for limit in plan["limits"]]}
        for plan in (plan_to_json(db, row, now) for row in list_plans(db))]
    projects = []
    for row in list_projects(db):
        project = project_to_json(row, state.config)
        project["limits"] = [limit for limit in limit_rows
                             if limit["status"]["scope"] == "project"
                             and limit["status"]["target"] == row["id"]]
        projects.append(project)
    key_rows = list_keys(db)
    spend = key_spend(db, [row["id"] for row in key_rows])
    keys = [key_to_json(row, spend.get(row["id"])) for row in key_rows]
    book = state.pricebook
    prices = [{"model": model, **{field: price.get(field) for field in PRICE_FIELDS},
               "source": "set here" if model in book.overrides else "pricing.json"}
              for model, price in sorted(book.table().items())]
    new_key_html = _new_key_shown(state, session)
    refused = form.get("action") if form_error else None

    def typed(action, field, default=""):
        return form.get(field, default) if refused == action else default

    def error_for(action):
        return (f'<p class="error" role="alert">{html.escape(form_error)}</p>'
                if refused == action else "")
    return render_page(
        ADMIN_PAGE, title="Admin", session=session, scripts=[{"src": PAGES_SCRIPT_URL}],
        notice=notice, new_key=bool(new_key_html), new_key_html=new_key_html,
        form_error=form_error and {"message": form_error,
                                   "anchor": ADMIN_ANCHORS.get(refused, "")},
        typed=typed, error_for=error_for, key_table=key_table(session, keys, admin=True),
        today_usd=nusd_to_usd(today_total.cost_nusd), today_requests=today_total.requests,
        month_usd=nusd_to_usd(month_total.cost_nusd), month_requests=month_total.requests,
        active_keys=sum(key["active"] for key in keys), projects=projects,
        users=_admin_users(db, keys, month_start, today), keys=keys, limits=limit_rows,
        missing=missing_prices(db, book), prices=prices, upstream_kinds=UPSTREAM_KINDS,
        budget_windows=BUDGET_WINDOWS, scopes=SCOPES, metrics=LIMIT_METRICS,
        windows=WINDOWS + ROLLING_EXAMPLES, plans=plans, default_plan=state.config.default_plan,
        refused_calls=refused_report(db, _utc_day(now - DEFAULT_REPORT_DAYS * 86400), today),
        refused_days=DEFAULT_REPORT_DAYS, reasons=REFUSAL_REASONS)


def _admin_users(db, keys, month_start, today):
    month = {row["user"]: row for row in usage_report(db, "user", month_start, today)["rows"]
             if row["user"]}
    lifetime = {user: cost for user, _, _, cost in list_user_totals(db)}
    active = {}
    for key in keys:
        if key["user"]:
            active[key["user"]] = active.get(key["user"], 0) + int(key["active"])
    names = sorted(set(month) | set(lifetime) | set(active),
                   key=lambda name: (-lifetime.get(name, 0), name))
    return [{"user": name, "active_keys": active.get(name, 0),
             "month_requests": month[name]["requests"] if name in month else 0,
             "month_usd": month[name]["cost_usd"] if name in month else 0.0,
             "total_usd": nusd_to_usd(lifetime.get(name, 0))} for name in names]


def _admin_done(notice, anchor):
    raise see_other(f"/admin?done={notice}#{anchor}")


def _admin_create_project(state, session, form):
    data = _project_form(form)
    data["id"] = form.get("id", "").strip()
    create_project(state.database(), data, utc_iso(state.config.clock()),
                   state.config.upstream_env_pattern)
    _admin_done("project_created", "projects")


def _admin_update_project(state, session, form):
    data = _project_form(form)
    if form.get("clear_upstream_key"):
        data["upstream_key"] = None
    change_project(state.database(), form.get("id", ""), data, utc_iso(state.config.clock()),
                   state.config.upstream_env_pattern)
    _admin_done("project_saved", "projects")


def _project_form(form):
    # The upstream key is write-only: a blank field keeps the one stored.
    data = {field: form.get(field, "").strip() or None
            for field in ("name", "upstream_url", "api_version", "limit_message")}
    data["allow_user_keys"] = form.get("allow_user_keys") == "1"
    data["allow_async"] = form.get("allow_async") == "1"
    if "plans_allowed" in form:
        data["plans_allowed"] = [part.strip() for part in form["plans_allowed"].split(",")
                                 if part.strip()]
    if "max_keys_per_user" in form:
        cap = form.get("max_keys_per_user", "").strip()
        data["max_keys_per_user"] = int(cap) if cap.isascii() and cap.isdigit() \
            else (cap or None)
    for field in ("upstream_kind", "upstream_key"):
        if form.get(field, "").strip():
            data[field] = form[field].strip()
    if form.get("budget_usd", "").strip():
        data["budget"] = {"usd": _form_number(form, "budget_usd"),
                          "window": form.get("budget_window") or "month"}
    return data


def _admin_create_key(state, session, form):
    fields = validate_key_fields(
        {"user": form.get("user", "").strip() or None, "project": form.get("project") or "default",
         "note": form.get("note", "").strip() or None,
         "expires_at": form.get("expires_at") or None},
        ("user", "project", "note", "expires_at"), state.user_domains)
    db = state.database()
    with transaction(db):
        row, raw_key = create_key(db, state.config.clock(), fields["user"], fields["project"],
                                  fields["note"], fields["expires_at"])
    log.info("admin page: created key %s for %s in project %s", row["id"],
             row["user_name"] or "(project)", row["project_id"])
    _show_new_key_once(state, session, row, raw_key, "/admin")


def _admin_revoke_key(state, session, form):
    db = state.database()
    key_id = form.get("key_id", "")
    with transaction(db):
        row = _must_exist(get_key(db, key_id), "key", key_id)
        if form.get("confirm") != "1":
            return _confirm_revoke(session, row, "/admin",
                                   (("action", "revoke_key"), ("key_id", key_id)), "/admin#keys")
        revoke_key(db, key_id, utc_iso(state.config.clock()))
    _admin_done("key_revoked", "keys")


def _admin_create_limit(state, session, form):
    data = {"scope": form.get("scope"), "metric": form.get("metric"),
            "window": form.get("window"), "action": form.get("limit_action") or "block",
            "amount": _form_number(form, "amount"),
            "target": form.get("target", "").strip() or None,
            "each": form.get("each") or None}
    if form.get("alert_at", "").strip():
        data["alert_at"] = [_number(part, "alert_at") for part in form["alert_at"].split(",")
                            if part.strip()]
    limit = validate_limit(data, domains=state.user_domains)
    db = state.database()
    with transaction(db):
        add_limit(db, limit, utc_iso(state.config.clock()))
    _admin_done("limit_created", "limits")


def _admin_delete_limit(state, session, form):
    db = state.database()
    limit_id = form.get("limit_id", "")
    with transaction(db):
        _must_exist(get_limit(db, limit_id), "limit", limit_id)
        delete_limit(db, limit_id)
    _admin_done("limit_deleted", "limits")


def _admin_reset_limit(state, session, form):
    db = state.database()
    limit_id = form.get("limit_id", "")
    with transaction(db):
        reset_limit(db, _must_exist(get_limit(db, limit_id), "limit", limit_id),
                    utc_iso(state.config.clock()))
    _admin_done("limit_reset", "limits")


def _admin_create_plan(state, session, form):
    data = {"id": form.get("id", "").strip(), "limits": [
        parse_plan_limit(line) for line in form.get("limits", "").splitlines() if line.strip()]}
    if form.get("name", "").strip():
        data["name"] = form["name"].strip()
    create_plan(state.database(), data, utc_iso(state.config.clock()))
    _admin_done("plan_created", "plans")


def _admin_delete_plan(state, session, form):
    remove_plan(state.database(), form.get("plan_id", ""))
    _admin_done("plan_deleted", "plans")


def _admin_assign_plan(state, session, form):
    user_name = canonical_user_name(form.get("user", ""), state.user_domains)
    if not user_name:
        raise _field_error("user", "must be a user name")
    assign_plan(state.database(), user_name, form.get("plan") or None,
                utc_iso(state.config.clock()))
    _admin_done("plan_assigned", "plans")


def _admin_set_price(state, session, form):
    price = {field: _form_number(form, field) for field in PRICE_FIELDS
             if form.get(field, "").strip()}
    save_price(state.database(), form.get("model", "").strip(), price,
               utc_iso(state.config.clock()))
    state.reload_prices()
    _admin_done("price_set", "prices")


ADMIN_ANCHORS = {"create_project": "projects", "update_project": "projects",
                 "create_key": "keys", "create_limit": "limits", "set_price": "prices",
                 "create_plan": "plans", "assign_plan": "plans"}
ADMIN_ACTIONS = {
    "create_project": _admin_create_project, "update_project": _admin_update_project,
    "create_key": _admin_create_key, "revoke_key": _admin_revoke_key,
    "create_limit": _admin_create_limit, "delete_limit": _admin_delete_limit,
    "reset_limit": _admin_reset_limit, "create_plan": _admin_create_plan,
    "delete_plan": _admin_delete_plan, "assign_plan": _admin_assign_plan,
    "set_price": _admin_set_price,
}


def _form_number(form, field):
    return _number(form.get(field, ""), field)


def _number(text, field):
    try:
        value = float(text.strip())
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise _field_error(field, "must be a number")
    return value


# --- static files ------------------------------------------------------------------

def static_pages_script(state):
    """GET /static/llimit.js: the pages' copy buttons, confirmations and charts."""
    bottle.response.content_type = "text/javascript; charset=utf-8"
    bottle.response.set_header("Cache-Control", STATIC_CACHE_CONTROL)
    return PAGES_SCRIPT_JS


def static_pages_css(state):
    """GET /static/llimit.css: the pages' style sheet."""
    bottle.response.content_type = "text/css; charset=utf-8"
    bottle.response.set_header("Cache-Control", STATIC_CACHE_CONTROL)
    return PAGES_CSS


def static_chartjs(state):
    """GET /static/chart.umd.js: the local Chart.js (LLIMIT_CHARTJS, or vendor/ beside llimit.py)."""
    path = state.chartjs_path
    if not path:
        raise LlimitError(404, "invalid_request_error",
                          "No local Chart.js here; the pages load it from a CDN.")
    path = os.path.abspath(path)
    response = bottle.static_file(os.path.basename(path), root=os.path.dirname(path),
                                  mimetype="text/javascript", charset="utf-8")
    response.set_header("Cache-Control", "public, max-age=86400")
    return response


# =============================================================================
# 11. Admin API and /llimit/me
#    JSON over HTTP for scripts and curl, behind the admin token; and what a
#    key holder may ask about their own key. Every change goes through the
#    validators of the section that owns the thing (limits 4, keys and
#    projects 6) and the storage functions of section 2.
# =============================================================================

ADMIN_BODY_MAX_BYTES = 1024 * 1024


def admin(handler):
    """An admin API handler behind the admin token: 401 before it runs, without it."""
    @functools.wraps(handler)
    def guarded(state, **url_args):
        require_admin(state)
        return handler(state, **url_args)
    return guarded


def _json_input():
    body = read_body(bottle.request.environ, ADMIN_BODY_MAX_BYTES)
    try:
        # NaN and Infinity are no JSON, though Python reads them: refuse them here.
        # No body is {}; a body of only whitespace is broken JSON, as the fuzzer says.
        data = json.loads(body, parse_constant=_no_constant) if body else {}
    except RecursionError:
        raise LlimitError(400, "invalid_request_error", "The body is nested too deep.",
                          code="invalid_json") from None
    except ValueError as error:
        raise LlimitError(400, "invalid_request_error", f"The body is not valid JSON: {error}.",
                          code="invalid_json") from None
    if not isinstance(data, dict):
        raise LlimitError(400, "invalid_request_error", "The body must be a JSON object.")
    try:  # a lone surrogate escape (\\ud800) reads, but no database can store it
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise LlimitError(400, "invalid_request_error", "The body has a lone surrogate"
                          " escape (\\ud800-\\udfff); strings must be Unicode text.",
                          code="invalid_json") from None
    return data


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON value")


def _created(payload):
    bottle.response.status = 201
    return payload


def admin_keys_create(state):
    """POST /admin/keys: issue a key; the secret is in this answer only."""
    fields = validate_key_fields(_json_input(),
                                 ("user", "project", "note", "expires_at", "models"),
                                 state.user_domains)
    db = state.database()
    with transaction(db):
        row, raw_key = create_key(db, state.config.clock(), fields.get("user"),
                                  fields.get("project") or "default", fields.get("note"),
                                  fields.get("expires_at"), fields.get("models"))
    return _created({**key_to_json(row), "key": raw_key})


def admin_keys_list(state):
    """GET /admin/keys?user=&project=&active=true"""
    query = bottle.request.query
    active = query.get("active", "").lower()
    if active not in ("", "1", "true", "yes", "0", "false", "no"):
        raise _field_error("active", "must be true or false")  # found by the fuzzer
    db = state.database()
    rows = list_keys(db, _user_filter(state, query), _query_text(query, "project") or None,
                     utc_iso(state.config.clock()) if active in ("1", "true", "yes") else None)
    if active in ("0", "false", "no"):
        rows = [row for row in rows if row["revoked_at"] or
                (row["expires_at"] and row["expires_at"] <= utc_iso(state.config.clock()))]
    spend = key_spend(db, [row["id"] for row in rows])
    return {"data": [key_to_json(row, spend.get(row["id"])) for row in rows]}


def admin_key_get(state, key_id):
    """GET /admin/keys/<id>"""
    db = state.database()
    row = _must_exist(get_key(db, key_id), "key", key_id)
    return key_to_json(row, key_spend(db, [key_id]).get(key_id))


def admin_key_update(state, key_id):
    """PATCH /admin/keys/<id>: note, expires_at, models, user."""
    fields = validate_key_fields(_json_input(), ("note", "expires_at", "models", "user"),
                                 state.user_domains)
    db = state.database()
    with transaction(db):
        row = dict(_must_exist(get_key(db, key_id), "key", key_id))
        row.update({("user_name" if name == "user" else name): value
                    for name, value in fields.items()})
        update_key(db, row)
    return admin_key_get(state, key_id)


def admin_key_revoke(state, key_id):
    """POST /admin/keys/<id>/revoke: the key's next call gets 403."""
    db = state.database()
    with transaction(db):
        _must_exist(get_key(db, key_id), "key", key_id)
        revoke_key(db, key_id, utc_iso(state.config.clock()))
    return admin_key_get(state, key_id)


def admin_projects_list(state):
    """GET /admin/projects"""
    return {"data": [project_to_json(row, state.config)
                     for row in list_projects(state.database())]}


def admin_projects_create(state):
    """POST /admin/projects, with an optional `budget` shorthand that becomes limits."""
    project = create_project(state.database(), _json_input(), utc_iso(state.config.clock()),
                             state.config.upstream_env_pattern)
    return _created(admin_project_get(state, project["id"]))


def admin_project_get(state, project_id):
    """GET /admin/projects/<id>, with the limits that target it."""
    db = state.database()
    project = project_to_json(_must_exist(get_project(db, project_id), "project", project_id),
                              state.config)
    project["limits"] = [state.limits.status(db, row) for row in list_limits(db)
                         if row["scope"] == "project" and row["target"] == project_id]
    return project


def admin_project_update(state, project_id):
    """PATCH /admin/projects/<id>"""
    change_project(state.database(), project_id, _json_input(), utc_iso(state.config.clock()),
                   state.config.upstream_env_pattern)
    return admin_project_get(state, project_id)


def admin_project_delete(state, project_id):
    """DELETE /admin/projects/<id>: its keys are revoked, its usage history stays."""
    if project_id == "default":
        raise LlimitError(400, "invalid_request_error", "The default project always exists.")
    db = state.database()
    with transaction(db):
        _must_exist(get_project(db, project_id), "project", project_id)
        delete_project(db, project_id, utc_iso(state.config.clock()))
    return {"id": project_id, "deleted": True}


def admin_limits_list(state):
    """GET /admin/limits (a plan's limits are listed with the plan)"""
    db = state.database()
    return {"data": [state.limits.status(db, row) for row in list_limits(db)
                     if row["scope"] != "plan"]}


def admin_limits_create(state):
    """POST /admin/limits"""
    limit = validate_limit(_json_input(), domains=state.user_domains)
    db = state.database()
    with transaction(db):
        limit_id = add_limit(db, limit, utc_iso(state.config.clock()))
    return _created(admin_limit_get(state, limit_id))


def admin_limit_get(state, limit_id):
    """GET /admin/limits/<id>"""
    db = state.database()
    return state.limits.status(db, _must_exist(get_limit(db, limit_id), "limit", limit_id))


def admin_limit_update(state, limit_id):
    """PATCH /admin/limits/<id>: takes effect on the next call."""
    data = _json_input()
    db = state.database()
    with transaction(db):
        current = dict(_must_exist(get_limit(db, limit_id), "limit", limit_id))
        _not_in_plan(current)
        update_limit(db, validate_limit(data, current, state.user_domains))
    return admin_limit_get(state, limit_id)


def admin_limit_delete(state, limit_id):
    """DELETE /admin/limits/<id>"""
    db = state.database()
    with transaction(db):
        _not_in_plan(_must_exist(get_limit(db, limit_id), "limit", limit_id))
        delete_limit(db, limit_id)
    return {"id": limit_id, "deleted": True}


def _not_in_plan(limit):
    if limit["scope"] == "plan":
        raise LlimitError(400, "invalid_request_error",
                          f"The limit {limit['id']} belongs to the plan {limit['target']};"
                          f" change it with PATCH /admin/plans/{limit['target']}.",
                          code="limit_in_plan")


def admin_limit_reset(state, limit_id):
    """POST /admin/limits/<id>/reset: its current period starts now; history stays."""
    db = state.database()
    with transaction(db):
        reset_limit(db, _must_exist(get_limit(db, limit_id), "limit", limit_id),
                    utc_iso(state.config.clock()))
    return admin_limit_get(state, limit_id)


def admin_plans_list(state):
    """GET /admin/plans"""
    db = state.database()
    now = state.config.clock()
    return {"data": [plan_to_json(db, plan, now) for plan in list_plans(db)]}


def admin_plans_create(state):
    """POST /admin/plans"""
    plan_id = create_plan(state.database(), _json_input(), utc_iso(state.config.clock()))
    return _created(admin_plan_get(state, plan_id))


def admin_plan_get(state, plan_id):
    """GET /admin/plans/<id>"""
    db = state.database()
    return plan_to_json(db, _must_exist(get_plan(db, plan_id), "plan", plan_id),
                        state.config.clock())


def admin_plan_update(state, plan_id):
    """PATCH /admin/plans/<id>: takes effect on the next call."""
    change_plan(state.database(), plan_id, _json_input(), utc_iso(state.config.clock()))
    return admin_plan_get(state, plan_id)


def admin_plan_delete(state, plan_id):
    """DELETE /admin/plans/<id>: its members fall back to the default plan."""
    remove_plan(state.database(), plan_id)
    return {"id": plan_id, "deleted": True}


USER_FIELDS = {"plan": Field({"type": "string", "nullable": True, "pattern": PLAN_ID},
                             "must be a plan id, or null for the default plan")}


def admin_user_get(state, user_name):
    """GET /admin/users/<user>: the user's plan and its limits, with their own use."""
    db = state.database()
    user_name = _user_name_input(state, user_name)
    row = get_user_plan(db, user_name)
    plan_id = state.limits.plan_of(db, config_version(db), user_name, state.config.default_plan)
    subject = subject_of("user", user_name)
    limits = []
    for limit in state.limits.for_call(db, config_version(db), None, user_name, None, plan_id):
        if limit["scope"] == "plan":
            used, end = state.limits.used(db, limit, subject)
            limits.append(limit_to_json(limit, used, end))
    return {"user": user_name, "plan": plan_id,
            "plan_source": row["source"] if row else "default" if plan_id else None,
            "limits": limits}


def admin_user_put(state, user_name):
    """PUT /admin/users/<user> {"plan": id or null}: put a user on a plan (null: the default)."""
    data = _json_input()
    check_input(data, USER_FIELDS, "user")
    if "plan" not in data:
        raise _field_error("plan", "is required: a plan id, or null for the default plan")
    user_name = _user_name_input(state, user_name)
    assign_plan(state.database(), user_name, data["plan"], utc_iso(state.config.clock()))
    return admin_user_get(state, user_name)


def _user_name_input(state, raw):
    user_name = canonical_user_name(raw, state.user_domains)
    if not user_name:
        raise _field_error("user", "must be a user name")
    return user_name


def admin_usage(state):
    """GET /admin/usage?start=&end=&group_by=user|key|project|model|day"""
    query = bottle.request.query
    start, end = report_range(query, state.config.clock())
    return usage_report(state.database(), query.get("group_by") or "user", start, end,
                        _user_filter(state, query))


def _query_text(query, name):
    # A query parameter as the UTF-8 it is sent in (bottle's .get() reads it as
    # latin-1); one that is not UTF-8 stays as read, so it matches no name.
    return query.getunicode(name, default=query.get(name))


def _user_filter(state, query):
    # ?user= read as UTF-8 and under the Identity rule, as stored names are. A name
    # the rule leaves nothing of filters to no one (no stored name holds a DEL),
    # never to everyone.
    raw = _query_text(query, "user")
    if not raw:
        return None
    return canonical_user_name(raw, state.user_domains) or "\x7f"


USAGE_CSV_COLUMNS = (
    "created_at", "key_id", "user", "project", "model", "endpoint", "status_code", "stream",
    "prompt_tokens", "cached_tokens", "cache_write_tokens", "completion_tokens",
    "reasoning_tokens", "cost_usd", "pricing", "price_input", "price_cached_input",
    "price_output", "price_cache_write", "latency_ms", "overhead_ms")


def admin_usage_csv(state):
    """GET /admin/usage.csv?start=&end=: the raw events of the range, streamed."""
    start, end = report_range(bottle.request.query, state.config.clock())
    start_ms = int(dt.datetime.fromisoformat(start).replace(tzinfo=UTC).timestamp() * 1000)
    end_ms = int((dt.datetime.fromisoformat(end).replace(tzinfo=UTC)
                  + dt.timedelta(days=1)).timestamp() * 1000)
    bottle.response.content_type = "text/csv; charset=utf-8"
    bottle.response.set_header("Content-Disposition",
                               f'attachment; filename="llimit-usage-{start}-{end}.csv"')
    return _usage_csv_lines(state.database, start_ms, end_ms)


def _usage_csv_lines(database, start_ms, end_ms):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(USAGE_CSV_COLUMNS)
    for row in iter_usage_events(database(), start_ms, end_ms):
        writer.writerow((
            _iso_from_ms(row["created_ms"]), row["key_id"], _csv_text(row["user_name"]),
            _csv_text(row["project_id"]), _csv_text(row["model"]),
            _csv_text(row["endpoint"]), row["status_code"],
            row["stream"], row["prompt_tokens"], row["cached_tokens"],
            row["cache_write_tokens"], row["completion_tokens"], row["reasoning_tokens"],
            "" if row["cost_nusd"] is None else f"{row['cost_nusd'] / 1e9:.9f}",
            row["pricing"], row["price_input"], row["price_cached_input"],
            row["price_output"], row["price_cache_write"], row["latency_ms"],
            row["overhead_ms"]))
        if buffer.tell() > 65536:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode()


def admin_pricing_list(state):
    """GET /admin/pricing: prices in force, and models seen without one."""
    book = state.pricebook
    models = {model: {**price, "source": "override" if model in book.overrides else "file"}
              for model, price in sorted(book.table().items())}
    return {"models": models, "missing": missing_prices(state.database(), book)}


def admin_pricing_put(state, model):
    """PUT /admin/pricing/<model>: set a model's USD per 1M tokens (kept in the database)."""
    price = _json_input()
    save_price(state.database(), model, price, utc_iso(state.config.clock()))
    state.reload_prices()
    return {"model": model, **{f: price.get(f) for f in PRICE_FIELDS if f in price}}


def admin_reprice(state):
    """POST /admin/reprice: recompute stored costs from current prices."""
    return reprice_all(state)


def llimit_me(state):
    """GET /llimit/me: the caller's key, user, project and every limit that applies."""
    db = state.database()
    environ = bottle.request.environ
    key = authenticate_call(state, environ)
    user_name = key["user_name"] or end_user(environ, {}, state.config.user_headers,
                                             state.user_domains)
    plan_id = call_plan(state, db, key, environ, user_name)
    limits = [status for _, status in
              state.limits.statuses_for_call(db, key["project_id"], user_name, key["id"],
                                             plan_id)]
    # Spend is the user's (every key), or this key's for a project key naming no one.
    subject = subject_of("user", user_name) if user_name else subject_of("key", key["id"])
    now = state.config.clock()
    today, month_start = _utc_day(now), _utc_day(window_bounds("month", now)[0])
    return {"user": user_name, "project": key["project_id"], "key": key["masked_key"],
            "key_id": key["id"], "plan": plan_id, "limits": limits,
            "spend": {"today_usd": nusd_to_usd(get_counter(db, subject, today, today).cost_nusd),
                      "month_usd": nusd_to_usd(
                          get_counter(db, subject, month_start, today).cost_nusd)}}


def _openapi_spec(upstream_env_pattern):
    # Every rule the validators apply is written here too, so a client (or a
    # fuzzer) that keeps to this spec is never refused with a 400.
    string, nullable_string = {"type": "string"}, NULLABLE_STRING
    error = {"description": "an error in OpenAI's shape",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    def schemas(fields, *names):
        return {name: fields[name].schema for name in names or fields}

    models = KEY_FIELDS["models"].schema
    key_patch = {"type": "object", "additionalProperties": False,
                 "properties": schemas(KEY_FIELDS, "user", "note", "models", "expires_at")}
    key_input = {**key_patch, "properties": schemas(KEY_FIELDS)}
    amount, alert_at = AMOUNT, ALERT_AT
    limit_fields = schemas(LIMIT_FIELDS)
    limit_patch = {"type": "object", "additionalProperties": False, "properties": limit_fields}

    def limit_of_scope(scope, each):
        target = nullable_string if scope == "global" else {"type": "string", "minLength": 1}
        if scope == "user":  # a name the Identity rule leaves something of
            target = {**target, "pattern": r"[\s\S]*[^\s\x00-\x1f\x7f-\x9f][\s\S]*"}
        return {"type": "object", "additionalProperties": False,
                "required": ["scope", "metric", "window", "amount"] + (
                    [] if scope == "global" else ["target"]),
                "properties": {**limit_fields, "scope": {"type": "string", "enum": [scope]},
                               "target": target,
                               "each": {"type": "string", "enum": [*each, None],
                                        "nullable": True}}}
    # A key limit has no `each`; a user limit can only apply to each key.
    limit_input = {"oneOf": [limit_of_scope("global", ["user", "key"]),
                             limit_of_scope("project", ["user", "key"]),
                             limit_of_scope("user", ["key"]), limit_of_scope("key", [])]}
    plan_limit_fields = schemas(PLAN_LIMIT_FIELDS)
    new_plan_limit = {"type": "object", "additionalProperties": False,
                      "required": ["metric", "window", "amount"],
                      "properties": {k: v for k, v in plan_limit_fields.items() if k != "id"}}
    # In a PATCH, an item with the id of one of the plan's limits changes it.
    kept_plan_limit = {"type": "object", "additionalProperties": False, "required": ["id"],
                       "properties": plan_limit_fields}
    plan_fields = schemas(PLAN_FIELDS)
    plan_patch = {"type": "object", "additionalProperties": False, "properties": {
        **plan_fields, "limits": {"type": "array", "items": {
            "oneOf": [new_plan_limit, kept_plan_limit]}}}}
    plan_input = {"type": "object", "additionalProperties": False, "required": ["id"],
                  "properties": {**plan_fields, "limits": {"type": "array",
                                                           "items": new_plan_limit}}}
    user_input = {"type": "object", "additionalProperties": False, "required": ["plan"],
                  "properties": schemas(USER_FIELDS)}

    def budget_of(metric):
        return {"type": "object", "additionalProperties": False, "required": [metric],
                "properties": {metric: amount, "window": limit_fields["window"],
                               "action": limit_fields["action"],
                               "each": limit_fields["each"], "alert_at": alert_at,
                               "note": nullable_string}}
    budget = {"oneOf": [budget_of(metric) for metric in LIMIT_METRICS]}
    project_fields = {**schemas(PROJECT_FIELDS), "budget": {
        **PROJECT_FIELDS["budget"].schema, "oneOf": [budget, {"type": "array", "items": budget}]},
        "upstream_key": {**PROJECT_FIELDS["upstream_key"].schema,
                         "pattern": upstream_key_pattern(upstream_env_pattern)}}
    project_patch = {"type": "object", "additionalProperties": False,
                     "properties": project_fields}
    # Kinds other than openai need their own upstream_url, and so does a project's own key.
    without_key = {k: v for k, v in project_fields.items() if k != "upstream_key"}
    project_input = {"oneOf": [
        {**project_patch, "required": ["id"], "properties": {
            **without_key, "upstream_kind": {"type": "string", "enum": ["openai"]}}},
        {**project_patch, "required": ["id", "upstream_url", "upstream_key"], "properties": {
            **project_fields, "upstream_kind": {"type": "string", "enum": ["openai"]},
            "upstream_url": {**project_fields["upstream_url"], "nullable": False}}},
        {**project_patch, "required": ["id", "upstream_kind", "upstream_url"], "properties": {
            **project_fields, "upstream_kind": {"type": "string", "enum": ["azure", "anthropic"]},
            "upstream_url": {**project_fields["upstream_url"], "nullable": False}}}]}
    price_input = {"type": "object", "additionalProperties": False,
                   "required": ["input", "output"],
                   "properties": {f: {"type": "number", "minimum": 0, "maximum": MAX_PRICE,
                                      "nullable": f not in ("input", "output")}
                                  for f in PRICE_FIELDS}}

    def op(summary, answer, body=None, params=(), status="200", also=()):
        responses = {status: {"description": "OK", "content": {
            "application/json": {"schema": answer}}}}
        # 429: too many wrong admin tokens from the caller's address.
        for code in ("400", "401", "404", "429", *also):
            responses[code] = error
        operation = {"summary": summary, "security": [{"admin": []}], "responses": responses}
        if body:
            # A body may be left out where every field of it is optional.
            required = "required" in body or "oneOf" in body
            operation["requestBody"] = {"required": required, "content": {
                "application/json": {"schema": body}}}
            responses["413"] = error
        if params:
            operation["parameters"] = list(params)
        return operation

    def ref(name):
        return {"$ref": f"#/components/schemas/{name}"}

    def data_of(name):
        return {"type": "object", "required": ["data"],
                "properties": {"data": {"type": "array", "items": ref(name)}}}

    def record(required, **properties):
        return {"type": "object", "required": list(required), "properties": properties}

    nullable_number = {"type": "number", "nullable": True}
    number, integer = {"type": "number"}, {"type": "integer"}
    key_out = record(
        ("id", "masked_key", "user", "project", "note", "models", "created_at", "expires_at",
         "revoked_at", "last_used_at", "active", "requests", "cost_usd"),
        id=string, masked_key=string, user=nullable_string, project=string,
        note=nullable_string, models={**models, "items": string}, created_at=string,
        expires_at=nullable_string, revoked_at=nullable_string, last_used_at=nullable_string,
        active={"type": "boolean"}, requests=integer, cost_usd=number, key=string)
    plan_limit_out = record(
        ("id", "scope", "target", "each", "metric", "window", "amount", "action", "alert_at",
         "note", "starts_at", "reset_at", "resets_at"),
        id=string, scope={"type": "string", "enum": [*SCOPES, "plan"]}, target=nullable_string,
        each=limit_fields["each"], metric=limit_fields["metric"],
        window=limit_fields["window"], amount=number,
        action=limit_fields["action"], alert_at={"type": "array", "nullable": True,
                                                 "items": number},
        note=nullable_string, starts_at=nullable_string, reset_at=nullable_string,
        resets_at=nullable_string)
    limit_out = {**plan_limit_out, "required": [*plan_limit_out["required"], "used",
                                                "remaining"],
                 "properties": {**plan_limit_out["properties"], "used": number,
                                "remaining": number}}
    plan_out = record(("id", "name", "created_at", "limits"), id=string, name=string,
                      created_at=string, limits={"type": "array", "items": plan_limit_out})
    user_out = record(("user", "plan", "plan_source", "limits"), user=string,
                      plan=nullable_string, plan_source={
                          "type": "string", "nullable": True,
                          "enum": ["admin", "sign-in", "default", None]},
                      limits={"type": "array", "items": ref("Limit")})
    project_out = record(
        ("id", "name", "upstream_kind", "upstream_url", "upstream_url_in_force",
         "upstream_key_set", "upstream_key_source", "api_version", "allow_user_keys",
         "allow_async",
         "limit_message", "model_map", "max_keys_per_user", "plans_allowed", "created_at"),
        id=string, name=string, upstream_kind=project_fields["upstream_kind"],
        upstream_url=nullable_string, upstream_url_in_force=string,
        upstream_key_set={"type": "boolean"},
        upstream_key_source=nullable_string, api_version=nullable_string,
        allow_user_keys={"type": "boolean"}, allow_async={"type": "boolean"},
        limit_message=nullable_string,
        model_map={"type": "object", "nullable": True, "additionalProperties": string},
        max_keys_per_user={"type": "integer", "nullable": True},
        plans_allowed={"type": "array", "items": string},
        created_at=string, limits={"type": "array", "items": ref("Limit")})
    deleted = record(("id", "deleted"), id=string, deleted={"type": "boolean"})
    figures = {name: integer for name in ("requests", "prompt_tokens", "cached_tokens",
                                          "cache_write_tokens", "completion_tokens",
                                          "unpriced_requests")}
    usage_out = record(
        ("start", "end", "group_by", "rows", "totals"), start=string, end=string,
        group_by=string, totals=record(figures, cost_usd=number, **figures),
        rows={"type": "array", "items": record(
            figures, cost_usd=nullable_number, **figures)})
    price_out = {name: nullable_number for name in PRICE_FIELDS}
    # A listed entry is pricing.json's: token prices (absent for a model priced only
    # by the image, minute or character) and the fields beyond them.
    price_table = {"type": "object", "additionalProperties": number}
    beyond_tokens = {**{name: integer for name in SIZE_FIELDS},
                     FINE_TUNED_FIELD: record(("input", "output"), **price_out),
                     "cache_write_1h": number, "per_minute": number, "per_1m_characters": number,
                     "images": price_table, "per_1k_requests": price_table,
                     "long_context": price_table,
                     "service_tiers": {"type": "object", "additionalProperties": price_table}}
    pricing_out = record(("models", "missing"), missing={"type": "array", "items": string},
                         models={"type": "object", "additionalProperties": record(
                             ("source",), source=string, **price_out, **beyond_tokens)})
    price_set = record(("model", "input", "output"), model=string, **price_out)
    repriced = record(("events", "changed"), events=integer, changed=integer)

    def any_case(words):
        return "^(" + "".join(f"[{c.upper()}{c}]" if c.isalpha() else c for c in words) + ")$"

    def path_param(name):
        return {"name": name, "in": "path", "required": True, "schema": string}

    def query(name, schema=None):
        return {"name": name, "in": "query", "required": False, "schema": schema or string}

    date = {"type": "string", "oneOf": [{"format": "date"}, {"maxLength": 0}],
            "description": "a UTC date; empty or absent: the default"}
    dates = (query("start", date), query("end", date))
    by_id = (path_param("id"),)
    # A user name the Identity rule leaves something of.
    user_param = {**path_param("user"), "schema": {
        "type": "string", "pattern": r"[\s\S]*[^\s\x00-\x1f\x7f-\x9f][\s\S]*"}}

    def resource(path, name, lists, creates, changes, deletes=None, filters=(), also=()):
        """The paths of one kind of record: `path` lists and creates, `path/{id}` gets,
        changes and (given a summary) deletes. `creates` and `changes` are (summary, body)."""
        return {
            path: {"get": op(lists, data_of(name), params=filters),
                   "post": op(creates[0], ref(name), creates[1], status="201", also=also)},
            f"{path}/{{id}}": {
                "get": op(f"Get a {name.lower()}", ref(name), params=by_id),
                "patch": op(changes[0], ref(name), changes[1], params=by_id),
                **({"delete": op(deletes, deleted, params=by_id)} if deletes else {})}}

    return {
        "openapi": "3.0.3",
        "info": {"title": "llimit admin API", "version": __version__},
        "components": {
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Key": key_out, "Project": project_out, "Limit": limit_out,
                        "Plan": plan_out, "User": user_out,
                        "Error": {"type": "object", "required": ["error"], "properties": {
                "error": {"type": "object", "required": ["message", "type"], "properties": {
                    "message": string, "type": string, "code": nullable_string,
                    "param": nullable_string}}}}}},
        "paths": {
            **resource("/admin/keys", "Key", "List keys",
                       ("Create a key; the secret is returned once", key_input),
                       ("Change a key", key_patch), filters=(
                           query("user"), query("project"), query("active", {
                               "type": "string",
                               "pattern": any_case("true|false|1|0|yes|no|")}))),
            "/admin/keys/{id}/revoke": {"post": op("Revoke a key", ref("Key"), params=by_id)},
            **resource("/admin/projects", "Project", "List projects",
                       ("Create a project", project_input), ("Change a project", project_patch),
                       "Delete a project (its keys are revoked)", also=("409",)),
            **resource("/admin/limits", "Limit", "List limits with used and resets_at",
                       ("Create a limit", limit_input), ("Change a limit", limit_patch),
                       "Delete a limit"),
            "/admin/limits/{id}/reset": {"post": op(
                "Start the limit's current period now (history stays)", ref("Limit"),
                params=by_id)},
            **resource("/admin/plans", "Plan", "List plans", ("Create a plan", plan_input),
                       ("Rename a plan or replace its limits", plan_patch),
                       "Delete a plan (its members fall back to the default)", also=("409",)),
            "/admin/users/{user}": {
                "get": op("A user's plan and its limits", ref("User"), params=(user_param,)),
                "put": op("Put a user on a plan (null: the default plan)", ref("User"),
                          user_input, params=(user_param,))},
            "/admin/usage": {"get": op("Usage and cost per group", usage_out, params=(
                *dates, query("user"),
                query("group_by", {"type": "string", "enum": [*USAGE_GROUP_COLUMNS, ""],
                                   "description": "empty or absent: user"})))},
            "/admin/usage.csv": {"get": {**op("Raw usage events as CSV", string, params=dates),
                                         "responses": {"200": {"description": "CSV", "content": {
                                             "text/csv": {"schema": string}}},
                                             "400": error, "401": error, "429": error}}},
            "/admin/pricing": {"get": op("Prices in force and models without one", pricing_out)},
            "/admin/pricing/{model}": {"put": op("Set a model's price", price_set, price_input,
                                                 params=(path_param("model"),))},
            "/admin/reprice": {"post": op("Recompute stored costs from current prices", repriced)},
        },
    }


def admin_openapi(state):
    """GET /admin/openapi.json: this API, described (open, so tools can read it)."""
    return state.openapi


# =============================================================================
# 12. Operations
#    /healthz for load balancers and Docker, /metrics for Prometheus, and
#    `Metrics`, the in-process counters behind it.
# =============================================================================

LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                      120000)


METRICS_MAX_MODELS = 200


class Metrics:
    """In-process counters behind /metrics (Prometheus text format); thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.calls = {}            # (project, model, status) -> count
        self.tokens = {}           # (project, model, kind) -> count
        self.cost_nusd = {}        # (project, model) -> nano-dollars
        self.latency = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.latency_sum_ms = 0.0
        self.latency_count = 0
        self.rejections = {}       # error type -> count
        self.models = set()        # model label values in use, at most METRICS_MAX_MODELS

    def observe_call(self, event, upstream_ms):
        """Count one metered call."""
        project, model = event.project_id or "", event.model or ""
        with self._lock:
            if model not in self.models:
                # Model names come from clients: past the bound they share one label.
                if len(self.models) < METRICS_MAX_MODELS:
                    self.models.add(model)
                else:
                    model = "other"
            key = (project, model, str(event.status_code))
            self.calls[key] = self.calls.get(key, 0) + 1
            for kind, count in (("prompt", event.prompt_tokens),
                                ("completion", event.completion_tokens),
                                ("cached", event.cached_tokens)):
                self.tokens[(project, model, kind)] = \
                    self.tokens.get((project, model, kind), 0) + count
            self.cost_nusd[(project, model)] = \
                self.cost_nusd.get((project, model), 0) + (event.cost_nusd or 0)
            bucket = next((i for i, edge in enumerate(LATENCY_BUCKETS_MS) if upstream_ms <= edge),
                          len(LATENCY_BUCKETS_MS))
            self.latency[bucket] += 1
            self.latency_sum_ms += upstream_ms
            self.latency_count += 1

    def observe_rejection(self, error_type):
        """Count a call llimit refused itself (limits, keys)."""
        with self._lock:
            self.rejections[error_type] = self.rejections.get(error_type, 0) + 1


def ops_healthz(state):
    """GET /healthz: 200 when the database answers and usage can be written, 503 otherwise
    (proxied calls are then refused: a load balancer sends them elsewhere)."""
    try:
        ping(state.database())
    except DatabaseError:
        log.exception("health check: database does not answer")
        raise LlimitError(503, "service_unavailable", "The database does not answer.",
                          code="ledger_unavailable")
    if not state.writer.healthy:
        raise LlimitError(503, "service_unavailable", "The usage ledger cannot be written"
                          " (the usage writer is retrying).", code="ledger_unavailable")
    return {"status": "ok", "version": __version__, "usage_queue": state.writer.depth(),
            "usage_writer_healthy": state.writer.healthy}


def ops_metrics(state):
    """GET /metrics: Prometheus text format."""
    token = state.config.metrics_token
    if token:
        authorization = bottle.request.environ.get("HTTP_AUTHORIZATION", "")
        if not secrets_match(authorization, f"Bearer {token}"):
            state.auth_throttle.wrong(
                bottle.request.environ.get("REMOTE_ADDR", ""),
                LlimitError(401, "invalid_request_error", "This needs the metrics token."))
    bottle.response.content_type = "text/plain; version=0.0.4; charset=utf-8"
    return render_metrics(state.metrics, len(state.streams), state.writer.depth())


def _label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(metrics, open_streams, queue_depth):
    """The Prometheus exposition text of a Metrics, the open streams and the usage queue."""
    lines = []

    def family(name, kind, help_text, samples):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_label(v)}"' for k, v in labels)
            lines.append(f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}")

    with metrics._lock:
        family("llimit_requests_total", "counter", "Proxied calls by project, model, status.",
               [((("project", p), ("model", m), ("status", s)), n)
                for (p, m, s), n in sorted(metrics.calls.items())])
        family("llimit_tokens_total", "counter", "Tokens by project, model and kind.",
               [((("project", p), ("model", m), ("kind", k)), n)
                for (p, m, k), n in sorted(metrics.tokens.items())])
        family("llimit_cost_usd_total", "counter", "Cost in USD by project and model.",
               [((("project", p), ("model", m)), f"{n / 1e9:.9f}")
                for (p, m), n in sorted(metrics.cost_nusd.items())])
        cumulative, buckets = 0, []
        for edge, count in zip((*LATENCY_BUCKETS_MS, "+Inf"), metrics.latency):
            cumulative += count
            le = "+Inf" if edge == "+Inf" else f"{edge / 1000:g}"
            buckets.append(((("le", le),), cumulative))
        lines.append("# HELP llimit_upstream_latency_seconds Time waiting on the upstream.")
        lines.append("# TYPE llimit_upstream_latency_seconds histogram")
        for labels, value in buckets:
            lines.append(f'llimit_upstream_latency_seconds_bucket{{le="{labels[0][1]}"}} {value}')
        lines.append(f"llimit_upstream_latency_seconds_sum {metrics.latency_sum_ms / 1000:.6f}")
        lines.append(f"llimit_upstream_latency_seconds_count {metrics.latency_count}")
        family("llimit_open_streams", "gauge",
               "Streams open now: relayed, or drained after the client left.",
               [((), open_streams)])
        family("llimit_rejections_total", "counter", "Calls refused by llimit, by error type.",
               [((("type", t),), n) for t, n in sorted(metrics.rejections.items())])
    family("llimit_usage_queue_depth", "gauge", "Usage events waiting to be written.",
           [((), queue_depth)])
    return "\n".join(lines) + "\n"


# =============================================================================
# 13. App assembly
#    `State` holds the long-lived parts of one llimit (database, prices,
#    limits, usage writer, upstream pool); `make_app(config)` builds it and
#    registers every route and error handler, in one list.
# =============================================================================

JSON_PATH_PREFIXES = ("/v1/", "/v1beta/", "/openai/", "/admin/", "/llimit/", "/reports/data", "/healthz",
                      "/metrics")


class State:
    """The parts of a running llimit that outlive a request."""

    def __init__(self, config):
        self.config = config
        self.database = open_database(config.db_path, pool_size=min(config.threads, 16))
        migrate(self.database())
        self.user_domains = user_domains(config)
        apply_identity_rule(self.database(), self.user_domains)
        self.file_prices = load_price_file(config.pricing_path)
        self.pricebook = Pricebook(self.file_prices, list_price_overrides(self.database()))
        self.metrics = Metrics()
        if self.database.engine == "postgres":
            self.limits = SharedLimits(self.database, config.clock, config.reservation_seconds
                                       or config.upstream_timeout + 60)
        else:
            self.limits = Limits(self.database, config.clock)
        # PostgreSQL: a proxied call's one statement checks the config version too.
        self.versions_checked_by_admission = isinstance(self.limits, SharedLimits)
        self.slots = CallSlots(config.max_concurrent_per_key, config.max_concurrent_per_user,
                               config.threads - RESERVED_THREADS)
        self.auth_throttle = AuthThrottle(config.clock)
        self.keys = KeyCache()
        self.alerts = AlertSender(self.database, config.alert_webhook)
        self.writer = UsageWriter(self.database, self.limits.lock, self.limits.count_committed,
                                  self.alerts.record)
        self.pool = UpstreamPool(config.threads, config.connect_timeout, config.upstream_timeout)
        self.streams = OpenStreams()
        self.openapi = _openapi_spec(config.upstream_env_pattern)
        self.oidc = OidcClient(config) if config.auth == "oidc" else None
        if config.chartjs and not os.path.isfile(config.chartjs):
            raise ValueError(f"LLIMIT_CHARTJS names no file: {config.chartjs}")
        self.chartjs_path = chartjs_file(config)
        self.sweeper = AsyncSweeper(self)
        self.generated_admin_token = None
        self.upstream_user_secret = None  # set by make_app, from the database

    def start(self):
        """Start the background threads (usage writer, alert sender); returns self.

        Only a server starts them: building a State has no side effects
        beyond the database, so the same parts serve tests and tools.
        """
        finish_put_off_imports()
        self.writer.start()
        self.alerts.start()
        self.sweeper.start()
        return self

    def reload_prices(self):
        """Take up price overrides changed in the database."""
        self.pricebook = Pricebook(self.file_prices, list_price_overrides(self.database()))

    def close(self):
        """Write all queued usage and close upstream connections; False if usage is left."""
        self.sweeper.stop()
        written = self.writer.close(self.config.writer_close_seconds)
        self.alerts.close()
        self.pool.close()
        self.database.close()
        return written


RESERVED_THREADS = 4  # worker threads proxied calls leave to /healthz and the pages


def _is_json_path(path):
    return path.startswith(JSON_PATH_PREFIXES)


# Statuses a retry cannot change: the client must change the call, the key or the limit.
FINAL_STATUSES = frozenset((400, 401, 403, 404, 405, 413))
# A client whose base URL lacks /v1 asks for these at the root.
API_ROOT_NAMES = frozenset(("chat", "completions", "responses", "messages", "embeddings",
                            "models", "images", "audio", "moderations", "files", "batches"))


def error_response(error, path, as_json=False):
    """A LlimitError as OpenAI's (or Anthropic's) JSON shape on JSON routes, else a page."""
    if as_json or _is_json_path(path):
        environ = bottle.request.environ
        body = (error.gemini_body() if _speaks_gemini(path, environ)
                else error.anthropic_body() if _speaks_anthropic(path, environ)
                else error.body())
        response = bottle.HTTPResponse(json.dumps(body), status=error.status)
        response.content_type = "application/json"
        if error.status in FINAL_STATUSES or error.error_type == "budget_exceeded":
            # compat: the openai and anthropic SDKs (and Claude Code) retry a 429 or
            # any error unless told not to; a spent budget stays spent.
            response.set_header("x-should-retry", "false")
    else:
        response = bottle.HTTPResponse(_error_page(error), status=error.status)
        response.content_type = "text/html; charset=utf-8"
        for name, value in page_headers("'none'").items():
            response.set_header(name, value)
    for name, value in error.headers.items():
        response.set_header(name, value)
    return response


def _speaks_anthropic(path, environ):
    # Anthropic's routes, a call an Anthropic client made (it always sends the
    # version header), or a call of a project whose upstream is Anthropic.
    return (path.startswith("/v1/messages") or environ.get("llimit.dialect") == "anthropic"
            or (path.startswith("/v1/") and "HTTP_ANTHROPIC_VERSION" in environ))


GEMINI_METHOD_PATH = re.compile(r"/v1/models/[^/]+:\w+")


def _speaks_gemini(path, environ):
    # A Gemini project's call; before the key is known, Gemini's own paths
    # (/v1beta/, /v1/models/<model>:<method>) or its key header.
    dialect = environ.get("llimit.dialect")
    if dialect:
        return dialect == "gemini"
    return (path.startswith("/v1beta/") or GEMINI_METHOD_PATH.fullmatch(path) is not None
            or "HTTP_X_GOOG_API_KEY" in environ)


def _error_page(error):
    # The page wrapper left the visitor's session here; a 404 found no page to run.
    session = bottle.request.environ.get("llimit.session") or PageSession()
    return render_page(ERROR_PAGE, title=str(error.status), session=session,
                       status=error.status, message=error.message,
                       reason=bottle.HTTP_CODES.get(error.status, "Error"))


class ErrorPlugin:
    """Turns LlimitError (and unexpected failures) into answers, on every route."""

    name = "llimit_errors"
    api = 2

    def __init__(self, state):
        self.state = state

    def apply(self, callback, route):
        metrics = self.state.metrics

        def handle(*args, **kwargs):
            try:
                return callback(*args, **kwargs)
            except LlimitError as error:
                if error.status in (401, 403, 429, 503):
                    metrics.observe_rejection(error.code)
                return error_response(error, bottle.request.path)
            except DatabaseUnavailable:
                log.exception("database busy or unavailable on %s", bottle.request.path)
                return error_response(LlimitError(
                    503, "service_unavailable", "The database is busy; try again."),
                    bottle.request.path)
            except EngineDataError as error:  # e.g. a NUL, which PostgreSQL never stores
                return error_response(LlimitError(
                    400, "invalid_request_error", f"The database cannot store this: {error}."),
                    bottle.request.path)
            except bottle.HTTPResponse:
                raise
            except Exception:
                log.exception("unexpected error on %s %s", bottle.request.method,
                              bottle.request.path)
                return error_response(LlimitError(
                    500, "server_error", "llimit failed on this request; see its log."),
                    bottle.request.path)
        return handle


# CORS, for browser apps that call the proxy with a key: only these paths, only
# for LLIMIT_CORS_ORIGINS. Pages and the admin API open nothing (their
# preflights fall to the 405 of a route without OPTIONS, with no CORS headers).
CORS_PATH_PREFIXES = ("/v1/", "/v1beta/", "/openai/", "/llimit/me")
CORS_ALLOWED_HEADERS = (
    "authorization", "content-type", "x-api-key", "api-key", "x-goog-api-key",
    "x-goog-api-client", "anthropic-version", "anthropic-beta",
    "anthropic-dangerous-direct-browser-access", "openai-beta", "openai-organization",
    "openai-project", "x-llimit-user", "x-llimit-plan")
CORS_EXPOSED_HEADERS = (
    "X-LLimit-Request-Id, X-LLimit-Overhead-Ms, X-LLimit-Limit-Id, X-LLimit-Warning,"
    " x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests,"
    " x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens,"
    " Retry-After, x-should-retry, x-request-id, request-id")
CORS_MAX_AGE_SECONDS = 600


class CorsPlugin:
    """Answers CORS preflights on the proxy routes (no key needed) and marks their
    answers readable by an allowed origin; leaves every other route alone."""

    name = "llimit_cors"
    api = 2

    def __init__(self, origins):
        self.origins = frozenset(origin.lower() for origin in origins)

    def apply(self, callback, route):
        if not self.origins or not route.rule.startswith(CORS_PATH_PREFIXES):
            return callback

        def handle(*args, **kwargs):
            environ = bottle.request.environ
            origin = environ.get("HTTP_ORIGIN", "")
            allowed = origin.lower() in self.origins
            if environ["REQUEST_METHOD"] == "OPTIONS" and origin \
                    and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ:
                return self._preflight(environ, origin, allowed)
            try:
                result = callback(*args, **kwargs)
            except bottle.HTTPResponse as response:
                self._mark(response, origin, allowed)
                raise
            self._mark(result if isinstance(result, bottle.HTTPResponse) else bottle.response,
                       origin, allowed)
            return result
        return handle

    @staticmethod
    def _preflight(environ, origin, allowed):
        if not allowed:
            return bottle.HTTPResponse(status=403, headers={"Vary": "Origin"})
        asked = [name.strip().lower() for name in
                 environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS", "").split(",")]
        # compat: the openai and anthropic SDKs send x-stainless-* headers on every call.
        stainless = [name for name in asked if name.startswith("x-stainless-")]
        return bottle.HTTPResponse(status=204, headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": ", ".join((*CORS_ALLOWED_HEADERS, *stainless)),
            "Access-Control-Max-Age": str(CORS_MAX_AGE_SECONDS), "Vary": "Origin"})

    @staticmethod
    def _mark(response, origin, allowed):
        response.set_header("Vary", "Origin")
        if allowed:
            response.set_header("Access-Control-Allow-Origin", origin)
            response.set_header("Access-Control-Expose-Headers", CORS_EXPOSED_HEADERS)


def llimit_me_preflight(state):
    """OPTIONS /llimit/me: only a CORS preflight, which CorsPlugin answers before this runs."""
    raise LlimitError(405, "invalid_request_error", "Method not allowed for this URL.",
                      code="http_405")


def routes():
    """Every route of llimit: (method, path, handler taking state first)."""
    return [
        # the proxy
        ("ANY", "/v1/<path:path>", proxy_v1),
        ("ANY", "/v1beta/<path:path>", proxy_v1beta),
        ("ANY", "/openai/deployments/<deployment>/<path:path>", proxy_azure),
        ("ANY", "/openai/v1/<path:path>", proxy_azure_v1),
        ("ANY", "/openai/<path:path>", proxy_azure_plain),
        ("GET", "/llimit/me", llimit_me),
        ("OPTIONS", "/llimit/me", llimit_me_preflight),
        # the admin API
        ("POST", "/admin/keys", admin(admin_keys_create)),
        ("GET", "/admin/keys", admin(admin_keys_list)),
        ("GET", "/admin/keys/<key_id>", admin(admin_key_get)),
        ("PATCH", "/admin/keys/<key_id>", admin(admin_key_update)),
        ("POST", "/admin/keys/<key_id>/revoke", admin(admin_key_revoke)),
        ("GET", "/admin/projects", admin(admin_projects_list)),
        ("POST", "/admin/projects", admin(admin_projects_create)),
        ("GET", "/admin/projects/<project_id>", admin(admin_project_get)),
        ("PATCH", "/admin/projects/<project_id>", admin(admin_project_update)),
        ("DELETE", "/admin/projects/<project_id>", admin(admin_project_delete)),
        ("GET", "/admin/limits", admin(admin_limits_list)),
        ("POST", "/admin/limits", admin(admin_limits_create)),
        ("GET", "/admin/limits/<limit_id>", admin(admin_limit_get)),
        ("PATCH", "/admin/limits/<limit_id>", admin(admin_limit_update)),
        ("DELETE", "/admin/limits/<limit_id>", admin(admin_limit_delete)),
        ("POST", "/admin/limits/<limit_id>/reset", admin(admin_limit_reset)),
        ("GET", "/admin/plans", admin(admin_plans_list)),
        ("POST", "/admin/plans", admin(admin_plans_create)),
        ("GET", "/admin/plans/<plan_id>", admin(admin_plan_get)),
        ("PATCH", "/admin/plans/<plan_id>", admin(admin_plan_update)),
        ("DELETE", "/admin/plans/<plan_id>", admin(admin_plan_delete)),
        ("GET", "/admin/users/<user_name:path>", admin(admin_user_get)),  # a name may hold a /
        ("PUT", "/admin/users/<user_name:path>", admin(admin_user_put)),
        ("GET", "/admin/usage", admin(admin_usage)),
        ("GET", "/admin/usage.csv", admin(admin_usage_csv)),
        ("GET", "/admin/pricing", admin(admin_pricing_list)),
        ("PUT", "/admin/pricing/<model:path>", admin(admin_pricing_put)),
        ("POST", "/admin/reprice", admin(admin_reprice)),
        ("GET", "/admin/openapi.json", admin_openapi),
        # the pages
        ("GET", "/", page(page_home)),
        ("GET", "/login", page(page_login)),
        ("POST", "/login", page(page_login_post)),
        ("GET", "/login/callback", page(page_login_callback)),
        ("GET", "/logout", page(page_logout_confirm)),
        ("POST", "/logout", page(page_logout)),
        ("GET", "/keys", page(page_keys)),
        ("POST", "/keys", page(page_keys_create)),
        ("POST", "/keys/<key_id>/revoke", page(page_key_revoke)),
        ("GET", "/usage", page(page_usage)),
        ("GET", "/reports", page(page_reports)),
        ("GET", "/reports/data", page(reports_data)),
        ("GET", "/reports/data.csv", page(reports_csv)),
        ("GET", "/admin", page(page_admin)),
        ("POST", "/admin", page(page_admin_post)),
        ("GET", PAGES_SCRIPT_PATH, static_pages_script),
        ("GET", PAGES_CSS_PATH, static_pages_css),
        ("GET", CHARTJS_PATH, static_chartjs),
        # operations
        ("GET", "/healthz", ops_healthz),
        ("GET", "/metrics", ops_metrics),
    ]


def make_app(config, state=None, ensure_token=True):
    """The WSGI app of llimit for a Config; its State is `app.llimit`.

    `ensure_token=False` leaves the admin token to the caller (`serve` writes it
    only once it has its port).
    """
    state = state or State(config)
    if ensure_token:
        with transaction(state.database()) as db:
            state.generated_admin_token = ensure_admin_token(db, config.admin_token)
    with transaction(state.database()) as db:
        state.upstream_user_secret = ensure_upstream_user_secret(db)
    app = bottle.Bottle()
    app.config["catchall"] = False  # ErrorPlugin answers; a crash must not turn into HTML
    app.llimit = state
    app.uninstall(bottle.JSONPlugin)
    app.install(CorsPlugin(config.cors_origins))  # first: outermost, so errors carry it too
    app.install(bottle.JSONPlugin(json_dumps=json_text))
    app.install(ErrorPlugin(state))
    for method, path, handler in routes():
        app.route(path, method, _bind(handler, state), name=handler.__name__)
    for status in (404, 405):
        app.error(status)(_bottle_error(status))
    return app


def _bind(handler, state):
    def bound(**url_args):
        return handler(state, **url_args)
    bound.__name__ = handler.__name__
    bound.__doc__ = handler.__doc__
    return bound


def _bottle_error(status):
    messages = {404: "Unknown URL.", 405: "Method not allowed for this URL."}

    def handle(error):
        request = bottle.request
        message = f"{messages[status]} ({request.method} {request.path})"
        missing_v1 = status == 404 and request.path.strip("/").split("/")[0] in API_ROOT_NAMES
        if missing_v1:
            base_url = public_base_url(request.app.llimit.config)
            message += (f" llimit serves the API under /v1: use base_url {base_url}/v1"
                        f" (Anthropic clients: {base_url}).")
            log.warning("404 %s %s: a client's base URL without /v1?", request.method,
                        encoded_path(request.path))
        llimit_error = LlimitError(status, "invalid_request_error", message,
                                   code=f"http_{status}")
        response = error_response(llimit_error, request.path, as_json=missing_v1)
        for name, value in response.headers.items():
            bottle.response.set_header(name, value)
        return response.body
    return handle


# =============================================================================
# 14. CLI
#    `python llimit.py [serve]` and the admin subcommands (keys, projects,
#    limits, usage, pricing), which work on the database directly, so they
#    run with or without a server.
# =============================================================================

CUT_STREAMS_SECONDS = 5.0  # after the grace period: for cut streams to be metered


def configure_logging(config):
    """Logging for a process: one line per event, text or JSON lines; returns its writer.

    Records are written to stderr by one listener thread: with a lock around
    the stream, 64 request threads would queue behind each other's writes.
    Stop the returned listener to flush.
    """
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(_JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    # The logging HOWTO's optimisations: no caller lookup (a stack walk per
    # record), thread, process or task names, none of which our lines show.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False
    records = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler)
    listener.start()
    root = logging.getLogger()
    root.handlers[:] = [_DeferredQueueHandler(records)]
    root.setLevel(config.log_level.upper())
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    return listener


class _DeferredQueueHandler(logging.handlers.QueueHandler):
    # Hands the record over as it is: the listener thread formats it, once, off
    # the request's thread (our log arguments are strings and numbers).
    def prepare(self, record):
        return record


class _JsonLogFormatter(logging.Formatter):
    def format(self, record):
        entry = {"time": utc_iso(record.created), "level": record.levelname,
                 "logger": record.name}
        fields = getattr(record, "call_fields", None)
        if fields is not None:
            entry["event"] = "call"
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def serve(config):
    """Run the server until SIGTERM or Ctrl-C; open streams may finish first."""
    log_writer = configure_logging(config)
    try:
        app = make_app(config, ensure_token=False)
    except (DatabaseError, OSError, ValueError) as error:
        log.error("cannot start: %s", error)
        log_writer.stop()
        return 1
    state = app.llimit
    _raise_open_files_limit(config.max_connections + config.threads + 64)
    try:
        server = waitress.create_server(
            app, host=config.host, port=config.port, threads=config.threads, ident="llimit",
            max_request_body_size=config.max_body_bytes * 2 + 65536,
            # 64 KiB of headers is far above any client's; more gets 431 from waitress
            # instead of being carried upstream (waitress would take 256 KiB).
            max_request_header_size=64 * 1024,
            # Idle connections cost no thread; they are closed after a minute, and
            # the longest idle first when there are too many (_close_idle_when_full).
            connection_limit=config.max_connections, channel_timeout=60, cleanup_interval=10,
            backlog=2048, asyncore_use_poll=True)  # select() fails past descriptor 1023
    except OSError as error:
        log.error("cannot listen on %s:%s: %s", config.host, config.port,
                  error.strerror or error)
        state.close()
        log_writer.stop()
        return 1
    _close_idle_when_full(server, config.max_connections)
    _check_keys_before_bodies(server, state)
    state.config = dataclasses.replace(config, port=server.effective_port)
    # Only now, with the port ours: a second `serve` on this database that could not
    # bind never touches the running server's token.
    with transaction(state.database()) as db:
        generated = ensure_admin_token(db, config.admin_token)
    if generated:
        print(f"llimit: generated an admin token (shown this once, only its hash is kept):\n"
              f"  {generated}", file=sys.stderr, flush=True)
    _warn_missing_upstream_keys(state)
    log.info("Chart.js for /reports: %s", chartjs_origin(state))
    for warning in sign_in_warnings(state.config):
        log.warning("%s", warning)
    state.start()
    signal.signal(signal.SIGTERM, lambda *_: _graceful_stop(server, state, log_writer))
    log.info("llimit %s serving on http://%s:%s (database %s)", __version__,
             config.host, server.effective_port, database_label(config.db_path))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    state.close()
    log_writer.stop()
    return 0


EARLY_KEY_CHECK_BYTES = 256 * 1024  # bodies above this are refused unread without a good key


def _check_keys_before_bodies(server, state):
    # waitress reads a whole request body (spooling it to disk) before the app
    # sees the request, so a stranger could make llimit take in 64 MB per call
    # just to answer 401. For a large body on a proxy route, the key is checked
    # as soon as the headers are in, in waitress's own thread: a key lookup is a
    # read, which WAL never blocks. A refusal is answered at once, and the
    # connection closed without reading the body. Reads waitress internals: the
    # channel's parser_class, the parser's headers, path, error and completed.
    class KeyCheckingParser(waitress.parser.HTTPRequestParser):
        def received(self, data):
            consumed = super().received(data)
            if (self.headers_finished and not self.completed and self.error is None
                    and self.content_length > EARLY_KEY_CHECK_BYTES
                    and self.path.startswith(("/v1/", "/openai/"))):
                environ = {"HTTP_" + name: value for name, value in self.headers.items()}
                environ["REMOTE_ADDR"] = self.early_address
                try:
                    # Only a first look: the call's own check follows once the body is in.
                    authenticate_call(state, environ, state.versions_checked_by_admission)
                except LlimitError as error:
                    self.error, self.completed = _EarlyRefusal(error), True
                except DatabaseError:
                    pass  # the call's own check answers (503) once the body is in
            return consumed

    class KeyCheckingChannel(waitress.channel.HTTPChannel):
        def parser_class(self, adj):
            parser = KeyCheckingParser(adj)
            parser.early_address = self.addr[0] if isinstance(self.addr, tuple) else ""
            return parser

    server.channel_class = KeyCheckingChannel


class _EarlyRefusal(waitress.utilities.Error):
    # A LlimitError answered by waitress itself (in OpenAI's shape), before the body.
    def __init__(self, error):
        super().__init__(error.message)
        self.error = error
        self.code = error.status
        self.reason = bottle.HTTP_CODES.get(error.status, "Error")

    def to_response(self, ident=None):
        headers = [("Content-Type", "application/json"), *self.error.headers.items()]
        return (f"{self.code} {self.reason}", headers, json.dumps(self.error.body()).encode())


def _raise_open_files_limit(wanted):
    try:
        import resource  # not on Windows
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        log.warning("could not raise the open files limit to %d", wanted)


def _close_idle_when_full(server, connection_limit):
    # Slowloris: waitress stops accepting at its connection limit until idle
    # connections time out, so a few hundred idle sockets would lock everyone
    # out for minutes. Instead, at the limit, the longest idle connections that
    # have no request under way are closed, and new ones are let in.
    # Reads waitress internals: active_channels, requests, last_activity, will_close.
    readable = server.readable

    def readable_closing_idle():
        excess = len(server._map) - connection_limit + 1
        if excess > 0 and server.accepting:
            idle = sorted((channel for channel in server.active_channels.values()
                           if not channel.requests and not channel.will_close
                           and not channel.total_outbufs_len),
                          key=lambda channel: channel.last_activity)
            for channel in idle[:excess]:
                channel.will_close = True
        return readable()
    server.readable = readable_closing_idle


def _warn_missing_upstream_keys(state):
    for project in list_projects(state.database()):
        _warn_missing_upstream_key(project)
    if not state.config.upstream_key:
        log.warning("no LLIMIT_UPSTREAM_KEY (or OPENAI_API_KEY): the default project's calls"
                    " go upstream without a key")


def _graceful_stop(server, state, log_writer):
    log.info("SIGTERM: no new connections; open calls have %ss to finish",
             state.config.grace_seconds)
    # Stop accepting now; close the listening socket from inside the event loop
    # (closing it here, under a running select, breaks the loop), and only it:
    # server.close() would also close the trigger that open streams' writes use.
    server.accepting = False
    server.trigger.pull_trigger(lambda: waitress.wasyncore.dispatcher.close(server))

    def finish():
        if not _wait_for_calls(server, time.monotonic() + state.config.grace_seconds):
            log.warning("grace period over: cutting %d open streams (metered as estimated)",
                        state.streams.cut_all())
            _wait_for_calls(server, time.monotonic() + CUT_STREAMS_SECONDS)
        if state.close():
            log.info("stopped; every finished call is metered")
            code = 0
        else:
            # A database locked for longer than the writer's wait: say so, and
            # exit non-zero, rather than claim the usage was kept.
            log.error("stopped with usage unwritten: the database stayed locked, so the"
                      " latest calls' rows are lost")
            code = 1
        log_writer.stop()
        os._exit(code)

    threading.Thread(target=finish, name="llimit-shutdown", daemon=True).start()


def _wait_for_calls(server, deadline):
    # True once no call runs or waits and every answer has left (waitress
    # keeps what a finished call wrote in its channel's buffers); False at
    # the deadline. Reads waitress internals: its task dispatcher and channels.
    dispatcher = server.task_dispatcher
    while time.monotonic() < deadline:
        unsent = any(getattr(channel, "total_outbufs_len", 0)
                     for channel in list(server._map.values()))
        if not (dispatcher.active_count or dispatcher.queue or unsent):
            return True
        time.sleep(0.05)
    return False


def _print_table(rows, columns):
    widths = [max([len(c)] + [len(_cell(row.get(c))) for row in rows]) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(_cell(row.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") or "0"
    return str(value)


def open_admin_database(config, reading):
    """The database an admin subcommand works on; one that only reads refuses a missing file.

    Reading from the wrong directory would otherwise create an empty
    llimit.db and report zeros as if they were the truth.
    """
    existed = database_exists(config.db_path)
    if reading and not existed:
        raise LlimitError(404, "invalid_request_error",
                          f"no database at {database_label(config.db_path)}: run this where"
                          " llimit.db is, or give --db PATH (or LLIMIT_DB)")
    db = open_database(config.db_path, pool_size=2)()
    migrate(db)
    if not existed:
        print(f"llimit: created a new database at {database_label(config.db_path)}",
              file=sys.stderr)
    return db


def cli_keys(config, args):
    """keys create|list|revoke"""
    db = open_admin_database(config, reading=args.action != "create")
    now = config.clock()
    if args.action == "create":
        if not args.user and not args.project_key:
            raise LlimitError(400, "invalid_request_error",
                              "keys create needs --user NAME (a personal key), or --project-key"
                              " for a key an app shares, with no user")
        fields = validate_key_fields({"user": args.user, "project": args.project,
                                      "note": args.note, "expires_at": args.expires_at,
                                      "models": args.models.split(",") if args.models else None},
                                     ("user", "project", "note", "expires_at", "models"),
                                     user_domains(config))
        with transaction(db):
            row, raw_key = create_key(db, now, fields["user"], fields["project"] or "default",
                                      fields["note"], fields["expires_at"], fields["models"])
        print(f"id:  {row['id']}\nkey: {raw_key}\n(the key is shown this once)")
    elif args.action == "revoke":
        with transaction(db):
            if get_key(db, args.id) is None:
                raise LlimitError(404, "invalid_request_error", f"No key {args.id!r}.")
            revoke_key(db, args.id, utc_iso(now))
        print(f"revoked {args.id}")
    else:
        rows = list_keys(db, args.user, args.project, utc_iso(now) if args.active else None)
        spend = key_spend(db, [row["id"] for row in rows])
        _print_table([key_to_json(row, spend.get(row["id"])) for row in rows],
                     ("id", "masked_key", "user", "project", "active", "requests", "cost_usd",
                      "last_used_at", "note"))
    return 0


def cli_projects(config, args):
    """projects list|create"""
    db = open_admin_database(config, reading=args.action != "create")
    if args.action == "create":
        data = {"id": args.id, "name": args.name, "upstream_kind": args.kind,
                "upstream_url": args.url, "upstream_key": args.upstream_key,
                "api_version": args.api_version, "allow_user_keys": not args.no_user_keys,
                "allow_async": args.allow_async}
        project = validate_project({k: v for k, v in data.items() if v is not None},
                                   env_pattern=config.upstream_env_pattern)
        project["created_at"] = utc_iso(config.clock())
        with transaction(db):
            insert_project(db, project)
        print(f"created project {project['id']}")
        return 0
    _print_table([project_to_json(row) for row in list_projects(db)],
                 ("id", "name", "upstream_kind", "upstream_url", "upstream_key_source",
                  "allow_user_keys", "allow_async"))
    return 0


def cli_limits(config, args):
    """limits list|create|delete"""
    db = open_admin_database(config, reading=args.action != "create")
    if args.action == "create":
        data = {"scope": args.scope, "target": args.target, "each": args.each,
                "metric": args.metric, "window": args.window, "amount": args.amount,
                "action": args.limit_action,
                "alert_at": [float(p) for p in args.alert_at.split(",")] if args.alert_at
                else None}
        limit = validate_limit({k: v for k, v in data.items() if v is not None},
                               domains=user_domains(config))
        with transaction(db):
            limit_id = add_limit(db, limit, utc_iso(config.clock()))
        print(f"created limit {limit_id}")
    elif args.action == "delete":
        with transaction(db):
            found = delete_limit(db, args.id)
        print(f"deleted {args.id}" if found else f"no limit {args.id}")
        return 0 if found else 1
    else:
        limits = Limits(lambda: db, config.clock)  # read only: no usage is counted here
        _print_table([limits.status(db, row) for row in list_limits(db)],
                     ("id", "scope", "target", "each", "metric", "window", "amount", "used",
                      "action", "resets_at"))
    return 0


def cli_plans(config, args):
    """plans list|create|delete|assign"""
    db = open_admin_database(config, reading=args.action == "list")
    now = config.clock()
    if args.action == "create":
        limits = [parse_plan_limit(text) for text in args.limit]
        data = {"id": args.id, "limits": limits, **({"name": args.name} if args.name else {})}
        plan_id = create_plan(db, data, utc_iso(now))
        print(f"created plan {plan_id}")
    elif args.action == "delete":
        with transaction(db):
            found = delete_plan(db, args.id)
        print(f"deleted {args.id}" if found else f"no plan {args.id}")
        return 0 if found else 1
    elif args.action == "assign":
        user_name = canonical_user_name(args.user, user_domains(config))
        assign_plan(db, user_name, None if args.id == "none" else args.id, utc_iso(now))
        print(f"{user_name}: plan {args.id}")
    else:
        _print_table([{**plan, "limits": "; ".join(limit_in_words(limit) + (
            " (warn)" if limit["action"] == "warn" else "") for limit in plan["limits"])}
            for plan in (plan_to_json(db, row, now) for row in list_plans(db))],
            ("id", "name", "limits"))
    return 0


def cli_usage(config, args):
    """usage --group-by user|key|project|model|day"""
    db = open_admin_database(config, reading=True)
    query = {"start": args.start, "end": args.end}
    start, end = report_range(query, config.clock())
    report = usage_report(db, args.group_by, start, end)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"usage {start} .. {end} by {args.group_by}")
    _print_table(report["rows"] + [{args.group_by: "TOTAL", **report["totals"]}],
                 (args.group_by, "requests", "prompt_tokens", "cached_tokens",
                  "completion_tokens", "cost_usd", "unpriced_requests"))
    return 0


def cli_pricing(config, args):
    """pricing missing|list|check"""
    if args.action == "check":
        try:
            table, errors = check_price_file(config.pricing_path)
        except (OSError, ValueError) as error:
            errors, table = [str(error)], {}
        for error in errors:
            print(f"{config.pricing_path}: {error}", file=sys.stderr)
        if not errors:
            print(f"{len(table)} prices in {config.pricing_path}: all well formed")
        return 1 if errors else 0
    db = open_admin_database(config, reading=True)
    pricebook = Pricebook(load_price_file(config.pricing_path), list_price_overrides(db))
    if args.action == "missing":
        missing = missing_prices(db, pricebook)
        for model in missing:
            print(model)
        if not missing:
            print("every model seen has a price", file=sys.stderr)
        return 0
    for model, price in sorted(pricebook.table().items()):
        print(model, json.dumps(price))
    return 0


def cli_migrate_db(config, args):
    """migrate-db --from SOURCE --to TARGET: copy every table, idempotently."""
    if args.source == args.target:
        raise LlimitError(400, "invalid_request_error", "--from and --to name the same database")
    source_database, target_database = open_database(args.source), open_database(args.target)
    source, target = source_database(), target_database()
    try:
        for database, db in (("--from", source), ("--to", target)):
            applied = migrate(db)
            if applied:
                print(f"{database}: applied {len(applied)} migrations first")
        foreign = foreign_usage_event(source, target)
        if foreign is not None:
            raise LlimitError(409, "invalid_request_error",
                              f"--to already holds usage that is not from --from (event"
                              f" {foreign}); migrate-db fills an unused database (or runs"
                              " again over its own copy): point --to at an empty one")
        tables = [table for table in list_tables(source) if table not in UNCOPIED_TABLES]
        known = set(list_tables(target))
        total = 0
        with transaction(target):
            for table in tables:
                if table not in known:
                    raise LlimitError(400, "invalid_request_error",
                                      f"the target has no table {table}")
                copied, read = copy_table(source, target, table)
                total += copied
                print(f"{table}: {copied} of {read} rows copied")
            follow_copied_ids(target)
        print(f"copied {total} rows" if total else "nothing new to copy")
    finally:
        source_database.close()
        target_database.close()
    return 0


# The settings each admin subcommand reads (it works on the database, not as a server).
ADMIN_FLAG_FIELDS = ("db_path",)
PRICING_FLAG_FIELDS = ("db_path", "pricing_path")


def build_parser():
    """The argparse parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="llimit", parents=[config_flags()], formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog="Settings given before the subcommand apply to it, as after it.")
    parser.add_argument("--version", action="version", version=f"llimit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(parent, name, fields, **kwargs):
        sub = parent.add_parser(name, parents=[config_flags(fields)], **kwargs)
        sub.set_defaults(flag_fields=fields)
        return sub

    command(commands, "serve", None, help="run the gateway (the default)")
    admin = ADMIN_FLAG_FIELDS

    keys = command(commands, "keys", admin, help="create, list, revoke keys")
    keys_actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = command(keys_actions, "create", admin, help="make a key (shown this once)")
    owner = create.add_mutually_exclusive_group()
    owner.add_argument("--user", help="the person the key is for (a personal key)")
    owner.add_argument("--project-key", action="store_true",
                       help="a key an app shares, with no user (it may name one per call)")
    create.add_argument("--project", default="default", help="its project (default: default)")
    create.add_argument("--note", help="a note shown in listings, e.g. where it is used")
    create.add_argument("--expires-at", help="expiry, ISO 8601 (UTC unless it says)")
    create.add_argument("--models", help="comma-separated allowed models (default: all)")
    listing = command(keys_actions, "list", admin, help="list keys, masked, with their spend")
    listing.add_argument("--user", help="only this user's keys")
    listing.add_argument("--project", help="only this project's keys")
    listing.add_argument("--active", action="store_true", help="only keys that still work")
    revoke = command(keys_actions, "revoke", admin, help="revoke a key: its next call gets 403")
    revoke.add_argument("id", help="the key's id (key_...)")

    projects = command(commands, "projects", admin, help="list or create projects")
    project_actions = projects.add_subparsers(dest="action", required=True, metavar="ACTION")
    command(project_actions, "list", admin, help="list projects")
    create = command(project_actions, "create", admin, help="create a project")
    create.add_argument("id", help="the project's id, e.g. my-team")
    create.add_argument("--name", help="display name")
    create.add_argument("--kind", choices=UPSTREAM_KINDS, help="upstream dialect")
    create.add_argument("--url", help="upstream base URL (Anthropic's ends in /v1)")
    create.add_argument("--upstream-key", help="env:NAME (read at call time) or the key")
    create.add_argument("--api-version", help="Azure api-version added to calls that lack it")
    create.add_argument("--no-user-keys", action="store_true",
                        help="users may not make their own keys for it on /keys")
    create.add_argument("--allow-async", action="store_true",
                        help="allow batches and background responses (charged when they finish)")

    limits = command(commands, "limits", admin, help="list, create, delete limits")
    limit_actions = limits.add_subparsers(dest="action", required=True, metavar="ACTION")
    command(limit_actions, "list", admin, help="list limits with what is used now")
    create = command(limit_actions, "create", admin, help="create a budget, quota or rate limit")
    create.add_argument("--scope", required=True, choices=SCOPES, help="what it applies to")
    create.add_argument("--target", help="the project, user or key id (not for global)")
    create.add_argument("--each", choices=("user", "key"),
                        help="apply the amount to each user or key of the target")
    create.add_argument("--metric", required=True, choices=LIMIT_METRICS, help="what it counts")
    create.add_argument("--window", required=True, metavar="WINDOW",
                        help="UTC window it resets with: minute, day, week, month, total"
                        " (never), or rolling periods such as 24h, 7d, 30d")
    create.add_argument("--amount", required=True, type=float, help="USD, tokens or requests")
    create.add_argument("--action", dest="limit_action", choices=ACTIONS, default="block",
                        help="block calls past it (default) or only warn")
    create.add_argument("--alert-at", help="comma-separated percentages, e.g. 80,90")
    delete = command(limit_actions, "delete", admin, help="delete a limit")
    delete.add_argument("id", help="the limit's id (lim_...)")

    plans = command(commands, "plans", admin, help="list, create, delete plans; assign users")
    plan_actions = plans.add_subparsers(dest="action", required=True, metavar="ACTION")
    command(plan_actions, "list", admin, help="list plans and their limits")
    create = command(plan_actions, "create", admin, help="create a plan")
    create.add_argument("id", help="the plan's id, e.g. research")
    create.add_argument("--name", help="its name as people read it")
    create.add_argument("--limit", action="append", default=[], metavar="METRIC:AMOUNT/WINDOW",
                        help="a limit for each member, e.g. usd:20/month, requests:60/minute,"
                        " tokens:20000/24h (repeat for more)")
    delete = command(plan_actions, "delete", admin, help="delete a plan")
    delete.add_argument("id", help="the plan's id")
    assign = command(plan_actions, "assign", admin, help="put a user on a plan")
    assign.add_argument("user", help="the user's name")
    assign.add_argument("id", help="the plan's id, or 'none' for the default plan")

    usage = command(commands, "usage", admin, help="usage and cost per group")
    usage.add_argument("--group-by", default="user", choices=tuple(USAGE_GROUP_COLUMNS),
                       help="one row per this (default: user)")
    usage.add_argument("--start", help="first UTC day, YYYY-MM-DD (default: 30 days ago)")
    usage.add_argument("--end", help="last UTC day, YYYY-MM-DD (default: today)")
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")

    pricing = command(commands, "pricing", PRICING_FLAG_FIELDS, help="prices in force")
    pricing.add_argument("action", choices=("missing", "list", "check"),
                         help="missing: models seen without a price; list: every price;"
                         " check: validate the prices file against its schema")
    migrate_db = command(commands, "migrate-db", (), help="copy one database into another"
                         " (SQLite file or postgresql:// URL), idempotently")
    migrate_db.add_argument("--from", dest="source", required=True, help="database to read")
    migrate_db.add_argument("--to", dest="target", required=True, help="database to fill")
    return parser


COMMANDS = {"keys": cli_keys, "projects": cli_projects, "limits": cli_limits, "plans": cli_plans,
            "usage": cli_usage, "pricing": cli_pricing, "migrate-db": cli_migrate_db}


def main(argv=None):
    """The command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    command = args.command or "serve"
    flags = {field: value for field, value in vars(args).items()
             if field in SETTING_FLAG_FIELDS}
    relevant = getattr(args, "flag_fields", None)
    for field in flags:
        if relevant is not None and field not in relevant:
            parser.error(f"{SETTING_FLAG_FIELDS[field]} does not apply to {command}")
    # Into os.environ, so env:NAME upstream keys may live in .env as well.
    load_env_files(env_file_paths(), os.environ)
    config = config_from_flags(flags)
    if command == "serve":
        return serve(config)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        code = COMMANDS[command](config, args)
        sys.stdout.flush()  # a reader gone early (`| head`) shows here, not at exit
        return code
    except LlimitError as error:
        print(f"llimit: {error.message}", file=sys.stderr)
        return 2
    except DatabaseError as error:
        print(f"llimit: database {database_label(config.db_path)}: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader has what it wanted; silence the flush at exit (Python's advice).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
