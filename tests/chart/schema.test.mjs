// values.schema.json: each rule rejects its bad value (helm template fails and names the
// offending key), and the good values it must accept pass.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { CHART, MIXED_EXAMPLE, defaultValues, helm, profileByName, valuesFile } from "./lib.mjs";

async function renderWith(values) {
  return helm(["template", "rel", CHART, "-f", valuesFile(values)]);
}

// Each case: a mutation of the default values and the key path helm must name.
const invalid = {
  "negative replicas": [(v) => { profileByName(v, "hopper").replicas = -1; }, "gpuProfiles.0.replicas"],
  "non-integer replicas": [(v) => { profileByName(v, "ampere").replicas = 1.5; }, "gpuProfiles.1.replicas"],
  "negative gpus": [(v) => { profileByName(v, "hopper").gpus = -1; }, "gpuProfiles.0.gpus"],
  "unknown quantization (shared)": [(v) => { v.server.quantization = "int4"; }, "server.quantization"],
  "unknown quantization (profile)": [(v) => { profileByName(v, "hopper").server.quantization = "fp4"; }, "gpuProfiles.0.server.quantization"],
  "unknown kv-cache-dtype (shared)": [(v) => { v.server.kvCacheDtype = "int8"; }, "server.kvCacheDtype"],
  "unknown kv-cache-dtype (profile)": [(v) => { profileByName(v, "hopper").server.kvCacheDtype = "fp8_e3m4"; }, "gpuProfiles.0.server.kvCacheDtype"],
  "non-integer gRPC port (string)": [(v) => { v.ports.grpc = "grpc"; }, "ports.grpc"],
  "non-integer gRPC port (fraction)": [(v) => { v.ports.grpc = 50051.5; }, "ports.grpc"],
  "non-integer metrics port": [(v) => { v.ports.metrics = "9400"; }, "ports.metrics"],
  "port out of range": [(v) => { v.ports.metrics = 70000; }, "ports.metrics"],
  "unknown device": [(v) => { v.server.device = "rocm"; }, "server.device"],
  "unknown log format": [(v) => { v.server.logFormat = "xml"; }, "server.logFormat"],
  "unknown metrics compat": [(v) => { v.server.metricsCompat = "sglang"; }, "server.metricsCompat"],
  "gpu memory utilization above 1": [(v) => { v.server.gpuMemoryUtilization = 1.5; }, "server.gpuMemoryUtilization"],
  "negative shutdown timeout": [(v) => { v.server.shutdownTimeoutSeconds = -5; }, "server.shutdownTimeoutSeconds"],
  "unknown model source": [(v) => { v.model.source = "s3"; }, "model.source"],
  "relative model path": [(v) => { profileByName(v, "hopper").model.path = "models/x"; }, "gpuProfiles.0.model.path"],
  "unknown image variant": [(v) => { profileByName(v, "hopper").image.variant = "fp4"; }, "gpuProfiles.0.image.variant"],
  "profile name not a DNS label": [(v) => { profileByName(v, "hopper").name = "Hopper_GPU"; }, "gpuProfiles.0.name"],
  "profile without a name": [(v) => { delete profileByName(v, "hopper").name; }, "name is required"],
  "unknown profile key (typo)": [(v) => { profileByName(v, "hopper").replica = 2; }, "replica"],
  "compute major not an integer": [(v) => { profileByName(v, "hopper").match.computeMajor.min = "9"; }, "gpuProfiles.0.match.computeMajor.min"],
  "unknown node operator": [(v) => { profileByName(v, "hopper").match.expressions = [{ key: "a", operator: "Matches" }]; }, "operator"],
  "unknown autoscaling type": [(v) => { v.autoscaling.type = "vpa"; }, "autoscaling.type"],
  "zero maxReplicas": [(v) => { v.autoscaling.maxReplicas = 0; }, "autoscaling.maxReplicas"],
  "negative preStop sleep": [(v) => { v.lifecycle.preStopSleepSeconds = -1; }, "lifecycle.preStopSleepSeconds"],
  "bad scrape interval": [(v) => { v.monitoring.serviceMonitor.interval = "15 seconds"; }, "monitoring.serviceMonitor.interval"],
  "unknown top-level key (typo)": [(v) => { v.autoscalling = { enabled: true }; }, "autoscalling"],
};

describe("values.schema.json rejects", { concurrency: 4 }, () => {
  for (const [name, [mutate, key]] of Object.entries(invalid)) {
    test(name, async () => {
      const v = defaultValues();
      mutate(v);
      const r = await renderWith(v);
      assert.notEqual(r.code, 0, `${name} was accepted`);
      assert.match(r.stderr, /don't meet the specifications of the schema/, r.stderr);
      assert.ok(r.stderr.includes(key), `the error names ${key}:\n${r.stderr}`);
    });
  }
});

describe("values.schema.json accepts", { concurrency: 4 }, () => {
  const valid = {
    "the defaults": () => {},
    "null server settings": (v) => { Object.assign(v.server, { maxModelLen: null, quantization: null, kvCacheDtype: null }); },
    "every quantization": (v) => {
      for (const [i, q] of ["none", "fp8", "int8", "gptq", "awq", "compressed-tensors"].entries()) {
        v.gpuProfiles.push({ name: `q${i}`, enabled: false, server: { quantization: q } });
      }
    },
    "every kv-cache-dtype": (v) => {
      for (const [i, d] of ["auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"].entries()) {
        v.gpuProfiles.push({ name: `kv${i}`, enabled: false, server: { kvCacheDtype: d } });
      }
    },
    "zero replicas": (v) => { profileByName(v, "hopper").replicas = 0; },
    "byte sizes as strings": (v) => { v.server.kvCacheMemoryBytes = "20G"; },
  };
  for (const [name, mutate] of Object.entries(valid)) {
    test(name, async () => {
      const v = defaultValues();
      mutate(v);
      const r = await renderWith(v);
      assert.equal(r.code, 0, r.stderr);
    });
  }
  test("the mixed H100 + A100 example", async () => {
    const r = await helm(["template", "rel", CHART, "-f", MIXED_EXAMPLE]);
    assert.equal(r.code, 0, r.stderr);
  });
});
