"""Compiled EWA projection and spherical harmonics for the ``cpu`` backend (numba, parallel).

Forward math follows gsplat 1.5.3 ``ProjectionEWA3DGSFused.cu`` / ``Utils.cuh::persp_proj`` and
the backward is written by hand. The covariance chain is kept in factored form: with
``M = R_view @ R_quat @ diag(scales)`` the camera covariance is ``M M^T`` and the 2D one is
``(J M)(J M)^T``, so the vector-Jacobian products need no 3x3 covariance at all.

All arrays are float32 C-contiguous numpy arrays; scalars are computed in float64.
Compiled functions are cached on disk (``cache=True``); the first call of a fresh install
compiles them (tens of seconds).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from splatforge.geometry.sh import SH_C0, SH_C1, SH_C2, SH_C3
from splatforge.raster.constants import ALPHA_THRESHOLD, FASTMATH, RADIUS_EXTEND

_JIT = {"cache": True, "nogil": True, "fastmath": set(FASTMATH)}
_CHUNK = 256  # Gaussians per parallel work item


@nb.njit(inline="always", **_JIT)
def _depth_ok(z, near, far):
    """Camera depth inside ``[near, far]``; NaN is not (the reference's ``(z >= near) & (z <=
    far)``). Written so that a NaN fails the test itself, not some later one by accident."""
    return near <= z <= far


@nb.njit(inline="always", **_JIT)
def _rotmat(qw, qx, qy, qz):
    """Rotation matrix entries (row major) of the normalised quaternion (w, x, y, z)."""
    return (
        1.0 - 2.0 * (qy * qy + qz * qz), 2.0 * (qx * qy - qw * qz), 2.0 * (qx * qz + qw * qy),
        2.0 * (qx * qy + qw * qz), 1.0 - 2.0 * (qx * qx + qz * qz), 2.0 * (qy * qz - qw * qx),
        2.0 * (qx * qz - qw * qy), 2.0 * (qy * qz + qw * qx), 1.0 - 2.0 * (qx * qx + qy * qy),
    )  # fmt: skip


@nb.njit(inline="always", **_JIT)
def _rotmat_n(quats, n):
    """The rotation of Gaussian ``n``'s normalised quaternion, row major."""
    qw, qx, qy, qz = quats[n, 0], quats[n, 1], quats[n, 2], quats[n, 3]
    inv = 1.0 / math.sqrt(qw * qw + qx * qx + qy * qy + qz * qz)
    return _rotmat(qw * inv, qx * inv, qy * inv, qz * inv)


@nb.njit(**_JIT)
def _factor(means, quats, scales, viewmats, c, n, M):
    """Fill ``M [3, 3] = R_view[c] @ R(quat[n]) @ diag(scale[n])``; return camera-space centre."""
    qw, qx, qy, qz = quats[n, 0], quats[n, 1], quats[n, 2], quats[n, 3]
    inv = 1.0 / math.sqrt(qw * qw + qx * qx + qy * qy + qz * qz)
    rq = _rotmat(qw * inv, qx * inv, qy * inv, qz * inv)
    s0, s1, s2 = scales[n, 0], scales[n, 1], scales[n, 2]
    for i in range(3):
        v0, v1, v2 = viewmats[c, i, 0], viewmats[c, i, 1], viewmats[c, i, 2]
        M[i, 0] = (v0 * rq[0] + v1 * rq[3] + v2 * rq[6]) * s0
        M[i, 1] = (v0 * rq[1] + v1 * rq[4] + v2 * rq[7]) * s1
        M[i, 2] = (v0 * rq[2] + v1 * rq[5] + v2 * rq[8]) * s2
    mx, my, mz = means[n, 0], means[n, 1], means[n, 2]
    x = viewmats[c, 0, 0] * mx + viewmats[c, 0, 1] * my + viewmats[c, 0, 2] * mz + viewmats[c, 0, 3]
    y = viewmats[c, 1, 0] * mx + viewmats[c, 1, 1] * my + viewmats[c, 1, 2] * mz + viewmats[c, 1, 3]
    z = viewmats[c, 2, 0] * mx + viewmats[c, 2, 1] * my + viewmats[c, 2, 2] * mz + viewmats[c, 2, 3]
    return x, y, z


