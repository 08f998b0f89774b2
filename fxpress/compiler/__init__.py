"""Backend entry, capture, options, the pass pipeline, flags and inspection."""
