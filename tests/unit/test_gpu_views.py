"""GPUViews: the CPU path's views made with tensor ops on a device. Run on the CPU here
(device="cpu": the same code, libjpeg instead of nvJPEG) and, marked gpu, on CUDA."""

import dataclasses
import logging
import os

import imagefactory
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from raysl.data import view_plans as VP
from raysl.data import views as V
from raysl.data.decode import decode_pixels
from raysl.data.gpu_views import GPUViews, _decode, blur_kernel_size
from raysl.data.masks import BlockMasks
from raysl.data.view_plans import decode_plans
from raysl.errors import UserError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DATA = os.path.dirname(skimage.data.__file__)


def _jpeg(img: Image.Image) -> bytes:
    return imagefactory.encode(img, "JPEG", quality=90)


# real photographs as JPEGs: a cat 500x333 (landscape), a rocket 427x640 (portrait, as shipped)
CAT = _jpeg(Image.fromarray(skimage.data.chelsea()).resize((500, 333)))
with open(os.path.join(DATA, "rocket.jpg"), "rb") as _f:
    ROCKET = _f.read()
COFFEE = _jpeg(Image.fromarray(skimage.data.coffee()))  # 600x400, strong colours


def pixels(data: bytes, device="cpu") -> torch.Tensor:
    """The (3, H, W) uint8 decode GPUViews makes of these bytes on `device` (nvJPEG on
    CUDA, whose IDCT and chroma upsampling differ a little from libjpeg's), on the CPU."""
    (img,) = _decode([data], torch.device(device))
    assert img is not None
    return img.cpu()


def grey_levels(view: torch.Tensor) -> np.ndarray:
    """Normalised float view(s) back to 0..255 floats, on the CPU."""
    mean = torch.tensor(V.IMAGENET_MEAN, device=view.device).view(-1, 1, 1)
    std = torch.tensor(V.IMAGENET_STD, device=view.device).view(-1, 1, 1)
    return ((view * std + mean) * 255).cpu().numpy()


def mad(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["dino", "simclr"])
def test_views_have_the_specs_shapes_order_and_the_cpu_paths_plans(name, device):
    spec = VP.view_spec(name)
    out = GPUViews(spec, device)([CAT, ROCKET, COFFEE], [3, 4, 5])
    assert out.kept == [0, 1, 2]
    assert len(out.views) == spec.n_views
    for view, crop in zip(out.views, spec.per_view()):
        assert view.dtype == torch.float32 and view.device.type == device
        assert tuple(view.shape) == (3, 3, crop.size, crop.size)
    # every view is the CPU reference applied with the row's own plans, in view order:
    # within a few grey levels on average (PIL truncates to uint8 after each of up to four
    # jitter ops, about -0.5 each, where the values here stay float; PIL's box-blur and
    # 8-bit HSV approximations); a view compared with its neighbour's plan is far off
    for r, (data, seed) in enumerate(zip([CAT, ROCKET, COFFEE], [3, 4, 5])):
        src = pixels(data, device)
        plans = VP.plan_views(spec, seed, src.shape[2], src.shape[1])
        ref = [V.apply_view(None, p, c, src) for p, c in zip(plans, spec.per_view())]
        got = [grey_levels(v[r]) for v in out.views]
        for j in range(spec.n_views):
            assert mad(got[j], ref[j]) < 3.0, (r, j, mad(got[j], ref[j]))
        assert mad(got[0], ref[1]) > 10


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_views_and_rows_do_not_depend_on_their_neighbours(device):
    g = GPUViews(VP.view_spec("dino"), device)
    a = g([CAT, ROCKET], [7, 8])
    b = g([CAT, ROCKET], [7, 8])
    c = g([CAT, ROCKET], [9, 10])
    alone = g([ROCKET], [8])
    chunked = GPUViews(VP.view_spec("dino"), device, chunk=1)([CAT, ROCKET], [7, 8])
    for j in range(len(a.views)):
        assert torch.equal(a.views[j], b.views[j]) if device == "cpu" else torch.allclose(a.views[j], b.views[j])
        assert torch.allclose(a.views[j][1:], alone.views[j], atol=1e-4)
        assert torch.allclose(a.views[j], chunked.views[j], atol=1e-4)
        assert (a.views[j][0] - c.views[j][0]).abs().mean() > 0.05
    g([CAT, ROCKET], np.array([-1, 2**62], dtype=np.int64))  # any int64 seed


