"""`python -m services.cli ...` is `wombat ...` (service processes are started this way)."""

from services.cli.app import app

app()
