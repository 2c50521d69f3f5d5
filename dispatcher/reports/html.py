"""The HTML report: one self-contained page (styles, charts and script inline; nothing fetched).

Charts are SVG drawn here, in Python, so the page shows them even with scripts off; the small
inline script only adds filtering of the recipients table and marks each chart as drawn once
the browser has laid it out (which the Chromium test checks). Every value reaches the page
through Jinja2 with autoescaping, so a provider's error text cannot inject markup.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape

from dispatcher.reports.queries import Counts, DeliveryRow, ReportSummary, Timeline
from dispatcher.reports.writers import percent, short_time, shown_address

TEMPLATE = "report.html.j2"

# (status, Chinese label, English label, colour) in the order the outcome bar stacks them.
STATUSES: tuple[tuple[str, str, str, str], ...] = (
    ("delivered", "已送达", "Delivered", "#2e8b57"),
    ("sent", "已发送（无回执）", "Sent, no receipt", "#7cc4a4"),
    ("failed", "失败", "Failed", "#c0392b"),
    ("suppressed", "未发送（退订等）", "Suppressed", "#8e8e8e"),
    ("unknown", "状态未知", "Unknown", "#e08e0b"),
    ("open", "处理中", "Still open", "#8fb3de"),
)
STATUS_LABELS = {s: (zh, en) for s, zh, en, _ in STATUSES} | {
    "pending": ("待发送", "Pending"),
    "claimed": ("已领取", "Claimed"),
    "sending": ("发送中", "Sending"),
}
# (step, the `Counts` field it shows, label, colour)
FUNNEL_STEPS = (
    ("materialised", "total", "生成 Materialised", "#5b7db1"),
    ("sent", "sent", "已发送 Sent", "#3c9d9b"),
    ("delivered", "delivered", "已送达 Delivered", "#2e8b57"),
)


@dataclass(frozen=True, slots=True)
class HtmlRow:
    """One recipient as the page shows it (address already masked or not)."""

    id: int
    stage: str
    channel: str
    address: str
    status: str
    status_label: str
    error: str
    attempts: int
    sent_at: str
    final_at: str


def _text(x: float, y: float, content: str, **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{escape(v)}"' for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}"{extra}>{escape(content)}</text>'


def funnel_svg(totals: Counts, width: int = 760) -> Markup:
    """Three bars (materialised, sent, delivered) and a bar of how every delivery ended."""
    label_w, bar_h, gap, right = 170, 30, 12, 150
    plot_w = width - label_w - right
    parts: list[str] = []
    y = 10.0
    total = totals.total
    for key, field, label, colour in FUNNEL_STEPS:
        count = getattr(totals, field)
        w = plot_w * count / total if total else 0
        parts.append(_text(label_w - 10, y + bar_h / 2 + 5, label, text_anchor="end"))
        parts.append(
            f'<rect class="funnel-bar" data-step="{key}" data-count="{count}" x="{label_w}" '
            f'y="{y:.1f}" width="{w:.1f}" height="{bar_h}" rx="3" fill="{colour}">'
            f"<title>{escape(label)}: {count:,}</title></rect>"
        )
        parts.append(
            _text(label_w + w + 8, y + bar_h / 2 + 5, f"{count:,}  ({percent(count, total)})")
        )
        y += bar_h + gap
    y += 8
    parts.append(_text(label_w - 10, y + bar_h / 2 + 5, "结果 Outcome", text_anchor="end"))
    x = float(label_w)
    legend_y = y + bar_h + 22
    legend_x = float(label_w)
    for status, zh, en, colour in STATUSES:
        count = totals.by_status[status]
        w = plot_w * count / total if total else 0
        parts.append(
            f'<rect class="outcome-seg" data-status="{status}" data-count="{count}" x="{x:.1f}" '
            f'y="{y:.1f}" width="{w:.1f}" height="{bar_h}" fill="{colour}">'
            f"<title>{escape(zh)} {escape(en)}: {count:,}</title></rect>"
        )
        x += w
        if count:
            parts.append(
                f'<rect x="{legend_x:.1f}" y="{legend_y - 10:.1f}" width="12" height="12" '
                f'fill="{colour}"/>'
            )
            label = f"{zh} {count:,}"
            parts.append(_text(legend_x + 16, legend_y, label))
            legend_x += 16 + 13 * len(label) + 14
    height = legend_y + 14
    return Markup(
        f'<svg class="chart" id="funnel-chart" role="img" aria-label="delivery funnel" '
        f'viewBox="0 0 {width} {height:.0f}" width="{width}" height="{height:.0f}" '
        f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'
    )


def _nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten at or above `value` (at least 1)."""
    if value <= 1:
        return 1
    power: int = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def _tick_step(slots: int, unit_step: timedelta) -> int:
    """How many slots between x-axis labels so that there are about six of them."""
    candidates = [1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720] if unit_step < timedelta(hours=1) \
        else [1, 2, 3, 6, 12, 24, 48, 72, 168, 336, 720]  # fmt: skip
    for candidate in candidates:
        if slots / candidate <= 7:
            return candidate
    return max(1, slots // 6)


def timeline_svg(timeline: Timeline, tz: ZoneInfo, width: int = 900) -> Markup:
    """Messages accepted per minute or hour, as bars on a time axis (gaps show as gaps)."""
    left, right, top, bottom, height = 56, 16, 14, 46, 280
    plot_w, plot_h = width - left - right, height - top - bottom
    if not timeline.buckets:
        return Markup(
            f'<svg class="chart" id="timeline-chart" role="img" aria-label="sends over time" '
            f'viewBox="0 0 {width} 60" width="{width}" height="60" '
            f'xmlns="http://www.w3.org/2000/svg">'
            f"{_text(left, 34, '尚无发送 No messages sent yet')}</svg>"
        )
    step = timeline.step
    first = timeline.buckets[0][0]
    slots = int((timeline.buckets[-1][0] - first) / step) + 1
    slot_w = plot_w / slots
    # Four gridline steps of a round size (1, 2 or 5 times a power of ten).
    peak = 4 * _nice_ceiling(math.ceil(max(n for _, n in timeline.buckets) / 4))
    parts: list[str] = []
    for i in range(5):
        value = peak * i / 4
        y = top + plot_h - plot_h * i / 4
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="#e3e6ea" stroke-width="1"/>'
        )
        label = f"{value:,.0f}"
        parts.append(_text(left - 6, y + 4, label, text_anchor="end", class_="tick"))
    gap = 1.0 if slot_w > 4 else 0.0
    for start, count in timeline.buckets:
        index = int((start - first) / step)
        h = plot_h * count / peak
        x = left + index * slot_w
        local = start.astimezone(tz)
        title = f"{local:%Y-%m-%d %H:%M} · {count:,}"
        parts.append(
            f'<rect class="time-bar" data-start="{local.isoformat()}" data-count="{count}" '
            f'x="{x + gap / 2:.2f}" y="{top + plot_h - h:.2f}" '
            f'width="{max(slot_w - gap, 1.0):.2f}" height="{h:.2f}" fill="#3c9d9b">'
            f"<title>{escape(title)}</title></rect>"
        )
    tick = _tick_step(slots, step)
    previous_day = None
    for index in range(0, slots + 1, tick):
        moment: datetime = (first + index * step).astimezone(tz)
        x = left + index * slot_w
        day = moment.date()
        label = f"{moment:%H:%M}" if day == previous_day else f"{moment:%m-%d %H:%M}"
        previous_day = day
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 5}" '
            f'stroke="#888"/>'
        )
        parts.append(_text(x, top + plot_h + 20, label, text_anchor="middle", class_="tick"))
    parts.append(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" '
        f'stroke="#888"/>'
    )
    return Markup(
        f'<svg class="chart" id="timeline-chart" role="img" aria-label="sends over time" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'
    )


