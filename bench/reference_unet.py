#!/usr/bin/env python3
"""Eager PyTorch reference for bench/train_speed.cpp: diffusers' UNet2DModel (same blocks, same math, same
state_dict names), written from the architecture description, built from a preset's "model" section, trained
the way the diffusers examples train it (DDPM eps loss, AdamW, gradient clipping, EMA) and evaluated the way a
sampler evaluates it. Prints the same JSON lines as bench_train_speed.

  python3 bench/reference_unet.py --preset fmnist --batch 64 --threads 2 [--device cpu|cuda] [--mode both]
  python3 bench/reference_unet.py --check-fixtures ../shared/fixtures/diffusers_unet2d   # same function as diffusers?

Only torch is needed (1.13 or 2.x). On 2.x attention goes through F.scaled_dot_product_attention, as
diffusers' AttnProcessor2_0 does; on 1.13 through baddbmm + softmax, as its AttnProcessor does.
"""
import argparse
import contextlib
import json
import math
import os
import statistics
import struct
import sys
import time

# The C++ side gives OpenBLAS one thread (diffuse::set_threads): where PyTorch's BLAS is OpenBLAS's pthread build
# (Debian 13), its workers busy-wait after each call and take the cores from the OpenMP team that runs the
# convolutions (measured on 2 cores: training 21 -> 32, sampling 65 -> 110 img/s). The reference gets the same
# setting, read when torch loads OpenBLAS; a value in the environment stands. No effect with MKL or reference BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HAS_SDPA = hasattr(F, "scaled_dot_product_attention")
# "plain": nn.Linear and baddbmm/bmm as diffusers calls them. "onednn": the kernel choices of the C++ U-Net on
# the CPU (projections as 1x1 convolutions, batched products through oneDNN's sgemm), so that a comparison
# isolates the engine from Debian's reference BLAS, which serves plain float32 matmuls at a few GFLOP/s.
KERNELS = "plain"
# "fp32", or "bf16"/"fp16": the network under torch.autocast, the loss in float32 (as `--precision` in C++).
PRECISION = "fp32"


