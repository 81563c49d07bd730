"""The `loraft` command. Each subcommand is one function; user errors exit with code 2 and one line."""

import argparse
import json
import sys
from pathlib import Path

from .errors import LoraftError


def cmd_models(args):
    from .models import ARCHITECTURES, DEFAULT_MODEL, MODELS, parameter_count

    print(f"{'name':<14} {'parameters':>14}  weights; licence")
    for name, info in MODELS.items():
        default = "  (default)" if name == DEFAULT_MODEL else ""
        print(f"{name:<14} {parameter_count(name):>14,}  {info.source}; {info.licence}{default}")
    print(
        "Also: --model FOLDER (a Hugging Face model folder), --model org/name (a hub id), --model FILE.gguf; "
        f"architectures: {', '.join(ARCHITECTURES)}"
    )


def cmd_env(args):
    from .env import collect, render

    report = collect()
    print(json.dumps(report, indent=2) if args.json else render(report))


def cmd_generate(args):
    from .generate import stream_tokens
    from .models import load_model

    if args.max_new_tokens < 1:
        raise LoraftError("--max-new-tokens must be at least 1")
    if args.adapter:
        from .instruct import load_instruct, stream_answer

        instruction = args.instruction or args.prompt
        if not instruction:
            raise LoraftError("give the instruction with --prompt or --instruction")
        model, tokenizer, meta = load_instruct(args.adapter, args.weights, args.quantize, fp32_or_default(args))
        sampling = dict(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
        print_stream(
            tokenizer,
            stream_answer(model, tokenizer, meta, instruction, args.input or "", args.max_new_tokens, **sampling),
        )
        return
    if args.instruction or args.input:
        raise LoraftError(
            "--instruction and --input fill an instruction adapter's template: give --adapter DIR (or the whole text with --prompt)"
        )
    if not args.prompt:
        raise LoraftError("give --prompt (or --adapter DIR with --instruction)")
    model, tokenizer = load_model(args.model, args.weights, quantize=args.quantize)
    tokens = []
    for token in stream_tokens(
        model,
        tokenizer.bos_prefix + tokenizer.encode(args.prompt),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        stop_ids={tokenizer.eos_id},
    ):
        tokens.append(token)
    print(args.prompt + tokenizer.decode(tokens))


def fp32_or_default(args) -> bool | None:
    """--no-bf16: the base in fp32; else None, bf16 where it runs natively."""
    return False if args.no_bf16 else None


def print_stream(tokenizer, tokens):
    """Print text as the tokens come (a character split over tokens waits for its last byte)."""
    ids, shown = [], ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids).strip()  # as `respond` returns it
        if not text.endswith("\ufffd"):
            print(text[len(shown) :], end="", flush=True)
            shown = text
    print(tokenizer.decode(ids).strip()[len(shown) :])


def cmd_instruct(args):
    from .instruct import train_instruct

    train_instruct(
        **flags(args, "data", "data_from_github", "val_file", "test_file", "template", "mask_prompt"),
        data_format=args.format,
        **flags(args, "max_length", "max_new_tokens"),
        lora_config=lora_config(args),
        **train_options(args),
    )


def cmd_chat(args):
    from .instruct import load_instruct, stream_answer

    if args.max_new_tokens < 1:
        raise LoraftError("--max-new-tokens must be at least 1")
    model, tokenizer, meta = load_instruct(args.adapter, args.weights, args.quantize, fp32_or_default(args))
    print(
        f"{meta['base_model']} + {args.adapter} ({meta['template']} template). One instruction per line; an empty line or Ctrl-D ends."
    )
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            break
        if not line.strip():
            break
        print_stream(tokenizer, stream_answer(model, tokenizer, meta, line, "", args.max_new_tokens))


