"""Stack configs: one TOML file with a table per service, whose keys are the options of
`wombat serve <service>` (dashes or underscores); relative paths are relative to the file:

    [materializer]
    model-root = "models"
    port = 50051

A table left out is a service not started.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from wombat_core.errors import InvalidArgument, NotFound

SERVICES = ("materializer", "rrhf", "inference", "gateway")  # start order; stopped in reverse
PATH_OPTIONS = {"model", "model_root", "data_root", "state_dir", "tls_cert", "tls_key", "tls_client_ca",
                "auth_token_file", "api_key_file"}  # fmt: skip


@dataclass(frozen=True)
class ServiceSpec:
    """One service of the stack: its name and the options of `wombat serve <name>`."""

    name: str
    options: dict[str, object] = field(default_factory=dict)

    def argv(self) -> list[str]:
        """The command line after `wombat`: serve <name> --option value ..."""
        args = ["serve", self.name]
        for key, value in self.options.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, list):  # a repeatable option, e.g. the gateway's upstream = ["a", "b"]
                for item in value:
                    args += [flag, str(item)]
            else:
                args += [flag, str(value)]
        return args

    @property
    def drain_seconds(self) -> float:
        return float(self.options.get("drain_seconds", 30.0))


def load_stack_config(
    path: Path, check: Callable[[ServiceSpec], None] | None = None
) -> dict[str, ServiceSpec]:
    """Reads a stack config; `check` (the CLI passes one that parses the options with the real `wombat serve`
    command) runs on every service's spec, so a typo fails here with the option's name."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"stack config {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{path} is not valid TOML: {exc}") from exc
    specs: dict[str, ServiceSpec] = {}
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise InvalidArgument(f"{path}: {name!r} must be a table like [materializer]")
        options = {key.replace("-", "_"): value for key, value in table.items()}
        for key in PATH_OPTIONS & set(options):
            options[key] = str((path.parent / str(options[key])).resolve())
        if name not in SERVICES:
            raise InvalidArgument(f"{path}: unknown service [{name}]; the services are {', '.join(SERVICES)}")
        spec = ServiceSpec(name, options)
        if check is not None:
            check(spec)
        specs[name] = spec
    if not specs:
        raise InvalidArgument(
            f"{path} names no service; add a [materializer], [inference], [rrhf] or [gateway] table"
        )
    return specs
