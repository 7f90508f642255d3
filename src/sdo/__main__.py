"""``python -m sdo``: the same as the ``sdo`` command."""

from .cli.app import main

raise SystemExit(main())
