"""`etlrouter verify`: the delivery oracle against a local cluster run by `etlrouter dev` machinery.

It builds a dev spec — the oracle source (the generator, a bounded run of `rate * duration` records),
three branches fanned out from it (direct, through the reference filter, through the reference map whose
program fails on some records, so the DLQ has letters to account for), one jsonl-file sink per branch —
and runs it with dev's own start-up, layout and orderly stop (`etlrouter.dev.runner.Dev`). While the
records flow it checks, from the source's durable acknowledgements and the sink files, that nothing is
acknowledged before every branch holds it, and with `--chaos` it kills -9 a sidecar, a service or the Raft
leader on a schedule and restarts it. When the source has acknowledged everything (or the deadline
passed) it reads the DLQ of every sidecar and judges (`oracle`): a table, and JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shlex
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import aiohttp
import msgspec
from grpclib.exceptions import GRPCError

from etlrouter._proto.v1 import dataplane_grpc, dataplane_pb2
from etlrouter.client.router import RouterClient
from etlrouter.conformance import oracle
from etlrouter.connectors.generator import GeneratorConfig, load_state, make_record
from etlrouter.core.grpc import open_channel
from etlrouter.dev.layout import HOST
from etlrouter.dev.procs import Child, Supervisor
from etlrouter.dev.runner import EXIT_FAILED, EXIT_OK, Dev, DevError, DevOptions, Interrupted
from etlrouter.dev.spec import DevSpec, ServiceSpec, parse_services
from etlrouter.security.identity import SIDECAR
from etlrouter.sidecar import discovery

SOURCE = "oracle"
USER_TRANSFORM = "user-transform"  # the service name of --transform-command's process
DEFAULT_FILTER = "value.amount >= 250"  # drops about a quarter of the records
DEFAULT_PROGRAM = "value.ratio = 100 / (value.id % 50)"  # fails (division by zero) on every 50th id
SAMPLE_INTERVAL_S = 1.0
CHAOS_ROLES = ("sidecar", "service", "leader")


@dataclass
class VerifyOptions:
    data_dir: Path
    duration_s: float = 60.0
    rate: float = 500.0  # records/s of the oracle source
    partitions: int = 2
    seed: int = 19
    chaos: bool = False
    chaos_interval_s: float = 5.0
    down_s: float = 1.0  # how long a killed process stays down
    filter_expr: str = DEFAULT_FILTER
    map_program: str = DEFAULT_PROGRAM
    routers: int = 3
    base_port: int = 0
    drain_timeout_s: float = 120.0  # after the duration: how long the source may take to be acknowledged
    report_file: Path | None = None
    # The user's own transform, a fourth branch: a command line with {port} (and {host}) to listen on.
    transform_command: str | None = None


def branches(options: VerifyOptions) -> list[oracle.Branch]:
    out = [
        oracle.Branch("verify-direct", "branch-direct"),
        oracle.Branch("verify-filtered", "branch-filtered", "filter", options.filter_expr),
        oracle.Branch("verify-mapped", "branch-mapped", "map", options.map_program),
    ]
    if options.transform_command:
        out.append(oracle.Branch("verify-user", "branch-user", "user", options.transform_command))
    return out


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pipeline_text(options: VerifyOptions) -> str:
    """The spec dev runs: `# dev:` service lines and the three pipelines (one DAG after the optimizer)."""
    lines = [
        "# etlrouter verify: the oracle source fanned out to three branches.",
        f"# dev: service {SOURCE} generator --seed {options.seed} --partitions {options.partitions}",
        "# dev: service oracle-filter filter",
        "# dev: service oracle-map map",
    ]
    lines += [f"# dev: service {b.sink} jsonl_file_sink" for b in branches(options)]
    for b in branches(options):
        stage = ""
        if b.transform == "filter":
            stage = f"  | transform oracle-filter (config.expr = {_quoted(b.text)})\n"
        elif b.transform == "map":
            stage = f"  | transform oracle-map (config.program = {_quoted(b.text)})\n"
        elif b.transform == "user":
            stage = f"  | transform {USER_TRANSFORM}\n"
        lines.append(f"\npipeline {b.name} {{\n  source {SOURCE}\n{stage}  | sink {b.sink}\n}}")
    return "\n".join(lines) + "\n"


class RestartingSupervisor(Supervisor):
    """dev's supervisor, remembering each child's environment so a killed child can be started again."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__(log_dir)
        self.envs: dict[str, dict[str, str]] = {}

    def start(
        self, name: str, group: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> Child:
        self.envs[name] = dict(env or {})
        return super().start(name, group, argv, env)

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def kill(self, name: str) -> int:
        child = self.child(name)
        pid = child.pid
        child.proc.send_signal(signal.SIGKILL)
        child.proc.wait()
        return pid

    def restart(self, name: str) -> Child:
        old = self.child(name)
        self.children.remove(old)
        return self.start(name, old.group, old.argv, self.envs[name])


@dataclass
class _Down:
    fault: oracle.Fault
    started: float
    until: float


@dataclass
class VerifyDev(Dev):
    verify: VerifyOptions = field(default_factory=lambda: VerifyOptions(Path(".data/verify")))
    report: oracle.VerifyReport | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.supervisor = RestartingSupervisor(self.data_dir / "logs")
        self.rng = random.Random(self.verify.seed)
        self.expectations: dict[str, oracle.Expectation] = {}
        self.early: set[oracle.Id] = set()
        self.faults: list[oracle.Fault] = []
        self.down: _Down | None = None

    @property
    def restarting(self) -> RestartingSupervisor:
        assert isinstance(self.supervisor, RestartingSupervisor)
        return self.supervisor

    def start_services(self) -> None:
        """dev's services, and the user's transform from its own command line (not a reference connector)."""
        for j, service in enumerate(self.options.spec.services):
            if service.name == USER_TRANSFORM and self.verify.transform_command:
                port = str(self.layout.service[j])
                words = shlex.split(self.verify.transform_command)
                argv = [w.replace("{port}", port).replace("{host}", HOST) for w in words]
                self.service_argv[service.name] = argv
            else:
                args = self.service_args(service, j)
                self.service_argv[service.name] = args  # as dev keeps them: without the interpreter
                argv = self._python(*args)
            self.supervisor.start(service.name, "service", argv)

    async def apply(self, client: RouterClient) -> None:
        """The user's transform is registered under the name it declares (or its sidecar gives it): found
        the sidecar's way, by discovery, and put into the pipeline before it is applied."""
        if self.verify.transform_command:
            j = next(j for j, s in enumerate(self.options.spec.services) if s.name == USER_TRANSFORM)
            port = self.layout.service[j]
            probe = await discovery.probe_port(HOST, port, call_timeout_s=10)
            why = probe.reason or probe.outcome
            try:
                offered = discovery.local_services(probe, HOST, f"sidecar-{USER_TRANSFORM}", {})
            except ValueError as e:
                offered, why = (), str(e)
            found = [s for s in offered if s.kind == "transform"]
            if not found:
                raise DevError(f"--transform-command: no TransformService on port {port}: {why}")
            spec = self.options.spec
            text = spec.pipelines.replace(f"| transform {USER_TRANSFORM}\n", f"| transform {found[0].name}\n")
            self.options.spec = DevSpec(text, spec.filename, spec.services)
        await super().apply(client)

    def write_context(self) -> None:
        """Unlike dev, verify leaves the user's `etlrouter ctl` contexts alone (it is not for poking at)."""

    # The oracle's own configuration, as dev started the generator (with --limit and --rate).
    def oracle_config(self) -> GeneratorConfig:
        return self._generator_config(SOURCE)

    def sink_paths(self, sink: str) -> list[Path]:
        path = self.sink_files[sink]
        return [path]

    def acked(self) -> dict[int, int]:
        try:
            return load_state(self.state_files[SOURCE])
        except (OSError, ValueError):
            return {}

    def acknowledged(self) -> int:
        return sum(offset + 1 for offset in self.acked().values())

    def check_early_acks(self) -> None:
        """Acks first, then the sinks: what was acknowledged then must be in every branch now (sinks only
        grow; a sink restart cuts only writes it never confirmed)."""
        acked = self.acked()
        for b in branches(self.verify):
            copies = oracle.read_copies(self.sink_paths(b.sink))
            self.early.update(oracle.early_acks(acked, self.expectations[b.name], copies))

    # ---------------------------------------------------------------------------------------- chaos

    def victim(self) -> tuple[str, str]:
        """The next (process, role): the roles take turns — a sidecar, a user service (the oracle source
        included: its acknowledged offsets are in its state file), the Raft leader — and within a role the
        process is drawn at random (seeded: --seed)."""
        role = CHAOS_ROLES[len(self.faults) % len(CHAOS_ROLES)]
        if role == "leader":
            return (self.leaders[0] if self.leaders else "router-0"), role
        names = sorted(c.name for c in self.supervisor.children if c.group == role)
        return self.rng.choice(names), role

    def inject(self, now: float, started: float) -> None:
        name, role = self.victim()
        pid = self.restarting.kill(name)
        fault = oracle.Fault(
            at_s=round(now - started, 2), victim=name, role=role, pid=pid, down_s=self.verify.down_s
        )
        self.faults.append(fault)
        self.down = _Down(fault, now, now + self.verify.down_s)
        self.say(f"chaos: kill -9 {name} (pid {pid}, {role}) at {fault.at_s:.1f} s")

    def revive(self, now: float) -> None:
        if self.down is None or now < self.down.until:
            return
        name = self.down.fault.victim
        self.restarting.restart(name)
        self.down.fault.down_s = round(now - self.down.started, 2)
        self.down = None
        self.say(f"chaos: {name} restarted")

    def check_alive(self) -> None:
        dead = [c for c in self.supervisor.dead() if self.down is None or c.name != self.down.fault.victim]
        if dead:
            child = dead[0]
            raise DevError(
                f"{child.name} exited with status {child.proc.returncode}; its log ({child.log_path}) ends:\n"
                + self.supervisor.tail(child)
            )

    # ------------------------------------------------------------------------------------------ DLQ

    async def dead_letters(self) -> dict[str, dict[oracle.Id, int]]:
        """Per pipeline: how many letters each (partition, offset) has in the DLQs of all sidecars; each
        letter's record is compared with the original (a dead letter must be intact too)."""
        config = self.oracle_config()
        out: dict[str, dict[oracle.Id, int]] = {}
        for port in self.layout.sidecar_grpc:
            # As dev's admin: the DLQ's records need `tap` (mutual TLS unless --insecure).
            channel = open_channel(f"{HOST}:{port}", security=self.client_security(), expect=SIDECAR)
            stub = dataplane_grpc.SidecarAdminStub(channel)
            try:
                token = ""
                while True:
                    reply = await stub.ListDeadLetters(
                        dataplane_pb2.ListDeadLettersRequest(limit=1000, page_token=token), timeout=20
                    )
                    for entry in reply.dead_letters:
                        letter = await stub.GetDeadLetter(
                            dataplane_pb2.GetDeadLetterRequest(id=entry.id), timeout=20
                        )
                        id_ = (letter.partition, letter.record.offset)
                        original = make_record(config, *id_) if id_[1] < config.limit else None
                        if original is None or letter.record.value != original.value:
                            id_ = (-1, letter.record.offset)  # not a record of the oracle, or not intact
                        counts = out.setdefault(letter.pipeline, {})
                        counts[id_] = counts.get(id_, 0) + 1
                    token = reply.next_page_token
                    if not token:
                        break
            finally:
                channel.close()
        return out

    # -------------------------------------------------------------------------------------- the run

    async def run_loop(self, session: aiohttp.ClientSession, client: RouterClient, tty: bool) -> int:
        v = self.verify
        config = self.oracle_config()
        self.expectations = await asyncio.to_thread(
            lambda: {b.name: oracle.expect(config, b) for b in branches(v)}
        )
        started = time.monotonic()
        chaos_until = started + v.duration_s
        next_fault = started + v.chaos_interval_s
        deadline = chaos_until + v.drain_timeout_s
        last_sample = 0.0
        complete = False
        self.say(
            f"verify: {config.limit} records at {config.rate:g}/s over {v.partitions} partitions; "
            + (f"chaos every {v.chaos_interval_s:g} s" if v.chaos else "no chaos")
        )
        while not self.stop.is_set():
            now = time.monotonic()
            self.revive(now)
            self.check_alive()
            if v.chaos and self.down is None and now >= next_fault and now < chaos_until:
                self.inject(now, started)
                next_fault = now + v.chaos_interval_s
            if now - last_sample >= SAMPLE_INTERVAL_S:
                last_sample = now
                sample = await self.sample(session)
                if sample.leaders:
                    self.leaders = list(sample.leaders)
                await asyncio.to_thread(self.check_early_acks)
                if self.acknowledged() >= config.limit and self.down is None:
                    complete = True
                    break
            if now > deadline:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=0.2)
        if self.stop.is_set():
            raise Interrupted
        if self.down is not None:  # the deadline passed with a process down: bring it back for the DLQ read
            self.down.until = 0.0
            self.revive(time.monotonic())
        elapsed = time.monotonic() - started
        await asyncio.to_thread(self.check_early_acks)
        letters = await self._letters_with_retry()
        verdicts = [
            oracle.judge_branch(
                b,
                self.expectations[b.name],
                oracle.read_copies(self.sink_paths(b.sink)),
                letters.get(b.name, {}),
            )
            for b in branches(v)
        ]
        acknowledged = self.acknowledged()
        problems = oracle.verdict_problems(complete, verdicts, len(self.early), acknowledged, config.limit)
        self.report = oracle.VerifyReport(
            ok=not problems,
            complete=complete,
            records=config.limit,
            acknowledged=acknowledged,
            duration_s=round(elapsed, 2),
            chaos=v.chaos,
            faults=self.faults,
            branches=verdicts,
            early_acks=len(self.early),
            early_ack_ids=sorted(self.early)[:10],
            problems=problems,
        )
        for line in oracle.table(self.report):
            self.say(line)
        report_file = v.report_file or self.data_dir / "verify.json"
        report_file.write_bytes(msgspec.json.format(msgspec.json.encode(self.report)) + b"\n")
        self.say(f"report: {report_file}")
        return EXIT_OK if self.report.ok else EXIT_FAILED

    async def _letters_with_retry(self) -> dict[str, dict[oracle.Id, int]]:
        """Sidecars just restarted may need a moment to serve their admin API."""
        end = time.monotonic() + 30
        while True:
            try:
                return await self.dead_letters()
            except (GRPCError, OSError, TimeoutError) as e:
                if time.monotonic() > end:
                    raise DevError(f"the DLQs could not be read: {e!r}") from None
                await asyncio.sleep(0.5)


