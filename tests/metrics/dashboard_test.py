#!/usr/bin/env python3
"""The Grafana dashboard and the README's metric table against a live
medakv-server (no Prometheus needed; prometheus_e2e.py also runs every
dashboard query through a real Prometheus):

- deploy/grafana/medakv.json is valid JSON with the expected structure, every
  query names only metrics that the server exports, and it has the panels
  an operator needs (request rate, errors, latency by stage, throughput,
  compression ratio, per-layer budget heatmap, store fill, evictions,
  process memory, CPU and descriptors, request memory against its bound);
- the server records per-layer budgets for every policy: after an amber
  compression (the default policy) and a meda one, medakv_layer_budget_ratio
  has each layer under policy="amber" and under policy="meda"; the per-layer
  budget panels filter by the `policy` dashboard variable (whose query
  offers both) and say they cover every policy;
- README.md's "Metrics" section lists every medakv_ and process_ metric the
  server exports, and no other.

Usage: dashboard_test.py MEDAKV MEDAKV_SERVER REPO_ROOT
"""

import copy
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import metrics_util as mu  # noqa: E402

LAYERS = 3  # of the test cache


def self_test():
    # The PromQL name extraction must find names, or every check below passes vacuously.
    got = mu.metric_names('sum by (le, method) (rate(a_bucket{method="Compress", x=~"y|z"}[5m])) / on(job) '
                          'group_left(version) b_total - 2 * histogram_quantile(0.5, c) > bool 1')
    if got != ["a_bucket", "b_total", "c"]:
        mu.fail("metric_names self-test: got %s" % got)
    if mu.metric_names("up") != ["up"] or mu.metric_names("1e-9 + 0.5") != []:
        mu.fail("metric_names self-test on 'up' and numbers")


def required_panels(dashboard):
    """What the dashboard must show, as (what, predicate on (panel, expr))."""
    checks = {
        "request rate": lambda p, e: "rate(medakv_requests_total" in e and "code" not in e,
        "errors": lambda p, e: "medakv_requests_total" in e and ("code!~" in e or "code=~" in e),
        "latency percentiles by stage": lambda p, e: ("histogram_quantile" in e
                                                      and "medakv_stage_duration_seconds_bucket" in e
                                                      and re.search(r"by \([^)]*stage", e) is not None),
        "throughput (bytes)": lambda p, e: "medakv_received_bytes_total" in e or "medakv_sent_bytes_total" in e,
        "compression ratio": lambda p, e: "medakv_compression_ratio" in e,
        "per-layer budget heatmap": lambda p, e: p.get("type") == "heatmap" and LAYER_BUDGET in e
                                                 and re.search(r"by \(layer\)", e) is not None,
        "store fill": lambda p, e: "medakv_store_used_bytes" in e and "medakv_store_capacity_bytes" in e,
        "evictions": lambda p, e: "medakv_store_evictions_total" in e,
        "resident memory": lambda p, e: "process_resident_memory_bytes" in e,
        "CPU time": lambda p, e: "rate(process_cpu_seconds_total" in e,
        "open file descriptors": lambda p, e: "process_open_fds" in e,
        "request memory against its bound": lambda p, e: "medakv_request_memory_bytes" in e and any(
            "medakv_request_memory_bound_bytes" in t.get("expr", "") for t in p.get("targets", [])),
    }
    missing = []
    for what, pred in checks.items():
        if not any(pred(p, t.get("expr", "")) for p in mu.dashboard_panels(dashboard) for t in p.get("targets", [])):
            missing.append(what)
    return missing


LAYER_BUDGET = "medakv_layer_budget_ratio"


def layer_budget_counts(text):
    """{(policy, layer): count} of the per-layer budget histogram in a /metrics text."""
    counts = {}
    for m in re.finditer(r'^%s_count\{([^}]*)\} (\S+)$' % LAYER_BUDGET, text, re.M):
        labels = dict(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="([^"]*)"', m.group(1)))
        if sorted(labels) != ["layer", "policy"]:
            mu.fail("%s_count has labels %s, expected policy and layer" % (LAYER_BUDGET, sorted(labels)))
        counts[(labels["policy"], labels["layer"])] = float(m.group(2))
    return counts


