"""Markdown tables from results/<model>_<split>.jsonl (harness.py) into results/<model>_<split>.md.

    python report.py --model smollm2 --split judge
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
KEEPS = (0.1, 0.25, 0.5)
SETTINGS = ("query_agnostic", "query_aware")


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def method_order(methods) -> list[str]:
    def key(m):
        fam = 0 if m == "none" else 1 if m in ("kvpress:no_press", "medakv:full") else \
            2 if m.startswith("kvpress:") else 3
        return (fam, m)
    return sorted(set(methods), key=key)


def pct(xs: list[bool]) -> str:
    return f"{100.0 * sum(xs) / len(xs):.0f} ({len(xs)})" if xs else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--split", default="judge")
    ap.add_argument("--tag", default="")
    ap.add_argument("--complete-only", action="store_true",
                    help="leave out kept instances that lack some method's runs (a run stopped mid-instance)")
    args = ap.parse_args()
    name = f"{args.model}_{args.split}{args.tag}"
    rows = load(os.path.join(HERE, "results", name + ".jsonl"))

    base = {(r["id"], r["setting"]): r for r in rows if r["method"] == "none"}
    ids = sorted({r["id"] for r in rows})
    kept_ids = [i for i in ids if all(base.get((i, s), {}).get("correct") for s in SETTINGS)]
    dropped = [i for i in ids if i not in kept_ids]
    combos = {(r["method"], r["keep"], r["setting"]) for r in rows if r["id"] in set(kept_ids)}
    have = collections.defaultdict(set)
    for r in rows:
        have[r["id"]].add((r["method"], r["keep"], r["setting"]))
    partial = [i for i in kept_ids if not combos <= have[i]]
    if args.complete_only:
        kept_ids = [i for i in kept_ids if i not in partial]
    kept = set(kept_ids)
    rows_k = [r for r in rows if r["id"] in kept]
    methods = method_order(r["method"] for r in rows_k)

    out = [f"# {args.model}, `{args.split}` split: medakv policies and kvpress presses on the task suite", ""]
    tasks = collections.Counter(r["task"] for r in rows if r["method"] == "none" and r["setting"] == SETTINGS[0])
    tasks_k = collections.Counter(r["task"] for r in rows if r["method"] == "none" and r["setting"] == SETTINGS[0]
                                  and r["id"] in kept)
    out += [f"Instances generated and tried: {len(ids)}; kept (the uncompressed model answers correctly in both "
            f"settings): **{len(kept_ids)}**; dropped: {len(dropped)}.",
            "Per task, kept / tried: " + ", ".join(f"{t} {tasks_k.get(t, 0)}/{n}" for t, n in sorted(tasks.items()))
            + ".", ""]
    if partial:
        out += [f"Kept instances with only part of the methods run (stopped at the deadline): {partial}"
                + (" (left out of every table)" if args.complete_only else " (included: n differs per method)")
                + ".", ""]
    if rows_k:
        toks = [r["ctx_tokens"] for r in rows_k if r["method"] == "none" and r["setting"] == SETTINGS[0]]
        out += [f"Context tokens (chat header + document) of the kept instances: min {min(toks)}, median "
                f"{int(statistics.median(toks))}, max {max(toks)}.", ""]

    # accuracy tables
    for setting in SETTINGS:
        out += [f"## Accuracy, {setting}: % correct (n instances)", "",
                "| method | keep 10% | keep 25% | keep 50% | keep 100% |", "|---|---|---|---|---|"]
        for m in methods:
            cells = []
            for keep in KEEPS + (1.0,):
                xs = [bool(r["correct"]) for r in rows_k if r["method"] == m and r["setting"] == setting
                      and r["keep"] == keep and r.get("correct") is not None]
                cells.append(pct(xs))
            if all(c == "-" for c in cells):
                continue
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")

    # mean over the three ratios, both settings, per task
    tlist = sorted(t for t in tasks if tasks_k.get(t))
    out += ["## Accuracy per task, mean over keep 10/25/50% (both settings pooled): % (n runs)", "",
            "| method | " + " | ".join(tlist) + " |", "|---|" + "---|" * len(tlist)]
    for m in methods:
        if m in ("none", "kvpress:no_press", "medakv:full"):
            continue
        cells = [pct([bool(r["correct"]) for r in rows_k if r["method"] == m and r["task"] == t
                      and r.get("correct") is not None]) for t in tlist]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out.append("")

    # next-token KL of the first answer token, where the run recorded it
    if any("kl_first" in r for r in rows_k):
        for setting in SETTINGS:
            out += [f"## KL(uncompressed || method) of the first answer token, {setting}: mean nats (n runs)", "",
                    "| method | keep 10% | keep 25% | keep 50% |", "|---|---|---|---|"]
            for m in methods:
                cells = []
                for keep in KEEPS:
                    ks = [r["kl_first"] for r in rows_k if r["method"] == m and r["setting"] == setting
                          and r["keep"] == keep and "kl_first" in r]
                    cells.append(f"{statistics.fmean(ks):.3f} ({len(ks)})" if ks else "-")
                if any(c != "-" for c in cells):
                    out.append(f"| {m} | " + " | ".join(cells) + " |")
            out.append("")

    # sanity: identical tokens
    out += ["## Sanity: uncompressed paths give the uncompressed model's tokens", "",
            "Generated token ids compared with `none` on every kept instance and setting.", "",
            "| method | setting | identical / compared |", "|---|---|---|"]
    for m in ("kvpress:no_press", "medakv:full"):
        for s in SETTINGS:
            same = [r.get("gen_ids") == base[(r["id"], s)].get("gen_ids") for r in rows
                    if r["method"] == m and r["setting"] == s and (r["id"], s) in base]
            if same:
                out.append(f"| {m} | {s} | {sum(same)} / {len(same)} |")
    out.append("")

    # cost
    out += ["## Wall-clock per run (seconds, median over kept instances and ratios; shared 2-core CPU, 2 torch "
            "threads)", "",
            "`prefill`: the prefix's forward pass into a DynamicCache (none); `prefill+press`: kvpress's "
            "prefill under the press (scoring and pruning included; KVzip: its reconstruction passes too); "
            "`compress()`: the whole medakv.hf.compress call, split into `forward` (the capture pass over the "
            "prefix and the probe rows, and building the CompressedCache) and `server` (the gRPC call: upload, "
            "compression, download); `decode`: the shared greedy decode (question or last token + answer).", "",
            "| method | setting | prefill / prefill+press | compress() | forward | server | decode | runs |",
            "|---|---|---|---|---|---|---|---|"]

    def med(xs):
        return f"{statistics.median(xs):.2f}" if xs else "-"

    for m in methods:
        for s in SETTINGS:
            rs = [r for r in rows_k if r["method"] == m and r["setting"] == s and "time" in r]
            if not rs:
                continue
            t = lambda k: [r["time"][k] for r in rs if k in r["time"]]  # noqa: E731
            pre = t("prefill") or t("prefill_press")
            out.append(f"| {m} | {s} | {med(pre)} | {med(t('compress_call'))} | {med(t('forward'))} | "
                       f"{med(t('server'))} | {med(t('decode'))} | {len(rs)} |")
    out.append("")

    # kept fraction check
    out += ["## Kept fraction of the prefix's KV entries (mean over layers; median over runs)", "",
            "| method | keep 10% | keep 25% | keep 50% |", "|---|---|---|---|"]
    for m in methods:
        if m in ("none", "kvpress:no_press", "medakv:full"):
            continue
        cells = []
        for keep in KEEPS:
            ks = [r["kept_frac"] for r in rows_k if r["method"] == m and r["keep"] == keep
                  and r.get("kept_frac") is not None]
            if ("KVzip" in m or "AdaKV" in m) and ks and max(ks) >= 0.999:
                ks = []  # recorded before harness.py counted masked keys (these presses mask, not remove)
            cells.append(f"{statistics.median(ks):.3f}" if ks else "n/a")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out.append("")

    errs = collections.Counter((r["method"], r["error"][:160]) for r in rows if r.get("error"))
    if errs:
        out += ["## Errors", "", "| method | error | runs |", "|---|---|---|"]
        for (m, e), n in sorted(errs.items()):
            out.append(f"| {m} | `{e}` | {n} |")
        out.append("")
    if dropped:
        out += ["## Dropped instances (uncompressed answer wrong)", ""]
        for i in dropped:
            ans = [base.get((i, s), {}).get("answer") for s in SETTINGS]
            out.append(f"- {i}: {ans}")
        out.append("")
    path = os.path.join(HERE, "results", name + ".md")
    with open(path, "w") as f:
        f.write("\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()
