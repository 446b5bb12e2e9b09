#!/usr/bin/env python3
"""Checks deploy/ against the Kubernetes schemas and against the code.

Renders deploy/k8s/overlays/{gpu,cpu} with `kubectl kustomize`, then:

* validates every object offline: built-in kinds against the Kubernetes
  JSON schemas that kubernetes-validate ships (strict: unknown fields are
  errors) for each version in K8S_VERSIONS; the PodMonitor against the
  openAPIV3Schema of the Prometheus operator's CRD in crds/ (made strict the
  same way). A kind with neither fails the check: nothing is skipped.
* checks consistency with `medakv-server --helpfull`: every flag in args
  exists (a flag of service/), has a value of its type and is given once;
  container, probe, Service, NetworkPolicy and PodMonitor ports are the
  server's --listen and --metrics_listen ports; the termination grace
  exceeds preStop + --shutdown_grace; /dev/shm holds --max_shm_bytes; the
  memory limit holds the cache, the in-flight requests and /dev/shm.
* checks the security settings (non-root, read-only root, no capabilities,
  no privilege escalation, RuntimeDefault seccomp), pinned image tags (the
  project's version, never `latest`), the GPU and CPU overlays' backends,
  and the selectors of every Service, PDB, HPA, NetworkPolicy, PodMonitor.
* checks deploy/docker/Dockerfile and .dockerignore statically (pinned CUDA
  bases, install-deps.sh and build.sh, non-root numeric USER equal to the
  pods', HEALTHCHECK through `medakv health` on the --listen port, EXPOSE,
  only the two binaries in the final stage) and the scrape configs in
  deploy/prometheus/ when they name a medakv job.

--mutations applies one deliberate mistake at a time (a port drifts, a flag
is misspelt, an image is `latest`, a pod runs as root, ...) and fails unless
every one is caught: the check can fail.
"""

import argparse
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

# The Kubernetes versions whose schemas every built-in object must satisfy:
# the oldest supported (native gRPC probes are GA from 1.27) and a current one.
K8S_VERSIONS = ("1.28.0", "1.32.0")
OVERLAYS = ("gpu", "cpu")
CONTAINER = "medakv-server"
# CRDs validated against their own schema: (apiVersion, kind) -> CRD file in crds/.
CRD_FILES = {("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml"}
GPU_RESOURCE = "nvidia.com/gpu"


class Context:
    """Everything the checks read; --mutations changes copies of it."""

    def __init__(self, repo, flags, rendered, dockerfile, dockerignore, test_sh, cmake_version, prometheus):
        self.repo = repo
        self.flags = flags  # name -> {"default": str, "file": str}
        self.rendered = rendered  # overlay -> list of objects
        self.dockerfile = dockerfile  # text
        self.dockerignore = dockerignore  # text
        self.test_sh = test_sh  # text of scripts/test.sh
        self.cmake_version = cmake_version  # project(medakv VERSION x.y.z)
        self.prometheus = prometheus  # path -> list of YAML documents


# ---- parsing helpers -----------------------------------------------------------


def parse_helpfull(text):
    """Flags of `--helpfull` output: name -> {"default", "file"}."""
    flags = {}
    entries = []  # [file, text]
    section = None
    for line in text.splitlines():
        m = re.match(r"^\s*Flags from (.+):$", line)
        if m:
            section = m.group(1)
            continue
        if section is None:
            continue
        if line.startswith("    --"):
            entries.append([section, line.strip()])
        elif line.startswith("      ") and entries:
            entries[-1][1] += " " + line.strip()
        elif line.strip():
            section = None
    for file, entry in entries:
        m = re.match(r"^--([A-Za-z0-9_]+) \((.*)\); default: (.*);$", entry, re.S)
        if not m:
            raise ValueError(f"cannot parse --helpfull entry: {entry!r}")
        default = m.group(3)
        if len(default) >= 2 and default[0] == '"' and default[-1] == '"':
            default = default[1:-1]
        flags[m.group(1)] = {"default": default, "file": file}
    return flags


def is_server_flag(info):
    return re.search(r"(^|/)service/", info["file"]) is not None


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|ms|s|m|h)")
_DURATION_UNIT = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(s):
    """absl/Go duration ("25s", "1m30s", "500ms") in seconds."""
    if s in ("0", "-0"):
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            raise ValueError(f"not a duration: {s!r}")
        total += float(m.group(1)) * _DURATION_UNIT[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise ValueError(f"not a duration: {s!r}")
    return total


_QUANTITY_SUFFIX = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
}


def parse_quantity(q):
    """A Kubernetes resource quantity ("48Gi", "500m", 1) as a number."""
    m = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?", str(q))
    if not m:
        raise ValueError(f"not a quantity: {q!r}")
    return float(m.group(1)) * _QUANTITY_SUFFIX[m.group(2) or ""]


def port_of(address):
    """The port of "host:port" or "[v6]:port"."""
    m = re.fullmatch(r".*:(\d+)", address)
    if not m:
        raise ValueError(f"not host:port: {address!r}")
    return int(m.group(1))


def flag_kind(default):
    if default in ("true", "false"):
        return "bool"
    if re.fullmatch(r"-?\d+", default):
        return "int"
    try:
        parse_duration(default)
        return "duration"
    except ValueError:
        return "string"


