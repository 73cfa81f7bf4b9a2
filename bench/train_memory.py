"""Peak memory of a policy update step with a real-size vocabulary: packed forwards with chunked log-probs (the
(tokens × vocabulary) logits never whole) against the padded path (the whole float32 logits of every micro-batch).

A tiny Qwen2 body (hidden 128, 4 layers) with Qwen2.5's 151,936-token vocabulary, built here (ppoflow.tiny_model,
random init, nothing downloaded): the LM head is then nearly all of the model and the logits nearly all of the
activations, which is what a real vocabulary does to a small model's update. Each mode runs in a fresh process (one
micro-batch's forward and backward through workers/trainer.py's own functions, the loss as the policy's) and reports
its peak resident memory (`ru_maxrss`) above what the process held before the step; the tensors' own peak is read
with torch's CPU allocator statistics where they exist, else from the RSS. Sizes swept: samples × response length.

Run:  .venv/bin/python bench/train_memory.py [--samples 8,32 --response 64,256] [--json bench/results/train_memory.json]
Results: bench/RESULTS.md ("Training memory at a real vocabulary").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOCAB = 151_936


def step(model_dir: str, mode: str, samples: int, response: int) -> dict:
    """One micro-batch's forward + backward in this process; peak RSS growth in MiB."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO))
    from workers.trainer import _collate, packed_logprobs, response_logprobs

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, VOCAB, 24).tolist() for _ in range(samples)]
    responses = [rng.integers(3, VOCAB, response).tolist() for _ in range(samples)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    if mode == "packed":
        logp, mask = packed_logprobs(model, prompts, responses)
    else:
        logp, mask = response_logprobs(model, *_collate(prompts, responses, 0))
    torch.where(mask, logp, 0).sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "samples": samples, "response": response, "tokens": samples * (24 + response),
            "peak_growth_mib": round((peak - before) / 1024, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", default="8,32")
    p.add_argument("--response", default="64,256")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--_step", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._step:
        model_dir, mode, samples, response = args._step
        print(json.dumps(step(model_dir, mode, int(samples), int(response))))
        return 0
    from ppoflow.tiny_model import make_tiny_model

    model_dir = os.path.join(tempfile.gettempdir(), f"ppoflow-bench-vocab{VOCAB}")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        make_tiny_model(model_dir, sft_steps=0, vocab_size=VOCAB, log=lambda *_: None)
    rows = []
    for samples in map(int, args.samples.split(",")):
        for response in map(int, args.response.split(",")):
            for mode in ("padded", "packed"):
                out = subprocess.run([sys.executable, __file__, "--_step", model_dir, mode, str(samples),
                                      str(response)], capture_output=True, text=True, cwd=REPO)
                if out.returncode == 0:
                    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                else:  # killed by the kernel's OOM killer (or failed): what the mode could not do
                    rows.append({"mode": mode, "samples": samples, "response": response,
                                 "tokens": samples * (24 + response), "peak_growth_mib": None,
                                 "failed": f"exit {out.returncode}: {out.stderr.strip()[-200:]}"})
    print(f"{'samples':>7} {'response':>8} {'tokens':>7} {'padded MiB':>11} {'packed MiB':>11} {'ratio':>6}")
    for i in range(0, len(rows), 2):
        pad, pack = rows[i], rows[i + 1]
        fmt = lambda r: (f"{r['peak_growth_mib']:>11.1f}" if r["peak_growth_mib"] is not None  # noqa: E731
                         else f"{'killed':>11}")
        ratio = (pad["peak_growth_mib"] / max(pack["peak_growth_mib"], 0.1)
                 if pad["peak_growth_mib"] is not None and pack["peak_growth_mib"] is not None else None)
        print(f"{pad['samples']:>7} {pad['response']:>8} {pad['tokens']:>7} {fmt(pad)} {fmt(pack)} "
              f"{'-' if ratio is None else f'{ratio:.1f}':>6}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"vocab": VOCAB, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
