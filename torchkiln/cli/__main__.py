"""``python -m torchkiln.cli``: the ``kiln`` command without the installed script (runs from source)."""

from torchkiln.cli import console_main

console_main()
