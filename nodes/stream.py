"""The stream node: generate block by block, decode each block with the native VAEs, and write a
growing fragmented MP4 + HLS playlist into ComfyUI's output folder while the page plays it.

A cancel stops after the current step; what was generated is still decoded and the files are
closed valid (the playlist gets its end tag), then ComfyUI's interrupt propagates.
"""
from __future__ import annotations

import weakref
from fractions import Fraction

import torch
from comfy_api.latest import InputImpl, Types, io, ui

from ..omniforcing_core.decode import Decoder, audio_decoder, video_decoder
from ..omniforcing_core.layout import TimeBase
from ..omniforcing_core.live import LiveWriter
from ..omniforcing_core.modality import AV
from ..omniforcing_core.streaming import (MODES, PROBE_LATENTS_PER_SIDE, decode_plan, measure_reach, run_stream,
                                         stream_time)
from .common import CATEGORY, check_audio_vae, check_video_vae, log, preview_image, raise_interrupt, stated_reach
from .output import output_paths
from .sampler import (core_inputs, encode_given, encode_start_image, given_inputs, guidance_inputs, plan_run,
                      start_sampler, validate_core)

EVENT = "omniforcing.stream"  # websocket event the page's player listens to (nodes/web/omniforcing_stream.js)
_reach: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # VAE model -> measured TemporalContext


def vae_decoders(vae, audio_vae, time: TimeBase) -> AV[Decoder]:
    """The VAEs as streaming decoders: ComfyUI's LTX-2 VAEs (reach probed once per VAE model) or VAEs
    that state their reach (the toy model's)."""
    video = video_decoder(lambda z: vae.decode(z), None, time)  # [B, frames, H, W, 3] in [0, 1]
    audio = audio_decoder(lambda z: audio_vae.decode(z).movedim(-1, 1), None, time)  # ComfyUI: [B, samples, C]
    return AV(_with_reach(vae, video, "video", time), _with_reach(audio_vae, audio, "audio", time))


def _with_reach(vae, decoder: Decoder, kind: str, time: TimeBase) -> Decoder:
    stated = stated_reach(vae)
    if stated is not None:  # known from the architecture (the toy vocoder is global: a probe finds no end)
        return decoder.with_reach(stated.reach, stated.crossfade_frames * decoder.samples_per_frame)
    key = vae.first_stage_model
    if key not in _reach:
        with torch.inference_mode():
            probed = measure_reach(decoder, kind, time)
        if probed.saturated:
            log.warning("the %s decoder reaches at least as far as the probe (%d latents); an exact stream may "
                        "differ slightly from a whole-clip decode near block seams", kind,
                        getattr(PROBE_LATENTS_PER_SIDE, kind))
        log.info("measured %s decoder reach: %d latents back, %d ahead", kind, probed.reach.left, probed.reach.right)
        _reach[key] = probed.reach
    return decoder.with_reach(_reach[key])


