"""Tests for claude_proxy.py, in the order of its sections. pytest only; loopback only.

    python -m pytest -q test_claude_proxy.py             # the suite
    python -m pytest -m bench -s test_claude_proxy.py    # the opt-in benchmark

End-to-end tests run the real server on port 0 against FakeUpstream, a loopback asyncio server
that records every request and answers from a script (faults included). Real recorded streams
are copied inline where a test needs them; when ../shared/fixtures is present, every file there
is replayed too.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import glob
import hashlib
import io
import json
import logging
import os
import random
import re
import socket
import ssl
import stat
import subprocess
import sys
import shutil
import signal
import statistics
import tempfile
import threading
import time
import traceback
import types
import urllib.parse
import warnings
import base64

import pytest

import claude_proxy as cp
from claude_proxy import (  # noqa: E402
    AnthropicToOpenAIStream, AuthError, BadRequest, CLAUDE_CODE_IDENTITY,
    DEFAULT_ANTHROPIC_MAX_TOKENS, EFFORT_BUDGET, FileLock, LoginFlow, OAUTH_DEFAULTS,
    OpenAIToAnthropicStream, STOP_REASON_FROM_FINISH, ThinkTagSplitter, TokenManager, TokenStore,
    UpstreamError, anthropic_message_as_events, anthropic_response_to_openai,
    anthropic_to_openai_request, claude_id_parts, clean_gemini_schema, effort_from_budget,
    estimate_anthropic_tokens, fold_anthropic_events, fold_openai_chunks, openai_message_as_chunk,
    openai_response_to_anthropic, openai_to_anthropic_request, parse_model_variant,
    server_tool_names, model_facts,)

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared")
FIXTURES = os.path.join(SHARED, "fixtures", "real")
CLAUDE_CODE_FIXTURES = os.path.join(SHARED, "fixtures", "claude_code")


def run(coro):
    """Run one async scenario to completion."""
    return asyncio.run(coro)


# =============================================================================================
# Helpers: a scripted loopback upstream, an in-process proxy, a raw HTTP client
# =============================================================================================

def http_response(status, body, headers=(), content_type="application/json"):
    """A whole HTTP/1.1 response with Content-Length."""
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    head = [f"HTTP/1.1 {status} X", f"content-type: {content_type}", f"content-length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def sse_event(event, data):
    """One Anthropic-style SSE event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def openai_sse(chunk):
    """One OpenAI-style SSE data line (a dict or [DONE])."""
    return b"data: " + (chunk.encode() if isinstance(chunk, str) else json.dumps(chunk).encode()) + b"\n\n"


class Stream:
    """A scripted chunked streaming answer: parts are bytes, ("sleep", s), ("reset",) or ("stall",)."""

    def __init__(self, parts, status=200, content_type="text/event-stream", headers=()):
        self.parts, self.status, self.content_type, self.headers = parts, status, content_type, headers

    async def write(self, writer, reader=None):
        head = [f"HTTP/1.1 {self.status} OK", f"content-type: {self.content_type}", "transfer-encoding: chunked"]
        head += [f"{k}: {v}" for k, v in self.headers]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        for part in self.parts:
            if isinstance(part, tuple) and part[0] == "sleep":
                await writer.drain()
                if reader is None:
                    await asyncio.sleep(part[1])
                else:
                    with contextlib.suppress(asyncio.TimeoutError):
                        if await asyncio.wait_for(reader.read(), part[1]) == b"":
                            return False      # the proxy closed the connection while we waited
            elif isinstance(part, tuple) and part[0] == "reset":
                await writer.drain()
                writer.transport.abort()
                return False
            elif isinstance(part, tuple) and part[0] == "stall":
                await writer.drain()
                await (reader.read() if reader is not None else asyncio.sleep(3600))   # until closed
            elif isinstance(part, tuple) and part[0] == "truncate":
                writer.write(b"ff\r\npartial")
                await writer.drain()
                writer.transport.abort()
                return False
            else:
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


class FakeUpstream:
    """Loopback HTTP/1.1 server: records requests, answers with script(request) -> bytes | Stream."""

    def __init__(self, script):
        self.script = script
        self.requests = []
        self.connections = 0
        self.open_connections = 0
        self.closed_early = asyncio.Event()
        self._server = None
        self._writers = set()
        self._tasks = set()

    async def __aenter__(self):
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=1 << 24)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc):
        self._server.close()
        for writer in list(self._writers):      # handlers end on their own (no cancelled tasks)
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader, writer):
        self.connections += 1
        self.open_connections += 1
        self._writers.add(writer)
        self._tasks.add(asyncio.current_task())
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                raw = await reader.readexactly(int(headers.get("content-length", 0)))
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                req = {"method": method, "path": path, "headers": headers, "body": body, "raw": raw}
                self.requests.append(req)
                answer = self.script(req)
                if asyncio.iscoroutine(answer):
                    answer = await answer
                if isinstance(answer, Stream):
                    try:
                        if not await answer.write(writer, reader):
                            return
                    except asyncio.CancelledError:
                        raise
                else:
                    writer.write(answer)
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed_early.set()
        finally:
            self.open_connections -= 1
            self._writers.discard(writer)
            writer.close()


def make_config(tmp_path, upstream_url=None, **raw):
    """A parsed config whose providers point at loopback fakes; state in tmp_path."""
    base = {"home": str(tmp_path / "home"), "keepalive_interval": 0, "max_retries": 0}
    if upstream_url:
        base["providers"] = {"anthropic": {"format": "anthropic", "base_url": upstream_url,
                                           "api_key": "sk-ant-api03-testkey-0123456789"}}
    return cp.parse_config(cp.merge_raw(base, raw), {})


@contextlib.asynccontextmanager
async def running_proxy(config, **kw):
    """A ProxyServer on 127.0.0.1:0; yields (server, port)."""
    server = cp.ProxyServer(config, **kw)
    _, port = await server.start("127.0.0.1", 0)
    try:
        yield server, port
    finally:
        await server.shutdown()


def dechunk(body):
    """Decode a chunked body."""
    out, rest = b"", body
    while rest:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out


async def call(port, method, path, body=None, headers=None, raw=None):
    """One request on a fresh connection; returns (status, headers, body bytes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body or b"")
    head = [f"{method} {path} HTTP/1.1", f"host: 127.0.0.1:{port}", "connection: close", f"content-length: {len(data)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    await writer.drain()
    response = await reader.read()
    writer.close()
    return parse_http(response)


def parse_http(response):
    """(status, headers, body) from raw response bytes (chunked decoded)."""
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return status, headers, body


def sse_events(body):
    """[(event, parsed data)] from an SSE body, using the module's own decoder."""
    decoder = cp.SSEDecoder()
    events = decoder.feed(body) + decoder.close()
    return [(e, d if d == "[DONE]" else json.loads(d)) for e, d in events]


def anthropic_stream(text="Hello there", model="claude-x", stop="end_turn"):
    """A small, well-formed Anthropic SSE answer."""
    return [
        sse_event("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        sse_event("content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "text", "text": ""}}),
        sse_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": text}}),
        sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                    "usage": {"output_tokens": 3}}),
        sse_event("message_stop", {"type": "message_stop"}),
    ]


def anthropic_message(text="Hello there", model="claude-x"):
    """A non-streaming Anthropic answer."""
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 3}}


def openai_stream_chunks(text="Hi", tool=None, call_id="call_1"):
    """A small OpenAI SSE answer with a trailing usage chunk."""
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "up"}
    parts = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
    if tool:
        parts.append(dict(base, choices=[{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": call_id, "type": "function", "function": {"name": tool[0], "arguments": ""}}]},
            "finish_reason": None}]))
        parts.append(dict(base, choices=[{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": json.dumps(tool[1])}}]}, "finish_reason": None}]))
        parts.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]))
    else:
        parts.append(dict(base, choices=[{"index": 0, "delta": {"content": text}, "finish_reason": None}]))
        parts.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    parts.append(dict(base, choices=[], usage={"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}))
    return [openai_sse(p) for p in parts] + [openai_sse("[DONE]")]


ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01", "content-type": "application/json"}
HELLO = {"model": "claude-sonnet-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}


# =============================================================================================
# 3. Utilities
# =============================================================================================

@pytest.mark.parametrize("raw, expected", [
    ("toolu_01ABC", "toolu_01ABC"), ("functions.Bash:3", "functions_Bash_3"), ("call-1_x", "call-1_x"),
])
def test_sanitize_tool_id(raw, expected):
    assert cp.sanitize_tool_id(raw) == expected
    assert re.fullmatch(r"[A-Za-z0-9_-]+", cp.sanitize_tool_id(None))


def test_redactor_scrubs_messages_and_tracebacks():
    redactor = cp.Redactor(["sk-ant-api03-supersecretvalue"])
    record = logging.LogRecord("claude_proxy", logging.INFO, __file__, 1, "key=%s", ("sk-ant-api03-supersecretvalue",), None)
    redactor.filter(record)
    assert "supersecret" not in record.getMessage() and "(redacted)" in record.getMessage()


@pytest.mark.parametrize("value, expected", [(8192, 8192), ("8k", 8192), ("1m", 1048576), (None, None), ("32K", 32768)])
def test_parse_size(value, expected):
    assert cp.parse_size(value, "x") == expected


# ---- model facts: the table (section 1) through model_facts() -------------------------------

FACT_KEYS = ("id", "output", "context", "one_m", "thinking", "efforts", "sampling", "mid_system")


@pytest.mark.parametrize("name, facts", [
    # Claude Code 2.1.332's default, in the spellings clients and vendors use
    ("claude-opus-5-5", ("claude-opus-5-5", 128000, 1000000, True, "adaptive", cp.EFFORTS_ALL, "none", True)),
    ("anthropic/claude-opus-5.5", ("claude-opus-5-5", 128000, 1000000, True, "adaptive", cp.EFFORTS_ALL, "none", True)),
    ("us.anthropic.claude-opus-5-5-v1:0", ("claude-opus-5-5", 128000, 1000000, True, "adaptive", cp.EFFORTS_ALL, "none", True)),
    ("claude-opus-5-5[1m]", ("claude-opus-5-5", 128000, 1000000, True, "adaptive", cp.EFFORTS_ALL, "none", True)),
    ("opus", ("claude-opus-5-5", 128000, 1000000, True, "adaptive", cp.EFFORTS_ALL, "none", True)),
    ("claude-fable-5-2", ("claude-fable-5-2", 128000, 1000000, True, "adaptive", cp.EFFORTS_ALL, "none", True)),
    ("claude-haiku-4-5-20251001", ("claude-haiku-4-5", 64000, 200000, False, "budget", (), "exclusive", False)),
    ("claude-sonnet-4-5-20250929", ("claude-sonnet-4-5", 64000, 200000, True, "budget", (), "exclusive", False)),
    ("claude-sonnet-4-6", ("claude-sonnet-4-6", 128000, 200000, True, "budget", cp.EFFORTS_NO_XHIGH, "exclusive", False)),
    ("claude-opus-4-7", ("claude-opus-4-7", 128000, 1000000, True, "adaptive", cp.EFFORTS_ALL, "none", False)),
    ("claude-opus-4-8", ("claude-opus-4-8", 128000, 1000000, True, "adaptive", cp.EFFORTS_ALL, "none", True)),
    ("claude-opus-4-20250514", ("claude-opus-4-0", 32000, 200000, False, "budget", (), "any", False)),
    ("claude-sonnet-4", ("claude-sonnet-4-0", 64000, 200000, True, "budget", (), "any", False)),
    ("claude-3-7-sonnet-latest", ("claude-3-7-sonnet", 64000, 200000, False, "budget", (), "any", False)),
    ("claude-3-5-haiku-20241022", ("claude-3-5-haiku", 8192, 200000, False, "none", (), "any", False)),
    # unknown ids: the next one of the family, else the family's newest, else the newest of all
    ("claude-opus-4-9", ("claude-opus-5", 128000, 1000000, True, "adaptive", cp.EFFORTS_ALL, "none", True)),
    ("claude-haiku-5", ("claude-haiku-5-5", 128000, 1000000, True, "adaptive", cp.EFFORTS_ALL, "none", True)),
    ("claude-opus-7-1", ("claude-opus-5-5", 128000, 1000000, True, "adaptive", cp.EFFORTS_ALL, "none", True)),
    ("claude-nova-6", ("claude-fable-5-2", 128000, 1000000, True, "adaptive", cp.EFFORTS_ALL, "none", True)),
    # no Claude id at all: generic facts
    ("deepseek-chat", (None, None, None, False, "budget", None, "any", None)),
    ("claude-x", (None, None, None, False, "budget", None, "any", None)),
])
def test_model_facts_table(name, facts):
    assert tuple(model_facts(name)[k] for k in FACT_KEYS) == facts


def test_model_table_rows_are_well_formed():
    ids = [row[0] for row in cp.MODEL_TABLE]
    assert len(set(ids)) == len(ids) and all(len(row) == len(cp.MODEL_COLUMNS) for row in cp.MODEL_TABLE)
    for row in cp.MODEL_TABLE:
        facts = dict(zip(cp.MODEL_COLUMNS, row))
        assert claude_id_parts(facts["id"]) == (facts["family"], facts["version"])     # the key matches the id
        assert facts["thinking"] in ("adaptive", "budget", "none") and facts["sampling"] in ("any", "exclusive", "none")
        assert set(facts["efforts"]) <= set(cp.EFFORTS_ALL)
    assert model_facts("claude-opus-5-5")["listed"] and cp.MODEL_ALIASES["opus"] == "claude-opus-5-5"
    assert all(model_facts(v)["id"] in ids for v in cp.MODEL_ALIASES.values())    # each alias names a known row


def test_a_config_entry_overrides_any_fact():
    spec = {"max_tokens": 4096, "context": 32000, "thinking": "budget", "efforts": ["low"], "sampling": "any",
            "mid_system": False, "one_m": False}
    facts = model_facts("claude-opus-5-5", spec)
    assert tuple(facts[k] for k in FACT_KEYS) == ("claude-opus-5-5", 4096, 32000, False, "budget", ["low"], "any", False)
    assert model_facts("claude-opus-5-5", {"max_tokens": None})["output"] == 128000


@pytest.mark.parametrize("effort, accepted, expected", [
    ("xhigh", cp.EFFORTS_ALL, "xhigh"), ("xhigh", cp.EFFORTS_NO_XHIGH, "high"), ("max", ("low", "medium"), "medium"),
    ("minimal", cp.EFFORTS_ALL, "low"), ("none", cp.EFFORT_ORDER, "none"), ("high", (), "high"),
])
def test_fold_effort(effort, accepted, expected):
    assert cp.fold_effort(effort, accepted) == expected


# =============================================================================================
# 4. Config
# =============================================================================================

def test_config_without_file_routes_everything_to_anthropic():
    config = cp.parse_config({}, {})
    assert list(config.providers) == ["anthropic"]
    assert config.providers["anthropic"]["base_url"] == "https://api.anthropic.com"
    target = cp.resolve_target(config, "claude-opus-4-5")
    assert (target.provider["name"], target.spec["model"], target.route) == ("anthropic", "claude-opus-4-5", "default")


@pytest.mark.parametrize("raw, message", [
    ({"providers": {"deepseek": {"format": "openai", "base_url": "ftp://x"}}}, "providers.deepseek.base_url: expected an http(s) URL"),
    ({"providers": {"d": {"format": "grpc", "base_url": "http://x"}}}, "providers.d.format"),
    ({"providers": {"d": {"base_url": "http://x", "auth": "magic"}}}, "providers.d.auth"),
    ({"models": [{"id": "m", "provider": "nope"}]}, "models.0.provider: unknown provider 'nope'"),
    ({"models": [{"provider": "anthropic"}]}, "models.0.id"),
    ({"models": [{"id": "m", "provider": "anthropic", "max_tokens": "lots"}]}, "models.0.max_tokens"),
    ({"routes": {"sonnet": "ghost"}}, "routes.sonnet: 'ghost' is neither a model id nor a provider"),
    ({"port": "eighty"}, "port ($CLAUDE_PROXY_PORT): expected a whole number, got 'eighty'"),
    ({"port": 8082.7}, "port ($CLAUDE_PROXY_PORT): expected a whole number, got 8082.7"),    # never silently 8082
    ({"port": 70000}, "port: expected 1-65535"),
    ({"max_retries": True}, "max_retries ($MAX_RETRIES): expected a whole number, got True"),
    ({"max_retries": -1}, "max_retries ($MAX_RETRIES): expected a number >= 0, got -1"),
    ({"read_timeout": -5}, "read_timeout ($READ_TIMEOUT): expected a number > 0, got -5.0"),
    ({"read_timeout": "nan"}, "read_timeout ($READ_TIMEOUT): expected a number, got 'nan'"),
    ({"connect_timeout": -1}, "connect_timeout ($CONNECT_TIMEOUT): expected a number > 0"),
    ({"header_timeout": 0}, "header_timeout ($HEADER_TIMEOUT): expected a number > 0, got 0.0"),
    ({"max_body_bytes": -1}, "max_body_bytes ($MAX_BODY_BYTES): expected a number >= 1, got -1"),
    ({"max_connections": -3}, "max_connections ($MAX_CONNECTIONS): expected a number >= 0, got -3"),
    ({"usage_max_rows": -1}, "usage_max_rows ($USAGE_MAX_ROWS): expected a number >= 0"),
    ({"models": [{"id": "m", "provider": "anthropic", "fallback": ["x"]}]}, "models.m.fallback.0"),
    ({"models": [{"id": "m", "provider": "anthropic", "thinking": "deep"}]}, "models.0.thinking: expected one of"),
    ({"models": [{"id": "m", "provider": "anthropic", "efforts": ["high", "ultra"]}]}, "models.0.efforts"),
    ({"models": [{"id": "m", "provider": "anthropic", "sampling": "some"}]}, "models.0.sampling"),
    ({"models": [{"id": "m", "provider": "anthropic", "mid_system": "yes"}]}, "models.0.mid_system: expected true or false"),
    ({"models": [{"id": "m", "provider": "anthropic", "replay_reasoning": 3}]}, "models.0.replay_reasoning"),
    ({"providers": {"d": {"base_url": "http://x", "mid_system": 1}}}, "providers.d.mid_system: expected true or false"),
    ({"providers": {"d": {"base_url": "http://x", "anthropic_version": 2026}}}, "providers.d.anthropic_version"),
])
def test_config_errors_name_the_key_path(raw, message):
    with pytest.raises(cp.ConfigError) as err:
        cp.parse_config(raw, {})
    assert message in str(err.value)


def test_config_layers_file_dotenv_env_cli(tmp_path, monkeypatch):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"port": 9001, "log_level": "DEBUG", "idle_timeout": 5}))
    (tmp_path / ".env").write_text("export CLAUDE_PROXY_PORT=9002\nIDLE_TIMEOUT='7'\n# comment\n")
    monkeypatch.chdir(tmp_path)
    config = cp.load_config(str(cfg), {"CLAUDE_PROXY_PORT": "9003"}, {})
    assert (config.settings["port"], config.settings["idle_timeout"], config.settings["log_level"]) == (9003, 7.0, "DEBUG")
    config = cp.load_config(str(cfg), {"CLAUDE_PROXY_PORT": "9003"}, {"port": 9004})
    assert config.settings["port"] == 9004


def test_config_env_quickstart_builds_routes():
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:1/v1", "OPENAI_API_KEY": "sk-x-123456789",
           "BIG_MODEL": "big", "SMALL_MODEL": "small", "ROUTER_THINK": "openai,thinker"}
    config = cp.parse_config(cp.env_layer(env), env)
    assert config.providers["openai"]["api_key"] == "sk-x-123456789"
    assert cp.resolve_target(config, "claude-opus-4-5").spec["model"] == "big"
    assert cp.resolve_target(config, "claude-3-5-haiku").spec["model"] == "small"
    assert cp.resolve_target(config, "claude-3-5-haiku").route == "background"
    assert cp.resolve_target(config, "claude-sonnet-4-5", thinking=True).spec["model"] == "thinker"
    assert cp.resolve_target(config, "anything").spec["model"] == "big"


def test_config_env_quickstart_without_a_key_sends_none_for_a_local_server():
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:11434/v1", "BIG_MODEL": "qwen3"}
    config = cp.parse_config(cp.env_layer(env), env)
    assert config.providers["openai"]["auth"] == "none"
    assert "providers.openai.api_key_env: $OPENAI_API_KEY is not set; sending no credentials" in config.warnings


def test_routing_order(tmp_path):
    config = cp.parse_config({
        "providers": {"o": {"format": "openai", "base_url": "http://127.0.0.1:1/v1"}},
        "models": [{"id": "m-long", "provider": "o"}, {"id": "m-exact", "provider": "o", "model": "up"}],
        "routes": {"long_context": "m-long", "sonnet": "o,son", "default": "anthropic"},
        "long_context_threshold": 100}, {})
    assert cp.resolve_target(config, "m-exact").spec["model"] == "up"
    assert cp.resolve_target(config, "claude-sonnet-4-5", input_tokens=500).route == "long_context"
    assert cp.resolve_target(config, "claude-sonnet-4-5").spec["model"] == "son"
    assert cp.resolve_target(config, "gpt-4o").provider["name"] == "anthropic"
    with pytest.raises(cp.NotFound) as err:
        cp.resolve_target(cp.parse_config({"routes": {}, "models": [{"id": "a", "provider": "anthropic"}]}, {}), "zzz")
    assert "configured models: a" in err.value.message
    config = cp.parse_config({"routes": {"sonnet": "a", "think": "a"}, "models": [{"id": "a", "provider": "anthropic"}]}, {})
    with pytest.raises(cp.NotFound, match=r"configured models: a; routes: sonnet \(a model name containing one goes there\)"):
        cp.resolve_target(config, "zzz")


def test_provider_switches_default_by_host_and_can_be_set():
    config = cp.parse_config({"providers": {
        "ds": {"base_url": "https://api.deepseek.com"}, "oa": {"base_url": "https://api.openai.com/v1"},
        "kimi": {"format": "anthropic", "base_url": "https://api.moonshot.ai/anthropic"},
        "ds_off": {"base_url": "https://api.deepseek.com", "replay_reasoning": False, "mid_system": True}}}, {})
    switches = {name: {k: p[k] for k in ("replay_reasoning", "prompt_cache_key", "mid_system", "tag_signatures")}
                for name, p in config.providers.items()}
    assert switches == {
        "ds": {"replay_reasoning": "reasoning_content", "prompt_cache_key": False, "mid_system": False, "tag_signatures": False},
        "oa": {"replay_reasoning": None, "prompt_cache_key": True, "mid_system": False, "tag_signatures": False},
        "kimi": {"replay_reasoning": "reasoning_content", "prompt_cache_key": False, "mid_system": False, "tag_signatures": True},
        "ds_off": {"replay_reasoning": False, "prompt_cache_key": False, "mid_system": True, "tag_signatures": False},
        "anthropic": {"replay_reasoning": None, "prompt_cache_key": False, "mid_system": False, "tag_signatures": False}}
    assert config.providers["anthropic"]["anthropic_version"] == "2023-06-01"


def test_upstream_spec_fills_provider_switches_and_replay_by_model_name():
    config = cp.parse_config({"providers": {"or": {"base_url": "https://openrouter.ai/api/v1", "mid_system": True},
                                            "ds": {"base_url": "https://api.deepseek.com"}},
                              "models": [{"id": "k2", "provider": "or", "model": "moonshotai/kimi-k2-thinking"},
                                         {"id": "q", "provider": "or", "model": "qwen/qwen3"},
                                         {"id": "q-off", "provider": "or", "model": "z-ai/glm-5", "replay_reasoning": False,
                                          "mid_system": False},
                                         {"id": "ds", "provider": "ds", "model": "deepseek-v4"}]}, {})
    def spec(name):
        return cp.upstream_spec(cp.resolve_target(config, name))
    assert (spec("k2")["replay_reasoning"], spec("k2")["mid_system"]) == ("reasoning_content", True)
    assert (spec("q")["replay_reasoning"], spec("q")["prompt_cache_key"]) == (None, False)
    assert (spec("q-off")["replay_reasoning"], spec("q-off")["mid_system"]) == (False, False)
    assert spec("ds")["replay_reasoning"] == "reasoning_content"


def test_route_aliases_pick_their_route_by_name():
    config = cp.parse_config({"providers": {"o": {"base_url": "http://127.0.0.1:1/v1"}},
                              "models": [{"id": "deep", "provider": "o"}],
                              "routes": {"think": "deep", "kimi": "o,kimi-k2", "default": "anthropic"}}, {})
    assert cp.resolve_target(config, "claude-think").spec["model"] == "deep"
    assert cp.resolve_target(config, "claude-kimi").spec["model"] == "kimi-k2"
    assert cp.resolve_target(config, "claude-opus-5-5").route == "default"


def test_custom_models_list_is_accepted():
    config = cp.parse_config({"custom_models": [{"id": "local", "base_url": "http://127.0.0.1:1/v1", "api_key": "k",
                                                  "context_length": 32000, "max_completion_tokens": 4096,
                                                  "supports_reasoning": False, "owned_by": "me"}]}, {})
    spec = config.models["local"]
    assert (spec["max_tokens"], spec["context"], spec["owned_by"], spec["reasoning_param"]) == (4096, 32000, "me", None)
    assert config.providers[spec["provider"]]["format"] == "openai"


def test_check_config_redacts_secrets(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"providers": {"x": {"format": "openai", "base_url": "http://h/v1",
                                                   "api_key": "sk-verysecretkey-123456"}}}))
    out = subprocess.run([sys.executable, os.path.join(HERE, "claude_proxy.py"), "check-config", "--config", str(cfg)],
                         capture_output=True, text=True, env=dict(os.environ, PROXY_API_KEY="proxykey-secret-99"), timeout=30)
    assert out.returncode == 0, out.stderr
    assert "verysecretkey" not in out.stdout and "proxykey-secret" not in out.stdout
    assert json.loads(out.stdout)["providers"]["x"]["api_key"].endswith("(redacted)")


def test_invalid_config_fails_at_start(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"providers": {"deepseek": {"format": "openai", "base_url": "nope"}}}))
    out = subprocess.run([sys.executable, os.path.join(HERE, "claude_proxy.py"), "--config", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "providers.deepseek.base_url: expected an http(s) URL" in out.stderr


# =============================================================================================
# 5. HTTP wire format
# =============================================================================================

def test_parse_request_head():
    head = b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n"
    assert cp.parse_request_head(head) == ("POST", "/v1/messages?beta=true", "HTTP/1.1", {"host": "x", "x-a": "1, 2"})
    # absolute form (RFC 9112 3.2.2): the target's authority is the Host
    assert cp.parse_request_head(b"GET http://127.0.0.1:8082/health HTTP/1.1\r\nHost: other\r\n\r\n") == \
        ("GET", "/health", "HTTP/1.1", {"host": "127.0.0.1:8082"})
    assert cp.parse_request_head(b"GET HTTP://h?x=1 HTTP/1.0\r\n\r\n")[1:2] == ("/?x=1",)
    for bad in (b"GET http:///x HTTP/1.1\r\nHost: h\r\n\r\n", b"GET http://u:p@h/ HTTP/1.1\r\nHost: h\r\n\r\n"):
        with pytest.raises(cp.BadRequest):
            cp.parse_request_head(bad)


@pytest.mark.parametrize("head, error", [
    (b"GARBAGE\r\n\r\n", cp.BadRequest),
    (b"GET / HTTP/2\r\nHost: x\r\n\r\n", cp.HTTPVersionNotSupported),
    (b"GET / HTTP/1.9\r\nHost: x\r\n\r\n", cp.HTTPVersionNotSupported),
    (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", cp.BadRequest),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", cp.URITooLong),
    # smuggling: bare LF, lone CR or NUL inside a field value (RFC 9112 5)
    (b"POST / HTTP/1.1\r\nHost: x\r\nX-Trace: a\ncontent-length: 0\r\n\r\n", cp.BadRequest),
    (b"POST / HTTP/1.1\r\nHost: x\r\nX-Trace: a\rb\r\n\r\n", cp.BadRequest),
    (b"POST / HTTP/1.1\r\nHost: x\r\nX-Trace: a\x00b\r\n\r\n", cp.BadRequest),
    (b"GET / HTTP/1.1\nHost: x\n\n", cp.BadRequest),
    (b"GET / HTTP/1.1\r\n\r\n", cp.BadRequest),                                  # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", cp.BadRequest),           # two Hosts
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", cp.BadRequest),
    (b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n", cp.BadRequest),
])
def test_parse_request_head_errors(head, error):
    with pytest.raises(error):
        cp.parse_request_head(head)


def test_http10_request_needs_no_host_and_tabs_are_kept():
    assert cp.parse_request_head(b"GET / HTTP/1.0\r\nX: a\tb\r\n\r\n") == ("GET", "/", "HTTP/1.0", {"x": "a\tb"})


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 999 Odd\r\n\r\n", b"HTTP/1.1 20 OK\r\n\r\n", b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nrequest-id: a\nset-cookie: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
])
def test_parse_response_head_rejects_what_would_inject_or_desync(head):
    with pytest.raises(UpstreamError):
        cp.parse_response_head(head)


def test_http10_upstream_answer_is_never_kept_alive():
    assert cp.parse_response_head(b"HTTP/1.0 200 OK\r\n\r\n") == (200, {"connection": "close"})


@pytest.mark.parametrize("headers, framing", [
    ({"transfer-encoding": "chunked"}, ("chunked", 0)),
    ({"content-length": "12"}, ("length", 12)),
    ({}, ("close", 0)),
])
def test_body_framing(headers, framing):
    assert cp.body_framing(headers) == framing


@pytest.mark.parametrize("headers", [
    {"transfer-encoding": "chunked", "content-length": "3"}, {"content-length": "-1"},
    {"content-length": "\u00b2"}, {"content-length": "1 2"}, {"content-length": "+5"},
    {"transfer-encoding": "chunked, gzip"}, {"transfer-encoding": "xchunkedx"},
    {"transfer-encoding": "gzip"}, {"transfer-encoding": "chunked, chunked"},
])
def test_body_framing_rejects_smuggling(headers):
    with pytest.raises(cp.BadRequest):
        cp.body_framing(headers)


@pytest.mark.parametrize("line", [b"0x10", b"+10", b"1_0", b" 10", b"-1", b"", b"g", b"1" * 16])
def test_chunk_size_is_hex_digits_only(line):
    with pytest.raises(cp.BadRequest):
        cp.parse_chunk_size(line)


def test_chunk_size_allows_extensions_and_bws():
    assert cp.parse_chunk_size(b"1A ; name=value") == 26 and cp.parse_chunk_size(b"0") == 0


def test_chunked_decoder_requires_crlf_after_data():
    for data in (b"3\r\nabcXY0\r\n\r\n", b"3\r\nabc\n0\r\n\r\n"):
        with pytest.raises(cp.BadRequest):
            decode_chunked(data, [len(data)])
        with pytest.raises(cp.BadRequest):
            decode_chunked(data, list(range(1, len(data) + 1)))


CHUNKED_SAMPLE = b"3\r\nabc\r\n5;ext=1\r\nde\r\nf\r\n0\r\nx-trailer: 1\r\n\r\n"


def decode_chunked(data, cuts):
    decoder, out, last = cp.ChunkedDecoder(), b"", 0
    for cut in list(cuts) + [len(data)]:
        out += decoder.feed(data[last:cut])
        last = cut
    return out, decoder.done, decoder.excess


def test_chunked_decoder_whole_byte_by_byte_and_every_split():
    assert decode_chunked(CHUNKED_SAMPLE, []) == (b"abcde\r\nf", True, b"")
    assert decode_chunked(CHUNKED_SAMPLE, range(1, len(CHUNKED_SAMPLE))) == (b"abcde\r\nf", True, b"")
    for i in range(len(CHUNKED_SAMPLE)):
        assert decode_chunked(CHUNKED_SAMPLE, [i]) == (b"abcde\r\nf", True, b""), i


def test_chunked_decoder_reports_excess_and_rejects_garbage():
    assert decode_chunked(b"0\r\n\r\nHTTP/1.1", []) == (b"", True, b"HTTP/1.1")
    assert decode_chunked(b"3\r\nab", []) == (b"ab", False, b"")
    with pytest.raises(cp.BadRequest):
        cp.ChunkedDecoder().feed(b"zz\r\n")
    with pytest.raises(cp.BadRequest):
        cp.ChunkedDecoder().feed(b"1" * 5000)


def test_format_status_line_knows_529():
    assert cp.format_status_line(529) == "HTTP/1.1 529 Overloaded"
    assert cp.format_status_line(404) == "HTTP/1.1 404 Not Found"


# =============================================================================================
# 6. SSE
# =============================================================================================

SSE_SAMPLE = (b": comment\r\n\r\nevent: message_start\r\ndata: {\"a\":1}\r\n\r\n"
              b"data:no-space\n\ndata: line1\ndata: line2\n\n: keep-alive\n\n"
              b"event: x\rdata: cr \xc3\xa9t\xc3\xa9\r\r"
              b"data: tail-without-blank-line")
SSE_EXPECTED = [("message_start", '{"a":1}'), ("", "no-space"), ("", "line1\nline2"),
                ("x", "cr \u00e9t\u00e9"), ("", "tail-without-blank-line")]


def decode_in_pieces(data, cuts):
    decoder, events, last = cp.SSEDecoder(), [], 0
    for cut in list(cuts) + [len(data)]:
        events += decoder.feed(data[last:cut])
        last = cut
    return events + decoder.close()


def test_sse_decoder_whole():
    assert decode_in_pieces(SSE_SAMPLE, []) == SSE_EXPECTED


def test_sse_decoder_byte_by_byte():
    assert decode_in_pieces(SSE_SAMPLE, range(1, len(SSE_SAMPLE))) == SSE_EXPECTED


def test_sse_decoder_split_at_every_index():
    for i in range(len(SSE_SAMPLE)):
        assert decode_in_pieces(SSE_SAMPLE, [i]) == SSE_EXPECTED, i


def test_sse_decoder_crlf_split_between_cr_and_lf():
    data = b"data: a\r\ndata: b\r\n\r\n"
    for i in range(len(data)):
        assert decode_in_pieces(data, [i]) == [("", "a\nb")], i


def test_sse_format_round_trip():
    encoded = cp.format_sse("line1\nline2", "ev") + cp.format_anthropic_event({"type": "ping"}) + cp.format_openai_item("[DONE]")
    assert decode_in_pieces(encoded, []) == [("ev", "line1\nline2"), ("ping", '{"type":"ping"}'), ("", "[DONE]")]


HOT_TEXTS = ["", "a", " quick", "é\u00e9\U0001f600", 'quote " and \\ back', "line\nbreak\r\t", "\x00\x1f\x7f",
             "\u2028\u2029", "<think>", "x" * 5000]


@pytest.mark.parametrize("text", HOT_TEXTS)
def test_byte_templates_write_exactly_what_the_general_encoder_writes(text):
    def general(obj, event=None):
        return cp.format_sse(cp._json_encoder.encode(obj), event)
    anthropic = {"type": "content_block_delta", "index": 3, "delta": {"type": "text_delta", "text": text}}
    openai = {"id": "chatcmpl-\"x", "object": "chat.completion.chunk", "created": 17, "model": "m\u00e9",
              "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None, "logprobs": None}]}
    responses = {"type": "response.output_text.delta", "sequence_number": 9, "item_id": "msg_1", "output_index": 0,
                 "content_index": 0, "delta": text, "logprobs": []}
    for fast, obj, event in ((cp.format_anthropic_event, anthropic, "content_block_delta"),
                             (cp.format_openai_item, openai, None),
                             (cp.format_responses_event, responses, "response.output_text.delta")):
        assert fast(obj) == general(obj, event)
        assert json.loads(fast(obj).split(b"data: ", 1)[1]) == obj
    assert sse_events(cp.format_anthropic_event(anthropic)) == [("content_block_delta", anthropic)]


def test_decoder_fast_paths_agree_with_the_general_paths():
    line = b'data: {"a": 1}\n\n'
    chunk = b"%x\r\n%b\r\n" % (len(line), line)
    assert cp.ChunkedDecoder().feed(chunk) == line
    assert decode_chunked(chunk + b"0\r\n\r\n", [len(chunk)])[0] == line
    assert cp.SSEDecoder().feed(line) == [("", '{"a": 1}')]
    decoder = cp.SSEDecoder()
    assert decoder.feed(b"event: x\n") == [] and decoder.feed(line) == [("x", '{"a": 1}')]   # not the fast path
    for read, events in ((b"event: x\ndata: 1\n\n", [("x", "1")]), (b"event: x\ndata: 1\ndata: 2\n\n", [("x", "1\n2")]),
                         (b"event: x\nid: 3\n\n", []), (b"data: a\nevent: x\n\n", [("x", "a")]),
                         (b"event: x\r\ndata: 1\r\n\r\n", [("x", "1")]), (b"event:x\ndata:1\n\n", [("x", "1")]),
                         (b"data: \xc3\xa9\n\n", [("", "\u00e9")])):
        general = cp.SSEDecoder()                           # fed in two reads: never the one-event path
        split = general.feed(read[:3]) + general.feed(read[3:])
        assert cp.SSEDecoder().feed(read) == split == events, read
    with pytest.raises(cp.BadRequest):
        cp.ChunkedDecoder().feed(b"0x5\r\nhello\r\n")
    fresh = cp.ChunkedDecoder()
    assert fresh.whole_chunk(chunk) == line
    for not_one in (b"0\r\n\r\n", b"00\r\n\r\n", b"5;x=1\r\nhello\r\n", b"5\r\nhell\r\n", b"5\r\nhelloXY",
                    chunk + chunk, chunk[:-1]):
        assert fresh.whole_chunk(not_one) is None, not_one     # the general path decides these
    pending = cp.ChunkedDecoder()
    assert pending.feed(chunk[:6]) == b"da" and pending.whole_chunk(chunk) is None  # mid-chunk: not a fresh chunk


def test_passthrough_relays_the_upstreams_own_chunk_framing():
    """One whole chunk per read goes to a chunked client as the upstream framed it (no re-framing);
    split chunks are decoded and framed anew, and the client gets the same payload either way."""
    written = []
    stream = cp.ClientStream.__new__(cp.ClientStream)
    stream.writer, stream.chunked, stream.bytes_sent = types.SimpleNamespace(write=written.append), True, 0
    framed = b"00a\r\n0123456789\r\n"                 # a leading zero: kept as the upstream sent it
    stream.push(b"0123456789", framed)
    stream.push(b"abc")
    assert written == [framed, b"3\r\nabc\r\n"] and stream.bytes_sent == 13
    stream.chunked = False
    stream.push(b"xyz", b"3\r\nxyz\r\n")
    assert written[-1] == b"xyz"                          # an HTTP/1.0 client gets the bare bytes


def test_sse_decoder_bounds_a_line_without_newline_in_linear_time():
    decoder = cp.SSEDecoder(max_line=1 << 20)
    piece = b"data: " + b"x" * 4090
    with pytest.raises(UpstreamError, match="over 1048576 bytes"):
        for _ in range(10_000):            # 40 MB offered; joined once per line, refused at 1 MiB
            decoder.feed(piece)
    decoder = cp.SSEDecoder(max_line=100)
    assert decoder.feed(b"data: " + b"y" * 50 + b"\n") == []
    with pytest.raises(UpstreamError, match="event over 100"):
        decoder.feed(b"data: " + b"y" * 60 + b"\n")        # two data lines: the event is too big


def test_sse_decoder_joins_a_line_split_over_many_reads():
    decoder = cp.SSEDecoder()
    parts = [b"event: a\nda", b"ta: ", b"1", b"2", b"3\r", b"\n\r\n", b"data: tail"]
    events = [e for part in parts for e in decoder.feed(part)] + decoder.close()
    assert events == [("a", "123"), ("", "tail")]


@pytest.mark.skipif(not os.path.isdir(FIXTURES), reason="shared fixtures absent")
def test_sse_decoder_on_every_real_fixture_any_split():
    for path in sorted(glob.glob(os.path.join(FIXTURES, "*.sse"))):
        data = open(path, "rb").read()
        whole = decode_in_pieces(data, [])
        assert whole, path
        for seed in range(5):
            rnd = random.Random(seed)
            cuts = sorted(rnd.sample(range(1, len(data)), min(40, len(data) - 1)))
            assert decode_in_pieces(data, cuts) == whole, (path, seed)


# =============================================================================================
# 8. Upstream client
# =============================================================================================

def make_pool(**kw):
    return cp.ConnectionPool(lambda: cp.make_ssl_context(True, None), {}, kw.get("connect_timeout", 2.0),
                             kw.get("read_timeout", 5.0))


def test_pool_reuses_connections_after_full_body():
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, {"ok": True})) as up:
            pool = make_pool()
            for _ in range(3):
                response = await pool.request("POST", up.url + "/x", [], b"{}")
                assert json.loads(await response.read()) == {"ok": True}
            assert (up.connections, pool.opened) == (1, 1)
            assert up.requests[0]["headers"]["accept-encoding"] == "identity"
            pool.close()
    run(scenario())


def test_pool_reads_chunked_and_close_delimited_bodies():
    async def close_delimited(req):
        return b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nuntil-eof"

    async def scenario():
        async with FakeUpstream(lambda req: Stream([b"abc", b"def"])) as up:
            pool = make_pool()
            response = await pool.request("POST", up.url + "/s", [], b"")
            assert b"".join([c async for c in response.iter_body()]) == b"abcdef"
            pool.close()

        class Closer(FakeUpstream):
            async def _handle(self, reader, writer):
                await reader.readuntil(b"\r\n\r\n")
                writer.write(await close_delimited(None))
                await writer.drain()
                writer.close()
        async with Closer(None) as up:
            pool = make_pool()
            response = await pool.request("GET", up.url + "/", [], b"")
            assert await response.read() == b"until-eof"
            pool.close()
    run(scenario())


def test_pool_idle_timeout_is_a_failure_not_a_hang():
    async def scenario():
        async with FakeUpstream(lambda req: Stream([b"first", ("stall",)])) as up:
            pool = make_pool(read_timeout=0.3)
            response = await pool.request("POST", up.url + "/s", [], b"")
            started = time.monotonic()
            with pytest.raises(cp.UpstreamTimeout):
                async for _ in response.iter_body():
                    pass
            assert time.monotonic() - started < 2
            pool.close()
    run(scenario())


def test_pool_retries_a_stale_keepalive_connection_once():
    class ClosesSecondRequest(FakeUpstream):
        async def _handle(self, reader, writer):
            self.connections += 1
            await reader.readuntil(b"\r\n\r\n")
            writer.write(http_response(200, {"conn": self.connections}))
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")   # the reused connection's request: dropped
            writer.transport.abort()

    async def scenario():
        async with ClosesSecondRequest(None) as up:
            pool = make_pool()
            assert json.loads(await (await pool.request("POST", up.url + "/", [], b"")).read()) == {"conn": 1}
            assert json.loads(await (await pool.request("POST", up.url + "/", [], b"")).read()) == {"conn": 2}
            pool.close()
    run(scenario())


def test_connect_failure_is_an_upstream_error():
    async def scenario():
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        with pytest.raises(cp.UpstreamError):
            await make_pool().request("GET", f"http://127.0.0.1:{port}/", [], b"")
    run(scenario())


def test_proxy_for_honours_no_proxy_and_loopback():
    pool = cp.ConnectionPool(lambda: cp.make_ssl_context(True, None),
                             cp.proxies_from_env({"HTTPS_PROXY": "http://proxy:3128", "no_proxy": "internal.example,.corp"}), 1, 1)
    assert pool.proxy_for("https", "api.anthropic.com") == "http://proxy:3128"
    assert pool.proxy_for("https", "internal.example") is None
    assert pool.proxy_for("https", "api.internal.example") is None
    assert pool.proxy_for("https", "x.corp") is None and pool.proxy_for("https", "corp.evil") == "http://proxy:3128"
    assert pool.proxy_for("https", "127.0.0.1") is None
    assert pool.proxy_for("http", "api.anthropic.com") is None


def test_connect_tunnel_through_http_proxy():
    async def scenario():
        seen = []

        async def proxy_handler(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append(head.split(b"\r\n")[0])
            host, port = head.split(b" ")[1].decode().rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

            async def pipe(src, dst):
                while True:
                    data = await src.read(65536)
                    if not data:
                        dst.close()
                        return
                    dst.write(data)
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)
        proxy = await asyncio.start_server(proxy_handler, "127.0.0.1", 0)
        proxy_port = proxy.sockets[0].getsockname()[1]
        async with FakeUpstream(lambda req: http_response(200, {"via": "tunnel"})) as up:
            pool = make_pool()
            pool.proxies = {"http": f"http://127.0.0.1:{proxy_port}"}
            pool.proxy_for = lambda scheme, host: pool.proxies.get(scheme)  # loopback normally bypasses
            response = await pool.request("GET", up.url + "/", [], b"")
            assert json.loads(await response.read()) == {"via": "tunnel"}
            assert seen == [f"CONNECT 127.0.0.1:{up.port} HTTP/1.1".encode()]
            pool.close()
        proxy.close()
    run(scenario())


# =============================================================================================
# 9a. Converters: Anthropic client -> OpenAI-compatible upstream
# =============================================================================================

FIXTURES_ROOT = os.path.join(SHARED, "fixtures")


# ---- helpers ------------------------------------------------------------------------------

def make_spec(**overrides):
    """A model spec with every key present (INTERFACE.md)."""
    spec = {"id": "m", "provider": "p", "model": "up-model", "max_tokens": None,
            "max_completion_tokens": False, "reasoning_param": "reasoning_effort",
            "replay_reasoning": None, "reasoning_effort": None, "schema": None,
            "extra_body": {}, "context": None, "thinking": None}
    spec.update(overrides)
    return spec


def sse_chunks(text):
    """Decode an OpenAI SSE body simply: events split on blank lines, `data:` lines joined."""
    chunks = []
    for event in text.replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(line[5:].lstrip(" ") for line in event.split("\n")
                         if line.startswith("data:"))
        if data and data != "[DONE]":
            chunks.append(json.loads(data))
    return chunks


def run_stream(chunks, model="claude-client", **kwargs):
    """Feed chunks one at a time, then close; all events."""
    stream = OpenAIToAnthropicStream(model, message_id="msg_test", **kwargs)
    events = []
    for chunk in chunks:
        events += stream.feed(chunk)
    return events + stream.close()


def check_anthropic_grammar(events):
    """Assert the Anthropic stream grammar (PROTOCOLS B.7); returns the block start events."""
    assert events and events[0]["type"] == "message_start"
    message = events[0]["message"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"] == [] and message["stop_reason"] is None
    assert set(message["usage"]) >= {"input_tokens", "output_tokens"}
    open_index, next_index, starts, deltas = None, 0, [], 0
    body = events[1:]
    errored = body and body[-1]["type"] == "error"
    if errored:
        assert [e["type"] for e in body].count("error") == 1
        assert body[-1]["error"]["type"] in ("api_error", "overloaded_error")
        assert body[-1]["error"]["message"]
        body = body[:-1]
    else:
        assert [e["type"] for e in body[-2:]] == ["message_delta", "message_stop"]
        assert [e["type"] for e in body].count("message_delta") == 1
        delta = body[-2]
        assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens", "tool_use",
                                                 "refusal", "stop_sequence")
        assert set(delta["usage"]) >= {"input_tokens", "output_tokens",
                                       "cache_read_input_tokens", "cache_creation_input_tokens"}
        body = body[:-2]
    for event in body:
        kind = event["type"]
        if kind == "content_block_start":
            assert open_index is None and event["index"] == next_index
            open_index, next_index = event["index"], next_index + 1
            starts.append(event)
            block = event["content_block"]
            assert block in ({"type": "text", "text": ""},
                             {"type": "thinking", "thinking": "", "signature": ""}) or \
                (block["type"] == "tool_use" and block["input"] == {} and block["id"] and
                 block["name"] is not None)
        elif kind == "content_block_delta":
            assert event["index"] == open_index
            block_type = starts[-1]["content_block"]["type"]
            allowed = {"text": {"text_delta", "citations_delta"}, "thinking": {"thinking_delta", "signature_delta"},
                       "tool_use": {"input_json_delta"}}[block_type]
            assert event["delta"]["type"] in allowed
            deltas += 1
        elif kind == "content_block_stop":
            assert event["index"] == open_index
            open_index = None
        else:
            pytest.fail("unexpected event %r in the block section" % kind)
    assert open_index is None
    return starts


def block_types(events):
    return [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]


def signature_deltas_before_stop(events):
    """Each signature_delta is immediately followed by its block's stop."""
    for i, event in enumerate(events):
        if event["type"] == "content_block_delta" and event["delta"]["type"] == "signature_delta":
            assert events[i + 1] == {"type": "content_block_stop", "index": event["index"]}
    return True


# ---- inline fixture streams (trimmed copies of ../shared/fixtures/real) -------------------

# openai_stream_parallel_tools.sse, trimmed (noise keys id/model/created/... removed)
OPENAI_PARALLEL_TOOLS = r'''data: {"choices":[{"index":0,"delta":{"role":"assistant","content":null},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_JMW1whyEaYG438VE1OIflxA2","type":"function","function":{"name":"GetWeatherArgs","arguments":""}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"ci"}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"ty\": "}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Edinb"}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"urgh"}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\", \"c"}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"ountry"}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\": \""}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"GB\", "}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"units"}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\": \""}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"c\"}"}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_DNYTawLBoN8fj3KN6qU9N1Ou","type":"function","function":{"name":"get_stock_price","arguments":""}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{\"ti"}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"cker\""}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":": \"AAP"}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"L\", "}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"\"exch"}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"ange\":"}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":" \"NA"}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"SDAQ\""}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"}"}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}

data: {"choices":[],"usage":{"prompt_tokens":149,"completion_tokens":60,"total_tokens":209,"completion_tokens_details":{"reasoning_tokens":0}}}

data: [DONE]

'''

# deepseek_stream_reasoning_content.sse, trimmed (noise keys id/model/created/... removed)
DEEPSEEK_REASONING = r'''data: {"choices":[{"index":0,"delta":{"role":"assistant","content":null,"reasoning_content":""},"finish_reason":null}],"usage":null}

data: {"choices":[{"index":0,"delta":{"content":null,"reasoning_content":"H"},"finish_reason":null}],"usage":null}

data: {"choices":[{"index":0,"delta":{"content":null,"reasoning_content":"mm"},"finish_reason":null}],"usage":null}

data: {"choices":[{"index":0,"delta":{"content":null,"reasoning_content":","},"finish_reason":null}],"usage":null}

data: {"choices":[{"index":0,"delta":{"content":" you","reasoning_content":null},"finish_reason":null}],"usage":null}

data: {"choices":[{"index":0,"delta":{"content":" today","reasoning_content":null},"finish_reason":null}],"usage":null}

data: {"choices":[{"index":0,"delta":{"content":"?","reasoning_content":null},"finish_reason":null}],"usage":null}

data: {"choices":[{"index":0,"delta":{"content":"","reasoning_content":null},"finish_reason":"stop"}],"usage":{"prompt_tokens":6,"completion_tokens":212,"total_tokens":218,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":198},"prompt_cache_hit_tokens":0,"prompt_cache_miss_tokens":6}}

data: [DONE]

'''

# openrouter_stream_reasoning_details.sse, trimmed (noise keys id/model/created/... removed)
OPENROUTER_REASONING = r''': OPENROUTER PROCESSING

data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning":null,"reasoning_details":[]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning":null,"reasoning_details":[{"type":"reasoning.text","text":"","signature":"","format":"anthropic-claude-v1","index":0}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning":"This","reasoning_details":[{"type":"reasoning.text","text":"This","format":"anthropic-claude-v1","index":0}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning":" is a simple arithmetic question. ","reasoning_details":[{"type":"reasoning.text","text":" is a simple arithmetic question. ","format":"anthropic-claude-v1","index":0}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning":"2+2 equals 4.","reasoning_details":[{"type":"reasoning.text","text":"2+2 equals 4.","format":"anthropic-claude-v1","index":0}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning":null,"reasoning_details":[{"type":"reasoning.text","text":"","format":"anthropic-claude-v1","index":0}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning":null,"reasoning_details":[{"type":"reasoning.text","signature":"Et0BCkgIChACGAIqQA2s7h7tA7IG35fbwVkou9PM2hANVJNUwcEM4q12fTRDK6y3v6YoEvJ+7bko8wnW/GLsQFXadaJPAEMCpLkhI9ISDLjFkeR1aVUIvdCtyBoMrUTovh0jwk+wpnZWIjANV3e6VVdgbGSsEyyTHO6KMmVtqqs79f9blnVdJmmMIwMyTi6bEtG59+jTU7v1zlsqQ2IKGZILOlr6adh0Aam7zYttvisys+wjyZZXU1y/Srz0nmp1cFgVOJe1BLKQI3SSRrjsqQC0uAEUZy0GX0Rq1AXjvIcYAQ==","format":"anthropic-claude-v1","index":0}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning":null,"reasoning_details":[]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning":null,"reasoning_details":[]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"2 ","reasoning":null,"reasoning_details":[]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"+ 2 = 4","reasoning":null,"reasoning_details":[]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning":null,"reasoning_details":[]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning":null,"reasoning_details":[]},"finish_reason":"stop"}]}

data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":{"prompt_tokens":43,"completion_tokens":36,"total_tokens":79,"cost":0.000669,"is_byok":false,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0,"video_tokens":0},"cost_details":{"upstream_inference_cost":null,"upstream_inference_prompt_cost":0.000129,"upstream_inference_completions_cost":0.00054},"completion_tokens_details":{"reasoning_tokens":13,"image_tokens":0}}}

data: [DONE]

'''

# groq_stream_tool_call_whole_chunk.sse, trimmed (noise keys id/model/created/... removed)
GROQ_WHOLE_TOOL_CALL = r'''data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"x_groq":{"id":"req_01khrvt32ze9rb75za4xqmdz13","seed":1367355884}}

data: {"choices":[{"index":0,"delta":{"reasoning":"We","channel":"analysis"},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"reasoning":" need","channel":"analysis"},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"id":"fc_bfb39741-3748-4def-9886-a93fc9c64a90","type":"function","function":{"name":"get_something_by_name","arguments":"{\"name\":\"example\"}"},"index":0}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}],"x_groq":{"id":"req_01khrvt32ze9rb75za4xqmdz13","usage":{"queue_time":0.00491786,"prompt_tokens":304,"prompt_time":0.01460151,"completion_tokens":49,"completion_time":0.11216431,"total_tokens":353,"total_time":0.12676582,"completion_tokens_details":{"reasoning_tokens":23}}},"usage":{"queue_time":0.00491786,"prompt_tokens":304,"prompt_time":0.01460151,"completion_tokens":49,"completion_time":0.11216431,"total_tokens":353,"total_time":0.12676582,"completion_tokens_details":{"reasoning_tokens":23}}}

data: [DONE]

'''

# groq_stream_error_event.sse, trimmed (noise keys id/model/created/... removed)
GROQ_ERROR_EVENT = r'''data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"x_groq":{"id":"req_01khrvt2r6e9rb7e8qsg86ywkw","seed":27718886}}

data: {"choices":[{"index":0,"delta":{"reasoning":"We","channel":"analysis"},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"reasoning":" need","channel":"analysis"},"finish_reason":null}]}

event: error
data: {"error":{"message":"Tool call validation failed: tool call validation failed: parameters for tool get_something_by_name did not match schema: errors: [missing properties: 'name', additionalProperties 'invalid_param' not allowed]","type":"invalid_request_error","code":"tool_use_failed","failed_generation":"{\"name\": \"get_something_by_name\", \"arguments\": {\n  \"invalid_param\": \"value\"\n}}","status_code":400}}

'''

# openrouter_stream_midstream_error.sse, trimmed (noise keys id/model/created/... removed)
OPENROUTER_MIDSTREAM_ERROR = r''': OPENROUTER PROCESSING

data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning":"We need","reasoning_details":[{"type":"reasoning.text","text":"We need","index":0,"format":null}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning":" to respond to a greeting. The user","reasoning_details":[{"type":"reasoning.text","text":" to respond to a greeting. The user","index":0,"format":null}]},"finish_reason":"length"}]}

data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning":null,"reasoning_details":[]},"finish_reason":"length"}]}

data: {"error":{"code":400,"message":"Token limit reached"},"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":{"prompt_tokens":43,"completion_tokens":10,"total_tokens":53,"cost":0,"is_byok":false,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"cost_details":{"upstream_inference_cost":null,"upstream_inference_prompt_cost":0,"upstream_inference_completions_cost":0},"completion_tokens_details":{"reasoning_tokens":11,"image_tokens":0}}}

data: [DONE]

'''

# openai_stream_finish_length.sse, trimmed (noise keys id/model/created/... removed)
OPENAI_FINISH_LENGTH = r'''data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"content":"{\""},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}

data: {"choices":[],"usage":{"prompt_tokens":79,"completion_tokens":1,"total_tokens":80,"completion_tokens_details":{"reasoning_tokens":0}}}

data: [DONE]

'''

# openai_stream_n3_choices.sse, trimmed (noise keys id/model/created/... removed)
OPENAI_N3 = r'''data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"content":"{\""},"finish_reason":null}]}

data: {"choices":[{"index":1,"delta":{"role":"assistant","content":"","refusal":null},"finish_reason":null}]}

data: {"choices":[{"index":1,"delta":{"content":"{\""},"finish_reason":null}]}

data: {"choices":[{"index":2,"delta":{"role":"assistant","content":"","refusal":null},"finish_reason":null}]}

data: {"choices":[{"index":2,"delta":{"content":"{\""},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"content":"city"},"finish_reason":null}]}

data: {"choices":[{"index":1,"delta":{"content":"city"},"finish_reason":null}]}

data: {"choices":[{"index":2,"delta":{"content":"city"},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}

data: {"choices":[{"index":1,"delta":{},"finish_reason":"stop"}]}

data: {"choices":[{"index":2,"delta":{},"finish_reason":"stop"}]}

data: {"choices":[],"usage":{"prompt_tokens":79,"completion_tokens":42,"total_tokens":121,"completion_tokens_details":{"reasoning_tokens":0}}}

data: [DONE]

'''

STREAMS = {
    "openai_parallel_tools": OPENAI_PARALLEL_TOOLS, "deepseek_reasoning": DEEPSEEK_REASONING,
    "openrouter_reasoning": OPENROUTER_REASONING, "groq_whole_tool_call": GROQ_WHOLE_TOOL_CALL,
    "groq_error_event": GROQ_ERROR_EVENT, "openrouter_midstream_error": OPENROUTER_MIDSTREAM_ERROR,
    "openai_finish_length": OPENAI_FINISH_LENGTH, "openai_n3": OPENAI_N3,
}


# ---- 1. request conversion: table tests (PROTOCOLS D.1) --------------------------------------

def req(**fields):
    """A minimal Anthropic body plus fields."""
    body = {"model": "claude-x", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return body


def out(**fields):
    """The OpenAI body for req() plus fields."""
    body = {"model": "up-model", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return body


PNG_B64 = "iVBORw0KGgo="
TOOL_RESULT_TURN = [
    {"role": "user", "content": "go"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Running "}, {"type": "text", "text": "tools."},
        {"type": "tool_use", "id": "functions.Bash:3", "name": "Bash", "input": {"cmd": "echo é"}},
        {"type": "tool_use", "id": "toolu_2", "name": "Read", "input": {}},
        {"type": "tool_use", "id": "toolu_3", "name": "Shot", "input": {}},
        {"type": "tool_use", "id": "toolu_4", "name": "Fail", "input": {}}]},
    {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "functions.Bash:3", "content": "é"},
        {"type": "tool_result", "tool_use_id": "toolu_2",
         "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"type": "tool_result", "tool_use_id": "toolu_3", "content": [
            {"type": "text", "text": "see image"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}}]},
        {"type": "tool_result", "tool_use_id": "toolu_4", "is_error": True, "content": "boom"},
        {"type": "text", "text": "continue"}]},
]
TOOL_RESULT_OPENAI = [
    {"role": "user", "content": "go"},
    {"role": "assistant", "content": "Running tools.", "tool_calls": [
        {"id": "functions_Bash_3", "type": "function",
         "function": {"name": "Bash", "arguments": '{"cmd": "echo é"}'}},
        {"id": "toolu_2", "type": "function", "function": {"name": "Read", "arguments": "{}"}},
        {"id": "toolu_3", "type": "function", "function": {"name": "Shot", "arguments": "{}"}},
        {"id": "toolu_4", "type": "function", "function": {"name": "Fail", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "functions_Bash_3", "content": "é"},
    {"role": "tool", "tool_call_id": "toolu_2", "content": "a\nb"},
    {"role": "tool", "tool_call_id": "toolu_3", "content": "see image"},
    {"role": "tool", "tool_call_id": "toolu_4", "content": "Error: boom"},
    {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_B64}},
        {"type": "text", "text": "continue"}]},
]
THINKING_HISTORY = [
    {"role": "user", "content": "q"},
    {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "let me think", "signature": "sig"},
        {"type": "redacted_thinking", "data": "xxx"},
        {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"a": 1}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]},
    {"role": "assistant", "content": "done"},
    {"role": "user", "content": "more"},
]
WEATHER_TOOL = {"name": "weather", "description": "Get weather",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
WEATHER_FUNCTION = {"type": "function", "function": {
    "name": "weather", "description": "Get weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
MESSY_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "title": "Args",
    "additionalProperties": False, "$defs": {"X": {"type": "string"}},
    "properties": {
        "title": {"type": "string", "title": "Title", "default": "x", "format": "uri"},
        "when": {"type": "string", "format": "date-time", "examples": ["2020"]},
        "kind": {"const": "a"},
        "n": {"type": ["integer", "null"], "format": "int32"},
        "tags": {"type": "array", "items": {"type": "object", "propertyNames": {"pattern": "^a"},
                                            "properties": {"ref": {"$ref": "#/$defs/X"}}}},
        "any": {"anyOf": [{"type": "string", "format": "email"}, {"type": "null"}]}},
    "required": ["title"]}
GEMINI_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "when": {"type": "string", "format": "date-time"},
        "kind": {"enum": ["a"]},
        "n": {"type": "integer", "format": "int32"},
        "tags": {"type": "array", "items": {"type": "object", "properties": {"ref": {}}}},
        "any": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
    "required": ["title"]}

REQUEST_ROWS = [
    ("minimal", req(), {}, out()),
    ("system string", req(system="Be brief."), {},
     out(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])),
    ("system blocks, billing header and empty block dropped",
     req(system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1; cc_entrypoint=cli;"},
                 {"type": "text", "text": "You are Claude.", "cache_control": {"type": "ephemeral"}},
                 {"type": "text", "text": ""}, {"type": "text", "text": "Rule two."}]), {},
     out(messages=[{"role": "system", "content": "You are Claude.\n\nRule two."},
                   {"role": "user", "content": "hi"}])),
    ("mid-conversation system messages become user text at their position",
     req(system="S", messages=[{"role": "user", "content": "hi"},
                               {"role": "system", "content": "Agents: a, b"},
                               {"role": "system", "content": [{"type": "text", "text": "More"}]},
                               {"role": "assistant", "content": "ok"}]), {},
     out(messages=[{"role": "system", "content": "S"},
                   {"role": "user", "content": "hi\n\n<system-reminder>\nAgents: a, b\n\nMore\n</system-reminder>"},
                   {"role": "assistant", "content": "ok"}])),
    ("mid-conversation system messages kept in place where the provider takes them",
     req(system="S", messages=[{"role": "user", "content": "hi"},
                               {"role": "system", "content": "Agents: a, b", "output_config": {"effort": "low"}},
                               {"role": "assistant", "content": "ok"}]), {"mid_system": True},
     out(messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                   {"role": "system", "content": "Agents: a, b"}, {"role": "assistant", "content": "ok"}])),
    ("system messages before the first turn join the system prompt",
     req(system="S", messages=[{"role": "system", "content": "T"}, {"role": "user", "content": "hi"}]), {},
     out(messages=[{"role": "system", "content": "S\n\nT"}, {"role": "user", "content": "hi"}])),
    ("user text blocks collapse to a string; empty text dropped",
     req(messages=[{"role": "user", "content": [
         {"type": "text", "text": "<system-reminder>r</system-reminder>"}, {"type": "text", "text": ""},
         {"type": "text", "text": "do it", "cache_control": {"type": "ephemeral"}}]}]), {},
     out(messages=[{"role": "user", "content": "<system-reminder>r</system-reminder>\n\ndo it"}])),
    ("images: base64 -> data URL, url -> url",
     req(messages=[{"role": "user", "content": [
         {"type": "text", "text": "look"},
         {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
         {"type": "image", "source": {"type": "url", "url": "https://x/y.jpg"}}]}]), {},
     out(messages=[{"role": "user", "content": [
         {"type": "text", "text": "look"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_B64}},
         {"type": "image_url", "image_url": {"url": "https://x/y.jpg"}}]}])),
    ("documents: PDF -> file part, text source -> text part",
     req(messages=[{"role": "user", "content": [
         {"type": "document", "title": "a.pdf",
          "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
         {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "QQ=="}},
         {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain"}}]}]), {},
     out(messages=[{"role": "user", "content": [
         {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}},
         {"type": "file", "file": {"filename": "document.pdf", "file_data": "data:application/pdf;base64,QQ=="}},
         {"type": "text", "text": "plain"}]}])),
    ("tool_use -> tool_calls; tool_result -> tool messages first, images moved, errors prefixed",
     req(messages=TOOL_RESULT_TURN), {}, out(messages=TOOL_RESULT_OPENAI)),
    ("thinking and redacted_thinking dropped for generic upstreams",
     req(messages=THINKING_HISTORY), {},
     out(messages=[{"role": "user", "content": "q"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "t1", "type": "function", "function": {"name": "Bash", "arguments": '{"a": 1}'}}]},
                   {"role": "tool", "tool_call_id": "t1", "content": ""},
                   {"role": "assistant", "content": "done"},
                   {"role": "user", "content": "more"}])),
    ("replay_reasoning puts thinking on every assistant message ('' when none)",
     req(messages=THINKING_HISTORY[:3] + [{"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]),
     {"replay_reasoning": "reasoning_content"},
     out(messages=[{"role": "user", "content": "q"},
                   {"role": "assistant", "content": None, "reasoning_content": "let me think", "tool_calls": [
                       {"id": "t1", "type": "function", "function": {"name": "Bash", "arguments": '{"a": 1}'}}]},
                   {"role": "tool", "tool_call_id": "t1", "content": ""},
                   {"role": "assistant", "content": "ok", "reasoning_content": ""}])),
    ("tools -> functions; server tools dropped; any -> required; no parallel",
     req(tools=[WEATHER_TOOL, {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
         tool_choice={"type": "any", "disable_parallel_tool_use": True}), {},
     out(tools=[WEATHER_FUNCTION], tool_choice="required", parallel_tool_calls=False)),
    ("tool_choice tool", req(tools=[WEATHER_TOOL], tool_choice={"type": "tool", "name": "weather"}), {},
     out(tools=[WEATHER_FUNCTION], tool_choice={"type": "function", "function": {"name": "weather"}})),
    ("tool_choice auto", req(tools=[WEATHER_TOOL], tool_choice={"type": "auto"}), {},
     out(tools=[WEATHER_FUNCTION], tool_choice="auto")),
    ("tool_choice none", req(tools=[WEATHER_TOOL], tool_choice={"type": "none"}), {},
     out(tools=[WEATHER_FUNCTION], tool_choice="none")),
    ("only server tools: no tools, no tool_choice",
     req(tools=[{"type": "web_fetch_20250910", "name": "web_fetch"}], tool_choice={"type": "auto"}), {}, out()),
    ("tool without input_schema gets an empty object schema",
     req(tools=[{"name": "ping", "type": "custom"}]), {},
     out(tools=[{"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}])),
    ("gemini schema cleaning", req(tools=[{"name": "f", "input_schema": MESSY_SCHEMA}]), {"schema": "gemini"},
     out(tools=[{"type": "function", "function": {"name": "f", "parameters": GEMINI_SCHEMA}}])),
    ("sampling: stop, temperature, top_p pass; top_k dropped; short user id",
     req(stop_sequences=["END", " ", "STOP"], temperature=0.2, top_p=0.9, top_k=5,
         metadata={"user_id": "u-1"}), {},
     out(stop=["END", "STOP"], temperature=0.2, top_p=0.9, user="u-1")),
    ("long metadata.user_id dropped; non-numeric temperature dropped",
     req(metadata={"user_id": "x" * 65}, temperature="hot"), {}, out()),
    ("max_tokens clamped to the model limit", req(max_tokens=64000), {"max_tokens": 8192}, out(max_tokens=8192)),
    ("max_completion_tokens", req(), {"max_completion_tokens": True},
     {"model": "up-model", "max_completion_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}),
    ("thinking budget 1024 -> low", req(thinking={"type": "enabled", "budget_tokens": 1024}), {},
     out(reasoning_effort="low")),
    ("thinking budget 2000 -> medium, reasoning object for OpenRouter",
     req(thinking={"type": "enabled", "budget_tokens": 2000}), {"reasoning_param": "reasoning"},
     out(reasoning={"effort": "medium"})),
    ("thinking budget 10000 -> high", req(thinking={"type": "enabled", "budget_tokens": 10000}), {},
     out(reasoning_effort="high")),
    ("adaptive + output_config.effort xhigh -> xhigh (the openai SDK allows it)",
     req(thinking={"type": "adaptive"}, output_config={"effort": "xhigh"}), {}, out(reasoning_effort="xhigh")),
    ("effort max -> max", req(output_config={"effort": "max"}), {}, out(reasoning_effort="max")),
    ("effort the model lacks -> the nearest lower one it has",
     req(output_config={"effort": "max"}), {"efforts": ["low", "medium", "high"]}, out(reasoning_effort="high")),
    ("adaptive without effort -> medium", req(thinking={"type": "adaptive"}), {}, out(reasoning_effort="medium")),
    ("output_config.effort alone -> effort", req(output_config={"effort": "low"}), {}, out(reasoning_effort="low")),
    ("thinking disabled -> nothing", req(thinking={"type": "disabled"}, output_config={"effort": "low"}), {}, out()),
    ("reasoning_param None -> nothing", req(thinking={"type": "adaptive"}), {"reasoning_param": None}, out()),
    ("pinned effort wins", req(thinking={"type": "enabled", "budget_tokens": 1024}),
     {"reasoning_effort": "xhigh"}, out(reasoning_effort="xhigh")),
    ("pinned none never sends", req(thinking={"type": "adaptive"}), {"reasoning_effort": "none"}, out()),
    ("stream -> stream_options.include_usage", req(stream=True), {},
     out(stream=True, stream_options={"include_usage": True})),
    ("output_config.format json_schema -> strict response_format",
     req(output_config={"format": {"type": "json_schema", "schema": {
         "type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "required": ["a"]}}}), {},
     out(response_format={"type": "json_schema", "json_schema": {
         "name": "structured_output", "strict": True, "schema": {
             "type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
             "required": ["a", "b"], "additionalProperties": False}}})),
    ("extra_body merged last", req(temperature=0.5), {"extra_body": {"temperature": 1, "top_k": 20}},
     out(temperature=1, top_k=20)),
    ("unknown top-level fields dropped",
     req(context_management={"edits": []}, cache_control={"type": "ephemeral"}, service_tier="auto", frobnicate=1),
     {}, out()),
    ("assistant prefill string content", req(messages=[{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "{"}]), {},
     out(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "{"}])),
    ("strict kept on tools; input_examples & co. dropped",
     req(tools=[dict(WEATHER_TOOL, strict=True, input_examples=[{"city": "x"}],
                     eager_input_streaming=True, allowed_callers=["direct"])]), {},
     out(tools=[{"type": "function", "function": dict(WEATHER_FUNCTION["function"], strict=True)}])),
    ("a deferred tool is sent once a tool_reference has loaded it; Claude Code's placeholder never is",
     req(tools=[dict(WEATHER_TOOL, defer_loading=True), dict(WEATHER_TOOL, name="later", defer_loading=True),
                {"name": "DeferredToolPlaceholder", "input_schema": {"type": "object", "properties": {}},
                 "defer_loading": True}],
         messages=[{"role": "user", "content": "go"},
                   {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "ToolSearch", "input": {}}]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
                       {"type": "tool_reference", "tool_name": "weather"}]}]}]), {},
     out(tools=[WEATHER_FUNCTION],
         messages=[{"role": "user", "content": "go"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "t1", "type": "function", "function": {"name": "ToolSearch", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": "t1", "content": "Tool loaded: weather"}])),
    ("ToolSearch's tool_reference results name the loaded tools",
     req(messages=[{"role": "user", "content": "go"},
                   {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "ToolSearch",
                                                      "input": {"query": "select:CronList"}}]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
                       {"type": "tool_reference", "tool_name": "CronList"},
                       {"type": "tool_reference", "tool_name": "NotebookEdit"}]}]}]), {},
     out(messages=[{"role": "user", "content": "go"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "t1", "type": "function", "function": {"name": "ToolSearch",
                                                                     "arguments": '{"query": "select:CronList"}'}}]},
                   {"role": "tool", "tool_call_id": "t1", "content": "Tool loaded: CronList\nTool loaded: NotebookEdit"}])),
    ("search_result keeps title and source; citations dropped",
     req(messages=[{"role": "user", "content": [
         {"type": "search_result", "source": "https://ex.org/a", "title": "A page", "citations": {"enabled": True},
          "content": [{"type": "text", "text": "Alpha."}]},
         {"type": "text", "text": "Sum it up.", "citations": [{"type": "char_location"}]}]}]), {},
     out(messages=[{"role": "user", "content": "A page\nSource: https://ex.org/a\nAlpha.\n\nSum it up."}])),
    ("server_tool_use and web search results in history become text notes",
     req(messages=[{"role": "user", "content": "news?"},
                   {"role": "assistant", "content": [
                       {"type": "text", "text": "Searching."},
                       {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "news"}},
                       {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [
                           {"type": "web_search_result", "title": "T1", "url": "https://a.example/1",
                            "encrypted_content": "xx", "page_age": "1 day"}]},
                       {"type": "text", "text": "Found it."}]},
                   {"role": "user", "content": "thanks"}]), {},
     out(messages=[{"role": "user", "content": "news?"},
                   {"role": "assistant", "content": 'Searching.\n(called web_search: {"query": "news"})\n'
                                                    "\nWeb search results:\n- T1 <https://a.example/1>\nFound it."},
                   {"role": "user", "content": "thanks"}])),
    ("Gemini: the thought signature riding on the tool_use id goes back on the call, the id as issued",
     req(messages=[{"role": "user", "content": "go"},
                   {"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": {},
                                                      "id": cp.join_tool_id("call_1", "c2lnLw==")}]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": cp.join_tool_id("call_1", "c2lnLw=="),
                                                 "content": "ok"}]}]), {"schema": "gemini"},
     out(messages=[{"role": "user", "content": "go"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"},
                        "extra_content": {"google": {"thought_signature": "c2lnLw=="}}}]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "ok"}])),
    ("a mid-conversation system message after a tool call waits for its results",
     req(messages=[{"role": "user", "content": "go"},
                   {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                   {"role": "system", "content": "Be careful."},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}]),
     {"mid_system": True},
     out(messages=[{"role": "user", "content": "go"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": "t1", "content": "ok"},
                   {"role": "system", "content": "Be careful."}])),
]


@pytest.mark.parametrize("name,anthropic_body,spec_overrides,expected", REQUEST_ROWS,
                         ids=[row[0] for row in REQUEST_ROWS])
def test_anthropic_to_openai_request(name, anthropic_body, spec_overrides, expected):
    before = copy.deepcopy(anthropic_body)
    assert anthropic_to_openai_request(anthropic_body, make_spec(**spec_overrides)) == expected
    assert anthropic_body == before  # pure: input untouched


BAD_ROWS = [
    ("body not an object", ["x"], "body"),
    ("messages not a list", {"messages": "hi"}, "messages"),
    ("message not an object", {"messages": ["hi"]}, "messages.0"),
    ("unknown role", {"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ("content not string or list", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("block not an object", {"messages": [{"role": "user", "content": "a"},
                                          {"role": "assistant", "content": "b"},
                                          {"role": "user", "content": ["x"]}]}, "messages.2.content.0"),
    ("block without type", {"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages.0.content.0"),
    ("tool_result without id", {"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
     "messages.0.content.0.tool_use_id"),
    ("tool_use without id", {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "x"}]}]},
     "messages.0.content.0"),
    ("image file source", {"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "f"}}]}]}, "messages.0.content.0.source.type"),
    ("image without source", {"messages": [{"role": "user", "content": [{"type": "image"}]}]},
     "messages.0.content.0.source"),
    ("tool_result content bad", {"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [1]}]}]}, "messages.0.content.0.content.0"),
    ("system not text", {"system": 3, "messages": []}, "system"),
    ("system block not text", {"system": [{"type": "text", "text": 3}], "messages": []}, "system.0"),
    ("tools not a list", {"messages": [], "tools": {}}, "tools"),
    ("tool without name", {"messages": [], "tools": [{"input_schema": {}}]}, "tools.0.name"),
    ("tool_choice unknown", {"messages": [], "tools": [WEATHER_TOOL], "tool_choice": {"type": "maybe"}},
     "tool_choice.type"),
    ("max_tokens not an int", {"messages": [], "max_tokens": "many"}, "max_tokens"),
]


@pytest.mark.parametrize("name,anthropic_body,param", BAD_ROWS, ids=[row[0] for row in BAD_ROWS])
def test_bad_requests(name, anthropic_body, param):
    with pytest.raises(BadRequest) as caught:
        anthropic_to_openai_request(anthropic_body, make_spec())
    assert caught.value.param == param and caught.value.status == 400


def test_server_tool_names():
    body = req(tools=[WEATHER_TOOL, {"type": "web_search_20250305", "name": "web_search"},
                      {"type": "web_fetch_20250910", "name": "web_fetch"}, {"type": "custom", "name": "c"}])
    assert server_tool_names(body) == ["web_search", "web_fetch"]
    assert server_tool_names(req()) == [] and server_tool_names({"tools": None}) == []


@pytest.mark.parametrize("budget,effort", [(1024, "low"), (1025, "medium"), (8192, "medium"),
                                           (8193, "high"), (None, "medium")])
def test_effort_from_budget(budget, effort):
    assert effort_from_budget(budget) == effort


def test_gemini_schema_keeps_property_named_like_keywords():
    schema = {"type": "object", "properties": {"default": {"type": "string"}, "title": {"type": "number"}}}
    assert clean_gemini_schema(schema) == schema


# Claude Code-shaped request (trimmed from fixtures/claude_code turn 2).
CLAUDE_CODE_BODY = {
    "model": "claude-opus-4-8", "max_tokens": 64000, "stream": True,
    "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "metadata": {"user_id": json.dumps({"device_id": "2c3d" * 16, "session_id": "3fa9"})},
    "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.434; cc_entrypoint=sdk-cli;"},
               {"type": "text", "text": "You are a Claude agent.", "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                                     {"type": "text", "text": "create hello.txt"}]},
        {"role": "system", "content": "Available agent types for the Agent tool: ..."},
        {"role": "assistant", "content": [
            {"type": "text", "text": "I will write the file."},
            {"type": "tool_use", "id": "toolu_stub01", "name": "Write",
             "input": {"file_path": "/p/hello.txt", "content": "hi there"}}]},
        {"role": "user", "content": [{"tool_use_id": "toolu_stub01", "type": "tool_result",
                                      "content": "File created", "cache_control": {"type": "ephemeral"}}]}],
    "tools": [{"name": n, "description": n, "input_schema": {"type": "object", "properties": {}}}
              for n in ["Bash", "Write", "WebFetch", "WebSearch"]],
}


def check_openai_request(openai_body, tool_count):
    """Roles valid, every tool_call answered right after, no billing header, tools and usage."""
    messages = openai_body["messages"]
    assert all(m["role"] in ("system", "user", "assistant", "tool") for m in messages)
    assert [m["role"] for m in messages].count("system") <= 1 and messages[0]["role"] == "system"
    for i, message in enumerate(messages):
        if message.get("tool_calls"):
            ids = [c["id"] for c in message["tool_calls"]]
            answered = [m["tool_call_id"] for m in messages[i + 1:i + 1 + len(ids)] if m["role"] == "tool"]
            assert sorted(answered) == sorted(ids)
            for call in message["tool_calls"]:
                json.loads(call["function"]["arguments"])
    assert "x-anthropic-billing-header" not in json.dumps(openai_body)
    assert "cache_control" not in json.dumps(openai_body)
    assert len(openai_body["tools"]) == tool_count
    assert all(t["type"] == "function" for t in openai_body["tools"])
    assert openai_body["stream_options"] == {"include_usage": True}
    assert "user" not in openai_body  # Claude Code's JSON user_id is longer than 64 chars


def test_claude_code_shaped_request():
    openai_body = anthropic_to_openai_request(CLAUDE_CODE_BODY, make_spec(max_tokens=8192))
    check_openai_request(openai_body, 4)
    assert openai_body["messages"][0] == {"role": "system", "content": "You are a Claude agent."}
    # the mid-conversation system message is user text where it stood: after the first user turn
    assert openai_body["messages"][1] == {
        "role": "user", "content": "<system-reminder>ctx</system-reminder>\n\ncreate hello.txt\n\n"
                                   "<system-reminder>\nAvailable agent types for the Agent tool: ...\n</system-reminder>"}
    assert openai_body["max_tokens"] == 8192 and openai_body["reasoning_effort"] == "high"


@pytest.mark.parametrize("name", ["claude_code_2.1.197_turn1_user_prompt.json",
                                  "claude_code_2.1.197_turn2_tool_result.json"])
def test_claude_code_fixture_requests(name):
    path = os.path.join(FIXTURES_ROOT, "claude_code", name)
    if not os.path.exists(path):
        pytest.skip("shared fixtures absent")
    with open(path) as f:
        anthropic_body = json.load(f)["body"]
    for spec in (make_spec(), make_spec(schema="gemini", replay_reasoning="reasoning_content")):
        check_openai_request(anthropic_to_openai_request(anthropic_body, spec), 24)


# Claude Code 2.1.332 against a local recorder (trimmed: long texts cut, five of its tools kept, schema
# descriptions removed). first_turn holds a mid-conversation system message with per-message
# output_config; tool_turn a thinking block and a tool_result; tool_search ToolSearch's tool_reference
# result; auto_mode `safeguards`, effort max and the StructuredOutput tool; mid_conversation_system a
# system message after the /effort command, empty but for its output_config.
CLAUDE_CODE_2_1_332 = json.loads(r'''{
    "first_turn": {"path": "/v1/messages?beta=true", "headers": {"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,per-turn-control-2026-07-01,mid-conversation-tool-changes-2026-07-01,thinking-token-count-2026-05-13,advanced-tool-use-2025-11-20,effort-2025-11-24", "anthropic-version": "2023-06-01", "user-agent": "claude-cli/2.1.332 (external, sdk-cli)", "x-app": "cli", "x-claude-code-session-id": "d3a35b2a-f996-463e-9b50-4b49a88e2bd3"}, "body": {"model": "claude-opus-5-5", "messages": [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>\nAttribution for git commits and pull requests you create from here on (this replaces Claude Code's own earlier attribution guidance, such as a…"}, {"type": "text", "text": "create file x.txt with content y using the Write tool, then read it back"}]}, {"role": "system", "content": [{"type": "text", "text": "# Environment\nYou have been invoked in the following environment: \n - Primary working directory: /tmp/ccwork\n - Is a git repository: false\n - Platform: linux\n -…", "cache_control": {"type": "ephemeral"}}], "output_config": {"effort": "medium"}}], "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332.ec7; cc_entrypoint=sdk-cli;"}, {"type": "text", "text": "You are a Claude agent, built on Anthropic's Claude Agent SDK.", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "\nYou are an agent working with the user toward their goals, using your own judgment along the way.\n\nIMPORTANT: Assist with authorized security testing, defensiv…", "cache_control": {"type": "ephemeral"}}], "tools": [{"name": "Read", "description": "Reads a file from the local filesystem.\n\n- `file_path` must …", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"file_path": {"type": "string"}, "offset": {"type": "integer", "minimum": 0, "maximum": 9007199254740991}, "limit": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9007199254740991}, "pages": {"type": "string"}, "allow_large": {"type": "boolean"}}, "required": ["file_path"], "additionalProperties": false}}, {"name": "ToolSearch", "description": "Fetches full schema definitions for deferred tools so they c…", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"query": {"type": "string"}, "max_results": {"default": 5, "type": "number"}}, "required": ["query"], "additionalProperties": false}}, {"name": "DeferredToolPlaceholder", "description": "Reserved placeholder that keeps deferred tool loading active…", "input_schema": {"type": "object", "properties": {}}, "defer_loading": true}, {"name": "Write", "description": "Writes a file to the local filesystem, overwriting if one ex…", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"file_path": {"type": "string"}, "content": {"type": "string"}}, "required": ["file_path", "content"], "additionalProperties": false}}], "metadata": {"user_id": "{\"device_id\":\"2b55e463eb07878d49b7dc8b6547b205520607fbe7e6d07bdf0d12c1f8836326\",\"account_uuid\":\"\",\"session_id\":\"d3a35b2a-f996-463e-9b50-4b49a88e2bd3\"}"}, "max_tokens": 128000, "thinking": {"type": "adaptive", "display": "omitted"}, "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}, "output_config": {"effort": "medium"}, "stream": true}},
    "tool_turn": {"path": "/v1/messages?beta=true", "headers": {"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,per-turn-control-2026-07-01,mid-conversation-tool-changes-2026-07-01,thinking-token-count-2026-05-13,advanced-tool-use-2025-11-20,effort-2025-11-24", "anthropic-version": "2023-06-01", "user-agent": "claude-cli/2.1.332 (external, sdk-cli)", "x-app": "cli", "x-claude-code-session-id": "d3a35b2a-f996-463e-9b50-4b49a88e2bd3"}, "body": {"model": "claude-opus-5-5", "messages": [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>\nAttribution for git commits and pull requests you create from here on (this replaces Claude Code's own earlier attribution guidance, such as a…"}, {"type": "text", "text": "create file x.txt with content y using the Write tool, then read it back"}]}, {"role": "system", "content": "# Environment\nYou have been invoked in the following environment: \n - Primary working directory: /tmp/ccwork\n - Is a git repository: false\n - Platform: linux\n -…", "output_config": {"effort": "medium"}}, {"role": "assistant", "content": [{"type": "thinking", "thinking": "I should write the file.", "signature": "recsig0"}, {"type": "text", "text": "I will write the file."}, {"type": "tool_use", "id": "toolu_rec1_2", "name": "Write", "input": {"file_path": "/tmp/ccwork/x.txt", "content": "y"}}]}, {"role": "user", "content": [{"tool_use_id": "toolu_rec1_2", "type": "tool_result", "content": "File created successfully at: /tmp/ccwork/x.txt (file state is current in your context — no need to Read it back)", "cache_control": {"type": "ephemeral"}}]}], "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332.ec7; cc_entrypoint=sdk-cli;"}, {"type": "text", "text": "You are a Claude agent, built on Anthropic's Claude Agent SDK.", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "\nYou are an agent working with the user toward their goals, using your own judgment along the way.\n\nIMPORTANT: Assist with authorized security testing, defensiv…", "cache_control": {"type": "ephemeral"}}], "tools": [{"name": "Read", "description": "Reads a file from the local filesystem.\n\n- `file_path` must …", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"file_path": {"type": "string"}, "offset": {"type": "integer", "minimum": 0, "maximum": 9007199254740991}, "limit": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9007199254740991}, "pages": {"type": "string"}, "allow_large": {"type": "boolean"}}, "required": ["file_path"], "additionalProperties": false}}, {"name": "ToolSearch", "description": "Fetches full schema definitions for deferred tools so they c…", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"query": {"type": "string"}, "max_results": {"default": 5, "type": "number"}}, "required": ["query"], "additionalProperties": false}}, {"name": "DeferredToolPlaceholder", "description": "Reserved placeholder that keeps deferred tool loading active…", "input_schema": {"type": "object", "properties": {}}, "defer_loading": true}, {"name": "Write", "description": "Writes a file to the local filesystem, overwriting if one ex…", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"file_path": {"type": "string"}, "content": {"type": "string"}}, "required": ["file_path", "content"], "additionalProperties": false}}], "metadata": {"user_id": "{\"device_id\":\"2b55e463eb07878d49b7dc8b6547b205520607fbe7e6d07bdf0d12c1f8836326\",\"account_uuid\":\"\",\"session_id\":\"d3a35b2a-f996-463e-9b50-4b49a88e2bd3\"}"}, "max_tokens": 128000, "thinking": {"type": "adaptive", "display": "omitted"}, "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}, "output_config": {"effort": "medium"}, "stream": true}},
    "tool_search": {"path": "/v1/messages?beta=true", "headers": {"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,per-turn-control-2026-07-01,mid-conversation-tool-changes-2026-07-01,thinking-token-count-2026-05-13,advanced-tool-use-2025-11-20,effort-2025-11-24", "anthropic-version": "2023-06-01", "user-agent": "claude-cli/2.1.332 (external, sdk-cli)", "x-app": "cli", "x-claude-code-session-id": "a6eb5873-c9fe-4c7a-a69b-be5b4c6d9e79"}, "body": {"model": "claude-opus-5-5", "messages": [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>\nAttribution for git commits and pull requests you create from here on (this replaces Claude Code's own earlier attribution guidance, such as a…"}, {"type": "text", "text": "list my cron jobs"}]}, {"role": "system", "content": "# Environment\nYou have been invoked in the following environment: \n - Primary working directory: /tmp/ccwork\n - Is a git repository: false\n - Platform: linux\n -…", "output_config": {"effort": "medium"}}, {"role": "assistant", "content": [{"type": "text", "text": "Loading the tool."}, {"type": "tool_use", "id": "toolu_rec1_1", "name": "ToolSearch", "input": {"query": "select:NotebookEdit,CronList"}}]}, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_rec1_1", "content": [{"type": "tool_reference", "tool_name": "NotebookEdit"}, {"type": "tool_reference", "tool_name": "CronList"}]}, {"type": "text", "text": "Tool loaded.", "cache_control": {"type": "ephemeral"}}]}], "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332.34c; cc_entrypoint=sdk-cli;"}, {"type": "text", "text": "You are a Claude agent, built on Anthropic's Claude Agent SDK.", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "\nYou are an agent working with the user toward their goals, using your own judgment along the way.\n\nIMPORTANT: Assist with authorized security testing, defensiv…", "cache_control": {"type": "ephemeral"}}], "tools": [{"name": "CronList", "description": "List all cron jobs scheduled via CronCreate, both durable (.…", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {}, "additionalProperties": false}, "defer_loading": true}, {"name": "NotebookEdit", "description": "Replaces, inserts, or deletes a single cell in a Jupyter not…", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"notebook_path": {"type": "string"}, "cell_id": {"type": "string"}, "new_source": {"type": "string"}, "cell_type": {"type": "string", "enum": ["code", "markdown"]}, "edit_mode": {"type": "string", "enum": ["replace", "insert", "delete"]}}, "required": ["notebook_path", "new_source"], "additionalProperties": false}, "defer_loading": true}, {"name": "Read", "description": "Reads a file from the local filesystem.\n\n- `file_path` must …", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"file_path": {"type": "string"}, "offset": {"type": "integer", "minimum": 0, "maximum": 9007199254740991}, "limit": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9007199254740991}, "pages": {"type": "string"}, "allow_large": {"type": "boolean"}}, "required": ["file_path"], "additionalProperties": false}}, {"name": "ToolSearch", "description": "Fetches full schema definitions for deferred tools so they c…", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"query": {"type": "string"}, "max_results": {"default": 5, "type": "number"}}, "required": ["query"], "additionalProperties": false}}, {"name": "DeferredToolPlaceholder", "description": "Reserved placeholder that keeps deferred tool loading active…", "input_schema": {"type": "object", "properties": {}}, "defer_loading": true}, {"name": "Write", "description": "Writes a file to the local filesystem, overwriting if one ex…", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"file_path": {"type": "string"}, "content": {"type": "string"}}, "required": ["file_path", "content"], "additionalProperties": false}}], "metadata": {"user_id": "{\"device_id\":\"2b55e463eb07878d49b7dc8b6547b205520607fbe7e6d07bdf0d12c1f8836326\",\"account_uuid\":\"\",\"session_id\":\"a6eb5873-c9fe-4c7a-a69b-be5b4c6d9e79\"}"}, "max_tokens": 128000, "thinking": {"type": "adaptive", "display": "omitted"}, "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}, "output_config": {"effort": "medium"}, "stream": true}},
    "auto_mode": {"path": "/v1/messages?beta=true", "headers": {"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,per-turn-control-2026-07-01,mid-conversation-tool-changes-2026-07-01,thinking-token-count-2026-05-13,advanced-tool-use-2025-11-20,effort-2025-11-24,dangerous-tool-use-2026-09-03,afk-mode-2026-01-31", "anthropic-version": "2023-06-01", "user-agent": "claude-cli/2.1.332 (external, sdk-cli)", "x-app": "cli", "x-claude-code-session-id": "95127393-ded5-4c6e-a924-931f7dbbd07b"}, "body": {"model": "claude-opus-5-5", "messages": [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>\nAttribution for git commits and pull requests you create from here on (this replaces Claude Code's own earlier attribution guidance, such as a…"}, {"type": "text", "text": "write auto.txt containing auto"}]}, {"role": "system", "content": [{"type": "text", "text": "# Environment\nYou have been invoked in the following environment: \n - Primary working directory: /tmp/ccwork\n - Is a git repository: false\n - Platform: linux\n -…", "cache_control": {"type": "ephemeral"}}], "output_config": {"effort": "max"}}], "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332.77d; cc_entrypoint=sdk-cli;"}, {"type": "text", "text": "You are a Claude agent, built on Anthropic's Claude Agent SDK.", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "\nYou are an agent working with the user toward their goals, using your own judgment along the way.\n\nIMPORTANT: Assist with authorized security testing, defensiv…", "cache_control": {"type": "ephemeral"}}], "tools": [{"name": "Read", "description": "Reads a file from the local filesystem.\n\n- `file_path` must …", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"file_path": {"type": "string"}, "offset": {"type": "integer", "minimum": 0, "maximum": 9007199254740991}, "limit": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9007199254740991}, "pages": {"type": "string"}, "allow_large": {"type": "boolean"}}, "required": ["file_path"], "additionalProperties": false}}, {"name": "StructuredOutput", "description": "Use this tool to return your final response in the requested…", "input_schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}, {"name": "ToolSearch", "description": "Fetches full schema definitions for deferred tools so they c…", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"query": {"type": "string"}, "max_results": {"default": 5, "type": "number"}}, "required": ["query"], "additionalProperties": false}}, {"name": "DeferredToolPlaceholder", "description": "Reserved placeholder that keeps deferred tool loading active…", "input_schema": {"type": "object", "properties": {}}, "defer_loading": true}, {"name": "Write", "description": "Writes a file to the local filesystem, overwriting if one ex…", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"file_path": {"type": "string"}, "content": {"type": "string"}}, "required": ["file_path", "content"], "additionalProperties": false}}], "metadata": {"user_id": "{\"device_id\":\"2b55e463eb07878d49b7dc8b6547b205520607fbe7e6d07bdf0d12c1f8836326\",\"account_uuid\":\"\",\"session_id\":\"95127393-ded5-4c6e-a924-931f7dbbd07b\"}"}, "max_tokens": 128000, "thinking": {"type": "adaptive", "display": "omitted"}, "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}, "safeguards": [{"type": "dangerous_tool_use", "classifier_context": {"v": 1, "permission_mode": "auto", "platform": "linux", "live_cwd": "/tmp/ccwork"}}], "output_config": {"effort": "max"}, "stream": true}},
    "mid_conversation_system": {"path": "/v1/messages?beta=true", "headers": {"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,per-turn-control-2026-07-01,mid-conversation-tool-changes-2026-07-01,thinking-token-count-2026-05-13,advanced-tool-use-2025-11-20,effort-2025-11-24,thinking-display-updates-2026-08-18", "anthropic-version": "2023-06-01", "user-agent": "claude-cli/2.1.332 (external, sdk-cli)", "x-app": "cli", "x-claude-code-session-id": "a93a422b-bff3-44fd-87e3-4b9aaacebb63"}, "body": {"model": "claude-opus-5-5", "messages": [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>\nAttribution for git commits and pull requests you create from here on (this replaces Claude Code's own earlier attribution guidance, such as a…"}, {"type": "text", "text": "hello one"}]}, {"role": "system", "content": "# Environment\nYou have been invoked in the following environment: \n - Primary working directory: /tmp/ccwork\n - Is a git repository: false\n - Platform: linux\n -…", "output_config": {"effort": "medium"}}, {"role": "assistant", "content": [{"type": "text", "text": "First answer."}]}, {"role": "user", "content": [{"type": "text", "text": "<local-command-caveat>The command below was run directly in Claude Code, not sent to you as a request, and its output goes straight to the user. It's recorded h…"}, {"type": "text", "text": "<command-name>/effort</command-name>\n            <command-message>effort</command-message>\n            <command-args>low</command-args>\n"}, {"type": "text", "text": "<local-command-stdout>Set effort level to low (this session only): Quick, straightforward implementation with minimal overhead</local-command-stdout>\n"}, {"type": "text", "text": "hello two", "cache_control": {"type": "ephemeral"}}]}, {"role": "system", "content": [], "output_config": {"effort": "low"}}], "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332.551; cc_entrypoint=sdk-cli;"}, {"type": "text", "text": "You are a Claude agent, built on Anthropic's Claude Agent SDK.", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "\nYou are an agent working with the user toward their goals, using your own judgment along the way.\n\nIMPORTANT: Assist with authorized security testing, defensiv…", "cache_control": {"type": "ephemeral"}}], "tools": [{"name": "Read", "description": "Reads a file from the local filesystem.\n\n- `file_path` must …", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"file_path": {"type": "string"}, "offset": {"type": "integer", "minimum": 0, "maximum": 9007199254740991}, "limit": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9007199254740991}, "pages": {"type": "string"}, "allow_large": {"type": "boolean"}}, "required": ["file_path"], "additionalProperties": false}}, {"name": "ToolSearch", "description": "Fetches full schema definitions for deferred tools so they c…", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"query": {"type": "string"}, "max_results": {"default": 5, "type": "number"}}, "required": ["query"], "additionalProperties": false}}, {"name": "DeferredToolPlaceholder", "description": "Reserved placeholder that keeps deferred tool loading active…", "input_schema": {"type": "object", "properties": {}}, "defer_loading": true}, {"name": "Write", "description": "Writes a file to the local filesystem, overwriting if one ex…", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"file_path": {"type": "string"}, "content": {"type": "string"}}, "required": ["file_path", "content"], "additionalProperties": false}}], "metadata": {"user_id": "{\"device_id\":\"2b55e463eb07878d49b7dc8b6547b205520607fbe7e6d07bdf0d12c1f8836326\",\"account_uuid\":\"\",\"session_id\":\"a93a422b-bff3-44fd-87e3-4b9aaacebb63\"}"}, "max_tokens": 128000, "thinking": {"type": "adaptive", "display": "updates"}, "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}, "output_config": {"effort": "low"}, "stream": true}}
}''')


# Claude Code 2.1.332, `claude -p --model glm-4.6 "say hi"` against a local recorder (trimmed: texts cut,
# three of its twelve tools kept, schema descriptions removed): for a model name it does not know it
# sends adaptive thinking, effort high, max_tokens 32000, clear_thinking edits and the trailing system message.
CLAUDE_CODE_UNKNOWN_MODEL = json.loads(r'''{"path": "/v1/messages?beta=true", "headers": {"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,mid-conversation-tool-changes-2026-07-01,thinking-token-count-2026-05-13,advanced-tool-use-2025-11-20,effort-2025-11-24", "anthropic-version": "2023-06-01", "user-agent": "claude-cli/2.1.332 (external, sdk-cli)", "x-app": "cli"}, "body": {"model": "glm-4.6", "messages": [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>\nAttribution for git commits and pull reque…"}, {"type": "text", "text": "say hi"}]}, {"role": "system", "content": [{"type": "text", "text": "# Environment\nYou have been invoked in the following environ…", "cache_control": {"type": "ephemeral"}}]}], "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332.0b8; cc_entry…"}, {"type": "text", "text": "You are a Claude agent, built on Anthropic's Claude Agent SD…", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "\nYou are an agent working with the user toward their goals, …", "cache_control": {"type": "ephemeral"}}], "tools": [{"name": "Read", "description": "Reads a file from the local filesystem.\n\n- `file_path` must …", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"file_path": {"type": "string"}}, "required": ["file_path"], "additionalProperties": false}}, {"name": "ToolSearch", "description": "Fetches full schema definitions for deferred tools so they c…", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"query": {"type": "string"}, "max_results": {"default": 5, "type": "number"}}, "required": ["query"], "additionalProperties": false}}, {"name": "DeferredToolPlaceholder", "description": "Reserved placeholder that keeps deferred tool loading active…", "input_schema": {"type": "object", "properties": {}}, "defer_loading": true}], "metadata": {"user_id": "{\"device_id\":\"296bc53a487a1d5eb80602d4149b0b74be08daf5bf28bbdaa0d8c8c529591ea7\",\"account_uuid\":\"\",\"session_id\":\"44ab9889-1676-4d93-9330-b9a52cb4446d\"}"}, "max_tokens": 32000, "thinking": {"type": "adaptive", "display": "omitted"}, "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}, "output_config": {"effort": "high"}, "stream": true}}''')


def check_anthropic_request(anthropic_body):
    """What Anthropic checks first: a user turn first, non-empty turns, each tool_use answered next."""
    messages = anthropic_body["messages"]
    assert messages[0]["role"] == "user" and all(m["content"] for m in messages)
    for i, message in enumerate(messages):
        uses = [b["id"] for b in message["content"] if b["type"] == "tool_use"]
        if uses:
            results = [b["tool_use_id"] for b in messages[i + 1]["content"] if b["type"] == "tool_result"]
            assert sorted(results) == sorted(uses) and messages[i + 1]["content"][0]["type"] == "tool_result"


@pytest.mark.parametrize("name", sorted(CLAUDE_CODE_2_1_332))
def test_claude_code_2_1_332_requests_through_both_conversion_paths(name):
    captured = CLAUDE_CODE_2_1_332[name]
    notes = []
    openai_body = anthropic_to_openai_request(captured["body"], make_spec(model="gpt-5"), notes=notes)
    check_openai_request(openai_body, len(captured["body"]["tools"]) - 1)      # DeferredToolPlaceholder: not loaded
    assert "DeferredToolPlaceholder" not in {t["function"]["name"] for t in openai_body["tools"]}
    noted = {cp._NOTE_INDEX.sub(".*", path) for path, _ in notes}
    assert {"context_management", "thinking.display", "messages.*.output_config", "tools.*"} <= noted
    assert ("safeguards" in noted) == (name == "auto_mode")
    assert ("tools.*.defer_loading" in noted) == (name == "tool_search")       # loaded tools lose the flag alone
    # the mid-conversation system message stays where it was: in the first user turn, not the system prompt
    assert "# Environment" not in openai_body["messages"][0]["content"]
    assert "<system-reminder>\n# Environment" in openai_body["messages"][1]["content"]
    expected_effort = {"auto_mode": "max", "mid_conversation_system": "low"}.get(name, "medium")
    assert openai_body["reasoning_effort"] == expected_effort
    back = openai_to_anthropic_request(openai_body, captured["body"]["model"])     # the other path
    check_anthropic_request(back)
    assert back["output_config"]["effort"] == expected_effort and "temperature" not in back


def test_claude_code_2_1_332_tool_search_result_names_the_loaded_tools():
    openai_body = anthropic_to_openai_request(CLAUDE_CODE_2_1_332["tool_search"]["body"], make_spec())
    tool_message = next(m for m in openai_body["messages"] if m["role"] == "tool")
    assert tool_message["content"] == "Tool loaded: NotebookEdit\nTool loaded: CronList"
    assert {"CronList", "NotebookEdit"} <= {t["function"]["name"] for t in openai_body["tools"]}


def test_claude_code_2_1_332_through_the_proxy_both_ways(tmp_path):
    async def scenario():
        results = []
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as anthropic_up, \
                FakeUpstream(lambda req: Stream(openai_stream_chunks())) as openai_up:
            config = make_config(tmp_path, anthropic_up.url, providers={"o": {
                "format": "openai", "base_url": openai_up.url + "/v1", "prompt_cache_key": True}},
                routes={"default": "anthropic", "think": "o,gpt-5"})
            async with running_proxy(config) as (_, port):
                for name in sorted(CLAUDE_CODE_2_1_332):
                    captured = CLAUDE_CODE_2_1_332[name]
                    passthrough = dict(captured["body"], thinking={"type": "disabled"}, stream=False)
                    raw = json.dumps(passthrough).encode()
                    await call(port, "POST", captured["path"], raw, dict(captured["headers"], **ANTHROPIC_HEADERS))
                    status, _, body = await call(port, "POST", captured["path"], captured["body"],
                                                 dict(captured["headers"], **ANTHROPIC_HEADERS))
                    results.append((raw, status, sse_events(body)[-1][0]))
            return results, anthropic_up.requests, openai_up.requests
    results, to_anthropic, to_openai = run(scenario())
    for (raw, status, last_event), sent in zip(results, to_anthropic):
        assert sent["path"] == "/v1/messages?beta=true" and sent["raw"] == raw     # every field, byte for byte
        assert (status, last_event) == (200, "message_stop")
    session = hashlib.sha256(b"d3a35b2a-f996-463e-9b50-4b49a88e2bd3").hexdigest()[:32]
    assert to_openai[-1]["body"]["prompt_cache_key"] in {session, hashlib.sha256(
        CLAUDE_CODE_2_1_332["mid_conversation_system"]["headers"]["x-claude-code-session-id"].encode()).hexdigest()[:32]}
    assert all(r["body"]["model"] == "gpt-5" and r["path"] == "/v1/chat/completions" for r in to_openai)


def test_prompt_cache_key_is_the_session_where_the_provider_takes_one():
    assert anthropic_to_openai_request(req(), make_spec(prompt_cache_key=True), session_id="s1")["prompt_cache_key"] == "s1"
    assert "prompt_cache_key" not in anthropic_to_openai_request(req(), make_spec(), session_id="s1")
    assert "prompt_cache_key" not in anthropic_to_openai_request(req(), make_spec(prompt_cache_key=True))


def test_every_drop_is_a_note_with_its_path_and_a_debug_line(caplog):
    body = req(frobnicate=1, top_k=3, metadata={"user_id": "u", "tier": "x"},
               thinking={"type": "adaptive", "display": "omitted"},
               tools=[dict(WEATHER_TOOL, input_examples=[{}], eager_input_streaming=True, allowed_callers=["direct"])],
               messages=[{"role": "user", "content": "hi"},
                         {"role": "system", "content": [], "output_config": {"effort": "low"}}])
    notes = []
    with caplog.at_level(logging.DEBUG, logger="claude_proxy"):
        anthropic_to_openai_request(body, make_spec(), notes=notes)
    paths = [path for path, _ in notes]
    assert paths == ["frobnicate", "top_k", "thinking.display", "messages.1.output_config", "metadata.tier",
                     "tools.0.allowed_callers", "tools.0.eager_input_streaming", "tools.0.input_examples"]
    assert all(why.startswith(("dropped", "rewritten")) for _, why in notes)
    assert all(r.levelno == logging.DEBUG for r in caplog.records)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == paths


def test_a_gemini_thought_signature_round_trips_through_claude_code():
    """Upstream call with extra_content -> tool_use id the client keeps -> the call replayed with it."""
    signature = "CiQBVKhc7q+/thought=="
    events = run_stream([chunk({"tool_calls": [{"index": 0, "id": "call_g", "type": "function",
                                                "function": {"name": "f", "arguments": "{}"},
                                                "extra_content": {"google": {"thought_signature": signature}}}]}),
                         chunk(finish="tool_calls")])
    tool_use = fold_anthropic_events(events)["content"][0]
    assert re.fullmatch(r"[A-Za-z0-9_-]+", tool_use["id"]) and cp.split_tool_id(tool_use["id"]) == ("call_g", signature)
    history = req(messages=[{"role": "user", "content": "go"}, {"role": "assistant", "content": [tool_use]},
                            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use["id"], "content": "r"}]}])
    messages = anthropic_to_openai_request(history, make_spec(schema="gemini"))["messages"]
    assert messages[1]["tool_calls"][0]["id"] == "call_g" and messages[2]["tool_call_id"] == "call_g"
    assert messages[1]["tool_calls"][0]["extra_content"] == {"google": {"thought_signature": signature}}
    plain = anthropic_to_openai_request(history, make_spec())["messages"]
    assert "extra_content" not in plain[1]["tool_calls"][0] and plain[1]["tool_calls"][0]["id"] == "call_g"


@pytest.mark.parametrize("tool_id", ["call_1", "functions_Bash_3", "toolu_01", "x__ts_y", "x__ts_"])
def test_tool_id_signature_codec(tool_id):
    for signature in ("sig+/=é", "__ts_", "a" * 700):
        joined = cp.join_tool_id(tool_id, signature)
        assert re.fullmatch(r"[A-Za-z0-9_-]+", joined) and cp.split_tool_id(joined) == (tool_id, signature)
    if "__ts_" not in tool_id:
        assert cp.join_tool_id(tool_id, None) == tool_id and cp.split_tool_id(tool_id) == (tool_id, None)


# ---- 2. stream machine: fixtures ---------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(STREAMS))
def test_inline_streams_follow_grammar(name):
    events = run_stream(sse_chunks(STREAMS[name]))
    check_anthropic_grammar(events)
    assert signature_deltas_before_stop(events)
    assert events[0]["message"]["model"] == "claude-client" and events[0]["message"]["id"] == "msg_test"


def final_usage(events):
    return events[-2]["usage"]


def usage_of(input_tokens, output_tokens, read=0, written=0, thinking=None):
    """The Anthropic usage the stream machine reports (cache_creation object, thinking when counted)."""
    usage = {"input_tokens": input_tokens, "output_tokens": output_tokens, "cache_read_input_tokens": read,
             "cache_creation_input_tokens": written,
             "cache_creation": {"ephemeral_5m_input_tokens": written, "ephemeral_1h_input_tokens": 0}}
    if thinking is not None:
        usage["output_tokens_details"] = {"thinking_tokens": thinking}
    return usage


def test_parallel_tools():
    events = run_stream(sse_chunks(OPENAI_PARALLEL_TOOLS))
    assert block_types(events) == ["tool_use", "tool_use"]
    message = fold_anthropic_events(events)
    assert message["content"] == [
        {"type": "tool_use", "id": "call_JMW1whyEaYG438VE1OIflxA2", "name": "GetWeatherArgs",
         "input": {"city": "Edinburgh", "country": "GB", "units": "c"}},
        {"type": "tool_use", "id": "call_DNYTawLBoN8fj3KN6qU9N1Ou", "name": "get_stock_price",
         "input": {"ticker": "AAPL", "exchange": "NASDAQ"}}]
    assert message["stop_reason"] == "tool_use"
    assert message["usage"] == usage_of(149, 60, thinking=0)
    # streamed as it came: more than one input_json_delta per block
    assert sum(1 for e in events if e["type"] == "content_block_delta") > 4


def test_deepseek_reasoning_then_text_usage_on_finish_chunk():
    events = run_stream(sse_chunks(DEEPSEEK_REASONING))
    assert block_types(events) == ["thinking", "text"]
    message = fold_anthropic_events(events)
    assert message["content"][0] == {"type": "thinking", "thinking": "Hmm,", "signature": ""}
    assert message["content"][1]["text"].endswith(" today?")
    assert final_usage(events) == usage_of(6, 212, thinking=198)


def test_deepseek_cache_hit_tokens():
    chunks = [{"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 100, "completion_tokens": 3, "prompt_cache_hit_tokens": 64,
                         "prompt_cache_miss_tokens": 36}}]
    assert final_usage(run_stream(chunks)) == usage_of(36, 3, read=64)


def test_openai_cached_tokens():
    chunks = [{"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}]},
              {"choices": [], "usage": {"prompt_tokens": 2000, "completion_tokens": 5,
                                        "prompt_tokens_details": {"cached_tokens": 1536}}}]
    assert final_usage(run_stream(chunks))["cache_read_input_tokens"] == 1536
    assert final_usage(run_stream(chunks))["input_tokens"] == 464


def test_openrouter_reasoning_details_signature_and_late_usage():
    events = run_stream(sse_chunks(OPENROUTER_REASONING))
    assert block_types(events) == ["thinking", "text"]
    message = fold_anthropic_events(events)
    thinking = message["content"][0]
    assert thinking["thinking"] == "This is a simple arithmetic question. 2+2 equals 4."
    # another provider's signature, tagged so that no Anthropic-format upstream is sent it as its own
    assert thinking["signature"].startswith("claude-proxy:openai:Et0BCkgIChACGAIqQA2s")
    assert message["content"][1] == {"type": "text", "text": "2 + 2 = 4"}
    assert final_usage(events) == usage_of(43, 36, thinking=13)


def test_groq_whole_tool_call_in_one_chunk():
    events = run_stream(sse_chunks(GROQ_WHOLE_TOOL_CALL))
    assert block_types(events) == ["thinking", "tool_use"]
    message = fold_anthropic_events(events)
    assert message["content"][1] == {"type": "tool_use", "id": "fc_bfb39741-3748-4def-9886-a93fc9c64a90",
                                     "name": "get_something_by_name", "input": {"name": "example"}}
    assert message["stop_reason"] == "tool_use"
    assert message["usage"]["input_tokens"] == 304 and message["usage"]["output_tokens"] == 49


@pytest.mark.parametrize("name,message", [
    ("groq_error_event", "Tool call validation failed"),
    ("openrouter_midstream_error", "Token limit reached")])
def test_midstream_errors_end_with_one_error_event(name, message):
    stream = OpenAIToAnthropicStream("claude-client", message_id="msg_test")
    events = []
    for chunk in sse_chunks(STREAMS[name]):
        events += stream.feed(chunk)
    assert stream.finished
    assert stream.close() == [] and stream.feed({"choices": []}) == []
    check_anthropic_grammar(events)
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "api_error"
    assert events[-1]["error"]["message"].startswith(message)
    assert events[-2]["type"] == "content_block_stop"
    with pytest.raises(UpstreamError) as caught:
        fold_anthropic_events(events)
    assert caught.value.error_type == "api_error"


@pytest.mark.parametrize("error,error_type", [
    ({"code": 429, "message": "slow down"}, "overloaded_error"),
    ({"type": "overloaded_error", "message": "busy"}, "overloaded_error"),
    ({"code": "rate_limit_exceeded", "message": "x"}, "overloaded_error"),
    ({"code": 500, "message": "bad"}, "api_error"),
    ("plain string", "api_error")])
def test_error_types(error, error_type):
    events = run_stream([{"error": error}])
    assert events[0]["type"] == "message_start"
    assert events[1] == {"type": "error", "error": {
        "type": error_type, "message": error if isinstance(error, str) else error["message"]}}
    assert len(events) == 2


def test_finish_length_is_max_tokens():
    events = run_stream(sse_chunks(OPENAI_FINISH_LENGTH))
    assert events[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert final_usage(events)["output_tokens"] == 1


def test_n3_only_choice_zero():
    chunks = sse_chunks(OPENAI_N3)
    expected = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                       if c["choices"] and c["choices"][0]["index"] == 0)
    message = fold_anthropic_events(run_stream(chunks))
    assert message["content"] == [{"type": "text", "text": expected}]
    assert message["stop_reason"] == "end_turn"


# ---- 2b. stream machine: feeding invariance ----------------------------------------------------

def incremental_sse(text, size):
    """Decode SSE fed `size` characters at a time (flushes the last event at EOF)."""
    buffer, chunks = "", []
    for start in range(0, len(text), size):
        buffer += text[start:start + size]
        while "\n\n" in buffer:
            event, buffer = buffer.split("\n\n", 1)
            chunks += sse_chunks(event + "\n\n")
    return chunks + sse_chunks(buffer)


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("size", [1, 7, 64])
def test_same_events_whatever_the_transport_chunking(name, size):
    whole = run_stream(sse_chunks(STREAMS[name]))
    assert run_stream(incremental_sse(STREAMS[name], size)) == whole


def explode(chunk):
    """Split one chunk's content/reasoning_content/arguments strings into 1-char chunks."""
    choices = chunk.get("choices") or []
    if not choices or chunk.get("error"):
        return [chunk]
    delta = choices[0].get("delta") or {}
    out_chunks, base = [], dict(chunk, choices=[dict(choices[0], delta={}, finish_reason=None)])
    rest = dict(delta)
    for key in ("reasoning_content", "content"):
        if isinstance(rest.get(key), str) and len(rest[key]) > 1 and "reasoning_details" not in rest:
            for ch in rest.pop(key):
                out_chunks.append(dict(base, choices=[dict(base["choices"][0], delta={key: ch})]))
    calls = rest.pop("tool_calls", None) or []
    for call in calls:
        args = call.get("function", {}).get("arguments") or ""
        head = dict(call, function=dict(call.get("function", {}), arguments=args[:1]))
        out_chunks.append(dict(base, choices=[dict(base["choices"][0], delta={"tool_calls": [head]})]))
        for ch in args[1:]:
            frag = {"index": call.get("index"), "function": {"arguments": ch}}
            out_chunks.append(dict(base, choices=[dict(base["choices"][0], delta={"tool_calls": [frag]})]))
    usage = {k: chunk[k] for k in ("usage", "x_groq") if k in chunk}
    out_chunks.append(dict(chunk, choices=[dict(choices[0], delta=rest)], **usage))
    return out_chunks


@pytest.mark.parametrize("name", ["openai_parallel_tools", "deepseek_reasoning", "groq_whole_tool_call",
                                  "openai_finish_length", "openrouter_reasoning"])
def test_fragmenting_deltas_does_not_change_the_message(name):
    chunks = sse_chunks(STREAMS[name])
    exploded = [piece for chunk in chunks for piece in explode(chunk)]
    assert len(exploded) > len(chunks) or name == "openrouter_reasoning"
    events = run_stream(exploded)
    check_anthropic_grammar(events)
    assert fold_anthropic_events(events) == fold_anthropic_events(run_stream(chunks))


# ---- 2c. stream machine: provider quirks (synthetic) -------------------------------------------

def chunk(delta=None, finish=None, index=0, **extra):
    return dict({"choices": [{"index": index, "delta": delta or {}, "finish_reason": finish}]}, **extra)


def tool(index=None, id=None, name=None, arguments=None):
    call = {"function": {}}
    if index is not None:
        call["index"] = index
    if id is not None:
        call["id"] = id
    if name is not None:
        call["function"]["name"] = name
    if arguments is not None:
        call["function"]["arguments"] = arguments
    return call


def test_message_start_and_events_exact():
    events = run_stream([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hi"}),
                         chunk(finish="stop"), {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}],
                        input_tokens=7)
    assert events == [
        {"type": "message_start", "message": {
            "id": "msg_test", "type": "message", "role": "assistant", "model": "claude-client", "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 7, "output_tokens": 0, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0,
                      "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": usage_of(9, 2)},
        {"type": "message_stop"}]


def test_no_message_end_at_finish_reason_and_close_is_idempotent():
    stream = OpenAIToAnthropicStream("m", message_id="msg_test")
    events = stream.feed(chunk({"content": "x"}, finish="stop"))
    assert [e["type"] for e in events] == ["message_start", "content_block_start",
                                           "content_block_delta", "content_block_stop"]
    assert not stream.finished
    assert [e["type"] for e in stream.close()] == ["message_delta", "message_stop"]
    assert stream.close() == [] and stream.feed(chunk({"content": "y"})) == [] and stream.finished


def test_close_without_any_chunk_is_a_valid_empty_message():
    events = OpenAIToAnthropicStream("m", message_id="msg_test", input_tokens=3).close()
    check_anthropic_grammar(events)
    assert fold_anthropic_events(events)["content"] == []
    assert final_usage(events)["input_tokens"] == 3


def test_gemini_tool_calls_without_index_and_repeated_index_with_new_ids():
    for calls in ([tool(id="a", name="f", arguments='{"x":1}')], [tool(id="b", name="g", arguments='{"y":2}')]), \
                 ([tool(index=0, id="a", name="f", arguments='{"x":1}')],
                  [tool(index=0, id="b", name="g", arguments='{"y":2}')]):
        events = run_stream([chunk({"tool_calls": calls[0]}), chunk({"tool_calls": calls[1]}), chunk(finish="stop")])
        check_anthropic_grammar(events)
        message = fold_anthropic_events(events)
        assert [(b["id"], b["name"], b["input"]) for b in message["content"]] == [
            ("a", "f", {"x": 1}), ("b", "g", {"y": 2})]
        assert message["stop_reason"] == "tool_use"  # forced although finish said "stop" (Ollama)


def test_tool_call_object_arguments_missing_and_odd_ids():
    events = run_stream([chunk({"tool_calls": [tool(index=0, name="f", arguments={"q": "é"})]}),
                         chunk({"tool_calls": [tool(index=1, id="functions.Bash:3", name="Bash", arguments="")]}),
                         chunk(finish="tool_calls")])
    check_anthropic_grammar(events)
    first, second = fold_anthropic_events(events)["content"]
    assert first["id"].startswith("toolu_") and first["input"] == {"q": "é"}
    assert second["id"] == "functions_Bash_3" and second["input"] == {}


def test_interleaved_tool_fragments_are_buffered_and_emitted_whole():
    events = run_stream([
        chunk({"tool_calls": [tool(index=0, id="a", name="f", arguments='{"x":')]}),
        chunk({"tool_calls": [tool(index=1, id="b", name="g", arguments='{"y":')]}),
        chunk({"tool_calls": [tool(index=0, arguments='1}')]}),
        chunk({"tool_calls": [tool(index=1, arguments='2}')]}),
        chunk(finish="tool_calls")])
    check_anthropic_grammar(events)
    message = fold_anthropic_events(events)
    assert [(b["id"], b["input"]) for b in message["content"]] == [("a", {"x": 1}), ("b", {"y": 2})]


def test_text_then_tool_then_text_blocks():
    events = run_stream([chunk({"content": "Let me check."}),
                         chunk({"tool_calls": [tool(index=0, id="a", name="f", arguments="{}")]}),
                         chunk(finish="tool_calls")])
    assert block_types(events) == ["text", "tool_use"]


@pytest.mark.parametrize("pieces", [
    ["<think>plan</think>answer"],
    ["<thi", "nk>pl", "an</th", "ink>\n\nans", "wer"],
    ["\n<think>", "plan", "</think>", "answer"],
])
def test_think_tags_in_content(pieces):
    events = run_stream([chunk({"content": p}) for p in pieces] + [chunk(finish="stop")])
    check_anthropic_grammar(events)
    assert fold_anthropic_events(events)["content"] == [
        {"type": "thinking", "thinking": "plan", "signature": ""}, {"type": "text", "text": "answer"}]


def test_think_tags_only_at_start_and_unclosed_think_flushed():
    text = fold_anthropic_events(run_stream([chunk({"content": "a <think> b"}), chunk(finish="stop")]))
    assert text["content"] == [{"type": "text", "text": "a <think> b"}]
    unclosed = fold_anthropic_events(run_stream([chunk({"content": "<think>hmm </thi"})]))
    assert unclosed["content"] == [{"type": "thinking", "thinking": "hmm </thi", "signature": ""}]
    splitter = ThinkTagSplitter()
    assert splitter.split("<th") == [] and splitter.flush() == [("text", "<th")]


def test_mistral_content_parts():
    events = run_stream([chunk({"content": [{"type": "thinking", "thinking": [{"type": "text", "text": "t"}]}]}),
                         chunk({"content": [{"type": "text", "text": "a"}]}), chunk(finish="stop")])
    assert fold_anthropic_events(events)["content"] == [
        {"type": "thinking", "thinking": "t", "signature": ""}, {"type": "text", "text": "a"}]


def test_reasoning_field_variants_and_no_duplicate_with_details():
    events = run_stream([chunk({"reasoning": "r1", "reasoning_details": [{"type": "reasoning.text", "text": "r1"}]}),
                         chunk({"reasoning": "r2"}), chunk({"reasoning_content": "r3"}),
                         chunk({"reasoning_details": [{"type": "reasoning.encrypted", "data": "zz"}]}),
                         chunk({"content": "ok"}), chunk(finish="stop")])
    assert fold_anthropic_events(events)["content"] == [
        {"type": "thinking", "thinking": "r1r2r3", "signature": ""}, {"type": "text", "text": "ok"}]


def test_groq_x_groq_usage_and_last_usage_wins():
    events = run_stream([chunk({"content": "a"}, x_groq={"usage": {"prompt_tokens": 5, "completion_tokens": 1}}),
                         chunk(finish="stop", usage={"prompt_tokens": 8, "completion_tokens": 4})])
    assert final_usage(events)["input_tokens"] == 8 and final_usage(events)["output_tokens"] == 4


@pytest.mark.parametrize("finish,stop_reason", sorted(STOP_REASON_FROM_FINISH.items()) + [("weird", "end_turn")])
def test_stop_reason_table(finish, stop_reason):
    events = run_stream([chunk({"content": "a"}, finish=finish)])
    assert events[-2]["delta"]["stop_reason"] == stop_reason


def test_truncated_tool_call_keeps_max_tokens():
    events = run_stream([chunk({"tool_calls": [tool(index=0, id="a", name="f", arguments='{"x": "abc')]}),
                         chunk(finish="length")])
    message = fold_anthropic_events(events)
    assert message["stop_reason"] == "max_tokens" and message["content"][0]["input"] == {}


def test_an_openai_refusal_ends_as_a_refusal_with_its_text():
    events = run_stream([chunk({"role": "assistant", "content": "", "refusal": None}),
                         chunk({"refusal": "I can't help with that."}), chunk(finish="stop")])
    message = fold_anthropic_events(events)
    assert message["content"] == [{"type": "text", "text": "I can't help with that."}]
    assert message["stop_reason"] == "refusal"
    body = {"choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": None, "refusal": "No."}}]}
    assert openai_response_to_anthropic(body, "c")["stop_reason"] == "refusal"


def test_url_citation_annotations_become_text_citations():
    text = "Paris is the capital."
    body = {"choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": text, "annotations": [
            {"type": "url_citation", "url_citation": {"start_index": 0, "end_index": 5,
                                                      "url": "https://en.wikipedia.org/wiki/Paris", "title": "Paris"}}]}}]}
    events = run_stream([openai_message_as_chunk(body)])
    check_anthropic_grammar(events)
    assert fold_anthropic_events(events)["content"] == [{"type": "text", "text": text, "citations": [
        {"type": "web_search_result_location", "url": "https://en.wikipedia.org/wiki/Paris", "title": "Paris",
         "cited_text": "Paris", "encrypted_index": ""}]}]


def test_reasoning_tokens_reach_the_anthropic_usage():
    chunks = [chunk({"content": "x"}, finish="stop"),
              {"choices": [], "usage": {"prompt_tokens": 21, "completion_tokens": 9,
                                        "completion_tokens_details": {"reasoning_tokens": 7}}}]
    assert final_usage(run_stream(chunks))["output_tokens_details"] == {"thinking_tokens": 7}


# ---- 3. fold -------------------------------------------------------------------------------------

INLINE_ANTHROPIC_STREAM = [
    {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "c",
                                          "content": [], "stop_reason": None, "stop_sequence": None,
                                          "usage": {"input_tokens": 10, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "redacted_thinking", "data": "EqkE"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "ping"},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "thinking_delta", "thinking": "hm"}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "signature_delta", "signature": "sig"}},
    {"type": "content_block_stop", "index": 1},
    {"type": "content_block_start", "index": 2, "content_block": {"type": "server_tool_use", "id": "srvtoolu_1",
                                                                  "name": "web_search", "input": {}}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ""}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"query": "w"}'}},
    {"type": "content_block_stop", "index": 2},
    {"type": "content_block_start", "index": 3, "content_block": {
        "type": "web_search_tool_result", "tool_use_id": "srvtoolu_1",
        "content": [{"type": "web_search_result", "title": "T", "url": "https://u"}]}},
    {"type": "content_block_stop", "index": 3},
    {"type": "content_block_start", "index": 4, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 4, "delta": {"type": "citations_delta", "citation": {
        "type": "web_search_result_location", "cited_text": "c", "url": "https://u"}}},
    {"type": "content_block_delta", "index": 4, "delta": {"type": "text_delta", "text": "Sunny"}},
    {"type": "content_block_stop", "index": 4},
    {"type": "content_block_start", "index": 5, "content_block": {"type": "tool_use", "id": "toolu_1",
                                                                  "name": "f", "input": {}}},
    {"type": "content_block_stop", "index": 5},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
     "usage": {"output_tokens": 50, "input_tokens": 30}},
    {"type": "message_stop"},
]


def test_fold_inline_anthropic_stream():
    assert fold_anthropic_events(INLINE_ANTHROPIC_STREAM) == {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "c",
        "content": [
            {"type": "redacted_thinking", "data": "EqkE"},
            {"type": "thinking", "thinking": "hm", "signature": "sig"},
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "w"}},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1",
             "content": [{"type": "web_search_result", "title": "T", "url": "https://u"}]},
            {"type": "text", "text": "Sunny", "citations": [
                {"type": "web_search_result_location", "cited_text": "c", "url": "https://u"}]},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 30, "output_tokens": 50}}


def test_fold_without_message_start_raises():
    with pytest.raises(UpstreamError):
        fold_anthropic_events([{"type": "message_stop"}])


def test_fold_error_event_raises_with_type():
    with pytest.raises(UpstreamError) as caught:
        fold_anthropic_events(INLINE_ANTHROPIC_STREAM[:3] + [
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}])
    assert caught.value.error_type == "overloaded_error" and caught.value.message == "Overloaded"


ANTHROPIC_FIXTURE_EXPECT = {
    "anthropic_stream_text_basic.sse": ("end_turn", ["text"]),
    "anthropic_stream_tool_use.sse": ("tool_use", ["text", "tool_use"]),
    "anthropic_stream_max_tokens_truncated_tool_json.sse": ("max_tokens", ["text", "tool_use"]),
    "anthropic_stream_thinking_signature.sse": ("end_turn", ["thinking", "text"]),
    "anthropic_stream_redacted_thinking.sse": ("end_turn", ["redacted_thinking", "redacted_thinking", "text"]),
    "anthropic_stream_web_search_citations.sse": ("end_turn", None),
}


@pytest.mark.parametrize("name", sorted(ANTHROPIC_FIXTURE_EXPECT))
def test_fold_real_anthropic_fixtures(name):
    path = os.path.join(FIXTURES_ROOT, "real", name)
    if not os.path.exists(path):
        pytest.skip("shared fixtures absent")
    with open(path) as f:
        message = fold_anthropic_events(sse_chunks(f.read()))
    stop_reason, types = ANTHROPIC_FIXTURE_EXPECT[name]
    assert message["stop_reason"] == stop_reason
    if types:
        assert [b["type"] for b in message["content"]] == types
    for block in message["content"]:
        if block["type"] in ("tool_use", "server_tool_use"):
            assert isinstance(block["input"], dict)
        if block["type"] == "thinking":
            assert block["signature"] and block["thinking"]
    if name == "anthropic_stream_tool_use.sse":
        assert message["content"][1]["input"] and message["usage"]["output_tokens"] > 1
    if name == "anthropic_stream_web_search_citations.sse":
        assert message["usage"]["input_tokens"] == 22397
        assert any(b.get("citations") for b in message["content"])
        assert [b["type"] for b in message["content"]].count("web_search_tool_result") == 2


def test_replay_all_openai_style_fixtures():
    paths = sorted(glob.glob(os.path.join(FIXTURES_ROOT, "real", "*.sse")))
    paths = [p for p in paths if os.path.basename(p).split("_")[0] in ("openai", "deepseek", "openrouter", "groq")]
    if not paths:
        pytest.skip("shared fixtures absent")
    for path in paths:
        with open(path) as f:
            events = run_stream(sse_chunks(f.read()))
        check_anthropic_grammar(events)
        assert signature_deltas_before_stop(events)
        if "error" in path:
            assert events[-1]["type"] == "error"
        else:
            assert fold_anthropic_events(events)["content"], path


# ---- 4. non-streaming -------------------------------------------------------------------------

PARALLEL_TOOLS_BODY = {
    "id": "chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
    "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "refusal": None, "tool_calls": [
            {"id": "call_JMW1whyEaYG438VE1OIflxA2", "type": "function", "function": {
                "name": "GetWeatherArgs", "arguments": '{"city": "Edinburgh", "country": "GB", "units": "c"}'}},
            {"id": "call_DNYTawLBoN8fj3KN6qU9N1Ou", "type": "function", "function": {
                "name": "get_stock_price", "arguments": '{"ticker": "AAPL", "exchange": "NASDAQ"}'}}]}}],
    "usage": {"prompt_tokens": 149, "completion_tokens": 60, "total_tokens": 209,
              "completion_tokens_details": {"reasoning_tokens": 0}}}


def test_round_trip_openai_stream_fold_equals_non_stream():
    streamed = fold_anthropic_events(run_stream(sse_chunks(OPENAI_PARALLEL_TOOLS)))
    assert openai_response_to_anthropic(PARALLEL_TOOLS_BODY, "claude-client", message_id="msg_test") == streamed


def test_round_trip_deepseek():
    chunks = sse_chunks(DEEPSEEK_REASONING)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    body = {"choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "reasoning_content": "".join(d.get("reasoning_content") or "" for d in deltas),
        "content": "".join(d.get("content") or "" for d in deltas)}}], "usage": chunks[-1]["usage"]}
    assert openai_response_to_anthropic(body, "claude-client", message_id="msg_test") == \
        fold_anthropic_events(run_stream(chunks))


def test_non_stream_exact():
    body = {"id": "x", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "<think>hm</think>Hello"}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 4}}}
    assert openai_response_to_anthropic(body, "claude-client", message_id="msg_1") == {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-client",
        "content": [{"type": "thinking", "thinking": "hm", "signature": ""}, {"type": "text", "text": "Hello"}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": usage_of(6, 2, read=4)}


def test_non_stream_gemini_tool_calls_without_index():
    body = {"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": None,
            "tool_calls": [{"id": "", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                           {"id": "", "type": "function", "function": {"name": "g", "arguments": '{"a":1}'}}]}}]}
    message = openai_response_to_anthropic(body, "c")
    assert [(b["name"], b["input"]) for b in message["content"]] == [("f", {}), ("g", {"a": 1})]
    assert all(b["id"].startswith("toolu_") for b in message["content"])
    assert message["stop_reason"] == "tool_use"


@pytest.mark.parametrize("body", [{"error": {"message": "nope", "code": 500}}, {"choices": []}, "x"])
def test_non_stream_errors(body):
    with pytest.raises(UpstreamError):
        openai_response_to_anthropic(body, "c")


def test_openai_message_as_chunk():
    assert openai_message_as_chunk(PARALLEL_TOOLS_BODY)["choices"][0]["delta"]["tool_calls"][1]["index"] == 1


# ---- 5. token estimate --------------------------------------------------------------------------

def test_estimate_grows_monotonically():
    body = {"messages": [{"role": "user", "content": "hello"}]}
    base = estimate_anthropic_tokens(body)
    steps = [
        lambda b: b.update(system="You are helpful. " * 20),
        lambda b: b["messages"].append({"role": "assistant", "content": [
            {"type": "thinking", "thinking": "x" * 400, "signature": "s"},
            {"type": "tool_use", "id": "t", "name": "Bash", "input": {"command": "ls -la " * 10}}]}),
        lambda b: b["messages"].append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "file " * 100}]}]}),
        lambda b: b["messages"][-1]["content"].append(
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}}),
        lambda b: b.update(tools=[WEATHER_TOOL]),
        lambda b: b["messages"][-1]["content"].append({"type": "document", "source": {
            "type": "base64", "media_type": "application/pdf",
            "data": base64.b64encode(b"%PDF /Type /Pages /Type /Page /Type /Page").decode()}}),
    ]
    previous = base
    for step in steps:
        step(body)
        current = estimate_anthropic_tokens(body)
        assert current > previous
        previous = current
    assert estimate_anthropic_tokens({}) == 0


def test_estimate_rules():
    one = estimate_anthropic_tokens({"messages": [{"role": "user", "content": "a" * 4000}]})
    assert one == 1004  # 4000 chars / 4 + 4 per message
    image = {"type": "image", "source": {"type": "url", "url": "https://x"}}
    with_image = estimate_anthropic_tokens({"messages": [{"role": "user", "content": [image]}]})
    assert with_image == 1604
    pdf = base64.b64encode(b"/Type /Page /Type /Page /Type /Pages").decode()
    doc = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": pdf}}
    assert estimate_anthropic_tokens({"messages": [{"role": "user", "content": [doc]}]}) == 6004


def test_estimate_claude_code_ballpark():
    path = os.path.join(FIXTURES_ROOT, "claude_code", "claude_code_2.1.197_turn1_user_prompt.json")
    if not os.path.exists(path):
        pytest.skip("shared fixtures absent")
    with open(path) as f:
        body = json.load(f)["body"]
    # Claude Code's first turn (24 tools, long system prompt) is known to cost ~20-30k tokens.
    assert 15000 < estimate_anthropic_tokens(body) < 40000


def test_done_string_closes_and_refusal_is_text():
    stream = OpenAIToAnthropicStream("m", message_id="msg_test")
    events = stream.feed(chunk({"refusal": "I can't help with that."}, finish="content_filter"))
    events += stream.feed("[DONE]")
    check_anthropic_grammar(events)
    message = fold_anthropic_events(events)
    assert message["content"] == [{"type": "text", "text": "I can't help with that."}]
    assert message["stop_reason"] == "refusal" and stream.finished and stream.feed("[DONE]") == []

# =============================================================================================
# 9b. Converters: OpenAI client -> Claude upstream
# =============================================================================================

# ---- recorded Anthropic streams (trimmed copies of fixtures/real/anthropic_*.sse) --------------

TEXT_BASIC = r'''event: message_start
data: {"type":"message_start","message":{"model":"claude-sonnet-4-5-20250929","id":"msg_018E1hg8GoVTGEKQY3ovMcSJ","type":"message","role":"assistant","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":20,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":1,"service_tier":"standard","inference_geo":"not_available"}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}        }

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"2"}      }

event: content_block_stop
data: {"type":"content_block_stop","index":0        }

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":20,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":5}       }

event: message_stop
data: {"type":"message_stop"    }
'''

TOOL_USE = r'''event: message_start
data: {"type":"message_start","message":{"id":"msg_019Q1hrJbZG26Fb9BQhrkHEr","type":"message","role":"assistant","model":"claude-sonnet-4-20250514","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":377,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1,"service_tier":"standard"}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"I"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"'ll check the current weather in Paris for you."}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01NRLabsLyVHZPKxbKvkfSMn","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"locati"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"on\": \"P"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"ar"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"is\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":65}}

event: message_stop
data: {"type":"message_stop"}
'''

TRUNCATED_TOOL_JSON = r'''event: message_start
data: {"type":"message_start","message":{"id":"msg_01UdjYBBipA9omjYhicnevgq","type":"message","role":"assistant","model":"claude-3-7-sonnet-20250219","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":450,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1,"service_tier":"standard"}}          }

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}         }

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"I"}       }

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"'ll create a comprehensive tax guide for"}        }

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" someone with multiple W2s an"}        }

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"d save it in a file called taxes.txt. Let"} }

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" me do that for you now."}           }

event: content_block_stop
data: {"type":"content_block_stop","index":0 }

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01EKqbqmZrGRXy18eN7m9kvY","name":"make_file","input":{}}     }

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}       }

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"filename\": \"taxes.txt"}   }

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"\", \"lines_of_text\": [\n\"# COMPREHENSIVE TAX GUIDE FOR INDIVIDUALS WITH MULTIPLE W-2s\",\n\"\",\n\"## INTRODUCTION\",\n\"\","}        }

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"\n\"Filing taxes"}               }

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"max_tokens","stop_sequence":null},"usage":{"output_tokens":124}    }

event: message_stop
data: {"type":"message_stop" }
'''

THINKING_SIGNATURE = r'''event: message_start
data: {"type":"message_start","message":{"model":"claude-sonnet-4-20250514","id":"msg_01ALwQ87pTS7hH1PjSdC9wJD","type":"message","role":"assistant","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":43,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":1,"service_tier":"standard","inference_geo":"not_available"}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}

event: ping
data: {"type":"ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"This"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":" is a straightforward question about"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":" pedest"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":" accidents."}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EvMCCkYICxgCKkCHP2cS..."}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Here are"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":" the"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":" basic"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":43,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":282}}

event: message_stop
data: {"type":"message_stop"}
'''

REDACTED_THINKING = r'''event: message_start
data: {"type":"message_start","message":{"id":"msg_018XZkwvj9asBiffg3fXt88s","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":92,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":88,"service_tier":"standard"}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"redacted_thinking","data":"EqkECkYIBxgCKkA8AZ4n..."}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"redacted_thinking","data":"EtgBCkYIBxgCKkDQfGkw..."}}

event: ping
data: {"type":"ping"}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: ping
data: {"type":"ping"}

event: content_block_start
data: {"type":"content_block_start","index":2,"content_block":{"type":"text","text":""}}

event: ping
data: {"type":"ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"text_delta","text":"I notice that you've sent what"}}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"text_delta","text":" appears to be some"}}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"text_delta","text":" kind of test string"}}

event: content_block_stop
data: {"type":"content_block_stop","index":2}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":92,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":189}}

event: message_stop
data: {"type":"message_stop"}
'''

WEB_SEARCH_CITATIONS = r'''event: message_start
data: {"type":"message_start","message":{"id":"msg_01QmxBSdEbD9ZeBWDVgFDoQ5","type":"message","role":"assistant","model":"claude-sonnet-4-20250514","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":2068,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":8,"service_tier":"standard"}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"The user is asking about the weather"}}

event: ping
data: {"type":"ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":" in San Francisco today. This is clearly a request"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"Er8ECkYIBxgCKkDp29ha..."}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"server_tool_use","id":"srvtoolu_01FYcUbzEaqqQh1WBRj1QX3h","name":"web_search","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"query\": "}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"\"Sa"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"ay\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: content_block_start
data: {"type":"content_block_start","index":2,"content_block":{"type":"web_search_tool_result","tool_use_id":"srvtoolu_01FYcUbzEaqqQh1WBRj1QX3h","content":[{"type":"web_search_result","title":"San Francisco, CA Weather Forecast | AccuWeather","url":"https://www.accuweather.com/en/us/san-francisco/94103/weather-forecast/347629","encrypted_content":"EroTCioIBxgCIiQ0NGFl...","page_age":"6 days ago"}]}}

event: content_block_stop
data: {"type":"content_block_stop","index":2}

event: content_block_start
data: {"type":"content_block_start","index":3,"content_block":{"type":"text","text":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":3,"delta":{"type":"text_delta","text":"Base"}}

event: content_block_delta
data: {"type":"content_block_delta","index":3,"delta":{"type":"text_delta","text":"d on the search results, I can see"}}

event: content_block_stop
data: {"type":"content_block_stop","index":3}

event: content_block_start
data: {"type":"content_block_start","index":7,"content_block":{"citations":[],"type":"text","text":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":7,"delta":{"type":"citations_delta","citation":{"type":"web_search_result_location","cited_text":"San Francisco, CA Weather Today WinterCast Local {stormName} Tracker Hourly Daily Radar MinuteCast® Monthly Air Quality Health & Activities · News · F...","url":"https://www.accuweather.com/en/us/san-francisco/94103/september-weather/347629","title":"San Francisco, CA Monthly Weather | AccuWeather","encrypted_index":"EpABCioIBxgCIiQ0NGFl..."}}}

event: content_block_delta
data: {"type":"content_block_delta","index":7,"delta":{"type":"text_delta","text":"today (September 16) shows a high of 76°F and low of 59°F"}}

event: content_block_stop
data: {"type":"content_block_stop","index":7}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":22397,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":637,"server_tool_use":{"web_search_requests":2,"web_fetch_requests":0}}}

event: message_stop
data: {"type":"message_stop"}
'''


# ---- helpers ---------------------------------------------------------------------------------


def anthropic_sse_payloads(text):
    """Decode an SSE body simply: events split on blank lines, data: lines joined, JSON parsed."""
    out = []
    for raw in re.split(r"\r?\n\r?\n", text):
        data = [line[5:].lstrip(" ") for line in raw.splitlines() if line.startswith("data:")]
        if data:
            out.append(json.loads("\n".join(data)))
    return out


def replay(text, include_usage=True, close=True):
    """Feed every event of an SSE body through a fresh machine; return the OpenAI items."""
    machine = AnthropicToOpenAIStream("gpt-claude", include_usage=include_usage,
                                      completion_id="chatcmpl-1", created=7)
    items = []
    for event in anthropic_sse_payloads(text):
        items += machine.feed(event)
    return items + (machine.close() if close else [])


def check_openai_grammar(chunks, include_usage):
    """Assert the OpenAI chat.completion.chunk grammar (C.5) on a machine's output."""
    assert chunks[-1] == "[DONE]" and chunks.count("[DONE]") == 1
    body = chunks[:-1]
    assert all(isinstance(c, dict) and c["object"] == "chat.completion.chunk" for c in body)
    assert body[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    if include_usage:
        assert body[-1]["choices"] == [] and set(body[-1]["usage"]) >= {
            "prompt_tokens", "completion_tokens", "total_tokens"}
        body = body[:-1]
    assert all("usage" not in c for c in body)
    finishes = [c for c in body if c["choices"][0]["finish_reason"] is not None]
    assert len(finishes) == 1 and finishes[0] is body[-1] and finishes[0]["choices"][0]["delta"] == {}
    seen = []  # tool indices in order of first appearance
    for chunk in body:
        (choice,) = chunk["choices"]
        assert choice["index"] == 0 and choice["logprobs"] is None
        for call in choice["delta"].get("tool_calls", []):
            if call["index"] not in seen:
                assert call["index"] == len(seen), "tool indices must be 0..k-1"
                assert call["id"] and call["type"] == "function" and call["function"]["name"]
                assert call["function"]["arguments"] == ""
                seen.append(call["index"])
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
    return body


def deltas(chunks, key):
    """Concatenate one delta field over all chunks."""
    return "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks
                   if isinstance(c, dict) and c.get("choices"))


def arguments(chunks, k=0):
    """Concatenated arguments of tool call k."""
    return "".join(call["function"].get("arguments", "") for c in chunks if isinstance(c, dict)
                   for ch in c.get("choices", []) for call in ch["delta"].get("tool_calls", [])
                   if call["index"] == k)

# ---- 1. model variants -------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("claude-sonnet-4-5", ("claude-sonnet-4-5", None, False)),
    ("claude-sonnet-4-5-reasoning-high", ("claude-sonnet-4-5", "high", False)),
    ("claude-sonnet-4-5-reasoning-minimal", ("claude-sonnet-4-5", "minimal", False)),
    ("claude-opus-4-7-reasoning-xhigh", ("claude-opus-4-7", "xhigh", False)),
    ("claude-opus-4-7-reasoning-max", ("claude-opus-4-7", "max", False)),
    ("claude-sonnet-4-5-1m", ("claude-sonnet-4-5", None, True)),
    ("claude-sonnet-4-5-1m-reasoning-high", ("claude-sonnet-4-5", "high", True)),
    ("claude-sonnet-4-5-reasoning-high-1m", ("claude-sonnet-4-5", "high", True)),
    ("claude-sonnet-4-5-reasoning-turbo", ("claude-sonnet-4-5-reasoning-turbo", None, False)),
    ("claude-x-reasoning-low-reasoning-high", ("claude-x-reasoning-low", "high", False)),
    ("claude-1m-1m", ("claude-1m", None, True)),
    ("-1m", ("-1m", None, False)),
])
def test_parse_model_variant(name, expected):
    assert parse_model_variant(name) == expected


@pytest.mark.parametrize("model, version, style", [
    ("claude-3-7-sonnet-20250219", ("sonnet", (3, 7)), "budget"),
    ("claude-sonnet-4-20250514", ("sonnet", (4, 0)), "budget"),
    ("claude-sonnet-4-5-20250929", ("sonnet", (4, 5)), "budget"),
    ("claude-opus-4-1", ("opus", (4, 1)), "budget"),
    ("claude-opus-4-6", ("opus", (4, 6)), "budget"),
    ("claude-opus-4-7", ("opus", (4, 7)), "adaptive"),
    ("anthropic/claude-opus-4.8", ("opus", (4, 8)), "adaptive"),
    ("claude-sonnet-5", ("sonnet", (5, 0)), "adaptive"),
    ("claude-haiku-5-1-20270101", ("haiku", (5, 1)), "adaptive"),
    ("my-alias", None, "budget"),
])
def test_claude_id_parts_and_thinking_style(model, version, style):
    assert claude_id_parts(model) == version
    assert model_facts(model)["thinking"] == style


# ---- 2. request conversion (D.2) ----------------------------------------------------------------

M = "claude-sonnet-4-20250514"  # no sampling restrictions, budget thinking


def U(*texts):
    return {"role": "user", "content": [{"type": "text", "text": t} for t in texts]}


def A(*blocks):
    return {"role": "assistant", "content": list(blocks)}


def T(text):
    return {"type": "text", "text": text}


def TU(tool_id, name, tool_input):
    return {"type": "tool_use", "id": tool_id, "name": name, "input": tool_input}


def TR(tool_id, content=None, **extra):
    block = {"type": "tool_result", "tool_use_id": tool_id}
    if content is not None:
        block["content"] = content
    block.update(extra)
    return block


def CALL(call_id, name, args):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def body(*messages, **fields):
    return dict(messages=list(messages), **fields)


def expected(*messages, **fields):
    out = {"model": M, "messages": list(messages), "max_tokens": DEFAULT_ANTHROPIC_MAX_TOKENS}
    out.update(fields)
    return out


HI = {"role": "user", "content": "hi"}
NO_RESULT = dict(content="(no result)", is_error=True)
PDF = "data:application/pdf;base64,JVBERi0x"
PNG = "data:image/png;base64,iVBORw0K"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
WEATHER_A = {"name": "get_weather", "description": "Weather",
             "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}

REQUEST_TABLE = [
    ("minimal", body(HI), expected(U("hi"))),
    ("leading system/developer -> system; a later one -> user text at its position (the model takes none mid-list)",
     body({"role": "system", "content": "S1"}, {"role": "developer", "content": "S2"}, HI,
          {"role": "developer", "content": [{"type": "text", "text": "D"}]},
          {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}),
     expected(U("hi", "<system-reminder>\nD\n</system-reminder>"), A(T("a")), U("b"), system=[T("S1"), T("S2")])),
    ("consecutive user turns merged", body(HI, {"role": "user", "content": [{"type": "text", "text": "there"}]}),
     expected(U("hi", "there"))),
    ("tool messages -> one user turn, following user text appended",
     body(HI, {"role": "assistant", "content": None, "tool_calls": [CALL("c1", "f", "{}"), CALL("c2", "g", '{"x": 1}')]},
          {"role": "tool", "tool_call_id": "c1", "content": "r1"},
          {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "r2"}]},
          {"role": "user", "content": "thanks"}),
     expected(U("hi"), A(TU("c1", "f", {}), TU("c2", "g", {"x": 1})),
              {"role": "user", "content": [TR("c1", "r1"), TR("c2", [T("r2")]), T("thanks")]})),
    ("assistant text before tool_use; object args; bad JSON wrapped as _raw",
     body(HI, {"role": "assistant", "content": "let me", "tool_calls": [CALL("c1", "f", {"a": 1}), CALL("c2", "g", "{bad")]},
          {"role": "tool", "tool_call_id": "c1", "content": "ok"}, {"role": "tool", "tool_call_id": "c2", "content": "ok"}),
     expected(U("hi"), A(T("let me"), TU("c1", "f", {"a": 1}), TU("c2", "g", {"_raw": "{bad"})),
              {"role": "user", "content": [TR("c1", "ok"), TR("c2", "ok")]})),
    ("images: data URL -> base64, http -> url, detail dropped",
     body({"role": "user", "content": [{"type": "text", "text": "see"},
                                       {"type": "image_url", "image_url": {"url": PNG, "detail": "high"}},
                                       {"type": "image_url", "image_url": {"url": "https://x/y.jpg"}}]}),
     expected({"role": "user", "content": [
         T("see"), {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"}},
         {"type": "image", "source": {"type": "url", "url": "https://x/y.jpg"}}]})),
    ("file part with PDF data URL -> document",
     body({"role": "user", "content": [{"type": "file", "file": {"file_data": PDF, "filename": "a.pdf"}}]}),
     expected({"role": "user", "content": [{"type": "document", "title": "a.pdf", "source": {
         "type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}}]})),
    ("max_completion_tokens wins", body(HI, max_completion_tokens=100, max_tokens=50), expected(U("hi"), max_tokens=100)),
    ("max_tokens", body(HI, max_tokens=50), expected(U("hi"), max_tokens=50)),
    ("stop string", body(HI, stop="END"), expected(U("hi"), stop_sequences=["END"])),
    ("stop list, whitespace-only dropped", body(HI, stop=["a", " ", "\n"]), expected(U("hi"), stop_sequences=["a"])),
    ("stop only whitespace -> absent", body(HI, stop=" "), expected(U("hi"))),
    ("temperature clamped, top_p kept", body(HI, temperature=1.5, top_p=0.9),
     expected(U("hi"), temperature=1.0, top_p=0.9)),
    ("tools, no tool_choice", body(HI, tools=[WEATHER]), expected(U("hi"), tools=[WEATHER_A])),
    ("tool without parameters gets an empty object schema",
     body(HI, tools=[{"type": "function", "function": {"name": "now"}}]),
     expected(U("hi"), tools=[{"name": "now", "input_schema": {"type": "object", "properties": {}}}])),
    ("tool_choice auto", body(HI, tools=[WEATHER], tool_choice="auto"),
     expected(U("hi"), tools=[WEATHER_A], tool_choice={"type": "auto"})),
    ("tool_choice required -> any", body(HI, tools=[WEATHER], tool_choice="required"),
     expected(U("hi"), tools=[WEATHER_A], tool_choice={"type": "any"})),
    ("tool_choice none", body(HI, tools=[WEATHER], tool_choice="none", parallel_tool_calls=False),
     expected(U("hi"), tools=[WEATHER_A], tool_choice={"type": "none"})),
    ("tool_choice named", body(HI, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}),
     expected(U("hi"), tools=[WEATHER_A], tool_choice={"type": "tool", "name": "get_weather"})),
    ("parallel_tool_calls false creates auto", body(HI, tools=[WEATHER], parallel_tool_calls=False),
     expected(U("hi"), tools=[WEATHER_A], tool_choice={"type": "auto", "disable_parallel_tool_use": True})),
    ("parallel_tool_calls false on required", body(HI, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False),
     expected(U("hi"), tools=[WEATHER_A], tool_choice={"type": "any", "disable_parallel_tool_use": True})),
    ("empty tools and orphan tool_choice dropped", body(HI, tools=[], tool_choice="auto"), expected(U("hi"))),
    ("legacy functions / function_call",
     body(HI, functions=[WEATHER["function"]], function_call={"name": "get_weather"}),
     expected(U("hi"), tools=[WEATHER_A], tool_choice={"type": "tool", "name": "get_weather"})),
    ("legacy assistant function_call + function message pair up",
     body(HI, {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
          {"role": "function", "name": "f", "content": "42"}),
     expected(U("hi"), A(TU("fn_1", "f", {})), {"role": "user", "content": [TR("fn_1", "42")]})),
    ("user -> metadata.user_id", body(HI, user="u-1"), expected(U("hi"), metadata={"user_id": "u-1"})),
    ("response_format json_schema -> output_config.format, objects made strict",
     body(HI, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
         "type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}},
                                          "c": {"type": "array", "items": {"type": "object", "properties": {}}}}}}}),
     expected(U("hi"), output_config={"format": {"type": "json_schema", "schema": {
         "type": "object", "additionalProperties": False, "properties": {
             "a": {"type": "object", "properties": {"b": {"type": "string"}}, "additionalProperties": False},
             "c": {"type": "array", "items": {"type": "object", "properties": {}, "additionalProperties": False}}}}}})),
    ("response_format json_object -> instruction only (no schema is strict and open)",
     body(HI, response_format={"type": "json_object"}),
     expected(U("hi"), system=[T("Respond with a single valid JSON object and nothing else.")])),
    ("image/jpg data URL -> image/jpeg",
     body({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/jpg;base64,QUJD"}}]}),
     expected({"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                                                        "data": "QUJD"}}]})),
    ("final assistant prefill loses trailing whitespace",
     body(HI, {"role": "assistant", "content": "Answer: "}),
     expected(U("hi"), {"role": "assistant", "content": [T("Answer:")]})),
    ("response_format text -> nothing", body(HI, response_format={"type": "text"}), expected(U("hi"))),
    ("unsupported OpenAI fields dropped",
     body(HI, n=1, logprobs=True, top_logprobs=2, seed=1, logit_bias={"1": 2}, presence_penalty=0.1,
          frequency_penalty=0.1, store=True, service_tier="auto", modalities=["text"], metadata={"a": "b"},
          stream_options={"include_usage": True}, verbosity="low", model="whatever"),
     expected(U("hi"))),
    ("stream passes through", body(HI, stream=True), expected(U("hi"), stream=True)),
    ("first message assistant -> placeholder user turn",
     body({"role": "assistant", "content": "earlier"}, HI),
     expected(U("(continued)"), A(T("earlier")), U("hi"))),
    ("empty text blocks and empty turns removed, neighbours merged",
     body(HI, {"role": "assistant", "content": ""}, {"role": "user", "content": [{"type": "text", "text": ""}]},
          {"role": "user", "content": "again"}),
     expected(U("hi", "again"))),
    ("orphan tool result -> text",
     body(HI, {"role": "assistant", "content": "no tools"}, {"role": "tool", "tool_call_id": "zz", "content": "r"}),
     expected(U("hi"), A(T("no tools")), U("Tool result (zz): r"))),
    ("unanswered tool_use mid-history -> placeholder error result",
     body(HI, {"role": "assistant", "content": None, "tool_calls": [CALL("c1", "f", "{}"), CALL("c2", "g", "{}")]},
          {"role": "tool", "tool_call_id": "c2", "content": "ok"}, {"role": "user", "content": "go on"}),
     expected(U("hi"), A(TU("c1", "f", {}), TU("c2", "g", {})),
              {"role": "user", "content": [TR("c2", "ok"), TR("c1", **NO_RESULT), T("go on")]})),
    ("unanswered tool_use at the end -> user turn of placeholders",
     body(HI, {"role": "assistant", "content": None, "tool_calls": [CALL("c1", "f", "")]}),
     expected(U("hi"), A(TU("c1", "f", {})), {"role": "user", "content": [TR("c1", **NO_RESULT)]})),
    ("tool ids sanitized consistently",
     body(HI, {"role": "assistant", "content": None, "tool_calls": [CALL("functions.Bash:3", "Bash", "{}")]},
          {"role": "tool", "tool_call_id": "functions.Bash:3", "content": "ok"}),
     expected(U("hi"), A(TU("functions_Bash_3", "Bash", {})), {"role": "user", "content": [TR("functions_Bash_3", "ok")]})),
    ("foreign reasoning on assistant turns dropped",
     body(HI, {"role": "assistant", "content": "a", "reasoning_content": "secret", "reasoning": "x"}, {"role": "user", "content": "b"}),
     expected(U("hi"), A(T("a")), U("b"))),
    ("text file part -> text document",
     body({"role": "user", "content": [{"type": "file", "file": {"file_data": "data:text/plain;base64,aGVsbG8="}}]}),
     expected({"role": "user", "content": [{"type": "document", "source": {
         "type": "text", "media_type": "text/plain", "data": "hello"}}]})),
    ("strict function tools stay strict",
     body(HI, tools=[dict(WEATHER, function=dict(WEATHER["function"], strict=True))]),
     expected(U("hi"), tools=[dict(WEATHER_A, strict=True)])),
    ("an assistant refusal replays as its text",
     body(HI, {"role": "assistant", "content": None, "refusal": "I can't."}, {"role": "user", "content": "ok"}),
     expected(U("hi"), A(T("I can't.")), U("ok"))),
]


@pytest.mark.parametrize("openai_body, anthropic_body", [r[1:] for r in REQUEST_TABLE],
                         ids=[r[0] for r in REQUEST_TABLE])
def test_openai_to_anthropic_request(openai_body, anthropic_body):
    assert openai_to_anthropic_request(openai_body, M) == anthropic_body


def test_request_does_not_mutate_input():
    openai_body = body(HI, {"role": "assistant", "content": None, "tool_calls": [CALL("c1", "f", {"a": 1})]},
                       tools=[WEATHER], temperature=0.5)
    snapshot = json.loads(json.dumps(openai_body))
    openai_to_anthropic_request(openai_body, M, variant_effort="high")
    assert openai_body == snapshot


BAD_REQUESTS = [
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "only system"}]}, "messages"),
    ({"messages": ["hi"]}, "messages.0"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "messages.0.content.0.text"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages.0.content.0.type"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}]},
     "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}]},
     "messages.0.content.0.image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f1"}}]}]}, "messages.0.content.0.file"),
    ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": "data:image/x;base64,AA"}}]}]},
     "messages.0.content.0.file.file_data"),
    ({"messages": [HI, {"role": "assistant", "tool_calls": "x"}]}, "messages.1.tool_calls"),
    ({"messages": [HI, {"role": "assistant", "tool_calls": [{"id": "c", "function": {}}]}]}, "messages.1.tool_calls.0.function"),
    ({"messages": [HI, {"role": "assistant", "tool_calls": ["c"]}]}, "messages.1.tool_calls.0.function"),
    ({"messages": [HI, {"role": "assistant", "tool_calls": [CALL("c", "f", 5)]}]}, "messages.1.tool_calls.0.function.arguments"),
    ({"messages": [HI, {"role": "assistant", "tool_calls": [CALL("c", "f", "{}")]}, {"role": "tool", "content": "r"}]},
     "messages.2.tool_call_id"),
    (body(HI, n=2), "n"),
    (body(HI, max_tokens="10"), "max_tokens"),
    (body(HI, max_completion_tokens=0), "max_completion_tokens"),
    (body(HI, max_tokens=True), "max_tokens"),
    (body(HI, temperature="hot"), "temperature"),
    (body(HI, top_p=[1]), "top_p"),
    (body(HI, stop=5), "stop"),
    (body(HI, stop=["a", 1]), "stop"),
    (body(HI, tools="x"), "tools"),
    (body(HI, tools=[{"type": "custom", "custom": {"name": "x"}}]), "tools.0"),
    (body(HI, tools=[{"type": "function", "function": {"name": "x", "parameters": "{}"}}]), "tools.0.function.parameters"),
    (body(HI, tools=[WEATHER], tool_choice={"type": "function"}), "tool_choice"),
    (body(HI, tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
    (body(HI, reasoning_effort="turbo"), "reasoning_effort"),
    (body(HI, response_format={"type": "xml"}), "response_format"),
    (body(HI, response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format.json_schema.schema"),
]


@pytest.mark.parametrize("openai_body, param", BAD_REQUESTS)
def test_bad_requests_name_the_field(openai_body, param):
    with pytest.raises(BadRequest) as info:
        openai_to_anthropic_request(openai_body, M)
    assert info.value.param == param and info.value.status == 400


# ---- 3. reasoning ---------------------------------------------------------------------------------

S45, O41, O46, O47, S5 = ("claude-sonnet-4-5-20250929", "claude-opus-4-1", "claude-opus-4-6",
                          "claude-opus-4-7", "claude-sonnet-5")
TOOL_TURNS = [HI, {"role": "assistant", "content": None, "tool_calls": [CALL("c1", "f", "{}")]},
              {"role": "tool", "tool_call_id": "c1", "content": "r"}]


def enabled(budget):
    return {"type": "enabled", "budget_tokens": budget}


REASONING_TABLE = [
    # model, body fields, variant_effort, thinking_style -> expected reasoning-related fields
    (M, {}, None, None, {"max_tokens": 8192}),
    (M, {"reasoning_effort": "high"}, None, None, {"thinking": enabled(32768), "max_tokens": 33792}),
    (M, {"reasoning_effort": "medium"}, None, None, {"thinking": enabled(16384), "max_tokens": 17408}),
    (M, {"reasoning_effort": "low", "max_tokens": 20000}, None, None, {"thinking": enabled(8192), "max_tokens": 20000}),
    (M, {"reasoning_effort": "minimal"}, None, None, {"thinking": enabled(1024), "max_tokens": 8192}),
    (M, {"reasoning_effort": "xhigh"}, None, None, {"thinking": enabled(49152), "max_tokens": 50176}),
    (M, {"reasoning_effort": "max"}, None, None, {"thinking": enabled(62976), "max_tokens": 64000}),
    (M, {"reasoning_effort": "none"}, "high", None, {"max_tokens": 8192}),
    (M, {}, "medium", None, {"thinking": enabled(16384), "max_tokens": 17408}),
    (M, {"reasoning_effort": "low"}, "high", None, {"thinking": enabled(8192), "max_tokens": 9216}),
    (M, {"reasoning": {"effort": "low"}}, None, None, {"thinking": enabled(8192), "max_tokens": 9216}),
    (M, {"reasoning_effort": "high", "temperature": 0.3, "top_p": 0.5, "top_k": 5}, None, None,
     {"thinking": enabled(32768), "max_tokens": 33792, "top_p": 0.95}),
    (M, {"reasoning_effort": "high", "top_p": 0.99}, None, None,
     {"thinking": enabled(32768), "max_tokens": 33792, "top_p": 0.99}),
    (M, {"temperature": 0.3, "top_p": 0.5, "top_k": 5}, None, None,
     {"max_tokens": 8192, "temperature": 0.3, "top_p": 0.5, "top_k": 5}),
    (S45, {"temperature": 0.3, "top_p": 0.5}, None, None, {"max_tokens": 8192, "temperature": 0.3}),
    (O41, {"temperature": 0.3, "top_p": 0.5}, None, None, {"max_tokens": 8192, "temperature": 0.3}),
    (S45, {"top_p": 0.5}, None, None, {"max_tokens": 8192, "top_p": 0.5}),
    (O46, {"reasoning_effort": "high"}, None, None, {"thinking": enabled(32768), "max_tokens": 33792}),
    (O46, {"reasoning_effort": "high"}, None, "adaptive",
     {"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}, "max_tokens": 8192}),
    (O47, {"reasoning_effort": "high", "temperature": 0.3, "top_p": 0.9, "top_k": 3}, None, None,
     {"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}, "max_tokens": 8192}),
    (O47, {"reasoning_effort": "minimal"}, None, None,
     {"thinking": {"type": "adaptive"}, "output_config": {"effort": "low"}, "max_tokens": 8192}),
    (O47, {}, "xhigh", None, {"thinking": {"type": "adaptive"}, "output_config": {"effort": "xhigh"}, "max_tokens": 8192}),
    (S5, {"reasoning_effort": "max"}, None, None,
     {"thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}, "max_tokens": 8192}),
    (O47, {"temperature": 0.3, "top_p": 0.9}, None, None, {"max_tokens": 8192}),
    (O47, {"reasoning_effort": "low"}, None, "budget", {"thinking": enabled(8192), "max_tokens": 9216}),
    (O47, {"reasoning_effort": "none", "temperature": 1}, None, None, {"max_tokens": 8192}),
    # efforts as each model takes them (the model table): Opus 4.6 has max but no xhigh
    (O46, {"reasoning_effort": "xhigh"}, None, "adaptive",
     {"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}, "max_tokens": 8192}),
    (O46, {"reasoning_effort": "max"}, None, "adaptive",
     {"thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}, "max_tokens": 8192}),
    ("claude-opus-5-5", {"reasoning_effort": "max", "temperature": 0.2}, None, None,
     {"thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}, "max_tokens": 8192}),
    ("claude-3-5-sonnet-20241022", {"reasoning_effort": "high", "temperature": 0.2}, None, None,
     {"max_tokens": 8192, "temperature": 0.2}),
    ("claude-opus-4-0", {"reasoning_effort": "max"}, None, None, {"thinking": enabled(30976), "max_tokens": 32000}),
    # an unknown future id follows the newest rules: adaptive, no sampling
    ("claude-opus-7", {"reasoning_effort": "xhigh", "top_p": 0.5}, None, None,
     {"thinking": {"type": "adaptive"}, "output_config": {"effort": "xhigh"}, "max_tokens": 8192}),
    # thinking off: forced tool, or a tool loop whose signed thinking the client cannot replay
    (M, {"reasoning_effort": "high", "tool_choice": "required", "tools": [WEATHER]}, None, None, {"max_tokens": 8192}),
    (M, {"reasoning_effort": "high", "messages": TOOL_TURNS, "temperature": 0.2}, None, None,
     {"max_tokens": 8192, "temperature": 0.2}),
    (O47, {"reasoning_effort": "high", "messages": TOOL_TURNS}, None, None,
     {"output_config": {"effort": "high"}, "max_tokens": 8192}),
    # a finished tool loop (last assistant turn is text) keeps thinking
    (M, {"reasoning_effort": "low", "messages": TOOL_TURNS + [{"role": "assistant", "content": "done"}, HI]},
     None, None, {"thinking": enabled(8192), "max_tokens": 9216}),
]
REASONING_KEYS = ("thinking", "output_config", "max_tokens", "temperature", "top_p", "top_k")


@pytest.mark.parametrize("model, fields, variant, style, want", REASONING_TABLE)
def test_reasoning_table(model, fields, variant, style, want):
    openai_body = dict({"messages": [HI]}, **fields)
    anthropic_body = openai_to_anthropic_request(openai_body, model, variant_effort=variant,
                                                 facts=model_facts(model, {"thinking": style}))
    assert {k: anthropic_body[k] for k in REASONING_KEYS if k in anthropic_body} == want


def test_mid_conversation_system_inline_where_the_model_takes_it():
    openai_body = body(HI, {"role": "developer", "content": "D"}, {"role": "assistant", "content": "a"},
                       {"role": "system", "content": "E"}, {"role": "user", "content": "b"},
                       {"role": "assistant", "content": None, "tool_calls": [CALL("c1", "f", "{}")]},
                       {"role": "system", "content": "F"}, {"role": "tool", "tool_call_id": "c1", "content": "r"})
    messages = openai_to_anthropic_request(openai_body, "claude-opus-4-8")["messages"]
    assert messages == [U("hi"), {"role": "system", "content": [T("D")]}, A(T("a")),
                        {"role": "system", "content": [T("E")]}, U("b"), A(TU("c1", "f", {})),
                        {"role": "user", "content": [TR("c1", "r"), T("<system-reminder>\nF\n</system-reminder>")]}]
    before_4_8 = openai_to_anthropic_request(openai_body, "claude-opus-4-7")["messages"]
    assert [m["role"] for m in before_4_8] == ["user", "assistant", "user", "assistant", "user"]


def test_anthropic_version_2026_10_21_takes_no_sampling_fields():
    notes = []
    anthropic_body = openai_to_anthropic_request(body(HI, temperature=0.3, top_k=4), M, anthropic_version="2026-10-21",
                                                 notes=notes)
    assert "temperature" not in anthropic_body and "top_k" not in anthropic_body
    assert notes == [("temperature", "dropped: anthropic-version 2026-10-21 removed sampling parameters"),
                     ("top_k", "dropped: anthropic-version 2026-10-21 removed sampling parameters")]
    assert openai_to_anthropic_request(body(HI, temperature=0.3), M)["temperature"] == 0.3


def test_openai_fields_without_an_anthropic_form_are_notes():
    notes = []
    openai_to_anthropic_request(body(HI, moderation={"enabled": True}, prompt_cache_options={"ttl": "1h"},
                                     prompt_cache_breakpoint=True, frobnicate=1, metadata={"a": "b"},
                                     stream_options={"include_usage": True}), M, notes=notes)
    assert [path for path, _ in notes] == ["frobnicate", "metadata", "moderation", "prompt_cache_breakpoint",
                                           "prompt_cache_options"]
    assert dict(notes)["moderation"] == "dropped: no moderation pass on Anthropic's API"


def test_budget_table_covers_every_effort():
    assert set(EFFORT_BUDGET) == {"minimal", "low", "medium", "high", "xhigh", "max"}
    assert all(b >= 1024 for b in EFFORT_BUDGET.values())


def test_raising_an_explicit_max_tokens_is_a_note_and_converters_log_only_debug(caplog):
    notes = []
    with caplog.at_level(logging.DEBUG, logger="claude_proxy"):
        openai_to_anthropic_request(body(HI, max_tokens=100, reasoning_effort="low"), M, notes=notes)
        openai_to_anthropic_request(body(HI, reasoning_effort="low", seed=3), M, notes=notes)
    assert notes == [("max_tokens", "rewritten: 100 raised to 9216 to fit the thinking budget"),
                     ("seed", "dropped: Claude has no seeded sampling")]
    assert caplog.records and all(r.levelno == logging.DEBUG for r in caplog.records)


# ---- 4. stream machine ---------------------------------------------------------------------------


def openai_chunk_of(delta, finish=None):
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "gpt-claude",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def usage_chunk(usage):
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "gpt-claude",
            "choices": [], "usage": usage}


def test_text_basic_exact():
    assert replay(TEXT_BASIC) == [
        openai_chunk_of({"role": "assistant", "content": ""}), openai_chunk_of({"content": "2"}), openai_chunk_of({}, "stop"),
        usage_chunk({"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25,
                     "prompt_tokens_details": {"cached_tokens": 0}}),
        "[DONE]"]


def test_text_basic_without_usage():
    chunks = replay(TEXT_BASIC, include_usage=False)
    check_openai_grammar(chunks, include_usage=False)
    assert chunks[-2] == openai_chunk_of({}, "stop")


def test_tool_use_stream():
    chunks = replay(TOOL_USE)
    body = check_openai_grammar(chunks, include_usage=True)
    assert deltas(chunks, "content") == "I'll check the current weather in Paris for you."
    assert openai_chunk_of({"tool_calls": [{"index": 0, "id": "toolu_01NRLabsLyVHZPKxbKvkfSMn", "type": "function",
                                  "function": {"name": "get_weather", "arguments": ""}}]}) in body
    assert arguments(chunks) == '{"location": "Paris"}'
    assert body[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-2]["usage"]["completion_tokens"] == 65 and chunks[-2]["usage"]["prompt_tokens"] == 377


def test_truncated_tool_json_without_block_stop():
    chunks = replay(TRUNCATED_TOOL_JSON)
    body = check_openai_grammar(chunks, include_usage=True)
    partials = [e["delta"]["partial_json"] for e in anthropic_sse_payloads(TRUNCATED_TOOL_JSON)
                if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta"]
    assert arguments(chunks) == "".join(partials) and arguments(chunks).startswith('{"filename": "taxes.txt"')
    assert body[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-2]["usage"] == {"prompt_tokens": 450, "completion_tokens": 124, "total_tokens": 574,
                                   "prompt_tokens_details": {"cached_tokens": 0}}


def test_thinking_with_signature():
    chunks = replay(THINKING_SIGNATURE)
    body = check_openai_grammar(chunks, include_usage=True)
    assert deltas(chunks, "reasoning_content") == "This is a straightforward question about pedest accidents."
    assert deltas(chunks, "content") == "Here are the basic"
    assert all(c["choices"][0]["delta"].get("reasoning_content") != "" for c in body)
    assert "signature" not in json.dumps(chunks) and "EvMC" not in json.dumps(chunks)
    assert chunks[-2]["usage"]["completion_tokens"] == 282


def test_redacted_thinking_is_silent():
    chunks = replay(REDACTED_THINKING)
    check_openai_grammar(chunks, include_usage=True)
    assert deltas(chunks, "reasoning_content") == ""
    assert deltas(chunks, "content").startswith("I notice that you've sent what appears to be some")
    assert "EqkE" not in json.dumps(chunks)
    assert chunks[-2]["usage"]["prompt_tokens"] == 92 and chunks[-2]["usage"]["completion_tokens"] == 189


def test_web_search_server_tools_and_citations_dropped():
    chunks = replay(WEB_SEARCH_CITATIONS)
    body = check_openai_grammar(chunks, include_usage=True)
    assert not any("tool_calls" in c["choices"][0]["delta"] for c in body)
    assert deltas(chunks, "reasoning_content").startswith("The user is asking about the weather in San Francisco")
    assert deltas(chunks, "content") == ("Based on the search results, I can see"
                                         "today (September 16) shows a high of 76°F and low of 59°F")
    assert body[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-2]["usage"]["prompt_tokens"] == 22397  # message_delta's value wins over message_start's 2068
    assert chunks[-2]["usage"]["completion_tokens"] == 637


def test_error_event_mid_stream_ends_the_machine():
    machine = AnthropicToOpenAIStream("gpt-claude", include_usage=True, completion_id="chatcmpl-1", created=7)
    events = anthropic_sse_payloads(TEXT_BASIC)
    out = []
    for event in events[:4]:
        out += machine.feed(event)
    out += machine.feed({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert out[-1] == {"error": {"message": "Overloaded", "type": "overloaded_error", "param": None, "code": None}}
    assert out[:-1] == [openai_chunk_of({"role": "assistant", "content": ""}), openai_chunk_of({"content": "2"})]
    assert machine.finished
    assert [machine.feed(e) for e in events[4:]] == [[]] * len(events[4:]) and machine.close() == []


def test_close_without_message_stop_and_second_close():
    machine = AnthropicToOpenAIStream("gpt-claude", completion_id="chatcmpl-1", created=7)
    out = []
    for event in anthropic_sse_payloads(TOOL_USE)[:-1]:
        out += machine.feed(event)
    assert not machine.finished
    out += machine.close()
    check_openai_grammar(out, include_usage=False)
    assert out[-2] == openai_chunk_of({}, "tool_calls") and machine.finished and machine.close() == []


def test_empty_upstream_still_yields_a_valid_stream():
    machine = AnthropicToOpenAIStream("gpt-claude", completion_id="chatcmpl-1", created=7)
    assert machine.close() == [openai_chunk_of({"role": "assistant", "content": ""}), openai_chunk_of({}, "stop"), "[DONE]"]


def test_usage_with_cache_and_thinking_tokens():
    machine = AnthropicToOpenAIStream("gpt-claude", include_usage=True, completion_id="chatcmpl-1", created=7)
    machine.feed({"type": "message_start", "message": {"usage": {
        "input_tokens": 10, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 5, "output_tokens": 1}}})
    machine.feed({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                  "usage": {"output_tokens": 50, "output_tokens_details": {"thinking_tokens": 30}}})
    assert machine.feed({"type": "message_stop"})[-2]["usage"] == {
        "prompt_tokens": 115, "completion_tokens": 50, "total_tokens": 165,
        "prompt_tokens_details": {"cached_tokens": 100}, "completion_tokens_details": {"reasoning_tokens": 30}}


@pytest.mark.parametrize("stop_reason, finish", [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("refusal", "content_filter"), ("pause_turn", "stop"), ("model_context_window_exceeded", "length"),
    ("something_new", "stop"), (None, "stop")])
def test_finish_reasons(stop_reason, finish):
    machine = AnthropicToOpenAIStream("gpt-claude", completion_id="chatcmpl-1", created=7)
    machine.feed({"type": "message_start", "message": {"usage": {}}})
    machine.feed({"type": "message_delta", "delta": {"stop_reason": stop_reason}, "usage": {"output_tokens": 1}})
    assert machine.feed({"type": "message_stop"}) == [openai_chunk_of({}, finish), "[DONE]"]


def test_tool_index_counts_tool_blocks_only():
    events = [{"type": "message_start", "message": {"usage": {}}}]
    for i, block in enumerate([{"type": "text", "text": ""}, {"type": "tool_use", "id": "t1", "name": "a", "input": {}},
                               {"type": "server_tool_use", "id": "s1", "name": "web_search", "input": {}},
                               {"type": "tool_use", "id": "t2", "name": "b", "input": {}}]):
        events += [{"type": "content_block_start", "index": i, "content_block": block},
                   {"type": "content_block_delta", "index": i, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
                   {"type": "content_block_stop", "index": i}]
    machine = AnthropicToOpenAIStream("gpt-claude", completion_id="chatcmpl-1", created=7)
    out = [c for e in events for c in machine.feed(e)] + machine.close()
    check_openai_grammar(out, include_usage=False)
    assert [call["index"] for c in out[:-1] for call in c["choices"][0]["delta"].get("tool_calls", [])] == [0, 0, 1, 1]


def test_stop_details_of_a_refusal_become_message_refusal():
    message = dict(anthropic_message("Partial."), stop_reason="refusal",
                   stop_details={"type": "refusal", "category": "cyber", "explanation": "Not this one."})
    answer = anthropic_response_to_openai(message, "gpt-claude")
    assert answer["choices"][0]["message"]["refusal"] == "Not this one."
    assert answer["choices"][0]["finish_reason"] == "content_filter"
    machine = AnthropicToOpenAIStream("gpt-claude", completion_id="chatcmpl-1", created=7)
    chunks = [c for e in anthropic_message_as_events(message) for c in machine.feed(e)] + machine.close()
    check_openai_grammar(chunks, include_usage=False)
    assert deltas(chunks, "refusal") == "Not this one."


# ---- 5. non-streaming: fold and round trip ---------------------------------------------------------


def test_fold_tool_use_stream():
    assert fold_openai_chunks(replay(TOOL_USE)) == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "gpt-claude",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
            "role": "assistant", "content": "I'll check the current weather in Paris for you.", "refusal": None,
            "tool_calls": [{"id": "toolu_01NRLabsLyVHZPKxbKvkfSMn", "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}}]}}],
        "usage": {"prompt_tokens": 377, "completion_tokens": 65, "total_tokens": 442,
                  "prompt_tokens_details": {"cached_tokens": 0}}}


def test_fold_error_chunk_raises():
    with pytest.raises(UpstreamError) as info:
        fold_openai_chunks([openai_chunk_of({"role": "assistant", "content": ""}),
                            {"error": {"message": "Overloaded", "type": "overloaded_error", "param": None, "code": None}}])
    assert info.value.message == "Overloaded" and info.value.error_type == "overloaded_error"


MESSAGE_FULL = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "thinking", "thinking": "Hmm.", "signature": "sig"},
                {"type": "redacted_thinking", "data": "xx"},
                {"type": "text", "text": "Checking ", "citations": [{"type": "char_location"}]},
                {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "q"}},
                {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
                {"type": "text", "text": "now."},
                {"type": "tool_use", "id": "toolu_a", "name": "f", "input": {"x": [1, 2]}},
                {"type": "tool_use", "id": "toolu_b", "name": "g", "input": {}}],
    "stop_reason": "tool_use", "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 20, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 2}}
MESSAGE_TEXT = {"id": "msg_2", "type": "message", "role": "assistant", "model": "m", "content": [
    {"type": "text", "text": "Hello"}], "stop_reason": "max_tokens", "stop_sequence": None,
    "usage": {"input_tokens": 1, "output_tokens": 2}}
MESSAGE_EMPTY = {"id": "msg_3", "type": "message", "role": "assistant", "model": "m", "content": [],
                 "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 0}}


def test_anthropic_response_to_openai_full():
    assert anthropic_response_to_openai(MESSAGE_FULL, "gpt-claude", completion_id="chatcmpl-1", created=7) == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "gpt-claude",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
            "role": "assistant", "content": "Checking now.", "refusal": None, "reasoning_content": "Hmm.",
            "tool_calls": [
                {"id": "toolu_a", "type": "function", "function": {"name": "f", "arguments": '{"x": [1, 2]}'}},
                {"id": "toolu_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 15, "completion_tokens": 20, "total_tokens": 35,
                  "prompt_tokens_details": {"cached_tokens": 3}}}


@pytest.mark.parametrize("message", [MESSAGE_FULL, MESSAGE_TEXT, MESSAGE_EMPTY])
def test_round_trip_anthropic_stream_fold_equals_non_stream(message):
    machine = AnthropicToOpenAIStream("gpt-claude", include_usage=True, completion_id="chatcmpl-1", created=7)
    chunks = [c for e in anthropic_message_as_events(message) for c in machine.feed(e)] + machine.close()
    check_openai_grammar(chunks, include_usage=True)
    assert fold_openai_chunks(chunks) == anthropic_response_to_openai(
        message, "gpt-claude", completion_id="chatcmpl-1", created=7)


def test_message_as_events_shape():
    assert anthropic_message_as_events(MESSAGE_TEXT) == [
        {"type": "message_start", "message": dict(MESSAGE_TEXT, content=[], stop_reason=None)},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
         "usage": {"input_tokens": 1, "output_tokens": 2}},
        {"type": "message_stop"}]


def test_anthropic_error_body_raises():
    with pytest.raises(UpstreamError) as info:
        anthropic_response_to_openai({"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}, "m")
    assert info.value.error_type == "rate_limit_error"


@pytest.mark.parametrize("text", [TEXT_BASIC, TOOL_USE, TRUNCATED_TOOL_JSON, THINKING_SIGNATURE,
                                  REDACTED_THINKING, WEB_SEARCH_CITATIONS])
def test_inline_fixtures_fold_like_the_stream(text):
    chunks = replay(text)
    completion = fold_openai_chunks(chunks)
    assert completion["choices"][0]["message"]["content"] == (deltas(chunks, "content") or None)
    assert completion["usage"] == chunks[-2]["usage"]


# ---- the whole recorded folder, when present --------------------------------------------------------

FIXTURE_FILES = sorted(f for f in os.listdir(FIXTURES) if f.startswith("anthropic_") and f.endswith(".sse")) \
    if os.path.isdir(FIXTURES) else []


@pytest.mark.skipif(not FIXTURE_FILES, reason="shared fixtures absent")
@pytest.mark.parametrize("name", FIXTURE_FILES or ["none"])
@pytest.mark.parametrize("include_usage", [True, False])
def test_replay_recorded_fixture(name, include_usage):
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        text = f.read()
    events = anthropic_sse_payloads(text)
    chunks = replay(text, include_usage=include_usage)
    check_openai_grammar(chunks, include_usage)
    texts = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    assert deltas(chunks, "content") == texts
    tool_blocks = {e["index"] for e in events if e["type"] == "content_block_start"
                   and e["content_block"]["type"] == "tool_use"}
    for k, index in enumerate(sorted(tool_blocks)):
        assert arguments(chunks, k) == "".join(e["delta"].get("partial_json", "") for e in events
                                              if e["type"] == "content_block_delta" and e["index"] == index)
    last_delta = [e for e in events if e["type"] == "message_delta"][-1]
    finish = [c for c in chunks[:-1] if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish[0]["choices"][0]["finish_reason"] == {"end_turn": "stop", "tool_use": "tool_calls",
                                                        "max_tokens": "length"}[last_delta["delta"]["stop_reason"]]
    if include_usage:
        assert chunks[-2]["usage"]["completion_tokens"] == last_delta["usage"]["output_tokens"]


# ---- a request shaped for another model, fitted to the one it goes to (passthrough) -------------

UNKNOWN_FITTED = {   # Claude Code's request for a name it does not know -> what each target gets
    "claude-sonnet-4-5": ({"thinking": {"type": "enabled", "budget_tokens": 32768}, "max_tokens": 32768 + 1024,
                           "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}},
                          ["thinking", "thinking.display", "max_tokens", "output_config.effort"]),
    "claude-3-5-haiku": ({"max_tokens": 8192}, ["thinking", "context_management.edits", "output_config.effort", "max_tokens"]),
    "claude-opus-4-6": ({"thinking": {"type": "enabled", "budget_tokens": 32768}, "output_config": {"effort": "high"},
                         "max_tokens": 32768 + 1024,
                         "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}},
                        ["thinking", "thinking.display", "max_tokens"]),
}
FITTED_KEYS = ("thinking", "output_config", "max_tokens", "context_management")


@pytest.mark.parametrize("target", sorted(UNKNOWN_FITTED))
def test_a_request_shaped_for_an_unknown_name_is_fitted_to_the_known_target(target):
    sent = CLAUDE_CODE_UNKNOWN_MODEL["body"]
    notes = []
    fitted = cp.fit_to_target_model(sent, make_spec(model=target), notes)
    expected, noted = UNKNOWN_FITTED[target]
    assert {k: fitted[k] for k in FITTED_KEYS if k in fitted} == expected and [p for p, _ in notes] == noted
    assert {k: v for k, v in fitted.items() if k not in FITTED_KEYS} == {k: v for k, v in sent.items() if k not in FITTED_KEYS}
    assert sent == CLAUDE_CODE_UNKNOWN_MODEL["body"]                     # the client's body is not changed


def test_a_target_with_no_facts_gets_the_request_as_sent_and_a_note():
    sent = CLAUDE_CODE_UNKNOWN_MODEL["body"]
    notes = []
    assert cp.fit_to_target_model(sent, make_spec(model="glm-4.6"), notes) is sent
    assert [p for p, _ in notes] == ["model"] and "'glm-4.6'" in notes[0][1]
    for target in ("claude-opus-5-5", "claude-fable-5-2"):              # facts fit the request as it is
        assert cp.fit_to_target_model(sent, make_spec(model=target)) is sent
    opus = dict(sent, model="claude-opus-4-6", thinking={"type": "enabled", "budget_tokens": 4096})
    assert cp.fit_to_target_model(opus, make_spec(model="claude-opus-4-6")) is opus      # shaped for it: as sent
    entry = make_spec(model="glm-4.6", thinking="budget", max_tokens=16000)            # a models[] entry's facts
    fitted = cp.fit_to_target_model(sent, entry)
    assert (fitted["thinking"], fitted["max_tokens"], fitted["output_config"]) == (
        {"type": "enabled", "budget_tokens": 16000 - 1024}, 16000, {"effort": "high"})
    newer = cp.fit_to_target_model(dict(opus, model="x"), make_spec(model="claude-opus-4-8"))
    assert newer["thinking"] == {"type": "adaptive"}                   # no budget on an adaptive-only model


# =============================================================================================
# 9. Sessions that switch routes: thinking signatures by origin
# =============================================================================================

NATIVE = {"name": "anthropic", "tag_signatures": False}
VENDOR = {"name": "kimi", "tag_signatures": True}
GENUINE = {"type": "thinking", "thinking": "a", "signature": "EqQBgenuine"}
UNSIGNED = {"type": "thinking", "thinking": "b", "signature": ""}
KIMI_MADE = {"type": "thinking", "thinking": "c", "signature": cp.tag_signature("kimi", "k1")}
CONVERTED = {"type": "thinking", "thinking": "d", "signature": cp.tag_signature("openrouter", "EtsigOR")}
REDACTED = {"type": "redacted_thinking", "data": "r1"}
KIMI_REDACTED = {"type": "redacted_thinking", "data": cp.tag_signature("kimi", "kr")}
MIXED = [GENUINE, UNSIGNED, KIMI_MADE, CONVERTED, REDACTED, KIMI_REDACTED, {"type": "text", "text": "done"}]


@pytest.mark.parametrize("provider, kept", [
    (NATIVE, [GENUINE, REDACTED, T("done")]),
    (VENDOR, [dict(KIMI_MADE, signature="k1"), dict(KIMI_REDACTED, data="kr"), T("done")]),
])
def test_own_thinking_only_keeps_what_the_provider_issued(provider, kept):
    history = {"model": "m", "messages": [U("q"), A(*MIXED), U("more")]}
    notes = []
    body = cp.own_thinking_only(history, provider, notes)
    assert body["messages"] == [U("q"), A(*kept), U("more")]
    assert [path for path, _ in notes] == ["messages.1.content.%d" % i for i in range(6) if MIXED[i] not in
                                           [b for b in MIXED if cp._own_block(b, provider) is not None]]
    assert history["messages"][1]["content"] == MIXED      # pure: the input is untouched


def test_own_thinking_only_returns_the_same_body_when_nothing_changes():
    history = {"model": "m", "thinking": {"type": "adaptive"}, "messages": [U("q"), A(GENUINE, T("x")), U("y")]}
    assert cp.own_thinking_only(history, NATIVE) is history


def test_a_tool_turn_answered_on_another_route_goes_without_thinking():
    history = {"model": "m", "thinking": {"type": "adaptive", "display": "omitted"}, "output_config": {"effort": "high"},
               "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}, {"type": "other"}]},
               "messages": [U("go"), A(UNSIGNED, T("Writing."), TU("t1", "Write", {})),
                            {"role": "user", "content": [TR("t1", "ok")]}]}
    notes = []
    body = cp.own_thinking_only(history, NATIVE, notes)
    assert "thinking" not in body and body["output_config"] == {"effort": "high"}
    assert body["context_management"] == {"edits": [{"type": "other"}]}
    assert body["messages"][1] == A(T("Writing."), TU("t1", "Write", {}))
    assert [path for path, _ in notes] == ["messages.1.content.0", "thinking", "context_management.edits"]
    signed = dict(history, messages=[U("go"), A(GENUINE, TU("t1", "Write", {})), {"role": "user", "content": [TR("t1", "ok")]}])
    assert cp.own_thinking_only(signed, NATIVE) is signed


def test_an_adaptive_tool_turn_the_model_did_not_think_in_is_sent_as_it_is():
    """Claude Code through passthrough: adaptive thinking, and a tool turn with no thinking block
    (the model chose not to think). Nothing was removed, so the request is the client's, byte
    for byte; with `enabled` thinking the same turn is a certain 400, so thinking goes off."""
    loop = [U("go"), A(T("Writing."), TU("t1", "Write", {})), {"role": "user", "content": [TR("t1", "ok")]}]
    adaptive = {"model": "m", "thinking": {"type": "adaptive", "display": "omitted"},
                "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}, "messages": loop}
    notes = []
    assert cp.own_thinking_only(adaptive, NATIVE, notes) is adaptive and notes == []
    enabled = dict(adaptive, thinking={"type": "enabled", "budget_tokens": 2048})
    body = cp.own_thinking_only(enabled, NATIVE, notes)
    assert "thinking" not in body and "context_management" not in body        # an empty edits list is not sent
    assert "another route answered it" in dict(notes)["thinking"]


def test_a_turn_left_empty_is_removed():
    history = {"model": "m", "messages": [U("q"), A(UNSIGNED), U("again")]}
    assert cp.own_thinking_only(history, NATIVE)["messages"] == [U("q"), U("again")]


def test_system_messages_fold_into_user_text_for_a_model_that_takes_none():
    history = {"model": "m", "messages": [
        U("q"), {"role": "system", "content": "Env", "output_config": {"effort": "low"}}, A(TU("t1", "Read", {})),
        {"role": "system", "content": [T("Careful")]}, {"role": "user", "content": [TR("t1", "r")]},
        A(T("done")), {"role": "system", "content": []}]}
    notes = []
    body = cp.fold_system_messages(history, notes)
    assert body["messages"] == [
        U("q", "<system-reminder>\nEnv\n</system-reminder>"), A(TU("t1", "Read", {})),
        {"role": "user", "content": [TR("t1", "r"), T("<system-reminder>\nCareful\n</system-reminder>")]}, A(T("done"))]
    assert [path for path, _ in notes] == ["messages.1", "messages.1.output_config", "messages.3", "messages.6"]
    plain = {"model": "m", "messages": [U("q")]}
    assert cp.fold_system_messages(plain) is plain


# A vendor's stream as it might send it: spaces after separators (json.dumps' default, not our compact
# encoding), a comment line, a ping, a thinking_delta whose text names the marker words, a thinking
# block, its signature_delta, a redacted_thinking block and a text block.
VENDOR_EVENTS = [
    {"type": "message_start", "message": {"id": "msg_v", "type": "message", "role": "assistant", "model": "k2",
                                          "content": [], "stop_reason": None, "usage": {"input_tokens": 5, "output_tokens": 1}}},
    {"type": "ping"},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta",
                                                          "thinking": "a signature_delta in content_block_start? é"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "ks=="}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "redacted_thinking", "data": "kd"}},
    {"type": "content_block_stop", "index": 1},
    {"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "Hi"}},
    {"type": "content_block_stop", "index": 2},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}},
    {"type": "message_stop"}]
VENDOR_SIGNED = (4, 6)          # the events that carry a signature
VENDOR_SIGNED_TAIL = b'event: content_block_delta\ndata: {"type": "content_block_delta", "delta": {"type": "signature_delta", "signature": "s"}}'


def vendor_stream_bytes(newline=b"\n"):
    """(the vendor's bytes, what the client must get: the same bytes, the two signed events re-encoded tagged)."""
    sent, expected = [b": keep-alive" + newline + newline], [b": keep-alive" + newline + newline]
    for i, event in enumerate(VENDOR_EVENTS):
        raw = sse_event(event["type"], event).replace(b"\n", newline)
        sent.append(raw)
        expected.append(cp.format_anthropic_event(cp.tag_event_signature(event, "kimi")) if i in VENDOR_SIGNED else raw)
    return b"".join(sent), b"".join(expected)


def relay_through_tagger(pieces):
    tagger = cp.SignatureTagRelay("kimi")
    return b"".join(tagger.feed(piece) for piece in pieces) + tagger.close()


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_vendor_stream_is_relayed_as_sent_except_its_signed_events(newline):
    sent, expected = vendor_stream_bytes(newline)
    assert sent != expected and relay_through_tagger([sent]) == expected
    assert relay_through_tagger([sent[i:i + 1] for i in range(len(sent))]) == expected          # byte by byte
    for i in range(len(sent) + 1):                                                              # split at every index
        assert relay_through_tagger([sent[:i], sent[i:]]) == expected, i
    unterminated = sent.rstrip(b"\r\n")                        # a last event without its blank line
    assert relay_through_tagger([unterminated]) == expected.rstrip(b"\r\n")
    assert relay_through_tagger([sent[:sent.rindex(b"event: content_block_delta")] + VENDOR_SIGNED_TAIL]) == \
        expected[:expected.rindex(b"event: content_block_delta")] + b"event: content_block_delta\n" + \
        b'data: {"type":"content_block_delta","delta":{"type":"signature_delta","signature":"claude-proxy:kimi:s"}}\n\n'

    events = [data for _, data in sse_events(expected)]
    assert events[4]["delta"]["signature"] == "claude-proxy:kimi:ks==" and events[6]["content_block"]["data"] == \
        "claude-proxy:kimi:kd" and events[2] == VENDOR_EVENTS[2]          # an empty signature is left as sent
    message = fold_anthropic_events(events)
    assert cp.untag_signature(message["content"][0]["signature"]) == ("kimi", "ks==")


@pytest.mark.parametrize("raw_event, could", [
    (b'data: {"type":"content_block_delta","delta":{"type":"text_delta","text":"thinking"}}\n\n', False),
    (b'data: {"type":"content_block_delta","delta":{"type":"thinking_delta","thinking":"x"}}\n\n', False),
    (b'data: {"type":"content_block_start","content_block":{"type":"text","text":""}}\n\n', False),
    (b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn"}}\n\n', False),
    (b'data: {"type":"content_block_delta","delta":{"type":"signature_delta","signature":"s"}}\n\n', True),
    (b'data: {"type":"content_block_start","content_block":{"type":"thinking","signature":""}}\n\n', True),
    (b'data: {"type":"content_block_start","content_block":{"type":"redacted_thinking","data":"d"}}\n\n', True)])
def test_only_events_that_could_carry_a_signature_are_decoded(raw_event, could):
    assert cp._could_carry_signature(raw_event) is could


def test_vendor_answer_keeps_its_bytes_but_its_signatures():
    message = {"id": "msg_v", "type": "message", "role": "assistant", "model": "k2", "content": [
        {"type": "thinking", "thinking": "hmm", "signature": "ks/+=="}, {"type": "redacted_thinking", "data": "kd"},
        {"type": "tool_use", "id": "t1", "name": "f", "input": {"data": "x", "signature": "s"}},
        {"type": "text", "text": "Hi é"}], "stop_reason": "end_turn", "usage": {"input_tokens": 5, "output_tokens": 9}}
    raw = json.dumps(message, indent=2, ensure_ascii=True).encode()
    tagged = cp.tag_message_bytes(raw, "kimi")
    assert tagged == raw.replace(b'"ks/+=="', b'"claude-proxy:kimi:ks/+=="').replace(b'"kd"', b'"claude-proxy:kimi:kd"')
    assert json.loads(tagged) == cp.tag_message_signatures(message, "kimi")
    plain = json.dumps(dict(message, content=message["content"][2:]), indent=1).encode()
    assert cp.tag_message_bytes(plain, "kimi") is plain
    escaped = raw.replace(b"ks/+==", b"ks\\/+==")              # a value not found as parsed: re-encoded whole
    assert json.loads(cp.tag_message_bytes(escaped, "kimi")) == cp.tag_message_signatures(message, "kimi")


# =============================================================================================
# 9c. Converters: Responses client -> Claude
# =============================================================================================

CODEX_FIXTURES = os.path.join(SHARED, "fixtures", "codex")
ORIGIN = "anthropic/claude-sonnet-4-5"

# ---- the two real Codex 0.171.0 requests (fixtures/codex), trimmed: prompts cut, 4 of 9 tools -----

CODEX_EXEC_COMMAND = {
    "type": "function", "name": "exec_command", "strict": False,
    "description": "Runs a command in a PTY, returning output or a session ID for ongoing interaction.",
    "parameters": {"type": "object", "properties": {
        "cmd": {"type": "string", "description": "Shell command to execute."},
        "workdir": {"type": "string", "description": "Working directory for the command. Defaults to the turn cwd."},
        "yield_time_ms": {"type": "number", "description": "Wait before yielding output."}},
        "required": ["cmd"], "additionalProperties": False}}
CODEX_TOOLS = [
    CODEX_EXEC_COMMAND,
    {"type": "function", "name": "view_image", "strict": False,
     "description": "View a local image file from the filesystem when visual inspection is needed.",
     "parameters": {"type": "object", "properties": {"path": {"type": "string", "description": "Local filesystem path to an image file."}},
                    "required": ["path"], "additionalProperties": False}},
    {"type": "namespace", "name": "multi_agent_v1", "description": "Tools for spawning and managing sub-agents.",
     "tools": [{"type": "function", "name": "close_agent", "strict": False,
                "description": "Close an agent and any open descendants when they are no longer needed.",
                "parameters": {"type": "object", "properties": {"target": {"type": "string", "description": "Agent id to close (from spawn_agent)."}},
                               "required": ["target"], "additionalProperties": False}}]},
    {"type": "web_search", "external_web_access": False}]
CODEX_INPUT = [
    {"type": "message", "id": "msg_bc5690cd-bb05-5d06-86f4-441c85693549", "role": "developer", "content": [
        {"type": "input_text", "text": "You are a coding agent running in the Codex CLI, a terminal-based coding assistant."}]},
    {"type": "message", "id": "msg_01a23304-e3ca-71e3-9b24-b47a15f37740", "role": "developer", "content": [
        {"type": "input_text", "text": "<skills_instructions>\n## Skills\n</skills_instructions>"},
        {"type": "input_text", "text": "<permissions instructions>\nFilesystem sandboxing: workspace-write.\n</permissions instructions>"}]},
    {"type": "message", "id": "msg_01a23304-e3ca-71e3-9b24-b48bdbd83fa1", "role": "user", "content": [
        {"type": "input_text", "text": "<environment_context>\n  <shell>bash</shell>\n</environment_context>"}]},
    {"type": "message", "id": "msg_01a23304-e3da-75d1-bde9-7049d3a9a45f", "role": "user", "content": [
        {"type": "input_text", "text": "create the file hello.txt with hi"}]}]
CODEX_TURN1 = {
    "model": "claude-sonnet-4-5", "stream": True, "input": CODEX_INPUT, "tools": CODEX_TOOLS, "tool_choice": "auto",
    "parallel_tool_calls": True, "reasoning": {"effort": "high", "summary": "auto"}, "store": False,
    "include": ["reasoning.encrypted_content"], "prompt_cache_key": "01a23304-e37b-7d70-a24d-2783e75bff08",
    "client_metadata": {"session_id": "01a23304-e37b-7d70-a24d-2783e75bff08", "turn_id": "01a23304-e39a-72a3-8304-989122b87a1c"}}
CODEX_TURN2_TAIL = [
    {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "I will write the file."}],
     "content": None, "encrypted_content": "ENC-OPAQUE-123"},
    {"type": "function_call", "status": "completed", "id": "fc_1", "name": "exec_command",
     "arguments": "{\"cmd\": \"printf hi > hello.txt\"}", "call_id": "call_abc"},
    {"type": "function_call_output", "id": "fco_01a23304-e488-73a0-9c05-5fb41a1fa3a7", "call_id": "call_abc",
     "output": "Chunk ID: ecc6b8\nWall time: 0.0000 seconds\nProcess exited with code 0\nOriginal token count: 0\nOutput:\n"}]
CODEX_TURN2 = dict(CODEX_TURN1, input=CODEX_INPUT + CODEX_TURN2_TAIL)

CLAUDE_CODEX_TOOLS = [
    {"name": "exec_command", "description": CODEX_EXEC_COMMAND["description"], "input_schema": CODEX_EXEC_COMMAND["parameters"]},
    {"name": "view_image", "description": CODEX_TOOLS[1]["description"], "input_schema": CODEX_TOOLS[1]["parameters"]},
    {"name": "multi_agent_v1__close_agent", "description": CODEX_TOOLS[2]["tools"][0]["description"],
     "input_schema": CODEX_TOOLS[2]["tools"][0]["parameters"]}]
CLAUDE_CODEX_SYSTEM = [{"type": "text", "text": CODEX_INPUT[0]["content"][0]["text"]},
                       {"type": "text", "text": CODEX_INPUT[1]["content"][0]["text"]},
                       {"type": "text", "text": CODEX_INPUT[1]["content"][1]["text"]}]
CLAUDE_CODEX_USER = {"role": "user", "content": [{"type": "text", "text": CODEX_INPUT[2]["content"][0]["text"]},
                                                 {"type": "text", "text": "create the file hello.txt with hi"}]}


def test_codex_turn1_exact():
    assert cp.responses_to_anthropic_request(CODEX_TURN1, "claude-sonnet-4-5", origin=ORIGIN) == {
        "model": "claude-sonnet-4-5", "messages": [CLAUDE_CODEX_USER], "max_tokens": 32768 + 1024,
        "system": CLAUDE_CODEX_SYSTEM, "stream": True, "tools": CLAUDE_CODEX_TOOLS, "tool_choice": {"type": "auto"},
        "thinking": {"type": "enabled", "budget_tokens": 32768}}
    assert cp.responses_tools(CODEX_TURN1)[1:] == ({
        "exec_command": {"type": "function", "name": "exec_command"},
        "view_image": {"type": "function", "name": "view_image"},
        "multi_agent_v1__close_agent": {"type": "function", "name": "close_agent", "namespace": "multi_agent_v1"}},
        ["web_search"])


def test_codex_turn2_exact_foreign_reasoning_dropped_and_thinking_off():
    """FX2's reasoning blob is another server's: dropped, so the tool turn has no signed thinking and
    thinking goes off for this request rather than failing at Anthropic."""
    assert cp.responses_to_anthropic_request(CODEX_TURN2, "claude-sonnet-4-5", origin=ORIGIN) == {
        "model": "claude-sonnet-4-5", "max_tokens": 8192, "system": CLAUDE_CODEX_SYSTEM, "stream": True,
        "tools": CLAUDE_CODEX_TOOLS, "tool_choice": {"type": "auto"}, "messages": [
            CLAUDE_CODEX_USER,
            {"role": "assistant", "content": [{"type": "tool_use", "id": "call_abc", "name": "exec_command",
                                               "input": {"cmd": "printf hi > hello.txt"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_abc",
                                          "content": CODEX_TURN2_TAIL[2]["output"]}]}]}


def test_codex_turn2_with_our_reasoning_keeps_thinking_before_the_tool_result():
    blob = cp.encode_reasoning(ORIGIN, [{"type": "thinking", "thinking": "I will write it.", "signature": "sig"}])
    tail = [dict(CODEX_TURN2_TAIL[0], encrypted_content=blob)] + CODEX_TURN2_TAIL[1:]
    body = cp.responses_to_anthropic_request(dict(CODEX_TURN1, input=CODEX_INPUT + tail), "claude-sonnet-4-5",
                                             origin=ORIGIN)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 32768}
    assert body["messages"][1]["content"][0] == {"type": "thinking", "thinking": "I will write it.", "signature": "sig"}
    assert [b["type"] for b in body["messages"][1]["content"]] == ["thinking", "tool_use"]
    other = cp.responses_to_anthropic_request(dict(CODEX_TURN1, input=CODEX_INPUT + tail), "claude-opus-4-5",
                                              origin="anthropic/claude-opus-4-5")
    assert "thinking" not in other and [b["type"] for b in other["messages"][1]["content"]] == ["tool_use"]


# Codex 0.171.0 with model slug gpt-5.5 (recorded through the proxy, trimmed): the freeform apply_patch
# custom tool, a client-run tool_search, text.verbosity, and its second turn replaying our reasoning item.
APPLY_PATCH_LARK = ("start: begin_patch hunk+ end_patch\nbegin_patch: \"*** Begin Patch\" LF\nend_patch: \"*** End Patch\" LF?\n\n"
                    "hunk: add_hunk | delete_hunk | update_hunk\nadd_hunk: \"*** Add File: \" filename LF add_line+\n%import common.LF\n")
CODEX_55_TOOLS = [
    CODEX_EXEC_COMMAND,
    {"type": "custom", "name": "apply_patch", "format": {"type": "grammar", "syntax": "lark", "definition": APPLY_PATCH_LARK},
     "description": "The `apply_patch` tool can be used to edit files. This is a FREEFORM tool, so do not wrap the patch in JSON."},
    {"type": "tool_search", "execution": "client", "description": "# Tool discovery\n\nSearches over deferred tool metadata.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"], "additionalProperties": False}},
    {"type": "web_search", "external_web_access": False}]
CODEX_55_PATCH = "*** Begin Patch\n*** Add File: hello.txt\n+hi\n*** End Patch\n"
CODEX_55_TURN2 = {
    "model": "gpt-5.5", "stream": True, "tools": CODEX_55_TOOLS, "tool_choice": "auto", "parallel_tool_calls": True,
    "reasoning": {"effort": "high"}, "store": False, "include": ["reasoning.encrypted_content"], "text": {"verbosity": "low"},
    "prompt_cache_key": "01a23346-228d-7141-b212-61838a51854e", "client_metadata": {"session_id": "01a23346"},
    "input": CODEX_INPUT + [
        {"type": "reasoning", "id": "rs_53243b9de65f63e5393a509d", "summary": [], "content": None,
         "encrypted_content": "cp1.eyJvIjoiYW50aHJvcGljL2dwdC01LjUiLCJiIjpbeyJ0eXBlIjoidGhpbmtpbmciLCJ0aGlua2luZyI6IlR1cm4g"
                              "MDogcGxhbi4iLCJzaWduYXR1cmUiOiJTSUctMCJ9XX0"},
        {"type": "custom_tool_call", "id": "ctc_f513203aaa83ed63e8295fc5", "call_id": "toolu_A", "name": "apply_patch",
         "input": CODEX_55_PATCH},
        {"type": "custom_tool_call_output", "id": "ctco_01a23346-2379-77c3-bd8f-f6d52420a930", "call_id": "toolu_A",
         "output": "Exit code: 0\nWall time: 0 seconds\nOutput:\nSuccess. Updated the following files:\nA hello.txt\n"}]}


def test_codex_gpt55_turn2_apply_patch_replayed_with_its_thinking():
    note = ("\n\nPass the tool's raw free-form input as the `input` string, exactly as the tool expects it. "
            "It must match this lark grammar:\n" + APPLY_PATCH_LARK)
    assert cp.responses_to_anthropic_request(CODEX_55_TURN2, "claude-sonnet-4-5", origin="anthropic/gpt-5.5") == {
        "model": "claude-sonnet-4-5", "max_tokens": 32768 + 1024, "system": CLAUDE_CODEX_SYSTEM, "stream": True,
        "thinking": {"type": "enabled", "budget_tokens": 32768}, "tool_choice": {"type": "auto"},
        "tools": [CLAUDE_CODEX_TOOLS[0], {"name": "apply_patch", "description": (CODEX_55_TOOLS[1]["description"] + note).strip(),
                                          "input_schema": CLAUDE_APPLY_PATCH["input_schema"]},
                  {"name": "tool_search", "description": CODEX_55_TOOLS[2]["description"],
                   "input_schema": CODEX_55_TOOLS[2]["parameters"]}],
        "messages": [
            CLAUDE_CODEX_USER,
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Turn 0: plan.", "signature": "SIG-0"},
                {"type": "tool_use", "id": "toolu_A", "name": "apply_patch", "input": {"input": CODEX_55_PATCH}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_A",
                                          "content": CODEX_55_TURN2["input"][-1]["output"]}]}]}
    assert cp.responses_tools(CODEX_55_TURN2)[1:] == ({
        "exec_command": {"type": "function", "name": "exec_command"}, "apply_patch": {"type": "custom", "name": "apply_patch"},
        "tool_search": {"type": "tool_search", "name": "tool_search"}}, ["web_search"])


@pytest.mark.skipif(not os.path.isdir(CODEX_FIXTURES), reason="shared fixtures absent")
@pytest.mark.parametrize("name", sorted(os.listdir(CODEX_FIXTURES)) if os.path.isdir(CODEX_FIXTURES) else ["none"])
def test_codex_fixture_requests_whole(name):
    with open(os.path.join(CODEX_FIXTURES, name), encoding="utf-8") as fh:
        body = json.load(fh)["body"]
    anthropic_body = cp.responses_to_anthropic_request(body, "claude-sonnet-4-5", origin=ORIGIN)
    tools, table, dropped = cp.responses_tools(body)
    assert dropped == ["web_search"] and anthropic_body["tools"] == tools and len(tools) == 12
    assert table["multi_agent_v1__spawn_agent"] == {"type": "function", "name": "spawn_agent", "namespace": "multi_agent_v1"}
    assert [m["role"] for m in anthropic_body["messages"]][0] == "user" and len(anthropic_body["system"]) == 3
    assert cp.anthropic_to_openai_request(anthropic_body, make_spec())["tools"][0]["function"]["name"] == "exec_command"


# Codex 0.171.0 with its default model gpt-6-astra (PROTOCOLS K; recorded against a local recorder,
# trimmed: descriptions and the developer prompt cut, 5 of 11 tools kept): no top-level `tools`, the
# first input item is `additional_tools` with three namespaces, `functions` holding the custom `exec`.
EXEC_LARK = ("\nstart: pragma_source | plain_source\npragma_source: PRAGMA_LINE NEWLINE SOURCE\nplain_source: SOURCE\n\n"
             "PRAGMA_LINE: /[ \\t]*\\/\\/ @exec:[^\\r\\n]*/\nNEWLINE: /\\r?\\n/\nSOURCE: /[\\s\\S]+/\n")
ASTRA_TOOLS_ITEM = {"type": "additional_tools", "id": "at_01a24f2f-121c-7610-8ab3-feb47845c2b0", "role": "developer", "tools": [
    {"type": "namespace", "name": "functions", "description": "", "tools": [
        {"type": "custom", "name": "exec", "description": "Run JavaScript code to orchestrate/compose tool calls",
         "format": {"type": "grammar", "syntax": "lark", "definition": EXEC_LARK}},
        {"type": "function", "name": "wait", "description": "Wait for a running exec cell.", "strict": False,
         "parameters": {"type": "object", "properties": {"cell_id": {"type": "string"}}, "required": ["cell_id"],
                        "additionalProperties": False}}]},
    {"type": "namespace", "name": "clock", "description": "Time.", "tools": [
        {"type": "function", "name": "sleep", "description": "Sleep.", "strict": False, "parameters": {
            "type": "object", "properties": {"duration_ms": {"type": "number"}}, "required": ["duration_ms"],
            "additionalProperties": False}}]},
    {"type": "namespace", "name": "collaboration", "description": "Agents.", "tools": [
        {"type": "function", "name": "list_agents", "description": "List agents.", "strict": False,
         "parameters": {"type": "object", "properties": {"path_prefix": {"type": "string"}}, "additionalProperties": False}},
        {"type": "function", "name": "send_message", "description": "Message an agent.", "strict": False, "parameters": {
            "type": "object", "properties": {"message": {"type": "string", "encrypted": True}, "target": {"type": "string"}},
            "required": ["message", "target"], "additionalProperties": False}}]}]}
ASTRA_TURN1 = {
    "model": "gpt-6-astra", "stream": True, "tool_choice": "auto", "parallel_tool_calls": False,
    "reasoning": {"effort": "low", "context": "all_turns"}, "store": False, "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "01a24f2f-11dd-7b12-89d6-9a9dba0ad9db", "text": {"verbosity": "low"},
    "client_metadata": {"session_id": "01a24f2f-11dd-7b12-89d6-9a9dba0ad9db"},
    "input": [ASTRA_TOOLS_ITEM,
              {"type": "message", "id": "msg_01a24f2f-121c-7610-8ab3-fecd0eed2866", "role": "developer",
               "content": [{"type": "input_text", "text": "You are Codex, an agent based on GPT-6."}]},
              {"type": "message", "id": "msg_01a24f2f-1229-78a2-97ef-2e51f2636c64", "role": "user",
               "content": [{"type": "input_text", "text": "create the file hello.txt with hi"}]}]}
ASTRA_EXEC_INPUT = "// @exec: write\nawait tools.exec_command({cmd: 'printf hi > hello.txt'})"
ASTRA_TURN2 = dict(ASTRA_TURN1, input=ASTRA_TURN1["input"] + [
    {"type": "custom_tool_call", "id": "ctc_1", "call_id": "toolu_0", "namespace": "functions", "name": "exec",
     "input": ASTRA_EXEC_INPUT},
    {"type": "custom_tool_call_output", "call_id": "toolu_0", "output": "exit 0"},
    ASTRA_TOOLS_ITEM])                              # a history can bring its tools again


def test_codex_default_model_sends_its_tools_in_an_additional_tools_item():
    anthropic_body = cp.responses_to_anthropic_request(ASTRA_TURN1, "claude-sonnet-4-5", origin=ORIGIN)
    exec_tool = ASTRA_TOOLS_ITEM["tools"][0]["tools"][0]
    assert [t["name"] for t in anthropic_body["tools"]] == [
        "functions__exec", "functions__wait", "clock__sleep", "collaboration__list_agents", "collaboration__send_message"]
    assert anthropic_body["tools"][0] == {
        "name": "functions__exec", "input_schema": CLAUDE_APPLY_PATCH["input_schema"],
        "description": (exec_tool["description"] + "\n\nPass the tool's raw free-form input as the `input` string, "
                        "exactly as the tool expects it. It must match this lark grammar:\n" + EXEC_LARK).strip()}
    assert anthropic_body["messages"] == [UT("create the file hello.txt with hi")]
    assert anthropic_body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    _, table, dropped = cp.responses_tools(ASTRA_TURN1)
    assert table["functions__exec"] == {"type": "custom", "name": "exec", "namespace": "functions"} and dropped == []
    events = responses_replay(anthropic_tool_events("functions__exec", json.dumps({"input": ASTRA_EXEC_INPUT})),
                              tools=table)
    check_responses_grammar(events)
    assert events[-1]["response"]["output"] == [{"id": "ctc_1", "type": "custom_tool_call", "call_id": "toolu_9",
                                                 "name": "exec", "input": ASTRA_EXEC_INPUT, "namespace": "functions"}]


def test_a_replayed_history_brings_its_additional_tools_once_and_the_call_back():
    notes = []
    anthropic_body = cp.responses_to_anthropic_request(ASTRA_TURN2, "claude-sonnet-4-5", origin=ORIGIN, notes=notes)
    assert len(anthropic_body["tools"]) == 5 and not [path for path, _ in notes if path.startswith("input")]
    assert anthropic_body["messages"][1:] == [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_0", "name": "functions__exec",
                                           "input": {"input": ASTRA_EXEC_INPUT}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_0", "content": "exit 0"}]}]
    changed = dict(ASTRA_TOOLS_ITEM, tools=[{"type": "function", "name": "sleep", "parameters": None}])
    later = cp.responses_tools(dict(ASTRA_TURN1, input=ASTRA_TURN1["input"] + [changed], tools=[FN]))[0]
    assert [t["name"] for t in later][:2] == ["get_weather", "functions__exec"] and later[-1]["name"] == "sleep"
    with pytest.raises(cp.BadRequest) as raised:
        cp.responses_tools(R(tools=[FN, FN]))
    assert raised.value.param == "tools.1"


TOOL_SEARCH = {"type": "tool_search", "execution": "client", "description": "Find tools.",
               "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}


def test_a_client_run_tool_search_is_a_tool_its_call_and_output_round_trip():
    body = R(tools=[TOOL_SEARCH, {"type": "tool_search"}], input=[
        {"role": "user", "content": "weather?"},
        {"type": "tool_search_call", "call_id": "call_s", "execution": "client", "arguments": {"query": "weather"},
         "status": "completed"},
        {"type": "tool_search_output", "call_id": "call_s", "execution": "client", "status": "completed",
         "tools": [FN, {"type": "namespace", "name": "ns", "description": "", "tools": [APPLY_PATCH]}]}])
    anthropic_body = cp.responses_to_anthropic_request(body, "claude-sonnet-4-5", origin=ORIGIN)
    assert [t["name"] for t in anthropic_body["tools"]] == ["tool_search", "get_weather", "ns__apply_patch"]
    assert anthropic_body["tools"][0] == {"name": "tool_search", "description": "Find tools.",
                                          "input_schema": TOOL_SEARCH["parameters"]}
    assert anthropic_body["messages"][1:] == [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_s", "name": "tool_search",
                                           "input": {"query": "weather"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_s",
                                      "content": "Tool loaded: get_weather\nTool loaded: ns__apply_patch"}]}]
    _, table, dropped = cp.responses_tools(body)
    assert dropped == ["tool_search"]                # the server-run one: OpenAI's own search
    events = responses_replay(anthropic_tool_events("tool_search", '{"query": "calendar"}'), tools=table)
    check_responses_grammar(events)
    assert events[-1]["response"]["output"] == [{"id": "ts_1", "type": "tool_search_call", "call_id": "toolu_9",
                                                 "execution": "client", "arguments": {"query": "calendar"},
                                                 "status": "completed"}]


def test_nothing_in_input_is_dropped_without_a_note():
    foreign = blob(THINK, origin="openai/gpt-5")
    body = R(input=[{"role": "user", "content": "hi"}, {"type": "reasoning", "id": "rs_1", "summary": [],
                                                         "encrypted_content": foreign},
                    {"type": "compaction", "encrypted_content": "opaque"},
                    {"type": "tool_search_call", "execution": "server", "arguments": {}},
                    {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search"}},
                    {"role": "assistant", "content": "ok"}])
    notes = []
    anthropic_body = cp.responses_to_anthropic_request(body, "claude-sonnet-4-5", origin=ORIGIN, notes=notes)
    assert [path for path, _ in notes] == ["input.1", "input.2", "input.3", "input.4"]
    assert "compaction" in notes[1][1] and "web_search_call" in notes[3][1]
    assert anthropic_body["messages"] == [UT("hi"), {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]


# ---- request conversion: table tests (PROTOCOLS G.2-G.4, G.9) -----------------------------------

def R(**fields):
    """A Responses body."""
    return dict({"model": "claude-sonnet-4-5"}, **fields)


def C(*messages, **fields):
    """The Anthropic body expected for it."""
    return dict({"model": "claude-sonnet-4-5", "messages": list(messages), "max_tokens": 8192}, **fields)


def UT(*texts):
    return {"role": "user", "content": [{"type": "text", "text": t} for t in texts]}


FN = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CLAUDE_FN = {"name": "get_weather", "input_schema": FN["parameters"]}
PNG_DATA = "iVBORw0KGgo="
PDF_DATA = base64.b64encode(b"%PDF-1.4 /Type /Page").decode()
APPLY_PATCH = {"type": "custom", "name": "apply_patch", "description": "Edit files.",
               "format": {"type": "grammar", "syntax": "lark", "definition": "start: patch"}}
CLAUDE_APPLY_PATCH = {"name": "apply_patch", "description": "Edit files.\n\nPass the tool's raw free-form input as the "
                      "`input` string, exactly as the tool expects it. It must match this lark grammar:\nstart: patch",
                      "input_schema": {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}}


def blob(*blocks, origin=ORIGIN):
    return cp.encode_reasoning(origin, list(blocks))


THINK = {"type": "thinking", "thinking": "Paris first.", "signature": "sig-1"}
REDACTED = {"type": "redacted_thinking", "data": "opaque"}
FCALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}
FCALL_USE = {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}

RESPONSES_CASES = [
    ("a string input is one user message", R(input="hi"), C(UT("hi"))),
    ("instructions, then developer and system messages, make the system prompt",
     R(instructions="Be brief.", input=[{"role": "developer", "content": "dev"}, {"role": "user", "content": "hi"},
                                        {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "sys"}]}]),
     C(UT("hi"), system=[{"type": "text", "text": t} for t in ("Be brief.", "dev", "sys")])),
    ("images by URL and data URL, a PDF_DATA by data and by URL",
     R(input=[{"role": "user", "content": [
         {"type": "input_text", "text": "look"}, {"type": "input_image", "detail": "auto", "image_url": "https://x/cat.png"},
         {"type": "input_image", "detail": "high", "image_url": "data:image/png;base64," + PNG_DATA},
         {"type": "input_file", "filename": "a.pdf", "file_data": "data:application/pdf;base64," + PDF_DATA},
         {"type": "input_file", "file_url": "https://x/b.pdf"}]}]),
     C({"role": "user", "content": [
         {"type": "text", "text": "look"}, {"type": "image", "source": {"type": "url", "url": "https://x/cat.png"}},
         {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_DATA}},
         {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_DATA}, "title": "a.pdf"},
         {"type": "document", "source": {"type": "url", "url": "https://x/b.pdf"}}]})),
    ("assistant replays: output_text and refusal parts, string content, phase ignored",
     R(input=[{"role": "user", "content": "hi"},
              {"type": "message", "id": "msg_9", "role": "assistant", "status": "completed", "phase": "final_answer",
               "content": [{"type": "output_text", "text": "Hello", "annotations": []}, {"type": "refusal", "refusal": "no"}]},
              {"role": "user", "content": "again"}, {"role": "assistant", "content": "Sure"}]),
     C(UT("hi"), {"role": "assistant", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "no"}]},
       UT("again"), {"role": "assistant", "content": [{"type": "text", "text": "Sure"}]})),
    ("function_call and its output, string and parts; a bad arguments string kept as _raw",
     R(tools=[FN], input=[{"role": "user", "content": "weather?"}, FCALL,
                          dict(FCALL, call_id="call_2", arguments="not json"),
                          {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                          {"type": "function_call_output", "call_id": "call_2", "output": [
                              {"type": "input_text", "text": "see"}, {"type": "input_image", "image_url": "https://x/m.png"}]}]),
     C(UT("weather?"), {"role": "assistant", "content": [
         FCALL_USE, {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"_raw": "not json"}}]},
       {"role": "user", "content": [
           {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
           {"type": "tool_result", "tool_use_id": "call_2", "content": [
               {"type": "text", "text": "see"}, {"type": "image", "source": {"type": "url", "url": "https://x/m.png"}}]}]},
       tools=[CLAUDE_FN])),
    ("a custom tool becomes one string argument; its call and output replay",
     R(tools=[APPLY_PATCH], input=[{"role": "user", "content": "fix"},
                                   {"type": "custom_tool_call", "call_id": "call_p", "name": "apply_patch", "input": "*** Begin Patch"},
                                   {"type": "custom_tool_call_output", "call_id": "call_p", "output": "Done!"}]),
     C(UT("fix"), {"role": "assistant", "content": [
         {"type": "tool_use", "id": "call_p", "name": "apply_patch", "input": {"input": "*** Begin Patch"}}]},
       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_p", "content": "Done!"}]},
       tools=[CLAUDE_APPLY_PATCH])),
    ("namespace tools flattened, a namespaced call too; built-ins dropped",
     R(tools=[{"type": "namespace", "name": "ns", "description": "d", "tools": [FN]}, {"type": "web_search"},
              {"type": "file_search", "vector_store_ids": ["v"]}, {"type": "local_shell"}],
       input=[{"role": "user", "content": "go"}, dict(FCALL, namespace="ns"),
              {"type": "function_call_output", "call_id": "call_1", "output": "ok"}]),
     C(UT("go"), {"role": "assistant", "content": [dict(FCALL_USE, name="ns__get_weather")]},
       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "ok"}]},
       tools=[dict(CLAUDE_FN, name="ns__get_weather")])),
    ("only built-in tools: no tools and no tool_choice", R(input="hi", tools=[{"type": "web_search"}], tool_choice="auto"),
     C(UT("hi"))),
    ("tool_choice required, parallel_tool_calls false, strict and description kept",
     R(input="hi", tools=[dict(FN, strict=True, description="Weather.")], tool_choice="required", parallel_tool_calls=False),
     C(UT("hi"), tools=[{"name": "get_weather", "description": "Weather.", "input_schema": FN["parameters"], "strict": True}],
       tool_choice={"type": "any", "disable_parallel_tool_use": True})),
    ("tool_choice none, a named function, a named namespaced one",
     R(input="hi", tools=[FN], tool_choice="none"), C(UT("hi"), tools=[CLAUDE_FN], tool_choice={"type": "none"})),
    ("tool_choice a named function", R(input="hi", tools=[FN], tool_choice={"type": "function", "name": "get_weather"}),
     C(UT("hi"), tools=[CLAUDE_FN], tool_choice={"type": "tool", "name": "get_weather"})),
    ("tool_choice allowed_tools narrows the tools",
     R(input="hi", tools=[FN, dict(FN, name="other")],
       tool_choice={"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "other"}]}),
     C(UT("hi"), tools=[dict(CLAUDE_FN, name="other")], tool_choice={"type": "any"})),
    ("reasoning effort on a budget model; summary changes nothing in the request",
     R(input="hi", reasoning={"effort": "medium", "summary": "detailed"}),
     C(UT("hi"), max_tokens=16384 + 1024, thinking={"type": "enabled", "budget_tokens": 16384})),
    ("reasoning effort none: no thinking", R(input="hi", reasoning={"effort": "none"}), C(UT("hi"))),
    ("reasoning on an adaptive model, sampling dropped there",
     dict(R(input="hi", reasoning={"effort": "xhigh"}, temperature=0.5), model="claude-opus-4-7"),
     dict(C(UT("hi"), thinking={"type": "adaptive"}, output_config={"effort": "xhigh"}), model="claude-opus-4-7")),
    ("replayed reasoning of ours: thinking and redacted blocks lead the tool turn",
     R(input=[{"role": "user", "content": "weather?"},
              {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": blob(THINK)},
              {"type": "reasoning", "id": "rs_2", "summary": [], "encrypted_content": blob(REDACTED)},
              FCALL, {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}],
       tools=[FN], reasoning={"effort": "low"}),
     C(UT("weather?"), {"role": "assistant", "content": [THINK, REDACTED, FCALL_USE]},
       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"}]},
       tools=[CLAUDE_FN], max_tokens=8192 + 1024, thinking={"type": "enabled", "budget_tokens": 8192})),
    ("reasoning from another model or not ours is dropped, and with it thinking for a tool turn",
     R(input=[{"role": "user", "content": "weather?"},
              {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": blob(THINK, origin="x/other")},
              {"type": "reasoning", "id": "rs_2", "summary": [], "encrypted_content": "gAAAAABo-openai"},
              {"type": "reasoning", "id": "rs_3", "summary": [], "encrypted_content": "cp1.!!!"},
              FCALL, {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}],
       tools=[FN], reasoning={"effort": "low"}),
     C(UT("weather?"), {"role": "assistant", "content": [FCALL_USE]},
       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"}]},
       tools=[CLAUDE_FN])),
    ("replayed thinking is removed when thinking is off (a thinking-only turn with it)",
     R(input=[{"role": "user", "content": "a"}, {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": blob(THINK)},
              {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
              {"type": "reasoning", "id": "rs_2", "summary": [], "encrypted_content": blob(THINK)},
              {"role": "user", "content": "d"}]),
     C(UT("a"), {"role": "assistant", "content": [{"type": "text", "text": "b"}]}, UT("c", "d"))),
    ("text.format json_schema made strict; verbosity dropped",
     R(input="hi", text={"format": {"type": "json_schema", "name": "a", "strict": True,
                                    "schema": {"type": "object", "properties": {"x": {"type": "string"}}}},
                         "verbosity": "low"}),
     C(UT("hi"), output_config={"format": {"type": "json_schema", "schema": {
         "type": "object", "properties": {"x": {"type": "string"}}, "additionalProperties": False}}})),
    ("text.format json_object asks in the system prompt",
     R(input="hi", instructions="I", text={"format": {"type": "json_object"}}),
     C(UT("hi"), system=[{"type": "text", "text": "I"}, {"type": "text", "text": cp.JSON_OBJECT_INSTRUCTION}])),
    ("max_output_tokens, temperature clamped (top_p then dropped: exclusive on Sonnet 4.5), safety_identifier, "
     "fields without a form dropped",
     R(input="hi", max_output_tokens=100, temperature=1.5, top_p=0.9, safety_identifier="u-1", metadata={"a": "b"},
       truncation="auto", service_tier="flex", store=True, prompt_cache_key="k", include=["message.output_text.logprobs"],
       background=False, stream_options={"include_obfuscation": False}, max_tool_calls=3, top_logprobs=2),
     C(UT("hi"), max_tokens=100, temperature=1.0, metadata={"user_id": "u-1"})),
    ("top_p alone, user as the metadata user_id", R(input="hi", top_p=0.9, user="u-2"),
     C(UT("hi"), top_p=0.9, metadata={"user_id": "u-2"})),
    ("unknown input item types are dropped; a first assistant turn gets a user placeholder",
     R(input=[{"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search"}},
              {"role": "assistant", "content": "earlier"}, {"role": "user", "content": "now"}]),
     C(UT(cp.PLACEHOLDER_FIRST_USER), {"role": "assistant", "content": [{"type": "text", "text": "earlier"}]}, UT("now"))),
]


@pytest.mark.parametrize("name, responses_body, anthropic_body", RESPONSES_CASES, ids=[c[0] for c in RESPONSES_CASES])
def test_responses_to_anthropic_request(name, responses_body, anthropic_body):
    before = copy.deepcopy(responses_body)
    assert cp.responses_to_anthropic_request(responses_body, responses_body["model"], origin=ORIGIN) == anthropic_body
    assert responses_body == before


@pytest.mark.parametrize("responses_body, param", [
    (R(input="hi", conversation="conv_1"), "conversation"),
    (R(input="hi", prompt={"id": "pmpt_1"}), "prompt"),
    (R(input=[{"role": "tool", "content": "x"}]), "input.0.role"),
    (R(input=[{"role": "user", "content": [{"type": "input_audio"}]}]), "input.0.content.0.type"),
    (R(input=[{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]), "input.0.content.0.file_id"),
    (R(input=[{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]), "input.0.content.0"),
    (R(input=[{"role": "developer", "content": [{"type": "input_image", "image_url": "https://x/a.png"}]}]), "input.0.content"),
    (R(input=[{"role": "user", "content": "hi"}, {"type": "function_call", "name": "f", "arguments": "{}"}]), "input.1.call_id"),
    (R(input=[{"type": "function_call_output", "output": "x"}]), "input.0.call_id"),
    (R(input="hi", tools=[{"type": "web_search"}], tool_choice={"type": "web_search_preview"}), "tool_choice.type"),
    (R(input="hi", tools=[FN], tool_choice={"type": "function", "name": "nope"}), "tool_choice.name"),
    (R(input="hi", tools=[FN, FN]), "tools.1"),
    (R(input="hi", tools=[{"type": "namespace", "name": "n", "tools": [{"type": "web_search"}]}]), "tools.0.tools.0"),
    (R(input="hi", text={"format": {"type": "yaml"}}), "text.format.type"),
    (R(input="hi", text={"format": {"type": "json_schema", "name": "x"}}), "text.format.schema"),
    (R(input="hi", max_output_tokens=0), "max_output_tokens"),
    (R(input=5), "input"),
    (R(input=[{"role": "system", "content": "only system"}]), "input"),
])
def test_responses_bad_requests_name_the_field(responses_body, param):
    with pytest.raises(BadRequest) as info:
        cp.responses_to_anthropic_request(responses_body, "claude-sonnet-4-5", origin=ORIGIN)
    assert info.value.param == param


def test_dropped_fields_each_leave_one_debug_line(caplog):
    caplog.set_level(logging.DEBUG, logger="claude_proxy")
    cp.responses_to_anthropic_request(R(input="hi", metadata={"a": "b"}, truncation="auto", client_metadata={},
                                        text={"verbosity": "high"}), "claude-sonnet-4-5")
    lines = [r.getMessage() for r in caplog.records]
    for field in ("'client_metadata'", "'metadata'", "'truncation'", "text.verbosity"):
        assert sum(field in line for line in lines) == 1, (field, lines)


def test_responses_on_a_chat_provider_compose_with_9a():
    body = R(input=[{"role": "user", "content": "weather?"},
                    {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": blob(THINK, origin="o/up-model")},
                    FCALL, {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}],
             instructions="Be brief.", tools=[FN, APPLY_PATCH], reasoning={"effort": "high"}, stream=True)
    spec = make_spec(replay_reasoning="reasoning_content")
    assert cp.responses_to_openai_request(body, spec, origin="o/up-model") == {
        "model": "up-model", "stream": True, "stream_options": {"include_usage": True}, "reasoning_effort": "high",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "weather?"},
                     {"role": "assistant", "content": None, "reasoning_content": "Paris first.", "tool_calls": [
                         {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": FN["parameters"]}},
                  {"type": "function", "function": {"name": "apply_patch", "parameters": CLAUDE_APPLY_PATCH["input_schema"],
                                                    "description": CLAUDE_APPLY_PATCH["description"]}}]}
    tool_turn = dict(body, input=body["input"][:1] + body["input"][2:])      # no reasoning replayed
    assert cp.responses_to_openai_request(tool_turn, spec, origin="o/up-model")["reasoning_effort"] == "high"
    no_effort = cp.responses_to_openai_request(dict(body, reasoning=None), spec, origin="o/up-model")
    assert "reasoning_effort" not in no_effort and no_effort["messages"][2]["reasoning_content"] == "Paris first."
    assert "max_tokens" not in cp.responses_to_openai_request(R(input="hi"), spec)
    assert cp.responses_to_openai_request(R(input="hi", max_output_tokens=50), spec)["max_tokens"] == 50


def test_reasoning_blob_round_trip_and_versioning():
    value = blob(THINK, REDACTED)
    assert value.startswith("cp1.") and "Paris" not in value
    assert cp.decode_reasoning(value, ORIGIN, "x") == [THINK, REDACTED]
    assert cp.decode_reasoning(value, "anthropic/claude-opus-4-5", "x") == []
    assert cp.decode_reasoning("cp1." + base64.urlsafe_b64encode(b'{"o":"%s","b":[{"type":"thinking"}]}'
                                                                  % ORIGIN.encode()).decode(), ORIGIN, "x") == []
    assert cp.decode_reasoning(None, ORIGIN, "x") == [] and cp.decode_reasoning("cp2.abc", ORIGIN, "x") == []


# ---- stream machine: the Responses grammar, event by event (PROTOCOLS G.6) --------------------

def counter_ids():
    """Deterministic item ids: msg_1, rs_2, fc_3 ..."""
    n = iter(range(1, 10 ** 6))
    return lambda prefix: f"{prefix}{next(n)}"


SHELL = cp.responses_shell({"model": "claude-sonnet-4-5"}, "resp_1", 1700000000)
CONTENT_EVENTS = {"response.content_part.added", "response.content_part.done", "response.output_text.delta",
                  "response.output_text.done", "response.output_text.annotation.added"}
SUMMARY_EVENTS = {"response.reasoning_summary_part.added", "response.reasoning_summary_text.delta",
                  "response.reasoning_summary_text.done", "response.reasoning_summary_part.done"}
CALL_EVENTS = {"response.function_call_arguments.delta": "function_call", "response.function_call_arguments.done": "function_call",
               "response.custom_tool_call_input.delta": "custom_tool_call", "response.custom_tool_call_input.done": "custom_tool_call"}


def _check_open_item_event(event, state):
    """One event about the open item: ids, indices, and the text it accumulates."""
    kind, item = event["type"], state["item"]
    assert event["item_id"] == item["id"] and event["output_index"] == state["index"]
    if kind in CONTENT_EVENTS:
        assert item["type"] == "message" and event["content_index"] == 0
        if kind == "response.content_part.added":
            assert event["part"] == {"type": "output_text", "text": "", "annotations": []} and not state["parts"]
            state["parts"] = 1
        else:
            assert state["parts"] == 1
        if kind == "response.output_text.delta":
            assert event["logprobs"] == [] and event["delta"]
            state["text"] += event["delta"]
        if kind == "response.output_text.done":
            assert event["text"] == state["text"] and event["logprobs"] == []
        if kind == "response.output_text.annotation.added":
            assert event["annotation_index"] == len(state["annotations"])
            state["annotations"].append(event["annotation"])
        if kind == "response.content_part.done":
            assert event["part"] == {"type": "output_text", "text": state["text"], "annotations": state["annotations"]}
    elif kind in SUMMARY_EVENTS:
        assert item["type"] == "reasoning" and event["summary_index"] == 0
        if kind == "response.reasoning_summary_part.added":
            assert event["part"] == {"type": "summary_text", "text": ""} and not state["parts"]
            state["parts"] = 1
        if kind == "response.reasoning_summary_text.delta":
            state["text"] += event["delta"]
        if kind == "response.reasoning_summary_text.done":
            assert event["text"] == state["text"]
        if kind == "response.reasoning_summary_part.done":
            assert event["part"] == {"type": "summary_text", "text": state["text"]}
    else:
        assert CALL_EVENTS[kind] == item["type"]
        if kind.endswith(".delta"):
            state["text"] += event["delta"]
        else:
            assert event.get("arguments", event.get("input")) == state["text"]


def _check_done_item(event, state):
    """output_item.done carries the complete item, with the identity it was added with."""
    added, done = state["item"], event["item"]
    assert event["output_index"] == state["index"]
    assert (done["type"], done.get("id"), done.get("call_id")) == (added["type"], added.get("id"), added.get("call_id"))
    if done["type"] == "message":
        assert done["content"] == [{"type": "output_text", "text": state["text"], "annotations": state["annotations"]}]
        assert done["status"] in ("completed", "incomplete") and done["role"] == "assistant"
    elif done["type"] == "reasoning":
        assert done["summary"] == ([{"type": "summary_text", "text": state["text"]}] if state["parts"] else [])
        assert done["encrypted_content"].startswith("cp1.")
    elif done["type"] == "function_call":
        assert done["arguments"] == state["text"] and done["status"] in ("completed", "incomplete")
        assert done["call_id"] and done["name"]
    elif done["type"] == "tool_search_call":            # no delta events: the arguments come whole
        assert state["text"] == "" and isinstance(done["arguments"], dict) and done["execution"] == "client"
        assert done["call_id"] and done["status"] in ("completed", "incomplete")
    else:
        assert done["input"] == state["text"] and done["call_id"] and done["name"]


def check_responses_grammar(events):
    """Assert the Responses stream grammar (G.6) and what the openai SDK and Codex need; the final response."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    rid = events[0]["response"]["id"]
    assert events[0]["response"]["output"] == [] and events[0]["response"]["status"] == "in_progress"
    terminal = events[-1]
    assert terminal["type"] in ("response.completed", "response.incomplete", "response.failed")
    assert sum(e["type"].split(".")[-1] in ("completed", "incomplete", "failed") and e["type"].count(".") == 1
               for e in events) == 1
    done_items, state = [], None
    for event in events[2:-1]:
        kind = event["type"]
        assert kind.startswith("response.") and kind not in ("response.created", "response.in_progress")
        if kind == "response.output_item.added":
            assert state is None and event["output_index"] == len(done_items)
            item = event["item"]
            assert item["type"] in ("message", "reasoning", "function_call", "custom_tool_call", "tool_search_call")
            assert item["id"] and item.get("content", []) == [] and item.get("input", "") == ""
            assert item.get("arguments", "") == ("" if item["type"] != "tool_search_call" else {})
            assert item.get("status", "in_progress") == "in_progress" and item.get("summary", []) == []
            state = {"item": item, "index": event["output_index"], "text": "", "parts": 0, "annotations": []}
        elif kind == "response.output_item.done":
            assert state is not None
            _check_done_item(event, state)
            done_items.append(event["item"])
            state = None
        else:
            assert state is not None, kind
            _check_open_item_event(event, state)
    response = terminal["response"]
    assert response["id"] == rid and response["object"] == "response"
    assert response["status"] == terminal["type"].split(".")[1]
    if response["status"] != "failed":
        assert state is None and response["output"] == done_items
    usage = response["usage"]
    assert all(isinstance(usage[k], int) for k in ("input_tokens", "output_tokens", "total_tokens"))
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert isinstance(usage["input_tokens_details"]["cached_tokens"], int)
    assert isinstance(usage["output_tokens_details"]["reasoning_tokens"], int)
    return response


def responses_replay(anthropic_events, **kw):
    """Feed Anthropic events through a fresh machine (deterministic ids) and close it."""
    kw.setdefault("origin", ORIGIN)
    machine = cp.AnthropicToResponsesStream(SHELL, ids=counter_ids(), **kw)
    out = []
    for event in anthropic_events:
        out += machine.feed(event)
    return out + machine.close()


INLINE_ANTHROPIC = {"text": TEXT_BASIC, "tool_use": TOOL_USE, "truncated": TRUNCATED_TOOL_JSON,
                    "thinking": THINKING_SIGNATURE, "redacted": REDACTED_THINKING, "citations": WEB_SEARCH_CITATIONS}


@pytest.mark.parametrize("name", sorted(INLINE_ANTHROPIC))
@pytest.mark.parametrize("summaries", [True, False])
def test_recorded_claude_streams_follow_the_responses_grammar(name, summaries):
    check_responses_grammar(responses_replay(anthropic_sse_payloads(INLINE_ANTHROPIC[name]), summaries=summaries))


def test_text_stream_exact():
    events = responses_replay(anthropic_sse_payloads(TEXT_BASIC))
    message = {"id": "msg_1", "type": "message", "status": "in_progress", "content": [], "role": "assistant"}
    part = {"type": "output_text", "text": "2", "annotations": []}
    usage = {"input_tokens": 20, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
             "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 25}
    done = dict(message, status="completed", content=[part])
    at = {"item_id": "msg_1", "output_index": 0}
    assert events == [
        {"type": "response.created", "sequence_number": 0, "response": SHELL},
        {"type": "response.in_progress", "sequence_number": 1, "response": SHELL},
        {"type": "response.output_item.added", "sequence_number": 2, "output_index": 0, "item": message},
        dict(type="response.content_part.added", sequence_number=3, **at, content_index=0, part=dict(part, text="")),
        dict(type="response.output_text.delta", sequence_number=4, **at, content_index=0, delta="2", logprobs=[]),
        dict(type="response.output_text.done", sequence_number=5, **at, content_index=0, text="2", logprobs=[]),
        dict(type="response.content_part.done", sequence_number=6, **at, content_index=0, part=part),
        {"type": "response.output_item.done", "sequence_number": 7, "output_index": 0, "item": done},
        {"type": "response.completed", "sequence_number": 8,
         "response": dict(SHELL, status="completed", output=[done], usage=usage, incomplete_details=None)}]


def test_tool_use_truncation_and_citations():
    tool = check_responses_grammar(responses_replay(anthropic_sse_payloads(TOOL_USE)))
    assert tool["status"] == "completed" and tool["output"][1] == {
        "id": "fc_2", "type": "function_call", "status": "completed", "arguments": "{\"location\": \"Paris\"}",
        "call_id": "toolu_01NRLabsLyVHZPKxbKvkfSMn", "name": "get_weather"}
    cut = check_responses_grammar(responses_replay(anthropic_sse_payloads(TRUNCATED_TOOL_JSON)))
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [i["status"] for i in cut["output"]] == ["completed", "incomplete"]
    cited = check_responses_grammar(responses_replay(anthropic_sse_payloads(WEB_SEARCH_CITATIONS)))
    (message,) = [i for i in cited["output"] if i["type"] == "message"]
    text = message["content"][0]["text"]
    (annotation,) = message["content"][0]["annotations"]
    assert text == "Based on the search results, I can seetoday (September 16) shows a high of 76°F and low of 59°F"
    assert annotation == {"type": "url_citation", "start_index": 38, "end_index": len(text), "title":
                          "San Francisco, CA Monthly Weather | AccuWeather",
                          "url": "https://www.accuweather.com/en/us/san-francisco/94103/september-weather/347629"}


def test_thinking_becomes_reasoning_that_replays_as_the_same_blocks():
    reasoning = [i for text in (THINKING_SIGNATURE, REDACTED_THINKING)
                 for i in responses_replay(anthropic_sse_payloads(text))[-1]["response"]["output"] if i["type"] == "reasoning"]
    assert reasoning[0]["summary"] == [{"type": "summary_text", "text": "This is a straightforward question about pedest accidents."}]
    replayed = cp.responses_to_anthropic_request(R(input=[{"role": "user", "content": "q"}] + reasoning), "claude-sonnet-4-5",
                                                 origin=ORIGIN, variant_effort="low")
    assert replayed["messages"][1]["content"] == [
        {"type": "thinking", "thinking": "This is a straightforward question about pedest accidents.",
         "signature": "EvMCCkYICxgCKkCHP2cS..."},
        {"type": "redacted_thinking", "data": "EqkECkYIBxgCKkA8AZ4n..."},
        {"type": "redacted_thinking", "data": "EtgBCkYIBxgCKkDQfGkw..."}]
    hidden = responses_replay(anthropic_sse_payloads(THINKING_SIGNATURE), summaries=False)[-1]["response"]
    assert hidden["output"][0]["summary"] == [] and hidden["output"][0]["encrypted_content"] == reasoning[0]["encrypted_content"]


def anthropic_tool_events(name, partial_json, block_id="toolu_9"):
    """A small Anthropic answer that calls one tool."""
    message = {"id": "msg_9", "type": "message", "role": "assistant", "model": "m", "content": [
        {"type": "tool_use", "id": block_id, "name": name, "input": json.loads(partial_json)}],
        "stop_reason": "tool_use", "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 2}}
    return cp.anthropic_message_as_events(message)


def test_custom_and_namespaced_calls_map_back_to_the_client_tools():
    _, table, _ = cp.responses_tools(R(tools=[APPLY_PATCH, {"type": "namespace", "name": "ns", "tools": [FN]}]))
    patch = "*** Begin Patch\n*** Add File: a.txt\n+hi\n*** End Patch"
    custom = responses_replay(anthropic_tool_events("apply_patch", json.dumps({"input": patch})), tools=table)
    check_responses_grammar(custom)
    assert custom[-1]["response"]["output"] == [
        {"id": "ctc_1", "type": "custom_tool_call", "call_id": "toolu_9", "name": "apply_patch", "input": patch}]
    spaced = responses_replay(anthropic_tool_events("ns__get_weather", "{}"), tools=table)
    check_responses_grammar(spaced)
    assert spaced[-1]["response"]["output"] == [
        {"id": "fc_1", "type": "function_call", "status": "completed", "arguments": "{}", "call_id": "toolu_9",
         "name": "get_weather", "namespace": "ns"}]


@pytest.mark.parametrize("first", [[], ["message_start"]])
def test_failures_end_with_one_response_failed(first):
    events = anthropic_sse_payloads(TOOL_USE)[:6 if first else 0]
    events.append({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    out = responses_replay(events + [anthropic_sse_payloads(TEXT_BASIC)[1]])
    response = check_responses_grammar(out)
    assert response["status"] == "failed" and response["error"] == {"code": "server_is_overloaded", "message": "Overloaded"}
    machine = cp.AnthropicToResponsesStream(SHELL)
    failed = machine.fail("prompt is too long: 300000 tokens", "invalid_request_error")
    assert [e["type"] for e in failed] == ["response.created", "response.in_progress", "response.failed"]
    assert failed[-1]["response"]["error"]["code"] == "context_length_exceeded"
    assert machine.fail("again") == [] and machine.close() == [] and machine.feed({"type": "message_stop"}) == []


def test_no_stop_reason_is_not_a_finish():
    machine = cp.AnthropicToResponsesStream(SHELL)
    for event in anthropic_sse_payloads(TEXT_BASIC)[:4]:
        machine.feed(event)
    assert not machine.saw_finish and not machine.finished


@pytest.mark.parametrize("name", sorted(set(INLINE_ANTHROPIC) - {"truncated"}))   # a cut tool input folds to {}
def test_non_stream_response_is_the_fold_of_the_stream(name):
    events = anthropic_sse_payloads(INLINE_ANTHROPIC[name])
    streamed = responses_replay(events)[-1]["response"]
    message = fold_anthropic_events(events)
    machine = cp.AnthropicToResponsesStream(SHELL, origin=ORIGIN, ids=counter_ids())
    folded = cp.anthropic_to_responses_response(message, machine)
    assert folded == streamed == cp.fold_responses_events(responses_replay(events))


@pytest.mark.parametrize("name", sorted(INLINE_ANTHROPIC))
def test_same_responses_events_whole_and_byte_by_byte(name):
    raw = INLINE_ANTHROPIC[name].encode()
    whole = responses_replay(anthropic_sse_payloads(INLINE_ANTHROPIC[name]))
    decoder, machine, out = cp.SSEDecoder(), cp.AnthropicToResponsesStream(SHELL, origin=ORIGIN, ids=counter_ids()), []
    for i in range(len(raw)):
        out += cp.feed_events(machine, decoder.feed(raw[i:i + 1]))
    out += cp.feed_events(machine, decoder.close()) + machine.close()
    assert out == whole


def test_fold_of_a_failed_stream_raises():
    with pytest.raises(UpstreamError):
        cp.fold_responses_events(responses_replay([{"type": "error", "error": {"type": "api_error", "message": "x"}}]))
    with pytest.raises(UpstreamError):
        cp.fold_responses_events([])


def test_chat_provider_stream_through_both_machines():
    machine = cp.AnthropicToResponsesStream(SHELL, origin="o/up", ids=counter_ids())
    chained = cp.ChainedStream(OpenAIToAnthropicStream("m", message_id="msg_x"), machine)
    out = []
    for chunk in sse_chunks(OPENAI_PARALLEL_TOOLS):
        out += chained.feed(chunk)
    out += chained.feed("[DONE]") + chained.close()
    response = check_responses_grammar(out)
    assert [i["type"] for i in response["output"]] == ["function_call", "function_call"]
    assert all(json.loads(i["arguments"]) for i in response["output"]) and chained.finished and chained.saw_finish


FIXTURE_STREAMS = sorted(glob.glob(os.path.join(FIXTURES, "anthropic_stream_*.sse")))


@pytest.mark.skipif(not FIXTURE_STREAMS, reason="shared fixtures absent")
@pytest.mark.parametrize("path", FIXTURE_STREAMS or ["none"], ids=os.path.basename)
def test_every_recorded_claude_stream_is_grammatical_as_responses(path):
    with open(path, encoding="utf-8") as fh:
        events = anthropic_sse_payloads(fh.read())
    response = check_responses_grammar(responses_replay(events))
    if "truncated" not in path:         # a cut tool input folds to {}
        assert response == cp.anthropic_to_responses_response(
            fold_anthropic_events(events), cp.AnthropicToResponsesStream(SHELL, origin=ORIGIN, ids=counter_ids()))


# =============================================================================================
# 10. OAuth
# =============================================================================================

SETTINGS = cp.oauth_settings({})
T0 = 1_800_000_000.0
POSIX = os.name == "posix"


class FakeClock:
    """A settable clock."""
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeTokenEndpoint:
    """A scripted post_json: records (url, body) and answers (status, body) after `delay` s."""
    def __init__(self, answers=None, delay: float = 0.0, calls=None):
        self.answers = list(answers or [])
        self.delay = delay
        self.calls = [] if calls is None else calls

    async def __call__(self, url, body):
        self.calls.append((url, copy.deepcopy(body)))
        await asyncio.sleep(self.delay)
        if self.answers:
            return self.answers.pop(0)
        n = len(self.calls)
        return 200, {"access_token": f"sk-ant-oat01-new{n}", "refresh_token": f"sk-ant-ort01-new{n}",
                     "expires_in": 28800, "token_type": "Bearer", "scope": "user:profile user:inference"}


def saved_record(expires_at=T0 + 3600, refresh="sk-ant-ort01-old", access="sk-ant-oat01-old"):
    return {"access_token": access, "refresh_token": refresh, "expires_at": expires_at,
            "scope": "user:profile user:inference", "account": None, "source": "login"}


# ---- settings -----------------------------------------------------------------------------

def test_settings_merge_and_reject_unknown():
    merged = cp.oauth_settings({"token_url": "https://console.anthropic.com/v1/oauth/token"})
    assert merged == {**OAUTH_DEFAULTS, "token_url": "https://console.anthropic.com/v1/oauth/token"}
    with pytest.raises(BadRequest) as err:
        cp.oauth_settings({"tokenurl": "x"})
    assert err.value.param == "oauth.tokenurl"


CLI_TOKEN = "sk-ant-oat01-" + "c" * 30


@pytest.mark.parametrize("argv, environ, expected", [
    ([], {}, None),
    (["--token", CLI_TOKEN], {"ANTHROPIC_OAUTH_TOKEN": "a", "CLAUDE_CODE_OAUTH_TOKEN": "c"}, CLI_TOKEN),
    (["serve", "--token", CLI_TOKEN], {}, CLI_TOKEN),
    (["--headless", "--token", CLI_TOKEN], {}, CLI_TOKEN),
    ([], {"ANTHROPIC_OAUTH_TOKEN": "a", "CLAUDE_CODE_OAUTH_TOKEN": "c"}, "a"),
    ([], {"CLAUDE_CODE_OAUTH_TOKEN": " c \n"}, "c"),
    ([], {"ANTHROPIC_OAUTH_TOKEN": ""}, None),
    (["login", "--token", CLI_TOKEN], {}, None),
])
def test_explicit_token_precedence(argv, environ, expected):
    args = cp.build_parser().parse_args(argv)
    overrides = cp.cli_overrides(args, cp.resolve_command(args))
    config = cp.parse_config(cp.merge_raw(cp.env_layer(environ), overrides), environ)
    assert config.settings["oauth_token"] == expected


# ---- PKCE, authorize URL, pasted code -----------------------------------------------------

def test_pkce_rfc7636_appendix_b():
    assert cp.pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == \
        "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_new_pkce_shape():
    verifier, challenge = cp.new_pkce()
    assert len(verifier) == 43 and "=" not in verifier and "=" not in challenge
    assert challenge == cp.pkce_challenge(verifier)
    assert cp.new_pkce()[0] != verifier


def test_authorize_url_order_and_values():
    url = cp.build_authorize_url(SETTINGS, "CHAL", "STATE")
    base, _, query = url.partition("?")
    assert base == "https://claude.com/cai/oauth/authorize"
    assert urllib.parse.parse_qsl(query) == [
        ("code", "true"), ("client_id", "9d1c250a-e61b-44d9-88ed-5944d1962f5e"),
        ("response_type", "code"), ("redirect_uri", "https://platform.claude.com/oauth/code/callback"),
        ("scope", "user:profile user:inference"), ("code_challenge", "CHAL"),
        ("code_challenge_method", "S256"), ("state", "STATE")]
    assert "scope=user%3Aprofile%20user%3Ainference" in query


def test_login_flow_long_lived_scope_and_challenge():
    flow = LoginFlow(SETTINGS, long_lived=True, verifier="dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk", state="s1")
    query = dict(urllib.parse.parse_qsl(flow.authorize_url(SETTINGS).partition("?")[2]))
    assert query["scope"] == "user:inference"
    assert query["code_challenge"] == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    assert query["state"] == "s1"
    fresh = LoginFlow(SETTINGS)
    assert len(fresh.state) == 43 and fresh.state != fresh.verifier and fresh.scope == SETTINGS["scope"]


@pytest.mark.parametrize("pasted, code", [
    ("abc123#st", "abc123"),
    ("  abc123#st \n", "abc123"),
    ("abc123", "abc123"),
    ("abc123#", "abc123"),
    ("https://platform.claude.com/oauth/code/callback?code=abc123&state=st", "abc123"),
    ("https://console.anthropic.com/oauth/code/callback?code=abc123", "abc123"),
    ("?code=abc123&state=st", "abc123"),
])
def test_parse_pasted_code(pasted, code):
    assert cp.parse_pasted_code(pasted, "st") == code


@pytest.mark.parametrize("pasted, words", [
    ("abc123#other", "state mismatch"),
    ("https://platform.claude.com/oauth/code/callback?code=abc&state=other", "state mismatch"),
    ("", "no authorization code"),
    ("#st", "no authorization code"),
    ("https://platform.claude.com/oauth/code/callback?error=access_denied&state=st", "access_denied"),
])
def test_parse_pasted_code_rejects(pasted, words):
    with pytest.raises(BadRequest) as err:
        cp.parse_pasted_code(pasted, "st")
    assert words in err.value.message


# ---- token endpoint -----------------------------------------------------------------------

def test_exchange_code_body_and_record():
    endpoint = FakeTokenEndpoint([(200, {"access_token": "sk-ant-oat01-a", "refresh_token": "sk-ant-ort01-r",
                                         "expires_in": 28800, "scope": "user:profile user:inference",
                                         "account": {"uuid": "u1", "email_address": "me@example.com"}})])
    flow = LoginFlow(SETTINGS, verifier="VER", state="STATE")
    record = asyncio.run(cp.exchange_code(SETTINGS, "CODE", flow, endpoint, FakeClock()))
    assert endpoint.calls == [("https://platform.claude.com/v1/oauth/token", {
        "grant_type": "authorization_code", "code": "CODE", "state": "STATE",
        "client_id": "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
        "redirect_uri": "https://platform.claude.com/oauth/code/callback", "code_verifier": "VER"})]
    assert record == {"access_token": "sk-ant-oat01-a", "refresh_token": "sk-ant-ort01-r",
                      "expires_at": T0 + 28800, "scope": "user:profile user:inference",
                      "account": {"email": "me@example.com", "uuid": "u1"}, "source": "login"}


def test_exchange_code_long_lived():
    endpoint = FakeTokenEndpoint([(200, {"access_token": "sk-ant-oat01-y", "expires_in": 31536000,
                                         "scope": "user:inference"})])
    flow = LoginFlow(SETTINGS, long_lived=True, verifier="VER", state="STATE")
    record = asyncio.run(cp.exchange_code(SETTINGS, "CODE", flow, endpoint, FakeClock()))
    assert endpoint.calls[0][1] == {
        "grant_type": "authorization_code", "code": "CODE", "state": "STATE",
        "client_id": SETTINGS["client_id"], "redirect_uri": SETTINGS["redirect_uri"],
        "code_verifier": "VER", "expires_in": 31536000}
    assert record == {"access_token": "sk-ant-oat01-y", "refresh_token": None, "expires_at": T0 + 31536000,
                      "scope": "user:inference", "account": None, "source": "long_lived"}


@pytest.mark.parametrize("answer, kind, words", [
    ((400, {"error": "invalid_grant", "error_description": "Code has expired or been used"}),
     AuthError, "claude_proxy.py login"),
    ((401, {"type": "error", "error": {"type": "authentication_error", "message": "nope"}}),
     AuthError, "nope"),
    ((403, None), UpstreamError, "Cloudflare"),
    ((502, {"error": "bad_gateway"}), UpstreamError, "502"),
    ((200, {"token_type": "Bearer"}), UpstreamError, "200"),
    ((429, {"error": "rate_limited"}), UpstreamError, "rate limited"),
])
def test_exchange_code_errors(answer, kind, words):
    flow = LoginFlow(SETTINGS, verifier="VER", state="STATE")
    with pytest.raises(kind) as err:
        asyncio.run(cp.exchange_code(SETTINGS, "CODE", flow, FakeTokenEndpoint([answer]), FakeClock()))
    assert words in err.value.message and "VER" not in err.value.message and "CODE" not in err.value.message


# ---- token store and lock -----------------------------------------------------------------

def test_store_round_trip_modes_and_atomic(tmp_path):
    path = tmp_path / "state" / "token.json"
    store = TokenStore(str(path), clock=FakeClock())
    assert store.load() is None
    store.save(saved_record())
    store.save(saved_record(access="sk-ant-oat01-second"))
    assert store.load() == saved_record(access="sk-ant-oat01-second")
    assert os.listdir(path.parent) == ["token.json"]          # no temp files left behind
    assert json.loads(path.read_text())["saved_at"] == T0
    if POSIX:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    store.clear()
    store.clear()
    assert store.load() is None and not path.exists()


def test_store_ignores_garbage(tmp_path):
    path = tmp_path / "token.json"
    path.write_text("{not json")
    assert TokenStore(str(path)).load() is None
    path.write_text('{"token": {"refresh_token": "x"}}')
    assert TokenStore(str(path)).load() is None


def test_file_lock_excludes_and_a_dead_holder_leaves_no_stale_lock(tmp_path):
    lock_path = str(tmp_path / "x.lock")
    order = []

    async def hold(name, delay):
        async with FileLock(lock_path, poll=0.01):
            order.append(name + "-in")
            await asyncio.sleep(delay)
            order.append(name + "-out")

    async def main():
        await asyncio.gather(hold("a", 0.05), hold("b", 0.0))

    asyncio.run(main())
    assert order in (["a-in", "a-out", "b-in", "b-out"], ["b-in", "b-out", "a-in", "a-out"])
    with open(lock_path, "w") as f:                  # a crashed holder's leftover file: no lock in it
        f.write("99999")
    os.utime(lock_path, (0, 0))
    asyncio.run(hold("c", 0.0))
    assert order[-2:] == ["c-in", "c-out"]


HOLD_LOCK = """
import asyncio, sys, time
import claude_proxy as cp
async def main():
    async with cp.FileLock(sys.argv[1]):
        print("held", flush=True)
        await asyncio.sleep(float(sys.argv[2]))
asyncio.run(main())
"""


def test_file_lock_held_by_a_live_slow_process_is_never_broken_and_the_wait_is_bounded(tmp_path):
    lock_path = str(tmp_path / "x.lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, lock_path, "3"], cwd=HERE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.utime(lock_path, (0, 0))                   # looks ancient: a mtime rule would break it

        async def wait(timeout):
            async with FileLock(lock_path, timeout=timeout, poll=0.01):
                return time.monotonic()
        with pytest.raises(UpstreamError, match="another claude_proxy process"):
            asyncio.run(wait(0.3))
        started = time.monotonic()
        acquired = asyncio.run(wait(30))
        assert acquired - started > 1.0 and holder.wait(10) == 0        # only once the holder let go
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(not POSIX, reason="symlinks")
def test_symlinks_at_the_token_and_lock_paths_are_refused(tmp_path, caplog):
    secret = tmp_path / "elsewhere.json"
    secret.write_text(json.dumps({"token": saved_record()}))
    store_path = tmp_path / "home" / "oauth_token.json"
    store_path.parent.mkdir()
    os.symlink(str(secret), str(store_path))
    with caplog.at_level(logging.WARNING, logger="claude_proxy"):
        assert TokenStore(str(store_path)).load() is None
    assert "symbolic link" in caplog.text
    lock_path = tmp_path / "home" / "oauth_token.json.lock"
    os.symlink(str(tmp_path / "missing"), str(lock_path))        # dangling: used to wait forever

    async def take():
        async with FileLock(str(lock_path), timeout=1):
            pass
    with pytest.raises(PermissionError, match="symbolic link"):
        asyncio.run(asyncio.wait_for(take(), 5))
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(not POSIX, reason="modes")
def test_loose_state_directory_is_tightened(tmp_path, caplog):
    home = tmp_path / "home"
    home.mkdir()
    os.chmod(str(home), 0o777)
    with caplog.at_level(logging.WARNING, logger="claude_proxy"):
        TokenStore(str(home / "oauth_token.json")).save(saved_record())
    assert stat.S_IMODE(os.stat(str(home)).st_mode) == 0o700 and "tightened" in caplog.text


def test_token_file_in_another_shape_is_named_in_a_warning(tmp_path, caplog):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"access_token": "sk-ant-oat01-x", "refresh_token": "r", "expires_at": 1}))
    store = TokenStore(str(path))
    with caplog.at_level(logging.WARNING, logger="claude_proxy"):
        assert [store.load(), store.load(), store.load()] == [None, None, None]     # read on every look...
    assert caplog.text.count("not in claude_proxy's shape") == 1 and "import" in caplog.text   # ...said once
    store.save(saved_record())
    assert store.load() is not None
    path.write_text("{")
    with caplog.at_level(logging.WARNING, logger="claude_proxy"):
        assert store.load() is None and store.load() is None
    assert caplog.text.count("is unreadable") == 1


def test_a_token_file_in_another_shape_is_said_once_per_start(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "oauth_token.json").write_text(json.dumps({"access_token": "sk-ant-oat01-elsewhere"}))

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as claude:
            async with proxy_process(tmp_path, ["--port", str(free_port())], {"ANTHROPIC_UPSTREAM_URL": claude.url}) as (port, lines):
                for _ in range(3):
                    assert (await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS))[0] == 200
        return lines
    lines = run(scenario())
    assert sum("not in claude_proxy's shape" in line for line in lines) == 1, lines


# ---- token manager ------------------------------------------------------------------------

def make_manager(tmp_path, record=None, endpoint=None, clock=None, **kwargs):
    store = TokenStore(str(tmp_path / "token.json"))
    if record is not None:
        store.save(record)
    endpoint = endpoint or FakeTokenEndpoint()
    clock = clock or FakeClock()
    return TokenManager(store, SETTINGS, endpoint, clock=clock, **kwargs), endpoint, clock


def test_refresh_five_minutes_early_not_earlier(tmp_path):
    manager, endpoint, clock = make_manager(tmp_path, saved_record(expires_at=T0 + 3600))
    clock.now = T0 + 3600 - 301
    assert asyncio.run(manager.access_token()) == "sk-ant-oat01-old"
    assert endpoint.calls == []
    clock.now = T0 + 3600 - 299
    assert asyncio.run(manager.access_token()) == "sk-ant-oat01-new1"
    assert endpoint.calls == [(SETTINGS["token_url"], {"grant_type": "refresh_token",
                                                       "refresh_token": "sk-ant-ort01-old",
                                                       "client_id": SETTINGS["client_id"]})]
    assert manager.store.load() == {**saved_record(), "access_token": "sk-ant-oat01-new1",
                                    "refresh_token": "sk-ant-ort01-new1", "expires_at": clock.now + 28800}


def test_refresh_keeps_old_refresh_token_when_omitted(tmp_path):
    endpoint = FakeTokenEndpoint([(200, {"access_token": "sk-ant-oat01-n", "expires_in": 100})])
    manager, _, _ = make_manager(tmp_path, saved_record(expires_at=T0), endpoint)
    assert asyncio.run(manager.access_token()) == "sk-ant-oat01-n"
    assert manager.store.load()["refresh_token"] == "sk-ant-ort01-old"


def test_twelve_concurrent_callers_one_refresh(tmp_path):
    manager, endpoint, _ = make_manager(tmp_path, saved_record(expires_at=T0 - 10),
                                        FakeTokenEndpoint(delay=0.1))

    async def main():
        return await asyncio.gather(*(manager.access_token() for _ in range(12)))

    assert asyncio.run(main()) == ["sk-ant-oat01-new1"] * 12
    assert len(endpoint.calls) == 1


def test_two_processes_one_refresh(tmp_path):
    calls = []
    store_path = tmp_path / "token.json"
    TokenStore(str(store_path)).save(saved_record(expires_at=T0 - 10))
    managers = [TokenManager(TokenStore(str(store_path)), SETTINGS,
                             FakeTokenEndpoint(delay=0.1, calls=calls), clock=FakeClock())
                for _ in range(2)]

    async def main():
        return await asyncio.gather(*(m.access_token() for m in managers for _ in range(3)))

    assert asyncio.run(main()) == ["sk-ant-oat01-new1"] * 6
    assert len(calls) == 1


SLOW_REFRESH = """
import asyncio, json, sys
import claude_proxy as cp
async def post(url, body):
    print("posting", body["refresh_token"], flush=True)
    await asyncio.sleep(float(sys.argv[2]))
    return 200, {"access_token": "sk-ant-oat01-from-slow", "refresh_token": "sk-ant-ort01-rotated",
                 "expires_in": 28800}
async def main():
    manager = cp.TokenManager(cp.TokenStore(sys.argv[1]), cp.oauth_settings({}), post)
    print(await manager.access_token(), flush=True)
asyncio.run(main())
"""


def test_slow_token_endpoint_never_makes_a_second_process_spend_the_same_refresh_token(tmp_path):
    store_path = str(tmp_path / "token.json")
    TokenStore(store_path).save(saved_record(expires_at=time.time() - 10))
    first = subprocess.Popen([sys.executable, "-c", SLOW_REFRESH, store_path, "2.5"], cwd=HERE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().split() == ["posting", "sk-ant-ort01-old"]
        calls = []
        second = TokenManager(TokenStore(store_path), SETTINGS, FakeTokenEndpoint(calls=calls),
                              lock_timeout=30)
        assert asyncio.run(second.access_token()) == "sk-ant-oat01-from-slow"
        assert calls == [] and first.wait(10) == 0
    finally:
        first.kill()
        first.wait()


def test_refresh_whose_write_fails_keeps_the_rotated_pair_and_never_spends_a_token_twice(tmp_path, monkeypatch):
    store = TokenStore(str(tmp_path / "token.json"))
    store.save(saved_record(expires_at=T0 - 10))
    calls, clock = [], FakeClock()
    manager = TokenManager(store, SETTINGS, FakeTokenEndpoint(calls=calls), clock=clock)
    real_save, failures = TokenStore.save, [OSError(28, "No space left on device")] * 2

    def flaky_save(self, record):
        if failures:
            raise failures.pop()
        real_save(self, record)
    monkeypatch.setattr(TokenStore, "save", flaky_save)
    assert asyncio.run(manager.access_token()) == "sk-ant-oat01-new1"
    assert "No space left" in manager.status()["last_error"] and manager.status()["refreshable"]
    manager._cached = None                             # as after a re-read: the disk holds the spent pair
    assert asyncio.run(manager.access_token()) == "sk-ant-oat01-new1"
    assert asyncio.run(manager.on_unauthorized("OAuth token has expired", "sk-ant-oat01-new1"))
    assert [body["refresh_token"] for _, body in calls] == ["sk-ant-ort01-old", "sk-ant-ort01-new1"]
    clock.now += 31                                    # the retried write succeeds
    assert asyncio.run(manager.access_token()) == "sk-ant-oat01-new2"
    assert store.load()["refresh_token"] == "sk-ant-ort01-new2" and manager.status()["last_error"] is None


@pytest.mark.parametrize("message, refreshed", [
    ("OAuth token has expired. Please obtain a new token or refresh your existing token.", True),
    ("OAuth access token has expired. Re-authenticate to continue.", True),
    ("Invalid authentication credentials", False),
    ("OAuth authentication is currently not supported.", False),
])
def test_on_unauthorized(tmp_path, message, refreshed):
    manager, endpoint, _ = make_manager(tmp_path, saved_record(expires_at=T0 + 3600))
    body = json.dumps({"type": "error", "error": {"type": "authentication_error", "message": message}})
    assert asyncio.run(manager.on_unauthorized(body)) is refreshed
    assert len(endpoint.calls) == int(refreshed)
    assert asyncio.run(manager.access_token()) == ("sk-ant-oat01-new1" if refreshed else "sk-ant-oat01-old")


def test_concurrent_401s_with_same_token_refresh_once(tmp_path):
    manager, endpoint, _ = make_manager(tmp_path, saved_record(), FakeTokenEndpoint(delay=0.05))

    async def main():
        return await asyncio.gather(*(manager.on_unauthorized("OAuth token has expired", token="sk-ant-oat01-old")
                                      for _ in range(5)))

    assert asyncio.run(main()) == [True] * 5
    assert len(endpoint.calls) == 1


def test_invalid_grant_raises_and_shows_in_status(tmp_path):
    endpoint = FakeTokenEndpoint([(400, {"error": "invalid_grant",
                                         "error_description": "Refresh token not found or invalid"})])
    manager, _, _ = make_manager(tmp_path, saved_record(expires_at=T0 - 10), endpoint)
    for _ in range(2):                                        # the dead refresh token is not re-sent
        with pytest.raises(AuthError) as err:
            asyncio.run(manager.access_token())
        assert "claude_proxy.py login" in err.value.message
    assert len(endpoint.calls) == 1
    status = manager.status()
    assert "invalid_grant" in status["last_error"] and "sk-ant" not in json.dumps(status)


def test_status_and_logout(tmp_path):
    manager, _, clock = make_manager(tmp_path, saved_record(expires_at=T0 + 3600))
    assert manager.status() == {"logged_in": True, "source": "login", "expires_at": "2027-01-15T09:00:00Z",
                                "expires_in_seconds": 3600, "scopes": ["user:profile", "user:inference"],
                                "refreshable": True, "last_error": None}
    manager.logout()
    assert manager.status()["logged_in"] is False
    with pytest.raises(cp.CredentialMissing, match="not logged in"):
        asyncio.run(manager.access_token())


def test_expired_unrefreshable_token(tmp_path):
    manager, endpoint, _ = make_manager(tmp_path, saved_record(expires_at=T0 - 1, refresh=None))
    with pytest.raises(AuthError):
        asyncio.run(manager.access_token())
    assert endpoint.calls == []
    assert asyncio.run(manager.on_unauthorized("OAuth token has expired")) is False


def test_explicit_token_wins_and_never_refreshes(tmp_path):
    manager, endpoint, _ = make_manager(tmp_path, saved_record(expires_at=T0 - 10), explicit_token="sk-ant-oat01-env")
    assert asyncio.run(manager.access_token()) == "sk-ant-oat01-env"
    assert asyncio.run(manager.on_unauthorized("OAuth token has expired")) is False
    assert endpoint.calls == []
    assert manager.status()["source"] == "env" and manager.status()["expires_at"] is None
    assert TokenManager.pick_record(None, saved_record()) == saved_record()


def test_finish_login_saves(tmp_path):
    manager, endpoint, _ = make_manager(tmp_path)
    flow = LoginFlow(SETTINGS, verifier="VER", state="STATE")
    record = asyncio.run(manager.finish_login(flow, "CODE#STATE"))
    assert endpoint.calls[0][1]["code"] == "CODE"
    assert manager.store.load() == record and asyncio.run(manager.access_token()) == "sk-ant-oat01-new1"


# ---- Claude Code credentials import -------------------------------------------------------

def test_import_claude_code_credentials(tmp_path):
    creds = tmp_path / ".credentials.json"
    creds.write_text(json.dumps({"claudeAiOauth": {
        "accessToken": "sk-ant-oat01-cc", "refreshToken": "sk-ant-ort01-cc", "expiresAt": 1800003600123,
        "scopes": ["user:inference", "user:profile"], "subscriptionType": "max"}, "mcpOAuth": {}}))
    store = TokenStore(str(tmp_path / "ours" / "token.json"), clock=FakeClock())
    record = cp.import_claude_code_credentials(str(creds), store)
    assert record == {"access_token": "sk-ant-oat01-cc", "refresh_token": None, "expires_at": 1800003600.123,
                      "scope": "user:inference user:profile", "account": None, "source": "claude_code"}
    assert store.load() == record and "sk-ant-ort01-cc" not in (tmp_path / "ours" / "token.json").read_text()


@pytest.mark.parametrize("content, words", [
    (None, "no Claude Code credentials"),
    ("{oops", "cannot read"),
    ('{"claudeAiOauth": {}}', "accessToken"),
    ('{"claudeAiOauth": {"accessToken": "t", "expiresAt": 1000}}', "expired"),
])
def test_import_claude_code_credentials_errors(tmp_path, content, words):
    creds = tmp_path / ".credentials.json"
    if content is not None:
        creds.write_text(content)
    with pytest.raises(BadRequest) as err:
        cp.import_claude_code_credentials(str(creds), TokenStore(str(tmp_path / "t.json"), clock=FakeClock()))
    assert words in err.value.message


# ---- request shaping ----------------------------------------------------------------------

IDENTITY = {"type": "text", "text": CLAUDE_CODE_IDENTITY}
EPH = {"type": "ephemeral"}
BILLING = {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.434; cc_entrypoint=cli;"}


def count_marks(body):
    return json.dumps(body).count('"cache_control"')


@pytest.mark.parametrize("system, expected", [
    (None, [IDENTITY]),
    ("", [IDENTITY]),
    ("Be brief.", [IDENTITY, {"type": "text", "text": "Be brief."}]),
    ([{"type": "text", "text": "Be brief."}], [IDENTITY, {"type": "text", "text": "Be brief."}]),
    ([IDENTITY, {"type": "text", "text": "x"}], [IDENTITY, {"type": "text", "text": "x"}]),
    ([{**IDENTITY, "cache_control": EPH}], [{**IDENTITY, "cache_control": EPH}]),
    ([BILLING, IDENTITY, {"type": "text", "text": "x"}], [BILLING, IDENTITY, {"type": "text", "text": "x"}]),
    ([BILLING, {"type": "text", "text": "x"}], [BILLING, IDENTITY, {"type": "text", "text": "x"}]),
    ([{"type": "text", "text": "x"}, IDENTITY], [IDENTITY, {"type": "text", "text": "x"}, IDENTITY]),
])
def test_with_identity(system, expected):
    assert cp.with_identity(system) == expected


def test_with_identity_rejects_bad_type():
    with pytest.raises(BadRequest) as err:
        cp.with_identity(42)
    assert err.value.param == "system"


@pytest.mark.parametrize("client_beta, thinking, one_m, expected", [
    (None, None, False, "oauth-2025-04-20"),
    ("claude-code-20250219, oauth-2025-04-20", None, False, "oauth-2025-04-20,claude-code-20250219"),
    ("a,b,a,,", {"type": "enabled", "budget_tokens": 2048}, False,
     "oauth-2025-04-20,a,b,interleaved-thinking-2025-05-14"),
    ("interleaved-thinking-2025-05-14", {"type": "adaptive"}, True,
     "oauth-2025-04-20,interleaved-thinking-2025-05-14,context-1m-2025-08-07"),
    (None, {"type": "disabled"}, True, "oauth-2025-04-20,context-1m-2025-08-07"),
])
def test_oauth_betas(client_beta, thinking, one_m, expected):
    body = {"messages": []} if thinking is None else {"messages": [], "thinking": thinking}
    assert cp.oauth_betas(client_beta, body, one_m=one_m) == expected


def test_shape_headers():
    body = {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    client = {"X-Api-Key": "sk-ant-api-client", "Anthropic-Version": "2024-01-01",
              "Anthropic-Beta": "claude-code-20250219", "User-Agent": "curl"}
    _, headers = cp.shape_oauth_request(body, client, "sk-ant-oat01-t")
    assert headers == {"authorization": "Bearer sk-ant-oat01-t", "anthropic-version": "2024-01-01",
                       "anthropic-beta": "oauth-2025-04-20,claude-code-20250219",
                       "content-type": "application/json"}
    _, headers = cp.shape_oauth_request(body, {}, "sk-ant-oat01-t")
    assert headers["anthropic-version"] == "2023-06-01"
    assert not any(k.lower() == "x-api-key" for k in headers)


def test_shape_simple_request_exact():
    body = {"model": "m", "max_tokens": 10, "system": "Be brief.",
            "messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                         {"role": "user", "content": "three"}]}
    before = copy.deepcopy(body)
    shaped, _ = cp.shape_oauth_request(body, {}, "t")
    assert body == before
    assert shaped == {"model": "m", "max_tokens": 10,
                      "system": [IDENTITY, {"type": "text", "text": "Be brief.", "cache_control": EPH}],
                      "messages": [{"role": "user", "content": [{"type": "text", "text": "one", "cache_control": EPH}]},
                                   {"role": "assistant", "content": "two"},
                                   {"role": "user", "content": [{"type": "text", "text": "three", "cache_control": EPH}]}]}


def test_cache_budget_counts_client_breakpoints():
    body = {"model": "m", "max_tokens": 10,
            "system": [{"type": "text", "text": "s1", "cache_control": EPH}, {"type": "text", "text": "s2"}],
            "tools": [{"name": "t", "input_schema": {"type": "object"}, "cache_control": EPH}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a", "cache_control": EPH}]},
                         {"role": "assistant", "content": "b"},
                         {"role": "user", "content": "c"},
                         {"role": "assistant", "content": "d"},
                         {"role": "user", "content": "e"}]}
    before = copy.deepcopy(body)
    shaped, _ = cp.shape_oauth_request(body, {}, "t")
    assert count_marks(shaped) == 4 and body == before
    assert shaped["system"][-1] == {"type": "text", "text": "s2", "cache_control": EPH}
    assert shaped["messages"][4]["content"] == "e"         # budget spent: the turns stay as sent


def test_cache_full_budget_adds_nothing():
    marked = {"type": "text", "text": "x", "cache_control": EPH}
    body = {"cache_control": EPH, "system": [marked, {"type": "text", "text": "y"}],
            "tools": [{"name": "t", "cache_control": EPH}],
            "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a",
                                                       "content": [marked]}, {"type": "text", "text": "q"}]}]}
    shaped, _ = cp.shape_oauth_request(body, {}, "t")
    assert cp.count_cache_breakpoints(body) == 4
    assert shaped["messages"] == body["messages"] and shaped["system"][1:] == body["system"]


def test_cache_never_on_thinking_or_empty_blocks():
    body = {"model": "m", "max_tokens": 10, "system": [{"type": "text", "text": "s"}, {"type": "text", "text": " "}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "text", "text": ""}]},
                         {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "x"}]},
                         {"role": "user", "content": [{"type": "redacted_thinking", "data": "z"}]},
                         {"role": "user", "content": ""}]}
    shaped, _ = cp.shape_oauth_request(body, {}, "t")
    assert shaped["system"][1] == {"type": "text", "text": "s", "cache_control": EPH}
    assert shaped["system"][2] == {"type": "text", "text": " "}
    assert shaped["messages"][2:] == body["messages"][2:]
    assert shaped["messages"][0] == body["messages"][0]
    assert count_marks(shaped) == 1


def test_cache_on_tool_result_and_existing_turn_mark():
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "q", "cache_control": EPH}]},
                         {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}]}
    shaped, _ = cp.shape_oauth_request(body, {}, "t")
    assert shaped["messages"][2]["content"][0]["cache_control"] == EPH
    assert shaped["messages"][0] == body["messages"][0]
    assert count_marks(shaped) == 3     # system, the client's mark, the tool result


CLAUDE_CODE_FILES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "shared", "fixtures", "claude_code", "*.json")))


@pytest.mark.skipif(not CLAUDE_CODE_FILES, reason="shared/fixtures/claude_code absent")
@pytest.mark.parametrize("path", CLAUDE_CODE_FILES)
def test_claude_code_fixtures(path):
    with open(path) as f:
        captured = json.load(f)
    body = captured["body"]
    before = copy.deepcopy(body)
    shaped, headers = cp.shape_oauth_request(body, captured["headers"], "sk-ant-oat01-t")
    assert body == before
    assert count_marks(shaped) <= 4
    assert shaped["system"][0] == body["system"][0] and cp._is_billing_header(shaped["system"][0])
    assert shaped["system"][1] == IDENTITY and shaped["system"][2:] == body["system"][1:]
    assert not any(k.lower() == "x-api-key" for k in headers)
    betas = headers["anthropic-beta"].split(",")
    assert betas[0] == "oauth-2025-04-20" and len(betas) == len(set(betas))
    assert "interleaved-thinking-2025-05-14" in betas
    assert cp.with_identity(shaped["system"]) == shaped["system"]     # idempotent
    again, _ = cp.shape_oauth_request(shaped, captured["headers"], "sk-ant-oat01-t")
    assert again == shaped

# =============================================================================================
# 11-12. Server and handlers, end to end over loopback
# =============================================================================================

def test_passthrough_non_stream_rewrites_only_credentials(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message(), [("request-id", "req_up1"),
                                                                                   ("anthropic-ratelimit-requests-remaining", "9")])) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                status, headers, body = await call(port, "POST", "/v1/messages?beta=true", HELLO,
                                                   dict(ANTHROPIC_HEADERS, **{"anthropic-beta": "x-1", "x-api-key": "client-key"}))
            assert status == 200 and json.loads(body) == anthropic_message()
            assert headers["request-id"] == "req_up1" and headers["anthropic-ratelimit-requests-remaining"] == "9"
            sent = up.requests[0]
            assert sent["path"] == "/v1/messages?beta=true"     # the query string is the client's too
            assert sent["headers"]["x-api-key"] == "sk-ant-api03-testkey-0123456789"
            assert sent["headers"]["anthropic-beta"] == "x-1" and sent["headers"]["anthropic-version"] == "2023-06-01"
            assert "authorization" not in sent["headers"]
            assert sent["raw"] == json.dumps(HELLO).encode()   # the client's bytes, not re-serialised
    run(scenario())


def test_passthrough_stream_is_relayed_byte_for_byte(tmp_path):
    parts = anthropic_stream()
    split = [parts[0][:17], parts[0][17:] + parts[1]] + parts[2:]

    async def scenario():
        async with FakeUpstream(lambda req: Stream(split)) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                status, headers, body = await call(port, "POST", "/v1/messages", dict(HELLO, stream=True), ANTHROPIC_HEADERS)
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        assert body == b"".join(parts)
    run(scenario())


def test_client_auth_mode_forwards_the_clients_own_key(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            config = make_config(tmp_path, providers={"anthropic": {"format": "anthropic", "base_url": up.url, "auth": "client"}})
            async with running_proxy(config) as (_, port):
                await call(port, "POST", "/v1/messages", HELLO, dict(ANTHROPIC_HEADERS, **{"x-api-key": "sk-client-own"}))
                await call(port, "POST", "/v1/messages", HELLO, dict(ANTHROPIC_HEADERS, authorization="Bearer sk-client-bearer"))
            assert up.requests[0]["headers"]["x-api-key"] == "sk-client-own"
            assert up.requests[1]["headers"]["authorization"] == "Bearer sk-client-bearer"
    run(scenario())


def test_no_config_auto_auth_prefers_token_then_key_then_client(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            raw = {"home": str(tmp_path / "h"), "anthropic_url": up.url, "keepalive_interval": 0}
            for env, expect in (({"ANTHROPIC_API_KEY": "sk-ant-envkey-123456"}, ("x-api-key", "sk-ant-envkey-123456")),
                                ({}, ("x-api-key", "client-key-1"))):
                async with running_proxy(cp.parse_config(raw, env)) as (_, port):
                    await call(port, "POST", "/v1/messages", HELLO, dict(ANTHROPIC_HEADERS, **{"x-api-key": "client-key-1"}))
                assert up.requests[-1]["headers"][expect[0]] == expect[1]
            async with running_proxy(cp.parse_config(dict(raw, oauth_token="sk-ant-oat01-envtoken"), {})) as (_, port):
                await call(port, "POST", "/v1/messages", HELLO, dict(ANTHROPIC_HEADERS, **{"x-api-key": "client-key-1"}))
            sent = up.requests[-1]["headers"]
            assert sent["authorization"] == "Bearer sk-ant-oat01-envtoken" and "x-api-key" not in sent
    run(scenario())


def test_count_tokens_and_models_and_stray_endpoints(tmp_path):
    def script(req):
        return http_response(200, {"input_tokens": 42})

    async def scenario():
        async with FakeUpstream(script) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                status, _, body = await call(port, "POST", "/v1/messages/count_tokens?beta=true",
                                             {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}]},
                                             ANTHROPIC_HEADERS)
                assert (status, json.loads(body)) == (200, {"input_tokens": 42})
                assert up.requests[0]["path"] == "/v1/messages/count_tokens?beta=true"
                status, _, body = await call(port, "GET", "/v1/models", headers=ANTHROPIC_HEADERS)
                listing = json.loads(body)
                assert status == 200 and listing["data"][0]["type"] == "model" and listing["has_more"] is False
                status, _, body = await call(port, "GET", "/v1/models")
                assert json.loads(body)["object"] == "list"
                assert (await call(port, "POST", "/api/event_logging/batch", {"events": []}))[0] == 200
                assert (await call(port, "HEAD", "/"))[0] == 200
                status, _, body = await call(port, "GET", "/health")
                assert json.loads(body)["status"] == "ok"
                status, _, body = await call(port, "GET", "/nope", headers=ANTHROPIC_HEADERS)
                assert status == 404 and json.loads(body)["type"] == "error"
                status, _, body = await call(port, "GET", "/v1/messages")
                assert status == 405
    run(scenario())


def test_head_request_has_no_body(tmp_path):
    async def scenario():
        async with running_proxy(make_config(tmp_path)) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"HEAD /health HTTP/1.1\r\nhost: localhost\r\n\r\nGET /health HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            data = await reader.read()
            assert data.count(b"HTTP/1.1 200") == 2 and data.count(b'"status":"ok"') == 1
    run(scenario())


def test_keep_alive_chunked_body_and_expect_continue(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                body = json.dumps(HELLO).encode()
                writer.write(b"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n" +
                             b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
                first = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"content-length: (\d+)", first).group(1))
                await reader.readexactly(length)
                writer.write(b"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\nexpect: 100-continue\r\n" +
                             b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
                await writer.drain()
                assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
                writer.write(body)
                rest = await reader.read()
                assert rest.startswith(b"HTTP/1.1 200")
            assert [r["body"] for r in up.requests] == [HELLO, HELLO]
    run(scenario())


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\n" + b"x-big: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\ncontent-length: 2000\r\n\r\n", 413),
    (b"NOT HTTP\r\n\r\n", 400),
])
def test_request_limits(tmp_path, request_bytes, status):
    async def scenario():
        async with running_proxy(make_config(tmp_path, max_body_bytes=1000)) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_bytes)
            data = await asyncio.wait_for(reader.read(), 5)
            assert data.startswith(b"HTTP/1.1 %d" % status), data[:80]
            assert (await call(port, "GET", "/health"))[0] == 200   # and the server keeps serving
    run(scenario())


def test_slow_headers_and_idle_connections_are_dropped(tmp_path):
    async def scenario():
        async with running_proxy(make_config(tmp_path, header_timeout=0.3, idle_timeout=0.3)) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nhost: localhost\r\n")   # never finishes its head
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert time.monotonic() - started < 2
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n")
            await reader.readuntil(b"}")
            assert await asyncio.wait_for(reader.read(), 5) == b""     # idle keep-alive closed
    run(scenario())


def test_client_disconnect_closes_the_upstream_at_once(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: Stream([anthropic_stream()[0], ("sleep", 30)])) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                body = json.dumps(dict(HELLO, stream=True)).encode()
                writer.write(b"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await reader.readuntil(b"message_start")
                writer.transport.abort()
                started = time.monotonic()
                while up.open_connections and time.monotonic() - started < 3:
                    await asyncio.sleep(0.02)
                assert up.open_connections == 0
                assert time.monotonic() - started < 1
    run(scenario())


def test_graceful_shutdown_lets_streams_finish(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: Stream(anthropic_stream()[:2] + [("sleep", 0.4)] + anthropic_stream()[2:])) as up:
            server = cp.ProxyServer(make_config(tmp_path, up.url))
            _, port = await server.start("127.0.0.1", 0)
            pending = asyncio.ensure_future(call(port, "POST", "/v1/messages", dict(HELLO, stream=True), ANTHROPIC_HEADERS))
            await asyncio.sleep(0.2)
            idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
            await server.shutdown()
            status, _, body = await pending
            assert status == 200 and body.endswith(anthropic_stream()[-1])
            assert await asyncio.wait_for(idle_reader.read(), 2) == b""
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)
    run(scenario())


def test_signal_handlers_fall_back_without_add_signal_handler(monkeypatch):
    installed = []

    class NoSignals:
        def add_signal_handler(self, *a):
            raise NotImplementedError

        def call_soon_threadsafe(self, fn):
            fn()
    monkeypatch.setattr(cp.signal, "signal", lambda sig, handler: installed.append((sig, handler)))

    async def scenario():
        stop = asyncio.Event()
        before = len(installed)
        cp.install_signal_handlers(NoSignals(), stop)
        ours = installed[before:]
        assert {s for s, _ in ours} >= {cp.signal.SIGINT, cp.signal.SIGTERM}
        ours[0][1](cp.signal.SIGINT, None)
        assert stop.is_set()
    run(scenario())


def test_upstream_errors_are_relayed_in_the_anthropic_envelope(tmp_path):
    err = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad thing"}}

    async def scenario():
        async with FakeUpstream(lambda req: http_response(400, err, [("request-id", "req_e")])) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                status, headers, body = await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
        assert (status, json.loads(body), headers["request-id"]) == (400, err, "req_e")
    run(scenario())


def test_serve_cli_starts_and_stops_on_sigterm(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = dict(os.environ, CLAUDE_PROXY_HOME=str(tmp_path))
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "claude_proxy.py"), "--port", str(port)],
                            stderr=subprocess.PIPE, env=env, cwd=str(tmp_path))
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        status, _, body = run(call(port, "GET", "/health"))
        assert status == 200
        proc.terminate()
        assert proc.wait(10) == 0
        assert b"listening on http://127.0.0.1:%d" % port in proc.stderr.read()
    finally:
        proc.kill()


# ---- OAuth end to end: fake authorize/token server, HTTP and CLI login, refresh through the proxy

class FakeTokenServer:
    """Answers /v1/oauth/token like Anthropic's (JSON bodies), counting grants."""

    def __init__(self, bad_refresh=False, refresh_delay=0.0):
        self.bad_refresh, self.refresh_delay, self.n = bad_refresh, refresh_delay, 0

    async def __call__(self, req):
        body = req["body"]
        if body["grant_type"] == "refresh_token":
            await asyncio.sleep(self.refresh_delay)
            if self.bad_refresh:
                return http_response(400, {"error": "invalid_grant", "error_description": "Refresh token not found or invalid"})
        self.n += 1
        life = int(body.get("expires_in") or 28800)
        return http_response(200, {"token_type": "Bearer", "access_token": f"sk-ant-oat01-new{self.n}",
                                   "refresh_token": f"sk-ant-ort01-new{self.n}", "expires_in": life,
                                   "scope": body.get("scope") or "user:inference user:profile"})


def oauth_config(tmp_path, upstream_url, token_url):
    return make_config(tmp_path, providers={"claude": {"format": "anthropic", "base_url": upstream_url, "auth": "oauth"}},
                       routes={"default": "claude"}, oauth={"token_url": token_url,
                                                          "authorize_url": "http://127.0.0.1:9/oauth/authorize"})


EXPIRED_401 = {"type": "error", "error": {"type": "authentication_error",
                                          "message": "OAuth token has expired. Please obtain a new token or refresh your existing token."}}


def expired_token_upstream(req):
    """An Anthropic upstream that rejects the token sk-ant-oat01-old as expired."""
    if req["headers"]["authorization"] == "Bearer sk-ant-oat01-old":
        return http_response(401, EXPIRED_401)
    return http_response(200, anthropic_message())


def seed_login(config, expires_in=3600.0):
    """A saved login with access token sk-ant-oat01-old in the config's state directory."""
    cp.TokenStore(os.path.join(config.home, "oauth_token.json")).save(
        {"access_token": "sk-ant-oat01-old", "refresh_token": "sk-ant-ort01-old", "expires_at": time.time() + expires_in,
         "scope": "user:inference", "account": None, "source": "login"})


def test_http_login_then_requests_carry_the_oauth_shape(tmp_path):
    async def scenario():
        tokens = FakeTokenServer()
        async with FakeUpstream(tokens) as auth, FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            async with running_proxy(oauth_config(tmp_path, up.url, auth.url + "/v1/oauth/token")) as (_, port):
                status, _, body = await call(port, "GET", "/auth/start")
                start = json.loads(body)
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(start["url"]).query)
                assert status == 200 and query["code_challenge_method"] == ["S256"] and query["state"] == [start["state"]]
                status, _, body = await call(port, "POST", "/auth/callback", {"code": "thecode#" + start["state"]})
                assert status == 200 and json.loads(body)["logged_in"] is True
                exchange = auth.requests[0]["body"]
                assert (exchange["grant_type"], exchange["code"], exchange["state"]) == ("authorization_code", "thecode", start["state"])
                store = tmp_path / "home" / "oauth_token.json"
                assert stat.S_IMODE(os.stat(store).st_mode) == 0o600
                status, _, body = await call(port, "GET", "/auth/status")
                assert "sk-ant" not in body.decode() and json.loads(body)["refreshable"] is True
                request = {"model": "claude-sonnet-4-5", "max_tokens": 50, "system": "Be brief.",
                           "thinking": {"type": "enabled", "budget_tokens": 1024},
                           "messages": [{"role": "user", "content": "hi"}]}
                status, _, _ = await call(port, "POST", "/v1/messages", request,
                                          dict(ANTHROPIC_HEADERS, **{"x-api-key": "client", "anthropic-beta": "b-1"}))
                assert status == 200
                status, _, body = await call(port, "POST", "/v1/chat/completions",
                                             {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "yo"}]})
                assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "Hello there"
                status, _, body = await call(port, "POST", "/auth/logout")
                assert json.loads(body)["logged_in"] is False and not store.exists()
            sent = up.requests[0]
            assert sent["headers"]["authorization"] == "Bearer sk-ant-oat01-new1" and "x-api-key" not in sent["headers"]
            assert sent["headers"]["anthropic-beta"].split(",") == ["oauth-2025-04-20", "b-1", "interleaved-thinking-2025-05-14"]
            assert sent["body"]["system"][0] == {"type": "text", "text": cp.CLAUDE_CODE_IDENTITY}
            assert sent["body"]["system"][1]["text"] == "Be brief."
            assert sent["body"]["system"][-1]["cache_control"] == {"type": "ephemeral"}
            assert up.requests[1]["body"]["system"][0]["text"] == cp.CLAUDE_CODE_IDENTITY
    run(scenario())


def test_refresh_once_on_expired_401_and_invalid_grant_reaches_client(tmp_path):
    async def scenario():
        for bad in (False, True):
            tokens = FakeTokenServer(bad_refresh=bad)
            async with FakeUpstream(tokens) as auth, FakeUpstream(expired_token_upstream) as up:
                config = oauth_config(tmp_path / str(bad), up.url, auth.url + "/v1/oauth/token")
                seed_login(config)
                async with running_proxy(config) as (_, port):
                    status, _, body = await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
                    if not bad:
                        assert status == 200 and [r["headers"]["authorization"] for r in up.requests] == \
                            ["Bearer sk-ant-oat01-old", "Bearer sk-ant-oat01-new1"]
                    else:
                        error = json.loads(body)
                        assert status == 401 and error["error"]["type"] == "authentication_error"
                        assert "login" in error["error"]["message"]
                        status, _, body = await call(port, "GET", "/auth/status")
                        assert json.loads(body)["last_error"]
    run(scenario())


def test_twelve_concurrent_requests_on_expired_token_refresh_once(tmp_path):
    async def scenario():
        tokens = FakeTokenServer(refresh_delay=0.3)
        async with FakeUpstream(tokens) as auth, FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            config = oauth_config(tmp_path, up.url, auth.url + "/v1/oauth/token")
            seed_login(config, expires_in=-10)
            async with running_proxy(config) as (_, port):
                results = await asyncio.gather(*[call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS) for _ in range(12)])
            assert [r[0] for r in results] == [200] * 12
            assert len(auth.requests) == 1
            assert {r["headers"]["authorization"] for r in up.requests} == {"Bearer sk-ant-oat01-new1"}
    run(scenario())


def test_cli_login_reads_code_from_stdin_and_long_lived_prints_token(tmp_path):
    async def scenario():
        async with FakeUpstream(FakeTokenServer()) as auth:
            cfg = tmp_path / "c.json"
            cfg.write_text(json.dumps({"oauth": {"token_url": auth.url + "/v1/oauth/token"}}))
            env = dict(os.environ, CLAUDE_PROXY_HOME=str(tmp_path / "h"))
            env.pop("ANTHROPIC_OAUTH_TOKEN", None)
            for extra in ([], ["--long-lived"]):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, os.path.join(HERE, "claude_proxy.py"), "login", "--no-browser", "--config", str(cfg), *extra,
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
                url, printed = b"", b""
                while b"state=" not in url:
                    url = await asyncio.wait_for(proc.stdout.readline(), 10)
                    printed += url
                state = urllib.parse.parse_qs(urllib.parse.urlsplit(url.decode().strip()).query)["state"][0]
                proc.stdin.write(f"abc#{state}\n".encode())
                out, err = await asyncio.wait_for(proc.communicate(), 20)
                assert proc.returncode == 0, err
                assert b"Anthropic's terms restrict" in printed    # said plainly, once
                assert (printed + out).count(b"terms restrict") == 1
                if extra:
                    assert b"sk-ant-oat01-new2" in out and auth.requests[-1]["body"]["expires_in"] == 31536000
                    assert auth.requests[-1]["body"]["grant_type"] == "authorization_code"
            saved = json.loads((tmp_path / "h" / "oauth_token.json").read_text())
            assert "sk-ant-oat01-new2" in json.dumps(saved)
    run(scenario())


def test_oauth_on_public_address_requires_proxy_key(tmp_path):
    oauth_provider = {"claude": {"format": "anthropic", "base_url": "http://127.0.0.1:9", "auth": "oauth"}}
    for config in (make_config(tmp_path, providers=oauth_provider), make_config(tmp_path, oauth_token="sk-ant-oat01-x")):
        with pytest.raises(cp.ConfigError) as err:
            cp.check_exposure(config, "0.0.0.0")
        assert "PROXY_API_KEY" in str(err.value)
    cp.check_exposure(make_config(tmp_path, providers=oauth_provider, proxy_api_key="pk-123456789"), "0.0.0.0")
    cp.check_exposure(make_config(tmp_path), "0.0.0.0")    # no login, no token: nothing to protect


def test_vendors_never_get_the_claude_login_by_default():
    config = cp.parse_config({"oauth_token": "sk-ant-oat01-x", "providers": {
        "kimi": {"format": "anthropic", "base_url": "https://api.moonshot.ai/anthropic", "api_key_env": "KIMI_KEY"},
        "nokey": {"format": "anthropic", "base_url": "https://vendor.example/anthropic"},
        "local": {"format": "openai", "base_url": "http://127.0.0.1:11434/v1", "api_key_env": "UNSET_KEY"}}},
        {"KIMI_KEY": "sk-kimi-123456789"})
    assert [config.providers[n]["auth"] for n in ("anthropic", "kimi", "nokey", "local")] == ["auto", "api_key", "none", "api_key"]
    assert any("providers.local: auth api_key but $UNSET_KEY is not set" in w for w in config.warnings)   # a 400, never the login


def test_fallback_across_formats_is_rejected():
    with pytest.raises(cp.ConfigError) as err:
        cp.parse_config({"providers": {"o": {"format": "openai", "base_url": "http://h/v1"}},
                         "models": [{"id": "a", "provider": "anthropic", "fallback": ["b"]}, {"id": "b", "provider": "o"}]}, {})
    assert "models.a.fallback.0" in str(err.value)


def test_unknown_oauth_key_is_a_config_error():
    with pytest.raises(cp.ConfigError) as err:
        cp.parse_config({"oauth": {"tokenurl": "x"}}, {})
    assert "oauth.tokenurl" in str(err.value)


def test_auth_endpoints_refuse_remote_clients_without_proxy_key(tmp_path):
    config = make_config(tmp_path)                   # check_access: the server's one rule, before the body
    with pytest.raises(cp.PermissionDenied, match="loopback"):
        cp.check_access(config, cp.Request("GET", "/auth/status", {}, b"", "10.1.2.3"))
    cp.check_access(config, cp.Request("GET", "/auth/status", {}, b"", "127.0.0.1"))


# ---- Conversion paths end to end

TOOLS = [{"name": "get_weather", "description": "w", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def openai_config(tmp_path, url, **extra):
    return make_config(tmp_path, providers={"o": {"format": "openai", "base_url": url + "/v1", "api_key": "sk-o-123456789"}},
                       routes={"default": "o,up-model"}, **extra)


def test_anthropic_client_on_openai_upstream_stream_with_tools(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: Stream(openai_stream_chunks(tool=("get_weather", {"city": "Paris"})))) as up:
            async with running_proxy(openai_config(tmp_path, up.url)) as (_, port):
                status, _, body = await call(port, "POST", "/v1/messages?beta=true",
                                             dict(HELLO, stream=True, tools=TOOLS), ANTHROPIC_HEADERS)
        events = sse_events(body)
        names = [e for e, _ in events]
        assert names == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                         "message_delta", "message_stop"]
        assert events[1][1]["content_block"]["name"] == "get_weather"
        assert json.loads(events[2][1]["delta"]["partial_json"]) == {"city": "Paris"}
        assert events[4][1]["delta"]["stop_reason"] == "tool_use" and events[4][1]["usage"]["output_tokens"] == 4
        sent = up.requests[0]
        assert sent["path"] == "/v1/chat/completions" and sent["headers"]["authorization"] == "Bearer sk-o-123456789"
        assert sent["body"]["model"] == "up-model" and sent["body"]["stream_options"] == {"include_usage": True}
        assert sent["body"]["tools"][0]["function"]["name"] == "get_weather"
    run(scenario())


def test_anthropic_client_on_openai_upstream_non_stream_and_count_tokens(tmp_path):
    answer = {"id": "c", "object": "chat.completion", "created": 1, "model": "up",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!", "reasoning_content": "hmm"},
                           "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35,
                        "prompt_tokens_details": {"cached_tokens": 10}}}

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, answer)) as up:
            async with running_proxy(openai_config(tmp_path, up.url)) as (_, port):
                status, _, body = await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
                message = json.loads(body)
                assert [b["type"] for b in message["content"]] == ["thinking", "text"]
                assert message["usage"]["input_tokens"] == 20 and message["usage"]["cache_read_input_tokens"] == 10
                assert message["model"] == "claude-sonnet-4-5"
                status, _, body = await call(port, "POST", "/v1/messages/count_tokens",
                                             {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hello " * 400}]},
                                             ANTHROPIC_HEADERS)
                assert status == 200 and 300 < json.loads(body)["input_tokens"] < 1500
                status, _, body = await call(port, "POST", "/v1/messages",
                                             dict(HELLO, tools=[{"type": "web_search_20250305", "name": "web_search"}]),
                                             ANTHROPIC_HEADERS)
                assert status == 400 and "web_search" in json.loads(body)["error"]["message"]
            assert len(up.requests) == 1
    run(scenario())


def test_openai_client_on_claude_stream_with_usage_and_variants(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: Stream(anthropic_stream())) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                status, _, body = await call(port, "POST", "/v1/chat/completions", {
                    "model": "claude-sonnet-4-5-1m-reasoning-high", "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]})
        items = [d for _, d in sse_events(body)]
        assert items[-1] == "[DONE]" and items[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(i["choices"][0]["delta"].get("content") or "" for i in items[:-2] if i["choices"]) == "Hello there"
        assert items[-2]["choices"] == [] and items[-2]["usage"]["completion_tokens"] == 3
        sent = up.requests[0]
        assert sent["body"]["model"] == "claude-sonnet-4-5" and sent["body"]["system"] == [{"type": "text", "text": "sys"}]
        assert sent["body"]["thinking"] == {"type": "enabled", "budget_tokens": 32768}
        assert sent["body"]["max_tokens"] >= 32768 + 1024
        assert "context-1m-2025-08-07" in sent["headers"]["anthropic-beta"]
    run(scenario())


def test_openai_passthrough_rewrites_model_and_key_only(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: Stream(openai_stream_chunks())) as up:
            config = make_config(tmp_path, providers={"o": {"format": "openai", "base_url": up.url + "/v1", "api_key": "sk-o-123456789"}},
                                 models=[{"id": "my-gpt", "provider": "o", "model": "gpt-upstream"}])
            async with running_proxy(config) as (_, port):
                status, _, body = await call(port, "POST", "/v1/chat/completions",
                                             {"model": "my-gpt", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
                                             {"authorization": "Bearer client-key"})
        assert status == 200 and body == b"".join(openai_stream_chunks())
        sent = up.requests[0]
        assert sent["body"] == {"model": "gpt-upstream", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        assert sent["headers"]["authorization"] == "Bearer sk-o-123456789"
    run(scenario())


def thinking_mode_provider(req):
    """DeepSeek's / Kimi's thinking mode (PROTOCOLS H.3), on unless the request turns it off: an assistant
    turn with tool calls and no reasoning_content is a 400 worded as DeepSeek words it."""
    body = req["body"]
    if (body.get("thinking") or {}).get("type") != "disabled":
        for i, message in enumerate(body["messages"]):
            if message["role"] == "assistant" and message.get("tool_calls") and "reasoning_content" not in message:
                return http_response(400, {"error": {"message": "Missing `reasoning_content` field in the assistant "
                                                                "message at message index %d." % i,
                                                     "type": "invalid_request_error", "code": "invalid_request_error"}})
    return http_response(200, {"id": "c", "object": "chat.completion", "created": 1, "model": body["model"], "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok", "reasoning_content": "fine"},
         "finish_reason": "stop"}], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}})


SWITCHED_TOOL_TURN = {"id": "call_g", "type": "function", "function": {"name": "Bash", "arguments": "{}"}}


@pytest.mark.parametrize("model", ["deepseek-reasoner", "kimi-k2-thinking"])
def test_a_session_switching_to_a_thinking_mode_sends_each_turn_its_reasoning_content(tmp_path, model):
    """Tool turns another model answered reach the thinking mode with reasoning_content: the thinking text
    the history carries, else empty; from an Anthropic client, a chat client and a Responses client."""
    claude_turns = [{"role": "user", "content": "list files"},
                    {"role": "assistant", "content": [{"type": "thinking", "thinking": "ls it.", "signature": "sig-a"},
                                                      {"type": "tool_use", "id": "t1", "name": "Bash", "input": {}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "a.txt"}]},
                    {"role": "assistant", "content": [{"type": "thinking", "thinking": "", "signature": "sig-b"},
                                                      {"type": "tool_use", "id": "t2", "name": "Bash", "input": {}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t2", "content": "b.txt"}]},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "t3", "name": "Bash", "input": {}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t3", "content": "c.txt"}]}]
    chat_turns = [{"role": "user", "content": "list files"},
                  {"role": "assistant", "content": None, "tool_calls": [SWITCHED_TOOL_TURN]},
                  {"role": "tool", "tool_call_id": "call_g", "content": "a.txt"},
                  {"role": "assistant", "content": "Two files.", "reasoning_content": "kept as sent"},
                  {"role": "user", "content": "and now?"}]
    codex_input = CODEX_INPUT + CODEX_TURN2_TAIL              # its reasoning item is another server's

    async def scenario():
        async with FakeUpstream(thinking_mode_provider) as up:
            config = make_config(tmp_path, providers={"p": {"format": "openai", "base_url": up.url + "/v1",
                                                            "api_key": "sk-p-123456789"}}, routes={"default": "p," + model})
            async with running_proxy(config) as (_, port):
                answers = [await call(port, "POST", "/v1/messages", dict(HELLO, messages=claude_turns), ANTHROPIC_HEADERS),
                           await call(port, "POST", "/v1/chat/completions", {"model": model, "messages": chat_turns}),
                           await call(port, "POST", "/v1/responses", {"model": model, "input": codex_input, "store": False})]
        return answers, up.requests
    answers, sent = run(scenario())
    assert [status for status, _, _ in answers] == [200, 200, 200], answers
    replayed = [[m.get("reasoning_content") for m in r["body"]["messages"] if m["role"] == "assistant"] for r in sent]
    assert replayed == [["ls it.", "", ""], ["", "kept as sent"], [""]]
    assert sent[1]["body"]["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [SWITCHED_TOOL_TURN],
                                              "reasoning_content": ""}


def test_upstream_openai_error_becomes_anthropic_envelope(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(400, {"error": {"message": "bad model", "type": "invalid_request_error", "code": None}})) as up:
            async with running_proxy(openai_config(tmp_path, up.url)) as (_, port):
                status, _, body = await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
        assert status == 400 and json.loads(body)["error"] == {"type": "invalid_request_error", "message": "bad model"}
    run(scenario())


@pytest.mark.skipif(not os.path.isdir(CLAUDE_CODE_FIXTURES), reason="shared fixtures absent")
def test_real_claude_code_requests_through_both_paths(tmp_path):
    async def scenario():
        for path in sorted(glob.glob(os.path.join(CLAUDE_CODE_FIXTURES, "*.json"))):
            captured = json.load(open(path))
            async with FakeUpstream(lambda req: Stream(openai_stream_chunks())) as up:
                async with running_proxy(openai_config(tmp_path, up.url)) as (_, port):
                    status, _, body = await call(port, "POST", captured["path"], captured["body"],
                                                 {k: v for k, v in captured["headers"].items() if k not in ("content-length", "connection")})
                assert status == 200 and sse_events(body)[-1][0] == "message_stop"
                sent = up.requests[0]["body"]
                assert len(sent["tools"]) == 24 and "x-anthropic-billing-header" not in json.dumps(sent["messages"])
    run(scenario())


@pytest.mark.parametrize("upstream_kind", ["anthropic", "openai"])
def test_keepalive_comments_while_waiting_for_the_first_token(tmp_path, upstream_kind):
    parts = anthropic_stream() if upstream_kind == "anthropic" else openai_stream_chunks()

    async def scenario():
        async with FakeUpstream(lambda req: Stream([("sleep", 0.5)] + parts)) as up:
            config = make_config(tmp_path, up.url) if upstream_kind == "anthropic" else openai_config(tmp_path, up.url)
            config.settings["keepalive_interval"] = 0.1
            async with running_proxy(config) as (_, port):
                status, _, body = await call(port, "POST", "/v1/messages", dict(HELLO, stream=True), ANTHROPIC_HEADERS)
        assert status == 200 and body.count(b": keep-alive\n\n") >= 3
        assert body.index(b": keep-alive") < body.index(b"message_start")
        assert [e for e, _ in sse_events(body)][-1] == "message_stop"
    run(scenario())


def test_no_keepalive_while_events_flow_faster_than_the_interval(tmp_path):
    parts = anthropic_stream()
    delta = parts[2]
    paced = [x for part in parts[:2] + [delta] * 8 + parts[3:] for x in (part, ("sleep", 0.06))]

    async def scenario():
        async with FakeUpstream(lambda req: Stream(paced)) as up:
            config = make_config(tmp_path, up.url)
            config.settings["keepalive_interval"] = 0.2
            async with running_proxy(config) as (_, port):
                status, _, body = await call(port, "POST", "/v1/messages", dict(HELLO, stream=True), ANTHROPIC_HEADERS)
        assert status == 200 and [e for e, _ in sse_events(body)][-1] == "message_stop"
        assert b": keep-alive" not in body       # an event at least every 0.06 s: the stream was never quiet
    run(scenario())


@pytest.mark.parametrize("client", ["anthropic", "openai"])
def test_converted_streams_reuse_the_upstream_connection(tmp_path, client):
    async def scenario():
        if client == "anthropic":
            parts, path, body = openai_stream_chunks(), "/v1/messages", dict(HELLO, stream=True)
        else:
            parts, path, body = anthropic_stream(), "/v1/chat/completions", {"model": "claude-x", "stream": True,
                                                                              "messages": [{"role": "user", "content": "hi"}]}
        async with FakeUpstream(lambda req: Stream(parts)) as up:
            config = openai_config(tmp_path, up.url) if client == "anthropic" else make_config(tmp_path, up.url)
            async with running_proxy(config) as (_, port):
                for _ in range(3):
                    status, _, _ = await call(port, "POST", path, body, ANTHROPIC_HEADERS)
                    assert status == 200
            assert (len(up.requests), up.connections) == (3, 1)
    run(scenario())

# ---- GET /v1/models from real data ------------------------------------------------------------

UPSTREAM_MODELS = {"data": [
    {"type": "model", "id": "claude-opus-5-5", "display_name": "Claude Opus 5.5", "created_at": "2026-06-01T00:00:00Z"},
    {"type": "model", "id": "claude-fable-9", "display_name": "Claude Fable 9", "created_at": "2027-01-01T00:00:00Z"}],
    "has_more": False, "first_id": "claude-opus-5-5", "last_id": "claude-fable-9"}


def models_upstream(req):
    """A fake Anthropic that lists two models and answers messages."""
    if req["method"] == "GET" and req["path"].startswith("/v1/models"):
        return http_response(200, UPSTREAM_MODELS)
    return http_response(200, anthropic_message())


def test_models_come_from_the_table_and_the_providers_own_list(tmp_path):
    async def scenario():
        async with FakeUpstream(models_upstream) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                status, _, body = await call(port, "GET", "/v1/models?limit=1000", headers=ANTHROPIC_HEADERS)
                listing = json.loads(body)
                await call(port, "GET", "/v1/models", headers=ANTHROPIC_HEADERS)
                retrieved = {name: await call(port, "GET", "/v1/models/" + name, headers=ANTHROPIC_HEADERS)
                             for name in ("claude-opus-5-5", "claude-sonnet-4-5", "claude-some-future-7")}
                openai_shape = json.loads((await call(port, "GET", "/v1/models/claude-opus-5-5"))[2])
            fetches = [r for r in up.requests if r["method"] == "GET"]
        ids = [m["id"] for m in listing["data"]]
        assert status == 200 and listing["has_more"] is False and ids[:2] == ["claude-opus-5-5", "claude-fable-9"]
        assert set(row[0] for row in cp.MODEL_TABLE if row[-1]) <= set(ids) and len(ids) == len(set(ids))
        assert listing["data"][0] == UPSTREAM_MODELS["data"][0]          # the provider's own object, as it sent it
        sonnet = next(m for m in listing["data"] if m["id"] == "claude-sonnet-4-5")
        assert (sonnet["display_name"], sonnet["max_tokens"], sonnet["max_input_tokens"]) == ("Claude Sonnet 4.5", 64000, 200000)
        assert len(fetches) == 1 and fetches[0]["path"] == "/v1/models?limit=1000"    # cached for the second listing
        assert fetches[0]["headers"]["x-api-key"] == "sk-ant-api03-testkey-0123456789"
        assert all(status == 200 for status, _, _ in retrieved.values())
        assert json.loads(retrieved["claude-some-future-7"][2])["id"] == "claude-some-future-7"
        assert openai_shape == {"id": "claude-opus-5-5", "object": "model", "created": 0, "owned_by": "anthropic"}
    run(scenario())


def test_models_paging_limit_after_and_before(tmp_path):
    async def scenario():
        async with FakeUpstream(models_upstream) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                all_ids = [m["id"] for m in json.loads((await call(port, "GET", "/v1/models?limit=1000",
                                                                   headers=ANTHROPIC_HEADERS))[2])["data"]]
                first = json.loads((await call(port, "GET", "/v1/models?limit=3", headers=ANTHROPIC_HEADERS))[2])
                after = json.loads((await call(port, "GET", "/v1/models?limit=3&after_id=" + first["last_id"],
                                               headers=ANTHROPIC_HEADERS))[2])
                before = json.loads((await call(port, "GET", "/v1/models?limit=2&before_id=" + after["first_id"],
                                                headers=ANTHROPIC_HEADERS))[2])
                default = json.loads((await call(port, "GET", "/v1/models", headers=ANTHROPIC_HEADERS))[2])
                bad = await call(port, "GET", "/v1/models?limit=0", headers=ANTHROPIC_HEADERS)
        assert [m["id"] for m in first["data"]] == all_ids[:3] and first["has_more"] is True
        assert (first["first_id"], first["last_id"]) == (all_ids[0], all_ids[2])
        assert [m["id"] for m in after["data"]] == all_ids[3:6]
        assert [m["id"] for m in before["data"]] == all_ids[1:3] and before["has_more"] is True
        assert len(default["data"]) == min(20, len(all_ids)) and bad[0] == 400
    run(scenario())


def test_gateway_discovery_lists_a_claude_name_for_every_route(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: Stream(openai_stream_chunks())) as up:
            config = make_config(tmp_path, providers={"o": {"format": "openai", "base_url": up.url + "/v1"}},
                                 models=[{"id": "deep", "provider": "o", "model": "deepseek-reasoner"}],
                                 routes={"default": "o,big", "background": "o,small", "think": "deep", "kimi": "o,kimi-k2"})
            async with running_proxy(config) as (_, port):
                listing = json.loads((await call(port, "GET", "/v1/models?limit=1000", headers=ANTHROPIC_HEADERS))[2])
                claude_ids = [m["id"] for m in listing["data"] if m["id"].startswith("claude")]   # Claude Code's filter
                for name in claude_ids:
                    await call(port, "POST", "/v1/messages", dict(HELLO, model=name, stream=True), ANTHROPIC_HEADERS)
                missing = await call(port, "GET", "/v1/models/claude-nothing", headers=ANTHROPIC_HEADERS)
            sent = [r["body"]["model"] for r in up.requests]
        assert claude_ids == ["claude-default", "claude-background", "claude-think", "claude-kimi"]
        assert sent == ["big", "small", "deepseek-reasoner", "kimi-k2"]
        assert missing[0] == 200        # any name routes (default): retrievable
    run(scenario())


def test_claude_code_with_a_name_it_does_not_know_gets_the_targets_rules_on_passthrough(tmp_path, caplog):
    """Claude Code's request for `--model glm-4.6`: routed to Sonnet 4.5 it is fitted (budget thinking, no
    effort, the trailing system message as user text); routed to a vendor model the table does not know it
    goes byte for byte, said once at INFO."""
    captured = CLAUDE_CODE_UNKNOWN_MODEL
    headers = dict(captured["headers"], **ANTHROPIC_HEADERS)
    raw = json.dumps(dict(captured["body"], stream=False)).encode()

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            config = make_config(tmp_path, up.url, providers={"v": {"format": "anthropic", "base_url": up.url,
                                                                    "api_key": "sk-v-123456789", "mid_system": True}},
                                 routes={"default": "anthropic,claude-sonnet-4-5", "glm": "v"})
            async with running_proxy(config) as (_, port):
                answers = [await call(port, "POST", captured["path"], raw, headers) for _ in range(3)]
                await call(port, "POST", captured["path"], json.dumps(dict(captured["body"], stream=False,
                                                                            model="qwen3")).encode(), headers)
        return answers, up.requests
    with caplog.at_level(logging.INFO, logger="claude_proxy"):
        answers, sent = run(scenario())
    assert [a[0] for a in answers] == [200, 200, 200]
    assert [r["raw"] for r in sent[:3]] == [raw] * 3                          # to glm-4.6 (route glm): as sent
    fitted = sent[3]["body"]
    assert fitted["model"] == "claude-sonnet-4-5" and fitted["thinking"] == {"type": "enabled", "budget_tokens": 32768}
    assert "output_config" not in fitted and fitted["max_tokens"] == 32768 + 1024
    assert [m["role"] for m in fitted["messages"]] == ["user"] and "# Environment" in fitted["messages"][0]["content"][-1]["text"]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model: thinking, effort")]
    assert len(said) == 1 and "'glm-4.6'" in said[0], said


def test_a_provider_list_that_fails_is_tolerated_and_logged_once(tmp_path, caplog):
    clock = [0.0]

    def script(req):
        return http_response(500, {"type": "error", "error": {"type": "api_error", "message": "down"}})

    async def scenario():
        async with FakeUpstream(script) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (server, port):
                server.model_lists.clock = lambda: clock[0]
                with caplog.at_level(logging.DEBUG, logger="claude_proxy"):
                    for _ in range(3):
                        status, _, body = await call(port, "GET", "/v1/models?limit=1000", headers=ANTHROPIC_HEADERS)
                        assert status == 200 and "claude-opus-5-5" in body.decode()
                        clock[0] += cp.MODELS_TTL + 1
            return len(up.requests)
    assert run(scenario()) == 3
    failures = [r for r in caplog.records if "model list is unavailable" in r.getMessage()]
    assert [r.levelname for r in failures] == ["WARNING", "DEBUG", "DEBUG"]


# ---- nothing lost in silence ------------------------------------------------------------------

def test_each_kind_of_dropped_field_is_said_once_at_info(tmp_path, caplog):
    body = dict(HELLO, stream=True, top_k=5, context_management={"edits": []}, frobnicate=1,
                tools=[dict(TOOLS[0], input_examples=[{}], eager_input_streaming=True)])

    async def scenario():
        async with FakeUpstream(lambda req: Stream(openai_stream_chunks())) as up:
            async with running_proxy(openai_config(tmp_path, up.url)) as (_, port):
                with caplog.at_level(logging.DEBUG, logger="claude_proxy"):
                    for _ in range(2):
                        assert (await call(port, "POST", "/v1/messages", body, ANTHROPIC_HEADERS))[0] == 200
    run(scenario())
    info = [r.getMessage().split(":")[0] for r in caplog.records if r.levelno == logging.INFO and r.name == "claude_proxy"]
    assert sorted(info) == ["context_management", "frobnicate", "tools.*.eager_input_streaming",
                            "tools.*.input_examples", "top_k"]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert sum(m.startswith("tools.0.input_examples:") for m in debug) == 2    # every time, with its path


def test_the_final_message_delta_carries_the_upstreams_real_counts(tmp_path):
    usage = {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30,
             "prompt_tokens_details": {"cached_tokens": 5, "cache_write_tokens": 3},
             "completion_tokens_details": {"reasoning_tokens": 4}}
    parts = openai_stream_chunks()[:-2] + [openai_sse({"choices": [], "usage": usage}), openai_sse("[DONE]")]

    async def scenario():
        async with FakeUpstream(lambda req: Stream(parts)) as up:
            async with running_proxy(openai_config(tmp_path, up.url)) as (_, port):
                return await call(port, "POST", "/v1/messages", dict(HELLO, stream=True, messages=[
                    {"role": "user", "content": "hello " * 2000}]), ANTHROPIC_HEADERS)
    status, _, body = run(scenario())
    events = [data for _, data in sse_events(body)]
    start, delta = events[0]["message"]["usage"], events[-2]["usage"]
    assert start["input_tokens"] > 1000 and start["cache_creation"] == {"ephemeral_5m_input_tokens": 0,
                                                                         "ephemeral_1h_input_tokens": 0}
    assert delta == usage_of(13, 9, read=5, written=3, thinking=4)      # the upstream's, not the estimate


# ---- Claude requests from OpenAI clients: the table and the version rules ---------------------

def test_openai_client_mid_conversation_system_goes_inline_with_the_beta(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                for model in ("claude-opus-4-8", "claude-sonnet-4-5"):
                    await call(port, "POST", "/v1/chat/completions", {"model": model, "temperature": 0.5, "messages": [
                        {"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                        {"role": "developer", "content": "D"}, {"role": "user", "content": "go"}]})
            return up.requests
    inline, folded = run(scenario())
    assert inline["body"]["messages"][1] == {"role": "system", "content": [{"type": "text", "text": "D"}]}
    assert "mid-conversation-system-2026-04-07" in inline["headers"]["anthropic-beta"]
    assert "temperature" not in inline["body"] and inline["headers"]["anthropic-version"] == "2023-06-01"
    assert [m["role"] for m in folded["body"]["messages"]] == ["user"] and "anthropic-beta" not in folded["headers"]
    assert folded["body"]["temperature"] == 0.5


# ---- sessions that switch routes ------------------------------------------------------------------

class SigningAnthropic:
    """A fake Anthropic that signs its thinking and rejects, like the real one, a request carrying a
    thinking block it did not sign, or a tool turn without its thinking block while thinking is on."""

    def __init__(self):
        self.issued = set()
        self.bodies = []

    def __call__(self, req):
        self.bodies.append(req["body"])
        error = self.reject(req["body"])
        if error:
            return http_response(400, {"type": "error", "error": {"type": "invalid_request_error", "message": error}})
        signature = "sig-%d" % len(self.bodies)
        self.issued.add(signature)
        return http_response(200, dict(anthropic_message("ok"), content=[
            {"type": "thinking", "thinking": "", "signature": signature}, {"type": "text", "text": "ok"}]))

    def reject(self, body):
        assistants = [m for m in body["messages"] if m["role"] == "assistant" and isinstance(m["content"], list)]
        for m in assistants:
            for b in m["content"]:
                if b["type"] == "thinking" and b.get("signature") not in self.issued:
                    return "messages: Invalid `signature` in `thinking` block"
        last = assistants[-1]["content"] if assistants else []
        if (body.get("thinking") or {}).get("type") in ("enabled", "adaptive") and \
                any(b["type"] == "tool_use" for b in last) and last[0]["type"] not in ("thinking", "redacted_thinking"):
            return "Expected `thinking` or `redacted_thinking`, but found `tool_use`."
        return None


def test_a_session_alternating_between_an_openai_route_and_claude_gets_no_400(tmp_path):
    claude = SigningAnthropic()
    reasoning_tool_call = [openai_sse(c) for c in [
        {"choices": [{"index": 0, "delta": {"reasoning_content": "Plan: write."}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_w", "type": "function",
                      "function": {"name": "Write", "arguments": '{"path": "x.txt"}'}}]}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}]] + [openai_sse("[DONE]")]

    async def scenario():
        async with FakeUpstream(claude) as anthropic_up, \
                FakeUpstream(lambda req: Stream(reasoning_tool_call)) as openai_up:
            config = make_config(tmp_path, anthropic_up.url,
                                 providers={"o": {"format": "openai", "base_url": openai_up.url + "/v1"}},
                                 routes={"default": "anthropic", "background": "o,small"})
            thinking = {"thinking": {"type": "adaptive"}, "max_tokens": 1000}
            async with running_proxy(config) as (_, port):
                history = [{"role": "user", "content": "write x.txt"}]
                status, _, body = await call(port, "POST", "/v1/messages",
                                             dict(HELLO, model="claude-haiku-4-5", messages=history, stream=True, **thinking),
                                             ANTHROPIC_HEADERS)
                converted = fold_anthropic_events([d for _, d in sse_events(body)])
                history += [{"role": "assistant", "content": converted["content"]},
                            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": converted["content"][1]["id"],
                                                          "content": "written"}]}]
                answers = []
                for _ in range(2):           # Claude answers the tool result, then the next turn with its own thinking kept
                    status, _, body = await call(port, "POST", "/v1/messages", dict(HELLO, model="claude-opus-5-5",
                                                 messages=history, **thinking), ANTHROPIC_HEADERS)
                    answers.append((status, json.loads(body)))
                    history += [{"role": "assistant", "content": json.loads(body)["content"]},
                                {"role": "user", "content": "and now?"}]
        return converted, answers
    converted, answers = run(scenario())
    assert [b["type"] for b in converted["content"]] == ["thinking", "tool_use"] and converted["content"][0]["signature"] == ""
    assert [status for status, _ in answers] == [200, 200]
    first, second = claude.bodies
    assert "thinking" not in first and [b["type"] for b in first["messages"][1]["content"]] == ["tool_use"]
    assert second["thinking"] == {"type": "adaptive"}
    assert second["messages"][3]["content"][0] == {"type": "thinking", "thinking": "", "signature": "sig-1"}


def test_a_session_routed_to_an_older_model_gets_its_system_messages_as_user_text(tmp_path):
    body = dict(HELLO, model="claude-opus-5-5", messages=[
        {"role": "user", "content": "hi"}, {"role": "system", "content": "# Environment"}])

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            config = make_config(tmp_path, up.url, routes={"default": "anthropic", "opus": "anthropic,claude-sonnet-4-5"})
            async with running_proxy(config) as (_, port):
                await call(port, "POST", "/v1/messages", body, ANTHROPIC_HEADERS)
                await call(port, "POST", "/v1/messages", dict(body, model="claude-fable-5-2"), ANTHROPIC_HEADERS)
            return [r["body"] for r in up.requests]
    routed, direct = run(scenario())
    assert routed["model"] == "claude-sonnet-4-5" and routed["messages"] == [
        {"role": "user", "content": [T("hi"), T("<system-reminder>\n# Environment\n</system-reminder>")]}]
    assert direct["messages"] == body["messages"]       # the model takes them: passed as sent


def test_a_vendors_signatures_go_back_to_it_alone(tmp_path):
    vendor_stream = anthropic_stream()[:1] + [
        sse_event("content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        sse_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "signature_delta", "signature": "vendor-sig"}}),
        sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})] + [
        part.replace(b'"index": 0', b'"index": 1') for part in anthropic_stream()[1:]]

    async def scenario():
        async with FakeUpstream(lambda req: Stream(vendor_stream)) as vendor, \
                FakeUpstream(lambda req: http_response(200, anthropic_message())) as anthropic_up:
            config = make_config(tmp_path, anthropic_up.url,
                                 providers={"kimi": {"format": "anthropic", "base_url": vendor.url, "api_key": "sk-kimi-1234567"}},
                                 routes={"default": "anthropic", "kimi": "kimi"})
            async with running_proxy(config) as (_, port):
                _, _, body = await call(port, "POST", "/v1/messages", dict(HELLO, model="kimi-k2", stream=True), ANTHROPIC_HEADERS)
                message = fold_anthropic_events([d for _, d in sse_events(body)])
                history = [HELLO["messages"][0], {"role": "assistant", "content": message["content"]},
                           {"role": "user", "content": "more"}]
                for model in ("kimi-k2", "claude-opus-5-5"):
                    await call(port, "POST", "/v1/messages", dict(HELLO, model=model, messages=history), ANTHROPIC_HEADERS)
            return message, vendor.requests[1]["body"], anthropic_up.requests[0]["body"]
    message, to_vendor, to_anthropic = run(scenario())
    assert message["content"][0]["signature"] == "claude-proxy:kimi:vendor-sig"
    assert to_vendor["messages"][1]["content"][0]["signature"] == "vendor-sig"
    assert [b["type"] for b in to_anthropic["messages"][1]["content"]] == ["text"]


def test_a_vendors_stream_and_answer_reach_the_client_byte_for_byte_but_signatures(tmp_path):
    sent, expected = vendor_stream_bytes()
    answer = json.dumps({"id": "msg_v", "type": "message", "role": "assistant", "model": "k2", "content": [
        {"type": "thinking", "thinking": "hmm", "signature": "ks"}, {"type": "text", "text": "Hi"}],
        "stop_reason": "end_turn", "usage": {"input_tokens": 5, "output_tokens": 9}}, indent=1).encode()
    pieces = [sent[:7], sent[7:400], sent[400:401], sent[401:]]

    def vendor_script(req):
        return Stream(pieces) if req["body"].get("stream") else http_response(200, answer)

    async def scenario():
        async with FakeUpstream(vendor_script) as vendor:
            config = make_config(tmp_path, providers={"kimi": {"format": "anthropic", "base_url": vendor.url,
                                                               "api_key": "sk-kimi-1234567"}}, routes={"default": "kimi"})
            async with running_proxy(config) as (_, port):
                streamed = await call(port, "POST", "/v1/messages", dict(HELLO, model="k2", stream=True), ANTHROPIC_HEADERS)
                whole = await call(port, "POST", "/v1/messages", dict(HELLO, model="k2"), ANTHROPIC_HEADERS)
        return streamed, whole
    (status, headers, body), (whole_status, _, whole_body) = run(scenario())
    assert (status, headers["content-type"]) == (200, "text/event-stream") and body == expected
    assert whole_status == 200 and whole_body == answer.replace(b'"ks"', b'"claude-proxy:kimi:ks"')


# ---- The Responses API end to end: the openai SDK on a Claude route, a chat route, a native one ------

def claude_message(anthropic_body):
    """The fake Claude's answer: the next tool while tools remain uncalled, then text (JSON when a
    schema is asked for), thinking first when it is on."""
    calls = sum(b.get("type") == "tool_result" for m in anthropic_body["messages"] if isinstance(m["content"], list)
                for b in m["content"])
    tools = anthropic_body.get("tools") or []
    content = [{"type": "thinking", "thinking": "Let me think.", "signature": "sig-%d" % calls}] \
        if anthropic_body.get("thinking") else []
    if calls < len(tools):
        tool = tools[calls]
        custom = "input" in (tool.get("input_schema") or {}).get("properties", {})      # a client's custom tool
        tool_input = {"input": "*** Begin Patch"} if custom else {"city": "Paris"}
        content.append({"type": "tool_use", "id": "toolu_%d" % calls, "name": tool["name"], "input": tool_input})
    else:
        schema = (anthropic_body.get("output_config") or {}).get("format")
        content.append({"type": "text", "text": '{"answer": "Hello"}' if schema else "Done." if calls else "Hello there"})
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": anthropic_body["model"], "content": content,
            "stop_reason": "tool_use" if content[-1]["type"] == "tool_use" else "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 3, "cache_read_input_tokens": 2, "cache_creation_input_tokens": 0}}


def fake_claude(req):
    """A scripted Claude: SSE when asked to stream, JSON otherwise."""
    message = claude_message(req["body"])
    if req["body"].get("stream"):
        return Stream([sse_event(e["type"], e) for e in cp.anthropic_message_as_events(message)])
    return http_response(200, message)


def fake_chat(req):
    """A scripted chat-completions provider over the same script (through the 9a request converter's view)."""
    body = req["body"]
    calls = sum(m["role"] == "tool" for m in body["messages"])
    tools = body.get("tools") or []
    tool = (tools[calls]["function"]["name"], {"city": "Paris"}) if calls < len(tools) else None
    if body.get("stream"):
        return Stream(openai_stream_chunks("Done." if calls else "Hello there", tool=tool, call_id="call_%d" % calls))
    message = {"role": "assistant", "content": None if tool else ("Done." if calls else "Hello there")}
    if tool:
        message["tool_calls"] = [{"id": "call_%d" % calls, "type": "function",
                                  "function": {"name": tool[0], "arguments": json.dumps(tool[1])}}]
    return http_response(200, {"id": "c", "object": "chat.completion", "created": 1, "model": "up", "choices": [
        {"index": 0, "message": message, "finish_reason": "tool_calls" if tool else "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}})


RESP_WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@contextlib.asynccontextmanager
async def responses_client(tmp_path, route="claude", **raw):
    """(openai.AsyncOpenAI at the proxy, the fake upstream, the proxy's port) for a Claude, chat or native route."""
    openai = pytest.importorskip("openai")
    script = {"claude": fake_claude, "chat": fake_chat}.get(route, lambda req: http_response(200, {"id": "resp_up"}))
    async with FakeUpstream(script) as up:
        if route == "claude":
            config = make_config(tmp_path, up.url, **raw)
        else:
            provider = {"format": "openai", "base_url": up.url + "/v1", "api_key": "sk-o-123456789",
                        "responses": route == "native"}
            config = make_config(tmp_path, providers={"o": provider}, routes={"default": "o,up-model"}, **raw)
        async with running_proxy(config) as (_, port):
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-client", max_retries=0)
            try:
                yield client, up, port
            finally:
                await client.close()


@pytest.mark.parametrize("route", ["claude", "chat"])
def test_openai_sdk_responses_text_stream_tools_and_state(tmp_path, route):
    async def scenario():
        async with responses_client(tmp_path, route) as (client, up, _):
            first = await client.responses.create(model="claude-sonnet-4-5", instructions="Be brief.", input="hi")
            assert first.output_text == "Hello there" and first.status == "completed" and first.id.startswith("resp_")
            assert first.usage.input_tokens == 12 and first.usage.total_tokens == 15 + (1 if route == "chat" else 0)
            async with client.responses.stream(model="claude-sonnet-4-5", input="hi") as stream:
                final = await stream.get_final_response()
            assert final.output_text == "Hello there"
            calls = await client.responses.create(model="claude-sonnet-4-5", input="weather in Paris?",
                                                  tools=[RESP_WEATHER], store=False)
            (call,) = [o for o in calls.output if o.type == "function_call"]
            assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
            items = [{"role": "user", "content": "weather in Paris?"}] + [o.model_dump(exclude_none=True) for o in calls.output]
            items.append({"type": "function_call_output", "call_id": call.call_id, "output": "sunny"})
            done = await client.responses.create(model="claude-sonnet-4-5", input=items, tools=[RESP_WEATHER])
            assert done.output_text == "Done."
            chained = await client.responses.create(model="claude-sonnet-4-5", input="and tomorrow?",
                                                    previous_response_id=done.id, tools=[RESP_WEATHER])
            assert chained.previous_response_id == done.id
            with pytest.raises(Exception) as missing:
                await client.responses.retrieve(calls.id)
            assert getattr(missing.value, "status_code", None) == 404
        system = up.requests[0]["body"]["system"] if route == "claude" else up.requests[0]["body"]["messages"][0]
        assert "Be brief." in json.dumps(system)
        history = up.requests[-1]["body"]["messages"]
        assert "weather in Paris?" in json.dumps(history) and "and tomorrow?" in json.dumps(history[-1])
        assert up.requests[1]["body"]["stream"] is True
    run(scenario())


def test_openai_sdk_responses_image_schema_retrieve_delete_and_input_items(tmp_path):
    async def scenario():
        async with responses_client(tmp_path) as (client, up, _):
            seen = await client.responses.create(model="claude-sonnet-4-5", input=[{"role": "user", "content": [
                {"type": "input_text", "text": "what is this?"},
                {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "auto"}]}])
            structured = await client.responses.create(model="claude-sonnet-4-5", input="answer in JSON", text={
                "format": {"type": "json_schema", "name": "answer", "strict": True,
                           "schema": {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}}})
            assert json.loads(structured.output_text) == {"answer": "Hello"}
            again = await client.responses.retrieve(seen.id)
            assert again.id == seen.id and again.output_text == seen.output_text
            page = await client.responses.input_items.list(seen.id, order="asc")
            assert [i.type for i in page.data] == ["message"] and page.data[0].id.startswith("msg_")
            assert page.data[0].content[1].type == "input_image"
            await client.responses.delete(seen.id)
            with pytest.raises(Exception) as gone:
                await client.responses.retrieve(seen.id)
            assert getattr(gone.value, "status_code", None) == 404
        image = up.requests[0]["body"]["messages"][0]["content"][1]
        assert image == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
        assert up.requests[1]["body"]["output_config"]["format"]["schema"]["additionalProperties"] is False
    run(scenario())


def test_reasoning_round_trip_through_the_proxy_and_cache_marks(tmp_path):
    """With store false (Codex's way), the reasoning item a client replays becomes the signed thinking block
    Claude requires before the tool result; prompt_cache_key adds stable cache breakpoints."""
    async def scenario():
        async with responses_client(tmp_path) as (client, up, _):
            ask = dict(model="claude-sonnet-4-5", tools=[RESP_WEATHER], store=False, reasoning={"effort": "low", "summary": "auto"},
                       include=["reasoning.encrypted_content"], prompt_cache_key="session-1")
            first = await client.responses.create(input="weather?", **ask)
            assert [o.type for o in first.output] == ["reasoning", "function_call"]
            assert first.output[0].summary[0].text == "Let me think." and first.output[0].encrypted_content.startswith("cp1.")
            items = [{"role": "user", "content": "weather?"}] + [o.model_dump(exclude_none=True) for o in first.output]
            items.append({"type": "function_call_output", "call_id": first.output[1].call_id, "output": "sunny"})
            second = await client.responses.create(input=items, **ask)
            assert second.output_text == "Done."
        replayed = up.requests[1]["body"]
        assert replayed["thinking"] == {"type": "enabled", "budget_tokens": 8192}
        assert replayed["messages"][1]["content"][:2] == [
            {"type": "thinking", "thinking": "Let me think.", "signature": "sig-0"},
            {"type": "tool_use", "id": "toolu_0", "name": "get_weather", "input": {"city": "Paris"}}]
        assert replayed["messages"][-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    run(scenario())


def test_responses_stream_wire_format_and_custom_tool_on_claude(tmp_path):
    async def scenario():
        async with responses_client(tmp_path) as (_, up, port):
            status, headers, body = await call(port, "POST", "/v1/responses", {
                "model": "claude-sonnet-4-5", "stream": True, "input": "patch it", "store": False,
                "tools": [APPLY_PATCH, {"type": "web_search"}]})
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        events = sse_events(body)
        assert all(name == data["type"] for name, data in events)
        response = check_responses_grammar([data for _, data in events])
        assert response["output"][0] == {"id": response["output"][0]["id"], "type": "custom_tool_call",
                                          "call_id": "toolu_0", "name": "apply_patch", "input": "*** Begin Patch"}
        assert [t["name"] for t in up.requests[0]["body"]["tools"]] == ["apply_patch"]
    run(scenario())


def test_codex_default_model_on_claude_gets_its_tools_and_a_tool_round_trip(tmp_path):
    """Codex's gpt-6-astra request (tools only in an additional_tools item) routed to Claude: Claude gets
    the tools, its call to the namespaced custom exec goes back as Codex's custom_tool_call, and the
    replayed turn (the item sent again) reaches Claude as tool_use + tool_result."""
    async def scenario():
        async with responses_client(tmp_path, routes={"default": "anthropic,claude-sonnet-4-5"}) as (_, up, port):
            status, _, body = await call(port, "POST", "/v1/responses", ASTRA_TURN1)
            assert status == 200
            call_item = check_responses_grammar([data for _, data in sse_events(body)])["output"][-1]
            second = dict(ASTRA_TURN1, input=ASTRA_TURN1["input"] + [
                call_item, {"type": "custom_tool_call_output", "call_id": call_item["call_id"], "output": "exit 0"}])
            status, _, body = await call(port, "POST", "/v1/responses", second)
            assert status == 200
            answer = check_responses_grammar([data for _, data in sse_events(body)])
        return call_item, answer, up.requests
    call_item, answer, sent = run(scenario())
    assert call_item == {"id": call_item["id"], "type": "custom_tool_call", "call_id": "toolu_0", "name": "exec",
                         "input": "*** Begin Patch", "namespace": "functions"}
    assert [t["name"] for t in sent[0]["body"]["tools"]] == [
        "functions__exec", "functions__wait", "clock__sleep", "collaboration__list_agents", "collaboration__send_message"]
    assert sent[1]["body"]["tools"] == sent[0]["body"]["tools"]
    assert [b["type"] for m in sent[1]["body"]["messages"] for b in m["content"]][-2:] == ["tool_use", "tool_result"]
    assert sent[1]["body"]["messages"][-2]["content"][-1]["name"] == "functions__exec"
    assert {k: answer["output"][-1][k] for k in ("type", "name", "namespace", "call_id")} == {
        "type": "function_call", "name": "wait", "namespace": "functions", "call_id": "toolu_1"}   # the fake's next tool


def test_a_dropped_built_in_tool_is_said_once_not_on_every_request(tmp_path, caplog):
    async def scenario():
        async with responses_client(tmp_path) as (_, up, port):
            for _ in range(3):                      # Codex sends web_search with every request
                sent = {"model": "claude-sonnet-4-5", "input": "hi", "store": False, "tools": [{"type": "web_search"}]}
                status, _, _ = await call(port, "POST", "/v1/responses", sent)
                assert status == 200
    with caplog.at_level(logging.INFO, logger="claude_proxy"):
        run(scenario())
    said = [r.getMessage() for r in caplog.records if "tools.web_search" in r.getMessage() and r.levelno == logging.INFO]
    assert len(said) == 1 and "said once" in said[0], said


def test_native_responses_provider_is_relayed_as_is(tmp_path):
    async def scenario():
        async with responses_client(tmp_path, "native") as (_, up, port):
            sent = {"model": "gpt-5-codex", "input": "hi", "previous_response_id": "resp_upstream", "store": True}
            status, _, body = await call(port, "POST", "/v1/responses", sent, {"authorization": "Bearer sk-client"})
        assert status == 200 and json.loads(body) == {"id": "resp_up"}
        (req,) = up.requests
        assert req["path"] == "/v1/responses" and req["headers"]["authorization"] == "Bearer sk-o-123456789"
        assert req["body"] == dict(sent, model="up-model")
    run(scenario())


def test_responses_errors_in_openai_shape(tmp_path):
    async def scenario():
        async with responses_client(tmp_path) as (_, up, port):
            answers = [await call(port, "POST", "/v1/responses", {"model": "claude-sonnet-4-5", "input": "hi",
                                                                  "previous_response_id": "resp_nope"}),
                       await call(port, "GET", "/v1/responses/resp_nope"),
                       await call(port, "DELETE", "/v1/responses/resp_nope"),
                       await call(port, "GET", "/v1/responses/resp_nope/input_items"),
                       await call(port, "GET", "/v1/responses/x/input_items?limit=0"),
                       await call(port, "POST", "/v1/responses", {"model": "claude-sonnet-4-5", "input": 3}),
                       await call(port, "POST", "/v1/responses", {"model": "claude-sonnet-4-5", "input": "hi",
                                                                  "tools": [{"type": "web_search"}],
                                                                  "tool_choice": {"type": "web_search_preview"}}),
                       await call(port, "POST", "/v1/responses/resp_1/cancel"),
                       await call(port, "GET", "/v1/responses/resp_1?stream=true")]
            started = time.monotonic()
            ws = await call(port, "GET", "/v1/responses", headers={"upgrade": "websocket", "connection": "Upgrade",
                                                                   "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
                                                                   "sec-websocket-version": "13"})
            assert time.monotonic() - started < 1.0
        statuses = [a[0] for a in answers] + [ws[0]]
        assert statuses == [404, 404, 404, 404, 400, 400, 400, 404, 400, 426]
        for _, _, body in answers + [ws]:
            error = json.loads(body)["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert "resp_nope" in json.loads(answers[0][2])["error"]["message"]
        assert json.loads(answers[0][2])["error"]["param"] == "previous_response_id"
        assert not up.requests
    run(scenario())


def test_responses_upstream_failure_mid_stream_is_one_response_failed(tmp_path):
    parts = anthropic_stream()[:3] + [("reset",)]

    async def scenario():
        async with FakeUpstream(lambda req: Stream(parts) if req["body"].get("stream") else
                                http_response(529, {"type": "error", "error": {"type": "overloaded_error",
                                                                               "message": "Overloaded"}})) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                status, _, body = await call(port, "POST", "/v1/responses",
                                             {"model": "claude-sonnet-4-5", "input": "hi", "stream": True})
                plain = await call(port, "POST", "/v1/responses", {"model": "claude-sonnet-4-5", "input": "hi"})
        events = [data for _, data in sse_events(body)]
        assert status == 200 and [e["type"] for e in events][-1] == "response.failed"
        response = check_responses_grammar(events)
        assert response["error"]["code"] == "server_error" and response["output"] == []
        assert plain[0] == 529 and json.loads(plain[2])["error"]["type"] == "overloaded_error"
    run(scenario())


def test_store_false_keeps_nothing_and_store_is_bounded(tmp_path):
    store = cp.ResponseStore(str(tmp_path / "home" / "responses.db"), max_bytes=2400, max_age=100.0,
                             clock=lambda: now[0])
    now = [1000.0]
    big = {"id": "", "output": [{"type": "message", "id": "msg_o", "content": [{"type": "output_text", "text": "x" * 400}]}]}
    for i in range(5):
        store.put(dict(big, id=f"resp_{i}", previous_response_id=f"resp_{i - 1}" if i else None),
                  [{"type": "message", "id": f"msg_{i}", "role": "user", "content": "q"}], "")
        now[0] += 1
    kept = [i for i in range(5) if store.get(f"resp_{i}", "")]
    assert kept == [3, 4]                          # each ~1100 bytes: the oldest went first
    items, size = store.history("resp_4", "", 10 ** 6)
    assert [i["id"] for i in items] == ["msg_3", "msg_o", "msg_4", "msg_o"] and size == sum(len(json.dumps(
        i, separators=(",", ":"))) for i in items)
    assert store.history("resp_4", "", size - 1) == ([], size) and store.history("resp_4", "other", 10 ** 6) is None
    other = cp.ResponseStore(store.path, max_bytes=10 ** 6, max_age=100.0, clock=lambda: now[0])
    assert other.get("resp_4", "")["id"] == "resp_4" and other.items(["msg_4", "nope", "msg_4"], "").keys() == {"msg_4"}
    now[0] += 200
    other.put(dict(big, id="resp_new"), [], "")
    assert store.get("resp_4", "") is None and store.get("resp_new", "") is not None
    assert os.stat(store.path).st_mode & 0o777 == 0o600 if POSIX else True
    assert store.delete("resp_new", "") and not store.delete("resp_new", "") and store.input_items("resp_new", "") is None

    async def scenario():
        async with responses_client(tmp_path / "p") as (client, _, _):
            answer = await client.responses.create(model="claude-sonnet-4-5", input="hi", store=False)
            with pytest.raises(Exception):
                await client.responses.retrieve(answer.id)
    run(scenario())
    assert not os.path.exists(tmp_path / "p" / "home" / "responses.db")


def test_agents_sdk_default_runner_with_two_tools_on_claude(tmp_path):
    """The OpenAI Agents SDK's default model class (Responses) runs a two-tool agent through the proxy."""
    agents = pytest.importorskip("agents")
    called = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Weather of a city."""
        called.append(("weather", city))
        return f"sunny in {city}"

    @agents.function_tool
    def get_time(city: str) -> str:
        """Local time of a city."""
        called.append(("time", city))
        return f"12:00 in {city}"

    async def scenario():
        async with responses_client(tmp_path) as (client, up, _):
            model = agents.OpenAIResponsesModel(model="claude-sonnet-4-5", openai_client=client)
            agent = agents.Agent(name="w", instructions="Use both tools.", model=model, tools=[get_weather, get_time],
                                 model_settings=agents.ModelSettings(reasoning={"effort": "low", "summary": "auto"}))
            result = await agents.Runner.run(agent, "Weather and time in Paris?",
                                             run_config=agents.RunConfig(tracing_disabled=True))
        assert result.final_output == "Done." and called == [("weather", "Paris"), ("time", "Paris")]
        last = up.requests[-1]["body"]
        assert [m["role"] for m in last["messages"]] == ["user", "assistant", "user", "assistant", "user"]
        assert last["messages"][3]["content"][0] == {"type": "thinking", "thinking": "Let me think.", "signature": "sig-1"}
    run(scenario())


def test_a_broken_store_is_a_500_on_reads_and_a_warning_on_writes(tmp_path, caplog):
    async def scenario():
        async with FakeUpstream(fake_claude) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                (tmp_path / "home").mkdir(exist_ok=True)
                (tmp_path / "home" / "responses.db").write_bytes(b"this is not a database" * 100)
                read = await call(port, "GET", "/v1/responses/resp_1")
                written = await call(port, "POST", "/v1/responses", {"model": "claude-sonnet-4-5", "input": "hi",
                                                                     "reasoning": "high"})
        assert read[0] == 500 and "response store" in json.loads(read[2])["error"]["message"]
        assert written[0] == 200 and json.loads(written[2])["output"][0]["content"][0]["text"] == "Hello there"
        assert any("not stored" in r.getMessage() for r in caplog.records)
    run(scenario())


def test_responses_on_the_subscription_login_get_its_request_shape(tmp_path):
    async def scenario():
        async with FakeUpstream(fake_claude) as up:
            config = oauth_config(tmp_path, up.url, "http://127.0.0.1:9/token")
            seed_login(config)
            async with running_proxy(config) as (_, port):
                status, _, body = await call(port, "POST", "/v1/responses", dict(CODEX_TURN1, stream=False),
                                             {"authorization": "Bearer codex-key"})
        assert status == 200 and json.loads(body)["output"][0]["type"] == "reasoning"
        sent = up.requests[0]
        assert sent["headers"]["authorization"] == "Bearer sk-ant-oat01-old" and "x-api-key" not in sent["headers"]
        assert sent["headers"]["anthropic-beta"] == "oauth-2025-04-20,interleaved-thinking-2025-05-14"
        assert sent["body"]["system"][0] == {"type": "text", "text": CLAUDE_CODE_IDENTITY}
        assert 0 < count_marks(sent["body"]) <= 4
    run(scenario())


def test_list_page_cursor():
    items = [{"id": f"i{k}"} for k in range(5)]
    assert cp.list_page(items, 2, "desc", None) == {"object": "list", "data": [{"id": "i4"}, {"id": "i3"}],
                                                    "first_id": "i4", "last_id": "i3", "has_more": True}
    assert cp.list_page(items, 2, "asc", "i2")["data"] == [{"id": "i3"}, {"id": "i4"}]
    assert cp.list_page(items, 2, "asc", "i3")["has_more"] is False and cp.list_page([], 5, "asc", None)["first_id"] is None


def test_responses_routes_reasoning_to_the_think_route_and_variants(tmp_path):
    async def scenario():
        async with FakeUpstream(fake_claude) as up:
            config = make_config(tmp_path, up.url, routes={"default": "anthropic", "think": "anthropic,claude-opus-4-8"})
            async with running_proxy(config) as (_, port):
                for body in ({"model": "claude-sonnet-4-5", "input": "hi", "reasoning": {"effort": "high"}},
                             {"model": "claude-sonnet-4-5", "input": "hi"},
                             {"model": "claude-sonnet-4-5-reasoning-low", "input": "hi"}):
                    status, _, _ = await call(port, "POST", "/v1/responses", body)
                    assert status == 200
        models = [r["body"]["model"] for r in up.requests]
        assert models == ["claude-opus-4-8", "claude-sonnet-4-5", "claude-opus-4-8"]
        assert up.requests[0]["body"]["thinking"] == {"type": "adaptive"}
        assert up.requests[2]["body"]["output_config"] == {"effort": "low"}
    run(scenario())



# =============================================================================================
# 12. Operations: usage meter and ledger, stats, plugins, reload, status page, doctor, menu
# =============================================================================================

def feed_in_pieces(data, cuts):
    """A fresh meter fed by a UsageScanner with data cut at `cuts`."""
    meter = cp.UsageMeter()
    scanner = cp.UsageScanner(meter, clock=lambda: 1.0)
    last = 0
    for cut in list(cuts) + [len(data)]:
        scanner.feed(data[last:cut])
        last = cut
    return meter


ANTHROPIC_USAGE_STREAM = b"".join([
    sse_event("message_start", {"type": "message_start", "message": {
        "id": "m", "type": "message", "role": "assistant", "model": "x", "content": [],
        "usage": {"input_tokens": 10, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20,
                  "output_tokens": 1}}}),
    sse_event("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}}),
    sse_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
        "type": "text_delta", "text": 'a "usage": {"input_tokens": 999} message_delta'}}),
    sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
    sse_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                "usage": {"output_tokens": 7}}),
    sse_event("message_stop", {"type": "message_stop"})])
OPENAI_USAGE = {"prompt_tokens": 50, "completion_tokens": 9, "total_tokens": 59,
                "prompt_tokens_details": {"cached_tokens": 30}, "completion_tokens_details": {"reasoning_tokens": 4}}


def openai_usage_stream(text="Hi"):
    """OpenAI chunks with "usage": null on each (include_usage) and the usage chunk at the end."""
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "up", "usage": None}
    parts = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}]),
             dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]),
             dict(base, choices=[], usage=OPENAI_USAGE)]
    return [openai_sse(p) for p in parts] + [openai_sse("[DONE]")]


ANTHROPIC_TOKENS = (10, 7, 100, 20, 0)
OPENAI_TOKENS = (20, 9, 30, 0, 4)


@pytest.mark.parametrize("usage, tokens", [
    ({"input_tokens": 3, "output_tokens": 4, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 6,
      "output_tokens_details": {"thinking_tokens": 2}}, (3, 4, 5, 6, 2)),
    (OPENAI_USAGE, OPENAI_TOKENS),
    ({"prompt_tokens": 12, "completion_tokens": 4, "prompt_cache_hit_tokens": 2}, (10, 4, 2, 0, 0)),
    ({"input_tokens": 40, "output_tokens": 8, "total_tokens": 48, "input_tokens_details": {"cached_tokens": 25},
      "output_tokens_details": {"reasoning_tokens": 3}}, (15, 8, 25, 0, 3)),
])
def test_usage_meter_takes_every_dialects_usage(usage, tokens):
    meter = cp.UsageMeter()
    assert meter.tokens() == (None,) * 5
    meter.take(usage)
    assert meter.tokens() == tokens


def test_usage_meter_merges_anthropic_message_delta_key_by_key():
    meter = cp.UsageMeter()
    meter.take({"input_tokens": 10, "output_tokens": 1})
    meter.take({"output_tokens": 7})
    meter.take(None)
    assert meter.tokens() == (10, 7, 0, 0, 0)


GROQ_USAGE_CHUNK = openai_sse({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {},
                                "finish_reason": "stop"}], "x_groq": {"id": "g", "usage": OPENAI_USAGE}})


@pytest.mark.parametrize("data, tokens", [(ANTHROPIC_USAGE_STREAM, ANTHROPIC_TOKENS),
                                          (b"".join(openai_usage_stream()), OPENAI_TOKENS),
                                          (GROQ_USAGE_CHUNK, OPENAI_TOKENS),
                                          (ANTHROPIC_USAGE_STREAM.replace(b"\n", b"\r\n"), ANTHROPIC_TOKENS)])
def test_usage_scanner_whole_byte_by_byte_and_split_at_every_index(data, tokens):
    assert feed_in_pieces(data, []).tokens() == tokens
    assert feed_in_pieces(data, range(1, len(data))).tokens() == tokens
    for cut in range(1, len(data)):
        assert feed_in_pieces(data, [cut]).tokens() == tokens, cut


def test_usage_scanner_parses_only_lines_holding_a_usage_object(monkeypatch):
    parsed = []
    real = cp.loads_event
    monkeypatch.setattr(cp, "loads_event", lambda text: parsed.append(text) or real(text))
    meter = feed_in_pieces(b"".join(openai_usage_stream()) + ANTHROPIC_USAGE_STREAM, [])
    assert len(parsed) == 3 and meter.first_byte_at == 1.0      # the usage chunk, message_start, message_delta


@pytest.mark.parametrize("spec, prices", [
    ({"model": "claude-sonnet-4-5-20250929"}, (3e-6, 15e-6, 0.3e-6, 3.75e-6)),
    ({"model": "anthropic/claude-opus-4.1"}, (15e-6, 75e-6, 1.5e-6, 18.75e-6)),
    ({"model": "claude-opus-4-5"}, (5e-6, 25e-6, 0.5e-6, 6.25e-6)),
    ({"model": "gpt-4o-mini-2024-07-18"}, (0.15e-6, 0.6e-6, 0.075e-6, 0.15e-6)),
    ({"model": "gpt-5"}, (1.25e-6, 10e-6, 0.125e-6, 1.25e-6)),
    ({"model": "deepseek-chat"}, (0.28e-6, 0.42e-6, 0.028e-6, 0.28e-6)),
    ({"model": "my-local-llama"}, None),
    ({"model": "my-local-llama", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}, (1e-6, 2e-6, 1e-6, 1e-6)),
    ({"model": "gpt-4o", "output_cost_per_token": 0.0}, (2.5e-6, 0.0, 1.25e-6, 2.5e-6)),
    ({"model": "my-local-llama", "input_cost_per_token": 1e-6}, None),
])
def test_prices_table_and_configured_overrides(spec, prices):
    got = cp.model_prices(spec, cp.table_prices(spec["model"]))
    assert got == (None if prices is None else pytest.approx(prices))


def test_request_cost_is_null_without_a_price_or_usage():
    prices = (3e-6, 15e-6, 0.3e-6, 3.75e-6)
    assert cp.request_cost(prices, ANTHROPIC_TOKENS) == pytest.approx(2.4e-4)
    assert cp.request_cost(None, ANTHROPIC_TOKENS) is None
    assert cp.request_cost(prices, (None,) * 5) is None


def test_price_keys_are_validated_in_the_config():
    with pytest.raises(cp.ConfigError, match=r"models\.0\.input_cost_per_token"):
        cp.parse_config({"models": [{"id": "m", "provider": "anthropic", "input_cost_per_token": "cheap"}]}, {})
    spec = cp.parse_config({"models": [{"id": "m", "provider": "anthropic", "output_cost_per_token": 2}]}, {}).models["m"]
    assert spec["output_cost_per_token"] == 2.0


@pytest.mark.parametrize("value, expected", [
    (None, 0.0), ("", 0.0), ("30m", 1e6 - 1800), ("24h", 1e6 - 86400), ("7d", 1e6 - 7 * 86400),
    ("2w", 1e6 - 14 * 86400), ("1970-01-02", 86400.0), ("1970-01-02T00:00:10Z", 86410.0)])
def test_parse_since(value, expected):
    assert cp.parse_since(value, 1e6) == expected


def test_parse_since_rejects_garbage():
    with pytest.raises(BadRequest, match="since"):
        cp.parse_since("yesterday", 1e6)


def usage_row(ts, model, route="model", status=200, tokens=ANTHROPIC_TOKENS, cost=2.4e-4, error=None):
    """A ledger row as request_done makes it."""
    return cp.UsageRecord(ts, "anthropic", model, route, "anthropic", model, status, error, *tokens,
                          5.0, 20.0, cost, None)


def test_usage_totals_and_stats_table():
    totals = cp.UsageTotals()
    totals.add_record(usage_row(86400 * 2, "a"))
    totals.add_record(usage_row(86400 * 2 + 5, "b", cost=None))
    totals.add_record(usage_row(86400 * 3, "a", status=529, tokens=(None,) * 5, cost=None, error="overloaded_error"))
    doc = totals.as_dict()
    assert {k: doc[k] for k in cp.COUNTERS} == {
        "requests": 3, "errors": 1, "input_tokens": 20, "output_tokens": 14, "cache_read_input_tokens": 200,
        "cache_creation_input_tokens": 40, "reasoning_tokens": 0, "cost_usd": 2.4e-4, "unpriced_requests": 1}
    assert doc["by_model"]["a"]["requests"] == 2 and doc["by_model"]["b"]["cost_usd"] is None
    assert list(doc["by_day"]) == ["1970-01-03", "1970-01-04"] and doc["by_route"]["model"]["requests"] == 3
    table = cp.format_stats_table(doc, "model")
    assert table.splitlines()[2].split() == ["a", "2", "1", "10", "7", "100", "20", "0", "$0.0002"]
    assert table.splitlines()[3].split()[-1] == "n/a" and "1 request(s) on models without a known price" in table


def test_ledger_and_session_totals_follow_the_same_rules(tmp_path):
    rows = [usage_row(86400 * 2, "a"), usage_row(86400 * 2 + 1, "b", route="default", cost=None),
            usage_row(86400 * 3, "a", status=529, tokens=(None,) * 5, cost=None, error="overloaded_error"),
            usage_row(86400 * 3, "a", status=200, error="api_error"),               # an error event mid-stream
            usage_row(86400 * 3, "c", status=499, tokens=(None,) * 5, cost=None, error="cancelled"),
            usage_row(86400 * 3, None, route=None, status=404, tokens=(None,) * 5, cost=None, error="not_found_error")]
    session, ledger = cp.UsageTotals(), cp.UsageLedger(str(tmp_path / "usage.db"), clock=lambda: 86400 * 4)
    for row in rows:
        session.add_record(row)
        ledger.add(row)
    ledger.close()
    assert ledger.totals() == session.as_dict()
    assert (session.as_dict()["requests"], session.as_dict()["errors"]) == (6, 3)
    assert session.as_dict()["by_model"]["c"]["errors"] == 0 and "-" in session.as_dict()["by_route"]


def test_ledger_writes_in_batches_reads_groups_and_prunes(tmp_path):
    clock = [86400.0 * 100]
    ledger = cp.UsageLedger(str(tmp_path / "h" / "usage.db"), max_age_days=10, max_rows=3,
                            clock=lambda: clock[0], interval=0.05)
    ledger.add(usage_row(clock[0] - 86400 * 20, "old"))          # past the age limit: pruned at open
    for i in range(4):
        ledger.add(usage_row(clock[0] - i, "m"))
    assert ledger.flush()
    assert stat.S_IMODE(os.stat(ledger.path).st_mode) == 0o600
    totals = ledger.totals()
    assert totals["requests"] == 5 and totals["cost_usd"] == pytest.approx(5 * 2.4e-4)
    assert ledger.totals(since=clock[0] - 1.5)["requests"] == 2
    db = ledger._open()
    ledger._prune(db)
    db.close()
    assert ledger.totals()["requests"] == 3 and "old" not in ledger.totals()["by_model"]
    ledger.close()
    assert not ledger._thread.is_alive() and ledger.rows_written == 5


def test_a_lone_surrogate_in_a_batch_costs_neither_that_row_nor_the_others(tmp_path):
    ledger = cp.UsageLedger(str(tmp_path / "h" / "usage.db"), clock=lambda: 86400.0 * 100, interval=0.05)
    for model in ("before", "x\ud800y", "after"):      # one batch; the middle row cannot be encoded as is
        ledger.add(usage_row(86400.0 * 100, model))
    assert ledger.flush()
    by_model = ledger.totals()["by_model"]
    assert ledger.rows_written == 3 and sum(m["requests"] for m in by_model.values()) == 3
    assert set(by_model) == {"before", "after", "x?y"}, by_model
    ledger.close()


def test_broken_ledger_logs_one_warning_and_the_proxy_serves_on(tmp_path, caplog):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "usage.db").write_bytes(b"this is not a database" * 100)

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (server, port):
                for _ in range(3):
                    status, _, _ = await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
                    assert status == 200
                    await asyncio.get_running_loop().run_in_executor(None, server.ops.ledger.flush)
                assert server.ops.ledger.error and server.ops.session.as_dict()["requests"] == 3
                status, _, body = await call(port, "GET", "/v1/stats")
                assert status == 200 and json.loads(body)["all_time"] is None
    with caplog.at_level(logging.WARNING, logger="claude_proxy"):
        run(scenario())
    said = [r.getMessage() for r in caplog.records if "usage ledger" in r.getMessage()]
    assert len(said) == 2 and "is unusable" in said[0] and "3 rows not recorded (at close" in said[1]


def test_ledger_off_writes_nothing(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            async with running_proxy(make_config(tmp_path, up.url, usage_ledger=False)) as (server, port):
                assert server.ops.ledger is None
                await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
                _, _, body = await call(port, "GET", "/v1/stats")
                stats = json.loads(body)
                assert stats["session"]["requests"] == 1 and stats["all_time"] is None
                assert stats["ledger"] == {"enabled": False}
    run(scenario())
    assert not (tmp_path / "home" / "usage.db").exists()


# ---- The scripted session: every path, known usage, configured prices, stats before and after a restart

SONNET_PRICES = {"input_cost_per_token": 3e-6, "output_cost_per_token": 15e-6,
                 "cache_read_cost_per_token": 0.3e-6, "cache_write_cost_per_token": 3.75e-6}
GPT_PRICES = {"input_cost_per_token": 2.5e-6, "output_cost_per_token": 10e-6, "cache_read_cost_per_token": 1.25e-6}


def usage_anthropic_upstream(req):
    """Anthropic fake with ANTHROPIC_TOKENS usage; "fail" as the last user text answers 400."""
    if json.dumps(req["body"]["messages"][-1]).find('"fail"') >= 0:
        return http_response(400, {"type": "error", "error": {"type": "invalid_request_error", "message": "no"}})
    if req["body"].get("stream"):
        return Stream([ANTHROPIC_USAGE_STREAM])
    return http_response(200, dict(anthropic_message(), usage={
        "input_tokens": 10, "output_tokens": 7, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20}))


def usage_openai_upstream(req):
    """OpenAI fake with OPENAI_TOKENS usage."""
    if req["body"].get("stream"):
        return Stream(openai_usage_stream())
    return http_response(200, dict(OPENAI_COMPLETION, usage=OPENAI_USAGE))


def session_config(tmp_path, anthropic_url, openai_url):
    """Both provider formats, a priced model on each."""
    return make_config(tmp_path, anthropic_url, providers={"o": {"format": "openai", "base_url": openai_url + "/v1",
                                                                 "api_key": OPENAI_PROVIDER_KEY}},
                       models=[dict({"id": "sonnet-direct", "provider": "anthropic", "model": "claude-sonnet-4-5"},
                                    **SONNET_PRICES),
                               dict({"id": "gpt-up", "provider": "o", "model": "gpt-4o"}, **GPT_PRICES)])


SESSION_CALLS = [  # (path, model, stream): every path, both ways, streaming or not
    ("/v1/messages", "sonnet-direct", True), ("/v1/messages", "sonnet-direct", False),
    ("/v1/messages", "gpt-up", True), ("/v1/messages", "gpt-up", False),
    ("/v1/chat/completions", "gpt-up", True), ("/v1/chat/completions", "gpt-up", False),
    ("/v1/chat/completions", "sonnet-direct", True), ("/v1/chat/completions", "sonnet-direct", False),
    ("/v1/responses", "sonnet-direct", True), ("/v1/responses", "sonnet-direct", False),
    ("/v1/responses", "gpt-up", True), ("/v1/responses", "gpt-up", False)]


def expected_session_totals():
    """What SESSION_CALLS plus one failed request must add up to."""
    sonnet = cp.request_cost(tuple(SONNET_PRICES.values()), ANTHROPIC_TOKENS)
    gpt = cp.request_cost((2.5e-6, 10e-6, 1.25e-6, 2.5e-6), OPENAI_TOKENS)
    ok = len([call for call in SESSION_CALLS if call[1] == "gpt-up"])          # as many for each model
    per_model = {"sonnet-direct": (ok + 1, 1, ANTHROPIC_TOKENS, ok * sonnet), "gpt-up": (ok, 0, OPENAI_TOKENS, ok * gpt)}
    return {model: {"requests": n, "errors": errors, "input_tokens": ok * t[0], "output_tokens": ok * t[1],
                    "cache_read_input_tokens": ok * t[2], "cache_creation_input_tokens": ok * t[3],
                    "reasoning_tokens": ok * t[4], "cost_usd": pytest.approx(cost), "unpriced_requests": 0}
            for model, (n, errors, t, cost) in per_model.items()}


async def run_session(port):
    """SESSION_CALLS and one request the upstream refuses."""
    for path, model, stream in SESSION_CALLS:
        body = dict(HELLO, model=model, stream=stream)
        if path == "/v1/responses":                     # Codex and the Agents SDK are counted too
            body = {"model": model, "input": "hi", "stream": stream, "store": False}
        elif path == "/v1/chat/completions" and stream:
            body["stream_options"] = {"include_usage": True}
        status, _, _ = await call(port, "POST", path, body, ANTHROPIC_HEADERS)
        assert status == 200, (path, model, stream)
    failing = dict(HELLO, model="sonnet-direct", messages=[{"role": "user", "content": "fail"}])
    assert (await call(port, "POST", "/v1/messages", failing, ANTHROPIC_HEADERS))[0] == 400


def test_stats_count_every_path_exactly_and_survive_a_restart(tmp_path):
    want = expected_session_totals()

    def check(totals):
        assert {m: {k: totals["by_model"][m][k] for k in cp.COUNTERS} for m in want} == want
        assert totals["requests"] == len(SESSION_CALLS) + 1 and totals["errors"] == 1
        assert totals["cost_usd"] == pytest.approx(want["sonnet-direct"]["cost_usd"].expected
                                                   + want["gpt-up"]["cost_usd"].expected)
        assert totals["by_route"]["model"]["requests"] == len(SESSION_CALLS) + 1 and len(totals["by_day"]) == 1

    async def scenario():
        async with FakeUpstream(usage_anthropic_upstream) as a, FakeUpstream(usage_openai_upstream) as o:
            config = session_config(tmp_path, a.url, o.url)
            async with running_proxy(config) as (server, port):
                await run_session(port)
                status, _, body = await call(port, "GET", "/v1/stats")
                stats = json.loads(body)
                check(stats["session"])
                check(stats["all_time"])
                recent = server.ops.recent[-4]                                 # POST /v1/responses to Claude
                assert recent.provider == "anthropic" and recent.upstream_model == "claude-sonnet-4-5"
                assert recent.dialect == "openai" and recent.duration_ms > 0
            async with running_proxy(config) as (_, port):                   # a restart
                stats = json.loads((await call(port, "GET", "/v1/stats"))[2])
                assert stats["session"]["requests"] == 0
                check(stats["all_time"])
                since = json.loads((await call(port, "GET", "/v1/stats?since=1h"))[2])
                check(since["all_time"])
                future = json.loads((await call(port, "GET", "/v1/stats?since=2999-01-01"))[2])
                assert future["all_time"]["requests"] == 0
                assert (await call(port, "GET", "/v1/stats?since=soon"))[0] == 400
    run(scenario())
    env = dict(os.environ, CLAUDE_PROXY_HOME=str(tmp_path / "home"))
    cli = [sys.executable, os.path.join(HERE, "claude_proxy.py"), "stats"]
    out = subprocess.run(cli + ["--json", "--since", "7d"], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path), timeout=30)
    assert out.returncode == 0, out.stderr
    check(json.loads(out.stdout))
    table = subprocess.run(cli + ["--by", "model"], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                           timeout=30).stdout
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.split()}
    assert rows["sonnet-direct"][1:9] == ["7", "1", "60", "42", "600", "120", "0",
                                          f"${want['sonnet-direct']['cost_usd'].expected:,.4f}"]
    assert rows["gpt-up"][1:8] == ["6", "0", "120", "54", "180", "0", "24"]


def test_unpriced_model_has_null_cost_and_errors_are_counted(tmp_path):
    async def scenario():
        async with FakeUpstream(usage_openai_upstream) as o:
            config = make_config(tmp_path, None, providers=openai_provider(o.url), routes={"default": "o"})
            async with running_proxy(config) as (server, port):
                await call(port, "POST", "/v1/messages", dict(HELLO, model="local-llama"), ANTHROPIC_HEADERS)
                stats = json.loads((await call(port, "GET", "/v1/stats"))[2])
                assert stats["session"]["cost_usd"] is None and stats["session"]["unpriced_requests"] == 1
                assert stats["session"]["by_route"]["default"]["input_tokens"] == 20
    run(scenario())


# ---- Plugins

SEED_FILTER_PLUGIN = '''
import logging

logger = logging.getLogger(__name__)


def request_hook(payload):
    """Drop tools by name, Claude ({"name"}) or OpenAI ({"function": {"name"}}) shaped."""
    if "tools" in payload:
        filtered_tool_names = ["WebSearch", "NotebookEdit", "NotebookRead"]

        def get_tool_name(tool):
            if "name" in tool:
                return tool["name"]
            elif "function" in tool and "name" in tool["function"]:
                return tool["function"]["name"]
            return None
        payload["tools"] = [t for t in payload["tools"] if get_tool_name(t) not in filtered_tool_names]
        logger.debug("TOOL_FILTER: remaining %s", [get_tool_name(t) for t in payload["tools"]])
    return payload


def response_hook(payload):
    payload["hook_applied"] = True
    return payload
'''
PLUGIN_TOOLS = [{"name": n, "description": n, "input_schema": {"type": "object", "properties": {}}}
         for n in ("Bash", "WebSearch", "NotebookEdit", "Read")]


def upstream_tool_names(req):
    """The tool names an upstream received, in either dialect."""
    return [cp.tool_name(t) for t in req["body"].get("tools", [])]


def test_seed_001_filter_tools_plugin_works_unchanged_in_both_dialects(tmp_path):
    plugins = tmp_path / "home" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "filter_tools.py").write_text(SEED_FILTER_PLUGIN)

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as a, \
                FakeUpstream(lambda req: http_response(200, OPENAI_COMPLETION)) as o:
            config = make_config(tmp_path, a.url, providers=openai_provider(o.url),
                                 models=[{"id": "gpt-up", "provider": "o", "model": "gpt-4o"}])
            async with running_proxy(config) as (server, port):
                assert server.plugins.names == ["filter_tools.py"]
                for model, upstream in (("claude-sonnet-4-5", a), ("gpt-up", o)):
                    status, _, body = await call(port, "POST", "/v1/messages", dict(HELLO, model=model, tools=PLUGIN_TOOLS),
                                                 ANTHROPIC_HEADERS)
                    assert status == 200 and json.loads(body)["hook_applied"] is True
                    assert upstream_tool_names(upstream.requests[-1]) == ["Bash", "Read"]
    run(scenario())


def test_filter_tools_setting_in_either_dialect_logs_at_debug(tmp_path, caplog):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as a:
            config = make_config(tmp_path, a.url, filter_tools="WebSearch, NotebookEdit")
            async with running_proxy(config) as (_, port):
                body = dict(HELLO, tools=PLUGIN_TOOLS, tool_choice={"type": "tool", "name": "WebSearch"})
                await call(port, "POST", "/v1/messages", body, ANTHROPIC_HEADERS)
                assert upstream_tool_names(a.requests[-1]) == ["Bash", "Read"]
                assert "tool_choice" not in a.requests[-1]["body"]
    with caplog.at_level(logging.DEBUG, logger="claude_proxy"):
        run(scenario())
    assert any("filter_tools: removed NotebookEdit, WebSearch" in r.getMessage() and r.levelno == logging.DEBUG
               for r in caplog.records)


@pytest.mark.parametrize("payload, expected", [
    ({"tools": [{"type": "function", "function": {"name": "WebSearch"}}], "tool_choice": "auto",
      "parallel_tool_calls": True}, {}),
    ({"tools": [{"type": "function", "name": "WebSearch"}, {"type": "function", "name": "Bash"}],
      "tool_choice": {"type": "function", "name": "WebSearch"}}, {"tools": [{"type": "function", "name": "Bash"}]}),
    ({"messages": []}, {"messages": []}),
])
def test_filter_tools_hook_shapes(payload, expected):
    cp.filter_tools_hook(["WebSearch"])(payload, {"request_id": "r"})
    assert payload == expected


CONTEXT_PLUGIN = '''
SEEN = []


def request_hook(payload, context):
    SEEN.append(context)
    return dict(payload, metadata={"user_id": context["route"]})


def stream_event_hook(event, context):
    if event.get("type") == "content_block_delta":
        event["delta"]["text"] = event["delta"]["text"].upper()
    choices = event.get("choices") or [{}]
    if choices[0].get("delta", {}).get("content"):
        choices[0]["delta"]["content"] = choices[0]["delta"]["content"].upper()
'''


def test_hooks_with_context_and_stream_events_on_relayed_and_converted_streams(tmp_path):
    (tmp_path / "ctx.py").write_text(CONTEXT_PLUGIN)

    async def scenario():
        async with FakeUpstream(lambda req: Stream(anthropic_stream("hello"))) as a, \
                FakeUpstream(lambda req: Stream(openai_stream_chunks("hi there"))) as o:
            config = make_config(tmp_path, a.url, providers=openai_provider(o.url), plugins=[str(tmp_path / "ctx.py")],
                                 models=[{"id": "gpt-up", "provider": "o", "model": "gpt-4o"}])
            async with running_proxy(config) as (server, port):
                texts = []
                for model, path in (("claude-x", "/v1/messages"), ("gpt-up", "/v1/messages"),
                                    ("claude-x", "/v1/chat/completions")):
                    _, _, body = await call(port, "POST", path, dict(HELLO, model=model, stream=True), ANTHROPIC_HEADERS)
                    texts.append(body)
                assert b"HELLO" in texts[0] and b"HI THERE" in texts[1] and b"HELLO" in texts[2]
                assert a.requests[0]["body"]["metadata"] == {"user_id": "default"}
                assert o.requests[0]["body"]["metadata"] == {"user_id": "model"}
    run(scenario())


RAISING_PLUGIN = '''
def request_hook(payload):
    raise RuntimeError("boom")
'''


@pytest.mark.parametrize("client", ["anthropic", "openai"])
def test_a_raising_hook_fails_the_request_naming_the_plugin_in_the_clients_dialect(tmp_path, client):
    (tmp_path / "home" / "plugins").mkdir(parents=True)
    (tmp_path / "home" / "plugins" / "bad.py").write_text(RAISING_PLUGIN)

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as a:
            async with running_proxy(make_config(tmp_path, a.url)) as (_, port):
                path, body, headers = client_request(client, False)
                status, _, raw = await call(port, "POST", path, body, headers)
                error = json.loads(raw)["error"]
                assert status == 500 and "plugin bad.py failed in request_hook: RuntimeError: boom" in error["message"]
                assert ("param" in error) == (client == "openai")
                assert (await call(port, "GET", "/health"))[0] == 200 and not a.requests
    run(scenario())


def test_no_plugin_means_no_hook_object_and_a_broken_plugin_is_a_config_error(tmp_path):
    assert cp.ProxyServer(make_config(tmp_path)).plugins is None
    (tmp_path / "broken.py").write_text("def request_hook(:\n")
    with pytest.raises(cp.ConfigError, match=r"plugins: .*broken.py: SyntaxError"):
        cp.load_plugins(make_config(tmp_path, plugins=[str(tmp_path / "broken.py")]))
    with pytest.raises(cp.ConfigError, match=r"no such file"):
        cp.load_plugins(make_config(tmp_path, plugins=[str(tmp_path / "missing.py")]))


# ---- Hot reload

def write_config(path, upstream_url, **extra):
    """A config file routing everything to one anthropic upstream."""
    raw = {"home": str(path.parent / "home"), "keepalive_interval": 0, "max_retries": 0, "reload_interval": 0.1,
           "providers": {"anthropic": {"format": "anthropic", "base_url": upstream_url, "api_key": "sk-ant-api03-k123456"}}}
    raw.update(extra)
    path.write_text(json.dumps(raw))


async def wait_for_generation(port, generation, timeout=2.0):
    """Seconds until /health reports the generation (fails after timeout)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        health = json.loads((await call(port, "GET", "/health"))[2])
        if health["config_generation"] == generation:
            return time.monotonic() - t0
        await asyncio.sleep(0.02)
    raise AssertionError(f"generation {generation} not reached in {timeout}s")


def test_config_edit_applies_within_2s_a_stream_in_flight_finishes_and_a_broken_edit_is_kept_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "config.json"
    slow = Stream(anthropic_stream("old")[:3] + [("sleep", 0.8)] + anthropic_stream("old")[3:])

    async def scenario():
        async with FakeUpstream(lambda req: slow) as a, \
                FakeUpstream(lambda req: http_response(200, anthropic_message("new"))) as b:
            write_config(cfg, a.url)
            source = cp.ConfigSource(str(cfg), {})
            async with running_proxy(source.load(), source=source) as (server, port):
                in_flight = asyncio.ensure_future(call(port, "POST", "/v1/messages", dict(HELLO, stream=True), ANTHROPIC_HEADERS))
                while not a.requests:
                    await asyncio.sleep(0.01)
                write_config(cfg, b.url)
                took = await wait_for_generation(port, 2)
                status, _, body = await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
                assert status == 200 and json.loads(body)["content"][0]["text"] == "new" and len(b.requests) == 1
                status, _, streamed = await in_flight
                events = sse_events(streamed)
                assert status == 200 and events[-1][0] == "message_stop" and b'"old"' in streamed
                assert len(a.requests) == 1 and not in_flight.exception()
                cfg.write_text("{ not json")
                await asyncio.sleep(0.4)
                write_config(cfg, b.url, routes={"default": "nowhere"})
                await asyncio.sleep(0.4)
                health = json.loads((await call(port, "GET", "/health"))[2])
                status_doc = json.loads((await call(port, "GET", "/status.json"))[2])
                assert health["config_generation"] == 2
                assert "routes.default" in status_doc["config"]["error"]["message"]
                assert (await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS))[0] == 200
                assert len(b.requests) == 2
                write_config(cfg, b.url, port=1)
                await wait_for_generation(port, 3)
                status_doc = json.loads((await call(port, "GET", "/status.json"))[2])
                assert status_doc["config"]["error"] is None and status_doc["config"]["restart_needed"] == ["port"]
                return took
    took = run(scenario())
    assert took < 2.0


def test_reload_keeps_cli_overrides_and_the_original_environment_and_watches_dotenv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "config.json"
    write_config(cfg, "http://127.0.0.1:9")
    source = cp.ConfigSource(str(cfg), {"MAX_RETRIES": "5"}, {"log_level": "WARNING"})

    async def scenario():
        server = cp.ProxyServer(source.load(), source=source)
        watcher = cp.ConfigWatcher(server)
        assert not await watcher.check()
        (tmp_path / ".env").write_text("MAX_BODY_BYTES=1234\n")
        assert await watcher.check() and server.generation == 2
        settings = server.config.settings
        assert (settings["max_body_bytes"], settings["max_retries"], settings["log_level"]) == (1234, 5, "WARNING")
        models = tmp_path / "models.json"
        models.write_text(json.dumps([{"id": "extra", "provider": "anthropic"}]))
        write_config(cfg, "http://127.0.0.1:9", models_file=str(models))
        assert await watcher.check() and "extra" in server.config.models
        models.write_text(json.dumps([{"id": "extra2", "provider": "anthropic"}]))
        assert await watcher.check() and "extra2" in server.config.models and server.generation == 4
        (tmp_path / ".env").write_text("MAX_BODY_BYTES=4321\n")
        assert await cp.reload_config(server, "SIGHUP") and server.generation == 5
        assert not await watcher.check() and server.config.settings["max_body_bytes"] == 4321
    run(scenario())


def serve_process(tmp_path, cfg):
    """`serve --config cfg` in a process of its own, once it accepts connections: (process, port)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PROXY_API_KEY", "CLAUDE_PROXY_CONFIG", "CLAUDE_PROXY_HOME")}
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "claude_proxy.py"), "serve", "--port", str(port),
                             "--config", str(cfg)], stderr=subprocess.PIPE, env=env, cwd=str(tmp_path))
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, port


def test_sighup_reloads_the_serve_process(tmp_path):
    cfg = tmp_path / "config.json"
    write_config(cfg, "http://127.0.0.1:9", reload_interval=0)
    proc, port = serve_process(tmp_path, cfg)
    try:
        write_config(cfg, "http://127.0.0.1:9", reload_interval=0, log_level="INFO", max_retries=1)
        proc.send_signal(signal.SIGHUP)
        assert run(wait_for_generation(port, 2)) < 2.0
    finally:
        proc.terminate()
        proc.wait(10)
    assert b"config reloaded (SIGHUP): generation 2" in proc.stderr.read()


# ---- Status page

SECRET_KEY = "sk-ant-api03-pagesecret-0123456789"
SECRET_TOKEN = "sk-ant-oat01-pagetoken-0123456789"


def page_config(tmp_path, url, **raw):
    """A config with secrets to keep out of the page: a provider key, an OpenAI key, a login."""
    config = make_config(tmp_path, None, providers={
        "anthropic": {"format": "anthropic", "base_url": url, "api_key": SECRET_KEY},
        "o": {"format": "openai", "base_url": "http://user:pw@127.0.0.1:9/v1", "api_key_env": "O_KEY",
              "auth": "api_key"}},
        models=[{"id": "gpt-up", "provider": "o", "model": "gpt-4o"}], routes={"default": "anthropic", "haiku": "gpt-up"},
        **raw)
    cp.TokenStore(os.path.join(config.home, "oauth_token.json")).save(
        {"access_token": SECRET_TOKEN, "refresh_token": "sk-ant-ort01-pagerefresh", "expires_at": time.time() + 7200,
         "scope": "user:inference", "source": "login"})
    return config


HTML = {"accept": "text/html,application/xhtml+xml"}


def test_status_page_and_json_for_a_loopback_browser_without_secrets(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            async with running_proxy(page_config(tmp_path, up.url)) as (server, port):
                await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
                status, headers, page = await call(port, "GET", "/", headers=HTML)
                assert status == 200 and headers["content-type"].startswith("text/html")
                assert "default-src 'none'" in headers["content-security-policy"] and b"<svg" not in page[:100]
                assert b"http://" not in page.replace(b"http://www.w3.org/2000/svg", b"")   # no external asset
                status, _, plain = await call(port, "GET", "/")
                assert status == 200 and json.loads(plain)["name"] == "claude_proxy"
                status, _, raw = await call(port, "GET", "/status.json")
                doc = json.loads(raw)
                assert status == 200 and doc["login"]["logged_in"] and doc["config"]["generation"] == 1
                assert [r["route"] for r in doc["routes"]] == ["default", "haiku", "model gpt-up"]
                creds = {p["name"]: p["credential"] for p in doc["providers"]}
                assert creds == {"anthropic": "Claude login (auth auto)", "o": "API key missing ($O_KEY is not set)"}
                assert doc["providers"][1]["base_url"] == "http://127.0.0.1:9/v1"
                assert doc["recent"][0]["requested_model"] == "claude-sonnet-4-5" and doc["usage"]["source"] == "ledger"
                for secret in (SECRET_KEY, SECRET_TOKEN, "sk-ant-ort01", "pw@"):
                    assert secret.encode() not in raw + page
    run(scenario())


@pytest.mark.parametrize("headers", [{"host": "evil.example:8082"}, {"origin": "http://evil.example"},
                                     {"origin": "null"}])
def test_status_page_refuses_foreign_host_or_origin(tmp_path, headers):
    async def scenario():
        async with running_proxy(make_config(tmp_path)) as (_, port):
            for path, extra in (("/", HTML), ("/status.json", {})):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                head = {"host": f"127.0.0.1:{port}", "connection": "close", **extra, **headers}
                writer.write((f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n").encode())
                status, _, _ = parse_http(await reader.read())
                writer.close()
                assert status == 403, path
    run(scenario())


def test_exposed_status_page_needs_the_key_then_a_cookie_not_the_key(tmp_path):
    key = "proxy-key-0123456789"

    async def scenario():
        async with running_proxy(make_config(tmp_path, proxy_api_key=key)) as (server, port):
            assert (await call(port, "GET", "/status.json"))[0] == 401
            assert (await call(port, "GET", "/", headers=HTML))[0] == 200        # the shell: no data in it
            status, headers, _ = await call(port, "POST", "/", raw=b"key=wrong", headers={"content-type": "application/x-www-form-urlencoded"})
            assert status == 303 and headers["location"] == "/#wrong-key" and "set-cookie" not in headers
            status, headers, _ = await call(port, "POST", "/", raw=f"key={key}".encode())
            cookie = headers["set-cookie"]
            assert status == 303 and "HttpOnly" in cookie and "SameSite=Strict" in cookie and key not in cookie
            status, _, raw = await call(port, "GET", "/status.json", headers={"cookie": cookie.split(";")[0]})
            assert status == 200 and key.encode() not in raw
            status, headers, _ = await call(port, "GET", f"/?key={key}", headers=HTML)
            assert status == 303 and headers["set-cookie"] == cookie
            assert (await call(port, "GET", "/status.json", headers={"x-api-key": key}))[0] == 200
            assert (await call(port, "GET", "/status.json", headers={"cookie": "claude_proxy_page=forged"}))[0] == 401
        server = cp.ProxyServer(make_config(tmp_path))
        remote = cp.Exchange(server, cp.Request("GET", "/status.json", {"host": "10.0.0.5:8082"}, b"", "10.0.0.9"), None)
        with pytest.raises(cp.PermissionDenied, match="loopback"):
            cp.check_page_access(remote)
        with pytest.raises(cp.PermissionDenied, match="loopback"):
            cp.check_access(server.config, remote.req)
    run(scenario())


CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


async def run_chromium(tmp_path, url, *args, size="1200,900"):
    """Headless chromium on one URL (window width,height); its stdout."""
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}", f"--window-size={size}", "--virtual-time-budget=5000",
        *args, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return out.decode("utf-8", "replace")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed")
def test_status_page_renders_in_headless_chromium(tmp_path):
    shot = os.environ.get("CLAUDE_PROXY_SCREENSHOT") or str(tmp_path / "status_page.png")

    async def scenario():
        async with FakeUpstream(usage_anthropic_upstream) as a, FakeUpstream(usage_openai_upstream) as o:
            config = session_config(tmp_path, a.url, o.url)
            cp.TokenStore(os.path.join(config.home, "oauth_token.json")).save(
                {"access_token": SECRET_TOKEN, "refresh_token": None, "expires_at": time.time() + 7200,
                 "scope": "user:inference", "source": "login"})
            async with running_proxy(config) as (server, port):
                await run_session(port)
                server.ops.provider_errors["o"] = {"at": cp.iso_time(time.time()), "status": 529,
                                                   "type": "overloaded_error", "message": "Overloaded"}
                url = f"http://127.0.0.1:{port}/"
                dom = await run_chromium(tmp_path, url, "--dump-dom")
                await run_chromium(tmp_path, url, f"--screenshot={shot}")
                return dom
    dom = run(scenario())
    assert "<b>logged in</b>" in dom and "sonnet-direct" in dom and "gpt-up" in dom and "default" in dom
    assert "API key in the config" in dom and "Claude login (auth auto)" in dom and "Overloaded" in dom
    assert dom.count("<rect") >= 6 and "invalid_request_error" in dom          # charts drawn; the failed request listed
    assert SECRET_TOKEN not in dom and "sk-ant-api03" not in dom
    for table in ("routes", "providers"):        # wide tables get a row of their own, never clipped by the next card
        assert re.search(rf'<section class="card wide" id="{table}-card"', dom), table
    assert re.search(r"\.card\{[^}]*overflow-x:auto", cp.STATUS_PAGE)   # and scroll on a narrow screen
    assert os.path.getsize(shot) > 10000
    print(f"\nstatus page screenshot: {shot}")


# ---- The session's usage for the status line, traffic charts, /metrics (issue 24)

OLD_LEDGER_SCHEMA = """
CREATE TABLE usage (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, dialect TEXT, requested_model TEXT, route TEXT,
    provider TEXT, upstream_model TEXT, status INTEGER, error_type TEXT, input_tokens INTEGER,
    output_tokens INTEGER, cache_read_input_tokens INTEGER, cache_creation_input_tokens INTEGER,
    reasoning_tokens INTEGER, ttft_ms REAL, duration_ms REAL, cost_usd REAL, key TEXT);
INSERT INTO usage (ts, dialect, requested_model, route, provider, upstream_model, status, input_tokens, output_tokens)
VALUES (86400, 'anthropic', 'old', 'default', 'anthropic', 'old', 200, 5, 6);
"""


def test_ledger_migration_keeps_old_rows_and_adds_the_client_session(tmp_path):
    import sqlite3
    path = str(tmp_path / "usage.db")
    db = sqlite3.connect(path)
    db.executescript(OLD_LEDGER_SCHEMA)
    db.close()
    ledger = cp.UsageLedger(path, clock=lambda: 86400 * 2)
    assert ledger.session("s-1")["requests"] == 0                     # an old file: no session yet, no error
    ledger.add(usage_row(86400 + 60, "new")._replace(session_id="s-1"))
    ledger.close()
    assert ledger.totals()["requests"] == 2 and ledger.totals()["by_model"]["old"]["output_tokens"] == 6
    summary = ledger.session("s-1")
    assert summary["requests"] == 1 and summary["last"]["requested_model"] == "new" and not summary["last"]["failed"]
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(cp.LEDGER_MIGRATIONS) == 1
    cp.migrate_ledger(db)                                                # a second time: nothing to do
    assert [row[1] for row in db.execute("PRAGMA table_info(usage)")][-1] == "session_id"
    db.close()


def session_script(req):
    """An anthropic fake: "fail" answers 529, anything else a message with usage."""
    if '"fail"' in json.dumps(req["body"]["messages"][-1]):
        return http_response(529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    return http_response(200, dict(anthropic_message(), usage={
        "input_tokens": 10, "output_tokens": 7, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 0}))


@pytest.mark.parametrize("ledger", [True, False])
def test_session_usage_counts_the_answer_that_just_ended(tmp_path, ledger):
    session = {"x-claude-code-session-id": "11111111-2222-3333-4444-555555555555"}

    async def scenario():
        async with FakeUpstream(session_script) as up:
            config = make_config(tmp_path, up.url, usage_ledger=ledger, models=[
                dict({"id": "sonnet-direct", "provider": "anthropic", "model": "claude-sonnet-4-5"}, **SONNET_PRICES)])
            async with running_proxy(config) as (_, port):
                for _ in range(2):
                    await call(port, "POST", "/v1/messages", dict(HELLO, model="sonnet-direct"), dict(ANTHROPIC_HEADERS, **session))
                await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)                  # another session
                path = "/v1/stats/session?id=" + session["x-claude-code-session-id"]
                first = json.loads((await call(port, "GET", path))[2])         # asked at once: the ledger is flushed
                failing = dict(HELLO, model="sonnet-direct", messages=[{"role": "user", "content": "fail"}])
                await call(port, "POST", "/v1/messages", failing, dict(ANTHROPIC_HEADERS, **session))
                second = json.loads((await call(port, "GET", path))[2])
                missing = await call(port, "GET", "/v1/stats/session")
                return first, second, missing
    first, second, missing = run(scenario())
    assert {k: first[k] for k in ("requests", "errors", "input_tokens", "output_tokens", "cache_read_input_tokens")} == {
        "requests": 2, "errors": 0, "input_tokens": 20, "output_tokens": 14, "cache_read_input_tokens": 60}
    assert first["cost_usd"] == pytest.approx(2 * (10 * 3e-6 + 7 * 15e-6 + 30 * 0.3e-6))
    assert {k: first["last"][k] for k in ("route", "provider", "upstream_model", "failed")} == {
        "route": "model", "provider": "anthropic", "upstream_model": "claude-sonnet-4-5", "failed": False}
    assert second["requests"] == 3 and second["last"]["failed"] and second["last"]["status"] == 529
    assert missing[0] == 400 and b"session id" in missing[2]


def test_chart_series_buckets_groups_and_percentiles():
    now = 7200.0 * 10 + 30                                  # 30 s into a minute (and a half hour)
    row = lambda ago, route, provider, ms, cost=0.001: (now - ago, route, provider, 10, 5, 3, 2, cost, ms)
    rows = [row(10, "default", "a", 100.0), row(10, "default", "a", 200.0), row(10, "default", "a", 900.0),
            row(70, "haiku", "o", 50.0, None), row(5400, "haiku", "o", 70.0), row(90000, "default", "a", 1.0)]
    rows += [row(20, f"r{i}", "p", 10.0) for i in range(6)]           # six one-request routes: some fold
    series = cp.chart_series(rows, now)
    hour, day = series["hour"], series["day"]
    assert (hour["step"], hour["buckets"], hour["start"]) == (60, 60, now - 30 - 59 * 60)
    assert (day["step"], day["buckets"], day["start"]) == (1800, 48, 7200.0 * 10 - 47 * 1800)
    default = hour["by_route"]["default"]
    assert default["requests"][-1] == 3 and sum(default["requests"]) == 3 and default["tokens"][-1] == 60
    assert (default["p50"][-1], default["p95"][-1], default["p50"][0]) == (200.0, 900.0, None)
    assert default["cost"][-1] == pytest.approx(0.003)
    assert hour["by_route"]["haiku"]["requests"][-2:] == [1, 0] and hour["by_route"]["haiku"]["cost"][-2] == 0
    assert list(hour["by_route"]) == ["default", "haiku", "r0", "r1", "r2", "r3", "other"]
    assert sum(hour["by_route"]["other"]["requests"]) == 2
    assert {name: sum(s["requests"]) for name, s in day["by_provider"].items()} == {"p": 6, "a": 3, "o": 2}
    assert day["by_provider"]["o"]["p95"][-4] == 70.0                   # 1.5 h ago: three half hours back


def test_traffic_is_built_off_the_loop_and_reused_for_a_while(tmp_path):
    import threading
    now = [1e6]
    ops = cp.Operations(make_config(tmp_path, usage_ledger=False), clock=lambda: now[0])
    ops.recent.append(usage_row(now[0] - 5, "m"))
    built_in, build = [], ops.build_traffic
    ops.build_traffic = lambda *args: built_in.append(threading.get_ident()) or build(*args)

    async def scenario():
        first = await ops.traffic()
        ops.recent.append(usage_row(now[0] - 1, "m"))
        second = await ops.traffic()
        now[0] += cp.TRAFFIC_REFRESH
        return first, second, await ops.traffic(), threading.get_ident()
    first, second, third, loop_thread = run(scenario())
    assert first is second and first["source"] == "session" and sum(first["hour"]["by_route"]["model"]["requests"]) == 1
    assert sum(third["hour"]["by_route"]["model"]["requests"]) == 2
    assert len(built_in) == 2 and loop_thread not in built_in


@pytest.mark.parametrize("value, text", [(3, "3"), (0.25, "0.25"), (1e-05, "1e-05"), (float("inf"), "+Inf"),
                                         (float("-inf"), "-Inf"), (float("nan"), "NaN"), (600.0, "600.0")])
def test_metric_numbers(value, text):
    assert cp.format_metric_number(value) == text


def test_metric_label_values_are_escaped():
    assert cp.metric_line("x_total", [("model", 'a"b\\c\nd'), ("route", "r")], 2) == \
        'x_total{model="a\\"b\\\\c\\nd",route="r"} 2'
    assert cp.metric_line("x", [], 1.5) == "x 1.5"


def test_metric_model_labels_are_bounded():
    known, seen = frozenset({"gpt-up", "gpt-4o"}), set()
    labels = [cp.metric_model_label(known, seen, f"client-{i}") for i in range(50)]
    assert labels[:cp.METRIC_MODEL_NAMES] == [f"client-{i}" for i in range(cp.METRIC_MODEL_NAMES)]
    assert set(labels[cp.METRIC_MODEL_NAMES:]) == {"other"} and len(seen) == cp.METRIC_MODEL_NAMES
    assert cp.metric_model_label(known, seen, "gpt-4o") == "gpt-4o" and cp.metric_model_label(known, seen, None) == "none"
    assert cp.metric_model_label(known, set(), "x" * 101) == "other"              # a long name never gets its own


EXPOSITION_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
EXPOSITION_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
EXPOSITION_UNESCAPE = {"\\": "\\", '"': '"', "n": "\n"}


def exposition_value(text):
    """A sample value as the text format spells it (no timestamp allowed here)."""
    special = {"+Inf": float("inf"), "-Inf": float("-inf"), "NaN": float("nan")}
    if text in special:
        return special[text]
    assert re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", text), text
    return float(text)


def exposition_labels(text):
    """{name: value} of a `{...}` label set, escapes undone; AssertionError on any deviation."""
    labels, i = {}, 0
    while i < len(text):
        name = EXPOSITION_LABEL.match(text, i)
        assert name and text[name.end():name.end() + 2] == '="', text
        i, value = name.end() + 2, []
        while text[i] != '"':
            if text[i] == "\\":
                value.append(EXPOSITION_UNESCAPE[text[i + 1]])
                i += 2
            else:
                assert text[i] != "\n"
                value.append(text[i])
                i += 1
        assert name.group() not in labels
        labels[name.group()] = "".join(value)
        i += 1
        assert i == len(text) or text[i] == ",", text
        i += 1
    return labels


def parse_exposition(text):
    """A strict parser of the Prometheus text format 0.0.4 (PROTOCOLS L): {family: {type, help,
    samples: [(name, labels, value)]}}; every rule checked by an assert."""
    assert text.endswith("\n") and "\r" not in text
    families, current = {}, None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            current, _, help_text = line[7:].partition(" ")
            assert EXPOSITION_NAME.fullmatch(current) and current not in families and help_text
            families[current] = {"type": None, "help": help_text, "samples": []}
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current and kind in ("counter", "gauge", "histogram") and families[name]["type"] is None
            families[name]["type"] = kind
        else:
            match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
            assert match and current and families[current]["type"], line
            kind = families[current]["type"]
            allowed = {current + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {current}
            assert match.group(1) in allowed, line
            families[current]["samples"].append((match.group(1), exposition_labels(match.group(2) or ""),
                                                 exposition_value(match.group(3))))
    for name, family in families.items():
        assert family["type"] != "counter" or name.endswith("_total"), name
        if family["type"] == "histogram":
            check_histogram(name, family["samples"])
    return families


def check_histogram(name, samples):
    """Cumulative buckets in ascending le order, ending with +Inf equal to _count, per series."""
    series = {}
    for sample, labels, value in samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        series.setdefault(key, {"buckets": []})
        if sample.endswith("_bucket"):
            series[key]["buckets"].append((exposition_value(labels["le"]), value))
        else:
            series[key][sample[len(name) + 1:]] = value
    for parts in series.values():
        bounds, counts = zip(*parts["buckets"])
        assert list(bounds) == sorted(bounds) and bounds[-1] == float("inf")
        assert list(counts) == sorted(counts) and counts[-1] == parts["count"] and "sum" in parts


def metric_value(families, name, **labels):
    """The value of the one sample of `name` whose labels include these."""
    family = families.get(name) or families[re.sub(r"_(bucket|sum|count)$", "", name)]
    found = [v for n, ls, v in family["samples"] if n == name and all(ls.get(k) == str(v) for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_metrics_parse_strictly_and_count_what_the_ledger_counts(tmp_path):
    async def scenario():
        async with FakeUpstream(usage_anthropic_upstream) as a, FakeUpstream(usage_openai_upstream) as o:
            config = session_config(tmp_path, a.url, o.url)
            async with running_proxy(config) as (server, port):
                await run_session(port)
                search = dict(HELLO, model="sonnet-direct")
                a.script = lambda req: http_response(200, dict(anthropic_message(), usage={
                    "input_tokens": 1, "output_tokens": 1, "server_tool_use": {"web_search_requests": 2}}))
                await call(port, "POST", "/v1/messages", search, ANTHROPIC_HEADERS)
                for i in range(cp.METRIC_MODEL_NAMES + 5):                         # client-chosen names
                    await call(port, "POST", "/v1/messages", dict(HELLO, model=f"claude-client-{i}"), ANTHROPIC_HEADERS)
                status, headers, body = await call(port, "GET", "/metrics")
                return status, headers, body.decode(), server.ops.session.as_dict()
    status, headers, text, session = run(scenario())
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    families = parse_exposition(text)
    for name in ("claude_proxy_requests_total", "claude_proxy_tokens_total", "claude_proxy_cost_usd_total",
                 "claude_proxy_request_duration_seconds", "claude_proxy_time_to_first_token_seconds",
                 "claude_proxy_upstream_errors_total", "claude_proxy_in_flight", "claude_proxy_key_cooling",
                 "claude_proxy_web_searches_total", "claude_proxy_build_info"):
        assert name in families, name
    requests = families["claude_proxy_requests_total"]["samples"]
    assert sum(v for _, _, v in requests) == session["requests"]
    assert metric_value(families, "claude_proxy_requests_total", dialect="openai", route="model", provider="o",
                        model="gpt-4o", status="200") == 4             # chat completions and responses
    assert metric_value(families, "claude_proxy_requests_total", dialect="anthropic", provider="anthropic",
                        model="claude-sonnet-4-5", status="400") == 1
    assert metric_value(families, "claude_proxy_upstream_errors_total", provider="anthropic", status="400") == 1
    models = {labels["model"] for _, labels, _ in requests}
    assert "other" in models and len([m for m in models if m.startswith("claude-client-")]) <= cp.METRIC_MODEL_NAMES
    sonnet = session["by_model"]["sonnet-direct"]
    assert metric_value(families, "claude_proxy_tokens_total", provider="anthropic", model="claude-sonnet-4-5",
                        kind="cache_read") == sonnet["cache_read_input_tokens"]
    assert metric_value(families, "claude_proxy_tokens_total", provider="o", model="gpt-4o", kind="reasoning") == \
        session["by_model"]["gpt-up"]["reasoning_tokens"]
    total_cost = sum(v for _, _, v in families["claude_proxy_cost_usd_total"]["samples"])
    assert total_cost == pytest.approx(session["cost_usd"])
    assert metric_value(families, "claude_proxy_web_searches_total", provider="anthropic", model="claude-sonnet-4-5") == 2
    counts = sum(v for n, _, v in families["claude_proxy_request_duration_seconds"]["samples"] if n.endswith("_count"))
    assert counts == session["requests"]
    assert metric_value(families, "claude_proxy_build_info", version=cp.VERSION) == 1
    assert metric_value(families, "claude_proxy_in_flight") == 0
    promtool = shutil.which("promtool")
    if promtool:                                        # Prometheus's own parser and linter, where installed
        out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr


def test_metrics_show_each_pooled_key_by_its_last_four(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(429, {"type": "error", "error": {
                "type": "rate_limit_error", "message": "slow down"}}, headers=[("retry-after", "30")])) as up:
            config = make_config(tmp_path, providers={"anthropic": {
                "format": "anthropic", "base_url": up.url, "api_keys": ["sk-ant-first-key-1111", "sk-ant-second-key-2222"]}})
            async with running_proxy(config) as (_, port):
                await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
                return (await call(port, "GET", "/metrics"))[2].decode()
    text = run(scenario())
    families = parse_exposition(text)
    assert metric_value(families, "claude_proxy_key_cooling", provider="anthropic", key="...1111") == 1
    assert "sk-ant-first" not in text and "second-key" not in text


def test_metrics_follow_the_operations_access_rule_and_take_the_key_as_a_bearer_token(tmp_path):
    key = "proxy-key-0123456789"

    async def scenario():
        async with running_proxy(make_config(tmp_path, proxy_api_key=key)) as (_, port):
            assert (await call(port, "GET", "/metrics"))[0] == 401
            assert (await call(port, "GET", "/metrics", headers={"authorization": "Bearer wrong"}))[0] == 401
            assert (await call(port, "GET", "/metrics", headers={"authorization": f"Bearer {key}"}))[0] == 200
            assert (await call(port, "GET", "/metrics", headers={"origin": "http://evil.example"}))[0] == 403
    run(scenario())
    server = cp.ProxyServer(make_config(tmp_path))
    remote = cp.Exchange(server, cp.Request("GET", "/metrics", {"host": "10.0.0.5:8082"}, b"", "10.0.0.9"), None)
    with pytest.raises(cp.PermissionDenied, match="loopback"):
        run(cp.handle_metrics(remote))


def traffic_rows(now):
    """A ledger for the traffic charts: three requests a minute ago (100, 200, 900 ms) on route
    default (provider anthropic), two 90 minutes ago on route haiku (provider o), one 2 days ago."""
    row = lambda ago, route, provider, ms, cost: usage_row(now - ago, "m", route=route, cost=cost)._replace(
        provider=provider, duration_ms=ms)
    return [row(60, "default", "anthropic", 100.0, 0.25), row(60, "default", "anthropic", 200.0, 0.25),
            row(60, "default", "anthropic", 900.0, 0.5), row(5400, "haiku", "o", 40.0, 1.0),
            row(5400, "haiku", "o", 60.0, 1.0), row(2 * 86400, "default", "anthropic", 5.0, 9.0)]


def chart_values(dom, metric):
    """{group: [data-value of each bar]} of one traffic chart in a dumped DOM."""
    start = dom.index(f'data-metric="{metric}"')
    svg = dom[start:dom.index("</svg>", start)]
    values = {}
    for group, value in re.findall(r'<rect [^>]*data-group="([^"]+)" data-bucket="[\d.]+" data-value="([^"]+)"', svg):
        values.setdefault(group, []).append(float(value))
    return values


def chart_lines(dom):
    """{(group, p50|p95): [values, None where a bucket had no request]} of the latency chart."""
    start = dom.index('data-metric="latency"')
    svg = dom[start:dom.index("</svg>", start)]
    return {(group, stat): [float(v) if v else None for v in values.split(",")]
            for group, stat, values in re.findall(r'<path [^>]*data-group="([^"]+)" data-stat="(p\d+)" data-values="([^"]*)"', svg)}


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed")
def test_traffic_charts_render_the_ledgers_numbers_in_headless_chromium(tmp_path):
    shots = os.environ.get("CLAUDE_PROXY_SCREENSHOT_DIR") or str(tmp_path)
    config = page_config(tmp_path, "http://127.0.0.1:9")
    ledger = cp.UsageLedger(cp.ledger_path(config))
    for row in traffic_rows(time.time()):
        ledger.add(row)
    ledger.close()

    async def scenario():
        async with running_proxy(config) as (_, port):
            url = f"http://127.0.0.1:{port}/"
            hour = await run_chromium(tmp_path, url, "--dump-dom")
            day = await run_chromium(tmp_path, url + "#window=day&by=provider", "--dump-dom")
            for width, height in ((1200, 2000), (390, 2700)):
                await run_chromium(tmp_path, url + "#window=day&by=route", "--hide-scrollbars",
                                   f"--screenshot={shots}/traffic-{width}.png", size=f"{width},{height}")
            return hour, day
    hour, day = run(scenario())
    assert chart_values(hour, "requests") == {"default": [3.0]} and chart_values(hour, "cost") == {"default": [1.0]}
    assert chart_values(hour, "tokens") == {"default": [3.0 * sum(ANTHROPIC_TOKENS[:4])]}
    lines = chart_lines(hour)
    assert [v for v in lines[("default", "p50")] if v is not None] == [200.0]
    assert [v for v in lines[("default", "p95")] if v is not None] == [900.0] and len(lines[("default", "p95")]) == 60
    assert "Traffic, last hour by route" in hour and re.search(r'id="total-requests"[^>]*>3<', hour)
    assert chart_values(day, "requests") == {"anthropic": [3.0], "o": [2.0]}
    assert chart_values(day, "cost") == {"anthropic": [1.0], "o": [2.0]}
    assert [v for v in chart_lines(day)[("o", "p95")] if v is not None] == [60.0]
    assert re.search(r'id="total-cost"[^>]*>\$3\.00<', day) and "Traffic, last day by provider" in day
    for width in (1200, 390):
        assert os.path.getsize(f"{shots}/traffic-{width}.png") > 10000
    print(f"\ntraffic chart screenshots: {shots}/traffic-1200.png, {shots}/traffic-390.png")


# ---- Doctor, test_connection, test_conversion

async def openssl_server(tmp_path):
    """A loopback TLS server with a self-signed localhost certificate (None without openssl)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.CalledProcessError):
        return None, None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))

    async def handle(reader, writer):
        await reader.read(1)
        writer.close()
    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context), cert


def doctor_upstream(req):
    """Answers the doctor: model lists (401 for the wrong key), and 1-token requests."""
    key = req["headers"].get("x-api-key") or req["headers"].get("authorization", "")
    if "wrong" in key:
        return http_response(401, {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}})
    if req["method"] == "GET":
        return http_response(200, {"data": []})
    return http_response(200, anthropic_message() if req["path"].endswith("/messages") else OPENAI_COMPLETION)



def test_doctor_checks_each_provider_step_by_step(tmp_path):
    async def scenario():
        tls, cert = await openssl_server(tmp_path)
        async with FakeUpstream(doctor_upstream) as up:
            providers = {
                "anthropic": {"format": "anthropic", "base_url": up.url, "api_key": "sk-ant-api03-good-123456"},
                "oai": {"format": "openai", "base_url": up.url + "/v1", "api_key": "k-good-1234567"},
                "wrongkey": {"format": "openai", "base_url": up.url + "/v1", "api_key": "k-wrong-1234567"},
                "nokey": {"format": "openai", "base_url": up.url + "/v1", "api_key_env": "NOPE_KEY", "auth": "api_key"},
                "nodns": {"format": "openai", "base_url": "http://nonexistent.invalid/v1", "api_key": "k-1234567890"},
                "closed": {"format": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "api_key": "k-1234567890"},
                "unused": {"format": "openai", "base_url": "http://nonexistent.invalid/v1"}}
            if tls:
                providers["tls"] = {"format": "openai", "base_url": f"https://localhost:{tls.sockets[0].getsockname()[1]}/v1",
                                    "api_key": "k-1234567890"}
            models = [{"id": name, "provider": name, "model": "m"} for name in providers if name not in ("anthropic", "unused")]
            config = make_config(tmp_path, None, providers=providers, models=models)
            async with running_proxy(config) as (server, port):
                checks = await cp.run_doctor(cp.doctor_exchange(server))
                status, _, raw = await call(port, "GET", "/test-connection")
                deep = await cp.run_doctor(cp.doctor_exchange(server), deep=True)
            if tls:
                tls.close()
            return checks, status, json.loads(raw), deep, bool(tls)
    checks, status, answer, deep, with_tls = run(scenario())
    by = {(c["provider"], c["check"]): c for c in checks}
    assert [c["check"] for c in checks if c["provider"] == "anthropic"] == ["dns", "tcp", "credentials"]
    assert by[("anthropic", "credentials")]["status"] == "ok" and by[("oai", "credentials")]["status"] == "ok"
    assert by[("wrongkey", "credentials")]["status"] == "fail" and "401" in by[("wrongkey", "credentials")]["detail"]
    assert by[("nokey", "credentials")]["fix"] == "set $NOPE_KEY"
    assert by[("nodns", "dns")]["status"] == "fail" and ("nodns", "tcp") not in by
    assert by[("closed", "tcp")]["status"] == "fail" and "HTTPS_PROXY" in by[("nodns", "dns")]["fix"]
    assert not any(c["provider"] == "unused" for c in checks)
    assert by[("claude", "login")]["status"] == "skip"
    if with_tls:
        assert by[("tls", "tls")]["status"] == "fail" and "CA_BUNDLE" in by[("tls", "tls")]["fix"]
        assert "certificate not trusted" in by[("tls", "tls")]["detail"]
    assert status == 503 and answer["ok"] is False and len(answer["checks"]) == len(checks)
    assert {(c["provider"], c["status"]) for c in deep if c["check"] == "request"} == {("anthropic", "ok"), ("oai", "ok"),
                                                                                      ("wrongkey", "fail")}
    line = cp.format_check(by[("closed", "tcp")])
    assert line.startswith("FAIL closed") and "-> fix:" in line


def test_doctor_trusts_a_ca_bundle_and_the_cli_exits_nonzero_on_failure(tmp_path):
    async def scenario():
        tls, cert = await openssl_server(tmp_path)
        if tls is None:
            pytest.skip("no openssl to make a certificate")
        provider = {"format": "openai", "base_url": f"https://localhost:{tls.sockets[0].getsockname()[1]}/v1", "auth": "none"}
        server = cp.ProxyServer(make_config(tmp_path, None, providers={"tls": provider}, routes={"default": "tls"},
                                            ca_bundle=str(cert)))
        checks = await cp.check_provider(cp.doctor_exchange(server), server.config.providers["tls"], False)
        tls.close()
        return checks
    checks = run(scenario())
    assert checks[2]["check"] == "tls" and checks[2]["status"] == "ok" and "certificate verified" in checks[2]["detail"]
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"home": str(tmp_path / "h"), "providers": {
        "x": {"format": "openai", "base_url": "http://nonexistent.invalid/v1", "auth": "none"}}, "routes": {"default": "x"}}))
    out = subprocess.run([sys.executable, os.path.join(HERE, "claude_proxy.py"), "doctor", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert out.returncode == 1 and out.stdout.startswith("FAIL x") and "1 failed" in out.stdout


def test_doctor_names_a_plain_http_server_behind_an_https_url(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, {})) as up:     # plain http
            port = up.url.rsplit(":", 1)[1]
            provider = {"format": "openai", "base_url": f"https://127.0.0.1:{port}/v1", "auth": "none"}
            server = cp.ProxyServer(make_config(tmp_path, None, providers={"p": provider}, routes={"default": "p"},
                                                connect_timeout=1.0))
            return await cp.check_provider(cp.doctor_exchange(server), server.config.providers["p"], False)
    tls = next(c for c in run(scenario()) if c["check"] == "tls")
    assert tls["status"] == "fail" and "write the base_url with http://" in tls["fix"], tls


def test_doctor_login_check_when_a_provider_needs_the_login(tmp_path):
    config = make_config(tmp_path, None, providers={"c": {"format": "anthropic", "base_url": "http://127.0.0.1:9",
                                                          "auth": "oauth"}}, routes={"default": "c"})
    check = cp.check_login(cp.doctor_exchange(cp.ProxyServer(config)))
    assert check["status"] == "fail" and "login" in check["fix"]


def test_test_conversion_dry_run_shows_the_upstream_request_redacted(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, OPENAI_COMPLETION)) as o, \
                FakeUpstream(lambda req: http_response(200, anthropic_message())) as a:
            config = make_config(tmp_path, a.url, providers=openai_provider(o.url), filter_tools=["WebSearch"],
                                 models=[{"id": "gpt-up", "provider": "o", "model": "gpt-4o"}],
                                 routes={"default": "anthropic"})
            async with running_proxy(config) as (server, port):
                body = dict(HELLO, model="gpt-up", tools=PLUGIN_TOOLS[:2])
                status, _, raw = await call(port, "POST", "/v1/messages/test_conversion?dry_run=1", body, ANTHROPIC_HEADERS)
                dry = json.loads(raw)
                assert status == 200 and dry["url"] == o.url + "/v1/chat/completions" and not o.requests
                assert dry["headers"]["authorization"] == "Bearer (redacted)" and OPENAI_PROVIDER_KEY.encode() not in raw
                assert dry["body"]["model"] == "gpt-4o" and dry["body"]["messages"] == [{"role": "user", "content": "hi"}]
                assert [t["function"]["name"] for t in dry["body"]["tools"]] == ["Bash"]
                status, _, raw = await call(port, "POST", "/v1/messages/test_conversion?dry_run=1",
                                            dict(HELLO, model="anthropic,claude-opus-4-5"), ANTHROPIC_HEADERS)
                dry = json.loads(raw)
                assert dry["headers"]["x-api-key"] == "sk-ant...(redacted)" and dry["body"]["model"] == "claude-opus-4-5"
                status, _, raw = await call(port, "POST", "/v1/messages/test_conversion",
                                            dict(HELLO, model="o,gpt-4.1"), ANTHROPIC_HEADERS)
                assert status == 200 and json.loads(raw)["content"][0]["text"] == "Hi"
                assert o.requests[-1]["body"]["model"] == "gpt-4.1" and server.ops.recent[-1].route == "test_conversion"
                status, _, raw = await call(port, "POST", "/v1/messages/test_conversion", dict(HELLO, model="claude-haiku"),
                                            ANTHROPIC_HEADERS)
                assert status == 404 and "provider,model" in json.loads(raw)["error"]["message"]
    run(scenario())


# ---- Menu

SEED_000_MENU = """\
 1. Start Proxy Server
 2. Login / Re-authenticate
 3. Refresh Token
 4. Show Token Status
 5. Logout (Clear Tokens)
 6. Setup Long-Term Token
 7. Exit
"""   # seed 000's cli/menu.py; its README: "# Or via menu option 6 in interactive mode ... Select option 6
      # (Setup Long-Term Token)", and logout asked first: Confirm.ask("Are you sure you want to clear all tokens?")


def test_menu_has_seed_000s_numbers_and_asks_before_logging_out(tmp_path):
    async def scenario():
        async with FakeUpstream(FakeTokenServer()) as auth:
            (tmp_path / "c.json").write_text(json.dumps({"oauth": {"token_url": auth.url + "/v1/oauth/token"}}))
            env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "BROWSER": "true",
                   "CLAUDE_PROXY_HOME": str(tmp_path / "h"), "CLAUDE_PROXY_PORT": str(free_port())}
            cp.TokenStore(str(tmp_path / "h" / "oauth_token.json")).save(
                {"access_token": "sk-ant-oat01-menu-0123456789", "refresh_token": None, "expires_at": None,
                 "scope": "user:inference", "source": "long_lived"})
            choices = "4\n5\nn\n4\n5\ny\n4\n6\nthecode\n3\n8\n9\n7\n"
            proc = await asyncio.create_subprocess_exec(
                sys.executable, os.path.join(HERE, "claude_proxy.py"), "menu", "--config", "c.json", cwd=str(tmp_path),
                env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(choices.encode()), 60)
            return proc.returncode, out.decode(), err.decode(), [r["body"] for r in auth.requests]
    code, text, err, token_calls = run(scenario())
    assert code == 0, err
    for line in SEED_000_MENU.splitlines()[1:6]:                     # the seed's numbers, our words
        number = line.split(".")[0].strip()
        assert re.search(rf"^  {number}\) ", text, re.M), line
    assert "6) create a long-term token" in text and "7) quit" in text and "8) show usage stats" in text
    statuses = [json.loads(m) for m in re.findall(r"\{\n.*?^\}", text, re.M | re.S)]
    assert [s["logged_in"] for s in statuses] == [True, True, False, False, True]   # "n" kept the login, "y" cleared it
    assert "Logout cancelled" in text and text.count("Logged out") == 1
    assert [c["grant_type"] for c in token_calls] == ["authorization_code", "refresh_token"]    # 6, then 3
    assert token_calls[0]["expires_in"] == 31536000 and "sk-ant-oat01-new1" in text             # a one-year token, shown
    assert "Token refreshed." in text and statuses[-1]["logged_in"] is True
    assert "no requests recorded" in text and "unknown choice '9'" in text and "sk-ant-oat01-menu" not in text


NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
PROMETHEUS = shutil.which("prometheus")
AFFINITY_NGINX_CONF = """
worker_processes 1;
{user}
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {dir}/nginx-access.log;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    # one session, one instance: Claude Code's x-claude-code-session-id, else Codex's session-id
    map $http_x_claude_code_session_id $claude_proxy_session {{
        "" $http_session_id;
        default $http_x_claude_code_session_id;
    }}
    upstream claude_proxy {{
        hash $claude_proxy_session consistent;
        server 127.0.0.1:{port_a};
        server 127.0.0.1:{port_b};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://claude_proxy;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""
AFFINITY_PROMETHEUS_CONF = """
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: claude_proxy
    scrape_interval: 1s
    authorization:
      type: Bearer
      credentials: {key}
    static_configs:
      - targets: ["127.0.0.1:{port_a}", "127.0.0.1:{port_b}"]
"""


async def wait_for_port(port, proc, timeout=30.0):
    """Until something accepts on the port (fails when proc exits first)."""
    deadline = time.monotonic() + timeout
    while not port_open(port):
        assert proc.returncode is None and time.monotonic() < deadline, f"nothing listens on {port}"
        await asyncio.sleep(0.05)


async def prometheus_sum(port, query, want, timeout=30.0):
    """The value of an instant query once it reaches `want` (its last value when it does not)."""
    deadline, value = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        status, _, body = await call(port, "GET", "/api/v1/query?query=" + urllib.parse.quote(query))
        result = json.loads(body)["data"]["result"] if status == 200 else []
        value = float(result[0]["value"][1]) if result else None
        if value == want:
            break
        await asyncio.sleep(0.25)
    return value


@pytest.mark.skipif(NGINX is None or PROMETHEUS is None, reason="needs Debian's nginx and prometheus packages")
def test_two_instances_behind_nginx_keep_each_session_on_one_and_prometheus_sums_them(tmp_path):
    key = "proxy-key-0123456789"
    port, prom_port = free_port(), free_port()
    sessions = [("x-claude-code-session-id", f"claude-{i:02d}-5f0c2c1e") for i in range(12)] + \
               [("session-id", f"codex-{i:02d}-019a1b2c") for i in range(8)]   # all 20 on one instance: p = 2e-6

    async def scenario():
        async with FakeUpstream(session_script) as up, contextlib.AsyncExitStack() as stack:
            servers = [await stack.enter_async_context(running_proxy(make_config(
                tmp_path / name, up.url, proxy_api_key=key))) for name in ("a", "b")]
            ports = {"port_a": servers[0][1], "port_b": servers[1][1]}
            (tmp_path / "nginx.conf").write_text(AFFINITY_NGINX_CONF.format(
                dir=tmp_path, port=port, user="user root;" if os.geteuid() == 0 else "", **ports))
            (tmp_path / "prometheus.yml").write_text(AFFINITY_PROMETHEUS_CONF.format(key=key, **ports))
            nginx = await asyncio.create_subprocess_exec(NGINX, "-e", str(tmp_path / "nginx-error.log"), "-p", str(tmp_path),
                                                         "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;",
                                                         stderr=asyncio.subprocess.DEVNULL)
            prometheus = await asyncio.create_subprocess_exec(
                PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}", stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL)
            try:
                await wait_for_port(port, nginx)
                await wait_for_port(prom_port, prometheus)
                for round_ in range(3):
                    for header, session in sessions:
                        status, _, _ = await call(port, "POST", "/v1/messages", HELLO,
                                                  dict(ANTHROPIC_HEADERS, **{header: session, "x-api-key": key}))
                        assert status == 200
                placed = {session: [sum(r.session_id == session for r in s.ops.recent) for s, _ in servers]
                          for _, session in sessions}
                total = await prometheus_sum(prom_port, "sum(claude_proxy_requests_total)", 3 * len(sessions))
                status, _, body = await call(prom_port, "GET", "/api/v1/query?query=" + urllib.parse.quote(
                    "sum by (instance) (claude_proxy_requests_total)"))
                per_instance = {r["metric"]["instance"]: float(r["value"][1]) for r in json.loads(body)["data"]["result"]}
                return placed, total, per_instance, ports
            finally:
                for proc in (nginx, prometheus):
                    proc.terminate()
                    await proc.wait()
    placed, total, per_instance, ports = run(scenario())
    assert all(sorted(counts) == [0, 3] for counts in placed.values()), placed       # every session on one instance
    instances = {counts.index(3) for counts in placed.values()}
    assert instances == {0, 1}, placed                                              # and both instances used
    assert total == 3 * len(sessions)
    assert per_instance == {f"127.0.0.1:{port}": 3.0 * sum(counts[i] == 3 for counts in placed.values())
                            for i, port in enumerate(ports.values())}
    by_instance = {port: [s for s, counts in placed.items() if counts[i] == 3] for i, port in enumerate(ports.values())}
    print(f"\nnginx affinity (3 requests per session): {by_instance}; Prometheus sum(claude_proxy_requests_total) = "
          f"{total:.0f}, by instance {per_instance}")


# =============================================================================================
# 14. CLI: launchers (code, codex, gemini) and the status line
# =============================================================================================

@pytest.mark.parametrize("argv, expected", [
    (["code", "-p", "hi there", "--model", "x"], ([], "code", ["-p", "hi there", "--model", "x"])),
    (["--port", "9000", "codex", "exec", "--port", "1"], (["--port", "9000"], "codex", ["exec", "--port", "1"])),
    (["-p", "9000", "--debug", "gemini"], (["-p", "9000", "--debug"], "gemini", [])),
    (["--config", "code", "code", "--", "x"], (["--config", "code"], "code", ["--", "x"])),   # a value is no command
    (["--port=9000", "code"], (["--port=9000"], "code", [])),
    (["stats", "code"], None), (["serve"], None), ([], None), (["--", "code"], None),
])
def test_split_launch_argv(argv, expected):
    assert cp.split_launch_argv(argv) == expected


@pytest.mark.parametrize("summary, running, expected", [
    (None, True, "claude_proxy 127.0.0.1:8082 · no request in this session yet"),
    (None, False, "claude_proxy 127.0.0.1:8082 · not running"),
    ({"requests": 3, "input_tokens": 1200, "output_tokens": 950, "cache_read_input_tokens": 36000,
      "cache_creation_input_tokens": 2800, "cost_usd": 0.04213, "unpriced_requests": 0,
      "last": {"route": "default", "requested_model": "claude-opus-5-5", "provider": "openrouter",
               "upstream_model": "gpt-5.5", "status": 200, "error_type": None, "failed": False}}, True,
     "default → openrouter/gpt-5.5 · 3 req · 40.0k in / 950 out · $0.0421 · cache 90%"),
    ({"requests": 1, "input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0,
      "cache_creation_input_tokens": 0, "cost_usd": None, "unpriced_requests": 0,
      "last": {"route": "fallback", "requested_model": "main", "provider": "backup", "upstream_model": "m-backup",
               "status": 529, "error_type": "overloaded_error", "failed": True}}, False,
     "main → backup/m-backup · 1 req · 0 in / 0 out · cost n/a · ↪ fell back · ✗ 529 overloaded_error · "
     "proxy 127.0.0.1:8082 not running"),
    ({"requests": 2, "input_tokens": 10, "output_tokens": 2_500_000, "cache_read_input_tokens": 0,
      "cache_creation_input_tokens": 0, "cost_usd": 12.5, "unpriced_requests": 1,
      "last": {"route": "model", "requested_model": "gpt-up", "provider": "o", "upstream_model": None,
               "status": 200, "error_type": None, "failed": False}}, True,
     "gpt-up → o/gpt-up · 2 req · 10 in / 2.5M out · $12.50+ · cache 0%"),
])
def test_format_statusline(summary, running, expected):
    assert cp.format_statusline(summary, running, "127.0.0.1:8082") == expected


def test_statusline_command_reads_the_ledger_when_no_proxy_runs_and_always_exits_0(tmp_path):
    import argparse
    cfg, port = tmp_path / "config.json", free_port()
    write_config(cfg, "http://127.0.0.1:9")
    home = str(tmp_path / "home")
    ledger = cp.UsageLedger(os.path.join(home, "usage.db"))
    ledger.add(usage_row(time.time() - 9, "sonnet-direct")._replace(session_id="s-1", provider="anthropic",
                                                                    upstream_model="claude-sonnet-4-5"))
    ledger.add(usage_row(time.time() - 5, "sonnet-direct", status=529, error="overloaded_error")._replace(
        session_id="s-1", route="fallback", provider="backup", upstream_model="m-backup"))
    ledger.close()
    cp.cache_statusline_bytecode(home)
    command = cp.statusline_command(argparse.Namespace(config=str(cfg), host=None, port=port), home)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAUDE_PROXY", "PROXY_API"))}

    def line(stdin):
        out = subprocess.run(command, shell=True, input=stdin, capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout
    assert line(json.dumps({"session_id": "s-1", "model": {"id": "claude-sonnet-4-5"}})) == (
        "sonnet-direct → backup/m-backup · 2 req · 260 in / 14 out · $0.0005 · cache 77% · ↪ fell back · "
        f"✗ 529 overloaded_error · proxy 127.0.0.1:{port} not running\n")
    assert line(json.dumps({"session_id": "s-2"})) == f"claude_proxy 127.0.0.1:{port} · not running\n"
    assert "no session id on stdin" in line("not json")
    assert os.path.exists(os.path.join(home, "pycache"))      # imported from bytecode cached for it


FAKE_CLIENT = r'''#!PYTHON
"""A stand-in client: records its arguments and environment, makes one request through the
proxy the launcher points it at, runs the configured status line, then waits or exits."""
import json, os, signal, subprocess, sys, time, urllib.request
name = os.path.basename(sys.argv[0])
log = {"name": name, "args": sys.argv[1:], "env": {k: v for k, v in os.environ.items()
       if k.startswith(("ANTHROPIC", "API_TIMEOUT", "GEMINI", "GOOGLE", "CLAUDE_PROXY_API", "OPENAI"))}}
signal.signal(signal.SIGINT, lambda *a: (log.update(signal="INT"), finish(40)))
signal.signal(signal.SIGTERM, lambda *a: (log.update(signal="TERM"), finish(41)))
def finish(code):
    with open(os.environ["FAKE_LOG"], "a") as fh:
        fh.write(json.dumps(log) + "\n")
    sys.exit(code)
if name == "claude":
    settings = json.load(open(sys.argv[sys.argv.index("--settings") + 1]))
    log["settings"] = settings
    url, key = os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages", os.environ["ANTHROPIC_AUTH_TOKEN"]
    body = {"model": "claude-sonnet-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
elif name == "codex":
    flags = dict(sys.argv[i + 1].split("=", 1) for i, a in enumerate(sys.argv) if a == "-c")
    url = json.loads(flags["model_providers.claude_proxy.base_url"]) + "/responses"
    key = os.environ[json.loads(flags["model_providers.claude_proxy.env_key"])]
    body = {"model": "claude-sonnet-4-5", "input": "hi", "store": False}
else:
    system = os.environ.get("GEMINI_CLI_SYSTEM_SETTINGS_PATH")
    log["system_settings"] = json.load(open(system)) if system else None
    url, key, body = os.environ["GOOGLE_GEMINI_BASE_URL"] + "/health", os.environ["GEMINI_API_KEY"], None
request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), headers={
    "authorization": "Bearer " + key, "content-type": "application/json", "anthropic-version": "2023-06-01",
    "x-claude-code-session-id": "launched-session"})
log["answer"] = json.loads(urllib.request.urlopen(request, timeout=30).read())
if name == "claude" and "statusLine" in log["settings"]:
    log["statusline"] = subprocess.run(log["settings"]["statusLine"]["command"], shell=True, text=True,
        input=json.dumps({"session_id": "launched-session"}), capture_output=True, timeout=30).stdout
if os.environ.get("FAKE_WAIT"):
    log["waiting"] = True
    with open(os.environ["FAKE_WAIT"] + ".ready", "w"):
        pass
    while not os.path.exists(os.environ["FAKE_WAIT"]):
        time.sleep(0.02)
finish(int(os.environ.get("FAKE_EXIT", "0")))
'''


def fake_clients(tmp_path):
    """A bin directory with claude, codex and gemini stand-ins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("claude", "codex", "gemini"):
        path = bin_dir / name
        path.write_text(FAKE_CLIENT.replace("PYTHON", sys.executable, 1))
        path.chmod(0o755)
    return bin_dir


def launch_env(tmp_path, **extra):
    """The environment a launcher runs with: the fake clients first on PATH, a private HOME, no
    proxy settings inherited from the outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAUDE_PROXY", "PROXY_API", "ANTHROPIC", "OPENAI",
                                                                     "GEMINI", "GOOGLE", "CLAUDE_PATH", "CODEX_PATH"))}
    home = tmp_path / "user-home"
    home.mkdir(exist_ok=True)
    env.update(PATH=f"{fake_clients(tmp_path)}{os.pathsep}{env.get('PATH', '')}", HOME=str(home),
               FAKE_LOG=str(tmp_path / "clients.jsonl"), **extra)
    return env


async def launch(tmp_path, argv, env, wait=True):
    """`claude_proxy.py ARGV` as a subprocess (inside the running loop, so fakes keep serving)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, os.path.join(HERE, "claude_proxy.py"), *argv, env=env,
                                                cwd=str(tmp_path), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    if not wait:
        return proc
    out, err = await finish_launch(proc)
    return proc.returncode, out.decode(), err.decode()


async def finish_launch(proc, timeout=60):
    """A launcher's output once it exits; killed (its session too) when it does not in time."""
    try:
        return await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise


def client_logs(tmp_path):
    """What each fake client recorded, in the order they exited."""
    path = tmp_path / "clients.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def wait_for_file(path, timeout=30.0):
    """Until the file exists."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.02)


def port_open(port):
    """Whether something listens on 127.0.0.1:port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_code_launcher_starts_its_proxy_runs_claude_code_without_a_login_and_stops_it(tmp_path):
    port, cfg = free_port(), tmp_path / "config.json"

    async def scenario():
        async with FakeUpstream(session_script) as up:
            write_config(cfg, up.url, models=[dict({"id": "sonnet-direct", "provider": "anthropic",
                                                    "model": "claude-sonnet-4-5"}, **SONNET_PRICES)],
                         routes={"default": "sonnet-direct"})
            env = launch_env(tmp_path, ANTHROPIC_API_KEY="sk-ant-users-own-key", FAKE_EXIT="3")
            result = await launch(tmp_path, ["--config", str(cfg), "--port", str(port), "code", "-p", 'say "hi" twice',
                                             "--model", "opus"], env)
            return result, up.requests
    (code, out, err), upstream = run(scenario())
    assert code == 3, err                                       # the client's own exit status
    log, = client_logs(tmp_path)
    assert log["args"][2:] == ["-p", 'say "hi" twice', "--model", "opus"] and log["args"][0] == "--settings"
    env = log["env"]
    assert env["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{port}" and env["ANTHROPIC_AUTH_TOKEN"] == cp.LAUNCH_PLACEHOLDER_KEY
    assert "ANTHROPIC_API_KEY" not in env and env["API_TIMEOUT_MS"] == "600000"
    assert log["settings"]["env"]["ANTHROPIC_BASE_URL"] == env["ANTHROPIC_BASE_URL"]
    assert log["answer"]["type"] == "message" and upstream[0]["headers"]["x-api-key"] == "sk-ant-api03-k123456"
    assert log["statusline"].startswith("default → anthropic/claude-sonnet-4-5 · 1 req · 40 in / 7 out · $0.0001")
    assert not port_open(port), "the proxy the launcher started is still running"
    assert not os.path.exists(tmp_path / "home" / "launched" / f"127.0.0.1-{port}" / "proxy.pid")


def test_launchers_share_one_proxy_and_the_last_one_out_stops_it(tmp_path):
    port, cfg = free_port(), tmp_path / "config.json"

    async def scenario():
        async with FakeUpstream(session_script) as up:
            write_config(cfg, up.url)
            flags = ["--config", str(cfg), "--port", str(port)]
            first = await launch(tmp_path, flags + ["code"], launch_env(tmp_path, FAKE_WAIT=str(tmp_path / "go")), wait=False)
            await wait_for_file(tmp_path / "go.ready")
            second = await launch(tmp_path, flags + ["codex", "exec", "hi"], launch_env(tmp_path))
            still_up = port_open(port)
            (tmp_path / "go").write_text("")
            await finish_launch(first)
            return second, still_up, first.returncode, up.requests
    second, still_up, first_code, upstream = run(scenario())
    assert second[0] == 0, second[2]
    assert still_up and first_code == 0 and not port_open(port)
    assert [log["name"] for log in client_logs(tmp_path)] == ["codex", "claude"]
    assert [r["path"] for r in upstream] == ["/v1/messages", "/v1/messages"]


def test_launcher_uses_a_proxy_the_user_started_and_leaves_it_running(tmp_path):
    async def scenario():
        async with FakeUpstream(session_script) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (server, port):
                result = await launch(tmp_path, ["--port", str(port), "code"], launch_env(tmp_path))
                health = json.loads((await call(port, "GET", "/health"))[2])
                return result, health, len(up.requests)
    (code, _, err), health, requests = run(scenario())
    assert code == 0 and requests == 1, err
    assert health["name"] == "claude_proxy" and health["pid"] == os.getpid()     # still up, not restarted


def test_launcher_refuses_a_port_held_by_another_program(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, {"status": "ok"})) as other:
            return await launch(tmp_path, ["--port", str(other.port), "code"], launch_env(tmp_path))
    code, _, err = run(scenario())
    assert code == 1 and "answers but is not claude_proxy" in err and "--port" in err
    assert client_logs(tmp_path) == []


def test_launcher_shows_the_proxys_log_when_it_does_not_come_up(tmp_path):
    cfg = tmp_path / "config.json"
    write_config(cfg, "http://127.0.0.1:9", plugins=[str(tmp_path / "broken_plugin.py")])
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('plugin exploded')\n")

    async def scenario():
        return await launch(tmp_path, ["--config", str(cfg), "--port", str(free_port()), "code"], launch_env(tmp_path))
    code, _, err = run(scenario())
    assert code == 1 and "the proxy started for the client exited" in err, err
    assert "plugin exploded" in err and client_logs(tmp_path) == []


@pytest.mark.parametrize("name, binary, package, variable", [
    ("code", "claude", "@anthropic-ai/claude-code", "CLAUDE_PATH"), ("codex", "codex", "@openai/codex", "CODEX_PATH"),
    ("gemini", "gemini", "@google/gemini-cli", "GEMINI_PATH")])
def test_a_missing_client_is_one_line_naming_its_npm_package(tmp_path, name, binary, package, variable):
    env = dict(launch_env(tmp_path), PATH=str(tmp_path / "empty"))
    out = subprocess.run([sys.executable, os.path.join(HERE, "claude_proxy.py"), "--port", str(free_port()), name],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 127 and out.stderr.count("\n") == 1, out.stderr
    assert f"npm install -g {package}" in out.stderr and f"`{binary}`" in out.stderr and variable in out.stderr
    env[variable] = str(tmp_path / "nowhere" / binary)
    out = subprocess.run([sys.executable, os.path.join(HERE, "claude_proxy.py"), name], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 127 and f"${variable}" in out.stderr and package in out.stderr


def test_codex_and_gemini_launchers_point_their_clients_at_the_proxy_without_touching_user_files(tmp_path):
    port, cfg = free_port(), tmp_path / "config.json"
    user_files = {tmp_path / "user-home" / ".codex" / "config.toml": 'model = "o3"\n',
                  tmp_path / "user-home" / ".gemini" / "settings.json": json.dumps(cp.GEMINI_API_KEY_AUTH)}
    for path, text in user_files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    async def scenario():
        async with FakeUpstream(session_script) as up:
            write_config(cfg, up.url, proxy_api_key="proxy-key-0123456789")
            flags = ["--config", str(cfg), "--port", str(port)]
            codex = await launch(tmp_path, flags + ["codex", "exec", "--skip-git-repo-check", "hi"], launch_env(tmp_path))
            gemini = await launch(tmp_path, flags + ["gemini", "-p", "hi"], launch_env(tmp_path, GOOGLE_API_KEY="g-own"))
            return codex, gemini, up.requests
    codex, gemini, upstream = run(scenario())
    assert codex[0] == 0 and gemini[0] == 0, codex[2] + gemini[2]
    codex_log, gemini_log = client_logs(tmp_path)
    overrides = dict(codex_log["args"][i + 1].split("=", 1) for i, a in enumerate(codex_log["args"]) if a == "-c")
    assert overrides == {"model_provider": '"claude_proxy"', "model_providers.claude_proxy.name": '"claude_proxy"',
                         "model_providers.claude_proxy.base_url": f'"http://127.0.0.1:{port}/v1"',
                         "model_providers.claude_proxy.wire_api": '"responses"',
                         "model_providers.claude_proxy.env_key": '"CLAUDE_PROXY_API_KEY"'}
    assert codex_log["args"][-3:] == ["exec", "--skip-git-repo-check", "hi"]
    assert codex_log["env"]["CLAUDE_PROXY_API_KEY"] == "proxy-key-0123456789" and codex_log["answer"]["object"] == "response"
    assert upstream[0]["path"] == "/v1/messages"                         # the Responses request, converted
    env = gemini_log["env"]
    assert env["GOOGLE_GEMINI_BASE_URL"] == f"http://127.0.0.1:{port}" and env["GEMINI_API_KEY"] == "proxy-key-0123456789"
    assert "GOOGLE_API_KEY" not in env and gemini_log["answer"]["name"] == "claude_proxy"
    assert gemini_log["system_settings"] is None                         # the user's settings select API-key auth
    for path, text in user_files.items():
        assert path.read_text() == text


def gemini_context(tmp_path, env):
    """A LaunchContext for gemini_plan with a private HOME."""
    return cp.LaunchContext(make_config(tmp_path), "http://127.0.0.1:1", "k", dict(env, HOME=str(tmp_path / "h")),
                            ["-p", "x"], str(tmp_path), "")


def test_gemini_launcher_selects_api_key_auth_in_a_system_file_only_where_gemini_cli_loads_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    system = tmp_path / "system.json"
    system.write_text(json.dumps({"general": {"vimMode": True}, "security": {"auth": {"selectedType": "oauth-personal"}}}))
    monkeypatch.setattr(cp, "secure_for_gemini", lambda path: False)      # a user's own directory: skipped by the CLI
    with pytest.raises(cp.ProxyError, match=r"GEMINI_CLI_SYSTEM_SETTINGS_PATH\) is honoured only for a file that root owns"):
        cp.gemini_plan(gemini_context(tmp_path, {"GEMINI_CLI_SYSTEM_SETTINGS_PATH": str(system)}))
    monkeypatch.setattr(cp, "secure_for_gemini", lambda path: True)       # as for root under /root
    env, args = cp.gemini_plan(gemini_context(tmp_path, {"GEMINI_CLI_SYSTEM_SETTINGS_PATH": str(system)}))
    assert json.loads(open(env["GEMINI_CLI_SYSTEM_SETTINGS_PATH"]).read()) == {
        "general": {"vimMode": True}, "security": {"auth": {"selectedType": "gemini-api-key"}}}
    assert env["GEMINI_CLI_SYSTEM_SETTINGS_PATH"] != str(system) and args == ["-p", "x"]
    assert json.loads(system.read_text())["security"]["auth"]["selectedType"] == "oauth-personal"
    system.write_text(json.dumps({"security": {"auth": {"enforcedType": "oauth-personal"}}}))
    with pytest.raises(cp.ProxyError, match="enforces Gemini CLI's auth type 'oauth-personal'"):
        cp.gemini_plan(gemini_context(tmp_path, {"GEMINI_CLI_SYSTEM_SETTINGS_PATH": str(system)}))


def test_gemini_rule_for_system_settings_matches_gemini_cli(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert not cp.secure_for_gemini(str(shared / "settings.json"))          # a directory others may write
    assert cp.secure_for_gemini("/") == (os.stat("/").st_uid == 0 and not os.stat("/").st_mode & 0o022)


def test_claude_code_plan_keeps_the_users_status_line_and_own_key_where_a_route_forwards_it(tmp_path):
    (tmp_path / ".claude").mkdir()
    (tmp_path / ".claude" / "settings.json").write_text(json.dumps({"statusLine": {"type": "command", "command": "mine"}}))
    client_auth = make_config(tmp_path, providers={"anthropic": {"format": "anthropic", "base_url": "http://x", "auth": "client"}})
    env = {"HOME": str(tmp_path), "ANTHROPIC_API_KEY": "sk-ant-own"}
    key = cp.launch_key(client_auth, cp.LAUNCHERS["code"], env)
    child_env, args = cp.claude_code_plan(cp.LaunchContext(client_auth, "http://127.0.0.1:1", key, env, ["-p", "x"],
                                                           str(tmp_path), "statusline-cmd"))
    settings = json.loads(open(args[1]).read())
    assert key is None and child_env["ANTHROPIC_API_KEY"] == "sk-ant-own" and "ANTHROPIC_AUTH_TOKEN" not in child_env
    assert "statusLine" not in settings and settings["env"] == {"ANTHROPIC_BASE_URL": "http://127.0.0.1:1",
                                                                "API_TIMEOUT_MS": "600000"}
    keyed = make_config(tmp_path, proxy_api_key="proxy-key-0123456789")
    assert cp.launch_key(keyed, cp.LAUNCHERS["code"], env) == "proxy-key-0123456789"
    assert cp.launch_key(make_config(tmp_path, "http://x"), cp.LAUNCHERS["code"], env) == cp.LAUNCH_PLACEHOLDER_KEY
    given = cp.claude_code_plan(cp.LaunchContext(keyed, "u", "k", {"HOME": str(tmp_path / "none")}, ["--settings", "s.json"],
                                                 str(tmp_path), "cmd"))
    assert given[1] == ["--settings", "s.json"]                      # the user's own --settings: none of ours


@pytest.mark.parametrize("signame, code", [("SIGTERM", 41), ("SIGINT", 40)])
def test_launcher_forwards_signals_to_its_client_and_exits_with_its_status(tmp_path, signame, code):
    port, cfg = free_port(), tmp_path / "config.json"

    async def scenario():
        async with FakeUpstream(session_script) as up:
            write_config(cfg, up.url)
            proc = await launch(tmp_path, ["--config", str(cfg), "--port", str(port), "code"],
                                launch_env(tmp_path, FAKE_WAIT=str(tmp_path / "never")), wait=False)
            await wait_for_file(tmp_path / "never.ready")
            proc.send_signal(getattr(signal, signame))              # to the launcher alone, as a supervisor would
            await finish_launch(proc, 30)
            return proc.returncode
    assert run(scenario()) == code
    assert client_logs(tmp_path)[0]["signal"] == signame[3:] and not port_open(port)


# =============================================================================================
# Hardening: fault matrix, bad input, access, secrets, fuzz, load
# =============================================================================================


# Hardening: fault matrix, bad input, access, secrets, fuzz and load tests (loopback only).




# =============================================================================================
# Hardening helpers
# =============================================================================================

OPENAI_HELLO = {"model": "claude-sonnet-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
OPENAI_HEADERS = {"content-type": "application/json"}
OPENAI_COMPLETION = {"id": "c1", "object": "chat.completion", "created": 1, "model": "up",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}}
ANTHROPIC_OVERLOADED = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
OPENAI_OVERLOADED = {"error": {"message": "Overloaded", "type": "server_error", "param": None, "code": "overloaded"}}
OPENAI_PROVIDER_KEY = "k-123456789"


def openai_provider(url):
    """The `o` provider: an OpenAI-compatible upstream at url/v1."""
    return {"o": {"format": "openai", "base_url": url + "/v1", "api_key": OPENAI_PROVIDER_KEY}}


def config_for(tmp_path, provider_format, url, **raw):
    """A config routing everything to an anthropic-format or an openai-format provider at url."""
    if provider_format == "anthropic":
        return make_config(tmp_path, url, **raw)
    return make_config(tmp_path, None, providers=openai_provider(url), routes={"default": "o"}, **raw)


def client_request(client, stream):
    """(path, body, headers) of the smallest request in the client's dialect."""
    if client == "anthropic":
        return "/v1/messages", dict(HELLO, stream=stream), ANTHROPIC_HEADERS
    return "/v1/chat/completions", dict(OPENAI_HELLO, stream=stream), OPENAI_HEADERS


def free_port():
    """A loopback port with no listener (bound, then released)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


async def call_raw(port, method, path, body=None, headers=None, raw=None, extra_head=()):
    """Like call(), but also returns the raw response bytes (to check chunked framing)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
    head = [f"{method} {path} HTTP/1.1", f"host: 127.0.0.1:{port}", "connection: close", f"content-length: {len(data)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()] + list(extra_head)
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    await writer.drain()
    response = await reader.read()
    writer.close()
    status, resp_headers, resp_body = parse_http(response)
    return status, resp_headers, resp_body, response


def sse_items(body):
    """[(event, data text)] without parsing data (the stream may carry garbage on purpose)."""
    decoder = cp.SSEDecoder()
    return decoder.feed(body) + decoder.close()


class Abort(Stream):
    """Read the request, then drop the connection before any response byte."""

    def __init__(self):
        super().__init__([])

    async def write(self, writer, reader=None):
        writer.transport.abort()
        return False


class RawServer:
    """A plain-TCP loopback listener that answers every connection with `reply` and closes
    (a TLS client talking to it fails its handshake)."""

    def __init__(self, reply=b"HTTP/1.1 200 OK\r\n\r\nthis is not TLS\r\n"):
        self.reply, self.connections, self.open_connections = reply, 0, 0

    async def __aenter__(self):
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self._server.close()

    async def _handle(self, reader, writer):
        self.connections += 1
        self.open_connections += 1
        try:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.read(1), 2)   # the ClientHello
                writer.write(self.reply)
                await writer.drain()
        finally:
            self.open_connections -= 1
            writer.close()


async def assert_no_leaks(servers, baseline_tasks, timeout=1.0):
    """After the proxy shut down: every fake's connections closed and no task left behind."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        still_open = sum(s.open_connections for s in servers)
        tasks = asyncio.all_tasks()
        if still_open == 0 and len(tasks) <= baseline_tasks:
            return
        if loop.time() > deadline:
            raise AssertionError(f"leak: {still_open} upstream connection(s) still open, "
                                 f"{len(tasks)} tasks > baseline {baseline_tasks}: "
                                 f"{[t.get_coro() for t in tasks]}")
        await asyncio.sleep(0.02)


def assert_error_response(client, status, body, want_status, want_type=None):
    """A whole error response in the client's dialect."""
    assert status == want_status, (status, body[:300])
    obj = json.loads(body)
    if client == "anthropic":
        assert obj["type"] == "error" and isinstance(obj["error"]["message"], str) and obj["error"]["message"]
        assert isinstance(obj["error"]["type"], str)
        error = obj["error"]
    else:
        error = obj["error"]
        assert {"message", "type", "param", "code"} <= set(error), error
        assert isinstance(error["message"], str) and error["message"]
    if want_type:
        assert error["type"] == want_type, error
    return error


def assert_stream_ends_with_one_error(client, raw, body, want_type):
    """A started stream that failed: exactly one error event, last, nothing after it; chunked end."""
    assert raw.endswith(b"0\r\n\r\n"), raw[-80:]
    items = sse_items(body)
    assert items, body
    if client == "anthropic":
        errors = [i for i, (event, _) in enumerate(items) if event == "error"]
        assert errors == [len(items) - 1], items
        data = json.loads(items[-1][1])
        assert data["type"] == "error" and data["error"]["type"] == want_type and data["error"]["message"]
        assert "message_stop" not in [event for event, _ in items]
    else:
        datas = [d for _, d in items]
        assert "[DONE]" not in datas, datas
        parsed = [json.loads(d) for d in datas]
        errors = [i for i, p in enumerate(parsed) if "error" in p]
        assert errors == [len(parsed) - 1], datas
        error = parsed[-1]["error"]
        assert {"message", "type", "param", "code"} <= set(error) and error["message"]
        assert error["type"] == want_type, error


def assert_success(client, stream, status, headers, body):
    """A normal answer in the client's dialect."""
    assert status == 200, (status, body[:300])
    if not stream:
        obj = json.loads(body)
        assert obj["type"] == "message" if client == "anthropic" else obj["object"] == "chat.completion"
        return
    assert headers["content-type"].startswith("text/event-stream")
    items = sse_items(body)
    if client == "anthropic":
        assert items[-1][0] == "message_stop" and "error" not in [e for e, _ in items]
    else:
        assert items[-1][1] == "[DONE]" and all("error" not in json.loads(d) for _, d in items[:-1])


@pytest.fixture
def fast_backoff(monkeypatch):
    """Backoff delays scaled down 50x (retry-after: 0 stays 0) so retry rows run in milliseconds."""
    original = cp.retry_delay
    monkeypatch.setattr(cp, "retry_delay", lambda headers, attempt, rand=random.random:
                        original(headers, attempt, rand) / 50)


# =============================================================================================
# 1. Fault matrix: fault x client dialect x provider format x stream
# =============================================================================================

COMBOS = [("anthropic", "anthropic"), ("anthropic", "openai"), ("openai", "anthropic"), ("openai", "openai")]
FAULTS = ["refused", "reset_before_headers", "reset_mid_stream", "429_then_200", "529_always",
          "500_then_200", "slow_first_byte", "stalled_stream", "garbage_data_line", "truncated_chunked",
          "tls_handshake_failure"]


def good_answer(provider, stream):
    """What a healthy upstream of this format answers."""
    if provider == "anthropic":
        return Stream(anthropic_stream()) if stream else http_response(200, anthropic_message())
    return Stream(openai_stream_chunks()) if stream else http_response(200, OPENAI_COMPLETION)


def stream_parts(provider):
    return anthropic_stream() if provider == "anthropic" else openai_stream_chunks()


def partial_answer(provider, stream, fault_part):
    """A response that starts well (head plus some body) and then hits fault_part."""
    if stream:
        return Stream(stream_parts(provider)[:3] + [fault_part])
    return Stream([b'{"id": "msg_1", "type": "mess'] + [fault_part], content_type="application/json")


def fault_script(fault, provider, stream):
    """The fake upstream's script for one fault row."""
    count = {"n": 0}

    def script(req):
        count["n"] += 1
        if fault == "reset_before_headers":
            return Abort()
        if fault == "reset_mid_stream":
            return partial_answer(provider, stream, ("reset",))
        if fault == "truncated_chunked":
            return partial_answer(provider, stream, ("truncate",))
        if fault == "stalled_stream":   # a quiet sleep that still notices the proxy hanging up
            return partial_answer(provider, stream, ("sleep", 30))
        if fault == "429_then_200" and count["n"] == 1:
            return http_response(429, ANTHROPIC_OVERLOADED if provider == "anthropic" else OPENAI_OVERLOADED,
                                 [("retry-after", "0")])
        if fault == "500_then_200" and count["n"] == 1:
            return http_response(500, {"type": "error", "error": {"type": "api_error", "message": "boom"}}
                                 if provider == "anthropic" else {"error": {"message": "boom", "type": "server_error",
                                                                            "param": None, "code": None}})
        if fault == "529_always":
            return http_response(529, ANTHROPIC_OVERLOADED if provider == "anthropic" else OPENAI_OVERLOADED)
        if fault == "garbage_data_line":
            if not stream:
                return http_response(200, b"{not json")
            parts = stream_parts(provider)
            return Stream(parts[:2] + [b"data: {not json\n\n"] + parts[2:])
        if fault == "slow_first_byte":
            async def later():
                await asyncio.sleep(0.4)
                return good_answer(provider, stream)
            return later()
        return good_answer(provider, stream)
    return script


# Expected client-visible outcome per fault. ("ok", upstream requests) | ("error", status, type,
# upstream requests) | ("stream_error", type) once a stream started, ("error", ...) for non-streams
# | ("verbatim",): passthrough relays upstream bytes unparsed, so garbage reaches the client as is.
def expected_outcome(fault, client, provider, stream):
    passthrough = client == provider
    if fault in ("refused", "tls_handshake_failure"):
        return ("error", 502, "api_error", 3)                # before any byte: retried, then 502
    if fault == "reset_before_headers":
        return ("error", 502, "api_error", 3)
    if fault in ("reset_mid_stream", "truncated_chunked"):
        return ("stream_error", "api_error") if stream else ("error", 502, "api_error", 1)
    if fault == "stalled_stream":
        return ("stream_error", "timeout_error") if stream else ("error", 504, "timeout_error", 1)
    if fault in ("429_then_200", "500_then_200"):
        return ("ok", 2)
    if fault == "529_always":
        # same dialect: the upstream's own body relayed; else converted (type overloaded_error)
        return ("error", 529, None if passthrough else "overloaded_error", 3)
    if fault == "slow_first_byte":
        return ("ok", 1)
    if fault == "garbage_data_line":
        if passthrough:
            return ("verbatim",)
        return ("stream_error", "api_error") if stream else ("error", 502, "api_error", 1)
    raise AssertionError(fault)


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
@pytest.mark.parametrize("client, provider", COMBOS, ids=[f"{c}_client-{p}_provider" for c, p in COMBOS])
@pytest.mark.parametrize("fault", FAULTS)
def test_fault_matrix(tmp_path, caplog, fast_backoff, fault, client, provider, stream):
    expect = expected_outcome(fault, client, provider, stream)
    path, body, headers = client_request(client, stream)

    async def scenario():
        async with FakeUpstream(fault_script(fault, provider, stream)) as up, RawServer() as tls:
            url = up.url
            if fault == "refused":
                url = f"http://127.0.0.1:{free_port()}"
            elif fault == "tls_handshake_failure":
                url = f"https://127.0.0.1:{tls.port}"
            config = config_for(tmp_path, provider, url, max_retries=2, retry_deadline=5,
                                read_timeout=0.5 if fault == "stalled_stream" else 2.0, connect_timeout=2)
            baseline = len(asyncio.all_tasks())
            started = time.monotonic()
            async with running_proxy(config) as (_, port):
                status, resp_headers, resp_body, raw = await call_raw(port, "POST", path, body, headers)
                health = (await call(port, "GET", "/health"))[0]
            elapsed = time.monotonic() - started
            await assert_no_leaks([up, tls], baseline)
            attempts = tls.connections if fault == "tls_handshake_failure" else len(up.requests)
        assert health == 200
        kind = expect[0]
        if kind == "ok":
            assert_success(client, stream, status, resp_headers, resp_body)
            assert attempts == expect[1]
        elif kind == "error":
            error = assert_error_response(client, status, resp_body, expect[1], expect[2])
            if fault != "refused":
                assert attempts == expect[3], attempts
            if fault == "529_always" and client == provider:
                assert json.loads(resp_body) == (ANTHROPIC_OVERLOADED if client == "anthropic" else OPENAI_OVERLOADED)
            assert "sk-ant" not in json.dumps(error) and OPENAI_PROVIDER_KEY not in json.dumps(error)
        elif kind == "stream_error":
            assert status == 200 and resp_headers["content-type"].startswith("text/event-stream")
            assert_stream_ends_with_one_error(client, raw, resp_body, expect[1])
            assert attempts == 1
        else:  # verbatim
            assert status == 200 and b"{not json" in resp_body
            if stream:
                assert resp_body == b"".join(stream_parts(provider)[:2] + [b"data: {not json\n\n"] +
                                             stream_parts(provider)[2:])
        if fault == "stalled_stream":
            assert elapsed < 3, elapsed
    with caplog.at_level(logging.INFO, logger="claude_proxy"):
        run(asyncio.wait_for(scenario(), 20))
    assert not [r for r in caplog.records if r.exc_info], "an upstream fault was logged as a proxy crash"


BAD_FRAMING = [
    ("te-and-cl", b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n"
                  b"content-length: 5\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
    ("cl-not-a-number", b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1x\r\n\r\n{}"),
    ("bad-status-line", b"HTTP/1.1 OK\r\ncontent-length: 2\r\n\r\n{}"),
    ("bad-chunk-size", b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                       b"zz\r\n{}\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize("client", ["anthropic", "openai"])
@pytest.mark.parametrize("name, response", BAD_FRAMING, ids=[r[0] for r in BAD_FRAMING])
def test_malformed_upstream_framing_is_a_502_not_a_client_error(tmp_path, fast_backoff, name, response, client):
    """A response the proxy cannot frame is the upstream's fault: 502 in the client's dialect
    (never a 400 blaming the client, which SDKs do not retry), and its connection is closed."""
    path, body, headers = client_request(client, False)

    async def scenario():
        async with FakeUpstream(lambda req: response) as up:
            baseline = len(asyncio.all_tasks())
            async with running_proxy(config_for(tmp_path, "anthropic", up.url, max_retries=0)) as (_, port):
                status, _, answer = await call(port, "POST", path, body, headers)
                # the upstream connection must not linger until the read timeout
                await asyncio.sleep(0.2)
                lingering = up.open_connections
            assert_error_response(client, status, answer, 502, "api_error")
            assert lingering == 0, "upstream connection left open after an unusable response"
            await assert_no_leaks([up], baseline)
    run(asyncio.wait_for(scenario(), 10))


@pytest.mark.parametrize("client, provider", COMBOS, ids=[f"{c}_client-{p}_provider" for c, p in COMBOS])
def test_429_beyond_the_retry_deadline_is_relayed_at_once_with_its_retry_hint(tmp_path, client, provider):
    """retry-after past retry_deadline: no sleeping in the proxy; the client gets 429 and the hint."""
    path, body, headers = client_request(client, True)
    error_body = ANTHROPIC_OVERLOADED if provider == "anthropic" else OPENAI_OVERLOADED

    async def scenario():
        async with FakeUpstream(lambda req: http_response(429, error_body, [("retry-after", "30"),
                                                                           ("x-request-id", "up-req-1")])) as up:
            config = config_for(tmp_path, provider, up.url, max_retries=2, retry_deadline=5)
            async with running_proxy(config) as (_, port):
                started = time.monotonic()
                status, resp_headers, answer = await call(port, "POST", path, body, headers)
                return status, resp_headers, answer, time.monotonic() - started, len(up.requests)
    status, resp_headers, answer, elapsed, attempts = run(asyncio.wait_for(scenario(), 10))
    assert elapsed < 2 and attempts == 1
    assert_error_response(client, status, answer, 429, None if client == provider else "rate_limit_error")
    assert resp_headers.get("retry-after") == "30", resp_headers
    assert resp_headers.get("x-request-id") == "up-req-1", resp_headers


def test_stalled_stream_with_keepalives_still_times_out_once(tmp_path):
    """SSE keep-alive comments to the client must not hide an upstream stall from the read timeout."""
    async def scenario():
        async with FakeUpstream(lambda req: Stream(anthropic_stream()[:3] + [("sleep", 30)])) as up:
            config = make_config(tmp_path, up.url, read_timeout=0.6, keepalive_interval=0.1)
            baseline = len(asyncio.all_tasks())
            async with running_proxy(config) as (_, port):
                status, _, body, raw = await call_raw(port, "POST", "/v1/messages", dict(HELLO, stream=True),
                                                      ANTHROPIC_HEADERS)
            await assert_no_leaks([up], baseline)
        assert status == 200 and b": keep-alive" in body
        assert_stream_ends_with_one_error("anthropic", raw, body, "timeout_error")
    run(asyncio.wait_for(scenario(), 10))


# =============================================================================================
# 2. Bad input: a 4xx in the client's dialect naming the field, and the server keeps serving
# =============================================================================================

def _tool_call_then_bare_tool_message():
    return {"model": "claude-sonnet-4-5", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                              "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "r"}]}


# (id, client, provider of the default route, body (bytes sent raw), status, field)
BAD_INPUT = [
    ("a-invalid-json", "anthropic", "anthropic", b'{"model": "x", ', 400, "JSON"),
    ("a-invalid-utf8", "anthropic", "anthropic", b'{"model": "\xff\xfe"}', 400, "JSON"),
    ("a-empty-body", "anthropic", "anthropic", b"", 400, "JSON"),
    ("a-body-array", "anthropic", "anthropic", [HELLO], 400, "object"),
    ("a-body-string", "anthropic", "anthropic", "hello", 400, "object"),
    ("a-missing-model", "anthropic", "anthropic", {"max_tokens": 5, "messages": []}, 400, "model"),
    ("a-missing-messages", "anthropic", "anthropic", {"model": "m", "max_tokens": 5}, 400, "messages"),
    ("a-missing-max_tokens", "anthropic", "anthropic", {"model": "m", "messages": []}, 400, "max_tokens"),
    ("a-messages-string", "anthropic", "anthropic", dict(HELLO, messages="hi"), 400, "messages"),
    ("a-max_tokens-string", "anthropic", "anthropic", dict(HELLO, max_tokens="10"), 400, "max_tokens"),
    ("a-max_tokens-bool", "anthropic", "anthropic", dict(HELLO, max_tokens=True), 400, "max_tokens"),
    ("a-model-number", "anthropic", "anthropic", dict(HELLO, model=5), 400, "model"),
    ("a-unknown-model", "anthropic", "none", HELLO, 404, "configured models: m1"),
    ("a-tool_result-without-id", "anthropic", "openai", dict(HELLO, messages=[
        {"role": "user", "content": [{"type": "tool_result"}]}]), 400, "messages.0.content.0.tool_use_id"),
    ("a-unknown-role", "anthropic", "openai", dict(HELLO, messages=[{"role": "tool", "content": "x"}]),
     400, "messages.0.role"),
    ("a-tools-not-list", "anthropic", "openai", dict(HELLO, tools={}), 400, "tools"),
    ("o-invalid-json", "openai", "anthropic", b"{nope", 400, None),
    ("o-body-array", "openai", "anthropic", [1, 2], 400, None),
    ("o-missing-model", "openai", "anthropic", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("o-missing-messages", "openai", "anthropic", {"model": "claude-sonnet-4-5"}, 400, "messages"),
    ("o-messages-string", "openai", "anthropic", dict(OPENAI_HELLO, messages="hi"), 400, "messages"),
    ("o-n-2", "openai", "anthropic", dict(OPENAI_HELLO, n=2), 400, "n"),
    ("o-max_tokens-string", "openai", "anthropic", dict(OPENAI_HELLO, max_tokens="10"), 400, "max_tokens"),
    ("o-temperature-string", "openai", "anthropic", dict(OPENAI_HELLO, temperature="hot"), 400, "temperature"),
    ("o-tool-message-without-id", "openai", "anthropic", _tool_call_then_bare_tool_message(), 400,
     "messages.2.tool_call_id"),
    ("o-unknown-model", "openai", "none", OPENAI_HELLO, 404, "model"),
    ("o-missing-model-openai-provider", "openai", "openai", {"messages": []}, 400, "model"),
]


@pytest.mark.parametrize("name, client, provider, body, status, field", BAD_INPUT, ids=[r[0] for r in BAD_INPUT])
def test_bad_input_is_a_4xx_in_the_clients_dialect(tmp_path, name, client, provider, body, status, field):
    path = "/v1/messages" if client == "anthropic" else "/v1/chat/completions"
    headers = ANTHROPIC_HEADERS if client == "anthropic" else OPENAI_HEADERS
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, {})) as up:
            if provider == "none":
                config = make_config(tmp_path, up.url, routes={}, models=[{"id": "m1", "provider": "anthropic"}])
            else:
                config = config_for(tmp_path, provider, up.url)
            baseline = len(asyncio.all_tasks())
            async with running_proxy(config) as (_, port):
                got_status, _, got_body = await call(port, "POST", path, headers=headers, raw=raw)
                health = await call(port, "GET", "/health")
            await assert_no_leaks([up], baseline)
            assert up.requests == []   # rejected before any upstream call
        assert health[0] == 200 and json.loads(health[2])["status"] == "ok"
        error = assert_error_response(client, got_status, got_body, status)
        if client == "openai":
            assert error["param"] == field, error
        else:
            assert field in error["message"], error
            assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    run(asyncio.wait_for(scenario(), 10))


def test_orphan_tool_result_from_an_openai_client_is_accepted_as_text(tmp_path):
    """An OpenAI `tool` message answering no known call: not a 4xx, sent on as text (documented)."""
    body = dict(OPENAI_HELLO, messages=[{"role": "user", "content": "hi"},
                                       {"role": "tool", "tool_call_id": "call_nobody", "content": "r"}])

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                status, _, answer = await call(port, "POST", "/v1/chat/completions", body, OPENAI_HEADERS)
            sent = json.dumps(up.requests[0]["body"])
        assert status == 200 and json.loads(answer)["object"] == "chat.completion"
        assert '"tool_result"' not in sent and "call_nobody" in sent
    run(asyncio.wait_for(scenario(), 10))


# Malformed types deep inside a body the proxy converts (or estimates) itself: the converter must
# answer 400 naming the field, never "internal proxy error" (500).
DEEP_BAD_INPUT = [
    ("a-role-is-a-list", "/v1/messages", "openai", {},
     dict(HELLO, messages=[{"role": ["user"], "content": "hi"}]), "messages.0.role"),
    ("o-role-is-a-list", "/v1/chat/completions", "anthropic", {},
     dict(OPENAI_HELLO, messages=[{"role": ["user"], "content": "hi"}]), "messages.0.role"),
    ("a-count_tokens-tools-int", "/v1/messages/count_tokens", "openai", {},
     {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": 7}, "tools"),
    ("a-long_context-estimate-tool_use-name-null", "/v1/messages", "openai", {"long_context": "o"},
     dict(HELLO, messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
         {"type": "tool_use", "id": "t1", "name": None, "input": {}}]}]), "messages.1.content.0"),
    ("a-assistant-text-not-a-string", "/v1/messages", "openai", {},
     dict(HELLO, messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
         {"type": "text", "text": 5}]}, {"role": "user", "content": "go on"}]), "messages.1.content.0.text"),
    ("a-user-text-not-a-string", "/v1/messages", "openai", {},
     dict(HELLO, messages=[{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]),
     "messages.0.content.0.text"),
    ("a-tool_choice-type-object", "/v1/messages", "openai", {},
     dict(HELLO, tools=[{"name": "w", "input_schema": {"type": "object"}}], tool_choice={"type": {}}),
     "tool_choice.type"),
]


@pytest.mark.parametrize("name, path, provider, routes, body, field", DEEP_BAD_INPUT, ids=[r[0] for r in DEEP_BAD_INPUT])
def test_malformed_types_deep_in_the_body_are_400_not_500(tmp_path, name, path, provider, routes, body, field):
    client = "openai" if "chat" in path else "anthropic"

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, OPENAI_COMPLETION)) as up:
            config = config_for(tmp_path, provider, up.url)
            if routes:
                config = make_config(tmp_path, None, providers=openai_provider(up.url),
                                     routes=dict({"default": "o"}, **routes))
            async with running_proxy(config) as (_, port):
                status, _, answer = await call(port, "POST", path, body,
                                               ANTHROPIC_HEADERS if client == "anthropic" else OPENAI_HEADERS)
                assert (await call(port, "GET", "/health"))[0] == 200
        error = assert_error_response(client, status, answer, 400)
        if client == "openai":
            assert error["param"] and error["param"].startswith(field.split(".")[0])
    run(asyncio.wait_for(scenario(), 10))


def test_anthropic_envelope_names_the_field_of_a_deep_error(tmp_path):
    """Anthropic's envelope has no `param`: the message itself must say where (as Anthropic's API does:
    "messages.0.content.0.tool_use_id: Field required")."""
    body = dict(HELLO, messages=[{"role": "user", "content": [{"type": "tool_result"}]}])

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, OPENAI_COMPLETION)) as up:
            async with running_proxy(config_for(tmp_path, "openai", up.url)) as (_, port):
                return await call(port, "POST", "/v1/messages", body, ANTHROPIC_HEADERS)
    status, _, answer = run(asyncio.wait_for(scenario(), 10))
    error = assert_error_response("anthropic", status, answer, 400, "invalid_request_error")
    assert "messages.0.content.0.tool_use_id" in error["message"], error


# Upstream answers of the right content type but the wrong shape: the client must see an upstream
# error (502 / api_error event), not an "internal proxy error" with a traceback in the log.
def _odd_anthropic_stream():
    return Stream([b'event: message_start\ndata: {"type": "message_start", "message": [1]}\n\n'] + anthropic_stream()[1:])


def _odd_openai_stream():
    return Stream([openai_stream_chunks()[0], openai_sse({"id": "c1", "choices": 5})] + openai_stream_chunks()[1:])


ODD_UPSTREAM = [
    ("openai_client-anthropic_provider-stream", "openai", "anthropic", True, _odd_anthropic_stream),
    ("openai_client-anthropic_provider-nonstream", "openai", "anthropic", False,
     lambda: http_response(200, dict(anthropic_message(), content="oops"))),
    ("anthropic_client-openai_provider-stream", "anthropic", "openai", True, _odd_openai_stream),
    ("anthropic_client-openai_provider-nonstream", "anthropic", "openai", False,
     lambda: http_response(200, dict(OPENAI_COMPLETION, choices=[{"index": 0, "message": [None]}]))),
]


@pytest.mark.parametrize("name, client, provider, stream, answer", ODD_UPSTREAM, ids=[r[0] for r in ODD_UPSTREAM])
def test_wrongly_shaped_upstream_answers_are_upstream_errors(tmp_path, caplog, name, client, provider, stream, answer):
    path, body, headers = client_request(client, stream)

    async def scenario():
        async with FakeUpstream(lambda req: answer()) as up:
            async with running_proxy(config_for(tmp_path, provider, up.url)) as (_, port):
                return await call_raw(port, "POST", path, body, headers)
    with caplog.at_level(logging.WARNING, logger="claude_proxy"):
        status, _, answer_body, raw = run(asyncio.wait_for(scenario(), 10))
    if stream and status == 200:
        assert_stream_ends_with_one_error(client, raw, answer_body, "api_error")
        items = sse_items(answer_body)
        message = json.loads(items[-1][1])["error"]["message"]
    else:
        message = assert_error_response(client, status, answer_body, 502, "api_error")["message"]
    assert "internal proxy error" not in message, message
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged for an upstream fault"


# =============================================================================================
# 3. Access: PROXY_API_KEY, public /health, Host and absolute-form targets never redirect
# =============================================================================================

PROXY_KEY = "pk-test-123456"


def test_proxy_api_key_is_required_except_on_health(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            config = make_config(tmp_path, up.url, proxy_api_key=PROXY_KEY)
            async with running_proxy(config) as (_, port):
                status, _, body = await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
                assert_error_response("anthropic", status, body, 401, "authentication_error")
                status, _, body = await call(port, "POST", "/v1/chat/completions", OPENAI_HELLO, OPENAI_HEADERS)
                assert_error_response("openai", status, body, 401, "authentication_error")
                status, headers, body = await call(port, "POST", "/v1/messages", HELLO,
                                                   dict(ANTHROPIC_HEADERS, **{"x-api-key": "pk-test-wrong!"}))
                assert status == 401 and headers.get("x-should-retry") == "false"   # Claude Code says so at once
                assert "wrong proxy key: send the value of $PROXY_API_KEY" in json.loads(body)["error"]["message"]
                status, _, body = await call(port, "POST", "/v1/messages", HELLO,
                                             dict(ANTHROPIC_HEADERS, authorization="Bearer " + PROXY_KEY + "x"))
                assert status == 401
                status, _, body = await call(port, "GET", "/v1/models")
                assert status == 401
                assert up.requests == []
                status, _, body = await call(port, "POST", "/v1/messages", HELLO,
                                             dict(ANTHROPIC_HEADERS, **{"x-api-key": PROXY_KEY}))
                assert status == 200, body
                status, _, body = await call(port, "POST", "/v1/messages", HELLO,
                                             dict(ANTHROPIC_HEADERS, authorization="Bearer " + PROXY_KEY))
                assert status == 200, body
                status, _, body = await call(port, "POST", "/v1/chat/completions", OPENAI_HELLO,
                                             dict(OPENAI_HEADERS, authorization="Bearer " + PROXY_KEY))
                assert status == 200, body
                status, _, body = await call(port, "GET", "/health")
                assert status == 200 and json.loads(body)["status"] == "ok"
            assert len(up.requests) == 3
            for sent in up.requests:   # the proxy key is never forwarded upstream
                assert PROXY_KEY not in json.dumps(sent["headers"])
                assert sent["headers"]["x-api-key"] == "sk-ant-api03-testkey-0123456789"
    run(asyncio.wait_for(scenario(), 10))


async def _raw_exchange(port, request_bytes):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_bytes)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


def test_host_header_and_absolute_targets_never_change_the_upstream(tmp_path):
    body = json.dumps(HELLO).encode()

    def request(target, host, method=b"POST", extra=b""):
        return (b"%s %s HTTP/1.1\r\nhost: %s\r\nanthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n"
                b"%sconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                % (method, target, host, extra, len(body), body))

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            async with running_proxy(make_config(tmp_path, up.url, allowed_hosts=["evil.example"])) as (_, port):
                # Host: evil.example (allowed here, as behind a reverse proxy) -> the configured
                # upstream, with its own Host
                data = await _raw_exchange(port, request(b"/v1/messages", b"evil.example",
                                                         extra=b"x-forwarded-host: evil.example\r\n"))
                assert data.startswith(b"HTTP/1.1 200")
                assert up.requests[-1]["headers"]["host"] == f"127.0.0.1:{up.port}"
                assert up.requests[-1]["path"] == "/v1/messages"
                count = len(up.requests)
                # absolute-form targets and CONNECT: rejected or served by the configured upstream
                for target, method in ((b"http://evil.example/v1/messages", b"POST"),
                                       (b"https://evil.example:443/v1/messages", b"POST"),
                                       (b"//evil.example/v1/messages", b"POST"),
                                       (b"evil.example:443", b"CONNECT")):
                    data = await _raw_exchange(port, request(target, b"evil.example", method))
                    status = int(data.split(b" ", 2)[1])
                    assert status in (200, 400, 404, 405), data[:200]
                    if status == 200:
                        count += 1
                        assert up.requests[-1]["path"] == "/v1/messages"
                    assert len(up.requests) == count
                assert (await call(port, "GET", "/health"))[0] == 200
            for sent in up.requests:   # x-forwarded-host is not on the forwarding allow-list
                assert sent["headers"]["host"] == f"127.0.0.1:{up.port}" and "x-forwarded-host" not in sent["headers"]
    run(asyncio.wait_for(scenario(), 10))


# =============================================================================================
# 4. Secrets never reach the logs
# =============================================================================================

def test_no_secret_in_debug_logs_for_a_whole_session(tmp_path):
    anthropic_key, openai_key = "sk-ant-api03-secretkey-ABCDEF0123", "sk-openai-secretkey-XYZ9876"
    oauth_token, proxy_key = "sk-ant-oat01-secrettoken-QWERTY55", "pk-secret-proxykey-42424242"
    secrets_all = [anthropic_key, openai_key, oauth_token, proxy_key]

    def script(req):
        seen = json.dumps(req["headers"])
        if req["body"] and "fail" in json.dumps(req["body"]):   # an upstream that echoes the credential
            return http_response(500, {"type": "error", "error": {"type": "api_error", "message": "bad key " + seen}})
        if req["path"].startswith("/v1/chat/completions"):
            if req["body"].get("stream"):
                return Stream(openai_stream_chunks("Hi " + seen))
            return http_response(200, OPENAI_COMPLETION)
        if req["body"].get("stream"):
            return Stream(anthropic_stream("Hi " + seen))
        return http_response(200, anthropic_message("Hi " + seen))

    class Capture(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.lines = []

        def emit(self, record):
            self.lines.append(self.format(record))

    async def scenario(raw_capture, scrubbed_capture):
        async with FakeUpstream(script) as up:
            config = make_config(
                tmp_path, None, proxy_api_key=proxy_key, oauth_token=oauth_token, max_retries=1,
                log_level="DEBUG",
                providers={"anthropic": {"format": "anthropic", "base_url": up.url, "auth": "oauth"},
                           "k": {"format": "anthropic", "base_url": up.url, "api_key": anthropic_key},
                           "o": {"format": "openai", "base_url": up.url + "/v1", "api_key": openai_key}},
                models=[{"id": "via-oauth", "provider": "anthropic"}, {"id": "via-key", "provider": "k"},
                        {"id": "via-openai", "provider": "o"}],
                routes={"default": "k"})
            server_redactor = cp.Redactor(config.secret_values())
            scrubbed_capture.addFilter(server_redactor)      # as setup_logging() installs it
            auth = {"x-api-key": proxy_key}
            async with running_proxy(config, redactor=server_redactor) as (_, port):
                for model in ("via-oauth", "via-key", "via-openai"):
                    for stream in (False, True):
                        status, _, body = await call(port, "POST", "/v1/messages", dict(HELLO, model=model, stream=stream),
                                                     dict(ANTHROPIC_HEADERS, **auth))
                        assert status == 200, body
                        status, _, body = await call(port, "POST", "/v1/chat/completions",
                                                     dict(OPENAI_HELLO, model=model, stream=stream),
                                                     dict(OPENAI_HEADERS, authorization="Bearer " + proxy_key))
                        assert status == 200, body
                    status, _, _ = await call(port, "POST", "/v1/messages",
                                              dict(HELLO, model=model, system="fail"), dict(ANTHROPIC_HEADERS, **auth))
                    assert status >= 500
                assert (await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS))[0] == 401
                assert (await call(port, "POST", "/v1/messages", HELLO,
                                   dict(ANTHROPIC_HEADERS, **{"x-api-key": proxy_key[:-1]})))[0] == 401
                assert (await call(port, "POST", "/v1/messages", b"{bad", dict(ANTHROPIC_HEADERS, **auth)))[0] == 400
                # an unknown model's name is echoed; a secret-looking Host is not an upstream
                assert (await call(port, "GET", "/auth/status", headers=auth))[0] in (200, 404)
            sent = json.dumps([r["headers"] for r in up.requests])
            assert oauth_token in sent and anthropic_key in sent and openai_key in sent   # all three used

    logger = logging.getLogger("claude_proxy")
    old_level, old_propagate = logger.level, logger.propagate
    raw_capture, scrubbed_capture = Capture(), Capture()
    raw_capture.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    scrubbed_capture.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logger.addHandler(raw_capture)       # first: sees the records before the redactor rewrites them
    logger.addHandler(scrubbed_capture)
    logger.setLevel(logging.DEBUG)
    try:
        run(asyncio.wait_for(scenario(raw_capture, scrubbed_capture), 20))
    finally:
        logger.removeHandler(raw_capture)
        logger.removeHandler(scrubbed_capture)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
    assert raw_capture.lines, "nothing was logged at DEBUG"
    leaks = [(s, line) for s in secrets_all for line in scrubbed_capture.lines if s in line]
    assert not leaks, f"secrets in the (redacted) log: {leaks}"
    raw_leaks = [(s, line) for s in secrets_all for line in raw_capture.lines if s in line]
    assert not raw_leaks, f"secrets passed to the logger before redaction: {raw_leaks}"


# =============================================================================================
# 5. Fuzz (fixed seed): only ProxyError subclasses may escape
# =============================================================================================

FUZZ_SEED = 1234
JUNK_VALUES = [None, True, False, 0, -1, 7, 2 ** 40, 1.5, "", "x", "text_delta", "tool_use", "[DONE]", [],
               [None], [1, "a"], {}, {"type": None}, {"type": "text"}, {"index": "0"}, [{}], {"a": [{"b": {}}]}]


def _garbage(rand, depth=0):
    pick = rand.random()
    if depth > 2 or pick < 0.6:
        return copy.deepcopy(rand.choice(JUNK_VALUES))
    if pick < 0.8:
        return [_garbage(rand, depth + 1) for _ in range(rand.randint(0, 3))]
    return {rand.choice(["type", "text", "index", "id", "name", "content", "delta", "usage", "x"]):
            _garbage(rand, depth + 1) for _ in range(rand.randint(0, 3))}


def mutate(obj, rand, rate=0.15):
    """A copy of obj with random deletions, type swaps, None and nested garbage."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            roll = rand.random()
            if roll < rate / 3:
                continue                                   # deletion
            out[key] = _garbage(rand) if roll < rate else mutate(value, rand, rate)
        if rand.random() < rate / 3:
            out[rand.choice(["type", "index", "extra", "content", "tool_calls"])] = _garbage(rand)
        return out
    if isinstance(obj, list):
        out = [_garbage(rand) if rand.random() < rate / 2 else mutate(v, rand, rate)
               for v in obj if rand.random() > rate / 4]
        if rand.random() < rate / 3:
            out.insert(rand.randint(0, len(out)), _garbage(rand))
        return out
    if rand.random() < rate:
        return _garbage(rand)
    return obj


ANTHROPIC_BODIES = [
    dict(HELLO),
    {"model": "claude-x", "max_tokens": 100, "stream": True, "system": [{"type": "text", "text": "S",
                                                                          "cache_control": {"type": "ephemeral"}}],
     "thinking": {"type": "enabled", "budget_tokens": 2048}, "temperature": 0.5, "stop_sequences": ["x"],
     "tools": [{"name": "weather", "description": "w", "input_schema": {"type": "object", "properties": {
         "city": {"type": "string"}}}}], "tool_choice": {"type": "auto"},
     "messages": [
         {"role": "user", "content": [{"type": "text", "text": "hi"},
                                      {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                   "data": "AAAA"}}]},
         {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "sig"},
                                           {"type": "text", "text": "calling"},
                                           {"type": "tool_use", "id": "toolu_1", "name": "weather",
                                            "input": {"city": "Paris"}}]},
         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                       "content": [{"type": "text", "text": "sunny"}], "is_error": False},
                                      {"type": "document", "source": {"type": "base64", "media_type":
                                                                      "application/pdf", "data": "JVBE"}}]}]},
]
OPENAI_BODIES = [
    dict(OPENAI_HELLO),
    {"model": "claude-opus-4-5", "stream": True, "stream_options": {"include_usage": True}, "n": 1,
     "max_completion_tokens": 500, "temperature": 0.2, "top_p": 0.9, "stop": ["END"], "reasoning_effort": "high",
     "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
     "tools": [{"type": "function", "function": {"name": "get_weather", "description": "w",
                                                 "parameters": {"type": "object", "properties": {}}}}],
     "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "user": "u1",
     "messages": [
         {"role": "system", "content": "be brief"},
         {"role": "user", "content": [{"type": "text", "text": "hi"},
                                      {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]},
         {"role": "assistant", "content": None, "reasoning_content": "thinking",
          "tool_calls": [{"id": "call_1", "type": "function",
                          "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
         {"role": "user", "content": "thanks", "name": "bob"}]},
]


def _sample_openai_chunks():
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "up"}
    chunks = [json.loads(c[len(b"data: "):]) for c in openai_stream_chunks("Hi", tool=("weather", {"city": "P"}))[:-1]]
    chunks[1:1] = [dict(base, choices=[{"index": 0, "delta": {"reasoning_content": "r"}, "finish_reason": None}]),
                   dict(base, choices=[{"index": 0, "delta": {"content": "<think>a</think>b"}, "finish_reason": None}]),
                   dict(base, choices=[{"index": 0, "delta": {"reasoning_details": [
                       {"type": "reasoning.text", "text": "t", "signature": "s"}]}, "finish_reason": None}])]
    chunks.append(dict(base, choices=[], usage={"prompt_tokens": 3, "completion_tokens": 1,
                                               "prompt_tokens_details": {"cached_tokens": 1}}))
    return chunks


def _sample_anthropic_events():
    events = [json.loads(part.split(b"data: ", 1)[1]) for part in anthropic_stream()]
    tool = [{"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1",
                                                                          "name": "weather", "input": {}}},
            {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"c"}},
            {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\": 1}"}},
            {"type": "content_block_stop", "index": 1},
            {"type": "content_block_start", "index": 2, "content_block": {"type": "thinking", "thinking": ""}},
            {"type": "content_block_delta", "index": 2, "delta": {"type": "thinking_delta", "thinking": "x"}},
            {"type": "ping"}]
    return events[:4] + tool + events[4:]


class Findings:
    """Unexpected exceptions, grouped by (target, type, innermost claude_proxy frame)."""

    def __init__(self):
        self.seen = {}

    def record(self, target, exc, sample):
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.endswith("claude_proxy.py")]
        where = f"{frames[-1].name}:{frames[-1].lineno}" if frames else "?"
        key = (target, type(exc).__name__, where)
        if key not in self.seen:
            self.seen[key] = [0, f"{exc!s:.120}", repr(sample)[:300]]
        self.seen[key][0] += 1

    def check(self):
        assert not self.seen, "unexpected exceptions:\n" + "\n".join(
            f"  {t} {e} at {w} x{n}: {msg} <- {sample}" for (t, e, w), (n, msg, sample) in self.seen.items())


def _run_fuzz(findings, target, fn, sample):
    try:
        return fn()
    except cp.ProxyError:
        return None
    except Exception as exc:   # noqa: BLE001 - any other exception is a finding
        findings.record(target, exc, sample)
        return None


def test_fuzz_sse_decoder():
    rand, findings = random.Random(FUZZ_SEED), Findings()
    realistic = b"".join(anthropic_stream()) + b"".join(openai_stream_chunks()) + b": ping\r\n\r\nevent: x\rdata: y\r\r"
    for i in range(500):
        if i % 2:
            data = bytes(rand.getrandbits(8) for _ in range(rand.randint(0, 300)))
        else:
            data = bytearray(realistic)
            for _ in range(rand.randint(1, 8)):
                pos = rand.randrange(len(data))
                op = rand.random()
                if op < 0.3:
                    del data[pos:pos + rand.randint(1, 10)]
                elif op < 0.6:
                    data[pos:pos] = rand.choice([b"\r", b"\n", b"\r\n", b":", b"data:", b"event:", b"\xff\xfe", b"\x00"])
                else:
                    data[pos] = rand.getrandbits(8)
            data = bytes(data)
        cuts = sorted(rand.randint(0, len(data)) for _ in range(rand.randint(0, 6)))
        pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)]) if b > a]  # no empty feeds

        def decode(parts):
            decoder = cp.SSEDecoder()
            out = [item for part in parts for item in decoder.feed(part)] + decoder.close()
            assert all(isinstance(e, str) and isinstance(d, str) for e, d in out)
            return out
        whole = _run_fuzz(findings, "SSEDecoder", lambda: decode([data]), data)
        split = _run_fuzz(findings, "SSEDecoder", lambda: decode(pieces), data)
        if whole != split:   # framing must not depend on how the transport cut the bytes
            findings.record("SSEDecoder split-invariance", AssertionError(f"{whole!r:.80} != {split!r:.80}"),
                            (data, cuts))
    findings.check()


def test_sse_decoder_empty_feed_keeps_a_split_crlf():
    """A CRLF split across reads with an empty read between must still be one line end."""
    decoder = cp.SSEDecoder()
    events = decoder.feed(b"data: a\r") + decoder.feed(b"") + decoder.feed(b"\ndata: b\n\n") + decoder.close()
    assert events == [("", "a\nb")]


def test_fuzz_request_converters():
    rand, findings = random.Random(FUZZ_SEED + 1), Findings()
    specs = [make_spec(), make_spec(schema="gemini", replay_reasoning="reasoning_content", max_tokens=1000),
             make_spec(thinking="budget", reasoning_param=None, max_completion_tokens=True, extra_body={"x": 1})]
    for i in range(600):
        if i % 2 == 0:
            body = mutate(rand.choice(ANTHROPIC_BODIES), rand, rate=rand.choice([0.05, 0.15, 0.4]))
            spec = rand.choice(specs)
            out = _run_fuzz(findings, "anthropic_to_openai_request",
                            lambda: cp.convert(BadRequest, "request", anthropic_to_openai_request, body, spec), body)
            _run_fuzz(findings, "estimate_anthropic_tokens",
                      lambda: cp.convert(BadRequest, "request", cp.estimate_anthropic_tokens, body), body)
            _run_fuzz(findings, "server_tool_names", lambda: cp.convert(BadRequest, "request", cp.server_tool_names, body), body)
            _run_fuzz(findings, "anthropic_thinking_on", lambda: cp.anthropic_thinking_on(body), body)
        else:
            body = mutate(rand.choice(OPENAI_BODIES), rand, rate=rand.choice([0.05, 0.15, 0.4]))
            model = rand.choice([M, "claude-opus-4-5", "claude-3-5-haiku-20241022", "claude-sonnet-4-5"])
            effort = rand.choice([None, "low", "high"])
            style = rand.choice([None, "budget", "adaptive"])
            out = _run_fuzz(findings, "openai_to_anthropic_request",
                            lambda: cp.convert(BadRequest, "request", openai_to_anthropic_request, body, model,
                                               variant_effort=effort, thinking_style=style),
                            body)
        if out is not None:   # what the proxy sends upstream must serialise
            _run_fuzz(findings, "json_bytes(converted request)", lambda: cp.json_bytes(out), body)
    findings.check()


def _check_anthropic_stream_shape(events):
    """Grammar invariants that must hold whatever the upstream sent."""
    types = [e["type"] for e in events]
    assert types[0] == "message_start" and types.count("message_start") == 1
    assert types[-1] in ("message_stop", "error") and types.count("message_stop") <= 1 and types.count("error") <= 1
    open_index, next_index = None, 0
    for event in events:
        if event["type"] == "content_block_start":
            assert open_index is None and event["index"] == next_index
            open_index, next_index = next_index, next_index + 1
        elif event["type"] in ("content_block_delta", "content_block_stop"):
            assert event["index"] == open_index
            if event["type"] == "content_block_stop":
                open_index = None
        elif event["type"] in ("message_delta", "message_stop"):
            assert open_index is None


def _check_openai_chunk_shape(chunks):
    assert chunks[-1] == "[DONE]" or "error" in chunks[-1]
    assert sum(1 for c in chunks if c == "[DONE]") <= 1
    for chunk in chunks[:-1]:
        assert isinstance(chunk, dict) and "error" not in chunk


def test_fuzz_stream_machines():
    rand, findings = random.Random(FUZZ_SEED + 2), Findings()
    openai_chunks, anthropic_events = _sample_openai_chunks(), _sample_anthropic_events()
    for i in range(600):
        rate = rand.choice([0.05, 0.15, 0.4])
        if i % 2 == 0:
            feed = [mutate(c, rand, rate) if rand.random() < 0.5 else c for c in openai_chunks]
            if rand.random() < 0.2:
                feed.insert(rand.randint(0, len(feed)), {"error": _garbage(rand) or {"message": "x"}})

            def go():
                machine = cp.OpenAIToAnthropicStream("claude-client", input_tokens=rand.randint(0, 9))
                out = cp.feed_events(machine, feed, parsed=True) + machine.close()
                for event in out:
                    cp.format_anthropic_event(event)
                _check_anthropic_stream_shape(out)
            _run_fuzz(findings, "OpenAIToAnthropicStream", go, feed)
        else:
            feed = [mutate(e, rand, rate) if rand.random() < 0.5 else e for e in anthropic_events]
            include_usage = rand.random() < 0.5

            def go():
                machine = cp.AnthropicToOpenAIStream("gpt-client", include_usage=include_usage)
                out = cp.feed_events(machine, feed, parsed=True) + machine.close()
                for chunk in out:
                    cp.format_openai_item(chunk)
                _check_openai_chunk_shape(out)
            _run_fuzz(findings, "AnthropicToOpenAIStream", go, feed)
    findings.check()


def test_fuzz_non_streaming_answers():
    """Upstream JSON answers (already known to be objects) through the non-streaming converters."""
    rand, findings = random.Random(FUZZ_SEED + 3), Findings()
    anthropic_answer = dict(anthropic_message(), content=[
        {"type": "thinking", "thinking": "t", "signature": "s"}, {"type": "text", "text": "x"},
        {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"a": 1}}], stop_reason="tool_use")
    openai_answer = dict(OPENAI_COMPLETION, choices=[{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "x", "reasoning_content": "r",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]}}])
    for i in range(300):
        rate = rand.choice([0.05, 0.15, 0.4])
        if i % 2 == 0:
            answer = mutate(openai_answer, rand, rate)
            out = _run_fuzz(findings, "openai_response_to_anthropic",
                            lambda: cp.convert(cp.UpstreamError, "answer", cp.openai_response_to_anthropic, answer, "claude-client"),
                            answer)
            if out is not None:
                _run_fuzz(findings, "anthropic_message_as_events(converted)",
                          lambda: [cp.format_anthropic_event(e) for e in
                                   cp.convert(cp.UpstreamError, "answer", cp.anthropic_message_as_events, out)], answer)
        else:
            answer = mutate(anthropic_answer, rand, rate)
            _run_fuzz(findings, "anthropic_response_to_openai",
                      lambda: cp.json_bytes(cp.convert(cp.UpstreamError, "answer", cp.anthropic_response_to_openai,
                                                       answer, "gpt-client")), answer)

            def streamed():
                machine = cp.AnthropicToOpenAIStream("gpt-client")
                events = cp.convert(cp.UpstreamError, "answer", cp.anthropic_message_as_events, answer)
                return cp.feed_events(machine, events, parsed=True)
            _run_fuzz(findings, "anthropic_message_as_events->AnthropicToOpenAIStream", streamed, answer)
    findings.check()


# =============================================================================================
# 6. Load: 500 concurrent streaming clients
# =============================================================================================

@pytest.mark.parametrize("route", ["anthropic_passthrough", "openai_to_anthropic_conversion"])
def test_500_concurrent_streaming_clients(tmp_path, route):
    clients = 500

    def script(req):
        if route == "anthropic_passthrough":
            return Stream(anthropic_stream())
        return Stream(openai_stream_chunks())

    async def one(port):
        status, headers, body = await call(port, "POST", "/v1/messages", dict(HELLO, stream=True), ANTHROPIC_HEADERS)
        assert status == 200, body[:200]
        items = sse_items(body)
        assert items[0][0] == "message_start" and items[-1][0] == "message_stop"
        assert "error" not in [e for e, _ in items]
        return True

    async def scenario():
        async with FakeUpstream(script) as up:
            config = config_for(tmp_path, "anthropic" if route == "anthropic_passthrough" else "openai", up.url,
                                max_retries=0)
            baseline = len(asyncio.all_tasks())
            async with running_proxy(config) as (_, port):
                started = time.monotonic()
                results = await asyncio.gather(*[one(port) for _ in range(clients)], return_exceptions=True)
                elapsed = time.monotonic() - started
            await assert_no_leaks([up], baseline, timeout=5)
        errors = [r for r in results if r is not True]
        print(f"\n{route}: {clients} concurrent streams in {elapsed:.2f}s, {len(errors)} errors, "
              f"{up.connections} upstream connections")
        assert not errors, errors[:5]
        assert len(up.requests) == clients
    run(asyncio.wait_for(scenario(), 90))

# =============================================================================================
# 7. Hardening, round 2: what an attacker, a browser tab and a broken upstream did (issue 10)
# =============================================================================================

async def raw_request(port, data, *, half_close=False, timeout=5):
    """Send raw bytes on a fresh connection; everything the proxy answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)                  # buffered: the answer is read while the data goes out
    if half_close:
        writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def head_bytes(method, path, headers, body=b""):
    """A request with the given header lines (a list of "name: value" strings) and body."""
    return (f"{method} {path} HTTP/1.1\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode() + body


class ScriptedRaw:
    """A loopback upstream that answers each connection's first request with raw bytes."""

    def __init__(self, answer):
        self.answer, self.connections, self.requests = answer, 0, []

    async def __aenter__(self):
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc):
        self._server.close()

    async def _handle(self, reader, writer):
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
                self.requests.append(head + await reader.readexactly(length))
                answer = self.answer(len(self.requests))
                for part in answer if isinstance(answer, list) else [answer]:
                    if isinstance(part, float):
                        await asyncio.sleep(part)
                    else:
                        writer.write(part)
                        await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, AttributeError):
            pass
        finally:
            writer.close()


# ---- 1. smuggling: CR/LF/NUL in heads, an allow-list of forwarded headers, pool doubt -------

def test_smuggled_request_in_a_header_value_is_a_400_and_never_reaches_the_upstream(tmp_path):
    body = json.dumps(HELLO).encode()
    smuggle = (b"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\nX-Trace: a\ncontent-length: 0\n\n"
               b"POST /v1/messages HTTP/1.1\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                for data in (smuggle, smuggle.replace(b"a\ncontent", b"a\rcontent"),
                             smuggle.replace(b"a\ncontent", b"a\x00content")):
                    answer = await raw_request(port, data)
                    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
                assert up.requests == []
    run(scenario())


def test_only_allow_listed_client_headers_reach_an_anthropic_upstream(tmp_path):
    sent = {"anthropic-beta": "b1", "anthropic-dangerous-direct-browser-access": "true", "user-agent": "claude-cli/2",
            "x-app": "cli", "x-stainless-os": "Linux", "x-claude-code-session-id": "s1", "cookie": "c=1",
            "x-forwarded-for": "1.2.3.4", "x-evil": "1", "proxy-authorization": "Basic x", "te": "trailers",
            "x-api-key": "sk-client-key-000000"}

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                status, _, _ = await call(port, "POST", "/v1/messages", HELLO, dict(ANTHROPIC_HEADERS, **sent))
                assert status == 200
            got = up.requests[0]["headers"]
            for name in ("anthropic-beta", "anthropic-dangerous-direct-browser-access", "user-agent", "x-app",
                         "x-stainless-os", "x-claude-code-session-id"):
                assert got[name] == sent[name]
            for name in ("cookie", "x-forwarded-for", "x-evil", "proxy-authorization", "te"):
                assert name not in got
            assert got["x-api-key"] == "sk-ant-api03-testkey-0123456789"
    run(scenario())


@pytest.mark.parametrize("answer", [
    # a response with a second one glued behind its body, and a close-delimited HTTP/1.0 answer
    http_response(200, anthropic_message("first")) + http_response(200, anthropic_message("SMUGGLED")),
    b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
    % (len(json.dumps(anthropic_message("first"))), json.dumps(anthropic_message("first")).encode()),
])
def test_a_connection_whose_framing_is_in_doubt_is_never_reused(tmp_path, answer):
    async def scenario():
        async with ScriptedRaw(lambda n: answer if n == 1 else http_response(200, anthropic_message("second"))) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                first = await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
                second = await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
            assert json.loads(first[2])["content"][0]["text"] == "first"
            assert json.loads(second[2])["content"][0]["text"] == "second"
            assert up.connections == 2
    run(scenario())


# ---- 2. cross-site requests and DNS rebinding ----------------------------------------------

@pytest.mark.parametrize("headers, status", [
    ({"host": "evil.example:8082"}, 403),                                   # rebinding
    ({"host": "evil.example"}, 403),
    ({"host": "localhost:1234"}, 200), ({"host": "[::1]:8082"}, 200), ({"host": "127.0.0.1"}, 200),
    ({"host": "127.0.0.1:8082", "origin": "https://evil.example"}, 403),  # a page on another site
    ({"host": "127.0.0.1:8082", "origin": "null"}, 403),
    ({"host": "127.0.0.1:8082", "origin": "http://localhost:3000"}, 403),  # another local app's page
    ({"host": "127.0.0.1:8082", "origin": "http://127.0.0.1:8082"}, 200),  # the proxy's own
    ({"host": "127.0.0.1:8082", "origin": "https://app.example"}, 403),    # CORS-configured: the API only
    ({"host": "127.0.0.1:8082", "sec-fetch-site": "cross-site"}, 403),     # <img src=...> GET
    ({"host": "127.0.0.1:8082", "sec-fetch-site": "same-site"}, 403),
    ({"host": "127.0.0.1:8082", "sec-fetch-site": "none"}, 200),           # typed in the address bar
    ({"host": "app.internal:8082"}, 200),                                  # ALLOWED_HOSTS
    ({"host": "127.1:8082"}, 200), ({"host": "0.0.0.0:8082"}, 200),        # IP literals: no domain to rebind
    ({"host": "192.168.1.20:8082"}, 200), ({"host": "[fe80::1]:8082"}, 200),
    ({"host": "proxy.localhost:8082"}, 200),                               # browsers keep *.localhost local
    ({"host": socket.gethostname() + ":8082"}, 200),                       # this machine's name
    ({"host": "127.0.0.1.evil.example"}, 403), ({"host": "0x7f.evil"}, 403), ({"host": "localhost.evil.example"}, 403),
])
def test_browser_guard_on_a_loopback_bind(tmp_path, headers, status):
    settings = dict(make_config(tmp_path).settings, cors_origins=["https://app.example"],
                    allowed_hosts=["app.internal:8082"])
    req = cp.Request("GET", "/auth/status", headers, b"", "127.0.0.1")
    if status == 200:
        cp.check_browser_guard(settings, req, loopback_bind=True)
    else:
        with pytest.raises(cp.PermissionDenied):
            cp.check_browser_guard(settings, req, loopback_bind=True)


def test_exposed_bind_serves_container_names_and_still_refuses_foreign_origins(tmp_path):
    settings = make_config(tmp_path, proxy_api_key="pk-123456789").settings
    cp.check_browser_guard(settings, cp.Request("POST", "/v1/messages", {"host": "anthropic_max_proxy:8100"}, b"",
                                                "10.0.0.5"), loopback_bind=False)
    with pytest.raises(cp.PermissionDenied):
        cp.check_browser_guard(settings, cp.Request("POST", "/v1/messages", {
            "host": "anthropic_max_proxy:8100", "origin": "https://evil.example"}, b"", "10.0.0.5"), loopback_bind=False)


def test_browser_style_requests_cannot_use_the_login_or_end_it(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            config = make_config(tmp_path, None, providers={"anthropic": {"format": "anthropic", "base_url": up.url}})
            seed_login(config)
            token_file = os.path.join(config.home, "oauth_token.json")
            async with running_proxy(config) as (_, port):
                h = f"host: 127.0.0.1:{port}"
                body = json.dumps(HELLO).encode()
                text_plain = head_bytes("POST", "/v1/messages", [h, "content-type: text/plain", "origin: https://evil.example",
                                                                 f"content-length: {len(body)}"], body)
                assert (await raw_request(port, text_plain)).startswith(b"HTTP/1.1 403")
                same_origin_form = head_bytes("POST", "/v1/messages", [h, "content-type: text/plain;charset=UTF-8",
                                                                       f"content-length: {len(body)}"], body)
                assert (await raw_request(port, same_origin_form)).startswith(b"HTTP/1.1 415")
                form = b"a=1"
                logout = head_bytes("POST", "/auth/logout", [h, "content-type: application/x-www-form-urlencoded",
                                                             f"content-length: {len(form)}"], form)
                assert (await raw_request(port, logout)).startswith(b"HTTP/1.1 415")
                rebound = head_bytes("GET", "/auth/status", [f"host: evil.example:{port}"])
                assert (await raw_request(port, rebound)).startswith(b"HTTP/1.1 403")
                assert up.requests == [] and os.path.exists(token_file)
                status, _, _ = await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)   # a real client
                assert status == 200 and up.requests[0]["headers"]["authorization"] == "Bearer sk-ant-oat01-old"
    run(scenario())


def test_http_login_starts_never_evict_a_pending_login(tmp_path):
    async def scenario():
        async with running_proxy(make_config(tmp_path)) as (server, port):
            first = json.loads((await call(port, "GET", "/auth/start"))[2])
            statuses = [(await call(port, "GET", "/auth/start"))[0] for _ in range(9)]
            assert statuses == [200] * 7 + [429, 429]
            assert first["state"] in server.oauth.pending
    run(scenario())


# ---- 3. no request holds the event loop ------------------------------------------------------

def test_merging_120k_consecutive_messages_is_linear():
    openai_body = {"model": "m", "messages": [{"role": "user", "content": f"m{i}"} for i in range(120_000)]}
    anthropic_body = {"model": "m", "max_tokens": 5, "messages": (
        [{"role": "user", "content": [{"type": "text", "text": f"m{i}"}]} for i in range(50_000)]
        + [{"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"}]}] * 50_000)}
    started = time.process_time()
    converted = openai_to_anthropic_request(openai_body, "claude-sonnet-4-5")
    assert len(converted["messages"]) == 1 and len(converted["messages"][0]["content"]) == 120_000
    openai = anthropic_to_openai_request(anthropic_body, make_spec())
    assert len(openai["messages"]) == 1 and openai["messages"][0]["content"].endswith("m49999")
    assert time.process_time() - started < 10      # quadratic merging took minutes here


def test_health_answers_while_a_huge_request_converts(tmp_path):
    huge = {"model": "claude-sonnet-4-5", "max_tokens": 10,
            "messages": [{"role": "user", "content": "x" * 30} for _ in range(120_000)]}

    async def scenario():
        async with FakeUpstream(lambda req: Stream(openai_stream_chunks())) as up:
            async with running_proxy(config_for(tmp_path, "openai", up.url)) as (_, port):
                pending = asyncio.ensure_future(call(port, "POST", "/v1/messages", dict(huge, stream=True), ANTHROPIC_HEADERS))
                await asyncio.sleep(0.3)                    # the body is in, conversion under way
                started = time.monotonic()
                assert (await call(port, "GET", "/health"))[0] == 200
                health_wait = time.monotonic() - started
                assert (await pending)[0] == 200
        assert health_wait < 2.0, health_wait
    run(scenario())


# ---- 4/5. access on the head, bounded bodies, connections and body time ----------------------

def test_keyless_client_is_refused_before_its_body_is_read(tmp_path):
    async def scenario():
        async with running_proxy(make_config(tmp_path, proxy_api_key="pk-123456789")) as (server, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head_bytes("POST", "/v1/messages", ["host: localhost", "content-length: 30000000"]) + b"{")
            answer = await asyncio.wait_for(reader.read(), 3)   # no need to send the 30 MB
            writer.close()
            assert answer.startswith(b"HTTP/1.1 401") and server.buffered == 0
    run(scenario())


def test_bodies_in_flight_are_bounded(tmp_path):
    async def scenario():
        config = make_config(tmp_path, max_buffered_bytes=1000)
        async with running_proxy(config) as (server, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head_bytes("POST", "/v1/messages", ["host: localhost", "content-length: 900"]) + b"{")
            await writer.drain()
            await asyncio.sleep(0.1)
            assert server.buffered == 900
            second = await raw_request(port, head_bytes("POST", "/v1/messages", ["host: localhost", "content-length: 200"]))
            assert second.startswith(b"HTTP/1.1 503") and b"retry" in second
            writer.close()
            await asyncio.sleep(0.1)
            assert server.buffered == 0
    run(scenario())


def test_slow_bodies_time_out_and_connections_are_limited(tmp_path):
    async def scenario():
        async with running_proxy(make_config(tmp_path, max_connections=3, body_timeout=0.4)) as (server, port):
            slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            for _, writer in slow:
                writer.write(head_bytes("POST", "/v1/messages", ["host: localhost", "content-length: 100"]) + b"{")
                await writer.drain()
            await asyncio.sleep(0.1)
            refused = await raw_request(port, head_bytes("GET", "/health", ["host: localhost"]))
            assert refused.startswith(b"HTTP/1.1 503") and b"too many open connections" in refused
            answers = [await asyncio.wait_for(reader.read(), 3) for reader, _ in slow]
            assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers
            for _, writer in slow:
                writer.close()
            await asyncio.sleep(0.1)
            assert (await call(port, "GET", "/health"))[0] == 200
    run(scenario())


def test_idle_keepalive_connections_make_room_for_new_clients(tmp_path):
    async def scenario():
        async with running_proxy(make_config(tmp_path, max_connections=2)) as (_, port):
            idle = []
            for _ in range(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(head_bytes("GET", "/health", ["host: localhost"]))
                await reader.readuntil(b"}")
                idle.append(writer)
            assert (await call(port, "GET", "/health"))[0] == 200
            for writer in idle:
                writer.close()
    run(scenario())


def test_repeated_loop_errors_are_logged_once_per_interval(tmp_path, caplog):
    server = cp.ProxyServer(make_config(tmp_path))
    with caplog.at_level(logging.ERROR, logger="claude_proxy"):
        for _ in range(5000):
            server._loop_exception(None, {"message": "socket.accept() out of system resource",
                                          "exception": OSError(24, "Too many open files")})
    assert len(caplog.records) == 1 and "Too many open files" in caplog.text
    server.log_limits["socket.accept() out of system resource"] = (0.0, 4999)
    with caplog.at_level(logging.ERROR, logger="claude_proxy"):
        server._loop_exception(None, {"message": "socket.accept() out of system resource"})
    assert "4999 more like it suppressed" in caplog.records[-1].getMessage()


# ---- 6/7. upstream-driven growth and quadratic paths -------------------------------------------

def test_an_endless_sse_line_fails_the_stream_in_the_clients_dialect(tmp_path, monkeypatch):
    monkeypatch.setattr(cp, "MAX_SSE_LINE", 64 * 1024)
    endless = Stream([b"data: " + b"x" * 16384] * 20 + [("stall",)])

    async def scenario():
        async with FakeUpstream(lambda req: endless) as up:
            async with running_proxy(config_for(tmp_path, "openai", up.url)) as (_, port):
                status, _, body, raw = await call_raw(port, "POST", "/v1/messages", dict(HELLO, stream=True),
                                                      ANTHROPIC_HEADERS)
        assert status == 200
        assert_stream_ends_with_one_error("anthropic", raw, body, "api_error")
        assert b"SSE line over 65536 bytes" in body
    run(asyncio.wait_for(scenario(), 10))


def test_interleaved_tool_fragments_never_reparse_the_open_call(monkeypatch):
    loads = []
    real_loads = json.loads
    monkeypatch.setattr(cp.json, "loads", lambda *a, **k: loads.append(1) or real_loads(*a, **k))
    machine = OpenAIToAnthropicStream("m")
    events = machine.feed(chunk({"tool_calls": [tool(0, "call_a", "a", '{"blob": "' + "y" * (1 << 20))]}))
    for i in range(20_000):
        events += machine.feed(chunk({"tool_calls": [tool(1, "call_b" if i == 0 else None, "b" if i == 0 else None,
                                                          "{" if i == 0 else " ")]}))
    events += machine.feed(chunk({"tool_calls": [tool(0, None, None, '"}')]}))
    events += machine.feed(chunk({"tool_calls": [tool(1, None, None, "}")]}, finish="tool_calls")) + machine.close()
    assert len(loads) == 0
    uses = [e["content_block"]["name"] for e in events if e["type"] == "content_block_start"]
    assert uses == ["a", "b"]


def test_a_stuck_model_sending_newlines_costs_linear_time():
    machine = OpenAIToAnthropicStream("m")
    started = time.process_time()
    events = []
    for _ in range(60_000):
        events += machine.feed(chunk({"content": "\n" * 20}))
    events += machine.feed(chunk({"content": "done"}, finish="stop")) + machine.close()
    assert time.process_time() - started < 10       # re-stripping the prefix took ~25 s
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text == "\n" * 1_200_000 + "done"


def test_json_scan_tracks_strings_escapes_and_nesting():
    for whole in ['{"a": "}"}', '{"a": "\\"}"}', '[{"x": [1, {"y": "\\\\"}]}]', '{"k": "a\\\\"}']:
        for cut in range(1, len(whole)):
            scan = cp.JsonScan()
            fragments = [whole[:cut]]
            assert not scan.complete(fragments) or json.loads(whole[:cut]) is not None
            fragments.append(whole[cut:])
            assert scan.complete(fragments), (whole, cut)


# ---- 10/11/14. secrets and log lines -------------------------------------------------------------

def test_check_config_masks_model_headers_and_extra_body_and_the_redactor_knows_them(tmp_path):
    config = make_config(tmp_path, providers={"o": {"format": "openai", "base_url": "http://127.0.0.1:9/v1"}},
                         models=[{"id": "m", "provider": "o", "headers": {"authorization": "Bearer sk-model-header-secret1"},
                                  "extra_body": {"api_key": "body-secret-value-9", "nested": {"token": "nested-secret-77"},
                                                 "temperature": 0.1, "provider": {"order": ["a"]}}}])
    shown = json.dumps(cp.redacted_config(config))
    for secret in ("sk-model-header-secret1", "body-secret-value-9", "nested-secret-77"):
        assert secret not in shown
        assert secret not in cp.Redactor(config.secret_values()).scrub(f"upstream said {secret}")
    assert '"temperature": 0.1' in shown and '"order": ["a"]' in shown


def test_log_lines_cannot_be_forged_or_paint_the_terminal(tmp_path):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(cp.Redactor())
    logger = logging.getLogger("claude_proxy")
    logger.addHandler(handler)
    try:
        async def scenario():
            async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
                async with running_proxy(make_config(tmp_path, up.url, routes={"default": "anthropic"})) as (_, port):
                    evil = dict(HELLO, model="x\r\n2026-12-01 INFO claude_proxy: token refreshed\x1b[2J\ud800")
                    await call(port, "POST", "/v1/messages", evil, ANTHROPIC_HEADERS)
        with caplog_level(logger, logging.INFO):
            run(scenario())
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    assert "\x1b" not in output and "\r" not in output and "\\x1b[2J" in output
    assert all(not line.startswith("2026-12-01 INFO") for line in output.splitlines())


@contextlib.contextmanager
def caplog_level(logger, level):
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


@pytest.mark.parametrize("client, provider", [("anthropic", "anthropic"), ("openai", "anthropic"),
                                              ("anthropic", "openai"), ("openai", "openai")])
def test_an_upstream_quoting_the_rejected_credential_never_hands_it_to_the_client(tmp_path, client, provider):
    def script(req):
        seen = req["headers"].get("x-api-key") or req["headers"].get("authorization")
        body = {"type": "error", "error": {"type": "authentication_error", "message": f"invalid key: {seen}"}} \
            if provider == "anthropic" else {"error": {"message": f"Incorrect API key provided: {seen}",
                                                       "type": "invalid_request_error", "code": "invalid_api_key"}}
        return http_response(401, body)

    async def scenario():
        async with FakeUpstream(script) as up:
            async with running_proxy(config_for(tmp_path, provider, up.url)) as (_, port):
                path, body, headers = client_request(client, False)
                status, _, answer = await call(port, "POST", path, body, headers)
        assert status == 401 and b"key" in answer.lower()
        for secret in ("sk-ant-api03-testkey-0123456789", OPENAI_PROVIDER_KEY):
            assert secret.encode() not in answer
    run(scenario())


# ---- 12/13. fuzzed input classes through the whole request path: never a 500 ----------------

class FuzzTransport:
    def get_write_buffer_size(self):
        return 0

    def is_closing(self):
        return False


class FuzzWriter:
    """A StreamWriter stand-in that keeps what the proxy writes."""

    def __init__(self):
        self.data, self.transport = bytearray(), FuzzTransport()

    def write(self, data):
        self.data += data

    async def drain(self):
        pass


def nested_json(depth):
    """JSON text nested `depth` levels deep (objects and arrays alternating)."""
    opens = "".join('{"k":' if i % 2 else "[" for i in range(depth))
    return opens + '"x"' + "".join("}" if i % 2 else "]" for i in reversed(range(depth)))


RESPONSES_BODIES = [
    {"model": "claude-sonnet-4-5", "input": "hi"},
    {"model": "claude-sonnet-4-5", "stream": True, "instructions": "be brief", "store": True, "prompt_cache_key": "k",
     "reasoning": {"effort": "high", "summary": "auto"}, "metadata": {"user_id": "u"}, "max_output_tokens": 100,
     "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}},
               {"type": "web_search"}], "tool_choice": "auto",
     "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
     "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"},
                                            {"type": "input_image", "image_url": "data:image/png;base64,iVBO"}]},
               {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "t"}],
                "encrypted_content": "x"},
               {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\": \"P\"}"},
               {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
               {"type": "item_reference", "id": "msg_nope"}]},
    {"model": "claude-sonnet-4-5", "input": "more", "previous_response_id": "resp_nope"},
]
LONE_SURROGATE_FORMS = [b'"\\ud800"', b'"a\\udfff"', b'"\xed\xa0\x80"', b'"{\\"session_id\\": \\"\\\\ud800\\"}"']


def fuzz_bodies(rand):
    """Request bodies of the classes that used to get a 500, plus generic mutations, in the three
    JSON dialects."""
    anthropic = rand.choice(ANTHROPIC_BODIES)
    openai = rand.choice(OPENAI_BODIES)
    pick = rand.randrange(12)
    if pick == 9:
        return "/v1/responses", json.dumps(mutate(rand.choice(RESPONSES_BODIES), rand, rate=rand.choice([0.1, 0.3]))).encode()
    if pick == 10:                          # a lone surrogate where a client id or text goes, any dialect
        path, body = rand.choice([("/v1/messages", anthropic), ("/v1/chat/completions", openai),
                                  ("/v1/responses", rand.choice(RESPONSES_BODIES))])
        where = rand.choice(["metadata", "model", "text"])
        shaped = dict(body, metadata={"user_id": "@"}) if where == "metadata" else dict(body, model="@") \
            if where == "model" else json.loads(json.dumps(body).replace('"hi"', '"@"', 1))
        return path, json.dumps(shaped).encode().replace(b'"@"', rand.choice(LONE_SURROGATE_FORMS), 1)
    if pick == 0:
        deep = nested_json(rand.choice([50, 500, 990, 5000]))
        return "/v1/messages", json.dumps(dict(anthropic, metadata="@")).replace('"@"', deep).encode()
    if pick == 1:
        deep = nested_json(rand.choice([990, 3000]))
        return "/v1/chat/completions", json.dumps(dict(openai, user="@")).replace('"@"', deep).encode()
    if pick == 2:
        path, body = rand.choice([("/v1/messages", anthropic), ("/v1/chat/completions", openai),
                                  ("/v1/responses", rand.choice(RESPONSES_BODIES))])
        text = json.dumps(body)
        at = rand.randrange(len(text))
        at = text.rfind('"', 0, at)
        return path, (text[:at + 1] + "\\ud800" + text[at + 1:]).encode() if at > 0 and text[at - 1] != "\\" else text.encode()
    if pick == 3:
        return "/v1/chat/completions", json.dumps(dict(openai, stream=True, stream_options=rand.choice(
            ["x", 1, [], True, None, {"include_usage": "yes"}]))).encode()
    if pick == 4:
        blocks = [{"type": rand.choice([{}, [], 1, None, "text"]), "text": "t"}]
        return "/v1/messages", json.dumps(dict(anthropic, system=blocks, messages=[
            {"role": "user", "content": blocks}])).encode()
    if pick == 5:
        return rand.choice(["/v1/messages", "/v1/chat/completions"]), \
            json.dumps(anthropic).replace('"max_tokens": 100', '"max_tokens": NaN').replace("0.5", "Infinity").encode() \
            if rand.random() < 0.5 else b'{"model": "m", "max_tokens": -Infinity, "messages": []}'
    if pick == 6:
        return "/v1/messages", json.dumps(mutate(anthropic, rand, rate=rand.choice([0.1, 0.3]))).encode()
    if pick == 7:
        return "/v1/chat/completions", json.dumps(mutate(openai, rand, rate=rand.choice([0.1, 0.3]))).encode()
    raw = json.dumps(anthropic).encode()
    cut = rand.randrange(len(raw))
    return "/v1/messages", raw[:cut] + bytes([rand.randrange(256)]) + raw[cut + 1:]


def fuzz_upstream_answer(req):
    """A live upstream's answer to whatever a fuzzed request became: Anthropic or OpenAI, streamed
    when asked, so the answer side (conversion, store, ledger) sees fuzzed requests too."""
    body = req["body"] if isinstance(req["body"], dict) else {}
    if req["path"].endswith("/chat/completions"):
        return Stream(openai_stream_chunks("Hi")) if body.get("stream") else http_response(200, OPENAI_COMPLETION)
    return Stream(anthropic_stream("Hi")) if body.get("stream") else http_response(200, anthropic_message("Hi"))


async def fuzz_dispatch_campaign(tmp_path, count, seed):
    """count fuzzed bodies (fuzz_bodies) through the whole request path of five proxies: a dead
    upstream (what passes validation fails fast), an OAuth one, an openai-format one, and live
    anthropic- and openai-format upstreams. Returns {status: count}; a 500 fails at once."""
    rand, statuses = random.Random(seed), {}
    dead = f"http://127.0.0.1:{free_port()}"
    async with FakeUpstream(fuzz_upstream_answer) as up:
        configs = [make_config(tmp_path, dead), make_config(tmp_path / "o", None, oauth_token="sk-ant-oat01-fuzz",
                                                            providers={"anthropic": {"base_url": dead, "auth": "oauth",
                                                                                     "format": "anthropic"}}),
                   config_for(tmp_path / "p", "openai", dead), make_config(tmp_path / "l", up.url),
                   config_for(tmp_path / "q", "openai", up.url)]
        servers = [cp.ProxyServer(c) for c in configs]
        for i in range(count):
            path, raw = fuzz_bodies(rand)
            req = cp.Request("POST", path, {"content-type": "application/json", "host": "localhost",
                                            "anthropic-version": "2023-06-01"}, raw, "127.0.0.1")
            writer = FuzzWriter()
            await asyncio.wait_for(cp.dispatch(servers[i % len(servers)], req, cp.ClientStream(writer)), 10)
            status = int(bytes(writer.data[9:12]))
            statuses[status] = statuses.get(status, 0) + 1
            assert status != 500, (path, raw[:300], bytes(writer.data[:600]))
        for server in servers:
            server.pool.close()
            await server.ops.close()
    return statuses


def test_fuzzed_requests_never_get_a_500(tmp_path):
    logging.getLogger("claude_proxy").disabled = True
    try:
        statuses = run(fuzz_dispatch_campaign(tmp_path, 20_000, FUZZ_SEED + 10))
    finally:
        logging.getLogger("claude_proxy").disabled = False
    assert sum(statuses.values()) == 20_000 and statuses.get(400, 0) > 5000 and statuses.get(200, 0) > 2000, statuses


@pytest.mark.parametrize("data, status", [
    (head_bytes("POST", "/v1/messages", ["host: localhost", "content-length: \u00b2".encode("utf-8").decode("latin-1")]), 400),
    (head_bytes("POST", "/v1/messages", ["host: localhost", "transfer-encoding: chunked"]) + b"1;" + b"e" * 70000 + b"\r\n", 400),
    (head_bytes("POST", "/v1/messages", ["host: localhost", "transfer-encoding: chunked"]) + b"0\r\nx-t: " + b"t" * 70000, 400),
    (head_bytes("POST", "/v1/messages", ["host: localhost", "transfer-encoding: chunked, gzip"]), 400),
    (head_bytes("POST", "/v1/messages", ["host: localhost", "transfer-encoding: xchunkedx"]), 400),
    (head_bytes("POST", "/v1/messages", ["host: localhost", "transfer-encoding: chunked"]) + b"0x5\r\nhello\r\n0\r\n\r\n", 400),
    (head_bytes("POST", "/v1/messages", ["host: localhost", "transfer-encoding: chunked"]) + b"+5\r\nhello\r\n0\r\n\r\n", 400),
    (head_bytes("POST", "/v1/messages", ["host: localhost", "transfer-encoding: chunked"]) + b"5\r\nhelloXX0\r\n\r\n", 400),
    (b"GET /health HTTP/1.9\r\nhost: localhost\r\n\r\n", 505),
    (b"GET /health HTTP/1.1\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\nhost: localhost\n\n", 400),
])
def test_lenient_framing_is_refused_with_a_status_not_a_dropped_connection(tmp_path, data, status):
    async def scenario():
        async with running_proxy(make_config(tmp_path, header_timeout=5)) as (_, port):
            started = time.monotonic()
            answer = await raw_request(port, data)
            assert answer.startswith(b"HTTP/1.1 %d" % status), answer[:200]
            assert time.monotonic() - started < 2              # at once, not after the header timeout
            assert (await call(port, "GET", "/health"))[0] == 200
    run(scenario())


def test_two_million_one_byte_chunks_are_refused_early(tmp_path):
    async def scenario():
        async with running_proxy(make_config(tmp_path)) as (_, port):
            chunks = b"1\r\nx\r\n" * 2_000_000
            answer = await raw_request(port, head_bytes("POST", "/v1/messages", ["host: localhost",
                                                                                 "transfer-encoding: chunked"]) + chunks)
            assert answer.startswith(b"HTTP/1.1 400") and b"more than 16384 chunks" in answer
    run(scenario())


def test_http10_client_gets_no_100_continue(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                body = json.dumps(HELLO).encode()
                answer = await raw_request(port, b"POST /v1/messages HTTP/1.0\r\nexpect: 100-continue\r\n"
                                           b"content-length: %d\r\n\r\n%s" % (len(body), body))
                assert answer.startswith(b"HTTP/1.1 200") and b"100 Continue" not in answer
    run(scenario())


# ---- 15. odd upstream answers -------------------------------------------------------------------

def gz(obj):
    import gzip
    return gzip.compress(json.dumps(obj).encode())


@pytest.mark.parametrize("name, answer, status, check", [
    ("1xx forever", [b"HTTP/1.1 100 Continue\r\n\r\n", 0.15] * 40, 502, b"interim"),
    ("101 unasked", b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\nbody", 502, b"switched"),
    ("status 999", b"HTTP/1.1 999 Odd\r\ncontent-length: 2\r\n\r\n{}", 502, b"malformed"),
    ("bare LF header", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nrequest-id: a\nset-cookie: s=1\r\n\r\n{}", 502, b"malformed"),
    ("content-length \u00b2", b"HTTP/1.1 200 OK\r\ncontent-length: \xc2\xb2\r\n\r\n{}", 502, b"framing"),
    ("gzip anyway", b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(gz(anthropic_message())), gz(anthropic_message())), 200, b"Hello"),
    ("brotli anyway", b"HTTP/1.1 200 OK\r\ncontent-encoding: br\r\ncontent-length: 2\r\n\r\nxx", 502, b"content-encoding"),
])
def test_odd_upstream_answers(tmp_path, name, answer, status, check):
    async def scenario():
        async with ScriptedRaw(lambda n: answer) as up:
            async with running_proxy(make_config(tmp_path, up.url, read_timeout=3)) as (_, port):
                got_status, headers, body = await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
        assert got_status == status and check in body, (got_status, body[:300])
        assert "set-cookie" not in headers and "content-encoding" not in headers
    run(asyncio.wait_for(scenario(), 15))


def test_absurd_usage_numbers_never_become_infinity_or_a_500(tmp_path):
    openai_answer = json.dumps(dict(OPENAI_COMPLETION, usage={"prompt_tokens": 1e400, "completion_tokens": "7"})
                               ).replace("Infinity", "1e400").encode()
    claude_answer = json.dumps(dict(anthropic_message(), usage={"input_tokens": 1e400, "output_tokens": -5})
                               ).replace("Infinity", "1e400").encode()

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, openai_answer)) as up_o, \
                FakeUpstream(lambda req: http_response(200, claude_answer)) as up_a:
            async with running_proxy(config_for(tmp_path, "openai", up_o.url)) as (_, port):
                status, _, body = await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
                assert status == 200 and json.loads(body)["usage"]["input_tokens"] == 0
            async with running_proxy(config_for(tmp_path / "a", "anthropic", up_a.url)) as (_, port):
                status, _, body = await call(port, "POST", "/v1/chat/completions", OPENAI_HELLO, OPENAI_HEADERS)
                assert status == 200 and b"Infinity" not in body
                assert json.loads(body)["usage"]["prompt_tokens"] == 0
    run(scenario())


@pytest.mark.parametrize("answer", [{}, [], {"type": "message"}, {"type": "message", "content": "x"}])
def test_a_200_that_is_not_a_claude_message_is_a_502(tmp_path, answer):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, answer)) as up:
            async with running_proxy(config_for(tmp_path, "anthropic", up.url)) as (_, port):
                for stream in (False, True):
                    status, _, body = await call(port, "POST", "/v1/chat/completions",
                                                 dict(OPENAI_HELLO, stream=stream), OPENAI_HEADERS)
                    assert status == 502, body[:200]
    run(scenario())


# ---- 18. half-closed clients; shutdown deadline ---------------------------------------------------

def test_a_client_that_half_closes_after_its_request_is_answered(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: Stream(anthropic_stream()[:2] + [("sleep", 0.3)] + anthropic_stream()[2:])) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                body = json.dumps(dict(HELLO, stream=True)).encode()
                answer = await raw_request(port, head_bytes("POST", "/v1/messages", [
                    "host: localhost", "content-type: application/json", f"content-length: {len(body)}"], body),
                    half_close=True)
                status, _, streamed = parse_http(answer)
                assert status == 200 and streamed.endswith(anthropic_stream()[-1])
                body = json.dumps(HELLO).encode()
                answer = await raw_request(port, head_bytes("POST", "/v1/messages", [
                    "host: localhost", f"content-length: {len(body)}"], body), half_close=True)
                assert answer.startswith(b"HTTP/1.1 200") and b"Hello there" in answer
    run(scenario())


@pytest.mark.parametrize("client", ["anthropic", "openai"])
def test_streams_cut_at_the_shutdown_deadline_end_with_an_error_event(tmp_path, client, caplog):
    def script(req):
        if client == "anthropic":
            return Stream(anthropic_stream()[:3] + [("stall",)])
        return Stream(anthropic_stream()[:3] + [("stall",)])

    async def scenario():
        async with FakeUpstream(script) as up:
            server = cp.ProxyServer(config_for(tmp_path, "anthropic", up.url, shutdown_grace=0.3))
            _, port = await server.start("127.0.0.1", 0)
            path, body, headers = client_request(client, True)
            pending = asyncio.ensure_future(call_raw(port, "POST", path, body, headers))
            await asyncio.sleep(0.3)
            with caplog.at_level(logging.INFO, logger="claude_proxy.access"):
                await server.shutdown()
            status, _, streamed, raw = await asyncio.wait_for(pending, 5)
        assert status == 200
        assert_stream_ends_with_one_error(client, raw, streamed, "overloaded_error")
        assert "error=shutdown" in caplog.text
    run(scenario())


# ---- 19/20. planted .env, busy port --------------------------------------------------------------

def test_a_planted_env_file_cannot_send_the_login_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("ANTHROPIC_UPSTREAM_URL=https://collector.evil.example\n")
    config = cp.load_config(None, {"CLAUDE_PROXY_HOME": str(tmp_path / "home")})
    assert config.origins["providers.anthropic.base_url"].startswith(".env $ANTHROPIC_UPSTREAM_URL")
    assert not config.providers["anthropic"]["oauth_trusted"]
    notes = cp.upstream_notes(config, has_login=True)
    assert [level for level, _ in notes] == [logging.WARNING, logging.WARNING]
    assert "collector.evil.example (from .env" in notes[0][1] and "NOT sent" in notes[1][1]
    seed_login(config)
    x = cp.Exchange(cp.ProxyServer(config), cp.Request("POST", "/v1/messages", {}, b"", "127.0.0.1"), None)
    assert run(x.auth_mode(config.providers["anthropic"])) == "client"
    named = cp.parse_config({"home": str(tmp_path / "home"), "providers": {"anthropic": {
        "base_url": "https://gateway.example", "auth": "oauth"}}}, {})
    assert named.providers["anthropic"]["auth"] == "oauth"          # a config file may name a host


def test_a_busy_port_is_one_line_and_exit_2(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    try:
        result = subprocess.run([sys.executable, os.path.join(HERE, "claude_proxy.py"), "serve", "--port", str(port)],
                                capture_output=True, text=True, timeout=20,
                                env=dict(os.environ, CLAUDE_PROXY_HOME=str(tmp_path)), cwd=str(tmp_path))
    finally:
        sock.close()
    assert result.returncode == 2
    assert "already in use" in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if "claude_proxy:" in line and "in use" in line]) == 1

# =============================================================================================
# 7b. Hardening, round 3 (issue 19)
# =============================================================================================

# ---- 1. the status page's key form: a few KiB, refused before the body, one field parsed ------

FORM_HEAD = ["host: 127.0.0.1", "content-type: application/x-www-form-urlencoded"]


@pytest.mark.parametrize("path", ["/", "/health", "/status.json"])
def test_a_keyless_body_over_the_form_cap_is_a_413_before_any_body_byte(tmp_path, path):
    async def scenario():
        async with running_proxy(make_config(tmp_path, proxy_api_key="pk-123456789", body_timeout=30)) as (_, port):
            started = time.monotonic()
            media = FORM_HEAD if path == "/" else ["host: 127.0.0.1", "content-type: application/json"]
            answer = await raw_request(port, head_bytes("POST", path, media + [f"content-length: {30 << 20}"]), timeout=5)
            assert answer.startswith(b"HTTP/1.1 413") and b"4096 bytes" in answer, answer[:200]
            assert time.monotonic() - started < 3       # the body is never awaited
    run(scenario())


def test_a_chunked_form_body_over_the_cap_is_a_413(tmp_path):
    async def scenario():
        async with running_proxy(make_config(tmp_path, proxy_api_key="pk-123456789")) as (_, port):
            chunk = b"a=%&" * 1024
            body = b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2 + b"0\r\n\r\n"
            answer = await raw_request(port, head_bytes("POST", "/", FORM_HEAD + ["transfer-encoding: chunked"], body))
            assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    run(scenario())


def test_the_key_form_reads_its_key_field_and_nothing_else(tmp_path):
    key = "pk-123456789+/=&"

    async def scenario():
        async with running_proxy(make_config(tmp_path, proxy_api_key=key)) as (_, port):
            form = b"a=%&x=%zz&key=" + urllib.parse.quote_plus(key).encode() + b"&key=second&" + b"b=%" * 900
            assert len(form) <= cp.MAX_PUBLIC_BODY
            status, headers, _ = await call(port, "POST", "/", raw=form, headers={"content-type": FORM_HEAD[1][14:]})
            assert status == 303 and headers["location"] == "/" and "set-cookie" in headers
    assert cp.form_field(b"a=1&key=x+y%2B%zz", "key") == "x y+%zz" and cp.form_field(b"akey=1", "key") == ""
    run(scenario())


# ---- 5. a stored conversation is expanded off the loop, within the body limit ---------------

def test_a_tiny_request_continuing_a_large_stored_response_is_converted_off_the_loop(tmp_path, monkeypatch):
    threads = []
    for name in ("responses_to_anthropic_request", "json_bytes"):
        original = getattr(cp, name)

        def recorded(*args, _original=original, _name=name, **kw):
            threads.append((_name, threading.current_thread() is threading.main_thread()))
            return _original(*args, **kw)
        monkeypatch.setattr(cp, name, recorded)
    big = [{"role": "user", "content": "x" * 1000, "id": f"msg_{i}"} for i in range(cp.OFF_LOOP_BODY_BYTES // 1000 + 10)]

    async def scenario():
        async with FakeUpstream(fake_claude) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                status, _, body = await call(port, "POST", "/v1/responses", {"model": "claude-sonnet-4-5", "input": big})
                rid = json.loads(body)["id"]
                threads.clear()
                tiny = {"model": "claude-sonnet-4-5", "input": "next", "previous_response_id": rid, "store": False}
                assert len(json.dumps(tiny)) <= 120
                assert (await call(port, "POST", "/v1/responses", tiny))[0] == 200
                assert ("responses_to_anthropic_request", False) in threads and ("json_bytes", False) in threads
                assert ("responses_to_anthropic_request", True) not in threads, threads
                threads.clear()
                status, _, page = await call(port, "GET", f"/v1/responses/{rid}/input_items?limit=100")
                assert status == 200 and len(json.loads(page)["data"]) == 100
                assert threads == [("json_bytes", False)], threads
    run(scenario())


def test_a_stored_conversation_may_expand_a_request_only_to_the_body_limit(tmp_path):
    limit = 64 * 1024
    turn = {"role": "user", "content": "x" * 40_000}

    async def scenario():
        async with FakeUpstream(fake_claude) as up:
            async with running_proxy(make_config(tmp_path, up.url, max_body_bytes=limit)) as (_, port):
                status, _, body = await call(port, "POST", "/v1/responses", {"model": "claude-sonnet-4-5", "input": [turn]})
                first = json.loads(body)
                status, _, body = await call(port, "POST", "/v1/responses", {
                    "model": "claude-sonnet-4-5", "input": [turn], "previous_response_id": first["id"]})
                assert status == 200, body[:300]                   # 40 KB stored + 40 KB sent: each within the limit
                second = json.loads(body)["id"]
                status, _, body = await call(port, "POST", "/v1/responses", {
                    "model": "claude-sonnet-4-5", "input": "more", "previous_response_id": second})
                error = json.loads(body)["error"]
                assert status == 400 and error["param"] == "previous_response_id", body[:300]
                assert f"{limit}-byte limit" in error["message"] and "MAX_BODY_BYTES" in error["message"]
                item = (await call(port, "GET", f"/v1/responses/{first['id']}/input_items"))[2]
                reference = {"type": "item_reference", "id": json.loads(item)["data"][0]["id"]}
                status, _, body = await call(port, "POST", "/v1/responses", {
                    "model": "claude-sonnet-4-5", "input": [reference, reference]})
                assert status == 400 and json.loads(body)["error"]["param"] == "input", body[:300]
        assert len(up.requests) == 2
    run(scenario())


# ---- 6. client-chosen model names: a capped length, a bounded set of rows -------------------

@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions", "/v1/responses",
                                  "/v1/messages/test_conversion"])
def test_a_model_name_over_the_cap_is_a_400_naming_the_limit(tmp_path, path):
    body = {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "input": "hi"}

    async def scenario():
        async with FakeUpstream(fake_claude) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                status, _, answer = await call(port, "POST", path, dict(body, model="m" * 257), OPENAI_HEADERS)
                assert status == 400 and "at most 256" in answer.decode(), answer[:300]
                status, _, _ = await call(port, "POST", "/v1/messages", dict(body, model="claude-" + "m" * 249),
                                          ANTHROPIC_HEADERS)
                assert status == 200
    run(scenario())


def test_unconfigured_model_names_fold_into_one_other_row_after_a_few(tmp_path):
    config = make_config(tmp_path, "http://127.0.0.1:9", routes={"default": "anthropic", "fast": "anthropic,claude-haiku-4-5"},
                         models=[{"id": "mine", "provider": "anthropic", "model": "claude-x"}])
    server = cp.ProxyServer(config)
    names = [f"junk-{i}" for i in range(cp.MAX_UNCONFIGURED_MODELS + 8)] + ["mine", "claude-fast", "FAST", "junk-0"]
    for name in names:
        x = cp.Exchange(server, cp.Request("POST", "/v1/messages", {}, b"", "127.0.0.1"), cp.ClientStream(FuzzWriter()))
        x.meter.requested = name
        server.ops.request_done(x, time.monotonic())
    by_model = server.ops.session.as_dict()["by_model"]
    assert len(by_model) == cp.MAX_UNCONFIGURED_MODELS + 4, sorted(by_model)
    assert by_model["other"]["requests"] == 8 and by_model["junk-0"]["requests"] == 2
    assert {"mine", "claude-fast", "FAST"} <= set(by_model)
    assert [r.requested_model for r in server.ops.recent][-5:] == ["other", "mine", "claude-fast", "FAST", "junk-0"]
    server.ops.ledger.close()


def test_totals_hold_a_bounded_number_of_model_rows_whatever_the_ledger_holds():
    totals = cp.UsageTotals()
    for i in range(cp.MAX_MODEL_ROWS + 50):
        totals.add(f"m{i}", "default", "2026-01-01", [1] + [0] * 6 + [None, 0])
    totals.add("x" * 4_000_000, "default", "2026-01-01", [1] + [0] * 6 + [None, 0])
    by_model = totals.as_dict()["by_model"]
    assert len(by_model) == cp.MAX_MODEL_ROWS + 1 and by_model["other"]["requests"] == 51


def test_the_cache_of_providers_model_lists_is_bounded():
    lists = cp.ModelLists()
    for i in range(cp.MAX_MODEL_LISTS + 36):
        lists.put(("anthropic", f"credential-{i}"), [{"id": "m"}])
    assert len(lists._lists) == cp.MAX_MODEL_LISTS and lists.get(("anthropic", f"credential-{cp.MAX_MODEL_LISTS + 35}"))
    assert lists.get(("anthropic", "credential-0")) is None


# ---- 7. stored responses belong to the credential that created them -----------------------

def test_a_stored_response_is_found_only_with_the_key_that_created_it(tmp_path):
    mine, theirs = {"authorization": "Bearer sk-client-aaaa-0001"}, {"authorization": "Bearer sk-client-bbbb-0002"}

    async def scenario():
        async with FakeUpstream(fake_claude) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                status, _, body = await call(port, "POST", "/v1/responses", {"model": "claude-sonnet-4-5", "input": "hi"}, mine)
                assert status == 200
                created = json.loads(body)
                rid, item = created["id"], created["output"][0]["id"]
                probes = [("GET", f"/v1/responses/{rid}", None), ("GET", f"/v1/responses/{rid}/input_items", None),
                          ("POST", "/v1/responses", {"model": "claude-sonnet-4-5", "input": "more", "previous_response_id": rid}),
                          ("POST", "/v1/responses", {"model": "claude-sonnet-4-5", "input": [
                              {"type": "item_reference", "id": item}, {"role": "user", "content": "more"}]}),
                          ("DELETE", f"/v1/responses/{rid}", None)]
                for headers in (theirs, {}, {"x-api-key": "sk-client-aaaa-0001x"}):
                    for method, path, body in probes:
                        status, _, answer = await call(port, method, path, body, headers)
                        assert status == 404, (headers, method, path, status, answer[:200])
                same_key_other_header = {"x-api-key": "sk-client-aaaa-0001"}
                for method, path, body in probes:
                    status, _, answer = await call(port, method, path, body, same_key_other_header)
                    assert status == 200, (method, path, answer[:200])
        assert len(up.requests) == 3          # the first turn and the owner's two continuations
    run(scenario())


def test_responses_stored_before_owners_existed_belong_to_no_one(tmp_path):
    import sqlite3
    path = tmp_path / "responses.db"
    db = sqlite3.connect(str(path))
    db.executescript("CREATE TABLE responses (id TEXT PRIMARY KEY, created REAL NOT NULL, previous TEXT, "
                     "size INTEGER NOT NULL, response TEXT NOT NULL); CREATE TABLE items (response_id TEXT NOT NULL, "
                     "seq INTEGER NOT NULL, id TEXT, kind TEXT NOT NULL, item TEXT NOT NULL, PRIMARY KEY (response_id, seq));")
    db.execute("INSERT INTO responses VALUES ('resp_old', 1.0, NULL, 10, '{\"id\": \"resp_old\"}')")
    db.commit()
    db.close()
    store = cp.ResponseStore(str(path), max_bytes=10 ** 6, max_age=10 ** 9, clock=lambda: 2.0)
    store.put({"id": "resp_new", "output": []}, [], "")
    assert store.get("resp_old", "") is None and store.get("resp_new", "") == {"id": "resp_new", "output": []}


# ---- 8. a lone surrogate anywhere a client puts text is made encodable where it enters -------

LONE_SURROGATES = {"escape": b'"a\\ud800b"', "raw bytes": b'"a\xed\xa0\x80b"',
                   "nested JSON": b'"{\\"session_id\\": \\"a\\\\udfffb\\"}"'}
USER_ID_BODIES = [("/v1/messages", HELLO), ("/v1/chat/completions", OPENAI_HELLO),
                  ("/v1/responses", {"model": "claude-sonnet-4-5", "input": "hi", "store": False})]


@pytest.mark.parametrize("path, body", USER_ID_BODIES, ids=["messages", "chat", "responses"])
@pytest.mark.parametrize("lone", LONE_SURROGATES.values(), ids=LONE_SURROGATES.keys())
def test_a_lone_surrogate_in_metadata_user_id_is_served_not_a_500(tmp_path, path, body, lone):
    raw = json.dumps(dict(body, metadata={"user_id": "@"})).encode().replace(b'"@"', lone)

    async def scenario():
        async with FakeUpstream(fake_claude) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                status, _, answer = await call(port, "POST", path, raw=raw, headers=OPENAI_HEADERS)
        assert status == 200, answer[:300]
    run(scenario())


def test_loads_json_puts_u_fffd_for_each_lone_surrogate_and_keeps_pairs():
    assert cp.loads_json(b'{"a\\udc00": ["\\ud800", "\\ud83d\\ude00", "\\\\ud800", "\xed\xb0\x80"]}') == \
        {"a\ufffd": ["\ufffd", "\U0001f600", "\\ud800", "\ufffd"]}
    assert cp.loads_json('"\\ud800\\ud800\\udc00"') == "\ufffd\U00010000"
    assert cp.loads_json('"x"'.encode("utf-16")) == "x" and cp.loads_json('"\\udfff"'.encode("utf-16-le")) == "\ufffd"
    assert cp.loads_event('{"delta": "\\ud800"}') == {"delta": "\ufffd"} and cp.loads_event('["\\ud800"] ') == ["\ufffd"]
    assert cp.parse_json_body(b'{"model": "m\\udbff"}') == {"model": "m\ufffd"}


def exactly_one_response(answer):
    """The raw answer is one whole response and nothing after it (no stray bytes)."""
    head, _, rest = answer.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        assert rest.endswith(b"\r\n0\r\n\r\n") and rest.count(b"\r\n0\r\n\r\n") == 1, rest[-60:]
        parsed = b""
        while rest:
            size_line, rest = rest.split(b"\r\n", 1)
            size = int(size_line, 16)
            parsed, rest = parsed + rest[:size], rest[size + 2:]
            if size == 0:
                assert rest == b"", rest
        return
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
    assert len(rest) == length, (len(rest), length, rest[-60:])


async def post_raw_responses(port, raw):
    """POST raw bytes to /v1/responses on a fresh connection; every byte the proxy answers."""
    return await raw_request(port, head_bytes("POST", "/v1/responses", [
        "host: localhost", "content-type: application/json", "connection: close", f"content-length: {len(raw)}"], raw))


@pytest.mark.parametrize("stream", [False, True])
def test_a_stored_request_with_a_lone_surrogate_is_stored_and_leaves_no_stray_bytes(tmp_path, stream):
    raw = json.dumps({"model": "claude-sonnet-4-5", "input": "@", "stream": stream}).encode().replace(b'"@"', b'"a\\ud800b"')

    async def scenario():
        async with FakeUpstream(fake_claude) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                answer = await post_raw_responses(port, raw)
                assert answer.startswith(b"HTTP/1.1 200")
                exactly_one_response(answer)
                response_id = re.search(rb'"id":"(resp_[0-9a-f]+)"', answer).group(1).decode()
                status, _, items = await call(port, "GET", f"/v1/responses/{response_id}/input_items")
        assert status == 200 and json.loads(items)["data"][0]["content"] in ("a\ufffdb", [
            {"type": "input_text", "text": "a\ufffdb"}]), items
    run(scenario())


@pytest.mark.parametrize("stream", [False, True])
def test_a_failure_after_a_complete_response_sends_nothing_more(tmp_path, monkeypatch, caplog, stream):
    def broken_put(self, response, input_items, owner):
        raise RuntimeError("the disk is on fire")
    monkeypatch.setattr(cp.ResponseStore, "put", broken_put)
    raw = json.dumps({"model": "claude-sonnet-4-5", "input": "hi", "stream": stream}).encode()

    async def scenario():
        async with FakeUpstream(fake_claude) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                answer = await post_raw_responses(port, raw)
        assert answer.startswith(b"HTTP/1.1 200")
        exactly_one_response(answer)
    run(scenario())
    assert any("the disk is on fire" in (r.exc_text or "") or "the disk is on fire" in r.getMessage()
               for r in caplog.records)


# ---- 18. Connection options read as token lists; HTTP/1.0 never persists after chunked -------

def count_answers(answer):
    """How many responses a raw answer holds (its bodies are JSON: no status line inside)."""
    return len(re.findall(rb"HTTP/1\.1 \d\d\d ", answer))


@pytest.mark.parametrize("first", [
    b"GET /health HTTP/1.0\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /health HTTP/1.1\r\nhost: localhost\r\nconnection: close, close\r\n\r\n",
    b"GET /health HTTP/1.1\r\nhost: localhost\r\nconnection: keep-alive,Close\r\n\r\n",
], ids=["http10-chunked", "close-close", "keep-alive-Close"])
def test_a_request_that_ends_its_connection_gets_one_answer_and_the_close(tmp_path, first):
    second = b"GET /health HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"

    async def scenario():
        async with running_proxy(make_config(tmp_path)) as (_, port):
            answer = await raw_request(port, first + second)
            assert answer.startswith(b"HTTP/1.1 200") and count_answers(answer) == 1, answer
    run(scenario())


def test_an_http10_keep_alive_request_with_a_length_still_persists(tmp_path):
    first = b"GET /health HTTP/1.0\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n"
    second = b"GET /health HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"

    async def scenario():
        async with running_proxy(make_config(tmp_path)) as (_, port):
            assert count_answers(await raw_request(port, first + second)) == 2
    run(scenario())


def test_an_upstream_answer_saying_close_in_a_token_list_is_not_reused(tmp_path):
    body = json.dumps(anthropic_message()).encode()
    answer = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: keep-alive, close\r\n"
              b"content-length: %d\r\n\r\n%s" % (len(body), body))

    async def scenario():
        async with ScriptedRaw(lambda n: answer) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                for _ in range(2):
                    assert (await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS))[0] == 200
            assert up.connections == 2
    run(scenario())


# ---- 20. a stream the upstream broke off ends whole and its connection serves the next request

async def read_response(reader):
    """One whole response from a keep-alive connection: (status, headers, body, raw)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status, headers, _ = parse_http(head)
    if headers.get("transfer-encoding") == "chunked":
        raw = b""
        while not raw.endswith(b"\r\n0\r\n\r\n") and raw != b"0\r\n\r\n":
            raw += await reader.readuntil(b"\r\n")
        return status, headers, dechunk(raw), head + raw
    raw = await reader.readexactly(int(headers.get("content-length", 0)))
    return status, headers, raw, head + raw


def broken_off(provider):
    """A stream that sends its first events, then resets."""
    good = openai_stream_chunks("Hi")[:2] if provider == "openai" else anthropic_stream("Hi")[:3]
    return Stream(good + [("sleep", 0.05), ("reset",)])


@pytest.mark.parametrize("client, provider", [("anthropic", "anthropic"), ("anthropic", "openai"), ("openai", "anthropic"),
                                              ("openai", "openai"), ("responses", "anthropic")])
def test_after_an_upstream_breaks_off_mid_stream_the_same_connection_serves_the_next_request(tmp_path, client, provider):
    path, body = {"anthropic": ("/v1/messages", HELLO), "openai": ("/v1/chat/completions", OPENAI_HELLO),
                  "responses": ("/v1/responses", {"model": "claude-sonnet-4-5", "input": "hi", "store": False})}[client]
    calls = []

    def script(req):
        calls.append(req)
        if len(calls) == 1:
            return broken_off(provider)
        return http_response(200, OPENAI_COMPLETION if provider == "openai" else anthropic_message())

    async def scenario():
        async with FakeUpstream(script) as up:
            async with running_proxy(config_for(tmp_path, provider, up.url)) as (_, port):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                for stream in (True, False):
                    data = json.dumps(dict(body, stream=stream)).encode()
                    writer.write(head_bytes("POST", path, ["host: localhost", "content-type: application/json",
                                                           f"content-length: {len(data)}"], data))
                    status, headers, answer, _ = await asyncio.wait_for(read_response(reader), 5)
                    assert status == 200 and headers.get("connection") != "close", (headers, answer[-200:])
                    if stream:
                        assert b"error" in answer.rsplit(b"\n\n", 2)[-2], answer[-200:]
                writer.close()
        assert len(calls) == 2
    run(scenario())


@pytest.mark.parametrize("client, provider", COMBOS)
def test_an_upstream_that_breaks_off_after_its_answer_ended_costs_the_client_nothing(tmp_path, client, provider):
    good = openai_stream_chunks("Hi") if provider == "openai" else anthropic_stream("Hi")
    path, body, headers = client_request(client, True)

    async def scenario():
        async with FakeUpstream(lambda req: Stream(good + [("sleep", 0.05), ("reset",)])) as up:
            async with running_proxy(config_for(tmp_path, provider, up.url)) as (_, port):
                status, resp_headers, answer, _ = await call_raw(port, "POST", path, body, headers)
        assert_success(client, True, status, resp_headers, answer)
    run(scenario())


@pytest.mark.parametrize("data, ended", [
    (b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n", True),
    (b"data: {\"type\": \"message_stop\"}\r\n\r\n", True),
    (b"data: {\"id\":\"c\"}\n\ndata: [DONE]\n\n", True),
    (b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{}}\n\n", True),
    (b"data: {\"type\":\"response.incomplete\",\"response\":{}}\n\n", True),
    (b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n: ping\n\n", False),
    (b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"[DONE]\"}}\n\n", False),
    (b"data: [DONE]", False),
    (b"event: message_delta\ndata: {}\n\n", False),
    (b"", False),
])
def test_sse_answer_ended_reads_the_last_event_of_what_was_relayed(data, ended):
    assert cp.sse_answer_ended(data) is ended


@pytest.mark.parametrize("data", [
    head_bytes("POST", "/", ["host: localhost", "content-type: application/x-www-form-urlencoded",
                             "content-length: 99999"]),
    head_bytes("GET", "/v1/responses", ["host: localhost", "upgrade: websocket", "connection: Upgrade"]),
    head_bytes("GET", "/health", ["host: localhost", "connection: close"]),
    b"GET /health HTTP/1.0\r\n\r\n",
], ids=["refused", "websocket", "asked-to-close", "http10"])
def test_a_response_after_which_the_proxy_closes_says_so_in_its_head(tmp_path, data):
    async def scenario():
        async with running_proxy(make_config(tmp_path)) as (_, port):
            answer = await raw_request(port, data)
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert b"\r\nconnection: close" in head, head
    run(scenario())


# ---- 21. events converted from the read that held a malformed line go out before the error ---

BAD_LINE = b"data: {\"choices\": [\n\n"


def malformed_in_one_read(provider):
    """An upstream stream whose first read holds good events, then a malformed line."""
    if provider == "openai":
        good = openai_stream_chunks("Hi")[:2]
    else:
        good = anthropic_stream("Hi")[:3]
    return Stream([b"".join(good) + BAD_LINE])


@pytest.mark.parametrize("client, provider", [("anthropic", "openai"), ("openai", "anthropic"), ("responses", "anthropic"),
                                              ("responses", "openai")])
def test_events_before_a_malformed_line_in_the_same_read_reach_the_client_then_the_error(tmp_path, client, provider):
    path, body = {"anthropic": ("/v1/messages", HELLO), "openai": ("/v1/chat/completions", OPENAI_HELLO),
                  "responses": ("/v1/responses", {"model": "claude-sonnet-4-5", "input": "hi", "store": False})}[client]

    async def scenario():
        async with FakeUpstream(lambda req: malformed_in_one_read(provider)) as up:
            async with running_proxy(config_for(tmp_path, provider, up.url)) as (_, port):
                status, _, raw_body, raw = await call_raw(port, "POST", path, dict(body, stream=True), OPENAI_HEADERS)
        assert status == 200 and raw.endswith(b"0\r\n\r\n")
        events = sse_events(raw_body)
        if client == "anthropic":
            assert [e for e, _ in events] == ["message_start", "content_block_start", "content_block_delta", "error"]
            assert events[2][1]["delta"]["text"] == "Hi" and events[-1][1]["error"]["type"] == "api_error"
        elif client == "openai":
            assert "".join(d["choices"][0]["delta"].get("content") or "" for _, d in events[:-1]) == "Hi"
            assert events[-1][1]["error"]["message"].startswith("upstream sent a malformed stream event")
        else:
            kinds = [e for e, _ in events]
            assert kinds[:2] == ["response.created", "response.in_progress"] and kinds.count("response.created") == 1
            assert kinds[-1] == "response.failed" and "response.output_text.delta" in kinds
            assert "malformed" in events[-1][1]["response"]["error"]["message"]
    run(scenario())


# ---- the fuzz campaign: HTTP heads over real sockets, with bodies of the three JSON dialects ---

# (what it found first: a Responses input item whose type or id is not a string was a 500)

@pytest.mark.parametrize("item, param", [({"type": {"x": 1}, "content": "hi"}, "input.0.type"),
                                         ({"type": "message", "role": "user", "content": "hi", "id": ["x"]}, "input.0.id")])
def test_a_responses_input_item_with_a_non_string_type_or_id_is_a_400(tmp_path, item, param):
    async def scenario():
        async with running_proxy(make_config(tmp_path, f"http://127.0.0.1:{free_port()}")) as (_, port):
            status, _, body = await call(port, "POST", "/v1/responses", {"model": "claude-sonnet-4-5", "input": [item]})
        assert status == 400 and json.loads(body)["error"]["param"] == param, body
    run(scenario())


FUZZ_METHODS = ["GET", "POST", "HEAD", "OPTIONS", "DELETE", "PUT", "PATCH", "TRACE", "CONNECT", "get", "G\x00T", "P(ST"]
FUZZ_TARGETS = ["/", "/health", "/status.json", "/v1/stats?since=x", "/v1/messages", "/v1/messages/count_tokens",
                "/v1/chat/completions", "/chat/completions", "/v1/responses", "/v1/responses/resp_x",
                "/v1/responses/resp_x/input_items?limit=abc&order=x", "/v1/responses/%ff%00/input_items",
                "/v1/models", "/v1/models/claude%00x", "/auth/status", "/auth/start", "/test-connection",
                "/v1/messages/test_conversion?dry_run=1", "*", "http://127.0.0.1/health",
                "https://evil.example/v1/messages", "//x", "/%", "/?key=%zz", "/" + "a" * 9000, "/v1/messages?x=\x7f",
                "/api/x", "/v1/responses/resp_x/cancel"]
FUZZ_VERSIONS = ["HTTP/1.1"] * 20 + ["HTTP/1.0", "HTTP/1.0", "HTTP/2.0", "http/1.1", "HTTP/1.", "HTTP/1.1 x", ""]
FUZZ_HEADERS = {
    "host": ["127.0.0.1", "localhost:1", "evil.example", "", "a b", "[::1]:8082", "127.0.0.1\x00"],
    "content-length": ["0", "5", "-1", "1e3", "99999999999999999999", "+5", " 5", "5, 5", "0x10"],
    "transfer-encoding": ["chunked", "Chunked", "chunked, gzip", "gzip", " chunked", "identity", "chunked, chunked"],
    "connection": ["close", "keep-alive", "close, close", "upgrade", "Keep-Alive, Close", ""],
    "expect": ["100-continue", "x"],
    "content-type": ["application/json", "text/plain", "application/x-www-form-urlencoded",
                     "multipart/form-data; boundary=x", "application/json; charset=utf-16"],
    "origin": ["http://127.0.0.1", "http://evil.example", "null", ""],
    "sec-fetch-site": ["cross-site", "same-origin", "none"],
    "x-api-key": ["", "k", "sk-ant-api03-" + "x" * 40],
    "authorization": ["Bearer", "Basic x", "Bearer " + "k" * 300, "bearer  x"],
    "accept": ["text/html", "*/*", "text/event-stream"],
    "upgrade": ["websocket", "h2c"],
    "anthropic-version": ["2023-06-01", "x"],
    "anthropic-beta": ["a,b,,", "x" * 5000],
    "cookie": ["claude_proxy_page=x", "a=b; claude_proxy_page=" + "y" * 300],
    "x-claude-code-session-id": ["s", "\xff\xfe"],
    "access-control-request-headers": ["x-api-key"],
}


def _fuzz_header_line(rand):
    """One header line: a known name with a picked value, or a malformed line."""
    roll = rand.random()
    name = rand.choice(list(FUZZ_HEADERS))
    value = rand.choice(FUZZ_HEADERS[name])
    if roll < 0.95:
        return f"{name}: {value}"
    return rand.choice([f"{name} : {value}", f"{name}:{value}\r", f" {name}: {value}", f"{name}\x01: {value}",
                        f"{name}: {value}\x7f", "no-colon-here", f"x-long: {'v' * 70000}", f"{name}:", ":"])


def _chunk_framing(rand, body):
    """A body in chunks, now and then with odd framing."""
    if not body:
        return b"0\r\n\r\n"
    cuts = sorted(rand.sample(range(1, len(body)), min(len(body) - 1, rand.randint(0, 5)))) if len(body) > 1 else []
    pieces = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)])]
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(p), rand.choice([b"", b"", b";ext=1", b" "]), p) for p in pieces)
    tail = rand.choice([b"0\r\n\r\n"] * 4 + [b"0\r\nx-trailer: 1\r\n\r\n", b"0\r\n", b"", b"zz\r\n\r\n"])
    return out + tail


def fuzz_request_bytes(rand):
    """One raw request (now and then two, pipelined): a head from the pools above, mutated, with a
    body from fuzz_bodies (the three JSON dialects), a form or nothing."""
    method, target, version = rand.choice(FUZZ_METHODS), rand.choice(FUZZ_TARGETS), rand.choice(FUZZ_VERSIONS)
    if rand.random() < 0.5:
        target, body = fuzz_bodies(rand)
        method = "POST"
    else:
        body = rand.choice([b"", b"", b"key=x&a=%", b"{}", b"\x00\xff", b"a=%&" * 2000])
    lines = [f"{method} {target} {version}".rstrip(" ") if rand.random() > 0.03 else f"{method}  {target}",
             "host: 127.0.0.1"] if rand.random() > 0.05 else [f"{method} {target} {version}"]
    lines += [_fuzz_header_line(rand) for _ in range(rand.randint(0, 6))]
    lines += ["x-api-key: k"] if rand.random() < 0.6 else []         # the live proxy's key
    chunked = rand.random() < 0.2
    if chunked:
        lines.append("transfer-encoding: chunked")
    elif rand.random() < 0.9:
        lines.append(f"content-length: {len(body) if rand.random() < 0.9 else len(body) + rand.choice([-3, 7])}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
    if rand.random() < 0.03:
        head = head.replace(b"\r\n", b"\n", rand.randint(1, 3))
    data = head + (_chunk_framing(rand, body) if chunked else body)
    if rand.random() < 0.1:
        data += b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
    return data


async def fuzz_socket_campaign(tmp_path, count, seed, concurrency=16, hang_after=15.0):
    """count fuzzed raw requests over loopback to two proxies (a dead upstream, and a live one with
    a proxy key); each connection half-closes after sending. Returns ({status: count}, hangs,
    answers without a status line); a 500 fails at once."""
    rand, statuses, hangs, silent = random.Random(seed), {}, [], 0
    inputs = [fuzz_request_bytes(rand) for _ in range(count)]
    limits = dict(header_timeout=2, body_timeout=2, idle_timeout=2, max_body_bytes=1 << 20)
    async with FakeUpstream(fuzz_upstream_answer) as up:
        async with running_proxy(make_config(tmp_path, f"http://127.0.0.1:{free_port()}", **limits)) as (_, dead_port), \
                running_proxy(make_config(tmp_path / "k", up.url, proxy_api_key="k", **limits)) as (_, live_port):
            gate = asyncio.Semaphore(concurrency)

            async def one(i, data):
                nonlocal silent
                async with gate:
                    try:
                        answer = await raw_request(dead_port if i % 2 else live_port, data, half_close=True,
                                                   timeout=hang_after)
                    except asyncio.TimeoutError:
                        hangs.append(data[:200])
                        return
                    except ConnectionError:
                        answer = b""
                found = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d\d\d) ", answer)]
                silent += not found
                for status in found:
                    statuses[status] = statuses.get(status, 0) + 1
                assert 500 not in found, (data[:400], answer[:600])
            await asyncio.gather(*(one(i, data) for i, data in enumerate(inputs)))
    return statuses, hangs, silent


def test_fuzzed_raw_requests_never_get_a_500_and_never_hang(tmp_path):
    logging.getLogger("claude_proxy").disabled = True
    try:
        statuses, hangs, silent = run(fuzz_socket_campaign(tmp_path, 6000, FUZZ_SEED + 20))
    finally:
        logging.getLogger("claude_proxy").disabled = False
    assert hangs == [] and 500 not in statuses, (hangs[:3], statuses)
    assert statuses.get(400, 0) > 1500 and statuses.get(200, 0) > 100 and silent < 400, (statuses, silent)


# ---- files the proxy trusts, key pools, operations endpoints ----------------------------------

def raw_token_answer(expires_in):
    """A token endpoint script answering every grant with this raw `expires_in` JSON text."""
    body = (b'{"access_token": "sk-ant-oat01-odd", "refresh_token": "sk-ant-ort01-odd", '
            b'"token_type": "Bearer", "scope": "user:inference", "expires_in": ' + expires_in + b"}")
    return lambda req: http_response(200, body)


@pytest.mark.parametrize("expires_in", [b"1e999", b"-1e999", b"NaN", b"Infinity", b'"nan"', b'"1e999"', b"-3600",
                                        b'"soon"', b"1" + b"0" * 400, b"true", b"[1]", b"1e300"])
def test_an_odd_expires_in_never_breaks_auth_status_or_the_status_command(tmp_path, expires_in, capsys):
    async def scenario():
        async with FakeUpstream(raw_token_answer(expires_in)) as auth:
            config = oauth_config(tmp_path, "http://127.0.0.1:9", auth.url + "/v1/oauth/token")
            async with running_proxy(config) as (_, port):
                start = json.loads((await call(port, "GET", "/auth/start"))[2])
                status, _, body = await call(port, "POST", "/auth/callback", {"code": "c#" + start["state"]})
                assert status == 200, body
                status, _, body = await call(port, "GET", "/auth/status")
                return status, json.loads(body)
    status, login = run(scenario())
    assert status == 200 and login["logged_in"] is True
    assert (login["expires_at"], login["expires_in_seconds"]) == (None, None)     # unknown, not a crash
    config = make_config(tmp_path)                    # the `status` command, on the same saved login
    assert run(cp.run_oauth_command("status", types.SimpleNamespace(), config, {})) == 0
    assert json.loads(capsys.readouterr().out)["logged_in"] is True


def test_a_saved_login_with_an_unsayable_expiry_reads_as_unknown(tmp_path):
    path = tmp_path / "oauth_token.json"
    for stored in ("1e999", "NaN", "-Infinity", "1" + "0" * 400, '"tomorrow"', "99999999999999"):
        path.write_text('{"token": {"access_token": "sk-ant-oat01-x", "expires_at": %s}}' % stored)
        assert cp.TokenStore(str(path)).load()["expires_at"] is None
        manager = cp.TokenManager(cp.TokenStore(str(path)), OAUTH_DEFAULTS, FakeTokenEndpoint())
        assert manager.status()["expires_in_seconds"] is None
    assert cp.expiry_epoch(1.5e12, 1000) == 1.5e9 and cp.expiry_epoch(0) == 0
    assert cp._expires_at("3600", 1000.0) == 4600.0 and cp._expires_at(3600, 1000.0) == 4600.0

NOW = 1_700_000_000.0


@pytest.mark.parametrize("headers, seconds", [
    ({"retry-after": "7"}, 7.0), ({"retry-after-ms": "1500"}, 1.5), ({"retry-after-ms": "x", "retry-after": "3"}, 3.0),
    ({"retry-after": "1e9"}, 600.0), ({"retry-after-ms": "1e12"}, 600.0), ({"retry-after": "-5"}, 0.0),
    ({"retry-after": "inf"}, None), ({"retry-after": "-inf"}, None), ({"retry-after": "nan"}, None),
    ({"retry-after": "1e999"}, None), ({"retry-after": "soon"}, None), ({"retry-after": ""}, None), ({}, None),
    ({"retry-after": "Tue, 14 Nov 2023 22:13:50 GMT"}, 30.0),         # NOW + 30 s as an HTTP-date
    ({"retry-after": "Sun, 06 Nov 1994 08:49:37 GMT"}, 0.0),          # a past date: at once
    ({"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}, 600.0),
    ({"retry-after": "Fri, 31 Dec 99999 23:59:59 GMT"}, None),        # no calendar has it
    ({"retry-after": "Mon, 32 Foo 2023 99:99:99 GMT"}, None),
])
def test_retry_after_is_read_defensively_and_capped(headers, seconds):
    assert cp.retry_after_seconds(headers, NOW) == seconds


@pytest.mark.parametrize("hint", ["1e9", "inf", "nan", "Fri, 31 Dec 9999 23:59:59 GMT", "1e999"])
def test_a_wild_retry_after_cools_a_key_at_most_ten_minutes_and_stats_stay_200(tmp_path, hint):
    upstream = KeyedUpstream(lambda key, n: (429, [("retry-after", hint)]))

    async def scenario():
        async with FakeUpstream(upstream) as up:
            async with running_proxy(pool_config(tmp_path, up.url, [KEY_A, KEY_B])) as (server, port):
                status, headers, _ = await call(port, "POST", "/v1/messages", HELLO, session_headers("s1"))
                assert status == 429 and 1 <= int(headers["retry-after"]) <= 600
                status, headers, _ = await call(port, "POST", "/v1/messages", HELLO, session_headers("s2"))
                assert status == 429 and 1 <= int(headers["retry-after"]) <= 600
                for path in ("/v1/stats", "/status.json"):
                    status, _, body = await call(port, "GET", path)
                    assert status == 200, body
                pool = server.key_pools["pool"]
                assert all(0 <= k.cooling_until - pool.clock() <= 600 for k in pool.keys)
                assert len(upstream.log) == 2
    run(scenario())


def test_a_key_answering_429_a_thousand_times_backs_off_without_overflow():
    pool = cp.KeyPool({"name": "p", "key_strategy": "fill_first", "api_keys": [KEY_A, KEY_B]}, clock=lambda: 0.0)
    for _ in range(1100):
        assert pool.report(pool.keys[0], 429, {}) is True
    assert pool.keys[0].cooling_until == 60.0

NOT_ABOUT_THE_KEY = [                          # 403s that are one request's answer, not the key's
    {"type": "error", "error": {"type": "permission_error",
                                "message": "Your API key does not have permission to use the specified resource."}},
    {"error": {"message": "Input was flagged by moderation: violence", "code": 403}},
    {"error": {"code": "unsupported_country_region_territory", "type": "request_forbidden",
               "message": "Country, region, or territory not supported"}},
    b"<html><body>403 Forbidden</body></html>",
]
ABOUT_THE_KEY = [
    {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}},
    {"error": {"code": 403, "status": "PERMISSION_DENIED", "message": "API key not valid. Please pass a valid API key."}},
    {"error": {"message": "This key has been revoked", "type": "forbidden"}},
]


def answering(status, body, keys=None):
    """An upstream answering `status` with `body` to the given keys (every key when None), 200 otherwise."""
    log = []

    def script(req):
        key = req["headers"].get("x-api-key")
        log.append(key)
        if keys is None or key in keys:
            return http_response(status, body if isinstance(body, bytes) else json.dumps(body).encode())
        return http_response(200, anthropic_message())
    script.log = log
    return script


@pytest.mark.parametrize("body", NOT_ABOUT_THE_KEY)
def test_a_403_not_about_the_key_is_relayed_and_disables_no_key(tmp_path, body):
    upstream = answering(403, body)

    async def scenario():
        async with FakeUpstream(upstream) as up:
            async with running_proxy(pool_config(tmp_path, up.url, [KEY_A, KEY_B, KEY_C])) as (server, port):
                for session in ("s1", "s2", "s3", "s4"):
                    status, _, raw = await call(port, "POST", "/v1/messages", HELLO, session_headers(session))
                    assert status == 403
                    if isinstance(body, dict) and body.get("type") == "error":
                        assert json.loads(raw) == body                      # relayed as it is
                assert [k["state"] for k in server.key_pools["pool"].snapshot()] == ["healthy"] * 3
        assert upstream.log == [KEY_A] * 4                                   # one call each, no walk
    run(scenario())


@pytest.mark.parametrize("body", ABOUT_THE_KEY)
def test_a_403_about_the_key_disables_that_key_and_the_next_one_answers(tmp_path, body):
    upstream = answering(403, body, keys={KEY_A})

    async def scenario():
        async with FakeUpstream(upstream) as up:
            async with running_proxy(pool_config(tmp_path, up.url, [KEY_A, KEY_B])) as (server, port):
                assert (await call(port, "POST", "/v1/messages", HELLO, session_headers("s1")))[0] == 200
                assert (await call(port, "POST", "/v1/messages", HELLO, session_headers("s2")))[0] == 200
                assert [k["state"] for k in server.key_pools["pool"].snapshot()] == ["disabled", "healthy"]
        assert upstream.log == [KEY_A, KEY_B, KEY_B]
    run(scenario())


def test_one_request_disables_at_most_one_key_of_a_pool(tmp_path):
    upstream = answering(401, {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}})

    async def scenario():
        async with FakeUpstream(upstream) as up:
            async with running_proxy(pool_config(tmp_path, up.url, [KEY_A, KEY_B, KEY_C])) as (server, port):
                status, _, body = await call(port, "POST", "/v1/messages", HELLO, session_headers("s1"))
                assert status == 401 and json.loads(body)["error"]["message"] == "invalid x-api-key"
                assert [k["state"] for k in server.key_pools["pool"].snapshot()] == ["disabled", "healthy", "healthy"]
                assert upstream.log == [KEY_A, KEY_B]
                assert (await call(port, "POST", "/v1/messages", HELLO, session_headers("s2")))[0] == 401
                assert [k["state"] for k in server.key_pools["pool"].snapshot()] == ["disabled", "disabled", "healthy"]
    run(scenario())

@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.9.8.7", True), ("127.1", True), ("0x7f.1", True), ("[::1]", True), ("::1", True),
    ("::ffff:127.0.0.1", True), ("localhost", True), ("LOCALHOST", True),
    ("127.attacker.example", False), ("127.0.0.1.nip.io", False), ("127.0.0.1.attacker.example", False),
    ("127.", False), ("128.0.0.1", False), ("::2", False), ("10.0.0.1", False), ("localhost.attacker.example", False),
    ("", False), ("0.0.0.0", False),
])
def test_loopback_is_decided_on_an_ip_literal_never_a_names_prefix(host, loopback):
    assert cp.is_loopback(host) is loopback


def test_auth_auto_never_sends_the_saved_login_to_a_name_starting_with_127(tmp_path):
    for url, trusted in (("http://127.attacker.example:8080", False), ("http://127.0.0.1.nip.io", False),
                         ("http://127.0.0.1:8080", True), ("http://[::1]:8080", True), ("https://api.anthropic.com", True)):
        config = make_config(tmp_path, providers={"p": {"format": "anthropic", "base_url": url}}, routes={"default": "p"})
        assert config.providers["p"]["oauth_trusted"] is trusted, url
    pool = make_pool()
    pool.proxies = {"http": "http://proxy.example:3128"}
    assert pool.proxy_for("http", "127.attacker.example") == "http://proxy.example:3128"
    assert pool.proxy_for("http", "127.0.0.1") is None

STRADDLING_KEY = "sk-ant-api03-straddle-0123456789abcdefghij"


def no_key_part(text, key=STRADDLING_KEY):
    """No piece of the key past what mask() shows (its first six characters) is in text."""
    return not any(key[i:i + 8] in text for i in range(6, len(key) - 7))


@pytest.mark.parametrize("pad", [280, 140, 1980])
def test_texts_are_scrubbed_before_they_are_cut(tmp_path, pad, caplog):
    """A provider's last error (cut at 300), a doctor detail (cut at 300) and a DEBUG upstream
    body (cut at 2000), each with the configured key where the cut falls, show none of it."""
    body = b"x" * pad + STRADDLING_KEY.encode() + b" and more"

    async def scenario():
        async with FakeUpstream(lambda req: http_response(401 if req["method"] == "GET" else 500, body,
                                                          content_type="text/plain")) as up:
            config = make_config(tmp_path, None, routes={"default": "p"},
                                 providers={"p": {"format": "anthropic", "base_url": up.url, "api_key": STRADDLING_KEY}})
            async with running_proxy(config) as (server, port):
                assert (await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS))[0] == 500
                page = (await call(port, "GET", "/status.json"))[2].decode()
                checks = await cp.run_doctor(cp.doctor_exchange(server))
                return server.ops.provider_errors["p"]["message"], page, checks
    logger = logging.getLogger("claude_proxy")
    with caplog.at_level(logging.DEBUG, logger="claude_proxy"):
        old = logger.level
        try:
            message, page, checks = run(scenario())
        finally:
            logger.setLevel(old)
    details = " ".join(c["detail"] for c in checks)
    assert message.startswith("xxx") and "401" in details
    debug = [r.getMessage() for r in caplog.records if "answered 500" in r.getMessage()]
    assert debug and all(no_key_part(text) for text in [message, page, details] + debug)


def test_an_unknown_key_an_upstream_echoes_is_masked_by_its_shape(tmp_path):
    echoed = "sk-proj-Zx81LmQ0cVb7TyUi93NdWe4RtY5uI6oP"
    redactor = cp.Redactor([])
    assert echoed not in redactor.clip(f"Incorrect API key provided: {echoed}.", 300)
    assert redactor.clip("Bearer abc.def.ghi-1234567 went wrong", 300) == "Bearer...(redacted) went wrong"
    plain = "model claude-sonnet-4-5-20250929 is unknown"
    assert redactor.clip(plain, 300) == plain
    assert cp.Redactor([echoed]).clip("a" * 295 + echoed, 300) == "a" * 295 + "sk-pr"


@pytest.mark.parametrize("base_url", ["sk-ant-api03-pasted0123456789abcdef",
                                      "https://api.example.com/v1 sk-ant-api03-pasted0123456789abcdef",
                                      "Bearer sk-ant-api03-pasted0123456789abcdef"])
def test_a_key_pasted_into_base_url_is_masked_in_the_config_error_at_start_and_reload(tmp_path, base_url):
    pasted = "sk-ant-api03-pasted0123456789abcdef"
    cfg = tmp_path / "config.json"
    write_config(cfg, "http://127.0.0.1:9")
    source = cp.ConfigSource(str(cfg), {})

    async def scenario():
        server = cp.ProxyServer(source.load(), source=source)
        write_config(cfg, "http://127.0.0.1:9", providers={"anthropic": {"format": "anthropic", "base_url": base_url}})
        assert not await cp.reload_config(server, "test")
        return server.ops.config_error["message"]
    with pytest.raises(cp.ConfigError) as start_error:
        cp.parse_config({"providers": {"p": {"format": "openai", "base_url": base_url}}}, {})
    shown = run(scenario())
    assert "providers.anthropic.base_url" in shown and "providers.p.base_url" in str(start_error.value)
    assert no_key_part(shown, pasted) and no_key_part(str(start_error.value), pasted)
    for line in ("  api_key " + pasted, "  api_key: [" + pasted):      # echoed cut: masked first
        with pytest.raises(cp.ConfigError) as yaml_error:
            cp.parse_yaml_models("- model_name: x\n" + line + "\n", "models.yaml")
        assert "models.yaml:2" in str(yaml_error.value) and no_key_part(str(yaml_error.value), pasted)

def marker_plugin(folder, name, hooks=""):
    """A plugin file that leaves <name>.ran beside itself when its code runs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(f"open(__file__ + '.ran', 'w').close()\n{hooks}")
    return folder / (name + ".ran")


def test_a_dotenv_or_a_model_file_in_the_working_directory_never_runs_a_plugin(tmp_path, monkeypatch, caplog):
    work = tmp_path / "cloned-repo"
    ran = [marker_plugin(work, "x.py"), marker_plugin(work / "evil" / "plugins", "y.py"),
           marker_plugin(work, "z.py")]
    (work / ".env").write_text("CLAUDE_PROXY_HOME=./evil\n")
    (work / "models.json").write_text(json.dumps({"plugins": ["z.py"], "models": [{"id": "m", "provider": "anthropic"}]}))
    monkeypatch.chdir(work)
    cfg = tmp_path / "config.json"
    write_config(cfg, "http://127.0.0.1:9")
    source = cp.ConfigSource(str(cfg), {})

    async def scenario():
        config = source.load()
        assert config.settings["plugins"] == [] and "m" in config.models          # the model file still works
        assert config.home.endswith("evil") and config.plugin_folder == str(tmp_path / "home" / "plugins")
        assert config.origins["settings.plugins"] == "default"
        server = cp.ProxyServer(config, source=source)
        watcher = cp.ConfigWatcher(server)
        (work / ".env").write_text("CLAUDE_PROXY_PLUGINS=x.py,z.py\nCLAUDE_PROXY_HOME=./evil\nMAX_RETRIES=3\n")
        assert await watcher.check() and server.config.settings["max_retries"] == 3      # reloaded
        assert server.config.settings["plugins"] == []
        return server.config.warnings
    with caplog.at_level(logging.WARNING, logger="claude_proxy"):
        warnings = run(scenario())
    assert not any(path.exists() for path in ran)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("config reload: ")]
    assert len(said) == 1 and said[0].startswith("config reload: .env: CLAUDE_PROXY_PLUGINS ignored")   # new only
    assert any(".env: CLAUDE_PROXY_PLUGINS ignored" in w for w in warnings)
    assert any('model file: "plugins" ignored' in w for w in warnings)
    assert any(".env: CLAUDE_PROXY_HOME moves the proxy's state, not its plugins" in w for w in warnings)


def test_plugins_named_by_the_config_file_the_environment_or_home_run_and_each_is_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    ran = [marker_plugin(tmp_path / "conf", "from_file.py"), marker_plugin(tmp_path / "envdir", "from_env.py"),
           marker_plugin(tmp_path / "home" / "plugins", "from_home.py", "def request_hook(payload):\n    return None\n")]
    cfg = tmp_path / "conf" / "config.json"
    write_config(cfg, "http://127.0.0.1:9", plugins=["from_file.py"], home=str(tmp_path / "home"))
    source = cp.ConfigSource(str(cfg), {"CLAUDE_PROXY_PLUGINS": str(tmp_path / "envdir" / "from_env.py")})

    async def scenario():
        server = cp.ProxyServer(source.load(), source=source)
        assert server.plugins.names == ["from_env.py", "from_home.py"]      # the environment wins over the file
        assert await cp.reload_config(server, "SIGHUP")
    with caplog.at_level(logging.INFO, logger="claude_proxy"):
        run(scenario())
    assert not ran[0].exists() and ran[1].exists() and ran[2].exists()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plugin ")]
    assert lines.count(f"plugin {tmp_path / 'envdir' / 'from_env.py'} loaded: no hooks") == 2      # start and reload
    assert lines.count(f"plugin {tmp_path / 'home' / 'plugins' / 'from_home.py'} loaded: request_hook") == 2


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX ownership")
def test_plugins_another_user_may_write_are_refused_saying_why(tmp_path):
    folder = tmp_path / "home" / "plugins"
    ran = marker_plugin(folder, "p.py")
    config = make_config(tmp_path)
    for mode, file_mode, why in ((0o777, 0o644, "writable by others"), (0o775, 0o644, "writable by its group"),
                                 (0o755, 0o646, "writable by others"), (0o755, 0o664, "writable by its group")):
        os.chmod(folder, mode)
        os.chmod(folder / "p.py", file_mode)
        with pytest.raises(cp.ConfigError, match=why + ".*refusing to run code from it"):
            cp.load_plugins(config)
    listed = tmp_path / "shared"
    marker_plugin(listed, "q.py")
    os.chmod(listed, 0o1777)                                  # a /tmp-like folder: anyone may swap the file
    with pytest.raises(cp.ConfigError, match=r"shared is writable by others"):
        cp.load_plugins(make_config(tmp_path / "other", plugins=[str(listed / "q.py")]))
    if os.getuid() == 0:                                      # root can hand the file to someone else
        os.chmod(folder, 0o755)
        os.chmod(folder / "p.py", 0o644)
        os.chown(folder / "p.py", 54321, 54321)
        with pytest.raises(cp.ConfigError, match="belongs to another user"):
            cp.load_plugins(config)
    assert not ran.exists()
    os.chmod(folder, 0o700)
    os.chmod(folder / "p.py", 0o600)
    if os.getuid() == 0:
        os.chown(folder / "p.py", 0, 0)
    cp.load_plugins(config)
    assert ran.exists()

PROXY_KEY_19 = "sk-proxy-issue19-0123456789"


@pytest.mark.parametrize("save", ["unlink", "rename"])
def test_an_editor_saving_the_default_config_by_unlink_and_create_never_loads_the_defaults(tmp_path, save, caplog):
    home = tmp_path / "home"
    home.mkdir()
    cfg = home / "config.json"

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            write_config(cfg, up.url, home=str(home), proxy_api_key=PROXY_KEY_19)
            env = {"CLAUDE_PROXY_HOME": str(home), "ANTHROPIC_UPSTREAM_URL": up.url}      # defaults stay loopback
            source = cp.ConfigSource(None, env)
            async with running_proxy(source.load(), source=source) as (server, port):
                watcher = cp.ConfigWatcher(server)
                assert (await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS))[0] == 401
                if save == "unlink":
                    cfg.unlink()
                else:
                    cfg.rename(home / "config.json~")
                assert await watcher.check() and server.generation == 1            # kept, said, not the defaults
                assert server.ops.config_missing and "is missing" in server.ops.config_error["message"]
                assert (await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS))[0] == 401
                assert not await watcher.check()                                  # nothing new to read
                write_config(cfg, up.url, home=str(home), proxy_api_key=PROXY_KEY_19, max_retries=1)
                assert await watcher.check() and server.generation == 2           # retried once it is back
                assert server.config.settings["max_retries"] == 1 and not server.ops.config_missing
                assert (await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS))[0] == 401
                auth = dict(ANTHROPIC_HEADERS, **{"x-api-key": PROXY_KEY_19})
                assert (await call(port, "POST", "/v1/messages", HELLO, auth))[0] == 200
                assert json.loads((await call(port, "GET", "/status.json", headers=auth))[2])["config"]["path"] == str(cfg)
    with caplog.at_level(logging.WARNING, logger="claude_proxy"):
        run(scenario())
    missing = [r for r in caplog.records if "is missing" in r.getMessage()]
    assert missing and all(r.levelno == logging.WARNING for r in missing)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_a_config_path_that_is_a_fifo_is_refused_at_once_at_start(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)

    outcome = {}

    def load():
        try:
            outcome["config"] = cp.load_config(str(fifo), {})
        except cp.ConfigError as exc:
            outcome["error"] = str(exc)
    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(5)
    hung = thread.is_alive()
    with contextlib.suppress(OSError):                  # frees a reader still blocked in open()
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    thread.join(5)
    assert not hung and "not a regular file" in outcome["error"]
    (tmp_path / "work").mkdir()
    os.mkfifo(tmp_path / "work" / ".env")
    assert cp.read_dotenv(str(tmp_path / "work" / ".env")) == {}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_a_config_file_replaced_by_a_fifo_wedges_neither_sighup_reload_nor_sigterm(tmp_path):
    cfg = tmp_path / "config.json"
    write_config(cfg, "http://127.0.0.1:9", reload_interval=0)
    proc, port = serve_process(tmp_path, cfg)
    try:
        cfg.unlink()
        os.mkfifo(cfg)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert run(call(port, "GET", "/health"))[0] == 200                      # still serving
        proc.send_signal(signal.SIGHUP)
        proc.terminate()
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(OSError):
                os.close(os.open(cfg, os.O_WRONLY | os.O_NONBLOCK))
            proc.wait(10)
    stderr = proc.stderr.read().decode()
    assert "not a regular file" in stderr and "generation 1 stays" in stderr


class HangingSource(cp.ConfigSource):
    """A config source whose files hang (a hung mount) while `gate` is closed."""

    def __init__(self, *args, gate):
        super().__init__(*args)
        self.gate, self.hang = gate, False

    def load(self):
        if self.hang:
            self.gate.wait()
        return super().load()


def test_a_hung_config_read_times_out_holds_no_lock_and_lets_shutdown_finish(tmp_path, monkeypatch):
    monkeypatch.setattr(cp, "CONFIG_READ_TIMEOUT", 0.3, raising=False)
    gate = threading.Event()
    cfg = tmp_path / "config.json"
    write_config(cfg, "http://127.0.0.1:9")
    source = HangingSource(str(cfg), {}, gate=gate)

    async def scenario():
        async with running_proxy(source.load(), source=source) as (server, port):
            source.hang = True
            first = await cp.reload_config(server, "SIGHUP")
            assert not first and "took over" in server.ops.config_error["message"]
            assert not await asyncio.wait_for(cp.reload_config(server, "SIGHUP"), 1)    # refused at once, no 2nd thread
            assert "still being read" in server.ops.config_error["message"]
            assert not server.ops.reload_lock().locked()
            assert (await call(port, "GET", "/health"))[0] == 200
            source.hang = False
            gate.set()                                  # the mount recovers: the next reload works
            await asyncio.sleep(0.05)
            assert await cp.reload_config(server, "SIGHUP") and server.generation == 2
            both = await asyncio.gather(cp.reload_config(server, "poll"), cp.reload_config(server, "SIGHUP"))
            assert both == [True, True] and server.ops.config_error is None and server.generation == 4
            source.hang = True
            gate.clear()
            assert not await cp.reload_config(server, "SIGHUP")
        # running_proxy's shutdown returned with a read still hanging
    safety = threading.Timer(20, gate.set)          # were the loop to wait for the hung read, it ends
    safety.start()
    try:
        run(asyncio.wait_for(scenario(), 10))
    finally:
        gate.set()
        safety.cancel()

SLOW_HOOKS_PLUGIN = '''
import os
import time
HERE = os.path.dirname(os.path.abspath(__file__))


def blocked_until_released(kind):
    with open(os.path.join(HERE, kind + ".calls"), "a") as fh:
        fh.write("x")
    for _ in range(1000):                      # a hook that hangs (at most 10 s, to end the test)
        if os.path.exists(os.path.join(HERE, "release")):
            break
        time.sleep(0.01)


def request_hook(payload):
    blocked_until_released("request")
    payload["hooked"] = True


def response_hook(answer):
    blocked_until_released("response")
    answer["hooked"] = True
'''


def test_a_hung_request_or_response_hook_stalls_no_one_and_is_skipped_from_then_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cp, "HOOK_TIMEOUT", 0.3, raising=False)
    folder = tmp_path / "home" / "plugins"
    folder.mkdir(parents=True)
    (folder / "slow.py").write_text(SLOW_HOOKS_PLUGIN)

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                hooked = asyncio.ensure_future(call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS))
                await asyncio.sleep(0.05)
                assert (await call(port, "GET", "/health"))[0] == 200
                served_meanwhile = not hooked.done()                  # the loop was free while the hook hung
                status, _, body = await hooked
                again = await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
                return served_meanwhile, status, json.loads(body), again, [r["body"] for r in up.requests]
    try:
        with caplog.at_level(logging.WARNING, logger="claude_proxy"):
            served_meanwhile, status, answer, again, sent = run(scenario())
    finally:
        (folder / "release").touch()
    assert served_meanwhile and status == 200 and again[0] == 200
    assert "hooked" not in answer and "hooked" not in json.loads(again[2])
    assert all("hooked" not in body for body in sent)                  # went on as if unhooked
    assert (folder / "request.calls").read_text() == "x" and (folder / "response.calls").read_text() == "x"
    for kind in ("request_hook", "response_hook"):
        assert f"plugin slow.py: {kind} took over 0.3s; it is skipped from now on" in caplog.text


SLOW_STREAM_PLUGIN = '''
import os
import time
HERE = os.path.dirname(os.path.abspath(__file__))


def stream_event_hook(event):
    with open(os.path.join(HERE, "stream.calls"), "a") as fh:
        fh.write("x")
    time.sleep(0.2)
    if event.get("type") == "content_block_delta":
        event["delta"]["text"] = event["delta"]["text"].upper()
'''


def test_a_stream_hook_over_its_budget_on_the_loop_is_skipped_from_the_next_event(tmp_path, caplog):
    folder = tmp_path / "home" / "plugins"
    folder.mkdir(parents=True)
    (folder / "slowstream.py").write_text(SLOW_STREAM_PLUGIN)

    async def scenario():
        async with FakeUpstream(lambda req: Stream(anthropic_stream("hello there"))) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                first = await call(port, "POST", "/v1/messages", dict(HELLO, stream=True), ANTHROPIC_HEADERS)
                second = await call(port, "POST", "/v1/messages", dict(HELLO, stream=True), ANTHROPIC_HEADERS)
                return first, second
    with caplog.at_level(logging.WARNING, logger="claude_proxy"):
        first, second = run(scenario())
    assert first[0] == second[0] == 200
    assert sse_events(first[2])[-1][0] == "message_stop" and b"hello there" in second[2]
    assert (folder / "stream.calls").read_text() == "x"                 # one event, then skipped
    assert "plugin slowstream.py: stream_event_hook took" in caplog.text and "budget is 50 ms" in caplog.text

def test_rows_wait_while_another_process_holds_usage_db_and_a_real_drop_is_said(tmp_path, monkeypatch, caplog):
    import sqlite3
    path = str(tmp_path / "h" / "usage.db")
    ledger = cp.UsageLedger(path, clock=lambda: 86400.0 * 100, interval=0.02, busy_timeout=0.05, retry_interval=0.05)
    ledger.add(usage_row(86400.0 * 100, "first"))
    assert ledger.flush() and ledger.rows_written == 1
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")                     # another process writing, for as long as it likes
    with caplog.at_level(logging.WARNING, logger="claude_proxy"):
        for _ in range(202):
            ledger.add(usage_row(86400.0 * 100, "m"))
        assert ledger.flush() and ledger.error and ledger.rows_pending == 202
        monkeypatch.setattr(cp, "LEDGER_MAX_PENDING", 250, raising=False)
        for _ in range(60):
            ledger.add(usage_row(86400.0 * 100, "m"))
        assert ledger.flush() and ledger.rows_pending == 250 and ledger.rows_dropped == 12
        locker.execute("ROLLBACK")
        locker.close()
        for _ in range(100):                               # the retry comes on its own
            if ledger.rows_written == 251:
                break
            time.sleep(0.02)
        ledger.close()
    assert ledger.rows_written == 251 and ledger.totals()["requests"] == 251 and ledger.error is None
    said = [r.getMessage() for r in caplog.records if "usage ledger" in r.getMessage()]
    assert "is unusable" in said[0] and "rows kept and tried again" in said[0]
    assert any("12 rows not recorded (past the 250 rows kept for a retry" in line for line in said)
    assert "works again; the 250 rows kept meanwhile are written" in said[-1]


def test_stored_responses_waiting_for_a_lock_never_hold_up_a_conversion(tmp_path):
    import sqlite3
    store = cp.ResponseStore(str(tmp_path / "home" / "responses.db"), max_bytes=10 ** 6, max_age=100.0)
    store.put({"id": "resp_0", "output": []}, [], "owner")
    locker = sqlite3.connect(store.path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")                     # another proxy process holds the write lock

    async def scenario():
        writes = [asyncio.ensure_future(store.call(store.put, {"id": f"resp_{i}", "output": []}, [], "owner"))
                  for i in range(1, 13)]
        await asyncio.sleep(0.1)
        try:                                               # a large body's conversion, meanwhile
            converted = await asyncio.wait_for(cp.run_off_loop(lambda: "converted"), 5)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        await asyncio.gather(*writes)
        store.close()
        return converted
    assert run(scenario()) == "converted"
    assert all(store.get(f"resp_{i}", "owner") for i in range(13))


def test_cors_origins_open_the_api_only_never_the_page_the_stats_or_the_login(tmp_path):
    app = "https://app.example"

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            async with running_proxy(make_config(tmp_path, up.url, cors_origins=[app])) as (_, port):
                cors = {"origin": app}
                status, headers, _ = await call(port, "POST", "/v1/messages", HELLO, dict(ANTHROPIC_HEADERS, **cors))
                assert status == 200 and headers["access-control-allow-origin"] == app
                status, headers, _ = await call(port, "OPTIONS", "/v1/chat/completions", headers=cors)
                assert status == 204 and headers["access-control-allow-origin"] == app
                for method, path in (("GET", "/auth/status"), ("GET", "/auth/start"), ("POST", "/auth/logout"),
                                     ("GET", "/v1/stats"), ("GET", "/status.json"), ("GET", "/test-connection"),
                                     ("OPTIONS", "/auth/status"), ("OPTIONS", "/v1/stats")):
                    status, headers, _ = await call(port, method, path, headers=cors)
                    assert status in (403, 404) and "access-control-allow-origin" not in headers, (method, path, status)
                assert (await call(port, "GET", "/v1/stats"))[0] == 200            # the proxy's own user: served
    run(scenario())


def test_the_status_page_takes_its_own_origin_only_port_included_and_the_servers_host_rule(tmp_path):
    async def scenario():
        async with running_proxy(make_config(tmp_path, cors_origins=["*"])) as (_, port):
            async def page(origin=None, host=f"127.0.0.1:{port}", path="/status.json", method="GET", body=b""):
                headers = [f"host: {host}"] + ([f"origin: {origin}"] if origin else [])
                form = [f"content-length: {len(body)}", "content-type: application/x-www-form-urlencoded"]
                headers += form if body else []
                answer = await raw_request(port, head_bytes(method, path, headers + ["connection: close"], body))
                return int(answer.split(b" ", 2)[1]), answer
            assert (await page())[0] == 200
            assert (await page(f"http://127.0.0.1:{port}"))[0] == 200               # its own origin
            assert (await page(f"http://localhost:{port}", host=f"localhost:{port}"))[0] == 200
            assert (await page("http://1.2.3.4"))[0] == 403                         # any IP literal: no
            assert (await page(f"http://127.0.0.1:{port + 1}"))[0] == 403           # another port: no
            assert (await page(f"http://127.0.0.1"))[0] == 403
            status, answer = await page("http://1.2.3.4", path="/", method="POST", body=b"key=x")
            assert status == 403 and b"set-cookie" not in answer.lower()
            assert (await page(host=f"proxy.localhost:{port}"))[0] == 200           # the server's host rule
            assert (await page(host=f"127.1:{port}"))[0] == 200
            assert (await page(host=f"evil.example:{port}"))[0] == 403
    run(scenario())


OTHER_ORIGIN_PAGE = """<!doctype html><html><body><pre id="out">...</pre><script>
const out = [];
async function probe(name, path, options) {
  try { const r = await fetch("%s" + path, options); out.push(name + " READ " + r.status + " " + (await r.text()).length); }
  catch (e) { out.push(name + " BLOCKED"); }
}
(async () => {
  await probe("api", "/v1/messages", {method: "POST", headers: {"content-type": "application/json"},
              body: JSON.stringify({model: "claude-x", max_tokens: 5, messages: [{role: "user", content: "hi"}]})});
  await probe("status", "/status.json", {});
  await probe("stats", "/v1/stats", {});
  await probe("login", "/auth/status", {});
  document.getElementById("out").textContent = out.join("\\n");
})();
</script></body></html>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed")
def test_a_page_of_another_origin_in_a_real_browser_reads_the_api_by_cors_but_never_the_operations(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            async with running_proxy(make_config(tmp_path, up.url, cors_origins=["*"])) as (_, port):
                page = (OTHER_ORIGIN_PAGE % f"http://127.0.0.1:{port}").encode()

                async def serve_page(reader, writer):
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(http_response(200, page, content_type="text/html"))
                    await writer.drain()
                    writer.close()
                other = await asyncio.start_server(serve_page, "127.0.0.1", 0)      # another origin: another port
                try:
                    return await run_chromium(tmp_path, f"http://127.0.0.1:{other.sockets[0].getsockname()[1]}/",
                                              "--dump-dom")
                finally:
                    other.close()
    dom = run(scenario())
    assert "api READ 200" in dom, dom
    assert "status BLOCKED" in dom and "stats BLOCKED" in dom and "login BLOCKED" in dom, dom


@pytest.mark.parametrize("method, path, refused", [
    ("GET", "/status.json", True), ("GET", "/v1/stats", True), ("GET", "/test-connection", True),
    ("GET", "/v1/stats/session", True), ("GET", "/metrics", True), ("GET", "/auth/status", True), ("GET", "/auth/start", True), ("POST", "/auth/callback", True),
    ("POST", "/auth/logout", True), ("GET", "/", False), ("GET", "/health", False),
    ("POST", "/v1/messages", False), ("GET", "/v1/models", False),
])
def test_one_access_rule_for_every_operations_endpoint_of_an_exposed_proxy(tmp_path, method, path, refused):
    keyless, keyed = make_config(tmp_path), make_config(tmp_path, proxy_api_key=PROXY_KEY_19)
    remote = cp.Request(method, path, {"host": "10.0.0.5:8082"}, b"", "10.0.0.9")
    if refused:
        with pytest.raises(cp.PermissionDenied, match="loopback"):
            cp.check_access(keyless, remote)
    else:
        cp.check_access(keyless, remote)
    cp.check_access(keyless, cp.Request(method, path, {}, b"", "127.0.0.1"))               # this machine
    cp.check_access(keyed, cp.Request(method, path, {"x-api-key": PROXY_KEY_19}, b"", "10.0.0.9"))

# =============================================================================================
# 8. Drop-in for the five systems it replaces, and a first run that explains itself (issue 11)
# =============================================================================================

@contextlib.asynccontextmanager
async def proxy_process(cwd, args=(), env=None, port=None):
    """`python3 claude_proxy.py ARGS` in `cwd` with only `env` (plus PATH, HOME); yields
    (port, stderr lines so far) once the start-up summary is printed."""
    full_env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd), "CLAUDE_PROXY_HOME": str(cwd / "home")}
    full_env.update(env or {})
    process = await asyncio.create_subprocess_exec(sys.executable, os.path.join(HERE, "claude_proxy.py"), *args,
                                                   cwd=str(cwd), env=full_env, stderr=asyncio.subprocess.PIPE)
    lines = []

    async def pump():
        async for line in process.stderr:
            lines.append(line.decode("utf-8", "replace").rstrip("\n"))
    pumping = asyncio.ensure_future(pump())
    try:
        deadline = time.monotonic() + 15
        while not any("OpenAI SDKs and Codex:" in line for line in lines):     # the start-up's last line
            assert process.returncode is None and time.monotonic() < deadline, "\n".join(lines)
            await asyncio.sleep(0.05)
        listening = next(line for line in lines if "listening on" in line)
        yield int(re.search(r":(\d+)\b", listening.split("listening on", 1)[1]).group(1)), lines
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 15)
        await pumping


def cli_run(cwd, *args, env=None):
    """`python3 claude_proxy.py ARGS` to completion: (exit code, stdout, stderr)."""
    full_env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd), "CLAUDE_PROXY_HOME": str(cwd / "home")}
    full_env.update(env or {})
    done = subprocess.run([sys.executable, os.path.join(HERE, "claude_proxy.py"), *args], cwd=str(cwd),
                          env=full_env, capture_output=True, text=True, timeout=30)
    return done.returncode, done.stdout, done.stderr


# ---- observed failures -------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--port", "{port}", "serve"], ["serve", "--port", "{port}"],
                                  ["-p", "{port}"], ["--bind", "127.0.0.1", "--port", "{port}", "--headless",
                                                     "--token", "sk-ant-oat01-" + "t" * 30]])
def test_global_flags_work_before_or_after_the_command(tmp_path, argv):
    port = free_port()

    async def scenario():
        async with proxy_process(tmp_path, [a.format(port=port) for a in argv]) as (listening, _):
            assert listening == port
    run(scenario())


def test_a_log_file_path_naming_a_directory_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "logs").mkdir()
    code, _, err = cli_run(tmp_path, "--port", str(free_port()), env={"LOG_FILE_PATH": "logs"})
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "log file (environment $LOG_FILE_PATH): logs is a directory" in err and "logs/claude_proxy.log" in err


def test_config_given_before_serve_is_read(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"providers": {"o": {"base_url": "http://127.0.0.1:9/v1"}},
                                                 "routes": {"default": "o"}}))
    code, out, _ = cli_run(tmp_path, "--config", "a.json", "check-config")
    assert code == 0 and json.loads(out)["routes"] == {"default": "o"}
    code, out, _ = cli_run(tmp_path, "--config", "a.json", "--debug", "check-config", "--port", "9001")
    shown = json.loads(out)
    assert shown["settings"]["log_level"] == "DEBUG" and shown["settings"]["port"] == 9001


def test_help_lists_every_command_with_a_line_and_the_seed_flags(tmp_path):
    code, out, _ = cli_run(tmp_path, "--help")
    assert code == 0
    for command in cp.CLI_COMMANDS:
        assert re.search(rf"^\s+{re.escape(command)}\s+\S", out, re.M), command
    for flag in ("--bind", "--headless", "--debug", "--setup-token", "--no-auto-start"):
        assert flag in out


def test_a_lone_router_variable_keeps_the_default_route(tmp_path):
    config = cp.load_config(None, {"CLAUDE_PROXY_HOME": str(tmp_path), "ROUTER_BACKGROUND": "anthropic,claude-haiku-4-5"})
    assert set(config.routes) == {"default", "background"}
    assert cp.resolve_target(config, "claude-opus-4-5").provider["name"] == "anthropic"
    assert cp.resolve_target(config, "claude-haiku-4-5").route == "background"


def test_dotenv_inline_comments_and_urls_with_spaces(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text('OPENAI_BASE_URL=http://127.0.0.1:9/v1 # my local vllm\nBIG_MODEL="qwen3"  # big\n')
    config = cp.load_config(None, {"CLAUDE_PROXY_HOME": str(tmp_path)})
    assert config.providers["openai"]["base_url"] == "http://127.0.0.1:9/v1" and "qwen3" in config.models
    with pytest.raises(cp.ConfigError, match="without spaces"):
        cp.parse_config({"providers": {"x": {"base_url": "http://host/v1 # note"}}}, {})


@pytest.mark.parametrize("content, words", [
    ("[1, 2]", "expected a JSON object at the top level, found list"),
    ('"x"', "expected a JSON object at the top level, found str"),
    ("{nope", "invalid JSON"),
])
def test_bad_config_files_are_one_line_and_exit_2(tmp_path, content, words):
    (tmp_path / "c.json").write_text(content)
    code, _, err = cli_run(tmp_path, "--config", "c.json", "check-config")
    assert code == 2 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = cli_run(tmp_path, "--config", "missing.json")
    assert code == 2 and "missing.json" in err and "Traceback" not in err


def test_unknown_keys_are_named_with_the_nearest_known_key_and_strict_refuses_them(tmp_path):
    raw = {"provders": {}, "models": [{"id": "m", "provider": "anthropic", "model_name": "x", "direct": True,
                                        "can_stream": False}], "providers": {"anthropic": {"base_ur": "x"}}}
    config = cp.parse_config(raw, {})
    assert "provders: unknown key, ignored (did you mean providers?)" in config.warnings
    assert "models.0.model_name: unknown key, ignored (did you mean model?)" in config.warnings
    assert any(w.startswith("models.0.direct: unknown key") and "format" in w for w in config.warnings)
    assert any(w.startswith("providers.anthropic.base_ur:") and "base_url" in w for w in config.warnings)
    assert not any("can_stream" in w for w in config.warnings)          # a key claude_proxy reads
    with pytest.raises(cp.ConfigError, match="strict config: provders"):
        cp.parse_config(dict(raw, strict=True), {})
    (tmp_path / "c.json").write_text(json.dumps({"provders": {}}))
    code, _, err = cli_run(tmp_path, "--config", "c.json", "--strict", "check-config")
    assert code == 2 and "did you mean providers" in err


@pytest.mark.parametrize("auth", [{"auth": "api_key"}, {}])     # a named key source means api_key
def test_a_provider_without_its_key_is_reported_at_start_and_refused_at_once(tmp_path, caplog, auth):
    config = make_config(tmp_path, providers={"v": dict({"format": "openai", "base_url": "http://127.0.0.1:9/v1",
                                                         "api_key_env": "VENDOR_KEY"}, **auth)},
                         routes={"default": "v"})
    assert config.providers["v"]["auth"] == "api_key"
    assert any("$VENDOR_KEY is not set" in w for w in config.warnings)

    async def scenario():
        async with running_proxy(config) as (server, port):
            lines = "\n".join(line for _, line in cp.startup_summary(server, "127.0.0.1", port))
            assert "$VENDOR_KEY is not set" in lines and "API key missing" in lines
            with caplog.at_level(logging.WARNING, logger="claude_proxy"):
                status, headers, body = await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
            assert status == 400 and headers["x-should-retry"] == "false"
            assert "provider 'v' has no API key ($VENDOR_KEY is not set)" in json.loads(body)["error"]["message"]
            assert "$VENDOR_KEY is not set" in caplog.text
    run(scenario())


def test_dns_failures_read_as_such(tmp_path):
    async def scenario():
        pool = cp.ConnectionPool(lambda: None, {}, 5.0, 5.0)
        with pytest.raises(UpstreamError, match=r"cannot resolve nonexistent\.invalid \(no network, or a wrong base_url\?\)"):
            await pool.connect(("http", "nonexistent.invalid", 80))
    run(scenario())


def test_first_run_summary(tmp_path):
    config = make_config(tmp_path, providers=dict(openai_provider("http://127.0.0.1:9"),
                                                  k={"format": "openai", "base_url": "http://127.0.0.1:9/v1",
                                                     "api_key": "sk-secret-in-config-0000"}),
                         routes={"default": "anthropic", "haiku": "o,small"})

    async def scenario():
        async with running_proxy(config) as (server, port):
            return "\n".join(line for _, line in cp.startup_summary(server, "127.0.0.1", port))
    text = run(scenario())
    assert f"listening on http://127.0.0.1:" in text and "files: config none (built-in defaults), .env none" in text
    assert "haiku" in text and "-> o/small" in text and "API key in the config" in text
    assert "ANTHROPIC_BASE_URL=http://127.0.0.1:" in text and "claude" in text
    assert "sk-secret-in-config" not in text and OPENAI_PROVIDER_KEY not in text


def claude_code_line(config, login=None):
    """The start-up's Claude Code line for a config (with a saved login when `login` is given)."""
    if login:
        cp.TokenStore(os.path.join(config.home, "oauth_token.json")).save(login)

    async def scenario():
        async with running_proxy(config) as (server, port):
            lines = [line for _, line in cp.startup_summary(server, "127.0.0.1", port)]
            return next(line for line in lines if line.startswith("Claude Code: ")), port
    return run(scenario())


def test_the_claude_code_line_gets_it_past_its_login_check(tmp_path):
    """Claude Code with no login of its own and no key says "Not logged in · Please run /login"
    before sending anything: where the proxy holds the credentials, the line gives it a token."""
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": "sk-o-123456789", "BIG_MODEL": "m",
           "SMALL_MODEL": "m", "CLAUDE_PROXY_HOME": str(tmp_path / "q")}
    line, port = claude_code_line(cp.load_config(None, env))                    # the env-only quick start
    assert line.startswith(f"Claude Code: ANTHROPIC_BASE_URL=http://127.0.0.1:{port} ANTHROPIC_AUTH_TOKEN=unused claude")
    line, port = claude_code_line(make_config(tmp_path / "z"))                  # zero config: the client's own key
    assert line.startswith(f"Claude Code: ANTHROPIC_BASE_URL=http://127.0.0.1:{port} claude ")
    assert "its own key (its Claude login, ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN) is passed on" in line
    line, _ = claude_code_line(make_config(tmp_path / "l"), login=saved_record())   # the proxy's login serves
    assert "ANTHROPIC_AUTH_TOKEN=unused claude" in line
    line, _ = claude_code_line(make_config(tmp_path / "k", proxy_api_key="pk-0123456789abcdef"))
    assert "ANTHROPIC_AUTH_TOKEN=<the proxy key> claude" in line


def test_doctor_says_how_to_start_claude_code_when_this_shell_has_no_key(tmp_path):
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": "sk-o-123456789", "BIG_MODEL": "m"}
    _, out, _ = cli_run(tmp_path, "doctor", env=env)
    note = [line for line in out.splitlines() if line.startswith("note claude code")]
    assert len(note) == 1 and "Not logged in" in note[0] and "ANTHROPIC_AUTH_TOKEN=unused claude" in note[0], out
    assert "ANTHROPIC_BASE_URL=http://127.0.0.1:8082 " in note[0]
    for extra in ({"ANTHROPIC_AUTH_TOKEN": "x"}, {"ANTHROPIC_API_KEY": "sk-ant-x"}):
        assert "note claude code" not in cli_run(tmp_path, "doctor", env=dict(env, **extra))[1]
    (tmp_path / ".claude").mkdir()
    (tmp_path / ".claude" / ".credentials.json").write_text("{}")               # Claude Code's own login
    assert "note claude code" not in cli_run(tmp_path, "doctor", env=env)[1]


@pytest.mark.parametrize("var", ["OPENAI_API_KEY", "GEMINI_API_KEY"])
def test_a_provider_key_alone_is_said_to_be_unused(tmp_path, var):
    config = cp.load_config(None, {"CLAUDE_PROXY_HOME": str(tmp_path), var: "k-o-123456789"})
    assert [w for w in config.warnings if w.startswith(f"{var} is set but nothing uses it")], config.warnings
    used = cp.parse_config({"providers": {"g": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": var}}}, {var: "k"})
    assert not [w for w in used.warnings if "nothing uses it" in w]


def test_seed_yaml_subset_reader():
    text = """---
# a comment
- model_id: deepseek-v3   # trailing comment
  model_name: "deepseek-chat"
  api_base: 'https://api.deepseek.com/v1'
  max_tokens: 8k
  can_stream: no
  input_cost_per_token: 0.00000027
  extra_body:
    temperature: 0.7
    tag: "a # not a comment"
  direct: false
-
  model_id: x
  api_base: http://h
"""
    assert cp.parse_yaml_models(text, "m.yaml") == [
        {"model_id": "deepseek-v3", "model_name": "deepseek-chat", "api_base": "https://api.deepseek.com/v1",
         "max_tokens": "8k", "can_stream": False, "input_cost_per_token": 2.7e-07,
         "extra_body": {"temperature": 0.7, "tag": "a # not a comment"}, "direct": False},
        {"model_id": "x", "api_base": "http://h"}]


@pytest.mark.parametrize("text, line, words", [
    ("model_id: x\n", 1, "expected a list of models"),
    ("- model_id: x\n  tools: [a, b]\n", 2, "beyond what claude_proxy reads"),
    ("- model_id: &a x\n", 1, "beyond"),
    ("- model_id: x\n  note: |\n    text\n", 2, "beyond"),
    ("- model_id: x\n  extra_body:\n    a:\n      b: 1\n", 4, "one nested mapping level"),
    ("- model_id: x\n\tapi_base: h\n", 2, "tab"),
    ("- model_id: x\n  model_id: y\n", 2, "appears twice"),
    ("- model_id: 'x\n", 1, "unterminated"),
])
def test_seed_yaml_beyond_the_subset_is_refused_with_its_line(text, line, words):
    with pytest.raises(cp.ConfigError) as err:
        cp.parse_yaml_models(text, "m.yaml")
    assert f"m.yaml:{line}:" in str(err.value) and words in str(err.value)


def test_max_input_tokens_is_a_400_before_the_upstream_is_called(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: Stream(openai_stream_chunks())) as up:
            config = make_config(tmp_path, None, providers=openai_provider(up.url),
                                 models=[{"id": "small-ctx", "provider": "o", "max_input_tokens": 100}])
            async with running_proxy(config) as (_, port):
                big = dict(HELLO, model="small-ctx", messages=[{"role": "user", "content": "word " * 2000}])
                status, _, body = await call(port, "POST", "/v1/messages", big, ANTHROPIC_HEADERS)
                assert status == 400 and "prompt is too long" in body.decode() and "100 max_input_tokens" in body.decode()
                status, _, _ = await call(port, "POST", "/v1/chat/completions",
                                          dict(big, messages=[{"role": "user", "content": "w " * 2000}]), OPENAI_HEADERS)
                assert status == 400 and up.requests == []
    run(scenario())


@pytest.mark.parametrize("client", ["anthropic", "openai"])
@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_can_stream_false_calls_the_upstream_whole_and_streams_to_the_client(tmp_path, client, provider):
    def script(req):
        assert not req["body"].get("stream") and "stream_options" not in req["body"]
        return http_response(200, anthropic_message() if provider == "anthropic" else OPENAI_COMPLETION)

    async def scenario():
        async with FakeUpstream(script) as up:
            providers = {"p": {"format": provider, "base_url": up.url + ("/v1" if provider == "openai" else ""),
                               "api_key": "k-123456789"}}
            config = make_config(tmp_path, None, providers=providers, routes={"default": "whole"},
                                 models=[{"id": "whole", "provider": "p", "can_stream": False}])
            async with running_proxy(config) as (_, port):
                path, body, headers = client_request(client, True)
                status, resp_headers, streamed = await call(port, "POST", path, dict(body, model="whole"), headers)
            assert_success(client, True, status, resp_headers, streamed)
            assert len(up.requests) == 1
    run(scenario())


# ---- the five systems, started as their READMEs tell their users --------------------------------

def test_seed_000_anthropic_claude_max_proxy_user(tmp_path):
    """cp models.example.json models.json; python cli.py --headless --bind 127.0.0.1 (TOKEN_FILE kept)."""
    now = time.time()
    (tmp_path / "tokens.json").write_text(json.dumps({"token_type": "oauth_flow", "access_token": "sk-ant-oat01-seed000tok",
                                                      "refresh_token": "sk-ant-ort01-seed000", "expires_at": int(now + 3600)}))

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as claude, \
                FakeUpstream(lambda req: http_response(200, OPENAI_COMPLETION)) as glm:
            (tmp_path / "models.json").write_text(json.dumps({"_comment": "seed 000", "custom_models": [
                {"id": "glm-4.6", "base_url": glm.url + "/api/paas/v4", "api_key": "zai-key-0123456789",
                 "context_length": 200000, "max_completion_tokens": 8192, "supports_reasoning": True, "owned_by": "zai"}]}))
            env = {"TOKEN_FILE": str(tmp_path / "tokens.json"), "ANTHROPIC_UPSTREAM_URL": claude.url}
            async with proxy_process(tmp_path, ["--headless", "--bind", "127.0.0.1", "--port", str(free_port())],
                                     env) as (port, lines):
                status, _, _ = await call(port, "POST", "/v1/chat/completions",
                                          dict(OPENAI_HELLO, model="glm-4.6"), OPENAI_HEADERS)
                assert status == 200 and glm.requests[0]["path"] == "/api/paas/v4/chat/completions"
                assert glm.requests[0]["headers"]["authorization"] == "Bearer zai-key-0123456789"
                status, _, _ = await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
                assert status == 200 and claude.requests[0]["headers"]["authorization"] == "Bearer sk-ant-oat01-seed000tok"
                assert any("model file" in line and "models.json" in line for line in lines)
    run(scenario())
    assert json.loads((tmp_path / "tokens.json").read_text())["access_token"] == "sk-ant-oat01-seed000tok"   # read only


def test_seed_001_models_yaml_user(tmp_path):
    """.env with ROUTER_* and keys; models.yaml with direct, can_stream and reasoning_effort: minimal."""
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, OPENAI_COMPLETION)) as ds, \
                FakeUpstream(lambda req: http_response(200, anthropic_message())) as direct:
            (tmp_path / "models.yaml").write_text(f"""# Required fields: model_id, api_base, api_key_name
- model_id: deepseek-v3
  model_name: deepseek-chat
  api_base: {ds.url}/v1
  api_key_name: DEEPSEEK_API_KEY
  can_stream: false
  max_tokens: 8k
  max_input_tokens: 128k
  reasoning_effort: "minimal"   # minimal = no thinking
  input_cost_per_token: 0.00000027
  output_cost_per_token: 0.00000055
  extra_headers:
    X-Title: "Claude Code"

- model_id: claude-direct
  model_name: claude-sonnet-4-5-20250929
  api_base: {direct.url}/v1
  api_key_name: ANTHROPIC_API_KEY
  direct: true
""")
            (tmp_path / ".env").write_text('DEEPSEEK_API_KEY="ds-key-0123456789"\nANTHROPIC_API_KEY=sk-ant-direct-0123456\n'
                                           'ROUTER_BACKGROUND="deepseek-v3"  # haiku\nROUTER_DEFAULT="claude-direct"\n'
                                           'ROUTER_THINK=deepseek-v3\n')
            async with proxy_process(tmp_path, ["--port", str(free_port())]) as (port, _):
                haiku = dict(HELLO, model="claude-haiku-4-5", max_tokens=32000, stream=True,
                             thinking={"type": "enabled", "budget_tokens": 2048})
                status, headers, body = await call(port, "POST", "/v1/messages", haiku, ANTHROPIC_HEADERS)
                assert_success("anthropic", True, status, headers, body)
                sent = ds.requests[0]
                assert sent["body"]["model"] == "deepseek-chat" and sent["body"]["max_tokens"] == 8192
                assert "stream" not in sent["body"] and "reasoning_effort" not in sent["body"]
                assert sent["headers"]["authorization"] == "Bearer ds-key-0123456789" and sent["headers"]["x-title"] == "Claude Code"
                status, _, _ = await call(port, "POST", "/v1/messages", dict(HELLO, model="claude-opus-4-5"), ANTHROPIC_HEADERS)
                assert status == 200 and direct.requests[0]["body"]["model"] == "claude-sonnet-4-5-20250929"
                assert direct.requests[0]["headers"]["x-api-key"] == "sk-ant-direct-0123456"
    run(scenario())


SEED_001_CCPROXY_README = """\
# Required fields: model_id, api_base
# API Key Configuration:
# - api_key: Optional per-model API key. If set, it takes precedence over request headers.
# - If api_key is not set, the key from the Authorization header (via ccproxy) is used.
# direct: true for Anthropic-compatible APIs, false for OpenAI-compatible
"""       # seed 001's README, "models.yaml" (its recommended ccproxy mode: keys come with each request)


def test_seed_001_ccproxy_mode_sends_each_clients_key_never_a_shared_one(tmp_path):
    """models.yaml without api_key_name: the key the client sends goes to that entry's provider,
    in its dialect; $OPENAI_API_KEY / $ANTHROPIC_API_KEY in the environment go nowhere."""
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, OPENAI_COMPLETION)) as ds, \
                FakeUpstream(lambda req: http_response(200, anthropic_message())) as kimi:
            (tmp_path / "models.yaml").write_text(SEED_001_CCPROXY_README + f"""
- model_id: deepseek-chat
  model_name: deepseek-chat
  api_base: {ds.url}/v1
  direct: false
  max_tokens: 8K
- model_id: kimi-k2-direct
  model_name: kimi-k2-0711-preview
  api_base: {kimi.url}/anthropic
  direct: true
  max_tokens: 16k
- model_id: keyed
  api_base: {ds.url}/v1
  api_key: sk-in-the-file-0123456
- model_id: elsewhere
  api_base: http://vendor.invalid/v1
""")
            env = {"OPENAI_API_KEY": "sk-shared-openai-0000", "ANTHROPIC_API_KEY": "sk-ant-shared-0000",
                   "ROUTER_DEFAULT": "deepseek-chat"}
            code, out, err = cli_run(tmp_path, "check-config", env=env)
            providers = json.loads(out)["providers"]
            host = "127.0.0.1"
            assert code == 0 and {p["auth"] for n, p in providers.items() if n.startswith(host)} == {"client", "api_key"}
            assert all("each client's own key" in p["credentials"] for p in providers.values() if p["auth"] == "client")
            assert "OPENAI_API_KEY is set but nothing uses it" in err
            async with proxy_process(tmp_path, ["--port", str(free_port())], env) as (port, lines):
                bearer = dict(ANTHROPIC_HEADERS, authorization="Bearer ds-key-from-ccproxy")
                keyed = dict(ANTHROPIC_HEADERS, **{"x-api-key": "client-key-0123456"})
                for model, headers in (("claude-sonnet-4-5", bearer), ("deepseek-chat", keyed),
                                       ("kimi-k2-direct", keyed), ("keyed", bearer)):
                    status, _, body = await call(port, "POST", "/v1/messages", dict(HELLO, model=model), headers)
                    assert status == 200, body
                login = dict(bearer, authorization="Bearer sk-ant-oat01-" + "c" * 40)    # a Claude login
                status, _, body = await call(port, "POST", "/v1/messages", dict(HELLO, model="elsewhere"), login)
                assert status == 400 and "never sent to vendor.invalid" in body.decode()     # refused before any DNS
                assert not any("ANTHROPIC_API_KEY is the key clients must send" in line for line in lines)
        sent = [r["headers"] for r in ds.requests] + [r["headers"] for r in kimi.requests]
        assert [h.get("authorization") for h in sent[:3]] == ["Bearer ds-key-from-ccproxy", "Bearer client-key-0123456",
                                                              "Bearer sk-in-the-file-0123456"]
        assert sent[3]["x-api-key"] == "client-key-0123456" and "authorization" not in sent[3]
        assert "shared" not in json.dumps(sent)
    run(scenario())


@pytest.mark.parametrize("azure", [False, True])
def test_seed_002_claude_code_proxy_user(tmp_path, azure):
    """cp .env.example .env; python start_proxy.py; ANTHROPIC_API_KEY=exact-matching-key claude."""
    async def scenario():
        async with FakeUpstream(lambda req: Stream(openai_stream_chunks())) as up:
            port = free_port()
            base = f"{up.url}/openai/deployments/gpt4o" if azure else f"{up.url}/v1"
            (tmp_path / ".env").write_text(
                f'OPENAI_API_KEY="sk-your-openai-api-key-here"\nANTHROPIC_API_KEY="client-key-0123456789"\n'
                f'OPENAI_BASE_URL="{base}"\nBIG_MODEL="gpt-4o"\nMIDDLE_MODEL="gpt-4o"\nSMALL_MODEL="gpt-4o-mini"    \n'
                f'HOST="127.0.0.1"\nPORT="{port}"\nLOG_LEVEL="INFO"  \nMAX_TOKENS_LIMIT="4096"\nMIN_TOKENS_LIMIT="1000"\n'
                f'REQUEST_TIMEOUT="90"\nCUSTOM_HEADER_X_ORG_ID=org-7\n' + ('AZURE_API_VERSION="2024-03-01-preview"\n' if azure else ""))
            async with proxy_process(tmp_path) as (listening, lines):
                assert listening == port
                assert any("ANTHROPIC_API_KEY is the key clients must send" in line for line in lines)
                assert any(f"ANTHROPIC_AUTH_TOKEN=<ANTHROPIC_API_KEY in {tmp_path / '.env'}> claude" in line for line in lines)
                status, headers, body = await call(port, "POST", "/v1/messages", HELLO,
                                                   dict(ANTHROPIC_HEADERS, **{"x-api-key": "wrong"}))
                assert status == 401 and up.requests == [] and headers.get("x-should-retry") == "false"
                assert "send the value of $ANTHROPIC_API_KEY" in json.loads(body)["error"]["message"]
                request = dict(HELLO, model="claude-sonnet-4-5", max_tokens=50, stream=True)
                status, _, _ = await call(port, "POST", "/v1/messages", request,
                                          dict(ANTHROPIC_HEADERS, **{"x-api-key": "client-key-0123456789"}))
                assert status == 200
            sent = up.requests[0]
            assert sent["body"]["model"] == "gpt-4o" and sent["body"]["max_tokens"] == 1000   # MIN_TOKENS_LIMIT floor
            assert sent["headers"]["x-org-id"] == "org-7"
            if azure:
                assert sent["path"] == "/openai/deployments/gpt4o/chat/completions?api-version=2024-03-01-preview"
                assert sent["headers"]["api-key"] == "sk-your-openai-api-key-here" and "authorization" not in sent["headers"]
            else:
                assert sent["headers"]["authorization"] == "Bearer sk-your-openai-api-key-here"
            assert "client-key-0123456789" not in json.dumps(sent["headers"])
    run(scenario())


def test_seed_003_anthropic_max_proxy_user(tmp_path):
    """ANTHROPIC_PROXY_* env, its tokens.json kept, an OpenAI client asking for claude-sonnet-4."""
    token_file = tmp_path / "anthropic-max-proxy" / "tokens.json"
    token_file.parent.mkdir()
    token_file.write_text(json.dumps({"access_token": "sk-ant-oat01-seed003tok", "refresh_token": "sk-ant-ort01-s3",
                                      "expires_at": time.time() + 3600.5}))

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as claude:
            port = free_port()
            env = {"ANTHROPIC_PROXY_HOST": "127.0.0.1", "ANTHROPIC_PROXY_PORT": str(port),
                   "ANTHROPIC_PROXY_LOG_LEVEL": "INFO", "ANTHROPIC_PROXY_TOKEN_FILE": str(token_file),
                   "ANTHROPIC_UPSTREAM_URL": claude.url}
            async with proxy_process(tmp_path, env=env) as (listening, lines):
                assert listening == port
                status, _, body = await call(port, "POST", "/v1/chat/completions",
                                             dict(OPENAI_HELLO, model="claude-sonnet-4"), OPENAI_HEADERS)
                assert status == 200, body
                sent = claude.requests[0]
                assert sent["body"]["model"] == "claude-sonnet-4-0"            # seed 003's alias, a real id
                assert sent["headers"]["authorization"] == "Bearer sk-ant-oat01-seed003tok"
                assert "oauth-2025-04-20" in sent["headers"]["anthropic-beta"]
                assert any("imported" in line and str(token_file) in line for line in lines)
    run(scenario())


def test_seed_004_router_user(tmp_path):
    """.env with ROUTER_*="custom/<model_id>" and LONG_CONTEXT_THRESHOLD, custom_models.yaml via
    CUSTOM_MODELS_FILE, LOG_FILE_PATH; a long thinking request goes to long_context, not think."""
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, OPENAI_COMPLETION)) as up:
            (tmp_path / "custom_models.yaml").write_text("".join(f"""
- model_id: {name}
  model_name: {name}-upstream
  api_base: "{up.url}/v1"
  can_stream: true
  api_key_name: MY_API_KEY
  max_tokens: 16384
  input_cost_per_token: 0.0000025  # $ per token
""" for name in ("bg", "think", "long", "main")))
            (tmp_path / ".env").write_text(
                'MY_API_KEY="my-key-0123456789"\nROUTER_BACKGROUND="custom/bg"  # Default for haiku\n'
                'ROUTER_THINK="custom/think"\nROUTER_LONG_CONTEXT="custom/long"\nROUTER_DEFAULT="custom/main"\n'
                'LONG_CONTEXT_THRESHOLD="1000"  # Tokens\nCUSTOM_MODELS_FILE="custom_models.yaml"\n'
                'LOG_FILE_PATH="logs/server.log"\n')
            async with proxy_process(tmp_path, ["--port", str(free_port())]) as (port, _):
                thinking = {"type": "enabled", "budget_tokens": 2048}
                long_request = dict(HELLO, thinking=thinking, messages=[{"role": "user", "content": "word " * 4000}])
                for body in (long_request, dict(HELLO, thinking=thinking), dict(HELLO, model="claude-3-5-haiku")):
                    status, _, _ = await call(port, "POST", "/v1/messages", body, ANTHROPIC_HEADERS)
                    assert status == 200
            assert [r["body"]["model"] for r in up.requests] == ["long-upstream", "think-upstream", "bg-upstream"]
            assert "listening on" in (tmp_path / "logs" / "server.log").read_text()
    run(scenario())


def test_model_names_the_seeds_users_type_work_for_anthropic_clients_too(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as claude, \
                FakeUpstream(lambda req: http_response(200, anthropic_message())) as vendor:
            config = make_config(tmp_path, claude.url, aliases={"my-fast": "claude-haiku-4-5"},
                                 providers={"kimi": {"format": "anthropic", "base_url": vendor.url, "api_key": "kimi-key-012345"}},
                                 models=[{"id": "kimi-k2", "provider": "kimi", "max_tokens": 8192}])
            async with running_proxy(config) as (_, port):
                for name in ("claude-sonnet-4-5[1m]", "claude-sonnet-4-5-1m", "claude-sonnet-4-5-reasoning-high",
                             "claude-3.5-haiku", "my-fast", "sonnet-4-5"):
                    status, _, body = await call(port, "POST", "/v1/messages", dict(HELLO, model=name), ANTHROPIC_HEADERS)
                    assert status == 200, (name, body)
                big = dict(HELLO, model="kimi-k2", max_tokens=128000, thinking={"type": "enabled", "budget_tokens": 64000})
                assert (await call(port, "POST", "/v1/messages", big, ANTHROPIC_HEADERS))[0] == 200
            sent = claude.requests
            assert [r["body"]["model"] for r in sent] == ["claude-sonnet-4-5", "claude-sonnet-4-5", "claude-sonnet-4-5",
                                                         "claude-3-5-haiku-20241022", "claude-haiku-4-5",
                                                         "claude-sonnet-4-5-20250929"]
            assert "context-1m-2025-08-07" in sent[0]["headers"].get("anthropic-beta", "")
            assert "context-1m-2025-08-07" in sent[1]["headers"].get("anthropic-beta", "")
            assert sent[2]["body"]["thinking"] == {"type": "enabled", "budget_tokens": cp.EFFORT_BUDGET["high"]}
            assert sent[2]["body"]["max_tokens"] > cp.EFFORT_BUDGET["high"]
            assert vendor.requests[0]["body"]["max_tokens"] == 8192                     # the vendor's cap
            assert vendor.requests[0]["body"]["thinking"]["budget_tokens"] < 8192
    run(scenario())


def readme_code_blocks():
    """The README's fenced code blocks."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as fh:
        return re.findall(r"```[a-z]*\n(.*?)```", fh.read(), re.S)


def readme_first_screen():
    """The README up to its second section (what a newcomer reads before "## Clients")."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as fh:
        return fh.read().split("\n## Clients", 1)[0]


def test_readme_start_up_sample_is_what_a_zero_config_start_prints(tmp_path):
    sample = re.search(r"```text\n(.*?)```", readme_first_screen(), re.S).group(1).splitlines()

    async def scenario():
        async with running_proxy(make_config(tmp_path)) as (server, _):
            return [line for _, line in cp.startup_summary(server, "127.0.0.1", 8082)]
    assert [line.replace("INFO claude_proxy: ", "", 1) for line in sample] == run(scenario())


def test_readme_first_screen_gets_claude_code_onto_an_openai_compatible_provider(tmp_path):
    """The first screen's two commands, the provider swapped for a loopback fake: the proxy
    starts from the environment alone, and the headers Claude Code sends with the token the
    second command gives it (a Bearer) get an answer from the provider."""
    block = next(b for b in re.findall(r"```sh\n(.*?)```", readme_first_screen(), re.S) if "BIG_MODEL" in b)
    start, claude = [c.replace("\\\n", " ") for c in block.strip().split("\n\n")]
    proxy_env = dict(re.findall(r"(\w+)=(\S+)", start.split("python3", 1)[0]))
    claude_env = dict(re.findall(r"(\w+)=(\S+)", claude))
    assert set(proxy_env) == {"OPENAI_BASE_URL", "OPENAI_API_KEY", "BIG_MODEL", "SMALL_MODEL"}
    assert claude.endswith(" claude") and set(claude_env) == {"ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN"}

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, OPENAI_COMPLETION)) as up:
            env = dict(proxy_env, OPENAI_BASE_URL=up.url + "/v1", OPENAI_API_KEY="sk-or-fake-0123456")
            async with proxy_process(tmp_path, ["--port", str(free_port())], env) as (port, lines):
                said = next(line for line in lines if "Claude Code: " in line).split("Claude Code: ", 1)[1]
                assert said.startswith(f"ANTHROPIC_BASE_URL=http://127.0.0.1:{port} ANTHROPIC_AUTH_TOKEN={claude_env['ANTHROPIC_AUTH_TOKEN']} claude")
                headers = dict(ANTHROPIC_HEADERS, authorization=f"Bearer {claude_env['ANTHROPIC_AUTH_TOKEN']}")
                for model in ("claude-opus-4-5", "claude-haiku-4-5"):
                    status, _, body = await call(port, "POST", "/v1/messages", dict(HELLO, model=model), headers)
                    assert status == 200, body
        assert [r["body"]["model"] for r in up.requests] == [proxy_env["BIG_MODEL"], proxy_env["SMALL_MODEL"]]
        assert {r["headers"]["authorization"] for r in up.requests} == {"Bearer sk-or-fake-0123456"}
    run(scenario())


def test_ci_runs_exactly_the_readme_test_command():
    command = next(block.strip() for block in readme_code_blocks() if "pytest -q" in block and "pip install" in block)
    with open(os.path.join(HERE, ".ci", "run"), encoding="utf-8") as fh:
        lines = [line.strip() for line in fh if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert lines == [command] and command.startswith("python3 ")


def test_no_machine_paths_in_the_project_files():
    for name in ("claude_proxy.py", "test_claude_proxy.py", "README.md", "models.example.json"):
        with open(os.path.join(HERE, name), encoding="utf-8") as fh:
            found = re.findall(r"(?<![\w.])/(?:work|farm|root|home/\w+)/[\w./-]+", fh.read())
        assert not found, (name, found[:3])


def test_readme_quick_start_uses_python3_and_no_bare_placeholder():
    text = "".join(readme_code_blocks())
    assert "python claude_proxy.py" not in text and "python -m" not in text
    assert "<owner>" not in text and "python3 claude_proxy.py" in text
    with open(os.path.join(HERE, "claude_proxy.py"), encoding="utf-8") as fh:   # what it tells users to run, too
        assert not re.search(r"\bpython (claude_proxy\.py|-m)", fh.read())


def test_import_reads_seed_token_files_without_writing_them(tmp_path):
    seed000 = tmp_path / "000.json"
    seed000.write_text(json.dumps({"token_type": "long_term", "access_token": "sk-ant-oat01-longterm000",
                                   "expires_at": int(time.time() + 86400)}))
    before = seed000.read_text()
    code, out, err = cli_run(tmp_path, "import", str(seed000))
    assert code == 0 and '"source": "import:anthropic-claude-max-proxy"' in out and '"refreshable": false' in out
    assert seed000.read_text() == before
    expired = tmp_path / "old.json"
    expired.write_text(json.dumps({"access_token": "sk-ant-oat01-x", "expires_at": 1.0}))
    code, _, err = cli_run(tmp_path, "import", str(expired))
    assert code == 1 and "expired" in err and "Traceback" not in err


SEED_000_HEADLESS = """\
### Headless Mode Behavior
When running in headless mode:
1. Checks for authentication (env var, CLI arg, or stored tokens)
...
4. Starts server automatically (unless `--no-auto-start`)
6. Exits with error if authentication fails
"""   # seed 000's README; its .env.example: TOKEN_FILE=~/.anthropic-claude-max-proxy/tokens.json
SEED_000_NO_LOGIN = "Authentication Error: No authentication tokens found. Please login first (option 2)"  # cli/headless.py


SEED_003_TOKEN_STORAGE = "OAuth tokens are stored in `~/.config/anthropic-max-proxy/tokens.json` with 0600 permissions."


def write_seed_tokens(home, seed):
    """A token file of seed 000 or 003 in its default place under `home` (seed 000's .env.example,
    SEED_003_TOKEN_STORAGE from seed 003's README); returns (path, its bytes)."""
    path = home / (".anthropic-claude-max-proxy" if seed == "000" else ".config/anthropic-max-proxy") / "tokens.json"
    path.parent.mkdir(parents=True)
    document = {"access_token": f"sk-ant-oat01-seed{seed}default", "refresh_token": f"sk-ant-ort01-seed{seed}",
                "expires_at": int(time.time()) + 3600}
    path.write_text(json.dumps(dict(document, token_type="oauth_flow") if seed == "000" else document))
    return path, path.read_bytes()


@pytest.mark.parametrize("seed", ["000", "003"])
def test_seed_logins_in_their_default_places_are_used_at_start(tmp_path, seed):
    path, before = write_seed_tokens(tmp_path, seed)          # HOME is tmp_path; nothing names the file

    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as claude:
            args = ["--port", str(free_port())] + (["--headless"] if seed == "000" else [])
            async with proxy_process(tmp_path, args, {"ANTHROPIC_UPSTREAM_URL": claude.url}) as (port, lines):
                assert (await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS))[0] == 200
        assert claude.requests[0]["headers"]["authorization"] == f"Bearer sk-ant-oat01-seed{seed}default"
        said = [line for line in lines if "Claude login: imported from" in line]
        assert len(said) == 1 and "tokens.json" in said[0] and "only read" in said[0] and "default place" in said[0]
    run(scenario())
    assert path.read_bytes() == before


def test_headless_without_any_login_exits_as_seed_000_did(tmp_path):
    assert "Exits with error if authentication fails" in SEED_000_HEADLESS
    code, out, err = cli_run(tmp_path, "--headless", "--port", str(free_port()))
    assert code == 1 and "listening" not in err and out == ""                   # never serves with the client's key
    assert err.startswith("claude_proxy: " + SEED_000_NO_LOGIN) and "Traceback" not in err
    assert "python3 claude_proxy.py login" in err and "ANTHROPIC_OAUTH_TOKEN" in err and "import" in err

    async def scenario():     # no login needed where the provider has a key: it serves
        env = {"ANTHROPIC_API_KEY": "sk-ant-api03-key"}
        async with proxy_process(tmp_path, ["--headless", "--port", str(free_port())], env) as (port, lines):
            assert any("API key from $ANTHROPIC_API_KEY" in line for line in lines)
    run(scenario())


def test_no_auto_start_checks_the_login_and_exits(tmp_path):
    code, _, err = cli_run(tmp_path, "--headless", "--no-auto-start")
    assert code == 1 and err.startswith("claude_proxy: " + SEED_000_NO_LOGIN) and err.count("claude_proxy:") == 1
    assert "python3 claude_proxy.py import" in err
    seed = tmp_path / "pimzino" / "tokens.json"                  # anthropic-claude-max-proxy's file
    seed.parent.mkdir()
    seed.write_text(json.dumps({"access_token": "sk-ant-oat01-" + "s" * 30, "refresh_token": "sk-ant-ort01-" + "r" * 30,
                                "expires_at": int(time.time()) + 3600}))
    before = seed.read_bytes()
    code, out, err = cli_run(tmp_path, "--headless", "--no-auto-start", env={"TOKEN_FILE": str(seed)})
    assert code == 0 and "Auto-start disabled" in out, err      # imported as serve would, before checking
    assert seed.read_bytes() == before
    code, out, _ = cli_run(tmp_path, "--headless", "--no-auto-start", "--token", "sk-ant-oat01-" + "t" * 30)
    assert code == 0 and "Auto-start disabled" in out


def test_no_auto_start_names_import_for_a_seed_login_in_its_default_place(tmp_path):
    path, before = write_seed_tokens(tmp_path, "000")
    code, out, err = cli_run(tmp_path, "--headless", "--no-auto-start")
    assert code == 0 and "Auto-start disabled" in out and '"source": "import:anthropic-claude-max-proxy"' in out
    assert "python3 claude_proxy.py import ~/.anthropic-claude-max-proxy/tokens.json" in err
    assert path.read_bytes() == before

# =============================================================================================
# 9. Key pools: rotation, cooldown and failover that keep prompt caching intact (issue 15)
# =============================================================================================

KEY_A, KEY_B, KEY_C = "sk-pool-key-aaaa-1111", "sk-pool-key-bbbb-2222", "sk-pool-key-cccc-3333"


class KeyedUpstream:
    """An Anthropic-format fake that answers by the x-api-key used; `plan(key, n)` (n: that
    key's request number) returns None for a normal answer or (status, headers)."""

    def __init__(self, plan):
        self.plan, self.log, self.counts = plan, [], {}

    def __call__(self, req):
        key = req["headers"].get("x-api-key") or req["headers"].get("authorization", "")[7:]
        self.counts[key] = self.counts.get(key, 0) + 1
        session = req["headers"].get("x-claude-code-session-id")
        answer = self.plan(key, self.counts[key])
        self.log.append((session, key, answer[0] if answer else 200))
        if answer:
            status, headers = answer
            return http_response(status, {"type": "error", "error": {"type": "rate_limit_error" if status == 429 else
                                                                       "authentication_error", "message": "no"}}, headers)
        return http_response(200, anthropic_message())


def pool_config(tmp_path, url, keys, **provider):
    return make_config(tmp_path, None, max_retries=2, routes={"default": "pool"},
                       providers={"pool": dict({"format": "anthropic", "base_url": url, "api_keys": keys}, **provider)})


def session_headers(session):
    return dict(ANTHROPIC_HEADERS, **{"x-claude-code-session-id": session})


def test_key_pool_config_list_env_and_check_config_shows_last_four_only(tmp_path):
    config = cp.parse_config({"home": str(tmp_path), "providers": {"p": {
        "base_url": "http://127.0.0.1:9/v1", "api_key": KEY_A, "api_keys": [KEY_B, KEY_A], "api_key_env": "POOL_KEYS",
        "key_strategy": "round_robin"}}}, {"POOL_KEYS": f" {KEY_C} , {KEY_B} "})
    assert config.providers["p"]["api_keys"] == [KEY_A, KEY_B, KEY_C]
    shown = json.dumps(cp.redacted_config(config))
    assert '"api_keys": ["...1111", "...2222", "...3333"]' in shown
    assert all(k not in shown and k[-10:] not in shown for k in (KEY_B, KEY_C))
    assert set(config.secret_values()) >= {KEY_A, KEY_B, KEY_C}
    with pytest.raises(cp.ConfigError, match="key_strategy"):
        cp.parse_config({"providers": {"p": {"base_url": "http://h/v1", "api_keys": [KEY_A, KEY_B], "key_strategy": "random"}}}, {})


def test_a_60_request_session_survives_a_429_on_one_of_two_keys(tmp_path):
    upstream = KeyedUpstream(lambda key, n: (429, [("retry-after", "1")]) if key == KEY_A and n == 11 else None)

    async def scenario():
        async with FakeUpstream(upstream) as up:
            async with running_proxy(pool_config(tmp_path, up.url, [KEY_A, KEY_B])) as (server, port):
                for _ in range(60):
                    status, _, body = await call(port, "POST", "/v1/messages", HELLO, session_headers("s1"))
                    assert status == 200, body
                pool = server.key_pools["pool"]
                assert [k["state"] for k in pool.snapshot()] in (["cooling", "healthy"], ["healthy", "healthy"])
                await asyncio.sleep(1.1)                         # A's retry-after is over
                assert [k["state"] for k in pool.snapshot()] == ["healthy", "healthy"]
                assert (await call(port, "POST", "/v1/messages", HELLO, session_headers("s2")))[0] == 200
                stats = json.loads((await call(port, "GET", "/v1/stats"))[2])
        keys = [key for session, key, status in upstream.log if session == "s1" and status == 200]
        assert keys == [KEY_A] * 10 + [KEY_B] * 50                 # one key at a time: the caches stay warm
        assert [s for _, _, s in upstream.log].count(429) == 1
        assert upstream.log[-1] == ("s2", KEY_A, 200)              # resumed: a new session takes A again
        assert [k["requests"] for k in stats["keys"]["pool"]] == [12, 50]
    run(scenario())


def test_a_401_key_is_disabled_once_and_never_retried(tmp_path, caplog):
    upstream = KeyedUpstream(lambda key, n: (401, []) if key == KEY_A else None)

    async def scenario():
        async with FakeUpstream(upstream) as up:
            async with running_proxy(pool_config(tmp_path, up.url, [KEY_A, KEY_B])) as (server, port):
                with caplog.at_level(logging.WARNING, logger="claude_proxy"):
                    for session in ("s1", "s2", "s3"):
                        assert (await call(port, "POST", "/v1/messages", HELLO, session_headers(session)))[0] == 200
                assert server.key_pools["pool"].snapshot()[0]["state"] == "disabled"
        assert [key for _, key, _ in upstream.log].count(KEY_A) == 1
        warnings = [r for r in caplog.records if "disabled until the next config reload" in r.getMessage()]
        assert len(warnings) == 1 and "...1111" in warnings[0].getMessage() and KEY_A not in caplog.text
    run(scenario())


def test_every_key_cooling_gives_the_shortest_retry_after_then_the_fallback_model(tmp_path):
    upstream = KeyedUpstream(lambda key, n: (429, [("retry-after", "30" if key == KEY_A else "7")]))

    async def scenario():
        async with FakeUpstream(upstream) as up, FakeUpstream(lambda req: http_response(200, anthropic_message("fb"))) as fb:
            async with running_proxy(pool_config(tmp_path, up.url, [KEY_A, KEY_B])) as (_, port):
                status, headers, body = await call(port, "POST", "/v1/messages", HELLO, session_headers("s1"))
                assert status == 429 and headers["retry-after"] in ("7", "8")
                status, headers, body = await call(port, "POST", "/v1/messages", HELLO, session_headers("s2"))
                assert status == 429 and "rate limited" in json.loads(body)["error"]["message"]
                assert len(upstream.log) == 2                       # no key was asked while cooling
            config = make_config(tmp_path / "f", None, max_retries=2, routes={"default": "primary"},
                                 providers={"pool": {"format": "anthropic", "base_url": up.url, "api_keys": [KEY_A, KEY_B]},
                                            "other": {"format": "anthropic", "base_url": fb.url, "api_key": KEY_C}},
                                 models=[{"id": "primary", "provider": "pool", "fallback": ["backup"]},
                                         {"id": "backup", "provider": "other"}])
            async with running_proxy(config) as (_, port):
                for session in ("s3", "s4"):                         # s4: every key already cooling
                    status, _, body = await call(port, "POST", "/v1/messages", HELLO, session_headers(session))
                    assert status == 200 and json.loads(body)["content"][0]["text"] == "fb"
                assert len(upstream.log) == 4
    run(scenario())


def test_round_robin_spreads_sessions_and_keeps_each_on_its_key(tmp_path):
    upstream = KeyedUpstream(lambda key, n: None)

    async def scenario():
        async with FakeUpstream(upstream) as up:
            config = pool_config(tmp_path, up.url, [KEY_A, KEY_B, KEY_C], key_strategy="round_robin")
            async with running_proxy(config) as (_, port):
                for turn in range(3):
                    for session in ("s1", "s2", "s3"):
                        assert (await call(port, "POST", "/v1/messages", HELLO, session_headers(session)))[0] == 200
        by_session = {}
        for session, key, _ in upstream.log:
            by_session.setdefault(session, set()).add(key)
        assert all(len(keys) == 1 for keys in by_session.values())
        assert set().union(*by_session.values()) == {KEY_A, KEY_B, KEY_C}
    run(scenario())


def test_the_ledger_records_which_key_served_each_request(tmp_path):
    upstream = KeyedUpstream(lambda key, n: (429, [("retry-after", "5")]) if key == KEY_A else None)

    async def scenario():
        async with FakeUpstream(upstream) as up:
            async with running_proxy(pool_config(tmp_path, up.url, [KEY_A, KEY_B], usage_ledger=True)) as (server, port):
                assert (await call(port, "POST", "/v1/messages", HELLO, session_headers("s1")))[0] == 200
        import sqlite3
        db = sqlite3.connect(str(tmp_path / "home" / "usage.db"))
        assert [row[0] for row in db.execute("SELECT key FROM usage")] == ["...2222"]
    run(scenario())


# =============================================================================================
# Benchmark (opt-in: python -m pytest -m bench -s test_claude_proxy.py)
# =============================================================================================

with warnings.catch_warnings():  # no conftest.py / pytest.ini to register the marker in
    warnings.simplefilter("ignore")
    _bench_mark = pytest.mark.bench

# ---------------------------------------------------------------------------------------------
# The fake upstream: OpenAI-compatible /v1/chat/completions and Anthropic /v1/messages.
# The upstream model name drives it: the first integer is the number of content events,
# "tool" streams tool-call argument fragments instead of text, "slow" spreads the content
# events over one second. GET /stats -> {"events", "conns", "requests"}.
# ---------------------------------------------------------------------------------------------

BENCH_FAKE_SRC = r'''
import asyncio, json, re, sys, time

STATS = {"events": 0, "conns": 0, "requests": 0}
WORDS = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".",
         " Streaming", " tokens", " arrive", " one", " by", " one", ",", " as", " usual", "\n")
CACHE = {}


def sse(data, event=None):
    head = "event: %s\n" % event if event else ""
    return ("%sdata: %s\n\n" % (head, data)).encode()


def dump(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def oai_chunk(model, delta, finish=None, **extra):
    chunk = {"id": "chatcmpl-AbC123dEf456GhI789jKl012MnO345", "object": "chat.completion.chunk",
             "created": 1732000000, "model": model, "system_fingerprint": "fp_6b68a8204b",
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    chunk.update(extra)
    return sse(dump(chunk))


def oai_usage(model, n):
    chunk = {"id": "chatcmpl-AbC123dEf456GhI789jKl012MnO345", "object": "chat.completion.chunk",
             "created": 1732000000, "model": model, "system_fingerprint": "fp_6b68a8204b", "choices": [],
             "usage": {"prompt_tokens": 1200, "completion_tokens": n, "total_tokens": 1200 + n,
                       "prompt_tokens_details": {"cached_tokens": 0}}}
    return sse(dump(chunk))


def openai_stream(model, n, tool):
    """(prologue, content events, epilogue) as lists of SSE bytes."""
    pro = [oai_chunk(model, {"role": "assistant", "content": "", "refusal": None})]
    if tool:
        pro.append(oai_chunk(model, {"tool_calls": [{"index": 0, "id": "call_Xy12Ab34Cd56Ef78Gh90Ij12",
                   "type": "function", "function": {"name": "Bash", "arguments": ""}}]}))
        frags = ['{"command":"'] + ["echo %04d && " % i for i in range(max(n - 2, 0))] + ['true"}']
        body = [oai_chunk(model, {"tool_calls": [{"index": 0, "function": {"arguments": f}}]})
                for f in frags[:n]]
        finish = "tool_calls"
    else:
        body = [oai_chunk(model, {"content": WORDS[i % len(WORDS)]}) for i in range(n)]
        finish = "stop"
    epi = [oai_chunk(model, {}, finish), oai_usage(model, n), sse("[DONE]")]
    return pro, body, epi


def anthropic_stream(model, n, tool):
    start = {"type": "message_start", "message": {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 1200, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                  "output_tokens": 1, "service_tier": "standard"}}}
    pro = [sse(dump(start), "message_start")]
    if tool:
        block = {"type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "Bash", "input": {}}
        frags = ['{"command":"'] + ["echo %04d && " % i for i in range(max(n - 2, 0))] + ['true"}']
        deltas = [{"type": "input_json_delta", "partial_json": f} for f in frags[:n]]
        stop = "tool_use"
    else:
        block = {"type": "text", "text": ""}
        text = "".join(WORDS)  # ~90 characters: real Anthropic deltas carry several tokens
        deltas = [{"type": "text_delta", "text": text[i % 7:]} for i in range(n)]
        stop = "end_turn"
    pro.append(sse(dump({"type": "content_block_start", "index": 0, "content_block": block}),
                   "content_block_start"))
    pro.append(sse(dump({"type": "ping"}), "ping"))
    body = [sse(dump({"type": "content_block_delta", "index": 0, "delta": d}), "content_block_delta")
            for d in deltas]
    epi = [sse(dump({"type": "content_block_stop", "index": 0}), "content_block_stop"),
           sse(dump({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                     "usage": {"output_tokens": n}}), "message_delta"),
           sse(dump({"type": "message_stop"}), "message_stop")]
    return pro, body, epi


TEXT = "".join(WORDS) * 12


def openai_json(model):
    return dump({"id": "chatcmpl-AbC123dEf456GhI789jKl012MnO345", "object": "chat.completion",
                 "created": 1732000000, "model": model, "system_fingerprint": "fp_6b68a8204b",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": TEXT, "refusal": None},
                              "logprobs": None, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 1200, "completion_tokens": 250, "total_tokens": 1450}}).encode()


def anthropic_json(model):
    return dump({"id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
                 "model": model, "content": [{"type": "text", "text": TEXT}], "stop_reason": "end_turn",
                 "stop_sequence": None, "usage": {"input_tokens": 1200, "output_tokens": 250}}).encode()


def plan(path, model, stream):
    key = (path, model, stream)
    if key not in CACHE:
        anthropic = path.startswith("/v1/messages")
        if not stream:
            CACHE[key] = anthropic_json(model) if anthropic else openai_json(model)
        else:
            m = re.search(r"(\d+)", model)
            n = int(m.group(1)) if m else 200
            make = anthropic_stream if anthropic else openai_stream
            CACHE[key] = make(model, n, "tool" in model)
    return CACHE[key]


STREAM_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
               b"cache-control: no-cache\r\nrequest-id: req_011CVbench\r\nx-request-id: req_011CVbench\r\n"
               b"anthropic-ratelimit-requests-remaining: 3999\r\ntransfer-encoding: chunked\r\n\r\n")


async def send_stream(writer, events, slow, n):
    pro, body, epi = events
    w = writer.write
    for ev in pro:
        w(b"%x\r\n%b\r\n" % (len(ev), ev))
    await writer.drain()
    if slow == "bulk":  # the whole stream in one write: many events per socket read
        w(b"".join(b"%x\r\n%b\r\n" % (len(ev), ev) for ev in body))
        await writer.drain()
    elif slow == "pace":  # one event every 2 ms: one socket read per event, as real model streams arrive
        for ev in body:
            w(b"%x\r\n%b\r\n" % (len(ev), ev))
            await writer.drain()
            await asyncio.sleep(0.002)
    elif slow:
        t0, step = time.monotonic(), 1.0 / max(len(body), 1)
        for i, ev in enumerate(body):
            delay = t0 + i * step - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            w(b"%x\r\n%b\r\n" % (len(ev), ev))
    else:
        for ev in body:  # one write (one send()) per event, like a real upstream
            w(b"%x\r\n%b\r\n" % (len(ev), ev))
            await writer.drain()
    for ev in epi:
        w(b"%x\r\n%b\r\n" % (len(ev), ev))
    w(b"0\r\n\r\n")
    await writer.drain()
    STATS["events"] += len(pro) + len(body) + len(epi)


async def serve_conn(reader, writer):
    STATS["conns"] += 1
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                if line[:15].lower() == "content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length) if length else b""
            STATS["requests"] += 1
            if path == "/stats":
                data = json.dumps(STATS).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                             % (len(data), data))
                await writer.drain()
                continue
            req = json.loads(body or b"{}")
            model, stream = str(req.get("model", "")), bool(req.get("stream"))
            events = plan(path, model, stream)
            if stream:
                writer.write(STREAM_HEAD)
                mode = "pace" if "pace" in model else "bulk" if "bulk" in model else "slow" in model
                await send_stream(writer, events, mode, 0)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nrequest-id: req_011CVbench\r\n"
                             b"content-length: %d\r\n\r\n%b" % (len(events), events))
                await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main():
    server = await asyncio.start_server(serve_conn, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
'''

# ---------------------------------------------------------------------------------------------
# Process helpers
# ---------------------------------------------------------------------------------------------

BENCH_MODELS = ["anth-1", "anth-50", "anth-200", "anth-400", "anth-tool-200", "anth-slow-200", "anth-pace-200",
                "anth-bulk-400", "oai-1", "oai-50", "oai-200", "oai-400", "oai-tool-200", "oai-slow-200",
                "oai-pace-200", "oai-bulk-400"]

# The floor: what relaying costs with nothing of the proxy's own. A stdlib asyncio Protocol pipe
# (one upstream connection per client connection, bytes copied both ways, no parsing), run on
# the proxy's core against the same fake and the same streams.
FLOOR_RELAY_SRC = r'''
import asyncio, sys

UPSTREAM = ("127.0.0.1", int(sys.argv[1]))


class Upstream(asyncio.Protocol):
    def __init__(self, client):
        self.client = client

    def data_received(self, data):
        self.client.write(data)

    def connection_lost(self, exc):
        self.client.close()


class Client(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.pending, self.upstream = transport, [], None
        asyncio.ensure_future(self.connect())

    async def connect(self):
        loop = asyncio.get_running_loop()
        self.upstream, _ = await loop.create_connection(lambda: Upstream(self.transport), *UPSTREAM)
        for data in self.pending:
            self.upstream.write(data)

    def data_received(self, data):
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc):
        if self.upstream is not None:
            self.upstream.close()


async def main():
    server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
'''
_BENCH_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _bench_script() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for path in (os.environ.get("CLAUDE_PROXY_SCRIPT"), os.path.join(here, "claude_proxy.py"),
                 os.path.join(here, "..", "main", "claude_proxy.py")):
        if path and os.path.exists(path):
            return os.path.abspath(path)
    raise FileNotFoundError("claude_proxy.py not found; set CLAUDE_PROXY_SCRIPT")


def _bench_free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bench_cpu(pid: int) -> float:
    """Seconds of CPU the process used: schedstat (ns) summed over threads, else stat ticks."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _BENCH_CLK


def _bench_status(pid: int, key: str) -> float:
    """A /proc/<pid>/status memory field in MB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _bench_reset_peak(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _bench_http_get(port: int, path: str, timeout: float = 0.5) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n".encode())
        data = sock.recv(65536)
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.") else 0


class _BenchProcs:
    """The fake upstream and proxy processes (started and stopped by the test)."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.fake = self.proxy = None
        self.fake_port = self.proxy_port = 0
        self.config_path = os.path.join(tmp, "config.json")

    def pin(self, pid: int, proxy: bool) -> None:
        if len(self.cpus) < 2:
            return
        os.sched_setaffinity(pid, {self.cpus[0]} if proxy else set(self.cpus[1:]))

    def start_fake(self) -> None:
        path = os.path.join(self.tmp, "fake_upstream.py")
        with open(path, "w") as fh:
            fh.write(BENCH_FAKE_SRC)
        self.fake = subprocess.Popen([sys.executable, path], stdout=subprocess.PIPE, text=True)
        self.pin(self.fake.pid, proxy=False)
        self.fake_port = int(self.fake.stdout.readline())
        base = f"http://127.0.0.1:{self.fake_port}"
        config = {"providers": {"anth": {"format": "anthropic", "base_url": base, "api_key": "k-1234567890",
                                         "tag_signatures": False},     # stands in for api.anthropic.com
                                "oai": {"format": "openai", "base_url": base + "/v1", "api_key": "k-1234567890"}},
                  "models": [{"id": m, "provider": m.split("-")[0]} for m in BENCH_MODELS],
                  "routes": {"default": "anth"}, "log_level": "WARNING"}
        with open(self.config_path, "w") as fh:
            json.dump(config, fh)

    def start_proxy(self, profile_out: str = None, as_module: bool = False, **extra_env: str) -> float:
        """Spawn the proxy (as `python3 claude_proxy.py`, or `python3 -m claude_proxy` from cached
        bytecode); seconds from spawn to the first /health 200."""
        self.proxy_port = _bench_free_port()
        env = {k: v for k, v in os.environ.items()
               if k not in ("LOG_LEVEL", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "PYTHONDONTWRITEBYTECODE",
                            "ANTHROPIC_API_KEY", "OPENAI_API_KEY", "PROXY_API_KEY", "CLAUDE_PROXY_CONFIG")}
        env.update(CLAUDE_PROXY_HOME=os.path.join(self.tmp, "home"), LOG_LEVEL="WARNING", **extra_env)
        prefix = [sys.executable] + (["-m", "cProfile", "-o", profile_out] if profile_out else [])
        if as_module:
            env["PYTHONPATH"] = os.path.dirname(_bench_script())
            prefix, script = [sys.executable, "-m", "claude_proxy"], []
        else:
            script = [_bench_script()]
        cmd = prefix + script + ["serve", "--port", str(self.proxy_port), "--config", self.config_path]
        t0 = time.perf_counter()
        self.proxy = subprocess.Popen(cmd, env=env, cwd=self.tmp)
        self.pin(self.proxy.pid, proxy=True)
        while True:
            try:
                if _bench_http_get(self.proxy_port, "/health") == 200:
                    return time.perf_counter() - t0
            except OSError:
                pass
            if self.proxy.poll() is not None or time.perf_counter() - t0 > 15:
                raise RuntimeError("proxy did not start")
            time.sleep(0.001)

    def start_floor(self) -> None:
        """The floor relay, pinned to the proxy's core."""
        path = os.path.join(self.tmp, "floor_relay.py")
        with open(path, "w") as fh:
            fh.write(FLOOR_RELAY_SRC)
        self.floor = subprocess.Popen([sys.executable, path, str(self.fake_port)], stdout=subprocess.PIPE, text=True)
        self.pin(self.floor.pid, proxy=True)
        self.floor_port = int(self.floor.stdout.readline())

    def stop_floor(self) -> None:
        if getattr(self, "floor", None) and self.floor.poll() is None:
            self.floor.kill()
            self.floor.wait()
            self.floor.stdout.close()

    def stop_proxy(self) -> None:
        if self.proxy and self.proxy.poll() is None:
            self.proxy.send_signal(signal.SIGTERM)
            try:
                self.proxy.wait(20)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()
        self.proxy = None

    def stop(self) -> None:
        self.stop_proxy()
        self.stop_floor()
        if self.fake and self.fake.poll() is None:
            self.fake.kill()
            self.fake.wait()
        if self.fake:
            self.fake.stdout.close()


# ---------------------------------------------------------------------------------------------
# Load client: raw asyncio sockets, HTTP/1.1 keep-alive, minimal chunked parsing.
# ---------------------------------------------------------------------------------------------

class _BenchConn:
    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None
        self.buf = bytearray()

    async def open(self) -> "_BenchConn":
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 22)
        return self

    def close(self) -> None:
        if self.writer:
            self.writer.close()

    async def _more(self) -> None:
        data = await self.reader.read(262144)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf += data

    async def request(self, method: str, path: str, body: bytes, headers: str):
        """(status, body, seconds to first byte, seconds total)."""
        t0 = time.perf_counter()
        self.writer.write(f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                          f"content-length: {len(body)}\r\n{headers}\r\n".encode() + body)
        buf = self.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            await self._more()
        ttfb = time.perf_counter() - t0
        head = bytes(buf[:end]).decode("latin-1").lower()
        del buf[:end + 4]
        status = int(head.split(" ", 2)[1])
        m = re.search(r"\r\ncontent-length:\s*(\d+)", head)
        if m:
            n = int(m.group(1))
            while len(buf) < n:
                await self._more()
            out = bytes(buf[:n])
            del buf[:n]
        elif "transfer-encoding: chunked" in head:
            parts, pos = [], 0
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    del buf[:pos]
                    pos = 0
                    await self._more()
                    continue
                size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
                if len(buf) < eol + 4 + size:
                    del buf[:pos]
                    pos = 0
                    await self._more()
                    continue
                if size == 0:
                    del buf[:eol + 4]  # "0\r\n\r\n", no trailers
                    break
                parts.append(bytes(buf[eol + 2:eol + 2 + size]))
                pos = eol + 4 + size
            out = b"".join(parts)
        else:
            raise AssertionError("response without framing")
        return status, out, ttfb, time.perf_counter() - t0


async def _bench_stats(conn: _BenchConn) -> dict:
    _, body, _, _ = await conn.request("GET", "/stats", b"", "")
    return json.loads(body)


_ANTH_HEADERS = "anthropic-version: 2023-06-01\r\nx-api-key: client-key\r\n"
_OAI_HEADERS = "authorization: Bearer client-key\r\n"
_BENCH_MESSAGES = [{"role": "user", "content": "Summarise the following text. " + "lorem ipsum dolor sit amet " * 60}]


def _anthropic_body(model: str, stream: bool) -> bytes:
    return json.dumps({"model": model, "max_tokens": 1024, "stream": stream,
                       "system": [{"type": "text", "text": "You are a helpful assistant. " * 10}],
                       "messages": _BENCH_MESSAGES}).encode()


def _openai_body(model: str, stream: bool) -> bytes:
    body = {"model": model, "max_tokens": 1024, "stream": stream,
            "messages": [{"role": "system", "content": "You are a helpful assistant. " * 10}] + _BENCH_MESSAGES}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def _responses_body(model: str, stream: bool) -> bytes:
    return json.dumps({"model": model, "max_output_tokens": 1024, "stream": stream, "store": False,
                       "instructions": "You are a helpful assistant. " * 10, "input": _BENCH_MESSAGES}).encode()


# (client path, body, headers, response must contain) for the proxy and for the direct baseline.
def _bench_calls(kind: str, model: str, stream: bool):
    anth = ("/v1/messages", _anthropic_body(model, stream), _ANTH_HEADERS)
    oai = ("/v1/chat/completions", _openai_body(model, stream), _OAI_HEADERS)
    if kind == "o2a":    # Anthropic client -> OpenAI upstream (converted)
        proxy, direct, mark = anth, oai, b"message_stop" if stream else b'"type":"message"'
    elif kind == "a2o":  # OpenAI client -> Anthropic upstream (converted)
        proxy, direct, mark = oai, anth, b"[DONE]" if stream else b"chat.completion"
    elif kind == "r2a":  # Responses client -> Anthropic upstream (converted)
        proxy = ("/v1/responses", _responses_body(model, stream), _OAI_HEADERS)
        direct, mark = anth, b"response.completed" if stream else b'"object":"response"'
    else:                # Anthropic passthrough
        proxy, direct, mark = anth, anth, b"message_stop" if stream else b'"type":"message"'
    return proxy, direct, mark


async def _bench_load(port: int, call, mark: bytes, concurrency: int, count: int = 0,
                      duration: float = 0.0, conns=None) -> dict:
    """Run `count` requests (or for `duration` s) over `concurrency` keep-alive connections."""
    path, body, headers = call
    own = conns is None
    conns = conns or [await _BenchConn(port).open() for _ in range(concurrency)]
    totals, ttfbs, errors, done = [], [], [], 0
    t_start = time.perf_counter()
    deadline = t_start + duration

    async def worker(conn: _BenchConn) -> None:
        nonlocal done
        while (done < count) if count else (time.perf_counter() < deadline):
            done += 1
            try:
                status, out, ttfb, total = await conn.request("POST", path, body, headers)
            except (ConnectionError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
                errors.append(repr(exc))
                return
            if status != 200 or mark not in out:
                errors.append(f"{status} {out[:200]!r}")
            totals.append(total)
            ttfbs.append(ttfb)

    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - t_start
    if own:
        for c in conns:
            c.close()
    totals.sort()
    return {"n": len(totals), "p50": statistics.median(totals) if totals else float("nan"),
            "p99": totals[min(len(totals) - 1, int(len(totals) * 0.99))] if totals else float("nan"),
            "ttfb50": statistics.median(ttfbs) if ttfbs else float("nan"),
            "rps": len(totals) / elapsed, "errors": errors}


class _Bench:
    def __init__(self, procs: _BenchProcs):
        self.procs = procs
        self.rows = []
        self.stats_conn = None

    async def measure(self, kind: str, model: str, stream: bool, concurrency: int, count: int = 0,
                      duration: float = 0.0, runs: int = 3, direct: bool = True, warm: int = 0) -> dict:
        """Median-of-`runs` proxy metrics (CPU, chunks, RSS) and the direct baseline."""
        pid, port = self.procs.proxy.pid, self.procs.proxy_port
        proxy_call, direct_call, mark = _bench_calls(kind, model, stream)
        if not self.stats_conn:
            self.stats_conn = await _BenchConn(self.procs.fake_port).open()
        if warm:
            await _bench_load(port, proxy_call, mark, min(concurrency, warm), count=warm)
        reset = _bench_reset_peak(pid)
        results = []
        for _ in range(runs):
            before_events = (await _bench_stats(self.stats_conn))["events"]
            before_conns = (await _bench_stats(self.stats_conn))["conns"]
            cpu0 = _bench_cpu(pid)
            res = await _bench_load(port, proxy_call, mark, concurrency, count, duration)
            cpu = _bench_cpu(pid) - cpu0
            stats = await _bench_stats(self.stats_conn)
            res["events"] = stats["events"] - before_events
            res["upstream_conns"] = stats["conns"] - before_conns
            res["cpu_req_us"] = cpu / max(res["n"], 1) * 1e6
            res["cpu_chunk_us"] = cpu / res["events"] * 1e6 if res["events"] else float("nan")
            results.append(res)
        out = {k: statistics.median(r[k] for r in results)
               for k in ("p50", "p99", "ttfb50", "rps", "cpu_req_us", "cpu_chunk_us", "events", "n",
                         "upstream_conns")}
        out["errors"] = [e for r in results for e in r["errors"]]
        out["rss_peak"] = _bench_status(pid, "VmHWM") if reset else float("nan")
        out["rss_now"] = _bench_status(pid, "VmRSS")
        if direct:
            if warm:
                await _bench_load(self.procs.fake_port, direct_call, mark if kind == "pass" else b"",
                                  min(concurrency, warm), count=warm)
            dres = [await _bench_load(self.procs.fake_port, direct_call, b"", concurrency, count, duration)
                    for _ in range(runs)]
            out["direct_p50"] = statistics.median(r["p50"] for r in dres)
            out["direct_p99"] = statistics.median(r["p99"] for r in dres)
            out["direct_rps"] = statistics.median(r["rps"] for r in dres)
            out["errors"] += [e for r in dres for e in r["errors"]]
        return out


def _bench_verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


async def _bench_scenarios(procs: _BenchProcs) -> list:
    """Run every scenario against the running proxy; rows for the table."""
    b = _Bench(procs)
    rows = []

    def row(name, conc, r, cpu_key="cpu_chunk_us", target="", ok=None, extra=""):
        rows.append({"name": name, "conc": conc, **r, "target": target,
                     "verdict": "" if ok is None else _bench_verdict(ok), "extra": extra})
        return r

    # Streams at concurrency 1: latency, CPU per chunk; 50/400-event streams for the marginal cost.
    for kind, label, limit in (("o2a", "stream OpenAI->Anthropic (o2a)", 15.0),
                               ("a2o", "stream Anthropic->OpenAI (a2o)", 15.0),
                               ("r2a", "stream Anthropic->Responses (r2a)", 15.0),
                               ("pass", "stream Anthropic passthrough", 5.0)):
        prefix = "anth" if kind in ("a2o", "r2a", "pass") else "oai"
        r = await b.measure(kind, f"{prefix}-200", True, 1, count=30, warm=5)
        small = await b.measure(kind, f"{prefix}-50", True, 1, count=30, direct=False, warm=2)
        large = await b.measure(kind, f"{prefix}-400", True, 1, count=30, direct=False, warm=2)
        ev_small, ev_large = small["events"] / small["n"], large["events"] / large["n"]
        r["marginal_us"] = (large["cpu_req_us"] - small["cpu_req_us"]) / (ev_large - ev_small)
        added = (r["p50"] - r["direct_p50"]) * 1000
        ok = r["cpu_chunk_us"] <= limit and added <= 2.0 and not r["errors"]
        row(label + ", 200 chunks", 1, r, target=f"CPU<={limit:g}us/chunk, added<=2ms", ok=ok)
    for kind, label in (("o2a", "tool-call stream o2a, 200 frags"), ("a2o", "tool-call stream a2o, 200 frags"),
                        ("r2a", "tool-call stream r2a, 200 frags")):
        r = await b.measure(kind, ("oai" if kind == "o2a" else "anth") + "-tool-200", True, 1, count=30, warm=3)
        row(label, 1, r, target="(info)")

    # Non-streaming at concurrency 1 / 16 / 64 (time-boxed runs).
    for kind, label in (("pass", "non-stream passthrough"), ("o2a", "non-stream o2a")):
        model = "anth-1" if kind == "pass" else "oai-1"
        for conc in (1, 16, 64):
            r = await b.measure(kind, model, False, conc, duration=1.0, warm=conc * 2)
            if conc == 64:
                row(f"{label}", conc, r, target="req/s>=2000", ok=r["rps"] >= 2000 and not r["errors"])
            else:
                row(f"{label}", conc, r)

    if b.stats_conn:
        b.stats_conn.close()
    return rows + await _bench_concurrent_streams(procs)


async def _bench_concurrent_streams(procs: _BenchProcs, suffix: str = "") -> list:
    """100 concurrent 1-second streams (200 events each), connections opened inside the run."""
    b, rows = _Bench(procs), []
    for kind, label in (("pass", "100 x 1s streams passthrough"), ("o2a", "100 x 1s streams o2a")):
        model = "anth-slow-200" if kind == "pass" else "oai-slow-200"
        r = await b.measure(kind, model, True, 100, count=100, warm=0)
        ok = r["p50"] <= 1.05 and not r["errors"] and (r["rss_peak"] != r["rss_peak"] or r["rss_peak"] <= 40)
        rows.append({"name": label + suffix, "conc": 100, **r, "target": "p50<=1.05s, 0 errors, RSS<=40MB",
                     "verdict": _bench_verdict(ok), "extra": ""})
    if b.stats_conn:
        b.stats_conn.close()
    return rows


async def _bench_cpu_per_chunk_pairs(procs: _BenchProcs, relays, count: int, runs: int = 5) -> list:
    """CPU (us) per upstream event of each relay in `relays` ((pid, port, call, mark) tuples) for
    `count` requests at c=1, the relays taking turns run by run (a shared VM drifts between runs,
    not within one turn); one list of per-run values per relay."""
    conn = await _BenchConn(procs.fake_port).open()
    try:
        for _, port, call, mark in relays:
            await _bench_load(port, call, mark, 1, count=3)
        per_chunk = [[] for _ in relays]
        for _ in range(runs):
            for values, (pid, port, call, mark) in zip(per_chunk, relays):
                events0, cpu0 = (await _bench_stats(conn))["events"], _bench_cpu(pid)
                res = await _bench_load(port, call, mark, 1, count=count)
                cpu, events = _bench_cpu(pid) - cpu0, (await _bench_stats(conn))["events"] - events0
                assert not res["errors"], res["errors"][:2]
                values.append(cpu / max(events, 1) * 1e6)
        return per_chunk
    finally:
        conn.close()


FLOOR_PATHS = (("pass", "Anthropic passthrough", 1.25), ("o2a", "OpenAI -> Anthropic", 1.6),
               ("a2o", "Anthropic -> OpenAI", 1.6), ("r2a", "Anthropic -> Responses", 1.6))


async def _bench_floor(procs: _BenchProcs) -> str:
    """CPU per relayed chunk of the proxy beside the floor relay, paced (one event every 2 ms) and
    bulk (the whole stream at once), with the ratio to the floor per path (the median of the
    ratios of runs taken in turn)."""
    lines = [f"{'path':24} {'delivery':8} {'floor us':>9} {'proxy us':>9} {'ratio':>6}  target"]
    for kind, label, target in FLOOR_PATHS:
        prefix = "oai" if kind == "o2a" else "anth"
        for delivery, model, count in (("paced", f"{prefix}-pace-200", 10), ("bulk", f"{prefix}-bulk-400", 30)):
            proxy_call, direct_call, mark = _bench_calls(kind, model, True)
            floors, proxies = await _bench_cpu_per_chunk_pairs(procs, [
                (procs.floor.pid, procs.floor_port, direct_call, b""), (procs.proxy.pid, procs.proxy_port, proxy_call, mark)], count)
            floor, proxy = statistics.median(floors), statistics.median(proxies)
            ratio = statistics.median(p / f for p, f in zip(proxies, floors) if f)      # of the runs side by side
            if delivery == "paced":
                goal = f"<= {target:g}x floor {_bench_verdict(ratio <= target)}"
            else:
                goal = f"<= 5 us/chunk {_bench_verdict(proxy <= 5.0)}" if kind != "pass" else "(info)"
            lines.append(f"{label:24} {delivery:8} {floor:9.1f} {proxy:9.1f} {ratio:6.2f}  {goal}")
    return "\n".join(lines)


LEDGER_SCENARIOS = (("non-stream passthrough", "pass", "anth-1", False, {"concurrency": 16, "count": 2000, "warm": 32}),
                    ("50-chunk stream passthrough", "pass", "anth-50", True, {"concurrency": 1, "count": 200, "warm": 5}),
                    ("non-stream o2a", "o2a", "oai-1", False, {"concurrency": 16, "count": 2000, "warm": 32}))


async def _bench_ledger(procs: _BenchProcs, rounds: int = 3) -> list:
    """The ledger's price: the same requests with USAGE_LEDGER on and off, the proxy restarted for
    each, alternating `rounds` times; rows for the table with the median CPU per request."""
    results: dict = {}
    for ledger in ("true", "false") * rounds:
        procs.stop_proxy()
        procs.start_proxy(USAGE_LEDGER=ledger)
        b = _Bench(procs)
        for label, kind, model, stream, kw in LEDGER_SCENARIOS:
            results.setdefault((label, ledger), []).append(
                await b.measure(kind, model, stream, direct=False, runs=1, **kw))
        if b.stats_conn:
            b.stats_conn.close()
    rows = []
    for (label, ledger), runs in results.items():
        r = dict(runs[0], cpu_req_us=statistics.median(x["cpu_req_us"] for x in runs),
                 errors=[e for x in runs for e in x["errors"]])
        rows.append({"name": f"ledger {'on ' if ledger == 'true' else 'off'}: {label}", "conc": _bench_ledger_concurrency(label),
                     **r, "target": "us/req: ledger on vs off", "verdict": "", "extra": ""})
    return rows


def _bench_ledger_concurrency(label: str) -> int:
    """The concurrency of a LEDGER_SCENARIOS row."""
    return next(kw["concurrency"] for name, _, _, _, kw in LEDGER_SCENARIOS if name == label)


def _bench_ledger_micro(tmp: str, n: int = 20000) -> str:
    """CPU of Operations.request_done on the event loop's thread, with the ledger on and off, and
    the writer thread's CPU per row."""
    import types
    lines = []
    for on in (False, True):
        config = cp.parse_config({"home": os.path.join(tmp, f"micro-{on}"), "usage_ledger": on}, {})
        server = cp.ProxyServer(config)
        x = cp.Exchange(server, cp.Request("POST", "/v1/messages", {}, b"", "127.0.0.1"),
                        types.SimpleNamespace(status=200))
        x.target = cp.resolve_target(config, "claude-sonnet-4-5")
        x.meter.requested = "claude-sonnet-4-5"
        x.meter.take({"input_tokens": 10, "output_tokens": 7, "cache_read_input_tokens": 100})
        t0, p0 = time.thread_time(), time.process_time()
        for _ in range(n):
            server.ops.request_done(x, time.monotonic())
        on_loop = (time.thread_time() - t0) / n * 1e6
        if server.ops.ledger is not None:
            server.ops.ledger.flush(120)
            server.ops.ledger.close()
        total = (time.process_time() - p0) / n * 1e6
        lines.append(f"ledger {'on ' if on else 'off'}: request_done {on_loop:.1f} us/request on the loop's thread, "
                     f"{total:.1f} us/request with the writer thread ({n} requests)")
    return "\n".join(lines)


def _bench_table(rows: list, startup: dict, peak: tuple) -> str:
    head = (f"{'scenario':38} {'c':>3} {'n':>5} {'p50ms':>8} {'p99ms':>8} {'dir50':>8} {'added':>7} "
            f"{'req/s':>7} {'dir r/s':>7} {'us/chk':>7} {'marg':>6} {'us/req':>7} {'RSSpk':>6} {'err':>4} "
            f"{'up-cx':>5}  target / verdict")
    lines = [head, "-" * len(head)]
    nan = float("nan")
    for r in rows:
        stream = r["events"] > r["n"] * 2
        lines.append(
            f"{r['name'][:38]:38} {r['conc']:>3} {int(r['n']):>5} {r['p50'] * 1e3:8.2f} {r['p99'] * 1e3:8.2f} "
            f"{r.get('direct_p50', nan) * 1e3:8.2f} {(r['p50'] - r.get('direct_p50', nan)) * 1e3:7.2f} "
            f"{r['rps']:7.0f} {r.get('direct_rps', nan):7.0f} "
            f"{(r['cpu_chunk_us'] if stream else nan):7.1f} {r.get('marginal_us', nan):6.1f} "
            f"{r['cpu_req_us']:7.0f} {r['rss_peak']:6.1f} {len(r['errors']):>4} {int(r['upstream_conns']):>5}  "
            f"{r['target']} {r['verdict']}")
    lines.append("")
    lines.append(f"start, spawn->/health 200 (median of {startup['n']}; target <=150 ms): `python3 claude_proxy.py serve` "
                 f"{startup['median'] * 1e3:.0f} ms {_bench_verdict(startup['median'] <= 0.150)} (min {startup['min'] * 1e3:.0f}, "
                 f"max {startup['max'] * 1e3:.0f}), RSS at ready {startup['rss']:.1f} MB; `python3 -m claude_proxy serve` "
                 f"{startup['module'] * 1e3:.0f} ms {_bench_verdict(startup['module'] <= 0.150)}, RSS at ready "
                 f"{startup['module_rss']:.1f} MB; `python -c pass` {startup['python'] * 1e3:.0f} ms; compiling "
                 f"claude_proxy.py (a script's bytecode is never cached) {startup['compile'] * 1e3:.0f} ms")
    lines.append(f"proxy peak RSS (VmHWM; target <=40 MB): as a script, over the whole run, {peak[0]:.1f} MB "
                 f"{_bench_verdict(peak[0] <= 40)}; as -m, 100 concurrent streams {peak[1]:.1f} MB {_bench_verdict(peak[1] <= 40)} "
                 "(a script keeps its parse tree for its lifetime: CPython frees it when the script returns)")
    lines.append("columns: dir50/dir r/s = same work straight to the fake; added = p50 - dir50 (ms); us/chk = "
                 "proxy CPU per upstream SSE event, all-in; marg = marginal CPU per event (400- vs 50-event "
                 "streams); us/req = proxy CPU per request; RSSpk = VmHWM during the scenario (MB); up-cx = "
                 "upstream connections the proxy opened per run")
    return "\n".join(lines)


def _bench_startup(procs: _BenchProcs, n: int = 5) -> dict:
    """Spawn-to-/health times as a script and as `-m` (its bytecode cached by a first start), the
    RSS at ready of each, `python -c pass`, and compiling the file."""
    times: dict = {False: [], True: []}
    ready_rss: dict = {False: [], True: []}
    procs.start_proxy(as_module=True)            # writes __pycache__/claude_proxy.*.pyc
    procs.stop_proxy()
    for _ in range(n):
        for as_module in (False, True):
            times[as_module].append(procs.start_proxy(as_module=as_module))
            time.sleep(0.2)                      # past the post-start trim
            ready_rss[as_module].append(_bench_status(procs.proxy.pid, "VmRSS"))
            procs.stop_proxy()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    python = time.perf_counter() - t0
    with open(_bench_script(), encoding="utf-8") as fh:
        src = fh.read()
    t0 = time.perf_counter()
    compile(src, _bench_script(), "exec")
    return {"median": statistics.median(times[False]), "min": min(times[False]), "max": max(times[False]), "n": n,
            "module": statistics.median(times[True]), "rss": statistics.median(ready_rss[False]),
            "module_rss": statistics.median(ready_rss[True]), "python": python, "compile": time.perf_counter() - t0}


def _bench_profile(procs: _BenchProcs, out_dir: str) -> str:
    """The stream scenarios with the proxy under cProfile; top 20 by tottime and cumtime."""
    import io
    import pstats
    os.makedirs(out_dir, exist_ok=True)
    report = []
    for kind, model in (("o2a", "oai-200"), ("pass", "anth-200"), ("a2o", "anth-200"), ("r2a", "anth-200")):
        out = os.path.join(out_dir, f"prof_{kind}.out")
        procs.start_proxy(profile_out=out)
        b = _Bench(procs)
        asyncio.run(b.measure(kind, model, True, 1, count=100, runs=1, direct=False, warm=3))
        procs.stop_proxy()
        for sort in ("tottime", "cumulative"):
            text = io.StringIO()
            stats = pstats.Stats(out, stream=text)
            stats.strip_dirs().sort_stats(sort).print_stats(20)
            report.append(f"==== {kind} stream ({model}) x100, sorted by {sort} ====\n"
                          + text.getvalue().split("\n", 3)[-1])
    return "\n".join(report)


@_bench_mark
def test_benchmark(request):
    expr = request.config.getoption("-m") or ""
    if not re.search(r"(?<!not )\bbench\b", expr):
        pytest.skip("benchmark: run with -m bench")
    if not sys.platform.startswith("linux"):
        pytest.skip("benchmark reads /proc")
    saved = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory() as tmp:
        procs = _BenchProcs(tmp)
        try:
            if len(procs.cpus) >= 2:  # this process and the fake on the other core(s)
                os.sched_setaffinity(0, set(procs.cpus[1:]))
            procs.start_fake()
            startup = _bench_startup(procs)
            procs.start_proxy()
            procs.start_floor()
            floor = asyncio.run(_bench_floor(procs))
            procs.stop_floor()
            rows = asyncio.run(_bench_scenarios(procs))
            script_peak = max([_bench_status(procs.proxy.pid, "VmHWM")] +
                              [r["rss_peak"] for r in rows if r["rss_peak"] == r["rss_peak"]])
            procs.stop_proxy()
            procs.start_proxy(as_module=True)
            rows += asyncio.run(_bench_concurrent_streams(procs, " (-m)"))
            peak = (script_peak, _bench_status(procs.proxy.pid, "VmHWM"))
            rows += asyncio.run(_bench_ledger(procs))
            procs.stop_proxy()
            table = _bench_table(rows, startup, peak)
            print("\n\nclaude_proxy benchmark (proxy pinned to cpu %s; fake+client on %s; medians of 3 runs)\n"
                  % (procs.cpus[:1] or "-", procs.cpus[1:] or "-") + table)
            print("\nCPU per relayed chunk against the floor (a stdlib asyncio byte relay on the same core, "
                  "same fake, same streams; the two in turn, medians of 5 runs)\n" + floor)
            print("\n" + _bench_ledger_micro(tmp))
            if os.environ.get("CLAUDE_PROXY_BENCH_PROFILE"):
                out_dir = os.environ["CLAUDE_PROXY_BENCH_PROFILE"]
                os.makedirs(out_dir, exist_ok=True)
                print("\n" + _bench_profile(procs, out_dir))
        finally:
            procs.stop()
            os.sched_setaffinity(0, saved)
    errors = [e for r in rows for e in r["errors"]]
    assert not errors, f"{len(errors)} failed requests, first: {errors[:3]}"
    if os.environ.get("CLAUDE_PROXY_BENCH_STRICT"):
        missed = [r["name"] for r in rows if r["verdict"] == "MISS"]
        assert not missed and startup["median"] <= 0.150 and peak[0] <= 40, f"targets missed: {missed}"


def _bench_statusline(tmp: str, runs: int = 30) -> str:
    """The status line as the launcher configures it (sh -c, cached bytecode, no site packages):
    median and p90 wall time with a proxy answering, and with none (usage.db read directly)."""
    import argparse
    home, cfg, port = os.path.join(tmp, "sl-home"), os.path.join(tmp, "sl-config.json"), free_port()
    with open(cfg, "w") as fh:
        json.dump({"home": home, "providers": {"anthropic": {"format": "anthropic", "base_url": "http://127.0.0.1:9"}}}, fh)
    ledger = cp.UsageLedger(os.path.join(home, "usage.db"))
    for i in range(20000):                       # a well-used ledger: 20,000 rows over 200 sessions
        ledger.add(usage_row(time.time() - i, "claude-sonnet-4-5")._replace(session_id=f"session-{i % 200}"))
    ledger.close()
    cp.cache_statusline_bytecode(home)
    command = cp.statusline_command(argparse.Namespace(config=cfg, host=None, port=port), home)
    stdin = json.dumps({"session_id": "session-7", "model": {"id": "claude-sonnet-4-5"}, "cost": {"total_cost_usd": 1}})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAUDE_PROXY", "PROXY_API"))}

    def timings():
        out, times = "", []
        for i in range(runs + 3):
            t0 = time.perf_counter()
            out = subprocess.run(command, shell=True, input=stdin, capture_output=True, text=True, env=env).stdout
            if i >= 3:
                times.append(time.perf_counter() - t0)
        times.sort()
        return statistics.median(times), times[int(len(times) * 0.9)], out.strip()
    down = timings()
    proxy = subprocess.Popen([sys.executable, "-m", "claude_proxy", "--config", cfg, "--port", str(port)], cwd=HERE,
                             env=env, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if port_open(port):
                break
            time.sleep(0.05)
        up = timings()
    finally:
        proxy.terminate()
        proxy.wait(30)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare = time.perf_counter() - t0
    return "\n".join([f"statusline as the launcher runs it (target: median <= 150 ms; {runs} runs each; `python3 -c pass` "
                      f"{bare * 1e3:.0f} ms):"] + [
        f"  {what}: median {m * 1e3:.0f} ms {_bench_verdict(m <= 0.150)}, p90 {p * 1e3:.0f} ms -> {line}"
        for what, (m, p, line) in (("proxy running (asks it over loopback)", up), ("no proxy (reads usage.db)", down))])


def _bench_metrics(n: int = 20000) -> str:
    """What /metrics costs: Operations.request_done per request with the counters and without
    them (the rest of the request's work is the same), and one scrape's rendering."""
    import types
    config = cp.parse_config({"usage_ledger": False}, {})
    server = cp.ProxyServer(config)
    x = cp.Exchange(server, cp.Request("POST", "/v1/messages", {}, b"", "127.0.0.1"), types.SimpleNamespace(status=200))
    x.target = cp.resolve_target(config, "claude-sonnet-4-5")
    x.meter.requested = "claude-sonnet-4-5"
    x.meter.take({"input_tokens": 10, "output_tokens": 7, "cache_read_input_tokens": 100})
    x.meter.first_byte_at = time.monotonic()
    results = {}
    for label in ("with counters", "without", "with counters", "without"):
        observe = server.ops.metrics.observe
        if label == "without":
            server.ops.metrics.observe = lambda *args: None
        t0 = time.thread_time()
        for _ in range(n):
            server.ops.request_done(x, time.monotonic())
        results.setdefault(label, []).append((time.thread_time() - t0) / n * 1e6)
        server.ops.metrics.observe = observe
    for i in range(200):                                           # many series: 20 models x statuses
        x.meter.requested = x.target.spec["model"] = f"client-model-{i % 25}"
        x.out.status = (200, 429, 529)[i % 3]
        server.ops.request_done(x, time.monotonic())
    t0 = time.perf_counter()
    text = cp.format_metrics(cp.metrics_samples(server))
    scrape = time.perf_counter() - t0
    on, off = min(results["with counters"]), min(results["without"])
    return (f"/metrics: request_done {on:.1f} us/request with the counters, {off:.1f} us without: +{on - off:.1f} us "
            f"per request ({n} requests, best of 2); one scrape of {text.count(chr(10))} lines renders in "
            f"{scrape * 1e3:.2f} ms")


@_bench_mark
def test_benchmark_statusline_and_metrics(request, tmp_path):
    if not re.search(r"(?<!not )\bbench\b", request.config.getoption("-m") or ""):
        pytest.skip("benchmark: run with -m bench")
    statusline = _bench_statusline(str(tmp_path))
    print("\n" + statusline + "\n" + _bench_metrics())
    if os.environ.get("CLAUDE_PROXY_BENCH_STRICT"):
        assert "MISS" not in statusline


async def _requests_on_keepalive(port, n, bodies):
    """n requests over one keep-alive connection, cycling through (path, body) pairs."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i in range(n):
        path, body = bodies[i % len(bodies)]
        data = json.dumps(body).encode()
        writer.write(b"POST %s HTTP/1.1\r\nhost: localhost\r\nanthropic-version: 2023-06-01\r\ncontent-length: %d\r\n\r\n%s"
                     % (path.encode(), len(data), data))
        head = await reader.readuntil(b"\r\n\r\n")
        if b"chunked" in head:
            while not (await reader.readuntil(b"\r\n")).startswith(b"0\r\n"):
                await reader.readuntil(b"\r\n")
            await reader.readuntil(b"\r\n")
        else:
            await reader.readexactly(int(re.search(rb"content-length: (\d+)", head).group(1)))
        assert head.startswith(b"HTTP/1.1 200"), head
    writer.close()


def memory_growth(tmp_path, total, warmup):
    """Bytes traced by tracemalloc that stay allocated between `warmup` and `total` requests."""
    import tracemalloc

    def script(req):
        if req["path"].startswith("/v1/chat"):
            return Stream(openai_stream_chunks()) if req["body"].get("stream") else http_response(200, {
                "id": "c", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        return Stream(anthropic_stream()) if req["body"].get("stream") else http_response(200, anthropic_message())
    bodies = [("/v1/messages", HELLO), ("/v1/messages", dict(HELLO, model="conv", stream=True)),
              ("/v1/chat/completions", {"model": "claude-x", "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
              ("/v1/messages", dict(HELLO, model="conv"))]

    async def scenario():
        async with FakeUpstream(script) as up:
            config = make_config(tmp_path, up.url, providers={"o": {"format": "openai", "base_url": up.url + "/v1"}},
                                 models=[{"id": "conv", "provider": "o"}])
            async with running_proxy(config) as (server, port):
                settle = lambda: cp.run_off_loop(server.ops.ledger.flush) if server.ops.ledger else asyncio.sleep(0)
                await asyncio.gather(*[_requests_on_keepalive(port, warmup // 4, bodies) for _ in range(4)])
                up.requests.clear()
                await settle()                # rows waiting for the ledger's writer are not kept memory
                tracemalloc.start()
                gc.collect()
                before = tracemalloc.take_snapshot()
                await asyncio.gather(*[_requests_on_keepalive(port, (total - warmup) // 4, bodies) for _ in range(4)])
                up.requests.clear()
                await settle()
                gc.collect()
                after = tracemalloc.take_snapshot()
                tracemalloc.stop()
        module = os.path.abspath(cp.__file__)
        return sum(stat.size_diff for stat in after.compare_to(before, "filename")
                   if os.path.abspath(stat.traceback[0].filename) == module)
    return run(scenario())


def test_no_memory_kept_per_request(tmp_path):
    growth = memory_growth(tmp_path, total=1200, warmup=400)
    assert growth < 64 * 1024, f"claude_proxy.py kept {growth} bytes over 800 requests"


@_bench_mark
def test_benchmark_memory_10000_requests(request, tmp_path):
    if not re.search(r"(?<!not )\bbench\b", request.config.getoption("-m") or ""):
        pytest.skip("benchmark: run with -m bench")
    growth = memory_growth(tmp_path, total=11000, warmup=1000)
    print(f"\ntracemalloc: claude_proxy.py allocations retained over 10,000 requests: {growth} bytes")
    assert growth < 64 * 1024



def test_quickstart_models_cap_output_and_send_no_reasoning_by_default():
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:1/v1", "BIG_MODEL": "gpt-4o"}
    spec = cp.parse_config(cp.env_layer(env), env).models["gpt-4o"]
    claude_code_like = {"model": "claude-opus-4-8", "max_tokens": 64000, "thinking": {"type": "adaptive"},
                        "output_config": {"effort": "high"}, "messages": [{"role": "user", "content": "hi"}]}
    sent = cp.anthropic_to_openai_request(claude_code_like, spec)
    assert sent["max_tokens"] == 16384 and "reasoning_effort" not in sent and "reasoning" not in sent
    env = dict(env, MAX_TOKENS_LIMIT="8k", OPENAI_REASONING_PARAM="reasoning_effort")
    sent = cp.anthropic_to_openai_request(claude_code_like, cp.parse_config(cp.env_layer(env), env).models["gpt-4o"])
    assert sent["max_tokens"] == 8192 and sent["reasoning_effort"] == "high"


def test_exposed_server_without_proxy_key_never_uses_the_login_via_auto(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            config = make_config(tmp_path, providers={"anthropic": {"format": "anthropic", "base_url": up.url}})
            async with running_proxy(config) as (server, port):
                cp.TokenStore(os.path.join(config.home, "oauth_token.json")).save(   # a login made after start
                    {"access_token": "sk-ant-oat01-late", "refresh_token": None, "expires_at": time.time() + 3600,
                     "scope": "user:inference", "account": None, "source": "login"})
                server.exposed = True
                await call(port, "POST", "/v1/messages", HELLO, dict(ANTHROPIC_HEADERS, **{"x-api-key": "client-own"}))
                server.exposed = False
                await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
        assert up.requests[0]["headers"].get("x-api-key") == "client-own" and "authorization" not in up.requests[0]["headers"]
        assert up.requests[1]["headers"]["authorization"] == "Bearer sk-ant-oat01-late"
    run(scenario())


def test_parallel_tool_calls_without_index_or_id_stay_separate():
    machine = cp.OpenAIToAnthropicStream("m", message_id="msg_x")
    events = machine.feed({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"function": {"name": "a", "arguments": '{"p": 1}'}}, {"function": {"name": "b", "arguments": '{"q": 2}'}}]},
        "finish_reason": "tool_calls"}]}) + machine.close()
    folded = cp.fold_anthropic_events(events)
    assert [(b["name"], b["input"]) for b in folded["content"]] == [("a", {"p": 1}), ("b", {"q": 2})]


def test_non_json_upstream_error_becomes_an_error_envelope(tmp_path):
    async def scenario():
        html = b"<html><body>502 Bad Gateway</body></html>"
        async with FakeUpstream(lambda req: http_response(502, html, content_type="text/html")) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                status, headers, body = await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
        assert status == 502 and headers["content-type"] == "application/json"
        error = json.loads(body)
        assert error["type"] == "error" and "502 Bad Gateway" in error["error"]["message"]
    run(scenario())


def test_concurrent_401s_for_one_expired_token_refresh_once(tmp_path):
    async def scenario():
        tokens = FakeTokenServer(refresh_delay=0.05)
        async with FakeUpstream(tokens) as auth, FakeUpstream(expired_token_upstream) as up:
            config = oauth_config(tmp_path, up.url, auth.url + "/v1/oauth/token")
            seed_login(config)
            async with running_proxy(config) as (_, port):
                async def later(delay):
                    await asyncio.sleep(delay)
                    return await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
                results = await asyncio.gather(*[later(i * 0.025) for i in range(12)])
            assert [r[0] for r in results] == [200] * 12
            assert len(auth.requests) == 1
    run(scenario())


@pytest.mark.parametrize("upstream_error, expected", [
    ({"error": {"message": "This model's maximum context length is 128000 tokens.", "type": "invalid_request_error",
                "code": "context_length_exceeded"}}, "prompt is too long: This model's maximum context length is 128000 tokens."),
    ({"error": {"message": "bad temperature", "type": "invalid_request_error"}}, "bad temperature"),
])
def test_context_overflow_is_worded_for_claude_code(tmp_path, upstream_error, expected):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(400, upstream_error)) as up:
            async with running_proxy(openai_config(tmp_path, up.url)) as (_, port):
                status, _, body = await call(port, "POST", "/v1/messages", HELLO, ANTHROPIC_HEADERS)
        assert status == 400 and json.loads(body)["error"]["message"] == expected
    run(scenario())


def test_client_key_containing_the_proxy_key_is_still_forwarded(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message())) as up:
            config = make_config(tmp_path, proxy_api_key="pk-123456789",
                                 providers={"anthropic": {"format": "anthropic", "base_url": up.url, "auth": "client"}})
            async with running_proxy(config) as (_, port):
                await call(port, "POST", "/v1/messages", HELLO,
                           dict(ANTHROPIC_HEADERS, **{"x-api-key": "pk-123456789", "authorization": "Bearer sk-own-pk-123456789"}))
        assert up.requests[0]["headers"].get("authorization") == "Bearer sk-own-pk-123456789"
        assert "x-api-key" not in up.requests[0]["headers"]
    run(scenario())


def test_cli_import_status_logout_and_token(tmp_path):
    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps({"claudeAiOauth": {"accessToken": "sk-ant-oat01-cc", "refreshToken": "sk-ant-ort01-cc",
                                                   "expiresAt": int((time.time() + 3600) * 1000), "scopes": ["user:inference"]}}))
    env = dict(os.environ, CLAUDE_PROXY_HOME=str(tmp_path / "h"))
    env.pop("ANTHROPIC_OAUTH_TOKEN", None)
    env.pop("CLAUDE_CODE_OAUTH_TOKEN", None)

    def cli(*args):
        out = subprocess.run([sys.executable, os.path.join(HERE, "claude_proxy.py"), *args], capture_output=True,
                             text=True, env=env, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout
    assert '"source": "claude_code"' in cli("import-claude-code", "--path", str(creds))
    store = tmp_path / "h" / "oauth_token.json"
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o600 and "sk-ant-ort01-cc" not in store.read_text()
    assert "sk-ant" not in cli("status")
    assert '"logged_in": false' in cli("logout") and not store.exists()
    cli("login", "--token", "sk-ant-oat01-longlived-abc")
    assert '"source": "long_lived"' in cli("status")
    assert "There was no saved Claude login" not in cli("logout")
    assert "There was no saved Claude login to remove" in cli("logout")
    for wrong in ("notatoken", "sk-ant-api03-abcdefghijklmnop"):
        refused = subprocess.run([sys.executable, os.path.join(HERE, "claude_proxy.py"), "login", "--token", wrong],
                                 capture_output=True, text=True, env=env, timeout=30)
        assert refused.returncode == 1 and "not a Claude subscription token" in refused.stderr
        assert "Traceback" not in refused.stderr and not store.exists()



def test_opus_4_1_thinking_fits_its_32000_output_limit():
    sent = openai_to_anthropic_request({"model": "x", "reasoning_effort": "high",
                                        "messages": [{"role": "user", "content": "hi"}]}, "claude-opus-4-1")
    assert sent["max_tokens"] == 32000 and sent["thinking"]["budget_tokens"] == 32000 - 1024


def test_gemini_replayed_tool_calls_carry_the_signature_sentinel():
    spec = dict(cp.MODEL_DEFAULTS, id="g", provider="o", model="gemini-3-pro", schema="gemini")
    sent = cp.anthropic_to_openai_request({"model": "g", "max_tokens": 10, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}]}, spec)
    call = [m for m in sent["messages"] if m["role"] == "assistant"][0]["tool_calls"][0]
    assert call["extra_content"] == {"google": {"thought_signature": "skip_thought_signature_validator"}}


def test_oauth_shaping_leaves_clients_with_1h_cache_marks_alone():
    body = {"model": "m", "max_tokens": 10, "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": [{"type": "text", "text": "c"}]}]}
    shaped, _ = cp.shape_oauth_request(body, {}, "sk-ant-oat01-x")
    ttls = [m.get("ttl", "5m") for m in cp.cache_marks(shaped)]
    assert ttls == ["1h"]


@pytest.mark.parametrize("client", ["anthropic", "openai"])
def test_stream_that_ends_before_its_finish_is_an_error_not_an_answer(tmp_path, client):
    if client == "anthropic":     # a tool call cut mid-arguments, then the connection closes cleanly
        base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        parts = [openai_sse(dict(base, choices=[{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1",
                 "type": "function", "function": {"name": "Bash", "arguments": '{"command": "rm -rf /tmp/bu'}}]},
                 "finish_reason": None}]))]
        path, body = "/v1/messages", dict(HELLO, stream=True)
    else:
        parts, path, body = anthropic_stream()[:3], "/v1/chat/completions", {
            "model": "claude-x", "stream": True, "messages": [{"role": "user", "content": "hi"}]}

    async def scenario():
        async with FakeUpstream(lambda req: Stream(parts)) as up:
            config = openai_config(tmp_path, up.url) if client == "anthropic" else make_config(tmp_path, up.url)
            async with running_proxy(config) as (_, port):
                return await call(port, "POST", path, body, ANTHROPIC_HEADERS)
    status, _, raw = run(scenario())
    events = sse_events(raw)
    if client == "anthropic":
        assert events[-1][0] == "error" and "message_stop" not in [e for e, _ in events]
        assert not any(d.get("delta", {}).get("stop_reason") == "tool_use" for _, d in events if isinstance(d, dict))
    else:
        assert "error" in events[-1][1] and "[DONE]" not in [d for _, d in events]


def test_user_neighbours_left_by_a_dropped_thinking_turn_are_merged():
    spec = dict(cp.MODEL_DEFAULTS, id="m", provider="o", model="m")
    sent = cp.anthropic_to_openai_request({"model": "m", "max_tokens": 10, "messages": [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"}]},
        {"role": "user", "content": "two"}]}, spec)
    assert [m["role"] for m in sent["messages"]] == ["user"] and sent["messages"][0]["content"] == "one\n\ntwo"


@pytest.mark.parametrize("contents, expected_blocks", [
    (["\n\n"], []),                                                  # whitespace alone opens nothing
    (["\n\n", "Hello"], [("text", "\n\nHello")]),                    # leading whitespace kept with its text
    (["Hi", "\n\n"], [("text", "Hi\n\n")]),                          # inside an open block: plain text
])
def test_whitespace_only_text_opens_no_block(contents, expected_blocks):
    machine = cp.OpenAIToAnthropicStream("m", message_id="msg_x")
    events = []
    for text in contents:
        events += machine.feed({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
    events += machine.feed({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {
        "name": "f", "arguments": "{}"}}]}, "finish_reason": "tool_calls"}]}) + machine.close()
    folded = cp.fold_anthropic_events(events)
    assert [(b["type"], b.get("text")) for b in folded["content"] if b["type"] == "text"] == expected_blocks
    assert folded["content"][-1]["type"] == "tool_use"


@pytest.mark.parametrize("primary", ["529", "unreachable"])
def test_fallback_model_on_overload_and_on_an_unreachable_upstream(tmp_path, primary):
    async def scenario():
        async with FakeUpstream(lambda req: http_response(200, anthropic_message(text=req["body"]["model"]))) as good:
            if primary == "529":
                bad = FakeUpstream(lambda req: http_response(529, {"type": "error", "error": {"type": "overloaded_error", "message": "o"}}))
                await bad.__aenter__()
                bad_url = bad.url
            else:
                sock = socket.socket()
                sock.bind(("127.0.0.1", 0))
                bad_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
                sock.close()
            config = make_config(tmp_path, providers={
                "primary": {"format": "anthropic", "base_url": bad_url, "api_key": "k-1234567890"},
                "backup": {"format": "anthropic", "base_url": good.url, "api_key": "k-1234567890"}},
                models=[{"id": "main", "provider": "primary", "model": "m-primary", "fallback": ["spare"]},
                        {"id": "spare", "provider": "backup", "model": "m-backup"}])
            async with running_proxy(config) as (_, port):
                status, _, body = await call(port, "POST", "/v1/messages", dict(HELLO, model="main"), ANTHROPIC_HEADERS)
            if primary == "529":
                await bad.__aexit__()
        assert status == 200 and json.loads(body)["content"][0]["text"] == "m-backup"
    run(scenario())


def test_http10_client_gets_a_close_delimited_stream(tmp_path):
    async def scenario():
        async with FakeUpstream(lambda req: Stream(anthropic_stream())) as up:
            async with running_proxy(make_config(tmp_path, up.url)) as (_, port):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                body = json.dumps(dict(HELLO, stream=True)).encode()
                writer.write(b"POST /v1/messages HTTP/1.0\r\nconnection: keep-alive\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(body), body))
                data = await asyncio.wait_for(reader.read(), 5)          # ends because the proxy closes
        head, _, rest = data.partition(b"\r\n\r\n")
        assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
        assert rest == b"".join(anthropic_stream())
    run(scenario())


@pytest.mark.parametrize("answer", ["stream", "529"])
def test_slow_upstream_head_gets_an_early_sse_response_with_keepalives(tmp_path, answer):
    async def slow(req):
        await asyncio.sleep(0.6)
        if answer == "529":
            return http_response(529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        return Stream(anthropic_stream())

    async def scenario():
        async with FakeUpstream(slow) as up:
            config = make_config(tmp_path, up.url)
            config.settings["keepalive_interval"] = 0.15
            async with running_proxy(config) as (_, port):
                return await call(port, "POST", "/v1/messages", dict(HELLO, stream=True), ANTHROPIC_HEADERS)
    status, headers, body = run(scenario())
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert body.startswith(b": keep-alive\n\n") and body.count(b": keep-alive") >= 2
    events = sse_events(body)
    if answer == "stream":
        assert [e for e, _ in events][-1] == "message_stop"
    else:
        assert events[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"},
                                        "request_id": events[-1][1]["request_id"]})
