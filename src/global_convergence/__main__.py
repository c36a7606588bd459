"""``python -m global_convergence`` is ``gconv``."""
from .cli import main

raise SystemExit(main())
