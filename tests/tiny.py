"""Tiny random checkpoints written with transformers itself (no downloads), for CPU tests."""

import os

import torch

TINY = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    initializer_range=0.25,  # wide weights: greedy choices far from ties
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "A scheduler admits prefills first, then decodes every running sequence.",
    "Hello world! 123 456 789, prime numbers: 2 3 5 7 11 13.",
    "Über naïve café — 日本語のテキスト and emoji 🙂.",
]


def build_tokenizer(path: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


def make_checkpoint(path: str, arch: str = "qwen3", seed: int = 0, **overrides) -> str:
    """Write a random ``arch`` ("qwen3", "qwen2", "llama") model and a tokenizer into ``path``."""
    import transformers as tf

    cfg_cls, model_cls = {
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
    }[arch]
    kwargs = dict(TINY)
    if arch == "qwen3":
        kwargs["tie_word_embeddings"] = True
    elif arch == "qwen2":
        kwargs["tie_word_embeddings"] = False
    else:
        kwargs["tie_word_embeddings"] = False
        kwargs["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        }
        kwargs["rope_theta"] = 10000.0
    kwargs.update(overrides)
    config = cfg_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    build_tokenizer(path)
    return path


def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(
    model, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None
) -> list[int]:
    """HF greedy generation of one prompt (no padding involved); returns the new tokens."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


def prefill_logits(llm, prompts: list[list[int]]):
    """Last-position logits of each prompt from one packed prefill through ``llm``'s runner."""
    from nanovllm.engine.sequence import Sequence
    from nanovllm.engine.step import NewSeq, SchedulerOutput
    from nanovllm.sampling_params import SamplingParams

    bm, runner = llm.engine.scheduler.block_manager, llm.engine.executor
    seqs = [Sequence(p, SamplingParams(), bm.block_size) for p in prompts]
    sched = SchedulerOutput()
    for s in seqs:
        assert bm.allocate_slots(s, s.num_tokens)
        sched.new_seqs.append(
            NewSeq(s.seq_id, s.token_ids, s.num_tokens, s.block_table, 0, s.sampling_params)
        )
        sched.num_scheduled_tokens[s.seq_id] = s.num_tokens
    runner._update_states(sched)
    try:
        return runner.run_model(*runner.prepare_inputs(sched)[:3])
    finally:
        for s in seqs:
            bm.free(s)
            runner.seqs.pop(s.seq_id)
