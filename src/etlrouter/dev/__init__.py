"""`etlrouter dev`: the whole system on one machine (routers, reference services, sidecars) on loopback."""

from etlrouter.dev.runner import DevError, DevOptions, run_dev
from etlrouter.dev.spec import DevSpec, ServiceSpec, SpecError, load_spec

__all__ = ["DevError", "DevOptions", "DevSpec", "ServiceSpec", "SpecError", "load_spec", "run_dev"]
