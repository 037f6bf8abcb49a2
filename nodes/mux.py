"""The mux node: IMAGE + AUDIO -> an MP4 (H.264 + AAC) in the output folder, and a VIDEO for Save Video."""
from __future__ import annotations

from comfy_api.latest import InputImpl, io, ui

from ..omniforcing_core.layout import DEFAULT_TIME
from ..omniforcing_core.media import MediaError, write_mp4
from .common import CATEGORY, log
from .output import output_paths


class OmniForcingMux(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniForcingMux",
            display_name="OmniForcing Mux MP4",
            category=CATEGORY,
            description="Writes frames and audio into one MP4 (H.264 + AAC, frame n at n/fps, sample m at m/rate) "
                        "in the output folder and returns it as VIDEO.",
            inputs=[
                io.Image.Input("images", tooltip="Frames [N, H, W, 3], e.g. from VAE Decode."),
                io.Float.Input("fps", default=DEFAULT_TIME.fps, min=1.0, max=120.0, step=1.0,
                               tooltip="Frame rate; OmniForcing / LTX-2 generate 24 fps."),
                io.String.Input("filename_prefix", default="omniforcing/video",
                                tooltip="File name prefix inside ComfyUI's output folder (<prefix>_NNNNN_.mp4)."),
                io.Audio.Input("audio", optional=True,
                               tooltip="Optional audio (e.g. from LTXV Audio VAE Decode); the first batch item is "
                                       "muxed."),
            ],
            outputs=[io.Video.Output(display_name="VIDEO", tooltip="The written MP4.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, fps, filename_prefix, audio=None) -> io.NodeOutput:
        if images is None or images.dim() != 4 or images.shape[0] == 0:
            raise ValueError("'images' must be a non-empty IMAGE batch [frames, height, width, channels]")
        h, w = int(images.shape[1]), int(images.shape[2])
        folder, base, subfolder = output_paths(filename_prefix, w, h)
        wave, rate = None, 24000
        if audio is not None:
            wave, rate = audio["waveform"][0], int(audio["sample_rate"])
        try:
            written = write_mp4(f"{folder}/{base}.mp4", images, fps, wave, rate)
        except MediaError as e:
            raise ValueError(f"could not write the MP4: {e}") from None
        if written.padded:
            log.info("odd frame size %dx%d padded to even for H.264", w, h)
        saved = ui.SavedResult(f"{base}.mp4", subfolder, io.FolderType.output)
        return io.NodeOutput(InputImpl.VideoFromFile(str(written.path)), ui=ui.PreviewVideo([saved]))
