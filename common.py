"""Shared machinery of the prompt-learning methods, in the order a reader needs it:
  (1) the prompt math: tokens -> prompts -> text features -> logits (a unit one can copy: torch + open_clip only)
  (2) CoOp's training recipe: seeds, precision, learning-rate schedule, optimiser, the AMP step, the loop
  (3) evaluation: accuracy, the harmonic mean H, timing, the context's nearest words
  (4) loading CLIP: backbones, open_clip tags, checkpoint files and their formats, the activation
  (5) the feature cache: transforms, augmented views, image-tower features on disk
  (6) running an experiment: the experiment object, the command line, the run folder, results files

Every method file imports this module and data.py and nothing else of ours (KDPL also imports its student's
file). What is here reproduces the official CoOp recipe on Dassl (pinned permalinks):
  * CLIP is frozen and in eval mode; only the method's own parameters train.
  * Transforms: train RandomResizedCrop(224, scale 0.08-1, bicubic) + flip; test resize of the shorter
    side (bicubic) + center crop; CLIP's mean/std.
    https://github.com/KaiyangZhou/Dassl.pytorch/blob/c61a1b570ac6333bd50fb5ae06aea59002fb20bb/dassl/data/transforms/transforms.py#L206-L340
  * SGD(lr 0.002, momentum 0.9, wd 5e-4), one constant warm-up epoch at 1e-5, then cosine per epoch.
    https://github.com/KaiyangZhou/CoOp/blob/ff61507c790454bce7c5052c3ac39e60772f1f89/configs/trainers/CoOp/vit_b16_ep50.yaml
    https://github.com/KaiyangZhou/Dassl.pytorch/blob/c61a1b570ac6333bd50fb5ae06aea59002fb20bb/dassl/optim/lr_scheduler.py#L35-L140
  * Batch 32, drop_last only when the set holds at least one batch.
    https://github.com/KaiyangZhou/Dassl.pytorch/blob/c61a1b570ac6333bd50fb5ae06aea59002fb20bb/dassl/data/data_manager.py#L43
What differs, and why:
  * The image tower is frozen, so its features are computed once and cached on disk; the augmented
    training views are cached per (image, view index), so a rerun or a second method reuses them.
  * fp32 master weights always; autocast in bf16 (the CUDA default) or fp16 + GradScaler, on CUDA or,
    when asked, on the CPU; logits in fp32. The official default keeps CLIP *and the context* in fp16,
    a likely cause of CoOp issue #24's collapsed seeds.
  * Every random consumer has its own seeded generator (`generator`): the same seed gives the same
    numbers whatever the cache holds.
"""

import argparse
import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import time
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from filelock import FileLock
from PIL import Image
from tqdm import tqdm

import data


class UserError(Exception):
    """A problem the user can fix; printed as one message, no traceback."""


# ==================================================================================================
# (1) The prompt math: tokens -> prompts -> text features -> logits (CoOp §3.2). A unit one can copy:
#     it needs torch and an open_clip model only (no files, no command line, no cache).
# ==================================================================================================
@dataclass
class Clip:
    """A frozen open_clip model and its tokenizer. The other fields say which model it is (for the feature
    cache and results.json); load_clip, section (4), fills them in."""
    model: nn.Module
    tokenizer: object
    backbone: str = ""
    weights: str = ""        # identity of the weights: an open_clip tag, "file:<name>:<size>" or "random"
    precision: str = "fp32"  # autocast of this tower: bf16, fp16 or fp32 (KDPL's teacher has its own)
    activation: str = "GELU"  # of the MLPs: "QuickGELU" (OpenAI's weights) or "GELU"; wrong = silently different
    activation_source: str = ""  # what chose it: the checkpoint format, the pretrained tag, the name, the flag

    @property
    def device(self):
        return self.model.logit_scale.device

    @property
    def text(self):
        """The module holding the text tower (CLIP keeps it inline, CustomTextCLIP in .text)."""
        return getattr(self.model, "text", self.model)

    @property
    def ctx_dim(self):
        return self.text.token_embedding.weight.shape[1]

    @property
    def embed_dim(self):
        proj = self.text.text_projection
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    @property
    def image_size(self):
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else size

    @property
    def logit_scale(self):
        return self.model.logit_scale.exp().detach().float()


def tokenize(clip, texts):
    return clip.tokenizer(texts).to(clip.device)


def eot_positions(tokens):
    """CLIP pools at the EOT token, the largest token id of each sequence."""
    return tokens.argmax(dim=-1)


def encode_text(clip, x, eot, deep=()):
    """Text features (N, D) of token embeddings x (N, L, width): CoOp's TextEncoder.forward,
    https://github.com/KaiyangZhou/CoOp/blob/ff61507c790454bce7c5052c3ac39e60772f1f89/trainers/coop.py#L46-L57

    Because the mask is causal and the output is read at the EOT token, every position after the longest
    EOT is dead weight: callers pass sequences cut to max(eot) + 1 (the tests prove that the result equals
    the full 77-token encoding). deep: deep text prompts (MaPLe, IVLP), see run_text_blocks."""
    text, L = clip.text, x.shape[1]
    x = x + text.positional_embedding[:L].to(x.dtype)
    if len(deep):
        x = run_text_blocks(clip, x, deep=deep)
    else:  # open_clip's own transformer call (its gradient checkpointing included)
        x = text.transformer(x, attn_mask=text.attn_mask[:L, :L])  # CLIP's causal mask, cut to the length
    x = text.ln_final(x)
    x = x[torch.arange(len(x), device=x.device), eot]  # the feature at the EOT token
    return project_text(clip, x)


def project_text(clip, x):
    proj = clip.text.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


# The same tower cut in two at block `layer` (EMPL samples the hidden states entering the top blocks):
# encode_hidden(clip, hidden_states(clip, x, layer), eot, layer) == encode_text(clip, x, eot).
def hidden_states(clip, x, layer):
    """Hidden states entering transformer block `layer` for token embeddings x (layer 0: x + positions)."""
    x = x + clip.text.positional_embedding[: x.shape[1]].to(x.dtype)
    return run_text_blocks(clip, x, stop=layer)


def encode_hidden(clip, h, eot, layer):
    """Text features from hidden states h entering block `layer`: the rest of the tower."""
    x = clip.text.ln_final(run_text_blocks(clip, h, start=layer))
    return project_text(clip, x[torch.arange(len(x), device=x.device), eot])


def run_text_blocks(clip, x, start=0, stop=None, deep=()):
    """Causal transformer blocks [start, stop) on hidden states x (N, L, width). deep: deep text prompts, one
    (n, width) tensor per block 1 .. len(deep): at the input of block i, deep[i - 1] REPLACES the n positions
    after SOS (where the learned context sits); beyond block len(deep) those tokens flow on (IVLP/MaPLe's
    ResidualAttentionBlock, text branch)."""
    text, L = clip.text, x.shape[1]
    for i, block in enumerate(text.transformer.resblocks):
        if not (start <= i < (len(text.transformer.resblocks) if stop is None else stop)):
            continue
        if 0 < i <= len(deep):
            x = torch.cat([x[:, :1], deep[i - 1].to(x.dtype).expand(len(x), -1, -1), x[:, 1 + len(deep[i - 1]):]], 1)
        x = run_block(text.transformer, block, x, text.attn_mask[:L, :L])
    return x


def run_block(transformer, block, x, attn_mask=None):
    """One residual attention block of a batch-first open_clip transformer on x (N, L, width), with open_clip's
    gradient checkpointing when the transformer has it on (recompute in the backward pass, same numbers)."""
    if transformer.grad_checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
    return block(x, attn_mask=attn_mask)


@torch.no_grad()
def encode_texts(clip, texts, batch_size=1000):
    """Frozen text features of plain strings (hand-crafted prompts), EOT-cut per batch."""
    feats = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenize(clip, texts[i:i + batch_size])
        eot = eot_positions(tokens)
        tokens = tokens[:, : int(eot.max()) + 1]
        feats.append(encode_text(clip, clip.text.token_embedding(tokens), eot).float())
    return torch.cat(feats)


