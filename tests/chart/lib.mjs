// Shared helpers of the chart tests: run helm, parse what it renders, validate objects
// against the Kubernetes / prometheus-operator schemas, evaluate node affinity, and pull
// metric names out of PromQL.
import { execFile, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { fileURLToPath } from "node:url";
import YAML from "yaml";

import { ConfigMap } from "kubernetes-models/v1/ConfigMap";
import { PersistentVolumeClaim } from "kubernetes-models/v1/PersistentVolumeClaim";
import { Pod } from "kubernetes-models/v1/Pod";
import { Service } from "kubernetes-models/v1/Service";
import { ServiceAccount } from "kubernetes-models/v1/ServiceAccount";
import { Deployment } from "kubernetes-models/apps/v1/Deployment";
import { HorizontalPodAutoscaler } from "kubernetes-models/autoscaling/v2/HorizontalPodAutoscaler";
import { PodDisruptionBudget } from "kubernetes-models/policy/v1/PodDisruptionBudget";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const execFileP = promisify(execFile);

export const TEST_DIR = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(TEST_DIR, "../..");
export const CHART = path.join(REPO, "helm/qshard");
export const HELM = process.env.HELM || path.join(TEST_DIR, ".bin/helm");
export const PROMTOOL = process.env.PROMTOOL || "promtool";
export const RULES_FILE = path.join(CHART, "files/qshard-rules.yaml");
export const DASHBOARD_FILE = path.join(CHART, "files/qshard-dashboard.json");
export const MIXED_EXAMPLE = path.join(REPO, "deploy/examples/mixed-h100-a100.yaml");

if (!fs.existsSync(HELM)) {
  throw new Error(`helm not found at ${HELM}: run scripts/setup.sh (scripts/setup.d/chart.sh)`);
}

export const tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), "qshard-chart-"));
process.on("exit", () => fs.rmSync(tmpDir, { recursive: true, force: true }));
let tmpCount = 0;

// Writes `values` (an object) to a temporary values file and returns its path.
export function valuesFile(values) {
  const file = path.join(tmpDir, `values-${++tmpCount}.yaml`);
  fs.writeFileSync(file, YAML.stringify(values));
  return file;
}

// The chart's values.yaml as an object (a fresh copy each call).
export function defaultValues() {
  return YAML.parse(fs.readFileSync(path.join(CHART, "values.yaml"), "utf8"));
}

export function profileByName(values, name) {
  const p = values.gpuProfiles.find((x) => x.name === name);
  if (!p) throw new Error(`no profile ${name}`);
  return p;
}

