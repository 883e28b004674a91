"""Views: real images in, uint8 crops out; deterministic per aug_seed; no Ray needed."""

import dataclasses
import io
import logging
import math
import os

import imagefactory
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from raysl.data import view_plans as VP
from raysl.data import views as V
from raysl.data.decode import decode_rgb
from raysl.errors import UserError
from raysl.methods.base import Method

DATA = os.path.dirname(skimage.data.__file__)


def real(name: str) -> bytes:
    with open(os.path.join(DATA, name), "rb") as f:
        return f.read()


def batch_of(images: list[bytes], seeds=None) -> dict:
    n = len(images)
    column = np.empty(n, dtype=object)
    column[:] = images
    return {
        "image": column,
        "aug_seed": np.arange(n, dtype=np.int64) if seeds is None else np.asarray(seeds, dtype=np.int64),
        "key": np.array([f"img/{i}" for i in range(n)]),
        "label": np.arange(n, dtype=np.int64) * 10,
    }


def _registered_methods():
    from raysl.methods.base import discover

    return sorted(discover())


# chelsea: RGB PNG; rocket: portrait JPEG; camera: greyscale PNG; horse: RGBA PNG
PHOTOS = [real("chelsea.png"), real("rocket.jpg"), real("camera.png"), real("horse.png")]


@pytest.mark.parametrize("name", list(VP.PRESETS))
def test_every_preset_gives_uint8_views_of_the_right_shapes(name):
    spec = VP.view_spec(name)
    out = V.ViewTransform(spec)(batch_of(PHOTOS))
    assert sorted(out) == sorted([f"view_{i}" for i in range(spec.n_views)] + ["key", "label"])
    for i, crop in enumerate(spec.per_view()):
        v = out[f"view_{i}"]
        assert v.dtype == np.uint8 and v.shape == (len(PHOTOS), 3, crop.size, crop.size)
        assert v.std() > 5  # real content, not a flat fill
    assert list(out["key"]) == [f"img/{i}" for i in range(len(PHOTOS))]
    assert list(out["label"]) == [0, 10, 20, 30]


def test_preset_shapes_match_the_methods():
    dino = VP.PRESETS["dino"]
    assert [c.size for c in dino.per_view()] == [224, 224] + [96] * 8
    assert [c.blur_p for c in dino.crops] == [1.0, 0.1, 0.5]
    assert [c.solarize_p for c in dino.crops] == [0.0, 0.2, 0.0]
    swav = VP.PRESETS["swav"]
    assert [(c.size, c.scale, c.count) for c in swav.crops] == [(224, (0.14, 1.0), 2), (96, (0.05, 0.14), 6)]
    for name in ("byol", "mocov3"):
        assert [(c.blur_p, c.solarize_p) for c in VP.PRESETS[name].crops] == [(1.0, 0.0), (0.1, 0.2)]
    for name, lo in (("mae", 0.2), ("mae_medical", 0.5)):
        (crop,) = VP.PRESETS[name].crops
        assert crop.scale == (lo, 1.0) and crop.flip_p == 0.5
        assert crop.jitter_p == crop.gray_p == crop.blur_p == crop.solarize_p == 0
    assert VP.PRESETS["simclr"].n_views == VP.PRESETS["mocov2"].n_views == 2


def test_same_seed_same_views_different_seed_different_views():
    spec = VP.view_spec("dino")
    t = V.ViewTransform(spec)
    a = t(batch_of(PHOTOS[:2], seeds=[7, 8]))
    b = t(batch_of(PHOTOS[:2], seeds=[7, 8]))
    c = t(batch_of(PHOTOS[:2], seeds=[9, 10]))
    # a row's views do not depend on its neighbours in the batch
    alone = t(batch_of(PHOTOS[1:2], seeds=[8]))
    for i in range(spec.n_views):
        k = f"view_{i}"
        assert np.array_equal(a[k], b[k])
        assert np.array_equal(a[k][1:], alone[k])
        assert not np.array_equal(a[k][0], c[k][0])
    # negative and huge seeds are fine too
    t(batch_of(PHOTOS[:2], seeds=[-1, 2**62]))


def test_a_corrupt_row_is_dropped_and_the_others_survive(caplog):
    bad = imagefactory.bad_files()
    images = [PHOTOS[0], bad["truncated.jpg"][0], PHOTOS[1], bad["notes.jpg"][0], bad["empty.jpg"][0]]
    with caplog.at_level(logging.WARNING, logger="raysl.data.views"):
        out = V.ViewTransform(VP.view_spec("simclr"))(batch_of(images))
    assert list(out["key"]) == ["img/0", "img/2"]
    assert list(out["label"]) == [0, 20]
    assert out["view_0"].shape == (2, 3, 224, 224)
    assert "img/1" in caplog.text and "img/3" in caplog.text


