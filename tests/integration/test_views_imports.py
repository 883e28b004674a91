"""What a fresh data worker imports for the views (each costs every new worker CPU time):
checked in a fresh interpreter."""


def test_the_view_workers_do_not_import_torchvision():
    """A fresh data worker imports what the views need; torchvision (and torch._dynamo,
    which it pulls in) costs each one about a second of CPU more."""
    import subprocess
    import sys

    code = "import sys, raysl.data.reader, raysl.data.views; print('torchvision' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_a_decoding_task_draws_the_plans_without_torch_or_opencv():
    """data.augment_on=worker: the task decodes and draws each row's plans (view_plans),
    importing neither torch nor OpenCV (1-2 s of CPU for each fresh data worker)."""
    import subprocess
    import sys

    code = (
        "import io, sys, numpy as np, raysl.data.reader\n"
        "from PIL import Image\n"
        "from raysl.data.decode import PixelTransform\n"
        "from raysl.data.view_plans import view_spec\n"
        "buf = io.BytesIO(); Image.new('RGB', (40, 30)).save(buf, 'PNG')\n"
        "out = PixelTransform(view_spec('dino', global_size=32, local_size=16))"
        "({'image': np.array([buf.getvalue()] * 2, dtype=object), 'aug_seed': np.array([1, 2])})\n"
        "print(out['plans'].shape, 'torch' in sys.modules, 'cv2' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "(2, 10, 17) False False"