def cmd_info(args):
    from torch import nn

    from . import lora
    from .models import ModelInfo, build_empty, load_model, resolve

    model = build_empty(args.model) if isinstance(resolve(args.model), ModelInfo) else load_model(args.model)[0]
    if args.num_classes:  # as the book does: the output head replaced by a new, smaller one
        model.out_head = nn.Linear(model.config.emb_dim, args.num_classes, device=model.tok_emb.weight.device)
    if args.rank:
        lora.apply_lora(model, lora.LoraConfig(args.rank, args.alpha, args.scaling, args.targets))
    print(model)
    counts = lora.parameter_summary(model)
    print(f"total parameters:     {counts['total']:>14,}")
    print(f"trainable parameters: {counts['trainable']:>14,}  ({100 * counts['trainable'] / counts['total']:.2f}%)")
    print(f"frozen parameters:    {counts['frozen']:>14,}")


def train_options(args) -> dict:
    from .models import family_to_load
    from .train import TrainConfig, compiler_found, pick_device

    # By default loraft compiles where it pays (benchmarks/speed_ablation.py, train_vs_book.py): on a CPU,
    # for the families that say so; not on a GPU, where small batches wait on kernel launches, not arithmetic.
    compile = args.compile
    if compile is None:
        compile = (
            pick_device(args.device).type == "cpu" and compiler_found() and family_to_load(args.model).compile_on_cpu
        )
    cfg = TrainConfig(
        **flags(args, "epochs", "max_steps", "batch_size", "lr", "weight_decay", "warmup", "schedule"),
        **flags(args, "grad_accum", "clip", "eval_every", "seed", "gradient_checkpointing", "device"),
        **flags(args, "skip_nonfinite", "save_every"),
        bf16=not args.no_bf16,
        compile=compile,
        quantize=args.quantize,
    )
    return dict(train=cfg, **flags(args, "out", "model", "weights", "resume", "overwrite", "quiet"))


def lora_config(args, **grid):
    """The LoRA flags as one LoraConfig (`sweep` has no --rank and --alpha: `grid` gives them)."""
    from .lora import LoraConfig

    adalora = {field: getattr(args, f"adalora_{field}") for field in ("init_r", "tinit", "tfinal", "delta_t")}
    return LoraConfig(
        **flags(args, *[f for f in ("rank", "alpha", "scaling", "targets", "dropout") if hasattr(args, f)]),
        **flags(args, "variant", "init", "lora_plus_ratio"),
        **adalora,
        **grid,
    )


def flags(args, *names: str) -> dict:
    """The parsed flags `names` as keyword arguments of the same names."""
    return {name: getattr(args, name) for name in names}


def classifier_options(args, **grid) -> dict:
    data = flags(args, "data", "data_file", "data_from_uci", "text_column", "label_column", "val_file", "test_file")
    return dict(
        **data,
        **flags(args, "max_length", "pooling", "template"),
        lora_config=lora_config(args, **grid),
        **train_options(args),
    )


def cmd_train(args):
    from .finetune import train_classifier

    train_classifier(method=args.method, **classifier_options(args))


def cmd_sweep(args):
    from .sweep import parse_grid, run_sweep

    ranks, alphas = parse_grid("--ranks", args.ranks, int), parse_grid("--alphas", args.alphas, float)
    # the largest rank: what AdaLoRA's initial rank must exceed (run_sweep checks every point of the grid)
    run_sweep(ranks, alphas, **classifier_options(args, rank=max(ranks), alpha=alphas[0]))


def cmd_eval(args):
    from .finetune import evaluate_adapter

    print(
        json.dumps(
            evaluate_adapter(
                args.adapter,
                args.data,
                args.data_file,
                args.text_column,
                args.label_column,
                args.split,
                args.weights,
                args.quantize,
                args.data_from_uci,
                args.compile,
            ),
            indent=2,
        )
    )


def read_texts(args) -> list[str]:
    """The texts to classify: lines of --input FILE or of standard input (-), else the arguments."""
    from .data.classification import decode_utf8, read_text_file
    from .tokenizer import check_texts

    if args.input:
        return [line for line in read_text_file(args.input).splitlines() if line.strip()]
    if args.texts == ["-"]:
        # The bytes, decoded strictly: sys.stdin's own decoding lets bytes that are not UTF-8 through as surrogates.
        text = decode_utf8(sys.stdin.buffer.read(), "standard input", "give UTF-8 text")
        return [line for line in text.splitlines() if line.strip()]
    return check_texts(args.texts)  # argv holds a byte that is not UTF-8 as a lone surrogate


