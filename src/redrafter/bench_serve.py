"""``redrafter bench-serve``: the server under N concurrent streaming clients, with and without speculation.

For each concurrency ``N``, ``N`` client threads stream chat completions (greedy) from a server on
this machine, each taking the next prompt until ``max(N, requests)`` requests are done; the server
runs once with the adaptive policy (speculate up to ``--speculate-max-batch`` rows) and once with
plain decoding (never speculate), the two interleaved per concurrency (in ``rounds`` rounds, the
order reversed every other round, as this machine's speed drifts within minutes). Measured at the client:
throughput (generated tokens over the wall time of the whole run), time to the first token and the
gaps between later chunks (inter-token latency), p50 and p99. As in ``redrafter serve``, the
decode loop runs on the main thread and HTTP on another; the clients are threads of this process
too, so they share its CPU: on a 2-core machine that costs both modes alike.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .api import ReDrafter
from .bench import percentile
from .files import write_json
from .prompts import Prompt
from .serve import BackgroundServer, Engine, build_app

MODES = {"speculative": None, "plain": 0}  # speculate_max_batch: None = the caller's setting


def stream_one(url: str, prompt: str, max_tokens: int) -> dict:
    """One streaming chat request; returns its token count, time to first token and chunk gaps."""
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    start = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    with urllib.request.urlopen(request, timeout=3600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                if first is None:
                    first = now - start
                elif last is not None:
                    gaps.append(now - last)
                last = now
    return {"tokens": tokens, "first_token_seconds": first, "gaps": gaps, "seconds": time.perf_counter() - start}


def run_concurrency(url: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int) -> dict:
    """``max(concurrency, requests)`` requests, ``concurrency`` in flight at a time: their count,
    tokens, wall seconds, and every time to first token and chunk gap (ms)."""
    count = max(concurrency, requests)
    chosen = [prompts[i % len(prompts)] for i in range(count)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda p: stream_one(url, p, max_tokens), chosen))
    return {
        "requests": count,
        "tokens": sum(r["tokens"] for r in results),
        "seconds": time.perf_counter() - start,
        "first_ms": [1000 * r["first_token_seconds"] for r in results if r["first_token_seconds"] is not None],
        "gaps_ms": [1000 * g for r in results for g in r["gaps"]],
    }


def summarize(rounds: list[dict]) -> dict:
    """One mode's rounds at one concurrency (:func:`run_concurrency`'s results) as one table row."""
    tokens, wall = sum(r["tokens"] for r in rounds), sum(r["seconds"] for r in rounds)
    first = [ms for r in rounds for ms in r["first_ms"]]
    gaps = [ms for r in rounds for ms in r["gaps_ms"]]
    return {
        "requests": sum(r["requests"] for r in rounds),
        "tokens": tokens,
        "seconds": round(wall, 3),
        "tokens_per_second": round(tokens / wall, 2),
        "ttft_p50_ms": round(percentile(first, 50), 1) if first else None,
        "ttft_p99_ms": round(percentile(first, 99), 1) if first else None,
        "itl_p50_ms": round(percentile(gaps, 50), 1) if gaps else None,
        "itl_p99_ms": round(percentile(gaps, 99), 1) if gaps else None,
    }


def on_main_thread(engine: Engine, clients: Callable[[], dict]) -> dict:
    """Run ``clients`` on a thread while ``engine``'s loop runs here (as ``redrafter serve`` runs it),
    until they are done; return what they returned."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(clients() or {}))
    thread.start()
    engine.run(until=lambda: not thread.is_alive())
    thread.join()
    return result


