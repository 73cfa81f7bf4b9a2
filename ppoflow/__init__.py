"""ppoflow: RLHF (PPO, GRPO, ...) as Prefect flows of retriable, Parquet-checkpointed stages on Ray, vLLM and
DeepSpeed."""
