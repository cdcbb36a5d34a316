"""Adapter for faster-whisper models, which run on CTranslate2 rather than torch.

CTranslate2 moves weights itself: `unload_model(to_cpu=True)` keeps a host copy and frees the
device copy, `load_model()` brings it back. What shapes this adapter:

* **One thread per instance.** Every CTranslate2 call for an instance (the `WhisperModel`
  constructor, `unload_model`, `load_model`, and transcription through `submit`) runs on one
  dedicated thread, ended by `release`. CTranslate2 allocates and frees in the calling thread
  (`load_model` copies weights there, read in its source, `python/cpp/replica_pool.h`), and each
  tensor frees into the allocator of the thread that allocated it. With its `cub_caching`
  allocator that allocator is per thread and caching (blocks up to 16 MiB, up to 200 MB per
  thread): with calls spread over `asyncio.to_thread`'s pool, an unload leaves the weights
  cached in one pool thread and the next restore allocates in another, the 200-300 MB that
  faster-whisper users report left after unload (faster-whisper #680, #992). On one thread the
  cache is reused by the next restore, and when the thread ends at release its thread-local
  allocator (and CUDA stream, cuBLAS and cuDNN handles) is destroyed, which frees what it cached.
  The alternative, `CT2_CUDA_ALLOCATOR=cuda_malloc_async`, was not chosen: CTranslate2 reads it
  once per process at its first CUDA allocation, so an adapter cannot set it for itself; it is
  already the default where the GPU supports memory pools (CTranslate2 >= 2.11 with CUDA >= 11.2),
  where freed weights return to the process-wide pool and `~Model`'s `cudaDeviceSynchronize`
  lets the pool shrink; forcing it fails on GPUs without pools. The thread is correct under both.
* **The host copy is kept.** `load_model(keep_cache=True)`: after the first offload the host
  copy stays while the model is on the GPU, so later offloads only free device memory instead of
  copying every weight back to pageable RAM. It is counted in `bytes_cpu` from then on.
* CTranslate2 silently skips an unload while a batch is running (no error, the weights stay on
  the device). The lifecycle's lease already keeps offloads away from running requests, but a
  skipped unload must not be reported as freed memory, so `to_cpu` checks `model_is_loaded`
  afterwards and raises when the weights are still on CUDA.
* On the CPU, `unload_model(to_cpu=True)` is a no-op (`model_is_loaded` stays true, measured
  with ctranslate2 4.8.5), and there is no device memory to free: like the torch adapter, the
  CPU path only records the tier. The host copy is pageable memory, so a restore runs near the
  pageable copy rate.

torch's `synchronize`/`empty_cache` reach nothing CTranslate2 holds, so release does not call them.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from serve_app.adapters import Footprint
from serve_app.adapters.torch_module import weights_size

logger = logging.getLogger("serve_app.adapters.ctranslate2")
T = TypeVar("T")

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
        #: True once CTranslate2 keeps a host copy next to the device copy (keep_cache=True).
        self._host_copy = False
        self._executor: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- the instance's CTranslate2 thread -------------------------------------------------

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Run `fn` on this instance's CTranslate2 thread (started on first use)."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctranslate2")
                self._thread = self._executor.submit(threading.current_thread).result()
            return self._executor.submit(fn, *args, **kwargs)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`submit` and wait; runs inline when already on the instance's thread."""
        if self._thread is not None and threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    @property
    def thread(self) -> threading.Thread | None:
        """The thread every CTranslate2 call of this instance runs on; None when stopped."""
        return self._thread

    def _stop_thread(self) -> None:
        """End the thread: its thread-local CTranslate2 allocator frees what it cached."""
        with self._lock:
            executor, thread = self._executor, self._thread
            self._executor, self._thread = None, None
        if executor is not None:
            # From the thread itself (a release inside submitted work), waiting would deadlock.
            executor.shutdown(wait=threading.current_thread() is not thread)

    # --- the ModelAdapter interface --------------------------------------------------------

    def load(self, device: str) -> None:
        self.device = device
        try:
            self.call(self._load, device)
        except BaseException:
            self.release()
            raise
        self._on_device = True

    def _load(self, device: str) -> None:
        from faster_whisper import WhisperModel

        kind, index = _split_device(device)
        compute_type = self.compute_type or ("float16" if kind == "cuda" else "int8")
        self._host_copy = False
        self.model = WhisperModel(
            self.model_path,
            device=kind,
            device_index=index,
            compute_type=compute_type,
            cpu_threads=self.cpu_threads,
            num_workers=self.num_workers,
            local_files_only=Path(self.model_path).exists(),
        )

    def to_cpu(self) -> None:
        if not self._on_device:
            return
        if self._is_cuda:
            self.call(self._unload_to_cpu)
            self._host_copy = True
        self._on_device = False

    def _unload_to_cpu(self) -> None:
        ct2 = self.model.model
        ct2.unload_model(to_cpu=True)
        if ct2.model_is_loaded:
            raise RuntimeError(
                f"CTranslate2 kept the model on {self.device}: it skips an unload while a batch is "
                "running; retry the offload once the model is idle"
            )

    def to_gpu(self) -> None:
        if self._on_device:
            return
        if self._is_cuda:
            self.call(self._load_to_gpu)
        self._on_device = True

    def _load_to_gpu(self) -> None:
        ct2 = self.model.model
        try:
            ct2.load_model(keep_cache=True)
        except BaseException:
            # A failed load_model leaves the host copy in place; make sure no partial
            # device copy survives, then report the failure with the CPU copy intact.
            if ct2.model_is_loaded:
                ct2.unload_model(to_cpu=True)
            raise

    def release(self) -> None:
        try:
            if self.model is not None:
                self.call(self._drop)
        finally:
            self.model = None
            self._on_device = False
            self._host_copy = False
            self._stop_thread()

    def _drop(self) -> None:
        """On the instance's thread, so every free lands in the allocator that thread owns."""
        model, self.model = self.model, None
        try:
            # Free the weights and the host copy now, not whenever the last reference goes.
            model.model.unload_model()
        except Exception:
            logger.debug("unload_model before release failed; dropping references anyway", exc_info=True)
        del model
        gc.collect()

    def footprint(self) -> Footprint:
        """The weight files' size on the device tier that holds them (logical on the CPU).

        CTranslate2 does not report its allocations; the file size is the measure we have. Once
        offloaded on CUDA, the host copy CTranslate2 keeps counts in `bytes_cpu` on both tiers. With
        a compute type narrower than the file's (int8 from a float16 file) the real use is smaller.
        """
        if self.model is None:
            return Footprint()
        size = self.weights_bytes() or 0
        if self._on_device:
            return Footprint(bytes_gpu=size, bytes_cpu=size if self._host_copy else 0)
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
