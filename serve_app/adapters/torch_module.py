"""Adapter for torch modules (sentence-transformers, transformers causal LMs).

A move copies the model's bytes as one flat block, not tensor by tensor:

* **Layout.** Every parameter and buffer is keyed by its qualified name and grouped by the
  storage it views, so tied weights (one Parameter under two names) and views of one fused
  tensor land in one region and come back sharing it; shape, strides (memory format) and
  dtype are recorded per name. Regions start on 512-byte boundaries, the CUDA caching
  allocator's own alignment, so rebuilt parameters are as aligned as freshly allocated ones.
* **Host buffer.** One flat host allocation per model, of the layout's exact size, page-locked
  once with `cudaHostRegister` and reused by every offload. Not `torch.empty(pin_memory=True)`:
  torch's caching host allocator rounds each pinned block up to a power of two (a 9 GiB model
  would pin 16 GiB, a 90 MB tensor holds 128 MB) and keeps freed blocks cached, so neither the
  host-RAM budget nor `release` would see the real bytes. `bytes_cpu` reports the pages
  actually locked.
* **Restore.** One device allocation for the whole layout, one non-blocking host-to-device
  copy on the adapter's own stream, a host wait on that stream only (`torch.cuda.synchronize()`
  would wait for every stream in the process), then the parameters are rebound as views.
  Anything failing on the way (an out-of-memory at the allocation, an error while rebinding)
  rebinds every tensor to the host views and frees the device block: the CPU copy still serves.
* **Offload.** When the module still views the block of the last restore, one device-to-host
  copy of it; otherwise (the first offload after a load) one copy per storage region. When the
  names, shapes, strides or dtypes changed since the host buffer was made (a buffer added or
  set to None, `model.half()`), a new host buffer of the new layout replaces it.
* **No GPU tensor outlives an offload.** Device tensors live only in the scope of the helper
  that copies them, so no loop variable keeps the last weight alive past `empty_cache()`.
  `gc.collect()` is not called on moves: the allocator's own count shows whether the weights
  were freed, and only when it shows less than their size does one collection run (a module
  holding its weights in a reference cycle), with a warning naming what is still held.
* **Release** also returns torch's cached pinned blocks (`torch._C._host_emptyCache()`) and the
  per-thread cuBLAS workspaces (`torch._C._cuda_clearCublasWorkspaces()`): inference in
  `asyncio.to_thread` pool threads gives each thread its own workspace, a live allocator block
  that `empty_cache()` cannot free. Offload clears the workspaces too, so an offloaded model
  leaves none behind.

Layouts the flat copy would move wrongly are refused at load (`check_movable`): a model split
by `device_map` or carrying accelerate hooks, meta tensors, quantization state (bitsandbytes,
tensor subclasses, quantized dtypes), compiled modules and captured CUDA graphs.

Pinned buffers are a CUDA-only path (`pin_memory` raises without an accelerator). On the CPU
the weights stay where they are and only the tier is recorded, unless the adapter is built with
`flat_moves_on_cpu=True`: then the same layout and copy code runs with a second CPU allocation
standing in for device memory, which is how the move logic is tested where no GPU exists.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_app.adapters import Footprint

logger = logging.getLogger("serve_app.adapters.torch")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: Every region of the flat buffers starts on this boundary (the CUDA caching allocator's).
ALIGN_BYTES = 512
#: A region's first byte is rounded down to this, the largest element size (complex128).
_MAX_ITEMSIZE = 16
MiB = 1024**2


class UnsupportedLayout(ValueError):
    """The loaded model holds its weights in a way the flat move would get wrong."""


class LayoutChanged(RuntimeError):
    """The module's tensors no longer match the host buffer they were offloaded to."""


# --- layout: pure bookkeeping over a module's tensors ------------------------------------------


@dataclass(frozen=True, slots=True)
class TensorSlot:
    """One distinct parameter or buffer: where it sits in the flat buffer and what it looks like."""

    name: str
    kind: str  # "param" or "buffer"
    region: int  # index into Layout.regions; -1 for a tensor with no elements
    byte_offset: int  # of the tensor's first element, from its region's start
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: Any


