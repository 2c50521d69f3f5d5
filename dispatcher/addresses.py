"""Address normalisation: messy phone numbers to E.164, e-mail addresses to one form, masking.

Pure functions of their inputs. Every rejection is an `InvalidAddress` whose message is the
reason an operator reads next to the (masked) value, so reasons say what is wrong and, where
it helps, what to do about it.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final, Literal

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumber, PhoneNumberType, ValidationResult

__all__ = [
    "InvalidAddress",
    "mask_address",
    "normalise",
    "normalise_email",
    "normalise_phone",
]


class InvalidAddress(ValueError):
    """An address that cannot be used; `str()` is the human reason (e.g. "too short")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Both kinds of CN mobile count: phonenumbers says FIXED_LINE_OR_MOBILE where the ranges overlap.
_MOBILE_TYPES: Final = frozenset({PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE})

_TYPE_NAMES: Final[dict[int, str]] = {
    PhoneNumberType.TOLL_FREE: "toll-free",
    PhoneNumberType.PREMIUM_RATE: "premium-rate",
    PhoneNumberType.SHARED_COST: "shared-cost",
    PhoneNumberType.VOIP: "VoIP",
    PhoneNumberType.PERSONAL_NUMBER: "personal",
    PhoneNumberType.PAGER: "pager",
    PhoneNumberType.UAN: "UAN",
    PhoneNumberType.VOICEMAIL: "voicemail",
}

# The common clean form of a CN mobile, handled without phonenumbers.parse (the costly part).
# 11x/12x/179xx are CN carrier-selection prefixes that parse() may strip, so they take the
# full path; tests/unit/test_addresses.py proves the fast path agrees with phonenumbers.
_FAST_CN_MOBILE: Final = re.compile(r"(?!179)1[3-9][0-9]{9}")

# Excel writes a number cell as 1.38001E+10 once it is wider than the column: digits are lost.
_SCIENTIFIC: Final = re.compile(r"[+-]?[0-9]+(?:\.[0-9]*)?[eE][+-]?[0-9]+")
# Excel (and pandas) turn a number cell into 13800138000.0 on export.
_EXCEL_FLOAT: Final = re.compile(r"(\+?[0-9]+)\.0+")
# Characters people put between digits; anything else (letters, "ext", "#") is refused.
_SEPARATORS: Final = frozenset(" \t\r\n-.()/\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u30fc")
_DIGITS: Final = frozenset("0123456789")

_MOBILE_ONLY_HINT: Final = "not a mobile number (SMS needs a mobile)"


def normalise_phone(raw: str, region: str = "CN", *, mobile_only: bool = True) -> str:
    """Return `raw` as an E.164 number (`+8613800138000`) or raise `InvalidAddress` with why.

    `region` is the ISO 3166 code assumed for numbers written without a country code. With
    `mobile_only`, landlines and other non-mobile numbers are refused, since SMS needs a
    mobile. An unknown `region` is a programming or configuration error: `ValueError`.
    """
    region = region.upper()
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"unknown phone region {region!r} (expected an ISO code such as 'CN')")
    if region == "CN" and _FAST_CN_MOBILE.fullmatch(raw):
        number = PhoneNumber(country_code=86, national_number=int(raw))
        # +86 belongs to one region only, so "valid" is exactly "has a type": one metadata
        # walk instead of two (is_valid_number + number_type), the bulk of the cost here.
        kind = phonenumbers.number_type(number)
        if kind in _MOBILE_TYPES:
            return "+86" + raw
        return _accept(number, mobile_only)
    plus, digits = _clean_phone(raw)
    if not plus and region == "CN" and len(digits) == 13 and digits.startswith("86"):
        # "86 13800138000": Excel drops the "+", so a 13-digit 86... string whose remainder is
        # a valid mobile is the country code, not the start of a national number.
        candidate = PhoneNumber(country_code=86, national_number=int(digits[2:]))
        if phonenumbers.is_valid_number(candidate) and _is_mobile(candidate):
            return _accept(candidate, mobile_only)
    return _accept(_parse(("+" if plus else "") + digits, region), mobile_only)


