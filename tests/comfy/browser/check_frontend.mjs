// Browser checks against a running ComfyUI with the pack (driven by tests/comfy/test_browser.py):
//   1. every example workflow loads with window.app.loadGraphData and has no missing node types,
//      and app.graphToPrompt() gives exactly the shipped API copy; a screenshot of each;
// (the live player is measured by check_player.mjs)
// Usage: node check_frontend.mjs <url> <repo> <artifacts dir> <playwright-core dir>
// Prints one JSON object with the results.
import { readFileSync, readdirSync, mkdirSync } from "node:fs";
import { pathToFileURL } from "node:url";

const [url, repo, artifacts, pwDir] = process.argv.slice(2);
const { chromium } = await import(pathToFileURL(`${pwDir}/index.mjs`).href);
// every shipped workflow (test_browser.py lists the same folder)
const names = readdirSync(`${repo}/workflows`).filter((f) => f.endsWith(".json")).map((f) => f.slice(0, -5)).sort();
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

const result = { workflows: {}, console: consoleErrors };
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

await browser.close();
console.log(JSON.stringify(result));
