"""RelInf, pairing and the s_in / s_cross averages against plain Python loops over the paper's formulas."""

import pytest
import torch

from swift_callbacks.influence import block_scores, pairing_mask, relinf


def test_relinf_is_eq3():
    dot = torch.tensor([[2.0, -1.0], [0.5, 4.0]])
    norms = torch.tensor([4.0, 2.0])
    assert torch.equal(relinf(dot, norms), torch.tensor([[0.5, -0.5], [0.125, 2.0]]))


def test_relinf_rejects_zero_norm():
    with pytest.raises(ValueError, match=r"positions \[1\]"):
        relinf(torch.ones(2, 2), torch.tensor([1.0, 0.0]))


def test_s_in_s_cross_by_position_are_eq4_eq5():
    g = torch.Generator().manual_seed(0)
    n = 5
    rel = torch.randn(n, n, generator=g, dtype=torch.float64)
    s = block_scores(rel, pairing_mask([None] * n, [None] * n))
    s_in = sum(rel[i, i] for i in range(n)) / n
    s_cross = sum(rel[i, j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    assert s.s_in == pytest.approx(float(s_in), rel=1e-12)
    assert s.s_cross == pytest.approx(float(s_cross), rel=1e-12)
    assert (s.n_in, s.n_cross) == (n, n * (n - 1))


def test_pairing_by_task_allows_unequal_sizes_and_repeats():
    mask = pairing_mask(["a", "b", "a"], ["a", "c"])
    assert mask.tolist() == [[True, False], [False, False], [True, False]]
    s = block_scores(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), mask)
    assert s.s_in == pytest.approx((1 + 5) / 2) and s.s_cross == pytest.approx((2 + 3 + 4 + 6) / 4)


def test_no_in_task_pair_gives_none_not_zero():
    s = block_scores(torch.ones(2, 2), pairing_mask(["a", "b"], ["c", "d"]))
    assert s.s_in is None and s.n_in == 0 and s.s_cross == 1.0


@pytest.mark.parametrize(
    ("probe", "evals", "match"),
    [
        ([None, None], [None], "equal size"),
        (["a", "b"], [None, None], "both"),
        (["a", None], ["a", "b"], "every example"),
    ],
)
def test_pairing_errors(probe, evals, match):
    with pytest.raises(ValueError, match=match):
        pairing_mask(probe, evals)


def test_store_fresh_run_sets_old_history_aside(tmp_path):
    import pandas as pd

    from swift_callbacks.store import InfluenceStore

    store = InfluenceStore(tmp_path)
    frame = pd.DataFrame({"step": [5], "relinf": [0.5]})
    store.write_step(5, frame)
    with pytest.raises(FileExistsError):
        store.write_step(5, frame)
    assert store.set_aside(-1, "previous-run") == [5]
    assert store.steps() == []
    assert (store.root / "superseded" / "previous-run" / "step-000000005.parquet").exists()
    assert not list(store.root.rglob(".*.tmp-*"))


def test_store_set_aside_never_overwrites(tmp_path):
    import pandas as pd

    from swift_callbacks.store import InfluenceStore

    store = InfluenceStore(tmp_path)
    for _ in range(2):
        store.write_step(3, pd.DataFrame({"step": [3]}))
        store.set_aside(-1, "previous-run")
    assert sorted(p.name for p in (store.root / "superseded").iterdir()) == ["previous-run", "previous-run-2"]


def test_public_api_is_lazy_and_complete():
    import subprocess
    import sys

    import swift_callbacks

    code = "import sys, swift_callbacks, swift_callbacks.sets; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in swift_callbacks.__all__:
        assert getattr(swift_callbacks, name) is not None
