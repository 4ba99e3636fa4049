"""Stage 0 of the diffusion decoders (``vllm2 decoder pretrain``): the UNet learns alone on the text encoder's
embeddings of the captions, and the diffusers folder it writes is what ``decoders.<name>.pretrained_path`` loads,
exactly; ``save_pretrained`` round-trips a folder written by diffusers itself."""

from __future__ import annotations

import json

import pytest
import torch

from decoders import build_decoder
from vllm2 import build_model, load_config, shapes
from vllm2.cli import main
from vllm2.decoder_pretrain import _build, decoder_data, pretrain_diffusion

LLM = 64


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    shapes.write_dataset(root, n=8, seed=3, size=64, gen_size=32)
    return root


def _cfg(world, *more: str):
    """The tiny config on the shapes world; ``ip2p`` encodes instructions with the LLM's tokenizer."""
    return load_config("tiny", [
        f"data.root={world}",
        "data.datasets=[{type: edit, path: edit.jsonl}, {type: t2i, path: t2i.jsonl}, {type: llava, path: vqa.json}]",
        "decoders.ip2p.text_tokenizer=llm", "decoders.ip2p.text_encoder_vocab_size=640",
        "decoders.ip2p.align_loss_weight=1.0", *more,
    ])


def _fixed_batch_loss(decoder, samples) -> float:
    """The denoising loss of every edit of the world with its own instruction, fixed noise and timesteps."""
    targets = [s.targets["ip2p"] for s in samples]
    inputs = decoder.prepare([s.images[0] for s in samples], targets)
    inputs["generator"] = torch.Generator().manual_seed(7)
    prompts = decoder.caption_prompts([t["caption"] for t in targets])
    decoder.eval()  # no conditioning dropout
    with torch.no_grad():
        return decoder.diffusion_loss(prompts, torch.arange(len(samples)), inputs).item()


@pytest.fixture(scope="module")
def pretrained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ip2p")
    summary = pretrain_diffusion(_cfg(world), "ip2p", out, steps=60, batch_size=8, lr=3e-3)
    return out, summary


def test_pretraining_fits_the_edits_of_its_tasks_only(world, pretrained):
    out, summary = pretrained
    cfg = _cfg(world)
    from vllm2.data import build_mixture

    data = build_mixture(decoder_data(cfg, "ip2p"), cfg.route_table())
    assert [d.task for d in data.datasets] == ["edit"] and summary["samples"] == 8  # not the t2i or VQA items
    samples = [data[i] for i in range(len(data))]
    torch.manual_seed(cfg.training.seed)
    before = _fixed_batch_loss(_build(cfg, "ip2p"), samples)  # the same initial weights the run started from
    after = _fixed_batch_loss(_build(_cfg(world, f"decoders.ip2p.pretrained_path={out}"), "ip2p"), samples)
    assert after < 0.5 * before
    assert json.loads((out / "stage0.json").read_text()) == summary


def test_the_model_loads_the_folder_exactly(world, pretrained):
    out, _ = pretrained
    cfg = _cfg(world, f"decoders.ip2p.pretrained_path={out}")
    model = build_model(cfg)
    model.load_pretrained_components()
    reference = _build(_cfg(world), "ip2p")
    reference.load_pretrained(str(out))
    for part in ("sd_unet", "sd_text_encoder"):
        theirs = getattr(reference, part).state_dict()
        for key, value in getattr(model.ip2p, part).state_dict().items():
            torch.testing.assert_close(value, theirs[key], rtol=0, atol=0)
    instruction = "make the circle red"
    torch.testing.assert_close(model.ip2p.caption_prompts([instruction]), reference.caption_prompts([instruction]))
    # the null prompt is the empty caption's embedding, the one the UNet was trained with
    torch.testing.assert_close(model.ip2p.null_prompt_embeds.data, reference.caption_prompts([""]), rtol=0, atol=0)


def test_save_pretrained_round_trips_a_diffusers_folder(real_folders, tmp_path):
    journey = load_config("tests/data/journey.yaml")
    for name, folder in (("sd", real_folders.sd), ("ip2p", real_folders.ip2p)):
        first = build_decoder(name, journey.decoders[name], LLM)
        first.load_pretrained(str(folder))
        first.save_pretrained(tmp_path / name)
        second = build_decoder(name, journey.decoders[name], LLM)
        second.load_pretrained(str(tmp_path / name))
        theirs = second.state_dict()
        for key, value in first.state_dict().items():
            if not key.startswith(("sd_unet.", "sd_vae.", "sd_text_encoder.", "null_prompt")):
                continue  # the mapper is the super link's, not the folder's
            torch.testing.assert_close(value, theirs[key], rtol=0, atol=0, msg=f"{name}: {key}")
        public = [{k: v for k, v in d.sd_noise_scheduler.config.items() if not k.startswith("_")}
                  for d in (first, second)]
        assert public[0] == public[1]
        assert second.sd_tokenizer.get_vocab() == first.sd_tokenizer.get_vocab()


def test_cli_errors_name_the_field(world, tmp_path, capsys):
    def run(decoder: str, *overrides: str) -> int:
        return main(["decoder", "pretrain", "--decoder", decoder, "--out", str(tmp_path / "x"), "-q", "--config",
                     "tiny", f"data.root={world}", *overrides])

    assert run("gdino") == 2
    assert "decoders.gdino" in capsys.readouterr().err
    assert run("sd", "data.datasets=[{type: llava, path: vqa.json}]") == 2
    err = capsys.readouterr().err
    assert "data.datasets" in err and "t2i" in err
    assert not (tmp_path / "x").exists()
