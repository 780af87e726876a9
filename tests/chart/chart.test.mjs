// helm/qshard: lint, render for the defaults / each profile / the mixed example / every
// toggle, validate every object against the Kubernetes and prometheus-operator schemas,
// and check what the Deployments ask the scheduler and the kubelet for.
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { describe, test, before } from "node:test";
import YAML from "yaml";

import {
  CHART, DASHBOARD_FILE, MIXED_EXAMPLE, REPO, RULES_FILE, SAMPLE_NODES, dashboardQueries, defaultValues,
  checkNoUnknownFields, helm, metricNamesInPromQL, ofKind, podSpecMatchesNode, profileByName, promtoolCheckRules, render, ruleQueries,
  tmpDir, validateObject,
} from "./lib.mjs";

const GPU = "nvidia.com/gpu";
const MAJOR = "nvidia.com/gpu.compute.major";

// Values that enable exactly the named profiles.
function onlyProfiles(...names) {
  const v = defaultValues();
  for (const p of v.gpuProfiles) p.enabled = names.includes(p.name);
  return v;
}

const container = (d) => d.spec.template.spec.containers.find((c) => c.name === "qshard");
const argValue = (args, flag) => {
  const hit = args.find((a) => a.startsWith(`--${flag}=`));
  return hit === undefined ? undefined : hit.slice(flag.length + 3);
};
const profileOf = (d) => d.metadata.labels["qshard.io/profile"];

function validateAll(objs) {
  assert.ok(objs.length > 0, "nothing rendered");
  for (const o of objs) {
    try {
      validateObject(o);
    } catch (e) {
      assert.fail(`${o.kind}/${o.metadata?.name} does not validate: ${e.message}`);
    }
  }
}

// The checks every rendered Deployment must pass, whatever the values.
function checkDeployment(d, values) {
  const spec = d.spec.template.spec;
  const c = container(d);
  assert.ok(c, `${d.metadata.name}: no qshard container`);

  // Probes: native gRPC on the integer gRPC port with the right health services.
  const port = values?.ports?.grpc ?? 50051;
  for (const probe of ["startupProbe", "readinessProbe", "livenessProbe"]) {
    assert.ok(c[probe]?.grpc, `${d.metadata.name}: ${probe} is not a gRPC probe`);
    assert.equal(c[probe].grpc.port, port, `${probe} port`);
    assert.equal(typeof c[probe].grpc.port, "number", `${probe} port must be an integer`);
  }
  assert.equal(c.readinessProbe.grpc.service, "qshard.v1.Qshard");
  assert.equal(c.livenessProbe.grpc.service, "");
  assert.ok(c.startupProbe.failureThreshold * c.startupProbe.periodSeconds >= 60, "startup probe allows for model load");

  // Drain: grace period covers preStop sleep + --shutdown-timeout (+ margin).
  const pre = c.lifecycle.preStop;
  const sleep = pre.sleep ? pre.sleep.seconds : Number(pre.exec.command[1]);
  assert.ok(pre.sleep || pre.exec.command[0] === "sleep", "preStop sleeps");
  const shutdown = Number(argValue(c.args, "shutdown-timeout"));
  assert.ok(Number.isFinite(shutdown) && shutdown >= 0, "--shutdown-timeout is passed");
  assert.ok(spec.terminationGracePeriodSeconds > sleep + shutdown,
    `grace ${spec.terminationGracePeriodSeconds} must exceed preStop ${sleep} + shutdown ${shutdown}`);

  // Restricted security context, in-memory /dev/shm and a writable /tmp.
  const psc = spec.securityContext;
  assert.equal(psc.runAsNonRoot, true);
  assert.equal(psc.seccompProfile.type, "RuntimeDefault");
  assert.equal(c.securityContext.readOnlyRootFilesystem, true);
  assert.equal(c.securityContext.allowPrivilegeEscalation, false);
  assert.deepEqual(c.securityContext.capabilities.drop, ["ALL"]);
  const vol = (name) => spec.volumes.find((v) => v.name === name);
  const mount = (p) => c.volumeMounts.find((m) => m.mountPath === p);
  assert.equal(vol(mount("/dev/shm").name).emptyDir.medium, "Memory");
  assert.ok(vol(mount("/tmp").name).emptyDir);

  // Ports named, args start with serve.
  assert.deepEqual(c.ports.map((p) => p.name).sort(), ["grpc", "metrics"]);
  assert.equal(c.args[0], "serve");
  assert.ok(argValue(c.args, "model"), "--model is passed");
  assert.ok(argValue(c.args, "grpc-max-connection-age") !== undefined, "--grpc-max-connection-age is passed");

  // Required node affinity, always.
  const terms = spec.affinity?.nodeAffinity?.requiredDuringSchedulingIgnoredDuringExecution?.nodeSelectorTerms;
  assert.ok(terms?.length === 1 && terms[0].matchExpressions.length > 0, "required nodeAffinity");
}

