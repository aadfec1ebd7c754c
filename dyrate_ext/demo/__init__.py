"""`python -m dyrate_ext.demo` (`make demo`): every pruning policy on one LLaVA-1.5 prompt.

Needs the `demo` extra (transformers, pillow, matplotlib, tqdm). Modules: `cli` (options and
`main`), `runner` (model and prompt loading, the policy list, timed runs), `report` (tables,
plot, markdown). The embedded model itself is `dyrate_ext.llava.embedded`.
"""

from .cli import main, parse_args
from .runner import PolicyRun, make_policies, run_policy

__all__ = ["PolicyRun", "main", "make_policies", "parse_args", "run_policy"]
