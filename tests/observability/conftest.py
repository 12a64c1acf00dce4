from tests.e2e.conftest import system

__all__ = ["system"]
