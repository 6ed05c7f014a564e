from __future__ import annotations

import copy
from typing import Any

import pytest

from perdure import limits
from perdure.limits import (
    HISTORY_WARNING_EVENTS,
    MAX_CUSTOM_STATUS_BYTES,
    MAX_INSTANCE_ID_LENGTH,
    MAX_KV_VALUE_BYTES,
    MAX_NAME_LENGTH,
    MAX_PAYLOAD_BYTES,
    InvalidInstanceId,
    InvalidName,
    LimitExceeded,
    check_custom_status,
    check_kv_value,
    check_payload,
    validate_instance_id,
    validate_name,
)


def test_documented_values() -> None:
    assert MAX_INSTANCE_ID_LENGTH == 256
    assert MAX_NAME_LENGTH == 256
    assert MAX_PAYLOAD_BYTES == 2 * 1024 * 1024
    assert MAX_CUSTOM_STATUS_BYTES == 64 * 1024
    assert MAX_KV_VALUE_BYTES == 64 * 1024
    assert HISTORY_WARNING_EVENTS == 10_000
    for error in (LimitExceeded, InvalidInstanceId, InvalidName):
        assert issubclass(error, ValueError)


# --------------------------------------------------------------------------------------------
# Instance ids
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "instance_id",
    [
        "order-42",
        "a",
        "订单/42",
        "🎉 party 🎉",
        "Robert'); DROP TABLE instances;--",
        'quote"double',
        "back\\slash",
        "percent%_like",
        "inner  spaces\u00a0and nbsp",
        "zero\u200bwidth",
        "x" * 256,
        "é" * 256,  # length is counted in characters, not bytes
        "😀" * 256,
        "::parent::child#1",
    ],
)
def test_valid_instance_ids_are_returned_unchanged(instance_id: str) -> None:
    assert validate_instance_id(instance_id) is instance_id


@pytest.mark.parametrize(
    ("instance_id", "fragment"),
    [
        ("", "must not be empty"),
        ("x" * 257, "257 characters long, over the limit of 256"),
        ("😀" * 257, "257 characters long"),
        ("a\x00b", "control character (U+0000) at position 1"),
        ("a\nb", "U+000A"),
        ("\tab", "U+0009"),
        ("ab\r", "U+000D"),
        ("a\x1bb", "U+001B"),
        ("a\x7fb", "U+007F"),
        ("a\x80b", "U+0080"),
        ("a\x85b", "U+0085"),
        ("a\x9fb", "U+009F"),
        ("a\ud800b", "lone surrogate (U+D800)"),
        (" order", "leading or trailing whitespace"),
        ("order ", "leading or trailing whitespace"),
        ("order\u00a0", "leading or trailing whitespace"),
        ("\u3000order", "leading or trailing whitespace"),
        ("   ", "leading or trailing whitespace"),
    ],
)
def test_invalid_instance_ids(instance_id: str, fragment: str) -> None:
    with pytest.raises(InvalidInstanceId) as info:
        validate_instance_id(instance_id)
    message = str(info.value)
    assert message.startswith("instance id")
    assert fragment in message


@pytest.mark.parametrize("value", [None, 42, b"order", ["a"]])
def test_non_string_instance_id(value: Any) -> None:
    with pytest.raises(InvalidInstanceId, match=f"must be a str, got {type(value).__name__}"):
        validate_instance_id(value)


def test_long_ids_are_shortened_in_messages() -> None:
    with pytest.raises(InvalidInstanceId) as info:
        validate_instance_id("y" * 5000)
    assert len(str(info.value)) < 300
    assert "5000 characters" in str(info.value)


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["charge_card", "Billing.ChargeCard", "v2/fulfil", "n" * 256, "支払い"])
def test_valid_names(name: str) -> None:
    assert validate_name(name, "activity name") is name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "must not be empty"),
        ("n" * 257, "257 characters long, over the limit of 256"),
        ("charge\ncard", "control character (U+000A) at position 6"),
        ("charge_card ", "leading or trailing whitespace"),
    ],
)
def test_invalid_names_name_what_they_are(name: str, fragment: str) -> None:
    with pytest.raises(InvalidName) as info:
        validate_name(name, "event name")
    assert str(info.value).startswith("event name")
    assert fragment in str(info.value)
    with pytest.raises(InvalidName, match=r"^orchestration name"):
        validate_name(name, "orchestration name")


