#!/usr/bin/env python3
"""Validate the Kubernetes manifests offline against the Kubernetes JSON schemas.

Every kustomization under k8s/ is rendered the way kustomize renders these (resources, then the
overlay's namespace, image tags, secretGenerator and strategic-merge patches, of the simple kind
used here: maps merged, lists of named items merged by `name`), and every resulting object is
validated strictly (unknown fields are errors) with kubernetes-validate. Custom resources
(ServiceMonitor) have no schema there; they get a structural check of the fields we rely on.

    pip install kubernetes-validate && python3 k8s/validate.py

Exit status 1 on any problem, with one line per problem.
"""

import copy
import pathlib
import sys

import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).parent
VERSION = "1.33.0"  # the oldest Kubernetes we support; newer ones accept these too
problems = []


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def merge(base, patch):
    """Strategic merge as far as these manifests need it."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(
        isinstance(x, dict) and "name" in x for x in base + patch
    ):
        out = [copy.deepcopy(x) for x in base]
        for p in patch:
            for i, b in enumerate(out):
                if b["name"] == p["name"]:
                    out[i] = merge(b, p)
                    break
            else:
                out.append(copy.deepcopy(p))
        return out
    return copy.deepcopy(patch)


def render(kdir):
    k = load_all(kdir / "kustomization.yaml")[0]
    objs = []
    for r in k.get("resources", []):
        p = kdir / r
        if p.is_dir():
            objs += render(p)
        elif p.exists():
            objs += load_all(p)
        else:
            problems.append(f"{kdir}: resource {r} does not exist")
    for g in k.get("secretGenerator", []):
        data = {}
        for f in g.get("files", []):
            key, _, path = f.partition("=")
            if not (kdir / path).parent.is_dir():
                problems.append(f"{kdir}: secretGenerator directory of {path} does not exist")
            data[key] = "cGxhY2Vob2xkZXI="  # the real files are not in the repository
        objs.append({"apiVersion": "v1", "kind": "Secret",
                     "metadata": {"name": g["name"]}, "type": "Opaque", "data": data})
    for p in k.get("patches", []):
        for patch in load_all(kdir / p["path"]):
            target = [o for o in objs if o["kind"] == patch["kind"]
                      and o["metadata"]["name"] == patch["metadata"]["name"]]
            if not target:
                problems.append(f"{kdir}: patch {p['path']} matches no resource")
            for o in target:
                objs[objs.index(o)] = merge(o, patch)
    tags = {i["name"]: i["newTag"] for i in k.get("images", [])}
    for o in objs:
        for c in o.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            name, _, _ = c["image"].partition(":")
            if name in tags:
                c["image"] = f"{name}:{tags[name]}"
        if "namespace" in k and o["kind"] != "Namespace":
            o["metadata"]["namespace"] = k["namespace"]
    return objs


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


for kfile in sorted(ROOT.rglob("kustomization.yaml")):
    kdir = kfile.parent
    objs = render(kdir)
    check(objs, kdir.relative_to(ROOT.parent))
    print(f"{kdir.relative_to(ROOT.parent)}: {len(objs)} objects checked")

for p in problems:
    print("PROBLEM", p)
sys.exit(1 if problems else 0)
