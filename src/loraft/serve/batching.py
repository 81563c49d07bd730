"""Micro-batching: one worker thread owns the model. A request waits in a queue for a few
milliseconds, and every text to classify that arrived meanwhile, whatever its adapter, runs in the
same forward passes (each row through its own LoRA and head). The event loop never runs the model."""

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial

import torch

from .. import lora
from ..classifier import classify_logits
from ..data.classification import collate
from ..instruct import respond
from ..models import model_device
from ..precision import bf16_autocast


@dataclass
class Classify:
    adapter: str
    texts: list[str]
    future: Future = field(default_factory=Future)  # -> a list of probability lists, one per text


@dataclass
class Generate:
    adapter: str
    instruction: str
    input: str
    max_new_tokens: int
    future: Future = field(default_factory=Future)  # -> the response text


class MicroBatcher:
    def __init__(self, served, window_ms: float = 5.0, max_batch: int = 32):
        self.served = served
        self.window_s = window_ms / 1000
        self.max_batch = max_batch
        self.jobs = queue.SimpleQueue()
        self.stats = {"classify_requests": 0, "texts": 0, "batches": 0, "forward_passes": 0, "generate_requests": 0}
        self.thread = threading.Thread(target=self.work, name="loraft-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Classify | Generate) -> Future:
        self.jobs.put(job)
        return job.future

    def close(self):
        self.jobs.put(None)
        self.thread.join()

    def work(self):
        deferred = deque()  # jobs taken from the queue while gathering a batch, but not batched
        while True:
            job = deferred.popleft() if deferred else self.jobs.get()
            if job is None:
                return
            if isinstance(job, Generate):
                run(job, partial(self.generate, job))
                continue
            batch = [job]
            deadline = time.perf_counter() + self.window_s
            while sum(len(j.texts) for j in batch) < self.max_batch:
                try:
                    more = self.jobs.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                (batch if isinstance(more, Classify) else deferred).append(more)
            self.classify_batch(batch)

    def classify_batch(self, batch: list[Classify]):
        rows = [(job.adapter, text) for job in batch for text in job.texts]
        try:
            probs = self.classify_rows(rows)
        except Exception as e:  # a fault in one batch fails its requests, never the worker
            for job in batch:
                job.future.set_exception(e)
            return
        start = 0
        for job in batch:
            job.future.set_result(probs[start : start + len(job.texts)])
            start += len(job.texts)
        self.stats["batches"] += 1
        self.stats["classify_requests"] += len(batch)
        self.stats["texts"] += len(rows)

    @torch.no_grad()
    def classify_rows(self, rows: list[tuple[str, str]]) -> list[list[float]]:
        """Class probabilities of (adapter, text) rows. Rows are sorted by length (little padding) and
        grouped by pooling and head size, which one forward pass must share."""
        model, tokenizer, adapters = self.served.model, self.served.tokenizer, self.served.adapters
        token_lists = [None] * len(rows)
        for name in dict.fromkeys(adapter for adapter, _ in rows):
            indices = [i for i, (adapter, _) in enumerate(rows) if adapter == name]
            encoded = adapters[name].format.encode(tokenizer, [rows[i][1] for i in indices])
            for i, ids in zip(indices, encoded):
                token_lists[i] = ids

        def group(i):
            adapter = adapters[rows[i][0]]
            return adapter.format.pooling, len(adapter.label_names)

        order = sorted(range(len(rows)), key=lambda i: (group(i), len(token_lists[i])))
        probs = [None] * len(rows)
        start = 0
        while start < len(order):
            chunk = [i for i in order[start : start + self.max_batch] if group(i) == group(order[start])]
            start += len(chunk)
            lora.set_per_row(model, [rows[i][0] for i in chunk])
            batch = collate(
                [token_lists[i] for i in chunk], [0] * len(chunk), tokenizer.pad_id, max(map(len, token_lists))
            )
            with bf16_autocast(model_device(model), self.served.bf16):
                logits = classify_logits(model, batch, group(chunk[0])[0])
            for i, p in zip(chunk, torch.softmax(logits, -1).tolist()):
                probs[i] = p
            self.stats["forward_passes"] += 1
        return probs

    def generate(self, job: Generate) -> str:
        served = self.served
        lora.set_active(served.model, job.adapter)
        response = respond(
            served.model,
            served.tokenizer,
            served.adapters[job.adapter].meta,
            job.instruction,
            job.input,
            job.max_new_tokens,
        )
        self.stats["generate_requests"] += 1
        return response


def run(job, compute):
    try:
        job.future.set_result(compute())
    except Exception as e:  # reported to the request that asked, the worker goes on
        job.future.set_exception(e)