@dataclass(frozen=True, slots=True)
class Region:
    """The bytes of one storage that the module's tensors view; `offset` is into the flat buffer."""

    offset: int
    nbytes: int


@dataclass(frozen=True)
class Layout:
    slots: tuple[TensorSlot, ...]
    regions: tuple[Region, ...]
    #: Every qualified name of each slot (tied weights, shared buffers), in slot order.
    aliases: tuple[tuple[str, ...], ...]
    #: Size of the flat buffer: regions plus alignment padding.
    nbytes: int

    @property
    def payload_bytes(self) -> int:
        return sum(r.nbytes for r in self.regions)

    def difference(self, other: Layout) -> str | None:
        """None when both describe the same tensors; else the first difference, for messages."""
        if len(self.slots) != len(other.slots):
            return f"{len(other.slots)} tensors, expected {len(self.slots)}"
        for a, b in zip(self.slots, other.slots, strict=True):
            if a.name != b.name:
                return f"tensor {b.name!r} where {a.name!r} was"
            for what in ("kind", "shape", "stride", "dtype"):
                if getattr(a, what) != getattr(b, what):
                    return f"{a.name}: {what} {getattr(b, what)}, expected {getattr(a, what)}"
        if self.aliases != other.aliases:
            return "the tensors that share one object changed"
        if self.regions != other.regions or [s.region for s in self.slots] != [s.region for s in other.slots]:
            return "the tensors that share storage changed"
        if any(a.byte_offset != b.byte_offset for a, b in zip(self.slots, other.slots, strict=True)):
            return "offsets inside a shared storage changed"
        return None


@dataclass
class _Entry:
    """A distinct tensor object in the module and every place that holds it."""

    names: list[str]
    kind: str
    tensor: Any  # the Parameter itself, or the buffer tensor
    owners: list[tuple[Any, str]] = field(default_factory=list)  # (module, attribute)


def module_entries(module: Any) -> list[_Entry]:
    """Every distinct parameter and buffer object, first-seen order, with all its names.

    Shared submodules and tied parameters appear under several names; they are one entry.
    """
    by_id: dict[int, _Entry] = {}
    out: list[_Entry] = []
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for kind, table in (("param", mod._parameters), ("buffer", mod._buffers)):
            for attr, tensor in table.items():
                if tensor is None:
                    continue
                name = f"{mod_name}.{attr}" if mod_name else attr
                entry = by_id.get(id(tensor))
                if entry is None:
                    entry = _Entry([name], kind, tensor, [(mod, attr)])
                    by_id[id(tensor)] = entry
                    out.append(entry)
                    continue
                if name not in entry.names:
                    entry.names.append(name)
                if not any(m is mod and a == attr for m, a in entry.owners):
                    entry.owners.append((mod, attr))
    return out


def _extent_bytes(tensor: Any) -> int:
    """Bytes from the tensor's first element to just past its last, strides included."""
    if tensor.numel() == 0:
        return 0
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return (last + 1) * tensor.element_size()


