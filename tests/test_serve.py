"""`redrafter serve`: a live server on 127.0.0.1 driven by the official `openai` client.

Tiny float64 model (a word-level tokenizer: text "w5 w6" is tokens 5, 6), a random drafter. Greedy
answers equal `ReDrafter.generate`'s; 32 concurrent streams each equal their answer alone.
"""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from redrafter import ReDrafter
from redrafter.serve import BackgroundServer, Engine, build_app, free_port

MODEL = "tiny"


class LiveServer:
    """A :class:`BackgroundServer` around a fresh :class:`Engine`, with an ``openai`` client."""

    def __init__(self, rd: ReDrafter, **engine_options) -> None:
        self.engine = Engine(rd, **engine_options)
        self.background = BackgroundServer(build_app(self.engine, MODEL))
        self.url = self.background.url
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def stop(self) -> None:
        self.background.stop()

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"{self.url}/metrics").read().decode()
        lines = [line for line in text.splitlines() if not line.startswith("#")]
        return sum(float(line.split()[-1]) for line in lines if line.split()[0] == name or line.startswith(name + "{"))


@pytest.fixture(scope="module")
def rd(model_dir, drafter_dir):
    return ReDrafter.from_pretrained(model_dir, drafter=drafter_dir, dtype="float64", num_beams=3, draft_len=4)


@pytest.fixture(scope="module")
def server(rd):
    live = LiveServer(rd, max_batch=8, max_queue=64)
    yield live
    live.stop()


def expected(rd: ReDrafter, prompt: str, max_tokens: int, raw: bool) -> str:
    return rd.generate(prompt, max_new_tokens=max_tokens, raw=raw).text


def test_chat_and_completions_greedy_equal_generate(server, rd):
    chat = server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "w5 w6 w7"}], max_tokens=12, temperature=0
    )
    assert chat.choices[0].message.content == expected(rd, "w5 w6 w7", 12, raw=False)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 12
    assert chat.model_extra["usage"]["redrafter"]["target_forwards"] >= 1 if chat.model_extra else True
    text = server.client.completions.create(model=MODEL, prompt="w9 w3", max_tokens=10, temperature=0)
    assert text.choices[0].text == expected(rd, "w9 w3", 10, raw=True)
    raw = json.loads(
        httpx.post(
            f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "w9 w3", "max_tokens": 10, "temperature": 0}
        ).text
    )
    usage = raw["usage"]
    assert usage["prompt_tokens"] == 2 and usage["completion_tokens"] == 10 and usage["total_tokens"] == 12
    assert usage["redrafter"]["target_forwards"] >= 1 and usage["redrafter"]["tokens_per_forward"] >= 1


def test_streamed_text_equals_the_whole_answer_and_usage_comes_last(server, rd):
    stream = server.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "w11 w12"}],
        max_tokens=15,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected(rd, "w11 w12", 15, raw=False)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 15 and not chunks[-1].choices


def test_stop_strings_are_cut_and_reported(server, rd):
    whole = expected(rd, "w20 w21", 20, raw=True).split()
    stop = whole[5]  # a word the answer reaches
    answer = server.client.completions.create(model=MODEL, prompt="w20 w21", max_tokens=20, temperature=0, stop=[stop])
    cut = " ".join(whole)[: " ".join(whole).index(stop)]
    assert answer.choices[0].text == cut and answer.choices[0].finish_reason == "stop"
    streamed = server.client.completions.create(
        model=MODEL, prompt="w20 w21", max_tokens=20, temperature=0, stop=stop, stream=True
    )
    pieces = list(streamed)
    assert "".join(p.choices[0].text for p in pieces) == cut and pieces[-1].choices[0].finish_reason == "stop"


def test_a_seed_reproduces_a_sampled_answer(server):
    def sample(seed: int) -> str:
        answer = server.client.completions.create(
            model=MODEL, prompt="w30 w31", max_tokens=16, temperature=1.0, seed=seed, extra_body={"top_k": 40}
        )
        return answer.choices[0].text

    assert sample(5) == sample(5)
    assert len({sample(s) for s in range(6)}) > 1  # sampling, not greedy


BAD_REQUESTS = [
    ({"model": MODEL, "messages": "hi"}, 400, "messages"),
    ({"model": MODEL}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "w5"}]}, 400, "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "n": 2}, 400, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "logprobs": True}, 400, "logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "max_tokens": "x"}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "temperature": True}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": " ".join(["w5"] * 70)}]}, 400, "messages"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "w5"}]}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, body, status, param):
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_malformed_json_and_the_plain_endpoints(server):
    response = httpx.post(
        f"{server.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert [m.id for m in server.client.models.list().data] == [MODEL]
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("redrafter_generated_tokens_total", "redrafter_target_forwards_total", "redrafter_batch_size"):
        assert name in metrics


def test_32_concurrent_streams_each_equal_their_answer_alone(server, rd):
    prompts = [f"w{2 + k} w{40 + k}" for k in range(32)]
    alone = {p: expected(rd, p, 14, raw=True) for p in prompts}

    def stream(prompt: str) -> str:
        chunks = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=14, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks)

    accepted = 'redrafter_requests_total{outcome="accepted"}'
    before = server.metric(accepted)
    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(stream, prompts))
    assert answers == [alone[p] for p in prompts]  # none lost, none mixed up
    assert server.metric(accepted) - before == 32  # none duplicated
    assert server.metric("redrafter_batch_size") == 0


