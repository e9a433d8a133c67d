#!/usr/bin/env python3
"""The FID feature network of pytorch-fid (Inception-v3 as converted from TensorFlow's 2015-12-05 graph), built on
torchvision's Inception3 with the four blocks that graph computes differently, for two jobs:

  /usr/bin/python3 bench/fid_inception.py fixture tests/data/fid_inception
      writes the test fixture of `eval_inception_test`: the network with pseudo-random weights that the C++ test
      draws the same way (no 95 MB weight file to commit), some uint8 images, and the features and logits this
      reference computes for them, preprocessed as pytorch-fid preprocesses image files.
  python3 bench/fid_inception.py convert pt_inception-2015-12-05-6726825d.pth models/fid-inception
      turns pytorch-fid's weight file (a pickle, which the C++ program never opens) into the folder
      `diffuse eval --classifier` takes: config.json + model.safetensors. Run it in a Python that has torch.

Needs torch and, for `fixture`, torchvision (Debian: python3-torch, python3-torchvision).

The TensorFlow graph differs from torchvision's Inception-v3 in its pooling: the 3x3 average pools of the
Mixed_5*, Mixed_6b-e and Mixed_7b blocks leave the padding out of the average, and Mixed_7c's pool branch takes
a 3x3 max instead. Its classifier has 1008 outputs. Images go in as RGB in [0, 1], are resized to 299x299 by
bilinear interpolation (half-pixel centres, no antialiasing) and scaled to [-1, 1].
"""
import json
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 1008
SIDE = 299


def build_reference():
    from torchvision.models import inception as tv

    def avg_excluding_pad(x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    class BlockA(tv.InceptionA):
        def _forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(avg_excluding_pad(x))]

    class BlockC(tv.InceptionC):
        def _forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = self.branch7x7dbl_1(x)
            for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
                d = conv(d)
            return [self.branch1x1(x), b7, d, self.branch_pool(avg_excluding_pad(x))]

    class BlockE(tv.InceptionE):
        max_pool = False

        def _forward(self, x):
            a = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            if self.max_pool:
                pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            else:
                pooled = avg_excluding_pad(x)
            return [self.branch1x1(x), b3, bd, self.branch_pool(pooled)]

    class BlockELast(BlockE):
        max_pool = True

    class Net(tv.Inception3):
        def __init__(self):
            super().__init__(num_classes=NUM_CLASSES, aux_logits=False, transform_input=False, init_weights=False)
            self.Mixed_5b = BlockA(192, pool_features=32)
            self.Mixed_5c = BlockA(256, pool_features=64)
            self.Mixed_5d = BlockA(288, pool_features=64)
            self.Mixed_6b = BlockC(768, channels_7x7=128)
            self.Mixed_6c = BlockC(768, channels_7x7=160)
            self.Mixed_6d = BlockC(768, channels_7x7=160)
            self.Mixed_6e = BlockC(768, channels_7x7=192)
            self.Mixed_7b = BlockE(1280)
            self.Mixed_7c = BlockELast(2048)

        def features_and_logits(self, x):
            for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                         "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                         "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
                x = getattr(self, name)(x)
            features = torch.flatten(self.avgpool(x), 1)
            return features, self.fc(features)

    return Net().eval()


# Pseudo-random weights both sides can draw bit for bit: element i of the tensor named N is
# u = (splitmix64(fnv1a64(N) + i) >> 40) / 2^23 - 1, a multiple of 2^-23 in [-1, 1), then scaled by role.
M64 = (1 << 64) - 1


def fnv1a64(name):
    h = 0xCBF29CE484222325
    for byte in name.encode():
        h = ((h ^ byte) * 0x100000001B3) & M64
    return h


def uniform(name, count):
    with np.errstate(over="ignore"):
        z = np.arange(count, dtype=np.uint64) + np.uint64(fnv1a64(name))
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float64) / float(1 << 23) - 1.0


