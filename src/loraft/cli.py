"""The `loraft` command. Each subcommand is one function; user errors exit with code 2 and one line."""

import argparse
import sys

from .errors import LoraftError


def cmd_models(args):
    from .models import DEFAULT_MODEL, MODELS, parameter_count

    print(f"{'name':<14} {'parameters':>14}  weights")
    for name, info in MODELS.items():
        default = "  (default)" if name == DEFAULT_MODEL else ""
        print(f"{name:<14} {parameter_count(name):>14,}  {info.source}{default}")
    print("Any Llama-architecture GGUF file also works: --model path/to/file.gguf")


def cmd_generate(args):
    from .generate import stream_tokens
    from .models import load_model

    if args.max_new_tokens < 1:
        raise LoraftError("--max-new-tokens must be at least 1")
    model, tokenizer = load_model(args.model, args.weights)
    tokens = []
    for token in stream_tokens(
        model, tokenizer.encode(args.prompt), args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, seed=args.seed, stop_ids={tokenizer.eos_id},
    ):  # fmt: skip
        tokens.append(token)
    print(args.prompt + tokenizer.decode(tokens))


def add_model_flags(parser):
    from .models import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (see `loraft models`) or a .gguf path; default {DEFAULT_MODEL}")
    parser.add_argument("--weights", help="GPT-2 only: a local Hugging Face checkpoint (folder or model.safetensors)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraft", description="LoRA fine-tuning of small pretrained language models")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the known models").set_defaults(run=cmd_models)

    g = sub.add_parser("generate", help="continue a prompt")
    add_model_flags(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=50)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(run=cmd_generate)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except LoraftError as e:
        print(f"loraft: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("loraft: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
