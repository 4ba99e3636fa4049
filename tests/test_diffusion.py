"""Tests of the ``sd`` (generation) and ``ip2p`` (editing) decoders on tiny random diffusers models (CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from decoders.base import DECODERS, build_decoder
from decoders.diffusion import (
    InstructPix2PixDecoder,
    IP2PConfig,
    PromptMapper,
    SDConfig,
    StableDiffusionDecoder,
    drop_mask,
    ip2p_drop_masks,
)
from realformat import clip_tokenizer
from superlink import Route
from tiny_sizes import tiny_decoder_config

LLM = 48  # LLM width of the query states
K = 64  # query states per group


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded; one intra-op thread (on a shared 2-core machine two OpenMP threads made a training step 10x slower)."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blob_image(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random colour image (a few bright squares on a coloured background)."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = rng.integers(0, 255, size=3)
    for _ in range(3):
        x, y = rng.integers(0, width - 8), rng.integers(0, height - 8)
        pixels[y : y + 8, x : x + 8] = rng.integers(0, 255, size=3)
    return Image.fromarray(pixels)


def one_group(batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 1, K, LLM), torch.ones(batch, 1, dtype=torch.bool)


def mean_eval_loss(decoder, queries, mask, inputs, seeds=range(6)) -> float:
    """Denoising loss averaged over fixed (noise, timestep) draws, no conditioning dropout."""
    decoder.eval()
    with torch.no_grad():
        losses = [
            decoder(queries, mask, {**inputs, "generator": torch.Generator().manual_seed(seed)}).loss_dict[
                "loss_diffusion"
            ]
            for seed in seeds
        ]
    decoder.train()
    return float(torch.stack(losses).mean())


def undropped(name: str, **overrides) -> torch.nn.Module:
    """A tiny ``name`` decoder with every conditioning dropout off (and ``overrides``)."""
    no_drop = ("cfg_drop_prob",) if name == "sd" else ("text_drop_prob", "image_drop_prob", "both_drop_prob")
    return build_decoder(name, tiny_decoder_config(name, **overrides, **dict.fromkeys(no_drop, 0.0)), LLM)


def overfit(decoder, inputs, steps: int = 25) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Train the decoder and one group of query states on ``inputs``; returns the mean eval loss before and after,
    the trained query states and their mask."""
    queries, mask = one_group()
    queries = torch.nn.Parameter(queries)
    optimizer = torch.optim.AdamW([queries, *decoder.parameters()], lr=2e-3, weight_decay=0.0)
    before = mean_eval_loss(decoder, queries, mask, inputs)
    for _ in range(steps):
        loss = decoder(queries, mask, inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, mean_eval_loss(decoder, queries, mask, inputs), queries.detach(), mask


# ----------------------------------------------------------------------------------------------- structure


def test_registered_and_official_parameter_names() -> None:
    assert DECODERS["sd"] is StableDiffusionDecoder and DECODERS["ip2p"] is InstructPix2PixDecoder
    sd = build_decoder("sd", tiny_decoder_config("sd", null_prompt="empty"), LLM)
    names = {name for name, _ in sd.named_parameters()}
    for key in (
        "emb_proj.0.weight",
        "emb_proj.2.weight",
        "llm2sd_mapper_queries",
        "llm2sd_mapper.encoder.layers.0.self_attn.in_proj_weight",
        "llm2sd_mapper.encoder.norm.weight",
        "llm2sd_mapper.decoder.layers.0.multihead_attn.in_proj_weight",
        "llm2sd_mapper.decoder.norm.weight",
        "sd_unet.conv_in.weight",
        "sd_vae.encoder.conv_in.weight",
        "sd_text_encoder.embeddings.token_embedding.weight",
    ):
        assert key in names, key
    assert not any(name.startswith("null_prompt") for name in names)  # official layout with null_prompt="empty"
    assert sd.llm2sd_mapper_queries.shape == (1, 77, 32)
    assert sd.llm2sd_mapper.encoder.layers[0].norm_first and len(sd.llm2sd_mapper.decoder.layers) == 1
    ip2p = build_decoder("ip2p", tiny_decoder_config("ip2p", mapper_encoder_layers=2, mapper_decoder_layers=3), LLM)
    assert ip2p.sd_unet.config.in_channels == 8 and sd.sd_unet.config.in_channels == 4
    assert len(ip2p.llm2sd_mapper.encoder.layers) == 2 and len(ip2p.llm2sd_mapper.decoder.layers) == 3
    assert "null_prompt_embeds" in dict(ip2p.named_parameters())


def test_mapper_maps_each_group_independently() -> None:
    mapper = PromptMapper(LLM, 32, num_prompt_tokens=77, num_heads=4, ffn_dim=64)
    queries = torch.randn(3, K, LLM)
    out = mapper.map_queries(queries)
    assert out.shape == (3, 77, 32)
    torch.testing.assert_close(mapper.map_queries(queries[1:2]), out[1:2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0], out[1])


def test_bad_config_and_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="SDConfig.cfg_drop_prob"):
        SDConfig(cfg_drop_prob=1.5)
    with pytest.raises(ValueError, match="IP2PConfig.text_drop_prob"):
        IP2PConfig(text_drop_prob=0.5, image_drop_prob=0.4, both_drop_prob=0.2)
    with pytest.raises(ValueError, match="null_prompt"):
        tiny_decoder_config("sd", null_prompt="zeros")
    with pytest.raises(ValueError, match="IP2PConfig.noise_samples"):
        tiny_decoder_config("ip2p", noise_samples=0)
    with pytest.raises(ValueError, match="SDConfig.snr_gamma"):
        tiny_decoder_config("sd", snr_gamma=0.0)
    sd = StableDiffusionDecoder(tiny_decoder_config("sd"), LLM)
    with pytest.raises(ValueError, match=r"sd: queries must be \[B, G, K, C\]"):
        sd(torch.randn(1, K, LLM), torch.ones(1, 1, dtype=torch.bool), {})
    with pytest.raises(TypeError, match="sd target 0 'image'"):
        sd.prepare([None], [{"caption": "x"}])
    with pytest.raises(ValueError, match="unknown options"):
        sd.predict(*one_group(), {}, steps=3)