def _clean_phone(raw: str) -> tuple[bool, str]:
    """Split `raw` into (had a leading "+", its ASCII digits), refusing what is not a number."""
    # NFKC turns full-width digits, "＋", "（", NBSP and the ideographic space into ASCII.
    text = unicodedata.normalize("NFKC", raw).strip()
    if not text:
        raise InvalidAddress("empty")
    if _SCIENTIFIC.fullmatch(text):
        raise InvalidAddress(
            f"the cell was exported as a number in scientific notation ({text}), which lost "
            "digits: format the column as text in Excel and export again"
        )
    excel_float = _EXCEL_FLOAT.fullmatch(text)
    if excel_float:
        text = excel_float.group(1)
    plus = False
    digits: list[str] = []
    for char in text:
        if char in _DIGITS:
            digits.append(char)
        elif char == "+":
            if plus or digits:
                raise InvalidAddress("'+' in the middle of the number")
            plus = True
        elif char in _SEPARATORS or char.isspace():
            continue
        else:
            # Other scripts' decimal digits (e.g. Arabic-Indic) are still digits.
            value = unicodedata.decimal(char, None)
            if value is None:
                raise InvalidAddress(f"contains {char!r}, which is not part of a phone number")
            digits.append(str(value))
    if not digits:
        raise InvalidAddress("empty" if not plus else "no digits after '+'")
    if len(digits) < 3:
        raise InvalidAddress(f"too short ({_digits(len(digits))})")
    return plus, "".join(digits)


def _parse(number: str, region: str) -> PhoneNumber:
    try:
        parsed = phonenumbers.parse(number, region)
    except NumberParseException as exc:
        raise InvalidAddress(_parse_failure(exc, number)) from None
    digit_count = len(phonenumbers.national_significant_number(parsed))
    possible = phonenumbers.is_possible_number_with_reason(parsed)
    if possible == ValidationResult.TOO_SHORT:
        raise InvalidAddress(f"too short ({_digits(digit_count)})")
    if possible == ValidationResult.IS_POSSIBLE_LOCAL_ONLY:
        # Dialable only inside one area (a landline without its area code): not reachable.
        raise InvalidAddress(f"too short for a full number ({_digits(digit_count)})")
    if possible == ValidationResult.TOO_LONG:
        raise InvalidAddress(f"too long ({_digits(digit_count)})")
    if possible == ValidationResult.INVALID_COUNTRY_CODE:
        raise InvalidAddress(f"unknown country code +{parsed.country_code}")
    if possible == ValidationResult.INVALID_LENGTH:
        raise InvalidAddress(
            f"wrong number of digits ({digit_count}) for region {_region_of(parsed)}"
        )
    return parsed


def _digits(count: int) -> str:
    return f"{count} digit" if count == 1 else f"{count} digits"


def _parse_failure(exc: NumberParseException, number: str) -> str:
    kind = exc.error_type
    if kind == NumberParseException.INVALID_COUNTRY_CODE:
        return "unknown country code" if number.startswith("+") else "not a phone number"
    if kind in (NumberParseException.TOO_SHORT_NSN, NumberParseException.TOO_SHORT_AFTER_IDD):
        return "too short"
    if kind == NumberParseException.TOO_LONG:
        return "too long"
    return "not a phone number"


def _region_of(number: PhoneNumber) -> str:
    country_code = number.country_code or 0
    region = phonenumbers.region_code_for_country_code(country_code)
    return region if region != "ZZ" else f"+{country_code}"


def _is_mobile(number: PhoneNumber) -> bool:
    return phonenumbers.number_type(number) in _MOBILE_TYPES


