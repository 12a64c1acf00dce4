"""explain: terminal tree, DOT and Mermaid renderings, checked against golden files and for the
facts a reader relies on (who shares what, where the lag policy applies)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from etlrouter.dsl import (
    EXPLAIN_FORMATS,
    DslErrors,
    ExplainFormat,
    compile,
    dags_to_json,
    explain,
    explain_dot,
    explain_file,
    explain_mermaid,
    explain_tree,
    optimize,
)

SHOWCASE_PATH = Path(__file__).parent / "golden" / "showcase.etl"
SHOWCASE = SHOWCASE_PATH.read_text(encoding="utf-8")
Golden = Callable[[str, str], None]


@pytest.mark.parametrize("fmt", ["tree", "dot", "mermaid", "json", "ast"])
def test_showcase_matches_golden(fmt: ExplainFormat, golden: Golden) -> None:
    name = {"tree": "tree.txt", "dot": "dot", "mermaid": "mmd", "json": "dag.json", "ast": "ast.json"}[fmt]
    assert fmt in EXPLAIN_FORMATS
    golden(f"showcase.{name}", explain(SHOWCASE, "showcase.etl", fmt))


def test_dag_json_golden_matches_optimizer_output(golden: Golden) -> None:
    dags = optimize(compile(SHOWCASE, "showcase.etl"))
    golden("showcase.dag.json", dags_to_json(dags).decode() + "\n")


def test_tree_shows_sharing_and_fan_out_policies() -> None:
    tree = explain_tree(optimize(compile(SHOWCASE)))
    lines = tree.splitlines()
    filter_line = next(line for line in lines if "transform filter-valid" in line)
    assert filter_line.startswith("└─ ")
    assert filter_line.endswith("[orders-audit, orders-to-ch, orders-to-s3]")
    clickhouse_line = next(line for line in lines if "sink clickhouse" in line and "orders-to-ch" in line)
    assert clickhouse_line.startswith("   ├─ ")
    assert clickhouse_line.endswith("on lag: shed(after = 30s)")
    # enrich-users is shared by a `block` and a `shed` pipeline: block wins.
    lookup_line = next(line for line in lines if "lookup enrich-users" in line)
    assert lookup_line.endswith("[orders-audit, orders-to-s3]  on lag: block")
    assert "# 3 pipelines, 7 stages (12 if run separately)" in lines


def test_tree_lists_every_stage_once_under_its_parent() -> None:
    dags = optimize(compile(SHOWCASE))
    lines = explain_tree(dags).splitlines()
    for dag in dags:
        for stage in dag.stages:
            [line] = [line for line in lines if f"  {stage.id}  " in line]
            assert f"{stage.kind} {stage.service}" in line
            if stage.parent is not None:
                # The parent is the nearest line above that is indented one level less.
                depth = (len(line) - len(line.lstrip(" │├└─"))) // 3
                above = lines[: lines.index(line)]
                parent_line = next(
                    candidate
                    for candidate in reversed(above)
                    if (len(candidate) - len(candidate.lstrip(" │├└─"))) // 3 == depth - 1
                )
                assert f"  {stage.parent}  " in parent_line


def test_tree_of_nothing() -> None:
    assert explain_tree([]) == "(no pipelines)\n"


def test_dot_and_mermaid_mention_every_stage_and_edge() -> None:
    dags = optimize(compile(SHOWCASE))
    dot = explain_dot(dags)
    mermaid = explain_mermaid(dags)
    for dag in dags:
        for stage in dag.stages:
            assert f'"{stage.id}" [label="{stage.kind} {stage.service}' in dot
            assert stage.id.replace("-", "_") in mermaid
        for edge in dag.edges:
            assert f'"{edge.src}" -> "{edge.dst}"' in dot
    assert dot.startswith("digraph etlrouter {") and dot.rstrip().endswith("}")
    assert mermaid.startswith("flowchart LR\n")


def test_labels_with_quotes_are_escaped() -> None:
    dags = optimize(compile('pipeline p { source s (config.q = "say \\"hi\\" <b>") | sink k }'))
    assert '\\"say \\\\\\"hi\\\\\\" <b>\\"' in explain_dot(dags)
    mermaid = explain_mermaid(dags)
    assert "#quot;say \\#quot;hi\\#quot; #lt;b#gt;#quot;" in mermaid
    assert '"say' not in mermaid


def test_explain_raises_dsl_errors_for_bad_input() -> None:
    with pytest.raises(DslErrors):
        explain("pipeline p { source s }", "bad.etl")
    with pytest.raises(DslErrors):
        explain("pipeline p {", "bad.etl", "ast")


def test_explain_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown explain format"):
        explain(SHOWCASE, "showcase.etl", "svg")  # type: ignore[arg-type]


def test_explain_file_reads_the_file() -> None:
    assert explain_file(SHOWCASE_PATH) == explain(SHOWCASE, str(SHOWCASE_PATH))
