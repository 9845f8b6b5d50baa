"""`wombat generate`: stream a completion from an inference server, token by token."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from services.cli import render
from services.cli.common import JsonOpt, client_settings, rpc

app = typer.Typer()


@app.command()
def generate(
    instruction: Annotated[
        str, typer.Argument(help="the instruction (alpaca), the text (raw) or the user turn (chat)")
    ],
    server: Annotated[str, typer.Option(help="HOST:PORT of an inference server")],
    template: Annotated[str | None, typer.Option(help="raw, alpaca or chat (default: the server's)")] = None,
    input_text: Annotated[str, typer.Option("--input", help="alpaca input section")] = "",
    max_tokens: Annotated[int, typer.Option(help="max new tokens")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.7,
    top_p: Annotated[float, typer.Option(help="nucleus mass")] = 1.0,
    top_k: Annotated[int, typer.Option(help="0 disables")] = 0,
    repetition_penalty: Annotated[float, typer.Option(help="1 disables")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="reproducible sampling")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="stop sequence (repeatable)")] = None,
    timeout: Annotated[float, typer.Option(help="deadline in seconds")] = 300.0,
    json_output: JsonOpt = False,
) -> None:
    """Stream a completion from an inference server, token by token."""
    from clients.inference import InferenceClient, prompt, sampling
    from wombat.inference.v1 import inference_pb2 as pb

    if template == "chat":
        prompt_input = prompt(format="chat", messages=[("user", instruction)])
    else:
        prompt_input = prompt(instruction, format=template, input=input_text)
    params = sampling(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                      repetition_penalty=repetition_penalty, stop=stop or [])  # fmt: skip
    if seed is not None:
        params.seed = seed
    final = None

    def stream() -> None:
        nonlocal final
        with InferenceClient(client_settings(server), timeout=timeout) as client:
            for response in client.generate(prompt_input, params):
                if json_output:
                    render.print_json("token", response)
                else:
                    sys.stdout.write(response.text)
                    sys.stdout.flush()
                if response.finish_reason:
                    final = response

    rpc(stream)
    if not json_output and final is not None:
        reason = pb.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_").lower()
        render.console.print(
            f"\n[dim]{final.usage.completion_tokens} tokens, {reason}, "
            f"first token {final.timings.time_to_first_token_seconds * 1000:.0f} ms, "
            f"total {final.timings.total_seconds:.1f} s[/dim]"
        )