def check_layer_budgets_recorded(after_amber, after_meda, layers):
    """Every policy records its per-layer budgets: an amber compression (the
    default policy) of a `layers`-layer cache, then a meda one of the same."""
    every = [str(l) for l in range(layers)]
    amber = layer_budget_counts(after_amber)
    if amber != {("amber", l): 1.0 for l in every}:
        mu.fail("after one amber compression of %d layers: expected one budget per layer under policy=\"amber\" "
                "(and no other series), got %s" % (layers, amber))
    both = layer_budget_counts(after_meda)
    want = {(p, l): 1.0 for p in ("amber", "meda") for l in every}
    if both != want:
        mu.fail("after an amber and a meda compression of %d layers: expected one budget per layer and policy, "
                "got %s" % (layers, both))
    print("ok: %s records every layer of an amber and of a meda compression, by policy" % LAYER_BUDGET)
    return sorted({p for p, _ in both})


def policy_variable(dashboard):
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("name") == "policy":
            return v
    mu.fail("the dashboard has no 'policy' variable (for the per-layer budget panels)")


def check_layer_budget_panels(dashboard, recorded_policies):
    """The per-layer budget panels show the chosen policy's budgets (the
    `policy` variable, whose values come from the metric itself) and say
    they cover every policy."""
    v = policy_variable(dashboard)
    q = v.get("query")
    q = q.get("query", "") if isinstance(q, dict) else (q or "")
    m = re.match(r"label_values\((%s_count(\{[^}]*\})?),\s*policy\)$" % LAYER_BUDGET, q.strip())
    if v.get("type") != "query" or not m:
        mu.fail("the 'policy' variable must be label_values(%s_count{...}, policy), got %r" % (LAYER_BUDGET, q))
    current = v.get("current", {}).get("value")
    if current not in ("amber", "$__all") or (current == "$__all" and not v.get("includeAll")):
        mu.fail("the 'policy' variable should default to amber (the default policy) or All, got %r" % current)
    if v.get("includeAll") and v.get("allValue") != ".*":
        mu.fail("the 'policy' variable's All must match every policy (allValue '.*'), got %r" % v.get("allValue"))
    if "amber" not in recorded_policies:
        mu.fail("the 'policy' variable's default, amber, is not among the recorded policies %s" % recorded_policies)
    # label_values of the metric's policy label: it offers exactly the policies recorded.
    print("ok: the 'policy' variable (%s, default %s) offers the recorded policies %s"
          % (q, current, ", ".join(recorded_policies)))

    panels = [p for p in mu.dashboard_panels(dashboard)
              if any(LAYER_BUDGET in t.get("expr", "") for t in p.get("targets", []))]
    if len(panels) < 2:
        mu.fail("expected the per-layer budget heatmap and bar gauge, found %d panels of %s" % (len(panels), LAYER_BUDGET))
    for p in panels:
        where = "panel %r" % p.get("title")
        text = " ".join([p.get("title", ""), p.get("description", ""),
                         str(p.get("fieldConfig", {}).get("defaults", {}).get("noValue", ""))])
        if "meda only" in text or "MEDA" in p.get("title", ""):
            mu.fail("%s: every policy records per-layer budgets; the panel must not say meda only" % where)
        if "every policy" not in p.get("title", ""):
            mu.fail("%s: the title should say the panel covers every policy" % where)
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            selectors = re.findall(r"%s_(?:sum|count|bucket)\{([^}]*)\}" % LAYER_BUDGET, expr)
            if not selectors or any('policy=~"$policy"' not in sel for sel in selectors):
                mu.fail("%s: every selector of %s must filter policy=~\"$policy\": %s" % (where, LAYER_BUDGET, expr))
            if not re.search(r"sum by \(layer\)", expr):
                mu.fail("%s: the budgets must be summed by layer (one value per layer): %s" % (where, expr))
    print("ok: the %d per-layer budget panels show the policy chosen in $policy, every policy available"
          % len(panels))


