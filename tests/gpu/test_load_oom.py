"""A real CUDA out-of-memory during a load is caught like the simulated one (`fault_oom_at_bytes`,
tests/unit/adapters/test_faults.py): `ModelLoadError` (503) naming `OutOfMemoryError`, the model
`unloaded` with `last_error`, and every byte the load allocated on the device given back.

The GPU is filled first with one tensor, so that less than the model's weights is left; the model
is the 640 MiB random-weight GPT-2 of the tier tests, loaded by the service's own loader through
`TorchModuleAdapter` and the real `Lifecycle`, in `asyncio.to_thread` as a replica runs it.
"""

from __future__ import annotations

import asyncio

import pytest

from serve_app.cluster.probes import NvmlProbe
from tests.gpu.tier import RELEASE_SLACK_BYTES, MiB, build_gpt2, cuda0_uuid, nvml_used

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not NvmlProbe.available(), reason="NVML unavailable (no NVIDIA driver or GPU)"),
]

DEVICE = "cuda:0"
#: Left free after the filler: well under the model's 640 MiB, so its load runs out part way.
LEFT_FREE = 256 * MiB


def test_a_real_cuda_oom_mid_load_is_503_unloaded_and_frees_what_it_allocated(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA (the CPU build is installed)")
    from deployments.text_generation import load_causal_lm
    from serve_app.adapters.torch_module import TorchModuleAdapter
    from serve_app.core.lifecycle import Lifecycle, LifecyclePolicy
    from serve_app.core.states import ModelState
    from serve_app.errors import ModelLoadError

    path = str(build_gpt2(tmp_path_factory.mktemp("gpt2-oom"), 640 * MiB))
    adapter = TorchModuleAdapter(lambda d: load_causal_lm(path, d, "float32"), module_of=lambda lm: lm.model)
    lc = Lifecycle(model="gpt2-oom", adapter=adapter, device=DEVICE, policy=LifecyclePolicy())
    uuid = cuda0_uuid()

    async def request() -> None:
        async with lc.use():
            pass

    free, _total = torch.cuda.mem_get_info(DEVICE)
    filler = torch.empty(free - LEFT_FREE, dtype=torch.uint8, device=DEVICE)
    torch.cuda.synchronize(DEVICE)
    allocated_before = torch.cuda.memory_allocated(DEVICE)
    used_before = nvml_used(uuid)
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ModelLoadError) as info:
            loop.run_until_complete(request())
        assert info.value.status_code == 503 and "OutOfMemoryError" in str(info.value), info.value
        assert lc.state is ModelState.UNLOADED
        assert lc.last_error is not None and lc.last_error.startswith("load failed: OutOfMemoryError"), lc.last_error
        torch.cuda.synchronize(DEVICE)
        allocated_after = torch.cuda.memory_allocated(DEVICE)
        used_after = nvml_used(uuid)
        print(f"\n[gpu] real CUDA OOM mid-load: allocated {allocated_before / MiB:.0f} -> "
              f"{allocated_after / MiB:.0f} MiB, NVML used {used_before / MiB:.0f} -> {used_after / MiB:.0f} MiB")
        # The allocator's own count (not NVML, which includes the context): back to the filler alone.
        assert allocated_after - allocated_before < 2 * MiB, (allocated_before, allocated_after)
        assert used_after - used_before < RELEASE_SLACK_BYTES, (used_before, used_after)
        # With room again, the next request loads the same model: nothing of the failure stays behind.
        del filler
        torch.cuda.empty_cache()
        loop.run_until_complete(request())
        assert lc.state is ModelState.GPU and lc.last_error is None
        assert adapter.footprint().bytes_gpu >= 600 * MiB
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
        adapter.release()
