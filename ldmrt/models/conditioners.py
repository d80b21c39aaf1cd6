"""The CompVis conditioning models (ldm.modules.encoders.modules), state-dict compatible.

- BERTEmbedder / TransformerEmbedder: a pre-norm transformer encoder in the module layout of CompVis's
  ldm/modules/x_transformer.py (TransformerWrapper + Encoder with the defaults CompVis uses).
- FrozenCLIPEmbedder: Stable Diffusion v1's CLIP ViT-L/14 text encoder in HF CLIPTextModel's layout.
- ClassEmbedder, SpatialRescaler: class-label embedding and the resize(+1x1 conv) of semantic maps.

Text conditioners hold a tokenizer (ldmrt.tokenizer) in `tokenizer`, set by the loader or passed as
`tokenizer=`; token id tensors are always accepted directly. Training/hub-only constructor arguments
(`device`, `version`) are accepted for config compatibility and ignored: weights come from the
checkpoint and the module follows `.to(...)`.
"""
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TokenizerNotFoundError
from ..tokenizer import BERT_FILES, CLIP_FILES
from .ops import attention


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _text_to_ids(tokenizer, text, max_length: int, owner: str, files: tuple[str, ...], how: str) -> torch.Tensor:
    if tokenizer is None:
        raise TokenizerNotFoundError(
            f"{owner} got text but has no tokenizer. It needs {' + '.join(files)}: put "
            f"{'them' if len(files) > 1 else 'it'} beside the checkpoint (or in a tokenizer/ subfolder), "
            f"or pass tokenizer={how}. Token id tensors can be passed instead of text.")
    ids = tokenizer([text] if isinstance(text, str) else list(text))
    if ids.shape[1] != max_length:
        raise ValueError(f"{owner}'s tokenizer gives {ids.shape[1]} tokens per text, the model expects "
                         f"{max_length}: build the tokenizer with max_length={max_length}")
    return ids


# ---- x-transformers encoder (CompVis ldm/modules/x_transformer.py layout) ----

class XAttention(nn.Module):
    """Self-attention of x_transformer.Attention as CompVis configures it: no biases on q/k/v."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64):
        super().__init__()
        self.heads = heads
        inner_dim = heads * dim_head
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_k = nn.Linear(dim, inner_dim, bias=False)
        self.to_v = nn.Linear(dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(proj(x), self.heads) for proj in (self.to_q, self.to_k, self.to_v))
        return self.to_out(_merge_heads(attention(q, k, v)))


class XFeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner_dim = dim * mult
        # net.0 = (Linear, GELU), net.1 = Dropout, net.2 = Linear: indices as in CompVis, so keys match.
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU()), nn.Dropout(0.0),
                                 nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class XEncoder(nn.Module):
    """x_transformer.Encoder(dim, depth): alternating attention and feed-forward blocks, pre-norm.

    layers[i] = [LayerNorm, block] (CompVis also has a parameterless Residual at index 2).
    """

    def __init__(self, dim: int, depth: int):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), XAttention(dim)]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), XFeedForward(dim)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block in self.layers:
            x = x + block(norm(x))
        return x


class XAbsolutePositionalEmbedding(nn.Module):
    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)

    def forward(self, n: int) -> torch.Tensor:
        return self.emb.weight[:n]


class XTransformerWrapper(nn.Module):
    """x_transformer.TransformerWrapper(num_tokens, max_seq_len, attn_layers=Encoder(dim, depth))
    called with return_embeddings=True."""

    def __init__(self, num_tokens: int, max_seq_len: int, dim: int, depth: int, emb_dropout: float = 0.0):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = XAbsolutePositionalEmbedding(dim, max_seq_len)
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.attn_layers = XEncoder(dim, depth)
        self.norm = nn.LayerNorm(dim)
        # Language-model head: in every CompVis checkpoint, unused for embeddings.
        self.to_logits = nn.Linear(dim, num_tokens)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_emb(ids) + self.pos_emb(ids.shape[1])
        x = self.attn_layers(self.emb_dropout(x))
        return self.norm(x)


class BERTTokenizer(nn.Module):
    """CompVis's `tknz_fn`: text -> padded WordPiece ids. No parameters; the tokenizer is a plain object."""

    def __init__(self, max_length: int = 77, tokenizer=None):
        super().__init__()
        self.max_length = max_length
        self.tokenizer = tokenizer

    def forward(self, text: str | list[str]) -> torch.Tensor:
        return _text_to_ids(self.tokenizer, text, self.max_length, "BERTEmbedder", BERT_FILES,
                            f"ldmrt.tokenizer.BertTokenizer.from_file('vocab.txt', max_length={self.max_length})")


