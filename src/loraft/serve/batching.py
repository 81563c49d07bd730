"""The worker: one thread owns the model, and the event loop never runs it. Each turn of its loop it
runs one micro-batch of texts to classify and one step of the generations running, so neither kind
waits for the other to finish:

- Classification: the texts of every waiting request, whatever its adapter, are taken round-robin (a
  text of each request in turn) into a micro-batch of at most `max_batch` texts and `max_batch_tokens`
  tokens. A large request is split over several micro-batches, and a small one that arrives after it
  runs in the next. Each row runs through its own LoRA and head.
- Generation (continuous batching): waiting requests join the running batch (each prompt runs alone,
  at most `max_batch_tokens` prompt tokens a turn), then every running sequence gets its next token
  from one forward pass, each row through its own adapter (generate.DecodeBatch); a sequence leaves
  when it ends, or when its request is cancelled (the client went, the deadline passed).

When idle, the worker waits up to `window_ms` after a request for others to batch with. Adapters are
loaded and taken off between two turns."""

import queue
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .. import lora
from ..adapters import load_adapter
from ..classifier import classify_logits
from ..data.classification import collate
from ..generate import DecodeBatch, next_token
from ..models import model_device
from ..precision import bf16_autocast
from .registry import ServedAdapter


@dataclass
class Classify:
    adapter: str
    texts: list[str]
    future: Future = field(default_factory=Future)  # -> a list of probability lists, one per text
    cancelled: bool = False  # set by the event loop: the rest is not worth computing
    token_lists: list[list[int]] = field(default_factory=list)  # the worker's, from here on
    probs: list = field(default_factory=list)
    taken: int = 0  # texts put into a micro-batch so far


@dataclass
class Finished:
    reason: str  # OpenAI's finish_reason: "stop" (a stop token) or "length" (max_tokens)


@dataclass
class Generate:
    """A sequence to generate. `emit` is called from the worker thread with each new token id, then with
    a Finished, or with an exception if it fails."""

    adapter: str | None  # None: the base model
    prompt_ids: list[int]
    max_tokens: int
    stop_ids: frozenset[int]
    emit: Callable
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    cancelled: bool = False  # set by the event loop
    generated: int = 0  # the worker's, from here on
    last_token: int | None = None
    done: bool = False

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None

    def finish(self, outcome):
        self.done = True
        self.emit(outcome)


@dataclass
class AdapterChange:
    """Put `adapter` on the model and serve it as `name`, or with no adapter take `name` off."""

    name: str
    adapter: ServedAdapter | None = None
    future: Future = field(default_factory=Future)


