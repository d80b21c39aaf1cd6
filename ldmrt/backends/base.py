"""The one interface of every backend, with the input checks and output conversion they share."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from ..errors import EngineError, LdmrtError


class MissingGraphError(EngineError, KeyError):
    """A graph the request needs that the engine does not hold."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0])


class Exported(NamedTuple):
    """What a backend's export writes into the manifest."""
    precision: str  # "fp32", "fp16" or "bf16": what the graphs compute in
    graphs: dict  # {graph: {"file": ..., ...}}: every path relative to the engine folder
    device: str | dict  # "cpu", "cuda[:i]", or a device record (TensorRT's fingerprint)
    shapes: dict | None = None  # the shape limits compiled in (None: any multiple of the size multiple)


class Backend:
    """`.graphs` (the names it holds), `.device`, and `.run(graph, **inputs) -> {output name: tensor}`.

    Inputs are torch tensors, float32 or int64 (export/graphs.py), which the backend casts to its precision.
    Outputs are float32 CPU tensors, or device tensors when every input was on a CUDA device (a caller that
    keeps its data on the GPU gets no host round trip). Subclasses give `io` and implement `_run`.
    """
    device = torch.device("cpu")

    def __init__(self, io: dict[str, tuple[Sequence[str], Sequence[str]]]):
        self._io = {name: (list(inputs), list(outputs)) for name, (inputs, outputs) in io.items()}

    @property
    def graphs(self) -> tuple[str, ...]:
        return tuple(self._io)

    def input_names(self, graph: str) -> list[str]:
        return list(self._io[graph][0]) if graph in self._io else []

    def run(self, graph: str, **inputs) -> dict[str, torch.Tensor]:
        if graph not in self._io:
            raise MissingGraphError(f"no graph {graph!r} in this engine; it has {', '.join(self._io)} (rebuild it "
                                    f"with this ldmrt for this model's tasks)")
        names, output_names = self._io[graph]
        if set(inputs) != set(names):
            raise TypeError(f"graph {graph!r} takes inputs {', '.join(names)}; got {', '.join(inputs) or 'none'}")
        tensors = [torch.as_tensor(inputs[n]) for n in names]
        try:
            outputs = self._run(graph, tensors)
        except LdmrtError:
            raise
        except Exception as e:  # the runtime's own error: say which graph, on what, and what to do
            shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, tensors))
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EngineError(f"the {graph} graph failed on {shapes} ({type(e).__name__}: {msg}); if the engine "
                              f"folder was edited, rebuild it") from e
        on_device = all(t.is_cuda for t in tensors)
        # On the device a copy: backends may answer from static buffers that their next call overwrites.
        return {n: o.to(torch.float32, copy=True) if on_device and o.is_cuda else o.to("cpu", torch.float32)
                for n, o in zip(output_names, outputs)}

    def _run(self, graph: str, inputs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        """The graph's outputs, in its output order, for its inputs in its input order."""
        raise NotImplementedError
