"""condition: text in PyTorch and the framework-neutral plumbing: the spec, the canonical table, the
text encoder (pooling at the first end-of-text, the null embedding, padding, causality), dropping
captions, prompts at sampling time, and training end to end from digits, zips and a caption folder."""
import contextlib
import json
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("rwkv", reason="the RWKV world vocabulary ships in the rwkv wheel (requirements/text.txt)")

from backends.torch.models import DiR, first_eos_position  # noqa: E402
from common.captions import UNSEEN_WORD_DIGIT_TEMPLATES, held_out_digit_prompts  # noqa: E402
from common.conditions import drop_conditions, null_condition  # noqa: E402
from common.config import SAMPLE_SCHEMA, TRAIN_SCHEMA, ConfigError, parse_cli  # noqa: E402
from common.params import init_canonical, parameter_table  # noqa: E402
from common.spec import SpecError, build_spec  # noqa: E402
from common.text import EOS_ID, world_tokenizer  # noqa: E402

TEXT = dict(hidden_size=64, depth=2, head_size=32, input_size=8, in_channels=1, num_classes=1, condition="text",
            text_depth=2, text_width=32, text_max_tokens=8, mix_lora_rank=8, decay_lora_rank=8)


def model_with_weights(spec, seed=0):
    rng = np.random.default_rng(seed)
    state = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in init_canonical(spec).items()}
    model = DiR(spec).eval()
    model.load_canonical(state)
    return model


def test_spec_fields_and_table():
    spec = build_spec("DiR-Tiny/2", **TEXT)
    names = [info.name for info in parameter_table(spec)]
    assert "y_embedder.embedding_table.weight" not in names
    assert names[names.index("t_embedder.mlp.2.bias") + 1] == "text_encoder.null_embedding"
    assert "text_encoder.blocks.0.ln0.weight" in names and "text_encoder.blocks.1.ln0.weight" not in names
    assert "text_encoder.proj.weight" in names  # 32 wide, projected to 64
    assert [n for n, _ in DiR(spec).named_parameters()] == names
    shapes = {info.name: info.shape for info in parameter_table(spec)}
    assert shapes["text_encoder.emb.weight"] == (65536, 32)
    assert shapes["text_encoder.blocks.1.att.time_faaaa"] == (1, 32)  # one head of 32
    same_width = build_spec("DiR-Tiny/2", **{**TEXT, "text_width": 0})
    assert not any(info.name.startswith("text_encoder.proj") for info in parameter_table(same_width))
    for bad, match in (({"text_width": 48}, "multiple of head_size"), ({"text_max_tokens": 1}, "at least 2"),
                       ({"condition": "prompt"}, "allowed: class, text")):
        with pytest.raises(SpecError, match=match):
            build_spec("DiR-Tiny/2", **{**TEXT, **bad})


def test_text_init_uses_the_text_blocks_own_layer_schedule():
    spec = build_spec("DiR-Tiny/2", **TEXT)
    state = init_canonical(spec)
    from common.params import rwkv6_init

    text = spec.text_encoder_spec()
    np.testing.assert_array_equal(state["text_encoder.blocks.1.att.time_decay"],
                                  rwkv6_init(text, "text_encoder.blocks.1.att.time_decay", 1))
    assert not np.array_equal(state["text_encoder.blocks.1.att.time_decay"], state["blocks.1.att.time_decay"][:32])


def test_the_null_embedding_starts_where_captions_stand():
    # Guidance's unconditional branch must start at the scale of a pooled caption (ln_out's unit scale),
    # not at the label table's 0.02: the digits text demo's score depends on it (README: Text-to-image).
    spec = build_spec("DiR-Tiny/2", **{**TEXT, "text_width": 0})  # no projection: pooled = ln_out's output
    state = init_canonical(spec)
    null = state["text_encoder.null_embedding"]
    assert 0.8 < null.std() < 1.2 and abs(null.mean()) < 0.3
    model = DiR(spec).eval()
    model.load_canonical(state)
    with torch.no_grad():
        pooled = model.text_encoder(torch.tensor([[9, 10, 11, EOS_ID], [300, 40, EOS_ID, 0]]))
    ratio = np.linalg.norm(null) / pooled.norm(dim=1).numpy()
    assert ((0.7 < ratio) & (ratio < 1.4)).all(), ratio


def test_first_eos_position_needs_no_tie_breaking():
    ids = torch.tensor([[5, 6, 1, 0, 1], [1, 0, 0, 0, 0], [7, 7, 7, 7, 7], [3, 1, 1, 1, 1]])
    assert first_eos_position(ids).tolist() == [2, 0, 0, 1]


