"""Load test of `loraft serve`'s OpenAI chat completions over loopback, side by side in one run:

1. streaming: 50 clients at once, over two instruction adapters (alternating), each streaming one
   greedy answer to one of the book's instructions, against the same 50 requests served one at a
   time: time to first token (p50, p99), tokens/s per stream and in all, errors, and how many answers
   are the same both ways;
2. the queue bound: a burst of 3 x --max-queue requests at a server with a small --max-queue: how many
   were refused 503 (with Retry-After) and whether every admitted one was answered whole;
3. fairness: a small classification request sent just after one of the largest allowed (64 texts of
   4,000 characters), both timed, with micro-batches interleaved (the default --max-batch-tokens) and
   without (one forward pass per request, as before).

Client and server share this machine; every request goes to 127.0.0.1, and every phase is bounded in
count and time. Without --adapter, two instruction adapters (random LoRA weights: speed does not depend
on them) and a classifier are made over SmolLM2-135M in a temporary folder.

    LORAFT_DATA_DIR=../shared/data python benchmarks/serve_generation.py [--adapter a=DIR --adapter b=DIR]
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from loraft import lora
from loraft.adapters import save_adapter
from loraft.classifier import add_classification_head
from loraft.data.instruction import book_file, read_examples
from loraft.data.sms_spam import load_sms_spam
from loraft.models import load_model

OUT = Path(__file__).parent / "results"
TIMEOUT = httpx.Timeout(600)  # no request of these phases may take longer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*flags: str) -> tuple[subprocess.Popen, str]:
    """`loraft serve` on a free loopback port; returns once it answers /healthz."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "loraft", "serve", "--port", str(port), *flags])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline:
        try:
            httpx.get(url + "/healthz").raise_for_status()
            return process, url
        except httpx.ConnectError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the server did not start (exit code {process.returncode})")


def make_adapters(folder: Path) -> tuple[list[str], Path]:
    """Two instruction adapters (Alpaca and chat template) and a 2-class classifier over SmolLM2-135M,
    with random LoRA weights."""
    model, _ = load_model("smollm2-135m")
    specs = []
    for seed, (name, template) in enumerate([("alpaca", "alpaca"), ("chat", "chat")]):
        torch.manual_seed(seed)
        lora.apply_lora(model, rank=16, name=name)
        for module in model.modules():
            if isinstance(module, lora.LoRALinear) and name in module.lora_B:
                torch.nn.init.normal_(module.lora_B[name], std=0.01)
        save_adapter(model, folder / name, name, task="instruction", template=template, max_length=256)
        specs.append(f"{name}={folder / name}")
    lora.apply_lora(model, rank=16, name="spam")
    add_classification_head(model, 2, "spam")
    classify = dict(
        task="classification", label_names=["ham", "spam"], template="{text}", max_length=128, pooling="last"
    )
    save_adapter(model, folder / "spam", "spam", method="lora", **classify)
    return specs, folder / "spam"