def plan_layout(entries: list[_Entry]) -> tuple[Layout, list[tuple[Any, int]]]:
    """The flat layout of `entries`, and per region a tensor of its storage and the byte to copy from.

    Tensors viewing one storage (same device and base pointer) share one region covering the
    bytes they use, so sharing survives the copy.
    """
    groups: dict[tuple[str, int], list[int]] = {}
    for i, e in enumerate(entries):
        t = e.tensor
        if t.numel() == 0:
            continue
        groups.setdefault((str(t.device), t.untyped_storage().data_ptr()), []).append(i)
    region_of: dict[int, int] = {}
    start_of: list[int] = []
    spans: list[int] = []
    sources: list[tuple[Any, int]] = []
    for members in groups.values():
        starts = [entries[i].tensor.storage_offset() * entries[i].tensor.element_size() for i in members]
        ends = [s + _extent_bytes(entries[i].tensor) for s, i in zip(starts, members, strict=True)]
        start = min(starts) - min(starts) % _MAX_ITEMSIZE
        for i in members:
            region_of[i] = len(spans)
        start_of.append(start)
        spans.append(max(ends) - start)
        sources.append((entries[members[0]].tensor, start))
    regions, offset = [], 0
    for nbytes in spans:
        regions.append(Region(offset, nbytes))
        offset += -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
    slots = []
    for i, e in enumerate(entries):
        t = e.tensor
        region = region_of.get(i, -1)
        byte_offset = 0 if region < 0 else t.storage_offset() * t.element_size() - start_of[region]
        slots.append(TensorSlot(e.names[0], e.kind, region, byte_offset, tuple(t.shape), tuple(t.stride()), t.dtype))
    layout = Layout(tuple(slots), tuple(regions), tuple(tuple(e.names) for e in entries), max(offset, ALIGN_BYTES))
    return layout, sources


