"""Checkpoint loading: sharded files, both transformers key layouts, bad checkpoints."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import m4
from m4.errors import M4Error
from m4.model.checkpoint import Checkpoint, random_checkpoint, random_weights
from m4.model.config import PRESETS, Arch
from m4.model.fused import split_weights

from conftest import random_images
from test_cli import m4_in_process

Q = "Describe the scene."


def answer(path):
    return list(m4.load(path).tokens(Q, images=random_images(1), max_new_tokens=8))


def copy_tokenizer(src, dst):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)


def test_sharded_checkpoint(checkpoints, tmp_path):
    src = checkpoints["mha-untied-penult-default"]
    transformers.LlavaForConditionalGeneration.from_pretrained(src).save_pretrained(tmp_path, max_shard_size="50KB")
    copy_tokenizer(src, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert answer(tmp_path) == answer(src)


def test_current_transformers_key_layout(checkpoints, tmp_path):
    """transformers >= 4.52 names weights model.language_model.*, model.vision_tower.*,
    lm_head.*; the public checkpoints use language_model.model.* and friends."""
    src = checkpoints["gqa-untied-penult-full"]
    renames = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")]
    weights = {}
    for key, t in load_file(src / "model.safetensors").items():
        new = next((dst + key[len(s):] for s, dst in renames if key.startswith(s)), key)
        weights[new] = t
    assert "lm_head.weight" in weights
    save_file(weights, tmp_path / "model.safetensors")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    copy_tokenizer(src, tmp_path)
    assert answer(tmp_path) == answer(src)


def test_config_from_older_transformers(checkpoints, tmp_path):
    """transformers 4.x wrote rope_theta in text_config; 5.x writes rope_parameters."""
    src = checkpoints["gqa-tied-last-full"]
    shutil.copytree(src, tmp_path / "ck")
    config = json.loads((src / "config.json").read_text())
    theta = config["text_config"].pop("rope_parameters")["rope_theta"]
    config["text_config"]["rope_theta"] = theta
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    assert m4.load(tmp_path / "ck").arch.text.rope_theta == theta
    assert answer(tmp_path / "ck") == answer(src)


@pytest.mark.parametrize("damage", ["no weights", "wrong shape", "not llava", "truncated", "no k_proj"])
def test_bad_checkpoints_are_one_error(checkpoints, tmp_path, damage):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints["gqa-tied-last-full"], ck)
    if damage == "no weights":
        (ck / "model.safetensors").unlink()
    elif damage == "wrong shape":
        config = json.loads((ck / "config.json").read_text())
        config["text_config"]["hidden_size"] = 128
        (ck / "config.json").write_text(json.dumps(config))
    elif damage == "not llava":
        (ck / "config.json").write_text(json.dumps({"model_type": "bert"}))
    elif damage == "no k_proj":  # one of the projections that m4 fuses into one
        weights = load_file(ck / "model.safetensors")
        save_file({k: w for k, w in weights.items() if "layers.1.self_attn.k_proj" not in k}, ck / "model.safetensors")
    else:
        data = (ck / "model.safetensors").read_bytes()
        (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(M4Error) as e:
        m4.load(ck)
    assert "\n" not in str(e.value)
    if damage == "no k_proj":
        assert "layers.1.self_attn.k_proj" in str(e.value)


def test_hub_id_offline_is_one_line():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "m4", "info", "llava-hf/llava-interleave-qwen-0.5b-hf"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("m4: error: model not found: llava-hf/llava-interleave-qwen-0.5b-hf")
    assert len(r.stderr.strip().splitlines()) == 1


def test_loaded_weights_are_the_checkpoints(checkpoints):
    """Tied checkpoints share one table; untied ones keep their own lm_head."""
    tied = m4.load(checkpoints["gqa-tied-last-full"]).backend.model.text
    assert tied.lm_head.weight.data_ptr() == tied.embed_tokens.weight.data_ptr()
    untied = m4.load(checkpoints["mha-untied-penult-default"]).backend.model.text
    assert not torch.equal(untied.lm_head.weight, untied.embed_tokens.weight)


def test_fused_projections_hold_the_checkpoints_and_split_back(checkpoints):
    """q, k and v (and gate and up) load as one matrix, in the checkpoint's order, and
    split back into the checkpoint's tensors for saving."""
    src = checkpoints["mha-untied-penult-default"]
    model = m4.load(src).backend.model
    weights = Checkpoint(src, Arch.from_dir(src))
    qkv = model.text.layers[1].self_attn.qkv_proj.weight
    assert torch.equal(qkv, torch.cat([weights.tensor(f"text.layers.1.self_attn.{p}_proj.weight") for p in "qkv"]))
    state = model.state_dict()
    split_weights(model, state)
    assert "vision.layers.0.self_attn.v_proj.bias" in state and "text.layers.0.mlp.up_proj.weight" in state
    assert all(torch.equal(t, weights.tensor(k)) for k, t in state.items())


