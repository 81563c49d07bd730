"""Load test of `loraft serve` over loopback: 50 concurrent clients, each posting one SMS of the
book's test split at a time to /v1/classify until a fixed number of requests is done. Throughput,
latency percentiles and errors; by default measured side by side against the same server eager
(--no-compile) and with micro-batching off (--max-batch 1), on the same requests. Client and server
share this machine.

    LORAFT_DATA_DIR=../shared/data python benchmarks/load_test.py runs/sms-spam/adapter
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from loraft.data.sms_spam import load_sms_spam

OUT = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(adapter: str, *flags: str) -> tuple[subprocess.Popen, str]:
    """`loraft serve` on a free loopback port; returns once it answers /healthz."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "loraft", "serve", "--adapter", f"spam={adapter}", "--port", str(port), *flags]
    )
    url = f"http://127.0.0.1:{port}/"
    while process.poll() is None:
        try:
            httpx.get(url + "healthz").raise_for_status()
            return process, url
        except httpx.ConnectError:
            time.sleep(0.5)
    raise SystemExit(f"the server did not start (exit code {process.returncode})")


async def load(url: str, texts: list[str], clients: int, requests: int) -> dict:
    latencies, errors = [], []
    next_request = iter(range(requests))

    async def client(http: httpx.AsyncClient):
        for i in next_request:  # the clients share one counter: `requests` in all
            started = time.perf_counter()
            try:
                reply = await http.post(url + "v1/classify", json={"adapter": "spam", "texts": [texts[i % len(texts)]]})
                if reply.status_code != 200 or len(reply.json()["results"]) != 1:
                    errors.append(f"{reply.status_code}: {reply.text[:200]}")
            except httpx.HTTPError as e:
                errors.append(repr(e))
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "requests": requests,
        "clients": clients,
        "errors": len(errors),
        "error_examples": errors[:5],
        "seconds": seconds,
        "requests_per_second": requests / seconds,
        "latency_ms": {
            "p50": 1000 * quantiles[49],
            "p90": 1000 * quantiles[89],
            "p99": 1000 * quantiles[98],
            "max": 1000 * max(latencies),
        },
    }


def measure(adapter: str, texts: list[str], clients: int, requests: int, *flags: str) -> dict:
    process, url = start_server(adapter, *flags)
    try:
        asyncio.run(load(url, texts, clients, 2 * clients))  # warm up: first calls, allocator, connections
        before = httpx.get(url + "healthz").json()
        result = asyncio.run(load(url, texts, clients, requests))
        after = httpx.get(url + "healthz").json()
    finally:
        process.terminate()
        process.wait(timeout=60)
    result["mean_texts_per_batch"] = (after["texts"] - before["texts"]) / max(1, after["batches"] - before["batches"])
    result["server_flags"] = list(flags)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="a trained spam adapter folder")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--no-compare", action="store_true", help="only the default (batching, compiled) server")
    args = parser.parse_args()
    texts = load_sms_spam().test.texts
    results = {
        "machine": {"cpus": os.cpu_count()},
        "batched": measure(args.adapter, texts, args.clients, args.requests),
    }
    if not args.no_compare:
        results["eager"] = measure(args.adapter, texts, args.clients, args.requests, "--no-compile")
        results["throughput_ratio_compiled_vs_eager"] = (
            results["batched"]["requests_per_second"] / results["eager"]["requests_per_second"]
        )
        results["unbatched"] = measure(
            args.adapter, texts, args.clients, args.requests, "--max-batch", "1", "--batch-window-ms", "0"
        )
        results["throughput_ratio_batched_vs_unbatched"] = (
            results["batched"]["requests_per_second"] / results["unbatched"]["requests_per_second"]
        )
    for name in ("batched", "eager", "unbatched"):
        if name in results:
            r = results[name]
            print(
                f"{name:>9}: {r['requests']} requests from {r['clients']} clients in {r['seconds']:.1f} s: "
                f"{r['requests_per_second']:.1f} requests/s, p50 {r['latency_ms']['p50']:.0f} ms, p99 {r['latency_ms']['p99']:.0f} ms, "
                f"{r['mean_texts_per_batch']:.1f} texts per batch, {r['errors']} errors"
            )
    if "unbatched" in results:
        print(f"compiled: {results['throughput_ratio_compiled_vs_eager']:.2f}x the eager server's throughput")
        print(f"micro-batching: {results['throughput_ratio_batched_vs_unbatched']:.2f}x the throughput")
    OUT.mkdir(exist_ok=True)
    (OUT / "load_test.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
