"""Benchmarks and reference transfers used to measure VTL against kernel TCP."""
