"""The conditioned latent UNet: shapes, text conditioning, checkpointing, presets and a toy fit."""

from dataclasses import asdict

import pytest
import torch

from pipeline.conditioning import Conditioning
from pipeline.diffusion import NoiseSchedule, ScheduleConfig, training_loss
from pipeline.models.unet import UNET_PRESETS, UNet, UNetConfig, build_unet, unet_config
from pipeline.tiny_models import SMALL_UNET as SMALL
from pipeline.tiny_models import perturbed as randomized
from pipeline.tiny_models import random_conditioning

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def text(batch, real_tokens=3, pooled_dim=0, dtype=torch.float32, **kwargs) -> Conditioning:
    """`batch` rows of 6 tokens of width 8, `real_tokens` of them real."""
    return random_conditioning([real_tokens] * batch, pooled_dim=pooled_dim, dtype=dtype, **kwargs)


@pytest.mark.parametrize("height,width", [(8, 8), (16, 16), (8, 16)])
def test_tiny_preset_keeps_the_latent_shape(height, width):
    model = build_unet("tiny", context_dim=16)
    x = torch.randn(2, 4, height, width)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]), text(2, dim=16))
    assert out.shape == x.shape


def test_tiny_preset_is_cpu_sized():
    params = sum(p.numel() for p in build_unet("tiny").parameters())
    assert 500_000 <= params <= 3_000_000


def test_latent_sides_must_be_multiples_of_the_downsampling():
    model = build_unet("tiny", channel_mult=[1, 2, 2])  # 3 levels: sides must be multiples of 4
    with pytest.raises(ValueError, match="multiple of 4"):
        model(torch.randn(1, 4, 6, 6), torch.tensor([1]), text(1, dim=64))


def test_padding_mask_masks():
    """Padded token embeddings cannot change the output; real ones do."""
    model = randomized(UNet(UNetConfig(**SMALL))).double().eval()
    x = torch.randn(2, 4, 8, 8, dtype=F64)
    t = torch.tensor([10, 700])
    cond = text(2, real_tokens=3, dtype=F64)
    padded_changed = Conditioning(cond.tokens.clone(), cond.mask, cond.pooled)
    padded_changed.tokens[:, 3:] = 100 * torch.randn(2, 3, 8, dtype=F64)
    real_changed = Conditioning(cond.tokens.clone(), cond.mask, cond.pooled)
    real_changed.tokens[:, 1] += 1.0
    with torch.no_grad():
        out = model(x, t, cond)
        torch.testing.assert_close(model(x, t, padded_changed), out, rtol=0, atol=1e-12)
        assert (model(x, t, real_changed) - out).abs().max() > 1e-3


def test_a_condition_without_real_tokens_gives_a_finite_output():
    model = randomized(UNet(UNetConfig(**SMALL))).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), text(2, real_tokens=0))
    assert torch.isfinite(out).all()


def test_pooled_embedding_conditions_the_output():
    model = randomized(UNet(UNetConfig(**SMALL, pooled_dim=5))).eval()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    cond = text(1, pooled_dim=5)
    other = Conditioning(cond.tokens, cond.mask, cond.pooled + 1.0)
    with torch.no_grad():
        assert (model(x, t, cond) - model(x, t, other)).abs().max() > 1e-3


