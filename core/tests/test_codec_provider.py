"""Payloads encoded at rest: what the store holds, what runtimes and clients see, wrong codecs."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from perdure import (
    ActivityContext,
    Client,
    OrchestrationContext,
    Provider,
    ProviderError,
    Registry,
    Runtime,
    RuntimeOptions,
)
from perdure import history as h
from perdure.codec_provider import CodecProvider
from perdure.provider import OrchestrationAck
from perdure.serialization import CodecChain, ZlibCodec

SECRET = "card-4111-1111-1111-1111"
PAYLOAD_FIELDS = ("input", "output", "result", "data", "initial_custom_status")


class NoncedXor:
    """A stand-in for real encryption: a random nonce makes every encoding of one text differ."""

    def __init__(self, name: str = "nxor", key: int = 0x5A) -> None:
        self.name = name
        self.key = key

    def encode(self, data: bytes) -> bytes:
        nonce = os.urandom(4)
        return nonce + bytes(b ^ self.key ^ nonce[i % 4] for i, b in enumerate(data))

    def decode(self, data: bytes) -> bytes:
        nonce, body = data[:4], data[4:]
        return bytes(b ^ self.key ^ nonce[i % 4] for i, b in enumerate(body))


app = Registry()


@app.activity
def charge(ctx: ActivityContext, card: str) -> str:
    return f"charged {card}"


@app.orchestration
async def child(ctx: OrchestrationContext, card: str) -> str:
    return f"child saw {card}"


@app.orchestration
async def checkout(ctx: OrchestrationContext, card: str) -> dict[str, Any]:
    approve = ctx.wait_for_event("approve")  # open in the first turn: an event raised after the
    ctx.set_custom_status({"card": card})  # start is delivered, however slow the machine
    receipt = await ctx.call_activity(charge, card)
    approval = await approve
    nested = await ctx.call_sub_orchestration(child, card)
    return {"receipt": receipt, "approval": approval, "nested": nested}


@app.orchestration
async def rounds(ctx: OrchestrationContext, state: list[str]) -> list[str]:
    if len(state) < 3:
        ctx.continue_as_new([*state, await ctx.call_activity(charge, SECRET)])
    return state


@app.orchestration
async def refuse(ctx: OrchestrationContext, card: str) -> None:
    raise ValueError("card declined")


def wrapped(provider: Provider, **kw: Any) -> CodecProvider:
    return CodecProvider(provider, CodecChain(ZlibCodec(), NoncedXor()), **kw)


def assert_encoded(value: Any) -> None:
    """Every payload field of an event, message or work item is in the codec's stored form."""
    names = [*PAYLOAD_FIELDS, "status"] if isinstance(value, h.CustomStatusSet) else PAYLOAD_FIELDS
    for name in names:
        text = getattr(value, name, None)
        if text is not None:
            assert text.startswith("~zlib+nxor:"), (type(value).__name__, name, text)
            assert SECRET not in text


def options(**kw: Any) -> RuntimeOptions:
    return RuntimeOptions(**{"poll_interval": 0.2, **kw})


@pytest.mark.parametrize("cache_size", [10_000, 0], ids=["cache", "nocache"])
async def test_the_store_holds_only_encoded_payloads(provider: Provider, cache_size: int) -> None:
    store = wrapped(provider)
    async with Runtime(store, app, options(cache_size=cache_size)) as runtime:
        instance = await runtime.client.start_orchestration(checkout, SECRET)
        await runtime.client.raise_event(instance, "approve", {"by": SECRET})
        status = await runtime.client.wait_for_orchestration(instance, timeout=20)
        # Without the cache every turn replays from history: a codec whose output differs each
        # time must not look like nondeterminism.
        assert status.result() == {
            "receipt": f"charged {SECRET}",
            "approval": {"by": SECRET},
            "nested": f"child saw {SECRET}",
        }
        assert status.custom_status_value() == {"card": SECRET}
        history = await runtime.client.read_history(instance)
        child_id = next(e.instance_id for e in history if isinstance(e, h.SubOrchestrationScheduled))

    for instance_id in (instance, child_id):
        raw = await provider.read_history(instance_id)
        assert raw and all(SECRET not in repr(e) for e in raw)
        for event in raw:
            assert_encoded(event)
        info = await provider.get_instance(instance_id)
        assert info is not None and info.output is not None and info.output.startswith("~zlib+nxor:")
    info = await provider.get_instance(instance)
    assert info is not None and info.custom_status is not None
    assert info.custom_status.startswith("~zlib+nxor:")


async def test_continue_as_new_inputs_are_encoded(provider: Provider) -> None:
    store = wrapped(provider)
    async with Runtime(store, app, options()) as runtime:
        instance = await runtime.client.start_orchestration(rounds, [])
        status = await runtime.client.wait_for_orchestration(instance, timeout=20)
    assert status.result() == [f"charged {SECRET}"] * 3
    for execution in (1, 2, 3, 4):
        raw = await provider.read_history(instance, execution)
        assert raw and all(SECRET not in repr(e) for e in raw)


