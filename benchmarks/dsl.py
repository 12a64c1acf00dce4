"""Benchmark the DSL front end and optimizer on a large, realistic pipeline file.

Generates 1,000 pipelines reading 20 sources; each takes a random walk down a small tree of shared
transforms and lookups and ends in one of a dozen sinks (some with a tee), so prefixes overlap the way
they do when many teams consume the same topics. Times each phase (best of --repeat runs) and, in the
same run, two baselines: tokenizing only, and a naive build that gives every pipeline its own DAG.
A second table feeds `validate` (what `etlrouter ctl validate` runs) 1 MiB of pathological input and
renders what it reports, against the same-run baseline of validating 1 MiB of the realistic file.

    .venv/bin/python benchmarks/dsl.py [--pipelines 1000] [--sources 20] [--repeat 5] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from typing import TypeVar

from etlrouter.dsl import compile, explain_tree, optimize, parse, validate
from etlrouter.dsl.checker import analyze
from etlrouter.dsl.errors import Source
from etlrouter.dsl.lexer import tokenize
from etlrouter.dsl.optimizer import count_stages, count_unmerged_stages

T = TypeVar("T")

# Level n of the transform tree offers these variants; a pipeline picks one per level it descends.
LEVELS = [
    ["transform decode (parallelism = 4)", "transform decode-avro (parallelism = 4)"],
    [
        "transform filter-valid (retries = 3, backoff = 100ms..5s)",
        "transform drop-test-events",
        "transform dedupe",
    ],
    [
        'lookup enrich-users (key = "user_id", cache_ttl = 1m)',
        'lookup geoip (key = "ip")',
        "transform mask-pii",
    ],
    [
        "transform aggregate-1m",
        "transform sessionize (timeout = 5s)",
        "transform flatten",
        "transform to-parquet",
    ],
]
SINKS = [f"sink {name}" for name in ("s3-archive", "clickhouse", "bigquery", "es-logs", "pg-replica")] + [
    f'sink team-{number}-store (dlq = "dlq-{number}")' for number in range(7)
]


def generate(pipelines: int, sources: int, seed: int) -> str:
    rng = random.Random(seed)
    blocks = []
    for number in range(pipelines):
        source = f"source topic-{number % sources} (batch_size = 500)"
        depth = rng.randint(1, len(LEVELS))
        steps = [rng.choice(level) for level in LEVELS[:depth]]
        if rng.random() < 0.1:
            first, second = rng.sample(SINKS, 2)
            tail = f"tee {{ {first}; transform audit-copy | {second} }}"
        else:
            tail = rng.choice(SINKS)
        policy = rng.choice(["", "on_branch_lag = block", 'on_branch_lag = shed(after = "30s")'])
        body = "\n  | ".join([source, *steps, tail])
        blocks.append(f"pipeline p{number:04d} {{\n  {body}\n  {policy}\n}}\n")
    return "\n".join(blocks)


MIB = 1 << 20


def pathological() -> list[tuple[str, str]]:
    """1 MiB inputs that once made validate slow or its output huge (issue #13)."""
    rng = random.Random(13)
    punct = "{}(),;=|!@$%^&*.-+[]<>?/~`'"

    def fill(unit: str) -> str:
        return (unit * (MIB // len(unit) + 1))[:MIB]

    return [
        ("punctuation, one line", "".join(rng.choice(punct) for _ in range(MIB))),
        ("punctuation, 80-column lines", fill("".join(rng.choice(punct) for _ in range(79)) + "\n")),
        ("unterminated strings", fill('"abc\n')),
        ("deep nesting", "pipeline p { source a (" + "(" * (MIB // 2 - 20) + ")" * (MIB // 2 - 20) + ") }"),
        ("100,000 errors", "pipeline p { source a | @ }\n" * 100_000),
    ]


def validate_and_render(text: str, filename: str) -> tuple[int, int, int]:
    """(errors kept, errors omitted, characters printed), as `ctl validate` would print them."""
    errors = validate(text, filename)
    printed = sum(len(error.render()) for error in errors)
    return len(errors), getattr(errors, "omitted", 0), printed


def best_of(repeat: int, run: Callable[[], T]) -> tuple[float, T]:
    best = float("inf")
    result: T | None = None
    for _ in range(repeat):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    assert result is not None
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipelines", type=int, default=1000)
    parser.add_argument("--sources", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    text = generate(args.pipelines, args.sources, args.seed)
    filename = "generated.etl"
    lex_s, _ = best_of(args.repeat, lambda: tokenize(Source(text, filename)))
    parse_s, document = best_of(args.repeat, lambda: parse(text, filename))
    check_s, (pipelines, errors) = best_of(args.repeat, lambda: analyze(document))
    assert not errors, errors[0].render()
    optimize_s, dags = best_of(args.repeat, lambda: optimize(pipelines))
    naive_s, naive = best_of(args.repeat, lambda: [dag for p in pipelines for dag in optimize([p])])
    explain_s, _ = best_of(args.repeat, lambda: explain_tree(dags))
    total_s, _ = best_of(args.repeat, lambda: optimize(compile(text, filename)))

    merged_stages = count_stages(dags)
    unmerged_stages = count_unmerged_stages(pipelines)
    assert count_stages(naive) == unmerged_stages

    print(
        f"{len(pipelines)} pipelines, {len(dags)} sources, {len(text.splitlines())} lines, "
        f"{len(text) / 1024:.0f} KiB; best of {args.repeat} runs"
    )
    print()
    rows = [
        ("tokenize only (baseline)", lex_s),
        ("parse (tokenize + syntax tree)", parse_s),
        ("check + normalize", check_s),
        ("optimize (merged DAGs)", optimize_s),
        ("naive build, one DAG per pipeline", naive_s),
        ("explain tree", explain_s),
        ("compile + optimize, end to end", total_s),
    ]
    print(f"{'phase':<36} {'ms':>9} {'µs/pipeline':>12} {'vs tokenize':>12}")
    print("-" * 72)
    for name, seconds in rows:
        per_pipeline = seconds / len(pipelines) * 1e6
        print(f"{name:<36} {seconds * 1000:>9.2f} {per_pipeline:>12.1f} {seconds / lex_s:>12.2f}")
    print()
    print(f"{'stages':<36} {'count':>9}")
    print("-" * 46)
    print(f"{'before merging (naive build)':<36} {unmerged_stages:>9}")
    print(f"{'after merging':<36} {merged_stages:>9}")
    print(f"{'ratio after / before':<36} {merged_stages / unmerged_stages:>9.3f}")
    print(f"{'optimize time / naive build time':<36} {optimize_s / naive_s:>9.3f}")

    # Pathological input: linear time, bounded output. Baseline: the realistic file, per MiB.
    repeat = min(args.repeat, 3)
    baseline_s, _ = best_of(repeat, lambda: validate_and_render(text, filename))
    baseline_per_mib = baseline_s * MIB / len(text)
    print()
    print(
        f"{'validate + render, 1 MiB of':<30} {'ms':>9} {'vs realistic':>13} "
        f"{'kept':>6} {'omitted':>8} {'printed':>9}"
    )
    print("-" * 80)
    print(f"{'realistic pipelines (baseline)':<30} {baseline_per_mib * 1000:>9.1f} {1:>13.2f}")
    for name, bad in pathological():
        seconds, (kept, omitted, printed) = best_of(
            repeat, lambda bad=bad: validate_and_render(bad, "bad.etl")
        )
        seconds *= MIB / len(bad)
        print(
            f"{name:<30} {seconds * 1000:>9.1f} {seconds / baseline_per_mib:>13.2f} "
            f"{kept:>6} {omitted:>8} {printed:>9}"
        )


if __name__ == "__main__":
    main()
