"""PyTorch definitions with the CompVis module tree, so CompVis checkpoints load unchanged."""
from .autoencoder import AutoencoderKL, IdentityFirstStage, VQModel, VQModelInterface
from .conditioners import BERTEmbedder, ClassEmbedder, FrozenCLIPEmbedder, SpatialRescaler, TransformerEmbedder
from .ldm import LatentDiffusion
from .unet import UNetModel

__all__ = ["AutoencoderKL", "BERTEmbedder", "ClassEmbedder", "FrozenCLIPEmbedder", "IdentityFirstStage",
           "LatentDiffusion", "SpatialRescaler", "TransformerEmbedder", "UNetModel", "VQModel", "VQModelInterface"]
