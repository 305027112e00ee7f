"""Long-context accuracy evaluation (``kvcompress eval``)."""