def words_to_embeddings(clip, words):
    """Token embeddings of an initialisation phrase such as "a photo of a" (CoOp's ctx_init)."""
    tokens = tokenize(clip, [words])
    n = int(eot_positions(tokens)[0]) - 1
    with torch.no_grad():
        return clip.text.token_embedding(tokens)[0, 1:1 + n].float().clone()


def context_from_words(clip, ctx_init, n_ctx, gen):
    """(ctx (n, d), frozen words) of IVLP / MaPLe / PromptSRC's text context: the first n tokens of the template
    ctx_init start the context and its other words stay as frozen tokens after it ("a photo of a" with n = 2:
    "a photo" learned, "of a" frozen); no template, or n beyond it: N(0, 0.02^2) from gen and no frozen words."""
    words = ctx_init.split()
    if not ctx_init or n_ctx > len(words):
        return torch.randn(n_ctx, clip.ctx_dim, generator=gen) * 0.02, ""
    init = words_to_embeddings(clip, ctx_init)
    if len(init) != len(words):
        raise ValueError(f'"{ctx_init}": one token per word is needed to split it into learned and frozen words '
                         f'({len(init)} tokens for {len(words)} words)')
    return init[:n_ctx], " ".join(words[n_ctx:])


class ClassPrompts:
    """CoOp's prompt layout for a list of class names, at the token-embedding level:
        end:    [SOS] [ctx_1 .. ctx_M] [CLASS] . [EOT]
        middle: [SOS] [ctx_1 .. ctx_M/2] [CLASS] [ctx_M/2+1 .. ctx_M] . [EOT]
        front:  [SOS] [CLASS] [ctx_1 .. ctx_M] . [EOT]
    Only token ids are stored (a 100k-name vocabulary fits), cut after the longest EOT; the frozen token
    embeddings are looked up per call, for all names or for `rows`, a selection of them (cut again
    after the selection's longest EOT). The learnable context is passed in, so the method file owns
    its parameters; a method builds one ClassPrompts per class list (training classes, each test set)."""

    def __init__(self, clip, classnames, n_ctx, position="end", words=""):
        """words: frozen words between the context and the class name (MaPLe learns 2 tokens of "a photo of a",
        and "of a" stays: [SOS] [ctx_1] [ctx_2] of a [CLASS] . [EOT])."""
        if position not in ("end", "middle", "front") or (words and position != "end"):
            raise ValueError(f"class token position must be end, middle or front (end with words), not {position!r}")
        self.clip, self.n_ctx, self.position = clip, n_ctx, position
        names = [name.replace("_", " ") for name in classnames]
        tokens = tokenize(clip, [" ".join(["X"] * n_ctx + ([words] if words else []) + [f"{name}."]) for name in names])
        eot = eot_positions(tokens)
        self.tokens, self.eot = tokens[:, :int(eot.max()) + 1], eot
        if position != "end":  # BPE tokens of each class name (CoOp's name_lens)
            self.name_lens = [len(clip.tokenizer.encode(name)) for name in names]

    def token_embeddings(self, rows=None):
        """Frozen embeddings (R, L, d) and EOT positions of the selected prompts (all when rows is None)."""
        tokens, eot = self.tokens, self.eot
        if rows is not None:
            tokens, eot = tokens[rows], eot[rows]
            tokens = tokens[:, :int(eot.max()) + 1]  # the causal mask makes later positions dead weight
        with torch.no_grad():
            return self.clip.text.token_embedding(tokens).float(), eot

    def embed(self, ctx, rows=None):
        """Prompts (R, L, d) around ctx: (M, d) shared by all classes, or (C, M, d) class-specific."""
        emb, _ = self.token_embeddings(rows)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(len(emb), -1, -1)
        elif rows is not None:
            ctx = ctx[rows]
        ctx = ctx.to(emb.dtype)
        prefix, suffix = emb[:, :1], emb[:, 1 + self.n_ctx:]  # [SOS] and [CLASS . EOT]
        if self.position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        lens = self.name_lens if rows is None else [self.name_lens[int(r)] for r in rows]
        half = self.n_ctx // 2
        prompts = []
        for i, n in enumerate(lens):
            cls, rest = suffix[i:i + 1, :n], suffix[i:i + 1, n:]
            if self.position == "middle":
                parts = [prefix[i:i + 1], ctx[i:i + 1, :half], cls, ctx[i:i + 1, half:], rest]
            else:
                parts = [prefix[i:i + 1], cls, ctx[i:i + 1], rest]
            prompts.append(torch.cat(parts, dim=1))
        return torch.cat(prompts)

    def features(self, ctx, rows=None):
        """Text features g(t_i) (R, D) of the prompts with context ctx (of the names in rows, or all)."""
        return encode_text(self.clip, self.embed(ctx, rows), self.eot if rows is None else self.eot[rows])

    def embed_per_image(self, ctx, rows=None):
        """Prompts (B, R, L, d) around one context per image, ctx (B, M, d) (CoCoOp's v_m(x)): image b's
        context in every class's prompt, class token at the end (CoCoOp's only layout)."""
        if self.position != "end":
            raise ValueError("a context per image is placed before the class name (position end) only")
        emb, _ = self.token_embeddings(rows)
        B, R = len(ctx), len(emb)
        prefix, suffix = emb[:, :1].expand(B, -1, -1, -1), emb[:, 1 + self.n_ctx:].expand(B, -1, -1, -1)
        return torch.cat([prefix, ctx.to(emb.dtype)[:, None].expand(-1, R, -1, -1), suffix], dim=2)


def encode_image(clip, images, prompts=()):
    """Image features (B, D) of images (B, 3, H, W) through CLIP's ViT with deep visual prompts (VPT-deep, MaPLe,
    IVLP): prompts[0] (n, width) is appended after the patch tokens, after the positional embedding and before
    ln_pre (so it gets no positional embedding and ln_pre normalises it too); at the input of block i, for
    0 < i < len(prompts), prompts[i] REPLACES those n positions (not added); beyond, they flow on. The class
    token is pooled (ln_post, proj) and the prompts dropped. With no prompts this is open_clip's encode_image.
    https://github.com/muzairkhattak/multimodal-prompt-learning/blob/69bce21ae8eda80ad6187534b2dce09cf6c59e17/clip/model.py#L393-L422
    https://github.com/muzairkhattak/multimodal-prompt-learning/blob/69bce21ae8eda80ad6187534b2dce09cf6c59e17/clip/model.py#L234-L241"""
    visual = clip.model.visual
    if not isinstance(visual, open_clip.transformer.VisionTransformer) or visual.attn_pool is not None \
            or visual.final_ln_after_pool or visual.pool_type != "tok":
        raise ValueError("deep visual prompts need a ViT image tower that pools its class token (CLIP's ViTs)")
    x = visual.conv1(images)                                              # the patch embeddings, (B, W, g, g)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)            # (B, g*g, W)
    cls = visual.class_embedding.to(x.dtype).expand(len(x), 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)                                           # identity in eval mode
    n = len(prompts[0]) if len(prompts) else 0
    if n:
        x = torch.cat([x, prompts[0].to(x.dtype).expand(len(x), -1, -1)], dim=1)  # [CLS, patches, prompts]
    x = visual.ln_pre(x)
    for i, block in enumerate(visual.transformer.resblocks):
        if 0 < i < len(prompts):  # this block's own prompts replace the previous block's outputs there
            x = torch.cat([x[:, :x.shape[1] - n], prompts[i].to(x.dtype).expand(len(x), -1, -1)], dim=1)
        x = run_block(visual.transformer, block, x)
    x = visual.ln_post(x)
    return x[:, 0] @ visual.proj                                           # the class token


def cosine_logits(image_feats, text_feats, logit_scale):
    """logits = s * norm(f(x)) @ norm(g(t)).T  (CLIP's classifier, CoOp's p(y|x)): images (B, D) against
    texts (C, D) give (B, C); with leading dimensions, (K, B, D) against (K, C, D) give (K, B, C) (one
    classifier per k). Several texts per class (a pool of templates, several prompts): flatten them to
    (C * H, D) and view the logits as (B, C, H). In fp32 even under autocast: at s = 100, bf16 logits
    come in steps of 0.25-0.5, and ties would favour low class indices."""
    with torch.autocast(image_feats.device.type, enabled=False):
        image, text = F.normalize(image_feats.float(), dim=-1), F.normalize(text_feats.float(), dim=-1)
        return logit_scale * image @ text.transpose(-1, -2)


