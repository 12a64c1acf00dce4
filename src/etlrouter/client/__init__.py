"""Clients of the router cluster, used by every role that talks to it (sidecar, ctl, operator, dev, api).

Kept apart from `etlrouter.router` (the server) so that importing the client does not make a role look as if
it depended on the router's server code.
"""
