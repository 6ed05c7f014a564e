"""The ``perdure`` command: migrate a store and inspect or steer instances from a shell.

    perdure migrate sqlite:///app.db
    perdure status postgresql://app@db/app order-42
    perdure history sqlite:///app.db order-42 --execution 1
    perdure start sqlite:///app.db fulfil --input '{"order": 42}' --id order-42
    perdure raise-event sqlite:///app.db order-42 approved --data '"ann"'
    perdure cancel sqlite:///app.db order-42 --reason "customer asked"

Built on argparse so the core keeps no dependencies. Every command talks to the provider named
by the URL (see :func:`perdure.connect`); none needs the application's code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from perdure.client import Client
from perdure.connect import connect
from perdure.history import encode_event
from perdure.provider import Provider, ProviderError


def _provider(url: str, migrate: bool) -> Provider:
    if not migrate:
        return connect(url)
    try:
        return connect(url, migrate=True)
    except TypeError:  # a third-party provider without a migrate option migrates on open, if at all
        return connect(url)


def _json_arg(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise SystemExit(
            f"perdure: {what} is not valid JSON ({exc}); quote strings, e.g. '\"text\"'"
        ) from None


def _shown(text: str | None) -> Any:
    """A stored payload for display: its JSON value, or the stored text a codec wrote."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text  # encoded by a CodecProvider; this command has no codec


async def _run(args: argparse.Namespace) -> int:
    provider = _provider(args.url, migrate=args.command == "migrate")
    await provider.open()
    try:
        client = Client(provider)
        if args.command == "migrate":
            print(f"{provider.name}: schema is up to date")  # not the URL: it may hold a password
        elif args.command == "status":
            status = await client.get_status(args.instance)
            if status is None:
                print(f"perdure: no instance {args.instance!r}", file=sys.stderr)
                return 1
            data = {
                "instance_id": status.instance_id,
                "name": status.name,
                "version": status.version,
                "status": status.status,
                "execution_id": status.execution_id,
                "output": _shown(status.output),
                "error": None
                if status.error is None
                else {"kind": status.error.kind, "type": status.error.type, "message": status.error.message},
                "custom_status": _shown(status.custom_status),
                "parent_instance_id": status.parent_instance_id,
            }
            print(json.dumps(data, indent=2, ensure_ascii=False))
        elif args.command == "history":
            for event in await client.read_history(args.instance, args.execution):
                print(encode_event(event))
        elif args.command == "start":
            instance = await client.start_orchestration(
                args.name, args.input, instance_id=args.id, version=args.version
            )
            print(instance)
        elif args.command == "raise-event":
            await client.raise_event(args.instance, args.event, args.data)
        elif args.command == "cancel":
            await client.cancel(args.instance, args.reason)
        return 0
    finally:
        await provider.close()


def parser() -> argparse.ArgumentParser:
    """The argument parser of the ``perdure`` command."""
    root = argparse.ArgumentParser(
        prog="perdure", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = root.add_subparsers(dest="command", required=True)
    migrate = commands.add_parser("migrate", help="create or upgrade the store's schema")
    migrate.add_argument("url")
    status = commands.add_parser("status", help="print an instance's status as JSON")
    status.add_argument("url")
    status.add_argument("instance")
    history = commands.add_parser("history", help="print an execution's history, one JSON event a line")
    history.add_argument("url")
    history.add_argument("instance")
    history.add_argument("--execution", type=int, default=None, help="execution id (default: current)")
    start = commands.add_parser("start", help="start an orchestration by name; prints the instance id")
    start.add_argument("url")
    start.add_argument("name")
    start.add_argument("--input", default=None, help="input as JSON")
    start.add_argument("--id", default=None, help="instance id (default: a random one)")
    start.add_argument("--version", default=None)
    raise_event = commands.add_parser("raise-event", help="raise an external event on an instance")
    raise_event.add_argument("url")
    raise_event.add_argument("instance")
    raise_event.add_argument("event")
    raise_event.add_argument("--data", default=None, help="event data as JSON")
    cancel = commands.add_parser("cancel", help="cancel an instance (and its children)")
    cancel.add_argument("url")
    cancel.add_argument("instance")
    cancel.add_argument("--reason", default="cancelled from the command line")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``perdure`` console script."""
    args = parser().parse_args(argv)
    if args.command == "start":
        args.input = _json_arg(args.input, "--input")
    elif args.command == "raise-event":
        args.data = _json_arg(args.data, "--data")
    try:
        return asyncio.run(_run(args))
    except ProviderError as exc:
        print(f"perdure: the store failed: {exc}", file=sys.stderr)
        return 1
    except (ValueError, LookupError) as exc:
        print(f"perdure: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
