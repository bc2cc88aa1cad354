"""Tools that drive a cluster from outside: the benchmark, the chaos test, the fault proxy."""
