#!/usr/bin/env python3
"""scripts/ncu-step-summary.py on hand-written ncu CSV reports: kernels summed by their
short name (namespaces, `void`, parameter lists dropped; template arguments kept), units
converted to microseconds, rows ordered by total time, ncu's own log lines ignored."""
import os
import subprocess
import sys
import unittest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "ncu-step-summary.py")


def summarize(report: str, label: str = "fp8") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, label], input=report, text=True,
                          capture_output=True, check=False)


def rows(out: str) -> dict:
    """kernel -> (launches, total us) from the markdown table."""
    result = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[1].isdigit():
            result[cells[0]] = (int(cells[1]), float(cells[2]))
    return result


class NcuStepSummaryTest(unittest.TestCase):
    def test_sums_by_short_name_in_microseconds(self):
        report = "\n".join([
            "==PROF== Connected to process 123",
            '"ID","Process ID","Kernel Name","gpu__time_duration.sum"',
            '"","","","nsecond"',
            '"0","123","void qshard::cuda::(anonymous namespace)::Gemv8Kernel<0>(const unsigned char *, int)","12,000"',
            '"1","123","void qshard::cuda::(anonymous namespace)::Gemv8Kernel<0>(const unsigned char *, int)","8000"',
            '"2","123","void ns::RmsNormKernel<__nv_bfloat16, float, 8>(const T1 *, float *)","3000"',
            '"3","123","sm90_xmma_gemm_bf16bf16_bf16f32","500"',
            "==PROF== Disconnected",
        ]) + "\n"
        done = summarize(report)
        self.assertEqual(done.returncode, 0, done.stderr)
        got = rows(done.stdout)
        self.assertEqual(got["Gemv8Kernel<0>"], (2, 20.0))
        self.assertEqual(got["RmsNormKernel<__nv_bfloat16, float, 8>"], (1, 3.0))
        self.assertEqual(got["sm90_xmma_gemm_bf16bf16_bf16f32"], (1, 0.5))
        self.assertEqual(got["all kernels"][0], 4)
        self.assertAlmostEqual(got["all kernels"][1], 23.5)
        # Largest first.
        order = [k for k in got if k != "all kernels"]
        self.assertEqual(order[0], "Gemv8Kernel<0>")

    def test_microsecond_units(self):
        report = ('"ID","Kernel Name","gpu__time_duration.sum"\n"","","usecond"\n'
                  '"0","A","1.5"\n"1","B","2.5"\n')
        got = rows(summarize(report).stdout)
        self.assertEqual(got["A"], (1, 1.5))
        self.assertEqual(got["B"], (1, 2.5))

    def test_empty_or_unexpected_report_fails(self):
        self.assertNotEqual(summarize("==PROF== no kernels were profiled\n").returncode, 0)
        bad = '"ID","Name","time"\n"","",""\n"0","A","1"\n'
        done = summarize(bad)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("unexpected report columns", done.stdout)


if __name__ == "__main__":
    unittest.main()
