#!/usr/bin/python3
"""Writes the .npz fixtures of this folder with NumPy itself (run with a python3 that has numpy).

features.npz        np.savez: two float32 feature sets a [40, 8] and b [30, 8], and fd, their Frechet distance
                    as pytorch-fid computes it from the statistics below (float64 scalar). NumPy forces ZIP64
                    extra fields into every local header.
pytorch_fid_a.npz   np.savez_compressed(mu=..., sigma=...) of set a, exactly as pytorch-fid's --save-stats
                    writes statistics: mu float32 (np.mean of float32 activations), sigma float64 (np.cov).
zip64.npz           the same arrays as pytorch_fid_a.npz, deflated, with ZIP64 sizes and offsets in the central
                    directory and a ZIP64 end record whose 32-bit twin is saturated (as writers do past 4 GiB).
descriptor.npz      the same arrays, stored, written to an unseekable stream: sizes and CRCs follow the data in
                    data descriptors, and the local headers hold zeros.
"""
import io
import os
import struct
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(20261128)
a = rng.standard_normal((40, 8)).astype(np.float32) * np.linspace(0.5, 2.0, 8, dtype=np.float32)
b = (rng.standard_normal((30, 8)) * 1.3 + 0.4).astype(np.float32)


def stats(act):
    return np.mean(act, axis=0), np.cov(act, rowvar=False)


mu_a, sigma_a = stats(a)
mu_b, sigma_b = stats(b)
# pytorch-fid: ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2); the trace of the square root through the
# eigenvalues of S1 S2 (scipy's sqrtm gives the same trace; scipy is not needed here).
diff = mu_a.astype(np.float64) - mu_b.astype(np.float64)
tr_sqrt = np.sum(np.sqrt(np.linalg.eigvals(sigma_a @ sigma_b).real.clip(min=0)))
fd = float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * tr_sqrt)

np.savez(os.path.join(HERE, "features.npz"), a=a, b=b, fd=np.float64(fd))
np.savez_compressed(os.path.join(HERE, "pytorch_fid_a.npz"), mu=mu_a, sigma=sigma_a)


def npy_bytes(arr):
    f = io.BytesIO()
    np.save(f, arr)
    return f.getvalue()


members = [("mu.npy", npy_bytes(mu_a)), ("sigma.npy", npy_bytes(sigma_a))]

# ZIP64 everywhere: zipfile consults the module's ZIP64_LIMIT when it writes each record.
limit = zipfile.ZIP64_LIMIT
zipfile.ZIP64_LIMIT = -1
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as z:
    for name, data in members:
        z.writestr(name, data)
zipfile.ZIP64_LIMIT = limit
data = bytearray(buf.getvalue())
end = data.rindex(b"PK\x05\x06")
assert data[end - 20:end - 16] == b"PK\x06\x07", "no ZIP64 locator"
struct.pack_into("<HHII", data, end + 8, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
with open(os.path.join(HERE, "zip64.npz"), "wb") as f:
    f.write(bytes(data))


class Unseekable:
    def __init__(self):
        self.parts = []

    def write(self, b):
        self.parts.append(bytes(b))
        return len(b)

    def flush(self):
        pass


out = Unseekable()
with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
    for name, data in members:
        with z.open(name, "w") as m:
            m.write(data)
with open(os.path.join(HERE, "descriptor.npz"), "wb") as f:
    f.write(b"".join(out.parts))

# Each file must read back through NumPy as written.
for name in ("pytorch_fid_a.npz", "zip64.npz", "descriptor.npz"):
    with np.load(os.path.join(HERE, name)) as z:
        assert np.array_equal(z["mu"], mu_a) and np.array_equal(z["sigma"], sigma_a), name
print("fd", fd)
