"""Analysis of finished runs: per-document results and statistics over them (pure functions, no I/O but reading)."""