def autocast(device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(PRECISION)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that normalizes reduced-precision activations in float32: LibTorch 1.13's CPU kernel
    refuses bf16 input with float32 weights under autocast (what a PyTorch user must write, and what the
    C++ U-Net does)."""

    def forward(self, x):
        if x.dtype != self.weight.dtype:
            x = x.to(self.weight.dtype)
        return super().forward(x)

class _OneDnn:
    """dnnl_sgemm from the oneDNN library LibTorch loads (row-major C = alpha op(A) op(B) + beta C)."""
    lib = None

    @classmethod
    def load(cls):
        if cls.lib is None:
            import ctypes
            import ctypes.util
            names = ["libdnnl.so.3", "libdnnl.so.2", ctypes.util.find_library("dnnl")]
            for name in [n for n in names if n]:
                try:
                    lib = ctypes.CDLL(name)
                    fn = lib.dnnl_sgemm
                    break
                except (OSError, AttributeError):
                    continue
            else:
                raise RuntimeError("reference_unet: --kernels onednn needs libdnnl (dnnl_sgemm), not found")
            i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
            fn.argtypes = [ctypes.c_char, ctypes.c_char, i64, i64, i64, f32, ptr, i64, ptr, i64, f32, ptr, i64]
            fn.restype = ctypes.c_int
            omp = ctypes.CDLL(None)
            cls.omp_set_num_threads = getattr(omp, "omp_set_num_threads", None)
            from concurrent.futures import ThreadPoolExecutor
            cls.pool = ThreadPoolExecutor(max_workers=max(torch.get_num_threads(), 1))
            cls.lib = fn
        return cls.lib


def _sgemm_operand(x):
    rows, cols = x.shape[1], x.shape[2]
    if x.stride(2) == 1 and x.stride(1) >= max(1, cols):
        return x, b"N", x.stride(1)
    if x.stride(1) == 1 and x.stride(2) >= max(1, rows):
        return x, b"T", x.stride(2)
    x = x.contiguous()
    return x, b"N", max(1, cols)


def _sgemm_batched(a, b, alpha):
    """alpha * a @ b for float32 CPU a [B, M, K], b [B, K, N] of any strides; the batch split over threads,
    each product single-threaded (as src/nn/batched_matmul.cpp does)."""
    sgemm = _OneDnn.load()
    batch, m, k, n = a.shape[0], a.shape[1], a.shape[2], b.shape[2]
    (ta, transa, lda), (tb, transb, ldb) = _sgemm_operand(a), _sgemm_operand(b)
    c = torch.empty(batch, m, n, dtype=torch.float32)
    pa, pb, pc = ta.data_ptr(), tb.data_ptr(), c.data_ptr()
    sa, sb, sc = ta.stride(0) * 4, tb.stride(0) * 4, m * n * 4

    def run(begin, end):
        if _OneDnn.omp_set_num_threads is not None:
            _OneDnn.omp_set_num_threads(1)
        for i in range(begin, end):
            if sgemm(transa, transb, m, n, k, alpha, pa + i * sa, lda, pb + i * sb, ldb, 0.0, pc + i * sc, n) != 0:
                raise RuntimeError("dnnl_sgemm failed")

    workers = max(min(torch.get_num_threads(), batch), 1)
    chunk = (batch + workers - 1) // workers
    futures = [_OneDnn.pool.submit(run, s, min(s + chunk, batch)) for s in range(0, batch, chunk)]
    for f in futures:
        f.result()
    return c


class _OneDnnBmm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, alpha):
        ctx.save_for_backward(a, b)
        ctx.alpha = alpha
        return _sgemm_batched(a, b, alpha)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        ga = _OneDnnBmm.apply(g, b.transpose(1, 2), ctx.alpha) if ctx.needs_input_grad[0] else None
        gb = _OneDnnBmm.apply(a.transpose(1, 2), g, ctx.alpha) if ctx.needs_input_grad[1] else None
        return ga, gb, None


# Counts multiply-adds of the matmuls that nn.Conv2d / nn.Linear hooks cannot see (attention).
_attention_flops = [0]


# ---------------------------------------------------------------------------------------------------------
# Model (diffusers UNet2DModel, time_embedding_type "positional", resnet_time_scale_shift "default").

def timestep_embedding(timesteps, dim, flip_sin_to_cos, freq_shift):
    """Sinusoidal embedding (Vaswani et al. 2017) as diffusers builds it: float32, exponents over half - shift."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / (half - freq_shift)
    arg = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm, SiLU, conv3x3, + projected time embedding, GroupNorm, SiLU, dropout, conv3x3, + shortcut."""

    def __init__(self, cin, cout, temb, groups, eps, dropout, output_scale_factor):
        super().__init__()
        self.norm1 = GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = GroupNorm(groups, cout, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return (shortcut + h) / self.output_scale_factor


class Attention(nn.Module):
    """Self-attention over the H*W tokens: group_norm, to_q/to_k/to_v, softmax(q k^T / sqrt(d)) v per head,
    to_out.0, + residual, / rescale_output_factor."""

    def __init__(self, channels, heads, head_dim, groups, eps, rescale_output_factor):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.group_norm = GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, inner)
        self.to_k = nn.Linear(channels, inner)
        self.to_v = nn.Linear(channels, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, channels), nn.Dropout(0.0)])
        self.rescale_output_factor = rescale_output_factor

    def forward(self, x):
        if KERNELS == "onednn" and x.device.type == "cpu" and x.dtype == torch.float32:
            return self.forward_onednn(x)
        b, c, height, width = x.shape
        length, heads, d = height * width, self.heads, self.head_dim
        tokens = self.group_norm(x.view(b, c, length)).transpose(1, 2)  # [B, L, C]
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        _attention_flops[0] += 2 * 2 * b * heads * length * length * d
        scale = 1.0 / math.sqrt(d)
        if HAS_SDPA:
            q, k, v = (t.view(b, length, heads, d).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
            o = o.transpose(1, 2).reshape(b, length, heads * d)
        else:
            q, k, v = (t.reshape(b, length, heads, d).permute(0, 2, 1, 3).reshape(b * heads, length, d)
                       for t in (q, k, v))
            scores = torch.baddbmm(torch.empty(b * heads, length, length, dtype=q.dtype, device=q.device),
                                   q, k.transpose(1, 2), beta=0, alpha=scale)
            probs = scores.float().softmax(dim=-1).to(q.dtype)  # upcast_softmax
            o = torch.bmm(probs, v).reshape(b, heads, length, d).permute(0, 2, 1, 3).reshape(b, length, heads * d)
        o = self.to_out[1](self.to_out[0](o))
        o = o.transpose(1, 2).reshape(b, c, height, width)
        return (o + x) / self.rescale_output_factor

    def forward_onednn(self, x):
        """The same function with the C++ U-Net's CPU kernels: 1x1 convolutions, channel-major heads, sgemm."""
        b, c, height, width = x.shape
        length, heads, d = height * width, self.heads, self.head_dim
        inner = heads * d
        h = self.group_norm(x)

        def project(linear):  # [B, inner, H, W] seen as [B * heads, L, d] (no copy)
            y = F.conv2d(h, linear.weight.view(inner, c, 1, 1), linear.bias)
            return y.view(b, heads, d, length).transpose(2, 3).reshape(b * heads, length, d)

        q, k, v = project(self.to_q), project(self.to_k), project(self.to_v)
        _attention_flops[0] += 2 * 2 * b * heads * length * length * d
        probs = _OneDnnBmm.apply(q, k.transpose(1, 2), 1.0 / math.sqrt(d)).softmax(dim=-1)
        o = _OneDnnBmm.apply(v.transpose(1, 2), probs.transpose(1, 2), 1.0)  # (P V)^T: [B * heads, d, L]
        o = o.reshape(b, inner, height, width)
        out = self.to_out[0]
        o = F.conv2d(o, out.weight.view(c, inner, 1, 1), out.bias)
        return (o + x) / self.rescale_output_factor


class Downsample2D(nn.Module):
    def __init__(self, channels, padding):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0)
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _attention(cfg, channels, groups):
    head_dim = cfg["attention_head_dim"] if cfg["attention_head_dim"] is not None else channels
    return Attention(channels, channels // head_dim, head_dim, groups, cfg["norm_eps"], 1.0)


class DownBlock(nn.Module):
    """DownBlock2D / AttnDownBlock2D."""

    def __init__(self, cfg, cin, cout, temb, attention, downsample):
        super().__init__()
        n = cfg["layers_per_block"]
        if attention:
            self.attentions = nn.ModuleList([_attention(cfg, cout, cfg["norm_num_groups"]) for _ in range(n)])
        else:
            self.attentions = None
        self.resnets = nn.ModuleList([
            ResnetBlock2D(cin if i == 0 else cout, cout, temb, cfg["norm_num_groups"], cfg["norm_eps"],
                          cfg["dropout"], 1.0) for i in range(n)])
        self.downsamplers = nn.ModuleList([Downsample2D(cout, cfg["downsample_padding"])]) if downsample else None

    def forward(self, x, temb):
        outputs = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
            outputs.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            outputs.append(x)
        return x, outputs


class UpBlock(nn.Module):
    """UpBlock2D / AttnUpBlock2D: each resnet takes cat([x, skip]) with skips popped from the end."""

    def __init__(self, cfg, cin, prev, cout, temb, attention, upsample):
        super().__init__()
        n = cfg["layers_per_block"] + 1
        if attention:
            self.attentions = nn.ModuleList([_attention(cfg, cout, cfg["norm_num_groups"]) for _ in range(n)])
        else:
            self.attentions = None
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev if i == 0 else cout) + (cin if i == n - 1 else cout), cout, temb,
                          cfg["norm_num_groups"], cfg["norm_eps"], cfg["dropout"], 1.0) for i in range(n)])
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if upsample else None

    def forward(self, x, skips, temb):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2D with one layer: resnet, attention, resnet."""

    def __init__(self, cfg, channels, temb):
        super().__init__()
        groups = cfg["norm_num_groups"]
        attn_groups = cfg["attn_norm_num_groups"] if cfg["attn_norm_num_groups"] is not None else groups
        scale = cfg["mid_block_scale_factor"]
        if cfg["add_attention"]:
            head_dim = cfg["attention_head_dim"] if cfg["attention_head_dim"] is not None else channels
            self.attentions = nn.ModuleList([
                Attention(channels, channels // head_dim, head_dim, attn_groups, cfg["norm_eps"], scale)])
        else:
            self.attentions = None
        self.resnets = nn.ModuleList([
            ResnetBlock2D(channels, channels, temb, groups, cfg["norm_eps"], cfg["dropout"], scale) for _ in range(2)])

    def forward(self, x, temb):
        x = self.resnets[0](x, temb)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x, temb)


UNET_DEFAULTS = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1.0,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "time_embedding_dim": None,
}


class UNet2DModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        cfg = dict(UNET_DEFAULTS)
        cfg.update({k: v for k, v in config.items() if not k.startswith("_")})
        for key, want in (("time_embedding_type", "positional"), ("resnet_time_scale_shift", "default"),
                          ("act_fn", "silu"), ("downsample_type", "conv"), ("upsample_type", "conv")):
            if cfg[key] != want:
                raise ValueError(f"reference_unet: {key} = {cfg[key]!r} is not implemented (only {want!r})")
        if cfg["class_embed_type"] is not None:
            raise ValueError("reference_unet: class_embed_type is not implemented (only null)")
        self.cfg = cfg
        ch = cfg["block_out_channels"]
        temb = cfg["time_embedding_dim"] or 4 * ch[0]
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.class_embedding = nn.Embedding(cfg["num_class_embeds"], temb) if cfg["num_class_embeds"] else None
        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg["down_block_types"]):
            self.down_blocks.append(DownBlock(cfg, ch[max(i - 1, 0)], ch[i], temb, kind == "AttnDownBlock2D",
                                              i != len(ch) - 1))
        self.mid_block = MidBlock(cfg, ch[-1], temb)
        rev = list(reversed(ch))
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg["up_block_types"]):
            self.up_blocks.append(UpBlock(cfg, rev[min(i + 1, len(ch) - 1)], rev[max(i - 1, 0)], rev[i], temb,
                                          kind == "AttnUpBlock2D", i != len(ch) - 1))
        self.conv_norm_out = GroupNorm(cfg["norm_num_groups"], ch[0], eps=cfg["norm_eps"])
        self.conv_out = nn.Conv2d(ch[0], cfg["out_channels"], 3, padding=1)

    def forward(self, x, timesteps, class_labels=None):
        cfg = self.cfg
        if cfg["center_input_sample"]:
            x = 2 * x - 1.0
        if timesteps.dim() == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.to(x.device) * torch.ones(x.shape[0], dtype=timesteps.dtype, device=x.device)
        emb = timestep_embedding(timesteps, cfg["block_out_channels"][0], cfg["flip_sin_to_cos"], cfg["freq_shift"])
        emb = self.time_embedding(emb.to(x.dtype))
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels).to(x.dtype)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, outputs = block(h, emb)
            skips.extend(outputs)
        h = self.mid_block(h, emb)
        for block in self.up_blocks:
            h = block(h, skips, emb)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


def forward_gflops_per_image(model, cfg, device):
    """2 x multiply-adds of every convolution, linear layer and attention matmul, one image, forward only
    (counted on the plain kernels, where the projections are nn.Linear calls)."""
    global KERNELS
    kernels, KERNELS = KERNELS, "plain"
    total = [0]

    def conv_hook(m, inputs, out):
        total[0] += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, inputs, out):
        total[0] += 2 * out.numel() * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    _attention_flops[0] = 0
    s = cfg["sample_size"]
    with torch.no_grad():
        y = torch.zeros(1, dtype=torch.long, device=device) if model.class_embedding is not None else None
        model(torch.zeros(1, cfg["in_channels"], s, s, device=device), torch.zeros(1, device=device), y)
    for h in hooks:
        h.remove()
    KERNELS = kernels
    return (total[0] + _attention_flops[0]) / 1e9


# ---------------------------------------------------------------------------------------------------------
# Safetensors (format: 8-byte little-endian header length, JSON header, raw little-endian data).

_ST_DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}


def load_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = bytearray(blob[8 + n:])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        t = torch.frombuffer(data[begin:end], dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"]).clone()
    return out


def check_fixtures(root):
    """Loads each diffusers fixture (config.json, weights, io.safetensors) and compares with diffusers' output."""
    ok = True
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            continue
        with open(os.path.join(folder, "config.json")) as f:
            model = UNet2DModel(json.load(f)).eval()
        weights = load_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        io = load_safetensors(os.path.join(folder, "io.safetensors"))
        y = io.get("class_labels")
        with torch.no_grad():
            out64 = model.double()(io["sample"].double(), io["timestep"], y).float()
            out32 = model.float()(io["sample"], io["timestep"], y)
        err64 = (out64 - io["expected"]).abs().max().item()
        err32 = (out32 - io["expected"]).abs().max().item()
        params = sum(p.numel() for p in model.parameters())
        good = not missing and not unexpected and err64 <= 1e-6 and err32 <= 1e-5
        ok = ok and good
        print(f"{'ok  ' if good else 'FAIL'} {name}: {params} params, missing {len(missing)}, unexpected "
              f"{len(unexpected)}, max |float64 - diffusers| {err64:.2e}, max |float32 - diffusers| {err32:.2e}")
    return ok


