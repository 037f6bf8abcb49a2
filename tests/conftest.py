import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from omniforcing_core.config import TINY  # noqa: E402
from omniforcing_core.embedded import random_model  # noqa: E402

# One intra-op thread for the whole suite: on a shared 2-core runner extra threads spin and run several
# times slower on these tiny models (scripts/test.sh also exports OMP_NUM_THREADS=1 for subprocesses).
torch.set_num_threads(1)


@pytest.fixture
def tiny64():
    """A tiny random model in float64 (exactness tests)."""
    return random_model(TINY, seed=0, dtype=torch.float64)


@pytest.fixture
def text64(tiny64):
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 7, tiny64.config.caption_channels, generator=g, dtype=torch.float64)
    return tiny64.text_kv(ctx, 0.5 * ctx)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (already the session's setting; kept for the modules that ask)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
