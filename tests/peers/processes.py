"""Peers and daemons as subprocesses for the tests: output in files, stopped on close."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

from tests.conftest import REPO, wait_for


def process_env(database_url: str | None = None) -> dict[str, str]:
    """This process's environment for a child, without DISPATCHER_* and TWILIO_* variables.

    The SDK and the CLI read those; `database_url`, when given, is passed on instead.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "TWILIO_"))}
    env["PYTHONUNBUFFERED"] = "1"
    if database_url is not None:
        env["DISPATCHER_DATABASE_URL"] = database_url
    return env


class Process:
    """A subprocess with its output in files (no pipe can fill up), stopped on close."""

    def __init__(
        self, args: list[str], cwd: Path, name: str, env: dict[str, str], logs: Path
    ) -> None:
        self.name = name
        self.stdout_path = logs / f"{name}.out"
        self.stderr_path = logs / f"{name}.err"
        self._out: IO[bytes] = self.stdout_path.open("wb")
        self._err: IO[bytes] = self.stderr_path.open("wb")
        self.process = subprocess.Popen(args, cwd=cwd, env=env, stdout=self._out, stderr=self._err)

    @property
    def output(self) -> str:
        return self.stdout_path.read_text(
            encoding="utf-8", errors="replace"
        ) + self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int, timeout: float = 60) -> int:
        """Send `sig` and wait for the exit status."""
        self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._out.close()
        self._err.close()


def start_twilio(
    tmp_path: Path, record: Path, *, sid: str, token: str, latency_ms: float = 0
) -> tuple[Process, int]:
    """The Twilio-compatible fake as a subprocess; returns it and its port."""
    fake = Process(
        [
            sys.executable,
            "-m",
            "tests.peers.twilio_server",
            "--port",
            "0",
            "--print-port",
            "--account",
            f"{sid}:{token}",
            "--latency-ms",
            str(latency_ms),
            "--record",
            str(record),
        ],
        cwd=REPO,  # so that `tests.peers` imports
        name="twilio",
        env=process_env(),
        logs=tmp_path,
    )
    wait_for(
        lambda: fake.stdout_path.read_text().strip() != "" or not fake.alive(),
        30,
        "the Twilio fake to print its port",
    )
    assert fake.alive(), f"the Twilio fake exited early:\n{fake.output}"
    # The fake stamps each message's arrival (rate caps are checked on those stamps) when its
    # handler starts: on a machine saturated by the daemons under test, a fake that waits for
    # the CPU stamps late and in bunches. A real provider's front end is not starved by its
    # clients, so the fake gets the CPU first where this process may grant it (as root).
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, fake.process.pid, -10)
    return fake, int(fake.stdout_path.read_text().split()[0])


def read_records(path: Path) -> list[dict[str, Any]]:
    """The fake's complete record lines (a line still being written is left out)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def count_records(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0
