"""`nanovllm serve` flags come from Config's fields; the bundled model serves with no MODEL."""

import subprocess
import sys
from dataclasses import fields

import pytest

from nanovllm import SamplingParams
from nanovllm.config import Config
from nanovllm.server.cli import build_parser
from tests.server.conftest import ROOT, Server, free_port


def test_every_engine_argument_is_a_flag():
    parser = build_parser()
    flags = {opt for a in parser._actions for opt in a.option_strings}
    for f in fields(Config):
        if f.init and f.name != "model":
            assert "--" + f.name.replace("_", "-") in flags, f.name


def test_flags_parse_to_engine_arguments():
    args = build_parser().parse_args(
        ["some/model", "--max-model-len", "128", "--enforce-eager", "--gpu-memory-utilization", "0.5"]
    )
    assert (args.model, args.max_model_len, args.enforce_eager, args.gpu_memory_utilization) == (
        "some/model",
        128,
        True,
        0.5,
    )
    assert not hasattr(args, "max_num_seqs")  # not given: Config's default applies
    assert args.host == "127.0.0.1"


def test_bad_flag_value_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--max-model-len", "lots"])
    assert "--max-model-len" in capsys.readouterr().err


@pytest.mark.slow
def test_bundled_model_chat_matches_llm_chat():
    import openai

    from nanovllm import LLM

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    server = Server(None, "--max-model-len", "512")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        got = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=16)
    finally:
        assert server.stop() == 0
    llm = LLM(None, max_model_len=512)
    want = llm.chat(messages, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    llm.shutdown()
    assert got.choices[0].message.content == want["text"]
    assert "SmolLM2" in model


@pytest.mark.parametrize(
    "where, args, words",
    [
        ("server process", ["/nonexistent/model"], "is not a local path"),
        ("engine process", ["--num-kvcache-blocks", "2"], "raise num_kvcache_blocks"),
    ],
)
def test_start_up_errors_reach_the_user(chat_ckpt, where, args, words):
    """A bad engine argument fails in the server process (Config) or in the engine process (the KV
    cache): either way the user sees `nanovllm: error: ...` and a non-zero exit (the server would
    hang at exit, joining it, if the engine process outlived the error)."""
    model = (
        [] if args[0].startswith("/") else [chat_ckpt, "--max-model-len", "256", "--kvcache-block-size", "16"]
    )
    cmd = [sys.executable, "-m", "nanovllm", "serve", *model, *args, "--port", str(free_port())]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "nanovllm: error:" in proc.stderr and words in proc.stderr, proc.stderr