def cmd_classify(args):
    from .classifier import TextFormat, predict_proba
    from .inference import compile_for_inference
    from .job import load_trained
    from .precision import uses_bf16

    texts = read_texts(args)
    if not texts:
        raise LoraftError("nothing to classify: give texts, --input FILE, or - for standard input")
    if any(not t.strip() for t in texts):
        raise LoraftError("a text to classify is empty")
    model, tokenizer, meta = load_trained(args.adapter, "classification", args.weights, args.quantize)
    compile_for_inference(model, len(texts), args.compile)
    probs = predict_proba(model, tokenizer, texts, TextFormat.of_adapter(meta), autocast=uses_bf16(model))
    for text, p in zip(texts, probs.tolist()):
        best = max(range(len(p)), key=p.__getitem__)
        print(
            json.dumps(
                {"text": text, "label": meta["label_names"][best], "probabilities": dict(zip(meta["label_names"], p))},
                ensure_ascii=False,
            )
        )


def cmd_export(args):
    from .export import export

    written = export(args.adapter, args.format, args.out, args.dtype, args.weights, args.overwrite)
    print(
        f"{args.format} export of {args.adapter} written to {written}: {', '.join(sorted(p.name for p in written.iterdir()))}"
    )


def cmd_export_peft(args):
    args.format, args.dtype, args.weights = "peft", None, None
    cmd_export(args)


def cmd_combine(args):
    from .combine import combine

    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise LoraftError(
            f"--weights takes comma-separated numbers, one per --adapter, e.g. 0.7,0.3; got {args.weights!r}"
        ) from None
    out = combine(args.adapter, weights, args.method, args.out, args.density, args.rank, args.seed, args.overwrite)
    print(f"adapter of {len(args.adapter)} combined by {args.method} written to {out}")


def cmd_import_peft(args):
    from .adapters import save_adapter
    from .models import load_model
    from .peft_format import import_peft

    model, _ = load_model(args.model, args.weights)
    config = import_peft(args.peft, model)
    task = {}
    if config.get("task_type") == "SEQ_CLS":
        n_classes = model.out_head.copies["default"].out_features
        names = args.label_names or [f"class{i}" for i in range(n_classes)]
        if len(names) != n_classes:
            raise LoraftError(f"--label-names gives {len(names)} names; the adapter's head has {n_classes} classes")
        task = dict(
            task="classification",
            label_names=names,
            template="{text}",
            max_length=args.max_length,
            pooling="last",
            method="lora",
        )
    print(f"loraft adapter written to {save_adapter(model, args.out, **task)}")


