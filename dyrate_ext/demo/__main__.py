"""Entry point of `python -m dyrate_ext.demo`."""

from ._main import main

raise SystemExit(main())
