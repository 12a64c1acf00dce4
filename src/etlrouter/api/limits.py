"""Bounds on what one GraphQL request may cost: text size, tokens, selection depth and field count.

The schema has no cycles, so depth is bounded by it already; aliases and fragments are what could
multiply the work (`a: dags {...} b: dags {...}` a thousand times, or fragments that spread each other
twice per level). The field count expands fragments (memoized, so measuring is cheap even when the
expansion is exponential) and counts every selected field once per place it is selected.
"""

from __future__ import annotations

from typing import Any

from graphql import (
    FieldNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
)
from graphql.validation import ValidationContext, ValidationRule

# A query text longer than this is refused before parsing (pipeline definitions belong in variables).
MAX_QUERY_CHARS = 256 * 1024
# Tokens the parser may read: stops pathological documents before they are built.
MAX_QUERY_TOKENS = 20_000
# Selection depth (the standard introspection query needs 13).
MAX_DEPTH = 16
# Fields selected, counted once per place they are selected, fragments expanded.
MAX_FIELDS = 2_000


class QueryLimitsRule(ValidationRule):
    """Rejects operations deeper than MAX_DEPTH or selecting more than MAX_FIELDS fields."""

    def __init__(self, context: ValidationContext) -> None:
        super().__init__(context)
        self._fragments: dict[str, tuple[int, int]] = {}

    def enter_operation_definition(self, node: OperationDefinitionNode, *_: Any) -> None:
        depth, fields = self._measure(node.selection_set, set())
        name = f"operation `{node.name.value}`" if node.name else "the operation"
        if depth > MAX_DEPTH:
            self.report_error(GraphQLError(f"{name} is {depth} levels deep; the limit is {MAX_DEPTH}", node))
        if fields > MAX_FIELDS:
            self.report_error(
                GraphQLError(
                    f"{name} selects {fields} fields (aliases and fragments expanded);"
                    f" the limit is {MAX_FIELDS}",
                    node,
                )
            )

    def _measure(self, selection_set: SelectionSetNode | None, visiting: set[str]) -> tuple[int, int]:
        """(depth, field count) of a selection set."""
        if selection_set is None:
            return 0, 0
        depth = fields = 0
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                d, f = self._measure(selection.selection_set, visiting)
                depth, fields = max(depth, d + 1), fields + f + 1
            elif isinstance(selection, InlineFragmentNode):
                d, f = self._measure(selection.selection_set, visiting)
                depth, fields = max(depth, d), fields + f
            elif isinstance(selection, FragmentSpreadNode):
                d, f = self._fragment(selection.name.value, visiting)
                depth, fields = max(depth, d), fields + f
        return depth, fields

    def _fragment(self, name: str, visiting: set[str]) -> tuple[int, int]:
        if name in self._fragments:
            return self._fragments[name]
        fragment = self.context.get_fragment(name)
        if fragment is None or name in visiting:  # unknown or cyclic: other rules report those
            return 0, 0
        visiting.add(name)
        try:
            measured = self._measure(fragment.selection_set, visiting)
        finally:
            visiting.discard(name)
        self._fragments[name] = measured
        return measured
