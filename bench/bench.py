#!/usr/bin/env python3
"""Benchmark llimit against a fast fake OpenAI upstream.

    python bench/bench.py                 # full run (about a minute on 2 cores)
    python bench/bench.py --quick         # smaller run
    python bench/bench.py --events 1000000   # also measure with 1M stored events
    python bench/bench.py --json          # machine-readable results on stdout
    python bench/bench.py --direct-only   # only the fake upstream, no llimit

It starts, on 127.0.0.1 only:
  * a fake OpenAI upstream (this file run with --serve-upstream PORT): a raw
    asyncio HTTP/1.1 server, keep-alive, fixed JSON and SSE answers;
  * llimit (`python llimit.py serve`) with a temporary database, pointed at it.
Then the same raw asyncio HTTP/1.1 client (persistent connections) measures
the upstream directly and through llimit, and prints a Markdown table of
latency, throughput, llimit's CPU per call and database bytes per call.
Standard library only; CPU is read from /proc/<pid>/stat.
"""

import argparse
import asyncio
import datetime as dt
import http.client
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_LLIMIT = os.path.join(os.path.dirname(HERE), "llimit.py")
HOST = "127.0.0.1"
ADMIN_TOKEN = "bench-admin"
UPSTREAM_KEY = "sk-bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY = re.compile(rb"^ready (\d+)$", re.M)                  # the fake upstream's stdout
SERVING = re.compile(rb"serving on http://[\d.]+:(\d+)")   # llimit's log

# Targets printed beside the results.
TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_P99_MS = 5.0
TARGET_CPU_MS = 1.0
TARGET_RPS = 950.0
TARGET_TTFB_ADDED_MS = 1.0


# =============================================================================
# Fake upstream: `bench.py --serve-upstream PORT`
# =============================================================================

UPSTREAM_MODEL = "gpt-4o-mini-2024-07-18"
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
         "prompt_tokens_details": {"cached_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 0}}
CREATED = 1721172741


def _dumps(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


def _completion_body():
    return _dumps({
        "id": "chatcmpl-bench0000000000000000000000", "object": "chat.completion",
        "created": CREATED, "model": UPSTREAM_MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there!",
                                              "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": USAGE, "system_fingerprint": "fp_bench"})


LARGE_ANSWER_BYTES = 1 << 20


def _large_answer_body():
    """An embeddings answer of about 1 MiB of floats, usage at its end, as OpenAI sends it."""
    vector = [round((i % 97) / 97 - 0.5, 8) for i in range(3072)]
    data, size = [], 0
    while size < LARGE_ANSWER_BYTES:
        item = {"object": "embedding", "index": len(data), "embedding": vector}
        data.append(item)
        size += len(_dumps(item))
    return _dumps({"object": "list", "data": data, "model": "text-embedding-3-small",
                   "usage": {"prompt_tokens": 8 * len(data), "total_tokens": 8 * len(data)}})


def _sse_events(include_usage):
    """The HTTP chunks of one stream: three chunks, the usage chunk, [DONE]."""
    def chunk(delta, finish):
        obj = {"id": "chatcmpl-bench0000000000000000000000", "object": "chat.completion.chunk",
               "created": CREATED, "model": UPSTREAM_MODEL, "system_fingerprint": "fp_bench",
               "choices": [{"index": 0, "delta": delta, "logprobs": None,
                            "finish_reason": finish}]}
        if include_usage:
            obj["usage"] = None
        return obj
    objs = [chunk({"role": "assistant", "content": "", "refusal": None}, None),
            chunk({"content": "Hello there!"}, None),
            chunk({}, "stop")]
    if include_usage:
        objs.append({"id": "chatcmpl-bench0000000000000000000000",
                     "object": "chat.completion.chunk", "created": CREATED,
                     "model": UPSTREAM_MODEL, "system_fingerprint": "fp_bench",
                     "choices": [], "usage": USAGE})
    events = [b"data: " + _dumps(obj) + b"\n\n" for obj in objs] + [b"data: [DONE]\n\n"]
    return [b"%x\r\n%s\r\n" % (len(e), e) for e in events]


def _response(status, reason, body, content_type=b"application/json"):
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"x-request-id: req_bench\r\n\r\n" % (status, reason, content_type, len(body))) + body


def serve_upstream(port, stream_gap_ms, arrivals_path=None):
    """Run the fake upstream until killed; with `arrivals_path`, write there the
    monotonic time (ns) each chat completion request arrived."""
    arrivals = open(arrivals_path, "w", buffering=1) if arrivals_path else None
    completion = _response(200, b"OK", _completion_body())
    large_answer = _response(200, b"OK", _large_answer_body())
    models = _response(200, b"OK", _dumps({"object": "list", "data": [
        {"id": "gpt-4o-mini", "object": "model", "created": CREATED, "owned_by": "bench"}]}))
    not_found = _response(404, b"Not Found", _dumps(
        {"error": {"message": "not found", "type": "invalid_request_error", "code": None}}))
    bad_request = _response(400, b"Bad Request", _dumps(
        {"error": {"message": "bad json", "type": "invalid_request_error", "code": None}}))
    stream_head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
                   b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n"
                   b"x-request-id: req_bench\r\n\r\n")
    stream_with_usage = _sse_events(True)
    stream_without_usage = _sse_events(False)
    gap = stream_gap_ms / 1000.0

    async def handle(reader, writer):
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if arrivals is not None:
                    arrivals.write(f"{time.monotonic_ns()}\n")
                first_line, headers = _parse_head(head)
                method, path, version = first_line.split(b" ", 2)
                if b"content-length" in headers:
                    body = await reader.readexactly(int(headers[b"content-length"]))
                elif b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                    body, _ = await _read_chunked(reader)
                else:
                    body = b""
                connection = headers.get(b"connection", b"").lower()
                keep_alive = (b"close" not in connection if version == b"HTTP/1.1"
                              else b"keep-alive" in connection)
                route = path.split(b"?", 1)[0]
                if method == b"POST" and route.endswith(b"/chat/completions"):
                    try:
                        request = json.loads(body)
                    except ValueError:
                        request = None
                    if not isinstance(request, dict):
                        writer.write(bad_request)
                    elif request.get("stream"):
                        options = request.get("stream_options") or {}
                        events = (stream_with_usage if options.get("include_usage")
                                  else stream_without_usage)
                        writer.write(stream_head + events[0])
                        for event in events[1:]:
                            await writer.drain()
                            if gap:
                                await asyncio.sleep(gap)
                            writer.write(event)
                        writer.write(b"0\r\n\r\n")
                    else:
                        writer.write(completion)
                elif method == b"POST" and route.endswith(b"/embeddings"):
                    writer.write(large_answer)
                elif method == b"GET" and route.endswith(b"/models"):
                    writer.write(models)
                else:
                    writer.write(not_found)
                await writer.drain()
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()

    async def start():
        server = await asyncio.start_server(handle, HOST, port, backlog=1024)
        return server, server.sockets[0].getsockname()[1]

    serve_until_killed(start)


def serve_until_killed(start):
    """Run the asyncio server that `start()` makes, saying `ready PORT` on stdout once it
    listens (start returns (server, port)), until SIGTERM."""
    async def main():
        server, port = await start()
        print(f"ready {port}", flush=True)
        async with server:
            await server.serve_forever()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        asyncio.run(main())
    except (KeyboardInterrupt, SystemExit):
        pass


# =============================================================================
# Client: raw asyncio HTTP/1.1 with persistent connections
# =============================================================================

def _chat_body(stream):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 16}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return _dumps(body)


