"""python -m flexio -> flexio.cli.main."""

from .cli import main

raise SystemExit(main())
