"""Benchmarks (not tests): training throughput (``aeforge bench``, bench_train) and the queue's (bench_queue)."""
