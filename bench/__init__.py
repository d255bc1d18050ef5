"""Benchmark jobs: accuracy, FLOPs and throughput over the method registry."""