// Runs helm; resolves { code, stdout, stderr } (never rejects on a non-zero exit).
export async function helm(args) {
  try {
    const { stdout, stderr } = await execFileP(HELM, args, { maxBuffer: 64 << 20 });
    return { code: 0, stdout, stderr };
  } catch (e) {
    if (typeof e.code !== "number") throw e;
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

// helm template with optional values objects / files / --set pairs; returns the parsed
// objects (hooks and tests included). Throws with helm's message when rendering fails.
export async function render({ values = [], files = [], set = [], release = "rel", namespace = "ns", chart = CHART } = {}) {
  const args = ["template", release, chart, "--namespace", namespace];
  for (const f of files) args.push("-f", f);
  for (const v of values) args.push("-f", valuesFile(v));
  for (const s of set) args.push("--set", s);
  const r = await helm(args);
  if (r.code !== 0) throw new Error(`helm ${args.join(" ")} failed:\n${r.stderr}`);
  return YAML.parseAllDocuments(r.stdout)
    .map((d) => {
      if (d.errors.length) throw new Error(`rendered YAML does not parse: ${d.errors[0].message}`);
      return d.toJS();
    })
    .filter((o) => o && typeof o === "object");
}

export const ofKind = (objs, kind) => objs.filter((o) => o.kind === kind);

// ---------------------------------------------------------------------------------------
// Schema validation.
const MODELS = {
  "v1/ConfigMap": ConfigMap,
  "v1/PersistentVolumeClaim": PersistentVolumeClaim,
  "v1/Pod": Pod,
  "v1/Service": Service,
  "v1/ServiceAccount": ServiceAccount,
  "apps/v1/Deployment": Deployment,
  "autoscaling/v2/HorizontalPodAutoscaler": HorizontalPodAutoscaler,
  "policy/v1/PodDisruptionBudget": PodDisruptionBudget,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1/PodMonitor": PodMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
};

const DNS_SUBDOMAIN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
const LABEL_VALUE = /^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$/;

function checkMeta(obj) {
  const m = obj.metadata || {};
  if (!m.name || !DNS_SUBDOMAIN.test(m.name) || m.name.length > 253) {
    throw new Error(`${obj.kind}: bad metadata.name ${m.name}`);
  }
  // Services and the objects named after Deployments must be DNS labels.
  if (["Service", "Deployment"].includes(obj.kind) && (!DNS_LABEL.test(m.name) || m.name.length > 63)) {
    throw new Error(`${obj.kind}: metadata.name ${m.name} is not a DNS label`);
  }
  for (const [k, v] of Object.entries(m.labels || {})) {
    if (typeof v !== "string" || v.length > 63 || !LABEL_VALUE.test(v)) {
      throw new Error(`${obj.kind}/${m.name}: label ${k}=${v} is not a valid label value`);
    }
  }
}

// KEDA's CRDs are not in @kubernetes-models: check the ScaledObject's shape by hand
// (keda.sh/v1alpha1, as in KEDA's CRD: scaleTargetRef.name, integer replica counts,
// triggers with type and string metadata).
function validateScaledObject(o) {
  const s = o.spec;
  const fail = (msg) => {
    throw new Error(`ScaledObject/${o.metadata?.name}: ${msg}`);
  };
  if (!s || typeof s !== "object") fail("no spec");
  const known = new Set([
    "scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod",
    "idleReplicaCount", "initialCooldownPeriod", "fallback", "advanced", "triggers",
  ]);
  for (const k of Object.keys(s)) if (!known.has(k)) fail(`unknown field spec.${k}`);
  if (typeof s.scaleTargetRef?.name !== "string" || !s.scaleTargetRef.name) fail("spec.scaleTargetRef.name missing");
  for (const k of ["minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"]) {
    if (k in s && !(Number.isInteger(s[k]) && s[k] >= 0)) fail(`spec.${k} must be a non-negative integer`);
  }
  if (s.minReplicaCount > s.maxReplicaCount) fail("minReplicaCount > maxReplicaCount");
  if (!Array.isArray(s.triggers) || s.triggers.length === 0) fail("spec.triggers must be a non-empty list");
  for (const t of s.triggers) {
    if (typeof t.type !== "string" || !t.type) fail("trigger without type");
    for (const [k, v] of Object.entries(t.metadata || {})) {
      if (typeof v !== "string") fail(`trigger metadata ${k} must be a string`);
    }
    if (t.type === "prometheus") {
      for (const k of ["serverAddress", "query", "threshold"]) {
        if (!t.metadata?.[k]) fail(`prometheus trigger needs metadata.${k}`);
      }
    }
  }
}

// The models' validate() follows the Kubernetes OpenAPI schema, which allows unknown
// fields (the API server would drop them, or reject them under strict field validation).
// To catch a misspelt or misplaced field, walk the object along the models' TypeScript
// declarations (.d.ts: one interface per API type, imports naming the field types).
const NODE_MODULES = path.join(TEST_DIR, "node_modules");
const DTS = {
  "v1/ConfigMap": "kubernetes-models/v1/ConfigMap.d.ts",
  "v1/PersistentVolumeClaim": "kubernetes-models/v1/PersistentVolumeClaim.d.ts",
  "v1/Pod": "kubernetes-models/v1/Pod.d.ts",
  "v1/Service": "kubernetes-models/v1/Service.d.ts",
  "v1/ServiceAccount": "kubernetes-models/v1/ServiceAccount.d.ts",
  "apps/v1/Deployment": "kubernetes-models/apps/v1/Deployment.d.ts",
  "autoscaling/v2/HorizontalPodAutoscaler": "kubernetes-models/autoscaling/v2/HorizontalPodAutoscaler.d.ts",
  "policy/v1/PodDisruptionBudget": "kubernetes-models/policy/v1/PodDisruptionBudget.d.ts",
  "monitoring.coreos.com/v1/ServiceMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor.d.ts",
  "monitoring.coreos.com/v1/PodMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor.d.ts",
  "monitoring.coreos.com/v1/PrometheusRule": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule.d.ts",
};
const dtsCache = new Map();

// Splits "a; b: { c; }; d" at top-level semicolons.
function splitTopLevel(text) {
  const out = [];
  let depth = 0;
  let cur = "";
  for (const ch of text) {
    if (ch === "{" || ch === "<" || ch === "(") depth++;
    if (ch === "}" || ch === ">" || ch === ")") depth--;
    if (ch === ";" && depth === 0) {
      if (cur.trim()) out.push(cur.trim());
      cur = "";
    } else cur += ch;
  }
  if (cur.trim()) out.push(cur.trim());
  return out;
}

// An object type body ("\"a\"?: T; ...") -> Map(field -> type text), or {map: T}.
function parseObjectType(body) {
  const parts = splitTopLevel(body);
  if (parts.length === 1 && /^\[key: string\]:/.test(parts[0])) return { map: parts[0].replace(/^\[key: string\]:\s*/, "") };
  const fields = new Map();
  for (const p of parts) {
    const m = /^"([^"]+)"\??:\s*([\s\S]+)$/.exec(p);
    if (m) fields.set(m[1], m[2].trim());
  }
  return { fields };
}

