"""Helpers of the metrics tests (standard library only): processes that die
with the test, medakv-server on free loopback ports, the medakv CLI, the
Prometheus text format's metric names, and the PromQL of the Grafana
dashboard."""

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent():
    # A child gets SIGKILL when the test process dies, however it dies
    # (ctest's timeout kills the test, not its children).
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Processes:
    """Starts processes and stops every one of them on close()."""

    def __init__(self):
        self.procs = []

    def start(self, args, log_path):
        log = open(log_path, "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc, timeout=30.0):
        """SIGTERM, then SIGKILL after `timeout` seconds; returns the exit code."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def fail(message):
    print("FAIL: " + message, flush=True)
    sys.exit(1)


def wait_for(condition, timeout, what):
    """Polls `condition` until it returns a true value (returned) or `timeout` seconds pass (fail)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.1)
    last = condition()
    if not last:
        fail("timed out after %.0f s waiting for %s" % (timeout, what))
    return last


def free_port():
    """A loopback port that was free a moment ago (for programs that cannot bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode("utf-8")


def start_server(procs, server_bin, workdir, extra=()):
    """medakv-server on 127.0.0.1 port 0 with /metrics on port 0; returns (proc, grpc port, metrics port, log)."""
    log = os.path.join(workdir, "medakv-server.log")
    proc = procs.start([server_bin, "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0", "--backend=cpu",
                        "--shutdown_grace=1s", *extra], log)

    def ports():
        with open(log) as f:
            text = f.read()
        grpc = re.search(r"listening on port (\d+)", text)
        metrics = re.search(r"metrics on port (\d+)", text)
        if proc.poll() is not None:
            fail("medakv-server exited with %d:\n%s" % (proc.returncode, text))
        return (int(grpc.group(1)), int(metrics.group(1))) if grpc and metrics else None

    grpc_port, metrics_port = wait_for(ports, 30, "medakv-server to log its ports")
    return proc, grpc_port, metrics_port, log


def stop_server(procs, proc, log):
    """Stops the server with SIGTERM; fails unless it exits with 0 (under ASan: no leak, no report)."""
    rc = procs.stop(proc)
    if rc != 0:
        with open(log) as f:
            fail("medakv-server exited with %d after SIGTERM:\n%s" % (rc, f.read()))


def run(args, what):
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_die_with_parent)
    if r.returncode != 0:
        fail("%s (exit %d): %s\n%s" % (what, r.returncode, " ".join(args), r.stdout))
    return r.stdout


def synth(medakv, path, layers, tokens):
    run([medakv, "synth", "-o", path, "--layers", str(layers), "--tokens", str(tokens), "--kv-heads", "2",
         "--q-heads", "4", "--head-dim", "16", "--q-tokens", "8"], "medakv synth")


def compress(medakv, path, out, addr, policy, rho):
    """`medakv compress --server ADDR --json`: the summary as a dict."""
    text = run([medakv, "compress", path, "-o", out, "--server", addr, "--policy", policy, "--rho", str(rho),
                "--timeout", "60", "--json"], "medakv compress --server")
    try:
        return json.loads(text)
    except ValueError:
        fail("medakv compress --json printed no JSON:\n" + text)


# ---- the Prometheus text format ------------------------------------------------------------------

def exported_names(text):
    """The sample names that a /metrics text can contain: each family of a
    `# TYPE` line, with _bucket, _sum and _count for histograms and _sum and
    _count for summaries. Returns {family: type} and the set of sample names."""
    families = {}
    samples = set()
    for line in text.splitlines():
        m = re.match(r"# TYPE ([A-Za-z_:][A-Za-z0-9_:]*) (\w+)$", line)
        if not m:
            continue
        name, kind = m.group(1), m.group(2)
        families[name] = kind
        samples.add(name)
        if kind == "histogram":
            samples.update({name + "_bucket", name + "_sum", name + "_count"})
        elif kind == "summary":
            samples.update({name + "_sum", name + "_count"})
    return families, samples


# ---- PromQL in the dashboard ------------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan", "atan2"}


def metric_names(expr):
    """The metric names an expression selects (strings, label matchers,
    ranges and grouping labels removed; identifiers followed by "(" are
    functions or aggregations)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = []
    for m in re.finditer(r"(?<![A-Za-z0-9_.:$])[A-Za-z_:][A-Za-z0-9_:]*", e):
        token = m.group(0)
        if e[m.end():].lstrip().startswith("("):
            continue
        if token.lower() in _KEYWORDS:
            continue
        names.append(token)
    return names