# ==================================================================================================
# (2) CoOp's training recipe: seeds and generators, precision, the learning-rate schedule, the optimiser,
#     the AMP step and the loop over epochs.
# ==================================================================================================
def set_seed(seed):
    """Seed the global generators the way Dassl's set_random_seed does, for code that still draws from
    them. Nothing of ours draws from them unseeded: every random consumer owns a generator (see
    `generator`), or seeds the global one inside torch.random.fork_rng where a library draws from it
    (torchvision's random crops, DeMul's stage-1 MLPs)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def generator(seed, purpose):
    """A CPU generator of its own for one random consumer of a run (context init, batch order, ...):
    seeded by (run seed, purpose), so no consumer shifts another's numbers, whatever was cached or
    computed before. Draw on the CPU and move the result: the numbers are then the same on any device."""
    digest = hashlib.sha256(f"{seed}|{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@contextlib.contextmanager
def global_rng(seed, purpose):
    """The global CPU generator seeded like generator(seed, purpose), for library code that draws from it
    (nn.Linear's default initialisation), and restored afterwards: nothing else's numbers move."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(generator(seed, purpose).initial_seed())
        yield


def resolve_precision(precision, device):
    """--precision, resolved once per run (prepare): auto is bf16 autocast on CUDA and fp32 on the CPU;
    bf16/fp16 on the CPU run CPU autocast, the same code path as on CUDA (how the tests exercise the GPU
    path without a GPU). Everything downstream takes the resolved bf16, fp16 or fp32."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, not {precision!r}")
    return precision


def autocast(device, precision):
    """Autocast in bf16 or fp16 on any device; nothing for fp32. Parameters stay fp32 always."""
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast takes a resolved precision (bf16, fp16 or fp32), not {precision!r}")
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def coop_lr(epoch, base_lr, max_epoch, warmup_lr=1e-5):
    """Dassl's per-epoch learning rate (0-based epoch): one constant warm-up epoch at 1e-5, then
    cosine from base_lr over max_epoch epochs, restarted after the warm-up (WARMUP_RECOUNT)."""
    if epoch == 0:
        return warmup_lr
    return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch - 1) / max_epoch))


FEWSHOT_EPOCHS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}  # CoOp configs: *_ep50, *_ep100, default (200)
IMAGENET_EPOCHS = 50                                        # CoOp's ImageNet configs (rn50_ep50, vit_b16_ep50)


def fewshot_epochs(dataset, shots):
    """CoOp's few-shot epochs for a shot count (None where the official configs have none)."""
    return IMAGENET_EPOCHS if data.canonical_name(dataset) == "imagenet" else FEWSHOT_EPOCHS.get(shots)


def resolve_epochs(parser, args, base2new=None):
    """--epochs, else CoOp's recipe: few-shot epochs per shot count (ImageNet 50), and `base2new` epochs
    for the base-to-new protocol when given (ImageNet keeps 50)."""
    if args.epochs is None:
        official = fewshot_epochs(args.dataset, args.shots)
        imagenet = data.canonical_name(args.dataset) == "imagenet"
        base_to_new = args.protocol == "base2new" and base2new is not None and not imagenet
        args.epochs = base2new if base_to_new else official
        if args.epochs is None:
            parser.error(f"no official epoch count for {args.shots} shots; pass --epochs")
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")


def steps_per_epoch(n, batch_size):
    """Dassl: drop_last = len(dataset) >= batch_size, so a set smaller than a batch is one batch."""
    steps = n // batch_size if n >= batch_size else (1 if n > 0 else 0)
    if steps < 1:
        raise UserError(f"no training step per epoch (training set of {n} images): nothing to learn from")
    return steps


class TrainingError(UserError):
    pass


def optimizer_and_scaler(params, lr, precision, device, no_decay=()):
    """CoOp's optimiser (SGD, momentum 0.9, weight decay 5e-4; `no_decay` tensors get none) and, for fp16,
    a GradScaler; the same objects on CUDA and on the CPU. Not fused: a fused SGD under a GradScaler
    allocates the momentum buffer on a skipped (overflowing) step without writing it, and the next step
    reads that garbage (NaN prompts with fp16); the prompts are a few small tensors, fusing buys nothing."""
    device = torch.device(device)
    params = [p for p in params if p.requires_grad]
    skip = {id(p) for p in no_decay}
    groups = [{"params": [p for p in params if id(p) not in skip]},
              {"params": [p for p in params if id(p) in skip], "weight_decay": 0.0}]
    opt = torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=0.9, weight_decay=5e-4, fused=False)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return opt, scaler