def cmd_serve(args):
    import os
    import socket

    try:
        from concurrent.futures import ThreadPoolExecutor

        from .inference import COMPILE_FROM_TEXTS, compile_for_inference
        from .serve.app import Limits, create_app
        from .serve.batching import warm_up
        from .serve.registry import load_served, parse_adapter_specs
        from .serve.server import server
    except ImportError as e:
        raise LoraftError(f"`loraft serve` needs the serve extra ({e}): pip install 'loraft[serve]'") from None
    folders = parse_adapter_specs(args.adapter)
    numbers = {
        "--max-batch": args.max_batch,
        "--max-batch-tokens": args.max_batch_tokens,
        "--max-queue": args.max_queue,
    }
    numbers |= {"--max-connections": args.max_connections, "--max-tokens": args.max_tokens}
    numbers |= {"--timeout-s": args.timeout_s, "--read-timeout-s": args.read_timeout_s}
    for flag, value in numbers.items():
        if not value > 0:
            raise LoraftError(f"{flag} must be above 0")
    if args.batch_window_ms < 0:
        raise LoraftError("--batch-window-ms must be at least 0")
    adapter_dirs = tuple(Path(d) for d in args.adapter_dir)
    for folder in adapter_dirs:
        if not folder.is_dir():
            raise LoraftError(f"--adapter-dir {folder}: no such folder")
    api_key = args.api_key or os.environ.get("LORAFT_API_KEY") or None
    if not api_key and not args.insecure and not loopback(args.host):
        raise LoraftError(
            f"--host {args.host} listens beyond this machine: give --api-key KEY (or set LORAFT_API_KEY), "
            f"or --insecure to serve without one"
        )
    listener = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((args.host, args.port))
    except OSError as e:
        raise LoraftError(f"cannot listen on {args.host}:{args.port} ({e.strerror})") from None
    limits = Limits(
        max_new_tokens=args.max_tokens,
        max_queue=args.max_queue,
        timeout_s=args.timeout_s,
        read_timeout_s=args.read_timeout_s,
        max_connections=args.max_connections,
    )

    def load():
        served = load_served(folders, args.quantize, args.model, args.weights, fp32_or_default(args))
        served.compiled = compile_for_inference(served.model, COMPILE_FROM_TEXTS, args.compile)  # soon that many texts
        if served.compiled:
            if any(adapter.task == "classification" for adapter in served.adapters.values()):
                print("loraft: compiling the classifiers' passes (--no-compile: eager)", file=sys.stderr, flush=True)
            warm_up(served)
        return served

    model_thread = ThreadPoolExecutor(1, thread_name_prefix="loraft-model")  # every torch op runs there: see Worker
    served = model_thread.submit(load).result()
    app = create_app(
        served, limits, args.batch_window_ms, args.max_batch, args.max_batch_tokens, api_key, adapter_dirs, model_thread
    )
    host, port = listener.getsockname()[:2]
    names = ", ".join([served.model.name, *served.adapters])
    print(f"loraft: serving {names} on http://{host}:{port}/ (API docs at /docs)", file=sys.stderr, flush=True)
    server(app, limits).run(sockets=[listener])


def loopback(host: str) -> bool:
    """Whether every address `host` names is this machine's own loopback."""
    import ipaddress
    import socket

    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def add_data_flags(parser):
    parser.add_argument("--data", default="sms-spam", help="'sms-spam' (default) or a .csv/.tsv/.jsonl file")
    parser.add_argument("--data-file", help="sms-spam only: a local SMSSpamCollection file")
    parser.add_argument(
        "--data-from-uci",
        action="store_true",
        help="sms-spam only: download the SMS Spam Collection from UCI (once, sha256-checked, into "
        "~/.cache/loraft or $LORAFT_CACHE) instead of reading the copy inside the package",
    )
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")


WEIGHTS_HELP = "a known hub model's files in a local folder, instead of the download (GPT-2: also a model.safetensors)"


def add_model_flags(parser):
    from .models import DEFAULT_MODEL

    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a name from `loraft models`, a .gguf file, a Hugging Face model folder, or a hub id org/name; "
        f"default {DEFAULT_MODEL}",
    )
    parser.add_argument("--weights", help=WEIGHTS_HELP)