@pytest.mark.parametrize("device", DEVICES)
def test_a_corrupt_row_and_a_png_row_are_dropped_counted_and_the_rest_come_out(device, caplog):
    bad = imagefactory.bad_files()
    png = imagefactory.good_files()["good.png"]
    g = GPUViews(VP.view_spec("simclr"), device)
    images = [CAT, bad["truncated.jpg"][0], ROCKET, png, b"", bad["notes.jpg"][0]]
    with caplog.at_level(logging.WARNING, logger="raysl.data.gpu_views"):
        out = g(images, range(6))
    assert out.kept == [0, 2]
    assert g.dropped == 4
    assert "row 1" in caplog.text and "row 3" in caplog.text and "row 5" in caplog.text
    clean = g([CAT, ROCKET], [0, 2])
    for j in range(2):
        assert out.views[j].shape == (2, 3, 224, 224)
        assert torch.allclose(out.views[j], clean.views[j], atol=1e-4)
    nothing = g([png, b"junk"], [0, 1])
    assert nothing.kept == [] and g.dropped == 6
    assert [tuple(v.shape) for v in nothing.views] == [(0, 3, 224, 224)] * 2


@pytest.mark.parametrize("device", DEVICES)
def test_crops_without_colour_ops_match_make_views(device):
    """Crop, resize (bilinear and bicubic) and flip only: the CPU path's make_views on the
    same bytes, which decodes these at full size (short side < 2 x min_decode_side)."""
    plain = dict(jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    spec = VP.ViewSpec(
        "plain",
        (VP.Crop(224, (0.08, 1.0), **plain), VP.Crop(96, (0.05, 0.4), count=3, interpolation="bicubic", **plain)),
    )
    seeds = [11, 12, 13]
    out = GPUViews(spec, device)([CAT, ROCKET, COFFEE], seeds)
    flips = 0
    for r, (data, seed) in enumerate(zip([CAT, ROCKET, COFFEE], seeds)):
        ref = V.make_views(data, seed, spec)
        src = pixels(data)
        flips += sum(p.flip for p in VP.plan_views(spec, seed, src.shape[2], src.shape[1]))
        for j, view in enumerate(out.views):
            # float resize vs the uint8 resize rounding to whole grey levels, and
            # torchvision's libjpeg decode vs simplejpeg's: well under one grey level;
            # nvJPEG's decode differs a little more from libjpeg's
            assert mad(grey_levels(view[r]), ref[j]) < (1.0 if device == "cpu" else 2.0), (r, j)
    assert 0 < flips < 12  # both flipped and unflipped views were compared


def one_op(device, plan_kw: dict, size: int = 224, data: bytes = COFFEE):
    """(GPU view, CPU reference, CPU view without the op) in grey levels, for one hand-made plan."""
    crop = VP.Crop(size, (0.08, 1.0), interpolation="bicubic")
    spec = VP.ViewSpec("one", (crop,))
    src = pixels(data)
    box = (60, 40, 60 + 330, 40 + 300)
    plan = VP.ViewPlan(box, False, (), False, None, False)
    plan = dataclasses.replace(plan, **plan_kw)
    (got,) = GPUViews(spec, device).apply([src.to(device)], [[plan]])
    ref = V.apply_view(None, plan, crop, src)
    base = V.apply_view(
        None, dataclasses.replace(plan, jitter=(), gray=False, blur_sigma=None, solarize=False), crop, src
    )
    return grey_levels(got[0]), ref, base


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "plan_kw, size",
    [
        ({"jitter": (("brightness", 1.35),)}, 224),
        ({"jitter": (("brightness", 0.6),)}, 224),
        ({"jitter": (("contrast", 1.6),)}, 224),
        ({"jitter": (("contrast", 0.4),)}, 224),
        ({"jitter": (("saturation", 1.8),)}, 224),
        ({"jitter": (("saturation", 0.2),)}, 224),
        ({"jitter": (("hue", 0.08),)}, 224),
        ({"jitter": (("hue", -0.1),)}, 96),
        ({"gray": True}, 224),
        ({"blur_sigma": 2.0}, 224),
        ({"blur_sigma": 2.0}, 96),
        ({"blur_sigma": 1.0}, 96),
        ({"solarize": True}, 224),
        ({"flip": True, "jitter": (("contrast", 1.4), ("hue", 0.05), ("brightness", 0.8), ("saturation", 1.5))}, 96),
    ],
)
def test_each_op_alone_matches_the_pil_reference(device, plan_kw, size):
    got, ref, base = one_op(device, plan_kw, size)
    # Not exact, and why: the CPU path truncates to uint8 after every op (a bias of
    # about -0.5 grey levels per jitter op), here the values stay float; its contrast
    # uses the mean grey rounded to an integer; its hue works on OpenCV's 8-bit HSV (H in
    # 1/256 of the circle, here PIL's 1/255 steps). Each keeps the mean difference under a
    # grey level (hue under 1.5); four jitter ops in a row, under two.
    ops = [op for op, _ in plan_kw.get("jitter", ())]
    tol = 2.0 if len(ops) > 1 else (1.5 if ops == ["hue"] else 1.0)
    assert mad(got, ref) < tol, mad(got, ref)
    # the op is not a no-op on this crop, so skipping it (or getting it badly wrong) fails
    assert mad(ref, base) > 4 * tol, mad(ref, base)