# ---------------------------------------------------------------------------------------------------------
# Benchmarks.

def load_preset(name):
    path = name
    if not os.path.isfile(path):
        here = os.path.dirname(os.path.abspath(__file__))
        configs = os.environ.get("DIFFUSE_CONFIGS", os.path.join(here, "..", "configs"))
        path = os.path.join(configs, name + ".json")
    with open(path) as f:
        return json.load(f)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def report(args, bench, params, device, seconds, total, extra):
    img_s = args.batch * len(seconds) / max(total, 1e-12)
    med = statistics.median(seconds) if seconds else 0.0
    impl = "pytorch" if KERNELS == "plain" else "pytorch-" + KERNELS
    if bench == "train" and args.step == "lean":
        impl += "-lean"
    rec = {"impl": impl, "bench": bench,
           "preset": args.preset, "device": str(device), "batch": args.batch, "threads": torch.get_num_threads(),
           "params": params, "iters": len(seconds), "seconds": total,
           "img_per_s": img_s, "img_per_s_median": args.batch / med if med > 0 else img_s,
           "torch": torch.__version__, "precision": PRECISION, "cudnn_benchmark": bool(args.cudnn_benchmark),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}
    if device.type == "cuda":
        rec["device_name"] = torch.cuda.get_device_name(device)
    rec.update(extra)
    print(json.dumps(rec))
    peak = f", peak {int(extra['peak_mem_mib'])} MiB" if "peak_mem_mib" in extra else ""
    print(f"# {rec['impl']} {bench:6s} {args.preset} {device} {PRECISION} batch {args.batch} threads {torch.get_num_threads()}: "
          f"{img_s:.1f} img/s (median iteration {rec['img_per_s_median']:.1f} img/s), {len(seconds)} iterations "
          f"in {total:.2f} s{peak}", flush=True)


