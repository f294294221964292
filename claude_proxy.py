#!/usr/bin/env python3
"""claude_proxy: one file, standard library only, between LLM clients and LLM providers.

Anthropic clients (Claude Code, the Anthropic SDKs) and OpenAI clients (the openai SDKs,
LangChain, Open WebUI) talk to it; it forwards to Anthropic, to Anthropic-compatible vendors
or to any OpenAI-compatible provider, converting between the two dialects where needed.

Run:    python3 claude_proxy.py                 serve on 127.0.0.1:8082 (a browser there sees its status)
        python3 claude_proxy.py check-config    print the effective config, secrets redacted
        python3 claude_proxy.py login           Claude Pro/Max login (OAuth PKCE)
        python3 claude_proxy.py stats           usage and cost from the ledger
        python3 claude_proxy.py doctor          can every provider in use be reached and authenticated?
        python3 claude_proxy.py menu            start, log in, refresh, status, log out, long-term token: a menu
        python3 claude_proxy.py code [ARGS...]  Claude Code through the proxy (codex, gemini likewise)
        python3 claude_proxy.py statusline      Claude Code's status line from the ledger
Tests:  python3 -m pytest -q test_claude_proxy.py

Sections, leaves first, so nothing refers forward:
   1. Constants          every tunable in one DEFAULT_* block; the Claude model table
   2. Errors             one ProxyError tree; each error knows its HTTP status and API type
   3. Utilities          ids, JSON, redaction of secrets, model_facts() over the model table
   4. Config             defaults < JSON file < .env < environment < CLI, one pure parse
   5. HTTP wire format   sans-IO parsing and formatting of HTTP/1.1 heads and chunks
   6. SSE                sans-IO incremental decoder and the one encoder
   7. Stream I/O         requests read from / responses written to asyncio streams
   8. Upstream client    keep-alive pool, TLS, CONNECT proxies, idle timeouts
   9. Converters         Anthropic <-> OpenAI requests, stream state machines, folds
                         (9a Anthropic client -> OpenAI, 9b OpenAI client -> Claude,
                          9c Responses client -> Claude, Anthropic Messages the hub); notes of
                         every dropped field; thinking signatures across routes
  10. OAuth              PKCE login, token store and refresh, OAuth request shaping
  11. Routing, handlers  model routing, the proxy paths, stored responses, retries, error
                         rendering, the usage meter, the models listing
  12. Operations         usage ledger and cost, stats, metrics, plugins, hot reload, doctor, status page
  13. Server             connection loop, keep-alive, limits, graceful shutdown
  14. CLI                argparse entry point, stats / doctor / menu, the status line, the launchers
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import collections
import concurrent.futures
import copy
import datetime
import hashlib
import hmac
import http
import ipaddress
import json
import logging
import math
import os
import queue
import random
import re
import secrets
import signal
import socket
import ssl
import stat
import sys
import threading
import time
import urllib.parse
from typing import (Any, AsyncIterator, Awaitable, Callable, Dict, Iterable, List, Mapping,
                    NamedTuple, Optional, Tuple, Union)

log = logging.getLogger("claude_proxy")
access_log = logging.getLogger("claude_proxy.access")

# =============================================================================================
# 1. Constants
# =============================================================================================

VERSION = "0.1.0"
DEFAULT_ANTHROPIC_URL = "https://api.anthropic.com"
DEFAULT_OPENAI_URL = "https://api.openai.com/v1"
ANTHROPIC_VERSION = "2023-06-01"
MAX_REQUEST_LINE = 8 * 1024          # longer request line: 414
MAX_HEADER_BYTES = 64 * 1024         # larger header block: 431
READ_CHUNK = 64 * 1024
WRITE_HIGH_WATER = 64 * 1024         # client writes await drain() only past this much buffered
MAX_CHUNK_LINE = 4096                # a longer chunk-size line is malformed
MAX_CHUNKS = 16384                   # a request body in more chunks is refused (CPU per chunk)
MAX_SSE_LINE = 8 * 1024 * 1024       # an upstream SSE line or event beyond this fails the stream
MAX_INTERIM_RESPONSES = 8            # upstream 1xx responses tolerated before the real one
OFF_LOOP_BODY_BYTES = 256 * 1024     # request bodies this large are parsed and converted in a thread
MAX_PUBLIC_BODY = 4 * 1024           # a body to a keyless path (the status page's key form): 413 beyond
MAX_MODEL_NAME = 256                 # a longer requested model name: 400

# Settings: key -> (environment variable, type, default). The JSON file may carry the same keys
# at its top level; CLI flags override the few that have one.
SETTINGS: Dict[str, Tuple[str, str, Any]] = {
    "host": ("CLAUDE_PROXY_HOST", "str", "127.0.0.1"),
    "port": ("CLAUDE_PROXY_PORT", "int", 8082),
    "log_level": ("LOG_LEVEL", "str", "INFO"),
    "home": ("CLAUDE_PROXY_HOME", "str", "~/.claude-proxy"),
    "proxy_api_key": ("PROXY_API_KEY", "str", None),
    "max_body_bytes": ("MAX_BODY_BYTES", "int", 32 * 1024 * 1024),
    "header_timeout": ("HEADER_TIMEOUT", "float", 10.0),
    "idle_timeout": ("IDLE_TIMEOUT", "float", 75.0),
    "connect_timeout": ("CONNECT_TIMEOUT", "float", 10.0),
    "read_timeout": ("READ_TIMEOUT", "float", 600.0),
    "body_timeout": ("BODY_TIMEOUT", "float", 30.0),
    "max_connections": ("MAX_CONNECTIONS", "int", 0),
    "max_buffered_bytes": ("MAX_BUFFERED_BYTES", "int", 128 * 1024 * 1024),
    "allowed_hosts": ("ALLOWED_HOSTS", "list", []),
    "shutdown_grace": ("SHUTDOWN_GRACE", "float", 10.0),
    "max_retries": ("MAX_RETRIES", "int", 2),
    "retry_deadline": ("RETRY_DEADLINE", "float", 60.0),
    "keepalive_interval": ("SSE_KEEPALIVE_INTERVAL", "float", 15.0),
    "ssl_verify": ("SSL_VERIFY", "bool", True),
    "ca_bundle": ("CA_BUNDLE", "str", None),
    "cors_origins": ("CORS_ORIGINS", "list", []),
    "pool_size": ("UPSTREAM_POOL_SIZE", "int", 128),
    "long_context_threshold": ("LONG_CONTEXT_THRESHOLD", "int", 60000),
    "anthropic_url": ("ANTHROPIC_UPSTREAM_URL", "str", DEFAULT_ANTHROPIC_URL),
    "oauth_token": ("ANTHROPIC_OAUTH_TOKEN", "str", None),
    "min_tokens_limit": ("MIN_TOKENS_LIMIT", "int", None),
    "log_file": ("CLAUDE_PROXY_LOG_FILE", "str", None),
    "models_file": ("CLAUDE_PROXY_MODELS_FILE", "str", None),
    "import_token_file": ("CLAUDE_PROXY_IMPORT_TOKEN_FILE", "str", None),
    "custom_headers": ("CUSTOM_HEADER_*", "dict", {}),
    "strict": ("CLAUDE_PROXY_STRICT", "bool", False),
    "responses_store_mb": ("RESPONSES_STORE_MB", "float", 256.0),     # stored /v1/responses, oldest evicted
    "responses_store_days": ("RESPONSES_STORE_DAYS", "float", 30.0),
    # Operations (section 12): ledger, reload, plugins, status page.
    "usage_ledger": ("USAGE_LEDGER", "bool", True),
    "usage_max_age_days": ("USAGE_MAX_AGE_DAYS", "int", 90),
    "usage_max_rows": ("USAGE_MAX_ROWS", "int", 500000),
    "reload_interval": ("CONFIG_RELOAD_INTERVAL", "float", 1.0),
    "plugins": ("CLAUDE_PROXY_PLUGINS", "list", []),
    "filter_tools": ("FILTER_TOOLS", "list", []),
}
# The range of each numeric setting: (lowest value, whether the lowest itself is allowed); what 0
# means, where it is allowed, beside it. A value outside is a ConfigError at start, not a failure
# on every request.
SETTING_RANGES: Dict[str, Tuple[float, bool]] = {
    "port": (1, True), "max_body_bytes": (1, True), "max_buffered_bytes": (1, True), "pool_size": (1, True),
    "header_timeout": (0, False), "idle_timeout": (0, False), "connect_timeout": (0, False),
    "read_timeout": (0, False), "body_timeout": (0, False), "min_tokens_limit": (1, True),
    "max_connections": (0, True),            # 0: half the process's file limit
    "shutdown_grace": (0, True), "max_retries": (0, True), "retry_deadline": (0, True),
    "keepalive_interval": (0, True),         # 0: no keep-alive comments
    "long_context_threshold": (0, True), "responses_store_mb": (0, True), "responses_store_days": (0, True),
    "usage_max_age_days": (0, True), "usage_max_rows": (0, True),    # 0: no limit
    "reload_interval": (0, True),            # 0: no polling (SIGHUP still reloads)
}
# The earlier proxies' environment names (after the project's own, which wins), in order.
SEED_ENV_ALIASES: Dict[str, Tuple[str, ...]] = {
    "host": ("HOST", "BIND_ADDRESS", "ANTHROPIC_PROXY_HOST"),        # seeds 001/002/004, 000, 003
    "port": ("PORT", "ANTHROPIC_PROXY_PORT"),                        # PORT: also container platforms
    "log_level": ("ANTHROPIC_PROXY_LOG_LEVEL",),                     # seed 003
    "read_timeout": ("REQUEST_TIMEOUT",),                            # seeds 000, 002
    "ca_bundle": ("CA_BUNDLE_PATH",),                                # seed 002
    "log_file": ("LOG_FILE_PATH",),                                  # seeds 001, 004
    "models_file": ("CUSTOM_MODELS_FILE",),                          # seeds 001, 004
    "import_token_file": ("ANTHROPIC_PROXY_TOKEN_FILE", "TOKEN_FILE"),   # seeds 003, 000
}
CUSTOM_HEADER_PREFIX = "CUSTOM_HEADER_"                              # seed 002: CUSTOM_HEADER_X_A -> X-A
# Client request headers forwarded to an anthropic-format upstream: an allow-list, so nothing a
# client invents (hop-by-hop, credentials, cookies, proxy or framing headers) reaches it.
CLIENT_HEADERS_FORWARDED = frozenset(("accept", "user-agent", "x-app", "idempotency-key"))
CLIENT_HEADER_PREFIXES_FORWARDED = ("anthropic-", "x-stainless-", "x-claude-code-")
# Upstream response headers relayed to the client.
RELAYED_HEADERS = ("request-id", "x-request-id", "retry-after", "retry-after-ms",
                   "x-should-retry", "anthropic-organization-id")
RELAYED_PREFIXES = ("anthropic-ratelimit-", "x-ratelimit-")
OAUTH_KEYS = ("client_id", "authorize_url", "token_url", "redirect_uri", "scope", "long_lived_scope")
RETRYABLE_STATUS = frozenset((408, 409, 429, 500, 502, 503, 504, 529))
FALLBACK_STATUS = frozenset((429, 500, 502, 503, 504, 529))
MAX_RETRY_AFTER = 600.0              # seconds: the longest wait an upstream's retry-after may impose
MODELS_TTL = 300.0                   # seconds a provider's own /v1/models list is reused
MODELS_FETCH_TIMEOUT = 5.0           # a provider's /v1/models may delay a listing this long
MAX_MODEL_LISTS = 64                 # providers' lists kept (one per provider and credential)

# ---- Model facts ----------------------------------------------------------------------------
# Every fact the proxy needs about a Claude model lives in MODEL_TABLE; code asks model_facts()
# (section 3) and never reads a model name itself. Rows are in release order, as Claude Code
# 2.1.332's own model catalog and release list have them (PROTOCOLS B.2, H.1, H.2). A name that
# is not in the table behaves like the oldest row of its family released after it, else like
# the newest row of its family, else (an unknown family) like the newest row of all: an unknown
# future id gets the newest rules, never the oldest. A config `models[]` entry overrides any
# column (`max_tokens` overrides `output`); names that are no Claude id at all (`deepseek-chat`,
# `gpt-5`) get GENERIC_MODEL_FACTS. Columns:
#   family, version  what the id names; the lookup key
#   output           largest max_tokens the model accepts
#   context          context window without betas; one_m: the context-1m beta is accepted
#   thinking         how thinking is asked for: "adaptive" (thinking.type adaptive plus
#                    output_config.effort), "budget" (thinking.budget_tokens) or "none"
#   efforts          output_config.effort values accepted (() where the model has no effort)
#   sampling         temperature/top_p/top_k: "any"; "exclusive" (temperature and top_p not
#                    together); "none" (rejected, even at their defaults)
#   mid_system       role "system" messages inside `messages` accepted (with the beta)
#   listed           a current model, listed by GET /v1/models
EFFORT_ORDER = ("none", "minimal", "low", "medium", "high", "xhigh", "max")   # also every value
# the openai SDK types allow for reasoning_effort: the default effort list of openai-format models
EFFORTS_ALL = ("low", "medium", "high", "xhigh", "max")
EFFORTS_NO_XHIGH = ("low", "medium", "high", "max")
MODEL_COLUMNS = ("id", "family", "version", "display_name", "output", "context", "one_m", "thinking",
                 "efforts", "sampling", "mid_system", "listed")
MODEL_TABLE: Tuple[tuple, ...] = (
    # id                  family    version  display name          output  context  1M    thinking   efforts           sampling     mid-sys listed
    ("claude-3-5-haiku", "haiku", (3, 5), "Claude Haiku 3.5", 8192, 200000, False, "none", (), "any", False, False),
    ("claude-3-5-sonnet", "sonnet", (3, 5), "Claude Sonnet 3.5", 8192, 200000, False, "none", (), "any", False, False),
    ("claude-3-7-sonnet", "sonnet", (3, 7), "Claude Sonnet 3.7", 64000, 200000, False, "budget", (), "any", False, False),
    ("claude-opus-4-0", "opus", (4, 0), "Claude Opus 4", 32000, 200000, False, "budget", (), "any", False, False),
    ("claude-sonnet-4-0", "sonnet", (4, 0), "Claude Sonnet 4", 64000, 200000, True, "budget", (), "any", False, False),
    ("claude-opus-4-1", "opus", (4, 1), "Claude Opus 4.1", 32000, 200000, False, "budget", (), "exclusive", False, False),
    ("claude-sonnet-4-5", "sonnet", (4, 5), "Claude Sonnet 4.5", 64000, 200000, True, "budget", (), "exclusive", False, True),
    ("claude-haiku-4-5", "haiku", (4, 5), "Claude Haiku 4.5", 64000, 200000, False, "budget", (), "exclusive", False, True),
    ("claude-opus-4-5", "opus", (4, 5), "Claude Opus 4.5", 64000, 200000, False, "budget", (), "exclusive", False, True),
    ("claude-opus-4-6", "opus", (4, 6), "Claude Opus 4.6", 128000, 200000, True, "budget", EFFORTS_NO_XHIGH, "exclusive", False, True),
    ("claude-sonnet-4-6", "sonnet", (4, 6), "Claude Sonnet 4.6", 128000, 200000, True, "budget", EFFORTS_NO_XHIGH, "exclusive", False, True),
    ("claude-opus-4-7", "opus", (4, 7), "Claude Opus 4.7", 128000, 1000000, True, "adaptive", EFFORTS_ALL, "none", False, True),
    ("claude-opus-4-8", "opus", (4, 8), "Claude Opus 4.8", 128000, 1000000, True, "adaptive", EFFORTS_ALL, "none", True, True),
    ("claude-mythos-5", "mythos", (5, 0), "Claude Mythos 5", 128000, 1000000, True, "adaptive", EFFORTS_ALL, "none", True, True),
    ("claude-fable-5", "fable", (5, 0), "Claude Fable 5", 128000, 1000000, True, "adaptive", EFFORTS_ALL, "none", True, True),
    ("claude-sonnet-5", "sonnet", (5, 0), "Claude Sonnet 5", 128000, 1000000, True, "adaptive", EFFORTS_ALL, "none", True, True),
    ("claude-opus-5", "opus", (5, 0), "Claude Opus 5", 128000, 1000000, True, "adaptive", EFFORTS_ALL, "none", True, True),
    ("claude-mythos-5-1", "mythos", (5, 1), "Claude Mythos 5.1", 128000, 1000000, True, "adaptive", EFFORTS_ALL, "none", True, True),
    ("claude-fable-5-1", "fable", (5, 1), "Claude Fable 5.1", 128000, 1000000, True, "adaptive", EFFORTS_ALL, "none", True, True),
    ("claude-opus-5-5", "opus", (5, 5), "Claude Opus 5.5", 128000, 1000000, True, "adaptive", EFFORTS_ALL, "none", True, True),
    ("claude-sonnet-5-5", "sonnet", (5, 5), "Claude Sonnet 5.5", 128000, 1000000, True, "adaptive", EFFORTS_ALL, "none", True, True),
    ("claude-haiku-5-5", "haiku", (5, 5), "Claude Haiku 5.5", 128000, 1000000, True, "adaptive", EFFORTS_ALL, "none", True, True),
    ("claude-mythos-5-2", "mythos", (5, 2), "Claude Mythos 5.2", 128000, 1000000, True, "adaptive", EFFORTS_ALL, "none", True, True),
    ("claude-fable-5-2", "fable", (5, 2), "Claude Fable 5.2", 128000, 1000000, True, "adaptive", EFFORTS_ALL, "none", True, True),
)
# Facts of a name that is no Claude id: no clamp, budget thinking, sampling accepted, efforts
# as the dialect allows (None), mid-conversation system as the provider says (None).
GENERIC_MODEL_FACTS: Dict[str, Any] = {
    "id": None, "family": None, "version": None, "display_name": None, "output": None, "context": None,
    "one_m": False, "thinking": "budget", "efforts": None, "sampling": "any", "mid_system": None, "listed": False}
# Short names -> the id they stand for (Claude Code's tier names, Anthropic's undated aliases).
# The config's model aliases extend this table.
MODEL_ALIASES: Dict[str, str] = {
    "opus": "claude-opus-5-5", "sonnet": "claude-sonnet-5-5", "haiku": "claude-haiku-5-5",
    "fable": "claude-fable-5-2", "mythos": "claude-mythos-5-2",
    "claude-opus-4": "claude-opus-4-0", "claude-sonnet-4": "claude-sonnet-4-0",
    # anthropic-max-proxy's names (seed 003)
    "claude-opus": "claude-opus-4-0", "claude-sonnet": "claude-sonnet-4-0",
    "claude-3.5-sonnet": "claude-3-5-sonnet-20241022", "claude-3.5-haiku": "claude-3-5-haiku-20241022",
    # anthropic-claude-max-proxy's short ids (seed 000)
    "sonnet-4-5": "claude-sonnet-4-5-20250929", "haiku-4-5": "claude-haiku-4-5-20251001",
    "opus-4-1": "claude-opus-4-1-20250805", "sonnet-4": "claude-sonnet-4-20250514"}
# Model spec key (config models[]) -> the fact it overrides.
FACT_OVERRIDES = {"max_tokens": "output", "context": "context", "one_m": "one_m", "thinking": "thinking",
                  "efforts": "efforts", "sampling": "sampling", "mid_system": "mid_system"}

# List prices in USD per million tokens: (input, output, cache read, cache write), as published
# by each vendor on PRICES_AS_OF. A row's pattern is matched at the start of the upstream model
# name (lower case, any "vendor/" prefix dropped); the first match wins, so specific rows come
# first. A models[] entry's *_cost_per_token keys override a row key by key. A missing cache
# price falls back to the input price; a model with no row and no configured price has no cost
# (null), never zero. Output prices cover thinking / reasoning tokens, which vendors bill as
# output. Rows marked "tier" carry the family's current price forward to a newer version whose
# list price this table has not confirmed; long-context (>200k) surcharges are not modelled.
PRICES_AS_OF = "2026-11-30"
MODEL_PRICES: Tuple[Tuple[str, Tuple[float, float, Optional[float], Optional[float]]], ...] = (
    (r"claude-opus-4-[5-9]|claude-opus-4\.[5-9]", (5.0, 25.0, 0.50, 6.25)),
    (r"claude-opus-[5-9]", (5.0, 25.0, 0.50, 6.25)),                      # tier
    (r"claude-opus-4|claude-3-opus", (15.0, 75.0, 1.50, 18.75)),
    (r"claude-sonnet-[4-9]|claude-3-[57]-sonnet", (3.0, 15.0, 0.30, 3.75)),  # 5.x: tier
    (r"claude-haiku-[4-9]", (1.0, 5.0, 0.10, 1.25)),                      # 5.x: tier
    (r"claude-3-5-haiku", (0.80, 4.0, 0.08, 1.0)),
    (r"gpt-4o-mini", (0.15, 0.60, 0.075, None)),
    (r"gpt-4o", (2.50, 10.0, 1.25, None)),
    (r"gpt-4\.1-nano", (0.10, 0.40, 0.025, None)),
    (r"gpt-4\.1-mini", (0.40, 1.60, 0.10, None)),
    (r"gpt-4\.1", (2.0, 8.0, 0.50, None)),
    (r"gpt-5(\.\d+)?-nano", (0.05, 0.40, 0.005, None)),
    (r"gpt-5(\.\d+)?-mini", (0.25, 2.0, 0.025, None)),
    (r"gpt-5\.2", (1.75, 14.0, 0.175, None)),
    (r"gpt-5(\.1)?(?![.\d])", (1.25, 10.0, 0.125, None)),
    (r"deepseek-(chat|reasoner)", (0.28, 0.42, 0.028, None)),
    (r"gemini-2\.5-pro", (1.25, 10.0, 0.125, None)),
    (r"gemini-2\.5-flash-lite", (0.10, 0.40, 0.01, None)),
    (r"gemini-2\.5-flash", (0.30, 2.50, 0.03, None)),
)
PRICE_KEYS = ("input_cost_per_token", "output_cost_per_token", "cache_read_cost_per_token",
              "cache_write_cost_per_token")

# =============================================================================================
# 2. Errors
# =============================================================================================


class ConfigError(Exception):
    """Invalid configuration; the message names the key path. A value in it shaped like a
    credential is masked (mask_secret_shapes, section 3): a key pasted into base_url is not echoed
    by the start, the reload log or the status page."""

    def __init__(self, message: str):
        super().__init__(mask_secret_shapes(message))


class ConfigMissing(ConfigError):
    """The config file in use vanished (an editor saving by unlink and create): a reload keeps the
    running config and is retried when the file is back."""


class ProxyError(Exception):
    """Base of every error the proxy renders; carries HTTP status and API error type."""
    status = 500
    error_type = "api_error"
    retryable: Optional[bool] = None      # False: rendered with x-should-retry: false

    def __init__(self, message: str, *, param: Optional[str] = None,
                 status: Optional[int] = None, error_type: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type


class BadRequest(ProxyError):
    status = 400
    error_type = "invalid_request_error"


class AuthError(ProxyError):
    status = 401
    error_type = "authentication_error"


class LoginDead(AuthError):
    """The Claude login expired or was revoked: retrying cannot help (the user must log in)."""
    retryable = False


class WrongProxyKey(AuthError):
    """A client without the proxy's key: it must change its key, so a retry cannot help (Claude
    Code retries a plain 401 silently for about three minutes)."""
    retryable = False


class CredentialMissing(ProxyError):
    """The proxy itself lacks a credential a route needs. A 400 that says not to retry: Claude
    Code shows it at once (a 401 it retries silently for about three minutes)."""
    status = 400
    error_type = "invalid_request_error"
    retryable = False


class PermissionDenied(ProxyError):
    status = 403
    error_type = "permission_error"


class NotFound(ProxyError):
    status = 404
    error_type = "not_found_error"


class PayloadTooLarge(ProxyError):
    status = 413
    error_type = "request_too_large"


class UnsupportedMediaType(ProxyError):
    status = 415
    error_type = "invalid_request_error"


class HeaderTooLarge(ProxyError):
    status = 431
    error_type = "invalid_request_error"


class URITooLong(ProxyError):
    status = 414
    error_type = "invalid_request_error"


class HTTPVersionNotSupported(ProxyError):
    status = 505
    error_type = "invalid_request_error"


class PluginError(ProxyError):
    """A plugin's hook raised or returned something unusable; the message names the plugin."""
    status = 500
    error_type = "api_error"


class UpstreamError(ProxyError):
    """The upstream failed or answered something we cannot use."""
    status = 502
    error_type = "api_error"


class MalformedStream(UpstreamError):
    """An upstream stream event a converter could not take; `converted` holds the client events
    made before it from the same read, which the client gets before the error."""

    def __init__(self, message: str, converted: List[Any]):
        super().__init__(message)
        self.converted = converted


class UpstreamTimeout(UpstreamError):
    status = 504
    error_type = "timeout_error"


class UpstreamStatus(ProxyError):
    """The upstream answered an HTTP error; the body is kept to relay or convert."""

    def __init__(self, status: int, headers: Dict[str, str], body: bytes):
        super().__init__(f"upstream answered {status}", status=status,
                         error_type=ERROR_TYPE_BY_STATUS.get(status, "api_error"))
        self.headers = headers
        self.body = body


ERROR_TYPE_BY_STATUS = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 408: "timeout_error",
    409: "invalid_request_error", 413: "request_too_large", 422: "invalid_request_error",
    429: "rate_limit_error", 500: "api_error", 502: "api_error", 503: "overloaded_error",
    504: "timeout_error", 529: "overloaded_error",
}

# =============================================================================================
# 3. Utilities
# =============================================================================================

_TOOL_ID_BAD = re.compile(r"[^A-Za-z0-9_-]")
_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_json_scan = json.JSONDecoder().scan_once


def _c_json_encoder() -> Optional[Callable[[Any, int], Any]]:
    """CPython's C encoder configured like _json_encoder, or None where it is missing."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    return make(None, _json_encoder.default, json.encoder.encode_basestring, None, ":", ",",
                False, False, True)


_json_c_encode = _c_json_encoder()


def new_id(prefix: str) -> str:
    """A fresh random id such as msg_..., toolu_..., chatcmpl-...."""
    return prefix + secrets.token_hex(12)


def sanitize_tool_id(tool_id: Optional[str]) -> str:
    """Map any tool id onto ^[A-Za-z0-9_-]+$ deterministically (same input, same output)."""
    if not tool_id:
        return new_id("toolu_")
    return _TOOL_ID_BAD.sub("_", str(tool_id))


def json_text(obj: Any) -> str:
    """Compact JSON text, UTF-8 kept as is (the C encoder straight, on the per-chunk path)."""
    if _json_c_encode is None or not isinstance(obj, dict):
        return _json_encoder.encode(obj)
    return "".join(_json_c_encode(obj, 0))


# JSON lets a surrogate escape stand alone ("\\ud800"), json.loads(bytes) lets raw surrogate bytes
# through, and UTF-8 can carry neither: every JSON text the proxy takes in (a client's body, an
# upstream's answer or event, JSON nested in a string) is parsed by loads_json or loads_event,
# which put U+FFFD in place of each lone surrogate, so no text beyond them (hashes, sqlite, SSE,
# the upstream call, log lines) ever meets one.
_LONE_SURROGATE_ESCAPE = (r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
                          r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_LONE_SURROGATE_IN_TEXT = re.compile(_LONE_SURROGATE_ESCAPE)
_LONE_SURROGATE_IN_BYTES = re.compile(_LONE_SURROGATE_ESCAPE.encode("ascii"))
_SURROGATE_BYTES = re.compile(rb"\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def may_hold_lone_surrogate(json_source: Any) -> bool:
    """Whether JSON text or bytes may parse to a lone surrogate (a cheap scan; false positives
    only cost a walk)."""
    if isinstance(json_source, str):
        return "\\u" in json_source and _LONE_SURROGATE_IN_TEXT.search(json_source) is not None
    if json.detect_encoding(json_source) != "utf-8":          # UTF-16 or -32: not worth a scan
        return True
    return (b"\\u" in json_source and _LONE_SURROGATE_IN_BYTES.search(json_source) is not None) or \
        (b"\xed" in json_source and _SURROGATE_BYTES.search(json_source) is not None)


def without_lone_surrogates(value: Any) -> Any:
    """A parsed JSON value with U+FFFD for each lone surrogate, in keys and strings alike."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {without_lone_surrogates(key): without_lone_surrogates(item) for key, item in value.items()}
    return value


def loads_json(json_source: Any, **kw: Any) -> Any:
    """json.loads whose strings all encode as UTF-8 (see above)."""
    value = json.loads(json_source, **kw)
    return without_lone_surrogates(value) if may_hold_lone_surrogate(json_source) else value


def loads_event(text: str) -> Any:
    """loads_json for one stream event: the C scanner first, json.loads for anything unusual."""
    try:
        value, end = _json_scan(text, 0)
        if end == len(text):
            return without_lone_surrogates(value) if may_hold_lone_surrogate(text) else value
    except (StopIteration, ValueError):
        pass
    return loads_json(text)


def json_bytes(obj: Any) -> bytes:
    """Compact JSON as UTF-8 bytes."""
    return _json_encoder.encode(obj).encode("utf-8")


def _reject_constant(name: str) -> Any:
    """json parse_constant hook: NaN and Infinity are not JSON (RFC 8259)."""
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes, what: str = "request body") -> Any:
    """Parse JSON bytes or raise BadRequest naming what was malformed (NaN, over-deep nesting)."""
    try:
        return loads_json(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None


def token_count(value: Any) -> int:
    """A usage counter as a sane int: negative, non-finite, huge or non-numeric values count 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    if value != value or not 0 <= value < 1 << 53:
        return 0
    return int(value)


_CONTROL_CHARS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")


def _escape_char(match: "re.Match[str]") -> str:
    """One control character or lone surrogate as a visible escape."""
    code = ord(match.group())
    return {10: "\\n", 13: "\\r"}.get(code) or ("\\x%02x" % code if code < 256 else "\\u%04x" % code)


def log_safe(text: str) -> str:
    """Text with control characters (CR, LF, ESC, ...) and lone surrogates escaped, for one log line."""
    return _CONTROL_CHARS.sub(_escape_char, text) if _CONTROL_CHARS.search(text) else text


_SECRET_KEY = re.compile(r"key|token|secret|passw|auth|credential|cookie|session|signature",
                         re.IGNORECASE)
_SECRET_VALUE = re.compile(r"^(?:(?:bearer|basic)\s+\S+|(?:sk|pk|rk|ak)-\S{8,}|eyJ[\w-]+\.[\w-]+\.[\w-]+"
                           r"|(?=[^-]*(?:-[^-]*){0,2}$)(?=.*\d)(?=.*[A-Za-z])[A-Za-z0-9_\-]{32,})$", re.IGNORECASE)


def looks_secret(key: str, value: Any) -> bool:
    """Whether a configured header or body value is likely a credential (by its key or its shape)."""
    if not isinstance(value, str) or not value:
        return False
    return bool(_SECRET_KEY.search(key) or _SECRET_VALUE.match(value.strip()))


_WORD = re.compile(r"(?i)\b(?:bearer|basic)\s+[^\s'\",]+|[^\s'\"=&?/:@,;()<>\[\]{}]{8,}")


def mask_secret_shapes(text: str) -> str:
    """Text with every word shaped like a credential (sk-..., a JWT, a long random token,
    `Bearer ...`) masked, for text the Redactor's list cannot know (a key pasted in a config)."""
    return _WORD.sub(lambda m: mask(m.group()) if looks_secret("", m.group()) else m.group(), text)


def key_label(key: str) -> str:
    """An API key by its last four characters only (check-config, stats, the ledger)."""
    return "..." + key[-4:] if len(key) > 8 else "(short key)"


def mask(secret: str) -> str:
    """A recognisable but useless rendering of a secret, for logs and check-config."""
    return secret[:6] + "..." + "(redacted)" if len(secret) > 12 else "(redacted)"


class Redactor(logging.Filter):
    """The one redaction helper: knows every secret and scrubs them from any text."""

    def __init__(self, secret_values: Iterable[str] = ()):
        super().__init__()
        self._secrets: set = set()
        for value in secret_values:
            self.add(value)

    def add(self, value: Optional[str]) -> None:
        """Remember a secret (ignores empty and very short values)."""
        if value and len(value) >= 8:
            self._secrets.add(value)

    def scrub(self, text: str) -> str:
        """Replace every known secret in text by its mask."""
        for value in self._secrets:
            if value in text:
                text = text.replace(value, mask(value))
        return text

    def clip(self, text: str, limit: int, shapes: bool = True) -> str:
        """Text to show or log, at most `limit` characters: secrets masked first (the known ones,
        and with `shapes` any credential-shaped word), then cut, so no cut leaves part of a key."""
        text = self.scrub(text)
        return mask_secret_shapes(text[:limit + 256])[:limit] if shapes else text[:limit]

    def filter(self, record: logging.LogRecord) -> bool:
        """logging.Filter hook: render the message once, scrubbed and on one line."""
        message = log_safe(record.getMessage())
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        record.msg, record.args = self.scrub(message), None
        return True


def parse_size(value: Any, path: str) -> Optional[int]:
    """Token counts with shorthand: 8192, "8k" (8192), "1m" (1048576); None stays None."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", str(value))
    if not match:
        raise ConfigError(f"{path}: expected a token count such as 8192 or \"8k\"")
    scale = {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()]
    return int(match.group(1)) * scale


def parse_bool(value: Any) -> bool:
    """Booleans from JSON or environment strings."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def iso_time(epoch: float) -> str:
    """RFC 3339 UTC timestamp."""
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


async def run_off_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """Run blocking work (disk, database, a big conversion) in the default thread pool."""
    return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args))


def read_regular_file(path: str) -> bytes:
    """A regular file's bytes, opened without blocking: at a FIFO, a device or a folder it raises
    OSError at once instead of waiting for a writer that may never come."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("not a regular file (a FIFO, a device or a folder?)")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


class DaemonWorkers:
    """Up to `size` daemon threads for work that may hang for good (foreign code, a hung mount):
    it never holds up the loop, the default pool's threads or the process's exit. Threads start
    on demand and stay; one that hangs is left behind, and later work goes to the others."""

    def __init__(self, size: int, name: str):
        self.size, self.name = size, name
        self._jobs: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = self._idle = 0

    def submit(self, fn: Callable[[], Any]) -> "asyncio.Future[Any]":
        """fn() on a worker; the future its outcome settles (a late outcome nobody awaits is dropped)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        future.add_done_callback(lambda done: done.cancelled() or done.exception())   # retrieved: no GC warning
        self._jobs.put((fn, loop, future))
        with self._lock:
            if self._idle == 0 and self._threads < self.size:
                self._threads += 1
                threading.Thread(target=self._work, name=f"{self.name}-{self._threads}", daemon=True).start()
        return future

    async def run(self, fn: Callable[[], Any], timeout: float) -> Any:
        """fn() on a worker, awaited at most `timeout` seconds (asyncio.TimeoutError after)."""
        return await asyncio.wait_for(asyncio.shield(self.submit(fn)), timeout)

    def _work(self) -> None:
        """A worker: jobs until the process ends."""
        while True:
            with self._lock:
                self._idle += 1
            fn, loop, future = self._jobs.get()
            with self._lock:
                self._idle -= 1
            try:
                result, error = fn(), None
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                result, error = None, exc if isinstance(exc, Exception) else RuntimeError(f"{self.name}: {exc!r}")
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:
                pass                              # the loop is gone: nobody waits any more


def _settle(future: "asyncio.Future[Any]", result: Any, error: Optional[BaseException]) -> None:
    """A worker's outcome into its future, unless that was given up (cancelled) already."""
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(result)


def ensure_private_dir(path: str) -> str:
    """The state directory, created 0700, or tightened to 0700 when it already exists with
    looser modes (0777 stays 0777 otherwise); returns the path."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.stat(path)
    owned = not hasattr(os, "getuid") or info.st_uid == os.getuid()
    if info.st_mode & 0o077 and owned and os.name == "posix":
        os.chmod(path, 0o700)
        log.warning("%s was mode %o; tightened to 0700 (it holds credentials)", path, stat.S_IMODE(info.st_mode))
    elif info.st_mode & 0o077 and os.name == "posix":
        log.warning("%s is mode %o and owned by another user: others may read its credentials",
                    path, stat.S_IMODE(info.st_mode))
    return path


def open_no_follow(path: str, flags: int, mode: int = 0o600) -> int:
    """os.open that refuses a symbolic link at `path` (a planted link must not be followed)."""
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), mode)
    except OSError as exc:
        if os.path.islink(path):
            raise PermissionError(f"{path} is a symbolic link; refusing to follow it") from None
        raise exc


_IPV4_LITERAL = re.compile(r"[0-9a-fx.]+")


def ip_literal(host: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    """The address an IP literal names, as a resolver reads it (127.1 and 0x7f.1 too; [::1];
    ::ffff:127.0.0.1 as its IPv4 address); None for a host name."""
    host = host.strip().strip("[]").split("%", 1)[0].lower()
    try:
        if ":" in host:
            address = ipaddress.IPv6Address(host)
            return address.ipv4_mapped or address
        if _IPV4_LITERAL.fullmatch(host):
            return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        pass
    return None


def is_loopback(host: str) -> bool:
    """A loopback address (127.0.0.0/8, ::1) written as an IP literal, or the name localhost;
    never a name that only starts like one (127.example.com)."""
    if host.strip().lower() == "localhost":
        return True
    address = ip_literal(host)
    return address is not None and address.is_loopback

# ---- model facts (the table is in section 1) ------------------------------------------------

_CLAUDE_ID = re.compile(r"claude-(?:(?P<fam>[a-z]+)-(?P<major>\d{1,2})(?!\d)(?:-(?P<minor>\d{1,2})(?!\d))?"
                        r"|(?P<lmajor>\d{1,2})(?!\d)(?:-(?P<lminor>\d{1,2})(?!\d))?-(?P<lfam>[a-z]+))")


def canonical_model_name(name: str, aliases: Mapping[str, str] = MODEL_ALIASES) -> str:
    """A model name as the table spells it: lower case, no vendor prefix, no [1m], dashes, alias resolved."""
    name = name.strip().lower().rsplit("/", 1)[-1].replace("[1m]", "")
    name = name.split("anthropic.", 1)[-1]                     # Bedrock: us.anthropic.claude-...
    name = re.sub(r"(claude-(?:[a-z]+-)?\d{1,2})\.(?=\d)", r"\1-", name)   # claude-opus-4.8
    return aliases.get(name, name)


def claude_id_parts(name: str) -> Optional[Tuple[str, Tuple[int, int]]]:
    """(family, (major, minor)) of a Claude model name in any spelling, or None."""
    m = _CLAUDE_ID.search(canonical_model_name(name))
    if not m:
        return None
    if m.group("fam"):
        return m.group("fam"), (int(m.group("major")), int(m.group("minor") or 0))
    return m.group("lfam"), (int(m.group("lmajor")), int(m.group("lminor") or 0))


def _table_row(family: str, version: Tuple[int, int]) -> tuple:
    """The row a (family, version) follows: itself, the next one of its family, its family's newest, the newest."""
    same = [row for row in MODEL_TABLE if row[1] == family]
    later = [row for row in same if row[2] >= version]
    return later[0] if later else same[-1] if same else MODEL_TABLE[-1]


def model_facts(name: str, spec: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Facts of a model (MODEL_COLUMNS keys) from MODEL_TABLE, a config spec's keys overriding."""
    parts = claude_id_parts(name) if isinstance(name, str) else None
    facts = dict(zip(MODEL_COLUMNS, _table_row(*parts))) if parts else dict(GENERIC_MODEL_FACTS)
    for key, fact in FACT_OVERRIDES.items():
        if spec and spec.get(key) is not None:
            facts[fact] = spec[key]
    return facts


def fold_effort(effort: str, accepted: Iterable[str]) -> str:
    """The effort itself when accepted, else the highest accepted one below it, else the lowest accepted."""
    accepted = [e for e in EFFORT_ORDER if e in accepted]
    if effort in accepted or not accepted:
        return effort
    below = [e for e in accepted if EFFORT_ORDER.index(e) < EFFORT_ORDER.index(effort)]
    return below[-1] if below else accepted[0]

# =============================================================================================
# 4. Config
#
# One flow: built-in defaults < JSON config file < .env in the working directory < environment
# < CLI flags. Each layer is a raw dict of the file's shape; merge_raw() stacks them and
# parse_config() validates once, naming the key path of anything wrong. Nothing after main()
# reads os.environ: the environment is passed in as a mapping.
# =============================================================================================

PROVIDER_FORMATS = ("anthropic", "openai")
AUTH_MODES = ("auto", "oauth", "api_key", "client", "none")
SPECIAL_ROUTES = ("default", "background", "think", "long_context")
MODEL_DEFAULTS: Dict[str, Any] = {
    "max_tokens": None, "max_completion_tokens": False, "reasoning_param": "reasoning_effort",
    "replay_reasoning": None, "reasoning_effort": None, "schema": None, "extra_body": {},
    "context": None, "thinking": None, "headers": {}, "fallback": [], "owned_by": None,
    "min_tokens": None, "max_input_tokens": None, "can_stream": True, "thinking_effort": None,
    "input_cost_per_token": None, "output_cost_per_token": None,
    "cache_read_cost_per_token": None, "cache_write_cost_per_token": None,
    "efforts": None, "sampling": None, "one_m": None, "mid_system": None, "prompt_cache_key": None,
}
# Model keys that override a model-table fact or a provider default; None = not set.
MODEL_CHOICES = {"thinking": ("budget", "adaptive", "none"), "sampling": ("any", "exclusive", "none"),
                 "schema": ("gemini",)}
MODEL_FLAGS = ("one_m", "mid_system", "prompt_cache_key")
KEY_STRATEGIES = ("fill_first", "round_robin")
PROVIDER_KEYS = frozenset({"format", "base_url", "api_key", "api_keys", "api_key_env", "key_strategy", "auth", "headers",
                           "azure", "api_version", "responses", "mid_system", "prompt_cache_key",
                           "replay_reasoning", "tag_signatures", "anthropic_version"})
CUSTOM_MODEL_KEYS = frozenset({"id", "base_url", "api_key", "context_length", "max_completion_tokens",
                               "supports_reasoning", "owned_by", "vision", "supports_vision"})
CONFIG_SECTIONS = frozenset({"providers", "models", "routes", "oauth", "custom_models", "aliases",
                             "plugins", "filter_tools"})
# What a key from one of the earlier proxies is called here (for "did you mean" hints).
SEED_KEY_HINTS = {"model_name": "model", "model_id": "id", "api_base": "base_url (on its provider)",
                  "api_key_name": "api_key_env (on its provider)", "extra_headers": "headers",
                  "direct": "a provider with \"format\": \"anthropic\""}
BUILTIN_PROVIDER = {"format": "anthropic", "api_key_env": "ANTHROPIC_API_KEY", "auth": "auto"}
# Provider defaults by upstream host; the provider's own key wins (README "Providers").
REPLAY_REASONING_HOSTS = ("api.deepseek.com", "api.moonshot.ai", "api.moonshot.cn", "open.bigmodel.cn",
                          "api.z.ai")      # thinking modes that 400 a tool-call turn without its reasoning
REPLAY_REASONING_MODELS = ("deepseek", "kimi", "moonshot", "glm")   # the same, by model name (OpenRouter...)
PROMPT_CACHE_KEY_HOSTS = ("api.openai.com",)
NATIVE_SIGNATURE_HOSTS = ("api.anthropic.com",)   # besides the built-in provider: Anthropic signs here
PROVIDER_FLAGS = ("mid_system", "prompt_cache_key", "tag_signatures")
# A provider key in the environment that no provider reads -> what would use it (a start warning).
UNUSED_KEY_HINTS = {
    "OPENAI_API_KEY": "set BIG_MODEL (and OPENAI_BASE_URL) to send Claude Code to an OpenAI-compatible "
                      "provider; OpenAI clients are served by Claude",
    "GEMINI_API_KEY": "for Gemini, add a provider {\"format\": \"openai\", \"base_url\": "
                      "\"https://generativelanguage.googleapis.com/v1beta/openai\", \"api_key_env\": \"GEMINI_API_KEY\"}",
}


class Config:
    """The parsed configuration: settings, providers, models and routes; read-only after load."""

    def __init__(self, settings: Dict[str, Any], providers: Dict[str, dict],
                 models: Dict[str, dict], routes: Dict[str, dict], oauth: Dict[str, Any]):
        self.settings = settings
        self.providers = providers
        self.models = models
        self.routes = routes
        self.oauth = oauth
        self.origins: Dict[str, str] = {}      # "settings.port" / "providers.x.base_url" -> where from
        self.files: Dict[str, Optional[str]] = {"config": None, "dotenv": None, "models": None}
        self.warnings: List[str] = []          # unknown keys, missing keys, notes for the start
        self.aliases: Dict[str, str] = dict(MODEL_ALIASES)   # client model name -> routed name
        self.proxy_key_var = "PROXY_API_KEY"   # the variable holding the key clients send
        self.plugin_folder: Optional[str] = None   # <home>/plugins of the trusted home; None: settings' home

    @property
    def home(self) -> str:
        """The state directory (tokens), expanded."""
        return os.path.expanduser(self.settings["home"])

    def secret_values(self) -> List[str]:
        """Every secret the config holds, for the redactor: keys, tokens, secret-looking
        header and extra_body values."""
        values = [k for p in self.providers.values() for k in p.get("api_keys") or [p.get("api_key")] if k]
        values += [self.settings.get("proxy_api_key"), self.settings.get("oauth_token")]
        for item in list(self.providers.values()) + list(self.models.values()):
            values += [v for _, v in secret_leaves(item.get("headers"))]
            values += [v for _, v in secret_leaves(item.get("extra_body"))]
        values += [v.split(None, 1)[1] for v in values if v and re.match(r"(?i)(bearer|basic)\s+\S", v)]
        return [v for v in values if v]


def secret_leaves(node: Any, key: str = "") -> List[Tuple[str, str]]:
    """(key, value) of every string under node that looks like a credential."""
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in secret_leaves(v, str(k))]
    if isinstance(node, list):
        return [leaf for v in node for leaf in secret_leaves(v, key)]
    return [(key, node)] if looks_secret(key, node) else []


def masked_copy(node: Any, key: str = "") -> Any:
    """A copy of a headers / extra_body value with every secret-looking string masked."""
    if isinstance(node, dict):
        return {k: masked_copy(v, str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [masked_copy(v, key) for v in node]
    return mask(node) if looks_secret(key, node) else node


def read_dotenv(path: str) -> Dict[str, str]:
    """KEY=VALUE lines of a .env file, read as python-dotenv reads them: `export`, quotes (double
    with escapes, single literal) and comments, also after a value (` # note`); {} when absent."""
    try:
        lines = read_regular_file(path).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    values = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        key = key[7:].strip() if key.startswith("export ") else key
        values[key] = _dotenv_value(value.strip())
    return values


_DOTENV_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


def _dotenv_value(value: str) -> str:
    """One .env value: a quoted string up to its closing quote, or plain text before ` #`."""
    if value[:1] in ("'", '"'):
        end = value.find(value[0], 1)
        while value[0] == '"' and end > 0 and value[end - 1] == "\\":
            end = value.find('"', end + 1)
        if end > 0:
            inner = value[1:end]
            if value[0] == '"':
                inner = re.sub(r"\\(.)", lambda m: _DOTENV_ESCAPES.get(m.group(1), "\\" + m.group(1)), inner)
            return inner
    return re.split(r"\s+#", value, 1)[0].strip()


def merge_raw(base: dict, over: dict) -> dict:
    """Stack two raw config layers: dicts merge recursively, models merge by id, rest replaced."""
    merged = dict(base)
    for key, value in over.items():
        if key == "models" and isinstance(value, list) and isinstance(base.get(key), list):
            by_id = {m.get("id"): m for m in base[key] if isinstance(m, dict)}
            by_id.update({m.get("id"): m for m in value if isinstance(m, dict)})
            merged[key] = list(by_id.values())
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = merge_raw(base[key], value)
        else:
            merged[key] = value
    return merged


def setting_var(key: str, env: Mapping[str, str]) -> Optional[str]:
    """The environment variable that sets `key`: the project's own name, else a seed's alias."""
    for var in (SETTINGS[key][0],) + SEED_ENV_ALIASES.get(key, ()):
        if env.get(var, "").strip():
            return var
    return None


def env_layer(env: Mapping[str, str]) -> dict:
    """The raw config the environment describes: settings (seed aliases included), the extra
    headers of CUSTOM_HEADER_*, plus the OpenAI quick start."""
    raw: Dict[str, Any] = {}
    for key in SETTINGS:
        var = setting_var(key, env)
        if var:
            raw[key] = env[var].strip()
    token = (env.get("ANTHROPIC_OAUTH_TOKEN") or "").strip() or (env.get("CLAUDE_CODE_OAUTH_TOKEN") or "").strip()
    raw.pop("oauth_token", None)
    if token:
        raw["oauth_token"] = token
    headers = {var[len(CUSTOM_HEADER_PREFIX):].replace("_", "-"): value for var, value in env.items()
               if var.startswith(CUSTOM_HEADER_PREFIX) and len(var) > len(CUSTOM_HEADER_PREFIX)}
    if headers:
        raw["custom_headers"] = headers
    return merge_raw(raw, quickstart_layer(env))


def quickstart_layer(env: Mapping[str, str]) -> dict:
    """OPENAI_BASE_URL / BIG_MODEL / ROUTER_* shortcuts, as the proxies users come from read them."""
    raw: Dict[str, Any] = {}
    if env.get("OPENAI_BASE_URL") or env.get("BIG_MODEL"):
        big = env.get("BIG_MODEL", "gpt-4o")
        middle, small = env.get("MIDDLE_MODEL", big), env.get("SMALL_MODEL", "gpt-4o-mini")
        raw["providers"] = {"openai": {"format": "openai", "api_key_env": "OPENAI_API_KEY",
                                       "base_url": env.get("OPENAI_BASE_URL", DEFAULT_OPENAI_URL)}}
        if not (env.get("OPENAI_API_KEY") or "").strip():   # a local server (Ollama...) needs no key
            raw["providers"]["openai"]["auth"] = "none"
        if env.get("AZURE_API_VERSION"):          # seed 002: Azure OpenAI deployment URL, api-key header
            raw["providers"]["openai"].update(azure=True, api_version=env["AZURE_API_VERSION"])
        limit = env.get("MAX_TOKENS_LIMIT", "16k")
        reasoning = env.get("OPENAI_REASONING_PARAM") or None    # gpt-4o & co. reject reasoning_effort
        raw["models"] = [{"id": name, "provider": "openai", "max_tokens": limit, "reasoning_param": reasoning}
                         for name in dict.fromkeys((big, middle, small))]
        raw["routes"] = {"opus": big, "sonnet": middle, "haiku": small, "background": small,
                         "default": big}
    for route in SPECIAL_ROUTES:
        value = env.get("ROUTER_" + route.upper())
        if value:
            raw.setdefault("routes", {})[route] = value
    return raw


def expand_custom_models(raw: dict) -> dict:
    """Accept anthropic-claude-max-proxy's `custom_models` list as providers plus models."""
    customs = raw.get("custom_models")
    if not customs:
        return raw
    if not isinstance(customs, list):
        raise ConfigError("custom_models: expected a list")
    raw = dict(raw, providers=dict(raw.get("providers") or {}), models=list(raw.get("models") or []))
    for i, item in enumerate(customs):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise ConfigError(f"custom_models.{i}.id: expected a string")
        name = "custom:" + item["id"]
        raw["providers"][name] = {"format": "openai", "base_url": item.get("base_url"),
                                  "api_key": item.get("api_key")}
        raw["models"].append({
            "id": item["id"], "provider": name, "context": item.get("context_length"),
            "max_tokens": item.get("max_completion_tokens"), "owned_by": item.get("owned_by"),
            "reasoning_param": "reasoning_effort" if item.get("supports_reasoning") else None})
    return raw


def parse_config(raw: dict, env: Mapping[str, str], notes: Iterable[str] = ()) -> Config:
    """Validate a stacked raw config; ConfigError names the first bad key path. Unknown keys
    and other doubts become `config.warnings` (errors with `strict`)."""
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a JSON object at the top level")
    warnings = list(notes) + unknown_key_warnings(raw)
    raw = expand_custom_models(raw)
    settings = parse_settings(raw)
    providers = parse_providers(raw.get("providers") or {}, env, settings, warnings)
    models = parse_models(raw.get("models") or [], providers, settings)
    routes_raw = raw.get("routes")
    routes = parse_routes({"default": "anthropic"} if routes_raw is None else routes_raw,
                          models, providers)
    check_fallbacks(models, providers)
    config = Config(settings, providers, models, routes, parse_oauth(raw.get("oauth")))
    config.aliases = dict(MODEL_ALIASES, **parse_aliases(raw.get("aliases")))
    used = {p.get("api_key_env") for p in providers.values()}
    warnings += [f"{var} is set but nothing uses it: {hint}" for var, hint in UNUSED_KEY_HINTS.items()
                 if (env.get(var) or "").strip() and var not in used]
    config.warnings = warnings
    adopt_seed_client_key(config, env)
    if settings["strict"] and warnings:
        raise ConfigError("strict config: " + "; ".join(warnings))
    return config


def parse_aliases(raw: Any) -> Dict[str, str]:
    """The config's `aliases`: model names clients type -> the name routed and sent upstream."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in raw.items()):
        raise ConfigError("aliases: expected an object of model name -> model name")
    return {name.lower(): target for name, target in raw.items()}


def check_fallbacks(models: Dict[str, dict], providers: Dict[str, dict]) -> None:
    """Every fallback names a known model served in the same format."""
    for spec in models.values():
        for j, fallback in enumerate(spec["fallback"]):
            if fallback not in models:
                raise ConfigError(f"models.{spec['id']}.fallback.{j}: unknown model id {fallback!r}")
            if providers[models[fallback]["provider"]]["format"] != providers[spec["provider"]]["format"]:
                raise ConfigError(f"models.{spec['id']}.fallback.{j}: {fallback!r} uses a provider of another format")


def parse_oauth(oauth: Any) -> dict:
    """The `oauth` overrides: known keys with string values only."""
    oauth = oauth or {}
    if not isinstance(oauth, dict):
        raise ConfigError("oauth: expected an object")
    for key, value in oauth.items():
        if key not in OAUTH_KEYS or not isinstance(value, str) or not value.strip():
            raise ConfigError(f"oauth.{key}: expected one of {', '.join(OAUTH_KEYS)} with a string value")
    return oauth


def unknown_key_warnings(raw: dict) -> List[str]:
    """One line per key nothing reads, with the nearest known key (keys starting with _ or $
    are comments)."""
    top = {key: value for key, value in raw.items() if key not in MODEL_DEFAULTS}
    found = [f"{key}: a model setting at the top level, ignored (put it in an entry of models)"
             for key in raw if key in MODEL_DEFAULTS]
    found += _unknown(top, set(SETTINGS) | CONFIG_SECTIONS, "")
    for name, provider in (raw.get("providers") or {}).items() if isinstance(raw.get("providers"), dict) else ():
        found += _unknown(provider, PROVIDER_KEYS, f"providers.{name}.") if isinstance(provider, dict) else []
    for key, known in (("models", set(MODEL_DEFAULTS) | {"id", "provider", "model"}), ("custom_models", CUSTOM_MODEL_KEYS)):
        items = raw.get(key) if isinstance(raw.get(key), list) else []
        for i, item in enumerate(items):
            found += _unknown(item, known, f"{key}.{i}.") if isinstance(item, dict) else []
    return found


def _unknown(node: dict, known: Iterable[str], path: str) -> List[str]:
    """Warnings for the unknown keys of one object."""
    out = []
    for key in node:
        if key in known or str(key).startswith(("_", "$")):
            continue
        import difflib
        near = SEED_KEY_HINTS.get(key) or next(iter(difflib.get_close_matches(key, list(known), 1, 0.6)), None)
        out.append(f"{path}{key}: unknown key, ignored" + (f" (did you mean {near}?)" if near else ""))
    return out


def adopt_seed_client_key(config: Config, env: Mapping[str, str]) -> None:
    """Seed 002's client check: when no route can reach the built-in `anthropic` provider and no
    PROXY_API_KEY is set, ANTHROPIC_API_KEY is the key clients must send (as that proxy did)."""
    if config.settings.get("proxy_api_key") or not env.get("ANTHROPIC_API_KEY"):
        return
    targets = list(config.routes.values()) + list(config.models.values())
    if any(spec["provider"] == "anthropic" for spec in targets):
        return
    if any(p.get("api_key_env") == "ANTHROPIC_API_KEY" for name, p in config.providers.items() if name != "anthropic"):
        return                                    # another provider's upstream key (a seed model file's)
    if any(p["auth"] == "client" for name, p in config.providers.items() if name != "anthropic"):
        return                                    # the client's key is a provider's key (ccproxy mode)
    config.settings["proxy_api_key"], config.proxy_key_var = env["ANTHROPIC_API_KEY"], "ANTHROPIC_API_KEY"
    config.warnings.append("no route reaches Anthropic, so ANTHROPIC_API_KEY is the key clients must "
                           "send (x-api-key or Bearer), as in claude-code-proxy; set PROXY_API_KEY to choose another")


def parse_settings(raw: dict) -> Dict[str, Any]:
    """Typed settings from their raw values, defaults filled."""
    settings = {}
    for key, (_, kind, default) in SETTINGS.items():
        value = raw.get(key, default)
        settings[key] = value if value is None else coerce_setting(key, kind, value)
    if settings["log_level"].upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"log_level: unknown level {settings['log_level']!r}")
    for key, (lowest, inclusive) in SETTING_RANGES.items():
        value = settings[key]
        if value is not None and (value < lowest if inclusive else value <= lowest):
            raise ConfigError(f"{key} (${SETTINGS[key][0]}): expected a number {'>=' if inclusive else '>'} {lowest:g}, "
                              f"got {value!r}")
    if settings["port"] > 65535:
        raise ConfigError("port: expected 1-65535")
    check_url(settings["anthropic_url"], "anthropic_url")
    return settings


def coerce_setting(key: str, kind: str, value: Any) -> Any:
    """One setting converted to its type, or ConfigError naming the key."""
    try:
        if kind in ("int", "float") and isinstance(value, bool):
            raise TypeError                       # JSON true is not the number 1
        if kind == "int":
            number = float(value) if isinstance(value, float) else int(value)
            if number != int(number):
                raise ValueError                  # 8082.7 is not a port, and not silently 8082
            return int(number)
        if kind == "float":
            number = float(value)
            if number != number or number in (float("inf"), float("-inf")):
                raise ValueError
            return number
        if kind == "bool":
            return parse_bool(value)
        if kind == "list":
            return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
        if kind == "dict":
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise TypeError
            return {str(k).lower(): v for k, v in value.items()}
        return str(value)
    except (TypeError, ValueError):
        expected = {"int": "a whole number", "float": "a number", "bool": "true or false"}.get(kind, kind)
        raise ConfigError(f"{key} (${SETTINGS[key][0]}): expected {expected}, got {value!r}") from None


def check_url(url: Any, path: str) -> str:
    """An http(s) URL without trailing slash, or ConfigError (whitespace or control characters
    in it, a ` # note` left from a .env line say, are refused, not sent in a request line)."""
    if url is None or url == "":
        raise ConfigError(f"{path}: required (the provider's http(s) URL, e.g. https://api.example.com/v1)")
    if not isinstance(url, str) or re.search(r"[\s\x00-\x1f\x7f]", url):
        raise ConfigError(f"{path}: expected an http(s) URL without spaces, got {url!r}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{path}: expected an http(s) URL, got {url!r}")
    return url.rstrip("/")


def parse_providers(raw: Any, env: Mapping[str, str], settings: dict,
                    warnings: Optional[List[str]] = None) -> Dict[str, dict]:
    """Providers by name, with the built-in `anthropic` unless the config redefines it;
    CUSTOM_HEADER_* headers go to every one (its own headers win)."""
    if not isinstance(raw, dict):
        raise ConfigError("providers: expected an object")
    raw = dict(raw)
    builtin = dict(BUILTIN_PROVIDER, base_url=settings["anthropic_url"])
    raw["anthropic"] = merge_raw(builtin, raw["anthropic"]) if "anthropic" in raw else builtin
    providers = {name: parse_provider(name, value, env, warnings if warnings is not None else [])
                 for name, value in raw.items()}
    for provider in providers.values():
        provider["headers"] = dict(settings["custom_headers"], **provider["headers"])
    return providers


def parse_provider(name: str, raw: Any, env: Mapping[str, str], warnings: List[str]) -> dict:
    """One provider: format, base_url, resolved api_key, auth mode, extra headers (Azure
    OpenAI: `"azure": true` and its `api_version`)."""
    path = f"providers.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected an object")
    fmt = raw.get("format", "openai")
    if fmt not in PROVIDER_FORMATS:
        raise ConfigError(f"{path}.format: expected one of {', '.join(PROVIDER_FORMATS)}")
    base_url = check_url(raw.get("base_url"), f"{path}.base_url")
    if fmt == "anthropic" and base_url.endswith("/v1"):
        base_url = base_url[:-3]
    keys = provider_keys(raw, env, path)
    api_key = keys[0] if keys else None
    strategy = raw.get("key_strategy", "fill_first")
    if strategy not in KEY_STRATEGIES:
        raise ConfigError(f"{path}.key_strategy: expected one of {', '.join(KEY_STRATEGIES)}")
    # A vendor never gets the Claude login, nor the client's own key, unless the config asks ("auto" is
    # the built-in's, "client" is written out); a named key source is api_key even while unset (a 400).
    auth = raw.get("auth") or ("api_key" if api_key or raw.get("api_key_env") else "none")
    if auth not in AUTH_MODES:
        raise ConfigError(f"{path}.auth: expected one of {', '.join(AUTH_MODES)}")
    if raw.get("api_key_env") and not api_key and auth == "none":
        warnings.append(f"{path}.api_key_env: ${raw['api_key_env']} is not set; sending no credentials")
    elif auth == "api_key" and not api_key:
        where = f"${raw['api_key_env']} is not set" if raw.get("api_key_env") else "no api_key is configured"
        warnings.append(f"{path}: auth api_key but {where}; its requests will be refused until it is")
    headers = raw.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise ConfigError(f"{path}.headers: expected an object of strings")
    azure = parse_bool(raw.get("azure", False))
    if azure and not raw.get("api_version"):
        raise ConfigError(f"{path}.api_version: an Azure OpenAI provider needs its api_version")
    responses = raw.get("responses", False)     # serves /responses itself: relayed, not converted
    if not isinstance(responses, bool) or (responses and fmt != "openai"):
        raise ConfigError(f"{path}.responses: expected true or false (true only on an openai-format provider)")
    key_from = ("config" if raw.get("api_key") or raw.get("api_keys") else "env") if api_key else None
    provider = {"name": name, "format": fmt, "base_url": base_url, "api_key": api_key,
                "api_keys": keys, "key_strategy": strategy,
                "auth": auth, "headers": {k.lower(): v for k, v in headers.items()},
                "api_key_env": raw.get("api_key_env"), "api_key_from": key_from,
                "oauth_trusted": oauth_host_trusted(base_url), "azure": azure,
                "api_version": raw.get("api_version"), "responses": responses}
    return dict(provider, **provider_dialect_options(path, raw, provider))


def provider_keys(raw: dict, env: Mapping[str, str], path: str) -> List[str]:
    """A provider's API keys in order, duplicates dropped: `api_key`, the `api_keys` list, and
    the comma-separated list in the variable `api_key_env` names."""
    listed = raw.get("api_keys") or []
    if not isinstance(listed, list) or not all(isinstance(k, str) and k.strip() for k in listed):
        raise ConfigError(f"{path}.api_keys: expected a list of keys (strings)")
    keys = ([raw["api_key"]] if raw.get("api_key") else []) + listed
    if raw.get("api_key_env"):
        keys += (env.get(raw["api_key_env"]) or "").split(",")
    return list(dict.fromkeys(k.strip() for k in keys if isinstance(k, str) and k.strip()))


def provider_dialect_options(path: str, raw: dict, provider: dict) -> dict:
    """The per-provider switches, defaulted by host (README "Providers"), each validated."""
    host = urllib.parse.urlsplit(provider["base_url"]).hostname or ""
    native = provider["name"] == "anthropic" or host in NATIVE_SIGNATURE_HOSTS
    options = {"mid_system": False, "prompt_cache_key": host in PROMPT_CACHE_KEY_HOSTS,
               "tag_signatures": provider["format"] == "anthropic" and not native,
               "replay_reasoning": "reasoning_content" if host in REPLAY_REASONING_HOSTS else None,
               "anthropic_version": ANTHROPIC_VERSION}
    for key in PROVIDER_FLAGS:
        if raw.get(key) is not None and not isinstance(raw[key], bool):
            raise ConfigError(f"{path}.{key}: expected true or false")
    if raw.get("anthropic_version") is not None and not isinstance(raw["anthropic_version"], str):
        raise ConfigError(f"{path}.anthropic_version: expected a version string such as \"2023-06-01\"")
    check_replay_reasoning(raw.get("replay_reasoning"), f"{path}.replay_reasoning")
    options.update({k: raw[k] for k in options if raw.get(k) is not None})
    return options


def check_replay_reasoning(value: Any, path: str) -> None:
    """replay_reasoning is a field name, false (never) or absent."""
    if value is not None and value is not False and not (isinstance(value, str) and value):
        raise ConfigError(f"{path}: expected a field name such as \"reasoning_content\", or false")


def oauth_host_trusted(base_url: str) -> bool:
    """Whether `auth: auto` may send the Claude login to this host: Anthropic's own, or this
    machine. Elsewhere it takes an explicit `"auth": "oauth"` on the provider (a `.env` left
    in a working directory must not be able to send the login to another host)."""
    host = (urllib.parse.urlsplit(base_url).hostname or "").lower()
    return host == "anthropic.com" or host.endswith(".anthropic.com") or is_loopback(host)


def parse_models(raw: Any, providers: Dict[str, dict], settings: Optional[dict] = None) -> Dict[str, dict]:
    """Model specs by client-facing id (MIN_TOKENS_LIMIT is every model's default floor)."""
    if not isinstance(raw, list):
        raise ConfigError("models: expected a list")
    models = {}
    for i, item in enumerate(raw):
        spec = parse_model(f"models.{i}", item, providers)
        if spec["min_tokens"] is None and settings:
            spec["min_tokens"] = settings.get("min_tokens_limit")
        models[spec["id"]] = spec
    return models


def parse_model(path: str, raw: Any, providers: Dict[str, dict]) -> dict:
    """One model spec (every key of MODEL_DEFAULTS present), validated."""
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
        raise ConfigError(f"{path}.id: expected a non-empty string")
    if raw.get("provider") not in providers:
        raise ConfigError(f"{path}.provider: unknown provider {raw.get('provider')!r}")
    spec = dict(MODEL_DEFAULTS, **{k: v for k, v in raw.items()
                                   if v is not None or not isinstance(MODEL_DEFAULTS.get(k), (dict, list))})
    spec["model"] = spec.get("model") or spec["id"]
    for key in ("max_tokens", "context", "max_input_tokens", "min_tokens"):
        spec[key] = parse_size(spec[key], f"{path}.{key}")
    spec["can_stream"] = parse_bool(spec["can_stream"])
    for key, kind in (("extra_body", dict), ("headers", dict), ("fallback", list)):
        if not isinstance(spec[key], kind):
            raise ConfigError(f"{path}.{key}: expected {'an object' if kind is dict else 'a list'}")
    check_model_facts(path, spec)
    spec["headers"] = {k.lower(): str(v) for k, v in spec["headers"].items()}
    spec.update(parse_prices(path, raw))
    return spec


def check_model_facts(path: str, spec: dict) -> None:
    """The keys that override model-table facts and provider defaults, validated."""
    for key, choices in MODEL_CHOICES.items():
        if spec[key] not in (None,) + choices:
            raise ConfigError(f"{path}.{key}: expected one of {', '.join(choices)}")
    for key in MODEL_FLAGS:
        if spec[key] is not None and not isinstance(spec[key], bool):
            raise ConfigError(f"{path}.{key}: expected true or false")
    efforts = spec["efforts"]
    if efforts is not None and (not isinstance(efforts, list) or not set(efforts) <= set(EFFORT_ORDER)):
        raise ConfigError(f"{path}.efforts: expected a list of {', '.join(EFFORT_ORDER)}")
    check_replay_reasoning(spec["replay_reasoning"], f"{path}.replay_reasoning")


def parse_prices(path: str, raw: dict) -> Dict[str, float]:
    """The entry's *_cost_per_token keys (USD per token), each a number >= 0."""
    prices = {}
    for key in PRICE_KEYS:
        value = raw.get(key)
        if value is None:
            continue
        if not _is_price(value):
            raise ConfigError(f"{path}.{key}: expected a number >= 0 (USD per token)")
        prices[key] = float(value)
    return prices


def _is_price(value: Any) -> bool:
    """A finite, non-negative int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")


def parse_routes(raw: Any, models: Dict[str, dict], providers: Dict[str, dict]) -> Dict[str, dict]:
    """Route name -> target spec. A target is a model id, a provider, or "provider,model"."""
    if not isinstance(raw, dict):
        raise ConfigError("routes: expected an object")
    return {name: route_target(f"routes.{name}", value, models, providers)
            for name, value in raw.items()}


def route_target(path: str, value: Any, models: Dict[str, dict], providers: Dict[str, dict]) -> dict:
    """The spec a route value names; model None means the client's model name passes through."""
    if not isinstance(value, str):
        raise ConfigError(f"{path}: expected a model id or provider name")
    if value.startswith("custom/") and value[7:] in models:      # seed 004: ROUTER_X=custom/<model_id>
        value = value[7:]
    if value in models:
        return models[value]
    provider, _, model = value.partition(",")
    if provider in providers:
        return dict(MODEL_DEFAULTS, id=model or None, provider=provider, model=model or None)
    raise ConfigError(f"{path}: {value!r} is neither a model id nor a provider")


# ---- The seeds' model files: a YAML subset, and seed 000's models.json ----------------------
#
# Seeds 001 and 004 describe models in a YAML list (models.yaml / custom_models.yaml) and the
# standard library has no YAML. parse_yaml_models reads exactly the subset those files use: a
# top-level list of mappings whose values are scalars (plain, 'single' or "double" quoted, with
# YAML 1.1 booleans and null, as the seeds' yaml.safe_load read them), `#` comments, and one
# nested mapping level (extra_body, extra_headers). Anything beyond it (flow collections,
# anchors, tags, block scalars, deeper nesting) is a ConfigError naming the line, never a guess.

_YAML_KEY = re.compile(r"^(?P<key>[A-Za-z_][\w.\-]*|\"[^\"]*\"|'[^']*')\s*:(?:\s+(?P<value>.*))?$")
_YAML_INT = re.compile(r"^[-+]?[0-9]+$")
_YAML_FLOAT = re.compile(r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?$")
YAML_CONSTANTS = {"null": None, "~": None, "true": True, "false": False, "yes": True, "no": False,
                  "on": True, "off": False}


def _yaml_uncomment(line: str) -> str:
    """A line without its comment (a # at the start or after a space, outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"" and (i == 0 or line[i - 1] in " \t:-"):
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _yaml_scalar(text: str, where: str) -> Any:
    """One scalar value; ConfigError for syntax outside the subset."""
    if not text:
        return None
    if text[0] in "[{&*!|>%@`":
        raise ConfigError(f"{where}: {mask_secret_shapes(text)[:20]!r} is YAML beyond what claude_proxy reads "
                          "(plain or quoted scalars, one nested mapping); write it as JSON instead")
    if text[0] == '"' and text.endswith('"') and len(text) > 1:
        try:
            return json.loads(text)
        except ValueError:
            raise ConfigError(f"{where}: malformed double-quoted string") from None
    if text[0] == "'" and text.endswith("'") and len(text) > 1:
        return text[1:-1].replace("''", "'")
    if text[0] in "'\"":
        raise ConfigError(f"{where}: unterminated quoted string")
    lower = text.lower()
    if lower in YAML_CONSTANTS:
        return YAML_CONSTANTS[lower]
    if _YAML_INT.match(text):
        return int(text)
    return float(text) if _YAML_FLOAT.match(text) else text


def _yaml_key(text: str) -> str:
    """A mapping key, unquoted."""
    return text[1:-1] if text[:1] in "'\"" else text


def _yaml_lines(text: str, path: str) -> List[Tuple[int, int, str]]:
    """(line number, indent, content) of the meaningful lines; tabs in indentation refused."""
    out = []
    for number, raw_line in enumerate(text.splitlines(), 1):
        line = _yaml_uncomment(raw_line)
        if not line.strip() or (line.strip() == "---" and not out):
            continue
        indent = len(line) - len(line.lstrip(" "))
        if line[indent:indent + 1] == "\t":
            raise ConfigError(f"{path}:{number}: a tab in the indentation (YAML allows spaces only)")
        out.append((number, indent, line.strip()))
    return out


def parse_yaml_models(text: str, path: str) -> List[dict]:
    """The mappings of a seed model file (see the essay above)."""
    items: List[dict] = []
    state: Dict[str, Any] = {"item_indent": -1, "nested": None, "nested_indent": None}
    for number, indent, line in _yaml_lines(text, path):
        where = f"{path}:{number}"
        if line.startswith("- ") or line == "-":
            if items and indent != state["item_indent"]:
                raise ConfigError(f"{where}: a list item at another indentation than the first")
            items.append({})
            state.update(item_indent=indent, nested=None, nested_indent=None)
            line, indent = line[1:].strip(), indent + 2
            if not line:
                continue
        elif not items:
            raise ConfigError(f"{where}: expected a list of models (lines starting with \"- \")")
        _yaml_entry(items[-1], state, indent, line, where)
    return items


def _yaml_entry(item: dict, state: dict, indent: int, line: str, where: str) -> None:
    """Apply one `key: value` line to the current item, or to its open nested mapping."""
    match = _YAML_KEY.match(line)
    if not match:
        raise ConfigError(f"{where}: expected `key: value`, got {mask_secret_shapes(line)[:40]!r}")
    key, value = _yaml_key(match.group("key")), (match.group("value") or "").strip()
    key_indent = state["item_indent"] + 2
    if indent == key_indent:
        target, state["nested"], state["nested_indent"] = item, None, None
    elif indent > key_indent and state["nested"] is not None and state["nested_indent"] in (None, indent):
        target, state["nested_indent"] = state["nested"], indent
    else:
        raise ConfigError(f"{where}: unexpected indentation (one nested mapping level at most)")
    if key in target:
        raise ConfigError(f"{where}: {key!r} appears twice")
    if not value and target is item:
        target[key] = state["nested"] = {}     # a nested mapping may follow (or it stays {})
        return
    target[key] = _yaml_scalar(value, where)


# seed 001/004 model-file keys -> what they become (None: handled in seed_model_entry)
SEED_MODEL_KEYS = frozenset({
    "model_id", "model_name", "api_base", "api_key_name", "direct", "can_stream", "max_tokens",
    "max_input_tokens", "context", "reasoning_effort", "extra_body", "extra_headers",
    "input_cost_per_token", "output_cost_per_token", "input_cost_per_million_tokens",
    "output_cost_per_million_tokens", "enable_thinking", "temperature", "api_key", "format"})


def seed_models_layer(entries: List[dict], path: str) -> dict:
    """A raw config layer (providers + models) from a seed 001/004 model list."""
    layer: Dict[str, Any] = {"providers": {}, "models": [], "_notes": []}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("model_id"), str) or not entry.get("api_base"):
            raise ConfigError(f"{path}: model {i + 1}: model_id and api_base are required")
        provider_name, provider = seed_provider(entry)
        if provider_name in layer["providers"] and layer["providers"][provider_name] != provider:
            provider_name = f"{provider_name}:{entry['model_id']}"
        layer["providers"][provider_name] = provider
        layer["models"].append(seed_model(entry, provider_name, f"{path}: {entry['model_id']}", layer["_notes"]))
    return layer


def seed_provider(entry: dict) -> Tuple[str, dict]:
    """(name, provider) for a seed model entry: `direct` (or an anthropic.com api_base, as the
    seed decided) is an Anthropic-format passthrough. Its key: `api_key`, else $api_key_name,
    else the key each client sends (seed 001's ccproxy mode: the wrapper puts the provider's
    key in the client's Authorization), never a variable the entry does not name."""
    base = str(entry["api_base"])
    anthropic = bool(entry.get("direct")) or "anthropic.com" in base or entry.get("format") == "anthropic"
    provider: Dict[str, Any] = {"format": "anthropic" if anthropic else "openai", "base_url": base}
    if entry.get("api_key"):
        provider["api_key"] = entry["api_key"]
    elif entry.get("api_key_name"):
        provider.update(api_key_env=entry["api_key_name"], auth="api_key")
    else:
        provider["auth"] = "client"
    return (urllib.parse.urlsplit(base).hostname or base), provider


def seed_model(entry: dict, provider: str, where: str, notes: List[str]) -> dict:
    """Our model spec for one seed model entry."""
    model: Dict[str, Any] = {"id": entry["model_id"], "provider": provider,
                             "model": entry.get("model_name") or entry["model_id"]}
    for key in ("max_tokens", "max_input_tokens", "context", "extra_body", "input_cost_per_token",
                "output_cost_per_token"):
        if entry.get(key) is not None:
            model[key] = entry[key]
    for key, scale in (("input_cost_per_million_tokens", 1e-6), ("output_cost_per_million_tokens", 1e-6)):
        if isinstance(entry.get(key), (int, float)):
            model[key.replace("_per_million_tokens", "_per_token")] = entry[key] * scale
    if isinstance(entry.get("extra_headers"), dict):
        model["headers"] = {k: str(v) for k, v in entry["extra_headers"].items()}
    if entry.get("can_stream") is False:
        model["can_stream"] = False
    effort = entry.get("reasoning_effort")
    if effort == "minimal":                        # seed 001: minimal = no thinking
        model["reasoning_effort"] = "none"
    elif effort:
        model["thinking_effort"] = effort          # sent when the client asks for thinking
    if entry.get("temperature") is not None:
        model.setdefault("extra_body", {})
        model["extra_body"] = dict(model["extra_body"], temperature=entry["temperature"])
    for key in sorted(set(entry) - SEED_MODEL_KEYS):
        notes.append(f"{where}: key {key!r} is not a seed model-file key claude_proxy knows; ignored")
    if entry.get("enable_thinking") is not None:
        notes.append(f"{where}: enable_thinking is not used (thinking follows the client's request)")
    return model


def read_models_file(path: str) -> Tuple[dict, List[str]]:
    """(raw config layer, notes) from a seed model file: YAML (seeds 001/004) or JSON (seed
    000's `custom_models`, or a file in claude_proxy's own shape)."""
    text = read_text(path, "model file")
    if path.lower().endswith(".json") or text.lstrip()[:1] in ("{", "["):
        if text.lstrip().startswith("["):              # a bare list of models[] entries
            return {"models": parse_json_config('{"models": %s}' % text, path)["models"]}, []
        return parse_json_config(text, path), []
    layer = seed_models_layer(parse_yaml_models(text, path), path)
    return layer, layer.pop("_notes")


def read_text(path: str, what: str) -> str:
    """A whole text file, or ConfigError in one line (a FIFO or a device too, at once)."""
    try:
        return read_regular_file(path).decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not UTF-8 text") from None


def parse_json_config(text: str, path: str) -> dict:
    """A JSON config file's object, or ConfigError naming the line (or the wrong top level)."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"config file {path}: invalid JSON: {exc}") from None
    if not isinstance(raw, dict):
        hint = (" (a list of models is a model file: name it with CLAUDE_PROXY_MODELS_FILE or \"models_file\", "
                "or put it under \"models\" in a config object)") if isinstance(raw, list) else ""
        raise ConfigError(f"config file {path}: expected a JSON object at the top level, found "
                          f"{type(raw).__name__ if raw is not None else 'null'}{hint}")
    return raw


def config_path(cli_path: Optional[str], env: Mapping[str, str]) -> Optional[str]:
    """--config, else CLAUDE_PROXY_CONFIG, else <home>/config.json when it exists."""
    if cli_path or env.get("CLAUDE_PROXY_CONFIG"):
        return cli_path or env["CLAUDE_PROXY_CONFIG"]
    home = env.get("CLAUDE_PROXY_HOME") or SETTINGS["home"][2]
    candidate = os.path.join(os.path.expanduser(home), "config.json")
    return candidate if os.path.exists(candidate) else None


MODEL_FILE_NAMES = ("models.yaml", "models.yml", "custom_models.yaml", "models.json")


def find_models_file(config_file: Optional[str], file_raw: dict, env: Mapping[str, str]) -> Optional[str]:
    """A seed model file: --config naming a .yaml, else CUSTOM_MODELS_FILE (or our own name, or
    `models_file` in the config file), else models.yaml / custom_models.yaml / models.json in
    the working directory, as the seeds looked for them."""
    if config_file and config_file.lower().endswith((".yaml", ".yml")):
        return config_file
    var = setting_var("models_file", env)
    if var or file_raw.get("models_file"):
        return env[var] if var else str(file_raw["models_file"])
    return next((name for name in MODEL_FILE_NAMES if os.path.isfile(name)), None)


def load_config(path: Optional[str], env: Mapping[str, str], cli: Optional[dict] = None) -> Config:
    """The whole flow: seed model file < config file < .env < environment < CLI, parsed once.
    Without a `routes` table in a file, `default` goes to Anthropic (a lone ROUTER_* adds to
    that table; it never empties it). Plugins come only from the trusted layers (untrusted_plugins)."""
    dotenv = read_dotenv(".env")
    merged_env = dict(dotenv, **env)
    is_yaml = bool(path) and path.lower().endswith((".yaml", ".yml"))
    file_raw = parse_json_config(read_text(path, "config file"), path) if path and not is_yaml else {}
    models_path = find_models_file(path, file_raw, merged_env)
    models_raw, notes = read_models_file(models_path) if models_path else ({}, [])
    notes = notes + untrusted_plugins(dotenv, models_raw, file_raw, env)
    raw = {} if "routes" in file_raw or "routes" in models_raw else {"routes": {"default": "anthropic"}}
    for layer in (models_raw, file_raw, env_layer(merged_env), cli or {}):
        raw = merge_raw(raw, layer)
    raw["plugins"] = merge_raw(file_raw, env_layer(env)).get("plugins", [])
    config = parse_config(raw, merged_env, notes)
    config.plugin_folder = os.path.join(os.path.expanduser(trusted_home(file_raw, env)), "plugins")
    config.files = {"config": os.path.abspath(path) if path and not is_yaml else None,
                    "dotenv": os.path.abspath(".env") if dotenv else None,
                    "models": os.path.abspath(models_path) if models_path else None}
    config.origins = value_origins(config, file_raw, models_raw, dotenv, env, cli or {})
    return config


def trusted_home(file_raw: dict, env: Mapping[str, str]) -> str:
    """The home whose plugins/ folder may run code: the environment's, else the config file's."""
    return str(env_layer(env).get("home") or file_raw.get("home") or SETTINGS["home"][2])


def untrusted_plugins(dotenv: Mapping[str, str], models_raw: dict, file_raw: dict, env: Mapping[str, str]) -> List[str]:
    """Warnings for what a .env or a model file (both may lie in a cloned folder) tried to do to
    the plugins, which run code: name them, or move <home>/plugins. Both are ignored."""
    notes = []
    if setting_var("plugins", dotenv):
        notes.append(".env: CLAUDE_PROXY_PLUGINS ignored: plugins run code, so only the config file, the "
                     "environment or <home>/plugins name them")
    if "plugins" in models_raw:
        notes.append("model file: \"plugins\" ignored: plugins are named only in the config file, the environment "
                     "or <home>/plugins")
    home = env_layer(dotenv).get("home")
    if home and os.path.expanduser(home) != os.path.expanduser(trusted_home(file_raw, env)):
        notes.append(f".env: CLAUDE_PROXY_HOME moves the proxy's state, not its plugins: they still load from "
                     f"{os.path.join(trusted_home(file_raw, env), 'plugins')}")
    return notes


def value_origins(config: Config, file_raw: dict, models_raw: dict, dotenv: Mapping[str, str],
                  environ: Mapping[str, str], cli: dict) -> Dict[str, str]:
    """Where each setting and each provider's base_url came from, for check-config and start."""
    files = config.files

    def origin(key: str) -> str:
        var = setting_var(key, environ) if key in SETTINGS else (key if environ.get(key) else None)
        dot = setting_var(key, dotenv) if key in SETTINGS else (key if dotenv.get(key) else None)
        dot = None if key == "plugins" else dot                  # ignored there: untrusted_plugins()
        if key in cli:
            return "the command line"
        if var:
            return f"environment ${var}"
        if dot:
            return f".env ${dot} ({files['dotenv']})"
        return f"config file {files['config']}" if key in file_raw else "default"
    origins = {f"settings.{key}": origin(key) for key in SETTINGS}
    if config.proxy_key_var != "PROXY_API_KEY":            # adopted by adopt_seed_client_key
        origins["settings.proxy_api_key"] = origin(config.proxy_key_var) + " (the client key, as in claude-code-proxy)"
    for name in config.providers:
        if isinstance((file_raw.get("providers") or {}).get(name), dict) and "base_url" in file_raw["providers"][name]:
            where = f"config file {files['config']}"
        elif name in (models_raw.get("providers") or {}):
            where = f"model file {files['models']}"
        elif name == "anthropic":
            where = origins["settings.anthropic_url"]
        elif name == "openai":
            where = origin("OPENAI_BASE_URL")
        else:
            where = f"config file {files['config'] or files['models']}"
        origins[f"providers.{name}.base_url"] = where
    return origins


def credential_rule(provider: dict) -> str:
    """What a provider sends upstream as its credential, in words (check-config), never a key."""
    fmt, mode = provider["format"], provider["auth"]
    header = "api-key" if provider.get("azure") else "x-api-key" if fmt == "anthropic" else "Authorization: Bearer"
    key = f"${provider['api_key_env']}" if provider.get("api_key_env") else "the key in the config"
    client = ("each client's own key (its x-api-key or Authorization, never the proxy key; a Claude login "
              "only to an Anthropic host), " + ("as the client sent it" if fmt == "anthropic" else "as " + header))
    rules = {"api_key": f"{key}, as {header}; while it is unset, each request gets a 400 naming it",
             "oauth": "the Claude login (saved, or ANTHROPIC_OAUTH_TOKEN)", "client": client,
             "auto": f"the Claude login when there is one, else {key} when set, else {client}",
             "none": "no credentials"}
    return rules[mode]


def redacted_config(config: Config) -> dict:
    """The effective config for check-config, every secret masked."""
    settings = dict(config.settings)
    for key in ("proxy_api_key", "oauth_token"):
        if settings.get(key):
            settings[key] = mask(settings[key])
    providers = {name: dict(p, api_key=mask(p["api_key"]) if p.get("api_key") else None,
                            api_keys=[key_label(k) for k in p.get("api_keys") or []],
                            headers={k: mask(v) for k, v in p["headers"].items()}, credentials=credential_rule(p))
                 for name, p in config.providers.items()}
    models = [dict(m, headers={k: mask(v) for k, v in m["headers"].items()},
                   extra_body=masked_copy(m["extra_body"])) for m in config.models.values()]
    routes = {name: (t["id"] or t["provider"]) for name, t in config.routes.items()}
    origins = {key: where for key, where in config.origins.items() if where != "default"}
    return {"files": config.files, "settings": settings, "providers": providers, "models": models,
            "routes": routes, "oauth": config.oauth, "origins": origins, "warnings": config.warnings}

# =============================================================================================
# 5. HTTP wire format (sans-IO)
#
# Parsers take bytes and return values or raise; the stream section does the reading. Header
# names are lower-cased; repeated headers are joined with ", " (RFC 9110 5.3).
# =============================================================================================

Headers = Dict[str, str]
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_FIELD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")     # CTLs but HTAB (RFC 9110 5.5)
_HTTP_VERSION = re.compile(rb"^HTTP/1\.[01]$")
_STATUS_CODE = re.compile(rb"^[1-5][0-9][0-9]$")
_CHUNK_SIZE = re.compile(rb"^[0-9A-Fa-f]{1,15}$")
_CHUNK_HEAD = re.compile(rb"([0-9A-Fa-f]{1,15})\r\n")     # a size line without extensions
_DIGITS = re.compile(r"^[0-9]{1,18}$")
SINGLETON_HEADERS = frozenset(("host", "content-length"))   # a repeat is a desync attempt (RFC 9112)


def parse_header_lines(lines: List[bytes]) -> Headers:
    """Header field lines to a dict; BadRequest on a malformed line, a control character in a
    value (CR, LF and NUL included: RFC 9112 section 5) or a repeated Host / Content-Length."""
    headers: Headers = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name) or _BAD_FIELD_VALUE.search(value):
            raise BadRequest("malformed header line")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in headers and key in SINGLETON_HEADERS:
            raise BadRequest(f"repeated {key} header")
        headers[key] = headers[key] + ", " + text if key in headers else text
    return headers


def split_head(head: bytes) -> List[bytes]:
    """A head's lines; BadRequest when a line ends in a bare LF or holds a lone CR."""
    lines = head[:-4].split(b"\r\n") if head.endswith(b"\r\n\r\n") else head.rstrip(b"\r\n").split(b"\r\n")
    if any(b"\n" in line or b"\r" in line for line in lines):
        raise BadRequest("bare CR or LF in the message head")
    return lines


def connection_options(headers: Headers) -> frozenset:
    """The Connection header's options, lower case: a list of tokens ("close, close", "Close")."""
    return frozenset(option.strip().lower() for option in headers.get("connection", "").split(","))


def keeps_alive(version: str, headers: Headers) -> bool:
    """Whether the connection persists after this message (RFC 9112 9.3): not after `close`;
    HTTP/1.0 only with keep-alive, and never after a Transfer-Encoding, whose framing a 1.0
    peer may not share (6.1)."""
    options = connection_options(headers)
    if "close" in options:
        return False
    return version != "HTTP/1.0" or ("keep-alive" in options and "transfer-encoding" not in headers)


def parse_request_head(head: bytes) -> Tuple[str, str, str, Headers]:
    """Request head (up to the blank line) -> (method, target, version, headers)."""
    lines = split_head(head)
    if len(lines[0]) > MAX_REQUEST_LINE:
        raise URITooLong("request line too long")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1] or _BAD_FIELD_VALUE.search(parts[1]):
        raise BadRequest("malformed request line")
    if not _HTTP_VERSION.match(parts[2]):
        raise HTTPVersionNotSupported("only HTTP/1.0 and HTTP/1.1 are supported")
    method, target, version = (p.decode("latin-1") for p in parts)
    headers = parse_header_lines(lines[1:])
    if target[:7].lower() == "http://" or target[:8].lower() == "https://":
        target, headers["host"] = absolute_form(target)
    if version == "HTTP/1.1" and "host" not in headers:
        raise BadRequest("missing Host header")
    return method, target, version, headers


def absolute_form(target: str) -> Tuple[str, str]:
    """(origin-form target, authority) of an absolute-form target such as a forward proxy's
    client sends; its authority replaces the Host header (RFC 9112 3.2.2)."""
    scheme_end = target.index("//") + 2
    slash = target.find("/", scheme_end)
    query = target.find("?", scheme_end)
    end = min(i for i in (slash, query, len(target)) if i >= 0)
    authority, rest = target[scheme_end:end], target[end:]
    if not authority or "@" in authority:
        raise BadRequest("malformed request target")
    return (rest if rest.startswith("/") else "/" + rest), authority


def parse_response_head(head: bytes) -> Tuple[int, Headers]:
    """Response head -> (status, headers); UpstreamError when malformed. An HTTP/1.0 answer
    gets `connection: close` unless it says keep-alive, so its connection is never reused."""
    try:
        lines = split_head(head)
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not _HTTP_VERSION.match(parts[0]) or not _STATUS_CODE.match(parts[1]):
            raise UpstreamError("upstream sent a malformed status line")
        headers = parse_header_lines(lines[1:])
    except BadRequest:
        raise UpstreamError("upstream sent a malformed header") from None
    if not keeps_alive(parts[0].decode("ascii"), headers):
        headers["connection"] = "close"
    return int(parts[1]), headers


def parse_chunk_size(line: bytes) -> int:
    """The size of a chunk from its size line (extensions ignored; hex digits only, RFC 9112 7.1)."""
    size = line.split(b";", 1)[0].rstrip(b" \t")
    if not _CHUNK_SIZE.match(size):
        raise BadRequest("malformed chunk size")
    return int(size, 16)


class ChunkedDecoder:
    """Incremental chunked transfer-coding decoder: feed(bytes) -> the payload bytes it completes.

    All complete chunks of one read come back joined, so a relay makes one write per socket
    read rather than one per chunk. `done` turns true after the last chunk and its trailers."""

    def __init__(self) -> None:
        self._buf = b""
        self._data_left = 0      # payload bytes still due in the current chunk
        self._crlf_left = 0      # bytes of the CRLF after that payload still to skip
        self._trailers = False
        self.done = False
        self.excess = b""        # bytes after the end of the body (the connection is then unusable)

    def whole_chunk(self, data: bytes) -> Optional[bytes]:
        """The payload when nothing is pending and data is exactly one whole non-final chunk
        (the common read: a model stream's event per chunk, one chunk per read), else None."""
        head = _CHUNK_HEAD.match(data)
        if head is None or self._buf or self._data_left or self._crlf_left or self._trailers:
            return None
        start, size = head.end(), int(head[1], 16)
        if not size or len(data) - start - 2 != size or not data.endswith(b"\r\n"):
            return None
        return data[start:-2]

    def feed(self, data: bytes) -> bytes:
        """Consume bytes; return the payload they complete."""
        whole = self.whole_chunk(data)
        return whole if whole is not None else self.feed_pieces(data)

    def feed_pieces(self, data: bytes) -> bytes:
        """feed() for a read that whole_chunk() already turned down: any split, any number of chunks."""
        buf, self._buf = (self._buf + data if self._buf else data), b""
        out: List[bytes] = []
        pos, end = 0, len(buf)
        while pos < end and not self.done:
            if self._data_left:
                take = min(self._data_left, end - pos)
                out.append(buf[pos:pos + take])
                pos, self._data_left = pos + take, self._data_left - take
            elif self._crlf_left:
                skip = min(self._crlf_left, end - pos)
                if buf[pos:pos + skip] != b"\r\n"[2 - self._crlf_left:2 - self._crlf_left + skip]:
                    raise BadRequest("chunk data not followed by CRLF")
                pos, self._crlf_left = pos + skip, self._crlf_left - skip
            else:
                pos = self._line(buf, pos, end)
                if pos < 0:
                    break
        if self.done:
            self.excess = buf[pos:]
        return out[0] if len(out) == 1 else b"".join(out)

    def _line(self, buf: bytes, pos: int, end: int) -> int:
        """Apply one size or trailer line; -1 (tail kept) when it is not complete yet."""
        newline = buf.find(b"\r\n", pos)
        if newline < 0:
            if end - pos > MAX_CHUNK_LINE:
                raise BadRequest("chunk size line too long")
            self._buf = buf[pos:]
            return -1
        line = buf[pos:newline]
        if self._trailers:
            self.done = not line
        else:
            size = parse_chunk_size(line)
            self._trailers = size == 0
            self._data_left, self._crlf_left = size, 2 if size else 0
        return newline + 2


def body_framing(headers: Headers) -> Tuple[str, int]:
    """How a message body is delimited: ("chunked", 0), ("length", n) or ("close", 0).

    Only the plain `chunked` coding is accepted: `chunked, gzip`, `xchunkedx` or any other coding
    is a BadRequest, as is a Transfer-Encoding beside a Content-Length (RFC 9112 6.1, 6.3)."""
    if "transfer-encoding" in headers:
        if headers["transfer-encoding"].lower() != "chunked":
            raise BadRequest("unsupported Transfer-Encoding (only chunked)")
        if "content-length" in headers:
            raise BadRequest("both Transfer-Encoding and Content-Length")
        return "chunked", 0
    if "content-length" in headers:
        value = headers["content-length"]
        if not _DIGITS.match(value):
            raise BadRequest("malformed Content-Length")
        return "length", int(value)
    return "close", 0


def format_head(first_line: str, headers: Iterable[Tuple[str, str]]) -> bytes:
    """A request or response head, blank line included."""
    out = [first_line]
    out += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1", "replace")


def format_status_line(status: int) -> str:
    """`HTTP/1.1 200 OK` for any status, known or not."""
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = {529: "Overloaded"}.get(status, "Unknown")
    return f"HTTP/1.1 {status} {reason}"


def http_error_bytes(status: int, error_type: str, message: str) -> bytes:
    """A whole error response (an envelope both SDKs read) that closes the connection."""
    body = json_bytes({"type": "error", "error": {"type": error_type, "message": message}})
    return format_head(format_status_line(status), [
        ("content-type", "application/json"), ("connection", "close"), ("retry-after", "1"),
        ("content-length", str(len(body)))]) + body


LAST_CHUNK = b"0\r\n\r\n"

# =============================================================================================
# 6. SSE (sans-IO)
#
# Server-sent events (WHATWG HTML, "Parsing an event stream"): lines end in CRLF, LF or CR;
# a line starting with ":" is a comment; "field: value" with at most one space stripped after
# the colon; `data` lines accumulate joined by "\n"; a blank line dispatches the event. We split
# on bytes and decode whole lines, so a UTF-8 character split across reads is never cut (a
# continuation byte is never CR or LF). A CR at the very end of a read may be half of a CRLF:
# we remember it and drop a LF that starts the next read. At close() a last event without its
# blank line is still dispatched: real streams end that way (fixtures/real/SOURCES.md).
# =============================================================================================

_LINE_END = re.compile(rb"\r\n|\r|\n")


class SSEDecoder:
    """Incremental SSE decoder: feed(bytes) -> [(event, data)], close() -> [(event, data)].

    A line or an event longer than MAX_SSE_LINE is an UpstreamError: an upstream that never
    sends a newline must not grow memory (or re-scan a growing tail) without bound."""

    def __init__(self, max_line: Optional[int] = None) -> None:
        self._tail = b""
        self._parts: List[bytes] = []    # pieces of a line that has not ended yet
        self._parts_size = 0
        self._skip_lf = False
        self._event = ""
        self._data: List[str] = []
        self._data_size = 0
        self._max = max_line or MAX_SSE_LINE
        self.comments = 0

    def feed(self, chunk: bytes) -> List[Tuple[str, str]]:
        """Events completed by this chunk of bytes."""
        if not chunk:
            return []
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = chunk[-1:] == b"\r"
        if chunk.endswith(b"\n\n") and not self._tail and not self._parts and not self._data and not self._event:
            one = self._one_event(chunk)                   # the common read: exactly one event
            if one is not None:
                return one
        if b"\n" not in chunk and b"\r" not in chunk:
            return self._hold(chunk)
        if self._parts:
            chunk, self._parts, self._parts_size = b"".join(self._parts) + chunk, [], 0
        data = self._tail + chunk if self._tail else chunk
        lines = _LINE_END.split(data) if b"\r" in data else data.split(b"\n")
        self._tail = lines.pop()
        if len(self._tail) > self._max:
            raise UpstreamError(f"upstream sent an SSE line over {self._max} bytes")
        events: List[Tuple[str, str]] = []
        pending = self._data
        for line in lines:                                   # the common lines inline, rare ones in _line
            if line[:6] == b"data: ":
                pending.append(line[6:].decode("utf-8", "replace"))
                self._data_size += len(line)
            elif not line:
                if pending:
                    events.append((self._event, pending[0] if len(pending) == 1 else "\n".join(pending)))
                    pending = self._data = []
                    self._data_size = 0
                self._event = ""
            elif line[:7] == b"event: ":
                self._event = line[7:].decode("utf-8", "replace")
            else:
                self._line(line, events)
                pending = self._data
        if self._data_size > self._max:
            raise UpstreamError(f"upstream sent an SSE event over {self._max} bytes")
        return events

    @staticmethod
    def _one_event(chunk: bytes) -> Optional[List[Tuple[str, str]]]:
        """[(event, data)] when chunk is exactly `data: …` or `event: …` + `data: …`, each line
        ending in LF, then a blank line; None for anything else (the general path)."""
        lines = chunk.count(b"\n")
        if b"\r" in chunk or lines > 3:
            return None
        if lines == 2 and chunk.startswith(b"data: "):
            return [("", chunk[6:-2].decode("utf-8", "replace"))]
        first = chunk.find(b"\n")
        if lines == 3 and chunk.startswith(b"event: ") and chunk.startswith(b"data: ", first + 1):
            return [(chunk[7:first].decode("utf-8", "replace"), chunk[first + 7:-2].decode("utf-8", "replace"))]
        return None

    def _hold(self, piece: bytes) -> List[Tuple[str, str]]:
        """Keep a piece of an unfinished line (joined once, when the line ends)."""
        if self._tail:
            self._parts, self._tail = [self._tail], b""
            self._parts_size = len(self._parts[0])
        self._parts.append(piece)
        self._parts_size += len(piece)
        if self._parts_size > self._max:
            raise UpstreamError(f"upstream sent an SSE line over {self._max} bytes")
        return []

    def close(self) -> List[Tuple[str, str]]:
        """Flush a last unterminated line and event at end of stream."""
        events: List[Tuple[str, str]] = []
        if self._parts:
            self._tail, self._parts, self._parts_size = self._tail + b"".join(self._parts), [], 0
        if self._tail:
            self._line(self._tail, events)
            self._tail = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: List[Tuple[str, str]]) -> None:
        """Apply one line to the event being built."""
        if not line:
            if self._data:
                events.append((self._event, "\n".join(self._data)))
            self._event, self._data, self._data_size = "", [], 0
            return
        if line[:1] == b":":
            self.comments += 1
            return
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
            self._data_size += len(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")


_EVENT_END = re.compile(rb"\r?\n\r?\n")
_ANSWER_END = re.compile(rb'(?:^|\n)(?:event: ?(?:message_stop|response\.(?:completed|incomplete|failed))\r?\n'
                         rb'|data: ?(?:\[DONE\]|\{"type": ?"(?:message_stop|response\.(?:completed|incomplete|failed))"))')


def sse_answer_ended(data: bytes) -> bool:
    """Whether relayed SSE bytes end with an event that ends an answer: OpenAI's [DONE],
    Anthropic's message_stop, a terminal Responses event (for a stream the proxy does not parse)."""
    events = _EVENT_END.split(data.rstrip(b"\r\n")) if data.endswith(b"\n") else []
    return bool(events) and _ANSWER_END.search(events[-1][:200]) is not None


def format_sse(data: str, event: Optional[str] = None) -> bytes:
    """One SSE event; multi-line data becomes several data lines."""
    head = f"event: {event}\n" if event else ""
    if "\n" in data:
        data = data.replace("\n", "\ndata: ")
    return f"{head}data: {data}\n\n".encode("utf-8")


# The hot events (a text delta: nearly every event of a stream) are written through byte
# templates around the JSON-escaped text: the same bytes json_text() would produce, in a fifth of
# the time. Anything else takes the general path.
_escape = json.encoder.encode_basestring        # JSON string with quotes, non-ASCII kept (C)
ANTHROPIC_TEXT_DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
                        b'"delta":{"type":"text_delta","text":%s}}\n\n')
OPENAI_CONTENT_CHUNK = (b'data: {"id":%s,"object":"chat.completion.chunk","created":%d,"model":%s,"choices":'
                        b'[{"index":0,"delta":{"content":%s},"finish_reason":null,"logprobs":null}]}\n\n')
RESPONSES_TEXT_DELTA = (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
                        b'"sequence_number":%d,"item_id":%s,"output_index":%d,"content_index":%d,'
                        b'"delta":%s,"logprobs":[]}\n\n')


def format_anthropic_event(anthropic_event: dict) -> bytes:
    """An Anthropic stream event: its type is the SSE event name."""
    delta = anthropic_event.get("delta")
    if anthropic_event.get("type") == "content_block_delta" and len(anthropic_event) == 3 and \
            type(delta) is dict and len(delta) == 2 and delta.get("type") == "text_delta":
        try:
            return ANTHROPIC_TEXT_DELTA % (anthropic_event["index"], _escape(delta["text"]).encode())
        except (TypeError, KeyError):
            pass
    return format_sse(json_text(anthropic_event), anthropic_event.get("type"))


def format_openai_item(openai_item: Any) -> bytes:
    """An OpenAI stream chunk, or the literal [DONE]."""
    if isinstance(openai_item, str):
        return format_sse(openai_item)
    choices = openai_item.get("choices")
    if len(openai_item) == 5 and type(choices) is list and len(choices) == 1 and choices[0].get("finish_reason") is None:
        delta = choices[0].get("delta")
        if type(delta) is dict and len(delta) == 1 and len(choices[0]) == 4 and choices[0].get("index") == 0:
            try:
                return OPENAI_CONTENT_CHUNK % (_escape(openai_item["id"]).encode(), openai_item["created"],
                                               _escape(openai_item["model"]).encode(), _escape(delta["content"]).encode())
            except (TypeError, KeyError):
                pass
    return format_sse(json_text(openai_item))


def format_responses_event(responses_event: dict) -> bytes:
    """A Responses stream event: its type is the SSE event name, as OpenAI sends it."""
    if responses_event["type"] == "response.output_text.delta" and len(responses_event) == 7:
        try:
            return RESPONSES_TEXT_DELTA % (
                responses_event["sequence_number"], _escape(responses_event["item_id"]).encode(),
                responses_event["output_index"], responses_event["content_index"],
                _escape(responses_event["delta"]).encode()) if responses_event["logprobs"] == [] else \
                format_sse(json_text(responses_event), responses_event["type"])
        except (TypeError, KeyError):
            pass
    return format_sse(json_text(responses_event), responses_event["type"])


SSE_KEEPALIVE = b": keep-alive\n\n"

# =============================================================================================
# 7. Stream I/O
# =============================================================================================

OPENAI_PATHS = ("/v1/chat/completions", "/chat/completions", "/v1/responses", "/responses")


class Request:
    """One client request, head and body read."""

    def __init__(self, method: str, target: str, headers: Headers, body: bytes, peer: str):
        self.method = method
        self.target = target
        self.path, _, self.query = target.partition("?")
        self.headers = headers
        self.body = body
        self.peer = peer
        self.id = new_id("req_")
        self.keep_alive = "close" not in connection_options(headers)
        self.http10 = False
        self.reserved = 0          # body bytes counted against the server's in-flight bound

    @property
    def dialect(self) -> str:
        """Which API's error envelope the client expects."""
        if self.path.startswith(OPENAI_PATHS):
            return "openai"
        if self.path.startswith("/v1/models") and "anthropic-version" not in self.headers:
            return "openai"
        return "anthropic"


async def read_head(reader: asyncio.StreamReader, first: bytes) -> bytes:
    """The rest of a head after its first byte, read line by line so that a bare-LF line is a
    400 at once (not a wait for a CRLFCRLF that never comes); 414/431 past the limits. Up to
    four empty lines before the request line are skipped (RFC 9112 2.2)."""
    lines, size, line = [], 0, first
    for _ in range(5):
        line = await _read_head_line(reader, line, not lines)
        if line != b"\r\n":
            break
        line = b""
    while line != b"\r\n":
        size += len(line)
        if size > MAX_HEADER_BYTES:
            raise HeaderTooLarge("request header block over 64 KiB")
        lines.append(line)
        line = await _read_head_line(reader, b"", False)
    return b"".join(lines) + b"\r\n"


async def _read_head_line(reader: asyncio.StreamReader, start: bytes, request_line: bool) -> bytes:
    """One CRLF-terminated head line (start: bytes of it already read)."""
    try:
        line = start + await reader.readuntil(b"\n") if start != b"\n" else start
    except asyncio.LimitOverrunError:
        if request_line:
            raise URITooLong("request line too long") from None
        raise HeaderTooLarge("request header block over 64 KiB") from None
    if request_line and len(line) > MAX_REQUEST_LINE:
        raise URITooLong("request line too long")
    if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
        raise BadRequest("bare CR or LF in the request head")
    return line


def _no_budget(size: int) -> None:
    """The default reserve(): every body size is fine."""


async def read_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: Headers,
                    limit: int, http11: bool = True,
                    reserve: Callable[[int], None] = _no_budget) -> bytes:
    """A request body by Content-Length or chunked; answers Expect: 100-continue (HTTP/1.1
    only, RFC 9110 10.1.1); 413 past limit. reserve(n) is called before n more bytes are
    buffered (the server's bound on all bodies in flight; it raises to refuse)."""
    framing, length = body_framing(headers)
    if framing == "length" and length > limit:
        raise PayloadTooLarge(f"request body over {limit} bytes")
    if framing == "length":
        reserve(length)
    if http11 and headers.get("expect", "").lower() == "100-continue" and framing != "close":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if framing == "length":
        return await reader.readexactly(length) if length else b""
    if framing == "chunked":
        return await read_chunked(reader, limit, reserve)
    return b""


async def read_chunked(reader: asyncio.StreamReader, limit: int,
                       reserve: Callable[[int], None] = _no_budget) -> bytes:
    """A chunked body (trailers discarded), strictly framed: hex sizes, CRLF after each chunk,
    at most MAX_CHUNKS chunks and MAX_CHUNK_LINE bytes per size or trailer line."""
    parts, total = [], 0
    for _ in range(MAX_CHUNKS):
        size = parse_chunk_size((await _read_chunk_line(reader))[:-2])
        total += size
        if total > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes")
        if size == 0:
            while await _read_chunk_line(reader) != b"\r\n":
                pass
            return b"".join(parts)
        reserve(size)
        data = await reader.readexactly(size + 2)
        if data[-2:] != b"\r\n":
            raise BadRequest("chunk data not followed by CRLF")
        parts.append(data[:-2])
    raise BadRequest(f"request body in more than {MAX_CHUNKS} chunks")


async def _read_chunk_line(reader: asyncio.StreamReader) -> bytes:
    """One CRLF-terminated chunk-size or trailer line, at most MAX_CHUNK_LINE bytes."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise BadRequest("chunk size or trailer line too long") from None
    if len(line) > MAX_CHUNK_LINE or not line.endswith(b"\r\n"):
        raise BadRequest("malformed chunk size or trailer line")
    return line


class ClientStream:
    """The response side of one client connection: whole responses or a stream, chunked for
    HTTP/1.1 clients and delimited by closing the connection for HTTP/1.0 ones (no chunks there).
    A head written when the connection will close after it (`closing()`) says so."""

    def __init__(self, writer: asyncio.StreamWriter, head_only: bool = False, chunked: bool = True,
                 closing: Callable[[], bool] = lambda: False):
        self.writer = writer
        self.head_only = head_only
        self.chunked = chunked
        self.closing = closing
        self.must_close = False       # a close-delimited stream was sent
        self.started = False
        self.finished = False         # the whole response is on the wire: nothing may follow it
        self.streaming = False        # start() opened a stream (SSE)
        self.at_boundary = True       # what was sent ends on an SSE event boundary
        self.status = 0
        self.bytes_sent = 0
        self.extra_headers: List[Tuple[str, str]] = []

    async def respond(self, status: int, headers: List[Tuple[str, str]], body: bytes) -> None:
        """Send a whole response with Content-Length."""
        self.started, self.status = True, status
        headers = headers + self.extra_headers + [("content-length", str(len(body)))]
        if self.closing():
            headers.append(("connection", "close"))
        self.writer.write(format_head(format_status_line(status), headers))
        if not self.head_only:
            self.writer.write(body)
            self.bytes_sent += len(body)
        self.finished = True
        await self.writer.drain()

    async def respond_json(self, status: int, obj: Any, headers: Optional[List[Tuple[str, str]]] = None) -> None:
        """Send a JSON response."""
        await self.respond(status, [("content-type", "application/json")] + (headers or []), json_bytes(obj))

    def start(self, status: int, headers: List[Tuple[str, str]]) -> None:
        """Begin a streamed response (written with the first data)."""
        self.started, self.streaming, self.status = True, True, status
        framing = [("transfer-encoding", "chunked")] if self.chunked else []
        self.must_close = not self.chunked
        if self.must_close or self.closing():
            framing.append(("connection", "close"))
        self.writer.write(format_head(format_status_line(status), headers + self.extra_headers + framing))

    async def send(self, data: bytes) -> None:
        """One chunk; waits for the client (backpressure) only when much is buffered."""
        if data:
            writer = self.writer
            writer.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
            self.bytes_sent += len(data)
            self.at_boundary = data.endswith(b"\n\n")
            transport = writer.transport
            if transport.get_write_buffer_size() > WRITE_HIGH_WATER or transport.is_closing():
                await writer.drain()

    def push(self, data: bytes, framed: Optional[bytes] = None) -> None:
        """send() without waiting: for the pump's sink, which runs in a transport callback (the
        pump pauses the upstream when the client is slow). `framed` is data already framed as one
        chunk (the upstream's own framing, relayed as it came)."""
        if data:
            if not self.chunked:
                framed = data
            elif framed is None:
                framed = b"%x\r\n%b\r\n" % (len(data), data)
            self.writer.write(framed)
            self.bytes_sent += len(data)
            self.at_boundary = data.endswith(b"\n\n")

    def probe(self) -> None:
        """Whether the client is still there: an SSE comment on an open stream (a closed socket
        answers it with a reset, which ends the connection); nothing outside a stream."""
        if self.streaming and self.at_boundary and not self.head_only:
            self.write_now(SSE_KEEPALIVE)

    def write_now(self, data: bytes) -> None:
        """Bytes framed as one chunk, buffered without waiting (for a response cut short)."""
        self.writer.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)

    async def finish(self) -> None:
        """The terminating chunk (HTTP/1.0: the connection closes after this response)."""
        if self.chunked:
            self.writer.write(LAST_CHUNK)
        self.finished = True
        await self.writer.drain()

# =============================================================================================
# 8. Upstream client
#
# HTTP/1.1 over asyncio streams with ssl. Connections are pooled per origin and go back to the
# pool only after their body was read to the end; a reused connection that turns out to be
# closed by the server before any response byte is retried once on a fresh one (the keep-alive
# race every pool has). Read-idle timeouts use one timer per response that aborts the transport,
# not a task per read: the relay path stays cheap. HTTPS_PROXY / HTTP_PROXY / NO_PROXY are
# honoured with a CONNECT tunnel (loopback targets never go through a proxy).
# =============================================================================================

Origin = Tuple[str, str, int]


def split_url(url: str) -> Tuple[Origin, str]:
    """URL -> ((scheme, host, port), path with query)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    return (parts.scheme, parts.hostname or "", port), path


def make_ssl_context(verify: bool, ca_bundle: Optional[str]) -> ssl.SSLContext:
    """Verification on with the system store (plus a CA bundle); off only when asked, loudly."""
    context = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else ssl.create_default_context()
    if not verify:
        log.warning("SSL_VERIFY=false: upstream certificates are NOT verified")
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


class IdleTimer:
    """Calls on_idle once when touch() was not called for `timeout` seconds."""

    def __init__(self, timeout: float, on_idle: Callable[[], None]):
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._on_idle = on_idle
        self._last = self._loop.time()
        self.fired = False
        self._handle = self._loop.call_later(timeout, self._check)

    def touch(self) -> None:
        """Activity: push the deadline out."""
        self._last = self._loop.time()

    def _check(self) -> None:
        idle = self._loop.time() - self._last
        if idle >= self._timeout:
            self.fired = True
            self._on_idle()
        else:
            self._handle = self._loop.call_later(self._timeout - idle, self._check)

    def cancel(self) -> None:
        """Stop watching."""
        self._handle.cancel()


class UpstreamConnection:
    """One pooled connection."""

    def __init__(self, origin: Origin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.origin = origin
        self.reader = reader
        self.writer = writer
        self.reused = False

    def usable(self) -> bool:
        """Still open, and the server has not sent anything unasked."""
        return not self.writer.is_closing() and not self.reader.at_eof() and not self.reader._buffer  # noqa

    def abort(self) -> None:
        """Drop the connection now."""
        self.writer.transport.abort()

    def take_buffered(self) -> bytes:
        """What the stream reader holds beyond the response head (it read ahead), taken out of it,
        its flow control reset: the body is pumped from the transport from here on."""
        reader = self.reader
        data = bytes(reader._buffer)  # noqa: private, as usable(): StreamReader has no public peek
        reader._buffer.clear()
        reader._paused = False
        return data


# content-encoding -> zlib wbits (the proxy asks for identity; some upstreams compress anyway)
CONTENT_DECODERS = {"identity": 0, "gzip": 31, "x-gzip": 31, "deflate": 15}
MAX_INFLATED_PIECE = 1 << 20


async def decode_body(body: AsyncIterator[bytes], encoding: str) -> AsyncIterator[bytes]:
    """A gzip/deflate body inflated as it arrives, in pieces of at most 1 MiB (no zip bomb at once)."""
    import zlib
    inflater = zlib.decompressobj(CONTENT_DECODERS[encoding])
    try:
        async for data in body:
            while data:
                piece = inflater.decompress(data, MAX_INFLATED_PIECE)
                data = inflater.unconsumed_tail
                if piece:
                    yield piece
        tail = inflater.flush()
    except zlib.error:
        raise UpstreamError(f"upstream sent a corrupt {encoding} body") from None
    if tail:
        yield tail


PUMP_STOP = True                 # a pump sink's "the answer is complete" (the rest is drained unread)
DRAIN_AFTER_STOP = 0.5           # seconds an upstream may take to end its body after the answer did


class BodyPipe(asyncio.Protocol):
    """A streamed upstream body pushed to a sink from data_received: the per-chunk path runs in
    the transport's callback, with no future, task step or generator per read (each costs more
    than the relaying itself). Chunked, length or close framing; backpressure pauses reading
    until the client has drained; the end (or the failure) resolves `done`."""

    def __init__(self, response: "UpstreamResponse", sink: Callable[[bytes, Optional[bytes]], Any], client: asyncio.StreamWriter):
        self.response, self.sink, self.client = response, sink, client
        self.transport = response.conn.writer.transport
        self.decoder = ChunkedDecoder() if response._framing == "chunked" else None
        self.remaining, self.until_close = response._remaining, response._framing == "close"
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.draining = False
        self._resuming: Optional[asyncio.Task] = None
        self._give_up_handle: Optional[asyncio.TimerHandle] = None

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        self.response.timer.touch()
        try:
            decoder, framed = self.decoder, None
            if decoder is None:
                payload = self._plain(data)
            else:
                payload = decoder.whole_chunk(data)
                if payload is None:
                    payload = decoder.feed_pieces(data)      # whole_chunk is not asked twice
                else:
                    framed = data
            if payload and not self.draining and self.sink(payload, framed) is PUMP_STOP:
                self._stop_sink()
        except ProxyError as exc:
            self._end(exc)
            return
        if self.decoder.done if self.decoder is not None else (not self.until_close and self.remaining <= 0):
            self._end(None)
        elif self.client.transport.get_write_buffer_size() > WRITE_HIGH_WATER and self._resuming is None:
            self.transport.pause_reading()
            self._resuming = asyncio.ensure_future(self._resume())

    def _plain(self, data: bytes) -> bytes:
        """A length- or close-framed piece (bytes past the length make the connection unusable)."""
        if self.until_close:
            return data
        if len(data) > self.remaining:
            self.response._reusable = False
            data = data[:self.remaining]
        self.remaining -= len(data)
        return data

    def _stop_sink(self) -> None:
        """The answer is complete: read the rest of the body unseen, for a short while."""
        self.draining = True
        self._give_up_handle = asyncio.get_running_loop().call_later(DRAIN_AFTER_STOP, self._give_up)

    def _give_up(self) -> None:
        if not self.done.done():
            self.response._reusable = False
            self._end(None)

    async def _resume(self) -> None:
        """Resume reading once the client took what was written (backpressure)."""
        try:
            await self.client.drain()
        except (ConnectionError, RuntimeError):
            pass                               # the client left: the handler is cancelled
        finally:
            self._resuming = None
            if not self.done.done():
                self.transport.resume_reading()

    def eof_received(self) -> bool:
        self._end(None if self.until_close or self._complete() else self.response._failure())
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.done.done():
            clean = (self.until_close and not self.response.timer.fired) or self._complete()
            self._end(None if clean else self.response._failure())

    def _complete(self) -> bool:
        """Whether the answer was whole before the body broke off (the sink stopped): that costs
        the client nothing; the connection is not reused."""
        if self.draining:
            self.response._reusable = False
        return self.draining

    def _end(self, error: Optional[Exception]) -> None:
        if self.decoder is not None and self.decoder.excess:
            self.response._reusable = False
        if self._resuming is not None:
            self._resuming.cancel()
        if self._give_up_handle is not None:
            self._give_up_handle.cancel()
        if not self.done.done():
            self.done.set_exception(error) if error is not None else self.done.set_result(None)


class UpstreamResponse:
    """Status and headers of an upstream response; the body is read on demand."""

    def __init__(self, pool: "ConnectionPool", conn: UpstreamConnection, status: int,
                 headers: Headers, timer: IdleTimer, head_only: bool):
        self.pool = pool
        self.conn = conn
        self.status = status
        self.headers = headers
        self.timer = timer
        self.done = False
        framing, self._remaining = ("length", 0) if head_only or status in (204, 304) else body_framing(headers)
        self._framing = framing
        self._reusable = framing != "close" and "close" not in connection_options(headers)
        self._encoding = headers.pop("content-encoding", "identity").strip().lower()
        if self._encoding not in CONTENT_DECODERS:
            raise UpstreamError(f"upstream answered in content-encoding {self._encoding!r}, "
                                "which the proxy did not ask for and cannot decode")

    def iter_body(self) -> AsyncIterator[bytes]:
        """The body as it arrives (decoded when the upstream compressed it anyway); the
        connection goes back to the pool at its end."""
        body = self._iter_chunked() if self._framing == "chunked" else self._iter_plain()
        return body if self._encoding == "identity" else decode_body(body, self._encoding)

    async def pump(self, sink: Callable[[bytes, Optional[bytes]], Any], client: asyncio.StreamWriter) -> None:
        """The body pushed to sink(payload, framed) as it arrives (see BodyPipe; framed is the
        read as the upstream framed it, when it was exactly one whole chunk, else None); sink
        returns PUMP_STOP once the answer is complete. The connection goes back to the pool at a clean end."""
        if self._encoding != "identity":            # rare: an upstream that compressed anyway
            stopped = False
            async for data in self.iter_body():
                stopped = stopped or sink(data, None) is PUMP_STOP
            return
        pipe = BodyPipe(self, sink, client)
        transport, stream_protocol = pipe.transport, pipe.transport.get_protocol()
        reader = self.conn.reader
        buffered = self.conn.take_buffered()
        transport.set_protocol(pipe)
        try:
            if buffered:
                pipe.data_received(buffered)
            if reader.exception() is not None or reader.at_eof():   # it ended before the pipe took over
                pipe.connection_lost(reader.exception()) if reader.exception() else pipe.eof_received()
            transport.resume_reading()
            await pipe.done
        except BaseException:
            self.close()
            raise
        transport.set_protocol(stream_protocol)
        self._finish()

    def _failure(self) -> UpstreamError:
        """The error for a body that broke off: a timeout if the idle timer fired."""
        self.close()
        if self.timer.fired:
            return UpstreamTimeout("upstream read timed out")
        return UpstreamError("upstream connection lost mid-response")

    async def _iter_chunked(self) -> AsyncIterator[bytes]:
        reader, timer, decoder = self.conn.reader, self.timer, ChunkedDecoder()
        try:
            while not decoder.done:
                data = await reader.read(READ_CHUNK)
                if not data:
                    raise ConnectionResetError()
                timer.touch()
                payload = decoder.feed(data)
                if payload:
                    yield payload
        except (ConnectionError, OSError, BadRequest):
            raise self._failure() from None
        self._reusable = self._reusable and not decoder.excess
        self._finish()

    async def _iter_plain(self) -> AsyncIterator[bytes]:
        reader, remaining, until_close = self.conn.reader, self._remaining, self._framing == "close"
        try:
            while until_close or remaining > 0:
                data = await reader.read(READ_CHUNK if until_close else min(remaining, READ_CHUNK))
                if not data:
                    if until_close:
                        break
                    raise ConnectionResetError()
                self.timer.touch()
                remaining -= len(data)
                yield data
        except (ConnectionError, OSError):
            raise self._failure() from None
        self._finish()

    async def read(self, limit: int = 64 * 1024 * 1024) -> bytes:
        """The whole body (bounded)."""
        parts, total = [], 0
        async for data in self.iter_body():
            total += len(data)
            if total > limit:
                self.close()
                raise UpstreamError("upstream response too large")
            parts.append(data)
        return b"".join(parts)

    def _finish(self) -> None:
        self.done = True
        self.timer.cancel()
        if self._reusable:
            self.pool.release(self.conn)
        else:
            self.conn.abort()

    def close(self) -> None:
        """Give up on the rest of the body: the connection is dropped, never reused."""
        if not self.done:
            self.done = True
            self.timer.cancel()
            self.conn.abort()


class ConnectionPool:
    """Keep-alive connections per origin, and the one request function of the upstream side."""

    def __init__(self, ssl_context: Callable[[], ssl.SSLContext], proxies: Mapping[str, str],
                 connect_timeout: float, read_timeout: float, max_idle: int = 128):
        self._make_ssl_context = ssl_context
        self._ssl_context: Optional[ssl.SSLContext] = None
        self.proxies = dict(proxies)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self._idle: Dict[Origin, List[UpstreamConnection]] = {}
        self.opened = 0

    async def request(self, method: str, url: str, headers: List[Tuple[str, str]], body: bytes = b"",
                      read_timeout: Optional[float] = None) -> UpstreamResponse:
        """Send a request; return once the response head arrived."""
        origin, path = split_url(url)
        host = origin[1] if origin[2] in (80, 443) else f"{origin[1]}:{origin[2]}"
        head = format_head(f"{method} {path} HTTP/1.1", [("host", host)] + headers + [
            ("content-length", str(len(body))), ("accept-encoding", "identity")])
        for attempt in (1, 2):
            conn = await self.acquire(origin)
            try:
                return await self._exchange(conn, head + body, method == "HEAD", read_timeout)
            except _StaleConnection:
                if attempt == 2:
                    raise UpstreamError("upstream closed the connection") from None
        raise AssertionError("unreachable")

    async def _exchange(self, conn: UpstreamConnection, payload: bytes, head_only: bool,
                        read_timeout: Optional[float]) -> UpstreamResponse:
        timer = IdleTimer(read_timeout or self.read_timeout, conn.abort)
        try:
            conn.writer.write(payload)
            await conn.writer.drain()
            status, headers = await self._read_head(conn.reader, timer)
            return UpstreamResponse(self, conn, status, headers, timer, head_only)
        except BadRequest:
            timer.cancel()
            conn.abort()
            raise UpstreamError("upstream sent a malformed response framing") from None
        except (asyncio.IncompleteReadError, ConnectionError, OSError, asyncio.LimitOverrunError) as exc:
            timer.cancel()
            conn.abort()
            if timer.fired:
                raise UpstreamTimeout("upstream did not answer in time") from None
            if conn.reused and (not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial):
                raise _StaleConnection() from None
            raise UpstreamError("upstream connection failed before its response") from None
        except BaseException:
            timer.cancel()
            conn.abort()
            raise

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader, timer: IdleTimer) -> Tuple[int, Headers]:
        """The final response head. Interim 1xx heads are skipped without resetting the read
        timer (an upstream sending 100s forever still times out) and at most a few are taken;
        101 is an error, since the proxy never asks to switch protocols."""
        for _ in range(MAX_INTERIM_RESPONSES + 1):
            status, headers = parse_response_head(await reader.readuntil(b"\r\n\r\n"))
            if status == 101:
                raise UpstreamError("upstream switched protocols (101) unasked")
            if status >= 200:
                timer.touch()
                return status, headers
        raise UpstreamError("upstream sent too many interim (1xx) responses")

    async def acquire(self, origin: Origin) -> UpstreamConnection:
        """An idle usable connection to origin, or a new one."""
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.usable():
                conn.reused = True
                return conn
            conn.abort()
        return await self.connect(origin)

    def release(self, conn: UpstreamConnection) -> None:
        """Back to the pool, if there is room and it is still good."""
        idle = self._idle.setdefault(conn.origin, [])
        if conn.usable() and len(idle) < self.max_idle:
            idle.append(conn)
        else:
            conn.abort()

    async def connect(self, origin: Origin) -> UpstreamConnection:
        """A new connection, direct or through a CONNECT proxy, within connect_timeout."""
        scheme, host, port = origin
        proxy = self.proxy_for(scheme, host)
        context = self.ssl_context() if scheme == "https" else None
        try:
            if proxy:
                sock = await asyncio.wait_for(open_tunnel(proxy, host, port), self.connect_timeout)
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    sock=sock, ssl=context, server_hostname=host if context else None,
                    limit=MAX_HEADER_BYTES * 4), self.connect_timeout)
            else:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    host, port, ssl=context, limit=MAX_HEADER_BYTES * 4), self.connect_timeout)
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"connecting to {host}:{port} timed out") from None
        except socket.gaierror:
            raise UpstreamError(f"cannot resolve {host} (no network, or a wrong base_url?)") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: {exc.__class__.__name__}"
                                f"{': ' + exc.strerror if getattr(exc, 'strerror', None) else ''}") from None
        self.opened += 1
        return UpstreamConnection(origin, reader, writer)

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context, made on first use (loading the system store takes tens of ms)."""
        if self._ssl_context is None:
            self._ssl_context = self._make_ssl_context()
        return self._ssl_context

    def proxy_for(self, scheme: str, host: str) -> Optional[str]:
        """The proxy URL for this target, honouring NO_PROXY; never for loopback."""
        proxy = self.proxies.get(scheme)
        if not proxy or is_loopback(host) or bypasses_proxy(host, self.proxies.get("no", "")):
            return None
        return proxy

    def close(self) -> None:
        """Drop every idle connection."""
        for conns in self._idle.values():
            for conn in conns:
                conn.abort()
        self._idle.clear()


def proxies_from_env(env: Mapping[str, str]) -> Dict[str, str]:
    """HTTPS_PROXY / HTTP_PROXY / NO_PROXY (either case) as {"https": ..., "http": ..., "no": ...}."""
    proxies = {}
    for scheme in ("https", "http", "no"):
        value = env.get(f"{scheme}_proxy") or env.get(f"{scheme.upper()}_PROXY")
        if value:
            proxies[scheme] = value
    return proxies


def bypasses_proxy(host: str, no_proxy: str) -> bool:
    """NO_PROXY matching: "*", exact host, or a domain suffix (".example.com" or "example.com")."""
    host = host.lower().strip("[]")
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        entry = entry.split(":")[0].lstrip(".") if entry != "*" else entry
        if entry and (entry == "*" or host == entry or host.endswith("." + entry)):
            return True
    return False


class _StaleConnection(Exception):
    """A reused keep-alive connection was already closed by the server."""


async def open_tunnel(proxy_url: str, host: str, port: int) -> socket.socket:
    """A socket to host:port through an HTTP proxy's CONNECT (Proxy-Authorization from userinfo)."""
    loop = asyncio.get_running_loop()
    parts = urllib.parse.urlsplit(proxy_url if "://" in proxy_url else "http://" + proxy_url)
    infos = await loop.getaddrinfo(parts.hostname, parts.port or 8080, type=socket.SOCK_STREAM)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
        head = [("host", f"{host}:{port}")]
        if parts.username:
            creds = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            head.append(("proxy-authorization", "Basic " + base64.b64encode(creds.encode()).decode()))
        await loop.sock_sendall(sock, format_head(f"CONNECT {host}:{port} HTTP/1.1", head))
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = await loop.sock_recv(sock, 4096)
            if not data or len(answer) > MAX_HEADER_BYTES:
                raise OSError("proxy closed the tunnel")
            answer += data
        status, _ = parse_response_head(answer.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")
        if status != 200:
            raise OSError(f"proxy answered {status} to CONNECT")
        return sock
    except BaseException:
        sock.close()
        raise


async def fetch_json(pool: ConnectionPool, url: str, payload: dict,
                     headers: Optional[List[Tuple[str, str]]] = None) -> Tuple[int, Any]:
    """POST JSON, return (status, parsed body or {"raw": text})."""
    response = await pool.request("POST", url, [("content-type", "application/json"),
                                                ("accept", "application/json")] + (headers or []),
                                  json_bytes(payload))
    raw = await response.read()
    try:
        return response.status, loads_json(raw) if raw else {}
    except ValueError:
        return response.status, {"raw": raw[:500].decode("utf-8", "replace")}

# =============================================================================================
# 9. Converters
#
# Pure functions and state machines; no I/O, no environment, no logging above debug. A request
# converter is dict in, dict out. A response converter is a state machine, feed(event) -> events
# and close() -> events, with the non-streaming answer folded from the same machine, so stop
# reasons, usage and tool ids have one home each.
# =============================================================================================

# ---- shared by the converters and the Anthropic-format relay ---------------------------------
#
# Nothing is lost in silence: every request field or block a converter drops or rewrites goes
# through _note(), one DEBUG line with its path plus a (path, why) pair in the caller's `notes`
# list; the handler says each kind once per process at INFO (DropLog, section 11).
#
# Sessions that switch routes carry thinking blocks from several providers, and Anthropic rejects
# a signature it did not issue ("Invalid `signature` in `thinking` block"). So signatures carry
# their origin: the converted path (OpenAI upstream -> Anthropic client) leaves a thinking block
# unsigned, or, when the upstream sent a signature (OpenRouter), tags it `claude-proxy:<provider>:`;
# anthropic-format vendors' signatures are tagged the same way on the way to the client
# (provider option tag_signatures), in place: SignatureTagRelay relays the vendor's bytes and
# re-encodes only the events that carry a signature, tag_message_bytes swaps the values in a
# whole answer. Before a request goes to an anthropic-format provider,
# own_thinking_only() keeps the thinking blocks that provider issued (a vendor's own come back
# untagged) and removes the rest: empty signatures, other providers' tags, and, for a vendor,
# Anthropic's untagged ones. Claude Code keeps the removed text in its own transcript.
#
# Gemini's thought signature rides on a function call (PROTOCOLS H.3), and the only field of a
# tool call that Claude Code sends back untouched is its id: the converted stream appends the
# signature to the tool_use id (`<id>__ts_<base64url>`) and the request converter splits it off
# again, so the call goes back with `extra_content.google.thought_signature` and its own id.

Notes = List[Tuple[str, str]]
FOLDED_SYSTEM = "<system-reminder>\n%s\n</system-reminder>"   # a system message as user text
SIGNATURE_TAG = "claude-proxy:"
TOOL_ID_SIGNATURE = "__ts_"


def _note(notes: Optional[Notes], path: str, why: str) -> None:
    """Report one dropped or rewritten request field: DEBUG now, once per kind at INFO by the handler."""
    log.debug("%s: %s", path, why)
    if notes is not None:
        notes.append((path, why))


def _note_extra_keys(obj: dict, mapped: Iterable[str], param: str, notes: Optional[Notes], why: str,
                     reasons: Optional[Mapping[str, str]] = None) -> None:
    """Note each key of obj that the converter does not map (why, or the key's own reason)."""
    for key in sorted(obj.keys() - set(mapped)):
        _note(notes, f"{param}.{key}", (reasons or {}).get(key, why))


def tag_signature(provider: str, signature: str) -> str:
    """A thinking signature marked with the provider that issued it."""
    return f"{SIGNATURE_TAG}{provider}:{signature}"


def untag_signature(signature: str) -> Tuple[Optional[str], str]:
    """(issuing provider or None when untagged, the signature as issued)."""
    if not signature.startswith(SIGNATURE_TAG):
        return None, signature
    provider, _, original = signature[len(SIGNATURE_TAG):].partition(":")
    return provider, original


def join_tool_id(tool_id: str, signature: Optional[str]) -> str:
    """A tool_use id carrying an upstream's thought signature (base64url, so still ^[A-Za-z0-9_-]+$)."""
    if not signature:
        return tool_id
    encoded = base64.urlsafe_b64encode(signature.encode("utf-8")).decode("ascii").rstrip("=")
    return tool_id + TOOL_ID_SIGNATURE + encoded


def split_tool_id(tool_id: str) -> Tuple[str, Optional[str]]:
    """(the tool id as the upstream issued it, its thought signature or None): the first mark
    followed by a clean encoding wins, so an upstream id that holds the mark itself still splits."""
    at = tool_id.find(TOOL_ID_SIGNATURE)
    while at >= 0:
        encoded = tool_id[at + len(TOOL_ID_SIGNATURE):]
        try:
            signature = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")
            if join_tool_id("", signature) == TOOL_ID_SIGNATURE + encoded:
                return tool_id[:at], signature
        except (ValueError, UnicodeDecodeError):
            pass
        at = tool_id.find(TOOL_ID_SIGNATURE, at + 1)
    return tool_id, None


def strict_schema(schema: Any, all_required: bool = False) -> Any:
    """A copy where every object schema forbids additional properties, as Anthropic requires
    (all_required: and requires every property, as OpenAI's strict mode does)."""
    if isinstance(schema, list):
        return [strict_schema(item, all_required) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_schema(value, all_required) for key, value in schema.items()}
    if out.get("type") == "object" or "properties" in out:
        out["additionalProperties"] = False
        if all_required and isinstance(out.get("properties"), dict):
            out["required"] = list(out["properties"])
    return out


def anthropic_thinking_on(anthropic_body: dict) -> bool:
    """Whether an Anthropic request asks for thinking."""
    thinking = anthropic_body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")


THINKING_BLOCKS = ("thinking", "redacted_thinking")


def _own_block(block: Any, provider: dict) -> Optional[Any]:
    """A block as this provider must see it: its own thinking untagged, another's thinking None."""
    if not isinstance(block, dict) or block.get("type") not in THINKING_BLOCKS:
        return block
    key = "signature" if block["type"] == "thinking" else "data"
    origin, original = untag_signature(str(block.get(key) or ""))
    mine = origin == provider["name"] if provider.get("tag_signatures") else origin is None
    if not original or not mine:
        return None
    return block if origin is None else dict(block, **{key: original})


def _own_turn(message: dict, provider: dict, param: str, notes: Optional[Notes]) -> Optional[dict]:
    """An assistant turn without the thinking blocks the provider cannot verify (None if nothing is left)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    kept = []
    for i, block in enumerate(content):
        own = _own_block(block, provider)
        if own is None:
            _note(notes, f"{param}.{i}", "thinking block removed: its signature is empty or another provider's")
        else:
            kept.append(own)
    if kept == content:
        return message
    return dict(message, content=kept) if kept else None


def _last_assistant_content(anthropic_body: dict) -> Any:
    """The content of the last assistant turn (None without one)."""
    turns = [m for m in anthropic_body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "assistant"]
    return turns[-1].get("content") if turns else None


def _thinking_off_without_lead(anthropic_body: dict, stripped: bool, notes: Optional[Notes]) -> dict:
    """With thinking on, a last assistant turn whose tool_use does not follow a thinking block is a 400
    (PROTOCOLS B.2) when that turn lost its thinking (`stripped`: another provider's blocks were
    removed) or thinking is `enabled` (the model always thinks first, so another route answered
    it): such a request goes without thinking (and without clear_thinking edits). An adaptive
    turn the model chose not to think in is sent as the client sent it."""
    content = _last_assistant_content(anthropic_body)
    if not anthropic_thinking_on(anthropic_body) or not isinstance(content, list) or not content:
        return anthropic_body
    uses_tool = any(isinstance(b, dict) and b.get("type") == "tool_use" for b in content)
    if not uses_tool or (isinstance(content[0], dict) and content[0].get("type") in THINKING_BLOCKS):
        return anthropic_body
    thinking = anthropic_body.get("thinking")
    if not stripped and not (isinstance(thinking, dict) and thinking.get("type") == "enabled"):
        return anthropic_body
    _note(notes, "thinking", "left off for this request: the last assistant turn's tool call has no thinking "
                             "block this provider issued (" + ("its thinking came from another provider)" if stripped
                                                               else "another route answered it)"))
    return _without_clear_thinking({k: v for k, v in anthropic_body.items() if k != "thinking"}, notes)


def _without_clear_thinking(anthropic_body: dict, notes: Optional[Notes]) -> dict:
    """The body without context_management's clear_thinking edits (they need thinking on)."""
    management = anthropic_body.get("context_management")
    edits = management.get("edits") if isinstance(management, dict) else None
    if not isinstance(edits, list):
        return anthropic_body
    kept = [e for e in edits if not (isinstance(e, dict) and str(e.get("type", "")).startswith("clear_thinking"))]
    if len(kept) == len(edits):
        return anthropic_body
    _note(notes, "context_management.edits", "clear_thinking edits removed with thinking")
    if kept or len(management) > 1:
        return dict(anthropic_body, context_management=dict(management, edits=kept))
    return {k: v for k, v in anthropic_body.items() if k != "context_management"}     # no edits left: none sent


def own_thinking_only(anthropic_body: dict, provider: dict, notes: Optional[Notes] = None) -> dict:
    """The request as an anthropic-format provider can take it after other routes answered earlier
    turns: thinking blocks it did not issue removed, thinking left off where that breaks a tool turn.
    Returns the same object when nothing changed (so passthrough keeps the client's bytes)."""
    messages = anthropic_body.get("messages")
    if not isinstance(messages, list):
        return anthropic_body
    kept: List[Any] = []
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "assistant":
            message = _own_turn(message, provider, f"messages.{i}.content", notes)
        if message is not None:
            kept.append(message)
    body = anthropic_body if kept == messages else dict(anthropic_body, messages=kept)
    stripped = body is not anthropic_body and _last_assistant_content(body) != _last_assistant_content(anthropic_body)
    return _thinking_off_without_lead(body, stripped, notes)


def _as_blocks(content: Any) -> List[Any]:
    """Message content as a block list (a string becomes one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return list(content) if isinstance(content, list) else []


def _as_user_turn(message: Any, param: str, notes: Optional[Notes]) -> Any:
    """A role "system" message as a user turn holding its text as FOLDED_SYSTEM (others as they are)."""
    if not isinstance(message, dict) or message.get("role") != "system":
        return message
    content = message.get("content")
    texts = [content] if isinstance(content, str) else \
        [b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text"]
    _note(notes, param, "rewritten: a mid-conversation system message sent as user text (the model takes none)")
    _note_extra_keys(message, ("role", "content"), param, notes, "dropped with the system message it was on")
    text = "\n\n".join(t for t in texts if t.strip())
    return {"role": "user", "content": [{"type": "text", "text": FOLDED_SYSTEM % text}] if text else []}


def _merge_user_turns(messages: List[Any]) -> List[Any]:
    """Adjacent user turns as one, tool_result blocks first (an empty turn disappears)."""
    merged: List[Any] = []
    for message in messages:
        if not (isinstance(message, dict) and message.get("role") == "user"):
            merged.append(message)
            continue
        blocks = _as_blocks(message.get("content"))
        if merged and isinstance(merged[-1], dict) and merged[-1].get("role") == "user":
            blocks = _as_blocks(merged.pop().get("content")) + blocks
        blocks.sort(key=lambda b: not (isinstance(b, dict) and b.get("type") == "tool_result"))
        merged.append(dict(message, content=blocks))
    return [m for m in merged if not (isinstance(m, dict) and m.get("role") == "user" and not m["content"])]


def fold_system_messages(anthropic_body: dict, notes: Optional[Notes] = None) -> dict:
    """The request with its role "system" messages as user text at their position, for a model that
    takes no mid-conversation system message (a routed Claude Code session; PROTOCOLS H.2). Returns
    the same object when there is none."""
    messages = anthropic_body.get("messages")
    if not isinstance(messages, list) or not any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
        return anthropic_body
    turns = [_as_user_turn(m, f"messages.{i}", notes) for i, m in enumerate(messages)]
    return dict(anthropic_body, messages=_merge_user_turns(turns))


def _tag_block(block: Any, provider: str) -> Any:
    """A response content block with its thinking signature (or redacted data) tagged."""
    if not isinstance(block, dict) or block.get("type") not in THINKING_BLOCKS:
        return block
    key = "signature" if block["type"] == "thinking" else "data"
    value = block.get(key)
    return dict(block, **{key: tag_signature(provider, value)}) if isinstance(value, str) and value else block


def tag_message_signatures(anthropic_message: dict, provider: str) -> dict:
    """A vendor's non-streaming answer with its thinking signatures tagged."""
    content = anthropic_message.get("content")
    if not isinstance(content, list):
        return anthropic_message
    return dict(anthropic_message, content=[_tag_block(b, provider) for b in content])


def tag_event_signature(anthropic_event: Any, provider: str) -> Any:
    """A vendor's stream event with its signature tagged (signature_delta, or the start of a
    thinking / redacted_thinking block); any other event as it is."""
    if not isinstance(anthropic_event, dict):
        return anthropic_event
    delta = anthropic_event.get("delta")
    if anthropic_event.get("type") == "content_block_delta" and isinstance(delta, dict) \
            and delta.get("type") == "signature_delta" and isinstance(delta.get("signature"), str) and delta["signature"]:
        return dict(anthropic_event, delta=dict(delta, signature=tag_signature(provider, delta["signature"])))
    if anthropic_event.get("type") == "content_block_start":
        block = anthropic_event.get("content_block")
        tagged = _tag_block(block, provider)
        return anthropic_event if tagged is block else dict(anthropic_event, content_block=tagged)
    return anthropic_event


def _could_carry_signature(raw_event: bytes) -> bool:
    """Whether the bytes of one SSE event may hold a signature to tag (cheap: no decode)."""
    return b"signature_delta" in raw_event or (b"content_block_start" in raw_event and b"thinking" in raw_event)


def _event_ends(buf: bytes) -> List[int]:
    """The offset just past each blank line in buf, where an SSE event ends (CRLF, LF or CR line
    ends; buf starts after a line end)."""
    ends, at = [], 0
    if b"\r" not in buf:
        at = buf.find(b"\n\n")
        while at >= 0:
            ends.append(at + 2)
            at = buf.find(b"\n\n", at + 2)
        return ends
    for match in _LINE_END.finditer(buf):
        if match.start() == at:
            ends.append(match.end())
        at = match.end()
    return ends


class SignatureTagRelay:
    """An anthropic-format vendor's stream, bytes in and bytes out (sans-IO; the relay's byte-stage
    interface feed/close): relayed as the vendor sent them, except each event that carries a
    signature, which is re-encoded with the signature tagged with the vendor's name (so only that
    vendor gets it back, see own_thinking_only). Bytes are held only up to the end of the last
    whole event; an event is decoded only when its bytes could carry a signature."""

    def __init__(self, provider: str, max_event: Optional[int] = None):
        self.provider = provider
        self._held = b""
        self._max = max_event or MAX_SSE_LINE

    def feed(self, data: bytes) -> bytes:
        """The whole events this read completes, as relayed."""
        buf = self._held + data if self._held else data
        if b"\r" in buf:          # never cut at a CR that ends the read: it may be half a CRLF
            end = max([at for at in _event_ends(buf) if at < len(buf) or buf[-1:] != b"\r"], default=0)
        else:
            at = buf.rfind(b"\n\n")
            end = at + 2 if at >= 0 else 0
        whole, self._held = buf[:end], buf[end:]
        if len(self._held) > self._max:
            raise UpstreamError(f"upstream sent an SSE event over {self._max} bytes")
        if not (b"signature_delta" in whole or b"content_block_start" in whole):
            return whole
        return self._tag(whole)

    def close(self) -> bytes:
        """The last event, when the stream ended without its blank line."""
        rest, self._held = self._held, b""
        return self._tag(rest) if rest else b""

    def _tag(self, whole: bytes) -> bytes:
        """Whole events, the ones carrying a signature rewritten."""
        out, start = [], 0
        ends = _event_ends(whole)
        for end in ends if ends and ends[-1] == len(whole) else ends + [len(whole)]:
            raw_event, start = whole[start:end], end
            out.append(self._tag_event(raw_event) if _could_carry_signature(raw_event) else raw_event)
        return b"".join(out)

    def _tag_event(self, raw_event: bytes) -> bytes:
        """One event's bytes, re-encoded only when its signature was tagged."""
        decoder = SSEDecoder()
        parsed = decoder.feed(raw_event) + decoder.close()
        if len(parsed) != 1:
            return raw_event
        try:
            anthropic_event = json.loads(parsed[0][1])
        except ValueError:
            return raw_event
        tagged = tag_event_signature(anthropic_event, self.provider)
        return raw_event if tagged is anthropic_event else format_anthropic_event(tagged)


_SIGNED_FIELD = re.compile(rb'"(signature|data)"(\s*:\s*)"((?:[^"\\]|\\.)*)"')


def tag_message_bytes(raw: bytes, provider: str) -> bytes:
    """A vendor's non-streaming answer as it sent it, each thinking signature (redacted data)
    replaced in place by its tagged form; re-encoded only if a value cannot be found as sent."""
    if b'"signature"' not in raw and b'"redacted_thinking"' not in raw:
        return raw
    message = parse_upstream_json(raw)
    tagged = tag_message_signatures(message, provider)
    swaps = {(key, old[key]): new[key] for old, new in zip(message.get("content") or [], tagged.get("content") or [])
             if old is not new for key in ("signature", "data") if key in old}
    found = []

    def swap(match: "re.Match[bytes]") -> bytes:
        key, value = match.group(1).decode(), json.loads(b'"' + match.group(3) + b'"')
        if (key, value) not in swaps:
            return match.group(0)
        found.append(key)
        return b'"%s"%s%s' % (match.group(1), match.group(2), json_bytes(swaps[key, value]))
    out = _SIGNED_FIELD.sub(swap, raw) if swaps else raw
    return out if len(found) == len(swaps) else json_bytes(tagged)

# ---------------------------------------------------------------------------------------------
# 9a. Anthropic client -> OpenAI-compatible upstream (request), OpenAI -> Anthropic (response)
# ---------------------------------------------------------------------------------------------
#
# Request side (PROTOCOLS D.1, D.6, D.7, H.2, H.3): `anthropic_to_openai_request` validates the
# shape once (BadRequest naming the path) and maps field by field; every field or block it drops
# or rewrites is a note (see above). Decisions made here:
#   - `role: "system"` messages inside `messages` (Claude Code sends them) stay in place where
#     the provider accepts system messages mid-list (provider or model option mid_system);
#     otherwise each becomes user text at its position (FOLDED_SYSTEM), merged into the user turn
#     next to it: many chat templates (Qwen, Llama on vLLM / llama.cpp / Ollama) reject a system
#     message that is not first. Never between a tool call and its results: there it waits for
#     the tool messages. System messages before the first turn join the system prompt.
#   - user text-only turns collapse to one string (texts joined "\n\n"); assistant text
#     blocks join with "" (citations split one answer into many blocks).
#   - blocks OpenAI has no form for become text: ToolSearch's tool_reference names the tool it
#     loaded, search_result keeps its title and source, server_tool_use and web search results in
#     history become short notes (title and URL per result), so the model still sees them.
#   - a deferred tool (defer_loading, Claude Code's DeferredToolPlaceholder too) is sent only once
#     a tool_reference in the history has loaded it, as Anthropic shows it to the model.
#   - the effort goes as the model accepts it (model option efforts; default every value the
#     openai SDK allows), else the nearest lower one; `strict` is kept on tools, and converted
#     structured output is strict (every property required, no additional properties).
#   - tool/function names longer than 64 characters are passed through unchanged.
#   - where the provider wants thinking back (replay_reasoning: DeepSeek's, Kimi's, GLM's thinking
#     modes 400 a tool-call turn without it, H.3), every assistant turn carries the field: the
#     thinking text the history holds for it, whichever model wrote it, else "" (a turn another
#     model answered has none; the check is for the field, and no text is made up). A chat client
#     passed through to such a provider gets the same (with_replayed_reasoning).
# Stream-side decisions (see the class essay): content_filter and a refusal -> "refusal";
# OpenRouter's finish "error" -> "end_turn" (its error arrives as a separate chunk); any tool
# call forces "tool_use" except after finish "length" (the arguments are truncated, so
# "max_tokens" is the truthful answer, as Anthropic itself reports); reasoning.encrypted details
# are ignored; url_citation annotations become citations on the text block.
#
# Response side: `OpenAIToAnthropicStream` (essay on the class); non-streaming answers go
# through the same machine (`openai_response_to_anthropic`) and are folded back into one
# message by `fold_anthropic_events`, which also serves Anthropic upstreams.

BILLING_HEADER_PREFIX = "x-anthropic-billing-header:"
MAX_OPENAI_USER_LEN = 64
MAX_OPENAI_STOP = 4
NO_OPENAI_FORM = "dropped: the OpenAI API has no such field"
TOOL_REFERENCE_TEXT = "Tool loaded: %s"

TOOL_CHOICE_TO_OPENAI = {"auto": "auto", "any": "required", "none": "none"}
# thinking.budget_tokens -> effort (claude-code-router thresholds, PROTOCOLS D.6): first
# bound the budget fits under wins, above all of them -> "high".
EFFORT_FROM_BUDGET = ((1024, "low"), (8192, "medium"))

GEMINI_SCHEMA_DROP = frozenset({"$schema", "additionalProperties", "propertyNames", "$defs",
                                "$ref", "definitions", "title", "examples", "default"})
GEMINI_STRING_FORMATS = frozenset({"enum", "date-time"})
GEMINI_SKIP_SIGNATURE = "skip_thought_signature_validator"

ANTHROPIC_ROLES = frozenset({"user", "assistant"})  # "system" is placed by _openai_messages
# Block keys each converter maps; any other key of such a block is a note.
USER_BLOCK_KEYS = {"text": ("type", "text"), "image": ("type", "source"), "document": ("type", "source", "title"),
                   "search_result": ("type", "source", "title", "content"), "tool_reference": ("type", "tool_name"),
                   "tool_result": ("type", "tool_use_id", "content", "is_error")}
TOOL_KEYS = ("type", "name", "description", "input_schema", "strict")
TOOL_KEY_REASONS = {"defer_loading": "dropped: ToolSearch has loaded this tool, so it is sent like any other"}
MESSAGE_REASONS = {"output_config": "dropped: a per-message effort has no OpenAI form (the request's is sent)"}
# Why a top-level Anthropic field has no place in an OpenAI request (default: NO_OPENAI_FORM).
ANTHROPIC_DROP_REASONS = {
    "top_k": "dropped: OpenAI has no top_k",
    "cache_control": "dropped: prompt-cache marks have no OpenAI form",
    "context_management": "dropped: context editing is done by Anthropic's servers",
    "safeguards": "dropped: Anthropic's server-side classifier; nothing a converted route can run",
    "mcp_servers": "dropped: MCP connectors run on Anthropic's servers",
    "container": "dropped: code-execution containers are Anthropic's",
    "service_tier": "dropped: no OpenAI equivalent of Anthropic's tiers",
    "speed": "dropped: fast mode is Anthropic's",
}


def _is_number(value: Any) -> bool:
    """True for int/float but not bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _expect(condition: bool, message: str, param: str) -> None:
    """Raise BadRequest(message, param) unless condition holds."""
    if not condition:
        raise BadRequest(message, param=param)


def _drop_billing_lines(text: str) -> str:
    """Remove Claude Code's `x-anthropic-billing-header:` lines from a system text."""
    lines = text.split("\n")
    return "\n".join(line for line in lines if not line.startswith(BILLING_HEADER_PREFIX))


def _system_texts(system: Any, param: str, notes: Optional[Notes] = None) -> List[str]:
    """Texts of an Anthropic `system` (string or text blocks), billing lines and empties dropped."""
    if system is None:
        return []
    if isinstance(system, str):
        blocks = [{"type": "text", "text": system}]
    else:
        _expect(isinstance(system, list), "system must be a string or a list of blocks", param)
        blocks = system
    texts = []
    for i, block in enumerate(blocks):
        _expect(isinstance(block, dict) and isinstance(block.get("text", ""), str),
                "system block must be a text block", f"{param}.{i}")
        _note_extra_keys(block, ("type", "text"), f"{param}.{i}", notes, NO_OPENAI_FORM)
        text = _drop_billing_lines(block.get("text", "")).strip("\n")
        if text != block.get("text", "").strip("\n"):
            _note(notes, f"{param}.{i}.text", "x-anthropic-billing-header line dropped (a per-request nonce)")
        if text.strip():
            texts.append(text)
    return texts


def _image_part(block: dict, param: str) -> dict:
    """An Anthropic image block as an OpenAI image_url part."""
    source = block.get("source")
    _expect(isinstance(source, dict), "image block needs a source", f"{param}.source")
    if source.get("type") == "base64":
        url = "data:%s;base64,%s" % (source.get("media_type", "image/png"), source.get("data", ""))
    elif source.get("type") == "url":
        url = source.get("url", "")
    else:
        raise BadRequest("image source type %r is not supported on this route"
                         % source.get("type"), param=f"{param}.source.type")
    return {"type": "image_url", "image_url": {"url": url}}


def _document_parts(block: dict, param: str) -> List[dict]:
    """An Anthropic document block as OpenAI parts (PDF -> file part, text -> text part)."""
    source = block.get("source")
    _expect(isinstance(source, dict), "document block needs a source", f"{param}.source")
    kind = source.get("type")
    if kind == "base64":
        data_url = "data:%s;base64,%s" % (source.get("media_type", "application/pdf"),
                                          source.get("data", ""))
        filename = block.get("title") or "document.pdf"
        return [{"type": "file", "file": {"filename": filename, "file_data": data_url}}]
    if kind == "text":
        return [{"type": "text", "text": source.get("data", "")}]
    if kind == "url":
        return [{"type": "text", "text": "Document: %s" % source.get("url", "")}]
    if kind == "content" and isinstance(source.get("content"), list):
        return [{"type": "text", "text": b["text"]} for b in source["content"]
                if isinstance(b, dict) and b.get("type") == "text" and b.get("text")]
    raise BadRequest("document source type %r is not supported on this route" % kind,
                     param=f"{param}.source.type")


def _search_result_text(block: dict) -> str:
    """A search_result block as text: title, source URL, then its text."""
    texts = [b.get("text", "") for b in block.get("content") or [] if isinstance(b, dict)]
    head = [block.get("title") or "", "Source: %s" % block["source"] if block.get("source") else ""]
    return "\n".join(line for line in head + texts if line)


USER_PART_CONVERTERS: Dict[str, Callable[[dict, str], List[dict]]] = {
    "text": lambda b, param: [{"type": "text", "text": b["text"]}] if b.get("text") else [],
    "image": lambda b, param: [_image_part(b, param)],
    "document": _document_parts,
    "search_result": lambda b, param: [{"type": "text", "text": _search_result_text(b)}],
    "tool_reference": lambda b, param: [{"type": "text", "text": TOOL_REFERENCE_TEXT % b.get("tool_name")}],
}


def _user_parts(block: dict, param: str, notes: Optional[Notes] = None) -> List[dict]:
    """One non-tool_result user block as OpenAI content parts (unknown types dropped)."""
    kind = block.get("type")
    convert_block = USER_PART_CONVERTERS.get(kind)
    if convert_block is None:
        _note(notes, param, "%s block dropped: the OpenAI API has no such content" % kind)
        return []
    _note_extra_keys(block, USER_BLOCK_KEYS[kind], param, notes, NO_OPENAI_FORM)
    return convert_block(block, param)


def _tool_result_content(block: dict, param: str, notes: Optional[Notes] = None) -> Tuple[str, List[dict]]:
    """A tool_result's content flattened to text, plus the image parts it carried."""
    content = block.get("content")
    if content is None:
        content = ""
    if isinstance(content, str):
        texts, images = [content], []
    else:
        _expect(isinstance(content, list), "tool_result content must be a string or a list",
                f"{param}.content")
        texts, images = [], []
        for i, item in enumerate(content):
            _expect(isinstance(item, dict), "content block must be an object",
                    f"{param}.content.{i}")
            parts = _user_parts(item, f"{param}.content.{i}", notes)
            texts += [p["text"] for p in parts if p["type"] == "text"]
            images += [p for p in parts if p["type"] != "text"]
    text = "\n".join(texts)
    if block.get("is_error"):
        _note(notes, f"{param}.is_error", "rewritten: shown as an \"Error: \" prefix")
    return ("Error: " + text if block.get("is_error") else text), images


def _collapse_parts(parts: List[dict]) -> Any:
    """Parts that are all text become one string; otherwise the list is kept."""
    if all(p["type"] == "text" for p in parts):
        return "\n\n".join(p["text"] for p in parts)
    return parts


def _user_messages(content: list, param: str, notes: Optional[Notes] = None) -> List[dict]:
    """An Anthropic user turn: tool messages first, then one user message with the rest."""
    tool_messages, moved_images, parts = [], [], []
    for i, block in enumerate(content):
        if block.get("type") != "tool_result":
            parts += _user_parts(block, f"{param}.{i}", notes)
            continue
        _expect(isinstance(block.get("tool_use_id"), str) and block["tool_use_id"] != "",
                "tool_result needs a tool_use_id", f"{param}.{i}.tool_use_id")
        _note_extra_keys(block, USER_BLOCK_KEYS["tool_result"], f"{param}.{i}", notes, NO_OPENAI_FORM)
        text, images = _tool_result_content(block, f"{param}.{i}", notes)
        tool_id = sanitize_tool_id(split_tool_id(block["tool_use_id"])[0])
        tool_messages.append({"role": "tool", "tool_call_id": tool_id, "content": text})
        moved_images += images
    rest = moved_images + parts
    return tool_messages + ([{"role": "user", "content": _collapse_parts(rest)}] if rest else [])


def _tool_call(block: dict, param: str, spec: dict, notes: Optional[Notes]) -> dict:
    """A tool_use block as an OpenAI tool call; Gemini's thought signature back on it (C.7, H.3)."""
    _expect(isinstance(block.get("id"), str) and isinstance(block.get("name"), str),
            "tool_use needs an id and a name", param)
    _note_extra_keys(block, ("type", "id", "name", "input"), param, notes, NO_OPENAI_FORM)
    tool_id, signature = split_tool_id(block["id"])
    arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
    call = {"id": sanitize_tool_id(tool_id), "type": "function",
            "function": {"name": block["name"], "arguments": arguments}}
    if spec.get("schema") == "gemini":     # Gemini 3 400s a replayed call without one
        call["extra_content"] = {"google": {"thought_signature": signature or GEMINI_SKIP_SIGNATURE}}
    return call


def _server_block_text(block: dict) -> str:
    """A server tool call or result in history as a short note the model can read (title and URL per hit)."""
    kind, content = block.get("type"), block.get("content")
    if kind == "server_tool_use":
        return "\n(called %s: %s)\n" % (block.get("name"), json.dumps(block.get("input") or {}, ensure_ascii=False))
    if kind == "web_search_tool_result" and isinstance(content, list):
        hits = ["- %s <%s>" % (r.get("title") or "", r.get("url") or "") for r in content if isinstance(r, dict)]
        return "\nWeb search results:\n%s\n" % "\n".join(hits)
    url = content.get("url") if isinstance(content, dict) else None
    return "\n(%s%s)\n" % (kind, ": " + url if url else "")


def _is_server_block(kind: Any) -> bool:
    """server_tool_use and the *_tool_result blocks of Anthropic's server tools."""
    return kind == "server_tool_use" or (isinstance(kind, str) and kind.endswith("_tool_result"))


def _assistant_message(content: list, param: str, spec: dict, notes: Optional[Notes] = None) -> Optional[dict]:
    """An Anthropic assistant turn as one OpenAI assistant message (None if nothing to send)."""
    texts, thinking, tool_calls = [], [], []
    for i, block in enumerate(content):
        kind, at = block.get("type"), f"{param}.{i}"
        if kind == "text":
            texts.append(block.get("text", ""))
            _note_extra_keys(block, ("type", "text"), at, notes, NO_OPENAI_FORM)
        elif kind == "thinking" and spec.get("replay_reasoning"):
            thinking.append(block.get("thinking", ""))
        elif kind == "tool_use":
            tool_calls.append(_tool_call(block, at, spec, notes))
        elif _is_server_block(kind):
            texts.append(_server_block_text(block))
            _note(notes, at, "%s rewritten as a text note" % kind)
        else:
            _note(notes, at, "%s block dropped: this provider takes no such block back" % kind)
    message: Dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if spec.get("replay_reasoning"):
        message[spec["replay_reasoning"]] = "".join(thinking)
    elif not message["content"] and not tool_calls:
        return None
    if message["content"] is None and not tool_calls:
        message["content"] = ""
    return message


def with_replayed_reasoning(openai_body: dict, field: str, notes: Optional[Notes] = None) -> dict:
    """A chat client's request as a thinking mode that wants its reasoning back takes it
    (replay_reasoning; PROTOCOLS H.3): each assistant message without `field` gets it empty, as the
    converted routes send a turn with no thinking (another model's turn has none to give). The same
    object when none is missing, so passthrough keeps the client's bytes."""
    messages = openai_body.get("messages")
    missing = {i for i, m in enumerate(messages if isinstance(messages, list) else [])
               if isinstance(m, dict) and m.get("role") == "assistant" and field not in m}
    if not missing:
        return openai_body
    for i in sorted(missing):
        _note(notes, f"messages.{i}.{field}", "added empty: this thinking mode rejects an assistant turn without "
                                              "it, and a turn another model answered has none to give back")
    return dict(openai_body, messages=[dict(m, **{field: ""}) if i in missing else m for i, m in enumerate(messages)])


def _convert_message(message: Any, param: str, spec: dict, notes: Optional[Notes] = None) -> List[dict]:
    """One Anthropic user/assistant message as zero or more OpenAI messages."""
    _expect(isinstance(message, dict), "message must be an object", param)
    role, content = message.get("role"), message.get("content")
    _expect(isinstance(role, str) and role in ANTHROPIC_ROLES, "unknown role %r" % (role,), f"{param}.role")
    _note_extra_keys(message, ("role", "content"), param, notes, NO_OPENAI_FORM, MESSAGE_REASONS)
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    _expect(isinstance(content, list), "content must be a string or a list of blocks",
            f"{param}.content")
    for i, block in enumerate(content):
        _expect(isinstance(block, dict) and isinstance(block.get("type"), str),
                "content block must be an object with a type", f"{param}.content.{i}")
    if role == "user":
        return _user_messages(content, f"{param}.content", notes)
    assistant = _assistant_message(content, f"{param}.content", spec, notes)
    return [assistant] if assistant else []


def _system_messages(pending: List[Tuple[str, List[str]]], spec: dict, notes: Optional[Notes]) -> List[dict]:
    """Mid-conversation system messages ((path, texts) each) in place, or as user text where the
    provider takes no such message."""
    texts = [text for _, message_texts in pending for text in message_texts]
    if not texts:
        return []
    if spec.get("mid_system"):
        return [{"role": "system", "content": "\n\n".join(texts)}]
    for path, _ in pending:
        _note(notes, path, "rewritten: a mid-conversation system message sent as user text at its position")
    return [{"role": "user", "content": FOLDED_SYSTEM % "\n\n".join(texts)}]


def _after_tool_results(turns: List[dict], converted: List[dict]) -> int:
    """Where in a converted turn a system message may go: after its tool messages when it answers a call."""
    if not turns or turns[-1]["role"] != "assistant" or not turns[-1].get("tool_calls"):
        return 0
    return next((k for k, m in enumerate(converted) if m["role"] != "tool"), len(converted))


def _openai_messages(anthropic_body: dict, spec: dict, notes: Optional[Notes] = None) -> List[dict]:
    """System prompt (with system messages before the first turn), the turns, and mid-conversation
    system messages placed by _system_messages (never between a tool call and its results)."""
    messages = anthropic_body.get("messages")
    _expect(isinstance(messages, list), "messages must be a list", "messages")
    system_texts = _system_texts(anthropic_body.get("system"), "system", notes)
    turns: List[dict] = []
    pending: List[Tuple[str, List[str]]] = []
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "system":
            _note_extra_keys(message, ("role", "content"), f"messages.{i}", notes, NO_OPENAI_FORM, MESSAGE_REASONS)
            texts = _system_texts(message.get("content"), f"messages.{i}.content", notes)
            if turns:
                pending.append((f"messages.{i}", texts))
            else:
                system_texts += texts
            continue
        converted = _convert_message(message, f"messages.{i}", spec, notes)
        if pending and converted:
            at = _after_tool_results(turns, converted)
            converted = converted[:at] + _system_messages(pending, spec, notes) + converted[at:]
            pending = []
        turns += converted
    turns = _merge_user_neighbours(turns + _system_messages(pending, spec, notes))
    if system_texts:
        return [{"role": "system", "content": "\n\n".join(system_texts)}] + turns
    return turns


def _as_parts(content: Any) -> List[dict]:
    """OpenAI message content as a list of parts."""
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])


def _merge_user_neighbours(turns: List[dict]) -> List[dict]:
    """Adjacent user messages (left by a dropped thinking-only turn, say) become one: chat
    templates that require alternating roles (Mistral, Gemma) reject two in a row. Linear:
    each run of user messages is joined once."""
    merged: List[dict] = []
    run: List[dict] = []
    for turn in turns + [{"role": ""}]:
        if turn["role"] == "user":
            run.append(turn)
            continue
        if run:
            merged.append(_join_user_run(run))
            run = []
        if turn["role"]:
            merged.append(turn)
    return merged


def _join_user_run(run: List[dict]) -> dict:
    """One user message from consecutive ones: texts joined by a blank line, else all parts."""
    if len(run) == 1:
        return run[0]
    if all(isinstance(turn["content"], str) for turn in run):
        return dict(run[0], content="\n\n".join(turn["content"] for turn in run))
    return dict(run[0], content=[part for turn in run for part in _as_parts(turn["content"])])


def clean_gemini_schema(schema: Any) -> Any:
    """A JSON Schema with the keywords Gemini's OpenAI endpoint rejects removed (PROTOCOLS C.7)."""
    if isinstance(schema, list):
        return [clean_gemini_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    cleaned: Dict[str, Any] = {}
    for key, value in schema.items():
        if key in GEMINI_SCHEMA_DROP:
            continue
        if key == "const":
            cleaned["enum"] = [value]
        elif key == "type" and isinstance(value, list):
            cleaned["type"] = next((t for t in value if t != "null"), "string")
        elif key == "properties" and isinstance(value, dict):
            cleaned[key] = {name: clean_gemini_schema(sub) for name, sub in value.items()}
        else:
            cleaned[key] = clean_gemini_schema(value)
    if cleaned.get("type") == "string" and cleaned.get("format", "enum") not in GEMINI_STRING_FORMATS:
        del cleaned["format"]
    return cleaned


def _is_server_tool(tool: dict) -> bool:
    """Server tools (web_search_*, web_fetch_*, code_execution_*...) carry a versioned type."""
    return tool.get("type") not in (None, "custom")


def server_tool_names(anthropic_body: dict) -> List[str]:
    """Names of the Anthropic server tools in a request (they cannot run on OpenAI upstreams)."""
    tools = anthropic_body.get("tools") if isinstance(anthropic_body, dict) else None
    if not isinstance(tools, list):
        return []
    return [str(t.get("name") or t.get("type")) for t in tools if isinstance(t, dict) and _is_server_tool(t)]


def _openai_tool(tool: dict, param: str, spec: dict, notes: Optional[Notes]) -> dict:
    """One custom Anthropic tool as an OpenAI function (strict kept)."""
    _expect(isinstance(tool.get("name"), str) and tool["name"] != "", "tool needs a name", f"{param}.name")
    _note_extra_keys(tool, TOOL_KEYS, param, notes, NO_OPENAI_FORM, TOOL_KEY_REASONS)
    parameters = tool.get("input_schema") or {"type": "object", "properties": {}}
    if spec.get("schema") == "gemini":
        parameters = clean_gemini_schema(parameters)
    function = {"name": tool["name"], "parameters": parameters}
    if tool.get("description"):
        function["description"] = tool["description"]
    if tool.get("strict") is not None:
        function["strict"] = bool(tool["strict"])
    return {"type": "function", "function": function}


def _tool_result_parts(anthropic_body: dict) -> Iterable[Any]:
    """Every block inside the tool_result blocks of a request's messages."""
    for message in anthropic_body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else []:
            inner = block.get("content") if isinstance(block, dict) and block.get("type") == "tool_result" else None
            yield from inner if isinstance(inner, list) else []


def _loaded_tools(anthropic_body: dict) -> set:
    """The deferred tools ToolSearch has loaded: those a tool_reference in a tool_result names (H.2)."""
    return {part.get("tool_name") for part in _tool_result_parts(anthropic_body)
            if isinstance(part, dict) and part.get("type") == "tool_reference"}


def _openai_tools(anthropic_body: dict, spec: dict, notes: Optional[Notes] = None) -> List[dict]:
    """Custom Anthropic tools as OpenAI functions; server tools dropped, and deferred tools
    (defer_loading) until ToolSearch has loaded them, as Anthropic keeps them from the model
    (Claude Code's DeferredToolPlaceholder never is)."""
    tools = anthropic_body.get("tools")
    if tools is None:
        return []
    _expect(isinstance(tools, list), "tools must be a list", "tools")
    deferred = any(isinstance(tool, dict) and tool.get("defer_loading") is True for tool in tools)
    functions, loaded = [], _loaded_tools(anthropic_body) if deferred else set()
    for i, tool in enumerate(tools):
        _expect(isinstance(tool, dict), "tool must be an object", f"tools.{i}")
        if _is_server_tool(tool):
            _note(notes, f"tools.{i}", "server tool %r dropped: it runs on Anthropic's servers" % tool.get("type"))
            continue
        if tool.get("defer_loading") is True and tool.get("name") not in loaded:
            _note(notes, f"tools.{i}", "dropped until ToolSearch loads it: a deferred tool is not shown to the model")
            continue
        functions.append(_openai_tool(tool, f"tools.{i}", spec, notes))
    return functions


def _tool_choice_fields(tool_choice: Any) -> dict:
    """Anthropic tool_choice as OpenAI tool_choice / parallel_tool_calls."""
    if not isinstance(tool_choice, dict):
        return {}
    fields: Dict[str, Any] = {}
    kind = tool_choice.get("type")
    if kind == "tool":
        _expect(isinstance(tool_choice.get("name"), str), "tool_choice needs a name",
                "tool_choice.name")
        fields["tool_choice"] = {"type": "function", "function": {"name": tool_choice["name"]}}
    elif kind in TOOL_CHOICE_TO_OPENAI:
        fields["tool_choice"] = TOOL_CHOICE_TO_OPENAI[kind]
    else:
        raise BadRequest("unknown tool_choice type %r" % (kind,), param="tool_choice.type")
    if tool_choice.get("disable_parallel_tool_use"):
        fields["parallel_tool_calls"] = False
    return fields


def effort_from_budget(budget_tokens: Any) -> str:
    """thinking.budget_tokens bucketed into an effort (<=1024 low, <=8192 medium, else high)."""
    if not _is_number(budget_tokens):
        return "medium"
    return next((effort for bound, effort in EFFORT_FROM_BUDGET if budget_tokens <= bound), "high")


def _asked_effort(anthropic_body: dict) -> Optional[str]:
    """The effort an Anthropic request asks for: from its thinking budget, else output_config.effort."""
    thinking = anthropic_body.get("thinking") or {}
    output_config = anthropic_body.get("output_config") or {}
    asked = output_config.get("effort") if isinstance(output_config, dict) else None
    asked = asked if asked in EFFORT_ORDER else None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "enabled":
        return effort_from_budget(thinking.get("budget_tokens"))
    if kind == "adaptive":
        return asked or "medium"
    return None if kind == "disabled" else asked


def reasoning_effort_for(anthropic_body: dict, spec: dict, notes: Optional[Notes] = None) -> Optional[str]:
    """The OpenAI reasoning effort to ask for, as the model accepts it, or None (a pinned spec
    effort wins; "none" = never)."""
    pinned = spec.get("reasoning_effort")
    if pinned:
        return None if pinned == "none" else pinned
    if spec.get("thinking_effort") and anthropic_thinking_on(anthropic_body):
        return spec["thinking_effort"]            # seed 001's reasoning_effort: sent with thinking only
    effort = _asked_effort(anthropic_body)
    if effort is None:
        return None
    accepted = model_facts(spec.get("model") or "", spec)["efforts"] or EFFORT_ORDER
    folded = fold_effort(effort, accepted)
    if folded != effort:
        _note(notes, "output_config.effort", "rewritten: %s sent as %s, the most this model accepts" % (effort, folded))
    return folded


def _reasoning_fields(anthropic_body: dict, spec: dict, notes: Optional[Notes] = None) -> dict:
    """The reasoning request fields in the shape spec["reasoning_param"] names."""
    effort = reasoning_effort_for(anthropic_body, spec, notes)
    param = spec.get("reasoning_param")
    if effort is None or param is None:
        return {}
    if param == "reasoning":
        return {"reasoning": {"effort": effort}}
    return {param: effort}


def _max_tokens_fields(anthropic_body: dict, spec: dict, notes: Optional[Notes] = None) -> dict:
    """max_tokens (or max_completion_tokens), clamped to the model's output limit."""
    value = anthropic_body.get("max_tokens", spec.get("max_tokens"))
    if value is None:
        return {}
    _expect(isinstance(value, int) and not isinstance(value, bool) and value > 0,
            "max_tokens must be a positive integer (0, cache pre-warming, needs an Anthropic upstream)",
            "max_tokens")
    if spec.get("min_tokens") and value < spec["min_tokens"]:
        _note(notes, "max_tokens", "rewritten: raised to the configured floor %d" % spec["min_tokens"])
        value = spec["min_tokens"]    # seed 002's MIN_TOKENS_LIMIT
    if spec.get("max_tokens") and value > spec["max_tokens"]:
        _note(notes, "max_tokens", "rewritten: lowered to the model's limit %d" % spec["max_tokens"])
        value = spec["max_tokens"]
    return {"max_completion_tokens" if spec.get("max_completion_tokens") else "max_tokens": value}


def _stop_fields(stops: Any, notes: Optional[Notes]) -> dict:
    """stop_sequences -> stop: whitespace-only ones and those past OpenAI's four dropped."""
    if not isinstance(stops, list):
        return {}
    kept = [s for s in stops if isinstance(s, str) and s.strip()]
    if len(kept) != len(stops) or len(kept) > MAX_OPENAI_STOP:
        _note(notes, "stop_sequences", "dropped: whitespace-only entries, and those past OpenAI's %d" % MAX_OPENAI_STOP)
    return {"stop": kept[:MAX_OPENAI_STOP]} if kept else {}


def _sampling_fields(anthropic_body: dict, notes: Optional[Notes] = None) -> dict:
    """temperature/top_p (numbers only), stop_sequences -> stop, metadata.user_id -> user."""
    fields = {k: anthropic_body[k] for k in ("temperature", "top_p") if _is_number(anthropic_body.get(k))}
    for key in ("temperature", "top_p"):
        if key in anthropic_body and key not in fields:
            _note(notes, key, "dropped: not a number")
    fields.update(_stop_fields(anthropic_body.get("stop_sequences"), notes))
    metadata = anthropic_body.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    _note_extra_keys(metadata, ("user_id",), "metadata", notes, NO_OPENAI_FORM)
    user_id = metadata.get("user_id")
    if isinstance(user_id, str) and 0 < len(user_id) <= MAX_OPENAI_USER_LEN:
        fields["user"] = user_id
    elif user_id is not None:
        _note(notes, "metadata.user_id", "dropped: OpenAI's user takes at most %d characters" % MAX_OPENAI_USER_LEN)
    return fields


def _response_format_fields(anthropic_body: dict) -> dict:
    """output_config.format (or beta output_format) json_schema -> strict response_format."""
    output_config = anthropic_body.get("output_config")
    fmt = output_config.get("format") if isinstance(output_config, dict) else None
    fmt = fmt or anthropic_body.get("output_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return {}
    return {"response_format": {"type": "json_schema", "json_schema": {
        "name": "structured_output", "schema": strict_schema(fmt.get("schema") or {}, all_required=True), "strict": True}}}


def _note_nested_fields(anthropic_body: dict, notes: Optional[Notes]) -> None:
    """Notes for the parts of thinking and output_config that have no OpenAI form."""
    for key, mapped in (("thinking", ("type", "budget_tokens")), ("output_config", ("effort", "format"))):
        if isinstance(anthropic_body.get(key), dict):
            _note_extra_keys(anthropic_body[key], mapped, key, notes, NO_OPENAI_FORM)


# Top-level Anthropic fields this converter maps; any other (top_k, cache_control,
# context_management, service_tier, container, mcp_servers, ...) is a note (ANTHROPIC_DROP_REASONS).
ANTHROPIC_MAPPED_FIELDS = frozenset({
    "model", "messages", "system", "max_tokens", "temperature", "top_p", "stop_sequences", "metadata",
    "stream", "tools", "tool_choice", "thinking", "output_config", "output_format"})


def anthropic_to_openai_request(anthropic_body: dict, spec: dict, *, session_id: Optional[str] = None,
                                notes: Optional[Notes] = None) -> dict:
    """An Anthropic /v1/messages body as an OpenAI /v1/chat/completions body (PROTOCOLS D.1).

    spec is the model spec with the provider's switches filled in (mid_system, replay_reasoning,
    prompt_cache_key); session_id, when the client names its session, becomes prompt_cache_key."""
    _expect(isinstance(anthropic_body, dict), "request body must be a JSON object", "body")
    for key in sorted(anthropic_body.keys() - ANTHROPIC_MAPPED_FIELDS):
        _note(notes, key, ANTHROPIC_DROP_REASONS.get(key, NO_OPENAI_FORM))
    _note_nested_fields(anthropic_body, notes)
    openai_body: Dict[str, Any] = {"model": spec["model"],
                                   "messages": _openai_messages(anthropic_body, spec, notes)}
    openai_body.update(_max_tokens_fields(anthropic_body, spec, notes))
    openai_body.update(_sampling_fields(anthropic_body, notes))
    tools = _openai_tools(anthropic_body, spec, notes)
    if tools:
        openai_body["tools"] = tools
        openai_body.update(_tool_choice_fields(anthropic_body.get("tool_choice")))
    openai_body.update(_reasoning_fields(anthropic_body, spec, notes))
    openai_body.update(_response_format_fields(anthropic_body))
    if anthropic_body.get("stream"):
        openai_body["stream"] = True
        openai_body["stream_options"] = {"include_usage": True}
    if spec.get("prompt_cache_key") and session_id:
        openai_body["prompt_cache_key"] = session_id
    openai_body.update(spec.get("extra_body") or {})
    return openai_body


# ---- OpenAI stream -> Anthropic stream --------------------------------------------------

STOP_REASON_FROM_FINISH = {
    "stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
    "function_call": "tool_use", "content_filter": "refusal",
    "error": "end_turn",  # OpenRouter's finish reason "error"; the error itself comes as a chunk
}
FINISH_FROM_STOP_REASON = {
    "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
    "refusal": "content_filter", "pause_turn": "stop", "model_context_window_exceeded": "length",
}
# Upstream error codes/types/statuses that Claude clients should treat as "retry later".
OVERLOADED_ERROR_MARKERS = frozenset({"429", "529", "503", "overloaded", "overloaded_error",
                                      "rate_limit_exceeded", "rate_limit_error"})
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MAX_CITED_TEXTS = 64                 # annotations per message whose cited_text is cut from the reply


def anthropic_usage_from_openai(openai_usage: dict) -> dict:
    """OpenAI usage as Anthropic usage: input_tokens excludes cached and cache-written tokens."""
    details = openai_usage.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    cached = token_count(details.get("cached_tokens")) or token_count(openai_usage.get("prompt_cache_hit_tokens"))
    written = token_count(details.get("cache_write_tokens"))
    prompt = token_count(openai_usage.get("prompt_tokens"))
    usage = {"input_tokens": max(prompt - cached - written, 0),
             "output_tokens": token_count(openai_usage.get("completion_tokens")),
             "cache_read_input_tokens": cached, "cache_creation_input_tokens": written,
             "cache_creation": {"ephemeral_5m_input_tokens": written, "ephemeral_1h_input_tokens": 0}}
    completion = openai_usage.get("completion_tokens_details")
    reasoning = completion.get("reasoning_tokens") if isinstance(completion, dict) else None
    if _is_number(reasoning):
        usage["output_tokens_details"] = {"thinking_tokens": token_count(reasoning)}
    return usage


def empty_anthropic_usage(input_tokens: int) -> dict:
    """Usage before the upstream counted: the local input estimate, zeros, the cache_creation object
    (Claude Code 2.1.79+ rejects a message_start without it, PROTOCOLS H.2)."""
    return {"input_tokens": input_tokens, "output_tokens": 0, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}}


def anthropic_error_type(openai_error: Any) -> str:
    """overloaded_error for rate-limit/overload codes (clients retry those), else api_error."""
    if not isinstance(openai_error, dict):
        return "api_error"
    markers = {str(openai_error.get(k)).lower() for k in ("code", "status_code", "status", "type")}
    return "overloaded_error" if markers & OVERLOADED_ERROR_MARKERS else "api_error"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest proper prefix of tag that text ends with."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1)
                 if text.endswith(tag[:k])), 0)


class ThinkTagSplitter:
    """Splits raw `<think>...</think>` reasoning (llama.cpp --reasoning-format none) out of
    streamed content. Only a `<think>` at the very start of the reply counts (leading
    whitespace allowed), so a model writing about the tag later is left alone. Tags split
    across chunks are handled by carrying at most len(tag)-1 characters to the next chunk;
    leading whitespace is kept aside as it comes (never re-stripped: a stuck model sending
    newlines for ever costs linear time)."""

    def __init__(self) -> None:
        self.state = "start"  # start -> think -> text, or start -> text
        self.carry = ""
        self._lead: List[str] = []     # whitespace before the first visible character

    def split(self, text: str) -> List[Tuple[str, str]]:
        """(kind, text) pieces for one content fragment; kind is "thinking" or "text"."""
        if self.state == "start":
            text = self._start(text)
            if self.state == "start":
                return []
        buf, self.carry = self.carry + text, ""
        if self.state == "text":
            return [("text", buf)] if buf else []
        end = buf.find(THINK_CLOSE)
        if end >= 0:
            self.state = "text"
            return [("thinking", buf[:end]), ("text", buf[end + len(THINK_CLOSE):].lstrip("\n"))]
        keep = _partial_suffix(buf, THINK_CLOSE)
        self.carry = buf[len(buf) - keep:] if keep else ""
        return [("thinking", buf[:len(buf) - keep])]

    def _start(self, text: str) -> str:
        """Before the first visible character: decide think or text; returns what is left."""
        if not self.carry:
            visible = text.lstrip()
            if len(visible) < len(text):
                self._lead.append(text[:len(text) - len(visible)])
            text = visible
        buf = self.carry + text
        if buf.startswith(THINK_OPEN):
            self.state, self.carry, self._lead = "think", "", []
            return buf[len(THINK_OPEN):]
        if THINK_OPEN.startswith(buf):
            self.carry = buf
            return ""
        self.state, self.carry = "text", ""
        lead, self._lead = "".join(self._lead), []
        return lead + buf

    def flush(self) -> List[Tuple[str, str]]:
        """Whatever is still carried, as the kind of the current state."""
        carry, self.carry = "".join(self._lead) + self.carry, ""
        self._lead = []
        return [("thinking" if self.state == "think" else "text", carry)] if carry else []


def _reasoning_pieces(delta: dict) -> List[Tuple[str, Any]]:
    """Reasoning text/signatures of one delta: reasoning_details wins, else the plain fields.

    reasoning.text / reasoning.summary text -> thinking; any non-empty `signature` -> a
    signature for the open thinking block; reasoning.encrypted is ignored (its opaque data is
    OpenRouter's, not a Claude redacted_thinking payload that an Anthropic client could replay)."""
    if "reasoning_details" not in delta and "reasoning_content" not in delta and "reasoning" not in delta:
        return []
    pieces: List[Tuple[str, Any]] = []
    details = delta.get("reasoning_details")
    for detail in details if isinstance(details, list) else []:
        if not isinstance(detail, dict):
            continue
        text = detail.get("text") if detail.get("type") == "reasoning.text" else detail.get("summary")
        if isinstance(text, str) and text:
            pieces.append(("thinking", text))
        if isinstance(detail.get("signature"), str) and detail["signature"]:
            pieces.append(("signature", detail["signature"]))
    if any(kind == "thinking" for kind, _ in pieces):
        return pieces
    for key in ("reasoning_content", "reasoning"):
        if isinstance(delta.get(key), str) and delta[key]:
            return [("thinking", delta[key])] + pieces
    return pieces


def _content_part_pieces(parts: list) -> List[Tuple[str, Any]]:
    """Mistral-style content part lists: {type:text,text} and {type:thinking,thinking}."""
    pieces: List[Tuple[str, Any]] = []
    for part in parts:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            pieces.append(("text", part["text"]))
        elif part.get("type") == "thinking":
            value = part.get("thinking")
            if isinstance(value, list):
                value = "".join(p.get("text", "") for p in value if isinstance(p, dict))
            if isinstance(value, str):
                pieces.append(("thinking", value))
    return pieces


_JSON_SPECIAL = re.compile(r'[\[\]{}"\\]')


class JsonScan:
    """Whether streamed JSON fragments have closed their top-level value: a bracket and string
    scanner run lazily over the fragments it has not seen, so asking after every fragment of
    another tool call costs linear time in all (a json.loads per question was quadratic)."""

    def __init__(self) -> None:
        self.seen = 0            # fragments scanned so far
        self.depth = 0
        self.opened = False
        self.in_string = False
        self.escaped = False     # a backslash ended the last fragment

    def complete(self, fragments: List[str]) -> bool:
        """True when the fragments so far form one whole JSON object or array."""
        for fragment in fragments[self.seen:]:
            self._scan(fragment)
        self.seen = len(fragments)
        return self.opened and self.depth <= 0 and not self.in_string

    def _scan(self, text: str) -> None:
        skip = 1 if self.escaped and text else 0
        self.escaped = self.escaped and not text
        for match in _JSON_SPECIAL.finditer(text, skip):
            at, char = match.start(), match.group()
            if at < skip:
                continue
            if self.in_string:
                if char == "\\":
                    skip, self.escaped = at + 2, at + 1 == len(text)
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "[{":
                self.depth, self.opened = self.depth + 1, True
            else:
                self.depth -= 1


PLAIN_DELTA_KEYS = frozenset(("content", "role", "reasoning_content", "reasoning"))


def _plain_content(openai_chunk: dict) -> Optional[str]:
    """The text of a chunk that carries only text for choice 0 (no usage, finish, tool call,
    reasoning, refusal, annotation or error), else None: such a chunk needs no other facet."""
    choices = openai_chunk.get("choices")
    if type(choices) is not list or len(choices) != 1 or openai_chunk.get("usage") or "error" in openai_chunk \
            or "x_groq" in openai_chunk:
        return None
    choice = choices[0]
    delta = choice.get("delta") if type(choice) is dict else None
    if type(delta) is not dict or choice.get("finish_reason") or choice.get("index", 0) != 0 \
            or not delta.keys() <= PLAIN_DELTA_KEYS or delta.get("reasoning_content") or delta.get("reasoning"):
        return None
    content = delta.get("content")
    return content if type(content) is str else None


class OpenAIToAnthropicStream:
    """OpenAI chat.completion.chunk dicts in, Anthropic stream events out (PROTOCOLS B.7, D.4).

    Theory of operation. The Anthropic grammar is `message_start`, then content blocks, each
    `content_block_start` -> deltas -> `content_block_stop` with indices 0,1,2,... and one
    block open at a time, then `message_delta` (stop_reason + usage) and `message_stop`.
    OpenAI chunks carry unordered facets of one choice: reasoning (`reasoning_content`,
    `reasoning`, `reasoning_details`, `<think>` in content), text, tool_call fragments,
    finish_reason and usage. The machine keeps at most one block open and opens blocks
    lazily, when the first non-empty piece of that kind arrives, closing the previous one
    first; empty strings open nothing, so a reply that starts with a tool call opens no text.

    Tool calls are keyed by `index`, or by `id` when the index is missing or the same index
    comes back with a new id (Gemini). The open call streams its argument fragments as
    `input_json_delta`. A fragment for another call switches blocks only when the open call's
    arguments already parse as JSON (calls sent one after another, as OpenAI does); otherwise
    the provider is interleaving, and the other call is buffered and emitted whole when the
    open block closes (so block order may then differ from upstream index order).

    A refusal (delta.refusal) is shown as text and ends the message with stop_reason "refusal";
    url_citation annotations become citations_delta events on the open text block (Anthropic's
    web_search_result_location, cited_text cut from the text so far). Upstream reasoning
    signatures are tagged with the provider's name (see the section's notes); a tool call's
    Gemini thought signature rides on its tool_use id (join_tool_id).

    finish_reason closes the open block and is remembered, but the message does NOT end there:
    usage comes later (OpenAI: an empty-choices chunk; OpenRouter: a chunk after the finish;
    DeepSeek/Groq: on the finish chunk itself). The last usage seen wins. `close()` (at
    `[DONE]` or EOF) emits `message_delta` + `message_stop`. A chunk with a top-level `error`
    closes the open block, emits one Anthropic `error` event and finishes the machine.
    Only choice 0 is followed (n > 1 is not representable in Anthropic)."""

    def __init__(self, model: str, *, message_id: Optional[str] = None, input_tokens: int = 0,
                 provider: str = "openai"):
        self.model = model
        self.message_id = message_id or new_id("msg_")
        self.input_tokens = input_tokens
        self.provider = provider
        self._refused = False
        self._text: List[str] = []      # the reply's text so far, for citations' cited_text
        self._cited = 0
        self._started = self._finished = False
        self._next_index = self._open_index = 0
        self._open: Optional[str] = None  # "text" | "thinking" | "tool" | None
        self._open_tool: Optional[dict] = None
        self._signature = ""
        self._tools: List[dict] = []
        self._tool_by_index: Dict[int, dict] = {}
        self._tool_by_id: Dict[str, dict] = {}
        self._finish_reason: Optional[str] = None
        self._held_space: List[str] = []    # whitespace that would open a text block on its own
        self._usage: Optional[dict] = None
        self._think = ThinkTagSplitter()

    @property
    def finished(self) -> bool:
        """True once close() ran or an upstream error was relayed."""
        return self._finished

    @property
    def saw_finish(self) -> bool:
        """Whether the upstream said it finished (a finish_reason), as a complete answer does."""
        return self._finish_reason is not None

    def feed(self, openai_chunk: Any) -> List[dict]:
        """Anthropic events for one parsed OpenAI chunk (the string "[DONE]" means close())."""
        if self._open == "text" and type(openai_chunk) is dict:
            text = _plain_content(openai_chunk)
            if text and self._think.state == "text" and not self._finished:   # the hot path: more text
                self._text.append(text)
                return [{"type": "content_block_delta", "index": self._open_index,
                         "delta": {"type": "text_delta", "text": text}}]
        if openai_chunk == "[DONE]":
            return self.close()
        if self._finished or not isinstance(openai_chunk, dict):
            return []
        events = self._message_start()
        if openai_chunk.get("error"):
            return events + self._fail(openai_chunk["error"])
        self._take_usage(openai_chunk)
        for choice in openai_chunk.get("choices") or []:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                events += self._feed_choice(choice)
        return events

    def close(self) -> List[dict]:
        """The closing events (message_delta, message_stop); [] when already finished."""
        if self._finished:
            return []
        events = self._message_start() + self._flush_think() + self._settle()
        self._finished = True
        usage = self._usage or empty_anthropic_usage(self.input_tokens)
        delta = {"stop_reason": self._stop_reason(), "stop_sequence": None}
        return events + [{"type": "message_delta", "delta": delta, "usage": dict(usage)},
                         {"type": "message_stop"}]

    # -- chunk facets

    def _message_start(self) -> List[dict]:
        """message_start, once."""
        if self._started:
            return []
        self._started = True
        return [{"type": "message_start", "message": {
            "id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": empty_anthropic_usage(self.input_tokens)}}]

    def _take_usage(self, openai_chunk: dict) -> None:
        """Remember the chunk's usage (or Groq's x_groq.usage); the last one wins."""
        usage = openai_chunk.get("usage")
        if not isinstance(usage, dict):
            x_groq = openai_chunk.get("x_groq")
            usage = x_groq.get("usage") if isinstance(x_groq, dict) else None
        if isinstance(usage, dict):
            self._usage = anthropic_usage_from_openai(usage)

    def _feed_choice(self, choice: dict) -> List[dict]:
        """Events for choice 0's delta and finish_reason."""
        delta = choice.get("delta") or {}
        events: List[dict] = []
        for kind, value in _reasoning_pieces(delta):
            events += self._on_signature(value) if kind == "signature" else self._on_text(kind, value)
        if isinstance(delta.get("refusal"), str) and delta["refusal"]:   # shown as text, ends as "refusal"
            self._refused = True
            events += self._on_text("text", delta["refusal"])
        content = delta.get("content")
        pieces = self._think.split(content) if isinstance(content, str) else \
            _content_part_pieces(content) if isinstance(content, list) else []
        for kind, text in pieces:
            events += self._on_text(kind, text)
        if isinstance(delta.get("annotations"), list):
            events += self._on_annotations(delta["annotations"])
        for call in delta.get("tool_calls") or []:
            if isinstance(call, dict):
                events += self._flush_think() + self._on_tool_call(call)
        if choice.get("finish_reason"):
            self._finish_reason = choice["finish_reason"]
            events += self._flush_think() + self._settle()
        return events

    def _fail(self, openai_error: Any) -> List[dict]:
        """Close the open block, relay the upstream error as one error event, and finish."""
        events = self._close_block()
        self._finished = True
        message = openai_error.get("message") if isinstance(openai_error, dict) else None
        message = message or (openai_error if isinstance(openai_error, str) else json.dumps(openai_error))
        error = {"type": anthropic_error_type(openai_error), "message": str(message)}
        return events + [{"type": "error", "error": error}]

    def _stop_reason(self) -> str:
        """Mapped finish_reason; tool_use whenever a tool call was seen (unless truncated)."""
        reason = STOP_REASON_FROM_FINISH.get(self._finish_reason or "stop", "end_turn")
        if self._refused:
            return "refusal"
        return "tool_use" if self._tools and reason != "max_tokens" else reason

    # -- blocks

    def _start_block(self, kind: str, content_block: dict) -> List[dict]:
        """Open block `kind` at the next index (caller closed the previous one)."""
        self._open, self._open_index, self._signature = kind, self._next_index, ""
        self._next_index += 1
        self._held_space = []
        return [{"type": "content_block_start", "index": self._open_index,
                 "content_block": content_block}]

    def _delta(self, delta: dict) -> dict:
        """A content_block_delta on the open block."""
        return {"type": "content_block_delta", "index": self._open_index, "delta": delta}

    def _close_block(self) -> List[dict]:
        """Stop the open block (a thinking block first gets its upstream signature, if any)."""
        if self._open is None:
            return []
        events = []
        if self._open == "thinking" and self._signature:
            events.append(self._delta({"type": "signature_delta", "signature": self._signature}))
        events.append({"type": "content_block_stop", "index": self._open_index})
        self._open = self._open_tool = None
        return events

    def _settle(self, skip: Optional[dict] = None) -> List[dict]:
        """Close the open block and emit every buffered (never opened) tool call whole."""
        events = self._close_block()
        for tool in self._tools:
            if tool["block"] is None and tool is not skip:
                events += self._open_tool_block(tool) + self._close_block()
        return events

    def _flush_think(self) -> List[dict]:
        """Emit text held back by the <think> splitter."""
        return [e for kind, text in self._think.flush() for e in self._on_text(kind, text)]

    def _on_text(self, kind: str, text: str) -> List[dict]:
        """A thinking or text fragment, opening its block if needed."""
        if not text:
            return []
        events: List[dict] = []
        if self._open != kind:
            if kind == "text" and text.isspace():   # a whitespace-only text block is a 400 when replayed
                self._held_space.append(text)
                return []
            if kind == "text" and self._held_space:
                text = "".join(self._held_space) + text
            self._held_space = []
            events += self._settle()
            block = {"type": "text", "text": ""} if kind == "text" else \
                {"type": "thinking", "thinking": "", "signature": ""}
            events += self._start_block(kind, block)
        if kind == "text":
            self._text.append(text)
        delta = {"type": "text_delta", "text": text} if kind == "text" else \
            {"type": "thinking_delta", "thinking": text}
        return events + [self._delta(delta)]

    def _on_annotations(self, annotations: list) -> List[dict]:
        """url_citation annotations as citations on the open text block (none open: dropped)."""
        events: List[dict] = []
        for annotation in annotations:
            cite = annotation.get("url_citation") if isinstance(annotation, dict) else None
            if not isinstance(cite, dict) or self._open != "text":
                log.debug("dropping annotation %.80r: no text block to cite in", annotation)
                continue
            citation = {"type": "web_search_result_location", "url": cite.get("url") or "",
                        "title": cite.get("title") or "", "cited_text": self._cited_text(cite), "encrypted_index": ""}
            events.append(self._delta({"type": "citations_delta", "citation": citation}))
        return events

    def _cited_text(self, cite: dict) -> str:
        """The text an annotation points at; only for the first MAX_CITED_TEXTS of a message, so an
        upstream sending annotations between every fragment cannot make the stream quadratic."""
        start, end = cite.get("start_index"), cite.get("end_index")
        if not (isinstance(start, int) and isinstance(end, int)) or self._cited >= MAX_CITED_TEXTS:
            return ""
        self._cited += 1
        self._text = ["".join(self._text)]
        return self._text[0][start:end]

    def _on_signature(self, signature: str) -> List[dict]:
        """Keep an upstream signature, tagged as this provider's, for the open thinking block."""
        if self._open == "thinking":
            self._signature = tag_signature(self.provider, signature)
        else:
            log.debug("dropping reasoning signature with no open thinking block")
        return []

    # -- tool calls

    def _tool_for(self, call: dict) -> dict:
        """The tool call a fragment belongs to: by id, else by index, else the last one."""
        index, raw_id = call.get("index"), call.get("id")
        tool = self._tool_by_id.get(raw_id) if raw_id else None
        if tool is None and isinstance(index, int) and index in self._tool_by_index:
            known = self._tool_by_index[index]
            tool = known if not raw_id or not known["raw_id"] else None
        if tool is None and index is None and not raw_id and self._tools:
            last, function = self._tools[-1], call.get("function")
            named = isinstance(function, dict) and function.get("name")
            tool = None if named and last["name"] else last     # a second name is a second call
        return tool or self._new_tool(index, raw_id)

    def _new_tool(self, index: Any, raw_id: Optional[str]) -> dict:
        """Register a tool call seen for the first time."""
        tool = {"raw_id": raw_id, "id": sanitize_tool_id(raw_id), "name": "", "arguments": [],
                "scan": JsonScan(), "block": None, "signature": None}
        self._tools.append(tool)
        if isinstance(index, int):
            self._tool_by_index[index] = tool
        if raw_id:
            self._tool_by_id[raw_id] = tool
        return tool

    def _on_tool_call(self, call: dict) -> List[dict]:
        """One tool_calls[] fragment: stream it, buffer it, or open its block."""
        tool = self._tool_for(call)
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        if isinstance(function.get("name"), str) and function["name"] and not tool["name"]:
            tool["name"] = function["name"]
        extra = call.get("extra_content")
        google = extra.get("google") if isinstance(extra, dict) else None
        if isinstance(google, dict) and isinstance(google.get("thought_signature"), str) and tool["block"] is None:
            tool["signature"] = google["thought_signature"]
        arguments = function.get("arguments")
        if isinstance(arguments, (dict, list)):
            arguments = json.dumps(arguments, ensure_ascii=False)
        arguments = arguments if isinstance(arguments, str) else ""
        if arguments:
            tool["arguments"].append(arguments)
        if tool is self._open_tool:
            return [self._delta({"type": "input_json_delta", "partial_json": arguments})] \
                if arguments else []
        if tool["block"] is not None:
            log.debug("dropping late arguments for closed tool call %s", tool["id"])
            return []
        open_tool = self._open_tool
        if not tool["name"] or (open_tool and not open_tool["scan"].complete(open_tool["arguments"])):
            return []  # no name yet, or interleaved with the open call: buffer
        return self._settle(skip=tool) + self._open_tool_block(tool)

    def _open_tool_block(self, tool: dict) -> List[dict]:
        """Open a tool_use block and send the arguments gathered so far."""
        tool_id = join_tool_id(tool["id"], tool["signature"])
        events = self._start_block("tool", {"type": "tool_use", "id": tool_id,
                                            "name": tool["name"], "input": {}})
        tool["block"], self._open_tool = self._open_index, tool
        if tool["arguments"]:
            tool["arguments"] = ["".join(tool["arguments"])]
            events.append(self._delta({"type": "input_json_delta",
                                       "partial_json": tool["arguments"][0]}))
        return events


# ---- Anthropic events -> one Anthropic message (non-streaming answers) ------------------

def _parse_tool_input(partial_json: str) -> Any:
    """Concatenated input_json_delta text as the tool input; empty or truncated -> {}."""
    if not partial_json.strip():
        return {}
    try:
        return loads_json(partial_json)
    except ValueError:
        log.debug("tool input JSON incomplete (truncated stream?): %.80r", partial_json)
        return {}


class _AnthropicFold:
    """Accumulates Anthropic stream events into the non-streaming message (B.4, B.7)."""

    def __init__(self) -> None:
        self.message: Optional[dict] = None
        self.blocks: Dict[int, dict] = {}
        self.partial_json: Dict[int, str] = {}

    def on_message_start(self, event: dict) -> None:
        """Copy the message shell; content is rebuilt from the blocks."""
        self.message = json.loads(json.dumps(event.get("message") or {}))
        self.message["content"] = []
        self.message.setdefault("usage", {})

    def on_content_block_start(self, event: dict) -> None:
        """Store the block as started (complete for redacted_thinking / *_tool_result)."""
        index = event.get("index", len(self.blocks))
        self.blocks[index] = block = json.loads(json.dumps(event.get("content_block") or {}))
        if block.get("type") in ("tool_use", "server_tool_use"):
            self.partial_json[index] = ""

    def on_content_block_delta(self, event: dict) -> None:
        """Apply one delta to its block; unknown delta types are ignored."""
        index, delta = event.get("index"), event.get("delta") or {}
        block, kind = self.blocks.get(index), delta.get("type")
        if block is None:
            return
        if kind == "text_delta":
            block["text"] = block.get("text", "") + delta.get("text", "")
        elif kind == "thinking_delta":
            block["thinking"] = block.get("thinking", "") + delta.get("thinking", "")
        elif kind == "signature_delta":
            block["signature"] = block.get("signature", "") + delta.get("signature", "")
        elif kind == "input_json_delta" and index in self.partial_json:
            self.partial_json[index] += delta.get("partial_json", "")
        elif kind == "citations_delta":
            block.setdefault("citations", []).append(delta.get("citation"))

    def on_content_block_stop(self, event: dict) -> None:
        """Parse a tool block's gathered input JSON."""
        index = event.get("index")
        if index in self.partial_json:
            self.blocks[index]["input"] = _parse_tool_input(self.partial_json.pop(index))

    def on_message_delta(self, event: dict) -> None:
        """Take stop_reason/stop_sequence and merge usage (last value wins)."""
        if self.message is None:
            return
        self.message.update(event.get("delta") or {})
        self.message["usage"].update(event.get("usage") or {})

    def on_error(self, event: dict) -> None:
        """An error event fails the whole answer."""
        error = event.get("error") or {}
        raise UpstreamError(error.get("message") or "upstream stream error",
                            error_type=error.get("type") or "api_error")

    def result(self) -> dict:
        """The folded message; blocks in index order, unterminated tool inputs parsed too."""
        if self.message is None:
            raise UpstreamError("upstream stream ended before message_start")
        for index in list(self.partial_json):
            self.on_content_block_stop({"index": index})
        self.message["content"] = [self.blocks[i] for i in sorted(self.blocks)]
        return self.message


FOLD_HANDLERS: Dict[str, Callable[[_AnthropicFold, dict], None]] = {
    "message_start": _AnthropicFold.on_message_start,
    "content_block_start": _AnthropicFold.on_content_block_start,
    "content_block_delta": _AnthropicFold.on_content_block_delta,
    "content_block_stop": _AnthropicFold.on_content_block_stop,
    "message_delta": _AnthropicFold.on_message_delta,
    "error": _AnthropicFold.on_error,
}


def fold_anthropic_events(events: List[dict]) -> dict:
    """The non-streaming Anthropic message equivalent to a list of Anthropic stream events.

    Raises UpstreamError (with the event's error type) if the stream carried an error event.
    Unknown event types (ping, future ones) are ignored, as B.7 requires."""
    fold = _AnthropicFold()
    for event in events:
        kind = event.get("type")
        handler = FOLD_HANDLERS.get(kind) if isinstance(kind, str) else None
        if handler is not None:
            handler(fold, event)
    return fold.result()



# ---- OpenAI non-streaming answer -> Anthropic message -----------------------------------

def _choice_as_delta(choice: dict) -> dict:
    """A non-streaming choice as a streaming choice (message -> delta, tool calls indexed)."""
    message = dict(choice.get("message") or {})
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        message["tool_calls"] = [dict(call, index=call.get("index", i))
                                 for i, call in enumerate(calls) if isinstance(call, dict)]
    return {"index": choice.get("index", 0), "delta": message,
            "finish_reason": choice.get("finish_reason")}


def openai_message_as_chunk(openai_body: dict) -> dict:
    """A chat.completion body as one equivalent chat.completion.chunk."""
    chunk = {key: openai_body[key] for key in ("id", "model", "created", "usage", "error", "x_groq")
             if key in openai_body}
    chunk["object"] = "chat.completion.chunk"
    chunk["choices"] = [_choice_as_delta(c) for c in openai_body.get("choices") or []
                        if isinstance(c, dict)]
    return chunk


def openai_response_to_anthropic(openai_body: dict, model: str, *,
                                 message_id: Optional[str] = None, provider: str = "openai") -> dict:
    """A chat.completion body as an Anthropic message, via the stream machine and the fold."""
    if not isinstance(openai_body, dict):
        raise UpstreamError("upstream answered a non-object body")
    if not openai_body.get("error") and not openai_body.get("choices"):
        raise UpstreamError("upstream answer has no choices")
    stream = OpenAIToAnthropicStream(model, message_id=message_id, provider=provider)
    events = stream.feed(openai_message_as_chunk(openai_body)) + stream.close()
    return fold_anthropic_events(events)


# ---- Local token estimate (count_tokens on non-Anthropic routes) ------------------------

CHARS_PER_TOKEN_TEXT = 4.0
CHARS_PER_TOKEN_JSON = 3.0
TOKENS_PER_IMAGE = 1600
TOKENS_PER_PDF_PAGE = 3000
TOKENS_PER_MESSAGE = 4
TOKENS_PER_TOOL = 8
_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")


def _pdf_pages(data_b64: str) -> int:
    """Page count of a base64 PDF (at least 1; counts `/Type /Page` objects)."""
    try:
        raw = base64.b64decode(data_b64 or "", validate=False)
    except (ValueError, TypeError):
        return 1
    return max(1, len(_PDF_PAGE.findall(raw)))


def _block_cost(block: Any) -> float:
    """Estimated tokens of one content block (recursive for tool_result content)."""
    if isinstance(block, str):
        return len(block) / CHARS_PER_TOKEN_TEXT
    if not isinstance(block, dict):
        return 0.0
    kind = block.get("type")
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    if kind == "image":
        return TOKENS_PER_IMAGE
    if kind == "document" and source.get("type") == "base64":
        return TOKENS_PER_PDF_PAGE * _pdf_pages(source.get("data", ""))
    if kind == "document":
        return len(str(source.get("data") or source.get("url") or source.get("content") or "")) / CHARS_PER_TOKEN_TEXT
    if kind in ("tool_use", "server_tool_use"):
        return (len(block.get("name", "")) + len(json.dumps(block.get("input") or {}))) / CHARS_PER_TOKEN_JSON
    if kind == "tool_result" or isinstance(block.get("content"), list):
        return _content_cost(block.get("content"))
    text = block.get("text") or block.get("thinking") or block.get("data") or ""
    return len(str(text)) / CHARS_PER_TOKEN_TEXT


def _content_cost(content: Any) -> float:
    """Estimated tokens of a content value (string or list of blocks)."""
    if isinstance(content, list):
        return sum(_block_cost(block) for block in content)
    return _block_cost(content) if content is not None else 0.0


def estimate_json_tokens(value: Any) -> int:
    """A rough token count of any JSON value (OpenAI-shaped requests), at JSON density."""
    return int(len(json_text(value)) / CHARS_PER_TOKEN_JSON)


def estimate_anthropic_tokens(anthropic_body: dict) -> int:
    """A local count_tokens estimate for routes without a token counter.

    Rule: prose (system, text, thinking, tool_result text) at 4 chars/token; JSON (tool
    definitions, tool_use inputs) at 3 chars/token since punctuation and keys tokenize
    densely; +4 per message and +8 per tool definition; images a fixed 1,600 tokens (about
    Anthropic's cost of a full-size image, (w*h)/750 capped near 1,600, without decoding it);
    base64 PDFs 3,000 tokens per page (text plus page image). Every term is non-negative, so
    the estimate grows with content; it aims at the right ballpark (+-25%) for compaction."""
    if not isinstance(anthropic_body, dict):
        return 0
    total = _content_cost(anthropic_body.get("system"))
    for message in anthropic_body.get("messages") or []:
        if isinstance(message, dict):
            total += TOKENS_PER_MESSAGE + _content_cost(message.get("content"))
    for tool in anthropic_body.get("tools") or []:
        total += TOKENS_PER_TOOL + len(json.dumps(tool, ensure_ascii=False)) / CHARS_PER_TOKEN_JSON
    return int(round(total))

# ---------------------------------------------------------------------------------------------
# 9b. OpenAI client -> Claude upstream (request), Claude -> OpenAI client (response, stream)
# ---------------------------------------------------------------------------------------------
#
# Decisions taken here (PROTOCOLS D.2, D.6, D.7, H.1), each in one place; every field the request
# converter drops or rewrites is a note:
# - The model's facts come from the model table (model_facts: output limit, thinking style,
#   efforts, sampling rules, mid-conversation system), a config entry overriding them.
# - max_tokens defaults to DEFAULT_ANTHROPIC_MAX_TOKENS (8192) when the client sends neither
#   max_tokens nor max_completion_tokens: Anthropic requires it and 4096 truncates modern answers.
# - temperature is clamped to Anthropic's 0..1 (OpenAI allows 0..2); temperature, top_p and top_k
#   are dropped where the model rejects them (Opus 4.7+, Claude 5, Fable: even at defaults) or the
#   anthropic-version does (2026-10-21 removed them), top_p where it is exclusive with temperature.
# - tool_call arguments that are not valid JSON objects become {"_raw": arguments}: the model
#   sees what it sent instead of an empty {} that hides the breakage.
# - input_audio parts and file parts other than PDF / text data URLs are a BadRequest: silently
#   dropping them would make Claude answer a question it never saw.
# - response_format json_schema -> output_config.format; json_object -> output_config.format with
#   the permissive schema {"type": "object"} plus a system line asking for one JSON object.
# - Fields with no Anthropic equivalent (D.7) are dropped (notes); n > 1 is a BadRequest.
# - System and developer messages before the first turn become the system prompt; later ones stay
#   where they are as role "system" messages (the handler adds the mid-conversation-system beta)
#   when the model takes them, else they become user text at their position (FOLDED_SYSTEM).
# - Reasoning: budgets or adaptive + effort as the model's thinking style says; an effort the
#   model lacks folds to the nearest lower one it has. When a small explicit max_tokens has to be
#   raised to budget + 1024, that is a note (the client's limit is overridden).
# - Thinking is switched off (a note) when the tool_choice forces a tool or when the last
#   assistant turn holds tool_use: OpenAI clients never carry the signed thinking block that
#   Anthropic then requires (B.2). output_config.effort stays: it is valid without thinking.
# - Foreign reasoning on assistant turns (reasoning_content / reasoning) is dropped, never sent
#   as thinking (its signature would not validate).
# - The 2026-10-21 rules on documents in assistant turns and citations on user text hold by
#   construction: assistant turns take only text parts, and no OpenAI part becomes a citation.

DEFAULT_ANTHROPIC_MAX_TOKENS = 8192
THINKING_HEADROOM = 1024            # max_tokens >= budget + this (Pimzino)
PLACEHOLDER_FIRST_USER = "(continued)"
PLACEHOLDER_TOOL_RESULT = "(no result)"
JSON_OBJECT_INSTRUCTION = "Respond with a single valid JSON object and nothing else."
NO_ANTHROPIC_FORM = "dropped: the Anthropic API has no such field"
SAMPLING_FIELDS = ("temperature", "top_p", "top_k")
SAMPLING_REMOVED_IN = "2026-10-21"  # the anthropic-version that rejects every sampling field (H.1)

# Budgets for models that take thinking.budget_tokens (D.6, Pimzino scale rounded to powers of 2).
# max is 62976 so that budget + 1024 = 64000, the Sonnet 4.x output limit.
EFFORT_BUDGET = {"minimal": 1024, "low": 8192, "medium": 16384, "high": 32768,
                 "xhigh": 49152, "max": 62976}
THINKING_STYLE = {"adaptive": "adaptive", "enabled": "budget"}     # Anthropic thinking.type -> model table style
# output_config.effort for adaptive models (minimal has no equivalent); then folded to the model's.
ADAPTIVE_EFFORT = {"minimal": "low", "low": "low", "medium": "medium", "high": "high",
                   "xhigh": "xhigh", "max": "max"}

# Top-level OpenAI fields this converter maps (stream_options is honoured by the handler); any
# other is a note, with its reason from OPENAI_DROP_REASONS.
OPENAI_MAPPED_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop",
    "user", "safety_identifier", "stream", "stream_options", "tools", "tool_choice", "parallel_tool_calls",
    "functions", "function_call", "response_format", "reasoning_effort", "reasoning", "n"})
OPENAI_DROP_REASONS = {
    "logprobs": "dropped: Claude returns no log probabilities",
    "top_logprobs": "dropped: Claude returns no log probabilities",
    "seed": "dropped: Claude has no seeded sampling",
    "prompt_cache_key": "dropped: Claude caches by prefix, not by key",
    "prompt_cache_options": "dropped: Claude caches by prefix, not by key",
    "prompt_cache_breakpoint": "dropped: Claude caches by prefix, not by key",
    "moderation": "dropped: no moderation pass on Anthropic's API",
}
FOREIGN_REASONING = "dropped: another provider's reasoning cannot be replayed as signed thinking"
# OpenAI message keys each role maps; others are notes.
MESSAGE_KEYS = {"user": ("role", "content"), "assistant": ("role", "content", "tool_calls", "function_call", "refusal"),
                "tool": ("role", "content", "tool_call_id"), "function": ("role", "content", "name"),
                "system": ("role", "content"), "developer": ("role", "content")}
MESSAGE_DROP_REASONS = {"reasoning_content": FOREIGN_REASONING, "reasoning": FOREIGN_REASONING,
                        "reasoning_details": FOREIGN_REASONING}
TOOL_CHOICE_FROM_OPENAI = {"auto": {"type": "auto"}, "required": {"type": "any"},
                           "none": {"type": "none"}, "any": {"type": "any"}}
# ---- model names -------------------------------------------------------------------------

_VARIANT_SUFFIX = re.compile(r"^(?P<base>.+?)-(?:reasoning-(?P<effort>minimal|low|medium|high|xhigh|max)"
                             r"|(?P<one_m>1m))$")


def parse_model_variant(name: str) -> Tuple[str, Optional[str], bool]:
    """Split `<model>[-1m][-reasoning-<effort>]` (either order; Claude Code's `[1m]` too) into
    (base, effort, one_m)."""
    one_m = name.endswith("[1m]")
    base, effort = name[:-4] if one_m else name, None
    for _ in range(2):
        m = _VARIANT_SUFFIX.match(base)
        if not m or (m.group("effort") and effort) or (m.group("one_m") and one_m):
            break
        base, effort, one_m = m.group("base"), effort or m.group("effort"), one_m or bool(m.group("one_m"))
    return base, effort, one_m

# ---- request: small parsers ----------------------------------------------------------------

_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]+)(?:;[^;,]*)*;base64,(?P<data>.*)$", re.DOTALL)


def _parse_data_url(url: str, param: str) -> Tuple[str, str]:
    """(media_type, base64 data) of a data: URL; BadRequest otherwise."""
    m = _DATA_URL.match(url)
    if not m:
        raise BadRequest("expected a base64 data URL", param=param)
    return m.group("mime").strip().lower(), m.group("data")


def _text_block(text: Any, param: str) -> List[dict]:
    """[text block] for a non-empty string, [] for an empty one."""
    if not isinstance(text, str):
        raise BadRequest("text must be a string", param=param)
    return [{"type": "text", "text": text}] if text.strip() else []


def _image_block(part: dict, param: str, notes: Optional[Notes] = None) -> dict:
    """OpenAI image_url part -> Anthropic image block (detail dropped)."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise BadRequest("image_url.url must be a string", param=param + ".image_url")
    if isinstance(image, dict):
        _note_extra_keys(image, ("url",), param + ".image_url", notes, NO_ANTHROPIC_FORM)
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    media_type, data = _parse_data_url(url, param + ".image_url.url")
    media_type = "image/jpeg" if media_type == "image/jpg" else media_type
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _file_block(part: dict, param: str, notes: Optional[Notes] = None) -> dict:
    """OpenAI file part (PDF or text data URL) -> Anthropic document block."""
    file = part.get("file")
    if not isinstance(file, dict) or not isinstance(file.get("file_data"), str):
        raise BadRequest("only file parts with file_data are supported", param=param + ".file")
    media_type, data = _parse_data_url(file["file_data"], param + ".file.file_data")
    if media_type == "application/pdf":
        source = {"type": "base64", "media_type": media_type, "data": data}
    elif media_type == "text/plain":
        source = {"type": "text", "media_type": media_type,
                  "data": base64.b64decode(data).decode("utf-8", "replace")}
    else:
        raise BadRequest("unsupported file type " + media_type, param=param + ".file.file_data")
    block = {"type": "document", "source": source}
    if isinstance(file.get("filename"), str):
        block["title"] = file["filename"]
    return block


PART_CONVERTERS: Dict[str, Callable[[dict, str, Optional[Notes]], List[dict]]] = {
    "text": lambda p, param, notes: _text_block(p.get("text"), param + ".text"),
    "refusal": lambda p, param, notes: _text_block(p.get("refusal"), param + ".refusal"),
    "image_url": lambda p, param, notes: [_image_block(p, param, notes)],
    "file": lambda p, param, notes: [_file_block(p, param, notes)]}
TEXT_PART_TYPES = ("text", "refusal")


def _content_blocks(content: Any, param: str, allowed: Tuple[str, ...], notes: Optional[Notes] = None) -> List[dict]:
    """OpenAI message content (str | parts | None) -> Anthropic blocks, empty text removed."""
    if content is None:
        return []
    if isinstance(content, str):
        return _text_block(content, param)
    if not isinstance(content, list):
        raise BadRequest("content must be a string or a list of parts", param=param)
    blocks: List[dict] = []
    for i, part in enumerate(content):
        part_param = "%s.%d" % (param, i)
        if not isinstance(part, dict):
            raise BadRequest("content part must be an object", param=part_param)
        if part.get("type") not in allowed:  # input_audio included: Claude cannot hear it
            raise BadRequest("content part type %r is not supported here" % part.get("type"),
                             param=part_param + ".type")
        blocks += PART_CONVERTERS[part["type"]](part, part_param, notes)
    return blocks


def _tool_input(arguments: Any, param: str) -> dict:
    """tool_call arguments (JSON string or object) -> tool_use input; bad JSON kept as _raw."""
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    if not isinstance(arguments, str):
        raise BadRequest("arguments must be a JSON string", param=param)
    try:
        parsed = loads_json(arguments)
    except ValueError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {"_raw": arguments}


def _tool_use_block(call: Any, param: str, notes: Optional[Notes] = None) -> dict:
    """One OpenAI tool_call -> Anthropic tool_use block."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest("tool call needs function.name", param=param + ".function")
    _note_extra_keys(call, ("id", "type", "function", "index"), param, notes, NO_ANTHROPIC_FORM)
    return {"type": "tool_use", "id": sanitize_tool_id(call.get("id")), "name": function["name"],
            "input": _tool_input(function.get("arguments"), param + ".function.arguments")}

# ---- request: messages ---------------------------------------------------------------------


def _assistant_blocks(msg: dict, i: int, notes: Optional[Notes] = None) -> List[dict]:
    """Assistant text (a refusal too) first, then tool_use blocks; foreign reasoning dropped."""
    param = "messages.%d" % i
    blocks = _content_blocks(msg.get("content"), param + ".content", TEXT_PART_TYPES, notes)
    if msg.get("refusal") is not None:
        blocks += _text_block(msg["refusal"], param + ".refusal")
    calls = msg.get("tool_calls") or []
    if not isinstance(calls, list):
        raise BadRequest("tool_calls must be a list", param=param + ".tool_calls")
    blocks += [_tool_use_block(c, "%s.tool_calls.%d" % (param, k), notes) for k, c in enumerate(calls)]
    if isinstance(msg.get("function_call"), dict):  # legacy: id pairs with the next message
        blocks.append(_tool_use_block(dict(id="fn_%d" % i, function=msg["function_call"]),
                                      param + ".function_call"))
    return blocks


def _tool_result_block(msg: dict, i: int, notes: Optional[Notes] = None) -> List[dict]:
    """A tool (or legacy function) message -> one tool_result block."""
    param = "messages.%d" % i
    if msg["role"] == "function":
        tool_id = "fn_%d" % (i - 1)
    elif isinstance(msg.get("tool_call_id"), str) and msg["tool_call_id"]:
        tool_id = msg["tool_call_id"]
    else:
        raise BadRequest("tool message needs tool_call_id", param=param + ".tool_call_id")
    block = {"type": "tool_result", "tool_use_id": sanitize_tool_id(tool_id)}
    content = msg.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    else:
        content = _content_blocks(content, param + ".content", ("text", "image_url"), notes)
        if content:
            block["content"] = content
    return [block]


ROLE_CONVERTERS = {  # OpenAI role -> (Anthropic role, converter)
    "user": ("user", lambda m, i, notes: _content_blocks(m.get("content"), "messages.%d.content" % i,
                                                         tuple(PART_CONVERTERS), notes)),
    "assistant": ("assistant", _assistant_blocks),
    "tool": ("user", _tool_result_block),
    "function": ("user", _tool_result_block),
    "system": ("system", lambda m, i, notes: _content_blocks(m.get("content"), "messages.%d.content" % i,
                                                             ("text",), notes)),
}
ROLE_CONVERTERS["developer"] = ROLE_CONVERTERS["system"]


def _mid_system_turn(blocks: List[dict], turns: List[dict], inline: bool, i: int,
                     notes: Optional[Notes]) -> dict:
    """A system/developer message after the first turn: a system turn where the model takes one
    (not right after a tool call, whose results must follow it), else user text at its position."""
    last = turns[-1]
    after_call = last["role"] == "assistant" and any(b["type"] == "tool_use" for b in last["content"])
    if inline and not after_call:
        return {"role": "system", "content": blocks}
    _note(notes, "messages.%d" % i, "rewritten: a mid-conversation system message sent as user text at its position")
    return {"role": "user", "content": [{"type": "text", "text": FOLDED_SYSTEM % "\n\n".join(b["text"] for b in blocks)}]}


def _split_messages(openai_messages: Any, inline_system: bool = False,
                    notes: Optional[Notes] = None) -> Tuple[List[dict], List[dict]]:
    """Validate and convert: (system text blocks, [{"role","content":[blocks]}] unmerged)."""
    if not isinstance(openai_messages, list) or not openai_messages:
        raise BadRequest("messages must be a non-empty list", param="messages")
    system: List[dict] = []
    turns: List[dict] = []
    for i, msg in enumerate(openai_messages):
        if not isinstance(msg, dict):
            raise BadRequest("message must be an object", param="messages.%d" % i)
        if not isinstance(msg.get("role"), str) or msg["role"] not in ROLE_CONVERTERS:
            raise BadRequest("unknown role %r" % (msg.get("role"),), param="messages.%d.role" % i)
        for key in msg.keys() - set(MESSAGE_KEYS[msg["role"]]):
            _note(notes, "messages.%d.%s" % (i, key), MESSAGE_DROP_REASONS.get(key, NO_ANTHROPIC_FORM))
        role, to_blocks = ROLE_CONVERTERS[msg["role"]]
        blocks = to_blocks(msg, i, notes)
        if role != "system":
            turns.append({"role": role, "content": blocks})
        elif not turns:
            system += blocks
        elif blocks:
            turns.append(_mid_system_turn(blocks, turns, inline_system, i, notes))
    return system, turns


def _merge_turns(turns: List[dict]) -> List[dict]:
    """Drop empty turns and merge same-role neighbours (in place on our own copies: linear)."""
    merged: List[dict] = []
    for turn in turns:
        if not turn["content"]:
            continue
        if merged and merged[-1]["role"] == turn["role"]:
            merged[-1]["content"].extend(turn["content"])
        else:
            merged.append({"role": turn["role"], "content": list(turn["content"])})
    return merged


def _orphan_as_text(block: dict) -> dict:
    """A tool_result with no matching tool_use, rendered as plain text."""
    content = block.get("content", "")
    if isinstance(content, list):
        content = "".join(b.get("text", "") for b in content)
    return {"type": "text", "text": "Tool result (%s): %s" % (block["tool_use_id"], content or "(empty)")}


def _placeholder_results(tool_ids: List[str]) -> List[dict]:
    """Error tool_results for tool_use ids the client never answered."""
    return [{"type": "tool_result", "tool_use_id": i, "content": PLACEHOLDER_TOOL_RESULT, "is_error": True}
            for i in tool_ids]


def _pair_tool_results(turns: List[dict]) -> List[dict]:
    """Orphan tool_results -> text; unanswered tool_use -> placeholder error results."""
    out: List[dict] = []
    for k, turn in enumerate(turns):
        if turn["role"] == "user":
            prev = out[-1] if out and out[-1]["role"] == "assistant" else {"content": []}
            ids = [b["id"] for b in prev["content"] if b["type"] == "tool_use"]
            blocks = [b if b["type"] != "tool_result" or b["tool_use_id"] in ids else _orphan_as_text(b)
                      for b in turn["content"]]
            answered = {b["tool_use_id"] for b in blocks if b["type"] == "tool_result"}
            blocks = blocks + _placeholder_results([i for i in ids if i not in answered])
            blocks.sort(key=lambda b: b["type"] != "tool_result")  # results lead the turn (B.3)
            out.append({"role": "user", "content": blocks})
            continue
        out.append(turn)
        uses = [b["id"] for b in turn["content"] if b["type"] == "tool_use"]
        if uses and k + 1 == len(turns):
            out.append({"role": "user", "content": _placeholder_results(uses)})
    return out


def openai_messages_to_anthropic(openai_messages: Any, *, inline_system: bool = False,
                                 notes: Optional[Notes] = None) -> Tuple[List[dict], List[dict]]:
    """OpenAI messages -> (Anthropic system blocks, repaired Anthropic messages)."""
    system, turns = _split_messages(openai_messages, inline_system, notes)
    return system, _repair_turns(turns, "messages")


def _repair_turns(turns: List[dict], param: str) -> List[dict]:
    """Turns merged and paired, starting with a user turn, without a whitespace-ended prefill."""
    turns = _pair_tool_results(_merge_turns(turns))
    if not turns:
        raise BadRequest(f"{param}: at least one non-system message with content is required", param=param)
    if turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": [{"type": "text", "text": PLACEHOLDER_FIRST_USER}]})
    if turns[-1]["role"] == "assistant":
        prefill = _trim_prefill(turns.pop())
        turns += [prefill] if prefill else []
    return turns


def _trim_prefill(turn: dict) -> Optional[dict]:
    """A final assistant turn (a prefill) may not end in whitespace (a 400); None if nothing is left."""
    blocks = list(turn["content"])
    if blocks and blocks[-1].get("type") == "text":
        text = blocks[-1]["text"].rstrip()
        blocks[-1:] = [dict(blocks[-1], text=text)] if text else []
    return dict(turn, content=blocks) if blocks else None

# ---- request: tools, sampling, response_format -----------------------------------------------


def _anthropic_tool(tool: Any, param: str, notes: Optional[Notes] = None) -> dict:
    """OpenAI function tool -> Anthropic custom tool (strict kept)."""
    is_function = isinstance(tool, dict) and tool.get("type", "function") == "function"
    function = tool.get("function") if is_function else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest("only function tools with a name are supported", param=param)
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(schema, dict):
        raise BadRequest("parameters must be a JSON Schema object", param=param + ".function.parameters")
    _note_extra_keys(function, ("name", "description", "parameters", "strict"), param + ".function", notes,
                     NO_ANTHROPIC_FORM)
    out = {"name": function["name"]}
    if function.get("description"):
        out["description"] = function["description"]
    out["input_schema"] = schema
    if function.get("strict") is not None:
        out["strict"] = bool(function["strict"])
    return out


def _legacy_tools(openai_body: dict) -> Tuple[Any, Any]:
    """(tools, tool_choice) from tools/tool_choice or legacy functions/function_call."""
    tools, choice = openai_body.get("tools"), openai_body.get("tool_choice")
    if tools is None and isinstance(openai_body.get("functions"), list):
        tools = [{"type": "function", "function": f} for f in openai_body["functions"]]
        fc = openai_body.get("function_call")
        choice = {"type": "function", "function": fc} if isinstance(fc, dict) else fc
    return tools, choice


def _anthropic_tool_choice(choice: Any) -> Optional[dict]:
    """OpenAI tool_choice -> Anthropic tool_choice (None when absent)."""
    if choice is None:
        return None
    if isinstance(choice, str) and choice in TOOL_CHOICE_FROM_OPENAI:
        return dict(TOOL_CHOICE_FROM_OPENAI[choice])
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        mode = (choice.get("allowed_tools") or {}).get("mode", "auto")
        return dict(TOOL_CHOICE_FROM_OPENAI.get(mode, {"type": "auto"}))
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise BadRequest("tool_choice must be auto, none, required or a named function", param="tool_choice")
    return {"type": "tool", "name": name}


def _apply_tools(openai_body: dict, anthropic_body: dict, notes: Optional[Notes] = None) -> None:
    """tools, tool_choice, parallel_tool_calls (legacy functions accepted)."""
    tools, choice = _legacy_tools(openai_body)
    if not tools:
        return
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list", param="tools")
    anthropic_body["tools"] = [_anthropic_tool(t, "tools.%d" % i, notes) for i, t in enumerate(tools)]
    tool_choice = _anthropic_tool_choice(choice)
    if openai_body.get("parallel_tool_calls") is False and (tool_choice or {}).get("type") != "none":
        tool_choice = dict(tool_choice or {"type": "auto"}, disable_parallel_tool_use=True)
    if tool_choice:
        anthropic_body["tool_choice"] = tool_choice


def _max_tokens(openai_body: dict, keys: Tuple[str, ...] = ("max_completion_tokens", "max_tokens")) -> Optional[int]:
    """The client's max_completion_tokens or max_tokens (or the keys given), validated; None when absent."""
    for key in keys:
        value = openai_body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadRequest(key + " must be a positive integer", param=key)
        return value
    return None


def _stop_sequences(stop: Any) -> List[str]:
    """stop (str | list of str) -> stop_sequences, whitespace-only entries dropped."""
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest("stop must be a string or a list of strings", param="stop")
    return [s for s in stops if s.strip()]


def _apply_sampling_fields(openai_body: dict, anthropic_body: dict, notes: Optional[Notes] = None) -> None:
    """temperature (clamped to 0..1), top_p, top_k, stop, user, stream."""
    for key in SAMPLING_FIELDS:
        value = openai_body.get(key)
        if value is not None and not _is_number(value):
            raise BadRequest(key + " must be a number", param=key)
        if value is not None:
            anthropic_body[key] = min(max(value, 0), 1.0) if key == "temperature" else value
    if anthropic_body.get("temperature", 0) != openai_body.get("temperature", 0):
        _note(notes, "temperature", "rewritten: clamped to Anthropic's 0..1")
    stops = _stop_sequences(openai_body["stop"]) if openai_body.get("stop") is not None else []
    if stops:
        anthropic_body["stop_sequences"] = stops
    user = openai_body.get("user") or openai_body.get("safety_identifier")
    if isinstance(user, str) and user:
        anthropic_body["metadata"] = {"user_id": user}
    if "stream" in openai_body:
        anthropic_body["stream"] = bool(openai_body["stream"])


def _apply_response_format(openai_body: dict, anthropic_body: dict, notes: Optional[Notes] = None) -> None:
    """response_format json_schema / json_object -> output_config.format (never dropped)."""
    rf = openai_body.get("response_format")
    kind = rf.get("type") if isinstance(rf, dict) else rf
    json_schema = (rf.get("json_schema") or {}) if kind == "json_schema" else {}
    if isinstance(json_schema, dict):
        _note_extra_keys(json_schema, ("schema", "strict"), "response_format.json_schema", notes,
                         "dropped: Anthropic's output format has no name or description")
    schema = json_schema.get("schema") if isinstance(json_schema, dict) else None
    _set_output_format(kind, schema, anthropic_body, "response_format", "response_format.json_schema.schema")


def _set_output_format(kind: Any, schema: Any, anthropic_body: dict, param: str, schema_param: str) -> None:
    """text: nothing; json_object: a system line; json_schema: output_config.format, made strict."""
    if kind in (None, "text"):
        return
    if kind == "json_object":       # no schema fits "any object" under strict rules: instruct instead
        anthropic_body.setdefault("system", []).append({"type": "text", "text": JSON_OBJECT_INSTRUCTION})
        return
    if kind != "json_schema":
        raise BadRequest("unsupported %s %r" % (param, kind), param=param)
    if not isinstance(schema, dict):
        raise BadRequest("json_schema.schema must be an object", param=schema_param)
    anthropic_body.setdefault("output_config", {})["format"] = {"type": "json_schema", "schema": strict_schema(schema)}

# ---- request: reasoning ----------------------------------------------------------------------


def _requested_effort(openai_body: dict, variant_effort: Optional[str]) -> Optional[str]:
    """reasoning_effort (or OpenRouter reasoning.effort) from the body, else the model variant."""
    effort = openai_body.get("reasoning_effort")
    if effort is None and isinstance(openai_body.get("reasoning"), dict):
        effort = openai_body["reasoning"].get("effort")
    if effort is None:
        effort = variant_effort
    if effort is not None and effort not in EFFORT_ORDER:
        raise BadRequest("reasoning_effort must be one of " + ", ".join(EFFORT_ORDER),
                         param="reasoning_effort")
    return effort


def _thinking_blocked(anthropic_body: dict) -> Optional[str]:
    """Why thinking cannot be on for this request (B.2), or None."""
    if (anthropic_body.get("tool_choice") or {}).get("type") in ("any", "tool"):
        return "tool_choice forces a tool"
    assistants = [m for m in anthropic_body["messages"] if m["role"] == "assistant"]
    last = assistants[-1]["content"] if assistants else []
    if any(b["type"] == "tool_use" for b in last) and last[0]["type"] not in THINKING_BLOCKS:
        return "the last assistant turn has tool_use without a signed thinking block"
    return None


def _adaptive_effort(anthropic_body: dict, effort: str, facts: dict, notes: Optional[Notes]) -> None:
    """output_config.effort for an adaptive model: the effort, or the nearest lower one it accepts."""
    accepted = EFFORTS_ALL if facts["efforts"] is None else facts["efforts"]
    wanted = ADAPTIVE_EFFORT[effort]
    if not accepted:
        _note(notes, "reasoning_effort", "dropped: this model takes no effort (adaptive thinking only)")
        return
    folded = fold_effort(wanted, accepted)
    if folded != wanted:
        _note(notes, "reasoning_effort", "rewritten: %s sent as %s, the most this model accepts" % (effort, folded))
    anthropic_body.setdefault("output_config", {})["effort"] = folded


def _apply_thinking(anthropic_body: dict, effort: Optional[str], facts: dict, explicit_max: bool,
                    notes: Optional[Notes] = None) -> None:
    """Set thinking / output_config.effort in the model's thinking style; max_tokens leaves room for a budget."""
    if effort in (None, "none"):
        return
    style = facts["thinking"]
    if style == "none":
        _note(notes, "reasoning_effort", "dropped: this model has no extended thinking")
        return
    if style == "adaptive":
        _adaptive_effort(anthropic_body, effort, facts, notes)
    thinking = {"type": "adaptive"} if style == "adaptive" else {"type": "enabled", "budget_tokens": EFFORT_BUDGET[effort]}
    reason = _thinking_blocked(anthropic_body)
    if reason:
        _note(notes, "reasoning_effort", "thinking left off for this request: " + reason)
        return
    anthropic_body["thinking"] = thinking
    needed = thinking.get("budget_tokens", 0) + THINKING_HEADROOM
    if style == "budget" and anthropic_body["max_tokens"] < needed:
        if explicit_max:
            _note(notes, "max_tokens", "rewritten: %d raised to %d to fit the thinking budget"
                  % (anthropic_body["max_tokens"], needed))
        anthropic_body["max_tokens"] = needed


def fit_anthropic_request(anthropic_body: dict, facts: dict, effort: Optional[str], cap: Optional[int],
                          notes: Optional[Notes] = None) -> dict:
    """An Anthropic client's request shaped for the model it was routed to: thinking for a
    `-reasoning-<effort>` name when the client asked for none, and max_tokens (a thinking
    budget under it) within a configured cap (Claude Code's 64k-128k to a vendor that takes
    8k-32k). The same object when nothing changes, so passthrough can keep the client's bytes."""
    wants_thinking = effort is not None and not anthropic_body.get("thinking")
    over_cap = bool(cap) and isinstance(anthropic_body.get("max_tokens"), int) and anthropic_body["max_tokens"] > cap
    if not wants_thinking and not over_cap:
        return anthropic_body
    body = copy.deepcopy(anthropic_body) if wants_thinking else dict(anthropic_body)
    if wants_thinking:
        _apply_thinking(body, effort, facts, True, notes)
    if over_cap:
        _fit_output_limit(body, {"output": cap}, notes)
    return body


def _fit_thinking_style(anthropic_body: dict, facts: dict, notes: Optional[Notes]) -> dict:
    """Thinking as the model asks for it: adaptive, a budget (from the effort asked for), or none."""
    thinking, style = anthropic_body.get("thinking"), facts["thinking"]
    if style is None or not anthropic_thinking_on(anthropic_body) or THINKING_STYLE[thinking["type"]] == style:
        return anthropic_body
    if style == "none":
        _note(notes, "thinking", "dropped: this model has no extended thinking")
        return _without_clear_thinking({k: v for k, v in anthropic_body.items() if k != "thinking"}, notes)
    if style == "adaptive":
        _note(notes, "thinking", "rewritten: a thinking budget sent as adaptive thinking, the kind this model takes")
        return dict(anthropic_body, thinking=dict({k: v for k, v in thinking.items() if k != "budget_tokens"},
                                                  type="adaptive"))
    budget = EFFORT_BUDGET.get((anthropic_body.get("output_config") or {}).get("effort"), EFFORT_BUDGET["high"])
    _note(notes, "thinking", "rewritten: adaptive thinking sent as a %d-token budget, the kind this model takes" % budget)
    if "display" in thinking:
        _note(notes, "thinking.display", "dropped with adaptive thinking")
    fitted = dict(anthropic_body, thinking={"type": "enabled", "budget_tokens": budget})
    if isinstance(fitted.get("max_tokens"), int) and fitted["max_tokens"] < budget + THINKING_HEADROOM:
        _note(notes, "max_tokens", "rewritten: raised to %d to fit the thinking budget" % (budget + THINKING_HEADROOM))
        fitted["max_tokens"] = budget + THINKING_HEADROOM
    return fitted


def _fit_effort(anthropic_body: dict, facts: dict, notes: Optional[Notes]) -> dict:
    """output_config.effort as the model accepts it: dropped where it takes none, else folded down."""
    config = anthropic_body.get("output_config")
    effort = config.get("effort") if isinstance(config, dict) else None
    accepted = facts["efforts"]
    if effort is None or accepted is None or effort in accepted:
        return anthropic_body
    if not accepted:
        _note(notes, "output_config.effort", "dropped: this model takes no effort")
        rest = {k: v for k, v in config.items() if k != "effort"}
        return dict(anthropic_body, output_config=rest) if rest else \
            {k: v for k, v in anthropic_body.items() if k != "output_config"}
    folded = fold_effort(effort, accepted)
    _note(notes, "output_config.effort", "rewritten: %s sent as %s, the most this model accepts" % (effort, folded))
    return dict(anthropic_body, output_config=dict(config, effort=folded))


def fit_to_target_model(anthropic_body: dict, spec: dict, notes: Optional[Notes] = None) -> dict:
    """A request shaped for one model, sent to another (Claude Code sends adaptive thinking, an effort
    and max_tokens 32000 for a name it does not know; a route maps a name to an older model), fitted
    to the target's facts as the converted routes fit theirs: thinking in its style, the effort it
    accepts, max_tokens within its limit. A target with no facts (not in the model table, no facts in
    its models[] entry) gets the request as sent, and a note says so. The same object when nothing
    changes, so passthrough keeps the client's bytes."""
    facts = model_facts(spec["model"] or "", spec)
    if facts["id"] is None:                                 # only what its models[] entry says
        facts = dict(facts, thinking=spec.get("thinking"), efforts=spec.get("efforts"), output=spec.get("max_tokens"))
        if facts["thinking"] is facts["efforts"] is facts["output"] is None:
            if anthropic_thinking_on(anthropic_body) or (anthropic_body.get("output_config") or {}).get("effort"):
                _note(notes, "model", "thinking, effort and max_tokens passed through as sent to %r: the model table "
                      "has no facts for it (a models[] entry's thinking, efforts, max_tokens give them)" % spec["model"])
            return anthropic_body
    elif model_facts(str(anthropic_body.get("model") or ""))["id"] == facts["id"]:
        return anthropic_body                               # shaped for this very model
    fitted = _fit_effort(_fit_thinking_style(anthropic_body, facts, notes), facts, notes)
    if facts["output"] and isinstance(fitted.get("max_tokens"), int) and fitted["max_tokens"] > facts["output"]:
        fitted = dict(fitted)
        _fit_output_limit(fitted, facts, notes)
    return fitted


def _fit_output_limit(anthropic_body: dict, facts: dict, notes: Optional[Notes] = None) -> None:
    """Clamp max_tokens (and a thinking budget under it) to the model's output limit."""
    limit = facts["output"]
    if not limit or anthropic_body["max_tokens"] <= limit:
        return
    _note(notes, "max_tokens", "rewritten: lowered to the model's output limit %d" % limit)
    anthropic_body["max_tokens"] = limit
    thinking = anthropic_body.get("thinking") or {}
    if thinking.get("budget_tokens", 0) > limit - THINKING_HEADROOM:
        anthropic_body["thinking"] = dict(thinking, budget_tokens=limit - THINKING_HEADROOM)


def _sampling_rejected(facts: dict, anthropic_version: str) -> Optional[str]:
    """Why no sampling field may be sent at all, or None."""
    if facts["sampling"] == "none":
        return "dropped: this model rejects sampling parameters"
    if anthropic_version >= SAMPLING_REMOVED_IN:
        return "dropped: anthropic-version %s removed sampling parameters" % anthropic_version
    return None


def _restrict_sampling(anthropic_body: dict, facts: dict, anthropic_version: str = ANTHROPIC_VERSION,
                       notes: Optional[Notes] = None) -> None:
    """Drop or clamp sampling parameters the model, the version or thinking rejects (B.2, H.1)."""
    rejected = _sampling_rejected(facts, anthropic_version)
    thinking = "thinking" in anthropic_body
    for key in SAMPLING_FIELDS:
        if key in anthropic_body and (rejected or (thinking and key != "top_p")):
            del anthropic_body[key]
            _note(notes, key, rejected or "dropped: not allowed with thinking")
    if thinking and anthropic_body.get("top_p", 1) < 0.95:
        _note(notes, "top_p", "rewritten: raised to 0.95, the least allowed with thinking")
        anthropic_body["top_p"] = 0.95
    if facts["sampling"] == "exclusive" and "temperature" in anthropic_body and "top_p" in anthropic_body:
        _note(notes, "top_p", "dropped: this model takes temperature or top_p, not both")
        del anthropic_body["top_p"]

# ---- request: entry point --------------------------------------------------------------------


def openai_to_anthropic_request(openai_body: dict, model: str, *, facts: Optional[dict] = None,
                                variant_effort: Optional[str] = None, anthropic_version: str = ANTHROPIC_VERSION,
                                notes: Optional[Notes] = None) -> dict:
    """OpenAI chat.completions body -> Anthropic /v1/messages body (pure; D.2, D.6, D.7, H.1).

    facts are model_facts(model, spec) (looked up when absent); the request follows the rules of
    anthropic_version, the version it is sent with."""
    if not isinstance(openai_body, dict):
        raise BadRequest("request body must be a JSON object")
    if isinstance(openai_body.get("n"), int) and openai_body["n"] > 1:
        raise BadRequest("n > 1 is not supported", param="n")
    facts = facts or model_facts(model)
    for key in sorted(openai_body.keys() - OPENAI_MAPPED_FIELDS):
        _note(notes, key, OPENAI_DROP_REASONS.get(key, NO_ANTHROPIC_FORM))
    system, messages = openai_messages_to_anthropic(openai_body.get("messages"),
                                                    inline_system=bool(facts["mid_system"]), notes=notes)
    explicit_max = _max_tokens(openai_body)
    anthropic_body: Dict[str, Any] = {"model": model, "messages": messages,
                                      "max_tokens": explicit_max or DEFAULT_ANTHROPIC_MAX_TOKENS}
    if system:
        anthropic_body["system"] = system
    _apply_sampling_fields(openai_body, anthropic_body, notes)
    _apply_tools(openai_body, anthropic_body, notes)
    _apply_response_format(openai_body, anthropic_body, notes)
    _apply_thinking(anthropic_body, _requested_effort(openai_body, variant_effort), facts,
                    explicit_max is not None, notes)
    _fit_output_limit(anthropic_body, facts, notes)
    _restrict_sampling(anthropic_body, facts, anthropic_version, notes)
    return anthropic_body

# ---- response: Anthropic stream -> OpenAI chunks -----------------------------------------------
#
# AnthropicToOpenAIStream, theory of operation (PROTOCOLS B.7 in, C.5 out, D.5 mapping).
#
# Anthropic frames a reply as message_start, then per content block start / deltas / stop, then
# message_delta (stop_reason, cumulative usage) and message_stop; ping and unknown events may come
# anywhere. OpenAI frames it as one role chunk, content / reasoning_content / tool_calls deltas,
# exactly one chunk with finish_reason, an optional usage chunk with choices [] and "[DONE]".
#
# The machine therefore keeps little state: whether the role chunk went out, which Anthropic block
# indices are client tool_use blocks (and their OpenAI tool index k, counting tool blocks only, so
# server_tool_use / web_search_tool_result blocks neither show nor shift k), the last stop_reason
# and the merged usage (message_delta repeats and may revise input counts: last value wins).
# Block stops produce nothing, so a stream that omits one (the truncated max_tokens fixture) is
# fine. The finish chunk is emitted at message_stop, or by close() when the upstream ended without
# one; message_delta only records, because usage may still be revised. An upstream error event
# becomes one {"error": ...} chunk and ends the machine: no finish chunk and no [DONE] follow, so
# the client cannot mistake a broken answer for a complete one. Thinking text surfaces as
# delta.reasoning_content; a refusal's stop_details as delta.refusal (its explanation); signatures,
# citations and redacted thinking have no OpenAI form.


class AnthropicToOpenAIStream:
    """Sans-IO state machine: Anthropic stream events in, OpenAI chunk dicts / "[DONE]" out."""

    _HANDLERS = {"message_start": "_on_message_start", "content_block_start": "_on_block_start",
                 "content_block_delta": "_on_block_delta", "message_delta": "_on_message_delta",
                 "message_stop": "_on_message_stop", "error": "_on_error"}

    def __init__(self, model: str, *, include_usage: bool = False, completion_id: Optional[str] = None,
                 created: Optional[int] = None):
        self.model = model
        self.include_usage = include_usage
        self.completion_id = completion_id or new_id("chatcmpl-")
        self.created = int(time.time()) if created is None else created
        self.finished = False
        self._started = False
        self._tool_index: Dict[int, int] = {}
        self._stop_reason: Optional[str] = None
        self._usage: Dict[str, Any] = {}

    def feed(self, anthropic_event: dict) -> List[Any]:
        """Consume one Anthropic event; return the OpenAI chunks it produces."""
        if self.finished or not isinstance(anthropic_event, dict):
            return []
        delta = anthropic_event.get("delta")
        if type(delta) is dict and delta.get("type") == "text_delta" and self._started \
                and anthropic_event.get("type") == "content_block_delta":       # the hot path: more text
            text = delta.get("text")
            return [self._chunk({"content": text})] if type(text) is str and text else []
        handler = self._HANDLERS.get(anthropic_event.get("type"))
        if handler is None:  # ping, content_block_stop, unknown (B.7: ignore)
            return []
        return getattr(self, handler)(anthropic_event)

    @property
    def saw_finish(self) -> bool:
        """Whether the upstream said it finished (a stop_reason), as a complete answer does."""
        return self._stop_reason is not None

    def close(self) -> List[Any]:
        """End of upstream: finish chunk (if not sent), usage chunk, "[DONE]"; then nothing."""
        return [] if self.finished else self._finish()

    # -- chunk helpers

    def _chunk(self, delta: dict, finish_reason: Optional[str] = None) -> dict:
        """One chat.completion.chunk with a single choice."""
        return {"id": self.completion_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [{"index": 0, "delta": delta,
                                                  "finish_reason": finish_reason, "logprobs": None}]}

    def _start(self) -> List[Any]:
        """The role chunk, once."""
        if self._started:
            return []
        self._started = True
        return [self._chunk({"role": "assistant", "content": ""})]

    def _delta(self, delta: dict) -> List[Any]:
        """A delta chunk, preceded by the role chunk if it is still due."""
        return self._start() + [self._chunk(delta)]

    # -- handlers

    def _on_message_start(self, event: dict) -> List[Any]:
        self._usage.update((event.get("message") or {}).get("usage") or {})
        return self._start()

    def _on_block_start(self, event: dict) -> List[Any]:
        block = event.get("content_block") or {}
        if block.get("type") == "tool_use":
            k = self._tool_index[event.get("index")] = len(self._tool_index)
            return self._delta({"tool_calls": [{"index": k, "id": block.get("id"), "type": "function",
                                                "function": {"name": block.get("name"), "arguments": ""}}]})
        if block.get("type") == "text" and block.get("text"):
            return self._delta({"content": block["text"]})
        if block.get("type") == "thinking" and block.get("thinking"):
            return self._delta({"reasoning_content": block["thinking"]})
        return self._start()  # redacted_thinking, server tools, unknown blocks: no OpenAI form

    def _on_block_delta(self, event: dict) -> List[Any]:
        delta = event.get("delta") or {}
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return self._delta({"content": delta["text"]})
        if kind == "thinking_delta" and delta.get("thinking"):
            return self._delta({"reasoning_content": delta["thinking"]})
        k = self._tool_index.get(event.get("index"))
        if kind == "input_json_delta" and k is not None and delta.get("partial_json"):
            fragment = {"index": k, "function": {"arguments": delta["partial_json"]}}
            return self._delta({"tool_calls": [fragment]})
        return []  # signature_delta, citations_delta, server tool input, empty deltas

    def _on_message_delta(self, event: dict) -> List[Any]:
        delta = event.get("delta") or {}
        self._stop_reason = delta.get("stop_reason") or self._stop_reason
        self._usage.update(event.get("usage") or {})
        details = delta.get("stop_details")
        if isinstance(details, dict) and details.get("type") == "refusal":    # -> message.refusal
            return self._delta({"refusal": details.get("explanation") or details.get("category") or "refused"})
        return []

    def _on_message_stop(self, event: dict) -> List[Any]:
        return self._finish()

    def _on_error(self, event: dict) -> List[Any]:
        self.finished = True
        error = event.get("error") or {}
        return [{"error": {"message": error.get("message", "upstream error"),
                           "type": error.get("type", "api_error"), "param": None, "code": None}}]

    def _finish(self) -> List[Any]:
        """Finish chunk, usage chunk when requested, "[DONE]"; the machine is then finished."""
        self.finished = True
        finish = FINISH_FROM_STOP_REASON.get(self._stop_reason or "", "stop")
        out = self._start() + [self._chunk({}, finish)]
        if self.include_usage:
            usage_chunk = self._chunk({})
            usage_chunk["choices"] = []
            usage_chunk["usage"] = openai_usage_from_anthropic(self._usage)
            out.append(usage_chunk)
        return out + ["[DONE]"]


def openai_usage_from_anthropic(anthropic_usage: dict) -> dict:
    """Anthropic usage -> OpenAI usage (prompt includes cache reads and writes; D.3)."""
    def count(key: str) -> int:
        return token_count(anthropic_usage.get(key))
    cache_read = count("cache_read_input_tokens")
    prompt = count("input_tokens") + cache_read + count("cache_creation_input_tokens")
    completion = count("output_tokens")
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
             "prompt_tokens_details": {"cached_tokens": cache_read}}
    details = anthropic_usage.get("output_tokens_details")
    thinking = details.get("thinking_tokens") if isinstance(details, dict) else None
    if thinking is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": token_count(thinking)}
    return usage

# ---- response: non-streaming, folded from the same machine -------------------------------------


def _fold_tool_call(tool_calls: Dict[int, dict], fragment: dict) -> None:
    """Merge one streamed tool_call fragment into the calls keyed by index."""
    call = tool_calls.setdefault(fragment.get("index", 0),
                                 {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
    if fragment.get("id"):
        call["id"] = fragment["id"]
    function = fragment.get("function") or {}
    call["function"]["name"] += function.get("name") or ""
    call["function"]["arguments"] += function.get("arguments") or ""


def fold_openai_chunks(chunks: List[Any]) -> dict:
    """OpenAI stream chunks -> one chat.completion; an error chunk raises UpstreamError."""
    head: dict = {}
    text: List[str] = []
    reasoning: List[str] = []
    refusal: List[str] = []
    tool_calls: Dict[int, dict] = {}
    finish, usage = None, None
    for chunk in chunks:
        if not isinstance(chunk, dict):
            continue  # "[DONE]"
        if "error" in chunk:
            error = chunk["error"] or {}
            raise UpstreamError(error.get("message", "upstream error"), error_type=error.get("type"))
        head = head or chunk
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text.append(delta.get("content") or "")
            reasoning.append(delta.get("reasoning_content") or "")
            refusal.append(delta.get("refusal") or "")
            for fragment in delta.get("tool_calls") or []:
                _fold_tool_call(tool_calls, fragment)
            finish = choice.get("finish_reason") or finish
    message: Dict[str, Any] = {"role": "assistant", "content": "".join(text) or (None if tool_calls else ""),
                               "refusal": "".join(refusal) or None}
    if "".join(reasoning):
        message["reasoning_content"] = "".join(reasoning)
    if tool_calls:
        message["tool_calls"] = [tool_calls[k] for k in sorted(tool_calls)]
    completion = {"id": head.get("id"), "object": "chat.completion", "created": head.get("created"),
                  "model": head.get("model"),
                  "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}]}
    if usage:
        completion["usage"] = usage
    return completion


def _block_events(index: int, block: dict) -> List[dict]:
    """One finished Anthropic content block -> its start / delta / stop events."""
    kind = block.get("type")
    if kind == "text":      # citations first, as a stream sends them
        start = {"type": "text", "text": ""}
        deltas = [{"type": "citations_delta", "citation": c} for c in block.get("citations") or []]
        deltas.append({"type": "text_delta", "text": block.get("text", "")})
    elif kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [{"type": "thinking_delta", "thinking": block.get("thinking", "")},
                  {"type": "signature_delta", "signature": block.get("signature", "")}]
    elif kind == "tool_use":
        start = dict(block, input={})
        deltas = [{"type": "input_json_delta", "partial_json": json.dumps(block.get("input") or {})}]
    else:  # redacted_thinking, server tool blocks: complete in the start event (B.7)
        start, deltas = block, []
    return ([{"type": "content_block_start", "index": index, "content_block": start}]
            + [{"type": "content_block_delta", "index": index, "delta": d} for d in deltas]
            + [{"type": "content_block_stop", "index": index}])


def anthropic_message_as_events(anthropic_message: dict) -> List[dict]:
    """A non-streaming Anthropic message (or error body) -> the equivalent stream events;
    anything else (`{}`, a list, a message without content) is an UpstreamError, not an answer."""
    if anthropic_message.get("type") == "error":
        return [anthropic_message]
    if anthropic_message.get("type") != "message" or not isinstance(anthropic_message.get("content"), list):
        raise UpstreamError("upstream answered 200 without an Anthropic message")
    start = dict(anthropic_message, content=[], stop_reason=None, stop_sequence=None)
    events = [{"type": "message_start", "message": start}]
    for i, block in enumerate(anthropic_message.get("content") or []):
        events += _block_events(i, block)
    delta = {key: anthropic_message.get(key) for key in ("stop_reason", "stop_sequence", "stop_details")
             if key != "stop_details" or anthropic_message.get(key) is not None}
    events.append({"type": "message_delta", "delta": delta, "usage": anthropic_message.get("usage") or {}})
    return events + [{"type": "message_stop"}]


def anthropic_response_to_openai(anthropic_message: dict, model: str, **kw: Any) -> dict:
    """Non-streaming Anthropic message -> chat.completion, via the stream machine and the fold."""
    machine = AnthropicToOpenAIStream(model, include_usage=True, **kw)
    chunks: List[Any] = []
    for event in anthropic_message_as_events(anthropic_message):
        chunks += machine.feed(event)
    return fold_openai_chunks(chunks + machine.close())

# ---------------------------------------------------------------------------------------------
# 9c. Responses client -> Claude (request), Claude -> Responses client (response, stream)
# ---------------------------------------------------------------------------------------------
#
# The OpenAI Responses API (PROTOCOLS G) joins the hub here: one request converter to an
# Anthropic body and one machine from Anthropic stream events. A chat-completions provider
# composes them with 9a (responses_to_openai_request, ChainedStream); a provider that serves
# /responses itself is relayed untouched (section 11). State (store, previous_response_id,
# item_reference) is I/O, so the handler resolves it into `input` before this converter runs.
# Decisions taken here, each in one place:
# - instructions, then system and developer messages, become the system prompt (text only).
# - tools come from `tools` and from every additional_tools item in `input` (Codex's default model
#   sends its tools only that way, and a replayed history repeats the item: a later definition
#   replaces an earlier one of the same name).
# - a custom tool (Codex's apply_patch and exec) becomes a tool with one string property `input`;
#   its grammar goes into the description, since Claude cannot be held to it. The call comes back
#   as a custom_tool_call whose `input` is that string.
# - namespace tools are flattened to `<namespace>__<name>` and their calls mapped back by the tool
#   table, so the client sees `namespace` again.
# - a client-run tool_search is a tool named tool_search; its call goes back as a
#   tool_search_call, a replayed tool_search_output is a tool_result naming the tools it loaded,
#   and those tools join the request's.
# - an input item with no Anthropic form is a note (path and why), never a silent drop.
# - built-in tools (web_search, file_search, computer*, code_interpreter, image_generation,
#   local_shell, shell, mcp, ...) are dropped and their types returned for the handler's INFO
#   line; a tool_choice forcing one is a BadRequest.
# - reasoning items carry Claude's thinking blocks (thinking + signature, redacted data) in
#   encrypted_content as `cp1.` + base64url JSON {"o": origin, "b": blocks}, origin being the
#   producing provider/model. A blob of another origin, or not ours, is dropped (debug), never
#   sent. It is always filled, as OpenAI now does by default, so a client replaying items
#   without `include` still hands back the signed thinking Claude needs before a tool result.
# - replayed thinking is removed again when thinking ends up off for the request.
# - fields with no Anthropic form (text.verbosity, metadata, truncation, service_tier, ...) are
#   dropped with a debug line; `conversation` and `prompt` (server-side objects) are BadRequests.

NAMESPACE_SEPARATOR = "__"
CUSTOM_TOOL_FIELD = "input"
TOOL_SEARCH_NAME = "tool_search"          # a client-run tool_search as Claude sees it
TOOL_SEARCH_SCHEMA = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}
TOOL_ITEMS = ("additional_tools", "tool_search_output")    # input items whose tools join the request's
REASONING_BLOB_PREFIX = "cp1."
RESPONSES_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
RESPONSES_TOOL_CHOICE = {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}
RESPONSES_REJECTED_FIELDS = {
    "conversation": "conversations are not kept here: send previous_response_id or the whole input",
    "prompt": "prompt templates live on OpenAI's servers: send instructions and input instead"}
# Fields this section maps, and the ones the handler owns; any other is dropped with a debug line.
RESPONSES_MAPPED_FIELDS = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "reasoning",
    "text", "max_output_tokens", "temperature", "top_p", "user", "safety_identifier", "stream",
    "store", "previous_response_id", "prompt_cache_key", "include"})
# Anthropic stop_reason -> (status, incomplete_details.reason) (PROTOCOLS G.9).
RESPONSES_STATUS = {
    "end_turn": ("completed", None), "stop_sequence": ("completed", None), "tool_use": ("completed", None),
    "pause_turn": ("completed", None), "max_tokens": ("incomplete", "max_output_tokens"),
    "model_context_window_exceeded": ("incomplete", "max_output_tokens"),
    "refusal": ("incomplete", "content_filter")}
RESPONSES_TERMINAL = {"completed": "response.completed", "incomplete": "response.incomplete",
                      "failed": "response.failed"}
# Anthropic error type -> response.error.code, the field Codex classifies failures by (G.8).
RESPONSES_ERROR_CODES = {"rate_limit_error": "rate_limit_exceeded", "overloaded_error": "server_is_overloaded",
                         "invalid_request_error": "invalid_prompt"}


# ---- request: reasoning blobs --------------------------------------------------------------

def encode_reasoning(origin: str, blocks: List[dict]) -> str:
    """Thinking blocks as an opaque, versioned encrypted_content tagged with their origin."""
    payload = json_text({"o": origin, "b": blocks}).encode("utf-8")
    return REASONING_BLOB_PREFIX + base64.urlsafe_b64encode(payload).rstrip(b"=").decode("ascii")


def _thinking_block(block: Any) -> Optional[dict]:
    """A well-formed thinking / redacted_thinking block rebuilt from a blob, else None."""
    if not isinstance(block, dict):
        return None
    if block.get("type") == "thinking" and isinstance(block.get("thinking"), str) \
            and isinstance(block.get("signature"), str):
        return {"type": "thinking", "thinking": block["thinking"], "signature": block["signature"]}
    if block.get("type") == "redacted_thinking" and isinstance(block.get("data"), str):
        return {"type": "redacted_thinking", "data": block["data"]}
    return None


def decode_reasoning(blob: Any, origin: str, param: str) -> List[dict]:
    """The thinking blocks of one of our blobs made by `origin`; [] (debug) for any other."""
    if not isinstance(blob, str) or not blob.startswith(REASONING_BLOB_PREFIX):
        log.debug("dropping reasoning item at %s: its encrypted_content is not the proxy's", param)
        return []
    text = blob[len(REASONING_BLOB_PREFIX):]
    try:
        payload = loads_json(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, TypeError):
        log.debug("dropping reasoning item at %s: unreadable encrypted_content", param)
        return []
    blocks = payload.get("b") if isinstance(payload, dict) else None
    if not isinstance(payload, dict) or payload.get("o") != origin or not isinstance(blocks, list):
        log.debug("dropping reasoning item at %s: made by another provider or model", param)
        return []
    rebuilt = [_thinking_block(b) for b in blocks]
    return [b for b in rebuilt if b is not None]

# ---- request: input items ------------------------------------------------------------------


def _responses_file(part: dict, param: str) -> dict:
    """input_file: a file_url becomes a URL document, file_data a PDF or text document."""
    if isinstance(part.get("file_url"), str):
        return {"type": "document", "source": {"type": "url", "url": part["file_url"]}}
    if not isinstance(part.get("file_data"), str):
        raise BadRequest("input_file needs file_data or file_url (file_id needs OpenAI's file store)",
                         param=param)
    return _file_block({"file": {"file_data": part["file_data"], "filename": part.get("filename")}}, param)


def _responses_image(part: dict, param: str) -> dict:
    """input_image with an image_url (URL or data URL) as an image block."""
    if part.get("image_url") is None and part.get("file_id"):
        raise BadRequest("input_image.file_id needs OpenAI's file store: send image_url", param=param + ".file_id")
    return _image_block({"image_url": part.get("image_url")}, param)


RESPONSES_PART_CONVERTERS = {
    "input_text": lambda p, param: _text_block(p.get("text"), param + ".text"),
    "output_text": lambda p, param: _text_block(p.get("text"), param + ".text"),
    "refusal": lambda p, param: _text_block(p.get("refusal"), param + ".refusal"),
    "input_image": lambda p, param: [_responses_image(p, param)],
    "input_file": lambda p, param: [_responses_file(p, param)]}


def _responses_blocks(content: Any, param: str) -> List[dict]:
    """Message content or a call output (string or parts) as Anthropic blocks."""
    if isinstance(content, str):
        return _text_block(content, param)
    _expect(isinstance(content, list), "content must be a string or a list of parts", param)
    blocks: List[dict] = []
    for i, part in enumerate(content):
        _expect(isinstance(part, dict), "content part must be an object", f"{param}.{i}")
        convert_part = RESPONSES_PART_CONVERTERS.get(part.get("type"))
        if convert_part is None:
            raise BadRequest("content part type %r is not supported" % part.get("type"), param=f"{param}.{i}.type")
        blocks += convert_part(part, f"{param}.{i}")
    return blocks


def _responses_message(item: dict, param: str, origin: str, notes: Optional[Notes]) -> List[dict]:
    """A message item as one turn; system and developer messages as a "system" turn."""
    role = RESPONSES_ROLES.get(item.get("role"))
    _expect(role is not None, "unknown role %r" % (item.get("role"),), param + ".role")
    blocks = _responses_blocks(item.get("content"), param + ".content")
    _expect(role != "system" or all(b["type"] == "text" for b in blocks),
            "system and developer messages take text only", param + ".content")
    return [{"role": role, "content": blocks}]


def _flat_tool_name(namespace: Any, name: Any, param: str) -> str:
    """The tool name Claude sees: a namespaced tool flattened to <namespace>__<name>."""
    _expect(isinstance(name, str) and name != "", "a tool name is required", param + ".name")
    return f"{namespace}{NAMESPACE_SEPARATOR}{name}" if isinstance(namespace, str) and namespace else name


def _call_id(item: dict, param: str) -> str:
    """The call_id of a call or call output item, sanitized as an Anthropic tool id."""
    call_id = item.get("call_id") or (item.get("id") if not item["type"].endswith("_output") else None)
    _expect(isinstance(call_id, str) and call_id != "", "a call and its output need their call_id", param + ".call_id")
    return sanitize_tool_id(call_id)


def _responses_call(item: dict, param: str, origin: str, notes: Optional[Notes]) -> List[dict]:
    """function_call / custom_tool_call as an assistant tool_use (custom input wrapped)."""
    call_id = _call_id(item, param)
    if item["type"] == "custom_tool_call":
        _expect(isinstance(item.get("input"), str), "input must be a string", param + ".input")
        tool_input = {CUSTOM_TOOL_FIELD: item["input"]}
    else:
        tool_input = _tool_input(item.get("arguments"), param + ".arguments")
    name = _flat_tool_name(item.get("namespace"), item.get("name"), param)
    return [{"role": "assistant", "content": [{"type": "tool_use", "id": call_id, "name": name, "input": tool_input}]}]


def _responses_call_output(item: dict, param: str, origin: str, notes: Optional[Notes]) -> List[dict]:
    """function_call_output / custom_tool_call_output as a user tool_result."""
    block: Dict[str, Any] = {"type": "tool_result", "tool_use_id": _call_id(item, param)}
    output = item.get("output")
    content = output if isinstance(output, str) else _responses_blocks(output, param + ".output")
    if content:
        block["content"] = content
    return [{"role": "user", "content": [block]}]


def _client_search(item: dict, param: str, notes: Optional[Notes]) -> bool:
    """Whether a tool_search_call / _output was run by the client (a server-run one is noted: Claude cannot replay it)."""
    if item.get("execution") == "client":
        return True
    _note(notes, param, "dropped: a %s run by OpenAI's servers has no Anthropic form" % item["type"])
    return False


def _responses_tool_search_call(item: dict, param: str, origin: str, notes: Optional[Notes]) -> List[dict]:
    """A client-run tool_search_call as an assistant tool_use of the tool_search tool."""
    if not _client_search(item, param, notes):
        return []
    arguments = item.get("arguments")
    tool_input = arguments if isinstance(arguments, dict) else _tool_input(arguments, param + ".arguments")
    return [{"role": "assistant", "content": [
        {"type": "tool_use", "id": _call_id(item, param), "name": TOOL_SEARCH_NAME, "input": tool_input}]}]


def _responses_tool_search_output(item: dict, param: str, origin: str, notes: Optional[Notes]) -> List[dict]:
    """A client-run tool_search_output as a tool_result naming the tools it loaded (which join the tools)."""
    if not _client_search(item, param, notes):
        return []
    names = [name for k, tool in enumerate(item.get("tools") or [])
             for name in _loaded_tool_names(tool, f"{param}.tools.{k}")]
    text = "\n".join(TOOL_REFERENCE_TEXT % name for name in names) or "No tools found."
    return [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": _call_id(item, param), "content": text}]}]


def _responses_reasoning(item: dict, param: str, origin: str, notes: Optional[Notes]) -> List[dict]:
    """A reasoning item as the thinking blocks its encrypted_content carries (or nothing, noted)."""
    blocks = decode_reasoning(item.get("encrypted_content"), origin, param)
    if not blocks:
        _note(notes, param, "dropped: a reasoning item goes back only to the provider and model that made it")
    return [{"role": "assistant", "content": blocks}]


RESPONSES_ITEM_CONVERTERS: Dict[str, Callable[[dict, str, str, Optional[Notes]], List[dict]]] = {
    "message": _responses_message, "function_call": _responses_call, "custom_tool_call": _responses_call,
    "function_call_output": _responses_call_output, "custom_tool_call_output": _responses_call_output,
    "reasoning": _responses_reasoning, "tool_search_call": _responses_tool_search_call,
    "tool_search_output": _responses_tool_search_output,
    "additional_tools": lambda item, param, origin, notes: []}      # its tools join the request's (responses_tools)


def responses_input_items(responses_body: dict) -> List[dict]:
    """The input as a list of items: a string is one user message; a missing type means message."""
    value = responses_body.get("input")
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    _expect(isinstance(value, list), "input must be a string or a list of items", "input")
    for i, item in enumerate(value):
        _expect(isinstance(item, dict), "input item must be an object", f"input.{i}")
        _expect(isinstance(item.get("type") or "", str), "input item type must be a string", f"input.{i}.type")
        _expect(isinstance(item.get("id") or "", str), "input item id must be a string", f"input.{i}.id")
    return [item if item.get("type") else dict(item, type="message") for item in value]


def _responses_turns(items: List[dict], origin: str, notes: Optional[Notes] = None) -> Tuple[List[dict], List[dict]]:
    """Input items -> (system text blocks, Anthropic turns before repair)."""
    system: List[dict] = []
    turns: List[dict] = []
    for i, item in enumerate(items):
        convert_item = RESPONSES_ITEM_CONVERTERS.get(item["type"])
        if convert_item is None:
            _note(notes, f"input.{i}", "dropped: an input item of type %r has no Anthropic form" % item["type"])
            continue
        for turn in convert_item(item, f"input.{i}", origin, notes):
            if turn["role"] == "system":
                system += turn["content"]
            else:
                turns.append(turn)
    return system, turns

# ---- request: tools ------------------------------------------------------------------------


def _custom_tool_description(tool: dict) -> str:
    """A custom tool's description plus what its one `input` string must hold."""
    fmt = tool.get("format") if isinstance(tool.get("format"), dict) else {}
    note = "Pass the tool's raw free-form input as the `input` string, exactly as the tool expects it."
    if fmt.get("type") == "grammar" and isinstance(fmt.get("definition"), str):
        note += " It must match this %s grammar:\n%s" % (fmt.get("syntax") or "", fmt["definition"])
    return ((tool.get("description") or "") + "\n\n" + note).strip()


def _responses_tool(tool: Any, param: str, namespace: Optional[str] = None) -> Tuple[dict, dict]:
    """A function or custom tool -> (Anthropic tool, its entry in the tool table)."""
    _expect(isinstance(tool, dict) and tool.get("type") in ("function", "custom"),
            "expected a function or custom tool", param)
    name = _flat_tool_name(namespace, tool.get("name"), param)
    entry = {"type": tool["type"], "name": tool["name"]}
    if namespace:
        entry["namespace"] = namespace
    if tool["type"] == "custom":
        schema = {"type": "object", "properties": {CUSTOM_TOOL_FIELD: {"type": "string"}},
                  "required": [CUSTOM_TOOL_FIELD]}
        return {"name": name, "description": _custom_tool_description(tool), "input_schema": schema}, entry
    schema = tool.get("parameters") or {"type": "object", "properties": {}}
    _expect(isinstance(schema, dict), "parameters must be a JSON Schema object", param + ".parameters")
    out = {"name": name, "description": tool["description"]} if tool.get("description") else {"name": name}
    out["input_schema"] = schema
    if tool.get("strict") is True:
        out["strict"] = True
    return out, entry


def _tool_search_tool(tool: dict, param: str) -> Tuple[dict, dict]:
    """A client-run tool_search as a plain tool; its calls go back as tool_search_call items."""
    schema = tool.get("parameters") or TOOL_SEARCH_SCHEMA
    _expect(isinstance(schema, dict), "parameters must be a JSON Schema object", param + ".parameters")
    description = tool.get("description") or "Search for more tools; the ones found become available."
    return ({"name": TOOL_SEARCH_NAME, "description": description, "input_schema": schema},
            {"type": "tool_search", "name": TOOL_SEARCH_NAME})


def _expand_tool(tool: Any, param: str) -> Optional[List[Tuple[dict, dict]]]:
    """One client tool as (Anthropic tool, table entry) pairs; None for a tool with no Claude form."""
    _expect(isinstance(tool, dict), "tool must be an object", param)
    if tool.get("type") in ("function", "custom"):
        return [_responses_tool(tool, param)]
    if tool.get("type") == "tool_search" and tool.get("execution") == "client":
        return [_tool_search_tool(tool, param)]
    if tool.get("type") != "namespace":
        return None
    inner = tool.get("tools")
    _expect(isinstance(tool.get("name"), str) and isinstance(inner, list),
            "a namespace needs a name and a list of tools", param)
    return [_responses_tool(t, f"{param}.tools.{k}", tool["name"]) for k, t in enumerate(inner)]


def _loaded_tool_names(tool: Any, param: str) -> List[str]:
    """The names Claude sees for one tool a tool_search_output loaded (a built-in's type)."""
    pairs = _expand_tool(tool, param)
    return [anthropic_tool["name"] for anthropic_tool, _ in pairs] if pairs else [str(tool.get("type"))]


def _request_tools(responses_body: dict) -> List[Tuple[str, Any]]:
    """(path, tool) for every tool of the request: `tools`, then those of each additional_tools and
    tool_search_output item in `input` order (Codex's default model sends its tools only that way)."""
    tools = responses_body.get("tools") or []
    _expect(isinstance(tools, list), "tools must be a list", "tools")
    found = [(f"tools.{i}", tool) for i, tool in enumerate(tools)]
    for i, item in enumerate(responses_input_items(responses_body)):
        if item["type"] in TOOL_ITEMS:
            inner = item.get("tools") or []
            _expect(isinstance(inner, list), "tools must be a list", f"input.{i}.tools")
            found += [(f"input.{i}.tools.{k}", tool) for k, tool in enumerate(inner)]
    return found


def responses_tools(responses_body: dict) -> Tuple[List[dict], Dict[str, dict], List[str]]:
    """Client tools -> (Anthropic tools, tool table by Anthropic name, types of built-ins dropped).
    Two top-level tools of one name are a BadRequest; a tool an input item brings again replaces the
    earlier one in place (a replayed history repeats its additional_tools)."""
    anthropic_tools: List[dict] = []
    table: Dict[str, dict] = {}
    dropped: List[str] = []
    where: Dict[str, str] = {}
    for param, tool in _request_tools(responses_body):
        pairs = _expand_tool(tool, param)
        if pairs is None:
            dropped.append(str(tool.get("type")))
        for anthropic_tool, entry in pairs or []:
            name = anthropic_tool["name"]
            _expect(not (name in table and param.startswith("tools.") and where[name].startswith("tools.")),
                    "two tools are named %r" % name, param)
            if name in table:
                anthropic_tools[[t["name"] for t in anthropic_tools].index(name)] = anthropic_tool
            else:
                anthropic_tools.append(anthropic_tool)
            table[name], where[name] = entry, param
    return anthropic_tools, table, dropped


def _responses_tool_choice(choice: Any, table: Dict[str, dict]) -> Optional[dict]:
    """tool_choice -> Anthropic tool_choice; a forced built-in tool is a BadRequest."""
    if choice is None or isinstance(choice, str):
        _expect(choice is None or choice in RESPONSES_TOOL_CHOICE,
                "tool_choice must be auto, required, none or a tool", "tool_choice")
        return dict(RESPONSES_TOOL_CHOICE[choice]) if choice else None
    _expect(isinstance(choice, dict), "tool_choice must be a string or an object", "tool_choice")
    kind = choice.get("type")
    if kind == "allowed_tools":
        return dict(RESPONSES_TOOL_CHOICE.get(choice.get("mode"), {"type": "auto"}))
    if kind not in ("function", "custom"):
        raise BadRequest("tool_choice forces the built-in tool %r, which this route cannot run" % kind,
                         param="tool_choice.type")
    name = _flat_tool_name(choice.get("namespace"), choice.get("name"), "tool_choice")
    _expect(name in table, "tool_choice names %r, which is not among the tools" % name, "tool_choice.name")
    return {"type": "tool", "name": name}


def _allowed_tool_names(choice: Any) -> Optional[set]:
    """The Anthropic names a tool_choice of type allowed_tools lets through, else None."""
    if not isinstance(choice, dict) or choice.get("type") != "allowed_tools":
        return None
    allowed = choice.get("tools")
    _expect(isinstance(allowed, list), "allowed_tools needs a list of tools", "tool_choice.tools")
    return {_flat_tool_name(t.get("namespace"), t.get("name"), "tool_choice.tools")
            for t in allowed if isinstance(t, dict) and t.get("type") in ("function", "custom")}


def _apply_responses_tools(responses_body: dict, anthropic_body: dict) -> None:
    """tools (flattened, built-ins dropped), tool_choice, parallel_tool_calls."""
    tools, table, _ = responses_tools(responses_body)
    choice = responses_body.get("tool_choice")
    tool_choice = _responses_tool_choice(choice, table)
    allowed = _allowed_tool_names(choice)
    tools = [t for t in tools if allowed is None or t["name"] in allowed]
    if not tools:
        return
    anthropic_body["tools"] = tools
    if responses_body.get("parallel_tool_calls") is False and (tool_choice or {}).get("type") != "none":
        tool_choice = dict(tool_choice or {"type": "auto"}, disable_parallel_tool_use=True)
    if tool_choice:
        anthropic_body["tool_choice"] = tool_choice

# ---- request: entry points -----------------------------------------------------------------


def _apply_text_format(responses_body: dict, anthropic_body: dict) -> None:
    """text.format -> output_config.format (strict) or the JSON-object line; verbosity dropped."""
    text = responses_body.get("text")
    if text is None:
        return
    _expect(isinstance(text, dict), "text must be an object", "text")
    fmt = text.get("format") if isinstance(text.get("format"), dict) else {}
    _set_output_format(fmt.get("type"), fmt.get("schema"), anthropic_body, "text.format.type", "text.format.schema")
    if text.get("verbosity") is not None:
        log.debug("dropping text.verbosity %r: no Anthropic equivalent", text["verbosity"])


def _drop_thinking_when_off(anthropic_body: dict) -> None:
    """Replayed thinking blocks removed (and the turns repaired) when thinking is not on."""
    if "thinking" in anthropic_body:
        return
    messages = anthropic_body["messages"]
    kept = [dict(m, content=[b for b in m["content"] if b["type"] not in THINKING_BLOCKS]) for m in messages]
    if kept != messages:
        log.debug("replayed thinking blocks dropped: thinking is off for this request")
        anthropic_body["messages"] = _repair_turns(kept, "input")


def _screen_fields(responses_body: dict) -> None:
    """One debug line per top-level field with no Anthropic form; BadRequest for server-side objects."""
    for key, reason in RESPONSES_REJECTED_FIELDS.items():
        if responses_body.get(key) is not None:
            raise BadRequest(f"{key} is not supported: {reason}", param=key)
    for key in sorted(responses_body.keys() - RESPONSES_MAPPED_FIELDS):
        log.debug("dropping field %r: no Anthropic equivalent", key)
    extras = [i for i in responses_body.get("include") or [] if i != "reasoning.encrypted_content"]
    if extras:
        log.debug("dropping include values %s: nothing to include on this route", extras)


def responses_to_anthropic_request(responses_body: dict, model: str, *, facts: Optional[dict] = None,
                                   variant_effort: Optional[str] = None, origin: str = "", for_chat: bool = False,
                                   anthropic_version: str = ANTHROPIC_VERSION, notes: Optional[Notes] = None) -> dict:
    """A Responses body (its input already expanded) -> Anthropic /v1/messages body (pure; G.9).
    facts are model_facts(model, spec) (looked up when absent), as for openai_to_anthropic_request.
    for_chat: the body goes on to 9a, where replayed thinking is the provider's replay_reasoning
    field, so it is kept even with thinking off."""
    _expect(isinstance(responses_body, dict), "request body must be a JSON object", "body")
    _screen_fields(responses_body)
    system, turns = _responses_turns(responses_input_items(responses_body), origin, notes)
    instructions = responses_body.get("instructions")
    system = (_text_block(instructions, "instructions") if instructions is not None else []) + system
    explicit_max = _max_tokens(responses_body, ("max_output_tokens",))
    anthropic_body: Dict[str, Any] = {"model": model, "messages": _repair_turns(turns, "input"),
                                      "max_tokens": explicit_max or DEFAULT_ANTHROPIC_MAX_TOKENS}
    if system:
        anthropic_body["system"] = system
    facts = facts or model_facts(model)
    _apply_sampling_fields(responses_body, anthropic_body, notes)
    _apply_responses_tools(responses_body, anthropic_body)
    _apply_text_format(responses_body, anthropic_body)
    _apply_thinking(anthropic_body, _requested_effort(responses_body, variant_effort), facts,
                    explicit_max is not None, notes)
    if not for_chat:
        _drop_thinking_when_off(anthropic_body)
    _fit_output_limit(anthropic_body, facts, notes)
    _restrict_sampling(anthropic_body, facts, anthropic_version, notes)
    return anthropic_body


def responses_to_openai_request(responses_body: dict, spec: dict, *, variant_effort: Optional[str] = None,
                                origin: str = "", notes: Optional[Notes] = None) -> dict:
    """A Responses body -> chat.completions body, through the hub (9c then 9a). Without
    max_output_tokens the provider's own default applies, not Claude's; the effort asked for
    is sent even where Claude would have needed signed thinking to keep it (B.2 is Claude's rule)."""
    anthropic_body = responses_to_anthropic_request(responses_body, spec["model"], variant_effort=variant_effort,
                                                    facts=model_facts(spec["model"], spec), origin=origin,
                                                    for_chat=True, notes=notes)
    if responses_body.get("max_output_tokens") is None:
        del anthropic_body["max_tokens"]
    effort = _requested_effort(responses_body, variant_effort)
    if "thinking" not in anthropic_body and effort not in (None, "none"):
        anthropic_body.setdefault("output_config", {})["effort"] = effort
    return anthropic_to_openai_request(anthropic_body, spec, notes=notes)

# ---- response: the response object -----------------------------------------------------------


def responses_shell(responses_body: dict, response_id: str, created_at: int) -> dict:
    """The response object before any output: the request's settings echoed (PROTOCOLS G.5)."""
    body = responses_body
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    shell = {"id": response_id, "object": "response", "created_at": created_at, "status": "in_progress",
             "background": False, "error": None, "incomplete_details": None,
             "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
             "max_tool_calls": body.get("max_tool_calls"), "model": body.get("model"), "output": [],
             "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
             "previous_response_id": body.get("previous_response_id"),
             "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
             "service_tier": "default", "store": body.get("store") is not False,
             "temperature": body.get("temperature"),
             "text": body.get("text") or {"format": {"type": "text"}, "verbosity": "medium"},
             "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
             "top_p": body.get("top_p"), "truncation": body.get("truncation") or "disabled",
             "usage": None, "user": body.get("user"), "metadata": body.get("metadata") or {}}
    for key in ("safety_identifier", "prompt_cache_key"):
        if body.get(key) is not None:
            shell[key] = body[key]
    return shell


def responses_usage(anthropic_usage: dict) -> dict:
    """Anthropic usage -> Responses usage: input counts cache reads and writes (G.5, G.9)."""
    usage = openai_usage_from_anthropic(anthropic_usage)
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {"input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                                     "cache_write_tokens": int(anthropic_usage.get("cache_creation_input_tokens") or 0)},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": int(reasoning)},
            "total_tokens": usage["total_tokens"]}


def responses_error(error_type: Optional[str], message: str) -> dict:
    """response.error for an upstream failure, with the code Codex classifies by."""
    if message.startswith("prompt is too long"):
        return {"code": "context_length_exceeded", "message": message}
    return {"code": RESPONSES_ERROR_CODES.get(error_type or "", "server_error"), "message": message}


def _url_annotation(citation: Any, start: int, end: int) -> Optional[dict]:
    """A Claude citation with a web URL as a url_citation annotation over [start, end)."""
    url = citation.get("url") or citation.get("source") if isinstance(citation, dict) else None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        log.debug("dropping citation without a web URL: %.80r", citation)
        return None
    return {"type": "url_citation", "start_index": start, "end_index": end, "url": url,
            "title": citation.get("title") or ""}

# ---- response: Anthropic stream -> Responses events ------------------------------------------


class AnthropicToResponsesStream:
    """Anthropic stream events in, Responses stream events out (PROTOCOLS B.7 in, G.6 out).

    Theory of operation. Responses frames an answer as response.created and .in_progress, then
    output items, each output_item.added -> its deltas -> output_item.done with the complete
    item (Codex builds its history from .done alone), then one terminal event carrying the whole
    response. Items follow Anthropic blocks, one open at a time: thinking and redacted_thinking
    -> reasoning (summary text streamed when the client asked for summaries; the blocks packed
    into encrypted_content at the end), tool_use -> function_call, or custom_tool_call when the
    tool table says the client's tool was custom (its wrapped JSON is parsed at the block stop,
    so its input goes out as one delta), or tool_search_call (arguments whole at the stop, no
    deltas: the grammar has none), text -> message. Consecutive text blocks (Claude
    splits an answer at each citation) share one message and one output_text part; a citation
    becomes a url_citation over the text of its block, announced at that block's stop. Blocks
    with no Responses form (server tools and their results) are skipped without closing the
    message. message_delta records stop_reason and usage; message_stop (or close(), for a
    stream that ended after its stop_reason) closes the open item (incomplete after max_tokens)
    and sends response.completed or .incomplete (RESPONSES_STATUS). An error event, or fail()
    from the handler when the upstream broke off, sends response.failed; the machine is then
    finished. Every event carries the next sequence_number; the same response object, with
    status and output filled, is the terminal event's payload and the non-streaming answer."""

    _HANDLERS = {"message_start": "_on_message_start", "content_block_start": "_on_block_start",
                 "content_block_delta": "_on_block_delta", "content_block_stop": "_on_block_stop",
                 "message_delta": "_on_message_delta", "message_stop": "_on_message_stop",
                 "error": "_on_error"}
    _OPENERS = {"text": "_open_text", "thinking": "_open_reasoning", "redacted_thinking": "_open_reasoning",
                "tool_use": "_open_call"}
    _DELTAS = {("message", "text_delta"): "_text_delta", ("message", "citations_delta"): "_citation",
               ("reasoning", "thinking_delta"): "_thinking_delta", ("reasoning", "signature_delta"): "_signature",
               ("function_call", "input_json_delta"): "_arguments_delta",
               ("custom_tool_call", "input_json_delta"): "_custom_input_delta",
               ("tool_search_call", "input_json_delta"): "_custom_input_delta"}
    _CLOSERS = {"message": "_close_message", "reasoning": "_close_reasoning",
                "function_call": "_close_function_call", "custom_tool_call": "_close_custom_call",
                "tool_search_call": "_close_tool_search"}

    def __init__(self, shell: dict, *, tools: Optional[Dict[str, dict]] = None, origin: str = "",
                 summaries: bool = True, ids: Callable[[str], str] = new_id):
        self.shell = shell
        self.tools = tools or {}
        self.origin = origin
        self.summaries = summaries
        self._ids = ids
        self.finished = False
        self.response: Optional[dict] = None     # the terminal event's response object
        self.output: List[dict] = []             # finished items, in output_index order
        self._seq = 0
        self._started = False
        self._item: Optional[dict] = None        # the open item's state (see _open)
        self._block: Optional[int] = None        # the Anthropic block that feeds it
        self._stop_reason: Optional[str] = None
        self._usage: Dict[str, Any] = {}

    def feed(self, anthropic_event: dict) -> List[dict]:
        """Consume one Anthropic event; return the Responses events it produces."""
        if self.finished or not isinstance(anthropic_event, dict):
            return []
        handler = self._HANDLERS.get(anthropic_event.get("type"))
        return getattr(self, handler)(anthropic_event) if handler else []    # ping, unknown: B.7

    def close(self) -> List[dict]:
        """End of upstream: the open item closed and the terminal event; [] when finished."""
        return [] if self.finished else self._finish()

    @property
    def saw_finish(self) -> bool:
        """Whether the upstream said it finished (a stop_reason), as a complete answer does."""
        return self._stop_reason is not None

    def fail(self, message: str, error_type: Optional[str] = None) -> List[dict]:
        """response.failed for an upstream failure (after response.created if still due)."""
        if self.finished:
            return []
        events = self._start()
        self.finished = True
        self.response = self._snapshot("failed", error=responses_error(error_type, message))
        return events + [self._event("response.failed", response=self.response)]

    # -- events and snapshots

    def _event(self, kind: str, **fields: Any) -> dict:
        """One event with the next sequence number."""
        event = {"type": kind, "sequence_number": self._seq}
        event.update(fields)
        self._seq += 1
        return event

    def _snapshot(self, status: str, **fields: Any) -> dict:
        """The response object now: shell, status, finished output, usage."""
        usage = responses_usage(self._usage) if status != "in_progress" else None
        return dict(self.shell, status=status, output=list(self.output), usage=usage, **fields)

    def _start(self) -> List[dict]:
        """response.created and response.in_progress, once."""
        if self._started:
            return []
        self._started = True
        return [self._event("response.created", response=self._snapshot("in_progress")),
                self._event("response.in_progress", response=self._snapshot("in_progress"))]

    def _finish(self) -> List[dict]:
        """Close the open item, then response.completed or response.incomplete."""
        status, reason = RESPONSES_STATUS.get(self._stop_reason or "end_turn", ("completed", None))
        events = self._start() + self._close_item("incomplete" if status == "incomplete" else "completed")
        self.finished = True
        self.response = self._snapshot(status, incomplete_details={"reason": reason} if reason else None)
        return events + [self._event(RESPONSES_TERMINAL[status], response=self.response)]

    # -- items

    def _open(self, item: dict, **state: Any) -> List[dict]:
        """Make `item` the open one at the next output index; output_item.added."""
        self._item = dict(state, item=item, index=len(self.output), id=item.get("id"))
        return [self._event("response.output_item.added", output_index=len(self.output), item=dict(item))]

    def _close_item(self, status: str = "completed") -> List[dict]:
        """Finish the open item: its closing events, then output_item.done with the whole item."""
        state, self._item, self._block = self._item, None, None
        if state is None:
            return []
        events, item = getattr(self, self._CLOSERS[state["item"]["type"]])(state)
        if "status" in item:
            item["status"] = status
        self.output.append(item)
        return events + [self._event("response.output_item.done", output_index=state["index"], item=item)]

    def _part_event(self, kind: str, state: dict, **fields: Any) -> dict:
        """An event about the open item (item_id and output_index filled)."""
        return self._event(kind, item_id=state["id"], output_index=state["index"], **fields)

    # -- handlers

    def _on_message_start(self, event: dict) -> List[dict]:
        self._usage.update((event.get("message") or {}).get("usage") or {})
        return self._start()

    def _on_block_start(self, event: dict) -> List[dict]:
        block = event.get("content_block") or {}
        opener = self._OPENERS.get(block.get("type"))
        events = self._start()
        if opener is None:              # server tools and their results have no Responses form
            log.debug("dropping %r block: no Responses form", block.get("type"))
            self._block = None
            return events
        events += getattr(self, opener)(block)
        self._block = event.get("index")
        return events

    def _on_block_delta(self, event: dict) -> List[dict]:
        state = self._item
        if state is None or event.get("index") != self._block:
            return []
        delta = event.get("delta") or {}
        handler = self._DELTAS.get((state["item"]["type"], delta.get("type")))
        return getattr(self, handler)(state, delta) if handler else []

    def _on_block_stop(self, event: dict) -> List[dict]:
        state = self._item
        if state is None or event.get("index") != self._block:
            return []
        if state["item"]["type"] == "message":      # the message may go on in the next text block
            self._block = None
            return self._annotate(state)
        return self._close_item()

    def _on_message_delta(self, event: dict) -> List[dict]:
        self._stop_reason = (event.get("delta") or {}).get("stop_reason") or self._stop_reason
        self._usage.update(event.get("usage") or {})
        return []

    def _on_message_stop(self, event: dict) -> List[dict]:
        return self._finish()

    def _on_error(self, event: dict) -> List[dict]:
        error = event.get("error") or {}
        return self.fail(str(error.get("message") or "upstream error"), error.get("type"))

    # -- message (text blocks)

    def _open_text(self, block: dict) -> List[dict]:
        """A text block: opens a message, or goes on in the open one."""
        events: List[dict] = []
        if self._item is None or self._item["item"]["type"] != "message":
            events = self._close_item() + self._open(
                {"id": self._ids("msg_"), "type": "message", "status": "in_progress", "content": [],
                 "role": "assistant"}, text=[], length=0, annotations=[])
            events.append(self._part_event("response.content_part.added", self._item, content_index=0,
                                           part={"type": "output_text", "text": "", "annotations": []}))
        self._item.update(block_start=self._item["length"], citations=[])
        if block.get("text"):
            events += self._text_delta(self._item, block)
        return events

    def _text_delta(self, state: dict, delta: dict) -> List[dict]:
        text = delta.get("text")
        if not text:
            return []
        state["text"].append(text)
        state["length"] += len(text)
        return [self._part_event("response.output_text.delta", state, content_index=0, delta=text, logprobs=[])]

    def _citation(self, state: dict, delta: dict) -> List[dict]:
        state["citations"].append(delta.get("citation"))
        return []

    def _annotate(self, state: dict) -> List[dict]:
        """The citations of the text block that just stopped, as annotations over its text."""
        events: List[dict] = []
        for citation in state.pop("citations", []):
            annotation = _url_annotation(citation, state["block_start"], state["length"])
            if annotation:
                events.append(self._part_event("response.output_text.annotation.added", state, content_index=0,
                                               annotation_index=len(state["annotations"]), annotation=annotation))
                state["annotations"].append(annotation)
        return events

    def _close_message(self, state: dict) -> Tuple[List[dict], dict]:
        events = self._annotate(state)
        part = {"type": "output_text", "text": "".join(state["text"]), "annotations": state["annotations"]}
        events += [self._part_event("response.output_text.done", state, content_index=0, text=part["text"],
                                    logprobs=[]),
                   self._part_event("response.content_part.done", state, content_index=0, part=part)]
        return events, dict(state["item"], content=[part])

    # -- reasoning (thinking and redacted_thinking blocks)

    def _open_reasoning(self, block: dict) -> List[dict]:
        events = self._close_item() + self._open({"id": self._ids("rs_"), "type": "reasoning", "summary": []},
                                                 thinking=[], signature=[], summary=False)
        if block.get("type") == "redacted_thinking":
            self._item["redacted"] = block.get("data", "")
        elif block.get("thinking"):
            events += self._thinking_delta(self._item, block)
        return events

    def _thinking_delta(self, state: dict, delta: dict) -> List[dict]:
        text = delta.get("thinking")
        if not text:
            return []
        state["thinking"].append(text)
        if not self.summaries:
            return []
        events = [] if state["summary"] else [self._part_event(
            "response.reasoning_summary_part.added", state, summary_index=0, part={"type": "summary_text", "text": ""})]
        state["summary"] = True
        return events + [self._part_event("response.reasoning_summary_text.delta", state, summary_index=0, delta=text)]

    def _signature(self, state: dict, delta: dict) -> List[dict]:
        state["signature"].append(delta.get("signature") or "")
        return []

    def _close_reasoning(self, state: dict) -> Tuple[List[dict], dict]:
        text = "".join(state["thinking"])
        block = {"type": "redacted_thinking", "data": state["redacted"]} if "redacted" in state else \
            {"type": "thinking", "thinking": text, "signature": "".join(state["signature"])}
        item = dict(state["item"], summary=[{"type": "summary_text", "text": text}] if state["summary"] else [],
                    encrypted_content=encode_reasoning(self.origin, [block]))
        if not state["summary"]:
            return [], item
        part = {"type": "summary_text", "text": text}
        return [self._part_event("response.reasoning_summary_text.done", state, summary_index=0, text=text),
                self._part_event("response.reasoning_summary_part.done", state, summary_index=0, part=part)], item

    # -- tool calls (function_call, custom_tool_call)

    def _open_call(self, block: dict) -> List[dict]:
        name = block.get("name") or ""
        entry = self.tools.get(name) or {"type": "function", "name": name}
        item: Dict[str, Any]
        if entry["type"] == "custom":
            item = {"id": self._ids("ctc_"), "type": "custom_tool_call", "call_id": block.get("id"),
                    "name": entry["name"], "input": ""}
        elif entry["type"] == "tool_search":
            item = {"id": self._ids("ts_"), "type": "tool_search_call", "call_id": block.get("id"),
                    "execution": "client", "arguments": {}, "status": "in_progress"}
        else:
            item = {"id": self._ids("fc_"), "type": "function_call", "status": "in_progress", "arguments": "",
                    "call_id": block.get("id"), "name": entry["name"]}
        if entry.get("namespace"):
            item["namespace"] = entry["namespace"]
        return self._close_item() + self._open(item, json=[])

    def _arguments_delta(self, state: dict, delta: dict) -> List[dict]:
        fragment = delta.get("partial_json")
        if not fragment:
            return []
        state["json"].append(fragment)
        return [self._part_event("response.function_call_arguments.delta", state, delta=fragment)]

    def _custom_input_delta(self, state: dict, delta: dict) -> List[dict]:
        state["json"].append(delta.get("partial_json") or "")
        return []

    def _close_function_call(self, state: dict) -> Tuple[List[dict], dict]:
        arguments = "".join(state["json"])
        events = [] if arguments else [self._part_event("response.function_call_arguments.delta", state, delta="{}")]
        arguments = arguments or "{}"
        events.append(self._part_event("response.function_call_arguments.done", state, arguments=arguments))
        return events, dict(state["item"], arguments=arguments)

    def _close_tool_search(self, state: dict) -> Tuple[List[dict], dict]:
        arguments = _parse_tool_input("".join(state["json"]))
        return [], dict(state["item"], arguments=arguments if isinstance(arguments, dict) else {})

    def _close_custom_call(self, state: dict) -> Tuple[List[dict], dict]:
        wrapped = _parse_tool_input("".join(state["json"]))
        raw = wrapped.get(CUSTOM_TOOL_FIELD) if isinstance(wrapped, dict) else None
        raw = raw if isinstance(raw, str) else "".join(state["json"])
        return [self._part_event("response.custom_tool_call_input.delta", state, delta=raw),
                self._part_event("response.custom_tool_call_input.done", state, input=raw)], \
            dict(state["item"], input=raw)


class ChainedStream:
    """Two stream machines in series: OpenAI chunks -> Anthropic events -> Responses events."""

    def __init__(self, first: Any, second: Any):
        self.first = first
        self.second = second

    @property
    def finished(self) -> bool:
        """Finished when the last machine is."""
        return self.second.finished

    @property
    def saw_finish(self) -> bool:
        """Whether the upstream said it finished."""
        return self.first.saw_finish

    def feed(self, upstream_event: Any) -> List[Any]:
        """The last machine's events for one upstream event."""
        out: List[Any] = []
        for middle in self.first.feed(upstream_event):
            out += self.second.feed(middle)
        return out

    def close(self) -> List[Any]:
        """Close both, in order."""
        out: List[Any] = []
        for middle in self.first.close():
            out += self.second.feed(middle)
        return out + self.second.close()

# ---- response: non-streaming, folded from the same machine -------------------------------------


def fold_responses_events(responses_events: List[dict]) -> dict:
    """The response object of a finished Responses stream; a failed one raises UpstreamError."""
    terminal = next((e for e in reversed(responses_events) if e.get("type") in RESPONSES_TERMINAL.values()), None)
    if terminal is None:
        raise UpstreamError("the answer ended before it finished")
    response = terminal["response"]
    if response["status"] == "failed":
        raise UpstreamError(response["error"]["message"])
    return response


def anthropic_to_responses_response(anthropic_message: dict, machine: AnthropicToResponsesStream) -> dict:
    """A non-streaming Anthropic message as a response object, through the stream machine."""
    events: List[dict] = []
    for event in anthropic_message_as_events(anthropic_message):
        events += machine.feed(event)
    return fold_responses_events(events + machine.close())

# =============================================================================================
# 10. OAuth
# =============================================================================================

# How the subscription path works, and what it deliberately does not do.
#
# Login is OAuth 2.0 authorization code + PKCE (RFC 7636) against Anthropic's public Claude Code
# client: `login` prints an authorize URL, the user approves in a browser, the callback page shows
# `CODE#STATE`, the user pastes it, and we POST a JSON (not form) body to the token endpoint
# (PROTOCOLS.md A.2-A.4). The answer is normalised into one token record
# `{access_token, refresh_token, expires_at, scope, account, source}` and kept in a 0600 file.
# Access tokens live about 8 h; TokenManager refreshes five minutes early, once per expiry across
# coroutines (asyncio.Lock) and across proxy processes sharing the store (FileLock + re-read),
# because refresh tokens rotate: spending one twice logs the user out (A.5).
#
# On each request the body gets what the earlier proxies sent and found required for an OAuth
# token (A.8): `authorization: Bearer`, the `oauth-2025-04-20` beta, and the Claude Code identity
# as a system block; plus prompt-cache breakpoints, which only save the user money. Nothing
# here is meant to disguise the traffic: no forged user-agent or x-stainless/x-app headers, no
# billing-header hashes, no renamed tools, no rewritten system prompts. Anthropic's terms restrict
# subscription tokens to Anthropic's own clients (PROTOCOLS.md section 0); the CLI says so at login.

# The hosts the current Claude Code CLI uses (PROTOCOLS.md A.1, E.1/E.2): the legacy token host
# console.anthropic.com now answers non-browser POSTs with a Cloudflare challenge (403), so the
# platform.claude.com token endpoint and its matching manual-paste redirect are the ones that
# work today; claude.com/cai/oauth/authorize is what the CLI opens (it forwards to claude.ai).
# Scope: least privilege, the two scopes both the legacy and the current CLI lists share and that
# the proxy uses (inference, plus profile for /auth/status); org:create_api_key and the
# claude_code session/MCP/file scopes are never used here. Every value can be overridden from the
# config's `oauth` section (e.g. scope, or token_url back to console.anthropic.com).
OAUTH_DEFAULTS: Dict[str, str] = {
    "client_id": "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
    "authorize_url": "https://claude.com/cai/oauth/authorize",
    "token_url": "https://platform.claude.com/v1/oauth/token",
    "redirect_uri": "https://platform.claude.com/oauth/code/callback",
    "scope": "user:profile user:inference",
    "long_lived_scope": "user:inference",
}
OAUTH_BETA = "oauth-2025-04-20"
INTERLEAVED_THINKING_BETA = "interleaved-thinking-2025-05-14"
CONTEXT_1M_BETA = "context-1m-2025-08-07"
MID_CONVERSATION_SYSTEM_BETA = "mid-conversation-system-2026-04-07"
CLAUDE_CODE_IDENTITY = "You are Claude Code, Anthropic's official CLI for Claude."
LONG_LIVED_SECONDS = 31536000          # one year, honoured only with scope user:inference (A.7)
REFRESH_MARGIN_SECONDS = 300.0         # refresh five minutes before expiry
MAX_EPOCH = 253402300799.0             # 9999-12-31T23:59:59Z: the last expiry a date can say
MAX_CACHE_BREAKPOINTS = 4              # the API rejects a fifth cache_control
UNCACHEABLE_BLOCK_TYPES = frozenset({"thinking", "redacted_thinking"})
LOGIN_AGAIN = "run `python3 claude_proxy.py login` again"
_EXPIRED_TOKEN = re.compile(r"token (has )?expired", re.IGNORECASE)

PostJson = Callable[[str, dict], Awaitable[Tuple[int, Any]]]
Clock = Callable[[], float]


def oauth_settings(overrides: Optional[dict] = None) -> Dict[str, str]:
    """OAUTH_DEFAULTS with the config's `oauth` section merged over it (known keys only)."""
    settings = dict(OAUTH_DEFAULTS)
    for key, value in (overrides or {}).items():
        if key not in OAUTH_DEFAULTS:
            raise BadRequest(f"unknown OAuth setting {key!r}", param=f"oauth.{key}")
        if not isinstance(value, str) or not value.strip():
            raise BadRequest(f"oauth.{key} must be a non-empty string", param=f"oauth.{key}")
        settings[key] = value.strip()
    return settings




# ---- PKCE and the authorize URL (RFC 7636; PROTOCOLS.md A.2, A.3) ------------------------

def _b64url(raw: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def pkce_challenge(verifier: str) -> str:
    """The S256 code challenge: base64url(sha256(verifier)), no padding."""
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def new_pkce() -> Tuple[str, str]:
    """A fresh (verifier, challenge) pair; the verifier is 32 random bytes (43 chars)."""
    verifier = _b64url(secrets.token_bytes(32))
    return verifier, pkce_challenge(verifier)


def build_authorize_url(settings: dict, challenge: str, state: str, *,
                        scope: Optional[str] = None) -> str:
    """The browser URL of the login, parameters in the order every client sends them."""
    query = [("code", "true"), ("client_id", settings["client_id"]),
             ("response_type", "code"), ("redirect_uri", settings["redirect_uri"]),
             ("scope", scope or settings["scope"]), ("code_challenge", challenge),
             ("code_challenge_method", "S256"), ("state", state)]
    encoded = urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
    return settings["authorize_url"] + "?" + encoded


def _split_pasted(text: str) -> Tuple[str, Optional[str]]:
    """(code, state or None) from CODE#STATE, a bare CODE or a callback URL / query string."""
    if "code=" not in text and "error=" not in text:
        code, _, state = text.partition("#")
        return code.strip(), state.strip() or None
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(text).query or text.lstrip("?"))
    if "error" in query:
        raise BadRequest(f"the login was refused: {query['error'][0]}; {LOGIN_AGAIN}")
    return query.get("code", [""])[0].strip(), query.get("state", [None])[0]


def parse_pasted_code(text: str, expected_state: str) -> str:
    """The authorization code from what the user pasted; a foreign state raises BadRequest."""
    code, state = _split_pasted((text or "").strip())
    if not code:
        raise BadRequest("no authorization code found in the pasted text")
    if state is not None and state != expected_state:
        raise BadRequest(f"state mismatch: the pasted code belongs to another login attempt; {LOGIN_AGAIN}")
    return code


class LoginFlow:
    """One pending login: the PKCE verifier, state and scope the exchange must repeat."""

    def __init__(self, settings: dict, *, long_lived: bool = False,
                 verifier: Optional[str] = None, state: Optional[str] = None):
        self.long_lived = long_lived
        self.scope = settings["long_lived_scope"] if long_lived else settings["scope"]
        self.verifier = verifier or new_pkce()[0]
        self.state = state or _b64url(secrets.token_bytes(32))

    def authorize_url(self, settings: dict) -> str:
        """The URL to open in a browser for this login."""
        return build_authorize_url(settings, pkce_challenge(self.verifier), self.state, scope=self.scope)


# ---- Token endpoint (PROTOCOLS.md A.4-A.6, A.9) -------------------------------------------

def _human_duration(seconds: Optional[float]) -> str:
    """A log-friendly duration: '8.0h', '365d', 'an unknown time'."""
    if seconds is None:
        return "an unknown time"
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f}d"
    return f"{seconds / 3600:.1f}h" if seconds >= 3600 else f"{max(seconds, 0) / 60:.0f}m"


def _lifetime(record: dict, now: float) -> str:
    """How long a record's token stays valid, in words for a log line."""
    expires_at = record.get("expires_at")
    return _human_duration(None if expires_at is None else expires_at - now)


def _token_error(status: int, token_body: Any) -> ProxyError:
    """The error for a token-endpoint answer without an access token."""
    if not isinstance(token_body, dict):
        hint = " (a Cloudflare challenge? try another oauth.token_url)" if status == 403 else ""
        return UpstreamError(f"token endpoint answered HTTP {status} without JSON{hint}")
    error = token_body.get("error")
    if isinstance(error, dict):   # Anthropic-style {"type":"error","error":{"type","message"}}
        error, description = error.get("type"), error.get("message")
    else:
        description = token_body.get("error_description")
    detail = f"{error}: {description}" if description else str(error)
    if status == 429:
        return UpstreamError(f"token endpoint rate limited ({detail})", status=429, error_type="rate_limit_error")
    if error and status < 500:
        return AuthError(f"Claude login rejected ({detail}); {LOGIN_AGAIN}")
    return UpstreamError(f"token endpoint answered HTTP {status} ({detail})")


def expiry_epoch(value: Any, per_second: int = 1) -> Optional[float]:
    """An expiry (in 1/per_second seconds) as epoch seconds a date can say, 1970 to year 9999,
    from a token answer or a saved file; None for anything else (1e999, NaN, text: unknown)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value / per_second if 0 <= value <= MAX_EPOCH * per_second else None


def _expires_at(expires_in: Any, now: float) -> Optional[float]:
    """Epoch seconds of expiry from a relative `expires_in` (seconds, a number or its text); None
    when absent, not positive, not finite or beyond year 9999 (the token then lives until a 401)."""
    try:
        seconds = float(expires_in) if not isinstance(expires_in, bool) else float("nan")
    except (TypeError, ValueError, OverflowError):
        return None
    return expiry_epoch(now + seconds) if seconds > 0 else None


def token_record(token_body: dict, *, source: str, now: float,
                 previous: Optional[dict] = None) -> dict:
    """Normalise a token response; a missing refresh token or account is kept from `previous`."""
    previous = previous or {}
    account = token_body.get("account")
    if isinstance(account, dict):
        account = {"email": account.get("email_address") or account.get("email"),
                   "uuid": account.get("uuid")}
    return {"access_token": token_body["access_token"],
            "refresh_token": token_body.get("refresh_token") or previous.get("refresh_token"),
            "expires_at": _expires_at(token_body.get("expires_in"), now),
            "scope": token_body.get("scope") or previous.get("scope"),
            "account": account or previous.get("account"),
            "source": source}


async def _post_token(settings: dict, form: dict, post_json: PostJson) -> dict:
    """POST a JSON body to the token endpoint; the parsed answer, or the mapped error."""
    status, token_body = await post_json(settings["token_url"], form)
    if status == 200 and isinstance(token_body, dict) and token_body.get("access_token"):
        return token_body
    raise _token_error(status, token_body)


async def exchange_code(settings: dict, code: str, flow: LoginFlow, post_json: PostJson,
                        clock: Clock = time.time) -> dict:
    """Trade the pasted authorization code for the first token record."""
    form = {"grant_type": "authorization_code", "code": code, "state": flow.state,
            "client_id": settings["client_id"], "redirect_uri": settings["redirect_uri"],
            "code_verifier": flow.verifier}
    if flow.long_lived:
        form["expires_in"] = LONG_LIVED_SECONDS
    token_body = await _post_token(settings, form, post_json)
    now = clock()
    record = token_record(token_body, source="long_lived" if flow.long_lived else "login", now=now)
    log.info("logged in, token expires in %s", _lifetime(record, now))
    return record


async def exchange_refresh_token(settings: dict, record: dict, post_json: PostJson,
                                 clock: Clock = time.time) -> dict:
    """Trade the record's refresh token for a rotated pair (the old one kept if none comes back)."""
    form = {"grant_type": "refresh_token", "refresh_token": record["refresh_token"],
            "client_id": settings["client_id"]}
    token_body = await _post_token(settings, form, post_json)
    now = clock()
    fresh = token_record(token_body, source=record.get("source") or "login", now=now, previous=record)
    log.info("token refreshed, expires in %s", _lifetime(fresh, now))
    return fresh


# ---- Token store and cross-process lock ---------------------------------------------------

class TokenStore:
    """The token record in one JSON file: mode 0600, written atomically, parent dir 0700."""

    def __init__(self, path: str, *, clock: Clock = time.time):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.clock = clock
        self._refusal: Optional[str] = None       # the last warning said, so it is said once

    def load(self) -> Optional[dict]:
        """The saved record, or None when there is none, it is unreadable, a symlink, or in
        another program's shape (each of those said in a warning, once while it lasts: the
        store is read again on every look, so a login made meanwhile is seen)."""
        try:
            with os.fdopen(open_no_follow(self.path, os.O_RDONLY), "r", encoding="utf-8") as f:
                document = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            return self._refuse(f"token store {self.path} is unreadable ({exc}); ignoring it")
        token = document.get("token") if isinstance(document, dict) else None
        if isinstance(token, dict) and token.get("access_token"):
            self._refusal = None
            return dict(token, expires_at=expiry_epoch(token.get("expires_at")))
        return self._refuse(f"token store {self.path} is not in claude_proxy's shape (a file of another proxy? "
                            "`python3 claude_proxy.py import FILE` reads those); ignoring it")

    def _refuse(self, warning: str) -> None:
        """Say why the store is ignored, unless that was the last thing said."""
        if warning != self._refusal:
            log.warning("%s", warning)
        self._refusal = warning

    def save(self, record: dict) -> None:
        """Replace the file atomically: 0600 temp file in the same dir, fsync, os.replace."""
        ensure_private_dir(os.path.dirname(self.path))
        document = {"saved_at": self.clock(), "token": record}
        tmp = f"{self.path}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(document, indent=2).encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def clear(self) -> None:
        """Forget the saved token."""
        _unlink_quietly(self.path)


def _unlink_quietly(path: str) -> None:
    """Remove a file that may already be gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class FileLock:
    """A cross-process lock for `async with`, held by the kernel: flock(2) on POSIX, msvcrt
    byte-range locking on Windows. The kernel drops it when its holder exits, so a crashed
    process leaves no stale lock, and a live holder is never judged stale however slow its
    token endpoint is; each holder releases only its own lock. The wait is bounded: past
    `timeout` seconds an UpstreamError says another process holds it. The lock file itself
    stays (deleting it would let a third process lock a new file while a waiter holds the old)."""

    def __init__(self, path: str, *, timeout: float = 60.0, poll: float = 0.05):
        self.path = path
        self.timeout = timeout
        self.poll = poll
        self._fd: Optional[int] = None

    async def __aenter__(self) -> "FileLock":
        ensure_private_dir(os.path.dirname(os.path.abspath(self.path)))
        fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT)
        deadline = time.monotonic() + self.timeout
        while not _try_lock(fd):
            if time.monotonic() > deadline:
                os.close(fd)
                raise UpstreamError(f"another claude_proxy process has held {self.path} for "
                                    f"over {self.timeout:.0f}s; try again")
            await asyncio.sleep(self.poll)
        self._fd = fd
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            _unlock(fd)
            os.close(fd)


def _try_lock(fd: int) -> bool:
    """Take the kernel lock on fd without waiting; False when another holder has it."""
    try:
        if os.name == "nt":
            import msvcrt
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except (BlockingIOError, PermissionError):
        return False
    except OSError as exc:
        if exc.errno in (11, 13, 35, 36):          # EAGAIN / EACCES / EWOULDBLOCK / EDEADLK
            return False
        raise


def _unlock(fd: int) -> None:
    """Release the kernel lock taken by _try_lock."""
    if os.name == "nt":
        import msvcrt
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_UN)


# ---- Token manager ------------------------------------------------------------------------

def _iso(epoch: Optional[float]) -> Optional[str]:
    """Epoch seconds as ISO 8601 UTC, or None."""
    return None if epoch is None else iso_time(epoch)


def explicit_token_record(token: str) -> dict:
    """The record for a token passed in by env/--token: no refresh, expiry unknown."""
    return {"access_token": token, "refresh_token": None, "expires_at": None,
            "scope": None, "account": None, "source": "env"}


class TokenManager:
    """Hands out a valid access token: refreshes early, once, across coroutines and processes."""

    def __init__(self, store: TokenStore, settings: dict, post_json: PostJson, *,
                 clock: Clock = time.time, explicit_token: Optional[str] = None,
                 lock_path: Optional[str] = None, lock_timeout: float = 60.0):
        self.store = store
        self.settings = settings
        self.post_json = post_json
        self.clock = clock
        self.lock_path = lock_path or store.path + ".lock"
        self.lock_timeout = lock_timeout
        self.last_error: Optional[str] = None
        self._explicit_token = explicit_token
        self._cached: Optional[dict] = None
        self._dead_refresh_token: Optional[str] = None
        self._spent: set = set()                  # refresh tokens this process exchanged
        self._unsaved: Optional[dict] = None      # a rotated pair whose write failed
        self._retry_save_at = 0.0
        self._lock: Optional[asyncio.Lock] = None
        self._lock_loop: Optional[asyncio.AbstractEventLoop] = None

    @staticmethod
    def pick_record(explicit_token: Optional[str], saved: Optional[dict]) -> Optional[dict]:
        """Token-source precedence: an explicit token wins over the saved store."""
        return explicit_token_record(explicit_token) if explicit_token else saved

    def record(self) -> Optional[dict]:
        """The record in use (explicit token, else the store, cached after the first read)."""
        if self._explicit_token is None and self._cached is None:
            self._cached = self._newest(self.store.load())
        return self.pick_record(self._explicit_token, self._cached)

    def _async_lock(self) -> asyncio.Lock:
        """The in-process lock, created inside the running loop (and again for a new loop)."""
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    def _needs_refresh(self, record: Optional[dict], failed_token: Optional[str]) -> bool:
        """Whether `record` must be refreshed: it is the token that failed, or it expires soon."""
        if record is None or not record.get("refresh_token"):
            return False
        if failed_token is not None:
            return record["access_token"] == failed_token
        expires_at = record.get("expires_at")
        return expires_at is not None and expires_at - self.clock() < REFRESH_MARGIN_SECONDS

    async def access_token(self) -> str:
        """A valid access token, refreshed first when it expires within five minutes."""
        record = self.record()
        if record is None:
            raise CredentialMissing("claude_proxy: not logged in to Claude: run `python3 claude_proxy.py login` "
                                    "(or give a token with ANTHROPIC_OAUTH_TOKEN)")
        if self._needs_refresh(record, None):
            record = await self._refresh(None)
            if record is None:
                raise LoginDead(f"the saved Claude login was removed; {LOGIN_AGAIN}")
        expires_at = record.get("expires_at")
        if expires_at is not None and expires_at <= self.clock():
            raise LoginDead("the Claude token has expired and cannot be refreshed; "
                            f"{LOGIN_AGAIN} (or import the Claude Code credentials again)")
        if self._unsaved is not None and self.clock() >= self._retry_save_at:
            await self._persist(self._unsaved)
        return record["access_token"]

    async def _refresh(self, failed_token: Optional[str]) -> Optional[dict]:
        """Single-flight refresh: re-check under the asyncio lock, then under the file lock."""
        async with self._async_lock():
            record = self.record()
            if not self._needs_refresh(record, failed_token):
                return record
            async with FileLock(self.lock_path, timeout=self.lock_timeout):
                saved = await run_off_loop(self.store.load)      # another process may have refreshed
                record = self._cached = self._newest(saved)
                if not self._needs_refresh(record, failed_token):
                    return record
                fresh = self._cached = await self._exchange(record)
                self._spent.add(record["refresh_token"])
                await self._persist(fresh)
                return fresh

    def _newest(self, saved: Optional[dict]) -> Optional[dict]:
        """The saved record, unless it holds a refresh token this process already spent (its
        rotated pair could not be written): then that pair, kept in memory. A refresh token is
        never sent twice: the second use would get invalid_grant and end the login."""
        if self._unsaved is not None and (saved is None or saved.get("refresh_token") in self._spent):
            return self._unsaved
        return saved

    async def _persist(self, record: dict) -> None:
        """Write a rotated pair; on failure keep it in memory, say so, and retry in 30 s."""
        try:
            await run_off_loop(self.store.save, record)
        except OSError as exc:
            self._unsaved, self._retry_save_at = record, self.clock() + 30.0
            self.last_error = (f"the refreshed Claude token could not be saved to {self.store.path} "
                               f"({exc.strerror or exc}); it is kept in memory and the write is retried")
            log.warning("%s", self.last_error)
            return
        if self._unsaved is not None:
            log.info("the refreshed Claude token is saved now")
            self.last_error = None
        self._unsaved = None

    async def _exchange(self, record: dict) -> dict:
        """Post the refresh, remembering a failure for status() and a dead refresh token."""
        if record["refresh_token"] == self._dead_refresh_token:
            raise LoginDead(self.last_error or f"the Claude refresh token was rejected; {LOGIN_AGAIN}")
        try:
            fresh = await exchange_refresh_token(self.settings, record, self.post_json, self.clock)
        except ProxyError as exc:
            self.last_error = exc.message
            log.warning("token refresh failed: %s", exc.message)
            if isinstance(exc, AuthError):
                self._dead_refresh_token = record["refresh_token"]
                raise LoginDead(exc.message) from None
            raise
        self.last_error = None
        return fresh

    async def refresh_now(self) -> dict:
        """Refresh the login at once (the menu's "refresh the token"); BadRequest when it cannot be."""
        record = self.record()
        if record is None or not record.get("refresh_token"):
            raise BadRequest("no refresh token available: log in first (menu option 2, or `python3 claude_proxy.py login`)")
        fresh = await self._refresh(record["access_token"])
        if fresh is None:
            raise LoginDead(f"the saved Claude login was removed; {LOGIN_AGAIN}")
        return fresh

    async def on_unauthorized(self, body_text: str, token: Optional[str] = None) -> bool:
        """After an upstream 401: True when the token had expired and a fresh one is ready.

        Pass `token` (the one the failed request used) so concurrent 401s refresh only once."""
        if not _EXPIRED_TOKEN.search(body_text or ""):
            return False
        record = self.record()
        if record is None or not record.get("refresh_token"):
            return False
        await self._refresh(token or record["access_token"])
        return True

    async def finish_login(self, flow: LoginFlow, pasted: str) -> dict:
        """Parse the pasted code, exchange it, save the record; returns it."""
        code = parse_pasted_code(pasted, flow.state)
        record = await exchange_code(self.settings, code, flow, self.post_json, self.clock)
        self.save(record)
        return record

    def save(self, record: dict) -> None:
        """Store a new record (from login or import) and use it from now on."""
        self.store.save(record)
        self._cached = record
        self.last_error = None

    def logout(self) -> None:
        """Forget the saved token (an explicit env/--token token stays in force)."""
        self.store.clear()
        self._cached = None
        self.last_error = None

    def status(self) -> dict:
        """What GET /auth/status shows: never the token itself."""
        record = self.record() or {}
        expires_at = record.get("expires_at")
        return {"logged_in": bool(record),
                "source": record.get("source"),
                "expires_at": _iso(expires_at),
                "expires_in_seconds": None if expires_at is None else max(0, int(expires_at - self.clock())),
                "scopes": (record.get("scope") or "").split(),
                "refreshable": bool(record.get("refresh_token")),
                "last_error": self.last_error}


# ---- Importing Claude Code's credentials (PROTOCOLS.md A.10) ------------------------------

def _read_claude_code_oauth(path: str) -> dict:
    """The claudeAiOauth object of a Claude Code credentials file; BadRequest when unusable."""
    try:
        with open(os.path.expanduser(path), "r", encoding="utf-8") as f:
            document = json.load(f)
    except FileNotFoundError:
        raise BadRequest(f"no Claude Code credentials at {path}: log in with Claude Code first") from None
    except (OSError, ValueError) as exc:
        raise BadRequest(f"cannot read Claude Code credentials at {path}: {type(exc).__name__}") from None
    oauth = document.get("claudeAiOauth") if isinstance(document, dict) else None
    if not isinstance(oauth, dict) or not oauth.get("accessToken"):
        raise BadRequest(f"{path} holds no claudeAiOauth.accessToken")
    return oauth


def default_claude_credentials_path(env: Mapping[str, str]) -> str:
    """~/.claude/.credentials.json, or under CLAUDE_CONFIG_DIR."""
    base = env.get("CLAUDE_CONFIG_DIR") or os.path.join(os.path.expanduser("~"), ".claude")
    return os.path.join(base, ".credentials.json")


def import_claude_code_credentials(path: str, store: TokenStore) -> dict:
    """Copy Claude Code's access token (not its refresh token) into our store; returns the record.

    The refresh token is deliberately left behind: refresh tokens rotate on use, so spending
    Claude Code's would invalidate the one Claude Code holds and log it out. When the imported
    token expires (about 8 h), the user imports again (after Claude Code refreshed) or logs in."""
    oauth = _read_claude_code_oauth(path)
    expires_ms = oauth.get("expiresAt")
    expires_at = expiry_epoch(expires_ms, 1000)
    if expires_at is not None and expires_at <= store.clock():
        raise BadRequest("the Claude Code token has expired: run Claude Code once, then import again")
    scopes = oauth.get("scopes")
    record = {"access_token": oauth["accessToken"], "refresh_token": None, "expires_at": expires_at,
              "scope": " ".join(scopes) if isinstance(scopes, list) else None,
              "account": None, "source": "claude_code"}
    store.save(record)
    log.info("imported the Claude Code token, expires in %s", _lifetime(record, store.clock()))
    return record


OAUTH_TOKEN_SHAPE = re.compile(r"^sk-ant-oat01-[A-Za-z0-9_\-]{8,}$")
# Where the earlier proxies kept their login (read-only here): seed 003, then seed 000.
SEED_TOKEN_FILES = ("~/.config/anthropic-max-proxy/tokens.json", "~/.anthropic-claude-max-proxy/tokens.json")


def check_token_shape(token: str) -> str:
    """A Claude subscription token as `claude setup-token` prints it, or BadRequest saying why."""
    token = token.strip()
    if not OAUTH_TOKEN_SHAPE.match(token):
        kind = "an API key (use ANTHROPIC_API_KEY for it)" if token.startswith("sk-ant-api") else "not one"
        raise BadRequest(f"that is not a Claude subscription token (sk-ant-oat01-...; it is {kind})")
    return token


def seed_token_record(document: Any, path: str, now: float) -> dict:
    """Our token record from seed 000's or seed 003's tokens.json (expires_at in seconds; the
    refresh token comes along: the proxy takes over that login)."""
    if not isinstance(document, dict) or not isinstance(document.get("access_token"), str):
        raise BadRequest(f"{path} holds no access_token: not a token file claude_proxy can read")
    expires = document.get("expires_at")
    in_ms = isinstance(expires, (int, float)) and not isinstance(expires, bool) and expires > 1e12
    expires_at = expiry_epoch(expires, 1000 if in_ms else 1)
    refresh = document.get("refresh_token") if document.get("token_type") != "long_term" else None
    if expires_at is not None and expires_at <= now and not refresh:
        raise BadRequest(f"the token in {path} has expired and cannot be refreshed: log in again")
    source = "anthropic-claude-max-proxy" if "token_type" in document else "anthropic-max-proxy"
    return {"access_token": document["access_token"], "refresh_token": refresh, "expires_at": expires_at,
            "scope": None, "account": None, "source": f"import:{source}"}


def import_token_file(path: str, store: TokenStore) -> dict:
    """Import a saved login into our store, whatever wrote it: Claude Code's credentials, seed
    000's or seed 003's tokens.json, or another claude_proxy's token file. The file is only read."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as fh:
            document = json.load(fh)
    except FileNotFoundError:
        raise BadRequest(f"no token file at {path}") from None
    except (OSError, ValueError) as exc:
        raise BadRequest(f"cannot read {path}: {type(exc).__name__}") from None
    if isinstance(document, dict) and "claudeAiOauth" in document:
        return import_claude_code_credentials(path, store)
    if isinstance(document, dict) and isinstance(document.get("token"), dict):
        record = dict(document["token"], source="import:claude_proxy")
    else:
        record = seed_token_record(document, path, store.clock())
    store.save(record)
    return record


def seed_token_file() -> Optional[str]:
    """The first earlier proxy's token file found in its default place (seed 003's, then 000's)."""
    return next((p for p in SEED_TOKEN_FILES if os.path.isfile(os.path.expanduser(p))), None)


def default_token_file(env: Mapping[str, str]) -> Optional[str]:
    """The saved login `import` reads when no file is named: a seed's token file (by its env
    name or default place), else Claude Code's credentials."""
    named = [env.get(var) for var in SEED_ENV_ALIASES["import_token_file"]]
    candidates = [p for p in named if p] + [seed_token_file() or ""] + [default_claude_credentials_path(env)]
    return next((p for p in candidates if p and os.path.isfile(os.path.expanduser(p))), None)


# ---- Request shaping on the OAuth path (pure; PROTOCOLS.md A.8, B.1, B.2) -----------------

def _is_billing_header(block: Any) -> bool:
    """Whether a system block is Claude Code's per-request `x-anthropic-billing-header:` line."""
    return isinstance(block, dict) and str(block.get("text", "")).startswith(BILLING_HEADER_PREFIX)


def _is_identity(block: Any) -> bool:
    """Whether a system block is the Claude Code identity text."""
    return isinstance(block, dict) and block.get("type") == "text" \
        and str(block.get("text", "")).strip() == CLAUDE_CODE_IDENTITY


def with_identity(system: Any) -> List[dict]:
    """System blocks that start with the identity (after a leading billing-header block, if any).

    Newer Claude Code sends the billing header first and the identity second (A.8); that shape is
    accepted as is, and where the identity is missing it goes right after such a header, so the
    client's own block order is kept. The caller's text always follows the identity."""
    if system is None or system == "":
        blocks: List[dict] = []
    elif isinstance(system, str):
        blocks = [{"type": "text", "text": system}]
    elif isinstance(system, list):
        blocks = list(system)
    else:
        raise BadRequest("system must be a string or a list of text blocks", param="system")
    at = 1 if blocks and _is_billing_header(blocks[0]) else 0
    if len(blocks) > at and _is_identity(blocks[at]):
        return blocks
    return blocks[:at] + [{"type": "text", "text": CLAUDE_CODE_IDENTITY}] + blocks[at:]


def _count_marks(blocks: Any) -> int:
    """cache_control marks in a block list, including blocks nested in tool_result content."""
    if not isinstance(blocks, list):
        return 0
    return sum(("cache_control" in b) + _count_marks(b.get("content"))
               for b in blocks if isinstance(b, dict))


def cache_marks(node: Any) -> List[Any]:
    """Every cache_control value in a request, in processing order (tools, system, messages)."""
    if isinstance(node, list):
        return [mark for item in node for mark in cache_marks(item)]
    if not isinstance(node, dict):
        return []
    own = [node["cache_control"]] if "cache_control" in node else []
    keys = ("tools", "system", "messages") if "messages" in node else ("content",)
    return own + [mark for key in keys for mark in cache_marks(node.get(key))]


def count_cache_breakpoints(anthropic_body: dict) -> int:
    """Breakpoints the request already sets: top level, system, tools, message content."""
    messages = anthropic_body.get("messages") or []
    return (("cache_control" in anthropic_body) + _count_marks(anthropic_body.get("system"))
            + _count_marks(anthropic_body.get("tools"))
            + sum(_count_marks(m.get("content")) for m in messages if isinstance(m, dict)))


def _cacheable(block: Any) -> bool:
    """Whether a breakpoint may go on this block (not thinking, not empty text)."""
    if not isinstance(block, dict) or block.get("type") in UNCACHEABLE_BLOCK_TYPES:
        return False
    return block.get("type") != "text" or bool(str(block.get("text") or "").strip())


def _mark_last(blocks: List[Any]) -> Optional[List[Any]]:
    """A copy of `blocks` with the last cacheable block marked; None if nothing to mark."""
    for i in range(len(blocks) - 1, -1, -1):
        if _cacheable(blocks[i]):
            if "cache_control" in blocks[i]:
                return None
            return blocks[:i] + [{**blocks[i], "cache_control": {"type": "ephemeral"}}] + blocks[i + 1:]
    return None


def add_cache_breakpoints(anthropic_body: dict) -> dict:
    """A copy with ephemeral breakpoints on the last system block and the last two user turns,
    in that priority, counting the client's own so that there are never more than four."""
    body = dict(anthropic_body)
    if '"ttl":"1h"' in json_text(cache_marks(body)):
        return body        # a 5m mark before the client's 1h ones would be rejected (TTL order)
    budget = MAX_CACHE_BREAKPOINTS - count_cache_breakpoints(body)
    system = body.get("system")
    if budget > 0 and isinstance(system, list):
        marked = _mark_last(system)
        if marked is not None:
            body["system"], budget = marked, budget - 1
    messages = list(body.get("messages") or [])
    user_turns = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    for i in reversed(user_turns[-2:]):
        if budget <= 0:
            break
        marked = _mark_last(_as_blocks(messages[i].get("content")))
        if marked is not None:
            messages[i], budget = {**messages[i], "content": marked}, budget - 1
    if "messages" in body:
        body["messages"] = messages
    return body


def _split_betas(value: Optional[str]) -> List[str]:
    """A comma-separated anthropic-beta value as a list."""
    return [b.strip() for b in (value or "").split(",") if b.strip()]


def oauth_betas(client_beta: Optional[str], anthropic_body: dict, *, one_m: bool = False) -> str:
    """The anthropic-beta value: oauth first, the client's, then thinking/1M as needed; deduped."""
    betas = [OAUTH_BETA] + _split_betas(client_beta)
    thinking = anthropic_body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive"):
        betas.append(INTERLEAVED_THINKING_BETA)
    if one_m:
        betas.append(CONTEXT_1M_BETA)
    return ",".join(dict.fromkeys(betas))


def shape_oauth_request(anthropic_body: dict, client_headers: Dict[str, str], access_token: str,
                        *, one_m: bool = False) -> Tuple[dict, Dict[str, str]]:
    """The body and upstream headers for a subscription (OAuth) call; the input is not mutated."""
    lower = {k.lower(): v for k, v in (client_headers or {}).items()}
    body = dict(anthropic_body)
    body["system"] = with_identity(anthropic_body.get("system"))
    body = add_cache_breakpoints(body)
    headers = {"authorization": f"Bearer {access_token}",
               "anthropic-version": lower.get("anthropic-version") or ANTHROPIC_VERSION,
               "anthropic-beta": oauth_betas(lower.get("anthropic-beta"), body, one_m=one_m),
               "content-type": "application/json"}
    return body, headers

# ---- The proxy's side: one OAuthService per server, HTTP login, CLI login ------------------

TERMS_NOTICE = ("Note: Anthropic's terms restrict Claude Pro/Max subscription tokens to Anthropic's own "
                "clients, and Anthropic may reject or bill other use or act on the account. API keys "
                "(ANTHROPIC_API_KEY) are the supported way to use Claude through a proxy.")
MAX_PENDING_LOGINS = 8
PENDING_LOGIN_SECONDS = 600


class OAuthService:
    """The token manager of one server, plus the HTTP logins in progress."""

    def __init__(self, config: Config, pool: ConnectionPool, redactor: Redactor, *,
                 clock: Callable[[], float] = time.time):
        self.settings = oauth_settings(config.oauth)
        self.pool = pool
        self.redactor = redactor
        self.store = TokenStore(os.path.join(config.home, "oauth_token.json"), clock=clock)
        self.tokens = TokenManager(self.store, self.settings, self.post_json, clock=clock,
                                   explicit_token=config.settings.get("oauth_token"))
        self.pending: Dict[str, LoginFlow] = {}
        self.pending_since: Dict[str, float] = {}
        self.clock = clock

    async def post_json(self, url: str, payload: dict) -> Tuple[int, Any]:
        """The token endpoint call, over the shared upstream pool."""
        return await fetch_json(self.pool, url, payload, [("user-agent", f"claude_proxy/{VERSION}")])

    async def available(self) -> bool:
        """Whether a login or an explicit token exists."""
        return self.tokens.record() is not None

    async def access_token(self) -> str:
        """A valid token (refreshed when due), registered with the redactor."""
        token = await self.tokens.access_token()
        self.redactor.add(token)
        return token

    async def on_unauthorized(self, body_text: str, failed_token: Optional[str] = None) -> bool:
        """Refresh once when the upstream said the token expired (keyed on the token that failed)."""
        return await self.tokens.on_unauthorized(body_text, failed_token)

    def start_login(self, long_lived: bool = False) -> LoginFlow:
        """A new pending login. Nobody's pending login is ever evicted for it: past
        MAX_PENDING_LOGINS (each expiring after PENDING_LOGIN_SECONDS) a new one is a 429."""
        now = self.clock()
        for state, started in list(self.pending_since.items()):
            if now - started > PENDING_LOGIN_SECONDS:
                self.pending.pop(state, None)
                self.pending_since.pop(state, None)
        if len(self.pending) >= MAX_PENDING_LOGINS:
            raise ProxyError(f"{len(self.pending)} logins are already in progress; finish one or wait "
                             f"{PENDING_LOGIN_SECONDS // 60} minutes", status=429, error_type="rate_limit_error")
        flow = LoginFlow(self.settings, long_lived=long_lived)
        self.pending[flow.state] = flow
        self.pending_since[flow.state] = now
        return flow

    async def finish_login(self, pasted: str) -> dict:
        """Complete the pending login the pasted CODE#STATE (or callback URL) belongs to."""
        _, state = _split_pasted(pasted)
        flow = self.pending.get(state) if state else (
            next(iter(self.pending.values())) if len(self.pending) == 1 else None)
        if flow is None:
            raise BadRequest("no pending login matches this code: start again with GET /auth/start",
                             param="code")
        record = await self.tokens.finish_login(flow, pasted)
        self.pending.pop(flow.state, None)
        self.pending_since.pop(flow.state, None)
        self.redactor.add(record.get("access_token"))
        self.redactor.add(record.get("refresh_token"))
        return record


async def adopt_seed_login(config: Config, oauth: OAuthService) -> None:
    """When the proxy has no login of its own, an earlier proxy's token file is imported, read
    only: the one the environment names (ANTHROPIC_PROXY_TOKEN_FILE, TOKEN_FILE), else one in its
    default place (~/.config/anthropic-max-proxy, ~/.anthropic-claude-max-proxy). The seeds'
    users keep their login; the start says which file it was."""
    if await run_off_loop(oauth.tokens.record) is not None:
        return
    named = config.settings.get("import_token_file")
    path = named or await run_off_loop(seed_token_file)
    if not path:
        return
    where = config.origins.get("settings.import_token_file") if named else "found in its default place"
    try:
        record = await run_off_loop(import_token_file, path, oauth.store)
    except BadRequest as exc:
        log.warning("the login in %s (%s) was not imported: %s", path, where, exc.message)
        return
    oauth.tokens.save(record)
    log.info("Claude login: imported from %s, %s's (%s; the file is only read, as `python3 claude_proxy.py "
             "import %s` does), expires in %s%s", path, record["source"].split(":")[-1], where, path,
             _lifetime(record, oauth.clock()), "; claude_proxy refreshes it from now on" if record.get("refresh_token") else "")


def cli_error(message: str, stream: Any = None) -> None:
    """A command's failure, one line with the program's name once (messages made for clients
    already start with it)."""
    prefix = "" if message.startswith("claude_proxy:") else "claude_proxy: "
    print(prefix + message, file=stream or sys.stderr)


async def run_oauth_command(command: str, args: argparse.Namespace, config: Config,
                            env: Mapping[str, str]) -> int:
    """login / logout / status / import / import-claude-code / verify-login / refresh (the menu's),
    on a pool of their own."""
    pool = ConnectionPool(lambda: make_ssl_context(config.settings["ssl_verify"], config.settings["ca_bundle"]),
                          proxies_from_env(env), config.settings["connect_timeout"], 60.0)
    service = OAuthService(config, pool, Redactor())
    try:
        if command == "login":
            return await cli_login(service, args)
        if command == "verify-login":
            await adopt_seed_login(config, service)       # as serve would: a seed's token file first
            return await cli_verify_login(service)
        if command == "logout":
            had = service.store.load() is not None
            service.tokens.logout()
            print("Logged out: the saved Claude login is removed." if had else
                  f"There was no saved Claude login to remove ({service.store.path}).")
        elif command in ("import", "import-claude-code"):
            cli_import(service, command, getattr(args, "path", None), env)
        elif command == "refresh":
            await service.tokens.refresh_now()
            print("Token refreshed.")
        print(json.dumps(service.tokens.status(), indent=2))
        return 0
    finally:
        pool.close()


def cli_import(service: OAuthService, command: str, path: Optional[str], env: Mapping[str, str]) -> None:
    """`import [FILE]` (any saved login) and `import-claude-code [--path FILE]`."""
    if command == "import-claude-code":
        path = path or default_claude_credentials_path(env)
        record = import_claude_code_credentials(path, service.store)
    else:
        path = path or default_token_file(env)
        if path is None:
            raise BadRequest("no saved login found to import: name the file (`import FILE`)")
        record = import_token_file(path, service.store)
    print(f"Imported the login from {path} (expires {_iso(record.get('expires_at'))}); {path} was only read.")
    if record.get("source") == "claude_code":
        print("Its refresh token stays with Claude Code: import again when it expires.")
    elif record.get("refresh_token"):
        print("claude_proxy refreshes it from now on; the program that saved it will need a new login.")


# anthropic-claude-max-proxy's words when --headless finds no login (its cli/headless.py), our commands
NO_LOGIN_HELP = """Authentication Error: No authentication tokens found. Please login first (option 2)

To authenticate:
1. Run: python3 claude_proxy.py menu
2. Select option 2 to login (or run: python3 claude_proxy.py login)
3. Or set ANTHROPIC_OAUTH_TOKEN environment variable
4. Or use: python3 claude_proxy.py --headless --token "<your-token>"
5. Or take over a saved login (Claude Code's, another proxy's tokens.json): python3 claude_proxy.py import [FILE]"""


async def cli_verify_login(service: OAuthService) -> int:
    """--headless --no-auto-start: check (and refresh when due) the login, print it, serve nothing."""
    try:
        await service.access_token()
    except ProxyError as exc:
        cli_error(NO_LOGIN_HELP if service.tokens.record() is None else exc.message)
        return 1
    print(json.dumps(service.tokens.status(), indent=2))
    print("Auto-start disabled: the login is valid; the proxy was not started.")
    return 0


async def cli_login(service: OAuthService, args: argparse.Namespace) -> int:
    """The terminal login: print the URL, open a browser, read CODE#STATE from stdin."""
    print(TERMS_NOTICE + "\n")
    token = getattr(args, "token", None)
    if token:
        service.tokens.save(dict(explicit_token_record(check_token_shape(token)), source="long_lived"))
        print(f"Saved the token in {service.store.path}.")
        return 0
    long_lived = bool(getattr(args, "long_lived", False))
    flow = service.start_login(long_lived)
    url = flow.authorize_url(service.settings)
    print("Open this URL, approve, and paste the code shown (CODE#STATE):\n\n  " + url + "\n")
    if not getattr(args, "no_browser", False):
        open_browser(url)
    pasted = await asyncio.get_running_loop().run_in_executor(None, read_line, "Code: ")
    record = await service.finish_login(pasted)
    print(f"Logged in; token saved in {service.store.path} (expires {_iso(record.get('expires_at'))}).")
    if long_lived:
        print("\nYour long-lived token (shown once; set ANTHROPIC_OAUTH_TOKEN on other machines):\n\n  "
              + record["access_token"] + "\n")
    return 0


def read_line(prompt: str) -> str:
    """One line from stdin (run in a thread: input() blocks)."""
    try:
        return input(prompt)
    except EOFError:
        raise BadRequest("no code given") from None


def open_browser(url: str) -> None:
    """Best effort: there may be no browser at all."""
    try:
        import webbrowser
        webbrowser.open(url)
    except Exception:  # noqa: BLE001 - a missing browser must never break login
        log.debug("could not open a browser")


# =============================================================================================
# 11. Routing and handlers
#
# A handler reads as a list of named steps: parse the body, route the model, build the upstream
# call, send it (retries, fallbacks, OAuth refresh), then relay or convert the answer. Errors are
# raised, never rendered here: dispatch() is the one per-request boundary that renders them in
# the client's dialect (and, once a stream has started, as one error event before closing).
# =============================================================================================

REASONING_VARIANTS = ("-reasoning-low", "-reasoning-medium", "-reasoning-high")
MODEL_CREATED_AT = "2025-01-01T00:00:00Z"   # for models whose upstream does not say (no dates in the table)
DEFAULT_MODELS_LIMIT = 20                    # Anthropic's page size for GET /v1/models
_NOTE_INDEX = re.compile(r"\.\d+(?=\.|$)")
SSE_RESPONSE_HEADERS = [("content-type", "text/event-stream; charset=utf-8"),
                        ("cache-control", "no-cache"), ("x-accel-buffering", "no")]


class Target:
    """Where one request goes: the model spec (upstream name filled in), its provider, the route."""

    def __init__(self, spec: dict, provider: dict, route: str, effort: Optional[str] = None,
                 one_m: bool = False):
        self.spec = spec
        self.provider = provider
        self.route = route
        self.effort = effort
        self.one_m = one_m

    def describe(self) -> str:
        """For the access log: route -> provider/model."""
        return f"{self.route}->{self.provider['name']}/{self.spec['model']}"

    def facts(self) -> Dict[str, Any]:
        """The upstream model's facts: the model table, the config entry overriding."""
        return model_facts(self.spec["model"] or "", self.spec)


def route_alias(route: str) -> str:
    """The claude-* name that picks a route by name (what gateway model discovery lists for it)."""
    return route if route.lower().startswith("claude") else "claude-" + route


def pick_route(config: Config, requested: str, *, thinking: bool = False,
               input_tokens: int = 0) -> Tuple[str, dict]:
    """(route name, spec) for a requested model name: exact id, then the routes table."""
    if requested in config.models:
        return "model", config.models[requested]
    routes, lower = config.routes, requested.lower()
    if input_tokens > config.settings["long_context_threshold"] and "long_context" in routes:
        return "long_context", routes["long_context"]      # first: a long think request overflows
    named = next((name for name in routes if route_alias(name).lower() == lower), None)
    if named is not None:
        return named, routes[named]
    if thinking and "think" in routes:
        return "think", routes["think"]
    if "haiku" in lower and "background" in routes:
        return "background", routes["background"]
    for name, spec in routes.items():
        if name not in SPECIAL_ROUTES and name.lower() in lower:
            return name, spec
    if "default" in routes:
        return "default", routes["default"]
    names = [name for name in routes if name not in SPECIAL_ROUTES]
    raise NotFound(f"model {requested!r} is not configured; configured models: {', '.join(config.models) or '(none)'}"
                   + (f"; routes: {', '.join(names)} (a model name containing one goes there)" if names else ""),
                   param="model")


def resolve_target(config: Config, requested: str, *, thinking: bool = False, input_tokens: int = 0) -> Target:
    """Route a model name in any dialect. A configured id is taken as it is; otherwise the
    `[1m]`, `-1m` and `-reasoning-<effort>` suffixes come off (the effort turns thinking on,
    so `think` applies) and an alias (MODEL_ALIASES and the config's `aliases`) names the model
    that is routed, and sent upstream where the route passes the name through."""
    if requested in config.models:
        base, effort, one_m = requested, None, False
    else:
        base, effort, one_m = parse_model_variant(requested)
        base = config.aliases.get(base.lower(), base)
    route, spec = pick_route(config, base, thinking=thinking or effort is not None, input_tokens=input_tokens)
    if spec["model"] is None:
        spec = dict(spec, id=base, model=base)
    return Target(spec, config.providers[spec["provider"]], route, effort, one_m)


def resolve_openai_target(config: Config, requested: str, thinking: bool = False) -> Target:
    """resolve_target for an OpenAI client (the same rules: one name space for all dialects)."""
    return resolve_target(config, requested, thinking=thinking)


def takes_mid_system(target: Target) -> bool:
    """Whether the upstream model takes role "system" messages mid-conversation (the model table,
    else the provider's switch)."""
    facts = target.facts()["mid_system"]
    return bool(target.provider.get("mid_system") if facts is None else facts)


def upstream_spec(target: Target) -> dict:
    """The spec an openai-format request is converted with: the provider's switches (mid_system,
    prompt_cache_key, replay_reasoning) where the model sets none, replay_reasoning also by model
    name (REPLAY_REASONING_MODELS: thinking modes that need their reasoning back)."""
    spec, provider = target.spec, target.provider
    filled = {key: provider.get(key) for key in ("mid_system", "prompt_cache_key", "replay_reasoning")
              if spec.get(key) is None}
    model = (spec.get("model") or "").lower()
    if filled.get("replay_reasoning") is None and "replay_reasoning" in filled \
            and any(word in model for word in REPLAY_REASONING_MODELS):
        filled["replay_reasoning"] = "reasoning_content"
    return dict(spec, **filled)


def offered_key(req: Request) -> str:
    """The key a client sent as x-api-key or Bearer token ("" when none)."""
    offered = req.headers.get("x-api-key") or req.headers.get("authorization", "")
    return (offered[7:] if offered.lower().startswith("bearer ") else offered).strip()


CLIENT_SESSION_HEADERS = ("x-claude-code-session-id", "session-id")     # Claude Code's, Codex's
MAX_SESSION_ID = 128


def client_session_id(headers: Headers) -> Optional[str]:
    """The session id a client sends in its own header (for the ledger and `statusline`)."""
    for name in CLIENT_SESSION_HEADERS:
        value = headers.get(name)
        if value:
            return value[:MAX_SESSION_ID]
    return None


def session_key(headers: Headers, anthropic_body: dict) -> Optional[str]:
    """A stable prompt_cache_key for the client's session (Claude Code's x-claude-code-session-id, else
    the session in metadata.user_id), hashed so no client identifier travels upstream."""
    value = headers.get("x-claude-code-session-id")
    metadata = anthropic_body.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not value and isinstance(user_id, str) and user_id:
        try:
            parsed = loads_json(user_id)
        except ValueError:
            parsed = None
        value = parsed.get("session_id") if isinstance(parsed, dict) and parsed.get("session_id") else user_id
    return hashlib.sha256(str(value).encode("utf-8")).hexdigest()[:32] if value else None


class DropLog:
    """Says once per process, at INFO, that a kind of request field is dropped or rewritten and why
    (the converters' notes; each one is also a DEBUG line with its full path)."""

    def __init__(self) -> None:
        self._said: set = set()

    def say(self, notes: Notes, where: str) -> None:
        """INFO for each kind of note not said before in this process."""
        for path, why in notes:
            kind = _NOTE_INDEX.sub(".*", path)
            if kind not in self._said:
                self._said.add(kind)
                log.info("%s: %s (%s; said once, LOG_LEVEL=DEBUG shows each)", kind, why, where)


def require_fields(body: Any, fields: Dict[str, type], dialect: str) -> dict:
    """BadRequest naming the first missing or mistyped field."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    for name, kind in fields.items():
        if name not in body:
            raise BadRequest(f"{name}: field required", param=name)
        if not isinstance(body[name], kind) or isinstance(body[name], bool) and kind is int:
            raise BadRequest(f"{name}: expected {kind.__name__}", param=name)
    return body


def upstream_error_detail(raw: bytes, scrub: Callable[[str], str] = str) -> Tuple[Optional[str], str]:
    """(error type, message) from an upstream error body in either dialect, or its text (scrubbed
    by `scrub` before a long text is cut to 300 characters)."""
    try:
        body = loads_json(raw)
    except ValueError:
        return None, scrub(raw.decode("utf-8", "replace")).strip()[:300] or "upstream error"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return error.get("type") or error.get("code"), scrub(str(error.get("message") or error))
    if isinstance(error, str):
        return error, scrub(str(body.get("error_description") or body.get("message") or error))
    return None, scrub(json_text(body))[:300]


def anthropic_error_body(exc: ProxyError, request_id: str) -> dict:
    """Anthropic's error envelope (it has no `param`: the message names the field)."""
    message = exc.message
    if exc.param and not message.startswith(exc.param):
        message = f"{exc.param}: {message}"
    return {"type": "error", "error": {"type": exc.error_type, "message": message},
            "request_id": request_id}


def openai_error_body(exc: ProxyError) -> dict:
    """OpenAI's error envelope."""
    return {"error": {"message": exc.message, "type": exc.error_type, "param": exc.param,
                      "code": getattr(exc, "code", None)}}


_CONTEXT_OVERFLOW = re.compile(r"context[_ ]length|context window|maximum context|too many tokens|"
                               r"prompt is too long|reduce the length", re.IGNORECASE)


def error_from_upstream(exc: UpstreamStatus) -> ProxyError:
    """An upstream HTTP error as a ProxyError keeping its status and message. A context overflow
    is worded as Anthropic words it ("prompt is too long"), which Claude Code compacts on."""
    kind, message = upstream_error_detail(exc.body)
    error_type = ERROR_TYPE_BY_STATUS.get(exc.status) or kind or "api_error"
    if exc.status == 400 and (_CONTEXT_OVERFLOW.search(message) or kind == "context_length_exceeded") \
            and not message.startswith("prompt is too long"):
        message = f"prompt is too long: {message}"
    return ProxyError(message, status=exc.status, error_type=error_type)


def forwarded_client_headers(client_headers: Headers) -> List[Tuple[str, str]]:
    """The client's headers an anthropic-format upstream gets: the allow-list only."""
    return [(k, v) for k, v in client_headers.items()
            if k in CLIENT_HEADERS_FORWARDED or k.startswith(CLIENT_HEADER_PREFIXES_FORWARDED)]


def relayed_headers(upstream_headers: Headers) -> List[Tuple[str, str]]:
    """The upstream response headers that matter to a client: ids, retry hints, rate limits."""
    return [(k, v) for k, v in upstream_headers.items()
            if k in RELAYED_HEADERS or k.startswith(RELAYED_PREFIXES)]


def retry_after_seconds(headers: Headers, now: Optional[float] = None) -> Optional[float]:
    """The upstream's wait hint: retry-after-ms, else retry-after in seconds or as an HTTP-date,
    at most MAX_RETRY_AFTER; a past date or a negative number is 0; None when absent or
    unreadable (NaN, inf, a date no calendar has), so the caller backs off on its own."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        text = headers.get(name, "").strip()
        try:
            seconds = float(text) * scale
        except ValueError:
            seconds = http_date_seconds(text, time.time() if now is None else now) if scale == 1.0 and text else None
        if seconds is not None and seconds == seconds and abs(seconds) != float("inf"):
            return min(MAX_RETRY_AFTER, max(0.0, seconds))
    return None


def http_date_seconds(text: str, now: float) -> Optional[float]:
    """Seconds from now until an HTTP-date (RFC 9110 5.6.7); None when it is not one."""
    import email.utils
    try:
        return email.utils.parsedate_to_datetime(text).timestamp() - now
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def retry_delay(headers: Headers, attempt: int, rand: Callable[[], float] = random.random) -> float:
    """retry-after-ms / retry-after when given and readable, else exponential backoff with jitter."""
    hint = retry_after_seconds(headers)
    return hint if hint is not None else min(8.0, 0.5 * 2 ** min(attempt, 5)) * (0.75 + 0.5 * rand())


class ReplayResponse(UpstreamResponse):
    """An upstream response whose body was already read (kept to relay it)."""

    def __init__(self, original: UpstreamResponse, body: bytes):  # noqa: super not called on purpose
        self.status, self.headers, self.done = original.status, original.headers, True
        self._body = body

    async def iter_body(self) -> AsyncIterator[bytes]:
        yield self._body

    def close(self) -> None:
        pass


END_OF_STREAM = ("", "[DONE]")


async def drain_rest(body: AsyncIterator[bytes], timeout: float = 0.5) -> None:
    """Read what the upstream still sends after the answer ended, so its connection is reused."""
    async def consume() -> None:
        async for _ in body:
            pass
    try:
        await asyncio.wait_for(consume(), timeout)
    except (asyncio.TimeoutError, UpstreamError):
        pass


def close_stages(stages: List[Any]) -> bytes:
    """The bytes byte stages (feed/close) still hold at the end of a stream, each through the next."""
    out = b""
    for stage in stages:
        out = stage.feed(out) + stage.close()
    return out


def feed_events(machine: Any, events: List[Any], parsed: bool = False) -> List[Any]:
    """Feed upstream events (SSE (event, data) pairs, or dicts when parsed) to a converter;
    [DONE] closes it; an event of a shape the converter cannot take is a MalformedStream holding
    what the events before it converted to."""
    out: List[Any] = []
    try:
        for event in events:
            if parsed:
                out += machine.feed(event)
            elif event[1] == "[DONE]":
                out += machine.close()
            else:
                upstream_event = loads_event(event[1])
                if isinstance(upstream_event, dict):
                    out += machine.feed(upstream_event)
        if parsed:
            out += machine.close()
    except SHAPE_ERRORS as exc:
        raise MalformedStream(f"upstream sent a malformed stream event ({exc.__class__.__name__})", out) from None
    return out


def add_beta(headers: List[Tuple[str, str]], beta: Optional[str]) -> List[Tuple[str, str]]:
    """Add one anthropic-beta value (merged, no duplicates)."""
    if not beta:
        return headers
    current = [v for k, v in headers if k == "anthropic-beta"]
    values = [b.strip() for b in ",".join(current).split(",") if b.strip()]
    if beta not in values:
        values.append(beta)
    return [(k, v) for k, v in headers if k != "anthropic-beta"] + [("anthropic-beta", ",".join(values))]


def merge_headers(headers: List[Tuple[str, str]], *extra: Dict[str, str]) -> List[Tuple[str, str]]:
    """Configured headers (provider, then model) override the computed ones."""
    for more in extra:
        if more:
            headers = [(k, v) for k, v in headers if k not in more] + list(more.items())
    return headers


SHAPE_ERRORS = (TypeError, AttributeError, KeyError, ValueError, IndexError)


def convert(error: type, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run a converter; a shape it did not expect is the sender's fault: BadRequest for a
    client's request, UpstreamError for an upstream's answer (never a 500)."""
    try:
        return fn(*args, **kw)
    except SHAPE_ERRORS as exc:
        log.debug("converter %s failed on %s: %r", fn.__name__, what, exc)
        raise error(f"malformed {what}: {exc.__class__.__name__}: {exc}") from None


def parse_upstream_json(raw: bytes) -> dict:
    """An upstream's JSON answer, or UpstreamError (never the client's fault)."""
    try:
        body = loads_json(raw)
    except ValueError:
        raise UpstreamError("upstream answered with invalid JSON") from None
    if not isinstance(body, dict):
        raise UpstreamError("upstream answered with unexpected JSON")
    return body


# ---- Usage of one request: a meter the relay paths feed -------------------------------------
#
# Every path feeds the meter from what the upstream sent: a non-streaming body's `usage`, or, in
# a stream, the few data lines holding a non-null "usage" (Anthropic message_start and
# message_delta, OpenAI's usage chunk, a Responses response.completed). UsageScanner finds them
# with one bytes.find per relayed chunk; nothing else is parsed. The JSON encoding of a string
# escapes its quotes, so `"usage"` followed by an object occurs only as a real key. One usage
# object may be any of three shapes (USAGE_SHAPES); the meter keeps Anthropic's meaning of
# input_tokens (cache reads and writes excluded) and merges key by key, last value winning,
# because Anthropic's message_delta repeats only what changed.

USAGE_MARKER = b'"usage"'
MAX_SCAN_LINE = 1 << 20            # a longer partial line is not kept for the scan
METER_FIELDS = ("input_tokens", "output_tokens", "cache_read_input_tokens",
                "cache_creation_input_tokens", "reasoning_tokens")


def usage_shape(usage: dict) -> str:
    """Which API's usage object this is: "openai" (chat), "responses" or "anthropic"."""
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        return "openai"
    if "input_tokens_details" in usage or ("output_tokens_details" in usage and "total_tokens" in usage):
        return "responses"
    return "anthropic"


def _detail(usage: dict, key: str, field: str) -> Optional[int]:
    """usage[key][field] when present."""
    details = usage.get(key)
    return details.get(field) if isinstance(details, dict) else None


def _openai_fields(usage: dict) -> Dict[str, Any]:
    """Chat Completions usage in the meter's fields."""
    fields: Dict[str, Any] = dict(anthropic_usage_from_openai(usage))
    fields["reasoning_tokens"] = _detail(usage, "completion_tokens_details", "reasoning_tokens") or 0
    return fields


def _responses_fields(usage: dict) -> Dict[str, Any]:
    """Responses API usage (input_tokens includes cached ones) in the meter's fields."""
    cached = _detail(usage, "input_tokens_details", "cached_tokens") or 0
    return {"input_tokens": max((usage.get("input_tokens") or 0) - cached, 0),
            "output_tokens": usage.get("output_tokens") or 0, "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
            "reasoning_tokens": _detail(usage, "output_tokens_details", "reasoning_tokens") or 0}


def _anthropic_fields(usage: dict) -> Dict[str, Any]:
    """Anthropic usage in the meter's fields: only the keys present (message_delta is partial);
    the server's web searches too (for /metrics)."""
    fields = {k: usage[k] for k in METER_FIELDS if k in usage}
    thinking = _detail(usage, "output_tokens_details", "thinking_tokens")
    if thinking is not None:
        fields["reasoning_tokens"] = thinking
    searches = _detail(usage, "server_tool_use", "web_search_requests")
    if searches is not None:
        fields["web_search_requests"] = searches
    return fields


USAGE_SHAPES: Dict[str, Callable[[dict], Dict[str, Any]]] = {
    "openai": _openai_fields, "responses": _responses_fields, "anthropic": _anthropic_fields}


class UsageMeter:
    """What one request used: tokens (None until the upstream reported usage) and first byte."""

    __slots__ = METER_FIELDS + ("web_search_requests", "requested", "seen", "first_byte_at", "key")

    def __init__(self) -> None:
        for name in METER_FIELDS:
            setattr(self, name, 0)
        self.web_search_requests = 0
        self.requested: Optional[str] = None     # the model the client asked for; None: not metered
        self.seen = False
        self.first_byte_at: Optional[float] = None
        self.key: Optional[str] = None           # masked provider key, for a key pool to fill

    def take(self, usage: Any) -> None:
        """Merge one usage object of any dialect."""
        if not isinstance(usage, dict):
            return
        for name, value in USAGE_SHAPES[usage_shape(usage)](usage).items():
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, value)
        self.seen = True

    def take_body(self, raw: bytes) -> None:
        """The usage of a whole JSON answer (ignored when it is not JSON)."""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return
        if isinstance(body, dict):
            self.take(body.get("usage") or (body.get("response") or {}).get("usage"))

    def tokens(self) -> Tuple[Optional[int], ...]:
        """The five counters (METER_FIELDS order), or Nones when the upstream reported no usage."""
        if not self.seen:
            return (None,) * 5
        return (self.input_tokens, self.output_tokens, self.cache_read_input_tokens,
                self.cache_creation_input_tokens, self.reasoning_tokens)


def _event_usage(event: Any) -> Any:
    """The usage object of one stream event: at its top, or in its message / response (Groq:
    x_groq)."""
    if not isinstance(event, dict):
        return None
    usage = event.get("usage")
    if usage is None:
        inner = event.get("message") or event.get("response") or event.get("x_groq")
        usage = inner.get("usage") if isinstance(inner, dict) else None
    return usage


class UsageScanner:
    """Feeds a meter from relayed SSE bytes, parsing only data lines that hold a usage object."""

    def __init__(self, meter: UsageMeter, clock: Callable[[], float] = time.monotonic):
        self.meter = meter
        self.clock = clock
        self._tail = b""

    def feed(self, data: bytes) -> None:
        """Scan one relayed chunk (any split); the first one marks the first byte."""
        if self.meter.first_byte_at is None:
            self.meter.first_byte_at = self.clock()
        buf = self._tail + data if self._tail else data
        end = buf.rfind(b"\n") + 1
        self._tail = buf[end:] if end < len(buf) and len(buf) - end < MAX_SCAN_LINE else b""
        at = buf.find(USAGE_MARKER, 0, end)
        while at >= 0:
            if buf.startswith(b":null", at + len(USAGE_MARKER)):     # OpenAI's, on every chunk
                at = buf.find(USAGE_MARKER, at + len(USAGE_MARKER), end)
            else:
                at = buf.find(USAGE_MARKER, self._take_line(buf, at), end)

    def _take_line(self, buf: bytes, at: int) -> int:
        """Parse the data line holding the marker at `at` if its value is an object; returns
        where to search on."""
        after = at + len(USAGE_MARKER)
        line_end = buf.find(b"\n", after)
        if not buf[after:after + 16].lstrip(b" \t:").startswith(b"{"):
            return after
        line = buf[buf.rfind(b"\n", 0, at) + 1:line_end].rstrip(b"\r")
        if line.startswith(b"data:"):
            try:
                self.meter.take(_event_usage(loads_event(line[5:].strip().decode("utf-8"))))
            except (ValueError, UnicodeDecodeError):
                pass
        return line_end


class Relay:
    """Writes SSE to the client; sends comment keep-alives while the upstream is quiet."""

    def __init__(self, out: ClientStream, interval: float):
        self.out = out
        self.interval = interval
        self._task: Optional[asyncio.Task] = None

    def start(self, status: int, headers: List[Tuple[str, str]]) -> None:
        """Open the chunked response and the keep-alive ticker."""
        self.out.start(status, headers)
        if self.interval > 0:
            self._task = asyncio.ensure_future(self._keepalive())

    async def send(self, data: bytes) -> None:
        """Relay bytes (the stream remembers whether they end on an event boundary)."""
        await self.out.send(data)

    async def _keepalive(self) -> None:
        """A comment once the stream was quiet for an interval (checked a quarter interval at a
        time against the bytes sent, so the relayed chunks themselves carry no clock reads)."""
        out, step = self.out, self.interval / 4
        sent, quiet = out.bytes_sent, 0.0
        while True:
            await asyncio.sleep(step)
            quiet = quiet + step if out.bytes_sent == sent else 0.0
            sent = out.bytes_sent
            if quiet >= self.interval and out.at_boundary:
                try:
                    await out.send(SSE_KEEPALIVE)
                except ConnectionError:
                    return                      # the client left; the relay notices on its own
                sent, quiet = out.bytes_sent, 0.0

    async def error(self, event: bytes) -> None:
        """One error event (after a partial event, a blank line first)."""
        await self.out.send(event if self.out.at_boundary else b"\n\n" + event)

    def stop(self) -> None:
        """Stop the ticker."""
        if self._task:
            self._task.cancel()
            self._task = None


class ModelLists:
    """The anthropic-format providers' own model lists, each kept MODELS_TTL seconds (a failed
    fetch too, as an empty list, so a provider that is down does not slow every listing); the
    first failure of each provider is logged at WARNING, later ones at DEBUG."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._lists: Dict[Tuple[str, str], Tuple[float, List[dict]]] = {}
        self._failed: set = set()

    def get(self, key: Tuple[str, str]) -> Optional[List[dict]]:
        """A list still fresh, or None."""
        entry = self._lists.get(key)
        return entry[1] if entry and entry[0] > self.clock() else None

    def put(self, key: Tuple[str, str], models: List[dict]) -> None:
        """Keep a list for MODELS_TTL seconds (the oldest forgotten past MAX_MODEL_LISTS: clients'
        own keys each make one)."""
        self._lists.pop(key, None)
        self._lists[key] = (self.clock() + MODELS_TTL, models)
        if len(self._lists) > MAX_MODEL_LISTS:
            self._lists.pop(next(iter(self._lists)))

    def failed(self, provider: str, why: str) -> None:
        """Log a provider's failed listing: WARNING the first time, DEBUG after."""
        level = logging.DEBUG if provider in self._failed else logging.WARNING
        self._failed.add(provider)
        log.log(level, "provider %s: its model list is unavailable (%s); listing without it", provider, why)


# ---- Key pools: several API keys per provider -----------------------------------------------
#
# A provider with two or more keys gets a KeyPool. A client session (Claude Code's session id, else
# metadata.user_id, else the key the client sent) stays on one key while that key is healthy,
# so the upstream's prompt cache, which is per key or account, keeps hitting; new sessions take
# the first healthy key (fill_first) or the next in turn (round_robin). A 429 or 529 cools the
# key down for the upstream's retry-after (else 1, 2, 4 ... 60 s; at most MAX_RETRY_AFTER). An
# answer about the key itself disables it until the next config reload: a 401, or a 403 whose
# error type or message says the key is invalid, revoked or expired. Any other 403 (moderation,
# a model the workspace may not use, a region) is that request's answer, relayed as it is. Either
# way the request moves to the next healthy key at once, before any byte reached the client, as
# one of its MAX_RETRIES; one request disables at most one key (a second key's 401 is its answer),
# so no single request can empty the pool. With every key cooling, the client gets the 429 with
# the shortest wait. Cooldowns live in this process only.

KEY_COOLDOWN_STATUS = frozenset((429, 529))
# A 403 is about the key when its error type / code is one of these, or its message says so.
KEY_REJECTED_TYPES = frozenset(("authentication_error", "invalid_api_key", "api_key_invalid", "invalid_key",
                                "unauthenticated", "unauthorized", "key_revoked", "key_expired"))
_KEY_STATES = r"invalid|not valid|incorrect|revoked|expired|disabled|suspended|deleted|deactivated|unknown|wrong"
KEY_REJECTED_TEXT = re.compile(rf"(?i)\b(?:api[ _-]?)?key\b[^.]{{0,40}}?\b(?:{_KEY_STATES})\b"
                               rf"|\b(?:{_KEY_STATES})\b[^.]{{0,20}}?\b(?:api[ _-]?)?key\b")
MAX_KEY_SESSIONS = 10000                     # session -> key bindings kept (oldest forgotten)


class PoolKey:
    """One key of a pool and what happened to it."""
    __slots__ = ("key", "label", "cooling_until", "disabled", "requests", "last_error", "strikes")

    def __init__(self, key: str):
        self.key, self.label = key, key_label(key)
        self.cooling_until, self.disabled, self.requests, self.strikes = 0.0, False, 0, 0
        self.last_error: Optional[str] = None


class KeyPool:
    """A provider's API keys (see the essay above)."""

    def __init__(self, provider: dict, clock: Callable[[], float] = time.monotonic):
        self.name, self.strategy, self.clock = provider["name"], provider["key_strategy"], clock
        self.keys = [PoolKey(key) for key in provider["api_keys"]]
        self._turn = 0
        self._sessions: Dict[str, PoolKey] = {}

    def healthy(self, key: PoolKey) -> bool:
        """Not disabled and not cooling down."""
        return not key.disabled and key.cooling_until <= self.clock()

    def choose(self, session: Optional[str]) -> Optional[PoolKey]:
        """The session's key while it is healthy, else a new one by the strategy (None: all out)."""
        bound = self._sessions.get(session) if session else None
        if bound is not None and self.healthy(bound):
            return bound
        key = self._pick()
        if key is not None and session:
            self._sessions.pop(session, None)
            self._sessions[session] = key
            if len(self._sessions) > MAX_KEY_SESSIONS:
                self._sessions.pop(next(iter(self._sessions)))
        return key

    def _pick(self) -> Optional[PoolKey]:
        """The first healthy key (fill_first) or the next healthy one in turn (round_robin)."""
        count = len(self.keys)
        start = self._turn if self.strategy == "round_robin" else 0
        for offset in range(count):
            key = self.keys[(start + offset) % count]
            if self.healthy(key):
                self._turn = (start + offset + 1) % count
                return key
        return None

    def report(self, key: PoolKey, status: int, headers: Headers, rejected: bool = False) -> bool:
        """Take the upstream's answer to a request on `key` (`rejected`: it says the key itself is
        bad, key_rejected()); True when the key is now out."""
        key.requests += 1
        if status in KEY_COOLDOWN_STATUS:
            key.strikes += 1
            wait = retry_after_seconds(headers)
            wait = min(60.0, 2.0 ** min(key.strikes - 1, 6)) if wait is None else wait
            key.cooling_until, key.last_error = self.clock() + wait, f"{status} at {iso_time(time.time())}"
            log.info("provider %s: key %s answered %d; cooling down for %.0fs", self.name, key.label, status, wait)
            return True
        if rejected:
            key.disabled, key.last_error = True, f"{status}: disabled until the config is reloaded"
            log.warning("provider %s: key %s answered %d; disabled until the next config reload",
                        self.name, key.label, status)
            return True
        key.strikes = 0
        return False

    def shortest_wait(self) -> Optional[float]:
        """Seconds until the first cooling key is back; None when none will come back."""
        waits = [k.cooling_until - self.clock() for k in self.keys if not k.disabled]
        return max(0.0, min(waits)) if waits else None

    def snapshot(self) -> List[dict]:
        """Per-key state for /v1/stats and the status page (keys by their last four only)."""
        now, wall = self.clock(), time.time()
        return [{"key": k.label, "state": "disabled" if k.disabled else "cooling" if k.cooling_until > now else "healthy",
                 "cooling_until": iso_time(wall + k.cooling_until - now) if k.cooling_until > now and not k.disabled else None,
                 "requests": k.requests, "last_error": k.last_error} for k in self.keys]


def key_rejected(status: int, body: bytes) -> bool:
    """Whether an upstream answer says the key itself is bad: any 401, or a 403 whose error type
    or message is about the key (not a moderation, model-access or region 403)."""
    if status != 403:
        return status == 401
    kind, message = upstream_error_detail(body)
    return str(kind).lower() in KEY_REJECTED_TYPES or bool(KEY_REJECTED_TEXT.search(message))


def key_pools_for(config: Config) -> Dict[str, KeyPool]:
    """A pool for every provider with two or more keys."""
    return {name: KeyPool(p) for name, p in config.providers.items() if len(p.get("api_keys") or []) > 1}


def all_keys_cooling(pool: KeyPool, dialect: str) -> UpstreamStatus:
    """The 429 a client gets when every key of the pool is cooling down (or disabled)."""
    wait = pool.shortest_wait()
    message = (f"every API key of provider {pool.name!r} is rate limited; retry in {wait:.0f}s" if wait is not None
               else f"every API key of provider {pool.name!r} was rejected (401/403); fix the keys and reload")
    body = {"type": "error", "error": {"type": "rate_limit_error", "message": message}} if dialect == "anthropic" \
        else {"error": {"message": message, "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}}
    headers = {"retry-after": str(max(1, int(wait + 0.999)))} if wait is not None else {"x-should-retry": "false"}
    return UpstreamStatus(429 if wait is not None else 401, headers, json_bytes(body))


def effective_auth(server: "ProxyServer", provider: dict, logged_in: bool) -> str:
    """The auth mode a provider's requests use: `auto` is the Claude login (when there is one,
    the host is Anthropic's or this machine, and the proxy is not exposed without a key), else
    the provider's key, else the client's own."""
    if provider["auth"] != "auto":
        return provider["auth"]
    if logged_in and not server.exposed and provider["oauth_trusted"]:
        return "oauth"
    return "api_key" if provider.get("api_key") else "client"


class Exchange:
    """One request's context: the server, the request, the response stream, what was decided."""

    def __init__(self, server: "ProxyServer", req: Request, out: ClientStream):
        self.server = server
        self.config = server.config
        self.req = req
        self.out = out
        self.target: Optional[Target] = None
        self.upstream_status: Optional[int] = None
        self.relay: Optional[Relay] = None
        self.oauth_used = False
        self.plugins = server.plugins          # this config generation's hooks; None: no plugin
        self.meter = UsageMeter()
        self.error: Optional[ProxyError] = None
        self.stream_error: Optional[Callable[[ProxyError], bytes]] = None  # an error in the stream's own grammar
        self.key_pools = server.key_pools       # this config generation's key pools
        self.pool_key: Optional[Tuple[KeyPool, PoolKey]] = None     # the pooled key of the last call
        self.key_disabled = False               # this request already disabled a pooled key
        self.session: Optional[str] = None      # the client session, for key affinity
        self.work_bytes = len(req.body)         # the request's size with what stored items add to it

    # -- work off the loop ----------------------------------------------------------------------

    async def run(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """fn(*args) now, or in a worker thread when the request is large (its body, or what a
        stored conversation adds: work_bytes), so that no one request's parsing or conversion
        holds the event loop (and every other client)."""
        if self.work_bytes < OFF_LOOP_BODY_BYTES:
            return fn(*args, **kw)
        return await run_off_loop(lambda: fn(*args, **kw))

    async def json_body(self, fields: Dict[str, type]) -> dict:
        """The request body parsed (off the loop when large), required fields checked; the client
        session is noted (key affinity)."""
        body = require_fields(await self.run(parse_json_body, self.req.body), fields, self.req.dialect)
        if "model" in fields and len(body["model"]) > MAX_MODEL_NAME:
            raise BadRequest(f"model: a name of {len(body['model'])} characters; at most {MAX_MODEL_NAME} "
                             "are accepted", param="model")
        self.session = session_key(self.req.headers, body) or (offered_key(self.req) or None)
        return body

    # -- credentials ---------------------------------------------------------------------------

    def client_credential(self) -> List[Tuple[str, str]]:
        """The client's own x-api-key / Authorization, unless it is only the proxy key."""
        proxy_key = self.config.settings.get("proxy_api_key")
        found = []
        for name in ("x-api-key", "authorization"):
            value = self.req.headers.get(name)
            if value and (not proxy_key or value not in (proxy_key, f"Bearer {proxy_key}")):
                found.append((name, value))
        return found

    async def auth_mode(self, provider: dict) -> str:
        """auto resolves to oauth (a login or token exists), api_key, or the client's key."""
        if provider["auth"] != "auto":
            return provider["auth"]
        return effective_auth(self.server, provider, await self.server.oauth.available())

    def credential_headers(self, provider: dict, mode: str) -> List[Tuple[str, str]]:
        """Credential headers for api_key / client / none modes, in the provider's dialect."""
        if mode == "api_key" and provider["name"] in self.key_pools:
            return self.pooled_credential(provider)
        if mode == "api_key":
            if not provider.get("api_key"):
                where = f"${provider['api_key_env']} is not set" if provider.get("api_key_env") else "no api_key is configured"
                raise CredentialMissing(f"claude_proxy: provider {provider['name']!r} has no API key ({where}); "
                                        "set it and restart the proxy (or reload its config)")
            key = provider["api_key"]
            if provider["format"] == "anthropic":
                return [("x-api-key", key)]
            return [("api-key", key)] if provider.get("azure") else [("authorization", f"Bearer {key}")]
        if mode == "client":
            return self.forwarded_credential(provider)
        return []

    def forwarded_credential(self, provider: dict) -> List[Tuple[str, str]]:
        """The client's own key in the provider's dialect; a Claude login the client sent is
        refused for a host that is not Anthropic's (or this machine): it never leaves for a vendor."""
        creds = self.client_credential()
        if not provider["oauth_trusted"] and any(OAUTH_TOKEN_SHAPE.match(v.split()[-1]) for _, v in creds):
            raise CredentialMissing(
                f"claude_proxy: provider {provider['name']!r} takes each client's own key, and this client sent its "
                f"Claude login, which is never sent to {urllib.parse.urlsplit(provider['base_url']).hostname}: "
                f"give the client the provider's key (Claude Code: ANTHROPIC_AUTH_TOKEN=<the key> claude)")
        if provider["format"] == "openai":
            creds = [("authorization", v if n == "authorization" else f"Bearer {v}") for n, v in creds[:1]]
        return creds

    def pooled_credential(self, provider: dict) -> List[Tuple[str, str]]:
        """The credential header of the session's key in the provider's pool."""
        pool = self.key_pools[provider["name"]]
        key = pool.choose(self.session)
        if key is None:
            raise all_keys_cooling(pool, self.req.dialect)
        self.pool_key, self.meter.key = (pool, key), key.label
        if provider["format"] == "anthropic":
            return [("x-api-key", key.key)]
        return [("api-key", key.key)] if provider.get("azure") else [("authorization", f"Bearer {key.key}")]

    async def key_outcome(self, response: UpstreamResponse) -> Tuple[UpstreamResponse, Optional[str]]:
        """After a pooled call, the response (a 403's body read to judge it) and: "next" when its
        key is out and another healthy one can take the request, "answer" when every key is out
        (the client gets this answer, with the shortest retry-after), None when the key is fine,
        the call used none, or the answer is this request's own."""
        if self.pool_key is None:
            return response, None
        pool, key = self.pool_key
        self.pool_key = None
        body = b""
        if response.status == 403:
            body = await response.read(1 << 20)
            response = ReplayResponse(response, body)
        rejected = key_rejected(response.status, body) and not self.key_disabled
        if not pool.report(key, response.status, response.headers, rejected):
            return response, None
        self.key_disabled = self.key_disabled or rejected
        if any(pool.healthy(k) for k in pool.keys):
            return response, "next"
        wait = pool.shortest_wait()
        if wait is not None and response.status in KEY_COOLDOWN_STATUS:
            response.headers["retry-after"] = str(max(1, int(wait + 0.999)))
        return response, "answer"

    # -- sending -------------------------------------------------------------------------------

    def open_stream(self, status: int, headers: List[Tuple[str, str]]) -> Relay:
        """The client's SSE response with its keep-alive ticker, opened once."""
        if self.relay is None:
            self.relay = Relay(self.out, self.config.settings["keepalive_interval"])
            self.relay.start(status, headers)
        return self.relay

    async def send(self, build: Callable, stream: bool = False) -> UpstreamResponse:
        """send_to_targets(); for a streaming client whose upstream is slow to answer at all, the
        SSE response opens after one keep-alive interval, so front proxies and clients see
        keep-alives (an upstream error then arrives as one error event, as mid-stream)."""
        interval = self.config.settings["keepalive_interval"]
        if self.plugins:
            build = self.plugins.hooked_build(self, build)
        pending = asyncio.ensure_future(self.send_to_targets(build))
        try:
            if stream and interval > 0:
                done, _ = await asyncio.wait({pending}, timeout=interval)
                if not done:
                    await self.open_stream(200, SSE_RESPONSE_HEADERS).send(SSE_KEEPALIVE)
            return await pending
        finally:
            if not pending.done():
                pending.cancel()

    async def send_to_targets(self, build: Callable) -> UpstreamResponse:
        """Send to the target, then its fallbacks on 429/529/5xx; returns the last response."""
        targets = [self.target] + [Target(self.config.models[m], self.config.providers[self.config.models[m]["provider"]],
                                          "fallback", self.target.effort, self.target.one_m)
                                   for m in self.target.spec.get("fallback", [])]
        for i, target in enumerate(targets):
            try:
                response = await self.send_with_retries(target, build)
            except (UpstreamError, UpstreamStatus) as exc:   # unreachable, or every pooled key out
                if i + 1 == len(targets) or (isinstance(exc, UpstreamStatus) and exc.status not in FALLBACK_STATUS):
                    raise
                log.warning("model %s failed (%s); falling back to %s", target.spec["id"], exc.message,
                            targets[i + 1].spec["id"])
                continue
            if response.status in FALLBACK_STATUS and i + 1 < len(targets):
                log.warning("model %s answered %s; falling back to %s", target.spec["id"],
                            response.status, targets[i + 1].spec["id"])
                response.close()
                continue
            self.target = target
            return response
        raise AssertionError("unreachable")

    async def send_with_retries(self, target: Target, build: Callable) -> UpstreamResponse:
        """Retries on connection failures and retryable statuses, within the deadline."""
        settings = self.config.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings["retry_deadline"]
        for attempt in range(settings["max_retries"] + 1):
            last = attempt == settings["max_retries"]
            try:
                response = await self.send_once(target, build)
            except UpstreamError as exc:
                delay = retry_delay({}, attempt)
                if last or loop.time() + delay > deadline:
                    raise
                log.info("upstream attempt %d failed (%s); retrying", attempt + 1, exc.message)
                await asyncio.sleep(delay)
                continue
            response, outcome = await self.key_outcome(response)
            if outcome == "next" and not last:
                response.close()                      # the next healthy key, at once
                continue
            if outcome is not None:
                return response                       # every key out: the client hears it now
            if response.status not in RETRYABLE_STATUS or last or \
                    response.headers.get("x-should-retry") == "false":
                return response
            delay = retry_delay(response.headers, attempt)
            if loop.time() + delay > deadline:
                return response
            response.close()
            log.info("upstream answered %d; retrying in %.2fs", response.status, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def send_once(self, target: Target, build: Callable) -> UpstreamResponse:
        """One upstream call; on OAuth, one refresh-and-retry when the token expired."""
        url, headers, payload = await build(target)
        response = await self.server.pool.request("POST", url, headers, payload)
        if response.status != 401 or not self.oauth_used:
            return response
        text = (await response.read(1 << 20)).decode("utf-8", "replace")
        failed = next((v[7:] for n, v in headers if n == "authorization" and v.startswith("Bearer ")), None)
        if not await self.server.oauth.on_unauthorized(text, failed):
            return ReplayResponse(response, text.encode())
        url, headers, payload = await build(target)
        return await self.server.pool.request("POST", url, headers, payload)

    async def anthropic_call(self, target: Target, anthropic_body: Optional[dict], raw: bytes,
                             path: str) -> Tuple[str, List[Tuple[str, str]], bytes]:
        """URL, headers and body for an anthropic-format provider, credentials by auth mode."""
        provider, req_headers = target.provider, self.req.headers
        if anthropic_body is not None and anthropic_body.get("model") != target.spec["model"]:
            anthropic_body = dict(anthropic_body, model=target.spec["model"])
            raw = b""
        headers = forwarded_client_headers(req_headers)
        headers.append(("content-type", "application/json"))
        mode = await self.auth_mode(provider)
        self.oauth_used = mode == "oauth"
        one_m = self.one_m_beta(target)
        if mode == "oauth":
            token = await self.server.oauth.access_token()
            anthropic_body = anthropic_body if anthropic_body is not None else parse_json_body(raw)
            anthropic_body, oauth_headers = await self.run(convert, BadRequest, "request", shape_oauth_request,
                                                           anthropic_body, req_headers, token, one_m=one_m)
            headers = [(k, v) for k, v in headers if k not in oauth_headers] + list(oauth_headers.items())
            raw = b""
        else:
            headers = add_beta(headers, CONTEXT_1M_BETA if one_m else None)
            headers += self.credential_headers(provider, mode)
        if not any(k == "anthropic-version" for k, _ in headers):
            headers.append(("anthropic-version", provider["anthropic_version"]))
        headers = merge_headers(headers, provider["headers"], target.spec["headers"])
        body = raw or await self.run(json_bytes, anthropic_body)
        return provider["base_url"] + path, headers, body

    @staticmethod
    def one_m_beta(target: Target) -> bool:
        """Whether to send the context-1m beta: asked for (a -1m name) and taken by the model."""
        if target.one_m and not target.facts()["one_m"]:
            log.debug("context-1m beta not sent: %s does not take it", target.spec["model"])
        return target.one_m and bool(target.facts()["one_m"])

    def say(self, notes: Notes) -> None:
        """The converters' notes, each kind once per process at INFO."""
        if notes:
            self.server.drops.say(notes, self.target.describe() if self.target else "-")

    async def openai_call(self, target: Target, openai_body: dict,
                          path: str = "/chat/completions") -> Tuple[str, List[Tuple[str, str]], bytes]:
        """URL, headers and body for an openai-format provider."""
        provider = target.provider
        mode = await self.auth_mode(provider)
        if mode == "oauth":
            raise BadRequest(f"provider {provider['name']!r}: OAuth works only with anthropic-format providers")
        headers = [("content-type", "application/json"), ("accept", "application/json, text/event-stream")]
        headers += self.credential_headers(provider, mode)
        headers = merge_headers(headers, provider["headers"], target.spec["headers"])
        url = provider["base_url"] + path
        if provider.get("azure"):             # Azure OpenAI: the deployment is in base_url
            url += "?api-version=" + urllib.parse.quote(provider["api_version"])
        return url, headers, await self.run(json_bytes, openai_body)

    # -- a provider's own model list -----------------------------------------------------------

    async def listing_headers(self, provider: dict) -> List[Tuple[str, str]]:
        """Headers for GET /v1/models on an anthropic-format provider, its credentials by auth mode."""
        mode = await self.auth_mode(provider)
        if mode == "oauth":
            creds = [("authorization", f"Bearer {await self.server.oauth.access_token()}"),
                     ("anthropic-beta", OAUTH_BETA)]
        else:
            creds = self.credential_headers(provider, mode)
        return merge_headers([("anthropic-version", provider["anthropic_version"])] + creds, provider["headers"])

    async def provider_models(self, provider: dict) -> List[dict]:
        """The provider's own /v1/models list: cached MODELS_TTL seconds per credential; [] (logged
        once per provider) when it cannot be had."""
        headers = await self.listing_headers(provider)
        key = (provider["name"], hashlib.sha256(json_bytes(headers)).hexdigest())
        cached = self.server.model_lists.get(key)
        if cached is not None:
            return cached
        try:
            models = await asyncio.wait_for(self.fetch_models(provider, headers), MODELS_FETCH_TIMEOUT)
        except (ProxyError, asyncio.TimeoutError) as exc:
            self.server.model_lists.failed(provider["name"], getattr(exc, "message", None) or "timed out")
            models = []
        self.server.model_lists.put(key, models)
        return models

    async def fetch_models(self, provider: dict, headers: List[Tuple[str, str]]) -> List[dict]:
        """GET <base_url>/v1/models?limit=1000: its model objects, or UpstreamError."""
        response = await self.server.pool.request("GET", provider["base_url"] + "/v1/models?limit=1000", headers)
        try:
            raw = await response.read(1 << 22)
        finally:
            response.close()
        if response.status != 200:
            raise UpstreamError(f"GET /v1/models answered {response.status}")
        data = parse_upstream_json(raw).get("data")
        if not isinstance(data, list):
            raise UpstreamError("GET /v1/models answered without a data list")
        return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]]

    # -- answering -----------------------------------------------------------------------------

    async def check_status(self, response: UpstreamResponse) -> None:
        """Raise UpstreamStatus (body kept) unless the upstream answered 2xx."""
        self.upstream_status = response.status
        if response.status >= 300:
            body = await response.read(1 << 20)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request %s: %s answered %d: %s", self.req.id, self.target.describe() if self.target else
                          "upstream", response.status, self.server.redactor.clip(body.decode("utf-8", "replace"), 2000))
            raise UpstreamStatus(response.status, response.headers, body)

    async def relay_raw(self, response: UpstreamResponse, tag_as: Optional[str] = None) -> None:
        """Passthrough: the upstream's bytes to the client as they arrive, no re-serialising
        (tag_as: a vendor's name, its signatures tagged in place; then the plugins' stream hooks)."""
        content_type = response.headers.get("content-type", "application/json")
        headers = [("content-type", content_type)] + relayed_headers(response.headers)
        if "text/event-stream" not in content_type and self.relay is None:
            raw = await response.read()
            self.meter.take_body(raw)
            if tag_as:
                raw = convert(UpstreamError, "upstream answer", tag_message_bytes, raw, tag_as)
            await self.answer_raw(response.status, headers, raw)
            return
        relay = self.open_stream(response.status, headers + [("cache-control", "no-cache")])
        scan, push = UsageScanner(self.meter).feed, self.out.push
        stages = [stage for stage in (SignatureTagRelay(tag_as) if tag_as else None,
                                      self.plugins.event_rewriter(self) if self.plugins else None) if stage]
        last = b""

        def sink(data: bytes, framed: Optional[bytes]) -> None:
            nonlocal last
            scan(data)
            last = data
            if not stages:
                push(data, framed)
                return
            for stage in stages:
                data = stage.feed(data)
            push(data)
        try:
            await response.pump(sink, self.out.writer)
        except UpstreamError as exc:
            if not sse_answer_ended(last):
                raise                                   # cut mid-answer: the client must know
            log.debug("request %s: %s after the answer ended; the client has all of it", self.req.id, exc.message)
        await relay.send(close_stages(stages))
        relay.stop()
        await self.out.finish()

    async def relay_converted(self, response: UpstreamResponse, machine: Any,
                              encode: Callable[[Any], bytes]) -> None:
        """Conversion: decode upstream SSE, feed the state machine, write its events."""
        relay = self.open_stream(200, SSE_RESPONSE_HEADERS + relayed_headers(response.headers))
        decoder, scan, push = SSEDecoder(), UsageScanner(self.meter).feed, self.out.push
        if self.plugins:
            encode = self.plugins.hooked_encode(self, encode)

        def converted(upstream_events: List[Any]) -> bytes:
            """The client's bytes for these upstream events; at a malformed one, what the events
            before it made is written first, then the fault is raised (rendered in the dialect)."""
            try:
                return b"".join([encode(item) for item in feed_events(machine, upstream_events)])
            except MalformedStream as fault:
                push(b"".join([encode(item) for item in fault.converted]))
                raise

        def sink(data: bytes, _framed: Optional[bytes]) -> Any:
            scan(data)
            push(converted(decoder.feed(data)))
            return PUMP_STOP if machine.finished else None
        await response.pump(sink, self.out.writer)
        tail = converted(decoder.close())
        if not machine.finished and not machine.saw_finish:   # the body ended, the answer did not
            await relay.send(tail)
            raise UpstreamError("upstream stream ended before its answer finished")
        await relay.send(tail + converted([END_OF_STREAM]))      # close() is idempotent
        relay.stop()
        await self.out.finish()

    async def read_upstream_json(self, response: UpstreamResponse) -> dict:
        """The upstream's whole JSON answer, its usage metered."""
        upstream_body = parse_upstream_json(await response.read())
        self.meter.take(upstream_body.get("usage"))
        return upstream_body

    async def answer_json(self, status: int, answer: dict, headers: List[Tuple[str, str]]) -> None:
        """A whole converted answer, after the plugins' response hooks."""
        if self.plugins:
            answer = await self.plugins.on_response(self, answer)
        await self.out.respond_json(status, answer, headers)

    async def answer_raw(self, status: int, headers: List[Tuple[str, str]], raw: bytes) -> None:
        """A whole relayed answer, after the plugins' response hooks."""
        if self.plugins:
            raw = await self.plugins.on_response_bytes(self, raw)
        await self.out.respond(status, headers, raw)


# ---- stored responses (POST /v1/responses with store; sqlite3 off the event loop) -------------

RESPONSES_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, created REAL NOT NULL, previous TEXT,
                                      size INTEGER NOT NULL, response TEXT NOT NULL, owner TEXT);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created);
CREATE TABLE IF NOT EXISTS items (response_id TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT,
                                  kind TEXT NOT NULL, item TEXT NOT NULL, PRIMARY KEY (response_id, seq));
CREATE INDEX IF NOT EXISTS items_by_id ON items (id);
"""
SQLITE_BUSY_TIMEOUT = 10.0          # seconds another process may hold the write lock
RESPONSE_STORE_THREADS = 2          # the store's own threads: conversions never wait behind its writes
MAX_RESPONSE_CHAIN = 1000           # previous_response_id links followed at most
ITEM_ID_PREFIX = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_",
                  "custom_tool_call": "ctc_", "custom_tool_call_output": "ctco_", "reasoning": "rs_"}


class ResponseStore:
    """Stored responses in one sqlite3 file (WAL: several proxy processes share it), bounded by
    size and age with the oldest evicted at each write. The blocking methods each open their own
    connection and run on the store's own RESPONSE_STORE_THREADS through `call` (a write that waits
    for another process's lock holds one of those, never a thread conversions need); a response
    is reserved while it is being answered, so a request naming it as previous_response_id waits
    for its write. Each response and its items belong to the credential that created it (`owner`,
    see response_owner): reads, continuations and deletes by anyone else find nothing."""

    def __init__(self, path: str, *, max_bytes: int, max_age: float, clock: Clock = time.time):
        self.path = path
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.clock = clock
        self._ready = False
        self._pending: Dict[str, asyncio.Future] = {}
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None

    # -- blocking side (executor threads)

    def _run(self, work: Callable[[sqlite3.Connection], Any], write: bool = False, absent: Any = None) -> Any:
        """work(db) on a fresh connection; the file (0600, dir 0700) and schema made by the first write
        (a read before any write answers `absent`)."""
        import sqlite3                             # on first use: a plain serve never loads it
        if not self._ready and not write and not os.path.exists(self.path):
            return absent
        if not self._ready:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        db = sqlite3.connect(self.path, timeout=SQLITE_BUSY_TIMEOUT, isolation_level=None)
        try:
            if not self._ready:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(RESPONSES_SCHEMA)
                if "owner" not in [row[1] for row in db.execute("PRAGMA table_info(responses)")]:
                    db.execute("ALTER TABLE responses ADD COLUMN owner TEXT")   # older rows: no one's
                self._ready = True
            return work(db)
        finally:
            db.close()

    def put(self, response: dict, input_items: List[dict], owner: str) -> None:
        """Store a response with its own input items (replacing one of the same id), then evict."""
        rows = [("input", item) for item in input_items] + [("output", item) for item in response["output"]]
        texts = [(kind, item.get("id"), json_text(item)) for kind, item in rows]
        response_text = json_text(response)
        size = len(response_text) + sum(len(text) for _, _, text in texts)

        def work(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            self._delete(db, [response["id"]])
            db.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?)", (
                response["id"], self.clock(), response.get("previous_response_id"), size, response_text, owner))
            db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?)", [
                (response["id"], seq, item_id, kind, text) for seq, (kind, item_id, text) in enumerate(texts)])
            self._delete(db, self._doomed(db))
            db.execute("COMMIT")
        self._run(work, write=True)

    def _doomed(self, db: sqlite3.Connection) -> List[str]:
        """Ids past the age limit, then the oldest until the rest fits the size limit."""
        cutoff = self.clock() - self.max_age
        doomed = [rid for (rid,) in db.execute("SELECT id FROM responses WHERE created < ?", (cutoff,))]
        (total,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM responses WHERE created >= ?", (cutoff,)).fetchone()
        excess = total - self.max_bytes
        if excess <= 0:
            return doomed
        for rid, size in db.execute("SELECT id, size FROM responses WHERE created >= ? ORDER BY created",
                                    (cutoff,)).fetchall():
            if excess <= 0:
                break
            doomed.append(rid)
            excess -= size
        return doomed

    @staticmethod
    def _delete(db: sqlite3.Connection, response_ids: List[str]) -> int:
        """Remove responses and their items; how many responses there were."""
        gone = 0
        for rid in response_ids:
            gone += db.execute("DELETE FROM responses WHERE id = ?", (rid,)).rowcount
            db.execute("DELETE FROM items WHERE response_id = ?", (rid,))
        return gone

    def get(self, response_id: str, owner: str) -> Optional[dict]:
        """A stored response object, or None."""
        row = self._run(lambda db: db.execute("SELECT response FROM responses WHERE id = ? AND owner = ?",
                                              (response_id, owner)).fetchone())
        return json.loads(row[0]) if row else None

    def delete(self, response_id: str, owner: str) -> bool:
        """Forget one response (the chain through it is then cut there, as at OpenAI)."""
        def work(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            owned = self._owned(db, response_id, owner)
            gone = self._delete(db, [response_id]) if owned else 0
            db.execute("COMMIT")
            return gone
        return bool(self._run(work, absent=0))

    @staticmethod
    def _owned(db: sqlite3.Connection, response_id: str, owner: str) -> bool:
        """Whether the response exists and belongs to `owner`."""
        return db.execute("SELECT 1 FROM responses WHERE id = ? AND owner = ?", (response_id, owner)).fetchone() is not None

    def input_items(self, response_id: str, owner: str) -> Optional[List[dict]]:
        """A stored response's own input items, or None when it is unknown."""
        def work(db: sqlite3.Connection) -> Optional[List[dict]]:
            if not self._owned(db, response_id, owner):
                return None
            return [json.loads(text) for (text,) in db.execute(
                "SELECT item FROM items WHERE response_id = ? AND kind = 'input' ORDER BY seq", (response_id,))]
        return self._run(work)

    def history(self, response_id: str, owner: str, limit: int) -> Optional[Tuple[List[dict], int]]:
        """(input and output items of a response and its predecessors, oldest first; their JSON
        size in bytes); no items are read when that size is over `limit`; None if unknown."""
        def work(db: sqlite3.Connection) -> Optional[Tuple[List[dict], int]]:
            chain, current, size = [], response_id, 0
            while current and len(chain) < MAX_RESPONSE_CHAIN:
                row = db.execute("SELECT previous FROM responses WHERE id = ? AND owner = ?", (current, owner)).fetchone()
                if row is None:
                    break
                chain.append(current)
                size += db.execute("SELECT COALESCE(SUM(LENGTH(CAST(item AS BLOB))), 0) FROM items "
                                   "WHERE response_id = ?", (current,)).fetchone()[0]
                current = row[0]
            if not chain or size > limit:
                return (([], size) if chain else None)
            return [json.loads(text) for rid in reversed(chain) for (text,) in db.execute(
                "SELECT item FROM items WHERE response_id = ? ORDER BY seq", (rid,))], size
        return self._run(work)

    def items(self, item_ids: List[str], owner: str) -> Dict[str, Tuple[dict, int]]:
        """Stored items by id, each read once (for item_reference), with its JSON size in bytes;
        unknown ids, and other owners' items, are absent."""
        def work(db: sqlite3.Connection) -> Dict[str, Tuple[dict, int]]:
            found = {}
            for item_id in dict.fromkeys(item_ids):
                row = db.execute("SELECT item FROM items JOIN responses ON responses.id = items.response_id "
                                 "WHERE items.id = ? AND responses.owner = ? LIMIT 1", (item_id, owner)).fetchone()
                if row:
                    found[item_id] = (json.loads(row[0]), len(row[0].encode("utf-8")))
            return found
        return self._run(work, absent={})

    # -- event-loop side

    async def call(self, method: Callable[..., Any], *args: Any) -> Any:
        """One blocking method in the executor, after any write still pending for args[0]; a
        database that fails is a 500 naming the file."""
        import sqlite3
        pending = self._pending.get(args[0]) if args and isinstance(args[0], str) else None
        if pending is not None:
            await asyncio.shield(pending)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(RESPONSE_STORE_THREADS, "response-store")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, method, *args)
        except (sqlite3.Error, OSError) as exc:
            raise ProxyError(f"response store {self.path}: {exc.__class__.__name__}: {exc}") from None

    def close(self) -> None:
        """Let the store's threads end once their work is done (no wait here)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def reserve(self, response_id: str) -> None:
        """Mark a response as being answered: reads of its id wait until release()."""
        self._pending[response_id] = asyncio.get_running_loop().create_future()

    def release(self, response_id: str) -> None:
        """The response was stored (or will not be): let waiting reads go on."""
        future = self._pending.pop(response_id, None)
        if future is not None and not future.done():
            future.set_result(None)


def response_owner(req: Request) -> str:
    """Whose stored responses a request may see: a hash of the key it sent (the proxy key or the
    client's own), "" for a client without one."""
    key = offered_key(req)
    return hashlib.sha256(b"claude_proxy response owner\0" + key.encode("utf-8")).hexdigest()[:32] if key else ""


def with_item_ids(items: List[dict]) -> List[dict]:
    """Input items as stored: each with an id (listings need one), minted where the client sent none."""
    return [item if item.get("id") else dict(item, id=new_id(ITEM_ID_PREFIX.get(item.get("type"), "item_")))
            for item in items]


def list_page(items: List[dict], limit: int, order: str, after: Optional[str]) -> dict:
    """One cursor page of items (`limit`, `order` asc|desc, `after` an item id), OpenAI's list shape."""
    ordered = items if order == "asc" else items[::-1]
    ids = [item.get("id") for item in ordered]
    start = ids.index(after) + 1 if after in ids else 0
    data = ordered[start:start + limit]
    return {"object": "list", "data": data, "first_id": data[0].get("id") if data else None,
            "last_id": data[-1].get("id") if data else None, "has_more": start + limit < len(ordered)}


async def handle_messages(x: Exchange) -> None:
    """POST /v1/messages: an Anthropic client, to an anthropic- or openai-format provider."""
    body = await x.json_body({"model": str, "messages": list, "max_tokens": int})
    x.meter.requested = body["model"]
    needs_estimate = "long_context" in x.config.routes
    estimate = await x.run(convert, BadRequest, "request", estimate_anthropic_tokens, body) if needs_estimate else 0
    x.target = resolve_target(x.config, body["model"], thinking=anthropic_thinking_on(body), input_tokens=estimate)
    if x.target.spec.get("max_input_tokens"):
        check_input_limit(x.target, estimate or await x.run(convert, BadRequest, "request",
                                                            estimate_anthropic_tokens, body))
    if x.target.provider["format"] == "anthropic":
        await anthropic_passthrough(x, body, "/v1/messages")
    else:
        await anthropic_via_openai(x, body)


def streams_upstream(target: Target, body: dict) -> bool:
    """Whether the upstream call streams: the client asked, and the model can (can_stream: false
    models are called whole and the proxy streams the answer to the client itself)."""
    return bool(body.get("stream")) and target.spec["can_stream"]


def check_input_limit(target: Target, estimate: int) -> None:
    """A model's max_input_tokens, enforced before the upstream is called ("prompt is too long"
    is what Claude Code compacts on)."""
    limit = target.spec.get("max_input_tokens")
    if limit and estimate > limit:
        raise BadRequest(f"prompt is too long: about {estimate} tokens, over the {limit} max_input_tokens "
                         f"of model {target.spec['id']!r}", param="messages")


async def anthropic_passthrough(x: Exchange, body: dict, path: str) -> None:
    """Anthropic in, Anthropic out: model name and credentials rewritten, the query string and
    every field kept, bytes relayed; thinking blocks the provider did not issue are removed
    (own_thinking_only), mid-conversation system messages become user text for a model that takes
    none (a session routed to another model), a request shaped for another model is fitted to the
    target's facts (fit_to_target_model), and a vendor's own signatures are tagged on the way
    back. A can_stream: false model is called whole and its answer streamed by the proxy."""
    own_endpoint = x.req.path == path        # not test_conversion, whose query is the proxy's own
    target_path = path + ("?" + x.req.query if x.req.query and own_endpoint else "")

    async def build(target: Target) -> Tuple[str, List[Tuple[str, str]], bytes]:
        notes: Notes = []
        own = own_thinking_only(body, target.provider, notes)
        if not takes_mid_system(target):
            own = fold_system_messages(own, notes)
        if path == "/v1/messages":
            own = fit_to_target_model(own, target.spec, notes)
            own = fit_anthropic_request(own, target.facts(), target.effort, target.spec.get("max_tokens"), notes)
        if body.get("stream") and not streams_upstream(target, body):
            own = dict(own, stream=False)
        x.say(notes)
        return await x.anthropic_call(target, own, x.req.body if own is body else b"", target_path)
    response = await x.send(build, stream=bool(body.get("stream")))
    try:
        await x.check_status(response)
        provider = x.target.provider
        tag = provider["name"] if provider["tag_signatures"] and path == "/v1/messages" else None
        if body.get("stream") and "text/event-stream" not in response.headers.get("content-type", ""):
            message = await x.read_upstream_json(response)
            message = tag_message_signatures(message, tag) if tag else message
            await send_events(x, convert(UpstreamError, "upstream answer", anthropic_message_as_events, message),
                              format_anthropic_event)
        else:
            await x.relay_raw(response, tag)
    finally:
        response.close()


async def anthropic_via_openai(x: Exchange, body: dict) -> None:
    """Anthropic in, OpenAI-compatible upstream: convert the request and the answer."""
    server_tools = convert(BadRequest, "request", server_tool_names, body)
    if server_tools:
        raise BadRequest(f"server tools ({', '.join(server_tools)}) are not available: model "
                         f"{body['model']!r} is served by OpenAI-compatible provider "
                         f"{x.target.provider['name']!r}, which has no Anthropic server tools", param="tools")

    session = session_key(x.req.headers, body)

    async def build(target: Target) -> Tuple[str, List[Tuple[str, str]], bytes]:
        notes: Notes = []
        source = fit_anthropic_request(body, target.facts(), target.effort, None, notes)
        openai_body = await x.run(convert, BadRequest, "request", anthropic_to_openai_request, source,
                                  upstream_spec(target), session_id=session, notes=notes)
        x.say(notes)
        if not streams_upstream(target, body):
            openai_body.pop("stream", None)
            openai_body.pop("stream_options", None)
        return await x.openai_call(target, openai_body)
    response = await x.send(build, stream=bool(body.get("stream")))
    try:
        await x.check_status(response)
        provider = x.target.provider["name"]
        if body.get("stream") and "text/event-stream" in response.headers.get("content-type", ""):
            machine = OpenAIToAnthropicStream(body["model"], input_tokens=estimate_anthropic_tokens(body),
                                              provider=provider)
            await x.relay_converted(response, machine, format_anthropic_event)
            return
        message = convert(UpstreamError, "upstream answer", openai_response_to_anthropic,
                          await x.read_upstream_json(response), body["model"], provider=provider)
        if body.get("stream"):
            await send_events(x, convert(UpstreamError, "upstream answer", anthropic_message_as_events, message),
                              format_anthropic_event)
        else:
            await x.answer_json(200, message, relayed_headers(response.headers))
    finally:
        response.close()


async def send_events(x: Exchange, events: List[Any], encode: Callable[[Any], bytes]) -> None:
    """A whole list of stream events as one SSE response."""
    if x.plugins:
        encode = x.plugins.hooked_encode(x, encode)
    x.open_stream(200, SSE_RESPONSE_HEADERS)
    await x.relay.send(b"".join([encode(e) for e in events]))
    x.relay.stop()
    await x.out.finish()


async def handle_count_tokens(x: Exchange) -> None:
    """POST /v1/messages/count_tokens: the provider's own count, or an honest local estimate."""
    body = await x.json_body({"model": str, "messages": list})
    x.target = resolve_target(x.config, body["model"])
    if x.target.provider["format"] == "anthropic":
        await anthropic_passthrough(x, body, "/v1/messages/count_tokens")
    else:
        estimate = await x.run(convert, BadRequest, "request", estimate_anthropic_tokens, body)
        await x.out.respond_json(200, {"input_tokens": estimate})


async def handle_chat_completions(x: Exchange) -> None:
    """POST /v1/chat/completions: an OpenAI client, to Claude or passed straight through."""
    body = await x.json_body({"model": str, "messages": list})
    x.meter.requested = body["model"]
    x.target = resolve_openai_target(x.config, body["model"])
    if x.target.spec.get("max_input_tokens"):
        check_input_limit(x.target, await x.run(estimate_json_tokens, [body.get("messages"), body.get("tools")]))
    if x.target.provider["format"] == "openai":
        await openai_passthrough(x, body)
    else:
        await openai_via_anthropic(x, body)


async def openai_passthrough(x: Exchange, body: dict, path: str = "/chat/completions") -> None:
    """OpenAI in, OpenAI out (chat completions, or Responses to a provider serving them): only
    the model name and the credentials rewritten, and for a thinking mode that wants its reasoning
    back (replay_reasoning) each assistant turn without it gets it empty."""
    async def build(target: Target) -> Tuple[str, List[Tuple[str, str]], bytes]:
        url, headers, _ = await x.openai_call(target, {}, path)
        field = upstream_spec(target).get("replay_reasoning") if path == "/chat/completions" else None
        notes: Notes = []
        own = with_replayed_reasoning(body, field, notes) if field else body
        x.say(notes)
        if body.get("stream") and not streams_upstream(target, body):
            whole = {k: v for k, v in own.items() if k not in ("stream", "stream_options")}
            return url, headers, await x.run(json_bytes, dict(whole, model=target.spec["model"]))
        same = own is body and body["model"] == target.spec["model"]
        if x.req.query:                         # the client's query string is kept (Azure's after it)
            url += ("&" if "?" in url else "?") + x.req.query
        return url, headers, x.req.body if same else await x.run(json_bytes, dict(own, model=target.spec["model"]))
    response = await x.send(build, stream=bool(body.get("stream")))
    try:
        await x.check_status(response)
        if body.get("stream") and path == "/chat/completions" \
                and "text/event-stream" not in response.headers.get("content-type", ""):
            answer = await x.read_upstream_json(response)
            chunk = convert(UpstreamError, "upstream answer", openai_message_as_chunk, answer)
            await send_events(x, [chunk, "[DONE]"], format_openai_item)
            return
        await x.relay_raw(response)
    finally:
        response.close()


async def anthropic_converted_call(x: Exchange, target: Target,
                                   anthropic_body: dict) -> Tuple[str, List[Tuple[str, str]], bytes]:
    """The upstream call of a request converted to Anthropic: mid-conversation system messages
    carry their beta."""
    url, headers, payload = await x.anthropic_call(target, anthropic_body, b"", "/v1/messages")
    inline = any(isinstance(m, dict) and m.get("role") == "system" for m in anthropic_body.get("messages") or [])
    return url, add_beta(headers, MID_CONVERSATION_SYSTEM_BETA if inline else None), payload


async def openai_via_anthropic(x: Exchange, body: dict) -> None:
    """OpenAI in, Claude upstream: convert the request and the answer."""
    async def build(target: Target) -> Tuple[str, List[Tuple[str, str]], bytes]:
        notes: Notes = []
        anthropic_body = await x.run(convert, BadRequest, "request", openai_to_anthropic_request, body,
                                     target.spec["model"], facts=target.facts(), variant_effort=target.effort,
                                     anthropic_version=target.provider["anthropic_version"], notes=notes)
        anthropic_body["stream"] = streams_upstream(target, body)
        x.say(notes)
        return await anthropic_converted_call(x, target, anthropic_body)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise BadRequest("stream_options must be an object", param="stream_options")
    response = await x.send(build, stream=bool(body.get("stream")))
    include_usage = bool(stream_options.get("include_usage"))
    try:
        await x.check_status(response)
        if body.get("stream") and "text/event-stream" in response.headers.get("content-type", ""):
            machine = AnthropicToOpenAIStream(body["model"], include_usage=include_usage)
            await x.relay_converted(response, machine, format_openai_item)
            return
        message = await x.read_upstream_json(response)
        if body.get("stream"):
            machine = AnthropicToOpenAIStream(body["model"], include_usage=include_usage)
            events = convert(UpstreamError, "upstream answer", anthropic_message_as_events, message)
            await send_events(x, feed_events(machine, events, parsed=True), format_openai_item)
        else:
            answer = convert(UpstreamError, "upstream answer", anthropic_response_to_openai, message, body["model"])
            await x.answer_json(200, answer, relayed_headers(response.headers))
    finally:
        response.close()


def responses_reasoning_on(responses_body: dict) -> bool:
    """Whether a Responses request asks for reasoning (it then takes the think route)."""
    reasoning = responses_body.get("reasoning")
    return isinstance(reasoning, dict) and reasoning.get("effort") not in (None, "none")


def reasoning_origin(target: Target) -> str:
    """Who made a reasoning blob: its thinking is replayed only to the same provider and model."""
    return f"{target.provider['name']}/{target.spec['model']}"


async def handle_responses(x: Exchange) -> None:
    """POST /v1/responses: a Responses client, to Claude or a chat provider (converted through the
    hub), or relayed to a provider that serves /responses itself."""
    body = await x.json_body({"model": str})
    x.meter.requested = body["model"]
    x.target = resolve_openai_target(x.config, body["model"], thinking=responses_reasoning_on(body))
    if x.target.provider.get("responses"):
        await openai_passthrough(x, body, "/responses")
        return
    own_input = with_item_ids(await x.run(convert, BadRequest, "request", responses_input_items, body))
    expanded = dict(body, input=await responses_history(x, body, own_input))
    _, tools, dropped = await x.run(convert, BadRequest, "request", responses_tools, expanded)
    if dropped:                                    # Codex sends web_search on every request: said once
        log.debug("request %s: built-in tools without an equivalent dropped: %s", x.req.id, ", ".join(dropped))
        x.say([(f"tools.{kind}", "a built-in tool without an equivalent on this route, dropped") for kind in dropped])
    store, response_id = x.server.responses, new_id("resp_")
    shell = responses_shell(body, response_id, int(time.time()))
    machine = AnthropicToResponsesStream(shell, tools=tools, summaries=shell["reasoning"]["summary"] is not None)
    if body.get("store") is not False:
        store.reserve(response_id)
    try:
        await responses_converted(x, body, expanded, machine)
        if body.get("store") is not False and machine.response:
            await store_response(store, machine.response, own_input, response_owner(x.req))
    finally:
        store.release(response_id)


async def responses_history(x: Exchange, body: dict, own_input: List[dict]) -> List[dict]:
    """The input with the stored chain of previous_response_id in front and item references
    resolved. What the stored items add is bounded like a body (MAX_BODY_BYTES, a 400 naming it),
    counted against the bodies in flight, and makes the request's work large (off the loop)."""
    store, owner, limit = x.server.responses, response_owner(x.req), x.config.settings["max_body_bytes"]
    previous, history, size = body.get("previous_response_id"), [], 0
    if previous is not None:
        found = await store.call(store.history, str(previous), owner, limit)
        if found is None:
            raise NotFound(f"Previous response with id {previous!r} not found.", param="previous_response_id")
        history, size = found
    references = [str(item.get("id")) for item in own_input if item["type"] == "item_reference"]
    stored = await store.call(store.items, references, owner) if references else {}
    for item_id in references:
        if item_id not in stored:
            raise NotFound(f"Item with id {item_id!r} not found.", param="input")
        size += stored[item_id][1]
    if size > limit:
        raise BadRequest(f"the stored items this request continues or references come to {size} bytes, over the "
                         f"{limit}-byte limit of a request (MAX_BODY_BYTES): start a new conversation",
                         param="previous_response_id" if previous is not None else "input")
    x.server.reserve_body(x.req, size)
    x.work_bytes += size
    return history + [stored[item["id"]][0] if item["type"] == "item_reference" else item for item in own_input]


async def responses_converted(x: Exchange, body: dict, expanded: dict, machine: AnthropicToResponsesStream) -> None:
    """Convert the request for the target, then the answer (stream or not) through the machine."""
    stream = bool(body.get("stream"))
    x.stream_error = lambda exc: b"".join([format_responses_event(e) for e in machine.fail(exc.message, exc.error_type)])
    response = await x.send(lambda target: responses_call(x, target, expanded), stream=stream)
    try:
        await x.check_status(response)
        machine.origin = reasoning_origin(x.target)
        via_chat = x.target.provider["format"] == "openai"
        upstream = ChainedStream(OpenAIToAnthropicStream(body["model"]), machine) if via_chat else machine
        if stream and "text/event-stream" in response.headers.get("content-type", ""):
            await x.relay_converted(response, upstream, format_responses_event)
            return
        answer = await x.read_upstream_json(response)
        message = convert(UpstreamError, "upstream answer", openai_response_to_anthropic, answer, body["model"]) \
            if via_chat else answer
        if stream:
            events = convert(UpstreamError, "upstream answer", anthropic_message_as_events, message)
            await send_events(x, feed_events(machine, events, parsed=True), format_responses_event)
        else:
            answer = convert(UpstreamError, "upstream answer", anthropic_to_responses_response, message, machine)
            await x.answer_json(200, answer, relayed_headers(response.headers))
    finally:
        response.close()


async def responses_call(x: Exchange, target: Target, expanded: dict) -> Tuple[str, List[Tuple[str, str]], bytes]:
    """URL, headers and body of the upstream call for a Responses request on this target."""
    origin = reasoning_origin(target)
    notes: Notes = []
    if target.provider["format"] == "openai":
        openai_body = await x.run(convert, BadRequest, "request", responses_to_openai_request, expanded,
                                  upstream_spec(target), variant_effort=target.effort, origin=origin, notes=notes)
        x.say(notes)
        if not streams_upstream(target, expanded):
            openai_body.pop("stream", None)
            openai_body.pop("stream_options", None)
        return await x.openai_call(target, openai_body)
    anthropic_body = await x.run(convert, BadRequest, "request", responses_to_anthropic_request, expanded,
                                 target.spec["model"], facts=target.facts(), variant_effort=target.effort,
                                 origin=origin, anthropic_version=target.provider["anthropic_version"], notes=notes)
    anthropic_body["stream"] = streams_upstream(target, expanded)
    x.say(notes)
    if expanded.get("prompt_cache_key"):       # the client asked for caching: stable breakpoints
        anthropic_body = await x.run(add_cache_breakpoints, anthropic_body)
    return await anthropic_converted_call(x, target, anthropic_body)


async def store_response(store: ResponseStore, response: dict, own_input: List[dict], owner: str) -> None:
    """Keep a finished response; a store that fails costs the client nothing but a warning."""
    try:
        await store.call(store.put, response, own_input, owner)
    except ProxyError as exc:
        log.warning("response %s not stored: %s", response["id"], exc.message)


def stored_response_path(x: Exchange) -> Tuple[str, str]:
    """(response id, rest of the path) of /v1/responses/{id}[/...]."""
    rest = x.req.path.split("/responses/", 1)[1]
    response_id, _, tail = rest.partition("/")
    return urllib.parse.unquote(response_id), tail


async def respond_stored(x: Exchange, stored: dict) -> None:
    """A stored object as the JSON answer, serialised off the loop (stored items may be large)."""
    await x.out.respond(200, [("content-type", "application/json")], await run_off_loop(json_bytes, stored))


async def handle_stored_response(x: Exchange) -> None:
    """GET /v1/responses/{id} and GET /v1/responses/{id}/input_items (limit, order, after)."""
    response_id, tail = stored_response_path(x)
    store = x.server.responses
    if tail == "input_items":
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(x.req.query).items()}
        limit, order = query.get("limit", "20"), query.get("order", "desc")
        if not limit.isdigit() or not 1 <= int(limit) <= 100 or order not in ("asc", "desc"):
            raise BadRequest("limit must be 1-100 and order asc or desc", param="limit" if order in ("asc", "desc") else "order")
        items = await store.call(store.input_items, response_id, response_owner(x.req))
        if items is None:
            raise NotFound(f"Response with id {response_id!r} not found.", param="response_id")
        await respond_stored(x, list_page(items, int(limit), order, query.get("after")))
        return
    if parse_bool(urllib.parse.parse_qs(x.req.query).get("stream", ["false"])[-1]):
        raise BadRequest("stream=true is not supported here: a stored response is answered as JSON", param="stream")
    response = await store.call(store.get, response_id, response_owner(x.req)) if not tail else None
    if response is None:
        raise NotFound(f"Response with id {response_id!r} not found.", param="response_id")
    await respond_stored(x, response)


async def handle_delete_response(x: Exchange) -> None:
    """DELETE /v1/responses/{id}."""
    response_id, tail = stored_response_path(x)
    store = x.server.responses
    if tail or not await store.call(store.delete, response_id, response_owner(x.req)):
        raise NotFound(f"Response with id {response_id!r} not found.", param="response_id")
    await x.out.respond_json(200, {"id": response_id, "object": "response", "deleted": True})


async def handle_responses_other(x: Exchange) -> None:
    """POST /v1/responses/{id}/cancel, /compact, /input_tokens: OpenAI server features, not kept here."""
    raise NotFound(f"{x.req.path} is not supported by this proxy (no background, compaction or token "
                   "counting for Responses)")


async def handle_responses_websocket(x: Exchange) -> None:
    """GET /v1/responses, a WebSocket upgrade: refused at once with 426, which Codex answers by
    falling back to HTTP without a retry (a 404 or 501 costs it a retry round, a 400 ends its turn)."""
    x.req.keep_alive = False
    raise ProxyError("WebSocket is not supported here: POST /v1/responses over HTTP (SSE when streaming)",
                     status=426, error_type="invalid_request_error")


# ---- GET /v1/models: configured models, route aliases, providers' own lists, the model table

def model_object(model_id: str, owner: str, facts: Optional[dict] = None) -> dict:
    """A listed model in Anthropic's shape (plus owned_by), from what the proxy knows of it."""
    facts = facts or model_facts(model_id)
    entry = {"type": "model", "id": model_id, "display_name": facts["display_name"] or model_id,
             "created_at": MODEL_CREATED_AT, "owned_by": owner}
    if facts["context"]:
        entry["max_input_tokens"] = facts["context"]
    if facts["output"]:
        entry["max_tokens"] = facts["output"]
    return entry


def serves_claude(config: Config, name: str) -> bool:
    """Whether an OpenAI client asking for this Claude name reaches an anthropic-format provider."""
    try:
        return resolve_openai_target(config, name).provider["format"] == "anthropic"
    except NotFound:
        return False


def configured_models(config: Config) -> List[dict]:
    """Configured models, then a claude-* alias for every route with a fixed model (gateway
    discovery keeps only claude* ids)."""
    entries = [model_object(spec["id"], spec.get("owned_by") or spec["provider"], model_facts(spec["model"], spec))
               for spec in config.models.values()]
    return entries + [model_object(route_alias(name), spec.get("owned_by") or spec["provider"],
                                   model_facts(spec["model"], spec))
                      for name, spec in config.routes.items() if spec["model"]]


def table_models(config: Config) -> List[dict]:
    """The model table's current ids, newest first, that reach an anthropic-format provider."""
    listed = MODEL_COLUMNS.index("listed")
    return [model_object(row[0], "anthropic") for row in reversed(MODEL_TABLE)
            if row[listed] and serves_claude(config, row[0])]


def used_anthropic_providers(config: Config) -> List[dict]:
    """The anthropic-format providers some model or route leads to."""
    names = {spec["provider"] for spec in list(config.models.values()) + list(config.routes.values())}
    return [p for name, p in config.providers.items() if name in names and p["format"] == "anthropic"]


def routes_to(config: Config, name: str, provider: dict) -> bool:
    """Whether a model name is routed to this provider."""
    try:
        return resolve_target(config, name).provider is provider
    except NotFound:
        return False


def first_of_each_id(entries: List[dict]) -> List[dict]:
    """The entries with each id once, the first one kept."""
    seen: set = set()
    return [e for e in entries if e["id"] not in seen and not seen.add(e["id"])]


async def model_listing(x: Exchange) -> List[dict]:
    """Every listed model, each id once: configured ones and route aliases, then the providers'
    own objects (their dates and limits) for names routed to them, then the model table's."""
    upstream: List[dict] = []
    for provider in used_anthropic_providers(x.config):
        upstream += [dict(m, owned_by=provider["name"]) for m in await x.provider_models(provider)
                     if routes_to(x.config, m["id"], provider)]
    return first_of_each_id(configured_models(x.config) + upstream + table_models(x.config))


def _page_bound(params: dict, key: str, ids: List[str]) -> Optional[int]:
    """The position of after_id / before_id in the listing, or None; 400 for an unknown id."""
    value = params.get(key, [None])[0]
    if value is None:
        return None
    if value not in ids:
        raise BadRequest(f"{key}: model {value!r} is not listed", param=key)
    return ids.index(value)


def page_models(entries: List[dict], query: str) -> dict:
    """Anthropic's list page: limit (1-1000, default 20), after_id / before_id, has_more, first/last id."""
    params = urllib.parse.parse_qs(query)
    try:
        limit = int(params.get("limit", [DEFAULT_MODELS_LIMIT])[0])
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        raise BadRequest("limit: expected 1 to 1000", param="limit")
    ids = [e["id"] for e in entries]
    after, before = _page_bound(params, "after_id", ids), _page_bound(params, "before_id", ids)
    if before is not None:
        start = max(0, before - limit)
        page, more = entries[start:before], start > 0
    else:
        start = 0 if after is None else after + 1
        page, more = entries[start:start + limit], start + limit < len(entries)
    data = [{k: v for k, v in e.items() if k != "owned_by"} for e in page]
    return {"data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def openai_model(entry: dict) -> dict:
    """A listed model in OpenAI's shape."""
    return {"id": entry["id"], "object": "model", "created": 0, "owned_by": entry["owned_by"]}


def openai_variants(config: Config, entries: List[dict]) -> List[dict]:
    """The -reasoning-* and -1m names of the listed Claude models that reach an anthropic-format provider."""
    variants = []
    for entry in entries:
        facts = model_facts(entry["id"])
        suffixes = REASONING_VARIANTS if facts["id"] and facts["thinking"] != "none" else ()
        suffixes += ("-1m",) if facts["one_m"] and (facts["context"] or 0) < 1000000 else ()
        variants += [dict(entry, id=entry["id"] + s) for s in suffixes if serves_claude(config, entry["id"] + s)]
    return variants


async def handle_models(x: Exchange) -> None:
    """GET /v1/models: Anthropic's paged list shape with anthropic-version, OpenAI's otherwise."""
    entries = await model_listing(x)
    if x.req.dialect == "anthropic":
        await x.out.respond_json(200, page_models(entries, x.req.query))
        return
    data = [openai_model(e) for e in entries + openai_variants(x.config, entries)]
    await x.out.respond_json(200, {"object": "list", "data": list({d["id"]: d for d in data}.values())})


async def handle_model(x: Exchange) -> None:
    """GET /v1/models/{id}: a listed model, or any name the proxy would route (404 otherwise)."""
    model_id = urllib.parse.unquote(x.req.path[len("/v1/models/"):])
    entry = next((e for e in await model_listing(x) if e["id"] == model_id), None)
    if entry is None:
        resolve = resolve_openai_target if x.req.dialect == "openai" else resolve_target
        target = resolve(x.config, model_id)
        entry = model_object(model_id, target.spec.get("owned_by") or target.provider["name"], target.facts())
    if x.req.dialect == "anthropic":
        await x.out.respond_json(200, {k: v for k, v in entry.items() if k != "owned_by"})
    else:
        await x.out.respond_json(200, openai_model(entry))


async def handle_health(x: Exchange) -> None:
    """GET /health, with the generation of the config in force (1 at start, +1 per reload)."""
    await x.out.respond_json(200, {"status": "ok", "name": "claude_proxy", "version": VERSION,
                                   "config_generation": x.server.generation, "pid": os.getpid()})


async def handle_root(x: Exchange) -> None:
    """GET or HEAD /: a short identification, never an error."""
    await x.out.respond_json(200, {"name": "claude_proxy", "version": VERSION})


async def handle_stray(x: Exchange) -> None:
    """Claude Code's telemetry and other side calls (/api/event_logging/batch ...): accepted."""
    await x.out.respond_json(200, {})


async def handle_auth_start(x: Exchange) -> None:
    """GET /auth/start -> {"url": authorize URL}; ?long_lived=1 for the one-year token."""
    long_lived = parse_bool(urllib.parse.parse_qs(x.req.query).get("long_lived", ["0"])[0])
    flow = x.server.oauth.start_login(long_lived)
    await x.out.respond_json(200, {"url": flow.authorize_url(x.server.oauth.settings), "state": flow.state,
                                   "next": "POST /auth/callback with {\"code\": \"CODE#STATE\"}",
                                   "notice": TERMS_NOTICE})


async def handle_auth_callback(x: Exchange) -> None:
    """POST /auth/callback {"code": "CODE#STATE"} -> the login status."""
    body = require_fields(parse_json_body(x.req.body), {"code": str}, "anthropic")
    await x.server.oauth.finish_login(body["code"])
    await x.out.respond_json(200, x.server.oauth.tokens.status())


async def handle_auth_status(x: Exchange) -> None:
    """GET /auth/status: logged in, source, expiry, scopes, last error; never the token."""
    await x.out.respond_json(200, x.server.oauth.tokens.status())


async def handle_auth_logout(x: Exchange) -> None:
    """POST /auth/logout: forget the saved login."""
    x.server.oauth.tokens.logout()
    await x.out.respond_json(200, x.server.oauth.tokens.status())


# (method, path, handler, exact): exact=False matches the path as a prefix.
ROUTES: List[Tuple[str, str, Callable[[Exchange], Awaitable[None]], bool]] = [
    ("POST", "/v1/messages", handle_messages, True),
    ("POST", "/v1/messages/count_tokens", handle_count_tokens, True),
    ("POST", "/v1/chat/completions", handle_chat_completions, True),
    ("POST", "/chat/completions", handle_chat_completions, True),
    ("POST", "/v1/responses", handle_responses, True),
    ("POST", "/responses", handle_responses, True),
    ("GET", "/v1/responses", handle_responses_websocket, True),
    ("GET", "/v1/responses/", handle_stored_response, False),
    ("DELETE", "/v1/responses/", handle_delete_response, False),
    ("POST", "/v1/responses/", handle_responses_other, False),
    ("GET", "/v1/models", handle_models, True),
    ("GET", "/v1/models/", handle_model, False),
    ("GET", "/health", handle_health, True),
    ("GET", "/", handle_root, True),
    ("GET", "/api/", handle_stray, False),
    ("POST", "/api/", handle_stray, False),
    ("GET", "/auth/start", handle_auth_start, True),
    ("POST", "/auth/callback", handle_auth_callback, True),
    ("GET", "/auth/status", handle_auth_status, True),
    ("POST", "/auth/logout", handle_auth_logout, True),
]
PUBLIC_PATHS = ("/", "/health", "/status.json")     # the status page checks its own access
# The operations endpoints (section 12's page and data, the doctor, the login), besides the API.
# CORS_ORIGINS never reaches them: a page of another origin, port included, gets nothing there.
# Those that answer more than who the proxy is need the proxy key, or, without one, a loopback
# peer: one rule for all of them (check_access), checked before the body is read.
OPERATIONS_PATHS = ("/", "/status.json", "/v1/stats", "/v1/stats/session", "/metrics", "/test-connection")
OPERATIONS_PREFIXES = ("/auth/",)
OPERATIONS_PUBLIC = ("/",)          # the page's HTML and the JSON identification: no data


def is_operations_path(path: str) -> bool:
    """An operations endpoint (OPERATIONS_PATHS), not the API."""
    return path in OPERATIONS_PATHS or path.startswith(OPERATIONS_PREFIXES)


def find_handler(method: str, path: str) -> Callable[[Exchange], Awaitable[None]]:
    """The handler for a request; 404 for unknown paths, 405 for a known path's wrong method."""
    method = "GET" if method == "HEAD" else method
    known = False
    for route_method, route_path, handler, exact in ROUTES:
        if path == route_path or (not exact and path.startswith(route_path)):
            if route_method == method:
                return handler
            known = True
    if known:
        raise ProxyError(f"method {method} not allowed on {path}", status=405,
                         error_type="invalid_request_error")
    raise NotFound(f"no route for {path}")


def check_access(config: Config, req: Request) -> None:
    """The one access rule, before the body is read: PROXY_API_KEY (x-api-key or Bearer),
    constant-time, when configured (CORS preflights, which never carry credentials, and the
    public paths excepted: the status page checks its own); without a key, the operations
    endpoints (OPERATIONS_PATHS, /auth/*) answer loopback peers only."""
    key = config.settings.get("proxy_api_key")
    if not key and is_operations_path(req.path) and req.path not in OPERATIONS_PUBLIC and not is_loopback(req.peer):
        raise PermissionDenied(f"{req.path} answers loopback clients only (set PROXY_API_KEY to reach it "
                               "from the network)")
    if not key or req.path in PUBLIC_PATHS or req.method == "OPTIONS":
        return
    offered = offered_key(req)
    if not hmac.compare_digest(offered.encode(), key.encode()):
        raise WrongProxyKey(f"{'wrong' if offered else 'no'} proxy key: send the value of ${config.proxy_key_var} "
                            "as x-api-key or as a Bearer token (Claude Code: ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN)")


def error_body(x: Exchange, exc: ProxyError) -> dict:
    """The error envelope of the client's dialect."""
    return openai_error_body(exc) if x.req.dialect == "openai" else anthropic_error_body(exc, x.req.id)


def error_event(x: Exchange, exc: ProxyError) -> bytes:
    """The error as one SSE event of the client's dialect."""
    return format_sse(json_text(error_body(x, exc)), "error" if x.req.dialect == "anthropic" else None)


async def render_error(x: Exchange, exc: ProxyError) -> None:
    """An error in the client's dialect: a JSON response, or one event if streaming began (the
    stream then ends whole, so its connection stays usable for the client's next request). An
    upstream's own error body is relayed (same dialect) or converted, with every secret the
    proxy knows scrubbed from it (an upstream may quote the credential it rejected). After a
    complete response (a failure in what follows it, such as storing it) nothing is sent."""
    x.error = exc
    if x.out.finished:
        return
    if exc.retryable is False:
        x.out.extra_headers = x.out.extra_headers + [("x-should-retry", "false")]
    if isinstance(exc, UpstreamStatus):
        scrubbed = x.server.redactor.scrub(exc.body.decode("utf-8", "replace")).encode("utf-8")
        if x.target and x.target.provider["format"] == x.req.dialect and not x.out.started \
                and upstream_error_detail(scrubbed)[0] is not None:
            await x.out.respond(exc.status, [("content-type", "application/json")] +
                                relayed_headers(exc.headers), scrubbed)
            return
        extra = relayed_headers(exc.headers)
        exc = error_from_upstream(UpstreamStatus(exc.status, exc.headers, scrubbed))
    else:
        extra = []
    if not x.out.started:
        await x.out.respond_json(exc.status, error_body(x, exc), extra)
        return
    event = x.stream_error(exc) if x.stream_error else error_event(x, exc)
    await (x.relay.error(event) if x.relay else x.out.send(event))
    await x.out.finish()


SHUTDOWN_CUT = ProxyError("the proxy is shutting down and cut this answer short; retry",
                          status=503, error_type="overloaded_error")


def cut_at_shutdown(x: Exchange) -> None:
    """Past the shutdown grace: end the answer at once (no await) with an error in the client's
    dialect, so a cut stream is never mistaken for a complete one."""
    x.error, x.req.keep_alive = ProxyError("cut at the shutdown deadline", status=503, error_type="shutdown"), False
    if x.out.finished:
        return
    if not x.out.started:
        x.out.started, x.out.status = True, 503
        x.out.writer.write(http_error_bytes(503, SHUTDOWN_CUT.error_type, SHUTDOWN_CUT.message))
        return
    event = error_event(x, SHUTDOWN_CUT)
    x.out.write_now(event if x.out.at_boundary else b"\n\n" + event)
    if x.out.chunked:
        x.out.writer.write(LAST_CHUNK)


async def dispatch(server: "ProxyServer", req: Request, out: ClientStream) -> None:
    """The per-request boundary: run the handler, render any error, write the access line."""
    x = Exchange(server, req, out)
    started = time.monotonic()
    try:
        out.extra_headers = cors_headers(x.config.settings, req)
        if req.method == "OPTIONS":
            await out.respond(204 if out.extra_headers else 404, [], b"")
            return
        await find_handler(req.method, req.path)(x)
    except asyncio.CancelledError:
        if server.closing:
            cut_at_shutdown(x)
        else:
            x.error = ProxyError("the request was cancelled", status=499, error_type="cancelled")
        raise
    except ProxyError as exc:
        await render_safely(x, exc)
    except RecursionError:
        await render_safely(x, BadRequest("request nested too deeply"))
    except (ConnectionError, asyncio.IncompleteReadError):
        req.keep_alive = False
    except Exception:
        log.exception("unexpected error in request %s", req.id)
        await render_safely(x, ProxyError(f"internal proxy error (request id {req.id})"))
    finally:
        if x.relay:
            x.relay.stop()
        server.ops.request_done(x, started)
        write_access_line(x, time.monotonic() - started)


def write_access_line(x: Exchange, elapsed: float) -> None:
    """The one access line of a request (client-controlled parts escaped by the log filter)."""
    status = f"{x.out.status or '-'}" + (f" error={x.error.error_type}" if x.error else "")
    access_log.info("%s %s route=%s upstream=%s status=%s %.0fms %dB", x.req.method,
                    x.server.redactor.clip(x.req.path, 300, shapes=False),
                    x.target.describe() if x.target else "-", x.upstream_status or "-",
                    status, elapsed * 1000, x.out.bytes_sent)


async def render_safely(x: Exchange, exc: ProxyError) -> None:
    """render_error, giving up quietly when the client is already gone."""
    x.error = exc
    if exc.status >= 500 or exc.retryable is False:
        log.warning("request %s failed: %s", x.req.id, exc.message)
    try:
        await render_error(x, exc)
    except (ConnectionError, asyncio.IncompleteReadError):
        x.req.keep_alive = False


LOCAL_HOST_NAMES = ("localhost", "127.0.0.1", "::1")
FORM_PATHS = ("/",)                 # the status page's key form: the one non-JSON POST
BROWSER_FORM_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")


def host_name(value: str) -> Optional[str]:
    """The host name of a Host header or an origin's netloc, lower case, without port or IPv6
    brackets ("[::1]:8082" -> "::1"); None when malformed."""
    try:
        return urllib.parse.urlsplit("//" + value.strip()).hostname
    except ValueError:
        return None


def own_host(name: Optional[str]) -> bool:
    """A Host no DNS-rebinding page can send: localhost or *.localhost (browsers resolve those to
    loopback themselves), an IP literal (a page at an IP has that IP as its origin, not a domain
    of the attacker's that now points here), or this machine's own name."""
    if not name:
        return False
    if name in LOCAL_HOST_NAMES or name.endswith(".localhost") or ip_literal(name) is not None:
        return True                                # 127.1 and 0x7f.1 are IP literals to a browser too
    machine = socket.gethostname().lower()
    return name in (machine, machine.split(".")[0])


def host_allowed(settings: dict, host: Optional[str], bind: Optional[str] = None) -> bool:
    """Whether a Host header names this proxy: own_host, the bind address, or an ALLOWED_HOSTS
    entry (its name; a port in the entry does not matter). The one predicate the browser guard
    and the status page share."""
    name = host_name(host) if host else None
    if own_host(name):
        return True
    names = {host_name(entry) or entry.lower() for entry in settings["allowed_hosts"]}
    return name is not None and (name in names or (bind is not None and name == host_name(bind)))


def same_origin(req: Request) -> bool:
    """Whether the request's Origin is the proxy's own: scheme, host and port of its Host header."""
    origin, host = req.headers.get("origin"), req.headers.get("host")
    return origin is not None and host is not None and \
        origin.lower() in ("http://" + host.lower(), "https://" + host.lower())


def cors_allowed(settings: dict, req: Request) -> bool:
    """Whether CORS was configured for this request's origin; never on an operations endpoint."""
    origin = req.headers.get("origin")
    return origin is not None and not is_operations_path(req.path) and \
        (origin in settings["cors_origins"] or "*" in settings["cors_origins"])


def check_browser_guard(settings: dict, req: Request, loopback_bind: bool) -> None:
    """What a web page in the user's browser must not be able to do (DNS rebinding, CSRF):
    on a loopback bind a Host that is not this machine's (own_host; or one ALLOWED_HOSTS names); an
    Origin other than the proxy's own or a CORS-configured one; a cross-site or same-site
    fetch without such an Origin (Sec-Fetch-Site, sent by every current browser); a form or
    text/plain body on a JSON endpoint. Clients that send none of these (curl, the SDKs,
    Claude Code, Codex) are unaffected. Exposed binds rely on the proxy key for the rest."""
    host = req.headers.get("host")
    if loopback_bind and host is not None and not host_allowed(settings, host):
        raise PermissionDenied(f"Host {log_safe(host)!r} is not this proxy's (a DNS-rebinding page?); "
                               "list it in ALLOWED_HOSTS if a reverse proxy serves the proxy under it")
    origin = req.headers.get("origin")
    allowed = same_origin(req) or cors_allowed(settings, req)
    if origin is not None and not allowed:
        hint = "" if is_operations_path(req.path) else " (set CORS_ORIGINS to allow it)"
        raise PermissionDenied(f"requests from the web origin {log_safe(origin)!r} are refused{hint}")
    fetch_site = req.headers.get("sec-fetch-site", "").lower()
    if fetch_site in ("cross-site", "same-site") and not (origin and allowed):
        raise PermissionDenied("requests made by another web site are refused")
    media_type = req.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if req.method == "POST" and media_type in BROWSER_FORM_TYPES and req.path not in FORM_PATHS:
        raise UnsupportedMediaType(f"Content-Type {media_type} is not accepted here: send application/json")


def cors_headers(settings: dict, req: Request) -> List[Tuple[str, str]]:
    """CORS response headers, only for configured origins on the API."""
    if not cors_allowed(settings, req):
        return []
    return [("access-control-allow-origin", req.headers["origin"]), ("vary", "origin"),
            ("access-control-allow-headers", req.headers.get("access-control-request-headers", "*")),
            ("access-control-allow-methods", "GET, POST, OPTIONS")]

# =============================================================================================
# 12. Operations
#
# What the proxy knows about itself and how it changes while it runs. dispatch() hands
# Operations one record per request (request_done): it adds the record to this session's totals
# and the last requests and /metrics' counters, notes a provider's error, and queues the row for
# the usage ledger, whose one writer thread batches rows into CLAUDE_PROXY_HOME/usage.db.
# /v1/stats, /v1/stats/session (the status line), /metrics, the status page (GET / for a
# browser, its data from /status.json), `stats` and `doctor` read from here. Hot
# reload repeats main()'s config flow when a watched file changes or on SIGHUP and swaps the new
# generation in for new requests (an Exchange keeps the config and plugins it started with).
# Plugins are the request, response and stream hooks of one generation. File and database work
# runs off the event loop, except one stat per watched file per reload interval.
# =============================================================================================

RECENT_REQUESTS = 50                  # the status page's "last requests"
CONFIG_READ_TIMEOUT = 10.0            # seconds a reload may spend reading files (a hung mount)
LEDGER_BATCH_ROWS = 500               # the writer commits at most this many rows at once
LEDGER_FLUSH_INTERVAL = 0.5           # seconds the writer gathers rows before a commit
LEDGER_BUSY_TIMEOUT = 5.0             # seconds a writer or reader waits for another process's lock
LEDGER_RETRY_INTERVAL = 2.0           # seconds between two tries of rows a failed write kept
LEDGER_MAX_PENDING = 20000            # rows kept for a retry at most; the oldest beyond are dropped, said
LEDGER_PRUNE_EVERY = 1000             # rows written between two prunes
USAGE_CHART_DAYS = 14                 # the status page's per-day chart
CHART_WINDOWS = (("hour", 60, 60), ("day", 1800, 48))   # the traffic charts: (name, bucket seconds, buckets)
CHART_GROUPS = 6                      # routes or providers a traffic chart draws apart (the rest: "other")
TRAFFIC_REFRESH = 10.0                # seconds the traffic charts' data is reused (a day's rows take a while)
OTHER_LABEL = "other"                 # the groups (and metric model names) folded together
NO_LABEL = "none"                     # a request that never reached a route, provider or model
SINCE_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
COUNTERS = ("requests", "errors") + METER_FIELDS + ("cost_usd", "unpriced_requests")
GROUPS = ("by_model", "by_route", "by_day")
OTHER_MODELS = "other"                # the row of requested names past the bounds below
MAX_UNCONFIGURED_MODELS = 32          # names neither a configured model nor a route kept by name
MAX_MODEL_ROWS = 256                  # model rows any totals hold (an old ledger's too)

# ---- Prices and cost ------------------------------------------------------------------------

_PRICE_PATTERNS = tuple((re.compile(pattern), prices) for pattern, prices in MODEL_PRICES)
Prices = Tuple[float, float, float, float]


def table_prices(model: str) -> Tuple[Optional[float], ...]:
    """The MODEL_PRICES row for an upstream model name, in USD per token (Nones without a row)."""
    name = model.lower().rsplit("/", 1)[-1]
    for pattern, per_million in _PRICE_PATTERNS:
        if pattern.match(name):
            return tuple(None if p is None else p / 1e6 for p in per_million)
    return (None, None, None, None)


def model_prices(spec: dict, row: Tuple[Optional[float], ...]) -> Optional[Prices]:
    """(input, output, cache read, cache write) USD per token: the spec's configured prices over
    the table row; cache prices default to the input price; None when input or output is unknown."""
    prices = [row[i] if spec.get(key) is None else spec[key] for i, key in enumerate(PRICE_KEYS)]
    if prices[0] is None or prices[1] is None:
        return None
    return (prices[0], prices[1], prices[0] if prices[2] is None else prices[2],
            prices[0] if prices[3] is None else prices[3])


def request_cost(prices: Optional[Prices], tokens: Tuple[Optional[int], ...]) -> Optional[float]:
    """Estimated USD for one request's tokens (reasoning is billed inside output); None if unknown."""
    if prices is None or tokens[0] is None:
        return None
    return tokens[0] * prices[0] + tokens[1] * prices[1] + tokens[2] * prices[2] + tokens[3] * prices[3]

# ---- Records and totals ---------------------------------------------------------------------

LEDGER_COLUMNS = ("ts", "dialect", "requested_model", "route", "provider", "upstream_model", "status",
                  "error_type") + METER_FIELDS + ("ttft_ms", "duration_ms", "cost_usd", "key", "session_id")
UsageRecord = collections.namedtuple("UsageRecord", LEDGER_COLUMNS, defaults=(None,))


def is_error(status: Optional[int], error_type: Optional[str]) -> bool:
    """An error status, or an error after the response began (a stream's error event); a
    request the client gave up on ("cancelled") is not the proxy's or the provider's error."""
    return error_type != "cancelled" and ((status or 0) >= 400 or error_type is not None)


def record_counts(record: UsageRecord) -> list:
    """The COUNTERS of one record (unknown tokens count as 0)."""
    tokens = [record.input_tokens, record.output_tokens, record.cache_read_input_tokens,
              record.cache_creation_input_tokens, record.reasoning_tokens]
    unpriced = record.cost_usd is None and bool(record.input_tokens or record.output_tokens)
    return ([1, int(is_error(record.status, record.error_type))] + [n or 0 for n in tokens]
            + [record.cost_usd, int(unpriced)])


def utc_day(epoch: float) -> str:
    """YYYY-MM-DD in UTC (the ledger's days)."""
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


def _accumulate(into: list, counts: List[Any]) -> None:
    """Add counts to a COUNTERS list; a cost stays None until one is known."""
    into[:7] = [total + (n or 0) for total, n in zip(into[:7], counts[:7])]
    if counts[7] is not None:
        into[7] = counts[7] if into[7] is None else into[7] + counts[7]
    into[8] += counts[8] or 0


def _zero_counts() -> list:
    """COUNTERS at zero (cost unknown)."""
    return [0] * 7 + [None, 0]


def _counts_dict(counts: list) -> dict:
    """A COUNTERS list as the JSON object /v1/stats shows."""
    out = dict(zip(COUNTERS, counts))
    if out["cost_usd"] is not None:
        out["cost_usd"] = round(out["cost_usd"], 9)
    return out


class UsageTotals:
    """Counters per (model as the client named it, route, UTC day); the total and the by_model,
    by_route and by_day views are folded from these groups when asked for."""

    def __init__(self) -> None:
        self.groups: Dict[Tuple[str, str, str], list] = {}
        self.models: set = set()

    def add(self, model: Optional[str], route: Optional[str], day: str, counts: Iterable[Any]) -> None:
        """Add one record's counts, or one ledger group's sums."""
        key = (self._model_row(model or "-"), route or "-", day)
        counts = list(counts)
        into = self.groups.get(key)
        if into is None:
            self.groups[key] = into = _zero_counts()
        _accumulate(into, counts)

    def _model_row(self, model: str) -> str:
        """The model's own row; OTHER_MODELS for a name over MAX_MODEL_NAME or past MAX_MODEL_ROWS
        names (a ledger written before those bounds may hold any)."""
        if model in self.models:
            return model
        if len(model) > MAX_MODEL_NAME or len(self.models) >= MAX_MODEL_ROWS:
            return OTHER_MODELS
        self.models.add(model)
        return model

    def add_record(self, record: UsageRecord) -> None:
        """Add one request."""
        self.add(record.requested_model, record.route, utc_day(record.ts), record_counts(record))

    def as_dict(self) -> dict:
        """The T object of /v1/stats."""
        total, views = _zero_counts(), {group: {} for group in GROUPS}
        for key, counts in self.groups.items():
            _accumulate(total, counts)
            for group, name in zip(GROUPS, key):
                _accumulate(views[group].setdefault(name, _zero_counts()), counts)
        out = _counts_dict(total)
        for group in GROUPS:
            out[group] = {name: _counts_dict(counts) for name, counts in sorted(views[group].items())}
        return out


def parse_since(value: Optional[str], now: float) -> float:
    """`?since=` / `--since`: 30m, 24h, 7d, 2w, an ISO date or date-time (UTC); 0.0 when absent."""
    if not value:
        return 0.0
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*", value)
    if match:
        return now - float(match.group(1)) * SINCE_UNITS[match.group(2)]
    try:
        when = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"since: expected 30m, 24h, 7d, 2w or an ISO date, got {value!r}",
                         param="since") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


STATS_COLUMNS = (("requests", "requests"), ("errors", "errors"), ("input", "input_tokens"),
                 ("output", "output_tokens"), ("cache read", "cache_read_input_tokens"),
                 ("cache write", "cache_creation_input_tokens"), ("reasoning", "reasoning_tokens"))


def _cost_text(cost: Optional[float]) -> str:
    """A cost for the terminal: $ with 4 decimals, or n/a."""
    return "n/a" if cost is None else f"${cost:,.4f}"


def format_stats_table(totals: dict, by: str = "model") -> str:
    """A /v1/stats T object as a terminal table, one row per model, route or day, then the total."""
    rows = [(key, counts) for key, counts in totals["by_" + by].items()] + [("total", totals)]
    width = max([len(by)] + [len(key) for key, _ in rows])
    head = f"{by:<{width}}" + "".join(f" {title:>11}" for title, _ in STATS_COLUMNS) + f" {'cost':>12}"
    lines = [head, "-" * len(head)]
    for key, counts in rows:
        lines.append(f"{key:<{width}}" + "".join(f" {counts[field]:>11,}" for _, field in STATS_COLUMNS)
                     + f" {_cost_text(counts['cost_usd']):>12}")
    if totals["unpriced_requests"]:
        lines.append(f"cost n/a or partial: {totals['unpriced_requests']} request(s) on models without a "
                     "known price (set input_cost_per_token / output_cost_per_token on the model)")
    return "\n".join(lines)

# The status page's traffic charts: per window, the rows bucketed by time and grouped by route or
# by provider (the CHART_GROUPS busiest, the rest as "other"); per bucket the requests, tokens
# (input, cache and output), cost and the latency p50 / p95 in ms (nearest rank; None: no request).
CHART_FIELDS = ("ts", "route", "provider", "input_tokens", "output_tokens", "cache_read_input_tokens",
                "cache_creation_input_tokens", "cost_usd", "duration_ms")
CHART_GROUPINGS = (("route", CHART_FIELDS.index("route")), ("provider", CHART_FIELDS.index("provider")))


def percentile(ordered: List[float], q: float) -> Optional[float]:
    """The nearest-rank q-quantile of sorted values (None when there are none)."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _chart_cells(rows: Iterable[tuple], start: float, step: int, count: int, column: int) -> Dict[str, list]:
    """group -> per bucket [requests, tokens, cost, durations] of the rows inside the window."""
    cells: Dict[str, list] = {}
    for row in rows:
        i = int((row[0] - start) // step)
        if not 0 <= i < count:
            continue
        group = row[column] or NO_LABEL
        buckets = cells.get(group)
        if buckets is None:
            buckets = cells[group] = [[0, 0, 0.0, []] for _ in range(count)]
        cell = buckets[i]
        cell[0] += 1
        cell[1] += sum(n or 0 for n in row[3:7])
        cell[2] += row[7] or 0.0
        cell[3].append(row[8] or 0.0)
    return cells


def _fold_chart_groups(cells: Dict[str, list], keep: int) -> Dict[str, list]:
    """The `keep` groups with the most requests, the others merged into "other"."""
    ranked = sorted(cells, key=lambda group: (-sum(cell[0] for cell in cells[group]), group))
    kept = {group: cells[group] for group in ranked[:keep]}
    for group in ranked[keep:]:
        into = kept.setdefault(OTHER_LABEL, [[0, 0, 0.0, []] for _ in cells[group]])
        for mine, cell in zip(into, cells[group]):
            mine[0], mine[1], mine[2] = mine[0] + cell[0], mine[1] + cell[1], mine[2] + cell[2]
            mine[3] = mine[3] + cell[3]
    return kept


def _chart_series(buckets: list) -> dict:
    """One group's series, bucket by bucket."""
    ordered = [sorted(cell[3]) for cell in buckets]
    return {"requests": [cell[0] for cell in buckets], "tokens": [cell[1] for cell in buckets],
            "cost": [round(cell[2], 9) for cell in buckets],
            "p50": [percentile(values, 0.5) for values in ordered], "p95": [percentile(values, 0.95) for values in ordered]}


def chart_series(rows: List[tuple], now: float) -> dict:
    """The traffic charts' data of rows in CHART_FIELDS order: {window: {start, step, buckets,
    by_route, by_provider}}, the last bucket being the one `now` falls in."""
    out = {}
    for name, step, count in CHART_WINDOWS:
        start = (now // step - (count - 1)) * step
        window: Dict[str, Any] = {"start": start, "step": step, "buckets": count}
        for by, column in CHART_GROUPINGS:
            cells = _fold_chart_groups(_chart_cells(rows, start, step, count, column), CHART_GROUPS)
            window["by_" + by] = {group: _chart_series(buckets) for group, buckets in cells.items()}
        out[name] = window
    return out

# ---- Usage ledger (sqlite3, one writer thread) ------------------------------------------------

LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, dialect TEXT, requested_model TEXT, route TEXT,
    provider TEXT, upstream_model TEXT, status INTEGER, error_type TEXT, input_tokens INTEGER,
    output_tokens INTEGER, cache_read_input_tokens INTEGER, cache_creation_input_tokens INTEGER,
    reasoning_tokens INTEGER, ttft_ms REAL, duration_ms REAL, cost_usd REAL, key TEXT);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
"""
# Schema versions past LEDGER_SCHEMA (PRAGMA user_version counts the ones applied); old rows are kept.
LEDGER_MIGRATIONS = (
    # 1: the client's session id (x-claude-code-session-id, Codex's session-id), for `statusline`
    ("ALTER TABLE usage ADD COLUMN session_id TEXT",
     "CREATE INDEX IF NOT EXISTS usage_session ON usage (session_id)"),
)
LEDGER_INSERT = (f"INSERT INTO usage ({', '.join(LEDGER_COLUMNS)}) "
                 f"VALUES ({', '.join('?' * len(LEDGER_COLUMNS))})")
# The COUNTERS of a set of rows, as SQL sums in COUNTERS order (is_error and record_counts in SQL).
LEDGER_SUMS = """COUNT(*),
       SUM(COALESCE(error_type, '') != 'cancelled' AND (status >= 400 OR error_type IS NOT NULL)),
       SUM(input_tokens), SUM(output_tokens),
       SUM(cache_read_input_tokens), SUM(cache_creation_input_tokens), SUM(reasoning_tokens),
       SUM(cost_usd),
       SUM(cost_usd IS NULL AND COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0) > 0)"""
# One group per (model, route, day), its sums in COUNTERS order.
LEDGER_GROUPS = f"""
SELECT requested_model, route, strftime('%Y-%m-%d', ts, 'unixepoch'), {LEDGER_SUMS}
FROM usage WHERE ts >= ? GROUP BY 1, 2, 3
"""
# One client session: its sums, then its last request.
LEDGER_CHART_ROWS = f"SELECT {', '.join(CHART_FIELDS)} FROM usage WHERE ts >= ?"
LEDGER_SESSION_SUMS = f"SELECT {LEDGER_SUMS} FROM usage WHERE session_id = ?"
SESSION_LAST_FIELDS = ("ts", "requested_model", "route", "provider", "upstream_model", "status", "error_type")
LEDGER_SESSION_LAST = (f"SELECT {', '.join(SESSION_LAST_FIELDS)} FROM usage WHERE session_id = ? "
                       "ORDER BY id DESC LIMIT 1")
_LEDGER_STOP = object()


def _storable(value: Any) -> Any:
    """A ledger value sqlite can store: text holding lone surrogates (a client's model name,
    say) gets them replaced."""
    if isinstance(value, str) and _CONTROL_CHARS.search(value):
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


def migrate_ledger(db: Any) -> None:
    """Bring usage.db to the last LEDGER_MIGRATIONS version in one transaction (a second process
    doing the same waits for the lock, then finds the work done)."""
    if db.execute("PRAGMA user_version").fetchone()[0] >= len(LEDGER_MIGRATIONS):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        for statements in LEDGER_MIGRATIONS[version:]:
            for statement in statements:
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {len(LEDGER_MIGRATIONS)}")
        db.commit()
    except BaseException:
        db.rollback()
        raise


def session_summary(session_id: str, counts: List[Any], last: Optional[Mapping[str, Any]]) -> dict:
    """One client session's usage: the COUNTERS and its last request (None: no request yet)."""
    out = dict(_counts_dict(counts), session_id=session_id, last=None)
    if last is not None:
        out["last"] = dict(last, time=iso_time(last["ts"]), failed=is_error(last["status"], last["error_type"]))
    return out


class UsageLedger:
    """usage.db: one row per request, written in batches by one thread, readable by anyone.

    add() only queues the row, so the event loop never waits on the disk. The writer thread
    gathers what arrives within LEDGER_FLUSH_INTERVAL (at most LEDGER_BATCH_ROWS rows) and inserts
    it in one transaction. WAL and a busy timeout let several proxy processes and the `stats`
    command share the file. A write that fails (another process holding the lock past the busy
    timeout, a database that cannot be opened) logs one warning per outage and keeps its rows:
    they are tried again every LEDGER_RETRY_INTERVAL with what arrives meanwhile, at most
    LEDGER_MAX_PENDING of them (the oldest beyond are dropped), and rows really lost (that bound,
    or still unwritten at close) are counted and said; the proxy serves on. Rows older than max_age_days,
    and the oldest beyond max_rows, are pruned at open and every LEDGER_PRUNE_EVERY rows (0: no
    limit). sqlite3 is imported on first use: a proxy that never records does not load it."""

    def __init__(self, path: str, *, max_age_days: int = 90, max_rows: int = 500000,
                 clock: Callable[[], float] = time.time, interval: float = LEDGER_FLUSH_INTERVAL,
                 busy_timeout: float = LEDGER_BUSY_TIMEOUT, retry_interval: float = LEDGER_RETRY_INTERVAL):
        self.path = path
        self.max_age_days = max_age_days
        self.max_rows = max_rows
        self.clock = clock
        self.interval = interval
        self.busy_timeout = busy_timeout
        self.retry_interval = retry_interval
        self.error: Optional[str] = None
        self.rows_written = 0
        self.rows_pending = 0                    # kept after a failed write, for the next try
        self.rows_dropped = 0                    # really lost: past LEDGER_MAX_PENDING, or at close
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()
        self._since_prune = 0

    def add(self, record: tuple) -> None:
        """Queue one row (never blocks); the writer starts with the first row."""
        self._queue.put(record)
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="usage-ledger", daemon=True)
                self._thread.start()

    def flush(self, timeout: float = 5.0) -> bool:
        """Block until the rows queued so far were tried (written, or kept for a retry); False on timeout."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued and stop the writer (blocks: run it off the loop)."""
        if self._thread is not None:
            self._queue.put(_LEDGER_STOP)
            self._thread.join(timeout)

    def _run(self) -> None:
        """The writer thread: batches (with the rows a failed write kept) until the stop marker."""
        db, pending = None, []
        while True:
            batch = self._next_batch(self.retry_interval if pending else None)
            pending += [item for item in batch if isinstance(item, tuple)]
            if pending:
                db, pending = self._write(db, pending)
            self.rows_pending = len(pending)
            for item in batch:
                if isinstance(item, threading.Event):
                    item.set()
            if batch and batch[-1] is _LEDGER_STOP:
                break
        if pending:
            self._dropped(len(pending), "at close")
        if db is not None:
            db.close()

    def _next_batch(self, wait: Optional[float]) -> List[Any]:
        """What arrives within one interval; a flush or stop marker ends the batch at once. With
        `wait`, at most that long for a first item ([] after: time to retry what is kept)."""
        try:
            batch = [self._queue.get(timeout=wait)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.interval
        while len(batch) < LEDGER_BATCH_ROWS and isinstance(batch[-1], tuple):
            try:
                batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _connect(self) -> Any:
        """A connection with the busy timeout (no file is created by readers)."""
        import sqlite3
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        return db

    def _open(self) -> Any:
        """The writer's connection: directory and schema made, WAL on, old rows pruned."""
        ensure_private_dir(os.path.dirname(self.path) or ".")
        db = self._connect()
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(LEDGER_SCHEMA)
        migrate_ledger(db)
        os.chmod(self.path, 0o600)
        self._prune(db)
        return db

    def _write(self, db: Any, rows: List[tuple]) -> Tuple[Any, List[tuple]]:
        """Insert one batch; the connection to use next time (None after a failure) and the rows
        kept for a retry ([] once written)."""
        import sqlite3
        try:
            db = db or self._open()
            try:
                with db:
                    db.executemany(LEDGER_INSERT, rows)
            except UnicodeEncodeError:         # rare: a lone surrogate somewhere; the batch cleaned
                with db:
                    db.executemany(LEDGER_INSERT, [tuple(map(_storable, row)) for row in rows])
            self.rows_written += len(rows)
            self._since_prune += len(rows)
            if self._since_prune >= LEDGER_PRUNE_EVERY:
                self._prune(db)
        except (sqlite3.Error, OSError, ValueError) as exc:
            self._failed(exc, len(rows))
            if db is not None:
                db.close()
            if len(rows) > LEDGER_MAX_PENDING:
                self._dropped(len(rows) - LEDGER_MAX_PENDING, f"past the {LEDGER_MAX_PENDING} rows kept for a retry")
            return None, rows[-LEDGER_MAX_PENDING:]
        if self.error is not None:
            log.warning("usage ledger %s works again; the %d rows kept meanwhile are written", self.path, len(rows))
            self.error = None
        return db, []

    def _failed(self, exc: Exception, kept: int) -> None:
        """One warning per outage; the rows are kept for a retry."""
        message = f"{exc.__class__.__name__}: {exc}"
        if self.error is None:
            log.warning("usage ledger %s is unusable (%s): requests are served, and their rows kept and "
                        "tried again every %gs", self.path, message, self.retry_interval)
        else:
            log.debug("usage ledger still unusable (%s); %d rows kept", message, kept)
        self.error = message

    def _dropped(self, count: int, why: str) -> None:
        """Rows really lost, counted and said."""
        self.rows_dropped += count
        log.warning("usage ledger %s: %d rows not recorded (%s; %d lost so far)", self.path, count, why,
                    self.rows_dropped)

    def _prune(self, db: Any) -> None:
        """Drop rows past the age limit and the oldest past the row limit."""
        with db:
            if self.max_age_days > 0:
                db.execute("DELETE FROM usage WHERE ts < ?", (self.clock() - self.max_age_days * 86400,))
            if self.max_rows > 0:
                db.execute("DELETE FROM usage WHERE id <= (SELECT MAX(id) FROM usage) - ?", (self.max_rows,))
        self._since_prune = 0

    def select(self, *statements: Tuple[str, tuple]) -> List[List[tuple]]:
        """The rows of each (sql, parameters) on one reader connection, none without a file
        (blocks); a ProxyError (503) when the database fails."""
        import sqlite3
        if not os.path.exists(self.path):
            return [[] for _ in statements]
        try:
            db = self._connect()
            try:
                return [db.execute(sql, parameters).fetchall() for sql, parameters in statements]
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise ProxyError(f"usage ledger {self.path}: {exc}", status=503) from None

    def query_groups(self, since: float = 0.0) -> List[tuple]:
        """(model, route, day, *COUNTERS sums) per group of the rows since `since` (blocks)."""
        return self.select((LEDGER_GROUPS, (since,)))[0]

    def totals(self, since: float = 0.0) -> dict:
        """The ledger's T object (blocks)."""
        totals = UsageTotals()
        for group in self.query_groups(since):
            totals.add(group[0], group[1], group[2], group[3:])
        return totals.as_dict()

    def chart_rows(self, since: float) -> List[tuple]:
        """The rows since `since` in CHART_FIELDS order (blocks)."""
        return self.select((LEDGER_CHART_ROWS, (since,)))[0]

    def session(self, session_id: str) -> dict:
        """One client session's usage and last request (blocks); a ledger written before
        session ids were recorded, or none at all, knows no session."""
        try:
            sums, last = self.select((LEDGER_SESSION_SUMS, (session_id,)), (LEDGER_SESSION_LAST, (session_id,)))
        except ProxyError as exc:
            if "session_id" not in exc.message:
                raise
            sums, last = [], []
        counts = [n or 0 for n in sums[0][:7]] + [sums[0][7], sums[0][8] or 0] if sums else _zero_counts()
        return session_summary(session_id, counts, dict(zip(SESSION_LAST_FIELDS, last[0])) if last else None)


def ledger_path(config: Config) -> str:
    """CLAUDE_PROXY_HOME/usage.db."""
    return os.path.join(config.home, "usage.db")


def open_ledger(config: Config, clock: Callable[[], float] = time.time) -> Optional[UsageLedger]:
    """The ledger this config asks for, or None with USAGE_LEDGER=false (no file, no thread)."""
    settings = config.settings
    if not settings["usage_ledger"]:
        return None
    return UsageLedger(ledger_path(config), max_age_days=settings["usage_max_age_days"],
                       max_rows=settings["usage_max_rows"], clock=clock)

# ---- Plugins ----------------------------------------------------------------------------------
#
# A plugin is a .py file (seed 001's contract) listed under "plugins" in the config or lying in
# CLAUDE_PROXY_HOME/plugins/; it may define request_hook(payload), response_hook(payload) and
# stream_event_hook(event), each optionally taking a second `context` argument. request_hook sees
# the body as it goes upstream (after conversion), response_hook a whole answer as the client
# gets it, stream_event_hook each streamed event (dict) before it is written. A hook returns the
# new value, or None to keep the one it mutated. FILTER_TOOLS is a built-in request hook that
# runs first. A generation without any hook has no Plugins object at all (server.plugins None),
# so the per-request price of the feature is one None check.
#
# Hooks are foreign code, so none may stall every client. Request and response hooks run off the
# loop, on the server's few hook threads, within HOOK_TIMEOUT a request; one that overruns is
# skipped from then on (until the config is reloaded) and said at WARNING, and that request goes
# on as if its hooks of that kind were not there (FILTER_TOOLS, the proxy's own, runs inline).
# Stream hooks run on the loop, once per event, so they must be quick: one that takes over
# STREAM_HOOK_BUDGET on an event is skipped from then on, said the same way. A hook that raises
# fails its request, never the server.

Hook = Tuple[str, Callable[..., Any], bool]          # (plugin name, function, takes a context)
HOOK_KINDS = ("request_hook", "response_hook", "stream_event_hook")
HOOK_TIMEOUT = 5.0                 # seconds a request's request (or response) hooks may take together
STREAM_HOOK_BUDGET = 0.05          # seconds a stream hook may take on one event (it runs on the loop)
HOOK_WORKERS = 4                   # threads that run request and response hooks
BUILTIN_HOOKS = ("filter_tools",)  # the proxy's own hooks: quick and bounded, run on the loop


def tool_name(tool: Any) -> Optional[str]:
    """A tool's (or tool_choice's) name in any dialect: {"name"} or {"function": {"name"}}."""
    if not isinstance(tool, dict):
        return None
    function = tool.get("function")
    return tool.get("name") or (function.get("name") if isinstance(function, dict) else None)


def filter_tools_hook(names: Iterable[str]) -> Callable[[dict, dict], None]:
    """The built-in FILTER_TOOLS request hook: removes the named tools, and a tool_choice that
    names one (with no tool left, also tools, tool_choice and parallel_tool_calls)."""
    drop = frozenset(names)

    def filter_tools(payload: dict, context: dict) -> None:
        tools = payload.get("tools")
        if not isinstance(tools, list):
            return
        kept = [tool for tool in tools if tool_name(tool) not in drop]
        if len(kept) == len(tools):
            return
        removed = sorted({tool_name(tool) for tool in tools} & drop)
        log.debug("filter_tools: removed %s from request %s", ", ".join(removed), context["request_id"])
        payload["tools"] = kept
        if not kept or tool_name(payload.get("tool_choice")) in drop:
            payload.pop("tool_choice", None)
        if not kept:
            for key in ("tools", "parallel_tool_calls"):
                payload.pop(key, None)
    return filter_tools


def takes_context(fn: Callable[..., Any]) -> bool:
    """Whether a hook accepts a second positional argument (inspect loads only with plugins)."""
    import inspect
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def load_plugin_module(path: str) -> Any:
    """Execute one plugin file as a fresh module named claude_proxy.plugins.<file name>."""
    import importlib.util
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"claude_proxy.plugins.{name}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"plugins: {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except FileNotFoundError:
        raise ConfigError(f"plugins: {path}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - foreign code: any failure is a config error naming it
        raise ConfigError(f"plugins: {path}: {exc.__class__.__name__}: {exc}") from None
    return module


def plugin_folder(config: Config) -> str:
    """<home>/plugins, of the home a .env cannot move (load_config sets it)."""
    return config.plugin_folder or os.path.join(config.home, "plugins")


def plugin_paths(config: Config, base_dir: str) -> List[str]:
    """The config's plugins (relative to the config file's folder), then home/plugins/*.py."""
    listed = []
    for i, path in enumerate(config.settings["plugins"]):
        if not isinstance(path, str) or not path.endswith(".py"):
            raise ConfigError(f"plugins.{i}: expected the path of a .py file")
        listed.append(os.path.abspath(os.path.join(base_dir, os.path.expanduser(path))))
    folder = plugin_folder(config)
    found = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".py")) \
        if os.path.isdir(folder) else []
    return list(dict.fromkeys(listed + found))


def check_plugin_owner(path: str) -> None:
    """ConfigError unless `path` (a plugin file or the folder holding one) belongs to this user
    (or root) and no other user may write it: code another user can change is not run."""
    if not hasattr(os, "getuid"):
        return
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return                                   # load_plugin_module says "no such file"
    if info.st_uid not in (os.getuid(), 0):
        raise ConfigError(f"plugins: {path} belongs to another user (uid {info.st_uid}); refusing to run "
                          "code from it (chown it to the proxy's user)")
    if info.st_mode & 0o022:
        raise ConfigError(f"plugins: {path} is writable by {'others' if info.st_mode & 0o002 else 'its group'} "
                          f"(mode {stat.S_IMODE(info.st_mode):o}); refusing to run code from it (chmod go-w it)")


def load_plugins(config: Config, base_dir: str = ".") -> Optional["Plugins"]:
    """This config's hooks (blocking file work), or None when there is none; every plugin loaded
    is named in the log with its hooks, at start and at each reload."""
    hooks: Dict[str, List[Hook]] = {kind: [] for kind in HOOK_KINDS}
    names = []
    if config.settings["filter_tools"]:
        hooks["request_hook"].append(("filter_tools", filter_tools_hook(config.settings["filter_tools"]), True))
        names.append("filter_tools")
    for path in plugin_paths(config, base_dir):
        for checked in dict.fromkeys((os.path.dirname(path), path)):
            check_plugin_owner(checked)
        module = load_plugin_module(path)
        names.append(os.path.basename(path))
        found = [kind for kind in HOOK_KINDS if callable(getattr(module, kind, None))]
        for kind in found:
            fn = getattr(module, kind)
            hooks[kind].append((os.path.basename(path), fn, takes_context(fn)))
        log.info("plugin %s loaded: %s", path, ", ".join(found) or "no hooks")
    if not any(hooks.values()):
        return None
    return Plugins(names, hooks["request_hook"], hooks["response_hook"], hooks["stream_event_hook"])


def run_hook(hook: Hook, kind: str, payload: Any, context: dict) -> Any:
    """One hook call: its result, or the mutated payload when it returned None. A hook that
    raises fails the request (never the server) with an error naming the plugin."""
    name, fn, with_context = hook
    try:
        result = fn(payload, context) if with_context else fn(payload)
    except Exception as exc:  # noqa: BLE001 - foreign code: the request fails, not the server
        log.warning("plugin %s: %s raised %s: %s", name, kind, exc.__class__.__name__, exc)
        raise PluginError(f"plugin {name} failed in {kind}: {exc.__class__.__name__}: {exc}") from None
    if result is None:
        return payload
    if not isinstance(result, dict):
        raise PluginError(f"plugin {name}: {kind} returned {type(result).__name__}, expected a dict or None")
    return result


def hook_context(x: "Exchange", target: Optional[Target]) -> dict:
    """The second argument of a hook: who asked for what, and where it goes."""
    return {"dialect": x.req.dialect, "requested_model": x.meter.requested, "request_id": x.req.id,
            "route": target.route if target else None,
            "provider": target.provider["name"] if target else None,
            "model": target.spec["model"] if target else None}


class Plugins:
    """The hooks of one config generation, in load order (see the essay above)."""

    def __init__(self, names: List[str], request: List[Hook], response: List[Hook], stream: List[Hook]):
        self.names = names
        self.request = request
        self.response = response
        self.stream = stream
        self.skipped: set = set()          # (kind, plugin name) of hooks over their budget

    def active(self, hooks: List[Hook], kind: str) -> List[Hook]:
        """The hooks of a kind not skipped for their time."""
        return [hook for hook in hooks if (kind, hook[0]) not in self.skipped]

    def skip(self, kind: str, name: str, why: str) -> None:
        """Skip a hook from now on (this generation), said once at WARNING."""
        self.skipped.add((kind, name))
        log.warning("plugin %s: %s %s; it is skipped from now on (until the config is reloaded)", name, kind, why)

    @staticmethod
    def chain(hooks: List[Hook], kind: str, payload: Any, context: dict, running: List[str]) -> Any:
        """The hooks in turn (blocking); `running` names the one at work, for a timeout to blame."""
        for hook in hooks:
            running[:] = [hook[0]]
            payload = run_hook(hook, kind, payload, context)
        return payload

    async def off_loop(self, x: "Exchange", kind: str, names: List[str], work: Callable[[List[str]], Any],
                       unhooked: Any) -> Any:
        """work(running) over the hooks `names` on a hook thread within HOOK_TIMEOUT (inline when
        all are BUILTIN_HOOKS); past it the hook at work is skipped from now on and this request
        goes on with `unhooked`."""
        running: List[str] = []
        if all(name in BUILTIN_HOOKS for name in names):
            return work(running)                  # no foreign code: no thread hop
        try:
            return await x.server.hook_workers.run(lambda: work(running), HOOK_TIMEOUT)
        except asyncio.TimeoutError:
            self.skip(kind, running[0] if running else "?", f"took over {HOOK_TIMEOUT:g}s")
            log.warning("request %s went on without its %ss", x.req.id, kind)
            return unhooked

    async def on_request(self, x: "Exchange", target: Target, payload: bytes) -> bytes:
        """An upstream request body through the request hooks (off the loop)."""
        hooks = self.active(self.request, "request_hook")
        if not hooks:
            return payload
        context = hook_context(x, target)
        return await self.off_loop(x, "request_hook", [h[0] for h in hooks], lambda running: json_bytes(
            self.chain(hooks, "request_hook", parse_json_body(payload), context, running)), payload)

    def hooked_build(self, x: "Exchange", build: Callable) -> Callable:
        """A request builder whose body goes through the request hooks."""
        if not self.request:
            return build

        async def hooked(target: Target) -> Tuple[str, List[Tuple[str, str]], bytes]:
            url, headers, payload = await build(target)
            return url, headers, await self.on_request(x, target, payload)
        return hooked

    async def on_response(self, x: "Exchange", answer: dict) -> dict:
        """A whole answer through the response hooks (off the loop, on a copy)."""
        hooks = self.active(self.response, "response_hook")
        if not hooks:
            return answer
        context = hook_context(x, x.target)
        return await self.off_loop(x, "response_hook", [h[0] for h in hooks], lambda running: self.chain(
            hooks, "response_hook", copy.deepcopy(answer), context, running), answer)

    async def on_response_bytes(self, x: "Exchange", raw: bytes) -> bytes:
        """A relayed JSON answer through the response hooks (bytes untouched without one)."""
        hooks = self.active(self.response, "response_hook")
        if not hooks:
            return raw
        context = hook_context(x, x.target)

        def work(running: List[str]) -> bytes:
            try:
                answer = loads_json(raw)
            except (ValueError, UnicodeDecodeError):
                return raw
            return json_bytes(self.chain(hooks, "response_hook", answer, context, running)) \
                if isinstance(answer, dict) else raw
        return await self.off_loop(x, "response_hook", [h[0] for h in hooks], work, raw)

    def on_event(self, event: Any, context: dict) -> Any:
        """One stream event through the stream hooks, on the loop and timed ("[DONE]" and
        other strings pass)."""
        for hook in self.active(self.stream, "stream_event_hook") if isinstance(event, dict) else ():
            started = time.perf_counter()
            event = run_hook(hook, "stream_event_hook", event, context)
            took = time.perf_counter() - started
            if took > STREAM_HOOK_BUDGET:
                self.skip("stream_event_hook", hook[0], f"took {took * 1000:.0f} ms on one event "
                          f"(it runs on the event loop; the budget is {STREAM_HOOK_BUDGET * 1000:.0f} ms)")
        return event

    def hooked_encode(self, x: "Exchange", encode: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
        """An event encoder that runs the stream hooks first."""
        if not self.stream:
            return encode
        context = hook_context(x, x.target)
        return lambda event: encode(self.on_event(event, context))

    def event_rewriter(self, x: "Exchange") -> Optional["EventRewriter"]:
        """For a relayed stream: the rewriter through the stream hooks, or None without one."""
        return EventRewriter(self, hook_context(x, x.target)) if self.stream else None


class EventRewriter:
    """A passthrough stream through the stream hooks: SSE decoded, each event hooked, re-encoded."""

    def __init__(self, plugins: Plugins, context: dict):
        self.plugins = plugins
        self.context = context
        self.decoder = SSEDecoder()

    def feed(self, data: bytes) -> bytes:
        """The rewritten events this chunk completes."""
        return self._encode(self.decoder.feed(data))

    def close(self) -> bytes:
        """The last event, if the stream ended without its blank line."""
        return self._encode(self.decoder.close())

    def _encode(self, events: List[Tuple[str, str]]) -> bytes:
        out = []
        for name, data in events:
            try:
                event = loads_event(data) if data != "[DONE]" else data
            except ValueError:
                event = data
            if isinstance(event, dict):
                data = json_text(self.plugins.on_event(event, self.context))
            out.append(format_sse(data, name or None))
        return b"".join(out)

# ---- Hot reload -------------------------------------------------------------------------------

# Settings whose new value needs a restart (bound socket, pool, token store, ledger thread).
RESTART_SETTINGS = ("host", "port", "home", "pool_size", "connect_timeout", "read_timeout",
                    "ssl_verify", "ca_bundle", "oauth_token", "usage_ledger", "usage_max_age_days",
                    "usage_max_rows")


class ConfigSource:
    """How main() loaded the config (--config, the environment, the CLI overrides), so that a
    reload repeats exactly that flow. Once a config file was read it stays the one in use: only
    --config / CLAUDE_PROXY_CONFIG choose another, so a default <home>/config.json that an editor
    unlinks and creates again is never taken for "no file" (the built-in defaults)."""

    def __init__(self, cli_path: Optional[str], env: Mapping[str, str], cli: Optional[dict] = None):
        self.cli_path = cli_path
        self.env = dict(env)
        self.cli = dict(cli or {})
        self.used: Optional[str] = None           # the config file the last good load read

    def path(self) -> Optional[str]:
        """The config file in use: the one read before, else looked up (the default may appear later)."""
        return config_path(self.cli_path, self.env) or self.used

    def load(self) -> Config:
        """load_config() as main() calls it (blocking); ConfigMissing when the file it read is gone."""
        path = self.path()
        try:
            config = load_config(path, self.env, self.cli)
        except ConfigError:
            if path and path == self.used and not os.path.lexists(path):
                raise ConfigMissing(f"config file {path} is missing (an editor saving it?): the running config "
                                    "stays, and the reload is retried when the file is back") from None
            raise
        self.used = path
        return config

    def base_dir(self) -> str:
        """The folder relative plugin paths start from: the config file's, else the working one."""
        path = self.path()
        return os.path.dirname(os.path.abspath(path)) if path else os.getcwd()

    def files(self, config: Config) -> List[str]:
        """The files to watch: the config file (or where the default one would be), .env, the
        models file, the plugins and the home plugins folder."""
        home = os.path.expanduser(self.env.get("CLAUDE_PROXY_HOME") or SETTINGS["home"][2])
        paths = [self.path() or os.path.join(home, "config.json"), ".env", config.files.get("models"),
                 plugin_folder(config)]
        try:
            paths += plugin_paths(config, self.base_dir())
        except (ConfigError, OSError):
            pass                                    # reported by the reload that follows
        return list(dict.fromkeys(os.path.abspath(os.path.expanduser(p)) for p in paths if p))


def file_signature(path: str) -> Optional[Tuple[int, int]]:
    """(mtime in ns, size) of a file, None when it is missing."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


def watched_signatures(server: "ProxyServer") -> Dict[str, Optional[Tuple[int, int]]]:
    """Each watched file's signature now (one stat each)."""
    return {path: file_signature(path) for path in server.source.files(server.config)}


def restart_needed(boot: Config, config: Config) -> List[str]:
    """The settings that differ from the ones the server started with and need a restart."""
    keys = [key for key in RESTART_SETTINGS if boot.settings.get(key) != config.settings.get(key)]
    return keys + (["oauth"] if boot.oauth != config.oauth else [])


def apply_config(server: "ProxyServer", config: Config, plugins: Optional[Plugins]) -> None:
    """Swap in a new generation at once (no await in between): new requests use it."""
    old = server.config
    restart = restart_needed(server.ops.boot_config, config)
    server.config, server.plugins = config, plugins
    server.key_pools = key_pools_for(config)          # disabled keys get another chance
    server.generation += 1
    server.exposed = not is_loopback(server.host or config.settings["host"]) and \
        not config.settings.get("proxy_api_key")
    for secret in config.secret_values():
        server.redactor.add(secret)
    if config.settings["log_level"] != old.settings["log_level"]:
        logging.getLogger("claude_proxy").setLevel(config.settings["log_level"].upper())
    if restart:
        log.warning("config reload: %s changed and takes effect after a restart", ", ".join(restart))
    for line in config.warnings:
        if line not in old.warnings:               # said at start, or new with this edit
            log.warning("config reload: %s", line)
    server.ops.config_loaded(restart)


class Reading(NamedTuple):
    """One reload's blocking part: the watched files before, the new generation (or the error),
    and the files the new generation watches as they were then."""
    before: Dict[str, Optional[Tuple[int, int]]]
    config: Optional[Config]
    plugins: Optional[Plugins]
    after: Dict[str, Optional[Tuple[int, int]]]
    error: Optional[Exception]


def read_generation(server: "ProxyServer") -> Reading:
    """Stat the watched files, load the config and its plugins (blocking; in a DaemonWorkers thread)."""
    before = watched_signatures(server)
    try:
        config = server.source.load()
        check_exposure(config, server.host or config.settings["host"])
        plugins = load_plugins(config, server.source.base_dir())
    except (ConfigError, OSError) as exc:
        return Reading(before, None, None, {}, exc)
    after = {path: before[path] if path in before else file_signature(path) for path in server.source.files(config)}
    return Reading(before, config, plugins, after, None)


async def reload_config(server: "ProxyServer", reason: str) -> bool:
    """Load the config again, exactly as at start, and swap it in when it is valid; an invalid
    one keeps the old generation and is logged and shown with its key path. The files are read
    in a thread of their own within CONFIG_READ_TIMEOUT and outside the reload lock, which covers
    the swap only (a FIFO or a hung mount never wedges a reload, SIGHUP or SIGTERM); of two
    reloads that overlap, an older reading never replaces a newer one."""
    ops = server.ops
    ops.reload_seq += 1
    ticket = ops.reload_seq
    try:
        reading = await ops.read_off_loop(lambda: read_generation(server))
    except ConfigError as exc:
        return reload_failed(server, reason, exc)
    async with ops.reload_lock():
        if reading.error is not None:
            ops.file_signatures = reading.before
            return reload_failed(server, reason, reading.error)
        if ticket < ops.applied_seq:
            return False                          # a reload that started later was applied already
        ops.applied_seq = ticket
        apply_config(server, reading.config, reading.plugins)
        ops.file_signatures = reading.after       # the files as they were read
        log.info("config reloaded (%s): generation %d", reason, server.generation)
        return True


def reload_failed(server: "ProxyServer", reason: str, exc: Exception) -> bool:
    """Keep the running generation, and say why (a vanished file as a warning: it is retried)."""
    server.ops.config_failed(str(exc))
    server.ops.config_missing = isinstance(exc, ConfigMissing)
    level = logging.WARNING if server.ops.config_missing else logging.ERROR
    log.log(level, "config reload (%s) failed; generation %d stays: %s", reason, server.generation, exc)
    return False


class ConfigWatcher:
    """Polls the config's files (one stat each per reload_interval) and reloads on a change;
    every reload (SIGHUP too) records the signatures of the files it read."""

    def __init__(self, server: "ProxyServer"):
        self.server = server
        server.ops.file_signatures = watched_signatures(server)

    async def run(self) -> None:
        """Poll until cancelled (reload_interval 0 pauses polling, except to retry a config file
        that went missing; SIGHUP still reloads)."""
        while True:
            interval = self.server.config.settings["reload_interval"]
            await asyncio.sleep(interval if interval > 0 else 1.0)
            if interval > 0 or self.server.ops.config_missing:
                await self.check()

    async def check(self) -> bool:
        """Reload if a file changed since the last reload read it; True when one did. The stats
        run off the loop (a hung mount must not stall every client); a hung one skips the poll."""
        try:
            now = await self.server.ops.read_off_loop(lambda: watched_signatures(self.server))
        except ConfigError as exc:
            log.debug("config watch skipped: %s", exc)
            return False
        if now == self.server.ops.file_signatures:
            return False
        await reload_config(self.server, "a watched file changed")
        return True


def install_reload_signal(loop: asyncio.AbstractEventLoop, server: "ProxyServer") -> None:
    """SIGHUP reloads the config (where the platform has it)."""
    sig = getattr(signal, "SIGHUP", None)
    if sig is None or server.source is None:
        return
    try:
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(reload_config(server, "SIGHUP")))
    except (NotImplementedError, RuntimeError, ValueError):
        log.debug("SIGHUP reload unavailable here")

# ---- Metrics: counters for /metrics -----------------------------------------------------------
#
# Counters and histograms live in memory, per process (Prometheus sums the instances), and are
# updated once per metered request from the record the ledger gets: a few dict updates and one
# bisect per histogram. Gauges (in flight, pooled keys) are read when scraped. Label values are
# bounded: dialect, route and provider come from a fixed set and the config, status is an HTTP
# status, and a model name the config does not know gets a series of its own only while fewer
# than METRIC_MODEL_NAMES such names were seen; later ones fold into "other"
# (metric_model_label), so clients choosing model names cannot grow the series without bound.

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)   # seconds
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
# claude_proxy_tokens_total's kind label -> the record's field
METRIC_TOKEN_KINDS = tuple(zip(("input", "output", "cache_read", "cache_write", "reasoning"), METER_FIELDS))
METRIC_MODEL_NAMES = 20            # model names outside the config given a series of their own
MAX_METRIC_LABEL = 100             # a longer model name folds into "other"


def configured_model_names(config: Config) -> frozenset:
    """Every model name the config knows: model ids, and the upstream names of models and routes."""
    specs = list(config.models.values()) + list(config.routes.values())
    return frozenset([spec["id"] for spec in config.models.values()] + [s["model"] for s in specs if s.get("model")])


def metric_model_label(known: frozenset, seen: set, model: Optional[str]) -> str:
    """A model name as a label value: a configured name, or one of the first METRIC_MODEL_NAMES
    others seen (`seen` grows up to that), else "other"."""
    if not model:
        return NO_LABEL
    if model in known or model in seen:
        return model
    if len(seen) < METRIC_MODEL_NAMES and len(model) <= MAX_METRIC_LABEL:
        seen.add(model)
        return model
    return OTHER_LABEL


def _observe(histograms: Dict[tuple, list], buckets: Tuple[float, ...], key: tuple, seconds: float) -> None:
    """Count one observation: its bucket (non-cumulative; the last is +Inf), the sum, the count."""
    counts = histograms.get(key)
    if counts is None:
        histograms[key] = counts = [0] * (len(buckets) + 1) + [0.0, 0]
    counts[bisect.bisect_left(buckets, seconds)] += 1
    counts[-2] += seconds
    counts[-1] += 1


class Metrics:
    """This process's counters and histograms since it started (see the essay above)."""

    def __init__(self) -> None:
        self.requests: Dict[tuple, int] = {}        # (dialect, route, provider, model, status)
        self.tokens: Dict[tuple, int] = {}          # (provider, model, kind)
        self.cost: Dict[tuple, float] = {}          # (provider, model)
        self.web_searches: Dict[tuple, int] = {}    # (provider, model)
        self.upstream_errors: Dict[tuple, int] = {}  # (provider, status)
        self.duration: Dict[tuple, list] = {}       # (provider, model) -> histogram counts
        self.ttft: Dict[tuple, list] = {}
        self.models_seen: set = set()
        self._known: Tuple[Optional[Config], frozenset] = (None, frozenset())

    def model_label(self, config: Config, model: Optional[str]) -> str:
        """metric_model_label against this config's names (collected once per generation)."""
        if self._known[0] is not config:
            self._known = (config, configured_model_names(config))
        return metric_model_label(self._known[1], self.models_seen, model)

    def observe(self, config: Config, record: UsageRecord, web_searches: int, upstream_error: bool) -> None:
        """Count one finished request."""
        provider = record.provider or NO_LABEL
        pm = (provider, self.model_label(config, record.upstream_model))
        key = (record.dialect or NO_LABEL, record.route or NO_LABEL) + pm + (str(record.status or NO_LABEL),)
        self.requests[key] = self.requests.get(key, 0) + 1
        for kind, field in METRIC_TOKEN_KINDS:
            count = getattr(record, field)
            if count:
                self.tokens[pm + (kind,)] = self.tokens.get(pm + (kind,), 0) + count
        if record.cost_usd:
            self.cost[pm] = self.cost.get(pm, 0.0) + record.cost_usd
        if web_searches:
            self.web_searches[pm] = self.web_searches.get(pm, 0) + web_searches
        if upstream_error:
            error_key = (provider, str(record.status or NO_LABEL))
            self.upstream_errors[error_key] = self.upstream_errors.get(error_key, 0) + 1
        _observe(self.duration, DURATION_BUCKETS, pm, record.duration_ms / 1000)
        if record.ttft_ms is not None:
            _observe(self.ttft, TTFT_BUCKETS, pm, record.ttft_ms / 1000)

# /metrics, the text exposition format (PROTOCOLS L): families of `# HELP`, `# TYPE`, samples.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PROVIDER_MODEL = ("provider", "model")
# family -> (type, help, label names); the samples come from Metrics or from the server's state
METRIC_FAMILIES: Dict[str, Tuple[str, str, Tuple[str, ...]]] = {
    "claude_proxy_requests_total": ("counter", "Requests answered, by client dialect, route, provider, upstream "
                                    "model and HTTP status", ("dialect", "route", "provider", "model", "status")),
    "claude_proxy_tokens_total": ("counter", "Tokens the upstream reported, by kind (input excludes cache reads "
                                  "and writes; reasoning is part of output)", PROVIDER_MODEL + ("kind",)),
    "claude_proxy_cost_usd_total": ("counter", "Estimated cost in USD at the configured or list prices",
                                    PROVIDER_MODEL),
    "claude_proxy_web_searches_total": ("counter", "Web searches the upstream ran (server_tool_use)", PROVIDER_MODEL),
    "claude_proxy_upstream_errors_total": ("counter", "Requests that ended in an upstream error (its HTTP status, "
                                           "or the proxy's 502/504 when it was unreachable)", ("provider", "status")),
    "claude_proxy_request_duration_seconds": ("histogram", "Time from the request to the end of the answer",
                                              PROVIDER_MODEL),
    "claude_proxy_time_to_first_token_seconds": ("histogram", "Time from the request to the first byte of the "
                                                 "upstream's answer", PROVIDER_MODEL),
    "claude_proxy_in_flight": ("gauge", "Requests being answered now (this scrape excluded)", ()),
    "claude_proxy_key_cooling": ("gauge", "1 while a pooled API key is cooling down after a 429/529 or disabled "
                                 "after a 401/403 (keys by their last four)", ("provider", "key")),
    "claude_proxy_build_info": ("gauge", "The running version (always 1)", ("version", "python")),
    "claude_proxy_start_time_seconds": ("gauge", "When this process started, in seconds since the epoch", ()),
}
_LABEL_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})


def format_metric_number(value: float) -> str:
    """A sample value: integers as they are, floats in full precision, +Inf, -Inf, NaN."""
    if isinstance(value, float):
        if value != value:
            return "NaN"
        if value in (float("inf"), float("-inf")):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return str(value)


def metric_line(name: str, labels: Iterable[Tuple[str, str]], value: float) -> str:
    """One sample line, its label values escaped (backslash, double quote, newline)."""
    text = ",".join(f'{key}="{str(label).translate(_LABEL_ESCAPES)}"' for key, label in labels)
    return f"{name}{{{text}}} {format_metric_number(value)}" if text else f"{name} {format_metric_number(value)}"


def counter_lines(name: str, series: Mapping[tuple, float]) -> List[str]:
    """The samples of a counter or gauge family kept as {label values: value}."""
    labels = METRIC_FAMILIES[name][2]
    return [metric_line(name, zip(labels, key), value) for key, value in sorted(series.items())]


def histogram_lines(name: str, buckets: Tuple[float, ...], series: Mapping[tuple, list]) -> List[str]:
    """The samples of a histogram family: cumulative buckets ending at +Inf, the sum, the count."""
    labels, lines = METRIC_FAMILIES[name][2], []
    for key, counts in sorted(series.items()):
        pairs, running = list(zip(labels, key)), 0
        for bound, count in zip(buckets + (float("inf"),), counts):
            running += count
            lines.append(metric_line(name + "_bucket", pairs + [("le", format_metric_number(float(bound)))], running))
        lines += [metric_line(name + "_sum", pairs, counts[-2]), metric_line(name + "_count", pairs, counts[-1])]
    return lines


def format_metrics(samples: Mapping[str, List[str]]) -> str:
    """The whole exposition: every family of METRIC_FAMILIES with its HELP and TYPE, then its samples."""
    lines: List[str] = []
    for name, (kind, text, _) in METRIC_FAMILIES.items():
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"] + samples.get(name, [])
    return "\n".join(lines) + "\n"


# ---- The server's record of itself ------------------------------------------------------------


class Operations:
    """This session's usage, the last requests, each provider's last error, the ledger, and the
    state of the config (load time, last error, settings that wait for a restart)."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.started_at = clock()
        self.boot_config = config
        self.session = UsageTotals()
        self.recent: "collections.deque[UsageRecord]" = collections.deque(maxlen=RECENT_REQUESTS)
        self.provider_errors: Dict[str, dict] = {}
        self.ledger = open_ledger(config, clock)
        self.metrics = Metrics()
        self.config_loaded_at = self.started_at
        self.config_error: Optional[dict] = None
        self.restart_needed: List[str] = []
        self.file_signatures: Dict[str, Optional[Tuple[int, int]]] = {}
        self.watcher: Optional[asyncio.Future] = None
        self.config_missing = False               # the last reload found the config file gone
        self.reload_seq = self.applied_seq = 0    # reloads started, and the latest one applied
        self._reload_lock: Optional[asyncio.Lock] = None
        self._reading: Optional[asyncio.Future] = None   # a config read still in its thread
        self._readers = DaemonWorkers(1, "config-read")
        self._table_prices: Dict[str, Tuple[Optional[float], ...]] = {}
        self._unconfigured_models: set = set()
        self._traffic: Optional[Tuple[float, asyncio.Future]] = None     # (built at, the traffic charts' data)

    def start(self, server: "ProxyServer") -> None:
        """Watch the config files, when the server knows how to reload."""
        if server.source is not None:
            self.watcher = asyncio.ensure_future(ConfigWatcher(server).run())

    async def close(self) -> None:
        """Stop watching; write the ledger's last rows (off the loop)."""
        if self.watcher is not None:
            self.watcher.cancel()
            await asyncio.gather(self.watcher, return_exceptions=True)
        if self.ledger is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.ledger.close)

    def reload_lock(self) -> asyncio.Lock:
        """One swap of generations at a time (created inside the running loop)."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        return self._reload_lock

    async def read_off_loop(self, fn: Callable[[], Any]) -> Any:
        """fn() (config file work) in a thread within CONFIG_READ_TIMEOUT, one at a time: after an
        earlier read (a poll and a SIGHUP at once), or ConfigError when that one hangs (a hung
        mount) rather than another thread."""
        if self._reading is not None and not self._reading.done():
            done, _ = await asyncio.wait({self._reading}, timeout=CONFIG_READ_TIMEOUT)
            if not done:
                raise ConfigError("the config files are still being read by an earlier reload (a hung file "
                                  "system?); the running config stays")
        self._reading = self._readers.submit(fn)
        try:
            return await asyncio.wait_for(asyncio.shield(self._reading), CONFIG_READ_TIMEOUT)
        except asyncio.TimeoutError:
            raise ConfigError(f"reading the config files took over {CONFIG_READ_TIMEOUT:.0f}s (a FIFO or a hung "
                              "mount?); the running config stays") from None

    def request_done(self, x: "Exchange", started: float) -> None:
        """Account one finished request the handler metered (x.meter.requested set)."""
        if x.meter.requested is None:
            return
        record = self.record_of(x, started)
        self.session.add_record(record)
        self.recent.append(record)
        upstream_error = isinstance(x.error, (UpstreamError, UpstreamStatus, AuthError)) and x.target is not None
        if upstream_error:
            self.note_provider_error(x)
        self.metrics.observe(x.config, record, x.meter.web_search_requests, upstream_error)
        if self.ledger is not None:
            self.ledger.add(record)

    def record_of(self, x: "Exchange", started: float) -> UsageRecord:
        """The ledger row of one request."""
        elapsed = time.monotonic() - started
        target, meter, error = x.target, x.meter, x.error
        tokens = meter.tokens()
        ttft = None if meter.first_byte_at is None else round((meter.first_byte_at - started) * 1000, 1)
        return UsageRecord(
            self.clock() - elapsed, x.req.dialect, self.model_label(x.config, meter.requested),
            target and target.route,
            target and target.provider["name"], target and target.spec["model"],
            x.out.status or (error.status if error else None), error.error_type if error else None,
            *tokens, ttft, round(elapsed * 1000, 1),
            request_cost(self.prices(target.spec), tokens) if target else None, meter.key,
            client_session_id(x.req.headers))

    def model_label(self, config: Config, requested: str) -> str:
        """The name the totals and the ledger keep for a requested model: itself when it is a
        configured model or names a route, or is among the first MAX_UNCONFIGURED_MODELS other
        names; OTHER_MODELS after them (client-chosen names must not grow memory or disk)."""
        if requested in self._unconfigured_models or requested in config.models or \
                any(requested.lower() in (route.lower(), route_alias(route).lower()) for route in config.routes):
            return requested
        if len(self._unconfigured_models) >= MAX_UNCONFIGURED_MODELS:
            return OTHER_MODELS
        self._unconfigured_models.add(requested)
        return requested

    def prices(self, spec: dict) -> Optional[Prices]:
        """The spec's prices; table rows are looked up once per model name."""
        model = spec.get("model") or ""
        row = self._table_prices.get(model)
        if row is None:
            if len(self._table_prices) >= 1024:          # client-chosen names on provider routes
                self._table_prices.clear()
            row = self._table_prices[model] = table_prices(model)
        return model_prices(spec, row)

    def note_provider_error(self, x: "Exchange") -> None:
        """Remember the provider's last error for the status page (secrets scrubbed)."""
        exc = x.error
        redactor = x.server.redactor
        message = upstream_error_detail(exc.body, redactor.scrub)[1] if isinstance(exc, UpstreamStatus) else exc.message
        self.provider_errors[x.target.provider["name"]] = {
            "at": iso_time(self.clock()), "status": exc.status, "type": exc.error_type,
            "message": redactor.clip(message, 300)}

    async def ledger_totals(self, since: float) -> Optional[dict]:
        """The ledger's T object since `since`, after a flush (off the loop); None without one."""
        ledger = self.ledger
        if ledger is None:
            return None

        def read() -> dict:
            ledger.flush()
            return ledger.totals(since)
        return await asyncio.get_running_loop().run_in_executor(None, read)

    async def traffic(self) -> dict:
        """The traffic charts' data, at most TRAFFIC_REFRESH seconds old and built off the loop
        (one build shared by every page asking meanwhile)."""
        now = self.clock()
        if self._traffic is None or now - self._traffic[0] >= TRAFFIC_REFRESH:
            records = list(self.recent)
            self._traffic = (now, asyncio.ensure_future(run_off_loop(self.build_traffic, now, records)))
        return await asyncio.shield(self._traffic[1])

    def build_traffic(self, now: float, records: List[UsageRecord]) -> dict:
        """chart_series of the ledger's rows of the longest window, else of these records (blocks)."""
        longest = max(step * count for _, step, count in CHART_WINDOWS)
        source, rows = "session", [tuple(getattr(r, field) for field in CHART_FIELDS) for r in records]
        if self.ledger is not None:
            try:
                source, rows = "ledger", self.ledger.chart_rows(now - longest)
            except ProxyError as exc:
                log.debug("traffic charts from this session: %s", exc.message)
        return dict(chart_series(rows, now), source=source)

    async def session_usage(self, session_id: str) -> dict:
        """One client session's usage: from the ledger after a flush (off the loop), else from
        the last requests this process keeps."""
        ledger = self.ledger
        if ledger is None:
            records = [record for record in self.recent if record.session_id == session_id]
            counts = _zero_counts()
            for record in records:
                _accumulate(counts, record_counts(record))
            last = {field: getattr(records[-1], field) for field in SESSION_LAST_FIELDS} if records else None
            return session_summary(session_id, counts, last)

        def read() -> dict:
            ledger.flush()
            return ledger.session(session_id)
        return await run_off_loop(read)

    def ledger_info(self) -> dict:
        """Where the ledger is and whether it works."""
        if self.ledger is None:
            return {"enabled": False}
        return {"enabled": True, "path": self.ledger.path, "error": self.ledger.error,
                "rows_written": self.ledger.rows_written, "rows_pending": self.ledger.rows_pending,
                "rows_dropped": self.ledger.rows_dropped}

    def config_loaded(self, restart: List[str]) -> None:
        """A reload succeeded."""
        self.config_loaded_at = self.clock()
        self.config_error, self.config_missing = None, False
        self.restart_needed = restart

    def config_failed(self, message: str) -> None:
        """A reload failed: the message (with its key path) stays until the next good one."""
        self.config_error = {"message": message, "at": iso_time(self.clock())}

# ---- Doctor: can each provider a route uses be reached, and does it take our credentials? ------
#
# For every provider in use: DNS, TCP, TLS (https only), then credentials (its model list; with
# deep, a 1-token request), each step only after the one before passed; then the Claude login
# when a provider may use it. Through HTTPS_PROXY, DNS and TCP are checked for the proxy and TLS
# through its tunnel. Each check is one line with a fix.

DOCTOR_FIXES = {
    "dns": "check the host in providers.{provider}.base_url, this machine's DNS, or set HTTPS_PROXY "
           "if this network needs a proxy",
    "tcp": "is the service running on that port? a firewall, VPN or required proxy may be in the way",
    "tls": "behind a TLS-inspecting proxy or a private CA, set CA_BUNDLE to its CA file "
           "(SSL_VERIFY=false only to test)",
    "credentials": "check the key {hint}: the provider rejected it",
    "request": "read the provider's answer; check the model names under routes and models",
    "login": "run `python3 claude_proxy.py login` (or `import-claude-code`)",
}
DOCTOR_MARKS = {"ok": "ok  ", "skip": "--  ", "fail": "FAIL", "note": "note"}
DOCTOR_DETAIL_CHARS = 300                                # a check's detail, secrets masked first
DOCTOR_MODEL = {"anthropic": "claude-haiku-4-5"}       # a --deep request on a pass-through route


def _check(provider: str, name: str, status: str, detail: str, fix: str = "") -> dict:
    """One doctor line's data."""
    return {"provider": provider, "check": name, "status": status, "detail": detail,
            "fix": fix if status == "fail" else ""}


def format_check(check: dict) -> str:
    """One doctor line for the terminal."""
    line = f"{DOCTOR_MARKS[check['status']]} {check['provider']:<16} {check['check']:<12} {check['detail']}"
    return line + (f"  -> fix: {check['fix']}" if check["fix"] else "")


def used_providers(config: Config) -> List[dict]:
    """The providers a route or a model names, in config order."""
    names = [spec["provider"] for spec in list(config.routes.values()) + list(config.models.values())]
    return [config.providers[name] for name in dict.fromkeys(names)]


def key_hint(provider: dict) -> str:
    """Where the provider's key comes from, for a fix line."""
    env = provider.get("api_key_env")
    return f"${env}" if env else f"providers.{provider['name']}.api_key"


def _error_text(exc: BaseException) -> str:
    """A short reason for a failed network step."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__


async def check_dns(provider: str, host: str, port: int, timeout: float) -> dict:
    """Resolve the host."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        return _check(provider, "dns", "fail", f"{host}: {_error_text(exc)}",
                      DOCTOR_FIXES["dns"].format(provider=provider))
    return _check(provider, "dns", "ok", f"{host} -> {infos[0][4][0]}")


async def check_tcp(provider: str, host: str, port: int, timeout: float) -> dict:
    """Open (and close) a TCP connection."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        return _check(provider, "tcp", "fail", f"{host}:{port}: {_error_text(exc)}", DOCTOR_FIXES["tcp"])
    writer.close()
    return _check(provider, "tcp", "ok", f"{host}:{port} connected")


async def check_tls(provider: str, host: str, port: int, context: ssl.SSLContext, timeout: float,
                    proxy: Optional[str]) -> dict:
    """A TLS handshake with the pool's context (through the proxy's tunnel when there is one)."""
    try:
        where = {"sock": await asyncio.wait_for(open_tunnel(proxy, host, port), timeout)} if proxy \
            else {"host": host, "port": port}
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(ssl=context, server_hostname=host, **where), timeout)
    except ssl.SSLCertVerificationError as exc:
        return _check(provider, "tls", "fail", f"{host}: certificate not trusted ({exc.verify_message})",
                      DOCTOR_FIXES["tls"])
    except (OSError, asyncio.TimeoutError) as exc:
        plain = isinstance(exc, asyncio.TimeoutError) or "WRONG_VERSION_NUMBER" in str(exc) or "record layer" in str(exc)
        fix = (f"the server at {host}:{port} does not speak TLS there (a plain-http server waits or answers "
               "in text): if it is http, write the base_url with http://") if plain else DOCTOR_FIXES["tls"]
        return _check(provider, "tls", "fail", f"{host}: handshake failed ({_error_text(exc)})", fix)
    version = writer.get_extra_info("ssl_object").version()
    writer.close()
    verified = "certificate verified" if context.verify_mode == ssl.CERT_REQUIRED else "NOT verified (SSL_VERIFY=false)"
    return _check(provider, "tls", "ok", f"{host}: {version}, {verified}")


def _answer_check(provider: dict, name: str, status: int, raw: bytes, what: str) -> dict:
    """A provider's HTTP answer to a doctor call as a check line."""
    if 200 <= status < 300:
        return _check(provider["name"], name, "ok", f"{what}: {status}")
    detail = f"{what}: {status} {upstream_error_detail(raw)[1]}"      # run_doctor scrubs, then cuts
    if status in (401, 403):
        return _check(provider["name"], name, "fail", detail, DOCTOR_FIXES["credentials"].format(hint=key_hint(provider)))
    return _check(provider["name"], name, "fail", detail, DOCTOR_FIXES["request"])


async def check_model_list(x: "Exchange", provider: dict, mode: str) -> dict:
    """One cheap authenticated call: the provider's model list."""
    anthropic = provider["format"] == "anthropic"
    url = provider["base_url"] + ("/v1/models" if anthropic else "/models")
    headers = x.credential_headers(provider, mode) + ([("anthropic-version", ANTHROPIC_VERSION)] if anthropic else [])
    try:
        response = await x.server.pool.request("GET", url, merge_headers(headers, provider["headers"]))
        raw = await response.read(1 << 20)
    except UpstreamError as exc:
        return _check(provider["name"], "credentials", "fail", exc.message, DOCTOR_FIXES["tcp"])
    if response.status in (404, 405):
        return _check(provider["name"], "credentials", "skip", f"GET {url}: {response.status}, no model list; "
                      "--deep checks with a request")
    return _answer_check(provider, "credentials", response.status, raw, f"GET {url}")


def doctor_spec(config: Config, provider: dict) -> Optional[dict]:
    """A model spec on this provider to send the --deep request to."""
    for spec in list(config.routes.values()) + list(config.models.values()):
        if spec["provider"] == provider["name"] and spec["model"]:
            return spec
    model = DOCTOR_MODEL.get(provider["format"])
    return dict(MODEL_DEFAULTS, id=model, provider=provider["name"], model=model) if model else None


async def check_request(x: "Exchange", provider: dict) -> dict:
    """--deep: a 1-token request through the proxy's own request builders."""
    spec = doctor_spec(x.config, provider)
    if spec is None:
        return _check(provider["name"], "request", "skip", "no model of this provider is configured to try")
    target = Target(spec, provider, "doctor")
    body = {"model": spec["model"], "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}
    try:
        if provider["format"] == "anthropic":
            url, headers, payload = await x.anthropic_call(target, body, b"", "/v1/messages")
        else:
            url, headers, payload = await x.openai_call(target, anthropic_to_openai_request(body, spec))
        response = await x.server.pool.request("POST", url, headers, payload)
        raw = await response.read(1 << 20)
    except ProxyError as exc:
        return _check(provider["name"], "request", "fail", exc.message, DOCTOR_FIXES["request"])
    return _answer_check(provider, "request", response.status, raw, f"1-token request to {spec['model']}")


async def check_credentials(x: "Exchange", provider: dict, deep: bool) -> dict:
    """The credentials step, by the provider's auth mode."""
    name, mode = provider["name"], await x.auth_mode(provider)
    if mode == "client":
        return _check(name, "credentials", "skip", "each client sends its own key (auth \"client\")")
    if mode == "api_key" and not provider.get("api_key"):
        return _check(name, "credentials", "fail", f"no API key ({key_hint(provider)} is not set)",
                      f"set {key_hint(provider)}")
    if deep:
        return await check_request(x, provider)
    if mode == "oauth":
        return _check(name, "credentials", "skip", "uses the Claude login (below); --deep sends a 1-token request")
    return await check_model_list(x, provider, mode)


async def check_provider(x: "Exchange", provider: dict, deep: bool) -> List[dict]:
    """The network steps then credentials, each only after the one before passed."""
    (scheme, host, port), _ = split_url(provider["base_url"])
    pool, name, timeout = x.server.pool, provider["name"], x.config.settings["connect_timeout"]
    proxy = pool.proxy_for(scheme, host)
    via = urllib.parse.urlsplit(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else None
    net_host, net_port = (via.hostname, via.port or 8080) if via else (host, port)
    steps = [lambda: check_dns(name, net_host, net_port, timeout), lambda: check_tcp(name, net_host, net_port, timeout)]
    if scheme == "https":
        steps.append(lambda: check_tls(name, host, port, pool.ssl_context(), timeout, proxy))
    steps.append(lambda: check_credentials(x, provider, deep))
    checks: List[dict] = []
    for step in steps:
        checks.append(await step())
        if checks[-1]["status"] == "fail":
            break
    return checks


def check_login(x: "Exchange") -> Optional[dict]:
    """The Claude login, when a provider uses it (auth oauth, or auto)."""
    modes = {p["auth"] for p in used_providers(x.config)}
    if not modes & {"oauth", "auto"}:
        return None
    status, required = x.server.oauth.tokens.status(), "oauth" in modes
    if not status["logged_in"]:
        return _check("claude", "login", "fail" if required else "skip",
                      "not logged in" + ("" if required else " (auth auto uses an API key or the client's key)"),
                      DOCTOR_FIXES["login"])
    if status["last_error"]:
        return _check("claude", "login", "fail", f"refresh failed: {status['last_error']}", DOCTOR_FIXES["login"])
    if status["expires_in_seconds"] == 0 and not status["refreshable"]:
        return _check("claude", "login", "fail", "the token has expired and cannot be refreshed", DOCTOR_FIXES["login"])
    refresh = ", refreshable" if status["refreshable"] else ""
    return _check("claude", "login", "ok", f"logged in ({status['source']}), expires "
                  f"{status['expires_at'] or 'unknown'}{refresh}")


async def run_doctor(x: "Exchange", deep: bool = False) -> List[dict]:
    """Every check, in order; details scrubbed of secrets (a provider may echo a key)."""
    checks: List[dict] = []
    for provider in used_providers(x.config):
        checks += await check_provider(x, provider, deep)
    login = check_login(x)
    checks += [login] if login else []
    for check in checks:
        check["detail"] = x.server.redactor.clip(check["detail"], DOCTOR_DETAIL_CHARS)
    return checks


def doctor_exchange(server: "ProxyServer") -> "Exchange":
    """An Exchange for the CLI doctor (no client: "client" credentials are skipped)."""
    return Exchange(server, Request("GET", "/test-connection", {}, b"", "127.0.0.1"), None)

# ---- Status page ----------------------------------------------------------------------------
#
# GET / with Accept: text/html serves STATUS_PAGE, one self-contained document (inline CSS and
# script, no external asset, a strict CSP); its script polls /status.json, the one endpoint it
# reads, and draws tables and small SVG charts with textContent only. Access follows /auth/*:
# loopback clients, or, with PROXY_API_KEY, the key: as a header, or once in the page's key form
# (or `/?key=`), which sets an HttpOnly SameSite=Strict cookie holding an HMAC of the key, never
# the key. Both refuse a request whose Host is not this proxy's (host_allowed, section 11: the
# one predicate the browser guard uses) or whose Origin is not exactly its own, port included (a
# DNS-rebinding or cross-site page); CORS_ORIGINS never opens them.
# Neither the page nor its JSON holds a secret: credentials appear as their source only.

STATUS_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>claude_proxy status</title>
<style>
:root{--bg:#f6f7f9;--card:#fff;--ink:#1d2330;--dim:#6b7280;--line:#e5e7eb;--in:#3b82f6;--cache:#93c5fd;
--out:#10b981;--cost:#f59e0b;--bad:#dc2626;--warn:#b45309;--ok:#059669}
@media (prefers-color-scheme:dark){:root{--bg:#111418;--card:#1a1f26;--ink:#e6e8eb;--dim:#9aa3ae;--line:#2a313a}}
*{box-sizing:border-box}body{margin:0;background:var(--bg);color:var(--ink);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:6px 18px;padding:16px 24px;background:var(--card);
border-bottom:1px solid var(--line)}
h1{font-size:18px;margin:0}h2{font-size:13px;margin:0 0 10px;text-transform:uppercase;letter-spacing:.06em;color:var(--dim)}
.meta{color:var(--dim)}.live{margin-left:auto;color:var(--dim)}.live b{color:var(--ok)}
main{padding:16px 24px;display:grid;gap:16px;grid-template-columns:repeat(auto-fit,minmax(min(420px,100%),1fr))}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 16px;min-width:0;overflow-x:auto}
.wide{grid-column:1/-1}
.kpis{display:grid;grid-template-columns:repeat(auto-fit,minmax(130px,1fr));gap:12px}
.kpi b{display:block;font-size:22px;font-variant-numeric:tabular-nums}.kpi span{color:var(--dim);font-size:12px}
table{width:100%;border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top;
overflow-wrap:break-word}th{color:var(--dim);font-weight:600;font-size:12px}td:first-child{white-space:nowrap}
td.n,th.n,.key{text-align:right;white-space:nowrap}.key{text-align:left}
.badge{display:inline-block;padding:0 6px;border-radius:9px;font-size:12px;background:var(--line)}
.s2{background:#d1fae5;color:#065f46}.s4{background:#fef3c7;color:#92400e}.s5{background:#fee2e2;color:#991b1b}
.banner{grid-column:1/-1;border-radius:8px;padding:10px 14px;border:1px solid}
.error{background:#fef2f2;border-color:#fecaca;color:#991b1b}.note{background:#fffbeb;border-color:#fde68a;color:#92400e}
.bad{color:var(--bad);overflow-wrap:anywhere}.dim{color:var(--dim)}dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px;margin:0}
dt{color:var(--dim)}dd{margin:0;overflow-wrap:anywhere}
.charts{display:grid;gap:18px 28px;grid-template-columns:repeat(auto-fit,minmax(min(400px,100%),1fr));margin-top:12px}
.controls{display:flex;flex-wrap:wrap;gap:8px;margin-bottom:8px}.seg{display:inline-flex;border:1px solid var(--line);border-radius:6px;overflow:hidden}
.seg button{border-radius:0;background:transparent;color:var(--ink);padding:4px 10px}.seg button.on{background:var(--in);color:#fff}
.swatch{white-space:nowrap;margin-right:10px}.chart{min-width:0}.chart svg{display:block;max-width:100%}svg .grid{stroke:var(--line)}
.total{float:right;text-transform:none;letter-spacing:0;color:var(--ink);font-variant-numeric:tabular-nums}
@media (max-width:600px){header,main{padding:10px 12px}.card{padding:12px}}
.legend{font-size:12px;color:var(--dim)}.legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 4px 0 10px}
svg text{fill:var(--ink);font-size:11px}svg .axis{fill:var(--dim)}
form{display:flex;gap:8px;margin-top:10px}input{flex:1;padding:7px 9px;border:1px solid var(--line);border-radius:6px;
background:var(--bg);color:var(--ink)}button{padding:7px 14px;border:0;border-radius:6px;background:var(--in);color:#fff}
[hidden]{display:none!important}
</style></head><body>
<header><h1>claude_proxy</h1><span class="meta" id="meta">loading&hellip;</span><span class="live" id="live"></span></header>
<main>
<section class="card wide" id="login" hidden><h2>Proxy key</h2>
<div id="login-text">This proxy needs its key (PROXY_API_KEY) to show its status.</div>
<form method="post" action="/"><input type="password" name="key" placeholder="PROXY_API_KEY" autocomplete="current-password" required>
<button type="submit">Open</button></form></section>
<div class="banner error" id="problem" hidden></div>
<div class="banner error" id="config-error" hidden></div>
<div class="banner note" id="restart" hidden></div>
<section class="card wide" id="status-body" hidden><div class="kpis" id="kpis"></div></section>
<section class="card wide" id="routes-card" hidden><h2>Routes</h2><table id="routes"></table></section>
<section class="card wide" id="providers-card" hidden><h2>Providers</h2><table id="providers"></table></section>
<section class="card" id="login-card" hidden><h2>Claude login</h2><dl id="claude"></dl></section>
<section class="card" id="config-card" hidden><h2>Config and ledger</h2><dl id="config"></dl></section>
<section class="card wide" id="traffic-card" hidden><h2 id="traffic-title">Traffic</h2>
<div class="controls"><span class="seg"><button type="button" data-window="hour">last hour</button><button type="button" data-window="day">last day</button></span>
<span class="seg"><button type="button" data-by="route">by route</button><button type="button" data-by="provider">by provider</button></span></div>
<div class="legend" id="traffic-legend"></div>
<div class="charts"><div><h2>Requests <span class="total" id="total-requests"></span></h2><div class="chart" id="chart-requests"></div></div>
<div><h2>Tokens <span class="total" id="total-tokens"></span></h2><div class="chart" id="chart-traffic-tokens"></div></div>
<div><h2>Cost <span class="total" id="total-cost"></span></h2><div class="chart" id="chart-traffic-cost"></div></div>
<div><h2>Latency p50 / p95</h2><div class="chart" id="chart-latency"></div></div></div></section>
<section class="card wide" id="charts-card" hidden><h2 id="charts-title">Usage</h2>
<div class="legend"><i style="background:var(--in)"></i>input<i style="background:var(--cache)"></i>cache
<i style="background:var(--out)"></i>output<i style="background:var(--cost)"></i>cost (USD)</div>
<div class="charts"><div><h2>Tokens by model</h2><div id="chart-tokens"></div></div>
<div><h2>Cost by model</h2><div id="chart-cost"></div></div>
<div><h2>Tokens per day</h2><div id="chart-days"></div></div>
<div><h2>Cost per day</h2><div id="chart-day-cost"></div></div></div></section>
<section class="card wide" id="recent-card" hidden><h2>Last requests</h2><table id="recent"></table></section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
function h(tag, attrs, ...kids) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const kid of kids) node.append(kid instanceof Node ? kid : String(kid ?? ""));
  return node;
}
function s(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
const int = (n) => n == null ? "\u2013" : Number(n).toLocaleString("en-US");
const usd = (c) => c == null ? "n/a" : "$" + (c < 1 ? c.toFixed(4) : c.toFixed(2));
const when = (iso) => iso ? new Date(iso).toLocaleString() : "\u2013";
const clock = (iso) => iso ? new Date(iso).toLocaleTimeString() : "\u2013";
function ago(sec) {
  if (sec == null) return "\u2013";
  const d = Math.floor(sec / 86400), hr = Math.floor(sec % 86400 / 3600), m = Math.floor(sec % 3600 / 60);
  return d ? `${d}d ${hr}h` : hr ? `${hr}h ${m}m` : m ? `${m}m ${Math.floor(sec % 60)}s` : `${Math.floor(sec)}s`;
}
function table(id, head, rows) {
  const el = $(id);
  el.replaceChildren(h("tr", {}, ...head.map(([t, cls]) => h("th", cls ? {class: cls} : {}, t))));
  for (const row of rows) el.append(h("tr", {}, ...row.map((cell, i) =>
    h("td", head[i][1] ? {class: head[i][1]} : {}, cell))));
  if (!rows.length) el.append(h("tr", {}, h("td", {colspan: head.length, class: "dim"}, "none yet")));
}
function dl(id, pairs) {
  $(id).replaceChildren(...pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}
function badge(status) {
  return h("span", {class: "badge s" + String(status || 0)[0]}, status ?? "\u2013");
}
function tokensOf(c) { return (c.input_tokens || 0) + (c.cache_read_input_tokens || 0) + (c.cache_creation_input_tokens || 0); }
function hbars(rows, segments, fmt, width) {
  const W = Math.max(300, width || 520), row = 24, left = Math.min(150, W * 0.35), right = 70, H = Math.max(row, rows.length * row) + 4;
  const svg = s("svg", {viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img"});
  const max = Math.max(1e-12, ...rows.map((r) => segments.reduce((a, [f]) => a + f(r.v), 0)));
  rows.forEach((r, i) => {
    const y = i * row + 4;
    const fit = Math.floor((left - 8) / 6.5);
    svg.append(s("text", {x: left - 8, y: y + 13, "text-anchor": "end"}, r.k.length > fit ? r.k.slice(0, fit - 1) + "\u2026" : r.k));
    let x = left, total = 0;
    for (const [f, color, name] of segments) {
      const v = f(r.v), w = (W - left - right) * v / max;
      total += v;
      if (w > 0) { const bar = s("rect", {x, y, width: Math.max(w, 1), height: row - 8, rx: 2, fill: color});
        bar.append(s("title", {}, `${r.k} ${name}: ${fmt(v)}`)); svg.append(bar); x += w; }
    }
    svg.append(s("text", {x: x + 6, y: y + 13, class: "axis"}, fmt(total)));
  });
  if (!rows.length) svg.append(s("text", {x: 4, y: 16, class: "axis"}, "no usage yet"));
  return svg;
}
function vbars(days, f, color, fmt, width) {
  const W = Math.max(300, width || 520), H = 130, bottom = 18, top = 14, n = days.length, bw = (W - 10) / Math.max(n, 1);
  const svg = s("svg", {viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img"});
  const max = Math.max(1e-12, ...days.map(([, c]) => c ? f(c) : 0));
  days.forEach(([day, c], i) => {
    const v = c ? f(c) : 0, bh = (H - bottom - top) * v / max, x = 5 + i * bw;
    const bar = s("rect", {x: x + 2, y: H - bottom - bh, width: Math.max(bw - 4, 1), height: Math.max(bh, v ? 1 : 0), rx: 2, fill: color});
    bar.append(s("title", {}, `${day}: ${fmt(v)}`));
    svg.append(bar);
    const label = bw < 34 ? (i % 2 ? "" : day.slice(8)) : i === 0 || day.endsWith("-01") ? day.slice(5) : day.slice(8);
    svg.append(s("text", {x: x + bw / 2, y: H - 4, "text-anchor": "middle", class: "axis"}, label));
  });
  svg.append(s("text", {x: W - 4, y: 11, "text-anchor": "end", class: "axis"}, "max " + fmt(max)));
  return svg;
}
function lastDays(byDay, n, today) {
  const out = [], end = new Date(today + "T00:00:00Z");
  for (let i = n - 1; i >= 0; i--) {
    const day = new Date(end.getTime() - i * 86400000).toISOString().slice(0, 10);
    out.push([day, byDay[day]]);
  }
  return out;
}
const PALETTE = ["#3b82f6", "#10b981", "#f59e0b", "#8b5cf6", "#ef4444", "#06b6d4"], OTHER_COLOR = "#9ca3af";
const WINDOWS = {hour: "last hour", day: "last day"}, BYS = {route: "by route", provider: "by provider"};
const view = {window: "hour", by: "route"};
let lastStatus = null;
function readView() {
  const p = new URLSearchParams(location.hash.slice(1));
  if (p.get("window") in WINDOWS) view.window = p.get("window");
  if (p.get("by") === "route" || p.get("by") === "provider") view.by = p.get("by");
}
function pick(key, value) {
  view[key] = value;
  history.replaceState(null, "", `#window=${view.window}&by=${view.by}`);
  if (lastStatus) drawTraffic(lastStatus);
}
const ms = (v) => v == null ? "\u2013" : v >= 1000 ? (v / 1000).toFixed(v >= 10000 ? 0 : 1) + " s" : Math.round(v) + " ms";
const hhmm = (t) => new Date(t * 1000).toTimeString().slice(0, 5);
function chartFrame(el, metric, win, max, fmt) {
  const W = Math.max(260, Math.floor(el.clientWidth || 480)), H = 150, left = 52, right = 18, top = 10, bottom = 20;
  const svg = s("svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "data-metric": metric});
  const x = (i) => left + i * (W - left - right) / win.buckets, y = (v) => H - bottom - (H - bottom - top) * v / max;
  svg.append(s("line", {x1: left, x2: W - right, y1: H - bottom, y2: H - bottom, class: "grid"}),
             s("line", {x1: left, x2: W - right, y1: top, y2: top, class: "grid"}),
             s("text", {x: left - 6, y: top + 4, "text-anchor": "end", class: "axis"}, fmt(max)),
             s("text", {x: left - 6, y: H - bottom + 4, "text-anchor": "end", class: "axis"}, fmt(0)));
  const every = Math.ceil(win.buckets / Math.max(2, Math.floor((W - left) / 70)));
  for (let i = win.buckets - 1; i >= 0; i -= every)
    svg.append(s("text", {x: x(i) + (x(1) - x(0)) / 2, y: H - 5, "text-anchor": "middle", class: "axis"}, hhmm(win.start + i * win.step)));
  return [svg, x, y];
}
function stacked(el, win, groups, metric, fmt) {
  const totals = Array.from({length: win.buckets}, (_, i) => groups.reduce((a, [, g]) => a + g[metric][i], 0));
  const [svg, x, y] = chartFrame(el, metric, win, Math.max(...totals, 0) || 1, fmt);
  const bw = Math.max(1, x(1) - x(0) - 1);
  for (let i = 0; i < win.buckets; i++) {
    let base = 0;
    for (const [name, g, color] of groups) {
      const v = g[metric][i];
      if (!v) continue;
      const bar = s("rect", {x: x(i), y: y(base + v), width: bw, height: Math.max(1, y(base) - y(base + v)), fill: color,
        "data-group": name, "data-bucket": win.start + i * win.step, "data-value": v});
      bar.append(s("title", {}, `${hhmm(win.start + i * win.step)} ${name}: ${fmt(v)}`));
      svg.append(bar);
      base += v;
    }
  }
  if (!totals.some((v) => v)) svg.append(s("text", {x: x(0) + 8, y: 40, class: "axis"}, "no requests in this window"));
  el.replaceChildren(svg);
  return totals.reduce((a, v) => a + v, 0);
}
function latency(el, win, groups) {
  const values = groups.flatMap(([, g]) => g.p95.concat(g.p50)).filter((v) => v != null);
  const [svg, x, y] = chartFrame(el, "latency", win, Math.max(...values, 0) || 1, ms);
  const mid = (i) => x(i) + (x(1) - x(0)) / 2;
  for (const [name, g, color] of groups) for (const stat of ["p95", "p50"]) {
    let d = "", pen = "M";
    g[stat].forEach((v, i) => { if (v == null) { pen = "M"; return; } d += `${pen}${mid(i).toFixed(1)} ${y(v).toFixed(1)} `; pen = "L"; });
    if (!d) continue;
    const path = s("path", {d, fill: "none", stroke: color, "stroke-width": stat === "p50" ? 2 : 1.5,
      "stroke-dasharray": stat === "p95" ? "4 3" : "none", "data-group": name, "data-stat": stat,
      "data-values": g[stat].map((v) => v == null ? "" : v).join(",")});
    path.append(s("title", {}, `${name} ${stat}`));
    svg.append(path);
    g[stat].forEach((v, i) => { if (v != null) { const dot = s("circle", {cx: mid(i), cy: y(v), r: 2, fill: color});
      dot.append(s("title", {}, `${hhmm(win.start + i * win.step)} ${name} ${stat}: ${ms(v)}`)); svg.append(dot); } });
  }
  if (!values.length) svg.append(s("text", {x: x(0) + 8, y: 40, class: "axis"}, "no requests in this window"));
  el.replaceChildren(svg);
}
function drawTraffic(st) {
  lastStatus = st;
  const t = st.traffic, win = t[view.window], by = win["by_" + view.by];
  const names = Object.keys(by).sort((a, b) => (a === "other") - (b === "other"));
  const groups = names.map((name, i) => [name, by[name], name === "other" ? OTHER_COLOR : PALETTE[i % PALETTE.length]]);
  $("traffic-title").textContent = `Traffic, ${WINDOWS[view.window]} ${BYS[view.by]}` + (t.source === "ledger" ? "" : " (this session's last requests: the ledger is off)");
  for (const b of document.querySelectorAll("[data-window]")) b.classList.toggle("on", b.dataset.window === view.window);
  for (const b of document.querySelectorAll("[data-by]")) b.classList.toggle("on", b.dataset.by === view.by);
  $("traffic-legend").replaceChildren(...groups.map(([name, , color]) => h("span", {class: "swatch", "data-group": name},
    h("i", {style: `background:${color}`}), name)), h("span", {class: "dim"}, "latency: p50 solid, p95 dashed"));
  $("total-requests").textContent = int(stacked($("chart-requests"), win, groups, "requests", int));
  $("total-tokens").textContent = int(stacked($("chart-traffic-tokens"), win, groups, "tokens", int));
  $("total-cost").textContent = usd(stacked($("chart-traffic-cost"), win, groups, "cost", usd));
  latency($("chart-latency"), win, groups);
}
for (const b of document.querySelectorAll("[data-window]")) b.addEventListener("click", () => pick("window", b.dataset.window));
for (const b of document.querySelectorAll("[data-by]")) b.addEventListener("click", () => pick("by", b.dataset.by));
window.addEventListener("resize", () => { if (lastStatus) render(lastStatus); });
readView();
function render(st) {
  for (const id of ["status-body", "routes-card", "providers-card", "login-card", "config-card", "traffic-card", "charts-card", "recent-card"]) $(id).hidden = false;
  $("login").hidden = true; $("problem").hidden = true;
  $("meta").textContent = `v${st.version} \u00b7 up ${ago(st.uptime_seconds)} \u00b7 config generation ${st.config.generation}`;
  $("live").replaceChildren(h("b", {}, "\u25cf "), `updated ${clock(st.now)}`);
  const err = st.config.error;
  $("config-error").hidden = !err;
  if (err) $("config-error").textContent = `Config error at ${when(err.at)}, the previous config stays in force: ${err.message}`;
  $("restart").hidden = !st.config.restart_needed.length;
  $("restart").textContent = "Changed settings that take effect after a restart: " + st.config.restart_needed.join(", ");
  const se = st.session, c = st.counters;
  $("kpis").replaceChildren(...[["requests", int(se.requests)], ["errors", int(se.errors)], ["in flight", int(c.in_flight)],
    ["input tokens (with cache)", int(tokensOf(se))], ["output tokens", int(se.output_tokens)], ["cost this session", usd(se.cost_usd)]]
    .map(([k, v]) => h("div", {class: "kpi"}, h("b", {}, v), h("span", {}, k))));
  table("routes", [["route"], ["provider"], ["model"], ["format"]], st.routes.map((r) => [r.route, r.provider, r.model, r.format]));
  table("providers", [["provider"], ["endpoint"], ["credentials"], ["keys"], ["last error"]], st.providers.map((p) => [
    p.name, p.base_url, p.credential,
    p.keys ? h("span", {}, ...p.keys.map((k) => h("div", {class: k.state === "healthy" ? "key" : "key bad"},
      `${k.key} ${k.state}${k.cooling_until ? " until " + clock(k.cooling_until) : ""} \u00b7 ${k.requests} requests`))) : h("span", {class: "dim"}, "one"),
    p.last_error ? h("span", {class: "bad"}, `${clock(p.last_error.at)} ${p.last_error.status}: ${p.last_error.message}`) : h("span", {class: "dim"}, "none")]));
  const lg = st.login;
  dl("claude", [["state", lg.logged_in ? h("b", {}, "logged in") : h("span", {class: "dim"}, "not logged in")],
    ["source", lg.source || "\u2013"], ["expires", lg.expires_at ? `${when(lg.expires_at)} (in ${ago(lg.expires_in_seconds)})` : "\u2013"],
    ["refreshable", lg.refreshable ? "yes" : "no"], ["last error", lg.last_error ? h("span", {class: "bad"}, lg.last_error) : "none"]]);
  const led = st.ledger;
  dl("config", [["loaded", when(st.config.loaded_at)], ["config file", st.config.path || "(none: defaults and environment)"],
    ["plugins", st.plugins.length ? st.plugins.join(", ") : "none"],
    ["ledger", led.enabled ? (led.error ? h("span", {class: "bad"}, led.error) : led.path) : "off (USAGE_LEDGER=false)"],
    ["prices as of", st.prices_as_of]]);
  const u = st.usage, models = Object.entries(u.by_model).map(([k, v]) => ({k, v}));
  $("charts-title").textContent = `Usage (${u.source === "ledger" ? "ledger, last " + u.days + " days" : "this session"})`;
  models.sort((a, b) => (tokensOf(b.v) + b.v.output_tokens) - (tokensOf(a.v) + a.v.output_tokens));
  $("chart-tokens").replaceChildren(hbars(models.slice(0, 10), [[(v) => v.input_tokens, "var(--in)", "input"],
    [(v) => v.cache_read_input_tokens + v.cache_creation_input_tokens, "var(--cache)", "cache"], [(v) => v.output_tokens, "var(--out)", "output"]], int,
    $("chart-tokens").clientWidth));
  $("chart-cost").replaceChildren(hbars(models.filter((m) => m.v.cost_usd != null).slice(0, 10), [[(v) => v.cost_usd, "var(--cost)", "cost"]], usd,
    $("chart-cost").clientWidth));
  const days = lastDays(u.by_day, u.days, st.now.slice(0, 10));
  $("chart-days").replaceChildren(vbars(days, (v) => tokensOf(v) + v.output_tokens, "var(--in)", int, $("chart-days").clientWidth));
  $("chart-day-cost").replaceChildren(vbars(days, (v) => v.cost_usd || 0, "var(--cost)", usd, $("chart-day-cost").clientWidth));
  drawTraffic(st);
  table("recent", [["time"], ["client"], ["model"], ["route \u2192 upstream"], ["status"], ["in", "n"], ["out", "n"],
    ["cache", "n"], ["ttft", "n"], ["total", "n"], ["cost", "n"]], st.recent.map((r) => [
    clock(r.time), r.dialect, r.requested_model, `${r.route || "\u2013"} \u2192 ${r.provider || "\u2013"}/${r.upstream_model || "\u2013"}`,
    r.error_type ? h("span", {}, badge(r.status), " ", h("span", {class: "bad"}, r.error_type)) : badge(r.status),
    int(r.input_tokens), int(r.output_tokens),
    int(r.cache_read_input_tokens == null ? null : r.cache_read_input_tokens + r.cache_creation_input_tokens),
    r.ttft_ms == null ? "\u2013" : `${Math.round(r.ttft_ms)} ms`, `${Math.round(r.duration_ms)} ms`, usd(r.cost_usd)]));
}
function problem(text) { $("problem").hidden = false; $("problem").textContent = text; }
async function refresh() {
  let response;
  try { response = await fetch("/status.json", {credentials: "same-origin", cache: "no-store"}); }
  catch (e) { problem("The proxy does not answer (stopped?); retrying."); return; }
  if (response.status === 401) {
    $("login").hidden = false;
    $("meta").textContent = "locked: enter the proxy key";
    if (location.hash === "#wrong-key") $("login-text").textContent = "That key was not accepted; try again.";
    return;
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) { problem((body.error && body.error.message) || `status.json answered ${response.status}`); return; }
  render(body);
}
refresh();
setInterval(refresh, 3000);
</script></body></html>
"""
STATUS_PAGE_BYTES = STATUS_PAGE.encode("utf-8")
PAGE_COOKIE = "claude_proxy_page"
PAGE_HEADERS = [
    ("content-type", "text/html; charset=utf-8"), ("cache-control", "no-store"),
    ("content-security-policy", "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                "connect-src 'self'; img-src data:; form-action 'self'; frame-ancestors 'none'; "
                                "base-uri 'none'"),
    ("x-frame-options", "DENY"), ("referrer-policy", "no-referrer"), ("x-content-type-options", "nosniff")]
CREDENTIAL_TEXT = {"oauth": "Claude login", "client": "each client's own key", "none": "no credentials"}


def page_token(key: str) -> str:
    """The page cookie's value: an HMAC of the proxy key (the key itself never leaves)."""
    return hmac.new(key.encode(), b"claude_proxy status page", hashlib.sha256).hexdigest()


def cookie_value(headers: Headers, name: str) -> Optional[str]:
    """One cookie of the request's Cookie header."""
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def check_page_origin(x: "Exchange") -> None:
    """Refuse a request whose Host is not this proxy's (host_allowed, on any bind), or whose
    Origin, when sent, is not exactly the proxy's own, port included (same_origin)."""
    host = x.req.headers.get("host")
    if not host_allowed(x.config.settings, host, x.server.host):
        raise PermissionDenied(f"Host {log_safe(host or '')!r} is not this proxy's own name (add it to "
                               "ALLOWED_HOSTS if it is)")
    origin = x.req.headers.get("origin")
    if origin is not None and not same_origin(x.req):
        raise PermissionDenied(f"Origin {log_safe(origin)!r} may not read this proxy's status")


def check_page_access(x: "Exchange") -> None:
    """The status JSON: own Host/Origin, then (check_access let a keyless proxy's loopback peers
    through) the proxy key as a header or the page's cookie."""
    check_page_origin(x)
    key = x.config.settings.get("proxy_api_key")
    if not key:
        check_access(x.config, x.req)
        return
    cookie = cookie_value(x.req.headers, PAGE_COOKIE) or ""
    if not (hmac.compare_digest(offered_key(x.req).encode(), key.encode())
            or hmac.compare_digest(cookie.encode(), page_token(key).encode())):
        raise AuthError("the status page needs the proxy key: enter it in the page's form")


def public_url(url: str) -> str:
    """A base URL without userinfo, query or fragment."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else parts.netloc
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def credential_source(server: "ProxyServer", provider: dict, logged_in: bool) -> str:
    """Where a provider's credentials come from, never the credential."""
    mode, suffix = effective_auth(server, provider, logged_in), " (auth auto)" if provider["auth"] == "auto" else ""
    if mode != "api_key":
        return CREDENTIAL_TEXT[mode] + suffix
    env = provider.get("api_key_env")
    if not provider.get("api_key"):
        return f"API key missing (${env} is not set)" if env else "API key missing"
    return (f"API key from ${env}" if provider.get("api_key_from") == "env" else "API key in the config") + suffix


def route_rows(config: Config) -> List[dict]:
    """Each route and configured model: where it goes."""
    rows = [("route", name, spec) for name, spec in config.routes.items()]
    rows += [("model", spec["id"], spec) for spec in config.models.values()]
    return [{"route": name if kind == "route" else f"model {name}", "provider": spec["provider"],
             "model": spec["model"] or "(the client's model name)",
             "format": config.providers[spec["provider"]]["format"]} for kind, name, spec in rows]


def recent_rows(ops: Operations) -> List[dict]:
    """The last requests, newest first, as JSON objects."""
    return [dict(record._asdict(), time=iso_time(record.ts)) for record in reversed(ops.recent)]


def config_file_shown(server: "ProxyServer") -> Optional[str]:
    """The config file in use, as an absolute path (the one last read: no file work on the loop)."""
    path = server.source.used if server.source else None
    return os.path.abspath(path) if path else None


def status_document(server: "ProxyServer", usage: dict) -> dict:
    """Everything the status page shows; no secret."""
    config, ops, now = server.config, server.ops, server.ops.clock()
    login = server.oauth.tokens.status()
    providers = [{"name": p["name"], "format": p["format"], "base_url": public_url(p["base_url"]),
                  "credential": credential_source(server, p, login["logged_in"]),
                  "last_error": ops.provider_errors.get(p["name"]),
                  "keys": server.key_pools[p["name"]].snapshot() if p["name"] in server.key_pools else None}
                 for p in used_providers(config)]
    return {
        "version": VERSION, "now": iso_time(now), "started_at": iso_time(ops.started_at),
        "uptime_seconds": int(now - ops.started_at),
        "config": {"generation": server.generation, "loaded_at": iso_time(ops.config_loaded_at),
                   "path": config_file_shown(server), "error": ops.config_error,
                   "restart_needed": ops.restart_needed},
        "routes": route_rows(config), "providers": providers, "login": login,
        "counters": {"in_flight": max(0, sum(c.busy for c in server.connections) - 1),
                     "connections": len(server.connections)},
        "session": ops.session.as_dict(), "usage": usage, "recent": recent_rows(ops),
        "ledger": ops.ledger_info(), "plugins": server.plugins.names if server.plugins else [],
        "prices_as_of": PRICES_AS_OF}


async def chart_usage(server: "ProxyServer") -> dict:
    """The charts' data: the ledger's last USAGE_CHART_DAYS days, else this session."""
    ops = server.ops
    try:
        totals = await ops.ledger_totals(ops.clock() - USAGE_CHART_DAYS * 86400)
    except ProxyError:
        totals = None
    source = "session" if totals is None else "ledger"
    totals = totals or ops.session.as_dict()
    return {"source": source, "days": USAGE_CHART_DAYS, "by_model": totals["by_model"], "by_day": totals["by_day"]}

# ---- Operations endpoints ---------------------------------------------------------------------


def query_value(x: "Exchange", name: str) -> Optional[str]:
    """One query parameter."""
    values = urllib.parse.parse_qs(x.req.query).get(name)
    return values[0] if values else None


async def handle_index(x: "Exchange") -> None:
    """GET /: the status page for a browser (Accept: text/html), else the JSON identification;
    /?key=... logs a browser in."""
    if "text/html" not in x.req.headers.get("accept", ""):
        await handle_root(x)
        return
    check_page_origin(x)
    key = query_value(x, "key")
    if key is not None:
        await page_login(x, key)
        return
    await x.out.respond(200, PAGE_HEADERS, STATUS_PAGE_BYTES)


def form_field(form: bytes, name: str) -> str:
    """The first `name=` field of a urlencoded form (MAX_PUBLIC_BODY at most), decoded; nothing
    else of the form is parsed. "" when absent."""
    prefix = name.encode("ascii") + b"="
    for pair in form.split(b"&"):
        if pair.startswith(prefix):
            return urllib.parse.unquote_plus(pair[len(prefix):].decode("utf-8", "replace"), errors="replace")
    return ""


async def handle_page_login(x: "Exchange") -> None:
    """POST / from the page's key form (key=...): the cookie, and back to the page."""
    check_page_origin(x)
    await page_login(x, form_field(x.req.body, "key"))


async def page_login(x: "Exchange", offered: str) -> None:
    """303 to the page: with the cookie for the right key, to /#wrong-key otherwise."""
    key = x.config.settings.get("proxy_api_key")
    headers = [("cache-control", "no-store"), ("location", "/")]
    if key and hmac.compare_digest(offered.strip().encode(), key.encode()):
        headers.append(("set-cookie", f"{PAGE_COOKIE}={page_token(key)}; HttpOnly; SameSite=Strict; Path=/"))
    elif key:
        headers[1] = ("location", "/#wrong-key")
    await x.out.respond(303, headers, b"")


async def handle_status_json(x: "Exchange") -> None:
    """GET /status.json: the status page's data."""
    check_page_access(x)
    document = status_document(x.server, await chart_usage(x.server))
    document["traffic"] = await x.server.ops.traffic()
    await x.out.respond_json(200, document, [("cache-control", "no-store")])


async def handle_stats(x: "Exchange") -> None:
    """GET /v1/stats[?since=7d]: this session's usage and the ledger's (all time, or since)."""
    ops = x.server.ops
    since, ledger = parse_since(query_value(x, "since"), ops.clock()), ops.ledger_info()
    try:
        all_time = await ops.ledger_totals(since)
    except ProxyError as exc:
        all_time, ledger["error"] = None, exc.message
    await x.out.respond_json(200, {"session": ops.session.as_dict(), "all_time": all_time,
                                   "since": iso_time(since) if since else None,
                                   "session_started_at": iso_time(ops.started_at),
                                   "ledger": ledger, "prices_as_of": PRICES_AS_OF,
                                   "keys": {name: pool.snapshot() for name, pool in x.server.key_pools.items()}})


async def handle_session_stats(x: "Exchange") -> None:
    """GET /v1/stats/session?id=SESSION: one client session's usage and last request (what
    `statusline` shows), the ledger's rows flushed first so the last request is in."""
    check_page_access(x)
    session_id = query_value(x, "id")
    if not session_id:
        raise BadRequest("id: the client's session id (x-claude-code-session-id) is required", param="id")
    summary = await x.server.ops.session_usage(session_id[:MAX_SESSION_ID])
    await x.out.respond_json(200, summary, [("cache-control", "no-store")])


def metrics_samples(server: "ProxyServer") -> Dict[str, List[str]]:
    """Each family's samples: the counters, and the gauges read now."""
    m = server.ops.metrics
    keys = {(name, key["key"]): int(key["state"] != "healthy")
            for name, pool in server.key_pools.items() for key in pool.snapshot()}
    in_flight = max(0, sum(c.busy for c in server.connections) - 1)
    return {
        "claude_proxy_requests_total": counter_lines("claude_proxy_requests_total", m.requests),
        "claude_proxy_tokens_total": counter_lines("claude_proxy_tokens_total", m.tokens),
        "claude_proxy_cost_usd_total": counter_lines("claude_proxy_cost_usd_total", m.cost),
        "claude_proxy_web_searches_total": counter_lines("claude_proxy_web_searches_total", m.web_searches),
        "claude_proxy_upstream_errors_total": counter_lines("claude_proxy_upstream_errors_total", m.upstream_errors),
        "claude_proxy_request_duration_seconds": histogram_lines(
            "claude_proxy_request_duration_seconds", DURATION_BUCKETS, m.duration),
        "claude_proxy_time_to_first_token_seconds": histogram_lines(
            "claude_proxy_time_to_first_token_seconds", TTFT_BUCKETS, m.ttft),
        "claude_proxy_in_flight": counter_lines("claude_proxy_in_flight", {(): in_flight}),
        "claude_proxy_key_cooling": counter_lines("claude_proxy_key_cooling", keys),
        "claude_proxy_build_info": counter_lines("claude_proxy_build_info", {(VERSION, sys.version.split()[0]): 1}),
        "claude_proxy_start_time_seconds": counter_lines("claude_proxy_start_time_seconds",
                                                         {(): round(server.ops.started_at, 3)}),
    }


async def handle_metrics(x: "Exchange") -> None:
    """GET /metrics: this process's counters in the Prometheus text format, under the status
    page's access rule (loopback, or the proxy key, also as a Bearer token for a scrape config)."""
    check_page_access(x)
    body = format_metrics(metrics_samples(x.server)).encode("utf-8")
    await x.out.respond(200, [("content-type", METRICS_CONTENT_TYPE), ("cache-control", "no-store")], body)


async def handle_test_connection(x: "Exchange") -> None:
    """GET /test-connection[?deep=1]: the doctor's checks (503 when one fails)."""
    checks = await run_doctor(x, parse_bool(query_value(x, "deep") or "0"))
    ok = all(check["status"] != "fail" for check in checks)
    await x.out.respond_json(200 if ok else 503, {"ok": ok, "checks": checks})


def direct_target(config: Config, name: str) -> Target:
    """The model a test_conversion body names (a model id or "provider,model"), no routing."""
    try:
        spec = route_target("model", name, config.models, config.providers)
    except ConfigError:
        raise NotFound(f"model {name!r}: name a configured model id or \"provider,model\"; configured "
                       f"models: {', '.join(config.models) or '(none)'}", param="model") from None
    if spec["model"] is None:
        raise BadRequest(f"model {name!r} is a provider: name the upstream model as \"{name},MODEL\"", param="model")
    return Target(spec, config.providers[spec["provider"]], "test_conversion")


CREDENTIAL_HEADERS = frozenset(("authorization", "x-api-key", "api-key", "x-goog-api-key", "cookie",
                                "proxy-authorization"))


def redacted_headers(headers: List[Tuple[str, str]], redactor: Redactor) -> Dict[str, str]:
    """Request headers for display: credentials masked, any known secret scrubbed."""
    shown = {}
    for name, value in headers:
        if name in CREDENTIAL_HEADERS:
            scheme, _, token = value.partition(" ")
            value = f"{scheme} {mask(token)}" if token and scheme.lower() == "bearer" else mask(value)
        shown[name] = redactor.scrub(value)
    return shown


async def dry_run_request(x: "Exchange", body: dict) -> dict:
    """The upstream request test_conversion would send (plugins applied), not sent."""
    target = x.target
    if target.provider["format"] == "anthropic":
        url, headers, payload = await x.anthropic_call(target, body, x.req.body, "/v1/messages")
    else:
        openai_body = convert(BadRequest, "request", anthropic_to_openai_request, body, upstream_spec(target),
                              session_id=session_key(x.req.headers, body))
        url, headers, payload = await x.openai_call(target, openai_body)
    if x.plugins:
        payload = await x.plugins.on_request(x, target, payload)
    return {"dry_run": True, "method": "POST", "url": url, "provider": target.provider["name"],
            "format": target.provider["format"], "model": target.spec["model"],
            "headers": redacted_headers(headers, x.server.redactor), "body": json.loads(payload)}


async def handle_test_conversion(x: "Exchange") -> None:
    """POST /v1/messages/test_conversion[?dry_run=1]: an Anthropic request sent to the model its
    body names, bypassing routing; dry_run answers the converted upstream request instead."""
    body = await x.json_body({"model": str, "messages": list, "max_tokens": int})
    x.target = direct_target(x.config, body["model"])
    if parse_bool(query_value(x, "dry_run") or "0"):
        await x.out.respond_json(200, await dry_run_request(x, body))
        return
    x.meter.requested = body["model"]
    if x.target.provider["format"] == "anthropic":
        await anthropic_passthrough(x, body, "/v1/messages")
    else:
        await anthropic_via_openai(x, body)


# Ahead of section 11's table, so that GET / serves the page to browsers first.
ROUTES[:0] = [
    ("GET", "/", handle_index, True),
    ("POST", "/", handle_page_login, True),
    ("GET", "/status.json", handle_status_json, True),
    ("GET", "/v1/stats", handle_stats, True),
    ("GET", "/v1/stats/session", handle_session_stats, True),
    ("GET", "/metrics", handle_metrics, True),
    ("GET", "/test-connection", handle_test_connection, True),
    ("POST", "/v1/messages/test_conversion", handle_test_conversion, True),
]

# =============================================================================================
# 13. Server
#
# One asyncio server; a task per connection, none per request or chunk. Each connection loops:
# wait for the first byte of a request (idle timeout), read the head (slow-header timeout, 414,
# 431), the body (413, Expect: 100-continue), dispatch. While a handler runs, a watcher reads
# the socket: end-of-file means the client left, and the handler is cancelled so the upstream
# connection is closed at once. Shutdown stops accepting, closes idle connections and gives
# in-flight ones a grace period.
# =============================================================================================


class ClientConnection:
    """State of one client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.pending = b""
        self.busy = False
        self.task = asyncio.current_task()
        self.handler: Optional[asyncio.Task] = None
        peer = writer.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else "local"


def default_max_connections() -> int:
    """Half the open-file limit less a reserve (each client may hold an upstream socket too)."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return 1000
    if soft == resource.RLIM_INFINITY:
        return 10000
    return max(16, (soft - 64) // 2)


TOO_MANY_CONNECTIONS = http_error_bytes(503, "overloaded_error",
                                        "too many open connections to the proxy; retry shortly")


class ProxyServer:
    """Owns the config (and its generation and plugins), the upstream pool, the token manager and
    the operations record; serves connections."""

    def __init__(self, config: Config, *, redactor: Optional[Redactor] = None,
                 proxies: Optional[Mapping[str, str]] = None, clock: Callable[[], float] = time.time,
                 source: Optional[ConfigSource] = None):
        self.config = config
        self.source = source          # how to load the config again; None: no reload
        self.generation = 1
        self.plugins = load_plugins(config, source.base_dir() if source else os.getcwd())
        self.key_pools = key_pools_for(config)
        self.ops = Operations(config, clock=clock)
        self.host: Optional[str] = None
        settings = config.settings
        self.redactor = redactor or Redactor(config.secret_values())
        self.pool = ConnectionPool(lambda: make_ssl_context(settings["ssl_verify"], settings["ca_bundle"]),
                                   proxies or {}, settings["connect_timeout"], settings["read_timeout"],
                                   settings["pool_size"])
        self.oauth = OAuthService(config, self.pool, self.redactor, clock=clock)
        self.drops = DropLog()                    # which kinds of dropped fields were said at INFO
        self.hook_workers = DaemonWorkers(HOOK_WORKERS, "plugin-hook")   # request and response hooks
        self.model_lists = ModelLists()           # the providers' own /v1/models, cached
        self.responses = ResponseStore(os.path.join(config.home, "responses.db"),
                                       max_bytes=int(settings["responses_store_mb"] * 1024 * 1024),
                                       max_age=settings["responses_store_days"] * 86400, clock=clock)
        self.connections: set = set()
        self.max_connections = settings["max_connections"] or default_max_connections()
        self.buffered = 0             # request body bytes held by all connections
        self.closing = False
        self.exposed = False          # bound beyond loopback without a proxy key: no OAuth via auto
        self.loopback_bind = True
        self.log_limits: Dict[str, Tuple[float, int]] = {}    # message -> (last logged, suppressed)
        self._server: Optional[asyncio.AbstractServer] = None

    async def start(self, host: Optional[str] = None, port: Optional[int] = None) -> Tuple[str, int]:
        """Bind and start accepting; returns the bound address (ConfigError when it cannot)."""
        host = self.host = host or self.config.settings["host"]
        port = self.config.settings["port"] if port is None else port
        check_exposure(self.config, host)
        self.exposed = not is_loopback(host) and not self.config.settings.get("proxy_api_key")
        self.loopback_bind = is_loopback(host)
        await run_off_loop(self.oauth.tokens.record)          # read the saved login once, off the loop
        asyncio.get_running_loop().set_exception_handler(self._loop_exception)
        try:
            self._server = await asyncio.start_server(self._serve_connection, host, port, limit=MAX_HEADER_BYTES)
        except OSError as exc:
            raise ConfigError(listen_error(host, port, exc)) from None
        address = self._server.sockets[0].getsockname()
        self.ops.start(self)
        return address[0], address[1]

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """The event loop's error hook: a repeated message (accept() out of file descriptors,
        say) is logged once per 10 s with a count, not once per event."""
        message = context.get("message", "event loop error")
        now, (last, suppressed) = time.monotonic(), self.log_limits.get(message, (0.0, 0))
        if now - last < 10.0:
            self.log_limits[message] = (last, suppressed + 1)
            return
        self.log_limits[message] = (now, 0)
        exc = context.get("exception")
        detail = f": {type(exc).__name__}: {exc}" if exc else ""
        more = f" ({suppressed} more like it suppressed)" if suppressed else ""
        log.error("%s%s%s", message, detail, more)

    async def shutdown(self) -> None:
        """Stop accepting, close idle connections, let busy ones finish within the grace period;
        what is still running then is cut with an error in its client's dialect."""
        self.closing = True
        if self._server:
            self._server.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn.task.cancel()
        busy = [c.task for c in self.connections if c.busy]
        if busy:
            _, pending = await asyncio.wait(busy, timeout=self.config.settings["shutdown_grace"])
            for conn in [c for c in self.connections if c.task in pending]:
                (conn.handler or conn.task).cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self.pool.close()
        self.responses.close()
        await self.ops.close()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.connections) >= self.max_connections and not self._make_room():
            writer.write(TOO_MANY_CONNECTIONS)
            await linger(reader, writer, 0.2, 1 << 16)
            writer.close()
            self._loop_exception(asyncio.get_running_loop(), {"message": f"connection limit "
                                 f"({self.max_connections}, MAX_CONNECTIONS) reached; refusing clients"})
            return
        conn = ClientConnection(reader, writer)
        self.connections.add(conn)
        try:
            await self._connection_loop(conn)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self.connections.discard(conn)
            writer.close()

    def _make_room(self) -> bool:
        """Close one idle keep-alive connection so a new client can be served."""
        idle = next((c for c in self.connections if not c.busy), None)
        if idle is not None:
            self.connections.discard(idle)
            idle.task.cancel()
        return idle is not None

    async def _connection_loop(self, conn: ClientConnection) -> None:
        settings, first_request = self.config.settings, True
        while not self.closing:
            timeout = settings["header_timeout"] if first_request else settings["idle_timeout"]
            first = conn.pending or await wait_or_none(conn.reader.read(1), timeout)
            conn.pending, first_request = b"", False
            if not first:
                return
            conn.busy = True
            req = await self._read_request(conn, first)
            try:
                if req is None or not await self._read_body(conn, req):
                    return
                await self._run(conn, req)
            finally:
                self.buffered -= req.reserved if req else 0
            conn.busy = False
            if not req.keep_alive:
                return

    async def _read_request(self, conn: ClientConnection, first: bytes) -> Optional[Request]:
        """The head within its limits, checked before any body byte is read (the browser guard
        and the proxy key); a refusal is answered and ends the connection."""
        settings = self.config.settings
        try:
            head = await asyncio.wait_for(read_head(conn.reader, first), settings["header_timeout"])
            method, target, version, headers = parse_request_head(head)
        except asyncio.TimeoutError:
            return None
        except ProxyError as exc:
            await self._refuse(conn, Request("GET", "/", {}, b"", conn.peer), exc)
            return None
        req = Request(method, target, headers, b"", conn.peer)
        req.http10, req.keep_alive = version == "HTTP/1.0", keeps_alive(version, headers)
        try:
            check_browser_guard(settings, req, self.loopback_bind)
            check_access(self.config, req)
        except ProxyError as exc:
            await self._refuse(conn, req, exc)
            return None
        return req

    async def _read_body(self, conn: ClientConnection, req: Request) -> bool:
        """The body within BODY_TIMEOUT, its limit and the in-flight bound; False when refused. A
        path that answers without a key takes at most MAX_PUBLIC_BODY (the page's key form), so no
        request that has not authenticated costs the loop more than a few KiB."""
        settings = self.config.settings
        limit = MAX_PUBLIC_BODY if req.path in PUBLIC_PATHS else settings["max_body_bytes"]
        try:
            req.body = await asyncio.wait_for(read_body(
                conn.reader, conn.writer, req.headers, limit, not req.http10,
                lambda size: self.reserve_body(req, size)), settings["body_timeout"])
            return True
        except asyncio.TimeoutError:
            exc = ProxyError(f"the request body did not arrive within {settings['body_timeout']:.0f}s "
                             "(BODY_TIMEOUT)", status=408, error_type="timeout_error")
        except ProxyError as refusal:
            exc = refusal
        await self._refuse(conn, req, exc)
        return False

    def reserve_body(self, req: Request, size: int) -> None:
        """Count size more body bytes in flight (a body, or what stored items expand it by), or
        refuse with 503 past MAX_BUFFERED_BYTES."""
        if self.buffered + size > self.config.settings["max_buffered_bytes"]:
            raise ProxyError("the proxy holds too many large request bodies right now; retry shortly",
                             status=503, error_type="overloaded_error")
        self.buffered += size
        req.reserved += size

    async def _refuse(self, conn: ClientConnection, req: Request, exc: ProxyError) -> None:
        """Answer a request that will not be served, then end the connection."""
        req.keep_alive = False
        await render_safely(Exchange(self, req, ClientStream(conn.writer, closing=lambda: True)), exc)
        clip = self.redactor.clip
        access_log.info("%s %s refused status=%d %s", req.method, log_safe(clip(req.path, 200, shapes=False)),
                        exc.status, log_safe(clip(exc.message, 200, shapes=False)))
        conn.busy = False                               # nothing left to finish at shutdown
        await linger(conn.reader, conn.writer, 1.0, 16 << 20)

    async def _run(self, conn: ClientConnection, req: Request) -> None:
        """Dispatch one request. End of input from the client is not taken as leaving: one that
        half-closed after its request (`nc -N`) is answered; the handler is cancelled only when
        the connection is reset or lost (a write fails)."""
        out = ClientStream(conn.writer, req.method == "HEAD", chunked=not req.http10,
                           closing=lambda: not req.keep_alive or self.closing)
        handler = conn.handler = asyncio.ensure_future(dispatch(self, req, out))
        watcher = asyncio.ensure_future(conn.reader.read(1))
        await asyncio.wait((handler, watcher), return_when=asyncio.FIRST_COMPLETED)
        if not watcher.done():
            watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        if not watcher.cancelled():
            early = b"" if watcher.exception() else watcher.result()
            if early:
                conn.pending = early          # a pipelined next request: keep its first byte
            elif watcher.exception():
                handler.cancel()              # reset: the client is gone; stop, drop the upstream
            else:
                await self._until_lost(conn, handler, out)
            req.keep_alive = req.keep_alive and bool(early)
        await asyncio.gather(handler, return_exceptions=True)
        conn.handler = None
        if out.must_close:
            req.keep_alive = False

    @staticmethod
    async def _until_lost(conn: ClientConnection, handler: asyncio.Task, out: ClientStream) -> None:
        """After the client's end of input: let the handler finish unless the connection is lost
        (an open stream is probed with SSE comments: the second write to a socket the client
        closed entirely fails, so such a client is noticed within about a tenth of a second)."""
        lost = asyncio.ensure_future(conn.writer.wait_closed())
        pause = 0.02
        while not handler.done() and not lost.done():
            out.probe()
            await asyncio.wait((handler, lost), timeout=pause, return_when=asyncio.FIRST_COMPLETED)
            pause = min(pause * 2, 1.0)
        if not handler.done():
            handler.cancel()
        lost.cancel()
        await asyncio.gather(lost, return_exceptions=True)


async def linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seconds: float,
                 most: int) -> None:
    """After an answer to a request whose body was not read: stop sending, then read and drop
    what the client still sends for a moment, so that closing does not reset the answer away
    before the client read it (a lingering close, RFC 9112 9.6)."""
    loop, taken = asyncio.get_running_loop(), 0
    deadline = loop.time() + seconds
    try:
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        while taken < most and loop.time() < deadline:
            data = await asyncio.wait_for(reader.read(1 << 16), deadline - loop.time())
            if not data:
                return
            taken += len(data)
    except (asyncio.TimeoutError, ConnectionError, OSError):
        return


def listen_error(host: str, port: int, exc: OSError) -> str:
    """One line for a bind that failed."""
    if exc.errno in (48, 98, 10048):                 # EADDRINUSE on macOS, Linux, Windows
        return (f"cannot listen on {host}:{port}: the port is already in use (another claude_proxy?); "
                "stop it or choose another port with --port")
    if exc.errno in (13, 10013):
        return f"cannot listen on {host}:{port}: permission denied (ports below 1024 need privileges)"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


async def wait_or_none(awaitable: Awaitable[bytes], timeout: float) -> Optional[bytes]:
    """The awaitable's result, or None on timeout or a reset connection."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except (asyncio.TimeoutError, ConnectionError):
        return None


def check_exposure(config: Config, host: str) -> None:
    """Serving an OAuth provider beyond loopback requires PROXY_API_KEY."""
    login_saved = os.path.exists(os.path.join(config.home, "oauth_token.json"))
    has_token = bool(config.settings.get("oauth_token")) or login_saved
    uses_oauth = any(p["auth"] == "oauth" or (p["auth"] == "auto" and has_token) for p in config.providers.values())
    if not is_loopback(host) and uses_oauth and not config.settings.get("proxy_api_key"):
        raise ConfigError(f"refusing to serve on {host}: Claude credentials (OAuth login or token) would be "
                          "open to the network. Set PROXY_API_KEY, or bind 127.0.0.1.")


def upstream_notes(config: Config, has_login: bool) -> List[Tuple[int, str]]:
    """(level, line) for the start: every upstream URL not from the built-in defaults and where
    it came from (a .env one as a warning), and a login auto will not send to a foreign host."""
    notes = []
    for name, provider in config.providers.items():
        where = config.origins.get(f"providers.{name}.base_url", "default")
        if where != "default":
            level = logging.WARNING if where.startswith(".env") else logging.INFO
            notes.append((level, f"provider {name}: upstream {provider['base_url']} (from {where})"))
        if provider["auth"] == "auto" and not provider["oauth_trusted"] and has_login:
            notes.append((logging.WARNING, f"provider {name}: the Claude login is NOT sent to "
                          f"{provider['base_url']} (not an Anthropic host); to send it there, set "
                          f"\"auth\": \"oauth\" on provider {name} in the config file"))
    return notes


def startup_summary(server: "ProxyServer", host: str, port: int) -> List[Tuple[int, str]]:
    """(level, line) of what the first run explains: where it listens, which files it read,
    each route, each provider's credential source (never the secret), warnings, and the
    line to paste for Claude Code."""
    config, logged_in = server.config, server.oauth.tokens.record() is not None
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    files = config.files
    lines = [(logging.INFO, f"claude_proxy {VERSION} listening on {url}"
              + ("" if is_loopback(host) else f" (reachable from the network: {host} from {config.origins.get('settings.host', 'default')})")),
             (logging.INFO, "files: config " + (files["config"] or "none (built-in defaults)") + ", .env "
              + (files["dotenv"] or "none") + (f", model file {files['models']}" if files["models"] else ""))]
    for row in route_rows(config)[:40]:
        lines.append((logging.INFO, f"  {row['route']:<22} -> {row['provider']}/{row['model']} ({row['format']})"))
    for name, provider in config.providers.items():
        if name == "anthropic" or any(row["provider"] == name for row in route_rows(config)):
            where = config.origins.get(f"providers.{name}.base_url", "default")
            source = "" if where == "default" or where.startswith(".env") else f" (from {where})"   # .env: a warning below
            lines.append((logging.INFO, f"  provider {name}: {public_url(provider['base_url'])}{source}, "
                          f"credentials: {credential_source(server, provider, logged_in)}"))
    lines += [(logging.WARNING, line) for line in config.warnings]
    lines += [note for note in upstream_notes(config, logged_in) if note[0] >= logging.WARNING]
    lines += [(logging.INFO, line) for line in client_hints(server, url, logged_in)]
    return lines


def proxy_key_hint(config: Config) -> str:
    """How to name the proxy key in a pasted command: $VAR when the shell has it, else where it is."""
    where = config.origins.get("settings.proxy_api_key", "default")
    if where.startswith("environment "):
        return f"${config.proxy_key_var}"
    if where.startswith(".env "):
        return f"<{config.proxy_key_var} in {where[where.find('(') + 1:where.find(')')]}>"
    if where.startswith("config file "):
        return f"<proxy_api_key in {where[len('config file '):]}>"
    return "<the proxy key>"


def local_url(url: str) -> str:
    """The proxy's URL as a client on this machine dials it (a wildcard bind is 127.0.0.1)."""
    return url.replace("0.0.0.0", "127.0.0.1").replace("[::]", "127.0.0.1")


def claude_code_command(server: "ProxyServer", url: str, logged_in: bool) -> str:
    """The line that starts Claude Code on this proxy. Claude Code with no login of its own and
    no key in its environment says "Not logged in" before it sends anything, so it gets a token:
    the proxy key, or a placeholder where the proxy holds every upstream credential itself; where
    a route passes the client's own key on, that key (its login or ANTHROPIC_API_KEY) is the one."""
    config, local = server.config, local_url(url)
    if config.settings.get("proxy_api_key"):
        return f"ANTHROPIC_BASE_URL={local} ANTHROPIC_AUTH_TOKEN={proxy_key_hint(config)} claude"
    if any(effective_auth(server, p, logged_in) == "client" for p in used_providers(config)):
        return (f"ANTHROPIC_BASE_URL={local} claude   # its own key (its Claude login, "
                "ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN) is passed on")
    return (f"ANTHROPIC_BASE_URL={local} ANTHROPIC_AUTH_TOKEN=unused claude   # any token: it only gets Claude "
            "Code past its login check; the proxy holds the upstream credentials")


def client_hints(server: "ProxyServer", url: str, logged_in: bool) -> List[str]:
    """The lines to paste for the clients."""
    return [f"Claude Code: {claude_code_command(server, url, logged_in)}",
            f"OpenAI SDKs and Codex: base_url {local_url(url)}/v1"]


def install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """SIGINT/SIGTERM set `stop`; on Windows (no add_signal_handler) through signal.signal."""
    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))


def release_freed_memory() -> None:
    """Hand the heap freed after compiling this 200 KB file back to the OS (~9 MB of RSS).

    glibc keeps freed memory mapped; malloc_trim returns it. Elsewhere this does nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        log.debug("malloc_trim unavailable")


def login_required(config: Config) -> bool:
    """Whether a provider in use sends the Claude login, or for want of one each client's key
    (auth oauth, or auto without an API key): what --headless will not start without."""
    return any(p["auth"] == "oauth" or (p["auth"] == "auto" and not p.get("api_key")) for p in used_providers(config))


async def serve(config: Config, redactor: Redactor, proxies: Mapping[str, str],
                source: Optional[ConfigSource] = None, headless: bool = False) -> None:
    """Run the proxy until SIGINT/SIGTERM (SIGHUP reloads the config), then shut down gracefully.
    --headless (anthropic-claude-max-proxy's) with no login where one is needed exits as it did."""
    server = ProxyServer(config, redactor=redactor, proxies=proxies, source=source)
    install_reload_signal(asyncio.get_running_loop(), server)
    await adopt_seed_login(server.config, server.oauth)
    if headless and login_required(config) and not await server.oauth.available():
        raise CredentialMissing(NO_LOGIN_HELP)
    host, port = await server.start()
    release_freed_memory()
    stop = asyncio.Event()
    install_signal_handlers(asyncio.get_running_loop(), stop)
    for level, line in startup_summary(server, host, port):
        log.log(level, "%s", line)
    await stop.wait()
    log.info("shutting down (grace %.0fs)", config.settings["shutdown_grace"])
    await server.shutdown()

# =============================================================================================
# 14. CLI
# =============================================================================================


# Flags every command takes, before or after its name: (names, argparse keywords).
GLOBAL_FLAGS: Tuple[Tuple[Tuple[str, ...], dict], ...] = (
    (("--host", "--bind", "-b"), {"dest": "host", "metavar": "ADDR", "help": "bind address (default 127.0.0.1)"}),
    (("--port", "-p"), {"type": int, "help": "port (default 8082)"}),
    (("--config",), {"metavar": "FILE", "help": "config file: claude_proxy's JSON, or a seed's models.yaml / "
                                                "models.json (default: CLAUDE_PROXY_CONFIG or ~/.claude-proxy/config.json)"}),
    (("--log-level",), {"metavar": "LEVEL", "help": "DEBUG, INFO, WARNING or ERROR"}),
    (("--debug", "-d"), {"dest": "log_level", "action": "store_const", "const": "DEBUG", "help": "= --log-level DEBUG"}),
    (("--strict",), {"action": "store_const", "const": True, "help": "unknown config keys are errors, not warnings"}),
)
TOKEN_HELP = "a Claude subscription token to serve with (as ANTHROPIC_OAUTH_TOKEN; not saved)"
# command -> (one-line description, its own flags)
CLI_COMMANDS: Dict[str, Tuple[str, Tuple[Tuple[Tuple[str, ...], dict], ...]]] = {
    "serve": ("run the proxy (the default command)", ((("--token",), {"help": TOKEN_HELP}),)),
    "check-config": ("print the effective config and where each value came from, secrets masked", ()),
    "login": ("log in with a Claude Pro/Max subscription (OAuth PKCE)", (
        (("--long-lived",), {"action": "store_true", "help": "a one-year token (scope user:inference)"}),
        (("--no-browser",), {"action": "store_true", "help": "only print the URL"}),
        (("--token",), {"help": "save this token (from `claude setup-token`) instead of logging in"}))),
    "logout": ("forget the saved Claude login", ()),
    "status": ("show the saved Claude login (never the token)", ()),
    "import": ("import a saved login: Claude Code's, or an earlier proxy's tokens.json (read only)",
               ((("path",), {"nargs": "?", "metavar": "FILE", "help": "the file (default: the first found)"}),)),
    "import-claude-code": ("import Claude Code's saved login (~/.claude/.credentials.json)",
                           ((("--path",), {"help": "credentials file"}),)),
    "stats": ("usage and cost from the ledger (CLAUDE_PROXY_HOME/usage.db)", (
        (("--since",), {"help": "30m, 24h, 7d, 2w or an ISO date (default: all)"}),
        (("--by",), {"choices": ("model", "route", "day"), "default": "model", "help": "one row per (default model)"}),
        (("--json",), {"action": "store_true", "help": "print the /v1/stats object instead of a table"}))),
    "doctor": ("check DNS, TCP, TLS, credentials and the Claude login of every provider in use",
               ((("--deep",), {"action": "store_true", "help": "also send a 1-token request to each provider"}),)),
    "menu": ("a numbered menu (anthropic-claude-max-proxy's numbers): start, log in, refresh, status, log out, "
             "long-term token, quit, stats", ()),
    "statusline": ("one line for Claude Code's status bar from the ledger (its status JSON on stdin)", ()),
    "code": ("run Claude Code through the proxy (started when none runs): code [ARGS...]", ()),
    "codex": ("run Codex CLI through the proxy (started when none runs): codex [ARGS...]", ()),
    "gemini": ("run Gemini CLI through the proxy (started when none runs): gemini [ARGS...]", ()),
}
SEED_FLAGS_EPILOG = ("Flags of anthropic-claude-max-proxy also work: --headless (serve), --setup-token "
                     "(= login --long-lived), --headless --no-auto-start (check the login and exit).")


def add_flags(parser: argparse.ArgumentParser, flags: Iterable[Tuple[Tuple[str, ...], dict]], default: Any) -> None:
    """Add flags; `default` is None at the top level and SUPPRESS in a subcommand, so that a flag
    given before the subcommand is not overwritten by the subcommand's default."""
    for names, options in flags:
        extra = {} if names[0][0] != "-" else {"default": default}
        parser.add_argument(*names, **dict(extra, **options) if "default" not in options else options)


def build_parser() -> argparse.ArgumentParser:
    """The commands of CLI_COMMANDS (serve by default), the global flags before or after them,
    and anthropic-claude-max-proxy's top-level flags."""
    parser = argparse.ArgumentParser(prog="claude_proxy.py", epilog=SEED_FLAGS_EPILOG,
                                     description="LLM API proxy between the Anthropic and OpenAI dialects.")
    add_flags(parser, GLOBAL_FLAGS, None)
    parser.add_argument("--version", action="version", version=f"claude_proxy {VERSION}")
    parser.add_argument("--token", help=TOKEN_HELP)
    parser.add_argument("--headless", action="store_true", help="serve without prompting (anthropic-claude-max-proxy)")
    parser.add_argument("--setup-token", action="store_true", help="= login --long-lived")
    parser.add_argument("--no-auto-start", action="store_true", help="with --headless: check the login, do not serve")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (text, flags) in CLI_COMMANDS.items():
        command = sub.add_parser(name, help=text, description=text)
        add_flags(command, GLOBAL_FLAGS, argparse.SUPPRESS)
        add_flags(command, flags, argparse.SUPPRESS)
    return parser


def resolve_command(args: argparse.Namespace) -> str:
    """The command to run, the seed flags mapped: --setup-token is `login --long-lived`,
    --headless --no-auto-start checks the login, --headless (or nothing) serves."""
    if args.command:
        return args.command
    if getattr(args, "setup_token", False):
        args.long_lived, args.no_browser = True, False
        return "login"
    return "verify-login" if getattr(args, "no_auto_start", False) else "serve"


def parse_cli(argv: Optional[List[str]]) -> Tuple[argparse.Namespace, str]:
    """The flags and the command; for a launcher (code, codex, gemini) the words after its name
    are the client's, untouched (args.client_args), and the ones before it the proxy's
    (args.proxy_argv, for the proxy it may start)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    split = split_launch_argv(argv)
    if split is None:
        args = build_parser().parse_args(argv)
        return args, resolve_command(args)
    args = build_parser().parse_args(split[0])
    args.proxy_argv, args.client_args = split[0], split[2]
    return args, split[1]


def cli_overrides(args: argparse.Namespace, command: str) -> dict:
    """The settings CLI flags set (serve's --token is the headless Claude token, its shape checked)."""
    token = getattr(args, "token", None) if command in ("serve", "verify-login") else None
    pairs = (("host", getattr(args, "host", None)), ("port", getattr(args, "port", None)),
             ("log_level", getattr(args, "log_level", None)), ("strict", getattr(args, "strict", None)),
             ("oauth_token", check_token_shape(token) if token else None))
    return {key: value for key, value in pairs if value is not None}


def open_log_file(path: str) -> logging.Handler:
    """The LOG_FILE_PATH handler, rotated at 10 MB, 3 kept; ConfigError in one line when the
    path cannot be a log file (a directory, no permission)."""
    from logging.handlers import RotatingFileHandler
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a directory; name a file in it, such as {os.path.join(path, 'claude_proxy.log')}")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return RotatingFileHandler(path, maxBytes=10 << 20, backupCount=3, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None


def setup_logging(level: str, redactor: Redactor, log_file: Optional[str] = None) -> None:
    """logging to stderr (and to LOG_FILE_PATH, rotated at 10 MB, 3 kept), every record
    scrubbed of secrets and kept on one line."""
    handlers: List[logging.Handler] = [logging.StreamHandler()]
    if log_file:
        handlers.append(open_log_file(os.path.expanduser(log_file)))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(redactor)
    root = logging.getLogger("claude_proxy")
    root.handlers[:] = handlers
    root.setLevel(level.upper())
    root.propagate = False


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: parse flags, load config, run the command; one line and exit 2 for a
    config problem, exit 1 for a failed command, never a traceback for either."""
    args, command = parse_cli(argv)
    env = dict(os.environ)
    try:
        source = ConfigSource(getattr(args, "config", None), env, cli_overrides(args, command))
        config = source.load()
    except ConfigError as exc:
        cli_error(f"config error: {exc}")
        return 2
    except BadRequest as exc:
        cli_error(exc.message)
        return 2
    redactor = Redactor(config.secret_values())
    try:
        setup_logging(config.settings["log_level"], redactor, config.settings["log_file"])
    except ConfigError as exc:
        cli_error(f"config error: log file ({config.origins.get('settings.log_file', 'config')}): {exc}")
        return 2
    try:
        return run_command(command, args, config, redactor, env, source)
    except ConfigError as exc:
        cli_error(str(exc))
        return 2
    except ProxyError as exc:
        cli_error(redactor.scrub(exc.message))
        return 1
    except KeyboardInterrupt:
        return 130


def run_command(command: str, args: argparse.Namespace, config: Config, redactor: Redactor,
                env: Mapping[str, str], source: Optional[ConfigSource] = None) -> int:
    """Dispatch a CLI command."""
    if command == "check-config":
        print(json.dumps(redacted_config(config), indent=2))
        for line in config.warnings:
            print(f"warning: {line}", file=sys.stderr)
        return 0
    if command == "serve":
        asyncio.run(serve(config, redactor, proxies_from_env(env), source, getattr(args, "headless", False)))
        return 0
    if command == "stats":
        return cli_stats(config, getattr(args, "since", None), getattr(args, "by", "model"),
                         getattr(args, "json", False))
    if command == "doctor":
        return asyncio.run(cli_doctor(config, env, getattr(args, "deep", False)))
    if command == "menu":
        return cli_menu(config, redactor, env, source)
    if command == "statusline":
        return cli_statusline(config, sys.stdin)
    if command in LAUNCHERS:
        return asyncio.run(run_launcher(command, args, config, env, args.proxy_argv, args.client_args))
    return asyncio.run(run_oauth_command(command, args, config, env))


def cli_stats(config: Config, since: Optional[str], by: str, as_json: bool) -> int:
    """`stats`: the ledger read directly (a running proxy commits within a second)."""
    ledger = UsageLedger(ledger_path(config))
    start = parse_since(since, time.time())
    totals = ledger.totals(start)
    if as_json:
        print(json.dumps(totals, indent=2))
        return 0
    window = f"since {iso_time(start)}" if start else "all time"
    print(f"usage {window}, from {ledger.path} (prices as of {PRICES_AS_OF})\n")
    print(format_stats_table(totals, by) if totals["requests"] else "no requests recorded")
    return 0


CLAUDE_CODE_KEY_VARS = ("ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN")


def claude_code_note(server: "ProxyServer", env: Mapping[str, str]) -> Optional[dict]:
    """A doctor line when Claude Code started from this shell would have no key and no login of
    its own: it then says "Not logged in" before any request reaches the proxy."""
    if any((env.get(var) or "").strip() for var in CLAUDE_CODE_KEY_VARS):
        return None
    credentials = default_claude_credentials_path(env)
    if os.path.isfile(credentials):
        return None
    settings, logged_in = server.config.settings, server.oauth.tokens.record() is not None
    command = claude_code_command(server, f"http://{settings['host']}:{settings['port']}", logged_in)
    return _check("claude code", "login", "note", f"no {', '.join(CLAUDE_CODE_KEY_VARS)} here and no Claude Code "
                  f"login ({credentials}): it would say \"Not logged in · Please run /login\" before asking the "
                  f"proxy anything; start it as: {command}")


async def cli_doctor(config: Config, env: Mapping[str, str], deep: bool) -> int:
    """`doctor`: one line per check, and how to start Claude Code when this shell gives it no
    key; exit 1 when a check failed."""
    server = ProxyServer(config, proxies=proxies_from_env(env))
    try:
        checks = await run_doctor(doctor_exchange(server), deep)
        note = claude_code_note(server, env)
    finally:
        server.pool.close()
    for check in checks + ([note] if note else []):
        print(format_check(check))
    failed = sum(check["status"] == "fail" for check in checks)
    print(f"\n{len(checks)} checks, {failed} failed" if checks else "no provider in use")
    return 1 if failed else 0


# anthropic-claude-max-proxy's numbers (1 start ... 6 long-term token, 7 exit), then ours
MENU = (("1", "start the proxy", "serve"), ("2", "log in (Claude Pro/Max)", "login"),
        ("3", "refresh the token", "refresh"), ("4", "show status", "status"),
        ("5", "log out (clear the saved login)", "logout"), ("6", "create a long-term token (one year)", "long-lived"),
        ("7", "quit", "quit"), ("8", "show usage stats", "stats"))


def cli_menu(config: Config, redactor: Redactor, env: Mapping[str, str], source: Optional[ConfigSource]) -> int:
    """`menu`: numbered choices read from stdin until 0 (or end of input)."""
    actions = {key: action for key, _, action in MENU}
    while True:
        print("\n" + "\n".join(f"  {key}) {text}" for key, text, _ in MENU))
        try:
            choice = input("choice: ").strip()
        except EOFError:
            return 0
        action = actions.get(choice)
        if action == "quit":
            return 0
        if action is None:
            print(f"unknown choice {choice!r}")
            continue
        run_menu_action(action, config, redactor, env, source)


def run_menu_action(action: str, config: Config, redactor: Redactor, env: Mapping[str, str],
                    source: Optional[ConfigSource]) -> None:
    """One menu choice; its failure is printed and the menu goes on."""
    login = argparse.Namespace(long_lived=action == "long-lived", no_browser=False, token=None)
    try:
        if action == "logout" and not confirmed("Are you sure you want to clear the saved login? [y/N] "):
            print("Logout cancelled")
        elif action == "serve":
            run_command("serve", login, config, redactor, env, source)
        elif action == "stats":
            cli_stats(config, None, "model", False)
        else:
            command = "login" if action == "long-lived" else action
            asyncio.run(run_oauth_command(command, login, config, env))
            if action == "status":
                asyncio.run(print_proxy_health(config))
    except KeyboardInterrupt:
        print()
    except (ProxyError, ConfigError) as exc:
        cli_error(redactor.scrub(exc.message if isinstance(exc, ProxyError) else str(exc)), sys.stdout)


def confirmed(question: str) -> bool:
    """A yes from stdin (end of input is a no)."""
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False


async def print_proxy_health(config: Config) -> None:
    """Whether a proxy answers on the configured address, and its config generation."""
    settings = config.settings
    url = f"http://{settings['host']}:{settings['port']}"
    pool = ConnectionPool(lambda: make_ssl_context(True, None), {}, 2.0, 2.0)
    try:
        response = await pool.request("GET", url + "/health", [])
        health = json.loads(await response.read())
        print(f"proxy at {url}: running, version {health.get('version')}, "
              f"config generation {health.get('config_generation')}")
    except (ProxyError, ValueError):
        print(f"proxy at {url}: not running")
    finally:
        pool.close()


# ---- statusline: Claude Code's status line from the ledger ----------------------------------
#
# Claude Code runs its statusLine command after each assistant message, its status JSON on stdin
# (PROTOCOLS K), and shows the first line printed. This one names the route and the real upstream
# of the session's last request, and the session's tokens, cost and cache hits as the ledger has
# them (Claude Code's own cost is a list-price guess for the model name it believes it talks to).
# It asks the running proxy first (GET /v1/stats/session flushes the ledger's queued rows, so the
# answer that just ended is counted) and reads usage.db itself when no proxy answers. The launcher
# runs it as an imported module with cached bytecode and without site packages, so that Python's
# own start is most of its time (see the benchmark).

STATUSLINE_TIMEOUT = 0.5            # seconds to wait for the running proxy's answer
ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def proxy_address(config: Config) -> Tuple[str, int]:
    """Where this config's proxy answers on this machine (an any-address bind on loopback)."""
    host = config.settings["host"]
    return ANY_ADDRESS.get(host, host), config.settings["port"]


def format_address(host: str, port: int) -> str:
    """host:port, an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def local_get(host: str, port: int, path: str, headers: List[Tuple[str, str]],
              timeout: float) -> Tuple[int, bytes]:
    """(status, body) of a GET to a proxy on this machine, over a blocking socket (for the
    commands that need no event loop): OSError when nothing accepts the connection,
    UpstreamError when what does answers no sane HTTP in time."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(format_head(f"GET {path} HTTP/1.1", [
            ("host", format_address(host, port)), ("connection", "close")] + headers))
        try:
            return read_local_answer(sock)
        except OSError as exc:
            raise UpstreamError(f"{format_address(host, port)} did not answer: {exc}") from None


def read_local_answer(sock: socket.socket) -> Tuple[int, bytes]:
    """(status, body) read from a blocking socket: the head, then Content-Length bytes (or
    until the peer closes); UpstreamError for anything else."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) <= MAX_HEADER_BYTES:
        chunk = sock.recv(READ_CHUNK)
        if not chunk:
            break
        data += chunk
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise UpstreamError("no HTTP answer")
    status, response_headers = parse_response_head(head + sep)
    length = response_headers.get("content-length", "")
    want = int(length) if _DIGITS.match(length) else MAX_HEADER_BYTES
    while len(body) < want:
        chunk = sock.recv(READ_CHUNK)
        if not chunk:
            break
        body += chunk
    return status, body[:want]


def proxy_key_headers(config: Config) -> List[Tuple[str, str]]:
    """The proxy key as a bearer token, when the config has one."""
    key = config.settings.get("proxy_api_key")
    return [("authorization", f"Bearer {key}")] if key else []


def read_status_input(stream: Any) -> dict:
    """Claude Code's status JSON from stdin ({} from a terminal or for anything but an object)."""
    try:
        if stream.isatty():
            return {}
        value = json.loads(stream.read() or "{}")
    except (ValueError, OSError):
        return {}
    return value if isinstance(value, dict) else {}


def ask_proxy_for_session(config: Config, session_id: str) -> Tuple[Optional[dict], bool]:
    """(the session's usage as the running proxy has it, whether a proxy answered)."""
    host, port = proxy_address(config)
    path = "/v1/stats/session?id=" + urllib.parse.quote(session_id, safe="")
    try:
        status, body = local_get(host, port, path, proxy_key_headers(config), STATUSLINE_TIMEOUT)
        summary = json.loads(body) if status == 200 else None
    except OSError:
        return None, False
    except (ProxyError, ValueError):                 # slow or odd: it runs, the ledger file answers
        summary = None
    return (summary if isinstance(summary, dict) else None), True


def statusline_usage(config: Config, session_id: str) -> Tuple[Optional[dict], bool]:
    """(the session's usage, whether the proxy runs): the proxy's answer, else usage.db read here."""
    summary, running = ask_proxy_for_session(config, session_id)
    if summary is None and config.settings["usage_ledger"]:
        try:
            summary = UsageLedger(ledger_path(config)).session(session_id)
        except ProxyError:
            summary = None
    return summary, running


def short_count(n: int) -> str:
    """A token count in a few characters: 950, 12.3k, 4.5M."""
    if n < 1000:
        return str(n)
    return f"{n / 1000:.1f}k" if n < 999500 else f"{n / 1e6:.1f}M"


def statusline_cost(summary: dict) -> str:
    """The session's cost: $ with 4 decimals under a dollar, n/a when no price is known, a
    trailing + when some requests had none."""
    cost = summary["cost_usd"]
    if cost is None:
        return "cost n/a"
    text = f"${cost:.4f}" if cost < 1 else f"${cost:,.2f}"
    return text + ("+" if summary["unpriced_requests"] else "")


def statusline_route(last: dict) -> str:
    """`route → provider/model` of the last request (an exact model id or a fallback shows the
    name the client asked for)."""
    route = last["route"]
    if route in ("model", "fallback", None):
        route = last["requested_model"] or "-"
    return f"{route} → {last['provider'] or '-'}/{last['upstream_model'] or last['requested_model'] or '-'}"


def format_statusline(summary: Optional[dict], running: bool, address: str) -> str:
    """The one line: route and upstream, requests, tokens, cost, cache hits, then markers for a
    failed or fallen-back last request and a proxy that is not running."""
    if not summary or not summary.get("last"):
        return f"claude_proxy {address} · " + ("no request in this session yet" if running else "not running")
    last = summary["last"]
    cache = summary["cache_read_input_tokens"]
    fed = summary["input_tokens"] + cache + summary["cache_creation_input_tokens"]
    parts = [statusline_route(last), f"{summary['requests']} req",
             f"{short_count(fed)} in / {short_count(summary['output_tokens'])} out", statusline_cost(summary)]
    if fed:
        parts.append(f"cache {100 * cache / fed:.0f}%")
    if last["route"] == "fallback":
        parts.append("↪ fell back")
    if last["failed"]:
        parts.append(f"✗ {last['status'] or '-'} {last['error_type'] or 'error'}")
    if not running:
        parts.append(f"proxy {address} not running")
    return " · ".join(parts)


def cli_statusline(config: Config, stdin: Any) -> int:
    """`statusline`: one line for Claude Code's status bar; exit 0 whatever it finds."""
    session_id = read_status_input(stdin).get("session_id")
    address = format_address(*proxy_address(config))
    if not isinstance(session_id, str) or not session_id:
        print(f"claude_proxy {address} · no session id on stdin (Claude Code's statusLine sends it)")
        return 0
    summary, running = statusline_usage(config, session_id[:MAX_SESSION_ID])
    print(format_statusline(summary, running, address))
    return 0

# ---- Launchers: code, codex, gemini -----------------------------------------------------------
#
# `claude_proxy.py [FLAGS] code|codex|gemini [ARGS...]` runs a client through this proxy: the
# flags before the command are the proxy's, everything after it is the client's, untouched. A
# proxy answering at the configured address is used when its /health says it is claude_proxy;
# otherwise one is started in the background with the same flags (its output goes to
# CLAUDE_PROXY_HOME/launched/HOST-PORT.log) and awaited. While its client runs, each launcher
# is listed in CLAUDE_PROXY_HOME/launched/HOST-PORT/ (changed under a file lock); the launcher
# that leaves the list empty stops the proxy a launcher started, never one the user started
# (proxy.pid names it, and /health must report that pid). The client gets what points it at
# the proxy with no login of its own (PROTOCOLS K): environment variables, and for Claude
# Code a temporary --settings file (its env, and the status line unless the user has one);
# Codex gets -c overrides, Gemini CLI a system settings file of its own (the CLI reads
# GEMINI_CLI_SYSTEM_SETTINGS_PATH; the real one is merged in), so no file of the user's is
# changed. Ctrl-C in a terminal reaches the client itself (one foreground process group); a
# SIGINT, SIGTERM or SIGHUP sent to the launcher alone is forwarded. POSIX only.

Launcher = collections.namedtuple("Launcher", "binary path_env npm title own_key_vars")
LAUNCHERS: Dict[str, Launcher] = {
    "code": Launcher("claude", "CLAUDE_PATH", "@anthropic-ai/claude-code", "Claude Code",
                     ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN")),
    "codex": Launcher("codex", "CODEX_PATH", "@openai/codex", "Codex CLI", ("OPENAI_API_KEY",)),
    "gemini": Launcher("gemini", "GEMINI_PATH", "@google/gemini-cli", "Gemini CLI",
                       ("GEMINI_API_KEY", "GOOGLE_API_KEY")),
}
LAUNCH_PLACEHOLDER_KEY = "claude-proxy-needs-no-key"   # sent when the proxy has no key (no secret)
LAUNCH_READY_TIMEOUT = 30.0          # seconds a started proxy has to answer /health
LAUNCH_LOG_TAIL = 20                 # lines of its log shown when it does not come up
FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
CODEX_PROVIDER = "claude_proxy"      # the -c model_providers entry
CODEX_KEY_ENV = "CLAUDE_PROXY_API_KEY"
GEMINI_API_KEY_AUTH = {"security": {"auth": {"selectedType": "gemini-api-key"}}}
GEMINI_SETUP = (
    "Gemini CLI takes its auth type only from a settings file, and the override it offers "
    "(GEMINI_CLI_SYSTEM_SETTINGS_PATH) is honoured only for a file that root owns in directories only root can "
    "write, so the launcher cannot select API-key auth for you. Once, add "
    '{"security": {"auth": {"selectedType": "gemini-api-key"}}} to ~/.gemini/settings.json (or to this '
    "project's .gemini/settings.json), then run this again; the launcher sets GOOGLE_GEMINI_BASE_URL and "
    "GEMINI_API_KEY itself")
GEMINI_SYSTEM_SETTINGS = {"darwin": "/Library/Application Support/GeminiCli/settings.json",
                          "win32": "C:\\ProgramData\\gemini-cli\\settings.json"}
CLAUDE_MANAGED_SETTINGS = {"darwin": "/Library/Application Support/ClaudeCode/managed-settings.json"}
LaunchContext = collections.namedtuple("LaunchContext", "config url key env args tmp statusline")


def launch_value_flags() -> frozenset:
    """The proxy flags that take a value (so that a value is never taken for the command)."""
    return frozenset([name for names, options in GLOBAL_FLAGS if "action" not in options for name in names]
                     + ["--token"])


def split_launch_argv(argv: List[str]) -> Optional[Tuple[List[str], str, List[str]]]:
    """(proxy flags, launcher, client args) when the first word past the proxy's flags names a
    launcher; None otherwise (argparse takes it then)."""
    takes_value, i = launch_value_flags(), 0
    while i < len(argv):
        word = argv[i]
        if word in LAUNCHERS:
            return argv[:i], word, argv[i + 1:]
        if not word.startswith("-") or word == "--":
            return None
        i += 2 if word in takes_value else 1
    return None


def find_client(launcher: Launcher, env: Mapping[str, str]) -> Tuple[Optional[str], str]:
    """(the client's executable or None, the one line saying how to get it): $CLAUDE_PATH
    (CODEX_PATH, GEMINI_PATH) or PATH."""
    import shutil
    given = env.get(launcher.path_env)
    path = given or shutil.which(launcher.binary, path=env.get("PATH"))
    if path and os.path.isfile(path) and os.access(path, os.X_OK):
        return path, ""
    where = f"${launcher.path_env} ({given}) is not an executable" if given else \
        f"`{launcher.binary}` is not on PATH (or set {launcher.path_env})"
    return None, f"{launcher.title} not found: {where}; install it with `npm install -g {launcher.npm}`"


def uses_client_key(config: Config) -> bool:
    """Whether a provider in use may forward the client's own key (auth client, or auto
    without a key of its own)."""
    return any(p["auth"] == "client" or (p["auth"] == "auto" and not p.get("api_key"))
               for p in used_providers(config))


def launch_key(config: Config, launcher: Launcher, env: Mapping[str, str]) -> Optional[str]:
    """The key the client sends: the proxy key, else None to keep the user's own key where a
    route lets it through, else a placeholder (so the client needs no login of its own)."""
    if config.settings.get("proxy_api_key"):
        return config.settings["proxy_api_key"]
    if uses_client_key(config) and any(env.get(name) for name in launcher.own_key_vars):
        return None
    return LAUNCH_PLACEHOLDER_KEY


def write_private_json(directory: str, name: str, document: dict) -> str:
    """A JSON file only this user can read (the launcher's temporary settings); its path."""
    path = os.path.join(directory, name)
    with os.fdopen(open_no_follow(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w", encoding="utf-8") as fh:
        json.dump(document, fh, indent=2)
    return path


def read_json_object(path: str) -> Optional[dict]:
    """A JSON object from a file; None when the file is absent; ProxyError when it is not JSON."""
    try:
        with open(path, encoding="utf-8") as fh:
            document = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ProxyError(f"{path}: {exc}") from None
    if not isinstance(document, dict):
        raise ProxyError(f"{path}: not a JSON object")
    return document


def statusline_command(args: argparse.Namespace, home: str) -> str:
    """The shell command Claude Code runs for the status line: this file imported from bytecode
    cached under CLAUDE_PROXY_HOME/pycache, no site packages, the launcher's address flags."""
    import shlex
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {json.dumps(here)}); import claude_proxy; "
            "sys.exit(claude_proxy.main(sys.argv[1:]))")
    flags = []
    for flag, value in (("--config", getattr(args, "config", None)), ("--host", getattr(args, "host", None)),
                        ("--port", getattr(args, "port", None))):
        if value is not None:
            flags += [flag, os.path.abspath(value) if flag == "--config" else str(value)]
    words = [sys.executable, "-I", "-S", "-X", f"pycache_prefix={os.path.join(home, 'pycache')}", "-c", code]
    return " ".join(shlex.quote(word) for word in words + flags + ["statusline"])


def cache_statusline_bytecode(home: str) -> None:
    """Compile this file into CLAUDE_PROXY_HOME/pycache, where the status line's import finds it
    (done here because PYTHONDONTWRITEBYTECODE or a read-only install would leave it absent)."""
    import py_compile
    saved, sys.pycache_prefix = sys.pycache_prefix, os.path.join(ensure_private_dir(home), "pycache")
    try:
        py_compile.compile(os.path.abspath(__file__), doraise=True)
    except (OSError, py_compile.PyCompileError) as exc:
        log.debug("status line bytecode not cached: %s", exc)
    finally:
        sys.pycache_prefix = saved


def claude_settings_paths(env: Mapping[str, str]) -> List[str]:
    """Where Claude Code reads settings: user, project, local project, managed."""
    user_dir = env.get("CLAUDE_CONFIG_DIR") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".claude")
    return [os.path.join(user_dir, "settings.json"), os.path.join(".claude", "settings.json"),
            os.path.join(".claude", "settings.local.json"),
            CLAUDE_MANAGED_SETTINGS.get(sys.platform, "/etc/claude-code/managed-settings.json")]


def has_own_statusline(env: Mapping[str, str]) -> bool:
    """Whether a settings file of the user's already sets a statusLine (an unreadable one is
    left to Claude Code to complain about)."""
    for path in claude_settings_paths(env):
        try:
            if "statusLine" in (read_json_object(path) or {}):
                return True
        except ProxyError:
            continue
    return False


def claude_code_plan(ctx: LaunchContext) -> Tuple[Dict[str, str], List[str]]:
    """Claude Code: ANTHROPIC_BASE_URL, the key as ANTHROPIC_AUTH_TOKEN, API_TIMEOUT_MS, in the
    environment and in a --settings file (its env outranks the user's settings files), with
    the status line unless the user has one or passes --settings."""
    env = dict(ctx.env)
    ours = {"ANTHROPIC_BASE_URL": ctx.url,
            "API_TIMEOUT_MS": env.get("API_TIMEOUT_MS") or str(int(ctx.config.settings["read_timeout"] * 1000))}
    if ctx.key is not None:
        for name in LAUNCHERS["code"].own_key_vars:
            env.pop(name, None)
        ours["ANTHROPIC_AUTH_TOKEN"] = ctx.key
    env.update(ours)
    if any(arg == "--settings" or arg.startswith("--settings=") for arg in ctx.args):
        log.info("--settings given: the proxy's status line is not added")
        return env, list(ctx.args)
    settings: Dict[str, Any] = {"env": ours}
    if not has_own_statusline(env):
        settings["statusLine"] = {"type": "command", "command": ctx.statusline, "padding": 0}
    return env, ["--settings", write_private_json(ctx.tmp, "claude-settings.json", settings)] + list(ctx.args)


def codex_plan(ctx: LaunchContext) -> Tuple[Dict[str, str], List[str]]:
    """Codex CLI: a custom provider with wire_api = "responses" given as -c overrides (the
    user's config.toml untouched), its key in CLAUDE_PROXY_API_KEY (or the user's
    OPENAI_API_KEY where a route forwards it)."""
    env, key_env = dict(ctx.env), "OPENAI_API_KEY"
    if ctx.key is not None:
        env[CODEX_KEY_ENV], key_env = ctx.key, CODEX_KEY_ENV
    entry = f"model_providers.{CODEX_PROVIDER}"
    overrides = {"model_provider": CODEX_PROVIDER, f"{entry}.name": "claude_proxy",
                 f"{entry}.base_url": ctx.url + "/v1", f"{entry}.wire_api": "responses", f"{entry}.env_key": key_env}
    flags = [word for key, value in overrides.items() for word in ("-c", f"{key}={json.dumps(value)}")]
    return env, flags + list(ctx.args)


def secure_for_gemini(path: str) -> bool:
    """Whether Gemini CLI 0.61 loads a system settings file there: the file, if present, and
    every directory above it owned by root and writable by no group or other (else it skips
    the file with a security warning)."""
    current = os.path.abspath(path)
    while True:
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            info = None
        except OSError:
            return False
        if info is not None and (info.st_uid != 0 or info.st_mode & 0o022):
            return False
        parent = os.path.dirname(current)
        if parent == current:
            return True
        current = parent


def gemini_auth(settings: Optional[dict], key: str) -> Any:
    """settings.security.auth[key] of a Gemini CLI settings document (None where absent)."""
    auth = ((settings or {}).get("security") or {}) if isinstance(settings, dict) else {}
    auth = auth.get("auth") if isinstance(auth, dict) else None
    return auth.get(key) if isinstance(auth, dict) else None


def gemini_selects_api_key(env: Mapping[str, str]) -> bool:
    """Whether the user's own Gemini CLI settings (user or project) already select API-key auth."""
    home = env.get("GEMINI_CLI_HOME") or env.get("HOME") or os.path.expanduser("~")
    for path in (os.path.join(home, ".gemini", "settings.json"), os.path.join(".gemini", "settings.json")):
        try:
            if gemini_auth(read_json_object(path), "selectedType") == "gemini-api-key":
                return True
        except ProxyError:                   # JSON with comments, say: Gemini CLI reads it, we cannot
            continue
    return False


def gemini_plan(ctx: LaunchContext) -> Tuple[Dict[str, str], List[str]]:
    """Gemini CLI: GOOGLE_GEMINI_BASE_URL and the key as GEMINI_API_KEY; API-key auth (which the
    base URL alone does not select, PROTOCOLS K) from the user's settings when they select it,
    else from a system settings file of the launcher's (the real one merged in) where Gemini
    CLI accepts one, else a ProxyError with the one-time setup."""
    env = dict(ctx.env)
    env["GOOGLE_GEMINI_BASE_URL"] = ctx.url
    if ctx.key is not None:
        env.pop("GOOGLE_API_KEY", None)
        env["GEMINI_API_KEY"] = ctx.key
    if gemini_selects_api_key(env):
        return env, list(ctx.args)
    path = os.path.join(ctx.tmp, "gemini-system-settings.json")
    if not secure_for_gemini(path):
        raise ProxyError(GEMINI_SETUP)
    system = env.get("GEMINI_CLI_SYSTEM_SETTINGS_PATH") or GEMINI_SYSTEM_SETTINGS.get(sys.platform, "/etc/gemini-cli/settings.json")
    settings = (read_json_object(system) or {}) if secure_for_gemini(system) else {}
    enforced = gemini_auth(settings, "enforcedType")
    if enforced not in (None, "gemini-api-key"):
        raise ProxyError(f"{system} enforces Gemini CLI's auth type {enforced!r}, and the proxy needs gemini-api-key: "
                         "ask whoever manages that file")
    env["GEMINI_CLI_SYSTEM_SETTINGS_PATH"] = write_private_json(ctx.tmp, os.path.basename(path),
                                                                merge_raw(settings, GEMINI_API_KEY_AUTH))
    return env, list(ctx.args)


LAUNCH_PLANS: Dict[str, Callable[[LaunchContext], Tuple[Dict[str, str], List[str]]]] = {
    "code": claude_code_plan, "codex": codex_plan, "gemini": gemini_plan}


def proxy_identity(host: str, port: int) -> Optional[dict]:
    """What answers at host:port: /health's JSON when it is claude_proxy, {} when it is
    something else, None when nothing listens."""
    try:
        status, body = local_get(host, port, "/health", [], 2.0)
        health = json.loads(body)
    except OSError:
        return None
    except (ProxyError, ValueError):
        return {}
    return health if status == 200 and isinstance(health, dict) and health.get("name") == "claude_proxy" else {}


def launch_dir(config: Config, host: str, port: int) -> str:
    """CLAUDE_PROXY_HOME/launched/HOST-PORT: the launchers sharing the proxy at that address."""
    return os.path.join(config.home, "launched", f"{host}-{port}".replace(":", "_"))


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (POSIX)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_launchers(directory: str) -> List[int]:
    """The launchers listed in the directory whose process still runs (a crashed one's entry
    is removed)."""
    alive = []
    for name in os.listdir(directory):
        pid = int(name[7:]) if name.startswith("client-") and name[7:].isdigit() else None
        if pid is None:
            continue
        if pid_alive(pid):
            alive.append(pid)
        else:
            os.remove(os.path.join(directory, name))
    return alive


def read_pid(path: str) -> Optional[int]:
    """The pid in a pid file, or None."""
    try:
        with open(path, encoding="ascii") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def log_tail(path: str, lines: int = LAUNCH_LOG_TAIL) -> str:
    """The last lines of a log file."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(collections.deque(fh, maxlen=lines)).rstrip()
    except OSError:
        return "(no log)"


def start_background_proxy(proxy_argv: List[str], log_path: str) -> Any:
    """`serve` with the launcher's proxy flags, in a session of its own (Ctrl-C and the
    terminal's hangup are the client's), its output to log_path; the Popen."""
    import subprocess
    fd = open_no_follow(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        return subprocess.Popen([sys.executable, os.path.abspath(__file__), *proxy_argv, "serve"],
                                stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        os.close(fd)


async def await_ready(proc: Any, host: str, port: int, log_path: str) -> dict:
    """The started proxy's /health once it answers as claude_proxy with its pid; ProxyError with
    the log's tail when it exits or does not come up in LAUNCH_READY_TIMEOUT."""
    deadline = time.monotonic() + LAUNCH_READY_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        health = await run_off_loop(proxy_identity, host, port)
        if health and health.get("pid") == proc.pid:
            return health
        await asyncio.sleep(0.05)
    if proc.poll() is None:
        proc.terminate()
    why = "exited" if proc.returncode is not None else f"did not answer within {LAUNCH_READY_TIMEOUT:.0f}s"
    raise ProxyError(f"the proxy started for the client {why}; the end of {log_path}:\n{log_tail(log_path)}")


async def join_proxy(config: Config, proxy_argv: List[str], directory: str) -> None:
    """Use the proxy at the configured address or start one, and list this launcher as its
    user (under the lock, so that a launcher leaving meanwhile does not stop it)."""
    host, port = proxy_address(config)
    async with FileLock(directory + ".lock"):
        ensure_private_dir(directory)
        health = await run_off_loop(proxy_identity, host, port)
        if health == {}:
            raise ProxyError(f"{format_address(host, port)} answers but is not claude_proxy: give the proxy "
                             "another port (--port or CLAUDE_PROXY_PORT)")
        if health is None:
            proc = start_background_proxy(proxy_argv, directory + ".log")
            await await_ready(proc, host, port, directory + ".log")
            with os.fdopen(open_no_follow(os.path.join(directory, "proxy.pid"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                           "w", encoding="ascii") as fh:
                fh.write(str(proc.pid))
            log.info("started a proxy on %s (pid %d) for the client", format_address(host, port), proc.pid)
        os.close(open_no_follow(os.path.join(directory, f"client-{os.getpid()}"), os.O_WRONLY | os.O_CREAT))


async def leave_proxy(config: Config, directory: str) -> None:
    """Take this launcher off the list; the last one out stops the proxy a launcher started."""
    host, port = proxy_address(config)
    async with FileLock(directory + ".lock"):
        try:
            os.remove(os.path.join(directory, f"client-{os.getpid()}"))
        except FileNotFoundError:
            pass
        pid_path = os.path.join(directory, "proxy.pid")
        pid = read_pid(pid_path)
        if live_launchers(directory) or pid is None:
            return
        os.remove(pid_path)
        health = await run_off_loop(proxy_identity, host, port)
        if health and health.get("pid") == pid:
            await stop_process(pid, config.settings["shutdown_grace"] + 5)


async def stop_process(pid: int, timeout: float) -> None:
    """SIGTERM, then wait for the process to go (the proxy writes its ledger on the way out)."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:       # our own child
                return
        except ChildProcessError:
            if not pid_alive(pid):
                return
        await asyncio.sleep(0.05)
    log.warning("the proxy (pid %d) did not stop within %.0fs", pid, timeout)


def terminal_sent_it() -> bool:
    """Whether this process is in the foreground of a controlling terminal, whose Ctrl-C
    already reached the client (the same process group): then it is not forwarded again."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


async def run_client(binary: str, args: List[str], env: Dict[str, str]) -> int:
    """Run the client in the foreground with signals forwarded; its exit status (128 + N when
    a signal ended it)."""
    loop = asyncio.get_running_loop()
    proc = await asyncio.create_subprocess_exec(binary, *args, env=env)

    def forward(signum: int) -> None:
        if proc.returncode is None and not (signum == signal.SIGINT and terminal_sent_it()):
            proc.send_signal(signum)
    signums = [getattr(signal, name) for name in FORWARDED_SIGNALS if hasattr(signal, name)]
    for signum in signums:
        loop.add_signal_handler(signum, forward, signum)
    try:
        code = await proc.wait()
    finally:
        for signum in signums:
            loop.remove_signal_handler(signum)
    return 128 - code if code < 0 else code


async def run_launcher(name: str, args: argparse.Namespace, config: Config, env: Mapping[str, str],
                       proxy_argv: List[str], client_args: List[str]) -> int:
    """`code`, `codex`, `gemini`: the client through this proxy, started here when needed and
    stopped by the last launcher using it; the client's exit status (127: no client)."""
    import tempfile
    launcher = LAUNCHERS[name]
    binary, missing = find_client(launcher, env)
    if binary is None:
        cli_error(missing)
        return 127
    host, port = proxy_address(config)
    directory = launch_dir(config, host, port)
    if name == "code":
        cache_statusline_bytecode(config.home)
    with tempfile.TemporaryDirectory(prefix="client-", dir=ensure_private_dir(os.path.dirname(directory))) as tmp:
        ctx = LaunchContext(config, f"http://{format_address(host, port)}", launch_key(config, launcher, env),
                            dict(env), client_args, tmp, statusline_command(args, config.home))
        client_env, argv = LAUNCH_PLANS[name](ctx)
        await join_proxy(config, proxy_argv, directory)
        try:
            return await run_client(binary, argv, client_env)
        finally:
            await leave_proxy(config, directory)

if __name__ == "__main__":
    sys.exit(main())