class _Events:
    """Websocket messages for the in-page player: where the files are and how far they got."""

    def __init__(self, node_id, subfolder: str, base: str, blocks: int):
        from server import PromptServer

        self.server, self.subfolder = PromptServer.instance, subfolder
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
                io.Vae.Input("vae", tooltip="The video VAE: LTX-2's (VAE output of the LTX-2 checkpoint loader) or the "
                                            "'vae' output of 'OmniForcing Toy Model (embedded)'."),
                io.Vae.Input("audio_vae", tooltip="The audio VAE: LTX-2's (LTXV Audio VAE Loader) or the 'audio_vae' "
                                                  "output of 'OmniForcing Toy Model (embedded)'."),
                io.String.Input("filename_prefix", default="omniforcing/stream",
                                tooltip="Where the live files go, inside ComfyUI's output folder: <prefix>_NNNNN_.mp4 "
                                        "and the HLS folder <prefix>_NNNNN__hls/ (index.m3u8 + segments)."),
                io.Combo.Input("decode", options=list(MODES), default="exact",
                               tooltip="exact: each block is decoded with the VAE's full reach, identical to decoding "
                                       "the whole clip, but the picture lags by that reach (LTX-2: ~4.7 s) and context "
                                       "is decoded again per block. balanced / fast: 1 s / 0.33 s video look-ahead (audio "
                                       "seams crossfaded); close to, not equal to, a whole-clip decode."),
                io.Boolean.Input("keep_frames", default=True,
                                 tooltip="Return every frame as IMAGE/VIDEO (a 768x512 frame is 4.7 MB of RAM). Off: "
                                         "IMAGE is the last frame and VIDEO reads the written MP4; audio is always "
                                         "returned."),
                *guidance_inputs(),
                *given_inputs(),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="Decoded frames (24 fps)."),
                     io.Audio.Output(display_name="AUDIO", tooltip="Decoded audio."),
                     io.Video.Output(display_name="VIDEO", tooltip="Frames + audio, for Save Video.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None, steps=None):
        return validate_core(width, height, steps)

    @classmethod
    def execute(cls, model, positive, width, height, seconds, seed, steps, window, layout, vae, audio_vae,
                filename_prefix, decode, keep_frames, negative=None, video_cfg=3.0, audio_cfg=5.0, start_image=None,
                rebase_rope=False, audio=None, video=None, video_fps=24.0) -> io.NodeOutput:
        check_video_vae(vae)
        check_audio_vae(audio_vae)
        rp = plan_run(model, positive, width, height, seconds, seed, steps, window, layout, negative,
                      video_cfg, audio_cfg, rebase_rope)
        time = stream_time(int(audio_vae.audio_sample_rate_output))  # the audio VAE's rate sets the clock
        writer, subfolder, base = _open_writer(filename_prefix, width, height, time)  # bad paths fail first
        try:
            plan = decode_plan(decode, vae_decoders(vae, audio_vae, time), time)
            first = encode_start_image(vae, start_image, width, height) if start_image is not None else None
            given = encode_given(rp, vae, audio_vae, audio, video, video_fps, time)
            sampler, progress = start_sampler(rp, model, cls.hidden.unique_id, first,
                                              given.latents if given is not None else None)
        except BaseException:
            writer.close()  # nothing was written: the new names are removed, earlier files stay
            raise
        events = _Events(cls.hidden.unique_id, subfolder, base, rp.clip.num_blocks)
        run, cancelled = _stream(sampler, plan, writer, events, progress, keep_frames,
                                 given.media if given is not None else None)
        return _outputs(run, writer.summary(), events, keep_frames, cancelled, rp.clip.seconds)


def _open_writer(prefix: str, width: int, height: int, time: TimeBase) -> tuple[LiveWriter, str, str]:
    """The live writer in the output folder, made (and its paths checked) before any model is loaded."""
    folder, base, subfolder = output_paths(prefix, width, height)
    writer = LiveWriter(folder, time.fps, time.audio_sample_rate, width, height, name=f"{base}.mp4",
                        hls_dirname=f"{base}_hls")
    return writer, subfolder, base


def _until_cancelled(sampler):
    """The sampler's blocks until it stops for ComfyUI's interrupt (its should_stop between steps): then the
    iteration just ends, and the flag is cleared so the decode of what was made is not interrupted too."""
    import comfy.model_management as mm

    try:
        yield from sampler
    except InterruptedError:
        mm.interrupt_current_processing(False)
        raise


def _stream(sampler, plan, writer: LiveWriter, events: "_Events", progress, keep_frames: bool, given=None):
    """run_stream with the page player's events and the progress bar. A cancel - wherever ComfyUI's interrupt
    lands: between steps, inside a VAE decode, in the progress hook - keeps what was made: the run ends
    early and is returned (labelled cancelled); only a cancel before the first frame is an interrupt."""
    import comfy.model_management as mm

    events.send("start", seconds=0.0)

    def on_block(res, chunk):
        frame = chunk.frames[-1] if chunk.frames is not None else None
        progress.block_done(res.block, preview_image(frame) if frame is not None else None)
        s = writer.summary()
        events.send("block", block=res.block.index, seconds=s.video_seconds,
                    segment=s.last_segment.name if s.last_segment else None)

    try:
        with torch.inference_mode():
            run = run_stream(_until_cancelled(sampler), plan, writer, keep_video=keep_frames, on_block=on_block,
                             given=given, stop_on=(InterruptedError, mm.InterruptProcessingException))
    except BaseException as e:
        events.send("error", seconds=writer.summary().video_seconds, error=str(e)[:200])
        raise
    cancelled = run.interrupted is not None
    if cancelled:  # the cancel is done with: the rest of the graph runs on what was kept
        mm.interrupt_current_processing(False)
    summary = writer.summary()
    if cancelled and run.num_frames == 0:
        events.send("cancelled", seconds=0.0)
        raise_interrupt()  # nothing to show: the run is ComfyUI's ordinary interrupt
    events.send("cancelled" if cancelled else "done", seconds=summary.video_seconds)
    log.info("stream%s: %d blocks, %d frames, %.2f s audio -> %s", " (cancelled)" if cancelled else "",
             run.blocks, summary.video_frames, summary.audio_seconds, summary.paths.mp4)
    return run, cancelled


def _outputs(run, summary, events: "_Events", keep_frames: bool, cancelled: bool, asked_s: float) -> io.NodeOutput:
    """IMAGE, AUDIO, VIDEO and the UI entry: the saved MP4 (also after a cancel, labelled with the seconds
    kept, so history, the queue panel and Assets list it) and the live player's final state."""
    wave = run.audio()
    audio = {"waveform": (wave if wave is not None else torch.zeros(2, 0))[None].contiguous(),
             "sample_rate": run.sample_rate}
    if keep_frames:
        images = run.video()
        video = InputImpl.VideoFromComponents(Types.VideoComponents(
            images=images, audio=audio, frame_rate=Fraction(run.fps).limit_denominator(1001)))
    else:
        images = run.last_frame[None]
        video = InputImpl.VideoFromFile(str(summary.paths.mp4))
    saved = ui.SavedResult(summary.paths.mp4.name, events.subfolder, io.FolderType.output)
    status = "cancelled" if cancelled else "done"
    label = (f"cancelled: kept {summary.video_seconds:.1f} s of {asked_s:g} s" if cancelled
             else f"done: {summary.video_seconds:.1f} s")
    ui_out = {**ui.PreviewVideo([saved]).as_dict(), "text": [f"{label} - {summary.paths.mp4.name}"],
              "omniforcing_stream": [{**events.base, "status": status, "seconds": summary.video_seconds,
                                      "label": label}]}
    return io.NodeOutput(images, audio, video, ui=ui_out)
