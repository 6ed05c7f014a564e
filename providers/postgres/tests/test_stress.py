"""The conformance package's stress workloads: the real runtime driving the provider under load."""

from __future__ import annotations

import pytest
from conftest import PostgresFactory

from perdure import RuntimeOptions
from perdure_provider_tests.stress import StressConfig, run_stress_with_factory


@pytest.mark.timeout(180)
@pytest.mark.parametrize("runtimes", [1, 3])
async def test_fanout_under_load(provider_factory: PostgresFactory, runtimes: int) -> None:
    config = StressConfig(
        workload="fanout",
        duration=3.0,
        max_concurrent=30,
        tasks_per_instance=5,
        activity_delay=0.005,
        runtimes=runtimes,
        options=RuntimeOptions(poll_interval=0.2, orchestration_batch=16, worker_batch=16),
    )
    result = await run_stress_with_factory(provider_factory, config)
    assert result.ok, result.summary()
    assert result.completed > 0
    print(result.summary())


@pytest.mark.timeout(180)
async def test_large_payloads_under_load(provider_factory: PostgresFactory) -> None:
    config = StressConfig(
        workload="large-payload",
        duration=2.0,
        max_concurrent=8,
        tasks_per_instance=3,
        payload_bytes=256 * 1024,
    )
    result = await run_stress_with_factory(provider_factory, config)
    assert result.ok, result.summary()
    assert result.completed > 0
    print(result.summary())
