"""Write tiny random-weight LTX-2 / OmniForcing files, under the real file names, into a models folder.

Run in a subprocess with ComfyUI importable (its VAE classes define the VAE key layouts):
    python make_tiny_models.py <models_dir> <comfyui_dir>

Files (same names as the real ones, so the example workflows run unchanged):
  checkpoints/ltx-2-19b-dev.safetensors        transformer (+ text connectors) + video VAE + audio VAE + vocoder,
                                               with the LTX header ("config": transformer / vae / audio_vae / vocoder)
  omniforcing/omniforcing_ltx2_5s_causal/       the generator as 2 shards + index (transformer only, no header)
  diffusion_models/omniforcing_ltx2_5s_causal.safetensors   the same generator as one file with an LTX header, for
                                               ComfyUI's native UNETLoader (the 'From Native MODEL' path)
  omniforcing/not_a_transformer.safetensors    video VAE weights only (a wrong file for the loader)
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

VIDEO_VAE = {"dims": 3, "latent_channels": 128, "patch_size": 4, "decoder_base_channels": 8,
             "encoder_base_channels": 8, "causal_decoder": False, "norm_layer": "pixel_norm",
             "latent_log_var": "uniform",
             "decoder_blocks": [["compress_all", {"multiplier": 1}]] * 3 + [["res_x", {"num_layers": 1}]],
             "encoder_blocks": [["res_x", {"num_layers": 1}]] + [["compress_all_res", {"multiplier": 1}]] * 3}
AUDIO_VAE = {"model": {"params": {"ddconfig": {
    "double_z": True, "mel_bins": 64, "z_channels": 8, "resolution": 256, "downsample_time": False, "in_channels": 2,
    "out_ch": 2, "ch": 8, "ch_mult": [1, 2, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
    "mid_block_add_attention": False, "norm_type": "pixel", "causality_axis": "height"}, "sampling_rate": 16000}},
    "preprocessing": {"audio": {"sampling_rate": 16000}, "stft": {"hop_length": 160, "filter_length": 1024}}}
VOCODER = {"resblock_kernel_sizes": [3], "upsample_rates": [6, 5, 2, 2, 2], "upsample_kernel_sizes": [16, 15, 8, 4, 4],
           "resblock_dilation_sizes": [[1, 3, 5]], "upsample_initial_channel": 32, "stereo": True, "resblock": "1"}

BASE_NAME = "ltx-2-19b-dev.safetensors"
GENERATOR = "omniforcing_ltx2_5s_causal"


def random_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """ComfyUI layers leave weights uninitialised: draw them (fan-in scaled), identity VAE statistics."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in module.state_dict().items():
        if "std-of-means" in k:
            sd[k] = torch.ones_like(v)
        elif "mean-of-means" in k:
            sd[k] = torch.zeros_like(v)
        elif v.ndim >= 2 and v.numel():
            sd[k] = torch.randn(v.shape, generator=g) / math.sqrt(max(1, v[0].numel()))
        else:
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
    return sd


def transformer_config():
    from omniforcing_core.config import TINY, ConnectorConfig

    # ComfyUI's connectors always have 128 registers
    return TINY.replace(connectors=ConnectorConfig(num_layers=1, heads=2, head_dim=12, num_registers=128))


def native_header(cfg) -> dict:
    """Our header plus the keys ComfyUI's LTXAV needs for a non-19B shape."""
    from omniforcing_core.loader import header_for

    h = header_for(cfg)
    h.update({"cross_attention_dim": cfg.video_dim, "audio_cross_attention_dim": cfg.audio_dim,
              "caption_channels": cfg.caption_channels, "connector_num_attention_heads": cfg.connectors.heads,
              "connector_num_layers": cfg.connectors.num_layers})
    return h


def main(models: Path, comfy_dir: Path) -> None:
    sys.path[:0] = [str(comfy_dir), str(REPO)]
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    from comfy.ldm.lightricks.vae.audio_vae import AudioVAE
    from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE

    from omniforcing_core.checkpoint import save_safetensors
    from omniforcing_core.embedded import random_model

    cfg = transformer_config()
    header = native_header(cfg)
    base = random_model(cfg, seed=0).state_dict()
    meta = {"transformer": header, "vae": VIDEO_VAE, "audio_vae": AUDIO_VAE, "vocoder": VOCODER}
    video_vae = random_state(VideoVAE(config=VIDEO_VAE), seed=1)
    audio = random_state(AudioVAE(metadata={"config": json.dumps({"audio_vae": AUDIO_VAE, "vocoder": VOCODER})}), 2)
    tensors = {f"model.diffusion_model.{k}": v for k, v in base.items()}
    tensors.update({f"vae.{k}": v for k, v in video_vae.items()})
    tensors.update({("audio_vae." + k[len("autoencoder."):] if k.startswith("autoencoder.") else k): v
                    for k, v in audio.items()})
    save_safetensors(tensors, models / "checkpoints" / BASE_NAME, metadata={"config": json.dumps(meta)})

    gen = {k: v for k, v in random_model(cfg, seed=7).state_dict().items() if "embeddings_connector" not in k}
    save_safetensors(gen, models / "omniforcing" / GENERATOR, shards=2)  # transformer-only, no header
    # the native loader needs connectors inside the diffusion model: take the base ones
    full = dict(gen, **{k: v for k, v in base.items() if "embeddings_connector" in k})
    save_safetensors(full, models / "diffusion_models" / f"{GENERATOR}.safetensors",
                     metadata={"config": json.dumps({"transformer": header})})
    # a file that is not a transformer (the loader must say so)
    save_safetensors({f"vae.{k}": v for k, v in video_vae.items()}, models / "omniforcing" / "not_a_transformer.safetensors")
    print("ok", models)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
