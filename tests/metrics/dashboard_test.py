#!/usr/bin/env python3
"""The Grafana dashboard and the README's metric table against a live
medakv-server (no Prometheus needed; prometheus_e2e.py also runs every
dashboard query through a real Prometheus):

- deploy/grafana/medakv.json is valid JSON with the expected structure, every
  query names only metrics that the server exports, and it has the panels
  issue 7 asks for (request rate, errors, latency by stage, throughput,
  compression ratio, per-layer budget heatmap, store fill, evictions);
- README.md's "Metrics" section lists every medakv_ metric the server
  exports, and no other.

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


def self_test():
    # The PromQL name extraction must find names, or every check below passes vacuously.
    got = mu.metric_names('sum by (le, method) (rate(a_bucket{method="Compress", x=~"y|z"}[5m])) / on(job) '
                          'group_left(version) b_total - 2 * histogram_quantile(0.5, c) > bool 1')
    if got != ["a_bucket", "b_total", "c"]:
        mu.fail("metric_names self-test: got %s" % got)
    if mu.metric_names("up") != ["up"] or mu.metric_names("1e-9 + 0.5") != []:
        mu.fail("metric_names self-test on 'up' and numbers")


def required_panels(dashboard):
    """What the issue asks the dashboard to show, as (what, predicate on (panel, expr))."""
    checks = {
        "request rate": lambda p, e: "rate(medakv_requests_total" in e and "code" not in e,
        "errors": lambda p, e: "medakv_requests_total" in e and ("code!~" in e or "code=~" in e),
        "latency percentiles by stage": lambda p, e: ("histogram_quantile" in e
                                                      and "medakv_stage_duration_seconds_bucket" in e
                                                      and re.search(r"by \([^)]*stage", e) is not None),
        "throughput (bytes)": lambda p, e: "medakv_received_bytes_total" in e or "medakv_sent_bytes_total" in e,
        "compression ratio": lambda p, e: "medakv_compression_ratio" in e,
        "per-layer budget heatmap": lambda p, e: p.get("type") == "heatmap" and "medakv_meda_layer_budget_ratio" in e
                                                 and re.search(r"by \(layer\)", e) is not None,
        "store fill": lambda p, e: "medakv_store_used_bytes" in e and "medakv_store_capacity_bytes" in e,
        "evictions": lambda p, e: "medakv_store_evictions_total" in e,
    }
    missing = []
    for what, pred in checks.items():
        if not any(pred(p, t.get("expr", "")) for p in mu.dashboard_panels(dashboard) for t in p.get("targets", [])):
            missing.append(what)
    return missing


def readme_metrics(path):
    with open(path) as f:
        text = f.read()
    m = re.search(r"^## Metrics\n(.*?)(?=^## )", text, re.S | re.M)
    if not m:
        mu.fail("README.md has no '## Metrics' section")
    return set(re.findall(r"`(medakv_[a-z0-9_]+)`", m.group(1)))


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
            # One MEDA compression creates the series that appear on first use.
            cache = os.path.join(tmp, "in.safetensors")
            mu.synth(medakv, cache, 3, 200)
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
    print("ok: the dashboard shows every view issue 7 asks for")

    documented = readme_metrics(os.path.join(root, "README.md"))
    undocumented = sorted(medakv_families - documented)
    stale = sorted(documented - medakv_families)
    if undocumented or stale:
        mu.fail("README.md's Metrics section: not documented %s; documented but not exported %s"
                % (undocumented, stale))
    print("ok: README.md documents the %d medakv_ metrics" % len(documented))
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