@pytest.mark.parametrize("config, words", [
    ({"model_type": "idefics2"}, "Mantis-8B-Idefics2"),
    ({"model_type": "fuyu"}, "Mantis-8B-Fuyu"),
    ({"model_type": "llava", "text_config": {"model_type": "mistral"}}, "unsupported decoder 'mistral'"),
    ({"model_type": "llava", "vision_config": {"model_type": "dinov2"}}, "unsupported vision tower 'dinov2'"),
    ({"model_type": "llava", "text_config": {"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}}},
     "unsupported rope scaling"),
])
def test_architectures_m4_does_not_run_are_named(tmp_path, config, words):
    """Mantis's other variants and unknown parts get one line from the CLI, naming what they are."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    r = subprocess.run([sys.executable, "-m", "m4", "info", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("m4: error:") and words in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def small_mantis_clip():
    """mantis-8b-clip's kinds and choices (CLIP tower read at its penultimate layer, class token
    dropped; Llama 3 decoder, untied, its rope) at the tiny preset's sizes."""
    big, tiny = PRESETS["mantis-8b-clip"], PRESETS["tiny"]
    size = {f: getattr(tiny.vision, f) for f in ("hidden", "layers", "heads", "mlp", "image_size", "patch_size")}
    text = {f: getattr(tiny.text, f) for f in ("hidden", "layers", "heads", "kv_heads", "mlp", "vocab")}
    return big.replace(vision=dataclasses.replace(big.vision, **size), text=dataclasses.replace(big.text, **text))


@pytest.mark.parametrize("arch", ["tiny", "mantis-8b-clip"])
def test_random_checkpoint_in_shards_loads_in_transformers(oracle, tmp_path, arch):
    """A random checkpoint written a tensor at a time, forced into several shards: transformers
    loads every weight it expects and no other, and answers as m4 does."""
    from test_parity import oracle_tokens

    ck = tmp_path / "ck"
    written = random_weights(PRESETS[arch] if arch == "tiny" else small_mantis_clip(), ck, std=0.2,
                             shard_bytes=50_000)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    shards = sorted(ck.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {f.name for f in shards}
    assert index["metadata"]["total_size"] == sum(load_file(f)[k].nbytes for f in shards for k in load_file(f))
    _, info = transformers.LlavaForConditionalGeneration.from_pretrained(ck, output_loading_info=True)
    assert not any(info.values()), info
    model = m4.load(ck)
    assert model.arch == written
    images = random_images(2, seed=3)
    p, pictures = model.prepare(Q, images)
    ours = list(model.tokens(Q, images=images, max_new_tokens=10))
    assert len(ours) == 10 and ours == oracle_tokens(oracle(ck), model, p, pictures, 10)


def test_random_tensors_depend_on_their_name_alone(tmp_path):
    """Each tensor from its own seed: the same in one file or in shards, a cast of the fp32
    values in fp16; norm weights one, biases zero; a tied preset stores no lm_head."""
    random_checkpoint("tiny", tmp_path / "one")
    random_checkpoint("tiny", tmp_path / "shards", dtype="fp16", shard_bytes=30_000)
    one = load_file(tmp_path / "one" / "model.safetensors")
    shards = {k: t for f in (tmp_path / "shards").glob("model-*.safetensors") for k, t in load_file(f).items()}
    assert one.keys() == shards.keys() and not any("lm_head" in k for k in one)
    assert all(shards[k].dtype == torch.float16 and torch.equal(shards[k], t.half()) for k, t in one.items())
    assert torch.all(one["language_model.model.norm.weight"] == 1)
    assert torch.all(one["language_model.model.layers.0.self_attn.q_proj.bias"] == 0)
    q = one["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert abs(q.std().item() - 0.02) < 0.002 and not torch.equal(q, one["language_model.model.layers.1.self_attn.q_proj.weight"])


def test_checkpoint_command_writes_a_preset(tmp_path):
    r = m4_in_process("checkpoint", "random", "tiny", tmp_path / "ck", "--dtype", "bf16", "--seed", "3")
    assert r.returncode == 0, r.stderr
    weights = load_file(tmp_path / "ck" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert m4.load(tmp_path / "ck").arch.text == PRESETS["tiny"].text
    r = subprocess.run([sys.executable, "-m", "m4", "checkpoint", "random", "huge", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("m4: error: unknown preset 'huge'")
