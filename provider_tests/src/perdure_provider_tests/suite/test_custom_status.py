"""Custom status: written only by a flagged ack, its version rising by one per write.

It belongs to the instance (not an execution), and the version lets clients poll cheaply.
"""

from __future__ import annotations

from perdure.provider import Provider
from perdure_provider_tests.helpers import (
    ack_for,
    ack_ok,
    continue_as_new,
    enqueue,
    fetch_one,
    raised,
    start_instance,
    start_message,
    started,
    take_turn,
)


async def _set(provider: Provider, instance_id: str, status: str | None) -> None:
    await take_turn(provider, instance_id, custom_status_changed=True, custom_status=status)


async def test_new_instance_has_no_custom_status(provider: Provider) -> None:
    """A new instance has custom status ``None`` at version 0."""
    info = await start_instance(provider, "i")
    assert (info.custom_status, info.custom_status_version) == (None, 0)
    assert await provider.get_custom_status("i", -1) == (None, 0)


async def test_setting_stores_the_value_and_bumps_the_version(provider: Provider) -> None:
    """Setting a custom status stores the value and raises the version by one."""
    await start_instance(provider, "i")
    await _set(provider, "i", '{"progress": 50}')
    assert await provider.get_custom_status("i", 0) == ('{"progress": 50}', 1)


async def test_clearing_stores_none_and_bumps_the_version(provider: Provider) -> None:
    """Clearing a custom status (a flagged ``None``) stores ``None`` and raises the version."""
    await start_instance(provider, "i")
    await _set(provider, "i", '"busy"')
    await _set(provider, "i", None)
    assert await provider.get_custom_status("i", 1) == (None, 2)


async def test_ack_without_change_keeps_status_and_version(provider: Provider) -> None:
    """An ack that does not flag ``custom_status_changed`` leaves the status and version as they were."""
    await start_instance(provider, "i")
    await _set(provider, "i", '"kept"')
    await take_turn(provider, "i", history=[raised(2)], custom_status='"ignored: not flagged"')
    info = await provider.get_instance("i")
    assert info is not None
    assert (info.custom_status, info.custom_status_version) == ('"kept"', 1)


async def test_version_rises_by_one_per_write(provider: Provider) -> None:
    """The version rises by exactly one per write."""
    await start_instance(provider, "i")
    for n in range(1, 5):
        await _set(provider, "i", f'"step {n}"')
        assert await provider.get_custom_status("i", n - 1) == (f'"step {n}"', n)


async def test_polling_with_the_current_version_returns_none(provider: Provider) -> None:
    """``get_custom_status`` returns ``None`` unless the version is above ``last_seen_version``."""
    await start_instance(provider, "i")
    assert await provider.get_custom_status("i", 0) is None
    await _set(provider, "i", '"x"')
    assert await provider.get_custom_status("i", 1) is None
    assert await provider.get_custom_status("i", 5) is None


async def test_unknown_instance_has_no_custom_status(provider: Provider) -> None:
    """``get_custom_status`` of an unknown instance returns ``None``."""
    assert await provider.get_custom_status("nobody", -1) is None


async def test_creating_ack_can_set_the_custom_status(provider: Provider) -> None:
    """A custom status set by the creating ack is stored at version 1."""
    await enqueue(provider, start_message("i"))
    item = await fetch_one(provider, "i")
    ack = ack_for(
        item, history=[started()], status="running", custom_status_changed=True, custom_status='"init"'
    )
    await ack_ok(provider, ack)
    assert await provider.get_custom_status("i", 0) == ('"init"', 1)


async def test_custom_status_survives_continue_as_new(provider: Provider) -> None:
    """A new execution does not reset the custom status or its version; only a flagged ack writes it."""
    await start_instance(provider, "i")
    await _set(provider, "i", '"before"')
    await continue_as_new(provider, "i", '"next"')
    assert await provider.get_custom_status("i", 0) == ('"before"', 1)
