"""Stand-alone measurements (``python -m compress.benchmarks.<name>``), not pipeline stages."""
