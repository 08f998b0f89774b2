"""What generated wrapper modules use when they run: the arena pool, slots, input checks
(``wrapper_support``), and how their source is loaded (``wrapper_cache``). Imports nothing above
``fxpress.core``."""