def test_value(name, shape):
    """The value the C++ test gives tensor `name` (see tests/eval_inception_test.cpp)."""
    count = int(np.prod(shape)) if len(shape) else 1
    u = uniform(name, count)
    if name.endswith(".conv.weight"):
        fan_in = count // shape[0]
        v = u * np.sqrt(6.0 / fan_in)  # He-uniform: activations keep their scale through ReLU
    elif name.endswith(".bn.weight"):
        v = 1.0 + 0.1 * u
    elif name.endswith(".bn.running_var"):
        v = 1.0 + 0.25 * (u + 1.0)
    elif name == "fc.weight":
        v = u * np.sqrt(3.0 / shape[1])
    else:  # bn.bias, bn.running_mean, fc.bias
        v = 0.1 * u
    return torch.from_numpy(v.astype(np.float32).reshape(shape))


def preprocess(u8):
    """pytorch-fid's path for an image file: RGB in [0, 1], bilinear to 299x299, then 2x - 1."""
    x = torch.from_numpy(u8).float() / 255.0
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    return 2.0 * x - 1.0


DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8", torch.int64: "I64"}


def save_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        blob = t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def fid_config():
    return {"arch": "fid-inception-v3", "in_channels": 3, "image_size": SIDE, "feature_dim": 2048,
            "num_classes": NUM_CLASSES, "trained_on": "ImageNet (TensorFlow Inception-v3 2015-12-05, as pytorch-fid)"}


def smooth_images(rng, n, channels, side):
    """uint8 pictures with structure at several scales (noise upsampled from coarse grids), not white noise."""
    img = np.zeros((n, channels, side, side))
    for cells in (2, 4, 8):
        coarse = torch.from_numpy(rng.standard_normal((n, channels, cells, cells)))
        img += F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False).numpy() * (8.0 / cells)
    img += rng.standard_normal(img.shape) * 0.3
    return np.clip(128 + 40 * img, 0, 255).astype(np.uint8)


def fixture(out_dir):
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    net = build_reference()
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if not name.endswith("num_batches_tracked"):
                t.copy_(test_value(name, tuple(t.shape)))
    rng = np.random.default_rng(20261128)
    inputs = {
        "rgb32": smooth_images(rng, 3, 3, 32),    # CIFAR-sized RGB: upsampled
        "grey28": smooth_images(rng, 2, 1, 28),   # Fashion-MNIST-sized grey: repeated to RGB, upsampled
        "rgb320": smooth_images(rng, 1, 3, 320),  # larger than 299: downsampled
    }
    out = {}
    with torch.no_grad():
        for key, u8 in inputs.items():
            features, logits = net.features_and_logits(preprocess(u8))
            out[key + ".images"] = torch.from_numpy(u8)
            out[key + ".features"] = features
            out[key + ".logits"] = logits
            print(f"{key}: features mean {features.mean():.4f} rms {features.pow(2).mean().sqrt():.4f}, "
                  f"logits rms {logits.pow(2).mean().sqrt():.4f}")
    os.makedirs(out_dir, exist_ok=True)
    save_safetensors(os.path.join(out_dir, "expected.safetensors"), out)
    print(f"wrote {out_dir}/expected.safetensors")


def convert(pth, out_dir):
    state = torch.load(pth, map_location="cpu")  # a pickle: only for a file you trust (pytorch-fid's release)
    if not isinstance(state, dict):
        sys.exit(f"{pth}: expected a state_dict")
    tensors = {k: v.float() for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}
    if "Mixed_7c.branch_pool.conv.weight" not in tensors or "fc.weight" not in tensors:
        sys.exit(f"{pth}: not an Inception-v3 state_dict (no Mixed_7c / fc tensors)")
    config = fid_config()
    config["num_classes"] = int(tensors["fc.weight"].shape[0])
    os.makedirs(out_dir, exist_ok=True)
    save_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
    with open(os.path.join(out_dir, "config.json.tmp"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    os.replace(os.path.join(out_dir, "config.json.tmp"), os.path.join(out_dir, "config.json"))
    print(f"wrote {out_dir}/config.json and model.safetensors ({len(tensors)} tensors)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "fixture":
        fixture(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "convert":
        convert(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
