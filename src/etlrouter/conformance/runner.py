"""`run_conformance`: find what a service offers, run the checks of each kind, collect a `Report`."""

from __future__ import annotations

from etlrouter.conformance.calls import CallFailed, Session, classify
from etlrouter.conformance.checks import KIND_CHECKS, Options, check_capabilities, check_deadlines
from etlrouter.conformance.model import Report, Status, fail, ok, skip

KINDS = ("source", "transform", "sink", "lookup")


async def run_conformance(address: str, options: Options | None = None) -> Report:
    options = options or Options()
    report = Report(address=address)
    session = Session(address, options.timeout_s, options.transport_config)
    try:
        await _run(session, report, options)
    finally:
        session.close()
    return report


async def _run(session: Session, report: Report, options: Options) -> None:
    expected = "server reflection lists etlrouter.v1 services (how the sidecar discovers them)"
    found: list[str] = []
    try:
        names = await session.reflected_services()
        if names is None:
            report.add(fail("reflection", expected, "no gRPC server reflection (v1 or v1alpha)"))
        else:
            found = classify(names)
            if found:
                report.add(ok("reflection", expected, ", ".join(found)))
            else:
                report.add(fail("reflection", expected, f"none among {sorted(names)[:6]}"))
    except CallFailed as e:
        report.add(fail("reflection", expected, str(e)))
    kinds = [k for k in KINDS if k in found or k in options.kinds]
    report.kinds = kinds

    expected = "grpc.health.v1 Health/Check answers SERVING"
    try:
        status = await session.health()
        report.add(ok("health", expected) if status == "SERVING" else fail("health", expected, status))
    except CallFailed as e:
        report.add(fail("health", expected, str(e)))

    if not kinds:
        report.add(skip("kinds", "no service kind to check (give --kind when the server has no reflection)"))
        return
    for kind in kinds:
        result, caps = await check_capabilities(session, kind)
        report.add(result)
        for r in await KIND_CHECKS[kind](session, caps, options):
            report.add(r)
    report.add(check_deadlines(session, options.timeout_s))


def summary_status(report: Report) -> Status:
    return Status.FAIL if report.exit_code else Status.PASS