def build_request(port, path, token, body):
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Accept: */*\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def _parse_head(head):
    """(first line, {lower-case name: value}) of an HTTP/1.1 message head."""
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def _read_chunked(reader):
    """(body, time the first SSE data arrived or None) of a chunked body."""
    parts, first_data = [], None
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(parts), first_data
        data = await reader.readexactly(size + 2)
        if first_data is None and b"data:" in data:
            first_data = time.perf_counter()
        parts.append(data[:-2])


async def _read_response(reader):
    """(status, headers, body, first_data_time, must_close) of one response."""
    head = await reader.readuntil(b"\r\n\r\n")
    first_line, headers = _parse_head(head)
    status = int(first_line.split(b" ", 2)[1])
    first_data = None
    must_close = b"close" in headers.get(b"connection", b"").lower()
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        body, first_data = await _read_chunked(reader)
    elif b"content-length" in headers:
        length = int(headers[b"content-length"])
        body = await reader.readexactly(length) if length else b""
        if b"data:" in body:
            first_data = time.perf_counter()
    elif status in (204, 304) or 100 <= status < 200:
        body = b""
    else:
        body = await reader.read()
        must_close = True
        if b"data:" in body:
            first_data = time.perf_counter()
    return status, headers, body, first_data, must_close


def _timeout(seconds):
    if hasattr(asyncio, "timeout"):
        return asyncio.timeout(seconds)
    raise RuntimeError("Python 3.11+ is needed for the client (asyncio.timeout)")


async def _run_phase(ports, requests, count, concurrency, warm_per_worker, readers,
                     phase_timeout, request_timeout=15.0):
    latencies, ttfbs, overheads = [], [], []
    errors = []
    state = {"issued": 0, "ready": 0}
    go = asyncio.Event()
    marks = {}
    deadline = time.monotonic() + phase_timeout

    async def one(conn):
        t0 = time.perf_counter()
        reader, writer, port = conn
        writer.write(requests[port])
        async with _timeout(request_timeout):
            status, headers, body, first_data, must_close = await _read_response(reader)
        t1 = time.perf_counter()
        return t0, t1, status, headers, body, first_data, must_close

    async def connect(port):
        reader, writer = await asyncio.open_connection(HOST, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer, port

    def close(conn):
        if conn is not None:
            conn[1].close()

    async def worker(first):
        # One persistent connection per instance, taken in turn call by call
        # (client-side round robin); with one instance, one connection.
        conns = [None] * len(ports)
        turn = [first]

        def pick():
            turn[0] = (turn[0] + 1) % len(ports)
            return turn[0]
        try:
            for _ in range(warm_per_worker * len(ports)):
                i = pick()
                try:
                    if conns[i] is None:
                        conns[i] = await connect(ports[i])
                    *_, must_close = await one(conns[i])
                    if must_close:
                        close(conns[i])
                        conns[i] = None
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                    close(conns[i])
                    conns[i] = None
            state["ready"] += 1
            if state["ready"] == concurrency:
                marks["start"] = time.perf_counter()
                marks["cpu_start"] = [read_cpu(reader) for reader in readers]
                marks["self_start"] = _self_cpu()
                go.set()
            await go.wait()
            while state["issued"] < count and time.monotonic() < deadline:
                state["issued"] += 1
                i = pick()
                try:
                    if conns[i] is None:
                        conns[i] = await connect(ports[i])
                    t0, t1, status, headers, body, first_data, must_close = await one(conns[i])
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    close(conns[i])
                    conns[i] = None
                    if len(errors) > max(20, count // 10):
                        return
                    continue
                if status != 200:
                    errors.append(f"HTTP {status}: {body[:300]!r}")
                else:
                    latencies.append(t1 - t0)
                    if first_data is not None:
                        ttfbs.append(first_data - t0)
                    overhead = headers.get(b"x-llimit-overhead-ms")
                    if overhead is not None:
                        try:
                            overheads.append(float(overhead))
                        except ValueError:
                            pass
                if must_close:
                    close(conns[i])
                    conns[i] = None
        finally:
            for conn in conns:
                close(conn)

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    end = time.perf_counter()
    cpu_end = [read_cpu(reader) for reader in readers]
    self_end = _self_cpu()
    return {
        "latencies": latencies, "ttfbs": ttfbs, "overheads": overheads, "errors": errors,
        "wall_s": end - marks.get("start", end), "cpu_start": marks.get("cpu_start"),
        "cpu_end": cpu_end, "self_cpu_s": self_end - marks.get("self_start", self_end),
        "warm_calls": warm_per_worker * concurrency * len(ports),
        "timed_out": state["issued"] < count and time.monotonic() >= deadline,
    }


def run_phase(port, path, token, stream, count, concurrency, pids=None, settle_s=0.0,
              phase_timeout=60.0):
    """Send `count` chat/completions at `concurrency` (to `port`, or in turn to each of a
    list of ports); latencies in ms and CPU deltas of `pids` ({name: pid or an object
    whose cpu() gives cumulative seconds})."""
    ports = port if isinstance(port, (list, tuple)) else [port]
    requests = {p: build_request(p, path, token, _chat_body(stream)) for p in ports}
    warm = max(3, 50 // concurrency)
    pids = dict(pids or {})
    raw = asyncio.run(_run_phase(ports, requests, count, concurrency, warm,
                                 list(pids.values()), phase_timeout))
    if settle_s and pids:
        # Usage rows are written after the response; let that tail finish so
        # its CPU is counted (an idle process adds next to nothing).
        time.sleep(settle_s)
        raw["cpu_end"] = [read_cpu(reader) for reader in pids.values()]
    ok = len(raw["latencies"])
    result = {
        "requests": count, "ok": ok, "errors": len(raw["errors"]),
        "error_sample": raw["errors"][:3], "concurrency": concurrency,
        "wall_s": raw["wall_s"], "warm_calls": raw["warm_calls"],
        "rps": ok / raw["wall_s"] if raw["wall_s"] > 0 else None,
        "timed_out": raw["timed_out"],
        "client_cpu_ms_per_call": 1000 * raw["self_cpu_s"] / ok if ok else None,
    }
    result.update(_summary("latency", raw["latencies"], 1000.0))
    if stream:
        result.update(_summary("ttfb", raw["ttfbs"], 1000.0))
    if raw["overheads"]:
        result.update(_summary("overhead_header", raw["overheads"], 1.0))
    if raw["cpu_start"] is not None and ok:
        result["cpu_ms_per_call"] = {
            name: 1000 * (end - start) / ok if start is not None and end is not None else None
            for name, start, end in zip(pids, raw["cpu_start"], raw["cpu_end"])}
    return result


def _summary(name, values, scale):
    if not values:
        return {}
    values = sorted(v * scale for v in values)
    return {f"{name}_p50_ms": percentile(values, 50), f"{name}_p99_ms": percentile(values, 99),
            f"{name}_mean_ms": sum(values) / len(values), f"{name}_max_ms": values[-1]}


def percentile(sorted_values, p):
    """Linear-interpolated percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = (len(sorted_values) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


# =============================================================================
# Processes, CPU, HTTP helpers
# =============================================================================

def proc_cpu_seconds(pid):
    """utime + stime of a process, all its threads included, from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def read_cpu(reader):
    """Cumulative CPU seconds of a pid, or of an object with cpu() (several processes)."""
    return proc_cpu_seconds(reader) if isinstance(reader, int) else reader.cpu()


def _self_cpu():
    times = os.times()
    return times.user + times.system


def wait_for_port(path, pattern, proc, timeout, what, offset=0):
    """The port a child bound to port 0 reports: read from the file it writes (from
    `offset` on) until `pattern` matches, within `timeout`. A port picked here and
    handed to the child could be taken by anyone in between."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, "rb") as f:
            f.seek(offset)
            found = pattern.search(f.read())
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} reported no port within {timeout:.0f}s")


def child_env(extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LLIMIT_") and k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy", "openai_api_key")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def http_request(port, method, path, body=None, headers=None, timeout=5.0):
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        payload = _dumps(body) if body is not None else None
        hdrs = dict(headers or {})
        if payload is not None:
            hdrs["Content-Type"] = "application/json"
        conn.request(method, path, body=payload, headers=hdrs)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def start_upstream(stream_gap_ms, tmpdir, arrivals_path=None):
    """The fake upstream on a port of its own choosing: (process, port)."""
    out_path = os.path.join(tmpdir, "upstream-arrivals.out" if arrivals_path else "upstream.out")
    extra = ["--arrivals", arrivals_path] if arrivals_path else []
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve-upstream", "0",
             "--stream-gap-ms", str(stream_gap_ms)] + extra,
            stdout=out, stderr=None, env=child_env({}))
    return proc, wait_for_port(out_path, READY, proc, 10, "fake upstream")


class Llimit:
    """One llimit server process on a temporary database."""

    def __init__(self, script, db_path, upstream_port, log_path, threads):
        self.script = script
        self.db_path = db_path
        self.upstream_port = upstream_port
        self.log_path = log_path
        self.threads = threads
        self.proc = None
        self.port = None

    def start(self, timeout=30.0):
        offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        env = child_env({"LLIMIT_ADMIN_TOKEN": ADMIN_TOKEN,
                         "LLIMIT_UPSTREAM_KEY": UPSTREAM_KEY,
                         "LLIMIT_THREADS": str(self.threads),
                         # One key carries every call here; the per-key and per-user
                         # caps (16 by default) would refuse the c=32 phase's extras.
                         "LLIMIT_MAX_CONCURRENT_PER_KEY": str(self.threads),
                         "LLIMIT_MAX_CONCURRENT_PER_USER": str(self.threads),
                         "LLIMIT_GRACE_SECONDS": "5"})
        beside = os.path.join(os.path.dirname(os.path.abspath(self.script)), "pricing.json")
        if not os.path.exists(beside):
            # Without the repository's prices file, price the fake model ourselves.
            own = os.path.join(os.path.dirname(self.db_path), "pricing.json")
            with open(own, "w") as f:
                json.dump({"gpt-4o-mini": {"input": 0.15, "cached_input": 0.075,
                                           "output": 0.6}}, f)
            env["LLIMIT_PRICING"] = own
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, self.script, "serve", "--host", HOST, "--port", "0",
                 "--db", self.db_path,
                 "--upstream-url", f"http://{HOST}:{self.upstream_port}/v1"],
                stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=os.path.dirname(os.path.abspath(self.script)))
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        try:  # the log is appended to across restarts: only what this start wrote
            self.port = wait_for_port(self.log_path, SERVING, self.proc, timeout, "llimit",
                                      offset)
        except RuntimeError as error:
            raise RuntimeError(f"{error}:\n" + self.log_tail()) from None
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llimit exited with code {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                status, _ = http_request(self.port, "GET", "/healthz", timeout=2)
                if status == 200:
                    return
                last = f"HTTP {status}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise RuntimeError(f"llimit /healthz not 200 within {timeout:.0f}s ({last}):\n"
                           + self.log_tail())

    def create_key(self):
        status, body = http_request(self.port, "POST", "/admin/keys", {"user": "bench"},
                                    {"Authorization": f"Bearer {ADMIN_TOKEN}"})
        if status not in (200, 201):
            raise RuntimeError(f"POST /admin/keys: HTTP {status}: {body[:500]!r}")
        created = json.loads(body)
        return created["key"], created.get("id")

    def add_plans(self):
        """Put the bench user on a plan of rolling and calendar limits that never block,
        their rolling periods starting mid-day (so a first partial day is read)."""
        starts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 36.5 * 3600))
        huge = 1e12
        plan = {"id": "bench-plan", "limits": [
            {"metric": "usd", "window": "30d", "amount": huge, "starts_at": starts,
             "alert_at": [99]},
            {"metric": "tokens", "window": "24h", "amount": huge, "starts_at": starts},
            {"metric": "requests", "window": "7d", "amount": huge, "starts_at": starts},
            {"metric": "usd", "window": "month", "amount": huge},
            {"metric": "requests", "window": "minute", "amount": huge}]}
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        for method, path, body in (("POST", "/admin/plans", plan),
                                   ("PUT", "/admin/users/bench", {"plan": "bench-plan"})):
            status, answer = http_request(self.port, method, path, body, auth)
            if status not in (200, 201):
                raise RuntimeError(f"{method} {path}: HTTP {status}: {answer[:500]!r}")

    def stop(self, timeout=20.0):
        """SIGTERM, then SIGKILL after `timeout`; the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log_progress("llimit did not stop on SIGTERM; killing it")
            self.proc.kill()
            return self.proc.wait(5)

    def log_tail(self, lines=30):
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def kill(proc):
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# =============================================================================
# Database: size, row count, synthetic events
# =============================================================================

def db_stats(db_path):
    """File sizes, logical (page) size and usage_events rows of a database."""
    files = sum(os.path.getsize(p) for p in (db_path, db_path + "-wal") if os.path.exists(p))
    stats = {"file_bytes": files, "logical_bytes": None, "usage_events": None}
    if not os.path.exists(db_path):
        return stats
    con = sqlite3.connect(db_path, timeout=10)
    try:
        page_size = con.execute("pragma page_size").fetchone()[0]
        pages = con.execute("pragma page_count").fetchone()[0]
        free = con.execute("pragma freelist_count").fetchone()[0]
        stats["logical_bytes"] = (pages - free) * page_size
        has_table = con.execute("select 1 from sqlite_master where type = 'table'"
                                " and name = 'usage_events'").fetchone()
        if has_table:
            stats["usage_events"] = con.execute("select count(*) from usage_events").fetchone()[0]
    finally:
        con.close()
    return stats


MODELS = ["gpt-4o-mini-2024-07-18", "gpt-4o-2024-08-06", "gpt-4.1-mini", "o4-mini",
          "claude-sonnet-4-5-20250929", "gpt-4o-mini-2024-07-18", "text-embedding-3-small"]
ENDPOINTS = ["/v1/chat/completions"] * 8 + ["/v1/embeddings", "/v1/responses"]
STATUSES = [200] * 48 + [429, 500]


def fill_events(db_path, count, key_id=None, user_name="bench"):
    """Insert `count` synthetic usage_events rows in one transaction; seconds taken."""
    con = sqlite3.connect(db_path, isolation_level=None, timeout=30)
    try:
        columns = con.execute("pragma table_info(usage_events)").fetchall()
        if not columns:
            raise RuntimeError("no usage_events table in the database")
        foreign = {row[3]: (row[2], row[4])
                   for row in con.execute("pragma foreign_key_list(usage_events)")}
        price_ids = []
        if con.execute("select 1 from sqlite_master where name = 'price_snapshots'").fetchone():
            price_ids = [r[0] for r in con.execute("select id from price_snapshots limit 50")]
        key_ids = [f"k_synth{i:04d}" for i in range(1000)]
        users = [f"user{i:03d}@example.com" for i in range(400)] + [None] * 20
        projects = ["default"] * 8 + ["proj-a", "proj-b"]
        pools = {}
        for column, (table, to_column) in foreign.items():
            values = [r[0] for r in con.execute(
                f'select "{to_column or "rowid"}" from "{table}" limit 1000')]
            pools[column] = values
        if key_id is not None and "key_id" not in foreign:
            key_ids = key_ids[:900] + [key_id] * 100      # 10 % of rows on the bench key
            users = users + [user_name] * 42

        now_ms = int(time.time() * 1000) - 60_000
        span_ms = 90 * 86_400_000
        rnd = random.Random(42)

        def common(i):
            created_ms = now_ms - span_ms + span_ms * i // count + rnd.randrange(1000)
            prompt = rnd.randrange(20, 4000)
            cached = prompt // 2 if rnd.random() < 0.3 else 0
            completion = rnd.randrange(1, 800)
            reasoning = completion // 3 if rnd.random() < 0.1 else 0
            cost = prompt * 150 + completion * 600
            return {
                "created_ms": created_ms, "prompt": prompt, "cached": cached,
                "completion": completion, "reasoning": reasoning, "cost": cost,
                "key": rnd.choice(key_ids), "user": rnd.choice(users),
                "project": rnd.choice(projects), "model": rnd.choice(MODELS),
                "endpoint": rnd.choice(ENDPOINTS), "status": rnd.choice(STATUSES),
                "stream": int(rnd.random() < 0.6),
                "price_id": rnd.choice(price_ids) if price_ids else None,
                "latency": round(rnd.uniform(150, 6000), 2),
                "overhead": round(rnd.uniform(0.2, 1.5), 3),
            }

        getters, names = [], []
        for _cid, name, ctype, notnull, default, pk in columns:
            lname, ltype = name.lower(), (ctype or "").upper()
            if pk and "INT" in ltype:
                continue                        # rowid alias: let SQLite number it
            getters.append(_column_getter(lname, ltype, bool(notnull), default,
                                          pools.get(name), rnd))
            names.append(name)
        sql = (f"insert into usage_events ({', '.join(chr(34) + n + chr(34) for n in names)})"
               f" values ({', '.join('?' * len(names))})")

        def rows():
            for i in range(count):
                values = common(i)
                yield tuple(get(values) for get in getters)

        started = time.perf_counter()
        con.execute("pragma synchronous = off")
        con.execute("begin immediate")
        con.executemany(sql, rows())
        con.execute("commit")
        con.execute("pragma wal_checkpoint(truncate)")
        return time.perf_counter() - started
    finally:
        con.close()


def _column_getter(name, ctype, notnull, default, pool, rnd):
    """A function from the row's common values to this column's value."""
    if pool:
        return lambda v: rnd.choice(pool)
    is_int = "INT" in ctype
    is_real = any(t in ctype for t in ("REAL", "FLOA", "DOUB"))
    if "created" in name or name in ("ts", "time", "timestamp", "at"):
        if is_int and (name.endswith("ms") or "_ms" in name):
            return lambda v: v["created_ms"]
        if is_int or is_real:
            return lambda v: v["created_ms"] // 1000
        return lambda v: dt.datetime.fromtimestamp(
            v["created_ms"] / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    direct = {
        "key_id": "key", "api_key_id": "key", "key": "key",
        "user_name": "user", "user": "user", "user_id": "user",
        "project_id": "project", "project": "project",
        "model": "model", "endpoint": "endpoint", "path": "endpoint",
        "status_code": "status", "status": "status", "http_status": "status",
        "stream": "stream", "streamed": "stream", "is_stream": "stream",
        "prompt_tokens": "prompt", "input_tokens": "prompt",
        "cached_tokens": "cached", "cache_read_tokens": "cached",
        "completion_tokens": "completion", "output_tokens": "completion",
        "reasoning_tokens": "reasoning",
        "cost_nusd": "cost", "price_id": "price_id",
        "latency_ms": "latency", "overhead_ms": "overhead",
    }
    if name in direct:
        field = direct[name]
        if field in ("user", "key") and notnull:
            return lambda v: v[field] or "bench"
        if field == "price_id" and notnull:
            return lambda v: v[field] or 0
        if field == "status" and not (is_int or is_real):
            return lambda v: "ok" if v["status"] == 200 else "error"
        return lambda v: v[field]
    if name == "total_tokens":
        return lambda v: v["prompt"] + v["completion"]
    if name in ("cost_usd", "cost"):
        return lambda v: v["cost"] / 1e9
    if name == "pricing":
        return lambda v: "priced"
    if "token" in name:
        return lambda v: 0
    if name.endswith("_ms"):
        return lambda v: round(rnd.uniform(0.1, 50), 3)
    if not notnull:
        return lambda v: None
    if default is not None:
        value = default.strip("'\"")
        if is_int:
            try:
                value = int(value)
            except ValueError:
                value = 0
        return lambda v: value
    if is_int:
        return lambda v: 0
    if is_real:
        return lambda v: 0.0
    return lambda v: ""


# =============================================================================
# PostgreSQL: a fresh schema, the server's CPU, a round-trip counting proxy
# =============================================================================

DEFAULT_POSTGRES = "postgresql:///llimit_bench?host=/var/run/postgresql"
SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST = 80877103, 80877104, 80877102


def _postgres_url(params):
    """A postgresql:// URL (llimit takes no other form) of libpq connection parameters."""
    import urllib.parse
    params = dict(params)
    user, password = params.pop("user", None), params.pop("password", None)
    dbname = params.pop("dbname", "")
    auth = ""
    if user:
        auth = urllib.parse.quote(user, safe="")
        if password:
            auth += ":" + urllib.parse.quote(password, safe="")
        auth += "@"
    query = urllib.parse.urlencode(params, quote_via=urllib.parse.quote)
    return f"postgresql://{auth}/{urllib.parse.quote(dbname)}" + (f"?{query}" if query else "")


class Postgres:
    """The bench's PostgreSQL database: fresh schemas for llimit, their size and rows, and
    the CPU of the server processes (read from /proc, so that cost is not hidden)."""

    def __init__(self, url):
        try:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict
        except ImportError:
            raise RuntimeError('--postgres needs the driver: pip install -r '
                               'requirements-postgres.txt') from None
        self.psycopg = psycopg
        self.params = conninfo_to_dict(url)
        self.url = _postgres_url(self.params)
        self.schemas = []
        try:
            self.admin = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as error:
            if "does not exist" not in str(error):
                raise RuntimeError(f"no PostgreSQL at {url}: {error}") from None
            with psycopg.connect(_postgres_url({**self.params, "dbname": "postgres"}),
                                 autocommit=True, connect_timeout=5) as server:
                server.execute(f'create database "{self.params["dbname"]}"')
            log_progress(f"created database {self.params['dbname']}")
            self.admin = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        self.dbname = self.admin.execute("select current_database()").fetchone()[0]
        self.own_pid = self.admin.execute("select pg_backend_pid()").fetchone()[0]
        self.version = self.admin.execute("show server_version").fetchone()[0]

    def new_schema(self, through=None):
        """(URL of llimit's fresh schema, schema); `through` replaces the host (a proxy's
        socket directory) so its connections pass through it."""
        schema = f"bench_{os.getpid()}_{len(self.schemas)}_{random.randrange(1 << 24):06x}"
        self.admin.execute(f"create schema {schema}")
        self.schemas.append(schema)
        params = {**self.params, "options": f"-csearch_path={schema}"}
        if through is not None:
            params["host"] = through
            params.pop("hostaddr", None)
        return _postgres_url(params), schema

    def drop_schemas(self):
        for schema in self.schemas:
            try:
                self.admin.execute(f"drop schema if exists {schema} cascade")
            except self.psycopg.Error as error:
                log_progress(f"could not drop schema {schema}: {error}")
        self.schemas = []
        self.admin.close()

    def stats(self, schema):
        """Bytes of the schema's tables (with indexes and TOAST) and usage_events rows."""
        size = self.admin.execute(
            "select coalesce(sum(pg_total_relation_size(c.oid)), 0) from pg_class c"
            " join pg_namespace n on n.oid = c.relnamespace"
            " where n.nspname = %s and c.relkind in ('r', 'm')", (schema,)).fetchone()[0]
        try:
            rows = self.admin.execute(f"select count(*) from {schema}.usage_events").fetchone()[0]
        except self.psycopg.Error:
            rows = None
        return {"file_bytes": int(size), "logical_bytes": int(size), "usage_events": rows}

    def backend_pids(self):
        """{pid: kind}: the backends connected to the bench database (but this one) and
        the server's background processes (WAL writer, checkpointer...), which also serve
        whatever else runs on the cluster."""
        pids = {}
        for pid, datname, backend_type in self.admin.execute(
                "select pid, datname, backend_type from pg_stat_activity"):
            if pid == self.own_pid:
                continue
            if datname == self.dbname and backend_type == "client backend":
                pids[pid] = "backends"
            elif datname is None:
                pids[pid] = "background"
        return pids


class ServerCpu:
    """Cumulative CPU seconds of a changing set of processes (PostgreSQL backends come and
    go with llimit's pool); one reader per kind ("backends" or "background")."""

    def __init__(self, postgres, kind):
        self.postgres = postgres
        self.kind = kind
        self.seen = self._now()
        self.total = 0.0

    def _now(self):
        now = {}
        for pid, kind in self.postgres.backend_pids().items():
            seconds = proc_cpu_seconds(pid) if kind == self.kind else None
            if seconds is not None:
                now[pid] = seconds
        return now

    def cpu(self):
        now = self._now()
        # A process not seen before started since the last reading: all its CPU counts.
        # One that exited since then loses its last stretch (pools keep theirs open).
        self.total += sum(seconds - self.seen.get(pid, 0.0) for pid, seconds in now.items())
        self.seen.update(now)
        return self.total


def serve_pg_proxy(socket_dir, target, log_path):
    """A PostgreSQL wire protocol proxy on `socket_dir`/.s.PGSQL.<port> that forwards
    to `target` (a Unix socket path, or host:port) and writes one line per round trip
    (a Sync or a simple Query from the client): monotonic ns, connection, statements."""
    log = open(log_path, "w", buffering=1)
    counter = [0]

    async def pipe(reader, writer, seen=None):
        """Copy bytes from reader to writer, handing each piece to `seen` once sent."""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
                if seen is not None:
                    seen(data)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(client_reader, client_writer):
        counter[0] += 1
        conn_id = counter[0]
        if target.startswith("/"):
            server_reader, server_writer = await asyncio.open_unix_connection(target)
        else:
            host, port = target.rsplit(":", 1)
            server_reader, server_writer = await asyncio.open_connection(host, int(port))
        back = asyncio.ensure_future(pipe(server_reader, client_writer))
        prepared, batch, current = {}, [], [None]
        state = {"buffer": b"", "started": False}

        def seen(data):
            """Parse the client's messages; log a round trip at each Sync or Query."""
            now = time.monotonic_ns()
            buffer = state["buffer"] + data
            while True:
                if not state["started"]:
                    if len(buffer) < 8:
                        break
                    length = int.from_bytes(buffer[:4], "big")
                    if len(buffer) < length:
                        break
                    code = int.from_bytes(buffer[4:8], "big")
                    buffer = buffer[length:]
                    state["started"] = code not in (SSL_REQUEST, GSSENC_REQUEST)
                    continue
                if len(buffer) < 5:
                    break
                kind, length = buffer[:1], int.from_bytes(buffer[1:5], "big")
                if len(buffer) < 1 + length:
                    break
                body, buffer = buffer[5:1 + length], buffer[1 + length:]
                if kind == b"P":
                    name, query = body.split(b"\0", 2)[:2]
                    prepared[name] = query.decode("utf-8", "replace")
                    current[0] = prepared[name]
                elif kind == b"B":
                    current[0] = prepared.get(body.split(b"\0", 2)[1], "?")
                elif kind == b"E":
                    batch.append(current[0] or "?")
                elif kind == b"Q":
                    batch.append(body.rstrip(b"\0").decode("utf-8", "replace"))
                if kind in (b"S", b"Q"):
                    if not batch:
                        batch.append("prepare: " + (current[0] or "?"))
                    log.write(f"{now} {conn_id} {json.dumps(batch)}\n")
                    batch.clear()
            state["buffer"] = buffer

        await pipe(client_reader, server_writer, seen)
        await back

    async def start():
        port = target.rsplit(".", 1)[-1] if target.startswith("/") else target.rsplit(":", 1)[1]
        path = os.path.join(socket_dir, f".s.PGSQL.{port}")
        return await asyncio.start_unix_server(handle, path), port

    serve_until_killed(start)


def start_pg_proxy(postgres, tmpdir):
    """The counting proxy in front of `postgres`: (process, socket directory, log path)."""
    host = postgres.params.get("host") or "/var/run/postgresql"
    port = postgres.params.get("port") or "5432"
    target = (os.path.join(host, f".s.PGSQL.{port}") if host.startswith("/")
              else f"{host}:{port}")
    socket_dir = tempfile.mkdtemp(prefix="pgproxy-", dir=tmpdir)
    log_path = os.path.join(tmpdir, "pgproxy.log")
    out_path = os.path.join(tmpdir, "pgproxy.out")
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve-pg-proxy", socket_dir,
             "--pg-target", target, "--pg-log", log_path],
            stdout=out, stderr=None, env=child_env({}))
    wait_for_port(out_path, READY, proc, 10, "PostgreSQL proxy")
    return proc, socket_dir, log_path


def _statement_origin(text, source):
    """`function (llimit.py:line)` that sends a statement, found by its first words in
    llimit.py (psycopg sends `$1` where llimit wrote `?`): the function around them, or
    for a module-level SQL constant the first function that uses it."""
    words = " ".join(text.split())
    if words.lower() in ("begin", "commit", "rollback"):
        at = source.find("\nclass transaction")
        return None if at < 0 else f"transaction (llimit.py:{source.count(chr(10), 0, at) + 2})"
    head = re.split(r"\$\d|%s|\?|\(", words)[0].strip()[:40]
    found = [m.start() for m in re.finditer(re.escape(head), source)] if len(head) >= 8 else []
    if not found:
        return None
    # Python's own SQL starts a string literal; the same words inside a migration's
    # SQL (a PostgreSQL function's body) do not.
    at = next((i for i in found if source[i - 1] in "\"'"), found[0])
    definitions = list(re.finditer(r"^\s*def (\w+)|^([A-Z][A-Z0-9_]*) = \(", source[:at], re.M))
    if not definitions:
        return None
    last = definitions[-1]
    if last.group(2):                  # a constant: where it is used
        used = re.search(r"\b%s\b" % last.group(2), source[last.end():])
        if used is None:
            return last.group(2)
        at = last.end() + used.start()
        last = list(re.finditer(r"^\s*def (\w+)", source[:at], re.M))[-1]
    return f"{last.group(1)} (llimit.py:{source.count(chr(10), 0, at) + 1})"


def _round_trip_name(statements):
    """The statements of one round trip, each once with how many times it was sent."""
    names, counts = [], {}
    for statement in statements:
        text = " ".join(statement.split())[:90]
        if text not in counts:
            names.append(text)
        counts[text] = counts.get(text, 0) + 1
    return " | ".join(name + (f" ×{counts[name]}" if counts[name] > 1 else "")
                      for name in names)


def count_round_trips(postgres, script, tmpdir, threads, stream_gap_ms, calls=200, warm=30):
    """PostgreSQL round trips per call, through the counting proxy, on a llimit of its
    own (so the timed phases do not pay for the proxy): sequential calls, each call's
    round trips before upstream being those between the client sending it and the fake
    upstream receiving it (one monotonic clock for all three processes). Measured on a
    key without limits, then again once the key has two block limits (a daily dollar
    budget and requests per minute, never reached), whose calls reserve their worst case."""
    proxy, socket_dir, log_path = start_pg_proxy(postgres, tmpdir)
    arrivals_path = os.path.join(tmpdir, "arrivals.log")
    upstream = llimit = None
    sets, made = [], [0]
    try:
        upstream, upstream_port = start_upstream(stream_gap_ms, tmpdir, arrivals_path)
        url, _schema = postgres.new_schema(through=socket_dir)
        llimit = Llimit(script, url, upstream_port, os.path.join(tmpdir, "llimit-rt.log"),
                        threads)
        llimit.start()
        raw_key, key_id = llimit.create_key()
        headers = {"Authorization": f"Bearer {raw_key}", "Content-Type": "application/json"}

        def send(label):
            conn = http.client.HTTPConnection(HOST, llimit.port, timeout=15)
            sent = []
            for i in range(warm + calls):
                stream = i % 4 == 3
                started = time.monotonic_ns()
                conn.request("POST", "/v1/chat/completions", body=_chat_body(stream),
                             headers=headers)
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"round trips: HTTP {response.status}: {body[:300]!r}")
                if i >= warm:
                    sent.append((made[0], started, time.monotonic_ns()))
                made[0] += 1
            conn.close()
            time.sleep(1.0)   # the last usage write
            sets.append((label, sent))

        send("no limits")
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        for limit in ({"metric": "usd", "window": "day", "amount": 1e6},
                      {"metric": "requests", "window": "minute", "amount": 1e6}):
            status, answer = http_request(llimit.port, "POST", "/admin/limits", dict(
                limit, scope="key", target=key_id, action="block"), auth)
            if status not in (200, 201):
                raise RuntimeError(f"POST /admin/limits: HTTP {status}: {answer[:300]!r}")
        send("two block limits (key: USD per day, requests per minute)")
        log_progress("round trips: stopping llimit")
        llimit.stop()
        llimit = None
    finally:
        if llimit is not None:
            llimit.stop()
        kill(upstream)
        kill(proxy)
    with open(arrivals_path) as f:
        arrivals = [int(line) for line in f if line.strip()]
    trips = []
    with open(log_path) as f:
        for line in f:
            stamp, conn_id, statements = line.split(" ", 2)
            trips.append((int(stamp), int(conn_id), json.loads(statements)))
    with open(script) as f:
        source = f.read()
    if len(arrivals) != made[0]:
        raise RuntimeError(f"round trips: {len(arrivals)} calls reached the upstream, "
                           f"{made[0]} were made")

    def described(counts):
        return [{"statements": key, "per_call": count / calls,
                 "from": _statement_origin(key.split(" | ")[0].split(" ×")[0]
                                           .removeprefix("prepare: "), source)}
                for key, count in sorted(counts.items(), key=lambda kv: -kv[1])]

    results = []
    for label, sent in sets:
        before, during, per_call_before, per_call_after, waits = {}, {}, [], [], []
        for index, start, end in sent:
            arrived = arrivals[index]
            if not start <= arrived <= end:
                raise RuntimeError("round trips: upstream arrivals do not match the calls")
            n, after = 0, []
            for stamp, _conn, statements in trips:
                if start <= stamp <= arrived:
                    n += 1
                    key = _round_trip_name(statements)
                    before[key] = before.get(key, 0) + 1
                elif arrived < stamp <= end:
                    after.append(stamp)
            per_call_before.append(n)
            # Round trips after the upstream was reached and before the answer's end
            # (the usage write the answer waits for), and their span.
            per_call_after.append(len(after))
            if after:
                waits.append((max(after) - min(after)) / 1e6)
        first, last = sent[0][1], sent[-1][2] + 900_000_000
        total = 0
        for stamp, _conn, statements in trips:
            if first <= stamp <= last:
                total += 1
                key = _round_trip_name(statements)
                during[key] = during.get(key, 0) + 1
        results.append({
            "label": label, "calls": calls,
            "streams": sum(1 for i in range(warm, warm + calls) if i % 4 == 3),
            "before_upstream_per_call": sum(per_call_before) / calls,
            "before_upstream_max": max(per_call_before),
            "before_upstream_min": min(per_call_before),
            "before_upstream": described(before),
            "answer_waits_per_call": sum(per_call_after) / calls,
            "answer_waits_span_p50_ms": percentile(sorted(waits), 50) if waits else None,
            "all_per_call": total / calls, "all": described(during)})
    return results


# =============================================================================
# A round: direct and through llimit
# =============================================================================

def log_progress(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_target(name, port, path, token, sizes, pids, phase_timeout):
    """The three phases against one base URL."""
    out = {}
    log_progress(f"{name}: c=1 non-stream x{sizes['c1']}")
    out["c1"] = run_phase(port, path, token, False, sizes["c1"], 1, pids, settle_s=0.3,
                          phase_timeout=phase_timeout)
    log_progress(f"{name}: c={sizes['conc']} non-stream x{sizes['cN']}")
    out["cN"] = run_phase(port, path, token, False, sizes["cN"], sizes["conc"], pids,
                          settle_s=0.5, phase_timeout=phase_timeout)
    log_progress(f"{name}: c=1 stream x{sizes['stream']}")
    out["stream"] = run_phase(port, path, token, True, sizes["stream"], 1, pids,
                              settle_s=0.3, phase_timeout=phase_timeout)
    for phase, result in out.items():
        if result["errors"]:
            log_progress(f"{name} {phase}: {result['errors']} errors, e.g. "
                         f"{result['error_sample'][0]}")
    return out


def calls_made(target):
    return sum(r["ok"] + r["warm_calls"] for r in target.values())


def run_round(label, events, upstream, upstream_port, llimit, raw_key, sizes, args):
    result = {"label": label, "events": events}
    result["direct"] = measure_target("direct", upstream_port, "/v1/chat/completions",
                                      UPSTREAM_KEY, sizes, {"upstream": upstream.pid},
                                      args.phase_timeout)
    if llimit is None:
        return result
    before = db_stats(llimit.db_path)
    result["llimit"] = measure_target("llimit", llimit.port, "/v1/chat/completions", raw_key,
                                      sizes, {"llimit": llimit.proc.pid,
                                              "upstream": upstream.pid},
                                      args.phase_timeout)
    calls = calls_made(result["llimit"])
    log_progress("stopping llimit to read the database")
    result["llimit_exit_code"] = llimit.stop()
    if result["llimit_exit_code"] not in (0, None):
        log_progress(f"llimit exited with code {result['llimit_exit_code']} on SIGTERM:\n"
                     + llimit.log_tail(6))
    result["db"] = db_growth(before, db_stats(llimit.db_path), calls)
    return result


def db_growth(before, after, calls):
    return {
        "before": before, "after": after, "calls_through_llimit": calls,
        "rows_added": (after["usage_events"] - before["usage_events"]
                       if after["usage_events"] is not None and before["usage_events"] is not None
                       else None),
        "bytes_per_call": ((after["logical_bytes"] - before["logical_bytes"]) / calls
                           if calls and after["logical_bytes"] is not None else None),
        "file_bytes_per_call": after["file_bytes"] / calls if calls else None,
    }


def run_postgres(postgres, instances, upstream, upstream_port, sizes, args, tmpdir):
    """The phases through `instances` llimit processes on one fresh PostgreSQL schema, the
    load spread over them in turn; CPU of every llimit process (summed as "llimit"), and
    of the PostgreSQL server's backends and background processes, each on its own."""
    name = f"postgres x{instances}"
    url, schema = postgres.new_schema()
    servers = []
    try:
        for n in range(instances):
            server = Llimit(args.llimit, url, upstream_port,
                            os.path.join(tmpdir, f"llimit-pg{instances}-{n + 1}.log"),
                            args.threads)
            server.start()
            servers.append(server)
        raw_key, key_id = servers[0].create_key()
        log_progress(f"{name}: llimit on ports {[s.port for s in servers]} "
                     f"(pids {[s.proc.pid for s in servers]}), key {key_id}, schema {schema}")
        pids = {f"llimit-{n + 1}": s.proc.pid for n, s in enumerate(servers)}
        pids["upstream"] = upstream.pid
        pids["postgres"] = ServerCpu(postgres, "backends")
        pids["postgres_background"] = ServerCpu(postgres, "background")
        before = postgres.stats(schema)
        result = measure_target(name, [s.port for s in servers], "/v1/chat/completions",
                                raw_key, sizes, pids, args.phase_timeout)
        for phase in result.values():
            cpu = phase.get("cpu_ms_per_call") or {}
            parts = [cpu.get(f"llimit-{n + 1}") for n in range(instances)]
            cpu["llimit"] = sum(parts) if None not in parts else None
        calls = calls_made(result)
        log_progress(f"{name}: stopping llimit to read the database")
        codes = [s.stop() for s in servers]
        out = {"instances": instances, "llimit": result, "llimit_exit_codes": codes,
               "db": db_growth(before, postgres.stats(schema), calls)}
        return out
    finally:
        for server in servers:
            server.stop()


# =============================================================================
# Report
# =============================================================================

def _fmt(value, digits=2, unit=""):
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}{unit}"


def _get(round_, target, phase, field, index=None):
    try:
        value = round_[target][phase][field]
    except (KeyError, TypeError):
        return None
    if index is not None:
        value = (value or {}).get(index)
    return value


def _sub(a, b):
    return a - b if a is not None and b is not None else None


def _check(value, target, higher_is_better=False):
    if value is None:
        return "?"
    ok = value >= target if higher_is_better else value <= target
    return "✓" if ok else "✗"


def table_rows(round_, conc):
    """[(metric, direct, llimit, added, target, check)] for one round."""
    rows = []

    def latency(label, phase, field, target=None):
        direct = _get(round_, "direct", phase, field)
        through = _get(round_, "llimit", phase, field)
        added = _sub(through, direct)
        if target is None or "llimit" not in round_:
            rows.append((label, _fmt(direct), _fmt(through), _fmt(added), "", ""))
        else:
            rows.append((label, _fmt(direct), _fmt(through), _fmt(added),
                         f"added ≤ {target:g} ms", _check(added, target)))

    latency("latency p50, c=1 (ms)", "c1", "latency_p50_ms", TARGET_ADDED_P50_MS)
    latency("latency p99, c=1 (ms)", "c1", "latency_p99_ms", TARGET_ADDED_P99_MS)
    latency(f"latency p50, c={conc} (ms)", "cN", "latency_p50_ms")
    latency(f"latency p99, c={conc} (ms)", "cN", "latency_p99_ms")
    direct_rps = _get(round_, "direct", "cN", "rps")
    llimit_rps = _get(round_, "llimit", "cN", "rps")
    rows.append((f"requests/s, c={conc}", _fmt(direct_rps, 0), _fmt(llimit_rps, 0), "",
                 f"≥ {TARGET_RPS:g} req/s", _check(llimit_rps, TARGET_RPS, True))
                if "llimit" in round_ else
                (f"requests/s, c={conc}", _fmt(direct_rps, 0), "", "", "", ""))
    latency("stream first byte p50, c=1 (ms)", "stream", "ttfb_p50_ms", TARGET_TTFB_ADDED_MS)
    latency("stream first byte p99, c=1 (ms)", "stream", "ttfb_p99_ms")
    latency("stream complete p50, c=1 (ms)", "stream", "latency_p50_ms")
    if "llimit" in round_:
        for phase, label in (("c1", "c=1"), ("cN", f"c={conc}"), ("stream", "stream")):
            p50 = _get(round_, "llimit", phase, "overhead_header_p50_ms")
            p99 = _get(round_, "llimit", phase, "overhead_header_p99_ms")
            rows.append((f"X-LLimit-Overhead-Ms p50 / p99, {label} (ms)", "",
                         f"{_fmt(p50, 2)} / {_fmt(p99, 2)}" if p50 is not None else "absent",
                         "", "", ""))
        cpu = _get(round_, "llimit", "cN", "cpu_ms_per_call", "llimit")
        rows.append((f"llimit CPU per call, c={conc} (ms)", "", _fmt(cpu, 3), "",
                     f"≤ {TARGET_CPU_MS:g} ms", _check(cpu, TARGET_CPU_MS)))
        cpu1 = _get(round_, "llimit", "c1", "cpu_ms_per_call", "llimit")
        rows.append(("llimit CPU per call, c=1 (ms)", "", _fmt(cpu1, 3), "", "", ""))
        up_direct = _get(round_, "direct", "cN", "cpu_ms_per_call", "upstream")
        up_llimit = _get(round_, "llimit", "cN", "cpu_ms_per_call", "upstream")
        rows.append((f"fake upstream CPU per call, c={conc} (ms)", _fmt(up_direct, 3),
                     _fmt(up_llimit, 3), "", "", ""))
        db = round_.get("db", {})
        rows.append(("database bytes per stored call", "", _fmt(db.get("bytes_per_call"), 0),
                     "", "", ""))
        after = db.get("after", {})
        rows.append(("usage_events rows: total (added / calls)", "",
                     f"{_fmt(after.get('usage_events'), 0)} "
                     f"({_fmt(db.get('rows_added'), 0)} / "
                     f"{_fmt(db.get('calls_through_llimit'), 0)})", "", "", ""))
    client = _get(round_, "direct", "cN", "client_cpu_ms_per_call")
    rows.append((f"bench client CPU per call, c={conc} (ms)", _fmt(client, 3),
                 _fmt(_get(round_, "llimit", "cN", "client_cpu_ms_per_call"), 3), "", "", ""))
    return rows


def render_markdown(results):
    rounds = results["rounds"]
    conc = results["config"]["concurrency"]
    machine = results["machine"]
    out = []
    out.append(f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), "
               f"Python {machine['python']}, {machine['platform']}; "
               f"{results['config']['c1']} / {results['config']['cN']} / "
               f"{results['config']['stream']} requests (c=1 / c={conc} / stream), "
               f"fake upstream stream gap {results['config']['stream_gap_ms']} ms.")
    out.append("")
    first = table_rows(rounds[0], conc)
    if "llimit" not in rounds[0]:
        out.append("| metric | direct (fake upstream) |")
        out.append("|---|---:|")
        for metric, direct, *_ in first:
            if direct:
                out.append(f"| {metric} | {direct} |")
        up_cpu = _get(rounds[0], "direct", "cN", "cpu_ms_per_call", "upstream")
        out.append(f"| fake upstream CPU per call, c={conc} (ms) | {_fmt(up_cpu, 3)} |")
    elif len(rounds) == 1:
        out.append("| metric | direct | through llimit | added | target |")
        out.append("|---|---:|---:|---:|---|")
        for metric, direct, through, added, target, check in first:
            target = f"{target} {check}" if target else ""
            out.append(f"| {metric} | {direct} | {through} | {added} | {target} |")
    else:
        second = table_rows(rounds[1], conc)
        events = rounds[1]["events"]
        out.append(f"| metric | direct | llimit, empty DB | added | "
                   f"llimit, {events:,} events | added | target |")
        out.append("|---|---:|---:|---:|---:|---:|---|")
        for a, b in zip(first, second):
            target = f"{a[4]} ({a[5]} / {b[5]})" if a[4] else ""
            out.append(f"| {a[0]} | {a[1]} | {a[2]} | {a[3]} | {b[2]} | {b[3]} | {target} |")
        out.append("")
        out.append(f"Each round measures the upstream directly right before llimit; "
                   f"\"added\" is against that round's direct run "
                   f"(direct p50 c=1 in round 2: "
                   f"{_fmt(_get(rounds[1], 'direct', 'c1', 'latency_p50_ms'))} ms). "
                   f"{events:,} synthetic events inserted in "
                   f"{_fmt(rounds[1].get('fill_seconds'), 1)} s; database then "
                   f"{_fmt((rounds[1].get('db') or {}).get('before', {}).get('logical_bytes', 0) / 1e6, 1)} MB.")
    out.append("")
    out.append("CPU is utime+stime from /proc/<pid>/stat over the timed phase (plus a short "
               "settle for the usage writer), divided by the calls made; database bytes per "
               "call is the growth of the used pages over the calls made through llimit.")
    return "\n".join(out)


def render_postgres(results):
    """SQLite, PostgreSQL and PostgreSQL with two instances side by side, against the
    direct run of the same round; then the round trips to PostgreSQL per call."""
    conc = results["config"]["concurrency"]
    machine = results["machine"]
    pg = results["postgres"]
    base = results["rounds"][0]
    columns = [("SQLite", base)] + [
        ("PostgreSQL" if run["instances"] == 1 else f"PostgreSQL, {run['instances']} instances",
         {"direct": base["direct"], "llimit": run["llimit"], "db": run["db"]})
        for run in pg["runs"]]
    tables = [table_rows(round_, conc) for _, round_ in columns]
    out = [f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), "
           f"Python {machine['python']}, {machine['platform']}, PostgreSQL "
           f"{pg['server_version']} at {pg['url']}; {results['config']['c1']} / "
           f"{results['config']['cN']} / {results['config']['stream']} requests (c=1 / "
           f"c={conc} / stream), fake upstream stream gap "
           f"{results['config']['stream_gap_ms']} ms.", ""]
    head = "| metric | direct | " + " | ".join(f"{name} | added" for name, _ in columns)
    out.append(head + " | target |")
    out.append("|---|---:|" + "---:|---:|" * len(columns) + "---|")
    for rows in zip(*tables):
        target = rows[0][4]
        checks = " / ".join(row[5] for row in rows) if target else ""
        out.append(f"| {rows[0][0]} | {rows[0][1]} | "
                   + " | ".join(f"{row[2]} | {row[3]}" for row in rows)
                   + f" | {target} {'(' + checks + ')' if checks else ''} |")

    def extra(label, values):
        out.append(f"| {label} | | " + " | ".join(f"{v} | " for v in values) + " |")

    for phase, label in (("cN", f"c={conc}"), ("c1", "c=1")):
        extra(f"PostgreSQL backends CPU per call, {label} (ms)",
              [""] + [_fmt(_get(r, "llimit", phase, "cpu_ms_per_call", "postgres"), 3)
                      for _, r in columns[1:]])
    extra(f"PostgreSQL background processes CPU per call, c={conc} (ms)",
          [""] + [_fmt(_get(r, "llimit", "cN", "cpu_ms_per_call", "postgres_background"), 3)
                  for _, r in columns[1:]])

    def total(round_):
        cpu = _get(round_, "llimit", "cN", "cpu_ms_per_call") or {}
        parts = [cpu.get(k) for k in ("llimit", "postgres", "postgres_background")
                 if k in cpu or k == "llimit"]
        return sum(parts) if parts and None not in parts else None
    extra(f"llimit + database server CPU per call, c={conc} (ms)",
          [_fmt(total(r), 3) for _, r in columns])
    sets = pg.get("round_trips") or []
    for trips in sets:
        extra(f"PostgreSQL round trips before upstream per call, {trips['label']}",
              ["0 (in-process)"] + [
                  f"{trips['before_upstream_per_call']:.2f} (min {trips['before_upstream_min']},"
                  f" max {trips['before_upstream_max']})"] + [""] * (len(columns) - 2))
        extra(f"PostgreSQL round trips after upstream that the answer waits for, per call"
              f" (their span p50, ms), {trips['label']}",
              [""] + [f"{trips['answer_waits_per_call']:.2f} "
                      f"({_fmt(trips['answer_waits_span_p50_ms'])})"] + [""] * (len(columns) - 2))
        extra(f"PostgreSQL round trips per call, all (usage write included), {trips['label']}",
              [""] + [f"{trips['all_per_call']:.2f}"] + [""] * (len(columns) - 2))
    out.append("")
    out.append("llimit CPU is every llimit process's utime+stime from /proc (both, with two "
               "instances); the PostgreSQL server's is reported apart: its backends serving "
               "the bench database, and its background processes (WAL writer, checkpointer..."
               "), which also serve anything else running on the cluster. \"added\" is "
               "against the round's direct run, measured before SQLite.")
    for trips in sets:
        out.append("")
        out.append(f"Round trips to PostgreSQL, {trips['label']}: counted by a proxy that reads "
                   f"the protocol (one per Sync or simple Query), on a llimit instance of their "
                   f"own, {trips['calls']} sequential calls ({trips['streams']} streams); "
                   f"before upstream = between the client sending a call and the upstream "
                   f"receiving it.")
        out.append("")
        out.append("| per call | before upstream / all | statements | sent by |")
        out.append("|---:|---|---|---|")
        for group, items in (("before upstream", trips["before_upstream"]),
                             ("all", trips["all"])):
            for item in items:
                out.append(f"| {item['per_call']:.2f} | {group} | `{item['statements']}` | "
                           f"{item['from'] or '?'} |")
    return "\n".join(out)


def machine_info():
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count()
    return {"nproc": nproc, "cpu_model": model, "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.release()}"}


# =============================================================================
# Main
# =============================================================================

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=None,
                        help="requests in the c=32 phase (default 5000; --quick 1000); the "
                             "c=1 phase makes 2/5 of that and the stream phase 1/10")
    parser.add_argument("--quick", action="store_true", help="a smaller run")
    parser.add_argument("--events", type=int, default=0,
                        help="also measure after bulk-inserting N synthetic usage events")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("--plans", action="store_true",
                        help="put the bench user on a plan of rolling and calendar limits")
    parser.add_argument("--direct-only", action="store_true",
                        help="only measure the fake upstream (no llimit)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--llimit", default=DEFAULT_LLIMIT, help="path of llimit.py")
    parser.add_argument("--threads", type=int, default=64, help="LLIMIT_THREADS")
    parser.add_argument("--stream-gap-ms", type=float, default=1.0,
                        help="pause of the fake upstream between stream events")
    parser.add_argument("--phase-timeout", type=float, default=40.0,
                        help="stop a phase after this many seconds")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (database, llimit log)")
    parser.add_argument("--large-answer", type=int, default=0, metavar="N",
                        help="only measure llimit's CPU per call for N non-stream calls"
                             " whose answer is a ~1 MiB embeddings body")
    parser.add_argument("--postgres", nargs="?", const=DEFAULT_POSTGRES, metavar="URL",
                        help="also run the phases on PostgreSQL (default URL: the local"
                             f" server of tests/install.sh, {DEFAULT_POSTGRES}; the database"
                             " is made if missing, llimit gets fresh schemas, dropped after)"
                             " and count its round trips per call")
    parser.add_argument("--instances", type=int, default=1, choices=(1, 2),
                        help="2: also two llimit processes on one PostgreSQL database, the"
                             " load spread over both (implies --postgres)")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT",
                        help=argparse.SUPPRESS)
    parser.add_argument("--arrivals", help=argparse.SUPPRESS)
    parser.add_argument("--serve-pg-proxy", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--pg-target", help=argparse.SUPPRESS)
    parser.add_argument("--pg-log", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def sizes_for(args):
    if args.requests:
        n = args.requests
        return {"c1": max(50, n * 2 // 5), "cN": n, "stream": max(20, n // 10),
                "conc": args.concurrency}
    if args.quick:
        return {"c1": 300, "cN": 1000, "stream": 100, "conc": args.concurrency}
    return {"c1": 2000, "cN": 5000, "stream": 500, "conc": args.concurrency}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.serve_upstream is not None:
        serve_upstream(args.serve_upstream, args.stream_gap_ms, args.arrivals)
        return 0
    if args.serve_pg_proxy is not None:
        serve_pg_proxy(args.serve_pg_proxy, args.pg_target, args.pg_log)
        return 0
    if args.instances > 1 and not args.postgres:
        args.postgres = DEFAULT_POSTGRES
    if args.postgres and (args.direct_only or args.large_answer):
        raise RuntimeError("--postgres measures llimit: not with --direct-only or --large-answer")
    sizes = sizes_for(args)
    started = time.monotonic()
    tmpdir = tempfile.mkdtemp(prefix="llimit-bench-")
    upstream = llimit = postgres = None
    results = {"machine": machine_info(),
               "config": {"c1": sizes["c1"], "cN": sizes["cN"], "stream": sizes["stream"],
                          "concurrency": sizes["conc"], "threads": args.threads,
                          "events": args.events, "stream_gap_ms": args.stream_gap_ms,
                          "direct_only": args.direct_only},
               "targets": {"added_p50_ms_c1": TARGET_ADDED_P50_MS,
                           "added_p99_ms_c1": TARGET_ADDED_P99_MS,
                           "cpu_ms_per_call": TARGET_CPU_MS, "rps": TARGET_RPS,
                           "stream_ttfb_added_ms": TARGET_TTFB_ADDED_MS},
               "rounds": []}
    try:
        upstream, upstream_port = start_upstream(args.stream_gap_ms, tmpdir)
        log_progress(f"fake upstream on port {upstream_port} (pid {upstream.pid})")
        raw_key = key_id = None
        if not args.direct_only:
            if not os.path.exists(args.llimit):
                raise RuntimeError(f"{args.llimit} not found (use --direct-only)")
            llimit = Llimit(args.llimit, os.path.join(tmpdir, "bench.db"), upstream_port,
                            os.path.join(tmpdir, "llimit.log"), args.threads)
            llimit.start()
            raw_key, key_id = llimit.create_key()
            if args.plans:
                llimit.add_plans()
            log_progress(f"llimit on port {llimit.port} (pid {llimit.proc.pid}), key {key_id}")
        if args.large_answer and llimit is not None:
            log_progress(f"llimit: c=1 ~1 MiB answers x{args.large_answer}")
            results["large_answer"] = run_phase(
                llimit.port, "/v1/embeddings", raw_key, False, args.large_answer, 1,
                {"llimit": llimit.proc.pid, "upstream": upstream.pid}, settle_s=0.3,
                phase_timeout=args.phase_timeout)
            print(json.dumps({"large_answer_bytes": len(_large_answer_body()),
                              **{k: results["large_answer"].get(k) for k in (
                                  "ok", "errors", "latency_p50_ms", "latency_p99_ms",
                                  "cpu_ms_per_call")}}, indent=2))
            return 0
        results["rounds"].append(run_round("empty", 0, upstream, upstream_port, llimit,
                                           raw_key, sizes, args))
        if args.events and llimit is not None:
            log_progress(f"inserting {args.events:,} synthetic usage events")
            fill_seconds = fill_events(llimit.db_path, args.events, key_id)
            log_progress(f"inserted in {fill_seconds:.1f}s; restarting llimit")
            llimit.start()
            round_ = run_round("filled", args.events, upstream, upstream_port, llimit,
                               raw_key, sizes, args)
            round_["fill_seconds"] = fill_seconds
            results["rounds"].append(round_)
        elif args.events:
            log_progress("--events needs llimit; ignored with --direct-only")
        if args.postgres:
            if llimit is not None:
                llimit.stop()   # its CPU and threads are no part of what follows
            postgres = Postgres(args.postgres)
            results["postgres"] = {"url": _postgres_url(
                {k: ("***" if k == "password" else v) for k, v in postgres.params.items()}),
                "server_version": postgres.version, "runs": []}
            if args.events:
                log_progress("--events fills SQLite only: PostgreSQL is measured empty")
            for instances in range(1, args.instances + 1):
                results["postgres"]["runs"].append(run_postgres(
                    postgres, instances, upstream, upstream_port, sizes, args, tmpdir))
            log_progress("postgres: counting round trips per call through a proxy")
            results["postgres"]["round_trips"] = count_round_trips(
                postgres, args.llimit, tmpdir, args.threads, args.stream_gap_ms)
    finally:
        if postgres is not None:
            postgres.drop_schemas()
        if llimit is not None:
            llimit.stop()
        kill(upstream)
        if args.keep:
            log_progress(f"kept {tmpdir}")
        else:
            shutil.rmtree(tmpdir, ignore_errors=True)
    results["elapsed_s"] = time.monotonic() - started
    if args.json:
        print(json.dumps(results, indent=2))
    elif "postgres" in results:
        print(render_postgres(results))
    else:
        print(render_markdown(results))
    log_progress(f"done in {results['elapsed_s']:.0f}s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        sys.exit(1)
