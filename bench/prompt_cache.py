"""Prompt cache and prefill scenarios, lmx against llama-server in one invocation.

    uv run --group bench python bench/prompt_cache.py --llama-server /path/to/llama-server

(a) swap-back: a ~2000-token system prompt to model A, a request to model B under a one-model
    limit, then A again with the same prompt. Printed: the TTFT of that last request over A's
    cold TTFT, for lmx (which keeps A's prompt state across the swap) and for llama-server
    restarted the way llama-swap restarts it (process start, load and full prefill, timed from
    the moment the request would reach llama-swap).
(b) agents: 8 agents with 8 distinct ~1000-token system prompts on 2 slots, round robin (each
    round every agent asks a new question, all at once). Printed: aggregate generated tokens/s
    and TTFT p50 over the rounds after the first, which is cold for everyone.
(c) cold prefill: TTFT of distinct ~650- and ~2000-token prompts on a loaded model, one at a
    time; lmx batch-invariant (its default) and with --no-batch-invariant.

Everything runs with the same model, the same threads and 2 slots. Model B is a copy of A in a
temporary folder unless --model-b names another GGUF. lmx runs under --max-memory; its RSS is
sampled and its growth over the idle server printed against that budget. Before each
measurement the script waits for an idle CPU (see bench.py), unless --no-wait.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench import (  # bench/bench.py, the directory of this script
    TOPICS,
    free_port,
    lmx_cmd,
    stop,
    wait_idle,
    wait_ready,
)

MAX_TOKENS = 16


@dataclass
class Reply:
    ttft: float  # seconds
    tokens: int
    prompt_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class Server:
    """A server process; `rss_peak` follows its resident memory while it runs."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    model: str
    rss_start: int = 0
    rss_peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(self.proc.pid)
            self.rss_start = p.memory_info().rss
            while not self._stop.wait(0.05):
                self.rss_peak = max(self.rss_peak, p.memory_info().rss)


def make_text(seed: int, n_tokens: int, count: object) -> str:
    """Distinct prose of about `n_tokens` tokens; `seed` makes its first words unique."""
    parts = [f"Briefing {seed}: you are assistant number {seed} of the Northwind company."]
    i = 0
    while True:
        t = TOPICS[(seed * 7 + i) % len(TOPICS)]
        parts.append(
            f"Note {seed}.{i}: when asked about {t}, give fact {i * 13 + seed} first, keep the "
            f"answer under {40 + i % 9} words, and name the {t} office in district {i % 17}."
        )
        i += 1
        if i % 8 == 0 and count(" ".join(parts)) >= n_tokens:  # type: ignore[operator]
            return " ".join(parts)


@contextlib.contextmanager
def run_server(name: str, cmd: list[str], port: int, model: str) -> Iterator[Server]:
    log = open(f"/tmp/bench-{name}.log", "w")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    srv = Server(name, proc, f"http://127.0.0.1:{port}", model)
    sampler = threading.Thread(target=srv.sample, daemon=True)
    try:
        wait_ready(name, proc, srv.url + "/health")
        sampler.start()
        yield srv
    finally:
        srv._stop.set()
        stop(proc)
        log.close()


async def ask(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    system: str,
    question: str,
    max_tokens: int = MAX_TOKENS,
) -> Reply:
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = None
    pieces = 0
    usage: dict[str, object] = {}
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for c in chunk.get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    pieces += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    details = usage.get("prompt_tokens_details") or {}
    return Reply(
        ttft if ttft is not None else time.perf_counter() - t0,
        int(usage.get("completion_tokens", pieces)),  # type: ignore[call-overload]
        int(usage.get("prompt_tokens", 0)),  # type: ignore[call-overload]
        int(details.get("cached_tokens", 0)),  # type: ignore[union-attr]
    )


