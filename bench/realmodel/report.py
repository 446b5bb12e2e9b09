#!/usr/bin/env python3
"""report: tables (Markdown), plots (PNG) and a CSV from evaluate.py's results.jsonl.

  .venv/bin/python report.py --models smollm2,gemma3 --results-dir results

writes, into --results-dir:
  <model>.md            tables per prompt kind (mean over the kind's prompts) and per prompt
  <model>.png           each metric against rho, one line per policy, one row per prompt kind
  <model>_results.csv   one row per (prompt, policy, rho, tag): the figures the tables come from
  <model>_ablation.md   MEDA variants (rows with a --tag), when there are any
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
POLICIES = ["streaming_llm", "h2o", "snapkv", "pyramidkv", "look_m", "meda"]
UNIFORM = ["streaming_llm", "h2o", "snapkv", "look_m"]
KINDS = ["all", "doc_qa", "instruction", "structured"]
# (key, label, higher is better, format)
METRICS = [("top1_agreement", "top-1 agreement", True, "{:.3f}"),
           ("kl_mean", "mean KL (nats)", False, "{:.3f}"),
           ("greedy_exact", "exact match, 32 greedy tokens", True, "{:.2f}"),
           ("greedy_prefix", "greedy tokens equal before the first difference", True, "{:.1f}"),
           ("attn_error", "attention-output error", False, "{:.3f}")]


def load(path, tag=""):
    rows = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("tag", "") == tag:
                rows.append(r)
    return rows


def mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def by_kind(rows, kind):
    return [r for r in rows if kind == "all" or r["kind"] == kind]


def table(rows, kind, policies):
    """Markdown: one block of rows per metric, columns = policies; the best of each row in bold."""
    sel = by_kind(rows, kind)
    prompts = sorted({r["prompt"] for r in sel})
    rhos = sorted({r["rho"] for r in sel if r["policy"] != "full"})
    cell = collections.defaultdict(list)
    for r in sel:
        cell[(r["policy"], r["rho"])].append(r)
    out = ["| metric | rho | " + " | ".join(policies) + " |", "|---|---|" + "---|" * len(policies)]
    for key, label, higher, fmt in METRICS:
        for rho in rhos:
            vals = [mean([r[key] for r in cell[(p, rho)]]) for p in policies]
            best = max(vals) if higher else min(vals)
            cells = [("**" + fmt.format(v) + "**") if v == best else fmt.format(v) for v in vals]
            out.append(f"| {label} | {rho:g} | " + " | ".join(cells) + " |")
    return prompts, "\n".join(out)


def wins(rows, key, higher):
    """Per (prompt, rho): does meda beat (strictly) the best uniform-budget baseline on `key`?"""
    cell = {(r["prompt"], r["policy"], r["rho"]): r[key] for r in rows}
    res = collections.Counter()
    for (prompt, policy, rho), v in cell.items():
        if policy != "meda":
            continue
        base = [cell[(prompt, p, rho)] for p in UNIFORM if (prompt, p, rho) in cell]
        if not base:
            continue
        best = max(base) if higher else min(base)
        if (v > best) if higher else (v < best):
            res["win"] += 1
        elif v == best:
            res["tie"] += 1
        else:
            res["loss"] += 1
    return res


def _dump_meta(out_dir):
    for n in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        if n.endswith(".json") and n != "crosscheck.json":
            with open(os.path.join(out_dir, n)) as f:
                return json.load(f)
    return {}


def sliding_layers(out_dir):
    return _dump_meta(out_dir).get("sliding_layers") or []


def sliding_window(out_dir):
    return _dump_meta(out_dir).get("sliding_window")


def pairwise(rows, other, key, higher):
    cell = {(r["prompt"], r["policy"], r["rho"]): r[key] for r in rows}
    res = collections.Counter()
    for (prompt, policy, rho), v in cell.items():
        if policy != "meda" or (prompt, other, rho) not in cell:
            continue
        o = cell[(prompt, other, rho)]
        res["win" if ((v > o) if higher else (v < o)) else "tie" if v == o else "loss"] += 1
    return res


def per_prompt(rows, policies):
    out = ["| prompt | kind | T | non-text | rho | " + " | ".join(policies) + " |",
           "|---|---|---|---|---|" + "---|" * len(policies)]
    cell = {(r["prompt"], r["policy"], r["rho"]): r for r in rows}
    prompts = sorted({(r["tokens"], r["prompt"], r["kind"], r["visual_tokens"]) for r in rows})
    rhos = sorted({r["rho"] for r in rows if r["policy"] != "full"})
    for t, prompt, kind, vis in prompts:
        for rho in rhos:
            cells = []
            for p in policies:
                r = cell.get((prompt, p, rho))
                cells.append("" if r is None else
                             f"{r['top1_agreement']:.2f} / {r['kl_mean']:.2f} / {r['greedy_prefix']} / "
                             f"{r['attn_error']:.2f}")
            out.append(f"| {prompt} | {kind} | {t} | {vis} | {rho:g} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows, model, path, policies):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    kinds = [k for k in KINDS if by_kind(rows, k)]
    fig, axes = plt.subplots(len(kinds), len(METRICS), figsize=(3.8 * len(METRICS), 3.2 * len(kinds)),
                             squeeze=False)
    for i, kind in enumerate(kinds):
        sel = by_kind(rows, kind)
        n = len({r["prompt"] for r in sel})
        for j, (key, label, higher, _) in enumerate(METRICS):
            ax = axes[i][j]
            for p in policies:
                pts = collections.defaultdict(list)
                for r in sel:
                    if r["policy"] == p:
                        pts[r["rho"]].append(r[key])
                xs = sorted(pts)
                ax.plot(xs, [mean(pts[x]) for x in xs], marker="o", label=p,
                        linewidth=2.5 if p == "meda" else 1.2, color="black" if p == "meda" else None)
            ax.set_xscale("log")
            ax.set_xticks([0.05, 0.1, 0.2, 0.5])
            ax.set_xticklabels(["0.05", "0.1", "0.2", "0.5"])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            if key in ("kl_mean", "attn_error"):
                ax.set_yscale("log")
            ax.set_title(f"{label}\n{kind} ({n} prompts)", fontsize=9)
            ax.set_xlabel("rho (fraction kept)", fontsize=8)
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"{model}: fidelity of compressed caches against the full cache", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=75)
    plt.close(fig)


def write_csv(rows, path):
    keys = ["model", "prompt", "kind", "tokens", "visual_tokens", "policy", "rho", "tag", "kept_fraction",
            "top1_agreement", "kl_mean", "kl_max", "greedy_exact", "greedy_prefix", "attn_error",
            "attn_error_full_attention_layers"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in sorted(rows, key=lambda r: (r["tokens"], r["prompt"], r["tag"], r["policy"], r["rho"])):
            w.writerow([f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k) for k in keys])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,gemma3")
    p.add_argument("--out", default=os.path.join(HERE, "out"))
    p.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--fidelity", default=os.path.join(os.path.dirname(HERE), "FIDELITY.md"),
                   help="put the tables into this file between its <!-- BEGIN <model> tables --> and "
                        "<!-- END <model> tables --> markers (when it has them)")
    args = p.parse_args()
    os.makedirs(args.results_dir, exist_ok=True)
    for model in [m for m in args.models.split(",") if m]:
        path = os.path.join(args.out, model, "results.jsonl")
        if not os.path.exists(path):
            print(f"{model}: no {path}, skipped")
            continue
        rows = load(path)
        all_rows = [json.loads(line) for line in open(path)]
        write_csv(all_rows, os.path.join(args.results_dir, f"{model}_results.csv"))
        full = [r for r in rows if r["policy"] == "full"]
        rows_c = [r for r in rows if r["policy"] != "full"]
        md = [f"# {model}: fidelity tables\n",
              "Means over the prompts of each kind. Columns: policies at their defaults; the best value of "
              "each row in bold. top-1: next-token top-1 agreement with the full cache (teacher-forced over "
              "the full cache's 32-token greedy continuation); KL: mean KL(full || compressed) of the "
              "next-token distributions; exact match: share of prompts whose 32 greedy tokens over the "
              "compressed cache equal the full cache's; greedy tokens equal: how many of the 32 match before the first difference; attention-output error: docs/algorithm.md's relative "
              "error for the 32 future queries, mean over rows, heads and layers.\n",
              f"`full` (the check row, medakv's pass-through): top-1 "
              f"{mean([r['top1_agreement'] for r in full]):.3f}, max KL {max([r['kl_max'] for r in full] or [0]):.2e}, "
              f"exact match {mean([r['greedy_exact'] for r in full]):.2f}, attention error "
              f"{max([r['attn_error'] for r in full] or [0]):.2e} over {len(full)} prompts.\n"]
        for kind in KINDS:
            prompts, t = table(rows_c, kind, POLICIES)
            if not prompts:
                continue
            md.append(f"## {kind} ({len(prompts)} prompts)\n")
            if kind != "all":
                md.append("Prompts: " + ", ".join(f"`{x}`" for x in prompts) + "\n")
            md.append(t + "\n")
        md.append("## MEDA against the best uniform-budget baseline, per prompt and rho\n")
        md.append("| metric | MEDA better | equal | worse |\n|---|---|---|---|")
        for key, label, higher, _ in METRICS:
            w = wins(rows_c, key, higher)
            md.append(f"| {label} | {w['win']} | {w['tie']} | {w['loss']} |")
        md.append("\nMEDA against each policy alone, per prompt and rho (better / equal / worse):\n")
        md.append("| metric | " + " | ".join(p for p in POLICIES if p != "meda") + " |")
        md.append("|---|" + "---|" * (len(POLICIES) - 1))
        for key, label, higher, _ in METRICS:
            cells = []
            for other in [p for p in POLICIES if p != "meda"]:
                w = pairwise(rows_c, other, key, higher)
                cells.append(f"{w['win']} / {w['tie']} / {w['loss']}")
            md.append(f"| {label} | " + " | ".join(cells) + " |")
        md.append("\n## MEDA's layer budgets\n")
        md.append("Per rho, over the prompts: the smallest and largest layer budget as a fraction of T, and "
                  "how many layers keep every token (the alpha_max clamp) or at most 2% of them.\n")
        md.append("| rho | smallest B_l / T | largest B_l / T | layers at B_l = T | layers at B_l <= 0.02 T |")
        md.append("|---|---|---|---|---|")
        for rho in sorted({r["rho"] for r in rows_c}):
            x = [r for r in rows_c if r["policy"] == "meda" and r["rho"] == rho]
            if not x:
                continue
            lo = mean([min(r["budgets"]) / r["tokens"] for r in x])
            hi = mean([max(r["budgets"]) / r["tokens"] for r in x])
            full_l = mean([sum(b == r["tokens"] for b in r["budgets"]) for r in x])
            tiny = mean([sum(b <= 0.02 * r["tokens"] for b in r["budgets"]) for r in x])
            md.append(f"| {rho:g} | {lo:.3f} | {hi:.3f} | {full_l:.1f} of {len(x[0]['budgets'])} | {tiny:.1f} |")
        sliding = sliding_layers(os.path.join(args.out, model))
        if sliding:
            L = len(rows_c[0]["budgets"])
            glob = [l for l in range(L) if l not in sliding]
            md.append("\n## Global and sliding-window layers\n")
            md.append(f"Layers {', '.join(map(str, glob))} attend over the whole prompt; the other {len(sliding)} only "
                      "over the last {} tokens. MEDA's mean budget per layer of each kind (B_l / T), and the "
                      "attention-output error of the global layers alone (the only layers where every kept token "
                      "can still be seen), mean over the prompts:\n".format(sliding_window(os.path.join(args.out, model))))
            md.append("| rho | MEDA B/T, global | MEDA B/T, sliding | " + " | ".join(
                f"{p} error, global" for p in POLICIES) + " |")
            md.append("|---|---|---|" + "---|" * len(POLICIES))
            for rho in sorted({r["rho"] for r in rows_c}):
                x = [r for r in rows_c if r["policy"] == "meda" and r["rho"] == rho]
                g = mean([sum(r["budgets"][l] for l in glob) / (len(glob) * r["tokens"]) for r in x])
                sl = mean([sum(r["budgets"][l] for l in sliding) / (len(sliding) * r["tokens"]) for r in x])
                errs = [mean([r["attn_error_full_attention_layers"] for r in rows_c
                              if r["policy"] == p and r["rho"] == rho]) for p in POLICIES]
                best = min(errs)
                md.append(f"| {rho:g} | {g:.3f} | {sl:.3f} | " + " | ".join(
                    ("**{:.3f}**" if e == best else "{:.3f}").format(e) for e in errs) + " |")
        md.append("\n## Per prompt\n")
        md.append("Each cell: top-1 agreement / mean KL / matching greedy prefix (of 32 tokens) / attention-"
                  "output error.\n")
        md.append(per_prompt(rows_c, POLICIES) + "\n")
        tags = sorted({r.get("tag", "") for r in all_rows} - {""})
        if tags:
            ab = [f"# {model}: MEDA variants\n", "Same prompts and metrics; each variant is `meda` with the "
                  "extra `medakv compress` flags shown, against the baselines on the same prompts.\n",
                  "| variant | flags | rho | top-1 | KL | greedy prefix | attn error |", "|---|---|---|---|---|---|---|"]
            # Only the prompts every variant ran on.
            common = set.intersection(*({r["prompt"] for r in all_rows if r.get("tag") == t} for t in tags))
            ab[1] = ab[1].rstrip("\n") + f" Prompts: {', '.join(sorted(common))}.\n"
            same = [r for r in rows_c if r["prompt"] in common]
            variants = [("meda (defaults)", "", [r for r in same if r["policy"] == "meda"])]
            for tag in tags:
                tr = [r for r in all_rows if r.get("tag") == tag and r["prompt"] in common]
                variants.append((tag, tr[0]["extra"], tr))
            for p in UNIFORM + ["pyramidkv"]:
                variants.append((p, "(baseline)", [r for r in same if r["policy"] == p]))
            header = ab[-2:]
            ab = ab[:-2]
            for kind in KINDS:
                kv = [(n, f, by_kind(vr, kind)) for n, f, vr in variants]
                if not kv[0][2]:
                    continue
                ab.append(f"\n## {kind} ({len({r['prompt'] for r in kv[0][2]})} prompts)\n")
                ab.extend(header)
                for name, flags, vr in kv:
                    for rho in sorted({r["rho"] for r in vr}):
                        x = [r for r in vr if r["rho"] == rho]
                        ab.append(f"| {name} | `{flags}` | {rho:g} | {mean([r['top1_agreement'] for r in x]):.3f} | "
                                  f"{mean([r['kl_mean'] for r in x]):.3f} | "
                                  f"{mean([r['greedy_prefix'] for r in x]):.1f} | "
                                  f"{mean([r['attn_error'] for r in x]):.3f} |")
            with open(os.path.join(args.results_dir, f"{model}_ablation.md"), "w") as f:
                f.write("\n".join(ab) + "\n")
            if args.fidelity and os.path.exists(args.fidelity):
                begin, end = f"<!-- BEGIN {model} ablation -->", f"<!-- END {model} ablation -->"
                text = open(args.fidelity).read()
                if begin in text and end in text:
                    body = "\n".join(ab[2:]).replace("\n## ", "\n#### ")
                    text = text[:text.index(begin) + len(begin)] + "\n" + body.strip() + "\n" + text[text.index(end):]
                    with open(args.fidelity, "w") as f:
                        f.write(text)
        with open(os.path.join(args.results_dir, f"{model}.md"), "w") as f:
            f.write("\n".join(md))
        if args.fidelity and os.path.exists(args.fidelity):
            begin, end = f"<!-- BEGIN {model} tables -->", f"<!-- END {model} tables -->"
            text = open(args.fidelity).read()
            if begin in text and end in text:
                # The per-kind tables, MEDA against the baselines and its budgets (not the per-prompt table).
                body = "\n".join(md[3:md.index("\n## Per prompt\n")]).replace("\n## ", "\n#### ")
                body = body.replace("## all", "#### all", 1) if body.startswith("## all") else body
                text = text[:text.index(begin) + len(begin)] + "\n" + body.strip() + "\n" + text[text.index(end):]
                with open(args.fidelity, "w") as f:
                    f.write(text)
        plot(rows_c, model, os.path.join(args.results_dir, f"{model}.png"), POLICIES)
        print(f"{model}: {len(rows)} runs -> {args.results_dir}/{model}.md, {model}.png")


if __name__ == "__main__":
    main()
