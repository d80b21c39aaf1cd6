"""AOTInductor backend: the `<graph>.pt2` packages of export/aoti.py, run by AOTInductor's model container.

These are the very files a C++ host runs (csrc/engine.cpp), so Python and C++ compute the same numbers
given the same thread count: the packages are compiled with inductor's `cpp.dynamic_threads`, so their
kernels split work over the threads of the calling process (torch.set_num_threads / at::set_num_threads).

A package's weights live in its shared library; LoRA changes them in place (set_weight_deltas). Python opens the
library with the container runner itself (torch._C._aoti.AOTIModelContainerRunnerCpu, what the C++
AOTIModelPackageLoader holds), because only the runner hands out its weights, which are kept to switch back to the
base bit for bit. The export also writes `lora_targets.json` (LoRA module name -> weight name, ldmrt/lora.py
target_names) for C++ hosts, which cannot compute it from the model config.
"""
from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import torch

from ..manifest import graph_files
from .base import Backend, Exported

NAME = "aoti"
EXTRA = None
REQUIRES = ()
OPTIONS = ()
LORA_TARGETS = "lora_targets.json"  # csrc/engine.cpp kLoraTargets


def export(model, out, *, summary, fp16, progress) -> Exported:
    from ..export.aoti import MAX_BATCH, MAX_LATENT, export_aoti
    from ..export.graphs import MAX_CONTEXT_WINDOWS
    from ..lora import target_names
    graphs = export_aoti(model, out, fp16=fp16, progress=progress)
    weights = [name for name, p in model.named_parameters() if p.dim() in (2, 4)]
    targets: dict[str, dict[str, str]] = {}
    for (component, module), name in target_names(weights, model.ldmrt_config).items():
        targets.setdefault(component, {})[module] = name
    if targets:
        (Path(out) / LORA_TARGETS).write_text(json.dumps(targets, indent=0, sort_keys=True))
    # MAX_BATCH bounds the UNet's batch, which guidance doubles.
    return Exported("fp16" if fp16 else "fp32", graphs, "cpu", {
        "batch": [1, MAX_BATCH // 2], "size_multiple": summary["size_multiple"],
        "max_size": MAX_LATENT * summary["latent_factor"],
        **({"max_context_windows": MAX_CONTEXT_WINDOWS} if summary.get("long_prompts") else {})})


def load(folder, manifest, **_) -> "AotiBackend":
    return AotiBackend(manifest["graphs"], graph_files(folder, manifest))


def open_runner(package: Path):
    """The model container of an AOTInductor package (a zip holding `<name>/data/aotinductor/model/*.so`), as
    AOTIModelPackageLoader opens it: the library is extracted to a temporary folder, which may go once it is loaded."""
    with zipfile.ZipFile(package) as archive, tempfile.TemporaryDirectory(prefix="ldmrt-aoti-") as tmp:
        libraries = [n for n in archive.namelist() if PurePosixPath(n).parent.parts[-3:] == ("data", "aotinductor", "model")
                     and n.endswith(".so")]
        if len(libraries) != 1:
            raise RuntimeError(f"{package} holds {len(libraries)} model libraries, not 1")
        return torch._C._aoti.AOTIModelContainerRunnerCpu(archive.extract(libraries[0], tmp), 1)


class AotiBackend(Backend):
    def __init__(self, graphs: dict[str, dict], files: dict[str, Path], device: str = "cpu"):
        """graphs: the manifest's {graph: {"file", "inputs", "outputs"}} (export.aoti.export_aoti); files: their
        checked paths."""
        super().__init__({name: (g["inputs"], g["outputs"]) for name, g in graphs.items()})
        self.device = torch.device(device)
        self._runners = {name: open_runner(files[name]) for name in graphs}
        # {graph: {weight name (the model's parameter name): the runner's own constant name}}
        self._constants = {name: {fqn: own for own, fqn in runner.get_constant_names_to_original_fqns().items()}
                           for name, runner in self._runners.items()}
        self._base_weights: dict[tuple[str, str], torch.Tensor] = {}  # (graph, weight) -> loaded value, while changed

    def _run(self, graph: str, inputs: list[torch.Tensor]):
        with torch.inference_mode():
            return self._runners[graph].run([x.to(self.device).contiguous() for x in inputs])

    # --- weights changed in place (LoRA: ldmrt/lora.py) -----------------------------------------------------
    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """{weight name: shape} of the 2-d and 4-d weights the packages hold (any graph)."""
        return {fqn: tuple(w.shape) for runner in self._runners.values()
                for fqn, w in runner.extract_constants_map(False).items() if w.dim() in (2, 4)}

    def set_weight_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        """Each weight of every graph = its loaded value + deltas.get(name) (summed in float32, cast to its dtype),
        written into the package's own buffer. The loaded values of changed weights are kept (a copy); one without
        a delta gets them back bit for bit, and they are dropped."""
        for graph, runner in self._runners.items():
            constants = runner.extract_constants_map(False)  # the live buffers (aliases)
            names = self._constants[graph]
            touched = [n for n in names if n in deltas or (graph, n) in self._base_weights]
            if not touched:
                continue
            update = {}
            for name in touched:
                if (graph, name) not in self._base_weights:
                    self._base_weights[graph, name] = constants[name].clone()
                base = self._base_weights[graph, name]
                if name in deltas:
                    update[names[name]] = (base.float() + deltas[name]).to(base.dtype)
                else:
                    update[names[name]] = self._base_weights.pop((graph, name))
            runner.update_constant_buffer(update, False, False)