def trace_one(args, name, iteration):
    """One more iteration under the autograd profiler, written as PREFIX-NAME.trace (chrome://tracing)."""
    if not args.profile:
        return
    path = f"{args.profile}-{name}.trace"
    with torch.autograd.profiler.profile() as prof:
        iteration()
    prof.export_chrome_trace(path)
    print(f"# {'pytorch' if KERNELS == 'plain' else 'pytorch-' + KERNELS}: one {name} iteration traced to {path}")


def device_busy_ms(averages):
    """The GPU's summed kernel, copy and fill time in a profile (ms), or None where this torch does not say."""
    try:
        from torch.autograd import DeviceType
        total = 0.0
        for e in averages:
            if getattr(e, "device_type", None) != DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None)
            total += float(us if us is not None else getattr(e, "self_cuda_time_total", 0.0))
        return total / 1e3
    except Exception:  # noqa: BLE001 (an older or newer profiler API: the table still prints)
        return None


def kernel_table(args, name, iteration, device, timed_s=None):
    """--kernel-table N: three more iterations under torch.profiler, then the N operators and kernels with the
    most self time on the device (where a CUDA step spends the GPU's time: convolutions, normalization, copies;
    on the CPU, the operators' own time). On CUDA also the GPU's busy time per iteration against `timed_s`, the
    timed iterations' wall time each: far below it, the eager step waits for the host launching its kernels."""
    if args.kernel_table <= 0:
        return
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            iteration()
        sync(device)
    averages = prof.key_averages()
    table = None
    keys = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
    for key in keys:
        try:
            table = averages.table(sort_by=key, row_limit=args.kernel_table, max_name_column_width=70)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    print(f"# kernel table: {name}, 3 iterations, {args.preset} batch {args.batch} {PRECISION}")
    print(table if table is not None else f"(this torch {torch.__version__} sorts by none of {keys})", flush=True)
    busy = device_busy_ms(averages) if cuda else None
    if busy is not None and timed_s:
        per = busy / 3.0
        print(f"# GPU busy {per:.2f} ms per {name} iteration (kernels, copies, fills) against {1e3 * timed_s:.2f} ms "
              f"of wall time per timed iteration: {100.0 * per / (1e3 * timed_s):.0f}%", flush=True)


