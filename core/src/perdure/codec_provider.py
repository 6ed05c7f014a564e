"""Payloads encoded at rest: a provider wrapper that runs every stored payload through a codec.

Runtimes and clients see plain JSON; the store sees only what the codec wrote. Compression and
encryption are codecs (:class:`~perdure.serialization.Codec`). Wrap the provider once and give the
wrapped one to every runtime and client that shares the store::

    provider = CodecProvider(SqliteProvider("app.db"), CodecChain(ZlibCodec(), MyCipher(key)))

Encoded: orchestration inputs and results, activity inputs and results, event data and custom
status, wherever they are stored (history, both queues, instance rows). Not encoded: names, ids,
versions, times and error details (type, message, traceback), which operators need to read; keep
secrets out of exception messages.

An encoded payload is stored as ``~<codec name>:<base64>``. JSON text never starts with ``~``, so
payloads written before the codec was configured still read back: a store can switch encryption
on without a migration. A payload written with another codec is never guessed at: reading it
fails with a permanent :class:`~perdure.provider.ProviderError` naming both codecs (queue work of
that kind is put back untouched and retried, so nothing is lost once the right codec is
configured).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from perdure.history import ActivityExecute, CustomStatusSet, Event, Message
from perdure.provider import (
    Capabilities,
    InstanceInfo,
    OrchestrationAck,
    OrchestrationAckResult,
    OrchestrationItem,
    Provider,
    ProviderError,
    Queue,
    WorkItemAck,
    WorkItemAckResult,
    WorkItemLease,
)
from perdure.serialization import Codec

_log = logging.getLogger("perdure.codec_provider")

#: The fields of events, messages and work items that hold payload JSON.
_PAYLOAD_FIELDS = frozenset({"input", "output", "result", "data", "initial_custom_status"})
#: Statuses whose output is error details, which stay plain (module docstring).
_ERROR_STATUSES = frozenset({"failed", "cancelled"})
T = TypeVar("T", Event, Message, ActivityExecute)


class PayloadCodecError(ValueError):
    """A stored payload was written with a codec this provider wrapper does not have."""


_fields_cache: dict[type, tuple[str, ...]] = {}


def _fields_of(cls: type) -> tuple[str, ...]:
    names = _fields_cache.get(cls)
    if names is None:
        found = [f.name for f in dataclasses.fields(cls) if f.name in _PAYLOAD_FIELDS]
        if issubclass(cls, CustomStatusSet):
            found.append("status")
        names = _fields_cache[cls] = tuple(found)
    return names


def _map_payloads(value: T, fn: Callable[[str], str]) -> T:
    """``value`` with ``fn`` applied to each of its payload fields that is set."""
    changes: dict[str, Any] = {}
    for name in _fields_of(type(value)):
        text = getattr(value, name)
        if text is not None:
            changes[name] = fn(text)
    return dataclasses.replace(value, **changes) if changes else value


class CodecProvider(Provider):
    """Wraps ``inner`` so that every payload is stored encoded with ``codec`` (module docstring).

    ``retry_unreadable`` is how many seconds queue work whose payload this codec cannot read
    waits before it is offered again. Methods outside the Provider contract (a provider's own
    ``migrate``, say) pass through.
    """

    def __init__(self, inner: Provider, codec: Codec, *, retry_unreadable: float = 5.0) -> None:
        if not isinstance(codec, Codec):
            raise TypeError(
                f"codec must have a name and encode(bytes) and decode(bytes) methods, got {codec!r}"
            )
        if not codec.name or ":" in codec.name:
            raise ValueError(f"codec name {codec.name!r} must be non-empty and must not contain ':'")
        self.inner = inner
        self.codec = codec
        self.retry_unreadable = retry_unreadable
        self.name = inner.name
        self._prefix = f"~{codec.name}:"

    # -- encoding ------------------------------------------------------------------------------

    def encode_text(self, text: str) -> str:
        """The stored form of one payload's JSON text."""
        return self._prefix + base64.b64encode(self.codec.encode(text.encode())).decode("ascii")

    def decode_text(self, text: str) -> str:
        """The JSON text of a stored payload (plain JSON, stored before the codec, passes through)."""
        if not text.startswith("~"):
            return text
        if not text.startswith(self._prefix):
            name = text[1:].partition(":")[0]
            raise PayloadCodecError(
                f"a payload was stored with codec {name!r}, but this provider has codec "
                f"{self.codec.name!r}; wrap the provider with the codec that wrote it"
            )
        try:
            return self.codec.decode(base64.b64decode(text[len(self._prefix) :], validate=True)).decode()
        except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
            raise PayloadCodecError(
                f"codec {self.codec.name!r} could not decode a stored payload: {exc}"
            ) from None

    def _encode(self, value: T) -> T:
        return _map_payloads(value, self.encode_text)

    def _decode(self, value: T) -> T:
        return _map_payloads(value, self.decode_text)

    def _decode_instance(self, info: InstanceInfo | None) -> InstanceInfo | None:
        if info is None:
            return None
        output = info.output
        if output is not None and info.status not in _ERROR_STATUSES:
            output = self.decode_text(output)
        custom = None if info.custom_status is None else self.decode_text(info.custom_status)
        return dataclasses.replace(info, output=output, custom_status=custom)

    def _decode_item(self, item: OrchestrationItem) -> OrchestrationItem:
        item.messages = [self._decode(m) for m in item.messages]
        item.instance = self._decode_instance(item.instance)
        return item

    async def _readable_item(self, item: OrchestrationItem) -> OrchestrationItem | None:
        """``item`` decoded, or ``None`` after putting back an instance this codec cannot read."""
        try:
            return self._decode_item(item)
        except PayloadCodecError as exc:
            await self._put_back(item.lock_token, f"instance {item.instance_id!r}", exc, orchestration=True)
            return None

    def _encode_ack(self, ack: OrchestrationAck) -> OrchestrationAck:
        output = ack.output
        if output is not None and ack.status not in _ERROR_STATUSES:
            output = self.encode_text(output)
        custom = ack.custom_status
        if ack.custom_status_changed and custom is not None:
            custom = self.encode_text(custom)
        return dataclasses.replace(
            ack,
            history=[self._encode(e) for e in ack.history],
            worker_items=[self._encode(w) for w in ack.worker_items],
            orchestrator_items=[self._encode(m) for m in ack.orchestrator_items],
            output=output,
            custom_status=custom,
        )

    # -- the contract --------------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        """The inner provider's, with room left for base64 and the codec's own overhead."""
        inner = self.inner.capabilities
        return dataclasses.replace(inner, max_payload_bytes=inner.max_payload_bytes * 3 // 4 - 1024)

    async def open(self) -> None:
        """Open the inner provider."""
        await self.inner.open()

    async def close(self) -> None:
        """Close the inner provider."""
        await self.inner.close()

    async def fetch_orchestration_items(self, limit: int, lock_timeout: float) -> list[OrchestrationItem]:
        """Fetch and decode; an instance with a payload this codec cannot read is put back."""
        items = [
            await self._readable_item(i)
            for i in await self.inner.fetch_orchestration_items(limit, lock_timeout)
        ]
        return [item for item in items if item is not None]

    async def ack_orchestration_items(self, acks: Sequence[OrchestrationAck]) -> list[OrchestrationAckResult]:
        """Encode every payload of each ack.

        The leases a direct-dispatch ack returns are of its first worker items, in order, so they
        get back the plain items the caller gave rather than decoding what was just encoded.
        """
        results = await self.inner.ack_orchestration_items([self._encode_ack(a) for a in acks])
        for ack, result in zip(acks, results, strict=True):
            if isinstance(result, list):
                for lease, item in zip(result, ack.worker_items, strict=False):
                    lease.item = item
        return results

    async def abandon_orchestration_item(
        self, lock_token: str, *, delay: float = 0.0, ignore_attempt: bool = False
    ) -> None:
        """Delegated."""
        await self.inner.abandon_orchestration_item(lock_token, delay=delay, ignore_attempt=ignore_attempt)

    async def renew_orchestration_lock(self, lock_token: str, lock_timeout: float) -> None:
        """Delegated."""
        await self.inner.renew_orchestration_lock(lock_token, lock_timeout)

    async def fetch_work_items(self, limit: int, lock_timeout: float) -> list[WorkItemLease]:
        """Fetch and decode; an activity whose input this codec cannot read is put back."""
        return await self._decode_leases(await self.inner.fetch_work_items(limit, lock_timeout))

    async def ack_work_items(self, acks: Sequence[WorkItemAck]) -> list[WorkItemAckResult]:
        """Encode each completion; decode an instance a direct-dispatch ack locked."""
        encoded = [
            dataclasses.replace(a, completion=None if a.completion is None else self._encode(a.completion))
            for a in acks
        ]
        return [
            await self._readable_item(r) if isinstance(r, OrchestrationItem) else r
            for r in await self.inner.ack_work_items(encoded)
        ]

    async def abandon_work_item(
        self, lock_token: str, *, delay: float = 0.0, ignore_attempt: bool = False
    ) -> None:
        """Delegated."""
        await self.inner.abandon_work_item(lock_token, delay=delay, ignore_attempt=ignore_attempt)

    async def renew_work_item_locks(self, lock_tokens: Sequence[str], lock_timeout: float) -> list[bool]:
        """Delegated."""
        return await self.inner.renew_work_item_locks(lock_tokens, lock_timeout)

    async def enqueue_orchestrator_messages(self, messages: Sequence[Message]) -> None:
        """Encode and enqueue."""
        await self.inner.enqueue_orchestrator_messages([self._encode(m) for m in messages])

    async def read_history(self, instance_id: str, execution_id: int | None = None) -> list[Event]:
        """Read and decode; a payload this codec cannot read is a permanent error."""
        events = await self.inner.read_history(instance_id, execution_id)
        try:
            return [self._decode(e) for e in events]
        except PayloadCodecError as exc:
            raise ProviderError("read_history", f"instance {instance_id!r}: {exc}", retryable=False) from None

    async def get_instance(self, instance_id: str) -> InstanceInfo | None:
        """Read and decode the instance's output and custom status."""
        info = await self.inner.get_instance(instance_id)
        try:
            return self._decode_instance(info)
        except PayloadCodecError as exc:
            raise ProviderError("get_instance", f"instance {instance_id!r}: {exc}", retryable=False) from None

    async def get_custom_status(
        self, instance_id: str, last_seen_version: int
    ) -> tuple[str | None, int] | None:
        """Read and decode."""
        found = await self.inner.get_custom_status(instance_id, last_seen_version)
        if found is None or found[0] is None:
            return found
        try:
            return self.decode_text(found[0]), found[1]
        except PayloadCodecError as exc:
            raise ProviderError(
                "get_custom_status", f"instance {instance_id!r}: {exc}", retryable=False
            ) from None

    async def wait_for_work(self, queue: Queue, timeout: float) -> None:
        """Delegated."""
        await self.inner.wait_for_work(queue, timeout)

    async def wait_for_instance_change(self, instance_id: str, timeout: float) -> None:
        """Delegated."""
        await self.inner.wait_for_instance_change(instance_id, timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    # -- unreadable work -----------------------------------------------------------------------

    async def _decode_leases(self, leases: list[WorkItemLease]) -> list[WorkItemLease]:
        readable: list[WorkItemLease] = []
        for lease in leases:
            try:
                if lease.item is not None:
                    lease.item = self._decode(lease.item)
            except PayloadCodecError as exc:
                await self._put_back(lease.lock_token, f"activity {lease.ref}", exc, orchestration=False)
                continue
            readable.append(lease)
        return readable

    async def _put_back(
        self, lock_token: str, where: str, exc: PayloadCodecError, *, orchestration: bool
    ) -> None:
        """Release work this codec cannot read, uncounted, so it is neither lost nor poisoned."""
        _log.error("%s: %s; put back for %g s", where, exc, self.retry_unreadable)
        try:
            if orchestration:
                await self.inner.abandon_orchestration_item(
                    lock_token, delay=self.retry_unreadable, ignore_attempt=True
                )
            else:
                await self.inner.abandon_work_item(
                    lock_token, delay=self.retry_unreadable, ignore_attempt=True
                )
        except ProviderError:
            _log.exception("%s: could not put back; its lock lapses instead", where)


__all__ = ["CodecProvider", "PayloadCodecError"]
