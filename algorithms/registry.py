"""The registries of the RL algorithm's named parts: advantage estimators and policy-loss variants.

Each is one registered function with its metadata (verl's `register_adv_est` / `register_policy_loss` are the model).
Config validation (algorithms/config.py: the names a config may use, which estimators need a critic or groups), the
advantages stage (stages/advantages.py), the policy's loss (algorithms/losses.py) and docs/algorithms.md all read
them, so adding an estimator is one registered function in algorithms/estimators.py plus its test.

This module and the registrations import no torch (the registered functions import it in their bodies): the config
reads the registry, and `import flows` must stay cheap.

Run alone to print docs/algorithms.md (tests/algorithms/test_registry.py checks the file is up to date):
    python -m algorithms.registry > docs/algorithms.md
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator: `fn(inputs: EstimatorInputs) -> (advantages, returns | None)`, both (B, T) over
    response tokens, 0 at masked positions; returns (the critic's targets) only from estimators that use a critic."""

    name: str
    fn: Callable
    needs_critic: bool  # learns a value function: the run trains a critic and scores values
    needs_groups: bool  # compares the samples of one prompt: generation.n_samples_per_prompt >= 2
    whiten: bool  # algo.whiten_advantages applies (batch whitening of the advantages)
    paper: str
    kl: str  # where the KL penalty enters when algo.kl_in_reward is true
    openrlhf: str  # the same-named (or nearest) OpenRLHF estimator and how it differs
    verl: str  # the nearest verl `algorithm.adv_estimator` and how it differs

    @property
    def summary(self) -> str:
        return inspect.getdoc(self.fn).split("\n\n")[0].replace("\n", " ")


@dataclass(frozen=True)
class PolicyLoss:
    """A policy-loss variant of PPO's clipped surrogate: `fn(logp, old_logp, mask) -> log_ratio` (B, T), the log of
    the importance ratio the clip acts on (algorithms/losses.py `policy_loss` does the rest: clip, dual-clip, IS
    weights, aggregation)."""

    name: str
    fn: Callable
    ratio: Literal["token", "sequence"]  # one ratio per token, or one per sequence shared by its tokens
    paper: str
    note: str  # what changes with it, e.g. the clip range it wants

    @property
    def summary(self) -> str:
        return inspect.getdoc(self.fn).split("\n\n")[0].replace("\n", " ")


ESTIMATORS: dict[str, Estimator] = {}
POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_estimator(name: str, *, needs_critic: bool = False, needs_groups: bool = False, whiten: bool = False,
                       paper: str, kl: str, openrlhf: str = "-", verl: str = "-"):
    """Decorator: register `fn` as estimator `name` (algo.estimator). See `Estimator` for the fields."""

    def register(fn: Callable) -> Callable:
        if name in ESTIMATORS:
            raise ValueError(f"estimator {name!r} is registered twice ({ESTIMATORS[name].fn.__module__} and "
                             f"{fn.__module__})")
        ESTIMATORS[name] = Estimator(name, fn, needs_critic, needs_groups, whiten, paper, kl, openrlhf, verl)
        return fn

    return register


def register_policy_loss(name: str, *, ratio: Literal["token", "sequence"], paper: str, note: str = "-"):
    """Decorator: register `fn` as policy-loss variant `name` (algo.policy_loss). See `PolicyLoss`."""

    def register(fn: Callable) -> Callable:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is registered twice")
        POLICY_LOSSES[name] = PolicyLoss(name, fn, ratio, paper, note)
        return fn

    return register


def markdown() -> str:
    """docs/algorithms.md: every registered estimator and policy loss, and their semantics next to the peers'."""
    import algorithms.estimators  # noqa: F401  (the built-in registrations)
    import algorithms.policy_losses  # noqa: F401

    def row(*cells: str) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [
        "# Estimators and policy losses",
        "",
        "Generated from the registries in `algorithms/registry.py` (`python -m algorithms.registry > "
        "docs/algorithms.md`); `algo.estimator` and `algo.policy_loss` take these names.",
        "",
        "## Advantage estimators (`algo.estimator`)",
        "",
        row("name", "what", "critic", "groups", "whitened", "paper"),
        row(*["---"] * 6),
        *(row(f"`{e.name}`", e.summary, "yes" if e.needs_critic else "no", "yes" if e.needs_groups else "no",
              "yes" if e.whiten else "no", e.paper) for e in ESTIMATORS.values()),
        "",
        "`whitened`: `algo.whiten_advantages` normalises these estimators' advantages over the batch's tokens; the "
        "others are normalised by their groups already.",
        "",
        "### Where the KL penalty enters, and the peers' estimators of the same name",
        "",
        "With `algo.kl_in_reward: true` every estimator starts from the KL-shaped per-token reward "
        "r_t = −β·KL_t + [t last]·score, and the group estimators compare the samples' *total* shaped rewards "
        "(as verl does); with `kl_in_reward: false` the KL is a loss term instead and the estimators see the "
        "score alone. OpenRLHF's group estimators normalise the outcome score alone and add the per-token KL "
        "afterwards, so with a KL penalty in the reward the same name gives other advantages.",
        "",
        row("name", "KL (kl_in_reward: true)", "OpenRLHF", "verl"),
        row(*["---"] * 4),
        *(row(f"`{e.name}`", e.kl, e.openrlhf, e.verl) for e in ESTIMATORS.values()),
        "",
        "## Policy losses (`algo.policy_loss`)",
        "",
        row("name", "what", "ratio", "paper", "note"),
        row(*["---"] * 5),
        *(row(f"`{p.name}`", p.summary, p.ratio, p.paper, p.note) for p in POLICY_LOSSES.values()),
        "",
        "Every variant shares the rest of `algorithms/losses.py: policy_loss`: the clip to [1 − ε, 1 + ε_high] "
        "(`algo.clip_eps`, `algo.clip_eps_high`), dual-clip (`algo.dual_clip`), the engine/trainer IS weights "
        "(`algo.is_correction`) and the aggregation (`algo.loss_agg`). The log-ratio is clamped to ±20 before it "
        "is exponentiated, as verl does, so one wildly off-policy token cannot overflow the loss.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    # Through the imported module: run as __main__, this file's registries are other dicts than the ones the
    # built-in estimators register into.
    from algorithms.registry import markdown as generate

    print(generate(), end="")
