"""The adapter of a user's own model (`serve_app.ManagedModel`): chosen from what `load` returns.

A `ManagedModel` cannot name its adapter before its first load (the model does not exist yet),
so :class:`ResolvingAdapter` calls the user's loader and then picks, in this order:

1. an object that declares the **adapter protocol** (:class:`OffloadProtocol`): it moves its
   own weights with ``offload()``, ``restore()``, ``release()`` and reports ``footprint()``;
2. a ``torch.nn.Module``, or an object holding modules in its attributes (directly, or in a
   list, tuple or dict): the torch adapter moves every parameter and buffer through pinned host
   buffers on CUDA;
3. a CTranslate2 model (``ctranslate2.Generator``/``Translator``/``models.Whisper``, or an
   object whose ``.model`` is one, like ``faster_whisper.WhisperModel``): CTranslate2's own
   ``unload_model(to_cpu=True)`` / ``load_model()``;
4. ``None``: a deployment with no weights of its own (a pipeline over other models).

Anything else fails the load with the type named and the four ways out listed.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from serve_app.adapters import Footprint, ModelAdapter

logger = logging.getLogger("serve_app.adapters.managed")


@runtime_checkable
class OffloadProtocol(Protocol):
    """What a model object declares to be moved by its own code.

    All four are blocking and are called from a worker thread, never concurrently and never
    while a request holds the model.
    """

    def offload(self) -> None:
        """Move the weights to host memory and free the device copy."""

    def restore(self) -> None:
        """Move the weights back to the serving device. On failure, keep the host copy and raise."""

    def release(self) -> None:
        """Free every copy of the weights."""

    def footprint(self) -> int | Footprint:
        """Bytes the weights hold now: an int (on the tier the model is on) or a `Footprint`."""


def declares_protocol(obj: Any) -> bool:
    names = ("offload", "restore", "release", "footprint")
    return obj is not None and all(callable(getattr(obj, n, None)) for n in names)


def ct2_model_of(obj: Any) -> Any | None:
    """The CTranslate2 model inside `obj` (itself, or its `.model`), or None."""
    for candidate in (obj, getattr(obj, "model", None)):
        if candidate is not None and all(
            hasattr(candidate, n) for n in ("unload_model", "load_model", "model_is_loaded")
        ):
            return candidate
    return None


def modules_of(obj: Any) -> Any | None:
    """The torch module to move: `obj` itself, or its module attributes gathered in a ModuleList.

    A ModuleList holds the same module objects, so moving its parameters moves the user's.
    """
    torch = sys.modules.get("torch")
    if torch is None:  # nothing can be a module before torch is imported
        return None
    module_cls = torch.nn.Module
    if isinstance(obj, module_cls):
        return obj
    found: list[Any] = []
    for value in getattr(obj, "__dict__", {}).values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else [value]
        found.extend(v for v in items if isinstance(v, module_cls) and all(v is not f for f in found))
    if not found:
        return None
    return torch.nn.ModuleList(found)


class _ProtocolAdapter:
    def __init__(self, obj: Any, device: str) -> None:
        self.model = obj
        self.device = device
        self._on_device = True

    def load(self, device: str) -> None:
        self.device = device

    def to_cpu(self) -> None:
        if self._on_device:
            self.model.offload()
            self._on_device = False

    def to_gpu(self) -> None:
        if not self._on_device:
            self.model.restore()
            self._on_device = True

    def release(self) -> None:
        obj, self.model = self.model, None
        if obj is not None:
            obj.release()

    def footprint(self) -> Footprint:
        if self.model is None:
            return Footprint()
        fp = self.model.footprint()
        if isinstance(fp, Footprint):
            return fp
        return Footprint(bytes_gpu=int(fp)) if self._on_device else Footprint(bytes_cpu=int(fp))

    def weights_bytes(self) -> int | None:
        return None


class _CTranslate2Adapter:
    """Any CTranslate2 model; like the Whisper adapter, the CPU path only records the tier
    (`unload_model(to_cpu=True)` is a no-op there) and the footprint is the size we were told."""

    def __init__(self, obj: Any, device: str, size_bytes: int | None) -> None:
        self.model = obj
        self.device = device
        self._size = size_bytes or 0
        self._on_device = True

    def load(self, device: str) -> None:
        self.device = device

    @property
    def _ct2(self) -> Any:
        return ct2_model_of(self.model)

    def to_cpu(self) -> None:
        if self._on_device and self.device.startswith("cuda"):
            self._ct2.unload_model(to_cpu=True)
            if self._ct2.model_is_loaded:
                raise RuntimeError(
                    f"CTranslate2 kept the model on {self.device}: it skips an unload while a batch is "
                    "running; retry the offload once the model is idle"
                )
        self._on_device = False

    def to_gpu(self) -> None:
        if not self._on_device and self.device.startswith("cuda"):
            self._ct2.load_model()
        self._on_device = True

    def release(self) -> None:
        obj, self.model = self.model, None
        if obj is not None:
            try:
                ct2_model_of(obj).unload_model()
            except Exception:
                logger.debug("unload_model before release failed; dropping references anyway", exc_info=True)
        del obj
        gc.collect()

    def footprint(self) -> Footprint:
        if self.model is None:
            return Footprint()
        return Footprint(bytes_gpu=self._size) if self._on_device else Footprint(bytes_cpu=self._size)

    def weights_bytes(self) -> int | None:
        return self._size or None


class _NoWeights:
    """`load` returned None: nothing to move (a pipeline over other deployments)."""

    def __init__(self, device: str) -> None:
        self.model = None
        self.device = device

    def load(self, device: str) -> None:
        self.device = device

    def to_cpu(self) -> None:
        pass

    def to_gpu(self) -> None:
        pass

    def release(self) -> None:
        pass

    def footprint(self) -> Footprint:
        return Footprint()

    def weights_bytes(self) -> int | None:
        return None


class ResolvingAdapter:
    """The `ModelAdapter` of a `ManagedModel`: loads with the user's function, then delegates to
    the adapter that fits what it returned (see the module doc for the order)."""

    def __init__(
        self,
        loader: Callable[[str], Any],
        *,
        name: str,
        weights_path: str | None = None,
        declared_bytes: int | None = None,
    ) -> None:
        self._loader = loader
        self.name = name
        self._weights_path = weights_path
        self._declared = declared_bytes
        self.inner: ModelAdapter | None = None
        self.kind = "unresolved"
        self.device = "cpu"

    @property
    def model(self) -> Any:
        return getattr(self.inner, "model", None)

    def load(self, device: str) -> None:
        self.device = device
        obj = self._loader(device)
        try:
            self.inner, self.kind = self._resolve(obj, device)
            self.inner.load(device)
        except BaseException:
            self.inner = None
            del obj
            gc.collect()
            raise

    def _resolve(self, obj: Any, device: str) -> tuple[ModelAdapter, str]:
        if obj is None:
            return _NoWeights(device), "none"
        if declares_protocol(obj):
            return _ProtocolAdapter(obj, device), "protocol"
        module = modules_of(obj)
        if module is not None:
            from serve_app.adapters.torch_module import TorchModuleAdapter

            return (
                TorchModuleAdapter(lambda _device: obj, weights_path=self._weights_path, module_of=lambda _o: module),
                "torch",
            )
        if ct2_model_of(obj) is not None:
            from serve_app.adapters.torch_module import weights_size

            size = self._declared or weights_size(self._weights_path)
            return _CTranslate2Adapter(obj, device, size), "ctranslate2"
        raise TypeError(
            f"load() of model {self.name!r} returned a {type(obj).__module__}.{type(obj).__qualname__}, which "
            "cannot be moved between GPU and host memory; return a torch.nn.Module, an object holding "
            "modules in its attributes, a CTranslate2 model, an object with offload()/restore()/release()/"
            "footprint() (serve_app.adapters.managed.OffloadProtocol), or None for no weights"
        )

    def to_cpu(self) -> None:
        if self.inner is not None:
            self.inner.to_cpu()

    def to_gpu(self) -> None:
        if self.inner is None:
            raise RuntimeError(f"restore of model {self.name!r} without a load")
        self.inner.to_gpu()

    def release(self) -> None:
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.release()

    def footprint(self) -> Footprint:
        return self.inner.footprint() if self.inner is not None else Footprint()

    def weights_bytes(self) -> int | None:
        if self.inner is not None:
            return self.inner.weights_bytes()
        from serve_app.adapters.torch_module import weights_size

        return weights_size(self._weights_path)