def peak_memory(device):
    if device.type == "cuda":
        return {"peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    return {}


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def linear_betas(process):
    if process.get("kind", "ddpm") != "ddpm" or process.get("beta_schedule", "linear") != "linear":
        raise ValueError("reference_unet: only the DDPM process with linear betas is implemented")
    T = int(process.get("num_timesteps", 1000))
    return torch.linspace(process.get("beta_start", 1e-4), process.get("beta_end", 0.02), T, dtype=torch.float64)


def bench_train(args, preset, device, steps, warmup):
    """One step of diffusers' train_unconditional recipe: add_noise, eps MSE, backward, clip, AdamW, EMA.
    --step lean: the bare step (no dropout, Adam, no clipping, warm-up schedule or EMA), as a minimal PyTorch
    training loop is often written; it does less than the C++ step and is timed only to place the recipe's figure."""
    cfg, t = dict(preset["model"]), preset.get("train", {})
    lean = args.step == "lean"
    if lean:
        cfg["dropout"] = 0.0
    torch.manual_seed(args.seed)
    model = UNet2DModel(cfg).to(device).train()
    params = [p for p in model.parameters()]
    opt_class = torch.optim.Adam if lean else torch.optim.AdamW
    kw = {"foreach": True} if "foreach" in opt_class.__init__.__code__.co_varnames else {}
    opt = opt_class(params, lr=t.get("lr", 2e-4), betas=(t.get("beta1", 0.9), t.get("beta2", 0.999)),
                    eps=t.get("adam_eps", 1e-8), weight_decay=0.0 if lean else t.get("weight_decay", 0.0), **kw)
    warm = max(int(t.get("warmup_steps", 200)), 1)
    sched = None if lean else torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    ema = None if lean else [p.detach().clone() for p in params]
    ema_decay = t.get("ema_decay", 0.9999)
    grad_clip = 0.0 if lean else t.get("grad_clip", 1.0)
    alphas_cumprod = torch.cumprod(1.0 - linear_betas(preset.get("process", {})), 0).float().to(device)
    T = alphas_cumprod.numel()
    s, c = cfg.get("sample_size", 32), cfg.get("in_channels", 3)
    n = max(8 * args.batch, 2048)
    g = torch.Generator().manual_seed(args.seed + 7)
    images = torch.randint(0, 256, (n, c, s, s), generator=g, dtype=torch.uint8).to(device)
    labels = (torch.randint(0, cfg["num_class_embeds"], (n,), generator=g).to(device)
              if cfg.get("num_class_embeds") else None)
    steps_per_epoch = n // args.batch
    state = {"perm": None, "epoch": -1, "loss": 0.0}

    def step_once(step):
        epoch, within = divmod(step, steps_per_epoch)
        if epoch != state["epoch"]:
            # On a GPU the permutation moves once per epoch and the loss stays on the device (as the C++ trainer).
            state["perm"] = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1000003 + epoch)).to(device)
            state["epoch"] = epoch
        idx = state["perm"][within * args.batch:(within + 1) * args.batch].to(device)
        x0 = images.index_select(0, idx).float() / 127.5 - 1.0
        y = labels.index_select(0, idx) if labels is not None else None
        timesteps = torch.randint(0, T, (args.batch,), device=device)
        noise = torch.randn_like(x0)
        ab = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise  # DDPMScheduler.add_noise
        with autocast(device):
            out = model(x_t, timesteps, y)
        loss = F.mse_loss(out.float(), noise)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        # EMA with warm-up decay min(decay, (1 + n) / (10 + n)) (diffusers EMAModel).
        d = min(ema_decay, (2.0 + step) / (11.0 + step))
        if ema is not None:
            with torch.no_grad():
                if hasattr(torch, "_foreach_lerp_"):
                    torch._foreach_lerp_(ema, params, 1.0 - d)
                else:
                    torch._foreach_mul_(ema, d)
                    torch._foreach_add_(ema, params, alpha=1.0 - d)
        state["loss"] = loss.detach() if device.type == "cuda" else loss.item()

    for i in range(warmup):
        step_once(i)
    sync(device)
    reset_peak_memory(device)
    seconds = []
    start = prev = time.perf_counter()
    for i in range(steps):
        step_once(warmup + i)
        now = time.perf_counter()  # on the CPU loss.item() synchronized; on a GPU the total below counts
        seconds.append(now - prev)
        prev = now
    sync(device)
    total = time.perf_counter() - start
    extra = peak_memory(device)
    extra["last_loss"] = float(state["loss"])
    extra["gflop_fwd_per_img"] = forward_gflops_per_image(model, model.cfg, device)
    report(args, "train", sum(p.numel() for p in params), device, seconds, total, extra)
    trace_one(args, "train", lambda: step_once(warmup + steps))
    kernel_table(args, "train", lambda: step_once(warmup + steps), device, total / max(steps, 1))


