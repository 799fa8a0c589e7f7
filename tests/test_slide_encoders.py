"""Slide encoders against their authors' code, `slide-embed`, and the linear probe in crossval.

Each reference below is the authors' module restated from their file (cited), built with the
authors' constructor arguments; random weights in the authors' key layout are saved, loaded
into the slide encoder through the one strict path (`create_slide_encoder(weights=...)`), and
the embeddings compared. Once per family a changed architecture setting is shown to be caught
(refused by the strict load, or a different embedding)."""

from argparse import Namespace

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from wsi_mil.cli import app
from wsi_mil.config import TrainConfig
from wsi_mil.errors import WsiMilError
from wsi_mil.features.slide_encoders import create_slide_encoder
from wsi_mil.formats.features import read_features
from wsi_mil.synthetic import make_feature_cohort
from wsi_mil.training.crossval import run_crossval

runner = CliRunner()


def _randomise(module: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()


# -- CHIEF: hms-dbmi/CHIEF models/CHIEF.py at 1abed33 (L12-66, L82-142), restated ----------------


class Attn_Net(nn.Module):
    def __init__(self, L=1024, D=256, dropout=False, n_classes=1):
        super().__init__()
        self.module = [nn.Linear(L, D), nn.Tanh()]
        if dropout:
            self.module.append(nn.Dropout(0.25))
        self.module.append(nn.Linear(D, n_classes))
        self.module = nn.Sequential(*self.module)

    def forward(self, x):
        return self.module(x), x


class Attn_Net_Gated(nn.Module):
    def __init__(self, L=1024, D=256, dropout=False, n_classes=1):
        super().__init__()
        self.attention_a = [nn.Linear(L, D), nn.Tanh()]
        self.attention_b = [nn.Linear(L, D), nn.Sigmoid()]
        if dropout:
            self.attention_a.append(nn.Dropout(0.25))
            self.attention_b.append(nn.Dropout(0.25))
        self.attention_a = nn.Sequential(*self.attention_a)
        self.attention_b = nn.Sequential(*self.attention_b)
        self.attention_c = nn.Linear(D, n_classes)

    def forward(self, x):
        return self.attention_c(self.attention_a(x).mul(self.attention_b(x))), x


class Att_Head(nn.Module):
    def __init__(self, FEATURE_DIM, ATT_IM_DIM):
        super().__init__()
        self.fc1, self.relu = nn.Linear(FEATURE_DIM, ATT_IM_DIM), nn.ReLU()
        self.fc2, self.sigmoid = nn.Linear(ATT_IM_DIM, 1), nn.Sigmoid()


class ChiefReference(nn.Module):
    def __init__(self, gate=True, size_arg="large", dropout=True, n_classes=2):
        super().__init__()
        size = {"xs": [384, 256, 256], "small": [768, 512, 256], "big": [1024, 512, 384],
                "large": [2048, 1024, 512]}[size_arg]  # fmt: skip
        fc = [nn.Linear(size[0], size[1]), nn.ReLU()]
        if dropout:
            fc.append(nn.Dropout(0.25))
        net = (Attn_Net_Gated if gate else Attn_Net)(L=size[1], D=size[2], dropout=dropout, n_classes=1)
        fc.append(net)
        self.attention_net = nn.Sequential(*fc)
        self.classifiers = nn.Linear(size[1], n_classes)
        self.instance_classifiers = nn.ModuleList([nn.Linear(size[1], 2) for _ in range(n_classes)])
        self.att_head = Att_Head(size[1], size[2])
        self.text_to_vision = nn.Sequential(nn.Linear(768, size[1]), nn.ReLU(), nn.Dropout(p=0.25))
        self.register_buffer("organ_embedding", torch.randn(19, 768))  # Text_emdding.pth's, random here

    def forward(self, h, x_anatomic):
        h_ori = h
        A, h = self.attention_net(h)
        A = F.softmax(torch.transpose(A, 1, 0), dim=1)
        embed_batch = self.text_to_vision(self.organ_embedding[x_anatomic])
        M = torch.mm(A, h) + embed_batch
        return {"bag_logits": self.classifiers(M), "WSI_feature": torch.mm(A, h_ori)}


def test_chief_equals_the_authors_module(tmp_path):
    ref = _randomise(ChiefReference(size_arg="small", dropout=True, n_classes=2))  # TRIDENT load.py L290
    torch.save(ref.state_dict(), tmp_path / "CHIEF_pretraining.pth")
    enc = create_slide_encoder("chief", weights=tmp_path / "CHIEF_pretraining.pth")
    x = torch.randn(300, 768)
    want = ref(x, torch.tensor([0]))["WSI_feature"]  # TRIDENT L304-308
    torch.testing.assert_close(enc(x), want, atol=1e-5, rtol=1e-5)
    assert enc.info.dim == want.shape[1] == 768 and enc.info.weights_sha256
    torch.save(ChiefReference(gate=False, size_arg="small").state_dict(), tmp_path / "ungated.pth")
    with pytest.raises(WsiMilError, match="weights do not fit encoder chief: tensors .*missing"):
        create_slide_encoder("chief", weights=tmp_path / "ungated.pth")


# -- FEATHER: mahmoodlab/MIL-Lab src/models/abmil.py, layers.py at dfc3c17, restated -----------


def create_mlp(in_dim=768, hid_dims=(512, 512), out_dim=512, act=nn.ReLU(), dropout=0.0, end_with_fc=True):
    layers = []
    for hid_dim in hid_dims:
        layers += [nn.Linear(in_dim, hid_dim), act, nn.Dropout(dropout)]
        in_dim = hid_dim
    layers.append(nn.Linear(in_dim, out_dim))
    if not end_with_fc:
        layers.append(act)
    return nn.Sequential(*layers)


class GlobalGatedAttention(nn.Module):
    def __init__(self, L=1024, D=256, dropout=0.0, num_classes=1):
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(L, D), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(L, D), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(D, num_classes)

    def forward(self, x):
        return self.attention_c(self.attention_a(x).mul(self.attention_b(x)))


class ABMILReference(nn.Module):
    def __init__(
        self, in_dim=1024, embed_dim=512, num_fc_layers=1, dropout=0.25, attn_dim=384, num_classes=0
    ):
        super().__init__()
        self.patch_embed = create_mlp(
            in_dim=in_dim, hid_dims=[embed_dim] * (num_fc_layers - 1), dropout=dropout, out_dim=embed_dim,
            end_with_fc=False,
        )  # fmt: skip
        self.global_attn = GlobalGatedAttention(L=embed_dim, D=attn_dim, dropout=dropout, num_classes=1)
        if num_classes > 0:
            self.classifier = nn.Linear(embed_dim, num_classes)

    def forward_features(self, h):
        h = self.patch_embed(h)
        A = F.softmax(torch.transpose(self.global_attn(h), -2, -1), dim=-1)
        return torch.bmm(A, h).squeeze(dim=1)


class ABMILModel(nn.Module):  # the hub wrapper (abmil.py ABMILModel): keys under `model.`
    def __init__(self, **kw):
        super().__init__()
        self.model = ABMILReference(**kw)


def test_feather_equals_mil_labs_abmil(tmp_path):
    ref = _randomise(ABMILModel(in_dim=768, num_classes=2))  # base.yaml; a head the encoder drops
    save_file(ref.state_dict(), str(tmp_path / "model.safetensors"))
    enc = create_slide_encoder("feather", weights=tmp_path / "model.safetensors")
    x = torch.randn(200, 768)
    torch.testing.assert_close(enc(x), ref.model.forward_features(x[None]), atol=1e-5, rtol=1e-5)
    two = _randomise(ABMILModel(in_dim=768, num_fc_layers=2))
    save_file(two.state_dict(), str(tmp_path / "two.safetensors"))
    with pytest.raises(WsiMilError, match="weights do not fit encoder feather: tensors .*unexpected"):
        create_slide_encoder("feather", weights=tmp_path / "two.safetensors")


# -- MADELEINE: mahmoodlab/MADELEINE madeleine/models/Model.py, abmil.py at 419287d, restated ----


class BatchedABMIL(nn.Module):
    def __init__(
        self, input_dim=1024, hidden_dim=256, dropout=False, n_classes=1, n_heads=1, activation="softmax"
    ):
        super().__init__()
        self.activation = activation
        self.attention_a = nn.ModuleList([nn.Linear(input_dim, hidden_dim), nn.Tanh()])
        self.attention_b = nn.ModuleList([nn.Linear(input_dim, hidden_dim), nn.Sigmoid()])
        if dropout:
            self.attention_a.append(nn.Dropout(0.25))
            self.attention_b.append(nn.Dropout(0.25))
        self.attention_a = nn.Sequential(*self.attention_a)
        self.attention_b = nn.Sequential(*self.attention_b)
        self.attention_c = nn.Linear(hidden_dim, n_classes)

    def forward(self, x):
        A = self.attention_c(self.attention_a(x).mul(self.attention_b(x)))
        return F.softmax(A, dim=1) if self.activation == "softmax" else torch.sigmoid(A)


class ABMILEmbedder(nn.Module):
    def __init__(self, pre_attention_params, attention_params):
        super().__init__()
        self.n_heads = attention_params["params"]["n_heads"]
        d_in, d = pre_attention_params["input_dim"], pre_attention_params["hidden_dim"]
        self.pre_attn = nn.Sequential(
            nn.Linear(d_in, d), nn.LayerNorm(d), nn.GELU(), nn.Dropout(0.1),
            nn.Linear(d, d), nn.LayerNorm(d), nn.GELU(), nn.Dropout(0.1),
            nn.Linear(d, d * self.n_heads), nn.LayerNorm(d * self.n_heads), nn.GELU(), nn.Dropout(0.1),
        )  # fmt: skip
        self.attn = nn.ModuleList([BatchedABMIL(**attention_params["params"]) for _ in range(self.n_heads)])

    def forward(self, bags):
        embeddings = rearrange(self.pre_attn(bags), "b t (e c) -> b t e c", c=self.n_heads)
        attention = torch.stack([net(embeddings[:, :, :, i]) for i, net in enumerate(self.attn)], dim=-1)
        return torch.sum(embeddings * attention, dim=1)


class MadeleineReference(nn.Module):
    def __init__(self, config):
        super().__init__()
        pre = {"input_dim": config.patch_embedding_dim, "hidden_dim": config.wsi_encoder_hidden_dim}
        attn = {"model": "ABMIL", "params": {
            "input_dim": config.wsi_encoder_hidden_dim, "hidden_dim": 512, "dropout": True,
            "activation": config.activation, "n_heads": config.n_heads, "n_classes": 1}}  # fmt: skip
        self.token_projector = nn.Linear(512 * config.n_heads, 128)
        self.wsi_embedders = ABMILEmbedder(pre, attn)
        self.projector = nn.Linear(512 * config.n_heads, 512)

    def encode_he(self, feats):
        bs = feats.shape[0]
        emb = self.wsi_embedders(feats.unsqueeze(dim=1)[:, 0, :, :])
        d_out, n_heads = emb.shape[-2], emb.shape[-1]
        return self.projector(emb.view(bs, d_out * n_heads)).view(bs, 1, d_out).squeeze(dim=1)


MADELEINE_CFG = dict(patch_embedding_dim=512, wsi_encoder_hidden_dim=512, n_heads=4, activation="softmax")


def test_madeleine_equals_the_authors_encode_he(tmp_path):
    ref = _randomise(MadeleineReference(Namespace(**MADELEINE_CFG)))
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "model.pt")  # DDP keys
    enc = create_slide_encoder("madeleine", weights=tmp_path / "model.pt")
    x = torch.randn(150, 512)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref.encode_he(x[None]), atol=1e-5, rtol=1e-5)
        sig = _randomise(MadeleineReference(Namespace(**{**MADELEINE_CFG, "activation": "sigmoid"})))
        assert not torch.allclose(enc(x), sig.encode_he(x[None]), atol=1e-3)  # same tensors, other rule
    two = MadeleineReference(Namespace(**{**MADELEINE_CFG, "n_heads": 2}))
    torch.save(two.state_dict(), tmp_path / "two_heads.pt")
    with pytest.raises(WsiMilError, match="weights do not fit encoder madeleine: tensors .*shape"):
        create_slide_encoder("madeleine", weights=tmp_path / "two_heads.pt")


