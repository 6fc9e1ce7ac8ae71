"""Per-sample gradient features: exact gradients vs an autograd loop, Kronecker vs exact, JL properties."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tda_core.features import GradientSource, all_param_names, compute_features, per_sample_gradients
from tda_core.kron_layers import ExactBlockAdapter, combine_gradient, combine_sketches, positions_features
from tda_core.models import MLP, MusicTransformer, ResNet9
from tda_core.projections import DenseProjection, HookedGradients, KronProjection, gradient_rows
from tda_core.objectives import IGNORE, correct_probability, target


class TinySeq(nn.Module):
    """Embedding + Linear over (B, T) tokens, with a padding token: the music model's layer types."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(x))))


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.conv2 = nn.Conv2d(3, 4, 2, bias=False)
        self.head = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(torch.relu(self.conv(x)))).flatten(1))


def _loop_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sequence: bool) -> torch.Tensor:
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        target(model(x[i:i + 1]), y[i:i + 1], sequence).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


def _seq_data(n: int = 7, t: int = 5, vocab: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (n, t), generator=g)
    y = torch.randint(1, vocab, (n, t), generator=g)
    y[:, -2:] = IGNORE
    return x, y


def _resnet() -> nn.Module:
    """ResNet-9 at width 0.125 on 8x8 images; BatchNorm running statistics of the data, not the defaults."""
    model = ResNet9(n_classes=3, width=0.125, in_channels=1).train()
    with torch.no_grad():
        model(torch.rand(16, 1, 8, 8))
    return model.eval()


def _music() -> nn.Module:
    """A small Music Transformer: relative attention (windows shorter than its table), LayerNorms, and dropout
    on the attention probabilities too, so every dropout path is exercised under masks."""
    return MusicTransformer(vocab_size=11, d_model=8, n_layers=2, n_heads=2, d_ff=12, max_len=7,
                            attn_dropout=0.1).eval()


def _cases():
    torch.manual_seed(0)
    mlp = MLP(in_features=12, hidden=(9, 7), n_classes=4).eval()
    xs, ys = torch.randn(8, 12), torch.randint(0, 4, (8,))
    conv = TinyConv().eval()
    xc, yc = torch.randn(6, 2, 7, 7), torch.randint(0, 5, (6,))
    seq = TinySeq().eval()
    xq, yq = _seq_data()
    resnet = _resnet()
    xr, yr = torch.rand(6, 1, 8, 8), torch.randint(0, 3, (6,))
    return [("mlp", mlp, xs, ys, False), ("conv", conv, xc, yc, False), ("seq", seq, xq, yq, True),
            ("resnet9", resnet, xr, yr, False), ("music", _music(), xq, yq, True)]