@pytest.mark.parametrize("name", ["sd", "ip2p"])
def test_k_comes_from_the_routes_it_is_bound_to(name: str) -> None:
    """The decoder has no K of its own: any K until the model binds its routes, then the routes' ``num_embs``."""
    decoder = build_decoder(name, tiny_decoder_config(name), LLM).eval()
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert decoder.num_embs is None
    assert decoder.group_prompts(torch.randn(1, 1, 3, LLM), mask)[0].shape[0] == 1
    decoder.bind_routes({7: Route("[X]", name, num_embs=5, table="x")}, {})
    assert decoder.num_embs == 5
    assert decoder.group_prompts(torch.randn(1, 1, 5, LLM), mask)[0].shape[0] == 1
    with pytest.raises(ValueError, match=rf"{name}: queries must be \[B, G, 5, C\] \(K = its routes' num_embs\)"):
        decoder.group_prompts(torch.randn(1, 1, 3, LLM), mask)


# ----------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", ["sd", "ip2p"])
def test_overfits_one_pair(name: str) -> None:
    """The denoising loss on one (query states -> image) pair falls by half.

    The tiny UNet is random, so it is trained here (``train_unet=True``); the loss is measured on fixed
    (noise, timestep) draws before and after.
    """
    decoder = undropped(name, train_unet=True)
    inputs = decoder.prepare([blob_image(40, 36, 1)], [{"image": blob_image(40, 36, 2)}])
    before, after, _, _ = overfit(decoder, inputs)
    assert after <= 0.5 * before, (before, after)


