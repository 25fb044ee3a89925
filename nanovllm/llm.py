"""The offline entry point: ``LLM(model).generate(prompts, sampling_params)``."""

from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

from nanovllm.config import Config
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any):
        self.config = Config.from_kwargs(model, **engine_args)
        self.engine = LLMEngine(self.config)
        self.tokenizer = self.engine.tokenizer

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[dict]:
        """Generate completions for every prompt; results come back in input order.

        Every prompt is validated before any is queued, so a bad one raises ValueError and leaves
        the engine as it was.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(
                f"got {len(sampling_params)} sampling params for {len(prompts)} prompts; "
                "pass one SamplingParams, or one per prompt"
            )
        engine = self.engine
        token_ids = [engine.tokenize(p) for p in prompts]
        for i, ids in enumerate(token_ids):
            engine.validate(ids, where=f"prompt {i}")
        pairs = zip(token_ids, sampling_params, strict=True)
        request_ids = [engine.add_request(ids, sp) for ids, sp in pairs]
        index = {rid: i for i, rid in enumerate(request_ids)}
        results: list[dict | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        try:
            while any(r is None for r in results):
                outputs, stats = engine.step()
                if stats.seconds > 0:
                    if stats.is_prefill:
                        prefill_tps = stats.num_tokens / stats.seconds
                    else:
                        decode_tps = stats.num_tokens / stats.seconds
                    bar.set_postfix(prefill=f"{prefill_tps:.0f}tok/s", decode=f"{decode_tps:.0f}tok/s")
                for out in outputs:
                    if out.finished and out.request_id in index:
                        results[index[out.request_id]] = self._to_dict(out)
                        bar.update(1)
        except BaseException:
            for rid in request_ids:
                engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return results

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template_kwargs: dict | None = None,
    ) -> list[dict]:
        """Generate replies to one conversation (a list of ``{"role", "content"}``) or a list of
        them, through the model's chat template with the generation prompt added (as vLLM does)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, **(chat_template_kwargs or {})) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, conversation: list[dict], **kwargs: Any) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        for m in conversation:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"each chat message must be a dict with 'role' and 'content', got {m!r}")
        ids = self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, **kwargs
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def stream(
        self, prompt: str | list[int], sampling_params: SamplingParams | None = None
    ) -> Iterator[dict]:
        """Generate for one prompt, yielding each step's increment: ``{"text_delta", "token_ids"
        (new ones), "finished", "finish_reason"}``. The text is correct across multi-byte characters."""
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError("stream() serves one completion; use n=1")
        engine = self.engine
        request_id = engine.add_request(prompt, params, stream=True)
        try:
            while True:
                outputs, _ = engine.step()
                for out in outputs:
                    if out.request_id != request_id:
                        continue
                    c = out.outputs[0]
                    yield {
                        "text_delta": c.text_delta,
                        "token_ids": c.new_token_ids,
                        "finished": out.finished,
                        "finish_reason": c.finish_reason,
                    }
                    if out.finished:
                        return
        finally:
            engine.abort_request(request_id)

    @staticmethod
    def _to_dict(out) -> dict:
        """vLLM's fields, flattened as Nano-vLLM returns them; ``outputs`` holds all n completions."""
        completions = [
            {
                "text": c.text,
                "token_ids": c.token_ids,
                "finish_reason": c.finish_reason,
                "logprobs": c.logprobs,
            }
            for c in out.outputs
        ]
        return {
            **completions[0],
            "prompt_token_ids": out.prompt_token_ids,
            "num_cached_tokens": out.num_cached_tokens,
            "outputs": completions,
        }
