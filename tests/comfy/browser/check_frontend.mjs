// Browser checks against a running ComfyUI with the pack (driven by tests/comfy/test_browser.py):
//   1. every example workflow loads with window.app.loadGraphData and has no missing node types,
//      and app.graphToPrompt() gives exactly the shipped API copy; a screenshot of each;
//   2. the live player: a tiny stream is queued from the page and the player's time advances while
//      the stream is still generating.
// Usage: node check_frontend.mjs <url> <repo> <artifacts dir> <playwright-core dir>
// Prints one JSON object with the results.
import { readFileSync, mkdirSync } from "node:fs";
import { pathToFileURL } from "node:url";

const [url, repo, artifacts, pwDir] = process.argv.slice(2);
const { chromium } = await import(pathToFileURL(`${pwDir}/index.mjs`).href);
// long enough that the tiny random model (about 0.1 s a block here) is still generating after the
// player has played a second: an 8 s stream sometimes ended within a second and the check flaked
const STREAM_SECONDS = 30;
const names = ["omniforcing_t2av_5s", "omniforcing_stream_60s_schedule", "omniforcing_i2av", "omniforcing_toy_demo",
               "omniforcing_toy_stream"];
mkdirSync(artifacts, { recursive: true });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-sync", "--autoplay-policy=no-user-gesture-required"],
});
const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
const consoleErrors = [];
page.on("console", (m) => { if (m.type() === "error" || m.text().includes("[OmniForcing]")) consoleErrors.push(m.text()); });
page.on("pageerror", (e) => consoleErrors.push(`pageerror: ${e.message}`));
page.on("response", (r) => { if (r.status() >= 400) consoleErrors.push(`HTTP ${r.status()} ${r.url()}`); });

async function freshPage() {
  await page.goto(url);
  await page.waitForFunction(() => window.app?.vueAppReady && window.app?.graph &&
                             window.LiteGraph?.registered_node_types?.OmniForcingStream, null, { timeout: 120000 });
  await page.waitForTimeout(1500); // let the frontend finish restoring its last workflow before we load ours
}

const result = { workflows: {}, player: null, console: consoleErrors };
for (const name of names) {
  await freshPage();
  const ui = JSON.parse(readFileSync(`${repo}/workflows/${name}.json`, "utf8"));
  const api = JSON.parse(readFileSync(`${repo}/workflows/api/${name}.json`, "utf8"));
  const r = await page.evaluate(async ({ ui, api }) => {
    const app = window.app;
    await app.loadGraphData(ui);
    await new Promise((res) => setTimeout(res, 500));
    const missing = ui.nodes.map((n) => n.type).filter((t) => !window.LiteGraph.registered_node_types[t]);
    const dialogs = [...document.querySelectorAll(".p-dialog, [role=dialog]")].map((d) => d.innerText.slice(0, 200));
    const out = (await app.graphToPrompt()).output;
    const same = JSON.stringify(out, Object.keys(out).sort()) !== undefined &&
      JSON.stringify(Object.fromEntries(Object.entries(out).sort())) ===
      JSON.stringify(Object.fromEntries(Object.entries(api).sort()));
    const diff = [];
    for (const k of new Set([...Object.keys(out), ...Object.keys(api)])) {
      if (JSON.stringify(out[k]) !== JSON.stringify(api[k])) diff.push({ node: k, page: out[k], shipped: api[k] });
    }
    return { missing, dialogs, same: diff.length === 0 && same, diff: diff.slice(0, 3), nodes: app.graph._nodes.length };
  }, { ui, api });
  await page.waitForTimeout(800);
  r.screenshot = `${artifacts}/${name}.png`;
  await page.screenshot({ path: r.screenshot });
  result.workflows[name] = r;
}

