"""diffsplit.tracer package."""