def train_step(opt, scaler, loss):
    """One update. With fp16 the loss is scaled; a step whose gradients overflowed is skipped (parameters
    and optimiser state untouched) and the scale halved. Returns True if the step was applied."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scale = scaler.get_scale() if scaler.is_enabled() else None  # a host sync only with fp16
    scaler.step(opt)
    scaler.update()
    return scale is None or scaler.get_scale() >= scale


def fit(params, loss_fn, epoch_data, n, epochs, batch_size=32, lr=0.002, precision="fp32", seed=1,
        device="cpu", desc="train", no_decay=(), epoch_end=None):
    """Train `params` (the method's learnable tensors only) with CoOp's recipe.

    epoch_data(epoch) returns the tensors of the whole training set for that epoch (e.g. features of
    that epoch's augmented view and the labels); each step gets the same random rows of each, and
    loss_fn(*rows) returns the scalar loss; epoch_end(epoch), if given, runs after each epoch's last step
    (PromptSRC's prompt aggregation). Returns per-epoch statistics, with the learning rate the optimiser
    actually used in each epoch."""
    device = torch.device(device)
    opt, scaler = optimizer_and_scaler(params, lr, precision, device, no_decay)
    steps = steps_per_epoch(n, batch_size)
    gen = generator(seed, "batch order")
    losses, lrs, skipped = [], [], 0
    bar = tqdm(range(epochs), desc=desc, leave=False, disable=not sys.stderr.isatty())
    for epoch in bar:
        for group in opt.param_groups:
            group["lr"] = coop_lr(epoch, lr, epochs)
        tensors = epoch_data(epoch)
        order = torch.randperm(n, generator=gen).to(device)
        total = torch.zeros((), device=device)
        for step in range(steps):
            rows = order[step * batch_size:(step + 1) * batch_size]
            with autocast(device, precision):
                loss = loss_fn(*[t[rows] for t in tensors])
            skipped += not train_step(opt, scaler, loss)
            total += loss.detach().float()
        mean_loss = float(total) / steps  # one host sync per epoch, none inside the step loop
        if not math.isfinite(mean_loss):
            raise TrainingError(f"the training loss became {mean_loss} in epoch {epoch + 1}; try --precision fp32 "
                                f"or a smaller --lr")
        losses.append(mean_loss)
        lrs.append(opt.param_groups[0]["lr"])
        if epoch_end is not None:
            epoch_end(epoch)
        bar.set_postfix(loss=f"{mean_loss:.4f}")
    # A collapsed run (CoOp issue #24) ends with a loss above where the cosine phase started.
    collapsed = len(losses) > 2 and losses[-1] > losses[1] * 1.5
    if collapsed:
        warnings.warn(f"training loss rose from {losses[1]:.4f} to {losses[-1]:.4f}: this run may have collapsed")
    return {"steps_per_epoch": steps, "epochs": epochs, "loss_per_epoch": losses, "lr_per_epoch": lrs,
            "collapsed": collapsed, "skipped_steps": skipped}


# ==================================================================================================
# (3) Evaluation: accuracy, the harmonic mean of base and new, timing, the context's nearest words.
# ==================================================================================================
def accuracy(logits, labels):
    return 100.0 * (logits.argmax(dim=-1) == labels).float().mean().item()


def harmonic_mean(base, new):
    """H = 2BN/(B+N); for averages over datasets, pass the averaged B and N (KgCoOp issue #9)."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def seconds(fn, device, repeat=3):
    """Mean wall time of fn() after one warm-up call, synchronised on a CUDA device (benchmark.py)."""
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


@torch.no_grad()
def nearest_words(clip, ctx, k=3):
    """CoOp's interpretability readout: the vocabulary tokens nearest (Euclidean) to each context vector."""
    vocab = clip.text.token_embedding.weight.float()
    dist = torch.cdist(ctx.float().reshape(-1, ctx.shape[-1]).to(vocab.device), vocab)
    decoder = getattr(clip.tokenizer, "decoder", {})
    return [[(decoder.get(int(i), str(int(i))).replace("</w>", ""), round(float(d), 3))
             for d, i in zip(*row.topk(k, largest=False))] for row in dist]


# ==================================================================================================
# (4) Loading CLIP: backbones, open_clip tags, checkpoint files and their formats, the activation.
# ==================================================================================================
# Tiny open_clip configurations: the same CLIP/ViT code path as ViT-B/16, small enough for CPU tests.
# `tiny-wide` has a different width and embedding size so it can stand in for a larger teacher.
TINY_CONFIGS = {
    "tiny": dict(embed_dim=64,
                 vision_cfg=dict(image_size=224, layers=2, width=64, head_width=32, patch_size=32),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)),
    "tiny-wide": dict(embed_dim=96,
                      vision_cfg=dict(image_size=224, layers=2, width=128, head_width=32, patch_size=32),
                      text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=4, layers=3)),
}


OPENAI_INT_KEYS = ("input_resolution", "context_length", "vocab_size")  # what marks an OpenAI state dict


def load_clip(backbone, pretrained, device="cpu", precision="fp32", quick_gelu=False):
    """Load an open_clip model frozen in eval mode. precision: the tower's autocast, resolved (bf16, fp16, fp32).

    pretrained: an open_clip tag ("openai", "dfn5b", ...), a local checkpoint file, or "none" (random
    initialisation, seeded so that the same random model -- and its feature cache -- comes back).
    Checkpoint files (`read_checkpoint`): OpenAI's release files (TorchScript archives such as
    ~/.cache/clip/ViT-B-16.pt), OpenAI-format state dicts (the same keys plus three ints) and open_clip
    checkpoints (.bin/.pt/.safetensors). OpenAI's weights were trained with QuickGELU, so a file that is
    recognisably OpenAI's is built with it whatever the backbone is called; an open_clip file does not say,
    so the name (ViT-B-16 vs ViT-B-16-quickgelu) or quick_gelu decides, and a note says which."""
    device = torch.device(device)
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"load_clip takes a resolved precision (bf16, fp16 or fp32), not {precision!r}")
    if backbone not in TINY_CONFIGS and backbone not in open_clip.list_models():
        raise UserError(f"unknown backbone {backbone!r}. Choose an open_clip model such as ViT-B-16, ViT-B-32, "
                        f"RN50, ViT-L-14, ViT-H-14-quickgelu, or tiny / tiny-wide for tests.")
    random_weights = pretrained in ("none", None)
    is_file = not random_weights and os.path.isfile(str(pretrained))
    if not (random_weights or is_file):
        if "/" in str(pretrained) or Path(str(pretrained)).suffix in (".pt", ".pth", ".bin", ".safetensors"):
            raise UserError(f"--pretrained {pretrained}: no such file")
        if backbone in TINY_CONFIGS:
            raise UserError(f"backbone {backbone!r} exists only with random weights: pass --pretrained none")
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(0)  # the CPU generator only: CUDA's stay as the run left them
        if is_file:
            model, source = _from_file(backbone, pretrained, quick_gelu)
        elif random_weights:
            model, source = _build(backbone, quick_gelu), "random weights"
        else:
            model, source = _from_tag(backbone, pretrained, quick_gelu), f"open_clip tag {pretrained!r}"
    if random_weights:
        weights = "random"
        print(f"WARNING: {backbone} has RANDOM weights (--pretrained none): accuracy means nothing; "
              f"use this only for smoke runs and timing.", file=sys.stderr)
    elif is_file:
        weights = f"file:{Path(pretrained).name}:{os.path.getsize(pretrained)}"
    else:
        weights = pretrained
    model.eval().requires_grad_(False).to(device)
    text = getattr(model, "text", model)
    if not getattr(text.transformer, "batch_first", False):  # open_clip < 2.26.1 runs its blocks sequence-first
        raise UserError(f"open_clip {open_clip.__version__} is too old: pip install 'open_clip_torch>=2.26.1'")
    if getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax")) != "argmax":
        raise UserError(f"{backbone} pools its text features differently from CLIP (not at the EOT token); "
                        f"prompt learning here needs a CLIP-style text tower.")
    activation = "QuickGELU" if any(isinstance(m, open_clip.transformer.QuickGELU) for m in model.modules()) \
        else "GELU"
    if source == "open_clip checkpoint file":  # the one case where nothing says which activation is right
        source = "--quick-gelu" if quick_gelu else "the backbone name"
        other = ("drop --quick-gelu" if quick_gelu else "name the backbone without -quickgelu") \
            if activation == "QuickGELU" else f"pass --quick-gelu or name the backbone {backbone}-quickgelu"
        print(f"note: {Path(pretrained).name} is an open_clip checkpoint, which does not record its activation; "
              f"{backbone} is built with {activation} ({source}). If the weights were trained with the other one "
              f"(OpenAI's and every -quickgelu tag use QuickGELU), {other}.", file=sys.stderr)
    return Clip(model, open_clip.get_tokenizer("ViT-B-16" if backbone in TINY_CONFIGS else backbone),
                backbone, weights, precision, activation, source)


def _build(backbone, quick_gelu, device="cpu"):
    """The architecture with random weights (QuickGELU if asked or if the name says -quickgelu); on the
    "meta" device, the architecture alone (no memory, no time), for weights that come from a file."""
    with torch.device(device):
        if backbone in TINY_CONFIGS:
            return open_clip.CLIP(**TINY_CONFIGS[backbone], quick_gelu=quick_gelu)
        return open_clip.create_model(backbone, pretrained=None, force_quick_gelu=quick_gelu, device=device)


def read_checkpoint(path):
    """(format, state dict) of a checkpoint file. format: "torchscript" (OpenAI's release files), "openai" (an
    OpenAI-format state dict: it carries the ints input_resolution, context_length and vocab_size) or
    "open_clip" (any other state dict, .safetensors included). torch.save files are memory-mapped, so loading
    never holds a second in-memory copy of the weights (the model takes the mapped tensors)."""
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():  # torch's deprecation note: this is the file the user has
                warnings.simplefilter("ignore", FutureWarning)
                return "torchscript", torch.jit.load(path, map_location="cpu").state_dict()
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file
            return "open_clip", load_file(path)
        state = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except Exception as err:  # truncated, text, a pickle of something else: all the same to the user
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]  # an empty file: EOFError('')
        raise UserError(_not_a_checkpoint(path, reason)) from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UserError(_not_a_checkpoint(path, f"it holds a {type(state).__name__}, not a state dict"))
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    return ("openai" if all(key in state for key in OPENAI_INT_KEYS) else "open_clip"), state


def _is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _not_a_checkpoint(path, reason, backbone=None):
    expected = (f"a CLIP checkpoint of the {backbone} architecture" if backbone else "a CLIP checkpoint") + (
        ": OpenAI's release file (e.g. ~/.cache/clip/ViT-B-16.pt), an OpenAI-format state dict, or an "
        "open_clip checkpoint (open_clip_pytorch_model.bin / .safetensors)")
    return f"--pretrained {path} is not {expected} ({reason}). Check the file (a partial download?) and --backbone."


