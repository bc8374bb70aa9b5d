"""Case 20: a 1,000,000-token prompt streams through the chunked prefill in constant memory: the peak RSS while
prefilling 1M tokens exceeds the one for 10k tokens by no more than the 8 MB of the prompt itself (plus slack)."""
from __future__ import annotations

import numpy as np

from afedge import LM, to_recurrent
from afedge.runtimes.torch import TorchSession
from afedge.tolerances import RSS_SLACK_BYTES
from tests.reliability.conftest import peak_rss_growth, tiny_config

LONG, SHORT = 1_000_000, 10_000


def test_million_token_prompt_in_constant_memory():
    """A 1-layer d=16 RetNet with a 4096-token prefill block (so 1M tokens are 245 graph calls + 576 steps)."""
    sess = TorchSession(to_recurrent(LM(tiny_config()), chunk_size=64, prefill_len=4096), threads=1)
    rng = np.random.default_rng(0)
    short, long = (rng.integers(0, 256, (1, n), dtype=np.int64) for n in (SHORT, LONG))
    sess.prefill(short, sess.init_state())  # warm up allocator and kernels
    (ref_logits, _), grew_short = peak_rss_growth(lambda: sess.prefill(short, sess.init_state()))
    (logits, state), grew_long = peak_rss_growth(lambda: sess.prefill(long, sess.init_state()))
    assert logits.shape == (1, 256) and np.isfinite(logits).all()
    assert [s.shape for s in state] == [s.shape for s in sess.init_state()]
    assert grew_long <= grew_short + long.nbytes + RSS_SLACK_BYTES, (grew_short, grew_long)
