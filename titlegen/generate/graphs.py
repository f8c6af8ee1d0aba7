"""One decoding step (one new token per row -> next-token scores) recorded once as a CUDA graph and replayed.

Why: a decoding step of an 8B model is ~450 kernel launches (32 layers of bitsandbytes, PEFT and transformers
Python), and at NF4 the host takes longer to issue them than the GPU takes to run them. A graph replays the whole
step with one launch. What a replay needs to be correct: every input in a fixed buffer (copied in before each
replay), the KV cache at fixed addresses written at a position held in a device tensor, and attention over the
cache's full capacity with the unwritten columns masked (:class:`titlegen.generate.loop.SlotCache`, static mode).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from titlegen.model.step_graphs import capture_autocast

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class GraphedStep:
    """``step(token, position, mask)`` for one batch shape and one cache, as a CUDA graph.

    Constructing it runs the step once for real (the warm-up every capture needs; its result is :attr:`first`),
    then records it. Calling it copies the inputs into the recorded buffers and replays; the returned tensor is
    overwritten by the next replay."""

    def __init__(self, step: Step, token: torch.Tensor, position: torch.Tensor, mask: torch.Tensor) -> None:
        device = token.device
        self.inputs = (token.clone(), position.clone(), mask.clone())
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), capture_autocast(device):
            self.first = step(*self.inputs).clone()  # lazy library set-up happens here, outside the capture
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # Its own memory pool: a pool handed from a graph that is gone trips an allocator assertion (torch 2.11).
        with capture_autocast(device), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output = step(*self.inputs)

    def __call__(self, token: torch.Tensor, position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for buffer, value in zip(self.inputs, (token, position, mask)):
            buffer.copy_(value)
        self.graph.replay()
        return self.output
