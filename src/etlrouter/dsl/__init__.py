"""The pipeline DSL: parse, check, merge shared prefixes, explain.

    pipelines = compile(text, "pipelines.etl", registry)   # raises DslErrors
    dags = optimize(pipelines)                              # one MergedDag per source
    print(explain_tree(dags))
    changes = diff(old_dags, dags)                          # which stages to start / stop

Everything here is pure: no I/O except the `*_file` helpers reading the file they are given.
"""

from etlrouter.dsl.api import (
    EXPLAIN_FORMATS,
    ExplainFormat,
    compile,
    dags_from_json,
    dags_to_json,
    explain,
    explain_file,
    precheck,
    validate,
    validate_file,
)
from etlrouter.dsl.checker import analyze, check
from etlrouter.dsl.errors import MAX_ERRORS, Diagnostics, DslError, DslErrors
from etlrouter.dsl.explain import explain_dot, explain_mermaid, explain_tree
from etlrouter.dsl.model import (
    MODEL_FORMAT_VERSION,
    BranchPolicy,
    DagEdge,
    DagStage,
    Duration,
    DurationRange,
    MergedDag,
    OptionValue,
    Pipeline,
    Registry,
    Size,
    StageSpec,
    StaticRegistry,
)
from etlrouter.dsl.optimizer import DagDiff, diff, optimize, stage_id
from etlrouter.dsl.parser import parse, parse_with_errors
from etlrouter.dsl.syntax import Document, StageKind

__all__ = [
    "EXPLAIN_FORMATS",
    "MAX_ERRORS",
    "MODEL_FORMAT_VERSION",
    "BranchPolicy",
    "DagDiff",
    "DagEdge",
    "DagStage",
    "Diagnostics",
    "Document",
    "DslError",
    "DslErrors",
    "Duration",
    "DurationRange",
    "ExplainFormat",
    "MergedDag",
    "OptionValue",
    "Pipeline",
    "Registry",
    "Size",
    "StageKind",
    "StageSpec",
    "StaticRegistry",
    "analyze",
    "check",
    "compile",
    "dags_from_json",
    "dags_to_json",
    "diff",
    "explain",
    "explain_dot",
    "explain_file",
    "explain_mermaid",
    "explain_tree",
    "optimize",
    "parse",
    "parse_with_errors",
    "precheck",
    "stage_id",
    "validate",
    "validate_file",
]
