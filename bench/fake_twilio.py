"""For the Twilio benchmarks: the Twilio-compatible fake as a subprocess, and their config."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def twilio_fake(
    account: str, token: str, *, latency_ms: float = 0, record: Path | None = None
) -> Iterator[str]:
    """Start the fake answering after `latency_ms`, recording to `record`; yield its base URL.

    Stopped with SIGTERM, so its record file is flushed and closed when this exits.
    """
    args = [
        sys.executable,
        "-m",
        "tests.peers.twilio_server",
        "--port",
        "0",
        "--print-port",
        "--account",
        f"{account}:{token}",
        "--latency-ms",
        str(latency_ms),
    ]
    if record is not None:
        args += ["--record", str(record)]
    proc = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip():
            raise SystemExit(f"the Twilio fake exited with status {proc.wait(10)}")
        yield f"http://127.0.0.1:{int(line)}"
    finally:
        proc.terminate()
        proc.wait(30)


#: The stage's template in both Twilio benchmarks; recipient i is named "r{i}".
TEMPLATE_PREFIX = "质量月宣传："


def write_twilio_config(
    folder: Path,
    base_url: str,
    *,
    account: str,
    token: str,
    sender: str,
    addresses: Iterable[str],
    concurrency: int,
    rate: float = 100_000,
    burst: int | None = None,
    rate_margin: str | None = None,
) -> Path:
    """Write an audience (`addresses`, recipient i named "r{i}") and a config with one twilio
    channel pointed at `base_url` and one stage firing today, sending all day."""
    audience = folder / "audience.csv"
    with audience.open("w", encoding="utf-8") as stream:
        stream.write("address,name\n")
        stream.writelines(f"{a},r{i}\n" for i, a in enumerate(addresses))
    optional = ""
    if burst is not None:
        optional += f"burst = {burst}\n"
    if rate_margin is not None:
        optional += f"rate_margin = {json.dumps(rate_margin)}\n"
    today = datetime.now(UTC).date()
    config = folder / "bench.toml"
    config.write_text(
        f"""
[dispatcher]
database = "sqlite:///{folder / "bench.db"}"
timezone = "UTC"
slogans = {json.dumps(str(REPO / "slogans"))}
campaigns = []

[engine]
poll_interval = "100ms"

[server]
enabled = false

[channels.sms]
type = "twilio"
rate = {rate}
{optional}concurrency = {concurrency}
account_sid = "{account}"
auth_token = "{token}"
from = "{sender}"
api_base = "{base_url}"
status_callback = false
max_connections = {concurrency}

[[campaign]]
[campaign.campaign]
id = "bench"
name = "bench"
timezone = "UTC"
start = {today - timedelta(days=1)}
end = {today + timedelta(days=1)}
send_window = {{ start = "00:00", end = "23:59:59.999999" }}

[campaign.audiences.people]
file = {json.dumps(str(audience))}
kind = "phone"
address_column = "address"
region = "CN"
columns = {{ name = "name" }}

[[campaign.stages]]
id = "blast"
channel = "sms"
audience = "people"
at = {today}T00:00:00
template = "{TEMPLATE_PREFIX}{{{{ name }}}}您好"
validity = "1d"
""",
        encoding="utf-8",
    )
    return config