class Worker:
    """The loop of the thread that owns the model: `model_thread`, the one that loaded it (PyTorch keeps an
    OpenMP thread pool per thread that runs its ops; with two pools over the cores, libgomp stops its
    workers' spin-waits and every small op waits on a wake-up, README: Serve it), else a thread of its own."""

    def __init__(
        self,
        served,
        window_ms: float = 5.0,
        max_batch: int = 32,
        max_batch_tokens: int = 1024,
        model_thread: ThreadPoolExecutor | None = None,
    ):
        self.served = served
        self.window_s = window_ms / 1000
        self.max_batch, self.max_batch_tokens = max_batch, max_batch_tokens
        self.jobs = queue.SimpleQueue()
        self.classifying: deque[Classify] = deque()
        self.waiting: deque[Generate] = deque()
        self.running: list[Generate] = []  # in the order of the decode batch's rows
        self.decode = DecodeBatch(served.model)
        self.stats = {
            "classify_requests": 0,
            "texts": 0,
            "batches": 0,
            "forward_passes": 0,
            "generate_requests": 0,
            "generated_tokens": 0,
            "decode_steps": 0,
            "largest_decode_batch": 0,
        }
        self.own_thread = model_thread is None
        self.model_thread = model_thread or ThreadPoolExecutor(1, thread_name_prefix="loraft-worker")
        self.loop = self.model_thread.submit(self.work)

    def submit(self, job: Classify | Generate | AdapterChange):
        self.jobs.put(job)
        return getattr(job, "future", None)

    def close(self):
        self.jobs.put(None)
        self.loop.result()
        if self.own_thread:
            self.model_thread.shutdown()

    def work(self):
        while self.take(block=not (self.classifying or self.waiting or self.running)):
            self.classify_step()
            self.generate_step()
        for job in [*self.classifying, *self.waiting, *self.running]:
            fail(job, RuntimeError("the server is shutting down"))

    def take(self, block: bool) -> bool:
        """Move the jobs that arrived into their queues; when idle, wait for one, then for the batch
        window. False once the worker is closed."""
        try:
            job = self.jobs.get() if block else self.jobs.get_nowait()
        except queue.Empty:
            return True
        deadline = time.perf_counter() + self.window_s if block else 0.0
        while job is not None:
            self.accept(job)
            try:
                wait = deadline - time.perf_counter()
                job = self.jobs.get(timeout=wait) if wait > 0 else self.jobs.get_nowait()
            except queue.Empty:
                return True
        return False

    def accept(self, job):
        if isinstance(job, Generate):
            self.waiting.append(job)
        elif not job.future.set_running_or_notify_cancel():  # its request gave up first (once running, it cannot)
            return
        elif isinstance(job, Classify):
            try:
                job.token_lists = self.served.adapters[job.adapter].format.encode(self.served.tokenizer, job.texts)
            except Exception as e:
                return fail(job, e)
            job.probs = [None] * len(job.texts)
            self.classifying.append(job)
        else:
            run(job, lambda: self.change_adapter(job))

    def change_adapter(self, change: AdapterChange):
        served = self.served
        if change.adapter is None:
            lora.delete_adapter(served.model, change.name)
            del served.adapters[change.name]
            return
        load_adapter(served.model, change.adapter.folder, change.name)  # checks the base's fingerprint first
        served.model.requires_grad_(False)
        served.adapters[change.name] = change.adapter
        if served.compiled:
            warm_up(served, [change.name])

    # ------------------------------------------------------------ classification

    def classify_step(self):
        self.classifying = deque(job for job in self.classifying if not job.cancelled)
        rows, tokens, full = [], 0, False
        while not full:
            pending = [job for job in self.classifying if job.taken < len(job.texts)]
            if not pending:
                break
            for job in pending:  # one text of each request in turn
                length = len(job.token_lists[job.taken])
                full = len(rows) == self.max_batch or (bool(rows) and tokens + length > self.max_batch_tokens)
                if full:
                    break
                rows.append((job, job.taken))
                job.taken += 1
                tokens += length
        if not rows:
            return
        try:
            probs, passes = classify(self.served, [(job.adapter, job.token_lists[i]) for job, i in rows])
        except Exception as e:  # a fault in one micro-batch fails its requests, never the worker
            for job in {id(job): job for job, _ in rows}.values():
                fail(job, e)
                self.classifying.remove(job)
            return
        for (job, i), p in zip(rows, probs):
            job.probs[i] = p
        for job in [job for job in self.classifying if None not in job.probs]:
            job.future.set_result(job.probs)
            self.classifying.remove(job)
            self.stats["classify_requests"] += 1
        self.stats["batches"] += 1
        self.stats["texts"] += len(rows)
        self.stats["forward_passes"] += passes

    # ------------------------------------------------------------ generation

    def generate_step(self):
        try:
            self.join_waiting()
            if self.running:
                self.route(self.running)
                with bf16_autocast(model_device(self.served.model), self.served.bf16):
                    logits = self.decode.step([job.last_token for job in self.running])
                for job, row in zip(self.running, logits):
                    self.sample(job, row)
                self.stats["decode_steps"] += 1
                self.stats["largest_decode_batch"] = max(self.stats["largest_decode_batch"], len(self.running))
                self.leave()
        except Exception as e:  # a fault fails the generations in the batch, never the worker
            for job in self.running:
                fail(job, e)
            self.running, self.decode = [], DecodeBatch(self.served.model)

    def join_waiting(self):
        """Waiting requests join the batch, oldest first, while it has room: each prompt runs alone and
        gives the sequence's first token."""
        self.leave()
        budget, joined = self.max_batch_tokens, 0
        while self.waiting and len(self.running) < self.max_batch:
            job = self.waiting[0]
            if job.cancelled:
                self.waiting.popleft()
                continue
            if joined and len(job.prompt_ids) > budget:  # its turn comes next step
                break
            self.waiting.popleft()
            budget, joined = budget - len(job.prompt_ids), joined + 1
            self.route([job])
            try:
                with bf16_autocast(model_device(self.served.model), self.served.bf16):
                    logits = self.decode.join(job.prompt_ids)
            except Exception as e:  # this prompt's fault: the batch goes on without it
                fail(job, e)
                continue
            self.running.append(job)
            self.sample(job, logits)
        self.leave()

    def route(self, jobs: list[Generate]):
        lora.set_per_row(self.served.model, [job.adapter for job in jobs])

    def sample(self, job: Generate, logits: torch.Tensor):
        token = next_token(logits.float(), job.temperature, None, job.generator, job.top_p)
        if token in job.stop_ids:
            return job.finish(Finished("stop"))
        job.generated += 1
        job.last_token = token
        job.emit(token)
        self.stats["generated_tokens"] += 1
        if job.generated == job.max_tokens:
            job.finish(Finished("length"))

    def leave(self):
        """Sequences that ended or were cancelled leave the batch."""
        kept = [row for row, job in enumerate(self.running) if not (job.done or job.cancelled)]
        if len(kept) < len(self.running):
            self.stats["generate_requests"] += sum(job.done for job in self.running)
            self.decode.keep(kept)
            self.running = [self.running[row] for row in kept]

    @property
    def load(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), "classifying": len(self.classifying)}


