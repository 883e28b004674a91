"""The workers of a cluster raysl joins get the driver's storage variables (endpoint and
credentials) through the job's runtime env, next to the quiet settings."""

from raysl import runtime


def _clear(monkeypatch):
    for key in (runtime.VERBOSE_ENV, runtime._JOB_ENV, *runtime.QUIET_ENV, *runtime.STORAGE_ENV):
        monkeypatch.delenv(key, raising=False)


def test_a_joined_cluster_gets_the_storage_variables_the_driver_has(monkeypatch):
    _clear(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://10.0.0.5:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "")  # set but empty: not forwarded
    env = runtime.cluster_runtime_env()
    assert env == {
        "env_vars": {
            **runtime.QUIET_ENV,
            "AWS_ENDPOINT_URL": "http://10.0.0.5:9000",
            "AWS_ACCESS_KEY_ID": "key",
            "AWS_SECRET_ACCESS_KEY": "secret",
            "AWS_REGION": "eu-west-1",
        },
        "worker_process_setup_hook": runtime.SETUP_HOOK,
    }


def test_with_verbose_only_the_storage_variables_and_none_without_them(monkeypatch):
    _clear(monkeypatch)
    monkeypatch.setenv(runtime.VERBOSE_ENV, "1")
    assert runtime.cluster_runtime_env() is None
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert runtime.cluster_runtime_env() == {"env_vars": {"AWS_DEFAULT_REGION": "us-east-1"}}


def test_a_submitted_job_keeps_its_own_runtime_env(monkeypatch):
    _clear(monkeypatch)
    monkeypatch.setenv(runtime._JOB_ENV, "{}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    assert runtime.cluster_runtime_env() is None


def test_init_ray_passes_it_when_joining(monkeypatch):
    import ray

    _clear(monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    runtime.init_ray("10.0.0.1:6379")
    assert calls[-1]["runtime_env"]["env_vars"]["AWS_ACCESS_KEY_ID"] == "key"
