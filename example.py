"""Chat with the bundled SmolLM2-135M-Instruct on the CPU (or any model: python example.py PATH)."""

import sys

from nanovllm import LLM, SamplingParams


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else None  # None: the bundled default model
    llm = LLM(model, enforce_eager=True, tensor_parallel_size=1)
    sampling_params = SamplingParams(temperature=0.6, max_tokens=256)
    prompts = ["introduce yourself", "list all prime numbers within 100"]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    outputs = llm.chat(conversations, sampling_params)
    for prompt, output in zip(prompts, outputs, strict=False):
        print("\n")
        print(f"Prompt: {prompt!r}")
        print(f"Completion: {output['text']!r}")
    llm.shutdown()


if __name__ == "__main__":
    main()