def readme_metrics(path):
    with open(path) as f:
        text = f.read()
    m = re.search(r"^## Metrics\n(.*?)(?=^## )", text, re.S | re.M)
    if not m:
        mu.fail("README.md has no '## Metrics' section")
    return set(re.findall(r"`((?:medakv|process)_[a-z0-9_]+)`", m.group(1)))


def main():
    if len(sys.argv) != 4:
        print(__doc__)
        return 2
    medakv, server_bin, root = sys.argv[1:]
    self_test()
    path = os.path.join(root, "deploy", "grafana", "medakv.json")
    try:
        with open(path) as f:
            dashboard = json.load(f)
    except (OSError, ValueError) as e:
        mu.fail("%s: %s" % (path, e))

    with tempfile.TemporaryDirectory(prefix="medakv-dashboard-") as tmp:
        procs = mu.Processes()  # stopped before the directory is removed
        try:
            proc, grpc_port, metrics_port, log = mu.start_server(procs, server_bin, tmp)
            cache = os.path.join(tmp, "in.safetensors")
            mu.synth(medakv, cache, LAYERS, 200)
            # An amber compression (the default policy) first: the server
            # records its per-layer budgets under policy="amber".
            mu.compress(medakv, cache, os.path.join(tmp, "amber.safetensors"), "127.0.0.1:%d" % grpc_port,
                        "amber", 0.3)
            status, amber_text = mu.http_get("http://127.0.0.1:%d/metrics" % metrics_port)
            if status != 200:
                mu.fail("/metrics answered %d" % status)
            # Then a MEDA one: its own series, under policy="meda".
            mu.compress(medakv, cache, os.path.join(tmp, "out.safetensors"), "127.0.0.1:%d" % grpc_port, "meda", 0.3)
            status, text = mu.http_get("http://127.0.0.1:%d/metrics" % metrics_port)
            if status != 200:
                mu.fail("/metrics answered %d" % status)
            mu.stop_server(procs, proc, log)
        finally:
            procs.close()

    families, samples = mu.exported_names(text)
    medakv_families = {n for n in families if n.startswith("medakv_")}
    if len(medakv_families) < 20:
        mu.fail("only %d medakv_ families exported: %s" % (len(medakv_families), sorted(medakv_families)))
    print("ok: the server exports %d medakv_ metric families" % len(medakv_families))
    process_families = {n for n in families if n.startswith("process_")}
    if process_families != set(mu.PROCESS_METRICS):
        mu.fail("process_ families exported: %s, expected %s" % (sorted(process_families), sorted(mu.PROCESS_METRICS)))
    print("ok: the server exports the %d process_ metrics" % len(process_families))
    server_families = medakv_families | process_families

    errors = mu.check_dashboard(dashboard, samples)
    # The check can fail: a query with a metric the server does not export.
    broken = copy.deepcopy(dashboard)
    broken["panels"][1]["targets"][0]["expr"] = "rate(medakv_no_such_metric_total[5m])"
    if not any("medakv_no_such_metric_total" in e for e in mu.check_dashboard(broken, samples)):
        mu.fail("check_dashboard accepted a query of an unexported metric")
    if errors:
        mu.fail("deploy/grafana/medakv.json:\n  " + "\n  ".join(errors))
    queries = mu.dashboard_queries(dashboard)
    print("ok: %d dashboard queries name only exported metrics" % len(queries))
    missing = required_panels(dashboard)
    if missing:
        mu.fail("the dashboard has no panel for: " + ", ".join(missing))
    print("ok: the dashboard shows every view an operator needs")

    policies = check_layer_budgets_recorded(amber_text, text, LAYERS)
    check_layer_budget_panels(dashboard, policies)

    documented = readme_metrics(os.path.join(root, "README.md"))
    undocumented = sorted(server_families - documented)
    stale = sorted(documented - server_families)
    if undocumented or stale:
        mu.fail("README.md's Metrics section: not documented %s; documented but not exported %s"
                % (undocumented, stale))
    print("ok: README.md documents the %d medakv_ and process_ metrics" % len(documented))
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