@nb.njit(inline="always", **_JIT)
def _fov_limits(Ks, c, width, height):
    fx, fy, cx, cy = Ks[c, 0, 0], Ks[c, 1, 1], Ks[c, 0, 2], Ks[c, 1, 2]
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    return (
        fx,
        fy,
        cx,
        cy,
        (width - cx) / fx + 0.3 * tan_fovx,
        cx / fx + 0.3 * tan_fovx,
        (height - cy) / fy + 0.3 * tan_fovy,
        cy / fy + 0.3 * tan_fovy,
    )


@nb.njit(inline="always", **_JIT)
def _jm(M, j00, j02, j11, j12):
    """Rows of ``T2 = J @ M`` for J = [[j00, 0, j02], [0, j11, j12]]."""
    return (
        j00 * M[0, 0] + j02 * M[2, 0], j00 * M[0, 1] + j02 * M[2, 1], j00 * M[0, 2] + j02 * M[2, 2],
        j11 * M[1, 0] + j12 * M[2, 0], j11 * M[1, 1] + j12 * M[2, 1], j11 * M[1, 2] + j12 * M[2, 2],
    )  # fmt: skip


@nb.njit(parallel=True, **_JIT)
def project_fwd(
    means,
    quats,
    scales,
    opacities,
    viewmats,
    Ks,
    width,
    height,
    eps2d,
    near,
    far,
    antialiased,
    means2d,
    conics,
    depths,
    radii,
    comps,
):
    """Outputs (zero-initialised by the caller) ``means2d [C,N,2]``, ``conics [C,N,3]``,
    ``depths [C,N]``, ``radii [C,N,2]`` int32 and ``comps [C,N]``."""
    C, N = viewmats.shape[0], means.shape[0]
    n_chunks = (N + _CHUNK - 1) // _CHUNK
    for job in nb.prange(C * n_chunks):
        c = job // n_chunks
        M = np.empty((3, 3))
        fx, fy, cx, cy, lxp, lxn, lyp, lyn = _fov_limits(Ks, c, width, height)
        for n in range((job % n_chunks) * _CHUNK, min(N, (job % n_chunks + 1) * _CHUNK)):
            x, y, z = _factor(means, quats, scales, viewmats, c, n, M)
            if not _depth_ok(z, near, far):
                continue
            rz = 1.0 / z
            tx = z * min(lxp, max(-lxn, x * rz))
            ty = z * min(lyp, max(-lyn, y * rz))
            t = _jm(M, fx * rz, -fx * tx * rz * rz, fy * rz, -fy * ty * rz * rz)
            a = t[0] * t[0] + t[1] * t[1] + t[2] * t[2]
            b = t[0] * t[3] + t[1] * t[4] + t[2] * t[5]
            cc = t[3] * t[3] + t[4] * t[4] + t[5] * t[5]
            det_orig = a * cc - b * b
            a += eps2d
            cc += eps2d
            det = a * cc - b * b
            if det <= 0.0:
                continue
            comp = math.sqrt(det_orig / det) if det_orig > 0.0 else 0.0
            opac = opacities[n] * comp if antialiased else opacities[n]
            if opac < ALPHA_THRESHOLD:
                continue
            extend = min(RADIUS_EXTEND, math.sqrt(2.0 * math.log(opac / ALPHA_THRESHOLD)))
            rx = math.ceil(extend * math.sqrt(a))
            ry = math.ceil(extend * math.sqrt(cc))
            if rx <= 0.0 and ry <= 0.0:
                continue
            u = fx * x * rz + cx
            v = fy * y * rz + cy
            if u + rx <= 0.0 or u - rx >= width or v + ry <= 0.0 or v - ry >= height:
                continue
            radii[c, n, 0] = np.int32(rx)
            radii[c, n, 1] = np.int32(ry)
            means2d[c, n, 0] = u
            means2d[c, n, 1] = v
            depths[c, n] = z
            inv = 1.0 / det
            conics[c, n, 0] = cc * inv
            conics[c, n, 1] = -b * inv
            conics[c, n, 2] = a * inv
            comps[c, n] = comp


