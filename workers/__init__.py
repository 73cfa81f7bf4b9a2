"""Ray actors that own models across PPO iterations (vLLM generation, DeepSpeed training)."""
