"""Which initializers of an exported ONNX graph hold which model weights, for swapping weights without a
rebuild (LoRA: ldmrt/lora.py; backends onnxruntime, openvino, tensorrt).

The TorchScript exporter (export/onnx.py) keeps a parameter's name as its initializer's where the operator
takes the weight as it is (Conv, Gemm). A Linear on 3-d input becomes MatMul(x, W^T), and constant folding
stores W^T under a generated name (`onnx::MatMul_123`); the MatMul node's name carries the module scope
(`/model/diffusion_model/input_blocks.1/input_blocks.1.1/.../attn1/to_q/MatMul`), which names the weight.
Scopes are recorded only for modules called through __call__: a submodule's method (DeepCache's shallow pass)
drops its module from the scope (`/model/output_blocks.8/...`). The weights the graph keeps under their own names
(the Conv layers' beside that MatMul) show each such gap, which is filled from them (scope_rules).
"""
from __future__ import annotations

from typing import NamedTuple

import onnx


class WeightInitializer(NamedTuple):
    initializer: str
    transposed: bool  # the initializer holds W^T (a Linear exported as MatMul)
    shape: tuple[int, ...]  # the weight's shape, torch's layout


def weight_initializers(graph: onnx.GraphProto) -> dict[str, WeightInitializer]:
    """{model weight name (torch's, e.g. model.diffusion_model....to_q.weight): its initializer} for every 2-d
    and 4-d weight the graph holds on its own (an initializer shared by several nodes is left out: it could
    not change for one module alone)."""
    inits = {i.name: tuple(i.dims) for i in graph.initializer}
    uses: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            if name in inits:
                uses.setdefault(name, []).append(node)
    single = {name: nodes[0] for name, nodes in uses.items() if len(nodes) == 1 and len(inits[name]) in (2, 4)}
    weights = {name: WeightInitializer(name, False, inits[name]) for name in single if name.endswith(".weight")}
    # Every parameter kept by name (biases and norms too) pairs the scope of a node with its module's path.
    rules = scope_rules([(scope_module(node.name), name.rpartition(".")[0]) for name, nodes in uses.items()
                         if name.endswith((".weight", ".bias")) for node in nodes])
    for name, node in single.items():
        if name in weights or node.op_type != "MatMul" or len(inits[name]) != 2 or list(node.input).index(name) != 1:
            continue
        module = resolve(scope_module(node.name), rules)
        if module:
            weights[module + ".weight"] = WeightInitializer(name, True, inits[name][::-1])
    return weights


def scope_rules(pairs) -> dict[tuple[str, ...], tuple[str, ...] | None]:
    """{scope prefix: module path prefix} learnt from (scope path, module path) pairs of the same modules: each
    pair differs only before their longest common tail, whose first name anchors the rule (`model.output_blocks` ->
    `model.diffusion_model.output_blocks`; `layers` -> `cond_stage_model.transformer.text_model.encoder.layers`).
    None where pairs disagree (not resolved)."""
    rules: dict = {}
    for scope, module in pairs:
        if scope is None:
            continue
        s, m = scope.split("."), module.split(".")
        tail = 0
        while tail < min(len(s), len(m)) and s[-1 - tail] == m[-1 - tail]:
            tail += 1
        anchor = min(len(s) - tail + 1, len(s))
        key, value = tuple(s[:anchor]), tuple(m[: len(m) - len(s) + anchor])
        rules[key] = value if rules.get(key, value) == value else None
    return rules


def resolve(scope: str | None, rules: dict) -> str | None:
    """The module path of a scope path: the rule of its longest matching scope prefix applied (None when that
    rule is ambiguous or the graph has no named weights to learn from)."""
    if scope is None:
        return None
    parts = tuple(scope.split("."))
    for n in range(len(parts), -1, -1):
        if parts[:n] in rules:
            value = rules[parts[:n]]
            return None if value is None else ".".join(value + parts[n:])
    return None


def scope_module(node_name: str) -> str | None:
    """The dotted module path of a TorchScript-exported node name: `/model/diffusion_model/input_blocks.1/
    input_blocks.1.1/transformer_blocks.0/ff/net/net.0/proj/MatMul` -> `model.diffusion_model.input_blocks.1.1.
    transformer_blocks.0.ff.net.0.proj` (a scope inside a container repeats the container's name)."""
    parts = node_name.split("/")
    if len(parts) < 3 or parts[0]:
        return None
    path: list[str] = []
    for scope in parts[1:-1]:
        if path and scope.startswith(path[-1] + "."):  # input_blocks.1 -> input_blocks.1.1: a child of it
            path[-1] = scope
        else:
            path.append(scope)
    return ".".join(path)