function parseDts(file) {
  if (dtsCache.has(file)) return dtsCache.get(file);
  let info = null;
  if (fs.existsSync(file)) {
    const text = fs.readFileSync(file, "utf8").replace(/\/\*[\s\S]*?\*\//g, "");
    const imports = new Map();
    for (const m of text.matchAll(/import \{([^}]*)\} from "([^"]+)";/g)) {
      let target = m[2].replace(/\.js$/, "");
      target = target.startsWith(".") ? path.resolve(path.dirname(file), target) : path.join(NODE_MODULES, target);
      for (const name of m[1].split(",").map((x) => x.trim()).filter(Boolean)) {
        const [orig, alias] = name.split(/\s+as\s+/);
        imports.set(alias || orig, `${target}.d.ts`);
      }
    }
    const start = /export interface I\w+(?: extends [\w, ]+)? \{/.exec(text);
    if (start) {
      let depth = 0;
      let i = start.index + start[0].length - 1;
      const from = i + 1;
      for (; i < text.length; i++) {
        if (text[i] === "{") depth++;
        else if (text[i] === "}" && --depth === 0) break;
      }
      info = { type: parseObjectType(text.slice(from, i)), imports };
    }
  }
  dtsCache.set(file, info);
  return info;
}

function checkFields(value, typeText, imports, where) {
  if (value === null || typeof value !== "object") return;
  typeText = typeText.trim();
  const arr = /^Array<([\s\S]+)>$/.exec(typeText);
  if (arr) {
    if (Array.isArray(value)) value.forEach((v, i) => checkFields(v, arr[1], imports, `${where}[${i}]`));
    return;
  }
  if (typeText.startsWith("{")) return checkObject(value, parseObjectType(typeText.slice(1, -1)), imports, where);
  if (/^I\w+$/.test(typeText) && imports.has(typeText)) {
    const info = parseDts(imports.get(typeText));
    if (info) checkObject(value, info.type, info.imports, where);
  }
}