@nb.njit(parallel=True, **_JIT)
def project_bwd(
    means,
    quats,
    scales,
    viewmats,
    Ks,
    width,
    height,
    eps2d,
    antialiased,
    radii,
    conics,
    comps,
    v_means2d,
    v_conics,
    v_depths,
    v_comps,
    v_means,
    v_quats,
    v_scales,
    want_view,
    v_view,
):
    """Accumulate (into zero-initialised outputs) the gradients w.r.t. ``means [N,3]``,
    ``quats [N,4]`` (raw, before normalisation) and ``scales [N,3]`` (activated). With
    ``want_view``, also w.r.t. the cameras: ``v_view [n_chunks, C, 12]`` gets, per work item
    (chunk of Gaussians, so no two threads write one row) and camera, the gradient of the
    world-to-camera rotation (9, row major) and translation (3): ``mean_c = R mean + t`` gives
    ``v_R += v_mean_c mean^T``, ``v_t += v_mean_c``, and ``M = R (R_quat S)`` gives
    ``v_R += v_M (R_quat S)^T``; the caller sums the chunks."""
    C, N = viewmats.shape[0], means.shape[0]
    n_chunks = (N + _CHUNK - 1) // _CHUNK
    for job in nb.prange(n_chunks):
        M = np.empty((3, 3))
        vM = np.empty((3, 3))
        for n in range(job * _CHUNK, min(N, (job + 1) * _CHUNK)):
            gmx = gmy = gmz = 0.0
            gR = np.zeros(9)  # d loss / d (R_quat * diag(s)), row major
            for c in range(C):
                if radii[c, n, 0] <= 0 or radii[c, n, 1] <= 0:
                    continue
                fx, fy, _cx, _cy, lxp, lxn, lyp, lyn = _fov_limits(Ks, c, width, height)
                x, y, z = _factor(means, quats, scales, viewmats, c, n, M)
                rz = 1.0 / z
                rz2 = rz * rz
                tx = z * min(lxp, max(-lxn, x * rz))
                ty = z * min(lyp, max(-lyn, y * rz))
                j00, j02, j11, j12 = fx * rz, -fx * tx * rz2, fy * rz, -fy * ty * rz2
                t = _jm(M, j00, j02, j11, j12)
                # conic = inverse(cov2d + eps2d I): v_cov = -P V P, V symmetric from v_conics.
                pa, pb, pc = conics[c, n, 0], conics[c, n, 1], conics[c, n, 2]
                va, vb, vc = v_conics[c, n, 0], 0.5 * v_conics[c, n, 1], v_conics[c, n, 2]
                # (P V) then (P V) P
                q00, q01 = pa * va + pb * vb, pa * vb + pb * vc
                q10, q11 = pb * va + pc * vb, pb * vb + pc * vc
                g00 = -(q00 * pa + q01 * pb)
                g01 = -(q00 * pb + q01 * pc)
                g11 = -(q10 * pb + q11 * pc)
                if antialiased and comps[c, n] > 0.0:
                    # comp = sqrt(det(cov) / det(cov + eps I)); gsplat's add_blur_vjp.
                    comp = comps[c, n]
                    det_p = pa * pc - pb * pb
                    k = v_comps[c, n] * 0.5 / (comp + 1e-6)
                    om = 1.0 - comp * comp
                    g00 += k * (om * pa - eps2d * det_p)
                    g01 += k * om * pb
                    g11 += k * (om * pc - eps2d * det_p)
                # cov2d = T T^T with T = J M  ->  v_T = 2 G T
                vt0 = 2.0 * (g00 * t[0] + g01 * t[3])
                vt1 = 2.0 * (g00 * t[1] + g01 * t[4])
                vt2 = 2.0 * (g00 * t[2] + g01 * t[5])
                vt3 = 2.0 * (g01 * t[0] + g11 * t[3])
                vt4 = 2.0 * (g01 * t[1] + g11 * t[4])
                vt5 = 2.0 * (g01 * t[2] + g11 * t[5])
                # v_J = v_T M^T (only the non-zero entries of J matter)
                vj00 = vt0 * M[0, 0] + vt1 * M[0, 1] + vt2 * M[0, 2]
                vj02 = vt0 * M[2, 0] + vt1 * M[2, 1] + vt2 * M[2, 2]
                vj11 = vt3 * M[1, 0] + vt4 * M[1, 1] + vt5 * M[1, 2]
                vj12 = vt3 * M[2, 0] + vt4 * M[2, 1] + vt5 * M[2, 2]
                # v_M = J^T v_T
                vM[0, 0], vM[0, 1], vM[0, 2] = j00 * vt0, j00 * vt1, j00 * vt2
                vM[1, 0], vM[1, 1], vM[1, 2] = j11 * vt3, j11 * vt4, j11 * vt5
                vM[2, 0], vM[2, 1], vM[2, 2] = j02 * vt0 + j12 * vt3, j02 * vt1 + j12 * vt4, j02 * vt2 + j12 * vt5
                # camera-space centre: pixel position, depth and the Jacobian
                gu, gv = v_means2d[c, n, 0], v_means2d[c, n, 1]
                gx = fx * rz * gu
                gy = fy * rz * gv
                gz = -(fx * x * gu + fy * y * gv) * rz2 + v_depths[c, n]
                gz += -fx * rz2 * vj00 - fy * rz2 * vj11
                if -lxn <= x * rz <= lxp:
                    gx += -fx * rz2 * vj02
                    gz += 2.0 * fx * tx * rz2 * rz * vj02
                else:
                    gz += fx * tx * rz2 * rz * vj02
                if -lyn <= y * rz <= lyp:
                    gy += -fy * rz2 * vj12
                    gz += 2.0 * fy * ty * rz2 * rz * vj12
                else:
                    gz += fy * ty * rz2 * rz * vj12
                if want_view:
                    row = v_view[job, c]
                    mx, my, mz = means[n, 0], means[n, 1], means[n, 2]
                    gc = (gx, gy, gz)
                    for i in range(3):
                        row[3 * i] += gc[i] * mx
                        row[3 * i + 1] += gc[i] * my
                        row[3 * i + 2] += gc[i] * mz
                        row[9 + i] += gc[i]
                    bq = _rotmat_n(quats, n)
                    for i in range(3):
                        for k in range(3):
                            row[3 * i + k] += (
                                vM[i, 0] * bq[3 * k] * scales[n, 0]
                                + vM[i, 1] * bq[3 * k + 1] * scales[n, 1]
                                + vM[i, 2] * bq[3 * k + 2] * scales[n, 2]
                            )
                # back to world: mean_c = R_view mean + t,  M = R_view (R_quat S)
                gmx += viewmats[c, 0, 0] * gx + viewmats[c, 1, 0] * gy + viewmats[c, 2, 0] * gz
                gmy += viewmats[c, 0, 1] * gx + viewmats[c, 1, 1] * gy + viewmats[c, 2, 1] * gz
                gmz += viewmats[c, 0, 2] * gx + viewmats[c, 1, 2] * gy + viewmats[c, 2, 2] * gz
                for i in range(3):
                    for j in range(3):
                        gR[3 * i + j] += (
                            viewmats[c, 0, i] * vM[0, j] + viewmats[c, 1, i] * vM[1, j] + viewmats[c, 2, i] * vM[2, j]
                        )
            v_means[n, 0] = gmx
            v_means[n, 1] = gmy
            v_means[n, 2] = gmz
            # (R_quat S): v_R[i, j] = gR[i, j] * s_j ; v_s_j = sum_i gR[i, j] * R[i, j]
            qw, qx, qy, qz = quats[n, 0], quats[n, 1], quats[n, 2], quats[n, 3]
            qn = math.sqrt(qw * qw + qx * qx + qy * qy + qz * qz)
            w, xq, yq, zq = qw / qn, qx / qn, qy / qn, qz / qn
            r = _rotmat(w, xq, yq, zq)
            for j in range(3):
                v_scales[n, j] = gR[j] * r[j] + gR[3 + j] * r[3 + j] + gR[6 + j] * r[6 + j]
            s = (scales[n, 0], scales[n, 1], scales[n, 2])
            g = np.empty(9)
            for i in range(3):
                for j in range(3):
                    g[3 * i + j] = gR[3 * i + j] * s[j]
            # d R / d (w, x, y, z) of the normalised quaternion
            vw = 2.0 * (-zq * g[1] + yq * g[2] + zq * g[3] - xq * g[5] - yq * g[6] + xq * g[7])
            vx = 2.0 * (
                yq * g[1] + zq * g[2] + yq * g[3] - 2.0 * xq * g[4] - w * g[5] + zq * g[6] + w * g[7] - 2.0 * xq * g[8]
            )
            vy = 2.0 * (
                -2.0 * yq * g[0] + xq * g[1] + w * g[2] + xq * g[3] + zq * g[5] - w * g[6] + zq * g[7] - 2.0 * yq * g[8]
            )
            vz = 2.0 * (
                -2.0 * zq * g[0] - w * g[1] + xq * g[2] + w * g[3] - 2.0 * zq * g[4] + yq * g[5] + xq * g[6] + yq * g[7]
            )
            dot = w * vw + xq * vx + yq * vy + zq * vz
            v_quats[n, 0] = (vw - w * dot) / qn
            v_quats[n, 1] = (vx - xq * dot) / qn
            v_quats[n, 2] = (vy - yq * dot) / qn
            v_quats[n, 3] = (vz - zq * dot) / qn


