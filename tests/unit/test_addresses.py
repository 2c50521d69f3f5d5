"""Phone and e-mail normalisation, rejection reasons and masking."""

from __future__ import annotations

import random

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phonenumbers import PhoneNumberType

from dispatcher.addresses import (
    InvalidAddress,
    mask_address,
    normalise,
    normalise_email,
    normalise_phone,
)

E164 = "+8613800138000"


@pytest.mark.parametrize(
    "raw",
    [
        "13800138000",
        "138 0013 8000",
        "138-0013-8000",
        "+86-138-0013-8000",
        "+86 138 0013 8000",
        "008613800138000",
        "86 13800138000",
        "8613800138000",
        "１３８００１３８０００",  # full-width digits
        "＋８６　１３８－００１３－８０００",  # full-width plus, dashes, ideographic space
        "(+86) 138-0013-8000",
        "（＋86）138 0013 8000",  # full-width parentheses
        "138\t0013\t8000",
        "138\u00a00013\u00a08000",  # no-break spaces
        "138\u30000013\u30008000",  # ideographic spaces
        "  13800138000  ",
        "13800138000.0",  # Excel's number export
        "8613800138000.0",
        "138.0013.8000",
        "138–0013–8000",  # en dashes from a word processor
    ],
)
def test_messy_forms_of_one_mobile_normalise_to_e164(raw: str) -> None:
    assert normalise_phone(raw) == E164


def test_another_country_with_plus_is_kept() -> None:
    assert normalise_phone("+44 7911 123456") == "+447911123456"


def test_fixed_line_or_mobile_counts_as_mobile() -> None:
    # US numbers cannot be told apart: phonenumbers calls them FIXED_LINE_OR_MOBILE.
    parsed = phonenumbers.parse("+1 202 555 0143")
    assert phonenumbers.number_type(parsed) == PhoneNumberType.FIXED_LINE_OR_MOBILE
    assert normalise_phone("+1 202-555-0143") == "+12025550143"


def test_region_decides_numbers_without_country_code() -> None:
    assert normalise_phone("07911 123456", "GB") == "+447911123456"
    assert normalise_phone("07911 123456", "gb") == "+447911123456"


@pytest.mark.parametrize("raw", ["010 6521 3456", "010-65213456", "+86 21 6287 5500"])
def test_landlines_are_rejected_when_mobile_only(raw: str) -> None:
    with pytest.raises(
        InvalidAddress, match=r"landline, not a mobile number \(SMS needs a mobile\)"
    ):
        normalise_phone(raw)


def test_landline_is_accepted_when_not_mobile_only() -> None:
    assert normalise_phone("010 6521 3456", mobile_only=False) == "+861065213456"


def test_other_non_mobile_types_say_what_they_are() -> None:
    with pytest.raises(InvalidAddress, match=r"^shared-cost number, not a mobile number"):
        normalise_phone("400 812 3456")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("\u3000", "empty"),
        ("--", "empty"),
        ("12", r"too short \(2 digits\)"),
        ("7", r"too short \(1 digit\)"),
        ("12345", "too short"),
        ("1380013800", "not a valid number for region CN"),
        ("1380013", "not a valid number for region CN"),
        ("13800138000123456789", "too long"),
        ("abc", "'a', which is not part of a phone number"),
        ("138 0013 8000 ext 12", "'e', which is not part of a phone number"),
        ("138+00138000", r"'\+' in the middle"),
        ("+999 1234 5678", "unknown country code"),
    ],
)
def test_invalid_numbers_are_rejected_with_a_reason(raw: str, reason: str) -> None:
    with pytest.raises(InvalidAddress, match=reason):
        normalise_phone(raw)


@pytest.mark.parametrize("raw", ["1.38001E+10", "1.38001e+10", "1.3800138E10"])
def test_scientific_notation_from_excel_is_rejected_as_lossy(raw: str) -> None:
    with pytest.raises(InvalidAddress) as caught:
        normalise_phone(raw)
    assert "exported as a number in scientific notation" in str(caught.value)
    assert "format the column as text" in caught.value.reason


def test_invalid_address_is_a_value_error_with_its_reason() -> None:
    with pytest.raises(ValueError) as caught:
        normalise_phone("")
    assert isinstance(caught.value, InvalidAddress)
    assert caught.value.reason == "empty" == str(caught.value)


def test_unknown_region_is_a_plain_value_error_not_a_bad_address() -> None:
    with pytest.raises(ValueError, match="unknown phone region") as caught:
        normalise_phone("13800138000", "XX")
    assert not isinstance(caught.value, InvalidAddress)


def test_country_code_without_plus_only_when_the_rest_is_a_mobile() -> None:
    assert normalise_phone("86 13912345678") == "+8613912345678"
    # 13 digits that are not 86 + a mobile are read as typed, and refused.
    with pytest.raises(InvalidAddress):
        normalise_phone("8601065213456")


