// Live player for the "OmniForcing Stream" node: plays the growing fragmented MP4 with sound inside
// the node while it generates. The server sends an "omniforcing.stream" websocket event after every
// block. Two ways to play, chosen per page:
//   * "mse": re-read the HLS playlist, append each new fMP4 segment to a MediaSource (gapless);
//   * "file": play the growing MP4 itself and reload it when playback reaches its end. Used when the
//     page forbids blob: media (ComfyUI sends such a Content-Security-Policy with --disable-api-nodes)
//     or MediaSource is missing or fails.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "omniforcing.stream";
const NODE_TYPE = "OmniForcingStream";
const FINISHED = new Set(["done", "cancelled", "error"]);

function viewUrl(filename, subfolder, type = "output") {
  const q = new URLSearchParams({ filename, subfolder: subfolder || "", type });
  return api.apiURL(`/view?${q}`);
}

async function fetchBytes(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) throw new Error(`${r.status} ${url}`);
  return new Uint8Array(await r.arrayBuffer());
}

// The codecs string MediaSource needs, read from the init segment (avcC profile/level, AAC-LC).
function codecsFromInit(init) {
  const find = (s) => {
    outer: for (let i = 0; i + 4 <= init.length; i++) {
      for (let j = 0; j < 4; j++) if (init[i + j] !== s.charCodeAt(j)) continue outer;
      return i;
    }
    return -1;
  };
  const hex = (b) => b.toString(16).padStart(2, "0");
  const codecs = [];
  const a = find("avcC");
  if (a >= 0) codecs.push(`avc1.${hex(init[a + 5])}${hex(init[a + 6])}${hex(init[a + 7])}`);
  if (find("mp4a") >= 0) codecs.push("mp4a.40.2");
  return `video/mp4; codecs="${codecs.join(",")}"`;
}

class LivePlayer {
  constructor(node) {
    this.node = node;
    this.root = document.createElement("div");
    this.root.className = "omniforcing-live";
    this.root.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;min-height:120px";
    this.video = document.createElement("video");
    this.video.controls = true;
    this.video.playsInline = true;
    this.video.style.cssText = "width:100%;flex:1;min-height:0;background:#000;object-fit:contain";
    this.status = document.createElement("div");
    this.status.style.cssText = "font:11px sans-serif;opacity:.8;white-space:nowrap;overflow:hidden";
    this.status.textContent = "live preview: waiting for a stream";
    this.root.append(this.video, this.status);
    const w = node.addDOMWidget("omniforcing_live", "omniforcing_live", this.root, { serialize: false, hideOnZoom: false });
    w.serialize = false;
    w.computeSize = (width) => [width, 260];
    // file mode: when playback runs out of the loaded file, load the grown one and go on
    const more = () => { if (this.mode === "file" && this.fileStale) this.loadFile(true); };
    this.video.addEventListener("ended", more);
    this.video.addEventListener("timeupdate", () => {
      const v = this.video;
      if (v.duration && v.currentTime > v.duration - 0.25) more();
    });
    this.key = null;
  }

  // a new stream (new files) replaces the old one
  reset(info) {
    this.key = `${info.prompt_id}/${info.hls_subfolder}`;
    this.appended = new Set();
    this.queue = Promise.resolve();
    this.ended = false;
    this.sb = null;
    this.ms = null;
    this.fileStale = false;
    this.mode = null;
    this.ready = window.MediaSource ? this.openMediaSource() : Promise.resolve(this.useFile("no MediaSource"));
  }

  // MediaSource plays from a blob: URL, which a Content-Security-Policy may forbid (ComfyUI sends one
  // with --disable-api-nodes): try it, fall back to the file on a violation, an error or a timeout.
  openMediaSource() {
    this.mode = "mse";
    this.ms = new MediaSource();
    const url = URL.createObjectURL(this.ms);
    let onCsp;
    const opened = new Promise((resolve, reject) => {
      onCsp = (e) => { if ((e.blockedURI || "").startsWith("blob")) reject(new Error("blocked by the page's CSP")); };
      document.addEventListener("securitypolicyviolation", onCsp);
      this.ms.addEventListener("sourceopen", resolve, { once: true });
      this.video.addEventListener("error", () => reject(new Error("the video refused the MediaSource")), { once: true });
      setTimeout(() => reject(new Error("MediaSource did not open")), 5000);
    });
    this.video.src = url;
    return opened.catch((e) => { this.video.removeAttribute("src"); this.useFile(e); })
      .finally(() => document.removeEventListener("securitypolicyviolation", onCsp));
  }

