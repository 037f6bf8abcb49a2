"""Issue 11 item 1: live output is A/V aligned. Whatever the decoders' reach and the decode mode, the driver
hands the writer frames [f0, f1) together with exactly the audio of [f0 / fps, f1 / fps) (the modality decoded
first waits for the other), the writer (`align_av`) cuts every fragment and HLS segment where its audio ends
(within one AAC frame), and at the end or on a cancel everything is flushed so audio and video end together
(within one AAC frame). The written files are decoded back segment by segment."""
import pytest
import torch

from harness.av import RecordingWriter, format_segment_table, reach_decoders, segment_ends
from omniforcing_core.config import TINY
from omniforcing_core.decode import TemporalContext
from omniforcing_core.embedded import random_model, toy_text
from omniforcing_core.layout import make_clip, make_layout
from omniforcing_core.live import LiveWriter
from omniforcing_core.media import probe_media
from omniforcing_core.sampling import Sampler
from omniforcing_core.streaming import MODES, decode_plan, run_stream, stream_time

SR = 24000
TIME = stream_time(SR)
AAC_FRAME = 1024
# right reach 0 vs 5 latents, each way round: audio waits for video / video waits for audio
REACHES = {"video ahead 5": (TemporalContext(1, 5), TemporalContext(2, 0)),
           "audio ahead 5": (TemporalContext(1, 0), TemporalContext(2, 5))}


@pytest.fixture(scope="module")
def generated():
    model = random_model(TINY)
    clip = make_clip(make_layout("v2"), 64, 64, seconds=4, seed=5)
    with torch.no_grad():
        return list(Sampler(model, clip, toy_text(model, "a drum and a flash")))


class Cancel(BaseException):
    pass


def _stream(results, mode, reach, out, stop_after=None):
    plan = decode_plan(mode, reach_decoders(*reach, TIME), TIME)
    writer = RecordingWriter(LiveWriter(out, TIME.fps, SR, 64, 64, align_av=True))

    def blocks():
        for i, r in enumerate(results):
            if i == stop_after:
                raise Cancel()
            yield r

    try:
        run_stream(blocks(), plan, writer, keep_video=False, keep_audio=False)
    except Cancel:
        pass
    return writer


def _check_handed_spans(writer):
    """Every write but the last: the audio of exactly its frames' time (1000 samples a frame at 24 kHz / 24 fps);
    in all, audio and video within one AAC frame."""
    calls = writer.calls
    for c in calls[:-1]:
        assert c.samples == c.frames * SR // 24, calls
    frames, samples = sum(c.frames for c in calls), sum(c.samples for c in calls)
    assert abs(samples - frames * SR // 24) <= AAC_FRAME, (frames, samples)
    return frames, samples


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", REACHES)
def test_every_write_covers_the_same_time_and_the_file_ends_together(generated, mode, case, tmp_path):
    writer = _stream(generated, mode, REACHES[case], tmp_path)
    frames, _ = _check_handed_spans(writer)
    assert frames == 97  # 4 s: the whole clip, however late the slower decoder was
    info = probe_media(writer.paths.mp4)
    assert info.video.frames == 97 and abs(info.av_drift) * SR <= AAC_FRAME
    _check_segments(writer, f"{case} / {mode}", frames)


def _check_segments(writer, title, frames):
    """Every HLS segment (decoded back with the ones before it) ends its audio within one AAC frame of its
    video: mid-stream 0-1023 samples after it (the writer keeps back the frames its AAC encoder has not
    covered yet), the last one wherever the audio handed in ends."""
    rows = segment_ends(writer.paths.playlist)
    table = format_segment_table(title, rows, SR)
    assert len(rows) <= sum(c.frames > 0 for c in writer.calls) + 1, table  # at most one more: the flush
    assert rows[-1].video_end == pytest.approx(frames / 24, abs=1e-6), table
    for r in rows[:-1]:
        assert 0 <= r.skew_samples(SR) < AAC_FRAME, table
    assert abs(rows[-1].skew_samples(SR)) <= AAC_FRAME, table


@pytest.mark.parametrize("case", REACHES)
def test_a_cancel_flushes_both_modalities_to_the_same_end(generated, case, tmp_path):
    writer = _stream(generated, "exact", REACHES[case], tmp_path, stop_after=2)
    frames, _ = _check_handed_spans(writer)
    assert frames == 49  # blocks 0 and 1, all of them
    info = probe_media(writer.paths.mp4)
    assert info.video.frames == 49 and abs(info.av_drift) * SR <= AAC_FRAME
    _check_segments(writer, f"{case} / cancel", frames)
