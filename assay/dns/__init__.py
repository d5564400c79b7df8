"""DNS egress allow-lists: a resolver proxy for the scope whose answers for listed names put their
addresses into the net tries before the answer reaches the workload (docs/egress.md)."""