@pytest.mark.parametrize("name,model,x,y,sequence", _cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_exact_features_equal_autograd_loop(name, model, x, y, sequence):
    src = GradientSource(model, all_param_names(model), sequence)
    feats = compute_features(src, x, y, chunk=3)
    assert torch.allclose(feats.phi, _loop_grads(model, x, y, sequence), atol=1e-5, rtol=1e-4)
    if sequence:
        assert torch.isnan(feats.p).all()
    else:
        with torch.no_grad():
            assert torch.allclose(feats.p, correct_probability(model(x), y), atol=1e-6)


def _explicit_kron_matrix(model: nn.Module, kron: KronProjection) -> torch.Tensor:
    """The n_params x k matrix the Kronecker features stand for: column r of layer l is vec(u_lr v_lr^T) / sqrt(k);
    an exact block's rows are its dense Gaussian's, split by parameter; an uncovered parameter's rows are zero."""
    layers = {la.name: la for la in kron.layers}
    blocks = []
    for pname, param in model.named_parameters():
        module_name, kind = pname.rsplit(".", 1) if "." in pname else ("", pname)
        la = layers.get(module_name)
        if pname in kron.uncovered:
            cols = torch.zeros(param.numel(), kron.k)
        elif isinstance(la.adapter, ExactBlockAdapter):
            names = la.adapter.param_names(la.module)
            sizes = [getattr(la.module, n).numel() for n in names]
            cols = dict(zip(names, la.u.split(sizes)))[kind]
        elif isinstance(la.module, nn.Embedding):  # weight [vocab, dim]; u sketches dim, v sketches vocab
            cols = torch.einsum("ir,or->ior", la.v, la.u)
        elif kind == "bias":  # its input column is constant 1
            cols = la.u * la.v[-1]
        else:  # a weight [out, in] (Conv2d: [out, in, kh, kw]) or a relative-position table [distances, d_head]
            v = la.v[:-1] if getattr(la.module, "bias", None) is not None else la.v
            cols = torch.einsum("or,ir->oir", la.u, v)
        blocks.append(cols.reshape(param.numel(), -1))
    return torch.cat(blocks) / kron.k ** 0.5


@pytest.mark.parametrize("name,model,x,y,sequence", _cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_kron_features_equal_exact_gradients_times_their_kronecker_matrix(name, model, x, y, sequence):
    """phi = grad^T P with P's columns Kronecker products u (x) v (with the exact blocks' dense rows), over every
    parameter of MLP, Conv2d, Embedding+Linear, ResNet-9 (BatchNorm) and Music Transformer (LayerNorm, relative
    position tables) models."""
    src = GradientSource(model, all_param_names(model), sequence)
    exact = compute_features(src, x, y).phi
    for hold_bytes in (0, 1 << 30):  # formed weight gradients contracted per example, or by the held columns
        kron = KronProjection(src, 40, seed=0, device=torch.device("cpu"), probe=(x, y), hold_bytes=hold_bytes)
        assert kron.uncovered == ()
        feats = compute_features(src, x, y, kron, chunk=4).phi
        assert feats.shape == (len(x), 40)
        assert torch.allclose(feats, exact @ _explicit_kron_matrix(model, kron), atol=1e-5, rtol=1e-4)
        held = any(la.columns is not None for la in kron.layers)
        assert held == (hold_bytes > 0 and name != "mlp")  # an MLP (one position) never forms weight gradients


def test_kron_position_and_gradient_forms_agree():
    """Summing sketches over positions equals sketching the formed weight gradient (both contraction orders)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 8))
    src = GradientSource(model, all_param_names(model), False)
    kron = KronProjection(src, 16, seed=0, device=torch.device("cpu"), probe=(torch.randn(1, 5), torch.zeros(1)))
    for la in kron.layers:  # d_out < d_in for the first layer, d_out > d_in for the second
        g, a = torch.randn(4, 6, la.d_out), torch.randn(4, 6, la.d_in)
        by_positions = combine_sketches(g @ la.u, a @ la.v)
        by_gradient = combine_gradient(la, torch.bmm(g.transpose(1, 2), a))
        assert torch.allclose(by_positions, by_gradient, atol=1e-4, rtol=1e-4)


def test_kron_bias_sketch_equals_a_ones_column():
    """A bias column's sketch added (its row of v) equals sketching inputs with a ones column appended, in both
    forms (sketches summed over positions, and the formed weight gradient)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 3))
    src = GradientSource(model, all_param_names(model), False)
    kron = KronProjection(src, 32, seed=0, device=torch.device("cpu"), probe=(torch.randn(1, 6), torch.zeros(1)))
    layer = kron.layers[0]
    for positions in (1, 2, 40):  # 40 positions: the weight gradient is formed
        g, a = torch.randn(5, positions, 3), torch.randn(5, positions, 6)
        ones = torch.cat([a, torch.ones(5, positions, 1)], dim=-1)
        want = combine_sketches(g @ layer.u, ones @ layer.v)
        got = positions_features(layer, g, a, bias=True)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_kron_projection_preserves_inner_products_in_expectation():
    """Averaged over projection seeds, projected inner products approach the exact ones (unbiased JL)."""
    name, model, x, y, sequence = _cases()[2]
    src = GradientSource(model, all_param_names(model), sequence)
    exact = compute_features(src, x, y).phi
    want = exact @ exact.T
    total = torch.zeros_like(want)
    seeds = 300
    for seed in range(seeds):
        kron = KronProjection(src, 24, seed=seed, device=torch.device("cpu"), probe=(x, y))
        f = compute_features(src, x, y, kron).phi
        total += f @ f.T
    mean = total / seeds
    rel = (mean - want).norm() / want.norm()
    assert rel < 0.1, float(rel)


