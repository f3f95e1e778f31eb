"""Model definitions the runtime can run (the Llama family: Llama, Mistral, Qwen2)."""