def run_serve_benchmark(
    rd: ReDrafter,
    prompts: list[Prompt],
    concurrencies: list[int],
    requests: int,
    max_tokens: int,
    out: Path,
    max_batch: int,
    speculate_max_batch: int | None,
    rounds: int = 1,
) -> dict:
    """Both modes at every concurrency, in ``rounds`` rounds of ``requests`` requests each, the modes'
    order reversed every other round (so a machine that drifts slower or faster during a
    concurrency weighs on both alike); writes ``serve.json`` and ``serve.png``."""
    servers = {}
    for mode, setting in MODES.items():
        limit = speculate_max_batch if setting is None else setting
        engine = Engine(rd, max_batch=max_batch, max_queue=max(concurrencies) + requests, speculate_max_batch=limit)
        servers[mode] = (engine, BackgroundServer(build_app(engine, "default", run_engine=False)))
    texts = [p.text for p in prompts]
    table: dict[str, dict[str, dict]] = {mode: {} for mode in MODES}
    try:
        if rd.compile:  # every graph (prefills and steps of each kind, of one row and of more) before any round
            rd.decoder.warm_up(min(max_batch, max(concurrencies)))
        for engine, server in servers.values():  # warm-up: one short request each
            on_main_thread(engine, lambda url=server.url: stream_one(url, texts[0], 8))
        for n in concurrencies:
            measured: dict[str, list[dict]] = {mode: [] for mode in MODES}
            steps = {mode: [0] * len(servers[mode][0].kind_steps) for mode in MODES}  # per kind
            for round_ in range(rounds):
                order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
                for mode in order:
                    engine, server = servers[mode]
                    before = list(engine.kind_steps)
                    raw = on_main_thread(
                        engine, lambda url=server.url, n=n: run_concurrency(url, texts, n, requests, max_tokens)
                    )
                    steps[mode] = [a + b - c for a, b, c in zip(steps[mode], engine.kind_steps, before, strict=True)]
                    measured[mode].append(raw)
                    rate = raw["tokens"] / raw["seconds"]
                    print(f"bench-serve: {mode:<11} N={n:<3} round {round_ + 1}: {rate:.1f} tokens/s")
            for mode in MODES:
                row = summarize(measured[mode])
                taken, kinds = max(1, sum(steps[mode])), servers[mode][0].policy.kinds
                row["tree_step_share"] = round(sum(steps[mode][1:]) / taken, 3)  # steps of any tree
                row["step_shares"] = {kind: round(k / taken, 3) for kind, k in zip(kinds, steps[mode], strict=True)}
                row["rounds_tokens_per_second"] = [round(r["tokens"] / r["seconds"], 2) for r in measured[mode]]
                table[mode][str(n)] = row
            shares = table["speculative"][str(n)]["step_shares"].items()
            print(f"bench-serve: N={n:<3} the adaptive server's steps: " + ", ".join(f"{k} {v:.0%}" for k, v in shares))
    finally:
        for _, server in servers.values():
            server.stop()
    ratio = {
        str(n): round(
            table["speculative"][str(n)]["tokens_per_second"] / table["plain"][str(n)]["tokens_per_second"], 3
        )
        for n in concurrencies
    }
    # Each round's pair, run back to back: the machine's drift over a concurrency's rounds weighs on
    # the pooled ratio above, much less on the median of these.
    round_ratios = {
        str(n): [
            round(speculative / plain, 3)
            for speculative, plain in zip(
                table["speculative"][str(n)]["rounds_tokens_per_second"],
                table["plain"][str(n)]["rounds_tokens_per_second"],
                strict=True,
            )
        ]
        for n in concurrencies
    }
    result = {
        "config": {
            "prompts": len(prompts),
            "requests_per_concurrency": requests,
            "rounds": rounds,
            "max_tokens": max_tokens,
            "max_batch": max_batch,
            "speculate_max_batch": "measured" if speculate_max_batch is None else speculate_max_batch,
            "dtype": str(rd.target.dtype).removeprefix("torch."),
            "weights": rd.quantization.weights,
            "drafter_weights": rd.drafter_weights,
            "compile": rd.compile,
            "small_tree": rd.small_tree,
            "lone_tree": rd.lone_tree,
            "tree": {"beams": rd.num_beams, "draft_len": rd.draft_len, "tree_nodes": rd.tree_nodes},
        },
        "results": table,
        "speculative_over_plain": ratio,
        "round_ratios": round_ratios,
        "median_round_ratio": {n: round(statistics.median(r), 3) for n, r in round_ratios.items()},
        "measured_rates": servers["speculative"][0].policy.table(),  # what the adaptive choice saw, per batch size
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "serve.json", result)
    plot_serve(result, out / "serve.png")
    return result


def plot_serve(result: dict, path: Path) -> None:
    """Throughput and latency against concurrency, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_write

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for mode, rows in result["results"].items():
        ns = [int(n) for n in rows]
        for ax, key, label in [
            (axes[0], "tokens_per_second", "tokens/s"),
            (axes[1], "ttft_p50_ms", "time to first token p50 (ms)"),
            (axes[2], "itl_p50_ms", "inter-token latency p50 (ms)"),
        ]:
            ax.plot(ns, [rows[str(n)][key] or 0 for n in ns], marker="o", label=mode)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.set_title(label)
    axes[0].legend()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)
