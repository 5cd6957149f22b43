"""``python -m timm_stitch.cli``: the ``timm-stitch`` command."""
from . import main

raise SystemExit(main())
