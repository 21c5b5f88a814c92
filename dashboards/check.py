#!/usr/bin/env python3
"""Check the dashboard and the alert rules against a real Prometheus scraping a real gateway.

Starts, all on 127.0.0.1: a fake Verda upstream, the kleingate gateway (with that upstream, a
dead backend and the tiny local engine), and Prometheus (Debian's `prometheus` package) scraping
the gateway every second with `alerts.yml` loaded. Sends traffic that exercises every panel and
makes every alert condition true: a dead primary backend (fallbacks, circuit open, backend down),
requests for a model only the dead backend serves (5xx), fresh seeds (cache misses), the local
engine, shared state on a Redis that is not there (store down). Then every PromQL expression of `kleingate.json` and `alerts.yml` must return data, the
rules must load with health "ok", and `promtool check rules` must pass. Bounded: about a minute.

    cargo build -p kleingate-gateway -p kleingate-tests --bins && python3 dashboards/check.py
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent
BIN = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"
TINY = ROOT / "backends/local/tests/data/klein-tiny/pipeline"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # answering, even if not 200
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


def post(url, body, headers=None):
    """(status, response headers)"""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.headers


def query(prom, expr):
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        v = json.load(r)
    if v["status"] != "success":
        raise RuntimeError(v)
    return v["data"]["result"]


def main():
    problems = []
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="kleingate-dash-"))
    procs = []
    try:
        fake_port, gw_port, prom_port, dead_port = free_port(), free_port(), free_port(), free_port()
        # Shared state pointed at a Redis that is not there: the store-down alert's condition.
        dead_redis = free_port()
        procs.append(subprocess.Popen([BIN / "fake-verda", "--listen", f"127.0.0.1:{fake_port}",
                                       "--image-bytes", "2000"]))
        (tmp / "kleingate.toml").write_text(f"""
listen = "127.0.0.1:{gw_port}"
[routing]
order = ["dead", "verda", "local"]
safety = "skip"
[circuit]
failure_threshold = 2
cooldown_secs = 600
[backends.dead]
kind = "verda"
base_url = "http://127.0.0.1:{dead_port}"
api_key_env = "KLEINGATE_NO_SUCH_VAR"
models = ["flux2-klein-4b", "flux2-klein-9b"]
[backends.verda]
kind = "verda"
base_url = "http://127.0.0.1:{fake_port}"
api_key_env = "KLEINGATE_NO_SUCH_VAR"
models = ["flux2-klein-4b"]
[backends.verda.cost]
per_image_usd = 0.01
[backends.local]
kind = "local"
weights = "{TINY}"
device = "cpu"
max_sequence_length = 32
models = ["flux2-klein-base-4b"]
[backends.local.cost]
gpu_hour_usd = 3.0
[state]
backend = "redis"
redis_url = "redis://127.0.0.1:{dead_redis}/"
[admission]
requests_per_sec = 50
burst = 50
[storage]
path = "{tmp / 'kleingate.db'}"
[experiments.ab]
shadow = true
variants = [{{ name = "a" }}, {{ name = "b" }}]
""")
        procs.append(subprocess.Popen([BIN / "kleingate", "serve", "--config", tmp / "kleingate.toml"],
                                      stderr=subprocess.DEVNULL))
        gw = f"http://127.0.0.1:{gw_port}"
        wait_http(f"{gw}/healthz")
        (tmp / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{HERE / 'alerts.yml'}"]
scrape_configs:
  - job_name: kleingate
    static_configs: [{{targets: ["127.0.0.1:{gw_port}"]}}]
""")
        procs.append(subprocess.Popen(
            ["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        prom = f"http://127.0.0.1:{prom_port}"
        wait_http(f"{prom}/-/ready")

        # Traffic over ~20 s so that rates have several samples.
        seed = 0
        for rnd in range(10):
            for _ in range(5):
                seed += 1
                post(f"{gw}/flux2-klein-4b/generate", {"prompt": "x", "seed": seed})  # fallback, miss
            if rnd % 2 == 1:
                post(f"{gw}/flux2-klein-4b/generate", {"prompt": "x", "seed": 1})  # a hit, rarely
            for _ in range(2):
                seed += 1
                post(f"{gw}/flux2-klein-9b/generate", {"prompt": "x", "seed": seed})  # only "dead": 503
            status, h = post(f"{gw}/flux2-klein-4b/generate", {"prompt": "y", "seed": seed},
                             {"x-kleingate-experiment": "ab", "x-kleingate-client": f"c{rnd}"})
            if status == 200:
                post(f"{gw}/v1/feedback", {"request_id": h["x-kleingate-result-id"], "score": 4})
            # One client over its rate limit: 429s. 50/s with a burst of 50 refuses only what
            # arrives faster than that: 200 in a row do so even at 6 ms a request (60 did only
            # below 3.3 ms, so on a busy machine there were none and the check failed).
            for _ in range(200):
                post(f"{gw}/v1/feedback", {"request_id": "none", "score": 3}, {"x-kleingate-client": "flood"})
            if rnd % 3 == 0:
                post(f"{gw}/flux2-klein-base-4b/generate", {"prompt": "x", "seed": seed, "width": 64,
                     "height": 64, "num_steps": 2, "enable_safety_checker": False})
            time.sleep(2)

        dash = json.loads((HERE / "kleingate.json").read_text())
        exprs = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
        rules = subprocess.run(["promtool", "check", "rules", HERE / "alerts.yml"],
                               capture_output=True, text=True)
        if rules.returncode != 0:
            problems.append(f"promtool check rules: {rules.stdout}{rules.stderr}")
        with urllib.request.urlopen(f"{prom}/api/v1/rules", timeout=10) as r:
            groups = json.load(r)["data"]["groups"]
        loaded = [r for g in groups for r in g["rules"]]
        if len(loaded) < 5:
            problems.append(f"Prometheus loaded {len(loaded)} rules")
        for r in loaded:
            if r["health"] != "ok":
                problems.append(f"rule {r['name']}: health {r['health']} {r.get('lastError')}")
            exprs.append((f"alert {r['name']}", r["query"]))
        for name, expr in exprs:
            e = expr.replace("$__rate_interval", "1m")
            try:
                result = query(prom, e)
            except Exception as err:  # noqa: BLE001 - report every failure, then exit 1
                problems.append(f"{name}: query failed: {err}")
                continue
            if not result:
                problems.append(f"{name}: no data for {e}")
            else:
                print(f"ok  {name}: {len(result)} series")
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    for p in problems:
        print("PROBLEM", p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
