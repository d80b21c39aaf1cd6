"""`ldmrt demo`: the README's main job, end to end.

Builds the ONNX Runtime engine of the shipped model (the text-to-image LDM this project trains on
captioned shapes, ldmrt/assets/shapes) into engines/shapes, generates an image for a prompt with the
C++ sampler loop, and says where it went and how long each part took. Without the shipped weights
(a checkout from before they landed) it says so and runs the txt2img architecture at reduced width
with random weights through the same engine path: the image is then noise by construction.
"""
from __future__ import annotations

import time
from pathlib import Path

PROMPT = "a red circle on the left of a blue background"


def run_demo(output="out.png", *, prompt: str = PROMPT, engine_dir="engines/shapes", steps: int = 30,
             seed: int = 0, backend: str = "onnxruntime"):
    from .cli import write_png
    from .config import shipped_checkpoint
    from .engine import DEFAULT_MODEL, Engine, EngineError

    t0 = time.perf_counter()
    engine_dir = Path(engine_dir)
    shipped = shipped_checkpoint(DEFAULT_MODEL) is not None
    engine = None
    if shipped and engine_dir.exists():
        try:
            engine = Engine.load(engine_dir)
            how = f"loaded {engine_dir}"
            if engine.manifest["model"].get("name") != DEFAULT_MODEL:
                print(f"ldmrt demo: rebuilding {engine_dir} (it holds another model)")
                engine = None
        except EngineError as e:
            print(f"ldmrt demo: rebuilding {engine_dir} ({e})")
    if engine is None:
        if shipped:
            engine = Engine.build(DEFAULT_MODEL, engine_dir, backend=backend, progress=None)
            how = f"built {engine_dir} from the shipped model '{DEFAULT_MODEL}'"
        else:
            engine_dir = engine_dir.with_name("demo-random-weights")
            engine = _random_weight_engine(engine_dir, backend)
            how = (f"built {engine_dir}: NO shipped weights in this checkout, so the txt2img architecture at "
                   "reduced width with RANDOM weights (the image is noise)")
    t1 = time.perf_counter()
    image = engine.generate(prompt, steps=steps, seed=seed, progress=True)[0]
    t2 = time.perf_counter()
    out = Path(output)
    write_png(image, out, {"parameters": f'{{"prompt": "{prompt}", "steps": {steps}, "seed": {seed}}}'})
    print(f"ldmrt demo: wrote {out.resolve()} ({image.width}x{image.height}), prompt {prompt!r}\n"
          f"  engine: {how} ({engine.manifest['backend']}, {engine.manifest['precision']}) in {t1 - t0:.1f} s\n"
          f"  generate: {steps} DDIM steps with guidance, C++ sampler loop, in {t2 - t1:.1f} s")
    return out


def _random_weight_engine(engine_dir: Path, backend: str):
    import tempfile

    from .engine import Engine
    from .testing import reduced_config
    words = sorted(set(PROMPT.split()))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
        cfg = reduced_config("txt2img")
        cfg["params"]["image_size"] = 16
        return Engine.build(cfg, engine_dir, backend=backend, random_weights=True, tokenizer=d, progress=None)