@pytest.mark.parametrize("device", DEVICES)
def test_each_row_gets_its_own_factors_and_op_order(device):
    """Two rows in one batch, the same ops in opposite orders and different factors; each
    matches its own PIL reference (clipping makes the order matter)."""
    crop = VP.Crop(96, (0.08, 1.0))
    spec = VP.ViewSpec("two", (crop,))
    src = pixels(COFFEE)
    box = (100, 80, 400, 380)
    first = VP.ViewPlan(box, False, (("brightness", 1.8), ("contrast", 0.3)), False, None, False)
    second = VP.ViewPlan(box, False, (("contrast", 0.3), ("brightness", 1.8)), False, None, False)
    third = VP.ViewPlan(box, False, (("saturation", 0.3), ("brightness", 0.7)), True, 1.5, True)
    (got,) = GPUViews(spec, device).apply([src.to(device)] * 3, [[first], [second], [third]])
    refs = [V.apply_view(None, p, crop, src) for p in (first, second, third)]
    assert mad(refs[0], refs[1]) > 5  # the order matters on this crop
    for r in range(3):
        assert mad(grey_levels(got[r]), refs[r]) < 1.5, r


@pytest.mark.parametrize("device", DEVICES)
def test_exif_orientation_is_applied_as_the_cpu_decode_does(device):
    """nvJPEG ignores decode_jpeg's apply_exif_orientation: GPUViews turns images upright
    itself, on every device; each of the 8 orientations matches PIL's exif_transpose."""
    img = Image.fromarray(skimage.data.coffee()).resize((120, 80))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = imagefactory.encode(img, "JPEG", quality=95, exif=exif.tobytes())
        (got,) = _decode([data], torch.device(device))
        want = decode_pixels(data)  # the CPU path: PIL's exif_transpose
        assert got is not None and tuple(got.shape) == (3, *want.shape[:2]), orientation
        assert mad(got.permute(1, 2, 0).cpu().numpy(), want) < (1.0 if device == "cpu" else 2.0), orientation


