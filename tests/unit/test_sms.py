"""SMS encoding, segment counting, composition and cost."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dispatcher.sms import TWILIO_MAX_SEGMENTS, SmsInfo, analyse, compose, estimate_cost

THEME = "抓质量水平提升\u3000促发展方式转变"
SIGNATURE = "【国家质检总局】"
UNSUBSCRIBE = "回T退订"


def test_empty_text_is_one_gsm_segment_of_zero_units() -> None:
    assert analyse("") == SmsInfo("GSM-7", 0, 1, 160)


@pytest.mark.parametrize(
    ("length", "segments", "per_segment"),
    [
        (1, 1, 160),
        (160, 1, 160),
        (161, 2, 153),
        (306, 2, 153),
        (307, 3, 153),
        (459, 3, 153),
        (460, 4, 153),
        (153 * 10, 10, 153),
        (153 * 10 + 1, 11, 153),
    ],
)
def test_gsm7_segment_boundaries(length: int, segments: int, per_segment: int) -> None:
    assert analyse("a" * length) == SmsInfo("GSM-7", length, segments, per_segment)


@pytest.mark.parametrize(
    ("length", "segments", "per_segment"),
    [
        (1, 1, 70),
        (70, 1, 70),
        (71, 2, 67),
        (134, 2, 67),
        (135, 3, 67),
        (201, 3, 67),
        (202, 4, 67),
    ],
)
def test_ucs2_segment_boundaries(length: int, segments: int, per_segment: int) -> None:
    assert analyse("质" * length) == SmsInfo("UCS-2", length, segments, per_segment)


def test_gsm7_alphabet_includes_accented_letters_of_the_basic_table() -> None:
    text = "Qualité: 12€ à Zürich, Ñandù {ok} [x] ~ | ^ \\ @£$¥§¿¡ΔΦΓΛΩΠΨΣΘΞ\n"
    info = analyse(text)
    assert info.encoding == "GSM-7"
    # € { } [ ] ~ | ^ \ are extension characters: one escape septet each on top.
    assert info.units == len(text) + 9


@pytest.mark.parametrize("char", ["ç", "中", "\x1b", "`", "😀", "’"])
def test_a_character_outside_gsm_03_38_makes_the_text_ucs2(char: str) -> None:
    assert analyse(f"Quality month {char}").encoding == "UCS-2"


def test_extension_characters_and_form_feed_count_two_septets() -> None:
    assert analyse("€" * 80) == SmsInfo("GSM-7", 160, 1, 160)
    assert analyse("\x0c" * 80 + "a") == SmsInfo("GSM-7", 161, 2, 153)


def test_an_escape_pair_is_never_split_across_segments() -> None:
    # 152 septets, then a 2-septet "€" that does not fit the 1 septet left in segment 1:
    # it opens segment 2, which then overflows by one septet into segment 3.
    text = "a" * 152 + "€" + "a" * 152
    assert analyse(text) == SmsInfo("GSM-7", 306, 3, 153)
    # The same units with the escape pair inside a segment fit in two.
    assert analyse("€" + "a" * 304).segments == 2


def test_an_emoji_counts_two_units_and_its_surrogate_pair_is_never_split() -> None:
    assert analyse("😀") == SmsInfo("UCS-2", 2, 1, 70)
    assert analyse("质" * 68 + "😀") == SmsInfo("UCS-2", 70, 1, 70)
    text = "质" * 66 + "😀" + "质" * 66
    assert analyse(text) == SmsInfo("UCS-2", 134, 3, 67)
    assert analyse("😀" + "质" * 132).segments == 2


def _reference_segments(text: str) -> int:
    """Split the encoded bytes into segments, stepping back over a split pair."""
    if analyse(text).encoding == "GSM-7":
        # One symbol per septet: "E" marks an escape septet, which must not end a segment.
        units = "".join("Ex" if c in "\x0c^{}\\[~]|€" else "x" for c in text)
        single, capacity, pair_start = 160, 153, "E"
    else:
        encoded = text.encode("utf-16-le")
        code_units = [
            int.from_bytes(encoded[i : i + 2], "little") for i in range(0, len(encoded), 2)
        ]
        units = "".join("H" if 0xD800 <= u <= 0xDBFF else "x" for u in code_units)
        single, capacity, pair_start = 70, 67, "H"
    if len(units) <= single:
        return 1
    segments = 0
    while units:
        cut = capacity
        if cut < len(units) and units[cut - 1] == pair_start:
            cut -= 1
        units = units[cut:]
        segments += 1
    return segments


@given(
    st.text(
        alphabet=st.sampled_from(["a", " ", "€", "[", "\x0c", "质", "😀", "é", "ç"]),
        max_size=500,
    )
)
@example("a" * 152 + "€" + "a" * 152)
@example("质" * 66 + "😀" + "质" * 66)
def test_segment_count_matches_splitting_the_encoded_message(text: str) -> None:
    info = analyse(text)
    assert info.segments == _reference_segments(text)
    assert info.segments * info.chars_per_segment >= info.units


def test_a_chinese_slogan_sms_with_signature_and_suffix() -> None:
    text = compose(f"  {THEME}  ", signature=SIGNATURE, unsubscribe=UNSUBSCRIBE)
    assert text == "【国家质检总局】抓质量水平提升\u3000促发展方式转变 回T退订"
    assert analyse(text) == SmsInfo("UCS-2", 28, 1, 70)

    body = (
        "9月是全国“质量月”，本月主题：抓质量水平提升\u3000促发展方式转变。"
        "质量投诉举报请拨打12365，更多活动信息请关注国家质检总局网站质量月专栏。"
    )
    long_text = compose(body, signature=SIGNATURE, unsubscribe=UNSUBSCRIBE)
    assert analyse(long_text) == SmsInfo("UCS-2", len(long_text), 2, 67)
    assert 70 < len(long_text) <= 134


def test_compose_prepends_the_signature_without_doubling_it() -> None:
    assert compose("您好", signature=SIGNATURE) == "【国家质检总局】您好"
    assert compose("【国家质检总局】您好", signature=SIGNATURE) == "【国家质检总局】您好"


def test_compose_appends_the_unsubscribe_suffix_once_after_one_space() -> None:
    assert compose("您好\n", unsubscribe=UNSUBSCRIBE) == "您好 回T退订"
    assert compose("您好，回T退订", unsubscribe=UNSUBSCRIBE) == "您好，回T退订"
    assert compose("", unsubscribe=UNSUBSCRIBE) == "回T退订"


def test_compose_without_signature_or_suffix_only_strips_the_body() -> None:
    assert compose("\t Reply STOP to opt out \n") == "Reply STOP to opt out"
    assert compose(" hi ", signature="", unsubscribe="") == "hi"


def test_estimate_cost_is_exact_in_decimal() -> None:
    assert estimate_cost(3, Decimal("0.055")) == Decimal("0.165")
    assert estimate_cost(0, Decimal("0.05")) == Decimal("0")
    assert estimate_cost(1_000_000, Decimal("0.01")) == Decimal("10000.00")
    with pytest.raises(ValueError, match="negative"):
        estimate_cost(-1, Decimal("0.05"))


def test_twilio_limit_is_ten_segments_of_concatenated_text() -> None:
    assert analyse("a" * 153 * TWILIO_MAX_SEGMENTS).segments == TWILIO_MAX_SEGMENTS
    assert analyse("a" * (153 * TWILIO_MAX_SEGMENTS + 1)).segments > TWILIO_MAX_SEGMENTS
