#!/usr/bin/env python3
"""Contract test: schemathesis against a live gateway, from the gateway's own OpenAPI document.

Starts, all on 127.0.0.1: a fake Verda upstream (`fake-verda`), and the gateway (`kleingate serve`)
with API keys on (one key), that upstream as a `verda` backend, the tiny local engine on the CPU as
a `local` backend (first in the routing order: it serves `flux2-klein-4b` requests that do not ask
for the safety checker), an experiment in a fresh SQLite file, and small `[limits]` so that every
image the engine makes is small. Waits until `/readyz` answers 200 and the local engine has loaded,
then runs schemathesis (version pinned in `requirements.txt`) on `GET /openapi.json` with the bearer
key: every phase (the document's examples, coverage (boundary values, valid and invalid), fuzzing
(property-based, valid and invalid inputs: `--mode all`), and stateful where links exist), a bounded
number of fuzzed examples per operation, with the checks that no answer is a 5xx and that every
answer's status code, content type, headers and body match the document. Exits with schemathesis'
status (its report on stdout); on failure, the tail of the gateway's log as well.

    python3 -m venv /tmp/st && /tmp/st/bin/pip install -r tests/contract/requirements.txt
    cargo build -p kleingate-gateway -p kleingate-tests --bins
    /tmp/st/bin/python tests/contract/run.py [--kleingate BIN] [--fake-verda BIN] [-- SCHEMATHESIS ARGS]

Extra arguments after `--` go to `schemathesis run` as they are (`--seed N` to replay a run,
`--max-failures 1`, `--report junit`...). Bounded: a few minutes on two cores.
"""

import argparse
import hashlib
import json
import os
import pathlib
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"
TINY = ROOT / "backends/local/tests/data/klein-tiny/pipeline"
KEY = "kg_contract_" + os.urandom(16).hex()
AUTH = {"authorization": f"Bearer {KEY}"}
# Every check about the answers the document describes (`schemathesis run --help` lists them).
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
]


def log(msg):
    print(f"contract: {msg}", flush=True)