class TransformerEmbedder(nn.Module):
    """Token ids (B, N) -> embeddings (B, N, n_embed)."""

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int, max_seq_len: int = 77, device=None):
        super().__init__()
        self.transformer = XTransformerWrapper(vocab_size, max_seq_len, n_embed, n_layer)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.transformer(tokens.to(self.transformer.token_emb.weight.device))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self(tokens)


class BERTEmbedder(nn.Module):
    """Text (WordPiece-tokenized) or token ids -> embeddings (B, max_seq_len, n_embed).

    With use_tokenizer=False (layout2img: the ids are bounding-box tokens) only ids are accepted.
    """

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int = 30522, max_seq_len: int = 77,
                 device=None, use_tokenizer: bool = True, embedding_dropout: float = 0.0, tokenizer=None):
        super().__init__()
        self.use_tknz_fn = use_tokenizer
        if use_tokenizer:
            self.tknz_fn = BERTTokenizer(max_seq_len, tokenizer)
        self.transformer = XTransformerWrapper(vocab_size, max_seq_len, n_embed, n_layer, embedding_dropout)

    @property
    def tokenizer(self):
        return self.tknz_fn.tokenizer if self.use_tknz_fn else None

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        # An ids-only model never tokenizes text: a tokenizer given to it is not used.
        if self.use_tknz_fn:
            self.tknz_fn.tokenizer = tokenizer

    def forward(self, text: str | list[str] | torch.Tensor) -> torch.Tensor:
        if isinstance(text, torch.Tensor):
            ids = text
        elif self.use_tknz_fn:
            ids = self.tknz_fn(text)
        else:
            raise TypeError("this BERTEmbedder was built with use_tokenizer=False: it takes token id tensors, not text")
        return self.transformer(ids.to(self.transformer.token_emb.weight.device))

    def encode(self, text: str | list[str] | torch.Tensor) -> torch.Tensor:
        return self(text)


# ---- CLIP text encoder (HF CLIPTextModel layout) ----

