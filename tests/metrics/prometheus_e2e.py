#!/usr/bin/env python3
"""End to end with a real Prometheus (Debian's `prometheus` package):

1. promtool checks deploy/prometheus: `check config prometheus.yml`, `check
   rules alerts.yml`, `test rules alerts_test.yml`.
2. medakv-server and Prometheus start on free loopback ports (Prometheus
   scrapes every second, stores in a temporary directory, loads alerts.yml);
   the medakv CLI runs three MEDA compressions and one SnapKV compression.
3. `promtool check metrics` passes on the scraped /metrics text.
4. Through Prometheus's HTTP query API: the request counter by method, policy
   and code; the statistics-stage latency histogram (count, +Inf bucket, sum
   equal to the stage times the CLI reported, a finite p99); tokens; the
   budget per layer of each policy (medakv_layer_budget_ratio by policy and
   layer), equal to the budgets the CLI reported for meda and for snapkv; the
   request memory bound; and the process_* metrics.
5. Every query of deploy/grafana/medakv.json evaluates without error and names
   only exported metrics; the `policy` variable offers the policies used, and
   the heatmap shows the chosen policy's mean budget per layer.
6. The alert rules are loaded and evaluate with health "ok"; once the server
   is stopped, `up` reads 0 and MedakvInstanceDown turns pending.

Exits 77 (ctest: skipped) when `prometheus` or `promtool` is not installed.
Every process it starts dies with it.

Usage: prometheus_e2e.py MEDAKV MEDAKV_SERVER REPO_ROOT
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import metrics_util as mu  # noqa: E402

SKIP = 77
LAYERS, TOKENS, RHO, MEDA_RUNS = 3, 300, 0.2, 3
LAYER_BUDGET = "medakv_layer_budget_ratio"


class Prometheus:
    def __init__(self, port):
        self.base = "http://127.0.0.1:%d" % port

    def get(self, path, params=None):
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            status, text = mu.http_get(url)
        except urllib.error.HTTPError as e:  # 400/422: a query that does not parse or evaluate
            return json.loads(e.read().decode("utf-8"))
        if status != 200:
            mu.fail("GET %s: %d" % (url, status))
        return json.loads(text)

    def query(self, expr):
        """The instant vector of `expr` as [(labels, value)]; fails on a query error."""
        r = self.get("/api/v1/query", {"query": expr})
        if r.get("status") != "success":
            mu.fail("query %s: %s: %s" % (expr, r.get("errorType"), r.get("error")))
        data = r["data"]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(s["metric"], float(s["value"][1])) for s in data["result"]]

    def value(self, expr):
        """The single value of `expr`, or None when it has no sample."""
        result = self.query(expr)
        if len(result) > 1:
            mu.fail("query %s: %d series, expected one: %s" % (expr, len(result), result))
        return result[0][1] if result else None


def expect_equal(prom, expr, want, tolerance=0.0):
    got = prom.value(expr)
    if got is None or abs(got - want) > tolerance:
        mu.fail("%s = %s, expected %s" % (expr, got, want))
    print("ok: %s = %s" % (expr, got))


def start_prometheus(procs, tmp, config):
    """Prometheus on a free loopback port (retried: the port is picked before Prometheus binds it)."""
    for attempt in range(3):
        port = mu.free_port()
        log = os.path.join(tmp, "prometheus-%d.log" % attempt)
        proc = procs.start(["prometheus", "--config.file=" + config,
                            "--storage.tsdb.path=" + os.path.join(tmp, "data-%d" % attempt),
                            "--web.listen-address=127.0.0.1:%d" % port, "--log.level=warn"], log)
        prom = Prometheus(port)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if mu.http_get(prom.base + "/-/ready", timeout=2)[0] == 200:
                    return proc, prom
            except OSError:
                pass
            time.sleep(0.2)
        procs.stop(proc)
        with open(log) as f:
            text = f.read()
        if "address already in use" not in text:
            mu.fail("prometheus did not become ready:\n" + text)
    mu.fail("prometheus could not bind a free port in 3 attempts")


def promtool(args, what, stdin=None, cwd=None):
    r = subprocess.run(["promtool", *args], input=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       cwd=cwd)
    if r.returncode != 0:
        mu.fail("promtool %s (%s) failed:\n%s" % (" ".join(args), what, r.stdout))
    print("ok: promtool %s" % " ".join(args))


def main():
    if len(sys.argv) != 4:
        print(__doc__)
        return 2
    medakv, server_bin, root = sys.argv[1:]
    missing = [tool for tool in ("prometheus", "promtool") if shutil.which(tool) is None]
    if missing:
        print("SKIP: %s not installed (Debian: apt-get install prometheus)" % " and ".join(missing))
        return SKIP
    deploy = os.path.join(root, "deploy", "prometheus")
    alerts = os.path.join(deploy, "alerts.yml")

    # 1. The shipped configuration and rules.
    promtool(["check", "config", "prometheus.yml"], "the scrape configuration", cwd=deploy)
    promtool(["check", "rules", "alerts.yml"], "the alert rules", cwd=deploy)
    promtool(["test", "rules", "alerts_test.yml"], "the alert rules' unit tests", cwd=deploy)
    with open(os.path.join(root, "deploy", "grafana", "medakv.json")) as f:
        dashboard = json.load(f)

    with tempfile.TemporaryDirectory(prefix="medakv-prometheus-") as tmp:
        procs = mu.Processes()  # stopped before the directory is removed
        try:
            # 2. The server and Prometheus (scraping it from the start), then the compressions.
            server, grpc_port, metrics_port, server_log = mu.start_server(procs, server_bin, tmp)
            config = os.path.join(tmp, "prometheus.yml")
            with open(config, "w") as f:
                f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
                        "rule_files:\n  - %s\n"
                        "scrape_configs:\n  - job_name: medakv\n    static_configs:\n"
                        "      - targets: ['127.0.0.1:%d']\n" % (json.dumps(alerts), metrics_port))
            promtool(["check", "config", config], "the test's configuration")
            prom_proc, prom = start_prometheus(procs, tmp, config)
            mu.wait_for(lambda: prom.value('up{job="medakv"}') == 1, 60, "Prometheus to scrape medakv-server")

            addr = "127.0.0.1:%d" % grpc_port
            cache = os.path.join(tmp, "in.safetensors")
            mu.synth(medakv, cache, LAYERS, TOKENS)
            # One compression, a scrape, then the others: the per-layer series
            # appear with a policy's first compression, and rate() (the heatmap)
            # sees increases only after a series' first sample.
            meda = [mu.compress(medakv, cache, os.path.join(tmp, "out0.safetensors"), addr, "meda", RHO)]
            mu.wait_for(lambda: prom.value('%s_count{job="medakv", policy="meda", layer="0"}' % LAYER_BUDGET) == 1,
                        60, "Prometheus to scrape the first MEDA compression")
            meda += [mu.compress(medakv, cache, os.path.join(tmp, "out%d.safetensors" % i), addr, "meda", RHO)
                     for i in range(1, MEDA_RUNS)]
            snapkv = mu.compress(medakv, cache, os.path.join(tmp, "snap.safetensors"), addr, "snapkv", 0.5)
            for summary in meda:
                if len(summary.get("per_layer", [])) != LAYERS or "statistics" not in summary.get("seconds", {}):
                    mu.fail("medakv compress --json lacks per_layer budgets or seconds.statistics: %s" % summary)
            runs_budgets = [[layer["budget"] for layer in s["per_layer"]] for s in meda]
            if any(b != runs_budgets[0] for b in runs_budgets):
                mu.fail("MEDA runs on the same cache gave different budgets: %s" % runs_budgets)

            # 3. The exposition text itself.
            status, text = mu.http_get("http://127.0.0.1:%d/metrics" % metrics_port)
            if status != 200 or "medakv_requests_total" not in text:
                mu.fail("/metrics: %d\n%s" % (status, text[:2000]))
            promtool(["check", "metrics"], "the scraped text", stdin=text)
            _, samples = mu.exported_names(text)

            # 4. Values through the query API (after a scrape that saw every compression).
            counter = 'medakv_requests_total{job="medakv", method="Compress", policy="meda", code="OK"}'
            mu.wait_for(lambda: prom.value(counter) == MEDA_RUNS, 60,
                        "Prometheus to scrape %d MEDA compressions (%s)" % (MEDA_RUNS, counter))
            expect_equal(prom, counter, MEDA_RUNS)
            expect_equal(prom, 'medakv_requests_total{job="medakv", method="Compress", policy="snapkv", code="OK"}', 1)
            # No call failed (the CLI may use a shared-memory lease, which the client ends by cancelling it).
            expect_equal(prom, 'sum(medakv_requests_total{job="medakv", code!="OK", method!="RegisterSharedMemory"}) '
                               'or vector(0)', 0)
            expect_equal(prom, 'medakv_build_info{job="medakv", backend="cpu"}', 1)

            stage = '{job="medakv", method="Compress", stage="statistics"}'
            runs = MEDA_RUNS + 1
            expect_equal(prom, "medakv_stage_duration_seconds_count" + stage, runs)
            expect_equal(prom, 'medakv_stage_duration_seconds_bucket{job="medakv", method="Compress", '
                               'stage="statistics", le="+Inf"}', runs)
            want = sum(s["seconds"]["statistics"] for s in meda + [snapkv])
            expect_equal(prom, "medakv_stage_duration_seconds_sum" + stage, want, tolerance=1e-6 + 1e-6 * want)
            p99 = prom.value("histogram_quantile(0.99, sum by (le) (medakv_stage_duration_seconds_bucket%s))" % stage)
            if p99 is None or not (0 < p99 <= 60) or math.isnan(p99):
                mu.fail("p99 of the statistics stage: %s" % p99)
            print("ok: p99 of the statistics stage is %.6f s" % p99)
            expect_equal(prom, 'medakv_request_duration_seconds_count{job="medakv", method="Compress"}', runs)

            expect_equal(prom, 'medakv_tokens_in_total{job="medakv", policy="meda"}', MEDA_RUNS * LAYERS * TOKENS)
            expect_equal(prom, 'medakv_tokens_kept_total{job="medakv", policy="meda"}',
                         sum(s["tokens_kept"] for s in meda))
            expect_equal(prom, 'medakv_compression_ratio_count{job="medakv", policy="meda"}', MEDA_RUNS)

            # The budget of each layer over its tokens, by policy, as the CLI reported the budgets.
            budgets = [sum(s["per_layer"][l]["budget"] for s in meda) for l in range(LAYERS)]
            if len(snapkv.get("per_layer", [])) != LAYERS:
                mu.fail("medakv compress --json (snapkv) lacks per_layer budgets: %s" % snapkv)
            snap_budgets = [snapkv["per_layer"][l]["budget"] for l in range(LAYERS)]
            for policy, runs, sums in (("meda", MEDA_RUNS, budgets), ("snapkv", 1, snap_budgets)):
                for l in range(LAYERS):
                    series = '{job="medakv", policy="%s", layer="%d"}' % (policy, l)
                    expect_equal(prom, LAYER_BUDGET + "_count" + series, runs)
                    expect_equal(prom, LAYER_BUDGET + "_sum" + series, sums[l] / TOKENS, tolerance=1e-9)
            if len(set(budgets)) < 2:
                mu.fail("MEDA gave every layer the same budget %s: the test cache should differ by layer" % budgets)
            layers = prom.query('count by (policy, layer) (%s_count{job="medakv"})' % LAYER_BUDGET)
            got = sorted((s[0]["policy"], s[0]["layer"]) for s in layers)
            if got != sorted((p, str(l)) for p in ("meda", "snapkv") for l in range(LAYERS)):
                mu.fail("policy and layer labels: %s" % got)
            print("ok: budgets per layer, meda %s and snapkv %s of %d tokens" % (budgets, snap_budgets, TOKENS))

            # The request memory gauges (idle: nothing held) and the bound: --max_inflight x --max_request_bytes.
            expect_equal(prom, 'medakv_request_memory_bytes{job="medakv", state="inflight"}', 0)
            expect_equal(prom, 'medakv_request_memory_bytes{job="medakv", state="queued"}', 0)
            expect_equal(prom, 'medakv_request_memory_bound_bytes{job="medakv"}', 4 * (8 << 30))
            # The process metrics of the server.
            now = time.time()
            checks = {
                "process_resident_memory_bytes": lambda v: v > 1 << 20,
                "process_virtual_memory_bytes": lambda v: v > 1 << 20,
                "process_open_fds": lambda v: v >= 3,
                "process_max_fds": lambda v: v >= 3,
                "process_cpu_seconds_total": lambda v: v >= 0,
                "process_start_time_seconds": lambda v: now - 3600 < v <= now,
            }
            for name, plausible in checks.items():
                v = prom.value('%s{job="medakv"}' % name)
                if v is None or not plausible(v):
                    mu.fail("%s = %s: not plausible" % (name, v))
            print("ok: process metrics: %d MiB resident, %d fds, %.2f s CPU"
                  % (prom.value('process_resident_memory_bytes{job="medakv"}') / (1 << 20),
                     prom.value('process_open_fds{job="medakv"}'), prom.value('process_cpu_seconds_total{job="medakv"}')))

            # 5. Every dashboard query through Prometheus.
            errors = mu.check_dashboard(dashboard, samples)
            if errors:
                mu.fail("deploy/grafana/medakv.json:\n  " + "\n  ".join(errors))
            queries = mu.dashboard_queries(dashboard)
            for where, expr in queries:
                prom.query(mu.substitute_variables(expr))
            print("ok: the %d dashboard queries evaluate in Prometheus" % len(queries))
            # The `policy` variable offers the policies that recorded budgets.
            policy_query = next(v["query"]["query"] for v in dashboard["templating"]["list"] if v["name"] == "policy")
            selector = mu.substitute_variables(policy_query[len("label_values("):policy_query.rindex(",")])
            offered = prom.get("/api/v1/label/policy/values", {"match[]": selector})["data"]
            if offered != ["meda", "snapkv"]:
                mu.fail("the policy variable (%s) offers %s, expected meda and snapkv" % (policy_query, offered))
            print("ok: the policy variable offers %s" % offered)
            # The heatmap's cells with policy meda chosen: the mean budget of
            # each layer over the last minute (the runs are equal, so whichever
            # it sees; snapkv's budgets are not mixed in).
            heatmap_expr = mu.substitute_variables(next(
                t["expr"] for p in mu.dashboard_panels(dashboard) if p.get("type") == "heatmap" for t in p["targets"]),
                policy="meda")

            def heatmap_cells():
                cells = {m.get("layer"): v for m, v in prom.query(heatmap_expr) if not math.isnan(v)}
                return cells if len(cells) == LAYERS else None

            cells = mu.wait_for(heatmap_cells, 30, "the heatmap query to have a value per layer")
            for l in range(LAYERS):
                want = budgets[l] / TOKENS / MEDA_RUNS
                if abs(cells.get(str(l), -1) - want) > 1e-9:
                    mu.fail("heatmap cell of layer %d: %s, expected the mean budget %s" % (l, cells.get(str(l)), want))
            print("ok: the heatmap shows the mean budget of each layer: %s" % cells)

            # 6. The alert rules: loaded, evaluated without error; then the instance goes down.
            def rules_evaluated():
                groups = prom.get("/api/v1/rules")["data"]["groups"]
                rules = [r for g in groups for r in g["rules"]]
                if not rules or any(r.get("lastEvaluation", "").startswith("0001-") for r in rules):
                    return None
                return rules

            rules = mu.wait_for(rules_evaluated, 30, "the alert rules to be evaluated")
            names = sorted(r["name"] for r in rules)
            want_names = ["MedakvAbsent", "MedakvHighErrorRatio", "MedakvHighLatencyP99", "MedakvInstanceDown",
                          "MedakvRequestMemoryNearBound", "MedakvResidentMemoryHigh", "MedakvStoreNearlyFull"]
            if names != want_names:
                mu.fail("alert rules loaded: %s, expected %s" % (names, want_names))
            unhealthy = [(r["name"], r.get("health"), r.get("lastError")) for r in rules if r.get("health") != "ok"]
            if unhealthy:
                mu.fail("alert rules that fail to evaluate: %s" % unhealthy)
            # MedakvAbsent may be pending from an evaluation before the first scrape: it clears.
            mu.wait_for(lambda: not prom.get("/api/v1/alerts")["data"]["alerts"], 15,
                        "no alert to be active against a healthy server (active: %s)"
                        % prom.get("/api/v1/alerts")["data"]["alerts"])
            print("ok: %d alert rules evaluate, none active" % len(rules))

            mu.stop_server(procs, server, server_log)  # exit code 0: a clean shutdown (no leak under ASan)
            mu.wait_for(lambda: prom.value('up{job="medakv"}') == 0, 30, "up to read 0 once the server stopped")

            def down_alert():
                return [a for a in prom.get("/api/v1/alerts")["data"]["alerts"]
                        if a["labels"].get("alertname") == "MedakvInstanceDown"]

            alert = mu.wait_for(down_alert, 30, "MedakvInstanceDown to become pending")[0]
            if alert["state"] != "pending" or alert["labels"].get("instance") != "127.0.0.1:%d" % metrics_port:
                mu.fail("MedakvInstanceDown: %s" % alert)
            print("ok: MedakvInstanceDown is pending for %s" % alert["labels"]["instance"])
            procs.stop(prom_proc)
        finally:
            procs.close()
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
