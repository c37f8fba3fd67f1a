"""Constants of the rasterizer, those of gsplat 1.5.3 (the version the ``gsplat`` backend pins).

Sources: ``gsplat/cuda/include/Common.h`` (ALPHA_THRESHOLD), ``RasterizeToPixels3DGSFwd.cu``
(alpha clamp 0.999 and the T <= 1e-4 early stop; Inria's kernel clamps at 0.99),
``ProjectionEWA3DGSFused.cu`` (3.33-sigma opacity-aware radius) and ``rendering.py`` (16 px tiles).
"""

#: Tile edge in pixels.
TILE_SIZE = 16
#: The near plane when none is given: camera z (world units) below which Gaussians are culled,
#: gsplat's ``rasterization`` default. Runs pass their own, the same 0.01 in ``world_unit``
#: lengths (:data:`splatforge.data.scene.NEAR_PLANE`).
DEFAULT_NEAR_PLANE = 0.01
#: Largest alpha one Gaussian may have at a pixel.
ALPHA_MAX = 0.999
#: Contributions with alpha below this (1/255) are skipped.
ALPHA_THRESHOLD = 1.0 / 255.0
#: A pixel stops compositing before its transmittance would fall to this value or below.
TRANSMITTANCE_MIN = 1e-4
#: Radius in standard deviations of the 2D Gaussian, before the opacity-aware bound
#: ``sqrt(2 ln(opacity / ALPHA_THRESHOLD))`` shrinks it.
RADIUS_EXTEND = 3.33

#: numba's fast-math flags for the CPU kernels (projection, compositing and the training kernels
#: alike): LLVM's fast flags except ``nnan`` and ``ninf``, so comparisons with NaN and infinity
#: keep their IEEE meaning (a NaN depth fails ``near <= z <= far`` and is culled, as the reference
#: culls it), and except ``reassoc``: with it, the code numba runs right after compiling a kernel
#: and the code it loads from its on-disk cache round differently (each is deterministic: two
#: fresh compiles agree, and two cache loads; measured: renders ~1e-6 and gradients ~1e-4
#: relative apart), so a run's numbers would depend on whether its process found the cache.
FASTMATH = frozenset({"nsz", "arcp", "contract", "afn"})
#: The flags of the compositing backward, ``FASTMATH`` plus ``reassoc``: its per-Gaussian sums over
#: a tile's pixels vectorise only when LLVM may reorder them (without: the backward 2.5x and a
#: training step 1.45x slower, 176 against 70 ms and 63 against 44 ms on this 2-core machine).
#: Such a kernel is always run as loaded from the cache (:func:`splatforge.raster.cpu.from_cache`),
#: so every process runs the same code. (Changing these flags does not invalidate numba's cache of
#: the kernels' files: clear their ``__pycache__`` before measuring a change.)
FASTMATH_REDUCTIONS = FASTMATH | {"reassoc"}
