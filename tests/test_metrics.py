"""Losses and metrics: the separable SSIM against torchmetrics, LPIPS through torchmetrics with
backbone weights from the torch hub cache (written here, random init), and its absence."""

from __future__ import annotations

import pytest
import torch

from splatforge.products.metrics import LPIPS_KEYS, ensure_torchvision_importable, lpips_metrics
from splatforge.train.losses import ssim

HAVE_TORCHVISION = ensure_torchvision_importable()  # before torchmetrics, which imports torchvision


def _images(seed: int, h: int = 47, w: int = 61):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(2, h, w, 3, generator=g, dtype=torch.float64)
    b = (a + 0.15 * torch.randn(2, h, w, 3, generator=g, dtype=torch.float64)).clamp(0, 1)
    return a, b


def _torchmetrics_valid_ssim(a, b):
    """torchmetrics' full SSIM map, cropped to the pixels whose 11x11 window is inside the image."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, full = structural_similarity_index_measure(
        a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2), data_range=1.0, kernel_size=11, sigma=1.5, return_full_image=True
    )
    return full[..., 5:-5, 5:-5].mean()


def test_separable_ssim_matches_torchmetrics_on_the_valid_region():
    a, b = _images(0)
    torch.testing.assert_close(ssim(a, b), _torchmetrics_valid_ssim(a, b), atol=1e-12, rtol=1e-10)
    a32, b32 = a.float(), b.float()
    torch.testing.assert_close(ssim(a32, b32), _torchmetrics_valid_ssim(a32, b32), atol=2e-6, rtol=0)
    # the gradient too (what training uses), against autograd through torchmetrics
    x = a.clone().requires_grad_(True)
    y = a.clone().requires_grad_(True)
    ssim(x, b).backward()
    _torchmetrics_valid_ssim(y, b).backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-12, rtol=1e-8)


def test_compiled_ssim_matches_the_torch_path_with_its_gradient():
    """Float32 CPU images take the numba forward/backward; it agrees with the torch path in
    float64 (value and gradient), on a batch and odd sizes."""
    from splatforge.train.losses import ssim_torch

    a, b = _images(3, 52, 77)
    x32 = a.float().requires_grad_(True)
    v32 = ssim(x32, b.float())
    v32.backward()
    x64 = a.clone().requires_grad_(True)
    v64 = ssim_torch(x64, b)
    v64.backward()
    assert v32.dtype == torch.float32 and abs(v32.item() - v64.item()) < 1e-6
    torch.testing.assert_close(x32.grad.double(), x64.grad, atol=1e-9, rtol=1e-4)


def test_ssim_rejects_bad_shapes():
    with pytest.raises(ValueError, match="one shape"):
        ssim(torch.zeros(1, 20, 20, 3), torch.zeros(1, 20, 21, 3))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 8, 20, 3), torch.zeros(1, 8, 20, 3))


def _write_backbones(torch_home, seed: int) -> None:
    from splatforge.products.metrics import import_torchvision

    tv = import_torchvision()
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(tv.models.vgg16(weights=None).state_dict(), folder / "vgg16-397923af.pth")
    torch.save(tv.models.alexnet(weights=None).state_dict(), folder / "alexnet-owt-7be5be79.pth")


def test_lpips_loads_the_backbones_from_the_torch_hub_cache(tmp_path, monkeypatch):
    """The real loading path: torchmetrics' LPIPS building torchvision's VGG-16 and AlexNet from
    files in $TORCH_HOME/hub/checkpoints (random init here: no download exists offline). Two
    different files give different values, so the file is what was loaded."""
    if not HAVE_TORCHVISION:
        pytest.skip("torchvision is not installed (pip install torchvision==0.28.0)")
    a, b = (t.float() for t in _images(1, 64, 64))
    values = []
    for seed in (0, 1):
        home = tmp_path / f"home{seed}"
        _write_backbones(home, seed)
        monkeypatch.setenv("TORCH_HOME", str(home))
        metrics, note = lpips_metrics()
        assert note is None and set(metrics) == set(LPIPS_KEYS)
        assert metrics["lpips_vgg"](a, a) == pytest.approx(0.0, abs=1e-6)
        values.append({k: metrics[k](a, b) for k in LPIPS_KEYS})
        assert all(v > 0 for v in values[-1].values())
    assert values[0]["lpips_vgg"] != values[1]["lpips_vgg"] and values[0]["lpips_alex"] != values[1]["lpips_alex"]


def test_lpips_without_weights_is_null_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    metrics, note = lpips_metrics()
    assert metrics == {}
    assert "vgg16-397923af.pth" in note or "torchvision" in note