class Parser(argparse.ArgumentParser):
    """A bad flag is reported in one line, as a LoraftError is, not as usage then the error."""

    def error(self, message):
        print(f"loraft: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    from .export import FORMATS

    p = Parser(prog="loraft", description="LoRA fine-tuning of small pretrained language models")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the known models").set_defaults(run=cmd_models)

    v = sub.add_parser("env", help="can this machine train: torch, GPUs, bf16, compiler, memory, disk, what is cached")
    v.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    v.set_defaults(run=cmd_env)

    g = sub.add_parser("generate", help="continue a prompt")
    add_model_flags(g)
    g.add_argument("--prompt", help="the text to continue; with --adapter, the instruction")
    g.add_argument("--adapter", help="an instruction adapter: answer in its template, on its base model")
    g.add_argument("--instruction", help="with --adapter: the instruction")
    g.add_argument("--input", help="with --adapter: the instruction's input (optional)")
    g.add_argument("--max-new-tokens", type=int, default=50)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    add_quantize_flag(g, "run")
    add_inference_bf16_flag(g)
    g.set_defaults(run=cmd_generate)

    i = sub.add_parser("info", help="module tree and total/trainable/frozen parameter counts")
    add_model_flags(i)
    i.add_argument("--rank", type=int, default=0, help="apply LoRA of this rank (0: none)")
    i.add_argument("--alpha", type=float, default=16.0)
    i.add_argument("--scaling", default="standard", choices=["book", "standard", "rslora"])
    i.add_argument(
        "--targets",
        nargs="+",
        default=["all-linear"],
        help="q k v o mlp head attention all-linear (BLOOM: query_key_value o mlp head ...), or globs",
    )
    i.add_argument("--num-classes", type=int, default=0, help="replace the output head by a classification head")
    i.set_defaults(run=cmd_info)

    t = sub.add_parser("train", help="fine-tune a text classifier (default: SmolLM2 on SMS spam, LoRA)")
    t.add_argument("--out", default="runs/sms-spam", help="output folder (default runs/sms-spam)")
    t.add_argument("--method", default="lora", choices=["lora", "full", "last-block", "last-two-blocks", "head"])
    t.add_argument("--rank", type=int, default=16)
    t.add_argument("--alpha", type=float, default=16.0)
    add_classifier_flags(t)
    t.set_defaults(run=cmd_train)

    w = sub.add_parser("sweep", help="train a LoRA classifier per (rank, alpha): table, CSV and plot of the results")
    w.add_argument("--out", default="runs/sweep", help="output folder, one subfolder per setting (default runs/sweep)")
    w.add_argument("--ranks", default="4,8,16,32", help="comma-separated LoRA ranks (default 4,8,16,32)")
    w.add_argument("--alphas", default="8,16,32", help="comma-separated LoRA alphas (default 8,16,32)")
    add_classifier_flags(w)
    w.set_defaults(run=cmd_sweep)

    e = sub.add_parser("eval", help="metrics of a classification adapter on a data split, as JSON")
    e.add_argument("--adapter", required=True)
    e.add_argument("--weights", help=WEIGHTS_HELP)
    add_quantize_flag(e, "run")
    add_inference_compile_flag(e)
    add_data_flags(e)
    e.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    e.set_defaults(run=cmd_eval)

    c = sub.add_parser("classify", help="classify texts with an adapter: one JSON line per text")
    c.add_argument("--adapter", required=True)
    c.add_argument("--weights", help=WEIGHTS_HELP)
    add_quantize_flag(c, "run")
    add_inference_compile_flag(c)
    c.add_argument("--input", help="a UTF-8 file, one text per line")
    c.add_argument("texts", nargs="*", help="texts, or - to read standard input")
    c.set_defaults(run=cmd_classify)

    from .data.instruction import BOOK_DATA, DEFAULT_TEMPLATE, TEMPLATES
    from .instruct import DATA_FORMATS

    n = sub.add_parser(
        "instruct", help="instruction fine-tuning (default: SmolLM2 on the book's 1,100 Alpaca examples, LoRA)"
    )
    add_model_flags(n)
    n.add_argument(
        "--data", default=BOOK_DATA, help=f"'{BOOK_DATA}' (the book's, default) or a .json/.jsonl file of --format"
    )
    n.add_argument(
        "--format",
        default="alpaca",
        choices=DATA_FORMATS,
        help="alpaca: instruction, input, output (default); squad: SQuAD v1.1/v2.0 JSON, or JSONL of context, question, answer",
    )
    n.add_argument(
        "--data-from-github",
        action="store_true",
        help="download the book's file from its GitHub repository (default: the copy inside loraft)",
    )
    n.add_argument("--val-file")
    n.add_argument("--test-file")
    n.add_argument("--out", default="runs/instruct", help="output folder (default runs/instruct)")
    n.add_argument(
        "--template",
        default=DEFAULT_TEMPLATE,
        choices=TEMPLATES,
        help=f"the book's Alpaca prompt, the model's chat template, or qa: ### CONTEXT, ### QUESTION, ### ANSWER (default {DEFAULT_TEMPLATE})",
    )
    n.add_argument(
        "--mask-prompt",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="loss on the response tokens only (default; --no-mask-prompt: on the prompt too, as the book)",
    )
    n.add_argument("--rank", type=int, default=16)
    n.add_argument("--alpha", type=float, default=16.0)
    add_lora_flags(n)
    n.add_argument("--max-length", type=int, default=256, help="truncate prompt + response to this many tokens")
    n.add_argument("--max-new-tokens", type=int, default=128, help="longest generated test answer")
    add_train_flags(n)
    n.set_defaults(run=cmd_instruct)

    h = sub.add_parser("chat", help="ask an instruction adapter, one instruction per line, in the terminal")
    h.add_argument("--adapter", required=True)
    h.add_argument("--weights", help=WEIGHTS_HELP)
    add_quantize_flag(h, "run")
    add_inference_bf16_flag(h)
    h.add_argument("--max-new-tokens", type=int, default=256)
    h.set_defaults(run=cmd_chat)

    x = sub.add_parser("export", help="write an adapter for llama.cpp and Ollama, transformers, ONNX Runtime or PEFT")
    x.add_argument("--adapter", required=True)
    x.add_argument(
        "--format", required=True, choices=FORMATS, help="; ".join(f"{n}: {f.what}" for n, f in FORMATS.items())
    )
    x.add_argument("--out", required=True, help="the folder to write (refused if it exists, unless --overwrite)")
    x.add_argument(
        "--dtype",
        help="how weights are stored: "
        + "; ".join(f"{n}: {', '.join(f.dtypes)}" for n, f in FORMATS.items())
        + " (the first is the default)",
    )
    x.add_argument("--weights", help=WEIGHTS_HELP)
    x.add_argument("--overwrite", action="store_true", help="replace --out once the new export is complete")
    x.set_defaults(run=cmd_export)

    x = sub.add_parser("export-peft", help="the same as `export --format peft`")
    x.add_argument("--adapter", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--overwrite", action="store_true", help="replace --out once the new export is complete")
    x.set_defaults(run=cmd_export_peft)

    from .combine import METHODS

    b = sub.add_parser(
        "combine", help="one adapter from several of one base and task, as PEFT's add_weighted_adapter makes it"
    )
    b.add_argument("--adapter", action="append", required=True, help="an adapter folder (repeat for each)")
    b.add_argument("--weights", required=True, help="one weight per --adapter, comma-separated, e.g. 0.7,0.3")
    b.add_argument(
        "--method",
        required=True,
        choices=METHODS,
        help="cat: the exact weighted sum of the updates (the ranks add up); linear, ties, dare_linear, dare_ties: "
        "A's and B's merged apart, at their rank; *_svd and svd: the updates merged, then cut to --rank by SVD",
    )
    b.add_argument("--density", type=float, help="ties and dare: the fraction of each tensor's entries kept")
    b.add_argument("--rank", type=int, help="svd methods: the rank to cut back to (default: the largest)")
    b.add_argument("--seed", type=int, default=0, help="dare: the seed of its random draws (default 0)")
    b.add_argument("--out", required=True, help="the adapter folder to write")
    b.add_argument("--overwrite", action="store_true", help="replace --out once the new adapter is complete")
    b.set_defaults(run=cmd_combine)

    m = sub.add_parser("import-peft", help="read a Hugging Face PEFT LoRA folder into a loraft adapter folder")
    m.add_argument("--peft", required=True, help="folder with adapter_config.json and adapter_model.safetensors")
    add_model_flags(m)
    m.add_argument("--out", required=True)
    m.add_argument("--label-names", nargs="+", help="classification adapters: the class names, in order")
    m.add_argument("--max-length", type=int, default=128)
    m.set_defaults(run=cmd_import_peft)

    s = sub.add_parser(
        "serve",
        help="an HTTP API (OpenAI's chat and completions, classification) and a web page over one base model with adapters",
    )
    s.add_argument("--model", help="the base model (default: the adapters' base); needed when no --adapter is given")
    s.add_argument("--weights", help=WEIGHTS_HELP)
    add_quantize_flag(s, "serve over")
    add_inference_bf16_flag(s)
    s.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the blocks for classification passes of one adapter (over a --quantize base: its "
        "dequantization), compiling each classifier's graphs at start or when it is loaded (default: for Llama-like "
        "models on a CPU with a C++ compiler); --no-compile: eager",
    )
    s.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an adapter to serve under NAME (repeat for more)",
    )
    s.add_argument(
        "--adapter-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder whose adapters may be loaded while serving (POST /v1/adapters); repeat for more; none: off",
    )
    s.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1; beyond loopback needs --api-key")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key",
        help="every request but /healthz must send Authorization: Bearer KEY (default: $LORAFT_API_KEY)",
    )
    s.add_argument("--insecure", action="store_true", help="allow a --host beyond loopback without an API key")
    s.add_argument(
        "--batch-window-ms", type=float, default=5.0, help="how long an idle server waits for requests to batch with"
    )
    s.add_argument(
        "--max-batch", type=int, default=32, help="most texts, or generated sequences, in one forward pass (default 32)"
    )
    s.add_argument(
        "--max-batch-tokens",
        type=int,
        default=1024,
        help="most tokens of texts to classify in one forward pass, and of new prompts run in one step "
        "(default 1024): large requests are split and interleave with others",
    )
    s.add_argument("--max-tokens", type=int, default=256, help="most tokens one request may generate (default 256)")
    s.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="most requests held at once, waiting or running (default 256); more are answered 503 with Retry-After",
    )
    s.add_argument(
        "--timeout-s",
        type=float,
        default=300.0,
        help="a request's deadline (default 300): past it, 504 and its work stops",
    )
    s.add_argument(
        "--read-timeout-s",
        type=float,
        default=10.0,
        help="a request's headers, then its body, must arrive within this (default 10)",
    )
    s.add_argument("--max-connections", type=int, default=200, help="most connections open at once (default 200)")
    s.set_defaults(run=cmd_serve)
    return p


