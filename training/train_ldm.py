"""Stage 2 of the `shapes` model: the text-conditioned latent diffusion model.

The paper's LDM objective: eps-prediction MSE at uniformly drawn timesteps of the linear schedule
(shapes.yaml: linear_start 0.0015, linear_end 0.0195, T = 1000), the UNet attending to a jointly trained
x-transformers text encoder by cross-attention. 10% of captions are replaced by the empty caption,
so the same network is the unconditional model of classifier-free guidance.

The text encoder is first pretrained to read captions (--text-pretrain-steps): small heads on its
mean-pooled output name the scene attributes the caption states, and the same loss stays on, weighted
by --aux-weight, while the LDM trains. Stable Diffusion gets a text encoder that already reads (CLIP);
ours would otherwise start from noise, and the diffusion loss alone then lets it collapse toward one
output for every caption before the UNet learns to use it: the models trained that way ignored every
position word (training/README.md). The heads are training-only: the shipped model is the plain
CompVis LatentDiffusion.

The autoencoder is frozen. A fixed set of scenes is encoded once (posterior mean and std); every
step draws latents from those posteriors and writes each scene's caption anew (new wording each
time, training templates only). scale_factor = 1 / std of the latents, as CompVis's scale_by_std.

Writes to --out: model.ckpt (EMA weights, fp16, CompVis layout), config.yaml (measured scale_factor),
vocab.txt, train_state.pt (to --resume), and prints held-out adherence every --eval-every steps.

    python training/train_ldm.py --autoencoder shapes-run/autoencoder.pt --out shapes-run
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel

import dataset
from ldmrt.testing import adherence
from ldmrt.config import instantiate_from_config, load_config
from ldmrt.files import atomic_write
from ldmrt.tokenizer import BertTokenizer

CONFIG = Path(__file__).with_name("shapes.yaml")
# What the shipped checkpoint leaves out: the schedule is recomputed from the config (in float64).
SCHEDULE_PREFIXES = ("betas", "alphas_cumprod", "sqrt_", "log_one_minus", "posterior_")


def encode_scenes(model, n: int, rng, bf16: bool, batch: int = 250):
    """n random scenes through the frozen encoder: (posterior means, stds, scenes)."""
    means, stds, scenes = [], [], []
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        for i in range(0, n, batch):
            images, sc = dataset.batch(rng, min(batch, n - i))
            post = model.encode_first_stage(dataset.to_tensor(images))
            means.append(post.mean.float())
            stds.append(post.std.float())
            scenes += sc
    return torch.cat(means), torch.cat(stds), scenes


class AttributeHeads(torch.nn.Module):
    """One linear classifier per caption attribute (dataset.ATTRIBUTES) on the text encoder's output
    averaged over tokens. The average is what a query attending evenly over the caption reads, so the
    loss puts what the caption says into every token's output."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in dataset.ATTRIBUTES.items()})

    def forward(self, context: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy over the labelled captions (label -1: not said)."""
        pooled = context.float().mean(1)
        losses = [torch.nn.functional.cross_entropy(head(pooled), labels[k], ignore_index=-1)
                  for k, head in self.heads.items() if (labels[k] >= 0).any()]
        return torch.stack(losses).sum() if losses else pooled.new_zeros(())


def caption_batch(scenes, rng, uncond_prob: float):
    """Captions (the empty one with probability uncond_prob) and their attribute labels."""
    texts, labels = [], {k: [] for k in dataset.ATTRIBUTES}
    for scene in scenes:
        text, said = ("", dict.fromkeys(dataset.ATTRIBUTES, -1)) if rng.random() < uncond_prob \
            else dataset.captioned(scene, rng)
        texts.append(text)
        for k in labels:
            labels[k].append(said[k])
    return texts, {k: torch.tensor(v) for k, v in labels.items()}


def pretrain_text_encoder(model, heads, tokenizer, scenes, rng, steps: int, lr: float, batch: int = 64):
    opt = torch.optim.Adam([*model.cond_stage_model.parameters(), *heads.parameters()], lr=lr)
    for step in range(steps):
        texts, labels = caption_batch([scenes[i] for i in rng.integers(0, len(scenes), batch)], rng, 0.0)
        loss = heads(model.get_learned_conditioning(tokenizer(texts)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(f"text encoder step {step + 1} attribute loss {loss.item():.4f}", flush=True)


class Ema:
    """CompVis LitEma: shadow = decay * shadow + (1 - decay) * param, decay warmed up as (1+n)/(10+n)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in params.items():
            self.shadow[k].lerp_(v.detach(), 1 - d)


def export(model, ema: Ema, cfg: dict, out: Path):
    """model.ckpt (EMA weights in fp16, no schedule buffers) + config.yaml, written atomically."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(SCHEDULE_PREFIXES)}
    sd.update({k: v.clone() for k, v in ema.shadow.items()})
    sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    atomic_write(out / "model.ckpt", lambda tmp: torch.save({"state_dict": sd}, tmp))
    (out / "config.yaml").write_text(
        "# The shipped `shapes` model: see training/README.md (written by training/train_ldm.py).\n"
        + yaml.safe_dump({"model": cfg}, sort_keys=False))


def evaluate(model, ema: Ema, prompts: list[str], steps: int = 20, guidance: float = 5.0):
    """Held-out adherence of the EMA weights (DDIM, `steps` steps, guidance)."""
    params = dict(model.named_parameters())
    live = {k: params[k].data for k in ema.shadow}
    for k in live:
        params[k].data = ema.shadow[k]
    model.eval()
    _, images = adherence.eager_generate(model, prompts, sampler="ddim", steps=steps, guidance_scale=guidance)
    model.train()
    model.first_stage_model.eval()
    for k in live:
        params[k].data = live[k]
    return adherence.summarize([adherence.score(p, im) for p, im in zip(prompts, images)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--autoencoder", type=Path, required=True, help="autoencoder.pt from train_autoencoder.py")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=CONFIG, help="the model config (CompVis yaml)")
    ap.add_argument("--steps", type=int, default=6000, help="total steps (a resumed run continues up to it)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--uncond-prob", type=float, default=0.1, help="conditioning dropout for guidance")
    ap.add_argument("--scenes", type=int, default=8000, help="scenes encoded once and reused")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-prompts", type=int, default=36)
    ap.add_argument("--text-pretrain-steps", type=int, default=400,
                    help="steps of attribute pretraining of the text encoder before the LDM trains")
    ap.add_argument("--aux-weight", type=float, default=0.1, help="weight of the attribute loss during LDM training")
    ap.add_argument("--resume", action="store_true", help="continue from --out/train_state.pt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    vocab_size = dataset.write_vocab(args.out / "vocab.txt")
    cfg = load_config(args.config)
    cond_params = cfg["params"]["cond_stage_config"]["params"]
    if cond_params["vocab_size"] != vocab_size:
        raise SystemExit(f"{args.config} has vocab_size {cond_params['vocab_size']}, the captions need {vocab_size}")
    tokenizer = BertTokenizer.from_file(args.out / "vocab.txt", max_length=cond_params["max_seq_len"])
    model = instantiate_from_config(cfg)
    model.first_stage_model.load_state_dict(torch.load(args.autoencoder, weights_only=True))
    model.first_stage_model.requires_grad_(False).eval()
    model.cond_stage_model.tokenizer = tokenizer
    t0 = time.time()
    cache = args.out / "latents.pt"  # the encoded scenes, reused while the autoencoder is unchanged
    key = (str(args.autoencoder.resolve()), args.autoencoder.stat().st_mtime, args.scenes, args.seed)
    if cache.is_file() and (cached := torch.load(cache, weights_only=False))["key"] == key:
        means, stds, scenes, rng = cached["means"], cached["stds"], cached["scenes"], cached["rng"]
    else:
        means, stds, scenes = encode_scenes(model, args.scenes, rng, args.bf16)
        torch.save({"key": key, "means": means, "stds": stds, "scenes": scenes, "rng": rng}, cache)
    z_sample = means + stds * torch.randn(means.shape)
    scale_factor = float(1.0 / z_sample.flatten().std())
    cfg["params"]["scale_factor"] = round(scale_factor, 5)
    model.scale_factor = cfg["params"]["scale_factor"]
    print(f"encoded {len(scenes)} scenes in {time.time() - t0:.0f}s; scale_factor {scale_factor:.5f}", flush=True)

    heads = AttributeHeads(cond_params["n_embed"])
    if not args.resume and args.text_pretrain_steps:
        pretrain_text_encoder(model, heads, tokenizer, scenes, rng, args.text_pretrain_steps, args.lr)
    trainable = {n: p for n, p in model.named_parameters() if not n.startswith("first_stage_model.")}
    opt = torch.optim.AdamW([*trainable.values(), *heads.parameters()], lr=args.lr, weight_decay=0.01)
    warmup = 200
    ema = Ema(trainable, args.ema_decay)
    step = 0
    if args.resume:
        state = torch.load(args.out / "train_state.pt", weights_only=False)
        if "heads" not in state:
            raise SystemExit(f"{args.out / 'train_state.pt'} was written before train_ldm.py pretrained the text "
                             "encoder (no attribute heads): it cannot be resumed; train anew into another --out")
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        ema.shadow, ema.updates, step = state["ema"], state["ema_updates"], state["step"]
        rng = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed at step {step}", flush=True)

    def lr_at(s):  # linear warmup, then cosine to 10% at args.steps
        return args.lr * min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))

    eval_prompts = [p for p, _ in dataset.evaluation_prompts(args.eval_prompts)]
    ac = torch.tensor(model.schedule_alphas_cumprod, dtype=torch.float32)
    model.train()
    model.first_stage_model.eval()
    start, losses = time.time(), []
    while step < args.steps:
        idx = torch.from_numpy(rng.integers(0, len(scenes), args.batch))
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape)) * model.scale_factor
        captions, labels = caption_batch([scenes[i] for i in idx.tolist()], rng, args.uncond_prob)
        t = torch.randint(0, model.num_timesteps, (args.batch,))
        noise = torch.randn_like(z0)
        a = ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        # The math attention kernel: on CPUs the flash kernel's backward pass is several times slower.
        with torch.autocast("cpu", torch.bfloat16, enabled=args.bf16), sdpa_kernel(SDPBackend.MATH):
            context = model.get_learned_conditioning(tokenizer(captions))
            prediction = model.apply_model(x_t, t, context)
        # The network predicts eps, or x0 for an x0-parameterised config (CompVis `parameterization`).
        target = z0 if model.parameterization == "x0" else noise
        mse = torch.nn.functional.mse_loss(prediction.float(), target)
        loss = mse + args.aux_weight * heads(context, labels) if args.aux_weight else mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.values(), 1.0)
        opt.step()
        ema.update(trainable)
        step += 1
        losses.append(mse.item())
        if step % 50 == 0:
            print(f"step {step} loss {np.mean(losses[-50:]):.4f} lr {lr_at(step):.2e} {time.time() - start:.0f}s",
                  flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            export(model, ema, cfg, args.out)
            torch.save({"model": model.state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(), "ema": ema.shadow,
                        "ema_updates": ema.updates, "step": step, "rng": rng, "torch_rng": torch.get_rng_state()},
                       args.out / "train_state.pt")
            t_eval = time.time()
            summary = evaluate(model, ema, eval_prompts)
            print(f"step {step} held-out adherence (ddim 20, guidance 5): "
                  + " ".join(f"{k} {v:.2f}" for k, v in summary.items()) + f" ({time.time() - t_eval:.0f}s)",
                  flush=True)
    print(f"done: {step} steps in {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
