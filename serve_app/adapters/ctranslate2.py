"""Adapter for faster-whisper models, which run on CTranslate2 rather than torch.

CTranslate2 moves weights itself: `unload_model(to_cpu=True)` keeps a host copy and frees the
device copy, `load_model()` brings it back. Two behaviours shape this adapter:

* CTranslate2 silently skips an unload while a batch is running (no error, the weights stay on
  the device). The lifecycle's lease already keeps offloads away from running requests, but a
  skipped unload must not be reported as freed memory, so `to_cpu` checks `model_is_loaded`
  afterwards and raises when the weights are still on CUDA.
* On the CPU, `unload_model(to_cpu=True)` is a no-op (`model_is_loaded` stays true, measured
  with ctranslate2 4.8.5), and there is no device memory to free: like the torch adapter, the
  CPU path only records the tier. On CUDA the host copy is pageable memory, so a restore runs
  near the pageable copy rate.

CTranslate2 has its own caching allocator; torch's `empty_cache` does not reach it. `release`
calls `ctranslate2.clear_caches()` where the installed version has it (4.8.5 does not).
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from serve_app.adapters import Footprint
from serve_app.adapters.torch_module import weights_size

logger = logging.getLogger("serve_app.adapters.ctranslate2")

#: CTranslate2 stores a converted model's weights in this file (sharded models: model*.bin).
WEIGHTS_GLOB = "model*.bin"


class CTranslate2WhisperAdapter:
    """Wraps one `faster_whisper.WhisperModel`; `model` is None until `load`."""

    def __init__(
        self,
        model_path: str,
        compute_type: str | None = None,
        *,
        cpu_threads: int = 0,
        num_workers: int = 1,
    ) -> None:
        self.model_path = model_path
        self.compute_type = compute_type
        self.cpu_threads = cpu_threads
        self.num_workers = num_workers
        self.model: Any = None
        self.device = "cpu"
        self._on_device = False

    # --- the ModelAdapter interface --------------------------------------------------------

    def load(self, device: str) -> None:
        from faster_whisper import WhisperModel

        self.device = device
        kind, index = _split_device(device)
        compute_type = self.compute_type or ("float16" if kind == "cuda" else "int8")
        try:
            self.model = WhisperModel(
                self.model_path,
                device=kind,
                device_index=index,
                compute_type=compute_type,
                cpu_threads=self.cpu_threads,
                num_workers=self.num_workers,
                local_files_only=Path(self.model_path).exists(),
            )
        except BaseException:
            self.release()
            raise
        self._on_device = True

    def to_cpu(self) -> None:
        if not self._on_device:
            return
        if self._is_cuda:
            ct2 = self.model.model
            ct2.unload_model(to_cpu=True)
            if ct2.model_is_loaded:
                raise RuntimeError(
                    f"CTranslate2 kept the model on {self.device}: it skips an unload while a batch is "
                    "running; retry the offload once the model is idle"
                )
        self._on_device = False

    def to_gpu(self) -> None:
        if self._on_device:
            return
        if self._is_cuda:
            ct2 = self.model.model
            try:
                ct2.load_model()
            except BaseException:
                # A failed load_model leaves the host copy in place; make sure no partial
                # device copy survives, then report the failure with the CPU copy intact.
                if ct2.model_is_loaded:
                    ct2.unload_model(to_cpu=True)
                raise
        self._on_device = True

    def release(self) -> None:
        model, self.model = self.model, None
        self._on_device = False
        if model is not None:
            try:
                # Free the weights now, not whenever the last reference happens to go.
                model.model.unload_model()
            except Exception:
                logger.debug("unload_model before release failed; dropping references anyway", exc_info=True)
            del model
        gc.collect()
        import ctranslate2

        clear_caches = getattr(ctranslate2, "clear_caches", None)
        if clear_caches is not None:
            clear_caches()
        if self._is_cuda:
            try:
                import torch
            except ImportError:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()

    def footprint(self) -> Footprint:
        """The weight files' size on the device tier that holds them (logical on the CPU).

        CTranslate2 does not report its allocations; the file size is the measure we have. With
        a compute type narrower than the file's (int8 from a float16 file) the real use is smaller.
        """
        if self.model is None:
            return Footprint()
        size = self.weights_bytes() or 0
        if self._on_device:
            return Footprint(bytes_gpu=size)
        return Footprint(bytes_cpu=size)

    def weights_bytes(self) -> int | None:
        path = Path(self.model_path)
        if not path.is_dir():
            return weights_size(self.model_path)
        total = 0
        for f in path.glob(WEIGHTS_GLOB):
            total += weights_size(str(f)) or 0
        return total or None

    # --- helpers ---------------------------------------------------------------------------

    @property
    def is_loaded(self) -> bool:
        return self.model is not None

    @property
    def _is_cuda(self) -> bool:
        return self.device.startswith("cuda")


def _split_device(device: str) -> tuple[str, int]:
    """'cuda:1' -> ('cuda', 1); 'cuda' -> ('cuda', 0); 'cpu' -> ('cpu', 0)."""
    kind, _, index = device.partition(":")
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"unsupported device {device!r} for CTranslate2; expected 'cpu' or 'cuda[:N]'")
    return kind, int(index) if index else 0
