"""The GPU tier on a real GPU: restore and offload rates against a pinned copy, in one run.

For causal LMs of 1, 4 and 16 GiB (float16, random weights from a Llama config, saved as
safetensors), through `TorchModuleAdapter`:

* a pinned host-to-device (and device-to-host) copy of the same number of bytes, the limit a
  restore (offload) can reach on this machine, measured in the same run;
* the cold load (`from_pretrained` from disk, page cache evicted with posix_fadvise, then
  `.to(cuda)`), the first offload (which allocates and page-locks the host buffer), and steady
  restore and offload rates over 3 cycles;
* NVML's used memory of cuda:0 (by UUID) after release against before the load (the CUDA
  context already exists in both readings);
* the switch time between two 1 GiB models: offload one, restore the other, as the router does
  when a request needs the room.

Targets, printed with a verdict: restore >= 80% of the pinned copy rate; <= 64 MiB left beyond
the CUDA context after release; restore >= 20x faster than a cold load; switch <= 35 ms.

    .venv/bin/python bench/gpu_tier.py [--sizes 1,4,16] [--json out.json]

Exit status: 0 when every target is met, 1 when one is missed, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GiB = 1024**3
MiB = 1024**2
DEVICE = "cuda:0"

RESTORE_SHARE_OF_PINNED = 0.80
RELEASE_SLACK_BYTES = 64 * MiB
RESTORE_VS_COLD = 20.0
SWITCH_MS = 35.0


def needs_cuda() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch has no CUDA device (CPU build, or no GPU): install a CUDA build of torch==2.13.0 on a GPU machine"
    return None


def sync() -> None:
    import torch

    torch.cuda.synchronize(DEVICE)


def nvml_used(uuid: str) -> int:
    import pynvml

    pynvml.nvmlInit()
    return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByUUID(uuid)).used)


def settle() -> None:
    import torch

    gc.collect()
    sync()
    torch.cuda.empty_cache()


def llama_config(target_bytes: int, *, layers: int = 16, vocab: int = 32000) -> Any:
    """A Llama config whose float16 parameters take about `target_bytes` (MLP width 4x hidden)."""
    from transformers import LlamaConfig

    params = target_bytes / 2
    # params ~= layers * (4 h^2 + 3 * h * 4h) + 2 * vocab * h = 16 L h^2 + 2 V h
    a, b = 16 * layers, 2 * vocab
    hidden = int((-b + math.sqrt(b * b + 4 * a * params)) / (2 * a)) // 128 * 128
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, tie_word_embeddings=False,
    )


def build_model(path: Path, target_bytes: int) -> int:
    """Save a random-weight float16 model of about `target_bytes`; return its parameter bytes.

    The weights are drawn on the GPU (seconds for 16 GiB, where a CPU fill takes minutes).
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = llama_config(target_bytes)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model = model.to_empty(device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        for b in model.buffers():
            if b.is_floating_point():
                b.copy_(b.new_tensor(1.0))  # inv_freq is recomputed from the config at load anyway
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path)
    del model
    settle()
    return nbytes


def evict_page_cache(path: Path) -> None:
    """Drop the saved files from the page cache, so the cold load reads the disk."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def pinned_copy_rates(nbytes: int, repeats: int = 3) -> tuple[float, float]:
    """GB/s of one pinned host-to-device and one device-to-host copy of `nbytes` (best of `repeats`)."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8)
    host.fill_(1)  # touch the pages before locking them, as the adapter's first offload writes them
    cudart = torch.cuda.cudart()
    assert int(cudart.cudaHostRegister(host.data_ptr(), nbytes, 0)) == 0, "cudaHostRegister failed"
    dev = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    stream = torch.cuda.Stream(DEVICE)
    h2d, d2h = [], []
    try:
        for _ in range(repeats):
            for dst, src, times in ((dev, host, h2d), (host, dev, d2h)):
                sync()
                start = time.perf_counter()
                with torch.cuda.stream(stream):
                    dst.copy_(src, non_blocking=True)
                stream.synchronize()
                times.append(time.perf_counter() - start)
    finally:
        cudart.cudaHostUnregister(host.data_ptr())
    del dev
    settle()
    return nbytes / min(h2d) / 1e9, nbytes / min(d2h) / 1e9


def loader(path: Path) -> Any:
    def load(device: str) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, local_files_only=True)
        return model.to(device).eval()

    return load


def bench_size(size_gib: float, workdir: Path, uuid: str, cycles: int = 3) -> dict[str, Any]:
    from serve_app.adapters.torch_module import TorchModuleAdapter

    path = workdir / f"llama-{size_gib:g}g"
    param_bytes = build_model(path, int(size_gib * GiB))
    h2d, d2h = pinned_copy_rates(param_bytes)
    settle()
    before = nvml_used(uuid)

    evict_page_cache(path)
    adapter = TorchModuleAdapter(loader(path))
    start = time.perf_counter()
    adapter.load(DEVICE)
    sync()
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    adapter.to_cpu()
    first_offload_s = time.perf_counter() - start
    payload = adapter._host.layout.payload_bytes  # type: ignore[union-attr]
    restores, offloads = [], []
    for _ in range(cycles):
        start = time.perf_counter()
        adapter.to_gpu()
        restores.append(time.perf_counter() - start)
        start = time.perf_counter()
        adapter.to_cpu()
        offloads.append(time.perf_counter() - start)
    adapter.release()
    del adapter
    settle()
    after = nvml_used(uuid)
    restore_s, offload_s = statistics.median(restores), statistics.median(offloads)
    return {
        "size_gib": size_gib,
        "bytes": payload,
        "pinned_h2d_gbps": h2d,
        "pinned_d2h_gbps": d2h,
        "restore_gbps": payload / restore_s / 1e9,
        "offload_gbps": payload / offload_s / 1e9,
        "restore_s": restore_s,
        "offload_s": offload_s,
        "first_offload_s": first_offload_s,
        "cold_load_s": cold_s,
        "cold_over_restore": cold_s / restore_s,
        "left_after_release_bytes": after - before,
    }


