"""SMPP message bodies: GSM-7 / UCS-2 encoding, UDH concatenation, MO decoding, DLR parsing.

Pure functions of their inputs, used by the SMPP adapter. The splitting follows the same rules
as `dispatcher.sms` (160 / 153 GSM-7 septets, 70 / 67 UCS-2 units, an escape pair or a
surrogate pair never split across parts), so the adapter sends exactly the number of parts the
engine counted and priced.

GSM-7 goes on the wire unpacked (one septet per octet) with data_coding 0, which is what SMPP
3.4 SMSCs whose default alphabet is GSM 03.38 expect; anything else goes as UTF-16BE with
data_coding 8 (UCS-2, plus surrogate pairs for characters outside the BMP, as handsets accept).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from dispatcher.channels.base import ReceiptStatus
from dispatcher.sms import GSM7_CONCAT, GSM7_SINGLE, UCS2_CONCAT, UCS2_SINGLE

DATA_CODING_DEFAULT: Final = 0x00
DATA_CODING_IA5: Final = 0x01
DATA_CODING_LATIN1: Final = 0x03
DATA_CODING_UCS2: Final = 0x08
ESM_CLASS_UDHI: Final = 0x40
MAX_PARTS: Final = 255

# GSM 03.38 basic table in code order 0x00..0x7F (0x1B is the escape, never a character).
_GSM7_BASIC: Final = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENSION: Final = {
    "\x0c": 0x0A,
    "^": 0x14,
    "{": 0x28,
    "}": 0x29,
    "\\": 0x2F,
    "[": 0x3C,
    "~": 0x3D,
    "]": 0x3E,
    "|": 0x40,
    "€": 0x65,
}
_GSM7_ENCODE: Final = {char: bytes([code]) for code, char in enumerate(_GSM7_BASIC) if code != 0x1B}
_GSM7_ENCODE.update({char: bytes([0x1B, code]) for char, code in _GSM7_EXTENSION.items()})
_GSM7_DECODE_EXTENSION: Final = {code: char for char, code in _GSM7_EXTENSION.items()}


class MessageTooLong(ValueError):
    """The text needs more than 255 concatenated parts, the most an 8-bit UDH can number."""


@dataclass(frozen=True, slots=True)
class EncodedPart:
    """One submit_sm worth of message: the short_message octets (UDH included) and its flags."""

    short_message: bytes
    data_coding: int
    esm_class: int


@dataclass(frozen=True, slots=True)
class DecodedMessage:
    """A received short message: its text and, when it is one part of several, where it fits."""

    text: str
    reference: int | None = None
    total: int = 1
    number: int = 1


def gsm7_encode(text: str) -> list[bytes] | None:
    """Return the unpacked GSM-7 octets of each character, or None when one is not in GSM 03.38."""
    encoded: list[bytes] = []
    for char in text:
        octets = _GSM7_ENCODE.get(char)
        if octets is None:
            return None
        encoded.append(octets)
    return encoded


def gsm7_decode(data: bytes) -> str:
    """Return the text of unpacked GSM-7 octets; an unknown escape decodes as a space."""
    chars: list[str] = []
    escaped = False
    for octet in data:
        if escaped:
            chars.append(_GSM7_DECODE_EXTENSION.get(octet, " "))
            escaped = False
        elif octet == 0x1B:
            escaped = True
        else:
            chars.append(_GSM7_BASIC[octet & 0x7F])
    return "".join(chars)


def encode_parts(text: str, reference: int, *, allow_gsm7: bool = True) -> list[EncodedPart]:
    """Return the submit_sm bodies that carry `text`: one part, or parts with an 8-bit-ref UDH.

    GSM-7 (data_coding 0) when `allow_gsm7` and every character is in GSM 03.38, else UTF-16BE
    (data_coding 8). Concatenated parts start with the 6-octet UDH `05 00 03 ref total seq`
    and set esm_class 0x40. `reference` (0..255) must differ between messages to one handset.
    """
    gsm = gsm7_encode(text) if allow_gsm7 else None
    if gsm is not None:
        units, coding, single, concat, unit_octets = (
            gsm,
            DATA_CODING_DEFAULT,
            GSM7_SINGLE,
            GSM7_CONCAT,
            1,
        )
    else:
        units = [char.encode("utf-16-be") for char in text]
        coding, single, concat, unit_octets = DATA_CODING_UCS2, UCS2_SINGLE, UCS2_CONCAT, 2
    if sum(len(unit) for unit in units) <= single * unit_octets:
        return [EncodedPart(b"".join(units), coding, 0)]
    chunks = _pack(units, concat * unit_octets)
    if len(chunks) > MAX_PARTS:
        raise MessageTooLong(f"text needs {len(chunks)} parts, at most {MAX_PARTS} can be sent")
    total = len(chunks)
    return [
        EncodedPart(
            bytes([5, 0, 3, reference & 0xFF, total, number]) + chunk, coding, ESM_CLASS_UDHI
        )
        for number, chunk in enumerate(chunks, start=1)
    ]


def _pack(units: list[bytes], capacity: int) -> list[bytes]:
    """Fill parts of `capacity` octets with whole characters, so no pair is ever split."""
    chunks: list[bytes] = []
    current = bytearray()
    for unit in units:
        if len(current) + len(unit) > capacity:
            chunks.append(bytes(current))
            current.clear()
        current += unit
    chunks.append(bytes(current))
    return chunks


def decode_short_message(data: bytes, data_coding: int, *, udhi: bool) -> DecodedMessage:
    """Return the text of a received short_message, with its concatenation info from the UDH."""
    reference: int | None = None
    total = number = 1
    if udhi and data:
        header_end = 1 + data[0]
        reference, total, number = _concatenation(data[1:header_end])
        data = data[header_end:]
    return DecodedMessage(_decode_text(data, data_coding), reference, total, number)


def _concatenation(header: bytes) -> tuple[int | None, int, int]:
    """Find the concatenation element (8-bit 0x00 or 16-bit 0x08 reference) in a UDH."""
    position = 0
    while position + 2 <= len(header):
        element, length = header[position], header[position + 1]
        value = header[position + 2 : position + 2 + length]
        if element == 0x00 and length == 3 and len(value) == 3:
            return value[0], value[1], value[2]
        if element == 0x08 and length == 4 and len(value) == 4:
            return int.from_bytes(value[:2], "big"), value[2], value[3]
        position += 2 + length
    return None, 1, 1


def _decode_text(data: bytes, data_coding: int) -> str:
    if data_coding == DATA_CODING_UCS2:
        return data.decode("utf-16-be", errors="replace")
    if data_coding == DATA_CODING_DEFAULT and all(octet < 0x80 for octet in data):
        return gsm7_decode(data)
    if data_coding == DATA_CODING_IA5:
        return data.decode("ascii", errors="replace")
    # Latin-1 (3), and the best guess for anything else: it never fails and loses nothing.
    return data.decode("latin-1")


# The fields of the de-facto standard receipt text (SMPP 3.4 appendix B); `text` is last and
# may contain anything, so it takes the rest of the string.
_DLR_FIELD: Final = re.compile(
    r"(?<!\S)(id|sub|dlvrd|submit date|done date|stat|err|text):", re.IGNORECASE
)


def parse_receipt_text(text: str) -> dict[str, str]:
    """Return the fields of a receipt text (`id:... sub:... dlvrd:... stat:... err:... text:...`).

    Keys are lower case; values are stripped; fields that are absent are absent from the result.
    """
    fields: dict[str, str] = {}
    matches = list(_DLR_FIELD.finditer(text))
    for index, match in enumerate(matches):
        key = match.group(1).lower()
        if key == "text":
            fields[key] = text[match.end() :].strip()
            break
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        fields.setdefault(key, text[match.end() : end].strip())
    return fields


# `stat` words of the receipt text. ACCEPTD is, in practice, an intermediate "taken by the
# SMSC" notice at many providers, so it is not read as delivered.
RECEIPT_STATS: Final = {
    "DELIVRD": ReceiptStatus.DELIVERED,
    "ACCEPTD": ReceiptStatus.SENT,
    "ENROUTE": ReceiptStatus.SENT,
    "EXPIRED": ReceiptStatus.UNDELIVERED,
    "UNDELIV": ReceiptStatus.UNDELIVERED,
    "UNKNOWN": ReceiptStatus.UNDELIVERED,
    "DELETED": ReceiptStatus.FAILED,
    "REJECTD": ReceiptStatus.FAILED,
}

# The message_state TLV (SMPP 3.4 section 5.2.28), mapped like the words above.
MESSAGE_STATES: Final = {
    1: ("ENROUTE", ReceiptStatus.SENT),
    2: ("DELIVRD", ReceiptStatus.DELIVERED),
    3: ("EXPIRED", ReceiptStatus.UNDELIVERED),
    4: ("DELETED", ReceiptStatus.FAILED),
    5: ("UNDELIV", ReceiptStatus.UNDELIVERED),
    6: ("ACCEPTD", ReceiptStatus.SENT),
    7: ("UNKNOWN", ReceiptStatus.UNDELIVERED),
    8: ("REJECTD", ReceiptStatus.FAILED),
}
