"""The embedded default: a tiny model with deterministic random weights and a toy text encoder,
so the demo and tests run on a fresh machine with no downloads."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .config import ModelConfig, get_config
from .model import OmniForcingTransformer
from .text import TextKV


def random_model(config: ModelConfig | str = "tiny", seed: int = 0, dtype=torch.float32, device="cpu",
                 operations=None) -> OmniForcingTransformer:
    cfg = get_config(config) if isinstance(config, str) else config
    torch.manual_seed(seed)
    m = OmniForcingTransformer(cfg, operations=operations, dtype=dtype, device=device)
    return m.eval().requires_grad_(False)


def toy_text_features(prompt: str, width: int, length: int = 16, batch: int = 1, dtype=torch.float32) -> torch.Tensor:
    """Deterministic pseudo-features of a prompt (stands in for Gemma when no encoder is present)."""
    seed = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, width, generator=g).to(dtype)


def toy_text(model: OmniForcingTransformer, prompt: str, batch: int = 1) -> TextKV:
    f = toy_text_features(prompt, model.config.caption_channels, batch=batch)
    if model.config.connectors is not None:
        v, a = model.encode_text(f)
        return model.text_kv(v, a)
    return model.text_kv(f, f)


# -- the trained toy student (issue #6) ----------------------------------------------------------------

ASSETS = Path(__file__).resolve().parent / "assets"


class DefaultModel:
    """What `load_default()` returns: the transformer, how to turn a prompt into text K/V, the layout
    and clip size it was trained for, and (when trained) the codecs' decoders.

    * `model`: OmniForcingTransformer (eval, no grad)
    * `text(prompt) -> TextKV`: the trained caption encoder, or `toy_text` for the random fallback
    * `text_encoder`: the toy TextEncoder module (None for the random fallback)
    * `codecs`: toy `Codecs` (video/audio decoders + procedural vocoder) or None for the fallback
      (use `preview` decoders then)
    * `layout`, `size` (pixels, square), `trained` (False = deterministic random weights)
    """

    def __init__(self, model, text_encoder, codecs, layout, size: int, trained: bool):
        self.model, self.text_encoder, self.codecs = model, text_encoder, codecs
        self.layout, self.size, self.trained = layout, size, trained

    def text(self, prompt: str, batch: int = 1) -> TextKV:
        if self.text_encoder is None:
            return toy_text(self.model, prompt, batch)
        with torch.no_grad():
            f = self.text_encoder([prompt] * batch)
        return self.model.text_kv(f, f)

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 128, F, h, w] -> [B, 3, 1 + 8(F-1), 32h, 32w] in [0, 1]."""
        if self.codecs is None:
            from .preview import PreviewVideoDecoder
            return PreviewVideoDecoder()(latents)
        return self.codecs.decode_video(latents)

    def decode_audio(self, latents: torch.Tensor, sample_rate: int = 24000) -> torch.Tensor:
        """[B, 8, T, 16] -> stereo waveform [B, 2, (4T - 3) * sample_rate / 100] (the preview's shape)."""
        if self.codecs is None:
            from .preview import PreviewAudioDecoder
            return PreviewAudioDecoder()(latents)
        return decode_toy_audio(self.codecs, latents, sample_rate)


def decode_toy_audio(codecs, latents: torch.Tensor, sample_rate: int = 24000) -> torch.Tensor:
    """Toy codecs: audio latents [B, 8, T, 16] -> stereo [B, 2, (4T - 3) * sample_rate / 100], the
    length LTX-2's audio VAE + vocoder give (so every streaming/muxing rule applies unchanged)."""
    from .layout import TimeBase
    w = codecs.decode_audio(latents, sample_rate)
    time = TimeBase(audio_sample_rate=sample_rate)
    n = time.audio.frames_for_latents(latents.shape[2]) * time.samples_per_mel_frame
    w = torch.nn.functional.pad(w, (0, max(0, n - w.shape[-1])))[..., :n]
    return w[:, None].expand(-1, 2, -1).contiguous()


def asset_files(assets=None) -> dict:
    """The shipped asset files by role: student (transformer), text (caption encoder), codecs."""
    root = ASSETS if assets is None else Path(assets)
    return {n: root / f"toy_{n}.safetensors" for n in ("student", "text", "codecs")}


def has_trained_assets(assets=None) -> bool:
    return all(f.exists() for f in asset_files(assets).values())


def student_meta(assets=None) -> dict:
    """The toy metadata in the student's header: model config, layout, sinks, training size."""
    import json

    from safetensors import safe_open
    with safe_open(str(asset_files(assets)["student"]), "pt") as f:
        return json.loads(f.metadata()["omniforcing_toy"])


def load_text_and_codecs(assets=None, caption_channels: int | None = None):
    """The trained caption encoder and codecs (eval, no grad) from the shipped assets."""
    from safetensors.torch import load_file

    from .toy.codecs import Codecs
    from .toy.textenc import TextEncoder
    files = asset_files(assets)
    if caption_channels is None:
        caption_channels = student_meta(assets)["model_config"]["caption_channels"]
    te = TextEncoder(caption_channels)
    te.load_state_dict(load_file(str(files["text"])), strict=True)
    codecs = Codecs()
    missing, unexpected = codecs.load_state_dict(load_file(str(files["codecs"])), strict=False)
    if unexpected or any(".dec." in f".{k}" or "latent_" in k for k in missing):
        raise ValueError(f"{files['codecs']}: codec decoders do not match (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return te.eval().requires_grad_(False), codecs.eval().requires_grad_(False)


def load_default(assets=None, dtype=torch.float32, device="cpu") -> DefaultModel:
    """The embedded default: the trained toy student + caption encoder + codec decoders shipped in
    `omniforcing_core/assets/` (issue #6), or the deterministic random tiny model when they are absent."""
    from .layout import make_layout
    if not has_trained_assets(assets):
        return DefaultModel(random_model("tiny", dtype=dtype, device=device), None, None, make_layout("v2"), 128,
                            False)
    from safetensors.torch import load_file

    meta = student_meta(assets)
    cfg = ModelConfig.from_dict(meta["model_config"])
    model = OmniForcingTransformer(cfg, dtype=dtype, device=device)
    model.load_state_dict(load_file(str(asset_files(assets)["student"]), device=str(device)), strict=True)
    model.eval().requires_grad_(False)
    te, codecs = load_text_and_codecs(assets, cfg.caption_channels)
    layout = make_layout(meta["layout"], num_sinks=meta.get("num_sinks", 0))
    return DefaultModel(model, te, codecs, layout, int(meta.get("size", 128)), True)
