"""SMS text: GSM-7 / UCS-2 encoding choice, segment counting, composition and cost.

Pure functions of their inputs. Counting follows GSM 03.38 / 03.40: a message that fits the
GSM 7-bit alphabet (basic table plus the escape-prefixed extension table) is sent as GSM-7,
anything else as UCS-2 (in practice UTF-16, so a character outside the BMP takes two units).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Final, Literal

# Twilio refuses a body longer than this many segments (its documented limit).
TWILIO_MAX_SEGMENTS: Final = 10

GSM7_SINGLE: Final = 160
GSM7_CONCAT: Final = 153
UCS2_SINGLE: Final = 70
UCS2_CONCAT: Final = 67

# GSM 03.38 basic table, in code-point order 0x00..0x7F; 0x1B (ESC) is the escape to the
# extension table, not a character a text can contain.
_GSM7_BASIC: Final = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
) - {"\x1b"}
# The extension table: each of these is sent as ESC + code, two septets.
_GSM7_EXTENSION: Final = "\x0c^{}\\[~]|€"
_GSM7_EXTENSION_SET: Final = frozenset(_GSM7_EXTENSION)
_GSM7_ALL: Final = _GSM7_BASIC | _GSM7_EXTENSION_SET


@dataclass(frozen=True, slots=True)
class SmsInfo:
    """How a text travels as SMS: encoding, size in units, and the segments it needs."""

    encoding: Literal["GSM-7", "UCS-2"]
    units: int
    """Septets for GSM-7 (extension characters count 2), UTF-16 code units for UCS-2."""
    segments: int
    chars_per_segment: int
    """Units a segment holds: 160 / 70 for a single segment, 153 / 67 when concatenated."""


def is_gsm7(text: str) -> bool:
    """Return True when every character of `text` is in the GSM 03.38 basic or extension table."""
    return frozenset(text) <= _GSM7_ALL


def analyse(text: str) -> SmsInfo:
    """Return the encoding, unit count and segment count `text` needs as an SMS.

    Concatenated segments are counted by packing: a GSM-7 escape pair or a UTF-16 surrogate
    pair is never split across two segments, so the count can exceed ceil(units / capacity).
    """
    if is_gsm7(text):
        wide = sum(text.count(char) for char in _GSM7_EXTENSION)
        return _info("GSM-7", text, len(text) + wide, wide, GSM7_SINGLE, GSM7_CONCAT)
    # Characters outside the BMP are the only ones that take two UTF-16 units.
    units = len(text.encode("utf-16-le")) // 2
    wide = units - len(text)
    return _info("UCS-2", text, units, wide, UCS2_SINGLE, UCS2_CONCAT)


def _info(
    encoding: Literal["GSM-7", "UCS-2"],
    text: str,
    units: int,
    wide: int,
    single: int,
    concat: int,
) -> SmsInfo:
    if units <= single:
        return SmsInfo(encoding, units, 1, single)
    # Without escape or surrogate pairs every unit fits anywhere: no need to pack.
    segments = -(-units // concat) if wide == 0 else _pack(text, concat, encoding)
    return SmsInfo(encoding, units, segments, concat)


def _pack(text: str, capacity: int, encoding: Literal["GSM-7", "UCS-2"]) -> int:
    """Count segments by filling each one with whole characters (pairs stay together)."""
    if encoding == "GSM-7":
        widths = (2 if char in _GSM7_EXTENSION_SET else 1 for char in text)
    else:
        widths = (2 if ord(char) > 0xFFFF else 1 for char in text)
    segments, used = 1, 0
    for width in widths:
        if used + width > capacity:
            segments += 1
            used = 0
        used += width
    return segments


def compose(body: str, *, signature: str | None = None, unsubscribe: str | None = None) -> str:
    """Return the text actually sent: signature first, body, then the unsubscribe suffix.

    Chinese carriers require the sender's signature (e.g. `【国家质检总局】`) at the very start,
    so it is prepended without a space; it is not doubled when the body already starts with it.
    The unsubscribe suffix (e.g. `回T退订`) is appended after one space unless the body already
    ends with it. Surrounding whitespace of the body is stripped.
    """
    text = body.strip()
    suffix = (unsubscribe or "").strip()
    if suffix and not text.endswith(suffix):
        text = f"{text} {suffix}" if text else suffix
    prefix = (signature or "").strip()
    if prefix and not text.startswith(prefix):
        text = prefix + text
    return text


def estimate_cost(segments: int, price_per_segment: Decimal) -> Decimal:
    """Return what `segments` segments cost at `price_per_segment` each (exact decimal)."""
    if segments < 0:
        raise ValueError(f"segments must not be negative, got {segments}")
    return price_per_segment * segments