@nb.njit(inline="always", **_JIT)
def _sh_basis(degree, x, y, z, b):
    """Write the (degree + 1)^2 basis values at unit direction (x, y, z) into ``b``."""
    b[0] = SH_C0
    if degree >= 1:
        b[1] = -SH_C1 * y
        b[2] = SH_C1 * z
        b[3] = -SH_C1 * x
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        b[4] = SH_C2[0] * x * y
        b[5] = SH_C2[1] * y * z
        b[6] = SH_C2[2] * (2.0 * zz - xx - yy)
        b[7] = SH_C2[3] * x * z
        b[8] = SH_C2[4] * (xx - yy)
        if degree >= 3:
            b[9] = SH_C3[0] * y * (3.0 * xx - yy)
            b[10] = SH_C3[1] * x * y * z
            b[11] = SH_C3[2] * y * (4.0 * zz - xx - yy)
            b[12] = SH_C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy)
            b[13] = SH_C3[4] * x * (4.0 * zz - xx - yy)
            b[14] = SH_C3[5] * z * (xx - yy)
            b[15] = SH_C3[6] * x * (xx - 3.0 * yy)


@nb.njit(inline="always", **_JIT)
def _sh_dir_grad(degree, x, y, z, vb):
    """``sum_k vb[k] d basis_k / d(x, y, z)`` at the unit direction (x, y, z) (``vb [16]``: the
    loss' gradient per basis function; entry 0 unused, the constant band)."""
    ux, uy, uz = -SH_C1 * vb[3], -SH_C1 * vb[1], SH_C1 * vb[2]
    if degree >= 2:
        c = SH_C2
        ux += c[0] * y * vb[4] - 2.0 * c[2] * x * vb[6] + c[3] * z * vb[7] + 2.0 * c[4] * x * vb[8]
        uy += c[0] * x * vb[4] + c[1] * z * vb[5] - 2.0 * c[2] * y * vb[6] - 2.0 * c[4] * y * vb[8]
        uz += c[1] * y * vb[5] + 4.0 * c[2] * z * vb[6] + c[3] * x * vb[7]
        if degree >= 3:
            d = SH_C3
            xx, yy, zz = x * x, y * y, z * z
            ux += (
                d[0] * 6.0 * x * y * vb[9]
                + d[1] * y * z * vb[10]
                - d[2] * 2.0 * x * y * vb[11]
                - d[3] * 6.0 * x * z * vb[12]
                + d[4] * (4.0 * zz - 3.0 * xx - yy) * vb[13]
                + d[5] * 2.0 * x * z * vb[14]
                + d[6] * (3.0 * xx - 3.0 * yy) * vb[15]
            )
            uy += (
                d[0] * (3.0 * xx - 3.0 * yy) * vb[9]
                + d[1] * x * z * vb[10]
                + d[2] * (4.0 * zz - xx - 3.0 * yy) * vb[11]
                - d[3] * 6.0 * y * z * vb[12]
                - d[4] * 2.0 * x * y * vb[13]
                - d[5] * 2.0 * y * z * vb[14]
                - d[6] * 6.0 * x * y * vb[15]
            )
            uz += (
                d[1] * x * y * vb[10]
                + d[2] * 8.0 * y * z * vb[11]
                + d[3] * (6.0 * zz - 3.0 * xx - 3.0 * yy) * vb[12]
                + d[4] * 8.0 * x * z * vb[13]
                + d[5] * (xx - yy) * vb[14]
            )
    return ux, uy, uz


