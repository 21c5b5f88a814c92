#!/usr/bin/env python3
"""Writes kleingate.json, the Grafana dashboard, so that its panels stay regular. Edit here, run
`python3 dashboards/make_dashboard.py`, commit both."""

import json
import pathlib

DS = {"type": "prometheus", "uid": "${datasource}"}

# (title, unit, [(expr, legend)], width)
ROWS = [
    ("Traffic", [
        ("Requests per second by status", "reqps",
         [('sum by (status) (rate(kleingate_requests_total[$__rate_interval]))', "{{status}}")], 8),
        ("Error rate (5xx share)", "percentunit",
         [('sum(rate(kleingate_requests_total{status=~"5.."}[$__rate_interval])) / clamp_min(sum(rate(kleingate_requests_total[$__rate_interval])), 1e-9)', "5xx")], 8),
        ("Requests by backend", "reqps",
         [('sum by (backend) (rate(kleingate_requests_total[$__rate_interval]))', "{{backend}}")], 8),
    ]),
    ("Admission", [
        ("Refused before any work, by reason", "reqps",
         [('sum by (reason) (rate(kleingate_rejected_total[$__rate_interval]))', "{{reason}}")], 12),
        ("All responses by route and status", "reqps",
         [('sum by (route, status) (rate(kleingate_http_responses_total[$__rate_interval]))', "{{route}} {{status}}")], 12),
    ]),
    ("Latency", [
        ("Latency p50 / p95 / p99 by backend", "s",
         [(f'histogram_quantile({q}, sum by (le, backend) (rate(kleingate_request_duration_seconds_bucket[$__rate_interval])))', f"p{int(q * 100)} {{{{backend}}}}")
          for q in (0.5, 0.95, 0.99)], 12),
        ("Backend attempt latency p95 by outcome", "s",
         [('histogram_quantile(0.95, sum by (le, backend, outcome) (rate(kleingate_backend_request_duration_seconds_bucket[$__rate_interval])))', "{{backend}} {{outcome}}")], 6),
        ("Gateway overhead p99", "s",
         [('histogram_quantile(0.99, sum by (le) (rate(kleingate_gateway_overhead_seconds_bucket[$__rate_interval])))', "p99")], 6),
    ]),
    ("Backends", [
        ("Fallbacks by reason", "reqps",
         [('sum by (from, reason) (rate(kleingate_fallbacks_total[$__rate_interval]))', "{{from}}: {{reason}}")], 8),
        ("Backend ready (1) / down (0)", "none",
         [('max by (backend) (kleingate_backend_ready)', "{{backend}}")], 8),
        ("Circuit state (0 closed, 1 half-open, 2 open) and in-flight", "none",
         [('max by (backend) (kleingate_backend_circuit_state)', "circuit {{backend}}"),
          ('sum by (backend) (kleingate_backend_inflight_requests)', "in flight {{backend}}")], 8),
        ("Pool endpoints taking requests, of all (a verda backend's workers)", "none",
         [('sum by (backend) (kleingate_backend_endpoint_ready)', "ready {{backend}}"),
          ('count by (backend) (kleingate_backend_endpoint_ready)', "all {{backend}}")], 12),
        ("In flight per pool endpoint", "none",
         [('sum by (backend, endpoint) (kleingate_backend_endpoint_inflight_requests)', "{{backend}} {{endpoint}}")], 12),
    ]),
    ("Cache and cost", [
        ("Cache hit ratio", "percentunit",
         [('sum(rate(kleingate_cache_hits_total[$__rate_interval])) / clamp_min(sum(rate(kleingate_cache_hits_total[$__rate_interval])) + sum(rate(kleingate_cache_misses_total[$__rate_interval])), 1e-9)', "hit ratio")], 8),
        ("Cache bytes", "bytes",
         [('sum(kleingate_cache_bytes)', "bytes")], 4),
        ("Cost per hour by backend (USD)", "currencyUSD",
         [('sum by (backend) (rate(kleingate_cost_usd_total[$__rate_interval])) * 3600', "{{backend}}")], 12),
    ]),
    ("Shared state (Redis) and experiment storage", [
        ("State store up (1) per replica; 0 = per-replica limits and cache", "none",
         [('min by (instance) (kleingate_state_store_up)', "{{instance}}")], 8),
        ("State store errors by operation (each fell back to the replica's own state)", "ops",
         [('sum by (op) (rate(kleingate_state_store_errors_total[$__rate_interval]))', "{{op}}")], 8),
        ("Across replicas: shared cache hits, waits on another replica", "reqps",
         [('sum(rate(kleingate_cache_shared_hits_total[$__rate_interval]))', "shared hits"),
          ('sum(rate(kleingate_singleflight_remote_total[$__rate_interval]))', "waited on another replica")], 8),
        ("Experiment records waiting for the database (PostgreSQL or SQLite), failed writes, dropped", "none",
         [('sum by (instance) (kleingate_storage_pending_records)', "pending {{instance}}"),
          ('sum(increase(kleingate_storage_write_failures_total[$__rate_interval]))', "failed writes"),
          ('sum(increase(kleingate_storage_dropped_records_total[$__rate_interval]))', "dropped")], 24),
    ]),
    ("Experiments", [
        ("Experiment assignments by variant", "reqps",
         [('sum by (experiment, variant) (rate(kleingate_experiment_assignments_total[$__rate_interval]))', "{{experiment}} {{variant}}")], 12),
        ("Experiment mean feedback score by variant", "none",
         [('sum by (experiment, variant) (kleingate_experiment_score_sum) / clamp_min(sum by (experiment, variant) (kleingate_experiment_feedback_total), 1)', "{{experiment}} {{variant}}")], 12),
        ("Shadow runs by outcome (ran, failed, skipped: no_capacity, budget, scope, draining)", "reqps",
         [('sum by (experiment, outcome) (rate(kleingate_shadow_runs_total[$__rate_interval]))', "{{experiment}} {{outcome}}")], 12),
        ("Experiment records pruned by retention (per hour)", "none",
         [('sum by (kind) (increase(kleingate_storage_pruned_total[1h]))', "{{kind}}")], 12),
    ]),
    ("Local engine", [
        ("Local engine queue depth", "none",
         [('max by (backend) (kleingate_local_queue_depth)', "{{backend}}")], 8),
        ("Local engine step time p50 / p95", "s",
         [(f'histogram_quantile({q}, sum by (le, backend) (rate(kleingate_local_stage_seconds_bucket{{stage="step"}}[$__rate_interval])))', f"p{int(q * 100)} {{{{backend}}}}") for q in (0.5, 0.95)], 8),
        ("Local engine stage time (mean per batch)", "s",
         [('sum by (stage) (rate(kleingate_local_stage_seconds_sum[$__rate_interval])) / clamp_min(sum by (stage) (rate(kleingate_local_stage_seconds_count[$__rate_interval])), 1e-9)', "{{stage}}")], 8),
    ]),
]


def main():
    panels, y, pid = [], 0, 1
    for row, items in ROWS:
        panels.append({"type": "row", "title": row, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y, x = pid + 1, y + 1, 0
        for title, unit, targets, w in items:
            panels.append({
                "type": "timeseries", "title": title, "id": pid, "datasource": DS,
                "gridPos": {"h": 8, "w": w, "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [{"datasource": DS, "expr": e, "legendFormat": l, "refId": chr(65 + i)}
                            for i, (e, l) in enumerate(targets)],
            })
            pid, x = pid + 1, x + w
        y += 8
    dash = {
        "title": "kleingate", "uid": "kleingate", "schemaVersion": 39, "version": 1,
        "tags": ["kleingate"], "timezone": "utc", "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus", "current": {}}]},
        "panels": panels,
    }
    out = pathlib.Path(__file__).with_name("kleingate.json")
    out.write_text(json.dumps(dash, indent=2) + "\n")


if __name__ == "__main__":
    main()
