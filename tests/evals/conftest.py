"""The evals tests share the session's miniature evidence pool (``tiny_pool``, in
tests/conftest.py, which the testbed's own tests use too)."""
