// Builds the example workflows in the real ComfyUI frontend and saves what it saves: the UI format
// (workflows/*.json, for the template browser) and the API format (workflows/api/*.json) of the same
// graph, via app.graphToPrompt().
// Usage: node build_workflows.mjs <server url> <repo dir> <playwright-core dir>
// (a ComfyUI with the pack loaded; e.g. the host tests' server, or any local one)
import { mkdirSync, writeFileSync } from "node:fs";
import { pathToFileURL } from "node:url";
import { WORKFLOWS } from "./workflow_specs.mjs";

const [url, repo, pwDir] = process.argv.slice(2);
const { chromium } = await import(pathToFileURL(`${pwDir}/index.mjs`).href);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
mkdirSync(`${repo}/workflows/api`, { recursive: true });
for (const [name, spec] of Object.entries(WORKFLOWS)) {
  // a fresh page per workflow: the frontend remembers widget values by node id across graphs
  await page.goto(url);
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.OmniForcingStream,
                             null, { timeout: 90000 });
  const res = await page.evaluate(async (spec) => {
    const app = window.app;
    app.graph.clear();
    const nodes = {};
    const problems = [];
    for (const s of spec.nodes) {
      const n = window.LiteGraph.createNode(s.type);
      if (!n) { problems.push(`unknown node type ${s.type}`); continue; }
      n.id = s.id;
      app.graph.add(n);
      n.pos = s.pos;
      if (s.size) n.size = s.size;
      if (s.title) n.title = s.title;
      for (const [k, v] of Object.entries(s.widgets || {})) {
        const w = (n.widgets || []).find((w) => w.name === k);
        if (!w) { problems.push(`${s.type} has no widget ${k}`); continue; }
        w.value = v;
        w.callback?.(v, app.canvas, n);
      }
      nodes[s.id] = n;
    }
    for (const [from, slot, to, input] of spec.links) {
      const dst = nodes[to];
      const idx = dst.inputs.findIndex((i) => i.name === input);
      if (idx < 0) { problems.push(`node ${to} has no input ${input}`); continue; }
      if (!nodes[from].connect(slot, dst, idx)) problems.push(`could not link ${from}:${slot} -> ${to}.${input}`);
    }
    // the view the workflow opens with (saved in extra.ds)
    app.canvas.ds.scale = 0.7;
    app.canvas.ds.offset = [40, 30];
    const p = await app.graphToPrompt();
    return { problems, workflow: p.workflow, output: p.output };
  }, spec);
  if (res.problems.length) throw new Error(`${name}: ${res.problems.join("; ")}`);
  writeFileSync(`${repo}/workflows/${name}.json`, JSON.stringify(res.workflow, null, 2) + "\n");
  writeFileSync(`${repo}/workflows/api/${name}.json`, JSON.stringify(res.output, null, 2) + "\n");
  console.log("wrote", name, Object.keys(res.output).length, "API nodes");
}
await browser.close();
