"""Semantic checks on a parsed document, and its normalization into `Pipeline` specs.

The checker walks the whole document and collects every problem rather than stopping at the first:
option names, types and ranges per stage kind; one source, first; sinks last on every branch;
duplicate pipelines, options and branches; a service used with two different kinds; a service met
twice on one path (routes are keyed by service, so that would be a cycle); and, when a registry is
given, that every service exists with the kind it is used as.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from etlrouter.dsl.errors import DslError, Source, SourcePos, did_you_mean
from etlrouter.dsl.model import BLOCK, BranchPolicy, Duration, OptionValue, Pipeline, Registry, StageSpec
from etlrouter.dsl.options import (
    CONFIG_PREFIX,
    OPTIONS_BY_NAME,
    OptionSpec,
    OptionType,
    ValueProblem,
    convert,
    convert_config,
    options_for,
)
from etlrouter.dsl.parser import PIPELINE_SETTINGS
from etlrouter.dsl.syntax import Chain, Document, Option, Stage, Tee, Value
from etlrouter.dsl.syntax import Pipeline as PipelineNode

_SpecKey = tuple[str, str, tuple[tuple[str, str], ...]]
_SHED_AFTER = OptionSpec("after", OptionType.DURATION, (), "lag before shedding", 1, 24 * 3_600_000)


def check(document: Document, registry: Registry | None = None) -> list[DslError]:
    """Every semantic error in `document` (an empty list means it compiles)."""
    return analyze(document, registry)[1]


def analyze(document: Document, registry: Registry | None = None) -> tuple[list[Pipeline], list[DslError]]:
    """Check `document` and normalize the pipelines that passed; errors are in source order."""
    checker = _Checker(Source(document.text, document.filename), registry)
    pipelines = [spec for node in document.pipelines if (spec := checker.pipeline(node)) is not None]
    return pipelines, sorted(checker.errors, key=DslError.sort_key)


@dataclass
class _PathStage:
    node: Stage
    spec: StageSpec | None  # None when the stage's options were invalid


@dataclass
class _Checker:
    source: Source
    registry: Registry | None
    errors: list[DslError] = field(default_factory=list)
    pipeline_names: dict[str, SourcePos] = field(default_factory=dict)
    service_kinds: dict[str, tuple[str, SourcePos]] = field(default_factory=dict)

    def error(self, message: str, pos: SourcePos, hint: str | None = None, length: int = 1) -> None:
        self.errors.append(self.source.error(message, pos, hint=hint, length=length))

    def at(self, pos: SourcePos) -> str:
        return f"{pos.line}:{pos.col}"

    # -- pipelines -------------------------------------------------------------------------------

    def pipeline(self, node: PipelineNode) -> Pipeline | None:
        errors_before = len(self.errors)
        first_use = self.pipeline_names.get(node.name)
        if first_use is None:
            self.pipeline_names[node.name] = node.name_pos
        else:
            self.error(
                f"duplicate pipeline name `{node.name}` (first defined at {self.at(first_use)})",
                node.name_pos,
                "pipeline names must be unique; rename one of them",
                len(node.name),
            )
        policy = self.settings(node.settings)
        source_spec, paths = self.structure(node)
        if len(self.errors) > errors_before or source_spec is None:
            return None
        # path[0] is the source itself; a branch is what follows it.
        branches = tuple(tuple(stage.spec for stage in path[1:] if stage.spec is not None) for path in paths)
        return Pipeline(name=node.name, source=source_spec, branches=branches, on_branch_lag=policy)

    def settings(self, settings: tuple[Option, ...]) -> BranchPolicy:
        policy = BLOCK
        seen: dict[str, SourcePos] = {}
        for setting in settings:
            if setting.name in seen:
                self.error(
                    f"`{setting.name}` is set twice (first at {self.at(seen[setting.name])})",
                    setting.pos,
                    length=len(setting.name),
                )
                continue
            seen[setting.name] = setting.pos
            if setting.name not in PIPELINE_SETTINGS:
                self.error(
                    f"unknown pipeline setting `{setting.name}`",
                    setting.pos,
                    did_you_mean(setting.name, PIPELINE_SETTINGS)
                    or "the pipeline settings are: " + ", ".join(PIPELINE_SETTINGS),
                    len(setting.name),
                )
                continue
            parsed = self.branch_policy(setting.value)
            if parsed is not None:
                policy = parsed
        return policy

    def branch_policy(self, value: Value) -> BranchPolicy | None:
        shed_example = 'e.g. `shed(after = "30s")`'
        if value.kind == "name" and value.text == "block":
            return BLOCK
        if value.kind == "name" and value.text == "shed":
            self.error("`shed` needs to know how long to wait", value.pos, shed_example, 4)
            return None
        if value.kind == "call" and value.text == "shed":
            after: int | None = None
            for arg in value.args:
                if arg.name != "after":
                    self.error(
                        f"unknown argument `{arg.name}` of `shed`",
                        arg.pos,
                        did_you_mean(arg.name, ["after"]) or "`shed` takes only `after`",
                        len(arg.name),
                    )
                    continue
                try:
                    converted = convert(_SHED_AFTER, arg.value)
                except ValueProblem as problem:
                    self.error(problem.message, arg.value.pos, problem.hint)
                    continue
                if isinstance(converted, Duration):
                    after = converted.ms
            if after is None:
                if not value.args:
                    self.error("`shed` needs `after`", value.pos, shed_example, 4)
                return None
            return BranchPolicy(mode="shed", shed_after_ms=after)
        hint = did_you_mean(value.text, ["block", "shed"]) if value.kind in ("name", "call") else None
        self.error(
            f"`on_branch_lag` must be `block` or `shed(after = ...)`, got `{value.text}`",
            value.pos,
            hint or 'write `block` or `shed(after = "30s")`',
            len(value.text),
        )
        return None

    # -- structure -------------------------------------------------------------------------------

    def structure(self, node: PipelineNode) -> tuple[StageSpec | None, list[list[_PathStage]]]:
        """Check the shape of the pipeline and flatten it into source-to-sink paths."""
        if not node.chain.steps:  # only a hand-built Document can get here; the parser refuses it
            self.error(f"pipeline `{node.name}` has no stages", node.pos, "begin it with `source NAME |`")
            return None, []
        first = node.chain.steps[0]
        if not isinstance(first, Stage) or first.kind != "source":
            what = "a tee" if isinstance(first, Tee) else f"{first.kind} `{first.service}`"
            self.error(
                f"pipeline `{node.name}` must start with a source, found {what}",
                first.pos,
                "begin it with `source NAME |`",
            )
            return None, []
        source_spec = self.stage(first)
        paths: list[list[_PathStage]] = []
        rest = Chain(steps=node.chain.steps[1:], pos=node.chain.pos)
        self.walk(rest, [_PathStage(first, source_spec)], paths)
        self.duplicate_branches(node, paths)
        return source_spec, paths

    def walk(self, chain: Chain, path: list[_PathStage], paths: list[list[_PathStage]]) -> None:
        for step in chain.steps:
            if isinstance(step, Tee):
                for branch in step.branches:
                    self.walk(branch, list(path), paths)
                return
            previous = path[-1].node
            if previous.kind == "sink":
                self.error(
                    f"sink `{previous.service}` cannot feed {step.kind} `{step.service}`",
                    step.pos,
                    "a sink ends its branch; use `tee { ... }` to send records to several places",
                    len(step.kind),
                )
            elif step.kind == "source":
                self.error(
                    f"source `{step.service}` can only be the first stage of a pipeline",
                    step.pos,
                    "to merge two sources write two pipelines; the optimizer shares what they have in common",
                    len(step.kind),
                )
            self.repeated_service(step, path)
            path.append(_PathStage(step, self.stage(step)))
        last = path[-1].node
        if last.kind != "sink":
            self.error(
                f"branch ends at {last.kind} `{last.service}` without a sink",
                last.pos,
                "end every branch with `| sink NAME`",
                len(last.kind),
            )
        paths.append(path)

    def repeated_service(self, step: Stage, path: list[_PathStage]) -> None:
        for earlier in path:
            if earlier.node.service == step.service:
                self.error(
                    f"`{step.service}` appears twice on one path (first at {self.at(earlier.node.pos)})",
                    step.service_pos,
                    "records would loop through the same service; use a second service name",
                    len(step.service),
                )
                return

    def duplicate_branches(self, node: PipelineNode, paths: list[list[_PathStage]]) -> None:
        seen: set[tuple[_SpecKey, ...]] = set()
        for path in paths:
            if any(stage.spec is None for stage in path):
                continue
            hashable = tuple(_spec_key(stage.spec) for stage in path if stage.spec is not None)
            if hashable in seen:
                last = path[-1].node
                self.error(
                    f"pipeline `{node.name}` has two identical branches ending at `{last.service}`",
                    last.pos,
                    "remove the repeated branch",
                    len(last.kind),
                )
            seen.add(hashable)

    # -- stages ----------------------------------------------------------------------------------

    def stage(self, node: Stage) -> StageSpec | None:
        errors_before = len(self.errors)
        self.service(node)
        options = self.options(node)
        if len(self.errors) > errors_before:
            return None
        return StageSpec(kind=node.kind, service=node.service, options=options)

    def service(self, node: Stage) -> None:
        first_kind, first_pos = self.service_kinds.setdefault(node.service, (node.kind, node.pos))
        if first_kind != node.kind:
            self.error(
                f"`{node.service}` is used as a {node.kind} here"
                f" but as a {first_kind} at {self.at(first_pos)}",
                node.service_pos,
                "a service has exactly one kind",
                len(node.service),
            )
        if self.registry is None:
            return
        registered = self.registry.kind_of(node.service)
        if registered is None:
            names = self.registry.service_names()
            same_kind = [name for name in names if self.registry.kind_of(name) == node.kind]
            hint = did_you_mean(node.service, same_kind) or did_you_mean(node.service, names)
            self.error(f"unknown {node.kind} `{node.service}`", node.service_pos, hint, len(node.service))
        elif registered != node.kind:
            self.error(
                f"`{node.service}` is registered as a {registered}, not a {node.kind}",
                node.service_pos,
                f"write `{registered} {node.service}` or pick a {node.kind}",
                len(node.service),
            )

    def options(self, node: Stage) -> dict[str, OptionValue]:
        values: dict[str, OptionValue] = {}
        seen: dict[str, SourcePos] = {}
        allowed = {spec.name: spec for spec in options_for(node.kind)}
        for option in node.options:
            if option.name in seen:
                self.error(
                    f"option `{option.name}` is given twice (first at {self.at(seen[option.name])})",
                    option.pos,
                    length=len(option.name),
                )
                continue
            seen[option.name] = option.pos
            try:
                if option.name.startswith(CONFIG_PREFIX) and len(option.name) > len(CONFIG_PREFIX):
                    values[option.name] = convert_config(option.name, option.value)
                    continue
                spec = allowed.get(option.name)
                if spec is None:
                    self.unknown_option(node, option, allowed)
                    continue
                values[option.name] = convert(spec, option.value)
            except ValueProblem as problem:
                self.error(problem.message, option.value.pos, problem.hint, max(1, len(option.value.text)))
        # A misspelled required option already has its own error; do not also call it missing.
        misspelled = [name for name in seen if name not in allowed]
        for spec in allowed.values():
            if spec.required and spec.name not in seen and not did_you_mean(spec.name, misspelled):
                self.error(
                    f"{node.kind} `{node.service}` needs the option `{spec.name}`",
                    node.service_pos,
                    f'add `({spec.name} = "...")`: {spec.doc}',
                    len(node.service),
                )
        return dict(sorted(values.items()))

    def unknown_option(self, node: Stage, option: Option, allowed: dict[str, OptionSpec]) -> None:
        elsewhere = OPTIONS_BY_NAME.get(option.name)
        if elsewhere is not None:
            kinds = " and ".join(f"{kind}s" for kind in elsewhere.kinds)
            hint = f"`{option.name}` applies to {kinds} only"
        else:
            hint = did_you_mean(option.name, allowed) or (
                f"options of a {node.kind}: {', '.join(allowed)}; service settings go in `config.NAME`"
            )
        self.error(
            f"unknown option `{option.name}` for {node.kind} `{node.service}`",
            option.pos,
            hint,
            len(option.name),
        )


def _spec_key(spec: StageSpec) -> _SpecKey:
    return (spec.kind, spec.service, tuple((name, repr(value)) for name, value in spec.options.items()))