@pytest.mark.parametrize("name", ["sd", "ip2p"])
def test_both_losses_reach_query_states_and_mapper(name: str) -> None:
    """ε-loss through the frozen UNet and the alignment loss both give gradients to the query table and mapper."""
    no_drop = ("cfg_drop_prob",) if name == "sd" else ("text_drop_prob", "image_drop_prob", "both_drop_prob")
    config = tiny_decoder_config(name, train_unet=False, align_loss_weight=0.1, **dict.fromkeys(no_drop, 0.0))
    decoder = build_decoder(name, config, LLM)
    decoder.set_tokenizer(clip_tokenizer())
    table = torch.nn.Parameter(torch.randn(2, 1, K, LLM))  # stands for the LLM's gen/edit query table
    mask = torch.ones(2, 1, dtype=torch.bool)
    targets = [
        {"image": blob_image(32, 32, 3), "caption": "a red square"},
        {"image": blob_image(48, 40, 4), "caption": None},
    ]
    inputs = decoder.prepare([blob_image(32, 32, 5), blob_image(30, 50, 6)], targets)
    out = decoder(table, mask, inputs)
    assert set(out.loss_dict) == {"loss_diffusion", "loss_align"}
    torch.testing.assert_close(out.loss, out.loss_dict["loss_diffusion"] + out.loss_dict["loss_align"])
    mapper_params = [
        decoder.emb_proj[0].weight,
        decoder.llm2sd_mapper_queries,
        decoder.llm2sd_mapper.encoder.layers[0].linear1.weight,
    ]
    for key in ("loss_diffusion", "loss_align"):
        grads = torch.autograd.grad(out.loss_dict[key], [table, *mapper_params], retain_graph=True)
        assert all(g is not None and g.abs().sum() > 0 for g in grads), key
        if key == "loss_align":  # only the captioned sample is aligned
            assert grads[0][1].abs().sum() == 0 and grads[0][0].abs().sum() > 0
    assert not any(p.requires_grad for p in decoder.sd_unet.parameters())
    assert not any(p.requires_grad for p in decoder.sd_vae.parameters())
    assert not any(p.requires_grad for p in decoder.sd_text_encoder.parameters())


def test_alignment_loss_without_a_tokenizer_is_an_error_unless_turned_off() -> None:
    """Captions with the alignment loss on but no text-encoder tokenizer: a clear error, not a silently missing term;
    ``align_loss_weight: 0`` trains on the diffusion loss alone."""
    queries, mask = torch.randn(1, 1, K, LLM), torch.ones(1, 1, dtype=torch.bool)
    targets = [{"image": blob_image(32, 32, 3), "caption": "a red square"}]
    decoder = build_decoder("sd", tiny_decoder_config("sd", align_loss_weight=0.5), LLM)
    with pytest.raises(ValueError, match="sd: the alignment loss needs the text encoder's tokenizer.*"
                                         "sd.align_loss_weight: 0"):
        decoder(queries, mask, decoder.prepare([None], targets))
    off = build_decoder("sd", tiny_decoder_config("sd", align_loss_weight=0.0), LLM)
    assert set(off(queries, mask, off.prepare([None], targets)).loss_dict) == {"loss_diffusion"}


def test_warns_once_when_captions_are_cut_from_the_alignment_target(caplog) -> None:
    """A caption longer than ``num_prompt_tokens`` loses its end in the alignment target: one warning naming it."""
    decoder = undropped("ip2p", num_prompt_tokens=8, align_loss_weight=0.1)
    decoder.set_tokenizer(clip_tokenizer())
    queries, mask = one_group()

    def align(caption: str) -> None:
        inputs = decoder.prepare([blob_image(32, 32, 1)], [{"image": blob_image(32, 32, 2), "caption": caption}])
        decoder(queries, mask, inputs)

    with caplog.at_level("WARNING", logger="decoders.diffusion.common"):
        align("red")  # BOS + 3 characters + EOS = 5 tokens
        assert not caplog.records
        align("make it blue")  # 12 tokens
        align("make it green")
    assert [r.getMessage() for r in caplog.records] == [
        "ip2p: a caption of 12 tokens is cut to num_prompt_tokens=8 in the alignment target; raise "
        "ip2p.num_prompt_tokens to keep whole captions"
    ]


def test_masked_groups_are_skipped_and_targets_follow_samples() -> None:
    """Only valid groups are decoded; sample 1's two groups both use sample 1's target."""
    sd = StableDiffusionDecoder(tiny_decoder_config("sd"), LLM).eval()
    queries = torch.randn(2, 2, K, LLM)
    mask = torch.tensor([[True, False], [True, True]])
    inputs = sd.prepare([None, None], [{"image": blob_image(32, 32, 7)}, {"image": blob_image(32, 32, 8)}])
    prompts, sample_index = sd.group_prompts(queries, mask)
    assert sample_index.tolist() == [0, 1, 1]
    torch.testing.assert_close(prompts[2], sd.map_queries(queries[1, 1:2])[0], atol=1e-5, rtol=1e-5)
    out = sd(queries, mask, inputs)
    assert out.preds.shape == (3, 77, 32) and torch.isfinite(out.loss)
    assert sd(queries, torch.zeros(2, 2, dtype=torch.bool), inputs).loss.item() == 0.0
    assert sd(queries, mask, {}).loss is None


# ----------------------------------------------------------------------------------------------- dropout


