"""CUDA graphs for the per-step UNet call: capture once per input shape, then replay.

A UNet step at SD sizes launches ~1,000 small kernels; replaying them from a captured graph removes the
per-launch CPU cost (Python, dispatcher, Triton launcher), which otherwise bounds the step time at batch
1-2 on a fast GPU. The sampler loop calls the UNet with the same shapes every step, so one capture per
shape serves a whole generation.
"""
from __future__ import annotations

from typing import Callable

import torch


class CudaGraphRunner:
    """Calls `fn(*inputs)` by replaying a CUDA graph captured for the inputs' shapes and dtypes.

    The first call with a new (shape, dtype) signature copies the inputs into static device buffers, runs
    `fn` `warmup` times on a side stream (Triton compiles, cuBLAS/cuDNN choose algorithms, the caching
    allocator settles), then once under capture. Every call copies its inputs (CPU or CUDA tensors) into
    the buffers and replays. The result is the graph's own static output (a tensor, or whatever structure
    of tensors `fn` returns): the next call with the same shapes overwrites it, so copy what you keep.
    Each captured shape keeps its private memory pool (activations of one `fn` call) until `clear()`.

    `fn` must be capturable: no host synchronisation (.item(), .cpu(), data-dependent Python branches) and
    no host-to-device copies of its own (move constant tensors to the device before the first call).
    """

    def __init__(self, fn: Callable, device: str | torch.device = "cuda", warmup: int = 2):
        self.fn = fn
        self.device = torch.device(device)
        self.warmup = warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], object]] = {}

    def __call__(self, *inputs: torch.Tensor):
        signature = tuple((tuple(x.shape), x.dtype) for x in inputs)
        if signature not in self.graphs:
            self.graphs[signature] = self._capture(inputs)
        graph, static_inputs, static_outputs = self.graphs[signature]
        for buffer, x in zip(static_inputs, inputs):
            buffer.copy_(x, non_blocking=True)
        graph.replay()
        return static_outputs

    def clear(self):
        """Drop every captured graph and its memory."""
        self.graphs.clear()

    def _capture(self, inputs):
        # Normal tensors even when called under inference_mode, so that later calls made outside it may
        # still copy into the static inputs.
        with torch.inference_mode(False), torch.no_grad(), torch.cuda.device(self.device):
            return self._capture_on_device(inputs)

    def _capture_on_device(self, inputs):
        static_inputs = [x.to(self.device, copy=True) for x in inputs]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static_inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_outputs = self.fn(*static_inputs)
        return graph, static_inputs, static_outputs
