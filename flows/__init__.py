"""Prefect flows: `ppo_train` (the outer loop) and `ppo_iteration` (generate → score → advantages → update → sync).

Flows only wire stages; importing this package is cheap (no torch, vLLM, Ray or DeepSpeed).
"""
