// The example workflows, as node specs the builder turns into real frontend graphs. Widget values are
// set by name; links are [from node, output slot, to node, input name]. Model names are the real ones;
// the host tests write tiny random-weight files under the same names.
const LTX = "ltx-2-19b-dev.safetensors";
const GENERATOR = "omniforcing/omniforcing_ltx2_5s_causal/";
const STEPS = "1000,909,725,421,0";

const loaders = (x = 40) => [
  { id: 1, type: "CheckpointLoaderSimple", pos: [x, 60], title: "LTX-2 checkpoint (video VAE)", widgets: { ckpt_name: LTX } },
  { id: 2, type: "LTXVAudioVAELoader", pos: [x, 220], widgets: { ckpt_name: LTX } },
  { id: 3, type: "LTXAVTextEncoderLoader", pos: [x, 340],
    widgets: { text_encoder: "gemma_3_12B_it.safetensors", ckpt_name: LTX, device: "default" } },
  { id: 4, type: "OmniForcingModelLoader", pos: [x, 520],
    widgets: { generator: GENERATOR, base: `checkpoints/${LTX}`, weight_dtype: "default", layout: "auto", rope: "auto" } },
];

const note = (id, pos, text) => ({ id, type: "MarkdownNote", pos, size: [420, 220], widgets: { text } });

const FILES = `Files (none are downloaded):
- \`models/checkpoints/${LTX}\` (LTX-2 base: VAEs, vocoder, text connectors)
- \`models/text_encoders/gemma_3_12B_it.safetensors\`
- \`models/omniforcing/omniforcing_ltx2_5s_causal/\` (the OmniForcing generator shards + index)`;

const decodeTail = (sampler, x) => [
  { id: 20, type: "LTXVSeparateAVLatent", pos: [x, 60] },
  { id: 21, type: "VAEDecode", pos: [x + 260, 40] },
  { id: 22, type: "LTXVAudioVAEDecode", pos: [x + 260, 160] },
];
const decodeLinks = (sampler) => [
  [sampler, 0, 20, "av_latent"], [20, 0, 21, "samples"], [1, 2, 21, "vae"], [20, 1, 22, "samples"], [2, 0, 22, "audio_vae"],
];

// The toy A->V / V->A examples: a world clip is the given media (its `given` outputs -> the stream's inputs,
// as [world clip output slot, stream input] pairs) and its caption the prompt, typed into the widget rather
// than linked from the clip's `caption` output (the frontend could link it), so the prompt node keeps a text
// widget like every shipped workflow: scripts/queue_batch.py replaces it with each prompt of a batch.
const toyGiven = ({ seed, caption, prefix, given, note: text }) => ({
  nodes: [
    { id: 1, type: "OmniForcingToyModel", pos: [40, 150] },
    { id: 2, type: "OmniForcingToyWorldClip", pos: [40, 400], widgets: { seed, control_after_generate: "fixed", seconds: 5 } },
    { id: 3, type: "OmniForcingToyTextEncode", pos: [40, 620], size: [400, 160], title: "Prompt (the clip's caption)",
      widgets: { text: caption } },
    { id: 4, type: "OmniForcingStream", pos: [480, 60], size: [420, 900],
      widgets: { width: 128, height: 128, seconds: 5, seed: 0, control_after_generate: "fixed", steps: STEPS, window: 0,
                 layout: "model", filename_prefix: prefix, decode: "balanced", keep_frames: true } },
    note(30, [940, 60], text),
  ],
  links: [[1, 0, 4, "model"], [1, 1, 3, "toy"], [3, 0, 4, "positive"], [1, 3, 4, "vae"],
          [1, 4, 4, "audio_vae"], ...given.map(([slot, input]) => [2, slot, 4, input])],
});

