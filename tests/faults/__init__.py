"""Fault-injection tests. A package, so that its conftest imports as `faults.conftest` and `from conftest import`
still means tests/conftest.py."""