def test_dense_projection_is_seeded_blockwise_and_unbiased():
    g = torch.randn(5, 3000)
    a = DenseProjection(3000, 64, seed=3, device=torch.device("cpu"))
    b = DenseProjection(3000, 64, seed=3, device=torch.device("cpu"), hold_bytes=0)  # regenerates blocks
    assert not b.hold and a.hold
    assert torch.allclose(a(g), b(g), atol=1e-4)
    assert not torch.allclose(a(g), DenseProjection(3000, 64, seed=4, device=torch.device("cpu"))(g))
    r = DenseProjection(3000, 64, seed=3, device=torch.device("cpu"), distribution="rademacher").matrix()
    assert torch.allclose(r.abs(), torch.full_like(r, 1 / 8))
    want = g @ g.T
    mean = sum(DenseProjection(3000, 64, seed=s, device=torch.device("cpu"))(g) @
               DenseProjection(3000, 64, seed=s, device=torch.device("cpu"))(g).T for s in range(50)) / 50
    assert (mean - want).norm() / want.norm() < 0.1


def test_features_under_fixed_and_per_example_masks():
    torch.manual_seed(0)
    model = MLP(in_features=12, hidden=(9, 7), n_classes=4).eval()
    x, y = torch.randn(6, 12), torch.randint(0, 4, (6,))
    names = all_param_names(model)
    masks = {"drop1": (torch.rand(9) > 0.5).float() * 2, "drop2": (torch.rand(7) > 0.5).float() * 2}
    fixed = GradientSource(model, names, False, masks)
    per_example = GradientSource(model, names, False, {k: v.expand(6, -1).clone() for k, v in masks.items()}, True)
    a = compute_features(fixed, x, y).phi
    b = compute_features(per_example, x, y, chunk=4).phi
    assert torch.allclose(a, b, atol=1e-6)
    kron = KronProjection(fixed, 32, 0, torch.device("cpu"), (x, y))
    k = compute_features(per_example, x, y, kron, chunk=4).phi
    assert torch.allclose(k, a @ _explicit_kron_matrix(model, kron), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a, compute_features(GradientSource(model, names, False), x, y).phi)


def test_bfloat16_dense_projection_is_the_same_matrix_rounded():
    g = torch.randn(6, 5000)
    exact = DenseProjection(5000, 128, seed=2, device=torch.device("cpu"))(g)
    fast = DenseProjection(5000, 128, seed=2, device=torch.device("cpu"), dtype=torch.bfloat16)(g)
    assert fast.dtype == torch.float32
    assert float((fast - exact).norm() / exact.norm()) < 1e-2


def test_music_kron_features_under_fixed_per_example_and_averaged_masks():
    """The relative-position tables' per-example gradients are recomputed under the dropout masks of their call:
    fixed masks, one mask per example, and the mask-mean target of several fixed masks all match exact gradients."""
    from tda_core.models.dropout import fixed_masks, mask_shapes

    torch.manual_seed(0)
    model = _music()
    x, y = _seq_data()
    names = all_param_names(model)
    shapes = mask_shapes(model, x[:1])
    rates = {name: 0.5 for name in shapes}
    assert any(name.endswith("attn.attn_drop") for name in shapes)
    masks = [fixed_masks(shapes, rates, seed) for seed in range(len(x))]
    per_example = {name: torch.stack([m[name] for m in masks]) for name in shapes}
    sources = [GradientSource(model, names, True, masks[0]), GradientSource(model, names, True, per_example, True),
               GradientSource(model, names, True, average_masks=masks[:3])]
    for src in sources:
        kron = KronProjection(src, 32, 0, torch.device("cpu"), (x, y))
        assert kron.uncovered == ()
        exact = compute_features(src, x, y, chunk=3).phi
        feats = compute_features(src, x, y, kron, chunk=3).phi
        assert torch.allclose(feats, exact @ _explicit_kron_matrix(model, kron), atol=1e-5, rtol=1e-4)
    plain = compute_features(GradientSource(model, names, True), x, y).phi
    assert not torch.allclose(plain, compute_features(sources[1], x, y).phi, atol=1e-3)  # the masks mattered


class Gain(nn.Module):
    """A layer type no adapter covers: one learned gain per feature."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class PartlyCovered(nn.Module):
    """A grouped convolution (a configuration the Conv2d adapter cannot express) and a `Gain` layer."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(2, 4, 3, groups=2)
        self.norm = nn.BatchNorm2d(4)
        self.gain = Gain(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gain(torch.relu(self.norm(self.grouped(x))).flatten(1)))


