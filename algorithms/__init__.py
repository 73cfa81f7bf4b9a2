"""Pure RL math for ppoflow (advantages, KL estimators, PPO losses): torch tensors in, torch tensors out, no I/O."""