@nb.njit(parallel=True, **_JIT)
def sh_fwd(means, sh0, shN, campos, degree, radii, colors):
    """``colors [C, N, 3]`` (zero-initialised) from the coefficients ``sh0 [N, 1, 3]`` and
    ``shN [N, K - 1, 3]`` (the first ``(degree + 1)^2 - 1`` used) seen from ``campos [C, 3]``."""
    C, N = campos.shape[0], means.shape[0]
    nb_ = (degree + 1) * (degree + 1)
    n_chunks = (N + _CHUNK - 1) // _CHUNK
    for job in nb.prange(C * n_chunks):
        c = job // n_chunks
        b = np.empty(16)
        for n in range((job % n_chunks) * _CHUNK, min(N, (job % n_chunks + 1) * _CHUNK)):
            if radii[c, n, 0] <= 0 or radii[c, n, 1] <= 0:
                continue
            dx, dy, dz = means[n, 0] - campos[c, 0], means[n, 1] - campos[c, 1], means[n, 2] - campos[c, 2]
            inv = 1.0 / max(math.sqrt(dx * dx + dy * dy + dz * dz), 1e-12)
            _sh_basis(degree, dx * inv, dy * inv, dz * inv, b)
            for ch in range(3):
                acc = b[0] * sh0[n, 0, ch]
                for k in range(1, nb_):
                    acc += b[k] * shN[n, k - 1, ch]
                colors[c, n, ch] = acc


