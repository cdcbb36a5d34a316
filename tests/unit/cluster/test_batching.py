"""Continuous batching (`serve_app/cluster/batching.py`) with a gated batch function."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.cluster.batching import ContinuousBatcher


class Model:
    """Records each batch; while `gate` is closed, a batch waits inside the call."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.inside = asyncio.Event()
        self.fail: str | None = None

    async def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        self.inside.set()
        await self.gate.wait()
        if self.fail is not None:
            raise RuntimeError(self.fail)
        return [x.upper() for x in items]


async def test_a_lone_request_runs_at_once_and_arrivals_during_a_batch_share_the_next() -> None:
    model = Model()
    batcher = ContinuousBatcher(model, max_size=32)
    assert await asyncio.wait_for(batcher.submit("a"), 1.0) == "A"  # no wait for company
    model.gate.clear()
    model.inside.clear()
    first = asyncio.ensure_future(batcher.submit("b"))
    await model.inside.wait()
    rest = [asyncio.ensure_future(batcher.submit(x)) for x in "cdef"]
    await asyncio.sleep(0.01)
    assert model.batches[-1] == ["b"] and batcher.queued() == 4
    model.gate.set()
    assert await asyncio.gather(first, *rest) == ["B", "C", "D", "E", "F"]
    assert model.batches[-1] == ["c", "d", "e", "f"]


async def test_batches_respect_the_size_budget_but_take_an_oversize_item_alone() -> None:
    model = Model()
    batcher: ContinuousBatcher[str, str] = ContinuousBatcher(model, max_size=4, size=len)
    model.gate.clear()
    model.inside.clear()
    first = asyncio.ensure_future(batcher.submit("x"))
    await model.inside.wait()
    queued = [asyncio.ensure_future(batcher.submit(x)) for x in ("aa", "bb", "c", "toolong")]
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(first, *queued)
    assert model.batches[1:] == [["aa", "bb"], ["c"], ["toolong"]]


async def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_runs() -> None:
    model = Model()
    batcher = ContinuousBatcher(model, max_size=8)
    model.gate.clear()
    model.inside.clear()
    blocker = asyncio.ensure_future(batcher.submit("x"))
    await model.inside.wait()
    doomed = [asyncio.ensure_future(batcher.submit(x)) for x in "ab"]
    await asyncio.sleep(0)
    model.fail = "load failed"
    model.gate.set()
    for task in (blocker, *doomed):
        with pytest.raises(RuntimeError, match="load failed"):
            await task
    model.fail = None
    assert await asyncio.wait_for(batcher.submit("z"), 1.0) == "Z"


async def test_a_caller_cancelled_while_queued_is_dropped_from_the_batch() -> None:
    model = Model()
    batcher = ContinuousBatcher(model, max_size=8)
    model.gate.clear()
    model.inside.clear()
    blocker = asyncio.ensure_future(batcher.submit("x"))
    await model.inside.wait()
    gone = asyncio.ensure_future(batcher.submit("gone"))
    kept = asyncio.ensure_future(batcher.submit("kept"))
    await asyncio.sleep(0)
    gone.cancel()
    model.gate.set()
    assert await kept == "KEPT" and await blocker == "X"
    assert ["gone"] not in model.batches and all("gone" not in b for b in model.batches)


async def test_a_wait_gathers_company_unless_the_batch_is_already_full() -> None:
    model = Model()
    batcher = ContinuousBatcher(model, max_size=3, wait_s=0.05)
    tasks = [asyncio.ensure_future(batcher.submit("a"))]
    await asyncio.sleep(0.01)
    tasks.append(asyncio.ensure_future(batcher.submit("b")))
    await asyncio.gather(*tasks)
    assert model.batches == [["a", "b"]]


async def test_regather_waits_for_the_callers_just_answered_and_never_for_a_lone_one() -> None:
    class Slow(Model):
        async def __call__(self, items: list[str]) -> list[str]:
            out = await super().__call__(items)
            await asyncio.sleep(0.2)  # a forward pass: the regather is capped by its length
            return out

    async def client(batcher: ContinuousBatcher[str, str], name: str, rounds: int) -> None:
        for i in range(rounds):
            await batcher.submit(f"{name}{i}")
            await asyncio.sleep(0.005)  # the way back to the replica

    async def run(regather_s: float) -> list[list[str]]:
        model = Slow()
        batcher = ContinuousBatcher(model, max_size=8, regather_s=regather_s)
        first = asyncio.ensure_future(client(batcher, "a", 4))
        await asyncio.sleep(0.05)  # a second caller arrives during the first batch: two groups
        await asyncio.gather(first, client(batcher, "b", 4))
        return model.batches

    # Without: the two callers take turns, one item a batch.
    assert [len(b) for b in await run(0.0)] == [1] * 8
    # With: after the first batch (one came during it), each next batch waits for both to come back.
    sizes = [len(b) for b in await run(0.15)]
    assert sizes == [1, 2, 2, 2, 1], sizes

    model = Model()
    lone = ContinuousBatcher(model, max_size=8, regather_s=10.0)
    for x in "abc":
        assert await asyncio.wait_for(lone.submit(x), 1.0) == x.upper()  # one caller never waits
    assert model.batches == [["a"], ["b"], ["c"]]


def test_max_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ContinuousBatcher(Model(), max_size=0)