def parse_args(args, flags, where, errors):
    """The container's args as name -> value (strings); errors for anything
    that is not --name=value with a server flag and a value of its type."""
    given = {}
    for arg in args or []:
        m = re.fullmatch(r"--([A-Za-z0-9_]+)(?:=(.*))?", str(arg), re.S)
        if not m:
            errors.append(f"{where}: arg {arg!r} is not --flag=value")
            continue
        name, value = m.group(1), m.group(2)
        info = flags.get(name)
        if info is None and value is None and name.startswith("no") and name[2:] in flags:
            name, value, info = name[2:], "false", flags[name[2:]]
        if info is None:
            errors.append(f"{where}: arg {arg!r}: medakv-server has no flag --{name} (see medakv-server --helpfull)")
            continue
        if not is_server_flag(info):
            errors.append(f"{where}: arg {arg!r}: --{name} is not a medakv-server flag (it is from {info['file']})")
            continue
        kind = flag_kind(info["default"])
        if value is None:
            if kind != "bool":
                errors.append(f"{where}: arg {arg!r}: --{name} needs a value (--{name}=VALUE)")
                continue
            value = "true"
        try:
            if kind == "int":
                int(value)
            elif kind == "duration":
                parse_duration(value)
            elif kind == "bool" and value not in ("true", "false", "1", "0"):
                raise ValueError(value)
        except ValueError:
            errors.append(f"{where}: arg {arg!r}: --{name} takes a {kind} value (default {info['default']!r})")
            continue
        if name in given:
            errors.append(f"{where}: --{name} is given twice in args")
        given[name] = value
    return given


# ---- schemas -------------------------------------------------------------------


