"""`python -m dyrate_ext.demo` (`make demo`): every pruning policy on one LLaVA-1.5 prompt.

Needs the `demo` extra (transformers, pillow, matplotlib, tqdm). Modules: `cli` (options and
`main`), `runner` (model and prompt loading, the policy list, timed runs), `report` (tables,
plot, markdown). The embedded model itself is `dyrate_ext.embedded`.
"""

from .cli import main, parse_args
from .runner import PolicyRun, generate_timed, make_policies

__all__ = ["PolicyRun", "generate_timed", "main", "make_policies", "parse_args"]
