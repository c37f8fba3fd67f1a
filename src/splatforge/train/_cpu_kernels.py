"""Compiled training kernels for CPU tensors (numba): the SSIM loss (forward and its hand-written
backward, fused) and MCMC's position noise.

**SSIM.**
The same quantity as :func:`splatforge.train.losses.ssim` (11x11 Gaussian window of sigma 1.5,
the mean over the valid region), as gsplat's ``fused_ssim`` computes it on GPUs. Each image plane
is filtered by two 1-D passes whose inner loops run along rows (contiguous memory, vectorised),
parallel over rows. The forward pass keeps the three maps the gradient needs,

- ``dS/dmu_x = 2 (mu_y (A2 - A1)) / (B1 B2) - 2 mu_x S / B1 + 2 mu_x S / B2``,
- ``dS/d(w * x^2) = -S / B2``, ``dS/d(w * xy) = 2 A1 / (B1 B2)``,

with ``A1 = 2 mu_x mu_y + C1``, ``A2 = 2 sigma_xy + C2``, ``B1 = mu_x^2 + mu_y^2 + C1``,
``B2 = sigma_x^2 + sigma_y^2 + C2``, ``S = A1 A2 / (B1 B2)``; the backward pass filters them with
the transposed (zero-padded, full) window and combines ``d/dx = w^T*g1 + 2 x (w^T*g2) + y (w^T*g3)``.
Only the gradient with respect to the render is computed (the target has none).

**MCMC noise** (:func:`add_covariance_noise`): ``means += Sigma (z * gate * scale)`` per Gaussian,
``Sigma = R diag(s^2) R^T`` from the normalised quaternion and activated scales, ``gate =
sigmoid(100 ((1 - opacity) - 0.995))`` (gsplat's ``inject_noise_to_position``); ``z`` comes from
torch's generator, so the draws are those of the torch path.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from splatforge.raster.constants import FASTMATH

_JIT = {"cache": True, "nogil": True, "fastmath": set(FASTMATH)}
C1, C2 = 0.01**2, 0.03**2


@nb.njit(parallel=True, **_JIT)
def ssim_fwd(x, y, g, gm1, gs11, gs12):
    """``x``, ``y`` ``[P, H, W]`` float32 planes; ``g [k]`` the 1-D window. Writes the gradient maps
    ``gm1, gs11, gs12 [P, H - k + 1, W - k + 1]`` (per unit of S) and returns the sum of S over the
    valid region (float64)."""
    P, H, W = x.shape
    k = g.shape[0]
    Hv, Wv = H - k + 1, W - k + 1
    h = np.empty((5, P, H, Wv), np.float32)
    for job in nb.prange(P * H):
        p, i = job // H, job % H
        r0, r1, r2, r3, r4 = h[0, p, i], h[1, p, i], h[2, p, i], h[3, p, i], h[4, p, i]
        r0[:] = 0.0
        r1[:] = 0.0
        r2[:] = 0.0
        r3[:] = 0.0
        r4[:] = 0.0
        xr, yr = x[p, i], y[p, i]
        for t in range(k):
            wt = g[t]
            for j in range(Wv):
                a, b = xr[j + t], yr[j + t]
                r0[j] += wt * a
                r1[j] += wt * b
                r2[j] += wt * a * a
                r3[j] += wt * b * b
                r4[j] += wt * a * b
    sums = np.zeros(P * Hv)
    for job in nb.prange(P * Hv):
        p, i = job // Hv, job % Hv
        m1 = np.zeros(Wv, np.float32)
        m2 = np.zeros(Wv, np.float32)
        s11 = np.zeros(Wv, np.float32)
        s22 = np.zeros(Wv, np.float32)
        s12 = np.zeros(Wv, np.float32)
        for t in range(k):
            wt = g[t]
            for j in range(Wv):
                m1[j] += wt * h[0, p, i + t, j]
                m2[j] += wt * h[1, p, i + t, j]
                s11[j] += wt * h[2, p, i + t, j]
                s22[j] += wt * h[3, p, i + t, j]
                s12[j] += wt * h[4, p, i + t, j]
        acc = 0.0
        for j in range(Wv):
            mx, my = m1[j], m2[j]
            a1 = 2.0 * mx * my + C1
            a2 = 2.0 * (s12[j] - mx * my) + C2
            b1 = mx * mx + my * my + C1
            b2 = (s11[j] - mx * mx) + (s22[j] - my * my) + C2
            inv = 1.0 / (b1 * b2)
            s = a1 * a2 * inv
            acc += s
            gm1[p, i, j] = 2.0 * my * (a2 - a1) * inv - 2.0 * mx * s / b1 + 2.0 * mx * s / b2
            gs11[p, i, j] = -s / b2
            gs12[p, i, j] = 2.0 * a1 * inv
        sums[job] = acc
    return sums.sum()


@nb.njit(parallel=True, **_JIT)
def ssim_bwd(x, y, g, gm1, gs11, gs12, scale, out):
    """``out [P, H, W]`` = ``scale`` times the gradient of the summed S with respect to ``x``."""
    P, H, W = x.shape
    k = g.shape[0]
    Hv, Wv = H - k + 1, W - k + 1
    v = np.empty((3, P, H, Wv), np.float32)
    for job in nb.prange(P * H):  # transposed vertical pass: row r gathers the rows r - t
        p, r = job // H, job % H
        q0, q1, q2 = v[0, p, r], v[1, p, r], v[2, p, r]
        q0[:] = 0.0
        q1[:] = 0.0
        q2[:] = 0.0
        for t in range(k):
            i = r - t
            if i < 0 or i >= Hv:
                continue
            wt = g[t]
            for j in range(Wv):
                q0[j] += wt * gm1[p, i, j]
                q1[j] += wt * gs11[p, i, j]
                q2[j] += wt * gs12[p, i, j]
    for job in nb.prange(P * H):  # transposed horizontal pass, then the chain rule per pixel
        p, r = job // H, job % H
        f0 = np.zeros(W, np.float32)
        f1 = np.zeros(W, np.float32)
        f2 = np.zeros(W, np.float32)
        q0, q1, q2 = v[0, p, r], v[1, p, r], v[2, p, r]
        for t in range(k):
            wt = g[t]
            for j in range(Wv):
                f0[j + t] += wt * q0[j]
                f1[j + t] += wt * q1[j]
                f2[j + t] += wt * q2[j]
        for c in range(W):
            out[p, r, c] = scale * (f0[c] + 2.0 * x[p, r, c] * f1[c] + y[p, r, c] * f2[c])


@nb.njit(parallel=True, **_JIT)
def add_covariance_noise(means, quats, log_scales, logits, z, scale):
    """In place: ``means [N, 3] += Sigma_n (z_n * gate_n * scale)`` (see the module docstring);
    ``quats [N, 4]`` wxyz, ``log_scales [N, 3]``, ``logits [N]`` opacities, ``z [N, 3]`` normal."""
    N = means.shape[0]
    for n in nb.prange(N):
        w, x, y, zq = quats[n, 0], quats[n, 1], quats[n, 2], quats[n, 3]
        inv = 1.0 / max(math.sqrt(w * w + x * x + y * y + zq * zq), 1e-12)
        w, x, y, zq = w * inv, x * inv, y * inv, zq * inv
        r00, r01, r02 = 1 - 2 * (y * y + zq * zq), 2 * (x * y - w * zq), 2 * (x * zq + w * y)
        r10, r11, r12 = 2 * (x * y + w * zq), 1 - 2 * (x * x + zq * zq), 2 * (y * zq - w * x)
        r20, r21, r22 = 2 * (x * zq - w * y), 2 * (y * zq + w * x), 1 - 2 * (x * x + y * y)
        opacity = 1.0 / (1.0 + math.exp(-logits[n]))
        gate = scale / (1.0 + math.exp(-100.0 * ((1.0 - opacity) - 0.995)))
        a0, a1, a2 = z[n, 0] * gate, z[n, 1] * gate, z[n, 2] * gate
        # Sigma a = R (s^2 * (R^T a))
        b0 = (r00 * a0 + r10 * a1 + r20 * a2) * math.exp(2.0 * log_scales[n, 0])
        b1 = (r01 * a0 + r11 * a1 + r21 * a2) * math.exp(2.0 * log_scales[n, 1])
        b2 = (r02 * a0 + r12 * a1 + r22 * a2) * math.exp(2.0 * log_scales[n, 2])
        means[n, 0] += r00 * b0 + r01 * b1 + r02 * b2
        means[n, 1] += r10 * b0 + r11 * b1 + r12 * b2
        means[n, 2] += r20 * b0 + r21 * b1 + r22 * b2