def test_mean_pooling_is_tridents_and_unknown_names_say_why():
    enc = create_slide_encoder("mean-kaiko-vit8s")  # TRIDENT's spelling of kaiko-vits8
    x = torch.randn(1, 40, 384)
    torch.testing.assert_close(enc(x[0]), x.mean(dim=1))  # TRIDENT load.py L598-600
    assert enc.info.patch_encoder == "kaiko-vits8"
    with pytest.raises(WsiMilError, match="gigapath.*flash_attn"):
        create_slide_encoder("gigapath")


# -- slide-embed and the linear probe ------------------------------------------------------------


def _retag(features_dir, **attrs):
    for p in features_dir.glob("*.h5"):
        with h5py.File(p, "a") as f:
            for k, v in attrs.items():
                f.attrs[k] = v


@pytest.fixture(scope="module")
def conch_cohort(tmp_path_factory):
    """40 bags of 768-d features tagged as CONCH v1.5's at 20x, 512 px (Feather's input)."""
    d = tmp_path_factory.mktemp("slide_cohort")
    make_feature_cohort(d, n_bags=40, n_instances=(30, 50), dim=768, n_key=(10, 16), strength=3.0, seed=3)
    _retag(d / "features", encoder="conch_v15", target_mpp=0.5, patch_size=512)
    return d