class Proc:
    """A child in its own process group whose output goes to a log file, read line by line so a
    banner (its address) can be waited for."""

    def __init__(self, name, argv, log_path, banner_stream, env=None):
        self.name = name
        self.log_path = log_path
        self.lines = queue.Queue()
        # Append mode: the child writes its stderr through the same file (O_APPEND keeps both whole).
        self.logf = open(log_path, "a", encoding="utf-8", errors="replace")
        out = subprocess.PIPE if banner_stream == "stdout" else subprocess.DEVNULL
        err = subprocess.PIPE if banner_stream == "stderr" else self.logf
        self.p = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=err, env=env,
                                  stdin=subprocess.DEVNULL, start_new_session=True, text=True,
                                  errors="replace")
        stream = self.p.stdout if banner_stream == "stdout" else self.p.stderr
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream):
        for line in stream:
            self.logf.write(line)
            self.logf.flush()
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern, timeout):
        """The first match of `pattern` in its output, or exit if it dies or stays silent."""
        end = time.time() + timeout
        while True:
            left = end - time.time()
            if left <= 0:
                self.fail(f"printed no line matching {pattern!r} within {timeout} s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.fail(f"exited ({self.p.wait()}) before printing {pattern!r}")
            m = re.search(pattern, line)
            if m:
                return m

    def fail(self, why):
        log(f"{self.name} {why}")
        self.print_tail()
        raise SystemExit(1)

    def print_tail(self, n=80):
        self.logf.flush()
        lines = pathlib.Path(self.log_path).read_text(errors="replace").splitlines()
        log(f"last {min(n, len(lines))} lines of {self.name}'s log ({self.log_path}):")
        for line in lines[-n:]:
            print(f"  | {line}")
        sys.stdout.flush()

    def stop(self):
        """SIGTERM to its process group, SIGKILL after 15 s."""
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM for 15 s: killing it")
                try:
                    os.killpg(self.p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait()
        else:
            # Its group may still hold children even though it is gone.
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.logf.close()


def http(method, url, headers=None, timeout=10):
    """(status, body); (None, error text) when nothing answered."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return None, str(e)


def config(tmp, upstream):
    """The gateway's config: auth on, the fake upstream and the tiny engine, small limits."""
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    return f"""
listen = "127.0.0.1:0"
default_model = "flux2-klein-4b"
request_timeout_secs = 60
shutdown_delay_secs = 0
shutdown_grace_secs = 10

# Small images only, so the requests schemathesis sends stay cheap: the tiny engine on the CPU
# (debug build, two cores) takes ~0.7 s at 64 x 64 and ~2.3 s at 128 x 128. Requests without a
# size ask for the default 1024 x 768 and are 400s.
[limits]
min_side = 64
max_side = 128
max_pixels = 16384
max_prompt_bytes = 1024
min_steps = 1
max_steps = 4
max_input_images = 2
max_input_image_bytes = 65536

[routing]
order = ["local", "verda"]

[fetch]
timeout_secs = 2

[[auth.keys]]
name = "contract"
sha256 = "{digest}"
backend_header = true
experiments = true
operations = true

[storage]
path = "{tmp / 'kleingate.db'}"

[experiments.ab]
variants = [{{ name = "a", backend = "verda" }}, {{ name = "b", backend = "verda", model = "flux2-klein-base-4b" }}]

[backends.verda]
kind = "verda"
base_url = "{upstream}"
api_key_env = "KLEINGATE_NO_SUCH_VAR"

[backends.local]
kind = "local"
weights = "{TINY}"
device = "cpu"
max_sequence_length = 32
models = ["flux2-klein-4b"]
"""


def wait_ready(gw, gateway, timeout):
    """/readyz 200, then the local engine loaded (not `loading`; `down` is a failure)."""
    end = time.time() + timeout
    status = None
    while time.time() < end:
        if gateway.p.poll() is not None:
            gateway.fail(f"exited ({gateway.p.returncode}) while starting")
        status, _ = http("GET", f"{gw}/readyz")
        if status == 200:
            break
        time.sleep(0.2)
    else:
        gateway.fail(f"/readyz still {status} after {timeout} s")
    while time.time() < end:
        status, body = http("GET", f"{gw}/v1/backends", AUTH)
        if status == 200:
            try:
                local = next((b for b in json.loads(body)["backends"] if b["name"] == "local"), None)
                state = local and local["health"]["state"]
            except (ValueError, KeyError, TypeError) as e:
                gateway.fail(f"GET /v1/backends: unexpected answer ({e!r}): {body[:500]!r}")
            if local is None:
                gateway.fail("lists no `local` backend in /v1/backends")
            if state == "ready":
                return
            if state != "loading":
                gateway.fail(f"local engine is {state}: {json.dumps(local)}")
        elif status is not None:
            gateway.fail(f"GET /v1/backends with the key answered {status}: {body[:500]!r}")
        time.sleep(0.3)
    gateway.fail(f"local engine still loading after {timeout} s")


def find_schemathesis(given):
    if given:
        return given
    # The venv this script runs in first (`$venv/bin/python tests/contract/run.py`), then PATH.
    beside = pathlib.Path(sys.executable).parent / "schemathesis"
    if beside.exists():
        return str(beside)
    found = shutil.which("schemathesis")
    if not found:
        raise SystemExit("contract: schemathesis not found: pip install -r tests/contract/requirements.txt")
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kleingate", default=BIN / "kleingate", type=pathlib.Path)
    ap.add_argument("--fake-verda", default=BIN / "fake-verda", type=pathlib.Path)
    ap.add_argument("--schemathesis", help="the schemathesis executable (default: beside this Python, "
                    "else on PATH)")
    ap.add_argument("--max-examples", type=int, default=100,
                    help="fuzzed test cases per operation (the coverage phase is bounded by the document)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--request-timeout", type=float, default=90.0,
                    help="seconds per request (above the gateway's request_timeout_secs = 60)")
    ap.add_argument("--ready-timeout", type=float, default=180.0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (config, logs, db)")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="-- then arguments for `schemathesis run`")
    args = ap.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    for b in (args.kleingate, args.fake_verda):
        if not b.exists():
            raise SystemExit(f"contract: {b} not found: cargo build -p kleingate-gateway -p kleingate-tests --bins")
    st = find_schemathesis(args.schemathesis)

    # A SIGTERM (CI cancelling the job) unwinds through `finally` like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="kleingate-contract-"))
    procs = []
    rc = 1
    try:
        fake = Proc("fake-verda", [args.fake_verda, "--listen", "127.0.0.1:0", "--image-bytes", "2000"],
                    tmp / "fake-verda.log", "stderr")
        procs.append(fake)
        upstream = fake.wait_for(r"fake verda on (http://\S+)", 30).group(1)
        log(f"fake Verda upstream on {upstream}")

        (tmp / "kleingate.toml").write_text(config(tmp, upstream))
        env = {k: v for k, v in os.environ.items() if not k.startswith("KLEINGATE_")}
        env.setdefault("RUST_LOG", "info")
        gateway = Proc("kleingate", [args.kleingate, "serve", "--config", tmp / "kleingate.toml",
                                     "--listen", "127.0.0.1:0"], tmp / "kleingate.log", "stdout", env=env)
        procs.append(gateway)
        gw = gateway.wait_for(r"kleingate listening on (http://\S+)", 60).group(1)
        log(f"gateway on {gw}; waiting for /readyz and the local engine")
        t0 = time.time()
        wait_ready(gw, gateway, args.ready_timeout)
        log(f"ready after {time.time() - t0:.1f} s")
        status, body = http("GET", f"{gw}/openapi.json")
        if status != 200:
            gateway.fail(f"GET /openapi.json answered {status}: {body[:500]!r}")
        doc = json.loads(body)
        ops = sum(1 for item in doc.get("paths", {}).values() for m in item
                  if m in ("get", "put", "post", "delete", "patch", "head", "options", "trace"))
        log(f"document: OpenAPI {doc.get('openapi')}, {ops} operations")

        cmd = [st, "run", f"{gw}/openapi.json",
               "--header", f"Authorization: Bearer {KEY}",
               "--checks", ",".join(CHECKS),
               "--mode", "all",
               "--phases", "examples,coverage,fuzzing,stateful",
               "--max-examples", str(args.max_examples),
               "--workers", str(args.workers),
               "--request-timeout", str(args.request_timeout),
               "--generation-database", "none",
               "--no-color",
               *extra]
        shown = [("Authorization: Bearer ***" if c.startswith("Authorization:") else c) for c in cmd]
        log("running " + " ".join(map(str, shown)))
        t0 = time.time()
        # In the temporary folder: anything schemathesis writes (reports) stays out of the tree.
        st_proc = subprocess.Popen(cmd, cwd=tmp, start_new_session=True)
        try:
            rc = st_proc.wait()
        finally:
            if st_proc.poll() is None:
                os.killpg(st_proc.pid, signal.SIGKILL)
                st_proc.wait()
        elapsed = time.time() - t0
        log(f"schemathesis exited {rc} after {elapsed:.0f} s ({elapsed / max(ops, 1):.1f} s per operation)")
        if gateway.p.poll() is not None:
            log(f"the gateway died during the run (exit {gateway.p.returncode})")
            rc = rc or 1
        if rc != 0:
            gateway.print_tail()
    finally:
        for p in reversed(procs):
            p.stop()
        if args.keep or rc != 0:
            log(f"config, logs and database kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if rc == 0 else 1)


if __name__ == "__main__":
    main()
