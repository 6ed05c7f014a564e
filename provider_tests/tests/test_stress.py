"""Tests of the stress entry point: real runtimes against InMemoryProvider, and a broken provider."""

from __future__ import annotations

import json

import pytest
from broken import DeletesUntaggedMessages
from factories import MemoryFactory

from perdure.provider import Provider
from perdure.testing import InMemoryProvider
from perdure_provider_tests.stress import StressConfig, main, run_stress, run_stress_with_factory

QUICK = StressConfig(
    duration=0.5, max_concurrent=10, tasks_per_instance=4, activity_delay=0.001, wait_timeout=10
)


async def test_fanout_on_the_memory_provider() -> None:
    result = await run_stress_with_factory(MemoryFactory(), QUICK)
    assert result.ok, result.summary()
    assert result.activity_runs >= result.launched * QUICK.tasks_per_instance
    assert 0 < result.latency_ms(0.5) <= result.latency_ms(0.99)


async def test_large_payloads_with_two_runtimes() -> None:
    config = StressConfig(
        workload="large-payload",
        duration=0.5,
        max_concurrent=4,
        tasks_per_instance=2,
        payload_bytes=20_000,
        runtimes=2,
    )
    result = await run_stress(InMemoryProvider(), config)
    assert result.ok, result.summary()


async def test_a_provider_that_loses_messages_fails_the_run() -> None:
    config = StressConfig(duration=1.0, max_concurrent=20, wait_timeout=2)
    result = await run_stress(DeletesUntaggedMessages(), config)
    assert not result.ok
    assert result.failed > 0
    assert "not finished" in result.summary()


def test_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    def connect(url: str) -> Provider:
        assert url == "memory://"
        return InMemoryProvider()

    code = main(
        ["memory://", "--duration", "0.3", "--concurrency", "5", "--tasks", "2", "--json"], connect=connect
    )
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    metrics = {json.loads(line)["metric"] for line in lines}
    assert {"orchestrations_per_s", "latency_ms_p99", "failed"} <= metrics
    assert all(json.loads(line)["workload"] == "stress-fanout" for line in lines)