async def stream_one(http: httpx.AsyncClient, url: str, model: str, instruction: str, max_tokens: int) -> dict:
    """One streamed greedy chat completion: its text, tokens, time to first token and to the end."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": instruction}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started, first, text, tokens = time.perf_counter(), None, [], None
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            return {"error": f"{reply.status_code}: {(await reply.aread())[:200]!r}"}
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    text.append(choice["delta"]["content"])
    ended = time.perf_counter()
    first = first or ended
    return {
        "text": "".join(text),
        "tokens": tokens,
        "ttft_s": first - started,
        "seconds": ended - started,
        "stream_tokens_per_s": (tokens - 1) / (ended - first) if tokens and tokens > 1 and ended > first else None,
    }


def summary(results: list[dict], seconds: float) -> dict:
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft_s"] for r in ok]
    rates = [r["stream_tokens_per_s"] for r in ok if r["stream_tokens_per_s"]]

    def pct(values, q):
        return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values or [float("nan")])[0]

    tokens = sum(r["tokens"] or 0 for r in ok)
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_examples": [r["error"] for r in results if "error" in r][:5],
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s_all": tokens / seconds,
        "ttft_s": {"p50": pct(ttft, 50), "p99": pct(ttft, 99), "max": max(ttft, default=float("nan"))},
        "stream_tokens_per_s": {"p50": pct(rates, 50), "p1": pct(rates, 1)},
    }


async def streaming(url: str, requests: list[tuple[str, str]], max_tokens: int, together: bool) -> tuple[dict, list]:
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(limits=limits, timeout=TIMEOUT) as http:
        started = time.perf_counter()
        if together:
            results = await asyncio.gather(*(stream_one(http, url, m, q, max_tokens) for m, q in requests))
        else:
            results = [await stream_one(http, url, m, q, max_tokens) for m, q in requests]
        seconds = time.perf_counter() - started
    return summary(list(results), seconds), list(results)


async def burst(url: str, model: str, count: int, max_tokens: int) -> dict:
    async def one(http):
        body = {"model": model, "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": max_tokens}
        reply = await http.post(url + "/v1/chat/completions", json={**body, "temperature": 0})
        if reply.status_code == 503:
            return "refused", reply.headers.get("retry-after")
        usage = reply.json().get("usage", {}) if reply.status_code == 200 else {}
        return ("answered" if usage.get("completion_tokens") else f"status {reply.status_code}"), usage

    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=TIMEOUT) as http:
        outcomes = await asyncio.gather(*(one(http) for _ in range(count)))
    kinds = [kind for kind, _ in outcomes]
    return {
        "sent": count,
        "answered": kinds.count("answered"),
        "refused_503": kinds.count("refused"),
        "refused_with_retry_after": sum(1 for kind, extra in outcomes if kind == "refused" and extra),
        "other": [kind for kind in kinds if kind not in ("answered", "refused")],
    }


async def fairness(url: str, texts: list[str]) -> dict:
    big = {"adapter": "spam", "texts": [(t + " ") * (4000 // (len(t) + 1)) for t in texts[:64]]}
    small = {"adapter": "spam", "texts": [texts[100]]}

    async with httpx.AsyncClient(timeout=TIMEOUT) as http:

        async def timed(body, delay):
            await asyncio.sleep(delay)
            started = time.perf_counter()
            reply = await http.post(url + "/v1/classify", json=body)
            assert reply.status_code == 200, reply.text
            return time.perf_counter() - started

        await timed(small, 0)  # warm up
        big_s, small_s = await asyncio.gather(timed(big, 0), timed(small, 0.05))
    return {"big_request_s": big_s, "small_request_s": small_s, "small_over_big": small_s / big_s}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="two instruction adapters")
    parser.add_argument("--classifier", help="a classification adapter folder for the fairness phase")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-queue", type=int, default=20, help="of the queue-bound phase's server")
    args = parser.parse_args()
    results = {"machine": {"cpus": os.cpu_count()}, "clients": args.clients, "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        made, classifier = make_adapters(Path(tmp)) if not (args.adapter and args.classifier) else ([], None)
        specs = args.adapter or made
        classifier = args.classifier or classifier
        if len(specs) != 2:
            raise SystemExit("give two instruction adapters (--adapter NAME=DIR twice), or none")
        names = [spec.split("=", 1)[0] for spec in specs]
        instructions = [e.instruction for e in read_examples(book_file())][: args.clients]
        requests = [(names[i % 2], q) for i, q in enumerate(instructions)]
        flags = [flag for spec in specs for flag in ("--adapter", spec)]

        process, url = start_server(*flags, "--max-batch", str(args.clients), "--max-queue", str(4 * args.clients))
        try:
            asyncio.run(streaming(url, requests[:4], 8, together=True))  # warm up
            results["together"], together = asyncio.run(streaming(url, requests, args.max_tokens, together=True))
            results["one_at_a_time"], alone = asyncio.run(streaming(url, requests, args.max_tokens, together=False))
            results["largest_decode_batch"] = httpx.get(url + "/healthz").json()["largest_decode_batch"]
        finally:
            process.terminate()
            process.wait(timeout=60)
        same = [a.get("text") == b.get("text") for a, b in zip(together, alone)]
        results["same_answer_together_and_alone"] = f"{sum(same)} of {len(same)}"

        process, url = start_server(*flags, "--max-queue", str(args.max_queue), "--max-batch", "8")
        try:
            results["queue_bound"] = {"max_queue": args.max_queue}
            results["queue_bound"] |= asyncio.run(burst(url, names[0], 3 * args.max_queue, 32))
        finally:
            process.terminate()
            process.wait(timeout=60)

        texts = load_sms_spam().test.texts
        for name, extra in [("interleaved", []), ("one_pass_per_request", ["--max-batch-tokens", "1000000"])]:
            process, url = start_server("--adapter", f"spam={classifier}", "--max-batch", "64", *extra)
            try:
                results[f"fairness_{name}"] = asyncio.run(fairness(url, texts))
            finally:
                process.terminate()
                process.wait(timeout=60)

    for name in ("together", "one_at_a_time"):
        r = results[name]
        print(
            f"{name:>13}: {r['requests']} streams, {r['errors']} errors, {r['seconds']:.1f} s; time to first token "
            f"p50 {r['ttft_s']['p50']:.2f} s, p99 {r['ttft_s']['p99']:.2f} s; per stream p50 "
            f"{r['stream_tokens_per_s']['p50']:.1f} tokens/s; in all {r['tokens_per_s_all']:.1f} tokens/s"
        )
    print(f"same answers together and alone: {results['same_answer_together_and_alone']}")
    q = results["queue_bound"]
    print(
        f"queue bound {q['max_queue']}: {q['sent']} sent, {q['answered']} answered whole, {q['refused_503']} refused 503"
    )
    for name in ("interleaved", "one_pass_per_request"):
        f = results[f"fairness_{name}"]
        print(
            f"fairness ({name}): largest request {f['big_request_s']:.2f} s, a small one sent 50 ms after it "
            f"{f['small_request_s']:.2f} s ({f['small_over_big']:.2f}x)"
        )
    OUT.mkdir(exist_ok=True)
    (OUT / "serve_generation.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
