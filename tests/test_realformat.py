"""Real-format folders (``tests/realformat.py``: tiny random weights saved by the libraries themselves) through the
code a user's folders go through: every component holds the folder's tensors after loading, the special tokens take
the official ids, the staged journey runs through the CLI (stage 1 -> stage 2 with LoRA -> stage 3, ``chat``,
``bench det``, ``export --merge-lora``) with a Llama and, for the LLM half, with a Qwen2; wrong folders and
tokenizers are one clear error each."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoTokenizer, GroundingDinoForObjectDetection, PreTrainedTokenizerFast,
                          SwinForImageClassification)

from realformat import JOURNEY, SP_VOCAB, clip_tokenizer, folder_tensors
from superlink import RouteTable
from vllm2 import Sample, VisionLLMv2Model, VisionLLMv2Processor, build_model, load_config
from vllm2.cli.bench import main as bench_main
from vllm2.cli.chat import main as chat_main
from vllm2.cli.export import main as export_main
from vllm2.cli.train import main as train_main
from vllm2.images import load_image
from vllm2.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "data" / "examples"
IMAGE = EXAMPLES / "images" / "shapes_a.png"
# The official ids 32000-32025 (reference/visionllmv2-official.md), in order.
OFFICIAL = ["[PAD]", "<image>", "<im_patch>", "<region>", "<img>", "</img>", "<reg>", "</reg>", "<det>", "</det>",
            "<grd>", "</grd>", "[DET]", "[GRD]", "[SEG]", "[POSE]", "[GEN]", "[EDIT]", "[EMB]",
            *(f"[EMB{i}]" for i in range(2, 9))]
# transformers' mean_resizing draws each new row from N(mean, 1e-9 * covariance of the old rows): with rows of std
# 0.02 an entry strays about 6e-7 from the mean, a fresh random row about 0.02.
NEW_ROW_ATOL = 1e-5
ROWS = ("model.embed_tokens.weight", "lm_head.weight")
STAGE1_DATA = "data.datasets=[{type: llava, path: llava.json, image_root: images}]"  # the recipe's kind of data


def _mllm(real, llm: str = "llama") -> list[str]:
    """Overrides pointing the vision tower and the LLM at the real folders, the data at the examples."""
    return [f"vision.pretrained={real.clip}", f"llm.pretrained={getattr(real, llm)}", f"data.root={EXAMPLES}"]


def _decoders(real) -> list[str]:
    """Overrides pointing the four decoders at their real folders."""
    return [f"decoders.gdino.pretrained_path={real.gdino}", f"decoders.keypoint.backbone_pretrained={real.swin}",
            f"decoders.sd.pretrained_path={real.sd}", f"decoders.ip2p.pretrained_path={real.ip2p}"]


def _stage(tmp: Path, n: int) -> Path:
    """``configs/stages/stage{n}.yaml`` at the journey's sizes: the recipe, under ``configs/tiny.yaml``, under
    ``tests/data/journey.yaml`` (stage 1 keeps the recipe's "no decoders")."""
    base = REPO / "configs" / "stages" / f"stage{n}.yaml"
    for k, layer in enumerate([REPO / "configs" / "tiny.yaml", JOURNEY]):
        data = yaml.safe_load(layer.read_text())
        data.pop("base", None)
        if n == 1:
            data.pop("decoders", None)
        path = tmp / f"stage{n}-{k}.yaml"
        path.write_text(yaml.safe_dump({"base": str(base), **data}))
        base = path
    return base


def _batch(processor: VisionLLMv2Processor) -> dict:
    """One image-and-answer sample as model inputs."""
    return processor([Sample([("user", "<image>\nFind the square."), ("assistant", "A red square.")],
                             [load_image(IMAGE)])])


def _equal(ours: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]) -> list[str]:
    """The keys of ``stored`` whose tensor ``ours`` lacks or holds otherwise (stored dtype cast to ours)."""
    return [k for k, v in stored.items() if k not in ours or not torch.equal(ours[k], v.to(ours[k].dtype))]


# ----------------------------------------------------------------------------------------------------- loading


def _build_and_load(cfg) -> VisionLLMv2Model:
    """What training does before its first step."""
    model = build_model(cfg)
    model.load_pretrained_components()
    return model


def _llm_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The causal-LM folder's tensors, the LM head under its own name too when tied to the embeddings."""
    stored = folder_tensors(folder)
    if json.loads((folder / "config.json").read_text()).get("tie_word_embeddings"):
        stored["lm_head.weight"] = stored["model.embed_tokens.weight"]
    return stored