export const WORKFLOWS = {
  omniforcing_t2av_5s: {
    nodes: [
      ...loaders(),
      { id: 10, type: "CLIPTextEncode", pos: [480, 60], size: [400, 160], title: "Prompt",
        widgets: { text: "A golden retriever runs along a beach at sunset, waves crash on the sand, the dog barks twice." } },
      { id: 11, type: "OmniForcingSampler", pos: [480, 300],
        widgets: { width: 768, height: 512, seconds: 5, seed: 42, control_after_generate: "fixed", steps: STEPS, window: 0, layout: "model" } },
      ...decodeTail(11, 940),
      { id: 23, type: "CreateVideo", pos: [1460, 60], widgets: { fps: 24 } },
      { id: 24, type: "SaveVideo", pos: [1720, 60], size: [360, 420], widgets: { filename_prefix: "omniforcing/t2av", format: "mp4" } },
      note(30, [40, 760], `### OmniForcing: text -> audio + video (5 s)\nThe sampler returns a native LTX-2 A/V latent: it is decoded with ComfyUI's own LTX-2 nodes.\n\n${FILES}`),
    ],
    links: [[3, 0, 10, "clip"], [4, 0, 11, "model"], [10, 0, 11, "positive"], ...decodeLinks(11),
            [21, 0, 23, "images"], [22, 0, 23, "audio"], [23, 0, 24, "video"]],
  },
  omniforcing_stream_60s_schedule: {
    nodes: [
      ...loaders(),
      { id: 10, type: "OmniForcingPromptSchedule", pos: [480, 60], size: [420, 200], title: "Timed prompts",
        widgets: { text: "0s: a quiet forest at dawn, birds sing\n20s: a light rain starts, drops patter on the leaves\n40s: thunder rolls in the distance, heavy rain", recache: true } },
      { id: 11, type: "OmniForcingStream", pos: [960, 60], size: [420, 900],
        widgets: { width: 768, height: 512, seconds: 60, seed: 7, control_after_generate: "fixed", steps: STEPS, window: 4,
                   layout: "model", filename_prefix: "omniforcing/stream60", decode: "balanced", keep_frames: false, rebase_rope: true } },
      note(30, [40, 760], `### OmniForcing: a 60 s live stream with a prompt schedule\nA rolling window of 4 blocks keeps memory flat; \`rebase_rope\` lets it run past 20 s. The node plays the growing MP4 while it generates; files land in \`output/omniforcing/\` (MP4 + HLS). Cancel keeps what was made.\n\n${FILES}`),
    ],
    links: [[3, 0, 10, "clip"], [4, 0, 11, "model"], [10, 0, 11, "positive"], [1, 2, 11, "vae"], [2, 0, 11, "audio_vae"]],
  },
  omniforcing_i2av: {
    nodes: [
      ...loaders(),
      { id: 9, type: "LoadImage", pos: [480, 380], size: [320, 320], widgets: { image: "example.png" } },
      { id: 10, type: "CLIPTextEncode", pos: [480, 60], size: [400, 160], title: "Prompt",
        widgets: { text: "The scene comes alive: a gentle breeze, distant birdsong, the camera slowly pushes in." } },
      { id: 11, type: "OmniForcingSampler", pos: [940, 300],
        widgets: { width: 768, height: 512, seconds: 5, seed: 3, control_after_generate: "fixed", steps: STEPS, window: 0, layout: "model" } },
      ...decodeTail(11, 1400),
      { id: 23, type: "OmniForcingMux", pos: [1920, 60], size: [360, 420], widgets: { fps: 24, filename_prefix: "omniforcing/i2av" } },
      note(30, [40, 760], `### OmniForcing: image -> audio + video\nThe start image is encoded with the LTX-2 video VAE into the first latent frame and held clean; audio and the rest of the video follow it.\n\n${FILES}`),
    ],
    links: [[3, 0, 10, "clip"], [4, 0, 11, "model"], [10, 0, 11, "positive"], [9, 0, 11, "start_image"], [1, 2, 11, "vae"],
            ...decodeLinks(11), [21, 0, 23, "images"], [22, 0, 23, "audio"]],
  },
  omniforcing_toy_demo: {
    nodes: [
      { id: 1, type: "OmniForcingToyModel", pos: [40, 150] },
      { id: 2, type: "OmniForcingToyTextEncode", pos: [40, 350], size: [400, 160], title: "Prompt",
        widgets: { text: "a red ball bounces twice, a blue square slides" } },
      { id: 3, type: "OmniForcingSampler", pos: [480, 150],
        widgets: { width: 128, height: 128, seconds: 5, seed: 0, control_after_generate: "fixed", steps: STEPS, window: 0, layout: "model" } },
      { id: 4, type: "OmniForcingToyDecode", pos: [940, 150] },
      { id: 5, type: "CreateVideo", pos: [1200, 150], widgets: { fps: 24 } },
      { id: 6, type: "SaveVideo", pos: [1460, 150], size: [360, 420], widgets: { filename_prefix: "omniforcing/toy", format: "mp4" } },
      note(30, [40, 640], "### OmniForcing: the embedded toy model (no downloads)\nThe tiny student shipped with the pack, trained by its own recipe on a synthetic world: coloured balls and squares that bounce and slide, each bounce a tone whose pitch is the object's colour (red 350 Hz, green 600 Hz, blue 1400 Hz, yellow 2400 Hz). 5 s at 128x128 in seconds on a CPU: a quick check that the pack works."),
    ],
    links: [[1, 0, 3, "model"], [1, 1, 2, "toy"], [2, 0, 3, "positive"], [3, 0, 4, "latent"], [1, 1, 4, "toy"],
            [4, 0, 5, "images"], [4, 1, 5, "audio"], [5, 0, 6, "video"]],
  },
  omniforcing_toy_stream: {
    nodes: [
      { id: 1, type: "OmniForcingToyModel", pos: [40, 150] },
      { id: 2, type: "OmniForcingToyTextEncode", pos: [40, 420], size: [400, 160], title: "Prompt",
        widgets: { text: "a red ball bounces twice, a blue square slides" } },
      { id: 3, type: "OmniForcingStream", pos: [480, 60], size: [420, 900],
        widgets: { width: 128, height: 128, seconds: 5, seed: 0, control_after_generate: "fixed", steps: STEPS, window: 0,
                   layout: "model", filename_prefix: "omniforcing/toy_stream", decode: "balanced", keep_frames: true } },
      note(30, [40, 640], "### OmniForcing: a live stream from the embedded toy model (no downloads)\nThe toy's own codecs are its `vae` and `audio_vae`: every block is decoded as it lands and appended to a growing MP4 + HLS playlist in `output/omniforcing/`, which the node plays with sound while it generates. Cancel keeps what was made. 5 s at 128x128, the size the toy was trained at; try other captions in the toy world's words (a green square bounces three times)."),
    ],
    links: [[1, 0, 3, "model"], [1, 1, 2, "toy"], [2, 0, 3, "positive"], [1, 3, 3, "vae"], [1, 4, 3, "audio_vae"]],
  },
  omniforcing_toy_a2v: toyGiven({
    seed: 5, caption: "a blue ball bounces four times, a red square bounces five times", prefix: "omniforcing/toy_a2v", given: [[1, "audio"]],
    note: "### OmniForcing: audio -> video with the embedded toy model (no downloads)\nThe world clip's sound goes into the stream's `audio` input: it is encoded with the toy's `audio_vae` and held clean in every block while the video is generated to it, so shapes hit the floor and walls when the tones sound. The prompt is the clip's caption, typed in for seed 5 and 5 s: after changing those, link the clip's `caption` output into the prompt's text, or write your own in the toy world's words. The stream's file and AUDIO output carry the given sound itself.\n\nYour own sound: replace *OmniForcing Toy World Clip* with **Load Audio** (any length of at least `seconds`; it is resampled and cut) and describe the picture you want in the prompt.",
  }),
  omniforcing_toy_v2a: toyGiven({
    seed: 8, caption: "a red square bounces five times, a green ball slides and hits the wall many times", prefix: "omniforcing/toy_v2a", given: [[0, "video"], [3, "video_fps"]],
    note: "### OmniForcing: video -> audio with the embedded toy model (no downloads)\nThe world clip's frames go into the stream's `video` input (with its frame rate into `video_fps`): they are encoded with the toy's `vae` and held clean in every block while the sound is generated to them, a tone at every contact. The prompt is the clip's caption, typed in for seed 8 and 5 s: after changing those, link the clip's `caption` output into the prompt's text, or write your own in the toy world's words. The stream's file and IMAGE output carry the given frames themselves.\n\nYour own video: replace *OmniForcing Toy World Clip* with **Load Video** (+ Get Video Components for frames and fps) or any IMAGE frames; they are resampled to 24 fps, scaled to cover 128x128 and cut to `seconds`.",
  }),
  omniforcing_a2v: {
    nodes: [
      ...loaders(),
      { id: 9, type: "LoadAudio", pos: [480, 300], size: [320, 140], widgets: { audio: "example.wav" } },
      { id: 10, type: "CLIPTextEncode", pos: [480, 60], size: [400, 160], title: "Prompt",
        widgets: { text: "A drummer plays a wooden drum kit in a small club, warm stage lights, each hit lands with the beat, the camera holds a medium shot." } },
      { id: 11, type: "OmniForcingStream", pos: [960, 60], size: [420, 900],
        widgets: { width: 768, height: 512, seconds: 5, seed: 5, control_after_generate: "fixed", steps: STEPS, window: 0,
                   layout: "model", filename_prefix: "omniforcing/a2v", decode: "balanced", keep_frames: true } },
      note(30, [40, 760], `### OmniForcing: audio -> video\nYour sound (**Load Audio**: put \`example.wav\` or any audio file into ComfyUI's \`input/\` folder, or upload one) goes into the stream's \`audio\` input: it is encoded with the LTX-2 audio VAE and held clean in every block while the video is generated to it. It is resampled and cut to \`seconds\` (a shorter file is refused). The prompt describes the picture; the file and the AUDIO output carry your sound itself.\n\n${FILES}`),
    ],
    links: [[3, 0, 10, "clip"], [4, 0, 11, "model"], [10, 0, 11, "positive"], [1, 2, 11, "vae"], [2, 0, 11, "audio_vae"],
            [9, 0, 11, "audio"]],
  },
};