async def test_queued_work_is_encoded(provider: Provider) -> None:
    store = wrapped(provider)
    await Client(store).start_orchestration(checkout, SECRET, instance_id="q")
    [item] = await provider.fetch_orchestration_items(1, 30)
    [start] = item.messages
    assert_encoded(start)
    await provider.abandon_orchestration_item(item.lock_token, ignore_attempt=True)

    # Through the wrapper the same message reads back plain, and a turn's activity is encoded.
    [item] = await store.fetch_orchestration_items(1, 30)
    assert isinstance(item.messages[0], h.StartOrchestration) and item.messages[0].input == f'"{SECRET}"'
    work = h.ActivityExecute(
        instance_id="q", execution_id=1, activity_id=2, name="charge", input=f'"{SECRET}"'
    )
    ack = OrchestrationAck(
        lock_token=item.lock_token,
        instance_id="q",
        execution_id=1,
        name="checkout",
        history=[
            h.OrchestrationStarted(event_id=1, timestamp_ms=0, name="checkout", version=None, input='"x"'),
            h.ActivityScheduled(event_id=2, timestamp_ms=0, name="charge", input=f'"{SECRET}"'),
        ],
        worker_items=[work],
        status="running",
    )
    assert await store.ack_orchestration_items([ack]) == [None]
    [raw] = await provider.fetch_work_items(1, 30)
    assert raw.item is not None
    assert_encoded(raw.item)
    await provider.abandon_work_item(raw.lock_token, ignore_attempt=True)
    [lease] = await store.fetch_work_items(1, 30)
    assert lease.item is not None and lease.item.input == f'"{SECRET}"'


async def test_payloads_stored_before_the_codec_still_read(provider: Provider) -> None:
    plain = Client(provider)
    instance = await plain.start_orchestration(checkout, "old-card")
    store = wrapped(provider)
    await plain.raise_event(instance, "approve", "yes")
    async with Runtime(store, app, options()) as runtime:
        status = await runtime.client.wait_for_orchestration(instance, timeout=20)
    assert status.result()["nested"] == "child saw old-card"


async def test_error_details_stay_readable(provider: Provider) -> None:
    store = wrapped(provider)
    async with Runtime(store, app, options()) as runtime:
        instance = await runtime.client.start_orchestration(refuse, SECRET)
        status = await runtime.client.wait_for_orchestration(instance, timeout=20)
    assert status.status == "failed"
    info = await provider.get_instance(instance)
    assert info is not None and info.output is not None and "card declined" in info.output
    started = (await provider.read_history(instance))[0]
    assert isinstance(started, h.OrchestrationStarted) and started.input.startswith("~zlib+nxor:")


async def test_work_written_with_another_codec_waits_unharmed(provider: Provider) -> None:
    right = CodecProvider(provider, NoncedXor("right"), retry_unreadable=0.3)
    wrong = CodecProvider(provider, NoncedXor("wrong"), retry_unreadable=0.3)
    instance = await Client(right).start_orchestration(checkout, SECRET)
    async with Runtime(wrong, app, options(poll_interval=0.1, orchestration_lock_timeout=1.0)):
        await asyncio.sleep(1.0)  # fetched and put back a few times
    assert await provider.get_instance(instance) is None, "the wrong codec must not run anything"
    for _ in range(100):  # until the last put-back delay (or a lock cut short by shutdown) ends
        items = await provider.fetch_orchestration_items(1, 30)
        if items:
            break
        await asyncio.sleep(0.05)
    [item] = items
    assert item.attempt_count <= 1, "put back without counting: never poisoned"
    await provider.abandon_orchestration_item(item.lock_token, ignore_attempt=True)

    async with Runtime(right, app, options(poll_interval=0.1)) as runtime:
        await runtime.client.raise_event(instance, "approve", True)
        status = await runtime.client.wait_for_orchestration(instance, timeout=20)
    assert status.result()["receipt"] == f"charged {SECRET}"

    with pytest.raises(ProviderError, match=r"codec 'right'.*codec 'wrong'") as raised:
        await Client(wrong).get_status(instance)
    assert not raised.value.retryable
    with pytest.raises(ProviderError, match="codec 'right'"):
        await wrong.read_history(instance)


def test_codec_names_that_cannot_be_stored_are_refused() -> None:
    class Bad(NoncedXor):
        pass

    with pytest.raises(ValueError, match="must not contain ':'"):
        CodecProvider(Any, Bad("a:b"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="codec must have a name"):
        CodecProvider(Any, object())  # type: ignore[arg-type]


def test_payload_limit_leaves_room_for_the_encoding(provider: Provider) -> None:
    store = wrapped(provider)
    inner = provider.capabilities.max_payload_bytes
    assert store.capabilities.max_payload_bytes * 4 // 3 < inner
    assert store.capabilities.direct_dispatch == provider.capabilities.direct_dispatch


async def test_an_activity_written_with_another_codec_is_put_back_uncounted(provider: Provider) -> None:
    right = CodecProvider(provider, NoncedXor("right"))
    wrong = CodecProvider(provider, NoncedXor("wrong"), retry_unreadable=0.2)
    await provider.enqueue_orchestrator_messages([h.StartOrchestration(instance_id="w", name="n", input="1")])
    [item] = await right.fetch_orchestration_items(1, 30)
    work = h.ActivityExecute(instance_id="w", execution_id=1, activity_id=2, name="charge", input='"x"')
    started = h.OrchestrationStarted(event_id=1, timestamp_ms=0, name="n", version=None, input="1")
    ack = OrchestrationAck(
        lock_token=item.lock_token,
        instance_id="w",
        execution_id=1,
        name="n",
        history=[started],
        worker_items=[work],
        status="running",
    )
    assert await right.ack_orchestration_items([ack]) == [None]
    assert await wrong.fetch_work_items(1, 30) == []
    await asyncio.sleep(0.3)
    [lease] = await right.fetch_work_items(1, 30)
    assert lease.attempt_count == 1 and lease.item is not None and lease.item.input == '"x"'
