// Every metric the Grafana dashboard, the alerts and the autoscalers query is one a running
// qshard server exports: starts `qshard serve` on loopback with the embedded 12M model,
// sends a couple of requests, scrapes /metrics and compares. Skips (with the reason) when
// the binary is not built or has no `serve` command yet.
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";
import YAML from "yaml";

import { DASHBOARD_FILE, REPO, RULES_FILE, dashboardQueries, defaultValues, metricNamesInPromQL, ruleQueries } from "./lib.mjs";

const BIN = process.env.QSHARD_BIN || path.join(REPO, "build/bin/qshard");
const MODEL = process.env.QSHARD_MODEL || path.join(REPO, "models/kjv-llama-12m");
const START_TIMEOUT_MS = 120_000;

function supports(command) {
  const r = spawnSync(BIN, [command, "--help"], { encoding: "utf8", timeout: 20_000 });
  return r.status === 0 && /--/.test(r.stdout + r.stderr);
}

let skipReason = null;
if (!fs.existsSync(BIN)) skipReason = `${BIN} is not built`;
else if (!supports("serve")) skipReason = `${BIN} has no 'serve' command yet (the gRPC service is not built)`;

// "listening on 127.0.0.1:PORT metrics 127.0.0.1:MPORT", or the two on separate lines, or
// JSON logs: take host:port pairs; the one after the word "metrics" is the metrics port.
export function parseListenLine(line, found) {
  const pairs = [...line.matchAll(/(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]|localhost|0\.0\.0\.0)[:"\s]*?:(\d{1,5})\b/g)];
  if (pairs.length === 0) return found;
  const metricsAt = line.search(/metrics/i);
  for (const m of pairs) {
    const port = Number(m[1]);
    if (!port) continue;
    if (metricsAt >= 0 && m.index > metricsAt) found.metrics ??= port;
    else if (/listen|serv|grpc/i.test(line)) found.grpc ??= port;
  }
  return found;
}

let server;
let ports = {};
let output = "";

before(async () => {
  if (skipReason) return;
  server = spawn(BIN, ["serve", "--model", MODEL, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no listening line within ${START_TIMEOUT_MS} ms:\n${output}`)), START_TIMEOUT_MS);
    const onData = (chunk) => {
      output += chunk;
      for (const line of String(chunk).split("\n")) parseListenLine(line, ports);
      if (ports.grpc && ports.metrics) {
        clearTimeout(timer);
        resolve();
      }
    };
    server.stdout.on("data", onData);
    server.stderr.on("data", onData);
    server.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`qshard serve exited (${code}) before listening:\n${output}`));
    });
  });
  server.removeAllListeners("exit");

  // Ready (model loaded), then a little traffic so labelled series and histograms fill in.
  const addr = `127.0.0.1:${ports.grpc}`;
  if (supports("health")) {
    const deadline = Date.now() + START_TIMEOUT_MS;
    while (spawnSync(BIN, ["health", "--addr", addr, "--service", "qshard.v1.Qshard", "--timeout-ms", "1000"]).status !== 0) {
      if (Date.now() > deadline) throw new Error(`not SERVING within ${START_TIMEOUT_MS} ms:\n${output}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  }
  if (supports("loadgen")) {
    const r = spawnSync(BIN, ["loadgen", "--addr", addr, "--concurrency", "2", "--requests", "4", "--max-tokens", "4"],
      { encoding: "utf8", timeout: 120_000 });
    assert.equal(r.status, 0, `loadgen failed:\n${r.stdout}${r.stderr}`);
  }
});

after(async () => {
  if (!server || server.exitCode !== null) return;
  const exited = new Promise((r) => server.on("exit", r));
  server.kill("SIGTERM");
  const t = setTimeout(() => server.kill("SIGKILL"), 40_000);
  await exited;
  clearTimeout(t);
});

// Names in a Prometheus text exposition: sample names, and TYPE lines (name -> type).
function parseExposition(text) {
  const samples = new Set();
  const types = new Map();
  for (const line of text.split("\n")) {
    const t = /^# TYPE (\S+) (\S+)/.exec(line);
    if (t) types.set(t[1], t[2]);
    const s = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{|\s)/.exec(line);
    if (s) samples.add(s[1]);
  }
  return { samples, types };
}

test("every metric used by the dashboard, the alerts and the autoscalers is exported", { skip: skipReason ?? false }, async () => {
  const res = await fetch(`http://127.0.0.1:${ports.metrics}/metrics`);
  assert.equal(res.status, 200);
  const { samples, types } = parseExposition(await res.text());

  const dashboard = JSON.parse(fs.readFileSync(DASHBOARD_FILE, "utf8"));
  const rules = YAML.parse(fs.readFileSync(RULES_FILE, "utf8"));
  const values = defaultValues();
  const queries = [
    ...dashboardQueries(dashboard),
    ...ruleQueries(rules),
    { where: "autoscaling.hpa.metricName", expr: values.autoscaling.hpa.metricName },
    { where: "KEDA trigger query", expr: "sum(qshard_num_requests_waiting)" },
  ];
  const missing = [];
  for (const q of queries) {
    for (const name of metricNamesInPromQL(q.expr)) {
      const suffix = /_(bucket|sum|count)$/.exec(name);
      const base = suffix ? name.slice(0, -suffix[0].length) : null;
      if (base && types.get(base) === "histogram") {
        if (!samples.has(name)) missing.push(`${name} (${q.where}): histogram ${base} has no ${suffix[0]} samples`);
        continue;
      }
      if (types.get(name) === "histogram") {
        missing.push(`${name} (${q.where}): a histogram, query ${name}_bucket/_sum/_count`);
        continue;
      }
      // Counters are exposed with their _total sample name; a labelled family with no
      // children yet still has its TYPE line.
      if (!samples.has(name) && !types.has(name) && !types.has(name.replace(/_total$/, ""))) {
        missing.push(`${name} (${q.where})`);
      }
    }
  }
  assert.deepEqual(missing, [], `metrics not exported by qshard serve:\n  ${missing.join("\n  ")}`);

  // The Gateway API Inference Extension's names, on by default.
  for (const n of ["vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"]) {
    assert.ok(samples.has(n), `${n} is exported`);
  }
});

test("parseListenLine", () => {
  assert.deepEqual(parseListenLine("qshard: listening on 127.0.0.1:41234 metrics 127.0.0.1:41235", {}), { grpc: 41234, metrics: 41235 });
  assert.deepEqual(parseListenLine('{"msg":"serving","grpc":"0.0.0.0:5000","metrics":"0.0.0.0:5001"}', {}), { grpc: 5000, metrics: 5001 });
  const two = {};
  parseListenLine("I1127 gRPC server listening on [::]:6000", two);
  parseListenLine("metrics server on 127.0.0.1:6001", two);
  assert.deepEqual(two, { grpc: 6000, metrics: 6001 });
});