def test_a_client_that_disconnects_frees_its_row(server):
    before = server.metric("redrafter_cancelled_rows_total")
    with httpx.stream(
        "POST",
        f"{server.url}/v1/completions",
        json={"model": MODEL, "prompt": "w50 w51", "max_tokens": 2000, "temperature": 0, "stream": True},
    ) as response:
        next(response.iter_lines())  # the first token arrived; now go away
    deadline = time.monotonic() + 30
    while server.metric("redrafter_cancelled_rows_total") == before:
        assert time.monotonic() < deadline, "the row was not freed"
        time.sleep(0.05)
    assert server.metric("redrafter_batch_size") == 0


def test_a_full_queue_gets_429_and_shutdown_finishes_running_rows(rd):
    live = LiveServer(rd, max_batch=1, max_queue=1)
    try:
        body = {"model": MODEL, "prompt": "w5", "max_tokens": 40, "temperature": 0}
        with ThreadPoolExecutor(max_workers=6) as pool:
            responses = list(
                pool.map(lambda _: httpx.post(f"{live.url}/v1/completions", json=body, timeout=60), range(6))
            )
        codes = sorted(r.status_code for r in responses)
        assert 429 in codes and 200 in codes
        refused = next(r for r in responses if r.status_code == 429).json()["error"]
        assert refused["code"] == "queue_full" and refused["type"] == "rate_limit_error"
        with ThreadPoolExecutor(max_workers=1) as pool:
            running = pool.submit(httpx.post, f"{live.url}/v1/completions", json=body, timeout=60)
            time.sleep(0.3)
            live.stop()  # graceful: the running request completes
            assert running.result().status_code == 200
    finally:
        live.stop()


def test_bench_serve_writes_both_modes_at_every_concurrency(capsys, model_dir, drafter_dir, tmp_path):
    from redrafter.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{5 + k} w{9 + k}"}) + "\n" for k in range(3)))
    argv = ["bench-serve", "--model", str(model_dir), "--drafter", str(drafter_dir), "--dtype", "float64"]
    argv += ["--prompts", str(prompts), "--concurrency", "1,3", "--requests", "2", "--max-new-tokens", "6"]
    assert main(argv + ["--rounds", "2", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "serve.json").read_text())
    for mode in ("speculative", "plain"):
        for n, requests in (("1", 2), ("3", 3)):
            row = result["results"][mode][n]
            assert row["requests"] == 2 * requests and row["tokens"] == 12 * requests and row["tokens_per_second"] > 0
            assert len(row["rounds_tokens_per_second"]) == 2
            # (chunks of one step can arrive together: a gap of 0.0 ms is possible on a tiny model)
            assert row["ttft_p50_ms"] > 0 and row["itl_p99_ms"] >= row["itl_p50_ms"] >= 0
    assert set(result["speculative_over_plain"]) == {"1", "3"}
    assert len(result["round_ratios"]["3"]) == 2 and set(result["median_round_ratio"]) == {"1", "3"}
    assert result["results"]["plain"]["3"]["tree_step_share"] == 0  # never speculates
    assert result["results"]["speculative"]["1"]["tree_step_share"] > 0  # the prior: trees at one row
    shares = result["results"]["speculative"]["1"]["step_shares"]  # what the choice took, per kind
    assert set(shares) == {"plain", "tree", "small_tree"} and sum(shares.values()) == pytest.approx(1, abs=0.002)
    assert shares["tree"] + shares["small_tree"] == pytest.approx(
        result["results"]["speculative"]["1"]["tree_step_share"], abs=0.002
    )
    assert result["results"]["plain"]["3"]["step_shares"] == {"plain": 1.0, "tree": 0.0}
    assert "N=1   the adaptive server's steps: plain" in capsys.readouterr().out
    assert result["config"]["speculate_max_batch"] == "measured" and result["measured_rates"]["1"]["tree_steps"] > 0
    # the server offers the small tree by default
    assert result["config"]["small_tree"] and "small_tree_steps" in result["measured_rates"]["1"]
    assert (tmp_path / "out" / "serve.png").stat().st_size > 0


def test_the_serve_command_answers_then_exits_0_on_sigterm(model_dir, drafter_dir, tmp_path):
    """`redrafter serve` as a process: SIGTERM in the middle of a stream lets it finish, then exits 0."""
    import signal
    import subprocess
    import sys

    port = free_port()
    command = [sys.executable, "-m", "redrafter.cli", "serve", "--model", str(model_dir), "--drafter", str(drafter_dir)]
    process = subprocess.Popen(command + ["--dtype", "float64", "--port", str(port)], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                assert httpx.get(f"{url}/health").json() == {"status": "ok"}
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        body = {"model": "default", "prompt": "w5 w6", "max_tokens": 30, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            process.send_signal(signal.SIGTERM)  # mid-stream: this request must still complete
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert process.wait(timeout=60) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        process.kill()


def test_the_server_takes_the_engines_lone_row_choice(model_dir, drafter_dir):
    """A lone row takes the tree every step in the server too where the engine says so (w4a8 by
    default); a fixed threshold (``speculate_max_batch``) still rules when given."""
    rd = ReDrafter.from_pretrained(model_dir, drafter=drafter_dir, dtype="float32", lone_tree=True)
    engine = Engine(rd)
    assert engine.policy.adaptive and engine.policy.lone_tree and engine.policy.choose([0]) == 1
    assert Engine(rd, speculate_max_batch=0).policy.choose([0]) == 0
    assert not Engine(ReDrafter.from_pretrained(model_dir, drafter=drafter_dir, dtype="float32")).policy.lone_tree