describe("helm lint", { concurrency: 3 }, () => {
  test("lint --strict, defaults", async () => {
    const r = await helm(["lint", "--strict", CHART]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
  });
  test("lint --strict, mixed H100 + A100 example", async () => {
    const r = await helm(["lint", "--strict", CHART, "-f", MIXED_EXAMPLE]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
  });
  test("lint --strict, every toggle on", async () => {
    const r = await helm(["lint", "--strict", CHART, "-f", MIXED_EXAMPLE, "--set", "autoscaling.type=keda",
      "--set", "monitoring.serviceMonitor.enabled=false", "--set", "monitoring.podMonitor.enabled=true"]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
  });
});

describe("defaults", () => {
  let objs;
  before(async () => {
    objs = await render();
  });

  test("every object validates", () => validateAll(objs));

  test("one Deployment per enabled profile: hopper and ampere (cpu is off)", () => {
    const deps = ofKind(objs, "Deployment");
    assert.deepEqual(deps.map(profileOf).sort(), ["ampere", "hopper"]);
    assert.deepEqual(deps.map((d) => d.metadata.name).sort(), ["rel-qshard-ampere", "rel-qshard-hopper"]);
    for (const d of deps) checkDeployment(d, defaultValues());
  });

  test("hopper: fp8 image, --quantization fp8 --kv-cache-dtype fp8_e4m3, compute major > 8", () => {
    const d = ofKind(objs, "Deployment").find((x) => profileOf(x) === "hopper");
    const c = container(d);
    assert.match(c.image, /:[^:]*fp8$/);
    assert.equal(argValue(c.args, "quantization"), "fp8");
    assert.equal(argValue(c.args, "kv-cache-dtype"), "fp8_e4m3");
    assert.equal(argValue(c.args, "device"), "cuda");
    assert.deepEqual(d.spec.template.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution,
      { nodeSelectorTerms: [{ matchExpressions: [{ key: MAJOR, operator: "Gt", values: ["8"] }] }] });
  });

  test("ampere: marlin image with a GPTQ/AWQ 4-bit checkpoint, compute major 8", () => {
    const d = ofKind(objs, "Deployment").find((x) => profileOf(x) === "ampere");
    const c = container(d);
    assert.match(c.image, /:[^:]*marlin$/);
    assert.match(argValue(c.args, "quantization"), /^(gptq|awq)$/);
    assert.match(argValue(c.args, "model"), /(gptq|awq)/i);
    assert.notEqual(argValue(c.args, "quantization"), "fp8");
    assert.deepEqual(d.spec.template.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution,
      { nodeSelectorTerms: [{ matchExpressions: [{ key: MAJOR, operator: "In", values: ["8"] }] }] });
  });

  test("GPU profiles request exactly one GPU and tolerate the nvidia.com/gpu taint", () => {
    for (const d of ofKind(objs, "Deployment")) {
      const c = container(d);
      assert.equal(String(c.resources.requests[GPU]), "1", `${d.metadata.name} requests`);
      assert.equal(String(c.resources.limits[GPU]), "1", `${d.metadata.name} limits`);
      assert.ok(d.spec.template.spec.tolerations.some((t) => t.key === GPU && t.operator === "Exists"));
      assert.equal(d.spec.template.spec.runtimeClassName, undefined, "no runtimeClassName by default");
    }
  });

  test("ClusterIP Service with named grpc and metrics ports over all profiles", () => {
    const svcs = ofKind(objs, "Service");
    assert.equal(svcs.length, 1);
    const s = svcs[0];
    assert.equal(s.spec.type, "ClusterIP");
    assert.deepEqual(s.spec.ports.map((p) => [p.name, p.port]), [["grpc", 50051], ["metrics", 9400]]);
    assert.equal(s.spec.selector["qshard.io/profile"], undefined, "the Service spans profiles");
    for (const d of ofKind(objs, "Deployment")) {
      const podLabels = d.spec.template.metadata.labels;
      for (const [k, v] of Object.entries(s.spec.selector)) assert.equal(podLabels[k], v, `Service selects ${d.metadata.name}`);
    }
    const test = ofKind(objs, "Pod")[0];
    assert.ok(Object.entries(s.spec.selector).some(([k, v]) => test.metadata.labels[k] !== v), "the Service must not select the test pod");
  });

  test("model PVC created (kept on uninstall) and mounted read-only", () => {
    const pvc = ofKind(objs, "PersistentVolumeClaim");
    assert.equal(pvc.length, 1);
    assert.equal(pvc[0].metadata.annotations["helm.sh/resource-policy"], "keep");
    for (const d of ofKind(objs, "Deployment")) {
      const v = d.spec.template.spec.volumes.find((x) => x.name === "models");
      assert.equal(v.persistentVolumeClaim.claimName, pvc[0].metadata.name);
      assert.equal(container(d).volumeMounts.find((m) => m.name === "models").readOnly, true);
    }
  });

  test("PodDisruptionBudget per profile, selecting only that profile", () => {
    const pdbs = ofKind(objs, "PodDisruptionBudget");
    assert.deepEqual(pdbs.map((p) => p.spec.selector.matchLabels["qshard.io/profile"]).sort(), ["ampere", "hopper"]);
  });

  test("no monitoring or autoscaling objects by default", () => {
    for (const k of ["ServiceMonitor", "PodMonitor", "PrometheusRule", "HorizontalPodAutoscaler", "ScaledObject", "ConfigMap"]) {
      assert.equal(ofKind(objs, k).length, 0, k);
    }
  });

  test("helm test pod: qshard health on the Service, then one short Generate", () => {
    const pods = ofKind(objs, "Pod");
    assert.equal(pods.length, 1);
    const p = pods[0];
    assert.equal(p.metadata.annotations["helm.sh/hook"], "test");
    const script = p.spec.containers[0].command.join(" ");
    assert.match(script, /qshard health --addr rel-qshard\.ns\.svc:50051 --service qshard\.v1\.Qshard/);
    assert.match(script, /qshard loadgen --addr rel-qshard\.ns\.svc:50051 .*--requests 1/);
    assert.equal(p.spec.containers[0].securityContext.readOnlyRootFilesystem, true);
  });
});

describe("node matching", () => {
  // Every sample node matches at most one enabled default profile (cpu included), and the
  // right one.
  const expected = {
    H100: "hopper", H200: "hopper", GH200: "hopper", B200: "hopper",
    A100: "ampere", A10G: "ampere", L4: "ampere", T4: null, "no-GPU": "cpu",
  };
  let deps;
  before(async () => {
    deps = ofKind(await render({ values: [onlyProfiles("hopper", "ampere", "cpu")] }), "Deployment");
  });
  for (const [node, want] of Object.entries(expected)) {
    test(`${node} node -> ${want ?? "no profile"}`, () => {
      const hits = deps.filter((d) => podSpecMatchesNode(d.spec.template.spec, SAMPLE_NODES[node])).map(profileOf);
      assert.ok(hits.length <= 1, `${node} matches several profiles: ${hits}`);
      assert.deepEqual(hits, want ? [want] : []);
    });
  }
  test("default profiles' label sets are disjoint over all sample nodes", () => {
    for (const [node, labels] of Object.entries(SAMPLE_NODES)) {
      const hits = deps.filter((d) => podSpecMatchesNode(d.spec.template.spec, labels));
      assert.ok(hits.length <= 1, `${node}: ${hits.map(profileOf)}`);
    }
  });

  test("mixed example: H100 -> h100, A100 -> a100, every other sample node -> none", async () => {
    const ds = ofKind(await render({ files: [MIXED_EXAMPLE] }), "Deployment");
    const want = { H100: "h100", A100: "a100" };
    for (const [node, labels] of Object.entries(SAMPLE_NODES)) {
      const hits = ds.filter((d) => podSpecMatchesNode(d.spec.template.spec, labels)).map(profileOf);
      assert.deepEqual(hits, want[node] ? [want[node]] : [], node);
    }
  });
});

describe("each profile alone", { concurrency: 3 }, () => {
  for (const name of ["hopper", "ampere", "cpu"]) {
    test(name, async () => {
      const objs = await render({ values: [onlyProfiles(name)] });
      validateAll(objs);
      const deps = ofKind(objs, "Deployment");
      assert.deepEqual(deps.map(profileOf), [name]);
      checkDeployment(deps[0], defaultValues());
      const c = container(deps[0]);
      const spec = deps[0].spec.template.spec;
      if (name === "cpu") {
        // No GPU: no GPU request, no GPU toleration, only nodes without GFD labels.
        assert.equal(c.resources.requests[GPU], undefined);
        assert.equal(c.resources.limits?.[GPU], undefined);
        assert.ok(!(spec.tolerations || []).some((t) => t.key === GPU));
        assert.equal(argValue(c.args, "device"), "cpu");
        assert.deepEqual(spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms,
          [{ matchExpressions: [{ key: MAJOR, operator: "DoesNotExist" }] }]);
        // The model is baked into the image: no model volume, no PVC.
        assert.ok(!spec.volumes.some((v) => v.name === "models"));
        assert.equal(ofKind(objs, "PersistentVolumeClaim").length, 0);
      } else {
        assert.equal(String(c.resources.requests[GPU]), "1");
      }
    });
  }
});

describe("mixed H100 + A100 example", () => {
  let objs;
  before(async () => {
    objs = await render({ files: [MIXED_EXAMPLE], namespace: "llm", release: "qshard" });
  });
  test("every object validates", () => validateAll(objs));
  test("deployments, images, args, affinity", () => {
    const example = YAML.parse(fs.readFileSync(MIXED_EXAMPLE, "utf8"));
    const deps = ofKind(objs, "Deployment");
    assert.deepEqual(deps.map(profileOf).sort(), ["a100", "h100"]);
    for (const d of deps) {
      checkDeployment(d, example);
      assert.equal(d.spec.replicas, undefined, "the HPA owns replicas");
      assert.equal(d.spec.template.spec.runtimeClassName, "nvidia");
    }
    const h100 = container(deps.find((d) => profileOf(d) === "h100"));
    assert.equal(h100.image, "registry.example.com/ml/qshard:0.1.0-fp8");
    assert.equal(argValue(h100.args, "quantization"), "fp8");
    assert.equal(argValue(h100.args, "kv-cache-dtype"), "fp8_e4m3");
    assert.equal(argValue(h100.args, "gpu-memory-utilization"), "0.9");
    assert.equal(argValue(h100.args, "shutdown-timeout"), "60");
    const a100 = container(deps.find((d) => profileOf(d) === "a100"));
    assert.equal(a100.image, "registry.example.com/ml/qshard:0.1.0-marlin");
    assert.equal(argValue(a100.args, "quantization"), "gptq");
    const a100Expr = deps.find((d) => profileOf(d) === "a100").spec.template.spec.affinity.nodeAffinity
      .requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions;
    assert.deepEqual(a100Expr.map((e) => [e.key, e.operator, e.values]), [
      [MAJOR, "In", ["8"]],
      ["nvidia.com/gpu.compute.minor", "In", ["0"]],
      ["nvidia.com/gpu.product", "In", ["NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-80GB-PCIe"]],
    ]);
  });
  test("existing claim used, no PVC created", () => {
    assert.equal(ofKind(objs, "PersistentVolumeClaim").length, 0);
    for (const d of ofKind(objs, "Deployment")) {
      assert.equal(d.spec.template.spec.volumes.find((v) => v.name === "models").persistentVolumeClaim.claimName, "llm-models");
    }
  });
  test("HPA per profile on the waiting-requests pods metric", () => {
    const hpas = ofKind(objs, "HorizontalPodAutoscaler");
    assert.deepEqual(hpas.map((h) => [h.spec.scaleTargetRef.name, h.spec.minReplicas, h.spec.maxReplicas]).sort(),
      [["qshard-a100", 1, 6], ["qshard-h100", 2, 8]]);
    for (const h of hpas) {
      assert.equal(h.spec.metrics[0].type, "Pods");
      assert.equal(h.spec.metrics[0].pods.metric.name, "qshard_num_requests_waiting");
      assert.equal(h.spec.metrics[0].pods.target.averageValue, "8");
    }
  });
  test("monitoring objects and headless Service", () => {
    assert.equal(ofKind(objs, "ServiceMonitor").length, 1);
    assert.equal(ofKind(objs, "PrometheusRule").length, 1);
    const cm = ofKind(objs, "ConfigMap")[0];
    assert.equal(cm.metadata.labels.grafana_dashboard, "1");
    const svcs = ofKind(objs, "Service");
    assert.deepEqual(svcs.map((s) => s.spec.clusterIP ?? "cluster").sort(), ["None", "cluster"]);
    const rule = ofKind(objs, "PrometheusRule")[0];
    for (const r of rule.spec.groups.flatMap((g) => g.rules)) assert.equal(r.labels.team, "ml-platform");
  });
});

describe("toggles", { concurrency: 4 }, () => {
  const cases = {
    "serviceMonitor": { monitoring: { serviceMonitor: { enabled: true } } },
    "podMonitor": { monitoring: { podMonitor: { enabled: true } } },
    "prometheusRule": { monitoring: { prometheusRule: { enabled: true } } },
    "grafanaDashboard": { monitoring: { grafanaDashboard: { enabled: true, namespace: "monitoring" } } },
    "autoscaling hpa": { autoscaling: { enabled: true, type: "hpa" } },
    "autoscaling keda": { autoscaling: { enabled: true, type: "keda" } },
    "pdb off": { podDisruptionBudget: { enabled: false } },
    "pdb minAvailable": { podDisruptionBudget: { enabled: true, minAvailable: 1 } },
    "headless service": { service: { headless: { enabled: true } } },
    "runtimeClassName": { runtimeClassName: "nvidia" },
    "preStop sleep action": { lifecycle: { useSleepAction: true, preStopSleepSeconds: 20 } },
    "model hostPath": { model: { source: "hostPath" } },
    "model in image": { model: { source: "image" } },
    "model existing claim": { model: { pvc: { existingClaim: "models" } } },
    "model init container": { model: { initContainer: { enabled: true, image: "busybox:1.36", command: ["sh", "-c", "test -d $MODEL_PATH"] } } },
    "service account off": { serviceAccount: { create: false, name: "shared" } },
    "metrics compat off, text logs": { server: { metricsCompat: "none", logFormat: "text" } },
    "custom ports": { ports: { grpc: 8001, metrics: 8002 } },
    "extra args and env": { extraArgs: ["--max-queue=512"], env: [{ name: "FOO", value: "bar" }] },
    "MIG resource name": { gpuResourceName: "nvidia.com/mig-3g.40gb" },
  };
  for (const [name, values] of Object.entries(cases)) {
    test(name, async () => {
      const objs = await render({ values: [values] });
      validateAll(objs);
      const deps = ofKind(objs, "Deployment");
      assert.equal(deps.length, 2);
      for (const d of deps) checkDeployment(d, { ports: { grpc: values.ports?.grpc ?? 50051 } });
      const kinds = objs.map((o) => o.kind);
      const spec0 = deps[0].spec.template.spec;
      const c0 = container(deps[0]);
      switch (name) {
        case "serviceMonitor": {
          const sm = ofKind(objs, "ServiceMonitor")[0];
          assert.equal(sm.spec.endpoints[0].port, "metrics");
          assert.ok(sm.spec.endpoints[0].relabelings.some((r) => r.targetLabel === "job" && r.replacement === "rel-qshard"));
          const svc = ofKind(objs, "Service")[0];
          for (const [k, v] of Object.entries(sm.spec.selector.matchLabels)) assert.equal(svc.metadata.labels[k], v);
          break;
        }
        case "podMonitor":
          assert.equal(ofKind(objs, "PodMonitor")[0].spec.podMetricsEndpoints[0].port, "metrics");
          assert.ok(!kinds.includes("ServiceMonitor"));
          break;
        case "prometheusRule": {
          const rule = ofKind(objs, "PrometheusRule")[0];
          const exprs = rule.spec.groups.flatMap((g) => g.rules).map((r) => r.expr);
          assert.ok(exprs.every((e) => !e.includes('job="qshard"') && e.includes('job="rel-qshard", namespace="ns"')));
          break;
        }
        case "grafanaDashboard": {
          const cm = ofKind(objs, "ConfigMap")[0];
          assert.equal(cm.metadata.namespace, "monitoring");
          assert.equal(cm.metadata.labels.grafana_dashboard, "1");
          assert.deepEqual(JSON.parse(cm.data["qshard-dashboard.json"]), JSON.parse(fs.readFileSync(DASHBOARD_FILE, "utf8")));
          break;
        }
        case "autoscaling hpa":
          assert.equal(ofKind(objs, "HorizontalPodAutoscaler").length, 2);
          assert.ok(deps.every((d) => d.spec.replicas === undefined));
          break;
        case "autoscaling keda": {
          const sos = ofKind(objs, "ScaledObject");
          assert.equal(sos.length, 2);
          for (const so of sos) {
            const prof = so.metadata.labels["qshard.io/profile"];
            assert.equal(so.spec.scaleTargetRef.name, `rel-qshard-${prof}`);
            assert.match(so.spec.triggers[0].metadata.query, new RegExp(`qshard_num_requests_waiting\\{.*profile="${prof}"`));
          }
          assert.ok(!kinds.includes("HorizontalPodAutoscaler"));
          break;
        }
        case "pdb off":
          assert.ok(!kinds.includes("PodDisruptionBudget"));
          break;
        case "pdb minAvailable":
          assert.ok(ofKind(objs, "PodDisruptionBudget").every((p) => p.spec.minAvailable === 1 && p.spec.maxUnavailable === undefined));
          break;
        case "headless service": {
          const h = ofKind(objs, "Service").find((s) => s.spec.clusterIP === "None");
          assert.equal(h.metadata.name, "rel-qshard-headless");
          assert.equal(h.spec.ports[0].name, "grpc");
          break;
        }
        case "runtimeClassName":
          assert.ok(deps.every((d) => d.spec.template.spec.runtimeClassName === "nvidia"));
          break;
        case "preStop sleep action":
          assert.equal(c0.lifecycle.preStop.sleep.seconds, 20);
          assert.equal(spec0.terminationGracePeriodSeconds, 20 + 30 + 15);
          break;
        case "model hostPath":
          assert.equal(spec0.volumes.find((v) => v.name === "models").hostPath.path, "/var/lib/qshard/models");
          assert.ok(!kinds.includes("PersistentVolumeClaim"));
          break;
        case "model in image":
          assert.ok(!spec0.volumes.some((v) => v.name === "models"));
          assert.ok(!kinds.includes("PersistentVolumeClaim"));
          break;
        case "model existing claim":
          assert.ok(!kinds.includes("PersistentVolumeClaim"));
          assert.equal(spec0.volumes.find((v) => v.name === "models").persistentVolumeClaim.claimName, "models");
          break;
        case "model init container": {
          const ic = spec0.initContainers[0];
          assert.equal(ic.image, "busybox:1.36");
          assert.ok(ic.env.some((e) => e.name === "MODEL_PATH" && e.value === argValue(c0.args, "model")));
          assert.ok(!ic.volumeMounts.find((m) => m.name === "models").readOnly);
          break;
        }
        case "service account off":
          assert.ok(!kinds.includes("ServiceAccount"));
          assert.equal(spec0.serviceAccountName, "shared");
          break;
        case "metrics compat off, text logs":
          assert.equal(argValue(c0.args, "metrics-compat"), "none");
          assert.equal(argValue(c0.args, "log-format"), "text");
          break;
        case "custom ports":
          assert.equal(argValue(c0.args, "port"), "8001");
          assert.equal(argValue(c0.args, "metrics-port"), "8002");
          assert.equal(c0.readinessProbe.grpc.port, 8001);
          break;
        case "extra args and env":
          assert.equal(c0.args.at(-1), "--max-queue=512");
          assert.ok(c0.env.some((e) => e.name === "FOO"));
          break;
        case "MIG resource name":
          assert.equal(String(c0.resources.limits["nvidia.com/mig-3g.40gb"]), "1");
          assert.equal(c0.resources.limits[GPU], undefined);
          break;
      }
    });
  }

  test("both monitors at once is refused", async () => {
    await assert.rejects(render({ values: [{ monitoring: { serviceMonitor: { enabled: true }, podMonitor: { enabled: true } } }] }),
      /not both/);
  });
  test("duplicate profile names are refused", async () => {
    const v = defaultValues();
    v.gpuProfiles[1].name = "hopper";
    await assert.rejects(render({ values: [v] }), /used twice/);
  });
  test("no enabled profile is refused", async () => {
    await assert.rejects(render({ values: [onlyProfiles()] }), /enable at least one profile/);
  });
  test("pvc source without a claim is refused", async () => {
    await assert.rejects(render({ values: [{ model: { pvc: { create: false } } }] }), /existingClaim/);
  });
  test("a profile's server keys override the shared ones, zero included", async () => {
    const v = defaultValues();
    profileByName(v, "hopper").server.grpcMaxConnectionAgeSeconds = 0;
    profileByName(v, "hopper").server.maxNumSeqs = 256;
    const deps = ofKind(await render({ values: [v] }), "Deployment");
    const h = container(deps.find((d) => profileOf(d) === "hopper"));
    const a = container(deps.find((d) => profileOf(d) === "ampere"));
    assert.equal(argValue(h.args, "grpc-max-connection-age"), "0");
    assert.equal(argValue(h.args, "max-num-seqs"), "256");
    assert.equal(argValue(a.args, "max-num-seqs"), "64");
  });
  test("replicas: 1 when a profile omits it, 0 kept", async () => {
    const v = defaultValues();
    delete profileByName(v, "hopper").replicas;
    profileByName(v, "ampere").replicas = 0;
    const deps = ofKind(await render({ values: [v] }), "Deployment");
    assert.equal(deps.find((d) => profileOf(d) === "hopper").spec.replicas, 1);
    assert.equal(deps.find((d) => profileOf(d) === "ampere").spec.replicas, 0);
  });
  test("startup probe failureThreshold is sized from modelLoadSeconds", async () => {
    const v = defaultValues();
    profileByName(v, "hopper").modelLoadSeconds = 1234;
    const d = ofKind(await render({ values: [v] }), "Deployment").find((x) => profileOf(x) === "hopper");
    const p = container(d).startupProbe;
    assert.equal(p.failureThreshold, Math.ceil(1234 / p.periodSeconds));
  });
});

describe("NOTES.txt", () => {
  test("renders with how to reach the service and check health", async () => {
    // NOTES.txt is not part of `helm template`: render it through tpl in a copy of the chart.
    const copy = path.join(tmpDir, "notes-chart");
    fs.cpSync(CHART, copy, { recursive: true });
    fs.copyFileSync(path.join(copy, "templates/NOTES.txt"), path.join(copy, "notes.txt"));
    fs.writeFileSync(path.join(copy, "templates/zz-notes.yaml"), 'notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n');
    const objs = await render({ chart: copy, files: [MIXED_EXAMPLE] });
    const notes = objs.find((o) => typeof o.notes === "string").notes;
    assert.match(notes, /rel-qshard\.ns\.svc:50051/);
    assert.match(notes, /port-forward svc\/rel-qshard 50051:50051/);
    assert.match(notes, /qshard health --addr 127\.0\.0\.1:50051 --service qshard\.v1\.Qshard/);
    assert.match(notes, /helm test rel/);
    assert.match(notes, /rel-qshard-h100: image registry\.example\.com\/ml\/qshard:0\.1\.0-fp8/);
  });
});

describe("monitoring files", () => {
  const rulesDoc = YAML.parse(fs.readFileSync(RULES_FILE, "utf8"));
  const dashboard = JSON.parse(fs.readFileSync(DASHBOARD_FILE, "utf8"));

  test("deploy/ copies equal the chart's files (one source of truth)", () => {
    assert.equal(fs.readFileSync(path.join(REPO, "deploy/prometheus/qshard-rules.yaml"), "utf8"),
      fs.readFileSync(RULES_FILE, "utf8"), "copy helm/qshard/files/qshard-rules.yaml to deploy/prometheus/");
    assert.equal(fs.readFileSync(path.join(REPO, "deploy/grafana/qshard-dashboard.json"), "utf8"),
      fs.readFileSync(DASHBOARD_FILE, "utf8"), "copy helm/qshard/files/qshard-dashboard.json to deploy/grafana/");
  });

  test("the alerts the issue asks for are there", () => {
    const rules = rulesDoc.groups.flatMap((g) => g.rules);
    const byName = Object.fromEntries(rules.map((r) => [r.alert, r]));
    assert.match(byName.QshardKVCacheNearlyFull.expr, /qshard_kv_cache_usage_ratio.*> 0\.9/);
    assert.equal(byName.QshardKVCacheNearlyFull.for, "5m");
    assert.match(byName.QshardWaitingRequestsGrowing.expr, /deriv\(qshard_num_requests_waiting/);
    assert.match(byName.QshardHighErrorRatio.expr, /qshard_request_failure_total/);
    assert.match(byName.QshardNoPodServing.expr, /absent\(/);
    assert.match(byName.QshardPreemptions.expr, /rate\(qshard_num_preemptions_total/);
    for (const r of rules) {
      assert.ok(r.labels?.severity, `${r.alert} has a severity`);
      assert.ok(r.annotations?.summary && r.annotations?.description, `${r.alert} has summary and description`);
      for (const m of r.expr.matchAll(/(qshard_\w+|vllm:\w+)\{([^}]*)\}/g)) {
        assert.match(m[2], /job="qshard"/, `${r.alert}: every selector carries job="qshard" (the chart scopes it)`);
      }
    }
  });

  test("promtool check rules: the chart's rendered PrometheusRule", async () => {
    const objs = await render({ values: [{ monitoring: { prometheusRule: { enabled: true, disabledAlerts: ["QshardSlowTimeToFirstToken"] } } }] });
    const rule = ofKind(objs, "PrometheusRule")[0];
    const names = rule.spec.groups.flatMap((g) => g.rules).map((r) => r.alert);
    assert.ok(!names.includes("QshardSlowTimeToFirstToken"), "disabledAlerts drops an alert");
    const r = promtoolCheckRules(rule.spec);
    assert.equal(r.code, 0, r.output);
    assert.match(r.output, /SUCCESS: \d+ rules found/);
  });

  test("dashboard: panels the issue asks for, datasource variable, sidecar-ready", () => {
    const titles = dashboard.panels.map((p) => p.title);
    for (const t of ["Requests running / waiting", "KV cache usage", "Time to first token", "Inter-token latency",
      "End-to-end request latency", "Token throughput", "Preemptions / s", "Prefix cache hit rate",
      "Finish reasons and errors", "Quantized kernel per pod"]) {
      assert.ok(titles.includes(t), `panel ${t}`);
    }
    const kernel = dashboard.panels.find((p) => p.title === "Quantized kernel per pod");
    assert.equal(kernel.type, "table");
    assert.match(kernel.targets[0].expr, /qshard_quant_kernel_info/);
    assert.match(kernel.targets[0].expr, /method, kernel, device/);
    assert.ok(dashboard.templating.list.some((v) => v.type === "datasource" && v.query === "prometheus"));
    assert.ok(!JSON.stringify(dashboard).includes("${DS_"), "no import-time inputs (the sidecar does not resolve them)");
    const ids = dashboard.panels.map((p) => p.id);
    assert.equal(new Set(ids).size, ids.length, "unique panel ids");
  });

  test("every metric in the dashboard and the alerts is one qshard documents (issue 3)", () => {
    const documented = new Set([
      "qshard_num_requests_running", "qshard_num_requests_waiting", "qshard_kv_cache_usage_ratio",
      "qshard_kv_cache_blocks", "qshard_kv_cache_info", "qshard_quant_kernel_info", "qshard_prompt_tokens_total",
      "qshard_generation_tokens_total", "qshard_request_success_total", "qshard_request_failure_total",
      "qshard_num_preemptions_total", "qshard_prefix_cache_queries_total", "qshard_prefix_cache_hits_total",
      "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:cache_config_info",
    ]);
    const histograms = ["qshard_time_to_first_token_seconds", "qshard_inter_token_latency_seconds",
      "qshard_e2e_request_latency_seconds", "qshard_request_queue_time_seconds"];
    for (const h of histograms) for (const s of ["_bucket", "_sum", "_count"]) documented.add(h + s);
    const queries = [...dashboardQueries(dashboard), ...ruleQueries(rulesDoc)];
    assert.ok(queries.length > 20);
    const used = new Set();
    for (const q of queries) {
      const names = metricNamesInPromQL(q.expr);
      assert.ok(names.size > 0, `${q.where}: no metric found in ${q.expr}`);
      for (const n of names) {
        assert.ok(documented.has(n), `${q.where}: ${n} is not a qshard metric`);
        used.add(n);
      }
    }
    for (const n of ["qshard_num_requests_running", "qshard_num_requests_waiting", "qshard_kv_cache_usage_ratio",
      "qshard_time_to_first_token_seconds_bucket", "qshard_inter_token_latency_seconds_bucket",
      "qshard_e2e_request_latency_seconds_bucket", "qshard_num_preemptions_total", "qshard_prefix_cache_hits_total",
      "qshard_request_success_total", "qshard_quant_kernel_info", "qshard_generation_tokens_total"]) {
      assert.ok(used.has(n), `the dashboard or the alerts use ${n}`);
    }
  });

  test("the strict field check catches a misspelt field", async () => {
    const d = ofKind(await render(), "Deployment")[0];
    checkNoUnknownFields(d);
    d.spec.template.spec.containers[0].readinessProbe.grpc.sevice = "qshard.v1.Qshard";
    assert.throws(() => checkNoUnknownFields(d), /unknown field Deployment\.spec\.template\.spec\.containers\[0\]\.readinessProbe\.grpc\.sevice/);
  });

  test("metricNamesInPromQL", () => {
    assert.deepEqual([...metricNamesInPromQL(
      'histogram_quantile(0.9, sum by (le, pod) (rate(a_bucket{job="x", le!="1"}[5m] offset 1h))) / on(pod) group_left(kernel) b > bool 1e3 and absent(c{d="e"})',
    )].sort(), ["a_bucket", "b", "c"]);
    assert.deepEqual([...metricNamesInPromQL('sum(vllm:num_requests_waiting{namespace="$namespace"}[$__rate_interval])')], ["vllm:num_requests_waiting"]);
  });
});