def test_an_all_corrupt_batch_gives_empty_columns():
    out = V.ViewTransform(VP.view_spec("dino"))(batch_of([b"", b"junk"]))
    assert out["view_0"].shape == (0, 3, 224, 224) and out["view_9"].shape == (0, 3, 96, 96)
    assert len(out["key"]) == 0


def test_min_decode_side_covers_the_smallest_crop():
    dino = VP.view_spec("dino")
    # local crops: 96 px from 5% of the area at aspect 3/4 need the most source pixels
    assert dino.min_decode_side() == math.ceil(96 / math.sqrt(0.05 * 0.75))
    assert VP.view_spec("eval").min_decode_side() == 256  # 224 / 0.875
    assert VP.view_spec("dino", local_crops=0).min_decode_side() == math.ceil(224 / math.sqrt(0.4 * 0.75))
    # the smallest boxes RandomResizedCrop can draw on a square source of that side
    # still hold at least `size` pixels along each side (up to rounding)
    side = dino.min_decode_side()
    rng = np.random.default_rng(0)
    local = dino.crops[2]
    smallest = min(
        min(r - x, b - t)
        for x, t, r, b in (VP.crop_box(rng, side, side, local.scale, local.ratio) for _ in range(3000))
    )
    assert smallest >= local.size - 1


@pytest.mark.parametrize("name", ["dino", "mae_medical", "eval"])
def test_a_big_jpeg_decodes_smaller_but_never_below_what_the_crops_need(name):
    data = real("retina.jpg")  # 1411 x 1411 real JPEG
    need = VP.view_spec(name).min_decode_side()
    img = decode_rgb(data, min_side=need)
    assert need <= min(img.size) < 1411
    out = V.ViewTransform(VP.view_spec(name))(batch_of([data]))
    assert out["view_0"].shape[0] == 1


def test_overrides():
    s = VP.view_spec("dino", global_crops=2, local_crops=4, local_size=64, local_scale=(0.1, 0.3))
    assert [c.size for c in s.per_view()] == [224, 224, 64, 64, 64, 64]
    assert s.crops[-1].scale == (0.1, 0.3) and s.crops[-1].count == 4
    one = VP.view_spec("dino", global_crops=1, local_crops=0)
    assert one.n_views == 1 and one.crops[0].blur_p == 1.0
    four = VP.view_spec("dino", global_crops=4)
    assert [c.solarize_p for c in four.per_view()[:4]] == [0.0, 0.2, 0.0, 0.2]
    multi = VP.view_spec("simclr", local_crops=6)  # multi-crop SimCLR
    assert [c.size for c in multi.per_view()] == [224, 224] + [96] * 6
    assert multi.crops[-1].jitter == VP.PRESETS["simclr"].crops[0].jitter
    mae = VP.view_spec("mae", size=112, scale=(0.3, 1.0))
    assert mae.crops[0].size == 112 and mae.crops[0].scale == (0.3, 1.0)
    assert VP.view_spec("simclr", global_size=160).crops[0].size == 160
    out = V.ViewTransform(s)(batch_of(PHOTOS[:1]))
    assert out["view_5"].shape == (1, 3, 64, 64)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"local_scale": (0.0, 0.4)}, "local_scale"),
        ({"global_scale": (0.2, 1.5)}, "global_scale"),
        ({"scale": (0.9, 0.3)}, "scale"),
        ({"global_size": 4}, "global_size"),
        ({"local_size": 7}, "local_size"),
        ({"size": 2}, "size"),
        ({"local_crops": -1}, "local_crops"),
        ({"global_crops": -2}, "global_crops"),
        ({"global_crops": 0, "local_crops": 0}, "no views"),
        ({"size": 128, "global_size": 96}, "disagree"),
    ],
)
def test_bad_overrides_name_the_field(kwargs, field):
    with pytest.raises(UserError, match=field):
        VP.view_spec("dino", **kwargs)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(UserError) as exc:
        VP.view_spec("simsiam")
    for name in VP.PRESETS:
        assert name in str(exc.value)