def add_inference_bf16_flag(parser):
    parser.add_argument(
        "--no-bf16",
        action="store_true",
        help="keep the base in fp32 (default: bf16 where it runs natively; an adapter merged into bf16 weights "
        "and one run beside them round differently)",
    )


def add_classifier_flags(parser):
    """What `train` and `sweep` share: model, data, LoRA placement, text format, training flags."""
    add_model_flags(parser)
    add_data_flags(parser)
    parser.add_argument("--val-file")
    parser.add_argument("--test-file")
    add_lora_flags(parser)
    parser.add_argument("--max-length", type=int, default=128, help="truncate texts to this many tokens")
    parser.add_argument("--pooling", default="last", choices=["last", "first", "mean"])
    parser.add_argument(
        "--template", default="{text}", help="the model's input around each text, e.g. '{text}<|im_end|>'"
    )
    add_train_flags(parser)


def add_lora_flags(parser):
    """Where LoRA goes, how it is scaled, its variant and init: the same for classifiers and instruction tuning."""
    from .lora import VARIANTS

    parser.add_argument("--scaling", default="standard", choices=["book", "standard", "rslora"])
    parser.add_argument(
        "--targets",
        nargs="+",
        default=["all-linear"],
        help="q k v o mlp head attention all-linear (BLOOM: query_key_value o mlp head ...), or globs",
    )
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA input")
    parser.add_argument(
        "--variant",
        default="lora",
        choices=list(VARIANTS),
        help="lora (default); dora: a trained magnitude per output channel over the direction of W + BA "
        "(PEFT's use_dora); adalora: the SVD form P diag(E) Q, ranks pruned by importance while training",
    )
    parser.add_argument(
        "--init",
        default="default",
        metavar="INIT",
        help="where A and B start: default (B = 0), gaussian, pissa (W's top singular vectors, taken out of W), "
        "pissa-niter-N (the same by a fast randomised SVD of N iterations), olora (W's QR); PiSSA and OLoRA "
        "adapters are saved as plain LoRA of twice the rank, for the untouched base",
    )
    parser.add_argument(
        "--lora-plus-ratio",
        type=float,
        default=0.0,
        metavar="R",
        help="LoRA+: B learns at R times the learning rate of A (16 is LoRA+'s and PEFT's usual; default 0: off)",
    )
    add = parser.add_argument_group("AdaLoRA (--variant adalora; --rank is the average rank it keeps)").add_argument
    add("--adalora-init-r", type=int, help="every layer's rank at the start (default 1.5 x --rank)")
    add("--adalora-tinit", type=int, metavar="STEPS", help="steps before ranks are cut (default 10%% of the steps)")
    add("--adalora-tfinal", type=int, metavar="STEPS", help="last steps, with the final ranks (default 30%%)")
    add("--adalora-delta-t", type=int, default=1, metavar="STEPS", help="steps between allocations (default 1)")


