"""The `wombat` command line: the composition root where the command families are assembled.

Each family lives in its own module: `models` (materialise, make-delta, convert, verify,
prepare-demo-model), `serve` (the three services), `rrhf` (score, train, jobs), `generate`, `stack`
(up, down) and `demo` (the whole lifecycle).

Every option can also come from the environment as WOMBAT_<COMMAND>_<OPTION>, e.g.
WOMBAT_SERVE_INFERENCE_MAX_BATCH_SIZE: Kubernetes ConfigMaps and `wombat up` configure services this way.
Client commands take the bearer token from $WOMBAT_AUTH_TOKEN, and TLS from $WOMBAT_TLS_CA_FILE (the CA
that signed the server's certificate), plus $WOMBAT_TLS_CERT_FILE and $WOMBAT_TLS_KEY_FILE for mutual TLS.
"""

from __future__ import annotations

import typer

from services.cli import demo, generate, models, rrhf, serve, stack

# Locals are never shown in tracebacks: they could hold auth tokens.
app = typer.Typer(
    context_settings={"auto_envvar_prefix": "WOMBAT"},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Serve and train RRHF-tuned LLaMA models.",
)
app.add_typer(models.app)
app.add_typer(serve.app, name="serve")
app.add_typer(rrhf.app)
app.add_typer(rrhf.jobs_app, name="jobs")
app.add_typer(generate.app)
app.add_typer(stack.app)
app.add_typer(demo.app)
