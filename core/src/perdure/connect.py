"""Find a provider by URL through the ``perdure.providers`` entry-point group.

``perdure.connect("sqlite:///app.db")`` and ``perdure.connect("postgresql://...")`` build the
provider registered for the URL's scheme, so a third-party provider plugs in the same way as ours.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from perdure.provider import Provider

GROUP = "perdure.providers"


def connect(url: str, **options: Any) -> Provider:
    """Build (but do not open) the provider for ``url``; options go to the provider's factory."""
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    if not scheme or ":" not in url:
        raise ValueError(f"not a provider URL: {url!r} (expected e.g. 'sqlite:///app.db')")
    found = [ep for ep in entry_points(group=GROUP) if ep.name == scheme]
    if not found:
        known = sorted({ep.name for ep in entry_points(group=GROUP)}) or ["none installed"]
        hint = {
            "sqlite": "perdure[sqlite]",
            "postgresql": "perdure[postgres]",
            "postgres": "perdure[postgres]",
        }
        install = f"; install it with pip install '{hint[scheme]}'" if scheme in hint else ""
        raise ValueError(
            f"no perdure provider for URL scheme {scheme!r} (available: {', '.join(known)}){install}"
        )
    factory = found[0].load()
    provider = factory(url, **options)
    if not isinstance(provider, Provider):
        raise TypeError(
            f"entry point {found[0].value} returned {type(provider).__name__}, not a perdure Provider"
        )
    return provider


__all__ = ["GROUP", "connect"]
