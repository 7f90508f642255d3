"""``python -m sdo``: the same as the ``sdo`` command."""

from .cli import main

raise SystemExit(main())