def _vocabulary(folder: Path) -> int:
    """How many tokens the folder's own tokenizer has (its embedding may have more rows: Qwen2 pads them)."""
    return len(AutoTokenizer.from_pretrained(folder, local_files_only=True))


def _check_llm(llm: torch.nn.Module, folder: Path) -> None:
    """The fp32 LLM holds the folder's tensors for the folder's vocabulary; the 26 rows after it are the mean of
    those rows."""
    stored, n = _llm_tensors(folder), _vocabulary(folder)
    ours = llm.state_dict()
    assert ours.keys() == stored.keys() and {v.dtype for v in ours.values() if v.is_floating_point()} == {torch.float32}
    assert not _equal({k: v[:n] if k in ROWS else v for k, v in ours.items()},
                      {k: v[:n] if k in ROWS else v for k, v in stored.items()})
    for key in ROWS:
        new, mean = ours[key][n:], stored[key][:n].float().mean(0)
        assert new.shape[0] == len(OFFICIAL)
        torch.testing.assert_close(new, mean.expand_as(new), atol=NEW_ROW_ATOL, rtol=0)


def _check_official_ids(processor: VisionLLMv2Processor, model: VisionLLMv2Model, vocab: int) -> None:
    """The 26 special tokens hold ids vocab..vocab+25 in the official order, in the tokenizer and the model."""
    ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in OFFICIAL}
    assert ids == {t: vocab + i for i, t in enumerate(OFFICIAL)}
    assert model.config.token_ids == {t: ids[t] for t in model.config.token_ids}


def _check_tower(model: VisionLLMv2Model, clip: Path) -> None:
    """The vision tower holds the CLIP folder's vision tensors."""
    stored = {k.removeprefix("vision_model."): v for k, v in folder_tensors(clip).items()
              if k.startswith("vision_model.")}
    ours = model.vis_encoder.vision_model.state_dict()
    assert ours.keys() == stored.keys() and not _equal(ours, stored)


def _read_by_library(cls: type, folder: Path) -> dict[str, torch.Tensor]:
    """The folder's tensors as its own library reads them (transformers 5 saves GroundingDINO and Swin under their
    transformers 4 names and renames them on loading); every tensor of the model comes from the folder."""
    model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    return model.state_dict()


def test_every_component_holds_its_real_format_folder(real_folders):
    """After ``load_pretrained_components`` (what training calls) each component's tensors are its folder's, read
    from the safetensors files (GroundingDINO and Swin through their library's renaming); only what the folders lack
    keeps its initialisation."""
    cfg = load_config(JOURNEY, _mllm(real_folders) + _decoders(real_folders))
    model = _build_and_load(cfg)
    _check_tower(model, real_folders.clip)
    _check_llm(model.llm, real_folders.llama)
    _check_official_ids(VisionLLMv2Processor.from_config(cfg), model, SP_VOCAB)

    stored = _read_by_library(GroundingDinoForObjectDetection, real_folders.gdino)
    unused = ("model.text_backbone.", "model.text_projection.", "model.backbone.conv_encoder.model.swin.layernorm.")
    assert not _equal(model.gdino.state_dict(), {k: v for k, v in stored.items() if not k.startswith(unused)})

    swin = {k: v for k, v in _read_by_library(SwinForImageClassification, real_folders.swin).items()
            if not k.startswith("classifier.")}
    ours = model.keypoint.backbone.state_dict()
    assert {k for k in ours if not k.startswith("hidden_states_norms.")} == swin.keys() and not _equal(ours, swin)

    for name, folder in (("sd", real_folders.sd), ("ip2p", real_folders.ip2p)):
        decoder = getattr(model, name)
        parts = {"unet": decoder.sd_unet, "vae": decoder.sd_vae, "text_encoder": decoder.sd_text_encoder}
        for sub, module in parts.items():
            stored, ours = folder_tensors(folder / sub), module.state_dict()
            assert ours.keys() == stored.keys() and not _equal(ours, stored), (name, sub)
        schedule = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert {k: decoder.scheduler_config[k] for k in schedule} == schedule
        assert decoder.sd_tokenizer.get_vocab() == clip_tokenizer().get_vocab()
    assert model.ip2p.sd_unet.conv_in.in_channels == 8