def test_pooling_padding_causality_and_the_null_embedding():
    spec = build_spec("DiR-Tiny/2", **TEXT)
    encoder = model_with_weights(spec).text_encoder
    ids = torch.tensor([[9, 10, 11, EOS_ID, 0, 0], [EOS_ID, 0, 0, 0, 0, 0], [9, 10, EOS_ID, 0, 0, 0]])
    with torch.no_grad():
        out = encoder(ids)
        assert out.shape == (3, 64)
        torch.testing.assert_close(out[1], encoder.null_embedding, rtol=0, atol=0)  # the empty caption
        longer = torch.cat([ids, torch.zeros(3, 5, dtype=torch.long)], dim=1)  # more padding: same vector
        torch.testing.assert_close(encoder(longer), out, rtol=0, atol=1e-6)
        after = ids.clone()
        after[0, 4:] = torch.tensor([55, 66])  # tokens after the end-of-text cannot reach it
        torch.testing.assert_close(encoder(after), out, rtol=0, atol=1e-6)
        before = ids.clone()
        before[0, 1] = 12345  # a token before it does
        assert (encoder(before)[0] - out[0]).abs().max() > 1e-4
        assert (out[0] - out[2]).abs().max() > 1e-4


def test_gradients_reach_every_text_encoder_parameter():
    spec = build_spec("DiR-Tiny/2", **TEXT)
    model = model_with_weights(spec).train()
    ids = torch.tensor([[9, 10, EOS_ID, 0], [EOS_ID, 0, 0, 0]])
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), ids)
    out.square().mean().backward()
    silent = [n for n, p in model.named_parameters() if n.startswith("text_encoder.")
              and (p.grad is None or not p.grad.abs().sum() > 0) and n != "text_encoder.emb.weight"]
    assert silent == []
    grad_rows = model.text_encoder.emb.weight.grad.abs().sum(1).nonzero().flatten().tolist()
    # the caption's tokens and its end-of-text (pooled at the EOS); the empty caption reads none (null embedding)
    assert grad_rows == [EOS_ID, 9, 10]


def test_null_and_dropped_captions():
    spec = build_spec("DiR-Tiny/2", **TEXT)
    null = null_condition(spec, 2)
    assert null.shape == (2, 8) and null[:, 0].tolist() == [1, 1] and not null[:, 1:].any()
    ids = np.array([[4, 5, 1, 0, 0, 0, 0, 0], [6, 1, 0, 0, 0, 0, 0, 0]])
    dropped = drop_conditions(spec, ids, np.array([False, True]))
    assert dropped[0].tolist() == ids[0].tolist() and dropped[1].tolist() == null[0].tolist()
    short = drop_conditions(spec, ids[:, :4], np.array([True, False]))  # another padded length
    assert short.shape == (2, 4) and short[0].tolist() == [1, 0, 0, 0]


def test_prompt_keys_and_errors(tmp_path):
    from common.sampling import prompt_conditions, read_prompts

    spec = build_spec("DiR-Tiny/2", **TEXT)
    config, _ = parse_cli(["--prompts", "the digit 7; a handwritten two", "--num_per_prompt", "3",
                           "--prompt_labels", "digits", "--negative_prompt", "a blur"], SAMPLE_SCHEMA, "s")
    prompts, ids, labels, negative = prompt_conditions(config, spec)
    assert prompts == ["the digit 7"] * 3 + ["a handwritten two"] * 3
    assert ids.shape == (6, 8) and labels.tolist() == [7, 7, 7, 2, 2, 2]
    assert ids[0].tolist() == world_tokenizer().encode_batch(["the digit 7"], 8, fixed_length=True)[0][0].tolist()
    assert negative.shape == (1, 8) and negative[0, 0] != EOS_ID
    file = tmp_path / "prompts.txt"
    file.write_text("one\n\n  two  \n", encoding="utf-8")
    assert read_prompts({"prompts": None, "prompts_file": str(file)}) == ["one", "two"]
    for values, match in (({"prompts": None, "prompts_file": None}, "give 'prompts'"),
                          ({"prompts": "a; b", "prompts_file": str(file)}, "not both"),
                          ({"prompts": " ; ", "prompts_file": None}, "holds no prompt"),
                          ({"prompts": None, "prompts_file": str(tmp_path / "nope.txt")}, "cannot be read")):
        with pytest.raises(ConfigError, match=match):
            read_prompts(values)
    config["prompts"] = "a handwritten two and a three"
    with pytest.raises(ConfigError, match="name no digit or several"):
        prompt_conditions(config, spec)