def test_drop_masks_have_the_configured_rates() -> None:
    n, p = 200_000, 0.1
    tolerance = 5 * math.sqrt(p * (1 - p) / n)
    rate = drop_mask(n, p, torch.Generator().manual_seed(1)).float().mean().item()
    assert abs(rate - p) < tolerance
    assert not drop_mask(1000, 0.0).any() and drop_mask(1000, 1.0).all()
    drop_text, drop_image = ip2p_drop_masks(n, 0.05, 0.1, 0.05, torch.Generator().manual_seed(2))
    for event, expected in (
        (drop_text & ~drop_image, 0.05),
        (drop_text & drop_image, 0.05),
        (~drop_text & drop_image, 0.1),
    ):
        assert abs(event.float().mean().item() - expected) < 5 * math.sqrt(expected * (1 - expected) / n)


@pytest.mark.parametrize("name", ["sd", "ip2p"])
def test_decoder_drops_conditions_at_the_configured_rate(name: str, monkeypatch) -> None:
    """Inside ``forward``, prompts (and ip2p images) are replaced at exactly the configured rate, only in training."""
    if name == "sd":
        decoder = StableDiffusionDecoder(tiny_decoder_config("sd", cfg_drop_prob=0.3), LLM)
        expected_text, expected_image = 0.3, None
    else:
        config = tiny_decoder_config("ip2p", text_drop_prob=0.1, image_drop_prob=0.2, both_drop_prob=0.05)
        decoder = InstructPix2PixDecoder(config, LLM)
        expected_text, expected_image = 0.15, 0.25
    seen = {}

    def capture(latents, prompts, image_latents=None, generator=None):
        seen["prompts"], seen["image_latents"] = prompts, image_latents
        return prompts.sum() * 0.0

    monkeypatch.setattr(decoder, "denoising_loss", capture)
    with torch.no_grad():
        decoder.null_prompt_embeds.fill_(7.0)
    n = 1000  # one sample with n groups: one VAE encode, n prompts
    queries, mask = torch.randn(1, n, K, LLM) * 0.1, torch.ones(1, n, dtype=torch.bool)
    inputs = decoder.prepare([blob_image(32, 32, 9)], [{"image": blob_image(32, 32, 10)}])
    with torch.no_grad():
        decoder(queries, mask, {**inputs, "generator": torch.Generator().manual_seed(3)})
        dropped_text = (seen["prompts"] == 7.0).all(dim=(1, 2))
        tolerance = 5 * math.sqrt(0.25 / n)
        assert abs(dropped_text.float().mean().item() - expected_text) < tolerance
        if expected_image is not None:
            dropped_image = (seen["image_latents"] == 0).all(dim=(1, 2, 3))
            assert abs(dropped_image.float().mean().item() - expected_image) < tolerance
        decoder.eval()
        decoder(queries[:, :50], mask[:, :50], inputs)
        assert not (seen["prompts"] == 7.0).all(dim=(1, 2)).any()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting_scales_each_samples_loss_by_its_timesteps_weight(prediction_type) -> None:
    """With ``snr_gamma`` a one-sample loss is the plain loss (same noise and timestep) times min(SNR, gamma) / SNR
    (epsilon) or / (SNR + 1) (v), SNR = alpha_bar / (1 - alpha_bar) from the schedule's betas."""
    gamma = 1.0
    plain = StableDiffusionDecoder(tiny_decoder_config("sd", prediction_type=prediction_type), LLM).eval()
    weighted = StableDiffusionDecoder(tiny_decoder_config("sd", prediction_type=prediction_type, snr_gamma=gamma),
                                      LLM).eval()
    weighted.load_state_dict(plain.state_dict())
    alpha_bar = torch.cumprod(1 - plain.sd_noise_scheduler.betas.double(), 0)  # [T]
    latents, prompts = torch.randn(1, 4, 16, 16), torch.randn(1, 8, 32)  # [1, c, h, w], [1, T, C]
    snrs = []
    for seed in range(12):
        draw = torch.Generator().manual_seed(seed)  # the loss draws the noise, then the timestep
        torch.randn(latents.shape, generator=draw)
        t = int(torch.randint(0, len(alpha_bar), (1,), generator=draw))
        snr = (alpha_bar[t] / (1 - alpha_bar[t])).item()
        weight = min(snr, gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
        with torch.no_grad():
            expected = weight * plain.denoising_loss(latents, prompts, generator=torch.Generator().manual_seed(seed))
            got = weighted.denoising_loss(latents, prompts, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
        snrs.append(snr)
    assert min(snrs) < gamma < max(snrs)  # both sides of the clamp were checked


def test_noise_samples_denoise_each_group_several_times(monkeypatch) -> None:
    """With ``noise_samples=3`` every group's target, prompt and input image enter the diffusion loss three times,
    consecutively."""
    config = tiny_decoder_config("ip2p", noise_samples=3, text_drop_prob=0.0, image_drop_prob=0.0, both_drop_prob=0.0,
                                 vae_type="pixel", vae_latent_channels=3, vae_scaling_factor=1.0)  # exact latents
    decoder = InstructPix2PixDecoder(config, LLM)
    seen = {}

    def capture(latents, prompts, image_latents=None, generator=None):
        seen.update(latents=latents, prompts=prompts, image_latents=image_latents)
        return prompts.sum() * 0.0

    monkeypatch.setattr(decoder, "denoising_loss", capture)
    queries, mask = torch.randn(2, 2, K, LLM), torch.tensor([[True, True], [False, True]])
    images, targets = [blob_image(32, 32, 1), blob_image(32, 32, 2)], [blob_image(32, 32, 3), blob_image(32, 32, 4)]
    inputs = decoder.prepare(images, [{"image": t} for t in targets])
    with torch.no_grad():
        decoder(queries, mask, inputs)
        prompts, sample_index = decoder.group_prompts(queries, mask)  # [3, T, C], [3]
        latents = decoder.encode_latents(inputs["target_pixels"], sample=True)  # [2, c, h, w]
        image_latents = decoder.encode_latents(inputs["input_pixels"], sample=False)  # [2, c, h, w]
    assert sample_index.tolist() == [0, 0, 1] and seen["latents"].shape[0] == 9
    torch.testing.assert_close(seen["prompts"], prompts.repeat_interleave(3, 0))
    torch.testing.assert_close(seen["latents"], latents[[0] * 6 + [1] * 3])
    torch.testing.assert_close(seen["image_latents"], image_latents[[0] * 6 + [1] * 3])


# ----------------------------------------------------------------------------------------------- inference


def test_generation_size_determinism_and_batching() -> None:
    sd = StableDiffusionDecoder(tiny_decoder_config("sd"), LLM).eval()
    queries = torch.randn(3, 1, K, LLM)
    mask = torch.tensor([[True], [False], [True]])
    first = sd.predict(queries, mask, sd.prepare([None] * 3), height=32, width=48, seed=5)
    assert first[1] is None
    assert all(isinstance(image, Image.Image) and image.size == (48, 32) for image in (first[0], first[2]))
    again = sd.predict(queries, mask, {}, height=32, width=48, seed=5)
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0]))
    other_seed = sd.predict(queries[:1], mask[:1], {}, height=32, width=48, seed=6)[0]
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other_seed))
    alone = sd.predict(queries[2:], mask[2:], {}, height=32, width=48, seed=5)[0]
    assert np.abs(np.asarray(alone, dtype=int) - np.asarray(first[2], dtype=int)).max() <= 1
    default = sd.predict(queries[:1], mask[:1], {}, guidance_scale=1.0, scheduler="ddim")[0]
    assert default.size == (32, 32)


