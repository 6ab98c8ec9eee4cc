"""pqd.compress.sparsity, pqd.compress.qat and pqd.compress.kd used outside pqd's loop."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pqd.compress.kd import KDLoss, kd_loss
from pqd.compress.qat import calibrate, convert, prepare_ptq, prepare_qat
from pqd.compress.sparsity import (
    GlobalPruner,
    MagnitudeImportance,
    Masks,
    RandomImportance,
    agp_sparsity,
    global_sparsity,
    oneshot_sparsity,
)
from pqd.errors import ConfigError, ModelError
from pqd.models.registry import create_model


def _model():
    torch.manual_seed(0)
    return create_model("resnet18", num_classes=4, width=0.125)


def test_agp_is_cubic_and_holds():
    s = [agp_sparsity(i, total_steps=4, target=0.8) for i in range(7)]
    assert s[0] == 0.0 and s[4:] == [pytest.approx(0.8)] * 3
    assert s[1] == pytest.approx(0.8 * (1 - 0.75**3))
    assert agp_sparsity(0, total_steps=4, target=0.8, initial=0.2) == pytest.approx(0.2)
    assert oneshot_sparsity(0, target=0.5) == 0.5


def test_masks_attached_to_any_optimizer_keep_zeros():
    m = _model()
    masks = Masks(m, {"fc": torch.rand(m.fc.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5})
    masks.apply()
    opt = torch.optim.Adam(m.parameters(), lr=0.1)  # not pqd's SGD
    handle = masks.attach(opt)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(m(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
        assert torch.all(m.fc.weight[~masks["fc"]] == 0)
    handle.remove()
    opt.zero_grad()
    F.cross_entropy(m(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert torch.any(m.fc.weight[~masks["fc"]] != 0), (
        "a removed hook must stop masking (else the test above proves nothing)"
    )


def test_masks_reject_wrong_shapes():
    m = _model()
    with pytest.raises(ModelError, match="shape"):
        Masks(m, {"fc": torch.ones(3, 3, dtype=torch.bool)})


@pytest.mark.parametrize("importance", [MagnitudeImportance(), RandomImportance()])
def test_global_pruner_steps_along_a_schedule(importance):
    m = _model()
    pruner = GlobalPruner(
        m,
        importance=importance,
        exclude=("@first",),
        schedule=lambda n: agp_sparsity(n, total_steps=2, target=0.6),
        generator=torch.Generator().manual_seed(0),
    )
    seen = []
    for _ in range(4):
        before = {k: v.clone() for k, v in pruner.masks.items()}
        pruner.step()
        seen.append(global_sparsity(m, pruner.layers))
        assert all(torch.all(pruner.masks[k] <= v) for k, v in before.items()), "pruned weights stay pruned"
    assert seen == pytest.approx([0.0, 0.6 * (1 - 0.5**3), 0.6, 0.6], abs=0.005)
    with pytest.raises(ConfigError, match="needs a schedule"):
        GlobalPruner(m).step()


def test_kd_loss_module_matches_function_and_validates():
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    loss = KDLoss(temperature=3.0, alpha=0.7)
    assert loss(s, t, y).item() == pytest.approx(kd_loss(s, t, y, temperature=3.0, alpha=0.7).item())
    assert isinstance(loss, nn.Module)
    with pytest.raises(ConfigError):
        KDLoss(temperature=0.0)


def test_prepare_leaves_input_untouched_and_convert_is_int8_on_cpu():
    m = _model()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    q = prepare_qat(m, torch.zeros(2, 3, 16, 16))
    q(torch.randn(4, 3, 16, 16))
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    int8 = convert(q)
    assert isinstance(int8, torch.fx.GraphModule)
    assert type(int8.get_submodule("layer1.0.conv1")).__module__.startswith("torch.ao.nn.intrinsic.quantized")
    with pytest.raises(ModelError, match="prepare_qat"):
        convert(m)


def test_calibrate_takes_a_dataloader_and_checks_batches():
    from torch.utils.data import DataLoader, TensorDataset

    m = prepare_ptq(_model(), torch.zeros(2, 3, 16, 16))
    loader = DataLoader(TensorDataset(torch.randn(16, 3, 16, 16), torch.zeros(16, dtype=torch.long)), batch_size=4)
    calibrate(m, loader, num_batches=2)
    assert convert(m)(torch.randn(1, 3, 16, 16)).shape == (1, 4)
    with pytest.raises(ModelError, match="float image tensors"):
        calibrate(m, [torch.zeros(2, 3, 16, 16, dtype=torch.uint8)])
    with pytest.raises(ModelError, match="empty"):
        calibrate(m, [])
