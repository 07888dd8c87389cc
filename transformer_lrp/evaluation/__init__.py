"""The paper's evaluations (docs/method.md §6): metrics, benchmarks built offline from real material, a batched runner
that shards across processes, and results tables. ``transformer-lrp evaluate`` runs them on the real-weights models."""
