"""`python -m dyrate_ext.demo`: see `dyrate_ext.demo.cli`."""

from .cli import main

raise SystemExit(main())
