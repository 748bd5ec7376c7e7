"""The built-in model: its data, its judge, and that its words steer the picture."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from world import data
from world.evaluate import ATTRIBUTES, colour_error, read_attributes, score

MODEL = Path(__file__).resolve().parents[1] / "models" / "bailan-shapes"


def test_evaluator_reads_ground_truth_images() -> None:
    """Guards a judge that is itself wrong: the benchmark's numbers mean nothing
    unless the pixel classifier reads ≥ 99 % of true dataset images right
    and measures their colours where they are."""
    rng = random.Random(7)
    scenes = [data.sample_scene(rng, "all", two_shapes=False) for _ in range(300)]
    images = data.render(scenes)
    right = dict.fromkeys(ATTRIBUTES, 0)
    errors = []
    for scene, image in zip(scenes, images):
        s = scene.shapes[0]
        expected = {"colour": s.colour, "background": scene.background, "shape": s.shape, "size": s.size, "position": s.position}
        reading = read_attributes(image)
        for attr, ok in score(reading, expected).items():
            right[attr] += ok
        errors.append(colour_error(reading, s.colour))
    for attr in ATTRIBUTES:
        assert right[attr] / len(scenes) >= 0.99, (attr, right[attr])
    # True pixels measure (almost) exactly their palette colour, so a colour
    # error in the benchmark is the model's, not the judge's.
    assert sorted(errors)[len(errors) // 2] < 1.0 and sorted(errors)[int(0.99 * len(errors))] < 10.0


def test_heldout_pairs_never_reach_training() -> None:
    """Guards a leak that would make the held-out accuracy a seen-data number:
    no training scene (one or two shapes) may contain a held-out pair."""
    seen_cs, seen_sp = set(), set()
    for index in range(60):
        scenes, captions = data.sample_batch(seed=0, index=index, batch=64, split="train", stream=1)
        for scene in scenes:
            for s in scene.shapes:
                assert not data.is_heldout(s), s
                seen_cs.add((s.colour, s.shape))
                seen_sp.add((s.shape, s.position))
    # …while everything else is trained on, so the split is not vacuous.
    assert len(seen_cs) == 40 - len(data.HELDOUT_COLOUR_SHAPE)
    assert len(seen_sp) == 25 - len(data.HELDOUT_SHAPE_POSITION)
    assert len(data.HELDOUT_COLOUR_SHAPE) >= 4  # ≥ 10 % of 40


def test_captions_stay_inside_the_vocabulary() -> None:
    """Guards [UNK] in training captions: the worker drops unknown words, so a
    caption word missing from the tokenizer would train on text it never sees."""
    from world.train import build_tokenizer

    tok = build_tokenizer()
    for index in range(20):
        _, captions = data.sample_batch(seed=0, index=index, batch=64)
        for c in captions:
            ids = tok(c).input_ids
            assert tok.unk_token_id not in ids, c
            assert len(ids) <= tok.model_max_length, c


def test_batches_are_a_function_of_their_index() -> None:
    """Guards resume: a resumed run must see the same data as an unbroken one."""
    a = data.sample_batch(seed=0, index=123, batch=8)
    b = data.sample_batch(seed=0, index=123, batch=8)
    assert a == b
    assert torch.equal(data.render(a[0]), data.render(b[0]))


def test_model_loads_as_a_standard_pipeline() -> None:
    """Guards the layout contract: the worker loads the built-in model exactly
    like a real Stable Diffusion directory, with preview factors beside it."""
    from diffusers import StableDiffusionPipeline

    from safetensors import safe_open

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, local_files_only=True)
    for weights in MODEL.rglob("*.safetensors"):
        if weights.parent.name == "preview_decoder":
            continue  # 250 KB, kept in the float32 its figures were measured in (README, Previews)
        with safe_open(weights, "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys()), weights
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size <= 30 * 2**20
    rgb = json.loads((MODEL / "latent_rgb.json").read_text())
    assert len(rgb["factors"]) == pipe.unet.config.in_channels and len(rgb["bias"]) == 3
    assert pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1) == data.RES


def test_prompt_colours_and_position_reach_the_picture() -> None:
    """Guards a model that ignores its prompt (or swaps shape and background
    colours, or lets the seed pick the place, as the ε-prediction model did): on
    fixed prompts and seeds, the judge must read back the colours and the
    position asked for."""
    from world.stock import generate, load_pipeline

    pipe = load_pipeline(str(MODEL))
    cases = [
        ("a large red circle in the center on a blue background", "red", "blue", "center"),
        ("a large yellow square in the top left on a black background", "yellow", "black", "top left"),
        ("a large white triangle in the bottom right on a green background", "white", "green", "bottom right"),
        ("a large purple cross in the top right on an orange background", "purple", "orange", "top right"),
        ("a small green star in the bottom left on a white background", "green", "white", "bottom left"),
    ]
    images = generate(pipe, [c[0] for c in cases], [0] * len(cases), 7.5)
    for (prompt, colour, background, position), image in zip(cases, images):
        r = read_attributes(image)
        assert (r.colour, r.background, r.position) == (colour, background, position), prompt


def test_committed_weights_name_the_recipes_that_made_them() -> None:
    """Guards `make train` drifting from the committed weights: the shipped
    model's log must record exactly the "zsnr" recipe, fine-tuned from a
    pipeline whose own log is kept, so the two stages can be rerun."""
    from world.train import RECIPES

    log = json.loads((MODEL / "train_log.json").read_text())
    assert log["recipe"] == json.loads(json.dumps(asdict(RECIPES["zsnr"])))
    assert log["stopped_at"] == {"phase": "unet", "step": RECIPES["zsnr"].unet_steps}
    assert log["init_source"].endswith("(fine-tuned)") and log["init_train_log"]["stopped_at"]["phase"] == "unet"


def test_resume_continues_exactly(tmp_path: Path) -> None:
    """Guards `make train --resume`: a run stopped at a checkpoint and resumed
    must end with the same weights as an unbroken run (data and noise are
    functions of the step, optimiser and EMA state are checkpointed)."""
    from world.train import Recipe, Trainer

    recipe = Recipe(vae_steps=2, vae_batch=4, unet_steps=2, lr_schedule_steps=2, batch=4, warmup=1, ckpt_every=1)
    cpu = torch.device("cpu")
    whole = Trainer(recipe, cpu, tmp_path / "whole")
    assert whole.run(None)
    broken = Trainer(recipe, cpu, tmp_path / "broken")
    assert not broken.run(max_minutes=0)  # stops at its first checkpoint
    resumed = Trainer(recipe, cpu, tmp_path / "broken")
    resumed.load_checkpoint(tmp_path / "broken" / "last.pt")
    assert resumed.run(None)
    for a, b in zip(whole.ema_unet + whole.ema_te, resumed.ema_unet + resumed.ema_te):
        assert torch.allclose(a, b, atol=1e-6)
    assert whole.scaling_factor == pytest.approx(resumed.scaling_factor)


def test_zero_snr_v_prediction_option_exports_a_servable_model(tmp_path: Path) -> None:
    """Guards the experimental recipe (`--set zero_terminal_snr=true --set
    prediction_type=v_prediction --set vae_rgb_weight=0.25`) from rotting: it
    must train with finite losses and export a pipeline whose scheduler config
    tells every sampler to start from pure noise and read v."""
    from diffusers import StableDiffusionPipeline

    from world.train import Recipe, Trainer

    recipe = Recipe(
        vae_steps=2, vae_batch=4, unet_steps=2, lr_schedule_steps=2, batch=4, warmup=1, ckpt_every=1,
        zero_terminal_snr=True, prediction_type="v_prediction", vae_rgb_weight=0.25,
    )
    trainer = Trainer(recipe, torch.device("cpu"), tmp_path / "ckpt")
    assert trainer.run(None)
    assert all(math.isfinite(entry["loss"]) for entry in trainer.log)
    trainer.export(tmp_path / "model")
    config = StableDiffusionPipeline.from_pretrained(tmp_path / "model", local_files_only=True).scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == ("v_prediction", True, "trailing")
    with pytest.raises(ValueError, match="v_prediction"):
        Recipe(zero_terminal_snr=True)
    with pytest.raises(ValueError, match="prediction_type"):
        Recipe(prediction_type="sample")


def test_fine_tuning_starts_from_the_given_pipeline(tmp_path: Path) -> None:
    """Guards `train --init-from`: the UNet phase must start from that pipeline's
    weights (and EMA), not from a fresh random UNet, must then train, and its
    export must keep the starting point's own train log (provenance)."""
    from diffusers import UNet2DConditionModel

    from world.train import Recipe, Trainer

    recipe = Recipe(unet_steps=1, lr_schedule_steps=1, batch=2, warmup=1, zero_terminal_snr=True, prediction_type="v_prediction")
    trainer = Trainer(recipe, torch.device("cpu"), tmp_path / "ckpt")
    trainer.start_from(MODEL, fine_tune=True)
    shipped = UNet2DConditionModel.from_pretrained(MODEL / "unet", local_files_only=True).float().state_dict()
    start = trainer.unet.state_dict()
    assert all(torch.equal(start[k], shipped[k]) for k in shipped)
    assert (trainer.phase, trainer.step) == ("unet", 0)
    assert trainer.scaling_factor == pytest.approx(json.loads((MODEL / "vae" / "config.json").read_text())["scaling_factor"])
    assert trainer.run(None)
    assert not torch.equal(trainer.unet.state_dict()["conv_in.weight"], shipped["conv_in.weight"])
    trainer.export(tmp_path / "model")
    log = json.loads((tmp_path / "model" / "train_log.json").read_text())
    assert log["init_train_log"] == json.loads((MODEL / "train_log.json").read_text())


