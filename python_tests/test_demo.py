"""Smoke tests of `python -m dyrate_ext.demo` at tiny sizes, its embedded model and StepClock.

- The embedded tokenizer/processor give LLaVA-1.5's prompt layout (576 image tokens for a
  336-pixel image) and round-trip words; the model is the same for the same seed.
- The demo runs every policy, NoPrune equals `model.generate`, the table, PNG, JSON and
  README section are written; DyRate is announced as hand-set; policies whose k does not fit
  a 2-layer decoder are skipped with a note; `--help` documents every option.
- `--model PATH` loads a checkpoint directory (the embedded model saved with save_pretrained).
- StepClock sees one LM-head call per step in both loops.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from dyrate_ext import demo
from dyrate_ext.embedded import (
    EmbeddedConfig,
    build_processor,
    build_tokenizer,
    demo_image,
    embedded_llava,
    hand_set_predictor,
    llava_prompt,
)
from dyrate_ext.llava import NoPrune, generate
from dyrate_ext.timing import StepClock

TINY = ["--layers", "4", "--hidden", "64", "--intermediate", "128", "--max-new-tokens", "3"]
TINY += ["--random-model"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_prompt_layout_is_llava15(tokenizer):
    processor = build_processor(tokenizer)
    text = llava_prompt("What is shown in this image?")
    assert text.endswith("USER: <image>\nWhat is shown in this image? ASSISTANT:")
    enc = processor(text=[text], images=[demo_image()], return_tensors="pt")
    ids = enc["input_ids"][0]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert int((ids == image_id).sum()) == 576
    assert enc["pixel_values"].shape == (1, 3, 336, 336)
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids.tolist()
    assert tokenizer.decode(tokenizer("a red house")["input_ids"], skip_special_tokens=True) == (
        "a red house"
    )
    roles = tokenizer.convert_tokens_to_ids(["USER:", "ASSISTANT:"])
    assert all(r in ids.tolist() for r in roles)


def test_embedded_model_is_deterministic(tokenizer):
    cfg = EmbeddedConfig(2, 32, 64, num_heads=4, num_kv_heads=4)
    a = embedded_llava(cfg, len(tokenizer))
    b = embedded_llava(cfg, len(tokenizer))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_prompt_demo_smoke(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    md = tmp_path / "section.md"
    png, js = tmp_path / "kept.png", tmp_path / "out.json"
    argv = [*TINY, "--plot", str(png), "--json", str(js), "--markdown", str(md)]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    for name in (
        "NoPrune",
        "FastV(k=2, r=0.5)",
        "FastV(k=3, r=0.5)",
        "VTW(k=2)",
        "DyRate(k=2, K=8)",
        "AttentionMass(p=0.9, k=2)",
    ):
        assert f"\n{name} " in out
    assert "HAND-SET" in out and "meaningless" in out and "576 image" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    rows = data["rows"]
    assert rows[0]["policy"] == "NoPrune" and len(rows) == 6
    assert rows[0]["matches_generate"] is True
    assert rows[0]["flops_pct"] == 100.0
    assert all(r["flops_pct"] < 100.0 for r in rows[1:])
    assert all(r["tokens"] == 3 for r in rows)
    assert data["kept_image"]["VTW(k=2)"] == [0, 0, 0]
    text = md.read_text()
    assert "| NoPrune | 3 | yes |" in text and "](kept.png)" in text


def test_demo_skips_policies_that_do_not_fit(capsys):
    argv = [*TINY[2:], "--layers", "2", "--no-plot", "--no-hf-check", "--no-progress"]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "FastV(k=2, r=0.5) skipped" in out and "FastV(k=3, r=0.5) skipped" in out
    assert "\nVTW(k=1) " in out


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--help"])
    text = capsys.readouterr().out
    for option in demo.parse_args([])._get_kwargs():
        assert "--" + option[0].replace("_", "-") in text


def test_model_path_runs_a_checkpoint_directory(tmp_path, tokenizer, capsys):
    cfg = EmbeddedConfig(num_layers=4, hidden_size=64, intermediate_size=128, image_size=112)
    model = embedded_llava(cfg, len(tokenizer))
    model.save_pretrained(tmp_path)
    build_processor(tokenizer, image_size=112).save_pretrained(tmp_path)
    argv = ["--model", str(tmp_path), "--dtype", "float32", "--max-new-tokens", "2", "--no-plot"]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "real checkpoint" in out and "\nNoPrune " in out
    assert "same tokens as NoPrune" in out


def test_step_clock_and_hand_set_predictor(tokenizer):
    cfg = EmbeddedConfig(3, 32, 64, num_heads=4, num_kv_heads=4)
    model = embedded_llava(cfg, len(tokenizer))
    processor = build_processor(tokenizer)
    enc = processor(text=[llava_prompt("Describe.")], images=[demo_image()], return_tensors="pt")
    with StepClock(model) as clock:
        out = generate(
            model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"],
            policy=NoPrune(scoring_layer=1), max_new_tokens=4, eos_token_id=None,
        )  # fmt: skip
    assert clock.decode_steps == 3 and clock.prefill_seconds > 0 and clock.decode_seconds > 0
    with StepClock(model) as hf:
        model.generate(**enc, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert hf.decode_steps == 3
    predictor, high, low = hand_set_predictor(out.trace, 4, num_rates=8)
    assert high > low
    # The prefill's image mass maps to class K/2 = 4 (rate 1/2).
    assert int(predictor.predict(out.trace.type_mass[0])) == 4


def test_caption_demo_smoke(tmp_path, capsys, monkeypatch):
    """`python -m dyrate_ext.demo` (the caption demo) end to end: one picture, two tokens."""
    monkeypatch.chdir(tmp_path)
    js = tmp_path / "captions.json"
    argv = ["--images", "1", "--batch-size", "1", "--max-new-tokens", "2", "--no-progress"]
    assert demo.main([*argv, "--json", str(js)]) == 0
    assert "reference:" in capsys.readouterr().out
    assert json.loads(js.read_text())["rows"][0]["name"] == "NoPrune"


@pytest.mark.slow
def test_caption_demo_on_the_committed_model(tmp_path, capsys):
    """The default demo: the trained tiny LLaVA, reference vs each policy's caption, CIDEr and
    FLOPs; a predictor file given with --predictor runs as DyRate next to the hand-set one."""
    from dyrate_ext.predictor import RatePredictor
    from dyrate_ext.train.model import DEFAULT_CHECKPOINT, load_tiny_llava

    heads = load_tiny_llava(DEFAULT_CHECKPOINT)[0].config.text_config.num_attention_heads
    path = tmp_path / "predictor.safetensors"
    predictor = RatePredictor(heads, 4)
    with torch.no_grad():  # always class 2: rate 1/2
        predictor.linear.weight.zero_()
        predictor.linear.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    predictor.save(path, metadata={"k": "2", "budget": "0.8"})
    argv = ["--images", "2", "--batch-size", "2", "--max-new-tokens", "4", "--no-progress"]
    js = tmp_path / "captions.json"
    assert demo.main([*argv, "--predictor", str(path), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    rows = json.loads(js.read_text())["rows"]
    assert rows[0]["name"] == "NoPrune" and rows[0]["flops_percent"] == pytest.approx(100.0)
    assert all(r["flops_percent"] < 100.0 for r in rows[1:]) and len(rows[0]["captions"]) == 2
    assert "reference:" in out and "CIDEr" in out and "FLOPs %" in out
    for name in (
        "NoPrune",
        "FastV(k=2 r=0.5)",
        "DyRate(k=2 budget=0.80 K=4)",
        "DyRate(hand-set k=2)",
    ):
        assert f"\n{name} " in out, name
    hf_js = tmp_path / "captions_hf.json"
    assert demo.main([*argv, "--predictor", str(path), "--json", str(hf_js), "--engine", "hf"]) == 0
    assert "engine: Hugging Face model.generate()" in capsys.readouterr().out
    hf_rows = json.loads(hf_js.read_text())["rows"]
    for a, b in zip(rows, hf_rows):  # the same captions and keep counts through generate()
        assert a["name"] == b["name"] and a["captions"] == b["captions"]
        assert a["kept_image_tokens"] == pytest.approx(b["kept_image_tokens"])
        assert a["flops_percent"] == pytest.approx(b["flops_percent"])


def test_model_size_names_select_the_caption_demo(tmp_path):
    """--model small / large is the caption demo on that tiny LLaVA; a path is the one-prompt
    demo on a llava-hf folder."""
    from dyrate_ext.demo.cli import one_prompt, parse_args

    assert not one_prompt(parse_args(["--model", "large"]))
    assert not one_prompt(parse_args(["--model", "small"]))
    assert one_prompt(parse_args(["--model", str(tmp_path)]))
