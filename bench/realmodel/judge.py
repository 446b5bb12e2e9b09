#!/usr/bin/env python3
"""judge: a policy against every baseline on the judging prompts (bench/FIDELITY.md, "amber").

Reads evaluate.py's rows (results.jsonl, and/or the CSV report.py writes) and
prints, per rho, the mean over the given prompts of each metric for every
policy, the best baseline of each metric, and whether the policy under test
beats it (lower attention-output error and KL, higher top-1 agreement and
greedy prefix). Rows of the same (prompt, policy, rho) from a later file
replace earlier ones; a (policy, rho) that lacks a prompt is an error, so a
mean is never over fewer prompts than asked.

  .venv/bin/python judge.py --prompts P1,P2,... --policy amber \\
      results/smollm2_results.csv out/smollm2/results.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

BASELINES = ["streaming_llm", "h2o", "snapkv", "pyramidkv", "look_m", "meda"]
# metric, label, higher is better
METRICS = [("attn_error", "attention-output error", False), ("top1_agreement", "top-1 agreement", True),
           ("kl_mean", "mean KL (nats)", False), ("greedy_prefix", "greedy prefix (tokens)", True)]


def rows_of(path: str):
    if path.endswith(".jsonl"):
        with open(path) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
    else:
        with open(path) as f:
            yield from csv.DictReader(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="results.jsonl and/or <model>_results.csv, later ones win")
    p.add_argument("--prompts", required=True, help="comma list of the judging prompts")
    p.add_argument("--policy", default="amber", help="the policy judged against the baselines")
    p.add_argument("--rhos", default="0.05,0.1,0.2")
    p.add_argument("--tag", default="", help="the rows' tag (evaluate.py --tag)")
    args = p.parse_args(argv)
    prompts = [x for x in args.prompts.split(",") if x]
    rhos = [float(r) for r in args.rhos.split(",")]
    table = {}
    for path in args.files:
        for r in rows_of(path):
            if (r.get("tag") or "") != args.tag or r["prompt"] not in prompts:
                continue
            table[(r["prompt"], r["policy"], float(r["rho"]))] = r
    policies = BASELINES + [args.policy]
    missing = [(pr, po, rho) for pr in prompts for po in policies for rho in rhos if (pr, po, rho) not in table]
    if missing:
        print(f"judge: {len(missing)} runs missing, e.g. {missing[:3]}", file=sys.stderr)
        return 1
    print(f"Judging prompts ({len(prompts)}): {', '.join(prompts)}\n")
    print("| rho | metric | " + " | ".join(policies) + " | best baseline | " + args.policy + " wins |")
    print("|---|---|" + "---|" * (len(policies) + 2))
    verdicts = []
    for rho in rhos:
        for key, label, higher in METRICS:
            means = {po: sum(float(table[(pr, po, rho)][key]) for pr in prompts) / len(prompts) for po in policies}
            best = (max if higher else min)(BASELINES, key=lambda po: means[po])
            wins = means[args.policy] > means[best] if higher else means[args.policy] < means[best]
            verdicts.append((rho, label, wins))
            fmt = "{:.2f}" if key == "greedy_prefix" else "{:.3f}"
            cells = [("**" + fmt.format(means[po]) + "**") if po == args.policy and wins else fmt.format(means[po])
                     for po in policies]
            print(f"| {rho:g} | {label} | " + " | ".join(cells) + f" | {best} | {'yes' if wins else 'no'} |")
    lost = [(rho, label) for rho, label, wins in verdicts if not wins]
    print()
    print(f"{args.policy} beats every baseline in {len(verdicts) - len(lost)} of {len(verdicts)} (rho, metric) cells"
          + ("" if not lost else "; not in: " + "; ".join(f"{label} at rho {rho:g}" for rho, label in lost)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
