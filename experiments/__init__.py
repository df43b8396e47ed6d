"""Training experiments, tasks, configs and benchmarks built on attnjax."""