  useFile(why) {
    if (why) console.warn("[OmniForcing] live player falls back to the MP4 file:", why.message || why);
    this.mode = "file";
    this.ms = null;
    this.sb = null;
  }

  update(info) {
    if (this.key !== `${info.prompt_id}/${info.hls_subfolder}`) this.reset(info);
    this.info = info;
    const where = info.seconds ? `${info.seconds.toFixed(1)} s written` : "decoding";
    const what = FINISHED.has(info.status) ? info.status
      : info.block !== undefined ? `block ${info.block + 1}/${info.blocks}` : info.status;
    this.status.textContent = `${what} - ${where} - ${info.mp4}`;
    // one refresh at a time; each reads what is on disk now
    this.queue = this.queue.then(() => this.refresh()).catch((e) => {
      this.useFile(e);
      return this.refresh().catch(() => {});
    });
  }

  async refresh() {
    await this.ready;
    if (this.mode === "file") {
      if (this.info.seconds > 0) this.loadFile(FINISHED.has(this.info.status));
      return;
    }
    const info = this.info;
    const text = await fetch(viewUrl(info.playlist, info.hls_subfolder), { cache: "no-store" })
      .then((r) => (r.ok ? r.text() : "")).catch(() => "");
    const segments = text.split("\n").filter((l) => l && !l.startsWith("#"));
    if (!segments.length) return;
    if (!this.sb) {
      const init = await fetchBytes(viewUrl("init.mp4", info.hls_subfolder));
      const mime = codecsFromInit(init);
      if (!MediaSource.isTypeSupported(mime)) throw new Error(`this browser cannot play ${mime}`);
      this.sb = this.ms.addSourceBuffer(mime);
      await this.append(init);
    }
    for (const name of segments) {
      if (this.appended.has(name)) continue;
      await this.append(await fetchBytes(viewUrl(name, info.hls_subfolder)));
      this.appended.add(name);
    }
    this.play();
    if (FINISHED.has(info.status) && text.includes("#EXT-X-ENDLIST") && !this.ended && this.ms.readyState === "open") {
      this.ended = true;
      this.ms.endOfStream();
    }
  }

  append(bytes) {
    return new Promise((resolve, reject) => {
      const done = () => { this.sb.removeEventListener("error", fail); resolve(); };
      const fail = () => { this.sb.removeEventListener("updateend", done); reject(new Error("appendBuffer failed")); };
      this.sb.addEventListener("updateend", done, { once: true });
      this.sb.addEventListener("error", fail, { once: true });
      this.sb.appendBuffer(bytes);
    });
  }

  // file mode: (re)load the MP4 now if nothing is playing, else when playback reaches its end
  loadFile(now) {
    const v = this.video;
    const idle = !v.currentSrc || v.ended || v.paused || v.readyState < 2;
    this.fileStale = true;
    if (!now && !idle) return;
    this.fileStale = false;
    const t = v.currentSrc ? v.currentTime : 0;
    v.src = `${viewUrl(this.info.mp4, this.info.subfolder)}&t=${Date.now()}`;
    v.addEventListener("loadedmetadata", () => {
      if (t > 0 && t < v.duration) v.currentTime = t;
      this.play(true);
    }, { once: true });
  }

  play(force) {
    const v = this.video;
    if (!force && (!v.paused || !v.buffered.length)) return;
    v.play().catch(() => {
      // autoplay with sound needs a user gesture on some browsers: start muted, the user can unmute
      v.muted = true;
      v.play().catch(() => {});
    });
  }
}

function playerFor(node) {
  if (!node.omniforcingPlayer) node.omniforcingPlayer = new LivePlayer(node);
  return node.omniforcingPlayer;
}

app.registerExtension({
  name: "OmniForcing.LiveStreamPlayer",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      playerFor(this);
      return r;
    };
  },
  setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      if (!detail) return;
      const graph = app.graph;
      const node = graph?.getNodeById?.(Number(detail.node)) ?? graph?.getNodeById?.(detail.node);
      if (!node || node.type !== NODE_TYPE) return;
      playerFor(node).update(detail);
    });
  },
});
