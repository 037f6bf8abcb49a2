"""The stream node: generate block by block, decode each block with the native VAEs, and write a
growing fragmented MP4 + HLS playlist into ComfyUI's output folder while the page plays it.

A cancel stops after the current step; what was generated is still decoded and the files are
closed valid (the playlist gets its end tag), then ComfyUI's interrupt propagates.
"""
from __future__ import annotations

import dataclasses
import os
import weakref
from fractions import Fraction

import torch
from comfy_api.latest import InputImpl, Types, io, ui

from ..omniforcing_core.av_stream import AVStreamer
from ..omniforcing_core.decode import TemporalContext
from ..omniforcing_core.layout import DEFAULT_TIME
from ..omniforcing_core.live import LiveWriter
from ..omniforcing_core.live_run import PRESETS, DecodePlan, measure_context, run_stream
from .common import CATEGORY, check_audio_vae, check_video_vae, log, preview_image, raise_interrupt
from .sampler import (core_inputs, encode_start_image, guidance_inputs, plan_run,
                      start_sampler, validate_core)

EVENT = "omniforcing.stream"  # websocket event the page's player listens to (nodes/web/omniforcing_stream.js)
FPS = DEFAULT_TIME.fps
# probe lengths (latents) when measuring a decoder's reach; LTX-2: video ~14, audio ~37 (+5 ahead)
VIDEO_PROBE, AUDIO_PROBE = 16, 48
_reach: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # VAE model -> measured TemporalContext


def video_decode_fn(vae):
    return lambda z: vae.decode(z)  # [B, frames, H, W, 3] in [0, 1]


def audio_decode_fn(vae):
    return lambda z: vae.decode(z).movedim(-1, 1)  # ComfyUI returns [B, samples, C]; we want [B, C, samples]


def _measured(vae, decode_fn, shape, codec, out_axis, spf, cap) -> TemporalContext:
    key = vae.first_stage_model
    if key not in _reach:
        lat = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ctx, saturated = measure_context(decode_fn, lat, codec, out_axis=out_axis, samples_per_frame=spf)
        if saturated:
            log.warning("decoder reach is at least the probe length (%d latents); streamed output may differ "
                        "slightly from a whole-clip decode near block seams", cap)
        log.info("measured decoder reach: %d latents back, %d ahead", ctx.left, ctx.right)
        _reach[key] = ctx
    return _reach[key]


def decode_plan(mode: str, vae, audio_vae, spf: int) -> DecodePlan:
    if mode in PRESETS:
        return PRESETS[mode](spf)
    v = _measured(vae, video_decode_fn(vae), (1, 128, 2 * VIDEO_PROBE + 3, 2, 2), DEFAULT_TIME.video, 1, 1,
                  VIDEO_PROBE)
    a = _measured(audio_vae, audio_decode_fn(audio_vae), (1, 8, 2 * AUDIO_PROBE + 3, 16), DEFAULT_TIME.audio, 2,
                  spf, AUDIO_PROBE)
    return DecodePlan(v, a)  # exact: no crossfade


def output_paths(prefix: str, width: int, height: int):
    """(folder, base name, subfolder) inside ComfyUI's output folder; refuses prefixes that escape it."""
    import folder_paths

    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_output_directory(), width, height)
    return folder, f"{filename}_{counter:05}_", subfolder.replace(os.sep, "/")


class _Events:
    """Websocket messages for the in-page player: where the files are and how far they got."""

    def __init__(self, node_id, subfolder: str, base: str, blocks: int):
        from server import PromptServer

        self.server = PromptServer.instance
        hls = f"{subfolder}/{base}_hls" if subfolder else f"{base}_hls"
        self.base = {"node": str(node_id), "prompt_id": getattr(self.server, "last_prompt_id", None),
                     "type": "output", "subfolder": subfolder, "mp4": f"{base}.mp4", "hls_subfolder": hls,
                     "playlist": "index.m3u8", "blocks": blocks}

    def send(self, status: str, **data) -> None:
        try:
            self.server.send_sync(EVENT, {**self.base, "status": status, **data}, self.server.client_id)
        except Exception as e:  # noqa: BLE001 - the page player is optional
            log.debug("stream event not sent: %s", e)


