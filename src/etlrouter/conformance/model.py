"""Check results and what is made of them: the exit code, the text lines, JUnit XML (pure: no I/O)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from xml.etree import ElementTree as ET

import msgspec


class Status(enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    WARN = "WARN"  # the service works, but something is doubtful or could not be checked; never fails a run
    SKIP = "SKIP"  # not applicable (a capability not claimed) or impossible after an earlier failure


class Result(msgspec.Struct, frozen=True, kw_only=True):
    """One check: its id (`source.rewind`), the outcome, and what was expected against what came back."""

    check: str
    status: Status
    expected: str = ""
    got: str = ""
    required: bool = True  # a FAIL of a check that is not required is reported, and the run still passes

    @property
    def kind(self) -> str:
        return self.check.split(".", 1)[0] if "." in self.check else "common"


def ok(check: str, expected: str, got: str = "as expected") -> Result:
    return Result(check=check, status=Status.PASS, expected=expected, got=got)


def fail(check: str, expected: str, got: str) -> Result:
    return Result(check=check, status=Status.FAIL, expected=expected, got=got)


def warn(check: str, expected: str, got: str) -> Result:
    return Result(check=check, status=Status.WARN, expected=expected, got=got)


def skip(check: str, why: str) -> Result:
    return Result(check=check, status=Status.SKIP, got=why)


def verdict(problems: Sequence[str], check: str, expected: str, got: str = "as expected") -> Result:
    """PASS when no problem was found, else FAIL naming the first problems."""
    if not problems:
        return ok(check, expected, got)
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return fail(check, expected, "; ".join(problems[:3]) + more)


class Report(msgspec.Struct, kw_only=True):
    address: str
    kinds: list[str] = []
    results: list[Result] = []

    def add(self, result: Result) -> Result:
        self.results.append(result)
        return result

    def failed(self) -> list[Result]:
        return [r for r in self.results if r.status is Status.FAIL and r.required]

    @property
    def exit_code(self) -> int:
        """0 only when every required check passed (WARN and SKIP do not fail a run); 1 otherwise."""
        return 1 if self.failed() or not self.results else 0

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for r in self.results:
            out[r.status.value] += 1
        return out


def format_line(result: Result) -> str:
    width = 24
    text = f"{result.status.value:<4}  {result.check:<{width}}"
    if result.status is Status.SKIP:
        return f"{text}  {result.got}"
    if result.status is Status.PASS:
        return f"{text}  {result.expected}" + (f" ({result.got})" if result.got != "as expected" else "")
    suffix = "" if result.required else "  [not required]"
    return f"{text}  expected: {result.expected}; got: {result.got}{suffix}"


def format_report(report: Report) -> list[str]:
    kinds = ", ".join(report.kinds) or "no etlrouter.v1 service found"
    lines = [f"etlrouter conformance {report.address}: {kinds}"]
    lines += [format_line(r) for r in report.results]
    counts = report.counts()
    summary = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    lines.append(f"{'conformant' if report.exit_code == 0 else 'NOT conformant'}: {summary}")
    return lines


def junit_xml(report: Report) -> bytes:
    """JUnit XML for CI: one testcase per check; FAIL -> <failure>, SKIP -> <skipped>, WARN -> system-out."""
    counts = report.counts()
    suite = ET.Element(
        "testsuite",
        name="etlrouter-conformance",
        tests=str(len(report.results)),
        failures=str(counts["FAIL"]),
        errors="0",
        skipped=str(counts["SKIP"]),
    )
    ET.SubElement(ET.SubElement(suite, "properties"), "property", name="address", value=report.address)
    for r in report.results:
        case = ET.SubElement(suite, "testcase", classname=f"etlrouter.conformance.{r.kind}", name=r.check)
        if r.status is Status.FAIL:
            failure = ET.SubElement(case, "failure", message=f"expected: {r.expected}; got: {r.got}")
            failure.text = format_line(r)
        elif r.status is Status.SKIP:
            ET.SubElement(case, "skipped", message=r.got)
        elif r.status is Status.WARN:
            ET.SubElement(case, "system-out").text = format_line(r)
    return bytes(ET.tostring(suite, encoding="utf-8", xml_declaration=True))
