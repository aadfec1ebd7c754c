"""`python -m dyrate_ext.demo`: every pruning policy on one LLaVA-1.5 prompt (the `demo` extra)."""

from ._main import main, make_policies, parse_args, run_policy  # noqa: F401