function checkObject(value, type, imports, where) {
  if (Array.isArray(value)) return;
  if (type.map) {
    for (const [k, v] of Object.entries(value)) checkFields(v, type.map, imports, `${where}.${k}`);
    return;
  }
  for (const [k, v] of Object.entries(value)) {
    if (!type.fields.has(k)) throw new Error(`unknown field ${where}.${k}`);
    checkFields(v, type.fields.get(k), imports, `${where}.${k}`);
  }
}

export function checkNoUnknownFields(obj) {
  const rel = DTS[`${obj.apiVersion}/${obj.kind}`];
  if (!rel) throw new Error(`no declarations for ${obj.apiVersion} ${obj.kind}`);
  const info = parseDts(path.join(NODE_MODULES, rel));
  if (!info) throw new Error(`cannot read ${rel}`);
  checkObject(obj, info.type, info.imports, obj.kind);
}

// Validates one rendered object; throws on the first problem.
export function validateObject(obj) {
  checkMeta(obj);
  const group = obj.apiVersion;
  if (group === "keda.sh/v1alpha1" && obj.kind === "ScaledObject") return validateScaledObject(obj);
  const Model = MODELS[`${group}/${obj.kind}`];
  if (!Model) throw new Error(`no schema for ${group} ${obj.kind}: add it to tests/chart/lib.mjs`);
  new Model(obj).validate();
  checkNoUnknownFields(obj);
}

// ---------------------------------------------------------------------------------------
// Node affinity: does a node with `labels` satisfy a pod spec's required node affinity and
// nodeSelector? (Kubernetes semantics: terms ORed, expressions within a term ANDed.)
function requirementMatches(req, labels) {
  const has = Object.prototype.hasOwnProperty.call(labels, req.key);
  const v = labels[req.key];
  switch (req.operator) {
    case "In":
      return has && req.values.includes(v);
    case "NotIn":
      return !has || !req.values.includes(v);
    case "Exists":
      return has;
    case "DoesNotExist":
      return !has;
    case "Gt":
    case "Lt": {
      if (!has || req.values.length !== 1) return false;
      const a = Number.parseInt(v, 10);
      const b = Number.parseInt(req.values[0], 10);
      if (Number.isNaN(a) || Number.isNaN(b)) return false;
      return req.operator === "Gt" ? a > b : a < b;
    }
    default:
      throw new Error(`unknown operator ${req.operator}`);
  }
}

export function podSpecMatchesNode(podSpec, labels) {
  for (const [k, v] of Object.entries(podSpec.nodeSelector || {})) {
    if (labels[k] !== v) return false;
  }
  const terms = podSpec.affinity?.nodeAffinity?.requiredDuringSchedulingIgnoredDuringExecution?.nodeSelectorTerms;
  if (!terms || terms.length === 0) return true;
  return terms.some((t) => (t.matchExpressions || []).every((r) => requirementMatches(r, labels)));
}

