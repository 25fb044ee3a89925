"""The ``nanovllm`` command: ``generate``, ``chat``, ``bench``, ``serve`` and ``bench-serve``."""

import argparse
import gc
import json
import logging
import sys

from nanovllm.sampling_params import SamplingParams


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="model directory or .gguf file (default: bundled SmolLM2-135M)"
    )
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--max-model-len", type=int, default=4096)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanovllm", description="A small, readable LLM inference engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a completion for one prompt (streamed)")
    gen.add_argument("prompt")
    _add_model_args(gen)
    gen.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    chat = sub.add_parser("chat", help="an interactive multi-turn chat (reads stdin; /exit or EOF ends)")
    _add_model_args(chat)
    chat.add_argument("--system", default=None, help="a system message")
    sub.add_parser("bench", help="the benchmark (see `nanovllm bench --help`)", add_help=False)
    sub.add_parser("serve", help="the OpenAI-compatible server (see `nanovllm serve --help`)", add_help=False)
    sub.add_parser(
        "bench-serve", help="the serving benchmark (see `nanovllm bench-serve --help`)", add_help=False
    )
    return parser


def _params(args) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def _load(args):
    """The engine, built with the garbage collector off: start-up (torch's import, the model, a 49k-token
    vocabulary) makes about a million objects and frees few, and each full collection on the way walks
    all of them again (0.1-0.2 s of a 2-core machine's start-up). ``gc.freeze`` then parks them where
    later collections never look."""
    gc.disable()
    try:
        from nanovllm import LLM

        logging.getLogger("nanovllm").setLevel(logging.WARNING)
        return LLM(args.model, max_model_len=args.max_model_len)
    finally:
        gc.freeze()
        gc.enable()


def _has_template(llm) -> bool:
    return bool(llm.tokenizer is not None and getattr(llm.tokenizer, "chat_template", None))


def cmd_generate(args) -> int:
    params = _params(args)
    llm = _load(args)
    prompt = args.prompt
    if not args.no_chat_template and _has_template(llm):
        prompt = llm.apply_chat_template([{"role": "user", "content": args.prompt}])
    if args.json:
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        print(json.dumps({k: out[k] for k in ("text", "token_ids", "finish_reason", "num_cached_tokens")}))
    else:
        for piece in llm.stream(prompt, params):
            print(piece["text_delta"], end="", flush=True)
        print()
    llm.shutdown()
    return 0


def cmd_chat(args) -> int:
    params = _params(args)
    llm = _load(args)
    if not _has_template(llm):
        raise ValueError("this model has no chat template; use `nanovllm generate --no-chat-template`")
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        reply = ""
        for piece in llm.stream(llm.apply_chat_template(history), params):
            reply += piece["text_delta"]
            print(piece["text_delta"], end="", flush=True)
        print(flush=True)
        history.append({"role": "assistant", "content": reply})
    llm.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from nanovllm.benchmark import main as bench_main

        bench_main(argv[1:])
        return 0
    if argv and argv[0] == "bench-serve":
        from nanovllm.server.bench_serve import main as bench_serve_main

        return bench_serve_main(argv[1:])
    args = None if argv and argv[0] == "serve" else build_parser().parse_args(argv)
    try:
        if args is None:
            from nanovllm.server.cli import main as serve_main

            return serve_main(argv[1:])
        return {"generate": cmd_generate, "chat": cmd_chat}[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"nanovllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