def dashboard_panels(dashboard):
    """Every panel, rows' nested panels included."""
    out = []
    for p in dashboard.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_queries(dashboard):
    """(where, PromQL) of every panel target and of every query variable
    (label_values(SELECTOR, label) contributes SELECTOR)."""
    out = []
    for p in dashboard_panels(dashboard):
        for t in p.get("targets", []):
            out.append(("panel '%s' target %s" % (p.get("title"), t.get("refId")), t.get("expr", "")))
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.match(r"label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\)$", q.strip())
        out.append(("variable '%s'" % v.get("name"), m.group(1) if m else q))
    return out


def substitute_variables(expr, policy=".*"):
    """The dashboard's variables as Grafana would fill them for a query: all
    jobs and instances, and `policy` for $policy (by default All)."""
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "5m").replace("$__interval", "15s")
            .replace("$job", ".*").replace("$instance", ".*").replace("$policy", policy))


# The process metrics the server exports besides its medakv_ ones (the
# conventional names of Prometheus's client libraries).
PROCESS_METRICS = ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
                   "process_start_time_seconds", "process_open_fds", "process_max_fds")


def is_server_metric(name):
    """A name of the server's own metrics: medakv_ or process_."""
    return name.startswith("medakv_") or name.startswith("process_")


def check_dashboard(dashboard, samples):
    """Problems with the dashboard's structure and its PromQL against the
    sample names a live server exports; empty when it is fine."""
    errors = []
    for key in ("title", "uid", "panels", "templating", "schemaVersion"):
        if key not in dashboard:
            errors.append("no '%s'" % key)
    variables = {v.get("name") for v in dashboard.get("templating", {}).get("list", [])}
    for needed in ("datasource", "job", "instance"):
        if needed not in variables:
            errors.append("no '%s' variable" % needed)
    ids = set()
    for p in dashboard_panels(dashboard):
        if p.get("id") in ids:
            errors.append("panel id %s used twice" % p.get("id"))
        ids.add(p.get("id"))
        if "gridPos" not in p:
            errors.append("panel '%s' has no gridPos" % p.get("title"))
        if p.get("type") == "row":
            continue
        if not p.get("title"):
            errors.append("panel %s has no title" % p.get("id"))
        if not p.get("targets"):
            errors.append("panel '%s' has no targets" % p.get("title"))
        for t in p.get("targets", []):
            if not t.get("expr", "").strip():
                errors.append("panel '%s' target %s has no expr" % (p.get("title"), t.get("refId")))
            ds = t.get("datasource", p.get("datasource", {}))
            if ds.get("uid") != "${datasource}":
                errors.append("panel '%s' does not use the datasource variable" % p.get("title"))
    for where, expr in dashboard_queries(dashboard):
        for var in re.findall(r"\$(\w+)", expr):
            if not var.startswith("__") and var not in variables:
                errors.append("%s uses undefined variable $%s" % (where, var))
        names = metric_names(expr)
        if not names:
            errors.append("%s selects no metric: %s" % (where, expr))
        for name in names:
            if name == "up":
                continue
            if not is_server_metric(name):
                errors.append("%s: '%s' is not a medakv or process metric" % (where, name))
            elif name not in samples:
                errors.append("%s: '%s' is not exported by medakv-server" % (where, name))
    return errors
