"""API keys for the A/B: where they come from, how requests carry them, and how they are kept off disk.

Keys come from the environment only, never from the command line or a file in the run folder (docs/security.md):
- ``NORMSWAP_API_KEY_<NAME>`` for one endpoint, NAME being the --endpoint name upper-cased with '-' as '_'
  (``ln-gelu-int8`` -> ``NORMSWAP_API_KEY_LN_GELU_INT8``);
- else ``NORMSWAP_API_KEY`` for every endpoint;
- else ``OPENAI_API_KEY`` (the variable vLLM's own clients and `vllm bench serve` read).
Servers the A/B starts itself get a fresh random key (``new_key``), passed to vLLM as VLLM_API_KEY in the server's
environment, so a local run is keyed as well and the key lives only in this process's memory.

Every request function of the A/B takes the base URL and calls ``headers(url)``: the key of that URL, registered
once with ``register`` (a table in memory, so no call site passes a secret around and no signature grows one).
"""

from __future__ import annotations

import re
import secrets

ALL = "NORMSWAP_API_KEY"
FALLBACK = "OPENAI_API_KEY"
SERVER_ENV = "VLLM_API_KEY"  # what vLLM's server reads (vllm/entrypoints/serve/middleware/register.py)
REDACTED = "<redacted>"

_keys: dict[str, str] = {}  # base URL -> key
_source: dict[str, str] = {}  # base URL -> where the key came from (a variable name), for error messages


def endpoint_var(name: str) -> str:
    return f"{ALL}_{re.sub(r'[^A-Za-z0-9]', '_', name).upper()}"


def key_from_env(name: str, env) -> tuple[str | None, str]:
    """(key, the variable it came from) for endpoint ``name``; (None, the variable to set) when none is set."""
    for var in (endpoint_var(name), ALL, FALLBACK):
        if env.get(var):
            return env[var], var
    return None, f"{endpoint_var(name)} (or {ALL} for every endpoint)"


def argv_key(argv: list[str]) -> str | None:
    """The value of --api-key in a server command line (vLLM prefers it to VLLM_API_KEY), or None."""
    for i, a in enumerate(argv):
        if a in ("--api-key", "--api_key") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(("--api-key=", "--api_key=")):
            return a.split("=", 1)[1]
    return None


def new_key() -> str:
    return "normswap-" + secrets.token_urlsafe(24)


def register(url: str, key: str | None, source: str) -> None:
    url = url.rstrip("/")
    _source[url] = source
    if key:
        _keys[url] = key
    else:
        _keys.pop(url, None)


def headers(url: str) -> dict[str, str]:
    """{"Authorization": "Bearer KEY"} for the server at ``url`` (a base URL), {} when it has no key."""
    key = _keys.get(url.rstrip("/"))
    return {"Authorization": f"Bearer {key}"} if key else {}


def key(url: str) -> str | None:
    return _keys.get(url.rstrip("/"))


def secrets_in_use() -> list[str]:
    return [k for k in _keys.values() if k]


class Unauthorized(RuntimeError):
    """A server answered 401: no key, or the wrong one. The message names the variable to set."""


def check(response, url: str) -> None:
    """Raise ``Unauthorized`` (naming the variable) on a 401 answer from the server at ``url``."""
    if response.status_code == 401:
        raise Unauthorized(unauthorized_message(url, response.request.url if response.request else url))


def unauthorized_message(url: str, what: str) -> str:
    source = _source.get(url.rstrip("/"), ALL)
    sent = f"the key from {source} was refused" if key(url) else "none was sent"
    return (f"{what} answered 401 Unauthorized: the server wants an API key and {sent}; set {source} to the "
            f"server's key (its --api-key or {SERVER_ENV}) and run again")


# ---- redaction: nothing written may carry a key ----

# flags whose value is a secret, in vLLM's and locust's spelling; "--api-key VALUE" and "--api-key=VALUE"
SECRET_FLAGS = ("--api-key", "--api_key", "--token", "--hf-token", "--password")
_FLAG_RE = re.compile(r"(--(?:api[-_]key|hf[-_]token|token|password))(=|\s+)(\S+)")
_BEARER_RE = re.compile(r"(Bearer\s+)(\S+)", re.IGNORECASE)


def redact_argv(argv: list) -> list:
    """A copy of ``argv`` with the value of every secret flag replaced by <redacted>."""
    out, hide_next = [], False
    for a in argv:
        s = str(a) if not isinstance(a, str) else a
        if hide_next:
            out.append(REDACTED)
            hide_next = False
        elif s in SECRET_FLAGS:
            out.append(a)
            hide_next = True
        elif any(s.startswith(f + "=") for f in SECRET_FLAGS):
            out.append(s.split("=", 1)[0] + "=" + REDACTED)
        else:
            out.append(a)
    return out


def redact_text(text: str) -> str:
    """``text`` with secret flag values, Bearer tokens and every key in use replaced by <redacted>."""
    text = _FLAG_RE.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
    text = _BEARER_RE.sub(lambda m: m.group(1) + REDACTED, text)
    for k in secrets_in_use():
        text = text.replace(k, REDACTED)
    return text


def redact(obj):
    """A copy of a JSON-like structure with every string redacted and every argv-like list redacted as argv."""
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = redact_argv(list(obj)) if any(isinstance(x, str) and x.split("=", 1)[0] in SECRET_FLAGS
                                              for x in obj) else list(obj)
        return [redact(x) for x in items]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj
