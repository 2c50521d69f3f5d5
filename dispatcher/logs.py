"""Logging set-up for the daemon: human or JSON lines on stdout, phone numbers always masked."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

from dispatcher.addresses import mask_address

# Anything that looks like an E.164 number, whatever module logged it (a provider library's
# debug line, an exception message), is masked before it leaves the process.
_E164 = re.compile(r"\+\d{8,15}")


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (SQLAlchemy appends the SQL and a link on later ones)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def mask_text(text: str) -> str:
    """Mask every E.164-looking number in `text`."""
    return _E164.sub(lambda m: mask_address(m.group(0)), text)


class MaskingFilter(logging.Filter):
    """Rewrites each record's message with phone numbers masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_text(message)
        if masked != message or record.args:
            record.msg, record.args = masked, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception type if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = record.exc_info[0].__name__
        return json.dumps(entry, ensure_ascii=False)


def configure(fmt: str = "human", level: str = "INFO") -> None:
    """Send dispatcher's logs to stdout in the chosen format."""
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(MaskingFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries chatter at INFO (every HTTP request, every job run): keep them at WARNING.
    noisy_loggers = (
        "apscheduler",
        "httpx",
        "twilio",
        "aiosqlite",
        "uvicorn.access",
        "smpplib",
        "alembic.runtime.plugins",  # a line per plugin at every start
    )
    for noisy in noisy_loggers:
        logging.getLogger(noisy).setLevel(logging.WARNING)
