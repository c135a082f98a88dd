"""Throughput and latency of lmx against its peers, in one invocation, on one model.

    uv run --group bench python bench/bench.py --llama-server /path/to/llama-server

Peers: llama-cpp-python's own server (`python -m llama_cpp.server`, interrupt_requests off)
and `llama-server` (built from the llama.cpp source vendored in the llama-cpp-python sdist;
pass its path, or --no-llama-server). Every server gets the same model, the same threads
and as many slots as the concurrency. Two workloads: distinct prompts, and distinct
questions behind one shared ~650-token system prompt. Printed: aggregate generated tokens/s,
TTFT p50/p95, and lmx's ratio to each peer.

The machine is shared: before each run the script waits until other processes leave the
CPU idle, and gives up on a run after --max-waits tries.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

TOPICS = [
    "the ocean",
    "volcanoes",
    "medieval castles",
    "honeybees",
    "the moon",
    "jazz music",
    "glaciers",
    "ancient Rome",
    "rainforests",
    "chess",
    "bicycles",
    "coffee",
    "lighthouses",
    "deserts",
    "owls",
    "trains",
    "libraries",
    "tea",
    "mountains",
    "whales",
    "bread",
    "comets",
    "gardens",
    "rivers",
    "clocks",
    "bridges",
    "penguins",
    "storms",
    "maps",
    "salt",
    "paper",
    "glass",
]

SYSTEM_PROMPT = (
    "You are Atlas, the support assistant of the Northwind Outdoor Supply Company. "
    "Follow these rules in every answer. "
    + " ".join(
        f"Rule {i}: when a customer asks about {t}, answer politely, keep the answer short, "
        f"mention our store hours of nine to five, and never promise a delivery date."
        for i, t in enumerate(TOPICS[:18], 1)
    )
)


@dataclass
class RunResult:
    tokens: int
    seconds: float
    ttfts: list[float]
    failed: int = 0

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds

    def ttft(self, q: float) -> float:
        xs = sorted(self.ttfts)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def lmx_cmd(
    port: int, model_dir: Path, *, ctx: int, parallel: int, threads: int, extra: Sequence[str] = ()
) -> list[str]:
    """`lmx --no-ui` from this checkout, as every bench script starts it."""
    return [
        sys.executable,
        "-m",
        "server.cli",
        "--no-ui",
        "--port",
        str(port),
        "--model-dir",
        str(model_dir),
        "--ctx",
        str(ctx),
        "--parallel",
        str(parallel),
        "--threads",
        str(threads),
        "--log-level",
        "warning",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_idle(max_waits: int, threshold: float = 25.0) -> None:
    """Block until the rest of the machine leaves the CPU mostly idle."""
    me = {os.getpid()} | {c.pid for c in psutil.Process().children(recursive=True)}
    for _ in range(max_waits):
        busy = 0.0
        procs = [p for p in psutil.process_iter() if p.pid not in me]
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.cpu_percent(None)
        time.sleep(1.0)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                busy += p.cpu_percent(None)
        if busy < threshold:
            return
        print(f"  (waiting: other processes use {busy:.0f}% CPU)", file=sys.stderr)
        time.sleep(2)
    raise SystemExit("the machine stayed busy; refusing to measure")


def wait_ready(name: str, proc: subprocess.Popen[bytes], url: str, seconds: float = 180) -> None:
    """Until `url` answers 200; a server that exits or takes too long ends the bench."""
    deadline = time.time() + seconds
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited; see /tmp/bench-{name}.log")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.time() > deadline:
            raise SystemExit(f"{name} did not start")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def start(name: str, cmd: list[str], port: int, ready_path: str) -> Iterator[str]:
    log = open(f"/tmp/bench-{name}.log", "w")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(name, proc, url + ready_path)
        yield url
    finally:
        stop(proc)
        log.close()


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[int, float]:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0.7,
        "seed": 1,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = None
    pieces = 0
    usage = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    pieces += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    tokens = usage["completion_tokens"] if usage else pieces
    return tokens, ttft if ttft is not None else time.perf_counter() - t0


async def run_load(
    url: str,
    model: str,
    concurrency: int,
    n_requests: int,
    shared: bool,
    max_tokens: int,
    offset: int,
) -> RunResult:
    def messages(i: int) -> list[dict[str, str]]:
        topic = TOPICS[(i + offset) % len(TOPICS)]
        if shared:
            return [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": f"Question {i}: tell me about {topic}."},
            ]
        return [{"role": "user", "content": f"Write a long essay about {topic}. ({i})"}]

    sem = asyncio.Semaphore(concurrency)
    results: list[tuple[int, float]] = []
    failed = 0

    async def worker(i: int, client: httpx.AsyncClient) -> None:
        nonlocal failed
        async with sem:
            try:
                results.append(await one_request(client, url, model, messages(i), max_tokens))
            except httpx.HTTPError as e:  # a peer that drops a request is reported, not fatal
                failed += 1
                print(f"  request {i} failed: {e!r}", file=sys.stderr)

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i, client) for i in range(n_requests)))
        wall = time.perf_counter() - t0
    return RunResult(sum(t for t, _ in results), wall, [f for _, f in results] or [wall], failed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-server", type=Path, help="path to a llama-server binary")
    ap.add_argument("--no-llama-server", action="store_true")
    ap.add_argument("--no-llama-cpp-python", action="store_true")
    ap.add_argument("--model", type=Path, help="GGUF file (default: the bundled SmolLM2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="requests per slot in each run")
    ap.add_argument("--ctx", type=int, default=2048, help="context per slot")
    ap.add_argument("--workloads", default="distinct,shared")
    ap.add_argument("--max-waits", type=int, default=30)
    args = ap.parse_args()

    from server.discovery import default_model_dir

    model = args.model or (default_model_dir() or Path(".")) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    levels = [int(x) for x in args.concurrency.split(",")]
    workloads = args.workloads.split(",")
    if not args.no_llama_server and not args.llama_server:
        ap.error("--llama-server PATH is required (or --no-llama-server)")

    def servers(n: int) -> list[tuple[str, list[str], str, str, int]]:
        out = []
        p = free_port()
        out.append(
            (
                "lmx",
                lmx_cmd(p, model.parent, ctx=args.ctx, parallel=n, threads=args.threads),
                "/health",
                model.stem.lower(),
                p,
            )
        )
        if not args.no_llama_server:
            p = free_port()
            out.append(
                (
                    "llama-server",
                    [
                        str(args.llama_server),
                        "-m",
                        str(model),
                        "--port",
                        str(p),
                        "-np",
                        str(n),
                        "-c",
                        str(args.ctx * n),
                        "-t",
                        str(args.threads),
                        "-tb",
                        str(args.threads),
                        "--log-disable",
                    ],
                    "/health",
                    "model",
                    p,
                )
            )
        if not args.no_llama_cpp_python:
            p = free_port()
            out.append(
                (
                    "llama-cpp-python",
                    [
                        sys.executable,
                        "-m",
                        "llama_cpp.server",
                        "--model",
                        str(model),
                        "--port",
                        str(p),
                        "--n_ctx",
                        str(args.ctx),
                        "--n_threads",
                        str(args.threads),
                        "--n_threads_batch",
                        str(args.threads),
                        "--interrupt_requests",
                        "False",
                        "--chat_format",
                        "chatml",
                    ],
                    "/v1/models",
                    "model",
                    p,
                )
            )
        return out

    table: dict[tuple[str, int, str], RunResult] = {}
    offset = 0
    for n in levels:
        for name, cmd, ready, model_name, port in servers(n):
            with start(name, cmd, port, ready) as url:
                # Warm up: load the model, fill caches the same way for everyone.
                asyncio.run(run_load(url, model_name, 1, 1, False, 4, 999))
                for wl in workloads:
                    wait_idle(args.max_waits)
                    offset += 7
                    res = asyncio.run(
                        run_load(
                            url,
                            model_name,
                            n,
                            n * args.rounds,
                            wl == "shared",
                            args.max_tokens,
                            offset,
                        )
                    )
                    table[(name, n, wl)] = res
                    print(
                        f"{name:>16} c={n} {wl:>8}: {res.tps:7.1f} tok/s  "
                        f"TTFT p50 {res.ttft(0.5):7.1f} ms  p95 {res.ttft(0.95):7.1f} ms",
                        flush=True,
                    )

    names = sorted({k[0] for k in table}, key=lambda s: (s != "lmx", s))
    print(
        "\n| workload | c | "
        + " | ".join(f"{n} tok/s" for n in names)
        + " | "
        + " | ".join(f"{n} TTFT p50/p95 ms" for n in names)
        + " | "
        + " | ".join(f"lmx/{n} tok/s, TTFT p50" for n in names if n != "lmx")
        + " |"
    )
    print("|" + "---|" * (2 + 2 * len(names) + len(names) - 1))
    for wl in workloads:
        for n in levels:
            row = [wl, str(n)]
            row += [f"{table[(s, n, wl)].tps:.1f}" for s in names]
            row += [
                f"{table[(s, n, wl)].ttft(0.5):.0f}/{table[(s, n, wl)].ttft(0.95):.0f}"
                for s in names
            ]
            mine = table[("lmx", n, wl)]
            for s in names:
                if s == "lmx":
                    continue
                peer = table[(s, n, wl)]
                row.append(f"{mine.tps / peer.tps:.2f}x, {mine.ttft(0.5) / peer.ttft(0.5):.2f}x")
            print("| " + " | ".join(row) + " |")
    print(
        f"\nmodel {model.name}, {args.threads} threads each, {args.max_tokens} tokens per "
        f"request, {args.rounds} requests per slot; shared system prompt "
        f"{len(SYSTEM_PROMPT.split())} words"
    )


if __name__ == "__main__":
    main()