def test_instance_id_and_name_errors_are_distinct() -> None:
    with pytest.raises(InvalidName):
        validate_name("", "activity name")
    with pytest.raises(InvalidInstanceId):
        validate_instance_id("")
    assert not issubclass(InvalidName, InvalidInstanceId)
    assert not issubclass(InvalidInstanceId, InvalidName)


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------


def test_payload_exactly_at_the_limit_passes_and_one_byte_more_fails() -> None:
    at_limit = "x" * MAX_PAYLOAD_BYTES
    assert check_payload(at_limit, "input") is at_limit
    with pytest.raises(LimitExceeded) as info:
        check_payload(at_limit + "x", "result of activity 'fetch'")
    err = info.value
    assert err.size == MAX_PAYLOAD_BYTES + 1
    assert err.limit == MAX_PAYLOAD_BYTES
    assert err.what == "result of activity 'fetch'"
    message = str(err)
    assert message.startswith("result of activity 'fetch' is 2,097,153 bytes")
    assert "2 MiB (2,097,152 bytes)" in message
    assert "pass a reference" in message


def test_payload_limit_counts_utf8_bytes_not_characters() -> None:
    two_byte = "é" * (MAX_PAYLOAD_BYTES // 2)  # exactly the limit in bytes, half in characters
    assert check_payload(two_byte, "input") is two_byte
    with pytest.raises(LimitExceeded) as info:
        check_payload(two_byte + "a", "input")
    assert info.value.size == MAX_PAYLOAD_BYTES + 1
    four_byte = "😀" * (MAX_PAYLOAD_BYTES // 4)
    assert check_payload(four_byte, "input") is four_byte
    with pytest.raises(LimitExceeded):
        check_payload(four_byte + "😀", "input")
    # Over a quarter of the limit in characters but far under it in bytes: must pass.
    assert check_payload("a" * (MAX_PAYLOAD_BYTES // 4 + 1), "input")
    # A lone surrogate (escaped by dumps, but be robust anyway) does not crash the check.
    assert check_payload("\ud800" * 10, "input")


class CountingStr(str):
    encodes = 0

    def encode(self, *args: Any, **kwargs: Any) -> bytes:
        CountingStr.encodes += 1
        return super().encode(*args, **kwargs)


def test_payload_check_only_encodes_when_the_length_cannot_decide() -> None:
    CountingStr.encodes = 0
    check_payload(CountingStr("é" * (MAX_PAYLOAD_BYTES // 4)), "input")  # len * 4 <= limit
    check_payload(CountingStr("a" * MAX_PAYLOAD_BYTES), "input")  # ASCII: size is the length
    assert CountingStr.encodes == 0
    check_payload(CountingStr("é" * (MAX_PAYLOAD_BYTES // 2)), "input")  # must measure
    assert CountingStr.encodes == 1


def test_custom_status_limit() -> None:
    at_limit = "s" * MAX_CUSTOM_STATUS_BYTES
    assert check_custom_status(at_limit) is at_limit
    with pytest.raises(LimitExceeded) as info:
        check_custom_status(at_limit + "s")
    assert str(info.value).startswith("custom status is 65,537 bytes of JSON, over the limit of 64 KiB")
    assert info.value.limit == MAX_CUSTOM_STATUS_BYTES
    with pytest.raises(LimitExceeded):
        check_custom_status("ü" * (MAX_CUSTOM_STATUS_BYTES // 2 + 1))


def test_kv_value_limit_names_the_key() -> None:
    at_limit = "v" * MAX_KV_VALUE_BYTES
    assert check_kv_value(at_limit, "cart") is at_limit
    with pytest.raises(LimitExceeded, match=r"^value of key 'cart' is 65,537 bytes"):
        check_kv_value(at_limit + "v", "cart")


def test_limit_exceeded_survives_copy() -> None:
    with pytest.raises(LimitExceeded) as info:
        check_custom_status("s" * (MAX_CUSTOM_STATUS_BYTES + 1))
    clone = copy.deepcopy(info.value)
    assert str(clone) == str(info.value)
    assert (clone.what, clone.size, clone.limit) == (
        "custom status",
        MAX_CUSTOM_STATUS_BYTES + 1,
        MAX_CUSTOM_STATUS_BYTES,
    )


def test_public_names() -> None:
    for name in limits.__all__:
        assert hasattr(limits, name)
    assert limits.__doc__