def build_views(layout: Layout, flat: Any) -> list[Any]:
    """One tensor per slot, viewing `flat` (a uint8 tensor of `layout.nbytes`) at its region."""
    import torch

    typed: dict[Any, Any] = {}
    views = []
    for s in layout.slots:
        if s.region < 0:
            views.append(torch.empty_strided(s.shape, s.stride, dtype=s.dtype, device=flat.device))
            continue
        base = typed.get(s.dtype)
        if base is None:
            base = typed[s.dtype] = flat.view(s.dtype)
        first_byte = layout.regions[s.region].offset + s.byte_offset
        views.append(base.as_strided(s.shape, s.stride, first_byte // base.element_size()))
    return views


def bind_views(entries: list[_Entry], views: list[Any]) -> None:
    """Point each parameter (`.data`, so the Parameter object and its ties stay) and buffer at its view."""
    for entry, view in zip(entries, views, strict=True):
        if entry.kind == "param":
            entry.tensor.data = view
        else:
            for mod, attr in entry.owners:
                mod._buffers[attr] = view


def bound_difference(entries: list[_Entry], layout: Layout, flat: Any) -> str | None:
    """None when `entries` are exactly `layout`'s views of `flat`; else what differs."""
    def explain() -> str:
        return layout.difference(plan_layout(entries)[0]) or "the tensors changed"

    if len(entries) != len(layout.slots) or [s.name for s in layout.slots] != [e.names[0] for e in entries]:
        return explain()
    base = flat.data_ptr()
    for entry, slot in zip(entries, layout.slots, strict=True):
        t = entry.tensor
        if (tuple(t.shape), tuple(t.stride()), t.dtype, entry.kind) != (slot.shape, slot.stride, slot.dtype, slot.kind):
            return explain()
        if slot.region >= 0 and (
            t.device != flat.device or t.data_ptr() != base + layout.regions[slot.region].offset + slot.byte_offset
        ):
            return f"{slot.name} no longer views the buffer"
    if tuple(tuple(e.names) for e in entries) != layout.aliases:
        return "the tensors that share one object changed"
    return None


# --- memory: host buffer, device helpers ---------------------------------------------------------


def _page_size() -> int:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4096


def locked_bytes(ptr: int, nbytes: int, page: int) -> int:
    """Bytes the OS locks to pin [ptr, ptr + nbytes): every page the range touches."""
    if nbytes <= 0:
        return 0
    return (-(-(ptr + nbytes) // page) - ptr // page) * page


class HostBuffer:
    """One flat host allocation holding a model's weights; page-locked once when `pin`.

    Page-locking is `cudaHostRegister` on memory torch allocated (exact size), undone by
    `close()`; `pinned_bytes` is what the OS really locked (whole pages).
    """

    def __init__(self, layout: Layout, *, pin: bool) -> None:
        import torch

        self.layout = layout
        self.flat = torch.empty(layout.nbytes, dtype=torch.uint8)
        self.pinned_bytes = 0
        if pin:
            cudart = torch.cuda.cudart()
            err = cudart.cudaHostRegister(self.flat.data_ptr(), layout.nbytes, 0)
            if int(err) != 0:
                raise RuntimeError(
                    f"cudaHostRegister of {layout.nbytes / MiB:.0f} MiB failed with CUDA error {int(err)}; "
                    "the host may be short of lockable memory (ulimit -l) or RAM"
                )
            self.pinned_bytes = locked_bytes(self.flat.data_ptr(), layout.nbytes, _page_size())

    @property
    def nbytes(self) -> int:
        """Host RAM this buffer holds: the locked pages, or the allocation when not pinned."""
        return self.pinned_bytes or self.layout.nbytes

    def close(self) -> None:
        if self.pinned_bytes:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.flat.data_ptr())
            self.pinned_bytes = 0


def _clear_cuda_caches(device: str, *, host: bool) -> None:
    """Return freed device blocks, cuBLAS workspaces and (on release) cached pinned blocks."""
    import torch

    with torch.cuda.device(device):
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()
    if host:
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:
            host_empty()


# --- the adapter ---------------------------------------------------------------------------------


class TorchModuleAdapter:
    """Wraps whatever `loader(device)` returns; `module_of` finds its `torch.nn.Module`."""

    def __init__(
        self,
        loader: Callable[[str], Any],
        *,
        weights_path: str | None = None,
        module_of: Callable[[Any], Any] = lambda obj: obj,
        flat_moves_on_cpu: bool = False,
        oom_at_bytes: int | None = None,
    ) -> None:
        self._loader = loader
        #: Fault injection (a model's `fault_oom_at_bytes`): a load raises a simulated
        #: out-of-memory once it has allocated this many bytes (serve_app/adapters/faults.py).
        self.oom_at_bytes = oom_at_bytes
        self._fault_ledger: Any = None
        self._module_of = module_of
        self._weights_path = weights_path
        self._flat_moves_on_cpu = flat_moves_on_cpu
        self.model: Any = None
        self.device = "cpu"
        self._on_device = False
        self._host: HostBuffer | None = None
        #: The one device block the module views after a restore (None after a load).
        self._device_flat: Any = None
        self._stream: Any = None

    @property
    def last_load_fault(self) -> dict[str, Any] | None:
        """After a load failed with `oom_at_bytes` armed: what it allocated, and how much of
        that is still alive now (`held_bytes`, read at each call)."""
        return None if self._fault_ledger is None else self._fault_ledger.report()

    # --- the ModelAdapter interface --------------------------------------------------------

    def load(self, device: str) -> None:
        self.device = device
        quiet_progress_bars()
        with contextlib.ExitStack() as stack:
            ledger = None
            if self.oom_at_bytes is not None:
                from serve_app.adapters.faults import allocation_budget

                ledger = stack.enter_context(allocation_budget(self.oom_at_bytes))
            try:
                self.model = self._loader(device)
                check_movable(self.model, self._module_of(self.model), device)
            except BaseException as exc:
                # The loader's frames (and so the half-built model and every tensor it had
                # allocated) hang off the traceback, which the lifecycle keeps as the failed
                # attempt's error until the next try: clear them before releasing, or a failed
                # load holds what it allocated.
                traceback.clear_frames(exc.__traceback__)
                self.release()
                if ledger is not None:
                    self._fault_ledger = ledger
                    logger.warning("Fault injection: load failed; %s", ledger.report())
                raise
        self._on_device = True

    def to_cpu(self) -> None:
        if not self._on_device:
            return
        if self._moves:
            expected, allocated = self._offload()
            if self._is_cuda:
                self._check_freed(expected, allocated)
        self._on_device = False

    def to_gpu(self) -> None:
        if self._on_device:
            return
        if self._moves:
            self._restore()
        self._on_device = True

    def release(self) -> None:
        self.model = None
        self._device_flat = None
        host, self._host = self._host, None
        if host is not None:
            host.close()
        self._on_device = False
        gc.collect()  # not a move: a released model's object graph (configs, hooks) may hold cycles
        if self._is_cuda:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize(self.device)
                _clear_cuda_caches(self.device, host=True)
        self._stream = None

    def footprint(self) -> Footprint:
        if self.model is None:
            return Footprint()
        host = self._host.nbytes if self._host is not None else 0
        if self._on_device:
            if self._device_flat is not None:
                on_device = int(self._device_flat.numel())
            else:
                on_device = plan_layout(self._entries())[0].payload_bytes
            return Footprint(bytes_gpu=on_device, bytes_cpu=host)
        if self._host is not None:
            return Footprint(bytes_gpu=0, bytes_cpu=host)
        return Footprint(bytes_gpu=0, bytes_cpu=plan_layout(self._entries())[0].payload_bytes)

    def weights_bytes(self) -> int | None:
        return weights_size(self._weights_path)

    # --- moves -----------------------------------------------------------------------------

    @property
    def _is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def _moves(self) -> bool:
        return self._is_cuda or self._flat_moves_on_cpu

    def _entries(self) -> list[_Entry]:
        return module_entries(self._module_of(self.model))

    def _copy(self, dst: Any, src: Any) -> None:
        """dst.copy_(src) without blocking other streams: on CUDA, on the adapter's stream."""
        if not self._is_cuda:
            dst.copy_(src)
            return
        import torch

        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        # Kernels already queued on the caller's stream may still write the weights (or, for a
        # block just reused by the allocator, still read its old contents): order after them.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            dst.copy_(src, non_blocking=True)

    def _wait_copies(self) -> None:
        if self._is_cuda and self._stream is not None:
            self._stream.synchronize()  # this stream only, not every stream in the process

    def _offload(self) -> tuple[int, int]:
        """Copy to the host buffer and rebind; return (device bytes dropped, allocated before)."""
        import torch

        entries = self._entries()
        allocated = torch.cuda.memory_allocated(self.device) if self._is_cuda else 0
        host = self._host
        if (
            host is not None
            and self._device_flat is not None
            and bound_difference(entries, host.layout, self._device_flat) is None
        ):
            expected = int(self._device_flat.numel())
            self._copy(host.flat, self._device_flat)  # one copy: the module views one block
        else:
            layout, sources = plan_layout(entries)
            if host is None or (why := host.layout.difference(layout)) is not None:
                if host is not None:
                    logger.info("layout changed since the last offload (%s): new host buffer", why)
                    host.close()
                    self._host = host = None
                host = self._host = HostBuffer(layout, pin=self._is_cuda)
            expected = host.layout.payload_bytes
            self._copy_regions(host, sources)
        self._wait_copies()
        bind_views(entries, build_views(host.layout, host.flat))
        self._device_flat = None
        return expected, allocated

    def _copy_regions(self, host: HostBuffer, sources: list[tuple[Any, int]]) -> None:
        """One copy per storage region; the device tensors named here die with this frame."""
        import torch

        for region, (tensor, start) in zip(host.layout.regions, sources, strict=True):
            src = torch.empty(0, dtype=torch.uint8, device=tensor.device)
            src.set_(tensor.untyped_storage(), start, (region.nbytes,), (1,))
            self._copy(host.flat[region.offset : region.offset + region.nbytes], src)

    def _check_freed(self, expected: int, allocated_before: int) -> None:
        """Return the freed blocks to the driver; collect garbage only if the allocator says so."""
        import torch

        freed = allocated_before - torch.cuda.memory_allocated(self.device)
        if freed < expected:
            gc.collect()
            freed = allocated_before - torch.cuda.memory_allocated(self.device)
            if freed < expected:
                logger.warning(
                    "offload freed %.1f MiB of %.1f MiB of weights: something outside the module's parameters "
                    "and buffers still references them, and they stay on %s",
                    freed / MiB, expected / MiB, self.device,
                )
        _clear_cuda_caches(self.device, host=False)

    def _restore(self) -> None:
        import torch

        host = self._host
        if host is None:
            raise LayoutChanged("restore without an offload: no host copy of the weights")
        entries = self._entries()
        why = bound_difference(entries, host.layout, host.flat)
        if why is not None:
            raise LayoutChanged(f"the module changed while offloaded ({why}); release and load it again")
        try:
            device_flat = torch.empty(host.layout.nbytes, dtype=torch.uint8, device=self.device)
            self._copy(device_flat, host.flat)
            self._wait_copies()
            bind_views(entries, build_views(host.layout, device_flat))
        except BaseException as exc:
            # Roll back: every tensor views the host buffer again, and the device block goes.
            # The traceback's frames (build_views, bind_views) still name the block and its
            # views, and the lifecycle keeps the error as last_error: clear them, or the block
            # stays allocated for as long as the error is kept.
            bind_views(entries, build_views(host.layout, host.flat))
            device_flat = None
            traceback.clear_frames(exc.__traceback__)
            if self._is_cuda:
                _clear_cuda_caches(self.device, host=False)
            raise
        self._device_flat = device_flat


def check_movable(obj: Any, module: Any, device: str) -> None:
    """Raise `UnsupportedLayout` listing what in `module` the flat move would get wrong."""
    import torch

    problems: list[str] = []
    for holder in (obj, module):
        if getattr(holder, "hf_device_map", None):
            problems.append(f"it was loaded with a device_map ({holder.hf_device_map}); load it whole on one device")
            break
    for holder in (obj, module):
        if getattr(holder, "hf_quantizer", None) is not None or getattr(holder, "is_quantized", False) is True:
            problems.append("it carries quantization state (a quantizer from its loader)")
            break
    if hasattr(module, "_orig_mod") or getattr(module, "_compiled_call_impl", None) is not None:
        problems.append("it is compiled (torch.compile may capture CUDA graphs that replay old addresses)")
    target = torch.device(device)
    for name, mod in module.named_modules():
        where = name or "the root module"
        if hasattr(mod, "_hf_hook"):
            problems.append(f"{where} has an accelerate hook ({type(mod._hf_hook).__name__})")
        for attr, value in vars(mod).items():
            if type(value).__name__ == "CUDAGraph":
                problems.append(f"{where}.{attr} is a captured CUDA graph")
    for entry in module_entries(module):
        name, t = entry.names[0], entry.tensor
        if entry.kind == "param" and type(t) is not torch.nn.Parameter:
            problems.append(f"{name} is a {type(t).__name__}, not a plain Parameter")
            continue
        data = t.data if entry.kind == "param" else t
        if type(data) is not torch.Tensor:
            problems.append(f"{name} is a tensor subclass ({type(data).__name__})")
        elif t.is_meta:
            problems.append(f"{name} is a meta tensor (never materialized, or offloaded by its loader)")
        elif t.is_quantized or hasattr(t, "quant_state"):
            problems.append(f"{name} holds quantization state")
        elif t.layout != torch.strided:
            problems.append(f"{name} has layout {t.layout}")
        elif t.device.type != target.type or (target.index is not None and t.device.index != target.index):
            problems.append(f"{name} is on {t.device}, not {device}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UnsupportedLayout(f"cannot move this model between GPU and host memory: {shown}")


def iter_tensors(module: Any) -> Iterator[tuple[str, Any]]:
    """(first qualified name, tensor) of every distinct parameter and buffer."""
    for e in module_entries(module):
        yield e.names[0], e.tensor


def weights_size(path: str | None) -> int | None:
    """Bytes of weight files under `path` (a file or a directory), or None when unknown."""
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        return None
    files = [f for f in p.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES]
    # A checkpoint often ships the same weights twice (safetensors and .bin): count one format.
    for suffix in WEIGHT_SUFFIXES:
        chosen = [f for f in files if f.suffix == suffix]
        if chosen:
            return sum(f.stat().st_size for f in chosen)
    return None


def quiet_progress_bars() -> None:
    """Model libraries draw progress bars on load; in a server they are log noise."""
    try:
        import transformers

        transformers.logging.disable_progress_bar()
    except ImportError:
        pass
