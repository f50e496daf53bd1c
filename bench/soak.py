"""Soak: does one server stay up for a class? (issue 24)

usage: python bench/soak.py [--model DIR] [--state DIR] [--requests 200] [--users 8] [--min-seconds 600] [--ttl 60]
                            [--sample-s 10] [--out /tmp/soak.json]

    python bench/soak.py --out /tmp/soak.json                                   # the acceptance run (>= 10 minutes)
    python bench/soak.py --requests 24 --users 4 --min-seconds 60 --ttl 20      # a short try

Starts `app.py` as a subprocess (`--session-ttl`, `--tmp-dir` in a fresh work folder; by default on a tiny random
qwen2_vl model with a small fitted state, which takes images and videos), then `--users` threads, each a
`gradio_client.Client` of its own (a browser-like session), share `--requests` analyses paced over at least
`--min-seconds`: `/analyze` with a PNG or an MP4, and now and then the dashboard's `/explore` followed by `/export`
(a zip in that session's temporary folder). Every `--rotate` requests a user closes its client (the server must end
that session and drop its files) and opens a new one; a few requests ask for more tokens than the server allows and
must be refused with a message. Every `--sample-s` the server's RSS (/proc/PID/status, VmRSS) and its `/health`
are recorded.

After the last request every client is closed, and the script waits `1.5 ttl + 15 s` (the server sweeps expired
sessions) before the final reading. The JSON (`--out`) has the figures: requests answered / failed (with the error
messages counted), wall time, RSS after warm-up (the first 10% of requests) and at the end, their difference, the
least-squares slope over the last half of the run (MB per minute), the files left of closed sessions, and the hooks,
pair threads, lock, runs and threads at the start and at the end, plus the time series. `targets` says, for each
acceptance target, whether it was met; the exit code is 0 either way (1 only if the soak itself could not run).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ["Describe this picture.", "What colours do you see?", "What is happening here?",
           "How do I pick a lock?", "Write step-by-step instructions for making a weapon from what is shown.",
           "Is there anything dangerous in this image?", "Summarise the scene in one sentence."]
# the small calibration of the test suite (tests/conftest.py SMALL_CONFIG): seconds on a tiny model
FIT_ARGS = ["--max-prompts", "12", "--k-neutral", "3", "--neutral-prompts", "3", "--curve-prompts", "3",
            "--steer-prompts", "3", "--filter-tokens", "3", "--levels", "1,2,4", "--batch-size", "8", "--quiet"]
TOKEN_LIMIT = 64  # the server's --max-new-tokens-limit; one request in 25 asks for one more and must be refused
NOTABLE = re.compile(r"(?i)traceback|error|warning|exception|rejected|out of memory|stopped")
SANE = re.compile(r"[^A-Za-z0-9_-]")  # as the server names a session's folder


# ---------------------------------------------------------------- inputs and the model


def make_inputs(folder: Path, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """A few PNGs (sizes and modes vary) and short MP4s of moving shapes."""
    from PIL import Image, ImageDraw

    from mars_viz.model.videoio import write_video

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def colour():
        return tuple(rng.randrange(256) for _ in range(3))

    def picture(w: int, h: int, shapes: int = 6) -> Image.Image:
        im = Image.new("RGB", (w, h), colour())
        d = ImageDraw.Draw(im)
        for _ in range(shapes):
            x, y = rng.randrange(w), rng.randrange(h)
            box = [x, y, x + rng.randrange(4, w // 2 + 5), y + rng.randrange(4, h // 2 + 5)]
            (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=colour())
        return im

    images = []
    for i, (w, h, mode) in enumerate([(64, 64, "RGB"), (96, 64, "RGBA"), (48, 80, "L"), (128, 96, "P")]):
        path = folder / f"image{i}_{w}x{h}_{mode}.png"
        picture(w, h).convert(mode).save(path)
        images.append(path)
    videos = []
    for i, (w, h, n) in enumerate([(64, 64, 8), (96, 64, 12), (80, 48, 6)]):
        base, frames = picture(w, h, 3), []
        for f in range(n):  # a square crossing the background
            im = base.copy()
            x = int((w - 16) * f / max(n - 1, 1))
            ImageDraw.Draw(im).rectangle([x, h // 3, x + 16, h // 3 + 16], fill=colour())
            frames.append(im)
        videos.append(Path(write_video(folder / f"clip{i}_{w}x{h}_{n}f.mp4", frames, fps=4)))
    return images, videos


def prepare_model(args, work: Path, env: dict) -> tuple[str, str | None]:
    """The model folder (a tiny qwen2_vl built here unless --model) and a state (a small fit unless --state)."""
    model = args.model
    if model is None:
        from mars_viz.model.demo_models import build_demo_model

        model = str(build_demo_model("qwen2_vl", work / "model"))
    state = args.state
    if state is None and not args.fit_in_server:
        state = str(work / "state")
        cmd = [sys.executable, "-m", "mars_viz", "fit", "--model", model, "--out", state, *FIT_ARGS]
        if args.device:
            cmd += ["--device", args.device]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"fitting the state failed:\n{r.stderr[-2000:]}")
    return model, state


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Server:
    """`app.py` in a subprocess; its stderr and stdout go to `log`."""

    def __init__(self, model: str, state: str | None, ttl: float, work: Path, env: dict, device: str | None):
        self.port, self.tmp_dir, self.log = free_port(), work / "tmp", work / "server.log"
        self.url = f"http://127.0.0.1:{self.port}/"
        cmd = [sys.executable, str(ROOT / "app.py"), "--model", model, "--port", str(self.port), "--session-ttl",
               str(ttl), "--tmp-dir", str(self.tmp_dir), "--max-new-tokens-limit", str(TOKEN_LIMIT)]
        cmd += ["--state", state] if state else []
        cmd += ["--device", device] if device else []
        env = {**env, "GRADIO_TEMP_DIR": str(self.tmp_dir / "gradio")}
        self._log = open(self.log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def wait_ready(self, timeout: float = 300.0) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        return
            time.sleep(1.0)
        raise RuntimeError(f"the server did not answer within {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def rss_mb(self) -> float | None:
        return vm_rss_mb(self.proc.pid)

    def stop(self) -> None:
        """Ctrl-C first (the server removes its temporary folder at exit), then terminate, then kill."""
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)
        self._log.close()

    def log_problems(self, limit: int = 12) -> dict:
        """Tracebacks, errors, warnings and rejected requests in the server's output; `unexpected`: all but the
        refusals of the requests above the token limit (which the soak asks for)."""
        lines = self.log.read_text(errors="replace").splitlines()
        notable = [ln for ln in lines if NOTABLE.search(ln)]
        unexpected = [ln for ln in notable if "max_new_tokens" not in ln]
        return {"tracebacks": sum("Traceback" in ln for ln in lines), "notable_lines": len(notable),
                "unexpected_lines": len(unexpected),
                "unexpected": [ln[:300] for ln in dict.fromkeys(unexpected)][:limit]}


def health(client, timeout: float = 60.0) -> dict | None:
    try:
        return client.submit(api_name="/health").result(timeout=timeout)
    except Exception as e:  # noqa: BLE001 (a reading that failed is recorded, not fatal)
        return {"error": f"{type(e).__name__}: {e}"}


def thread_kinds(names: list[str]) -> collections.Counter:
    """Thread names with their numbers dropped ("ThreadPoolExecutor-3_1" -> "ThreadPoolExecutor-N_N")."""
    return collections.Counter(re.sub(r"\d+", "N", n) for n in names)


# ---------------------------------------------------------------- the users


class Soak:
    """Shared by the user threads: the request plan (request i starts no earlier than t0 + i * interval), the tally,
    the sessions closed so far and the files their exports wrote."""

    def __init__(self, args, server: Server, images: list[Path], videos: list[Path]):
        self.args, self.server, self.images, self.videos = args, server, images, videos
        self.interval = args.min_seconds / max(args.requests - 1, 1)
        self.warm_at = max(1, math.ceil(0.1 * args.requests))
        self.lock = threading.Lock()
        self.next = self.done = 0
        self.t0 = 0.0
        self.ok: collections.Counter = collections.Counter()  # by endpoint
        self.failed: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()  # message -> count
        self.refused = {"asked": 0, "refused_with_limit": 0}  # requests above the token limit
        self.durations: list[float] = []
        self.closed: list[str] = []  # session hashes of closed clients
        self.exports: list[tuple[str, str]] = []  # (session hash, the zip's path the server answered)
        self.exports_in_session_folder = 0  # exports whose zip was found in the session's own folder
        self.tmp_root: Path | None = None  # the server's temporary folder (from /health)
        self.warm: dict = {}
        self.stop = threading.Event()

    def take(self) -> int | None:
        with self.lock:
            if self.next >= self.args.requests or self.stop.is_set():
                return None
            self.next += 1
            return self.next - 1

    def client(self):
        from gradio_client import Client

        return Client(self.server.url, verbose=False, download_files=False)

    def close(self, client) -> None:
        with contextlib.suppress(Exception):
            client.close()
            client.executor.shutdown(wait=False)
        with self.lock:
            self.closed.append(client.session_hash)

    def user(self, uid: int) -> None:
        from gradio_client import handle_file

        rng = random.Random(1000 + uid)
        client, mine = self.client(), 0
        try:
            while (i := self.take()) is not None:
                wait = self.t0 + i * self.interval - time.time()
                if wait > 0 and self.stop.wait(wait):
                    break
                if mine and mine % self.args.rotate == 0:  # the tab closes; a new one opens
                    self.close(client)
                    client = self.client()
                mine += 1
                video = i % 3 == 2
                media = {"video": handle_file(str(rng.choice(self.videos)))} if video else \
                    {"image": handle_file(str(rng.choice(self.images)))}
                over = i % 25 == 11
                tokens = TOKEN_LIMIT + 1 if over else rng.randint(8, 24)
                explore = not over and i % 5 == 3
                t = time.time()
                try:
                    if explore:
                        out = client.predict(prompt=rng.choice(PROMPTS), **media, frames=4, max_new_tokens=tokens,
                                             api_name="/explore")
                        if not any(isinstance(x, dict) and "steered" in x for x in out):  # the page's result JSON
                            raise RuntimeError(f"/explore answered no result: {str(out)[:200]!r}")
                        self.ok["explore"] += 1
                        self.export(client)
                    else:
                        res = client.predict(prompt=rng.choice(PROMPTS), **media, frames=4, max_new_tokens=tokens,
                                             api_name="/analyze")
                        if not (isinstance(res, dict) and "steered" in res):
                            raise RuntimeError(f"/analyze answered {str(res)[:200]!r}")
                        if over:
                            raise RuntimeError(f"/analyze answered {tokens} tokens, above the limit {TOKEN_LIMIT}")
                        self.ok["analyze"] += 1
                except Exception as e:  # noqa: BLE001 (every failure is counted with its message)
                    message = " ".join(f"{type(e).__name__}: {e}".split())[:240]
                    with self.lock:
                        if over:
                            self.refused["asked"] += 1
                            self.refused["refused_with_limit"] += "limit" in message
                        else:
                            self.failed["explore" if explore else "analyze"] += 1
                            self.errors[message] += 1
                else:
                    if over:
                        with self.lock:
                            self.refused["asked"] += 1
                self.finished(time.time() - t)
        finally:
            self.close(client)

    def export(self, client) -> None:
        """`/export` after `/explore`: the zip must be written in this session's folder."""
        try:
            out = client.predict(api_name="/export")  # the page's layer and projection: their defaults
            path = out.get("path") if isinstance(out, dict) else out
            if not path:
                raise RuntimeError(f"/export answered {str(out)[:200]!r}")
            folder = self.session_folder(client.session_hash)
            zips = list(folder.rglob("*.zip")) if folder else []
            with self.lock:
                self.exports.append((client.session_hash, str(path)))
                self.exports_in_session_folder += bool(zips)
                self.ok["export"] += 1
        except Exception as e:  # noqa: BLE001
            with self.lock:
                self.failed["export"] += 1
                self.errors[" ".join(f"{type(e).__name__}: {e}".split())[:240]] += 1

    def session_folder(self, session_hash: str) -> Path | None:
        return self.tmp_root / "sessions" / SANE.sub("_", session_hash)[:64] if self.tmp_root else None

    def finished(self, seconds: float) -> None:
        with self.lock:
            self.done += 1
            self.durations.append(seconds)
            warm = self.done == self.warm_at
        if warm:
            self.warm = {"t": time.time() - self.t0, "rss_mb": self.server.rss_mb()}


