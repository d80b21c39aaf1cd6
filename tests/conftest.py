import torch

# The test models are tiny: one thread is fastest, and keeps a shared 2-core machine usable.
torch.set_num_threads(1)