@torch.no_grad()
def classify(served, rows: list[tuple[str, list[int]]]) -> tuple[list[list[float]], int]:
    """Class probabilities of (adapter, token ids) rows, and the forward passes they took. Rows are
    sorted by length (little padding) and grouped by pooling and head size, which one forward pass must
    share; a pass of one adapter's rows runs it fused, compiled where serve compiled the model."""
    model, tokenizer, adapters = served.model, served.tokenizer, served.adapters

    def group(i):
        adapter = adapters[rows[i][0]]
        return adapter.format.pooling, len(adapter.label_names)

    order = sorted(range(len(rows)), key=lambda i: (group(i), len(rows[i][1])))
    probs, passes, start = [None] * len(rows), 0, 0
    while start < len(order):
        chunk = [i for i in order[start:] if group(i) == group(order[start])]
        start += len(chunk)
        lora.set_per_row(model, [rows[i][0] for i in chunk])
        token_lists = [rows[i][1] for i in chunk]
        batch = collate(token_lists, [0] * len(chunk), tokenizer.pad_id, max(map(len, token_lists)))
        with bf16_autocast(model_device(model), served.bf16):
            logits = classify_logits(model, batch, group(chunk[0])[0])
        for i, p in zip(chunk, torch.softmax(logits, -1).tolist()):
            probs[i] = p
        passes += 1
    return probs, passes


def warm_up(served, names: list[str] | None = None):
    """Classify a text, then two, under each classification adapter (or those `names`), so that a
    compiled model compiles their graphs now rather than in the first requests (PyTorch compiles
    batches of one apart, and a graph is specific to its adapter)."""
    # dynamo's default of 8 graphs per function would leave the fifth classifier eager
    # (cache_size_limit: the name torch 2.5 knows, an alias of recompile_limit since)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for name in served.adapters if names is None else names:
        adapter = served.adapters[name]
        if adapter.task == "classification":
            texts = adapter.format.encode(served.tokenizer, ["Warm up.", "A second, longer text to warm up with."])
            classify(served, [(name, texts[0])])
            classify(served, [(name, ids) for ids in texts])


def fail(job, error: Exception):
    if isinstance(job, Generate):
        job.finish(error)
    else:
        job.future.set_exception(error)


def run(job, compute):
    try:
        job.future.set_result(compute())
    except Exception as e:  # reported to the request that asked, the worker goes on
        job.future.set_exception(e)
