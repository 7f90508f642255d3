import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # for `import helpers`


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The test models are tiny: one intra-op thread beats two (thread start-up dominates)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
