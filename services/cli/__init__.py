"""The `wombat` command line (wiring above the core, beside the services; assembled in `app.py`)."""
