//! OpenAI chat completions <-> Anthropic messages translation (to be implemented).