def test_open_clip_checkpoint_loads_into_the_tower(real_folders):
    """The open_clip hub checkpoint's image tower is the tower's, tensor for tensor."""
    cfg = load_config(JOURNEY, ["vision.backend=open_clip", "vision.open_clip_model=vllm2-tiny-vit",
                                f"vision.pretrained={real_folders.open_clip}"])
    model = build_model(cfg)
    model.load_pretrained_components()
    stored = {k.removeprefix("visual."): v for k, v in folder_tensors(real_folders.open_clip.parent).items()
              if k.startswith("visual.")}
    ours = model.vis_encoder.visual.state_dict()
    assert ours.keys() == stored.keys() and not _equal(ours, stored)


# ----------------------------------------------------------------------------------------------------- tokens


def _word_level(folder: Path, words: list[str]) -> Path:
    """A ``tokenizer.json`` (tokenizers WordLevel) holding ``words`` at ids 0.., saved by transformers."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return folder


LLAMA_WORDS = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(3, 32000))]  # a 32000-entry vocabulary


def test_a_llama_vocabulary_of_32000_gives_the_official_ids(tmp_path):
    """Added to a 32000-word vocabulary, the tokens take 32000..32025; a release tokenizer holding them keeps them."""
    official = dict(zip(OFFICIAL, range(32000, 32026)))
    for name, words in (("vicuna", LLAMA_WORDS), ("release", LLAMA_WORDS + OFFICIAL)):
        tokenizer = load_tokenizer(str(_word_level(tmp_path / name, words)), routes=RouteTable.default())
        assert len(tokenizer) == 32026 and {t: tokenizer.convert_tokens_to_ids(t) for t in OFFICIAL} == official


def test_the_sentencepiece_model_alone_gives_the_same_tokenizer(real_folders, tmp_path):
    """Vicuna ships ``tokenizer.model`` without ``tokenizer.json``: transformers converts it to the same tokens."""
    folder = tmp_path / "vicuna"
    folder.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(real_folders.llama / name, folder / name)
    routes = RouteTable.default()
    alone, both = (load_tokenizer(str(f), routes=routes) for f in (folder, real_folders.llama))
    text = "USER: <image>\nFind the square. ASSISTANT: Sure, [DET][EMB][EMB2] here."
    assert alone(text).input_ids == both(text).input_ids and alone.get_vocab() == both.get_vocab()
    assert [alone.convert_tokens_to_ids(t) for t in OFFICIAL] == list(range(SP_VOCAB, SP_VOCAB + 26))


@pytest.mark.parametrize("words, listed", [
    (LLAMA_WORDS[:3] + ["<image>"] + LLAMA_WORDS[4:], "<image> is 3, expected 32001"),  # one already elsewhere
    (LLAMA_WORDS + OFFICIAL[:12] + ["[SEG]", "[GRD]", "[DET]"] + OFFICIAL[15:], "[DET] is 32014, expected 32012"),
])
def test_a_tokenizer_without_the_official_ids_is_refused(tmp_path, words, listed):
    """A tokenizer that already holds some of the 26 at other ids, or out of order, fails naming folder and ids."""
    folder = _word_level(tmp_path / "tok", words)
    with pytest.raises(ValueError, match=f"{folder}.*llm.tokenizer.*official order.*{listed}".replace("[", r"\[")):
        load_tokenizer(str(folder), "llm.tokenizer", routes=RouteTable.default())


def test_an_export_with_other_token_ids_is_refused_as_init_from(real_folders, tmp_path):
    """A previous export whose special tokens sit at other ids than this config's tokenizer gives them is refused."""
    from vllm2.training import init_from_export

    build_model(load_config("tiny")).save_pretrained(tmp_path / "export")  # the tiny tokenizer: 512 words
    model = build_model(load_config(JOURNEY, [f"llm.tokenizer={real_folders.qwen2}"]))  # Qwen2's: 400 words
    here = _vocabulary(real_folders.qwen2) + 1
    with pytest.raises(ValueError, match=rf"training.init_from: the special-token ids .* <image> is 513 there, {here} "
                                         r"here.*llm.tokenizer="):
        init_from_export(model, tmp_path / "export")


# ----------------------------------------------------------------------------------------------------- wrong folders


