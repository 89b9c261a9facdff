import os
import tempfile

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
os.environ.setdefault("TQDM_DISABLE", "1")
# image stores of folder datasets go to a per-session temporary folder, not ~/.cache
os.environ.setdefault("DTPROBE_IMAGE_STORE", tempfile.mkdtemp(prefix="dtprobe-stores-"))
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_shapes_params():
    """Smallest shapes dataset that still trains: keeps end-to-end tests at a few seconds."""
    return {"n_train": 240, "n_test": 120, "image_size": 16}


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test, restored after it: tiny networks train several times
    faster single-threaded on a shared 2-core machine. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