# The fast path (clean 11-digit CN mobiles skip phonenumbers.parse) must give exactly what
# phonenumbers gives. Reference: the library's own parse / validity / type / format.
def _phonenumbers_verdict(raw: str) -> str:
    try:
        parsed = phonenumbers.parse(raw, "CN")
    except phonenumbers.NumberParseException:
        return "invalid"
    if not phonenumbers.is_valid_number(parsed):
        return "invalid"
    if phonenumbers.number_type(parsed) not in (
        PhoneNumberType.MOBILE,
        PhoneNumberType.FIXED_LINE_OR_MOBILE,
    ):
        return "not mobile"
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def _our_verdict(raw: str) -> str:
    try:
        return normalise_phone(raw)
    except InvalidAddress as exc:
        return "not mobile" if "not a mobile number" in exc.reason else "invalid"


def _slow_path(raw: str) -> str:
    # A leading space does not match the fast path's pattern, so this runs the full path.
    try:
        return normalise_phone(" " + raw)
    except InvalidAddress as exc:
        return f"rejected: {exc.reason}"


def _fast_path(raw: str) -> str:
    try:
        return normalise_phone(raw)
    except InvalidAddress as exc:
        return f"rejected: {exc.reason}"


def test_fast_path_agrees_with_phonenumbers_on_every_four_digit_prefix() -> None:
    rng = random.Random(2010)
    checked = 0
    outcomes: set[str] = set()
    for prefix in range(1300, 2000):
        for _ in range(6):
            raw = f"{prefix}{rng.randrange(10**7):07d}"
            verdict = _phonenumbers_verdict(raw)
            assert _our_verdict(raw) == verdict, raw
            assert _fast_path(raw) == _slow_path(raw), raw
            outcomes.add(verdict if verdict in ("invalid", "not mobile") else "valid")
            checked += 1
    assert checked == 4200
    # The sample covers accepted and refused numbers, so the comparison means something.
    assert outcomes == {"valid", "invalid"}


@settings(max_examples=400, deadline=None)
@given(st.from_regex(r"1[0-9]{10}", fullmatch=True))
def test_fast_path_agrees_with_phonenumbers_on_any_eleven_digits(raw: str) -> None:
    assert _our_verdict(raw) == _phonenumbers_verdict(raw)
    assert _fast_path(raw) == _slow_path(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("zhang.san@example.com", "zhang.san@example.com"),
        ("  Zhang.San@Example.COM ", "Zhang.San@example.com"),  # local part kept as is
        ("ｌｉ＠ｅｘａｍｐｌｅ．ｏｒｇ", "li@example.org"),  # full-width, NFKC
        ("huang.min+qm@acfic.example.org", "huang.min+qm@acfic.example.org"),
        ("office@QM2010.example.cn.", "office@qm2010.example.cn"),
        ("用户@例子.广告", "用户@例子.广告"),  # internationalised domain, IDNA-encodable
    ],
)
def test_valid_emails_normalise(raw: str, expected: str) -> None:
    assert normalise_email(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        ("zhang.example.com", "no '@'"),
        ("a@b@example.com", "more than one '@'"),
        ("zhang san@example.com", "contains spaces"),
        ("@example.com", "nothing before the '@'"),
        ("zhang@", "nothing after the '@'"),
        ("zhang@localhost", "has no dot"),
        ("zhang..san@example.com", "wrong places"),
        (".zhang@example.com", "wrong places"),
        ("zhang@exa_mple.com", "not a valid host name"),
        ("zhang@-example.com", "not a valid host name"),
        ("zhang@example..com", "not a valid host name"),
        ("zhang@10.0.0.1", "not a valid host name"),
        ("zhang@" + "a" * 64 + ".com", "not a valid host name"),
        ("x" * 65 + "@example.com", "longer than 64"),
    ],
)
def test_invalid_emails_are_rejected_with_a_reason(raw: str, reason: str) -> None:
    with pytest.raises(InvalidAddress, match=reason):
        normalise_email(raw)


@pytest.mark.parametrize(
    ("address", "masked"),
    [
        ("+8613800138000", "+86138****8000"),
        ("+447911123456", "+4479*****456"),  # 10 national digits: hide at least half
        ("+12025550143", "+120*****143"),
        ("+3361234567", "+3361****67"),
        ("+4412", "+44*2"),
        ("zhang.san@example.com", "z***@example.com"),
        ("a@example.org", "a***@example.org"),
        ("138 0013 8000", "***********00"),
        ("abcd", "****"),
        ("", ""),
    ],
)
def test_masking(address: str, masked: str) -> None:
    assert mask_address(address) == masked


def test_masked_mobile_hides_the_middle_digits() -> None:
    masked = mask_address(normalise_phone("139 1234 5678"))
    assert masked == "+86139****5678"
    assert "1234" not in masked


def test_normalise_dispatches_on_kind() -> None:
    assert normalise("138 0013 8000", "phone", "CN") == E164
    assert normalise("Li@Example.ORG", "email", "CN") == "Li@example.org"
    with pytest.raises(InvalidAddress, match="landline"):
        normalise("010 6521 3456", "phone", "CN")
    with pytest.raises(ValueError, match="unknown address kind"):
        normalise("x", "fax", "CN")  # type: ignore[arg-type]
