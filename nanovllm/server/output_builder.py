"""Rebuilds a request's ``RequestOutput`` snapshots in the server process from the engine process's
compact per-step tuples (engine_process.py's ``_pack``), detokenizing as the tokens arrive.

The engine process sends token ids; the text is made here, with the same incremental detokenizer
the engine uses, so it equals what the engine would have produced. Requests with stop strings are
the exception: the engine must read their text to stop them, so it sends that text along.
"""

from dataclasses import replace

from nanovllm.config import Config
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import SamplingParams


def load_tokenizer(config: Config):
    """The tokenizer the engine loads, for the HTTP side (chat template, /tokenize, text)."""
    if config.skip_tokenizer_init:
        return None
    if config.is_gguf:
        from nanovllm.utils.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(config.model)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(config.model)


class _Completion:
    def __init__(self, index: int, detokenizer: IncrementalDetokenizer | None):
        self.index = index
        self.detokenizer = detokenizer
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] = []
        self.text = ""
        self.finish_reason: str | None = None


class OutputBuilder:
    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, tokenizer):
        self.request_id, self.prompt, self.params = request_id, prompt, params
        self.engine_text = bool(params.stop)  # the engine detokenized it (stop strings)
        self.completions = [
            _Completion(
                i,
                None
                if tokenizer is None or self.engine_text
                else IncrementalDetokenizer(tokenizer, params.skip_special_tokens),
            )
            for i in range(params.n)
        ]

    def update(self, packed: tuple) -> RequestOutput:
        """The next snapshot: increments from ``packed``, and cumulative fields once finished."""
        request_id, finished, num_cached_tokens, changed = packed
        increments: dict[int, tuple[list[int], list | None, str]] = {}
        for index, new_ids, new_logprobs, finish_reason, text_delta, text in changed:
            c = self.completions[index]
            new_ids = new_ids or []
            c.token_ids += new_ids
            if new_logprobs:
                c.logprobs += new_logprobs
            if c.detokenizer is not None and c.finish_reason is None:
                text_delta = c.detokenizer.step(c.token_ids) if new_ids else ""
                if finish_reason is not None:
                    text_delta += c.detokenizer.flush(c.token_ids)
                c.text += text_delta
            elif self.engine_text and finish_reason is not None and c.finish_reason is None:
                c.text = text  # the engine's final text (a stop string cut off)
            c.finish_reason = finish_reason
            increments[index] = (new_ids, new_logprobs, text_delta)
        with_logprobs = self.params.logprobs is not None
        outputs = []
        for c in self.completions:
            new_ids, new_logprobs, text_delta = increments.get(c.index, ([], None, ""))
            out = CompletionOutput(
                index=c.index,
                finish_reason=c.finish_reason,
                new_token_ids=new_ids,
                text_delta=text_delta,
                new_logprobs=new_logprobs if with_logprobs and new_ids else None,
            )
            if finished:
                logprobs = list(c.logprobs) if with_logprobs else None
                out = replace(out, text=c.text, token_ids=list(c.token_ids), logprobs=logprobs)
            outputs.append(out)
        return RequestOutput(request_id, self.prompt, outputs, finished, num_cached_tokens)
