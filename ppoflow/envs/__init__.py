"""Environments for multi-turn rollouts (`rollout.env`): the interface and a single-turn env (base.py), a
tool-calling env with a calculator and a sandboxed Python executor (tools.py, sandbox.py)."""