def _lora_adapter(real, folder: Path) -> Path:
    """A peft LoRA adapter of the Llama folder, as peft saves one (adapter_config.json + adapter_model.safetensors,
    with the tokenizer beside it as adapters are shared), without the base weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(real.llama, local_files_only=True)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    AutoTokenizer.from_pretrained(real.llama, local_files_only=True).save_pretrained(folder)
    return folder


def test_wrong_folders_are_one_clear_error_each(real_folders, tmp_path, capsys):
    """A LoRA adapter or a CLIP folder as llm.pretrained, a LoRA adapter or a Llama folder as --model (chat, export,
    bench): one error each."""
    adapter = _lora_adapter(real_folders, tmp_path / "adapter")
    assert not (adapter / "config.json").exists() and (adapter / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match=r"llm.pretrained: .*adapter.* is a LoRA adapter of .*llama.* not a causal LM"):
        build_model(load_config(JOURNEY, [f"llm.pretrained={adapter}"]))
    with pytest.raises(ValueError, match=r"llm.pretrained: .*clip.* holds a 'clip' model, not a causal LM"):
        build_model(load_config(JOURNEY, [f"llm.pretrained={real_folders.clip}"]))
    capsys.readouterr()
    expected = {adapter: "is a LoRA adapter of .*`vllm2 export --model THAT --out DIR --merge-lora`",
                real_folders.llama: "holds a 'llama' model, not a vllm2 model: .* llm.pretrained"}
    for folder, message in expected.items():
        assert chat_main(["--model", str(folder), "--prompt", "hi", "--out", str(tmp_path / "chat")]) == 2
        assert export_main(["--model", str(folder), "--out", str(tmp_path / "out")]) == 2
        assert bench_main(["det", "--model", str(folder), "--data", str(EXAMPLES / "coco_instances.json"),
                           "--image-root", str(EXAMPLES / "images"), "--out", str(tmp_path / "det.json")]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 3 and all(line.startswith(f"error: {str(folder)!r} ") for line in errors), errors
        assert all(re.search(message, line) for line in errors), errors


def test_export_rewrites_a_folder_and_refuses_what_it_cannot_do(tmp_path, capsys):
    """Without --merge-lora the folder is written again, tensor for tensor; --merge-lora without adapters and a
    non-empty --out are errors that write nothing."""
    folder, copy = tmp_path / "plain", tmp_path / "copy"
    cfg = load_config("tiny")
    build_model(cfg).save_pretrained(folder)
    VisionLLMv2Processor.from_config(cfg).save_pretrained(folder)
    assert export_main(["--model", str(folder), "--out", str(copy)]) == 0
    assert {p.name for p in folder.iterdir()} == {p.name for p in copy.iterdir()}
    stored, written = folder_tensors(folder), folder_tensors(copy)
    assert written.keys() == stored.keys() and not _equal(written, stored)
    capsys.readouterr()
    assert export_main(["--model", str(folder), "--out", str(tmp_path / "out"), "--merge-lora"]) == 2
    assert "--merge-lora: " in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert export_main(["--model", str(folder), "--out", str(copy)]) == 2
    assert "is not empty" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- the journey


def _llm_half(real, tmp: Path, llm: str) -> tuple[Path, Path]:
    """Stage 1 (no decoders) from the real folders, then stage 2 with LoRA and the decoder folders, initialised from
    stage 1's export, through ``vllm2 train``; returns the two exports after checking what carried over."""
    assert train_main([str(_stage(tmp, 1)), *_mllm(real, llm), f"training.output_dir={tmp / 's1'}", STAGE1_DATA]) == 0
    assert train_main([str(_stage(tmp, 2)), *_mllm(real, llm), *_decoders(real), f"training.output_dir={tmp / 's2'}",
                       f"training.init_from={tmp / 's1' / 'final'}", "llm.lora.enabled=true"]) == 0
    s1, s2 = tmp / "s1" / "final", tmp / "s2" / "final"
    first = VisionLLMv2Model.from_pretrained(s1)
    _check_tower(first, real.clip)  # frozen by the recipe
    _check_official_ids(VisionLLMv2Processor.from_pretrained(s1), first, _vocabulary(getattr(real, llm)))
    trained = {f"llm.{k}": v for k, v in first.llm.state_dict().items() if k not in ROWS}
    stored = _llm_tensors(getattr(real, llm))
    assert [k for k, v in trained.items() if not torch.equal(v, stored[k[4:]].float())]  # stage 1 trained the LLM
    second = VisionLLMv2Model.from_pretrained(s2).state_dict()
    assert any("lora_B" in k for k in second)
    base = {k.replace("llm.base_model.model.", "llm.").replace(".base_layer.", "."): v for k, v in second.items()}
    assert not _equal(base, trained)  # stage 1's LLM, frozen under stage 2's LoRA wrapping
    assert not torch.equal(base["llm.lm_head.weight"], first.llm.lm_head.weight)  # LoRA trains the token rows too
    return s1, s2


