"""The stages of a PPO iteration, one module each: generate → score → advantages → update → sync.

Each module has a plain function `(config, run_uri, iteration) -> manifest` that reads the previous stage's committed
table, does its work through the Ray worker actors, and commits its own table; and a thin Prefect `@task` wrapper.
A stage whose output is already committed returns the stored manifest without doing anything.
"""
