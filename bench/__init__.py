"""DeepSpeed parallelism benchmark harness."""
