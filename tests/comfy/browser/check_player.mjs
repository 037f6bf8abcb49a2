// The live player measured in a real browser on a real ComfyUI (driven by tests/comfy/test_browser.py).
// Each run queues a stream from the page and measures the in-node player (player_probe.mjs) from its
// first frame to the end of playback: stalls after the start, the player's buffering pauses, and the
// element's A/V offset. Runs are sequential (one stream and one playing element at a time).
//
// Usage: node check_player.mjs <url> <repo> <artifacts dir> <playwright-core dir> <runs.json>
// runs.json: [{label, source: "tiny" | "toy", decode, player: "mse" | "file", seconds,
//              slow?: seconds of sleep per video VAE decode (generation slower than real time),
//              margin?: the player's live-edge margin (a negative control sets it below 0: never pause),
//              startBuffer?: the start-buffer setting, cancelAfter?: press Cancel once playback passes this time,
//              control?: a file URL to play in a bare <video>}]
// A "file" run keeps ComfyUI's CSP (sent with --disable-api-nodes: no blob: media, so the player plays
// the growing MP4); an "mse" run bypasses it (MediaSource + HLS segments).
// Prints one JSON object {runs: {label: result}, console: [...]}.
import { readFileSync, mkdirSync } from "node:fs";
import { pathToFileURL } from "node:url";
import { installProbe } from "./player_probe.mjs";

const [url, repo, artifacts, pwDir, runsFile] = process.argv.slice(2);
const runs = JSON.parse(readFileSync(runsFile, "utf8"));
const { chromium } = await import(pathToFileURL(`${pwDir}/index.mjs`).href);
mkdirSync(artifacts, { recursive: true });
const SETTING = "OmniForcing.LivePlayer.StartBufferSeconds";

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-sync", "--autoplay-policy=no-user-gesture-required"],
});
const consoleLines = [];

async function openPage(label, bypassCSP) {
  // a small page: with software compositing (--disable-gpu) a big one starves the video of CPU on a shared box
  const ctx = await browser.newContext({ viewport: { width: 1000, height: 760 }, bypassCSP });
  const p = await ctx.newPage();
  p.on("console", (m) => { if (m.type() === "error" || m.text().includes("[OmniForcing]")) consoleLines.push(`${label}: ${m.text()}`); });
  p.on("pageerror", (e) => consoleLines.push(`${label}: pageerror: ${e.message}`));
  p.on("response", (r) => { if (r.status() >= 400) consoleLines.push(`${label}: HTTP ${r.status()} ${r.url()}`); });
  await p.goto(url);
  await p.waitForFunction(() => window.app?.vueAppReady && window.app?.graph &&
                          window.LiteGraph?.registered_node_types?.OmniForcingStream, null, { timeout: 120000 });
  await p.waitForTimeout(1500); // let the frontend finish restoring its last workflow before we load ours
  return { ctx, p };
}

// A bare <video> playing a given file, measured the same way: the negative control of the measurement.
async function control(run) {
  const { ctx, p } = await openPage(run.label, false);
  await p.evaluate(() => {
    const v = document.createElement("video");
    v.style.cssText = "position:fixed;left:0;top:0;width:320px;height:240px;z-index:99999";
    document.body.append(v);
    window.__ofControl = { videos: [v], video: v, state: "control" };
  });
  await p.evaluate(`(${installProbe})(window.__ofControl)`);
  const r = await p.evaluate(async ({ src }) => {
    const v = window.__ofControl.video;
    v.src = src;
    await new Promise((res) => v.addEventListener("canplaythrough", res, { once: true }));
    await v.play();
    await new Promise((res) => v.addEventListener("ended", res, { once: true }));
    window.__ofProbe.stop = true;
    return { ...window.__ofProbe.summary(), duration: v.duration, end: v.currentTime };
  }, { src: run.control });
  await ctx.close();
  return r;
}

