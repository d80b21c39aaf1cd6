"""CudaGraphRunner (ldmrt.backends.cuda_graphs): replayed UNet steps equal eager ones. Needs CUDA."""
import pytest
import torch

from ldmrt.backends.cuda_graphs import CudaGraphRunner
from ldmrt.models.unet import UNetModel
from helpers import rel_l2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@pytest.fixture(scope="module")
def unet():
    """A tiny SD-architecture UNet in fp16, channels-last, as the CUDA backend runs it."""
    torch.manual_seed(0)
    model = UNetModel(image_size=16, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                      attention_resolutions=[1, 2], channel_mult=[1, 2], num_heads=4, use_spatial_transformer=True,
                      context_dim=24, legacy=False)
    return model.to("cuda", torch.float16, memory_format=torch.channels_last).eval()


def step_fn(unet):
    return lambda x, t, context: unet(x.half(), t, context=context.half()).float()


def inputs(batch, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 16, 16, generator=gen), torch.full((batch,), 321.0),
            torch.randn(batch, 5, 24, generator=gen))


def test_replay_matches_eager_and_caches_per_shape(unet):
    runner = CudaGraphRunner(step_fn(unet), "cuda")
    eager = step_fn(unet)
    for batch, seed in ((2, 0), (2, 1), (1, 2), (2, 3)):
        cpu_inputs = inputs(batch, seed)  # CPU inputs, as the sampler hands them to a backend
        out = runner(*cpu_inputs).cpu()
        with torch.no_grad():
            ref = eager(*(x.cuda() for x in cpu_inputs)).cpu()
        # Same kernels, same order: only atomics or algorithm choices could differ from eager.
        assert rel_l2(out, ref) < 1e-3, (batch, seed)
    assert len(runner.graphs) == 2  # batch 2 captured once, replayed for the other seeds
    runner.clear()
    assert not runner.graphs


def test_output_is_the_static_buffer(unet):
    """Documented contract: the next call with the same shapes overwrites the previous result."""
    runner = CudaGraphRunner(step_fn(unet), "cuda")
    first = runner(*inputs(1, 0))
    kept = first.clone()
    second = runner(*inputs(1, 1))
    assert second.data_ptr() == first.data_ptr()
    assert not torch.equal(kept, second)


def test_capture_under_inference_mode_then_replay_outside(unet):
    """TorchBackend.run calls its modules under torch.inference_mode: the buffers must stay writable."""
    runner = CudaGraphRunner(step_fn(unet), "cuda")
    with torch.inference_mode():
        runner(*inputs(1, 0))
    with torch.no_grad():
        out = runner(*inputs(1, 1)).clone()
        ref = step_fn(unet)(*(x.cuda() for x in inputs(1, 1)))
    assert len(runner.graphs) == 1  # captured once, under inference_mode, replayed under no_grad
    assert rel_l2(out.cpu(), ref.cpu()) < 1e-3
