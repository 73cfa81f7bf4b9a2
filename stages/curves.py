"""The reward, KL and held-out pass-rate curves of a run as a PNG, from its `iteration_summary` rows: what
`ppoflow runs show` writes beside the run (`{run}/plots/curves.png`, the README's picture) and what the report shows
in the Prefect UI after each iteration.

Figure + savefig render with Agg without pyplot, so no global backend or figure registry is touched (the report draws
in a thread beside the next iteration). Tests: tests/test_runs_cli.py, tests/stages/test_report.py
"""

import io


def curves_png(rows: list[dict], title: str) -> bytes | None:
    """Two panels over iterations: `rollout/reward_mean` ± `rollout/reward_std` with `eval/pass_rate` (iteration 0: the
    starting policy) above, `rollout/kl` below. None when no row has a reward or a KL yet."""
    reward = [(r["iteration"], r["rollout/reward_mean"], r.get("rollout/reward_std") or 0.0)
              for r in rows if r.get("rollout/reward_mean") is not None]
    kl = [(r["iteration"], r["rollout/kl"]) for r in rows if r.get("rollout/kl") is not None]
    evals = [(r["iteration"], r["eval/pass_rate"]) for r in rows if r.get("eval/pass_rate") is not None]
    if not reward and not kl:
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    ax_reward, ax_kl = fig.subplots(2, 1, sharex=True)
    if reward:
        x, mean, std = zip(*reward)
        ax_reward.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                               color="tab:blue", alpha=0.2, label="± std over samples")
        ax_reward.plot(x, mean, "o-", color="tab:blue", label="rollout/reward_mean")
    if evals:
        ax_reward.plot(*zip(*evals), "s--", color="tab:green", label="eval/pass_rate (held-out prompts)")
    if reward or evals:
        ax_reward.legend(loc="best")
    ax_reward.set_ylabel("reward")
    ax_reward.set_title(title)
    if kl:
        ax_kl.plot(*zip(*kl), "o-", color="tab:red", label="rollout/kl")
        ax_kl.legend(loc="best")
    ax_kl.set_ylabel("KL to reference")
    ax_kl.set_xlabel("iteration")
    ax_kl.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_reward, ax_kl):
        ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
