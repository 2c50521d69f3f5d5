"""The Twilio-compatible fake (tests/peers/twilio_server.py) as a subprocess, for the benchmarks."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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
