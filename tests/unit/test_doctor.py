"""`raysl doctor`: one line per check; a failure says what to do. No Ray starts here."""

from importlib import metadata

from raysl import doctor
from raysl.cli import main


def test_doctor_prints_one_line_per_check(capsys, tmp_path, restore_environ):
    code = main(["doctor", "--storage", str(tmp_path / "runs")])
    lines = capsys.readouterr().out.splitlines()
    names = [line.split(":", 1)[0].split(None, 1)[1] for line in lines]
    assert names == ["python", *doctor.PACKAGES, "gpu", "8-bit optimizers", "ray cluster", "disk"]
    for pkg in doctor.PACKAGES:
        assert f"{pkg}: {metadata.version(pkg)}" in "\n".join(lines)
    assert all(line.startswith(("ok  ", "FAIL")) for line in lines)
    assert code == (0 if all(line.startswith("ok") for line in lines) else 1)
    assert "8-bit optimizers: AdamW8bit step on" in lines[7] and "torch.uint8" in lines[7]  # bitsandbytes works here
    assert str(tmp_path) in lines[-1] and "GB free" in lines[-1]


def test_failures_say_what_to_do(monkeypatch, tmp_path):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(doctor.metadata, "version", missing)
    line = doctor.check_package("deepspeed").line()
    assert line.startswith("FAIL") and "deepspeed: not installed -> pip install" in line

    line = doctor.check_ray("127.0.0.1:1", timeout_s=2).line()  # nothing listens on port 1
    assert line.startswith("FAIL  ray cluster: 127.0.0.1:1: cannot connect") and "-> start it" in line

    class Usage:
        free = 2e9

    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: Usage)
    line = doctor.check_disk(str(tmp_path / "not" / "yet")).line()
    assert line.startswith("FAIL  disk: 2.0 GB free at " + str(tmp_path)) and "train.storage_path" in line
    assert doctor.check_disk("s3://bucket/runs").ok
