"""`/v1/embeddings` in one hop: HAProxy sends a request naming a routed model to that model's own
application, reading the `model` field of the JSON body.

Ray generates HAProxy's config with one backend per Serve application, chosen by path prefix,
so `/v1/embeddings` always went to the ingress, then over a Serve handle to the model's replica
(the second hop, about 8.5 ms of p50 here). Each embeddings model also has an application of its
own at `/models/{id}` (`serve_app/routed.py`); this adds, to the config Ray wrote, rules that
rewrite `POST /v1/embeddings` to `/models/{id}/v1/embeddings` when the body names that model and
one of its application's replicas is up. With none up (scaled to zero, starting) the request goes
to the ingress as before, whose handle call starts one. `gpu-serve-haproxy` applies it on every start
and reload (`proxy.launcher_main`).

The body is matched as text, `"model"` then `:` then the quoted id (any spaces between): inside a
JSON string every quote is escaped (`\\"`), so text that merely mentions a model cannot match. A
body whose field comes after HAProxy's buffer (16 KiB; the OpenAI SDK sends `input` first, so
a long batch) is not matched and takes the ingress, which serves it all the same.
"""

from __future__ import annotations

import re

from serve_app.cluster.names import ROUTE_ROOT

#: `acl is_<backend> path_beg <prefix>/models/<id>/`, as Ray writes it for a routed model's application.
_MODEL_ACL = re.compile(
    rf"^\s*acl is_(?P<backend>\S+) path_beg (?P<prefix>\S*?){re.escape(ROUTE_ROOT)}/(?P<model>\S+)/$"
)
#: The first rule the inserted ones must precede: backend choice (and the metric labels set per backend).
_ANCHOR = re.compile(r"^\s*(use_backend |default_backend |http-request set-var-fmt\(txn\.serve_app\))")
MARK = "# gpu-serve: /v1 requests naming a routed model go to its own application"
PATH = "/v1/embeddings"


def routed_backends(config: str) -> dict[str, tuple[str, str]]:
    """{model id: (backend name, service prefix)} for each routed model's application in `config`."""
    found = {}
    for line in config.splitlines():
        m = _MODEL_ACL.match(line)
        if m is not None:
            found[m["model"]] = (m["backend"], m["prefix"])
    return found


def replicas(config: str) -> dict[str, list[str]]:
    """{backend name: its replicas' server names}: not the backup server, Serve's proxy, which
    Ray adds to every backend for an application scaled to zero. `nbsrv()` would count that one
    when no replica is up, and a `/v1` request would then skip the ingress (and its at-once 503
    for a model no node can host) for a cold start through Serve's proxy."""
    out: dict[str, list[str]] = {}
    backend = None
    for line in config.splitlines():
        words = line.split()
        if line.startswith("backend "):
            backend = words[1]
            out[backend] = []
        elif not line.startswith(" "):
            backend = None
        elif backend is not None and words[:1] == ["server"] and "backup" not in words:
            out[backend].append(words[1])
    return out


def _regex(model: str) -> str:
    # POSIX classes and escapes only: the pattern sits in single quotes, where HAProxy takes
    # every character as it is.
    return '"model"[[:space:]]*:[[:space:]]*"' + re.sub(r"([][.^$*+?(){}|\\])", r"\\\1", model) + '"'


def rules(routes: dict[str, tuple[str, str]], servers: dict[str, list[str]]) -> list[str]:
    out = [f"    {MARK}"]
    prefixes = sorted({prefix for _, prefix in routes.values()})
    for i, prefix in enumerate(prefixes):
        out.append(f"    acl gs_v1_{i} path {prefix}{PATH}")
        out.append(f"    http-request wait-for-body time 1s if METH_POST gs_v1_{i}")
    for j, (model, (backend, prefix)) in enumerate(sorted(routes.items())):
        if "'" in model or not servers.get(backend):
            continue  # not expressible in the quoted pattern, or no replica: the ingress serves it
        out.append(f"    acl gs_model_{j} req.body -m reg '{_regex(model)}'")
        # One rule per replica, taken while it is up: once the path is rewritten, gs_v1 no longer matches.
        out.extend(
            f"    http-request set-path {prefix}{ROUTE_ROOT}/{model}{PATH} "
            f"if METH_POST gs_v1_{prefixes.index(prefix)} gs_model_{j} {{ srv_is_up({backend}/{server}) }}"
            for server in servers[backend]
        )
    return out


def add_body_routes(config: str) -> str:
    """`config` with the rules added in the HTTP frontend; unchanged when no model has its own
    application or the rules are already there."""
    routes = routed_backends(config)
    if not routes or MARK in config:
        return config
    lines = config.splitlines()
    in_frontend = False
    for n, line in enumerate(lines):
        if line.startswith("frontend "):
            in_frontend = line.split()[1] == "http_frontend"
        elif in_frontend and _ANCHOR.match(line):
            return "\n".join([*lines[:n], *rules(routes, replicas(config)), *lines[n:]]) + "\n"
    return config
