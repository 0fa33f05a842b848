"""Benchmarks shipped with the package (console scripts), e.g. ``lightning-moe-bench-routers``."""
