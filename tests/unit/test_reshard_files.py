"""Which of an old checkpoint's files a worker of another world size reads
(raysl.train.reshard.files_for_rank): the shared files and the ZeRO files of the old workers
whose partitions overlap its new ones."""

from raysl.train.reshard import files_for_rank


def _names(old_world: int, stage: int) -> list[str]:
    shared = ["raysl_state.json", "weights.safetensors", "latest", "engine/mp_rank_00_model_states.pt"]
    per_worker = [f"worker_{k}.json" for k in range(old_world)]  # each worker's listing
    zero = [f"engine/zero_pp_rank_{k}_mp_rank_00_optim_states.pt" for k in range(old_world)]
    if stage == 3:
        shared.remove("engine/mp_rank_00_model_states.pt")
        zero += [f"engine/zero_pp_rank_{k}_mp_rank_00_model_states.pt" for k in range(old_world)]
    return shared + per_worker + zero


def _optim_ranks(names: list[str]) -> set[int]:
    return {int(n.split("_")[3]) for n in names if n.endswith("optim_states.pt")}


def test_zero2_shrink_reads_the_overlapping_old_partitions_only():
    # one group of 1000 elements: 8 workers held 126 each (padded to 1008), 2 hold 500 each
    meta = {"world_size": 8, "zero": {"stage": 2, "groups": [{"base": 1000, "extent": 1000}]}}
    names = _names(8, 2)
    first, second = files_for_rank(names, meta, 0, 2), files_for_rank(names, meta, 1, 2)
    assert _optim_ranks(first) == {0, 1, 2, 3}  # [0, 500) lies in old partitions 0-3
    assert _optim_ranks(second) == {0, 3, 4, 5, 6, 7}  # [500, 1000): 3-7, and 0's shared state
    for got, rank in ((first, 0), (second, 1)):
        assert {"raysl_state.json", "weights.safetensors", "engine/mp_rank_00_model_states.pt"} <= set(got)
        assert not [n for n in got if n.startswith("worker_")]


def test_zero3_reads_each_parameters_overlapping_chunks():
    # ZeRO-3 cuts each parameter alone: ceil(numel / world) per worker
    meta = {"world_size": 4, "zero": {"stage": 3, "groups": [{"numels": [1000]}, {"numels": [10]}]}}
    names = _names(4, 3)
    assert _optim_ranks(files_for_rank(names, meta, 0, 2)) == {0, 1}  # 1000: [0, 500) ; 10: [0, 5) of 3s
    assert _optim_ranks(files_for_rank(names, meta, 1, 2)) == {0, 1, 2, 3}  # 10: [5, 10) is in chunks 1-3
    model = [n for n in files_for_rank(names, meta, 1, 2) if n.endswith("model_states.pt")]
    assert model == ["engine/zero_pp_rank_0_mp_rank_00_model_states.pt"]


def test_at_scale_each_worker_reads_about_old_over_new_files():
    """1024 -> 512 workers under ZeRO-2 (ViT-g's two groups) and ZeRO-3 (varied numels)."""
    z2 = {
        "world_size": 1024,
        "zero": {"stage": 2, "groups": [{"base": n, "extent": n} for n in (1_011_000_000, 900_000)]},
    }
    z3 = {"world_size": 1024, "zero": {"stage": 3, "groups": [{"numels": [1408 * 6144, 6144, 1408, 7, 2048]}]}}
    for meta, stage in ((z2, 2), (z3, 3)):
        names = _names(1024, stage)
        for rank in (0, 1, 300, 511):
            assert len(_optim_ranks(files_for_rank(names, meta, rank, 512))) <= 2 + 3


def test_without_a_recorded_layout_every_file():
    names = _names(2, 2)
    assert files_for_rank(names, {"world_size": 2}, 0, 1) == names


def test_recorded_counters_spare_the_model_states_files():
    """Under ZeRO-1/2 DeepSpeed's model-states file holds the whole module; with the engine's
    counters in raysl_state.json a resharding reads none (ZeRO-0 still loads through it)."""
    counters = {"global_steps": 2, "global_samples": 16, "skipped_steps": 0}
    for stage in (1, 2, 3):
        groups = [{"numels": [100]}] if stage == 3 else [{"base": 100, "extent": 100}]
        meta = {"world_size": 2, "zero": {"stage": stage, "groups": groups, "counters": counters}}
        assert not [n for n in files_for_rank(_names(2, stage), meta, 0, 1) if n.endswith("model_states.pt")]
    meta = {"world_size": 2, "zero": {"stage": 0, "counters": counters}}
    assert "engine/mp_rank_00_model_states.pt" in files_for_rank(_names(2, 0), meta, 0, 1)
