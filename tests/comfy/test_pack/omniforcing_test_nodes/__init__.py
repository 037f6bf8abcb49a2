"""Test-only ComfyUI nodes: a stand-in for the 12B Gemma text encoder, which cannot run in CI.

`OmniForcingTestCLIP` returns an object with the two methods CLIP Text Encode calls (`tokenize`,
`encode_from_tokens_scheduled`). It encodes a prompt into deterministic pseudo-features shaped like
ComfyUI's LTX-2.0 text encoder output: processed [1, 1024, 2*C] contexts (the 7680-wide compat path
at full size) or unprocessed [1, L, C] features flagged `unprocessed_ltxav_embeds` (the connectors
then run inside the model). The tests swap it in for LTXAVTextEncoderLoader; everything downstream
(CLIP Text Encode, our prompt nodes, the samplers) is the real code.
"""
import hashlib

import torch


def _features(text: str, length: int, width: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)
    return torch.randn(1, length, width, generator=torch.Generator().manual_seed(seed))


class _FakeLTXCLIP:
    def __init__(self, caption_channels: int, unprocessed: bool):
        self.c, self.unprocessed = caption_channels, unprocessed

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return text

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict={}, show_pbar=True):
        if self.unprocessed:
            return [[_features(tokens, 9, self.c), {"pooled_output": None, "unprocessed_ltxav_embeds": True}]]
        return [[_features(tokens, 1024, 2 * self.c), {"pooled_output": None}]]


class OmniForcingTestCLIP:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"caption_channels": ("INT", {"default": 24, "min": 1, "max": 3840}),
                             "mode": (["processed", "unprocessed"],)}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, caption_channels, mode):
        return (_FakeLTXCLIP(caption_channels, mode == "unprocessed"),)


NODE_CLASS_MAPPINGS = {"OmniForcingTestCLIP": OmniForcingTestCLIP}


class OmniForcingTestSaveTensors:
    """Writes IMAGE / AUDIO / LATENT tensors to <output>/tensors/<name>.safetensors so a test can compare
    them numerically without importing ComfyUI."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "dump"})},
                "optional": {"image": ("IMAGE",), "audio": ("AUDIO",), "latent": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def save(self, name, image=None, audio=None, latent=None):
        import os

        import folder_paths
        from safetensors.torch import save_file

        out = {}
        if image is not None:
            out["image"] = image
        if audio is not None:
            out["audio"] = audio["waveform"]
            out["sample_rate"] = torch.tensor([audio["sample_rate"]])
        if latent is not None:
            s = latent["samples"]
            if getattr(s, "is_nested", False):
                out["video_latent"], out["audio_latent"] = s.unbind()
            else:
                out["latent"] = s
        folder = os.path.join(folder_paths.get_output_directory(), "tensors")
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in out.items()},
                  os.path.join(folder, f"{name}.safetensors"))
        return {"ui": {"text": [name]}}


NODE_CLASS_MAPPINGS["OmniForcingTestSaveTensors"] = OmniForcingTestSaveTensors


class OmniForcingTestSlowVAE:
    """The given VAE with a sleep before every decode, so a stream is generated slower than real time on
    any machine: the browser test's live player must then pause to buffer, never run dry."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("VAE",), "seconds_per_decode": ("FLOAT", {"default": 1.5, "min": 0.0, "max": 30.0})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "slow"
    CATEGORY = "testing"

    def slow(self, vae, seconds_per_decode):
        import copy
        import time

        slowed = copy.copy(vae)  # same model (and measured decoder reach), only decode is slower
        decode = vae.decode

        def slow_decode(*args, **kwargs):
            time.sleep(seconds_per_decode)
            return decode(*args, **kwargs)

        slowed.decode = slow_decode
        return (slowed,)


NODE_CLASS_MAPPINGS["OmniForcingTestSlowVAE"] = OmniForcingTestSlowVAE