def _from_file(backbone, path, quick_gelu):
    fmt, state = read_checkpoint(path)
    # The architecture without weights ("meta"): random weights that the file would overwrite would cost the
    # model's size in memory and, for a ViT-H teacher, half a minute. OpenAI's weights need QuickGELU.
    model = _build(backbone, quick_gelu or fmt != "open_clip", device="meta")
    state = {k: v for k, v in state.items() if k not in OPENAI_INT_KEYS}
    try:  # assign: the model takes the file's tensors instead of copying them (one copy of the weights in memory)
        keys = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # shapes of another architecture
        raise UserError(_not_a_checkpoint(path, str(err).strip().splitlines()[-1].strip()[:300], backbone)) from None
    buffers = {name for name, _ in model.named_buffers()}  # a traced archive also stores the causal mask
    unexpected = set(keys.unexpected_keys) - buffers
    if keys.missing_keys or unexpected:
        found = sorted(keys.missing_keys)[:3] + sorted(unexpected)[:3]
        raise UserError(_not_a_checkpoint(path, f"its keys do not match: {', '.join(found)} ...", backbone))
    for module in model.modules():  # the one buffer no checkpoint holds: CLIP's causal mask, built as CLIP does
        if getattr(module, "attn_mask", None) is not None and module.attn_mask.is_meta:
            mask = torch.full(module.attn_mask.shape, float("-inf")).triu_(1)
            module.register_buffer("attn_mask", mask, persistent=False)
    return model.float(), {"torchscript": "OpenAI TorchScript archive", "openai": "OpenAI-format state dict",
                           "open_clip": "open_clip checkpoint file"}[fmt]  # OpenAI's files hold fp16 weights


def _from_tag(backbone, pretrained, quick_gelu):
    tags = open_clip.list_pretrained_tags_by_model(backbone)
    if pretrained not in tags:
        raise UserError(f"open_clip has no weights {pretrained!r} for {backbone}; known tags: {', '.join(tags)}, "
                        f"or pass a checkpoint file, or 'none' for random weights.")
    cfg = open_clip.get_pretrained_cfg(backbone, pretrained)
    if quick_gelu and not cfg.get("quick_gelu", False) and not backbone.endswith("-quickgelu"):
        raise UserError(f"--quick-gelu: open_clip records that {backbone} {pretrained!r} was trained with GELU; "
                        f"drop --quick-gelu (it is only for checkpoint files, which do not record it)")
    try:
        # open_clip 3 only warns when a tag was trained with QuickGELU (OpenAI's are); build it that way
        return open_clip.create_model(backbone, pretrained=pretrained,
                                      force_quick_gelu=quick_gelu or cfg.get("quick_gelu", False))
    except Exception as err:  # offline, hub down, disk full: all end the same way for the user
        source = f"https://huggingface.co/{cfg['hf_hub'].rstrip('/')}" if cfg.get("hf_hub") else cfg.get("url", "")
        raise UserError(
            f"could not load the {backbone} weights {pretrained!r} ({type(err).__name__}).\n"
            f"Without internet: download the checkpoint from {source} on another machine and pass the file, "
            f"--pretrained /path/to/checkpoint (OpenAI's own ViT-B-16.pt etc. are recognised and built with "
            f"QuickGELU).") from None


# ==================================================================================================
# (5) The feature cache: CoOp's transforms, augmented views, frozen image-tower features on disk.
# ==================================================================================================
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CoOp/Dassl INPUT.PIXEL_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def train_transform(size):
    return T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def test_transform(size):
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def view_seed(rel, view):
    """The augmentation of view k of an image depends on (image, k) only, so any tower -- a student
    or a teacher -- and any later run that asks for view k of that image gets the same crop."""
    return int.from_bytes(hashlib.sha256(f"{rel}|{view}".encode()).digest()[:8], "little")


class ImageFiles(torch.utils.data.Dataset):
    """Transformed images; an unreadable file comes back as its error message (a DataLoader worker would
    bury a raised error in a traceback), and FeatureCache turns it into one message naming the file."""

    def __init__(self, items, size, view):
        self.items, self.view = items, view
        self.transform = test_transform(size) if view == "test" else train_transform(size)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        try:
            with Image.open(item.path) as file:
                image = file.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:  # truncated, not an image, missing
            return torch.zeros(3, 1, 1), f"{item.path}: {err}"
        if self.view == "test":
            return self.transform(image), ""
        with torch.random.fork_rng(devices=[]):  # the transforms draw from the global CPU generator
            torch.random.default_generator.manual_seed(view_seed(item.rel, self.view))
            return self.transform(image), ""


def _collate(batch):
    errors = [err for _, err in batch if err]
    return (None if errors else torch.stack([image for image, _ in batch])), errors


def check_read(errors, what):
    """One message for the images of a batch that could not be read (ImageFiles' error strings)."""
    if errors:
        raise data.DataError(f"cannot read {len(errors)} {what}, e.g. {errors[0]}. Replace the file(s) (re-download "
                             f"the dataset) or fix --data-root.")


class ViewImages:
    """The training images in augmented view `view`, decoded when a step asks for them: view_images[rows] ->
    (B, 3, H, W) on device. A prompted image tower sees the very crop a frozen tower's cached feature of view k
    was computed from (view_seed), so a student and its teacher always look at the same pixels."""

    def __init__(self, items, size, view, device):
        self.files, self.device = ImageFiles(items, size, view), device

    def __len__(self):
        return len(self.files)

    def __getitem__(self, rows):
        images, errors = _collate([self.files[int(i)] for i in rows])
        check_read(errors, "training image(s)")
        return images.to(self.device, non_blocking=True)


@contextlib.contextmanager
def locked(path):
    """A lock file beside path (its folder made if need be): runs sharing a cache (seeds, a cluster sweep)
    merge into it one at a time."""
    lock = FileLock(f"{path}.lock")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as err:  # a full or read-only filesystem, a file where a folder should be
        raise UserError(cannot_write(Path(lock.lock_file), err)) from None
    try:
        yield
    finally:
        lock.release()


def temporary_path(path):
    """Where write_atomic writes path's new content before renaming it over path (one per process)."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def write_atomic(path, write):
    """Every file the project writes goes through here: write(tmp) fills a temporary file beside path, which
    is then renamed over path, so a reader, or an interrupted run, never sees a half-written file. When
    anything fails, the temporary file is removed and path keeps what it held; an OS error (no space left,
    a quota, a read-only or vanished folder, no permission) becomes one UserError naming path and the cause."""
    path, tmp = Path(path), temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:  # anything else (a bug, a Ctrl-C) goes on as it is; tmp is removed either way
        raise UserError(f"{cannot_write(path, err)} (a previous {path.name}, if any, is unchanged)") from None
    finally:
        with contextlib.suppress(OSError):  # gone after a rename; on a failing filesystem, at least we tried
            tmp.unlink(missing_ok=True)


def cannot_write(path, err):
    """The message for an OSError met while writing path: the path, the system's reason, what to do."""
    reason = err.strerror or str(err)  # strerror: the reason without the name of a temporary file
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        advice = "free some space there (or raise the quota), or write elsewhere"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        advice = "make the folder writable, or write elsewhere"
    else:
        advice = "check that filesystem, or write elsewhere"
    return f"cannot write {path}: {reason}; {advice}"


def save_atomic(obj, path):
    """torch.save(obj, path), atomically (write_atomic)."""
    def write(tmp):
        # through a Python file: a failed write then raises the OSError that says why (given a path,
        # torch.save's C++ stream only says "basic_ios::clear: iostream error")
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    write_atomic(path, write)


_reported = set()  # damaged cache files this process has reported (a reader and the writer after it both read)


def read_cache(path, parse):
    """parse(content) of a cache file the project wrote (torch.save), or None when there is none. A cache holds
    what can be recomputed, so a file that cannot be read -- truncated by a full disk or a quota, damaged on a
    network filesystem, of another structure -- is reported in one line and treated as absent: the caller
    recomputes its content, which write_atomic then puts in its place (under the cache's lock)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return parse(torch.load(path, map_location="cpu"))
    except Exception as err:  # torch.load's many ways to fail on a damaged file, and a wrong structure in parse
        if path not in _reported:
            _reported.add(path)
            why = f"{type(err).__name__}: {err}".splitlines()[0].split(". ")[0][:100].rstrip(": ")  # its gist
            print(f"warning: cache file {path} cannot be read ({why}); it will be recomputed and replaced",
                  file=sys.stderr)
        return None


def file_stamp(path):
    """(size, mtime in ns): a changed, re-downloaded or repaired image gets new features (what make and
    rsync use to notice a changed file; hashing every image would cost a read of the whole dataset)."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@dataclass
