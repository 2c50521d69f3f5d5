"""Garbage-collector settings for a process that sends for hours.

A send allocates a few hundred short-lived objects (the request, the provider's answer, the rows
written), and CPython's cyclic collector, at its defaults, walks every long-lived object of the
process (modules, the SQL statement cache, the config) again and again while they pile up. In
the Twilio benchmark that was about an eighth of the CPU time.
"""

from __future__ import annotations

import gc

#: Allocations between collections of the youngest generation (CPython's default is 700).
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Exempt what start-up built from cyclic collection and collect young objects less often.

    Call once, after the engine has started: later garbage is collected as before, only less
    often, and the objects frozen here are never freed (they live as long as the process).
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
