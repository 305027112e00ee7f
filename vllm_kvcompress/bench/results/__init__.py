"""``make results``: docs/results.md from what ``make bench`` leaves under ``runs/`` (``page``
assembles it, one module per section)."""