class FeatureCache:
    """Image-tower features on disk: one file per (tower, numerics, dataset, view) holding, per image
    (path relative to the data root), the file's stamp and its feature as the tower computed it.
    view is "test" (deterministic transform) or an int k (the k-th augmented view).
    An entry is served only while the image file keeps its stamp. Writers take a lock (filelock) and
    merge into what is on disk at that moment, so runs sharing the cache (several seeds, a cluster
    sweep on a shared filesystem) never lose each other's entries; the file is replaced atomically. A file
    that cannot be read (cut short by a full disk, say) is reported and its features are computed again."""
    root: Path
    workers: int = 2
    seconds: float = 0.0   # time spent computing features (not loading them), for results.json
    computed: int = 0
    seconds_by_tower: Counter = field(default_factory=Counter)  # the same time per backbone (student, teacher)

    def path(self, clip, dataset, view):
        name = "test" if view == "test" else f"train_view{int(view):04d}"
        # the tower: architecture, weights, activation and input size
        tower = f"{clip.backbone}__{clip.weights}__{clip.activation}__{clip.image_size}"
        tower = tower.replace("/", "-").replace(":", "-")
        # the device type as well: cuDNN runs the patch convolution in TF32 even for fp32 on CUDA
        numerics = f"{clip.device.type}-{clip.precision}"
        return Path(self.root) / f"{tower}__{numerics}" / dataset / f"{name}.pt"

    def get(self, clip, dataset, items, view):
        """Features (N, D) float32 on clip.device, in the order of items."""
        path = self.path(clip, dataset, view)
        stamps = {it.rel: file_stamp(it.path) for it in items}
        stored = _read_features(path)
        missing = list({it.rel: it for it in items if stored.get(it.rel, (None,))[0] != stamps[it.rel]}.values())
        if missing:
            stored = self.put(clip, dataset, missing, view, self._compute(clip, dataset, missing, view), stamps)
        return torch.stack([stored[it.rel][1] for it in items]).float().to(clip.device)

    def put(self, clip, dataset, items, view, feats, stamps=None):
        """Add features of items to the cache file, merged under a lock with what is on disk by then;
        returns the merged {rel: (stamp, feature)}. stamps: the files' stamps taken before they were read
        (a file replaced while it was being encoded is then encoded again by the next run)."""
        stamps = stamps or {it.rel: file_stamp(it.path) for it in items}
        path = self.path(clip, dataset, view)
        with locked(path):
            stored = _read_features(path)  # what other processes added meanwhile
            stored.update({it.rel: (stamps[it.rel], f) for it, f in zip(items, feats.cpu())})
            rels = list(stored)
            save_atomic({"rel": rels, "stamp": [stored[r][0] for r in rels],
                         "feats": torch.stack([stored[r][1] for r in rels])}, path)
        return stored

    @torch.no_grad()
    def _compute(self, clip, dataset, items, view):
        start = time.perf_counter()
        # Dassl's test batch (100) on CUDA; on the CPU 32 images per pass are as fast and need ~0.5 GB less
        # at the peak (ViT-B/16)
        batch_size = 100 if clip.device.type == "cuda" else 32
        # its own generator: creating a loader must not advance the global one (a cold cache would then
        # change every random number drawn after it)
        loader = torch.utils.data.DataLoader(ImageFiles(items, clip.image_size, view), batch_size=batch_size,
                                             num_workers=self.workers, pin_memory=clip.device.type == "cuda",
                                             collate_fn=_collate, generator=torch.Generator())
        feats = []
        desc = f"{clip.backbone} features ({'test' if view == 'test' else f'train view {view}'})"
        for images, errors in tqdm(loader, desc=desc, leave=False, disable=len(loader) < 3):
            check_read(errors, f"image(s) of {dataset}")
            with autocast(clip.device, clip.precision):
                # stored as computed (fp32, or bf16/fp16 under autocast): a cached feature is the computed one
                feats.append(clip.model.encode_image(images.to(clip.device, non_blocking=True)))
        self.seconds += time.perf_counter() - start
        self.seconds_by_tower[f"{clip.backbone} ({clip.weights})"] += time.perf_counter() - start
        self.computed += len(items)
        return torch.cat(feats)


def _read_features(path):
    """{rel: (stamp, feature)} of a cache file ({} if absent or unreadable: read_cache)."""
    def parse(stored):
        rels, stamps, feats = stored["rel"], stored["stamp"], stored["feats"]
        if not len(rels) == len(stamps) == len(feats):
            raise ValueError(f"{len(rels)} images, {len(stamps)} stamps, {len(feats)} features")
        return {rel: (tuple(stamp), f) for rel, stamp, f in zip(rels, stamps, feats)}
    return read_cache(path, parse) or {}


# ==================================================================================================
# (6) Running an experiment: the experiment object, the command line, the run folder, results files.
# ==================================================================================================
# Memory on the CPU with glibc (Linux). torch allocates every tensor with posix_memalign(64, n). glibc's mmap
# threshold is dynamic: freeing a mapped chunk raises it to that chunk's size (up to 32 MB), so activations of a few
# MB (ViT-B/32 at batch 32: 5-20 MB each) are then cut from the heap, where glibc's memalign (2.36 on the machine
# measured) seldom reuses a freed aligned chunk for the next aligned request of the same size once a small
# allocation sits beside it (sourceware bug 14581). Whether that happens depends on where chunks happen to lie,
# which differs between identical runs (even in a script without a loader: address-space randomisation and Python's
# hash seed move them): in some runs the heap grew by about one freed activation per batch and never shrank, so
# identical cold runs peaked at different heights. A fixed threshold (setting it turns the dynamic one off) gives
# every allocation of 1 MB or more a mapping of its own, returned to the system when the tensor is freed; smaller
# ones stay in the heap, where such holes cost little. The price: the kernel faults those pages in afresh at every
# allocation (about 12 % more CPU time while images are encoded on the CPU; nothing once features are cached). It is
# set when this module is imported: before any model is loaded, and inherited by the DataLoader workers, which are
# forked later.
MMAP_THRESHOLD = 1 << 20