def test_editing_returns_images_of_the_input_size() -> None:
    ip2p = InstructPix2PixDecoder(tiny_decoder_config("ip2p"), LLM).eval()
    images = [blob_image(40, 28, 11), blob_image(24, 36, 12)]
    queries, mask = one_group(2)
    inputs = ip2p.prepare(images)
    edited = ip2p.predict(queries, mask, inputs, seed=1)
    assert [image.size for image in edited] == [(40, 28), (24, 36)]
    again = ip2p.predict(queries, mask, inputs, seed=1)
    assert np.array_equal(np.asarray(edited[0]), np.asarray(again[0]))
    with pytest.raises(ValueError, match="input_pixels"):
        ip2p.predict(queries, mask, {})


@pytest.mark.parametrize("name", ["sd", "ip2p"])
def test_pixel_space_diffusion(name: str) -> None:
    """``vae_type="pixel"``: latents are the pixels, the pipelines run at scale 1, and the UNet learns on pixels."""
    from decoders.diffusion.components import PixelSpace

    decoder = undropped(name, vae_type="pixel", vae_latent_channels=3, vae_scaling_factor=1.0, train_unet=True,
                        resolution=16)
    assert isinstance(decoder.sd_vae, PixelSpace) and not list(decoder.sd_vae.parameters())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(decoder.encode_latents(x, sample=True), x)
    assert torch.equal(decoder.sd_vae.decode(x).sample, x)
    inputs = decoder.prepare([blob_image(16, 16, 1)], [{"image": blob_image(16, 16, 2)}])
    before, after, queries, mask = overfit(decoder, inputs)
    assert after <= 0.5 * before
    decoder.eval()
    image = decoder.predict(queries, mask, decoder.prepare([blob_image(16, 16, 1)]), num_inference_steps=2)[0]
    assert image.size == (16, 16)
    with pytest.raises(ValueError, match="vae_type"):
        tiny_decoder_config(name, vae_type="pixel")  # 4 latent channels
    with pytest.raises(ValueError, match="vae_type"):
        tiny_decoder_config(name, vae_type="latent")