def test_normalize_statistics_and_device():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, size=(64, 3, 32, 32), dtype=np.uint8))
    y = V.normalize(x)
    assert y.dtype == torch.float32 and y.shape == x.shape and y.device == x.device
    mean, std = torch.tensor(V.IMAGENET_MEAN), torch.tensor(V.IMAGENET_STD)
    exact = (x.double() / 255 - mean.double().view(-1, 1, 1)) / std.double().view(-1, 1, 1)
    assert (y.double() - exact).abs().max() < 1e-5  # every pixel, not only the channel statistics
    expected = (x.float().mean(dim=(0, 2, 3)) / 255 - mean) / std
    assert torch.allclose(y.mean(dim=(0, 2, 3)), expected, atol=1e-4)
    expected_std = x.float().std(dim=(0, 2, 3)) / 255 / std
    assert torch.allclose(y.std(dim=(0, 2, 3)), expected_std, rtol=1e-3)
    # an image that is exactly the ImageNet mean maps to ~0
    flat = (mean * 255).round().to(torch.uint8).view(1, 3, 1, 1).expand(2, 3, 8, 8)
    assert V.normalize(flat).abs().max() < 0.01


def test_normalize_runs_on_one_cpu_thread_and_gives_the_caller_its_threads_back():
    """A training worker normalises beside its step: the passes run on one thread (a second
    one only spins, taking a core from the augment tasks), and the model's threads are
    back after it, also when it fails."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Threads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(torch.get_num_threads())
            return func(*args, **(kwargs or {}))

    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with Threads() as ops:
            V.normalize(x)
        assert len(ops.seen) >= 3 and set(ops.seen) == {1}  # convert, scale, shift
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            V.normalize(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))  # 4 channels: no broadcast
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _rate(plans, view, attr):
    return np.mean(
        [bool(getattr(p[view], attr)) if attr != "blur_sigma" else p[view].blur_sigma is not None for p in plans]
    )


def test_dino_per_view_probabilities():
    """Per DINO: global view 0 always blurred, never solarized; global view 1 blurred 10%,
    solarized 20%; local views blurred 50%. Flip 50%, jitter 80%, grey 20% everywhere."""
    spec = VP.view_spec("dino")
    n = 3000
    plans = [VP.plan_views(spec, seed, 451, 300) for seed in range(n)]
    tol = lambda p: 4 * math.sqrt(p * (1 - p) / n) + 1e-9  # noqa: E731
    expect = {
        (0, "blur_sigma"): 1.0,
        (0, "solarize"): 0.0,
        (1, "blur_sigma"): 0.1,
        (1, "solarize"): 0.2,
        (5, "blur_sigma"): 0.5,
        (5, "solarize"): 0.0,
        (0, "flip"): 0.5,
        (1, "jitter"): 0.8,
        (9, "gray"): 0.2,
    }
    for (view, attr), p in expect.items():
        assert abs(_rate(plans, view, attr) - p) <= tol(p), (view, attr)
    sigmas = [p[0].blur_sigma for p in plans]
    assert min(sigmas) >= 0.1 and max(sigmas) <= 2.0
    # local boxes cover 5-40% of the image, global ones 40-100% (outside the fallback)
    for p in plans[:200]:
        x, t, r, b = p[0].box
        assert 0.4 - 0.01 <= (r - x) * (b - t) / (451 * 300) <= 1.0
        x, t, r, b = p[2].box
        assert 0.05 - 0.01 <= (r - x) * (b - t) / (451 * 300) <= 0.4 + 0.01


def test_plans_are_what_gets_applied():
    img = decode_rgb(real("chelsea.png"))
    crop = VP.PRESETS["dino"].crops[0]
    box = (50, 20, 350, 280)
    plain = VP.ViewPlan(box, False, (), False, None, False)
    base = V.apply_view(img, plain, crop)
    sharpness = lambda a: np.abs(np.diff(a.astype(np.int32), axis=2)).mean()  # noqa: E731
    blurred = V.apply_view(img, VP.ViewPlan(box, False, (), False, 2.0, False), crop)
    assert sharpness(blurred) < 0.7 * sharpness(base)
    flipped = V.apply_view(img, VP.ViewPlan(box, True, (), False, None, False), crop)
    assert np.array_equal(flipped, base[:, :, ::-1])
    solar = V.apply_view(img, VP.ViewPlan(box, False, (), False, None, True), crop)
    assert np.array_equal(solar, np.where(base >= 128, 255 - base, base))
    grey = V.apply_view(img, VP.ViewPlan(box, False, (), True, None, False), crop)
    assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[1], grey[2])


def test_jitter_matches_torchvision_pil_ops():
    """Each colour op against torchvision's PIL op (the papers' recipes) on the same crop:
    OpenCV rounds where PIL truncates, so a pixel may differ by a grey level; for hue, PIL
    truncates H to 0..255 where OpenCV rounds, and one step of H (1/256 of the circle)
    moves a saturated pixel by up to 3 levels. A wrong factor, op or channel order is tens
    of levels off."""
    import torchvision.transforms.functional as F

    img = decode_rgb(real("coffee.png")).resize((96, 64))
    crop = VP.Crop(96, (1.0, 1.0))
    box = (0, 0, 96, 64)
    base = img.resize((96, 96), Image.Resampling.BILINEAR, box=box)
    for op, fn, factors in (
        ("brightness", F.adjust_brightness, (0.6, 1.3)),
        ("contrast", F.adjust_contrast, (0.6, 1.3)),
        ("saturation", F.adjust_saturation, (0.0, 0.6, 1.3)),
        ("hue", F.adjust_hue, (-0.1, -0.03, 0.05, 0.1)),
    ):
        for factor in factors:
            mine = V.apply_view(img, VP.ViewPlan(box, False, ((op, factor),), False, None, False), crop)
            theirs = np.asarray(fn(base, factor)).transpose(2, 0, 1)
            diff = np.abs(mine.astype(np.int32) - theirs)
            mean, worst = (1.0, 4) if op == "hue" else (0.6, 2)
            assert diff.mean() < mean and np.percentile(diff, 99) <= worst, (op, factor, diff.mean())
            assert np.abs(mine.astype(np.int32) - np.asarray(base).transpose(2, 0, 1)).mean() > 1.5, (op, factor)


def test_crop_box_fallback_is_torchvisions_centre_crop():
    rng = np.random.default_rng(0)
    # a 1000x10 strip cannot hold 90-100% of its area at aspect <= 4/3: centre crop at 4/3
    assert VP.crop_box(rng, 1000, 10, (0.9, 1.0), (3 / 4, 4 / 3)) == (493, 0, 506, 10)
    for _ in range(200):
        x, t, r, b = VP.crop_box(rng, 300, 200, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= x < r <= 300 and 0 <= t < b <= 200


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_crops_are_torchvisions_resized_crop(interpolation):
    """The crop + resize is what torchvision's uint8 `resized_crop` gives, byte for byte
    (called through torch alone, so data workers need not import torchvision)."""
    from torchvision.transforms.v2 import functional as TF

    rng = np.random.default_rng(0)
    for name in ("rocket.jpg", "chelsea.png"):
        pixels = V.pixels_of(decode_rgb(real(name)))
        for size, scale in ((224, (0.08, 1.0)), (96, (0.05, 0.4)), (32, (0.9, 1.0))):
            crop = VP.Crop(size, scale, interpolation=interpolation)
            for _ in range(5):
                box = VP.crop_box(rng, pixels.shape[2], pixels.shape[1], crop.scale, crop.ratio)
                left, top, right, bottom = box
                ref = TF.resized_crop(
                    pixels, top, left, bottom - top, right - left, [size, size], TF.InterpolationMode(interpolation)
                )
                np.testing.assert_array_equal(V._crop(None, pixels, box, crop), ref.permute(1, 2, 0).numpy())


@pytest.mark.parametrize("name", sorted(VP.PRESETS))
def test_plans_travel_as_one_array_and_come_back_the_same(name):
    """encode_plans / decode_plans (a data task's "plans" column): every decision of every
    view, for rows of different sizes and seeds: boxes, flips, jitter ops in their drawn
    order with their factors, grey, blur sigma or none, solarize; the eval view's
    fractional boxes too."""
    from raysl.data.view_plans import decode_plans, encode_plans

    spec = VP.view_spec(name)
    rows = [VP.plan_views(spec, seed, w, h) for seed, (w, h) in enumerate([(500, 375), (224, 224), (97, 301)] * 20)]
    array = encode_plans(rows, spec.n_views)
    assert array.shape == (60, spec.n_views, 17) and array.dtype == np.float64
    assert decode_plans(array) == rows
    assert encode_plans([], spec.n_views).shape == (0, spec.n_views, 17)  # a block whose rows all failed
    kinds = {(bool(p.jitter), p.blur_sigma is None, p.flip) for r in rows for p in r}
    assert len(kinds) > 2 or name in ("eval", "ijepa", "mae", "mae_medical")  # the draws vary


def test_eval_view_is_resize_then_centre_crop():
    import torchvision.transforms.v2 as T

    img = decode_rgb(real("coffee.png"))
    mine = V.ViewTransform(VP.view_spec("eval"))(batch_of([real("coffee.png")]))["view_0"][0]
    ref = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])(img)
    diff = np.abs(mine.astype(int) - np.asarray(ref).transpose(2, 0, 1).astype(int))
    assert diff.mean() < 3


def test_views_from_imagefactory_formats():
    files = imagefactory.good_files()
    out = V.ViewTransform(VP.view_spec("byol"))(batch_of(list(files.values())))
    assert out["view_1"].shape == (len(files), 3, 224, 224)


# ---------------------------------------------------------------- recipe keys (data.*) -> views


def _spec(method: str, *overrides: str):
    from raysl.config import load_config
    from raysl.methods.base import method_class
    from raysl.train.run_views import spec_for

    cfg = load_config("quickstart", [f"method.name={method}", "data.views=", "data.image_size=0", *overrides])
    return spec_for(cfg, method_class(method))


@pytest.mark.parametrize("method", _registered_methods())
def test_recipe_defaults_keep_the_presets(method):
    from raysl.methods.base import method_class

    spec = _spec(method, f"model.backbone={_backbone_for(method)}")
    assert dataclasses.replace(spec, masks=None) == VP.PRESETS[method_class(method).default_views]
    assert (spec.masks is not None) == (method_class(method).mask_spec.__func__ is not Method.mask_spec.__func__)


def _backbone_for(method):
    """A ViT built for the presets' 224 px for a ViT-only method (MAE, iBOT, DINOv2, I-JEPA; DINOv2's
    98 px local crops need 14 px patches), else a ResNet."""
    from raysl.config import load_config
    from raysl.errors import UserError
    from raysl.methods.base import method_class

    try:
        method_class(method).check_config(load_config("quickstart", [f"method.name={method}"]))
    except UserError as exc:
        assert "Vision Transformer" in str(exc), exc
        return "vit_small_patch14_dinov2" if method == "dinov2" else "vit_tiny_patch16_224"
    return "test_resnet"


def test_recipe_crop_keys_change_the_views():
    s = _spec(
        "dino",
        "data.global_crops=3",
        "data.global_scale=[0.5, 1.0]",
        "data.local_crops=4",
        "data.local_size=64",
        "data.local_scale=[0.1, 0.3]",
        "data.image_size=160",
    )
    assert [c.size for c in s.per_view()] == [160] * 3 + [64] * 4
    assert [c.scale for c in s.per_view()] == [(0.5, 1.0)] * 3 + [(0.1, 0.3)] * 4
    out = V.ViewTransform(s)(batch_of(PHOTOS[:2]))
    assert out["view_2"].shape == (2, 3, 160, 160) and out["view_6"].shape == (2, 3, 64, 64) and "view_7" not in out
    swav = _spec("swav", "data.local_crops=2", "data.local_size=48")
    assert [c.size for c in swav.per_view()] == [224, 224, 48, 48]
    assert [c.scale for c in swav.per_view()] == [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 2
    mae = _spec("mae", "data.views=mae_medical", "data.global_scale=[0.6, 1.0]")  # the MAE crop-scale range
    assert mae.n_views == 1 and mae.crops[0].scale == (0.6, 1.0)
    assert _spec("simclr", "data.global_scale=[0.3, 0.9]").crops[0].scale == (0.3, 0.9)
    assert _spec("dino", "data.global_crops=1").n_views == 9  # one global crop + the 8 locals


@pytest.mark.parametrize(
    "method, override, key",
    [
        ("simclr", "data.global_crops=3", "data.global_crops"),  # two-view methods need exactly 2
        ("byol", "data.global_crops=1", "data.global_crops"),
        ("simclr", "data.views=mae", "data.views"),
        ("simclr", "data.local_crops=4", "data.local_crops"),  # a two-view method never uses local crops
        ("mocov2", "data.local_size=64", "data.local_size"),
        ("mae", "data.global_crops=2", "data.global_crops"),
        ("mae", "data.local_scale=[0.1, 0.2]", "data.local_scale"),
        ("swav", "data.global_crops=1", "data.global_crops"),  # codes come from the first two crops
        ("dino", "data.global_crops=0", "data.global_crops"),
        ("dino", "data.local_size=224", "data.local_size"),  # DINO tells global from local by size
        ("swav", "data.global_scale=[0.5]", "data.global_scale"),
        ("swav", "data.global_scale=[0.9, 0.4]", "data.global_scale"),
        ("swav", "data.local_scale=[0.0, 0.4]", "data.local_scale"),
        ("swav", "data.local_scale=[0.1, 1.5]", "data.local_scale"),
        ("dino", "data.local_scale=0.3", "data.local_scale"),
        ("dino", "data.local_size=4", "data.local_size"),
        ("dino", "data.image_size=6", "data.image_size"),
        ("dino", "data.global_crops=-2", "data.global_crops"),
        ("swav", "data.views=simsiam", "data.views"),
    ],
)
def test_bad_recipe_crop_keys_name_the_key(method, override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        _spec(method, override)


def test_dino_needs_a_second_crop():
    with pytest.raises(UserError, match=r"data\.local_crops"):
        _spec("dino", "data.global_crops=1", "data.local_crops=0")
    with pytest.raises(UserError, match=r"data\.local_size.*no local crops"):
        _spec("swav", "data.local_crops=0", "data.local_size=64")


# ---------------------------------------------------------------- decoding: pixels, not just sizes


def _solid_halves(w: int = 64, h: int = 32) -> Image.Image:
    """Landscape image: top half red, bottom half blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2] = (255, 0, 0)
    a[h // 2 :] = (0, 0, 255)
    return Image.fromarray(a)


def _is(pixels: np.ndarray, rgb, tol: int = 40) -> bool:
    return bool(np.abs(pixels.reshape(-1, 3).mean(0) - np.asarray(rgb)).max() < tol)


@pytest.mark.parametrize("orientation, red_side", [(6, "right"), (8, "left"), (3, "bottom"), (1, "top")])
def test_exif_rotated_jpeg_decodes_upright(orientation, red_side):
    from raysl.data.decode import probe

    exif = Image.Exif()
    exif[0x0112] = orientation
    data = imagefactory.encode(_solid_halves(), "JPEG", quality=95, exif=exif.tobytes())
    img = decode_rgb(data)
    a = np.asarray(img)
    assert img.mode == "RGB" and img.size == ((32, 64) if orientation in (6, 8) else (64, 32))
    assert (probe(data).width, probe(data).height) == img.size  # the shard's width/height agree
    h, w = a.shape[:2]
    halves = {
        "top": (a[: h // 2 - 2], a[h // 2 + 2 :]),
        "bottom": (a[h // 2 + 2 :], a[: h // 2 - 2]),
        "left": (a[:, : w // 2 - 2], a[:, w // 2 + 2 :]),
        "right": (a[:, w // 2 + 2 :], a[:, : w // 2 - 2]),
    }
    red, blue = halves[red_side]
    assert _is(red, (255, 0, 0)) and _is(blue, (0, 0, 255))


def test_sixteen_bit_png_is_rescaled_to_8_bit():
    a = np.array([[0, 257 * 100, 65535, 257 * 37, 128, 129]] * 2, dtype=np.uint16)
    img = decode_rgb(imagefactory.encode(Image.fromarray(a), "PNG"))
    out = np.asarray(img)
    assert img.mode == "RGB" and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 100, 255, 37, 0, 1]  # v * 255 / 65535, rounded
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    # the factory's 16-bit photo: same picture as its 8-bit grey version
    grey = np.asarray(imagefactory.photo().convert("L"))
    assert np.array_equal(np.asarray(decode_rgb(imagefactory.sixteen_bit_png()))[..., 0], grey)


def test_transparency_is_composited_onto_white():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 255, 0, 0)  # invisible green: must not show
    rgba[0, 2] = (0, 0, 255, 128)  # half-transparent blue over white
    rgba[1] = (10, 20, 30, 0)
    out = np.asarray(decode_rgb(imagefactory.encode(Image.fromarray(rgba, "RGBA"), "PNG"))).astype(int)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255] and (out[1] == 255).all()
    assert np.abs(out[0, 2] - [127, 127, 255]).max() <= 2
    # palette with a transparent index, and grey + alpha
    pal = Image.new("P", (4, 1))
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * (256 * 3 - 6))
    pal.putdata([0, 1, 1, 0])
    out = np.asarray(decode_rgb(imagefactory.encode(pal, "PNG", transparency=0)))
    assert out[0].tolist() == [[255, 255, 255], [200, 0, 0], [200, 0, 0], [255, 255, 255]]
    la = Image.fromarray(np.array([[[50, 255], [50, 0]]], np.uint8), "LA")
    assert np.asarray(decode_rgb(imagefactory.encode(la, "PNG")))[0].tolist() == [[50, 50, 50], [255, 255, 255]]


def test_cmyk_and_grey_jpegs_come_out_rgb():
    for mode in ("CMYK", "L"):
        src = Image.new("RGB", (32, 32), (255, 0, 0) if mode == "CMYK" else (90, 90, 90)).convert(mode)
        img = decode_rgb(imagefactory.encode(src, "JPEG", quality=95))
        assert img.mode == "RGB"
        assert _is(np.asarray(img), (255, 0, 0) if mode == "CMYK" else (90, 90, 90), tol=8)


def test_gif_decodes_its_first_frame():
    data = imagefactory.red_then_blue_gif()
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert _is(np.asarray(decode_rgb(data)), (255, 0, 0), tol=1)


def test_probe_reasons():
    from raysl.data.decode import DecodeError, probe

    cases = {**{name: reason for name, (_, reason) in imagefactory.bad_files().items()}}
    files = {name: data for name, (data, _) in imagefactory.bad_files().items()}
    for name, reason in cases.items():
        with pytest.raises(DecodeError) as exc:
            probe(files[name])
        assert exc.value.reason == reason, name
    with pytest.raises(DecodeError) as exc:  # a custom --max-pixels
        probe(imagefactory.encode(imagefactory.photo(), "PNG"), max_pixels=128 * 96 - 1)
    assert exc.value.reason == "too_large"
    assert probe(imagefactory.encode(imagefactory.photo(), "PNG"), max_pixels=128 * 96).width == 128


SMALL_HEADS = {
    "proj_hidden_dim": 64,
    "proj_dim": 32,
    "pred_hidden_dim": 64,
    "num_prototypes": 64,
    "patch_prototypes": 64,
    "queue_size": 64,
    "decoder_dim": 32,
    "decoder_depth": 1,
    "decoder_heads": 2,
    "predictor_dim": 32,
    "predictor_depth": 1,
    "predictor_heads": 2,
}


@pytest.mark.parametrize("method", _registered_methods())
def test_a_recipe_without_data_views_trains_on_the_methods_own_views(method, tmp_path):
    """data.views left out of a recipe means the method's views: DINO gets its 2 global + 8
    local crops, not SimCLR's 2 views (the default once was "simclr", silently). One
    training step on real photographs, views made by the streaming transform."""
    import torch

    from raysl.config import load_config
    from raysl.methods.base import build_method, method_class
    from raysl.train.batch import Batch, forward
    from raysl.train.run_views import spec_for

    backbone = _backbone_for(method)
    cls = method_class(method)
    # small heads, decoders and queues: the views are the point here, not the heads' sizes
    small = {f.name: SMALL_HEADS[f.name] for f in dataclasses.fields(cls.config_class) if f.name in SMALL_HEADS}
    recipe = tmp_path / "recipe.yaml"
    size = "data:\n  image_size: 224\n" if method == "dinov2" else ""  # *_dinov2 ViTs default to 518 px
    keys = "".join(f"  {k}: {v}\n" for k, v in small.items())
    recipe.write_text(f"method:\n  name: {method}\n{keys}model:\n  backbone: {backbone}\n{size}")
    cfg = load_config(str(recipe))
    spec = spec_for(cfg, cls)
    assert dataclasses.replace(spec, masks=None) == VP.PRESETS[cls.default_views]
    expected = {"dino": 10, "swav": 8, "mae": 1, "ibot": 12, "dinov2": 10, "ijepa": 1}.get(method, 2)
    batch = V.ViewTransform(spec)(batch_of(PHOTOS[:2]))
    views = [V.normalize(torch.from_numpy(batch[f"view_{i}"])) for i in range(spec.n_views)]
    assert len(views) == spec.n_views == expected
    torch.manual_seed(0)
    model = build_method(cfg)
    values = {"lr": 0.1, "weight_decay": 0.0, "ema_momentum": 0.99, "teacher_temp": 0.04, "step": 0}
    masks = torch.from_numpy(batch["masks"]).bool() if spec.masks is not None else None
    out = forward(model, Batch(views, masks), values)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert any(p.grad is not None for p in model.backbone.parameters())


# ---------------------------------------------------------------- fast path vs the PIL reference


def _reference_views(data: bytes, seed, spec) -> list[np.ndarray]:
    """The views as raysl made them before the fast path: PIL decode, PIL resize with the
    box, torchvision's PIL colour ops, PIL's blur. The reference for the per-op statistics."""
    import torchvision.transforms.functional as F
    from PIL import ImageFilter, ImageOps

    _PIL_JITTER = {
        "brightness": F.adjust_brightness,
        "contrast": F.adjust_contrast,
        "saturation": F.adjust_saturation,
        "hue": F.adjust_hue,
    }

    img = decode_rgb(data, min_side=spec.min_decode_side())
    out = []
    for plan, crop in zip(VP.plan_views(spec, seed, *img.size), spec.per_view()):
        v = img.resize((crop.size, crop.size), V._RESAMPLE[crop.interpolation], box=plan.box)
        if plan.flip:
            v = v.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for op, factor in plan.jitter:
            v = _PIL_JITTER[op](v, factor)
        if plan.gray:
            v = v.convert("L").convert("RGB")
        if plan.blur_sigma is not None:
            v = v.filter(ImageFilter.GaussianBlur(radius=plan.blur_sigma))
        if plan.solarize:
            v = ImageOps.solarize(v, threshold=128)
        out.append(np.asarray(v).transpose(2, 0, 1))
    return out


def _jpeg(name: str, size=(500, 375)) -> bytes:
    img = Image.open(os.path.join(DATA, name)).convert("RGB").resize(size)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_fast_decode_is_pils_decode():
    from raysl.data.decode import decode_pixels

    for data in (_jpeg("chelsea.png"), real("rocket.jpg"), real("retina.jpg"), real("chelsea.png")):
        for min_side in (None, 100, 496):
            assert np.array_equal(
                decode_pixels(data, min_side=min_side), np.asarray(decode_rgb(data, min_side=min_side))
            )
    # every kind of file the builder keeps (PIL's path: one open serves the header and the
    # pixels), with and without a reduced decode; the EXIF-rotated JPEG comes out upright
    for name, data in imagefactory.good_files().items():
        for min_side in (None, 8, 40):
            pixels = decode_pixels(data, min_side=min_side)
            assert np.array_equal(pixels, np.asarray(decode_rgb(data, min_side=min_side))), (name, min_side)
            assert pixels.dtype == np.uint8 and pixels.shape[2] == 3, name
    rotated = decode_pixels(imagefactory.exif_rotated_jpeg(), min_side=40)
    assert rotated.shape[0] > rotated.shape[1]  # stored landscape, shown portrait


@pytest.mark.parametrize("name", ["dino", "simclr"])
def test_per_op_statistics_did_not_change(name):
    """The fast path (torchvision uint8 resize, simplejpeg, OpenCV colour ops) against the PIL reference on
    real photographs, per op: the random draws are the same plans, so each op's rate and
    strength is unchanged by construction; the pixels they make must agree too, view by
    view (mean level and contrast) and pixel by pixel (mean absolute difference)."""
    spec = VP.view_spec(name)
    photos = [_jpeg("chelsea.png"), _jpeg("coffee.png"), real("rocket.jpg")]
    stats = {"mean": [], "std": [], "mad": []}
    by_op: dict[str, list[float]] = {}
    for seed in range(12):
        for data in photos:
            fast, ref = V.make_views(data, seed, spec), _reference_views(data, seed, spec)
            plans = VP.plan_views(spec, seed, *decode_rgb(data, min_side=spec.min_decode_side()).size)
            for f, r, plan in zip(fast, ref, plans):
                f, r = f.astype(np.float64), r.astype(np.float64)
                stats["mean"].append(f.mean() - r.mean())
                stats["std"].append(f.std() - r.std())
                stats["mad"].append(np.abs(f - r).mean())
                ops = [op for op, _ in plan.jitter] + ["blur"] * (plan.blur_sigma is not None)
                ops += ["solarize"] * plan.solarize + ["gray"] * plan.gray + ["plain"] * (not ops)
                for op in ops:
                    by_op.setdefault(op, []).append(np.abs(f - r).mean())
    assert abs(np.mean(stats["mean"])) < 0.1 and np.abs(stats["mean"]).max() < 1.5
    assert abs(np.mean(stats["std"])) < 0.1 and np.abs(stats["std"]).max() < 1.5
    # Pixel by pixel the colour ops are OpenCV's: hue steps by 1/256 of the circle where
    # PIL steps by 1/255, and the blur is a true Gaussian where PIL chains box blurs (0.36
    # levels apart on average); a skipped or misapplied op is several levels off.
    assert np.mean(stats["mad"]) < 0.75
    for op, mads in by_op.items():
        assert np.mean(mads) < 1.0, op  # grey levels, out of 255