@nb.njit(parallel=True, **_JIT)
def sh_bwd(means, sh0, shN, campos, degree, radii, v_colors, v_sh0, v_shN, v_means, v_campos):
    """Gradients w.r.t. ``sh0 [N, 1, 3]``, ``shN [N, K - 1, 3]`` and, through the view
    direction, ``means [N, 3]`` (all zero-initialised, accumulated over cameras) and the camera
    centres: ``v_campos [n_chunks, C, 3]`` per work item (the caller sums them; the direction is
    ``mean - campos``, so each is minus the means' share)."""
    C, N = campos.shape[0], means.shape[0]
    nb_ = (degree + 1) * (degree + 1)
    n_chunks = (N + _CHUNK - 1) // _CHUNK
    for job in nb.prange(n_chunks):
        b = np.empty(16)
        vb = np.zeros(16)
        for n in range(job * _CHUNK, min(N, (job + 1) * _CHUNK)):
            for c in range(C):
                if radii[c, n, 0] <= 0 or radii[c, n, 1] <= 0:
                    continue
                dx, dy, dz = means[n, 0] - campos[c, 0], means[n, 1] - campos[c, 1], means[n, 2] - campos[c, 2]
                norm = max(math.sqrt(dx * dx + dy * dy + dz * dz), 1e-12)
                x, y, z = dx / norm, dy / norm, dz / norm
                _sh_basis(degree, x, y, z, b)
                g0, g1, g2 = v_colors[c, n, 0], v_colors[c, n, 1], v_colors[c, n, 2]
                v_sh0[n, 0, 0] += b[0] * g0
                v_sh0[n, 0, 1] += b[0] * g1
                v_sh0[n, 0, 2] += b[0] * g2
                for k in range(1, nb_):
                    v_shN[n, k - 1, 0] += b[k] * g0
                    v_shN[n, k - 1, 1] += b[k] * g1
                    v_shN[n, k - 1, 2] += b[k] * g2
                    vb[k] = shN[n, k - 1, 0] * g0 + shN[n, k - 1, 1] * g1 + shN[n, k - 1, 2] * g2
                if degree == 0:
                    continue
                ux, uy, uz = _sh_dir_grad(degree, x, y, z, vb)
                dot = x * ux + y * uy + z * uz  # through the normalisation
                ax, ay, az = (ux - x * dot) / norm, (uy - y * dot) / norm, (uz - z * dot) / norm
                v_means[n, 0] += ax
                v_means[n, 1] += ay
                v_means[n, 2] += az
                v_campos[job, c, 0] -= ax
                v_campos[job, c, 1] -= ay
                v_campos[job, c, 2] -= az
