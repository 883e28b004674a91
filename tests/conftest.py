"""Shared by every tier. The tier of a test is the folder it lives in (tests/unit, tests/integration,
tests/drills); it is also its marker, so `pytest -m unit` and `pytest tests/unit` select the same tests.

Under pytest-xdist (`make test` runs `-n 2`), the whole integration tier is one work unit
(its tests share one local Ray and run one after another, in order) and each drill module is
one; the two workers start on the integration tier and the slowest drills, and each worker
takes the next unit once it runs its last test: the drills that the integration worker does
not take run after one another on the other worker. The unit tests, one work unit per file,
fill in at the end wherever there is room, so that both workers end together."""

import os
import sys

import pytest

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)  # the helper modules: imagefactory, shardfactory, runfactory, procs, zero3_worker

TIERS = ("unit", "integration", "drills")
# A hung test fails after its tier's timeout (pytest-timeout; integration: pyproject's default)
UNIT_TIMEOUT_S = 120  # the slowest unit test takes about 30 s on a loaded 2-core machine
DRILL_TIMEOUT_S = 900  # a drill starts clusters, kills workers and resumes: longer than the default timeout
TIER_TIMEOUTS = {"unit": UNIT_TIMEOUT_S, "drills": DRILL_TIMEOUT_S}


def _tier(path) -> str | None:
    rel = os.path.relpath(str(path), HERE).split(os.sep)
    return rel[0] if len(rel) > 1 and rel[0] in TIERS else None


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    tiers = {}
    for item in items:
        tier = tiers[item] = _tier(item.path)
        if tier is None:
            raise pytest.UsageError(f"{item.nodeid}: a test belongs in tests/unit, tests/integration or tests/drills")
    items.sort(key=lambda item: TIERS.index(tiers[item]))  # the fast tier first; each tier in its own order
    gpu = None
    for item in items:
        tier = tiers[item]
        item.add_marker(tier)
        if tier in TIER_TIMEOUTS and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TIER_TIMEOUTS[tier]))
        if "gpu" in item.keywords:
            gpu = _has_cuda() if gpu is None else gpu
            if not gpu:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


# The order the drills start in, so that both workers end together: a drill not named here first
# (a new drill may take minutes: started late, it would end late), then these, slowest first,
# then the quick ones (under a minute).
SLOW_DRILLS = (
    "test_bucket_faults.py",
    "test_resize_apart.py",
    "test_demo.py",
    "test_train_faults.py",
    "test_jobs.py",
    "test_reshard.py",
    "test_tune_pbt.py",
)
QUICK_DRILLS = ("test_bench_checkpoint.py", "test_curate_kill.py", "test_bench_memory.py", "test_append_kill.py")
DRILL_ORDER = SLOW_DRILLS + QUICK_DRILLS


def _unit_rank(scope: str) -> tuple:
    """The order work units are handed out in: the integration tier, the drills (see
    SLOW_DRILLS), then the unit tier's files; in each, the collection's order otherwise."""
    if scope == "integration":
        return (0,)
    if scope.startswith("tests/drills/"):
        name = os.path.basename(scope)
        return (1, DRILL_ORDER.index(name) + 1 if name in DRILL_ORDER else 0)
    return (2,)


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist: one work unit for the integration tier, one per file for the others; a
    worker gets its next unit only when it starts its last test (it must know the test after
    the one it runs), so a long drill never holds back work that the other worker could do."""
    from xdist.scheduler import LoadScopeScheduling

    class TierScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            tier = nodeid.split("/")[1] if nodeid.startswith("tests/") else None
            return tier if tier == "integration" else super()._split_scope(nodeid)

        def _assign_work_unit(self, node) -> None:
            units = sorted(self.workqueue.items(), key=lambda unit: _unit_rank(unit[0]))  # stable: in rank, in order
            self.workqueue.clear()
            self.workqueue.update(units)
            super()._assign_work_unit(node)

        def _reschedule(self, node) -> None:
            if self.workqueue and not node.shutting_down and self._pending_of(self.assigned_work[node]) > 1:
                return
            super()._reschedule(node)

    return TierScheduling(config, log)


@pytest.fixture
def restore_environ():
    """cli.main sets the quiet defaults (raysl.runtime.set_verbose) in os.environ: undone after the test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def s3():
    """A real S3 API (moto's server, tests/s3server.py) for the session, its endpoint and test
    credentials in this process's environment (and so in every process it starts)."""
    from s3server import S3Server

    server = S3Server().start()
    saved = server.put_env()
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_local(s3):
    """One real local Ray for the whole session (integration and drills); its workers reach the
    S3 server through the job's runtime env."""
    import ray

    from raysl.runtime import LOCAL_ENV, SETUP_HOOK, worker_pool

    if not ray.is_initialized():
        # As `raysl` starts a local Ray (raysl.runtime.init_ray), so that other Rays on the
        # machine (the other xdist worker's, a CLI run's, a drill's cluster) do not get in the
        # way: address="local", a Ray of its own (a bare ray.init() joins the cluster `ray start`
        # started last); its dashboard and raysl's worker setup hook, which has the workers'
        # state API calls reach this Ray's dashboard (Ray Train's placement-group cleaner asks
        # it whether the run's controller lives: asked another Ray, it hears no and removes the
        # run's placement group); idle workers kept, each Ray Data job reusing the last one's;
        # Ray Train's controller polling its workers as often as on a local `raysl` Ray (LOCAL_ENV)
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=True,
            log_to_driver=False,
            runtime_env={"env_vars": {**s3.env, **LOCAL_ENV}, "worker_process_setup_hook": SETUP_HOOK},
            _system_config=worker_pool(2),
        )
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def eval_sets(tmp_path_factory):
    """Labelled digit shards and two run directories for `raysl eval` (runfactory.write_eval_sets)."""
    from runfactory import write_eval_sets

    return write_eval_sets(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="module")