def test_the_sample_config_prompts_are_the_held_out_phrasings(repo_root):
    lines = (repo_root / "configs/sample/digits_text_prompts.txt").read_text().splitlines()
    assert lines == held_out_digit_prompts(4)[0]
    lines = (repo_root / "configs/sample/digits_text_unseen_words_prompts.txt").read_text().splitlines()
    assert lines == held_out_digit_prompts(2, templates=UNSEEN_WORD_DIGIT_TEMPLATES)[0]


def text_train_args(run_dir, *extra):
    return ["--condition", "text", "--text_depth", "1", "--text_width", "32", "--text_max_tokens", "16",
            "--image_size", "8", "--hidden_size", "64", "--depth", "2", "--global_batch_size", "4", "--max_steps", "3",
            "--log_every", "1", "--ckpt_every", "3", "--sample_every", "0", "--sample_steps", "2",
            "--sample_per_class", "1", "--run_dir", str(run_dir), *extra]


def test_train_and_sample_digits_captions_end_to_end(tmp_path):
    from backends.torch.sample import sample
    from backends.torch.train import train

    config, _ = parse_cli(text_train_args(tmp_path / "run", "--dataset", "digits"), TRAIN_SCHEMA, "t")
    train(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    metrics = [r for r in rows if "loss" in r]
    assert metrics and all(r["cut_captions"] == 0 for r in metrics)
    assert (tmp_path / "run" / "samples").exists()  # the grid of held-out prompts
    config, _ = parse_cli(["--ckpt", str(tmp_path / "run"), "--prompts", "the digit 3; a handwritten five",
                           "--num_per_prompt", "2", "--prompt_labels", "digits", "--sampler", "ddim",
                           "--num_sampling_steps", "2", "--cfg_scale", "2", "--out_dir", str(tmp_path / "s")],
                          SAMPLE_SCHEMA, "s")
    sample(config)
    data = np.load(tmp_path / "s" / "samples.npz")
    assert data["arr_0"].shape == (4, 8, 8, 1) and data["labels"].tolist() == [3, 3, 5, 5]
    assert data["prompts"].tolist() == ["the digit 3"] * 2 + ["a handwritten five"] * 2
    info = json.loads((tmp_path / "s" / "info.json").read_text())
    assert info["prompts"] == ["the digit 3", "a handwritten five"] and info["spec"]["condition"] == "text"
    config["prompts"], config["prompt_labels"] = None, "none"
    with pytest.raises(ConfigError, match="text-conditioned: give 'prompts'"):
        sample(config)


def png_bytes(seed):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_train_from_zips_and_from_a_caption_folder(tmp_path):
    """Di-R's zips + meta.txt (one zip corrupt, one caption missing) and a plain folder both train;
    the bad items are counted, not fatal."""
    from backends.torch.train import train

    zips = tmp_path / "zips"
    zips.mkdir()
    with zipfile.ZipFile(zips / "part0.zip", "w") as archive:
        for i in range(6):
            archive.writestr(f"{i}.png", png_bytes(i))
            if i != 4:
                archive.writestr(f"{i}.txt", f"a square of noise number {i}")
    (zips / "broken.zip").write_bytes(b"PK\x03\x04 not a zip")
    lines = [f"part0.zip\t{i}.png\t{i}.txt" for i in range(6)] + ["broken.zip\tx.png\tx.txt"]
    (zips / "meta.txt").write_text("\n".join(lines) + "\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(5):
        (folder / f"img{i}.png").write_bytes(png_bytes(10 + i))
        (folder / f"img{i}.txt").write_text(f"noise picture {i}")
    for name, root in (("zips", zips), ("folder", folder)):
        config, _ = parse_cli(text_train_args(tmp_path / f"run_{name}", "--dataset", "captions", "--data_path",
                                              str(root), "--random_flip", "false"), TRAIN_SCHEMA, "t")
        with pytest.warns(UserWarning) if name == "zips" else contextlib.nullcontext():
            result = train(config)
        assert result["step"] == 3
        rows = [json.loads(line) for line in (tmp_path / f"run_{name}" / "log.jsonl").read_text().splitlines()]
        if name == "zips":
            assert sum(r.get("skipped_images", 0) > 0 for r in rows if "loss" in r) >= 1


def test_captions_dataset_needs_condition_text(tmp_path):
    from common.data import DataError, build_source

    config, _ = parse_cli(["--dataset", "captions", "--data_path", str(tmp_path)], TRAIN_SCHEMA, "t")
    with pytest.raises(DataError, match="needs condition: text"):
        build_source(config)