def bench_switch(workdir: Path, size_gib: float = 1.0, repeats: int = 5) -> dict[str, Any]:
    """Offload model A and restore model B (both `size_gib`), as when B's request needs A's room."""
    from serve_app.adapters.torch_module import TorchModuleAdapter

    paths = []
    for name in ("a", "b"):
        path = workdir / f"switch-{name}"
        if not path.exists():
            build_model(path, int(size_gib * GiB))
        paths.append(path)
    a, b = (TorchModuleAdapter(loader(p)) for p in paths)
    for adapter in (a, b):
        adapter.load(DEVICE)
        adapter.to_cpu()
        adapter.to_gpu()
    b.to_cpu()  # A serves, B waits on the host
    times = []
    for i in range(repeats):
        on, off = (a, b) if i % 2 == 0 else (b, a)
        sync()
        start = time.perf_counter()
        on.to_cpu()
        off.to_gpu()
        times.append(time.perf_counter() - start)
    for adapter in (a, b):
        adapter.release()
    settle()
    return {"size_gib": size_gib, "switch_ms": statistics.median(times) * 1000, "runs_ms": [t * 1000 for t in times]}


def verdicts(rows: list[dict[str, Any]], switch: dict[str, Any] | None) -> list[tuple[str, str, bool]]:
    out = []
    for r in rows:
        name = f"{r['size_gib']:g} GiB"
        share = r["restore_gbps"] / r["pinned_h2d_gbps"]
        out.append((f"{name}: restore >= {RESTORE_SHARE_OF_PINNED:.0%} of pinned H2D", f"{share:.0%}",
                    share >= RESTORE_SHARE_OF_PINNED))
        left = r["left_after_release_bytes"]
        out.append((f"{name}: <= {RELEASE_SLACK_BYTES // MiB} MiB left after release", f"{left / MiB:.0f} MiB",
                    left <= RELEASE_SLACK_BYTES))
        out.append((f"{name}: restore >= {RESTORE_VS_COLD:g}x faster than cold load", f"{r['cold_over_restore']:.1f}x",
                    r["cold_over_restore"] >= RESTORE_VS_COLD))
    if switch is not None:
        out.append((f"switch ({switch['size_gib']:g} GiB) <= {SWITCH_MS:g} ms", f"{switch['switch_ms']:.1f} ms",
                    switch["switch_ms"] <= SWITCH_MS))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,4,16", help="model sizes in GiB, comma-separated")
    parser.add_argument("--switch-gib", type=float, default=1.0, help="model size for the switch time (<= 1)")
    parser.add_argument("--no-switch", action="store_true", help="skip the switch measurement")
    parser.add_argument("--workdir", default=None, help="where models are saved (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    why = needs_cuda()
    if why is not None:
        print(f"bench/gpu_tier.py needs CUDA: {why}", file=sys.stderr)
        return 2

    import torch

    from serve_app.cluster.gpu import visible_gpu_uuids

    sizes = [float(s) for s in args.sizes.split(",") if s]
    uuid = visible_gpu_uuids()[0]
    torch.ones(1, device=DEVICE).sum().item()  # the CUDA context exists before any baseline
    print(f"GPU: {torch.cuda.get_device_name(0)} ({uuid}), torch {torch.__version__}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        rows = []
        for size in sizes:
            row = bench_size(size, workdir, uuid)
            rows.append(row)
            print(
                f"{size:>5g} GiB  pinned H2D {row['pinned_h2d_gbps']:6.1f} GB/s"
                f"  restore {row['restore_gbps']:6.1f} GB/s ({row['restore_s'] * 1000:7.1f} ms)"
                f"  |  pinned D2H {row['pinned_d2h_gbps']:6.1f} GB/s"
                f"  offload {row['offload_gbps']:6.1f} GB/s ({row['offload_s'] * 1000:7.1f} ms)"
                f"  |  cold load {row['cold_load_s']:6.2f} s ({row['cold_over_restore']:5.1f}x restore)"
                f"  first offload {row['first_offload_s']:5.2f} s"
                f"  |  left after release {row['left_after_release_bytes'] / MiB:6.1f} MiB",
                flush=True,
            )
            for p in workdir.glob(f"llama-{size:g}g/*"):
                p.unlink()  # keep the disk for the next size
        switch = None if args.no_switch else bench_switch(workdir, args.switch_gib)
        if switch is not None:
            print(f"switch {switch['size_gib']:g} GiB: {switch['switch_ms']:.1f} ms (runs {switch['runs_ms']})")
    results = verdicts(rows, switch)
    print("\nTargets:")
    for name, value, ok in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps({"sizes": rows, "switch": switch,
                                               "verdicts": [list(v) for v in results]}, indent=2))
    return 0 if all(ok for _, _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