def test_parameters_of_unsupported_layers_are_listed_by_name_and_left_out():
    torch.manual_seed(0)
    model = PartlyCovered().eval()
    x, y = torch.randn(5, 2, 4, 4), torch.randint(0, 3, (5,))
    src = GradientSource(model, all_param_names(model), False)
    kron = KronProjection(src, 24, 0, torch.device("cpu"), (x, y))
    assert kron.uncovered == ("grouped.weight", "grouped.bias", "gain.scale")
    exact = compute_features(src, x, y).phi
    feats = compute_features(src, x, y, kron).phi
    assert torch.allclose(feats, exact @ _explicit_kron_matrix(model, kron), atol=1e-5, rtol=1e-4)


def test_kron_store_keys_change_only_for_models_with_newly_covered_layers():
    """Features of MLPs are as they were (no key entry); models with norms or position tables get KRON_COVER,
    unless their members differentiate only adapter weights (LoRA, adapter gradients)."""
    from tda_core.lora import with_adapter
    from tda_core.projections import KRON_COVER
    from tda_core.specs import EnsembleSpec

    def scheme(model: nn.Module) -> dict:
        return KronProjection.model_scheme(GradientSource(model, all_param_names(model), False))

    assert scheme(MLP(in_features=12, hidden=(9, 7), n_classes=4)) == {} == scheme(TinyConv()) == scheme(TinySeq())
    assert scheme(_resnet()) == {"kron_cover": KRON_COVER} == scheme(_music())
    assert scheme(with_adapter(_resnet(), EnsembleSpec("lora", lora_rank=2))) == {}


@pytest.mark.parametrize("name,model,x,y,sequence", _cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_hooked_gradient_rows_equal_the_autograd_loop(name, model, x, y, sequence):
    """The dense projection's per-sample gradients from one hooked forward/backward (the layer adapters) are the
    exact gradients, in several passes per chunk too, for every layer type the adapters cover."""
    src = GradientSource(model, all_param_names(model), sequence)
    rows = gradient_rows(src, torch.device("cpu"), torch.float32, (x, y))
    assert isinstance(rows, HookedGradients)
    rows.pass_rows = 3
    assert torch.allclose(rows(x, y, {})[0], _loop_grads(model, x, y, sequence), atol=1e-5, rtol=1e-4)


def test_hooked_gradient_rows_under_fixed_per_example_and_averaged_masks():
    from tda_core.models.dropout import fixed_masks, mask_shapes

    torch.manual_seed(0)
    model = _music()
    x, y = _seq_data()
    names = all_param_names(model)
    shapes = mask_shapes(model, x[:1])
    masks = [fixed_masks(shapes, dict.fromkeys(shapes, 0.5), seed) for seed in range(len(x))]
    per_example = {name: torch.stack([m[name] for m in masks]) for name in shapes}
    for src in (GradientSource(model, names, True, masks[0]), GradientSource(model, names, True, per_example, True),
                GradientSource(model, names, True, average_masks=masks[:3])):
        rows = gradient_rows(src, torch.device("cpu"), torch.float32, (x, y))
        assert isinstance(rows, HookedGradients)
        rows.pass_rows = 2
        chunk = src.masks_for(slice(0, len(x)), torch.device("cpu"))
        assert torch.allclose(rows(x, y, chunk)[0], per_sample_gradients(src, torch.device("cpu"))(x, y, chunk)[0],
                              atol=1e-5, rtol=1e-4)


class TiedHead(nn.Module):
    """A Linear whose weight is also used outside its own call (tied to the output): hooks alone miss that use."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x) @ self.mix.weight


@pytest.mark.parametrize("model", [PartlyCovered(), TiedHead()], ids=["uncovered", "tied"])
def test_gradient_rows_fall_back_to_vmap_where_hooks_would_miss_a_gradient(model):
    torch.manual_seed(0)
    x = torch.randn(5, 2, 4, 4) if isinstance(model, PartlyCovered) else torch.randn(5, 6)
    y = torch.randint(0, 3, (5,))
    src = GradientSource(model.eval(), all_param_names(model), False)
    rows = gradient_rows(src, torch.device("cpu"), torch.float32, (x, y))
    assert not isinstance(rows, HookedGradients)
    assert torch.allclose(rows(x, y, {})[0], _loop_grads(model, x, y, False), atol=1e-5, rtol=1e-4)