async function measure(run) {
  const { ctx, p } = await openPage(run.label, run.player === "mse");
  const workflow = run.source === "toy" ? "omniforcing_toy_stream" : "omniforcing_stream_60s_schedule";
  const ui = JSON.parse(readFileSync(`${repo}/workflows/${workflow}.json`, "utf8"));
  const queued = await p.evaluate(async ({ ui, run, SETTING }) => {
    const app = window.app;
    const setting = app.extensionManager?.setting;
    const before = setting?.get(SETTING);
    if (setting && run.startBuffer !== undefined) await setting.set(SETTING, run.startBuffer);
    const startBuffer = setting?.get(SETTING);
    await app.loadGraphData(ui);
    await new Promise((res) => setTimeout(res, 500));
    const byType = (t) => app.graph._nodes.find((n) => n.type === t);
    const stream = byType("OmniForcingStream");
    if (!stream) return { error: app.graph._nodes.map((n) => n.type) };
    const sched = byType("OmniForcingPromptSchedule");
    const te = byType("LTXAVTextEncoderLoader");
    if (te && sched) {
      // the 12B text encoder cannot run here: swap in the tests' stand-in (same CLIP socket)
      const fake = window.LiteGraph.createNode("OmniForcingTestCLIP");
      app.graph.add(fake);
      fake.pos = te.pos;
      app.graph.remove(te);
      fake.connect(0, sched, sched.inputs.findIndex((i) => i.name === "clip"));
      sched.widgets.find((w) => w.name === "text").value = "0s: waves on a beach | 4s: a seagull calls";
    }
    if (run.slow) {
      // generation slower than real time: a sleep before each video VAE decode
      const vaeSlot = stream.inputs.findIndex((i) => i.name === "vae");
      const link = app.graph.links[stream.inputs[vaeSlot].link];
      const src = app.graph.getNodeById(link.origin_id);
      const slow = window.LiteGraph.createNode("OmniForcingTestSlowVAE");
      app.graph.add(slow);
      slow.pos = [stream.pos[0] - 300, stream.pos[1] + 600];
      slow.widgets.find((w) => w.name === "seconds_per_decode").value = run.slow;
      src.connect(link.origin_slot, slow, 0);
      slow.connect(0, stream, vaeSlot);
    }
    const set = (name, v) => { const w = stream.widgets.find((w) => w.name === name); if (w) w.value = v; };
    const size = run.source === "toy" ? {} : { width: 64, height: 64, window: 2 };
    for (const [k, v] of Object.entries({ ...size, seconds: run.seconds, decode: run.decode,
                                          filename_prefix: `omniforcing/player_${run.label}_${Date.now()}` })) set(k, v);
    stream.size = [420, 560];
    app.canvas.ds.scale = 1.0;
    app.canvas.ds.offset = [-stream.pos[0] + 60, -stream.pos[1] + 40];
    app.canvas.setDirty(true, true);
    // the player sits below the node's widgets: scroll the canvas so that it is in view
    await new Promise((res) => setTimeout(res, 300));
    const top = stream.omniforcingPlayer.root.getBoundingClientRect().y;
    if (top > 0) app.canvas.ds.offset[1] -= top - 170;
    app.canvas.setDirty(true, true);
    await new Promise((res) => setTimeout(res, 300));
    if (run.margin !== undefined) stream.omniforcingPlayer.margin = run.margin;
    return { id: stream.id, startBuffer, before };
  }, { ui, run, SETTING });
  if (queued.error) { await ctx.close(); return { error: queued.error }; }
  // a string, evaluated by the debugger: no eval inside the page (its CSP may forbid it)
  await p.evaluate(`(${installProbe})(window.app.graph.getNodeById(${JSON.stringify(queued.id)}).omniforcingPlayer)`);
  await p.evaluate(() => window.app.queuePrompt(0, 1));

  const look = (id) => p.evaluate((id) => {
    const node = window.app.graph.getNodeById(Number(id)) ?? window.app.graph.getNodeById(id);
    const pl = node?.omniforcingPlayer;
    if (!pl || !pl.info) return { status: null };
    const v = pl.video;
    return { status: pl.info.status, seconds: pl.info.seconds ?? 0, t: v.currentTime, paused: v.paused, state: pl.state,
             mode: pl.mode, muted: v.muted, error: v.error ? v.error.code : null, text: pl.status.textContent,
             duration: Number.isFinite(v.duration) ? v.duration : null, stats: { ...(pl.stats || {}) } };
  }, id);
  const shoot = async (name) => {
    const rect = await p.evaluate((id) => {
      const node = window.app.graph.getNodeById(Number(id)) ?? window.app.graph.getNodeById(id);
      const r = node.omniforcingPlayer.root.getBoundingClientRect();
      return { x: r.x, y: r.y, width: r.width, height: r.height };
    }, queued.id);
    const path = `${artifacts}/${name}.png`;
    const clip = { x: Math.max(0, rect.x - 20), y: Math.max(0, rect.y - 60), width: rect.width + 40, height: rect.height + 80 };
    await p.screenshot({ path, clip: clip.width > 60 && clip.height > 80 ? clip : undefined });
    return path;
  };

  const samples = [];
  const shots = {};
  const limit = Date.now() + 1000 * (60 + run.seconds * 4 + (run.slow ? run.seconds * (run.slow + 1) * 2 : 0));
  let finishedAt = null;
  let cancelled = false;
  while (Date.now() < limit) {
    const s = await look(queued.id);
    samples.push({ ...s, at: Date.now() });
    if (!shots.playing && s.state === "playing" && s.t > 1.5) shots.playing = await shoot(`live_player_${run.label}`);
    if (!shots.buffering && s.state === "buffering" && s.stats?.bufferingPauses > 0 && !["done", "cancelled", "error"].includes(s.status)) {
      shots.buffering = await shoot(`live_player_${run.label}_buffering`);
    }
    if (run.cancelAfter !== undefined && !cancelled && s.state === "playing" && s.t > run.cancelAfter) {
      cancelled = true; // the queue's Cancel: ComfyUI interrupts the stream, which keeps what it made
      await p.evaluate(() => fetch("/api/interrupt", { method: "POST" }));
    }
    if (["done", "cancelled", "error"].includes(s.status) && finishedAt === null) finishedAt = Date.now();
    if (s.state === "ended") break;
    // finished but not playing to the end: give up after the stream's length and a margin
    if (finishedAt !== null && Date.now() - finishedAt > 1000 * (run.seconds + 30)) break;
    await p.waitForTimeout(200);
  }
  const probe = await p.evaluate(() => { window.__ofProbe.stop = true; return window.__ofProbe.summary(); });
  const after = await look(queued.id);
  if (run.startBuffer !== undefined) {
    await p.evaluate(async ({ SETTING, v }) => window.app.extensionManager?.setting?.set(SETTING, v),
                     { SETTING, v: queued.before });
  }
  await ctx.close();
  const during = samples.filter((s) => s.status === "block");
  let advanced = false;
  for (let i = 1; i < during.length; i++) if (during[i].t > during[i - 1].t + 0.05) advanced = true;
  return { run, startBuffer: queued.startBuffer, modes: [...new Set(samples.map((s) => s.mode).filter(Boolean))],
           final: after, advanced, maxTimeDuring: Math.max(0, ...during.map((s) => s.t)),
           texts: [...new Set(samples.map((s) => s.text).filter(Boolean).map((t) => t.replace(/[0-9.]+/g, "#")))],
           screenshots: shots, probe };
}

const result = { runs: {}, console: consoleLines };
for (const run of runs) {
  try {
    result.runs[run.label] = run.control ? { run, probe: await control(run) } : await measure(run);
  } catch (e) {
    result.runs[run.label] = { run, error: String(e?.stack || e) };
  }
  console.error(`[check_player] ${run.label}: ${JSON.stringify(summaryLine(result.runs[run.label]))}`);
}
await browser.close();
console.log(JSON.stringify(result));

function summaryLine(r) {
  if (r.error) return { error: r.error.slice(0, 300) };
  const q = r.probe;
  return { stalls: q.stalls, pauses: r.final?.stats?.bufferingPauses, swaps: r.final?.stats?.swaps, frames: q.frames,
           offset: q.frameOffset, age: q.pictureAge, state: r.final?.state, modes: r.modes };
}