def test_slide_embed_writes_resumes_and_refuses_the_wrong_features(conch_cohort, tmp_path):
    out = tmp_path / "feather"
    args = [
        "slide-embed",
        "--features",
        str(conch_cohort / "features"),
        "--encoder",
        "feather",
        "--out",
        str(out),
    ]
    r = runner.invoke(app, [*args, "--random-weights"])
    assert r.exit_code == 0, r.output
    bag = read_features(out / "bag_000.h5")
    assert bag.features.shape == (1, 512) and bag.attrs["encoder"] == "feather"
    assert (bag.attrs["patch_encoder"], bag.attrs["target_mpp"], bag.attrs["patch_size"]) == (
        "conch_v15",
        0.5,
        512,
    )
    assert "40 slide(s) embedded" in r.output
    assert "0 slide(s) embedded, 40 already done" in runner.invoke(app, [*args, "--random-weights"]).output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "s.h5").write_bytes((conch_cohort / "features" / "bag_001.h5").read_bytes())
    for attrs, fix in [({"patch_size": 256}, "--patch-size 512"), ({"target_mpp": 1.0}, "--target-mpp 0.5"),
                       ({"encoder": "uni_v1"}, "--encoder conch_v15")]:  # fmt: skip
        _retag(bad, **{"encoder": "conch_v15", "target_mpp": 0.5, "patch_size": 512, **attrs})
        r = runner.invoke(app, ["slide-embed", "--features", str(bad), "--encoder", "feather", "--out",
                                str(tmp_path / "o"), "--random-weights"])  # fmt: skip
        assert r.exit_code == 2 and "s.h5" in r.output and fix in r.output, r.output
        assert len(r.output.strip().splitlines()) <= 2 and not (tmp_path / "o").exists()
    r = runner.invoke(app, ["encoders"], env={"COLUMNS": "300"})
    assert r.exit_code == 0 and "feather_uni_v2" in r.output and "mean-conch_v15" in r.output