def ask_sync(url: str, model: str, system: str, question: str, max_tokens: int = 16) -> Reply:
    async def go() -> Reply:
        async with httpx.AsyncClient(timeout=900) as c:
            return await ask(c, url, model, system, question, max_tokens)

    return asyncio.run(go())


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        from server.discovery import default_model_dir

        bundled = (default_model_dir() or Path(".")) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        self.model_a: Path = args.model or bundled
        b_dir = work / "models-b"
        b_dir.mkdir()
        self.model_b = b_dir / "model-b.gguf"
        shutil.copyfile(args.model_b or self.model_a, self.model_b)
        self.a_id = self.model_a.stem.lower()  # lmx's id for a file is its name
        from llama_cpp import Llama

        vocab = Llama(str(self.model_a), vocab_only=True, verbose=False)
        self.count = lambda text: len(vocab.tokenize(text.encode(), add_bos=False))
        self.results: list[str] = []

    def wait(self) -> None:
        if not self.args.no_wait:
            wait_idle(self.args.max_waits)

    def lmx_cmd(self, port: int, *extra: str, swap: bool = False) -> list[str]:
        a = self.args
        cache = self.work / f"lmx-prompt-cache-{port}"  # nothing left by an earlier run
        more = ["--max-memory", a.max_memory, "--prompt-cache-dir", str(cache)]
        cmd = lmx_cmd(
            port, self.model_a.parent, ctx=a.ctx, parallel=2, threads=a.threads, extra=more
        )
        if swap:
            cmd += ["--model-dir", str(self.model_b.parent), "--max-loaded-models", "1"]
        return cmd + list(extra)

    def peer_cmd(self, model: Path, port: int) -> list[str]:
        a = self.args
        return [
            str(a.llama_server),
            "-m",
            str(model),
            "--port",
            str(port),
            "-np",
            "2",
            "-c",
            str(a.ctx * 2),
            "-t",
            str(a.threads),
            "-tb",
            str(a.threads),
            "--log-disable",
        ]

    def memory_line(self, srv: Server) -> str:
        from server.memory import parse_size

        growth = srv.rss_peak - srv.rss_start
        budget = parse_size(self.args.max_memory)
        verdict = "inside" if growth <= budget else "OVER"
        return (
            f"  lmx peak RSS {srv.rss_peak / 1e6:.0f} MB, growth over the idle server "
            f"{growth / 1e6:.0f} MB: {verdict} the {budget / 1e6:.0f} MB budget"
        )

    # ----- (a) swap-back -------------------------------------------------------------------------

    def swap_back(self) -> None:
        a = self.args
        lmx_ratio, peer_ratio, lmx_back, peer_back = [], [], [], []
        for rep in range(a.repeats):
            system = make_text(100 + rep, a.swap_tokens, self.count)
            q = "In one sentence, who are you?"
            port = free_port()
            with run_server("lmx", self.lmx_cmd(port, swap=True), port, self.a_id) as srv:
                self.wait()
                cold = ask_sync(srv.url, self.a_id, system, q)
                ask_sync(srv.url, "model-b", "Be brief.", "Say hello.")
                self.wait()
                back = ask_sync(srv.url, self.a_id, system, q)
                print(
                    f"lmx        swap-back #{rep}: cold {cold.ttft * 1000:7.0f} ms "
                    f"({cold.prompt_tokens} prompt tokens), back {back.ttft * 1000:7.0f} ms "
                    f"({back.cached_tokens} cached)",
                    flush=True,
                )
                print(self.memory_line(srv))
            lmx_ratio.append(back.ttft / cold.ttft)
            lmx_back.append(back.ttft)
            if a.llama_server:
                self.wait()
                cold_p = self.peer_swap_request(self.model_a, system, q)
                self.peer_swap_request(self.model_b, "Be brief.", "Say hello.")
                self.wait()
                back_p = self.peer_swap_request(self.model_a, system, q)
                print(
                    f"llama-server swap-back #{rep}: cold {cold_p * 1000:7.0f} ms, "
                    f"back {back_p * 1000:7.0f} ms (restart, load, prefill)",
                    flush=True,
                )
                peer_ratio.append(back_p / cold_p)
                peer_back.append(back_p)
        line = (
            f"(a) swap-back, {a.swap_tokens}-token system prompt: swap-back TTFT / cold TTFT: "
            f"lmx {statistics.median(lmx_ratio):.2f}"
        )
        if peer_ratio:
            line += (
                f", llama-server {statistics.median(peer_ratio):.2f}; lmx/llama-server "
                f"swap-back TTFT {statistics.median(lmx_back) / statistics.median(peer_back):.2f}x"
            )
        self.results.append(line)

    def peer_swap_request(self, model: Path, system: str, question: str) -> float:
        """TTFT of one request to a llama-server started for it, counted from the start."""
        port = free_port()
        t0 = time.perf_counter()
        with run_server("llama-server", self.peer_cmd(model, port), port, "model") as srv:
            sent = time.perf_counter()
            reply = ask_sync(srv.url, "model", system, question)
            return sent - t0 + reply.ttft

    # ----- (b) agents ----------------------------------------------------------------------------

    def agents(self) -> None:
        a = self.args
        systems = [make_text(200 + i, a.agent_tokens, self.count) for i in range(a.agents)]
        table: dict[str, tuple[float, float, float]] = {}

        async def rounds(url: str, model: str) -> tuple[list[Reply], list[Reply], float]:
            first: list[Reply] = []
            rest: list[Reply] = []
            wall = 0.0
            async with httpx.AsyncClient(timeout=900) as c:
                for r in range(a.rounds):
                    t0 = time.perf_counter()
                    tasks = []
                    for i, s in enumerate(systems):  # in agent order: the servers queue FIFO
                        q = f"Round {r}: what should I know about {TOPICS[(i + r) % len(TOPICS)]}?"
                        tasks.append(asyncio.create_task(ask(c, url, model, s, q)))
                        await asyncio.sleep(0.01)
                    replies = await asyncio.gather(*tasks)
                    if r == 0:
                        first += replies
                    else:
                        rest += replies
                        wall += time.perf_counter() - t0
            return first, rest, wall

        def run(name: str, srv: Server) -> None:
            self.wait()
            first, rest, wall = asyncio.run(rounds(srv.url, srv.model))
            tps = sum(x.tokens for x in rest) / wall
            p50 = statistics.median(x.ttft for x in rest) * 1000
            p50_cold = statistics.median(x.ttft for x in first) * 1000
            cached = statistics.median(x.cached_tokens for x in rest)
            table[name] = (tps, p50, p50_cold)
            print(
                f"{name:>12} agents: {tps:6.1f} tok/s, TTFT p50 {p50:7.0f} ms "
                f"(round 1, cold: {p50_cold:7.0f} ms); median cached {cached:.0f} of "
                f"{statistics.median(x.prompt_tokens for x in rest):.0f} prompt tokens",
                flush=True,
            )

        port = free_port()
        with run_server("lmx", self.lmx_cmd(port), port, self.a_id) as srv:
            ask_sync(srv.url, self.a_id, "Be brief.", "Say hello.", 4)  # load
            run("lmx", srv)
            print(self.memory_line(srv))
        if a.llama_server:
            port = free_port()
            with run_server("llama-server", self.peer_cmd(self.model_a, port), port, "model") as p:
                ask_sync(p.url, "model", "Be brief.", "Say hello.", 4)
                run("llama-server", p)
        line = (
            f"(b) {a.agents} agents, {a.agent_tokens}-token system prompts, 2 slots, rounds 2-"
            f"{a.rounds}: lmx {table['lmx'][0]:.1f} tok/s, TTFT p50 {table['lmx'][1]:.0f} ms"
        )
        if "llama-server" in table:
            peer = table["llama-server"]
            line += (
                f"; llama-server {peer[0]:.1f} tok/s, {peer[1]:.0f} ms; lmx/llama-server "
                f"tok/s {table['lmx'][0] / peer[0]:.2f}x, TTFT p50 {table['lmx'][1] / peer[1]:.2f}x"
            )
        self.results.append(line)

    # ----- (c) cold prefill ----------------------------------------------------------------------

    def cold_prefill(self) -> None:
        a = self.args
        sizes = [int(x) for x in a.prefill_tokens.split(",")]
        ttft: dict[tuple[str, int], float] = {}

        def measure(name: str, srv: Server) -> None:
            ask_sync(srv.url, srv.model, "Be brief.", "Say hello.", 4)  # load, warm
            for n in sizes:
                xs = []
                for k in range(a.repeats):
                    # Distinct from the first word: nothing but the chat template is cached.
                    text = make_text(1000 * n + k + (0 if name == "lmx" else 500), n, self.count)
                    self.wait()
                    xs.append(ask_sync(srv.url, srv.model, "Be brief.", text, 2).ttft)
                ttft[(name, n)] = statistics.median(xs)
                ms = ttft[(name, n)] * 1000
                print(f"{name:>24} cold prefill {n:5d} tokens: TTFT {ms:7.0f} ms", flush=True)

        for label, extra in (("lmx", ()), ("lmx --no-batch-invariant", ("--no-batch-invariant",))):
            port = free_port()
            with run_server("lmx", self.lmx_cmd(port, *extra), port, self.a_id) as srv:
                measure(label, srv)
                print(self.memory_line(srv))
        if a.llama_server:
            port = free_port()
            with run_server("llama-server", self.peer_cmd(self.model_a, port), port, "model") as p:
                measure("llama-server", p)
        for n in sizes:
            line = f"(c) cold prefill {n} tokens: lmx {ttft[('lmx', n)] * 1000:.0f} ms"
            fast = ttft[("lmx --no-batch-invariant", n)]
            line += f", --no-batch-invariant {fast * 1000:.0f} ms"
            if ("llama-server", n) in ttft:
                peer = ttft[("llama-server", n)]
                line += (
                    f", llama-server {peer * 1000:.0f} ms; lmx/llama-server "
                    f"{ttft[('lmx', n)] / peer:.2f}x (invariant), {fast / peer:.2f}x (not)"
                )
            self.results.append(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-server", type=Path, help="path to a llama-server binary")
    ap.add_argument("--no-llama-server", action="store_true")
    ap.add_argument("--model", type=Path, help="model A (default: the bundled SmolLM2)")
    ap.add_argument("--model-b", type=Path, help="model B (default: a copy of model A)")
    ap.add_argument("--scenarios", default="swap,agents,prefill")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096, help="context per slot")
    ap.add_argument("--max-memory", default="3G", help="lmx's memory budget")
    ap.add_argument("--swap-tokens", type=int, default=2000)
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--agent-tokens", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefill-tokens", default="650,2000")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-waits", type=int, default=30)
    ap.add_argument("--no-wait", action="store_true", help="measure without waiting for idle")
    args = ap.parse_args()
    if args.rounds < 2:
        ap.error("--rounds must be at least 2: the first round is the cold one, not measured")
    if args.no_llama_server:
        args.llama_server = None
    elif not args.llama_server:
        ap.error("--llama-server PATH is required (or --no-llama-server)")
    with tempfile.TemporaryDirectory(prefix="lmx-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        wanted = args.scenarios.split(",")
        if "swap" in wanted:
            bench.swap_back()
        if "agents" in wanted:
            bench.agents()
        if "prefill" in wanted:
            bench.cold_prefill()
        print()
        for line in bench.results:
            print(line)
        print(
            f"\nmodel A {bench.model_a.name}, model B {args.model_b or 'a copy of A'}; "
            f"{args.threads} threads and 2 slots each; {MAX_TOKENS} tokens per answer"
        )


if __name__ == "__main__":
    main()
