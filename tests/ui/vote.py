#!/usr/bin/env python3
"""Drive the experiment vote page in headless Chromium and check the stored feedback.

Starts, all on 127.0.0.1: two fake Verda upstreams (one per variant), the gateway with a
`shadow = true` experiment, a fresh SQLite file and API keys on, and chromedriver (Debian's
`chromium` and `chromium-driver` packages), spoken to over the plain WebDriver HTTP protocol. Makes a
pair, opens /ui/experiments/ab, is sent to the sign-in form, enters the key (the page and its vote
requests then authenticate with the cookie), clicks "Left is better", waits for "Vote recorded", and
checks that
the winner's variant got a thumbs up (5) and the other a thumbs down (1) in
GET /v1/experiments/ab. Bounded: under a minute.

    cargo build -p kleingate-gateway -p kleingate-tests --bins && python3 tests/ui/vote.py
"""

import hashlib
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
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"
KEY = "kg_vote_test_" + os.urandom(16).hex()
AUTH = {"authorization": f"Bearer {KEY}"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, headers=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def wait(pred, what, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            v = pred()
            if v:
                return v
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def main():
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="kleingate-ui-"))
    procs = []
    try:
        pa, pb, gwp, wdp = free_port(), free_port(), free_port(), free_port()
        for p in (pa, pb):
            procs.append(subprocess.Popen([BIN / "fake-verda", "--listen", f"127.0.0.1:{p}",
                                           "--image-bytes", "3000"], stdout=subprocess.DEVNULL))
        (tmp / "k.toml").write_text(f"""
listen = "127.0.0.1:{gwp}"
[[auth.keys]]
name = "rater"
sha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"
experiments = true
[storage]
path = "{tmp / 'k.db'}"
[experiments.ab]
shadow = true
variants = [{{ name = "a", backend = "fa" }}, {{ name = "b", backend = "fb", weight = 0 }}]
[backends.fa]
kind = "verda"
base_url = "http://127.0.0.1:{pa}"
api_key_env = "KLEINGATE_NO_SUCH_VAR"
[backends.fb]
kind = "verda"
base_url = "http://127.0.0.1:{pb}"
api_key_env = "KLEINGATE_NO_SUCH_VAR"
""")
        procs.append(subprocess.Popen([BIN / "kleingate", "serve", "--config", tmp / "k.toml"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        gw = f"http://127.0.0.1:{gwp}"
        wait(lambda: http("GET", f"{gw}/healthz")[0] == 200, "the gateway")
        status, _, _ = http("POST", f"{gw}/generate", {"prompt": "a red fox", "seed": 4})
        assert status == 401, f"auth is on: {status}"
        status, headers, _ = http("POST", f"{gw}/generate", {"prompt": "a red fox", "seed": 4},
                                  {"x-kleingate-experiment": "ab", **AUTH})
        assert status == 200, status
        rid = headers["x-kleingate-result-id"]
        wait(lambda: http("GET", f"{gw}/v1/experiments/ab/images/{rid}.shadow", None, AUTH)[0] == 200,
             "the shadow result")

        driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
        procs.append(subprocess.Popen([driver, f"--port={wdp}"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        wd = f"http://127.0.0.1:{wdp}"
        wait(lambda: http("GET", f"{wd}/status")[0] == 200, "chromedriver")
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": shutil.which("chromium") or "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--user-data-dir={tmp / 'profile'}"]}}}}
        status, _, body = http("POST", f"{wd}/session", caps)
        assert status == 200, body
        sid = json.loads(body)["value"]["sessionId"]
        s = f"{wd}/session/{sid}"
        try:
            http("POST", f"{s}/url", {"url": f"{gw}/ui/experiments/ab"})

            def find(css):
                st, _, b = http("POST", f"{s}/element", {"using": "css selector", "value": css})
                return list(json.loads(b)["value"].values())[0] if st == 200 else None

            # No key yet: the sign-in form, which sends the browser back to the page.
            field = wait(lambda: find("input[name=key]"), "the sign-in form")
            http("POST", f"{s}/element/{field}/value", {"text": KEY})
            http("POST", f"{s}/element/{find('button[type=submit]')}/click", {})

            button = wait(lambda: find("section.pair button.vote"), "the vote button")
            _, _, b = http("GET", f"{s}/element/{button}/attribute/data-win")
            winner = json.loads(b)["value"]
            http("POST", f"{s}/element/{button}/click", {})

            def status_text():
                el = find("section.pair .status")
                _, _, b = http("GET", f"{s}/element/{el}/text")
                return json.loads(b)["value"] == "Vote recorded"

            wait(status_text, "the vote to be recorded")
        finally:
            http("DELETE", s)

        _, _, body = http("GET", f"{gw}/v1/experiments/ab", None, AUTH)
        results = {r["variant"]: r for r in json.loads(body)["results"]}
        win_variant = "b" if winner.endswith(".shadow") else "a"
        lose_variant = "a" if win_variant == "b" else "b"
        problems = []
        if results[win_variant]["feedback"] != 1 or results[win_variant]["mean_score"] != 5.0:
            problems.append(f"winner {win_variant}: {results[win_variant]}")
        if results[lose_variant]["feedback"] != 1 or results[lose_variant]["mean_score"] != 1.0:
            problems.append(f"loser {lose_variant}: {results[lose_variant]}")
        for p in problems:
            print("PROBLEM", p)
        if problems:
            sys.exit(1)
        print(f"ok: clicked {winner} ({win_variant}); stored 5 for {win_variant}, 1 for {lose_variant}")
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
