"""A real Prometheus server, started on loopback, scrapes qshard; its HTTP query API then
returns qshard_kv_cache_usage_ratio and vllm:num_requests_waiting. Bounded: gives up after
60 s.

usage: prometheus_scrape_test.py QSHARD MODEL_DIR PROMETHEUS"""

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qshard_e2e as e2e  # noqa: E402

QUERIES = ["qshard_kv_cache_usage_ratio", "vllm:num_requests_waiting",
           "qshard_quant_kernel_info"]


def query(port, expr):
    url = "http://127.0.0.1:%d/api/v1/query?%s" % (port, urllib.parse.urlencode({"query": expr}))
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read().decode())
    except (OSError, ValueError):
        return []
    return body.get("data", {}).get("result", []) if body.get("status") == "success" else []


def main():
    qshard, model, prometheus = sys.argv[1:4]
    if not os.path.exists(prometheus):
        print("SKIP: prometheus not found")
        sys.exit(e2e.SKIP)
    work = e2e.temp_dir("qshard-prometheus-")
    with e2e.Server(qshard, model) as server:
        config = os.path.join(work, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: qshard\n    static_configs:\n"
                    "      - targets: ['127.0.0.1:%d']\n" % server.metrics_port)
        port = e2e.free_port()
        prom = subprocess.Popen(
            [prometheus, "--config.file=" + config, "--storage.tsdb.path=" + work + "/data",
             "--web.listen-address=127.0.0.1:%d" % port, "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            missing = QUERIES
            while missing and time.monotonic() < deadline:
                if prom.poll() is not None:
                    e2e.fail("prometheus exited: " + prom.stderr.read())
                missing = [q for q in QUERIES if not query(port, q)]
                time.sleep(0.5)
            if missing:
                e2e.fail("no samples for %s within 60 s" % missing)
            ratio = float(query(port, "qshard_kv_cache_usage_ratio")[0]["value"][1])
            if not 0.0 <= ratio <= 1.0:
                e2e.fail("qshard_kv_cache_usage_ratio = %s" % ratio)
            waiting = query(port, "vllm:num_requests_waiting")[0]
            if waiting["metric"].get("job") != "qshard":
                e2e.fail("unexpected series %s" % waiting)
        finally:
            prom.terminate()
            try:
                prom.wait(timeout=10)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait()
        if server.stop() != 0:
            e2e.fail("qshard serve did not exit 0")
    print("OK: prometheus scraped qshard")


if __name__ == "__main__":
    main()
