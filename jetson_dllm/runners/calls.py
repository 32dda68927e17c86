"""The loop protocol: a generation loop is a generator of `Call`s (a graph, its feeds, the model it runs on), sent
each call's outputs; `drive` runs one on one runner or on several (a speculative loop's drafter and verifier).

A call names its model (`Call.model`): MAIN, the model a loop was opened for, unless the loop drives several (a
speculative loop names DRAFT for its drafter's calls). `drive` takes one runner (every call is MAIN's) or a mapping
of model names to runners; the server's batcher, `--save-canvases` and parity go through the same names."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from jetson_dllm.errors import DllmError

if TYPE_CHECKING:
    from jetson_dllm.runners.protocol import Runner

MAIN = "main"  # the model a loop was opened for (the verifier of a speculative loop)
DRAFT = "draft"  # a speculative loop's drafter


@dataclass
class Call:
    """One network call a generation loop asks for: a graph, its feeds, what it returns (None: the graph's sampling
    outputs; ("logits",): a guided call's whole distributions, jetson_dllm.guidance) and the model it runs on."""

    graph: str
    feeds: dict[str, np.ndarray]
    outputs: tuple[str, ...] | None = None
    model: str = MAIN


R = TypeVar("R")


def runner_of(runners: Runner | Mapping[str, Runner], call: Call) -> Runner:
    """The runner a call names: one runner is every call's (a loop over one model), a mapping names each."""
    if not isinstance(runners, Mapping):
        if call.model != MAIN:
            raise DllmError(f"this loop calls the {call.model} model, but only one model was opened")
        return runners
    if call.model not in runners:
        raise DllmError(f"this loop calls the {call.model} model; the models open are {', '.join(runners)}")
    return runners[call.model]


def drive(runners: Runner | Mapping[str, Runner], loop: Generator[Call, dict[str, np.ndarray], R]) -> R:
    """Run a generation loop (a generator of Calls, sent each call's outputs) on one runner, or on the runners of a
    mapping from model names (each call runs on the one it names); the loop's return value."""
    try:
        call = next(loop)
        while True:
            call = loop.send(runner_of(runners, call).run(call.graph, call.feeds, call.outputs))
    except StopIteration as done:
        return done.value


def on_model(loop: Generator[Call, dict[str, np.ndarray], R], model: str) -> Generator[Call, dict[str, np.ndarray], R]:
    """A loop's calls, each named for `model` (a speculative loop runs its drafter's loop as DRAFT's calls)."""
    try:
        call = next(loop)
        while True:
            call = loop.send((yield replace(call, model=model)))
    except StopIteration as done:
        return done.value
