"""Security: ``--api-key`` guards every route the server lists except the health checks;
trust_remote_code stays off unless asked; model names with ``..`` never resolve to anything;
the server listens only where it was told to.

The API-key checks run on the tiny random llama behind --api-key (reliability.fixtures): routing
and authentication do not depend on the model.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import serve_expecting_failure
from reliability.http import API_KEY, AUTH, TINY_NAME
from reliability.procs import listening_addresses

pytest_plugins = ("reliability.fixtures",)

OPEN = {"/health", "/ping"}  # liveness probes: answer without the key, reveal nothing


def _listed_routes(srv) -> set[tuple[str, str]]:
    """(method, path) of every route the server logs at startup and lists in /openapi.json."""
    routes = set()
    for path, methods in re.findall(r"Route: (\S+), Methods: (.+)", srv.log_path.read_text()):
        routes |= {(m.strip(), path) for m in methods.split(",") if m.strip() != "HEAD"}
    spec = httpx.get(f"{srv.base}/openapi.json", headers=AUTH, timeout=30).json()
    routes |= {(m.upper(), path) for path, ops in spec["paths"].items() for m in ops}
    return routes


def _call(srv, method: str, path: str, headers: dict[str, str] | None) -> httpx.Response:
    url = srv.base + re.sub(r"\{[^}]+\}", "x", path)
    return httpx.request(method, url, headers=headers, json={} if method != "GET" else None, timeout=60)


def test_api_key_guards_every_listed_route(tiny_server):
    routes = _listed_routes(tiny_server)
    assert len(routes) >= 30 and ("POST", "/invocations") in routes and ("GET", "/metrics") in routes
    wrong = [{"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"},
             {"Authorization": API_KEY}, {"X-Api-Key": API_KEY}]
    for method, path in sorted(routes):
        anonymous = _call(tiny_server, method, path, None)
        if path in OPEN:
            assert anonymous.status_code == 200, (method, path, anonymous.status_code)
            continue
        assert anonymous.status_code == 401, (method, path, anonymous.status_code, anonymous.text[:200])
        for headers in wrong:
            assert _call(tiny_server, method, path, headers).status_code == 401, (method, path, headers)
        # with the key an empty body reaches the handler, which may still refuse it (4xx; the
        # scale-out routes answer 403 "disabled, restart with --enable-scale-out")
        keyed = _call(tiny_server, method, path, AUTH)
        assert keyed.status_code != 401, (method, path, keyed.text[:200])
        assert keyed.status_code < 500, (method, path, keyed.status_code, keyed.text[:300])
    # the key in a query string is no key
    r = httpx.get(f"{tiny_server.url}/models?api_key={API_KEY}", timeout=30)
    assert r.status_code == 401


def test_keyed_request_generates(tiny_server):
    r = httpx.post(f"{tiny_server.url}/completions", headers=AUTH, timeout=120,
                   json={"model": TINY_NAME, "prompt": "hi", "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("endpoint", ["/completions", "/chat/completions", "/messages"])
def test_model_names_with_dotdot_never_resolve(tiny_server, tiny_model, endpoint):
    names = ["team/../team/tiny", "../tiny", "team/tiny/..", "team/./tiny", "team//tiny",
             "team%2F..%2Ftiny", str(tiny_model), f"{tiny_model}/../{tiny_model.name}",
             "../" * 8 + "etc/passwd", "/etc/passwd", "~/.ssh/id_rsa"]
    for name in names:
        body = {"model": name, "max_tokens": 2}
        body |= {"prompt": "hi"} if endpoint == "/completions" else {"messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{tiny_server.url}{endpoint}", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 404, (name, r.status_code, r.text[:200])
        assert "root:" not in r.text
    listed = httpx.get(f"{tiny_server.url}/models", headers=AUTH, timeout=30).json()
    assert [m["id"] for m in listed["data"]] == [TINY_NAME]


def _non_loopback_ipv4() -> str | None:
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def test_server_listens_only_where_told(tiny_server):
    """--host 127.0.0.1: the whole process tree (engine core included) listens on that address
    and port only, and the port is closed on the machine's other interfaces."""
    assert listening_addresses(tiny_server.proc.pid) == {("127.0.0.1", tiny_server.port)}
    other = _non_loopback_ipv4()
    if other is not None:
        with socket.socket() as s:
            s.settimeout(5)
            assert s.connect_ex((other, tiny_server.port)) != 0, f"reachable on {other}"


def _remote_code_checkpoint(tiny_model: Path, dest: Path, marker: Path) -> Path:
    """The tiny llama re-labelled as a custom architecture whose config class is Python code in
    the checkpoint; importing that code writes ``marker``."""
    shutil.copytree(tiny_model, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(model_type="evil_llama", architectures=["EvilForCausalLM"],
                  auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (dest / "config.json").write_text(json.dumps(config))
    (dest / "configuration_evil.py").write_text(
        "from pathlib import Path\n"
        "from transformers import LlamaConfig\n"
        f"Path({str(marker)!r}).write_text('remote code ran')\n"
        "class EvilConfig(LlamaConfig):\n"
        "    model_type = 'evil_llama'\n")
    return dest


def test_trust_remote_code_stays_off_unless_asked(tiny_model, tmp_path):
    """Without --trust-remote-code the checkpoint's code never runs and startup fails saying
    why; with it (the control) the same checkpoint's code does run."""
    off_marker, on_marker = tmp_path / "off.txt", tmp_path / "on.txt"
    off = _remote_code_checkpoint(tiny_model, tmp_path / "off", off_marker)
    on = _remote_code_checkpoint(tiny_model, tmp_path / "on", on_marker)
    args = ["--max-model-len", "256", "--kv-cache-memory-bytes", str(16 * 2**20)]
    with ThreadPoolExecutor(2) as pool:
        refused, trusted = pool.map(lambda a: serve_expecting_failure(*a),
                                    [(off, args), (on, [*args, "--trust-remote-code"])])
    assert refused.returncode is not None and refused.returncode != 0, refused.tail()
    assert not off_marker.exists(), "checkpoint code ran without --trust-remote-code"
    assert "trust_remote_code" in refused.output or "trust-remote-code" in refused.output, refused.tail()
    assert on_marker.exists(), f"control: the checkpoint code should run when trusted\n{trusted.tail()}"
    assert trusted.returncode is not None, "hung"