def test_a_fine_tuning_recipe_refuses_to_start_from_scratch(tmp_path: Path) -> None:
    """Guards `train --recipe zsnr` without `--init-from`: it would silently train
    a whole new VAE and UNet under the fine-tune's short schedule."""
    from world.train import main

    with pytest.raises(SystemExit, match="--init-from"):
        main(["--recipe", "zsnr", "--ckpt-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "model")])
    assert not (tmp_path / "model").exists()


def test_a_wrong_starting_pipeline_is_named(tmp_path: Path) -> None:
    """Guards `--init-from`/`--vae-from` with a wrong path: it must stop with a
    message naming the flag and what is missing, not a loader traceback."""
    from world.train import main

    args = ["--ckpt-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "model")]
    with pytest.raises(SystemExit, match=r"--init-from: .*no config.json in .*unet"):
        main(["--recipe", "zsnr", "--init-from", str(MODEL / "vae"), *args])
    with pytest.raises(SystemExit, match=r"--vae-from: .*not a trained pipeline directory"):
        main(["--vae-from", str(tmp_path / "nowhere"), *args])
    assert not (tmp_path / "model").exists()


def test_set_overrides_are_typed_and_checked() -> None:
    """Guards `train --set`: values must take the recipe field's type, and a
    misspelt field must stop the run instead of being ignored."""
    from world.train import _parse_sets

    assert _parse_sets(["zero_terminal_snr=true", "vae_rgb_weight=0.25", "unet_steps=10", "pyramid_scales=2,4"]) == {
        "zero_terminal_snr": True,
        "vae_rgb_weight": 0.25,
        "unet_steps": 10,
        "pyramid_scales": (2, 4),
    }
    with pytest.raises(SystemExit, match="zero_terminal_snrr"):
        _parse_sets(["zero_terminal_snrr=true"])
    with pytest.raises(SystemExit, match="not a bool"):
        _parse_sets(["zero_terminal_snr=ture"])