def bench_sample(args, preset, device, evals, warmup):
    cfg = preset["model"]
    T = int(preset.get("process", {}).get("num_timesteps", 1000))
    torch.manual_seed(args.seed)
    model = UNet2DModel(cfg).to(device).eval()
    s, c = cfg.get("sample_size", 32), cfg.get("in_channels", 3)
    g = torch.Generator().manual_seed(args.seed + 9)
    x = torch.randn(args.batch, c, s, s, generator=g).to(device)
    t = (torch.rand(args.batch, generator=g) * T).floor().to(device)
    y = torch.randint(0, cfg["num_class_embeds"], (args.batch,), generator=g).to(device) \
        if cfg.get("num_class_embeds") else None
    seconds = []
    with torch.no_grad():
        for _ in range(warmup):
            with autocast(device):
                model(x, t, y)
        sync(device)
        reset_peak_memory(device)
        start = prev = time.perf_counter()
        for _ in range(evals):
            with autocast(device):
                model(x, t, y).float()
            if device.type != "cuda":  # on CUDA a per-iteration time would only measure the launches
                now = time.perf_counter()
                seconds.append(now - prev)
                prev = now
        sync(device)
        total = time.perf_counter() - start
    if device.type == "cuda":
        seconds = [total / max(evals, 1)] * evals
    extra = peak_memory(device)
    extra["gflop_fwd_per_img"] = forward_gflops_per_image(model, model.cfg, device)
    report(args, "sample", sum(p.numel() for p in model.parameters()), device, seconds, total, extra)

    def evaluate():
        with torch.no_grad():
            model(x, t, y)
    trace_one(args, "sample", evaluate)
    kernel_table(args, "sample", evaluate, device, total / max(evals, 1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="fmnist", help="preset name (configs/NAME.json) or a JSON path")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--mode", default="both", choices=["train", "sample", "both"])
    p.add_argument("--steps", type=int, default=-1, help="timed training steps (-1: 10 on CPU, 50 on CUDA)")
    p.add_argument("--evals", type=int, default=-1, help="timed evaluations (-1: 20 on CPU, 100 on CUDA)")
    p.add_argument("--warmup", type=int, default=-1, help="untimed iterations (-1: 2 on CPU, 10 on CUDA)")
    p.add_argument("--kernels", default="plain", choices=["plain", "onednn"],
                   help="plain: diffusers' calls (Linear, baddbmm); onednn: the C++ U-Net's CPU kernels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="network under torch.autocast to this dtype (loss in float32)")
    p.add_argument("--profile", metavar="PREFIX", help="trace one more iteration to PREFIX-{train,sample}.trace")
    p.add_argument("--cudnn-benchmark", type=int, default=0, choices=[0, 1],
                   help="1: torch.backends.cudnn.benchmark (cuDNN times its algorithms per shape, keeps the fastest)")
    p.add_argument("--kernel-table", type=int, default=0, metavar="N",
                   help="CUDA: after the timing, profile 3 more iterations and print the N kernels with the most GPU time")
    p.add_argument("--step", default="recipe", choices=["recipe", "lean"],
                   help="training step: the C++ trainer's recipe (dropout, AdamW, clipping, warm-up, EMA), or lean: "
                        "Adam alone without dropout (does less than the C++ step; reported as impl pytorch-lean)")
    p.add_argument("--check-fixtures", metavar="DIR", help="compare with diffusers' outputs in DIR and exit")
    args = p.parse_args()

    global KERNELS, PRECISION
    KERNELS = args.kernels
    PRECISION = args.precision
    torch.set_num_threads(args.threads if args.threads > 0 else (os.cpu_count() or 1))
    if args.check_fixtures:
        return 0 if check_fixtures(args.check_fixtures) else 1
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device}: CUDA is not available", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    steps = args.steps if args.steps >= 0 else (50 if cuda else 10)
    evals = args.evals if args.evals >= 0 else (100 if cuda else 20)
    warmup = args.warmup if args.warmup >= 0 else (10 if cuda else 2)
    preset = load_preset(args.preset)
    if args.mode != "sample":
        bench_train(args, preset, device, steps, warmup)
    if args.mode != "train":
        bench_sample(args, preset, device, evals, warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
