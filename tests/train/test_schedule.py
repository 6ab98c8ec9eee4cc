import pytest

from pqd.train.schedule import lr_at


def test_warmup_then_cosine_to_min():
    total, warm, base = 100, 10, 0.1
    lrs = [lr_at(s, total_steps=total, base_lr=base, warmup_steps=warm) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(base / warm)
    assert lrs[warm - 1] == pytest.approx(base)
    assert lrs[warm] == pytest.approx(base)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1 :], strict=False)), "cosine phase must not increase"
    assert lrs[total] == pytest.approx(0.0, abs=1e-12)
    assert lrs[(total + warm) // 2] == pytest.approx(base / 2, rel=1e-6)


def test_no_warmup_starts_at_base():
    assert lr_at(0, total_steps=10, base_lr=0.3) == pytest.approx(0.3)
    assert lr_at(10, total_steps=10, base_lr=0.3, min_lr=0.01) == pytest.approx(0.01)
