"""The Serve application builder: `import_path: serve_app.app:build_app` in serve_config.yaml."""

from __future__ import annotations

from typing import Any

from serve_app.cluster.names import deployment_name
from serve_app.config import PYTHON_FAMILY, AppConfig, ConfigError, ModelConfig, parse_app_config
from serve_app.logs import serve_logging_config

FAMILY_DEPLOYMENTS = {
    "sentence-transformers": ("deployments.embeddings", "EmbeddingsDeployment"),
    "faster-whisper": ("deployments.whisper", "WhisperDeployment"),
    "transformers-causal-lm": ("deployments.text_generation", "TextGenerationDeployment"),
}


__all__ = [
    "FAMILY_DEPLOYMENTS", "applications", "bind_model", "build_app", "build_model_app", "build_split_app",
    "deployment_name", "routed_models", "split_serve_config", "user_deployment",
]

#: Only the ingress checks keys: model replicas never get them.
KEY_FIELDS: dict[str, Any] = {"http": {"api_keys", "admin_keys"}}


def _deployment_class(family: str) -> Any:
    import importlib

    module_name, attr = FAMILY_DEPLOYMENTS[family]
    return getattr(importlib.import_module(module_name), attr)


def user_deployment(model: ModelConfig, config: AppConfig) -> Any:
    """The Serve deployment of a `family: python` entry, or a ConfigError naming its field."""
    import importlib

    from ray import serve

    from serve_app.managed import ManagedModel

    index = next(i for i, m in enumerate(config.models) if m.id == model.id)
    where = f"models[{index}](id={model.id!r}).deployment"
    path = model.deployment or ""
    module_name, _, attr = path.partition(":")

    def fail(why: str) -> ConfigError:
        return ConfigError(f"invalid gpu-serve config:\n  {where}: {why} (got {path!r})")

    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise fail(
            f"cannot import module {module_name!r} ({type(exc).__name__}: {exc}); check the module path and "
            "that its package is installed (or on PYTHONPATH) on every node"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise fail(f"module {module_name!r} has no attribute {attr!r}; name the ManagedModel subclass")
        obj = getattr(obj, part)
    target = getattr(obj, "func_or_class", obj)  # a class already wrapped in @serve.deployment
    if not (isinstance(target, type) and issubclass(target, ManagedModel)):
        kind = f"class {target.__qualname__}" if isinstance(target, type) else type(target).__name__
        raise fail(f"{kind} is not a subclass of serve_app.ManagedModel; subclass it and implement load(device)")
    return obj if target is not obj else serve.deployment(target)


def bind_model(model: ModelConfig, config: AppConfig, *, routed: bool = False) -> Any:
    """The model's deployment, bound; `routed`: as the ingress of its own application
    (`serve_app/routed.py`), which answers HTTP itself and so checks keys itself."""
    cls = user_deployment(model, config) if model.family == PYTHON_FAMILY else _deployment_class(model.family)
    if routed:
        from ray import serve

        from serve_app.routed import routed_class

        cls = serve.deployment(routed_class(cls.func_or_class))
    exclude = None if routed else KEY_FIELDS
    return cls.options(
        name=deployment_name(model.id),
        ray_actor_options={"num_gpus": model.num_gpus, "num_cpus": model.num_cpus, "resources": dict(model.resources)},
        autoscaling_config=model.autoscaling.to_serve(default_target=_target_ongoing(model)),
        max_ongoing_requests=_max_ongoing(model),
        max_queued_requests=model.max_queued_requests,
        graceful_shutdown_timeout_s=60,
        logging_config=serve_logging_config(),
        graceful_shutdown_wait_loop_s=1,
    ).bind(model.model_dump(mode="json"), config.model_dump(mode="json", exclude=exclude))


def _target_ongoing(model: ModelConfig) -> float:
    """Requests per replica before Serve adds one. A batching family serves a full batch in one
    forward pass, so a second replica before then only splits batches: with 2 per replica, 8
    one-sentence clients started a second MiniLM replica on the 2-core machine, the two fought
    over the cores, and 8-client throughput fell to 0.29x infinity-emb's."""
    if model.family == "sentence-transformers":
        return float(model.max_batch_size)
    return 2.0


def _max_ongoing(model: ModelConfig) -> int:
    """Let Serve send a replica what it can use: a full batch (embeddings), or the running file
    plus its own bounded queue (speech, which answers 503 beyond it)."""
    if model.family == "faster-whisper":
        return max(model.max_ongoing_requests, model.max_queue + 2)
    if model.family == "sentence-transformers":
        return max(model.max_ongoing_requests, model.max_batch_size)
    return model.max_ongoing_requests


def with_env_keys(config: AppConfig, environ: dict[str, str] | None = None) -> AppConfig:
    """Add the keys in this process's GPU_SERVE_API_KEYS / GPU_SERVE_ADMIN_KEYS to the config, so
    `serve run` with the variables set works on a cluster whose workers do not have them."""
    import os

    from serve_app.api.auth import ADMIN_KEYS_ENV, API_KEYS_ENV, split_keys

    env = os.environ if environ is None else environ
    api, admin = split_keys(env.get(API_KEYS_ENV)), split_keys(env.get(ADMIN_KEYS_ENV))
    if not api and not admin:
        return config
    http = config.http.model_copy(
        update={"api_keys": (*config.http.api_keys, *api), "admin_keys": (*config.http.admin_keys, *admin)}
    )
    return config.model_copy(update={"http": http})


def routed_models(config: AppConfig) -> list[ModelConfig]:
    """The models that get an application of their own when the service is deployed as several."""
    from serve_app.routed import has_route

    return [m for m in config.models if has_route(config, m)]


#: In a split Serve config (:func:`split_serve_config`), a model application's args name its model here.
SERVE_MODEL_KEY = "serve_model"


def applications(args: dict[str, Any], name: str = "gpu-serve", route_prefix: str = "/") -> list[dict[str, Any]]:
    """Every Serve application of the service, as `serve.run` keyword arguments, in the order to
    run them: each routed model's own (`http.model_routes`), then the ingress's, which finds them
    by name. `serve run` of one `build_app` application serves every model through the ingress."""
    from serve_app import routed

    config = with_env_keys(parse_app_config(args))
    own = routed_models(config)
    apps = [
        {"target": bind_model(m, config, routed=True), "name": routed.app_name(name, m.id),
         "route_prefix": routed.route_prefix(route_prefix, m.id)}
        for m in own
    ]
    target = build_split_app(args) if own else build_app(args)
    return [*apps, {"target": target, "name": name, "route_prefix": route_prefix}]


def split_serve_config(doc: dict[str, Any]) -> dict[str, Any]:
    """A Serve config of one gpu-serve application as the several :func:`applications` deploys,
    for `serve run`, `serve deploy` and KubeRay: the ingress's first (`build_split_app`), then one
    per routed model (`build_model_app`, its args the service's plus `serve_model`)."""
    import copy

    from serve_app import routed

    out = copy.deepcopy(doc)
    main = out["applications"][0]
    if main.get("import_path") != "serve_app.app:build_app" or len(out["applications"]) != 1:
        raise ValueError("expected one application with import_path serve_app.app:build_app")
    config = parse_app_config(main.get("args") or {})
    own = routed_models(config)
    if not own:
        return out
    name, prefix = main.setdefault("name", "gpu-serve"), main.setdefault("route_prefix", "/")
    main["import_path"] = "serve_app.app:build_split_app"
    for m in own:
        app: dict[str, Any] = {
            "name": routed.app_name(name, m.id), "route_prefix": routed.route_prefix(prefix, m.id),
            "import_path": "serve_app.app:build_model_app",
            "args": {**copy.deepcopy(main.get("args") or {}), SERVE_MODEL_KEY: m.id},
        }
        # The rest (runtime_env, ...) as the service's; `deployments` overrides name its own.
        app.update({k: copy.deepcopy(v) for k, v in main.items() if k not in (*app, "deployments")})
        out["applications"].append(app)
    return out


def build_model_app(args: dict[str, Any]) -> Any:
    """One routed model's application (`import_path` of a split Serve config)."""
    args = dict(args)
    model_id = args.pop(SERVE_MODEL_KEY, None)
    config = with_env_keys(parse_app_config(args))
    model = config.model(model_id) if isinstance(model_id, str) else None
    if model is None or model not in routed_models(config):
        served = ", ".join(m.id for m in routed_models(config)) or "(none: http.model_routes is off)"
        raise ConfigError(f"invalid gpu-serve config:\n  {SERVE_MODEL_KEY}: names no embeddings or speech model "
                          f"with a route (got {model_id!r}; these have one: {served})")
    return bind_model(model, config, routed=True)


def build_split_app(args: dict[str, Any]) -> Any:
    """The ingress's application when the routed models are deployed in applications of their
    own (:func:`applications`, :func:`split_serve_config`): it reaches them by name."""
    return _ingress(args, split=True)


def build_app(args: dict[str, Any]) -> Any:
    """Validate the args (failing the deploy with the field and value named) and bind the graph.

    Every model is bound here, and `http.model_routes` is off inside the cluster, so nothing
    there looks for applications that were not deployed (`serve run` of this one application)."""
    return _ingress(args, split=False)


def _ingress(args: dict[str, Any], split: bool) -> Any:
    from serve_app.ingress import Ingress

    config = with_env_keys(parse_app_config(args))
    routed_ids = {m.id for m in routed_models(config)} if split else set()
    if not routed_ids and config.http.model_routes:
        config = config.model_copy(update={"http": config.http.model_copy(update={"model_routes": False})})
    for m in config.models:  # every bad deployment path fails before anything is bound
        if m.family == PYTHON_FAMILY:
            user_deployment(m, config)
    handles = {m.id: {"routed": m.id} if m.id in routed_ids else bind_model(m, config) for m in config.models}
    return Ingress.options(
        num_replicas=config.http.num_replicas,
        ray_actor_options={"num_cpus": config.http.num_cpus},
        max_ongoing_requests=1000,
        logging_config=serve_logging_config(),
    ).bind(handles, config.model_dump(mode="json"))