def monitor_sets(tmp_path_factory):
    """Digit shards for the online kNN monitor: pretrain, knn (bank 120, queries 30) and unlabeled."""
    from shardfactory import digit_images, write_shards

    root = tmp_path_factory.mktemp("monitor")
    write_shards(str(root / "pretrain"), digit_images(64), shard_size=8)
    write_shards(str(root / "knn"), digit_images(150), shard_size=50)  # bank 120, queries 30
    unlabeled = [(k, b, None) for k, b, _ in digit_images(8)]
    write_shards(str(root / "unlabeled"), unlabeled, shard_size=8)
    return root


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory):
    """64 digit images in shards of 8, for short pretraining runs."""
    from shardfactory import digit_images, write_shards

    d = str(tmp_path_factory.mktemp("train_shards"))
    write_shards(d, digit_images(64), shard_size=8)
    return d


@pytest.fixture(scope="module")
def planted():
    """curatefactory.PHOTOS photographs, each with 4 planted copies (raysl.curate.planted)."""
    from curatefactory import PHOTOS

    from raysl.curate.planted import planted_duplicates

    return planted_duplicates(size=128, limit=PHOTOS)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, planted):
    """The planted images as a shard set: 30 images in 6 shards of 5."""
    from curatefactory import write_rows

    d = str(tmp_path_factory.mktemp("photos"))
    return write_rows(d, [{"key": r["key"], "image": r["image"]} for r in planted], 5)


@pytest.fixture(scope="module")
def tune_shards(tmp_path_factory):
    """32 digit images in shards of 8, for `raysl tune` trials."""
    from shardfactory import digit_images, write_shards

    d = str(tmp_path_factory.mktemp("tune_shards"))
    write_shards(d, digit_images(32), shard_size=8)
    return d


@pytest.fixture
def small_shards(tmp_path):
    """40 digit images in 6 shards (7,7,7,7,7,5), fresh for each test."""
    from shardfactory import digit_images, write_shards

    d = str(tmp_path / "shards")
    write_shards(d, digit_images(40), shard_size=7)  # 6 shards: 7,7,7,7,7,5
    return d


@pytest.fixture(scope="module")
def mixture_sets(tmp_path_factory):
    """Two digit shard sets to mix: curated (4 shards of 5 rows) and web (8 shards of 5 rows)."""
    from shardfactory import digit_images, write_shards

    root = tmp_path_factory.mktemp("mix")
    images = digit_images(60)
    curated, web = str(root / "curated"), str(root / "web")
    write_shards(curated, [(f"curated/{i:03d}.png", png, lab) for i, (_, png, lab) in enumerate(images[:20])], 5)
    write_shards(web, [(f"web/{i:03d}.png", png, lab) for i, (_, png, lab) in enumerate(images[20:])], 5)
    return curated, web  # 4 shards of 5 rows, 8 shards of 5 rows