def _check_merged_export(lora_dir: Path, tmp: Path) -> None:
    """``vllm2 export --merge-lora`` of the LoRA export (adapters perturbed so the merge matters) writes a plain
    folder whose logits equal the LoRA model's, with peft's arithmetic W + B A alpha / r in its weights."""
    model = VisionLLMv2Model.from_pretrained(lora_dir).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)  # two training steps barely move B from its zero init
    perturbed, merged = tmp / "perturbed", tmp / "merged"
    model.save_pretrained(perturbed)
    VisionLLMv2Processor.from_pretrained(lora_dir).save_pretrained(perturbed)
    assert export_main(["--model", str(perturbed), "--out", str(merged), "--merge-lora"]) == 0

    stored = folder_tensors(merged)
    assert not [k for k in stored if "lora_" in k or "base_layer" in k or "base_model" in k]
    assert json.loads((merged / "config.json").read_text())["vllm2"]["llm"]["lora"]["enabled"] is False
    plain = VisionLLMv2Model.from_pretrained(merged).eval()
    q = model.llm.get_base_model().model.layers[1].self_attn.q_proj
    lora = model.cfg.llm.lora
    expected = q.base_layer.weight + q.lora_B["default"].weight @ q.lora_A["default"].weight * (lora.alpha / lora.r)
    torch.testing.assert_close(plain.llm.model.layers[1].self_attn.q_proj.weight, expected, rtol=0, atol=1e-6)
    batch = _batch(VisionLLMv2Processor.from_pretrained(merged))
    with torch.no_grad():
        with_lora, without = model(**batch).logits, plain(**batch).logits
        with model.llm.disable_adapter():
            base = model(**batch).logits
    assert (with_lora - without).abs().max() <= 1e-5
    assert (with_lora - base).abs().max() > 1e-2  # the adapters change the logits: the merge is what keeps them


def test_llama_journey_through_the_cli(real_folders, tmp_path, capsys):
    """Stage 1 -> stage 2 (LoRA) -> stage 3 through ``vllm2 train``, each from the previous export; ``vllm2 chat``
    and ``vllm2 bench det`` on the result; ``vllm2 export --merge-lora``."""
    _, s2 = _llm_half(real_folders, tmp_path, "llama")
    assert train_main([str(_stage(tmp_path, 3)), *_mllm(real_folders), *_decoders(real_folders),
                       f"training.output_dir={tmp_path / 's3'}", f"training.init_from={s2}",
                       "llm.lora.enabled=true"]) == 0
    s3 = tmp_path / "s3" / "final"
    third = VisionLLMv2Model.from_pretrained(s3).eval()
    before, after = VisionLLMv2Model.from_pretrained(s2).state_dict(), third.state_dict()
    frozen = ("vis_encoder.", "vl_bridge.", "region_encoder.", "llm.", "emb_embeddings_")  # the stage 3 recipe's
    assert not _equal(after, {k: v for k, v in before.items() if k.startswith(frozen)})
    assert _equal(after, {k: v for k, v in before.items() if not k.startswith(frozen)})  # the decoders trained

    capsys.readouterr()
    prompt = "Find the square."
    assert chat_main(["--model", str(s3), "--image", str(IMAGE), "--prompt", prompt, "--json", "--max-new-tokens",
                      "6", "--out", str(tmp_path / "chat")]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    direct = third.chat(VisionLLMv2Processor.from_pretrained(s3), [load_image(IMAGE)], [prompt], max_new_tokens=6)[0]
    assert (answer["text"], answer["num_tokens"]) == (direct.text, direct.num_tokens)

    out = tmp_path / "det.json"
    assert bench_main(["det", "--model", str(s3), "--data", str(EXAMPLES / "coco_instances.json"), "--image-root",
                       str(EXAMPLES / "images"), "--mode", "teacher-forced", "--batch-size", "2", "--device", "cpu",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["num_samples"], result["decoder_errors"]["count"], list(result["metrics"])) == (2, 0, ["bbox"])
    _check_merged_export(s3, tmp_path)


def test_qwen2_llm_half_of_the_journey(real_folders, tmp_path):
    """Any causal LM: a Qwen2 folder (bfloat16, tied embeddings, byte-level BPE) through stage 1 -> stage 2 (LoRA)
    -> ``export --merge-lora``, the same checks as the Llama's."""
    llm = _build_and_load(load_config(JOURNEY, _mllm(real_folders, "qwen2"))).llm
    _check_llm(llm, real_folders.qwen2)
    assert llm.lm_head.weight is llm.get_input_embeddings().weight
    _, s2 = _llm_half(real_folders, tmp_path, "qwen2")
    _check_merged_export(s2, tmp_path)
