import os

import torch

# The test models are tiny: one thread is fastest, and keeps a shared 2-core machine usable.
torch.set_num_threads(1)
# Without a GPU the Triton kernels run in Triton's interpreter; Triton reads this when first imported,
# and some test modules import it indirectly (diffusers) during collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
