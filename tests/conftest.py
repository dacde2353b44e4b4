"""Process-wide test setup.

Triton reads TRITON_INTERPRET when it is first imported, and other libraries (transformers,
Ray) may import it before the Triton kernel tests run: set it before anything else so the
kernel tests always run under the interpreter on a machine without CUDA.
"""

import os
import shutil
import subprocess

import pytest


def _has_cuda_device() -> bool:
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return False
    return subprocess.run([nvidia_smi, "-L"], capture_output=True).returncode == 0


if not _has_cuda_device():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def demo_url():
    """The Gradio demo served in-process on a free loopback port (tests of the demo share it)."""
    from eval.demo_screenshot import free_port
    from server.demo import build_demo, launch_demo

    blocks = launch_demo(build_demo(), port=free_port(), block=False)
    yield blocks.local_url
    blocks.close()
    blocks.handlers.close()


@pytest.fixture(scope="session")
def talkative_example():
    """A bundled example on which the default vidsieve-tiny says words under VideoScan (one and
    two carriers a frame), so a test comparing streamed text compares real text. An untrained
    model says nothing on most clips; which clips it speaks on changes with its init."""
    import numpy as np

    from server.demo import bundled_examples
    from streaming import open_video
    from vlm.model import VLM

    model = VLM.from_pretrained("vidsieve-tiny")
    for example in bundled_examples():
        frames = open_video(example.video, num_frames=model.config.num_frames).read_all()
        rgb, times = np.stack([f.rgb for f in frames]), [f.timestamp_s for f in frames]
        if all(model.answer(rgb, times, example.question, spec).text for spec in ("videoscan", "videoscan:per_frame=2")):
            return example
    pytest.fail("vidsieve-tiny says nothing on any bundled example under videoscan")
