"""`ldmrt serve`: the step batcher (ldmrt/serve/scheduler.py) and the HTTP app (its own API and AUTOMATIC1111's)
on the shipped model's engine (torch backend: built in seconds), few steps.

Batched against alone: the stepping itself is exact (tests/test_sampling.py: steppers batched == alone, bit for
bit, with a batch-invariant model). ONNX Runtime's CPU UNet and decoder are batch-invariant here, so a request
batched with others gives its alone latents and pixels bit for bit; the torch CPU UNet is not (its time-embedding
Linear runs as a GEMV at batch 1 and a GEMM at batch 8: 4.8e-7 apart), so there they agree within fp32 rounding,
checked at rel L2 <= 1e-5 (pixels within 1/255).
"""
import base64
import io
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from ldmrt import Engine  # noqa: E402
from ldmrt.errors import BusyError  # noqa: E402
from ldmrt.serve.app import create_app  # noqa: E402
from ldmrt.serve.scheduler import Scheduler  # noqa: E402
from helpers import rel_l2  # noqa: E402

PROMPTS = ["a large red circle on a white background", "a small blue square at the top left on a black background",
           "a green triangle at the bottom right on a yellow background"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine.build(None, tmp_path_factory.mktemp("serve") / "shapes", backend="torch", progress=lambda *a: None)


# Different samplers, step counts, guidance, batch sizes, feature caching and img2img: all in flight at once.
MIXED = [dict(prompt=PROMPTS[0], steps=4, seed=1),
         dict(prompt=PROMPTS[1], steps=6, sampler="Euler a", seed=2, guidance_scale=7.0),
         dict(prompt=PROMPTS[2], steps=5, sampler="dpmpp_2m", seed=3, batch_size=2, cache_interval=2),
         dict(prompt=PROMPTS[0], steps=5, sampler="DPM++ 2M Karras", seed=4, guidance_interval=(0, 0.5)),
         dict(prompt=PROMPTS[1], steps=4, seed=5, strength=0.6, init_image=np.full((64, 64, 3), 0.5, np.float32))]


def test_batched_requests_match_each_alone(engine):
    alone = [engine.generate(**r, output_type="latent") for r in MIXED]
    scheduler = Scheduler(engine)
    futures = [scheduler.submit(**r, output_type="latent") for r in MIXED]
    while scheduler.queue_depth or scheduler.active:
        scheduler.tick()
    # 4 + 6 + 5 + 5 + 2 evaluations (img2img at 0.6 runs 2 of 4): one call per tick and shape/branch group
    assert scheduler.metrics.unet_calls < 4 + 6 + 5 + 5 + 2
    for want, f in zip(alone, futures):
        got = f.result()
        assert got.shape == want.shape
        assert rel_l2(got, want) <= 1e-5


def test_batched_requests_bitwise_on_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    ort = Engine.build(None, tmp_path / "shapes-ort", backend="onnxruntime", progress=lambda *a: None)
    alone = [ort.generate(**r, output_type="np") for r in MIXED]
    scheduler = Scheduler(ort)
    futures = [scheduler.submit(**r, output_type="np") for r in MIXED]
    while scheduler.queue_depth or scheduler.active:
        scheduler.tick()
    assert scheduler.metrics.unet_calls < 4 + 6 + 5 + 5 + 2
    for want, f in zip(alone, futures):
        assert np.array_equal(f.result(), want)


def test_batched_images_and_decode(engine):
    """pil outputs through the batched decoder: the same parameters as Engine.generate's, pixels within 1/255."""
    scheduler = Scheduler(engine)
    requests = MIXED[:3]
    futures = [scheduler.submit(**r) for r in requests]
    while scheduler.queue_depth or scheduler.active:
        scheduler.tick()
    for r, f in zip(requests, futures):
        want = engine.generate(**r)
        got = f.result()
        assert [im.info["parameters"] for im in got] == [im.info["parameters"] for im in want]
        for a, b in zip(got, want):
            assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1


def test_one_at_a_time_mode_runs_requests_in_turn(engine):
    scheduler = Scheduler(engine, batching=False)
    futures = [scheduler.submit(**r, output_type="latent") for r in MIXED[:2]]
    scheduler.tick()
    assert scheduler.active == 1 and scheduler.queue_depth == 1
    while scheduler.queue_depth or scheduler.active:
        scheduler.tick()
    assert scheduler.metrics.unet_calls == 4 + 6  # every evaluation its own call
    alone = engine.generate(**MIXED[0], output_type="latent")
    assert torch.equal(futures[0].result(), alone)  # the same batch sizes as alone: bit for bit


def test_bad_requests_fail_alone_and_the_queue_is_bounded(engine):
    scheduler = Scheduler(engine, max_queue=2)
    bad = scheduler.submit(prompt=PROMPTS[0], steps=0)
    good = scheduler.submit(prompt=PROMPTS[0], steps=2, output_type="latent")
    with pytest.raises(BusyError, match="queue is full"):
        scheduler.submit(prompt=PROMPTS[0])
    while scheduler.queue_depth or scheduler.active:
        scheduler.tick()
    with pytest.raises(ValueError, match="steps"):
        bad.result()
    assert good.result().shape[0] == 1


def test_a_cancelled_request_leaves_at_the_next_tick(engine):
    scheduler = Scheduler(engine)
    futures = [scheduler.submit(prompt=p, steps=8, output_type="latent") for p in PROMPTS[:2]]
    scheduler.tick()
    assert scheduler.active == 2
    futures[0].cancel()
    scheduler.tick()
    assert scheduler.active == 1


# --- HTTP ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, max_queue=32, max_body_bytes=2 ** 20)) as c:
        yield c


def png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_a1111_client_flow(client):
    assert client.get("/v1/health").json()["status"] == "ok"
    names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert "Euler a" in names and "DPM++ 2M" in names
    model = client.get("/sdapi/v1/sd-models").json()[0]["title"]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == model
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": model}).status_code == 200
    body = {"prompt": PROMPTS[0], "negative_prompt": "", "steps": 3, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
            "cfg_scale": 6, "seed": -1, "width": 64, "height": 64, "batch_size": 2, "n_iter": 2,
            "styles": [], "enable_hr": False, "override_settings": {}, "alwayson_scripts": {}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert len(out["images"]) == 4 and 0 <= info["seed"] < 2 ** 32
    assert info["all_seeds"] == [info["seed"] + k for k in range(4)]
    assert info["ignored_fields"] == ["alwayson_scripts", "enable_hr", "override_settings", "styles"]
    for k, b64 in enumerate(out["images"]):
        image = png(b64)
        record = json.loads(image.info["parameters"])
        assert image.size == (64, 64) and record["seed"] == info["seed"] + k and record["steps"] == 3
        assert record["guidance_scale"] == 6 and record["sampler"] == "dpmpp_2m"
        assert record["timestep_spacing"] == "karras"
    assert out["parameters"]["seed"] == info["seed"]

    init = out["images"][0]
    r = client.post("/sdapi/v1/img2img", json={"prompt": PROMPTS[1], "init_images": [init], "steps": 4,
                                               "denoising_strength": 0.5, "seed": 9, "width": 64, "height": 64,
                                               "sampler_name": "Euler a"})
    assert r.status_code == 200, r.text
    record = json.loads(png(r.json()["images"][0]).info["parameters"])
    assert record["strength"] == 0.5 and record["seed"] == 9 and record["sampler"] == "euler_ancestral"


def test_sixteen_concurrent_clients_all_answered(client):
    results = [None] * 16

    def one(k):
        results[k] = client.post("/v1/generate", json={"prompt": PROMPTS[k % 3], "steps": 2 + k % 4, "seed": 100 + k,
                                                       "sampler": ["ddim", "Euler a", "dpmpp_2m", "plms"][k % 4]})
    threads = [threading.Thread(target=one, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, r in enumerate(results):
        assert r.status_code == 200, r.text
        (b64,), (params,) = r.json()["images"], r.json()["parameters"]
        record = json.loads(png(b64).info["parameters"])
        assert record == params
        assert (record["prompt"], record["seed"], record["steps"]) == (PROMPTS[k % 3], 100 + k, 2 + k % 4)
    metrics = client.get("/metrics").text
    assert "ldmrt_images_total" in metrics and "ldmrt_queue_depth 0" in metrics
    assert "ldmrt_step_seconds_count" in metrics


@pytest.mark.parametrize("body,status,message", [
    ({"prompt": PROMPTS[0], "steps": 0}, 422, "steps must be an integer"),
    ({"prompt": PROMPTS[0], "colour": "red"}, 422, "unknown field"),
    ({"prompt": PROMPTS[0], "init_image": "not base64!"}, 422, "init_image is not valid base64"),
    ({"prompt": PROMPTS[0], "init_image": base64.b64encode(b"no image").decode()}, 422, "cannot read image init_image"),
])
def test_generate_errors(client, body, status, message):
    r = client.post("/v1/generate", json=body)
    assert r.status_code == status and message in r.json()["detail"]


def test_bad_json_and_large_bodies(client):
    r = client.post("/sdapi/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", content=b"x" * (2 ** 20 + 1))
    assert r.status_code == 413
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": -2})
    assert r.status_code == 422 and "seed" in r.json()["detail"]


def test_full_queue_is_503_with_retry_after(engine):
    app = create_app(engine, max_queue=1)
    c = TestClient(app)  # outside `with`: no lifespan, so the scheduler does not run and the queue stays full
    app.state.scheduler.submit(prompt=PROMPTS[0], steps=2)  # holds the only slot
    r = c.post("/sdapi/v1/txt2img", json={"prompt": PROMPTS[0], "steps": 2})
    assert r.status_code == 503 and r.headers["retry-after"] == "5" and "queue is full" in r.json()["detail"]


def test_request_past_its_timeout_is_504_and_leaves(engine):
    app = create_app(engine, timeout_s=0.3)
    with TestClient(app) as c:
        r = c.post("/v1/generate", json={"prompt": PROMPTS[0], "steps": 500, "sampler": "Euler"})
        assert r.status_code == 504 and "timeout" in r.json()["detail"]
        scheduler = app.state.scheduler
        for _ in range(100):
            if not scheduler.active:
                break
            threading.Event().wait(0.02)
        assert scheduler.active == 0 and scheduler.queue_depth == 0


# --- a real server: `ldmrt serve` under uvicorn --------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(engine):
    """`ldmrt serve` in its own process on a free port; yields (base url, process)."""
    import socket
    import subprocess
    import sys
    import time

    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ldmrt.cli", "serve", "--engine", str(engine.path), "--port",
                             str(port), "--drain", "20"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/v1/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("ldmrt serve did not start: " + proc.communicate()[0][-2000:])
    yield url, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_webuiapi_client_unmodified(server):
    webuiapi = pytest.importorskip("webuiapi")
    url, _ = server
    host, port = url.rsplit("/", 1)[-1].split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    result = api.txt2img(prompt=PROMPTS[2], negative_prompt="", seed=7, steps=3, cfg_scale=5, width=64, height=64,
                         sampler_name="Euler a", batch_size=2)
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    assert result.info["all_seeds"] == [7, 8] and "enable_hr" in result.info["ignored_fields"]
    result = api.img2img(images=[result.image], prompt=PROMPTS[0], seed=3, steps=4, denoising_strength=0.5,
                         width=64, height=64)
    assert json.loads(result.info["infotexts"][0])["strength"] == 0.5
    assert [s["name"] for s in api.get_samplers()][:2] == ["Euler a", "Euler"]


def test_disconnected_client_frees_its_slot(server):
    import time

    import httpx
    url, _ = server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/generate", json={"prompt": PROMPTS[0], "steps": 500, "sampler": "Euler"}, timeout=1.0)
    for _ in range(100):  # the server notices within its poll interval plus one tick
        if httpx.get(url + "/v1/health").json()["active"] == 0:
            break
        time.sleep(0.05)
    assert httpx.get(url + "/v1/health").json() == {**httpx.get(url + "/v1/health").json(), "active": 0,
                                                   "queue_depth": 0}


def test_sigterm_drains_in_flight_requests(server):
    """Runs last on the module's server: SIGTERM while a request runs; it is answered, then the process exits."""
    import signal
    import time

    import httpx
    url, proc = server
    answer = {}

    def one():
        answer["r"] = httpx.post(url + "/v1/generate", json={"prompt": PROMPTS[1], "steps": 40, "seed": 5}, timeout=60)
    t = threading.Thread(target=one)
    t.start()
    for _ in range(100):
        if httpx.get(url + "/v1/health").json()["active"]:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert answer["r"].status_code == 200 and json.loads(png(answer["r"].json()["images"][0]).info["parameters"])[
        "steps"] == 40
    # uvicorn re-raises the signal once it has shut down cleanly (so the exit reads as SIGTERM's), or exits 0
    assert proc.wait(30) in (0, -signal.SIGTERM)
    assert "Finished server process" in proc.stdout.read()


# --- Ray Serve --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_serve_two_replicas(engine):
    """`ldmrt serve --ray --replicas 2` on a local Ray instance: requests are answered by both replicas, each with
    its own engine. Slow (Ray starts in about half a minute): LDMRT_SLOW=reduced sends 8 requests, =1 32."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from concurrent.futures import ThreadPoolExecutor

    if not os.environ.get("LDMRT_SLOW"):
        pytest.skip("slow: set LDMRT_SLOW=reduced (a local Ray instance with two CPU replicas)")
    pytest.importorskip("ray.serve")
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "ldmrt.cli", "serve", "--engine", str(engine.path), "--ray",
                             "--replicas", "2", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for _ in range(900):
            try:
                if httpx.get(url + "/v1/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                pytest.fail("ldmrt serve --ray exited: " + proc.stdout.read()[-3000:])
            time.sleep(0.2)
        else:
            pytest.fail("ldmrt serve --ray did not start within 180 s")
        n = 32 if os.environ["LDMRT_SLOW"] == "1" else 8

        def one(k):
            return httpx.post(url + "/sdapi/v1/txt2img", timeout=300,
                              json={"prompt": PROMPTS[k % 3], "steps": 4, "seed": k, "width": 64, "height": 64})
        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(one, range(n)))
        for k, r in enumerate(answers):
            assert r.status_code == 200, r.text
            assert json.loads(png(r.json()["images"][0]).info["parameters"])["seed"] == k
        pids = {httpx.get(url + "/v1/health", timeout=30).json()["pid"] for _ in range(40)}
        assert len(pids) == 2
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # serve.run's driver shuts Serve and its local Ray down
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