def add_inference_compile_flag(parser):
    from .inference import COMPILE_FROM_TEXTS

    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"torch.compile the merged model's blocks (over a --quantize base: its dequantization): seconds "
        f"once, then about 1.5x faster (default: from "
        f"{COMPILE_FROM_TEXTS:,} texts on, for Llama-like models on a CPU with a C++ compiler); --no-compile: eager",
    )


def add_quantize_flag(parser, what: str):
    from .quantize import MODES

    parser.add_argument(
        "--quantize",
        default="none",
        choices=MODES,
        help=f"{what} the frozen base with its block layers in int8 (per-row absmax), nf4 (QLoRA's NormalFloat4, "
        f"double-quantized scales) or, for a GGUF model, the file's own blocks; each dequantized in its layer "
        f"only; default none",
    )


def add_train_flags(parser):
    from .train import SCHEDULES, TrainConfig

    d = TrainConfig()
    add_quantize_flag(parser, "train over")
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument(
        "--max-steps",
        type=int,
        default=d.max_steps,
        metavar="N",
        help="train N optimizer steps, however many epochs that takes (--epochs is then ignored), the schedule spanning them (default 0: the epochs decide)",
    )
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--warmup", type=float, default=d.warmup, help="fraction of the steps spent warming up")
    parser.add_argument("--schedule", default=d.schedule, choices=SCHEDULES)
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum)
    parser.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clipping (0: off)")
    parser.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="optimizer steps between evaluations/checkpoints"
    )
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--save-every",
        type=int,
        default=d.save_every,
        metavar="N",
        help="also write a checkpoint every N optimizer steps (default 0: at each evaluation only)",
    )
    parser.add_argument(
        "--skip-nonfinite",
        type=int,
        default=d.skip_nonfinite,
        metavar="N",
        help="skip up to N steps whose loss or gradient is NaN or infinite (default 0: stop at the first)",
    )
    parser.add_argument(
        "--device", default=d.device, help="cpu, cuda or cuda:N (default auto: a CUDA GPU when PyTorch finds one)"
    )
    parser.add_argument(
        "--no-bf16", action="store_true", help="compute in fp32 (default: bf16 autocast where supported)"
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward: less memory, slower"
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the transformer blocks, or with --quantize each layer's dequantization (default: for Llama models on a CPU, where a C++ compiler is found); --no-compile: train eager",
    )
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    parser.add_argument("--overwrite", action="store_true", help="delete an earlier run in --out first")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or messages")


def main(argv=None):
    from . import distributed

    args = parser().parse_args(argv)
    try:
        distributed.setup()  # under torchrun: join the other processes
        args.run(args)
    except LoraftError as e:
        print(f"loraft: error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        print("loraft: interrupted (a training run continues from its last checkpoint with --resume)", file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
