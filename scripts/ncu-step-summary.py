#!/usr/bin/env python3
"""Sums an ncu CSV report (--csv --page raw --metrics gpu__time_duration.sum) by kernel.

Reads the report on stdin and prints one markdown table row per kernel name: launches,
total microseconds, share of the step, mean microseconds per launch; largest first, then
the total. Used by scripts/device-check.sh on `qshard_cuda_bench --profile-step` (one decode
step, every kernel profiled on its own, so the durations carry no launch overlap: their sum
is larger than the step's wall time, but the shares show where the time goes).

    ncu --csv --page raw --metrics gpu__time_duration.sum ... | scripts/ncu-step-summary.py LABEL
"""
import csv
import re
import sys


def short_name(full: str) -> str:
    """`void ns::(anonymous namespace)::Kernel<0, 1>(const int *, int)` -> `Kernel<0, 1>`."""
    name = full.strip()
    if name.endswith(")"):  # drop the parameter list: back to its matching "("
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"^void ", "", name)
    # The last scope outside template arguments.
    depth, cut = 0, 0
    for i, ch in enumerate(name):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if depth == 0 and name.startswith("::", i):
            cut = i + 2
    return name[cut:] or full


def main() -> int:
    label = sys.argv[1] if len(sys.argv) > 1 else ""
    lines = [l for l in sys.stdin if l.startswith('"')]  # ncu's own messages start with ==
    rows = list(csv.reader(lines))
    if len(rows) < 3:
        print(f"{label}: no kernels in the report")
        return 1
    header = rows[0]
    try:
        name_col = header.index("Kernel Name")
        time_col = header.index("gpu__time_duration.sum")
    except ValueError:
        print(f"{label}: unexpected report columns: {header[:12]}")
        return 1
    unit = rows[1][time_col].strip().lower()  # the second row holds the units
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
    to_us = scale.get(unit, 1e-3)
    totals: dict[str, list[float]] = {}
    for r in rows[2:]:
        if len(r) <= max(name_col, time_col):
            continue
        try:
            t = float(r[time_col].replace(",", "")) * to_us
        except ValueError:
            continue
        name = short_name(r[name_col])
        totals.setdefault(name, []).append(t)
    step = sum(sum(v) for v in totals.values())
    print(f"| {label} kernel | launches | total us | share | us per launch |")
    print("|---|---|---|---|---|")
    for name, v in sorted(totals.items(), key=lambda kv: -sum(kv[1])):
        tot = sum(v)
        print(f"| {name[:60]} | {len(v)} | {tot:.1f} | {100 * tot / step:.1f}% | {tot / len(v):.2f} |")
    print(f"| all kernels | {sum(len(v) for v in totals.values())} | {step:.1f} | 100% | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
