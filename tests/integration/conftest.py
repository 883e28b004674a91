"""Setup that several integration tests share, made once per session."""

import pytest
from shardfactory import digit_images, write_shards

VIT_RUN_SIZE = 64  # not test_vit's default 160: an export must carry the image size


@pytest.fixture(scope="session")
def vit_run(ray_local, tmp_path_factory):
    """A real 3-step SimCLR run of timm's test_vit at 64 px on 48 labeled digits, 1 worker,
    batch 8, with Feature Transformation score histograms: (run dir, shard dir). The export
    and report tests read it; they copy it before changing anything in it."""
    from raysl.config import load_config
    from raysl.pretrain import pretrain

    root = tmp_path_factory.mktemp("vit_run")
    shards = str(root / "shards")
    write_shards(shards, digit_images(48), shard_size=16)
    cfg = load_config(
        "quickstart",
        [
            f"data.shards={shards}",
            f"data.image_size={VIT_RUN_SIZE}",
            "data.batch_size=8",
            "model.backbone=test_vit",
            "method.proj_hidden_dim=32",
            "method.proj_dim=16",
            "method.ft_extrapolate=2.0",
            "method.ft_every=3",
            "optim.name=adamw",
            "deepspeed.zero_stage=0",
            "train.num_workers=1",
            "train.max_steps=3",
            "train.log_every=1",
            "train.checkpoint_every=3",
            f"train.storage_path={root / 'runs'}",
            "train.name=vit",
        ],
    )
    return pretrain(cfg)["run_dir"], shards
