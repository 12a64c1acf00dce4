"""Per-field authorization of GraphQL operations: the root fields an operation selects, and the
permission each needs (security/authz.py's GRAPHQL_FIELDS)."""

from __future__ import annotations

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    get_operation_ast,
)

from etlrouter.security import authz
from etlrouter.security.identity import Identity

_ROOT_TYPE = {"query": "Query", "mutation": "Mutation", "subscription": "Subscription"}


def _root_fields(selection: SelectionSetNode, fragments: dict[str, FragmentDefinitionNode]) -> set[str]:
    names: set[str] = set()
    seen: set[str] = set()
    stack = [selection]
    while stack:
        for node in stack.pop().selections:
            if isinstance(node, FieldNode):
                names.add(node.name.value)
            elif isinstance(node, InlineFragmentNode):
                stack.append(node.selection_set)
            elif isinstance(node, FragmentSpreadNode) and node.name.value not in seen:
                seen.add(node.name.value)
                fragment = fragments.get(node.name.value)
                if fragment is not None:
                    stack.append(fragment.selection_set)
    return names


def denial(identity: Identity | None, document: DocumentNode, operation_name: str | None) -> str | None:
    """Why `identity` may not run the operation (naming the field and the permission), or None."""
    if identity is None:
        return None  # security off
    operation = get_operation_ast(document, operation_name)
    if not isinstance(operation, OperationDefinitionNode):
        return None  # validation reports it
    type_name = _ROOT_TYPE[operation.operation.value]
    fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
    for field in sorted(_root_fields(operation.selection_set, fragments)):
        if field.startswith("__"):
            needed = authz.Permission.VIEWER  # introspection: the schema is no secret to a viewer
        else:
            needed = authz.graphql_field_permission(type_name, field)
        if not authz.holds(identity, needed):
            authz.DENIALS.report(identity, f"GraphQL {type_name}.{field}", needed.value, api="http")
            return f"{type_name}.{field}: permission denied for {identity}: requires {needed.value!r}"
    return None