class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(proj(x), self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(_merge_heads(attention(q, k, v, causal=True)))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick_gelu


class CLIPEncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.mlp = CLIPMLP(width, hidden)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(width, heads, hidden, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def every_layer(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of each layer, first to last (transformers' hidden_states[1:])."""
        outputs = []
        for layer in self.layers:
            x = layer(x)
            outputs.append(x)
        return outputs


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, width: int, positions: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(positions, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.with_positions(self.token_embedding(ids))

    def with_positions(self, token_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L, width), looked up by the caller (textual inversion rows included), + positions."""
        return token_embeds + self.position_embedding.weight[: token_embeds.shape[1]]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # SD v1 checkpoints (and transformers < 4.31) store the constant `position_ids` = arange(77); it is
        # not a parameter here, so it is dropped whether present or not and strict loading works either way.
        state_dict.pop(prefix + "position_ids", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CLIPTextTransformer(nn.Module):
    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, hidden: int, positions: int,
                 eps: float):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(vocab_size, width, positions)
        self.encoder = CLIPEncoder(width, layers, heads, hidden, eps)
        self.final_layer_norm = nn.LayerNorm(width, eps=eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(self.encoder(self.embeddings(ids)))


class CLIPTextModel(nn.Module):
    """HF CLIPTextModel's module tree; forward gives last_hidden_state (B, N, width)."""

    def __init__(self, **sizes):
        super().__init__()
        self.text_model = CLIPTextTransformer(**sizes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(ids)


class FrozenCLIPEmbedder(nn.Module):
    """SD v1's text encoder: text or CLIP token ids -> last_hidden_state (B, 77, 768).

    The size keywords default to CLIP ViT-L/14's text tower and exist for small test models.
    """

    # Prompts longer than one window are encoded as several and concatenated (ldmrt/prompts.py), as SD users expect
    # from AUTOMATIC1111's web UI: the UNet's cross-attention takes any context length.
    long_prompts = True

    def __init__(self, version: str = "openai/clip-vit-large-patch14", device=None, max_length: int = 77,
                 tokenizer=None, *, vocab_size: int = 49408, hidden_size: int = 768, num_hidden_layers: int = 12,
                 num_attention_heads: int = 12, intermediate_size: int = 3072, max_position_embeddings: int = 77,
                 layer_norm_eps: float = 1e-5):
        super().__init__()
        self.max_length = max_length
        self.tokenizer = tokenizer
        self.transformer = CLIPTextModel(
            vocab_size=vocab_size, width=hidden_size, layers=num_hidden_layers, heads=num_attention_heads,
            hidden=intermediate_size, positions=max_position_embeddings, eps=layer_norm_eps)

    def forward(self, text: str | list[str] | torch.Tensor) -> torch.Tensor:
        if isinstance(text, torch.Tensor):
            ids = text
        else:
            ids = _text_to_ids(self.tokenizer, text, self.max_length, "FrozenCLIPEmbedder", CLIP_FILES,
                               "ldmrt.tokenizer.ClipTokenizer.from_files('vocab.json', 'merges.txt')")
        return self.transformer(ids.to(self.transformer.text_model.embeddings.token_embedding.weight.device))

    def encode(self, text: str | list[str] | torch.Tensor) -> torch.Tensor:
        return self(text)

    @property
    def token_embedding(self) -> nn.Embedding:
        """The token table: textual inversion puts rows of its own beside its rows (encode_layers(token_embeds=))."""
        return self.transformer.text_model.embeddings.token_embedding

    def encode_layers(self, ids: torch.Tensor | None = None, *, token_embeds: torch.Tensor | None = None):
        """(context, layer_contexts) of token ids (B, L), or of token embeddings (B, L, width) looked up outside.

        context is forward's output; layer_contexts (B, layers, L, width) holds final_layer_norm of each encoder
        layer's output, first to last: CLIP skip n (AUTOMATIC1111's numbering, 1 = the last layer; diffusers'
        clip_skip = n - 1) is layer_contexts[:, -n], and layer_contexts[:, -1] equals context."""
        text = self.transformer.text_model
        x = text.embeddings(ids) if token_embeds is None else text.embeddings.with_positions(token_embeds)
        layers = text.encoder.every_layer(x)
        return text.final_layer_norm(layers[-1]), text.final_layer_norm(torch.stack(layers, dim=1))


def long_prompt_window(cond_stage) -> int | None:
    """Tokens per window of a text encoder that takes long prompts as several windows (CLIP), else None."""
    return cond_stage.max_length if getattr(cond_stage, "long_prompts", False) else None


# ---- non-text conditioners ----

class ClassEmbedder(nn.Module):
    """Class labels (B,) -> (B, 1, embed_dim), read from batch[key] when given a batch dict."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class"):
        super().__init__()
        self.key = key
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch: dict | torch.Tensor, key: str | None = None) -> torch.Tensor:
        labels = batch[key or self.key] if isinstance(batch, dict) else batch
        return self.embedding(labels.to(self.embedding.weight.device)[:, None])

    def encode(self, batch: dict | torch.Tensor) -> torch.Tensor:
        return self(batch)


class SpatialRescaler(nn.Module):
    """n_stages interpolations by `multiplier`, then an optional 1x1 conv to out_channels."""

    def __init__(self, n_stages: int = 1, method: str = "bilinear", multiplier: float = 0.5, in_channels: int = 3,
                 out_channels: int | None = None, bias: bool = False):
        super().__init__()
        if n_stages < 0:
            raise ValueError(f"n_stages must be >= 0, got {n_stages}")
        if method not in ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area"):
            raise ValueError(f"unknown interpolation method {method!r}")
        self.n_stages = n_stages
        self.multiplier = multiplier
        self.interpolator = partial(F.interpolate, mode=method)
        self.remap_output = out_channels is not None
        if self.remap_output:
            self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_stages):
            x = self.interpolator(x, scale_factor=self.multiplier)
        if self.remap_output:
            x = self.channel_mapper(x)
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)
