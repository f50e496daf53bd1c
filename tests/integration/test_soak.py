"""`bench/soak.py` in a tiny mode: its JSON has the figures, and what the server must not leave behind it did not
(speed and memory targets are the benchmark's, not asserted here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def run_soak(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """The soak in its own process group: on a timeout the script and its server go together."""
    p = subprocess.Popen([sys.executable, str(SOAK), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"the soak did not finish within {timeout:.0f} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_tiny_soak_answers_everything_and_leaves_nothing_behind(tiny_dirs, tmp_path):
    out = tmp_path / "soak.json"
    r = run_soak(["--model", str(tiny_dirs("qwen2_vl")), "--device", "cpu", "--requests", "12", "--users", "3",
                  "--min-seconds", "15", "--ttl", "5", "--sample-s", "3", "--rotate", "2", "--work",
                  str(tmp_path / "work"), "--out", str(out), "--quiet"], timeout=270)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "targets:" in r.stdout  # the human summary

    # the figures are there
    for key in ("config", "requests", "wall_s", "rss_mb", "tmp", "left_behind", "server_log", "targets", "series"):
        assert key in data, key
    for key in ("start", "after_warmup", "end", "max", "growth_mb", "slope_last_half_mb_per_min"):
        assert key in data["rss_mb"], key
    assert all(isinstance(data["rss_mb"][k], float) and data["rss_mb"][k] > 0 for k in ("after_warmup", "end", "max"))
    assert len(data["series"]) >= 3 and all(s["rss_mb"] > 0 for s in data["series"])
    assert set(data["targets"]) >= {"rss_growth_under_100mb", "rss_not_rising", "no_files_of_closed_sessions",
                                    "no_hooks_left", "no_pair_threads_left", "lock_free", "all_answered"}
    assert all(isinstance(v, bool) for v in data["targets"].values())
    assert data["wall_s"] >= 15

    # every request answered, or refused with a message (the one above the token limit)
    q = data["requests"]
    assert q["done"] == 12 and q["answered"] + q["failed"] + q["over_limit"]["asked"] == 12
    assert q["failed"] == 0, q["errors"]
    assert q["over_limit"] == {"asked": 1, "refused_with_limit": 1}
    assert q["by_endpoint_ok"].get("explore", 0) >= 1 and q["by_endpoint_ok"].get("export", 0) >= 1

    # nothing left behind once every client closed and the time to live passed
    left = data["left_behind"]
    assert left["lock_held"]["end"] is False and left["runs"]["end"] == 0
    assert left["pair_threads"]["end"] == 0 and left["hooks"]["end"] == left["hooks"]["start"]
    closed = data["tmp"]["of_closed_sessions"]
    assert closed["closed_sessions"] > 3  # each user's last client, and new ones every 2 requests
    assert closed["exports_written"] >= 1 and closed["exports_in_session_folder"] == closed["exports_written"]
    assert closed["files_left"] == 0 and closed["exports_left"] == 0
    assert data["tmp"]["session_folders_end"] == 0
    assert data["server_log"]["tracebacks"] == 0, data["server_log"]
