"""`ldmrt demo`: the README's main job, end to end.

Builds the ONNX Runtime engine of the shipped model (the text-to-image LDM this project trains on
captioned shapes, ldmrt/assets/shapes) into engines/shapes, generates an image for a prompt with the
C++ sampler loop, and says where it went and how long each part took.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

# The shipped model follows every attribute a prompt can state: colour, kind, size, position, background.
PROMPT = "a large red circle in the top left on a gray background"


def run_demo(output="out.png", *, prompt: str = PROMPT, engine_dir="engines/shapes", steps: int = 30,
             seed: int = 0, backend: str = "onnxruntime"):
    from .cli import write_png
    from .engine import DEFAULT_MODEL, Engine, EngineError

    t0 = time.perf_counter()
    engine_dir = Path(engine_dir)
    engine = None
    if engine_dir.exists():
        try:
            engine = Engine.load(engine_dir)
            how = f"loaded {engine_dir}"
            if engine.manifest["model"].get("name") != DEFAULT_MODEL:
                print(f"ldmrt demo: rebuilding {engine_dir} (it holds another model)")
                engine = None
        except EngineError as e:
            print(f"ldmrt demo: rebuilding {engine_dir} ({e})")
    if engine is None:
        engine = Engine.build(DEFAULT_MODEL, engine_dir, backend=backend, progress=None)
        how = f"built {engine_dir} from the shipped model '{DEFAULT_MODEL}'"
    t1 = time.perf_counter()
    image = engine.generate(prompt, steps=steps, seed=seed, progress=True)[0]
    t2 = time.perf_counter()
    out = Path(output)
    write_png(image, out, {"parameters": json.dumps({"prompt": prompt, "steps": steps, "seed": seed})})
    print(f"ldmrt demo: wrote {out.resolve()} ({image.width}x{image.height}), prompt {prompt!r}\n"
          f"  engine: {how} ({engine.manifest['backend']}, {engine.manifest['precision']}) in {t1 - t0:.1f} s\n"
          f"  generate: {steps} DDIM steps with guidance, C++ sampler loop, in {t2 - t1:.1f} s")
    return out

