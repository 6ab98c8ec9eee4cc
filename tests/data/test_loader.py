"""batches(): normalisation, determinism, batch-wise crop/flip augmentation, DDP shards."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from pqd.data import Dataset, batches, num_batches

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _ds(n: int = 37, size: int = 12, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)  # image id, to track order
    return Dataset(x, torch.arange(n) % 5, tuple("abcde"))


def _denorm(xb: torch.Tensor) -> torch.Tensor:
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (xb * s + m).mul(255).round().to(torch.uint8)


def _run(ds, **kw):
    kw = {"batch_size": 8, "mean": MEAN, "std": STD, **kw}
    return list(batches(ds, **kw))


def test_normalisation_order_and_sizes():
    ds = _ds()
    out = _run(ds)
    assert [len(y) for _, y in out] == [8, 8, 8, 8, 5] and len(out) == num_batches(37, 8)
    x = torch.cat([b for b, _ in out])
    assert x.dtype == torch.float32 and torch.cat([y for _, y in out]).dtype == torch.int64
    ref = (ds.x.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        STD, dtype=torch.float64
    ).view(1, 3, 1, 1)
    assert torch.allclose(x.double(), ref, atol=1e-5)
    assert torch.equal(torch.cat([y for _, y in out]), ds.y)


def test_drop_last_and_channels_last():
    out = _run(_ds(), drop_last=True, channels_last=True)
    assert [len(y) for _, y in out] == [8] * 4 and num_batches(37, 8, drop_last=True) == 4
    assert out[0][0].is_contiguous(memory_format=torch.channels_last)


def test_shuffle_augment_deterministic_per_seed():
    ds = _ds()
    run = lambda seed: _run(ds, shuffle=True, augment=True, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    assert not torch.equal(a[0][0], c[0][0])
    ids = torch.cat(
        [_denorm(x)[:, 0, 0, 0] for x, _ in _run(ds, shuffle=True, generator=torch.Generator().manual_seed(0))]
    )
    assert sorted(ids.tolist()) == list(range(37)) and ids.tolist() != list(range(37)), "a permutation"


def _candidates(img: torch.Tensor, pad: int = 4) -> list[tuple[int, int, bool, torch.Tensor]]:
    """Every reflect-padded crop (and its flip) of one image, via torch's own reflect padding."""
    h, w = img.shape[1:]
    p = F.pad(img[None].float(), (pad,) * 4, mode="reflect")[0].to(torch.uint8)
    out = []
    for dy, dx in itertools.product(range(2 * pad + 1), repeat=2):
        crop = p[:, dy : dy + h, dx : dx + w]
        out += [(dy, dx, False, crop), (dy, dx, True, crop.flip(-1))]
    return out


def _match(ds, hflip):
    xb, _ = next(
        iter(
            batches(
                ds,
                batch_size=len(ds),
                mean=MEAN,
                std=STD,
                augment=True,
                hflip=hflip,
                generator=torch.Generator().manual_seed(5),
            )
        )
    )
    assert xb.shape == ds.x.shape
    aug = _denorm(xb)
    found = []
    for orig, got in zip(ds.x, aug, strict=True):
        hits = [(dy, dx, fl) for dy, dx, fl, cand in _candidates(orig) if torch.equal(cand, got)]
        assert hits, "each augmented image is a reflect-padded crop (maybe flipped) of its source"
        found.append(hits[0])
    return found


def test_augment_is_crop_and_flip():
    ds = _ds(n=40)
    found = _match(ds, hflip=True)
    assert any(f for _, _, f in found) and not all(f for _, _, f in found), "about half flipped"
    assert len({(dy, dx) for dy, dx, _ in found}) > 5, "varied crops"
    assert sum((dy, dx) != (4, 4) for dy, dx, _ in found) > 20, "augmentation really changes images"


def test_no_flip_when_hflip_false():
    found = _match(_ds(n=40), hflip=False)
    assert not any(f for _, _, f in found)


@pytest.mark.parametrize("n", [30, 31])
def test_ddp_shards_disjoint_and_cover(n):
    ds, ws = _ds(n=n), 3
    shards = []
    for rank in range(ws):
        out = _run(ds, shuffle=True, generator=torch.Generator().manual_seed(9), rank=rank, world_size=ws, batch_size=4)
        assert len(out) == num_batches(n, 4, world_size=ws)
        shards.append(torch.cat([_denorm(x)[:, 0, 0, 0] for x, _ in out]).tolist())
    assert all(len(s) == n // ws for s in shards), "equal sizes"
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == len(flat) == n // ws * ws, "disjoint"
    if n % ws == 0:
        assert sorted(flat) == list(range(n)), "the epoch is covered"


def test_bad_arguments():
    with pytest.raises(ValueError, match="3 values"):
        batches(_ds(), batch_size=4, mean=(0.5,), std=(0.2,))
    with pytest.raises(ValueError, match="rank"):
        batches(_ds(), batch_size=4, mean=MEAN, std=STD, rank=2, world_size=2)