def html_rows(rows: Sequence[DeliveryRow], *, unmasked: bool, tz: ZoneInfo) -> list[HtmlRow]:
    """Rows as the recipients table shows them."""
    out = []
    for row in rows:
        zh, en = STATUS_LABELS.get(row.status, (row.status, row.status))
        error = ": ".join(p for p in (row.error_code, row.error_reason or row.reason) if p)
        out.append(
            HtmlRow(
                id=row.id,
                stage=f"{row.campaign}/{row.stage}",
                channel=row.channel,
                address=shown_address(row.address, unmasked),
                status=row.status,
                status_label=f"{zh} {en}",
                error=error,
                attempts=row.attempts,
                sent_at=short_time(row.sent_at, tz),
                final_at=short_time(row.final_at, tz),
            )
        )
    return out


def render_report(
    summary: ReportSummary,
    rows: Sequence[DeliveryRow],
    *,
    tz: ZoneInfo,
    unmasked: bool,
    full_export: str,
    regions: int = 100,
) -> Iterator[str]:
    """The page, in chunks: summary numbers, charts, tables and up to `len(rows)` recipients.

    `full_export` is the command that writes every row to CSV, named where the table is cut.
    """
    env = Environment(
        loader=PackageLoader("dispatcher.reports", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    totals = summary.totals
    template = env.get_template(TEMPLATE)
    other_regions = sum((r.counts for r in summary.regions[regions:]), Counts())
    return template.generate(
        summary=summary,
        totals=totals,
        tz=tz.key,
        generated_at=short_time(summary.generated_at, tz),
        first_sent=short_time(summary.timeline.first_sent, tz),
        last_sent=short_time(summary.timeline.last_sent, tz),
        funnel_svg=funnel_svg(totals),
        timeline_svg=timeline_svg(summary.timeline, tz),
        statuses=STATUSES,
        status_labels=STATUS_LABELS,
        regions=summary.regions[:regions],
        other_regions=other_regions,
        other_region_count=max(0, len(summary.regions) - regions),
        rows=html_rows(rows, unmasked=unmasked, tz=tz),
        rows_total=totals.total,
        unmasked=unmasked,
        full_export=full_export,
        percent=percent,
    )
