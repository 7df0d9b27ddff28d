"""diffsplit.remote package."""