// -- live player -------------------------------------------------------------------------------------
// Run twice: with ComfyUI's own Content-Security-Policy (sent with --disable-api-nodes; it forbids blob:
// media, so the player must fall back to the MP4 file) and with CSP bypassed (MediaSource path).
async function livePlayer(label, bypassCSP) {
  const ctx = await browser.newContext({ viewport: { width: 1600, height: 1000 }, bypassCSP });
  const p = await ctx.newPage();
  p.on("console", (m) => { if (m.text().includes("[OmniForcing]")) consoleErrors.push(`${label}: ${m.text()}`); });
  await p.goto(url);
  await p.waitForFunction(() => window.app?.vueAppReady && window.app?.graph &&
                          window.LiteGraph?.registered_node_types?.OmniForcingStream, null, { timeout: 120000 });
  await p.waitForTimeout(1500);
  const ui = JSON.parse(readFileSync(`${repo}/workflows/omniforcing_stream_60s_schedule.json`, "utf8"));
  const queued = await p.evaluate(async ({ ui, label, seconds }) => {
    const app = window.app;
    await app.loadGraphData(ui);
    await new Promise((res) => setTimeout(res, 500));
    const byType = (t) => app.graph._nodes.find((n) => n.type === t);
    const stream = byType("OmniForcingStream");
    const sched = byType("OmniForcingPromptSchedule");
    if (!stream || !sched) return { error: app.graph._nodes.map((n) => n.type) };
    // the 12B text encoder cannot run here: swap in the tests' stand-in (same CLIP socket)
    const te = byType("LTXAVTextEncoderLoader");
    const fake = window.LiteGraph.createNode("OmniForcingTestCLIP");
    app.graph.add(fake);
    fake.pos = te.pos;
    app.graph.remove(te);
    fake.connect(0, sched, sched.inputs.findIndex((i) => i.name === "clip"));
    const set = (node, name, v) => { const w = node.widgets.find((w) => w.name === name); w.value = v; };
    set(sched, "text", "0s: waves on a beach | 4s: a seagull calls");
    for (const [k, v] of Object.entries({ width: 64, height: 64, seconds, window: 2, decode: "fast",
                                           filename_prefix: `omniforcing/browser_${label}` })) set(stream, k, v);
    stream.size = [420, 700];
    app.canvas.ds.scale = 1.0;
    app.canvas.ds.offset = [-stream.pos[0] + 500, -stream.pos[1] + 40];
    app.canvas.setDirty(true, true);
    await app.queuePrompt(0, 1);
    return { id: stream.id };
  }, { ui, label, seconds: STREAM_SECONDS });
  if (queued.error) return { error: queued.error };
  const samples = [];
  let shot = null;
  const deadline = Date.now() + 300000;
  while (Date.now() < deadline) {
    const s = await p.evaluate((id) => {
      const node = window.app.graph.getNodeById(Number(id)) ?? window.app.graph.getNodeById(id);
      const pl = node?.omniforcingPlayer;
      if (!pl || !pl.info) return { status: null };
      const v = pl.video;
      return { status: pl.info.status, block: pl.info.block ?? null, t: v.currentTime, paused: v.paused,
               buffered: v.buffered.length ? v.buffered.end(v.buffered.length - 1) : 0, mode: pl.mode,
               muted: v.muted, error: v.error ? v.error.code : null, text: pl.status.textContent };
    }, queued.id);
    samples.push({ ...s, at: Date.now() });
    if (!shot && s.status === "block" && s.t > 0.5) {
      shot = `${artifacts}/live_player_${label}.png`;
      await p.screenshot({ path: shot });
    }
    if (["done", "cancelled", "error"].includes(s.status)) break;
    await p.waitForTimeout(250);
  }
  // the finished file (or the ended MediaSource) may still be loading: wait until its length is known
  let after = null;
  for (const stop = Date.now() + 20000; Date.now() < stop;) {
    await p.waitForTimeout(500);
    after = await p.evaluate((id) => {
      const node = window.app.graph.getNodeById(Number(id)) ?? window.app.graph.getNodeById(id);
      const v = node.omniforcingPlayer.video;
      return { t: v.currentTime, duration: Number.isFinite(v.duration) ? v.duration : null,
               mode: node.omniforcingPlayer.mode, error: v.error ? v.error.code : null };
    }, queued.id);
    if (after.error !== null || (after.duration !== null && after.duration > STREAM_SECONDS - 0.5)) break;
  }
  await ctx.close();
  const during = samples.filter((s) => s.status === "block");
  let advanced = false;
  for (let i = 1; i < during.length; i++) if (during[i].t > during[i - 1].t + 0.05) advanced = true;
  return { seconds: STREAM_SECONDS, advanced, modes: [...new Set(samples.map((s) => s.mode).filter(Boolean))], final: samples[samples.length - 1],
           after, during: during.length, maxTimeDuring: Math.max(0, ...during.map((s) => s.t)), screenshot: shot };
}
result.player = { csp: await livePlayer("csp", false), mse: await livePlayer("mse", true) };
await browser.close();
console.log(JSON.stringify(result));