// GPU Feature Discovery labels of sample nodes.
export const SAMPLE_NODES = {
  H100: { "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.compute.major": "9", "nvidia.com/gpu.compute.minor": "0", "nvidia.com/gpu.family": "hopper" },
  H200: { "nvidia.com/gpu.product": "NVIDIA-H200", "nvidia.com/gpu.compute.major": "9", "nvidia.com/gpu.compute.minor": "0", "nvidia.com/gpu.family": "hopper" },
  GH200: { "nvidia.com/gpu.product": "NVIDIA-GH200-480GB", "nvidia.com/gpu.compute.major": "9", "nvidia.com/gpu.compute.minor": "0", "nvidia.com/gpu.family": "hopper" },
  B200: { "nvidia.com/gpu.product": "NVIDIA-B200", "nvidia.com/gpu.compute.major": "10", "nvidia.com/gpu.compute.minor": "0", "nvidia.com/gpu.family": "blackwell" },
  A100: { "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "nvidia.com/gpu.compute.major": "8", "nvidia.com/gpu.compute.minor": "0", "nvidia.com/gpu.family": "ampere" },
  A10G: { "nvidia.com/gpu.product": "NVIDIA-A10G", "nvidia.com/gpu.compute.major": "8", "nvidia.com/gpu.compute.minor": "6", "nvidia.com/gpu.family": "ampere" },
  L4: { "nvidia.com/gpu.product": "NVIDIA-L4", "nvidia.com/gpu.compute.major": "8", "nvidia.com/gpu.compute.minor": "9", "nvidia.com/gpu.family": "ampere" },
  T4: { "nvidia.com/gpu.product": "Tesla-T4", "nvidia.com/gpu.compute.major": "7", "nvidia.com/gpu.compute.minor": "5", "nvidia.com/gpu.family": "turing" },
  "no-GPU": { "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64" },
};

// ---------------------------------------------------------------------------------------
// Metric names used by a PromQL expression: every identifier that is not a function,
// keyword, label name, duration or string. (Enough PromQL for our rules and dashboard.)
const PROMQL_KEYWORDS = new Set([
  "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
  "bool", "offset", "atan2", "inf", "nan",
]);

export function metricNamesInPromQL(expr) {
  let s = expr
    .replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`/g, '""') // strings
    .replace(/\{[^}]*\}/g, " ") // label matchers
    .replace(/\[[^\]]*\]/g, " ") // ranges and subqueries
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, " ") // label lists
    .replace(/\$\{?\w+\}?/g, " "); // Grafana variables outside strings
  const names = new Set();
  const re = /[A-Za-z_:][A-Za-z0-9_:]*/g;
  let m;
  while ((m = re.exec(s))) {
    const word = m[0];
    const before = s.slice(0, m.index);
    const after = s.slice(m.index + word.length);
    if (/^\s*\(/.test(after)) continue; // function call or aggregation
    if (PROMQL_KEYWORDS.has(word.toLowerCase())) continue;
    if (/[0-9.]$/.test(before) || /^[0-9]/.test(word)) continue; // durations/numbers (5m, 1e3)
    names.add(word);
  }
  return names;
}

// Queries of a Grafana dashboard: panel targets and template-variable queries.
export function dashboardQueries(dash) {
  const out = [];
  const walk = (panels) => {
    for (const p of panels || []) {
      for (const t of p.targets || []) if (t.expr) out.push({ where: `panel "${p.title}"`, expr: t.expr });
      walk(p.panels);
    }
  };
  walk(dash.panels);
  for (const v of dash.templating?.list || []) {
    if (v.type !== "query") continue;
    const q = typeof v.query === "string" ? v.query : v.query?.query;
    // label_values(<selector>, label) / query_result(<expr>)
    const m = /^\s*(?:label_values|query_result)\((.*)\)\s*$/.exec(q || "");
    if (m) {
      const inner = m[1].replace(/,\s*\w+\s*$/, "");
      out.push({ where: `variable $${v.name}`, expr: inner });
    }
  }
  return out;
}

// Alert and recording rule expressions of a Prometheus rules document.
export function ruleQueries(rulesDoc) {
  const out = [];
  for (const g of rulesDoc.groups || []) {
    for (const r of g.rules || []) out.push({ where: `rule ${r.alert || r.record}`, expr: r.expr });
  }
  return out;
}

// Runs promtool check rules on a rules document (an object) and returns its output.
export function promtoolCheckRules(doc) {
  const file = path.join(tmpDir, `rules-${++tmpCount}.yaml`);
  fs.writeFileSync(file, YAML.stringify(doc));
  const r = spawnSync(PROMTOOL, ["check", "rules", file], { encoding: "utf8" });
  if (r.error) throw r.error;
  return { code: r.status, output: r.stdout + r.stderr };
}