# ----------------------------------------------------------------------------------------------- loading


def save_components(decoder, root) -> None:
    decoder.sd_unet.save_pretrained(root / "unet")
    decoder.sd_vae.save_pretrained(root / "vae")
    decoder.make_scheduler("pndm").save_pretrained(root / "scheduler")
    decoder.sd_text_encoder.save_pretrained(root / "text_encoder")
    weights = {f"text_model.{k}": v.contiguous() for k, v in decoder.sd_text_encoder.state_dict().items()}
    save_file(weights, root / "text_encoder" / "model.safetensors", metadata={"format": "pt"})  # SD v1.5 key layout
    clip_tokenizer().save_pretrained(root / "tokenizer")


def test_load_pretrained_from_a_local_folder(tmp_path) -> None:
    source = StableDiffusionDecoder(tiny_decoder_config("sd", num_train_timesteps=500, beta_end=0.02), LLM)
    save_components(source, tmp_path)  # a schedule other than the config's default, so loading it shows
    torch.manual_seed(1)
    target = StableDiffusionDecoder(tiny_decoder_config("sd", null_prompt="empty", pretrained_path=str(tmp_path)), LLM)
    assert not torch.equal(target.sd_unet.conv_in.weight, source.sd_unet.conv_in.weight)
    assert target.sd_noise_scheduler.config.num_train_timesteps == 1000
    target.load_pretrained()
    for module in ("sd_unet", "sd_vae", "sd_text_encoder"):
        loaded = getattr(target, module).state_dict()
        for key, value in getattr(source, module).state_dict().items():
            assert torch.equal(value, loaded[key]), f"{module}.{key}"
    schedule = target.sd_noise_scheduler.config
    assert (schedule.num_train_timesteps, schedule.beta_end) == (500, 0.02)
    empty_ids = target.sd_tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    empty = target.sd_text_encoder(empty_ids)
    torch.testing.assert_close(target.null_prompt(2), empty.last_hidden_state.expand(2, -1, -1))
    learned = StableDiffusionDecoder(tiny_decoder_config("sd", null_prompt="learned"), LLM)
    learned.load_pretrained(str(tmp_path))
    torch.testing.assert_close(learned.null_prompt_embeds.data, empty.last_hidden_state)


def test_load_pretrained_errors_name_the_path(tmp_path) -> None:
    sd = StableDiffusionDecoder(tiny_decoder_config("sd"), LLM)
    missing = tmp_path / "no-such-folder"
    with pytest.raises(FileNotFoundError, match="sd.pretrained_path.*no-such-folder"):
        sd.load_pretrained(str(missing))
    save_components(sd, tmp_path)
    wider = StableDiffusionDecoder(tiny_decoder_config("sd", unet_block_out_channels=(32, 32)), LLM)
    with pytest.raises(ValueError, match="unet"):
        wider.load_pretrained(str(tmp_path))
    (tmp_path / "vae" / "config.json").rename(tmp_path / "vae.json")
    for child in (tmp_path / "vae").iterdir():
        child.unlink()
    (tmp_path / "vae").rmdir()
    with pytest.raises(FileNotFoundError, match="'vae'"):
        sd.load_pretrained(str(tmp_path))
    with pytest.raises(RuntimeError, match="tokenizer"):
        StableDiffusionDecoder(tiny_decoder_config("sd", null_prompt="empty"), LLM).null_prompt(1)