@pytest.mark.parametrize("encoder", ["mean-conch_v15", "feather"])
def test_linear_probe_crossval_on_slide_embeddings(conch_cohort, tmp_path, encoder):
    emb = tmp_path / "emb"
    from wsi_mil.pipeline.slide_embed import embed_slides

    embed_slides(conch_cohort / "features", create_slide_encoder(encoder, random_weights=True), emb)
    cfg = TrainConfig(folds=3, test_frac=0.25, bootstrap=50)
    out = tmp_path / "run"
    (res,) = run_crossval(emb, conch_cohort / "labels.csv", out, cfg, ["linear-probe"])
    report = (out / "report.md").read_text()
    assert "| linear-probe |" in report and "## Test set" in report
    for f in ("linear-probe/fold_2/model.pt", "linear-probe/predictions.csv", "linear-probe/roc.png"):
        assert (out / f).exists(), f
    if encoder.startswith("mean"):  # random Feather weights carry little of the planted signal
        assert res["test"]["auc"] >= 0.8, res["test"]
    assert "Patch probabilities" not in report and "patch_calibration.json" not in report
    assert "LogisticRegression" in report
    hist = pd.read_csv(out / "linear-probe" / "fold_0" / "history.csv")
    assert len(hist) == 7 and set(hist.C) >= {1.0}
    assert np.isfinite(res["val_mean"]["auc"])
