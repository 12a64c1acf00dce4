"""Benchmark the DSL front end and optimizer on a large, realistic pipeline file.

Generates 1,000 pipelines reading 20 sources; each takes a random walk down a small tree of shared
transforms and lookups and ends in one of a dozen sinks (some with a tee), so prefixes overlap the way
they do when many teams consume the same topics. Times each phase (best of --repeat runs) and, in the
same run, two baselines: tokenizing only, and a naive build that gives every pipeline its own DAG.

    .venv/bin/python benchmarks/dsl.py [--pipelines 1000] [--sources 20] [--repeat 5] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from typing import TypeVar

from etlrouter.dsl import compile, explain_tree, optimize, parse
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


if __name__ == "__main__":
    main()