def strict_schema(node):
    """A CRD's openAPIV3Schema as a JSON schema that rejects unknown fields,
    as kubernetes-validate's strict schemas do for built-in kinds."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        out["additionalProperties"] = False
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(here, filename, api_version):
    with open(os.path.join(here, "crds", filename)) as f:
        crd = next(d for d in yaml.safe_load_all(f) if d)
    version = api_version.split("/")[1]
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = strict_schema(v["schema"]["openAPIV3Schema"])
            return jsonschema.Draft202012Validator(schema)
    raise KeyError(f"{filename} has no version {version}")


def _path(error):
    return "/".join(str(p) for p in getattr(error, "path", []) or [])


_schema_cache = {}


def validate_schema(obj, where, errors):
    key = json.dumps(obj, sort_keys=True)
    if key in _schema_cache:
        errors.extend(e.replace("{where}", where) for e in _schema_cache[key])
        return
    found = []
    crd = CRD_FILES.get((obj.get("apiVersion"), obj.get("kind")))
    if crd:
        here = os.path.dirname(os.path.abspath(__file__))
        for e in crd_validator(here, crd, obj["apiVersion"]).iter_errors(obj):
            found.append(f"{{where}}: CRD schema ({crd}): {e.message} at /{_path(e)}")
        # The CRD says only "metadata: object": check it as ObjectMeta.
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}
        objs = [(meta, "metadata as ObjectMeta")]
    else:
        objs = [(obj, "schema")]
    for o, what in objs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                found.append(f"{{where}}: Kubernetes {version} {what}: {e.message} at /{_path(e)}")
            except kubernetes_validate.SchemaNotFoundError:
                found.append(
                    f"{{where}}: no schema for {obj.get('apiVersion')} {obj.get('kind')} in Kubernetes {version} "
                    "(a CRD needs its schema in tests/deploy/crds and CRD_FILES)"
                )
    _schema_cache[key] = found
    errors.extend(e.replace("{where}", where) for e in found)


# ---- the manifests -------------------------------------------------------------


def selects(selector, labels):
    """Whether a label selector (matchLabels / matchExpressions, or a Service's plain map) matches labels."""
    if not selector:
        return False
    if "matchLabels" in selector or "matchExpressions" in selector:
        match_labels = selector.get("matchLabels") or {}
        expressions = selector.get("matchExpressions") or []
    else:
        match_labels, expressions = selector, []
    for k, v in match_labels.items():
        if labels.get(k) != v:
            return False
    for e in expressions:
        op, key, values = e["operator"], e["key"], e.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return bool(match_labels or expressions)


def check_security(where, pod_spec, errors):
    psc = pod_spec.get("securityContext") or {}
    if psc.get("runAsNonRoot") is not True:
        errors.append(f"{where}: pod securityContext.runAsNonRoot must be true")
    if psc.get("runAsUser") == 0 or psc.get("runAsGroup") == 0:
        errors.append(f"{where}: pod securityContext runs as root (runAsUser/runAsGroup 0)")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_spec.get("hostNetwork") or pod_spec.get("hostPID") or pod_spec.get("hostIPC"):
        errors.append(f"{where}: the pod must not share the host's network, PID or IPC namespace")
    for c in (pod_spec.get("initContainers") or []) + (pod_spec.get("containers") or []):
        cw = f"{where}: container {c.get('name')}"
        sc = c.get("securityContext") or {}
        if sc.get("runAsNonRoot") is False:
            errors.append(f"{cw}: securityContext.runAsNonRoot is false")
        if sc.get("runAsUser") == 0 or sc.get("runAsGroup") == 0:
            errors.append(f"{cw}: runs as root (runAsUser/runAsGroup 0)")
        if "runAsNonRoot" not in sc and psc.get("runAsNonRoot") is not True:
            errors.append(f"{cw}: runAsNonRoot is not set")
        if sc.get("privileged"):
            errors.append(f"{cw}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{cw}: securityContext.allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True:
            errors.append(f"{cw}: securityContext.readOnlyRootFilesystem must be true")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            errors.append(f"{cw}: securityContext.capabilities.drop must contain ALL")
        if caps.get("add"):
            errors.append(f"{cw}: adds capabilities {caps['add']}")
        if (sc.get("seccompProfile") or {}).get("type", pod_seccomp) != "RuntimeDefault":
            errors.append(f"{cw}: seccompProfile must be RuntimeDefault (pod or container)")


def check_image(where, image, version, errors):
    m = re.fullmatch(r"(?P<name>[^@]+?)(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]*))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?", image)
    if not m:
        errors.append(f"{where}: image {image!r} is not name:tag")
        return
    tag, digest = m.group("tag"), m.group("digest")
    if tag is None and digest is None:
        errors.append(f"{where}: image {image!r} has no tag (it would pull latest)")
    elif tag == "latest":
        errors.append(f"{where}: image {image!r} uses the latest tag")
    elif tag is not None and tag != version:
        errors.append(f"{where}: image {image!r}: tag must be the project's version {version} (CMakeLists.txt)")


def check_overlay(overlay, objs, ctx, errors):
    w0 = f"overlay {overlay}"
    flags = ctx.flags
    for o in objs:
        validate_schema(o, f"{w0}: {o.get('kind')}/{o.get('metadata', {}).get('name')}", errors)
    text = yaml.safe_dump_all(objs)
    if re.search(r":latest\b", text):
        errors.append(f"{w0}: something uses a :latest tag")

    def of_kind(kind):
        return [o for o in objs if o.get("kind") == kind]

    deps = of_kind("Deployment")
    if len(deps) != 1:
        errors.append(f"{w0}: expected one Deployment, found {len(deps)}")
        return
    dep = deps[0]
    name = dep["metadata"]["name"]
    wd = f"{w0}: Deployment/{name}"
    template = dep["spec"]["template"]
    labels = template.get("metadata", {}).get("labels", {})
    spec = template["spec"]
    if not selects(dep["spec"].get("selector"), labels):
        errors.append(f"{wd}: spec.selector does not select its pod template")
    if "replicas" in dep["spec"]:
        errors.append(f"{wd}: spec.replicas is set; the HorizontalPodAutoscaler owns it (kubectl apply would reset it)")
    check_security(wd, spec, errors)
    containers = [c for c in spec.get("containers", []) if c.get("name") == CONTAINER]
    if len(containers) != 1:
        errors.append(f"{wd}: no container named {CONTAINER}")
        return
    c = containers[0]
    wc = f"{wd}: container {CONTAINER}"
    for cc in spec.get("containers", []) + spec.get("initContainers", []):
        check_image(f"{wd}: container {cc.get('name')}", cc.get("image", ""), ctx.cmake_version, errors)
    if c.get("command"):
        errors.append(f"{wc}: command is set; the image's ENTRYPOINT is medakv-server, pass flags in args")

    # Flags: given ones exist and parse; the rest are the binary's defaults.
    given = parse_args(c.get("args"), flags, wc, errors)
    effective = {n: i["default"] for n, i in flags.items()}
    effective.update(given)
    for needed in ("listen", "metrics_listen", "shutdown_grace", "backend", "host_cache_bytes", "max_request_bytes",
                   "max_inflight", "max_shm_bytes"):
        if needed not in flags:
            errors.append(f"medakv-server --helpfull lists no --{needed}: the checks below need it")
            return
    grpc_port = port_of(effective["listen"])
    metrics_port = port_of(effective["metrics_listen"])

    annotations = template.get("metadata", {}).get("annotations", {}) or {}
    if "prometheus.io/port" in annotations and annotations["prometheus.io/port"] != str(metrics_port):
        errors.append(f"{wd}: pod annotation prometheus.io/port {annotations['prometheus.io/port']!r} must be "
                      f"{metrics_port} (--metrics_listen)")
    if annotations.get("prometheus.io/path", "/metrics") != "/metrics":
        errors.append(f"{wd}: pod annotation prometheus.io/path must be /metrics")

    ports = {p.get("name"): p for p in c.get("ports", [])}
    by_number = {p.get("containerPort"): p for p in c.get("ports", [])}
    if ports.get("grpc", {}).get("containerPort") != grpc_port:
        errors.append(f"{wc}: containerPort named grpc must be {grpc_port} (--listen {effective['listen']}), "
                      f"is {ports.get('grpc', {}).get('containerPort')}")
    if ports.get("metrics", {}).get("containerPort") != metrics_port:
        errors.append(f"{wc}: containerPort named metrics must be {metrics_port} "
                      f"(--metrics_listen {effective['metrics_listen']}), is {ports.get('metrics', {}).get('containerPort')}")

    def resolve(port, where):
        """A Service/NetworkPolicy/PodMonitor port (name or number) -> container port number."""
        if isinstance(port, int):
            if port not in by_number:
                errors.append(f"{where}: port {port} is not a container port of {CONTAINER}")
            return port
        if port not in ports:
            errors.append(f"{where}: port {port!r} names no container port of {CONTAINER} (have {sorted(ports)})")
            return None
        return ports[port]["containerPort"]

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c.get(probe)
        if not p:
            errors.append(f"{wc}: no {probe}")
            continue
        if "grpc" not in p:
            errors.append(f"{wc}: {probe} must be a native gRPC probe (grpc.health.v1)")
            continue
        if p["grpc"].get("port") != grpc_port:
            errors.append(f"{wc}: {probe}.grpc.port must be {grpc_port} (--listen), is {p['grpc'].get('port')}")

    # Graceful termination: preStop, then the server's --shutdown_grace.
    pre_stop = 0.0
    hook = (c.get("lifecycle") or {}).get("preStop") or {}
    command = (hook.get("exec") or {}).get("command") or []
    if command and os.path.basename(str(command[0])) == "sleep" and len(command) == 2:
        pre_stop = float(command[1])
    elif "sleep" in hook:
        pre_stop = float(hook["sleep"].get("seconds", 0))
    grace = spec.get("terminationGracePeriodSeconds", 30)
    need = pre_stop + parse_duration(effective["shutdown_grace"])
    if grace <= need:
        errors.append(f"{wd}: terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop:g} s + "
                      f"--shutdown_grace {effective['shutdown_grace']} = {need:g} s")

    # Resources and memory.
    res = c.get("resources") or {}
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in (res.get(kind) or {}):
                errors.append(f"{wc}: resources.{kind}.{r} is not set")
    volumes = {v.get("name"): v for v in spec.get("volumes", [])}
    shm_bytes = 0
    shm = [m for m in c.get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"]
    if not shm:
        errors.append(f"{wc}: nothing is mounted at /dev/shm (the shared-memory data plane)")
    else:
        vol = volumes.get(shm[0].get("name"), {})
        ed = vol.get("emptyDir")
        if not ed or ed.get("medium") != "Memory" or "sizeLimit" not in ed:
            errors.append(f"{wc}: /dev/shm must be an emptyDir with medium Memory and a sizeLimit")
        else:
            shm_bytes = parse_quantity(ed["sizeLimit"])
            if int(effective["max_shm_bytes"]) > shm_bytes:
                errors.append(f"{wc}: --max_shm_bytes {effective['max_shm_bytes']} is more than /dev/shm holds "
                              f"({ed['sizeLimit']})")
    limit = (res.get("limits") or {}).get("memory")
    if limit is not None:
        need = (int(effective["host_cache_bytes"]) + int(effective["max_inflight"]) * int(effective["max_request_bytes"])
                + shm_bytes)
        if parse_quantity(limit) < need:
            errors.append(f"{wc}: memory limit {limit} is less than --host_cache_bytes + --max_inflight * "
                          f"--max_request_bytes + /dev/shm = {need / 2**30:.2f} GiB")

    # The overlay's backend.
    gpus = [(cc.get("resources") or {}).get(k, {}).get(GPU_RESOURCE) for cc in spec.get("containers", [])
            for k in ("requests", "limits")]
    tolerations = spec.get("tolerations") or []
    if overlay == "gpu":
        if effective["backend"] != "cuda":
            errors.append(f"{wc}: the gpu overlay must pass --backend=cuda (has {effective['backend']})")
        if str((res.get("limits") or {}).get(GPU_RESOURCE)) != "1":
            errors.append(f"{wc}: the gpu overlay must set resources.limits.{GPU_RESOURCE}: 1")
        if not spec.get("nodeSelector") and not spec.get("affinity"):
            errors.append(f"{wd}: the gpu overlay must select GPU nodes (nodeSelector or affinity)")
        if not any(t.get("key") == GPU_RESOURCE for t in tolerations):
            errors.append(f"{wd}: the gpu overlay must tolerate the {GPU_RESOURCE} taint")
    elif overlay == "cpu":
        if effective["backend"] != "cpu":
            errors.append(f"{wc}: the cpu overlay must pass --backend=cpu (has {effective['backend']})")
        if any(g is not None for g in gpus):
            errors.append(f"{wd}: the cpu overlay must not request {GPU_RESOURCE}")

    # Services: the ClusterIP one and the headless one, both on the gRPC port.
    services = of_kind("Service")
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    if not headless:
        errors.append(f"{w0}: no headless Service (clusterIP: None) for round_robin and sharding")
    if not [s for s in services if s["spec"].get("clusterIP") != "None"]:
        errors.append(f"{w0}: no ClusterIP Service for Compress")
    for s in services:
        ws = f"{w0}: Service/{s['metadata']['name']}"
        if not selects(s["spec"].get("selector"), labels):
            errors.append(f"{ws}: selector does not select the Deployment's pods")
        for p in s["spec"].get("ports", []):
            target = resolve(p.get("targetPort", p.get("port")), f"{ws} port {p.get('name')}")
            if p.get("name") == "grpc" and (target != grpc_port or p.get("port") != grpc_port):
                errors.append(f"{ws}: port grpc must be {grpc_port} -> {grpc_port} (--listen), is "
                              f"{p.get('port')} -> {target}")

    for kind in ("PodDisruptionBudget", "NetworkPolicy", "PodMonitor"):
        if not of_kind(kind):
            errors.append(f"{w0}: no {kind}")
    for pdb in of_kind("PodDisruptionBudget"):
        if not selects(pdb["spec"].get("selector"), labels):
            errors.append(f"{w0}: PodDisruptionBudget/{pdb['metadata']['name']}: selector does not select the pods")
    hpas = of_kind("HorizontalPodAutoscaler")
    if not hpas:
        errors.append(f"{w0}: no HorizontalPodAutoscaler")
    for h in hpas:
        ref = h["spec"]["scaleTargetRef"]
        if ref.get("kind") != "Deployment" or ref.get("name") != name:
            errors.append(f"{w0}: HorizontalPodAutoscaler/{h['metadata']['name']} does not scale Deployment/{name}")
        lo, hi = h["spec"].get("minReplicas", 1), h["spec"].get("maxReplicas")
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            errors.append(f"{w0}: HorizontalPodAutoscaler/{h['metadata']['name']}: minReplicas > maxReplicas")

    for np in of_kind("NetworkPolicy"):
        wn = f"{w0}: NetworkPolicy/{np['metadata']['name']}"
        if not selects(np["spec"].get("podSelector"), labels):
            errors.append(f"{wn}: podSelector does not select the pods")
            continue
        allowed = {}  # container port -> list of peers
        for rule in np["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                port = resolve(p.get("port"), f"{wn} ingress port")
                allowed.setdefault(port, []).extend(rule.get("from", []))
        grpc_from = allowed.get(grpc_port, [])
        if not grpc_from or not all((peer.get("podSelector") or {}).get("matchLabels") for peer in grpc_from):
            errors.append(f"{wn}: must allow gRPC (port {grpc_port}) from labelled pods only")
        metrics_from = allowed.get(metrics_port, [])
        if not metrics_from or not all(peer.get("namespaceSelector") for peer in metrics_from):
            errors.append(f"{wn}: must allow scrapes (port {metrics_port}) from the monitoring namespace")

    for pm in of_kind("PodMonitor"):
        wp = f"{w0}: PodMonitor/{pm['metadata']['name']}"
        if not selects(pm["spec"].get("selector"), labels):
            errors.append(f"{wp}: selector does not select the pods")
        eps = pm["spec"].get("podMetricsEndpoints", [])
        if not eps:
            errors.append(f"{wp}: no podMetricsEndpoints")
        for ep in eps:
            port = resolve(ep.get("port", ep.get("portNumber")), f"{wp} endpoint")
            if port != metrics_port:
                errors.append(f"{wp}: scrapes port {port}, the server serves metrics on {metrics_port} (--metrics_listen)")
            if ep.get("path", "/metrics") != "/metrics":
                errors.append(f"{wp}: path {ep.get('path')!r}; the server serves /metrics")
    return {"grpc_port": grpc_port, "metrics_port": metrics_port, "run_as_user": (spec.get("securityContext") or {})
            .get("runAsUser")}


# ---- the image -----------------------------------------------------------------


def dockerfile_instructions(text):
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    out = []
    current = ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        parts = current.strip().split(None, 1)
        out.append((parts[0].upper(), parts[1] if len(parts) > 1 else ""))
        current = ""
    return out


def dockerignore_excludes(patterns, path):
    """Whether .dockerignore's patterns exclude path (or one of its parents)."""
    def to_regex(p):
        r = ""
        i = 0
        while i < len(p):
            if p.startswith("**/", i):
                r += "(?:.*/)?"
                i += 3
            elif p.startswith("**", i):
                r += ".*"
                i += 2
            elif p[i] == "*":
                r += "[^/]*"
                i += 1
            elif p[i] == "?":
                r += "[^/]"
                i += 1
            else:
                r += re.escape(p[i])
                i += 1
        return re.compile(r)

    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for p in patterns:
        negate = p.startswith("!")
        p = os.path.normpath(p[1:] if negate else p).lstrip("/")
        rx = to_regex(p)
        if any(rx.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def check_dockerfile(ctx, consistency, errors):
    w = "deploy/docker/Dockerfile"
    ins = dockerfile_instructions(ctx.dockerfile)
    stages = []  # [from-args, [instructions]]
    for k, a in ins:
        if k == "FROM":
            stages.append([a, []])
        elif stages:
            stages[-1][1].append((k, a))
    if len(stages) < 2:
        errors.append(f"{w}: must be multi-stage (a CUDA devel stage to build, a CUDA runtime stage to run)")
        return
    bases = []
    for a, _ in stages:
        image = a.split()[0]
        if "$" in image:
            errors.append(f"{w}: FROM {image}: pin the image literally, not through an ARG")
            continue
        m = re.fullmatch(r"([^:@]+):([A-Za-z0-9_.-]+)(@sha256:[0-9a-f]{64})?", image)
        if not m:
            errors.append(f"{w}: FROM {image}: no tag (it would pull latest)")
            continue
        if m.group(2) == "latest" or not re.match(r"\d+\.\d+\.\d+-", m.group(2)):
            errors.append(f"{w}: FROM {image}: pin a full version tag (e.g. 12.9.1-devel-ubuntu24.04), not {m.group(2)!r}")
        bases.append((m.group(1), m.group(2)))
    if len(bases) == len(stages):
        if bases[0][0] != "nvidia/cuda" or "-devel-" not in bases[0][1]:
            errors.append(f"{w}: the build stage must start from a CUDA devel image (nvidia/cuda:*-devel-*)")
        if bases[-1][0] != "nvidia/cuda" or not re.search(r"-(runtime|base)-", bases[-1][1]):
            errors.append(f"{w}: the final stage must start from a CUDA runtime image (nvidia/cuda:*-runtime-* or *-base-*)")
        versions = {re.match(r"[\d.]+", t).group(0) for _, t in bases if re.match(r"[\d.]+", t)}
        if len(versions) > 1:
            errors.append(f"{w}: the stages use different CUDA versions {sorted(versions)}")
    build_runs = " ".join(a for s in stages[:-1] for k, a in s[1] if k == "RUN")
    for script in ("scripts/install-deps.sh", "scripts/build.sh"):
        if script not in build_runs:
            errors.append(f"{w}: the build stage must RUN {script} (the script CI runs)")
    if not re.search(r"scripts/build\.sh", ctx.test_sh):
        errors.append("scripts/test.sh must build through scripts/build.sh, the script the image builds with")
    final = stages[-1][1]
    users = [a.strip() for k, a in final if k == "USER"]
    if not users:
        errors.append(f"{w}: the final stage has no USER (it would run as root)")
    else:
        m = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
        if not m:
            errors.append(f"{w}: USER {users[-1]}: use a numeric uid[:gid] (Kubernetes' runAsNonRoot checks numbers)")
        elif int(m.group(1)) == 0 or (m.group(2) and int(m.group(2)) == 0):
            errors.append(f"{w}: USER {users[-1]} is root")
        else:
            for overlay, info in consistency.items():
                if info.get("run_as_user") not in (None, int(m.group(1))):
                    errors.append(f"{w}: USER {m.group(1)} differs from overlay {overlay}'s runAsUser "
                                  f"{info['run_as_user']} (shared memory needs one user)")
    health = [a for k, a in final if k == "HEALTHCHECK"]
    grpc_ports = {i["grpc_port"] for i in consistency.values()} or {port_of(ctx.flags["listen"]["default"])}
    metrics_ports = {i["metrics_port"] for i in consistency.values()}
    if not health:
        errors.append(f"{w}: the final stage has no HEALTHCHECK")
    else:
        h = health[-1]
        m = re.search(r"--server\W+([^\s\"',\]]+)", h)
        if "medakv" not in h or "health" not in h or not m:
            errors.append(f"{w}: HEALTHCHECK must run `medakv health --server ADDR` (gRPC health)")
        elif port_of(m.group(1)) not in grpc_ports:
            errors.append(f"{w}: HEALTHCHECK asks port {port_of(m.group(1))}, the server listens on {sorted(grpc_ports)}")
    exposed = set()
    for k, a in final:
        if k == "EXPOSE":
            exposed.update(int(re.match(r"\d+", p).group(0)) for p in a.split())
    for p in sorted(grpc_ports | metrics_ports):
        if p not in exposed:
            errors.append(f"{w}: EXPOSE lacks port {p}")
    entry = " ".join(a for k, a in final if k == "ENTRYPOINT")
    if "medakv-server" not in entry:
        errors.append(f"{w}: ENTRYPOINT must be medakv-server")
    for k, a in final:
        if k == "COPY" and "--from" in a:
            sources = [t for t in a.split() if not t.startswith("--")][:-1]
            extra = [s for s in sources if os.path.basename(s.rstrip("/")) not in
                     ("medakv-server", "medakv", "runtime-packages.txt")]
            if extra:
                errors.append(f"{w}: the final stage copies {extra}: only medakv-server, medakv and their libraries")
    patterns = [l.strip() for l in ctx.dockerignore.splitlines() if l.strip() and not l.strip().startswith("#")]
    for needed in ("CMakeLists.txt", "scripts/install-deps.sh", "scripts/build.sh", "deploy/docker/runtime-packages.sh",
                   "proto", "kernels", "service", "client", "cmake"):
        if dockerignore_excludes(patterns, needed):
            errors.append(f".dockerignore excludes {needed}, which the image's build needs")
    for unwanted in (".git", "build", "build-asan"):
        if not dockerignore_excludes(patterns, unwanted):
            errors.append(f".dockerignore must exclude {unwanted}/ (build trees and history are not sources)")


# ---- deploy/prometheus ---------------------------------------------------------


def check_prometheus(ctx, consistency, errors):
    """Scrape jobs named *medakv* in deploy/prometheus/ scrape the metrics port."""
    ports = {i["metrics_port"] for i in consistency.values()}
    names = set()
    headless = set()  # (Service, namespace) of the headless Services: one A record per ready pod
    for overlay_objs in ctx.rendered.values():
        for o in overlay_objs:
            if o.get("kind") == "Service" and o.get("spec", {}).get("clusterIP") == "None":
                headless.add((o["metadata"]["name"], o["metadata"].get("namespace", "default")))
            if o.get("kind") == "Deployment":
                for c in o["spec"]["template"]["spec"].get("containers", []):
                    names.update(p["name"] for p in c.get("ports", []) if p.get("containerPort") in ports)
    found = 0
    for path, docs in sorted(ctx.prometheus.items()):
        for doc in docs:
            for job in (doc or {}).get("scrape_configs", []) if isinstance(doc, dict) else []:
                if "medakv" not in str(job.get("job_name", "")):
                    continue
                found += 1
                wj = f"{path}: job {job.get('job_name')}"
                if job.get("metrics_path", "/metrics") != "/metrics":
                    errors.append(f"{wj}: metrics_path {job.get('metrics_path')!r}; the server serves /metrics")
                for sc in job.get("static_configs", []) or []:
                    for t in sc.get("targets", []) or []:
                        if port_of(t) not in ports:
                            errors.append(f"{wj}: target {t}: the server serves metrics on {sorted(ports)}")
                for dc in job.get("dns_sd_configs", []) or []:
                    kind = dc.get("type", "SRV")
                    if kind in ("A", "AAAA") and dc.get("port") not in ports:
                        errors.append(f"{wj}: dns_sd_configs port {dc.get('port')}: the server serves metrics on "
                                      f"{sorted(ports)}")
                    if kind == "SRV":
                        errors.append(f"{wj}: dns_sd_configs type SRV: the Services publish no metrics port; use "
                                      "type A with the metrics port")
                    for n in dc.get("names", []) or []:
                        m = re.match(r"^([a-z0-9-]+)\.([a-z0-9-]+)\.svc(\.|$)", n)
                        if not m or (m.group(1), m.group(2)) not in headless:
                            errors.append(f"{wj}: dns_sd_configs name {n!r} is not <headless Service>.<namespace>.svc"
                                          f"... of deploy/k8s (have {sorted(headless)})")
                for rc in (job.get("relabel_configs", []) or []):
                    src = rc.get("source_labels") or []
                    regex = str(rc.get("regex", "(.*)"))
                    action = rc.get("action", "replace")
                    if rc.get("target_label") == "__address__" and action == "replace":
                        m = re.search(r":(\d+)$", str(rc.get("replacement", "")))
                        if m and int(m.group(1)) not in ports:
                            errors.append(f"{wj}: relabels __address__ to port {m.group(1)}, the server serves "
                                          f"metrics on {sorted(ports)}")
                    if action == "keep" and src == ["__meta_kubernetes_pod_container_port_name"]:
                        if not any(re.fullmatch(regex, n) for n in names):
                            errors.append(f"{wj}: keeps container ports named {regex!r}, the metrics port is {sorted(names)}")
                    if action == "keep" and src == ["__meta_kubernetes_pod_container_port_number"]:
                        if not any(re.fullmatch(regex, str(p)) for p in ports):
                            errors.append(f"{wj}: keeps container port {regex!r}, the metrics port is {sorted(ports)}")
    return found


# ---- driver --------------------------------------------------------------------


def run_checks(ctx):
    errors = []
    consistency = {}
    for overlay, objs in ctx.rendered.items():
        try:
            info = check_overlay(overlay, objs, ctx, errors)
        except (KeyError, TypeError, ValueError, AttributeError, StopIteration) as e:
            # A shape the schemas reject too: report it, do not crash.
            errors.append(f"overlay {overlay}: malformed object ({type(e).__name__}: {e})")
            info = None
        if info:
            consistency[overlay] = info
    check_dockerfile(ctx, consistency, errors)
    jobs = check_prometheus(ctx, consistency, errors)
    return errors, jobs


def load_context(repo, server, kubectl):
    out = subprocess.run([server, "--helpfull"], capture_output=True, text=True, timeout=120)
    flags = parse_helpfull(out.stdout + out.stderr)
    if not any(is_server_flag(i) for i in flags.values()):
        sys.exit(f"check_deploy: {server} --helpfull lists no flags of service/ (exit {out.returncode}):\n{out.stdout}{out.stderr}")
    rendered = {}
    for overlay in OVERLAYS:
        path = os.path.join(repo, "deploy", "k8s", "overlays", overlay)
        r = subprocess.run([kubectl, "kustomize", path], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            sys.exit(f"check_deploy: kubectl kustomize {path} failed:\n{r.stderr}")
        rendered[overlay] = [d for d in yaml.safe_load_all(r.stdout) if d]

    def read(rel):
        with open(os.path.join(repo, rel)) as f:
            return f.read()

    m = re.search(r"project\(\s*medakv\s+VERSION\s+([0-9.]+)", read("CMakeLists.txt"))
    prometheus = {}
    prom_dir = os.path.join(repo, "deploy", "prometheus")
    if os.path.isdir(prom_dir):
        for root, _, files in os.walk(prom_dir):
            for f in sorted(files):
                if f.endswith((".yml", ".yaml")):
                    p = os.path.join(root, f)
                    try:
                        with open(p) as fh:
                            prometheus[os.path.relpath(p, repo)] = list(yaml.safe_load_all(fh))
                    except yaml.YAMLError as e:
                        sys.exit(f"check_deploy: {p} is not YAML: {e}")
    return Context(repo, flags, rendered, read("deploy/docker/Dockerfile"), read(".dockerignore"),
                   read("scripts/test.sh"), m.group(1) if m else None, prometheus)


def deployment(ctx, overlay):
    return next(o for o in ctx.rendered[overlay] if o["kind"] == "Deployment")


def container(ctx, overlay):
    return next(c for c in deployment(ctx, overlay)["spec"]["template"]["spec"]["containers"] if c["name"] == CONTAINER)


def first(ctx, overlay, kind):
    return next(o for o in ctx.rendered[overlay] if o["kind"] == kind)


def port_named(ctx, overlay, name):
    return next(p for p in container(ctx, overlay)["ports"] if p["name"] == name)


def _replace_arg(ctx, overlay, prefix, new):
    args = container(ctx, overlay)["args"]
    i = next(i for i, a in enumerate(args) if a.startswith(prefix))
    args[i] = new


# Each mistake: (what, change the context, a piece of the error it must cause).
MUTATIONS = [
    ("gRPC containerPort drifts", lambda c: port_named(c, "gpu", "grpc").update(containerPort=50052),
     "containerPort named grpc must be 50051"),
    ("metrics containerPort drifts", lambda c: port_named(c, "cpu", "metrics").update(containerPort=9465),
     "containerPort named metrics must be 9464"),
    ("the server's default --listen port changes",
     lambda c: c.flags["listen"].update(default="0.0.0.0:6000"), "must be 6000"),
    ("the server's default --metrics_listen port changes",
     lambda c: c.flags["metrics_listen"].update(default="0.0.0.0:9100"), "must be 9100"),
    ("the prometheus.io/port annotation drifts", lambda c: deployment(c, "gpu")["spec"]["template"]["metadata"][
        "annotations"].update({"prometheus.io/port": "9100"}), "prometheus.io/port '9100' must be 9464"),
    ("readiness probe port drifts",
     lambda c: container(c, "gpu")["readinessProbe"]["grpc"].update(port=50052), "readinessProbe.grpc.port"),
    ("liveness probe is HTTP", lambda c: container(c, "cpu").update(
        livenessProbe={"httpGet": {"port": 9464, "path": "/metrics"}}), "livenessProbe must be a native gRPC probe"),
    ("a flag is misspelt", lambda c: _replace_arg(c, "gpu", "--host_cache_bytes=", "--host_cache_byte=17179869184"),
     "has no flag --host_cache_byte"),
    ("a flag gets a value of the wrong type", lambda c: _replace_arg(c, "cpu", "--max_inflight=", "--max_inflight=two"),
     "takes a int value"),
    ("a flag is given twice", lambda c: container(c, "gpu")["args"].append("--backend=cpu"), "given twice"),
    ("an absl built-in flag is passed", lambda c: container(c, "cpu")["args"].append("--flagfile=/etc/medakv.flags"),
     "is not a medakv-server flag"),
    ("the gpu overlay loses --backend=cuda", lambda c: _replace_arg(c, "gpu", "--backend=", "--backend=auto"),
     "--backend=cuda"),
    ("the gpu overlay loses its GPU", lambda c: container(c, "gpu")["resources"]["limits"].pop("nvidia.com/gpu"),
     "resources.limits.nvidia.com/gpu"),
    ("the cpu overlay requests a GPU", lambda c: container(c, "cpu")["resources"]["limits"].update(
        {"nvidia.com/gpu": 1}), "must not request nvidia.com/gpu"),
    ("an image uses latest", lambda c: container(c, "gpu").update(image="medakv:latest"), "latest"),
    ("an image has no tag", lambda c: container(c, "cpu").update(image="medakv"), "has no tag"),
    ("a pod runs as root", lambda c: deployment(c, "cpu")["spec"]["template"]["spec"]["securityContext"].update(
        runAsUser=0), "runs as root"),
    ("the root filesystem is writable", lambda c: container(c, "gpu")["securityContext"].update(
        readOnlyRootFilesystem=False), "readOnlyRootFilesystem must be true"),
    ("capabilities are kept", lambda c: container(c, "gpu")["securityContext"].pop("capabilities"),
     "capabilities.drop must contain ALL"),
    ("termination grace is too short", lambda c: deployment(c, "gpu")["spec"]["template"]["spec"].update(
        terminationGracePeriodSeconds=30), "terminationGracePeriodSeconds 30 must exceed"),
    ("/dev/shm is smaller than --max_shm_bytes", lambda c: next(
        v for v in deployment(c, "gpu")["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm")[
        "emptyDir"].update(sizeLimit="1Gi"), "more than /dev/shm holds"),
    ("the memory limit is too small", lambda c: container(c, "cpu")["resources"]["limits"].update(memory="2Gi"),
     "memory limit 2Gi is less than"),
    ("the PodMonitor scrapes a port that does not exist",
     lambda c: first(c, "gpu", "PodMonitor")["spec"]["podMetricsEndpoints"][0].update(port="metric"),
     "names no container port"),
    ("the PodMonitor scrapes the gRPC port",
     lambda c: first(c, "cpu", "PodMonitor")["spec"]["podMetricsEndpoints"][0].update(port="grpc"),
     "scrapes port 50051"),
    ("the PodMonitor has an unknown field (CRD schema)",
     lambda c: first(c, "gpu", "PodMonitor")["spec"].update(podMetricEndpoints=[]), "CRD schema"),
    ("the Service targets a port that does not exist",
     lambda c: first(c, "gpu", "Service")["spec"]["ports"][0].update(targetPort="grcp"), "names no container port"),
    ("the headless Service gets a cluster IP", lambda c: [
        s["spec"].update(clusterIP="10.0.0.10") for s in c.rendered["cpu"] if s["kind"] == "Service"],
     "no headless Service"),
    ("the NetworkPolicy opens gRPC to everyone", lambda c: first(c, "gpu", "NetworkPolicy")["spec"]["ingress"][0].update(
        {"from": [{"namespaceSelector": {}}]}), "from labelled pods only"),
    ("the Deployment has an unknown field (Kubernetes schema)",
     lambda c: container(c, "cpu").update(portz=[]), "Kubernetes 1.28.0 schema"),
    ("a field has the wrong type (Kubernetes schema)",
     lambda c: first(c, "gpu", "HorizontalPodAutoscaler")["spec"].update(minReplicas="two"), "schema"),
    ("an unknown kind", lambda c: c.rendered["cpu"].append(
        {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}), "no schema for example.com/v1"),
    ("the Dockerfile runs as root", lambda c: setattr(c, "dockerfile", c.dockerfile.replace(
        "USER 10001:10001", "USER root")), "numeric uid"),
    ("the Dockerfile's user differs from the pods'", lambda c: setattr(c, "dockerfile", c.dockerfile.replace(
        "USER 10001:10001", "USER 10002:10002")), "differs from overlay"),
    ("the Dockerfile uses an unpinned base", lambda c: setattr(c, "dockerfile", re.sub(
        r"nvidia/cuda:[^\s]*-base-[^\s]*", "nvidia/cuda:latest", c.dockerfile)), "pin a full version tag"),
    ("the Dockerfile loses its HEALTHCHECK", lambda c: setattr(c, "dockerfile", re.sub(
        r"HEALTHCHECK .*?\]\n", "", c.dockerfile, flags=re.S)), "no HEALTHCHECK"),
    ("the HEALTHCHECK asks the wrong port", lambda c: setattr(c, "dockerfile", c.dockerfile.replace(
        "127.0.0.1:50051", "127.0.0.1:50052")), "HEALTHCHECK asks port 50052"),
    ("the Dockerfile skips install-deps.sh", lambda c: setattr(c, "dockerfile", c.dockerfile.replace(
        "bash scripts/install-deps.sh", "apt-get install -y cmake")), "must RUN scripts/install-deps.sh"),
    ("scripts/test.sh stops using scripts/build.sh", lambda c: setattr(c, "test_sh", c.test_sh.replace(
        "scripts/build.sh", "cmake.sh")), "scripts/test.sh must build through scripts/build.sh"),
    (".dockerignore drops the sources", lambda c: setattr(c, "dockerignore", c.dockerignore + "\nservice\n"),
     ".dockerignore excludes service"),
    ("the Prometheus DNS discovery asks the wrong port", lambda c: c.prometheus.update(
        {"deploy/prometheus/mutation.yml": [{"scrape_configs": [{"job_name": "medakv", "dns_sd_configs": [
            {"names": ["medakv-headless.medakv.svc.cluster.local"], "type": "A", "port": 50051}]}]}]}),
     "dns_sd_configs port 50051"),
    ("the Prometheus DNS discovery names a Service that is not headless", lambda c: c.prometheus.update(
        {"deploy/prometheus/mutation.yml": [{"scrape_configs": [{"job_name": "medakv", "dns_sd_configs": [
            {"names": ["medakv.medakv.svc.cluster.local"], "type": "A", "port": 9464}]}]}]}),
     "is not <headless Service>"),
    ("a Prometheus scrape job drifts", lambda c: c.prometheus.update({"deploy/prometheus/mutation.yml": [{
        "scrape_configs": [{"job_name": "medakv", "static_configs": [{"targets": ["medakv:9100"]}]}]}]}),
     "target medakv:9100"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", required=True, help="the medakv-server binary")
    ap.add_argument("--repo", required=True, help="the repository root")
    ap.add_argument("--kubectl", default=shutil.which("kubectl"), help="kubectl (renders the overlays)")
    ap.add_argument("--mutations", action="store_true", help="check that every deliberate mistake is caught")
    a = ap.parse_args()
    if not a.kubectl:
        sys.exit("check_deploy: kubectl not found: it renders deploy/k8s (kubectl kustomize)")
    ctx = load_context(a.repo, a.server, a.kubectl)
    errors, jobs = run_checks(ctx)
    if errors:
        print(f"check_deploy: {len(errors)} problem(s):")
        for e in errors:
            print(f"  {e}")
        return 1
    if not a.mutations:
        counts = ", ".join(f"{o}: {len(v)} objects" for o, v in ctx.rendered.items())
        print(f"check_deploy: ok ({counts}; Kubernetes {', '.join(K8S_VERSIONS)}; "
              f"{sum(is_server_flag(i) for i in ctx.flags.values())} server flags; "
              f"{jobs} medakv scrape job(s) in deploy/prometheus)")
        return 0
    missed = 0
    for what, mutate, expected in MUTATIONS:
        c = copy.deepcopy(ctx)
        mutate(c)
        errs, _ = run_checks(c)
        hit = [e for e in errs if expected in e]
        if hit:
            print(f"caught: {what}: {hit[0]}")
        else:
            missed += 1
            print(f"MISSED: {what}: expected an error containing {expected!r}, got {errs}")
    print(f"check_deploy: mutations: {len(MUTATIONS) - missed} of {len(MUTATIONS)} caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
