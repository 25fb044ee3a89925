"""The chat prompts the SmolLM2 CPU benchmark and the packed-weights parity test share: 32 short
user questions, sent through the model's chat template one message each."""

QUESTIONS = [
    "introduce yourself", "list all prime numbers within 100", "What is the capital of France?",
    "Explain how a hash table works.", "Write a haiku about autumn leaves.", "Why is the sky blue?",
    "Give me three tips for learning a new language.", "Summarise the plot of Romeo and Juliet.",
    "What is the difference between a list and a tuple in Python?", "How do vaccines work?",
    "Describe the water cycle for a ten-year-old.", "Suggest a name for a friendly robot.",
    "What causes the seasons?", "How do I boil an egg?", "What is photosynthesis?", "Tell me a joke.",
    "What is 17 times 23?", "Name three planets.", "How does a bicycle stay upright?",
    "What is machine learning?", "Write a limerick about a cat.", "How do bees make honey?",
    "What is the tallest mountain?", "Explain recursion simply.", "Why do we sleep?",
    "What is a black hole?", "Give a recipe for pancakes.", "How do airplanes fly?",
    "What is the speed of light?", "Who wrote Hamlet?", "What is an API?", "How do magnets work?",
]  # fmt: skip
