"""Find channel adapters by type name through the `dispatcher.channels` entry-point group.

Built-in adapters are registered in our own pyproject exactly as a third-party package would
register its own, so the engine never imports a provider module by name.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from dispatcher.channels.base import Channel
from dispatcher.errors import ChannelError

GROUP = "dispatcher.channels"


@cache
def available() -> dict[str, str]:
    """Map each registered type name to its entry point's import path."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def load(type_name: str) -> type[Channel]:
    """Import and return the adapter class registered as `type_name`."""
    for ep in entry_points(group=GROUP, name=type_name):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken third-party plugin must not crash `check`
            raise ChannelError(
                f"channel type {type_name!r}: cannot load {ep.value}: {exc}"
            ) from exc
        if not (isinstance(cls, type) and issubclass(cls, Channel)):
            raise ChannelError(f"channel type {type_name!r}: {ep.value} is not a Channel subclass")
        return cls
    known = ", ".join(sorted(available())) or "none"
    raise ChannelError(f"unknown channel type {type_name!r} (known: {known})")