def test_blur_kernel_covers_the_recipe_and_three_sigma():
    assert blur_kernel_size(VP.Crop(224, (0.4, 1.0))) == 23
    assert blur_kernel_size(VP.Crop(96, (0.05, 0.4))) == 13  # 3 sigma of 2.0, wider than the recipe's 9


def test_what_gpu_views_do_not_make_is_refused_with_the_way_out():
    masked = dataclasses.replace(VP.view_spec("simclr"), masks=BlockMasks(grid=(14, 14), views=2))
    with pytest.raises(UserError, match="masks.*ViewTransform"):
        GPUViews(masked, "cpu")
    with pytest.raises(UserError, match="eval view.*ViewTransform"):
        GPUViews(VP.view_spec("eval"), "cpu")
    with pytest.raises(UserError, match="chunk=0"):
        GPUViews(VP.view_spec("dino"), "cpu", chunk=0)
    with pytest.raises(UserError, match="2 images but 1 aug_seeds"):
        GPUViews(VP.view_spec("dino"), "cpu")([CAT, ROCKET], [1])


def _task_then_worker(spec, images: list[bytes], seeds: list[int], device="cpu"):
    """data.augment_on=worker: the data task's PixelTransform, then the worker's from_pixels."""
    from raysl.data.decode import PixelTransform

    batch = {"image": np.array(images, dtype=object), "aug_seed": np.array(seeds), "key": np.arange(len(images))}
    rows = PixelTransform(spec)(batch)
    return rows, GPUViews(spec, device).from_pixels(rows["pixels"], rows["plans"])


@pytest.mark.parametrize("device", DEVICES)
def test_views_made_on_the_worker_follow_the_task_views_of_the_same_rows(device):
    """The task decodes as make_views does (a JPEG at its DCT scale, a PNG), the worker draws
    the same plans from each row's seed: every view within a few grey levels of the CPU
    path's, and far from the views another seed gives."""
    spec = VP.view_spec("dino", global_size=64, local_size=32)
    png = imagefactory.encode(Image.fromarray(skimage.data.astronaut()).resize((120, 90)), "PNG")
    images, seeds = [CAT, ROCKET, png, b"junk"], [5, 6, 7, 8]
    rows, views = _task_then_worker(spec, images, seeds, device)
    assert list(rows["key"]) == [0, 1, 2]  # the undecodable row is dropped in the task
    assert rows["pixels"].dtype == object  # three sizes
    # the task drew each kept row's plans from its own seed, for its decoded size
    assert decode_plans(rows["plans"]) == [
        VP.plan_views(spec, s, p.shape[1], p.shape[0]) for s, p in zip(seeds[:3], rows["pixels"])
    ]
    assert [tuple(v.shape) for v in views] == [(3, 3, c.size, c.size) for c in spec.per_view()]
    for r, (data, seed) in enumerate(zip(images[:3], seeds)):
        ref, other = V.make_views(data, seed, spec), V.make_views(data, seed + 100, spec)
        near = np.mean([mad(grey_levels(v[r]), ref[j]) for j, v in enumerate(views)])
        far = np.mean([mad(grey_levels(v[r]), other[j]) for j, v in enumerate(views)])
        assert near < 3.0 and far > 5 * near, (r, near, far)


def test_rows_of_one_size_travel_as_one_array_and_give_the_same_views():
    spec = VP.view_spec("simclr", size=32)
    small = [imagefactory.encode(Image.fromarray(skimage.data.astronaut()).resize((48, 40)), "PNG")] * 3
    rows, views = _task_then_worker(spec, small, [1, 2, 3])
    assert rows["pixels"].shape == (3, 40, 48, 3) and rows["pixels"].dtype == np.uint8
    apart = np.empty(3, dtype=object)
    for i in range(3):
        apart[i] = rows["pixels"][i]
    for a, b in zip(views, GPUViews(spec, "cpu").from_pixels(apart, rows["plans"])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