def test_untrained_model_predicts_zero():
    """The zero-initialised output conv: the first loss is E[eps^2] = 1, a stable start."""
    model = UNet(UNetConfig(**SMALL))
    with torch.no_grad():
        assert torch.equal(model(torch.randn(1, 4, 8, 8), torch.tensor([5]), text(1)), torch.zeros(1, 4, 8, 8))


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = randomized(UNet(UNetConfig(**SMALL, dropout=0.1))).double()
    checkpointed = UNet(UNetConfig(**SMALL, dropout=0.1, gradient_checkpointing=True)).double()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 8, 8, dtype=F64)
    t = torch.tensor([3, 600])
    cond = text(2, dtype=F64)
    grads, saved = [], []
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(1)  # the same dropout masks (checkpoint replays the RNG state on recompute)
        count = [0]

        def pack(tensor, count=count):
            count[0] += 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = model(x, t, cond)
        out.pow(2).sum().backward()
        saved.append(count[0])
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert saved[1] < saved[0] / 2, f"checkpointing should keep fewer activations: {saved}"
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_unfused_paths_read_each_weight_only_inside_its_own_module(monkeypatch):
    """What ZeRO-3 needs: a parameter is whole only while its owning module runs. Emulated with
    hooks that empty every weight outside its module's call; the unfused UNet computes the same
    function as the fused one under them, the fused one cannot."""
    fused = randomized(UNet(UNetConfig(**SMALL))).double().eval()
    unfused = UNet(UNetConfig(**SMALL)).double().eval().use_fused_paths(False)
    unfused.load_state_dict(fused.state_dict())
    x, t, cond = torch.randn(2, 4, 16, 16, dtype=F64), torch.tensor([3, 600]), text(2, dtype=F64)
    with torch.no_grad():
        expected = fused(x, t, cond)
        stored = {}

        def gather(module, args):
            module.weight.data = stored[module]

        def release(module, args, out):
            module.weight.data = torch.empty(0, dtype=F64)

        for model in (fused, unfused):
            for module in model.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    stored[module] = module.weight.data
                    release(module, None, None)
                    module.register_forward_pre_hook(gather)
                    module.register_forward_hook(release)
        torch.testing.assert_close(unfused(x, t, cond), expected, rtol=1e-9, atol=1e-12)
        bound = unfused.bind(cond)
        unfused.traces.after_calls = 0
        torch.testing.assert_close(bound(x, t), expected, rtol=1e-9, atol=1e-12)
        assert not unfused.traces.traces  # nothing traced: a trace would read weights outside their modules
        with pytest.raises(RuntimeError):
            fused(x, t, cond)


def test_loss_falls_on_a_toy_problem():
    """Two captions, each always showing its own latent: 40 steps take the eps loss well below 1."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(**SMALL))
    schedule = NoiseSchedule(ScheduleConfig())
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen).sign()
    tokens = torch.randn(2, 4, 8, generator=gen)
    mask = torch.tensor([[True, True, False, False]] * 2)

    def batch(labels):
        return latents[labels], Conditioning(tokens[labels], mask[labels], torch.zeros(len(labels), 0))

    def eval_loss():
        model.eval()
        with torch.no_grad():
            x0, cond = batch(torch.arange(64) % 2)
            loss = training_loss(model, schedule, x0, cond, generator=torch.Generator().manual_seed(123))
        model.train()
        return loss.item()

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = eval_loss()
    for _ in range(40):
        x0, cond = batch(torch.randint(0, 2, (8,), generator=gen))
        loss = training_loss(model, schedule, x0, cond, generator=gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert before == pytest.approx(1.0, abs=0.1)
    assert after < 0.6 * before


def test_config_round_trips_through_a_checkpoint_dict():
    model = UNet(UNetConfig(**SMALL, pooled_dim=5))
    rebuilt = UNet(UNetConfig(**asdict(model.config)))
    rebuilt.load_state_dict(model.state_dict(), strict=True)


def test_presets_build_and_unknown_names_raise():
    assert {"tiny", "medium", "sd"} <= set(UNET_PRESETS)
    with torch.device("meta"):  # shapes only: no memory for the 860M-parameter "sd"
        sd = build_unet("sd")
    assert 800e6 < sum(p.numel() for p in sd.parameters()) < 900e6
    assert unet_config("tiny", context_dim=512).context_dim == 512
    with pytest.raises(ValueError, match="'huge'"):
        build_unet("huge")
    with pytest.raises(ValueError, match="channel_multiplier"):
        build_unet("tiny", channel_multiplier=[1])


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"num_heads": 3}, "num_heads"),
        ({"attention_levels": [5]}, "attention_levels"),
        ({"channel_mult": []}, "channel_mult"),
        ({"norm_groups": 7}, "norm_groups"),
        ({"dropout": 1.0}, "dropout"),
        ({"pooled_dim": -1}, "pooled_dim"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        UNetConfig(**{**SMALL, **overrides})


def test_configs_are_omegaconf_structured_configs():
    omegaconf = pytest.importorskip("omegaconf")
    conf = omegaconf.OmegaConf.merge(
        omegaconf.OmegaConf.structured(UNetConfig), omegaconf.OmegaConf.from_dotlist(["channel_mult=[1,2,4]"])
    )
    assert omegaconf.OmegaConf.to_object(conf).channel_mult == [1, 2, 4]
    schedule = omegaconf.OmegaConf.to_object(omegaconf.OmegaConf.structured(ScheduleConfig))
    assert isinstance(schedule, ScheduleConfig)