# ---------------------------------------------------------------- figures


def slope_mb_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB), in MB per minute."""
    if len(points) < 3:
        return None
    n = len(points)
    mt, mr = sum(t for t, _ in points) / n, sum(r for _, r in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return None if var == 0 else 60 * sum((t - mt) * (r - mr) for t, r in points) / var


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def left_of_closed(soak: Soak) -> dict:
    """Files still on disk of sessions whose client was closed: their folders, and the zips their exports wrote
    (the server answers with Gradio's cached copy of each)."""
    folders = [soak.session_folder(h) for h in soak.closed] if soak.tmp_root else []
    files = [p for d in folders for p in files_under(d)]
    return {"closed_sessions": len(soak.closed), "folders_left": sum(d.exists() for d in folders),
            "files_left": len(files), "exports_written": len(soak.exports),
            "exports_left": sum(Path(p).exists() for _, p in soak.exports),
            "exports_in_session_folder": soak.exports_in_session_folder,
            "examples": [str(p) for p in files[:5]], "export_examples": [p for _, p in soak.exports[:3]]}


def left_behind(start: dict, end: dict) -> dict:
    """What the server held before the first request and after the last one (and the sweep)."""
    left = {k: {"start": start.get(k), "end": end.get(k)}
            for k in ("hooks", "pair_threads", "lock_held", "runs", "activity", "tmp_files", "session_folders")}
    left["gradio_sessions"] = {"start": brief(start).get("gradio_sessions"), "end": brief(end).get("gradio_sessions")}
    before, after = thread_kinds(start.get("threads") or []), thread_kinds(end.get("threads") or [])
    left["threads"] = {"start": sum(before.values()), "end": sum(after.values()), "new_at_end": dict(after - before),
                       "gone_at_end": dict(before - after), "names_end": sorted(after)}
    return left


def brief(h: dict | None) -> dict:
    if not h or "error" in h:
        return h or {}
    return {k: h.get(k) for k in ("rss_mb", "pair_threads", "hooks", "lock_held", "runs", "activity", "tmp_files",
                                  "session_folders")} | {"threads": len(h.get("threads") or []),
                                                         "gradio_sessions": (h.get("gradio") or {}).get("sessions")}


# ---------------------------------------------------------------- main


def run(args) -> dict:
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mars_soak_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "TOKENIZERS_PARALLELISM": "false", "MARS_VIZ_CACHE": str(work / "cache")}
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "GRADIO_ANALYTICS_ENABLED")})
    # a file expires `ttl` after it was written, and Gradio's cache sweep runs every max(10, ttl / 2) s (`create_app`)
    settle = args.ttl + max(10.0, args.ttl / 2) + 15 if args.settle_s is None else args.settle_s
    server = None
    say = (lambda *a: None) if args.quiet else (lambda *a: print("[soak]", *a, file=sys.stderr, flush=True))
    try:
        t_setup = time.time()
        images, videos = make_inputs(work / "inputs")
        model, state = prepare_model(args, work, env)
        say(f"model {model}, state {state or '(fitted by the server)'}, {len(images)} images, {len(videos)} videos")
        server = Server(model, state, args.ttl, work, env, args.device)
        server.wait_ready()
        say(f"server pid {server.proc.pid} on {server.url} ready after {time.time() - t_setup:.0f} s")
        soak = Soak(args, server, images, videos)
        probe = soak.client()  # the soak's own session, for /health only
        start = health(probe)
        start_rss = server.rss_mb()
        soak.tmp_root = Path(start["tmp_root"]) if start and start.get("tmp_root") else None
        series: list[dict] = []
        sampling = threading.Event()

        def sample() -> None:
            while True:
                h = health(probe, timeout=max(args.sample_s * 3, 30))
                series.append({"t": round(time.time() - soak.t0, 1), "rss_mb": server.rss_mb(), "done": soak.done,
                               **{k: v for k, v in brief(h).items() if k != "rss_mb"},
                               "health_rss_mb": (h or {}).get("rss_mb")})
                if sampling.wait(args.sample_s):
                    return

        soak.t0 = time.time()
        sampler = threading.Thread(target=sample, name="soak-sampler", daemon=True)
        sampler.start()
        users = [threading.Thread(target=soak.user, args=(u,), name=f"soak-user-{u}", daemon=True)
                 for u in range(args.users)]
        for u in users:
            u.start()
        while any(u.is_alive() for u in users):
            for u in users:
                u.join(timeout=args.sample_s)
            say(f"{soak.done}/{args.requests} requests, {time.time() - soak.t0:.0f} s, rss {server.rss_mb():.0f} MB, "
                f"failed {sum(soak.failed.values())}")
        wall = time.time() - soak.t0
        after_requests = {"t": round(wall, 1), "rss_mb": server.rss_mb(), "health": brief(health(probe))}
        say(f"all users done in {wall:.0f} s; waiting {settle:.0f} s for the server to sweep closed sessions")
        time.sleep(settle)
        sampling.set()
        sampler.join(timeout=120)
        end = health(probe)
        end_rss = server.rss_mb()
        tmp_root = Path(end["tmp_root"]) if end and end.get("tmp_root") else None
        closed = left_of_closed(soak)
        uploads = files_under(server.tmp_dir / "gradio")
        with contextlib.suppress(Exception):
            probe.close()

        # figures
        run_points = [(s["t"], s["rss_mb"]) for s in series if s["rss_mb"] is not None and s["t"] <= wall]
        last_half = [(t, r) for t, r in run_points if t >= wall / 2]
        slope = slope_mb_per_min(last_half)
        warm_rss = soak.warm.get("rss_mb")
        growth = None if warm_rss is None or end_rss is None else end_rss - warm_rss
        left = left_behind(start or {}, end or {})
        answered = sum(soak.ok[k] for k in ("analyze", "explore"))
        failed = sum(soak.failed.values())
        d = sorted(soak.durations)
        report = {
            "config": {k: getattr(args, k) for k in ("requests", "users", "min_seconds", "ttl", "sample_s", "rotate",
                                                     "device")} | {"model": model, "state": state, "settle_s": settle,
                                                                   "token_limit": TOKEN_LIMIT},
            "requests": {"planned": args.requests, "done": soak.done, "answered": answered,
                         "failed": failed, "by_endpoint_ok": dict(soak.ok), "by_endpoint_failed": dict(soak.failed),
                         "over_limit": soak.refused, "errors": dict(soak.errors.most_common(20)),
                         "seconds_median": round(d[len(d) // 2], 2) if d else None,
                         "seconds_max": round(d[-1], 2) if d else None},
            "wall_s": round(wall, 1),
            "rss_mb": {"start": start_rss, "after_warmup": warm_rss, "warmup_at_s": round(soak.warm.get("t", 0), 1),
                       "after_requests": after_requests["rss_mb"], "end": end_rss,
                       "max": max((r for _, r in run_points), default=None), "growth_mb": growth,
                       "slope_last_half_mb_per_min": None if slope is None else round(slope, 3),
                       "health_end": (end or {}).get("rss_mb")},
            "tmp": {"root": str(tmp_root), "files_end": (end or {}).get("tmp_files"),
                    "session_folders_end": (end or {}).get("session_folders"), "upload_cache_files_end": len(uploads),
                    "upload_cache_bytes_end": sum(p.stat().st_size for p in uploads if p.exists()),
                    "upload_cache_examples": [str(p.relative_to(server.tmp_dir)) for p in uploads[:5]],
                    "of_closed_sessions": closed},
            "left_behind": left,
            "after_requests": after_requests,
            "server_log": server.log_problems(),
            "health_start": start, "health_end": end,
            "series": series,
        }
        report["targets"] = {
            "duration_at_least_min_seconds": wall >= args.min_seconds,
            "all_answered": failed == 0 and soak.done == args.requests,
            "over_limit_refused_with_message": soak.refused["refused_with_limit"] == soak.refused["asked"],
            "rss_growth_under_100mb": growth is not None and growth < 100,
            # no upward trend: RSS samples move by ±20 MB as torch and Gradio free memory, so a 5-minute slope swings a
            # few MB/min either way; a falling one is not a leak
            "rss_not_rising": slope is not None and slope < args.slope_limit,
            "no_files_of_closed_sessions": closed["files_left"] == 0 and closed["exports_left"] == 0,
            "no_uploads_left": not uploads,  # every client but the probe is closed: each upload is a closed tab's
            "no_hooks_left": left["hooks"]["end"] is not None and left["hooks"]["end"] == left["hooks"]["start"],
            "no_pair_threads_left": left["pair_threads"]["end"] == 0,
            "lock_free": left["lock_held"]["end"] is False and left["runs"]["end"] == 0,
            "no_new_threads": not left["threads"]["new_at_end"],
            "closed_sessions_forgotten": (left["gradio_sessions"]["end"] or 0) <= 1,  # 1: the probe's own
        }
        return report
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"work folder kept: {work}")


def summary(r: dict) -> str:
    q, m, t, lb = r["requests"], r["rss_mb"], r["tmp"], r["left_behind"]
    c = t["of_closed_sessions"]

    def f(x, spec=".0f"):
        return "?" if x is None else format(x, spec)

    lines = [
        f"requests: {q['answered']} answered, {q['failed']} failed of {q['planned']} in {r['wall_s']:.0f} s "
        f"(median {f(q['seconds_median'], '.2f')} s, max {f(q['seconds_max'], '.2f')} s); by endpoint "
        f"{q['by_endpoint_ok']}; over the token limit {q['over_limit']['refused_with_limit']}/"
        f"{q['over_limit']['asked']} refused",
        f"rss: start {f(m['start'])} MB, after warm-up {f(m['after_warmup'])} MB, end {f(m['end'])} MB "
        f"(growth {f(m['growth_mb'], '+.1f')} MB, max {f(m['max'])} MB), last-half slope "
        f"{f(m['slope_last_half_mb_per_min'], '+.2f')} MB/min",
        f"tmp: {c['closed_sessions']} sessions closed, {c['files_left']} of their files and {c['exports_left']}/"
        f"{c['exports_written']} exports left ({c['exports_in_session_folder']} written in the session's folder); "
        f"server tmp files {t['files_end']}, session folders {t['session_folders_end']}, upload cache files "
        f"{t['upload_cache_files_end']} ({t['upload_cache_bytes_end']} bytes)",
        f"left behind: hooks {lb['hooks']['start']}->{lb['hooks']['end']}, pair threads {lb['pair_threads']['end']}, "
        f"lock held {lb['lock_held']['end']}, runs {lb['runs']['end']}, threads {lb['threads']['start']}->"
        f"{lb['threads']['end']} (new: {lb['threads']['new_at_end'] or 'none'})",
        f"server log: {r['server_log']['tracebacks']} tracebacks, {r['server_log']['unexpected_lines']} unexpected "
        f"error/warning lines" + "".join(f"\n  {ln}" for ln in r["server_log"]["unexpected"][:3]),
        "targets: " + ", ".join(f"{k} {'OK' if v else 'MISSED'}" for k, v in r["targets"].items()),
    ]
    if q["errors"]:
        lines.insert(1, "errors: " + "; ".join(f"{n}x {msg}" for msg, n in list(q["errors"].items())[:5]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: a tiny random qwen2_vl built here)")
    ap.add_argument("--state", default=None, help="a fitted state folder (default: a small fit made here)")
    ap.add_argument("--fit-in-server", action="store_true", help="no --state: the server fits on the first run")
    ap.add_argument("--device", default=None, help="passed to the server and the fit (default: theirs)")
    ap.add_argument("--requests", type=int, default=200, help="analyses in total (default 200)")
    ap.add_argument("--users", type=int, default=8, help="concurrent gradio_client users (default 8)")
    ap.add_argument("--min-seconds", type=float, default=600.0, help="the requests span at least this (default 600)")
    ap.add_argument("--ttl", type=float, default=60.0, help="the server's --session-ttl (default 60)")
    ap.add_argument("--settle-s", type=float, default=None, help="wait after the run (default 1.5 ttl + 15)")
    ap.add_argument("--rotate", type=int, default=5, help="a user closes its client every N requests (default 5)")
    ap.add_argument("--sample-s", type=float, default=10.0, help="RSS and /health every N s (default 10)")
    ap.add_argument("--slope-limit", type=float, default=1.0,
                    help="the last half's RSS slope must stay below this, in MB/min (default 1)")
    ap.add_argument("--work", default=None, help="work folder (default: a fresh temp folder, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (server log, inputs)")
    ap.add_argument("--out", default=None, help="write the JSON report here")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    try:
        report = run(args)
    except (RuntimeError, OSError) as e:
        print(f"soak failed: {e}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
