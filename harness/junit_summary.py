"""Counts from pytest's JUnit reports, one host each.

    python -m harness.junit_summary REPORT.xml          # '251 passed, 0 failed, 2 skipped'
    python -m harness.junit_summary --total A.xml B.xml # 'total: 502 passed, 0 failed, 4 skipped'
"""
import sys
import xml.etree.ElementTree as ET


def counts(path):
    suites = ET.parse(path).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    tests = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return tests - failed - skipped, failed, skipped


def line(passed, failed, skipped):
    return f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else "")


def main(argv):
    total = argv[:1] == ["--total"]
    paths = argv[1:] if total else argv
    found = []
    for path in paths:
        try:
            found.append(counts(path))
        except (OSError, ET.ParseError):
            found.append((0, 1, 0))  # no report: the run broke before pytest wrote one
    sums = [sum(c[i] for c in found) for i in range(3)]
    print(("total: " if total else "") + line(*sums))


if __name__ == "__main__":
    main(sys.argv[1:])
