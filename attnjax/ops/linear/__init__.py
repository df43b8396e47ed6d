"""Linear attention ``phi(Q) (phi(K)^T V)``: ``api`` (validation, feature maps, dispatch),
``reference`` (the dense weights), ``xla`` (key summaries; causal through lightning attention
without decay). Its pallas path is lightning attention's kernel, reached through ``xla.causal``."""
