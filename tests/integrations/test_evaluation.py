import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pqd.compress.qat import calibrate, convert, prepare_ptq, to_torchscript
from pqd.errors import DataError
from pqd.integrations.evaluation import evaluate, predict
from pqd.models.registry import create_model


def test_evaluate_fp32_int8_and_torchscript_on_a_dataloader():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=4, width=0.125).eval()
    x, y = torch.rand(40, 3, 16, 16), torch.randint(0, 4, (40,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    logits, labels = predict(model, loader)
    assert logits.shape == (40, 4) and torch.equal(labels, y)
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-5)
    assert evaluate(model, loader)["top1"] == pytest.approx((model(x).argmax(1) == y).float().mean().item())
    int8 = convert(calibrate(prepare_ptq(model, x[:2]), loader))
    scripted = to_torchscript(int8, x[:1])
    assert (
        evaluate(int8, loader)["images"] == 40 and evaluate(scripted, loader)["top1"] == evaluate(int8, loader)["top1"]
    )
    with pytest.raises(DataError, match="float"):
        evaluate(model, [(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), torch.zeros(2))])
