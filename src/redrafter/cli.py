"""The ``redrafter`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import RedrafterError


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from .api import DEFAULT_DRAFT_LEN, DEFAULT_NUM_BEAMS, DTYPES

    parser.add_argument(
        "--model", default="default", help="'default' (SmolLM2-135M-Instruct), a .gguf file or a Hugging Face folder"
    )
    parser.add_argument(
        "--drafter", default="default", help="a drafter folder, 'default' (shipped for the default model) or 'none'"
    )
    parser.add_argument(
        "--beams", type=_positive, default=DEFAULT_NUM_BEAMS, help="beams W drafted per step (default %(default)s)"
    )
    parser.add_argument(
        "--draft-len",
        type=_positive,
        default=DEFAULT_DRAFT_LEN,
        help="tokens per beam L, root included (default %(default)s)",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="compute dtype (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device (default %(default)s)")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and exit code 2), not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="redrafter",
        description="ReDrafter speculative decoding: a recurrent drafter, beam search and tree attention "
        "that make a language model generate faster with unchanged output.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    gen = commands.add_parser("generate", help="generate text for a prompt, streamed as tokens are accepted")
    gen.add_argument("prompt", help="the prompt, or - to read it from standard input")
    _add_model_options(gen)
    gen.add_argument(
        "--max-new-tokens", type=_positive, default=256, help="at most this many new tokens (default %(default)s)"
    )
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument(
        "--json", action="store_true", help="print one JSON object (text, token ids, statistics) instead of streaming"
    )
    gen.set_defaults(run=run_generate)

    dis = commands.add_parser(
        "distill",
        help="build a training corpus from the target's own answers (resumable)",
        description="Generate a drafter training corpus: prompts from --prompts FILE or written by the target "
        "itself (sampled from the chat template's empty user turn), answered by the target. Re-run the same "
        "command to resume an interrupted run.",
    )
    dis.add_argument("--model", default="default", help="'default', a .gguf file or a Hugging Face folder")
    dis.add_argument("--out", required=True, help="corpus folder (created; resumed if it exists)")
    dis.add_argument("--prompts", help="JSONL prompt file ('prompt', 'turns' or ShareGPT 'conversations')")
    dis.add_argument(
        "--num-prompts", type=_positive, default=2048, help="self-written prompts to make (default %(default)s)"
    )
    dis.add_argument("--max-new-tokens", type=_positive, default=256, help="answer length cap (default %(default)s)")
    dis.add_argument(
        "--batch-size", type=_positive, default=32, help="prompts generated together (default %(default)s)"
    )
    dis.add_argument("--shard-size", type=_positive, default=128, help="conversations per shard (default %(default)s)")
    dis.add_argument("--temperature", type=float, default=0.0, help="answer sampling temperature; 0 = greedy (default)")
    dis.add_argument("--seed", type=int, default=0)
    dis.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    dis.set_defaults(run=run_distill)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    from .api import ReDrafter, resolve_drafter

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise RedrafterError("the prompt is empty")
    drafter = resolve_drafter(args.drafter, args.model)
    if drafter is None and args.drafter == "default" and args.model == "default":
        print("redrafter: no drafter is shipped for this model; decoding without one", file=sys.stderr)
    rd = ReDrafter.from_pretrained(
        args.model,
        drafter=drafter,
        dtype=args.dtype,
        device=args.device,
        num_beams=args.beams,
        draft_len=args.draft_len,
    )
    if args.json:
        result = rd.generate(prompt, max_new_tokens=args.max_new_tokens, raw=args.raw)
        print(json.dumps(result.to_json(), ensure_ascii=False))
        return 0
    stream = rd.stream(prompt, max_new_tokens=args.max_new_tokens, raw=args.raw)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    r = stream.result
    print(
        f"[{r.new_tokens} tokens, {r.steps} steps, {r.tokens_per_step:.2f} tokens/step, "
        f"{r.tokens_per_second:.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


def run_distill(args: argparse.Namespace) -> int:
    from .distill import DistillConfig, distill

    if args.temperature < 0:
        raise RedrafterError(f"--temperature must be at least 0, got {args.temperature}")
    config = DistillConfig(
        model=args.model,
        prompts=args.prompts,
        num_prompts=args.num_prompts,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        dtype=args.dtype,
    )
    corpus = distill(config, args.out)
    totals = corpus.meta()["totals"]
    print(
        f"{args.out}: {totals['conversations']} conversations, {totals['response_tokens']} response tokens "
        f"in {len(corpus.shards)} shards",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except RedrafterError as error:
        print(f"redrafter: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("redrafter: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
