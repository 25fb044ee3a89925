"""The offline entry point: ``LLM(model).generate(prompts, sampling_params)``."""

from typing import Any

from tqdm.auto import tqdm

from nanovllm.config import Config
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **engine_args: Any):
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
        request_ids = [engine.add_request(ids, sp) for ids, sp in zip(token_ids, sampling_params)]
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

    @staticmethod
    def _to_dict(out) -> dict:
        """vLLM's fields, flattened as Nano-vLLM returns them; ``outputs`` holds all n completions."""
        completions = [
            {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason, "logprobs": c.logprobs}
            for c in out.outputs
        ]
        return {
            **completions[0],
            "prompt_token_ids": out.prompt_token_ids,
            "num_cached_tokens": out.num_cached_tokens,
            "outputs": completions,
        }