def dev_options(v: VerifyOptions) -> DevOptions:
    text = pipeline_text(v)
    services = parse_services(text, "verify.etl")
    if v.transform_command:
        if "{port}" not in v.transform_command:
            raise ValueError("--transform-command must say where to listen: {port} (and {host}, 127.0.0.1)")
        services += (ServiceSpec(USER_TRANSFORM, "user"),)  # started by VerifyDev.start_services
    spec = DevSpec(text, "verify.etl", services)
    return DevOptions(
        spec=spec,
        data_dir=v.data_dir,
        base_port=v.base_port,
        routers=v.routers,
        limit=max(1, int(v.rate * v.duration_s)),
        rate=v.rate,
        view=False,
        timeout_s=v.duration_s + v.drain_timeout_s,
    )


async def _run(v: VerifyOptions, out: TextIO) -> tuple[int, oracle.VerifyReport | None]:
    dev = VerifyDev(dev_options(v), out=out, verify=v)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, dev.on_signal, sig)
    code = EXIT_FAILED
    try:
        code = await dev.main()
    except Interrupted:
        code = EXIT_FAILED  # an interrupted verification verified nothing
    except DevError as exc:
        dev.say(f"etlrouter verify: {exc}", err=True)
        code = EXIT_FAILED
    finally:
        if dev.supervisor.children:
            killed = await asyncio.to_thread(dev.shutdown)
            dev.say(
                f"stopped {len(dev.supervisor.children)} processes"
                + (f" (killed: {', '.join(killed)})" if killed else "")
            )
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        dev.remove_context()
        dev.unlock_data_dir()
    return code, dev.report


def run_verify(v: VerifyOptions, out: TextIO | None = None) -> int:
    code, _ = asyncio.run(_run(v, out or sys.stdout))
    return code
