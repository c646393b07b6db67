"""Outcomes of upstream's unit tests from pytest's JUnit XML, without and with a patch series.

    python upstream_test_report.py pristine.xml [patched.xml] [--reasons]

Prints passed / skipped / failed / error counts per test file (and the total)
for each run. With two runs, lists every test that passed without the series
and does not pass with it, and exits 1 if there is one (the series may add
tests, and may turn failures into passes, but must not break a passing test).
``--reasons`` groups the tests that did not pass by the first line of their
failure message (why they cannot run here).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import xml.etree.ElementTree as ET

OUTCOMES = ("passed", "skipped", "failed", "error")


def outcomes(path: str) -> dict[str, tuple[str, str]]:
    """``{test id: (outcome, first line of the message)}`` of one JUnit XML report."""
    result = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                text = child.get("message") or child.text or ""
                message = text.strip().splitlines()[0] if text.strip() else ""
                if child.tag != "skipped":
                    break  # a failed test can also carry a skip-like child; failure wins
        result[test_id] = (outcome, message)
    return result


def _file_of(test_id: str) -> str:
    module = test_id.split("::")[0]
    # classname is module[.Class]: keep the module path.
    parts = module.split(".")
    while parts and parts[-1][:1].isupper():
        parts.pop()
    return "/".join(parts) + ".py"


def table(runs: dict[str, dict[str, tuple[str, str]]]) -> str:
    files = sorted({_file_of(t) for run in runs.values() for t in run})
    header = "| test file | " + " | ".join(f"{name} (pass / skip / fail / error)" for name in runs) + " |"
    lines = [header, "|---|" + "---|" * len(runs)]
    totals = {name: collections.Counter() for name in runs}
    for file in files:
        cells = []
        for name, run in runs.items():
            counts = collections.Counter(o for t, (o, _) in run.items() if _file_of(t) == file)
            totals[name].update(counts)
            cells.append(" / ".join(str(counts[o]) for o in OUTCOMES))
        lines.append(f"| `{file}` | " + " | ".join(cells) + " |")
    lines.append(
        "| **total** | "
        + " | ".join("**" + " / ".join(str(totals[n][o]) for o in OUTCOMES) + "**" for n in runs)
        + " |"
    )
    return "\n".join(lines)


def reasons(run: dict[str, tuple[str, str]]) -> str:
    groups = collections.defaultdict(list)
    for test_id, (outcome, message) in run.items():
        if outcome in ("failed", "error"):
            # Numbers (ranks, sizes, addresses) vary between otherwise equal messages.
            key = re.sub(r"0x[0-9a-f]+", "0x…", message)[:160]
            groups[key].append(test_id)
    lines = []
    for message, tests in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"{len(tests):4d}  {message}")
        for test_id in sorted(tests)[:3]:
            lines.append(f"        {test_id}")
        if len(tests) > 3:
            lines.append(f"        ... and {len(tests) - 3} more")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pristine", help="JUnit XML of the run without the series (or of one run)")
    parser.add_argument("patched", nargs="?", help="JUnit XML of the run with the series")
    parser.add_argument("--reasons", action="store_true")
    args = parser.parse_args()
    if args.patched:
        runs = {"without the series": outcomes(args.pristine), "with the series": outcomes(args.patched)}
    else:
        runs = {"outcomes": outcomes(args.pristine)}
    print(table(runs))
    if args.reasons:
        for name, run in runs.items():
            print(f"\nNot passing {name}, by first line of the message:")
            print(reasons(run))
    if not args.patched:
        return 0
    before, after = runs["without the series"], runs["with the series"]
    missing = ("missing", "")
    broken = sorted(t for t, (o, _) in before.items() if o == "passed" and after.get(t, missing)[0] != "passed")
    fixed = sorted(
        t for t, (o, _) in after.items() if o == "passed" and before.get(t, missing)[0] not in ("passed", "missing")
    )
    print(f"\npassed without the series and not with it: {len(broken)}")
    for test_id in broken:
        print(f"  {test_id}: {after.get(test_id, missing)}")
    if fixed:
        print(f"did not pass without the series and pass with it: {len(fixed)}")
        for test_id in fixed:
            print(f"  {test_id}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
