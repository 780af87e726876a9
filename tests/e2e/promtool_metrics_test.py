"""A scrape after a `qshard loadgen` run passes `promtool check metrics` with no finding but
the note that the vllm: compatibility names contain a colon, and the counters agree with
the run: success + failure == requests sent, generation tokens == tokens returned.

usage: promtool_metrics_test.py QSHARD MODEL_DIR PROMTOOL"""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qshard_e2e as e2e  # noqa: E402

REQUESTS, MAX_TOKENS = 12, 8


def main():
    qshard, model, promtool = sys.argv[1:4]
    if not os.path.exists(promtool):
        print("SKIP: promtool not found")
        sys.exit(e2e.SKIP)
    with e2e.Server(qshard, model) as server:
        run = subprocess.run(
            [qshard, "loadgen", "--addr", server.address, "--concurrency", "4", "--requests",
             str(REQUESTS), "--prompt-tokens", "16", "--max-tokens", str(MAX_TOKENS),
             "--format", "json", "--timeout-s", "60"],
            capture_output=True, text=True, timeout=90)
        if run.returncode != 0:
            e2e.fail("loadgen: %s" % run.stderr)
        report = json.loads(run.stdout)
        if report["succeeded"] != REQUESTS or report["errors"]:
            e2e.fail("loadgen report: %s" % report)
        text = server.scrape()

        check = subprocess.run([promtool, "check", "metrics"], input=text,
                               capture_output=True, text=True, timeout=30)
        findings = [l for l in (check.stdout + check.stderr).splitlines() if l.strip()]
        unexpected = [l for l in findings
                      if not (l.startswith("vllm:") and "should not contain ':'" in l)]
        if unexpected:
            e2e.fail("promtool findings:\n" + "\n".join(unexpected))
        if check.returncode not in (0, 3):  # 3: lint findings (the colon notes) only
            e2e.fail("promtool exit %d: %s" % (check.returncode, check.stderr))

        success = sum(e2e.metric_values(text, "qshard_request_success_total").values())
        failure = sum(e2e.metric_values(text, "qshard_request_failure_total").values())
        if success + failure != REQUESTS:
            e2e.fail("success %s + failure %s != %d requests" % (success, failure, REQUESTS))
        generated = e2e.metric_values(text, "qshard_generation_tokens_total")[""]
        if generated != report["output_tokens"] or generated != REQUESTS * MAX_TOKENS:
            e2e.fail("generation tokens %s, loadgen saw %s" % (generated, report["output_tokens"]))
        e2e_count = e2e.metric_values(text, "qshard_e2e_request_latency_seconds_count")[""]
        if e2e_count != REQUESTS:
            e2e.fail("e2e latency count %s" % e2e_count)
        code = server.stop()
        if code != 0:
            e2e.fail("exit code %d" % code)
    print("OK: promtool check metrics (%d colon notes)" % len(findings))


if __name__ == "__main__":
    main()