def _accept(number: PhoneNumber, mobile_only: bool) -> str:
    """Return `number` in E.164 if it is valid (and a mobile when required)."""
    if not phonenumbers.is_valid_number(number):
        raise InvalidAddress(f"not a valid number for region {_region_of(number)}")
    if mobile_only:
        kind = phonenumbers.number_type(number)
        if kind == PhoneNumberType.FIXED_LINE:
            raise InvalidAddress(f"landline, {_MOBILE_ONLY_HINT}")
        if kind not in _MOBILE_TYPES:
            raise InvalidAddress(f"{_TYPE_NAMES.get(kind, 'special')} number, {_MOBILE_ONLY_HINT}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# RFC 5322 atoms, relaxed to any non-ASCII character so internationalised local parts pass.
_ATOM: Final = r"[^\s\x00-\x1f\x7f@\"(),:;<>\[\]\\.]+"
_LOCAL_PART: Final = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def normalise_email(raw: str) -> str:
    """Return `raw` as `local@domain` (domain lower-cased, local part kept) or raise why not."""
    text = unicodedata.normalize("NFKC", raw).strip()
    if not text:
        raise InvalidAddress("empty")
    if any(char.isspace() for char in text):
        raise InvalidAddress("contains spaces")
    at_count = text.count("@")
    if at_count == 0:
        raise InvalidAddress("no '@'")
    if at_count > 1:
        raise InvalidAddress("more than one '@'")
    local, _, domain = text.partition("@")
    if not local:
        raise InvalidAddress("nothing before the '@'")
    if len(local) > 64:
        raise InvalidAddress("the part before the '@' is longer than 64 characters")
    if not _LOCAL_PART.fullmatch(local):
        raise InvalidAddress("the part before the '@' has characters or dots in wrong places")
    domain = domain.lower().removesuffix(".")
    if not domain:
        raise InvalidAddress("nothing after the '@'")
    if "." not in domain:
        raise InvalidAddress(f"domain {domain!r} has no dot")
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidAddress(f"domain {domain!r} is not a valid host name") from None
    labels = ascii_domain.split(".")
    if (
        len(ascii_domain) > 253
        or not all(_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise InvalidAddress(f"domain {domain!r} is not a valid host name")
    return f"{local}@{domain}"


def normalise(raw: str, kind: Literal["phone", "email"], region: str = "CN") -> str:
    """Return `raw` normalised as a `kind` address (E.164 mobile or e-mail), or raise why not."""
    if kind == "phone":
        return normalise_phone(raw, region)
    if kind == "email":
        return normalise_email(raw)
    raise ValueError(f"unknown address kind {kind!r} (expected 'phone' or 'email')")


_E164: Final = re.compile(r"\+[0-9]{2,15}")


def mask_address(address: str) -> str:
    """Return `address` with most of it hidden, safe for logs and terminals.

    E.164 keeps the country code, the first 3 and the last 4 national digits
    (`+86138****8000`; shorter numbers keep fewer); e-mail keeps the first character and the
    domain (`z***@example.com`); anything else keeps its last 2 characters (nothing when it
    is 4 characters or fewer).
    """
    if _E164.fullmatch(address):
        country_code = _country_code_prefix(address[1:])
        return "+" + country_code + _mask_digits(address[1 + len(country_code) :])
    if "@" in address:
        local, _, domain = address.rpartition("@")
        return f"{local[:1]}***@{domain}"
    if len(address) <= 4:
        return "*" * len(address)
    return "*" * (len(address) - 2) + address[-2:]


def _country_code_prefix(digits: str) -> str:
    # Country codes are prefix-free, so the first match of length 1..3 is the code.
    for length in (1, 2, 3):
        if int(digits[:length]) in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            return digits[:length]
    return ""


def _mask_digits(digits: str) -> str:
    length = len(digits)
    if length >= 11:
        head, tail = 3, 4
    else:
        # Short numbers would be nearly all visible with 3 + 4: hide at least half instead.
        hidden = max(length - 7, (length + 1) // 2)
        visible = length - hidden
        tail = (visible + 1) // 2
        head = visible - tail
    hidden_count = length - head - tail
    return digits[:head] + "*" * hidden_count + (digits[length - tail :] if tail else "")
