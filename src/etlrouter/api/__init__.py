"""The router's GraphQL API (schema in static/schema.graphql): `mount_graphql(app, node)` serves it at
/graphql on the router's aiohttp app, with subscriptions over graphql-transport-ws."""

from etlrouter.api.http import GRAPHQL_ENDPOINT, GraphQLEndpoint, mount_graphql

__all__ = ["GRAPHQL_ENDPOINT", "GraphQLEndpoint", "mount_graphql"]
