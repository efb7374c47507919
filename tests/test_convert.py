"""Checkpoint conversion: the authors' UNet folders, and a fresh DiffewS from Stable Diffusion."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from pipeline_diffews import DiffewSPipeline, convert_official, init_from_sd
from pipeline_diffews.checkpoints import empty_prompt_embeds
from tests.tiny_models import write_official_unet


@pytest.mark.parametrize("weights, with_ref_config, nested", [("safetensors", True, False), ("bin", False, True)])
def test_convert_official_formats(tmp_path, sd_base, weights, with_ref_config, nested):
    """Their class name, old diffusers keys, .bin or safetensors, with or without `in_channels_ref`, unet/ or not."""
    official = write_official_unet(tmp_path / "official" / ("unet" if nested else ""), weights=weights,
                                   with_ref_config=with_ref_config)
    code = convert_official.main(["--official", str(tmp_path / "official"), "--base", str(sd_base),
                                  "--output", str(tmp_path / "out")])
    assert code == 0
    pipe = DiffewSPipeline.from_pretrained(tmp_path / "out")
    source = load_file(official / "diffusion_pytorch_model.safetensors") if weights == "safetensors" else \
        torch.load(official / "diffusion_pytorch_model.bin", weights_only=True)
    loaded = pipe.unet.state_dict()
    for name, tensor in source.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    torch.testing.assert_close(pipe.unet.empty_prompt_embeds, empty_prompt_embeds(sd_base))
    assert pipe.unet.empty_prompt_embeds.shape == (1, 2, 32)  # BOS, EOS: no padding
    config = json.loads((tmp_path / "out" / "unet" / "config.json").read_text())
    assert config["_class_name"] == "DiffewSUNet2DConditionModel" and config["in_channels_ref"] == 8
    assert "_name_or_path" not in config or config["_name_or_path"] != "/data/ckpt"


def test_init_from_sd_initialises_conv_in_ref(tmp_path, sd_base):
    assert init_from_sd.main(["--base", str(sd_base), "--output", str(tmp_path / "out")]) == 0
    pipe = DiffewSPipeline.from_pretrained(tmp_path / "out")
    stock = UNet2DConditionModel.from_pretrained(sd_base, subfolder="unet")
    torch.testing.assert_close(pipe.unet.conv_in_ref.weight, stock.conv_in.weight.repeat(1, 2, 1, 1) / 2)
    torch.testing.assert_close(pipe.unet.conv_in_ref.bias, stock.conv_in.bias)
    torch.testing.assert_close(pipe.unet.conv_in.weight, stock.conv_in.weight)
    torch.testing.assert_close(pipe.unet.up_blocks[1].attentions[0].transformer_blocks[0].attn1.to_k.weight,
                               stock.up_blocks[1].attentions[0].transformer_blocks[0].attn1.to_k.weight)


def test_errors_name_the_folder(tmp_path, sd_base, capsys):
    (tmp_path / "empty").mkdir()
    assert convert_official.main(["--official", str(tmp_path / "empty"), "--base", str(sd_base), "--output", str(tmp_path / "o")]) == 2
    assert "is not a UNet folder" in capsys.readouterr().err
    # A plain Stable Diffusion UNet is not a DiffewS checkpoint
    assert convert_official.main(["--official", str(sd_base), "--base", str(sd_base), "--output", str(tmp_path / "o")]) == 2
    assert "no conv_in_ref weights" in capsys.readouterr().err
    official = write_official_unet(tmp_path / "official")
    assert convert_official.main(["--official", str(official), "--base", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    assert "missing vae, text_encoder, tokenizer" in capsys.readouterr().err
    assert init_from_sd.main(["--base", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    assert "is not a diffusers Stable Diffusion folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_module_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline_diffews.convert_official", "--official", str(tmp_path),
                             "--base", str(tmp_path), "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