def fix_mmap_threshold(nbytes=MMAP_THRESHOLD):
    """Fix glibc's mmap threshold at nbytes (see above). True if set; False where the C library is not glibc
    (macOS, Windows, musl: other allocators, left as they are)."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), or no such name (macOS, musl)
        return False
    M_MMAP_THRESHOLD = -3  # <malloc.h>
    return ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, nbytes) == 1


fix_mmap_threshold()


@dataclass
class EvalSet:
    dataset: str      # the dataset its images come from (the training one, or an --eval-on target)
    classnames: list
    items: list       # test images: features come from the cache when first needed, for any tower
    labels: torch.Tensor


@dataclass
class Experiment:
    """Everything a method needs for one (dataset, protocol, shots, seed): the frozen CLIP, the few-shot
    training items and their class names, cached features, and the evaluation sets
    ({"all": ...} for few-shot, {"base": ..., "new": ...} for base-to-new)."""
    args: argparse.Namespace
    seed: int
    clip: Clip
    dataset: "data.Dataset"
    classnames: list
    train: list
    labels: torch.Tensor
    evals: dict
    cache: FeatureCache
    n_views: int
    times: dict = field(default_factory=dict)

    def train_features(self, epoch, clip=None):
        """Features of the training images in the augmented view used at `epoch` (views cycle when
        --aug-views K > 0; with 0 every epoch has its own view, as in the official code)."""
        view = epoch % self.n_views if self.n_views > 0 else epoch
        return self.cache.get(clip or self.clip, self.dataset.name, self.train, view)

    def train_images(self, epoch):
        """The training images in the view used at `epoch` (the same view as train_features), decoded per step:
        the input of a prompted image tower, which no cache can serve."""
        view = epoch % self.n_views if self.n_views > 0 else epoch
        return ViewImages(self.train, self.clip.image_size, view, self.clip.device)

    def fit(self, params, loss_fn, epoch_data=None, no_decay=(), desc="", epoch_end=None):
        """common.fit with this run's settings (--epochs, --batch-size, --lr, precision, seed, device) over
        its training set; epoch_data defaults to (that epoch's view features, labels). The training time
        is recorded net of the features computed on the way (augmented views are image-tower work)."""
        epoch_data = epoch_data or (lambda epoch: (self.train_features(epoch), self.labels))
        start, feature_s = time.perf_counter(), self.cache.seconds
        stats = fit(params, loss_fn, epoch_data, n=len(self.train), epochs=self.args.epochs,
                    batch_size=self.args.batch_size, lr=self.args.lr, precision=self.clip.precision, seed=self.seed,
                    device=self.clip.device, desc=f"{desc} seed {self.seed}", no_decay=no_decay, epoch_end=epoch_end)
        self.times["training_s"] = time.perf_counter() - start - (self.cache.seconds - feature_s)
        return stats

    def load_prompt(self, method):
        """The prompt.pt given by --load-prompt (None when this run trains), checked against this run:
        written by `method`, for the same backbone, weights and activation."""
        path = getattr(self.args, "load_prompt", None)
        return read_prompt(path, "--load-prompt", self.clip, [method], "evaluate it with that method's file") \
            if path else None

    def test_image_batches(self, ev):
        """The test images of an evaluation set in batches (100 on CUDA, as Dassl's test loader; 32 on the CPU),
        decoded by --workers loader processes, on the device."""
        batch_size = 100 if self.clip.device.type == "cuda" else 32
        loader = torch.utils.data.DataLoader(ImageFiles(ev.items, self.clip.image_size, "test"), batch_size=batch_size,
                                             num_workers=self.cache.workers, collate_fn=_collate,
                                             pin_memory=self.clip.device.type == "cuda", generator=torch.Generator())
        for images, errors in loader:
            check_read(errors, f"image(s) of {ev.dataset}")
            yield images.to(self.clip.device, non_blocking=True)

    def eval_features(self, ev, clip=None):
        """Test features of an evaluation set (encoded on first use, so a run checks everything cheap --
        files, keys, flags -- before the image tower runs)."""
        return self.cache.get(clip or self.clip, ev.dataset, ev.items, "test")

    def evaluate(self, predict, clip=None, time_as="evaluation_s", images=False):
        """predict(classnames, image_feats) -> fp32 logits, on the test features of `clip` (default: this run's
        CLIP; KDPL's teacher passes its own). With images=True (a prompted image tower, which no cache can serve):
        predict(classnames) -> classify, applied to batches of test images, classify(images) -> fp32 logits (the
        text side is built once per class list). Returns accuracies: "accuracy" (few-shot) or "base", "new"
        and "H" (base-to-new), plus one per --eval-on dataset, under its name. The time goes to times[time_as]."""
        clip = clip or self.clip
        start, feature_s = time.perf_counter(), self.cache.seconds
        metrics = {}
        for name, ev in self.evals.items():
            feats = None if images else self.eval_features(ev, clip)  # from the cache, or encoded once into it
            with torch.no_grad(), autocast(clip.device, clip.precision):
                if images:
                    classify = predict(ev.classnames)
                    logits = torch.cat([classify(x) for x in self.test_image_batches(ev)])
                else:
                    logits = predict(ev.classnames, feats)
            metrics[name if name != "all" else "accuracy"] = accuracy(logits, ev.labels)
        if "base" in metrics:
            metrics["H"] = harmonic_mean(metrics["base"], metrics["new"])
        self.times[time_as] = time.perf_counter() - start - (self.cache.seconds - feature_s)
        return metrics


def prepare(args, seed, backbone=None, pretrained=None):
    """Load the dataset and CLIP and sample the few-shot subset (before any base/new subsampling, as
    CoOp does). No image is encoded here: features are computed (or read from the cache) when used."""
    set_seed(seed)
    device = resolve_device(args.device)
    check_writable(args.cache_dir, "--cache-dir")
    ds = data.load_dataset(args.dataset, args.data_root, download=not args.no_download)
    train, _val = data.fewshot_split(ds, args.shots, seed)  # val is sampled too: keeps Dassl's RNG sequence
    if not ds.train:
        raise UserError(f"{ds.name} is test-only (no training split); train on another dataset")
    available = min(Counter(it.label for it in ds.train).values())
    if args.shots > available:
        raise UserError(f"--shots {args.shots} asks for more images than the smallest class of {ds.name} has "
                        f"({available}); choose at most {available}")
    clip = load_clip(backbone or args.backbone, pretrained or args.pretrained, device,
                     resolve_precision(args.precision, device), getattr(args, "quick_gelu", False))
    clip.model.set_grad_checkpointing(args.grad_checkpointing)  # open_clip's own: torch.utils.checkpoint per block
    cache = FeatureCache(Path(args.cache_dir), workers=args.workers)
    if args.protocol == "base2new":
        # Dassl subsamples train, val and test together, taking the classes from the few-shot train set
        new_names, (_, new_test) = data.subsample_classes(ds, "new", train, ds.test)
        classnames, (train, base_test) = data.subsample_classes(ds, "base", train, ds.test)
        splits = {"base": (classnames, base_test), "new": (new_names, new_test)}
    else:
        classnames = ds.classnames
        splits = {"all": (ds.classnames, ds.test)}
    for target in args.eval_on:  # cross-dataset / domain generalisation: the same prompt, the target's classes
        tds = data.load_dataset(target, args.data_root, download=not args.no_download)
        splits[tds.name] = (tds.classnames, tds.test)
    evals = {}
    for which, (names, test) in splits.items():
        source = ds.name if which in ("all", "base", "new") else which
        evals[which] = EvalSet(source, names, test, torch.tensor([it.label for it in test], device=device))
    labels = torch.tensor([it.label for it in train], device=device)
    return Experiment(args, seed, clip, ds, classnames, train, labels, evals, cache, args.aug_views)


def resolve_device(name):
    """--device: auto, cpu, cuda or cuda:N, checked against what torch sees."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name}: torch sees {count} CUDA device(s), cuda:0 .. cuda:{count - 1}")
    elif device.type != "cpu":
        raise UserError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def base_parser(description, protocol="fewshot", protocol_help=None):
    """The flags every method shares. Defaults here are CoOp's; a method sets its own with
    parser.set_defaults(...), and its default protocol here (None: the method resolves it after parsing)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="eurosat", type=dataset_arg,
                   help="dataset name (see data.py), e.g. eurosat, dtd, imagenet")
    p.add_argument("--shots", type=int, default=16, help="training images per class (1, 2, 4, 8, 16)")
    p.add_argument("--seed", type=int, default=1, help="seed of the few-shot subset and of training")
    p.add_argument("--seeds", type=int, nargs="+", help="run several seeds and report mean ± std (overrides --seed)")
    p.add_argument("--protocol", default=protocol, choices=["fewshot", "base2new"], help=protocol_help or
                   "fewshot: all classes; base2new: train on the base half, test on base and new")
    p.add_argument("--eval-on", nargs="+", default=[], type=dataset_arg, metavar="DATASET",
                   help="also test the learned prompt on these datasets' test splits with their own classes: "
                        "cross-dataset (e.g. train imagenet, --eval-on caltech101 dtd ...) or domain "
                        "generalisation (--eval-on imagenetv2 imagenet_sketch imagenet_a imagenet_r)")
    p.add_argument("--backbone", default="ViT-B-16", help="open_clip architecture, or tiny / tiny-wide for tests")
    p.add_argument("--pretrained", default="openai",
                   help="open_clip weights tag, a checkpoint file (OpenAI's ViT-B-16.pt etc., an OpenAI-format "
                        "state dict or an open_clip checkpoint), or none")
    p.add_argument("--quick-gelu", action="store_true",
                   help="build the model with QuickGELU (as OpenAI's weights need). Automatic for OpenAI's files "
                        "and tags; needed only for an open_clip checkpoint file of QuickGELU weights (or name the "
                        "backbone ...-quickgelu)")
    p.add_argument("--data-root", default="./data", help="folder holding the datasets in CoOp's layout")
    p.add_argument("--no-download", action="store_true", help="never download a missing dataset or split file")
    p.add_argument("--output", default="runs", help="root folder of the results")
    p.add_argument("--overwrite", action="store_true", help="replace existing results of the same run")
    p.add_argument("--cache-dir", default=os.environ.get("PROMPT_CACHE", "cache"),
                   help="feature cache folder (env PROMPT_CACHE)")
    p.add_argument("--aug-views", type=int, default=0,
                   help="augmented views per training image, cycled over epochs; 0 = a fresh view every "
                        "epoch (the official behaviour); every view is cached for later runs")
    p.add_argument("--epochs", type=int, help="training epochs (default: the method's per-shot recipe)")
    p.add_argument("--load-prompt", metavar="FILE",
                   help="no training: evaluate a saved prompt.pt of this method (same backbone and weights) on "
                        "this dataset's test split and --eval-on; results go to .../<protocol>/loaded/<its run>")
    p.add_argument("--lr", type=float, default=0.002, help="SGD learning rate")  # CoOp configs
    p.add_argument("--batch-size", type=int, default=32, help="training batch size")  # CoOp configs
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast dtype (fp32 master weights always; fp16 adds a GradScaler). auto: bf16 on "
                        "CUDA, fp32 on the CPU; bf16/fp16 on the CPU run CPU autocast")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute the towers' activations in the backward pass instead of keeping them: the same "
                        "numbers in a fraction of the memory (CoCoOp on 1,000 classes), for more time per step")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding workers")
    return p


def dataset_arg(name):
    """--dataset as data.py's canonical key; an unknown name is a usage error listing the valid ones."""
    try:
        return data.canonical_name(name)
    except data.DataError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def run_dir(args, method, seed):
    """<output>/<method>/<dataset>/<protocol>/shots_<k>/seed_<s>; an evaluation of a saved prompt goes to
    <output>/<method>/<dataset>/<protocol>/loaded/<the prompt's run>, never over a training run."""
    where = Path(args.output) / method / data.canonical_name(args.dataset) / args.protocol
    if getattr(args, "load_prompt", None):
        return where / "loaded" / "_".join(Path(args.load_prompt).resolve().parent.parts[-5:])
    return where / f"shots_{args.shots}" / f"seed_{seed}"


def claim_run_dir(args, method, seed):
    """The results folder of this run (created when the first result is saved, so a run that fails
    early leaves nothing behind); refuses to replace another run's results unless --overwrite."""
    out = run_dir(args, method, seed)
    if (out / "results.json").exists() and not args.overwrite:
        raise UserError(f"{out / 'results.json'} already exists; pass --overwrite to replace it or "
                        f"--output DIR to write elsewhere")
    check_writable(out, "--output")
    return out


def check_writable(path, flag):
    """The folder `path`, or the nearest existing folder above it, must be a writable folder with space left."""
    path = Path(path).absolute()
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not writable; choose another {flag}")
    if shutil.disk_usage(existing).free == 0:  # cheap to see now, rather than when the first file is written
        raise UserError(f"{flag} {path}: no space left on the filesystem of {existing}; free some space or "
                        f"choose another {flag}")


def _to_cpu(value):
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def save_prompt(out, exp, method, ctx, position="end", csc=False, **fields):
    """prompt.pt, one format for every method: the learned context ctx (shared (M, d), class-specific
    (C, M, d), or one per prompt; None for a method without one, VPT), the method's other learned tensors, and
    what they belong to (method, classes, backbone, weights, activation), on the CPU so that it loads anywhere
    (--load-prompt)."""
    n_ctx = None if ctx is None else ctx.shape[-2]
    save_atomic(_to_cpu({"method": method, "ctx": ctx, "n_ctx": n_ctx, "position": position, "csc": csc,
                         **fields, "classnames": exp.classnames, "backbone": exp.clip.backbone,
                         "weights": exp.clip.weights, "activation": exp.clip.activation}), out / "prompt.pt")


def require_prompted_vit(clip, method):
    """A prompted image tower needs a ViT (a ResNet has no tokens to prompt): one message before any work."""
    if not isinstance(clip.model.visual, open_clip.transformer.VisionTransformer):
        raise UserError(f"{method} puts learned tokens inside the image tower's transformer layers: it needs a ViT "
                        f"backbone (e.g. ViT-B-16, ViT-B-32), not {clip.backbone}")


def read_prompt(path, flag, clip, methods, advice):
    """A prompt.pt that save_prompt wrote, given by `flag` (--load-prompt, EMPL's --init-from), checked before
    anything uses it: readable, written by one of `methods`, for this CLIP (backbone, weights, activation).
    advice: what to do instead when another method wrote it."""
    try:
        saved = torch.load(path, map_location=clip.device)
    except Exception as err:  # missing, truncated, not a torch file
        raise UserError(f"{flag} {path}: cannot read it ({type(err).__name__}: {err}); give the prompt.pt "
                        f"that a training run wrote next to its results.json") from None
    found = saved.get("method") if isinstance(saved, dict) else None
    if found not in methods:
        raise UserError(f"{flag} {path} was written by {found or 'something else'}, not by {' or '.join(methods)}: "
                        f"{advice}")
    mine = (clip.backbone, clip.weights, clip.activation)
    theirs = (saved.get("backbone"), saved.get("weights"), saved.get("activation"))
    if mine != theirs:
        raise UserError(f"{flag} {path} was trained with {' / '.join(map(str, theirs))}; this run loads "
                        f"{' / '.join(mine)}: pass the same --backbone, --pretrained (and --quick-gelu)")
    return saved


def versions():
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "open_clip": open_clip.__version__, "numpy": np.__version__,
            "cuda": torch.version.cuda if torch.cuda.is_available() else None}


def write_results(out, exp, method, metrics, extra):
    """results.json: metrics, full config, versions, weights identity, times, the training subset."""
    result = {
        "method": method, "dataset": exp.dataset.name, "protocol": exp.args.protocol,
        "shots": exp.args.shots, "seed": exp.seed, "metrics": metrics,
        "backbone": exp.clip.backbone, "weights": exp.clip.weights,
        "activation": {"name": exp.clip.activation, "chosen_by": exp.clip.activation_source},
        "precision": exp.clip.precision,
        "config": {k: v for k, v in vars(exp.args).items()},
        "versions": versions(), "device": str(exp.clip.device),
        "times": dict(exp.times, feature_extraction_s=exp.cache.seconds, images_encoded=exp.cache.computed,
                      feature_extraction_s_by_tower=dict(exp.cache.seconds_by_tower)),
        "classnames": exp.classnames,
        "eval_classnames": {name: ev.classnames for name, ev in exp.evals.items()},
        "train_images": [it.rel for it in exp.train],
        **extra,
    }
    write_atomic(out / "results.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    return result


def main_seeds(args, method, run_one, label=""):
    """Run run_one(args, seed) -> metrics for each seed; print a summary (mean ± std over seeds). label: what every
    accuracy line must say about how it was measured (EMPL: which test)."""
    seeds = args.seeds or [args.seed]
    all_metrics = []
    label = f"  [{label}]" if label else ""
    try:
        for seed in seeds:
            metrics = run_one(args, seed)
            note = "  (random weights: meaningless)" if args.pretrained == "none" else ""
            print(f"{method} {args.dataset} {args.protocol} {args.shots}-shot seed {seed}: " +
                  ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()) + label + note)
            all_metrics.append(metrics)
    except (UserError, data.DataError) as err:
        sys.exit(f"error: {err}")
    except OSError as err:  # a full disk, a folder that vanished: the file and the reason, not a traceback
        sys.exit(f"error: {err}")
    if len(seeds) > 1:
        for key in all_metrics[0]:
            values = np.array([m[key] for m in all_metrics])
            print(f"{key}: {values.mean():.2f} ± {values.std():.2f} over seeds {seeds}" + label)
    return all_metrics
