#!/usr/bin/env bash
# Runs docs/docker-compose.yml end to end and checks what it promises: PostgreSQL, two
# llimit replicas and nginx, on an upstream that is tests/fake_upstream.py on this host.
#
#   bash docs/compose-check.sh          (from a checkout; Linux with Docker)
#
# Needs docker, `docker compose` (or docker-compose 1.29), curl and python3. Builds the
# image, starts its own Compose project (llimit-check) on 127.0.0.1:$PUBLISH_PORT (18080),
# and removes its containers and volume at the end (KEEP=1 leaves them running).
# Checks: /healthz through nginx; a key made with the admin API works; calls reach the
# upstream through both replicas; each replica's /admin/usage counts the calls of both;
# with one replica killed the other answers every call; new containers keep the data.
set -euo pipefail
cd "$(dirname "$0")/.."

if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
export COMPOSE_PROJECT_NAME=llimit-check PUBLISH_PORT="${PUBLISH_PORT:-18080}"
export LLIMIT_ADMIN_TOKEN="check-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
export OPENAI_API_KEY=sk-compose-check
# The containers reach this host at the default bridge's address (docker0).
gateway=$(docker network inspect bridge -f '{{range .IPAM.Config}}{{.Gateway}}{{end}}')
[ -n "$gateway" ] || gateway=$(ip -4 -o addr show docker0 | awk '{sub("/.*", "", $4); print $4}')
[ -n "$gateway" ] || { echo "compose-check: no docker0 address for the fake upstream" >&2; exit 1; }
fake_port="${FAKE_PORT:-18999}"
export LLIMIT_UPSTREAM_URL="http://$gateway:$fake_port/v1"
base="http://127.0.0.1:$PUBLISH_PORT"

dc() { "${compose[@]}" -f docs/docker-compose.yml "$@"; }
fail() { echo "compose-check: FAILED: $*" >&2; exit 1; }
step() { echo "== $*"; }

cleanup() {
    [ -n "${fake_pid:-}" ] && kill "$fake_pid" 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then echo "left running: ${compose[*]} -p $COMPOSE_PROJECT_NAME"
    else dc down -v >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

python3 -c "
import sys, time
sys.path.insert(0, '.')
from tests.fake_upstream import FakeUpstream
FakeUpstream(host='$gateway', port=$fake_port)
time.sleep(24 * 3600)" &
fake_pid=$!

step "docker build -t llimit ."
docker build -q -t llimit . >/dev/null
step "up (waits for PostgreSQL, then both replicas, to be healthy)"
dc up -d
for _ in $(seq 120); do curl -sf "$base/healthz" >/dev/null && break; sleep 1; done
curl -sf "$base/healthz" || fail "no /healthz through nginx at $base"
echo

admin=(-H "Authorization: Bearer $LLIMIT_ADMIN_TOKEN")
key=$(curl -sf -X POST "$base/admin/keys" "${admin[@]}" -d '{"user": "compose-check"}' |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["key"])') ||
    fail "POST /admin/keys"

calls() {  # calls N: N chat completions through nginx, each must be answered 200
    for _ in $(seq "$1"); do
        code=$(curl -s -o /dev/null -w '%{http_code}' "$base/v1/chat/completions" \
            -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
            -d '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}')
        [ "$code" = 200 ] || fail "a call answered $code"
    done
}

usage_of() {  # usage_of SERVICE: requests in that replica's /admin/usage, asked inside it
    dc exec -T "$1" python -c '
import json, os, urllib.request
request = urllib.request.Request("http://127.0.0.1:8000/admin/usage",
    headers={"Authorization": "Bearer " + os.environ["LLIMIT_ADMIN_TOKEN"]})
print(json.load(urllib.request.urlopen(request, timeout=10))["totals"]["requests"])'
}

expect_usage() {  # expect_usage N SERVICE...: usage is written just after each answer
    local want=$1 service got; shift
    for service in "$@"; do
        for _ in $(seq 50); do got=$(usage_of "$service" || true); [ "$got" = "$want" ] && break; sleep 0.2; done
        [ "$got" = "$want" ] || fail "$service counts $got requests, expected $want"
        echo "$service: /admin/usage counts $got requests"
    done
}

step "8 calls through nginx"
calls 8
replicas=$(dc logs --no-color nginx | grep -o 'POST /v1/chat/completions HTTP/1.1" 200 upstream=[0-9.:]*' |
           sed 's/.*upstream=//' | sort -u | wc -l || true)
[ "$replicas" -ge 2 ] || fail "the calls reached $replicas replica(s), expected both"
echo "the calls reached $replicas replicas"
expect_usage 8 llimit-1 llimit-2

step "docker kill llimit-1: llimit-2 answers every call"
docker kill "$(dc ps -q llimit-1)" >/dev/null
calls 6
expect_usage 14 llimit-2

step "every container removed, then up: the pgdata volume keeps keys and usage"
dc rm -f -s -v  # -v: the containers' anonymous volumes (the image's unused /data), not pgdata
dc up -d
for _ in $(seq 120); do curl -sf "$base/healthz" >/dev/null && break; sleep 1; done
expect_usage 14 llimit-1 llimit-2
calls 1
expect_usage 15 llimit-1 llimit-2

echo "compose-check: all checks passed"
