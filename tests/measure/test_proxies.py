import torch
from torch import nn

from pqd.measure.proxies import proxies


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)  # 1x4x4 -> 2x4x4
        self.down = nn.Conv2d(2, 4, 3, stride=2, padding=1)  # 2x4x4 -> 4x2x2
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)  # depthwise, 4x2x2
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.dw(self.down(self.conv(x)).relu())
        return self.fc(x.flatten(1))


def test_proxies_count_params_and_macs_by_hand():
    m = Toy()
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(0.5)
        m.conv.weight[0] = 0  # 9 of 18 conv weights pruned
        m.fc.weight[:, :8] = 0  # 24 of 48 fc weights pruned
        m.down.weight[1:] = 0  # 54 of 72
    r = proxies(m, (1, 4, 4), per_layer=True)
    params = 18 + (72 + 4) + 36 + (48 + 3)
    assert r["params"] == params
    assert r["nonzero_params"] == params - 9 - 24 - 54
    # dense MACs per image: output positions x weight elements
    conv, down, dw, fc = 16 * 18, 4 * 72, 4 * 36, 1 * 48
    assert [x["macs"] for x in r["layers"]] == [conv, down, dw, fc]
    assert r["macs"] == conv + down + dw + fc
    nz = 16 * 9 + 4 * 18 + 4 * 36 + 24
    assert r["nonzero_macs"] == nz
    assert r["nonzero_mac_fraction"] == nz / r["macs"]


def test_proxies_see_qat_modules_like_float_ones():
    from pqd.compress.qat import prepare
    from pqd.models.registry import create_model

    model = create_model("resnet18", width=0.125, num_classes=4).eval()
    qat = prepare(model, torch.zeros(2, 3, 16, 16), mode="qat")
    a, b = proxies(model, (3, 16, 16)), proxies(qat, (3, 16, 16))
    assert a["macs"] == b["macs"] > 0 and a["nonzero_macs"] == b["nonzero_macs"]
    assert a["params"] == b["params"]
