"""The perdure command against a real store (runs where perdure-sqlite is installed)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from perdure import OrchestrationContext, Registry, Runtime, connect
from perdure.cli import main

pytest.importorskip("perdure_sqlite", reason="the CLI needs a provider reachable by URL")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_migrate_start_raise_status_history_cancel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert run(capsys, "migrate", url)[0] == 0
    code, out, _ = run(capsys, "start", url, "greeter", "--input", '"ann"', "--id", "g-1")
    assert (code, out.strip()) == (0, "g-1")
    code, _, err = run(capsys, "status", url, "g-1")
    assert code == 1 and "no instance 'g-1'" in err  # nothing has run it yet

    app = Registry()

    @app.orchestration
    async def greeter(ctx: OrchestrationContext, name: str) -> str:
        greeting = await ctx.wait_for_event("greeting")
        return f"{greeting}, {name}"

    async def serve_until_done() -> None:
        async with Runtime(connect(url), app) as runtime:
            for _ in range(200):
                if await runtime.client.get_status("g-1") is not None:
                    break
                await asyncio.sleep(0.02)
            assert (
                await asyncio.to_thread(main, ["raise-event", url, "g-1", "greeting", "--data", '"hello"'])
                == 0
            )
            await runtime.client.wait_for_orchestration("g-1", timeout=10)

    asyncio.run(serve_until_done())
    code, out, _ = run(capsys, "status", url, "g-1")
    status = json.loads(out)
    assert code == 0 and status["status"] == "completed" and status["output"] == "hello, ann"
    code, out, _ = run(capsys, "history", url, "g-1")
    kinds = [json.loads(line)["type"] for line in out.splitlines()]
    assert kinds == ["OrchestrationStarted", "EventSubscribed", "EventRaised", "OrchestrationCompleted"]
    assert run(capsys, "cancel", url, "g-1")[0] == 0


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    with pytest.raises(SystemExit, match="--input is not valid JSON"):
        main(["start", url, "x", "--input", "not json"])
    code, _, err = run(capsys, "start", url, "x", "--id", "bad\x01id")
    assert code == 2 and "instance id" in err


def test_status_shows_payloads_a_codec_wrote_as_stored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from perdure.codec_provider import CodecProvider
    from perdure.serialization import ZlibCodec

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    app = Registry()

    @app.orchestration
    async def secret(ctx: OrchestrationContext, name: str) -> str:
        ctx.set_custom_status({"step": "done"})
        return f"hello, {name}"

    async def serve() -> None:
        async with Runtime(CodecProvider(connect(url), ZlibCodec()), app) as runtime:
            await runtime.client.start_orchestration(secret, "ann", instance_id="s-1")
            await runtime.client.wait_for_orchestration("s-1", timeout=10)

    asyncio.run(serve())
    code, out, _ = run(capsys, "status", url, "s-1")
    status = json.loads(out)
    assert code == 0 and status["status"] == "completed"
    assert status["output"].startswith("~zlib:") and status["custom_status"].startswith("~zlib:")