class OmniForcingStream(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniForcingStream",
            display_name="OmniForcing Stream (live A/V)",
            category=CATEGORY,
            description="Generates audio + video block by block, decodes each block as it lands and writes a live "
                        "fragmented MP4 + HLS playlist to the output folder; the node plays it while it grows. "
                        "Cancel keeps everything made so far, playable.",
            inputs=[
                *core_inputs(seconds_default=10, window_default=4),
                io.Vae.Input("vae", tooltip="The LTX-2 video VAE (VAE output of the LTX-2 checkpoint loader)."),
                io.Vae.Input("audio_vae", tooltip="The LTX-2 audio VAE (LTXV Audio VAE Loader)."),
                io.String.Input("filename_prefix", default="omniforcing/stream",
                                tooltip="Where the live files go, inside ComfyUI's output folder: <prefix>_NNNNN_.mp4 "
                                        "and the HLS folder <prefix>_NNNNN__hls/ (index.m3u8 + segments)."),
                io.Combo.Input("decode", options=["exact", "balanced", "fast"], default="exact",
                               tooltip="exact: each block is decoded with the VAE's full reach, identical to decoding "
                                       "the whole clip, but the picture lags by that reach (LTX-2: ~4.7 s) and context "
                                       "is decoded again per block. balanced / fast: 1 s / 0.33 s video look-ahead (audio "
                                       "seams crossfaded); close to, not equal to, a whole-clip decode."),
                io.Boolean.Input("keep_frames", default=True,
                                 tooltip="Return every frame as IMAGE/VIDEO (a 768x512 frame is 4.7 MB of RAM). Off: "
                                         "IMAGE is the last frame and VIDEO reads the written MP4; audio is always "
                                         "returned."),
                *guidance_inputs(),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="Decoded frames (24 fps)."),
                     io.Audio.Output(display_name="AUDIO", tooltip="Decoded audio."),
                     io.Video.Output(display_name="VIDEO", tooltip="Frames + audio, for Save Video.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None, seconds=None, steps=None, window=None):
        return validate_core(width, height, seconds, steps, window)

    @classmethod
    def execute(cls, model, positive, width, height, seconds, seed, steps, window, layout, vae, audio_vae,
                filename_prefix, decode, keep_frames, negative=None, video_cfg=3.0, audio_cfg=5.0, start_image=None,
                rebase_rope=False) -> io.NodeOutput:
        check_video_vae(vae)
        check_audio_vae(audio_vae)
        rp = plan_run(model, positive, width, height, seconds, seed, steps, window, layout, negative,
                      video_cfg, audio_cfg, rebase_rope)
        sr = int(audio_vae.audio_sample_rate_output)
        spf = sr // int(DEFAULT_TIME.mel_rate)
        folder, base, subfolder = output_paths(filename_prefix, width, height)
        first = encode_start_image(vae, start_image, width, height) if start_image is not None else None
        plan = decode_plan(decode, vae, audio_vae, spf)
        sampler, progress = start_sampler(rp, model, cls.hidden.unique_id, first)
        writer = LiveWriter(folder, FPS, sr, width, height, name=f"{base}.mp4", hls_dirname=f"{base}_hls")
        streamer = AVStreamer(video_decode_fn(vae), audio_decode_fn(audio_vae), video_context=plan.video,
                              audio_context=plan.audio, writer=writer, audio_crossfade=plan.audio_crossfade,
                              time=dataclasses.replace(DEFAULT_TIME, audio_sample_rate=sr))
        events = _Events(cls.hidden.unique_id, subfolder, base, rp.clip.num_blocks)
        events.send("start", seconds=0.0)

        def on_block(res, chunk):
            frame = chunk.frames[-1] if chunk.frames is not None and len(chunk.frames) else None
            progress.block_done(res.block, preview_image(frame) if frame is not None else None)
            s = writer.summary()
            events.send("block", block=res.block.index, seconds=s.video_seconds,
                        segment=s.segments[-1].name if s.segments else None)

        try:
            with torch.inference_mode():
                run = run_stream(iter(sampler), streamer, keep_video=keep_frames, on_block=on_block)
        except BaseException as e:
            cancelled = isinstance(e, (InterruptedError, KeyboardInterrupt)) or \
                type(e).__name__ == "InterruptProcessingException"
            events.send("cancelled" if cancelled else "error", seconds=writer.summary().video_seconds,
                        error=str(e)[:200])
            if isinstance(e, InterruptedError):
                raise_interrupt()
            raise
        summary = writer.summary()
        events.send("done", seconds=summary.video_seconds)
        log.info("stream: %d blocks, %d frames, %.2f s audio -> %s", run.blocks, summary.video_frames,
                 summary.audio_seconds, summary.paths.mp4)

        wave = run.audio()
        audio = {"waveform": (wave if wave is not None else torch.zeros(2, 0))[None].contiguous(), "sample_rate": sr}
        if keep_frames:
            images = run.video()
            video = InputImpl.VideoFromComponents(Types.VideoComponents(images=images, audio=audio,
                                                                        frame_rate=Fraction(int(FPS))))
        else:
            images = run.last_frame[None]
            video = InputImpl.VideoFromFile(str(summary.paths.mp4))
        saved = ui.SavedResult(f"{base}.mp4", subfolder, io.FolderType.output)
        ui_out = {**ui.PreviewVideo([saved]).as_dict(),
                  "omniforcing_stream": [{**events.base, "status": "done", "seconds": summary.video_seconds}]}
        return io.NodeOutput(images, audio, video, ui=ui_out)

